//! A real `tether coordinator` process killed with SIGKILL in the middle of a run of many tasks,
//! twice (once while results stream in, once while submissions are in flight), and restarted on
//! the same `--data-dir`. Ground truth afterwards: every submitted task ends in exactly one
//! terminal state, every result a worker saw acknowledged is present, nothing is recorded twice,
//! and the history read before a kill reads the same after it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tether_proto::msg::{Disposition, WorkerMsg};
use tether_proto::{TaskId, TaskSpec};
use tether_testkit::*;
use tether_worker::{Agent, Executors};

/// Generous: the coordinator is a separate process on a small, busy machine.
const LONG: Duration = Duration::from_secs(120);
const WORKERS: usize = 4;
const BATCHES: usize = 12;
const PER_BATCH: usize = 25;

/// A `tether coordinator` child process, killed (SIGKILL) when dropped.
struct CoordinatorProcess {
    child: Child,
}

impl CoordinatorProcess {
    fn start(addr: SocketAddr, data_dir: &Path, log: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("coordinator log");
        let child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["--log", "info", "coordinator", "--listen"])
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            // Long enough that no lease moves while the coordinator is down and restarting:
            // what is checked here is durability, not the lost-worker path.
            .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "3s"])
            .args(["--lost-after", "120s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tether coordinator");
        Self { child }
    }

    /// SIGKILL, and reap it.
    fn kill(mut self) {
        self.child.kill().expect("kill coordinator");
        self.child.wait().expect("reap coordinator");
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A free address for a coordinator, its API's base URL, and an HTTP client without pooled
/// connections (one kept from before a kill would fail a request after the restart).
fn api() -> (SocketAddr, String, reqwest::Client) {
    let addr = free_addr();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client");
    (addr, format!("http://{addr}"), http)
}

/// Waits until the API answers.
async fn wait_ready(http: &reqwest::Client, base: &str) {
    wait_for("the coordinator to answer", LONG, || async {
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

/// A batch of tasks with ids chosen here, so that a submission whose reply was lost can be sent
/// again: the coordinator answers a batch it already has, the same, with 200 and makes nothing.
fn batch(n: usize) -> Vec<TaskSpec> {
    (0..PER_BATCH)
        .map(|i| {
            let k = n * PER_BATCH + i;
            // Mostly short tasks; some with checkpoints; every 10th fails on purpose.
            let config = json!({
                "ms": 100 + (k % 7) * 60,
                "steps": 4,
                "checkpoint_every": if k.is_multiple_of(3) { 2 } else { 0 },
                "fail": k % 10 == 9,
            });
            let mut spec = TaskSpec::new("sleep", config);
            spec.task_id = Some(TaskId::parse(&format!("b{n}-t{i}")).expect("id"));
            spec
        })
        .collect()
}

fn fails_on_purpose(id: &str) -> bool {
    let (b, t) = id.trim_start_matches('b').split_once("-t").expect("id");
    let k = b.parse::<usize>().expect("n") * PER_BATCH + t.parse::<usize>().expect("i");
    k % 10 == 9
}

/// Submits a batch: `Some(true)` if the reply says it was stored, `Some(false)` if it already
/// existed, `None` if the outcome is unknown (the coordinator died around the request).
async fn submit(http: &reqwest::Client, base: &str, n: usize) -> Option<bool> {
    let r = http
        .post(format!("{base}/api/v1/tasks"))
        .json(&json!({ "tasks": batch(n) }))
        .send()
        .await
        .ok()?;
    match r.status().as_u16() {
        201 => Some(true),
        200 => Some(false),
        s => panic!("unexpected status {s} for batch {n}"),
    }
}

/// The terminal tasks as the API shows them, with their counted results.
async fn history(client: &Client) -> BTreeMap<String, Value> {
    let (status, v) = client.get("/api/v1/tasks?limit=100000").await;
    assert_eq!(status, 200, "{v}");
    let list = v
        .as_array()
        .or_else(|| v["tasks"].as_array())
        .cloned()
        .expect("a task list");
    let mut out = BTreeMap::new();
    for t in list {
        if !["completed", "failed"].contains(&t["status"].as_str().unwrap_or_default()) {
            continue;
        }
        let id = t["task_id"].as_str().expect("id").to_owned();
        let tid = TaskId::parse(&id).expect("id");
        let full = client.task(&tid).await;
        let results = client.results(&tid).await;
        out.insert(
            id,
            json!({
                "status": full["status"],
                "attempt": full["attempt"],
                "finished_at": full["finished_at"],
                "outcome": full["outcome"],
                "results": results,
            }),
        );
    }
    out
}

/// Terminal tasks as `tether tasks --json` prints them, by id.
fn cli_history(addr: SocketAddr) -> BTreeMap<String, Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["tasks", "--json", "--limit", "100000", "--coordinator"])
        .arg(format!("http://{addr}"))
        .output()
        .expect("run tether tasks");
    assert!(out.status.success(), "tether tasks: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("tether tasks --json prints JSON");
    v.as_array()
        .or_else(|| v["tasks"].as_array())
        .expect("a task list")
        .iter()
        .filter(|t| ["completed", "failed"].contains(&t["status"].as_str().unwrap_or_default()))
        .map(|t| (t["task_id"].as_str().expect("id").to_owned(), t.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_twice_mid_run_loses_no_acknowledged_result_and_no_submitted_task() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (data_dir, log) = (dir.path().join("data"), dir.path().join("coordinator.log"));
    let (addr, base, http) = api();
    let client = Client::new(&base);

    let coord = CoordinatorProcess::start(addr, &data_dir, &log);
    wait_ready(&http, &base).await;

    // Workers in this process, so that every acknowledgement they receive is observed.
    type Seen = Arc<Mutex<Vec<(String, u32, Disposition)>>>;
    let seen: Seen = Arc::default();
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let mut cfg = fast_worker_config(&format!("ws://{addr}"), &format!("w{i}"));
        cfg.slots = 4;
        cfg.heartbeat_timeout = Duration::from_secs(3);
        let seen = seen.clone();
        let agent = Agent::new(cfg, Executors::builtin())
            .expect("agent")
            .on_ack(move |ack, msg| {
                if let Some(WorkerMsg::TaskResult(r)) = msg {
                    let mut s = seen.lock().expect("seen");
                    s.push((r.task_id.as_str().to_owned(), r.attempt.0, ack.disposition));
                }
            });
        workers.push(spawn_agent(agent));
    }

    // Phase 1: half the batches, then a kill while results stream in.
    let mut stored: BTreeSet<usize> = BTreeSet::new();
    for n in 0..BATCHES / 2 {
        assert_eq!(submit(&http, &base, n).await, Some(true), "batch {n}");
        stored.insert(n);
    }
    wait_for("a third of the results", LONG, || async {
        let o = client.overview().await;
        let n = o["counters"]["results_recorded"].as_u64()?;
        (n as usize >= BATCHES / 2 * PER_BATCH / 3).then_some(())
    })
    .await;
    let before_kill = history(&client).await;
    assert!(!before_kill.is_empty());
    let cli_before = cli_history(addr);
    coord.kill();
    let acked_at_kill = seen.lock().expect("seen").len();

    let coord = CoordinatorProcess::start(addr, &data_dir, &log);
    wait_ready(&http, &base).await;
    // A fresh client: the old one's pooled connections died with the process.
    let client = Client::new(&base);
    let after_restart = history(&client).await;
    let cli_after = cli_history(addr);
    for (id, before) in &cli_before {
        assert_eq!(
            cli_after.get(id),
            Some(before),
            "`tether tasks` shows task {id} the same after the restart"
        );
    }
    for (id, before) in &before_kill {
        assert_eq!(
            after_restart.get(id),
            Some(before),
            "task {id} reads the same after the restart"
        );
    }

    // Phase 2: the other half submitted one after another, and a kill among them.
    let submitter = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let mut outcomes = HashMap::new();
            for n in BATCHES / 2..BATCHES {
                outcomes.insert(n, submit(&http, &base, n).await);
                // Slow enough that the kill, made once the second of these is seen, always
                // falls among them.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            outcomes
        })
    };
    wait_for("some of the second half submitted", LONG, || async {
        let (s, _) = client
            .get(&format!("/api/v1/tasks/b{}-t0", BATCHES / 2 + 1))
            .await;
        (s == 200).then_some(())
    })
    .await;
    coord.kill();
    let outcomes = submitter.await.expect("submitter");
    eprintln!("submissions around the second kill: {outcomes:?}");
    assert!(
        outcomes.values().any(|o| *o != Some(true)),
        "the kill fell after every submission, not among them: {outcomes:?}"
    );
    let coord = CoordinatorProcess::start(addr, &data_dir, &log);
    wait_ready(&http, &base).await;
    // A fresh client: the old one's pooled connections died with the process.
    let client = Client::new(&base);
    for (n, outcome) in outcomes {
        match outcome {
            Some(true) => {
                stored.insert(n);
            }
            // Unknown or there already: send it again; a 200 proves the first one was stored.
            Some(false) | None => {
                let again = submit(&http, &base, n).await;
                assert!(again.is_some(), "the restarted coordinator answers");
                stored.insert(n);
            }
        }
    }

    // Everything submitted finishes.
    let ids: Vec<String> = stored
        .iter()
        .flat_map(|n| (0..PER_BATCH).map(move |i| format!("b{n}-t{i}")))
        .collect();
    assert_eq!(ids.len(), BATCHES * PER_BATCH);
    wait_for("every task to finish", LONG, || async {
        let o = client.overview().await;
        let done = o["tasks"]["completed"].as_u64().unwrap_or(0)
            + o["tasks"]["failed"].as_u64().unwrap_or(0);
        (done as usize == ids.len()).then_some(())
    })
    .await;
    let final_history = history(&client).await;

    // Ground truth.
    assert_eq!(
        final_history.len(),
        ids.len(),
        "every submitted task is terminal, once"
    );
    for id in &ids {
        let t = final_history
            .get(id)
            .unwrap_or_else(|| panic!("task {id} was submitted and is missing"));
        let want = if fails_on_purpose(id) {
            "failed"
        } else {
            "completed"
        };
        assert_eq!(t["status"], want, "task {id}: {t}");
        let counted: Vec<&Value> = t["results"]
            .as_array()
            .expect("results")
            .iter()
            .filter(|r| r["stale"] == false)
            .collect();
        assert_eq!(counted.len(), 1, "task {id} has one counted result: {t}");
    }
    for (id, before) in &before_kill {
        assert_eq!(
            final_history.get(id),
            Some(before),
            "task {id} never changed"
        );
    }
    let seen = seen.lock().expect("seen").clone();
    eprintln!(
        "{} result acks seen ({acked_at_kill} before the first kill)",
        seen.len()
    );
    assert!(
        seen.len() > acked_at_kill && acked_at_kill > 0,
        "results were acknowledged before and after the kills"
    );
    for (task, attempt, disposition) in &seen {
        if *disposition == Disposition::Rejected {
            panic!("a result of task {task} attempt {attempt} was rejected");
        }
        let t = &final_history[task];
        let present = t["results"]
            .as_array()
            .expect("results")
            .iter()
            .any(|r| r["attempt"] == *attempt);
        assert!(
            present,
            "acknowledged result of {task} attempt {attempt} is present: {t}"
        );
    }
    let mut recorded: HashMap<&str, usize> = HashMap::new();
    for (task, _, d) in &seen {
        if *d == Disposition::Recorded {
            *recorded.entry(task.as_str()).or_default() += 1;
        }
    }
    for (task, n) in recorded {
        assert_eq!(n, 1, "task {task} was acknowledged as recorded {n} times");
    }

    for w in workers {
        w.stop().await.expect("worker stops");
    }
    drop(coord);
}

/// State updates are journaled beside the database and folded into it about once a second: a
/// coordinator killed right after acknowledging some must still answer with the newest of them
/// (or a newer one), read from the journal at its restart. The restarted coordinator listens on
/// another port, so that the worker cannot send it anything newer before the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_right_after_acknowledging_states_still_has_the_newest() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (data_dir, log) = (dir.path().join("data"), dir.path().join("coordinator.log"));
    let (addr, base, http) = api();
    let coord = CoordinatorProcess::start(addr, &data_dir, &log);
    wait_ready(&http, &base).await;

    // The newest `current_iteration` acknowledged for each task.
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let mut cfg = fast_worker_config(&format!("ws://{addr}"), "w0");
    cfg.slots = 3;
    let seen = acked.clone();
    let agent = Agent::new(cfg, Executors::builtin())
        .expect("agent")
        .on_ack(move |_, msg| {
            if let Some(WorkerMsg::TaskState(s)) = msg
                && let Some(n) = s
                    .state
                    .to_value()
                    .ok()
                    .and_then(|v| v["current_iteration"].as_u64())
            {
                let mut seen = seen.lock().expect("acked");
                let at = seen.entry(s.task_id.as_str().to_owned()).or_default();
                *at = (*at).max(n);
            }
        });
    let worker = spawn_agent(agent);
    // Ten minutes in 100 ms steps, a state each.
    let tasks: Vec<TaskSpec> = (0..3)
        .map(|i| {
            let mut spec = TaskSpec::new("sleep", json!({"ms": 600_000, "steps": 6_000}));
            spec.task_id = Some(TaskId::parse(&format!("s{i}")).expect("id"));
            spec
        })
        .collect();
    let r = http
        .post(format!("{base}/api/v1/tasks"))
        .json(&json!({ "tasks": tasks }))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status().as_u16(), 201);
    wait_for(
        "every task to have 15 states acknowledged",
        LONG,
        || async {
            let seen = acked.lock().expect("acked");
            (seen.len() == 3 && seen.values().all(|n| *n >= 15)).then_some(())
        },
    )
    .await;
    coord.kill();
    let at_kill = acked.lock().expect("acked").clone();

    let (addr, base, http) = api();
    let coord = CoordinatorProcess::start(addr, &data_dir, &log);
    wait_ready(&http, &base).await;
    let client = Client::new(&base);
    for (task, acked) in &at_kill {
        let (status, state) = client.get(&format!("/api/v1/tasks/{task}/state")).await;
        assert_eq!(status, 200, "{task}: {state}");
        let n = state["state"]["current_iteration"].as_u64();
        assert!(
            n.is_some_and(|n| n >= *acked),
            "task {task}: state {state} after the restart, {acked} acknowledged before the kill"
        );
    }
    worker.stop().await.expect("worker stops");
    drop(coord);
}
