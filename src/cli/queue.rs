//! The queue commands: put, get, commit, attrs and watch, through
//! [`QueueClient`].

use std::collections::BTreeMap;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use eddy::client::QueueClient;

use super::Endpoint;

#[derive(Args)]
pub(crate) struct QueueArgs {
    #[command(flatten)]
    pub(crate) ep: Endpoint,
    /// Queue: `SERVICE` (input) or `SERVICE/sink`.
    pub(crate) queue: String,
}

#[derive(Args)]
pub(crate) struct PutArgs {
    #[command(flatten)]
    pub(crate) q: QueueArgs,
    /// Payload (`-` reads standard input).
    pub(crate) data: String,
    /// Tags as `key=value`.
    #[arg(long = "tag")]
    pub(crate) tags: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub(crate) priority: u32,
}

#[derive(Args)]
pub(crate) struct GetArgs {
    #[command(flatten)]
    pub(crate) q: QueueArgs,
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub(crate) index: i64,
    #[arg(long, default_value_t = 1)]
    pub(crate) length: u32,
    #[arg(long, default_value = "0s")]
    pub(crate) timeout: String,
    /// Delete what is read.
    #[arg(long)]
    pub(crate) delete: bool,
    #[arg(long)]
    pub(crate) request_id: Option<String>,
}

#[derive(Args)]
pub(crate) struct CommitArgs {
    #[command(flatten)]
    pub(crate) q: QueueArgs,
    pub(crate) indexes: Vec<u64>,
    /// Consumer group.
    #[arg(long, default_value = eddy::protocol::DEFAULT_GROUP)]
    pub(crate) group: String,
}

#[derive(Args)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    pub(crate) q: QueueArgs,
    #[arg(long, default_value_t = 1)]
    pub(crate) window: u32,
    /// Commit each frame after printing it.
    #[arg(long)]
    pub(crate) commit: bool,
    #[arg(long)]
    pub(crate) auto_commit: bool,
    /// Stop after this many frames.
    #[arg(long)]
    pub(crate) count: Option<u64>,
    #[arg(long, default_value = eddy::protocol::DEFAULT_GROUP)]
    pub(crate) group: String,
}

pub(crate) fn client(q: &QueueArgs) -> QueueClient {
    QueueClient::new(&q.ep.node.endpoint, &q.queue, &q.ep.token)
}

pub(crate) fn parse_tags(tags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    tags.iter()
        .map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("tag {t:?}: expected key=value"))
        })
        .collect()
}

pub(crate) fn print_frame(f: &eddy::proto::DataFrameProto, json: bool) {
    let tags: BTreeMap<_, _> = f.tags.iter().collect();
    if json {
        use base64::Engine as _;
        println!(
            "{}",
            serde_json::json!({"index": f.index, "tags": tags, "data": base64::engine::general_purpose::STANDARD.encode(&f.data)})
        );
    } else {
        println!(
            "{}\t{:?}\t{}",
            f.index,
            tags,
            String::from_utf8_lossy(&f.data)
        );
    }
}

pub(crate) async fn put(a: PutArgs) -> anyhow::Result<()> {
    let data = if a.data == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        Bytes::from(buf)
    } else {
        Bytes::from(a.data.clone())
    };
    let (index, rid) = client(&a.q)
        .put(data, &parse_tags(&a.tags)?, a.priority)
        .await?;
    if a.q.ep.json {
        println!("{}", serde_json::json!({"index": index, "request_id": rid}));
    } else {
        println!("index {index}\nrequest id {rid}");
    }
    Ok(())
}

pub(crate) async fn get(a: GetArgs) -> anyhow::Result<()> {
    let mut tags = BTreeMap::new();
    if let Some(r) = &a.request_id {
        tags.insert(eddy::protocol::REQUEST_ID_TAG.to_string(), r.clone());
    }
    let op = eddy::protocol::GetOp {
        from_index: match a.index {
            -1 => None,
            i => Some(u64::try_from(i).context("--index: an index, or -1 for the newest")?),
        },
        length: u64::from(a.length),
        timeout: eddy::protocol::parse_duration(&a.timeout).with_context(|| {
            format!(
                "--timeout {:?}: expected a duration like 5s or 500ms",
                a.timeout
            )
        })?,
        raw: Some(false),
        auto_delete: a.delete,
    };
    let frames = client(&a.q).get(&op, &tags).await?;
    if frames.is_empty() && !a.q.ep.json {
        eprintln!("(nothing)");
    }
    for f in &frames {
        print_frame(f, a.q.ep.json);
    }
    Ok(())
}

pub(crate) async fn commit(a: CommitArgs) -> anyhow::Result<()> {
    let mut c = client(&a.q);
    c.group = a.group;
    c.commit(&a.indexes).await?;
    println!("OK");
    Ok(())
}

pub(crate) async fn attrs(a: QueueArgs) -> anyhow::Result<()> {
    let attrs = client(&a).attributes().await?;
    if a.ep.json {
        println!("{}", serde_json::to_string_pretty(&attrs)?);
    } else {
        for (k, v) in attrs {
            println!("{k:32} {v}");
        }
    }
    Ok(())
}

pub(crate) async fn watch(a: WatchArgs) -> anyhow::Result<()> {
    let mut c = client(&a.q);
    c.group = a.group.clone();
    let committer = c.clone();
    let json = a.q.ep.json;
    let mut seen = 0u64;
    let limit = a.count;
    let commit = a.commit;
    c.watch(a.window, a.auto_commit, |f| {
        let committer = committer.clone();
        seen += 1;
        let more = limit.is_none_or(|l| seen < l);
        async move {
            print_frame(&f, json);
            if commit && let Err(e) = committer.commit(&[f.index]).await {
                eprintln!("commit {}: {e}", f.index);
            }
            more
        }
    })
    .await?;
    Ok(())
}
