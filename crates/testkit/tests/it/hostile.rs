//! Hostile clients over real sockets. Each test attacks the coordinator, asserts the clear
//! refusal, and in the same test an honest worker keeps working with nothing lost.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tether_coordinator::auth::WorkerAuth;
use tether_proto::auth::{Challenge, Secret};
use tether_proto::{TaskId, TaskSpec, WorkerId};
use tether_testkit::*;
use tether_worker::{AgentError, ConnState, Executors};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn fleet_secret() -> Secret {
    Secret::new(b"fleet secret for the hostile tests").expect("secret")
}

/// A hand-driven worker connection.
struct Raw {
    ws: Ws,
    id: String,
    welcome: Value,
}

impl Raw {
    async fn connect(c: &TestCoordinator, id: &str) -> Raw {
        let url = format!("ws://{}/api/v1/worker/{id}/ws", c.addr);
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        let mut raw = Raw {
            ws,
            id: id.to_owned(),
            welcome: Value::Null,
        };
        raw.welcome = raw.next().await;
        assert_eq!(raw.welcome["type"], "welcome", "{}", raw.welcome);
        raw
    }

    /// The next JSON frame, skipping pings and pongs; heartbeats while it waits, so the
    /// coordinator does not close a quiet session.
    async fn next(&mut self) -> Value {
        let end = tokio::time::Instant::now() + DEADLINE;
        let mut beat = 0u64;
        loop {
            let m = match tokio::time::timeout(Duration::from_millis(300), self.ws.next()).await {
                Ok(m) => m.expect("open").expect("frame"),
                Err(_) => {
                    assert!(tokio::time::Instant::now() < end, "no frame in time");
                    beat += 1;
                    let hb = json!({"type": "heartbeat", "sequence": beat, "timestamp": chrono::Utc::now()});
                    self.send(&hb).await;
                    continue;
                }
            };
            match m {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The next frame of `ty`, skipping others (heartbeats, assignments...).
    async fn next_of(&mut self, ty: &str) -> Value {
        self.next_of_each(&[ty]).await.remove(0)
    }

    /// One frame of each type in `types`, in any order, skipping others.
    async fn next_of_each(&mut self, types: &[&str]) -> Vec<Value> {
        let end = tokio::time::Instant::now() + DEADLINE;
        let mut found: Vec<Option<Value>> = vec![None; types.len()];
        while found.iter().any(Option::is_none) {
            assert!(
                tokio::time::Instant::now() < end,
                "no {types:?} in time; have {found:?}"
            );
            let v = self.next().await;
            if let Some(i) = types.iter().position(|t| v["type"] == *t)
                && found[i].is_none()
            {
                found[i] = Some(v);
            }
        }
        found.into_iter().flatten().collect()
    }

    async fn send(&mut self, v: &Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    /// The close code the coordinator ends with, skipping other frames.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(DEADLINE, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return None,
                Err(_) => panic!("no close in time"),
            }
        }
    }

    /// A registration, signed over this connection's nonce when `secret` is given.
    fn registration(&self, secret: Option<&Secret>, capabilities: &[&str]) -> Value {
        let ts = chrono::Utc::now();
        let boot = "b-raw";
        let mut reg = json!({
            "type": "registration",
            "worker_id": self.id,
            "protocol_version": tether_proto::PROTOCOL_VERSION,
            "boot_id": boot,
            "capabilities": capabilities,
            "slots": 1,
            "executors": ["sleep"],
            "timestamp": ts,
        });
        if let (Some(secret), Some(nonce)) = (secret, self.welcome["nonce"].as_str()) {
            let id = WorkerId::parse(&self.id).expect("id");
            reg["signature"] = Challenge {
                worker: &id,
                nonce,
                timestamp: ts,
                boot_id: boot,
            }
            .sign(secret)
            .into();
        }
        reg
    }
}

fn counter(o: &Value, name: &str) -> u64 {
    o["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {o}"))
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
    honest
        .handle
        .wait_state(|s| s == ConnState::Connected)
        .await;

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
    assert_eq!(counter(&o, "auth_failures"), 1, "{o}");
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
    w.handle.wait_state(|s| s == ConnState::Connected).await;
    relay.cut();
    w.handle.wait_state(|s| s != ConnState::Connected).await;
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
        fleet: Some(fleet_secret()),
        dir: Some(secrets.path().to_owned()),
        max_skew: Duration::from_secs(30),
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
    special
        .handle
        .wait_state(|s| s == ConnState::Connected)
        .await;
    other.handle.wait_state(|s| s == ConnState::Connected).await;
    honest_work_completes(&c.client(), 4).await;
    special.stop().await.expect("clean stop");
    other.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn a_replayed_or_repeated_handshake_is_refused_and_the_honest_session_is_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = authed_coordinator(dir.path()).await;
    let honest = honest_worker(&c, "honest");
    honest
        .handle
        .wait_state(|s| s == ConnState::Connected)
        .await;

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
    let e = first.next_of("error").await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    drop(first);
    // ...and replaying it on a new connection meets a new nonce: refused, closed with 4001.
    let mut replay = Raw::connect(&c, "victim").await;
    assert_ne!(replay.welcome["nonce"].as_str(), Some(nonce.as_str()));
    replay.send(&captured).await;
    let e = replay.next_of("error").await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    assert_eq!(replay.close_code().await, Some(4001));
    // An unsigned registration and other frames before it are refused too.
    let mut unsigned = Raw::connect(&c, "victim").await;
    unsigned
        .send(&json!({"type": "task_state", "seq": 1, "task_id": "t-x", "attempt": 1, "state": {}, "timestamp": chrono::Utc::now()}))
        .await;
    let e = unsigned.next_of("error").await;
    assert_eq!(e["code"], "unexpected", "{e}");
    let reg = unsigned.registration(None, &[]);
    unsigned.send(&reg).await;
    let e = unsigned.next_of("error").await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no signature"),
        "{e}"
    );
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
    let honest = spawn_worker(
        fast_worker_config(&c.ws_url(), "honest"),
        Executors::builtin(),
    );
    honest
        .handle
        .wait_state(|s| s == ConnState::Connected)
        .await;
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
    w.handle.wait_state(|s| s == ConnState::Connected).await;
    let ids = admin.submit(&[sleep_task(50, 1, 0)]).await;
    admin.wait_status(&ids[0], "completed").await;
    let (s, v) = reader.get(&format!("/api/v1/tasks/{}", ids[0])).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("completed")));
    let o = admin.overview().await;
    assert_eq!(counter(&o, "api_auth_failures"), 5, "{o}");
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
    let http = reqwest::Client::new();
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
