//! Offline tools: checking a stopped node's log, making certificates.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum WalCmd {
    /// Scan the raft log of a data dir (or its raft dir): exit 0 if clean or
    /// torn at the end (cut on start), 1 if corrupt.
    Check { dir: PathBuf },
}

#[derive(Subcommand)]
pub(crate) enum CertsCmd {
    /// Write a new CA, a certificate and key per node (valid for the node
    /// name, localhost and 127.0.0.1), a random `cluster-secret` and a
    /// random `admin-token`. The CA key goes to a separate directory: no
    /// node needs it.
    Generate {
        /// Directory to write into: what nodes mount (each node only its
        /// own certificate and key).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Where the CA key goes (default: `private/` inside --out, which
        /// `kubectl create secret --from-file=DIR/` skips). Keep it off the
        /// nodes.
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        /// Node names (host names peers use), comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// More names every node certificate is valid for (DNS names,
        /// wildcards such as `*.eddy.default.svc.cluster.local`, or IPs).
        #[arg(long = "name", value_delimiter = ',')]
        names: Vec<String>,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
}

pub(crate) fn wal(cmd: WalCmd) -> anyhow::Result<()> {
    let WalCmd::Check { dir } = cmd;
    let report = eddy::raft::check_wal(&dir)?;
    println!("{report}");
    if report.is_corrupt() {
        std::process::exit(1);
    }
    Ok(())
}

pub(crate) fn certs(cmd: CertsCmd) -> anyhow::Result<()> {
    let CertsCmd::Generate {
        out,
        ca_key_dir,
        nodes,
        names,
        force,
    } = cmd;
    let generated = eddy::tls::generate(&out, ca_key_dir.as_deref(), &nodes, &names, true, force)?;
    for f in generated.files {
        println!("{}", f.display());
    }
    Ok(())
}
