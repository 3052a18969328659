//! A small Rust client of the EAS queue protocol, used by the CLI, the
//! engine and the benchmark (and usable by programs): put, get, commit,
//! attributes, watch; and of the admin API ([`AdminClient`]).
//!
//! Nothing it does waits without bound on a node that stopped answering:
//! connecting is bounded by [`Timeouts::connect`], every request (and a
//! watch's handshake) by [`Timeouts::request`] on top of any long-poll time
//! it asked for, and an open watch pings the node and ends with
//! [`ClientError::Timeout`] when nothing (frame, pong) arrived for
//! [`Timeouts::idle`].

mod admin;

pub use admin::AdminClient;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::proto::{
    CompleteBatchProto, CompleteBatchReplyProto, CompleteProto, DataFrameListProto, DataFrameProto,
    PROTOBUF_MEDIA_TYPE,
};

pub use crate::protocol::REQUEST_ID_HEADER;
use crate::protocol::{
    DEFAULT_GROUP, DUPLICATE_HEADER, GetOp, HEADER_GROUP, HEADER_USER, MAX_CODE_BYTES,
    MAX_REASON_BYTES, QueueOp, REQUEST_ID_TAG, ReadOp, WatchOp, param, truncate,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("server said {status}: {body}")]
    Status { status: u16, body: String },
    #[error("bad response: {0}")]
    Protocol(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The base URL of a node given as `host:port` (HTTP) or as a URL
/// (`https://host:port`), without a trailing slash.
pub fn base_url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.trim_end_matches('/').to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// How long the client waits on a node.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Establishing a TCP connection.
    pub connect: Duration,
    /// A whole request and its response (long polls add their own time).
    pub request: Duration,
    /// An open watch with nothing heard from the node (it is pinged every
    /// third of this).
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
            idle: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
pub struct QueueClient {
    http: reqwest::Client,
    /// `http://host:port/api/predict/{service}` or `.../sink`.
    url: String,
    /// `url` parsed once (None when it does not parse: each request then
    /// fails with reqwest's error, as it did before this field existed).
    parsed_url: Option<url::Url>,
    pub token: String,
    pub group: String,
    pub user: String,
    pub timeouts: Timeouts,
}

impl QueueClient {
    pub fn new(endpoint: &str, queue: &str, token: &str) -> Self {
        Self::with_timeouts(endpoint, queue, token, Timeouts::default())
    }

    pub fn with_timeouts(endpoint: &str, queue: &str, token: &str, timeouts: Timeouts) -> Self {
        let base = base_url(endpoint);
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .build()
            .unwrap_or_default();
        let url = format!("{base}/api/predict/{queue}");
        Self {
            http,
            timeouts,
            parsed_url: url::Url::parse(&url).ok(),
            url,
            token: token.to_string(),
            group: DEFAULT_GROUP.into(),
            user: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// The queue's URL: `http://host:port/api/predict/{service}` or
    /// `.../sink`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The request that asks for `op` on this client's queue, with `tags`
    /// (a put's tags, a read's filter) and this client's identity.
    fn request(&self, op: &QueueOp, tags: &BTreeMap<String, String>) -> reqwest::RequestBuilder {
        let method =
            reqwest::Method::from_bytes(op.method().as_bytes()).expect("an HTTP method name");
        let mut query = op.query();
        query.extend(tags.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let Some(base) = &self.parsed_url else {
            return self.with_identity(self.http.request(method, &self.url).query(&query));
        };
        // The URL parsed once and its query added here: parsing a string
        // for each request (host, IDNA, path) was about 2% of the engine's
        // CPU on the engine path.
        let mut url = base.clone();
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        self.with_identity(self.http.request(method, url))
    }

    fn with_identity(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.timeout(self.timeouts.request)
            .header("Authorization", &self.token)
            .header(HEADER_USER, &self.user)
            .header(HEADER_GROUP, &self.group)
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        if resp.status().is_success() {
            Ok(resp)
        } else {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default().trim().to_string();
            Err(ClientError::Status { status, body })
        }
    }

    pub async fn put(
        &self,
        data: Bytes,
        tags: &BTreeMap<String, String>,
        priority: u32,
    ) -> Result<(u64, String), ClientError> {
        let op = QueueOp::Put {
            priority: (priority > 0).then_some(priority),
        };
        let resp = self.request(&op, tags).body(data).send().await?;
        let resp = Self::check(resp).await?;
        let rid = resp
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp.text().await?;
        let index = body
            .trim()
            .parse()
            .map_err(|_| ClientError::Protocol(format!("index {body:?}")))?;
        Ok((index, rid))
    }

    /// Read (or, with `auto_delete`, take) items as `op` says, matching
    /// `tags`; waits up to `op.timeout` for one.
    pub async fn get(
        &self,
        op: &GetOp,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<DataFrameProto>, ClientError> {
        let read = QueueOp::Read {
            read: ReadOp::Get(op.clone()),
            linearizable: true,
        };
        let resp = self
            .request(&read, tags)
            .header("Accept", PROTOBUF_MEDIA_TYPE)
            .timeout(self.timeouts.request + op.timeout)
            .send()
            .await?;
        let resp = Self::check(resp).await?;
        let bytes = resp.bytes().await?;
        let list =
            DataFrameListProto::decode(bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(list.index)
    }

    pub async fn commit(&self, indexes: &[u64]) -> Result<(), ClientError> {
        let op = QueueOp::Commit {
            indexes: indexes.to_vec(),
        };
        let resp = self.request(&op, &BTreeMap::new()).send().await?;
        Self::check(resp).await.map(|_| ())
    }

    /// Delete every item of the queue before `index`.
    pub async fn truncate_before(&self, index: u64) -> Result<(), ClientError> {
        let op = QueueOp::Truncate { before: index };
        let resp = self.request(&op, &BTreeMap::new()).send().await?;
        Self::check(resp).await.map(|_| ())
    }

    pub async fn attributes(&self) -> Result<BTreeMap<String, String>, ClientError> {
        let op = QueueOp::Read {
            read: ReadOp::Attributes,
            linearizable: true,
        };
        let resp = self.request(&op, &BTreeMap::new()).send().await?;
        let text = Self::check(resp).await?.text().await?;
        serde_json::from_str(&text).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Negative commit: hand the items back for redelivery. The code and
    /// reason are cut to the server's limits (64 and 1,024 bytes) so that a
    /// long error text never makes the hand-back itself fail.
    pub async fn negative(
        &self,
        indexes: &[u64],
        code: &str,
        reason: &str,
    ) -> Result<(), ClientError> {
        let (code, reason) = (
            truncate(code, MAX_CODE_BYTES),
            truncate(reason, MAX_REASON_BYTES),
        );
        // Code and reason go in a form body, where they need no URL space.
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair(param::CODE, code)
            .append_pair(param::REASON, reason)
            .finish();
        let op = QueueOp::Negative {
            indexes: indexes.to_vec(),
            code: None,
            reason: None,
        };
        let resp = self
            .request(&op, &BTreeMap::new())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await?;
        Self::check(resp).await.map(|_| ())
    }

    /// On a sink client: write `result` for `request_id` and commit
    /// `input_index` of the input queue (for this client's group) in one
    /// replicated step. An empty result only commits. Returns whether a
    /// result for the request id already existed.
    pub async fn complete(
        &self,
        input_index: u64,
        request_id: &str,
        tags: &BTreeMap<String, String>,
        result: Bytes,
    ) -> Result<bool, ClientError> {
        let mut tags = tags.clone();
        tags.insert(REQUEST_ID_TAG.into(), request_id.to_string());
        let op = QueueOp::Complete { input_index };
        let resp = self.request(&op, &tags).body(result).send().await?;
        let resp = Self::check(resp).await?;
        Ok(resp
            .headers()
            .get(DUPLICATE_HEADER)
            .is_some_and(|v| v == "true"))
    }

    /// Several completes in one request (`_complete_=batch`, this client's
    /// queue being a sink). Each item carries its input index, its tags
    /// (`requestId` among them) and its result. Returns each item's answer
    /// in order, as [`Self::complete`] would have given it: whether a result
    /// was already there, or the status and error text of a refusal. An
    /// error for the whole request means no item was answered (a node that
    /// predates batches refuses the request with 400).
    pub async fn complete_batch(
        &self,
        items: Vec<CompleteProto>,
    ) -> Result<Vec<Result<bool, ClientError>>, ClientError> {
        let count = items.len();
        let body = CompleteBatchProto { items }.encode_to_vec();
        let resp = self
            .request(&QueueOp::CompleteBatch, &BTreeMap::new())
            .header("Content-Type", PROTOBUF_MEDIA_TYPE)
            .body(body)
            .send()
            .await?;
        let resp = Self::check(resp).await?;
        let reply = CompleteBatchReplyProto::decode(resp.bytes().await?)
            .map_err(|e| ClientError::Protocol(format!("a batch's reply: {e}")))?;
        if reply.outcomes.len() != count {
            return Err(ClientError::Protocol(format!(
                "a batch of {count} completes answered {} times",
                reply.outcomes.len()
            )));
        }
        Ok(reply
            .outcomes
            .into_iter()
            .map(|o| match o.status {
                200 => Ok(o.duplicate),
                status => Err(ClientError::Status {
                    status: u16::try_from(status).unwrap_or(500),
                    body: o.error,
                }),
            })
            .collect())
    }

    /// Open a watch and return its frame stream. A task reads the socket
    /// (answering the node's pings), pings the node every third of the idle
    /// limit and ends the stream with [`ClientError::Timeout`] when nothing
    /// was heard for the idle limit or a ping cannot be sent within it.
    pub async fn open_watch(
        &self,
        window: u32,
        auto_commit: bool,
    ) -> Result<
        impl futures::Stream<Item = Result<DataFrameProto, ClientError>> + Unpin + use<>,
        ClientError,
    > {
        let op = QueueOp::Watch(WatchOp {
            from_index: Some(0),
            window,
            auto_commit,
            index_only: false,
        });
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(op.query())
            .finish();
        let url = format!("{}?{query}", self.url.replacen("http", "ws", 1));
        let mut req = url.as_str().into_client_request()?;
        let h = req.headers_mut();
        h.insert(
            "Authorization",
            self.token
                .parse()
                .map_err(|_| ClientError::Protocol("token".into()))?,
        );
        h.insert(
            HEADER_USER,
            self.user
                .parse()
                .map_err(|_| ClientError::Protocol("user".into()))?,
        );
        h.insert(
            HEADER_GROUP,
            self.group
                .parse()
                .map_err(|_| ClientError::Protocol("group".into()))?,
        );
        // The handshake includes the TCP connect: bound both, so a node
        // that accepts and never answers is given up on.
        let limit = self.timeouts.connect + self.timeouts.request;
        let (ws, _) = tokio::time::timeout(limit, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| ClientError::Timeout(limit))??;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let idle = self.timeouts.idle.max(Duration::from_millis(300));
        tokio::spawn(pump_watch(ws, tx, idle));
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// Watch the queue; `on_frame` is called for every frame until it
    /// returns false or the connection ends.
    pub async fn watch<F, Fut>(
        &self,
        window: u32,
        auto_commit: bool,
        mut on_frame: F,
    ) -> Result<(), ClientError>
    where
        F: FnMut(DataFrameProto) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut frames = self.open_watch(window, auto_commit).await?;
        while let Some(frame) = frames.next().await {
            if !on_frame(frame?).await {
                return Ok(());
            }
        }
        Ok(())
    }
}

type WatchSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn pump_watch(
    mut ws: WatchSocket,
    tx: tokio::sync::mpsc::Sender<Result<DataFrameProto, ClientError>>,
    idle: Duration,
) {
    let mut last_heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(idle / 3);
    ping.tick().await;
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    last_heard = tokio::time::Instant::now();
                    let frame = DataFrameProto::decode(b).map_err(|e| ClientError::Protocol(e.to_string()));
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => last_heard = tokio::time::Instant::now(),
                Some(Err(e)) => {
                    let _ = tx.send(Err(e.into())).await;
                    break;
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > idle {
                    let _ = tx.send(Err(ClientError::Timeout(idle))).await;
                    break;
                }
                let sent = tokio::time::timeout(idle, ws.send(Message::Ping(Bytes::from_static(b"eddy")))).await;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(e.into())).await;
                        break;
                    }
                    Err(_) => {
                        let _ = tx.send(Err(ClientError::Timeout(idle))).await;
                        break;
                    }
                }
            }
            _ = tx.closed() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The URL a request goes to, built from the parsed URL, is the one
    /// reqwest builds from the string and the query pairs.
    #[test]
    fn a_request_url_is_the_one_reqwest_would_build_from_the_string() {
        let client = QueueClient::new("127.0.0.1:8080", "demo/sink", "token");
        let tags = BTreeMap::from([
            ("requestId".to_string(), "a b&c=d/é+%".to_string()),
            ("traceparent".to_string(), "00-ab-cd-01".to_string()),
        ]);
        let ops = [
            QueueOp::Put { priority: None },
            QueueOp::Put { priority: Some(1) },
            QueueOp::Complete { input_index: 7 },
            QueueOp::Commit {
                indexes: vec![1, 2, 3],
            },
        ];
        for op in &ops {
            for tags in [&tags, &BTreeMap::new()] {
                let built = client.request(op, tags).build().unwrap();
                let mut query = op.query();
                query.extend(tags.iter().map(|(k, v)| (k.as_str(), v.clone())));
                let expected = client
                    .http
                    .post(client.url())
                    .query(&query)
                    .build()
                    .unwrap();
                assert_eq!(built.url(), expected.url(), "{op:?} {tags:?}");
            }
        }
        let bare = client
            .request(&QueueOp::Put { priority: None }, &BTreeMap::new())
            .build()
            .unwrap();
        assert_eq!(
            bare.url().as_str(),
            "http://127.0.0.1:8080/api/predict/demo/sink"
        );
    }
}
