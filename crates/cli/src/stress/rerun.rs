//! The verdict "no task ran again without a cause": a task the store holds as run more than
//! once (more than one attempt, or a result kept stale) had an attempt taken from its worker.
//! The coordinator does that to a worker that stopped (crashed, or shut down without finishing
//! it) or stayed away past `--lost-after`; to any other it took a live worker for lost, and ran
//! its tasks twice (or the worker said it could not run the attempt, `worker_fault`: its disk or
//! its limits, a fault no scenario injects). The lost and recorded-twice verdicts cannot see it:
//! the store counts the last attempt's result and keeps the first's apart, as stale.
//!
//! Each attempt that another replaced is judged against what the fleet recorded of its worker
//! ([`FleetReport`]), so that exactly the tasks a fault of the run could touch are let off: a
//! worker the run stopped (steady_load's churn, checkpoint_heavy's crash) while the attempt
//! was its (after the attempt started, before it ended), or one that went away at least
//! `--lost-after` before the attempt ended and was still away then (thundering_herd's cut
//! outlasting it, a connection reset whose reconnect took that long). In a run without such a
//! fault (message_flood, mixed_priority, and the others whenever their faults never took a
//! worker away for that long) every task must have run once.
//!
//! Reruns are counted apart from the waste a user sees: a replaced attempt whose result
//! came back completed and was kept stale is finished work thrown away
//! (`completed_results_discarded`), whatever excused the rerun.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::fleet::{FleetReport, WorkerRecord};
use super::report::Report;
use super::truth::{AttemptRow, Truth};

/// The verdict's name: what it checks. Reruns the run caused pass it; the report counts them
/// (`tasks_run_again`) and the completed results they threw away apart.
pub const VERDICT: &str =
    "no task ran again without a cause (its worker stopped by the run, or away for --lost-after)";

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

    /// Why `a` (an attempt another replaced) is let off, if it is: each excuse from the
    /// fleet's record of its worker, held to the attempt's own times in the store. Stopped:
    /// the run stopped the worker while the attempt was its (not before it started: a stop
    /// then says nothing of it). Away: the worker had been away for `--lost-after` when the
    /// attempt ended, and was still away then; a spell away that long elsewhere in the
    /// attempt's life, or one that began too late to run out by its end, is no excuse.
    fn excuse(&self, a: &AttemptRow) -> Option<Excuse> {
        let w = self.workers.get(a.worker.as_str())?;
        let us = |t: chrono::DateTime<chrono::Utc>| u64::try_from(t.timestamp_micros()).ok();
        let end = us(a.ended_at?)?;
        let slack = self.slack.as_micros() as u64;
        let started = a.started_at.and_then(us);
        if w.stopped_us > 0
            && w.stopped_us <= end + slack
            && started.is_none_or(|s| w.stopped_us + slack >= s)
        {
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
            .any(|(from, to)| end.saturating_sub(from) >= long && to + slack >= end)
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
    let discarded = again
        .iter()
        .flat_map(|(_, replaced)| replaced)
        .filter(|a| a.stale_result && a.result_outcome.as_deref() == Some("completed"))
        .count() as u64;
    r.completed_results_discarded = Some(discarded);
    let n = submitted.len();
    let lost_after = judge.lost_after.as_millis();
    let excused = match (stopped, away) {
        (0, 0) => String::new(),
        _ => format!(
            "; of the attempts replaced, {stopped} were of a worker the run stopped (crashed or shut down) and {away} of one away for --lost-after ({lost_after} ms) or longer: let off"
        ),
    };
    let thrown = match discarded {
        0 => String::new(),
        d => format!("; {d} completed results were thrown away (kept stale) by those reruns"),
    };
    let detail = match (again.len(), unexcused.first()) {
        (0, _) => format!("each of the {n} tasks ran once: one attempt, no result kept stale"),
        (k, None) => format!(
            "{k} of {n} tasks ran more than once, each with a cause: the run stopped the worker of an earlier attempt or kept it away for --lost-after{excused}{thrown}"
        ),
        (k, Some(first)) => format!(
            "{} of the {k} of {n} tasks that ran more than once lost an attempt whose worker the run neither stopped nor kept away for --lost-after ({lost_after} ms): taken from a live worker (one ended `lost` was taken for lost) and run again; first {first}{excused}{thrown}",
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

    /// A let-off needs evidence tied to the attempt itself: a stop before the attempt began,
    /// or a spell away that began too late to have run --lost-after (1 s) by the attempt's end
    /// (the coordinator could not have taken the worker for lost for it), excuses nothing.
    #[test]
    fn a_stop_before_the_attempt_or_a_spell_away_too_short_at_its_end_excuses_nothing() {
        let mut row = task(&[("w-1", 3_000), ("w-9", 5_000)]);
        row.runs[0].started_at = at(2_600);
        // Stopped at 2 s, the attempt leased to it at 2.6 s: no excuse.
        let (r, pass) = judged(
            &[("t", row.clone())],
            vec![worker("w-1", &[], 2_000), worker("w-9", &[], 0)],
        );
        assert!(!pass, "{}", detail(&r));
        // Stopped at 2.8 s, while the attempt was its: let off.
        let (r, pass) = judged(
            &[("t", row.clone())],
            vec![worker("w-1", &[], 2_800), worker("w-9", &[], 0)],
        );
        assert!(pass, "{}", detail(&r));
        // Away from 2.8 s to 10 s: a long spell, but 200 ms old when the attempt ended at 3 s.
        let (r, pass) = judged(
            &[("t", row.clone())],
            vec![worker("w-1", &[(2_800, 10_000)], 0), worker("w-9", &[], 0)],
        );
        assert!(!pass, "{}", detail(&r));
        assert!(
            detail(&r).contains("first t attempt 1 on w-1"),
            "{}",
            detail(&r)
        );
        // Away from 1.9 s: --lost-after had run by 3 s (within the slack), still away then.
        let (r, pass) = judged(
            &[("t", row)],
            vec![worker("w-1", &[(1_900, 10_000)], 0), worker("w-9", &[], 0)],
        );
        assert!(pass, "{}", detail(&r));
    }

    /// The verdict is named for what it checks, passes reruns with a cause, and the report
    /// counts the completed results those reruns threw away apart from the reruns.
    #[test]
    fn completed_results_thrown_away_by_reruns_are_counted_apart() {
        let mut thrown = task(&[("w-1", 3_000), ("w-9", 5_000)]);
        thrown.runs[0].stale_result = true;
        thrown.runs[0].result_outcome = Some("completed".into());
        thrown.stale = 1;
        let mut failed = task(&[("w-1", 3_000), ("w-9", 5_000)]);
        failed.runs[0].stale_result = true;
        failed.runs[0].result_outcome = Some("failed".into());
        failed.stale = 1;
        let plain = task(&[("w-1", 3_000), ("w-9", 5_000)]);
        let (r, pass) = judged(
            &[("thrown", thrown), ("failed", failed), ("plain", plain)],
            vec![worker("w-1", &[], 2_000), worker("w-9", &[], 0)],
        );
        assert!(pass, "{}", detail(&r));
        assert_eq!(r.verdicts.last().expect("a verdict").name, VERDICT);
        assert!(VERDICT.starts_with("no task ran again without a cause"));
        assert_eq!(r.tasks_run_again, Some(3));
        assert_eq!(r.completed_results_discarded, Some(1));
        assert!(
            detail(&r).contains("1 completed results were thrown away"),
            "{}",
            detail(&r)
        );
    }

    /// Over no task at all, "each ran once" would hold vacuously.
    #[test]
    fn no_task_at_all_fails() {
        let (r, pass) = judged(&[], Vec::new());
        assert!(!pass, "{}", detail(&r));
    }
}
