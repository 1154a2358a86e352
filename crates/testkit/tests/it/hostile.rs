//! Hostile clients over real sockets. Each test attacks the coordinator, asserts the clear
//! refusal, and in the same test an honest worker keeps working with nothing lost.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tether_coordinator::auth::WorkerAuth;
use tether_proto::auth::Secret;
use tether_proto::{TaskId, TaskSpec};
use tether_testkit::*;
use tether_worker::{AgentError, ConnState, Executors};
use tokio_tungstenite::tungstenite::Message;

use crate::raw::{Raw, counter};

fn fleet_secret() -> Secret {
    Secret::new(b"fleet secret for the hostile tests").expect("secret")
}

/// Submits `n` short sleep tasks and waits until each completed with exactly one result.
async fn honest_work_completes(client: &Client, n: usize) -> Vec<TaskId> {
    let specs: Vec<TaskSpec> = (0..n).map(|_| sleep_task(50, 2, 1)).collect();
    let ids = client.submit(&specs).await;
    for id in &ids {
        client.wait_status(id, "completed").await;
        let results = client.results(id).await;
        assert_eq!(results.len(), 1, "task {id}: {results:?}");
    }
    ids
}

async fn authed_coordinator(dir: &std::path::Path) -> TestCoordinator {
    let mut cfg = fast_coordinator_config(dir.to_owned());
    cfg.auth = Some(WorkerAuth::fleet(fleet_secret()));
    spawn_coordinator_with(cfg, None).await
}

/// An honest worker without a secret, connected.
async fn connected_honest_worker(c: &TestCoordinator) -> TestWorker {
    let w = spawn_worker(
        fast_worker_config(&c.ws_url(), "honest"),
        Executors::builtin(),
    );
    w.wait_state(|s| s == ConnState::Connected).await;
    w
}

fn honest_worker(c: &TestCoordinator, id: &str) -> TestWorker {
    let mut cfg = fast_worker_config(&c.ws_url(), id);
    cfg.secret = Some(fleet_secret());
    spawn_worker(cfg, Executors::builtin())
}

#[tokio::test]
async fn a_wrong_or_missing_secret_stops_the_worker_for_good_and_honest_workers_keep_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = authed_coordinator(dir.path()).await;
    let honest = honest_worker(&c, "honest");
    honest.wait_state(|s| s == ConnState::Connected).await;

    let mut wrong = fast_worker_config(&c.ws_url(), "honest");
    wrong.secret = Some(Secret::new(b"not the fleet secret at all").expect("secret"));
    let wrong = spawn_worker(wrong, Executors::builtin());
    let none = spawn_worker(
        fast_worker_config(&c.ws_url(), "no-secret"),
        Executors::builtin(),
    );
    for (w, expect) in [
        (wrong, "authentication failed: signature does not match"),
        (
            none,
            "requires authentication and this worker has no secret",
        ),
    ] {
        let end = tokio::time::timeout(DEADLINE, w.join)
            .await
            .expect("the refused worker stops")
            .expect("agent task");
        match end {
            Err(AgentError::Refused(msg)) => assert!(msg.contains(expect), "{msg}"),
            other => panic!("expected a permanent refusal, got {other:?}"),
        }
        assert_eq!(w.handle.state(), ConnState::Failed);
        assert_eq!(w.handle.registrations(), 0);
    }

    honest_work_completes(&c.client(), 4).await;
    let o = c.client().overview().await;
    // Each tried on three fresh connections (a single refusal may be a damaged frame) before
    // it stopped: the wrong secret's signed registrations and the unsigned ones of the worker
    // without a secret (which sends its registration without waiting for the welcome) were
    // refused alike, six in all.
    assert_eq!(counter(&o, "auth_failures"), 6, "{o}");
    // The impostor using the honest id never displaced the honest session.
    assert_eq!(counter(&o, "sessions_replaced"), 0, "{o}");
    assert_eq!(honest.handle.registrations(), 1);
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn every_reconnect_authenticates_again_with_a_fresh_nonce() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = authed_coordinator(dir.path()).await;
    let relay = Relay::start(c.addr).await;
    let mut cfg = fast_worker_config(&relay.url(), "roamer");
    cfg.secret = Some(fleet_secret());
    let w = spawn_worker(cfg, Executors::builtin());
    w.wait_state(|s| s == ConnState::Connected).await;
    relay.cut();
    w.wait_state(|s| s != ConnState::Connected).await;
    relay.restore();
    wait_for("a second registration", DEADLINE, || async {
        (w.handle.registrations() >= 2).then_some(())
    })
    .await;
    honest_work_completes(&c.client(), 2).await;
    let o = c.client().overview().await;
    assert!(counter(&o, "auth_ok") >= 2, "{o}");
    assert_eq!(counter(&o, "auth_failures"), 0, "{o}");
    w.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn per_worker_secrets_from_a_directory_override_the_fleet_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = tempfile::tempdir().expect("secrets");
    std::fs::write(
        secrets.path().join("special"),
        "the special worker's own secret\n",
    )
    .expect("write");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.auth = Some(WorkerAuth {
        fleet: Some(fleet_secret().into()),
        dir: Some(secrets.path().to_owned()),
        max_skew: Duration::from_secs(30),
        message_mac: false,
    });
    let c = spawn_coordinator_with(cfg, None).await;
    // The fleet secret no longer works for a worker with its own file...
    let mut fleet_cfg = fast_worker_config(&c.ws_url(), "special");
    fleet_cfg.secret = Some(fleet_secret());
    let refused = spawn_worker(fleet_cfg, Executors::builtin());
    let end = tokio::time::timeout(DEADLINE, refused.join)
        .await
        .expect("stops")
        .expect("agent task");
    assert!(matches!(end, Err(AgentError::Refused(_))), "{end:?}");
    // ...its own does, and other workers still use the fleet secret.
    let mut own = fast_worker_config(&c.ws_url(), "special");
    own.secret = Some(Secret::new(b"the special worker's own secret").expect("secret"));
    let special = spawn_worker(own, Executors::builtin());
    let other = honest_worker(&c, "ordinary");
    special.wait_state(|s| s == ConnState::Connected).await;
    other.wait_state(|s| s == ConnState::Connected).await;
    honest_work_completes(&c.client(), 4).await;
    // A worker whose own file is unusable (too short) is refused as any other: the answer
    // says nothing of the file, its length or that it exists.
    std::fs::write(secrets.path().join("short"), "abc").expect("write");
    let mut short = Raw::connect(&c, "short").await;
    let reg = short.registration(Some(&fleet_secret()), &[]);
    short.send(&reg).await;
    let e = short
        .next_error("unauthorized", "signature does not match")
        .await;
    assert!(!e.to_string().contains("bytes"), "{e}");
    assert_eq!(short.close_code().await, Some(4001));
    special.stop().await.expect("clean stop");
    other.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn a_worker_id_without_a_secret_answers_exactly_like_one_with_so_ids_cannot_be_probed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = tempfile::tempdir().expect("secrets");
    std::fs::write(
        secrets.path().join("known"),
        "the known worker's own secret\n",
    )
    .expect("write");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.auth = Some(WorkerAuth {
        fleet: None,
        dir: Some(secrets.path().to_owned()),
        max_skew: Duration::from_secs(30),
        message_mac: false,
    });
    let c = spawn_coordinator_with(cfg, None).await;
    let wrong = Secret::new(b"a guess at some worker's secret").expect("secret");
    // What each id is told for no signature, a malformed one and a wrong one.
    let mut told = Vec::new();
    for id in ["known", "unknown"] {
        let mut answers = Vec::new();
        for signature in ["none", "malformed", "signed with the wrong secret"] {
            let mut raw = Raw::connect(&c, id).await;
            let mut reg = raw.registration(Some(&wrong), &[]);
            match signature {
                "none" => drop(reg.as_object_mut().expect("object").remove("signature")),
                "malformed" => reg["signature"] = json!("00ff"),
                _ => {}
            }
            raw.send(&reg).await;
            let e = raw.next_of("error").await;
            assert_eq!(raw.close_code().await, Some(4001), "{id}: {e}");
            answers.push((e["code"].clone(), e["message"].clone()));
        }
        told.push(answers);
    }
    assert_eq!(told[0], told[1], "the answers tell the ids apart");
    c.stop().await;
}

/// Ids long enough that the refusal's reason, naming both, passes what a close frame
/// carries: the reason is cut, and the code still reaches the peer (a close frame over 125
/// bytes is a protocol error to it, and the 4003 it carried was lost).
#[tokio::test]
async fn a_refusal_naming_long_ids_still_closes_with_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let mut impostor = Raw::connect(&c, &"m".repeat(60)).await;
    let mut reg = impostor.registration(None, &[]);
    reg["worker_id"] = json!("h".repeat(60));
    impostor.send(&reg).await;
    assert_eq!(impostor.close_code().await, Some(4003));
    c.stop().await;
}

/// A registration saying more of the worker than it may (too many tags, a name too long, a
/// boot id of a kilobyte) is refused with why, and closed with 4002 (fix the worker's
/// configuration): what it says is kept, shown and sent to every event stream.
#[tokio::test]
async fn a_registration_out_of_bounds_is_refused_with_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let tags: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let cases: [(&str, Value, &str); 3] = [
        ("tags", Value::Object(tags), "65 tags; at most 64"),
        ("capabilities", json!(["c".repeat(257)]), "257 bytes"),
        ("boot_id", json!("b".repeat(1024)), "boot_id of 1024 bytes"),
    ];
    for (field, value, why) in cases {
        let mut raw = Raw::connect(&c, "bounded").await;
        let mut reg = raw.registration(None, &[]);
        reg[field] = value;
        raw.send(&reg).await;
        let e = raw.next_of("error").await;
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains(why)),
            "{field}: {e}"
        );
        assert_eq!(raw.close_code().await, Some(4002), "{field}");
    }
    // Within bounds, the same worker registers.
    let mut raw = Raw::connect(&c, "bounded").await;
    let mut reg = raw.registration(None, &[]);
    reg["capabilities"] = json!(["c".repeat(256)]);
    raw.send(&reg).await;
    raw.next_of("registration_ack").await;
    c.stop().await;
}

#[tokio::test]
async fn a_registration_naming_another_worker_is_closed_with_4003_and_that_worker_is_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let honest = spawn_worker(
        fast_worker_config(&c.ws_url(), "honest"),
        Executors::builtin(),
    );
    honest.wait_state(|s| s == ConnState::Connected).await;

    // A connection on its own path claims to be "honest" in its registration.
    let mut impostor = Raw::connect(&c, "mallory").await;
    let mut reg = impostor.registration(None, &[]);
    reg["worker_id"] = json!("honest");
    impostor.send(&reg).await;
    assert_eq!(impostor.close_code().await, Some(4003));

    // "honest" keeps its one session; "mallory" (without authentication, whoever connects on
    // that path) never registered, and is not listed once its connection has ended; the work
    // goes to the honest worker.
    let workers = wait_for("mallory's session to end", DEADLINE, || async {
        let workers: Vec<serde_json::Value> = c.client().get_as("/api/v1/workers").await;
        (!workers.iter().any(|w| w["worker_id"] == "mallory")).then_some(workers)
    })
    .await;
    let h = workers
        .iter()
        .find(|w| w["worker_id"] == "honest")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&h["state"], &h["sessions"]),
        (&json!("connected"), &json!(1)),
        "{h}"
    );
    assert_eq!(workers.len(), 1, "{workers:?}");
    honest_work_completes(&c.client(), 2).await;
    assert_eq!(honest.handle.registrations(), 1);
    assert_eq!(honest.handle.executions(), 2);
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn a_replayed_or_repeated_handshake_is_refused_and_the_honest_session_is_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = authed_coordinator(dir.path()).await;
    let honest = honest_worker(&c, "honest");
    honest.wait_state(|s| s == ConnState::Connected).await;

    // An eavesdropper captured a valid signed registration of "victim" on one connection...
    let mut first = Raw::connect(&c, "victim").await;
    let nonce = first.welcome["nonce"].as_str().expect("a nonce").to_owned();
    assert_eq!(nonce.len(), 64);
    let captured = first.registration(Some(&fleet_secret()), &[]);
    first.send(&captured).await;
    assert_eq!(
        first.next_of("registration_ack").await["worker_id"],
        "victim"
    );
    // ...sending it again on the same session is refused (the nonce is used)...
    first.send(&captured).await;
    first.next_error("unauthorized", "").await;
    drop(first);
    // ...and replaying it on a new connection meets a new nonce: refused, closed with 4001.
    let mut replay = Raw::connect(&c, "victim").await;
    assert_ne!(replay.welcome["nonce"].as_str(), Some(nonce.as_str()));
    replay.send(&captured).await;
    replay.next_error("unauthorized", "").await;
    assert_eq!(replay.close_code().await, Some(4001));
    // An unsigned registration and other frames before it are refused too.
    let mut unsigned = Raw::connect(&c, "victim").await;
    unsigned
        .send(&json!({"type": "task_state", "seq": 1, "task_id": "t-x", "attempt": 1, "state": {}, "timestamp": chrono::Utc::now()}))
        .await;
    unsigned.next_error("unexpected", "").await;
    let reg = unsigned.registration(None, &[]);
    unsigned.send(&reg).await;
    unsigned.next_error("unauthorized", "no signature").await;
    assert_eq!(unsigned.close_code().await, Some(4001));

    honest_work_completes(&c.client(), 3).await;
    let o = c.client().overview().await;
    assert_eq!(counter(&o, "auth_failures"), 3, "{o}");
    assert_eq!(honest.handle.registrations(), 1);
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn forged_results_for_another_workers_task_or_an_attempt_not_held_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let honest = connected_honest_worker(&c).await;
    let client = c.client();
    // A long task leased to the honest worker.
    let victim = client.submit(&[sleep_task(2000, 20, 0)]).await[0].clone();
    client.wait_status(&victim, "running").await;

    let mut m = Raw::connect(&c, "mallory").await;
    let reg = m.registration(None, &["mallory-only"]);
    m.send(&reg).await;
    m.next_of("registration_ack").await;
    let ts = chrono::Utc::now();
    let forged = |seq: u64, task: &str, attempt: u64| {
        json!({"type": "task_result", "seq": seq, "task_id": task, "attempt": attempt,
               "outcome": "completed", "result": {"forged": true},
               "started_at": ts, "finished_at": ts, "duration_ms": 1, "timestamp": ts})
    };
    // 1. someone else's task, at the attempt the other worker holds
    m.send(&forged(1, victim.as_str(), 1)).await;
    let got = m.next_of_each(&["task_result_ack", "error"]).await;
    assert_eq!(got[0]["disposition"], "rejected", "{got:?}");
    assert_eq!(got[1]["code"], "not_leased", "{got:?}");
    // 2. state and checkpoints for it are refused alike
    m.send(
        &json!({"type": "task_state", "seq": 2, "task_id": victim, "attempt": 1,
                   "state": {"progress": 100}, "timestamp": ts}),
    )
    .await;
    assert_eq!(m.next_of("task_state_ack").await["disposition"], "rejected");
    m.send(
        &json!({"type": "checkpoint", "seq": 3, "task_id": victim, "attempt": 1,
                   "checkpoint_id": "c-forged", "size": 1, "chunks": 1, "timestamp": ts}),
    )
    .await;
    assert_eq!(m.next_of("checkpoint_ack").await["disposition"], "rejected");
    // 3. its own task, at an attempt it does not hold
    let mut spec = sleep_task(50, 1, 0);
    spec.requires = vec!["mallory-only".into()];
    let own = client.submit(&[spec]).await[0].clone();
    let a = m.next_of("task_assignment").await;
    assert_eq!(a["task_id"], own.as_str());
    assert_eq!(a["attempt"], 1);
    for (seq, attempt) in [(4, 2), (5, 0)] {
        m.send(&forged(seq, own.as_str(), attempt)).await;
        let ack = m.next_of("task_result_ack").await;
        assert_eq!(ack["disposition"], "rejected", "attempt {attempt}: {ack}");
    }
    // ...while the attempt it holds is recorded.
    m.send(&forged(6, own.as_str(), 1)).await;
    assert_eq!(
        m.next_of("task_result_ack").await["disposition"],
        "recorded"
    );

    let t = client.wait_status(&victim, "completed").await;
    assert_eq!(t["attempts"][0]["worker"], "honest");
    let results = client.results(&victim).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["body"]["result"]["steps"], 20, "{results:?}");
    let o = client.overview().await;
    assert!(counter(&o, "rejected") >= 5, "{o}");
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn the_http_api_needs_a_token_of_the_right_scope_and_workers_are_unaffected() {
    use tether_coordinator::auth::{ApiTokens, Scope};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    let mut tokens = ApiTokens::default();
    tokens.add(
        &Secret::new(b"admin-token-for-tests").expect("t"),
        Scope::Admin,
    );
    tokens.add(
        &Secret::new(b"read-token-for-tests").expect("t"),
        Scope::Read,
    );
    cfg.api_tokens = Some(tokens);
    let c = spawn_coordinator_with(cfg, None).await;
    let base = format!("http://{}", c.addr);
    let anonymous = Client::new(&base);
    let wrong = Client::with_token(&base, "admin-token-for-tests-but-not");
    let reader = Client::with_token(&base, "read-token-for-tests");
    let admin = Client::with_token(&base, "admin-token-for-tests");
    let body = json!({"tasks": [sleep_task(50, 1, 0)]});
    for (who, client) in [("anonymous", &anonymous), ("wrong", &wrong)] {
        let (s, v) = client.get("/api/v1/tasks").await;
        assert_eq!(s, 401, "{who}: {v}");
        assert_eq!(v["error"]["code"], "unauthorized", "{who}: {v}");
        let (s, _) = client.post("/api/v1/tasks", &body).await;
        assert_eq!(s, 401, "{who}");
    }
    let (s, _) = reader.get("/api/v1/tasks").await;
    assert_eq!(s, 200);
    let (s, v) = reader.post("/api/v1/tasks", &body).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    // Health checks and the worker endpoint do not take API tokens.
    let (s, _) = anonymous.get("/healthz").await;
    assert_eq!(s, 200);
    let w = spawn_worker(
        fast_worker_config(&c.ws_url(), "w-api"),
        Executors::builtin(),
    );
    w.wait_state(|s| s == ConnState::Connected).await;
    let ids = admin.submit(&[sleep_task(50, 1, 0)]).await;
    admin.wait_status(&ids[0], "completed").await;
    let (s, v) = reader.get(&format!("/api/v1/tasks/{}", ids[0])).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("completed")));
    // Draining a worker is a command: the admin scope's.
    let (s, v) = reader.post("/api/v1/workers/w-api/drain", &json!({})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let (s, v) = admin.post("/api/v1/workers/w-api/drain", &json!({})).await;
    assert_eq!((s, v["draining"].as_bool()), (200, Some(true)), "{v}");
    let (s, v) = admin.post("/api/v1/workers/w-api/retire", &json!({})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let o = admin.overview().await;
    assert_eq!(counter(&o, "api_auth_failures"), 6, "{o}");
    w.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn with_tokens_metrics_and_the_event_stream_need_a_read_token_and_health_does_not() {
    use tether_coordinator::auth::{ApiTokens, Scope};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    let mut tokens = ApiTokens::default();
    tokens.add(
        &Secret::new(b"read-token-for-tests").expect("t"),
        Scope::Read,
    );
    cfg.api_tokens = Some(tokens);
    let c = spawn_coordinator_with(cfg, None).await;
    let http = loopback_client(reqwest::Client::builder());
    for (path, anonymous) in [
        ("/metrics", 401),
        ("/api/v1/openapi.json", 401),
        ("/api/v1/history", 401),
        ("/api/v1/no-such-route", 401),
        ("/healthz", 200),
    ] {
        let url = format!("http://{}{path}", c.addr);
        let s = http.get(&url).send().await.expect("request").status();
        assert_eq!(s.as_u16(), anonymous, "{path} without a token");
        let s = http
            .get(&url)
            .bearer_auth("read-token-for-tests")
            .send()
            .await
            .expect("request")
            .status();
        assert_ne!(s.as_u16(), 401, "{path} with a read token");
        assert_ne!(s.as_u16(), 403, "{path} with a read token");
    }
    c.stop().await;
}

/// A coordinator with tight limits, for the flood and slow-loris tests.
async fn limited_coordinator(dir: &std::path::Path) -> TestCoordinator {
    let mut cfg = fast_coordinator_config(dir.to_owned());
    cfg.limits.messages_per_sec = 50.0;
    cfg.limits.message_burst = 50;
    cfg.limits.handshake_timeout = Duration::from_millis(500);
    spawn_coordinator_with(cfg, None).await
}

#[tokio::test]
async fn a_frame_flood_is_rate_limited_per_session_and_honest_workers_are_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = limited_coordinator(dir.path()).await;
    let honest = connected_honest_worker(&c).await;
    let mut f = Raw::connect(&c, "flooder").await;
    let reg = f.registration(None, &[]);
    f.send(&reg).await;
    f.next_of("registration_ack").await;
    let hb = json!({"type": "heartbeat", "sequence": 1, "timestamp": chrono::Utc::now()});
    let text = hb.to_string();
    let flood = async {
        for _ in 0..300 {
            f.ws.feed(Message::text(text.clone())).await.expect("feed");
        }
        f.ws.flush().await.expect("flush");
    };
    tokio::time::timeout(DEADLINE, flood)
        .await
        .expect("flood sent");
    f.next_error("rate_limited", "").await;
    // Meanwhile the honest worker's work goes through.
    honest_work_completes(&c.client(), 3).await;
    let o = c.client().overview().await;
    assert!(counter(&o, "rate_limited") >= 100, "{o}");
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

/// A worker paces itself below the message rate the registration ack gives it: a busy worker
/// of the built-in executors, whose tasks make states far faster than the rate, is never the
/// one the coordinator's limiter holds back, and every task completes.
#[tokio::test]
async fn a_busy_honest_worker_paces_itself_under_the_coordinators_message_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.limits.messages_per_sec = 100.0;
    cfg.limits.message_burst = 100;
    let c = spawn_coordinator_with(cfg, None).await;
    let mut wcfg = fast_worker_config(&c.ws_url(), "busy");
    wcfg.slots = 4;
    let w = spawn_worker(wcfg, Executors::builtin());
    w.wait_state(|s| s == ConnState::Connected).await;
    let client = c.client();
    // Each task reports a state every millisecond for 1.5 s: 6,000 states offered in all,
    // against 100 messages a second.
    let specs: Vec<TaskSpec> = (0..4).map(|_| sleep_task(1_500, 1_500, 0)).collect();
    let ids = client.submit(&specs).await;
    for id in &ids {
        client.wait_status(id, "completed").await;
        assert_eq!(client.results(id).await.len(), 1, "task {id}");
    }
    let o = client.overview().await;
    assert_eq!(counter(&o, "rate_limited"), 0, "{o}");
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// What the worker sends outside its outbox (heartbeats, here five a second) counts in its
/// pace: at a coordinator's 10 messages a second, the outbox yields them their share, and
/// the coordinator never holds the session back. Counted apart, the outbox's 9 a second and
/// the heartbeats' 5 overran the rate within about three seconds.
#[tokio::test]
async fn a_workers_heartbeats_count_in_its_pace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.limits.messages_per_sec = 10.0;
    cfg.limits.message_burst = 10;
    let c = spawn_coordinator_with(cfg, None).await;
    // Heartbeats every 200 ms; telemetry (through the outbox) rarely.
    let mut wcfg = fast_worker_config(&c.ws_url(), "beating");
    wcfg.telemetry_interval = Duration::from_secs(60);
    let w = spawn_worker(wcfg, Executors::builtin());
    w.wait_state(|s| s == ConnState::Connected).await;
    let client = c.client();
    // One task reporting a state every 10 ms for 5 s: the outbox always has one to send.
    let id = client.submit(&[sleep_task(5_000, 500, 0)]).await.remove(0);
    client.wait_status(&id, "completed").await;
    assert_eq!(client.results(&id).await.len(), 1);
    let o = client.overview().await;
    assert_eq!(counter(&o, "rate_limited"), 0, "{o}");
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// Sends `n` heartbeats at once and waits for the answer to the last.
async fn heartbeats(raw: &mut Raw, first: u64, n: u64) {
    for sequence in first..first + n {
        let hb =
            json!({"type": "heartbeat", "sequence": sequence, "timestamp": chrono::Utc::now()});
        raw.ws
            .feed(Message::text(hb.to_string()))
            .await
            .expect("feed");
    }
    raw.ws.flush().await.expect("flush");
    loop {
        let v = raw.next().await;
        if v["type"] == "heartbeat" && v["response_to"] == first + n - 1 {
            return;
        }
    }
}

#[tokio::test]
async fn a_reconnect_does_not_refill_a_workers_message_rate() {
    reconnect_spends_the_same_burst(true).await;
}

/// The usual reconnect: the worker is back before its previous session ended (it noticed the
/// loss first). The new session shares the rates of the one still open; it used to start
/// with a fresh burst, which a worker could have taken as often as it opened a connection.
#[tokio::test]
async fn a_reconnect_while_the_previous_session_is_open_does_not_refill_the_rate() {
    reconnect_spends_the_same_burst(false).await;
}

async fn reconnect_spends_the_same_burst(first_ended: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    // A burst of 50, refilled at 5 a second: a second session soon after has few to spend.
    cfg.limits.messages_per_sec = 5.0;
    cfg.limits.message_burst = 50;
    let c = spawn_coordinator_with(cfg, None).await;
    let client = c.client();
    let mut w = Raw::connect(&c, "rebursting").await;
    let reg = w.registration(None, &[]);
    w.send(&reg).await;
    w.next_of("registration_ack").await;
    heartbeats(&mut w, 1, 40).await;
    assert_eq!(
        counter(&client.overview().await, "rate_limited"),
        0,
        "within the burst"
    );
    if first_ended {
        let _ = w.ws.close(None).await;
        wait_for("the session to end", DEADLINE, || async {
            let ws: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
            (ws[0]["state"] == "disconnected").then_some(())
        })
        .await;
    }
    // Back at once: the burst it spent is still spent.
    let _first = w;
    let mut w = Raw::connect(&c, "rebursting").await;
    let reg = w.registration(None, &[]);
    w.send(&reg).await;
    w.next_of("registration_ack").await;
    heartbeats(&mut w, 100, 40).await;
    let o = client.overview().await;
    assert!(
        counter(&o, "rate_limited") >= 1,
        "a fresh burst after reconnecting: {o}"
    );
    c.stop().await;
}

#[tokio::test]
async fn slow_loris_upgrades_are_cut_at_the_handshake_deadline_and_honest_workers_connect() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let c = limited_coordinator(dir.path()).await;
    let mut loris = Vec::new();
    for i in 0..10 {
        let tcp = tokio::net::TcpStream::connect(c.addr)
            .await
            .expect("connect");
        let (mut rd, mut wr) = tcp.into_split();
        let head = format!(
            "GET /api/v1/worker/loris-{i}/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        );
        wr.write_all(head.as_bytes()).await.expect("write");
        // One more header line every 100 ms, never the blank line that ends the request.
        let dribble = tokio::spawn(async move {
            for n in 0..1000 {
                if wr
                    .write_all(format!("X-Slow-{n}: 1\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        // A 408 for the head it never finished, then EOF (or a reset).
        let cut = tokio::spawn(async move { read_until_closed(&mut rd).await });
        loris.push((dribble, cut));
    }
    // Honest workers connect and work while the slow connections hang on.
    let honest = connected_honest_worker(&c).await;
    honest_work_completes(&c.client(), 2).await;
    for (dribble, cut) in loris {
        let answer = cut
            .await
            .expect("reader")
            .expect("a slow connection was not cut");
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer:?}"
        );
        assert!(
            answer.contains("\"code\":\"request_timeout\""),
            "{answer:?}"
        );
        dribble.abort();
    }
    // A connection that sent nothing (a browser's preconnection, say) is closed without a word:
    // a 408 written into it would be read as the answer to its next request.
    let mut silent = tokio::net::TcpStream::connect(c.addr)
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(DEADLINE, silent.read(&mut buf))
        .await
        .expect("closed at the deadline");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let o = c.client().overview().await;
    assert!(counter(&o, "slow_handshakes") >= 10, "{o}");
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

/// A connection answered once cannot be held open for ever: one left idle after its answer is
/// closed after `http_idle`, one that then dribbles the next request without finishing it at
/// the handshake deadline of that request. A worker session on the same coordinator, quieter
/// than `http_idle` between heartbeats, is not an HTTP connection and is left alone.
#[tokio::test]
async fn an_http_connection_answered_once_is_closed_when_idle_or_dribbling_the_next_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.limits.handshake_timeout = Duration::from_millis(500);
    // Shorter than the 200 ms between a worker's heartbeats.
    cfg.limits.http_idle = Duration::from_millis(150);
    let c = spawn_coordinator_with(cfg, None).await;
    let honest = connected_honest_worker(&c).await;

    /// Opens a connection and reads the answer to one `GET /healthz` (closed after it).
    async fn answered_once(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("write");
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before answering");
            head.extend_from_slice(&buf[..n]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        tcp
    }
    /// Whether the server closed `tcp` (EOF or reset) within the deadline, reading past the
    /// rest of the answer.
    async fn closed(tcp: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(DEADLINE, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    let mut idle = answered_once(c.addr).await;
    let mut dribbler = answered_once(c.addr).await;
    dribbler
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("write");
    let (mut rd, mut wr) = dribbler.into_split();
    let dribble = tokio::spawn(async move {
        for n in 0..1000 {
            let line = format!("X-Slow-{n}: 1\r\n");
            if wr.write_all(line.as_bytes()).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(
        closed(&mut idle).await,
        "the idle connection was not closed"
    );
    // The dribbler is told its request's head was not whole in time, then cut.
    let answer = read_until_closed(&mut rd)
        .await
        .expect("the dribbler was not cut");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    dribble.abort();

    // The worker stayed on its one session, and works.
    tokio::time::sleep(Duration::from_millis(600)).await;
    honest_work_completes(&c.client(), 2).await;
    let o = c.client().overview().await;
    assert_eq!(counter(&o, "reconnections"), 0, "{o}");
    assert!(counter(&o, "idle_http_closed") >= 1, "{o}");
    assert!(counter(&o, "slow_handshakes") >= 1, "{o}");
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn invalid_utf8_deep_nesting_and_stray_binary_frames_are_refused_clearly() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let honest = connected_honest_worker(&c).await;
    let mut m = Raw::connect(&c, "mallory").await;
    let reg = m.registration(None, &[]);
    m.send(&reg).await;
    m.next_of("registration_ack").await;
    // Deeply nested JSON, at the top and inside an opaque payload: a bad_frame, session goes on.
    let deep = "[".repeat(100_000);
    let inner = format!(
        r#"{{"type":"task_state","seq":1,"task_id":"t-x","attempt":1,"state":{deep},"timestamp":"2026-01-01T00:00:00Z"}}"#
    );
    for frame in [deep.clone(), inner] {
        m.ws.send(Message::text(frame)).await.expect("send");
        m.next_error("bad_frame", "").await;
    }
    // A binary frame (compression is not negotiated): bad_frame, session goes on.
    let bomb = vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
    m.ws.send(Message::binary(bomb)).await.expect("send");
    m.next_error("bad_frame", "").await;
    m.send(&json!({"type": "heartbeat", "sequence": 77, "timestamp": chrono::Utc::now()}))
        .await;
    let hb = m.next_of("heartbeat").await;
    assert_eq!(hb["response_to"], 77, "{hb}");
    // A text frame that is not UTF-8: closed with 1007.
    let bad = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    m.ws.send(Message::Frame(bad)).await.expect("send");
    assert_eq!(m.close_code().await, Some(1007));
    honest_work_completes(&c.client(), 2).await;
    let o = c.client().overview().await;
    assert!(counter(&o, "malformed_frames") >= 3, "{o}");
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn a_connection_storm_is_throttled_per_address_and_capped_overall() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.limits.limit_loopback = true;
    cfg.limits.connects_per_sec = 5.0;
    cfg.limits.connect_burst = 10;
    let c = spawn_coordinator_with(cfg, None).await;
    // The storm comes from 127.0.0.2; everyone else from 127.0.0.1 has a bucket of its own.
    let url = format!("ws://{}/api/v1/worker/stormer/ws", c.addr);
    let mut refused = 0;
    for _ in 0..30 {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        let tcp = sock.connect(c.addr).await.expect("tcp connect");
        if tokio_tungstenite::client_async(&url, tcp).await.is_err() {
            refused += 1;
        }
    }
    assert!(
        refused >= 15,
        "only {refused} of 30 storm connections refused"
    );
    let honest = connected_honest_worker(&c).await;
    honest_work_completes(&c.client(), 2).await;
    let o = c.client().overview().await;
    assert!(counter(&o, "connections_throttled") >= 15, "{o}");
    honest.stop().await.expect("clean stop");
    c.stop().await;

    // A cap on open connections: the one over it is closed at once.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.limits.max_connections = 3;
    let c = spawn_coordinator_with(cfg, None).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(Raw::connect(&c, &format!("holder-{i}")).await);
    }
    let over = tokio_tungstenite::connect_async(format!("ws://{}/api/v1/worker/over/ws", c.addr));
    assert!(over.await.is_err(), "a fourth connection was admitted");
    drop(held);
    let honest = connected_honest_worker(&c).await;
    honest_work_completes(&c.client(), 2).await;
    let o = c.client().overview().await;
    assert!(counter(&o, "connections_refused") >= 1, "{o}");
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn compression_is_negotiated_and_a_decompression_bomb_is_refused_with_1009() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.max_frame = 256 * 1024;
    let c = spawn_coordinator_with(cfg, None).await;
    let mut wcfg = fast_worker_config(&c.ws_url(), "honest");
    wcfg.max_frame = 256 * 1024;
    let honest = spawn_worker(wcfg, Executors::builtin());
    honest.wait_state(|s| s == ConnState::Connected).await;

    // The bomb: 64 MiB of zeros in a few KiB, from a client that negotiated zstd.
    let mut m = Raw::connect(&c, "bomber").await;
    let mut reg = m.registration(None, &[]);
    reg["compression"] = json!(["zstd"]);
    m.send(&reg).await;
    let ack = m.next_of("registration_ack").await;
    assert_eq!(ack["compression"], "zstd", "{ack}");
    let bomb = tether_proto::compress::deflate(&"0".repeat(64 << 20));
    assert!(bomb.len() < 256 * 1024);
    let metrics = format!("http://{}/metrics", c.addr);
    let oversize = |text: &str| metric_value(text, "tether_oversize_frames_total", &[]);
    let before = oversize(&scrape(&metrics).await).unwrap_or(0.0);
    m.ws.send(Message::binary(bomb)).await.expect("send");
    assert_eq!(m.close_code().await, Some(1009));
    // Counted where a frame too big is (the family is process-wide: other tests' frames may
    // add to it, never take away).
    let after = oversize(&scrape(&metrics).await).unwrap_or(0.0);
    assert!(
        after >= before + 1.0,
        "tether_oversize_frames_total {before} -> {after}"
    );

    // Honest traffic compressed both ways: an assignment with a large config goes out
    // compressed, a result with a large output comes back compressed.
    let client = c.client();
    let mut spec = TaskSpec::new(
        "command",
        json!({"shell": "yes tether | head -c 6000", "tail_bytes": 8192, "env": {"PAD": "p".repeat(4000)}}),
    );
    spec.name = Some("big".into());
    let id = client.submit(&[spec]).await[0].clone();
    client.wait_status(&id, "completed").await;
    let results = client.results(&id).await;
    assert_eq!(results.len(), 1, "{results:?}");
    let out = results[0]["body"]["result"]["stdout_tail"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(out.len(), 6000, "{results:?}");
    honest_work_completes(&client, 2).await;
    let o = client.overview().await;
    assert_eq!(counter(&o, "decompression_refused"), 1, "{o}");
    assert!(counter(&o, "compressed_out_frames") >= 1, "{o}");
    assert!(counter(&o, "compressed_in_frames") >= 1, "{o}");
    let ratio_in = counter(&o, "compressed_in_json_bytes") as f64
        / counter(&o, "compressed_in_wire_bytes") as f64;
    assert!(ratio_in > 2.0, "inbound ratio {ratio_in}: {o}");
    eprintln!(
        "compressed in: {} frames, {} JSON bytes in {} wire bytes; out: {} frames, {} in {}",
        counter(&o, "compressed_in_frames"),
        counter(&o, "compressed_in_json_bytes"),
        counter(&o, "compressed_in_wire_bytes"),
        counter(&o, "compressed_out_frames"),
        counter(&o, "compressed_out_json_bytes"),
        counter(&o, "compressed_out_wire_bytes"),
    );
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

/// Compression turned off on either side: nothing goes compressed either way, and a large
/// assignment and a large result still arrive whole; on both, large messages go compressed.
#[tokio::test]
async fn compression_refused_by_either_side_sends_everything_as_text() {
    for (coordinator_zstd, worker_zstd) in [(false, true), (true, false), (true, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = fast_coordinator_config(dir.path().to_owned());
        cfg.compression = coordinator_zstd;
        let c = spawn_coordinator_with(cfg, None).await;
        let mut wcfg = fast_worker_config(&c.ws_url(), "plain");
        wcfg.compression = worker_zstd;
        let w = spawn_worker(wcfg, Executors::builtin());
        w.wait_state(|s| s == ConnState::Connected).await;
        let client = c.client();
        let spec = TaskSpec::new(
            "command",
            json!({"shell": "yes tether | head -c 6000", "tail_bytes": 8192, "env": {"PAD": "p".repeat(4000)}}),
        );
        let id = client.submit(&[spec]).await[0].clone();
        client.wait_status(&id, "completed").await;
        let results = client.results(&id).await;
        assert_eq!(results.len(), 1, "{results:?}");
        let out = results[0]["body"]["result"]["stdout_tail"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(out.len(), 6000, "{results:?}");
        let o = client.overview().await;
        let frames = (
            counter(&o, "compressed_out_frames"),
            counter(&o, "compressed_in_frames"),
        );
        match coordinator_zstd && worker_zstd {
            false => assert_eq!(frames, (0, 0), "{coordinator_zstd}/{worker_zstd}: {o}"),
            true => assert!(frames.0 >= 1 && frames.1 >= 1, "{o}"),
        }
        w.stop().await.expect("clean stop");
        c.stop().await;
    }
}

#[tokio::test]
async fn checkpoints_announced_and_never_completed_are_bounded_per_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.max_checkpoint_bytes = 1000;
    let c = spawn_coordinator_with(cfg, None).await;
    let honest = connected_honest_worker(&c).await;
    let client = c.client();
    let mut m = Raw::connect(&c, "hoarder").await;
    let reg = m.registration(None, &["hoarder-only"]);
    m.send(&reg).await;
    m.next_of("registration_ack").await;
    let mut spec = sleep_task(50, 1, 0);
    spec.requires = vec!["hoarder-only".into()];
    let own = client.submit(&[spec]).await[0].clone();
    let a = m.next_of("task_assignment").await;
    assert_eq!(a["task_id"], own.as_str());
    let ts = chrono::Utc::now();
    let mut dispositions = Vec::new();
    for i in 0..4u64 {
        m.send(
            &json!({"type": "checkpoint", "seq": 10 + i, "task_id": own, "attempt": 1,
                       "checkpoint_id": format!("c-hoard-{i}"), "size": 900, "chunks": 1,
                       "timestamp": ts}),
        )
        .await;
        let ack = m.next_of("checkpoint_ack").await;
        dispositions.push(ack["disposition"].as_str().unwrap_or_default().to_owned());
    }
    // Two announced (1800 bytes) fit under 2 x 1000; the third and fourth do not.
    assert_eq!(
        dispositions,
        ["recorded", "recorded", "rejected", "rejected"]
    );
    // Completing one makes room again.
    m.send(
        &json!({"type": "checkpoint_data", "seq": 20, "task_id": own, "attempt": 1,
                   "checkpoint_id": "c-hoard-0", "chunk": 0, "data": "aGVsbG8=", "timestamp": ts}),
    )
    .await;
    m.next_of("checkpoint_data_ack").await;
    m.send(
        &json!({"type": "checkpoint", "seq": 21, "task_id": own, "attempt": 1,
                   "checkpoint_id": "c-hoard-9", "size": 900, "chunks": 1, "timestamp": ts}),
    )
    .await;
    assert_eq!(m.next_of("checkpoint_ack").await["disposition"], "recorded");
    honest_work_completes(&client, 2).await;
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

/// A session that announces 10,000 checkpoints and never finishes one (empty ones: the byte
/// bound does not hold them back) has 64 of them taken and the rest refused, each with an
/// error that says why; an honest worker is served meanwhile and after, and the lease's end
/// drops what was left unfinished.
#[tokio::test]
async fn unfinished_checkpoint_announcements_are_capped_per_attempt_and_the_coordinator_keeps_serving()
 {
    const CAP: u64 = 64;
    const ANNOUNCED: u64 = 10_000;
    const AT_ONCE: u64 = 500;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    // The flood is of checkpoints, not of messages: the message rate is not what stops it.
    cfg.limits.messages_per_sec = 1e6;
    cfg.limits.message_burst = 1_000_000;
    let c = spawn_coordinator_with(cfg, None).await;
    let honest = connected_honest_worker(&c).await;
    let client = c.client();
    let mut m = Raw::connect(&c, "announcer").await;
    let reg = m.registration(None, &["announcer-only"]);
    m.send(&reg).await;
    m.next_of("registration_ack").await;
    let mut spec = sleep_task(50, 1, 0);
    spec.requires = vec!["announcer-only".into()];
    let own = client.submit(&[spec]).await.remove(0);
    assert_eq!(m.next_of("task_assignment").await["task_id"], own.as_str());
    // Honest work submitted before the flood runs through it.
    let specs: Vec<TaskSpec> = (0..3).map(|_| sleep_task(50, 2, 1)).collect();
    let before = client.submit(&specs).await;
    let ts = chrono::Utc::now();
    let (mut recorded, mut rejected, mut told) = (0u64, 0u64, 0u64);
    for first in (0..ANNOUNCED).step_by(AT_ONCE as usize) {
        for i in first..first + AT_ONCE {
            let msg = json!({"type": "checkpoint", "seq": 1 + i, "task_id": own, "attempt": 1,
                "checkpoint_id": format!("c-never-{i}"), "size": 0, "chunks": 1,
                "timestamp": ts});
            m.ws.feed(Message::text(msg.to_string()))
                .await
                .expect("send");
        }
        m.ws.flush().await.expect("flush");
        let mut acks = 0;
        while acks < AT_ONCE {
            let v = m.next().await;
            match v["type"].as_str() {
                Some("checkpoint_ack") => {
                    acks += 1;
                    match v["disposition"].as_str() {
                        Some("recorded") => recorded += 1,
                        Some("rejected") => rejected += 1,
                        other => panic!("{other:?}: {v}"),
                    }
                }
                Some("error") => {
                    assert_eq!(v["code"], "bad_frame", "{v}");
                    let says = v["message"].as_str().unwrap_or_default();
                    assert!(says.contains("unfinished checkpoints"), "{v}");
                    told += 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!((recorded, rejected), (CAP, ANNOUNCED - CAP));
    assert_eq!(told, rejected, "each refusal says why");
    for id in &before {
        client.wait_status(id, "completed").await;
    }
    honest_work_completes(&client, 3).await;
    // The lease's end drops the unfinished ones: the next attempt could announce as many.
    let ts = chrono::Utc::now();
    m.send(
        &json!({"type": "task_result", "seq": ANNOUNCED + 1, "task_id": own, "attempt": 1,
        "outcome": "completed", "result": {}, "started_at": ts, "finished_at": ts,
        "duration_ms": 1, "timestamp": ts}),
    )
    .await;
    assert_eq!(
        m.next_of("task_result_ack").await["disposition"],
        "recorded"
    );
    assert!(
        checkpoints_listed(&client, &own).await.is_empty(),
        "none was ever complete"
    );
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

/// The complete checkpoints the API lists for `task`.
async fn checkpoints_listed(client: &Client, task: &TaskId) -> Vec<serde_json::Value> {
    let (status, list) = client
        .get(&format!("/api/v1/tasks/{task}/checkpoints"))
        .await;
    assert_eq!(status, 200, "{list}");
    list.as_array()
        .or_else(|| list["checkpoints"].as_array())
        .cloned()
        .expect("a checkpoint list")
}

/// Sends one raw HTTP/1.1 request (`Connection: close`) and reads the status, the
/// `content-type` and the body as JSON (`Null` when it is not JSON).
async fn raw_request(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
) -> (u16, String, serde_json::Value) {
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let reply = raw_answer(addr, &request).await;
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, content_type, json)
}

#[tokio::test]
async fn path_parameters_that_are_not_utf8_get_the_json_error_body_and_the_api_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let honest = connected_honest_worker(&c).await;
    let bad = "%2e%2e%2f%00%ff";
    for (method, target, key) in [
        ("GET", format!("/api/v1/tasks/{bad}"), "id"),
        ("GET", format!("/api/v1/tasks/{bad}/result"), "id"),
        ("GET", format!("/api/v1/tasks/{bad}/state"), "id"),
        ("GET", format!("/api/v1/tasks/{bad}/checkpoints"), "id"),
        ("GET", format!("/api/v1/tasks/t-1/checkpoints/{bad}"), "cid"),
        ("POST", format!("/api/v1/tasks/{bad}/cancel"), "id"),
        ("POST", format!("/api/v1/tasks/t-1/{bad}"), "action"),
        ("GET", format!("/api/v1/workers/{bad}"), "id"),
    ] {
        let (status, content_type, body) = raw_request(c.addr, method, &target).await;
        assert_eq!(status, 400, "{method} {target}: {body}");
        assert_eq!(content_type, "application/json", "{method} {target}");
        assert_eq!(
            body["error"]["code"], "bad_path",
            "{method} {target}: {body}"
        );
        assert_eq!(
            body["error"]["message"],
            format!("path parameter `{key}` is not valid UTF-8 once percent-decoded"),
            "{method} {target}"
        );
    }
    // Valid paths answer as they did.
    let (status, _, body) = raw_request(c.addr, "GET", "/api/v1/tasks/t-none").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    let (status, _, body) = raw_request(c.addr, "GET", "/api/v1/tasks/bad%20id").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid", "{body}");
    // A method a route does not serve: a JSON error too (it was an empty body).
    for (method, target) in [
        ("DELETE", "/api/v1/tasks"),
        ("POST", "/api/v1/worker/honest/ws"),
    ] {
        let (status, content_type, body) = raw_request(c.addr, method, target).await;
        assert_eq!(status, 405, "{method} {target}: {body}");
        assert_eq!(content_type, "application/json", "{method} {target}");
        assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    }
    let (status, _, body) = raw_request(c.addr, "GET", "/api/v1/workers/honest").await;
    assert_eq!(status, 200, "{body}");
    honest_work_completes(&c.client(), 2).await;
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn a_submission_with_a_bad_field_gets_a_json_error_naming_the_field_and_element() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.max_body = 64 * 1024;
    let c = spawn_coordinator_with(cfg, None).await;
    let honest = connected_honest_worker(&c).await;
    let client = c.client();
    let ok = json!({"kind": "sleep", "config": {"ms": 10}});
    for (body, says) in [
        (
            json!({"kind": "sleep", "confg": {}}),
            "confg: unknown field `confg`, expected one of `task_id`, `kind`, `config`,",
        ),
        (
            json!({"kind": 5}),
            "kind: invalid type: integer `5`, expected a string",
        ),
        (
            json!({"kind": "sleep", "priority": 300}),
            "priority: invalid value: integer `300`, expected u8",
        ),
        (
            json!({"tasks": [ok, ok, {"kind": "sleep", "confg": {}}]}),
            "tasks[2].confg: unknown field `confg`, expected one of",
        ),
        (
            json!({"tasks": [ok, {"kind": "sleep", "requires": "gpu"}]}),
            "tasks[1].requires: invalid type: string \"gpu\", expected a sequence",
        ),
        (
            json!([ok]),
            "the body is a JSON array; send one task spec object or {\"tasks\": [specs]}",
        ),
    ] {
        let (status, e) = client.post("/api/v1/tasks", &body).await;
        assert_eq!(status, 422, "{body}: {e}");
        assert_eq!(e["error"]["code"], "bad_request", "{body}: {e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(says), "{body}: {message}");
    }
    // An invalid value of the right type is still the core's 422 `invalid`, with its rule.
    for (body, says) in [
        (
            json!({"kind": "sleep", "priority": 10}),
            "task 0: priority must be 0..=9",
        ),
        (
            json!({"kind": "sleep", "max_attempts": 101}),
            "task 0: max_attempts of 101; it must be 1..=100",
        ),
    ] {
        let (status, e) = client.post("/api/v1/tasks", &body).await;
        assert_eq!(status, 422, "{body}: {e}");
        assert_eq!(e["error"]["code"], "invalid", "{body}: {e}");
        assert_eq!(e["error"]["message"], says, "{body}: {e}");
    }
    // A config its built-in executor would refuse at every attempt is refused now, the whole
    // batch with it; a kind of no built-in executor is any executor's business.
    for (body, says) in [
        (
            json!({"tasks": [ok, {"kind": "sleep", "config": {"ms": "abc"}}]}),
            "task 1: the `sleep` executor refuses its config: invalid type: string \"abc\", expected u64",
        ),
        (
            json!({"kind": "command", "config": {"program": "true", "shell": "true"}}),
            "task 0: the `command` executor refuses its config: give `program` or `shell`, not both",
        ),
        (
            json!({"kind": "command"}),
            "task 0: the `command` executor refuses its config: missing `program` (or `shell`)",
        ),
    ] {
        let (status, e) = client.post("/api/v1/tasks", &body).await;
        assert_eq!(status, 422, "{body}: {e}");
        assert_eq!(e["error"]["code"], "invalid", "{body}: {e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(says), "{body}: {message}");
    }
    // Not JSON, too large, or not JSON by its content type keep their statuses, as JSON; too
    // large is `too_large`, naming the limit (a57929e), the others `bad_request`.
    let http = loopback_client(reqwest::Client::builder());
    let url = format!("http://{}/api/v1/tasks", c.addr);
    let big = json!({"kind": "sleep", "name": "n".repeat(128 * 1024)}).to_string();
    for (content_type, body, want, code) in [
        (
            "application/json",
            "{\"kind\": ".to_owned(),
            400,
            "bad_request",
        ),
        ("application/json", big, 413, "too_large"),
        ("text/plain", ok.to_string(), 415, "bad_request"),
    ] {
        let r = http
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("an answer");
        let status = r.status().as_u16();
        let e: serde_json::Value = r.json().await.expect("a JSON error body");
        assert_eq!(status, want, "{content_type}: {e}");
        assert_eq!(e["error"]["code"], code, "{e}");
        if status == 413 {
            let message = e["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("--max-body"), "{message}");
        }
    }
    // Nothing of a refused batch was queued, and honest work runs.
    let (status, listed) = client.get("/api/v1/tasks").await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let custom = json!({"kind": "mine", "config": {"ms": "abc"}});
    let (status, v) = client
        .post("/api/v1/tasks", &json!({"tasks": [ok, custom]}))
        .await;
    assert_eq!(status, 201, "{v}");
    honest_work_completes(&client, 2).await;
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

/// A request as a browser would make it: raw HTTP/1.1 with the given headers; the status.
async fn raw_status(addr: std::net::SocketAddr, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.expect("status line");
    std::str::from_utf8(&head[9..12])
        .expect("utf-8")
        .parse()
        .expect("status")
}

#[tokio::test]
async fn web_pages_reach_neither_the_worker_endpoint_nor_a_tokenless_api_under_their_own_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let honest = connected_honest_worker(&c).await;
    let get = |host: &str, path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
    };
    // A page whose domain was rebound to 127.0.0.1 asks under its own name.
    let rebound = get("evil.example:8765", "/api/v1/tasks", "");
    assert_eq!(raw_status(c.addr, &rebound).await, 403);
    let local = get(&c.addr.to_string(), "/api/v1/tasks", "");
    assert_eq!(raw_status(c.addr, &local).await, 200);
    let named = get("localhost", "/api/v1/overview", "");
    assert_eq!(raw_status(c.addr, &named).await, 200);
    // A browser's WebSocket always carries an Origin; a worker's never does.
    let upgrade = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let from_page = get(
        &c.addr.to_string(),
        "/api/v1/worker/page/ws",
        &format!("{upgrade}Origin: http://evil.example\r\n"),
    );
    assert_eq!(raw_status(c.addr, &from_page).await, 403);
    let plain = get(&c.addr.to_string(), "/api/v1/worker/plain/ws", upgrade)
        .replace("Connection: close", "Connection: Upgrade");
    assert_eq!(raw_status(c.addr, &plain).await, 101);
    // The honest worker kept working.
    honest_work_completes(&c.client(), 2).await;
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn another_sites_page_cannot_command_a_tokenless_coordinator_and_its_own_origin_can() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let client = c.client();
    // No worker: the task stays queued, and a cancel of it would succeed.
    let id = client.submit(&[sleep_task(50, 2, 1)]).await.remove(0);
    let host = c.addr.to_string();
    let cancel = |extra: &str| {
        format!(
            "POST /api/v1/tasks/{id}/cancel HTTP/1.1\r\nHost: {host}\r\n{extra}\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    // A form on another site posts under the loopback name, but its browser says whence.
    for whence in [
        "Origin: http://evil.example\r\n".to_owned(),
        format!("Origin: http://localhost:{}\r\n", c.addr.port() + 1),
        "Origin: null\r\n".to_owned(),
        "Sec-Fetch-Site: cross-site\r\n".to_owned(),
        format!("Origin: http://{host}\r\nSec-Fetch-Site: same-site\r\n"),
    ] {
        assert_eq!(raw_status(c.addr, &cancel(&whence)).await, 403, "{whence}");
    }
    assert_eq!(client.task(&id).await["status"], "queued");
    // Reads stay open to any page's requests the loopback name allows (they change nothing).
    let read = format!(
        "GET /api/v1/tasks/{id} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://evil.example\r\n\
         Connection: close\r\n\r\n"
    );
    assert_eq!(raw_status(c.addr, &read).await, 200);
    // The dashboard's own command, and the CLI's (no Origin), are taken.
    let own = format!("Origin: http://{host}\r\nSec-Fetch-Site: same-origin\r\n");
    assert_eq!(raw_status(c.addr, &cancel(&own)).await, 200);
    assert_eq!(client.task(&id).await["status"], "cancelled");
    c.stop().await;
}

/// Submissions are read and parsed a few at a time: clients posting at once hold turns, not
/// each up to `max_body` of memory; one that finds every turn held past half the handshake
/// deadline is told the coordinator is busy, and turns come back when their holders go (here,
/// cut at the handshake deadline with a body never finished).
#[tokio::test]
async fn submissions_take_turns_and_one_past_them_is_told_busy_not_held_or_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.limits.handshake_timeout = Duration::from_secs(2);
    let c = spawn_coordinator_with(cfg, None).await;
    let host = c.addr.to_string();
    // Each sends its head and the start of a 1 MB body, then nothing more.
    let mut held = Vec::new();
    for _ in 0..tether_coordinator::http::SUBMITS_AT_ONCE {
        let mut s = tokio::net::TcpStream::connect(c.addr)
            .await
            .expect("connect");
        let start = format!(
            "POST /api/v1/tasks HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: 1000000\r\n\r\n{{\"tasks\": ["
        );
        s.write_all(start.as_bytes()).await.expect("write");
        held.push(s);
    }
    // Until their handlers have all taken their turns, a submission that is no spec gets one
    // and is answered 422 at once (storing nothing); then it waits half the handshake
    // deadline for a turn, and is told the coordinator is busy: whatever its body, none is
    // read without a turn.
    let not_a_spec = format!(
        "POST /api/v1/tasks HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: 12\r\nConnection: close\r\n\r\n{{\"tasks\": 5}}"
    );
    let mut tries = 0;
    let (busy, waited) = loop {
        let asked = std::time::Instant::now();
        let answer = raw_answer(c.addr, &not_a_spec).await;
        if !answer.starts_with("HTTP/1.1 422") {
            break (answer, asked.elapsed());
        }
        tries += 1;
        assert!(tries < 50, "the holders never held every turn");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    assert!(
        busy.to_ascii_lowercase().contains("retry-after: 1"),
        "{busy}"
    );
    assert!(busy.contains("\"code\":\"busy\""), "{busy}");
    assert!(
        waited >= Duration::from_millis(900),
        "it waited half the handshake deadline for a turn: {waited:?}"
    );
    // Reads are not held up, and nothing was taken.
    let o = c.client().overview().await;
    assert_eq!(o["tasks"]["queued"], 0, "{o}");
    // The holders are cut at their deadline (their heads were whole: no 408, a plain close)...
    for mut s in held {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a holder was not cut");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
    // ...and their turns come back.
    let spec = serde_json::to_string(&sleep_task(10, 1, 0)).expect("spec");
    let submit = format!(
        "POST /api/v1/tasks HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{spec}",
        spec.len()
    );
    let accepted = raw_answer(c.addr, &submit).await;
    assert!(accepted.starts_with("HTTP/1.1 201"), "{accepted}");
    assert_eq!(c.client().overview().await["tasks"]["queued"], 1);
    c.stop().await;
}

/// The whole answer to `request` on a connection of its own (closed after it).
async fn raw_answer(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    read_until_closed(&mut s)
        .await
        .expect("answered and closed within the deadline")
}

/// What `reader` receives until its peer closes it (EOF, or a reset), as text; `None` when it
/// is still open after [`DEADLINE`].
async fn read_until_closed(reader: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// A coordinator whose connections have 16 KiB send buffers (they inherit the listener's).
async fn coordinator_with_small_send_buffers(
    cfg: tether_coordinator::CoordinatorConfig,
) -> TestCoordinator {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_send_buffer_size(16 * 1024).expect("buffer size");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    spawn_coordinator_on(cfg, socket.listen(1024).expect("listen")).await
}

/// A connection with a 4 KiB receive buffer that asked `addr` for the whole task listing and
/// read its status line (200), and nothing more: it holds a turn for large answers.
async fn listing_reader(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer size");
    let mut s = socket.connect(addr).await.expect("connect");
    let request = format!("GET /api/v1/tasks?limit=100000 HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("request");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.expect("status line");
    assert_eq!(&head[9..12], b"200");
    s
}

#[tokio::test]
async fn readers_that_hold_every_turn_for_large_answers_get_others_a_busy_answer_not_a_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    // 2,000 tasks of 4 KiB: each listing of them is 8 MB, more than sockets' buffers hold.
    c.client().submit_padded("big", 2000, 4096).await;
    // No worker: it stays queued, and a cancel of it would succeed.
    let id = c.client().submit(&[sleep_task(50, 2, 1)]).await.remove(0);
    // Readers that ask for the listing and read nothing past its status line hold every turn.
    let mut held = Vec::new();
    for _ in 0..tether_coordinator::http::HEAVY_AT_ONCE {
        let s = listing_reader(c.addr).await;
        held.push(s);
    }
    // The next large answer waits for a turn, then is told the coordinator is busy: within
    // the handshake deadline, so it is an answer, not a connection cut as a slow-loris one.
    let request = format!(
        "GET /api/v1/workers HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        c.addr
    );
    assert_eq!(raw_status(c.addr, &request).await, 503);
    // So is every other answer that may carry a task's config or state (up to a frame each):
    // a task and its state. (A control's answer has turns of its own: see
    // `controls_are_answered_while_readers_hold_every_turn_for_large_answers`.)
    for (method, path) in [
        ("GET", format!("/api/v1/tasks/{id}")),
        ("GET", format!("/api/v1/tasks/{id}/state")),
    ] {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            c.addr
        );
        assert_eq!(raw_status(c.addr, &request).await, 503, "{method} {path}");
    }
    // Small answers are not held up.
    let (status, overview) = c.client().get("/api/v1/overview").await;
    assert_eq!(status, 200);
    assert_eq!(overview["counters"]["slow_handshakes"], 0, "{overview}");
    drop(held);
    let (status, _) = c.client().get("/api/v1/workers").await;
    assert_eq!(status, 200, "turns come back when their readers go");
    assert_eq!(
        c.client().task(&id).await["status"],
        "queued",
        "nothing controlled it"
    );
    // The listing, made piece by piece (8 MB in pieces of 64 KiB), is whole and in order.
    let (status, all) = c.client().get("/api/v1/tasks?limit=100000").await;
    assert_eq!(status, 200);
    let seqs: Vec<u64> = all
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| t["submit_seq"].as_u64().expect("submit_seq"))
        .collect();
    assert_eq!(seqs.len(), 2001);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in submission order");
    c.stop().await;
}

/// Readers that take their listing a little at a time, every half `http_idle`, keep it moving,
/// so the idle close never comes for them: they hold every turn for large answers only until
/// they have read slower than the minimum answer rate (`Limits::min_answer_rate`) for about
/// `http_idle`; then their connections are closed, counted as slow (not idle: they moved bytes),
/// and the worker list and an admin's control are answered again.
#[tokio::test]
async fn readers_that_hold_every_turn_reading_a_little_every_half_idle_are_cut_and_turns_come_back()
{
    use tokio::io::AsyncReadExt;
    const IDLE: Duration = Duration::from_secs(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.limits.http_idle = IDLE;
    // A busy answer comes after 1 s (half the handshake deadline), not 5.
    cfg.limits.handshake_timeout = Duration::from_secs(2);
    // A small send buffer (its connections inherit it): a writer blocked on a full one is woken
    // when a third of it drains, so 16 KiB read makes the coordinator write (with the default,
    // megabytes on loopback, a reader would have to take about a megabyte each time).
    let c = coordinator_with_small_send_buffers(cfg).await;
    // 2,000 tasks of 4 KiB: each listing of them is 8 MB, more than sockets' buffers hold.
    c.client().submit_padded("big", 2000, 4096).await;
    let id = c.client().submit(&[sleep_task(50, 2, 1)]).await.remove(0);
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..tether_coordinator::http::HEAVY_AT_ONCE {
        let mut s = listing_reader(c.addr).await;
        // 16 KiB every half `http_idle` (about 11 KB/s): the coordinator writes well within
        // every idle limit.
        readers.spawn(async move {
            let mut got = 12;
            let mut buf = [0u8; 16 * 1024];
            let began = tokio::time::Instant::now();
            while began.elapsed() < 4 * IDLE {
                tokio::time::sleep(IDLE / 2).await;
                match tokio::time::timeout(IDLE, s.read_exact(&mut buf)).await {
                    Ok(Err(_)) => return Some(got),
                    Ok(Ok(n)) => got += n,
                    Err(_) => panic!("16 KiB not sent within {IDLE:?}"),
                }
            }
            None
        });
    }
    let workers = format!(
        "GET /api/v1/workers HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        c.addr
    );
    assert_eq!(raw_status(c.addr, &workers).await, 503, "every turn held");
    // Within the slack (`http_idle`, and what the readers' bytes earn back), every turn is
    // free again: the old idle close alone left them held as long as the readers read on.
    let until = tokio::time::Instant::now() + 3 * IDLE;
    while raw_status(c.addr, &workers).await != 200 {
        assert!(
            tokio::time::Instant::now() < until,
            "every turn still held by readers taking their answers slowly"
        );
    }
    while let Some(reader) = readers.join_next().await {
        let got = reader
            .expect("reader")
            .expect("a slow reader's connection is closed");
        assert!(
            (12..8_000_000).contains(&got),
            "closed before its answer was read: {got}"
        );
    }
    let (status, overview) = c.client().get("/api/v1/overview").await;
    assert_eq!(status, 200);
    // Counted as slow, not idle: they moved bytes now and then, never nothing for `http_idle`.
    assert!(counter(&overview, "slow_http_closed") >= 8, "{overview}");
    assert_eq!(counter(&overview, "idle_http_closed"), 0, "{overview}");
    let cancel = format!(
        "POST /api/v1/tasks/{id}/cancel HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        c.addr
    );
    assert_eq!(
        raw_status(c.addr, &cancel).await,
        200,
        "a control is answered"
    );
    c.stop().await;
}

/// Controls have turns of their own: while readers that take nothing of their listings hold
/// every turn for large answers (the worker list is `503 busy`), an operator's cancel, pause and
/// resume of a task are done and answered 200. They shared those turns, and were told `busy`
/// for as long as the readers held them.
#[tokio::test]
async fn controls_are_answered_while_readers_hold_every_turn_for_large_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    // A busy answer comes after 1 s (half the handshake deadline), not 5.
    cfg.limits.handshake_timeout = Duration::from_secs(2);
    let c = spawn_coordinator_with(cfg, None).await;
    // 2,000 tasks of 4 KiB: each listing of them is 8 MB, more than sockets' buffers hold.
    c.client().submit_padded("big", 2000, 4096).await;
    // No worker: they stay queued, and each control of them succeeds.
    let ids = c
        .client()
        .submit(&[sleep_task(50, 2, 1), sleep_task(50, 2, 1)])
        .await;
    let mut held = Vec::new();
    for _ in 0..tether_coordinator::http::HEAVY_AT_ONCE {
        held.push(listing_reader(c.addr).await);
    }
    let workers = format!(
        "GET /api/v1/workers HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        c.addr
    );
    assert_eq!(raw_status(c.addr, &workers).await, 503, "every turn held");
    let control = |id: &TaskId, action: &str| {
        format!(
            "POST /api/v1/tasks/{id}/{action} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            c.addr
        )
    };
    for (id, action, status) in [
        (&ids[0], "cancel", "cancelled"),
        (&ids[1], "pause", "paused"),
        (&ids[1], "resume", "queued"),
    ] {
        let answer = raw_answer(c.addr, &control(id, action)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{action}: {answer}");
        let body = answer.split("\r\n\r\n").nth(1).expect("a body");
        let task: Value = serde_json::from_str(body).expect("the task");
        assert_eq!(task["status"], status, "{action}: {task}");
    }
    // The readers held every turn all along.
    assert_eq!(
        raw_status(c.addr, &workers).await,
        503,
        "every turn still held"
    );
    drop(held);
    assert_eq!(c.client().status(&ids[0]).await, "cancelled");
    assert_eq!(c.client().status(&ids[1]).await, "queued");
    c.stop().await;
}

/// A coordinator configured with a lower minimum answer rate (`Limits::min_answer_rate`, 1 KiB/s
/// here) lets a reader that takes its listing at about 32 KiB/s read it to its end, where the
/// default (64 KiB/s) cuts it a few seconds in (about `http_idle` of slack, drained by a
/// quarter second every half second); nothing is counted as slow or idle.
#[tokio::test]
async fn a_reader_slower_than_the_default_minimum_rate_reads_its_answer_whole_under_a_lower_one() {
    use tokio::io::AsyncReadExt;
    const IDLE: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.limits.http_idle = IDLE;
    cfg.limits.min_answer_rate = 1024;
    // A small send buffer, as in the test of readers cut above: the coordinator writes each
    // time the reader takes 16 KiB.
    let c = coordinator_with_small_send_buffers(cfg).await;
    // 60 tasks of 4 KiB: a listing of about 270 KB, several times what the default lets the
    // reader below take before it is cut (about 130 KB).
    c.client().submit_padded("big", 60, 4096).await;
    let mut s = listing_reader(c.addr).await;
    // The chunked answer's end; the connection stays open after it.
    const END: &[u8] = b"\r\n0\r\n\r\n";
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // 16 KiB every half second: the whole listing in about 9 s; at most 120 rounds (60 s).
    'rounds: for _ in 0..120 {
        tokio::time::sleep(IDLE / 4).await;
        let mut took = 0;
        while took < 16 * 1024 {
            match tokio::time::timeout(IDLE, s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    took += n;
                    got.extend_from_slice(&buf[..n]);
                    if got.ends_with(END) {
                        break 'rounds;
                    }
                }
                // Cut (closed or reset), or nothing sent within `http_idle`.
                _ => break 'rounds,
            }
        }
    }
    assert!(
        got.ends_with(END),
        "the answer was cut after {} bytes",
        got.len()
    );
    assert!(got.len() > 250_000, "{} bytes", got.len());
    let (status, overview) = c.client().get("/api/v1/overview").await;
    assert_eq!(status, 200);
    assert_eq!(counter(&overview, "slow_http_closed"), 0, "{overview}");
    assert_eq!(counter(&overview, "idle_http_closed"), 0, "{overview}");
    c.stop().await;
}
