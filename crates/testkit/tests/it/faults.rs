//! Real network faults through the fault proxy; each test asserts that its fault fired, then
//! ground truth.

use std::sync::atomic::Ordering;

use tether_faultproxy::{Direction, Fault, FaultKind, Proxy, ProxyConfig, Target};
use tether_proto::{TaskId, TaskSpec, WorkerId};
use tether_testkit::*;
use tether_worker::agent::unix_us;
use tether_worker::{ConnState, Executors};

use crate::support::{builtin_and, connected, connected_worker, coordinator, coordinator_with};

/// A fault proxy in front of `c` (its faults drawn from `seed`).
pub(crate) async fn proxy_in_front(c: &TestCoordinator, seed: u64) -> Proxy {
    Proxy::start(ProxyConfig {
        name: "coordinator".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        upstream: c.addr,
        seed,
    })
    .await
    .expect("proxy")
}

/// A coordinator in a new temporary directory, a fault proxy in front of it, and worker `w1`
/// connected through the proxy: the directory, the coordinator, the proxy and the worker.
async fn worker_behind_proxy() -> (tempfile::TempDir, TestCoordinator, Proxy, TestWorker) {
    let (dir, c) = coordinator().await;
    let proxy = proxy_in_front(&c, 11).await;
    let w = connected_worker(&format!("ws://{}", proxy.listen_addr()), "w1").await;
    (dir, c, proxy, w)
}

#[tokio::test]
async fn a_black_holed_worker_is_detected_by_both_sides_and_its_task_completes_once() {
    let (_dir, c, proxy, w) = worker_behind_proxy().await;
    let client = c.client();
    let ids = client.submit(&[sleep_task(2_000, 20, 0)]).await;
    wait_for("the worker to run the task", DEADLINE, || async {
        (!w.handle.active_tasks().is_empty()).then_some(())
    })
    .await;
    let hole = proxy
        .add_fault(
            Fault::new("hole", FaultKind::Blackhole, Direction::Both)
                .with_target(Target::Workers(vec![WorkerId::parse("w1").expect("id")])),
        )
        .await
        .expect("fault");
    // No FIN, no RST: only the heartbeat timeout can notice.
    w.wait_state(|s| s != ConnState::Connected).await;
    wait_for("the coordinator to notice", DEADLINE, || async {
        let ws: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
        (ws[0]["state"] == "disconnected").then_some(())
    })
    .await;
    let stats = hole.remove();
    assert!(
        stats.bytes_dropped > 0,
        "the black hole dropped bytes: {stats:?}"
    );
    w.wait_state(|s| s == ConnState::Connected).await;
    client.wait_status(&ids[0], "completed").await;
    assert_eq!(client.results(&ids[0]).await.len(), 1);
    assert_eq!(w.handle.executions(), 1);
    assert_eq!(
        w.handle.shared.max_live_connections.load(Ordering::SeqCst),
        1
    );
    w.stop().await.expect("stop");
    c.stop().await;
}

/// The state letter of process `pid` (`T`: stopped), from `/proc/<pid>/stat`.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The number in the file at `path`, once there.
fn number_in(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Pause and resume are checked on the worker and on the command's process, not by the task's
/// status (which the coordinator sets itself when asked): paused, the worker shows it paused
/// and the process is stopped (`T`) and counts no further; resumed, the worker shows it
/// running, the process is no longer stopped and counts on.
#[tokio::test]
async fn cancel_and_pause_reach_a_running_command_through_resets() {
    let (dir, c, proxy, w) = worker_behind_proxy().await;
    let client = c.client();
    let out = dir.path().join("commands");
    std::fs::create_dir(&out).expect("dir");
    // Writes the shell's pid (its group's leader, which the worker signals with the group),
    // then counts, 20 a second for a minute, each count written whole (by a rename).
    let cmd = |name: &str| {
        let (pid, n) = (
            out.join(format!("{name}.pid")),
            out.join(format!("{name}.n")),
        );
        let (pid, n) = (pid.display(), n.display());
        let shell = format!(
            "echo $$ > '{pid}.tmp' && mv '{pid}.tmp' '{pid}'; i=0; while [ $i -lt 1200 ]; do \
             i=$((i+1)); echo $i > '{n}.tmp' && mv '{n}.tmp' '{n}'; sleep 0.05; done"
        );
        TaskSpec::new("command", serde_json::json!({ "shell": shell }))
    };
    let ids = client.submit(&[cmd("a"), cmd("b")]).await;
    wait_for("both commands to run", DEADLINE, || async {
        (w.handle.active_tasks().len() == 2).then_some(())
    })
    .await;
    let count = out.join("a.n");
    let pid = wait_for("the first command to count", DEADLINE, || async {
        number_in(&count)?;
        u32::try_from(number_in(&out.join("a.pid"))?).ok()
    })
    .await;
    // A reset between the worker and the coordinator first: controls still arrive after it.
    let reset = proxy
        .add_fault(Fault::new(
            "rst",
            FaultKind::Reset { timeout_ms: 0 },
            Direction::Both,
        ))
        .await
        .expect("fault");
    wait_for("the reset to fire", DEADLINE, || async {
        (reset.stats().connections_reset > 0).then_some(())
    })
    .await;
    drop(reset);
    w.wait_state(|s| s == ConnState::Connected).await;
    let (s, _) = client.control(&ids[0], "pause").await;
    assert_eq!(s, 200);
    wait_for("the command to be stopped", DEADLINE, || async {
        w.handle
            .active_tasks()
            .iter()
            .any(|t| t.task_id == ids[0] && t.paused)
            .then_some(())
    })
    .await;
    wait_for("the command's process to be stopped", DEADLINE, || async {
        (proc_state(pid) == Some('T')).then_some(())
    })
    .await;
    // Stopped with its group: at most a rename under way when the signal came ends after it.
    let stopped_at = number_in(&count).expect("a count");
    client.wait_status(&ids[0], "paused").await;
    let (s, _) = client.control(&ids[1], "cancel").await;
    assert_eq!(s, 200);
    wait_for("the cancelled command to be killed", DEADLINE, || async {
        (!w.handle.active_tasks().iter().any(|t| t.task_id == ids[1])).then_some(())
    })
    .await;
    // Still stopped while the other was killed.
    assert_eq!(proc_state(pid), Some('T'));
    let held = number_in(&count).expect("a count");
    assert!(
        held <= stopped_at + 1,
        "stopped at {stopped_at}, counted on to {held}"
    );
    let (s, _) = client.control(&ids[0], "resume").await;
    assert_eq!(s, 200);
    client.wait_status(&ids[0], "running").await;
    wait_for(
        "the worker to run the command unpaused",
        DEADLINE,
        || async {
            w.handle
                .active_tasks()
                .iter()
                .any(|t| t.task_id == ids[0] && !t.paused)
                .then_some(())
        },
    )
    .await;
    wait_for("the command's process to count on", DEADLINE, || async {
        let running = proc_state(pid).is_some_and(|s| s != 'T');
        (running && number_in(&count)? >= held + 2).then_some(())
    })
    .await;
    let (s, _) = client.control(&ids[0], "cancel").await;
    assert_eq!(s, 200);
    wait_for("the worker to be idle", DEADLINE, || async {
        w.handle.active_tasks().is_empty().then_some(())
    })
    .await;
    for id in &ids {
        assert_eq!(client.status(id).await, "cancelled");
    }
    let handle = w.handle.clone();
    w.stop().await.expect("stop");
    assert_eq!(handle.runner.live_tasks(), 0, "no task outlives the agent");
    c.stop().await;
}

/// A bandwidth limit on every link of `proxy`, one way.
async fn slow_link(
    proxy: &Proxy,
    bytes_per_sec: u64,
    direction: Direction,
) -> tether_faultproxy::FaultGuard {
    proxy
        .add_fault(Fault::new(
            "slow",
            FaultKind::Bandwidth { bytes_per_sec },
            direction,
        ))
        .await
        .expect("fault")
}

/// `size` bytes of noise (xorshift), so no layer can shrink an upload of them: the bytes of a
/// multiplied counter, used before, zstd packed 3 MB of into less than 100 kB.
fn noise(size: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes one large checkpoint, then runs until cancelled (with `{"finish": true}` in its
/// config, finishes at once).
struct BigCheckpoint(usize);

impl tether_worker::Executor for BigCheckpoint {
    fn execute(
        &self,
        input: tether_worker::TaskInput,
        ctx: tether_worker::TaskCtx,
    ) -> futures_util::future::BoxFuture<'static, Result<serde_json::Value, tether_worker::ExecError>>
    {
        let size = self.0;
        let finish = input.config["finish"] == true;
        Box::pin(async move {
            ctx.checkpoint(noise(size)).await;
            if finish {
                return Ok(serde_json::json!({ "finished": true }));
            }
            ctx.cancelled().await;
            Err(tether_worker::ExecError::Cancelled)
        })
    }
}

/// On a slow link the worker measures from its acknowledgements, a result does not wait
/// behind a large checkpoint written just before it: the checkpoint goes in pieces of about a
/// second of the link, a window of about a second at a time, and the result (sent first of
/// what waits) overtakes the rest. In one piece of 256 KiB, as before, the result waited
/// behind it half a minute at 8 kB/s.
#[tokio::test]
async fn a_result_is_not_held_behind_a_checkpoint_on_a_slow_link() {
    const SIZE: usize = 256 * 1024;
    const RATE: u64 = 8_000;
    let (_dir, c) = coordinator().await;
    let proxy = proxy_in_front(&c, 8).await;
    // Slow from the start: the worker's measure holds a rate for some seconds.
    let slow = slow_link(&proxy, RATE, Direction::Upstream).await;
    let w = connected(
        fast_worker_config(&format!("ws://{}", proxy.listen_addr()), "w1"),
        big_checkpoints(SIZE),
    )
    .await;
    // The measure that sizes the pieces and the window (every sample; the stats show only
    // those taken while more waited, which an idle worker's are not).
    let measured = wait_for("the link measured", DEADLINE, || async {
        let r = w.handle.shared.link_bytes_per_sec.load(Ordering::Relaxed);
        (r > 0).then_some(r)
    })
    .await;
    assert!(
        measured <= 2 * RATE,
        "measured {measured} B/s on a link of {RATE}"
    );
    let client = c.client();
    assert_result_overtakes_its_checkpoint(&client, "big_checkpoint", DEADLINE).await;
    let stats = slow.remove();
    assert!(stats.bytes_delayed > 0, "{stats:?}");
    assert_eq!(w.handle.registrations(), 1);
    // The window (about a second of the link) held the rest of the checkpoint back.
    let full = w.handle.shared.send_window_full.load(Ordering::Relaxed);
    assert!(full > 0, "the send window never filled");
    w.stop().await.expect("stop");
    c.stop().await;
}

/// A link measured fast by a checkpoint's transfer, which then slows down while idle: the
/// worker's measure follows it from heartbeats within two buckets of samples (10 s), so the
/// next checkpoint is cut for the slow link and a result does not wait behind it. Keeping the
/// fast measure through the idle time (as BBR keeps its estimate through application-limited
/// samples) would cut it into pieces of 256 KiB: half a minute each at 8 kB/s.
#[tokio::test]
async fn a_link_that_slowed_while_idle_is_measured_again_before_the_next_checkpoint() {
    const FIRST: usize = 1024 * 1024;
    const SIZE: usize = 256 * 1024;
    const RATE: u64 = 8_000;
    let (_dir, c) = coordinator().await;
    let proxy = proxy_in_front(&c, 9).await;
    let mut executors = big_checkpoints(FIRST);
    executors.register("small_checkpoint", BigCheckpoint(SIZE));
    let w = connected(
        fast_worker_config(&format!("ws://{}", proxy.listen_addr()), "w1"),
        executors,
    )
    .await;
    let client = c.client();
    let ids = big_checkpoint_in(&client).await;
    assert_eq!(client.control(&ids[0], "cancel").await.0, 200);
    client.wait_status(&ids[0], "cancelled").await;
    let measured = w.handle.stats().send_bytes_per_sec;
    assert!(
        measured >= SIZE as u64,
        "the transfer measured {measured} B/s: the next checkpoint would go in one piece"
    );
    let slow = slow_link(&proxy, RATE, Direction::Upstream).await;
    // Idle but for heartbeats, past the two buckets a measure is kept for.
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    assert_result_overtakes_its_checkpoint(&client, "small_checkpoint", 2 * DEADLINE).await;
    assert!(slow.remove().bytes_delayed > 0);
    assert_eq!(w.handle.registrations(), 1);
    w.stop().await.expect("stop");
    c.stop().await;
}

#[tokio::test]
async fn a_large_checkpoint_over_a_slow_link_does_not_starve_the_session() {
    const SIZE: usize = 1024 * 1024;
    let (_dir, c) = coordinator().await;
    let proxy = proxy_in_front(&c, 5).await;
    let mut cfg = fast_worker_config(&format!("ws://{}", proxy.listen_addr()), "w1");
    cfg.heartbeat_timeout = std::time::Duration::from_secs(3);
    let w = connected(cfg, big_checkpoints(SIZE)).await;
    // About 1 MB upstream at 400 kB/s (base64 of noise, which zstd takes back to about its
    // size): two and a half seconds of upload, more than the liveness timeout of both sides,
    // and twice the window.
    let slow = slow_link(&proxy, 400_000, Direction::Upstream).await;
    let client = c.client();
    let ids = client
        .submit(&[TaskSpec::new("big_checkpoint", serde_json::json!({}))])
        .await;
    // Heartbeats keep being answered during the upload: with at most a window of unacknowledged
    // bytes in flight, a heartbeat waits behind a few pieces, not behind the whole checkpoint.
    wait_for("the task to start", DEADLINE, || async {
        (!w.handle.active_tasks().is_empty()).then_some(())
    })
    .await;
    let answered = || w.handle.shared.heartbeats_answered.load(Ordering::Relaxed);
    let answered_before = answered();
    wait_for("heartbeats answered mid-upload", 4 * DEADLINE, || async {
        let through = slow.stats().bytes_delayed;
        assert!(
            through < SIZE as u64,
            "the whole upload went through before 3 heartbeats were answered"
        );
        (answered() >= answered_before + 3).then_some(())
    })
    .await;
    let t = wait_for("the checkpoint to arrive whole", 4 * DEADLINE, || async {
        let t = client.task(&ids[0]).await;
        (!t["latest_checkpoint"].is_null()).then_some(t)
    })
    .await;
    let stats = slow.remove();
    assert!(stats.bytes_delayed > 0, "the link was slowed: {stats:?}");
    assert_eq!(t["latest_checkpoint"]["size"], SIZE as u64, "{t}");
    assert_eq!(
        w.handle.registrations(),
        1,
        "the session lived through the upload: heartbeats were not stuck behind it"
    );
    assert_eq!(client.control(&ids[0], "cancel").await.0, 200);
    client.wait_status(&ids[0], "cancelled").await;
    let ws: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    assert_eq!(
        ws[0]["sessions"], 1,
        "the coordinator saw one session: {}",
        ws[0]
    );
    w.stop().await.expect("stop");
    c.stop().await;
}

/// A frame that takes longer to cross the link than either side's liveness timeout (one
/// checkpoint piece at 64 kB/s: several seconds against 2 s) keeps the session: the coordinator,
/// reading it, pings the worker, whose heartbeats wait behind it, and counts the frame's bytes
/// as the worker's life; the worker counts the pings as the coordinator's, and as a sign that
/// what it sent is being read, not lost.
#[tokio::test]
async fn a_frame_slower_than_the_liveness_timeout_keeps_the_session() {
    a_slow_frame_keeps_the_session(SlowFrame::default()).await;
}

/// A coordinator that beats far slower than the worker (5 s against 200 ms, its timeout 15 s
/// against the worker's 2 s) still pings in time: the worker's timeout is its own.
#[tokio::test]
async fn a_slow_frame_keeps_a_worker_that_beats_faster_than_its_coordinator() {
    a_slow_frame_keeps_the_session(SlowFrame {
        interval: Some(std::time::Duration::from_secs(5)),
        ..SlowFrame::default()
    })
    .await;
}

/// The same with integrity tags, where pings and pongs (untagged) keep no session alive: the
/// frame still arriving does.
#[tokio::test]
async fn with_message_mac_a_frame_slower_than_the_liveness_timeout_keeps_the_session() {
    let secret =
        tether_proto::auth::Secret::new(b"fleet secret of the slow link test").expect("secret");
    a_slow_frame_keeps_the_session(SlowFrame {
        secret: Some(secret),
        ..SlowFrame::default()
    })
    .await;
}

/// How [`a_slow_frame_keeps_the_session`] sets up its link.
#[derive(Default)]
struct SlowFrame {
    /// With integrity tags, under this fleet secret.
    secret: Option<tether_proto::auth::Secret>,
    /// The coordinator's heartbeat interval (its timeout three times that), when not the
    /// tests' 200 ms.
    interval: Option<std::time::Duration>,
    /// The worker connects with [`SMALL_SEND_BUFFER`], at 20 kB/s instead of 64.
    small_send_buffer: bool,
}

/// A registration larger than the link carries in a heartbeat timeout (a long inventory over
/// a slow upstream) is waited for while its bytes come, as a slow frame after registration
/// is: it used to be cut at the timeout, and sent again, and cut again, for ever.
#[tokio::test]
async fn a_registration_slower_than_the_heartbeat_timeout_is_waited_for() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.heartbeat_interval = std::time::Duration::from_millis(500);
        cfg.heartbeat_timeout = std::time::Duration::from_millis(1500);
    })
    .await;
    let proxy = proxy_in_front(&c, 7).await;
    let mut raw = crate::raw::Raw::connect_at(proxy.listen_addr(), "slow-registration").await;
    let _slow = slow_link(&proxy, 20_000, Direction::Upstream).await;
    let mut reg = raw.registration(None, &[]);
    let finished: Vec<serde_json::Value> = (0..1500)
        .map(|i| serde_json::json!({ "task_id": format!("t-{i:032x}"), "attempt": 1 }))
        .collect();
    reg["inventory"] = serde_json::json!({ "finished": finished });
    let size = reg.to_string().len();
    assert!(
        size > 60_000,
        "{size} bytes: more than the link carries in 3 timeouts"
    );
    let started = std::time::Instant::now();
    raw.send(&reg).await;
    raw.next_of("registration_ack").await;
    assert!(
        started.elapsed() > std::time::Duration::from_secs(3),
        "the registration must outlast the timeout for this test to mean anything: {:?}",
        started.elapsed()
    );
    c.stop().await;
}

/// A worker uploads a 256 KiB checkpoint through an upstream slower than both sides'
/// liveness timeouts: the checkpoint arrives whole in one session, the coordinator pinging.
async fn a_slow_frame_keeps_the_session(how: SlowFrame) {
    let SlowFrame {
        secret,
        interval,
        small_send_buffer,
    } = how;
    const SIZE: usize = 256 * 1024;
    let (_dir, c) = coordinator_with(|cfg| {
        if let Some(interval) = interval {
            cfg.heartbeat_interval = interval;
            cfg.heartbeat_timeout = 3 * interval;
        }
        if let Some(secret) = &secret {
            let mut auth = tether_coordinator::auth::WorkerAuth::fleet(secret.clone());
            auth.message_mac = true;
            cfg.auth = Some(auth);
        }
    })
    .await;
    let proxy = proxy_in_front(&c, 6).await;
    let mut cfg = fast_worker_config(&format!("ws://{}", proxy.listen_addr()), "w1");
    cfg.secret = secret;
    let timeout = cfg.heartbeat_timeout;
    let executors = big_checkpoints(SIZE);
    let w = match small_send_buffer {
        true => spawn_agent(
            tether_worker::Agent::with_transport(cfg, executors, SMALL_SEND_BUFFER).expect("agent"),
        ),
        false => spawn_worker(cfg, executors),
    };
    w.wait_state(|s| s == ConnState::Connected).await;
    // Through the small buffer, about 260 kB of piece against some 200 kB of buffers (the
    // socket's, the proxy's queue, its socket's): a write waits several seconds, past the 2 s
    // timeout.
    let rate = if small_send_buffer { 20_000 } else { 64_000 };
    let slow = slow_link(&proxy, rate, Direction::Upstream).await;
    let client = c.client();
    let started = std::time::Instant::now();
    let ids = client
        .submit(&[TaskSpec::new("big_checkpoint", serde_json::json!({}))])
        .await;
    let t = wait_for("the checkpoint to arrive whole", 4 * DEADLINE, || async {
        let t = client.task(&ids[0]).await;
        (!t["latest_checkpoint"].is_null()).then_some(t)
    })
    .await;
    let took = started.elapsed();
    let stats = slow.remove();
    assert!(
        took > 2 * timeout,
        "the upload must outlast the liveness timeout for this test to mean anything: {took:?}"
    );
    assert!(stats.bytes_delayed as usize > SIZE / 2, "{stats:?}");
    assert_eq!(t["latest_checkpoint"]["size"], SIZE as u64, "{t}");
    let o = client.overview().await;
    assert!(
        o["counters"]["keepalive_pings"].as_u64() > Some(0),
        "the coordinator pinged while the piece arrived: {o}"
    );
    assert_kept_its_session(&client, &w, "w1").await;
    assert_eq!(client.control(&ids[0], "cancel").await.0, 200);
    client.wait_status(&ids[0], "cancelled").await;
    w.stop().await.expect("stop");
    c.stop().await;
}

/// Worker `w` (`id`) kept its one session through a frame slower than its timeout, and so did
/// the coordinator; its RTT is the path's.
async fn assert_kept_its_session(client: &Client, w: &TestWorker, id: &str) {
    assert_eq!(
        w.handle.registrations(),
        1,
        "{id} kept its session through a frame slower than its timeout"
    );
    let ws: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    let seen = ws.iter().find(|w| w["worker_id"] == id).expect("listed");
    assert_eq!(seen["sessions"], 1, "the coordinator kept it too: {seen}");
    assert_rtt_is_the_paths(w).await;
}

/// Heartbeats sent behind a slow transfer (or answered behind one) waited seconds in the
/// link's queue: their round trips measure the queue, and are left out of the RTT that sizes
/// the adaptive timeout (without that, its p95 read 3 s here, and the timeout 12 s); those
/// after it count.
async fn assert_rtt_is_the_paths(w: &TestWorker) {
    let stats = wait_for(
        "heartbeats answered after the transfer",
        DEADLINE,
        || async {
            let s = w.handle.stats();
            (s.rtt_samples >= 5).then_some(s)
        },
    )
    .await;
    assert!(
        stats.rtt_p95_ms < 500.0,
        "the RTT is the path's, not the transfer's queue: {stats:?}"
    );
}

/// Connects over TCP with small, fixed socket buffers (no autotuning), what a slow link does
/// to its ends' sockets: a write of a long frame waits for the link, as over a real slow path
/// (loopback's buffers of megabytes, or a proxy reading ahead, would take a whole window at
/// once).
#[derive(Clone, Copy, Default)]
struct Narrow {
    /// The send buffer's size: the worker's writes wait for the link.
    send_buffer: Option<usize>,
    /// Bytes a second the worker reads, through a receive buffer of 8 KiB: the coordinator's
    /// writes wait for the link.
    read_rate: Option<u64>,
}

/// The send buffer [`SlowFrame::small_send_buffer`] connects with.
const SMALL_SEND_BUFFER: Narrow = Narrow {
    send_buffer: Some(8 * 1024),
    read_rate: None,
};

impl tether_worker::connector::Connector for Narrow {
    fn connect(
        &self,
        url: String,
        config: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
    ) -> futures_util::future::BoxFuture<
        'static,
        Result<tether_worker::connector::WsStream, tether_worker::connector::ConnectError>,
    > {
        let how = *self;
        Box::pin(async move {
            let transient = |e: std::io::Error| {
                tether_worker::connector::ConnectError::Transient(e.to_string())
            };
            let host = url
                .trim_start_matches("ws://")
                .split('/')
                .next()
                .unwrap_or_default();
            let addr: std::net::SocketAddr = host.parse().expect("a loopback address");
            let socket = tokio::net::TcpSocket::new_v4().map_err(transient)?;
            if let Some(size) = how.send_buffer {
                socket
                    .set_send_buffer_size(size as u32)
                    .map_err(transient)?;
            }
            if how.read_rate.is_some() {
                socket.set_recv_buffer_size(8 * 1024).map_err(transient)?;
            }
            let tcp = socket.connect(addr).await.map_err(transient)?;
            let io: std::pin::Pin<Box<dyn tether_worker::connector::Io>> = match how.read_rate {
                Some(rate) => Box::pin(SlowReader::new(tcp, rate)),
                None => Box::pin(tcp),
            };
            tether_worker::connector::handshake(url, io, config).await
        })
    }
}

/// A TCP stream read at most `rate` bytes a second: the reader of a slow downstream path.
struct SlowReader {
    tcp: tokio::net::TcpStream,
    rate: u64,
    started: tokio::time::Instant,
    taken: u64,
    wait: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl SlowReader {
    fn new(tcp: tokio::net::TcpStream, rate: u64) -> Self {
        let started = tokio::time::Instant::now();
        Self {
            tcp,
            rate,
            started,
            taken: 0,
            wait: Box::pin(tokio::time::sleep_until(started)),
        }
    }
}

impl tokio::io::AsyncRead for SlowReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            let due = (this.started.elapsed().as_secs_f64() * this.rate as f64) as u64;
            // At most a 1 KiB burst ahead of the rate: an idle time earns no more.
            this.taken = this.taken.max(due.saturating_sub(1024));
            let allowed = (due + 1024).saturating_sub(this.taken) as usize;
            if allowed == 0 {
                let at = (this.taken + 1 - 1024) as f64 / this.rate as f64;
                let at = this.started + std::time::Duration::from_secs_f64(at);
                this.wait.as_mut().reset(at);
                std::task::ready!(this.wait.as_mut().poll(cx));
                continue;
            }
            let mut chunk = vec![0; allowed.min(buf.remaining())];
            let mut limited = tokio::io::ReadBuf::new(&mut chunk);
            std::task::ready!(std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut limited))?;
            this.taken += limited.filled().len() as u64;
            buf.put_slice(limited.filled());
            return Poll::Ready(Ok(()));
        }
    }
}

impl tokio::io::AsyncWrite for SlowReader {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A frame slower than the timeout through a sender's small socket buffer: the worker's writes
/// wait for the link, longer than the timeout, and reading nothing meanwhile it sees none of
/// the coordinator's pings; the bytes its socket keeps taking are its sign that the link lives
/// (without it, every session ended "write stalled" within 4 s and the checkpoint never came).
#[tokio::test]
async fn a_frame_written_slower_than_the_liveness_timeout_keeps_the_session() {
    a_slow_frame_keeps_the_session(SlowFrame {
        small_send_buffer: true,
        ..SlowFrame::default()
    })
    .await;
}

/// The other way: a checkpoint that the coordinator hands to a resuming worker in its
/// assignment, slower than the worker's liveness timeout, keeps the session. The worker reads
/// the frame's bytes as the coordinator's life, and as the reason its acknowledgements are
/// late: they wait behind the frame.
#[tokio::test]
async fn a_checkpoint_handed_over_slower_than_the_liveness_timeout_keeps_the_session() {
    a_slow_handover_keeps_the_session(false).await;
}

/// The same where the worker reads slowly through a small receive buffer, with no proxy
/// reading ahead: the coordinator's write of the frame waits for the link, longer than the
/// timeout, and reading nothing meanwhile it sees none of the worker's heartbeats; the bytes
/// its socket keeps taking are its sign that the link lives (without it, every session ended
/// "write failed" within the timeout and the checkpoint never arrived).
#[tokio::test]
async fn a_checkpoint_written_to_a_worker_slower_than_the_liveness_timeout_keeps_the_session() {
    a_slow_handover_keeps_the_session(true).await;
}

/// A resuming worker is handed a 250 KiB checkpoint in its assignment through a downstream
/// slower than both sides' liveness timeouts (48 kB/s): through a fault proxy, or (`narrow`)
/// read through small socket buffers both ends. Its session lives through the frame.
async fn a_slow_handover_keeps_the_session(narrow: bool) {
    // Within what an assignment carries inline (256 KiB): one frame of five seconds. (A larger
    // one is fetched in pieces sized for the link, none slower than the timeout.)
    const SIZE: usize = 250 * 1024;
    let rate = 48_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = fast_coordinator_config(dir.path().to_owned());
    let c = match narrow {
        true => coordinator_with_small_send_buffers(cfg).await,
        false => spawn_coordinator_with(cfg, None).await,
    };
    let (w1, ids) = checkpointed_by_w1(&c, SIZE).await;
    let client = c.client();
    // The proxy, when there is one, lives to the end: w2 connects through it.
    let (w2, timeout, _proxy, slow) = match narrow {
        true => {
            let cfg = fast_worker_config(&c.ws_url(), "w2");
            let timeout = cfg.heartbeat_timeout;
            let narrow = Narrow {
                read_rate: Some(rate),
                ..Narrow::default()
            };
            let agent = tether_worker::Agent::with_transport(cfg, big_checkpoints(SIZE), narrow)
                .expect("agent");
            (spawn_agent(agent), timeout, None, None)
        }
        false => {
            let proxy = proxy_in_front(&c, 7).await;
            let slow = slow_link(&proxy, rate, Direction::Downstream).await;
            let cfg = fast_worker_config(&format!("ws://{}", proxy.listen_addr()), "w2");
            let timeout = cfg.heartbeat_timeout;
            (
                spawn_worker(cfg, big_checkpoints(SIZE)),
                timeout,
                Some(proxy),
                Some(slow),
            )
        }
    };
    w2.wait_state(|s| s == ConnState::Connected).await;
    // Stopped, w1 hands the task back at once; w2 resumes it after fetching the checkpoint
    // through the slow link, then writes its own.
    let started = std::time::Instant::now();
    w1.stop().await.expect("stop w1");
    wait_for(
        "w2's checkpoint after the handover",
        4 * DEADLINE,
        || async {
            let t = client.task(&ids[0]).await;
            (t["latest_checkpoint"]["attempt"] == 2).then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    assert!(
        took > 2 * timeout,
        "the handover must outlast the liveness timeout for this test to mean anything: {took:?}"
    );
    match slow {
        Some(slow) => {
            let stats = slow.remove();
            assert!(stats.bytes_delayed as usize > SIZE / 2, "{stats:?}");
        }
        None => {
            let o = client.overview().await;
            assert!(
                o["counters"]["slow_writes"].as_u64() > Some(0),
                "the coordinator's writes must outlast its timeout for this test to mean anything: {o}"
            );
        }
    }
    assert_kept_its_session(&client, &w2, "w2").await;
    assert_eq!(client.control(&ids[0], "cancel").await.0, 200);
    client.wait_status(&ids[0], "cancelled").await;
    w2.stop().await.expect("stop w2");
    c.stop().await;
}

/// The built-in executors and `big_checkpoint`, writing `size` bytes.
fn big_checkpoints(size: usize) -> Executors {
    builtin_and("big_checkpoint", BigCheckpoint(size))
}

/// Worker `w1` runs a `big_checkpoint` task of `size` bytes on `c` until its checkpoint is in:
/// `w1`, and the task (in a list of one) for another worker to resume.
async fn checkpointed_by_w1(c: &TestCoordinator, size: usize) -> (TestWorker, Vec<TaskId>) {
    let w1 = connected(fast_worker_config(&c.ws_url(), "w1"), big_checkpoints(size)).await;
    (w1, big_checkpoint_in(&c.client()).await)
}

/// Submits a task of `kind` (a [`BigCheckpoint`] that finishes once its checkpoint is written)
/// and waits `within` for its result: recorded while the checkpoint still uploads, none is in.
async fn assert_result_overtakes_its_checkpoint(
    client: &Client,
    kind: &str,
    within: std::time::Duration,
) {
    let ids = client
        .submit(&[TaskSpec::new(kind, serde_json::json!({ "finish": true }))])
        .await;
    let t = wait_for("the result", within, || async {
        let t = client.task(&ids[0]).await;
        (t["status"] == "completed").then_some(t)
    })
    .await;
    assert!(
        t["latest_checkpoint"].is_null(),
        "the result waited for the checkpoint (recorded first): {t}"
    );
}

/// Submits a `big_checkpoint` task and waits until its first attempt's checkpoint is in:
/// the task, in a list of one.
async fn big_checkpoint_in(client: &Client) -> Vec<TaskId> {
    let ids = client
        .submit(&[TaskSpec::new("big_checkpoint", serde_json::json!({}))])
        .await;
    wait_for("the first attempt's checkpoint", DEADLINE, || async {
        let t = client.task(&ids[0]).await;
        (t["latest_checkpoint"]["attempt"] == 1).then_some(())
    })
    .await;
    ids
}

/// A coordinator whose worker connections take a send buffer of 16 KiB from their listener:
/// on loopback the kernel grows it past half a megabyte, and a write into a slow reader would
/// hardly wait for the link.
async fn coordinator_with_small_send_buffers(
    cfg: tether_coordinator::CoordinatorConfig,
) -> TestCoordinator {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_send_buffer_size(16 * 1024).expect("send buffer");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    spawn_coordinator_on(cfg, socket.listen(64).expect("listen")).await
}

/// While a resuming worker fetches a large checkpoint over a slow link, what else the
/// coordinator sends it (here a second task's assignment) does not wait for the whole fetch:
/// the first piece is asked for alone and small, and its answer measures the link, which sizes
/// the pieces after it, so a window of them holds about a second of the link. Before, the
/// window asked for four pieces of 256 KiB at a time, and the assignment waited behind a
/// megabyte (a minute at 16 kB/s).
#[tokio::test]
async fn an_assignment_is_not_held_behind_a_checkpoint_fetch_on_a_slow_link() {
    const SIZE: usize = 1024 * 1024;
    const RATE: u64 = 16_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = fast_coordinator_config(dir.path().to_owned());
    let c = coordinator_with_small_send_buffers(cfg).await;
    let (w1, big_task) = checkpointed_by_w1(&c, SIZE).await;
    let client = c.client();
    let narrow = Narrow {
        read_rate: Some(RATE),
        ..Narrow::default()
    };
    let cfg = fast_worker_config(&c.ws_url(), "w2");
    let agent = tether_worker::Agent::with_transport(cfg, big_checkpoints(SIZE), narrow);
    let w2 = spawn_agent(agent.expect("agent"));
    w2.wait_state(|s| s == ConnState::Connected).await;
    w1.stop().await.expect("stop w1");
    wait_for("w2 resuming the big task", DEADLINE, || async {
        let t = client.task(&big_task[0]).await;
        (t["attempt"] == 2).then_some(())
    })
    .await;
    // Past the first piece (asked for alone): the pieces after it are the measured ones.
    wait_for("a piece after the first", DEADLINE, || async {
        let o = client.overview().await;
        let served = o["counters"]["checkpoint_bytes_served"].as_u64();
        (served > Some(64 * 1024)).then_some(())
    })
    .await;
    // w2's other slot takes a task of no time, whose assignment the coordinator sends behind
    // the pieces it is writing.
    let quick = client
        .submit(&[TaskSpec::new("sleep", serde_json::json!({ "ms": 0 }))])
        .await;
    wait_for("the quick task's result", DEADLINE, || async {
        let t = client.task(&quick[0]).await;
        (t["status"] == "completed").then_some(())
    })
    .await;
    let t = client.task(&big_task[0]).await;
    assert_eq!(
        t["latest_checkpoint"]["attempt"], 1,
        "the fetch is still under way: the assignment did not wait for it: {t}"
    );
    assert_eq!(w2.handle.registrations(), 1);
    assert_eq!(client.control(&big_task[0], "cancel").await.0, 200);
    client.wait_status(&big_task[0], "cancelled").await;
    w2.stop().await.expect("stop w2");
    c.stop().await;
}

#[tokio::test]
async fn an_agent_stamps_each_attempt_and_registration_when_they_happen() {
    let before = unix_us();
    let (_dir, c, proxy, w) = worker_behind_proxy().await;
    let shared = &w.handle.shared;
    let stamps = || {
        (
            shared.attempt_started_unix_us.load(Ordering::Relaxed),
            shared.registered_unix_us.load(Ordering::Relaxed),
        )
    };
    let (a1, r1) = stamps();
    assert!(
        before <= a1 && a1 <= r1 && r1 <= unix_us(),
        "{before} {a1} {r1}"
    );
    // Cut off: the next registration is stamped after the attempt that made it, which
    // started no sooner than the backoff delay after the first session ended.
    proxy.down().await;
    w.wait_state(|s| s != ConnState::Connected).await;
    proxy.up().await.expect("proxy up");
    wait_for("a second registration", DEADLINE, || async {
        (w.handle.registrations() >= 2).then_some(())
    })
    .await;
    let (a2, r2) = stamps();
    let delay = shared.backoff_delay_us.load(Ordering::Relaxed);
    assert!(delay > 0, "a reconnection waits a backoff delay");
    assert!(a2 >= r1 + delay, "attempt {a2} after {r1} + {delay}");
    assert!(a2 <= r2 && r2 <= unix_us(), "{a2} {r2}");
    // The loss is stamped when the worker noticed it: after the first registration, a
    // backoff delay or more before the attempt that came back.
    let lost = shared.lost_unix_us.load(Ordering::Relaxed);
    assert!(r1 < lost && lost + delay <= a2, "{r1} {lost} {delay} {a2}");
    // Every attempt is kept with its delay: the first, then those after the loss.
    let recent = shared.recent_attempts();
    assert_eq!(
        recent.first().map(|a| (a.started_unix_us, a.delay_us)),
        Some((a1, 0))
    );
    assert_eq!(
        recent.last().map(|a| (a.started_unix_us, a.delay_us)),
        Some((a2, delay))
    );
    w.stop().await.expect("stop");
    c.stop().await;
}

/// A task that retries on failure, its failure's acknowledgement (and the next attempt's
/// assignment) lost in a black hole on the way to the worker: the worker sends the result
/// again once reconnected, and the coordinator, which ran the task again on it already, takes
/// it as the duplicate it is. The task runs twice, not three times, ends completed with its
/// second attempt's figures, and holds one counted result beside the kept failure.
#[tokio::test]
async fn a_retried_failure_whose_ack_was_lost_is_not_retried_twice() {
    let (dir, c, proxy, w) = worker_behind_proxy().await;
    let client = c.client();
    let (started, go) = (dir.path().join("started"), dir.path().join("go"));
    let script = r#"if [ -e "$STARTED" ]; then printf '{"ok": 1}' > "$TETHER_RESULT_FILE"; exit 0; fi
        touch "$STARTED"; i=0; while [ ! -e "$GO" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
        exit 1"#;
    let spec = TaskSpec {
        retry_on: vec![tether_proto::RetryOn::Failed],
        ..TaskSpec::new(
            "command",
            serde_json::json!({"shell": script, "env": {"STARTED": started, "GO": go}}),
        )
    };
    let id = client.submit(&[spec]).await.remove(0);
    wait_for("the first attempt to start", DEADLINE, || async {
        started.exists().then_some(())
    })
    .await;
    let hole = proxy
        .add_fault(
            Fault::new("no-acks", FaultKind::Blackhole, Direction::Downstream)
                .with_target(Target::Workers(vec![WorkerId::parse("w1").expect("id")])),
        )
        .await
        .expect("fault");
    std::fs::write(&go, b"").expect("go");
    // The failure reached the coordinator, which ran the task again (on the one worker there
    // is: its assignment went into the hole with the acknowledgement).
    wait_for(
        "the failure recorded and the task run again",
        DEADLINE,
        || async {
            let t = client.task(&id).await;
            (t["attempts"].as_array().map_or(0, Vec::len) == 2).then_some(())
        },
    )
    .await;
    w.wait_state(|s| s != ConnState::Connected).await;
    let fired = hole.remove();
    assert!(fired.bytes_dropped > 0, "the hole dropped bytes: {fired:?}");
    client.wait_status(&id, "completed").await;
    let t = client.task(&id).await;
    assert_eq!(attempt_ends(&t), ["failed", "completed"], "{t}");
    let results = client.results(&id).await;
    let counted: Vec<&serde_json::Value> = results.iter().filter(|r| r["stale"] == false).collect();
    assert_eq!((results.len(), counted.len()), (2, 1), "{results:?}");
    assert_eq!(
        counted[0]["body"]["result"]["output"],
        serde_json::json!({"ok": 1})
    );
    assert_eq!(w.handle.executions(), 2, "run twice, not three times");
    let (_, overview) = client.get("/api/v1/overview").await;
    assert!(
        overview["counters"]["results_duplicate"].as_u64() >= Some(1),
        "the failure was sent again, and taken as a duplicate: {overview}"
    );
    // Each stored result counted once by the counters that count them: the retried failure
    // apart (`results_retried`), its resend not at all.
    let rows: u64 = tether_coordinator::core::Counters::RESULT_ROWS
        .iter()
        .map(|name| overview["counters"][name].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(rows, 2, "{overview}");
    assert_eq!(overview["counters"]["results_retried"], 1, "{overview}");
    w.stop().await.expect("stop");
    c.stop().await;
}
