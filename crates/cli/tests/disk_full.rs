//! A real `tether coordinator` whose data directory runs out of space: a tmpfs of its own,
//! mounted in a mount namespace made for it (`unshare --mount`, held by a process that sleeps
//! there, so that a coordinator may be restarted on it with `nsenter`), filled from outside
//! through `/proc/<pid>/root`. The coordinator must not stop: its commits wait for room,
//! submissions are refused at once with `503 out_of_space`, and once space is freed everything
//! waiting commits, every task ends with exactly one counted result, and new work is taken. Nor
//! must a restart while the disk is still full end it: the open waits for room.

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

/// A tmpfs mounted at `mount` in a mount namespace of its own, held by a process sleeping
/// there; coordinators run in it. Gone with the namespace when dropped.
struct Disk {
    holder: Child,
    mount: PathBuf,
}

impl Disk {
    /// A tmpfs mounted with `options` (`-o`).
    fn mount_with(mount: &Path, options: &str) -> Self {
        Disk::mounted_by(
            mount,
            &format!("mount -t tmpfs -o {options} tether-disk-full"),
        )
    }

    /// A file system mounted at `mount` by `command`, which is given the mount point last.
    fn mounted_by(mount: &Path, command: &str) -> Self {
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!("{command} \"$0\" && exec sleep 100000"))
            .arg(mount)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start unshare");
        // Once it sleeps, the file system is mounted.
        let comm = format!("/proc/{}/comm", holder.id());
        let deadline = std::time::Instant::now() + LONG;
        while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
            let exited = holder.try_wait().expect("try_wait");
            assert!(exited.is_none(), "`{command}` failed: {exited:?}");
            assert!(
                std::time::Instant::now() < deadline,
                "`{command}` never mounted"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Disk {
            holder,
            mount: mount.to_owned(),
        }
    }

    /// A path on the tmpfs, as seen from outside its namespace.
    fn inside(&self, name: &str) -> PathBuf {
        let relative = self.mount.strip_prefix("/").expect("an absolute path");
        Path::new(&format!("/proc/{}/root", self.holder.id()))
            .join(relative)
            .join(name)
    }

    /// A `tether coordinator` on `addr` with its data directory on the tmpfs, logging to
    /// `log`; killed when dropped.
    fn coordinator(&self, addr: SocketAddr, log: &Path) -> Coordinator {
        self.coordinator_by(&[], addr, log)
    }

    /// [`Disk::coordinator`], started by `wrapper` (a command that execs the rest of its
    /// arguments, as `setpriv` does; none: the coordinator itself).
    fn coordinator_by(&self, wrapper: &[&str], addr: SocketAddr, log: &Path) -> Coordinator {
        let log = std::fs::File::create(log).expect("coordinator log");
        // `nsenter` execs the coordinator (through `wrapper`, which execs it too): the child's
        // pid is the coordinator's.
        let child = Command::new("nsenter")
            .arg(format!("--target={}", self.holder.id()))
            .args(["--mount", "--"])
            .args(wrapper)
            .arg(env!("CARGO_BIN_EXE_tether"))
            .args(["--log", "info", "coordinator", "--listen"])
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(self.mount.join("data"))
            .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "5s"])
            .args(["--lost-after", "120s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nsenter");
        Coordinator { child }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

struct Coordinator {
    child: Child,
}

impl Coordinator {
    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// SIGTERM, then the exit, which must be a success (its `log` shown if not).
    async fn stop(&mut self, what: &str, log: &Path) {
        let pid = self.child.id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        wait_for(&format!("{what} to stop"), LONG, || async {
            exited(pid).then_some(())
        })
        .await;
        let status = self.child.wait().expect("wait");
        let said = std::fs::read_to_string(log).unwrap_or_default();
        assert!(status.success(), "{what}: {status}:\n{said}");
    }
}

/// Whether process `pid` has exited (a zombie not yet reaped, or gone), without reaping it.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('Z')))
        .unwrap_or(true)
}

impl Drop for Coordinator {
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
    if let Err(e) = Command::new("nsenter").arg("--version").output() {
        return Some(Refused::Missing(format!(
            "cannot run `nsenter` (util-linux): {e}"
        )));
    }
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

/// Whether this machine can run these tests; says why not (failing in CI where it must).
fn can_mount() -> bool {
    match namespaces_refused() {
        None => true,
        Some(Refused::Missing(why)) => {
            skip_unless_ci("root and util-linux's unshare and nsenter", &why);
            false
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
            false
        }
    }
}

/// A work directory with a tmpfs mounted in it (`fs`), a free loopback address for a
/// coordinator and its base URL; none where this machine cannot mount one (see
/// [`can_mount`]).
fn mounted() -> Option<(tempfile::TempDir, Disk, SocketAddr, String)> {
    mounted_with(&format!("size={FS_SIZE}"))
}

/// [`mounted`], the tmpfs mounted with `options`.
fn mounted_with(options: &str) -> Option<(tempfile::TempDir, Disk, SocketAddr, String)> {
    if !can_mount() {
        return None;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let mount = work.path().join("fs");
    std::fs::create_dir(&mount).expect("mount point");
    let disk = Disk::mount_with(&mount, options);
    let addr = free_addr();
    let base = format!("http://{addr}");
    Some((work, disk, addr, base))
}

/// A free port on the loopback.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// A coordinator on a tmpfs mounted with `options` (see [`mounted_with`]), logging to
/// `coordinator.log` in the work directory, once it answers; and a client to ask it.
/// A test binds `work` and `disk` to a name even when it does not use them (`_work`, not
/// `_`): a field left unbound is dropped at once, removing the directory or unmounting.
struct Serving {
    work: tempfile::TempDir,
    disk: Disk,
    addr: SocketAddr,
    base: String,
    log: PathBuf,
    c: Coordinator,
    http: reqwest::Client,
}

async fn serving(options: &str) -> Option<Serving> {
    let (work, disk, addr, base) = mounted_with(options)?;
    let log = work.path().join("coordinator.log");
    let c = disk.coordinator(addr, &log);
    let http = http_client();
    wait_healthy(&http, &base).await;
    Some(Serving {
        work,
        disk,
        addr,
        base,
        log,
        c,
        http,
    })
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

async fn wait_healthy(http: &reqwest::Client, base: &str) {
    wait_for("the coordinator to answer", LONG, || async {
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

/// A start's answer while its store is not open: `503 starting` with `Retry-After`, saying
/// that it waits for space.
async fn assert_starting(r: reqwest::Response) {
    let url = r.url().clone();
    assert_eq!(r.status().as_u16(), 503, "{url}");
    assert_eq!(r.headers()["retry-after"], "5", "{url}");
    let body: Value = r.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "starting", "{url}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("waiting for space"), "{url}: {body}");
}

/// Sends the submission of `specs` again until the coordinator is not busy, which takes it
/// whole (201) or had it whole already (200: the same specs are answered as `existing`).
async fn sent_again(http: &reqwest::Client, base: &str, specs: &[TaskSpec]) {
    let r = wait_for("the held submission sent again", LONG, || async {
        let r = post_tasks(http, base, specs).await.ok()?;
        (r.status().as_u16() != 503).then_some(r)
    })
    .await;
    assert!([200, 201].contains(&r.status().as_u16()), "{r:?}");
}

/// Waits until the coordinator `pid` at `base`, starting, answers that it waits for space (it
/// may say first that it opens); it must not exit meanwhile (`logged`: its log, said if it
/// did).
async fn answers_that_it_waits(
    http: &reqwest::Client,
    base: &str,
    pid: u32,
    logged: &impl Fn() -> String,
) {
    wait_for("an answer that the start waits for space", LONG, || async {
        assert!(!exited(pid), "it exited:\n{}", logged());
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        let body: Value = r.json().await.ok()?;
        let message = body["error"]["message"].as_str()?;
        message.contains("waiting for space").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_directory_holds_the_commits_until_space_is_freed_and_loses_nothing() {
    let Some(Serving {
        work: _work,
        disk,
        addr,
        base,
        log,
        mut c,
        http,
    }) = serving(&format!("size={FS_SIZE}")).await
    else {
        return;
    };
    let client = Client::new(&base);
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
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
    let filled = fill(&disk.inside("filler"));
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
    std::fs::remove_file(disk.inside("filler")).expect("free the space");
    match held.await.expect("the held submission") {
        // Answered once its commit went through, or timed out waiting: sent again, the
        // coordinator has it (200, the same specs answered as existing) or takes it now (201),
        // never half of it.
        Ok(r) => assert_eq!(r.status().as_u16(), 201),
        // (Refused at once while the held commit has not yet been tried again.)
        Err(_) => {
            let r = wait_for("the held submission sent again", LONG, || async {
                let r = post_tasks(&http, &base, &during).await.ok()?;
                (r.status().as_u16() != 503).then_some(r)
            })
            .await;
            assert!([200, 201].contains(&r.status().as_u16()), "{r:?}");
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

/// A worker that connects for the first time while the coordinator's disk is full: its
/// registration's reconciliation waits for room to commit, and so does its
/// `registration_ack` (nothing is acknowledged before it is durable). The coordinator was alive
/// but said nothing meanwhile, and the worker took the silence for a dead link after its
/// heartbeat timeout (2 s) and connected again, to wait again, every 2.3 s for as long as the
/// disk stayed full. The coordinator pings it while the ack waits for the commit: it waits on
/// its one connection, and once there is room it is acknowledged and runs work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_registering_while_the_disk_is_full_waits_on_one_connection_and_works_once_there_is_room()
 {
    let Some(Serving {
        work: _work,
        disk,
        addr,
        base,
        log,
        mut c,
        http,
    }) = serving(&format!("size={FS_SIZE}")).await
    else {
        return;
    };
    let client = Client::new(&base);
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();

    // The disk fills, and a submission's commit waits for room.
    assert!(fill(&disk.inside("filler")) > 0, "nothing could be written");
    let during = specs("during", 4);
    let held = {
        let (http, base, during) = (http.clone(), base.clone(), during.clone());
        tokio::spawn(async move { post_tasks(&http, &base, &during).await })
    };
    let tries = std::sync::atomic::AtomicUsize::new(0);
    let pid = c.child.id();
    wait_for("a submission refused for want of space", LONG, || async {
        assert!(!exited(pid), "the coordinator stopped:\n{}", logged());
        let n = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r = post_tasks(&http, &base, &specs(&format!("try{n}"), 1))
            .await
            .ok()?;
        (r.status().as_u16() == 503).then_some(())
    })
    .await;

    // A worker connects now; its registration cannot be committed, so it is not acknowledged.
    let mut wcfg = fast_worker_config(&format!("ws://{addr}"), "w-new");
    wcfg.slots = 4;
    let timeout = wcfg.heartbeat_timeout;
    let w = spawn_worker(wcfg, Executors::builtin());
    wait_for("the worker's first attempt", LONG, || async {
        (w.handle.stats().connection_attempts > 0).then_some(())
    })
    .await;
    // For three of its heartbeat timeouts it waits on that one connection: no attempt fails,
    // none follows, and no registration is acknowledged before it is committed.
    let watched = std::time::Instant::now();
    while watched.elapsed() < 3 * timeout {
        let s = w.handle.stats();
        assert_eq!(
            (s.connection_attempts, s.failed_connections),
            (1, 0),
            "the worker connected again while its registration waited for room: {s:?}"
        );
        assert_eq!(
            w.handle.registrations(),
            0,
            "acknowledged before it was durable"
        );
        assert!(c.alive(), "the coordinator stopped:\n{}", logged());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Room again: the registration commits, its ack comes on the same connection, and work
    // flows to the worker, each task to exactly one counted result.
    std::fs::remove_file(disk.inside("filler")).expect("free the space");
    wait_for("the worker's registration", LONG, || async {
        (w.handle.registrations() == 1).then_some(())
    })
    .await;
    let held_ok =
        matches!(held.await.expect("the held submission"), Ok(r) if r.status().as_u16() == 201);
    if !held_ok {
        sent_again(&http, &base, &during).await;
    }
    let after = specs("after", 4);
    let r = post_tasks(&http, &base, &after).await.expect("submitted");
    assert_eq!(r.status().as_u16(), 201);
    for s in during.iter().chain(&after) {
        let id = s.task_id.as_ref().expect("id");
        client.wait_status(id, "completed").await;
        let results = client.results(id).await;
        let counted = results.iter().filter(|r| r["stale"] != true).count();
        assert_eq!(counted, 1, "task {id}: {results:?}");
    }
    let s = w.handle.stats();
    assert_eq!(
        (
            s.connection_attempts,
            s.failed_connections,
            s.disconnections
        ),
        (1, 0, 0),
        "{s:?}"
    );
    assert_eq!(w.handle.registrations(), 1);
    assert!(c.alive(), "the coordinator stopped:\n{}", logged());
    w.stop().await.expect("clean stop");
}

/// The state journal files in the data directory `data`.
fn journals(data: &Path) -> Vec<String> {
    let names = std::fs::read_dir(data).expect("the data directory");
    names
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("states-") && n.ends_with(".journal"))
        .collect()
}

/// A coordinator stopped (SIGTERM) while its commits wait for space leaves its state journal
/// to the next start. Restarted while the disk is still full, the next one could neither read
/// its database (no room for the WAL's index: it was refused as corrupt) nor replay the
/// journal, and exited, again at every restart by its supervisor. It waits for room instead
/// (a SIGTERM meanwhile ends it at once, changing nothing), and once there is some it replays
/// the journal and serves, having lost nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_while_its_disk_is_still_full_waits_for_room_and_loses_nothing() {
    let Some((work, disk, addr, base)) = mounted() else {
        return;
    };
    let (first_log, second_log) = (
        work.path().join("first.log"),
        work.path().join("second.log"),
    );
    let mut first = disk.coordinator(addr, &first_log);
    let http = http_client();
    let client = Client::new(&base);
    let logged = |log: &Path| std::fs::read_to_string(log).unwrap_or_default();
    wait_healthy(&http, &base).await;
    let mut wcfg = fast_worker_config(&format!("ws://{addr}"), "w1");
    wcfg.slots = 8;
    let w = spawn_worker(wcfg, Executors::builtin());

    // Tasks that run through the stop and the restart, a state journaled at each step.
    let long: Vec<TaskSpec> = (0..8)
        .map(|i| {
            let mut s = TaskSpec::new("sleep", json!({"ms": 6000, "steps": 60}));
            s.task_id = Some(TaskId::parse(&format!("long-{i}")).expect("id"));
            s
        })
        .collect();
    let r = post_tasks(&http, &base, &long).await.expect("submitted");
    assert_eq!(r.status().as_u16(), 201);
    for s in &long {
        let id = s.task_id.as_ref().expect("id");
        wait_for(&format!("a state of {id}"), LONG, || async {
            let (status, state) = client.get(&format!("/api/v1/tasks/{id}/state")).await;
            (status == 200 && !state.is_null()).then_some(())
        })
        .await;
    }

    // The disk fills, and a submission's commit waits for room.
    fill(&disk.inside("filler"));
    let during = specs("during", 10);
    let held = {
        let (http, base, during) = (http.clone(), base.clone(), during.clone());
        tokio::spawn(async move { post_tasks(&http, &base, &during).await })
    };
    let tries = std::sync::atomic::AtomicUsize::new(0);
    let pid = first.child.id();
    wait_for("a submission refused for want of space", LONG, || async {
        assert!(
            !exited(pid),
            "the coordinator stopped:\n{}",
            logged(&first_log)
        );
        let n = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r = post_tasks(&http, &base, &specs(&format!("try{n}"), 1))
            .await
            .ok()?;
        (r.status().as_u16() == 503).then_some(())
    })
    .await;

    // Stopped while it waits: the waiting group is given up, and the journal stays.
    first.stop("the first coordinator", &first_log).await;
    held.abort();
    let data = disk.inside("data");
    assert!(
        !journals(&data).is_empty(),
        "no state journal left for the next start"
    );
    // Whether the next open needs room depends on what the close could leave: a close that
    // could not checkpoint leaves the WAL's index, and an open that finds one (and WAL pages to
    // reuse) needs no new space. Without it, as after a close that could remove it, the open
    // must make a new index from the WAL, which takes room: that is the start tested here
    // (with the index there, it opened in about one run in four, and commits waited instead).
    // No process has the database open, so the index is safe to remove.
    match std::fs::remove_file(data.join("tether.db-shm")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing the WAL's index: {e}"),
    }
    // What its close freed is taken too: the next start finds the disk full.
    fill(&disk.inside("filler2"));

    // Restarted on the full disk: it waits for room, neither exiting nor serving.
    let mut second = disk.coordinator(addr, &second_log);
    let second_pid = second.child.id();
    let waiting = "the store cannot be opened";
    wait_for("the open to wait for room", LONG, || async {
        assert!(!exited(second_pid), "it exited:\n{}", logged(&second_log));
        logged(&second_log).contains(waiting).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(second.alive(), "it exited:\n{}", logged(&second_log));
    assert!(
        !logged(&second_log).contains("corrupt"),
        "{}",
        logged(&second_log)
    );
    // It answers, saying that it waits: every request `503 starting`.
    let healthz = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("answered while the open waits");
    assert_starting(healthz).await;

    // Stopped while the open waits: it ends at once, having started and changed nothing.
    let left = journals(&data);
    second.stop("the waiting coordinator", &second_log).await;
    assert_eq!(
        journals(&data),
        left,
        "the journal is left to the next start"
    );

    // Started again on the still full disk: it waits for room as the one before.
    let third_log = work.path().join("third.log");
    let mut second = disk.coordinator(addr, &third_log);
    let second_log = third_log;
    let second_pid = second.child.id();
    wait_for("the open to wait for room again", LONG, || async {
        assert!(!exited(second_pid), "it exited:\n{}", logged(&second_log));
        logged(&second_log).contains(waiting).then_some(())
    })
    .await;

    // Room again: it opens, replays the journal, and serves.
    std::fs::remove_file(disk.inside("filler")).expect("free the space");
    std::fs::remove_file(disk.inside("filler2")).expect("free the space");
    wait_healthy(&http, &base).await;
    let said = logged(&second_log);
    assert!(said.contains("space again: the store is open"), "{said}");
    let replayed = said
        .lines()
        .find(|l| l.contains("state journal replayed"))
        .unwrap_or_else(|| panic!("no journal replayed:\n{said}"));
    assert!(!replayed.contains(" states=0"), "{replayed}");
    // The submission given up at the stop, sent again: taken whole (or had whole already).
    sent_again(&http, &base, &during).await;
    let after = specs("after", 10);
    let r = post_tasks(&http, &base, &after).await.expect("submitted");
    assert_eq!(r.status().as_u16(), 201);
    for s in long.iter().chain(&during).chain(&after) {
        let id = s.task_id.as_ref().expect("id");
        client.wait_status(id, "completed").await;
        let results = client.results(id).await;
        let counted = results.iter().filter(|r| r["stale"] != true).count();
        assert_eq!(counted, 1, "task {id}: {results:?}");
    }
    assert!(second.alive(), "it stopped:\n{}", logged(&second_log));
    for line in logged(&second_log).lines().filter(|l| l.contains("space")) {
        eprintln!("{line}");
    }
    w.stop().await.expect("clean stop");
}

/// A coordinator started on a disk full to its last page, its data directory not made yet:
/// the pid cannot be written into its lock file, and it stopped at once ("cannot open
/// .../tether.lock: No space left on device"), where a start one page less full waited for
/// room. It takes the lock without the pid, saying so, and waits for room to open the store,
/// answering every request meanwhile with `503 starting` (it answered none: to its health
/// checks it looked dead) and serving its metrics, which say that it waits; once there is room
/// it starts, writes its pid into the lock file and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_started_on_a_full_disk_answers_that_it_waits_and_starts_once_there_is_room()
{
    let Some((work, disk, addr, base)) = mounted() else {
        return;
    };
    let log = work.path().join("coordinator.log");
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(fill(&disk.inside("filler")) > 0, "nothing could be written");
    let mut c = disk.coordinator(addr, &log);
    let pid = c.child.id();
    let http = http_client();
    // (Before the open finds no room, the answer says that it opens.)
    answers_that_it_waits(&http, &base, pid, &logged).await;
    // Every request, a worker's upgrade among them, gets that answer.
    for path in [
        "/healthz",
        "/api/v1/tasks",
        "/api/v1/worker/w1/ws",
        "/no-such-path",
    ] {
        let r = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path} not answered: {e}"));
        assert_starting(r).await;
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics answered");
    assert_eq!(metrics.status().as_u16(), 200);
    let metrics = metrics.text().await.expect("text");
    assert!(metrics.contains("tether_store_out_of_space 1"), "{metrics}");
    // Locked, without the pid, which the log says.
    let lock = disk.inside("data/tether.lock");
    assert_eq!(std::fs::read_to_string(&lock).expect("the lock file"), "");
    assert!(
        logged().contains("without this coordinator's pid"),
        "{}",
        logged()
    );

    // Room: it starts, and names itself in the lock file.
    std::fs::remove_file(disk.inside("filler")).expect("free the space");
    wait_healthy(&http, &base).await;
    assert_eq!(
        std::fs::read_to_string(&lock).expect("the lock file"),
        pid.to_string()
    );
    let r = post_tasks(&http, &base, &specs("after", 1))
        .await
        .expect("submitted");
    assert_eq!(r.status().as_u16(), 201);
    assert!(c.alive(), "it stopped:\n{}", logged());
    c.stop("the coordinator", &log).await;
}

/// Takes every inode of the file system holding `dir` with empty files in it (bounded);
/// returns them.
fn take_inodes(dir: &Path) -> Vec<PathBuf> {
    let mut taken = Vec::new();
    for i in 0..100_000 {
        let f = dir.join(format!("inode-{i}"));
        match std::fs::File::create(&f) {
            Ok(_) => taken.push(f),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => return taken,
            Err(e) => panic!("taking inodes: {e}"),
        }
    }
    panic!("the file system never ran out of inodes");
}

/// A coordinator started on a full disk whose data directory is not made yet: a directory
/// takes an inode (and on most file systems a block), so making it failed at once for want of
/// space, and the coordinator stopped ("data directory ...: No space left on device") where one
/// whose directory was there waited for room; with an inode for the directory, the lock file
/// failed so, and with one for that too, SQLite could not open the database it was to make
/// ("unable to open database file"), and stopped then it left the database it made, empty,
/// which the next start refused as corrupt. It waits for room for each as for the rest of its
/// open, answering every request `503 starting`, leaves no empty database when stopped, and
/// once there is room it starts. (On a tmpfs whose inodes are all taken: its blocks do not
/// hold directories.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_data_directory_cannot_be_made_on_a_full_disk_waits_for_room_and_starts()
 {
    let Some((work, disk, addr, base)) = mounted_with(&format!("size={FS_SIZE},nr_inodes=64"))
    else {
        return;
    };
    let root = disk.inside("");
    let taken = take_inodes(&root);
    assert!(!taken.is_empty(), "no inode could be taken");
    let data = disk.inside("data");
    assert!(!data.exists());
    let log = work.path().join("coordinator.log");
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut c = disk.coordinator(addr, &log);
    let pid = c.child.id();
    let http = http_client();
    answers_that_it_waits(&http, &base, pid, &logged).await;
    let healthz = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("answered while the start waits");
    assert_starting(healthz).await;
    assert!(
        logged().contains("the store cannot be opened"),
        "{}",
        logged()
    );
    assert!(!data.exists(), "the data directory was made on a full disk");

    // An inode at a time: the directory is made, then its lock file, each once there is an
    // inode for it; meanwhile the start goes on waiting, answering so.
    let (steps, rest) = taken.split_at(3);
    for (f, made) in steps.iter().zip(["", "tether.lock"]) {
        std::fs::remove_file(f).expect("free an inode");
        let made = data.join(made);
        wait_for(&format!("{} made", made.display()), LONG, || async {
            assert!(!exited(pid), "it exited:\n{}", logged());
            made.exists().then_some(())
        })
        .await;
        let healthz = http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("answered while the start waits");
        assert_starting(healthz).await;
    }
    // An inode for the database, none for SQLite's files beside it. Restarted, the start's
    // first try (its first error logged) makes the database and cannot open its WAL; it waits,
    // and leaves no empty database behind: the next start refused one as corrupt.
    std::fs::remove_file(&steps[2]).expect("free an inode");
    let mut log = log;
    for n in ["second", "third"] {
        c.stop("the waiting coordinator", &log).await;
        log = work.path().join(format!("{n}.log"));
        c = disk.coordinator(addr, &log);
        let pid = c.child.id();
        let said = wait_for("the restarted open to wait for room", LONG, || async {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(!exited(pid), "it exited:\n{said}");
            said.lines()
                .find(|l| l.contains("the store cannot be opened"))
                .map(str::to_owned)
        })
        .await;
        assert!(said.contains("unable to open database file"), "{said}");
        assert!(!data.join("tether.db").exists(), "an empty database left");
    }
    let pid = c.child.id();
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();

    // Room: it opens the store, and serves.
    for f in rest {
        std::fs::remove_file(f).expect("free an inode");
    }
    wait_healthy(&http, &base).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data)
        .expect("the data directory")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(
        std::fs::read_to_string(data.join("tether.lock")).expect("the lock file"),
        pid.to_string()
    );
    assert!(
        logged().contains("space again: the store is open"),
        "{}",
        logged()
    );
    let r = post_tasks(&http, &base, &specs("after", 1))
        .await
        .expect("submitted");
    assert_eq!(r.status().as_u16(), 201);
    assert!(c.alive(), "it stopped:\n{}", logged());
    c.stop("the coordinator", &log).await;
}

/// On a file system that counts no inodes and no blocks (a tmpfs without `nr_inodes` or
/// `size`; btrfs and vfat count no inodes either: statvfs says 0 of them, 0 free), a database
/// SQLite cannot open for a reason other than space (`SQLITE_CANTOPEN`: here its path a link
/// into a directory that does not exist) is refused at once with SQLite's own words, not taken
/// for a full disk and waited on for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_cannot_be_opened_where_no_inodes_are_counted_is_refused_not_waited_for() {
    let Some((work, disk, addr, _base)) = mounted_with("nr_inodes=0,size=0") else {
        return;
    };
    let log = work.path().join("coordinator.log");
    std::fs::create_dir(disk.inside("data")).expect("the data directory");
    dangling_database(&disk.inside("data"));
    let mut c = disk.coordinator(addr, &log);
    refused_not_waited_for(&mut c, &log).await;
}

/// On a file system that counts no blocks (a tmpfs mounted with `size=0`, unbounded; some FUSE
/// and virtual file systems: statvfs says 0 blocks, 0 free), the data directory's free space
/// is not known: the coordinator says so once, and neither warns that it is running out of
/// space (it did at once, and every 10 minutes for ever, reading 0 bytes free) nor shows 0
/// bytes in `tether_data_dir_available_bytes` (NaN: not known).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_on_a_file_system_that_counts_no_blocks_is_not_said_to_run_out_of_space() {
    let Some(Serving {
        work: _work,
        disk: _disk,
        addr: _,
        base,
        log,
        mut c,
        http,
    }) = serving("size=0").await
    else {
        return;
    };
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    // The watcher's first look is made as the coordinator starts: one of the two is said.
    wait_for("the watcher's first look to be said", LONG, || async {
        let said = logged();
        (said.contains("counts no blocks") || said.contains("running out of space")).then_some(())
    })
    .await;
    assert!(
        !logged().contains("running out of space"),
        "warned of low space:\n{}",
        logged()
    );
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics answered");
    assert_eq!(metrics.status().as_u16(), 200);
    let metrics = metrics.text().await.expect("text");
    let gauge = metrics
        .lines()
        .find(|l| l.starts_with("tether_data_dir_available_bytes "))
        .unwrap_or_else(|| panic!("the gauge:\n{metrics}"));
    assert_eq!(gauge, "tether_data_dir_available_bytes NaN");
    let r = post_tasks(&http, &base, &specs("uncounted", 1))
        .await
        .expect("submitted");
    assert_eq!(r.status().as_u16(), 201, "it takes work");
    assert!(c.alive(), "it stopped:\n{}", logged());
    c.stop("the coordinator", &log).await;
}

/// The size of the ext4 images: over 800 MiB, so that ext4 keeps from every writer its 4096
/// clusters and not 2 % of them. Sparse: what is not written takes no room.
const EXT4_SIZE: u64 = 2 << 30;

/// A work directory with an ext4 of [`EXT4_SIZE`] made with `mkfs` (arguments to
/// `mkfs.ext4`) and loop-mounted in it as [`mounted`] mounts its tmpfs, a free loopback
/// address and its base URL; none where this machine cannot (no e2fsprogs, no loop device).
fn ext4_mounted(mkfs: &[&str]) -> Option<(tempfile::TempDir, Disk, SocketAddr, String)> {
    ext4_mounted_with(mkfs, "loop")
}

/// [`ext4_mounted`], mounted with `options` (`-o`, `loop` among them).
fn ext4_mounted_with(
    mkfs: &[&str],
    options: &str,
) -> Option<(tempfile::TempDir, Disk, SocketAddr, String)> {
    if !can_mount() {
        return None;
    }
    if let Err(e) = Command::new("mkfs.ext4").arg("-V").output() {
        skip_unless_ci("e2fsprogs's mkfs.ext4", &e.to_string());
        return None;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let image = work.path().join("ext4.img");
    let file = std::fs::File::create(&image).expect("the image");
    file.set_len(EXT4_SIZE).expect("the image's size");
    drop(file);
    // Few inodes and no journal: little for mkfs and the kernel to write.
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-N", "4096", "-O", "^has_journal"])
        .args(mkfs)
        .arg(&image)
        .output()
        .expect("run mkfs.ext4");
    assert!(
        made.status.success(),
        "mkfs.ext4 {mkfs:?}: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mount = work.path().join("fs");
    std::fs::create_dir(&mount).expect("mount point");
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -o loop,ro \"$1\" \"$0\"")
        .arg(&mount)
        .arg(&image)
        .output()
        .expect("run unshare");
    if !probe.status.success() {
        // As a refused mount namespace: in CI, a failure unless recorded as impossible there.
        let why = String::from_utf8_lossy(&probe.stderr).trim().to_owned();
        assert!(
            std::env::var_os("CI").is_none()
                || std::env::var_os("TETHER_ALLOW_NETNS_SKIP").is_some(),
            "this machine cannot loop-mount an ext4 ({why}); set TETHER_ALLOW_NETNS_SKIP=1 \
             if the CI machine cannot"
        );
        eprintln!("skipped: this machine cannot loop-mount an ext4 ({why})");
        return None;
    }
    let disk = Disk::mounted_by(&mount, &format!("mount -o {options} {}", image.display()));
    let addr = free_addr();
    let base = format!("http://{addr}");
    Some((work, disk, addr, base))
}

/// `statvfs` of `dir`: blocks in all, free, and free to others.
fn statvfs(dir: &Path) -> (u64, u64, u64) {
    let s = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    #[allow(clippy::useless_conversion)] // the field types differ between platforms
    (
        u64::from(s.blocks()),
        u64::from(s.blocks_free()),
        u64::from(s.blocks_available()),
    )
}

/// What a real ext4 keeps from every writer, root included, is read from sysfs as its own
/// `statfs` counts it: with no blocks kept for root (`-m 0`), free to others is free less
/// that, in blocks, of 4 KiB or of 64 KiB clusters (`bigalloc`). On a 2 GiB one of 4 KiB
/// clusters it is 4096 of them, not the 2 % the coordinator used to take (about 10,480 blocks:
/// 41 MiB for 16 MiB).
#[test]
fn a_real_ext4s_reserve_for_no_one_is_read_as_its_statfs_counts_it() {
    use tether_coordinator::disk::{Reserve, Room, SYS, Writer};
    for (what, mkfs, cluster) in [
        ("4 KiB blocks", &["-m", "0", "-b", "4096"][..], 4096),
        (
            "bigalloc",
            &["-m", "0", "-b", "4096", "-O", "bigalloc", "-C", "65536"][..],
            65536,
        ),
    ] {
        let Some((_work, disk, _addr, _base)) = ext4_mounted(mkfs) else {
            return;
        };
        let data = disk.inside("data");
        std::fs::create_dir(&data).expect("the data directory");
        let reserve = Reserve::of(&data, Path::new(SYS)).expect("the reserve read");
        assert_eq!(reserve.cluster, cluster, "{what}");
        let clusters = EXT4_SIZE / cluster;
        assert_eq!(
            reserve.clusters,
            (clusters / 50).min(4096),
            "{what}: the default"
        );
        let (blocks, free, available) = statvfs(&data);
        let kept = reserve.blocks(4096);
        assert_eq!(free - available, kept, "{what}: kept from everyone");
        let room = Room::of(&data).expect("statvfs");
        assert_eq!(room.kept_from_all(Some(reserve)), kept);
        if cluster == 4096 {
            assert!(
                kept < blocks * 2 / 100,
                "{what}: under 2 %: {kept} of {blocks}"
            );
        }
        // This test runs as root (to mount), as the coordinator in the tests above; the
        // holder, root too, sees the mount, as the coordinator in its namespace does.
        let holder = PathBuf::from(format!("/proc/{}", disk.holder.id()));
        assert_eq!(
            Writer::of_in(&data, &room, Path::new(SYS), &holder),
            Writer::Root { kept },
            "{what}"
        );
    }
}

/// A coordinator running as root on a large ext4 with under 2 % of it free, full to others
/// but with room for root over what ext4 keeps from everyone, is refused a database that
/// cannot be opened for another reason (a dangling link) with SQLite's error. It took 2 % of
/// the blocks for kept from everyone (20 GB of a 1 TB disk, where ext4 keeps 4096 clusters),
/// so such a disk was full to it, and the open waited for room that was there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_root_on_a_large_ext4_with_room_under_2_percent_a_database_that_cannot_be_opened_is_refused()
 {
    let Some((work, disk, addr, _base)) = ext4_mounted(&["-b", "4096"]) else {
        return;
    };
    let log = work.path().join("coordinator.log");
    std::fs::create_dir(disk.inside("data")).expect("the data directory");
    dangling_database(&disk.inside("data"));
    // Leave root 24 MiB over the 4096 blocks kept from everyone: under 2 % of the blocks.
    let (blocks, _, _) = statvfs(&disk.inside("data"));
    let leave = 4096 + 6144;
    assert!(leave < blocks * 2 / 100, "{leave} of {blocks}");
    fill_to(&disk.inside("data"), &disk.inside("filler"), leave);
    let (_, free, available) = statvfs(&disk.inside("data"));
    assert_eq!(available, 0, "full to others");
    assert!(free > 4096 && free < blocks * 2 / 100, "{free} of {blocks}");
    let mut c = disk.coordinator(addr, &log);
    refused_not_waited_for(&mut c, &log).await;
}

/// Makes the database in `data` a dangling link: one SQLite cannot open, for a reason other
/// than room.
fn dangling_database(data: &Path) {
    std::os::unix::fs::symlink(
        "/no-such-directory-of-tether/tether.db",
        data.join("tether.db"),
    )
    .expect("the database a dangling link");
}

/// The coordinator `c` (its log `log`) refuses its start with SQLite's error (exit status 1,
/// `unable to open database file`); it does not take its disk for full and wait for room.
async fn refused_not_waited_for(c: &mut Coordinator, log: &Path) {
    let logged = || std::fs::read_to_string(log).unwrap_or_default();
    let pid = c.child.id();
    wait_for("the start to be refused, or to wait", LONG, || async {
        (exited(pid) || logged().contains("out of space")).then_some(())
    })
    .await;
    assert!(
        !logged().contains("out of space"),
        "taken for a full disk:\n{}",
        logged()
    );
    let status = c.child.wait().expect("wait");
    assert_eq!(status.code(), Some(1), "{}", logged());
    assert!(
        logged().contains("unable to open database file"),
        "{}",
        logged()
    );
}

/// Allocates (without writing) all but `leave` blocks of 4 KiB of the ext4 holding `dir`
/// free, in a file `filler` there; the blocks then free.
fn fill_to(dir: &Path, filler: &Path, leave: u64) -> u64 {
    let (_, free, _) = statvfs(dir);
    let filled = Command::new("fallocate")
        .args(["-l", &((free - leave) * 4096).to_string()])
        .arg(filler)
        .output()
        .expect("run fallocate (util-linux)");
    assert!(
        filled.status.success(),
        "{}",
        String::from_utf8_lossy(&filled.stderr)
    );
    statvfs(dir).1
}

/// As root on an ext4 full to others, with hundreds of MiB kept for the superuser, the free
/// space watcher counts root's room, as the store does: the gauge shows it and no low space
/// is said. It read the unprivileged count: 0 bytes shown, and `running out of space` said
/// while the coordinator, root, had room to spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_root_on_an_ext4_full_to_others_the_free_space_gauge_shows_roots_room() {
    // Half the blocks kept for root.
    let Some((work, disk, addr, base)) = ext4_mounted(&["-b", "4096", "-m", "50"]) else {
        return;
    };
    let log = work.path().join("coordinator.log");
    let data = disk.inside("data");
    std::fs::create_dir(&data).expect("the data directory");
    // 781 MiB free: 765 MiB of them root's, none others'.
    let free = fill_to(&data, &disk.inside("filler"), 200_000);
    let (_, _, available) = statvfs(&data);
    assert_eq!(available, 0, "full to others");
    let mut c = disk.coordinator(addr, &log);
    let http = http_client();
    wait_healthy(&http, &base).await;
    let gauge = first_look_gauge(&http, &base).await;
    let low = tether_coordinator::disk::LOW_SPACE as f64;
    assert!(
        gauge > low && gauge <= ((free - 4096) * 4096) as f64,
        "{gauge} bytes shown, {free} blocks free"
    );
    takes_work_unwarned(&http, &base, "root-room", &log).await;
    c.stop("the coordinator", &log).await;
}

/// The free-space gauge, in bytes, once the coordinator at `base` shows it (its watcher's
/// first look).
async fn first_look_gauge(http: &reqwest::Client, base: &str) -> f64 {
    wait_for("the watcher's first look", LONG, || async {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("tether_data_dir_available_bytes "))?
            .to_owned();
        line.rsplit(' ').next()?.parse::<f64>().ok()
    })
    .await
}

/// The coordinator at `base` takes a task (`name`), and its `log` says no low space.
async fn takes_work_unwarned(http: &reqwest::Client, base: &str, name: &str, log: &Path) {
    let r = post_tasks(http, base, &specs(name, 1))
        .await
        .expect("submitted");
    assert_eq!(r.status().as_u16(), 201, "it takes work");
    let logged = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        !logged.contains("running out of space"),
        "warned of low space:\n{logged}"
    );
}

/// `setpriv` (util-linux) to start a coordinator with other credentials; none where it is
/// missing (a failure in CI).
fn setpriv() -> Option<()> {
    match Command::new("setpriv").arg("--version").output() {
        Ok(out) if out.status.success() => Some(()),
        Ok(out) => {
            skip_unless_ci(
                "util-linux's setpriv",
                &String::from_utf8_lossy(&out.stderr),
            );
            None
        }
        Err(e) => {
            skip_unless_ci("util-linux's setpriv", &e.to_string());
            None
        }
    }
}

/// An ext4 with half its blocks kept for the superuser, mounted `resuid=65534,resgid=65534`
/// (as this machine's root file system is), filled to leave 200,000 blocks free: none to
/// others, 781 MiB to those the kernel gives the superuser's blocks; with its work directory,
/// the data directory made, owned by `owner`, the coordinator's log, a free address and its
/// base URL.
fn ext4_full_to_others_kept_for_nobody(
    owner: u32,
) -> Option<(tempfile::TempDir, Disk, PathBuf, SocketAddr, String)> {
    setpriv()?;
    let (work, disk, addr, base) = ext4_mounted_with(
        &["-b", "4096", "-m", "50"],
        "loop,resuid=65534,resgid=65534",
    )?;
    let data = disk.inside("data");
    std::fs::create_dir(&data).expect("the data directory");
    std::os::unix::fs::chown(&data, Some(owner), Some(owner)).expect("chown");
    // The mount point is in the work directory: others may pass through it.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    // Filled by the resuid: root without CAP_SYS_RESOURCE (this test, here) may not use the
    // blocks kept.
    std::fs::set_permissions(
        disk.inside(""),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("chmod");
    let (_, free, _) = statvfs(&data);
    let filled = Command::new("nsenter")
        .arg(format!("--target={}", disk.holder.id()))
        .args(["--mount", "--", "setpriv", "--reuid=65534", "--regid=65534"])
        .args(["--clear-groups", "--", "fallocate", "-l"])
        .arg(((free - 200_000) * 4096).to_string())
        .arg(disk.mount.join("filler"))
        .output()
        .expect("run fallocate (util-linux)");
    assert!(
        filled.status.success(),
        "{}",
        String::from_utf8_lossy(&filled.stderr)
    );
    let (_, _, available) = statvfs(&data);
    assert_eq!(available, 0, "full to others");
    let log = work.path().join("coordinator.log");
    Some((work, disk, log, addr, base))
}

/// Root without `CAP_SYS_RESOURCE` (Docker's default set drops it; so does `setpriv` here) on
/// an ext4 whose `resuid` is another user is not given the blocks kept for the superuser: the
/// disk, full to others, is full to it, and a database it cannot open (a dangling link) is
/// waited on for room. It counted them as root's (its euid 0) and, the disk not full to it,
/// exited with SQLite's error where it had no room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_root_without_cap_sys_resource_on_an_ext4_kept_for_another_a_disk_full_to_others_is_waited_on()
 {
    let Some((_work, disk, log, addr, _base)) = ext4_full_to_others_kept_for_nobody(0) else {
        return;
    };
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    dangling_database(&disk.inside("data"));
    let without = [
        "setpriv",
        "--inh-caps=-sys_resource",
        "--bounding-set=-sys_resource",
        "--",
    ];
    let mut c = disk.coordinator_by(&without, addr, &log);
    let pid = c.child.id();
    // The lock file is made without its pid (out of space) either way: the open is what waits.
    let waits = "the store cannot be opened";
    wait_for("the open to wait, or to be refused", LONG, || async {
        (exited(pid) || logged().contains(waits)).then_some(())
    })
    .await;
    assert!(
        logged().contains(waits),
        "not taken for a full disk:\n{}",
        logged()
    );
    assert!(c.alive(), "it exited:\n{}", logged());
}

/// A coordinator that is not root but is the `resuid` of its ext4 is given the blocks kept
/// for the superuser: on a disk full to others, its free-space gauge shows them and it takes
/// work without a low-space warning. Not root, it counted only what others may use: 0 bytes
/// shown and `running out of space` said while it had 781 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_is_its_ext4s_resuid_counts_the_superusers_blocks_as_its_room() {
    let Some((_work, disk, log, addr, base)) = ext4_full_to_others_kept_for_nobody(65534) else {
        return;
    };
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ];
    let mut c = disk.coordinator_by(&nobody, addr, &log);
    let http = http_client();
    wait_healthy(&http, &base).await;
    let gauge = first_look_gauge(&http, &base).await;
    let low = tether_coordinator::disk::LOW_SPACE as f64;
    assert!(gauge > low, "{gauge} bytes shown:\n{}", logged());
    takes_work_unwarned(&http, &base, "resuid-room", &log).await;
    c.stop("the coordinator", &log).await;
}
