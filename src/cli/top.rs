//! `eddy top`: the services and consumers of a cluster, live in the
//! terminal, from a node's `/admin/overview`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use clap::Args;
use eddy::client::AdminClient;

use super::NodeEndpoint;

#[derive(Args)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    pub(crate) node: NodeEndpoint,
    #[command(flatten)]
    pub(crate) status: super::StatusToken,
    /// Time between refreshes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub(crate) interval_ms: u64,
    /// Print this many screens and stop (0: until Ctrl-C). Each screen
    /// after the first shows rates.
    #[arg(long, default_value_t = 0)]
    pub(crate) iterations: u64,
    /// Print plain text, without clearing the screen between refreshes.
    #[arg(long)]
    pub(crate) plain: bool,
}

/// Totals seen on the previous screen, for rates.
type Previous = BTreeMap<(String, String), (Instant, u64, u64)>;

pub(crate) async fn top(a: TopArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(&a.node.endpoint, &a.status.token);
    let mut previous = Previous::new();
    let mut shown = 0u64;
    let stop = super::terminated();
    tokio::pin!(stop);
    loop {
        let overview = client.get("/admin/overview").await?;
        let screen = render(&overview, &mut previous);
        if a.plain {
            println!("{screen}");
        } else {
            // Clear the screen and go home, then draw.
            print!("\x1b[2J\x1b[H{screen}");
        }
        shown += 1;
        if a.iterations > 0 && shown >= a.iterations {
            return Ok(());
        }
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(a.interval_ms.max(100))) => {}
        }
    }
}

fn render(o: &serde_json::Value, previous: &mut Previous) -> String {
    let mut out = String::new();
    let leader = o["leader"]
        .as_u64()
        .map_or("none".to_string(), |l| l.to_string());
    let _ = writeln!(
        out,
        "eddy top · node {} · leader {leader} · term {}",
        o["node"], o["term"]
    );
    let _ = writeln!(
        out,
        "\n{:<24} {:<5} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9} {:>9} {:>5} {:>5}",
        "SERVICE",
        "QUEUE",
        "LENGTH",
        "BACKLOG",
        "FLIGHT",
        "OCCUPANCY",
        "OLDEST",
        "PUTS/S",
        "COMMITS/S",
        "CONS",
        "DEAD"
    );
    let now = Instant::now();
    let mut consumers = Vec::new();
    for q in o["queues"].as_array().into_iter().flatten() {
        let service = q["service"].as_str().unwrap_or_default().to_string();
        let queue = q["queue"].as_str().unwrap_or_default().to_string();
        let puts = q["puts_total"].as_u64().unwrap_or(0);
        let commits = q["commits_total"].as_u64().unwrap_or(0);
        let key = (service.clone(), queue.clone());
        let rates = previous.get(&key).map(|(at, p, c)| {
            let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
            (
                puts.saturating_sub(*p) as f64 / secs,
                commits.saturating_sub(*c) as f64 / secs,
            )
        });
        previous.insert(key, (now, puts, commits));
        let in_flight = q["in_flight"].as_u64().unwrap_or(0);
        let window = q["window"].as_u64().unwrap_or(0);
        let occupancy = if window == 0 {
            "-".to_string()
        } else {
            format!("{}/{}", in_flight, window)
        };
        let oldest = q["oldest_age_ms"].as_u64().map_or("-".to_string(), age);
        let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.1}"));
        let list = q["consumers"].as_array().cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<24} {:<5} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9} {:>9} {:>5} {:>5}",
            service,
            queue,
            q["length"].as_u64().unwrap_or(0),
            q["backlog"].as_u64().unwrap_or(0),
            in_flight,
            occupancy,
            oldest,
            rate(rates.map(|r| r.0)),
            rate(rates.map(|r| r.1)),
            list.len(),
            q["dead_letters"].as_u64().unwrap_or(0),
        );
        for c in list {
            consumers.push((service.clone(), queue.clone(), c));
        }
    }
    if !consumers.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<24} {:<5} {:<16} {:<24} {:>4} {:>6} {:>5} {:>8} {:<8}",
            "SERVICE", "QUEUE", "GROUP", "USER", "NODE", "WINDOW", "HOLDS", "IDLE", "STATE"
        );
        for (service, queue, c) in consumers {
            let window = if c["auto_commit"].as_bool() == Some(true) {
                "auto".to_string()
            } else {
                c["window"].as_u64().unwrap_or(0).to_string()
            };
            let _ = writeln!(
                out,
                "{:<24} {:<5} {:<16} {:<24} {:>4} {:>6} {:>5} {:>8} {:<8}",
                service,
                queue,
                c["group"].as_str().unwrap_or_default(),
                c["user"].as_str().unwrap_or_default(),
                c["node"].as_u64().unwrap_or(0),
                window,
                c["holds"].as_u64().unwrap_or(0),
                age(c["idle_ms"].as_u64().unwrap_or(0)),
                c["state"].as_str().unwrap_or_default(),
            );
        }
    }
    out
}

fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..120_000 => format!("{:.1}s", ms as f64 / 1000.0),
        120_000..7_200_000 => format!("{}m", ms / 60_000),
        _ => format!("{:.1}h", ms as f64 / 3_600_000.0),
    }
}
