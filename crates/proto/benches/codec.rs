//! Encode and decode of the hot messages: results, state updates, heartbeats (worker side) and
//! assignments and acks (coordinator side); a batch frame of 16 state updates, per message; and
//! the compression of batch frames just over the threshold.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tether_proto::codec::{MAX_BATCH_MESSAGES, decode_worker_batch};
use tether_proto::msg::{CoordMsg, WorkerMsg};
use tether_proto::samples::{coord_messages, worker_messages};
use tether_proto::{Batch, decode_coord, decode_worker, encode};

fn name_of(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn worker(c: &mut Criterion) {
    let wanted = ["heartbeat", "task_result", "task_state", "telemetry"];
    let mut g = c.benchmark_group("worker_msg");
    for m in worker_messages() {
        let text = encode(&m);
        let name = name_of(&text);
        if !wanted.contains(&name.as_str()) {
            continue;
        }
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", &name), &m, |b, m: &WorkerMsg| {
            b.iter(|| encode(black_box(m)))
        });
        g.bench_with_input(BenchmarkId::new("decode", &name), &text, |b, t| {
            b.iter(|| decode_worker(black_box(t)))
        });
    }
    g.finish();
}

fn coord(c: &mut Criterion) {
    let wanted = [
        "task_assignment",
        "task_result_ack",
        "task_state_ack",
        "heartbeat",
    ];
    let mut g = c.benchmark_group("coord_msg");
    for m in coord_messages() {
        let text = encode(&m);
        let name = name_of(&text);
        if !wanted.contains(&name.as_str()) {
            continue;
        }
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", &name), &m, |b, m: &CoordMsg| {
            b.iter(|| encode(black_box(m)))
        });
        g.bench_with_input(BenchmarkId::new("decode", &name), &text, |b, t| {
            b.iter(|| decode_coord(black_box(t)))
        });
    }
    g.finish();
}

/// 16 state updates in one batch frame: encode and decode, the throughput in messages, so that
/// the time per element compares with `worker_msg/*/task_state`.
fn batch(c: &mut Criterion) {
    let state = worker_messages()
        .into_iter()
        .find(|m| matches!(m, WorkerMsg::TaskState(_)))
        .expect("a task_state sample");
    let msgs = vec![state; 16];
    let mut b = Batch::new();
    for m in &msgs {
        b.push(m);
    }
    let text = b.take();
    let mut g = c.benchmark_group("batch_of_16");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("encode", |bench| {
        bench.iter(|| {
            let mut b = Batch::new();
            for m in black_box(&msgs) {
                b.push(m);
            }
            b.take()
        })
    });
    g.bench_function("decode", |bench| {
        bench.iter(|| decode_worker_batch(black_box(&text), MAX_BATCH_MESSAGES))
    });
    g.finish();
}

/// A batch frame of 8 state updates and one of their 8 acknowledgements (1.2 and 1.1 KiB of
/// JSON, just over the compression threshold): compress and inflate each, the throughput in
/// bytes of JSON.
fn compress(c: &mut Criterion) {
    let state = serde_json::to_value(
        worker_messages()
            .into_iter()
            .find(|m| matches!(m, WorkerMsg::TaskState(_)))
            .expect("a task_state sample"),
    )
    .expect("json");
    let ack = serde_json::to_value(
        coord_messages()
            .into_iter()
            .find(|m| matches!(m, CoordMsg::TaskStateAck(_)))
            .expect("a task_state_ack sample"),
    )
    .expect("json");
    let mut g = c.benchmark_group("compress");
    for (name, one) in [("states_8", state), ("acks_8", ack)] {
        let mut b = Batch::new();
        for m in vec![one; 8] {
            b.push(&m);
        }
        let text = b.take();
        let packed = tether_proto::compress::deflate(&text);
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(BenchmarkId::new("deflate", name), |bench| {
            bench.iter(|| tether_proto::compress::deflate(black_box(&text)))
        });
        g.bench_function(BenchmarkId::new("inflate", name), |bench| {
            bench.iter(|| tether_proto::compress::inflate(black_box(&packed), 1 << 20))
        });
        eprintln!("{name}: {} bytes -> {}", text.len(), packed.len());
    }
    g.finish();
}

criterion_group!(benches, worker, coord, batch, compress);
criterion_main!(benches);
