//! `tether demo`: in one process, a coordinator, a fault proxy, several workers behind it, a
//! batch of tasks, forced disconnects (a reset, the proxy going down) and a silent stall (a
//! black hole), then a summary computed from ground truth. Exit code 0 only if every task
//! completed with exactly one counted result and each fault is shown to have done its part:
//! the reset by its counter, the proxy going down by its own links and listener, the stall by
//! the bytes its blackhole dropped and a detection no sooner than silence allows.
//!
//! Ground truth is the coordinator's SQLite file, read read-only once the coordinator stopped
//! ([`crate::stress::truth`]), not its API (its in-memory model): every task must be there,
//! terminal, with one counted result; the API must have said the same of each task, and every
//! result the workers were told was recorded must be stored so, none told twice.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::output::outln;
use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;
use tether_faultproxy::{Direction, Fault, FaultKind, Proxy, ProxyConfig, Target};
use tether_proto::msg::{Disposition, WorkerMsg};
use tether_proto::{TaskSpec, WorkerId};
use tether_worker::backoff::{BackoffConfig, Jitter};
use tether_worker::{Agent, AgentHandle, ConnState, Executors, WorkerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct DemoArgs {
    /// Workers to run (1 to 64, in this one process).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Tasks to submit (1 to 10,000).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    tasks: u32,
    /// Seed of the fault proxy and the workers' jitter.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// How long to wait, after the faults, for every task to end; tasks still running then
    /// are reported unfinished and the demo fails.
    #[arg(long, default_value = "180s", value_parser = crate::settings::parse_duration_arg)]
    deadline: Duration,
}

/// The workers' heartbeat interval.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// The workers' liveness timeout: a session with no frame for this long is dead.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// The least time a silent stall takes to detect: the last frame before it may have come up
/// to an interval earlier, and up to two on a loaded machine, where a heartbeat comes late
/// (the suite's e2e run saw one 333 ms late at load 16). Sooner, the session ended by a close
/// or a reset, which end it at once, not by silence.
const SILENT_DETECTION_MIN: Duration =
    HEARTBEAT_TIMEOUT.saturating_sub(HEARTBEAT_INTERVAL.saturating_mul(2));

struct Fleet {
    handles: Vec<AgentHandle>,
    stop: CancellationToken,
    joins: Vec<tokio::task::JoinHandle<Result<(), tether_worker::AgentError>>>,
    /// Every result acknowledgement the workers received.
    acks: Arc<Mutex<Vec<AckSeen>>>,
}

/// A result acknowledgement a worker received: the task and attempt of the result its outbox
/// held, and what the coordinator said it did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AckSeen {
    task: String,
    attempt: u32,
    disposition: Disposition,
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let mut cfg = tether_coordinator::CoordinatorConfig::new(dir.path());
    cfg.config_check = Some(crate::run::builtin_config_check());
    cfg.heartbeat_interval = Duration::from_millis(500);
    cfg.heartbeat_timeout = Duration::from_secs(3);
    cfg.lost_after = Duration::from_secs(8);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let coord_addr = listener.local_addr()?;
    let stop_coordinator = CancellationToken::new();
    let coordinator = tokio::spawn(tether_coordinator::run(
        listener,
        cfg,
        stop_coordinator.clone(),
    ));
    let proxy = Proxy::start(ProxyConfig {
        name: "demo".into(),
        listen: "127.0.0.1:0".parse()?,
        upstream: coord_addr,
        seed: a.seed,
    })
    .await?;
    outln!(
        "coordinator on {coord_addr} (dashboard: http://{coord_addr}/), fault proxy on {}",
        proxy.listen_addr()
    )?;
    let fleet = start_fleet(&a, &format!("ws://{}", proxy.listen_addr()))?;
    for h in &fleet.handles {
        tokio::time::timeout(
            Duration::from_secs(20),
            h.wait_state(|s| s == ConnState::Connected),
        )
        .await
        .context("a worker did not connect")?;
    }
    outln!("{} workers registered", fleet.handles.len())?;
    let api = format!("http://{coord_addr}");
    // The coordinator is on loopback: a proxy from HTTP_PROXY could not reach it.
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("HTTP client")?;
    let specs: Vec<TaskSpec> = (0..a.tasks)
        .map(|i| {
            let ms = 300 + u64::from(i % 7) * 250;
            let mut s = TaskSpec::new(
                "sleep",
                serde_json::json!({"ms": ms, "steps": 10, "checkpoint_every": 2}),
            );
            s.name = Some(format!("demo-{i}"));
            s.priority = (i % 3) as u8 * 4;
            s
        })
        .collect();
    let resp: Value = http
        .post(format!("{api}/api/v1/tasks"))
        .json(&serde_json::json!({ "tasks": specs }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let ids: Vec<String> = resp["task_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    // Each id is owed its own result: one given twice would leave a task no check looks at.
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    if distinct.len() != ids.len() {
        bail!(
            "the coordinator answered {} tasks with {} distinct ids",
            ids.len(),
            distinct.len()
        );
    }
    outln!("submitted {} tasks", ids.len())?;

    // 1. A reset (RST) on the first worker's connection.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let reset = proxy
        .add_fault(
            Fault::new(
                "reset-w1",
                FaultKind::Reset { timeout_ms: 0 },
                Direction::Both,
            )
            .with_target(Target::Workers(vec![WorkerId::parse("demo-w1")?])),
        )
        .await?;
    wait_stats(|| reset.stats().connections_reset > 0, "the reset to fire").await?;
    let fired_reset = reset.remove().connections_reset;
    outln!("fault: reset demo-w1's connection ({fired_reset} reset)")?;

    // 2. The proxy goes down for 1.5 s: every link is cut and reconnects are refused, by the
    // proxy's own counters and a connection tried (reconnections alone could come from the
    // reset and the stall).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let links_before = proxy.stats();
    proxy.down().await;
    let links_after = proxy.stats();
    let refused = crate::e2e::all_refuse([proxy.listen_addr()]).await;
    let proxy_went_down = crate::e2e::proxies_went_down(&links_before, &links_after, refused);
    outln!(
        "fault: proxy down ({} links open before, {} after; listener {})",
        links_before.connections_active,
        links_after.connections_active,
        if refused {
            "refused a connection"
        } else {
            "still accepted a connection"
        }
    )?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.up().await?;
    outln!("fault: proxy up")?;

    // 3. A silent stall: everything to and from the second worker vanishes, no FIN, no RST.
    let target = if fleet.handles.len() > 1 {
        "demo-w2"
    } else {
        "demo-w1"
    };
    let stalled_worker = fleet
        .handles
        .iter()
        .find(|h| h.shared.worker_id.as_str() == target)
        .with_context(|| format!("no worker {target} in the fleet"))?
        .clone();
    tokio::time::timeout(
        Duration::from_secs(20),
        stalled_worker.wait_state(|s| s == ConnState::Connected),
    )
    .await
    .context("worker did not come back after the outage")?;
    let before = stalled_worker.registrations();
    let hole = proxy
        .add_fault(
            Fault::new("stall", FaultKind::Blackhole, Direction::Both)
                .with_target(Target::Workers(vec![WorkerId::parse(target)?])),
        )
        .await?;
    let stalled = tokio::time::Instant::now();
    let detected = tokio::time::timeout(
        Duration::from_secs(30),
        stalled_worker.wait_state(|s| s != ConnState::Connected),
    )
    .await
    .is_ok();
    let detect_ms = stalled.elapsed().as_millis() as u64;
    let dropped = hole.remove().bytes_dropped;
    outln!(
        "fault: silent stall of {target}: {} after {detect_ms} ms ({dropped} bytes dropped; silence takes {} ms at least)",
        if detected { "detected" } else { "NOT detected" },
        SILENT_DETECTION_MIN.as_millis()
    )?;

    // Wait for every task to end (by the API: only a wait; ground truth is read after).
    let end = tokio::time::Instant::now() + a.deadline;
    loop {
        let list = get(&http, &api, "/api/v1/tasks?limit=100000").await?;
        let done = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| ended(t))
            .count();
        if done == ids.len() || tokio::time::Instant::now() >= end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The workers stop (gracefully: what their tasks left is delivered first), so that no
    // result arrives while the ground truth is read, even of tasks still running when the
    // deadline passed.
    // The stalled worker comes back after its reconnect delay: with few tasks, all may have
    // ended before it did, and the check would see a stall it has yet to recover from.
    let _ = tokio::time::timeout_at(
        end.max(tokio::time::Instant::now() + Duration::from_secs(10)),
        async {
            while stalled_worker.registrations() <= before {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    let reconnections: u64 = fleet.handles.iter().map(|h| h.stats().reconnects).sum();
    let stall_reconnected = stalled_worker.registrations() > before;
    fleet.stop.cancel();
    for j in fleet.joins {
        let _ = j.await;
    }
    // Every result the coordinator answered `recorded` or `stale` (of a lost lease, or of a
    // cancelled attempt, a retried end or a worker's fault, counted apart: `RESULT_ROWS`) is
    // one row it stored: a result recorded twice
    // (answered `recorded` again on a resend) stores no second row but counts twice. Its
    // counters and what its API says of each task are read between two reads of the counters
    // that agree, so none arrived between.
    let said_recorded = |o: &Value| {
        tether_coordinator::core::Counters::RESULT_ROWS
            .iter()
            .map(|c| o["counters"][c].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let mut settled = None;
    for _ in 0..20 {
        let said = said_recorded(&overview(&http, &api).await?);
        let listed = api_view(&http, &api, &ids).await?;
        let overview = overview(&http, &api).await?;
        if said == said_recorded(&overview) {
            settled = Some((listed, said, overview));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (listed, said, overview) =
        settled.context("results kept arriving for 5 s after every worker had stopped")?;
    let resent = overview["counters"]["results_duplicate"]
        .as_u64()
        .unwrap_or(0);
    stop_coordinator.cancel();
    let _ = coordinator.await;
    // What the API said came from the coordinator's memory; its file is the ground truth.
    let db = dir.path().join(tether_coordinator::store::DB_FILE);
    let stored = stored_view(&db, &ids)
        .with_context(|| format!("cannot read the coordinator's database {}", db.display()))?;
    let acks = std::mem::take(&mut *fleet.acks.lock().unwrap_or_else(PoisonError::into_inner));
    let judged = judge(&ids, &listed, &stored, &acks);
    let Judged {
        completed,
        unfinished,
        failed,
        lost,
        twice,
        stale,
        stored,
        ref disagreements,
        ref acks_belied,
        acks_judged,
    } = judged;

    let tally = Tally {
        asked: a.tasks as usize,
        submitted: ids.len(),
        completed,
        lost,
        twice,
        said_recorded: said,
        stored,
        disagreements: disagreements.len(),
        acks_belied: acks_belied.len(),
        resets_fired: fired_reset,
        proxy_went_down,
        stall_detected: detected,
        stall_detect_ms: detect_ms,
        stall_bytes_dropped: dropped,
        stall_reconnected,
        reconnections,
        workers: fleet.handles.len(),
    };
    outln!()?;
    outln!("summary")?;
    outln!(
        "  judged from          the coordinator's database, read after it stopped; held against its API and the {acks_judged} result acknowledgements the workers received"
    )?;
    outln!("  tasks submitted      {}", ids.len())?;
    outln!("  tasks completed      {completed}")?;
    if unfinished > 0 {
        outln!(
            "  unfinished           {unfinished} (not ended in the database: still queued or running when --deadline {} s passed)",
            a.deadline.as_secs()
        )?;
    }
    if failed > 0 {
        outln!("  failed               {failed} (ended with their one result, not completed)")?;
    }
    outln!("  reconnections        {reconnections}")?;
    let yes = |b: bool| if b { "yes" } else { "NO" };
    outln!(
        "  proxy went down      {} (by its links and its listener)",
        yes(tally.proxy_went_down)
    )?;
    outln!(
        "  stall was silent     {} (bytes dropped, detected no sooner than {} ms)",
        yes(tally.stall_was_silent()),
        SILENT_DETECTION_MIN.as_millis()
    )?;
    outln!("  stalled worker back  {}", yes(stall_reconnected))?;
    outln!("  results resent       {resent} (acknowledged again, recorded once)")?;
    outln!("  stale results kept   {stale}")?;
    outln!("  lost                 {lost}")?;
    outln!("  recorded twice       {twice}")?;
    outln!(
        "  results stored       {stored} (in the database; answered recorded or stale {said} times by the coordinator's counters)"
    )?;
    outln!(
        "  API agrees           {} (each task's status and results as the database holds them)",
        yes(disagreements.is_empty())
    )?;
    outln!(
        "  acks hold            {} (each result a worker was told recorded is stored so, none told twice, each stored one told)",
        yes(acks_belied.is_empty())
    )?;
    for line in disagreements.iter().chain(acks_belied).take(20) {
        outln!("    {line}")?;
    }
    if tally.passed() {
        outln!("verdict: PASS")?;
        Ok(())
    } else {
        outln!("verdict: FAIL")?;
        if tally.submitted != tally.asked {
            bail!(
                "asked for {} tasks, the coordinator took {}",
                tally.asked,
                tally.submitted
            )
        }
        if unfinished > 0 {
            bail!(
                "{unfinished} tasks had not ended when --deadline {} s passed",
                a.deadline.as_secs()
            )
        }
        bail!("the demo's ground truth does not hold (see the summary)")
    }
}

/// The JSON the coordinator's API answers at `path`.
async fn get(http: &reqwest::Client, api: &str, path: &str) -> anyhow::Result<Value> {
    Ok(http
        .get(format!("{api}{path}"))
        .send()
        .await?
        .json()
        .await?)
}

/// The coordinator's overview: counts and counters.
async fn overview(http: &reqwest::Client, api: &str) -> anyhow::Result<Value> {
    get(http, api, "/api/v1/overview").await
}

/// One submitted task as one source (the API, the database) holds it.
#[derive(Debug, Clone, Default, PartialEq)]
struct TaskView {
    /// `None`: the source does not know the task.
    status: Option<String>,
    /// Its result rows, counted and stale: (attempt, stale), by attempt.
    results: Vec<(u32, bool)>,
}

impl TaskView {
    fn counted(&self) -> usize {
        self.results.iter().filter(|(_, stale)| !stale).count()
    }

    /// How it reads in a disagreement.
    fn said(&self) -> String {
        let rows: Vec<String> = self
            .results
            .iter()
            .map(|(n, stale)| format!("#{n} {}", if *stale { "stale" } else { "counted" }))
            .collect();
        format!(
            "{} with results [{}]",
            self.status.as_deref().unwrap_or("unknown"),
            rows.join(", ")
        )
    }
}

/// What the coordinator's API says of each of `ids`: its listing's status and its result rows.
async fn api_view(
    http: &reqwest::Client,
    api: &str,
    ids: &[String],
) -> anyhow::Result<HashMap<String, TaskView>> {
    let list = get(http, api, "/api/v1/tasks?limit=100000").await?;
    let statuses: HashMap<&str, &str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| Some((t["task_id"].as_str()?, t["status"].as_str().unwrap_or("?"))))
        .collect();
    let mut out = HashMap::new();
    for id in ids {
        let status = statuses.get(id.as_str()).map(|s| (*s).to_owned());
        let rows = get(http, api, &format!("/api/v1/tasks/{id}/result")).await?;
        let mut results: Vec<(u32, bool)> = rows
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let attempt = r["attempt"].as_u64().unwrap_or(0);
                let stale = r["stale"].as_bool().unwrap_or(false);
                (u32::try_from(attempt).unwrap_or(u32::MAX), stale)
            })
            .collect();
        results.sort();
        out.insert(id.clone(), TaskView { status, results });
    }
    Ok(out)
}

/// Each of `ids` as the coordinator's store file `db` holds it, read read-only.
fn stored_view(db: &Path, ids: &[String]) -> anyhow::Result<HashMap<String, TaskView>> {
    use crate::stress::truth;
    let submitted: HashSet<String> = ids.iter().cloned().collect();
    let mut out: HashMap<String, TaskView> =
        truth::read(db, &submitted, chrono::DateTime::UNIX_EPOCH)?
            .tasks
            .into_iter()
            .filter(|(id, _)| submitted.contains(id))
            .map(|(id, t)| {
                let view = TaskView {
                    status: Some(t.status),
                    results: Vec::new(),
                };
                (id, view)
            })
            .collect();
    for r in truth::results(db)? {
        if !submitted.contains(&r.task) {
            continue;
        }
        let attempt = u32::try_from(r.attempt).unwrap_or(u32::MAX);
        // A result row of a task the tasks table lacks is kept: the task is unknown there.
        out.entry(r.task)
            .or_default()
            .results
            .push((attempt, r.stale));
    }
    for v in out.values_mut() {
        v.results.sort();
    }
    Ok(out)
}

/// The demo's ground truth on the submitted tasks.
#[derive(Debug, Default, PartialEq)]
struct Judged {
    /// Completed with exactly one counted result, by the database.
    completed: usize,
    /// Stored, not terminal: still queued or running when the workers stopped.
    unfinished: usize,
    /// Ended other than completed, with exactly one counted result.
    failed: usize,
    /// Absent from the database, or ended without a counted result.
    lost: usize,
    /// With more than one counted result.
    twice: usize,
    stale: usize,
    /// Result rows of the submitted tasks, counted and stale.
    stored: u64,
    /// Where the API said otherwise than the database, one line a task.
    disagreements: Vec<String>,
    /// Result acknowledgements the database belies: a task acknowledged `recorded` more than
    /// once, or a result acknowledged as stored that is not stored so.
    acks_belied: Vec<String>,
    /// Result acknowledgements of the submitted tasks, judged.
    acks_judged: usize,
}

/// Judges each of `ids` by the database's view `stored` (read after the coordinator stopped),
/// holds the API's view `api` of it against that, and each result acknowledgement the workers
/// received (`acks`) against the result rows stored.
fn judge(
    ids: &[String],
    api: &HashMap<String, TaskView>,
    stored: &HashMap<String, TaskView>,
    acks: &[AckSeen],
) -> Judged {
    let mut j = Judged::default();
    let unknown = TaskView::default();
    for id in ids {
        let db = stored.get(id).unwrap_or(&unknown);
        match verdict(db.status.as_deref(), db.counted()) {
            Verdict::Completed => j.completed += 1,
            Verdict::Unfinished => j.unfinished += 1,
            Verdict::Failed => j.failed += 1,
            Verdict::Lost => j.lost += 1,
            Verdict::Twice => j.twice += 1,
        }
        j.stale += db.results.len() - db.counted();
        j.stored += db.results.len() as u64;
        let said = api.get(id).unwrap_or(&unknown);
        if said != db {
            j.disagreements.push(format!(
                "{id}: {} by the API, {} in the database",
                said.said(),
                db.said()
            ));
        }
    }
    let submitted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut recorded: HashMap<&str, Vec<u32>> = HashMap::new();
    for a in acks.iter().filter(|a| submitted.contains(a.task.as_str())) {
        j.acks_judged += 1;
        let rows = stored.get(&a.task).map_or(&[][..], |t| &t.results[..]);
        let held = match a.disposition {
            Disposition::Recorded => {
                recorded.entry(&a.task).or_default().push(a.attempt);
                rows.contains(&(a.attempt, false))
            }
            Disposition::Stale => rows.contains(&(a.attempt, true)),
            Disposition::Duplicate => rows.iter().any(|(n, _)| *n == a.attempt),
            // Not stored, by the coordinator's own word.
            Disposition::Rejected => true,
        };
        if !held {
            let db = stored.get(&a.task).unwrap_or(&unknown);
            j.acks_belied.push(format!(
                "{} attempt {}: acknowledged {} to its worker, {} in the database",
                a.task,
                a.attempt,
                disposition_word(a.disposition),
                db.said()
            ));
        }
    }
    // The other way: each result the database holds was acknowledged to the worker that sent
    // it (recorded, stale, or a duplicate of a resend), or the worker holds it still, and its
    // result is produced and not known delivered. Workers stop once what they hold is
    // acknowledged, so a row no worker heard of is an acknowledgement lost for good.
    let told: HashSet<(&str, u32)> = acks
        .iter()
        .filter(|a| a.disposition != Disposition::Rejected)
        .map(|a| (a.task.as_str(), a.attempt))
        .collect();
    for id in ids {
        for (attempt, _) in stored.get(id).map_or(&[][..], |t| &t.results[..]) {
            if !told.contains(&(id.as_str(), *attempt)) {
                j.acks_belied.push(format!(
                    "{id} attempt {attempt}: stored, and its worker was never told so"
                ));
            }
        }
    }
    let mut twice: Vec<_> = recorded.into_iter().filter(|(_, v)| v.len() > 1).collect();
    twice.sort();
    for (task, attempts) in twice {
        let attempts: Vec<String> = attempts.iter().map(|n| format!("#{n}")).collect();
        j.acks_belied.push(format!(
            "{task}: acknowledged recorded {} times (attempts {})",
            attempts.len(),
            attempts.join(", ")
        ));
    }
    j.disagreements.sort();
    j
}

/// A disposition as the protocol spells it.
fn disposition_word(d: Disposition) -> &'static str {
    match d {
        Disposition::Recorded => "recorded",
        Disposition::Duplicate => "duplicate",
        Disposition::Stale => "stale",
        Disposition::Rejected => "rejected",
    }
}

/// What became of one submitted task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Completed,
    Unfinished,
    Failed,
    Lost,
    Twice,
}

/// The verdict on a task from its stored status (`None`: the database does not hold it) and
/// its counted results. One not ended (queued or running when the workers stopped) is
/// unfinished, not lost: it is stored and would run on.
fn verdict(status: Option<&str>, counted: usize) -> Verdict {
    let ended = |s: &str| {
        tether_proto::TaskStatus::parse(s).is_some_and(tether_proto::TaskStatus::is_terminal)
    };
    match (status, counted) {
        (None, _) => Verdict::Lost,
        (_, n) if n > 1 => Verdict::Twice,
        (Some(s), _) if !ended(s) => Verdict::Unfinished,
        (Some(_), 0) => Verdict::Lost,
        (Some("completed"), _) => Verdict::Completed,
        (Some(_), _) => Verdict::Failed,
    }
}

/// What the demo counted, for its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    /// Tasks asked for (`--tasks`).
    asked: usize,
    /// Task ids the coordinator answered the submission with.
    submitted: usize,
    /// Tasks completed with exactly one counted result, by the database.
    completed: usize,
    lost: usize,
    twice: usize,
    /// Results the coordinator's counters say it answered `recorded` or `stale`, and the rows
    /// its database holds: each answer stores one, so more answers than rows is a result
    /// recorded twice.
    said_recorded: u64,
    stored: u64,
    /// Tasks the API said otherwise of than the database.
    disagreements: usize,
    /// Result acknowledgements the database belies.
    acks_belied: usize,
    resets_fired: u64,
    /// The proxy's own evidence of going down: links open before, all closed, its listener
    /// refusing.
    proxy_went_down: bool,
    stall_detected: bool,
    /// Stall to the worker's session ending.
    stall_detect_ms: u64,
    /// What the blackhole swallowed: nothing, and there was no stall to notice.
    stall_bytes_dropped: u64,
    stall_reconnected: bool,
    /// Reconnections over the fleet (the proxy going down cuts every worker once at least).
    reconnections: u64,
    workers: usize,
}

impl Tally {
    /// Every task asked for was taken and completed with exactly one counted result, and
    /// every fault did what it is there for. A count of completions alone would pass a demo
    /// whose submission came back with fewer ids, or none.
    fn passed(&self) -> bool {
        self.asked > 0
            && self.submitted == self.asked
            && self.completed == self.submitted
            && self.lost == 0
            && self.twice == 0
            && self.said_recorded == self.stored
            && self.disagreements == 0
            && self.acks_belied == 0
            && self.resets_fired > 0
            && self.proxy_went_down
            && self.stall_was_silent()
            && self.stall_reconnected
            && self.reconnections >= self.workers as u64
    }

    /// The stall ended the session by silence: the blackhole dropped bytes, and the session
    /// ended no sooner than the liveness timeout allows (a close or reset ends it at once).
    fn stall_was_silent(&self) -> bool {
        self.stall_detected
            && self.stall_bytes_dropped > 0
            && self.stall_detect_ms >= SILENT_DETECTION_MIN.as_millis() as u64
    }
}

fn start_fleet(a: &DemoArgs, url: &str) -> anyhow::Result<Fleet> {
    let stop = CancellationToken::new();
    let mut handles = Vec::new();
    let mut joins = Vec::new();
    let acks = Arc::new(Mutex::new(Vec::new()));
    for i in 1..=a.workers {
        let mut c = WorkerConfig::new(url, WorkerId::parse(&format!("demo-w{i}"))?);
        c.slots = 3;
        c.heartbeat_interval = HEARTBEAT_INTERVAL;
        c.heartbeat_timeout = HEARTBEAT_TIMEOUT;
        c.ws_ping_interval = Duration::from_secs(1);
        c.healthy_after = Duration::from_secs(2);
        c.telemetry_interval = Duration::from_secs(1);
        c.backoff = BackoffConfig {
            initial: Duration::from_millis(200),
            factor: 2.0,
            max: Duration::from_secs(2),
            jitter: Jitter::Proportional(0.2),
            max_attempts: None,
        };
        c.seed = Some(a.seed + u64::from(i));
        let seen = acks.clone();
        let agent = Agent::new(c, Executors::builtin())?.on_ack(move |ack, held| {
            if let Some(WorkerMsg::TaskResult(r)) = held {
                seen.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(AckSeen {
                        task: r.task_id.as_str().to_owned(),
                        attempt: r.attempt.0,
                        disposition: ack.disposition,
                    });
            }
        });
        handles.push(agent.handle());
        joins.push(tokio::spawn(agent.run(stop.clone())));
    }
    Ok(Fleet {
        handles,
        stop,
        joins,
        acks,
    })
}

async fn wait_stats(f: impl Fn() -> bool, what: &str) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        if tokio::time::Instant::now() >= end {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Whether a task as the API lists it has ended (a terminal status).
fn ended(t: &Value) -> bool {
    t["status"]
        .as_str()
        .and_then(tether_proto::TaskStatus::parse)
        .is_some_and(tether_proto::TaskStatus::is_terminal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passing() -> Tally {
        Tally {
            asked: 40,
            submitted: 40,
            completed: 40,
            lost: 0,
            twice: 0,
            said_recorded: 41,
            stored: 41,
            disagreements: 0,
            acks_belied: 0,
            resets_fired: 1,
            proxy_went_down: true,
            stall_detected: true,
            stall_detect_ms: 1_900,
            stall_bytes_dropped: 300,
            stall_reconnected: true,
            reconnections: 5,
            workers: 4,
        }
    }

    #[test]
    fn a_task_still_running_is_unfinished_not_lost() {
        let cases = [
            (Some("completed"), 1, Verdict::Completed),
            // Not ended when --deadline passed: what the demo once miscounted as lost.
            (Some("running"), 1, Verdict::Unfinished),
            (Some("queued"), 0, Verdict::Unfinished),
            (Some("failed"), 1, Verdict::Failed),
            (Some("completed"), 0, Verdict::Lost),
            (Some("failed"), 0, Verdict::Lost),
            (None, 0, Verdict::Lost),
            (None, 1, Verdict::Lost),
            (Some("completed"), 2, Verdict::Twice),
            (Some("running"), 2, Verdict::Twice),
        ];
        for (status, counted, want) in cases {
            assert_eq!(verdict(status, counted), want, "{status:?} {counted}");
        }
    }

    /// Tasks `a` to `d` completed by their first attempt; `b`'s second after its first was
    /// taken for lost, whose late result was kept stale.
    fn all_done() -> HashMap<String, TaskView> {
        let done = |results: &[(u32, bool)]| TaskView {
            status: Some("completed".into()),
            results: results.to_vec(),
        };
        [
            ("a", done(&[(1, false)])),
            ("b", done(&[(1, true), (2, false)])),
            ("c", done(&[(1, false)])),
            ("d", done(&[(1, false)])),
        ]
        .into_iter()
        .map(|(id, v)| (id.to_owned(), v))
        .collect()
    }

    fn ids() -> Vec<String> {
        ["a", "b", "c", "d"].map(String::from).to_vec()
    }

    fn ack(task: &str, attempt: u32, disposition: Disposition) -> AckSeen {
        AckSeen {
            task: task.into(),
            attempt,
            disposition,
        }
    }

    /// The acks of [`all_done`] as its workers would see them: each result acknowledged once.
    fn acks_of_all_done() -> Vec<AckSeen> {
        vec![
            ack("a", 1, Disposition::Recorded),
            ack("b", 1, Disposition::Stale),
            ack("b", 2, Disposition::Recorded),
            // Its first ack lost in a reset, the result sent again.
            ack("c", 1, Disposition::Duplicate),
            ack("d", 1, Disposition::Recorded),
        ]
    }

    /// The API (the coordinator's memory) says every task completed once; the database says
    /// otherwise, and the database is what the demo counts from: each task it lacks, holds
    /// unended or holds with two counted results fails, and each disagreement is named.
    #[test]
    fn the_demo_counts_from_the_database_and_names_where_the_api_disagrees() {
        let api = all_done();
        let j = judge(&ids(), &api, &api, &acks_of_all_done());
        assert_eq!((j.completed, j.stale, j.stored), (4, 1, 5), "{j:?}");
        assert!(
            j.disagreements.is_empty() && j.acks_belied.is_empty(),
            "{j:?}"
        );
        assert_eq!(j.acks_judged, 5);

        let mut db = all_done();
        db.remove("a");
        db.get_mut("b").expect("b").results = vec![(1, false), (2, false)];
        db.get_mut("d").expect("d").status = Some("running".into());
        let j = judge(&ids(), &api, &db, &[]);
        assert_eq!(
            (j.completed, j.lost, j.twice, j.unfinished),
            (1, 1, 1, 1),
            "{j:?}"
        );
        assert_eq!(
            j.disagreements,
            [
                "a: completed with results [#1 counted] by the API, unknown with results [] in the database",
                "b: completed with results [#1 stale, #2 counted] by the API, completed with results [#1 counted, #2 counted] in the database",
                "d: completed with results [#1 counted] by the API, running with results [#1 counted] in the database",
            ]
        );
        // The API alone disagreeing (a row only its memory had) fails the demo too.
        let mut said = all_done();
        said.get_mut("c").expect("c").results.push((2, true));
        let j = judge(&ids(), &said, &all_done(), &[]);
        assert_eq!(j.completed, 4);
        assert_eq!(j.disagreements.len(), 1, "{j:?}");
    }

    /// What the workers were told is held against the database: a task acknowledged recorded
    /// twice, or a result acknowledged as stored that the database does not hold so.
    #[test]
    fn an_acknowledgement_the_database_belies_fails_the_demo() {
        let db = all_done();
        let judged = |acks: &[AckSeen]| judge(&ids(), &db, &db, acks).acks_belied;
        // Recorded twice: a resend answered `recorded` again.
        let mut acks = acks_of_all_done();
        acks.push(ack("a", 1, Disposition::Recorded));
        assert_eq!(
            judged(&acks),
            ["a: acknowledged recorded 2 times (attempts #1, #1)"]
        );
        // A stale result acknowledged recorded: the database does not count it.
        let mut acks = acks_of_all_done();
        acks[1] = ack("b", 1, Disposition::Recorded);
        assert_eq!(
            judged(&acks),
            [
                "b attempt 1: acknowledged recorded to its worker, completed with results [#1 stale, #2 counted] in the database",
                "b: acknowledged recorded 2 times (attempts #1, #2)",
            ]
        );
        // A result acknowledged and not stored at all; a duplicate of nothing stored.
        for a in [
            ack("c", 2, Disposition::Stale),
            ack("d", 3, Disposition::Duplicate),
        ] {
            let mut acks = acks_of_all_done();
            acks.push(a.clone());
            assert_eq!(judged(&acks).len(), 1, "{a:?}");
        }
        // Acks of tasks the demo did not submit are not its to judge.
        let mut acks = acks_of_all_done();
        acks.push(ack("other", 1, Disposition::Recorded));
        assert!(judged(&acks).is_empty());
        // A result stored whose worker heard nothing of it (its acknowledgement lost for good,
        // the worker stopped holding it), or heard only a refusal.
        for untold in [
            ack("c", 1, Disposition::Rejected),
            ack("c", 9, Disposition::Duplicate),
        ] {
            let mut acks = acks_of_all_done();
            acks[3] = untold;
            let belied = judged(&acks);
            assert!(
                belied
                    .contains(&"c attempt 1: stored, and its worker was never told so".to_owned()),
                "{belied:?}"
            );
        }
    }

    #[test]
    fn the_demo_passes_only_when_every_task_asked_for_completed_once() {
        assert!(passing().passed());
        // No ids back, or fewer than asked: nothing, or not everything, was run.
        let none = Tally {
            submitted: 0,
            completed: 0,
            ..passing()
        };
        assert!(!none.passed());
        let fewer = Tally {
            submitted: 39,
            completed: 39,
            ..passing()
        };
        assert!(!fewer.passed());
        for broken in [
            Tally {
                completed: 39,
                lost: 1,
                ..passing()
            },
            Tally {
                completed: 39,
                twice: 1,
                ..passing()
            },
            // A resent result answered `recorded` again: no second row, a second count.
            Tally {
                said_recorded: 42,
                ..passing()
            },
            // The API said otherwise than the database, or a worker was told otherwise.
            Tally {
                disagreements: 1,
                ..passing()
            },
            Tally {
                acks_belied: 1,
                ..passing()
            },
            Tally {
                resets_fired: 0,
                ..passing()
            },
            Tally {
                stall_detected: false,
                ..passing()
            },
            Tally {
                stall_reconnected: false,
                ..passing()
            },
            Tally {
                reconnections: 3,
                ..passing()
            },
        ] {
            assert!(!broken.passed(), "{broken:?}");
        }
    }

    /// With one or two workers, the reset and the stall alone make as many reconnections as
    /// workers: only the proxy's own counters and a refused connection show it went down.
    #[test]
    fn a_proxy_down_without_the_proxy_s_evidence_fails_though_every_worker_reconnected() {
        let few = Tally {
            workers: 1,
            reconnections: 2,
            ..passing()
        };
        assert!(few.passed());
        let unproven = Tally {
            proxy_went_down: false,
            ..few
        };
        assert!(!unproven.passed());
    }

    /// A stall ended by something other than silence: at once (a close, a reset) or with
    /// nothing swallowed by the blackhole.
    #[test]
    fn a_stall_detected_sooner_than_silence_allows_or_with_nothing_dropped_fails() {
        let min = SILENT_DETECTION_MIN.as_millis() as u64;
        assert_eq!(min, 1_000);
        let at = |stall_detect_ms, stall_bytes_dropped| Tally {
            stall_detect_ms,
            stall_bytes_dropped,
            ..passing()
        };
        assert!(at(min, 1).passed());
        assert!(!at(min - 1, 300).passed());
        assert!(!at(40, 300).passed());
        assert!(!at(1_900, 0).passed());
    }
}
