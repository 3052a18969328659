//! Security of the admin API, driven through the HTTP router in process
//! (`MockConnectInfo` stands in for the caller's address).

use std::time::Duration;

use axum::http::StatusCode;

use crate::harness::{Cluster, call, eventually};

const LOCAL: [u8; 4] = [127, 0, 0, 1];
const REMOTE: [u8; 4] = [10, 1, 2, 3];

/// Finding 1: with no admin token the admin API answers this machine only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_only_local_callers_are_admins() {
    let mut c = Cluster::new(1, 20_000).await;
    let body = r#"{"name":"demo","token":"t"}"#;
    let (status, text) = call(&c, 1, REMOTE, "POST", "/admin/services", None, body).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(text.contains("--admin-token"), "{text}");
    let (status, _) = call(
        &c,
        1,
        REMOTE,
        "DELETE",
        "/admin/cluster/members/1",
        None,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(c.node(1).node.read(|s| s.service("demo").is_none()));
    let (status, text) = call(&c, 1, LOCAL, "POST", "/admin/services", None, body).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    c.stop(1).await;
}

/// Finding 1: with a token, nobody without it gets in, and re-creating an
/// existing service (to take it over with a new token) is a 409 that
/// changes nothing; updates are an explicit PUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_service_cannot_be_taken_over_by_re_creating_it() {
    let mut c = Cluster::new(1, 20_000).await;
    c.config.admin_token = "admin-secret".into();
    c.stop(1).await;
    c.restart(1).await;
    let admin = Some("admin-secret");
    let create = r#"{"name":"demo","token":"owner"}"#;
    let takeover = r#"{"name":"demo","token":"intruder"}"#;
    for from in [LOCAL, REMOTE] {
        let (status, _) = call(&c, 1, from, "POST", "/admin/services", None, create).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call(
            &c,
            1,
            from,
            "POST",
            "/admin/services",
            Some("admin-secreT"),
            create,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, text) = call(&c, 1, REMOTE, "POST", "/admin/services", admin, create).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let (status, text) = call(&c, 1, REMOTE, "POST", "/admin/services", admin, takeover).await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    let token = |c: &Cluster| {
        c.node(1)
            .node
            .read(|s| s.service("demo").map(|s| s.config.token.clone()))
    };
    assert_eq!(token(&c).as_deref(), Some("owner"));
    let (status, text) = call(
        &c,
        1,
        REMOTE,
        "PUT",
        "/admin/services/demo",
        admin,
        takeover,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(token(&c).as_deref(), Some("intruder"));
    c.stop(1).await;
}

/// Finding 4: an admin body is refused before it is buffered, and the token
/// is checked before the body is read at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bodies_are_small_and_read_only_after_authentication() {
    let mut c = Cluster::new(1, 20_000).await;
    c.config.admin_token = "admin-secret".into();
    c.stop(1).await;
    c.restart(1).await;
    let big = format!(r#"{{"name":"demo","token":"{}"}}"#, "x".repeat(1 << 20));
    let (status, _) = call(&c, 1, REMOTE, "POST", "/admin/services", None, &big).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(
        &c,
        1,
        REMOTE,
        "POST",
        "/admin/services",
        Some("admin-secret"),
        &big,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    c.stop(1).await;
}

/// Finding 8: with a status token, topology and metrics need it (or the
/// admin token); without one they stay open for scrapers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_routes_can_require_a_token() {
    let mut c = Cluster::new(1, 20_000).await;
    for path in ["/metrics", "/admin/cluster"] {
        assert_eq!(
            call(&c, 1, REMOTE, "GET", path, None, "").await.0,
            StatusCode::OK
        );
    }
    c.config.status_token = "scraper".into();
    c.config.admin_token = "admin-secret".into();
    c.stop(1).await;
    c.restart(1).await;
    for path in ["/metrics", "/admin/cluster"] {
        assert_eq!(
            call(&c, 1, REMOTE, "GET", path, None, "").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&c, 1, REMOTE, "GET", path, Some("nope"), "").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&c, 1, REMOTE, "GET", path, Some("scraper"), "")
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            call(&c, 1, REMOTE, "GET", path, Some("admin-secret"), "")
                .await
                .0,
            StatusCode::OK
        );
    }
    c.stop(1).await;
}

/// The state digest encodes the whole state under the apply lock: only an
/// administrator may ask for it (a remote caller without the token gets 401
/// even where status routes are open), and it answers the applied index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_digest_is_for_administrators() {
    let c = Cluster::configured(1, |c| c.config.admin_token = "the-admin-token".into()).await;
    // A new leader applies its first entry a moment after it is elected.
    eventually("the first entry applied", Duration::from_secs(10), || {
        c.node(1).node.status().applied.is_some()
    })
    .await;
    let (status, _) = call(&c, 1, REMOTE, "GET", "/admin/cluster", None, "").await;
    assert_eq!(status, StatusCode::OK, "status routes are open here");
    let (status, _) = call(&c, 1, REMOTE, "GET", "/admin/cluster/digest", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let before = c.node(1).node.status().applied.unwrap();
    let (status, text) = call(
        &c,
        1,
        REMOTE,
        "GET",
        "/admin/cluster/digest",
        Some("the-admin-token"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let after = c.node(1).node.status().applied.unwrap();
    let digest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let applied = digest["applied"].as_u64().expect(&text);
    assert!(
        (before..=after).contains(&applied),
        "{text}: applied {before}..={after} around the call"
    );
}
