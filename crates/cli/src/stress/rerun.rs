//! The verdict "every task ran once": a task the store holds as run more than once (more than
//! one attempt, or a result kept stale) had an attempt taken from its worker. The coordinator
//! does that to a worker that stopped (crashed, or shut down without finishing it) or stayed
//! away past `--lost-after`; to any other it took a live worker for lost, and ran its tasks
//! twice (or the worker said it could not run the attempt, `worker_fault`: its disk or its
//! limits, a fault no scenario injects). The lost and recorded-twice verdicts cannot see it:
//! the store counts the last attempt's result and keeps the first's apart, as stale.
//!
//! Each attempt that another replaced is judged against what the fleet recorded of its worker
//! ([`FleetReport`]), so that exactly the tasks a fault of the run could touch are let off: a
//! worker the run stopped (steady_load's churn, checkpoint_heavy's crash) before the attempt
//! ended, or one away from the coordinator for `--lost-after` or longer around its end
//! (thundering_herd's cut outlasting it, a connection reset whose reconnect took that long).
//! In a run without such a fault (message_flood, mixed_priority, and the others whenever their
//! faults never took a worker away for that long) every task must have run once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::fleet::{FleetReport, WorkerRecord};
use super::report::Report;
use super::truth::{AttemptRow, Truth};

/// The verdict's name.
pub const VERDICT: &str =
    "every task ran once, unless the run stopped its worker or kept it away for --lost-after";

/// Slack on the times compared: the fleet stamps what its workers saw, the coordinator what it
/// saw, moments apart (a reset is seen at once on both sides; a registration is acknowledged a
/// little after the coordinator takes it).
pub const SLACK: Duration = Duration::from_millis(500);

/// Why an attempt another replaced is let off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Excuse {
    /// The run stopped its worker (a crash, or a shutdown) before it ended.
    Stopped,
    /// Its worker was away from the coordinator for `--lost-after` or longer when it ended.
    Away,
}

/// How the attempts another replaced are judged: the fleet's records of its workers, the
/// coordinator's `--lost-after`, and the slack on the times (more than [`SLACK`] where a side
/// notices a silent cut later than the other).
pub struct Judge<'a> {
    workers: HashMap<&'a str, &'a WorkerRecord>,
    /// When the fleet made its report: the end of a spell away still open then.
    report_us: u64,
    lost_after: Duration,
    slack: Duration,
}

impl<'a> Judge<'a> {
    pub fn new(rep: &'a FleetReport, lost_after: Duration, slack: Duration) -> Self {
        Self {
            workers: rep.workers.iter().map(|w| (w.id.as_str(), w)).collect(),
            report_us: rep.at_us,
            lost_after,
            slack,
        }
    }

    /// Why `a` (an attempt another replaced) is let off, if it is.
    fn excuse(&self, a: &AttemptRow) -> Option<Excuse> {
        let w = self.workers.get(a.worker.as_str())?;
        let end = u64::try_from(a.ended_at?.timestamp_micros()).ok()?;
        let slack = self.slack.as_micros() as u64;
        if w.stopped_us > 0 && w.stopped_us <= end + slack {
            return Some(Excuse::Stopped);
        }
        let long = (self.lost_after.saturating_sub(self.slack)).as_micros() as u64;
        let open = (w.away_since_us > 0).then_some((w.away_since_us, self.report_us));
        let mut spells = w
            .sessions
            .iter()
            .filter(|s| s.lost_us > 0)
            .map(|s| (s.lost_us, s.registered_us))
            .chain(open);
        spells
            .any(|(from, to)| {
                from <= end + slack && to + slack >= end && to.saturating_sub(from) >= long
            })
            .then_some(Excuse::Away)
    }
}

/// Adds the verdict on the `submitted` tasks of `t`, each attempt another replaced judged by
/// `judge`, and the figure of the tasks that ran more than once.
pub fn verdict(r: &mut Report, t: &Truth, submitted: &HashSet<String>, judge: &Judge) {
    let again = t.ran_again(submitted);
    let (mut stopped, mut away) = (0u64, 0u64);
    let mut unexcused: Vec<String> = Vec::new();
    for (task, replaced) in &again {
        let mut bad = None;
        for a in replaced {
            match judge.excuse(a) {
                Some(Excuse::Stopped) => stopped += 1,
                Some(Excuse::Away) => away += 1,
                None => {
                    bad.get_or_insert_with(|| describe(task, a));
                }
            }
        }
        unexcused.extend(bad);
    }
    r.tasks_run_again = Some(again.len() as u64);
    let n = submitted.len();
    let lost_after = judge.lost_after.as_millis();
    let excused = match (stopped, away) {
        (0, 0) => String::new(),
        _ => format!(
            "; of the attempts replaced, {stopped} were of a worker the run stopped (crashed or shut down) and {away} of one away for --lost-after ({lost_after} ms) or longer: let off"
        ),
    };
    let detail = match (again.len(), unexcused.first()) {
        (0, _) => format!("each of the {n} tasks ran once: one attempt, no result kept stale"),
        (k, None) => format!(
            "{k} of {n} tasks ran more than once, each after the run stopped the worker of an earlier attempt or kept it away for --lost-after{excused}"
        ),
        (k, Some(first)) => format!(
            "{} of the {k} of {n} tasks that ran more than once lost an attempt whose worker the run neither stopped nor kept away for --lost-after ({lost_after} ms): taken from a live worker (one ended `lost` was taken for lost) and run again; first {first}{excused}",
            unexcused.len()
        ),
    };
    r.verdict(VERDICT, unexcused.is_empty() && n > 0, detail);
}

/// What the store says of attempt `a` of `task`, which another replaced.
fn describe(task: &str, a: &AttemptRow) -> String {
    let end = match (&a.end, a.ended_at) {
        (Some(how), Some(at)) => format!("ended {how} at {}", at.format("%H:%M:%S%.3f")),
        (None, Some(at)) => format!("ended at {}", at.format("%H:%M:%S%.3f")),
        (_, None) => "with no end recorded".to_owned(),
    };
    let stale = if a.stale_result {
        ", its result kept stale"
    } else {
        ""
    };
    format!("{task} attempt {} on {} {end}{stale}", a.attempt, a.worker)
}

#[cfg(test)]
mod tests {
    use super::super::fleet::SessionRecord;
    use super::super::truth::TaskRow;
    use super::*;

    /// 10:00:00 and `ms` after it, µs since the epoch.
    fn us(ms: u64) -> u64 {
        let base = "2026-12-03T10:00:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .expect("time");
        base.timestamp_micros() as u64 + ms * 1000
    }

    fn at(ms: u64) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::from_timestamp_micros(us(ms) as i64)
    }

    /// A task that ran on `workers` in turn, each attempt but the last ended (lost) at the ms
    /// given; the last completed.
    fn task(attempts: &[(&str, u64)]) -> TaskRow {
        let runs: Vec<AttemptRow> = attempts
            .iter()
            .enumerate()
            .map(|(i, &(worker, ended))| AttemptRow {
                attempt: i as u64 + 1,
                worker: worker.into(),
                ended_at: at(ended),
                end: Some(
                    if i + 1 == attempts.len() {
                        "completed"
                    } else {
                        "lost"
                    }
                    .into(),
                ),
                result_recorded: i + 1 == attempts.len(),
                ..AttemptRow::default()
            })
            .collect();
        TaskRow {
            status: "completed".into(),
            counted: 1,
            attempts: runs.len() as u64,
            runs,
            ..TaskRow::default()
        }
    }

    /// A worker registered at 0, with spells away (lost, registered again) and stopped at
    /// `stopped` (0: live), in ms.
    fn worker(id: &str, spells: &[(u64, u64)], stopped: u64) -> WorkerRecord {
        let first = SessionRecord {
            registered_us: us(0),
            ..SessionRecord::default()
        };
        let again = spells.iter().map(|&(lost, back)| SessionRecord {
            lost_us: us(lost),
            registered_us: us(back),
            ..SessionRecord::default()
        });
        WorkerRecord {
            id: id.into(),
            sessions: std::iter::once(first).chain(again).collect(),
            stopped_us: if stopped > 0 { us(stopped) } else { 0 },
            ..WorkerRecord::default()
        }
    }

    fn judged(tasks: &[(&str, TaskRow)], workers: Vec<WorkerRecord>) -> (Report, bool) {
        let t = Truth {
            tasks: tasks
                .iter()
                .map(|(id, row)| (id.to_string(), row.clone()))
                .collect(),
            ..Truth::default()
        };
        let submitted = tasks.iter().map(|(id, _)| id.to_string()).collect();
        let rep = FleetReport {
            workers,
            at_us: us(60_000),
            ..FleetReport::default()
        };
        let judge = Judge::new(&rep, Duration::from_secs(1), SLACK);
        let mut r = Report::default();
        verdict(&mut r, &t, &submitted, &judge);
        let pass = r.verdicts.last().expect("a verdict").pass;
        (r, pass)
    }

    fn detail(r: &Report) -> &str {
        &r.verdicts.last().expect("a verdict").detail
    }

    /// With no fault injected, a task run twice fails the verdict, though every task has one
    /// counted result (which passed every verdict): its first worker was live and connected.
    #[test]
    fn a_task_run_twice_on_a_live_connected_worker_fails() {
        let tasks = [
            ("once", task(&[("w-0", 5_000)])),
            ("twice", task(&[("w-1", 3_000), ("w-2", 5_000)])),
        ];
        let workers = vec![
            worker("w-0", &[], 0),
            worker("w-1", &[], 0),
            worker("w-2", &[], 0),
        ];
        let (r, pass) = judged(&tasks, workers);
        assert!(!pass, "{}", detail(&r));
        assert!(
            detail(&r).starts_with("1 of the 1 of 2 tasks"),
            "{}",
            detail(&r)
        );
        assert!(
            detail(&r).contains("first twice attempt 1 on w-1 ended lost at 10:00:03.000"),
            "{}",
            detail(&r)
        );
        assert_eq!(r.tasks_run_again, Some(1));
        // Every task once: passes, and says so.
        let (r, pass) = judged(&tasks[..1], vec![worker("w-0", &[], 0)]);
        assert!(pass, "{}", detail(&r));
        assert_eq!(r.tasks_run_again, Some(0));
    }

    /// A stale result is a second run too, even of a task with one attempt in its record.
    #[test]
    fn a_result_kept_stale_counts_as_a_second_run() {
        let mut row = task(&[("w-1", 3_000), ("w-2", 5_000)]);
        row.runs[0].stale_result = true;
        row.stale = 1;
        let (r, pass) = judged(&[("t", row)], vec![worker("w-1", &[], 0)]);
        assert!(!pass, "{}", detail(&r));
        assert!(
            detail(&r).contains("its result kept stale"),
            "{}",
            detail(&r)
        );
    }

    /// The tasks a fault of the run could touch are let off, and no others: a worker crashed
    /// or shut down before the attempt ended, or away for --lost-after (1 s) around its end.
    #[test]
    fn only_the_attempts_of_workers_stopped_or_kept_away_are_let_off() {
        let tasks = [
            // Its worker crashed at 2 s; the attempt ended lost at 3 s.
            ("crashed", task(&[("w-1", 3_000), ("w-9", 5_000)])),
            // Its worker was away from 2 s to 4.5 s (a cut); the attempt ended at 3 s.
            ("cut", task(&[("w-2", 3_000), ("w-9", 5_000)])),
        ];
        let workers = || {
            vec![
                worker("w-1", &[], 2_000),
                worker("w-2", &[(2_000, 4_500)], 0),
                worker("w-9", &[], 0),
            ]
        };
        let (r, pass) = judged(&tasks, workers());
        assert!(pass, "{}", detail(&r));
        assert!(
            detail(&r).contains(
                "1 were of a worker the run stopped (crashed or shut down) and 1 of one away"
            ),
            "{}",
            detail(&r)
        );
        assert_eq!(r.tasks_run_again, Some(2));
        // Stopped only after the attempt ended: no excuse.
        let mut ws = workers();
        ws[0].stopped_us = us(4_000);
        assert!(!judged(&tasks, ws).1);
        // Away 300 ms (a reset and a quick reconnect), not the --lost-after it takes to lose a
        // worker: no excuse.
        let mut ws = workers();
        ws[1] = worker("w-2", &[(2_700, 3_000)], 0);
        let (r, pass) = judged(&tasks, ws);
        assert!(!pass, "{}", detail(&r));
        assert!(
            detail(&r).contains("first cut attempt 1 on w-2"),
            "{}",
            detail(&r)
        );
        // Away long enough, but back well before the attempt ended: no excuse.
        let mut ws = workers();
        ws[1] = worker("w-2", &[(0, 1_500)], 0);
        assert!(!judged(&tasks, ws).1);
        // Away since 1 s and not back as of the report: an open spell excuses it.
        let mut ws = workers();
        ws[1] = WorkerRecord {
            away_since_us: us(1_000),
            ..worker("w-2", &[], 0)
        };
        assert!(judged(&tasks, ws).1);
        // A worker the fleet has no record of: no excuse.
        assert!(!judged(&tasks, vec![worker("w-9", &[], 0)]).1);
    }

    /// Over no task at all, "each ran once" would hold vacuously.
    #[test]
    fn no_task_at_all_fails() {
        let (r, pass) = judged(&[], Vec::new());
        assert!(!pass, "{}", detail(&r));
    }
}
