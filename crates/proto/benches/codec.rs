//! Encode and decode of the hot messages: results, state updates, heartbeats (worker side) and
//! assignments and acks (coordinator side).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tether_proto::msg::{CoordMsg, WorkerMsg};
use tether_proto::samples::{coord_messages, worker_messages};
use tether_proto::{decode_coord, decode_worker, encode};

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

criterion_group!(benches, worker, coord);
criterion_main!(benches);
