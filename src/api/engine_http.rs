//! HTTP servers beside the engine: the synchronous predict endpoint that
//! shares the engine's concurrency budget (with the engine's `/metrics`),
//! and the demo model.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use super::ApiError;
use crate::engine::{Engine, ModelError, SyncError};

/// Default of the largest synchronous request body: the default payload
/// limit of a service, which the same request sent through the queue meets.
pub const DEFAULT_SYNC_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;

/// `POST /api/predict/{service}[/path]` answered by calling the model
/// directly. Before a byte of the body is read, the caller must hold the
/// service token (401), declare no more than `max_body_bytes` (413) and get
/// one of the engine's synchronous places (429); the body is then read up
/// to `max_body_bytes` (413 beyond).
pub fn sync_router(engine: Arc<Engine>, service: String, max_body_bytes: u64) -> Router {
    let svc = Arc::new(service);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(engine): State<Arc<Engine>>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    engine.render_metrics(),
                )
            }),
        )
        .route(
            "/api/predict/{*rest}",
            any(
                move |State(engine): State<Arc<Engine>>,
                      Path(rest): Path<String>,
                      headers: HeaderMap,
                      body: Body| {
                    let svc = svc.clone();
                    async move {
                        sync_predict(&engine, &svc, &rest, &headers, body, max_body_bytes)
                            .await
                            .unwrap_or_else(IntoResponse::into_response)
                    }
                },
            ),
        )
        .with_state(engine)
}

async fn sync_predict(
    engine: &Engine,
    service: &str,
    rest: &str,
    headers: &HeaderMap,
    body: Body,
    max_body_bytes: u64,
) -> Result<Response, ApiError> {
    let (name, path) = rest.split_once('/').unwrap_or((rest, ""));
    if name != service {
        return Err(ApiError::NotFound(format!("this engine serves {service}")));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !engine.token_matches(given) {
        return Err(ApiError::Unauthorized(
            "invalid or missing token in Authorization".into(),
        ));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body_bytes) {
        return Err(ApiError::TooLarge(format!(
            "payload exceeds the limit of {max_body_bytes} bytes"
        )));
    }
    let place = engine
        .sync_place()
        .map_err(|_| ApiError::Full("the engine is busy; retry later".into()))?;
    let body = super::eas::read_body(body, max_body_bytes).await?;
    // The model call is a child of the caller's trace, as on the queued path.
    let traceparent = headers
        .get(crate::protocol::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| crate::protocol::child_traceparent(t, crate::protocol::new_span_id()));
    match engine
        .predict_sync(place, path, body, traceparent.as_deref())
        .await
    {
        Ok(r) => Ok((
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY),
            r.body,
        )
            .into_response()),
        Err(SyncError::Busy) => Err(ApiError::Full("the engine is busy; retry later".into())),
        Err(SyncError::Model(ModelError::Timeout(_))) => {
            Ok((StatusCode::GATEWAY_TIMEOUT, "model timed out\n").into_response())
        }
        Err(SyncError::Model(e @ ModelError::BadPath(_))) => {
            Err(ApiError::BadRequest(e.to_string()))
        }
        Err(e) => Ok((StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response()),
    }
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
