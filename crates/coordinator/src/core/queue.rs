//! The queue of tasks waiting for a worker, and the dispatch plan over it.
//!
//! Tasks are grouped by what they require of a worker ([`Requirement`]: executor kind,
//! capabilities, tags, and for a config too large for the frames every peer takes, the frame
//! limit its assignment needs); each group is ordered by (priority, submission). The next task
//! to plan is the first head among the groups, so one decision costs a look at each group, not
//! a scan of the queue. Workers that may have a free slot are kept in an ordered set, so a
//! dispatch visits only them, not every known worker, and matches each against each group at
//! most once per plan, not once per lease: workers that meet the same groups form a class, and
//! the choice of worker and any chain of moves that makes room ([`plan`]) work over classes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tether_proto::{TaskId, TaskSpec, WorkerId};

use crate::model::{IdMap, Worker};

/// Priority, then submission order, then id: the order tasks leave the queue.
pub type QueueKey = (u8, u64, TaskId);

/// What a task requires of the worker that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    kind: String,
    /// Sorted, without repeats.
    requires: Vec<String>,
    tags: BTreeMap<String, String>,
    /// The least frame limit a worker must take to be sent the assignment: 0 when the config
    /// fits in the frames every peer takes ([`tether_proto::settings::MIN_FRAME`]), as nearly
    /// every config does, so only tasks of large configs group apart by size.
    frame: usize,
}

impl Requirement {
    pub fn of(spec: &TaskSpec) -> Self {
        let mut requires = spec.requires.clone();
        requires.sort_unstable();
        requires.dedup();
        Self {
            kind: spec.kind.clone(),
            requires,
            tags: spec.tags.clone(),
            frame: frame_needed(&spec.config),
        }
    }

    /// Whether `w` can run tasks with this requirement: [`Worker::can_run`], and frames that
    /// carry the assignment (a worker of smaller frames is passed over, not sent a frame it
    /// would refuse).
    pub fn met_by(&self, w: &Worker) -> bool {
        w.lacks(&self.kind, &self.requires, &self.tags).is_none()
            && (self.frame == 0
                || w.session
                    .as_ref()
                    .is_some_and(|s| s.max_frame >= self.frame))
    }
}

/// The frame limit an assignment of `config` needs, or 0 when every peer's frames carry it.
fn frame_needed(config: &tether_proto::msg::JsonText) -> usize {
    let needed = config
        .get()
        .len()
        .saturating_add(tether_proto::codec::ENVELOPE_BYTES);
    if needed <= tether_proto::settings::MIN_FRAME {
        0
    } else {
        needed
    }
}

/// Priorities a task may have (0..=[`tether_proto::task::MAX_PRIORITY`]).
pub const PRIORITIES: usize = tether_proto::task::MAX_PRIORITY as usize + 1;

/// Queued tasks by priority, kept by the [`Queue`] as it changes and read by `/metrics`
/// (`tether_queue_depth{priority}`) without asking the core.
#[derive(Debug, Default)]
pub struct Depths([AtomicU64; PRIORITIES]);

impl Depths {
    /// Queued tasks of each priority, index = priority.
    pub fn get(&self) -> [u64; PRIORITIES] {
        std::array::from_fn(|p| self.0[p].load(Ordering::Relaxed))
    }

    fn of(&self, priority: u8) -> &AtomicU64 {
        // A priority past the last (validated away at submission) counts as the last.
        &self.0[usize::from(priority).min(PRIORITIES - 1)]
    }

    fn add(&self, priority: u8) {
        self.of(priority).fetch_add(1, Ordering::Relaxed);
    }

    fn sub(&self, priority: u8) {
        self.of(priority).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Queued tasks, grouped by requirement.
#[derive(Debug, Default)]
pub struct Queue {
    groups: HashMap<Requirement, BTreeSet<QueueKey>>,
    len: usize,
    depths: Arc<Depths>,
}

impl Queue {
    /// An empty queue that keeps its depth by priority in `depths`.
    pub fn sharing(depths: Arc<Depths>) -> Self {
        Self {
            depths,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn insert(&mut self, spec: &TaskSpec, key: QueueKey) {
        let priority = key.0;
        if self
            .groups
            .entry(Requirement::of(spec))
            .or_default()
            .insert(key)
        {
            self.len += 1;
            self.depths.add(priority);
        }
    }

    /// Removes a task; false if it was not queued.
    pub fn remove(&mut self, spec: &TaskSpec, key: &QueueKey) -> bool {
        let req = Requirement::of(spec);
        let Some(group) = self.groups.get_mut(&req) else {
            return false;
        };
        let removed = group.remove(key);
        if group.is_empty() {
            self.groups.remove(&req);
        }
        self.len -= usize::from(removed);
        if removed {
            self.depths.sub(key.0);
        }
        removed
    }
}

/// One dispatch: the queued tasks, most urgent first, each to a free worker that can run it.
///
/// Which worker takes a task matters, as leases are not taken back: a worker of many kinds that
/// took a task any worker could run left a more urgent task only it could run waiting, while a
/// less urgent one started elsewhere. So when no free worker can run a task, planned tasks move
/// along a chain to make room (a worker that can run it gives up a task planned for it to
/// another that can run that one, and so on, to one with a free slot), found by a search over
/// the groups and over classes of workers that meet the same groups. A task is left queued only
/// when no chain exists, and then none exists for the rest of its group, which is passed over.
/// So the tasks planned are the most urgent the free slots can run at once: no other assignment
/// runs a waiting task instead of a less urgent planned one (the sets of tasks the slots can
/// run at once form a transversal matroid, over which taking each task in order when it still
/// fits is optimal). A search costs groups x classes x groups, small, and runs only when every
/// worker that can run a task is full.
///
/// Among the free workers that can run a task, the one given fewest in this plan goes first,
/// then id order from the worker after `after` (the last one a dispatch leased to), round the
/// end and back: one task per worker per round, so work spreads, and so do tasks that trickle
/// in (a dispatch each): each dispatch starting at the lowest id, they all went to one worker
/// while the others idled. Workers are looked at in that order only as far as the plan needs.
/// Returns the leases to make, in order. Workers found without a free slot leave `free`;
/// whoever frees a slot must put the worker back.
pub fn plan(
    queue: &mut Queue,
    free: &mut BTreeSet<WorkerId>,
    workers: &IdMap<WorkerId, Worker>,
    after: Option<&WorkerId>,
) -> Vec<(QueueKey, WorkerId)> {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let mut full = Vec::new();
    let mut open = Vec::new();
    let ids: Box<dyn Iterator<Item = &WorkerId>> = match after {
        Some(a) => Box::new(
            free.range((Excluded(a), Unbounded))
                .chain(free.range((Unbounded, Included(a)))),
        ),
        None => Box::new(free.iter()),
    };
    for id in ids {
        match workers.get(id).map(|w| (w, w.free_slots())) {
            Some((worker, slots)) if slots > 0 => open.push(Open {
                worker,
                slots,
                taken: 0,
            }),
            _ => full.push(id.clone()),
        }
    }
    let mut planner = Planner::new(queue.groups.iter_mut().collect(), open);
    planner.run();
    let Planner { out, open, .. } = planner;
    full.extend(
        open.iter()
            .filter(|o| o.slots == 0)
            .map(|o| o.worker.worker_id.clone()),
    );
    let leases: Vec<(QueueKey, WorkerId)> = out
        .into_iter()
        .map(|(key, i)| (key, open[i].worker.worker_id.clone()))
        .collect();
    queue.groups.retain(|_, g| !g.is_empty());
    queue.len -= leases.len();
    for ((priority, ..), _) in &leases {
        queue.depths.sub(*priority);
    }
    for id in full {
        free.remove(&id);
    }
    leases
}

/// A worker with a free slot at the start of a plan.
struct Open<'a> {
    worker: &'a Worker,
    /// Free slots left.
    slots: usize,
    /// Tasks given in this plan.
    taken: usize,
}

/// Workers that meet the same groups, so any of them can take any other's planned task.
struct Class {
    /// The groups met, a bit each.
    meets: Vec<u64>,
    /// Workers not yet given a task in this plan, in rotation order.
    fresh: VecDeque<usize>,
    /// Workers given some that still have a free slot, in turn. Only used once every worker
    /// has been looked at (`Planner::free_for`), so it stays in (taken, rotation) order.
    again: VecDeque<usize>,
    /// Per group, the entries of the plan given to workers of this class.
    planned: Vec<Vec<usize>>,
}

impl Class {
    fn meets(&self, g: usize) -> bool {
        self.meets[g / 64] & (1 << (g % 64)) != 0
    }

    /// The worker that takes this class's next task.
    fn next(&self) -> Option<usize> {
        self.fresh.front().or(self.again.front()).copied()
    }
}

/// The state of one [`plan`]. Indices: groups into `groups`, workers into `open` (rotation
/// order), classes into `classes`, plan entries into `out`.
struct Planner<'a> {
    /// The groups queued at the start (emptied ones stay until the end).
    groups: Vec<(&'a Requirement, &'a mut BTreeSet<QueueKey>)>,
    /// Groups with a task no chain makes room for: the rest of the group waits too.
    blocked: Vec<bool>,
    open: Vec<Open<'a>>,
    /// How many of `open`, from the first, have been put in a class.
    seen: usize,
    classes: Vec<Class>,
    class_of: IdMap<Vec<u64>, usize>,
    /// The groups a worker meets, kept to spare an allocation per worker looked at.
    scratch: Vec<u64>,
    /// Per group, the classes that meet it.
    meeting: Vec<Vec<usize>>,
    /// The plan: each task and its worker.
    out: Vec<(QueueKey, usize)>,
}

impl<'a> Planner<'a> {
    fn new(
        groups: Vec<(&'a Requirement, &'a mut BTreeSet<QueueKey>)>,
        open: Vec<Open<'a>>,
    ) -> Self {
        let n = groups.len();
        Self {
            groups,
            blocked: vec![false; n],
            open,
            seen: 0,
            classes: Vec::new(),
            class_of: IdMap::default(),
            scratch: Vec::new(),
            meeting: vec![Vec::new(); n],
            out: Vec::new(),
        }
    }

    fn run(&mut self) {
        let mut room: usize = self.open.iter().map(|o| o.slots).sum();
        while room > 0 {
            let head = (0..self.groups.len())
                .filter(|&g| !self.blocked[g])
                .filter_map(|g| self.groups[g].1.first().map(|k| (k, g)))
                .min();
            let Some((_, g)) = head else { break };
            let placed = match self.free_for(g) {
                Some(c) => {
                    let w = self.take(c);
                    self.place(g, w, c);
                    true
                }
                None => self.chain(g),
            };
            if placed {
                room -= 1;
            } else {
                self.blocked[g] = true;
            }
        }
    }

    /// Plans the head of group `g` on worker `w` of class `c`.
    fn place(&mut self, g: usize, w: usize, c: usize) {
        if let Some(key) = self.groups[g].1.pop_first() {
            self.classes[c].planned[g].push(self.out.len());
            self.out.push((key, w));
        }
    }

    /// The class whose next worker should take a task of group `g`, if any worker with a free
    /// slot meets it: the one given fewest, then the first in rotation order.
    fn free_for(&mut self, g: usize) -> Option<usize> {
        let best = self.meeting[g]
            .iter()
            .filter_map(|&c| self.classes[c].next().map(|w| (self.open[w].taken, w, c)))
            .min();
        if let Some((0, _, c)) = best {
            return Some(c);
        }
        // Workers not yet looked at have been given none: one of them that meets `g` goes
        // before any that has been given one.
        while self.seen < self.open.len() {
            if let Some(c) = self.look_at_next()
                && self.classes[c].meets(g)
            {
                return Some(c);
            }
        }
        best.map(|(_, _, c)| c)
    }

    /// Puts the next worker in rotation order in its class; `None` if it meets no group.
    fn look_at_next(&mut self) -> Option<usize> {
        let w = self.seen;
        self.seen += 1;
        let worker = self.open[w].worker;
        let meets = &mut self.scratch;
        meets.clear();
        meets.resize(self.groups.len().div_ceil(64), 0);
        for (g, (req, _)) in self.groups.iter().enumerate() {
            if req.met_by(worker) {
                meets[g / 64] |= 1 << (g % 64);
            }
        }
        if meets.iter().all(|&m| m == 0) {
            return None;
        }
        let c = match self.class_of.get(meets.as_slice()) {
            Some(&c) => c,
            None => {
                let meets = meets.clone();
                let c = self.classes.len();
                for (g, classes) in self.meeting.iter_mut().enumerate() {
                    if meets[g / 64] & (1 << (g % 64)) != 0 {
                        classes.push(c);
                    }
                }
                self.class_of.insert(meets.clone(), c);
                self.classes.push(Class {
                    meets,
                    fresh: VecDeque::new(),
                    again: VecDeque::new(),
                    planned: vec![Vec::new(); self.groups.len()],
                });
                c
            }
        };
        self.classes[c].fresh.push_back(w);
        Some(c)
    }

    /// Gives a slot of class `c`'s next worker; returns the worker.
    fn take(&mut self, c: usize) -> usize {
        let class = &mut self.classes[c];
        let w = class
            .fresh
            .pop_front()
            .or_else(|| class.again.pop_front())
            .expect("INVARIANT: take is called on a class free_for returned");
        let o = &mut self.open[w];
        o.taken += 1;
        o.slots -= 1;
        if o.slots > 0 {
            class.again.push_back(w);
        }
        w
    }

    /// Plans the head of group `g`, whose workers are all full, by moving planned tasks along a
    /// chain to a worker with a free slot: a breadth-first search over groups, where group `h`
    /// leads to group `i` when a class that meets `h` holds planned tasks of `i`. False if no
    /// chain exists.
    fn chain(&mut self, g: usize) -> bool {
        let n = self.groups.len();
        // Per group reached: the group it was reached from and the class that links them.
        let mut from: Vec<Option<(usize, usize)>> = vec![None; n];
        let mut reached = vec![false; n];
        reached[g] = true;
        let mut todo = VecDeque::from([g]);
        let end = loop {
            let Some(h) = todo.pop_front() else {
                return false;
            };
            if let Some(c) = self.free_for(h) {
                break (h, c);
            }
            for &c in &self.meeting[h] {
                for i in 0..n {
                    if !reached[i] && !self.classes[c].planned[i].is_empty() {
                        reached[i] = true;
                        from[i] = Some((h, c));
                        todo.push_back(i);
                    }
                }
            }
        };
        // From the free worker back to `g`: each worker on the chain takes the task the next
        // one gives up.
        let (mut h, mut c) = end;
        let mut w = self.take(c);
        while let Some((prev, link)) = from[h] {
            let entry = self.classes[link].planned[h]
                .pop()
                .expect("INVARIANT: the search linked these groups by a planned task");
            let gives = std::mem::replace(&mut self.out[entry].1, w);
            self.classes[c].planned[h].push(entry);
            (h, c, w) = (prev, link, gives);
        }
        self.place(g, w, c);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    use crate::core::SessionRef;
    use crate::model::WorkerState;

    fn worker(id: &str, kinds: &[&str], slots: u32) -> Worker {
        let mut w = Worker::new(WorkerId::parse(id).expect("id"), Utc::now());
        w.executors = kinds.iter().map(|k| k.to_string()).collect();
        w.slots = slots;
        w.state = WorkerState::Connected;
        w.session = Some(SessionRef::new(1, crate::core::mailbox::channel().0));
        w
    }

    fn task(q: &mut Queue, kind: &str, priority: u8, seq: u64) -> QueueKey {
        let mut spec = TaskSpec::new(kind, serde_json::Value::Null);
        spec.priority = priority;
        let key = (
            priority,
            seq,
            TaskId::parse(&format!("t{seq}")).expect("id"),
        );
        q.insert(&spec, key.clone());
        key
    }

    #[test]
    fn a_worker_gets_the_first_task_it_can_run_across_groups() {
        let mut q = Queue::default();
        let _sleep_low = task(&mut q, "sleep", 9, 1);
        let cmd = task(&mut q, "command", 5, 2);
        let sleep_high = task(&mut q, "sleep", 0, 3);
        assert_eq!(next_for(&mut q, worker("a", &["command"], 1)), Some(cmd));
        assert_eq!(
            next_for(&mut q, worker("b", &["sleep", "command"], 1)),
            Some(sleep_high)
        );
        assert_eq!(next_for(&mut q, worker("c", &["command"], 1)), None);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn plan_spreads_one_task_per_worker_per_round_and_drops_full_workers() {
        let mut q = Queue::default();
        for seq in 0..5 {
            task(&mut q, "sleep", 5, seq);
        }
        let workers: IdMap<WorkerId, Worker> =
            [worker("a", &["sleep"], 2), worker("b", &["sleep"], 2)]
                .into_iter()
                .map(|w| (w.worker_id.clone(), w))
                .collect();
        let mut free: BTreeSet<WorkerId> = workers.keys().cloned().collect();
        let plan = plan(&mut q, &mut free, &workers, None);
        let order: Vec<(u64, &str)> = plan.iter().map(|(k, w)| (k.1, w.as_str())).collect();
        assert_eq!(order, vec![(0, "a"), (1, "b"), (2, "a"), (3, "b")]);
        assert!(free.is_empty(), "both workers are full");
        assert_eq!(q.len(), 1);
    }

    /// The depth by priority follows every way in and out of the queue: insert (once per
    /// key), remove and `plan`.
    #[test]
    fn depths_by_priority_follow_the_queue() {
        let depths = Arc::new(Depths::default());
        let mut q = Queue::sharing(depths.clone());
        let at = |p: &[(usize, u64)]| {
            let mut d = [0; PRIORITIES];
            for &(i, n) in p {
                d[i] = n;
            }
            d
        };
        let low = task(&mut q, "sleep", 9, 1);
        // Inserted again: not queued twice.
        q.insert(
            &TaskSpec::new("sleep", serde_json::Value::Null),
            low.clone(),
        );
        task(&mut q, "sleep", 0, 2);
        task(&mut q, "sleep", 0, 3);
        let cmd = task(&mut q, "command", 5, 4);
        assert_eq!(depths.get(), at(&[(0, 2), (5, 1), (9, 1)]));
        let mut spec = TaskSpec::new("command", serde_json::Value::Null);
        spec.priority = 5;
        assert!(q.remove(&spec, &cmd));
        assert!(!q.remove(&spec, &cmd));
        assert_eq!(depths.get(), at(&[(0, 2), (9, 1)]));
        assert_eq!(
            next_for(&mut q, worker("a", &["sleep"], 1)).map(|k| k.0),
            Some(0)
        );
        assert_eq!(depths.get(), at(&[(0, 1), (9, 1)]));
        let workers = fleet(vec![worker("b", &["sleep"], 1)]);
        let mut free: BTreeSet<WorkerId> = workers.keys().cloned().collect();
        assert_eq!(plan(&mut q, &mut free, &workers, None).len(), 1);
        assert_eq!(depths.get(), at(&[(9, 1)]));
        assert_eq!(q.len(), 1);
    }

    fn fleet(ws: Vec<Worker>) -> IdMap<WorkerId, Worker> {
        ws.into_iter().map(|w| (w.worker_id.clone(), w)).collect()
    }

    /// The task a dispatch gives `w` when it is the only worker free, one task at most: what
    /// the coordinator does, not a shortcut beside it.
    fn next_for(q: &mut Queue, w: Worker) -> Option<QueueKey> {
        let workers = fleet(vec![w]);
        let mut free: BTreeSet<WorkerId> = workers.keys().cloned().collect();
        let planned = plan(q, &mut free, &workers, None);
        assert!(planned.len() <= 1, "one slot, one task: {planned:?}");
        planned.into_iter().next().map(|(k, _)| k)
    }

    /// Planned worker by worker, `a` took the most urgent task, `sleep`, which `b` could have
    /// run, and the `gpu` task only `a` runs waited behind the least urgent one `b` took.
    #[test]
    fn a_worker_of_many_kinds_is_kept_for_the_urgent_task_only_it_can_run() {
        for after in [None, Some("a"), Some("b")] {
            let mut q = Queue::default();
            let t1 = task(&mut q, "sleep", 9, 1);
            let t2 = task(&mut q, "gpu", 5, 2);
            let t3 = task(&mut q, "sleep", 0, 3);
            let workers = fleet(vec![
                worker("a", &["sleep", "gpu"], 1),
                worker("b", &["sleep"], 1),
            ]);
            let mut free: BTreeSet<WorkerId> = workers.keys().cloned().collect();
            let after = after.map(|a| WorkerId::parse(a).expect("id"));
            let mut plan = plan(&mut q, &mut free, &workers, after.as_ref());
            plan.sort();
            let got: Vec<(QueueKey, &str)> =
                plan.iter().map(|(k, w)| (k.clone(), w.as_str())).collect();
            assert_eq!(got, vec![(t3, "b"), (t2, "a")], "after {after:?}");
            assert_eq!(q.len(), 1);
            assert!(q.remove(&TaskSpec::new("sleep", serde_json::Value::Null), &t1));
        }
    }

    /// How many of `tasks` the free slots of `workers` can run at once (a maximum bipartite
    /// matching, by augmenting paths), checked the slow way.
    fn most_run_at_once(tasks: &[&str], workers: &[(&Worker, usize)]) -> usize {
        let slots: Vec<&Worker> = workers
            .iter()
            .flat_map(|&(w, n)| std::iter::repeat_n(w, n))
            .collect();
        fn augment(
            t: usize,
            tasks: &[&str],
            slots: &[&Worker],
            holder: &mut [Option<usize>],
            seen: &mut [bool],
        ) -> bool {
            for s in 0..slots.len() {
                if seen[s] || !slots[s].executors.contains(tasks[t]) {
                    continue;
                }
                seen[s] = true;
                if holder[s].is_none_or(|u| augment(u, tasks, slots, holder, seen)) {
                    holder[s] = Some(t);
                    return true;
                }
            }
            false
        }
        let mut holder = vec![None; slots.len()];
        (0..tasks.len())
            .filter(|&t| augment(t, tasks, &slots, &mut holder, &mut vec![false; slots.len()]))
            .count()
    }

    /// Random small fleets and queues: every lease fits its worker, and no task left queued
    /// could run instead of a less urgent planned one, however the free slots were assigned.
    #[test]
    fn no_other_assignment_of_the_free_slots_runs_a_waiting_task_instead_of_a_less_urgent_one() {
        use rand::{Rng, SeedableRng};
        const KINDS: [&str; 3] = ["x", "y", "z"];
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for case in 0..3_000 {
            let workers = fleet(
                (0..rng.random_range(1..6))
                    .map(|i| {
                        let kinds: Vec<&str> =
                            KINDS.into_iter().filter(|_| rng.random_bool(0.5)).collect();
                        let mut w = worker(&format!("w{i}"), &kinds, rng.random_range(0..3));
                        if rng.random_bool(0.1) {
                            w.state = WorkerState::Disconnected;
                        }
                        w
                    })
                    .collect(),
            );
            let mut q = Queue::default();
            let mut kind_of = HashMap::new();
            for seq in 0..rng.random_range(0..10) {
                let kind = KINDS[rng.random_range(0..KINDS.len())];
                kind_of.insert(task(&mut q, kind, rng.random_range(0..3), seq), kind);
            }
            let mut free: BTreeSet<WorkerId> = workers.keys().cloned().collect();
            let after = rng
                .random_bool(0.5)
                .then(|| free.iter().nth(rng.random_range(0..free.len())).cloned())
                .flatten();
            let plan = plan(&mut q, &mut free, &workers, after.as_ref());

            let slots: Vec<(&Worker, usize)> =
                workers.values().map(|w| (w, w.free_slots())).collect();
            for (w, n) in &slots {
                let given: Vec<&str> = plan
                    .iter()
                    .filter(|(_, id)| *id == w.worker_id)
                    .map(|(k, _)| kind_of[k])
                    .collect();
                assert!(given.len() <= *n, "case {case}: {} overfilled", w.worker_id);
                assert!(
                    given.iter().all(|k| w.executors.contains(*k)),
                    "case {case}"
                );
                assert_eq!(free.contains(&w.worker_id), given.len() < *n, "case {case}");
            }
            let planned: Vec<&QueueKey> = plan.iter().map(|(k, _)| k).collect();
            let waiting: Vec<&QueueKey> = kind_of.keys().filter(|k| !planned.contains(k)).collect();
            assert_eq!(q.len(), waiting.len(), "case {case}");
            let kinds = |ks: &[&QueueKey]| ks.iter().map(|k| kind_of[*k]).collect::<Vec<_>>();
            let all: Vec<&QueueKey> = kind_of.keys().collect();
            assert_eq!(
                planned.len(),
                most_run_at_once(&kinds(&all), &slots),
                "case {case}: as many as can run at once"
            );
            for t in &waiting {
                for (i, p) in planned.iter().enumerate() {
                    if p < t {
                        continue;
                    }
                    let mut swapped = planned.clone();
                    swapped[i] = t;
                    assert!(
                        most_run_at_once(&kinds(&swapped), &slots) < planned.len(),
                        "case {case}: {t:?} waits, but could run instead of {p:?}: {plan:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_task_whose_assignment_needs_larger_frames_waits_for_a_worker_that_takes_them() {
        let mut q = Queue::default();
        let mut big = TaskSpec::new("sleep", serde_json::json!({ "pad": "x".repeat(100_000) }));
        big.priority = 0;
        let big_key = (0, 1, TaskId::parse("big").expect("id"));
        q.insert(&big, big_key.clone());
        let small = task(&mut q, "sleep", 9, 2);
        let with_frame = |id: &str, max_frame: usize| {
            let mut w = worker(id, &["sleep"], 1);
            if let Some(s) = w.session.as_mut() {
                s.max_frame = max_frame;
            }
            w
        };
        // Frames of 100 KB carry 100,000 bytes of config, not the message around it.
        assert_eq!(next_for(&mut q, with_frame("a", 100_000)), Some(small));
        assert_eq!(next_for(&mut q, with_frame("b", 100_000)), None);
        assert_eq!(next_for(&mut q, with_frame("c", 128 * 1024)), Some(big_key));
        // Configs that fit the frames every peer takes form one group whatever their size.
        let tiny = TaskSpec::new("sleep", serde_json::json!({ "pad": "x".repeat(1_000) }));
        assert_eq!(
            Requirement::of(&tiny),
            Requirement::of(&TaskSpec::new("sleep", serde_json::Value::Null))
        );
    }

    #[test]
    fn removing_a_task_keeps_the_count_and_drops_empty_groups() {
        let mut q = Queue::default();
        let spec = TaskSpec::new("sleep", serde_json::Value::Null);
        let key = (5, 1, TaskId::parse("t1").expect("id"));
        q.insert(&spec, key.clone());
        assert!(q.remove(&spec, &key));
        assert!(!q.remove(&spec, &key));
        assert!(q.is_empty() && q.groups.is_empty());
    }
}
