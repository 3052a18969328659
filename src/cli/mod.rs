//! The command line: what `eddy` parses, and which module runs each
//! subcommand. Each subcommand's arguments live beside its handler:
//! `serve` (a node), `queue` (put, get, commit, attrs, watch), `admin`
//! (services and the cluster, over the admin API), `bench`, `engine` (the
//! inference engine and the demo model), `tools` (storage checks and
//! certificates). Nothing here is used by the library.

mod admin;
mod bench;
mod engine;
mod queue;
mod serve;
mod tools;
mod top;

use clap::{Args, Parser, Subcommand};

use self::admin::{ClusterCmd, ServiceCmd};
use self::bench::BenchArgs;
use self::engine::{DemoModelArgs, EngineArgs};
use self::queue::{CommitArgs, GetArgs, PutArgs, QueueArgs, WatchArgs};
use self::serve::ServeArgs;
use self::tools::{CertsCmd, WalCmd};

#[derive(Parser)]
#[command(
    name = "eddy",
    version,
    about = "A replicated queue service for asynchronous ML inference"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Run a node.
    Serve(Box<ServeArgs>),
    /// Put one item on a queue; prints the index and request id.
    Put(PutArgs),
    /// Read items from a queue.
    Get(GetArgs),
    /// Commit items by index.
    Commit(CommitArgs),
    /// Show a queue's attributes.
    Attrs(QueueArgs),
    /// Watch a queue and print the frames.
    Watch(WatchArgs),
    /// Create, list, show or delete services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Cluster status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Measure put throughput and latency against a running node.
    Bench(BenchArgs),
    /// Services and consumers, live in the terminal.
    Top(top::TopArgs),
    /// Run the asynchronous inference engine beside a model server.
    Engine(EngineArgs),
    /// Run a small demo model server (for trying Eddy out and for tests).
    DemoModel(DemoModelArgs),
    /// Inspect a stopped node's storage.
    #[command(subcommand)]
    Wal(WalCmd),
    /// Make TLS certificates and a cluster secret.
    #[command(subcommand)]
    Certs(CertsCmd),
}

/// The status token a command reads a cluster's status with.
#[derive(Args, Clone)]
pub(crate) struct StatusToken {
    /// Token for the nodes' `/metrics`, `/admin/cluster` and
    /// `/admin/overview` (the admin token works too); none is needed while
    /// the nodes have no status token.
    // Its own id: a command's service token is `token` too.
    #[arg(
        id = "status_token",
        long = "status-token",
        env = "EDDY_STATUS_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub(crate) token: String,
}

/// The node a command talks to (`-e`, any node of the cluster).
#[derive(Args, Clone)]
pub(crate) struct NodeEndpoint {
    /// Node address, `host:port` or a URL (any node of the cluster).
    #[arg(
        long,
        short = 'e',
        env = "EDDY_ENDPOINT",
        default_value = "127.0.0.1:8080"
    )]
    pub(crate) endpoint: String,
}

/// A queue command's node, service token and output format.
#[derive(Args, Clone)]
pub(crate) struct Endpoint {
    #[command(flatten)]
    pub(crate) node: NodeEndpoint,
    /// Service token.
    #[arg(
        long,
        short = 't',
        env = "EDDY_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub(crate) token: String,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The admin token, given directly or in a file; `eddy serve` and the admin
/// commands take the same two flags.
#[derive(Args, Clone)]
pub(crate) struct AdminToken {
    /// Token for the admin routes: the same on every node of a cluster
    /// (required there); a single node without one answers admin calls
    /// from this machine only (loopback).
    #[arg(
        long,
        env = "EDDY_ADMIN_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub(crate) admin_token: String,
    /// Read the admin token from this file (a mounted Kubernetes or Compose
    /// secret); surrounding whitespace is ignored.
    #[arg(long, env = "EDDY_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub(crate) admin_token_file: Option<std::path::PathBuf>,
}

impl AdminToken {
    /// The token: read from the file if one is named (empty: none given).
    pub(crate) fn value(&self) -> anyhow::Result<String> {
        match &self.admin_token_file {
            Some(path) => read_secret_file(path, "the admin token"),
            None => Ok(self.admin_token.clone()),
        }
    }
}

/// A secret from a mounted file, without surrounding whitespace; an empty
/// file is an error rather than a silently missing secret.
pub(crate) fn read_secret_file(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let value = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} from {}", path.display()))?
        .trim()
        .to_string();
    if value.is_empty() {
        anyhow::bail!("{} is empty: expected {what}", path.display());
    }
    Ok(value)
}

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Run the subcommand `cli` names.
pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Serve(a) => serve::serve(*a).await,
        Cmd::Put(a) => queue::put(a).await,
        Cmd::Get(a) => queue::get(a).await,
        Cmd::Commit(a) => queue::commit(a).await,
        Cmd::Attrs(a) => queue::attrs(a).await,
        Cmd::Watch(a) => queue::watch(a).await,
        Cmd::Service(cmd) => admin::service(cmd).await,
        Cmd::Cluster(cmd) => admin::cluster(cmd).await,
        Cmd::Bench(a) => bench::bench(a).await,
        Cmd::Top(a) => top::top(a).await,
        Cmd::Engine(a) => engine::engine(a).await,
        Cmd::DemoModel(a) => engine::demo_model(a).await,
        Cmd::Wal(cmd) => tools::wal(cmd),
        Cmd::Certs(cmd) => tools::certs(cmd),
    }
}
