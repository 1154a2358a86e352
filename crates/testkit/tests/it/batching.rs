//! Batch frames over real sockets: agreed at registration, handled message by message (a bad
//! one refused alone), answered in batch frames, bounded, and charged to the session's message
//! rate by their messages; real workers that batch, with integrity tags and compression on,
//! lose nothing and record nothing twice.

use std::collections::BTreeMap;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tether_coordinator::auth::WorkerAuth;
use tether_proto::Seq;
use tether_proto::auth::Secret;
use tether_proto::msg::{Telemetry, WorkerMsg, now};
use tether_proto::task::ConnStats;
use tether_testkit::*;
use tether_worker::Executors;
use tokio_tungstenite::tungstenite::Message;

use crate::raw::{Raw, counter};
use crate::support::{builtin_and, connected, coordinator, coordinator_with};

fn telemetry(seq: u64) -> Value {
    serde_json::to_value(WorkerMsg::Telemetry(Telemetry {
        seq: Seq(seq),
        connection_stats: ConnStats::default(),
        metrics: Value::Null.into(),
        timestamp: now(),
    }))
    .expect("json")
}

fn batch(items: &[Value]) -> Message {
    Message::text(Value::Array(items.to_vec()).to_string())
}

/// A hand-driven worker, registered with or without batching, and its `registration_ack`.
async fn registered(c: &TestCoordinator, id: &str, batching: bool) -> (Raw, Value) {
    let mut r = Raw::connect(c, id).await;
    let mut reg = r.registration(None, &[]);
    reg["batching"] = batching.into();
    r.send(&reg).await;
    let ack = r.next_of("registration_ack").await;
    (r, ack)
}

/// Reads messages until `done` says the replies seen so far are complete.
async fn read_until(r: &mut Raw, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    while !done(&seen) {
        assert!(
            tokio::time::Instant::now() < end,
            "replies so far: {seen:?}"
        );
        seen.push(r.next().await);
    }
    seen
}

fn acks_by_seq(replies: &[Value]) -> BTreeMap<u64, usize> {
    let mut acks = BTreeMap::new();
    for v in replies.iter().filter(|v| v["type"] == "telemetry_ack") {
        *acks
            .entry(v["ack_seq"].as_u64().expect("ack_seq"))
            .or_default() += 1;
    }
    acks
}

#[tokio::test]
async fn a_batch_frame_is_handled_message_by_message_and_answered_in_batch_frames() {
    let (_dir, c) = coordinator().await;
    let (mut r, ack) = registered(&c, "batcher", true).await;
    assert_eq!(
        ack["batching"],
        json!({"max_messages": 256, "max_bytes": 65536}),
        "{ack}"
    );
    let mut items: Vec<Value> = (1..=20).map(telemetry).collect();
    items.insert(
        5,
        json!({"type": "heartbeat", "sequence": 77, "timestamp": now()}),
    );
    items.insert(10, json!({"type": "launch_missiles", "seq": 78}));
    items.insert(15, json!({"type": "task_state", "seq": 79}));
    r.ws.send(batch(&items)).await.expect("send");
    let replies = read_until(&mut r, |seen| {
        acks_by_seq(seen).len() == 20
            && seen.iter().filter(|v| v["type"] == "error").count() == 2
            && seen.iter().any(|v| v["response_to"] == 77)
    })
    .await;
    assert!(
        acks_by_seq(&replies).values().all(|&n| n == 1),
        "each message acknowledged once: {replies:?}"
    );
    let errors: Vec<(&Value, &Value)> = replies
        .iter()
        .filter(|v| v["type"] == "error")
        .map(|v| (&v["code"], &v["ref_seq"]))
        .collect();
    assert_eq!(
        errors,
        [
            (&json!("unknown_type"), &json!(78)),
            (&json!("bad_frame"), &json!(79))
        ]
    );
    // The session goes on; a lone message after the batch is answered as usual.
    r.send(&telemetry(100)).await;
    let v = r.next_of("telemetry_ack").await;
    assert_eq!(v["ack_seq"], 100);
    // `frames_in` counts every data frame, the heartbeats `Raw` sent while it waited for a
    // reply too (one each 300 ms without a frame: a slow machine sends some). They are known
    // (nothing is sent after the last reply), but one sent after the lone message may not be
    // read yet: the count must reach the frames sent, and never pass them.
    let frames = 3 + r.beats;
    let o = wait_for("every frame sent counted", DEADLINE, || async {
        let o = c.client().overview().await;
        let n = counter(&o, "frames_in");
        assert!(
            n <= frames,
            "registration, batch, lone message and {} heartbeats: {o}",
            r.beats
        );
        (n == frames).then_some(o)
    })
    .await;
    assert_eq!(counter(&o, "batch_frames_in"), 1, "{o}");
    assert_eq!(
        counter(&o, "messages_in"),
        22,
        "registration and 21 telemetry"
    );
    assert_eq!(counter(&o, "unknown_frames"), 1);
    assert_eq!(counter(&o, "malformed_frames"), 1);
    assert!(
        counter(&o, "batch_frames_out") >= 1,
        "the acks of one commit go in a batch frame: {o}"
    );
    c.stop().await;
}

/// With `compact_acks` agreed, the recorded messages of one write are acknowledged by one
/// `acks` whose ranges cover each exactly once; a message about a task the worker does not
/// hold keeps its own ack (`rejected`) and is in no `acks`. Without the offer, every message
/// gets its own ack (the test above).
#[tokio::test]
async fn recorded_messages_are_acknowledged_together_in_acks_once_agreed() {
    let (_dir, c) = coordinator().await;
    let mut r = Raw::connect(&c, "compact").await;
    let mut reg = r.registration(None, &[]);
    reg["batching"] = true.into();
    reg["compact_acks"] = true.into();
    r.send(&reg).await;
    let ack = r.next_of("registration_ack").await;
    assert_eq!(ack["compact_acks"], true, "{ack}");
    let mut items: Vec<Value> = (1..=30).map(telemetry).collect();
    items.push(json!({
        "type": "task_state", "seq": 31, "task_id": "t-0000000000000000000000000000dead",
        "attempt": 1, "state": {"n": 1}, "timestamp": now(),
    }));
    r.ws.send(batch(&items)).await.expect("send");
    let covered = |seen: &[Value]| -> Vec<u64> {
        let mut seqs = Vec::new();
        for v in seen.iter().filter(|v| v["type"] == "acks") {
            for range in v["recorded"].as_array().expect("ranges") {
                let (first, last) = (
                    range[0].as_u64().expect("first"),
                    range[1].as_u64().expect("last"),
                );
                seqs.extend(first..=last);
            }
        }
        seqs.sort_unstable();
        seqs
    };
    let replies = read_until(&mut r, |seen| {
        covered(seen).len() >= 30 && seen.iter().any(|v| v["type"] == "task_state_ack")
    })
    .await;
    assert_eq!(
        covered(&replies),
        (1..=30).collect::<Vec<u64>>(),
        "each recorded message acknowledged once: {replies:?}"
    );
    assert!(
        !replies.iter().any(|v| v["type"] == "telemetry_ack"),
        "{replies:?}"
    );
    let own = replies
        .iter()
        .find(|v| v["type"] == "task_state_ack")
        .expect("an ack of its own");
    assert_eq!(
        (&own["ack_seq"], &own["disposition"]),
        (&json!(31), &json!("rejected"))
    );
    let o = c.client().overview().await;
    assert_eq!(counter(&o, "compact_acked"), 30, "{o}");
    c.stop().await;
}

#[tokio::test]
async fn batch_frames_need_agreement_and_stay_within_their_bounds() {
    let (_dir, c) = coordinator().await;

    // Not agreed: the whole frame is refused, none of its messages handled.
    let (mut r, ack) = registered(&c, "plain", false).await;
    assert_eq!(ack["batching"], Value::Null, "{ack}");
    r.ws.send(batch(&[telemetry(1), telemetry(2)]))
        .await
        .expect("send");
    r.next_error("bad_frame", "agreed").await;
    r.send(&telemetry(3)).await;
    let replies = read_until(&mut r, |seen| acks_by_seq(seen).contains_key(&3)).await;
    assert_eq!(acks_by_seq(&replies).keys().collect::<Vec<_>>(), [&3]);

    // Agreed: more than 256 messages, none, or more bytes than agreed, is refused whole.
    let (mut r, _) = registered(&c, "greedy", true).await;
    let too_many: Vec<Value> = (1..=257).map(telemetry).collect();
    r.ws.send(batch(&too_many)).await.expect("send");
    r.next_error("bad_frame", "exceeds").await;
    r.ws.send(Message::text("[]")).await.expect("send");
    r.next_error("bad_frame", "empty").await;
    // Two messages over the agreed bytes (64 KiB of JSON) together, each well within a frame.
    let padded = |seq| {
        let mut m = telemetry(seq);
        m["pad"] = json!("x".repeat(40_000));
        m
    };
    r.ws.send(batch(&[padded(298), padded(299)]))
        .await
        .expect("send");
    r.next_error("bad_frame", "max_bytes").await;
    r.send(&telemetry(300)).await;
    let replies = read_until(&mut r, |seen| acks_by_seq(seen).contains_key(&300)).await;
    assert_eq!(acks_by_seq(&replies).keys().collect::<Vec<_>>(), [&300]);

    let o = c.client().overview().await;
    assert_eq!(counter(&o, "batch_frames_in"), 0, "{o}");
    c.stop().await;
}

#[tokio::test]
async fn a_batch_is_charged_to_the_message_rate_by_its_messages() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.limits.messages_per_sec = 20.0;
        cfg.limits.message_burst = 20;
    })
    .await;
    let (mut r, _) = registered(&c, "bulk", true).await;
    // Within the burst by frames (registration, batch, lone message), far over it by messages.
    let items: Vec<Value> = (1..=60).map(telemetry).collect();
    r.ws.send(batch(&items)).await.expect("send");
    r.send(&telemetry(61)).await;
    let replies = read_until(&mut r, |seen| acks_by_seq(seen).len() == 61).await;
    assert!(
        replies
            .iter()
            .any(|v| v["type"] == "error" && v["code"] == "rate_limited"),
        "{replies:?}"
    );
    let o = c.client().overview().await;
    assert!(counter(&o, "rate_limited") >= 1, "{o}");
    c.stop().await;
}

#[tokio::test]
async fn workers_that_batch_lose_nothing_with_integrity_tags_and_compression() {
    let secret = Secret::new(b"fleet secret for the batching tests").expect("secret");
    let (_dir, c) = coordinator_with(|cfg| {
        let mut auth = WorkerAuth::fleet(secret.clone());
        auth.message_mac = true;
        cfg.auth = Some(auth);
        // Small enough that batches of a few messages go compressed.
        cfg.compress_threshold = 256;
    })
    .await;
    let client = c.client();
    let relay = Relay::start(c.addr).await;

    // One worker per protocol: an old-style one (one message per frame), then one that batches
    // and is cut off while its tasks run, so that what it made meanwhile is replayed at once.
    for (id, batching, tasks) in [("single", false, 8), ("batcher", true, 16)] {
        let mut wc = fast_worker_config(&relay.url(), id);
        wc.secret = Some(secret.clone());
        wc.slots = 8;
        wc.batching = batching;
        wc.compress_threshold = 256;
        let w = connected(wc, Executors::builtin()).await;
        let specs: Vec<_> = (0..tasks).map(|_| sleep_task(600, 6, 2)).collect();
        let ids = client.submit(&specs).await;
        if batching {
            wait_for("the tasks to start", DEADLINE, || async {
                (w.handle.executions() >= 8).then_some(())
            })
            .await;
            relay.cut();
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            relay.restore();
        }
        for id in &ids {
            client.wait_status(id, "completed").await;
            let results = client.results(id).await;
            assert_eq!(results.len(), 1, "task {id}: {results:?}");
        }
        let o = client.overview().await;
        match batching {
            false => assert_eq!(counter(&o, "batch_frames_in"), 0, "{o}"),
            true => {
                assert!(
                    counter(&o, "batch_frames_in") > 0,
                    "the replay is batched: {o}"
                );
                assert!(counter(&o, "batch_frames_out") > 0, "{o}");
                assert!(counter(&o, "compressed_in_frames") > 0, "{o}");
            }
        }
        assert_eq!(counter(&o, "mac_failures"), 0, "{o}");
        // States and notices were acknowledged in `acks` (agreed by default), and nothing the
        // worker sent is left unacknowledged.
        assert!(counter(&o, "compact_acked") > 0, "{o}");
        wait_for("the outbox to empty", DEADLINE, || async {
            w.handle.outbox.is_empty().then_some(())
        })
        .await;
        w.stop().await.expect("clean stop");
    }
    c.stop().await;
}

/// The frame limit a worker announces in the tests below: the least a registration may say.
const SMALL_FRAME: usize = 32 * 1024;

/// A task of kind `padded` for a worker with capability `only`, its config padded to about
/// 12 KiB: alone it fits a frame of [`SMALL_FRAME`] (with the 16 KiB the message around a
/// config may take), while three together do not.
fn padded_task(only: &str) -> tether_proto::TaskSpec {
    let mut s = tether_proto::TaskSpec::new("padded", json!({ "pad": "x".repeat(12 * 1024) }));
    s.requires = vec![only.to_owned()];
    s
}

/// A hand-driven worker with capability `id` that batches, runs four `padded` tasks at once
/// and announces a `max_frame` of [`SMALL_FRAME`], with or without compression, fetching
/// checkpoints; and its `registration_ack`.
async fn registered_small(c: &TestCoordinator, id: &str, compression: bool) -> (Raw, Value) {
    let mut r = Raw::connect(c, id).await;
    let mut reg = r.registration(None, &[id]);
    reg["batching"] = true.into();
    reg["max_frame"] = SMALL_FRAME.into();
    reg["slots"] = 4.into();
    reg["executors"] = json!(["padded"]);
    reg["checkpoint_fetch"] = true.into();
    if compression {
        reg["compression"] = json!(["zstd"]);
    }
    r.send(&reg).await;
    let ack = r.next_of("registration_ack").await;
    (r, ack)
}

/// Reads frames until `done` says the messages seen so far are complete, asserting that each
/// frame (its wire bytes, and its text once inflated) stays within [`SMALL_FRAME`]. Returns
/// the messages.
async fn read_small_frames(r: &mut Raw, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    use futures_util::StreamExt;
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    while !done(&seen) {
        let frame = tokio::time::timeout_at(end, r.ws.next())
            .await
            .unwrap_or_else(|_| panic!("messages so far: {seen:?}"))
            .expect("open")
            .expect("frame");
        let text = match frame {
            Message::Text(t) => {
                assert!(t.len() <= SMALL_FRAME, "a text frame of {} bytes", t.len());
                t.as_str().to_owned()
            }
            Message::Binary(b) => {
                assert!(
                    b.len() <= SMALL_FRAME,
                    "a binary frame of {} bytes",
                    b.len()
                );
                tether_proto::compress::inflate(&b, SMALL_FRAME)
                    .unwrap_or_else(|e| panic!("a compressed frame of {} bytes: {e}", b.len()))
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        };
        seen.extend(messages_of(serde_json::from_str(&text).expect("json")));
    }
    seen
}

fn of_type<'a>(seen: &'a [Value], ty: &str) -> Vec<&'a Value> {
    seen.iter().filter(|v| v["type"] == ty).collect()
}

/// Assignments of one commit go to a batching worker together, but never in a frame larger
/// than the `max_frame` it announced: four configs of 12 KiB went in one batch of 49 KiB
/// (and, compressed, in a small frame that inflates to 49 KiB), which a worker of 32 KiB
/// frames refuses, reconnects, and is sent again, for ever.
#[tokio::test]
async fn batch_frames_to_a_worker_stay_within_the_max_frame_it_announced() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    for (id, compression) in [("small", false), ("small-zstd", true)] {
        let (mut r, ack) = registered_small(&c, id, compression).await;
        assert_eq!(
            ack["compression"],
            if compression {
                json!("zstd")
            } else {
                Value::Null
            },
            "{ack}"
        );
        let specs: Vec<_> = (0..4).map(|_| padded_task(id)).collect();
        let mut ids: Vec<String> = client
            .submit(&specs)
            .await
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect();
        let seen =
            read_small_frames(&mut r, |seen| of_type(seen, "task_assignment").len() == 4).await;
        let mut assigned: Vec<String> = of_type(&seen, "task_assignment")
            .iter()
            .map(|a| a["task_id"].as_str().expect("task_id").to_owned())
            .collect();
        assigned.sort();
        ids.sort();
        assert_eq!(assigned, ids, "{id}");
    }
    c.stop().await;
}

/// Checkpoint pieces answering fetches asked together are batched within the worker's
/// `max_frame` as well: each piece carries what a frame of 32 KiB takes (12 KiB as 16 KiB of
/// base64), so two in one batch were already too large.
#[tokio::test]
async fn checkpoint_pieces_to_a_worker_stay_within_the_max_frame_it_announced() {
    use base64::Engine as _;
    let (_dir, c) = coordinator().await;
    let (mut r, _) = registered_small(&c, "fetcher", false).await;
    let task = c.client().submit(&[padded_task("fetcher")]).await.remove(0);
    let a = r.next_of("task_assignment").await;
    assert_eq!(a["task_id"], task.as_str());
    // Its own checkpoint of 48 KiB, in one piece (the coordinator's frames take it).
    const SIZE: usize = 48 * 1024;
    const PIECE: usize = 12 * 1024;
    let ts = now();
    let data = base64::engine::general_purpose::STANDARD.encode(vec![7u8; SIZE]);
    r.send(
        &json!({"type": "checkpoint", "seq": 1, "task_id": task, "attempt": 1,
                "checkpoint_id": "c-small-frames", "size": SIZE, "chunks": 1, "timestamp": ts}),
    )
    .await;
    r.send(
        &json!({"type": "checkpoint_data", "seq": 2, "task_id": task, "attempt": 1,
                "checkpoint_id": "c-small-frames", "chunk": 0, "data": data, "timestamp": ts}),
    )
    .await;
    let acks = r
        .next_of_each(&["checkpoint_ack", "checkpoint_data_ack"])
        .await;
    for ack in &acks {
        assert_eq!(ack["disposition"], "recorded", "{ack}");
    }
    // Four pieces asked for in one frame: their answers are queued together.
    let fetches: Vec<Value> = (0..SIZE / PIECE)
        .map(|i| {
            json!({"type": "checkpoint_fetch", "seq": 3 + i, "task_id": task, "attempt": 1,
                   "checkpoint_id": "c-small-frames", "offset": i * PIECE, "len": PIECE,
                   "timestamp": ts})
        })
        .collect();
    r.ws.send(batch(&fetches)).await.expect("send");
    let seen = read_small_frames(&mut r, |seen| {
        of_type(seen, "checkpoint_piece").len() == fetches.len()
    })
    .await;
    let mut bytes = 0;
    for p in of_type(&seen, "checkpoint_piece") {
        assert_eq!(p["error"], Value::Null, "{p}");
        let piece = base64::engine::general_purpose::STANDARD
            .decode(p["data"].as_str().expect("data"))
            .expect("base64");
        bytes += piece.len();
    }
    assert_eq!(bytes, SIZE, "every byte served");
    c.stop().await;
}

/// A real worker whose frames carry 32 KiB runs four tasks of 12 KiB configs at once, in one
/// session: batched together they ended its session at every registration.
#[tokio::test]
async fn a_worker_with_small_frames_runs_tasks_that_batch_past_them_in_one_session() {
    let (_dir, c) = coordinator().await;
    let mut wc = fast_worker_config(&c.ws_url(), "small-worker");
    wc.max_frame = SMALL_FRAME;
    wc.slots = 4;
    wc.batching = true;
    wc.capabilities = vec!["small-worker".into()];
    let padded = executor(|input, _| async move {
        Ok(json!({ "pad_bytes": input.config["pad"].as_str().map_or(0, str::len) }))
    });
    let w = connected(wc, builtin_and("padded", padded)).await;
    let client = c.client();
    let specs: Vec<_> = (0..4).map(|_| padded_task("small-worker")).collect();
    let ids = client.submit(&specs).await;
    for id in &ids {
        client.wait_status(id, "completed").await;
        let results = client.results(id).await;
        assert_eq!(results.len(), 1, "task {id}: {results:?}");
    }
    assert_eq!(w.handle.registrations(), 1, "one session throughout");
    w.stop().await.expect("clean stop");
    c.stop().await;
}
