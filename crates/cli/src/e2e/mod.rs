//! `tether e2e`: an end-to-end run of real processes through real network faults, judged from
//! ground truth.
//!
//! A coordinator process (this binary), a fault proxy (in this process) and N worker processes
//! connected through it, each with its own `--state-dir` and `--event-log`. Waves of tasks go
//! in while a seeded schedule of disruptions runs: proxy faults, the proxy down and up, a
//! worker and the coordinator SIGKILLed and restarted on the same directories. Then the run
//! waits for every task to end, reads the coordinator's API and the workers' own event logs,
//! and judges them ([`verdict`]); the report goes out as JSON and Markdown ([`report`]).
//!
//! - [`plan`]: disruption kinds, scenarios, the seeded plan.
//! - [`procs`]: the child processes and the HTTP API client.
//! - [`disrupt`]: applying one disruption and waiting for the fleet to be whole again.
//! - [`observe`]: the coordinator's view polled all along, event logs, detection and recovery.
//! - [`tasks`]: the task mix.
//! - [`netns`]: `--netns`, workers in network namespaces and faults made by the kernel.

mod disrupt;
mod netns;
mod observe;
mod plan;
mod procs;
mod report;
mod tasks;
mod verdict;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::Utc;
use clap::Args;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde_json::{Value, json};
use tether_faultproxy::{Proxy, ProxyConfig};
use tether_worker::eventlog::{Event, Record};
use tokio_util::sync::CancellationToken;

use self::disrupt::System;
pub(crate) use self::disrupt::{all_refuse, proxies_went_down};
use self::observe::Watcher;
use self::plan::Kind;
use self::procs::{Coordinator, Exit, TIMINGS, Worker};
use self::report::{BlackholeFigures, Figures, Report, TaskOutcomes, WorkerFigures};
use self::verdict::{AckView, Expect, GroundTruth, ResultView, StoredView, TaskView};
use crate::output::outln;
use crate::settings::parse_duration_arg;

/// Most workers a run starts.
pub const MAX_WORKERS: usize = 32;

#[derive(Args)]
pub struct E2eArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// How long disruptions keep starting (the first round, one of each kind of the
    /// scenario, always runs to its end: `0s` runs that round alone).
    #[arg(long, default_value = "120s", value_parser = parse_duration_arg)]
    duration: Duration,
    /// Time between the starts of two disruptions (a disruption that takes longer delays
    /// the next).
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    disruption_interval: Duration,
    /// Seed of the plan, the task mix, the proxy and the workers' jitter (default: random,
    /// printed).
    #[arg(long)]
    seed: Option<u64>,
    /// `all`, `network` (proxy faults only), `crash` (the kills), `kernel` (with --netns),
    /// or a comma-separated list of: latency, bandwidth, blackhole, reset, limit_data,
    /// slicer, stall, corrupt, proxy_down, worker_kill, worker_stop, coordinator_kill,
    /// lease_loss, slow_close, drain, link_down, link_crawl (lease_loss and drain need two
    /// workers or more).
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Where to write the report: a path prefix (`PREFIX.json`, `PREFIX.md`) or a directory
    /// (default: none written; the summary goes to stdout).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Directory for the processes' data, state, event logs and logs (default: a temporary
    /// directory, kept when the run fails).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Run each worker in a network namespace of its own behind a veth pair (needs root and
    /// iproute2), which adds kernel-made faults (`link_down`, `link_crawl`) to the scenario.
    #[arg(long)]
    netns: bool,
    /// Run with worker authentication and an integrity tag on every frame (a fleet secret in
    /// the work directory, `--message-mac` on both sides). `corrupt` then flips bits at a low
    /// rate, which leaves frames that still parse: only the tags can catch them.
    #[arg(long)]
    message_mac: bool,
    /// How long the tasks get to finish once the disruptions are over.
    #[arg(long, default_value = "120s", value_parser = parse_duration_arg)]
    drain_timeout: Duration,
}

pub async fn run(a: E2eArgs) -> anyhow::Result<()> {
    // Ctrl-c or SIGTERM drops the run: its processes are killed with their handles, its
    // network namespaces deleted and a temporary work directory removed as they drop.
    let stop = crate::cancel_on_signal();
    tokio::select! {
        r = run_to_end(a) => r,
        () = stop.cancelled() => Err(anyhow::anyhow!("interrupted")),
    }
}

async fn run_to_end(a: E2eArgs) -> anyhow::Result<()> {
    if a.workers == 0 || a.workers > MAX_WORKERS {
        bail!("--workers must be 1..={MAX_WORKERS}");
    }
    if a.disruption_interval.is_zero() {
        bail!("--disruption-interval must be positive");
    }
    if a.drain_timeout.is_zero() {
        bail!(
            "--drain-timeout must be positive (the tasks get it to finish after the disruptions)"
        );
    }
    if a.netns {
        netns::available().map_err(|e| anyhow::anyhow!("--netns is not possible here: {e}"))?;
    }
    let (kinds, left_out) = plan::for_fleet(
        plan::scenario_kinds(&a.scenario, a.netns)?,
        &a.scenario,
        a.workers,
    )?;
    if !left_out.is_empty() {
        eprintln!(
            "with one worker, left out: {} (another worker must take their tasks)",
            left_out
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let seed = a.seed.unwrap_or_else(rand::random);
    let rounds = plan::rounds(kinds.len(), a.duration, a.disruption_interval)?;
    let corrupt_rate = if a.message_mac {
        plan::CORRUPT_RATE_TAGGED
    } else {
        plan::CORRUPT_RATE
    };
    let plan = plan::plan(
        &kinds,
        rounds,
        a.workers,
        a.disruption_interval,
        seed,
        corrupt_rate,
    );
    let (temp, work) = work_dir(a.work_dir.as_deref())?;
    let temporary = temp.is_some();
    let result = run_in(&a, &work, temporary, seed, kinds, plan, corrupt_rate).await;
    kept_on_error(temp, result)
}

/// The run itself, in `work`; on any error (a process that would not start, a report that
/// could not be written, failed checks) the caller keeps the directory.
#[allow(clippy::too_many_arguments)]
async fn run_in(
    a: &E2eArgs,
    work: &Path,
    temporary: bool,
    seed: u64,
    kinds: Vec<Kind>,
    plan: Vec<plan::Disruption>,
    corrupt_rate: f64,
) -> anyhow::Result<()> {
    outln!(
        "tether e2e: seed {seed}, scenario {}, {} workers{}{}, work directory {}",
        a.scenario,
        a.workers,
        if a.message_mac { ", --message-mac" } else { "" },
        if a.netns { ", --netns" } else { "" },
        work.display()
    )?;
    let run_started = tokio::time::Instant::now();
    let mut sys = start(a, work, seed).await?;
    let stop_watch = CancellationToken::new();
    let watch_task = tokio::spawn(
        sys.watcher
            .clone()
            .run(sys.coordinator.api.clone(), stop_watch.clone()),
    );
    let outcome = drive(a, &mut sys, &plan, &kinds, seed).await;
    stop_watch.cancel();
    let _ = watch_task.await;
    // A run that ended early still stops what it started (a finished one stopped them all).
    for w in &mut sys.workers {
        w.stop().await;
    }
    sys.coordinator.stop().await;
    let (truth, observations, extra) = outcome?;
    let config = report::Config {
        workers: a.workers,
        duration_ms: a.duration.as_millis() as u64,
        disruption_interval_ms: a.disruption_interval.as_millis() as u64,
        seed,
        scenario: a.scenario.clone(),
        kinds,
        timings: TIMINGS,
        work_dir: work.to_owned(),
        temporary,
        netns: a.netns,
        message_mac: a.message_mac,
        corrupt_rate,
    };
    let logs = read_logs(&sys)?;
    let mut report = judge(&sys, &logs, config, plan, truth, observations, extra);
    report.wall_ms = run_started.elapsed().as_millis() as u64;
    if let Some(target) = &a.report {
        let (json, md) = report.write(target)?;
        outln!("report: {} and {}", json.display(), md.display())?;
    }
    print_summary(&report)?;
    if report.verdict.pass {
        outln!("verdict: PASS")?;
        Ok(())
    } else {
        outln!("verdict: FAIL")?;
        bail!("the end-to-end run failed its checks (see above)")
    }
}

/// `result`, with a temporary work directory kept when it is an error: the error may name a
/// file in it (a process's log), and `--work-dir`'s help promises the directory of a failed
/// run. Removed otherwise.
fn kept_on_error<T>(
    temp: Option<tempfile::TempDir>,
    result: anyhow::Result<T>,
) -> anyhow::Result<T> {
    if result.is_err() {
        keep(temp);
    }
    result
}

/// Keeps a temporary work directory as evidence of a failed run.
fn keep(temp: Option<tempfile::TempDir>) {
    if let Some(t) = temp {
        let kept = t.keep();
        // On the error path: a note beside the error, not output that could fail in its turn.
        eprintln!("kept the work directory {}", kept.display());
    }
}

/// The work directory: the one given (it must be empty: old event logs, state and data would
/// mix with this run's ground truth) or a new temporary one.
fn work_dir(given: Option<&Path>) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    match given {
        Some(d) => {
            if std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()) {
                bail!("the work directory {} is not empty", d.display());
            }
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            Ok((None, d.to_owned()))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("tether-e2e-")
                .tempdir()
                .context("cannot create a work directory")?;
            let p = t.path().to_owned();
            Ok((Some(t), p))
        }
    }
}

/// A fresh fleet secret in the work directory, readable by its owner only.
fn write_secret(work: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let path = work.join("fleet.secret");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let secret = tether_proto::auth::to_hex(&rand::random::<[u8; 32]>());
    opts.open(&path)
        .and_then(|mut f| f.write_all(secret.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Starts the namespaces (with `--netns`), the coordinator, the proxies and the workers.
async fn start(a: &E2eArgs, work: &Path, seed: u64) -> anyhow::Result<System> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let net = match a.netns {
        true => Some(netns::NetFleet::create(a.workers)?),
        false => None,
    };
    let secret = match a.message_mac {
        true => Some(write_secret(work)?),
        false => None,
    };
    let coordinator = Coordinator::start(&exe, work, secret.clone()).await?;
    // On loopback one proxy serves every worker; a worker in a namespace reaches the host
    // through its own veth, so each gets a proxy on its host-side address.
    let listens: Vec<std::net::SocketAddr> = match &net {
        Some(n) => n.links.iter().map(|l| (l.host_ip, 0).into()).collect(),
        None => vec!["127.0.0.1:0".parse()?],
    };
    let mut proxies = Vec::new();
    for (i, listen) in listens.into_iter().enumerate() {
        proxies.push(
            Proxy::start(ProxyConfig {
                name: format!("e2e-{i}"),
                listen,
                upstream: coordinator.addr,
                seed: seed.wrapping_add(i as u64),
            })
            .await?,
        );
    }
    let mut workers = Vec::new();
    for i in 0..a.workers {
        let mut w = Worker::new(
            &exe,
            work,
            &format!("e2e-w{}", i + 1),
            proxies[i % proxies.len()].listen_addr(),
            seed.wrapping_add(1000 * i as u64),
            net.as_ref()
                .and_then(|n| n.links.get(i))
                .map(|l| l.ns.clone()),
            secret.clone(),
        );
        w.start()?;
        workers.push(w);
    }
    Ok(System {
        coordinator,
        proxies,
        workers,
        watcher: Watcher::default(),
        netns: net,
    })
}

/// Times each disruption from the event logs and the coordinator's samples, judges the
/// ground truth, and assembles the report (its `wall_ms` is left to the caller).
fn judge(
    sys: &System,
    logs: &BTreeMap<String, Vec<Record>>,
    config: report::Config,
    plan: Vec<plan::Disruption>,
    mut truth: GroundTruth,
    mut observations: Vec<observe::Observation>,
    extra: Extra,
) -> Report {
    let samples = sys.watcher.snapshot();
    let times: Vec<_> = observations
        .iter()
        .map(|o| (o.started_at, o.removed_at))
        .collect();
    let ends = observe::window_ends(&times, extra.over_at);
    for (o, end) in observations.iter_mut().zip(ends) {
        o.analyse(logs, &samples, end);
        o.settle_from(&truth.tasks, logs);
    }
    truth.acks = acks(logs);
    truth.event_logs = sys
        .workers
        .iter()
        .map(|w| {
            let records = logs.get(&w.id).map(Vec::as_slice).unwrap_or_default();
            (w.id.clone(), observe::log_gaps(records, &w.lives))
        })
        .collect();
    truth.disruptions = observations
        .iter()
        .map(observe::Observation::view)
        .collect();
    let verdict = verdict::verdict(&truth);
    let blackholes: Vec<_> = observations
        .iter()
        .filter(|o| o.kind == Kind::Blackhole)
        .collect();
    let blackhole = BlackholeFigures {
        worker_heartbeat_timeout: TIMINGS.worker_heartbeat_timeout,
        coordinator_heartbeat_timeout: TIMINGS.coordinator_heartbeat_timeout,
        worker_detect: Figures::of(
            blackholes
                .iter()
                .flat_map(|o| o.worker_detect_ms.values().copied()),
        ),
        coordinator_detect: Figures::of(
            blackholes
                .iter()
                .flat_map(|o| o.coordinator_detect_ms.values().copied()),
        ),
    };
    Report {
        config,
        wall_ms: 0,
        plan,
        by_kind: report::by_kind(&observations),
        blackhole,
        disruptions: observations,
        workers: worker_figures(sys, logs, &extra.workers_view),
        proxy: sys.proxy_stats(),
        coordinator_starts: sys.coordinator.starts,
        tasks: extra.outcomes,
        unexpected_exits: truth.unexpected_exits.clone(),
        verdict,
    }
}

fn print_summary(report: &Report) -> anyhow::Result<()> {
    outln!()?;
    for c in &report.verdict.checks {
        outln!(
            "{} {:<28} {}",
            if c.pass { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        )?;
    }
    if let Some(note) = report::rotation_note(&report.workers) {
        outln!("{note}")?;
    }
    let b = &report.blackhole;
    let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.0}"));
    outln!(
        "blackhole detection, ms p50/p95/max: worker {}/{}/{}, coordinator {}/{}/{}",
        f(b.worker_detect.p50_ms),
        f(b.worker_detect.p95_ms),
        f(b.worker_detect.max_ms),
        f(b.coordinator_detect.p50_ms),
        f(b.coordinator_detect.p95_ms),
        f(b.coordinator_detect.max_ms)
    )?;
    Ok(())
}

/// What the run gathered besides the verdict's ground truth.
struct Extra {
    outcomes: TaskOutcomes,
    /// The end of the drain (and at least the liveness timeout and a second after the last
    /// disruption's removal): the last disruption's window ends here; later events (the
    /// workers stopped at the end) belong to none.
    over_at: chrono::DateTime<Utc>,
    workers_view: Vec<Value>,
}

type Driven = (GroundTruth, Vec<observe::Observation>, Extra);

/// Waits for the fleet, runs the plan while submitting waves, drains, reads ground truth.
async fn drive(
    a: &E2eArgs,
    sys: &mut System,
    plan: &[plan::Disruption],
    kinds: &[Kind],
    seed: u64,
) -> anyhow::Result<Driven> {
    if !sys.wait_whole().await {
        let mut missing = Vec::new();
        for w in &mut sys.workers {
            if !observe::registered_now(&observe::events_now(&w.events)) {
                let exited = w
                    .exited()
                    .map(|s| format!(", exited: {s}"))
                    .unwrap_or_default();
                missing.push(format!("{}{exited} (log: {})", w.id, w.log.display()));
            }
        }
        bail!(
            "the workers did not all register within {:?}; not registered: {}",
            disrupt::RECOVERY_TIMEOUT,
            if missing.is_empty() {
                "none by their logs, but the coordinator does not list them all".to_owned()
            } else {
                missing.join("; ")
            }
        );
    }
    outln!("{} workers registered through the proxy", sys.workers.len())?;
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x7461_736b);
    let mut sent = Submitted::default();
    submit_wave(sys, 0, &mut rng, &mut sent).await?;
    let t0 = tokio::time::Instant::now();
    let mut observations = Vec::new();
    // The ends of processes the run did not kill: any seen between disruptions, and how each
    // stopped at the end (judged by `procs::unexpected_exits`).
    let mut exits: Vec<(String, Exit)> = Vec::new();
    for d in plan {
        let first_round = d.index < kinds.len();
        if !first_round && t0.elapsed() >= a.duration {
            break;
        }
        let at = t0 + a.disruption_interval * u32::try_from(d.index).unwrap_or(u32::MAX);
        tokio::time::sleep_until(at).await;
        // A kill waits for a worker in the middle of a command task, a stop (and corruption)
        // for one holding a lease: the next wave goes first, its command task with it. After
        // the wave, one that finished just before the wait began left nothing for the wait to
        // find for 10 s; corruption would meet few results.
        let wave_first = matches!(
            d.kind,
            Kind::WorkerKill | Kind::WorkerStop | Kind::Corrupt | Kind::LeaseLoss
        );
        // A drain goes in first, then the wave: its tasks start on the other workers while it
        // lasts, and none may start on the drained one.
        let drained_at = match d.kind {
            Kind::Drain => Some(sys.drain(d).await?),
            _ => None,
        };
        let wave_first = wave_first || drained_at.is_some();
        if wave_first {
            submit_wave(sys, d.index + 1, &mut rng, &mut sent).await?;
        }
        let o = sys.apply(d, drained_at).await?;
        outln!(
            "#{:<3} {:<16} {:<8} held {:>5} ms, fired {}, fleet whole again {}{}",
            o.index,
            o.kind.as_str(),
            o.target.as_deref().unwrap_or("all"),
            (o.removed_at - o.started_at).num_milliseconds(),
            o.fired,
            o.fleet_recovered,
            if o.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", o.note)
            }
        )?;
        observations.push(o);
        for w in &mut sys.workers {
            if let Some(status) = w.exited() {
                exits.push((w.id.clone(), Exit::OnItsOwn(status)));
                w.start()?;
            }
        }
        if let Some(status) = sys.coordinator.exited() {
            exits.push(("coordinator".into(), Exit::OnItsOwn(status)));
            sys.coordinator.restart().await?;
        }
        if !wave_first {
            submit_wave(sys, d.index + 1, &mut rng, &mut sent).await?;
        }
    }
    let Submitted {
        tasks: submitted,
        bodies,
        retries,
        ..
    } = sent;
    outln!(
        "disruptions over; waiting for {} tasks to end",
        submitted.len()
    )?;
    let tasks = drain(sys, &submitted, a.drain_timeout).await?;
    // The last disruption is judged to here (`observe::window_ends`), and at least past the
    // liveness timeout after its removal: its aftermath can end a session that late. The
    // workers stop only then, so that their stopping is no part of it.
    if let Some(last) = observations.last() {
        let settled = last.removed_at + chrono::Duration::from_std(plan::past_liveness())?;
        if let Ok(left) = (settled - Utc::now()).to_std() {
            tokio::time::sleep(left).await;
        }
    }
    let over_at = Utc::now();
    // Workers stop first, so their logs hold every ack they will ever see. One that ended
    // while the tasks drained shows here: its leases moved on, and nothing else would tell.
    for w in &mut sys.workers {
        if let Some(exit) = w.stop().await {
            exits.push((w.id.clone(), exit));
        }
    }
    let mut results = BTreeMap::new();
    let mut outcomes = TaskOutcomes {
        submitted: submitted.len(),
        expected_to_fail: submitted.iter().filter(|(_, e)| *e == Expect::Fail).count(),
        retries: retries.len(),
        flaky: submitted
            .iter()
            .filter(|(_, e)| *e == Expect::Flaky)
            .count(),
        ..TaskOutcomes::default()
    };
    for t in &tasks {
        *outcomes.by_status.entry(t.status.clone()).or_default() += 1;
        if t.attempt > 1 {
            outcomes.retried += 1;
        }
    }
    for (id, _) in &submitted {
        let rows = sys
            .coordinator
            .api
            .get(&format!("/api/v1/tasks/{id}/result"))
            .await?;
        let mut v = Vec::new();
        for r in rows.as_array().into_iter().flatten() {
            let stale = r["stale"].as_bool().unwrap_or(false);
            if stale {
                outcomes.stale_results += 1;
            } else if verdict::resumed(&r["body"]["result"]) {
                outcomes.resumed_from_checkpoint += 1;
            }
            v.push(ResultView {
                attempt: r["attempt"].as_u64().unwrap_or(0) as u32,
                stale,
                outcome: r["outcome"].as_str().unwrap_or_default().to_owned(),
                result: r["body"]["result"].clone(),
            });
        }
        results.insert(id.clone(), v);
    }
    let workers_view = sys
        .coordinator
        .api
        .get("/api/v1/workers")
        .await?
        .as_array()
        .cloned()
        .unwrap_or_default();
    if let Some(exit) = sys.coordinator.stop().await {
        exits.push(("coordinator".into(), exit));
    }
    // What the API said came from the coordinator's memory; its file is read now that it
    // stopped, and the verdict holds the two together.
    let stored = stored_view(&sys.coordinator.db_path(), &submitted)?;
    let truth = GroundTruth {
        submitted,
        bodies,
        tasks,
        results,
        acks: Vec::new(),
        disruptions: Vec::new(),
        kinds: kinds.to_vec(),
        unexpected_exits: procs::unexpected_exits(&exits),
        stored: Some(stored),
        event_logs: Vec::new(),
        retries,
    };
    Ok((
        truth,
        observations,
        Extra {
            outcomes,
            over_at,
            workers_view,
        },
    ))
}

/// What the run submitted: each task with what it must do, what its counted result must say,
/// the tasks failing on purpose not yet retried (with their specs), and the retries made.
#[derive(Default)]
struct Submitted {
    tasks: Vec<(String, Expect)>,
    bodies: BTreeMap<String, verdict::Body>,
    to_retry: Vec<(String, tether_proto::TaskSpec)>,
    retries: Vec<(String, String)>,
}

impl Submitted {
    /// Task `id`, made of `spec`, that must do what `expect` says. Each id is owed its own
    /// result: one given twice would leave a task unjudged.
    fn add(
        &mut self,
        id: &str,
        spec: &tether_proto::TaskSpec,
        expect: Expect,
    ) -> anyhow::Result<()> {
        if self
            .bodies
            .insert(id.to_owned(), tasks::expected_body(spec))
            .is_some()
        {
            bail!("the coordinator gave task id {id} to two submitted tasks");
        }
        self.tasks.push((id.to_owned(), expect));
        Ok(())
    }
}

/// Submits wave `wave` ([`tasks::wave`]); before it (after the first), the retries of the
/// tasks failing on purpose that ended since ([`retry_ended`]).
async fn submit_wave(
    sys: &System,
    wave: usize,
    rng: &mut SmallRng,
    submitted: &mut Submitted,
) -> anyhow::Result<()> {
    retry_ended(sys, submitted).await?;
    let specs = tasks::wave(wave, rng)?;
    let all: Vec<&tether_proto::TaskSpec> = specs.iter().map(|(s, _)| s).collect();
    let ids = post_tasks(sys, &all)
        .await
        .context("cannot submit a wave of tasks")?;
    for (id, (spec, expect)) in ids.iter().zip(&specs) {
        submitted.add(id, spec, *expect)?;
        if *expect == Expect::Fail {
            submitted.to_retry.push((id.clone(), spec.clone()));
        }
    }
    Ok(())
}

/// Retries (`retry_of`) the tasks failing on purpose that have ended since they went in, each
/// once and as it was (so it fails again), under an id of the run's own (`ID-r`: sent again
/// after a lost answer, it is answered as the task made, not refused as a second retry). A
/// coordinator that cannot be asked now leaves them to the next wave.
async fn retry_ended(sys: &System, submitted: &mut Submitted) -> anyhow::Result<()> {
    let asked: Vec<&str> = submitted
        .to_retry
        .iter()
        .map(|(id, _)| id.as_str())
        .take(tether_coordinator::http::LIST_IDS_MAX)
        .collect();
    if asked.is_empty() {
        return Ok(());
    }
    let path = format!(
        "/api/v1/tasks?limit={}&ids={}",
        asked.len(),
        asked.join(",")
    );
    let Ok(listed) = sys.coordinator.api.get(&path).await else {
        return Ok(());
    };
    let ended: std::collections::BTreeSet<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["status"] == "failed")
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut submitted.to_retry)
        .into_iter()
        .partition(|(id, _)| ended.contains(id.as_str()));
    submitted.to_retry = later;
    if now.is_empty() {
        return Ok(());
    }
    let mut specs = Vec::new();
    for (id, spec) in &now {
        specs.push(tether_proto::TaskSpec {
            task_id: Some(tether_proto::TaskId::parse(&format!("{id}-r"))?),
            retry_of: Some(tether_proto::TaskId::parse(id)?),
            name: spec.name.as_ref().map(|n| format!("{n}-retry")),
            ..spec.clone()
        });
    }
    let made = post_tasks(sys, &specs.iter().collect::<Vec<_>>())
        .await
        .context("cannot submit the retries of the tasks failing on purpose")?;
    for ((of, _), (by, spec)) in now.iter().zip(made.iter().zip(&specs)) {
        submitted.add(by, spec, Expect::Fail)?;
        submitted.retries.push((of.clone(), by.clone()));
    }
    Ok(())
}

/// Posts `specs` as one submission, sent again (every 250 ms, 20 times at most) while the
/// coordinator cannot answer (killed, or its link cut, meanwhile); the ids it answered, one a
/// spec in their order (else an error).
async fn post_tasks(
    sys: &System,
    specs: &[&tether_proto::TaskSpec],
) -> anyhow::Result<Vec<String>> {
    let body = json!({ "tasks": specs });
    let mut last = None;
    for _ in 0..20 {
        match sys.coordinator.api.post("/api/v1/tasks", &body).await {
            Ok(v) => {
                let ids: Vec<String> = v["task_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect();
                if ids.len() != specs.len() {
                    bail!("submitted {} tasks, got {} ids", specs.len(), ids.len());
                }
                return Ok(ids);
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
}

/// Waits until every submitted task is terminal (or the deadline) and returns the list.
async fn drain(
    sys: &System,
    submitted: &[(String, Expect)],
    limit: Duration,
) -> anyhow::Result<Vec<TaskView>> {
    let end = tokio::time::Instant::now() + limit;
    loop {
        let list = sys
            .coordinator
            .api
            .get("/api/v1/tasks?limit=100000")
            .await?;
        let tasks: Vec<TaskView> = list
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| TaskView {
                id: t["task_id"].as_str().unwrap_or_default().to_owned(),
                status: t["status"].as_str().unwrap_or_default().to_owned(),
                attempt: t["attempt"].as_u64().unwrap_or(0) as u32,
                attempts: t["attempts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(attempt_view)
                    .collect(),
                retried_by: t["retried_by"].as_str().map(str::to_owned),
            })
            .collect();
        let open = tasks
            .iter()
            .filter(|t| {
                !matches!(
                    t.status.as_str(),
                    "completed" | "failed" | "cancelled" | "timed_out"
                )
            })
            .count();
        if (open == 0 && tasks.len() >= submitted.len()) || tokio::time::Instant::now() >= end {
            return Ok(tasks);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The submitted tasks and their results as the coordinator's SQLite file `db` holds them,
/// read-only (with [`crate::stress::truth`]); a file that cannot be read fails the run.
fn stored_view(db: &Path, submitted: &[(String, Expect)]) -> anyhow::Result<StoredView> {
    use crate::stress::truth;
    let ids: std::collections::HashSet<String> =
        submitted.iter().map(|(id, _)| id.clone()).collect();
    let read = || -> anyhow::Result<StoredView> {
        let mut runs = BTreeMap::new();
        let mut retry_on = BTreeMap::new();
        let (mut retry_of, mut retried_by) = (BTreeMap::new(), BTreeMap::new());
        let tasks = truth::read(db, &ids, chrono::DateTime::UNIX_EPOCH)?
            .tasks
            .into_iter()
            .filter(|(id, _)| ids.contains(id))
            .map(|(id, t)| {
                let workers = t.runs.iter().map(|a| a.worker.clone()).collect();
                let stored: Vec<verdict::StoredRun> = t
                    .runs
                    .into_iter()
                    .map(|a| verdict::StoredRun {
                        attempt: u32::try_from(a.attempt).unwrap_or(u32::MAX),
                        worker: a.worker,
                        started_at: a.started_at,
                        ended_at: a.ended_at,
                        end: a.end,
                    })
                    .collect();
                runs.insert(id.clone(), stored);
                if !t.retry_on.is_empty() {
                    retry_on.insert(id.clone(), t.retry_on);
                }
                if let Some(of) = t.retry_of {
                    retry_of.insert(id.clone(), of);
                }
                if let Some(by) = t.retried_by {
                    retried_by.insert(id.clone(), by);
                }
                (id, (t.status, workers))
            })
            .collect();
        let mut results: BTreeMap<String, Vec<ResultView>> = BTreeMap::new();
        let mut recorded_at = BTreeMap::new();
        for r in truth::results(db)?
            .into_iter()
            .filter(|r| ids.contains(&r.task))
        {
            let attempt = u32::try_from(r.attempt).unwrap_or(u32::MAX);
            if let Some(at) = r.recorded_at {
                recorded_at.insert((r.task.clone(), attempt), at);
            }
            results.entry(r.task).or_default().push(ResultView {
                attempt,
                stale: r.stale,
                outcome: r.outcome,
                result: r.result,
            });
        }
        Ok(StoredView {
            tasks,
            results,
            runs,
            recorded_at,
            retry_on,
            retry_of,
            retried_by,
        })
    };
    read().with_context(|| format!("cannot read the coordinator's database {}", db.display()))
}

/// One entry of a task's `attempts`; `None` when it does not read as one.
fn attempt_view(a: &Value) -> Option<verdict::AttemptView> {
    let at = |v: &Value| {
        v.as_str()
            .and_then(|s| s.parse::<chrono::DateTime<Utc>>().ok())
    };
    Some(verdict::AttemptView {
        worker: a["worker"].as_str()?.to_owned(),
        started_at: at(&a["started_at"])?,
        ended_at: at(&a["ended_at"]),
        end: a["end"].as_str().map(str::to_owned),
    })
}

/// Every worker's event log, as ground truth: any that cannot be read whole fails the run.
fn read_logs(sys: &System) -> anyhow::Result<BTreeMap<String, Vec<Record>>> {
    sys.workers
        .iter()
        .map(|w| Ok((w.id.clone(), observe::read_events(&w.events)?)))
        .collect()
}

fn acks(logs: &BTreeMap<String, Vec<Record>>) -> Vec<AckView> {
    let mut out = Vec::new();
    for (worker, records) in logs {
        for r in records {
            if let Event::ResultAck {
                task_id,
                attempt,
                seq,
                disposition,
            } = &r.event
            {
                out.push(AckView {
                    worker: worker.clone(),
                    task: task_id.to_string(),
                    attempt: attempt.map(|a| a.0),
                    seq: seq.0,
                    disposition: serde_json::to_value(disposition)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                });
            }
        }
    }
    out
}

fn worker_figures(
    sys: &System,
    logs: &BTreeMap<String, Vec<Record>>,
    view: &[Value],
) -> Vec<WorkerFigures> {
    sys.workers
        .iter()
        .map(|w| {
            let records = logs.get(&w.id).map(Vec::as_slice).unwrap_or_default();
            let count = |f: fn(&Event) -> bool| records.iter().filter(|r| f(&r.event)).count();
            let mut acks: BTreeMap<String, usize> = BTreeMap::new();
            for a in records.iter().filter_map(|r| match &r.event {
                Event::ResultAck { disposition, .. } => Some(disposition),
                _ => None,
            }) {
                let k = serde_json::to_value(a)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                *acks.entry(k).or_default() += 1;
            }
            let coordinator_view = view
                .iter()
                .find(|x| x["worker_id"] == w.id.as_str())
                .map(|x| json!({"sessions": x["sessions"], "state": x["state"], "stats": x["stats"]}))
                .unwrap_or(Value::Null);
            WorkerFigures {
                worker: w.id.clone(),
                process_starts: w.starts,
                sessions_registered: count(|e| matches!(e, Event::Registered { .. })),
                sessions_lost: count(|e| matches!(e, Event::SessionLost { .. })),
                sessions_declared_dead: count(|e| matches!(e, Event::SessionLost { dead: true, .. })),
                attempts_failed: count(|e| matches!(e, Event::AttemptFailed { .. })),
                rotation_failures: observe::rotation_failures(records),
                acks,
                coordinator_view,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--scenario`'s help names every kind there is, so that a kind added is not hidden.
    #[test]
    fn the_scenario_help_names_every_kind() {
        let cmd = <E2eArgs as clap::Args>::augment_args(clap::Command::new("e2e"));
        let help = cmd
            .get_arguments()
            .find(|a| a.get_id() == "scenario")
            .and_then(|a| a.get_long_help().or(a.get_help()))
            .expect("a help for --scenario")
            .to_string();
        for kind in Kind::every() {
            assert!(
                help.contains(kind.as_str()),
                "{} missing: {help}",
                kind.as_str()
            );
        }
    }

    #[test]
    fn a_temporary_work_directory_is_kept_when_the_run_fails_and_removed_when_it_passes() {
        let parent = tempfile::tempdir().expect("tempdir");
        let temp = || {
            let t = tempfile::tempdir_in(parent.path()).expect("tempdir");
            let log = t.path().join("coordinator.log");
            std::fs::write(&log, "error: cannot start\n").expect("log");
            (t, log)
        };
        let (t, log) = temp();
        let failed: anyhow::Result<()> = Err(anyhow::anyhow!("see {}", log.display()));
        assert!(kept_on_error(Some(t), failed).is_err());
        assert!(log.exists(), "the log the error names is gone");
        let (t, log) = temp();
        kept_on_error(Some(t), Ok(())).expect("passed");
        assert!(!log.exists() && !log.parent().expect("dir").exists());
    }
}
