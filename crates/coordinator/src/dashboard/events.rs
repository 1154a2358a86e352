//! `GET /api/v1/events`: server-sent events for the dashboard.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;

use super::{SNAPSHOT_TASKS, Sample};
use crate::auth::EnvShown;
use crate::core::{Api, ApiError, Change, TaskQuery};
use crate::http::ask;
use crate::server::AppState;

/// Least time between two snapshots for a client that lags.
const RESYNC_PAUSE: Duration = Duration::from_secs(1);
/// Keep-alive comments keep proxies from closing an idle stream; more often when the
/// coordinator's own `http_idle` is shorter (a third of it), or it would cut the stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The keep-alive interval under an `http_idle` of `idle`.
fn keep_alive(idle: Duration) -> Duration {
    KEEP_ALIVE.min(idle / 3)
}

/// `GET /api/v1/events`
#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "observe",
    responses(
        (status = 200, description = "Server-sent events: `snapshot` first, then `task`, `worker`, `sample`, `task_removed` and `worker_removed` (retention); `resync` before a fresh snapshot; to a token of the read scope, each value of a task config's `env` is `(redacted)`", content_type = "text/event-stream", body = String),
        (status = 400, description = "A query parameter (`bad_request`, naming it): the stream takes none", body = crate::http::ErrorBody),
    )
)]
pub async fn events(State(app): State<Arc<AppState>>, shown: EnvShown) -> Response {
    let app_idle = app.cfg.limits.http_idle;
    let stream = Feed {
        shown,
        changes: app.changes.subscribe(),
        samples: app.history.tx.subscribe(),
        app,
        snapshot_due: true,
        first: true,
        turn: None,
    }
    .into_stream();
    let every = keep_alive(app_idle);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(every))
        .into_response()
}

/// One client's position in the feed.
struct Feed {
    app: Arc<AppState>,
    /// Whether tasks' `env` values are shown.
    shown: EnvShown,
    changes: Receiver<Change>,
    samples: Receiver<Arc<Sample>>,
    snapshot_due: bool,
    /// No snapshot sent yet.
    first: bool,
    /// The turn of large answers the last snapshot was made in, held until the stream is
    /// read on: the connection asks for the next event only once it wrote most of that one,
    /// so a client that does not read holds a turn, not a snapshot outside the turns' bound.
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Feed {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> {
        futures_util::stream::unfold(self, |mut feed| async move {
            let ev = feed.next().await?;
            Some((Ok(ev), feed))
        })
    }

    /// The next event, or `None` when the coordinator stops.
    async fn next(&mut self) -> Option<Event> {
        self.turn = None;
        if self.snapshot_due {
            if !self.first {
                // A client that keeps lagging gets at most one snapshot per pause.
                tokio::select! {
                    _ = self.app.stop.cancelled() => return None,
                    _ = tokio::time::sleep(RESYNC_PAUSE) => {}
                }
            }
            self.first = false;
            self.snapshot_due = false;
            // Changes and samples queued before the snapshot are in it (a sample may come both
            // in its history and after it: the page draws a sample no older than its last once).
            self.changes = self.changes.resubscribe();
            self.samples = self.samples.resubscribe();
            let (snapshot, turn) = self.snapshot().await.ok()?;
            self.turn = Some(turn);
            return Some(snapshot);
        }
        let stop = self.app.stop.clone();
        tokio::select! {
            _ = stop.cancelled() => None,
            c = self.changes.recv() => match c {
                Ok(Change::Task(t)) => Some(json_event("task", &self.shown.task(*t))),
                Ok(Change::Worker(w)) => Some(json_event("worker", &w)),
                Ok(Change::TaskRemoved(id)) => {
                    Some(json_event("task_removed", &serde_json::json!({ "task_id": id })))
                }
                Ok(Change::WorkerRemoved(id)) => Some(json_event(
                    "worker_removed",
                    &serde_json::json!({ "worker_id": id }),
                )),
                Err(RecvError::Lagged(_)) => {
                    self.snapshot_due = true;
                    Some(Event::default().event("resync").data("{}"))
                }
                Err(RecvError::Closed) => None,
            },
            s = self.samples.recv() => match s {
                Ok(s) => Some(json_event("sample", &s)),
                Err(RecvError::Lagged(_)) => Some(Event::default().comment("samples skipped")),
                Err(RecvError::Closed) => None,
            },
        }
    }

    /// The snapshot, made in a turn for large answers (it holds every worker and the newest
    /// tasks), with that turn; a client that waited [`crate::http::HEAVY_WAIT`] for one has its
    /// stream ended, to open it again.
    async fn snapshot(&self) -> Result<(Event, tokio::sync::OwnedSemaphorePermit), ApiError> {
        let app = &self.app;
        let turn = crate::http::heavy_turn(app).await.map_err(|e| {
            e.unwrap_or_else(|| ApiError::Internal("busy with large answers".into()))
        })?;
        // Read before the core is asked: a change at or before it is in the snapshot or, made
        // since the subscription, in an event after it.
        let at = tether_proto::msg::now();
        let overview = ask(app, |reply| Api::Overview { reply }).await?;
        let workers = ask(app, |reply| Api::ListWorkers { reply }).await?;
        let query = TaskQuery {
            limit: SNAPSHOT_TASKS,
            newest_first: true,
            ..TaskQuery::default()
        };
        let newest = self
            .shown
            .tasks(ask(app, |reply| Api::ListTasks { query, reply }).await?);
        let snapshot = json_event(
            "snapshot",
            &serde_json::json!({
                "at": at,
                "overview": overview,
                "workers": workers,
                "tasks": newest,
                "history": app.history.all(),
                "history_interval_ms": app.cfg.history_interval.as_millis() as u64,
            }),
        );
        Ok((snapshot, turn))
    }
}

fn json_event<T: serde::Serialize>(name: &str, v: &T) -> Event {
    let data = serde_json::to_string(v).unwrap_or_else(|_| "null".into());
    Event::default().event(name).data(data)
}
