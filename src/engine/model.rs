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
    /// The model's base URL does not parse or cannot take a sub-path.
    #[error("bad model URL {0}")]
    BadBase(String),
}

impl ModelError {
    /// The negative-commit code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            ModelError::Timeout(_) => "ModelTimeout",
            ModelError::Unreachable(_) => "ModelUnavailable",
            ModelError::BadPath(_) => "BadPath",
            ModelError::BadBase(_) => "ModelUnavailable",
        }
    }
}

#[derive(Clone)]
pub struct ModelClient {
    http: reqwest::Client,
    base: url::Url,
    timeout: Duration,
}

/// The model URL for a sub-path: `base` plus each segment percent-encoded
/// on its own, so a sub-path can name a path below the base and nothing
/// else (no `?`, `#`, `..` or encoded `/` reaches the model server as such).
pub fn model_url(base: &url::Url, path: &str) -> Result<url::Url, ModelError> {
    let mut url = base.clone();
    if path.split('/').all(str::is_empty) {
        return Ok(url);
    }
    {
        let mut segments = url
            .path_segments_mut()
            .map_err(|_| ModelError::BadBase(format!("{base}: cannot take a path")))?;
        segments.pop_if_empty();
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            if segment == "." || segment == ".." {
                return Err(ModelError::BadPath(path.to_string()));
            }
            segments.push(segment);
        }
    }
    Ok(url)
}

impl ModelClient {
    /// A client for the model at `base` (`host:port` or an http(s) URL).
    /// The URL is parsed here, once, without trailing slashes: a call
    /// only appends its sub-path to it.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, ModelError> {
        let given = base;
        let mut base = url::Url::parse(crate::client::base_url(given).trim_end_matches('/'))
            .map_err(|e| ModelError::BadBase(format!("{given:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ModelError::BadBase(format!(
                "{given:?}: an http or https URL is needed"
            )));
        }
        base.path_segments_mut()
            .map_err(|_| ModelError::BadBase(format!("{given:?}: cannot take a path")))?
            .pop_if_empty();
        Ok(Self {
            http: reqwest::Client::new(),
            base,
            timeout,
        })
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
        let mut request = self.http.post(url).body(body);
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
        let base = &ModelClient::new("http://m:8000/v1/", Duration::from_secs(1))
            .unwrap()
            .base;
        let url = |path| model_url(base, path).map(String::from);
        assert_eq!(url("").unwrap(), "http://m:8000/v1");
        assert_eq!(url("/").unwrap(), "http://m:8000/v1");
        let slashes = &ModelClient::new("http://m:8000/v1//", Duration::from_secs(1))
            .unwrap()
            .base;
        assert_eq!(model_url(slashes, "").unwrap().as_str(), "http://m:8000/v1");
        let bare_slashes = &ModelClient::new("m:8000/v1//", Duration::from_secs(1))
            .unwrap()
            .base;
        assert_eq!(
            model_url(bare_slashes, "").unwrap().as_str(),
            "http://m:8000/v1"
        );
        // The base's own trailing slash goes, also before a query.
        let with_query = &ModelClient::new("http://m/v1/?k=v", Duration::from_secs(1))
            .unwrap()
            .base;
        assert_eq!(
            model_url(with_query, "").unwrap().as_str(),
            "http://m/v1?k=v"
        );
        assert_eq!(
            model_url(with_query, "a").unwrap().as_str(),
            "http://m/v1/a?k=v"
        );
        let bare = &ModelClient::new("m:8000", Duration::from_secs(1))
            .unwrap()
            .base;
        assert_eq!(model_url(bare, "").unwrap().as_str(), "http://m:8000/");
        assert_eq!(model_url(bare, "a").unwrap().as_str(), "http://m:8000/a");
        assert_eq!(url("a/b").unwrap(), "http://m:8000/v1/a/b");
        // Decoded `%3F` and `%23` stay inside their segment.
        assert_eq!(url("a?admin=1").unwrap(), "http://m:8000/v1/a%3Fadmin=1");
        assert_eq!(url("x#y").unwrap(), "http://m:8000/v1/x%23y");
        for bad in ["..", "a/../../admin", "./x"] {
            assert!(
                matches!(model_url(base, bad), Err(ModelError::BadPath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_model_url_that_cannot_be_called_is_refused_at_start() {
        for base in ["http://[::1", "ftp://m/v1", "file:///srv/model", "http://"] {
            assert!(
                matches!(
                    ModelClient::new(base, Duration::from_secs(1)),
                    Err(ModelError::BadBase(_))
                ),
                "{base}"
            );
        }
        let err = ModelClient::new("ftp://m/v1", Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("\"ftp://m/v1\"") && err.contains("http or https"),
            "{err}"
        );
        assert!(ModelClient::new("m:8000", Duration::from_secs(1)).is_ok());
    }
}
