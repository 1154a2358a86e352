//! `tether stress-fleet` (hidden): many simulated workers in one process. Each is a real
//! [`Agent`] of the worker library speaking the full protocol over its own WebSocket, with light
//! executors (`noop`, `flood`, `steps`, and the built-in `sleep`). Workers are spread over
//! several source addresses in 127.0.0.0/8 so that one process can hold more connections than
//! one address has ephemeral ports.
//!
//! The orchestrator drives the fleet with JSON lines on stdin ([`Command`]) and reads JSON
//! lines on stdout ([`Event`]): a status every [`STATUS_EVERY`], a full report on request.

use std::collections::HashSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tether_proto::WorkerId;
use tether_proto::auth::Secret;
use tether_proto::msg::StateJson;
use tether_worker::backoff::{BackoffConfig, Jitter};
use tether_worker::executor::{ExecError, ExecMetrics, Executor, Executors, TaskCtx, TaskInput};
use tether_worker::{Agent, AgentHandle, ConnState, WorkerConfig};
use tokio::io::AsyncBufReadExt;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::settings::parse_duration_arg;

mod transport;
use transport::{BoundConnector, Reset};

/// How often the fleet prints its status.
pub const STATUS_EVERY: Duration = Duration::from_millis(200);
/// How long the fleet waits for its workers to stop after the exit command before it aborts
/// those left (and counts them: [`Status::aborted`]).
pub const EXIT_DRAIN: Duration = Duration::from_secs(10);
/// How long the workers aborted at the exit have to end once aborted.
const ABORTED_WITHIN: Duration = Duration::from_secs(5);
/// Read buffer of a simulated worker's WebSocket: frames are small, and 10,000 workers in one
/// process should not hold 128 KiB each.
const FLEET_READ_BUFFER: usize = 8 * 1024;

/// The fleet's worker ids' prefix unless `--prefix` says otherwise.
pub const PREFIX: &str = "sim";

/// The id of the `i`-th worker a fleet started (from 0), over all its starts.
pub fn worker_name(prefix: &str, i: u64) -> String {
    format!("{prefix}-{i}")
}

#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// Coordinator base URL; repeat it to spread the workers over several (worker i takes the
    /// i-th modulo their number), e.g. one fault proxy each.
    #[arg(long, required = true)]
    pub coordinator: Vec<String>,
    /// Prefix of the worker ids.
    #[arg(long, default_value = PREFIX)]
    pub prefix: String,
    /// Slots per worker.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// Source addresses 127.0.0.1 .. 127.0.0.N to spread connections over.
    #[arg(long, default_value_t = 8)]
    pub source_addrs: u8,
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    pub heartbeat_interval: Duration,
    #[arg(long, default_value = "200ms", value_parser = parse_duration_arg)]
    pub backoff_initial: Duration,
    #[arg(long, default_value = "1s", value_parser = parse_duration_arg)]
    pub backoff_max: Duration,
    /// Proportional jitter of the reconnect delay.
    #[arg(long, default_value_t = 0.2)]
    pub jitter: f64,
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
    pub telemetry_interval: Duration,
    /// Seed of the workers' jitter (worker i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Workers do not offer batch frames (one message per frame, as before batching).
    #[arg(long)]
    pub no_batching: bool,
    /// Workers do not offer compact acknowledgements (one `*_ack` per message).
    #[arg(long)]
    pub no_compact_acks: bool,
    /// Fleet secret the workers authenticate with.
    #[arg(long)]
    pub secret_file: Option<std::path::PathBuf>,
    /// Workers require an integrity tag on every frame.
    #[arg(long)]
    pub message_mac: bool,
    /// CA of the coordinator's TLS certificate (the coordinator URL is wss://).
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Threads the workers run on, each a single-threaded runtime holding its share of the
    /// workers (0: one per CPU). A worker's tasks and session then share one thread: what its
    /// tasks make in one round leaves in one frame, and no task is woken across threads.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Reset each worker's connection on purpose about this often (a time drawn anew for each
    /// connection, between half and one and a half of it): its socket is shut for reading
    /// beneath TLS, so that the session ends at its next read whatever it was sending, and
    /// closes with a TCP reset, so that results go unacknowledged and are sent again in the
    /// next session.
    #[arg(long, value_parser = parse_duration_arg)]
    pub reset_every: Option<Duration>,
}

/// Orchestrator -> fleet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Start `count` new workers now.
    Start { count: u32 },
    /// Stop the live workers of these ids: gracefully, or by dropping them (a crash). The
    /// orchestrator names them ([`worker_name`] gives the id of the i-th started): whose tasks
    /// a crash must interrupt, the drained ones once they hold nothing.
    Stop { ids: Vec<String>, abrupt: bool },
    /// Print a [`Event::Report`].
    Report,
    /// Stop every worker and exit.
    Exit,
}

/// Fleet -> orchestrator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Status(Status),
    Report(FleetReport),
    /// The last line, after [`Command::Exit`] once every worker stopped: the counts with what
    /// the workers did while stopping (a worker that reconnects to hand back a result not yet
    /// acknowledged).
    Exited(Status),
}

/// Counts, printed every [`STATUS_EVERY`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub started: u64,
    pub live: u64,
    pub connected: u64,
    pub failed: u64,
    /// Live workers that registered at least once.
    #[serde(default)]
    pub registered: u64,
    /// Sessions registered, over all workers and their reconnects.
    pub registrations: u64,
    pub executions: u64,
    pub completed: u64,
    pub resumed: u64,
    pub checkpoints: u64,
    /// Checkpoints resumed from that were not what their step wrote.
    #[serde(default)]
    pub damaged: u64,
    pub flood_sent: u64,
    /// Connections the fleet reset on purpose (`--reset-every`).
    #[serde(default)]
    pub resets: u64,
    /// Workers that had not stopped [`EXIT_DRAIN`] after the exit command and were aborted:
    /// in the last status ([`Event::Exited`]) only, 0 before.
    #[serde(default)]
    pub aborted: u64,
}

/// One worker's timeline, in microseconds since the Unix epoch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    /// Which of the fleet's `--coordinator` URLs the worker connects to (its index): the
    /// fault proxy it goes through, when there are several.
    #[serde(default)]
    pub coordinator: usize,
    pub started_us: u64,
    /// Each registered session.
    pub sessions: Vec<SessionRecord>,
    /// The connection attempts before each registration (the agent's latest
    /// [`tether_worker::agent::RECENT_ATTEMPTS`] each time, twins included; the last
    /// [`ATTEMPTS_KEPT`] in all), in order: what a reconnect figure needs to find the first
    /// attempt after a fault cleared.
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// Backoff delay the worker announced last, ms.
    pub next_backoff_ms: u64,
    /// Times the worker's outbox entries started to wait for its send window, as of the
    /// report.
    #[serde(default)]
    pub send_window_full: u64,
    /// The worker's measure of its link, bytes a second, as of the report (0: none yet).
    #[serde(default)]
    pub send_bytes_per_sec: u64,
    /// Connections of this worker the fleet reset on purpose (`--reset-every`), as of the
    /// report.
    #[serde(default)]
    pub resets: u64,
    /// When the fleet stopped the worker (0: live as of the report).
    #[serde(default)]
    pub stopped_us: u64,
    /// When the worker noticed it lost its session, if it has not registered again as of the
    /// report (0: connected, or never registered): a spell away that no [`SessionRecord`]
    /// closes yet.
    #[serde(default)]
    pub away_since_us: u64,
    pub failure: Option<String>,
}

/// A registered session, in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Start of the connection attempt that succeeded.
    pub attempt_us: u64,
    /// Registration acknowledged.
    pub registered_us: u64,
    /// The backoff delay the worker waited before that attempt (0 for its first).
    pub delay_us: u64,
    /// Connection attempts the worker had made by then, this one included.
    #[serde(default)]
    pub attempts: u64,
    /// When the worker noticed it had lost its session before this one (0 for the first).
    #[serde(default)]
    pub lost_us: u64,
}

/// Attempts kept in a [`WorkerRecord`].
pub const ATTEMPTS_KEPT: usize = 256;

/// A connection attempt, in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub started_us: u64,
    /// The backoff delay waited before it.
    pub delay_us: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetReport {
    pub status: Status,
    pub workers: Vec<WorkerRecord>,
    /// When the fleet made the report: the end of what its records cover.
    #[serde(default)]
    pub at_us: u64,
}

/// Microseconds since the Unix epoch: both processes read the same clock, the one the agents
/// stamp their attempts and registrations with.
pub fn now_us() -> u64 {
    tether_worker::agent::unix_us()
}

/// A count that every shard thread adds to: a cache line per thread, summed when read. One
/// shared counter moved its line between the cores at every message of a flood.
#[derive(Debug, Default)]
struct Striped([Stripe; STRIPES]);

#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

const STRIPES: usize = 8;

impl Striped {
    fn add(&self, n: u64) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        thread_local! {
            static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
        }
        MINE.with(|&i| self.0[i].0.fetch_add(n, Ordering::Relaxed));
    }

    fn sum(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// Counters shared by the executors of every worker in the fleet.
#[derive(Debug)]
struct Shared {
    checkpoints: AtomicU64,
    /// Checkpoints resumed from that were not what their step wrote.
    damaged: AtomicU64,
    flood_sent: Striped,
    /// Connections reset on purpose (`--reset-every`).
    resets: AtomicU64,
    /// The origin of the flood clock (`in_step`).
    epoch: tokio::time::Instant,
}

impl Shared {
    fn new() -> Self {
        Self {
            checkpoints: AtomicU64::new(0),
            damaged: AtomicU64::new(0),
            flood_sent: Striped::default(),
            resets: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
        }
    }
}

struct Member {
    handle: AgentHandle,
    /// The executors' counters, fetched once: a status over 10,000 workers must be cheap.
    metrics: Vec<Arc<ExecMetrics>>,
    stop: CancellationToken,
    abort: AbortHandle,
    record: Arc<Mutex<WorkerRecord>>,
    /// Its connections reset on purpose (`--reset-every`).
    resets: Arc<AtomicU64>,
    live: bool,
}

/// The single-threaded runtimes the workers run on, worker `i` on shard `i % len`. Each runs
/// on its own thread until the fleet drops it.
struct Shards {
    handles: Vec<tokio::runtime::Handle>,
    /// Dropped to let the shards' threads finish.
    stop: tokio::sync::watch::Sender<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Shards {
    fn start(n: usize) -> anyhow::Result<Self> {
        let n = match n {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (stop, _) = tokio::sync::watch::channel(());
        let (mut handles, mut threads) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for k in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a fleet runtime")?;
            handles.push(rt.handle().clone());
            let mut stopped = stop.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("fleet-{k}"))
                .spawn(move || {
                    rt.block_on(async move { while stopped.changed().await.is_ok() {} });
                })
                .context("starting a fleet thread")?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            stop,
            threads,
        })
    }

    fn for_worker(&self, i: u64) -> &tokio::runtime::Handle {
        &self.handles[(i % self.handles.len() as u64) as usize]
    }

    /// Stops the shards' threads; what still runs on them is dropped.
    fn join(self) {
        drop(self.stop);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub async fn run(a: FleetArgs) -> anyhow::Result<()> {
    super::raise_open_files();
    let shared = Arc::new(Shared::new());
    let shards = Shards::start(a.threads)?;
    let mut members: Vec<Member> = Vec::new();
    let mut set: JoinSet<()> = JoinSet::new();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line.context("reading commands")? else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let cmd: Command = serde_json::from_str(&line)
                    .with_context(|| format!("bad command {line:?}"))?;
                match cmd {
                    Command::Start { count } => {
                        start(&a, &shared, &shards, &mut members, &mut set, count)?
                    }
                    Command::Stop { ids, abrupt } => {
                        let at = now_us();
                        let ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
                        for m in members.iter_mut().filter(|m| m.live) {
                            let mut record = m.record.lock().unwrap_or_else(|p| p.into_inner());
                            if !ids.contains(record.id.as_str()) {
                                continue;
                            }
                            record.stopped_us = at;
                            m.live = false;
                            if abrupt {
                                m.abort.abort();
                            } else {
                                m.stop.cancel();
                            }
                        }
                    }
                    Command::Report => {
                        let report = FleetReport {
                            status: status(&members, &shared),
                            workers: members.iter().map(|m| {
                                let mut r = m.record.lock().unwrap_or_else(|p| p.into_inner()).clone();
                                let stats = m.handle.stats();
                                r.next_backoff_ms = stats.next_backoff_ms;
                                r.send_bytes_per_sec = stats.send_bytes_per_sec;
                                r.send_window_full = m.handle.shared.send_window_full.load(Ordering::Relaxed);
                                r.resets = m.resets.load(Ordering::Relaxed);
                                r.away_since_us = match *m.handle.shared.state.borrow() {
                                    ConnState::Connected => 0,
                                    _ => m.handle.shared.lost_unix_us.load(Ordering::Relaxed),
                                };
                                r
                            }).collect(),
                            at_us: now_us(),
                        };
                        emit(&Event::Report(report))?;
                    }
                    Command::Exit => break,
                }
            }
            _ = tick.tick() => emit(&Event::Status(status(&members, &shared)))?,
            Some(_) = set.join_next(), if !set.is_empty() => {}
        }
    }
    for m in &members {
        m.stop.cancel();
    }
    let aborted = drain(&mut set, EXIT_DRAIN).await;
    emit(&Event::Exited(Status {
        aborted,
        ..status(&members, &shared)
    }))?;
    tokio::task::spawn_blocking(move || shards.join()).await?;
    Ok(())
}

/// Waits `within` for every worker's task in `set` to end (each told to stop), then aborts
/// those left and gives how many it aborted: workers that did not stop when told. A task
/// that ended by itself as the wait ran out is not counted; one whose shard does not get to
/// its abort within [`ABORTED_WITHIN`] (a thread held by a blocking executor) is.
async fn drain(set: &mut JoinSet<()>, within: Duration) -> u64 {
    let until = tokio::time::Instant::now() + within;
    while let Ok(Some(_)) = tokio::time::timeout_at(until, set.join_next()).await {}
    if set.is_empty() {
        return 0;
    }
    set.abort_all();
    let mut aborted = 0;
    let until = tokio::time::Instant::now() + ABORTED_WITHIN;
    loop {
        match tokio::time::timeout_at(until, set.join_next()).await {
            Ok(Some(Err(e))) if e.is_cancelled() => aborted += 1,
            // Ended by itself (or panicked) before the abort reached it.
            Ok(Some(_)) => {}
            Ok(None) => return aborted,
            Err(_) => return aborted + set.len() as u64,
        }
    }
}

fn emit(ev: &Event) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, ev)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn status(members: &[Member], shared: &Shared) -> Status {
    let mut s = Status {
        started: members.len() as u64,
        checkpoints: shared.checkpoints.load(Ordering::Relaxed),
        damaged: shared.damaged.load(Ordering::Relaxed),
        flood_sent: shared.flood_sent.sum(),
        resets: shared.resets.load(Ordering::Relaxed),
        ..Status::default()
    };
    for m in members {
        let state = m.handle.state();
        s.live += u64::from(m.live);
        s.connected += u64::from(m.live && state == ConnState::Connected);
        s.failed += u64::from(state == ConnState::Failed);
        let registrations = m.handle.registrations();
        s.registered += u64::from(m.live && registrations > 0);
        s.registrations += registrations;
        for metrics in &m.metrics {
            s.executions += metrics.executions.load(Ordering::Relaxed);
            s.completed += metrics.completed.load(Ordering::Relaxed);
            s.resumed += metrics.resumed_from_checkpoint.load(Ordering::Relaxed);
        }
    }
    s
}

fn start(
    a: &FleetArgs,
    shared: &Arc<Shared>,
    shards: &Shards,
    members: &mut Vec<Member>,
    set: &mut JoinSet<()>,
    count: u32,
) -> anyhow::Result<()> {
    let secret = a
        .secret_file
        .as_deref()
        .map(Secret::from_file)
        .transpose()
        .context("reading the fleet secret")?;
    let tls = match &a.ca_file {
        Some(ca) => Some(tokio_rustls::TlsConnector::from(
            tether_worker::connector::tls_client_config(Some(ca))
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )),
        None => None,
    };
    // Build every agent first, then start them all: a simultaneous start.
    let mut ready = Vec::with_capacity(count as usize);
    for k in 0..u64::from(count) {
        let i = members.len() as u64 + k;
        let id = worker_name(&a.prefix, i);
        let worker_id = WorkerId::parse(&id).with_context(|| format!("worker id {id}"))?;
        let coordinator = (i % a.coordinator.len() as u64) as usize;
        let url = &a.coordinator[coordinator];
        let mut cfg = WorkerConfig::new(url.clone(), worker_id);
        cfg.slots = a.slots;
        cfg.heartbeat_interval = a.heartbeat_interval;
        // As the coordinator the run starts announces it (its own takes over once welcomed).
        cfg.heartbeat_timeout = a.heartbeat_interval * 3;
        cfg.telemetry_interval = a.telemetry_interval;
        cfg.batching = !a.no_batching;
        cfg.compact_acks = !a.no_compact_acks;
        cfg.secret = secret.clone();
        cfg.require_message_mac = a.message_mac;
        cfg.backoff = BackoffConfig {
            initial: a.backoff_initial,
            max: a.backoff_max,
            jitter: Jitter::Proportional(a.jitter),
            ..BackoffConfig::default()
        };
        cfg.seed = Some(a.seed.wrapping_add(i));
        let mut executors = Executors::builtin();
        executors.register("noop", Noop);
        executors.register(
            "flood",
            Flood {
                shared: shared.clone(),
                // Spread evenly: the golden ratio's fractional multiples.
                phase: (i as f64 * 0.618_033_988_749_895).fract(),
            },
        );
        executors.register("steps", Steps(shared.clone()));
        let source = Ipv4Addr::new(127, 0, 0, 1 + (i % u64::from(a.source_addrs.max(1))) as u8);
        let resets = Arc::new(AtomicU64::new(0));
        let agent = Agent::with_transport(
            cfg,
            executors,
            BoundConnector::new(
                source,
                tls.clone(),
                a.reset_every.map(|every| Reset {
                    every,
                    shared: shared.clone(),
                    worker: resets.clone(),
                }),
            ),
        )?;
        ready.push((id, coordinator, agent, resets));
    }
    let started_us = now_us();
    for (id, coordinator, agent, resets) in ready {
        // Worker `i`, as numbered when its agent was built.
        let i = members.len() as u64;
        let handle = agent.handle();
        let metrics = handle.runner.executors().metrics().into_values().collect();
        let record = Arc::new(Mutex::new(WorkerRecord {
            id,
            coordinator,
            started_us,
            ..WorkerRecord::default()
        }));
        let stop = CancellationToken::new();
        let run = {
            let (stop, handle, record) = (stop.clone(), handle.clone(), record.clone());
            async move {
                // A task of its own on the same shard: joined with the agent's, it was polled at
                // every wake-up of the session (1.2 % of the fleet's CPU under a flood). It ends
                // on the agent's last state, or is aborted with this future (an abrupt stop).
                let watching = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watch(
                    handle,
                    record.clone(),
                )));
                let end = agent.run(stop).await;
                let _ = watching.await;
                if let Err(e) = end {
                    record.lock().unwrap_or_else(|p| p.into_inner()).failure = Some(e.to_string());
                }
            }
        };
        let abort = set.spawn_on(run, shards.for_worker(i));
        members.push(Member {
            handle,
            metrics,
            stop,
            abort,
            record,
            resets,
            live: true,
        });
    }
    Ok(())
}

/// Records when each session's attempt started, after what delay, and when it registered:
/// the instants the agent stamped as they happened, not when this task got to run (on a
/// shard with a thousand agents reconnecting at once, that was milliseconds later).
async fn watch(handle: AgentHandle, record: Arc<Mutex<WorkerRecord>>) {
    let mut rx = handle.shared.state.subscribe();
    let mut registered = 0;
    let shared = &handle.shared;
    loop {
        let state = *rx.borrow_and_update();
        match state {
            ConnState::Connected => {
                let n = handle.registrations();
                if n > registered {
                    registered = n;
                    let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
                    let seen = r.attempts.last().map_or(0, |a| a.started_us);
                    for a in shared.recent_attempts() {
                        if a.started_unix_us > seen {
                            if r.attempts.len() == ATTEMPTS_KEPT {
                                r.attempts.remove(0);
                            }
                            r.attempts.push(AttemptRecord {
                                started_us: a.started_unix_us,
                                delay_us: a.delay_us,
                            });
                        }
                    }
                    r.sessions.push(SessionRecord {
                        attempt_us: shared.attempt_started_unix_us.load(Ordering::Relaxed),
                        registered_us: shared.registered_unix_us.load(Ordering::Relaxed),
                        delay_us: shared.backoff_delay_us.load(Ordering::Relaxed),
                        attempts: handle.stats().connection_attempts,
                        lost_us: shared.lost_unix_us.load(Ordering::Relaxed),
                    });
                }
            }
            ConnState::Failed | ConnState::Shutdown => return,
            ConnState::Connecting | ConnState::Disconnected => {}
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn config<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ExecError> {
    let v = if v.is_null() {
        serde_json::json!({})
    } else {
        v
    };
    serde_json::from_value(v).map_err(|e| ExecError::InvalidConfig(e.to_string()))
}

/// `noop`: succeeds at once; the trivial task of the throughput scenarios.
struct Noop;

impl Executor for Noop {
    fn execute(
        &self,
        _input: TaskInput,
        _ctx: TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
        Box::pin(async { Ok(serde_json::Value::Null) })
    }
}

#[derive(Deserialize)]
struct FloodConfig {
    /// State updates per second.
    rate: f64,
    /// Bytes of padding in each update.
    size: usize,
    /// How long to flood.
    ms: u64,
    /// The tasks of one worker report in step: each tick falls on the worker's own phase of a
    /// fleet-wide clock, so a worker's updates leave together (one frame of several).
    #[serde(default)]
    in_step: bool,
}

/// `flood`: reports state at a set rate and size for a set time, one update per tick of
/// 1 / rate, so that no two updates of a task are made together (updates of one task coalesce
/// in the outbox while unsent: what the coordinator receives is at most this rate).
struct Flood {
    shared: Arc<Shared>,
    /// This worker's phase in the fleet's flood clock (`in_step`).
    phase: f64,
}

impl Executor for Flood {
    fn execute(
        &self,
        input: TaskInput,
        ctx: TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
        let shared = self.shared.clone();
        let phase = self.phase;
        Box::pin(async move {
            let cfg: FloodConfig = config(input.config)?;
            if !(cfg.rate.is_finite() && cfg.rate > 0.0) {
                return Err(ExecError::InvalidConfig(format!(
                    "rate {} is not positive",
                    cfg.rate
                )));
            }
            // The state's text is made as text: a tree built and serialised per update cost
            // the fleet more than the worker library's own work on it.
            let pad = "x".repeat(cfg.size);
            let end = tokio::time::Instant::now() + Duration::from_millis(cfg.ms);
            // `tether stress` refuses a rate above it; asked of the fleet directly, it is
            // capped here.
            let every = Duration::from_secs_f64(1.0 / cfg.rate)
                .max(Duration::from_secs(1) / MAX_FLOOD_TASK_RATE);
            let first = match cfg.in_step {
                // The next instant at this worker's phase of the fleet's clock.
                true => {
                    let since = shared.epoch.elapsed().as_secs_f64() / every.as_secs_f64();
                    let next = (since - phase).ceil() + phase;
                    shared.epoch + every.mul_f64(next)
                }
                false => tokio::time::Instant::now(),
            };
            let mut tick = tokio::time::interval_at(first, every);
            tick.set_missed_tick_behavior(match cfg.in_step {
                // Late ticks are skipped, so that the worker's tasks stay in step.
                true => tokio::time::MissedTickBehavior::Skip,
                false => tokio::time::MissedTickBehavior::Delay,
            });
            let mut sent = 0u64;
            // One wait for cancellation across the ticks, not one made and dropped per tick.
            let cancelled = ctx.cancelled();
            tokio::pin!(cancelled);
            loop {
                // The cancellation's wait is polled again only once it woke the task
                // (`TaskCtx::cancelled`), not at every tick.
                tokio::select! {
                    biased;
                    _ = tick.tick() => {}
                    _ = &mut cancelled => return Err(ExecError::Cancelled),
                }
                if tokio::time::Instant::now() >= end {
                    break;
                }
                sent += 1;
                let state = StateJson::from_text(flood_state(sent, &pad))
                    .map_err(|e| ExecError::InvalidConfig(e.to_string()))?;
                ctx.report_state(state).await?;
                shared.flood_sent.add(1);
            }
            Ok(serde_json::json!({"sent": sent}))
        })
    }
}

/// A flood update's text, `{"n":<n>,"pad":"<pad>"}`, made in one allocation of its final size
/// (`format!` sizes its buffer from the literal text and grew it for the pad; it was 3.7 % of
/// the fleet's samples under the flood).
fn flood_state(n: u64, pad: &str) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(pad.len() + 40);
    s.push_str(r#"{"n":"#);
    // INVARIANT: writing into a String cannot fail.
    let _ = write!(s, "{n}");
    s.push_str(r#","pad":""#);
    s.push_str(pad);
    s.push_str(r#""}"#);
    s
}

#[derive(Deserialize)]
struct StepsConfig {
    steps: u32,
    step_ms: u64,
    /// Bytes of each checkpoint (at least [`MIN_STEP_CHECKPOINT`]).
    #[serde(default)]
    size: usize,
}

/// The smallest step checkpoint: the step number and one word drawn from the task and the
/// step. With the step number alone, every task's checkpoint of a step would be the same bytes,
/// and one handed to the wrong task would pass for its own.
pub const MIN_STEP_CHECKPOINT: usize = 12;

/// A flood task's state updates a second at most: its ticks are at least the timer's
/// millisecond apart.
pub const MAX_FLOOD_TASK_RATE: u32 = 1_000;

/// The checkpoint step `step` of task `task` writes: the step number, then `size - 4` bytes
/// drawn from the task id and the step (xorshift64*: they do not compress, as a real
/// checkpoint's often do not), so that a resumed attempt can tell whether what it got is
/// exactly what its own task wrote at that step: a checkpoint of another task, or pieces of two
/// tasks mixed, differ from the first drawn word on.
pub(super) fn step_checkpoint(task: &str, step: u32, size: usize) -> Vec<u8> {
    let size = size.max(MIN_STEP_CHECKPOINT);
    let mut data = Vec::with_capacity(size);
    data.extend_from_slice(&step.to_le_bytes());
    // FNV-1a over the task id, then the step mixed in (splitmix64's finaliser), so that
    // neighbouring ids and steps start far apart; xorshift must not start at 0.
    let mut x = task.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    });
    x ^= u64::from(step).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    if x == 0 {
        x = 0x9E37_79B9_7F4A_7C15;
    }
    while data.len() < size {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let word = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        let n = (size - data.len()).min(8);
        data.extend_from_slice(&word[..n]);
    }
    data
}

/// `steps`: a long task that checkpoints after every step and resumes from its latest
/// checkpoint; the result says where it resumed. A checkpoint that is not exactly what its
/// task wrote at its step is counted as damaged (and the task starts over): pieces lost,
/// changed or reordered, or another task's checkpoint served in its place.
struct Steps(Arc<Shared>);

impl Executor for Steps {
    fn execute(
        &self,
        input: TaskInput,
        ctx: TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
        let shared = self.0.clone();
        Box::pin(async move {
            let cfg: StepsConfig = config(input.config)?;
            let task = ctx.task_id().as_str().to_owned();
            let resumed_at = match ctx.latest_checkpoint() {
                Some(d) => {
                    let step = d
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u32::from_le_bytes);
                    if *d == step_checkpoint(&task, step, cfg.size) {
                        step
                    } else {
                        shared.damaged.fetch_add(1, Ordering::Relaxed);
                        0
                    }
                }
                None => 0,
            }
            .min(cfg.steps);
            // One wait for cancellation across the steps (`TaskCtx::cancelled` allocates).
            let cancelled = ctx.cancelled();
            tokio::pin!(cancelled);
            for i in resumed_at..cfg.steps {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(cfg.step_ms)) => {}
                    _ = &mut cancelled => return Err(ExecError::Cancelled),
                }
                ctx.checkpoint(step_checkpoint(&task, i + 1, cfg.size))
                    .await;
                shared.checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            Ok(serde_json::json!({"steps": cfg.steps, "resumed_at": resumed_at}))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::{Attempt, TaskId};

    #[test]
    fn a_step_checkpoint_is_its_step_then_bytes_drawn_from_its_task_and_step() {
        for size in [MIN_STEP_CHECKPOINT, 13, 300_000] {
            let a = step_checkpoint("t-1", 7, size);
            assert_eq!(a.len(), size);
            assert_eq!(a[..4], 7u32.to_le_bytes());
            assert_eq!(
                a,
                step_checkpoint("t-1", 7, size),
                "the same task and step, the same bytes"
            );
            assert_ne!(
                a[4..12],
                step_checkpoint("t-1", 8, size)[4..12],
                "another step's differ from the first word"
            );
            assert_ne!(
                a[4..12],
                step_checkpoint("t-2", 7, size)[4..12],
                "another task's differ from the first word"
            );
        }
        assert_eq!(step_checkpoint("t-1", 7, 4).len(), MIN_STEP_CHECKPOINT);
    }

    /// Runs the `steps` executor for task `task`, resuming from `checkpoint`; the fleet's
    /// count of damaged checkpoints and where the task said it resumed.
    async fn resume_steps(task: &TaskId, checkpoint: Vec<u8>) -> (u64, serde_json::Value) {
        let shared = Arc::new(Shared::new());
        let (ctx, _control) = TaskCtx::detached(task.clone(), Attempt(2));
        let ctx = ctx.with_checkpoint(checkpoint);
        let input = TaskInput {
            task_id: task.clone(),
            attempt: Attempt(2),
            config: serde_json::json!({"steps": 3, "step_ms": 1, "size": 64}),
            timeout: None,
        };
        let run = Steps(shared.clone()).execute(input, ctx);
        let out = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the steps ended within 10 s")
            .expect("the steps succeeded");
        (
            shared.damaged.load(Ordering::Relaxed),
            out["resumed_at"].clone(),
        )
    }

    /// A coordinator that serves one task the checkpoint of another (or mixes their pieces)
    /// must fail the damaged verdict: every task's checkpoint of a step is its own bytes.
    #[tokio::test]
    async fn a_checkpoint_of_another_task_resumed_from_counts_as_damaged() {
        let (mine, other) = (TaskId::fresh(), TaskId::fresh());
        let own = step_checkpoint(mine.as_str(), 3, 64);
        assert_eq!(
            resume_steps(&mine, own).await,
            (0, serde_json::json!(3)),
            "its own checkpoint: resumed at its step"
        );
        let foreign = step_checkpoint(other.as_str(), 3, 64);
        assert_eq!(
            resume_steps(&mine, foreign).await,
            (1, serde_json::json!(0)),
            "another task's checkpoint: damaged, started over"
        );
    }

    #[test]
    fn a_flood_state_is_the_json_object_of_its_number_and_pad() {
        for (n, pad) in [(0, ""), (7, "xxx"), (u64::MAX, &*"x".repeat(1000))] {
            let text = flood_state(n, pad);
            let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(v, serde_json::json!({"n": n, "pad": pad}));
            assert!(
                text.capacity() <= pad.len() + 40,
                "one allocation of its size"
            );
        }
    }

    /// The fleet's flags, with a coordinator where nothing listens (the workers keep trying,
    /// with their backoff).
    fn unreachable_fleet() -> FleetArgs {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            a: FleetArgs,
        }
        <Flags as clap::Parser>::try_parse_from(["t", "--coordinator", "ws://127.0.0.1:1"])
            .expect("flags")
            .a
    }

    /// The tasks alive on the first shard once `want` holds of their number, or after 10 s.
    fn alive_within(shards: &Shards, want: impl Fn(usize) -> bool) -> usize {
        let alive = || shards.handles[0].metrics().num_alive_tasks();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !want(alive()) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        alive()
    }

    /// A worker stopped abruptly (its task aborted, as a crash) leaves nothing running on its
    /// shard: neither its agent nor its registration watch, which holds the agent's state and
    /// would otherwise wait for a change forever.
    #[test]
    fn an_abrupt_stop_leaves_none_of_the_workers_tasks_on_its_shard() {
        // Nothing listens there: the worker keeps trying, with its backoff.
        let a = unreachable_fleet();
        let shared = Arc::new(Shared::new());
        let shards = Shards::start(1).expect("shards");
        let (mut members, mut set) = (Vec::new(), JoinSet::new());
        start(&a, &shared, &shards, &mut members, &mut set, 1).expect("start");
        let running = alive_within(&shards, |n| n >= 2);
        assert!(
            running >= 2,
            "the worker and its watch run: {running} tasks"
        );
        members[0].abort.abort();
        assert_eq!(
            alive_within(&shards, |n| n == 0),
            0,
            "tasks left after an abrupt stop"
        );
        shards.join();
    }

    /// At the exit, the workers that stop when told end within the drain and are not counted;
    /// one that does not stop (here a task deaf to its stop, on the workers' shard) is aborted
    /// once the drain runs out, counted, and leaves nothing running: the fleet used to abort
    /// it silently, and its last status said nothing of it.
    #[test]
    fn a_worker_that_does_not_stop_when_told_is_aborted_and_counted() {
        // Nothing listens there: the workers hold no work and stop at once when told.
        let a = unreachable_fleet();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let shared = Arc::new(Shared::new());
        let shards = Shards::start(1).expect("shards");
        let (mut members, mut set) = (Vec::new(), JoinSet::new());
        start(&a, &shared, &shards, &mut members, &mut set, 2).expect("start");
        for m in &members {
            m.stop.cancel();
        }
        assert_eq!(
            rt.block_on(drain(&mut set, Duration::from_secs(10))),
            0,
            "real workers told to stop stop"
        );
        assert!(set.is_empty());

        start(&a, &shared, &shards, &mut members, &mut set, 2).expect("start");
        let deaf = CancellationToken::new();
        set.spawn_on(
            {
                let deaf = deaf.clone();
                async move { deaf.cancelled().await }
            },
            shards.for_worker(0),
        );
        for m in &members {
            m.stop.cancel();
        }
        assert_eq!(
            rt.block_on(drain(&mut set, Duration::from_millis(500))),
            1,
            "the one that did not stop"
        );
        assert!(set.is_empty());
        assert_eq!(
            alive_within(&shards, |n| n == 0),
            0,
            "tasks left on the shard after the drain"
        );
        shards.join();
    }

    /// The last status carries the count; a status from before it (or an older fleet) reads
    /// as none aborted.
    #[test]
    fn the_last_status_carries_the_workers_aborted() {
        let line = serde_json::to_string(&Event::Exited(Status {
            aborted: 3,
            ..Status::default()
        }))
        .expect("JSON");
        assert!(line.contains(r#""aborted":3"#), "{line}");
        let old: Status = serde_json::from_str(r#"{"started":1,"live":0,"connected":0,"failed":0,"registrations":1,"executions":0,"completed":0,"resumed":0,"checkpoints":0,"flood_sent":0}"#).expect("old status");
        assert_eq!(old.aborted, 0);
    }

    #[test]
    fn a_striped_count_sums_what_every_thread_added() {
        let count = Arc::new(Striped::default());
        let threads: Vec<_> = (0..12u64)
            .map(|t| {
                let count = count.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 + t {
                        count.add(1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(count.sum(), 12 * 1000 + (0..12).sum::<u64>());
    }

    /// A flood stops soon after it is cancelled, whether its ticks are quick or slow: it waits
    /// for the cancellation beside its tick. (Real time: the slack is for a busy machine; a
    /// flood of 2-second ticks that only looked at the token each tick would take up to 2 s.)
    #[tokio::test]
    async fn a_flood_stops_soon_after_it_is_cancelled_at_any_rate() {
        for rate in [25.0, 0.5] {
            let shared = Arc::new(Shared::new());
            let flood = Flood { shared, phase: 0.0 };
            let (ctx, control) = TaskCtx::detached(TaskId::fresh(), Attempt(1));
            let input = TaskInput {
                task_id: ctx.task_id().clone(),
                attempt: Attempt(1),
                config: serde_json::json!({"rate": rate, "size": 8, "ms": 60_000}),
                timeout: None,
            };
            let run = tokio::spawn(flood.execute(input, ctx));
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(!run.is_finished(), "rate {rate}: still flooding");
            control.cancel();
            let started = tokio::time::Instant::now();
            let end = run.await.expect("flood task");
            assert_eq!(end, Err(ExecError::Cancelled), "rate {rate}");
            assert!(
                started.elapsed() <= Duration::from_millis(500),
                "rate {rate}: stopped {:?} after the cancel",
                started.elapsed()
            );
        }
    }
}
