//! Setup and teardown shared by the tests of several modules.

use tempfile::TempDir;
use tether_coordinator::CoordinatorConfig;
use tether_proto::{TaskId, TaskSpec};
use tether_testkit::*;
use tether_worker::{ConnState, Executor, Executors, WorkerConfig};

/// A coordinator with fast settings in a new temporary directory: the directory (it lives as
/// long as the caller keeps it) and the coordinator.
pub async fn coordinator() -> (TempDir, TestCoordinator) {
    coordinator_with(|_| {}).await
}

/// [`coordinator`], with the fast settings as `tune` changes them.
pub async fn coordinator_with(
    tune: impl FnOnce(&mut CoordinatorConfig),
) -> (TempDir, TestCoordinator) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    tune(&mut cfg);
    let c = spawn_coordinator_with(cfg, None).await;
    (dir, c)
}

/// [`coordinator`], with a worker `w1` of it with the built-in executors, connected: the
/// directory, the coordinator, the worker and a client of the coordinator.
pub async fn coordinator_and_worker() -> (TempDir, TestCoordinator, TestWorker, Client) {
    let (dir, c) = coordinator().await;
    let w = connected_worker(&c.ws_url(), "w1").await;
    let client = c.client();
    (dir, c, w, client)
}

/// Stops `c` and starts a coordinator with `cfg` on its address (workers reconnect to it).
pub async fn restarted_with(c: TestCoordinator, cfg: CoordinatorConfig) -> TestCoordinator {
    let addr = c.addr;
    c.stop().await;
    spawn_coordinator_with(cfg, Some(addr)).await
}

/// Stops `c` and starts a coordinator with fast settings on its data directory and address.
pub async fn restarted(c: TestCoordinator) -> TestCoordinator {
    let cfg = fast_coordinator_config(c.data_dir.clone());
    restarted_with(c, cfg).await
}

/// Starts a worker with `cfg` and `executors` and waits until it is connected.
pub async fn connected(cfg: WorkerConfig, executors: Executors) -> TestWorker {
    let w = spawn_worker(cfg, executors);
    w.wait_state(|s| s == ConnState::Connected).await;
    w
}

/// A worker `id` of the coordinator at `url`, with fast settings and the built-in executors,
/// connected.
pub async fn connected_worker(url: &str, id: &str) -> TestWorker {
    connected(fast_worker_config(url, id), Executors::builtin()).await
}

/// The built-in executors and `run` as `kind`.
pub fn builtin_and(kind: &str, run: impl Executor) -> Executors {
    let mut executors = Executors::builtin();
    executors.register(kind, run);
    executors
}

/// Submits one task of `kind` with an empty config to `client`: its id.
pub async fn submit_one(client: &Client, kind: &str) -> TaskId {
    client
        .submit(&[TaskSpec::new(kind, serde_json::json!({}))])
        .await
        .remove(0)
}

/// Waits until the task `id` has a checkpoint stored (its `latest_checkpoint` is set): the
/// task then.
pub async fn checkpointed(client: &Client, id: &TaskId) -> serde_json::Value {
    let what = format!("a checkpoint of task {id} to be stored");
    wait_for(&what, DEADLINE, || async {
        let t = client.task(id).await;
        (!t["latest_checkpoint"].is_null()).then_some(t)
    })
    .await
}

/// A worker `w1` of `c`, with the built-in executors and `run` as `kind`, connected, and one
/// task of that kind submitted to `c`: the worker, a client of `c`, and the task's id.
pub async fn one_task_on_a_worker(
    c: &TestCoordinator,
    kind: &str,
    run: impl Executor,
) -> (TestWorker, Client, TaskId) {
    let w = connected(
        fast_worker_config(&c.ws_url(), "w1"),
        builtin_and(kind, run),
    )
    .await;
    let client = c.client();
    let id = submit_one(&client, kind).await;
    (w, client, id)
}

/// Cancels the task `id` and waits until it is cancelled, then stops `w` (cleanly) and `c`.
pub async fn cancel_and_stop(client: &Client, id: &TaskId, w: TestWorker, c: TestCoordinator) {
    client.control(id, "cancel").await;
    client.wait_status(id, "cancelled").await;
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// The log lines written on this thread while it is captured ([`CapturedLog::capture`]): the
/// coordinator's tasks a current-thread test runtime spawns log there too.
#[derive(Clone, Default)]
pub struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    /// Captures what `filter` (an `EnvFilter`) lets through on this thread until the guard is
    /// dropped.
    pub fn capture(filter: &str) -> (Self, tracing::subscriber::DefaultGuard) {
        use tracing_subscriber::util::SubscriberInitExt;
        let log = CapturedLog::default();
        let writer = log.clone();
        let guard = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish()
            .set_default();
        (log, guard)
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The lines that say `message`.
    pub fn lines(&self, message: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(message))
            .map(str::to_owned)
            .collect()
    }
}

/// Sends `request` (a whole HTTP/1.1 request, with `Connection: close`) as it is, and reads
/// the whole answer within [`DEADLINE`]: its status, head and body. For what no HTTP client
/// sends (a target past hyper's bound, one of every byte).
pub async fn raw_http(addr: std::net::SocketAddr, request: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("read the answer");
        answer
    };
    let answer = tokio::time::timeout(DEADLINE, exchange)
        .await
        .expect("an answer within the deadline");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("a head and a body: {answer:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    (status, head.to_owned(), body.to_owned())
}
