//! A real `tether coordinator` whose data directory runs out of space mid-run: a tmpfs of its
//! own, mounted in a mount namespace made for it (`unshare --mount`), filled from outside
//! through `/proc/<pid>/root`. The coordinator must not stop: its commits wait for room,
//! submissions are refused at once with `503 out_of_space`, and once space is freed everything
//! waiting commits, every task ends with exactly one counted result, and new work is taken.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tether_proto::{TaskId, TaskSpec};
use tether_testkit::*;
use tether_worker::Executors;

/// Generous: the coordinator is a separate process on a small, busy machine.
const LONG: Duration = Duration::from_secs(120);
/// The tmpfs: room for the database's first pages and WAL, not for long.
const FS_SIZE: &str = "24m";

/// A `tether coordinator` in a mount namespace of its own, on a tmpfs mounted there at
/// `mount`; killed when dropped (the tmpfs goes with its namespace).
struct Confined {
    child: Child,
    mount: PathBuf,
}

impl Confined {
    fn start(addr: SocketAddr, mount: &Path, log: &Path) -> Self {
        let log = std::fs::File::create(log).expect("coordinator log");
        // `unshare` and `sh` exec in turn: the child's pid is the coordinator's.
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs -o size={FS_SIZE} tether-disk-full \"$0\" && exec \"$@\""
            ))
            .arg(mount)
            .arg(env!("CARGO_BIN_EXE_tether"))
            .args(["--log", "info", "coordinator", "--listen"])
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(mount.join("data"))
            .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "5s"])
            .args(["--lost-after", "120s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start unshare");
        Confined {
            child,
            mount: mount.to_owned(),
        }
    }

    /// A path on its tmpfs, as seen from outside its namespace.
    fn inside(&self, name: &str) -> PathBuf {
        let relative = self.mount.strip_prefix("/").expect("an absolute path");
        Path::new(&format!("/proc/{}/root", self.child.id()))
            .join(relative)
            .join(name)
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

/// Whether process `pid` has exited (a zombie not yet reaped, or gone), without reaping it.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('Z')))
        .unwrap_or(true)
}

impl Drop for Confined {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why this machine cannot mount a tmpfs in a mount namespace of its own, if it cannot: what
/// `.ci/run` provides is missing (root, util-linux), or the kernel or container refuses it.
enum Refused {
    Missing(String),
    Namespace(String),
}

fn namespaces_refused() -> Option<Refused> {
    if !nix::unistd::geteuid().is_root() {
        return Some(Refused::Missing("not root".into()));
    }
    let probe = tempfile::tempdir().expect("tempdir");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t tmpfs -o size=1m tether-probe \"$0\"")
        .arg(probe.path())
        .output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(Refused::Namespace(format!(
            "`unshare --mount` and `mount -t tmpfs` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Some(Refused::Missing(format!(
            "cannot run `unshare` (util-linux): {e}"
        ))),
    }
}

/// Fills the file system holding `filler` until a write finds no room; bounded by its size.
fn fill(filler: &Path) -> u64 {
    let mut f = std::fs::File::create(filler).expect("create the filler");
    let block = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    for _ in 0..1024 {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    written
}

fn specs(prefix: &str, n: usize) -> Vec<TaskSpec> {
    (0..n)
        .map(|i| {
            let mut s = TaskSpec::new("sleep", json!({"ms": 40, "steps": 4}));
            s.task_id = Some(TaskId::parse(&format!("{prefix}-{i}")).expect("id"));
            s
        })
        .collect()
}

async fn post_tasks(
    http: &reqwest::Client,
    base: &str,
    specs: &[TaskSpec],
) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{base}/api/v1/tasks"))
        .json(&json!({ "tasks": specs }))
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_directory_holds_the_commits_until_space_is_freed_and_loses_nothing() {
    match namespaces_refused() {
        None => {}
        Some(Refused::Missing(why)) => {
            skip_unless_ci("root and util-linux's unshare", &why);
            return;
        }
        // As the e2e test's network namespaces: in CI a refusal fails unless the CI
        // configuration records that its machine cannot have namespaces.
        Some(Refused::Namespace(why)) => {
            assert!(
                std::env::var_os("CI").is_none()
                    || std::env::var_os("TETHER_ALLOW_NETNS_SKIP").is_some(),
                "this machine refuses mount namespaces ({why}); set TETHER_ALLOW_NETNS_SKIP=1 \
                 if the CI machine cannot have namespaces"
            );
            eprintln!("skipped: this machine refuses mount namespaces ({why})");
            return;
        }
    }
    let work = tempfile::tempdir().expect("tempdir");
    let mount = work.path().join("fs");
    std::fs::create_dir(&mount).expect("mount point");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let base = format!("http://{addr}");
    let log = work.path().join("coordinator.log");
    let mut c = Confined::start(addr, &mount, &log);
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let client = Client::new(&base);
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the coordinator to answer", LONG, || async {
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let mut wcfg = fast_worker_config(&format!("ws://{addr}"), "w1");
    wcfg.slots = 8;
    let w = spawn_worker(wcfg, Executors::builtin());

    // Before: work flows.
    let before = specs("before", 20);
    let r = post_tasks(&http, &base, &before).await.expect("submitted");
    assert_eq!(r.status().as_u16(), 201);
    for s in &before {
        client
            .wait_status(s.task_id.as_ref().expect("id"), "completed")
            .await;
    }

    // The disk fills. The next submission's commit finds no room and waits; its request may
    // time out unanswered meanwhile.
    let registrations = w.handle.registrations();
    let filled = fill(&c.inside("filler"));
    assert!(filled > 0, "nothing could be written");
    let during = specs("during", 20);
    let held = {
        let (http, base, during) = (http.clone(), base.clone(), during.clone());
        tokio::spawn(async move { post_tasks(&http, &base, &during).await })
    };
    // Once it waits, a submission is refused at once, saying why. (One sent before the
    // commits found the disk full is taken: each try has an id of its own.)
    let tries = std::sync::atomic::AtomicUsize::new(0);
    let pid = c.child.id();
    let (refused_id, refused): (String, Value) =
        wait_for("a submission refused for want of space", LONG, || async {
            assert!(!exited(pid), "the coordinator stopped:\n{}", logged());
            let n = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let one = specs(&format!("try{n}"), 1);
            let r = post_tasks(&http, &base, &one).await.ok()?;
            (r.status().as_u16() == 503).then_some(())?;
            Some((format!("try{n}-0"), r.json().await.ok()?))
        })
        .await;
    assert_eq!(refused["error"]["code"], "out_of_space", "{refused}");
    // Reads and controls are answered at once too, saying why: their answers would wait for
    // the commits ahead of them (they waited until space came back, past any client's
    // patience).
    let done = before[0].task_id.as_ref().expect("id");
    for (method, path) in [
        (reqwest::Method::GET, format!("/api/v1/tasks/{done}")),
        (reqwest::Method::GET, "/api/v1/tasks".to_owned()),
        (reqwest::Method::GET, "/api/v1/overview".to_owned()),
        (
            reqwest::Method::POST,
            format!("/api/v1/tasks/{done}/cancel"),
        ),
    ] {
        let r = http
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} not answered: {e}"));
        assert_eq!(r.status().as_u16(), 503, "{method} {path}");
        assert!(r.headers().contains_key("retry-after"), "{method} {path}");
        let body: Value = r.json().await.expect("a JSON error");
        assert_eq!(
            body["error"]["code"], "out_of_space",
            "{method} {path}: {body}"
        );
    }
    // The metrics are served, saying why.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics answered")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("tether_store_out_of_space 1"), "{metrics}");
    // It waits, and does not stop: for longer than the heartbeat timeout (5 s), through which
    // the worker's telemetry waits for its acknowledgements.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(c.alive(), "the coordinator stopped:\n{}", logged());
    assert!(
        logged().contains("out of space"),
        "no error said why:\n{}",
        logged()
    );

    // Space again: what waited commits, and work flows.
    std::fs::remove_file(c.inside("filler")).expect("free the space");
    match held.await.expect("the held submission") {
        // Answered once its commit went through, or timed out waiting: sent again, the
        // coordinator has it (409) or takes it now (201), never half of it.
        Ok(r) => assert_eq!(r.status().as_u16(), 201),
        // (Refused at once while the held commit has not yet been tried again.)
        Err(_) => {
            let r = wait_for("the held submission sent again", LONG, || async {
                let r = post_tasks(&http, &base, &during).await.ok()?;
                (r.status().as_u16() != 503).then_some(r)
            })
            .await;
            assert!([201, 409].contains(&r.status().as_u16()), "{r:?}");
        }
    }
    let after = specs("after", 20);
    let r = wait_for("a submission taken again", LONG, || async {
        let r = post_tasks(&http, &base, &after).await.ok()?;
        (r.status().as_u16() != 503).then_some(r)
    })
    .await;
    assert_eq!(r.status().as_u16(), 201);
    for s in before.iter().chain(&during).chain(&after) {
        let id = s.task_id.as_ref().expect("id");
        client.wait_status(id, "completed").await;
        let results = client.results(id).await;
        let counted = results.iter().filter(|r| r["stale"] != true).count();
        assert_eq!(counted, 1, "task {id}: {results:?}");
    }
    // The worker kept its session throughout: the coordinator told it that it had what the
    // worker sent, waiting for space (it reconnected, taking the silence for lost frames).
    assert_eq!(
        w.handle.registrations(),
        registrations,
        "the worker reconnected while the store waited for space"
    );
    let (status, refused_task) = client.get(&format!("/api/v1/tasks/{refused_id}")).await;
    assert_eq!(status, 404, "a refused submission was kept: {refused_task}");
    assert!(c.alive(), "the coordinator stopped:\n{}", logged());
    assert!(
        logged().contains("space again"),
        "no word of the recovery:\n{}",
        logged()
    );
    // Written to a file, the log is plain text (no colour codes).
    assert!(!logged().contains('\u{1b}'), "colour codes in a log file");
    // What the coordinator said of it, for the reader of a run (`--nocapture`).
    for line in logged().lines().filter(|l| l.contains("space")) {
        eprintln!("{line}");
    }
    w.stop().await.expect("clean stop");
}
