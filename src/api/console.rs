//! The web console at `/ui`, served by every node from the binary itself:
//! server-rendered HTML (maud) that reads without JavaScript and refreshes
//! itself (`<meta refresh>`, off with `?refresh=0`).
//!
//! - `/ui`: the cluster as this node sees it, with every member's own view
//!   fetched from its `/admin/cluster` (a member that does not answer within
//!   [`MEMBER_TIMEOUT`] is shown unreachable), and a banner when there is no
//!   leader.
//! - `/ui/services`: every service's queues with their figures.
//! - `/ui/services/{name}`: one service: consumers, oldest items, dead
//!   letters, and where a request id is (`?request_id=`).
//! - `/ui/confirm/{action}` renders the confirmation form of an action;
//!   `POST /ui/actions/{action}` runs it.
//!
//! Reading follows `/metrics`: open while no status token is set, else the
//! status or admin token, as the raw `Authorization` header or as the
//! password of HTTP Basic (what a browser sends after its prompt). Pages
//! show item metadata, never payloads. Actions take the admin token in the
//! form, a ticked confirmation, and a request from this origin (a form on
//! another site cannot post here); each one is written to the audit log.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::admin::{Admin, MEMBER_CONNECT_TIMEOUT, ServiceRequest, call_node, status_allowed};
use super::{ApiError, AppState};
use crate::queue::{Command, ConsumerStatus, Queue, QueueKind, QueueRef, Reply};
use crate::raft::ClusterStatus;

/// How long the cluster page waits for another member's status.
const MEMBER_TIMEOUT: Duration = Duration::from_millis(1500);
/// Seconds between automatic refreshes of a page.
const REFRESH_SECONDS: u32 = 5;
/// Items and dead letters listed per queue on a service page.
const LISTED: usize = 20;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/ui", get(cluster_page))
        .route("/ui/", get(cluster_page))
        .route("/ui/services", get(services_page))
        .route("/ui/services/{name}", get(service_page))
        .route("/ui/confirm/{action}", get(confirm_page))
        .route("/ui/actions/{action}", post(run_action))
}

/// Puts and commits per second of each queue, from the totals seen at the
/// previous page view at least a second earlier.
#[derive(Default)]
pub struct Rates {
    samples: Mutex<HashMap<QueueRef, RateSample>>,
}

struct RateSample {
    at: Instant,
    puts: u64,
    commits: u64,
    per_second: Option<(f64, f64)>,
}

impl Rates {
    fn observe(&self, queue: &QueueRef, puts: u64, commits: u64) -> Option<(f64, f64)> {
        let mut samples = self.samples.lock().unwrap();
        let now = Instant::now();
        let sample = samples.entry(queue.clone()).or_insert(RateSample {
            at: now,
            puts,
            commits,
            per_second: None,
        });
        let elapsed = now.duration_since(sample.at).as_secs_f64();
        if elapsed >= 1.0 {
            sample.per_second = Some((
                puts.saturating_sub(sample.puts) as f64 / elapsed,
                commits.saturating_sub(sample.commits) as f64 / elapsed,
            ));
            sample.at = now;
            sample.puts = puts;
            sample.commits = commits;
        }
        sample.per_second
    }

    fn forget_except(&self, keep: &dyn Fn(&QueueRef) -> bool) {
        self.samples.lock().unwrap().retain(|q, _| keep(q));
    }
}

// ---- reading ---------------------------------------------------------------

/// A caller allowed to read the console; otherwise a 401 that makes a
/// browser ask for the token (any user name, the token as password).
struct Reader;

impl axum::extract::FromRequestParts<Arc<AppState>> for Reader {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if status_allowed(state, &parts.headers) {
            Ok(Reader)
        } else {
            Err((
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"eddy\"")],
                "the status token (or the admin token) is required: any user name, the token as password\n",
            )
                .into_response())
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    refresh: Option<u32>,
    request_id: Option<String>,
}

impl PageQuery {
    fn refresh(&self) -> u32 {
        self.refresh.unwrap_or(REFRESH_SECONDS)
    }
}

/// A console page: never framed by another site (clickjacking), never
/// cached.
struct Page(Html<String>);

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        (
            [
                (header::X_FRAME_OPTIONS, "DENY"),
                (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            self.0,
        )
            .into_response()
    }
}

fn page(state: &AppState, title: &str, refresh: u32, body: Markup) -> Page {
    let s = state.node.status();
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if refresh > 0 {
                    meta http-equiv="refresh" content=(refresh);
                }
                title { (title) " · Eddy node " (s.id) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "Eddy" }
                    nav {
                        a href="/ui" { "Cluster" }
                        a href="/ui/services" { "Services" }
                    }
                    span.from id="served-by" {
                        "node " (s.id) " · " (s.state) " · term " (s.term)
                        @if refresh > 0 { " · refreshes every " (refresh) " s" }
                    }
                }
                @if s.leader.is_none() {
                    div.banner id="no-leader" {
                        "No leader: this node knows of no leader in term " (s.term)
                        ". Writes are refused until one is elected."
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    };
    Page(Html(markup.into_string()))
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{display:flex;gap:1.5em;align-items:center;padding:.6em 1.2em;background:#20324a;color:#fff}
header a{color:#cfe3ff;margin-right:1em;text-decoration:none}
header .from{margin-left:auto;opacity:.85}
main{padding:0 1.2em 2em}
table{border-collapse:collapse;margin:.5em 0 1.5em;background:#fff}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#eef2f7}
.banner{background:#b3261e;color:#fff;padding:.6em 1.2em;font-weight:bold}
.bad{color:#b3261e;font-weight:bold}.ok{color:#1e7b34}
.actions a{margin-right:1em}
form.action{background:#fff;border:1px solid #ddd;padding:1em;max-width:36em}
form.action label{display:block;margin:.5em 0}
.muted{color:#777}
";

async fn cluster_page(
    State(state): State<Arc<AppState>>,
    _reader: Reader,
    Query(q): Query<PageQuery>,
) -> Page {
    let local = state.node.status();
    let views = member_views(&state, &local).await;
    // The leader's view holds replication lag and last contact.
    let leader_view = local
        .leader
        .and_then(|l| views.get(&l))
        .and_then(|v| v.as_ref().ok());
    let now_draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    let body = html! {
        p {
            "This page comes from node " strong { (local.id) } " ("
            (local.nodes.get(&local.id).map(|n| n.1.as_str()).unwrap_or("?")) "). "
            "Leader: " strong id="leader" { (local.leader.map_or("none".to_string(), |l| l.to_string())) } ". "
            @if now_draining { span.bad { "This node is draining: it takes no watches." } }
        }
        table id="members" {
            tr {
                th { "node" } th { "role" } th { "reachable" } th.n { "term" }
                th.n { "last log" } th.n { "committed" } th.n { "applied" }
                th.n { "lag (entries)" } th.n { "last contact" } th.n { "fsync mean" }
                th { "HTTP" } th { "Raft" } th { "" }
            }
            @for (id, (raft, api)) in &local.nodes {
                @let view = views.get(id);
                @let role = role_of(*id, &local);
                tr id=(format!("member-{id}")) {
                    td.n { (id) @if *id == local.id { " (this node)" } }
                    td.role { (role) }
                    @match view {
                        Some(Ok(v)) => {
                            td.ok { "yes" }
                            td.n { (v.term) }
                            td.n { (opt(v.last_log_index)) }
                            td.n { (opt(v.committed)) }
                            td.n { (opt(v.applied)) }
                        }
                        Some(Err(e)) => {
                            td.bad title=(e) { "no" }
                            td.n { "" } td.n { "" } td.n { "" } td.n { "" }
                        }
                        None => { td { "?" } td.n { "" } td.n { "" } td.n { "" } td.n { "" } }
                    }
                    @let lag = leader_view.and_then(|lv| {
                        if Some(*id) == local.leader { return Some("leader".to_string()); }
                        lv.replication.get(id).map(|m| {
                            lv.last_log_index.unwrap_or(0).saturating_sub(m.unwrap_or(0)).to_string()
                        })
                    });
                    td.n { (lag.unwrap_or_default()) }
                    @let contact = leader_view
                        .filter(|_| Some(*id) != local.leader)
                        .and_then(|lv| lv.millis_since_contact.get(id).copied().flatten());
                    td.n { (contact.map(|ms| format!("{:.1} s ago", ms as f64 / 1000.0)).unwrap_or_default()) }
                    td.n {
                        @if let Some(Ok(v)) = view {
                            (v.fsync_mean_micros.map(|us| format!("{:.2} ms", us as f64 / 1000.0)).unwrap_or_default())
                        }
                    }
                    td { (api) } td { (raft) }
                    td.actions {
                        a href=(format!("/ui/confirm/drain-node?node={id}")) { "drain" }
                        a href=(format!("/ui/confirm/undrain-node?node={id}")) { "undrain" }
                    }
                }
            }
        }
        p.muted {
            "Lag and last contact are the leader's view; the other figures are each member's own answer."
        }
    };
    page(&state, "Cluster", q.refresh(), body)
}

fn role_of(id: u64, s: &ClusterStatus) -> &'static str {
    if s.leader == Some(id) {
        "leader"
    } else if s.voters.contains(&id) {
        "follower"
    } else if s.learners.contains(&id) {
        "learner"
    } else {
        "member"
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Every member's own status: this node's directly, the others' from their
/// `/admin/cluster`, fetched at once.
async fn member_views(
    state: &Arc<AppState>,
    local: &ClusterStatus,
) -> BTreeMap<u64, Result<ClusterStatus, String>> {
    let mut views = BTreeMap::new();
    let mut asks = Vec::new();
    for (id, (_, api)) in &local.nodes {
        if *id == local.id {
            views.insert(*id, Ok(local.clone()));
            continue;
        }
        let state = state.clone();
        let api = api.clone();
        let id = *id;
        asks.push(async move {
            // Members share the status token; while none is set their
            // status is open and nothing is sent.
            let token = state.config.status_token.clone();
            let auth = header::HeaderValue::from_str(&token)
                .unwrap_or_else(|_| header::HeaderValue::from_static(""));
            let asked = tokio::time::timeout(
                MEMBER_TIMEOUT,
                call_node(
                    &api,
                    state.config.client_tls.as_ref(),
                    MEMBER_CONNECT_TIMEOUT,
                    Method::GET,
                    "/admin/cluster",
                    HeaderMap::from_iter([(header::AUTHORIZATION, auth)]),
                    None,
                ),
            )
            .await;
            let view = match asked {
                Err(_) => Err(format!("no answer within {MEMBER_TIMEOUT:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok((status, _))) if !status.is_success() => Err(format!("answered {status}")),
                Ok(Ok((_, body))) => serde_json::from_str::<ClusterStatus>(&body)
                    .map_err(|e| format!("unreadable status: {e}")),
            };
            (id, view)
        });
    }
    for (id, view) in futures::future::join_all(asks).await {
        views.insert(id, view);
    }
    views
}

/// One queue's figures for the pages.
struct QueueFigures {
    length: usize,
    backlog: usize,
    in_flight: usize,
    consumers: usize,
    window: u64,
    dead_letters: usize,
    oldest_age_ms: Option<u64>,
    bytes: u64,
}

fn figures(q: &Queue, now_ms: u64) -> QueueFigures {
    QueueFigures {
        length: q.len(),
        backlog: q.backlog(),
        in_flight: q.in_flight_count(),
        consumers: q.groups.values().map(|g| g.consumers.len()).sum(),
        window: q.running_window(),
        dead_letters: q.dead.len(),
        oldest_age_ms: q.oldest_age_ms(now_ms),
        bytes: q.bytes_held(),
    }
}

fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..120_000 => format!("{:.1} s", ms as f64 / 1000.0),
        120_000..7_200_000 => format!("{} min", ms / 60_000),
        _ => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

fn rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.1}"))
}

async fn services_page(
    State(state): State<Arc<AppState>>,
    _reader: Reader,
    Query(q): Query<PageQuery>,
) -> Page {
    let now = state.node.cluster_clock_ms();
    struct Row {
        name: String,
        kind: QueueKind,
        f: QueueFigures,
        puts: u64,
        commits: u64,
        max_length: u64,
        max_payload: u64,
    }
    let rows: Vec<Row> = state.node.read(|st| {
        st.services
            .iter()
            .flat_map(|(name, svc)| {
                [QueueKind::Input, QueueKind::Sink].map(|kind| {
                    let queue = svc.queue(kind);
                    let limits = svc.config.limits(kind);
                    Row {
                        name: name.clone(),
                        kind,
                        f: figures(queue, now),
                        puts: queue.puts_total,
                        commits: queue.commits_total,
                        max_length: limits.max_length,
                        max_payload: limits.max_payload_bytes,
                    }
                })
            })
            .collect()
    });
    state.console_rates.forget_except(&|queue| {
        rows.iter()
            .any(|r| r.name == queue.service && r.kind == queue.kind)
    });
    let body = html! {
        p.actions { a href="/ui/confirm/create-service" { "Create a service" } }
        @if rows.is_empty() { p { "No services." } }
        @else {
            table id="services" {
                tr {
                    th { "service" } th { "queue" } th.n { "length" } th.n { "backlog" } th.n { "in flight" }
                    th.n { "window occupancy" } th.n { "oldest item" } th.n { "puts/s" }
                    th.n { "commits/s" } th.n { "consumers" } th.n { "dead letters" }
                    th.n { "bytes" } th.n { "max length" } th.n { "max payload" }
                }
                @for r in &rows {
                    @let rates = state.console_rates.observe(&QueueRef::new(r.name.clone(), r.kind), r.puts, r.commits);
                    tr id=(format!("svc-{}-{}", r.name, r.kind.as_str())) {
                        td { a href=(format!("/ui/services/{}", r.name)) { (r.name) } }
                        td { (r.kind.as_str()) }
                        td.n.length { (r.f.length) }
                        td.n.backlog { (r.f.backlog) }
                        td.n.in-flight { (r.f.in_flight) }
                        td.n { (occupancy(&r.f)) }
                        td.n { (r.f.oldest_age_ms.map(age).unwrap_or_default()) }
                        td.n { (rate(rates.map(|r| r.0))) }
                        td.n { (rate(rates.map(|r| r.1))) }
                        td.n.consumers { (r.f.consumers) }
                        td.n.dead-letters { (r.f.dead_letters) }
                        td.n { (r.f.bytes) }
                        td.n { (r.max_length) }
                        td.n { (r.max_payload) }
                    }
                }
            }
            p.muted { "Rates are measured between page views (at least a second apart)." }
        }
    };
    page(&state, "Services", q.refresh(), body)
}

fn occupancy(f: &QueueFigures) -> String {
    if f.window == 0 {
        "-".into()
    } else {
        format!(
            "{} / {} ({:.0}%)",
            f.in_flight,
            f.window,
            100.0 * f.in_flight as f64 / f.window as f64
        )
    }
}

async fn service_page(
    State(state): State<Arc<AppState>>,
    _reader: Reader,
    Path(name): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let now = state.node.cluster_clock_ms();
    let lookup = q.request_id.clone().filter(|r| !r.is_empty());
    let body = state.node.read(|st| {
        let svc = st.service(&name)?;
        Some(html! {
            p.actions {
                a href=(format!("/ui/confirm/delete-service?service={name}")) { "Delete this service" }
            }
            form method="get" action=(format!("/ui/services/{name}")) {
                label { "Where is request " input type="text" name="request_id" value=(lookup.clone().unwrap_or_default()) size="40"; }
                input type="hidden" name="refresh" value="0";
                " " button type="submit" { "Look up" }
            }
            @if let Some(rid) = &lookup {
                (where_is(svc.queue(QueueKind::Input), svc.queue(QueueKind::Sink), rid, now))
            }
            @for kind in [QueueKind::Input, QueueKind::Sink] {
                @let queue = svc.queue(kind);
                @let f = figures(queue, now);
                @let k = kind.as_str();
                h2 { (k) " queue" }
                p id=(format!("{k}-summary")) {
                    "length " span.length { (f.length) } " · backlog " (f.backlog) " · in flight " span.in-flight { (f.in_flight) }
                    " · window occupancy " (occupancy(&f))
                    " · oldest " (f.oldest_age_ms.map(age).unwrap_or_else(|| "-".into()))
                    " · dead letters " span.dead-letters { (f.dead_letters) }
                    " · limits: " (svc.config.limits(kind).max_length) " items, "
                    (svc.config.limits(kind).max_payload_bytes) " bytes per payload"
                }
                p.actions {
                    @if let Some(first) = queue.items.keys().next() {
                        a href=(format!("/ui/confirm/truncate?service={name}&queue={k}&before={}", queue.next_index)) {
                            "truncate (remove items " (first) "…" (queue.next_index - 1) ")"
                        }
                    }
                    @if !queue.dead.is_empty() {
                        a href=(format!("/ui/confirm/requeue-dead-letters?service={name}&queue={k}")) { "requeue all dead letters" }
                        a href=(format!("/ui/confirm/purge-dead-letters?service={name}&queue={k}")) { "purge dead letters" }
                    }
                }
                h3 { "Consumers" }
                @if queue.groups.values().all(|g| g.consumers.is_empty()) { p.muted { "none" } }
                @else {
                    table id=(format!("{k}-consumers")) {
                        tr { th { "group" } th { "user" } th.n { "node" } th.n { "window" } th.n { "holds" } th.n { "idle" } th { "state" } }
                        @for (group, g) in &queue.groups {
                            @for (user, c) in &g.consumers {
                                tr {
                                    td.group { (group) } td { (user) } td.n { (c.node) }
                                    td.n { @if c.auto_commit { "auto" } @else { (c.window) } }
                                    td.n.holds { (c.pending) }
                                    td.n { (age(now.saturating_sub(c.last_active_ms))) }
                                    td { @match c.status {
                                        ConsumerStatus::Running => "running",
                                        ConsumerStatus::Leaving { since_ms } => (format!("leaving for {}", age(now.saturating_sub(since_ms)))),
                                    } }
                                }
                            }
                        }
                    }
                }
                h3 { "Oldest items" }
                @if queue.items.is_empty() { p.muted { "none" } }
                @else {
                    table id=(format!("{k}-items")) {
                        tr { th.n { "index" } th { "request id" } th.n { "age" } th.n { "priority" } th.n { "deliveries" } th.n { "bytes" } th { "held by" } }
                        @for it in queue.items.values().take(LISTED) {
                            tr {
                                td.n { (it.index) } td { (it.request_id) }
                                td.n { (age(now.saturating_sub(it.enqueued_ms))) }
                                td.n { (it.priority) } td.n { (it.deliveries) } td.n { (it.data.len()) }
                                td { (holders(queue, it.index)) }
                            }
                        }
                    }
                }
                h3 { "Dead letters" }
                @if queue.dead.is_empty() { p.muted { "none" } }
                @else {
                    table id=(format!("{k}-dead-letters")) {
                        tr { th.n { "index" } th { "request id" } th.n { "deliveries" } th { "reason" } th.n { "bytes" } th { "" } }
                        @for it in queue.dead.values().take(LISTED) {
                            tr {
                                td.n { (it.index) } td.request-id { (it.request_id) } td.n { (it.deliveries) }
                                td { (it.message()) } td.n { (it.data.len()) }
                                td { a href=(format!("/ui/confirm/requeue-dead-letters?service={name}&queue={k}&index={}", it.index)) { "requeue" } }
                            }
                        }
                    }
                }
            }
        })
    });
    match body {
        Some(body) => page(&state, &format!("Service {name}"), q.refresh(), body).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            page(
                &state,
                "No such service",
                0,
                html! { p { "There is no service " (name) "." } },
            ),
        )
            .into_response(),
    }
}

fn holders(queue: &Queue, index: u64) -> String {
    let mut out = String::new();
    for (group, g) in &queue.groups {
        if let Some(user) = g.in_flight.get(&index) {
            if !out.is_empty() {
                out.push_str(", ");
            }
            let _ = write!(out, "{group}/{user}");
        }
    }
    out
}

/// Where a request is: waiting or in flight on the input, dead-lettered,
/// or answered on the sink.
fn where_is(input: &Queue, sink: &Queue, request_id: &str, now: u64) -> Markup {
    let mut found: Vec<String> = Vec::new();
    for index in input.indexes_of_request(request_id) {
        let it = &input.items[&index];
        let held = holders(input, index);
        found.push(if held.is_empty() {
            format!(
                "input item {index}: waiting for {}",
                age(now.saturating_sub(it.enqueued_ms))
            )
        } else {
            format!(
                "input item {index}: in flight to {held}, {} deliveries",
                it.deliveries
            )
        });
    }
    for it in input
        .dead
        .values()
        .filter(|it| it.request_id == *request_id)
    {
        found.push(format!(
            "input dead letter {}: {} deliveries, {}",
            it.index,
            it.deliveries,
            it.message()
        ));
    }
    for index in sink.indexes_of_request(request_id) {
        let it = &sink.items[&index];
        found.push(format!(
            "result on the sink, item {index}: {} bytes, written {} ago",
            it.data.len(),
            age(now.saturating_sub(it.enqueued_ms))
        ));
    }
    html! {
        div id="lookup" {
            @if found.is_empty() {
                p { "Request " code { (request_id) } " is on neither queue (never put, or its result was read and deleted)." }
            } @else {
                ul { @for f in &found { li { (f) } } }
            }
        }
    }
}

// ---- actions ---------------------------------------------------------------

/// The operator actions of the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    CreateService,
    DeleteService,
    PurgeDeadLetters,
    RequeueDeadLetters,
    Truncate,
    DrainNode,
    UndrainNode,
}

impl Action {
    fn parse(s: &str) -> Result<Self, ApiError> {
        Ok(match s {
            "create-service" => Action::CreateService,
            "delete-service" => Action::DeleteService,
            "purge-dead-letters" => Action::PurgeDeadLetters,
            "requeue-dead-letters" => Action::RequeueDeadLetters,
            "truncate" => Action::Truncate,
            "drain-node" => Action::DrainNode,
            "undrain-node" => Action::UndrainNode,
            other => return Err(ApiError::NotFound(format!("no console action {other:?}"))),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Action::CreateService => "create-service",
            Action::DeleteService => "delete-service",
            Action::PurgeDeadLetters => "purge-dead-letters",
            Action::RequeueDeadLetters => "requeue-dead-letters",
            Action::Truncate => "truncate",
            Action::DrainNode => "drain-node",
            Action::UndrainNode => "undrain-node",
        }
    }
}

/// What an action applies to, from the confirmation link and then the form.
#[derive(Debug, Default, Deserialize)]
struct Target {
    service: Option<String>,
    queue: Option<String>,
    index: Option<u64>,
    before: Option<u64>,
    node: Option<u64>,
}

impl Target {
    fn service(&self) -> Result<&str, ApiError> {
        self.service
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::BadRequest("no service named".into()))
    }

    fn queue(&self) -> Result<QueueRef, ApiError> {
        let kind = match self.queue.as_deref() {
            Some("input") | None => QueueKind::Input,
            Some("sink") => QueueKind::Sink,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "queue must be input or sink, not {other:?}"
                )));
            }
        };
        Ok(QueueRef::new(self.service()?.to_string(), kind))
    }

    fn node(&self) -> Result<u64, ApiError> {
        self.node
            .ok_or_else(|| ApiError::BadRequest("no node named".into()))
    }

    fn describe(&self, action: Action) -> Result<String, ApiError> {
        Ok(match action {
            Action::CreateService => "Create a service.".into(),
            Action::DeleteService => format!(
                "Delete service {} with every item, result and dead letter it holds.",
                self.service()?
            ),
            Action::PurgeDeadLetters => format!("Drop every dead letter of {}.", self.queue()?),
            Action::RequeueDeadLetters => match self.index {
                Some(i) => format!(
                    "Put dead letter {i} of {} back on its queue as a new item.",
                    self.queue()?
                ),
                None => format!(
                    "Put every dead letter of {} back on its queue as new items.",
                    self.queue()?
                ),
            },
            Action::Truncate => format!(
                "Remove every item of {} below index {}, in flight or not.",
                self.queue()?,
                self.before
                    .ok_or_else(|| ApiError::BadRequest("no index to truncate before".into()))?
            ),
            Action::DrainNode => format!(
                "Drain node {}: it closes its watch connections (their workers reconnect \
                 through other nodes and take their items over), takes no new watches and \
                 reports not ready, until it is undrained or restarted.",
                self.node()?
            ),
            Action::UndrainNode => format!("Let node {} take watches again.", self.node()?),
        })
    }
}

async fn confirm_page(
    State(state): State<Arc<AppState>>,
    _reader: Reader,
    Path(action): Path<String>,
    Query(target): Query<Target>,
) -> Result<Page, ApiError> {
    let action = Action::parse(&action)?;
    let what = target.describe(action)?;
    let body = html! {
        p id="what" { (what) }
        form.action method="post" action=(format!("/ui/actions/{}", action.name())) {
            @if let Some(s) = &target.service { input type="hidden" name="service" value=(s); }
            @if let Some(q) = &target.queue { input type="hidden" name="queue" value=(q); }
            @if let Some(i) = target.index { input type="hidden" name="index" value=(i); }
            @if let Some(b) = target.before { input type="hidden" name="before" value=(b); }
            @if let Some(n) = target.node { input type="hidden" name="node" value=(n); }
            @if action == Action::CreateService {
                label { "Name " input type="text" name="service" required pattern="[A-Za-z0-9_.\\-]+"; }
                label { "Service token (empty: none) " input type="text" name="token"; }
                label { "Max length " input type="number" name="max_length" min="1" placeholder="default"; }
            }
            label { "Admin token " input type="password" name="admin_token" autocomplete="off"; }
            label { input type="checkbox" name="confirm" value="yes" required; " I confirm" }
            button type="submit" id="confirm-action" { "Run " (action.name()) }
        }
    };
    Ok(page(
        &state,
        &format!("Confirm: {}", action.name()),
        0,
        body,
    ))
}

/// The caller's address, when the listener recorded it.
struct MaybePeer(Option<std::net::SocketAddr>);

impl axum::extract::FromRequestParts<Arc<AppState>> for MaybePeer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(MaybePeer(
            ConnectInfo::<std::net::SocketAddr>::from_request_parts(parts, state)
                .await
                .ok()
                .map(|c| c.0),
        ))
    }
}

/// A posted action form. The target's fields are listed here, not
/// flattened: a flattened form field loses its type (numbers arrive as
/// strings).
#[derive(Debug, Default, Deserialize)]
struct ActionForm {
    #[serde(default)]
    admin_token: String,
    confirm: Option<String>,
    service: Option<String>,
    queue: Option<String>,
    index: Option<u64>,
    before: Option<u64>,
    node: Option<u64>,
    token: Option<String>,
    max_length: Option<String>,
}

impl ActionForm {
    fn target(&self) -> Target {
        Target {
            service: self.service.clone(),
            queue: self.queue.clone(),
            index: self.index,
            before: self.before,
            node: self.node,
        }
    }
}

async fn run_action(
    State(state): State<Arc<AppState>>,
    MaybePeer(peer): MaybePeer,
    Path(action): Path<String>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    let action = match Action::parse(&action) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let outcome = async {
        same_origin(&state, &headers)?;
        let admin = Admin::authorize(&state, peer, form.admin_token.as_bytes(), "/ui/actions")?;
        if form.confirm.as_deref() != Some("yes") {
            return Err(ApiError::BadRequest(
                "not confirmed: tick the confirmation box".into(),
            ));
        }
        let target = &form.target();
        admin.audit(
            &format!("console:{}", action.name()),
            &target.describe(action)?,
        );
        perform(&state, action, &form, &admin).await
    }
    .await;
    match outcome {
        Ok(done) => page(
            &state,
            "Done",
            0,
            html! { p id="outcome" { (done) } p { a href=(back_link(&form.target())) { "Back" } } },
        )
        .into_response(),
        Err(e) => {
            let status = e.status();
            let mut response = (
                status,
                page(
                    &state,
                    "Refused",
                    0,
                    html! { p.bad id="outcome" { (status.as_u16()) ": " (e.to_string()) } p { a href=(back_link(&form.target())) { "Back" } } },
                ),
            )
                .into_response();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                response
                    .headers_mut()
                    .insert("retry-after", header::HeaderValue::from_static("1"));
            }
            response
        }
    }
}

fn back_link(target: &Target) -> String {
    match (&target.service, target.node) {
        (Some(s), _) if !s.is_empty() => format!("/ui/services/{s}"),
        (_, Some(_)) => "/ui".into(),
        _ => "/ui/services".into(),
    }
}

/// A console action must come from this node's own pages: a browser names
/// the page a form was posted from in `Origin` (and says `same-origin` in
/// `Sec-Fetch-Site`); a request that shows neither is refused, so no other
/// site's page can post an action. While no admin token is configured
/// (actions are then open to this machine), `Host` must also be a loopback
/// address or `localhost`: a page served under another name that resolves
/// to this machine (DNS rebinding) gets no further.
fn same_origin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let origin_matches = origin.is_some_and(|origin| {
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or(origin);
        !host.is_empty() && origin_host == host
    });
    let allowed = match (origin, fetch_site) {
        (Some(_), _) => origin_matches,
        (None, Some(site)) => site == "same-origin",
        (None, None) => false,
    };
    if !allowed {
        return Err(ApiError::Forbidden(format!(
            "a console action must come from this node's own pages (origin {origin:?}, \
             host {host:?}); use the admin API for scripts"
        )));
    }
    if state.config.admin_token.is_empty() {
        let name = host
            .rsplit_once(':')
            .map_or(host, |(name, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            })
            .trim_start_matches('[')
            .trim_end_matches(']');
        let local = name == "localhost"
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !local {
            return Err(ApiError::Forbidden(format!(
                "with no admin token configured, console actions are taken only through a \
                 loopback address, not {host:?}"
            )));
        }
    }
    Ok(())
}

async fn perform(
    state: &Arc<AppState>,
    action: Action,
    form: &ActionForm,
    admin: &Admin,
) -> Result<String, ApiError> {
    let target = &form.target();
    let reply = match action {
        Action::CreateService => {
            let max_length = match form.max_length.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(n) => Some(n.parse::<u64>().map_err(|_| {
                    ApiError::BadRequest(format!("max length must be a number, not {n:?}"))
                })?),
            };
            let request = ServiceRequest {
                name: target.service()?.to_string(),
                token: form.token.clone().unwrap_or_default(),
                max_length,
                ..ServiceRequest::default()
            };
            let name = request.name.clone();
            let reply = state
                .node
                .propose_admin(Command::CreateService {
                    name: name.clone(),
                    config: request.to_config(),
                })
                .await?;
            return ok_or_rejected(reply, format!("Service {name} created."));
        }
        Action::DeleteService => {
            let name = target.service()?.to_string();
            let reply = state
                .node
                .propose_admin(Command::DeleteService { name: name.clone() })
                .await?;
            return ok_or_rejected(reply, format!("Service {name} deleted."));
        }
        Action::PurgeDeadLetters => {
            let queue = target.queue()?;
            state
                .node
                .propose_admin(Command::PurgeDeadLetters {
                    queue: queue.clone(),
                })
                .await?
        }
        Action::RequeueDeadLetters => {
            let queue = target.queue()?;
            let reply = state
                .node
                .propose_admin(Command::RequeueDeadLetters {
                    queue: queue.clone(),
                    indexes: target.index.into_iter().collect(),
                })
                .await?;
            return match reply {
                Reply::Items(frames) => Ok(format!(
                    "{} dead letter(s) of {queue} requeued, now items {}.",
                    frames.len(),
                    frames
                        .iter()
                        .map(|f| f.index.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                other => ok_or_rejected(other, String::new()),
            };
        }
        Action::Truncate => {
            let queue = target.queue()?;
            let before = target
                .before
                .ok_or_else(|| ApiError::BadRequest("no index to truncate before".into()))?;
            state
                .node
                .propose_admin(Command::Truncate {
                    queue: queue.clone(),
                    before,
                })
                .await?
        }
        Action::DrainNode | Action::UndrainNode => {
            let node = target.node()?;
            let drain = action == Action::DrainNode;
            if node == state.node.id {
                super::admin::set_draining(state, drain, admin);
            } else {
                let api = state.node.member_api_addr(node).ok_or_else(|| {
                    ApiError::NotFound(format!("node {node} is not a member with an HTTP address"))
                })?;
                let auth = header::HeaderValue::from_str(&form.admin_token).map_err(|_| {
                    ApiError::BadRequest("the admin token is not a header value".into())
                })?;
                let method = if drain { Method::POST } else { Method::DELETE };
                let (status, text) = call_node(
                    &api,
                    state.config.client_tls.as_ref(),
                    MEMBER_CONNECT_TIMEOUT,
                    method,
                    "/admin/node/drain",
                    HeaderMap::from_iter([(header::AUTHORIZATION, auth)]),
                    None,
                )
                .await
                .map_err(|e| ApiError::Unavailable(format!("node {node} at {api}: {e}")))?;
                if !status.is_success() {
                    return Err(ApiError::Unavailable(format!(
                        "node {node} answered {status}: {}",
                        text.trim()
                    )));
                }
            }
            return Ok(if drain {
                format!("Node {node} is draining.")
            } else {
                format!("Node {node} takes watches again.")
            });
        }
    };
    ok_or_rejected(reply, format!("{} done.", action.name()))
}

fn ok_or_rejected(reply: Reply, done: String) -> Result<String, ApiError> {
    match reply {
        Reply::Rejected(r) => Err(r.into()),
        Reply::Batch(replies) => {
            for r in replies {
                if let Reply::Rejected(r) = r {
                    return Err(r.into());
                }
            }
            Ok(done)
        }
        _ => Ok(done),
    }
}
