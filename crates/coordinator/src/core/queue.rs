//! The queue of tasks waiting for a worker, and the dispatch plan over it.
//!
//! Tasks are grouped by what they require of a worker ([`Requirement`]: executor kind,
//! capabilities, tags, and for a config too large for the frames every peer takes, the frame
//! limit its assignment needs); each group is ordered by (priority, submission). A worker's next task
//! is the first head among the groups it can run, so one decision costs a look at each group,
//! not a scan of the queue. Workers that may have a free slot are kept in an ordered set, so
//! a dispatch visits only them, not every known worker.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
        w.executors.contains(&self.kind)
            && self.requires.iter().all(|c| w.capabilities.contains(c))
            && self
                .tags
                .iter()
                .all(|(k, v)| w.tags.get(k).is_some_and(|x| x == v))
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

/// Queued tasks, grouped by requirement.
#[derive(Debug, Default)]
pub struct Queue {
    groups: HashMap<Requirement, BTreeSet<QueueKey>>,
    len: usize,
}

impl Queue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn insert(&mut self, spec: &TaskSpec, key: QueueKey) {
        if self
            .groups
            .entry(Requirement::of(spec))
            .or_default()
            .insert(key)
        {
            self.len += 1;
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
        removed
    }

    /// Takes the first task, in queue order, that `w` can run.
    pub fn pop_for(&mut self, w: &Worker) -> Option<QueueKey> {
        let (req, _) = self
            .groups
            .iter()
            .filter(|(req, _)| req.met_by(w))
            .filter_map(|(req, g)| g.first().map(|k| (req, k)))
            .min_by(|a, b| a.1.cmp(b.1))?;
        let req = req.clone();
        let group = self.groups.get_mut(&req)?;
        let key = group.pop_first()?;
        if group.is_empty() {
            self.groups.remove(&req);
        }
        self.len -= 1;
        Some(key)
    }
}

/// One dispatch: in rounds, each worker of `free` with a free slot takes the first queued task
/// it can run, one per round, so work spreads. The rounds go in id order from the worker after
/// `after` (the last one a dispatch leased to), round the end and back: each dispatch starting
/// at the lowest id, tasks that trickle in (a dispatch each) all went to one worker while the
/// others idled. Returns the leases to make, in order. Workers found without a free slot leave
/// `free`; whoever frees a slot must put the worker back.
pub fn plan(
    queue: &mut Queue,
    free: &mut BTreeSet<WorkerId>,
    workers: &IdMap<WorkerId, Worker>,
    after: Option<&WorkerId>,
) -> Vec<(QueueKey, WorkerId)> {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let mut out = Vec::new();
    let mut full = Vec::new();
    let mut open: Vec<(&Worker, usize)> = Vec::new();
    let ids: Box<dyn Iterator<Item = &WorkerId>> = match after {
        Some(a) => Box::new(
            free.range((Excluded(a), Unbounded))
                .chain(free.range((Unbounded, Included(a)))),
        ),
        None => Box::new(free.iter()),
    };
    for id in ids {
        match workers.get(id).map(|w| (w, w.free_slots())) {
            Some((w, n)) if n > 0 => open.push((w, n)),
            _ => full.push(id.clone()),
        }
    }
    while !open.is_empty() && !queue.is_empty() {
        let mut progressed = false;
        for (w, n) in open.iter_mut() {
            if queue.is_empty() {
                break;
            }
            if let Some(key) = queue.pop_for(w) {
                out.push((key, w.worker_id.clone()));
                *n -= 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
        open.retain(|(w, n)| {
            if *n == 0 {
                full.push(w.worker_id.clone());
            }
            *n > 0
        });
    }
    for id in full {
        free.remove(&id);
    }
    out
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
        assert_eq!(q.pop_for(&worker("a", &["command"], 1)), Some(cmd));
        assert_eq!(
            q.pop_for(&worker("b", &["sleep", "command"], 1)),
            Some(sleep_high)
        );
        assert_eq!(q.pop_for(&worker("c", &["command"], 1)), None);
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
        assert_eq!(q.pop_for(&with_frame("a", 100_000)), Some(small));
        assert_eq!(q.pop_for(&with_frame("b", 100_000)), None);
        assert_eq!(q.pop_for(&with_frame("c", 128 * 1024)), Some(big_key));
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
