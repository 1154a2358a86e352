use futures_util::{SinkExt, StreamExt};
use tether_testkit::*;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{coordinator, coordinator_with};

async fn next_json(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> serde_json::Value {
    loop {
        match ws.next().await.expect("frame").expect("ok") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn unknown_and_malformed_frames_get_an_error_reply_and_the_session_survives() {
    let (_dir, c) = coordinator().await;
    let url = format!("ws://{}/api/v1/worker/raw-1/ws", c.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    for (frame, code) in [
        (r#"{"type":"launch_missiles","seq":41}"#, "unknown_type"),
        ("this is not json", "bad_frame"),
        (r#"{"type":"task_result","seq":42}"#, "bad_frame"),
    ] {
        ws.send(Message::text(frame)).await.expect("send");
        let e = next_json(&mut ws).await;
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["code"], code, "{e}");
    }
    let e = {
        ws.send(Message::text(r#"{"type":"launch_missiles","seq":41}"#))
            .await
            .expect("send");
        next_json(&mut ws).await
    };
    assert_eq!(e["offending_type"], "launch_missiles");
    assert_eq!(e["ref_seq"], 41);
    // Still alive: a heartbeat is answered.
    ws.send(Message::text(
        r#"{"type":"heartbeat","sequence":9,"active_tasks":[],"timestamp":"2026-01-01T00:00:00Z"}"#,
    ))
    .await
    .expect("send");
    let hb = next_json(&mut ws).await;
    assert_eq!(hb["type"], "heartbeat");
    assert_eq!(hb["response_to"], 9);
    // Before registration, other messages are refused with a clear error.
    ws.send(Message::text(
        r#"{"type":"telemetry","seq":1,"connection_stats":{"state":"x","connection_attempts":0,"successful_connections":0,"failed_connections":0,"disconnections":0,"connected_secs":0,"total_secs":0,"stability":1,"success_rate":1,"rtt_samples":0,"rtt_avg_ms":0,"rtt_p50_ms":0,"rtt_p95_ms":0,"rtt_p99_ms":0,"reconnects":0,"reconnect_avg_ms":0,"reconnect_max_ms":0,"heartbeat_timeout_ms":0,"backoff_factor":0,"next_backoff_ms":0},"timestamp":"2026-01-01T00:00:00Z"}"#,
    ))
    .await
    .expect("send");
    let e = next_json(&mut ws).await;
    assert_eq!(e["code"], "unexpected", "{e}");
    let o = c.client().overview().await;
    assert_eq!(o["counters"]["unknown_frames"], 2, "{o}");
    assert_eq!(o["counters"]["malformed_frames"], 2, "{o}");
    c.stop().await;
}

#[tokio::test]
async fn bad_upgrade_paths_are_refused_before_the_upgrade() {
    let (_dir, c) = coordinator().await;
    for (path, status) in [
        ("/api/v1/worker/%7Bworker_id%7D/ws", 400),
        ("/api/v1/worker/a%2Fb/ws", 400),
        ("/api/v1/worker/abc/x/ws", 404),
        ("/api/v1/worker/abc/ws/", 404),
        ("/api/v1/nothing", 404),
    ] {
        let url = format!("ws://{}{}", c.addr, path);
        match tokio_tungstenite::connect_async(&url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), status, "{path}")
            }
            other => panic!("{path}: expected an HTTP refusal, got {other:?}"),
        }
    }
    c.stop().await;
}

#[tokio::test]
async fn an_oversize_frame_closes_the_session_with_1009() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.max_frame = 64 * 1024;
    })
    .await;
    let url = format!("ws://{}/api/v1/worker/big/ws", c.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    let big = format!(
        r#"{{"type":"heartbeat","pad":"{}"}}"#,
        "x".repeat(100 * 1024)
    );
    let _ = ws.send(Message::text(big)).await;
    let mut code = None;
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Close(f) = m {
            code = f.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1009));
    // The coordinator goes on serving others.
    let (s, _) = c.client().get("/healthz").await;
    assert_eq!(s, 200);
    c.stop().await;
}

#[tokio::test]
async fn the_coordinator_decodes_and_handles_every_worker_message() {
    use tether_proto::msg::WorkerMsg;
    let (_dir, c) = coordinator().await;
    let url = format!("ws://{}/api/v1/worker/worker-sample/ws", c.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    let samples = tether_proto::samples::worker_messages();
    let mut handled = Vec::new();
    let mut pending = std::collections::VecDeque::new();
    for (k, msg) in samples.iter().enumerate() {
        // Every message its own ack here (`acks` is tested in batching.rs).
        let msg = &match msg {
            WorkerMsg::Registration(r) => {
                WorkerMsg::Registration(tether_proto::msg::Registration {
                    compact_acks: false,
                    ..r.clone()
                })
            }
            m => m.clone(),
        };
        ws.send(Message::text(tether_proto::encode(msg)))
            .await
            .expect("send");
        // A telemetry message after each one marks the end of its replies: its ack goes
        // through the core after theirs (heartbeats are answered by the session directly and
        // could overtake them).
        let marker = 1000 + k as u64;
        let mut telemetry = samples
            .iter()
            .find_map(|m| match m {
                WorkerMsg::Telemetry(t) => Some(t.clone()),
                _ => None,
            })
            .expect("a telemetry sample");
        telemetry.seq = tether_proto::Seq(marker);
        ws.send(Message::text(tether_proto::encode(&WorkerMsg::Telemetry(
            telemetry,
        ))))
        .await
        .expect("send");
        // The sample registration offers batching, so replies after the ack may come in
        // batch frames: read message by message.
        let mut replies = Vec::new();
        loop {
            if pending.is_empty() {
                pending.extend(messages_of(next_json(&mut ws).await));
            }
            let Some(v) = pending.pop_front() else {
                continue;
            };
            if v["type"] == "telemetry_ack" && v["ack_seq"] == marker {
                break;
            }
            replies.push(v);
        }
        for r in &replies {
            assert!(
                !(r["type"] == "error"
                    && (r["code"] == "unknown_type" || r["code"] == "bad_frame")),
                "{} was not understood: {r}",
                msg.type_name()
            );
        }
        let types: Vec<String> = replies
            .iter()
            .map(|r| r["type"].as_str().unwrap_or_default().to_owned())
            .collect();
        match msg {
            WorkerMsg::Registration(_) => assert!(types.contains(&"registration_ack".to_owned())),
            // A fetch is answered by its piece (here a refusal: the sample task is not leased).
            WorkerMsg::CheckpointFetch(_) => {
                assert!(types.contains(&"checkpoint_piece".to_owned()), "{types:?}")
            }
            m if m.seq().is_some() => {
                let want = format!("{}_ack", m.type_name());
                assert!(types.contains(&want), "{} got {types:?}", m.type_name());
            }
            _ => {}
        }
        handled.push(msg.type_name());
    }
    assert_eq!(handled.len(), tether_proto::msg::WORKER_MSG_TYPES.len());
    let o = c.client().overview().await;
    assert_eq!(o["counters"]["unknown_frames"], 0);
    assert_eq!(o["counters"]["malformed_frames"], 0);
    c.stop().await;
}

/// A registration of `id` with nothing of a welcome in it (no signature).
fn bare_registration(id: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "registration",
        "worker_id": id,
        "protocol_version": tether_proto::PROTOCOL_VERSION,
        "boot_id": "b-1",
        "capabilities": [],
        "slots": 1,
        "executors": ["sleep"],
        "timestamp": chrono::Utc::now(),
    })
}

#[tokio::test]
async fn a_worker_that_registers_first_gets_its_welcome_with_the_acknowledgement() {
    let (_dir, c) = coordinator().await;
    let url = |addr, id: &str, query: &str| format!("ws://{addr}/api/v1/worker/{id}/ws{query}");
    let quiet = std::time::Duration::from_millis(300);

    // Saying so: nothing comes before the registration; then the welcome, then its ack.
    let (mut ws, _) = tokio_tungstenite::connect_async(url(c.addr, "p1", "?pipelined=1"))
        .await
        .expect("connect");
    assert!(
        tokio::time::timeout(quiet, ws.next()).await.is_err(),
        "the welcome waits for the registration"
    );
    ws.send(Message::text(bare_registration("p1").to_string()))
        .await
        .expect("send");
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["worker_id"], "p1", "{welcome}");
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "registration_ack", "{ack}");

    // Not saying so: the welcome comes at once, as a worker that waits for it needs.
    let (mut ws, _) = tokio_tungstenite::connect_async(url(c.addr, "p2", ""))
        .await
        .expect("connect");
    let welcome = tokio::time::timeout(DEADLINE, next_json(&mut ws))
        .await
        .expect("a welcome without a registration");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    c.stop().await;

    // A coordinator that asks authentication never holds it: its nonce is to be signed.
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.auth = Some(tether_coordinator::auth::WorkerAuth::fleet(
            tether_proto::auth::Secret::new(b"a fleet secret of the frames test").expect("secret"),
        ));
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url(c.addr, "p3", "?pipelined=1"))
        .await
        .expect("connect");
    let welcome = tokio::time::timeout(DEADLINE, next_json(&mut ws))
        .await
        .expect("a welcome without a registration");
    assert!(welcome["nonce"].is_string(), "{welcome}");
    c.stop().await;
}

/// A worker whose registration is larger than the coordinator's frames take (long tags, a
/// coordinator at the smallest `max_frame`) is closed with 1009 at every registration: it stops
/// with an error that says so, instead of reconnecting for ever.
#[tokio::test]
async fn a_registration_too_large_for_the_coordinator_stops_the_worker_saying_why() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.max_frame = tether_proto::settings::MIN_FRAME;
    })
    .await;
    let mut wcfg = fast_worker_config(&c.ws_url(), "w-tags");
    // Within the bounds of a registration's labels (200 of 200 bytes), past the frame.
    wcfg.capabilities = (0..200).map(|i| format!("{i:0200}")).collect();
    let w = spawn_worker(wcfg, tether_worker::Executors::builtin());
    let ended = tokio::time::timeout(DEADLINE, w.join)
        .await
        .expect("the worker stops instead of reconnecting for ever")
        .expect("agent task");
    match ended {
        Err(tether_worker::AgentError::Refused(why)) => {
            assert!(
                why.contains("registration") && why.contains("1009"),
                "{why}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        c.handles
            .counters
            .oversize_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    c.stop().await;
}

/// What answers a registration sent after `beats` heartbeats, each answered and its reply read
/// here as it comes (nothing else is sent): the registration's ack, or the close code.
async fn registration_after_heartbeats(c: &TestCoordinator, id: &str, beats: u64) -> String {
    let url = format!("ws://{}/api/v1/worker/{id}/ws", c.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    for sequence in 1..=beats {
        let hb = serde_json::json!({"type": "heartbeat", "sequence": sequence,
            "timestamp": chrono::Utc::now()});
        if ws.send(Message::text(hb.to_string())).await.is_err() {
            break;
        }
        // The 17th frame is refused, not answered.
        if sequence <= 16 {
            let reply = next_json(&mut ws).await;
            assert_eq!(reply["response_to"], sequence, "{reply}");
        }
    }
    let _ = ws
        .send(Message::text(bare_registration(id).to_string()))
        .await;
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("an answer in time");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                if v["type"] == "registration_ack" {
                    return "registration_ack".into();
                }
                panic!("{beats} heartbeats: {v}");
            }
            Some(Ok(Message::Close(f))) => {
                return format!("close {:?}", f.map(|f| u16::from(f.code)));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return format!("error {e}"),
            None => return "ended".into(),
        }
    }
}

/// Before its registration a connection may send 16 other frames (section 3 and the close
/// codes' table): the registration after them is taken, while a 17th other frame ends the
/// connection with 1008. The coordinator read 16 frames in all, so a registration as the
/// 17th frame was refused.
#[tokio::test]
async fn sixteen_frames_before_a_registration_are_allowed_and_a_seventeenth_is_refused() {
    let (_dir, c) = coordinator().await;
    assert_eq!(
        registration_after_heartbeats(&c, "beats-16", 16).await,
        "registration_ack"
    );
    assert_eq!(
        registration_after_heartbeats(&c, "beats-17", 17).await,
        "close Some(1008)"
    );
    let o = c.client().overview().await;
    assert_eq!(o["counters"]["pre_registration_overflows"], 1, "{o}");
    c.stop().await;
}
