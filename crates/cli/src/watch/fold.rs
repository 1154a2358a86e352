//! How `tether watch` shows checkpoints in its text output. A task that checkpoints every
//! couple of seconds made a line each time, and a watch of many such tasks drowned the changes
//! a user watches for (status, attempt, worker, result). A checkpoint alone makes no line now:
//! the task's next line names the latest one and how many came since its last line, and a
//! task whose only changes are checkpoints gets a line at most every [`PERIOD`] (so one that
//! runs for an hour still shows it moves). `--checkpoints` has a line each, as before; `--json`
//! never folds (machines read every change).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::{Seen, task_line};

/// A task whose only changes are checkpoints gets a line at most this often.
pub(super) const PERIOD: Duration = Duration::from_secs(30);

/// Each task's checkpoints since its last line, and the lines held back for them.
pub(super) struct Folds {
    /// Every checkpoint a line of its own (`--checkpoints`).
    pub(super) every: bool,
    /// [`PERIOD`]; shorter in tests.
    pub(super) period: Duration,
    tasks: HashMap<String, Fold>,
    /// The tasks with a line held back, by when it is due.
    due: BTreeSet<(Instant, String)>,
}

/// One task's checkpoints as its lines showed them.
#[derive(Default)]
struct Fold {
    /// When its last line was written.
    shown_at: Option<Instant>,
    /// The checkpoint its last line named (or the task had then).
    named: Option<String>,
    /// Checkpoints seen since its last line.
    new: u64,
    /// Its latest copy whose only change was a checkpoint, not shown yet, and when it is due.
    held: Option<(Instant, Value)>,
}

impl Folds {
    pub(super) fn new() -> Self {
        Folds {
            every: false,
            period: PERIOD,
            tasks: HashMap::new(),
            due: BTreeSet::new(),
        }
    }

    /// The line for `t`, a copy of a task whose state changed from `before` (`None`: first
    /// seen) to `seen`, at `now`; `None` when the change is a checkpoint alone and the task had
    /// a line less than a period ago: then the copy is held until [`Folds::due_lines`] or the
    /// task's next line.
    pub(super) fn line(
        &mut self,
        t: &Value,
        before: Option<&Seen>,
        seen: &Seen,
        now: Instant,
    ) -> Option<String> {
        let id = t["task_id"].as_str()?;
        let f = self.tasks.entry(id.to_owned()).or_default();
        if seen.checkpoint.is_some() && before.is_none_or(|b| b.checkpoint != seen.checkpoint) {
            f.new += 1;
        }
        let alone = before.is_some_and(|b| b.same_but_checkpoint(seen));
        let due = f.shown_at.map(|at| at + self.period);
        if alone && !self.every && due.is_some_and(|d| now < d) {
            let d = match f.held.take() {
                Some((d, _)) => d,
                None => {
                    let d = due.unwrap_or(now);
                    self.due.insert((d, id.to_owned()));
                    d
                }
            };
            f.held = Some((d, t.clone()));
            return None;
        }
        if let Some((d, _)) = f.held.take() {
            self.due.remove(&(d, id.to_owned()));
        }
        let line = shown(t, seen, f, now);
        // An ended task changes no more: nothing of it to fold.
        if seen.ended() {
            self.tasks.remove(id);
        }
        Some(line)
    }

    /// The held lines due at `now`: a task that only checkpointed since its last line, a
    /// period ago.
    pub(super) fn due_lines(&mut self, now: Instant) -> Vec<String> {
        self.take(Some(now), now)
    }

    /// Every held line, due or not, as at `now`: the watch stops, or loses its stream (the
    /// lines would wait out the gap).
    pub(super) fn held_lines(&mut self, now: Instant) -> Vec<String> {
        self.take(None, now)
    }

    /// The held lines due by `until` (all: `None`), written at `now`.
    fn take(&mut self, until: Option<Instant>, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some((d, id)) = self
            .due
            .first()
            .cloned()
            .filter(|(d, _)| until.is_none_or(|u| *d <= u))
        {
            self.due.remove(&(d, id.clone()));
            if let Some(f) = self.tasks.get_mut(&id)
                && let Some((_, t)) = f.held.take()
            {
                lines.push(shown(&t, &super::Seen::of(&t), f, now));
            }
        }
        lines
    }

    /// When the next held line is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(d, _)| *d)
    }

    /// Forgets task `id` (removed by retention; or no longer known to the watch).
    pub(super) fn forget(&mut self, id: &str) {
        if let Some(f) = self.tasks.remove(id)
            && let Some((d, _)) = f.held
        {
            self.due.remove(&(d, id.to_owned()));
        }
    }

    /// Keeps only the tasks `keep` says to (a watch of every task forgetting old ones).
    pub(super) fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self.tasks.keys().filter(|id| !keep(id)).cloned().collect();
        for id in gone {
            self.forget(&id);
        }
    }
}

/// The line for `t` as `seen`, written at `now`: it names the task's checkpoint when it is not
/// the one its last line named, with how many came since when more than one did.
fn shown(t: &Value, seen: &Seen, f: &mut Fold, now: Instant) -> String {
    let checkpoint = match &seen.checkpoint {
        Some(c) if f.named.as_ref() != Some(c) => {
            let size = &t["latest_checkpoint"]["size"];
            let mut part = format!("checkpoint {c} ({size} bytes");
            if f.new > 1 {
                part.push_str(&format!(", {} since the last line", f.new));
            }
            part.push(')');
            Some(part)
        }
        _ => None,
    };
    f.named = seen.checkpoint.clone();
    f.new = 0;
    f.shown_at = Some(now);
    task_line(t, seen, checkpoint.as_deref())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Task `a` running on w1, with checkpoint `c-{n}` of `n` bytes (none for 0).
    fn copy(status: &str, n: u64) -> Value {
        let mut t = json!({
            "task_id": "a", "status": status, "attempt": 1, "lease": {"worker": "w1"},
            "updated_at": "2026-12-01T10:31:02Z",
        });
        if n > 0 {
            t["latest_checkpoint"] = json!({"checkpoint_id": format!("c-{n}"), "size": n});
        }
        t
    }

    /// Feeds `copies` to `folds`, each `step` after the one before from `start`, as the watch
    /// does (each against the one before it); the lines written.
    fn feed(folds: &mut Folds, copies: &[Value], start: Instant, step: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        let mut before: Option<Seen> = None;
        for (i, t) in copies.iter().enumerate() {
            let now = start + step * i as u32;
            lines.extend(folds.due_lines(now));
            let seen = Seen::of(t);
            lines.extend(folds.line(t, before.as_ref(), &seen, now));
            before = Some(seen);
        }
        lines
    }

    #[test]
    fn checkpoints_alone_make_no_line_and_the_next_line_names_the_latest_and_how_many() {
        let mut folds = Folds::new();
        let mut copies = vec![copy("running", 0)];
        copies.extend((1..=5).map(|n| copy("running", n)));
        copies.push(copy("completed", 5));
        let lines = feed(
            &mut folds,
            &copies,
            Instant::now(),
            Duration::from_millis(500),
        );
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(!lines[0].contains("checkpoint"), "{lines:#?}");
        assert!(
            lines[1].contains("completed")
                && lines[1].contains("checkpoint c-5 (5 bytes, 5 since the last line)"),
            "{lines:#?}"
        );
        // Nothing held of an ended task.
        assert!(folds.tasks.is_empty() && folds.due.is_empty());
    }

    #[test]
    fn a_task_that_only_checkpoints_gets_a_line_at_most_every_period() {
        let mut folds = Folds::new();
        folds.period = Duration::from_secs(10);
        // A checkpoint every 2 s for 60 s.
        let mut copies = vec![copy("running", 0)];
        copies.extend((1..=30).map(|n| copy("running", n)));
        let start = Instant::now();
        let step = Duration::from_secs(2);
        let mut lines = feed(&mut folds, &copies, start, step);
        // 10 s after the running line, its checkpoints (1 to 4 came by then) are due; then
        // 5 a period.
        assert_eq!(lines.len(), 7, "{lines:#?}");
        assert!(
            lines[1].contains("checkpoint c-4 (4 bytes, 4 since the last line)"),
            "{lines:#?}"
        );
        assert!(
            lines[6].contains("checkpoint c-29 (29 bytes, 5 since the last line)"),
            "{lines:#?}"
        );
        // The ones after the last line are held, and due a period after it.
        let due = folds.next_due().expect("held");
        assert!(due > start + step * 30, "{due:?}");
        lines = folds.due_lines(due);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].ends_with("checkpoint c-30 (30 bytes)"),
            "{lines:#?}"
        );
        assert!(folds.next_due().is_none());
    }

    #[test]
    fn a_change_of_status_worker_or_attempt_is_a_line_at_once_and_so_is_every_checkpoint_if_asked()
    {
        let start = Instant::now();
        let step = Duration::from_millis(100);
        let mut other = copy("running", 2);
        other["lease"]["worker"] = json!("w2");
        other["attempt"] = json!(2);
        let copies = [copy("running", 0), copy("running", 1), other];
        let lines = feed(&mut Folds::new(), &copies, start, step);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[1].contains("attempt 2  on w2  checkpoint c-2 (2 bytes, 2 since"),
            "{lines:#?}"
        );
        let mut every = Folds::new();
        every.every = true;
        let copies: Vec<Value> = (0..=4).map(|n| copy("running", n)).collect();
        let lines = feed(&mut every, &copies, start, step);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        for n in 1..=4 {
            assert!(
                lines[n].ends_with(&format!("checkpoint c-{n} ({n} bytes)")),
                "{lines:#?}"
            );
        }
    }

    #[test]
    fn held_lines_are_written_when_the_watch_stops_and_a_removed_task_is_forgotten() {
        let mut folds = Folds::new();
        let copies: Vec<Value> = (0..=3).map(|n| copy("running", n)).collect();
        let now = Instant::now();
        let lines = feed(&mut folds, &copies, now, Duration::from_millis(10));
        assert_eq!(lines.len(), 1, "{lines:#?}");
        let held = folds.held_lines(now);
        assert_eq!(held.len(), 1, "{held:#?}");
        assert!(
            held[0].contains("checkpoint c-3 (3 bytes, 3 since"),
            "{held:#?}"
        );
        // Shown just now: the next checkpoint is held again, until the task is forgotten.
        let (before, next) = (copy("running", 3), copy("running", 4));
        let line = folds.line(&next, Some(&Seen::of(&before)), &Seen::of(&next), now);
        assert!(line.is_none() && folds.next_due().is_some());
        folds.forget("a");
        assert!(folds.next_due().is_none() && folds.tasks.is_empty());
    }
}
