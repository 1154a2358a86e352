//! The dispatch decision: one worker's next task out of a large queue, and a whole dispatch
//! over 10,000 idle workers (the thundering-herd case), with the queue indexed by requirement.

use std::collections::{BTreeSet, HashMap};
use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tether_coordinator::core::SessionRef;
use tether_coordinator::core::queue::{Queue, plan};
use tether_coordinator::model::{Worker, WorkerState};
use tether_proto::{TaskId, TaskSpec, WorkerId};

const KINDS: [&str; 4] = ["noop", "sleep", "command", "gpu"];

fn worker(i: usize, kinds: &[&str]) -> Worker {
    let mut w = Worker::new(
        WorkerId::parse(&format!("w-{i}")).expect("id"),
        chrono::Utc::now(),
    );
    w.executors = kinds.iter().map(|k| k.to_string()).collect();
    w.slots = 1;
    w.state = WorkerState::Connected;
    w.session = Some(SessionRef {
        id: i as u64,
        tx: tokio::sync::mpsc::unbounded_channel().0,
    });
    w
}

fn spec(kind: &str) -> TaskSpec {
    TaskSpec::new(kind, serde_json::Value::Null)
}

/// `n` tasks spread over the kinds, priorities 0..10.
fn queue(n: usize, kinds: &[&str]) -> Queue {
    let mut q = Queue::default();
    for i in 0..n {
        let s = spec(kinds[i % kinds.len()]);
        let key = (
            (i % 10) as u8,
            i as u64,
            TaskId::parse(&format!("t-{i}")).expect("id"),
        );
        q.insert(&s, key);
    }
    q
}

fn fleet(n: usize, kinds: &[&str]) -> HashMap<WorkerId, Worker> {
    (0..n)
        .map(|i| worker(i, kinds))
        .map(|w| (w.worker_id.clone(), w))
        .collect()
}

fn dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch");
    g.throughput(Throughput::Elements(1));
    g.bench_function("next_task_of_one_worker_in_100k_queue", |b| {
        let mut q = queue(100_000, &KINDS);
        let w = worker(0, &["sleep", "noop"]);
        b.iter(|| {
            let key = q.pop_for(black_box(&w)).expect("a task");
            let kind = KINDS[(key.1 % KINDS.len() as u64) as usize];
            q.insert(&spec(kind), key);
        })
    });
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("plan_10k_idle_workers_10k_tasks", |b| {
        let workers = fleet(10_000, &["noop"]);
        b.iter_batched(
            || {
                (
                    queue(10_000, &["noop"]),
                    workers.keys().cloned().collect::<BTreeSet<_>>(),
                )
            },
            |(mut q, mut free)| {
                let p = plan(&mut q, &mut free, &workers);
                assert_eq!(p.len(), 10_000);
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("plan_10k_idle_workers_nothing_they_can_run", |b| {
        let workers = fleet(10_000, &["noop"]);
        let free: BTreeSet<WorkerId> = workers.keys().cloned().collect();
        let mut q = queue(1_000, &["gpu"]);
        b.iter_batched(
            || free.clone(),
            |mut f| {
                let p = plan(&mut q, &mut f, &workers);
                assert!(p.is_empty());
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
