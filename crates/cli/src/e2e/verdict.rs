//! The verdict: a pure function from ground truth (what the coordinator's API says and what the
//! workers recorded themselves) to named checks. Nothing here talks to a process, so a broken
//! system can be fabricated in a unit test and must fail.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::plan::Kind;

/// What a submitted task was meant to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    Complete,
    /// Fails on purpose: must end `failed`, with its failure recorded.
    Fail,
    /// Fails its first attempt on purpose and is run again on a failure (`retry_on`): must
    /// end `completed`, by a later attempt.
    Flaky,
}

/// What the counted result of a task that completes must say, from its spec: what the
/// executor produces when nothing on the way changed a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// A `sleep` task of this many steps reports `steps` equal to it.
    Steps(u64),
    /// A command's stdout ends with this line.
    StdoutEnds(&'static str),
    /// A command's stdout holds this.
    StdoutContains(&'static str),
    /// Nothing checked.
    Any,
}

impl Body {
    /// Whether a result payload (`body.result`) is the one expected.
    pub fn holds(&self, result: &serde_json::Value) -> bool {
        match self {
            Body::Steps(n) => result["steps"].as_u64() == Some(*n),
            Body::StdoutEnds(end) => result["stdout_tail"]
                .as_str()
                .is_some_and(|s| s.trim_end().ends_with(end)),
            Body::StdoutContains(text) => result["stdout_tail"]
                .as_str()
                .is_some_and(|s| s.contains(text)),
            Body::Any => true,
        }
    }
}

/// A task as the coordinator lists it (one entry of `GET /api/v1/tasks`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskView {
    pub id: String,
    pub status: String,
    pub attempt: u32,
    /// Its attempts, oldest first.
    pub attempts: Vec<AttemptView>,
    /// The task the coordinator recorded as its retry.
    pub retried_by: Option<String>,
}

/// One attempt of a task, as the coordinator lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptView {
    pub worker: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// How it ended: an outcome, `lost`, `stopped`, `cancelled`, `superseded`.
    pub end: Option<String>,
}

/// What became of the leases a worker held when it was told to stop (`worker_stop`): the
/// attempts of `worker` open at `at` (the stop), by how they ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Handback {
    /// Ended before `until` (the worker started again, after it exited): handed back
    /// (`stopped`) or finished while the worker stopped (an outcome).
    pub handed_back: usize,
    /// Kept for the worker instead: ended `lost` (the grace period ran out), ended after the
    /// worker started again (given back to it), or never ended. As `task#attempt`.
    pub left: Vec<String>,
}

impl Handback {
    pub fn of(tasks: &[TaskView], worker: &str, at: DateTime<Utc>, until: DateTime<Utc>) -> Self {
        let mut h = Handback::default();
        for t in tasks {
            for (i, a) in t.attempts.iter().enumerate() {
                let open =
                    a.worker == worker && a.started_at <= at && a.ended_at.is_none_or(|e| e >= at);
                if !open {
                    continue;
                }
                let in_time = a.ended_at.is_some_and(|e| e <= until);
                match a.end.as_deref() {
                    Some(end) if end != "lost" && in_time => h.handed_back += 1,
                    _ => h.left.push(format!("{}#{}", t.id, i + 1)),
                }
            }
        }
        h
    }
}

/// The attempts that started while a worker was drained (`drain`): between the drain's answer
/// (`from`) and the undrain's request (`until`), on it and on the others.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Drained {
    /// Started on the drained worker: none may. As `task#attempt`.
    pub on_it: Vec<String>,
    /// Started on the other workers: the drain was put to the test only if some did.
    pub elsewhere: usize,
    /// The worker's event log says it was told it is drained (`drained`), during the hold.
    pub told: bool,
}

impl Drained {
    pub fn of(tasks: &[TaskView], worker: &str, from: DateTime<Utc>, until: DateTime<Utc>) -> Self {
        let mut d = Drained::default();
        for t in tasks {
            for (i, a) in t.attempts.iter().enumerate() {
                if a.started_at <= from || a.started_at >= until {
                    continue;
                }
                match a.worker == worker {
                    true => d.on_it.push(format!("{}#{}", t.id, i + 1)),
                    false => d.elsewhere += 1,
                }
            }
        }
        d
    }
}

/// One recorded result (`GET /api/v1/tasks/{id}/result`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultView {
    pub attempt: u32,
    pub stale: bool,
    pub outcome: String,
    /// The result's payload as the executor reported it (`body.result`).
    pub result: serde_json::Value,
}

/// A result acknowledgement a worker wrote in its event log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AckView {
    pub worker: String,
    pub task: String,
    pub attempt: Option<u32>,
    /// The result's sequence number in the worker's outbox: one result has one, kept when it
    /// is sent again (even across the worker's restarts), so it names the result when the
    /// attempt is unknown.
    pub seq: u64,
    /// `recorded`, `duplicate`, `stale` or `rejected`.
    pub disposition: String,
}

/// What was seen of one disruption.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DisruptionView {
    pub index: usize,
    pub kind: Kind,
    pub fired: bool,
    /// `None`: nothing to detect (a slow link, [`Kind::detectable`]).
    pub detected: Option<bool>,
    pub recovered: bool,
    /// Workers that lost a session between its start and the next disruption's, each with
    /// whether the loss was the liveness timeout (the link declared dead).
    pub sessions_lost: Vec<(String, bool)>,
    /// `worker_stop`: what became of the leases the stopped worker held.
    pub handback: Option<Handback>,
    /// `worker_kill`: the task processes the killed worker ran, and which outlived it.
    pub outlived: Option<Outlived>,
    /// `drain`: the attempts started while its worker was drained.
    pub drained: Option<Drained>,
}

/// `worker_kill`: the processes of the killed worker's `command` tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outlived {
    /// Running when it was killed.
    pub ran: usize,
    /// Still running when it was to start again (its planned time down, at least
    /// [`super::disrupt::TASKS_END_LIMIT`], after it was killed): its start would end them
    /// from its state directory's records, which hides nothing this way.
    pub left: Vec<u32>,
    /// The counters' commands among them that had more than that time (and a margin) still to
    /// run by their count: without a warden they would be in `left`. A kill of processes
    /// that were about to end anyway shows nothing.
    pub lasting: Vec<KilledTask>,
}

/// A counter task's command a `worker_kill` ended mid-way, with checkpoints shipped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KilledTask {
    pub task: String,
    pub attempt: u32,
    pub pid: u32,
    /// What it had counted to.
    pub count: u32,
}

/// The coordinator's SQLite file, read after the coordinator stopped: the statuses, attempts
/// and results its API gave the verdict must be what it stored, or the verdict would trust
/// the system's in-memory model over its record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredView {
    /// Each task's status and the workers of its attempts, oldest first.
    pub tasks: BTreeMap<String, (String, Vec<String>)>,
    /// Each task's stored results (counted and stale), in attempt order.
    pub results: BTreeMap<String, Vec<ResultView>>,
    /// Each task's attempts as stored, in attempt order.
    pub runs: BTreeMap<String, Vec<StoredRun>>,
    /// When the coordinator recorded each stored result, by task and attempt.
    pub recorded_at: BTreeMap<(String, u32), DateTime<Utc>>,
    /// The ends each task's spec runs it again on (`retry_on`), for the tasks that have any.
    pub retry_on: BTreeMap<String, Vec<String>>,
    /// The retry links as stored, for the tasks that have them: each task's spec's
    /// `retry_of`, and the `retried_by` recorded on it.
    pub retry_of: BTreeMap<String, String>,
    pub retried_by: BTreeMap<String, String>,
}

/// One attempt of a task as the coordinator's file holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRun {
    pub attempt: u32,
    pub worker: String,
    /// When its lease was given.
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// How it ended: an outcome, `lost`, `stopped`, ...
    pub end: Option<String>,
}

/// The results the coordinator's file holds that came after their attempt's lease had moved:
/// kept stale (the attempt's lease had ended), or of an attempt it recorded `lost` before the
/// result came (adopted when counted), with what explains each and the breaches. Beside them,
/// the results kept uncounted because their task runs again on such an end (`retry_on`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LateResults {
    /// Results kept uncounted because their task's `retry_on` names their end, each as its
    /// task and `#attempt end`: their attempt ended by them, the task then leased again (a
    /// late one, of an attempt whose lease had moved, is in `came` too, ` (late)` added).
    pub retried: Vec<(String, String)>,
    /// Results that came after their lease moved.
    pub came: usize,
    /// Of those, counted.
    pub adopted: usize,
    /// Of those, kept stale while another attempt of their task had started: `task#a (#b
    /// had started on w)`.
    pub superseded: Vec<String>,
    /// Kept stale with no later attempt of their task started when they came, or a task of a
    /// late result not counted exactly once.
    pub bad: Vec<String>,
}

impl LateResults {
    /// Judged from the store alone (`stored`): the results, their times, the attempts.
    pub fn of(stored: &StoredView) -> Self {
        let mut out = LateResults::default();
        for (task, rows) in &stored.results {
            let runs = stored.runs.get(task).map(Vec::as_slice).unwrap_or_default();
            let retries_on = |outcome: &str| {
                stored
                    .retry_on
                    .get(task)
                    .is_some_and(|on| on.iter().any(|o| o == outcome))
            };
            let mut late_here = false;
            for r in rows {
                let came = stored.recorded_at.get(&(task.clone(), r.attempt)).copied();
                let own = runs.iter().find(|a| a.attempt == r.attempt);
                // Kept uncounted while its attempt ended by it: the end ran the task again,
                // which only its `retry_on` may do, and the next attempt leased after that end
                // (the coordinator queues the task again as it records the result, so the
                // next lease may be a moment older than the result's row).
                let retryable = tether_proto::TaskStatus::is_failure_end(Some(&r.outcome));
                if r.stale
                    && let Some(own) =
                        own.filter(|a| retryable && a.end.as_deref() == Some(r.outcome.as_str()))
                {
                    let next = runs.iter().find(|a| {
                        a.attempt > r.attempt
                            && a.started_at.zip(own.ended_at).is_some_and(|(s, e)| s >= e)
                    });
                    match (retries_on(&r.outcome), next) {
                        (true, Some(_)) => out
                            .retried
                            .push((task.clone(), format!("#{} {}", r.attempt, r.outcome))),
                        (true, None) => out.bad.push(format!(
                            "{task}#{}: a {} result its task runs again on, kept uncounted, and no later attempt was leased after the end it made",
                            r.attempt, r.outcome
                        )),
                        (false, _) => out.bad.push(format!(
                            "{task}#{}: a {} result that ended its attempt kept uncounted, though its task does not run again on that end",
                            r.attempt, r.outcome
                        )),
                    }
                    continue;
                }
                // A later attempt of the task whose lease was given before the result came: where
                // its lease had moved (an earlier attempt explains nothing).
                let other = runs
                    .iter()
                    .filter(|a| a.attempt > r.attempt)
                    .find(|a| a.started_at.zip(came).is_some_and(|(s, c)| s <= c));
                let lost_first = own.is_some_and(|a| {
                    a.end.as_deref() == Some("lost")
                        && a.ended_at.zip(came).is_some_and(|(e, c)| e <= c)
                });
                let moved_first = other.is_some();
                if !(r.stale || lost_first || moved_first) {
                    continue;
                }
                late_here = true;
                out.came += 1;
                if !r.stale {
                    out.adopted += 1;
                    continue;
                }
                // Or the task was done by then: another attempt's result counted first (an
                // adopted late result supersedes the attempt that ran meanwhile).
                let counted_first = rows.iter().find(|o| {
                    !o.stale
                        && o.attempt != r.attempt
                        && came.is_some_and(|c| {
                            stored
                                .recorded_at
                                .get(&(task.clone(), o.attempt))
                                .is_some_and(|t| *t <= c)
                        })
                });
                if let (None, Some(o)) = (other, counted_first) {
                    out.superseded.push(format!(
                        "{task}#{} (#{} counted first)",
                        r.attempt, o.attempt
                    ));
                    continue;
                }
                match (other, came) {
                    (Some(o), _) => out.superseded.push(format!(
                        "{task}#{} (#{} had started on {})",
                        r.attempt, o.attempt, o.worker
                    )),
                    (None, None) => out.bad.push(format!(
                        "{task}#{}: kept stale, recorded at a time that does not read",
                        r.attempt
                    )),
                    // Not adopted as the task's end: the task runs again on that end (its
                    // lost attempt's replacement queued already).
                    (None, Some(_)) if retries_on(&r.outcome) => out
                        .retried
                        .push((task.clone(), format!("#{} {} (late)", r.attempt, r.outcome))),
                    (None, Some(c)) => {
                        let later = runs
                            .iter()
                            .filter(|a| a.attempt > r.attempt)
                            .filter_map(|a| a.started_at.map(|s| (a.attempt, s)))
                            .map(|(a, s)| {
                                format!("#{a} started {} ms later", (s - c).num_milliseconds())
                            })
                            .collect::<Vec<_>>();
                        out.bad.push(format!(
                            "{task}#{}: a {} result kept stale at {c} while no later attempt of the task had started ({}): finished work thrown away",
                            r.attempt,
                            r.outcome,
                            if later.is_empty() {
                                "none ever did".to_owned()
                            } else {
                                later.join(", ")
                            }
                        ));
                    }
                }
            }
            let counted = rows.iter().filter(|r| !r.stale).count();
            if late_here && counted != 1 {
                out.bad
                    .push(format!("{task}: {counted} counted results, one owed"));
            }
        }
        out
    }

    /// `3 results came after their lease moved: 1 adopted, 2 kept stale because another
    /// attempt had started (t#1 (#2 had started on w1), ...)`, and `; 1 kept uncounted
    /// because their task runs again on that end (t#1 failed)` when there are such.
    pub fn summary(&self) -> String {
        let named = |list: &[String]| -> String {
            if list.is_empty() {
                return String::new();
            }
            let shown: Vec<&str> = list.iter().take(NAMED).map(String::as_str).collect();
            let more = if list.len() > NAMED { ", ..." } else { "" };
            format!(" ({}{more})", shown.join(", "))
        };
        let mut said = format!(
            "{} results came after their lease moved: {} adopted, {} kept stale because another attempt had started{}",
            self.came,
            self.adopted,
            self.superseded.len(),
            named(&self.superseded)
        );
        if !self.retried.is_empty() {
            let retried: Vec<String> = self.retried.iter().map(|(t, r)| t.clone() + r).collect();
            said.push_str(&format!(
                "; {} kept uncounted because their task runs again on that end{}",
                retried.len(),
                named(&retried)
            ));
        }
        said
    }
}

/// Everything the verdict looks at.
#[derive(Debug, Clone, Default)]
pub struct GroundTruth {
    pub submitted: Vec<(String, Expect)>,
    /// What each submitted task's counted result must say when it completes.
    pub bodies: BTreeMap<String, Body>,
    pub tasks: Vec<TaskView>,
    pub results: BTreeMap<String, Vec<ResultView>>,
    pub acks: Vec<AckView>,
    pub disruptions: Vec<DisruptionView>,
    /// Kinds the scenario asked for.
    pub kinds: Vec<Kind>,
    /// Processes that exited without being told to.
    pub unexpected_exits: Vec<String>,
    /// The coordinator's database (`None`: not read, which fails `api_matches_database`).
    pub stored: Option<StoredView>,
    /// Each worker's event log, with where it shows lines lost ([`super::observe::log_gaps`]).
    pub event_logs: Vec<(String, Vec<String>)>,
    /// The retries the run submitted (`retry_of`), each as the task and its retry: of the
    /// tasks failing on purpose, once each had ended, through the disruptions that followed.
    pub retries: Vec<(String, String)>,
}

/// Whether a counted result says its attempt started from a checkpoint: a sleep's
/// `resumed_at`, the counter command's "counted from N" with N above 0.
pub fn resumed(result: &serde_json::Value) -> bool {
    if result["resumed_at"].as_u64().is_some_and(|n| n > 0) {
        return true;
    }
    result["stdout_tail"]
        .as_str()
        .and_then(|s| s.split("counted from ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n > 0)
}

/// One named check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub pass: bool,
    /// What was counted, and the first offenders when it failed.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub pass: bool,
    pub checks: Vec<Check>,
}

/// At most this many offenders are named in a check's detail.
const NAMED: usize = 5;

fn check(name: &'static str, total: usize, what: &str, bad: Vec<String>) -> Check {
    let pass = bad.is_empty();
    let detail = if pass {
        format!("{total} {what}: all hold")
    } else {
        let shown: Vec<&str> = bad.iter().take(NAMED).map(String::as_str).collect();
        format!(
            "{} of {total} {what} fail: {}{}",
            bad.len(),
            shown.join("; "),
            if bad.len() > NAMED { "; ..." } else { "" }
        )
    };
    Check { name, pass, detail }
}

const TERMINAL: [&str; 4] = ["completed", "failed", "cancelled", "timed_out"];

/// The disruptions of `kind`, and an offence for each that has `attempts` (as `task#n`) that
/// should have none: `#i kind: attempts a, b {what}`.
fn attempts_named<'a>(
    d: &'a [DisruptionView],
    kind: Kind,
    attempts: impl Fn(&DisruptionView) -> Option<&Vec<String>>,
    what: &str,
) -> (Vec<&'a DisruptionView>, Vec<String>) {
    let of_kind: Vec<&DisruptionView> = d.iter().filter(|x| x.kind == kind).collect();
    let bad = of_kind
        .iter()
        .filter_map(|x| {
            let named = attempts(x).filter(|a| !a.is_empty())?;
            Some(format!(
                "#{} {}: attempts {} {what}",
                x.index,
                kind.as_str(),
                named.join(", ")
            ))
        })
        .collect();
    (of_kind, bad)
}

/// The tasks that fail their first attempt and run again on a failure ([`Expect::Flaky`]):
/// none completed by one attempt (the first always fails, so its failure counted or a second
/// attempt skipped would show), and some run again on a failure kept uncounted (one whose
/// first attempt a disruption took first is never retried on its failure; none retried at all
/// and the check proves nothing). Whether each completed is `outcomes_as_intended`'s, and
/// whether each result kept uncounted was owed that `late_results_explained`'s.
fn flaky_tasks_retried(
    g: &GroundTruth,
    listed: &BTreeMap<&str, Vec<&TaskView>>,
    late: Option<&LateResults>,
) -> Check {
    let flaky: Vec<&str> = g
        .submitted
        .iter()
        .filter(|(_, e)| *e == Expect::Flaky)
        .map(|(id, _)| id.as_str())
        .collect();
    let mut bad = Vec::new();
    for id in &flaky {
        if let Some([t]) = listed.get(id).map(Vec::as_slice)
            && t.status == "completed"
            && t.attempts.len() < 2
        {
            bad.push(format!("{id} completed by its first attempt, which fails"));
        }
    }
    let retried = late.map_or(0, |l| {
        l.retried
            .iter()
            .filter(|(task, _)| flaky.contains(&task.as_str()))
            .count()
    });
    if !flaky.is_empty() && retried == 0 {
        bad.push("no task was run again on a failure it retries on".to_owned());
    }
    let mut c = check(
        "flaky_tasks_retried",
        flaky.len(),
        "tasks that fail their first attempt",
        bad,
    );
    if c.pass {
        c.detail = format!(
            "{} tasks that fail their first attempt: all completed by a later one, {retried} run again on a failure kept uncounted",
            flaky.len()
        );
    }
    c
}

/// A run with at least this many tasks failing on purpose (one a wave) had the time to retry
/// one: the first ended long before the third wave went in.
const RETRY_CHANCES: usize = 3;

/// Each retry the run submitted (`retry_of`) is recorded on the task it retries: in the
/// coordinator's file (that task's `retried_by`, the retry's spec's `retry_of`) and by its API,
/// whatever the disruptions did between (a coordinator killed after the retry was made keeps
/// the link, both sides in one commit). A run of [`RETRY_CHANCES`] or more failing tasks that
/// retried none proves nothing.
fn retries_recorded(g: &GroundTruth, listed: &BTreeMap<&str, Vec<&TaskView>>) -> Check {
    let mut bad = Vec::new();
    let stored = g.stored.as_ref();
    for (of, by) in &g.retries {
        match stored.and_then(|s| s.retried_by.get(of)) {
            Some(b) if b == by => {}
            other => bad.push(format!(
                "{of}: retried by {by}, but its stored retried_by is {}",
                other.map_or("none", String::as_str)
            )),
        }
        match stored.and_then(|s| s.retry_of.get(by)) {
            Some(o) if o == of => {}
            other => bad.push(format!(
                "{by}: the retry of {of}, but its stored retry_of is {}",
                other.map_or("none", String::as_str)
            )),
        }
        if let Some([t]) = listed.get(of.as_str()).map(Vec::as_slice)
            && t.retried_by.as_deref() != Some(by.as_str())
        {
            bad.push(format!(
                "{of}: retried by {by}, but the API says {}",
                t.retried_by.as_deref().unwrap_or("none")
            ));
        }
    }
    let originals = g
        .submitted
        .iter()
        .filter(|(_, e)| *e == Expect::Fail)
        .count()
        .saturating_sub(g.retries.len());
    if g.retries.is_empty() && originals >= RETRY_CHANCES {
        bad.push(format!(
            "none of the {originals} tasks failing on purpose was retried: the check proves nothing"
        ));
    }
    check(
        "retries_recorded",
        g.retries.len(),
        "retries of tasks failing on purpose",
        bad,
    )
}

pub fn verdict(g: &GroundTruth) -> Verdict {
    let mut listed: BTreeMap<&str, Vec<&TaskView>> = BTreeMap::new();
    for t in &g.tasks {
        listed.entry(t.id.as_str()).or_default().push(t);
    }
    let counted = |id: &str| -> Vec<&ResultView> {
        g.results
            .get(id)
            .map(|v| v.iter().filter(|r| !r.stale).collect())
            .unwrap_or_default()
    };
    let n = g.submitted.len();
    let mut checks = Vec::new();

    // A run that submitted nothing proves nothing: every check below would hold vacuously.
    let none = match n {
        0 => vec!["no task was submitted".to_owned()],
        _ => vec![],
    };
    checks.push(check("tasks_submitted", n, "tasks", none));

    // Every submitted task is listed once, in a terminal state.
    let mut bad = Vec::new();
    for (id, _) in &g.submitted {
        match listed.get(id.as_str()).map(Vec::as_slice) {
            None | Some([]) => bad.push(format!("{id} is unknown to the coordinator")),
            Some([t]) if TERMINAL.contains(&t.status.as_str()) => {}
            Some([t]) => bad.push(format!("{id} is {}", t.status)),
            Some(many) => bad.push(format!(
                "{id} is listed {} times ({})",
                many.len(),
                many.iter()
                    .map(|t| t.status.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    checks.push(check("every_task_terminal_once", n, "tasks", bad));

    // Outcomes as intended: the rest completed, the failing ones failed (and were not retried
    // into success).
    let mut bad = Vec::new();
    for (id, expect) in &g.submitted {
        let want = match expect {
            Expect::Complete | Expect::Flaky => "completed",
            Expect::Fail => "failed",
        };
        if let Some([t]) = listed.get(id.as_str()).map(Vec::as_slice)
            && t.status != want
        {
            bad.push(format!("{id} is {} but should be {want}", t.status));
        }
    }
    checks.push(check("outcomes_as_intended", n, "tasks", bad));

    // Results intact: the counted result of a completed task says what its executor produces,
    // so no byte changed on the way (a flipped digit that still parses fails here).
    let mut bad = Vec::new();
    for (id, body) in &g.bodies {
        for r in counted(id) {
            if r.outcome == "completed" && !body.holds(&r.result) {
                bad.push(format!("{id}: {body:?} expected, got {}", r.result));
            }
        }
    }
    checks.push(check("results_intact", g.bodies.len(), "tasks", bad));

    // No result lost: every task ended by a result has its counted result, and every result a
    // worker saw acknowledged as recorded (or as a duplicate of a recorded one) is stored.
    let mut bad = Vec::new();
    for (id, _) in &g.submitted {
        let ended_by_result = listed
            .get(id.as_str())
            .and_then(|v| v.first())
            .is_some_and(|t| t.status == "completed" || t.status == "failed");
        if ended_by_result && counted(id).is_empty() {
            bad.push(format!("{id} ended without a counted result"));
        }
    }
    let acked: Vec<&AckView> = g
        .acks
        .iter()
        .filter(|a| a.disposition == "recorded" || a.disposition == "duplicate")
        .collect();
    for a in &acked {
        let rows = g
            .results
            .get(&a.task)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let stored = rows
            .iter()
            .any(|r| a.attempt.is_none_or(|at| r.attempt == at));
        if !stored {
            bad.push(format!(
                "{} acknowledged {} attempt {} as {} but the coordinator has no such result",
                a.worker,
                a.task,
                a.attempt.map_or("?".into(), |x| x.to_string()),
                a.disposition
            ));
        }
    }
    // The other way: the worker that ran the attempt of each counted result logged its
    // acknowledgement (as recorded, or as a duplicate of a result it sent again), so that the
    // check does not rest on the coordinator agreeing with itself.
    for (id, rows) in &g.results {
        let attempts = listed
            .get(id.as_str())
            .and_then(|v| v.first())
            .map(|t| t.attempts.as_slice())
            .unwrap_or_default();
        for r in rows.iter().filter(|r| !r.stale) {
            let Some(worker) = (r.attempt as usize)
                .checked_sub(1)
                .and_then(|i| attempts.get(i))
                .map(|a| a.worker.as_str())
            else {
                bad.push(format!(
                    "{id} attempt {}: counted, but the coordinator lists no such attempt",
                    r.attempt
                ));
                continue;
            };
            let seen = acked.iter().any(|a| {
                a.worker == worker && a.task == *id && a.attempt.is_none_or(|at| at == r.attempt)
            });
            if !seen {
                bad.push(format!(
                    "{id} attempt {}: counted, but {worker} never logged its acknowledgement",
                    r.attempt
                ));
            }
        }
    }
    checks.push(check(
        "no_result_lost",
        n + acked.len(),
        "tasks and acknowledged results",
        bad,
    ));

    // No result recorded twice: at most one counted result per task, and one `recorded` ack
    // per result over every worker.
    let mut bad = Vec::new();
    for (id, rows) in &g.results {
        let c = rows.iter().filter(|r| !r.stale).count();
        if c > 1 {
            bad.push(format!("{id} has {c} counted results"));
        }
        // The results table's key is (task, attempt) and the API reads that table, so this
        // cannot fail while the schema holds; it is kept only against the API's reading of it
        // repeating a row. The acks below are the independent side.
        let attempts: BTreeSet<u32> = rows.iter().map(|r| r.attempt).collect();
        if attempts.len() < rows.len() {
            bad.push(format!("{id} has two results for one attempt"));
        }
    }
    // A result sent again keeps its sequence number, and an ack of it after the first often
    // names no attempt (the worker no longer held the result to look it up): counted per
    // attempt, a second `recorded` for a resent result would be one (task, attempt) and one
    // (task, ?), each seen once. Counted per (worker, seq), it is the same result twice.
    let mut by_seq: BTreeMap<(&str, u64), (&str, usize)> = BTreeMap::new();
    // One attempt sent under two sequence numbers and recorded for both is also twice.
    let mut by_attempt: BTreeMap<(&str, u32), usize> = BTreeMap::new();
    for a in g.acks.iter().filter(|a| a.disposition == "recorded") {
        by_seq
            .entry((a.worker.as_str(), a.seq))
            .or_insert((a.task.as_str(), 0))
            .1 += 1;
        if let Some(at) = a.attempt {
            *by_attempt.entry((a.task.as_str(), at)).or_default() += 1;
        }
    }
    for ((worker, seq), (task, k)) in &by_seq {
        if *k > 1 {
            bad.push(format!(
                "{task}: the result {worker} sent as seq {seq} acknowledged as recorded {k} times"
            ));
        }
    }
    for ((task, attempt), k) in &by_attempt {
        if *k > 1 {
            bad.push(format!(
                "{task} attempt {attempt} acknowledged as recorded {k} times"
            ));
        }
    }
    checks.push(check(
        "no_result_recorded_twice",
        g.results.len(),
        "tasks",
        bad,
    ));

    checks.push(check(
        "api_matches_database",
        n,
        "tasks",
        database_disagreements(g, &listed),
    ));

    // The acks above come from the workers' logs: a log that lost lines would pass them on
    // what it no longer says.
    let bad = g
        .event_logs
        .iter()
        .flat_map(|(worker, gaps)| gaps.iter().map(move |x| format!("{worker}: {x}")))
        .collect();
    checks.push(check(
        "event_logs_complete",
        g.event_logs.len(),
        "workers' event logs",
        bad,
    ));

    let d = &g.disruptions;
    let named = |f: fn(&DisruptionView) -> bool, what: &str| -> Vec<String> {
        d.iter()
            .filter(|x| !f(x))
            .map(|x| format!("#{} {} {what}", x.index, x.kind.as_str()))
            .collect()
    };
    checks.push(check(
        "every_disruption_fired",
        d.len(),
        "disruptions",
        named(|x| x.fired, "did not fire"),
    ));
    checks.push(check(
        "every_disruption_detected",
        d.iter().filter(|x| x.detected.is_some()).count(),
        "disruptions that end sessions or damage frames (slow links and drains have nothing to detect)",
        named(|x| x.detected != Some(false), "was not detected"),
    ));
    checks.push(check(
        "every_disruption_recovered",
        d.len(),
        "disruptions",
        named(|x| x.recovered, "was not recovered from"),
    ));
    // The slow links every session must live through ([`Kind::rides_through`]): a session
    // lost in the window of one fails, whether declared dead or closed. Being back afterwards
    // (`recovered`) does not make up for it.
    let ridden: Vec<&DisruptionView> = d.iter().filter(|x| x.kind.rides_through()).collect();
    let bad = ridden
        .iter()
        .flat_map(|x| {
            x.sessions_lost.iter().map(move |(worker, dead)| {
                format!(
                    "#{} {}: {worker} lost its session ({})",
                    x.index,
                    x.kind.as_str(),
                    if *dead { "declared dead" } else { "closed" }
                )
            })
        })
        .collect();
    checks.push(check(
        "slow_links_ridden_through",
        ridden.len(),
        "disruptions every session must live through (latency, bandwidth, slicer, drain)",
        bad,
    ));
    // A drained worker takes no new task while others do (a wave goes in while it is
    // drained); what it held runs on.
    let (drains, mut bad) = attempts_named(
        d,
        Kind::Drain,
        |x| Some(&x.drained.as_ref()?.on_it),
        "started on the drained worker",
    );
    bad.extend(drains.iter().filter_map(|x| {
        let told = x.drained.as_ref()?.told;
        (!told).then(|| {
            format!(
                "#{} drain: the worker was not told (no `drained` record in its event log during the hold)",
                x.index
            )
        })
    }));
    // Drains while nothing started anywhere would pass without showing anything.
    let elsewhere: usize = drains
        .iter()
        .filter_map(|x| x.drained.as_ref())
        .map(|d| d.elsewhere)
        .sum();
    if !drains.is_empty() && elsewhere == 0 {
        bad.push(format!(
            "no task started on another worker during the {} drains: nothing was put to the test",
            drains.len()
        ));
    }
    checks.push(check(
        "drained_workers_took_nothing",
        drains.len(),
        &format!("drains ({elsewhere} attempts started on the other workers meanwhile)"),
        bad,
    ));
    // A worker stopped gracefully says `worker_stopped` once every result is acknowledged:
    // the coordinator hands its leases on at once (`stopped`), not after the grace period.
    let (stops, mut bad) = attempts_named(
        d,
        Kind::WorkerStop,
        |x| Some(&x.handback.as_ref()?.left),
        "kept for the stopped worker, not handed on",
    );
    // Stops of workers that held nothing would pass without showing anything.
    let held = |x: &&DisruptionView| {
        x.handback
            .as_ref()
            .is_some_and(|h| h.handed_back + h.left.len() > 0)
    };
    if !stops.is_empty() && !stops.iter().any(held) {
        bad.push(format!(
            "none of the {} worker stops hit a worker holding a lease: nothing was handed back",
            stops.len()
        ));
    }
    checks.push(check(
        "stopped_workers_handed_back_their_leases",
        stops.len(),
        "graceful worker stops",
        bad,
    ));
    // A killed worker cannot end its tasks' processes; its warden does, before any worker
    // starts again.
    let kills: Vec<&DisruptionView> = d.iter().filter(|x| x.kind == Kind::WorkerKill).collect();
    let mut bad: Vec<String> = kills
        .iter()
        .filter_map(|x| {
            let o = x.outlived.as_ref()?;
            (!o.left.is_empty()).then(|| {
                format!(
                    "#{} worker_kill: {} of its {} task processes still ran (pids {})",
                    x.index,
                    o.left.len(),
                    o.ran,
                    o.left
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .collect();
    // Kills of workers that ran no task process, or only ones about to end on their own,
    // would pass without testing the warden.
    let lasted = |x: &&DisruptionView| x.outlived.as_ref().is_some_and(|o| !o.lasting.is_empty());
    if !kills.is_empty() && !kills.iter().any(lasted) {
        bad.push(format!(
            "none of the {} worker kills hit a task process with time left to outlive its worker: the sweep of what it left was not exercised",
            kills.len()
        ));
    }
    checks.push(check(
        "no_task_process_outlived_its_worker",
        kills.len(),
        "worker kills",
        bad,
    ));
    // A kill in the middle of a counter (checkpoints shipped) loses its attempt; the task's
    // counted result must come from a later attempt that resumed from a checkpoint. Judged by
    // the killed tasks themselves: a resume elsewhere in the run (after a graceful stop, a
    // cut) says nothing of them.
    let killed: Vec<&KilledTask> = kills
        .iter()
        .filter_map(|x| x.outlived.as_ref())
        .flat_map(|o| &o.lasting)
        .collect();
    let mut bad = Vec::new();
    for k in &killed {
        let rows = counted(&k.task);
        match rows.as_slice() {
            [r] if r.attempt > k.attempt && resumed(&r.result) => {}
            [r] => bad.push(format!(
                "{} (attempt {} killed at count {}): its counted result, attempt {}, did not resume from a checkpoint",
                k.task, k.attempt, k.count, r.attempt
            )),
            _ => bad.push(format!(
                "{} (attempt {} killed at count {}): {} counted results",
                k.task,
                k.attempt,
                k.count,
                rows.len()
            )),
        }
    }
    checks.push(check(
        "killed_work_resumed_from_checkpoints",
        killed.len(),
        "tasks killed mid-way with checkpoints shipped",
        bad,
    ));
    // What came back after its lease moved (a `lease_loss`, or any cut long enough): counted
    // once, and thrown away only when another attempt had started by then. Judged on the
    // coordinator's file: its result rows, their times, its attempt records.
    let late = g.stored.as_ref().map(LateResults::of);
    checks.push(match late.clone() {
        None => Check {
            name: "late_results_explained",
            pass: false,
            detail: "the coordinator's database was not read".to_owned(),
        },
        Some(l) if l.bad.is_empty() => Check {
            name: "late_results_explained",
            pass: true,
            detail: l.summary(),
        },
        Some(l) => {
            let shown: Vec<&str> = l.bad.iter().take(NAMED).map(String::as_str).collect();
            Check {
                name: "late_results_explained",
                pass: false,
                detail: format!(
                    "{}; {} fail: {}{}",
                    l.summary(),
                    l.bad.len(),
                    shown.join("; "),
                    if l.bad.len() > NAMED { "; ..." } else { "" }
                ),
            }
        }
    });

    checks.push(flaky_tasks_retried(g, &listed, late.as_ref()));
    checks.push(retries_recorded(g, &listed));

    let ran: BTreeSet<Kind> = d.iter().map(|x| x.kind).collect();
    let missing: Vec<String> = g
        .kinds
        .iter()
        .filter(|k| !ran.contains(k))
        .map(|k| format!("{} never ran", k.as_str()))
        .collect();
    // Held to the proxy's own list of fault kinds too: one the scenario did not ask for is
    // named, so that a kind never scheduled cannot pass unseen; with every kind asked for
    // (`all`), one of them that did not run fails above.
    let unasked: Vec<&str> = tether_faultproxy::fault::KIND_NAMES
        .into_iter()
        .filter(|name| !g.kinds.iter().any(|k| k.as_str() == *name))
        .collect();
    let mut kinds_check = check("every_kind_ran", g.kinds.len(), "kinds", missing);
    if !unasked.is_empty() {
        kinds_check.detail.push_str(&format!(
            "; proxy fault kinds the scenario left out: {}",
            unasked.join(", ")
        ));
    }
    checks.push(kinds_check);

    checks.push(check(
        "no_unexpected_exit",
        g.unexpected_exits.len(),
        "unexpected exits",
        g.unexpected_exits.clone(),
    ));

    Verdict {
        pass: checks.iter().all(|c| c.pass),
        checks,
    }
}

/// Where the coordinator's database differs from what its API said of the submitted tasks
/// (the views the other checks judged): status, attempts' workers, result rows.
fn database_disagreements(g: &GroundTruth, listed: &BTreeMap<&str, Vec<&TaskView>>) -> Vec<String> {
    let Some(stored) = &g.stored else {
        return vec!["the coordinator's database was not read".to_owned()];
    };
    let mut bad = Vec::new();
    for (id, _) in &g.submitted {
        let api = listed.get(id.as_str()).and_then(|v| v.first());
        match (api, stored.tasks.get(id)) {
            (None, None) => {}
            (Some(t), None) => bad.push(format!(
                "{id}: {} by the API, absent from the database",
                t.status
            )),
            (None, Some((status, _))) => bad.push(format!(
                "{id}: {status} in the database, unknown to the API"
            )),
            (Some(t), Some((status, workers))) => {
                if t.status != *status {
                    bad.push(format!(
                        "{id}: {} by the API, {status} in the database",
                        t.status
                    ));
                }
                let api_workers: Vec<&str> = t.attempts.iter().map(|a| a.worker.as_str()).collect();
                if api_workers != *workers {
                    bad.push(format!(
                        "{id}: attempts on [{}] by the API, on [{}] in the database",
                        api_workers.join(", "),
                        workers.join(", ")
                    ));
                }
            }
        }
        let by_attempt = |rows: Option<&Vec<ResultView>>| {
            let mut v = rows.cloned().unwrap_or_default();
            v.sort_by_key(|r| r.attempt);
            v
        };
        let (api, db) = (
            by_attempt(g.results.get(id)),
            by_attempt(stored.results.get(id)),
        );
        if api == db {
            continue;
        }
        let said = |rows: &[ResultView]| {
            let v: Vec<String> = rows
                .iter()
                .map(|r| {
                    let kind = if r.stale { "stale" } else { "counted" };
                    format!("#{} {kind} {}", r.attempt, r.outcome)
                })
                .collect();
            format!("[{}]", v.join(", "))
        };
        let (a, d) = (said(&api), said(&db));
        if a != d {
            bad.push(format!("{id}: results {a} by the API, {d} in the database"));
        } else if let Some((x, y)) = api.iter().zip(&db).find(|(x, y)| x.result != y.result) {
            bad.push(format!(
                "{id} attempt {}: result {} by the API, {} in the database",
                x.attempt, x.result, y.result
            ));
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Disruption `index` of `kind`: fired, detected, recovered, with nothing else to say.
    fn fired(index: usize, kind: Kind) -> DisruptionView {
        DisruptionView {
            index,
            kind,
            fired: true,
            detected: Some(true),
            recovered: true,
            sessions_lost: vec![],
            handback: None,
            outlived: None,
            drained: None,
        }
    }

    fn task(id: &str, status: &str) -> TaskView {
        TaskView {
            id: id.into(),
            status: status.into(),
            attempt: 1,
            attempts: vec![],
            retried_by: None,
        }
    }

    /// An attempt run by `worker` (its times and end do not matter to the checks that use it).
    fn ran(worker: &str) -> AttemptView {
        AttemptView {
            worker: worker.into(),
            started_at: DateTime::<Utc>::default(),
            ended_at: None,
            end: None,
        }
    }

    fn result(attempt: u32, stale: bool, outcome: &str) -> ResultView {
        ResultView {
            attempt,
            stale,
            outcome: outcome.into(),
            result: serde_json::json!({"steps": 4}),
        }
    }

    /// `worker`'s ack of its result `seq`, the result of attempt `attempt` of task `t`.
    fn ack(worker: &str, t: &str, attempt: u32, seq: u64, disposition: &str) -> AckView {
        AckView {
            worker: worker.into(),
            task: t.into(),
            attempt: Some(attempt),
            seq,
            disposition: disposition.into(),
        }
    }

    /// Two tasks, one failing on purpose; a reset that was detected and recovered from; a
    /// result acknowledged, resent after a reconnect and acknowledged again as a duplicate.
    fn healthy() -> GroundTruth {
        GroundTruth {
            submitted: vec![("a".into(), Expect::Complete), ("b".into(), Expect::Fail)],
            bodies: [
                ("a".to_owned(), Body::Steps(4)),
                ("b".to_owned(), Body::Any),
            ]
            .into(),
            tasks: vec![
                TaskView {
                    attempt: 2,
                    attempts: vec![ran("w2"), ran("w1")],
                    ..task("a", "completed")
                },
                TaskView {
                    attempts: vec![ran("w2")],
                    ..task("b", "failed")
                },
            ],
            results: BTreeMap::from([
                (
                    "a".into(),
                    vec![result(2, false, "completed"), result(1, true, "completed")],
                ),
                ("b".into(), vec![result(1, false, "failed")]),
            ]),
            acks: vec![
                ack("w1", "a", 2, 5, "recorded"),
                ack("w1", "a", 2, 5, "duplicate"),
                ack("w2", "a", 1, 3, "stale"),
                ack("w2", "b", 1, 4, "recorded"),
            ],
            disruptions: vec![DisruptionView {
                sessions_lost: vec![("w1".into(), false)],
                ..fired(0, Kind::Reset)
            }],
            kinds: vec![Kind::Reset],
            unexpected_exits: vec![],
            stored: None,
            event_logs: vec![("w1".into(), vec![]), ("w2".into(), vec![])],
            retries: vec![],
        }
    }

    /// What the database of `g` holds when it agrees with its API view.
    fn stored_as_listed(g: &GroundTruth) -> StoredView {
        StoredView {
            tasks: g
                .tasks
                .iter()
                .map(|t| {
                    let workers = t.attempts.iter().map(|a| a.worker.clone()).collect();
                    (t.id.clone(), (t.status.clone(), workers))
                })
                .collect(),
            results: g.results.clone(),
            runs: g
                .tasks
                .iter()
                .map(|t| {
                    let runs = t
                        .attempts
                        .iter()
                        .zip(1..)
                        .map(|(a, attempt)| StoredRun {
                            attempt,
                            worker: a.worker.clone(),
                            started_at: Some(a.started_at),
                            ended_at: a.ended_at,
                            end: a.end.clone(),
                        })
                        .collect();
                    (t.id.clone(), runs)
                })
                .collect(),
            // Every result came a second after the attempts started (at the epoch).
            recorded_at: g
                .results
                .iter()
                .flat_map(|(t, rows)| {
                    rows.iter()
                        .map(move |r| ((t.clone(), r.attempt), at(1_000)))
                })
                .collect(),
            retry_on: BTreeMap::new(),
            retry_of: g
                .retries
                .iter()
                .map(|(of, by)| (by.clone(), of.clone()))
                .collect(),
            retried_by: g
                .tasks
                .iter()
                .filter_map(|t| Some((t.id.clone(), t.retried_by.clone()?)))
                .collect(),
        }
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::milliseconds(ms)
    }

    /// The verdict of `g`; a fixture whose database the test did not set has one that agrees
    /// with its API view, so each test changes only what it is about.
    fn judged(g: &GroundTruth) -> Verdict {
        let mut g = g.clone();
        if g.stored.is_none() {
            g.stored = Some(stored_as_listed(&g));
        }
        verdict(&g)
    }

    fn failing(g: &GroundTruth) -> Vec<&'static str> {
        judged(g)
            .checks
            .into_iter()
            .filter(|c| !c.pass)
            .map(|c| c.name)
            .collect()
    }

    /// What check `name` says of `g`.
    fn detail(g: &GroundTruth, name: &str) -> String {
        judged(g)
            .checks
            .into_iter()
            .find(|c| c.name == name)
            .map(|c| c.detail)
            .unwrap_or_default()
    }

    /// Asserts that `name` is the only check `g` fails and that its detail says `text`.
    fn fails_only_saying(g: &GroundTruth, name: &str, text: &str) {
        assert_eq!(failing(g), [name]);
        let said = detail(g, name);
        assert!(said.contains(text), "{said}");
    }

    #[test]
    fn a_healthy_run_passes_every_check() {
        let v = judged(&healthy());
        assert!(v.pass, "{v:?}");
        assert_eq!(v.checks.len(), 21);
    }

    /// A task whose first attempt's lease was lost at 5 s: attempt 2 is leased at `second`
    /// ms, and attempt 1's completed result comes at 10 s, `stale` or counted; attempt 2 ends
    /// with a counted result of its own when `stale`.
    /// Task `a` of `g` stores `row` too, recorded at `ms`.
    fn another_result(g: &mut GroundTruth, row: ResultView, ms: i64) {
        let stored = g.stored.as_mut().expect("stored");
        stored.recorded_at.insert(("a".into(), row.attempt), at(ms));
        stored.results.get_mut("a").expect("a").push(row);
    }

    fn came_late(second: Option<i64>, stale: bool) -> GroundTruth {
        let mut g = healthy();
        let mut stored = stored_as_listed(&g);
        let mut runs = vec![StoredRun {
            attempt: 1,
            worker: "w2".into(),
            started_at: Some(at(0)),
            ended_at: Some(at(5_000)),
            end: Some("lost".into()),
        }];
        if let Some(ms) = second {
            runs.push(StoredRun {
                attempt: 2,
                worker: "w1".into(),
                started_at: Some(at(ms)),
                ended_at: Some(at(ms + 1_000)),
                end: Some("completed".into()),
            });
        }
        stored.runs.insert("a".into(), runs);
        let mut rows = vec![result(1, stale, "completed")];
        if stale && second.is_some() {
            rows.push(result(2, false, "completed"));
        }
        stored.results.insert("a".into(), rows.clone());
        for r in &rows {
            stored
                .recorded_at
                .insert(("a".into(), r.attempt), at(10_000 + i64::from(r.attempt)));
        }
        g.results.insert("a".into(), rows);
        g.stored = Some(stored);
        g
    }

    #[test]
    fn late_results_adopted_or_kept_stale_behind_a_started_attempt_pass_with_their_numbers() {
        // Kept stale: attempt 2 had started (at 7 s) when attempt 1's result came (10 s).
        let g = came_late(Some(7_000), true);
        let l = LateResults::of(g.stored.as_ref().expect("stored"));
        assert_eq!((l.came, l.adopted, l.bad.len()), (1, 0, 0), "{l:?}");
        assert!(!failing(&g).contains(&"late_results_explained"), "{l:?}");
        assert_eq!(
            detail(&g, "late_results_explained"),
            "1 results came after their lease moved: 0 adopted, 1 kept stale because another attempt had started (a#1 (#2 had started on w1))"
        );
        // Adopted: counted though its lease was lost first, no other attempt.
        let g = came_late(None, false);
        assert_eq!(
            detail(&g, "late_results_explained"),
            "1 results came after their lease moved: 1 adopted, 0 kept stale because another attempt had started"
        );
        assert!(!failing(&g).contains(&"late_results_explained"));
        // The attempt that ran meanwhile, superseded by that adoption, reports after it: kept
        // stale, explained by the result counted first (seen in a run).
        let mut g = came_late(Some(7_000), false);
        another_result(&mut g, result(2, true, "cancelled"), 10_500);
        let said = detail(&g, "late_results_explained");
        assert!(said.contains("a#2 (#1 counted first)"), "{said}");
        assert!(!failing(&g).contains(&"late_results_explained"), "{said}");
    }

    /// Finding 1 of review h5: the worker came back with a finished result after its lease
    /// was lost, nothing else had started the task, and the result was thrown away while the
    /// task ran again (attempt 2 leased after the result came).
    #[test]
    fn a_finished_result_kept_stale_while_no_other_attempt_had_started_fails() {
        let g = came_late(Some(12_000), true);
        let said = detail(&g, "late_results_explained");
        assert!(failing(&g).contains(&"late_results_explained"), "{said}");
        assert!(
            said.contains("a#1: a completed result kept stale"),
            "{said}"
        );
        assert!(said.contains("#2 started 1999 ms later"), "{said}");
        // No other attempt at all.
        let g = came_late(None, true);
        let said = detail(&g, "late_results_explained");
        assert!(said.contains("none ever did"), "{said}");
        assert!(failing(&g).contains(&"late_results_explained"));
    }

    /// Task `a` of `healthy()` made flaky: its first attempt (on w2, from 0 s) ended `failed`
    /// at 1 s by its own result, kept uncounted; attempt 2 (on w1) leased at `second` ms
    /// completed; `retry_on` as given.
    fn retried_once(second: i64, retry_on: &[&str]) -> GroundTruth {
        let mut g = healthy();
        g.submitted[0].1 = Expect::Flaky;
        g.results.insert(
            "a".into(),
            vec![result(1, true, "failed"), result(2, false, "completed")],
        );
        let mut stored = stored_as_listed(&g);
        stored.runs.insert(
            "a".into(),
            vec![
                StoredRun {
                    attempt: 1,
                    worker: "w2".into(),
                    started_at: Some(at(0)),
                    ended_at: Some(at(1_000)),
                    end: Some("failed".into()),
                },
                StoredRun {
                    attempt: 2,
                    worker: "w1".into(),
                    started_at: Some(at(second)),
                    ended_at: Some(at(second + 1_000)),
                    end: Some("completed".into()),
                },
            ],
        );
        stored
            .recorded_at
            .insert(("a".into(), 2), at(second + 1_000));
        if !retry_on.is_empty() {
            stored.retry_on.insert(
                "a".into(),
                retry_on.iter().map(|s| (*s).to_owned()).collect(),
            );
        }
        g.stored = Some(stored);
        g
    }

    /// A failure the task runs again on, kept uncounted with the attempt it ended, and the
    /// next attempt leased after it: explained, and the flaky task counted as retried.
    #[test]
    fn a_failure_kept_uncounted_and_run_again_as_the_task_asks_passes() {
        let g = retried_once(1_200, &["failed"]);
        let v = judged(&g);
        assert!(v.pass, "{v:?}");
        let said = detail(&g, "late_results_explained");
        assert!(
            said.ends_with(
                "; 1 kept uncounted because their task runs again on that end (a#1 failed)"
            ),
            "{said}"
        );
        assert_eq!(
            detail(&g, "flaky_tasks_retried"),
            "1 tasks that fail their first attempt: all completed by a later one, 1 run again on a failure kept uncounted"
        );
    }

    /// The same result on a task that does not run again on failures: the coordinator threw
    /// away the end of a task that asked for no retry.
    #[test]
    fn a_failure_kept_uncounted_on_a_task_without_retry_on_fails() {
        let mut g = retried_once(1_200, &[]);
        g.submitted[0].1 = Expect::Complete;
        fails_only_saying(
            &g,
            "late_results_explained",
            "a#1: a failed result that ended its attempt kept uncounted, though its task does not run again on that end",
        );
        // Retries on timeouts only.
        let mut g = retried_once(1_200, &["timed_out"]);
        g.submitted[0].1 = Expect::Complete;
        fails_only_saying(
            &g,
            "late_results_explained",
            "does not run again on that end",
        );
    }

    /// Kept uncounted as one the task runs again on, but the next attempt had been leased
    /// before it came: the failure did not run the task again.
    #[test]
    fn a_retried_failure_with_no_attempt_leased_after_it_fails() {
        let mut g = retried_once(500, &["failed"]);
        g.submitted[0].1 = Expect::Complete;
        fails_only_saying(
            &g,
            "late_results_explained",
            "a#1: a failed result its task runs again on, kept uncounted, and no later attempt was leased after the end it made",
        );
    }

    /// A late failure of a task that runs again on failures (its attempt's lease lost first,
    /// no other attempt started yet) is kept uncounted, not adopted as the task's end.
    #[test]
    fn a_late_failure_of_a_task_that_retries_on_failures_kept_stale_passes() {
        let mut g = came_late(Some(12_000), true);
        let stored = g.stored.as_mut().expect("stored");
        stored.results.get_mut("a").expect("a")[0].outcome = "failed".into();
        stored.retry_on.insert("a".into(), vec!["failed".into()]);
        g.results.get_mut("a").expect("a")[0].outcome = "failed".into();
        let v = judged(&g);
        assert!(v.pass, "{v:?}");
        let said = detail(&g, "late_results_explained");
        assert!(said.contains("(a#1 failed (late))"), "{said}");
        // Not so for a task that does not: finished work thrown away.
        g.stored.as_mut().expect("stored").retry_on.clear();
        fails_only_saying(&g, "late_results_explained", "a failed result kept stale");
    }

    /// Flaky tasks none of which was run again on a failure prove nothing; one that
    /// completed by its first attempt (which fails) was never what it seemed.
    #[test]
    fn flaky_tasks_none_retried_or_one_completed_at_once_fail() {
        let mut g = healthy();
        g.submitted[0].1 = Expect::Flaky;
        fails_only_saying(
            &g,
            "flaky_tasks_retried",
            "no task was run again on a failure it retries on",
        );
        // Its one attempt completed, counted and acknowledged.
        g.tasks[0].attempts.truncate(1);
        g.results
            .insert("a".into(), vec![result(1, false, "completed")]);
        g.acks.retain(|a| a.worker == "w2");
        g.acks[0].disposition = "recorded".into();
        fails_only_saying(
            &g,
            "flaky_tasks_retried",
            "a completed by its first attempt, which fails",
        );
    }

    /// `healthy()` with task `b` (failing on purpose) retried by `c`, which failed too: the
    /// link recorded on both sides and said by the API.
    fn with_retry() -> GroundTruth {
        let mut g = healthy();
        g.submitted.push(("c".into(), Expect::Fail));
        g.bodies.insert("c".into(), Body::Any);
        g.tasks[1].retried_by = Some("c".into());
        g.tasks.push(TaskView {
            attempts: vec![ran("w1")],
            ..task("c", "failed")
        });
        g.results
            .insert("c".into(), vec![result(1, false, "failed")]);
        g.acks.push(ack("w1", "c", 1, 9, "recorded"));
        g.retries.push(("b".into(), "c".into()));
        g
    }

    /// A retry recorded on both sides passes; one whose link the store lost, or the API does
    /// not say, fails; and a run with failing tasks enough that retried none proves nothing.
    #[test]
    fn a_retry_must_be_recorded_in_the_store_and_by_the_api() {
        let g = with_retry();
        let v = judged(&g);
        assert!(v.pass, "{v:?}");
        assert_eq!(
            detail(&g, "retries_recorded"),
            "1 retries of tasks failing on purpose: all hold"
        );
        let mut lost = g.clone();
        let mut stored = stored_as_listed(&lost);
        stored.retried_by.clear();
        lost.stored = Some(stored);
        fails_only_saying(
            &lost,
            "retries_recorded",
            "b: retried by c, but its stored retried_by is none",
        );
        let mut lost = g.clone();
        let mut stored = stored_as_listed(&lost);
        stored.retry_of.clear();
        lost.stored = Some(stored);
        fails_only_saying(
            &lost,
            "retries_recorded",
            "c: the retry of b, but its stored retry_of is none",
        );
        let mut unsaid = g.clone();
        unsaid.stored = Some(stored_as_listed(&unsaid));
        unsaid.tasks[1].retried_by = None;
        fails_only_saying(
            &unsaid,
            "retries_recorded",
            "b: retried by c, but the API says none",
        );

        let mut none = healthy();
        for id in ["d", "e"] {
            none.submitted.push((id.into(), Expect::Fail));
            none.tasks.push(TaskView {
                attempts: vec![ran("w1")],
                ..task(id, "failed")
            });
            none.results
                .insert(id.into(), vec![result(1, false, "failed")]);
        }
        none.acks.push(ack("w1", "d", 1, 10, "recorded"));
        none.acks.push(ack("w1", "e", 1, 11, "recorded"));
        fails_only_saying(
            &none,
            "retries_recorded",
            "none of the 3 tasks failing on purpose was retried",
        );
    }

    /// A stale result is explained only by a later attempt: one before it, started first,
    /// says nothing of where its lease went (the first run named those).
    #[test]
    fn a_stale_result_with_only_an_earlier_attempt_started_fails() {
        let mut g = came_late(Some(7_000), true);
        let stored = g.stored.as_mut().expect("stored");
        let rows = stored.results.get_mut("a").expect("a");
        rows[0].stale = false;
        rows[1].stale = true;
        // (#1 counted only after #2's came: nothing had ended the task when #2's was kept.)
        stored.recorded_at.insert(("a".into(), 1), at(10_500));
        let said = detail(&g, "late_results_explained");
        assert!(
            said.contains("a#2: a completed result kept stale"),
            "{said}"
        );
        assert!(said.contains("none ever did"), "{said}");
    }

    /// A late result adopted while another attempt's result was counted too: counted twice.
    #[test]
    fn a_late_result_counted_beside_another_fails() {
        let mut g = came_late(Some(7_000), false);
        another_result(&mut g, result(2, false, "completed"), 11_000);
        let said = detail(&g, "late_results_explained");
        assert!(said.contains("a: 2 counted results, one owed"), "{said}");
    }

    /// The proxy's kinds the scenario did not ask for are named; with every kind asked for,
    /// one not run fails.
    #[test]
    fn every_kind_ran_names_the_proxy_s_fault_kinds_left_out() {
        let g = healthy();
        let said = detail(&g, "every_kind_ran");
        assert!(
            said.contains("left out: latency, bandwidth, blackhole, limit_data"),
            "{said}"
        );
        assert!(said.contains("slow_close"), "{said}");
        // Every kind asked for, every one ran but slow_close.
        let mut g = healthy();
        g.kinds = Kind::ALL.to_vec();
        g.disruptions = Kind::ALL
            .into_iter()
            .filter(|k| *k != Kind::SlowClose)
            .enumerate()
            .map(|(i, k)| fired(i, k))
            .collect();
        let said = detail(&g, "every_kind_ran");
        assert!(!said.contains("left out"), "{said}");
        assert!(
            said.starts_with("1 of 15 kinds fail: slow_close never ran"),
            "{said}"
        );
        assert!(failing(&g).contains(&"every_kind_ran"));
        g.disruptions.push(fired(13, Kind::SlowClose));
        assert!(!failing(&g).contains(&"every_kind_ran"));
    }

    #[test]
    fn a_worker_s_event_log_that_lost_lines_fails_event_logs_complete() {
        let mut g = healthy();
        g.event_logs = vec![
            ("w1".into(), vec![]),
            (
                "w2".into(),
                vec!["the process started at X lost records 3 to 4".into()],
            ),
        ];
        fails_only_saying(
            &g,
            "event_logs_complete",
            "w2: the process started at X lost records 3 to 4",
        );
    }

    /// The API's view (the coordinator's memory) is what the other checks judge; the database
    /// file must hold the same, and a verdict that disagrees with it, or never read it, fails.
    #[test]
    fn an_api_view_the_database_disagrees_with_fails_api_matches_database() {
        let g = healthy();
        let db = stored_as_listed(&g);
        let with = |db: StoredView| GroundTruth {
            stored: Some(db),
            ..g.clone()
        };
        assert!(failing(&with(db.clone())).is_empty());
        // A status only the coordinator's memory had.
        let mut other = db.clone();
        other.tasks.get_mut("a").expect("a").0 = "running".into();
        fails_only_saying(
            &with(other),
            "api_matches_database",
            "a: completed by the API, running in the database",
        );
        // A counted result the database holds as stale, and one it does not hold at all.
        let mut other = db.clone();
        other.results.get_mut("a").expect("a")[0].stale = true;
        // (The database's own account then leaves a task with a late result uncounted too.)
        assert_eq!(
            failing(&with(other.clone())),
            ["api_matches_database", "late_results_explained"]
        );
        let said = detail(&with(other.clone()), "api_matches_database");
        assert!(
            said.contains("a: results [#1 stale completed, #2 counted completed] by the API, [#1 stale completed, #2 stale completed] in the database"),
            "{said}"
        );
        let said = detail(&with(other), "late_results_explained");
        assert!(said.contains("a: 0 counted results, one owed"), "{said}");
        let mut other = db.clone();
        other.results.remove("b");
        assert_eq!(failing(&with(other)), ["api_matches_database"]);
        // A payload that differs, an attempt on another worker, a task absent.
        let mut other = db.clone();
        other.results.get_mut("a").expect("a")[0].result = serde_json::json!({"steps": 5});
        let said = detail(&with(other.clone()), "api_matches_database");
        assert!(said.contains("a attempt 2: result"), "{said}");
        let mut other = db.clone();
        other.tasks.get_mut("b").expect("b").1 = vec!["w1".into()];
        assert_eq!(failing(&with(other)), ["api_matches_database"]);
        let mut other = db.clone();
        other.tasks.remove("b");
        assert_eq!(failing(&with(other)), ["api_matches_database"]);
        // Not read at all.
        let v = verdict(&g);
        let c = v.checks.iter().find(|c| c.name == "api_matches_database");
        assert!(!v.pass && c.is_some_and(|c| !c.pass), "{v:?}");
    }

    #[test]
    fn a_run_that_submitted_nothing_fails() {
        let g = GroundTruth {
            submitted: vec![],
            bodies: BTreeMap::new(),
            tasks: vec![],
            results: BTreeMap::new(),
            acks: vec![],
            disruptions: vec![],
            kinds: vec![],
            unexpected_exits: vec![],
            stored: None,
            event_logs: vec![("w1".into(), vec![]), ("w2".into(), vec![])],
            retries: vec![],
        };
        assert_eq!(failing(&g), ["tasks_submitted"]);
        assert!(!judged(&g).pass);
    }

    #[test]
    fn a_result_acknowledged_as_recorded_but_missing_fails_no_result_lost() {
        let mut g = healthy();
        g.results.remove("b");
        assert_eq!(failing(&g), ["no_result_lost"]);
        let mut g = healthy();
        g.acks.push(ack("w3", "a", 3, 1, "recorded"));
        assert_eq!(failing(&g), ["no_result_lost"]);
    }

    /// A counted result whose worker never logged its acknowledgement fails: the check would
    /// otherwise rest on the coordinator alone. A repeated ack that names no attempt (the
    /// worker held the result no more) counts.
    #[test]
    fn a_counted_result_its_worker_never_saw_acknowledged_fails_no_result_lost() {
        let mut g = healthy();
        g.acks.retain(|a| a.task != "b");
        fails_only_saying(
            &g,
            "no_result_lost",
            "b attempt 1: counted, but w2 never logged its acknowledgement",
        );
        g.acks.push(AckView {
            attempt: None,
            ..ack("w2", "b", 1, 4, "duplicate")
        });
        assert!(failing(&g).is_empty());
        // Acknowledged to another worker than the attempt's: not the same thing.
        let mut g = healthy();
        g.acks.retain(|a| a.task != "b");
        g.acks.push(ack("w1", "b", 1, 6, "recorded"));
        assert_eq!(failing(&g), ["no_result_lost"]);
    }

    #[test]
    fn a_result_counted_twice_fails_no_result_recorded_twice() {
        let mut g = healthy();
        g.tasks[0].attempts.push(ran("w1"));
        g.acks.push(ack("w1", "a", 3, 7, "recorded"));
        g.results
            .get_mut("a")
            .expect("a")
            .push(result(3, false, "completed"));
        // Its first result came late (kept stale): the late results' check counts it too.
        assert_eq!(
            failing(&g),
            ["no_result_recorded_twice", "late_results_explained"]
        );
    }

    /// The realistic double record: the worker resends a result the coordinator had already
    /// answered `recorded` (the first ack was lost with its session), no longer holds it when
    /// the second ack comes, and so logs that ack with no attempt. A `duplicate` answer to the
    /// same resend is what should happen, and passes.
    #[test]
    fn a_resent_result_acknowledged_as_recorded_again_fails_no_result_recorded_twice() {
        let mut g = healthy();
        g.acks.push(AckView {
            attempt: None,
            ..ack("w2", "b", 1, 4, "recorded")
        });
        fails_only_saying(
            &g,
            "no_result_recorded_twice",
            "b: the result w2 sent as seq 4 acknowledged as recorded 2 times",
        );
        let mut g = healthy();
        g.acks.push(AckView {
            attempt: None,
            ..ack("w2", "b", 1, 4, "duplicate")
        });
        assert!(failing(&g).is_empty());
        // One attempt recorded under two sequence numbers is twice too.
        let mut g = healthy();
        g.acks.push(ack("w2", "b", 1, 9, "recorded"));
        assert_eq!(failing(&g), ["no_result_recorded_twice"]);
    }

    #[test]
    fn a_task_in_two_states_or_not_finished_fails_terminal_once() {
        let mut g = healthy();
        g.tasks.push(task("a", "running"));
        assert!(failing(&g).contains(&"every_task_terminal_once"));
        let mut g = healthy();
        g.tasks[0].status = "running".into();
        let f = failing(&g);
        assert!(f.contains(&"every_task_terminal_once"), "{f:?}");
        assert!(f.contains(&"outcomes_as_intended"), "{f:?}");
        let mut g = healthy();
        g.tasks.remove(1);
        assert!(failing(&g).contains(&"every_task_terminal_once"));
    }

    #[test]
    fn a_task_failing_that_should_complete_fails_outcomes() {
        let mut g = healthy();
        g.tasks[0].status = "failed".into();
        assert_eq!(failing(&g), ["outcomes_as_intended"]);
    }

    #[test]
    fn a_counted_result_that_differs_from_what_its_executor_produces_fails_results_intact() {
        let mut g = healthy();
        // One digit changed on the way, and it still parses.
        let r = &mut g.results.get_mut("a").expect("a")[0];
        r.result = serde_json::json!({"steps": 5});
        assert_eq!(failing(&g), ["results_intact"]);
        // A stale result is not checked; a command's output is.
        let mut g = healthy();
        g.results.get_mut("a").expect("a")[1].result = serde_json::json!({"steps": 5});
        assert!(failing(&g).is_empty(), "{:?}", failing(&g));
        assert!(
            Body::StdoutEnds("to 12")
                .holds(&serde_json::json!({"stdout_tail": "counted from 4 to 12\n"}))
        );
        assert!(
            !Body::StdoutEnds("to 12")
                .holds(&serde_json::json!({"stdout_tail": "counted from 4 to 13\n"}))
        );
    }

    #[test]
    fn an_undetected_or_unrecovered_disruption_or_a_kind_never_run_fails() {
        let mut g = healthy();
        g.disruptions[0].detected = Some(false);
        assert_eq!(failing(&g), ["every_disruption_detected"]);
        // A slow link has nothing to detect; it still has to fire and be recovered from.
        let mut g = healthy();
        g.disruptions[0].kind = Kind::Latency;
        g.kinds = vec![Kind::Latency];
        g.disruptions[0].detected = None;
        g.disruptions[0].sessions_lost.clear();
        assert!(failing(&g).is_empty());
        g.disruptions[0].fired = false;
        assert_eq!(failing(&g), ["every_disruption_fired"]);
        let mut g = healthy();
        g.disruptions[0].recovered = false;
        g.disruptions[0].fired = false;
        assert_eq!(
            failing(&g),
            ["every_disruption_fired", "every_disruption_recovered"]
        );
        let mut g = healthy();
        g.kinds.push(Kind::CoordinatorKill);
        assert_eq!(failing(&g), ["every_kind_ran"]);
    }

    /// A gracefully stopped worker's leases: an attempt open at the stop that ended `lost`,
    /// ended only after the worker started again (its lease kept for it), or never ended, was
    /// not handed on and fails; one `stopped`, or finished during the stop, was handed back;
    /// attempts of other workers, or closed before the stop, are not its leases.
    #[test]
    fn a_stopped_worker_s_lease_left_to_the_grace_period_fails() {
        let t = |secs: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + secs, 0).expect("time");
        let attempt = |worker: &str, from: i64, to: Option<i64>, end: Option<&str>| AttemptView {
            worker: worker.into(),
            started_at: t(from),
            ended_at: to.map(t),
            end: end.map(str::to_owned),
        };
        let tasks = vec![
            TaskView {
                attempts: vec![
                    attempt("w1", 0, Some(10), Some("stopped")),
                    attempt("w2", 10, Some(20), Some("completed")),
                ],
                ..task("a", "completed")
            },
            TaskView {
                attempts: vec![attempt("w1", 2, Some(12), Some("lost"))],
                ..task("b", "completed")
            },
            TaskView {
                attempts: vec![attempt("w1", 3, Some(9), Some("completed"))],
                ..task("c", "completed")
            },
            TaskView {
                attempts: vec![attempt("w1", 4, Some(30), Some("completed"))],
                ..task("e", "completed")
            },
            TaskView {
                attempts: vec![
                    attempt("w1", 0, Some(4), Some("failed")),
                    attempt("w1", 6, Some(9), Some("completed")),
                    attempt("w2", 1, None, None),
                ],
                ..task("d", "running")
            },
        ];
        let h = Handback::of(&tasks, "w1", t(5), t(20));
        assert_eq!(h.handed_back, 2, "{h:?}");
        assert_eq!(h.left, ["b#1", "e#1"]);
        let stop = |handback: Handback| {
            let mut g = healthy();
            g.kinds = vec![Kind::WorkerStop];
            g.disruptions = vec![DisruptionView {
                handback: Some(handback),
                ..fired(3, Kind::WorkerStop)
            }];
            g
        };
        let bad = stop(h);
        fails_only_saying(
            &bad,
            "stopped_workers_handed_back_their_leases",
            "#3 worker_stop: attempts b#1, e#1 kept",
        );
        assert!(failing(&stop(Handback::of(&tasks, "w1", t(1), t(20)))).is_empty());
        // A stop of a worker that held nothing shows nothing: the check fails.
        let idle = stop(Handback::default());
        fails_only_saying(
            &idle,
            "stopped_workers_handed_back_their_leases",
            "none of the 1 worker stops hit a worker holding a lease",
        );
    }

    /// A drained worker: an attempt that started on it between the drain's answer and the
    /// undrain fails; one before or after, or on another worker, does not; drains while
    /// nothing started elsewhere show nothing and fail; so does a worker not told.
    #[test]
    fn an_attempt_started_on_a_drained_worker_fails_and_drains_that_saw_nothing_start_fail() {
        let t = |secs: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + secs, 0).expect("time");
        let started = |worker: &str, at: i64| AttemptView {
            worker: worker.into(),
            started_at: t(at),
            ended_at: Some(t(at + 1)),
            end: Some("completed".into()),
        };
        let tasks = vec![
            TaskView {
                attempts: vec![started("w1", 4), started("w1", 6), started("w2", 7)],
                ..task("a", "completed")
            },
            TaskView {
                attempts: vec![started("w2", 6), started("w1", 20)],
                ..task("b", "completed")
            },
        ];
        let told = |d: Drained| Drained { told: true, ..d };
        let d = told(Drained::of(&tasks, "w1", t(5), t(20)));
        assert_eq!(d.on_it, ["a#2"], "{d:?}");
        assert_eq!(d.elsewhere, 2, "{d:?}");
        let drain = |drained: Drained| {
            let mut g = healthy();
            g.kinds = vec![Kind::Drain];
            g.disruptions = vec![DisruptionView {
                drained: Some(drained),
                detected: None,
                ..fired(4, Kind::Drain)
            }];
            g
        };
        fails_only_saying(
            &drain(d),
            "drained_workers_took_nothing",
            "#4 drain: attempts a#2 started on the drained worker",
        );
        let kept = told(Drained::of(&tasks, "w1", t(6), t(20)));
        assert!(kept.on_it.is_empty(), "{kept:?}");
        assert!(failing(&drain(kept.clone())).is_empty());
        fails_only_saying(
            &drain(told(Drained::default())),
            "drained_workers_took_nothing",
            "no task started on another worker during the 1 drains",
        );
        // A worker its heartbeat replies did not tell.
        fails_only_saying(
            &drain(Drained {
                told: false,
                ..kept
            }),
            "drained_workers_took_nothing",
            "#4 drain: the worker was not told",
        );
    }

    /// The counter of task `task`, attempt `attempt`, killed at count 4.
    fn counting(task: &str, attempt: u32) -> KilledTask {
        KilledTask {
            task: task.into(),
            attempt,
            pid: 40,
            count: 4,
        }
    }

    /// A run with one `worker_kill` (#2) whose worker's task processes were `outlived`, and
    /// whose counted result of task `a` resumed at step `resumed_at` (0: from the start).
    fn killed(outlived: Outlived, resumed_at: u64) -> GroundTruth {
        let mut g = healthy();
        g.results.get_mut("a").expect("a")[0].result =
            serde_json::json!({"steps": 4, "resumed_at": resumed_at});
        g.kinds = vec![Kind::WorkerKill];
        g.disruptions = vec![DisruptionView {
            outlived: Some(outlived),
            ..fired(2, Kind::WorkerKill)
        }];
        g
    }

    /// A killed worker's task processes that still ran when it was to start again fail the
    /// run; ended ones, or none, do not.
    #[test]
    fn a_task_process_that_outlived_its_killed_worker_fails() {
        // What the kill's attempt left resumed elsewhere (the next check's concern).
        let kill = |outlived: Outlived| killed(outlived, 2);
        let bad = kill(Outlived {
            ran: 3,
            left: vec![41, 42],
            lasting: vec![counting("a", 1)],
        });
        fails_only_saying(
            &bad,
            "no_task_process_outlived_its_worker",
            "#2 worker_kill: 2 of its 3 task processes still ran (pids 41, 42)",
        );
        let ended = Outlived {
            ran: 3,
            left: vec![],
            lasting: vec![counting("a", 1)],
        };
        assert!(failing(&kill(ended)).is_empty());
        // Processes that all ended in time, but none of which had time left to run past it
        // (a counter nearly done, its children): they would have ended without a warden too.
        let nearly_done = kill(Outlived {
            ran: 3,
            left: vec![],
            lasting: vec![],
        });
        fails_only_saying(
            &nearly_done,
            "no_task_process_outlived_its_worker",
            "none of the 1 worker kills hit a task process with time left",
        );
        // A kill of a worker that ran no task process tests nothing: the check fails.
        let idle = kill(Outlived::default());
        fails_only_saying(
            &idle,
            "no_task_process_outlived_its_worker",
            "none of the 1 worker kills hit a task process with time left",
        );
    }

    /// A kill that hit a counter mid-way: that task's counted result must resume from a
    /// checkpoint. Another task resumed (after a graceful stop) does not make up for it; a
    /// kill of an idle worker asks nothing here.
    #[test]
    fn a_killed_task_not_resumed_fails_though_another_task_resumed() {
        let kill = |lasting: Vec<KilledTask>, resumed_at: u64| {
            killed(
                Outlived {
                    ran: 2,
                    left: vec![],
                    lasting,
                },
                resumed_at,
            )
        };
        assert!(failing(&kill(vec![counting("a", 1)], 3)).is_empty());
        let none = kill(vec![counting("a", 1)], 0);
        assert_eq!(failing(&none), ["killed_work_resumed_from_checkpoints"]);
        let said = detail(&none, "killed_work_resumed_from_checkpoints");
        assert!(
            said.contains(
                "a (attempt 1 killed at count 4): its counted result, attempt 2, did not resume"
            ),
            "{said}"
        );
        // Task b was killed (its attempt 1 is the counted one: nothing resumed); task a resumed
        // after a worker_stop, which says nothing of b.
        let mut other = kill(vec![counting("a", 1), counting("b", 1)], 3);
        other.bodies.insert("b".into(), Body::Any);
        assert_eq!(failing(&other), ["killed_work_resumed_from_checkpoints"]);
        let said = detail(&other, "killed_work_resumed_from_checkpoints");
        assert!(said.contains("1 of 2 tasks killed"), "{said}");
        assert!(
            said.starts_with("1 of 2") && said.contains("b (attempt 1"),
            "{said}"
        );
        other.disruptions[0].outlived = Some(Outlived {
            ran: 2,
            left: vec![],
            lasting: vec![counting("b", 1)],
        });
        other.disruptions.push(DisruptionView {
            handback: Some(Handback {
                handed_back: 1,
                left: vec![],
            }),
            ..fired(3, Kind::WorkerStop)
        });
        other.kinds.push(Kind::WorkerStop);
        assert_eq!(failing(&other), ["killed_work_resumed_from_checkpoints"]);
        // Nothing killed mid-way: nothing asked.
        assert!(
            !failing(&kill(vec![], 0)).contains(&"killed_work_resumed_from_checkpoints"),
            "an idle worker's kill"
        );
    }

    /// Latency every session must live through: a worker whose link was declared dead in its
    /// window fails the run though it came back, and so does a closed session; the same loss
    /// under a stall (which can end a live session by design) does not.
    #[test]
    fn a_session_lost_under_a_slow_link_that_must_be_ridden_through_fails() {
        let slow = |kind: Kind, lost: Vec<(String, bool)>| {
            let mut g = healthy();
            g.kinds = vec![kind];
            g.disruptions = vec![DisruptionView {
                detected: None,
                sessions_lost: lost,
                ..fired(0, kind)
            }];
            g
        };
        assert!(failing(&slow(Kind::Latency, vec![])).is_empty());
        let dead = slow(Kind::Latency, vec![("w2".into(), true)]);
        assert_eq!(failing(&dead), ["slow_links_ridden_through"]);
        let detail = detail(&dead, "slow_links_ridden_through");
        assert!(
            detail.contains("#0 latency: w2 lost its session (declared dead)"),
            "{detail}"
        );
        for kind in [Kind::Bandwidth, Kind::Slicer] {
            let closed = slow(kind, vec![("w1".into(), false)]);
            assert_eq!(failing(&closed), ["slow_links_ridden_through"], "{kind:?}");
        }
        for kind in [Kind::Stall, Kind::LinkCrawl, Kind::Corrupt, Kind::Reset] {
            let g = slow(kind, vec![("w2".into(), true)]);
            assert!(
                !failing(&g).contains(&"slow_links_ridden_through"),
                "{kind:?}"
            );
        }
    }
}
