//! The dispatch decision: one worker's next task out of a large queue, and a whole dispatch
//! over 10,000 idle workers (the thundering-herd case), with the queue indexed by requirement.

use std::collections::{BTreeSet, HashMap};
use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tether_coordinator::core::SessionRef;
use tether_coordinator::core::queue::{Queue, QueueKey, plan};
use tether_coordinator::model::{IdMap, Worker, WorkerState};
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
    w.session = Some(SessionRef::new(
        i as u64,
        tether_coordinator::core::mailbox::channel().0,
    ));
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

fn fleet(n: usize, kinds: &[&str]) -> IdMap<WorkerId, Worker> {
    (0..n)
        .map(|i| worker(i, kinds))
        .map(|w| (w.worker_id.clone(), w))
        .collect()
}

/// `n` workers of one slot, of four builds: the first kind only, the first two, and so on.
fn mixed_fleet(n: usize) -> IdMap<WorkerId, Worker> {
    (0..n)
        .map(|i| worker(i, &KINDS[..1 + i % KINDS.len()]))
        .map(|w| (w.worker_id.clone(), w))
        .collect()
}

fn dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch");
    g.throughput(Throughput::Elements(1));
    g.bench_function("next_task_of_one_worker_in_100k_queue", |b| {
        // A dispatch with one worker free, as when a worker's slot frees under a deep queue.
        let mut q = queue(100_000, &KINDS);
        let w = worker(0, &["sleep", "noop"]);
        let workers: IdMap<WorkerId, Worker> = [(w.worker_id.clone(), w)].into_iter().collect();
        let mut free = BTreeSet::new();
        b.iter(|| {
            free.extend(workers.keys().cloned());
            let planned = plan(&mut q, black_box(&mut free), &workers, None);
            let (key, _) = planned.into_iter().next().expect("a task");
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
                let p = plan(&mut q, &mut free, &workers, None);
                assert_eq!(p.len(), 10_000);
            },
            BatchSize::LargeInput,
        )
    });
    // A task at a time onto 100 idle workers of 4 slots, as steady_load's submissions arrive:
    // the fixed cost of one dispatch.
    g.throughput(Throughput::Elements(1));
    g.bench_function("plan_1_task_100_idle_workers", |b| {
        let workers: IdMap<WorkerId, Worker> = (0..100)
            .map(|i| worker(i, &["noop"]))
            .map(|mut w| {
                w.slots = 4;
                (w.worker_id.clone(), w)
            })
            .collect();
        let free: BTreeSet<WorkerId> = workers.keys().cloned().collect();
        b.iter_batched(
            || (queue(1, &["noop"]), free.clone()),
            |(mut q, mut f)| assert_eq!(plan(&mut q, &mut f, &workers, None).len(), 1),
            BatchSize::SmallInput,
        )
    });
    // The same with a task of each of 4 kinds and workers of 4 builds.
    g.throughput(Throughput::Elements(4));
    g.bench_function("plan_4_tasks_of_4_kinds_100_mixed_workers", |b| {
        let workers = mixed_fleet(100);
        let free: BTreeSet<WorkerId> = workers.keys().cloned().collect();
        b.iter_batched(
            || (queue(4, &KINDS), free.clone()),
            |(mut q, mut f)| black_box(plan(&mut q, &mut f, &workers, None).len()),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(10_000));
    // Workers of four builds (one kind up to all four) and tasks of every kind: the plan
    // must weigh which worker takes which task, not hand each worker its first one.
    g.bench_function("plan_10k_mixed_workers_10k_tasks_of_4_kinds", |b| {
        let workers = mixed_fleet(10_000);
        b.iter_batched(
            || {
                (
                    queue(10_000, &KINDS),
                    workers.keys().cloned().collect::<BTreeSet<_>>(),
                )
            },
            |(mut q, mut free)| black_box(plan(&mut q, &mut free, &workers, None).len()),
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
                let p = plan(&mut q, &mut f, &workers, None);
                assert!(p.is_empty());
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// The dispatch this index replaced, kept here as the baseline: every worker with a free slot
/// cloned and sorted, then per worker a scan of up to 4,096 queued tasks.
fn scan_plan(
    queue: &mut BTreeSet<QueueKey>,
    specs: &HashMap<TaskId, TaskSpec>,
    workers: &IdMap<WorkerId, Worker>,
) -> usize {
    const SCAN_LIMIT: usize = 4096;
    let mut slots: HashMap<WorkerId, usize> = HashMap::new();
    let mut candidates: Vec<WorkerId> = workers
        .values()
        .filter(|w| w.free_slots() > 0)
        .map(|w| w.worker_id.clone())
        .collect();
    candidates.sort_unstable();
    let mut leased = 0;
    while !candidates.is_empty() && !queue.is_empty() {
        let mut progressed = false;
        for wid in &candidates {
            let Some(w) = workers.get(wid) else { continue };
            let used = slots.entry(wid.clone()).or_default();
            if w.free_slots() <= *used {
                continue;
            }
            let pick = queue
                .iter()
                .take(SCAN_LIMIT)
                .find(|(_, _, id)| specs.get(id).is_some_and(|s| w.can_run(s)))
                .cloned();
            if let Some(key) = pick {
                queue.remove(&key);
                *used += 1;
                leased += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
        candidates.retain(|w| {
            workers
                .get(w)
                .is_some_and(|x| x.free_slots() > slots.get(w).copied().unwrap_or(0))
        });
    }
    leased
}

fn scan_queue(n: usize, kind: &str) -> (BTreeSet<QueueKey>, HashMap<TaskId, TaskSpec>) {
    let mut q = BTreeSet::new();
    let mut specs = HashMap::new();
    for i in 0..n {
        let id = TaskId::parse(&format!("t-{i}")).expect("id");
        q.insert(((i % 10) as u8, i as u64, id.clone()));
        specs.insert(id, spec(kind));
    }
    (q, specs)
}

fn baseline(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch_scan_baseline");
    g.sample_size(10);
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("plan_10k_idle_workers_10k_tasks", |b| {
        let workers = fleet(10_000, &["noop"]);
        b.iter_batched(
            || scan_queue(10_000, "noop"),
            |(mut q, specs)| assert_eq!(scan_plan(&mut q, &specs, &workers), 10_000),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("plan_10k_idle_workers_nothing_they_can_run", |b| {
        let workers = fleet(10_000, &["noop"]);
        let (mut q, specs) = scan_queue(1_000, "gpu");
        b.iter(|| assert_eq!(scan_plan(&mut q, &specs, &workers), 0))
    });
    g.finish();
}

criterion_group!(benches, dispatch, baseline);
criterion_main!(benches);
