//! A worker that sends batch frames faster than the coordinator reads them, and reads every
//! reply: its session writes what it owes before it reads more, so the acknowledgements keep
//! up with what the coordinator has read, and its outgoing queue stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tether_proto::msg::now;
use tether_testkit::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::raw::{Raw, counter};
use crate::support::coordinator;

/// Frames of 256 messages the worker sends: past the session's burst (4,000 messages), some
/// five seconds at its rate (2,000 a second).
const FRAMES: u64 = 56;
const PER_FRAME: u64 = 256;
/// How far the acknowledgements may trail the messages read a second before: the session's
/// bound on its queue (1,024), a frame's replies (512), and room for a slow machine. Without
/// the bound they trailed by some 1,800 more every second.
const SLACK: u64 = 2048;

/// A state report of a task the coordinator does not know: small (256 fit in a batch frame's
/// 64 KiB, where 256 telemetry messages do not), and acknowledged by the core like any other.
fn task_state(seq: u64) -> Value {
    json!({"type": "task_state", "seq": seq, "task_id": "t-none", "attempt": 1, "state": {},
        "timestamp": now()})
}

#[tokio::test]
async fn acks_of_a_batch_flood_keep_up_with_the_messages_the_coordinator_reads() {
    let (_dir, c) = coordinator().await;
    let mut r = Raw::connect(&c, "flooder").await;
    let mut reg = r.registration(None, &[]);
    reg["batching"] = true.into();
    reg["compact_acks"] = false.into();
    r.send(&reg).await;
    let ack = r.next_of("registration_ack").await;
    assert!(ack["batching"].is_object(), "{ack}");
    assert_ne!(ack["compact_acks"], true, "{ack}");
    let read_before = counter(&c.client().overview().await, "messages_in");

    let (mut sink, mut stream) = r.ws.split();
    // The worker reads everything, counting the acknowledgements of its messages.
    let acked = Arc::new(AtomicU64::new(0));
    let reader = {
        let acked = acked.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                let n = messages_of(v)
                    .iter()
                    .filter(|m| m.get("ack_seq").is_some())
                    .count();
                acked.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    // And sends as fast as its socket takes the frames.
    let writer = tokio::spawn(async move {
        for f in 0..FRAMES {
            let items: Vec<Value> = (1..=PER_FRAME)
                .map(|i| task_state(f * PER_FRAME + i))
                .collect();
            let frame = Message::text(Value::Array(items).to_string());
            sink.send(frame).await.expect("send");
        }
        sink
    });

    // Every half second: the messages the coordinator has read, and the acknowledgements the
    // worker has; each count of acknowledgements against the messages read a second before.
    let sent = FRAMES * PER_FRAME;
    let start = Instant::now();
    let mut samples: Vec<(u64, u64)> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let read = counter(&c.client().overview().await, "messages_in") - read_before;
        let acks = acked.load(Ordering::Relaxed);
        if samples.len() >= 2 {
            let (read_then, _) = samples[samples.len() - 2];
            assert!(
                acks + SLACK >= read_then,
                "{acks} acknowledged at {:?}, {read_then} read a second before: {samples:?}",
                start.elapsed()
            );
        }
        samples.push((read, acks));
        if acks >= sent {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{samples:?}");
    }
    assert!(
        samples.len() >= 6,
        "the flood outlasted the session's burst: {samples:?}"
    );
    assert_eq!(
        acked.load(Ordering::Relaxed),
        sent,
        "each message acknowledged once"
    );
    let _sink = writer.await.expect("writer");
    reader.abort();
}
