//! Calling the model server over HTTP. The model's endpoint is not an
//! Eddy endpoint, so this calls it with reqwest directly rather than
//! through `client` (which owns reqwest for the EAS and admin protocols).

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
    /// The item's sub-path has an empty, `.` or `..` segment.
    #[error("bad model path {0:?}")]
    BadPath(String),
}

impl ModelError {
    /// The negative-commit code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            ModelError::Timeout(_) => "ModelTimeout",
            ModelError::Unreachable(_) => "ModelUnavailable",
            ModelError::BadPath(_) => "BadPath",
        }
    }
}

#[derive(Clone)]
pub struct ModelClient {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
}

/// The model URL for a sub-path: `base` plus each segment percent-encoded
/// on its own, so a sub-path can name a path below the base and nothing
/// else (no `?`, `#`, `..` or encoded `/` reaches the model server as such).
pub fn model_url(base: &str, path: &str) -> Result<String, ModelError> {
    let mut url = url::Url::parse(base)
        .map_err(|e| ModelError::Unreachable(format!("model URL {base}: {e}")))?;
    {
        let mut segments = url
            .path_segments_mut()
            .map_err(|_| ModelError::Unreachable(format!("model URL {base} cannot take a path")))?;
        segments.pop_if_empty();
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            if segment == "." || segment == ".." {
                return Err(ModelError::BadPath(path.to_string()));
            }
            segments.push(segment);
        }
    }
    Ok(url.into())
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

    /// POST `body` to the model at `path` (relative to the model's base
    /// URL), with `traceparent` when the request carries a trace context.
    pub async fn call(
        &self,
        path: &str,
        body: Bytes,
        traceparent: Option<&str>,
    ) -> Result<ModelResponse, ModelError> {
        let url = model_url(&self.base, path)?;
        let mut request = self.http.post(&url).body(body);
        if let Some(t) = traceparent {
            request = request.header(crate::protocol::TRACEPARENT_HEADER, t);
        }
        let send = request.send();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_paths_are_encoded_segment_by_segment() {
        let base = "http://m:8000/v1";
        assert_eq!(model_url(base, "").unwrap(), "http://m:8000/v1");
        assert_eq!(model_url(base, "a/b").unwrap(), "http://m:8000/v1/a/b");
        // Decoded `%3F` and `%23` stay inside their segment.
        assert_eq!(
            model_url(base, "a?admin=1").unwrap(),
            "http://m:8000/v1/a%3Fadmin=1"
        );
        assert_eq!(model_url(base, "x#y").unwrap(), "http://m:8000/v1/x%23y");
        for bad in ["..", "a/../../admin", "./x"] {
            assert!(
                matches!(model_url(base, bad), Err(ModelError::BadPath(_))),
                "{bad}"
            );
        }
    }
}
