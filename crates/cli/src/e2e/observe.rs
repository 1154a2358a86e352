//! What the run sees: the coordinator's view of each worker, polled all along (its own
//! `disconnected_at` timestamps), and the workers' event logs, read after the fact. From both,
//! each disruption gets its detection and recovery times.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tether_worker::eventlog::{Event, Record};
use tokio_util::sync::CancellationToken;

use super::plan::Kind;
use super::procs::Api;
use super::verdict::DisruptionView;

/// How often the coordinator's worker list is polled.
pub const POLL: Duration = Duration::from_millis(100);

/// A change of a worker's state as the coordinator reported it.
#[derive(Debug, Clone, Serialize)]
pub struct CoordSample {
    pub worker: String,
    pub state: String,
    /// When the run saw the change.
    pub seen_at: DateTime<Utc>,
    /// The coordinator's own time of the disconnect, when it reports one.
    pub disconnected_at: Option<DateTime<Utc>>,
}

/// Polls `GET /api/v1/workers` until cancelled and keeps every state change.
#[derive(Clone, Default)]
pub struct Watcher {
    pub samples: Arc<Mutex<Vec<CoordSample>>>,
}

impl Watcher {
    pub async fn run(self, api: Api, stop: CancellationToken) {
        // A new disconnect shows as a new `disconnected_at` even when no poll saw the worker
        // connected in between.
        let mut last: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
        loop {
            if let Ok(v) = api.get("/api/v1/workers").await {
                let seen_at = Utc::now();
                for w in v.as_array().into_iter().flatten() {
                    let (Some(id), Some(state)) = (w["worker_id"].as_str(), w["state"].as_str())
                    else {
                        continue;
                    };
                    let raw_at = w["disconnected_at"].as_str().map(str::to_owned);
                    let now = (state.to_owned(), raw_at.clone());
                    if last.get(id) != Some(&now) {
                        last.insert(id.to_owned(), now);
                        let disconnected_at = raw_at.and_then(|s| s.parse::<DateTime<Utc>>().ok());
                        self.lock().push(CoordSample {
                            worker: id.to_owned(),
                            state: state.to_owned(),
                            seen_at,
                            disconnected_at,
                        });
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<CoordSample>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Vec<CoordSample> {
        self.lock().clone()
    }

    /// When the coordinator first saw `worker` not connected at or after `since`.
    pub fn detected(&self, worker: &str, since: DateTime<Utc>) -> Option<DateTime<Utc>> {
        coordinator_detection(&self.lock(), worker, since)
    }
}

fn coordinator_detection(
    samples: &[CoordSample],
    worker: &str,
    since: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    samples
        .iter()
        .filter(|s| s.worker == worker && s.state != "connected" && s.seen_at >= since)
        .map(|s| {
            s.disconnected_at
                .filter(|d| *d >= since)
                .unwrap_or(s.seen_at)
        })
        .next()
}

/// A worker's event log as it is now, to wait on a condition: the records that parse, none
/// while there is no log to read (a worker that has not opened it yet). Never ground truth:
/// see [`read_events`].
pub fn events_now(path: &Path) -> Vec<Record> {
    tether_worker::eventlog::read_all(path)
        .map(|r| r.records)
        .unwrap_or_default()
}

/// A worker's event log, read as ground truth (its acknowledgements are inputs of
/// `no_result_lost` and `no_result_recorded_twice`): a log that cannot be read is an error,
/// and so is a line that does not parse, except a last line without its newline (torn: the
/// process was killed while writing it, and nothing was written after it). A log that was
/// rotated is read with the file it was rotated to (`FILE.1`, then `FILE`).
pub fn read_events(path: &Path) -> anyhow::Result<Vec<Record>> {
    let read = tether_worker::eventlog::read_all(path)
        .with_context(|| format!("cannot read the event log {}", path.display()))?;
    whole(read).with_context(|| format!("the event log {} is damaged", path.display()))
}

/// The records of a log with no damage (a torn last line is no damage).
fn whole(read: tether_worker::eventlog::Read) -> anyhow::Result<Vec<Record>> {
    match read.damaged.first() {
        Some(n) => anyhow::bail!("line {n} does not parse"),
        None => Ok(read.records),
    }
}

/// Where a worker's event log shows lines lost (ground truth with holes in it would pass
/// `no_result_lost` on acks it never kept). `starts`: when each of the worker's processes was
/// started (the run waited for the one before to end), with whether it then stopped
/// gracefully (exit 0 after SIGTERM). A process's records are those from its start to the
/// next; their numbers must run from 1 without a gap, a `stopped` record must be the last and
/// say no write failed, and a process that stopped gracefully must have written it. Records
/// without a number (a worker older than the numbers) are not judged. A process whose first
/// record kept is a `rotated` one numbers from it: the records before it went with a file its
/// log rotated away, not lost.
pub fn log_gaps(records: &[Record], starts: &[(DateTime<Utc>, bool)]) -> Vec<String> {
    let mut bad = Vec::new();
    let stamp = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let before = records
        .iter()
        .filter(|r| r.n.is_some() && starts.first().is_some_and(|(s, _)| r.at < *s))
        .count();
    if before > 0 {
        bad.push(format!("{before} records from before its first start"));
    }
    for (i, (from, graceful)) in starts.iter().enumerate() {
        let until = starts.get(i + 1).map(|(t, _)| *t);
        let own: Vec<(u64, &Record)> = records
            .iter()
            .filter(|r| r.at >= *from && until.is_none_or(|u| r.at < u))
            .filter_map(|r| Some((r.n?, r)))
            .collect();
        let process = format!("the process started at {}", stamp(*from));
        let mut expect = match own.first() {
            Some((n, r)) if matches!(r.event, Event::Rotated { .. }) => *n,
            _ => 1,
        };
        for (j, (n, r)) in own.iter().enumerate() {
            if *n != expect {
                bad.push(match n.checked_sub(1).filter(|last| *last >= expect) {
                    Some(last) => format!("{process} lost records {expect} to {last}"),
                    None => format!("{process} numbered record {n} after {}", expect - 1),
                });
            }
            expect = n + 1;
            if let Event::Stopped { write_failures, .. } = r.event {
                if write_failures > 0 {
                    bad.push(format!("{process} failed {write_failures} writes"));
                }
                if j + 1 < own.len() {
                    bad.push(format!("{process} logged after its stopped record"));
                }
            }
        }
        let stopped = own
            .last()
            .is_some_and(|(_, r)| matches!(r.event, Event::Stopped { .. }));
        if *graceful && !stopped {
            bad.push(match own.last() {
                None => format!("{process} stopped gracefully but logged nothing"),
                Some((n, _)) => format!(
                    "{process} stopped gracefully but its log ends at record {n}, without its stopped record"
                ),
            });
        }
    }
    bad
}

/// Rotations of a worker's event log that failed, as its processes' `stopped` records count
/// them (a killed process's are not known). No line is lost to one, so they fail nothing
/// ([`log_gaps`] passes them): the log grew past its bound, which the report says.
pub fn rotation_failures(records: &[Record]) -> u64 {
    records
        .iter()
        .map(|r| match r.event {
            Event::Stopped {
                rotation_failures, ..
            } => rotation_failures,
            _ => 0,
        })
        .sum()
}

/// Whether the worker's latest session event says it is registered.
pub fn registered_now(events: &[Record]) -> bool {
    events
        .iter()
        .rev()
        .find_map(|r| match r.event {
            Event::Registered { .. } => Some(true),
            Event::SessionLost { .. } | Event::Started { .. } | Event::Stopped { .. } => {
                Some(false)
            }
            _ => None,
        })
        .unwrap_or(false)
}

/// Whether the worker lost a session at or after `since`.
pub fn lost_since(events: &[Record], since: DateTime<Utc>) -> bool {
    events
        .iter()
        .any(|r| r.at >= since && matches!(r.event, Event::SessionLost { .. }))
}

/// Where each disruption's window ends (what [`Observation::analyse`] is given): at the next
/// one's start, and the last one's at `over_at` (the drain's end) but no sooner than
/// [`super::plan::past_liveness`] after its removal. Ended when the last wave was in, it was
/// judged over a few milliseconds, and a session lost just after the last slow link went (a
/// liveness timer that ran through the removal) was charged to nothing.
pub fn window_ends(
    starts_removals: &[(DateTime<Utc>, DateTime<Utc>)],
    over_at: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    let settle = chrono::Duration::from_std(super::plan::past_liveness()).unwrap_or_default();
    starts_removals
        .iter()
        .enumerate()
        .map(|(i, (_, removed))| match starts_removals.get(i + 1) {
            Some((next, _)) => *next,
            None => over_at.max(*removed + settle),
        })
        .collect()
}

fn ms(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

/// What one disruption did, with its measured times.
#[derive(Debug, Clone, Serialize)]
pub struct Observation {
    pub index: usize,
    pub kind: Kind,
    pub target: Option<String>,
    /// Workers whose sessions the disruption had to end.
    pub affected: Vec<String>,
    pub started_at: DateTime<Utc>,
    /// When the fault was removed (or the killed process restarted, or the proxy back up).
    pub removed_at: DateTime<Utc>,
    /// The proxy's counters of the fault, for proxy faults.
    pub fault_stats: Option<tether_faultproxy::FaultStats>,
    /// The kernel filter's counters, for `link_crawl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape_stats: Option<super::netns::ShapeStats>,
    /// Whether it took effect: the proxy's or the kernel's counters show it did something,
    /// or (for kinds without counters) the `evidence` shows it.
    pub fired: bool,
    /// For kinds without counters, what shows they took effect: the killed process's exit
    /// status, the proxies' links and listeners after going down, the link's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// How much the coordinator's counters of frames it could not decode, or (with integrity
    /// tags) verify, and of registrations it refused, rose during the disruption; `None` when
    /// it did not answer before or after, which shows nothing.
    pub frames: Option<super::disrupt::FrameCounters>,
    /// What the integrity checks caught at each end: the coordinator's counters in `frames`
    /// and the workers' event logs (see [`Observation::analyse`]).
    pub caught: super::disrupt::Caught,
    /// Fault to the worker declaring its session lost, per worker.
    pub worker_detect_ms: BTreeMap<String, f64>,
    /// Whether that loss was the liveness timeout (a silent link), per worker.
    pub worker_detect_dead: BTreeMap<String, bool>,
    /// Fault to the coordinator's disconnect time, per worker.
    pub coordinator_detect_ms: BTreeMap<String, f64>,
    /// Removal to the registration after the worker's last loss in the window (0 when it was
    /// back before the removal), per worker that lost its session.
    pub recover_ms: BTreeMap<String, f64>,
    /// Whether it was noticed where it must be (see [`Observation::analyse`]); `None` for
    /// the kinds that have nothing to notice ([`Kind::detectable`]).
    pub detected: Option<bool>,
    pub recovered: bool,
    /// Recovery of the whole fleet was seen before the next disruption.
    pub fleet_recovered: bool,
    /// `worker_stop`: what became of the leases the stopped worker held ([`Observation::settle_from`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handback: Option<super::verdict::Handback>,
    /// `worker_kill`: the killed worker's task processes, and those that outlived it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlived: Option<super::verdict::Outlived>,
    /// `drain`: when the drain was asked, when it was answered, and when the undrain was
    /// asked. No task may start on the worker from the answer to the undrain; the worker's
    /// being told counts from the asking (the coordinator tells it at once, which may be
    /// before its answer arrives).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drained_between: Option<(DateTime<Utc>, DateTime<Utc>, DateTime<Utc>)>,
    /// `drain`: the attempts started meanwhile, and whether the worker's event log says it
    /// was told ([`Observation::settle_from`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drained: Option<super::verdict::Drained>,
    pub note: String,
}

impl Observation {
    /// What the verdict looks at (after [`Observation::analyse`]).
    pub fn view(&self) -> DisruptionView {
        DisruptionView {
            index: self.index,
            kind: self.kind,
            fired: self.fired,
            detected: self.detected,
            recovered: self.recovered,
            sessions_lost: self
                .worker_detect_ms
                .keys()
                .map(|w| {
                    let dead = self.worker_detect_dead.get(w).copied().unwrap_or(false);
                    (w.clone(), dead)
                })
                .collect(),
            handback: self.handback.clone(),
            outlived: self.outlived.clone(),
            drained: self.drained.clone(),
        }
    }

    /// From the tasks' attempts as the coordinator lists them at the end: `worker_stop`, what
    /// became of the leases the stopped worker held when it was told to stop; `drain`, the
    /// attempts started while its worker was drained, and whether its event log (in `logs`)
    /// says its heartbeat replies told it, within the hold.
    pub fn settle_from(
        &mut self,
        tasks: &[super::verdict::TaskView],
        logs: &BTreeMap<String, Vec<Record>>,
    ) {
        match (self.kind, &self.target, self.drained_between) {
            (Kind::WorkerStop, Some(worker), _) => {
                self.handback = Some(super::verdict::Handback::of(
                    tasks,
                    worker,
                    self.started_at,
                    self.removed_at,
                ));
            }
            (Kind::Drain, Some(worker), Some((asked, from, until))) => {
                let told = logs.get(worker).is_some_and(|events| {
                    events.iter().any(|r| {
                        r.event == Event::Drained { draining: true }
                            && r.at >= asked
                            && r.at <= until
                    })
                });
                self.drained = Some(super::verdict::Drained {
                    told,
                    ..super::verdict::Drained::of(tasks, worker, from, until)
                });
            }
            _ => {}
        }
    }

    /// Fills detection and recovery from the event logs (by worker id) and the coordinator's
    /// samples: losses and detections from events before `window_end` (the next disruption's
    /// start, or the end of the disruptions), the registration that ends a loss from any
    /// time after it. And what the integrity checks caught, from the same window of the logs.
    pub fn analyse(
        &mut self,
        logs: &BTreeMap<String, Vec<Record>>,
        samples: &[CoordSample],
        window_end: DateTime<Utc>,
    ) {
        let (start, removed) = (self.started_at, self.removed_at);
        self.caught = super::disrupt::Caught::of(self.frames, logs, start, window_end);
        for (worker, events) in logs {
            let window: Vec<&Record> = events
                .iter()
                .filter(|r| r.at >= start && r.at < window_end)
                .collect();
            let first_loss = window.iter().find_map(|r| match &r.event {
                Event::SessionLost { dead, .. } => Some((r.at, *dead)),
                _ => None,
            });
            if let Some((at, dead)) = first_loss {
                self.worker_detect_ms.insert(worker.clone(), ms(start, at));
                self.worker_detect_dead.insert(worker.clone(), dead);
            }
            // A restarted coordinator knows every worker as disconnected since its start; that
            // is not a detection.
            if self.kind != Kind::CoordinatorKill
                && let Some(at) =
                    coordinator_detection(samples, worker, start).filter(|d| *d < window_end)
            {
                self.coordinator_detect_ms
                    .insert(worker.clone(), ms(start, at));
            }
            let killed = self.kind.restarts_its_worker() && self.target.as_deref() == Some(worker);
            if first_loss.is_none() && !killed {
                continue;
            }
            let last_loss = window
                .iter()
                .rev()
                .find(|r| matches!(r.event, Event::SessionLost { .. } | Event::Started { .. }))
                .map(|r| r.at);
            // The registration that ends the worker's last loss, looked for past the window
            // too: a session the disruption's aftermath ends just after the fleet looked whole
            // again (a link that crawled, its retransmissions still queued) comes back after
            // the next disruption started, or after the last one was over. One that never
            // comes back is not recovered; one slow to, by `fleet_recovered`. One back before
            // the removal recovered at once.
            let back_early = window.iter().any(|r| {
                matches!(r.event, Event::Registered { .. })
                    && r.at < removed
                    && last_loss.is_none_or(|l| r.at > l)
            });
            let since = last_loss.map_or(removed, |l| l.max(removed));
            let recovery = if back_early {
                Some(0.0)
            } else {
                events
                    .iter()
                    .find(|r| r.at >= since && matches!(r.event, Event::Registered { .. }))
                    .map(|r| ms(removed, r.at))
            };
            if let Some(recovery) = recovery {
                self.recover_ms.insert(worker.clone(), recovery);
            }
        }
        // Each from evidence the run did not make itself: the workers' event logs, the
        // coordinator's view and counters. A disruption that affected no worker noticed
        // nothing.
        let every =
            |f: &dyn Fn(&String) -> bool| !self.affected.is_empty() && self.affected.iter().all(f);
        let lost = |w: &String| self.worker_detect_ms.contains_key(w);
        self.detected = self.kind.detectable().then(|| match self.kind {
            Kind::WorkerKill | Kind::WorkerStop | Kind::SlowClose => self
                .target
                .as_ref()
                .is_some_and(|t| self.coordinator_detect_ms.contains_key(t)),
            Kind::Blackhole | Kind::LeaseLoss | Kind::LinkDown => every(&|w| {
                self.worker_detect_dead.get(w) == Some(&true)
                    && self.coordinator_detect_ms.contains_key(w)
            }),
            Kind::Corrupt => self.frames.is_some_and(|f| f.total() > 0) || every(&lost),
            _ => every(&lost),
        });
        // Workers the disruption had to cut, and any other that lost its session meanwhile.
        let must_recover: Vec<&String> = logs
            .keys()
            .filter(|w| {
                (self.kind.cuts() && self.affected.contains(w))
                    || self.worker_detect_ms.contains_key(*w)
            })
            .collect();
        self.recovered = self.fleet_recovered
            && must_recover
                .iter()
                .all(|w| self.recover_ms.contains_key(*w));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(1_800_000_000_000 + ms).expect("time")
    }

    fn rec(ms: i64, event: Event) -> Record {
        Record {
            at: at(ms),
            worker: "w1".into(),
            n: None,
            event,
        }
    }

    fn blackhole() -> Observation {
        Observation {
            index: 0,
            kind: Kind::Blackhole,
            target: Some("w1".into()),
            affected: vec!["w1".into()],
            started_at: at(0),
            removed_at: at(3_500),
            fault_stats: None,
            shape_stats: None,
            fired: true,
            evidence: None,
            frames: None,
            caught: Default::default(),
            worker_detect_ms: BTreeMap::new(),
            worker_detect_dead: BTreeMap::new(),
            coordinator_detect_ms: BTreeMap::new(),
            recover_ms: BTreeMap::new(),
            detected: None,
            recovered: false,
            fleet_recovered: true,
            handback: None,
            outlived: None,
            drained_between: None,
            drained: None,
            note: String::new(),
        }
    }

    /// The coordinator tells a drained worker at once, so its `drained` record may come
    /// before the drain's answer reaches the run: told counts from the asking, not from the
    /// answer (seen failing a run that took from the answer), and not before it.
    #[test]
    fn a_drained_worker_is_told_from_the_asking_of_the_drain_to_the_undrain() {
        let told_at = |ms: i64| {
            let mut o = Observation {
                kind: Kind::Drain,
                drained_between: Some((at(1_000), at(1_010), at(4_000))),
                ..blackhole()
            };
            let logs = BTreeMap::from([(
                "w1".to_owned(),
                vec![rec(ms, Event::Drained { draining: true })],
            )]);
            o.settle_from(&[], &logs);
            o.drained.expect("drained").told
        };
        assert!(told_at(1_005), "between the asking and the answer");
        assert!(told_at(3_000));
        assert!(!told_at(999), "before the drain was asked");
        assert!(!told_at(4_001), "after the undrain was asked");
    }

    fn lost(ms: i64, dead: bool) -> Record {
        rec(
            ms,
            Event::SessionLost {
                generation: 1,
                reason: "r".into(),
                dead,
            },
        )
    }

    fn registered(ms: i64) -> Record {
        rec(
            ms,
            Event::Registered {
                generation: 2,
                session_id: 2,
            },
        )
    }

    fn sample(ms: i64) -> CoordSample {
        CoordSample {
            worker: "w1".into(),
            state: "disconnected".into(),
            seen_at: at(ms + 50),
            disconnected_at: Some(at(ms)),
        }
    }

    #[test]
    fn a_blackhole_seen_by_both_sides_and_re_registered_is_detected_and_recovered() {
        let mut o = blackhole();
        let logs = BTreeMap::from([(
            "w1".to_owned(),
            vec![registered(-5_000), lost(1_600, true), registered(3_700)],
        )]);
        o.analyse(&logs, &[sample(3_000)], at(10_000));
        assert!(o.detected == Some(true) && o.recovered, "{o:?}");
        assert_eq!(o.worker_detect_ms["w1"], 1_600.0);
        assert_eq!(o.coordinator_detect_ms["w1"], 3_000.0);
        assert_eq!(o.recover_ms["w1"], 200.0);
    }

    #[test]
    fn a_blackhole_not_seen_by_the_coordinator_or_ended_by_a_close_is_not_detected() {
        let logs = BTreeMap::from([("w1".to_owned(), vec![lost(1_600, true), registered(3_700)])]);
        let mut o = blackhole();
        o.analyse(&logs, &[], at(10_000));
        assert_eq!(o.detected, Some(false));
        let closed =
            BTreeMap::from([("w1".to_owned(), vec![lost(1_600, false), registered(3_700)])]);
        let mut o = blackhole();
        o.analyse(&closed, &[sample(3_000)], at(10_000));
        assert_eq!(o.detected, Some(false));
    }

    #[test]
    fn a_worker_that_never_registers_again_is_not_recovered() {
        let logs = BTreeMap::from([("w1".to_owned(), vec![lost(1_600, true)])]);
        let mut o = blackhole();
        o.analyse(&logs, &[sample(3_000)], at(10_000));
        assert!(o.detected == Some(true) && !o.recovered, "{o:?}");
        // A registration before the loss does not end it.
        let logs = BTreeMap::from([("w1".to_owned(), vec![registered(3_600), lost(3_650, true)])]);
        let mut o = blackhole();
        o.analyse(&logs, &[sample(3_000)], at(10_000));
        assert!(!o.recovered, "{o:?}");
    }

    /// A session lost late in the window, after the fleet looked whole again (the aftermath
    /// of a crawl), is recovered by the registration after it, though that comes after the
    /// window: the end-to-end test's last disruption failed so once (a session lost 54 ms
    /// before the disruptions were over, back 1.1 s later).
    #[test]
    fn a_loss_late_in_the_window_is_recovered_by_the_registration_after_it() {
        let logs = BTreeMap::from([(
            "w1".to_owned(),
            vec![registered(-5_000), lost(9_900, true), registered(11_000)],
        )]);
        let mut o = blackhole();
        o.analyse(&logs, &[sample(3_000)], at(10_000));
        assert!(o.detected == Some(true) && o.recovered, "{o:?}");
        assert_eq!(o.recover_ms["w1"], 7_500.0);
    }

    /// A slow link's detection is not applicable, whatever it fired; a cut's comes from the
    /// logs and the coordinator's view, not from its firing.
    #[test]
    fn detection_is_not_applicable_to_a_slow_link_and_not_taken_from_firing() {
        let quiet = BTreeMap::from([("w1".to_owned(), vec![registered(-5_000)])]);
        for kind in [Kind::Latency, Kind::Bandwidth, Kind::Slicer, Kind::Stall] {
            let mut o = Observation {
                kind,
                ..blackhole()
            };
            o.analyse(&quiet, &[], at(10_000));
            assert_eq!(o.detected, None, "{kind:?}");
        }
        for kind in [
            Kind::Reset,
            Kind::ProxyDown,
            Kind::WorkerKill,
            Kind::WorkerStop,
            Kind::CoordinatorKill,
        ] {
            let mut o = Observation {
                kind,
                ..blackhole()
            };
            assert!(o.fired);
            o.analyse(&quiet, &[], at(10_000));
            assert_eq!(o.detected, Some(false), "{kind:?}");
        }
        // Affecting nobody, a cut noticed nothing.
        let mut o = Observation {
            kind: Kind::Reset,
            affected: vec![],
            ..blackhole()
        };
        o.analyse(&quiet, &[], at(10_000));
        assert_eq!(o.detected, Some(false));
    }

    /// A latency whose window holds a worker's dead session: the loss reaches the verdict,
    /// which fails the run for it, though the worker came back; a quiet one passes.
    #[test]
    fn a_session_declared_dead_under_latency_reaches_the_verdict_and_fails_it() {
        let judge = |events: Vec<Record>| {
            let mut o = Observation {
                kind: Kind::Latency,
                affected: vec![],
                ..blackhole()
            };
            o.analyse(
                &BTreeMap::from([("w1".to_owned(), events)]),
                &[],
                at(10_000),
            );
            let truth = super::super::verdict::GroundTruth {
                disruptions: vec![o.view()],
                ..Default::default()
            };
            let v = super::super::verdict::verdict(&truth);
            (
                o.view(),
                v.checks
                    .iter()
                    .any(|c| c.name == "slow_links_ridden_through" && !c.pass),
            )
        };
        let (view, failed) = judge(vec![
            registered(-5_000),
            lost(1_600, true),
            registered(2_000),
        ]);
        assert_eq!(view.sessions_lost, [("w1".to_owned(), true)]);
        assert!(view.recovered && failed, "{view:?}");
        let (view, failed) = judge(vec![registered(-5_000)]);
        assert!(view.sessions_lost.is_empty() && !failed, "{view:?}");
    }

    /// The last disruption's window runs past its removal by more than the liveness timeout:
    /// a session lost 500 ms after the last latency went is that latency's, though the run
    /// marked the disruptions over 10 ms after the removal.
    #[test]
    fn a_session_lost_just_after_the_last_slow_link_went_is_charged_to_it() {
        let mut o = Observation {
            kind: Kind::Latency,
            affected: vec![],
            ..blackhole()
        };
        let removed = o.removed_at;
        let ends = window_ends(
            &[(o.started_at, removed)],
            removed + chrono::Duration::milliseconds(10),
        );
        assert_eq!(ends.len(), 1);
        let logs = BTreeMap::from([(
            "w1".to_owned(),
            vec![
                registered(-5_000),
                lost(3_500 + 500, true),
                registered(4_200),
            ],
        )]);
        o.analyse(&logs, &[], ends[0]);
        assert_eq!(o.view().sessions_lost, [("w1".to_owned(), true)]);
        // A window between two disruptions still ends at the next one's start.
        let next = at(3_600);
        let ends = window_ends(&[(at(0), removed), (next, at(4_000))], at(9_000));
        assert_eq!(ends[0], next);
        assert_eq!(ends[1], at(9_000));
    }

    fn parse_events(text: &str) -> anyhow::Result<Vec<Record>> {
        whole(tether_worker::eventlog::parse(text))
    }

    #[test]
    fn an_event_log_with_a_bad_line_or_none_at_all_is_an_error_but_a_torn_last_line_is_not() {
        let line = |r: &Record| serde_json::to_string(r).expect("json") + "\n";
        let whole = line(&registered(0)) + &line(&lost(10, true));
        assert_eq!(parse_events(&whole).expect("whole").len(), 2);
        // Killed while writing its last line.
        let torn = whole.clone() + r#"{"at":"2027-01-15T08:0"#;
        assert_eq!(parse_events(&torn).expect("torn").len(), 2);
        // A bad line with its newline, in the middle or at the end, is damage.
        let middle = line(&registered(0)) + "{\"at\": garbage}\n" + &line(&lost(10, true));
        let e = parse_events(&middle).expect_err("bad line");
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(parse_events(&(whole.clone() + "not json\n")).is_err());
        // A log that is not there is not an empty one.
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("w1.events.jsonl");
        assert!(read_events(&missing).is_err());
        assert!(events_now(&missing).is_empty());
        std::fs::write(&missing, torn).expect("write");
        assert_eq!(read_events(&missing).expect("read").len(), 2);
    }

    /// What the tags caught during a corruption comes from both ends: the coordinator's
    /// counters as they rose, and the worker's event log in the disruption's window only.
    #[test]
    fn a_corruptions_catches_are_read_at_both_ends_in_its_window() {
        let mut o = Observation {
            kind: Kind::Corrupt,
            frames: Some(super::super::disrupt::FrameCounters {
                undecodable: 5,
                mac_failures: 0,
                auth_failures: 1,
            }),
            ..blackhole()
        };
        // One `tag_failed` record a frame; the session's end they caused catches nothing more.
        let tagged = |ms, failures| {
            rec(
                ms,
                Event::TagFailed {
                    generation: 1,
                    failures,
                },
            )
        };
        let ended = rec(
            400,
            Event::SessionLost {
                generation: 1,
                reason: "3 frames from the coordinator failed their integrity tag".into(),
                dead: false,
            },
        );
        let logs = BTreeMap::from([(
            "w1".to_owned(),
            vec![
                tagged(390, 1),
                tagged(395, 2),
                tagged(399, 3),
                ended,
                registered(900),
                // The next disruption's.
                tagged(10_500, 1),
            ],
        )]);
        o.analyse(&logs, &[], at(10_000));
        assert_eq!(o.caught.coordinator_registrations, Some(1));
        assert_eq!(o.caught.workers, BTreeMap::from([("w1".to_owned(), 3)]));
        assert_eq!(o.caught.total, 4);
        let json = serde_json::to_value(&o).expect("json");
        assert_eq!(json["caught"]["total"], 4, "{json}");
    }

    /// A worker back before the removal recovered at once, whatever later disruptions do to it.
    #[test]
    fn a_worker_back_before_the_removal_recovered_at_once() {
        let logs = BTreeMap::from([(
            "w1".to_owned(),
            vec![
                lost(1_600, true),
                registered(2_000),
                lost(20_000, true),
                registered(21_000),
            ],
        )]);
        let mut o = blackhole();
        o.analyse(&logs, &[sample(3_000)], at(10_000));
        assert!(o.recovered, "{o:?}");
        assert_eq!(o.recover_ms["w1"], 0.0);
    }

    /// A process's numbered records, one a second from `ms`, ending with a `stopped` record
    /// saying `failures` when given.
    fn boot(ms: i64, numbers: &[u64], stopped: Option<u64>) -> Vec<Record> {
        let mut out: Vec<Record> = numbers
            .iter()
            .enumerate()
            .map(|(i, n)| Record {
                n: Some(*n),
                ..registered(ms + 1_000 * i as i64)
            })
            .collect();
        if let Some(write_failures) = stopped {
            let n = numbers.last().map_or(1, |n| n + 1);
            out.push(Record {
                n: Some(n),
                ..rec(
                    ms + 1_000 * numbers.len() as i64,
                    Event::Stopped {
                        write_failures,
                        rotation_failures: 0,
                    },
                )
            });
        }
        out
    }

    /// Lines lost from a worker's log show as a gap in a process's numbers, a failed count in
    /// its last record, or a graceful stop without that record; a killed process needs no last
    /// record, and records without numbers (an older worker) are not judged.
    #[test]
    fn a_log_with_a_gap_a_failed_write_or_a_graceful_stop_unrecorded_is_incomplete() {
        // Killed at record 3, then started again and stopped gracefully.
        let mut whole = boot(0, &[1, 2, 3], None);
        whole.extend(boot(10_000, &[1, 2], Some(0)));
        let starts = [(at(-1), false), (at(9_000), true)];
        assert!(log_gaps(&whole, &starts).is_empty());
        let one = [(at(-1), true)];
        let said = log_gaps(&boot(0, &[1, 2, 4, 5], Some(0)), &one);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains("lost records 3 to 3"), "{said:?}");
        // The second process's first records are gone, though its numbers run on from the
        // first's last.
        let mut late = boot(0, &[1, 2], None);
        late.extend(boot(10_000, &[3, 4], Some(0)));
        let said = log_gaps(&late, &starts);
        assert!(
            said.len() == 1 && said[0].contains("lost records 1 to 2"),
            "{said:?}"
        );
        let said = log_gaps(&boot(0, &[1, 2], Some(2)), &one);
        assert!(said[0].contains("failed 2 writes"), "{said:?}");
        // Stopped gracefully, but its stopped record never came, or nothing did.
        let said = log_gaps(&boot(0, &[1, 2], None), &one);
        assert!(said[0].contains("without its stopped record"), "{said:?}");
        let said = log_gaps(&boot(0, &[1], None), &[(at(-1), false), (at(5_000), true)]);
        assert!(said[0].contains("logged nothing"), "{said:?}");
        // A log rotated twice keeps a process's records from a `rotated` one: not lost.
        let rotated = |n: u64, ms: i64| Record {
            n: Some(n),
            ..rec(
                ms,
                Event::Rotated {
                    previous: "events.jsonl.1".into(),
                    bytes: 65_536,
                },
            )
        };
        let mut kept = vec![rotated(40, 0)];
        kept.extend(boot(1_000, &[41, 42], Some(0)));
        assert!(
            log_gaps(&kept, &one).is_empty(),
            "{:?}",
            log_gaps(&kept, &one)
        );
        // But one that lost records after it is still incomplete.
        let mut holed = vec![rotated(40, 0)];
        holed.extend(boot(1_000, &[41, 43], Some(0)));
        let said = log_gaps(&holed, &one);
        assert!(
            said.len() == 1 && said[0].contains("lost records 42 to 42"),
            "{said:?}"
        );
        // Unnumbered records: nothing to judge by.
        assert!(log_gaps(&[registered(0), lost(10, true)], &[(at(-1), false)]).is_empty());
    }
}
