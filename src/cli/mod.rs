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

#[derive(Args, Clone)]
pub(crate) struct Endpoint {
    /// Node address (any node of the cluster).
    #[arg(
        long,
        short = 'e',
        env = "EDDY_ENDPOINT",
        default_value = "127.0.0.1:8080"
    )]
    pub(crate) endpoint: String,
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

pub(crate) fn http_base(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.trim_end_matches('/').to_string()
    } else {
        format!("http://{endpoint}")
    }
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
        Cmd::Engine(a) => engine::engine(a).await,
        Cmd::DemoModel(a) => engine::demo_model(a).await,
        Cmd::Wal(cmd) => tools::wal(cmd),
        Cmd::Certs(cmd) => tools::certs(cmd),
    }
}
