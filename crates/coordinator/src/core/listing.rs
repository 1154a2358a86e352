//! Indexes of the task table for listings and the overview: tasks by submission number, by
//! status, by last change and by name, and the count of each status. A listing page, a status
//! or name filter and an `updated_since` catch-up then cost the core the tasks they return (or,
//! for a catch-up, the tasks changed since), not a pass over every task; the overview's counts
//! cost nothing.
//!
//! The core keeps them with the table: a task enters at submission (or load), is re-indexed when
//! it is saved (every change of a task is saved, so none escapes), and leaves at removal.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use chrono::{DateTime, Utc};
use tether_proto::{TaskId, TaskStatus};

use super::TaskQuery;
use crate::model::Task;

/// What a task is indexed under, besides its submission number.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    id: TaskId,
    status: TaskStatus,
    updated_at: DateTime<Utc>,
}

impl Entry {
    fn of(t: &Task) -> Self {
        Self {
            id: t.task_id.clone(),
            status: t.status,
            updated_at: t.updated_at,
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Listing {
    by_seq: BTreeMap<u64, Entry>,
    by_status: BTreeSet<(TaskStatus, u64)>,
    by_update: BTreeSet<(DateTime<Utc>, u64)>,
    /// The submission numbers of the tasks of each name (a spec's name never changes): a run's
    /// tasks, submitted under one name, listed without a pass over the others.
    by_name: BTreeMap<String, BTreeSet<u64>>,
    counts: [u64; TaskStatus::ALL.len()],
}

fn slot(s: TaskStatus) -> usize {
    TaskStatus::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

impl Listing {
    /// Indexes `t` as it is now, in place of what it was indexed under.
    pub(super) fn put(&mut self, t: &Task) {
        let seq = t.submit_seq;
        // In place: a save changes the status now and then and the time of the last change
        // always, and each index moved is two walks of its tree (this runs on every save).
        let Some(e) = self.by_seq.get_mut(&seq) else {
            self.by_status.insert((t.status, seq));
            self.by_update.insert((t.updated_at, seq));
            self.counts[slot(t.status)] += 1;
            self.by_seq.insert(seq, Entry::of(t));
            if let Some(name) = &t.spec.name {
                self.by_name.entry(name.clone()).or_default().insert(seq);
            }
            return;
        };
        if e.status != t.status {
            self.by_status.remove(&(e.status, seq));
            self.by_status.insert((t.status, seq));
            let n = &mut self.counts[slot(e.status)];
            *n = n.saturating_sub(1);
            self.counts[slot(t.status)] += 1;
            e.status = t.status;
        }
        if e.updated_at != t.updated_at {
            self.by_update.remove(&(e.updated_at, seq));
            self.by_update.insert((t.updated_at, seq));
            e.updated_at = t.updated_at;
        }
    }

    /// Forgets `t`.
    pub(super) fn remove(&mut self, t: &Task) {
        if let Some(old) = self.by_seq.remove(&t.submit_seq) {
            self.unindex(t.submit_seq, &old);
        }
        if let Some(name) = &t.spec.name
            && let Some(seqs) = self.by_name.get_mut(name.as_str())
        {
            seqs.remove(&t.submit_seq);
            if seqs.is_empty() {
                self.by_name.remove(name.as_str());
            }
        }
    }

    fn unindex(&mut self, seq: u64, old: &Entry) {
        self.by_status.remove(&(old.status, seq));
        self.by_update.remove(&(old.updated_at, seq));
        let n = &mut self.counts[slot(old.status)];
        *n = n.saturating_sub(1);
    }

    /// How many tasks have `status`.
    pub(super) fn count(&self, status: TaskStatus) -> u64 {
        self.counts[slot(status)]
    }

    /// The names tasks have, the one submitted under last first.
    pub(super) fn names_newest_first(&self) -> Vec<&str> {
        let mut names: Vec<(u64, &str)> = self
            .by_name
            .iter()
            .filter_map(|(name, seqs)| Some((*seqs.last()?, name.as_str())))
            .collect();
        names.sort_unstable_by(|a, b| b.cmp(a));
        names.into_iter().map(|(_, name)| name).collect()
    }

    /// The ids of the tasks of `name`, in submission order.
    pub(super) fn named(&self, name: &str) -> impl Iterator<Item = &TaskId> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|seq| self.by_seq.get(seq).map(|e| &e.id))
    }

    /// The ids `q` asks for, in its order, looked up in `admits` (which checks the task itself;
    /// `seq_of` gives a task's submission number). Named ids are each looked up; a page walks
    /// the index from its `after_seq`; a name filter walks that name's tasks, else a status
    /// filter that status's; an `updated_since` walks the tasks changed since, then keeps the first `limit` of them.
    pub(super) fn query(
        &self,
        q: &TaskQuery,
        admits: impl Fn(&TaskId) -> bool,
        seq_of: impl Fn(&TaskId) -> Option<u64>,
    ) -> Vec<TaskId> {
        if q.limit == 0 {
            return Vec::new();
        }
        // The task itself decides; the index only finds candidates.
        let wanted = |seq: &u64| {
            self.by_seq
                .get(seq)
                .filter(|e| admits(&e.id))
                .map(|e| e.id.clone())
        };
        let rank = |(seq, _): &(u64, TaskId)| match q.newest_first {
            false => *seq,
            true => u64::MAX - *seq,
        };
        let first = |mut found: Vec<(u64, TaskId)>| {
            if found.len() > q.limit {
                found.select_nth_unstable_by_key(q.limit - 1, rank);
                found.truncate(q.limit);
            }
            found.sort_unstable_by_key(rank);
            found.into_iter().map(|(_, id)| id).collect()
        };
        if let Some(ids) = &q.ids {
            // The named tasks, each looked up: as many as named, whatever the table holds.
            let found = ids
                .iter()
                .filter_map(|id| {
                    let seq = seq_of(id)?;
                    wanted(&seq).map(|id| (seq, id))
                })
                .collect();
            return first(found);
        }
        if let Some(since) = q.updated_since {
            let found: Vec<(u64, TaskId)> = self
                .by_update
                .range((since, 0)..)
                .filter_map(|(_, seq)| wanted(seq).map(|id| (*seq, id)))
                .collect();
            return first(found);
        }
        // The submission numbers past `after_seq`, in the order asked.
        let (lo, hi) = match (q.newest_first, q.after_seq) {
            (false, Some(a)) => (Bound::Excluded(a), Bound::Unbounded),
            (true, Some(a)) => (Bound::Unbounded, Bound::Excluded(a)),
            (_, None) => (Bound::Unbounded, Bound::Unbounded),
        };
        let seqs: Box<dyn DoubleEndedIterator<Item = u64>> = match (&q.name, q.status) {
            // The tasks of the name (a status is checked on each, as every filter is).
            (Some(name), _) => match self.by_name.get(name.as_str()) {
                Some(seqs) => Box::new(seqs.range((lo, hi)).copied()),
                None => return Vec::new(),
            },
            (None, Some(s)) => {
                let lo = match lo {
                    Bound::Excluded(a) => Bound::Excluded((s, a)),
                    _ => Bound::Included((s, 0)),
                };
                let hi = match hi {
                    Bound::Excluded(a) => Bound::Excluded((s, a)),
                    _ => Bound::Included((s, u64::MAX)),
                };
                Box::new(self.by_status.range((lo, hi)).map(|(_, seq)| *seq))
            }
            (None, None) => Box::new(self.by_seq.range((lo, hi)).map(|(seq, _)| *seq)),
        };
        let in_order: Box<dyn Iterator<Item = u64>> = match q.newest_first {
            false => seqs,
            true => Box::new(seqs.rev()),
        };
        in_order
            .filter_map(|seq| wanted(&seq))
            .take(q.limit)
            .collect()
    }

    /// Whether the indexes hold exactly `tasks`, each as it is now (for tests).
    #[cfg(test)]
    pub(super) fn matches<'a>(&self, tasks: impl Iterator<Item = &'a Task>) -> bool {
        let mut fresh = Listing::default();
        for t in tasks {
            fresh.put(t);
        }
        *self == fresh
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use rand::{Rng, SeedableRng};
    use std::cell::Cell;
    use tether_proto::TaskSpec;

    use super::*;

    fn named(seq: u64, status: TaskStatus, updated_at: DateTime<Utc>, name: Option<&str>) -> Task {
        let mut spec = TaskSpec::new("sleep", serde_json::json!({}));
        spec.name = name.map(str::to_owned);
        Task::fixture(&format!("t{seq}"), spec, status, seq, updated_at)
    }

    /// Names the random tests give tasks and ask for ("c" no task has).
    const NAMES: [Option<&str>; 4] = [None, Some("a"), Some("b"), Some("c")];

    /// What a listing returned before the indexes: a pass over every task.
    fn by_pass(tasks: &BTreeMap<TaskId, Task>, q: &TaskQuery) -> Vec<TaskId> {
        let mut v: Vec<&Task> = tasks.values().filter(|t| q.admits(t)).collect();
        v.sort_by_key(|t| match q.newest_first {
            false => t.submit_seq,
            true => u64::MAX - t.submit_seq,
        });
        v.into_iter()
            .take(q.limit)
            .map(|t| t.task_id.clone())
            .collect()
    }

    #[test]
    fn a_query_returns_what_a_pass_over_every_task_would_as_tasks_change_and_go() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let t0 = Utc::now();
        let mut tasks: BTreeMap<TaskId, Task> = BTreeMap::new();
        let mut listing = Listing::default();
        for round in 0..2_000u64 {
            // Submit, change or remove a task.
            match rng.random_range(0..10) {
                0..4 => {
                    let name = NAMES[rng.random_range(0..3)];
                    let t = named(round, TaskStatus::Queued, t0, name);
                    listing.put(&t);
                    tasks.insert(t.task_id.clone(), t);
                }
                4..9 if !tasks.is_empty() => {
                    let id = tasks.keys().nth(rng.random_range(0..tasks.len())).cloned();
                    let t = tasks.get_mut(&id.expect("a task")).expect("a task");
                    t.status = TaskStatus::ALL[rng.random_range(0..TaskStatus::ALL.len())];
                    t.updated_at = t0 + Duration::milliseconds(rng.random_range(0..1000));
                    listing.put(t);
                }
                _ if !tasks.is_empty() => {
                    let id = tasks.keys().nth(rng.random_range(0..tasks.len())).cloned();
                    let t = tasks.remove(&id.expect("a task")).expect("a task");
                    listing.remove(&t);
                }
                _ => {}
            }
            if round % 10 != 0 {
                continue;
            }
            assert!(listing.matches(tasks.values()));
            for s in TaskStatus::ALL {
                let n = tasks.values().filter(|t| t.status == s).count() as u64;
                assert_eq!(listing.count(s), n, "{s:?}");
            }
            let q = TaskQuery {
                status: rng
                    .random_bool(0.5)
                    .then(|| TaskStatus::ALL[rng.random_range(0..TaskStatus::ALL.len())]),
                limit: rng.random_range(0..20),
                newest_first: rng.random_bool(0.5),
                updated_since: rng
                    .random_bool(0.3)
                    .then(|| t0 + Duration::milliseconds(rng.random_range(0..1000))),
                after_seq: rng.random_bool(0.5).then(|| rng.random_range(0..round + 2)),
                // Some of them never submitted, or removed since.
                ids: rng.random_bool(0.4).then(|| {
                    (0..rng.random_range(0..30))
                        .map(|_| format!("t{}", rng.random_range(0..round + 20)))
                        .map(|id| TaskId::parse(&id).expect("id"))
                        .collect()
                }),
                name: NAMES[rng.random_range(0..NAMES.len())].map(str::to_owned),
            };
            let admits = |id: &TaskId| q.admits(&tasks[id]);
            let seq_of = |id: &TaskId| tasks.get(id).map(|t| t.submit_seq);
            assert_eq!(
                listing.query(&q, admits, seq_of),
                by_pass(&tasks, &q),
                "{q:?}"
            );
        }
    }

    #[test]
    fn a_page_or_a_status_looks_at_the_tasks_it_returns_not_at_the_table() {
        let t0 = Utc::now();
        let mut listing = Listing::default();
        // 10,000 tasks, three of them running, the rest completed; each changed at its own
        // millisecond.
        let status = |seq: u64| match seq % 3_000 {
            0 => TaskStatus::Running,
            _ => TaskStatus::Completed,
        };
        // Four of them submitted under one name, spread over the table.
        let name = |seq: u64| (seq % 2_500 == 7).then_some("nightly-7");
        for seq in 0..10_000 {
            let at = t0 + Duration::milliseconds(seq as i64);
            listing.put(&named(seq, status(seq), at, name(seq)));
        }
        let looked = Cell::new(0u32);
        let ask = |q: TaskQuery| {
            looked.set(0);
            let got = listing.query(
                &q,
                |_| {
                    looked.set(looked.get() + 1);
                    true
                },
                |id| id.as_str()[1..].parse().ok(),
            );
            (got.len(), looked.get())
        };
        let page = TaskQuery {
            limit: 10,
            ..TaskQuery::default()
        };
        // A page deep in the table.
        let deep = TaskQuery {
            after_seq: Some(9_000),
            ..page.clone()
        };
        assert_eq!(ask(deep.clone()), (10, 10));
        assert_eq!(
            ask(TaskQuery {
                newest_first: true,
                ..deep
            }),
            (10, 10)
        );
        // A rare status.
        let running = TaskQuery {
            status: Some(TaskStatus::Running),
            ..page.clone()
        };
        assert_eq!(ask(running), (4, 4));
        // The tasks changed in the last 5 ms of the table's history.
        let recent = TaskQuery {
            updated_since: Some(t0 + Duration::milliseconds(9_995)),
            ..page
        };
        assert_eq!(ask(recent), (5, 5));
        // Named tasks, deep in the table and not, one never submitted: each looked up.
        let named = TaskQuery {
            ids: Some(
                ["t9990", "t12", "t5000", "t77777"]
                    .iter()
                    .map(|id| TaskId::parse(id).expect("id"))
                    .collect(),
            ),
            limit: 10,
            ..TaskQuery::default()
        };
        assert_eq!(ask(named), (3, 3));
        // A run's tasks by their name, and its next page.
        let run = TaskQuery {
            name: Some("nightly-7".into()),
            limit: 10,
            ..TaskQuery::default()
        };
        assert_eq!(ask(run.clone()), (4, 4));
        assert_eq!(
            ask(TaskQuery {
                after_seq: Some(2_507),
                ..run
            }),
            (2, 2)
        );
    }
}
