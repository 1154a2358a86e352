//! Results committed per second by the store writer, with group commit (the writer drains up to
//! `MAX_GROUP` waiting batches into one transaction) against one transaction per result, in the
//! same run on the same kind of file.
//!
//! Each iteration sends `RESULTS` batches, each holding one result and the task update that
//! goes with it (what the core produces for one `task_result`), plus the effect that would send
//! the ack; it ends when the last ack effect has run, so the figure is results durably
//! committed and acknowledged per second.
//!
//! `cargo bench -p tether-coordinator --bench store`

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tether_coordinator::model::Task;
use tether_coordinator::store::{self, Batch, Effect, Mutation, StoreStats};
use tether_proto::{Attempt, Outcome, TaskId, TaskSpec, TaskStatus, WorkerId};
use tokio_util::sync::CancellationToken;

const RESULTS: usize = 2_000;

fn task(i: usize) -> Task {
    Task {
        task_id: TaskId::parse(&format!("t{i}")).expect("id"),
        spec: Arc::new(TaskSpec::new("sleep", serde_json::json!({"ms": 0}))),
        status: TaskStatus::Completed,
        attempt: Attempt(1),
        attempt_base: Attempt::default(),
        lease: None,
        submit_seq: i as u64,
        submitted_at: Utc::now(),
        updated_at: Utc::now(),
        finished_at: Some(Utc::now()),
        outcome: Some(Outcome::Completed),
        error: None,
        latest_checkpoint: None,
        attempts: vec![],
        env_redacted: false,
        lease_started: None,
        retried_by: None,
    }
}

/// Commits `RESULTS` results through a writer with `max_group`; returns the time until the
/// last ack effect ran.
fn run(max_group: usize, round: usize) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let (conn, loaded) = store::open(dir.path()).expect("open store");
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let writer = store::spawn_writer(
        conn,
        dir.path().join(store::DB_FILE),
        rx,
        Arc::new(StoreStats::default()),
        (CancellationToken::new(), CancellationToken::new()),
        store::WriterOptions {
            max_group,
            ..Default::default()
        },
        loaded.unfolded,
    )
    .expect("writer");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = WorkerId::parse("w").expect("id");
    let started = Instant::now();
    for i in 0..RESULTS {
        let t = task(round * RESULTS + i);
        let done = done_tx.clone();
        let last = i + 1 == RESULTS;
        let batch = Batch {
            muts: vec![
                Mutation::PutResult {
                    task_id: t.task_id.clone(),
                    attempt: Attempt(1),
                    worker: worker.clone(),
                    outcome: Outcome::Completed,
                    stale: false,
                    body: r#"{"ok":true}"#.into(),
                },
                Mutation::PutTask(Box::new(t)),
            ],
            effects: vec![Effect::Run(Box::new(move |_| {
                if last {
                    let _ = done.send(());
                }
            }))],
            reads: vec![],
        };
        tx.blocking_send(batch).expect("writer alive");
    }
    done_rx.recv().expect("last ack");
    let elapsed = started.elapsed();
    drop(tx);
    writer.join().expect("writer thread");
    elapsed
}

fn commits(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_commit_per_result");
    g.throughput(Throughput::Elements(RESULTS as u64));
    g.sample_size(10);
    for (name, max_group) in [("grouped", store::MAX_GROUP), ("one_per_result", 1)] {
        g.bench_with_input(BenchmarkId::from_parameter(name), &max_group, |b, &m| {
            b.iter_custom(|iters| (0..iters as usize).map(|r| run(m, r)).sum());
        });
    }
    g.finish();
}

criterion_group!(benches, commits);
criterion_main!(benches);
