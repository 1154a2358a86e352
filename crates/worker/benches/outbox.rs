//! Outbox operations on the worker's hot path: a result through push, send and ack; a state
//! update coalescing over an unsent one; the replay of a full outbox on a new session.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tether_proto::msg::{TaskResult, TaskState, WorkerMsg, now};
use tether_proto::{Attempt, Outcome, Seq, TaskId};
use tether_worker::outbox::{Class, Coalesce, Limits, Outbox};

fn result(seq: Seq, task: &TaskId) -> WorkerMsg {
    let ts = now();
    WorkerMsg::TaskResult(TaskResult {
        seq,
        task_id: task.clone(),
        attempt: Attempt(1),
        outcome: Outcome::Completed,
        result: serde_json::json!({"steps": 10}).into(),
        error: None,
        worker_fault: false,
        started_at: ts,
        finished_at: ts,
        duration_ms: 1,
        timestamp: ts,
    })
}

fn state(seq: Seq, task: &TaskId, n: u64) -> WorkerMsg {
    WorkerMsg::TaskState(TaskState {
        seq,
        task_id: task.clone(),
        attempt: Attempt(1),
        state: serde_json::json!({"progress": n}).into(),
        timestamp: now(),
    })
}

fn outbox(c: &mut Criterion) {
    let task = TaskId::parse("t-bench").expect("id");
    let mut g = c.benchmark_group("outbox");
    g.throughput(Throughput::Elements(1));
    g.bench_function("result_push_take_ack", |b| {
        let o = Outbox::new(Limits::default());
        b.iter(|| {
            let seq = o.push(Class::Result, None, |s| result(s, &task));
            let sent = o.take_unsent(64);
            black_box(&sent);
            o.ack(seq)
        })
    });
    // The flood's path: each task's state is sent and acknowledged before its next one, so
    // nothing coalesces; eight tasks in turn.
    g.bench_function("state_push_take_ack_8_tasks", |b| {
        let o = Outbox::new(Limits::default());
        let tasks: Vec<TaskId> = (0..8)
            .map(|i| TaskId::parse(&format!("t-bench-{i}")).expect("id"))
            .collect();
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let task = &tasks[(n % 8) as usize];
            let seq = o.push(
                Class::State,
                Some(Coalesce::task_state(task, Attempt(1))),
                |s| state(s, task, n),
            );
            let sent = o.take_unsent(64);
            black_box(&sent);
            o.ack(seq)
        })
    });
    g.bench_function("state_coalesced_over_unsent", |b| {
        let o = Outbox::new(Limits::default());
        let mut n = 0;
        b.iter(|| {
            n += 1;
            o.push(
                Class::State,
                Some(Coalesce::task_state(&task, Attempt(1))),
                |s| state(s, &task, n),
            )
        })
    });
    g.throughput(Throughput::Elements(1000));
    g.bench_function("replay_1000_on_new_session", |b| {
        b.iter_batched(
            || {
                let o = Outbox::new(Limits::default());
                for _ in 0..1000 {
                    o.push(Class::Result, None, |s| result(s, &task));
                }
                let _ = o.take_unsent(1000);
                o
            },
            |o| {
                o.requeue_all();
                let mut n = 0;
                loop {
                    let batch = o.take_unsent(64);
                    if batch.is_empty() {
                        break;
                    }
                    n += batch.len();
                }
                assert_eq!(n, 1000);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, outbox);
criterion_main!(benches);
