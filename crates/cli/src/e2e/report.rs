//! The report of a run, as JSON (for machines and the test suite) and Markdown (for people):
//! configuration and seed, the plan, each disruption with its counters and times, figures per
//! kind (p50, p95, max), the blackhole detection times of both sides, per-worker connection
//! statistics, task outcomes, and the verdict.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::observe::Observation;
use super::plan::{Disruption, Kind};
use super::procs::Timings;
use super::verdict::Verdict;

/// p50, p95 and max of a set of times, ms (nearest rank).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    pub samples: usize,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Figures {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| -> Option<f64> {
            if v.is_empty() {
                return None;
            }
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v.get(i.clamp(1, v.len()) - 1).copied()
        };
        Self {
            samples: v.len(),
            p50_ms: rank(50.0),
            p95_ms: rank(95.0),
            max_ms: v.last().copied(),
        }
    }

    fn cell(&self) -> String {
        match (self.p50_ms, self.p95_ms, self.max_ms) {
            (Some(a), Some(b), Some(c)) => format!("{a:.0} / {b:.0} / {c:.0} ({})", self.samples),
            _ => "-".into(),
        }
    }
}

/// Figures of every disruption of one kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindFigures {
    pub count: usize,
    pub fired: usize,
    /// `None` for a kind with nothing to detect ([`Kind::detectable`]).
    pub detected: Option<usize>,
    pub recovered: usize,
    pub worker_detect: Figures,
    pub coordinator_detect: Figures,
    pub recover: Figures,
}

/// A worker's connection statistics: its own records and the coordinator's view.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerFigures {
    pub worker: String,
    pub process_starts: u32,
    pub sessions_registered: usize,
    pub sessions_lost: usize,
    pub sessions_declared_dead: usize,
    pub attempts_failed: usize,
    /// Rotations of its event log that failed, by its `stopped` records: no line lost, the
    /// log grew past its bound ([`super::observe::rotation_failures`]).
    pub rotation_failures: u64,
    pub acks: BTreeMap<String, usize>,
    /// The coordinator's `stats` of this worker (the worker's own telemetry) and sessions.
    pub coordinator_view: serde_json::Value,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskOutcomes {
    pub submitted: usize,
    pub expected_to_fail: usize,
    /// Fail their first attempt on purpose and run again on a failure (`retry_on`).
    pub flaky: usize,
    /// Of those failing on purpose, retried as new tasks (`retry_of`), failing again.
    pub retries: usize,
    pub by_status: BTreeMap<String, usize>,
    /// Tasks that needed more than one attempt.
    pub retried: usize,
    /// Counted results of attempts that started from a checkpoint.
    pub resumed_from_checkpoint: usize,
    /// Results kept uncounted: from attempts that had lost their lease, or failures their
    /// task runs again on.
    pub stale_results: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub workers: usize,
    pub duration_ms: u64,
    pub disruption_interval_ms: u64,
    pub seed: u64,
    pub scenario: String,
    pub kinds: Vec<Kind>,
    pub timings: Timings,
    pub work_dir: PathBuf,
    /// The work directory is a temporary one, removed when the run passes.
    pub temporary: bool,
    /// Workers in network namespaces (kernel-made faults).
    pub netns: bool,
    /// Worker authentication and integrity tags on every frame.
    pub message_mac: bool,
    /// Bit flips per byte of `corrupt`.
    pub corrupt_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: Config,
    pub wall_ms: u64,
    pub plan: Vec<Disruption>,
    pub disruptions: Vec<Observation>,
    pub by_kind: BTreeMap<Kind, KindFigures>,
    /// The silent partition: fault to the worker's liveness timeout, and to the
    /// coordinator's, over every blackhole.
    pub blackhole: BlackholeFigures,
    pub workers: Vec<WorkerFigures>,
    pub proxy: tether_faultproxy::ProxyStats,
    pub coordinator_starts: u32,
    pub tasks: TaskOutcomes,
    pub unexpected_exits: Vec<String>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlackholeFigures {
    pub worker_heartbeat_timeout: &'static str,
    pub coordinator_heartbeat_timeout: &'static str,
    pub worker_detect: Figures,
    pub coordinator_detect: Figures,
}

pub fn by_kind(obs: &[Observation]) -> BTreeMap<Kind, KindFigures> {
    let mut out = BTreeMap::new();
    for kind in Kind::every() {
        let of: Vec<&Observation> = obs.iter().filter(|o| o.kind == kind).collect();
        if of.is_empty() {
            continue;
        }
        let all =
            |f: fn(&Observation) -> Vec<f64>| of.iter().flat_map(|o| f(o)).collect::<Vec<_>>();
        out.insert(
            kind,
            KindFigures {
                count: of.len(),
                fired: of.iter().filter(|o| o.fired).count(),
                detected: kind
                    .detectable()
                    .then(|| of.iter().filter(|o| o.detected == Some(true)).count()),
                recovered: of.iter().filter(|o| o.recovered).count(),
                worker_detect: Figures::of(all(|o| o.worker_detect_ms.values().copied().collect())),
                coordinator_detect: Figures::of(all(|o| {
                    o.coordinator_detect_ms.values().copied().collect()
                })),
                recover: Figures::of(all(|o| o.recover_ms.values().copied().collect())),
            },
        );
    }
    out
}

impl Report {
    /// Writes `<prefix>.json` and `<prefix>.md`; a directory (existing, or given with a
    /// trailing `/`) gets `e2e-report.json` and `e2e-report.md` in it.
    pub fn write(&self, target: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        let is_dir = target.is_dir() || target.as_os_str().to_string_lossy().ends_with('/');
        let prefix = if is_dir {
            std::fs::create_dir_all(target)
                .with_context(|| format!("cannot create {}", target.display()))?;
            target.join("e2e-report")
        } else {
            if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            target.to_owned()
        };
        let json = prefix.with_extension("json");
        let md = prefix.with_extension("md");
        let text = serde_json::to_string_pretty(self).context("cannot encode the report")?;
        std::fs::write(&json, text).with_context(|| format!("cannot write {}", json.display()))?;
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("cannot write {}", md.display()))?;
        Ok((json, md))
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let verdict = if self.verdict.pass { "PASS" } else { "FAIL" };
        let _ = writeln!(s, "# tether e2e: {verdict}\n");
        let _ = writeln!(
            s,
            "Seed {}, scenario `{}`, {} workers, duration {} ms, disruption interval {} ms; wall time {} ms.\n",
            c.seed, c.scenario, c.workers, c.duration_ms, c.disruption_interval_ms, self.wall_ms
        );
        // What changes the faults' meaning: integrity tags turn `corrupt` into caught frames,
        // namespaces make the kernel's faults.
        let _ = writeln!(
            s,
            "Security: {}; network: {}.\n",
            match c.message_mac {
                true => format!(
                    "worker authentication and integrity tags on every frame (`--message-mac`), corrupt rate {}",
                    c.corrupt_rate
                ),
                false => format!("none, corrupt rate {}", c.corrupt_rate),
            },
            if c.netns {
                "network namespaces (`--netns`)"
            } else {
                "loopback through the fault proxy"
            }
        );
        let _ = writeln!(
            s,
            "Timings: {}\n",
            serde_json::to_string(&c.timings).unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "## Verdict\n\n| check | result | detail |\n|---|---|---|"
        );
        for ch in &self.verdict.checks {
            let r = if ch.pass { "pass" } else { "FAIL" };
            let _ = writeln!(s, "| {} | {r} | {} |", ch.name, ch.detail);
        }
        let b = &self.blackhole;
        let _ = writeln!(
            s,
            "\n## Silent partition (blackhole) detection\n\nWorker heartbeat timeout {}, coordinator heartbeat timeout {}. Fault to detection, ms, p50 / p95 / max (samples):\n\n- by the worker: {}\n- by the coordinator: {}",
            b.worker_heartbeat_timeout,
            b.coordinator_heartbeat_timeout,
            b.worker_detect.cell(),
            b.coordinator_detect.cell()
        );
        let _ = writeln!(
            s,
            "\n## Per kind\n\nTimes in ms, p50 / p95 / max (samples). Fired: the proxy's or the kernel's counters, or for a kill the process's exit status (SIGKILL), for proxy_down the links closed and the listeners refusing, for link_down the link's state. Detected: the workers' event logs, the coordinator's view and counters; n/a for a slow link, which nothing is meant to notice. Detection time: fault to the worker declaring its session lost, or to the coordinator's disconnect time. Recovery: fault removed to the registration after the worker's last loss (0 when it was back before the removal).\n\n| kind | count | fired | detected | recovered | worker detect | coordinator detect | recovery |\n|---|---|---|---|---|---|---|---|"
        );
        for (k, f) in &self.by_kind {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                k.as_str(),
                f.count,
                f.fired,
                f.detected.map_or_else(|| "n/a".into(), |n| n.to_string()),
                f.recovered,
                f.worker_detect.cell(),
                f.coordinator_detect.cell(),
                f.recover.cell()
            );
        }
        let _ = writeln!(
            s,
            "\n## Disruptions\n\n| # | kind | target | held ms | counters or evidence | fired | detected | recovered | note |\n|---|---|---|---|---|---|---|---|---|"
        );
        for o in &self.disruptions {
            let held = (o.removed_at - o.started_at).num_milliseconds();
            let counters = o
                .fault_stats
                .map(|f| {
                    format!(
                        "delayed {} B, dropped {} B, corrupted {} B, reset {}, closed {}",
                        f.bytes_delayed,
                        f.bytes_dropped,
                        f.bytes_corrupted,
                        f.connections_reset,
                        f.connections_closed
                    )
                })
                .or_else(|| {
                    o.shape_stats.map(|k| {
                        format!(
                            "kernel: sent {} B in {} packets, held back {}, dropped {}",
                            k.sent_bytes, k.sent_packets, k.overlimits, k.dropped
                        )
                    })
                })
                .or_else(|| {
                    o.evidence
                        .as_ref()
                        .map(|e| match (&o.handback, &o.outlived) {
                            (Some(h), _) => format!(
                                "{e}; {} leases handed on, {} kept for it",
                                h.handed_back,
                                h.left.len()
                            ),
                            (None, Some(t)) => format!(
                                "{e}; {} task processes, {} outlived it",
                                t.ran,
                                t.left.len()
                            ),
                            (None, None) => e.clone(),
                        })
                })
                .unwrap_or_else(|| "-".into());
            // Which end's integrity checks caught damage: what corruption is judged by, and
            // worth a word after any other disruption too.
            let counters = match o.kind == Kind::Corrupt || o.caught.total > 0 {
                true => format!("{counters}; {}", o.caught),
                false => counters,
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {held} | {counters} | {} | {} | {} | {} |",
                o.index,
                o.kind.as_str(),
                o.target.as_deref().unwrap_or("all"),
                o.fired,
                o.detected.map_or_else(|| "n/a".into(), |d| d.to_string()),
                o.recovered,
                o.note
            );
        }
        s.push_str(&workers_section(&self.workers));
        let t = &self.tasks;
        let statuses: Vec<String> = t
            .by_status
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            s,
            "\n## Tasks\n\n{} submitted ({} failing on purpose, {} of them retries of others; {} failing their first attempt on purpose and run again on a failure): {}. Retried: {}. Resumed from a checkpoint: {}. Results kept uncounted (stale, or a failure run again): {}. Coordinator starts: {}.",
            t.submitted,
            t.expected_to_fail,
            t.retries,
            t.flaky,
            statuses.join(", "),
            t.retried,
            t.resumed_from_checkpoint,
            t.stale_results,
            self.coordinator_starts
        );
        let p = &self.proxy;
        let _ = writeln!(
            s,
            "\n## Proxy\n\n{} connections accepted, {} reset, {} upstream failures; faults: {} B delayed, {} B dropped, {} B corrupted.",
            p.connections_accepted,
            p.connections_reset,
            p.upstream_failures,
            p.faults.bytes_delayed,
            p.faults.bytes_dropped,
            p.faults.bytes_corrupted
        );
        if !self.unexpected_exits.is_empty() {
            let _ = writeln!(s, "\n## Unexpected exits\n");
            for e in &self.unexpected_exits {
                let _ = writeln!(s, "- {e}");
            }
        }
        let _ = writeln!(
            s,
            "\n{}",
            where_logs_are(c.temporary, self.verdict.pass, &c.work_dir)
        );
        s
    }
}

/// The report's section of per-worker figures, from each worker's event log, with a word on
/// failed log rotations when there were any.
fn workers_section(workers: &[WorkerFigures]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Workers\n\n| worker | starts | registered | lost | declared dead | failed attempts | result acks | log rotations failed |\n|---|---|---|---|---|---|---|---|"
    );
    for w in workers {
        let acks: Vec<String> = w.acks.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            w.worker,
            w.process_starts,
            w.sessions_registered,
            w.sessions_lost,
            w.sessions_declared_dead,
            w.attempts_failed,
            acks.join(", "),
            w.rotation_failures
        );
    }
    if let Some(note) = rotation_note(workers) {
        let _ = writeln!(s, "\n{note}");
    }
    s
}

/// What a run whose workers' event logs failed to rotate says of it (`None` when none did):
/// how many, whose, and that no line was lost to them (so `event_logs_complete` does not
/// fail on them), only the logs grew past their bound.
pub fn rotation_note(workers: &[WorkerFigures]) -> Option<String> {
    let whose: Vec<String> = workers
        .iter()
        .filter(|w| w.rotation_failures > 0)
        .map(|w| format!("{} {}", w.worker, w.rotation_failures))
        .collect();
    let total: u64 = workers.iter().map(|w| w.rotation_failures).sum();
    (total > 0).then(|| {
        format!(
            "Event-log rotations failed: {total} ({}); no line was lost to them, the logs grew \
             past their bound.",
            whose.join(", ")
        )
    })
}

/// The report's last line: where the run's logs and state are, which is nowhere once a
/// passing run's temporary directory was removed (`e2e::run` keeps it when the run fails).
fn where_logs_are(temporary: bool, passed: bool, work_dir: &std::path::Path) -> String {
    if temporary && passed {
        "Logs and state: removed with the run's temporary directory, as the run passed \
         (`--work-dir DIR` keeps them)."
            .to_owned()
    } else {
        format!("Logs and state: `{}`", work_dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_work_directory_unless_a_passing_run_removed_it() {
        let dir = std::path::Path::new("/tmp/e2e-x");
        assert!(where_logs_are(true, true, dir).contains("removed"));
        // A failed run keeps its temporary directory, and a directory given is never removed.
        for (temporary, passed) in [(true, false), (false, true), (false, false)] {
            assert_eq!(
                where_logs_are(temporary, passed, dir),
                "Logs and state: `/tmp/e2e-x`"
            );
        }
    }

    /// A worker's event log whose rotations failed lost no line: it passes
    /// `event_logs_complete`, and the report counts the failures, per worker and in a note,
    /// from each process's `stopped` record.
    #[test]
    fn failed_event_log_rotations_are_counted_in_the_report_but_lose_no_line() {
        use crate::e2e::observe::{log_gaps, read_events, rotation_failures};
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("w1.events.jsonl");
        // Two processes, both stopped gracefully: the first's rotations failed twice, the
        // second's once.
        let lines = [
            r#"{"at":"2026-01-02T03:00:00Z","worker":"w1","n":1,"event":"started","boot_id":"a"}"#,
            r#"{"at":"2026-01-02T03:00:01Z","worker":"w1","n":2,"event":"registered","generation":1,"session_id":1}"#,
            r#"{"at":"2026-01-02T03:00:02Z","worker":"w1","n":3,"event":"stopped","write_failures":0,"rotation_failures":2}"#,
            r#"{"at":"2026-01-02T03:01:00Z","worker":"w1","n":1,"event":"started","boot_id":"b"}"#,
            r#"{"at":"2026-01-02T03:01:01Z","worker":"w1","n":2,"event":"stopped","write_failures":0,"rotation_failures":1}"#,
        ];
        std::fs::write(&path, lines.join("\n") + "\n").expect("log");
        let records = read_events(&path).expect("a whole log");
        let at = |t: &str| t.parse::<chrono::DateTime<chrono::Utc>>().expect("time");
        let starts = [
            (at("2026-01-02T02:59:59Z"), true),
            (at("2026-01-02T03:00:59Z"), true),
        ];
        assert_eq!(log_gaps(&records, &starts), Vec::<String>::new());
        assert_eq!(rotation_failures(&records), 3);

        let figures = |worker: &str, rotation_failures| WorkerFigures {
            worker: worker.into(),
            process_starts: 2,
            sessions_registered: 1,
            sessions_lost: 0,
            sessions_declared_dead: 0,
            attempts_failed: 0,
            rotation_failures,
            acks: BTreeMap::new(),
            coordinator_view: serde_json::Value::Null,
        };
        let workers = [figures("w1", rotation_failures(&records)), figures("w2", 0)];
        let text = workers_section(&workers);
        assert!(text.contains("| log rotations failed |"), "{text}");
        assert!(text.contains("| w1 | 2 | 1 | 0 | 0 | 0 |  | 3 |"), "{text}");
        assert!(
            text.contains("Event-log rotations failed: 3 (w1 3); no line was lost to them"),
            "{text}"
        );
        let json = serde_json::to_value(&workers[0]).expect("JSON");
        assert_eq!(json["rotation_failures"], 3);
        // None failed: no note.
        let none = [figures("w1", 0)];
        assert_eq!(rotation_note(&none), None);
        assert!(!workers_section(&none).contains("rotations failed:"));
    }

    #[test]
    fn figures_use_the_nearest_rank() {
        let f = Figures::of((1..=100).map(f64::from));
        assert_eq!(f.samples, 100);
        assert_eq!(f.p50_ms, Some(50.0));
        assert_eq!(f.p95_ms, Some(95.0));
        assert_eq!(f.max_ms, Some(100.0));
        let one = Figures::of([7.0]);
        assert_eq!(
            (one.p50_ms, one.p95_ms, one.max_ms),
            (Some(7.0), Some(7.0), Some(7.0))
        );
        assert_eq!(Figures::of([]).p50_ms, None);
    }
}
