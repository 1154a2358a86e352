//! The HTTP API, JSON in and out, on the same listener as the worker endpoint.
//!
//! ```text
//! POST /api/v1/tasks                      submit one spec or {"tasks": [specs]}
//! GET  /api/v1/tasks?status=&limit=&order=&updated_since=&after_seq=
//!                                         list (order: oldest, the default, or newest;
//!                                         updated_since: changed at or after an RFC 3339 time)
//! GET  /api/v1/tasks/{id}                 one task with its attempts
//! GET  /api/v1/tasks/{id}/result          recorded results (counted first, stale after)
//! GET  /api/v1/tasks/{id}/state           latest state
//! GET  /api/v1/tasks/{id}/checkpoints     checkpoint list; /{cid} the bytes
//! POST /api/v1/tasks/{id}/cancel|pause|resume|checkpoint
//! GET  /api/v1/workers, /api/v1/workers/{id}
//! GET  /api/v1/overview                   counts and counters
//! GET  /api/v1/history                    the dashboard's chart samples
//! GET  /healthz
//! ```
//!
//! Elsewhere: `/api/v1/events` and `/` (the dashboard), `/metrics`, `/api/v1/openapi.json`.
//! Every route is listed once, in `server.rs`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tether_proto::{CheckpointId, TaskId, TaskSpec, TaskStatus, WorkerId};
use tokio::sync::oneshot;

use crate::core::{Api, ApiError, ControlOp, Event, TaskQuery};
use crate::server::AppState;

/// The body of every error: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// not_found, conflict, invalid, bad_request, internal, bad_path, upgrade_required, ...
    pub code: String,
    pub message: String,
}

/// The reply to a submission.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Submitted {
    #[schema(value_type = Vec<String>)]
    pub task_ids: Vec<TaskId>,
}

/// A JSON error response with an [`ErrorBody`].
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            message: message.to_owned(),
        },
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        error_response(status, code, &self.to_string())
    }
}

/// Sends a command to the core and waits for its committed reply.
pub(crate) async fn ask<T>(
    app: &AppState,
    make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Api,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    app.events
        .send(Event::Api(make(tx)))
        .await
        .map_err(|_| ApiError::Internal("coordinator is shutting down".into()))?;
    rx.await
        .map_err(|_| ApiError::Internal("coordinator is shutting down".into()))?
}

fn parse_task(id: &str) -> Result<TaskId, ApiError> {
    TaskId::parse(id).map_err(|e| ApiError::Invalid(format!("task id {id:?}: {e}")))
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum SubmitBody {
    Many { tasks: Vec<TaskSpec> },
    One(TaskSpec),
}

#[utoipa::path(
    post,
    path = "/api/v1/tasks",
    tag = "tasks",
    request_body(content = serde_json::Value, description = "One task spec, or `{\"tasks\": [specs]}`: kind, config, requires, tags, priority, timeout_ms, max_attempts, task_id (optional)"),
    responses(
        (status = 201, description = "Accepted", body = Submitted),
        (status = 400, description = "Not JSON, or not a spec", body = ErrorBody),
        (status = 409, description = "A task id already exists", body = ErrorBody),
        (status = 422, description = "An invalid spec, or too many in one request", body = ErrorBody),
    )
)]
pub async fn submit(
    State(app): State<Arc<AppState>>,
    body: Result<Json<SubmitBody>, JsonRejection>,
) -> Response {
    let specs = match body {
        Ok(Json(SubmitBody::Many { tasks })) => tasks,
        Ok(Json(SubmitBody::One(t))) => vec![t],
        Err(e) => return error_response(e.status(), "bad_request", &e.body_text()),
    };
    match ask(&app, |reply| Api::Submit { specs, reply }).await {
        Ok(task_ids) => (StatusCode::CREATED, Json(Submitted { task_ids })).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Most tasks one listing returns; more are read page by page (`after_seq`).
const LIST_MAX: usize = 100_000;

#[derive(Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
    updated_since: Option<String>,
    after_seq: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/tasks",
    tag = "tasks",
    params(
        ("status" = Option<String>, Query, description = "queued, running, paused, completed, failed, cancelled or timed_out"),
        ("limit" = Option<usize>, Query, description = "at most this many (default 1000, at most 100000)"),
        ("order" = Option<String>, Query, description = "`oldest` (default): the oldest first; `newest`: the newest first"),
        ("updated_since" = Option<String>, Query, description = "only tasks changed at or after this RFC 3339 time (`updated_at`), e.g. 2026-12-01T12:00:00Z"),
        ("after_seq" = Option<u64>, Query, description = "the next page: only tasks after the one with this `submit_seq` in the order asked; pass a page's last `submit_seq`. A page shorter than `limit` is the last"),
    ),
    responses(
        (status = 200, description = "Tasks in submission order (or the reverse)", body = Vec<crate::model::Task>),
        (status = 422, description = "Unknown status or order, or a time that is not RFC 3339", body = ErrorBody),
    )
)]
pub async fn list_tasks(
    State(app): State<Arc<AppState>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error_response(e.status(), "bad_request", &e.body_text()),
    };
    let status = match q.status.as_deref().map(|s| (s, TaskStatus::parse(s))) {
        None => None,
        Some((_, Some(s))) => Some(s),
        Some((s, None)) => {
            return ApiError::Invalid(format!(
                "unknown status {s:?}; use one of queued, running, paused, completed, failed, cancelled, timed_out"
            ))
            .into_response();
        }
    };
    let newest_first = match q.order.as_deref() {
        None | Some("oldest") => false,
        Some("newest") => true,
        Some(o) => {
            return ApiError::Invalid(format!("unknown order {o:?}; use oldest or newest"))
                .into_response();
        }
    };
    let updated_since = match q.updated_since.as_deref().map(parse_time).transpose() {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let query = TaskQuery {
        status,
        limit: q.limit.unwrap_or(1000).min(LIST_MAX),
        newest_first,
        updated_since,
        after_seq: q.after_seq,
    };
    json(ask(&app, |reply| Api::ListTasks { query, reply }).await)
}

/// An RFC 3339 time of a query.
fn parse_time(s: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::Invalid(format!(
                "{s:?} is not an RFC 3339 time ({e}); e.g. 2026-12-01T12:00:00Z (a `+` offset must be sent as %2B)"
            ))
        })
}

#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, description = "The task with its spec, status, lease, attempts and latest checkpoint", body = crate::model::Task),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 422, description = "Not a task id", body = ErrorBody),
    )
)]
pub async fn get_task(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match parse_task(&id) {
        Ok(task) => json(ask(&app, |reply| Api::GetTask { task, reply }).await),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/result",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, description = "Recorded results: the counted one first, stale ones after", body = serde_json::Value),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
pub async fn task_result(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match parse_task(&id) {
        Ok(task) => json(ask(&app, |reply| Api::Results { task, reply }).await),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/state",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, description = "The latest state the worker reported (attempt, state, updated_at), or null", body = serde_json::Value),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
pub async fn task_state(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match parse_task(&id) {
        Ok(task) => json(ask(&app, |reply| Api::State { task, reply }).await),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/checkpoints",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, description = "Complete checkpoints: checkpoint_id, attempt, size, created_at", body = serde_json::Value),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
pub async fn task_checkpoints(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response {
    match parse_task(&id) {
        Ok(task) => json(ask(&app, |reply| Api::Checkpoints { task, reply }).await),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/checkpoints/{cid}",
    tag = "tasks",
    params(("id" = String, Path, description = "task id"), ("cid" = String, Path, description = "checkpoint id")),
    responses(
        (status = 200, description = "The checkpoint's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "No such task or checkpoint", body = ErrorBody),
    )
)]
pub async fn checkpoint_data(
    State(app): State<Arc<AppState>>,
    Path((id, cid)): Path<(String, String)>,
) -> Response {
    let task = match parse_task(&id) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let checkpoint = match CheckpointId::parse(&cid) {
        Ok(c) => c,
        Err(e) => return ApiError::Invalid(format!("checkpoint id: {e}")).into_response(),
    };
    match ask(&app, |reply| Api::CheckpointData {
        task,
        checkpoint,
        reply,
    })
    .await
    {
        Ok(bytes) => (
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            bytes,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/tasks/{id}/{action}",
    tag = "tasks",
    params(("id" = String, Path, description = "task id"), ("action" = String, Path, description = "cancel, pause, resume or checkpoint")),
    responses(
        (status = 200, description = "The task after the command", body = crate::model::Task),
        (status = 404, description = "No such task or action", body = ErrorBody),
        (status = 409, description = "Not possible in the task's state", body = ErrorBody),
    )
)]
pub async fn control(
    State(app): State<Arc<AppState>>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let op = match action.as_str() {
        "cancel" => ControlOp::Cancel,
        "pause" => ControlOp::Pause,
        "resume" => ControlOp::Resume,
        "checkpoint" => ControlOp::Checkpoint,
        other => {
            return error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no action {other:?}; use cancel, pause, resume or checkpoint"),
            );
        }
    };
    match parse_task(&id) {
        Ok(task) => json(ask(&app, |reply| Api::Control { task, op, reply }).await),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/workers",
    tag = "workers",
    responses((status = 200, description = "Known workers: state, capabilities, tags, slots, leases, last_seen, connection statistics", body = Vec<crate::model::Worker>))
)]
pub async fn list_workers(State(app): State<Arc<AppState>>) -> Response {
    json(ask(&app, |reply| Api::ListWorkers { reply }).await)
}

#[utoipa::path(
    get,
    path = "/api/v1/workers/{id}",
    tag = "workers",
    params(("id" = String, Path, description = "worker id")),
    responses(
        (status = 200, description = "One worker", body = crate::model::Worker),
        (status = 404, description = "No such worker", body = ErrorBody),
    )
)]
pub async fn get_worker(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match WorkerId::parse(&id) {
        Ok(worker) => json(ask(&app, |reply| Api::GetWorker { worker, reply }).await),
        Err(e) => ApiError::Invalid(format!("worker id: {e}")).into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/overview",
    tag = "observe",
    responses((status = 200, description = "Tasks by state, queue depth, workers by state, counters", body = crate::core::Overview))
)]
pub async fn overview(State(app): State<Arc<AppState>>) -> Response {
    json(ask(&app, |reply| Api::Overview { reply }).await)
}

/// The dashboard's chart samples of the last hour, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/history",
    tag = "observe",
    responses((status = 200, description = "The last hour of samples (tasks, workers, reconnections, results, RTT), oldest first", body = Vec<crate::dashboard::Sample>))
)]
pub async fn history(State(app): State<Arc<AppState>>) -> Response {
    Json(app.history.all()).into_response()
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "observe",
    responses((status = 200, description = "`{\"status\": \"ok\"}` while serving", body = serde_json::Value))
)]
pub async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

pub async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such route")
}

fn json<T: serde::Serialize>(r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
