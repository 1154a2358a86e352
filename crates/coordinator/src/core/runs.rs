//! Runs: the tasks submitted under one name (`spec.name`), judged as `tether report` judges
//! them, by each task's latest try. A chain starts at each task of the name that is no retry
//! of another task of the name, and follows the retries the coordinator recorded
//! (`retried_by`, whatever name a retry was submitted under) to the last: a run whose failures
//! were retried to completion has passed.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tether_proto::{TaskId, TaskStatus};

use super::Core;
use crate::model::Task;

/// Which runs a listing returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunQuery {
    /// Only the run of this name.
    pub name: Option<String>,
    /// At most this many, the newest (by its latest submission) first.
    pub limit: usize,
}

/// Where a run stands, by its latest tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunVerdict {
    /// A latest try has not ended.
    Running,
    /// Every latest try completed.
    Passed,
    /// Every latest try ended, and one did not complete (failed, timed out or cancelled).
    Failed,
}

/// A run: its tasks, each by its latest try.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RunSummary {
    /// The name its tasks were submitted under.
    pub name: String,
    /// Its tasks, each counted once by its latest try.
    pub tasks: u64,
    /// The latest tries by status (only the statuses some have).
    #[schema(value_type = BTreeMap<String, u64>)]
    pub by_status: BTreeMap<&'static str, u64>,
    /// Of them, tries that are retries (their task was run again as a new task).
    pub retried: u64,
    /// Of them, completed after an earlier try or attempt failed or timed out (a flaky test:
    /// `tether report` marks it so).
    pub flaky: u64,
    pub verdict: RunVerdict,
    /// When its first and its latest task (of the name) were submitted.
    pub first_submitted_at: DateTime<Utc>,
    pub last_submitted_at: DateTime<Utc>,
    /// When the last of its latest tries ended, once all have.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

impl Core {
    /// The runs `q` asks for, the newest first. A run costs the core its tasks and their
    /// retries; the names are found through the listing's index.
    pub(super) fn runs(&self, q: &RunQuery) -> Vec<RunSummary> {
        let names = match &q.name {
            Some(name) => vec![name.as_str()],
            None => self.listing.names_newest_first(),
        };
        names
            .into_iter()
            .filter_map(|name| self.run_named(name))
            .take(q.limit)
            .collect()
    }

    /// The run `name`, `None` when no task has that name.
    fn run_named(&self, name: &str) -> Option<RunSummary> {
        let tasks: Vec<&Task> = self
            .listing
            .named(name)
            .filter_map(|id| self.tasks.get(id))
            .collect();
        let (first, last) = (tasks.first()?, tasks.last()?);
        let of_the_run = |id: &TaskId| {
            self.tasks
                .get(id)
                .is_some_and(|t| t.spec.name.as_deref() == Some(name))
        };
        let mut run = RunSummary {
            name: name.to_owned(),
            tasks: 0,
            by_status: BTreeMap::new(),
            retried: 0,
            flaky: 0,
            verdict: RunVerdict::Passed,
            first_submitted_at: first.submitted_at,
            last_submitted_at: last.submitted_at,
            finished_at: None,
        };
        let mut ended = true;
        for head in tasks
            .iter()
            .filter(|t| !t.spec.retry_of.as_ref().is_some_and(of_the_run))
        {
            let (latest, failed_before) = self.latest_try(head);
            run.tasks += 1;
            *run.by_status.entry(latest.status.as_str()).or_default() += 1;
            run.retried += u64::from(latest.task_id != head.task_id);
            run.flaky += u64::from(latest.status == TaskStatus::Completed && failed_before);
            if !latest.status.is_terminal() {
                ended = false;
            } else if latest.status != TaskStatus::Completed {
                run.verdict = RunVerdict::Failed;
            }
            run.finished_at = run.finished_at.max(latest.finished_at);
        }
        if !ended {
            run.verdict = RunVerdict::Running;
            run.finished_at = None;
        }
        Some(run)
    }

    /// The last of `task`'s retries (itself when it has none), as far as they are kept (a
    /// retry removed by retention ends the chain at the task it retried), and whether an
    /// earlier try, or an earlier attempt of the last, failed or timed out.
    fn latest_try<'a>(&'a self, task: &'a Task) -> (&'a Task, bool) {
        let failure = TaskStatus::is_failure_end;
        let mut t = task;
        let mut failed_before = false;
        // A retry is made only of an ended task, under a new id, so a chain cannot loop;
        // bounded all the same.
        for _ in 0..self.tasks.len() {
            match t.retried_by.as_ref().and_then(|id| self.tasks.get(id)) {
                Some(next) => {
                    failed_before |= t.status.is_failure()
                        || t.attempts.iter().any(|a| failure(a.end.as_deref()));
                    t = next;
                }
                None => break,
            }
        }
        let attempts = t.attempts.iter().rev().skip(1);
        failed_before |= attempts.into_iter().any(|a| failure(a.end.as_deref()));
        (t, failed_before)
    }
}
