//! Bounds on what one request may write into the replicated log besides its
//! payload, driven through the HTTP router in process.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::cluster::Cluster;

async fn call(c: &Cluster, req: Request<Body>) -> (StatusCode, String) {
    let resp = eddy::api::router(c.node(1).app_state.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn queue_length(c: &Cluster) -> usize {
    c.node(1).node.read(|s| {
        s.service("svc")
            .map_or(0, |svc| svc.input.len() + svc.sink.len())
    })
}

/// Finding 7: a 60 KB consumer-group header, too many tags or a huge tag
/// are refused with 400 before anything is proposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_and_tags_are_bounded() {
    let mut c = Cluster::new(1, 20_000).await;
    crate::cluster::create_service(c.node(1)).await;
    let big_group = "g".repeat(60_000);
    let commit = Request::builder()
        .method("PUT")
        .uri("/api/predict/svc?_index_=1")
        .header("X-EAS-QueueService-Redis-Gid", &big_group)
        .body(Body::empty())
        .unwrap();
    let (status, text) = call(&c, commit).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let watch = Request::builder()
        .uri("/api/predict/svc?_watch_=true")
        .header("X-EAS-QueueService-Redis-Gid", &big_group)
        .body(Body::empty())
        .unwrap();
    let (status, _) = call(&c, watch).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(c.node(1).node.read(|s| {
        s.service("svc")
            .is_some_and(|svc| svc.input.groups.keys().all(|g| g.len() <= 128))
    }));

    let many: String = (0..40).map(|i| format!("k{i}=v&")).collect();
    let long_value = format!("k={}", "v".repeat(5_000));
    for query in [many, long_value] {
        let put = Request::builder()
            .method("POST")
            .uri(format!("/api/predict/svc?{query}"))
            .body(Body::from("payload"))
            .unwrap();
        let (status, text) = call(&c, put).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    }
    assert_eq!(queue_length(&c), 0, "nothing was stored");
    let ok = Request::builder()
        .method("POST")
        .uri("/api/predict/svc?k=v")
        .body(Body::from("payload"))
        .unwrap();
    assert_eq!(call(&c, ok).await.0, StatusCode::OK);
    c.stop(1).await;
}
