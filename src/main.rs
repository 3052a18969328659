//! The `eddy` binary: a node (`serve`), and a command-line client for the
//! queue protocol, services and the cluster (see `cli`).

mod cli;

use clap::Parser;

/// jemalloc returns freed memory to the system within seconds (background
/// purging of dirty pages); glibc's malloc kept a node's RSS at its peak long
/// after the items were gone (see the memory soak test).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDDY_LOG")
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    cli::run(cli::Cli::parse()).await
}
