//! Random JSON bodies against the HTTP API of a real coordinator: every answer is a 2xx or a
//! 4xx with the error body, never a 5xx or a dropped connection, and honest work still runs.
//! Request targets too long for it are refused with the error body too, naming the limit.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use tether_testkit::*;
use tether_worker::Executors;

use crate::support::{connected_worker, coordinator};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        prop::sample::select(vec!["sleep", "command", "t-1", "", "high"]).prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "tasks",
                    "kind",
                    "config",
                    "priority",
                    "requires",
                    "tags",
                    "timeout_ms",
                    "max_attempts",
                    "name",
                    "task_id",
                    "x",
                ])
                .prop_map(str::to_owned),
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[tokio::test]
async fn random_json_bodies_get_a_clear_answer_and_never_a_server_error() {
    let (_dir, c) = coordinator().await;
    let w = connected_worker(&c.ws_url(), "w-fuzz").await;
    let http = loopback_client(reqwest::Client::builder());
    let base = format!("http://{}", c.addr);
    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let mut runner = TestRunner::new(Config::with_cases(cases));
    let strategy = (json_value(), any::<Vec<u8>>(), 0u8..4);
    for _ in 0..cases {
        let (v, raw, how) = strategy.new_tree(&mut runner).expect("a case").current();
        let body: Vec<u8> = match how {
            0 => v.to_string().into_bytes(),
            1 => json!({ "tasks": [v] }).to_string().into_bytes(),
            2 => json!({ "kind": "sleep", "config": v })
                .to_string()
                .into_bytes(),
            _ => raw,
        };
        for path in ["/api/v1/tasks", "/api/v1/tasks/t-none/cancel"] {
            let r = http
                .post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .expect("an answer, not a dropped connection");
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            assert!(
                status < 500,
                "POST {path} {:?} -> {status} {text}",
                String::from_utf8_lossy(&body)
            );
            if status >= 400 {
                let e: Value = serde_json::from_str(&text).expect("a JSON error body");
                assert!(e["error"]["code"].is_string(), "{text}");
            }
        }
    }
    // The fuzz queued plenty of valid tasks: cancel them, then honest work still runs.
    let client = c.client();
    for status in ["queued", "running"] {
        let (_, v) = client
            .get(&format!("/api/v1/tasks?status={status}&limit=100000"))
            .await;
        for t in v.as_array().cloned().unwrap_or_default() {
            let id = t["task_id"].as_str().expect("task id");
            let (s, _) = client
                .post(&format!("/api/v1/tasks/{id}/cancel"), &json!({}))
                .await;
            assert!(s < 500, "cancel {id}: {s}");
        }
    }
    let mut cfg = fast_worker_config(&c.ws_url(), "w-honest");
    cfg.capabilities = vec!["honest-only".into()];
    let honest = spawn_worker(cfg, Executors::builtin());
    let mut spec = sleep_task(20, 1, 0);
    spec.requires = vec!["honest-only".into()];
    let ids = c.client().submit(&[spec]).await;
    c.client().wait_status(&ids[0], "completed").await;
    honest.stop().await.expect("clean stop");
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// Sends `GET target` as raw HTTP/1.1 (`Connection: close`; a target this long no HTTP client
/// builds), with `token` as a bearer token, and reads the whole answer: its status and body.
async fn raw_get(addr: std::net::SocketAddr, target: &str, token: &str) -> (u16, String) {
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    let (status, _, body) = crate::support::raw_http(addr, &request).await;
    (status, body)
}

/// A request target (path and query) over the API's limit is refused `414 uri_too_long` with
/// the error body of every refusal, naming the limit and the target's length, whatever its
/// path and before its token is looked at; one at the limit is read by the API. Up to hyper's
/// own bound (65,534 bytes) the refusal is the API's: hyper's, past it, is a bare `414` with
/// an empty body, which every request the API's clients make used to get between the two.
#[tokio::test]
async fn a_request_target_over_the_limit_is_refused_414_with_the_error_body_naming_it() {
    use tether_coordinator::auth::{ApiTokens, Scope};
    use tether_coordinator::http::MAX_TARGET_BYTES;
    const TOKEN: &str = "read-token-of-the-target-test";
    let (_dir, c) = crate::support::coordinator_with(|cfg| {
        let mut tokens = ApiTokens::default();
        let token = tether_proto::auth::Secret::new(TOKEN.as_bytes()).expect("token");
        tokens.add(&token, Scope::Read);
        cfg.api_tokens = Some(tokens);
    })
    .await;
    let target = |prefix: &str, len: usize| {
        let pad = len.checked_sub(prefix.len()).expect("room for the prefix");
        format!("{prefix}{}", "x".repeat(pad))
    };
    // At the limit: read, and answered by the route (or its absence) as any other request.
    let (status, body) = raw_get(c.addr, &target("/nope/", MAX_TARGET_BYTES), TOKEN).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = raw_get(c.addr, &target("/nope/", MAX_TARGET_BYTES), "wrong").await;
    assert_eq!(status, 401, "{body}");
    for (prefix, len, token) in [
        ("/nope/", MAX_TARGET_BYTES + 1, TOKEN),
        ("/api/v1/tasks?ids=", MAX_TARGET_BYTES + 1, TOKEN),
        ("/api/v1/tasks/", 60 * 1024, "wrong"),
        ("/api/v1/worker/w-1/ws?", 60 * 1024, TOKEN),
        ("/healthz?", u16::MAX as usize - 1, TOKEN),
    ] {
        let (status, body) = raw_get(c.addr, &target(prefix, len), token).await;
        assert_eq!(status, 414, "{prefix} ({len} bytes): {body}");
        let e: Value = serde_json::from_str(&body).expect("a JSON error body");
        assert_eq!(e["error"]["code"], "uri_too_long", "{body}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("is {len} bytes"))
                && message.contains(&format!("reads at most {MAX_TARGET_BYTES}")),
            "{body}"
        );
    }
    // Past hyper's bound, hyper answers before the API: the status stands.
    let (status, _) = raw_get(c.addr, &target("/nope/", u16::MAX as usize), TOKEN).await;
    assert_eq!(status, 414);
    let (status, _) = c.client().get("/healthz").await;
    assert_eq!(status, 200, "still serving");
    c.stop().await;
}
