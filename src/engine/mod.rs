//! The asynchronous inference engine: a worker that sits beside a model
//! server, watches a service's input queue and turns each item into a
//! result on the sink.
//!
//! - It watches with `window` = its concurrency, in a group shared by every
//!   engine of the service, so Eddy balances items by the engines' free
//!   slots. With a prefetch of N the window is concurrency + N: the model
//!   still gets at most `concurrency` calls, and its slot is free again as
//!   soon as it answers, while the item keeps its window slot until its
//!   result is written. That keeps a fast model busy while results are
//!   replicated (for a model answering in well under a millisecond the
//!   write takes longer than the call); items taken early wait here, not in
//!   the queue where another engine could start them, so it is off by
//!   default (long inference gains nothing from it).
//! - Each item is POSTed to the model at the item's sub-path. The response
//!   body is written to the sink tagged `requestId` (and `lastCode` when the
//!   status is not 200) **in the same replicated command that commits the
//!   input item** (`_complete_`), so a crash between the two cannot lose the
//!   result or write it twice. Results that are ready at the same moment
//!   travel in one request (`_complete_=batch`), each with its own answer.
//!   An item is looked up on the sink first
//!   unless its frame says it is the item's first delivery (the node says
//!   so only when no result for its request id exists): when its result
//!   already exists it is committed without calling the model again.
//! - An empty body writes nothing (the model delivered elsewhere).
//! - A model that times out or cannot be reached: the item is negatively
//!   committed and redelivered, until the service's max-delivery count
//!   dead-letters it.
//! - A full sink (429) is retried while the engine keeps the item's slot,
//!   so the engine stops taking input until there is room.
//! - An input item that is gone (`_complete_` answers 410: deleted, evicted,
//!   dead-lettered) or that is another one (409) ends the item's work with
//!   one warning: nothing is retried or handed back.
//! - On shutdown the engine stops taking items, finishes what it holds and
//!   hands back (negative commit, code `Shutdown`) what it never started.
//!
//! - Nothing the engine does with Eddy waits without bound
//!   ([`EngineSettings::eddy_timeouts`]): connecting, every request and the
//!   watch's handshake have deadlines, and the watch pings the node and
//!   counts as broken when nothing was heard for the idle limit. A node that
//!   hangs is treated like one that fails: the engine moves to the next
//!   endpoint.
//!
//! The engine talks to Eddy only through [`crate::client`].

pub mod model;
mod results;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::client::{ClientError, QueueClient, Timeouts};
use crate::proto::DataFrameProto;
use crate::protocol::{LAST_CODE_TAG, PATH_TAG, REQUEST_ID_TAG, TRACEPARENT_TAG};
pub use model::{ModelClient, ModelError, ModelResponse};

#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Eddy nodes (`host:port`); the engine moves to the next on failure.
    pub endpoints: Vec<String>,
    pub service: String,
    pub token: String,
    pub model: String,
    pub concurrency: u32,
    /// Items held beyond `concurrency`: waiting for a model slot, or
    /// writing their result after the model answered (0: none).
    pub prefetch: u32,
    /// Consumer group shared by all engines of the service.
    pub group: String,
    /// This engine's consumer id (stable across reconnects).
    pub instance: String,
    pub request_timeout: Duration,
    /// How long a shutdown waits for items in progress.
    pub drain_timeout: Duration,
    /// Connect, request and watch-idle limits for talking to Eddy.
    pub eddy_timeouts: Timeouts,
}

impl EngineSettings {
    /// The watch window: the concurrency and the prefetch.
    pub fn window(&self) -> u32 {
        self.concurrency.max(1).saturating_add(self.prefetch)
    }
}

/// Counters an engine keeps (served at its `/metrics`, printed on exit).
pub struct EngineStats {
    pub completed: AtomicU64,
    pub duplicates: AtomicU64,
    pub failed_calls: AtomicU64,
    pub handed_back: AtomicU64,
    /// Results not written because the input item was gone or was another
    /// one (`_complete_` answered 410 or 409).
    pub not_written: AtomicU64,
    /// Items the model answered with an empty body: committed, nothing
    /// written (the model delivered elsewhere).
    pub empty_answers: AtomicU64,
    /// Writes of a result tried again (sink full, no leader, a node down).
    pub result_retries: AtomicU64,
    /// Looks on the sink for an earlier result (every item whose frame does
    /// not say it is the item's first delivery).
    pub result_checks: AtomicU64,
    /// Batch requests sent (`_complete_=batch`), answered or not.
    pub result_batches: AtomicU64,
    /// How long the model took to answer (answered calls, any status).
    pub model_seconds: crate::latency::DurationHistogram,
    /// Model answers by HTTP status.
    pub model_status: std::sync::Mutex<BTreeMap<u16, u64>>,
    /// Model calls that got no answer, by kind (`ModelError::code`).
    pub model_errors: std::sync::Mutex<BTreeMap<String, u64>>,
}

/// Bounds of the model latency buckets, in microseconds: 1 ms to 2 min.
const MODEL_BUCKETS_MICROS: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
];

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            completed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            failed_calls: AtomicU64::new(0),
            handed_back: AtomicU64::new(0),
            not_written: AtomicU64::new(0),
            empty_answers: AtomicU64::new(0),
            result_retries: AtomicU64::new(0),
            result_checks: AtomicU64::new(0),
            result_batches: AtomicU64::new(0),
            model_seconds: crate::latency::DurationHistogram::new(&MODEL_BUCKETS_MICROS),
            model_status: Default::default(),
            model_errors: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no Eddy endpoint configured")]
    NoEndpoint,
    /// `--model` does not name an http(s) URL (or `host:port`).
    #[error("--model: {0}")]
    BadModelUrl(ModelError),
}

/// A running engine's shared parts.
pub struct Engine {
    settings: EngineSettings,
    inputs: Vec<QueueClient>,
    sinks: Vec<QueueClient>,
    current: AtomicUsize,
    pub model: ModelClient,
    /// Concurrency budget shared by queue work and synchronous requests:
    /// calls at the model (and an item's look for an earlier result).
    pub permits: Arc<Semaphore>,
    /// One per item of the watch window, held from delivery until the
    /// item's work ends (its result written, or handed back).
    held: Arc<Semaphore>,
    /// Places of synchronous requests: reading their body, waiting for a
    /// slot, or at the model.
    sync_waiters: Arc<Semaphore>,
    pub stats: EngineStats,
    /// Set once the engine stops taking items: items waiting for a slot
    /// are handed back at once.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Results waiting to be written together.
    batches: Arc<results::ResultBatches>,
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(2_000))
}

/// One synchronous request's place (see [`Engine::sync_place`]), freed when
/// dropped.
pub struct SyncPlace {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Why a synchronous call was not answered by the model.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("every slot is taken and enough callers already wait")]
    Busy,
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl Engine {
    pub fn new(settings: EngineSettings) -> Result<Arc<Self>, EngineError> {
        if settings.endpoints.is_empty() {
            return Err(EngineError::NoEndpoint);
        }
        let make = |ep: &String, queue: String| {
            let mut c =
                QueueClient::with_timeouts(ep, &queue, &settings.token, settings.eddy_timeouts);
            c.group = settings.group.clone();
            c.user = settings.instance.clone();
            c
        };
        let inputs = settings
            .endpoints
            .iter()
            .map(|e| make(e, settings.service.clone()))
            .collect();
        let sinks = settings
            .endpoints
            .iter()
            .map(|e| make(e, format!("{}/sink", settings.service)))
            .collect();
        Ok(Arc::new(Self {
            model: ModelClient::new(&settings.model, settings.request_timeout)
                .map_err(EngineError::BadModelUrl)?,
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1) as usize)),
            held: Arc::new(Semaphore::new(settings.window() as usize)),
            sync_waiters: Arc::new(Semaphore::new(sync_places(settings.concurrency))),
            settings,
            inputs,
            sinks,
            current: AtomicUsize::new(0),
            stats: EngineStats::default(),
            stopping: tokio::sync::watch::Sender::new(false),
            batches: Arc::default(),
        }))
    }

    fn input(&self) -> &QueueClient {
        &self.inputs[self.current.load(Ordering::Relaxed) % self.inputs.len()]
    }

    fn sink(&self) -> &QueueClient {
        &self.sinks[self.current.load(Ordering::Relaxed) % self.sinks.len()]
    }

    fn next_endpoint(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }

    /// Work until `shutdown` resolves, then drain and return.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut attempt = 0u32;
        'connect: loop {
            let watch = tokio::select! {
                w = self.input().open_watch(self.settings.window(), false) => w,
                _ = &mut shutdown => break 'connect,
            };
            let mut frames = match watch {
                Ok(f) => {
                    attempt = 0;
                    tracing::info!(endpoint = %self.input().url(), "engine watching");
                    f
                }
                Err(e) => {
                    tracing::warn!(error = %e, endpoint = %self.input().url(), "watch failed; trying the next node");
                    self.next_endpoint();
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(attempt)) => continue 'connect,
                        _ = &mut shutdown => break 'connect,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    f = frames.next() => f,
                    _ = &mut shutdown => {
                        // Closing the watch stops deliveries at once; what
                        // is in progress finishes, what waits is handed back.
                        tracing::info!("engine stopping: finishing items in progress");
                        self.stopping.send_replace(true);
                        drop(frames);
                        break 'connect;
                    }
                };
                match next {
                    Some(Ok(frame)) => {
                        // Keep reading (and answering pings) while the item
                        // waits for a slot of the shared budget; an item
                        // still waiting when the engine stops is handed
                        // back at once. `held` counts the items at work
                        // here (at most a window, but for frames sent again
                        // after a reconnect) for the drain.
                        let me = self.clone();
                        let held = self.held.clone();
                        tokio::spawn(async move {
                            let _held = held.acquire_owned().await.expect("semaphore open");
                            let mut stopping = me.stopping.subscribe();
                            let slot = tokio::select! {
                                biased;
                                _ = stopping.wait_for(|s| *s) => None,
                                slot = me.permits.clone().acquire_owned() => slot.ok(),
                            };
                            match slot {
                                Some(slot) => me.process(frame, slot).await,
                                None => me.hand_back(frame.index).await,
                            }
                        });
                    }
                    Some(Err(e)) => {
                        // Broken or silent (a hung node): another node serves
                        // the same queue.
                        tracing::warn!(error = %e, endpoint = %self.input().url(), "watch broke; trying the next node");
                        self.next_endpoint();
                        break;
                    }
                    None => {
                        tracing::info!("watch closed by the node; reconnecting");
                        self.next_endpoint();
                        break;
                    }
                }
            }
        }
        // Also when the engine stopped while reconnecting: items taken on
        // the broken watch and still waiting for a slot go back at once.
        self.stopping.send_replace(true);
        self.wait_idle().await;
    }

    /// Call the model, counting the call in the engine's figures (and
    /// logging it in the caller's span).
    async fn call_model(
        &self,
        path: &str,
        body: Bytes,
        traceparent: Option<&str>,
    ) -> Result<ModelResponse, ModelError> {
        let called = std::time::Instant::now();
        let answer = self.model.call(path, body, traceparent).await;
        let took = called.elapsed();
        // Every call counts in the latency histogram, timeouts included, so
        // that its tail shows a failing model.
        self.stats.model_seconds.record(took);
        match &answer {
            Ok(resp) => {
                tracing::debug!(
                    status = resp.status,
                    ms = took.as_millis() as u64,
                    "model answered"
                );
                *self
                    .stats
                    .model_status
                    .lock()
                    .unwrap()
                    .entry(resp.status)
                    .or_default() += 1;
            }
            Err(e) => {
                tracing::debug!(error = %e, "model call failed");
                *self
                    .stats
                    .model_errors
                    .lock()
                    .unwrap()
                    .entry(e.code().to_string())
                    .or_default() += 1;
            }
        }
        answer
    }

    /// The engine's figures in Prometheus' text format.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let s = &self.stats;
        let mut out = String::new();
        let in_flight = (self.settings.concurrency.max(1) as usize)
            .saturating_sub(self.permits.available_permits());
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let figures: [(&str, &str, &str, u64); 11] = [
            (
                "eddy_engine_in_flight",
                "gauge",
                "Items and synchronous requests at the model now.",
                in_flight as u64,
            ),
            (
                "eddy_engine_concurrency",
                "gauge",
                "The engine's concurrency: calls at the model at once (its window, less any prefetch).",
                u64::from(self.settings.concurrency),
            ),
            (
                "eddy_engine_results_written_total",
                "counter",
                "Results written to the sink (each with its input's commit).",
                load(&s.completed),
            ),
            (
                "eddy_engine_empty_answers_total",
                "counter",
                "Items the model answered with an empty body: committed, nothing written.",
                load(&s.empty_answers),
            ),
            (
                "eddy_engine_duplicates_total",
                "counter",
                "Items whose result was already on the sink: committed without a second write.",
                load(&s.duplicates),
            ),
            (
                "eddy_engine_handed_back_total",
                "counter",
                "Items handed back unprocessed on shutdown.",
                load(&s.handed_back),
            ),
            (
                "eddy_engine_not_written_total",
                "counter",
                "Results dropped because their input item was gone or was another one.",
                load(&s.not_written),
            ),
            (
                "eddy_engine_retries_total",
                "counter",
                "Result writes tried again (sink full, no leader, a node down).",
                load(&s.result_retries),
            ),
            (
                "eddy_engine_result_checks_total",
                "counter",
                "Looks on the sink for an earlier result (items whose frame does not say it is their first delivery).",
                load(&s.result_checks),
            ),
            (
                "eddy_engine_result_batches_total",
                "counter",
                "Requests sent with a batch of results (`_complete_=batch`, one or more results, each with its input's commit).",
                load(&s.result_batches),
            ),
            (
                "eddy_engine_model_failures_total",
                "counter",
                "Model calls that got no answer; the item was handed back for redelivery.",
                load(&s.failed_calls),
            ),
        ];
        for (name, kind, help, value) in figures {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        s.model_seconds.render(
            &mut out,
            "eddy_engine_model_seconds",
            "Time a model call took (answered or not: timeouts count at the timeout).",
        );
        let _ = writeln!(
            out,
            "# HELP eddy_engine_model_responses_total Model answers by HTTP status."
        );
        let _ = writeln!(out, "# TYPE eddy_engine_model_responses_total counter");
        for (status, n) in s.model_status.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "eddy_engine_model_responses_total{{status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP eddy_engine_model_errors_total Model calls without an answer, by kind."
        );
        let _ = writeln!(out, "# TYPE eddy_engine_model_errors_total counter");
        for (kind, n) in s.model_errors.lock().unwrap().iter() {
            let _ = writeln!(out, "eddy_engine_model_errors_total{{kind=\"{kind}\"}} {n}");
        }
        out
    }

    async fn hand_back(&self, index: u64) {
        if let Err(e) = self
            .input()
            .negative(&[index], "Shutdown", "engine stopping")
            .await
        {
            tracing::warn!(error = %e, index, "could not hand back item; it returns after the grace period");
        }
        self.stats.handed_back.fetch_add(1, Ordering::Relaxed);
    }

    /// Wait (up to the drain timeout) until no item is held and no
    /// synchronous request is at the model.
    async fn wait_idle(&self) {
        let _ = tokio::time::timeout(self.settings.drain_timeout, async {
            let _items = self.held.acquire_many(self.settings.window()).await;
            let _calls = self
                .permits
                .acquire_many(self.settings.concurrency.max(1))
                .await;
        })
        .await;
    }

    /// Work on one item. `slot` is its place in the concurrency budget,
    /// given up once the model answered (the result's write does not need
    /// it).
    async fn process(&self, frame: DataFrameProto, slot: tokio::sync::OwnedSemaphorePermit) {
        let Some(request_id) = frame.tags.get(REQUEST_ID_TAG).cloned() else {
            tracing::warn!(
                index = frame.index,
                "item without request id; committing it unprocessed"
            );
            let _ = self.input().commit(&[frame.index]).await;
            return;
        };
        // A result already on the sink means the work was done: commit only.
        // A frame that says it is the item's first delivery skips the look:
        // a result is written by the command that commits its input, and
        // the node does not say "first" for an item whose request id has a
        // result, nor for a frame sent again after a reconnect. A frame
        // that does not say (0, or an older node) gets the look.
        if frame.deliveries != 1 && self.result_exists(&request_id).await {
            drop(slot);
            if self
                .finish(frame.index, &request_id, BTreeMap::new(), Bytes::new())
                .await
                .is_some()
            {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let path = frame.tags.get(PATH_TAG).cloned().unwrap_or_default();
        // The model call is a child of the put's trace; the result keeps the
        // put's own trace context.
        let traceparent = frame.tags.get(TRACEPARENT_TAG).cloned();
        let span = tracing::debug_span!(
            "engine_item",
            index = frame.index,
            request_id = %request_id,
            traceparent = traceparent.as_deref().unwrap_or_default(),
        );
        let model_call = traceparent
            .as_deref()
            .and_then(|t| crate::protocol::child_traceparent(t, crate::protocol::new_span_id()));
        let answer = {
            use tracing::Instrument as _;
            self.call_model(&path, frame.data.clone(), model_call.as_deref())
                .instrument(span.clone())
                .await
        };
        drop(slot);
        match answer {
            Ok(resp) => {
                let mut tags = BTreeMap::new();
                if resp.status != 200 {
                    tags.insert(LAST_CODE_TAG.to_string(), resp.status.to_string());
                }
                if let Some(t) = traceparent {
                    tags.insert(TRACEPARENT_TAG.to_string(), t);
                }
                let empty = resp.body.is_empty();
                let finished = {
                    use tracing::Instrument as _;
                    self.finish(frame.index, &request_id, tags, resp.body)
                        .instrument(span.clone())
                        .await
                };
                let counter = match finished {
                    Some(true) => &self.stats.duplicates,
                    Some(false) if empty => &self.stats.empty_answers,
                    Some(false) => &self.stats.completed,
                    None => return,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                span.in_scope(|| tracing::debug!(empty, "result written, input committed"));
            }
            Err(e) => {
                self.stats.failed_calls.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(index = frame.index, error = %e, "model call failed; handing the item back");
                let mut attempt = 0;
                while let Err(err) = self
                    .input()
                    .negative(&[frame.index], e.code(), &e.to_string())
                    .await
                {
                    attempt += 1;
                    if attempt > 20 {
                        tracing::error!(error = %err, "could not hand the item back; it returns after the grace period");
                        break;
                    }
                    self.next_endpoint();
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// Whether the sink holds a result for `request_id` (false when the
    /// look fails: the model is called, and `_complete_` still writes no
    /// second result).
    async fn result_exists(&self, request_id: &str) -> bool {
        self.stats.result_checks.fetch_add(1, Ordering::Relaxed);
        let filter = BTreeMap::from([(REQUEST_ID_TAG.to_string(), request_id.to_string())]);
        matches!(self.sink().get(&already_written(), &filter).await, Ok(existing) if !existing.is_empty())
    }

    /// Write the result and commit the input (in a batch with other results
    /// when it is small, see [`results`]), retrying while the sink is full
    /// or the cluster is between leaders (the slot stays taken).
    /// Some(whether a result was already there) once done; None when the
    /// item's work ended without a result (counted here).
    async fn finish(
        &self,
        index: u64,
        request_id: &str,
        tags: BTreeMap<String, String>,
        body: Bytes,
    ) -> Option<bool> {
        let mut attempt = 0;
        loop {
            let (answer, batched) = match self
                .complete_in_batch(index, request_id, &tags, &body)
                .await
            {
                results::Written::Answer(answer) => (answer, true),
                results::Written::Alone => (
                    self.sink()
                        .complete(index, request_id, &tags, body.clone())
                        .await,
                    false,
                ),
                results::Written::Failed(reason) => {
                    // The batch's sender logged it and moved to the next node.
                    tracing::debug!(%reason, index, "writing the result failed; retrying");
                    attempt = (attempt + 1).min(5);
                    self.stats.result_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
            };
            match answer {
                Ok(duplicate) => return Some(duplicate),
                Err(ClientError::Status { status: 429, .. }) => {
                    // Sink full: hold the slot (backpressure) and retry.
                    attempt = (attempt + 1).min(5);
                }
                Err(ClientError::Status {
                    status: status @ (409 | 410),
                    body: text,
                }) => {
                    // Final answers, not refusals: the input item at this
                    // index carries another request id (409), or it is gone
                    // (410: deleted, evicted, consumed or dead-lettered) and
                    // no result exists. Nothing was written and nothing was
                    // committed; retrying or handing the item back cannot
                    // change that.
                    tracing::warn!(
                        status,
                        reason = %text.trim(),
                        index,
                        request_id,
                        "result not written: the input item is not there to complete"
                    );
                    self.stats.not_written.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Err(ClientError::Status { status, body: text })
                    if (400..500).contains(&status) && status != 408 =>
                {
                    tracing::error!(status, error = %text, index, "result refused; handing the item back");
                    let _ = self
                        .input()
                        .negative(&[index], "ResultRefused", &text)
                        .await;
                    return None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, index, "writing the result failed; retrying");
                    // A batch's sender already moved to the next node.
                    if !batched {
                        self.next_endpoint();
                    }
                    attempt = (attempt + 1).min(5);
                }
            }
            self.stats.result_retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// A place for one synchronous request, or `Busy` at once when
    /// `concurrency` requests already hold one (their bodies being read,
    /// waiting for a slot of the concurrency budget, or at the model): a
    /// flood of them can neither queue up nor buffer bodies without bound.
    pub fn sync_place(&self) -> Result<SyncPlace, SyncError> {
        self.sync_waiters
            .clone()
            .try_acquire_owned()
            .map(|permit| SyncPlace { _permit: permit })
            .map_err(|_| SyncError::Busy)
    }

    /// Items this engine holds now (at the model, waiting for a slot, or
    /// writing their result).
    pub fn held_items(&self) -> usize {
        (self.settings.window() as usize).saturating_sub(self.held.available_permits())
    }

    /// Synchronous places free now.
    pub fn sync_places_free(&self) -> usize {
        self.sync_waiters.available_permits()
    }

    /// Synchronous places in all.
    pub fn sync_places(&self) -> usize {
        sync_places(self.settings.concurrency)
    }

    /// Call the model directly for a synchronous request that holds a
    /// place, sharing the concurrency budget with queue work. The budget's
    /// slot is taken only now, once the body is in: a caller that sends its
    /// body slowly holds its place, never a slot queue work needs.
    pub async fn predict_sync(
        &self,
        _place: SyncPlace,
        path: &str,
        body: Bytes,
        traceparent: Option<&str>,
    ) -> Result<ModelResponse, SyncError> {
        let _permit = self.permits.acquire().await.expect("semaphore open");
        Ok(self.call_model(path, body, traceparent).await?)
    }

    /// Whether `given` is the service token (any value when none is set).
    pub fn token_matches(&self, given: &[u8]) -> bool {
        self.settings.token.is_empty()
            || crate::secret::matches(given, self.settings.token.as_bytes())
    }
}

/// How many synchronous requests may be in the engine at once: half its
/// concurrency (at least one), so that synchronous callers, who share the
/// concurrency budget with queue work, never take all of it.
fn sync_places(concurrency: u32) -> usize {
    (concurrency as usize / 2).max(1)
}

/// The read that looks for a result already in the sink: the first item
/// with the request's id, without waiting.
fn already_written() -> crate::protocol::GetOp {
    crate::protocol::GetOp {
        from_index: Some(0),
        length: 1,
        timeout: std::time::Duration::ZERO,
        raw: Some(false),
        auto_delete: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use std::sync::Mutex;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    /// An engine of concurrency 1 for service "svc" on the node at `addr`.
    fn test_engine(addr: String, model: &str) -> Arc<Engine> {
        engine_settings(addr, model).unwrap()
    }

    fn engine_settings(addr: String, model: &str) -> Result<Arc<Engine>, EngineError> {
        Engine::new(EngineSettings {
            endpoints: vec![addr],
            service: "svc".into(),
            token: String::new(),
            model: model.into(),
            concurrency: 1,
            prefetch: 0,
            group: "engines".into(),
            instance: "e1".into(),
            request_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(1),
            eddy_timeouts: Timeouts::default(),
        })
    }

    #[test]
    fn an_engine_with_a_model_url_it_cannot_call_does_not_start() {
        let err = engine_settings("127.0.0.1:1".into(), "ftp://models/v1").err();
        let Some(err @ EngineError::BadModelUrl(ModelError::BadBase(_))) = err else {
            panic!("started, or refused for another reason: {err:?}");
        };
        let text = err.to_string();
        assert!(
            text.starts_with("--model: bad model URL \"ftp://models/v1\""),
            "{text}"
        );
    }

    /// How a stand-in for Eddy answers a batch of completes.
    #[derive(Clone, Copy, PartialEq)]
    enum Batches {
        /// As a node that knows them: each item answered with the status
        /// every other request gets.
        Known,
        /// As a node that predates them: 400, a bad index.
        Unknown,
        /// The whole batch refused as larger than the sink's limit: 413.
        TooLarge,
    }

    /// A stand-in for Eddy that answers every request with `status` (each
    /// item of a batch too, unless `batches` says the node does not know
    /// them) and records each request line; a batch's line ends with the
    /// input indexes it carried (` items=[7, 8]`).
    async fn fake_eddy(status: u16, batches: Batches) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut length = 0;
                        loop {
                            let mut header = String::new();
                            stream.read_line(&mut header).await.unwrap();
                            if header.trim().is_empty() {
                                break;
                            }
                            if let Some((k, v)) = header.split_once(':')
                                && k.eq_ignore_ascii_case("content-length")
                            {
                                length = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; length];
                        stream.read_exact(&mut body).await.unwrap();
                        let text = "input item 7 is gone";
                        let mut line = line.trim().to_string();
                        let (status, reply) = if line.contains("_complete_=batch") {
                            let batch =
                                crate::proto::CompleteBatchProto::decode(&body[..]).unwrap();
                            let indexes: Vec<u64> =
                                batch.items.iter().map(|i| i.input_index).collect();
                            line = format!("{line} items={indexes:?}");
                            match batches {
                                Batches::Unknown => {
                                    (400, b"_complete_: expected a non-negative integer".to_vec())
                                }
                                Batches::TooLarge => (413, b"payload too large".to_vec()),
                                Batches::Known => {
                                    let outcomes = indexes
                                        .iter()
                                        .map(|_| crate::proto::CompleteOutcomeProto {
                                            status: status.into(),
                                            sink_index: if status == 200 { 1 } else { 0 },
                                            duplicate: false,
                                            error: if status == 200 {
                                                String::new()
                                            } else {
                                                text.to_string()
                                            },
                                        })
                                        .collect();
                                    let reply = crate::proto::CompleteBatchReplyProto { outcomes };
                                    (200, reply.encode_to_vec())
                                }
                            }
                        } else {
                            (status, format!("{text}\n").into_bytes())
                        };
                        log.lock().unwrap().push(line);
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n",
                            reply.len()
                        );
                        let out = stream.get_mut();
                        out.write_all(head.as_bytes()).await.unwrap();
                        out.write_all(&reply).await.unwrap();
                    }
                });
            }
        });
        (addr, seen)
    }

    /// Log lines written while the returned guard lives (this thread).
    fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        #[derive(Clone)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(buf.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (buf, tracing::subscriber::set_default(subscriber))
    }

    /// The look on the sink for an earlier result costs a read per item;
    /// only an item handed out before can have one, so a first delivery
    /// goes straight to the model, and a redelivery (or a frame from a node
    /// that does not count deliveries) is looked up first.
    #[tokio::test]
    async fn only_an_item_handed_out_before_is_looked_up_on_the_sink() {
        for (deliveries, looked_up) in [(1, false), (2, true), (0, true)] {
            let (addr, seen) = fake_eddy(410, Batches::Known).await;
            let (model, called) = fake_eddy(200, Batches::Known).await;
            let engine = test_engine(addr, &format!("http://{model}"));
            let frame = DataFrameProto {
                index: 7,
                tags: [(REQUEST_ID_TAG.to_string(), "req-7".to_string())].into(),
                data: b"in".to_vec().into(),
                message: String::new(),
                deliveries,
            };
            tokio::time::timeout(
                Duration::from_secs(10),
                engine.process(frame, engine.permits.clone().try_acquire_owned().unwrap()),
            )
            .await
            .expect("the item's work ends");
            let requests = seen.lock().unwrap().clone();
            let lookups = requests
                .iter()
                .filter(|r| r.starts_with("GET /api/predict/svc/sink"))
                .count();
            assert_eq!(
                lookups,
                usize::from(looked_up),
                "deliveries {deliveries}: {requests:?}"
            );
            assert!(
                requests.last().is_some_and(|r| {
                    r.starts_with("POST /api/predict/svc/sink?_complete_=batch")
                        && r.ends_with("items=[7]")
                }),
                "deliveries {deliveries}: {requests:?}"
            );
            assert_eq!(called.lock().unwrap().len(), 1, "the model is called once");
            assert_eq!(
                engine.stats.result_checks.load(Ordering::Relaxed),
                u64::from(looked_up)
            );
        }
    }

    /// Delivery under faults, the engine: `_complete_` answered 409 (another
    /// request's input) or 410 (the input is gone) is a final outcome: one
    /// warning naming the reason, no retry, no hand-back (old code: an
    /// error and a negative commit of the index, which for 409 sent the
    /// item round again until it was dead-lettered). The same whether the
    /// answer came for an item of a batch or for a single `_complete_`
    /// after a node that predates batches refused one (its warning says
    /// results are written alone from then on).
    #[tokio::test]
    async fn a_complete_answered_409_or_410_is_final() {
        for batches in [Batches::Known, Batches::Unknown] {
            for status in [409u16, 410] {
                let (addr, seen) = fake_eddy(status, batches).await;
                let engine = test_engine(addr, "http://127.0.0.1:9");
                let (logs, guard) = capture_logs();
                tokio::time::timeout(
                    Duration::from_secs(10),
                    engine.finish(7, "req-7", BTreeMap::new(), Bytes::from_static(b"out")),
                )
                .await
                .expect("a final answer ends the item's work at once");
                drop(guard);
                let requests = seen.lock().unwrap().clone();
                let mut expected = vec!["POST /api/predict/svc/sink?_complete_=batch"];
                if batches == Batches::Unknown {
                    expected.push("POST /api/predict/svc/sink?_complete_=7");
                }
                assert_eq!(requests.len(), expected.len(), "{status}: {requests:?}");
                for (request, start) in requests.iter().zip(&expected) {
                    assert!(request.starts_with(start), "{requests:?}");
                }
                assert_eq!(engine.stats.not_written.load(Ordering::Relaxed), 1);
                let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
                let lines: Vec<&str> = logs.lines().collect();
                assert_eq!(lines.len(), expected.len(), "{logs}");
                if batches == Batches::Unknown {
                    assert!(
                        lines[0].contains("writing each result alone from now on"),
                        "{logs}"
                    );
                }
                let last = lines.last().unwrap();
                assert!(last.contains("WARN"), "{logs}");
                assert!(last.contains(&status.to_string()), "{logs}");
                assert!(last.contains("input item 7 is gone"), "{logs}");
            }
        }
    }

    /// Results ready at the same moment go to the node together: the
    /// first [`results::BATCHES_IN_FLIGHT`] results go at once (one request
    /// each) while the others wait; each of those requests, once answered,
    /// hands its place to a waiting result, which takes what waits then.
    /// Every result is answered, each input index is sent once. (Old code:
    /// one `_complete_` request per result.)
    #[tokio::test]
    async fn results_ready_together_are_written_in_one_request() {
        let (addr, seen) = fake_eddy(200, Batches::Known).await;
        let engine = test_engine(addr, "http://127.0.0.1:9");
        let count = 20u64;
        let answers = futures::future::join_all((1..=count).map(|index| {
            engine.finish(
                index,
                "req",
                BTreeMap::new(),
                Bytes::from(format!("result {index}")),
            )
        }));
        let answers = tokio::time::timeout(Duration::from_secs(10), answers)
            .await
            .expect("every result is answered");
        assert!(answers.iter().all(|a| *a == Some(false)), "{answers:?}");
        let requests = seen.lock().unwrap().clone();
        assert!(
            requests.len() <= 2 * results::BATCHES_IN_FLIGHT,
            "{requests:?}"
        );
        let mut sent: Vec<u64> = requests
            .iter()
            .flat_map(|r| {
                let list = r.split_once("items=[").unwrap().1.trim_end_matches(']');
                list.split(", ")
                    .map(|i| i.parse::<u64>().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        sent.sort_unstable();
        assert_eq!(sent, (1..=count).collect::<Vec<_>>());
        assert_eq!(
            engine.stats.result_batches.load(Ordering::Relaxed),
            requests.len() as u64
        );
    }

    /// A batch of one result that the node refuses as too large (the
    /// result is larger than the sink's limit) is written alone, and does
    /// not shrink the batches of the other results: only a batch of several
    /// says batches are too large.
    #[tokio::test]
    async fn a_result_too_large_alone_does_not_shrink_the_batches() {
        let (addr, seen) = fake_eddy(413, Batches::TooLarge).await;
        let engine = test_engine(addr, "http://127.0.0.1:9");
        let bound = engine.batches.max_bytes();
        tokio::time::timeout(
            Duration::from_secs(10),
            engine.finish(7, "req-7", BTreeMap::new(), Bytes::from_static(b"big")),
        )
        .await
        .expect("a refusal ends the item's work");
        let requests = seen.lock().unwrap().clone();
        assert!(requests[0].contains("_complete_=batch"), "{requests:?}");
        assert!(requests[1].contains("_complete_=7"), "{requests:?}");
        assert_eq!(engine.batches.max_bytes(), bound);
    }

    /// A 408 (the node did not get the whole body in time) to a single
    /// `_complete_` is tried again, as for no answer at all, not handed
    /// back as a refused result (which would call the model again).
    #[tokio::test]
    async fn a_complete_answered_408_is_tried_again() {
        let (addr, seen) = fake_eddy(408, Batches::Unknown).await;
        let engine = test_engine(addr, "http://127.0.0.1:9");
        let done = tokio::time::timeout(
            Duration::from_millis(400),
            engine.finish(7, "req-7", BTreeMap::new(), Bytes::from_static(b"out")),
        )
        .await;
        assert!(done.is_err(), "still retrying: {done:?}");
        let requests = seen.lock().unwrap().clone();
        let singles = requests
            .iter()
            .filter(|r| r.contains("_complete_=7"))
            .count();
        assert!(singles >= 2, "{requests:?}");
        assert!(
            requests.iter().all(|r| r.starts_with("POST ")),
            "nothing handed back: {requests:?}"
        );
    }
}
