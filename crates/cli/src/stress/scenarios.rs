//! The scenarios. Each starts a coordinator process and a fleet process, drives them, and fills
//! a [`Report`]; [`Run::finish`] stops both and judges lost and recorded-twice from the
//! database.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tether_faultproxy::{Direction, Fault, FaultKind};
use tether_proto::TaskSpec;
use tether_proto::auth::Secret;
use tokio::time::Instant;

use super::fleet::{Command, FleetReport, Status, WorkerRecord, now_us};
use super::procs::{
    CoordOpts, Coordinator, Exited, FaultProxy, Fleet, PROXY_STOP_WITHIN, TlsFiles,
};
use super::report::{self, Dist, Report};
use super::{Cut, Scenario, StressArgs, probe, rerun, truth};

/// Tasks per submission request.
const SUBMIT_CHUNK: usize = 5000;
/// How long registration and the end of all tasks may take at most.
const PHASE_LIMIT: Duration = Duration::from_secs(300);
/// How long a report may take to catch up with the status it follows (see
/// [`Run::settled_report`]).
const SETTLE_LIMIT: Duration = Duration::from_secs(5);
/// Workers a fault proxy carries at most: it holds two sockets for each, and the open-file
/// limit may be as low as 20,000 (this machine's, which the run cannot raise).
const WORKERS_PER_PROXY: u64 = 5_000;
/// Attempts of a stress task: crashes in steady_load and checkpoint_heavy may cost a few.
const MAX_ATTEMPTS: u32 = 10;
/// The simulated workers' first reconnect delay and its proportional jitter (the fleet is
/// started with them, so the run knows the least delay any of its attempts waited).
pub(super) const FLEET_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const FLEET_JITTER: f64 = 0.2;

/// One run: the processes, the HTTP client, the progress bar and the report.
struct Run {
    a: StressArgs,
    workers: u64,
    /// The coordinator's `--lost-after`.
    lost_after: Duration,
    coord: Coordinator,
    /// The fault proxies between the workers and the coordinator (`--cut` other than `kill`).
    proxies: Vec<FaultProxy>,
    fleet: Fleet,
    /// The fleet secret, when workers authenticate.
    secret: Option<Secret>,
    /// The probes' TLS client, when the coordinator serves TLS.
    probe_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    api: crate::client::Api,
    pb: ProgressBar,
    report: Report,
    submitted: HashSet<String>,
    /// thundering_herd: tasks whose results were acknowledged before the cut; judged on the
    /// store in `finish` (each completed once, from its one attempt).
    done_before_cut: HashSet<String>,
    started: Instant,
    /// checkpoint_heavy: the crash, whose tasks must resume from their checkpoints; judged on
    /// the store in `finish`.
    crash: Option<Crash>,
    /// checkpoint_heavy and mixed_priority: the span their rates are over, ended in `finish`
    /// by the store's last result.
    span: Option<Span>,
    /// mixed_priority: the ids of the tasks it submitted at priority 0; judged on the store in
    /// `finish`.
    high_priority: HashSet<String>,
    /// steady_load: the workers it drained under the load; judged on the store in `finish`.
    drains: Vec<Drained>,
}

/// A worker steady_load drained: when the coordinator's answer came, what the worker held
/// then, how long until the run saw it hold nothing (`None`: not within
/// [`Run::drained_idle_within`], or not yet), and whether the run stopped it since.
#[derive(Debug, Clone)]
struct Drained {
    worker: String,
    at: chrono::DateTime<chrono::Utc>,
    since: Instant,
    held: u64,
    idle_after: Option<Duration>,
    stopped: bool,
}

/// How often steady_load reads the workers it drained, until each holds no task: the
/// resolution of its drain-to-idle figure.
pub(super) const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Requests steady_load has in flight at once to drain workers or read the drained ones: a
/// fleet of 10,000 drains 500 a second with the default churn.
const DRAIN_REQUESTS_AT_ONCE: usize = 16;

/// How steady_load's workers leave, a way each churn tick in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaving {
    /// Drained through the API, then stopped gracefully once they hold no task: a rolling
    /// upgrade's way.
    Drained,
    /// Dropped: their tasks die with them.
    Crash,
    /// Stopped gracefully at once: they hand back what they hold.
    Shutdown,
}

impl Leaving {
    fn next(self) -> Self {
        match self {
            Leaving::Drained => Leaving::Crash,
            Leaving::Crash => Leaving::Shutdown,
            Leaving::Shutdown => Leaving::Drained,
        }
    }
}

/// A scenario's measured span: from just before the submission until the last result the
/// coordinator recorded (read from the store in [`Run::finish`]). The run saw that end later:
/// at the poll that saw every task end (up to 250 ms after it), and in checkpoint_heavy at
/// the end mark, after a fresh fleet status; rates over the time until then took in that
/// slack.
#[derive(Debug, Clone, Copy)]
struct Span {
    from: chrono::DateTime<chrono::Utc>,
    /// When the run saw every task end: checkpoint_heavy's end mark, to which the messages
    /// are counted; mixed_priority's poll that saw it.
    marked: chrono::DateTime<chrono::Utc>,
    tasks: u64,
    /// checkpoint_heavy: worker messages the coordinator handled from the first mark to the
    /// end mark.
    messages: Option<u64>,
}

impl Span {
    /// Seconds, tasks and worker messages per second from `from` until `last`, when the
    /// coordinator recorded the last result.
    fn rates(&self, last: chrono::DateTime<chrono::Utc>) -> (f64, f64, Option<f64>) {
        let seconds = (last - self.from)
            .to_std()
            .unwrap_or_default()
            .as_secs_f64()
            .max(1e-6);
        let per_s = |n: u64| n as f64 / seconds;
        (seconds, per_s(self.tasks), self.messages.map(per_s))
    }
}

/// A count of the coordinator's read with the moment it was read (the middle of the request).
#[derive(Debug, Clone, Copy)]
struct Count {
    at: Instant,
    n: u64,
}

impl Count {
    /// The count's growth from `earlier` per second between the two reads.
    fn per_s_since(&self, earlier: &Count) -> f64 {
        let seconds = self
            .at
            .saturating_duration_since(earlier.at)
            .as_secs_f64()
            .max(1e-6);
        self.n.saturating_sub(earlier.n) as f64 / seconds
    }
}

/// checkpoint_heavy's crash: what the coordinator held when it came and whom it stopped. The
/// attempts it interrupted are read from the store in [`Run::finish`]
/// ([`truth::Truth::crash_resumes`]).
struct Crash {
    /// The attempts running on the crashed workers, each of a task with a complete checkpoint
    /// the coordinator held while that attempt ran: listed before the crash, or after it (the
    /// crashed workers seen disconnected) while still leased to the same attempt. The worker
    /// was dead by then, so a checkpoint held then was written before it died. Each with the
    /// step owed, of the newest such checkpoint listed ([`owed_step`]), set by
    /// [`Crash::read_steps`].
    held: Vec<truth::Checkpointed>,
    /// The checkpoints listed of each of `held`, before the crash and after it (one if both
    /// named the same), newest first.
    checkpoints: Vec<Vec<Listed>>,
    /// Checkpoints of `held` whose bytes read back were not what their task wrote at any
    /// step: the coordinator holds them damaged.
    foreign: Vec<String>,
    /// Of `held`, those none of whose listed checkpoints could be read (each gone first) and
    /// none foreign: judged on resuming from any checkpoint.
    unread: u64,
    /// The ids of the workers crashed.
    workers: HashSet<String>,
    /// Taken after the listing before the crash and before the crash was sent.
    at: chrono::DateTime<chrono::Utc>,
    /// How long before the crash an attempt must have started to be owed a resume though no
    /// checkpoint of it was listed: long enough to have written one and had it taken.
    owed_after: Duration,
}

/// How long past its first step an attempt gets to have its first checkpoint taken by the
/// coordinator (sent, stored, listed): one started longer before a crash is owed a resume.
const CHECKPOINT_TAKEN_WITHIN: Duration = Duration::from_millis(500);

impl Crash {
    /// The crash of `workers` at `at`, from the coordinator's running tasks listed `before`
    /// it and `after` it; `owed_after`: see [`Crash::owed_after`].
    fn of(
        before: &[Running],
        after: &[Running],
        workers: HashSet<String>,
        at: chrono::DateTime<chrono::Utc>,
        owed_after: Duration,
    ) -> Self {
        let on_crashed = |r: &&Running| workers.contains(&r.lease.worker);
        // Every checkpoint listed of each lease, before the crash and after it: the newest is
        // the one owed, and a listing after the crash that names an older one than the
        // listing before (the coordinator rolled back) does not lower the bar.
        let mut listed: HashMap<&Lease, Vec<Listed>> = HashMap::new();
        for r in after.iter().chain(before).filter(on_crashed) {
            if let Some(c) = &r.checkpoint {
                let seen = listed.entry(&r.lease).or_default();
                if !seen.iter().any(|s| s.id == c.id) {
                    seen.push(c.clone());
                }
            }
        }
        let mut listed: Vec<(&Lease, Vec<Listed>)> = listed.into_iter().collect();
        listed.sort_by(|a, b| (&a.0.task, a.0.attempt).cmp(&(&b.0.task, b.0.attempt)));
        for (_, seen) in &mut listed {
            seen.sort_by_key(|c| std::cmp::Reverse(c.order()));
        }
        let held = listed
            .iter()
            .map(|(l, _)| truth::Checkpointed {
                task: l.task.clone(),
                attempt: l.attempt,
                worker: l.worker.clone(),
                step: None,
            })
            .collect();
        Self {
            held,
            checkpoints: listed.into_iter().map(|(_, seen)| seen).collect(),
            foreign: Vec::new(),
            unread: 0,
            workers,
            at,
            owed_after,
        }
    }

    /// Reads the step of each listed checkpoint from the first bytes the coordinator serves of
    /// it (the `steps` executor's: its step, then a word drawn from its task and step), and
    /// sets each held attempt's step owed ([`owed_step`]). One no longer there (superseded by
    /// a later attempt's, or the task ended) has no step; one whose bytes are not what its
    /// task wrote at that step is `foreign`.
    async fn read_steps(&mut self, api: &crate::client::Api) -> anyhow::Result<()> {
        let head = super::fleet::MIN_STEP_CHECKPOINT;
        let reads = self
            .held
            .iter()
            .zip(&self.checkpoints)
            .flat_map(|(h, seen)| seen.iter().map(move |c| (h, &c.id)))
            .map(|(h, c)| async move {
                let path = format!("/api/v1/tasks/{}/checkpoints/{c}", h.task);
                let mut body = match api.stream(&path, READ_STEP_WITHIN).await {
                    Ok(body) => body,
                    Err(e)
                        if e.downcast_ref::<crate::client::Refused>()
                            .is_some_and(|r| r.status == 404) =>
                    {
                        return Ok(None);
                    }
                    Err(e) => {
                        return Err(e.context(format!("reading checkpoint {c} of {}", h.task)));
                    }
                };
                let mut bytes = Vec::with_capacity(head);
                while bytes.len() < head {
                    match tokio::time::timeout(READ_STEP_WITHIN, body.next()).await {
                        Ok(Some(chunk)) => bytes
                            .extend_from_slice(&chunk.with_context(|| {
                                format!("reading checkpoint {c} of {}", h.task)
                            })?),
                        Ok(None) => break,
                        Err(_) => bail!("checkpoint {c} of {} stalled while read", h.task),
                    }
                }
                anyhow::Ok(Some(bytes))
            });
        let read: Vec<anyhow::Result<Option<Vec<u8>>>> = futures_util::stream::iter(reads)
            .buffered(READS_AT_ONCE)
            .collect()
            .await;
        // In the order read: each held attempt's checkpoints, newest first.
        let mut read = read.into_iter();
        for (h, seen) in self.held.iter_mut().zip(&self.checkpoints) {
            let mut steps = Vec::with_capacity(seen.len());
            let mut damaged = false;
            for c in seen {
                let Some(bytes) = read.next() else {
                    bail!("no read of checkpoint {} of {}", c.id, h.task);
                };
                let step = match bytes? {
                    None => None,
                    Some(bytes) => {
                        let step = step_of(&h.task, &bytes);
                        if step.is_none() {
                            damaged = true;
                            self.foreign.push(format!("{} of {}", c.id, h.task));
                        }
                        step
                    }
                };
                steps.push((c, step));
            }
            h.step = owed_step(&steps);
            self.unread += u64::from(h.step.is_none() && !damaged);
        }
        Ok(())
    }
}

/// The step a task must resume from after a crash, of the checkpoints listed of its attempt
/// before the crash and after it, each with its step as read (`None`: gone before it was
/// read, or not what its task wrote): the highest read, or one past it if a checkpoint
/// listed after that one ([`Listed::order`]) could not be read (it held a later step);
/// `None` if none could be read.
fn owed_step(steps: &[(&Listed, Option<u32>)]) -> Option<u32> {
    let (best, step) = steps
        .iter()
        .filter_map(|(c, step)| step.map(|s| (*c, s)))
        .max_by_key(|(_, s)| *s)?;
    let newer_unread = steps
        .iter()
        .any(|(c, s)| s.is_none() && c.order() > best.order());
    Some(if newer_unread {
        step.saturating_add(1)
    } else {
        step
    })
}

/// Longest wait for the coordinator to answer a read of a checkpoint, and for each piece of
/// its first bytes.
const READ_STEP_WITHIN: Duration = Duration::from_secs(30);
/// Checkpoints read at once after a crash.
const READS_AT_ONCE: usize = 16;

/// The step of a `steps` checkpoint of `task` that starts with `head`: its first four bytes,
/// if the word after them is the one its task drew at that step; `None` if not.
fn step_of(task: &str, head: &[u8]) -> Option<u32> {
    let n = super::fleet::MIN_STEP_CHECKPOINT;
    let step = u32::from_le_bytes(head.get(..4)?.try_into().ok()?);
    let own = super::fleet::step_checkpoint(task, step, n);
    (head.get(..n)? == own.as_slice()).then_some(step)
}

/// An attempt the coordinator lists running.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Lease {
    task: String,
    attempt: u64,
    worker: String,
}

/// An attempt the coordinator lists running, and the latest complete checkpoint of its task it
/// holds (`latest_checkpoint`, of this attempt or an earlier one).
#[derive(Debug, Clone)]
struct Running {
    lease: Lease,
    checkpoint: Option<Listed>,
}

/// A checkpoint the coordinator listed as a running task's latest.
#[derive(Debug, Clone, PartialEq)]
struct Listed {
    id: String,
    /// The attempt that wrote it.
    attempt: u64,
    created_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Listed {
    /// Of two checkpoints of one task, the later written has the greater order: a later
    /// attempt's, or the same attempt's made later.
    fn order(&self) -> (u64, Option<chrono::DateTime<chrono::Utc>>) {
        (self.attempt, self.created_at)
    }

    /// The `latest_checkpoint` of a task as the API lists it, if it has one.
    fn of(latest: &Value) -> Option<Self> {
        Some(Self {
            id: latest["checkpoint_id"].as_str()?.to_owned(),
            attempt: latest["attempt"].as_u64().unwrap_or(0),
            created_at: latest["created_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc)),
        })
    }
}

/// The `k` workers checkpoint_heavy crashes, of the `live` ones (oldest first): those running
/// a task with a checkpoint, then those running one without, then idle ones, each oldest
/// first. Crashing the oldest alone could crash only idle workers when there are fewer tasks
/// than workers (the coordinator leases in id order, not age), leaving nothing to resume.
fn crash_targets(running: &[Running], live: &[String], k: u64) -> Vec<String> {
    let mut rank: HashMap<&str, u8> = HashMap::new();
    for r in running {
        let of = if r.checkpoint.is_some() { 0 } else { 1 };
        let at = rank.entry(r.lease.worker.as_str()).or_insert(of);
        *at = (*at).min(of);
    }
    let mut order: Vec<(u8, usize, &String)> = live
        .iter()
        .enumerate()
        .map(|(i, w)| (rank.get(w.as_str()).copied().unwrap_or(2), i, w))
        .collect();
    order.sort();
    order
        .into_iter()
        .take(usize::try_from(k).unwrap_or(usize::MAX))
        .map(|(_, _, w)| w.clone())
        .collect()
}

pub async fn run(a: StressArgs) -> anyhow::Result<Report> {
    let deadline = a.deadline;
    let keep = a.keep;
    let before = super::machine::probe();
    // The work directory (database, logs) outlives the run unless it passed: a failed run's
    // logs are its evidence. Ctrl-c or SIGTERM ends the run (its processes are killed with it)
    // and removes the directory unless --keep.
    let work = tempfile::Builder::new()
        .prefix("tether-stress-")
        .tempdir()
        .context("creating a temporary directory")?
        .keep();
    let stop = crate::cancel_on_signal();
    let dir = work.clone();
    let body = async move {
        let mut run = Run::start(a, dir).await?;
        let scenario = run.a.scenario;
        let outcome = match scenario {
            Scenario::ThunderingHerd => thundering_herd(&mut run).await,
            Scenario::SteadyLoad => steady_load(&mut run).await,
            Scenario::MessageFlood => message_flood(&mut run).await,
            Scenario::CheckpointHeavy => checkpoint_heavy(&mut run).await,
            Scenario::MixedPriority => mixed_priority(&mut run).await,
        };
        if let Err(e) = outcome {
            run.pb.finish_and_clear();
            return Err(e.context(format!(
                "scenario {} failed; coordinator log: {}",
                scenario.name(),
                run.coord.log_path().display()
            )));
        }
        run.finish().await
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(deadline, body) => r
            .with_context(|| format!("the run exceeded --deadline {} s", deadline.as_secs()))
            .and_then(|r| r),
        () = stop.cancelled() => {
            if !keep {
                let _ = std::fs::remove_dir_all(&work);
            }
            return Err(anyhow::anyhow!("interrupted"));
        }
    };
    match &outcome {
        Ok(report) if report.passed() && !keep => {
            let _ = std::fs::remove_dir_all(&work);
        }
        _ => eprintln!(
            "kept the work directory {} (the database and the logs of the coordinator, the fleet and the proxies)",
            work.display()
        ),
    }
    let mut report = outcome?;
    report.machine_before = Some(before);
    report.machine_after = Some(super::machine::probe());
    Ok(report)
}

impl Run {
    async fn start(a: StressArgs, path: PathBuf) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the tether binary")?;
        let workers = a.fleet_size();
        let liveness = a.heartbeat_interval * 3;
        let lost_after = a.lost_after.unwrap_or(match a.scenario {
            Scenario::ThunderingHerd => Duration::from_secs(60),
            _ => Duration::from_secs(1),
        });
        let auth = a.auth || a.message_mac;
        let secret_file = path.join("fleet.secret");
        let secret = if auth {
            crate::cert::write_secret(&secret_file)?;
            Some(Secret::from_file(&secret_file)?)
        } else {
            None
        };
        let tls = if a.tls {
            let w = crate::cert::write(&crate::cert::CertArgs::local(path.join("tls")))
                .context("making the run's certificates")?;
            Some(TlsFiles {
                cert: w.cert,
                key: w.key,
                ca: w.ca,
            })
        } else {
            None
        };
        let coord = Coordinator::start(
            &exe,
            &path,
            CoordOpts {
                heartbeat_interval: a.heartbeat_interval,
                heartbeat_timeout: liveness,
                lost_after,
                secret_file: auth.then(|| secret_file.clone()),
                message_mac: a.message_mac,
                tls: tls.clone(),
                durability: a.durability,
                idle_coalesce: a.idle_coalesce,
                no_compression: a.no_compression,
            },
        )
        .await?;
        // Only thundering_herd cuts; each proxy is a process of its own, a hop the workers'
        // traffic takes, measured apart.
        let mut proxies = Vec::new();
        if a.scenario == Scenario::ThunderingHerd && a.cut.proxied() {
            for i in 0..workers.div_ceil(WORKERS_PER_PROXY) {
                let log = path.join(format!("proxy-{i}.log"));
                proxies.push(FaultProxy::spawn(&exe, &log, coord.addr).await?);
            }
        }
        let urls: Vec<String> = match proxies.is_empty() {
            true => vec![coord.url()],
            false => proxies.iter().map(|p| coord.url_at(p.listen)).collect(),
        };
        let slots = flood_slots(&a);
        let telemetry = match a.scenario {
            Scenario::MessageFlood => "1s",
            _ => "30s",
        };
        let d = |d: Duration| format!("{}ms", d.as_millis());
        let mut fleet_args: Vec<String> = urls
            .into_iter()
            .flat_map(|u| ["--coordinator".to_owned(), u])
            .collect();
        fleet_args.extend([
            "--slots".into(),
            slots.to_string(),
            "--source-addrs".into(),
            a.source_addrs.to_string(),
            "--heartbeat-interval".into(),
            d(a.heartbeat_interval),
            "--backoff-initial".into(),
            d(FLEET_BACKOFF_INITIAL),
            "--jitter".into(),
            FLEET_JITTER.to_string(),
            "--backoff-max".into(),
            d(a.max_reconnect_delay),
            "--telemetry-interval".into(),
            telemetry.into(),
        ]);
        if a.no_batching {
            fleet_args.push("--no-batching".into());
        }
        if a.no_compact_acks {
            fleet_args.push("--no-compact-acks".into());
        }
        if auth {
            fleet_args.push("--secret-file".into());
            fleet_args.push(secret_file.display().to_string());
        }
        if a.message_mac {
            fleet_args.push("--message-mac".into());
        }
        if let Some(every) = a.reset_every {
            fleet_args.push("--reset-every".into());
            fleet_args.push(d(every));
        }
        if let Some(t) = &tls {
            fleet_args.push("--ca-file".into());
            fleet_args.push(t.ca.display().to_string());
        }
        let fleet = Fleet::spawn(&exe, &path.join("fleet.log"), &fleet_args, a.fleet_nice)?;
        let pb = ProgressBar::new(workers);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(200));
        // The exact command line, so a figure can be reproduced.
        let command = std::iter::once("tether".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        let mut report = Report {
            scenario: a.scenario.name().into(),
            workers,
            command,
            durability: a.durability.as_str().into(),
            ..Report::default()
        };
        if let Some(w) = a.idle_coalesce.filter(|w| !w.is_zero()) {
            report.idle_coalesce_ms = Some(w.as_secs_f64() * 1e3);
            report.notes.push(format!(
                "the coordinator ran with idle coalescing of {} µs (--idle-coalesce): its threads \
                 wait that long before parking",
                w.as_micros()
            ));
        }
        if a.no_compression {
            report.notes.push(
                "the coordinator offered no compression (--no-compression): every frame went as text"
                    .into(),
            );
        }
        if a.fleet_nice > 0 {
            report.notes.push(format!(
                "the fleet ran at nice {}: it yields the CPU to the coordinator when both want it",
                a.fleet_nice
            ));
        }
        let api = coord.api()?;
        let probe_tls = match &tls {
            Some(t) => Some(
                tether_worker::connector::tls_client_config(Some(&t.ca))
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            None => None,
        };
        Ok(Self {
            probe_tls,
            a,
            workers,
            lost_after,
            coord,
            proxies,
            fleet,
            secret,
            api,
            pb,
            report,
            submitted: HashSet::new(),
            done_before_cut: HashSet::new(),
            started: Instant::now(),
            crash: None,
            span: None,
            high_priority: HashSet::new(),
            drains: Vec::new(),
        })
    }

    /// Drains `ids` through the API, each recorded with the moment its answer came.
    async fn drain(&mut self, ids: Vec<String>) -> anyhow::Result<()> {
        let api = &self.api;
        let drained: Vec<anyhow::Result<Drained>> = futures_util::stream::iter(ids)
            .map(|id| async move {
                let w = api
                    .post(&format!("/api/v1/workers/{id}/drain"), &json!({}))
                    .await
                    .with_context(|| format!("draining worker {id}"))?;
                Ok(Drained {
                    worker: id,
                    at: chrono::Utc::now(),
                    since: Instant::now(),
                    held: w["leases"].as_array().map_or(0, |l| l.len() as u64),
                    idle_after: None,
                    stopped: false,
                })
            })
            .buffered(DRAIN_REQUESTS_AT_ONCE)
            .collect()
            .await;
        for d in drained {
            self.drains.push(d?);
        }
        Ok(())
    }

    /// How long a drained worker has to hold no task (its noop tasks end within
    /// milliseconds): 10 s, and a reconnect's time when connections are reset on purpose (a
    /// worker away keeps its leases until it is back to report them).
    fn drained_idle_within(&self) -> Duration {
        Duration::from_secs(10)
            + self
                .a
                .reset_every
                .map_or(Duration::ZERO, |_| self.reconnects_within())
    }

    /// The drained workers not stopped yet: those still running what they held.
    fn draining(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.drains.len()).filter(|&i| !self.drains[i].stopped)
    }

    /// Reads each drained worker not yet stopped and stops those that hold no task, or have
    /// had [`Run::drained_idle_within`] to; gives whether any is left running.
    async fn stop_drained(&mut self) -> anyhow::Result<bool> {
        let pending: Vec<usize> = self.draining().collect();
        if pending.is_empty() {
            return Ok(false);
        }
        let within = self.drained_idle_within();
        let reads = pending.iter().map(|&i| {
            let path = format!("/api/v1/workers/{}", self.drains[i].worker);
            let api = &self.api;
            async move { api.get(&path).await }
        });
        let read: Vec<_> = futures_util::stream::iter(reads)
            .buffered(DRAIN_REQUESTS_AT_ONCE)
            .collect()
            .await;
        let mut stop = Vec::new();
        for (&i, w) in pending.iter().zip(read) {
            let d = &mut self.drains[i];
            let w = w.with_context(|| format!("reading drained worker {}", d.worker))?;
            if w["leases"].as_array().is_some_and(Vec::is_empty) {
                d.idle_after = Some(d.since.elapsed());
            } else if d.since.elapsed() < within {
                continue;
            }
            d.stopped = true;
            stop.push(d.worker.clone());
        }
        let left = pending.len() - stop.len();
        if !stop.is_empty() {
            self.fleet
                .send(&Command::Stop {
                    ids: stop,
                    abrupt: false,
                })
                .await?;
        }
        Ok(left > 0)
    }

    /// Cuts every worker off from the coordinator for `--outage` as `--cut` says; the times
    /// (µs since the epoch) the cut began and cleared on each path: one for each fault proxy
    /// (brought back one after another, each cleared when its own control call returned), by
    /// the index of the fleet's `--coordinator` URL through it, or one for all.
    async fn cut(&mut self) -> anyhow::Result<(u64, Vec<u64>)> {
        let outage = self.a.outage;
        let cut = self.a.cut;
        self.report.cut = Some(format!(
            "{} for {} ms: {}",
            cut.name(),
            outage.as_millis(),
            match cut {
                Cut::Kill =>
                    "the coordinator killed (SIGKILL), then restarted on its port and data",
                Cut::ProxyDown =>
                    "the workers' proxy down (every link cut, connections refused), then up",
                Cut::Reset =>
                    "a reset fault on every link of the workers' proxy (each connection reset as soon as made), then removed",
                Cut::Blackhole =>
                    "a blackhole on every link of the workers' proxy, both ways (live links' bytes swallowed, new connections held back as lost SYNs, nothing closed), then removed",
                Cut::Stall =>
                    "the coordinator stopped (SIGSTOP), then continued (SIGCONT): silent, nothing closed",
            }
        ));
        let start_us = now_us();
        let mut cleared = Vec::new();
        match cut {
            Cut::Kill => {
                self.phase("coordinator killed", 1);
                self.coord.kill().await?;
                tokio::time::sleep(outage).await;
                self.phase("coordinator restarting", 1);
                self.coord.spawn().await?;
            }
            Cut::Stall => {
                self.phase("coordinator stopped", 1);
                self.coord.signal(nix::sys::signal::Signal::SIGSTOP)?;
                tokio::time::sleep(outage).await;
                self.coord.signal(nix::sys::signal::Signal::SIGCONT)?;
            }
            Cut::ProxyDown => {
                self.phase("proxy down", 1);
                for p in &self.proxies {
                    p.set_down(true).await?;
                }
                tokio::time::sleep(outage).await;
                for p in &self.proxies {
                    p.set_down(false).await?;
                    cleared.push(now_us());
                }
            }
            Cut::Reset | Cut::Blackhole => {
                self.phase("every link faulted", 1);
                let kind = match cut {
                    Cut::Reset => FaultKind::Reset { timeout_ms: 0 },
                    _ => FaultKind::Blackhole,
                };
                let fault = Fault::new("stress-cut", kind, Direction::Both);
                for p in &self.proxies {
                    p.add_fault(&fault).await?;
                }
                tokio::time::sleep(outage).await;
                let mut stats = Vec::new();
                for p in &self.proxies {
                    stats.push(p.remove_fault(&fault.name).await?);
                    cleared.push(now_us());
                }
                self.report.cut_fault = Some(stats.into_iter().sum());
            }
        }
        if cleared.is_empty() {
            cleared.push(now_us());
        }
        Ok((start_us, cleared))
    }

    fn phase(&self, what: &str, len: u64) {
        self.pb.set_message(what.to_owned());
        self.pb.set_length(len);
        self.pb.set_position(0);
    }

    /// The fleet's report once every worker's record shows what `done` asks of it, or the last
    /// one read after [`SETTLE_LIMIT`] (the verdicts then name what is missing). The status
    /// counts a worker registered as soon as its agent is; its record is written by a task of
    /// its own, which on a busy machine runs a little later, so a report read at once could
    /// leave out the last workers to register: the slowest, whose times the figures need.
    async fn settled_report(
        &mut self,
        done: impl Fn(&WorkerRecord) -> bool,
    ) -> anyhow::Result<FleetReport> {
        let start = Instant::now();
        loop {
            let rep = self.fleet.report().await?;
            if rep.workers.iter().all(&done) || start.elapsed() > SETTLE_LIMIT {
                return Ok(rep);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a fleet status, moving the bar with `pos`.
    async fn wait_fleet(
        &mut self,
        what: &str,
        len: u64,
        pos: impl Fn(&Status) -> u64,
        done: impl Fn(&Status) -> bool,
    ) -> anyhow::Result<Status> {
        self.phase(what, len);
        let pb = self.pb.clone();
        self.fleet
            .wait(what, PHASE_LIMIT, |s| {
                pb.set_position(pos(s));
                done(s)
            })
            .await
    }

    async fn overview(&self) -> anyhow::Result<Value> {
        self.api.get("/api/v1/overview").await.context("overview")
    }

    /// Workers that left and workers that joined after the first `initial`, by the
    /// coordinator's count: known and not connected, known beyond the first `initial`. Waits
    /// up to [`SETTLE_LIMIT`] for `asked` of each (the last round's may still be closing or
    /// registering), then says what there is.
    ///
    /// With `--reset-every`, a worker whose connection was just reset is not connected either
    /// until it reconnects: there a worker has left when the coordinator's list shows it
    /// disconnected for longer than any reconnect takes ([`Run::reconnects_within`]), which
    /// one the fleet still runs never is.
    async fn churned(&self, initial: u64, asked: u64) -> anyhow::Result<(u64, u64)> {
        let hold = self.a.reset_every.map(|_| self.reconnects_within());
        let deadline = Instant::now() + SETTLE_LIMIT + hold.unwrap_or_default();
        loop {
            let o = self.overview().await?;
            let count = |k: &str| o[k].as_u64().unwrap_or(0);
            let known = count("workers_known");
            let joined = known.saturating_sub(initial);
            let left = match hold {
                None => known.saturating_sub(count("workers_connected")),
                Some(hold) => {
                    let workers = self.api.get("/api/v1/workers").await.context("workers")?;
                    gone_for(&workers, hold, chrono::Utc::now())
                }
            };
            if (left >= asked && joined >= asked) || Instant::now() > deadline {
                return Ok((left, joined));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Longer than any reconnect of a worker the fleet runs takes: its largest backoff delay
    /// with the jitter's 20 %, and a second for the attempt itself.
    fn reconnects_within(&self) -> Duration {
        self.a.max_reconnect_delay.mul_f64(1.2) + Duration::from_secs(1)
    }

    /// The workers the coordinator lists as connected, read until it lists `n` or
    /// [`SETTLE_LIMIT`] passed: its view, not the fleet's.
    async fn coordinator_connected(&self, n: u64) -> anyhow::Result<u64> {
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            let connected = self.overview().await?["workers_connected"]
                .as_u64()
                .unwrap_or(0);
            if connected == n || Instant::now() > deadline {
                return Ok(connected);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Several of the coordinator's counters, read together from one overview (so that their
    /// ratios are not skewed by what arrives between two reads).
    async fn counters<const N: usize>(&self, names: [&str; N]) -> anyhow::Result<[u64; N]> {
        let o = self.overview().await?;
        Ok(names.map(|name| o["counters"][name].as_u64().unwrap_or(0)))
    }

    /// The coordinator's counter `name`, with the moment it was read.
    async fn count(&self, name: &str) -> anyhow::Result<Count> {
        let asked = Instant::now();
        let [n] = self.counters([name]).await?;
        let answered = Instant::now();
        Ok(Count {
            at: asked + (answered - asked) / 2,
            n,
        })
    }

    /// The results the running coordinator stored a row of, by its counters
    /// ([`tether_coordinator::core::Counters::RESULT_ROWS`]), read until two reads 250 ms apart
    /// agree: the sessions' last frames are taken. Only once the fleet exited (`_fleet`), so
    /// that no worker sends one more.
    async fn settled_results(&self, _fleet: &Exited) -> anyhow::Result<u64> {
        let mut last = None;
        for _ in 0..40 {
            let said = self
                .counters(tether_coordinator::core::Counters::RESULT_ROWS)
                .await?
                .iter()
                .sum::<u64>();
            if last == Some(said) {
                return Ok(said);
            }
            last = Some(said);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("the coordinator's count of results recorded did not settle within 10 s")
    }

    /// The attempts the coordinator lists running, with whether it holds a complete
    /// checkpoint of each one's task. Paged by submission number, at most as many pages as
    /// the submitted tasks fill.
    async fn running(&self) -> anyhow::Result<Vec<Running>> {
        const PAGE: u64 = 100_000;
        let pages = (self.submitted.len() as u64).div_ceil(PAGE) + 1;
        let mut out = Vec::new();
        let mut path = format!("/api/v1/tasks?status=running&limit={PAGE}");
        for _ in 0..pages {
            let page = self.api.get(&path).await.context("listing running tasks")?;
            let tasks = page
                .as_array()
                .with_context(|| format!("the running tasks are not a list: {page}"))?;
            for t in tasks {
                let lease = &t["lease"];
                if let (Some(task), Some(attempt), Some(worker)) = (
                    t["task_id"].as_str(),
                    lease["attempt"].as_u64(),
                    lease["worker"].as_str(),
                ) {
                    out.push(Running {
                        lease: Lease {
                            task: task.to_owned(),
                            attempt,
                            worker: worker.to_owned(),
                        },
                        checkpoint: Listed::of(&t["latest_checkpoint"]),
                    });
                }
            }
            let last = tasks.last().and_then(|t| t["submit_seq"].as_u64());
            match last {
                Some(seq) if tasks.len() as u64 == PAGE => {
                    path = format!("/api/v1/tasks?status=running&limit={PAGE}&after_seq={seq}");
                }
                _ => return Ok(out),
            }
        }
        bail!("the running tasks filled more than {pages} pages of {PAGE}")
    }

    /// Waits until the coordinator lists none of `workers` connected, or [`SETTLE_LIMIT`]
    /// passed: once it saw their sessions end, it has taken every frame they sent.
    async fn disconnected(&self, workers: &HashSet<String>) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            let listed = self.api.get("/api/v1/workers").await.context("workers")?;
            let connected = listed.as_array().into_iter().flatten().any(|w| {
                w["state"].as_str() == Some("connected")
                    && w["worker_id"]
                        .as_str()
                        .is_some_and(|id| workers.contains(id))
            });
            if !connected || Instant::now() > deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits `specs`; every id the API returns is owed a result. Returns the ids.
    async fn submit(&mut self, specs: Vec<TaskSpec>) -> anyhow::Result<Vec<String>> {
        let mut all = Vec::with_capacity(specs.len());
        for chunk in specs.chunks(SUBMIT_CHUNK) {
            let v = self
                .api
                .post("/api/v1/tasks", &json!({ "tasks": chunk }))
                .await
                .context("submitting tasks")?;
            // Judged against what was sent, not what the API says it took: a short answer
            // would leave tasks no verdict looks at.
            let ids: Vec<&str> = v["task_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if ids.len() != chunk.len() {
                bail!(
                    "submitted {} tasks, the coordinator acknowledged {} ids: {v}",
                    chunk.len(),
                    ids.len()
                );
            }
            // Each id is owed its own result: one given twice would leave a task unjudged.
            for id in ids {
                if !self.submitted.insert(id.to_owned()) {
                    bail!("the coordinator gave task id {id} to two submitted tasks");
                }
                all.push(id.to_owned());
            }
        }
        self.report.tasks = self.submitted.len() as u64;
        Ok(all)
    }

    /// Waits until every submitted task is terminal in the coordinator.
    async fn wait_all_terminal(&mut self) -> anyhow::Result<()> {
        let total = self.submitted.len() as u64;
        let ended = ["completed", "failed", "cancelled", "timed_out"];
        self.wait_tasks(total, "tasks finishing", &ended, "ended")
            .await
    }

    /// Waits until the coordinator counts `n` tasks completed.
    async fn wait_completed(&mut self, n: u64, what: &'static str) -> anyhow::Result<()> {
        self.wait_tasks(n, what, &["completed"], "completed").await
    }

    /// Waits, showing `what`, until the coordinator's overview counts `n` tasks in `statuses`
    /// (`done_as` says what they did, in the error of a wait past [`PHASE_LIMIT`]).
    async fn wait_tasks(
        &mut self,
        n: u64,
        what: &'static str,
        statuses: &[&str],
        done_as: &str,
    ) -> anyhow::Result<()> {
        self.phase(what, n);
        let deadline = Instant::now() + PHASE_LIMIT;
        loop {
            let o = self.overview().await?;
            let t = &o["tasks"];
            let done: u64 = statuses.iter().map(|k| t[*k].as_u64().unwrap_or(0)).sum();
            self.pb.set_position(done);
            if done >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {done} of {n} tasks {done_as} within {} s",
                    PHASE_LIMIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Starts `n` workers and waits until all live workers are registered.
    async fn start_workers(&mut self, n: u64) -> anyhow::Result<()> {
        let status = self.fleet.status.clone();
        let start = Command::Start { count: count(n)? };
        let target = live_after_start(&status, n, self.fleet.send(&start)).await?;
        // Connections reset on purpose are never all up at once: each registered once will do.
        let resetting = self.a.reset_every.is_some();
        self.wait_fleet(
            "workers registering",
            target,
            move |s| if resetting { s.registered } else { s.connected },
            move |s| {
                s.live == target
                    && if resetting {
                        s.registered == target
                    } else {
                        s.connected == target
                    }
            },
        )
        .await?;
        Ok(())
    }

    /// Stops both processes, reads the ground truth and adds the common verdicts.
    ///
    /// The fleet goes first, and what the coordinator counted of the workers' results is read
    /// after it exited, with its last status: results still arrive while the workers stop (a
    /// worker reconnecting to hand back work not yet acknowledged), and counts read before
    /// would miss them, so that the stored rows could outnumber what the coordinator said.
    /// What only a live fleet can give (its niceness, its workers' records) is read before;
    /// the fleet's and the proxies' CPU and peak RSS are their whole lives', read from the
    /// kernel once each exited (the proxies are stopped after the fleet).
    async fn finish(mut self) -> anyhow::Result<Report> {
        self.phase("stopping", 1);
        let fleet = self.fleet.sample()?;
        self.report.fleet_nice = Some(fleet.nice);
        // Every worker's record before they all stop: whom the run stopped, and when each was
        // away, by which the tasks that ran more than once are judged.
        let records = self.fleet.report().await?;
        let exited = self.fleet.exit().await?;
        if !self.proxies.is_empty() {
            let (mut cpu_s, mut peak_rss_kib, mut killed) = (0.0, 0, 0);
            for p in &mut self.proxies {
                let end = p.stop(PROXY_STOP_WITHIN).await?;
                cpu_s += end.usage.cpu_s;
                peak_rss_kib += end.usage.peak_rss_kib;
                killed += u32::from(end.killed);
            }
            self.report.proxy_cpu_s = Some(cpu_s);
            self.report.proxy_peak_rss_kib = Some(peak_rss_kib);
            if killed > 0 {
                self.report.notes.push(format!(
                    "{killed} of {} fault proxies did not exit within {} s of a SIGTERM and \
                     were killed; their CPU and peak RSS are to their kill",
                    self.proxies.len(),
                    PROXY_STOP_WITHIN.as_secs()
                ));
            }
        }
        // What the coordinator saw, not what was asked for: registrations that authenticated,
        // sessions whose frames carried tags, and the scheme every connection of the run used.
        let [authenticated, tagged, zin, zout] = self
            .counters([
                "auth_ok",
                "mac_sessions",
                "compressed_in_frames",
                "compressed_out_frames",
            ])
            .await?;
        self.report.mac_sessions = Some(tagged);
        // Of the coordinator running last: a restart counts afresh.
        self.report.compressed_frames = Some(zin + zout);
        self.report.security = format!(
            "{}; {}",
            match (authenticated, tagged) {
                (_, 1..) => "authenticated, frames tagged (HMAC-SHA256)",
                (1.., 0) => "authenticated (HMAC challenge-response)",
                (0, 0) => "no authentication",
            },
            if self.coord.url().starts_with("wss://") {
                "TLS"
            } else {
                "no TLS"
            }
        );
        // What the coordinator running now said it recorded (`recorded` or `stale`), once the
        // results in flight were taken (every task has ended, every worker stopped): each is
        // one row it stored.
        let said = self.settled_results(&exited).await?;
        let [duplicate, checkpoint_duplicate] = self
            .counters(["results_duplicate", "checkpoint_messages_duplicate"])
            .await?;
        self.report.results_duplicate = Some(duplicate);
        self.report.checkpoint_messages_duplicate = Some(checkpoint_duplicate);
        if let Some(every) = self.a.reset_every {
            reset_verdict(&mut self.report, &records, every, duplicate);
        }
        self.coord.sample()?;
        self.coord.stop().await?;
        let t = truth::read(
            &self.coord.db_path(),
            &self.submitted,
            self.coord.spawned_at,
        )?;
        let r = &mut self.report;
        r.elapsed_s = self.started.elapsed().as_secs_f64();
        r.coordinator_cpu_s = self.coord.sample()?.cpu_s.max(r.coordinator_cpu_s);
        r.coordinator_peak_rss_kib = self.coord.peak_rss_kib;
        r.lost = t.lost;
        r.recorded_twice = t.recorded_twice;
        r.stale_results = t.stale;
        // Over no task at all, "none lost" would hold vacuously.
        r.verdict(
            "lost",
            t.lost == 0 && !self.submitted.is_empty(),
            match self.submitted.len() {
                0 => "no task was submitted: nothing to check".to_owned(),
                n => format!(
                    "{} of {n} acknowledged tasks without a counted result",
                    t.lost
                ),
            },
        );
        // Two counted results for one task, or one result recorded twice: answered `recorded`
        // again (a resend after a lost ack, or after a restart), which stores no second row
        // (the store keys results by task and attempt) but counts and reports it twice.
        r.verdict(
            "recorded twice",
            t.recorded_twice == 0 && said == t.stored_since,
            format!(
                "{} tasks with more than one counted result; the coordinator running last said \
                 {said} results recorded (or kept uncounted) and stored {}, and answered {duplicate} sent \
                 again duplicate",
                t.recorded_twice, t.stored_since
            ),
        );
        if let Some(span) = &self.span {
            span_rates(r, span, t.last_result_at);
        }
        if let Some(crash) = &self.crash {
            // The store's word: the counted results whose execution says it resumed.
            r.resumed_from_checkpoint = Some(t.resumed);
            crash_verdict(r, &t, crash);
        }
        // A silent cut is noticed by each side at its own liveness timeout: the coordinator
        // may have counted a worker away up to a heartbeat longer than the worker did.
        let slack = match (self.a.scenario, self.a.cut) {
            (Scenario::ThunderingHerd, Cut::Blackhole) => rerun::SLACK + self.a.heartbeat_interval,
            _ => rerun::SLACK,
        };
        let judge = rerun::Judge::new(&records, self.lost_after, slack);
        rerun::verdict(r, &t, &self.submitted, &judge);
        if !self.done_before_cut.is_empty() {
            let unsettled = t.unsettled(&self.done_before_cut);
            r.verdict(
                "results acknowledged before the cut kept: each of those tasks completed once, from its one attempt",
                unsettled.is_empty(),
                match unsettled.first() {
                    None => format!("{} tasks done before the cut", self.done_before_cut.len()),
                    Some(first) => format!(
                        "{} of {} not: first {first}",
                        unsettled.len(),
                        self.done_before_cut.len()
                    ),
                },
            );
        }
        r.failed = t.failed;
        r.verdict(
            "none failed",
            t.failed == 0,
            format!(
                "{} of {} tasks ended failed (each runs a trivial executor: none should)",
                t.failed,
                self.submitted.len()
            ),
        );
        // Unknown (not the last counts it printed) when the fleet never printed its last
        // status.
        r.fleet_last_counts(&exited, self.a.reset_every);
        // Off Linux, the sample before the exit.
        fleet_end(r, &exited, fleet.cpu_s);
        if self.a.scenario == Scenario::MixedPriority {
            mixed_priority_verdicts(r, &t, &self.submitted, &self.high_priority);
        }
        if !self.drains.is_empty() {
            let drained: HashMap<String, chrono::DateTime<chrono::Utc>> = self
                .drains
                .iter()
                .map(|d| (d.worker.clone(), d.at))
                .collect();
            let after = t.started_after_drain(&drained);
            r.verdict(
                "drained workers took no task",
                after.is_empty(),
                match after.first() {
                    None => format!(
                        "the store holds no attempt leased to any of the {} drained workers after its drain's answer",
                        drained.len()
                    ),
                    Some(first) => format!(
                        "{} attempts leased to drained workers after the drain: first {first}",
                        after.len()
                    ),
                },
            );
        }
        r.notes.push(format!(
            "open-file limit {}; workers connect from {} source addresses",
            super::open_file_limit(),
            self.a.source_addrs
        ));
        self.pb.finish_and_clear();
        Ok(self.report)
    }
}

/// The fleet's CPU and peak RSS to its exit (or its kill), `sampled_cpu_s` when the kernel
/// gave none, the workers it aborted at its exit, and the verdicts on its exit. A fleet killed
/// for not exiting within [`super::procs::FLEET_EXIT_WITHIN`] of the exit command held a
/// worker that did not stop (it stops its workers within [`super::fleet::EXIT_DRAIN`] and
/// then aborts those left); one that exited with a failure (an exit code, a signal) or
/// without printing its last status did not stop as told either; one that aborted workers
/// did not stop them. Each fails the run; its figures are reported all the same, those only
/// its last status gives missing when it never printed it.
pub(super) fn fleet_end(r: &mut Report, exited: &Exited, sampled_cpu_s: f64) {
    r.fleet_cpu_s = exited.usage.map_or(sampled_cpu_s, |u| u.cpu_s);
    r.fleet_peak_rss_kib = exited.usage.map(|u| u.peak_rss_kib);
    r.fleet_workers_aborted = exited.stopped.then_some(exited.status.aborted);
    let last = if exited.stopped {
        "it printed its last status first"
    } else {
        "it never printed its last status, so its workers did not stop; its counts are the \
         last it printed before"
    };
    let (passed, detail) = match (exited.killed_after, exited.exit_status) {
        (Some(after), _) => (
            false,
            format!(
                "the fleet process did not exit within {} s of the exit command and was \
                 killed (its CPU and peak RSS are to its kill): {}",
                after.as_secs_f64(),
                if exited.stopped {
                    "it printed its last status, every worker stopped or aborted, then hung"
                } else {
                    last
                }
            ),
        ),
        (None, Some(s)) if !s.success() => (
            false,
            format!(
                "the fleet process ended with {s} after the exit command (its CPU and peak \
                 RSS are to its end): {last}"
            ),
        ),
        (None, _) if !exited.stopped => (
            false,
            "the fleet process exited cleanly but with no last status: it never printed the \
             status it prints once its workers stopped, so their stopping is unaccounted for; \
             its counts are the last it printed before"
                .to_owned(),
        ),
        (None, _) => (
            true,
            "the fleet process exited by itself after its workers stopped".to_owned(),
        ),
    };
    r.verdict("the fleet stopped when told", passed, detail);
    let (passed, detail) = match r.fleet_workers_aborted {
        Some(0) => (
            true,
            format!(
                "every worker stopped within {} s of the exit command",
                super::fleet::EXIT_DRAIN.as_secs()
            ),
        ),
        Some(n) => (
            false,
            format!(
                "{n} of {} workers did not stop within {} s of the exit command and were \
                 aborted",
                exited.status.started,
                super::fleet::EXIT_DRAIN.as_secs()
            ),
        ),
        None => (
            false,
            "unknown: the fleet never printed its last status, which counts the workers it \
             aborted"
                .to_owned(),
        ),
    };
    r.verdict("every worker stopped when told", passed, detail);
}

/// checkpoint_heavy's and mixed_priority's rates over `span`, ended by `last`: when the
/// coordinator recorded the last counted result (none: no rates).
fn span_rates(r: &mut Report, span: &Span, last: Option<chrono::DateTime<chrono::Utc>>) {
    let Some(last) = last else {
        r.notes.push("no result recorded: no rates".to_owned());
        return;
    };
    let (seconds, tasks_per_s, messages_per_s) = span.rates(last);
    r.tasks_per_s = Some(tasks_per_s);
    r.messages_per_s = messages_per_s;
    let tail = (span.marked - last)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64();
    let tasks = span.tasks;
    r.notes.push(match messages_per_s {
        Some(_) => format!(
            "tasks and worker messages per second: over the {seconds:.2} s from just before the submission to the last result the coordinator recorded; the messages are counted until the end mark, {tail:.2} s after that result (after it only heartbeats flow)"
        ),
        None => format!(
            "tasks per second: the {tasks} tasks over the {seconds:.2} s from just before the submission to the last result the coordinator recorded; the poll that saw every task ended came {tail:.2} s after it"
        ),
    });
}

/// checkpoint_heavy's verdict on the store: every task whose attempt the crash interrupted
/// (running on a crashed worker at the crash, by the store) that had a complete checkpoint
/// the coordinator held (listed before the crash or after it), or that had run long enough to
/// write one ([`Crash::owed_after`]), resumed from the newest listed or a later one, or from
/// any if none was listed (see [`truth::Truth::crash_resumes`]). Only attempts interrupted
/// too soon after their start to have checkpointed, with none listed, are let off, and the
/// detail counts them. With no task owed a resume there is nothing to judge, and the verdict
/// fails rather than pass on nothing; so it does if a checkpoint listed read back as not what
/// its task wrote.
fn crash_verdict(r: &mut Report, t: &truth::Truth, crash: &Crash) {
    let c = t.crash_resumes(&crash.held, &crash.workers, crash.at, crash.owed_after);
    let crashed = crash.workers.len();
    let interrupted = c.interrupted;
    let owed_ms = crash.owed_after.as_millis();
    let mut more = match c.too_young {
        0 => String::new(),
        n => format!(
            "; {n} of the {interrupted} interrupted had run under {owed_ms} ms, too short to have a checkpoint taken, and none was listed: not judged"
        ),
    };
    if c.unlisted > 0 {
        more.push_str(&format!(
            "; {} had run {owed_ms} ms or longer with no checkpoint listed: judged on resuming from any",
            c.unlisted
        ));
    }
    let unread = crash.unread;
    if unread > 0 {
        more.push_str(&format!(
            "; {unread} whose listed checkpoints were gone before a step was read: judged on resuming from any"
        ));
    }
    if let Some(first) = crash.foreign.first() {
        more.push_str(&format!(
            "; {} checkpoints held read back as not what their task wrote, first {first}",
            crash.foreign.len()
        ));
    }
    r.verdict(
        "crashed workers' tasks resumed from the latest checkpoint held",
        c.judged > 0 && c.not_resumed.is_empty() && crash.foreign.is_empty(),
        match (c.judged, c.not_resumed.first()) {
            (0, _) => format!(
                "nothing to judge: none of the {interrupted} tasks the {crashed} crashed workers were running had a checkpoint listed or had run {owed_ms} ms{more}"
            ),
            (n, None) => format!(
                "{n} tasks running on the {crashed} crashed workers, owed a resume, each resumed from the newest checkpoint listed or a later one (of {interrupted} interrupted){more}"
            ),
            (n, Some(first)) => format!(
                "{} of {n} tasks running on the {crashed} crashed workers, owed a resume, did not resume from the newest checkpoint listed: first {first}{more}",
                c.not_resumed.len()
            ),
        },
    );
}

/// Slack on a reset's latest moment: its session is woken then, but on a busy shard may run a
/// little later, and the reset is counted when it runs.
const RESET_SLACK: Duration = Duration::from_millis(500);

/// `--reset-every`: every worker that lived long enough to be reset was, by its own count in
/// the fleet's report. A connection is reset at a moment drawn between 0.5 and 1.5 times
/// `every` after it was made, so a worker still live 1.5 x `every` (and [`RESET_SLACK`]) after
/// its first registration (later than its connection was made) has seen its first connection
/// reset, unless that connection ended sooner for another reason, which these scenarios do not
/// cause. A worker stopped (churn, a crash) or registered too late for that is not judged: a
/// fleet-wide total compared with the number of workers passed when some workers were reset
/// twice and others never.
fn reset_verdict(r: &mut Report, rep: &FleetReport, every: Duration, duplicate: u64) {
    let long_enough = every.mul_f64(1.5) + RESET_SLACK;
    let long_enough_us = long_enough.as_micros() as u64;
    let judged: Vec<&WorkerRecord> = rep
        .workers
        .iter()
        .filter(|w| {
            let end = match w.stopped_us {
                0 => rep.at_us,
                stopped => stopped,
            };
            w.sessions
                .first()
                .is_some_and(|s| end.saturating_sub(s.registered_us) >= long_enough_us)
        })
        .collect();
    let missed: Vec<&str> = judged
        .iter()
        .filter(|w| w.resets == 0)
        .map(|w| w.id.as_str())
        .collect();
    let resets = rep.status.resets;
    let per_worker = resets as f64 / rep.workers.len().max(1) as f64;
    r.verdict(
        "connections reset: every worker that lived long enough was",
        !judged.is_empty() && missed.is_empty(),
        format!(
            "{} of {} workers live at least {} ms after registering (each connection is reset 0.5 to 1.5 x {} ms after it was made) saw a reset{}; the fleet reset {resets} connections, {per_worker:.1} a worker of {}; the coordinator answered {duplicate} results sent again duplicate",
            judged.len() - missed.len(),
            judged.len(),
            long_enough.as_millis(),
            every.as_millis(),
            match missed.first() {
                Some(first) => format!(", first not {first}"),
                None => String::new(),
            },
            rep.workers.len(),
        ),
    );
}

/// The live workers a start of `n` is done at: those live before `send` (the start command)
/// is sent, and `n`. Read after it, a status already counting the new workers (the fleet
/// prints one every 200 ms, and may have started them by then) would count them twice, and
/// the wait for a number of live workers the fleet never reaches would run out.
async fn live_after_start(
    status: &tokio::sync::watch::Receiver<Status>,
    n: u64,
    send: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<u64> {
    let live = status.borrow().live;
    send.await?;
    Ok(live + n)
}

/// Workers in a fleet command, which counts them in 32 bits: `check` bounds `--workers` well
/// within, so more is a bug, said rather than cut to its low bits.
fn count(n: u64) -> anyhow::Result<u32> {
    u32::try_from(n).with_context(|| format!("{n} workers do not fit in a fleet command"))
}

/// Milliseconds from `from_us` to `us` (µs since the epoch): negative when `us` came first. A
/// worker back before the run stamped the cut's clearing on its path (the stamp is taken when
/// the control call returns, or the restarted coordinator first answers the run) reads below
/// 0, not 0: a floor would hide how far off the stamp was.
fn ms(us: u64, from_us: u64) -> f64 {
    (i128::from(us) - i128::from(from_us)) as f64 / 1000.0
}

fn spec(kind: &str, config: Value, priority: u8) -> TaskSpec {
    let mut s = TaskSpec::new(kind, config);
    s.priority = priority;
    s.max_attempts = Some(MAX_ATTEMPTS);
    s
}

/// All workers start at once; idle window (CPU, memory); tasks running; every worker is cut
/// off for `--outage` as `--cut` says (by default the coordinator is killed and restarts on
/// the same port and data); all re-register.
async fn thundering_herd(run: &mut Run) -> anyhow::Result<()> {
    let n = run.workers;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = run.coord.sample()?;
    let t0 = now_us();
    run.start_workers(n).await?;
    let reg = run.settled_report(|w| !w.sessions.is_empty()).await?;
    registration_figures(&mut run.report, &reg, n, t0);
    // Idle: heartbeats (and, in a window longer than the telemetry's first period, telemetry).
    run.phase("idle window", run.a.idle.as_secs());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Each end of the window is one mark: the frames counted and the CPU used are of the same
    // span, the one they are divided by.
    let m0 = run.mark().await?;
    while m0.at.elapsed() < run.a.idle {
        let left = run.a.idle.saturating_sub(m0.at.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(500))).await;
        run.pb.set_position(m0.at.elapsed().as_secs());
    }
    let m1 = run.mark().await?;
    let after = run.coord.sample()?;
    let w = Window::between(&m0, &m1);
    let idle_pct = w.coordinator_cpu_pct;
    let per_worker = after.rss_kib.saturating_sub(baseline.rss_kib) as f64 / n as f64;
    // What the idle figure is made of: the frames of the window, so that it can be read
    // against the transport's floor at the same rate (docs/PERFORMANCE.md, fifteenth round).
    let per_frame = w.coordinator_us_per_frame;
    let r = &mut run.report;
    r.idle_cpu_pct = Some(idle_pct);
    r.memory_per_worker_kib = Some(per_worker);
    r.idle_frames_per_s = Some(w.frames_per_s);
    r.idle_us_per_frame = Some(per_frame);
    // CPU time is read from /proc in clock ticks of 10 ms: a few ticks measure nothing.
    let ticks = (w.coordinator_cpu_s * 100.0).round() as u64;
    let coarse = match ticks {
        0..10 => format!("; only {ticks} clock ticks of 10 ms: too few to measure"),
        _ => String::new(),
    };
    r.target(
        "idle CPU with 10,000 heartbeating workers under 5 % of one core",
        n >= 10_000,
        idle_pct < 5.0,
        format!(
            "{idle_pct:.2} % with {n} workers, heartbeat every {} ms ({:.0} frames/s, {per_frame:.1} µs of CPU each{coarse})",
            run.a.heartbeat_interval.as_millis(),
            w.frames_per_s,
        ),
    );
    r.target(
        "at most 8 KiB of coordinator memory per idle connected worker",
        n >= 1_000,
        per_worker <= 8.0,
        format!(
            "{per_worker:.2} KiB (RSS {} KiB before the workers, {} KiB with them)",
            baseline.rss_kib, after.rss_kib
        ),
    );
    // Tasks done before the outage: their results acknowledged, each must survive it.
    let tasks = run.a.tasks.unwrap_or((n / 10).max(1));
    let early = (tasks / 2).max(1);
    let specs = (0..early)
        .map(|_| spec("steps", json!({"steps": 1, "step_ms": 10, "size": 16}), 5))
        .collect();
    let done = run.submit(specs).await?;
    run.wait_completed(early, "tasks done before the cut")
        .await?;
    run.done_before_cut = done.into_iter().collect();
    // Tasks in flight across the outage.
    let specs = (0..tasks)
        .map(|_| spec("steps", json!({"steps": 6, "step_ms": 500, "size": 16}), 5))
        .collect();
    let ran = run.fleet.now().executions;
    run.submit(specs).await?;
    run.wait_fleet(
        "tasks starting",
        tasks,
        move |s| s.executions.saturating_sub(ran),
        move |s| s.executions >= ran + tasks,
    )
    .await?;
    let registrations_before = run.fleet.now().registrations;
    let (cut_us, cleared_us) = run.cut().await?;
    let target = registrations_before + n;
    run.wait_fleet(
        "workers re-registering",
        n,
        move |s| s.registrations.saturating_sub(registrations_before),
        move |s| s.registrations >= target && s.connected == n,
    )
    .await?;
    let listed = run.coordinator_connected(n).await?;
    let rep = run
        .settled_report(|w| w.sessions.iter().any(|s| s.registered_us > cut_us))
        .await?;
    let (mut after_ready, mut beyond_delay, mut attempt) = (Vec::new(), Vec::new(), Vec::new());
    // Every attempt after the cut started a backoff delay after the one before (or after the
    // session's end), the delays growing from the fleet's first: at least this first. A worker
    // holding leased work caps its delays at a quarter of the coordinator's grace (9bd99c9),
    // under --max-reconnect-delay when --lost-after is short: which workers held work is not
    // recorded, so every worker is allowed the shorter cap.
    let cap = run
        .a
        .max_reconnect_delay
        .min(run.lost_after / tether_worker::GRACE_SHARE);
    let schedule = Schedule {
        first: FLEET_BACKOFF_INITIAL.min(cap),
        cap,
        jitter: FLEET_JITTER,
    };
    let least_delay_us = schedule.least(1).as_micros() as u64;
    let (mut attempts, mut storming) = (Vec::new(), Vec::new());
    for w in &rep.workers {
        let Some(c) = Comeback::of(w, cut_us, &cleared_us, &schedule) else {
            continue;
        };
        after_ready.push(c.after_ready_ms);
        beyond_delay.push(c.beyond_delay_ms);
        attempt.push(c.attempt_ms);
        if let Some((made, allowed)) = c.paced {
            attempts.push(made as f64);
            if made > allowed {
                storming.push(format!("{} ({made} attempts, {allowed} allowed)", w.id));
            }
        }
    }
    run.report.reconnect_attempts = Dist::of(attempts);
    run.report.verdict(
        "no reconnect storm: each worker's attempts after the cut paced by its backoff",
        run.report.reconnect_attempts.is_some() && storming.is_empty(),
        match (storming.first(), run.report.reconnect_attempts) {
            (Some(first), _) => format!("{} workers over, first {first}", storming.len()),
            (None, Some(d)) => format!(
                "attempts a worker made to come back: p50 {:.0}, max {:.0} (each after a delay of at least {} ms, doubling up to {} ms less the jitter)",
                d.p50,
                d.max,
                least_delay_us / 1000,
                schedule.least(u32::MAX).as_millis()
            ),
            (None, None) => "no worker came back".into(),
        },
    );
    let window = run.a.max_reconnect_delay.as_secs_f64() * 1000.0 * 1.2;
    let r = &mut run.report;
    r.reconnect_window_ms = Some(window);
    r.reregistered_before_cleared = Some(after_ready.iter().filter(|&&v| v < 0.0).count() as u64);
    r.reconnect_after_ready_ms = Dist::of(after_ready);
    r.reconnect_beyond_delay_ms = Dist::of(beyond_delay);
    r.reconnect_attempt_ms = Dist::of(attempt);
    r.verdict(
        "every worker re-registered",
        r.reconnect_after_ready_ms.map(|d| d.count as u64) == Some(n) && listed == n,
        format!(
            "{} of {n}; the coordinator lists {listed} connected",
            r.reconnect_after_ready_ms.map(|d| d.count).unwrap_or(0)
        ),
    );
    if let (Some(d), Some(b), Some(a)) = (
        r.reconnect_after_ready_ms,
        r.reconnect_beyond_delay_ms,
        r.reconnect_attempt_ms,
    ) {
        r.target(
            "all re-registered within 1 s of the coordinator being ready (the cut cleared on its path) plus the jitter window",
            n >= 10_000,
            d.max <= 1000.0 + window,
            format!("last after {:.0} ms; window {window:.0} ms", d.max),
        );
        r.target(
            "reconnect p95 within what was left of its backoff delay when the cut cleared, plus 100 ms",
            true,
            b.p95 <= 100.0,
            format!(
                "p95 of (re-registered, less the later of the cut clearing on its path and the end of the backoff delay current then) {:.1} ms",
                b.p95
            ),
        );
        r.target(
            "the successful attempt itself within 100 ms, p95",
            true,
            a.p95 <= 100.0,
            format!(
                "p95 {:.1} ms from the attempt's start (after its backoff delay) to registered",
                a.p95
            ),
        );
    }
    run.wait_all_terminal().await
}

/// thundering_herd's registration figures from the fleet's report after a simultaneous start
/// at `t0_us` of `n` workers: the time each took to register, and connects per second until
/// the last. They are of the workers whose first registration is in the report; the report is
/// given up on after [`SETTLE_LIMIT`], and those missing then are likely the slowest, so
/// figures of the others alone would look faster than the run was: a verdict fails unless
/// every worker's registration is recorded, the registration target is not met without them,
/// and the connects per second counts only the recorded ones.
fn registration_figures(r: &mut Report, reg: &FleetReport, n: u64, t0_us: u64) {
    let firsts: Vec<f64> = reg
        .workers
        .iter()
        .filter_map(|w| {
            w.sessions
                .first()
                .map(|s| ms(s.registered_us, w.started_us))
        })
        .collect();
    let recorded = firsts.len() as u64;
    let all_in = ms(
        reg.workers
            .iter()
            .filter_map(|w| w.sessions.first().map(|s| s.registered_us))
            .max()
            .unwrap_or(t0_us),
        t0_us,
    );
    let complete = recorded == n;
    r.time_to_register_ms = Dist::of(firsts);
    r.connects_per_s = Some(recorded as f64 / (all_in / 1000.0).max(1e-3));
    let partial = match complete {
        true => String::new(),
        false => format!(" (of the {recorded} of {n} whose registration was recorded)"),
    };
    r.verdict(
        "every worker's first registration recorded",
        complete,
        format!(
            "{recorded} of {n} workers' first registrations in the fleet's report{}",
            match complete {
                true => "",
                false => ": the registration figures are of those only, and miss the slowest",
            }
        ),
    );
    if let Some(d) = r.time_to_register_ms {
        r.target(
            "10,000 registered from a simultaneous start in under 2 s",
            n >= 10_000,
            complete && d.max < 2000.0,
            format!(
                "{n} workers, last registered after {:.0} ms{partial}",
                d.max
            ),
        );
    }
}

/// How many workers of a `/api/v1/workers` list are not connected and were last disconnected
/// at least `hold` before `now`.
fn gone_for(workers: &Value, hold: Duration, now: chrono::DateTime<chrono::Utc>) -> u64 {
    let hold = chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::MAX);
    let gone = |w: &&Value| {
        let since = w["disconnected_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        w["state"].as_str() != Some("connected")
            && since.is_some_and(|t| now.signed_duration_since(t) >= hold)
    };
    workers
        .as_array()
        .map_or(0, |ws| ws.iter().filter(gone).count() as u64)
}

/// Trivial tasks flow for `--duration` while workers leave and join: each second in turn the
/// oldest are drained (and stopped once they hold nothing), crash, or shut down.
async fn steady_load(run: &mut Run) -> anyhow::Result<()> {
    let n = run.workers;
    run.start_workers(n).await?;
    let duration = run.a.duration.unwrap_or(Duration::from_secs(10));
    let slots = u64::from(run.a.slots.unwrap_or(4));
    // Keep enough queued that no worker waits for a submission, no more.
    let cap = (n * slots * 50).max(1000);
    let chunk = cap.min(SUBMIT_CHUNK as u64);
    run.phase("tasks flowing", duration.as_secs());
    let c0 = run.coord.sample()?.cpu_s;
    // The tasks done are the coordinator's counted results, counted while the load is steady:
    // the backlog still queued when the submissions end drains at a falling rate (the last
    // tasks leave workers idle), and the wait for it ends on a poll.
    let done0 = run.count("results_recorded").await?;
    let t0 = Instant::now();
    let mut churn = tokio::time::interval(Duration::from_secs(1));
    churn.tick().await;
    let mut leaving = Leaving::Drained;
    // Drained workers not yet stopped are read every DRAIN_POLL.
    let mut read_at = Instant::now();
    let mut replaced = 0u64;
    let per_churn = ((n as f64 * run.a.churn).ceil() as u64).min(n);
    // Bounded by time and by count: at 20,000 tasks a second the bound on the tasks a run holds
    // comes after 50 s, and --duration may ask for years.
    while t0.elapsed() < duration && (run.submitted.len() as u64) < super::MAX_TASKS {
        let done = run.fleet.now().completed;
        let more = steady_chunk(run.submitted.len() as u64, done, cap, chunk);
        if more > 0 {
            let specs = (0..more).map(|_| spec("noop", Value::Null, 5)).collect();
            run.submit(specs).await?;
        }
        tokio::select! {
            _ = churn.tick(), if per_churn > 0 => {
                // The oldest, those drained and still running their tasks left out.
                let draining: HashSet<String> =
                    run.draining().map(|i| run.drains[i].worker.clone()).collect();
                let ids = run.fleet.roster.oldest(per_churn as usize, &draining);
                match leaving {
                    Leaving::Drained => run.drain(ids).await?,
                    Leaving::Crash | Leaving::Shutdown => {
                        let abrupt = leaving == Leaving::Crash;
                        run.fleet.send(&Command::Stop { ids, abrupt }).await?;
                    }
                }
                run.fleet.send(&Command::Start { count: count(per_churn)? }).await?;
                leaving = leaving.next();
                replaced += per_churn;
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        if read_at.elapsed() >= DRAIN_POLL {
            read_at = Instant::now();
            run.stop_drained().await?;
        }
        run.pb.set_position(t0.elapsed().as_secs());
    }
    let done1 = run.count("results_recorded").await?;
    let submitted_in_window = run.submitted.len();
    let window = t0.elapsed();
    if window < duration {
        run.report.notes.push(format!(
            "the submissions ended after {:.1} s of the {} s --duration asked, at {submitted_in_window} tasks: the most a run holds",
            window.as_secs_f64(),
            duration.as_secs()
        ));
    }
    // Those drained last: each stopped once it holds nothing (or its time ran out).
    while run.stop_drained().await? {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    run.wait_all_terminal().await?;
    let c1 = run.coord.sample()?.cpu_s;
    let (left, joined) = run.churned(n, replaced).await?;
    let r = &mut run.report;
    r.coordinator_us_per_task = Some((c1 - c0) * 1e6 / submitted_in_window.max(1) as f64);
    let tps = done1.per_s_since(&done0);
    r.tasks_per_s = Some(tps);
    let done = done1.n.saturating_sub(done0.n);
    r.notes.push(format!(
        "tasks per second: the {done} results the coordinator recorded during the {:.1} s of submissions, over that time; the {} tasks still queued or running at its end drained after it, uncounted. Coordinator µs per task: its CPU from the first submission until every task ended, over all {submitted_in_window} tasks",
        done1.at.saturating_duration_since(done0.at).as_secs_f64(),
        (submitted_in_window as u64).saturating_sub(done),
    ));
    // Replaced: a worker gone from the coordinator, and a new one registered in its place.
    r.workers_replaced = Some(left.min(joined));
    if per_churn > 0 {
        // A run asked to churn that did not measured a steady load without it.
        r.verdict(
            "workers left and joined as --churn asked",
            left >= replaced && joined >= replaced,
            format!(
                "by the coordinator's count {left} left and {joined} joined; {replaced} of each asked"
            ),
        );
    }
    r.notes.push(format!(
        "every second {per_churn} workers left (in turn drained then stopped once idle, crashing, and shutting down) and as many joined; {slots} slots per worker"
    ));
    r.target(
        "at least 20,000 trivial tasks per second end to end with 100 workers",
        n == 100,
        tps >= 20_000.0,
        format!("{tps:.0} tasks/s with {n} workers"),
    );
    let within = run.drained_idle_within();
    drain_figures(&mut run.report, &run.drains, within);
    Ok(())
}

/// steady_load's figures and verdict on its drains: how many, how long from each drain's
/// answer until its worker held no task, and whether each did within `within` (a drained
/// worker runs what it holds to its end, and takes nothing new).
fn drain_figures(r: &mut Report, drains: &[Drained], within: Duration) {
    if drains.is_empty() {
        return;
    }
    r.drained_workers = Some(drains.len() as u64);
    let idle: Vec<f64> = drains
        .iter()
        .filter_map(|d| d.idle_after)
        .map(|t| t.as_secs_f64() * 1000.0)
        .collect();
    r.drain_to_idle_ms = Dist::of(idle);
    let held: u64 = drains.iter().map(|d| d.held).sum();
    let stuck: Vec<&str> = drains
        .iter()
        .filter(|d| d.idle_after.is_none())
        .map(|d| d.worker.as_str())
        .collect();
    r.verdict(
        "drained workers ran what they held to its end",
        stuck.is_empty(),
        match stuck.first() {
            None => format!(
                "each of the {} drained held no task within {} s of its drain (they held {held} when drained); read every {} ms",
                drains.len(),
                within.as_secs(),
                DRAIN_POLL.as_millis()
            ),
            Some(first) => format!(
                "{} of {} drained still held tasks {} s after the drain: first {first}",
                stuck.len(),
                drains.len(),
                within.as_secs()
            ),
        },
    );
}

/// How many tasks steady_load submits next, `submitted` so far and `done` of them: a `chunk`
/// while fewer than `cap` wait or run (enough queued that no worker waits for a submission,
/// no more), never past [`super::MAX_TASKS`] in all. Every task's spec is built and its id
/// kept to judge it, so a long `--duration` bounded by time alone would grow the run's memory
/// without end.
fn steady_chunk(submitted: u64, done: u64, cap: u64, chunk: u64) -> u64 {
    if submitted.saturating_sub(done) >= cap {
        return 0;
    }
    chunk.min(super::MAX_TASKS.saturating_sub(submitted))
}

/// Slots per worker: `--slots`, else 4 in steady_load, 8 in message_flood, 1 otherwise.
pub(super) fn flood_slots(a: &StressArgs) -> u32 {
    a.slots.unwrap_or(match a.scenario {
        Scenario::SteadyLoad => 4,
        Scenario::MessageFlood => 8,
        _ => 1,
    })
}

/// Every worker runs one task per slot; together they report state at `--rate` per second
/// per worker with `--size` bytes, each task at its own pace (or the worker's tasks in step,
/// `--in-step`); probes measure the round trip of acknowledged messages meanwhile.
async fn message_flood(run: &mut Run) -> anyhow::Result<()> {
    let n = run.workers;
    run.start_workers(n).await?;
    let duration = run.a.duration.unwrap_or(Duration::from_secs(10));
    let flood_ms = (duration + Duration::from_secs(3)).as_millis() as u64;
    let slots = u64::from(flood_slots(&run.a).max(1));
    let per_task = run.a.rate as f64 / slots as f64;
    let cfg =
        json!({"rate": per_task, "size": run.a.size, "ms": flood_ms, "in_step": run.a.in_step});
    let tasks = n * slots;
    run.submit((0..tasks).map(|_| spec("flood", cfg.clone(), 5)).collect())
        .await?;
    run.wait_fleet(
        "floods starting",
        tasks,
        |s| s.executions,
        move |s| s.executions >= tasks,
    )
    .await?;
    let before = run.fleet.report().await?;
    let m0 = run.mark().await?;
    let t0 = m0.at;
    run.phase("flooding", duration.as_secs());
    let probes = tokio::spawn(probe::run(
        run.coord.url(),
        run.a.probes,
        run.a.probe_rate,
        run.secret.clone(),
        run.probe_tls.clone(),
        t0 + duration,
    ));
    while t0.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        run.pb.set_position(t0.elapsed().as_secs());
    }
    let m1 = run.mark().await?;
    let after = run.fleet.report().await?;
    let lat = probes.await.context("probes")??;
    let w = Window::between(&m0, &m1);
    let r = &mut run.report;
    let mps = w.messages_per_s;
    r.coordinator_us_per_message = Some(w.coordinator_us_per_message);
    r.fleet_us_per_message = Some(w.fleet_us_per_message);
    r.messages_per_s = Some(mps);
    r.offered_per_s = Some(w.offered_per_s);
    r.messages_per_frame = Some(w.messages_per_frame);
    r.compact_acked_share = Some(w.compact_acked_share);
    r.message_latency_ms = Dist::of(lat);
    let waits = window_waits(&before, &after);
    r.send_window_waits = Some(waits.iter().sum());
    r.workers_window_waited = Some(waits.iter().filter(|w| **w > 0).count() as u64);
    r.send_rate_kb_s = Dist::of(
        after
            .workers
            .iter()
            .map(|w| w.send_bytes_per_sec as f64 / 1e3)
            .collect(),
    );
    // At a rate asked of the fleet below the target's, the target is out of reach by design.
    let asked = n as f64 * run.a.rate as f64;
    r.target(
        "at least 200,000 worker messages per second",
        n >= 1_000 && asked >= report::TOP_RATE,
        mps >= report::TOP_RATE,
        format!(
            "{mps:.0} messages/s handled ({} offered per second by {n} workers at {} /s each)",
            r.offered_per_s.unwrap_or(0.0) as u64,
            run.a.rate
        ),
    );
    if let Some(d) = r.message_latency_ms {
        r.target(
            "p99 latency under 10 ms (at half the top rate)",
            n >= 1_000 && report::at_half_rate(mps, d.p99),
            d.p99 < 10.0,
            format!("p99 {:.2} ms at {mps:.0} messages/s", d.p99),
        );
    }
    r.notes.push(format!(
        "{slots} flood tasks per worker at {per_task:.1} updates/s each, {}; updates of one task coalesce in the worker's outbox while unsent; {} probes x {} msgs/s time telemetry from when it is due (a stall delays the probes behind it and counts for each) to its ack, behind the commits before it",
        match run.a.in_step {
            true => "a worker's tasks in step (late ticks skipped)",
            false => "each at its own pace",
        },
        run.a.probes, run.a.probe_rate
    ));
    run.wait_all_terminal().await
}

/// Each worker's waits for its send window between two fleet reports (by worker id: a
/// worker started between them counts from 0).
fn window_waits(before: &FleetReport, after: &FleetReport) -> Vec<u64> {
    let earlier: HashMap<&str, u64> = before
        .workers
        .iter()
        .map(|w| (w.id.as_str(), w.send_window_full))
        .collect();
    after
        .workers
        .iter()
        .map(|w| {
            let from = earlier.get(w.id.as_str()).copied().unwrap_or(0);
            w.send_window_full.saturating_sub(from)
        })
        .collect()
}

/// One end of a measured window (message_flood's flood, thundering_herd's idle window,
/// checkpoint_heavy's run): the coordinator's counters, the fleet's count of updates offered
/// and both processes' CPU, with the instant they were read. The figures are counts over
/// time, so each end's counts, CPU and instant must be taken together: counters read before a
/// slow step (a report of every worker) and the instant after it covered more than the time
/// they were divided by, and counters read on either side of the CPU samples divided the CPU
/// of one span by the frames of another.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The middle of the counters' request: they were read at some moment within it.
    at: Instant,
    messages: u64,
    frames: u64,
    compact_acked: u64,
    offered: u64,
    coordinator_cpu_s: f64,
    fleet_cpu_s: f64,
}

impl Run {
    /// Reads a [`Mark`]. The fleet prints its status every
    /// [`super::fleet::STATUS_EVERY`]: the mark waits for a fresh one, so that its count of
    /// updates offered is of the same moment as the coordinator's counters, not up to a
    /// status period older.
    async fn mark(&mut self) -> anyhow::Result<Mark> {
        self.fleet.status.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(5), self.fleet.status.changed())
            .await
            .context("the fleet printed no status within 5 s")?
            .context("the fleet process ended")?;
        let offered = self.fleet.now().flood_sent;
        let asked = Instant::now();
        let [messages, frames, compact_acked] = self
            .counters(["messages_in", "frames_in", "compact_acked"])
            .await?;
        let answered = Instant::now();
        let coordinator_cpu_s = self.coord.sample()?.cpu_s;
        let fleet_cpu_s = self.fleet.cpu_s()?;
        Ok(Mark {
            at: asked + (answered - asked) / 2,
            messages,
            frames,
            compact_acked,
            offered,
            coordinator_cpu_s,
            fleet_cpu_s,
        })
    }
}

/// The figures over the window between two [`Mark`]s: each a count (or CPU time) between
/// them over the time between them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    seconds: f64,
    messages_per_s: f64,
    frames_per_s: f64,
    offered_per_s: f64,
    messages_per_frame: f64,
    compact_acked_share: f64,
    /// The coordinator's CPU time in the window.
    coordinator_cpu_s: f64,
    /// Of one core.
    coordinator_cpu_pct: f64,
    coordinator_us_per_message: f64,
    coordinator_us_per_frame: f64,
    fleet_us_per_message: f64,
}

impl Window {
    fn between(m0: &Mark, m1: &Mark) -> Self {
        let seconds = m1
            .at
            .saturating_duration_since(m0.at)
            .as_secs_f64()
            .max(1e-6);
        let messages = m1.messages.saturating_sub(m0.messages);
        let frames = m1.frames.saturating_sub(m0.frames);
        let per_message = messages.max(1) as f64;
        let coordinator_cpu_s = m1.coordinator_cpu_s - m0.coordinator_cpu_s;
        Self {
            seconds,
            messages_per_s: messages as f64 / seconds,
            frames_per_s: frames as f64 / seconds,
            offered_per_s: m1.offered.saturating_sub(m0.offered) as f64 / seconds,
            messages_per_frame: messages as f64 / frames.max(1) as f64,
            compact_acked_share: m1.compact_acked.saturating_sub(m0.compact_acked) as f64
                / per_message,
            coordinator_cpu_s,
            coordinator_cpu_pct: coordinator_cpu_s / seconds * 100.0,
            coordinator_us_per_message: coordinator_cpu_s * 1e6 / per_message,
            coordinator_us_per_frame: coordinator_cpu_s * 1e6 / frames.max(1) as f64,
            fleet_us_per_message: (m1.fleet_cpu_s - m0.fleet_cpu_s) * 1e6 / per_message,
        }
    }
}

/// Long tasks checkpoint every step; halfway, a quarter of the workers crash (those running
/// tasks first); their tasks are requeued after the grace period and resumed from the latest
/// checkpoint elsewhere.
async fn checkpoint_heavy(run: &mut Run) -> anyhow::Result<()> {
    let n = run.workers;
    run.start_workers(n).await?;
    let tasks = run.a.tasks.unwrap_or(n);
    let duration = run.a.duration.unwrap_or(Duration::from_secs(6));
    let step_ms = 100u64;
    let steps = (duration.as_millis() as u64 / step_ms).max(2);
    let size = run.a.checkpoint_size;
    let cfg = json!({"steps": steps, "step_ms": step_ms, "size": size});
    // Each end of the window is one mark: the messages counted are of the span they are
    // divided by.
    let m0 = run.mark().await?;
    let from = chrono::Utc::now();
    run.submit((0..tasks).map(|_| spec("steps", cfg.clone(), 5)).collect())
        .await?;
    let first = tasks.min(n);
    run.wait_fleet(
        "tasks starting",
        first,
        |s| s.executions,
        move |s| s.executions >= first,
    )
    .await?;
    tokio::time::sleep(duration / 2).await;
    let crash = (n / 4).max(1);
    run.phase("workers crashing", 1);
    // The crash falls on workers running tasks first: with fewer tasks than workers, the
    // oldest may run none.
    let live: Vec<String> = run.fleet.roster.live().cloned().collect();
    let before = run.running().await?;
    let targets = crash_targets(&before, &live, crash);
    let at = chrono::Utc::now();
    let at_us = now_us();
    run.fleet
        .send(&Command::Stop {
            ids: targets,
            abrupt: true,
        })
        .await?;
    // The fleet takes its commands in order: the report follows the crash.
    let workers: HashSet<String> = run
        .fleet
        .report()
        .await?
        .workers
        .into_iter()
        .filter(|w| w.stopped_us >= at_us)
        .map(|w| w.id)
        .collect();
    // Listed again once the coordinator saw the crashed workers go (and so took all they
    // sent): a task whose first checkpoint came after the listing before the crash, and
    // before it, is judged too. The crashed attempts stay leased until `--lost-after`.
    run.disconnected(&workers).await?;
    let after = run.running().await?;
    let owed_after = Duration::from_millis(step_ms) + CHECKPOINT_TAKEN_WITHIN;
    let mut crashed = Crash::of(&before, &after, workers, at, owed_after);
    // At once: the crashed attempts' tasks are requeued `--lost-after` after they went, and
    // a checkpoint is superseded once its task's next attempt wrote a few more.
    crashed.read_steps(&run.api).await?;
    run.crash = Some(crashed);
    run.fleet
        .send(&Command::Start {
            count: count(crash)?,
        })
        .await?;
    run.wait_all_terminal().await?;
    let m1 = run.mark().await?;
    // The rates are set in `finish`, over the span to the last result the store records.
    run.span = Some(Span {
        from,
        marked: chrono::Utc::now(),
        tasks,
        messages: Some(m1.messages.saturating_sub(m0.messages)),
    });
    let s = run.fleet.now();
    let r = &mut run.report;
    r.checkpoints = Some(s.checkpoints);
    damage_verdict(r, &s);
    r.notes.push(format!(
        "{tasks} tasks of {steps} steps x {step_ms} ms, a checkpoint of {size} bytes after every step; {crash} workers crashed halfway and as many joined"
    ));
    Ok(())
}

/// checkpoint_heavy's verdict on the checkpoints its tasks resumed from, by the fleet's count:
/// each was what its step wrote. A crash was injected, so some task must have resumed: with
/// none, nothing was checked, and the verdict fails rather than pass on nothing.
fn damage_verdict(r: &mut Report, s: &Status) {
    r.verdict(
        "every checkpoint resumed from was what its step wrote",
        s.damaged == 0 && s.resumed > 0,
        match s.resumed {
            0 => "no execution resumed from a checkpoint after the crash: nothing to check".into(),
            n => format!("{} damaged of {n} resumed", s.damaged),
        },
    );
}

/// A backlog of low-priority tasks, then high-priority ones: none may wait behind a low one.
async fn mixed_priority(run: &mut Run) -> anyhow::Result<()> {
    let n = run.workers;
    run.start_workers(n).await?;
    let low = run.a.tasks.unwrap_or(20_000);
    let high = (low / 100).max(1);
    let cfg = json!({"ms": 20, "steps": 1, "report": false});
    let from = chrono::Utc::now();
    run.submit((0..low).map(|_| spec("sleep", cfg.clone(), 9)).collect())
        .await?;
    let started = n.min(low);
    run.wait_fleet(
        "backlog running",
        started,
        |s| s.executions,
        move |s| s.executions >= started,
    )
    .await?;
    let ids = run
        .submit((0..high).map(|_| spec("sleep", cfg.clone(), 0)).collect())
        .await?;
    run.high_priority = ids.into_iter().collect();
    run.wait_all_terminal().await?;
    // The rate is set in `finish`, over the span to the last result the store records: the
    // poll that saw every task end came up to 250 ms after it.
    run.span = Some(Span {
        from,
        marked: chrono::Utc::now(),
        tasks: low + high,
        messages: None,
    });
    run.report.notes.push(format!(
        "{low} tasks at priority 9, then {high} at priority 0; 20 ms each"
    ));
    Ok(())
}

/// Waits by priority and inversions: a low-priority attempt (a first one or one requeued)
/// that started while a high-priority task waited in the queue, from its submission to its
/// first attempt or from an attempt's end (its lease lost, the task requeued) to the next. Of
/// the `submitted` tasks, the `high` ones are those the run submitted at priority 0, not those
/// the store holds at it: a priority the coordinator lost would make a task that waited behind
/// low ones one of them. Each must have started by the store; one that never did (absent, or
/// ended unstarted) fails the verdict rather than go unjudged; so does one the store holds at
/// another priority (the coordinator lost what was submitted, whether or not it waited).
///
/// Judged on every attempt, not only each task's first: a requeued low-priority attempt
/// leased ahead of a waiting high-priority task is the same inversion. No tolerance: the
/// coordinator leases in priority order within one step, so any such start is one.
fn mixed_priority_verdicts(
    r: &mut Report,
    t: &truth::Truth,
    submitted: &HashSet<String>,
    high: &HashSet<String>,
) {
    let mut low_starts = Vec::new();
    let (mut high_wait, mut low_wait) = (Vec::new(), Vec::new());
    // Each high-priority task's spells in the queue, the first from its submission.
    let mut highs: Vec<Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)>> =
        Vec::new();
    let (mut unstarted, mut misfiled) = (0, 0);
    for id in submitted {
        let row = t.tasks.get(id);
        let is_high = high.contains(id);
        misfiled += usize::from(is_high && row.is_some_and(|row| row.priority != 0));
        let Some((row, sub, start)) =
            row.and_then(|row| Some((row, row.submitted_at?, row.started_at?)))
        else {
            unstarted += usize::from(is_high);
            continue;
        };
        let wait = (start - sub).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        if is_high {
            high_wait.push(wait);
            highs.push(queued_spells(row, sub, start));
        } else {
            low_wait.push(wait);
            low_starts.push(start);
            low_starts.extend(row.runs.iter().filter_map(|a| a.started_at));
        }
    }
    low_starts.sort();
    low_starts.dedup();
    // Over a backlog already drained, "never waits behind low" would hold for any queue: the
    // verdict needs high-priority tasks submitted while low-priority ones still waited.
    let contended = highs
        .iter()
        .filter(|spells| {
            let sub = spells[0].0;
            low_starts.last().is_some_and(|s| *s > sub)
        })
        .count();
    let inversions = highs
        .iter()
        .filter(|spells| {
            spells.iter().any(|(from, to)| {
                let i = low_starts.partition_point(|s| s <= from);
                low_starts.get(i).is_some_and(|s| s < to)
            })
        })
        .count();
    r.high_priority_wait_ms = Dist::of(high_wait);
    r.low_priority_wait_ms = Dist::of(low_wait);
    let mut more = match unstarted {
        0 => String::new(),
        n => format!(
            "; {n} of the {} submitted at priority 0 never started by the store",
            high.len()
        ),
    };
    if misfiled > 0 {
        more += &format!("; the store holds {misfiled} of them at another priority");
    }
    r.verdict(
        "high priority never waits behind low",
        inversions == 0 && unstarted == 0 && misfiled == 0 && contended > 0,
        format!(
            "{inversions} of {} high-priority tasks saw a low-priority attempt (first or requeued) start while they waited in the queue{more}; {contended} were submitted while low-priority ones still waited",
            highs.len()
        ),
    );
}

/// The spells `row` (submitted at `sub`, first started at `start`) spent queued, by the store:
/// from its submission to its first attempt, then from each attempt's end (its lease lost, the
/// task requeued) to the next attempt's start.
fn queued_spells(
    row: &truth::TaskRow,
    sub: chrono::DateTime<chrono::Utc>,
    start: chrono::DateTime<chrono::Utc>,
) -> Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> {
    let mut spells = vec![(sub, start)];
    spells.extend(row.runs.windows(2).filter_map(|w| {
        let (ended, next) = (w[0].ended_at?, w[1].started_at?);
        (ended < next).then_some((ended, next))
    }));
    spells
}

/// One worker's way back after a cut, as the reconnect figures read it. The cut cleared for
/// it when it cleared on its path: through the fault proxy it goes through.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Comeback {
    /// From the cut clearing until re-registered, ms.
    after_ready_ms: f64,
    /// From the later of the clearing and the end of the backoff delay the worker was in at
    /// the clearing, until re-registered, ms: how long it took past what its backoff made it
    /// wait. That delay ended when the first attempt after the clearing began (one that failed
    /// too, or a twin); if an attempt under way through the clearing came back before another
    /// started, the next was due the shortest delay the schedule allows after that attempt
    /// began. Never below 0: a worker back before its delay ran out took nothing past it.
    /// (Less the whole delay current then, as this was, it read the part of the delay spent
    /// before the clearing as time saved: -626 ms p50 in a herd of 500, a figure that could
    /// not miss its target.)
    beyond_delay_ms: f64,
    /// The successful attempt, from its start to registered, ms.
    attempt_ms: f64,
    /// Attempts made since the session before the cut, and the most the backoff allows from
    /// when the worker noticed the loss until that attempt began.
    paced: Option<(u64, u64)>,
}

impl Comeback {
    /// `cleared_us`: when the cut cleared on each path, by the index of the fleet's
    /// `--coordinator` URL (one for all: the same for every worker).
    fn of(w: &WorkerRecord, cut_us: u64, cleared_us: &[u64], schedule: &Schedule) -> Option<Self> {
        // A path the run does not know (none: a worker of no URL) is taken as the last to clear.
        let ready_us = match cleared_us.get(w.coordinator) {
            Some(&at) => at,
            None => cleared_us.iter().copied().max()?,
        };
        let s = w.sessions.iter().find(|s| s.registered_us > cut_us)?;
        let before = w.sessions.iter().rfind(|b| b.registered_us <= cut_us);
        let made = before.map(|b| s.attempts.saturating_sub(b.attempts));
        // The delay the worker was waiting when the cut cleared ends at its first attempt
        // after it: one that failed, the one that came back, or a twin started beside an
        // attempt under way (on a silent path an unanswered attempt does not stop the next).
        let first_after_ready = w
            .attempts
            .iter()
            .find(|a| a.started_us >= ready_us && a.started_us < s.registered_us);
        let delay_end_us = match first_after_ready {
            Some(a) => a.started_us,
            // Not in the record (more attempts than it keeps): the successful one's start.
            None if s.attempt_us >= ready_us => s.attempt_us,
            // Back through an attempt under way since before the clearing (a SYN held in a
            // blackhole, sent again by the kernel) before the next was due: that attempt's
            // start and the delay the next would have waited, at its shortest by the
            // schedule (0 if unknown).
            None => {
                s.attempt_us
                    + made.map_or(0, |n| {
                        schedule
                            .least(u32::try_from(n + 1).unwrap_or(u32::MAX))
                            .as_micros() as u64
                    })
            }
        };
        let paced = made.map(|made| {
            // A blackhole is noticed only at the liveness timeout: attempts are paced from
            // then, not from the cut.
            let noticed_us = if s.lost_us > cut_us {
                s.lost_us
            } else {
                cut_us
            };
            let since = Duration::from_micros(s.attempt_us.saturating_sub(noticed_us));
            (made, schedule.attempts_within(since) + 1)
        });
        Some(Self {
            after_ready_ms: ms(s.registered_us, ready_us),
            beyond_delay_ms: ms(s.registered_us, ready_us.max(delay_end_us)).max(0.0),
            attempt_ms: ms(s.registered_us, s.attempt_us),
            paced,
        })
    }
}

/// The fleet's reconnect delays at their shortest: the first, doubling (the workers' factor;
/// their adaptive boost only makes it grow faster) up to the cap, less the jitter.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    first: Duration,
    cap: Duration,
    jitter: f64,
}

impl Schedule {
    /// The shortest the `n`-th delay after a healthy session can be (n >= 1).
    fn least(&self, n: u32) -> Duration {
        let factor =
            tether_worker::backoff::DEFAULT_FACTOR.powi(n.saturating_sub(1).min(64) as i32);
        self.first
            .mul_f64(factor)
            .min(self.cap)
            .mul_f64(1.0 - self.jitter)
    }

    /// How many attempts, each after its delay, fit in `elapsed` at most.
    fn attempts_within(&self, elapsed: Duration) -> u64 {
        let (mut n, mut spent) = (0u32, Duration::ZERO);
        loop {
            spent += self.least(n + 1);
            if spent > elapsed || self.least(n + 1).is_zero() {
                return u64::from(n);
            }
            n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_waits_are_each_workers_between_two_reports() {
        let worker = |id: &str, full| WorkerRecord {
            id: id.into(),
            send_window_full: full,
            ..WorkerRecord::default()
        };
        let report = |workers| FleetReport {
            status: Status::default(),
            workers,
            at_us: 0,
        };
        let before = report(vec![worker("a", 3), worker("b", 7)]);
        let after = report(vec![worker("a", 5), worker("b", 7), worker("c", 2)]);
        assert_eq!(window_waits(&before, &after), [2, 0, 2]);
    }

    /// Workers as the fleet would report them with `--reset-every 200ms` at 10 s: (id,
    /// registered, stopped (0: live), resets), times in ms.
    fn reset_report(workers: &[(&str, u64, u64, u64)]) -> FleetReport {
        use super::super::fleet::SessionRecord;
        let workers = workers
            .iter()
            .map(|&(id, registered, stopped, resets)| WorkerRecord {
                id: id.into(),
                sessions: vec![SessionRecord {
                    registered_us: registered * 1000,
                    ..SessionRecord::default()
                }],
                stopped_us: stopped * 1000,
                resets,
                ..WorkerRecord::default()
            })
            .collect::<Vec<_>>();
        FleetReport {
            status: Status {
                resets: workers.iter().map(|w| w.resets).sum(),
                ..Status::default()
            },
            workers,
            at_us: 10_000_000,
        }
    }

    fn reset_judged(workers: &[(&str, u64, u64, u64)]) -> report::Verdict {
        let mut r = Report::default();
        let every = Duration::from_millis(200);
        reset_verdict(&mut r, &reset_report(workers), every, 0);
        r.verdicts.pop().expect("a verdict")
    }

    #[test]
    fn the_reset_verdict_wants_a_reset_of_every_worker_that_lived_long_enough_for_one() {
        // Every worker reset: passes.
        let all = reset_judged(&[("a", 1_000, 0, 3), ("b", 1_000, 0, 1)]);
        assert!(all.pass, "{}", all.detail);
        // As many resets as workers, all of one worker's: fails, naming the other.
        let one = reset_judged(&[("a", 1_000, 0, 2), ("b", 1_000, 0, 0)]);
        assert!(!one.pass, "{}", one.detail);
        assert!(one.detail.contains("first not b"), "{}", one.detail);
        // Registered 700 ms before the report (under 1.5 x 200 + 500 ms), or stopped 400 ms
        // after registering: not judged.
        let young = reset_judged(&[
            ("a", 1_000, 0, 1),
            ("b", 9_300, 0, 0),
            ("c", 2_000, 2_400, 0),
        ]);
        assert!(young.pass, "{}", young.detail);
        assert!(
            young.detail.starts_with("1 of 1 workers"),
            "{}",
            young.detail
        );
        // Stopped after living long enough, never reset: fails.
        let stopped = reset_judged(&[("a", 1_000, 0, 1), ("c", 2_000, 3_000, 0)]);
        assert!(!stopped.pass, "{}", stopped.detail);
        // No worker lived long enough: nothing shows the resets happened.
        let none = reset_judged(&[("b", 9_800, 0, 0)]);
        assert!(!none.pass, "{}", none.detail);
    }

    #[test]
    fn flood_figures_are_the_counts_between_two_marks_over_the_time_between_them() {
        let t = Instant::now();
        let m0 = Mark {
            at: t,
            messages: 1_000,
            frames: 100,
            compact_acked: 500,
            offered: 2_000,
            coordinator_cpu_s: 10.0,
            fleet_cpu_s: 20.0,
        };
        let m1 = Mark {
            at: t + Duration::from_secs(2),
            messages: 401_000,
            frames: 100_100,
            compact_acked: 300_500,
            offered: 502_000,
            coordinator_cpu_s: 11.6,
            fleet_cpu_s: 22.0,
        };
        let w = Window::between(&m0, &m1);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.abs().max(1.0);
        assert!(near(w.seconds, 2.0), "{w:?}");
        assert!(near(w.messages_per_s, 200_000.0), "{w:?}");
        assert!(near(w.offered_per_s, 250_000.0), "{w:?}");
        assert!(near(w.messages_per_frame, 4.0), "{w:?}");
        assert!(near(w.compact_acked_share, 0.75), "{w:?}");
        assert!(near(w.coordinator_us_per_message, 4.0), "{w:?}");
        assert!(near(w.fleet_us_per_message, 5.0), "{w:?}");
        // A mark taken later covers more: the same counts over 4 s are half the rate.
        let later = Mark {
            at: t + Duration::from_secs(4),
            ..m1
        };
        assert!(near(Window::between(&m0, &later).messages_per_s, 100_000.0));
        // Nothing handled: no division by zero.
        let idle = Window::between(&m0, &Mark { at: m1.at, ..m0 });
        assert_eq!((idle.messages_per_s, idle.messages_per_frame), (0.0, 0.0));
    }

    /// thundering_herd's idle figures come from the same two marks as message_flood's: the
    /// frames, the CPU and the time of one span.
    #[test]
    fn idle_figures_are_the_frames_and_cpu_between_two_marks_over_the_time_between_them() {
        let t = Instant::now();
        let m0 = Mark {
            at: t,
            messages: 0,
            frames: 1_000,
            compact_acked: 0,
            offered: 0,
            coordinator_cpu_s: 3.0,
            fleet_cpu_s: 0.0,
        };
        let m1 = Mark {
            at: t + Duration::from_secs(10),
            frames: 21_000,
            coordinator_cpu_s: 3.2,
            ..m0
        };
        let w = Window::between(&m0, &m1);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.abs().max(1.0);
        // 20,000 frames and 0.2 s of CPU in 10 s: 2,000 frames/s, 2 % of a core, 10 µs each.
        assert!(near(w.frames_per_s, 2_000.0), "{w:?}");
        assert!(near(w.coordinator_cpu_s, 0.2), "{w:?}");
        assert!(near(w.coordinator_cpu_pct, 2.0), "{w:?}");
        assert!(near(w.coordinator_us_per_frame, 10.0), "{w:?}");
        // Over twice the time, the same counts are half the rates.
        let later = Window::between(
            &m0,
            &Mark {
                at: t + Duration::from_secs(20),
                ..m1
            },
        );
        assert!(near(later.frames_per_s, 1_000.0), "{later:?}");
        assert!(near(later.coordinator_cpu_pct, 1.0), "{later:?}");
        // No frame: no division by zero.
        let none = Window::between(
            &m0,
            &Mark {
                frames: 1_000,
                ..m1
            },
        );
        assert_eq!(none.frames_per_s, 0.0);
        assert!(none.coordinator_us_per_frame.is_finite(), "{none:?}");
    }

    /// A fleet report of workers started at 1 s: each one's registration, in ms, if recorded.
    fn registrations(workers: &[Option<u64>]) -> FleetReport {
        use super::super::fleet::SessionRecord;
        let workers = workers
            .iter()
            .enumerate()
            .map(|(i, at)| WorkerRecord {
                id: format!("w{i}"),
                started_us: 1_000_000,
                sessions: at
                    .map(|ms| SessionRecord {
                        registered_us: ms * 1000,
                        ..SessionRecord::default()
                    })
                    .into_iter()
                    .collect(),
                ..WorkerRecord::default()
            })
            .collect();
        FleetReport {
            workers,
            ..FleetReport::default()
        }
    }

    #[test]
    fn registration_figures_missing_a_workers_record_fail_a_verdict_and_say_they_are_partial() {
        let figures = |workers: &[Option<u64>]| {
            let mut r = Report::default();
            registration_figures(&mut r, &registrations(workers), 10_000, 1_000_000);
            r
        };
        // Pretend the fleet had 10,000 workers, of which three are in the report.
        let r = figures(&[Some(1_500), Some(2_000), Some(2_900)]);
        let recorded = &r.verdicts[0];
        assert!(!recorded.pass, "{}", recorded.detail);
        assert!(
            recorded.detail.starts_with("3 of 10000"),
            "{}",
            recorded.detail
        );
        let target = r.targets.first().expect("the registration target");
        assert_eq!(target.met, Some(false), "{}", target.detail);
        assert!(
            target.detail.contains("of the 3 of 10000"),
            "{}",
            target.detail
        );
        // 3 recorded in 1.9 s, not 10,000.
        let rate = r.connects_per_s.expect("connects per second");
        assert!((rate - 3.0 / 1.9).abs() < 1e-9, "{rate}");
        // One worker's record missing of three: fails the same.
        let mut r = Report::default();
        let reg = registrations(&[Some(1_500), None, Some(2_900)]);
        registration_figures(&mut r, &reg, 3, 1_000_000);
        assert!(!r.verdicts[0].pass, "{}", r.verdicts[0].detail);
        // Every one recorded: passes, and the rate counts them all.
        let mut r = Report::default();
        let reg = registrations(&[Some(1_500), Some(2_000), Some(2_900)]);
        registration_figures(&mut r, &reg, 3, 1_000_000);
        assert!(r.verdicts[0].pass, "{}", r.verdicts[0].detail);
        assert_eq!(r.connects_per_s, Some(3.0 / 1.9));
    }

    #[test]
    fn steady_load_submits_no_more_tasks_in_all_than_a_run_holds() {
        let most = crate::stress::MAX_TASKS;
        // A backlog of `cap` unfinished: nothing more now.
        assert_eq!(steady_chunk(20_000, 10_000, 10_000, 5_000), 0);
        assert_eq!(steady_chunk(20_000, 12_000, 10_000, 5_000), 5_000);
        // The last chunk is cut to the bound, and none follows it.
        assert_eq!(steady_chunk(most - 10, most - 10, 10_000, 5_000), 10);
        assert_eq!(steady_chunk(most, most, 10_000, 5_000), 0);
        // Every task done at once, the loop's sole other bound (time) never reached: the
        // submissions stop at the bound.
        let mut submitted = 0u64;
        for _ in 0..1_000 {
            submitted += steady_chunk(submitted, submitted, 10_000, 5_000);
        }
        assert_eq!(submitted, most);
    }

    /// A status counting the new workers may come in as soon as the start is sent: the target
    /// is the live count from before it, not that status's count plus the new ones again.
    #[tokio::test]
    async fn a_start_waits_for_the_workers_live_before_it_and_the_new_ones_counted_once() {
        let (tx, rx) = tokio::sync::watch::channel(Status {
            live: 3,
            ..Status::default()
        });
        // The fleet started the two and said so before the sender looked again.
        let send = async {
            tx.send_modify(|s| s.live += 2);
            Ok(())
        };
        assert_eq!(live_after_start(&rx, 2, send).await.expect("sent"), 5);
        // A start that could not be sent is an error, not a target.
        let failed = async { Err(anyhow::anyhow!("the fleet process is gone")) };
        assert!(live_after_start(&rx, 2, failed).await.is_err());
    }

    #[test]
    fn a_fleet_command_count_past_32_bits_is_an_error_not_its_low_bits() {
        assert_eq!(count(u64::from(u32::MAX)).ok(), Some(u32::MAX));
        assert!(count(u64::from(u32::MAX) + 2).is_err(), "started as 1");
    }

    #[test]
    fn the_attempts_a_backoff_allows_follow_its_doubling_delays_to_the_cap() {
        let s = Schedule {
            first: Duration::from_millis(200),
            cap: Duration::from_secs(1),
            jitter: 0.2,
        };
        let ms = |n| s.least(n).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(9)],
            [160, 320, 640, 800, 800]
        );
        // 160 + 320 + 640 = 1,120 ms; then one more each 800 ms.
        assert_eq!(s.attempts_within(Duration::from_millis(1_119)), 2);
        assert_eq!(s.attempts_within(Duration::from_millis(1_120)), 3);
        assert_eq!(s.attempts_within(Duration::from_millis(1_120 + 8_000)), 13);
        // A worker at the first delay for 27 s (170 attempts) would be over.
        assert!(s.attempts_within(Duration::from_secs(27)) < 40);
    }

    /// A worker registered at 1 s, cut at 10 s, the cut cleared at 20 s; `attempts` (start,
    /// delay) in ms; the session that came back (attempt start, registered, delay, lost) in ms.
    fn worker_back(attempts: &[(u64, u64)], back: (u64, u64, u64, u64)) -> WorkerRecord {
        use super::super::fleet::{AttemptRecord, SessionRecord};
        let us = |ms: u64| ms * 1000;
        let first = SessionRecord {
            attempt_us: us(990),
            registered_us: us(1_000),
            attempts: 1,
            ..SessionRecord::default()
        };
        let (attempt, registered, delay, lost) = back;
        let again = SessionRecord {
            attempt_us: us(attempt),
            registered_us: us(registered),
            delay_us: us(delay),
            attempts: 1 + attempts.len() as u64,
            lost_us: us(lost),
        };
        let attempts = std::iter::once((990, 0)).chain(attempts.iter().copied());
        WorkerRecord {
            sessions: vec![first, again],
            attempts: attempts
                .map(|(at, delay)| AttemptRecord {
                    started_us: us(at),
                    delay_us: us(delay),
                })
                .collect(),
            ..WorkerRecord::default()
        }
    }

    fn comeback(w: &WorkerRecord) -> Comeback {
        let schedule = Schedule {
            first: Duration::from_millis(200),
            cap: Duration::from_secs(1),
            jitter: 0.2,
        };
        Comeback::of(w, 10_000_000, &[20_000_000], &schedule).expect("came back")
    }

    #[test]
    fn a_reconnect_through_a_proxy_is_measured_from_when_that_proxy_cleared() {
        let schedule = Schedule {
            first: Duration::from_millis(200),
            cap: Duration::from_secs(1),
            jitter: 0.2,
        };
        // Behind proxy 0, up again at 20.0 s; proxy 1 up at 20.5 s. Its attempt at 20.01 s,
        // after a 10 ms delay, came back at 20.05 s.
        let cleared = [20_000_000, 20_500_000];
        let mut w = worker_back(&[(20_010, 10)], (20_010, 20_050, 10, 10_010));
        let c = Comeback::of(&w, 10_000_000, &cleared, &schedule).expect("came back");
        assert_eq!((c.after_ready_ms, c.beyond_delay_ms), (50.0, 40.0));
        // Behind proxy 1 its delay ended (20.01 s) before that proxy cleared (20.5 s): what
        // it took past the clearing, and not below 0.
        let mut w1 = w.clone();
        w1.coordinator = 1;
        let c = Comeback::of(&w1, 10_000_000, &cleared, &schedule).expect("came back");
        assert_eq!(c.beyond_delay_ms, 0.0);
        // The same worker behind proxy 1: back 450 ms before its proxy's control call
        // returned, which says so (this read 0 ms, as though it came back at the clearing).
        w.coordinator = 1;
        let c = Comeback::of(&w, 10_000_000, &cleared, &schedule).expect("came back");
        assert_eq!(c.after_ready_ms, -450.0);
    }

    /// The figure "past the backoff delay current when the cut cleared", on constructed
    /// timelines (the cut cleared at 20 s): from the end of that delay (or the clearing, if
    /// later) to the registration, never below 0. Review h5 saw it read -626 ms p50 in a herd
    /// of 500: it subtracted the whole delay, the part spent before the clearing too, so a
    /// worker back 75 ms after its delay ran out read as 625 ms early.
    #[test]
    fn a_reconnect_is_measured_from_the_end_of_the_delay_current_when_the_cut_cleared() {
        // Waiting a 1 s delay from 19.5 s; its attempt at 20.5 s comes back at 20.51 s: 10 ms
        // past the delay (this read -490 ms, the 500 ms of the delay before the clearing
        // taken for time saved).
        let w = worker_back(
            &[(19_500, 800), (20_500, 1_000)],
            (20_500, 20_510, 1_000, 10_010),
        );
        let c = comeback(&w);
        assert_eq!((c.after_ready_ms, c.beyond_delay_ms), (510.0, 10.0));
        // The herd of review h5: a 1 s delay from 19.3 s, the attempt at 20.3 s back at
        // 20.375 s: 75 ms past the delay, not -625 ms.
        let w = worker_back(&[(20_300, 1_000)], (20_300, 20_375, 1_000, 10_010));
        assert_eq!(comeback(&w).beyond_delay_ms, 75.0);
        // The first attempt after the cut cleared (20.1 s, ending a 600 ms delay) failed; the
        // next, after a 2 s delay, came back at 22.11 s: 2010 ms past the delay current at the
        // clearing (its failure and the next delay are what the worker took beyond it).
        let w = worker_back(
            &[(20_100, 600), (22_100, 2_000)],
            (22_100, 22_110, 2_000, 10_010),
        );
        assert_eq!(comeback(&w).beyond_delay_ms, 2_010.0);
        // An attempt under way through the clearing (19.9 s) that came back at 20.05 s, before
        // the next was due (19.9 s and the shortest second delay, 400 ms less 20 %: 20.22 s):
        // nothing past the delay.
        let w = worker_back(&[(19_900, 1_000)], (19_900, 20_050, 1_000, 10_010));
        assert_eq!(comeback(&w).beyond_delay_ms, 0.0);
        // The same attempt back at 20.5 s: 280 ms past when the next was due.
        let w = worker_back(&[(19_900, 1_000)], (19_900, 20_500, 1_000, 10_010));
        assert_eq!(comeback(&w).beyond_delay_ms, 280.0);
        // Its SYN lost in a blackhole, it came back at the kernel's retransmission (1 s after
        // its start, 20.51 s), after a twin had started at 20.2 s at the end of its 800 ms
        // delay: 310 ms past that delay.
        let w = worker_back(
            &[(19_500, 800), (20_200, 800)],
            (19_500, 20_510, 800, 10_010),
        );
        assert_eq!(comeback(&w).beyond_delay_ms, 310.0);
        // The figure is never negative: whatever the timeline, a worker cannot be back
        // before the later of the clearing and the end of its delay by this measure.
        for (attempt, back) in [(19_000, 19_500), (20_000, 20_001), (25_000, 25_100)] {
            let w = worker_back(&[(attempt, 1_000)], (attempt, back, 1_000, 10_010));
            assert!(comeback(&w).beyond_delay_ms >= 0.0, "{attempt} {back}");
        }
    }

    /// With connections reset, a worker counts as gone only when it has been disconnected
    /// longer than a reconnect takes: one reset a moment ago is not, nor one connected.
    #[test]
    fn only_workers_disconnected_longer_than_a_reconnect_count_as_gone() {
        let now = chrono::DateTime::UNIX_EPOCH + chrono::Duration::seconds(100);
        let at = |s: i64| (now - chrono::Duration::milliseconds(s)).to_rfc3339();
        let workers = json!([
            {"worker_id": "left", "state": "disconnected", "disconnected_at": at(3_000)},
            {"worker_id": "lost", "state": "lost", "disconnected_at": at(60_000)},
            {"worker_id": "reset", "state": "disconnected", "disconnected_at": at(400)},
            {"worker_id": "back", "state": "connected"},
            {"worker_id": "odd", "state": "disconnected"},
        ]);
        assert_eq!(gone_for(&workers, Duration::from_millis(2_200), now), 2);
        assert_eq!(gone_for(&workers, Duration::from_millis(300), now), 3);
        assert_eq!(gone_for(&json!({"error": "busy"}), Duration::ZERO, now), 0);
    }

    #[test]
    fn reconnect_attempts_are_paced_from_when_the_worker_noticed_the_loss() {
        // A blackhole noticed at 18.7 s; five attempts by 20 s: from the cut (10 s) the backoff
        // allows them, from the noticing (1.3 s: 160 + 320 + 640 ms, then 800 each) 3 and the
        // one that started it.
        let attempts = [
            (18_900, 160),
            (19_200, 160),
            (19_500, 160),
            (19_800, 160),
            (20_000, 160),
        ];
        let w = worker_back(&attempts, (20_000, 20_010, 160, 18_700));
        assert_eq!(comeback(&w).paced, Some((5, 4)));
        // Noticed at the cut: the same five are within pace.
        let w = worker_back(&attempts, (20_000, 20_010, 160, 10_000));
        let (made, allowed) = comeback(&w).paced.expect("paced");
        assert!(made <= allowed, "{made} of {allowed}");
    }

    /// Tasks as the store would have them: (priority, submitted, started) in ms from an epoch.
    fn store_of(tasks: &[(u8, i64, i64)]) -> truth::Truth {
        let at = |ms| chrono::DateTime::UNIX_EPOCH + chrono::Duration::milliseconds(ms);
        let tasks = tasks
            .iter()
            .enumerate()
            .map(|(i, &(priority, sub, start))| {
                let row = truth::TaskRow {
                    status: "completed".into(),
                    priority,
                    submitted_at: Some(at(sub)),
                    started_at: Some(at(start)),
                    counted: 1,
                    stale: 0,
                    attempts: 1,
                    runs: vec![truth::AttemptRow {
                        attempt: 1,
                        started_at: Some(at(start)),
                        ..truth::AttemptRow::default()
                    }],
                    ..truth::TaskRow::default()
                };
                (format!("t{i}"), row)
            });
        truth::Truth {
            tasks: tasks.collect(),
            ..truth::Truth::default()
        }
    }

    /// A crash at 10 s of workers w-0 and w-1, each running a task (started 300 ms before it,
    /// too soon to be owed a resume unless a checkpoint of it was listed): (task, its crashed
    /// worker, where its next attempt resumed); those of `held` listed with a checkpoint.
    fn crash_of(tasks: &[(&str, &str, u64)], held: &[&str]) -> report::Verdict {
        crash_read(tasks, held, &[], 300)
    }

    /// [`crash_of`], the checkpoints of `foreign` read back as not what their task wrote, each
    /// task started `ran_ms` before the crash (owed a resume from 600 ms on).
    fn crash_read(
        tasks: &[(&str, &str, u64)],
        held: &[&str],
        foreign: &[&str],
        ran_ms: i64,
    ) -> report::Verdict {
        let at = |s| chrono::DateTime::UNIX_EPOCH + chrono::Duration::seconds(s);
        let rows = tasks.iter().map(|&(id, worker, resumed_at)| {
            let runs = vec![
                truth::AttemptRow {
                    attempt: 1,
                    worker: worker.into(),
                    started_at: Some(at(10) - chrono::Duration::milliseconds(ran_ms)),
                    ended_at: Some(at(11)),
                    ..truth::AttemptRow::default()
                },
                truth::AttemptRow {
                    attempt: 2,
                    worker: "w-9".into(),
                    ended_at: Some(at(20)),
                    result_recorded: true,
                    resumed_at: Some(resumed_at),
                    ..truth::AttemptRow::default()
                },
            ];
            let row = truth::TaskRow {
                status: "completed".into(),
                counted: 1,
                attempts: 2,
                runs,
                ..truth::TaskRow::default()
            };
            (id.to_owned(), row)
        });
        let t = truth::Truth {
            tasks: rows.collect(),
            // Counted results that resumed, as a count of them alone would see.
            resumed: tasks.iter().filter(|t| t.2 > 0).count() as u64,
            ..truth::Truth::default()
        };
        let crash = Crash {
            held: held
                .iter()
                .map(|id| truth::Checkpointed {
                    task: id.to_string(),
                    attempt: 1,
                    worker: tasks
                        .iter()
                        .find(|t| t.0 == *id)
                        .map_or("w-0", |t| t.1)
                        .into(),
                    step: (!foreign.contains(id)).then_some(20),
                })
                .collect(),
            checkpoints: held
                .iter()
                .map(|id| vec![listed(&format!("c-{id}"), 0)])
                .collect(),
            foreign: foreign.iter().map(|id| format!("c-{id} of {id}")).collect(),
            unread: 0,
            workers: ["w-0", "w-1"].iter().map(|w| w.to_string()).collect(),
            at: at(10),
            owed_after: Duration::from_millis(600),
        };
        let mut r = Report::default();
        crash_verdict(&mut r, &t, &crash);
        r.verdicts.pop().expect("a verdict")
    }

    #[test]
    fn the_crash_verdict_fails_on_a_task_started_afresh_and_on_nothing_to_judge() {
        let tasks = [("a", "w-0", 20), ("b", "w-1", 0)];
        // One resumed, one started afresh: fails, naming it.
        let v = crash_of(&tasks, &["a", "b"]);
        assert!(!v.pass, "{}", v.detail);
        assert!(v.detail.starts_with("1 of 2"), "{}", v.detail);
        assert!(v.detail.contains("first b attempt 2"), "{}", v.detail);
        // Every task that had a checkpoint resumed: passes.
        let v = crash_of(&tasks, &["a"]);
        assert!(v.pass, "{}", v.detail);
        // No crashed worker held a checkpointed task: fails, saying there was nothing to judge.
        let v = crash_of(&tasks, &[]);
        assert!(!v.pass, "{}", v.detail);
        assert!(v.detail.starts_with("nothing to judge"), "{}", v.detail);
    }

    /// A task the crash interrupted after it had run long enough to checkpoint is owed a
    /// resume whether or not a checkpoint of it was listed: "b", started 5 s before the crash
    /// and started afresh after it, fails the verdict (with none listed, it was let off).
    #[test]
    fn the_crash_verdict_judges_every_task_that_ran_long_enough_to_checkpoint() {
        let tasks = [("a", "w-0", 20), ("b", "w-1", 0)];
        let v = crash_read(&tasks, &["a"], &[], 5_000);
        assert!(!v.pass, "{}", v.detail);
        assert!(v.detail.starts_with("1 of 2"), "{}", v.detail);
        assert!(v.detail.contains("first b attempt 2"), "{}", v.detail);
        assert!(
            v.detail
                .contains("1 had run 600 ms or longer with no checkpoint listed"),
            "{}",
            v.detail
        );
        // None listed at all: not "nothing to judge", but both judged.
        let v = crash_read(&tasks, &[], &[], 5_000);
        assert!(v.detail.starts_with("1 of 2"), "{}", v.detail);
        // Both resumed from some checkpoint: passes.
        let both = [("a", "w-0", 20), ("b", "w-1", 3)];
        let v = crash_read(&both, &["a"], &[], 5_000);
        assert!(v.pass, "{}", v.detail);
        assert!(
            v.detail.starts_with("2 tasks running on the 2 crashed"),
            "{}",
            v.detail
        );
        // Too young to have checkpointed, and not listed: let off, and said.
        let v = crash_read(&tasks, &["a"], &[], 300);
        assert!(v.pass, "{}", v.detail);
        assert!(
            v.detail
                .contains("1 of the 2 interrupted had run under 600 ms"),
            "{}",
            v.detail
        );
    }

    /// A crash injected with no execution resumed checked nothing: the verdict on the
    /// checkpoints resumed from fails (it passed on "0 damaged of 0 resumed").
    #[test]
    fn the_damage_verdict_fails_when_nothing_resumed() {
        let judged = |resumed, damaged| {
            let mut r = Report::default();
            let s = Status {
                resumed,
                damaged,
                ..Status::default()
            };
            damage_verdict(&mut r, &s);
            r.verdicts.pop().expect("a verdict")
        };
        let none = judged(0, 0);
        assert!(!none.pass, "{}", none.detail);
        assert!(none.detail.contains("nothing to check"), "{}", none.detail);
        let fine = judged(3, 0);
        assert!(fine.pass, "{}", fine.detail);
        assert_eq!(fine.detail, "0 damaged of 3 resumed");
        assert!(!judged(3, 1).pass);
    }

    #[test]
    fn the_crash_verdict_fails_on_a_checkpoint_held_that_is_not_what_its_task_wrote() {
        let tasks = [("a", "w-0", 20), ("b", "w-1", 20)];
        let v = crash_read(&tasks, &["a", "b"], &["b"], 300);
        assert!(!v.pass, "{}", v.detail);
        assert!(
            v.detail.contains(
                "1 checkpoints held read back as not what their task wrote, first c-b of b"
            ),
            "{}",
            v.detail
        );
        assert!(!v.detail.contains("gone before"), "{}", v.detail);
    }

    #[test]
    fn steady_load_counts_the_results_recorded_between_two_reads_over_the_time_between_them() {
        let t = Instant::now();
        let done0 = Count { at: t, n: 30 };
        let done1 = Count {
            at: t + Duration::from_millis(2_500),
            n: 50_030,
        };
        assert!((done1.per_s_since(&done0) - 20_000.0).abs() < 1e-6);
    }

    #[test]
    fn checkpoint_heavy_rates_end_at_the_last_result_recorded_not_at_the_mark_after_the_poll() {
        let at = |ms| chrono::DateTime::UNIX_EPOCH + chrono::Duration::milliseconds(ms);
        let span = Span {
            from: at(0),
            // The end mark, after the poll that saw every task end: 400 ms late.
            marked: at(6_400),
            tasks: 200,
            messages: Some(12_000),
        };
        let mut r = Report::default();
        span_rates(&mut r, &span, Some(at(6_000)));
        let near = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-6);
        assert!(near(r.tasks_per_s, 200.0 / 6.0), "{:?}", r.tasks_per_s);
        assert!(near(r.messages_per_s, 2_000.0), "{:?}", r.messages_per_s);
        let note = r.notes.last().expect("a note");
        assert!(note.contains("over the 6.00 s"), "{note}");
        assert!(note.contains("0.40 s after"), "{note}");
        // No result recorded: no rate, rather than one over a made-up span.
        let mut r = Report::default();
        span_rates(&mut r, &span, None);
        assert_eq!((r.tasks_per_s, r.messages_per_s), (None, None));
    }

    #[test]
    fn mixed_priority_tasks_per_second_ends_at_the_last_result_recorded_not_at_the_poll() {
        let at = |ms| chrono::DateTime::UNIX_EPOCH + chrono::Duration::milliseconds(ms);
        let span = Span {
            from: at(0),
            // The poll that saw every task ended: 250 ms after the last result.
            marked: at(2_750),
            tasks: 1_010,
            messages: None,
        };
        let mut r = Report::default();
        span_rates(&mut r, &span, Some(at(2_500)));
        assert!(
            r.tasks_per_s.is_some_and(|v| (v - 404.0).abs() < 1e-6),
            "{:?}",
            r.tasks_per_s
        );
        // No messages were counted: no message rate.
        assert_eq!(r.messages_per_s, None);
        let note = r.notes.last().expect("a note");
        assert!(
            note.starts_with("tasks per second: the 1010 tasks over the 2.50 s"),
            "{note}"
        );
        assert!(note.contains("came 0.25 s after"), "{note}");
    }

    /// A task the coordinator lists running on `worker`, attempt 1, with the id of its latest
    /// checkpoint (written by attempt 1, at second 0).
    fn running(task: &str, worker: &str, checkpoint: Option<&str>) -> Running {
        Running {
            lease: Lease {
                task: task.into(),
                attempt: 1,
                worker: worker.into(),
            },
            checkpoint: checkpoint.map(|id| listed(id, 0)),
        }
    }

    /// A checkpoint listed with `id`, of attempt 1, written at `second` since the epoch.
    fn listed(id: &str, second: i64) -> Listed {
        Listed {
            id: id.into(),
            attempt: 1,
            created_at: Some(chrono::DateTime::UNIX_EPOCH + chrono::Duration::seconds(second)),
        }
    }

    #[test]
    fn the_crash_falls_on_workers_running_tasks_before_idle_ones_oldest_first() {
        let live: Vec<String> = (0..8).map(|i| format!("w-{i}")).collect();
        // Fewer tasks than workers, leased in id order, not age: the oldest run none.
        let tasks = [
            running("a", "w-6", None),
            running("b", "w-5", Some("c-1")),
            running("c", "w-7", Some("c-2")),
        ];
        assert_eq!(crash_targets(&tasks, &live, 2), ["w-5", "w-7"]);
        assert_eq!(
            crash_targets(&tasks, &live, 4),
            ["w-5", "w-7", "w-6", "w-0"]
        );
        // A worker of two tasks ranks by its best; more asked than live: every one.
        let two = [running("a", "w-3", None), running("b", "w-3", Some("c-1"))];
        assert_eq!(crash_targets(&two, &live, 1), ["w-3"]);
        assert_eq!(crash_targets(&two, &live, 20).len(), 8);
    }

    #[test]
    fn a_checkpoint_first_held_after_the_listing_before_the_crash_is_judged_from_the_one_after() {
        let at = chrono::DateTime::UNIX_EPOCH;
        let crashed: HashSet<String> = ["w-0", "w-1"].iter().map(|w| w.to_string()).collect();
        let before = [
            running("early", "w-0", Some("c-e1")),
            // Its first checkpoint came between the listing and the crash.
            running("late", "w-1", None),
            // Requeued before the listing after the crash, with no checkpoint before it.
            running("gone", "w-1", None),
            // Requeued before the listing after the crash, with a checkpoint before it.
            running("left", "w-1", Some("c-l1")),
            running("elsewhere", "w-4", Some("c-x1")),
        ];
        let after = [
            // A later checkpoint came between the listing and the crash.
            running("early", "w-0", Some("c-e2")),
            running("late", "w-1", Some("c-t1")),
            running("elsewhere", "w-4", Some("c-x2")),
        ];
        let c = Crash::of(&before, &after, crashed, at, Duration::from_millis(600));
        let held: Vec<&str> = c.held.iter().map(|h| h.task.as_str()).collect();
        assert_eq!(held, ["early", "late", "left"]);
        // The latest listed of each (of equal order, after the crash if listed then), and
        // every other listed of it after.
        let newest: Vec<&str> = c.checkpoints.iter().map(|l| l[0].id.as_str()).collect();
        assert_eq!(newest, ["c-e2", "c-t1", "c-l1"]);
        let early: Vec<&str> = c.checkpoints[0].iter().map(|l| l.id.as_str()).collect();
        assert_eq!(early, ["c-e2", "c-e1"]);
    }

    /// A listing after the crash that names an older checkpoint than the listing before it
    /// (the coordinator rolled back) does not lower what the task must resume from: the newer
    /// of the two is owed.
    #[test]
    fn a_rollback_in_the_listing_after_the_crash_does_not_lower_the_step_owed() {
        let crashed: HashSet<String> = ["w-0"].iter().map(|w| w.to_string()).collect();
        let with = |c: Listed| Running {
            checkpoint: Some(c),
            ..running("t", "w-0", None)
        };
        let (older, newer) = (listed("c-1", 1), listed("c-2", 2));
        let at = chrono::DateTime::UNIX_EPOCH;
        let c = Crash::of(
            &[with(newer.clone())],
            &[with(older.clone())],
            crashed,
            at,
            Duration::ZERO,
        );
        assert_eq!(c.checkpoints, [vec![newer.clone(), older.clone()]]);
        // Steps read from their bytes: the newer one's, 20, not the older one's, 10.
        assert_eq!(
            owed_step(&[(&newer, Some(20)), (&older, Some(10))]),
            Some(20)
        );
        // The newer one gone before it was read: one past the older one's step.
        assert_eq!(owed_step(&[(&newer, None), (&older, Some(10))]), Some(11));
        // Only an older one gone: the newer one's.
        assert_eq!(owed_step(&[(&newer, Some(20)), (&older, None)]), Some(20));
        // Nothing read: any checkpoint will do.
        assert_eq!(owed_step(&[(&newer, None), (&older, None)]), None);
        assert_eq!(owed_step(&[]), None);
        // A later attempt's checkpoint is newer whatever its time.
        let next = Listed {
            attempt: 2,
            ..listed("c-3", 0)
        };
        assert!(next.order() > newer.order());
    }

    #[test]
    fn a_checkpoints_step_is_read_from_its_head_only_if_its_task_wrote_it_at_that_step() {
        let own = super::super::fleet::step_checkpoint("t-1", 20, 1024);
        assert_eq!(step_of("t-1", &own[..12]), Some(20));
        assert_eq!(step_of("t-1", &own), Some(20));
        // Another task's, a step's number changed, or too short to tell: no step.
        assert_eq!(step_of("t-2", &own[..12]), None);
        let mut changed = own.clone();
        changed[..4].copy_from_slice(&21u32.to_le_bytes());
        assert_eq!(step_of("t-1", &changed), None);
        assert_eq!(step_of("t-1", &own[..11]), None);
    }

    fn priority_verdict(tasks: &[(u8, i64, i64)]) -> report::Verdict {
        judge_priority(&store_of(tasks), tasks)
    }

    /// The priority verdict on `t`, of the `tasks` of [`store_of`] as the run submitted them
    /// (those at priority 0 high).
    fn judge_priority(t: &truth::Truth, tasks: &[(u8, i64, i64)]) -> report::Verdict {
        let id = |i| format!("t{i}");
        let submitted = (0..tasks.len()).map(id).collect();
        let high = (0..tasks.len())
            .filter(|&i| tasks[i].0 == 0)
            .map(id)
            .collect();
        let mut r = Report::default();
        mixed_priority_verdicts(&mut r, t, &submitted, &high);
        r.verdicts.pop().expect("a verdict")
    }

    #[test]
    fn a_high_priority_task_the_store_holds_at_another_priority_fails_the_verdict() {
        // t3, submitted high at 100 ms, started at 120 ms ahead of the low ones still waiting:
        // no inversion, and it passes.
        let tasks = [(9, 0, 10), (9, 0, 150), (9, 0, 200), (0, 100, 120)];
        let v = judge_priority(&store_of(&tasks), &tasks);
        assert!(v.pass, "{}", v.detail);
        // The store lost its priority: the coordinator no longer holds what was submitted.
        let mut t = store_of(&tasks);
        t.tasks.get_mut("t3").expect("t3").priority = 9;
        let v = judge_priority(&t, &tasks);
        assert!(!v.pass, "{}", v.detail);
        assert!(
            v.detail
                .contains("the store holds 1 of them at another priority"),
            "{}",
            v.detail
        );
    }

    #[test]
    fn the_priority_verdict_judges_the_tasks_submitted_high_not_those_the_store_holds_high() {
        // Two high-priority tasks submitted at 100 ms, while low ones waited.
        let tasks = [(9, 0, 10), (9, 0, 150), (0, 100, 120), (0, 100, 160)];
        let v = judge_priority(&store_of(&tasks), &tasks);
        assert!(!v.pass, "t3 waited behind t1: {}", v.detail);
        // The coordinator lost t3's priority: by the store's word a low task, and t1 no
        // longer started ahead of a high one. It is judged as submitted.
        let mut t = store_of(&tasks);
        t.tasks.get_mut("t3").expect("t3").priority = 9;
        let v = judge_priority(&t, &tasks);
        assert!(!v.pass, "{}", v.detail);
        assert!(v.detail.starts_with("1 of 2"), "{}", v.detail);
        assert!(
            v.detail
                .contains("the store holds 1 of them at another priority"),
            "{}",
            v.detail
        );
        // A high-priority task that never started (here t3) is not left out of the count.
        let mut t = store_of(&tasks);
        t.tasks.get_mut("t3").expect("t3").started_at = None;
        let v = judge_priority(&t, &tasks);
        assert!(!v.pass, "{}", v.detail);
        assert!(
            v.detail
                .contains("1 of the 2 submitted at priority 0 never started"),
            "{}",
            v.detail
        );
        // Absent from the store altogether: the same.
        let mut t = store_of(&tasks);
        t.tasks.remove("t3");
        assert!(!judge_priority(&t, &tasks).pass);
    }

    #[test]
    fn the_priority_verdict_fails_on_an_inversion_and_on_a_backlog_that_had_drained() {
        // Low-priority tasks waiting at 100 ms; the high one submitted then starts first.
        let passed = priority_verdict(&[(9, 0, 10), (9, 0, 150), (9, 0, 200), (0, 100, 120)]);
        assert!(passed.pass, "{}", passed.detail);
        // A low one starts after the high one's submission and before it: an inversion.
        let inverted = priority_verdict(&[(9, 0, 10), (9, 0, 110), (9, 0, 200), (0, 100, 120)]);
        assert!(!inverted.pass, "{}", inverted.detail);
        assert!(inverted.detail.starts_with("1 of 1"), "{}", inverted.detail);
        // Every low one had started before the high one came: nothing was tested.
        let drained = priority_verdict(&[(9, 0, 10), (9, 0, 20), (0, 100, 120)]);
        assert!(!drained.pass, "{}", drained.detail);
        assert!(
            drained
                .detail
                .ends_with("0 were submitted while low-priority ones still waited")
        );
        assert!(
            !priority_verdict(&[(9, 0, 10)]).pass,
            "no high-priority task at all"
        );
    }

    /// Task `id` of `t` ran again: its attempts (started, ended) in ms from the epoch of
    /// [`store_of`], the first as the store already has it.
    fn ran_again(t: &mut truth::Truth, id: &str, attempts: &[(i64, i64)]) {
        let at = |ms| chrono::DateTime::UNIX_EPOCH + chrono::Duration::milliseconds(ms);
        let row = t.tasks.get_mut(id).expect("task");
        row.runs = (1..)
            .zip(attempts)
            .map(|(n, &(start, end))| truth::AttemptRow {
                attempt: n,
                started_at: Some(at(start)),
                ended_at: Some(at(end)),
                ..truth::AttemptRow::default()
            })
            .collect();
        row.started_at = row.runs[0].started_at;
        row.attempts = row.runs.len() as u64;
    }

    /// Every attempt is judged, not only each task's first: a low-priority task requeued and
    /// leased again while a high-priority one waited, or a low one leased while a high one
    /// requeued waited for its next attempt, is an inversion the first starts do not show.
    #[test]
    fn a_requeued_low_priority_attempt_started_ahead_of_a_waiting_high_one_fails() {
        // By first starts alone, the high task t3 (submitted at 100, started at 120) saw no
        // low one start while it waited: the backlog t1 and t2 started at 150 and 200.
        let tasks = [(9, 0, 10), (9, 0, 150), (9, 0, 200), (0, 100, 120)];
        assert!(priority_verdict(&tasks).pass);
        // t0's first attempt was lost at 50; its second started at 110, ahead of t3.
        let mut t = store_of(&tasks);
        ran_again(&mut t, "t0", &[(10, 50), (110, 130)]);
        let v = judge_priority(&t, &tasks);
        assert!(!v.pass, "{}", v.detail);
        assert!(v.detail.starts_with("1 of 1"), "{}", v.detail);
        // Requeued at 80, before t3 came: it waited ahead of t3, as it should.
        let mut t = store_of(&tasks);
        ran_again(&mut t, "t0", &[(10, 50), (80, 130)]);
        assert!(judge_priority(&t, &tasks).pass);
        // t3's first attempt was lost at 140 and its second started at 210: t1 (150) and t2
        // (200) started while it waited in the queue again.
        let mut t = store_of(&tasks);
        ran_again(&mut t, "t3", &[(120, 140), (210, 230)]);
        let v = judge_priority(&t, &tasks);
        assert!(!v.pass, "{}", v.detail);
        // Requeued at 140 and leased again at once, at 145: no low one started meanwhile.
        let mut t = store_of(&tasks);
        ran_again(&mut t, "t3", &[(120, 140), (145, 230)]);
        assert!(judge_priority(&t, &tasks).pass);
    }
}
