//! Carrying out one planned disruption against the live system, then waiting until the fleet
//! is whole again before the next one.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tether_faultproxy::{Fault, FaultGuard, FaultStats, Proxy, ProxyStats, Target};
use tether_proto::WorkerId;
use tether_worker::eventlog::{Event, Record};

use super::netns::NetFleet;
use super::observe::{self, Observation, Watcher};
use super::plan::{Disruption, Kind, MAX_HOLD};
use super::procs::{self, Coordinator, Worker};
use super::verdict::{KilledTask, Outlived};

/// How long the fleet gets to be whole again after a disruption.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll period of every wait here.
const TICK: Duration = Duration::from_millis(20);
/// The least time a `corrupt` fault stays on (it stays, up to its hold, until it changed
/// [`CORRUPT_ENOUGH`] bytes too). Removed at its first flipped byte, as it was, it damaged about
/// one frame, a heartbeat (at the tagged rate the first flip comes after some 500 bytes), and
/// almost never a result.
pub const CORRUPT_WINDOW: Duration = Duration::from_secs(3);
/// Bytes a `corrupt` fault changes before it is removed, unless its hold runs out first.
pub const CORRUPT_ENOUGH: u64 = 24;
/// What a `worker_kill`'s counter has counted to at least: it has shipped checkpoints (one
/// every change of its count, 300 ms apart), so its next attempt must resume from one.
const SHIPPED_COUNT: u32 = 3;
/// How much longer than the time its task processes get to end (the worker's time down, at
/// least [`TASKS_END_LIMIT`]) a killed counter must have had left to run for its end to show
/// the warden at work: one nearly done ends on its own in time, warden or not.
pub const KILL_MARGIN: Duration = Duration::from_millis(500);
/// How long a `worker_kill` waits for a worker running a `command` task, and a `worker_stop`
/// for one holding a lease, before it takes the planned worker as it is: the verdict needs at
/// least one of each to have hit work (a wave of tasks, a command among them, goes in after
/// every disruption, so it rarely waits).
pub const TARGET_WAIT: Duration = Duration::from_secs(10);

/// The live system a disruption acts on.
pub struct System {
    pub coordinator: Coordinator,
    /// One proxy for every worker, or (with `--netns`) one per worker: worker `i` goes
    /// through `proxies[i % len]`.
    pub proxies: Vec<Proxy>,
    pub workers: Vec<Worker>,
    pub watcher: Watcher,
    pub netns: Option<NetFleet>,
}

fn fired(s: &FaultStats) -> bool {
    s.bytes_delayed > 0
        || s.bytes_dropped > 0
        || s.bytes_corrupted > 0
        || s.connections_reset > 0
        || s.connections_closed > 0
        || s.closes_delayed > 0
}

/// Whether taking the proxies down did what it says: every link that was open before is
/// closed (`before` and `after`: the proxies' counters summed, around going down), there
/// were links to close, and the listeners refuse connections (`refused`).
pub(crate) fn proxies_went_down(before: &ProxyStats, after: &ProxyStats, refused: bool) -> bool {
    before.connections_active > 0
        && after.connections_active == 0
        && after
            .connections_closed
            .saturating_sub(before.connections_closed)
            >= before.connections_active
        && refused
}

/// Whether a connection to every address in `addrs` is refused now.
pub(crate) async fn all_refuse(addrs: impl IntoIterator<Item = std::net::SocketAddr>) -> bool {
    for a in addrs {
        match tokio::net::TcpStream::connect(a).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            _ => return false,
        }
    }
    true
}

/// Whether a kill's exit status shows a SIGKILL, and what it shows.
fn killed(status: Option<std::process::ExitStatus>) -> (bool, String) {
    match status {
        _ if procs::killed_by_sigkill(status) => (true, "ended by SIGKILL".into()),
        Some(s) => (false, format!("not ended by SIGKILL: {s}")),
        None => (false, "no process to kill".into()),
    }
}

/// The least time a killed worker's task processes get to end before they count as outliving
/// it (they get the worker's planned time down if longer; it starts again after that). Its
/// warden SIGTERMs them at once, and no task of the run ignores SIGTERM; without a warden they
/// would run on (a counter has up to 3.6 s to go) until the next start's records end them.
pub const TASKS_END_LIMIT: Duration = Duration::from_secs(1);

/// Whether task process `p`, killed with its worker and given `limit` to end, would still run
/// after it without a warden: a counter's command (not a child) that has shipped checkpoints
/// and has more than `limit` plus [`KILL_MARGIN`] to go by its count.
fn lasting(p: &procs::TaskProc, limit: Duration) -> bool {
    p.top
        && p.count.is_some_and(|c| {
            c >= SHIPPED_COUNT && super::tasks::counter_left(c) > limit + KILL_MARGIN
        })
}

/// Of the task processes a killed worker ran, those still running `limit` after its death,
/// and the commands among them that would have run past it ([`lasting`]).
async fn outlived_by(ran: Vec<procs::TaskProc>, limit: Duration) -> Outlived {
    until(limit, || !ran.iter().any(|p| procs::running(p.pid))).await;
    Outlived {
        left: ran
            .iter()
            .map(|p| p.pid)
            .filter(|p| procs::running(*p))
            .collect(),
        ran: ran.len(),
        lasting: ran
            .iter()
            .filter(|p| lasting(p, limit))
            .map(|p| KilledTask {
                task: p.task.clone(),
                attempt: p.attempt,
                pid: p.pid,
                count: p.count.unwrap_or(0),
            })
            .collect(),
    }
}

/// Whether a worker stopped by SIGTERM stopped gracefully: exit 0 within the grace.
fn stopped(exit: Option<procs::Exit>) -> (bool, String) {
    match exit {
        Some(procs::Exit::Stopped(s)) if s.success() => (true, "exited 0 after SIGTERM".into()),
        Some(procs::Exit::Stopped(s)) => (false, format!("ended with {s} after SIGTERM")),
        Some(procs::Exit::OnItsOwn(s)) => (false, format!("had exited on its own: {s}")),
        Some(procs::Exit::KilledAfterGrace(g)) => {
            (false, format!("not stopped {g:?} after SIGTERM; SIGKILLed"))
        }
        None => (false, "no process to stop".into()),
    }
}

/// Waits until `f` holds or `limit` passes; returns whether it held.
async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(TICK).await;
    }
}

/// The coordinator's counters of frames it could not take: undecodable (malformed, unknown)
/// and, with integrity tags, failing their tag; and registrations it refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FrameCounters {
    pub undecodable: u64,
    pub mac_failures: u64,
    /// Registrations refused for their signature or (with integrity tags) their tag: with the
    /// run's own secret on every worker, damage to the handshake (the registration, or the
    /// welcome's nonce it signs).
    pub auth_failures: u64,
}

impl FrameCounters {
    /// From `GET /api/v1/overview`; `None` when a counter is missing.
    fn of(overview: &serde_json::Value) -> Option<Self> {
        let c = &overview["counters"];
        let n = |k: &str| c[k].as_u64();
        Some(Self {
            undecodable: n("malformed_frames")? + n("unknown_frames")?,
            mac_failures: n("mac_failures")?,
            auth_failures: n("auth_failures")?,
        })
    }

    /// How much each rose from `before` to `after`; `None` when either is unknown (the
    /// coordinator did not answer): an unknown baseline shows nothing, it is not a zero.
    pub fn rose(before: Option<Self>, after: Option<Self>) -> Option<Self> {
        let (b, a) = (before?, after?);
        Some(Self {
            undecodable: a.undecodable.saturating_sub(b.undecodable),
            mac_failures: a.mac_failures.saturating_sub(b.mac_failures),
            auth_failures: a.auth_failures.saturating_sub(b.auth_failures),
        })
    }

    /// Frames of registered sessions not taken, of either sort (refused registrations are
    /// not among them).
    pub fn total(self) -> u64 {
        self.undecodable + self.mac_failures
    }
}

/// What the integrity checks caught during a disruption, at each end. Each figure counts a
/// damaged frame that an end refused for its tag (or, for a registration, its signature)
/// rather than took: a run without tags, or damage that no check met, counts nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Caught {
    /// The coordinator: frames from workers that failed their tag (its `mac_failures`, as
    /// they rose); `None` when it did not answer before or after.
    pub coordinator_frames: Option<u64>,
    /// The coordinator: registrations it refused for their tag or signature (its
    /// `auth_failures`, as they rose); `None` as above.
    pub coordinator_registrations: Option<u64>,
    /// Each worker that caught any: frames from the coordinator that failed their tag there,
    /// one `tag_failed` record each in its event log.
    pub workers: BTreeMap<String, u64>,
    /// All of the above that is known.
    pub total: u64,
}

impl Caught {
    /// From the coordinator's counters as they rose during the disruption (`frames`) and the
    /// workers' event logs, of the records at or after `from` and before `until`.
    pub fn of(
        frames: Option<FrameCounters>,
        logs: &BTreeMap<String, Vec<Record>>,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Self {
        let workers: BTreeMap<String, u64> = logs
            .iter()
            .map(|(w, records)| {
                let n = records
                    .iter()
                    .filter(|r| r.at >= from && r.at < until)
                    .filter(|r| matches!(r.event, Event::TagFailed { .. }))
                    .count() as u64;
                (w.clone(), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let coordinator_frames = frames.map(|f| f.mac_failures);
        let coordinator_registrations = frames.map(|f| f.auth_failures);
        let total = coordinator_frames.unwrap_or(0)
            + coordinator_registrations.unwrap_or(0)
            + workers.values().sum::<u64>();
        Self {
            coordinator_frames,
            coordinator_registrations,
            workers,
            total,
        }
    }
}

impl std::fmt::Display for Caught {
    /// `tags caught 4: coordinator frames 1, registrations 0; e2e-w2 frames 3` (`?` for
    /// the coordinator's when it did not answer).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        write!(
            f,
            "tags caught {}: coordinator frames {}, registrations {}",
            self.total,
            n(self.coordinator_frames),
            n(self.coordinator_registrations)
        )?;
        for (w, k) in &self.workers {
            write!(f, "; {w} frames {k}")?;
        }
        Ok(())
    }
}

/// The coordinator's frame counters now; `None` when it does not answer.
async fn frame_counters(sys: &System) -> Option<FrameCounters> {
    let o = sys.coordinator.api.get("/api/v1/overview").await.ok()?;
    FrameCounters::of(&o)
}

impl System {
    fn worker_ids(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.id.clone()).collect()
    }

    /// A `worker_kill`'s worker: the planned one if it runs a counter's command that would
    /// outlive it without a warden ([`lasting`], given `limit` to end), else the next (in the
    /// fleet's order) that does; waited for up to [`TARGET_WAIT`], else one running any task
    /// process, else the planned one. Killed in the middle of a command, a worker leaves
    /// processes its warden must end, and an attempt whose next one resumes from the
    /// checkpoints it shipped.
    async fn mid_command(&self, planned: Option<usize>, limit: Duration) -> Option<usize> {
        let start = planned?;
        let n = self.workers.len();
        let find = |enough: &dyn Fn(&procs::TaskProc) -> bool| {
            (0..n).map(|k| (start + k) % n).find(|i| {
                self.workers[*i]
                    .pid()
                    .is_some_and(|pid| procs::task_procs(pid).iter().any(enough))
            })
        };
        let mut found = None;
        until(TARGET_WAIT, || {
            found = find(&|p| lasting(p, limit));
            found.is_some()
        })
        .await;
        found.or_else(|| find(&|_| true)).or(planned)
    }

    /// A `worker_stop`'s (or a `corrupt`'s) worker: the planned one if the coordinator has it
    /// holding a lease, else the next that does; waited for up to [`TARGET_WAIT`], else the
    /// planned one. A stop of a worker holding nothing would show nothing of the handing back;
    /// corruption of its link would meet heartbeats only, no result.
    async fn holding_a_lease(&self, planned: Option<usize>) -> Option<usize> {
        let start = planned?;
        let n = self.workers.len();
        let end = tokio::time::Instant::now() + TARGET_WAIT;
        loop {
            if let Ok(ws) = self.coordinator.api.get("/api/v1/workers").await {
                let holding = |id: &str| {
                    ws.as_array().into_iter().flatten().any(|w| {
                        w["worker_id"] == id
                            && w["leases"].as_array().is_some_and(|l| !l.is_empty())
                    })
                };
                let found = (0..n)
                    .map(|k| (start + k) % n)
                    .find(|i| holding(&self.workers[*i].id));
                if found.is_some() {
                    return found;
                }
            }
            if tokio::time::Instant::now() >= end {
                return planned;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `drain`: drains its worker through the API. Returns when the request was sent and
    /// when the coordinator answered: from then on no task may start on it (the worker may
    /// be told before the answer arrives here, the coordinator telling it at once).
    pub async fn drain(&self, d: &Disruption) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
        let Some(worker) = d.target.and_then(|i| self.workers.get(i)) else {
            anyhow::bail!("drain needs a target");
        };
        let path = format!("/api/v1/workers/{}/drain", worker.id);
        let asked = Utc::now();
        self.coordinator
            .api
            .post(&path, &serde_json::json!({}))
            .await?;
        Ok((asked, Utc::now()))
    }

    /// Applies `d`, holds it, removes it, and waits for the fleet to be whole again. A `drain`
    /// was put in place by [`System::drain`], asked and answered at `drained_at`.
    pub async fn apply(
        &mut self,
        d: &Disruption,
        drained_at: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> anyhow::Result<Observation> {
        let retargeted;
        let d = match d.kind {
            Kind::WorkerKill => {
                retargeted = Disruption {
                    target: self
                        .mid_command(d.target, d.hold.max(TASKS_END_LIMIT))
                        .await,
                    ..d.clone()
                };
                &retargeted
            }
            // Corruption goes where tasks run, so that their results meet it; a lease loss
            // must have a lease to lose.
            Kind::WorkerStop | Kind::Corrupt | Kind::LeaseLoss => {
                retargeted = Disruption {
                    target: self.holding_a_lease(d.target).await,
                    ..d.clone()
                };
                &retargeted
            }
            _ => d,
        };
        let target = d
            .target
            .and_then(|i| self.workers.get(i))
            .map(|w| w.id.clone());
        let affected = match (d.kind.targeted(), &target) {
            (true, Some(t)) => vec![t.clone()],
            (true, None) => vec![],
            (false, _) if d.kind.cuts() => self.worker_ids(),
            (false, _) => vec![],
        };
        let frames_before = frame_counters(self).await;
        let started_at = drained_at.map_or_else(Utc::now, |(_, answered)| answered);
        let mut note = String::new();
        let mut drained_between = None;
        let mut shape_stats = None;
        // What shows that a disruption without counters of its own took effect, and whether
        // it does.
        let mut evidence = None;
        let mut outlived = None;
        let fault_stats = match (&d.fault, d.kind) {
            (Some(kind), _) => {
                let mut fault = Fault::new(
                    format!("e2e-{}-{}", d.index, d.kind.as_str()),
                    kind.clone(),
                    d.direction,
                );
                if let Some(t) = &target {
                    fault = fault.with_target(Target::Workers(vec![WorkerId::parse(t)?]));
                }
                let mut guards = Vec::new();
                for (i, p) in self.proxies.iter().enumerate() {
                    if d.target.is_none_or(|t| t % self.proxies.len() == i) {
                        guards.push(p.add_fault(fault.clone()).await?);
                    }
                }
                let held = match (d.kind, d.target) {
                    (Kind::LeaseLoss, _) => {
                        let moved = self
                            .lease_moved(target.as_deref(), started_at, d.hold)
                            .await;
                        let shown = moved.0;
                        evidence = Some(moved);
                        shown
                    }
                    (Kind::SlowClose, Some(i)) => {
                        let closed = self.stop_through_slow_close(i, d.hold, started_at).await?;
                        let shown = closed.0;
                        evidence = Some(closed);
                        shown
                    }
                    _ => self.hold(d, &guards, target.as_deref(), started_at).await,
                };
                if !held {
                    note = format!("not seen to take effect within {:?}", d.hold);
                }
                Some(guards.into_iter().map(FaultGuard::remove).sum())
            }
            (None, Kind::ProxyDown) => {
                let before = self.proxy_stats();
                for p in &self.proxies {
                    p.down().await;
                }
                let after = self.proxy_stats();
                let refused = all_refuse(self.proxies.iter().map(Proxy::listen_addr)).await;
                evidence = Some((
                    proxies_went_down(&before, &after, refused),
                    format!(
                        "{} links open before, {} after, {} closed; listeners {}",
                        before.connections_active,
                        after.connections_active,
                        after
                            .connections_closed
                            .saturating_sub(before.connections_closed),
                        if refused {
                            "refused a connection"
                        } else {
                            "still accepted a connection"
                        }
                    ),
                ));
                tokio::time::sleep(d.hold).await;
                for p in &self.proxies {
                    p.up().await?;
                }
                None
            }
            (None, Kind::LinkDown) => {
                let (Some(net), Some(i), Some(t)) = (&self.netns, d.target, target.as_deref())
                else {
                    anyhow::bail!("link_down needs --netns and a target");
                };
                net.set_link(i, false).await?;
                if !self.silence_detected(t, started_at, d.hold).await {
                    note = format!("not seen to take effect within {:?}", d.hold);
                }
                // Still down at the end of the hold, by the kernel's own account.
                let state = net.operstate(i)?;
                evidence = Some((
                    state == "down",
                    format!("host end operstate {state} at the end of the hold"),
                ));
                net.set_link(i, true).await?;
                None
            }
            (None, Kind::LinkCrawl) => {
                let (Some(net), Some(i), Some(rate)) = (&self.netns, d.target, d.rate_bps) else {
                    anyhow::bail!("link_crawl needs --netns, a target and a rate");
                };
                net.crawl(i, &format!("{rate}bit")).await?;
                tokio::time::sleep(d.hold).await;
                // A quiet moment of the worker's can pass within the bucket's first burst:
                // the filter stays on until it has held a packet back or dropped one (the
                // worker's heartbeats alone outpace it), at most MAX_HOLD in all.
                let end = tokio::time::Instant::now() + MAX_HOLD.saturating_sub(d.hold);
                // (Each look runs `tc` twice: a slower tick.)
                while tokio::time::Instant::now() < end && !net.crawl_stats(i).await?.fired() {
                    tokio::time::sleep(TICK * 10).await;
                }
                shape_stats = Some(net.uncrawl(i).await?);
                if shape_stats.is_some_and(|s| !s.fired()) {
                    note = format!("not seen to take effect within {MAX_HOLD:?}");
                }
                None
            }
            (None, kind @ (Kind::WorkerKill | Kind::WorkerStop)) => {
                if let Some(w) = d.target.and_then(|i| self.workers.get_mut(i)) {
                    let down = tokio::time::Instant::now();
                    evidence = Some(match kind {
                        Kind::WorkerKill => {
                            let tasks = w.pid().map(procs::task_procs).unwrap_or_default();
                            let status = w.kill().await;
                            outlived = Some(outlived_by(tasks, d.hold.max(TASKS_END_LIMIT)).await);
                            killed(status)
                        }
                        _ => stopped(w.stop().await),
                    });
                    tokio::time::sleep_until(down + d.hold).await;
                    w.start()?;
                }
                None
            }
            (None, Kind::Drain) => {
                let (Some(t), Some((asked, from))) = (target.as_deref(), drained_at) else {
                    anyhow::bail!("drain needs a target, drained first (System::drain)");
                };
                tokio::time::sleep(d.hold).await;
                // Still drained at the end of the hold, by the coordinator's own record.
                let w = self
                    .coordinator
                    .api
                    .get(&format!("/api/v1/workers/{t}"))
                    .await?;
                let leases = w["leases"].as_array().map_or(0, Vec::len);
                evidence = Some((
                    w["draining"] == true,
                    format!(
                        "its record said draining {} at the end of the hold, with {leases} leases",
                        w["draining"]
                    ),
                ));
                let until = Utc::now();
                let path = format!("/api/v1/workers/{t}/undrain");
                self.coordinator
                    .api
                    .post(&path, &serde_json::json!({}))
                    .await?;
                drained_between = Some((asked, from, until));
                None
            }
            (None, Kind::CoordinatorKill) => {
                evidence = Some(killed(self.coordinator.kill().await));
                tokio::time::sleep(d.hold).await;
                self.coordinator.restart().await?;
                None
            }
            (None, other) => anyhow::bail!("disruption {} has no fault", other.as_str()),
        };
        let removed_at = Utc::now();
        // Some damage shows only later (a garbled frame header can leave a reader waiting for
        // bytes that never come, until its liveness timeout): the fleet is not whole again
        // before the disruption has been noticed.
        if d.kind.cuts() || d.kind == Kind::Corrupt {
            let noticed = self
                .wait_noticed(d.kind, &affected, started_at, frames_before)
                .await;
            if !noticed && note.is_empty() {
                note = format!("not noticed within {MAX_HOLD:?}");
            }
        }
        let fleet_recovered = self.wait_whole().await;
        let frames = FrameCounters::rose(frames_before, frame_counters(self).await);
        let fired = match (&fault_stats, &shape_stats, &evidence) {
            // A lease loss's blackhole dropped bytes, and the lease moved; a slow close held a
            // FIN (`closes_delayed`), and the old link outlived the process.
            (Some(s), _, Some((shown, _))) => fired(s) && *shown,
            (Some(s), _, _) => fired(s),
            // The kernel's filter held packets back or dropped them.
            (None, Some(s), _) => s.fired(),
            // The process's exit status, the proxies' links and listeners, the link's state.
            (None, None, Some((shown, _))) => *shown,
            (None, None, None) => false,
        };
        Ok(Observation {
            index: d.index,
            kind: d.kind,
            target,
            affected,
            started_at,
            removed_at,
            fault_stats,
            shape_stats,
            fired,
            evidence: evidence.map(|(_, e)| e),
            frames,
            caught: Caught::default(),
            worker_detect_ms: BTreeMap::new(),
            worker_detect_dead: BTreeMap::new(),
            coordinator_detect_ms: BTreeMap::new(),
            recover_ms: BTreeMap::new(),
            detected: None,
            recovered: false,
            fleet_recovered,
            handback: None,
            outlived,
            drained_between,
            drained: None,
            note,
        })
    }

    /// Keeps a proxy fault in place: timed ones for their hold, the others until they fired
    /// (a blackhole: until both the worker and the coordinator declared the link dead;
    /// corruption: for [`CORRUPT_WINDOW`] and until [`CORRUPT_ENOUGH`] bytes changed).
    async fn hold(
        &self,
        d: &Disruption,
        guards: &[FaultGuard],
        target: Option<&str>,
        since: chrono::DateTime<Utc>,
    ) -> bool {
        let stats = || guards.iter().map(FaultGuard::stats).sum::<FaultStats>();
        match d.kind {
            Kind::Reset => until(d.hold, || stats().connections_reset > 0).await,
            Kind::LimitData => until(d.hold, || stats().connections_closed > 0).await,
            // On for a window that carries more than a heartbeat or two: results and checkpoints
            // go through it too, or `results_intact` would judge results nothing touched.
            Kind::Corrupt => {
                let begun = tokio::time::Instant::now();
                until(d.hold, || {
                    begun.elapsed() >= CORRUPT_WINDOW && stats().bytes_corrupted >= CORRUPT_ENOUGH
                })
                .await;
                stats().bytes_corrupted > 0
            }
            Kind::Blackhole => match target {
                Some(t) => self.silence_detected(t, since, d.hold).await,
                None => false,
            },
            _ => {
                tokio::time::sleep(d.hold).await;
                true
            }
        }
    }

    /// The tasks the coordinator lists `worker` holding a lease of now (none when it does not
    /// answer).
    async fn leases_of(&self, worker: &str) -> Vec<String> {
        let Ok(ws) = self.coordinator.api.get("/api/v1/workers").await else {
            return Vec::new();
        };
        ws.as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["worker_id"] == worker)
            .flat_map(|w| w["leases"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect()
    }

    /// Whether the coordinator lists `worker` in `state` now.
    async fn listed(&self, worker: &str, state: &str) -> bool {
        self.coordinator
            .api
            .get("/api/v1/workers")
            .await
            .ok()
            .and_then(|ws| {
                ws.as_array()?
                    .iter()
                    .find(|w| w["worker_id"] == worker)
                    .map(|w| w["state"] == state)
            })
            .unwrap_or(false)
    }

    /// Of `tasks`, the ones the coordinator lists with an attempt started on another worker
    /// than `worker` since `since`, or ended (what another attempt made of them).
    async fn moved_from(
        &self,
        worker: &str,
        tasks: &[String],
        since: DateTime<Utc>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for t in tasks {
            let Ok(v) = self
                .coordinator
                .api
                .get(&format!("/api/v1/tasks/{t}"))
                .await
            else {
                continue;
            };
            let elsewhere = v["attempts"].as_array().into_iter().flatten().any(|a| {
                a["worker"] != worker
                    && a["started_at"]
                        .as_str()
                        .and_then(|s| s.parse::<DateTime<Utc>>().ok())
                        .is_some_and(|at| at >= since)
            });
            if elsewhere {
                out.push(t.clone());
            }
        }
        out
    }

    /// A `lease_loss`'s hold (its blackhole in place): until both sides declared the link
    /// dead, the coordinator lists the worker lost, and one of the tasks it held started on
    /// another worker, all within `limit`. What it saw, and whether the lease moved: the
    /// coordinator took the worker for lost while its link was silent. A lease that moved to
    /// no other worker (none free) still counts: what comes back then is a result for a task
    /// that waits, queued.
    async fn lease_moved(
        &self,
        worker: Option<&str>,
        since: DateTime<Utc>,
        limit: Duration,
    ) -> (bool, String) {
        let Some(worker) = worker else {
            return (false, "no worker to cut off".into());
        };
        let end = tokio::time::Instant::now() + limit;
        let held = self.leases_of(worker).await;
        let left = || end.saturating_duration_since(tokio::time::Instant::now());
        let silent = self.silence_detected(worker, since, left()).await;
        let mut lost = false;
        while tokio::time::Instant::now() < end {
            if self.listed(worker, "lost").await {
                lost = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let lost_at = Utc::now();
        let mut moved = Vec::new();
        while lost && tokio::time::Instant::now() < end {
            moved = self.moved_from(worker, &held, since).await;
            if !moved.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let said = format!(
            "held {} lease(s) ({}); link declared dead by both sides: {silent}; listed lost: {}; \
             started on another worker before the link came back: {}",
            held.len(),
            held.join(", "),
            if lost {
                format!("after {} ms", (lost_at - since).num_milliseconds())
            } else {
                "no".to_owned()
            },
            if moved.is_empty() {
                "none".to_owned()
            } else {
                moved.join(", ")
            }
        );
        (silent && lost && !held.is_empty(), said)
    }

    /// A `slow_close`: with both FINs of worker `i`'s link held for `delay`, stops the worker
    /// gracefully, waits until the coordinator saw it go, starts it again at once (its new
    /// session opens beside the old link), and waits (`delay` and 5 s at most) until the old
    /// link closed. Fired when the worker exited 0 and its old link outlived its process by
    /// half the delay or more: a process that has exited holds no socket open, the held FIN
    /// does.
    async fn stop_through_slow_close(
        &mut self,
        i: usize,
        delay: Duration,
        since: DateTime<Utc>,
    ) -> anyhow::Result<(bool, String)> {
        let Some(id) = self.workers.get(i).map(|w| w.id.clone()) else {
            return Ok((false, "no worker to stop".into()));
        };
        let links = |sys: &System| -> Vec<u64> {
            sys.proxies
                .iter()
                .flat_map(Proxy::links)
                .filter(|l| l.worker.as_ref().is_some_and(|w| w.as_str() == id))
                .map(|l| l.id)
                .collect()
        };
        let old = links(self);
        let (graceful, how) = stopped(self.workers[i].stop().await);
        let exited = tokio::time::Instant::now();
        until(TARGET_WAIT, || self.watcher.detected(&id, since).is_some()).await;
        self.workers[i].start()?;
        let open = |sys: &System| links(sys).into_iter().filter(|l| old.contains(l)).count();
        let beside = open(self) > 0;
        until(delay + Duration::from_secs(5), || open(self) == 0).await;
        let outlived = exited.elapsed();
        let still = open(self);
        let fired = graceful && !old.is_empty() && still == 0 && outlived >= delay / 2;
        Ok((
            fired,
            format!(
                "{how}; its {} link(s) closed {} ms after it exited (FINs held {} ms){}{}",
                old.len(),
                outlived.as_millis(),
                delay.as_millis(),
                if beside {
                    "; it started again beside its old link"
                } else {
                    ""
                },
                if still > 0 {
                    format!("; {still} still open")
                } else {
                    String::new()
                }
            ),
        ))
    }

    /// Waits (at most `limit`) until both the worker's log and the coordinator's view show
    /// `worker`'s link declared dead since `since`.
    async fn silence_detected(
        &self,
        worker: &str,
        since: chrono::DateTime<Utc>,
        limit: Duration,
    ) -> bool {
        let events = self
            .workers
            .iter()
            .find(|w| w.id == worker)
            .map(|w| w.events.clone());
        until(limit, || {
            let worker_saw = events
                .as_deref()
                .is_some_and(|p| observe::lost_since(&observe::events_now(p), since));
            worker_saw && self.watcher.detected(worker, since).is_some()
        })
        .await
    }

    /// Waits (at most [`MAX_HOLD`]) until the disruption was noticed where it must be: the
    /// coordinator lost a killed worker; the corrupted worker lost its session or the
    /// coordinator counted undecodable frames; every other affected worker lost its session.
    async fn wait_noticed(
        &self,
        kind: Kind,
        affected: &[String],
        since: chrono::DateTime<Utc>,
        frames_before: Option<FrameCounters>,
    ) -> bool {
        let end = tokio::time::Instant::now() + MAX_HOLD;
        loop {
            let lost = |w: &String| {
                self.workers
                    .iter()
                    .find(|x| &x.id == w)
                    .is_some_and(|x| observe::lost_since(&observe::events_now(&x.events), since))
            };
            let noticed = match kind {
                Kind::WorkerKill | Kind::WorkerStop | Kind::SlowClose => affected
                    .iter()
                    .all(|w| self.watcher.detected(w, since).is_some()),
                Kind::Corrupt => {
                    affected.iter().any(lost)
                        || FrameCounters::rose(frames_before, frame_counters(self).await)
                            .is_some_and(|r| r.total() > 0)
                }
                _ => affected.iter().all(lost),
            };
            if noticed {
                return true;
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The proxies' counters, summed.
    pub fn proxy_stats(&self) -> ProxyStats {
        self.proxies.iter().map(Proxy::stats).sum()
    }

    /// Waits until every worker process is registered (its own log) and connected (the
    /// coordinator's view).
    pub async fn wait_whole(&mut self) -> bool {
        let end = tokio::time::Instant::now() + RECOVERY_TIMEOUT;
        loop {
            let logs_ok = self
                .workers
                .iter()
                .all(|w| observe::registered_now(&observe::events_now(&w.events)));
            let coord_ok = match self.coordinator.api.get("/api/v1/workers").await {
                Ok(v) => {
                    let list = v.as_array().cloned().unwrap_or_default();
                    self.workers.iter().all(|w| {
                        list.iter()
                            .any(|x| x["worker_id"] == w.id.as_str() && x["state"] == "connected")
                    })
                }
                Err(_) => false,
            };
            if logs_ok && coord_ok {
                return true;
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(active: u64, closed: u64) -> ProxyStats {
        ProxyStats {
            connections_active: active,
            connections_closed: closed,
            ..ProxyStats::default()
        }
    }

    #[test]
    fn the_proxies_went_down_only_if_every_open_link_closed_and_the_listeners_refuse() {
        assert!(proxies_went_down(&links(3, 5), &links(0, 8), true));
        // A listener still accepting, a link still open, links not closed, nothing to close.
        assert!(!proxies_went_down(&links(3, 5), &links(0, 8), false));
        assert!(!proxies_went_down(&links(3, 5), &links(1, 7), true));
        assert!(!proxies_went_down(&links(3, 5), &links(0, 7), true));
        assert!(!proxies_went_down(&links(0, 5), &links(0, 5), true));
    }

    /// A coordinator that did not answer before the fault gives no baseline: its counters
    /// afterwards (k > 0) do not make a detection, as a baseline of 0 would.
    #[test]
    fn an_unknown_baseline_of_frame_counters_shows_nothing() {
        let overview = |malformed: u64, macs: u64| {
            serde_json::json!({"counters": {
                "malformed_frames": malformed, "unknown_frames": 1, "mac_failures": macs,
                "auth_failures": 7
            }})
        };
        let after = FrameCounters::of(&overview(2, 5));
        assert_eq!(
            after,
            Some(FrameCounters {
                undecodable: 3,
                mac_failures: 5,
                auth_failures: 7
            })
        );
        assert_eq!(FrameCounters::rose(None, after), None);
        assert_eq!(FrameCounters::rose(after, None), None);
        let rose = FrameCounters::rose(FrameCounters::of(&overview(2, 1)), after);
        assert_eq!(rose.map(FrameCounters::total), Some(4));
        // An answer without the counters (another server, an error body) is no baseline.
        assert_eq!(
            FrameCounters::of(&serde_json::json!({"error": "busy"})),
            None
        );
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(1_800_000_000_000 + ms).expect("time")
    }

    fn ended(ms: i64, reason: &str, registered: bool) -> Record {
        let reason = reason.to_owned();
        Record {
            at: at(ms),
            worker: "w".into(),
            n: None,
            event: match registered {
                true => Event::SessionLost {
                    generation: 1,
                    reason,
                    dead: false,
                },
                false => Event::AttemptFailed {
                    generation: 1,
                    reason,
                },
            },
        }
    }

    fn tag_failed(ms: i64, failures: u32) -> Record {
        Record {
            at: at(ms),
            worker: "w".into(),
            n: None,
            event: Event::TagFailed {
                generation: 1,
                failures,
            },
        }
    }

    /// The failing end-to-end run: the coordinator's tag check met no damaged frame (the first
    /// flip ended the session at the worker, the rest fell on handshakes), while the worker's
    /// caught some; each end's catches count, the worker's one record a frame in the window,
    /// whether or not it ended a session.
    #[test]
    fn tags_caught_at_either_end_count_and_only_the_tags_catches_do() {
        let frames = |mac_failures, auth_failures| {
            Some(FrameCounters {
                undecodable: 5,
                mac_failures,
                auth_failures,
            })
        };
        let tagged = "3 frames from the coordinator failed their integrity tag";
        let logs = BTreeMap::from([
            (
                "w2".to_owned(),
                vec![
                    // Before the window: another disruption's.
                    tag_failed(-10, 1),
                    // Three that ended a session, and the session's end (no catch of its own).
                    tag_failed(390, 1),
                    tag_failed(395, 2),
                    tag_failed(399, 3),
                    ended(400, tagged, true),
                    ended(
                        500,
                        "closed by coordinator: 1007 text frame is not valid UTF-8",
                        false,
                    ),
                    ended(900, "no frame for 1500 ms: declared dead", false),
                    // The coordinator's catch as the worker heard of it: counted there.
                    ended(950, "coordinator dropped a frame: bad integrity tag", true),
                    // One that ended nothing.
                    tag_failed(1_000, 1),
                    // After the window: the next disruption's.
                    tag_failed(5_000, 1),
                ],
            ),
            ("w1".to_owned(), vec![ended(700, "connection closed", true)]),
        ]);
        let c = Caught::of(frames(0, 0), &logs, at(0), at(5_000));
        assert_eq!(c.coordinator_frames, Some(0));
        assert_eq!(c.coordinator_registrations, Some(0));
        assert_eq!(c.workers, BTreeMap::from([("w2".to_owned(), 4)]));
        assert_eq!(c.total, 4);
        assert_eq!(
            c.to_string(),
            "tags caught 4: coordinator frames 0, registrations 0; w2 frames 4"
        );
        // At the coordinator only: a worker frame, a registration; undecodable frames are no
        // tag's catch.
        let quiet =
            BTreeMap::from([("w1".to_owned(), vec![ended(700, "connection closed", true)])]);
        let c = Caught::of(frames(1, 2), &quiet, at(0), at(5_000));
        assert!(c.workers.is_empty() && c.total == 3, "{c:?}");
        // Nothing caught anywhere (tags off, or nothing flipped): nothing to count, and a
        // coordinator that did not answer adds nothing either.
        assert_eq!(Caught::of(frames(0, 0), &quiet, at(0), at(5_000)).total, 0);
        let c = Caught::of(None, &quiet, at(0), at(5_000));
        assert_eq!((c.coordinator_frames, c.total), (None, 0));
        assert_eq!(
            c.to_string(),
            "tags caught 0: coordinator frames ?, registrations ?"
        );
    }

    #[tokio::test]
    async fn a_closed_listener_refuses_and_an_open_one_does_not() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (open_addr, closed_addr) = (
            open.local_addr().expect("addr"),
            closed.local_addr().expect("addr"),
        );
        drop(closed);
        assert!(all_refuse([closed_addr]).await);
        assert!(!all_refuse([closed_addr, open_addr]).await);
    }
}
