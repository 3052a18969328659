//! HTTP servers beside the engine: the synchronous predict endpoint that
//! shares the engine's concurrency budget, and the demo model.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use crate::engine::{Engine, ModelError, SyncError};

/// `POST /api/predict/{service}[/path]` answered by calling the model directly.
pub fn sync_router(engine: Arc<Engine>, service: String) -> Router {
    let svc = Arc::new(service);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/api/predict/{*rest}",
            any(
                move |State(engine): State<Arc<Engine>>,
                      Path(rest): Path<String>,
                      headers: HeaderMap,
                      body: Bytes| {
                    let svc = svc.clone();
                    async move {
                        let (name, path) = rest.split_once('/').unwrap_or((rest.as_str(), ""));
                        if name != svc.as_str() {
                            return (StatusCode::NOT_FOUND, format!("this engine serves {svc}\n"))
                                .into_response();
                        }
                        let given = headers
                            .get(header::AUTHORIZATION)
                            .map(|v| v.as_bytes())
                            .unwrap_or_default();
                        if !engine.token_matches(given) {
                            return (
                                StatusCode::UNAUTHORIZED,
                                "invalid or missing token in Authorization\n",
                            )
                                .into_response();
                        }
                        match engine.predict_sync(path, body).await {
                            Ok(r) => (
                                StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY),
                                r.body,
                            )
                                .into_response(),
                            Err(SyncError::Busy) => (
                                StatusCode::TOO_MANY_REQUESTS,
                                "the engine is busy; retry later\n",
                            )
                                .into_response(),
                            Err(SyncError::Model(ModelError::Timeout(_))) => {
                                (StatusCode::GATEWAY_TIMEOUT, "model timed out\n").into_response()
                            }
                            Err(SyncError::Model(e @ ModelError::BadPath(_))) => {
                                (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
                            }
                            Err(e) => (StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response(),
                        }
                    }
                },
            ),
        )
        .with_state(engine)
}

/// Behaviour of the demo model.
#[derive(Debug, Clone, Default)]
pub struct DemoModel {
    pub delay: Duration,
    /// Every Nth request fails with `fail_status` (0: never).
    pub fail_every: u64,
    pub fail_status: u16,
    /// Answer every request with an empty body.
    pub empty: bool,
}

struct DemoState {
    model: DemoModel,
    served: AtomicU64,
}

/// The demo model: for a JSON list of objects it answers one
/// `{"p_0": x, "p_1": 1 - x}` per object, x derived from the object.
pub fn demo_model_router(model: DemoModel) -> Router {
    let state = Arc::new(DemoState {
        model,
        served: AtomicU64::new(0),
    });
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        // How many predictions were asked for so far (they may still run).
        .route(
            "/stats",
            get(|State(state): State<Arc<DemoState>>| async move {
                axum::Json(serde_json::json!({"served": state.served.load(Ordering::Relaxed)}))
            }),
        )
        .fallback(demo_predict)
        .with_state(state)
}

fn score(object: &serde_json::Value) -> f64 {
    let text = object.to_string();
    let h = text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    (h % 1000) as f64 / 1000.0
}

async fn demo_predict(State(state): State<Arc<DemoState>>, body: Bytes) -> Response {
    let n = state.served.fetch_add(1, Ordering::Relaxed) + 1;
    if !state.model.delay.is_zero() {
        tokio::time::sleep(state.model.delay).await;
    }
    if state.model.fail_every > 0 && n % state.model.fail_every == 0 {
        let status = StatusCode::from_u16(state.model.fail_status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, "demo model failure\n").into_response();
    }
    if state.model.empty {
        return StatusCode::OK.into_response();
    }
    let objects: Vec<serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(serde_json::Value::Array(list)) => list,
        _ => return (StatusCode::BAD_REQUEST, "expected a JSON list of objects\n").into_response(),
    };
    let out: Vec<serde_json::Value> = objects
        .iter()
        .map(|o| {
            let x = score(o);
            serde_json::json!({"p_0": x, "p_1": ((1.0 - x) * 1000.0).round() / 1000.0})
        })
        .collect();
    axum::Json(out).into_response()
}
