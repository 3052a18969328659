//! `eddy bench`: put throughput and latency against a running node, or
//! the asynchronous path through an engine.

use anyhow::Context;
use clap::Args;
use eddy::client::QueueClient;

use std::collections::BTreeMap;

use bytes::Bytes;

use super::queue::{QueueArgs, client};

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) q: QueueArgs,
    /// Concurrent producers, each with one put in flight.
    #[arg(long, short = 'p', default_value_t = 4)]
    pub(crate) producers: usize,
    /// Total puts.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    pub(crate) count: usize,
    /// Payload bytes.
    #[arg(long, short = 's', default_value_t = 256)]
    pub(crate) size: usize,
    /// Leave the benchmark's items on the queue. Without it they are
    /// truncated afterwards, when the queue was empty before the run (a
    /// queue that held items is left as it is).
    #[arg(long)]
    pub(crate) keep: bool,
    /// Measure the asynchronous path instead: put → engine → model → sink,
    /// from the put until the result arrives on the sink (an engine must be
    /// running). With --model, also time direct calls to the model.
    #[arg(long)]
    pub(crate) e2e: bool,
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Also print the latency budget: where the run's time went on each
    /// node of the cluster, stage by stage (read from the nodes' metrics
    /// before and after the run; needs the status or admin token).
    #[arg(long)]
    pub(crate) breakdown: bool,
    /// For `--breakdown`.
    #[command(flatten)]
    pub(crate) status: super::StatusToken,
}

/// Each node's stage histograms: (count, seconds) per stage name.
type StageTotals = BTreeMap<u64, BTreeMap<String, (u64, f64)>>;

/// The API addresses of the cluster's members, by id, as `endpoint` sees
/// them.
async fn members(endpoint: &str, token: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let status = eddy::client::AdminClient::new(endpoint, token)
        .get("/admin/cluster")
        .await
        .context("reading the cluster's members (--breakdown needs --status-token)")?;
    let nodes = status["nodes"]
        .as_object()
        .context("/admin/cluster lists no nodes")?;
    Ok(nodes
        .iter()
        .filter_map(|(id, addrs)| Some((id.parse().ok()?, addrs[1].as_str()?.to_string())))
        .collect())
}

/// Read every member's stage histograms (and its fsync histogram, as the
/// stage `fsync`).
async fn stage_totals(members: &BTreeMap<u64, String>, token: &str) -> anyhow::Result<StageTotals> {
    let mut totals = StageTotals::new();
    for (id, api) in members {
        let text = eddy::client::AdminClient::new(api, token)
            .get("/metrics")
            .await
            .with_context(|| format!("reading node {id}'s metrics at {api}"))?;
        let text = text.as_str().unwrap_or_default();
        let node = totals.entry(*id).or_default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (stage, is_sum) =
                if let Some(rest) = name.strip_prefix("eddy_stage_seconds_sum{stage=\"") {
                    (rest.trim_end_matches("\"}"), true)
                } else if let Some(rest) = name.strip_prefix("eddy_stage_seconds_count{stage=\"") {
                    (rest.trim_end_matches("\"}"), false)
                } else if name == "eddy_fsync_seconds_sum" {
                    ("fsync", true)
                } else if name == "eddy_fsync_seconds_count" {
                    ("fsync", false)
                } else {
                    continue;
                };
            let entry = node.entry(stage.to_string()).or_default();
            if is_sum {
                entry.1 = value;
            } else {
                entry.0 = value as u64;
            }
        }
    }
    Ok(totals)
}

/// The run's share of each node's histograms (after minus before), as a
/// table: per stage and node, how often it ran and its mean time.
fn print_breakdown(before: &StageTotals, after: &StageTotals, puts: usize) {
    let ids: Vec<u64> = after.keys().copied().collect();
    let mut stages: Vec<&String> = Vec::new();
    for node in after.values() {
        for stage in node.keys() {
            if !stages.contains(&stage) {
                stages.push(stage);
            }
        }
    }
    println!("latency budget of the run ({puts} puts): per node, times a stage ran / its mean");
    print!("{:<18}", "stage");
    for id in &ids {
        print!("{:>24}", format!("node {id}"));
    }
    println!();
    for stage in stages {
        let mut row = format!("{stage:<18}");
        let mut any = false;
        for id in &ids {
            let (n1, s1) = after[id].get(stage).copied().unwrap_or_default();
            let (n0, s0) = before
                .get(id)
                .and_then(|b| b.get(stage))
                .copied()
                .unwrap_or_default();
            let n = n1.saturating_sub(n0);
            let cell = if n == 0 {
                "-".to_string()
            } else {
                any = true;
                format!("{n} / {:.3} ms", (s1 - s0) * 1000.0 / n as f64)
            };
            row.push_str(&format!("{cell:>24}"));
        }
        if any {
            println!("{row}");
        }
    }
}

/// p50, p99 and max of latencies in microseconds, in milliseconds.
pub(crate) fn percentiles(mut lat: Vec<u64>) -> (f64, f64, f64) {
    if lat.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    (pct(0.5), pct(0.99), pct(1.0))
}

/// Put → engine → model → sink, timed per request id.
pub(crate) async fn bench_e2e(a: BenchArgs) -> anyhow::Result<()> {
    let input = client(&a.q);
    let sink = QueueClient::new(
        &a.q.ep.node.endpoint,
        &format!("{}/sink", a.q.queue),
        &a.q.ep.token,
    );
    let body = Bytes::from(format!(
        "[{{\"x\": \"{}\"}}]",
        "y".repeat(a.size.saturating_sub(12))
    ));
    let started = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        std::time::Instant,
    >::new()));
    let (done_tx, mut done_rx) =
        tokio::sync::mpsc::unbounded_channel::<(String, std::time::Instant)>();
    let watcher = {
        let sink = sink.clone();
        tokio::spawn(async move {
            sink.watch(256, true, |f| {
                let tx = done_tx.clone();
                async move {
                    let rid = f
                        .tags
                        .get(eddy::protocol::REQUEST_ID_TAG)
                        .cloned()
                        .unwrap_or_default();
                    tx.send((rid, std::time::Instant::now())).is_ok()
                }
            })
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let start = std::time::Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut producers = Vec::new();
    for _ in 0..a.producers {
        let (c, body, next, started, total) = (
            input.clone(),
            body.clone(),
            next.clone(),
            started.clone(),
            a.count,
        );
        producers.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let t = std::time::Instant::now();
                let (_, rid) = c.put(body.clone(), &BTreeMap::new(), 0).await?;
                started.lock().unwrap().insert(rid, t);
            }
            anyhow::Ok(())
        }));
    }
    let mut lat = Vec::new();
    let mut pending = Vec::new();
    while lat.len() < a.count {
        let (rid, at) = tokio::time::timeout(std::time::Duration::from_secs(60), done_rx.recv())
            .await
            .context("no result for 60 s: is an engine running?")?
            .context("sink watch ended")?;
        pending.push((rid, at));
        pending.retain(|(rid, at)| match started.lock().unwrap().get(rid) {
            Some(t) => {
                lat.push(at.duration_since(*t).as_micros() as u64);
                false
            }
            None => true,
        });
    }
    let wall = start.elapsed().as_secs_f64();
    for p in producers {
        p.await??;
    }
    watcher.abort();
    let n = lat.len();
    let (p50, p99, max) = percentiles(lat);
    println!(
        "{n} requests through put → engine → model → sink by {} producers in {wall:.2} s: {:.0} requests/s, latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        a.producers,
        n as f64 / wall
    );
    if let Some(model) = &a.model {
        let m = eddy::engine::ModelClient::new(model, std::time::Duration::from_secs(10))?;
        let mut direct = Vec::new();
        for _ in 0..2000 {
            let t = std::time::Instant::now();
            m.call("", body.clone(), None).await?;
            direct.push(t.elapsed().as_micros() as u64);
        }
        let (d50, d99, _) = percentiles(direct);
        println!(
            "direct model calls (sequential): p50 {d50:.2} ms, p99 {d99:.2} ms; the queue adds p50 {:.2} ms",
            p50 - d50
        );
    }
    Ok(())
}

pub(crate) async fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.e2e {
        return bench_e2e(a).await;
    }
    let c = client(&a.q);
    // What the queue held before the run is never cleaned up with the
    // benchmark's items.
    let held_before = c
        .attributes()
        .await?
        .get(eddy::protocol::ATTR_LENGTH)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let payload = Bytes::from(vec![b'x'; a.size]);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tags = BTreeMap::new();
    // Warm up connections and the leader's caches.
    for _ in 0..100 {
        c.put(payload.clone(), &tags, 0).await?;
    }
    let budget = if a.breakdown {
        let members = members(&a.q.ep.node.endpoint, &a.status.token).await?;
        let before = stage_totals(&members, &a.status.token).await?;
        Some((members, before))
    } else {
        None
    };
    // On stderr, and only on a terminal: output piped elsewhere stays
    // the figures alone.
    let progress = if a.q.ep.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(a.count as u64)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} puts, {per_sec}, {elapsed} (eta {eta})",
        )
        .expect("a valid template"),
    );
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.producers {
        let (c, payload, next, tags, total, progress) = (
            c.clone(),
            payload.clone(),
            next.clone(),
            tags.clone(),
            a.count,
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let t = std::time::Instant::now();
                c.put(payload.clone(), &tags, 0).await?;
                lat.push(t.elapsed().as_micros() as u64);
                progress.inc(1);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    progress.finish_and_clear();
    let wall = start.elapsed().as_secs_f64();
    let puts = lat.len();
    let mean_ms = lat.iter().sum::<u64>() as f64 / puts.max(1) as f64 / 1000.0;
    let (p50, p99, max) = percentiles(lat);
    let result = serde_json::json!({
        "producers": a.producers, "puts": puts, "payload_bytes": a.size,
        "wall_s": (wall * 1000.0).round() / 1000.0,
        "puts_per_s": (puts as f64 / wall).round(),
        "p50_ms": p50, "p99_ms": p99, "max_ms": max,
    });
    if a.q.ep.json {
        println!("{result}");
    } else {
        println!(
            "{:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "puts", "payload", "producers", "wall s", "puts/s", "p50 ms", "p99 ms", "max ms"
        );
        println!(
            "{:>9} {:>9} {:>10} {:>9.2} {:>9.0} {:>9.2} {:>9.2} {:>9.2}",
            puts,
            format!("{} B", a.size),
            a.producers,
            wall,
            puts as f64 / wall,
            p50,
            p99,
            max
        );
    }
    if let Some((members, before)) = budget {
        let after = stage_totals(&members, &a.status.token).await?;
        println!("client: put mean {mean_ms:.3} ms");
        print_breakdown(&before, &after, puts);
    }
    if a.keep {
        return Ok(());
    }
    if held_before > 0 {
        eprintln!(
            "the queue held {held_before} items before the run: the benchmark's items are \
             left on it too (eddy queue truncate removes them)"
        );
    } else if let Some(last) = c
        .attributes()
        .await?
        .get(eddy::protocol::ATTR_LAST_ENTRY)
        .and_then(|v| v.parse::<u64>().ok())
    {
        c.truncate_before(last + 1).await?;
    }
    Ok(())
}
