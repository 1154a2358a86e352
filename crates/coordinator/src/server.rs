//! `run(listener, config, shutdown)`: opens the store, starts the core and the writer, and
//! serves the worker endpoint and the HTTP API on one listener until shutdown.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodRouter, get, post};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::auth::ApiTokens;
use crate::config::CoordinatorConfig;
use crate::core::{Change, Core, Counters, Event};
use crate::dashboard::{self, History};
use crate::store::{self, StoreError, StoreStats};

/// Capacity of the core's event queue; sessions wait (and stop reading) when it is full. An
/// event carries up to [`FRAME_EVENT_MESSAGES`](crate::core::FRAME_EVENT_MESSAGES) of a frame's
/// messages, so at most this many times that wait in it.
const EVENT_QUEUE: usize = 8_192;
/// Batches waiting for the writer before the core waits.
const WRITER_QUEUE: usize = 1024;

/// Shared with handlers.
pub struct AppState {
    pub cfg: Arc<CoordinatorConfig>,
    pub events: mpsc::Sender<Event>,
    pub counters: Arc<Counters>,
    pub store_stats: Arc<StoreStats>,
    /// Committed changes, for the dashboard's event stream.
    pub changes: broadcast::Sender<Change>,
    /// The dashboard's chart samples.
    pub history: Arc<History>,
    /// Cancelled when the coordinator stops; long-lived responses (event streams) end then.
    pub stop: CancellationToken,
    /// Turns for answers that may run to many megabytes ([`crate::http::HEAVY_AT_ONCE`]).
    pub heavy: Arc<tokio::sync::Semaphore>,
    /// Turns for controls' answers ([`crate::http::CONTROLS_AT_ONCE`]), apart from `heavy`.
    pub controls: Arc<tokio::sync::Semaphore>,
    /// Turns for reading and parsing submissions ([`crate::http::SUBMITS_AT_ONCE`]).
    pub submits: Arc<tokio::sync::Semaphore>,
    /// The message and byte rates of workers between sessions.
    pub paces: crate::ws::Paces,
    /// The log lines of refused connections said lately (shared with the core).
    pub refusals: Arc<crate::ratelimit::Refusals>,
}

/// How long a stopping coordinator waits for its HTTP connections to finish what they send.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the coordinator stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("the store failed, or the coordinator's core stopped unexpectedly; see the log")]
    StoreFailed,
    #[error(transparent)]
    Exposed(#[from] crate::auth::Exposed),
    #[error("invalid configuration: {0}")]
    Config(#[from] tether_proto::settings::ConfigError),
}

/// A started coordinator's handles, for embedding (demo, tests).
#[derive(Clone)]
pub struct Handles {
    pub counters: Arc<Counters>,
    pub store_stats: Arc<StoreStats>,
}

/// Runs the coordinator on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    cfg: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    run_with(listener, cfg, shutdown, |_| {}).await
}

/// Like [`run`], handing out counters once started. A start refused (an invalid
/// configuration, a public address without tokens, a data directory locked or unreadable)
/// returns before anything is started and never calls `on_start`.
pub async fn run_with(
    listener: TcpListener,
    cfg: CoordinatorConfig,
    shutdown: CancellationToken,
    on_start: impl FnOnce(Handles),
) -> Result<(), ServerError> {
    cfg.validate()?;
    // Every check that can refuse the start comes before anything is started: past the lock,
    // the store is open and the core, the writer and the watchers run, and returning early
    // would leave them running with the lock released (an embedder's retry on another address
    // would run a second core on the same database).
    let addr = listener.local_addr()?;
    crate::auth::check_exposure(addr, cfg.api_tokens.as_ref())?;
    let cfg = Arc::new(cfg);
    let recorder = crate::metrics::install();
    let counters = Arc::new(Counters::default());
    // While the open waits for space, every request is answered `503 starting` (the metrics
    // excepted), on a twin of the listener (the same socket): a start that waits is seen
    // waiting, not dead. It stops taking connections once the open is over, and the listener
    // serves the coordinator's router. (An open that does not wait, as most do, answers
    // nothing before it: a request made meanwhile waits in the socket's backlog, as before,
    // and the router answers it.)
    let (listener, twin) = twin(listener)?;
    let opening = Arc::new(Opening {
        stats: StoreStats::default(),
        recorder,
        cfg: cfg.clone(),
    });
    let opened = CancellationToken::new();
    let answering = {
        let mut twin = crate::admission::Admission::new(twin, cfg.limits.clone(), counters.clone());
        if let Some(tls) = &cfg.tls {
            twin = twin.with_tls(tls.clone());
        }
        let opened = opened.clone();
        axum::serve(twin, opening_router(opening.clone()).into_make_service())
            .with_graceful_shutdown(async move { opened.cancelled().await })
    };
    let answering = {
        let (opened, opening) = (opened.clone(), opening.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = opened.cancelled() => return,
                () = opening.waits() => {}
            }
            tracing::info!(%addr, "until the store is open, every request is answered 503 (starting)");
            let _ = answering.await;
        })
    };
    // The data directory made and locked, and the store opened, on the blocking pool: a disk
    // still full waits there (retrying) until space returns, and a stop meanwhile ends the wait
    // with nothing started. The lock is held until the writer has finished, at the end of this
    // function.
    let opened_store = {
        let (dir, stop, opening) = (cfg.data_dir.clone(), shutdown.clone(), opening.clone());
        tokio::task::spawn_blocking(move || store::lock_and_open(&dir, &stop, &opening.stats)).await
    };
    // Its connections are closed as they finish their answers; new ones are the router's.
    opened.cancel();
    let opened_store =
        opened_store.map_err(|e| std::io::Error::other(format!("opening the store: {e}")))?;
    let (mut lock, conn, loaded) = match opened_store {
        Ok(opened) => opened,
        Err(StoreError::OutOfSpace { .. }) if shutdown.is_cancelled() => {
            tracing::info!(
                "stopped while waiting for space to open the store; nothing was started"
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    // Taken on a full disk, the lock file did not name this process: there is room now.
    lock.stamp();
    let store_stats = Arc::new(StoreStats::default());
    let fatal = CancellationToken::new();
    let stop = CancellationToken::new();
    let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE);
    let writer = store::spawn_writer(
        conn,
        cfg.data_dir.join(store::DB_FILE),
        writer_rx,
        store_stats.clone(),
        (fatal.clone(), stop.clone()),
        store::WriterOptions {
            durability: cfg.durability,
            ..Default::default()
        },
        loaded.unfolded.clone(),
    )?;
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (changes, _) = broadcast::channel(dashboard::CHANGES_BUFFER);
    let refusals = Arc::new(crate::ratelimit::Refusals::default());
    let core = Core::new(cfg.clone(), loaded, counters.clone())
        .with_changes(changes.clone())
        .with_refusals(refusals.clone());
    let handoff = store::Handoff::new(writer_tx, store_stats.clone());
    let core_task = tokio::spawn(watch_core(
        tokio::spawn(core.run(events_rx, handoff, stop.clone())),
        stop.clone(),
        fatal.clone(),
    ));
    let state = Arc::new(AppState {
        cfg: cfg.clone(),
        events: events_tx,
        counters: counters.clone(),
        store_stats: store_stats.clone(),
        changes,
        history: Arc::new(History::new(cfg.history_interval)),
        stop: stop.clone(),
        heavy: Arc::new(tokio::sync::Semaphore::new(crate::http::HEAVY_AT_ONCE)),
        controls: Arc::new(tokio::sync::Semaphore::new(crate::http::CONTROLS_AT_ONCE)),
        submits: Arc::new(tokio::sync::Semaphore::new(crate::http::SUBMITS_AT_ONCE)),
        paces: crate::ws::Paces::default(),
        refusals,
    });
    let disk = tokio::spawn(crate::disk::watch(cfg.data_dir.clone(), stop.clone()));
    let sampler = tokio::spawn(dashboard::sample(
        state.clone(),
        cfg.history_interval,
        stop.clone(),
    ));
    on_start(Handles {
        counters,
        store_stats,
    });
    let state_counters = state.counters.clone();
    let app = router(state);
    // INVARIANT: nothing below returns before the tasks above are stopped and joined.
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "coordinator listening");
    exposure_warnings(addr, &cfg);
    // Token files are read again when they change: a rotation needs no restart, nor a signal.
    let token_watch = cfg
        .api_tokens
        .clone()
        .filter(ApiTokens::has_files)
        .map(|t| tokio::spawn(t.watch(TOKEN_CHECK, stop.clone())));
    let serve_stop = {
        let shutdown = shutdown.clone();
        let fatal = fatal.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = fatal.cancelled() => {}
            }
        }
    };
    // Sessions are long-lived: stop the core first so they close, then the server drains.
    let stop_core = stop.clone();
    let mut listener =
        crate::admission::Admission::new(listener, cfg.limits.clone(), state_counters.clone());
    if let Some(tls) = &cfg.tls {
        listener = listener.with_tls(tls.clone());
        tracing::info!("serving TLS (wss://, https://)");
    }
    // Through a make-service: served as a bare `Router`, axum rebuilds every route for each
    // connection (`Router::with_state` per accept: about 7 % of the coordinator's samples while
    // 10,000 workers connected at once); this way each connection clones one `Arc`. Its
    // `ConnectInfo` hands the worker endpoint the connection's budget before registration.
    let serving = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<crate::admission::Peer>(),
    )
    .with_graceful_shutdown(async move {
        serve_stop.await;
        stop_core.cancel();
    });
    // A client that stopped reading (an event stream's window shut) holds its connection, and
    // a graceful drain would wait for it for ever: past `DRAIN`, the connections left are let go.
    let served = tokio::select! {
        served = serving => served,
        () = async {
            stop.cancelled().await;
            tokio::time::sleep(DRAIN).await;
        } => {
            tracing::warn!("connections still open {} s after the stop are let go", DRAIN.as_secs());
            Ok(())
        }
    };
    stop.cancel();
    let _ = sampler.await;
    let _ = disk.await;
    if let Some(watch) = token_watch {
        let _ = watch.await;
    }
    let _ = core_task.await;
    // The core dropped its writer sender: the writer commits what is left and exits.
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    // A connection of the start's answers still open (a reader that stopped reading) is let go.
    answering.abort();
    drop(lock);
    served?;
    if fatal.is_cancelled() {
        return Err(ServerError::StoreFailed);
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// How often the API token files are looked at for a change.
pub const TOKEN_CHECK: std::time::Duration = crate::tls::RELOAD_CHECK;

/// What the start says of who can reach what: no API tokens (every local user may submit
/// commands that every worker runs), and, beyond loopback without TLS, what crosses the
/// network in clear.
fn exposure_warnings(addr: std::net::SocketAddr, cfg: &CoordinatorConfig) {
    let tokens = cfg.api_tokens.as_ref().filter(|t| !t.is_empty());
    match tokens {
        Some(t) => tracing::info!(tokens = ?t, "the HTTP API needs bearer tokens"),
        None => tracing::warn!(
            %addr,
            "the HTTP API has no tokens: serving a loopback address only, where any local user \
             of this host can submit commands that the workers run as their own users; give \
             --admin-token-file (and --read-token-file, --metrics-token-file) to require tokens"
        ),
    }
    if addr.ip().is_loopback() || cfg.tls.is_some() {
        return;
    }
    if tokens.is_some() {
        tracing::warn!(
            %addr,
            "serving beyond loopback without TLS: API tokens, task commands, their --env values \
             and outputs cross the network in clear text; give --tls-cert and --tls-key (workers \
             and clients then trust its CA with --ca-file)"
        );
    }
    if cfg.auth.as_ref().is_some_and(|a| !a.message_mac) {
        tracing::warn!(
            %addr,
            "serving workers beyond loopback without TLS or --message-mac: an on-path attacker \
             can read their tasks, send them tasks and forge their results; give --tls-cert and \
             --tls-key, or --message-mac"
        );
    }
}

/// The listener and a twin of it, on the same socket (its descriptor duplicated): a
/// connection is taken by whichever accepts it.
fn twin(listener: TcpListener) -> std::io::Result<(TcpListener, TcpListener)> {
    let listener = listener.into_std()?;
    let twin = listener.try_clone()?;
    Ok((
        TcpListener::from_std(listener)?,
        TcpListener::from_std(twin)?,
    ))
}

/// How often a start looks whether its store's open waits for space, to answer meanwhile.
const OPENING_LOOK: std::time::Duration = std::time::Duration::from_millis(50);

/// What the answers served while the store opens look at.
struct Opening {
    /// The open's: whether it waits for space.
    stats: StoreStats,
    recorder: metrics_exporter_prometheus::PrometheusHandle,
    cfg: Arc<CoordinatorConfig>,
}

impl Opening {
    /// Once the open waits for space (it says so in `stats`, from the blocking pool: looked
    /// at every [`OPENING_LOOK`]).
    async fn waits(&self) {
        while !self
            .stats
            .out_of_space
            .load(std::sync::atomic::Ordering::Acquire)
        {
            tokio::time::sleep(OPENING_LOOK).await;
        }
    }

    /// Whether `GET /metrics` may be served: as the router would, with a valid API token when
    /// tokens are configured, else for a loopback host only (`auth::browser_guard`).
    fn may_scrape(&self, headers: &axum::http::HeaderMap) -> bool {
        use axum::http::header;
        let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
        match self.cfg.api_tokens.as_ref().filter(|t| !t.is_empty()) {
            Some(tokens) => text(header::AUTHORIZATION)
                .and_then(crate::auth::bearer_token)
                .is_some_and(|token| tokens.scope_of(token).is_some()),
            None => text(header::HOST).is_none_or(tether_proto::endpoint::is_loopback_host),
        }
    }
}

/// The router served while the store opens: every request (a worker's upgrade among them) gets
/// `503 starting` with `Retry-After`, saying whether the open waits for space; `GET /metrics`
/// is served (what the recorder holds: `tether_store_out_of_space` among it) to whom the
/// router would serve it.
fn opening_router(opening: Arc<Opening>) -> Router {
    Router::new().fallback(answer_opening).with_state(opening)
}

async fn answer_opening(
    axum::extract::State(o): axum::extract::State<Arc<Opening>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode, header};
    use axum::response::IntoResponse;
    if method == axum::http::Method::GET && uri.path() == "/metrics" && o.may_scrape(&headers) {
        let content = [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)];
        return (content, o.recorder.render()).into_response();
    }
    let message = match o
        .stats
        .out_of_space
        .load(std::sync::atomic::Ordering::Acquire)
    {
        true => {
            "waiting for space in the data directory to open the store; the coordinator starts \
             once there is room (free space there)"
        }
        false => "opening the store; the coordinator starts once it is open",
    };
    let mut r = crate::http::error_response(StatusCode::SERVICE_UNAVAILABLE, "starting", message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// One route of the router: its methods and path, and the path under which the API
/// description documents it (the same unless the router matches more than it documents).
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub methods: &'static [&'static str],
    pub path: &'static str,
    pub doc_path: &'static str,
}

/// The router and the list of its routes, built together so the list cannot miss a route.
struct Table {
    router: Router<Arc<AppState>>,
    routes: Vec<Route>,
}

impl Table {
    fn add(
        self,
        methods: &'static [&'static str],
        path: &'static str,
        handler: MethodRouter<Arc<AppState>>,
    ) -> Self {
        self.add_as(methods, path, path, handler)
    }

    fn add_as(
        mut self,
        methods: &'static [&'static str],
        path: &'static str,
        doc_path: &'static str,
        handler: MethodRouter<Arc<AppState>>,
    ) -> Self {
        self.routes.push(Route {
            methods,
            path,
            doc_path,
        });
        self.router = self.router.route(path, handler);
        self
    }
}

fn table() -> Table {
    use crate::{dashboard, http, metrics, openapi, ws};
    const GET: &[&str] = &["get"];
    const POST: &[&str] = &["post"];
    // The API's endpoints that take no query refuse one (`http::no_query`).
    let no_query = || axum::middleware::from_fn(http::no_query);
    Table {
        router: Router::new(),
        routes: Vec::new(),
    }
    .add_as(
        GET,
        "/api/v1/worker/{*rest}",
        "/api/v1/worker/{worker_id}/ws",
        get(ws::upgrade),
    )
    .add(
        &["get", "post"],
        "/api/v1/tasks",
        post(http::submit)
            .route_layer(no_query())
            .get(http::list_tasks),
    )
    .add(
        GET,
        "/api/v1/tasks/{id}",
        get(http::get_task).route_layer(no_query()),
    )
    .add(
        GET,
        "/api/v1/tasks/{id}/result",
        get(http::task_result).route_layer(no_query()),
    )
    .add(
        GET,
        "/api/v1/tasks/{id}/state",
        get(http::task_state).route_layer(no_query()),
    )
    .add(
        GET,
        "/api/v1/tasks/{id}/checkpoints",
        get(http::task_checkpoints).route_layer(no_query()),
    )
    .add(
        GET,
        "/api/v1/tasks/{id}/checkpoints/{cid}",
        get(http::checkpoint_data).route_layer(no_query()),
    )
    .add(
        POST,
        "/api/v1/tasks/{id}/{action}",
        post(http::control).route_layer(no_query()),
    )
    .add(GET, "/api/v1/workers", get(http::list_workers))
    .add(
        GET,
        "/api/v1/workers/{id}",
        get(http::get_worker).route_layer(no_query()),
    )
    .add(
        POST,
        "/api/v1/workers/{id}/{action}",
        post(http::worker_action).route_layer(no_query()),
    )
    .add(GET, "/api/v1/runs", get(http::list_runs))
    .add(
        GET,
        "/api/v1/overview",
        get(http::overview).route_layer(no_query()),
    )
    .add(
        GET,
        "/api/v1/history",
        get(http::history).route_layer(no_query()),
    )
    .add(
        GET,
        "/api/v1/events",
        get(dashboard::events).route_layer(no_query()),
    )
    .add(GET, "/api/v1/openapi.json", get(openapi::document))
    .add(GET, "/healthz", get(http::healthz))
    .add(GET, "/metrics", get(metrics::scrape))
    .add(GET, "/", get(dashboard::index))
    .add(GET, "/dashboard/{file}", get(dashboard::file))
}

/// Every route the coordinator serves.
pub fn routes() -> Vec<Route> {
    table().routes
}

fn router(state: Arc<AppState>) -> Router {
    let max_body = state.cfg.max_body;
    table()
        .router
        .method_not_allowed_fallback(crate::http::method_not_allowed)
        .fallback(crate::http::not_found)
        // Bearer tokens (when configured) for everything but the public paths.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::browser_guard,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        // Outermost: a target too long is refused in the API's words before anything else.
        .layer(axum::middleware::from_fn(crate::http::target_limit))
        .with_state(state)
}

/// Waits for the core's task; one that ends before the stop (it panicked, or found the store
/// writer gone) stops the coordinator as a store failure does (`fatal`). Without this the
/// process went on answering `/healthz` and accepting connections with no core: every API call
/// failed and every registration hung, and nothing restarted it.
async fn watch_core(
    core: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    fatal: CancellationToken,
) {
    let ended = core.await;
    if !stop.is_cancelled() {
        match ended {
            Err(e) => tracing::error!(error = %e, "the coordinator's core failed; stopping"),
            Ok(()) => tracing::error!("the coordinator's core stopped on its own; stopping"),
        }
        fatal.cancel();
    }
}

#[cfg(test)]
mod tests {
    /// A core that panics, or ends on its own before the stop, stops the coordinator (the
    /// server's `fatal`); one that ends after the stop does not count as a failure.
    #[tokio::test]
    async fn a_core_that_ends_before_the_stop_stops_the_coordinator() {
        use tokio_util::sync::CancellationToken;
        for panics in [true, false] {
            let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
            let core = tokio::spawn(async move {
                if panics {
                    panic!("a bug in the core");
                }
            });
            super::watch_core(core, stop, fatal.clone()).await;
            assert!(fatal.is_cancelled(), "panics: {panics}");
        }
        let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
        stop.cancel();
        super::watch_core(tokio::spawn(async {}), stop, fatal.clone()).await;
        assert!(!fatal.is_cancelled());
    }

    /// A start refused for serving a public address without tokens starts nothing: no
    /// `on_start`, no task of the attempt left running (its core would go on with the store
    /// open), and the data directory free for the next attempt at once.
    #[tokio::test]
    async fn a_start_refused_for_an_exposed_address_leaves_nothing_running() {
        use super::{ServerError, run, run_with};
        use tokio_util::sync::CancellationToken;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = tasks();
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
            .await
            .expect("bind");
        let cfg = crate::config::CoordinatorConfig::new(&data);
        let mut started = false;
        let r = run_with(listener, cfg, CancellationToken::new(), |_| started = true).await;
        assert!(matches!(r, Err(ServerError::Exposed(_))), "{r:?}");
        assert!(!started, "on_start was called for a start that failed");
        assert_eq!(tasks(), before, "tasks of the refused start still run");
        drop(crate::store::lock_dir(&data).expect("the data directory is free"));
        // The next attempt, on loopback, starts and stops.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let shutdown = CancellationToken::new();
        let again = tokio::spawn(run(
            listener,
            crate::config::CoordinatorConfig::new(&data),
            shutdown.clone(),
        ));
        shutdown.cancel();
        again.await.expect("task").expect("a clean start and stop");
    }
}
