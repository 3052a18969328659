//! Services and cluster membership, through a node's admin API.

use clap::{Args, Subcommand};
use eddy::client::AdminClient;

use super::{AdminToken, NodeEndpoint};

#[derive(Args)]
pub(crate) struct AdminArgs {
    #[command(flatten)]
    pub(crate) node: NodeEndpoint,
    #[command(flatten)]
    pub(crate) admin_token: AdminToken,
}

#[derive(Subcommand)]
pub(crate) enum ServiceCmd {
    Create(ServiceCreate),
    List(AdminArgs),
    Show(ServiceName),
    Delete(ServiceName),
}

#[derive(Args)]
pub(crate) struct ServiceName {
    #[command(flatten)]
    pub(crate) admin: AdminArgs,
    pub(crate) name: String,
}

#[derive(Args)]
pub(crate) struct ServiceCreate {
    #[command(flatten)]
    pub(crate) admin: AdminArgs,
    pub(crate) name: String,
    #[arg(long, default_value = "")]
    pub(crate) token: String,
    #[arg(long)]
    pub(crate) max_length: Option<u64>,
    #[arg(long)]
    pub(crate) max_payload_bytes: Option<u64>,
    #[arg(long)]
    pub(crate) evict_oldest: bool,
    #[arg(long)]
    pub(crate) sink_max_length: Option<u64>,
    #[arg(long)]
    pub(crate) max_bytes: Option<u64>,
    #[arg(long)]
    pub(crate) max_dead_letters: Option<u64>,
    #[arg(long)]
    pub(crate) max_delivery: Option<u32>,
    #[arg(long)]
    pub(crate) consumer_grace_ms: Option<u64>,
}

#[derive(Subcommand)]
pub(crate) enum ClusterCmd {
    /// Members, leader, term, commit and apply indexes.
    Status(AdminArgs),
    /// Add a node (started with --join): learner catch-up, then voter.
    Add(MemberAdd),
    /// Remove a node from the voters.
    Remove(MemberRemove),
}

#[derive(Args)]
pub(crate) struct MemberAdd {
    #[command(flatten)]
    pub(crate) admin: AdminArgs,
    pub(crate) id: u64,
    /// The new node's gRPC address (host:port).
    pub(crate) raft_addr: String,
    /// The new node's HTTP address (host:port).
    #[arg(default_value = "")]
    pub(crate) api_addr: String,
}

#[derive(Args)]
pub(crate) struct MemberRemove {
    #[command(flatten)]
    pub(crate) admin: AdminArgs,
    pub(crate) id: u64,
}

fn admin_client(admin: &AdminArgs) -> anyhow::Result<AdminClient> {
    Ok(AdminClient::new(
        &admin.node.endpoint,
        &admin.admin_token.value()?,
    ))
}

pub(crate) async fn service(cmd: ServiceCmd) -> anyhow::Result<()> {
    let out = match cmd {
        ServiceCmd::Create(s) => {
            let body = serde_json::json!({
                "name": s.name, "token": s.token, "max_length": s.max_length,
                "max_payload_bytes": s.max_payload_bytes, "evict_oldest": s.evict_oldest,
                "sink_max_length": s.sink_max_length, "max_delivery": s.max_delivery,
                "consumer_grace_ms": s.consumer_grace_ms, "max_bytes": s.max_bytes,
                "max_dead_letters": s.max_dead_letters,
            });
            admin_client(&s.admin)?
                .post("/admin/services", body)
                .await?
        }
        ServiceCmd::List(a) => admin_client(&a)?.get("/admin/services").await?,
        ServiceCmd::Show(s) => {
            let path = format!("/admin/services/{}", s.name);
            admin_client(&s.admin)?.get(&path).await?
        }
        ServiceCmd::Delete(s) => {
            let path = format!("/admin/services/{}", s.name);
            admin_client(&s.admin)?.delete(&path).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub(crate) async fn cluster(cmd: ClusterCmd) -> anyhow::Result<()> {
    let out = match cmd {
        ClusterCmd::Status(a) => admin_client(&a)?.get("/admin/cluster").await?,
        ClusterCmd::Add(m) => {
            let body =
                serde_json::json!({"id": m.id, "raft_addr": m.raft_addr, "api_addr": m.api_addr});
            admin_client(&m.admin)?
                .post("/admin/cluster/members", body)
                .await?
        }
        ClusterCmd::Remove(m) => {
            let path = format!("/admin/cluster/members/{}", m.id);
            admin_client(&m.admin)?.delete(&path).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
