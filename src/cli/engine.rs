//! The asynchronous inference engine beside a model server, and the demo
//! model server.

use std::net::SocketAddr;

use clap::Args;

use super::terminated;

#[derive(Args)]
pub(crate) struct EngineArgs {
    /// Eddy nodes, comma separated; the engine moves on when one fails.
    #[arg(
        long,
        short = 'e',
        env = "EDDY_ENDPOINT",
        value_delimiter = ',',
        default_value = "127.0.0.1:8080"
    )]
    pub(crate) endpoint: Vec<String>,
    /// Service whose input queue the engine serves.
    #[arg(long, env = "EDDY_ENGINE_SERVICE", default_value = "demo")]
    pub(crate) service: String,
    #[arg(
        long,
        short = 't',
        env = "EDDY_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub(crate) token: String,
    /// The model server's base URL: http(s)://host:port[/path], or
    /// host:port for plain HTTP. Any other value stops the engine at start.
    #[arg(
        long,
        env = "EDDY_ENGINE_MODEL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub(crate) model: String,
    /// Calls at the model at once (the watch window, without prefetch).
    #[arg(long, env = "EDDY_ENGINE_CONCURRENCY", default_value_t = 4)]
    pub(crate) concurrency: u32,
    /// Items taken beyond the concurrency, so that the model gets its next
    /// item while results are being written: for fast models (a call of a
    /// millisecond or less). Items taken early wait at this engine.
    #[arg(long, env = "EDDY_ENGINE_PREFETCH", default_value_t = 0)]
    pub(crate) prefetch: u32,
    /// Consumer group of the engines of this service (default: `engine`).
    #[arg(long, env = "EDDY_ENGINE_GROUP", default_value = "engine")]
    pub(crate) group: String,
    /// This engine's consumer id (default: a random id).
    #[arg(long, env = "EDDY_ENGINE_INSTANCE")]
    pub(crate) instance: Option<String>,
    /// Per-request model timeout in milliseconds.
    #[arg(long, env = "EDDY_ENGINE_TIMEOUT_MS", default_value_t = 60_000)]
    pub(crate) timeout_ms: u64,
    /// Serve synchronous `POST /api/predict/{service}` here (optional).
    #[arg(long, env = "EDDY_ENGINE_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,
    /// Largest body of a synchronous request (HTTP 413 beyond).
    #[arg(long, env = "EDDY_ENGINE_SYNC_MAX_BODY_BYTES", default_value_t = eddy::api::DEFAULT_SYNC_MAX_BODY_BYTES)]
    pub(crate) sync_max_body_bytes: u64,
    /// How long shutdown waits for items in progress, in milliseconds.
    #[arg(long, env = "EDDY_ENGINE_DRAIN_MS", default_value_t = 30_000)]
    pub(crate) drain_ms: u64,
    /// Limit on each request to Eddy and on silence of the watch, in
    /// milliseconds (connecting gets at most 5 s of it); a node that takes
    /// longer counts as failed and the engine moves to the next endpoint.
    #[arg(long, env = "EDDY_ENGINE_EDDY_TIMEOUT_MS", default_value_t = 10_000)]
    pub(crate) eddy_timeout_ms: u64,
}

#[derive(Args)]
pub(crate) struct DemoModelArgs {
    #[arg(long, env = "EDDY_DEMO_LISTEN", default_value = "127.0.0.1:8000")]
    pub(crate) listen: SocketAddr,
    /// Delay per request, emulating long inference.
    #[arg(long, env = "EDDY_DEMO_DELAY_MS", default_value_t = 0)]
    pub(crate) delay_ms: u64,
    /// Every Nth request fails (0: never).
    #[arg(long, env = "EDDY_DEMO_FAIL_EVERY", default_value_t = 0)]
    pub(crate) fail_every: u64,
    #[arg(long, env = "EDDY_DEMO_FAIL_STATUS", default_value_t = 500)]
    pub(crate) fail_status: u16,
    /// Answer with empty bodies (results delivered elsewhere).
    #[arg(long, env = "EDDY_DEMO_EMPTY", default_value_t = false)]
    pub(crate) empty: bool,
}

pub(crate) async fn engine(a: EngineArgs) -> anyhow::Result<()> {
    let settings = eddy::engine::EngineSettings {
        endpoints: a.endpoint,
        service: a.service.clone(),
        token: a.token,
        model: a.model,
        concurrency: a.concurrency.max(1),
        prefetch: a.prefetch,
        group: a.group,
        instance: a
            .instance
            .unwrap_or_else(|| format!("engine-{}", uuid::Uuid::new_v4())),
        request_timeout: std::time::Duration::from_millis(a.timeout_ms),
        drain_timeout: std::time::Duration::from_millis(a.drain_ms),
        eddy_timeouts: {
            let limit = std::time::Duration::from_millis(a.eddy_timeout_ms.max(300));
            eddy::client::Timeouts {
                connect: limit.min(std::time::Duration::from_secs(5)),
                request: limit,
                idle: limit,
            }
        },
    };
    tracing::info!(service = %settings.service, instance = %settings.instance, concurrency = settings.concurrency, "engine starting");
    let engine = eddy::engine::Engine::new(settings)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(listen) = a.listen {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let app = eddy::api::sync_router(engine.clone(), a.service, a.sync_max_body_bytes);
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = eddy::api::serve(listener, app, stop).await {
                tracing::error!(error = %e, "engine HTTP server stopped");
            }
        });
    }
    engine.clone().run(terminated()).await;
    let _ = stop_tx.send(true);
    let s = &engine.stats;
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        completed = s.completed.load(Relaxed),
        duplicates = s.duplicates.load(Relaxed),
        failed_calls = s.failed_calls.load(Relaxed),
        handed_back = s.handed_back.load(Relaxed),
        not_written = s.not_written.load(Relaxed),
        "engine stopped"
    );
    Ok(())
}

pub(crate) async fn demo_model(a: DemoModelArgs) -> anyhow::Result<()> {
    let model = eddy::api::DemoModel {
        delay: std::time::Duration::from_millis(a.delay_ms),
        fail_every: a.fail_every,
        fail_status: a.fail_status,
        empty: a.empty,
    };
    let listener = tokio::net::TcpListener::bind(a.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "demo model serving");
    eddy::api::serve(listener, eddy::api::demo_model_router(model), terminated()).await?;
    Ok(())
}
