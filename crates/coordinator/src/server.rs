//! `run(listener, config, shutdown)`: opens the store, starts the core and the writer, and
//! serves the worker endpoint and the HTTP API on one listener until shutdown.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::CoordinatorConfig;
use crate::core::{Core, Counters, Event};
use crate::store::{self, StoreError, StoreStats};

/// Capacity of the core's event queue; sessions wait (and stop reading) when it is full.
const EVENT_QUEUE: usize = 65_536;
/// Batches waiting for the writer before the core waits.
const WRITER_QUEUE: usize = 1024;

/// Shared with handlers.
pub struct AppState {
    pub cfg: Arc<CoordinatorConfig>,
    pub events: mpsc::Sender<Event>,
    pub counters: Arc<Counters>,
    pub store_stats: Arc<StoreStats>,
}

/// Why the coordinator stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("the store failed; see the log")]
    StoreFailed,
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

/// Like [`run`], handing out counters once started.
pub async fn run_with(
    listener: TcpListener,
    cfg: CoordinatorConfig,
    shutdown: CancellationToken,
    on_start: impl FnOnce(Handles),
) -> Result<(), ServerError> {
    let cfg = Arc::new(cfg);
    let (conn, loaded) = store::open(&cfg.data_dir)?;
    let counters = Arc::new(Counters::default());
    let store_stats = Arc::new(StoreStats::default());
    let fatal = CancellationToken::new();
    let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE);
    let writer = store::spawn_writer(
        conn,
        cfg.data_dir.join(store::DB_FILE),
        writer_rx,
        store_stats.clone(),
        fatal.clone(),
        store::MAX_GROUP,
    )?;
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let core = Core::new(cfg.clone(), loaded, counters.clone());
    let stop = CancellationToken::new();
    let core_task = tokio::spawn(core.run(events_rx, writer_tx, stop.clone()));
    let state = Arc::new(AppState {
        cfg: cfg.clone(),
        events: events_tx,
        counters: counters.clone(),
        store_stats: store_stats.clone(),
    });
    on_start(Handles {
        counters,
        store_stats,
    });
    let app = router(state);
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "coordinator listening");
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
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            serve_stop.await;
            stop_core.cancel();
        })
        .await;
    stop.cancel();
    let _ = core_task.await;
    // The core dropped its writer sender: the writer commits what is left and exits.
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    served?;
    if fatal.is_cancelled() {
        return Err(ServerError::StoreFailed);
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    use crate::{http, ws};
    let max_body = state.cfg.max_body;
    Router::new()
        .route("/api/v1/worker/{*rest}", get(ws::upgrade))
        .route("/api/v1/tasks", post(http::submit).get(http::list_tasks))
        .route("/api/v1/tasks/{id}", get(http::get_task))
        .route("/api/v1/tasks/{id}/result", get(http::task_result))
        .route("/api/v1/tasks/{id}/state", get(http::task_state))
        .route(
            "/api/v1/tasks/{id}/checkpoints",
            get(http::task_checkpoints),
        )
        .route(
            "/api/v1/tasks/{id}/checkpoints/{cid}",
            get(http::checkpoint_data),
        )
        .route("/api/v1/tasks/{id}/{action}", post(http::control))
        .route("/api/v1/workers", get(http::list_workers))
        .route("/api/v1/workers/{id}", get(http::get_worker))
        .route("/api/v1/overview", get(http::overview))
        .route("/healthz", get(http::healthz))
        .fallback(http::not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}
