//! `tether demo`: in one process, a coordinator, a fault proxy, several workers behind it, a
//! batch of tasks, forced disconnects (a reset, the proxy going down) and a silent stall (a
//! black hole), then a summary computed from ground truth. Exit code 0 only if every task
//! completed with exactly one counted result and each fault is shown to have done its part:
//! the reset by its counter, the proxy going down by its own links and listener, the stall by
//! the bytes its blackhole dropped and a detection no sooner than silence allows.

use std::time::Duration;

use crate::output::outln;
use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;
use tether_faultproxy::{Direction, Fault, FaultKind, Proxy, ProxyConfig, Target};
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
/// to an interval earlier. Sooner, the session ended by a close or a reset, not by silence.
const SILENT_DETECTION_MIN: Duration = HEARTBEAT_TIMEOUT.saturating_sub(HEARTBEAT_INTERVAL);

struct Fleet {
    handles: Vec<AgentHandle>,
    stop: CancellationToken,
    joins: Vec<tokio::task::JoinHandle<Result<(), tether_worker::AgentError>>>,
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

    // Wait for ground truth.
    let end = tokio::time::Instant::now() + a.deadline;
    let tasks = loop {
        let list = get(&http, &api, "/api/v1/tasks?limit=100000").await?;
        let all = list.as_array().cloned().unwrap_or_default();
        let done = all.iter().filter(|t| ended(t)).count();
        if done == ids.len() || tokio::time::Instant::now() >= end {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
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
    // cancelled attempt, counted apart) is one row it stored: a
    // result recorded twice (answered `recorded` again on a resend) stores no second row but
    // counts twice. Read between two reads of its counts that agree, so none arrived between.
    let said_recorded = |o: &Value| {
        ["results_recorded", "results_stale", "results_cancelled"]
            .iter()
            .map(|c| o["counters"][c].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let mut settled = None;
    for _ in 0..20 {
        let said = said_recorded(&overview(&http, &api).await?);
        let read = read_results(&http, &api, &ids, &tasks).await?;
        let overview = overview(&http, &api).await?;
        if said == said_recorded(&overview) {
            settled = Some((read, said, overview));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (read, said, overview) =
        settled.context("results kept arriving for 5 s after every worker had stopped")?;
    let Read {
        completed,
        unfinished,
        failed,
        lost,
        twice,
        stale,
        stored,
    } = read;
    let resent = overview["counters"]["results_duplicate"]
        .as_u64()
        .unwrap_or(0);
    stop_coordinator.cancel();
    let _ = coordinator.await;

    let tally = Tally {
        asked: a.tasks as usize,
        submitted: ids.len(),
        completed,
        lost,
        twice,
        said_recorded: said,
        stored,
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
    outln!("  tasks submitted      {}", ids.len())?;
    outln!("  tasks completed      {completed}")?;
    if unfinished > 0 {
        outln!(
            "  unfinished           {unfinished} (still running when --deadline {} s passed)",
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
    outln!("  results stored       {stored} (answered recorded or stale {said} times)")?;
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

/// What the results of the submitted tasks say, read from the coordinator's API.
#[derive(Debug, Default)]
struct Read {
    /// Completed with exactly one counted result.
    completed: usize,
    /// Listed and still running when the wait ended: not lost, not done either.
    unfinished: usize,
    /// Ended other than completed, with exactly one counted result.
    failed: usize,
    lost: usize,
    /// With more than one counted result.
    twice: usize,
    stale: usize,
    /// Result rows over all tasks, counted and stale.
    stored: u64,
}

async fn read_results(
    http: &reqwest::Client,
    api: &str,
    ids: &[String],
    tasks: &[Value],
) -> anyhow::Result<Read> {
    let mut r = Read::default();
    for id in ids {
        let t = tasks.iter().find(|t| t["task_id"] == id.as_str());
        let results = get(http, api, &format!("/api/v1/tasks/{id}/result")).await?;
        let rows = results.as_array().cloned().unwrap_or_default();
        let counted = rows.iter().filter(|r| r["stale"] == false).count();
        r.stale += rows.len() - counted;
        r.stored += rows.len() as u64;
        match verdict(t, counted) {
            Verdict::Completed => r.completed += 1,
            Verdict::Unfinished => r.unfinished += 1,
            Verdict::Failed => r.failed += 1,
            Verdict::Lost => r.lost += 1,
            Verdict::Twice => r.twice += 1,
        }
    }
    Ok(r)
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

/// The verdict on a task from its listing (`None`: the coordinator does not list it) and its
/// counted results, read after the listing. A task listed as ended has its result stored
/// already (both commit together); one listed as running may have ended since, its result
/// read with the others: it is unfinished as of the listing, never lost.
fn verdict(listed: Option<&Value>, counted: usize) -> Verdict {
    match (listed, counted) {
        (None, _) => Verdict::Lost,
        (_, n) if n > 1 => Verdict::Twice,
        (Some(t), _) if !ended(t) => Verdict::Unfinished,
        (Some(_), 0) => Verdict::Lost,
        (Some(t), _) if t["status"] == "completed" => Verdict::Completed,
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
    /// Tasks completed with exactly one counted result.
    completed: usize,
    lost: usize,
    twice: usize,
    /// Results the coordinator answered `recorded` or `stale`, and the rows it stored: each
    /// answer stores one, so more answers than rows is a result recorded twice.
    said_recorded: u64,
    stored: u64,
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
        let agent = Agent::new(c, Executors::builtin())?;
        handles.push(agent.handle());
        joins.push(tokio::spawn(agent.run(stop.clone())));
    }
    Ok(Fleet {
        handles,
        stop,
        joins,
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
    fn a_task_ended_after_its_listing_is_unfinished_not_lost() {
        let listed = |status: &str| serde_json::json!({"task_id": "t-1", "status": status});
        let cases = [
            (Some(listed("completed")), 1, Verdict::Completed),
            // Ended after the listing, its result read after: what the demo miscounted as
            // lost when --deadline passed with tasks running.
            (Some(listed("running")), 1, Verdict::Unfinished),
            (Some(listed("queued")), 0, Verdict::Unfinished),
            (Some(listed("failed")), 1, Verdict::Failed),
            (Some(listed("completed")), 0, Verdict::Lost),
            (Some(listed("failed")), 0, Verdict::Lost),
            (None, 0, Verdict::Lost),
            (None, 1, Verdict::Lost),
            (Some(listed("completed")), 2, Verdict::Twice),
            (Some(listed("running")), 2, Verdict::Twice),
        ];
        for (t, counted, want) in cases {
            assert_eq!(verdict(t.as_ref(), counted), want, "{t:?} {counted}");
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
        assert_eq!(min, 1_500);
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
