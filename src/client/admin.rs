//! A client of a node's admin API (`/admin/...`): services, cluster
//! membership and status, as JSON. Every call carries the admin token.
//! Connecting is bounded; an answer is waited for as long as it takes,
//! since adding a member answers only once it has caught up with the log.

use super::{ClientError, Timeouts, base_url};

/// The admin API of one node (any node: calls it cannot serve itself, such
/// as membership changes, it passes to the leader).
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    pub fn new(endpoint: &str, token: &str) -> Self {
        let timeouts = Timeouts::default();
        Self {
            http: reqwest::Client::builder()
                .connect_timeout(timeouts.connect)
                .build()
                .unwrap_or_default(),
            base: base_url(endpoint),
            token: token.to_string(),
        }
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// Call `method path` with an optional JSON body; the JSON answer (a
    /// plain-text answer as a JSON string). A status other than 2xx is
    /// [`ClientError::Status`] with the node's message.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", &self.token);
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = rb.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            return Err(ClientError::Status {
                status: status.as_u16(),
                body: text.trim().to_string(),
            });
        }
        Ok(serde_json::from_str(&text)
            .unwrap_or_else(|_| serde_json::Value::String(text.trim().to_string())))
    }
}
