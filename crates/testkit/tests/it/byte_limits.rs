//! Byte limits over real sockets: what a WebSocket connection may send before its session
//! registered, and the bytes per second a session may make the coordinator decode. Each test
//! asserts the limit fired (by its counter) and that an honest worker keeps working.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tether_coordinator::admission::PRE_REGISTRATION_BYTES;
use tether_testkit::*;
use tokio_tungstenite::tungstenite::Message;

use crate::raw::{Raw, counter};
use crate::support::{
    builtin_and, cancel_and_stop, connected, connected_worker, coordinator_with, submit_one,
};

/// An honest worker connects and runs `n` short tasks, each to one result.
async fn honest_work_completes(c: &TestCoordinator, id: &str, n: usize) -> TestWorker {
    let w = connected_worker(&c.ws_url(), id).await;
    let client = c.client();
    let ids = client
        .submit(&(0..n).map(|_| sleep_task(20, 2, 1)).collect::<Vec<_>>())
        .await;
    for id in &ids {
        client.wait_status(id, "completed").await;
        assert_eq!(client.results(id).await.len(), 1, "task {id}");
    }
    w
}

/// A heartbeat padded with `pad` bytes (a field the coordinator ignores): a frame of any size
/// that a session answers.
fn padded_heartbeat(sequence: u64, pad: usize) -> String {
    json!({"type": "heartbeat", "sequence": sequence, "timestamp": chrono::Utc::now(), "pad": "0".repeat(pad)})
        .to_string()
}

/// A registration whose inventory lists `n` unacknowledged results (tasks this coordinator does
/// not know, which need nothing at registration): as a worker back from a long outage sends.
fn long_registration(raw: &Raw, n: usize) -> Value {
    let mut reg = raw.registration(None, &[]);
    let finished: Vec<Value> = (0..n)
        .map(|i| json!({"task_id": format!("t-{i:038}"), "attempt": 1}))
        .collect();
    reg["inventory"] = json!({"finished": finished});
    reg
}

/// Waits for the reply to heartbeat `sequence`, skipping other messages.
async fn heartbeat_reply(raw: &mut Raw, sequence: u64) {
    loop {
        let v = raw.next_of("heartbeat").await;
        if v["response_to"] == sequence {
            return;
        }
    }
}

#[tokio::test]
async fn a_large_frame_before_registration_closes_the_connection_and_after_it_is_taken() {
    // Room in the shared pool for one long registration at a time, not for two (checked
    // below against the registrations' size).
    let pool = 192 * 1024;
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.limits.registration_pool = pool;
    })
    .await;

    // 1 MiB before registering: the coordinator reads its budget, then closes the connection.
    let mut m = Raw::connect(&c, "mallory").await;
    // The write may fail halfway: the coordinator stops reading and closes.
    let _ = m.ws.send(Message::text(padded_heartbeat(1, 1 << 20))).await;
    assert!(
        matches!(m.close_code().await, None | Some(1008)),
        "closed for policy, or reset"
    );
    let o = c.client().overview().await;
    assert_eq!(counter(&o, "pre_registration_overflows"), 1, "{o}");

    // Two registrations listing 3,000 unacknowledged results each (about 190 KB, three times a
    // connection's own budget) register one after the other: the first gives back what it
    // drew from the pool as it registers, while its connection stays open.
    let mut long = Vec::new();
    for id in ["returning-1", "returning-2"] {
        let mut r = Raw::connect(&c, id).await;
        let reg = long_registration(&r, 3_000);
        let len = reg.to_string().len();
        assert!(len > 2 * PRE_REGISTRATION_BYTES);
        assert!(len < PRE_REGISTRATION_BYTES + pool, "one fits");
        assert!(
            2 * (len - PRE_REGISTRATION_BYTES) > pool,
            "two would not, unless the first gave back what it drew"
        );
        r.send(&reg).await;
        r.next_of("registration_ack").await;
        long.push(r);
    }

    // Registered, a session takes frames up to `max_frame`: the same megabyte is answered.
    let r = &mut long[0];
    r.ws.send(Message::text(padded_heartbeat(1001, 1 << 20)))
        .await
        .expect("send");
    heartbeat_reply(r, 1001).await;

    // Meanwhile honest work goes on, and nothing else was cut.
    let honest = honest_work_completes(&c, "honest", 2).await;
    let o = c.client().overview().await;
    assert_eq!(counter(&o, "pre_registration_overflows"), 1, "{o}");
    honest.stop().await.expect("clean stop");
    drop(long);
    c.stop().await;
}

/// The budget before registration is armed by the worker endpoint's upgrade only: an HTTP
/// request of megabytes on a connection of the same listener is taken whole.
#[tokio::test]
async fn http_requests_of_megabytes_are_not_held_to_the_budget_before_registration() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.limits.registration_pool = 0;
    })
    .await;
    let client = c.client();
    // 20 tasks of 100 KB each in one submission: 2 MB, 30 times a WebSocket's budget.
    client.submit_padded("big", 20, 100_000).await;
    let (status, v) = client.get("/api/v1/tasks/big-19").await;
    assert_eq!(status, 200, "{v}");
    let honest = honest_work_completes(&c, "honest", 1).await;
    let o = client.overview().await;
    assert_eq!(counter(&o, "pre_registration_overflows"), 0, "{o}");
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn a_session_inflating_more_than_its_byte_rate_is_paced_and_others_are_not() {
    let (_dir, c) = coordinator_with(|cfg| {
        // Frames up to 1.25 MiB, a burst of one of them, and a rate that passes one within a
        // third of the 2 s heartbeat timeout (the least the configuration accepts).
        cfg.max_frame = 1280 * 1024;
        cfg.limits.bytes_per_sec = 2.0 * 1024.0 * 1024.0;
        cfg.limits.byte_burst = 1280 * 1024;
    })
    .await;

    let mut m = Raw::connect(&c, "inflater").await;
    let mut reg = m.registration(None, &[]);
    reg["compression"] = json!(["zstd"]);
    m.send(&reg).await;
    let ack = m.next_of("registration_ack").await;
    assert_eq!(ack["compression"], "zstd", "{ack}");
    // Six frames of a few KiB on the wire, 1 MiB each once inflated: 6 MiB to decode against a
    // burst of 1.25 MiB and 2 MiB a second. Each past the second waits for the debt of the one
    // before it.
    let frames: Vec<Vec<u8>> = (0..6)
        .map(|i| tether_proto::compress::deflate(&padded_heartbeat(2001 + i, 1 << 20)))
        .collect();
    assert!(frames.iter().all(|f| f.len() < 16 * 1024));
    for f in frames {
        m.ws.feed(Message::binary(f)).await.expect("feed");
    }
    m.ws.flush().await.expect("flush");
    // Paced, not refused: every frame is answered in turn, and the worker is told why it waits.
    let mut told = false;
    let mut answered = Vec::new();
    while answered.len() < 6 {
        let v = m.next().await;
        match v["type"].as_str() {
            Some("heartbeat") if v["response_to"].as_u64().is_some_and(|s| s > 2000) => {
                answered.push(v["response_to"].as_u64().unwrap_or_default());
            }
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert!(
                    v["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("bytes per second"),
                    "{v}"
                );
                told = true;
            }
            _ => {}
        }
    }
    assert_eq!(answered, (2001..=2006).collect::<Vec<_>>());
    assert!(told, "no rate_limited error");
    let honest = honest_work_completes(&c, "honest", 2).await;
    let o = c.client().overview().await;
    assert!(counter(&o, "bytes_limited") >= 2, "{o}");
    assert_eq!(counter(&o, "rate_limited"), 0, "{o}");
    assert_eq!(counter(&o, "compressed_in_frames"), 6, "{o}");
    assert!(counter(&o, "compressed_in_json_bytes") >= 6 << 20, "{o}");
    honest.stop().await.expect("clean stop");
    let _ = tokio::time::timeout(Duration::from_secs(1), m.ws.close(None)).await;
    c.stop().await;
}

/// A worker writing checkpoints faster than the coordinator's byte rate paces its pieces below
/// it (`registration_ack.byte_rate`): the coordinator never has to hold its session back, and
/// every checkpoint arrives. Without the worker's pace, the pieces run past the coordinator's
/// burst at once and `bytes_limited` counts each frame held back.
#[tokio::test]
async fn a_worker_paces_its_checkpoint_pieces_under_the_coordinators_byte_rate() {
    let (_dir, c) = coordinator_with(|cfg| {
        // 1 MiB frames, so that 2 MiB a second passes the largest within a third of the 2 s
        // heartbeat timeout; a burst of one frame.
        cfg.max_frame = 1024 * 1024;
        cfg.limits.bytes_per_sec = 2.0 * 1024.0 * 1024.0;
        cfg.limits.byte_burst = 1024 * 1024;
    })
    .await;
    // Four checkpoints of 1 MiB at once, each filled with its number: about 5.6 MB of text in
    // 256 KiB pieces, against a burst of 1 MiB and 2 MiB a second. Then it runs on, so that
    // the checkpoints stay those of a running attempt.
    let heavy = executor(|_, ctx| async move {
        for i in 1..=4u8 {
            ctx.checkpoint(vec![i; 1 << 20]).await;
        }
        ctx.cancelled().await;
        Err(tether_worker::ExecError::Cancelled)
    });
    let w = connected(
        fast_worker_config(&c.ws_url(), "heavy"),
        builtin_and("heavy", heavy),
    )
    .await;
    let client = c.client();
    let id = submit_one(&client, "heavy").await;
    let http = loopback_client(reqwest::Client::builder());
    wait_for("the fourth checkpoint to be stored", DEADLINE, || async {
        let t = client.task(&id).await;
        let cid = t["latest_checkpoint"]["checkpoint_id"].as_str()?.to_owned();
        let url = format!("http://{}/api/v1/tasks/{id}/checkpoints/{cid}", c.addr);
        let bytes = http.get(url).send().await.ok()?.bytes().await.ok()?;
        (bytes.len() == 1 << 20 && bytes[0] == 4).then_some(())
    })
    .await;
    let o = client.overview().await;
    assert_eq!(counter(&o, "bytes_limited"), 0, "{o}");
    assert_eq!(counter(&o, "rate_limited"), 0, "{o}");
    assert_eq!(w.handle.registrations(), 1, "one session throughout");
    cancel_and_stop(&client, &id, w, c).await;
}
