//! Calling the model server over HTTP.

use std::time::Duration;

use bytes::Bytes;

/// What the model answered.
#[derive(Debug, Clone)]
pub struct ModelResponse {
    pub status: u16,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model did not answer within {0:?}")]
    Timeout(Duration),
    #[error("model unreachable: {0}")]
    Unreachable(String),
}

impl ModelError {
    /// The negative-commit code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            ModelError::Timeout(_) => "ModelTimeout",
            ModelError::Unreachable(_) => "ModelUnavailable",
        }
    }
}

#[derive(Clone)]
pub struct ModelClient {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl ModelClient {
    pub fn new(base: &str, timeout: Duration) -> Self {
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
            timeout,
        }
    }

    /// POST `body` to the model at `path` (relative to the model's base URL).
    pub async fn call(&self, path: &str, body: Bytes) -> Result<ModelResponse, ModelError> {
        let url = format!("{}/{}", self.base, path.trim_start_matches('/'));
        let send = self.http.post(&url).body(body).send();
        let resp = match tokio::time::timeout(self.timeout, send).await {
            Err(_) => return Err(ModelError::Timeout(self.timeout)),
            Ok(Err(e)) if e.is_timeout() => return Err(ModelError::Timeout(self.timeout)),
            Ok(Err(e)) => return Err(ModelError::Unreachable(e.to_string())),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        match tokio::time::timeout(self.timeout, resp.bytes()).await {
            Err(_) => Err(ModelError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(ModelError::Unreachable(e.to_string())),
            Ok(Ok(body)) => Ok(ModelResponse { status, body }),
        }
    }
}
