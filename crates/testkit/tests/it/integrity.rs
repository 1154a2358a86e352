//! Per-message integrity tags over real sockets: honest sessions tag every frame both ways,
//! forged, replayed and corrupted frames are dropped and counted, repeated failures close the
//! session, and honest work completes with nothing lost or recorded twice.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tether_coordinator::auth::WorkerAuth;
use tether_faultproxy::{Direction as ProxyDirection, Fault, FaultKind};
use tether_proto::auth::{Challenge, NONCE_BYTES, Secret, to_hex};
use tether_proto::integrity::{Direction, HMAC_SHA256, Opener, Sealer, SessionKey};
use tether_proto::{TaskId, TaskSpec, WorkerId};
use tether_testkit::*;
use tether_worker::{AgentError, ConnState, Executors};
use tokio_tungstenite::tungstenite::Message;

use crate::faults::proxy_in_front;
use crate::raw::Ws;
use crate::support::{builtin_and, connected, coordinator_with};

fn secret() -> Secret {
    Secret::new(b"fleet secret for the integrity tests").expect("secret")
}

/// A coordinator that requires the fleet secret and per-message integrity, in a new temporary
/// directory: the directory, and the coordinator.
async fn mac_coordinator() -> (tempfile::TempDir, TestCoordinator) {
    coordinator_with(|cfg| {
        let mut auth = WorkerAuth::fleet(secret());
        auth.message_mac = true;
        cfg.auth = Some(auth);
    })
    .await
}

/// A worker with the fleet secret, connected.
async fn honest_worker(url: &str, id: &str) -> TestWorker {
    let mut cfg = fast_worker_config(url, id);
    cfg.secret = Some(secret());
    connected(cfg, Executors::builtin()).await
}

fn counter(o: &Value, name: &str) -> u64 {
    o["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {o}"))
}

/// Submits `n` sleep tasks of `steps` steps and waits until each completed with exactly one
/// result whose body is the one the executor produced.
async fn work_completes_intact(client: &Client, n: usize, steps: u32) -> Vec<TaskId> {
    let specs: Vec<_> = (0..n).map(|_| sleep_task(40, steps, 1)).collect();
    let ids = client.submit(&specs).await;
    for id in &ids {
        client.wait_status(id, "completed").await;
        let results = client.results(id).await;
        assert_eq!(results.len(), 1, "task {id}: {results:?}");
        assert_eq!(
            results[0]["body"]["result"]["steps"],
            json!(steps),
            "task {id}: {results:?}"
        );
    }
    ids
}

/// A hand-driven worker that keys its session like a real one, and can also misbehave.
struct Keyed {
    ws: Ws,
    seal: Sealer,
    open: Opener,
    /// Every tagged frame sent so far, for replays.
    sent: Vec<String>,
}

enum Frame {
    Msg(Value),
    /// A data frame whose tag did not verify.
    BadTag,
    Closed(Option<u16>),
}

impl Keyed {
    /// Connects as `id`; the registration is signed and tagged with `key_secret`, and carries
    /// a client nonce (the key is derived from `key_nonce` when given, to fake a mismatch).
    async fn connect(
        c: &TestCoordinator,
        id: &str,
        key_secret: &Secret,
        tag_registration: bool,
        key_nonce: Option<&str>,
    ) -> (Keyed, Value) {
        Self::connect_speaking(
            c,
            id,
            key_secret,
            tag_registration,
            key_nonce,
            tether_proto::PROTOCOL_VERSION,
        )
        .await
    }

    /// [`Keyed::connect`], registering with `protocol_version`.
    async fn connect_speaking(
        c: &TestCoordinator,
        id: &str,
        key_secret: &Secret,
        tag_registration: bool,
        key_nonce: Option<&str>,
        protocol_version: u32,
    ) -> (Keyed, Value) {
        let url = format!("ws://{}/api/v1/worker/{id}/ws", c.addr);
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        let welcome = match ws.next().await.expect("open").expect("frame") {
            Message::Text(t) => serde_json::from_str::<Value>(t.as_str()).expect("json"),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(welcome["integrity"], HMAC_SHA256, "{welcome}");
        let nonce = welcome["nonce"].as_str().expect("nonce").to_owned();
        let worker = WorkerId::parse(id).expect("id");
        let client_nonce = to_hex(&rand::random::<[u8; NONCE_BYTES]>());
        let key = SessionKey::derive(
            &secret(),
            &worker,
            &nonce,
            key_nonce.unwrap_or(&client_nonce),
        );
        let ts = chrono::Utc::now();
        let reg = json!({
            "type": "registration",
            "worker_id": id,
            "protocol_version": protocol_version,
            "boot_id": "b-keyed",
            "capabilities": ["keyed-only"],
            "slots": 1,
            "executors": ["sleep"],
            "client_nonce": client_nonce,
            "signature": Challenge { worker: &worker, nonce: &nonce, timestamp: ts, boot_id: "b-keyed" }.sign(key_secret),
            "timestamp": ts,
        });
        let mut k = Keyed {
            ws,
            seal: Sealer::new(key.clone(), Direction::ToCoordinator),
            open: Opener::new(key, Direction::ToWorker),
            sent: Vec::new(),
        };
        if tag_registration {
            k.send(&reg).await;
        } else {
            k.send_raw(reg.to_string()).await;
        }
        (k, welcome)
    }

    async fn send(&mut self, v: &Value) {
        let framed = self.seal.seal_text(v.to_string());
        self.sent.push(framed.clone());
        self.send_raw(framed).await;
    }

    async fn send_raw(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next data frame, its tag checked; pings and pongs skipped.
    async fn next(&mut self) -> Frame {
        loop {
            let m = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("a frame in time");
            let text = match m {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(f))) => return Frame::Closed(f.map(|f| u16::from(f.code))),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                Some(Err(_)) | None => return Frame::Closed(None),
            };
            return match self.open.open_text(text.as_str()) {
                Ok(body) => Frame::Msg(serde_json::from_str(body).expect("json")),
                Err(_) => {
                    // An untagged frame is only acceptable as a refusal before any verified one.
                    if let Ok(v) = serde_json::from_str::<Value>(text.as_str()) {
                        return Frame::Msg(json!({"untagged": v}));
                    }
                    Frame::BadTag
                }
            };
        }
    }

    /// The next verified message of `ty`, answering nothing else; heartbeats keep it alive.
    async fn next_of(&mut self, ty: &str) -> Value {
        let end = tokio::time::Instant::now() + DEADLINE;
        let mut beat = 0;
        loop {
            assert!(tokio::time::Instant::now() < end, "no {ty} in time");
            match tokio::time::timeout(Duration::from_millis(300), self.next()).await {
                Ok(Frame::Msg(v)) if v["type"] == ty => return v,
                Ok(Frame::Msg(_)) => {}
                Ok(Frame::BadTag) => panic!("a coordinator frame failed its tag"),
                Ok(Frame::Closed(code)) => panic!("closed ({code:?}) while waiting for {ty}"),
                Err(_) => {
                    beat += 1;
                    let hb = json!({"type": "heartbeat", "sequence": beat, "timestamp": chrono::Utc::now()});
                    self.send(&hb).await;
                }
            }
        }
    }

    /// An untagged `error` `unauthorized` whose message has `reason`, then close 4001.
    async fn expect_refusal(&mut self, reason: &str) {
        match self.next().await {
            Frame::Msg(v) => {
                let e = &v["untagged"];
                assert_eq!(e["code"], "unauthorized", "{v}");
                assert!(e["message"].as_str().unwrap_or("").contains(reason), "{v}");
            }
            _ => panic!("expected an untagged refusal"),
        }
        assert_eq!(self.close_code().await, Some(4001));
    }

    /// The close code the coordinator ends with, skipping other frames.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            if let Frame::Closed(code) = self.next().await {
                return code;
            }
        }
    }
}

#[tokio::test]
async fn with_message_mac_every_frame_is_tagged_both_ways_and_work_completes() {
    let (_dir, c) = mac_coordinator().await;
    let w = honest_worker(&c.ws_url(), "honest").await;
    work_completes_intact(&c.client(), 6, 3).await;

    // A hand-driven client sees the same: the registration_ack and every later frame verify
    // under the key only it and the coordinator can derive (mutual authentication), and its
    // own tagged frames are accepted.
    let (mut k, _) = Keyed::connect(&c, "keyed", &secret(), true, None).await;
    let ack = k.next_of("registration_ack").await;
    assert_eq!(ack["worker_id"], "keyed");
    let reply = k.next_of("heartbeat").await;
    assert!(reply["response_to"].as_u64().is_some(), "{reply}");
    assert!(k.open.verified() >= 2);
    assert_eq!(k.open.failures(), 0);

    let o = c.client().overview().await;
    assert_eq!(counter(&o, "mac_sessions"), 2, "{o}");
    assert_eq!(counter(&o, "mac_failures"), 0, "{o}");
    assert_eq!(
        w.handle
            .shared
            .mac_failures
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(w.handle.registrations(), 1);
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// A registration whose signature verified but whose protocol is another is refused with an
/// `error` that carries its tag, like every frame after the registration, then close 4002.
#[tokio::test]
async fn a_signed_registration_of_another_protocol_is_refused_with_a_tagged_error() {
    let (_dir, c) = mac_coordinator().await;
    let (mut k, _) = Keyed::connect_speaking(&c, "keyed", &secret(), true, None, 99).await;
    match k.next().await {
        Frame::Msg(v) => assert_eq!(v["code"], "incompatible_protocol", "tagged: {v}"),
        Frame::BadTag => panic!("the refusal failed its tag"),
        Frame::Closed(code) => panic!("closed ({code:?}) without the error"),
    }
    assert_eq!(k.close_code().await, Some(4002));
    let o = c.client().overview().await;
    assert_eq!(
        counter(&o, "auth_ok"),
        0,
        "a refused registration is not counted: {o}"
    );
    c.stop().await;
}

#[tokio::test]
async fn forged_and_replayed_frames_are_dropped_and_counted_and_repeated_failures_close_the_session()
 {
    let (_dir, c) = mac_coordinator().await;
    let honest = honest_worker(&c.ws_url(), "honest").await;
    let client = c.client();

    let (mut k, _) = Keyed::connect(&c, "keyed", &secret(), true, None).await;
    k.next_of("registration_ack").await;
    let mut spec = sleep_task(50, 1, 0);
    spec.requires = vec!["keyed-only".into()];
    let own = client.submit(&[spec]).await[0].clone();
    let a = k.next_of("task_assignment").await;
    assert_eq!(a["task_id"], own.as_str());
    let ts = chrono::Utc::now();
    let result = |seq: u64, steps: u64| {
        json!({"type": "task_result", "seq": seq, "task_id": own, "attempt": 1,
               "outcome": "completed", "result": {"steps": steps},
               "started_at": ts, "finished_at": ts, "duration_ms": 1, "timestamp": ts})
    };

    // 1. A result altered in flight: the genuine frame with one byte changed.
    let genuine = k.seal.seal_text(result(1, 1).to_string());
    let altered = genuine.replacen("\"steps\":1", "\"steps\":9", 1);
    assert_ne!(altered, genuine);
    k.send_raw(altered).await;
    let e = k.next_of("error").await;
    assert_eq!(e["code"], "bad_mac", "{e}");
    // 2. A replay of the registration frame (a genuine tag, at the wrong place).
    let replay = k.sent[0].clone();
    k.send_raw(replay).await;
    assert_eq!(k.next_of("error").await["code"], "bad_mac");
    // Neither was recorded: the task is still running, without a result.
    assert_eq!(client.status(&own).await, "running");
    assert!(client.results(&own).await.is_empty());
    // 3. The genuine frame, sent as the next one, still verifies and is recorded once.
    k.sent.push(genuine.clone());
    k.send_raw(genuine).await;
    assert_eq!(
        k.next_of("task_result_ack").await["disposition"],
        "recorded"
    );
    let results = client.results(&own).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["body"]["result"]["steps"], 1, "{results:?}");
    // 4. An untagged frame is the third failure: the session is closed (policy, 1008).
    k.send_raw(json!({"type": "heartbeat", "sequence": 99, "timestamp": ts}).to_string())
        .await;
    assert_eq!(k.close_code().await, Some(1008));

    let o = client.overview().await;
    assert_eq!(counter(&o, "mac_failures"), 3, "{o}");
    // Honest work never noticed.
    work_completes_intact(&client, 4, 2).await;
    assert_eq!(honest.handle.registrations(), 1);
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn registrations_without_a_tag_or_under_another_key_are_refused_with_4001() {
    let (_dir, c) = mac_coordinator().await;
    let honest = honest_worker(&c.ws_url(), "honest").await;

    // Signed but untagged: the coordinator requires tags.
    let (mut k, _) = Keyed::connect(&c, "k1", &secret(), false, None).await;
    k.expect_refusal("requires per-message integrity").await;
    // Tagged under a key of another client nonce than the one it announces (a spliced
    // registration): refused.
    let other = "ab".repeat(NONCE_BYTES);
    let (mut k, _) = Keyed::connect(&c, "k2", &secret(), true, Some(&other)).await;
    k.expect_refusal("integrity tag does not verify").await;
    // A worker with the wrong secret is refused as before.
    let mut wrong = fast_worker_config(&c.ws_url(), "wrong");
    wrong.secret = Some(Secret::new(b"not the fleet secret at all").expect("secret"));
    let wrong = spawn_worker(wrong, Executors::builtin());
    match tokio::time::timeout(DEADLINE, wrong.join)
        .await
        .expect("stops")
        .expect("task")
    {
        Err(AgentError::Refused(msg)) => assert!(msg.contains("authentication failed"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    let o = c.client().overview().await;
    // Two hand-driven refusals, and the worker's three attempts before it stopped.
    assert_eq!(counter(&o, "auth_failures"), 5, "{o}");
    work_completes_intact(&c.client(), 3, 2).await;
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn a_worker_that_requires_integrity_never_registers_with_a_coordinator_that_does_not_ask() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.auth = Some(WorkerAuth::fleet(secret()));
    })
    .await;
    let mut strict = fast_worker_config(&c.ws_url(), "strict");
    strict.secret = Some(secret());
    strict.require_message_mac = true;
    let strict = spawn_worker(strict, Executors::builtin());
    // A welcome without integrity is a failed attempt, retried (a damaged or stripped welcome
    // must not stop the worker for good), never a session.
    wait_for("failed attempts of the strict worker", DEADLINE, || {
        let failed = strict.handle.stats().failed_connections;
        async move { (failed >= 2).then_some(()) }
    })
    .await;
    assert_eq!(strict.handle.registrations(), 0);
    strict.stop().await.expect("clean stop");
    // Without the requirement, the same worker registers untagged.
    let w = honest_worker(&c.ws_url(), "relaxed").await;
    work_completes_intact(&c.client(), 2, 2).await;
    let o = c.client().overview().await;
    assert_eq!(counter(&o, "mac_sessions"), 0, "{o}");
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// `bytes` lowercase letters drawn from `seed` (xorshift): a result whose every byte a flip
/// could change into another that still reads as JSON.
fn letters(seed: u64, bytes: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// Bytes flipped on the wire, both ways, for as long as the work takes: every result crosses
/// the corrupting link (a session ends at its first failed tag, by design, and the next one
/// carries what is left), and each is recorded once, whole, as the task produced it.
#[tokio::test]
async fn bytes_corrupted_on_the_wire_are_caught_by_the_tags_and_nothing_corrupted_is_recorded() {
    let (_dir, c) = coordinator_with(|cfg| {
        let mut auth = WorkerAuth::fleet(secret());
        auth.message_mac = true;
        cfg.auth = Some(auth);
        // The worker keeps its leases however long its sessions keep dying: every result is of
        // the first attempt, so the whole of it is known.
        cfg.lost_after = Duration::from_secs(600);
    })
    .await;
    let proxy = proxy_in_front(&c, 29).await;
    // `text` returns a kilobyte and a half of letters: most of what a result frame carries is
    // bytes a flip leaves readable, so a flip that got past the tags would show in a record.
    let text = executor(|input, _ctx| async move {
        let seed = input.config["seed"].as_u64().unwrap_or(0);
        Ok(json!({ "text": letters(seed, 1500) }))
    });
    let mut wcfg = fast_worker_config(&format!("ws://{}", proxy.listen_addr()), "w1");
    wcfg.secret = Some(secret());
    let w = connected(wcfg, builtin_and("text", text)).await;
    let client = c.client();
    // A flip every 5 kB or so, both ways: a session lives long enough to carry some messages
    // (at 0.0005, a session rarely outlived its registration: the eight `sleep` tasks alone
    // took 15 s and 10 sessions; here the sixteen take about 8 s and 10).
    let flips = proxy
        .add_fault(Fault::new(
            "flips",
            FaultKind::Corrupt { rate: 0.0002 },
            ProxyDirection::Both,
        ))
        .await
        .expect("fault");
    let recorded = || async { counter(&client.overview().await, "results_recorded") };
    let before = recorded().await;
    // Tasks whose every step is a tagged state update and a checkpoint, so frames flow both
    // ways while the link flips bits; and tasks whose results are mostly letters.
    let mut specs: Vec<_> = (0..8).map(|_| sleep_task(60, 10, 1)).collect();
    specs.extend((0..8u64).map(|seed| TaskSpec::new("text", json!({ "seed": seed }))));
    let ids = client.submit(&specs).await;
    let worker_failures = || {
        w.handle
            .shared
            .mac_failures
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    // The fault stays on until every task completed and corrupted frames failed their tags on
    // both sides.
    let what = "every task completed, and tags failed on both sides, over the corrupting link";
    wait_for(what, 4 * DEADLINE, || async {
        for id in &ids {
            if client.status(id).await != "completed" {
                return None;
            }
        }
        let o = client.overview().await;
        (counter(&o, "mac_failures") > 0 && worker_failures() > 0).then_some(())
    })
    .await;
    assert_eq!(
        recorded().await - before,
        ids.len() as u64,
        "every result was recorded while the link corrupted"
    );
    let stats = flips.remove();
    assert!(stats.bytes_corrupted > 0, "the fault fired: {stats:?}");
    for (i, id) in ids.iter().enumerate() {
        let results = client.results(id).await;
        assert_eq!(results.len(), 1, "task {id}: {results:?}");
        let r = &results[0];
        assert_eq!(r["stale"], false, "task {id}: {r}");
        assert_eq!(r["attempt"], 1, "task {id}: {r}");
        assert_eq!(r["body"]["attempt"], r["attempt"], "task {id}: {r}");
        assert_eq!(r["body"]["task_id"], json!(id), "task {id}: {r}");
        assert_eq!(r["body"]["outcome"], "completed", "task {id}: {r}");
        // All of what the task returns: a `sleep` task's ten steps, from the start, in
        // attempt 1; a `text` task's letters.
        let expected = match i {
            0..8 => json!({"steps": 10, "resumed_at": 0, "attempt": 1}),
            _ => json!({ "text": letters(i as u64 - 8, 1500) }),
        };
        assert!(r["body"]["result"] == expected, "task {id}: {r}");
    }
    // The damaged sessions were replaced by fresh ones, and work goes on.
    assert!(
        w.handle.registrations() >= 2,
        "{}",
        w.handle.registrations()
    );
    work_completes_intact(&client, 2, 2).await;
    w.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn with_message_mac_only_verified_frames_keep_a_session_alive() {
    let (_dir, c) = mac_coordinator().await;
    let (mut k, _) = Keyed::connect(&c, "pinger", &secret(), true, None).await;
    k.next_of("registration_ack").await;
    // Whoever holds the connection (the worker's host gone) may send pings and frames that
    // fail their tags; none of it is the worker, and its session must end at its timeout
    // (2 s here) for its tasks to move on.
    let started = tokio::time::Instant::now();
    loop {
        assert!(
            started.elapsed() < DEADLINE,
            "the session outlived its timeout on untagged frames"
        );
        if k.ws.send(Message::Ping(vec![1].into())).await.is_err() {
            break;
        }
        let next = tokio::time::timeout(Duration::from_millis(300), k.ws.next()).await;
        if let Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) = next {
            break;
        }
    }
    c.stop().await;
}

/// A coordinator driven by hand that keys its sessions as a real one does: it welcomes a
/// worker with a nonce and asks for tags, reads the registration and acknowledges it, tagged.
/// What comes next (pings, closes) is the test's.
struct KeyedCoordinator {
    listener: tokio::net::TcpListener,
}

type ServerWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

impl KeyedCoordinator {
    async fn bind() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self { listener }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.listener.local_addr().expect("addr"))
    }

    /// Accepts the worker's next connection and registers it; the session's sealer.
    async fn register_next(&self, id: &str) -> (ServerWs, Sealer) {
        let (mut ws, mut seal) = self.read_registration(id).await;
        let ack = json!({
            "type": "registration_ack", "worker_id": id, "session_id": 1, "directives": [],
            "timestamp": chrono::Utc::now(),
        });
        let ack = seal.seal_text(ack.to_string());
        ws.send(Message::text(ack)).await.expect("ack");
        (ws, seal)
    }

    /// Accepts the worker's next connection, welcomes it and reads its registration, leaving
    /// the answer to the test; the session's sealer.
    async fn read_registration(&self, id: &str) -> (ServerWs, Sealer) {
        let (tcp, _) = tokio::time::timeout(DEADLINE, self.listener.accept())
            .await
            .expect("the worker connects again in time")
            .expect("accept");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let nonce = to_hex(&rand::random::<[u8; NONCE_BYTES]>());
        let welcome = json!({
            "type": "welcome", "worker_id": id, "protocol_version": tether_proto::PROTOCOL_VERSION,
            "session_id": 1, "heartbeat_interval_ms": 200, "heartbeat_timeout_ms": 2000,
            "nonce": nonce, "integrity": HMAC_SHA256, "timestamp": chrono::Utc::now(),
        });
        ws.send(Message::text(welcome.to_string()))
            .await
            .expect("welcome");
        let reg = loop {
            match ws.next().await.expect("registration").expect("frame") {
                Message::Text(t) => {
                    let body = tether_proto::integrity::peek_text(t.as_str());
                    break serde_json::from_str::<Value>(body).expect("json");
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected the registration, got {other:?}"),
            }
        };
        assert_eq!(reg["type"], "registration", "{reg}");
        let client_nonce = reg["client_nonce"].as_str().expect("client nonce");
        let worker = WorkerId::parse(id).expect("id");
        let key = SessionKey::derive(&secret(), &worker, &nonce, client_nonce);
        (ws, Sealer::new(key, Direction::ToWorker))
    }
}

/// Answers a registration with an untagged refusal: `error` `unauthorized` and close 4001, as
/// a coordinator that cannot check the signature does, or with the close alone.
async fn refuse_untagged(ws: &mut ServerWs, with_error: bool) {
    if with_error {
        let refusal = json!({
            "type": "error", "code": "unauthorized", "message": "authentication failed",
            "timestamp": chrono::Utc::now(),
        });
        // The worker may have hung up already: what it read is what counts.
        let _ = ws.send(Message::text(refusal.to_string())).await;
    }
    let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 4001u16.into(),
        reason: "authentication failed".into(),
    };
    let _ = ws.close(Some(frame)).await;
}

/// A worker with the fleet secret, against `c`.
fn keyed_worker(c: &KeyedCoordinator, id: &str) -> TestWorker {
    let mut cfg = fast_worker_config(&c.url(), id);
    cfg.secret = Some(secret());
    spawn_worker(cfg, Executors::builtin())
}

/// Sends a ping every 300 ms (`tagged` by `seal`, or empty) and reads what the worker sends,
/// for `how_long` or until the worker ends the session; whether it ended it.
async fn ping(ws: &mut ServerWs, seal: Option<&mut Sealer>, how_long: Duration) -> bool {
    let mut seal = seal;
    let end = tokio::time::Instant::now() + how_long;
    while tokio::time::Instant::now() < end {
        let payload = seal.as_mut().map(|s| s.seal_ping().to_vec());
        if ws
            .send(Message::Ping(payload.unwrap_or_default().into()))
            .await
            .is_err()
        {
            return true;
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(frame) = tokio::time::timeout_at(until, ws.next()).await {
            if let None | Some(Err(_)) | Some(Ok(Message::Close(_))) = frame {
                return true;
            }
        }
    }
    false
}

/// The coordinator pings a worker whose long frame it is still reading. In a keyed session a
/// tagged ping is the coordinator alive; an untagged one could be anyone on the path, and
/// keeping a black-holed session alive on those, the worker would go on holding tasks the
/// coordinator has moved to another worker.
#[tokio::test]
async fn with_message_mac_a_worker_takes_only_tagged_pings_as_its_coordinator_alive() {
    let c = KeyedCoordinator::bind().await;
    let w = keyed_worker(&c, "pinged");
    let (mut ws, mut seal) = c.register_next("pinged").await;
    w.wait_state(|s| s == ConnState::Connected).await;
    // Three of the worker's timeouts (2 s) with nothing but tagged pings: the session lives.
    let ended = ping(&mut ws, Some(&mut seal), Duration::from_secs(6)).await;
    assert!(
        !ended,
        "the worker ended a session its coordinator kept pinging"
    );
    assert_eq!(w.handle.registrations(), 1);
    // Untagged pings: the worker ends the session at its timeout, and connects again.
    let started = tokio::time::Instant::now();
    assert!(
        ping(&mut ws, None, DEADLINE).await,
        "the session outlived its timeout on untagged pings"
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1_500), "ended after {took:?}");
    let _again = c.register_next("pinged").await;
    w.wait_state(|s| s == ConnState::Connected).await;
    w.stop().await.expect("clean stop");
}

/// A close carries no tag. Once registered, a close 4001-4003 is no refusal (anyone on the path
/// could send one): the worker connects again, and only a refusal of its registration counts
/// towards `refusals_before_stop` (3). Four forged closes do not stop it.
#[tokio::test]
async fn with_message_mac_closes_after_the_registration_do_not_stop_a_worker() {
    let c = KeyedCoordinator::bind().await;
    let w = keyed_worker(&c, "closed");
    for code in [4001u16, 4002, 4003, 4001] {
        let (mut ws, _) = c.register_next("closed").await;
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: code.into(),
            reason: "authentication failed".into(),
        };
        ws.close(Some(frame)).await.expect("close");
        assert!(!w.join.is_finished(), "the worker stopped at close {code}");
    }
    let _last = c.register_next("closed").await;
    w.wait_state(|s| s == ConnState::Connected).await;
    assert_eq!(w.handle.registrations(), 5);
    w.stop().await.expect("clean stop");
}

/// A refusal of the registration carries no tag (a coordinator that refuses the signature
/// cannot key the session), so anyone on the path can forge one. A worker that requires
/// integrity (`--message-mac`) does not count it towards `refusals_before_stop` (3): four
/// forged `unauthorized` errors and four forged closes 4001 do not stop it (either kind alone
/// would, counted), and it registers when properly acknowledged.
#[tokio::test]
async fn with_message_mac_required_untagged_refusals_of_the_registration_do_not_stop_a_worker() {
    let c = KeyedCoordinator::bind().await;
    let mut cfg = fast_worker_config(&c.url(), "strict");
    cfg.secret = Some(secret());
    cfg.require_message_mac = true;
    let w = spawn_worker(cfg, Executors::builtin());
    for with_error in [true, true, true, true, false, false, false, false] {
        // Accepted again: the worker did not stop at the refusals before.
        let (mut ws, _) = c.read_registration("strict").await;
        refuse_untagged(&mut ws, with_error).await;
    }
    let _last = c.register_next("strict").await;
    w.wait_state(|s| s == ConnState::Connected).await;
    assert!(!w.join.is_finished(), "the worker stopped");
    assert_eq!(w.handle.registrations(), 1);
    w.stop().await.expect("clean stop");
}

/// Without `--message-mac` an untagged refusal still counts (the coordinator's own refusal of a
/// wrong secret carries no tag, and it should stop the worker): the third stops it. The
/// trade-off is in docs/SECURITY.md.
#[tokio::test]
async fn without_message_mac_required_untagged_refusals_still_stop_a_worker() {
    let c = KeyedCoordinator::bind().await;
    let w = keyed_worker(&c, "relaxed");
    for _ in 0..3 {
        let (mut ws, _) = c.read_registration("relaxed").await;
        refuse_untagged(&mut ws, true).await;
    }
    match tokio::time::timeout(DEADLINE, w.join)
        .await
        .expect("stops")
        .expect("task")
    {
        Err(AgentError::Refused(msg)) => assert!(msg.contains("authentication failed"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Each frame from the coordinator that fails its tag leaves one `tag_failed` record in the
/// worker's event log, whether or not it ends the session: the end-to-end run counts the
/// worker's catches from these (the end of a session said only its third).
#[tokio::test]
async fn each_frame_failing_its_tag_at_the_worker_is_one_record_in_its_event_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("events.jsonl");
    let c = KeyedCoordinator::bind().await;
    let mut cfg = fast_worker_config(&c.url(), "logged");
    cfg.secret = Some(secret());
    cfg.event_log = Some(log.clone());
    let w = spawn_worker(cfg, Executors::builtin());
    let (mut ws, mut seal) = c.register_next("logged").await;
    w.wait_state(|s| s == ConnState::Connected).await;
    let tag_failures = || {
        tether_worker::eventlog::read(&log)
            .expect("event log")
            .records
            .into_iter()
            .filter_map(|r| match r.event {
                tether_worker::eventlog::Event::TagFailed { failures, .. } => Some(failures),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    // A frame altered in flight: its tag no longer verifies. One failure ends nothing.
    let heartbeat = |n: u64| {
        json!({"type": "heartbeat_ack", "sequence": n, "timestamp": chrono::Utc::now()}).to_string()
    };
    let altered = seal
        .seal_text(heartbeat(1))
        .replacen("heartbeat_ack", "heartbeat_acc", 1);
    ws.send(Message::text(altered)).await.expect("send");
    wait_for("one tag_failed record", DEADLINE, || async {
        (tag_failures() == [1]).then_some(())
    })
    .await;
    assert!(
        !ping(&mut ws, Some(&mut seal), Duration::from_millis(600)).await,
        "one failed tag ended the session"
    );
    assert_eq!(w.handle.registrations(), 1);
    // Two untagged frames more: the third failure ends the session, each one recorded.
    for n in 2..=3 {
        ws.send(Message::text(heartbeat(n))).await.expect("send");
    }
    wait_for("three tag_failed records", DEADLINE, || async {
        (tag_failures() == [1, 2, 3]).then_some(())
    })
    .await;
    let _again = c.register_next("logged").await;
    w.wait_state(|s| s == ConnState::Connected).await;
    assert_eq!(tag_failures(), [1, 2, 3], "nothing more was recorded");
    w.stop().await.expect("clean stop");
}
