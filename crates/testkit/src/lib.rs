//! Test helpers: a coordinator, workers and an HTTP client on `127.0.0.1:0`, with fast timings,
//! and a wait-for-condition helper (no sleeps to "wait a bit").

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tether_coordinator::{CoordinatorConfig, Handles};
use tether_proto::{TaskId, TaskSpec, WorkerId};
use tether_worker::backoff::{BackoffConfig, Jitter};
use tether_worker::{Agent, AgentHandle, Executors, WorkerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Default deadline for conditions in tests (generous: CI machines are small and busy).
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Whether this is a CI run: the environment variable `CI` set (`.ci/run` exports `CI=true`)
/// to anything but empty, `false` or `0`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "false" | "0"))
}

/// For a test whose environment is missing (`needs`: what it needs; `why`: what is missing).
/// In CI, where `.ci/run` provides that environment, it fails the test: a skip there would
/// pass without testing anything. Elsewhere it prints that the test is skipped, and the
/// caller returns.
#[track_caller]
pub fn skip_unless_ci(needs: &str, why: &str) {
    assert!(
        !in_ci(),
        "this test needs {needs}, and in CI (CI is set) a missing one is a failure, not a skip: {why}"
    );
    eprintln!("skipped: this test needs {needs} ({why}); with CI set it fails instead");
}

/// The messages of a frame's JSON: the elements of a batch, or the message itself.
pub fn messages_of(v: serde_json::Value) -> Vec<serde_json::Value> {
    match v {
        serde_json::Value::Array(items) => items,
        one => vec![one],
    }
}

/// Waits until `f` returns `Some`, polling every 20 ms, or panics with `what` at `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Coordinator settings scaled down for tests.
pub fn fast_coordinator_config(dir: PathBuf) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::new(dir);
    c.heartbeat_interval = Duration::from_millis(200);
    c.heartbeat_timeout = Duration::from_secs(2);
    c.lost_after = Duration::from_secs(3);
    c.sweep_interval = Duration::from_millis(100);
    // As `tether coordinator`: the built-in executors' configs are checked at submission.
    let builtin = Executors::builtin();
    c.config_check = Some(tether_coordinator::config::ConfigCheck(
        std::sync::Arc::new(move |kind, config| builtin.check_config(kind, config)),
    ));
    c
}

/// Worker settings scaled down for tests.
pub fn fast_worker_config(coordinator: &str, id: &str) -> WorkerConfig {
    let mut c = WorkerConfig::new(coordinator, WorkerId::parse(id).expect("valid worker id"));
    c.heartbeat_interval = Duration::from_millis(200);
    c.heartbeat_timeout = Duration::from_secs(2);
    c.ws_ping_interval = Duration::from_millis(500);
    c.connect_timeout = Duration::from_secs(2);
    c.healthy_after = Duration::from_millis(500);
    c.stop_reconnect = Duration::from_secs(2);
    c.telemetry_interval = Duration::from_millis(500);
    c.backoff = BackoffConfig {
        initial: Duration::from_millis(50),
        factor: 2.0,
        max: Duration::from_millis(500),
        jitter: Jitter::Proportional(0.2),
        max_attempts: None,
    };
    c.slots = 2;
    c.capabilities = vec!["cpu".into()];
    c.seed = Some(7);
    c
}

/// A coordinator running in this process.
pub struct TestCoordinator {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub join: JoinHandle<Result<(), tether_coordinator::ServerError>>,
    pub handles: Handles,
    pub data_dir: PathBuf,
}

impl TestCoordinator {
    /// `ws://addr` for workers.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn client(&self) -> Client {
        Client::new(&format!("http://{}", self.addr))
    }

    /// Stops it and waits until it has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.join.await;
    }
}

/// Starts a coordinator on `127.0.0.1:0` with `cfg`, binding `addr` if given (restarts reuse
/// the port).
pub async fn spawn_coordinator_with(
    cfg: CoordinatorConfig,
    addr: Option<SocketAddr>,
) -> TestCoordinator {
    init_tracing();
    let listener = match addr {
        Some(a) => {
            let mut tries = 0;
            loop {
                match TcpListener::bind(a).await {
                    Ok(l) => break l,
                    Err(e) if tries < 100 => {
                        tries += 1;
                        tracing::debug!(error = %e, "rebinding");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("bind {a}: {e}"),
                }
            }
        }
        None => TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    };
    spawn_coordinator_on(cfg, listener).await
}

/// Starts a coordinator with `cfg` on `listener` (one whose sockets the test set up itself).
pub async fn spawn_coordinator_on(
    cfg: CoordinatorConfig,
    listener: TcpListener,
) -> TestCoordinator {
    init_tracing();
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let data_dir = cfg.data_dir.clone();
    let join = tokio::spawn(tether_coordinator::run_with(
        listener,
        cfg,
        shutdown.clone(),
        move |h| {
            let _ = tx.send(h);
        },
    ));
    let handles = rx.await.expect("coordinator started");
    TestCoordinator {
        addr,
        shutdown,
        join,
        handles,
        data_dir,
    }
}

/// Starts a coordinator with fast settings in `dir`.
pub async fn spawn_coordinator(dir: PathBuf) -> TestCoordinator {
    spawn_coordinator_with(fast_coordinator_config(dir), None).await
}

/// A worker agent running in this process.
pub struct TestWorker {
    pub handle: AgentHandle,
    pub shutdown: CancellationToken,
    pub join: JoinHandle<Result<(), tether_worker::AgentError>>,
}

impl TestWorker {
    pub async fn stop(self) -> Result<(), tether_worker::AgentError> {
        self.shutdown.cancel();
        self.join.await.expect("agent task")
    }

    /// Waits until the agent's connection state satisfies `f`, for at most twice
    /// [`DEADLINE`]: a test whose awaited change never comes fails, naming the state the
    /// worker is in, instead of hanging the suite.
    pub async fn wait_state(
        &self,
        f: impl Fn(tether_worker::ConnState) -> bool,
    ) -> tether_worker::ConnState {
        match tokio::time::timeout(2 * DEADLINE, self.handle.wait_state(f)).await {
            Ok(s) => s,
            Err(_) => panic!(
                "worker {} still {:?} after {:?}",
                self.handle.shared.worker_id,
                self.handle.state(),
                2 * DEADLINE
            ),
        }
    }
}

/// Starts a worker agent.
pub fn spawn_worker(cfg: WorkerConfig, executors: Executors) -> TestWorker {
    let agent = Agent::new(cfg, executors).expect("valid worker config");
    spawn_agent(agent)
}

/// Starts an already built agent.
pub fn spawn_agent(agent: Agent) -> TestWorker {
    let handle = agent.handle();
    let shutdown = CancellationToken::new();
    let join = tokio::spawn(agent.run(shutdown.clone()));
    TestWorker {
        handle,
        shutdown,
        join,
    }
}

/// An HTTP client for servers on this machine, from `builder`. Without a proxy: reqwest takes
/// one from HTTP_PROXY and the like, and sends even a loopback request through it unless
/// NO_PROXY names the host, and a proxy cannot reach a test's `127.0.0.1` server.
pub fn loopback_client(builder: reqwest::ClientBuilder) -> reqwest::Client {
    builder.no_proxy().build().expect("HTTP client")
}

/// A small client of the HTTP API.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: loopback_client(reqwest::Client::builder()),
        }
    }

    /// A client that sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(base: &str, token: &str) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: loopback_client(reqwest::Client::builder().default_headers(headers)),
        }
    }

    /// GET a path, returning status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// POST JSON to a path, returning status and JSON body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{}", self.base, path))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn get_as<T: DeserializeOwned>(&self, path: &str) -> T {
        let (status, v) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        serde_json::from_value(v).expect("decode")
    }

    /// Submits tasks, returning their ids.
    pub async fn submit(&self, specs: &[TaskSpec]) -> Vec<TaskId> {
        let (status, v) = self
            .post("/api/v1/tasks", &serde_json::json!({ "tasks": specs }))
            .await;
        assert_eq!(status, 201, "submit: {v}");
        serde_json::from_value(v["task_ids"].clone()).expect("ids")
    }

    /// Submits `count` tasks no worker runs (kind `nobody-runs-this`), each with a config of
    /// `bytes` of padding and the id `{prefix}-{i}`, a thousand a request: changes and
    /// listings of many bytes.
    pub async fn submit_padded(&self, prefix: &str, count: usize, bytes: usize) {
        let pad = "x".repeat(bytes);
        let ids: Vec<usize> = (0..count).collect();
        for chunk in ids.chunks(1000) {
            let specs: Vec<TaskSpec> = chunk
                .iter()
                .map(|i| {
                    let mut s =
                        TaskSpec::new("nobody-runs-this", serde_json::json!({ "pad": pad }));
                    s.task_id = Some(TaskId::parse(&format!("{prefix}-{i}")).expect("id"));
                    s
                })
                .collect();
            self.submit(&specs).await;
        }
    }

    pub async fn task(&self, id: &TaskId) -> serde_json::Value {
        let (status, v) = self.get(&format!("/api/v1/tasks/{id}")).await;
        assert_eq!(status, 200, "task {id}: {v}");
        v
    }

    pub async fn status(&self, id: &TaskId) -> String {
        self.task(id).await["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the task has `status`.
    pub async fn wait_status(&self, id: &TaskId, status: &str) -> serde_json::Value {
        let what = format!("task {id} to be {status}");
        wait_for(&what, DEADLINE, || async {
            let t = self.task(id).await;
            (t["status"] == status).then_some(t)
        })
        .await
    }

    pub async fn results(&self, id: &TaskId) -> Vec<serde_json::Value> {
        let (status, v) = self.get(&format!("/api/v1/tasks/{id}/result")).await;
        assert_eq!(status, 200, "results {id}: {v}");
        v.as_array().cloned().unwrap_or_default()
    }

    pub async fn overview(&self) -> serde_json::Value {
        self.get("/api/v1/overview").await.1
    }

    pub async fn control(&self, id: &TaskId, action: &str) -> (u16, serde_json::Value) {
        self.post(
            &format!("/api/v1/tasks/{id}/{action}"),
            &serde_json::json!({}),
        )
        .await
    }
}

/// The sum of the samples of metric `name` in a Prometheus text exposition whose labels include
/// every pair of `labels` (`None` when no sample matches).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let matches = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if let (true, Ok(v)) = (matches, value.parse::<f64>()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// GETs a Prometheus text exposition.
pub async fn scrape(url: &str) -> String {
    let r = loopback_client(reqwest::Client::builder())
        .get(url)
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status().as_u16(), 200, "GET {url}");
    r.text().await.expect("metrics text")
}

/// A `sleep` task spec.
/// An executor made of a closure, for tests: `executor(|input, ctx| async move { ... })`.
pub fn executor<F, Fut>(run: F) -> impl tether_worker::Executor
where
    F: Fn(tether_worker::TaskInput, tether_worker::TaskCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, tether_worker::ExecError>> + Send + 'static,
{
    struct FnExecutor<F>(F);
    impl<F, Fut> tether_worker::Executor for FnExecutor<F>
    where
        F: Fn(tether_worker::TaskInput, tether_worker::TaskCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, tether_worker::ExecError>> + Send + 'static,
    {
        fn execute(
            &self,
            input: tether_worker::TaskInput,
            ctx: tether_worker::TaskCtx,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<serde_json::Value, tether_worker::ExecError>> + Send>,
        > {
            Box::pin((self.0)(input, ctx))
        }
    }
    FnExecutor(run)
}

/// How each attempt of `task` (an API task document) ended, in order (`""` for one running).
pub fn attempt_ends(task: &serde_json::Value) -> Vec<String> {
    task["attempts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a["end"].as_str().unwrap_or("").to_owned())
        .collect()
}

pub fn sleep_task(ms: u64, steps: u32, checkpoint_every: u32) -> TaskSpec {
    TaskSpec::new(
        "sleep",
        serde_json::json!({"ms": ms, "steps": steps, "checkpoint_every": checkpoint_every}),
    )
}

/// A child process (a real `tether` in a test) killed and reaped when dropped: a failed
/// assertion leaves no process behind.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP relay with a kill switch, for cutting a worker off in tests that do not need the
/// full fault proxy.
pub struct Relay {
    pub addr: SocketAddr,
    enabled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let enabled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let accept = {
            let enabled = enabled.clone();
            let links = links.clone();
            tokio::spawn(async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    if !enabled.load(Ordering::SeqCst) {
                        drop(down);
                        continue;
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    });
                    links
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(link.abort_handle());
                }
            })
        };
        Relay {
            addr,
            enabled,
            links,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Cuts every live link and refuses new ones.
    pub fn cut(&self) {
        self.enabled
            .store(false, std::sync::atomic::Ordering::SeqCst);
        for l in self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            l.abort();
        }
    }

    /// Accepts links again.
    pub fn restore(&self) {
        self.enabled
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
