//! The HTTP API, JSON in and out, on the same listener as the worker endpoint.
//!
//! ```text
//! POST /api/v1/tasks                      submit one spec or {"tasks": [specs]} (a task_id
//!                                         there already: the same spec is answered, not
//!                                         made again; another is refused, 409)
//! GET  /api/v1/tasks?status=&limit=&order=&updated_since=&after_seq=&ids=
//!                                         list (order: oldest, the default, or newest;
//!                                         updated_since: changed at or after an RFC 3339 time;
//!                                         ids: only these, comma-separated, at most 128)
//! GET  /api/v1/tasks/{id}                 one task with its attempts
//! GET  /api/v1/tasks/{id}/result          recorded results (counted first, stale after)
//! GET  /api/v1/tasks/{id}/state           latest state
//! GET  /api/v1/tasks/{id}/checkpoints     checkpoint list; /{cid} the bytes
//! POST /api/v1/tasks/{id}/cancel|pause|resume|checkpoint
//! GET  /api/v1/workers, /api/v1/workers/{id}
//! GET  /api/v1/runs?name=&limit=           runs (tasks of one name) by their latest tries
//! GET  /api/v1/overview                   counts and counters
//! GET  /api/v1/history                    the dashboard's chart samples
//! GET  /healthz
//! ```
//!
//! Elsewhere: `/api/v1/events` and `/` (the dashboard), `/metrics`, `/api/v1/openapi.json`.
//! Every route is listed once, in `server.rs`.
//!
//! Answers that may run to many megabytes (task listings, a task, its state or results,
//! checkpoint bytes, the workers) take turns (`heavy`), so that requests at once cannot hold
//! memory without bound; listings are made piece by piece as the connection takes them
//! (`heavy_array`), never whole. A control's answer (the task) takes a turn of its own kind
//! ([`CONTROLS_AT_ONCE`]), so that readers of large answers never keep an operator from
//! cancelling or pausing a task.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tether_proto::task::MAX_NAME_BYTES;
use tether_proto::{CheckpointId, TaskId, TaskSpec, TaskStatus, WorkerId};
use tokio::sync::oneshot;

use crate::auth::EnvShown;
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

/// The reply to a submission: `201` when it made a task, `200` when every task it names was
/// there already with the same spec (a submission sent again, as after a lost reply).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Submitted {
    /// Each task's id, in the order of the specs.
    #[schema(value_type = Vec<String>)]
    pub task_ids: Vec<TaskId>,
    /// Those of `task_ids` that were there already with the same spec: nothing was made of
    /// them (whatever their status: an ended one is not run again). Empty when all are new.
    #[schema(value_type = Vec<String>)]
    pub existing: Vec<TaskId>,
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

/// `400 bad_request` for a query given to `what`, which takes none, naming its parameters
/// (then `hint`); `None` without a query.
fn refuse_query(query: Option<&str>, what: &str, hint: &str) -> Option<Response> {
    let query = query.filter(|q| !q.is_empty())?;
    let names: Vec<&str> = query
        .split('&')
        .filter_map(|p| p.split('=').next())
        .filter(|n| !n.is_empty())
        .collect();
    Some(error_response(
        StatusCode::BAD_REQUEST,
        "bad_request",
        &format!(
            "{what} takes no query parameters (got `{}`){hint}",
            names.join("`, `")
        ),
    ))
}

/// Layered on the API's endpoints that take no query: one given is refused (`400
/// bad_request`, naming it) rather than ignored, where a client would take the answer for
/// what it asked (`/api/v1/tasks/{id}/result?attempt=1` answered with the latest attempt's).
pub async fn no_query(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let uri = request.uri();
    let what = format!("`{}`", uri.path());
    if let Some(refused) = refuse_query(uri.query(), &what, "") {
        return refused;
    }
    next.run(request).await
}

/// `503` with `code` and `message`, and `Retry-After: retry_after` (seconds).
fn unavailable(code: &str, message: &str, retry_after: &'static str) -> Response {
    let mut r = error_response(StatusCode::SERVICE_UNAVAILABLE, code, message);
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static(retry_after),
    );
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::TooMany(_) => (StatusCode::UNPROCESSABLE_ENTITY, "too_many"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            // Nothing was done: a client may send it again (the CLI retries a 503).
            ApiError::ShuttingDown => {
                return unavailable("shutting_down", &self.to_string(), "5");
            }
            ApiError::OutOfSpace => {
                return unavailable("out_of_space", &self.to_string(), "5");
            }
        };
        error_response(status, code, &self.to_string())
    }
}

/// How many answers that may run to many megabytes (a listing of up to `LIST_MAX` tasks, a
/// task's results, a checkpoint of up to `max_checkpoint_bytes`, the workers, an event
/// stream's snapshot) are made at once. Each holds its turn until its body is handed to the
/// connection: unbounded, a few hundred such requests (of up to `max_connections`) held
/// gigabytes. A reader cannot put that off for long by reading slowly: its connection is
/// closed, and the turn freed, once it has read slower than the minimum answer rate
/// ([`Limits::min_answer_rate`](crate::config::Limits::min_answer_rate), 64 KiB/s by default)
/// for about `http_idle` (`admission::Guarded`). Controls' answers take turns of their own
/// ([`CONTROLS_AT_ONCE`]).
pub const HEAVY_AT_ONCE: usize = 8;
/// How long such an answer waits for a turn before `503 busy`, at most: half the handshake
/// deadline (`--handshake-timeout`, 10 s by default), within which a new connection's first
/// answer must begin, or the connection is cut as a slow-loris one.
pub const HEAVY_WAIT: Duration = Duration::from_secs(30);

/// How long an answer waits for its turn here: [`HEAVY_WAIT`] or half the handshake deadline.
fn heavy_wait(app: &AppState) -> Duration {
    HEAVY_WAIT.min(app.cfg.limits.handshake_timeout / 2)
}
/// The pieces a heavy body is handed to the connection in: it takes the next only when it has
/// room, so a turn lasts until the last piece is taken, or until the connection is closed for
/// reading slower than its minimum rate.
const HEAVY_PIECE: usize = 64 * 1024;

/// How many controls' answers (cancel, pause, resume, checkpoint: each the task, with its
/// config of up to a frame) are made at once. They have turns of their own, not those of
/// [`HEAVY_AT_ONCE`]: readers that each take a listing at the minimum answer rate can hold
/// every one of those for as long as they like, and an operator could then not cancel or pause
/// a task (`503 busy`). Answers too large to hand over at once are rare (a socket's buffer takes
/// a task of a small config whole), so two turns keep the memory bound without making one
/// control wait for another in practice.
pub const CONTROLS_AT_ONCE: usize = 2;

/// How many submissions are read and parsed at once. Each may hold a body of up to
/// `max_body` (16 MiB by default) and the specs parsed from it until the core took them:
/// unbounded, a few hundred clients posting at once (of up to `max_connections`) held
/// gigabytes. Parsing runs on the request's thread and the core takes one batch at a time, so
/// more at once would not go faster on a few cores; the stress scenarios submit one at a time.
pub const SUBMITS_AT_ONCE: usize = 4;

/// A turn of `turns`, waited for up to [`heavy_wait`]: `Err(None)` when the wait ran out,
/// `Err(Some(_))` when the coordinator is stopping.
async fn turn_of(
    app: &AppState,
    turns: &Arc<tokio::sync::Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, Option<ApiError>> {
    match tokio::time::timeout(heavy_wait(app), turns.clone().acquire_owned()).await {
        Ok(Ok(turn)) => Ok(turn),
        Ok(Err(_)) => Err(Some(ApiError::ShuttingDown)),
        Err(_) => Err(None),
    }
}

/// A turn of [`HEAVY_AT_ONCE`], as [`turn_of`].
pub(crate) async fn heavy_turn(
    app: &AppState,
) -> Result<tokio::sync::OwnedSemaphorePermit, Option<ApiError>> {
    turn_of(app, &app.heavy).await
}

/// A turn of `turns` (`at_once` of them, for `what`), or the answer to give instead: `503
/// busy` (with Retry-After) when none came within [`heavy_wait`], or that the coordinator is
/// stopping.
async fn turn_or_busy(
    app: &AppState,
    turns: &Arc<tokio::sync::Semaphore>,
    at_once: usize,
    what: &str,
) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    match turn_of(app, turns).await {
        Ok(turn) => Ok(turn),
        Err(Some(stopping)) => Err(stopping.into_response()),
        Err(None) => Err(unavailable(
            "busy",
            &format!(
                "{at_once} {what} at once, and this one waited {} s for its turn; try again",
                heavy_wait(app).as_secs_f64()
            ),
            "1",
        )),
    }
}

/// A turn of [`HEAVY_AT_ONCE`], as [`turn_or_busy`].
async fn heavy_or_busy(app: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    turn_or_busy(
        app,
        &app.heavy,
        HEAVY_AT_ONCE,
        "large answers are being made or sent",
    )
    .await
}

/// Makes `answer` in a turn of [`HEAVY_AT_ONCE`], kept until its body is handed over.
async fn heavy(app: &AppState, answer: impl Future<Output = Response>) -> Response {
    match heavy_or_busy(app).await {
        Ok(turn) => in_turn(turn, answer).await,
        Err(instead) => instead,
    }
}

/// Makes `answer` in `turn`, kept until its body is handed over.
async fn in_turn(
    turn: tokio::sync::OwnedSemaphorePermit,
    answer: impl Future<Output = Response>,
) -> Response {
    let (mut parts, body) = answer.await.into_parts();
    // Already whole in memory (JSON or a checkpoint's bytes): this only takes it back.
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return ApiError::Internal(format!("making the answer: {e}")).into_response(),
    };
    parts
        .headers
        .insert(axum::http::header::CONTENT_LENGTH, bytes.len().into());
    let pieces = futures_util::stream::unfold((bytes, turn), |(mut rest, turn)| async move {
        // The turn ends with the stream: after the last piece, or when the client goes.
        if rest.is_empty() {
            return None;
        }
        let piece: Bytes = rest.split_to(rest.len().min(HEAVY_PIECE));
        Some((Ok::<_, std::convert::Infallible>(piece), (rest, turn)))
    });
    Response::from_parts(parts, Body::from_stream(pieces))
}

/// Answers a JSON array of `items` in a turn of [`HEAVY_AT_ONCE`], made piece by piece as the
/// connection takes them: a listing of 100,000 tasks, each with a config of up to a frame, is
/// never whole in memory (a turn holds the items, whose specs are shared, and one piece).
async fn heavy_array<T: Serialize + Send + 'static>(
    app: &AppState,
    items: impl Future<Output = Result<Vec<T>, ApiError>>,
) -> Response {
    let turn = match heavy_or_busy(app).await {
        Ok(turn) => turn,
        Err(instead) => return instead,
    };
    let items = match items.await {
        Ok(items) => items.into_iter(),
        Err(e) => return e.into_response(),
    };
    // `None` once the closing bracket has gone; the turn ends with the stream.
    let pieces = futures_util::stream::unfold(Some((items, true, turn)), |state| async move {
        let (mut rest, first, turn) = state?;
        let mut piece = Vec::with_capacity(HEAVY_PIECE);
        piece.push(if first { b'[' } else { b',' });
        let mut sep = false;
        loop {
            let Some(item) = rest.next() else {
                piece.push(b']');
                return Some((Ok(Bytes::from(piece)), None));
            };
            if std::mem::replace(&mut sep, true) {
                piece.push(b',');
            }
            if let Err(e) = serde_json::to_writer(&mut piece, &item) {
                // Cut the body short: a client sees a broken answer, never a wrong one.
                return Some((Err(std::io::Error::other(e)), None));
            }
            if piece.len() >= HEAVY_PIECE && !rest.as_slice().is_empty() {
                return Some((Ok(Bytes::from(piece)), Some((rest, false, turn))));
            }
        }
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        Body::from_stream(pieces),
    )
        .into_response()
}

/// Sends a command to the core and waits for its committed reply.
pub(crate) async fn ask<T>(
    app: &AppState,
    make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Api,
) -> Result<T, ApiError> {
    // Every answer comes after the commits queued before it: while those wait for space, the
    // asker is told so at once instead of waiting with them.
    let out_of_space = || {
        app.store_stats
            .out_of_space
            .load(std::sync::atomic::Ordering::Acquire)
    };
    if out_of_space() {
        return Err(ApiError::OutOfSpace);
    }
    let (tx, mut rx) = oneshot::channel();
    let api = make(tx);
    let read = api.is_read();
    app.events
        .send(Event::Api(api))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    if !read {
        // Asked, it will be done: its asker waits for the answer.
        return rx.await.map_err(|_| ApiError::ShuttingDown)?;
    }
    // A read is given up once the commits ahead of it wait for space: it changes nothing.
    loop {
        match tokio::time::timeout(SPACE_LOOK, &mut rx).await {
            Ok(answer) => return answer.map_err(|_| ApiError::ShuttingDown)?,
            Err(_) if out_of_space() => return Err(ApiError::OutOfSpace),
            Err(_) => {}
        }
    }
}

/// How often a read waiting for its answer looks whether the store waits for space.
const SPACE_LOOK: Duration = Duration::from_millis(250);

fn parse_task(id: &str) -> Result<TaskId, ApiError> {
    TaskId::parse(id).map_err(|e| ApiError::Invalid(format!("task id {id:?}: {e}")))
}

/// [`Path`] whose rejection is the API's JSON error body rather than axum's plain text.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = BadPath;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, BadPath> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(BadPath::from(e)),
        }
    }
}

/// Why the path parameters of a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BadPath {
    #[error("path parameter `{key}` is not valid UTF-8 once percent-decoded")]
    Utf8 { key: String },
    /// Anything else axum refuses, with its own message and status.
    #[error("{}", .0.body_text())]
    Other(PathRejection),
}

impl From<PathRejection> for BadPath {
    fn from(e: PathRejection) -> Self {
        if let PathRejection::FailedToDeserializePathParams(f) = &e
            && let ErrorKind::InvalidUtf8InPathParam { key } = f.kind()
        {
            return BadPath::Utf8 { key: key.clone() };
        }
        BadPath::Other(e)
    }
}

impl IntoResponse for BadPath {
    fn into_response(self) -> Response {
        let status = match &self {
            BadPath::Utf8 { .. } => StatusCode::BAD_REQUEST,
            BadPath::Other(e) => e.status(),
        };
        // A 5xx here is a route whose parameters do not fit its handler: our bug, not the URL.
        let code = if status.is_server_error() {
            "internal"
        } else {
            "bad_path"
        };
        error_response(status, code, &self.to_string())
    }
}

/// Why a submission's body holds no specs.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Not JSON, too large, or not sent as `application/json`: axum's message and status.
    #[error("{}", .0.body_text())]
    Body(#[from] JsonRejection),
    /// JSON, but neither a spec object nor `{"tasks": [specs]}`.
    #[error("the body is {0}; send one task spec object or {{\"tasks\": [specs]}}")]
    Shape(&'static str),
    /// The right shape with a field unknown, missing, of the wrong type or out of range; the
    /// message starts with where, e.g. `tasks[2].kind: invalid type: ...`.
    #[error("{0}")]
    Spec(#[from] serde_path_to_error::Error<serde_json::Error>),
    /// More specs than one request may carry: the read stopped at the first one too many.
    #[error("more than {max} tasks in one request; at most {max} are accepted")]
    TooMany { max: usize },
}

impl IntoResponse for SubmitError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            SubmitError::Body(e) => (e.status(), "bad_request"),
            SubmitError::Shape(_) | SubmitError::Spec(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "bad_request")
            }
            // As the core answers a count over its limit.
            SubmitError::TooMany { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "too_many"),
        };
        error_response(status, code, &self.to_string())
    }
}

/// `413 too_large` for a submission over the body limit, naming the limit: axum's own words
/// ("Failed to buffer the request body: length limit exceeded") said neither what limit nor
/// whose.
fn too_large(max_body: usize) -> Response {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        &format!(
            "the request is larger than this coordinator accepts: at most {max_body} bytes (its \
             --max-body); send the tasks in several requests"
        ),
    )
}

/// Whether an object body has a `tasks` key (any value), read without keeping anything.
#[derive(Deserialize)]
struct Probe {
    #[serde(default, deserialize_with = "present")]
    tasks: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

/// `{"tasks": [specs]}`, read straight into at most `max` specs: other keys beside `tasks` are
/// ignored, as they always were, and the read stops at the element past `max`, unread as a
/// spec (`over` says so).
/// Parsed into a JSON tree first, a 16 MiB body of 1.3 million tiny specs cost the coordinator
/// 1.1 GB before the count was looked at.
struct BatchSeed<'a> {
    max: usize,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for BatchSeed<'_> {
    type Value = Vec<TaskSpec>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BatchSeed<'_> {
    type Value = Vec<TaskSpec>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object with a `tasks` array")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut tasks = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "tasks" {
                let specs = map.next_value_seed(SpecsSeed {
                    max: self.max,
                    over: self.over,
                })?;
                tasks = Some(specs);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        tasks.ok_or_else(|| serde::de::Error::missing_field("tasks"))
    }
}

/// The `tasks` array of [`BatchSeed`].
struct SpecsSeed<'a> {
    max: usize,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for SpecsSeed<'_> {
    type Value = Vec<TaskSpec>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for SpecsSeed<'_> {
    type Value = Vec<TaskSpec>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut specs = Vec::new();
        while specs.len() < self.max {
            match seq.next_element::<TaskSpec>()? {
                Some(spec) => specs.push(spec),
                None => return Ok(specs),
            }
        }
        // At the limit, an element more is one too many: it is counted, not read as a spec,
        // so a fault in it is not what the client is told.
        if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            self.over.set(true);
            return Err(serde::de::Error::custom("too many tasks"));
        }
        Ok(specs)
    }
}

/// The specs of a submission body: `{"tasks": [specs]}` (at most `max`) when the object has a
/// `tasks` key, else one spec. The shape is decided first and then deserialized, so serde's
/// error says which field of which element is wrong (an untagged enum could only say that no
/// variant matched). Nothing is built but the specs.
fn specs_of(body: &serde_json::value::RawValue, max: usize) -> Result<Vec<TaskSpec>, SubmitError> {
    let text = body.get();
    match text.trim_start().bytes().next() {
        Some(b'{') => {}
        Some(b'[') => return Err(SubmitError::Shape("a JSON array")),
        Some(b'"') => return Err(SubmitError::Shape("a string")),
        Some(b't' | b'f') => return Err(SubmitError::Shape("a boolean")),
        Some(b'n') => return Err(SubmitError::Shape("null")),
        _ => return Err(SubmitError::Shape("a number")),
    }
    let probe: Probe =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))?;
    let mut de = serde_json::Deserializer::from_str(text);
    if !probe.tasks {
        return Ok(vec![serde_path_to_error::deserialize(&mut de)?]);
    }
    let over = std::cell::Cell::new(false);
    let mut track = serde_path_to_error::Track::new();
    let read = serde::de::DeserializeSeed::deserialize(
        BatchSeed { max, over: &over },
        serde_path_to_error::Deserializer::new(&mut de, &mut track),
    );
    match read {
        Ok(specs) => Ok(specs),
        Err(_) if over.get() => Err(SubmitError::TooMany { max }),
        Err(e) => Err(SubmitError::Spec(serde_path_to_error::Error::new(
            track.path(),
            e,
        ))),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/tasks",
    tag = "tasks",
    request_body(content = serde_json::Value, description = "One task spec, or `{\"tasks\": [specs]}`: kind, config, requires, tags, priority, timeout_ms, max_attempts, retry_on (`failed`, `timed_out`: ends that run the task again while it has attempts left), name, task_id (optional), retry_of (optional: the ended task this one runs again, recorded as its `retried_by`)"),
    responses(
        (status = 201, description = "Accepted: at least one task was made. A spec whose `task_id` names a task there already, with the same spec, makes nothing and is listed in `existing` (the same: `kind`, `name` and `timeout_ms` equal; `priority` and `max_attempts` with their defaults, 5 and 3, filled in; `config` equal as JSON, spacing and key order aside; `requires` as a set; `tags` as a map)", body = Submitted),
        (status = 200, description = "Every task named was there already with the same spec (as for 201): nothing was made, `existing` lists them all. A submission sent again after its reply was lost is answered so", body = Submitted),
        (status = 400, description = "Not JSON, or a query parameter (`bad_request`, naming it): submission takes none", body = ErrorBody),
        (status = 409, description = "A `task_id` names a task there already with a different spec (the message names the first field that differs), or is given twice in the request; or a `retry_of` names a task not ended, or one retried already (by another task, or twice in the request): nothing was made", body = ErrorBody),
        (status = 413, description = "Larger than the body limit (`too_large`, naming it)", body = ErrorBody),
        (status = 415, description = "Not sent as `application/json`", body = ErrorBody),
        (status = 503, description = "`out_of_space`: the data directory is out of space, nothing new is taken until there is room (Retry-After: 5); `busy`: every turn for submissions (4 at once) was held for half the handshake deadline (Retry-After: 1); neither took anything. `shutting_down`: the coordinator is stopping (Retry-After: 5)", body = ErrorBody),
        (status = 422, description = "Not a spec (`bad_request`; the message starts with the field at fault, e.g. `tasks[2].kind: invalid type: ...`), an invalid spec (a config its built-in executor would refuse among them; a `retry_of` naming a task the coordinator does not have), or too many in one request (`invalid`)", body = ErrorBody),
    )
)]
pub async fn submit(State(app): State<Arc<AppState>>, request: axum::extract::Request) -> Response {
    // The turn is taken before the body is read: one waiting holds its connection, not memory.
    let _turn = match turn_or_busy(
        &app,
        &app.submits,
        SUBMITS_AT_ONCE,
        "submissions are being read",
    )
    .await
    {
        Ok(turn) => turn,
        Err(instead) => return instead,
    };
    let body =
        <Json<Box<serde_json::value::RawValue>> as axum::extract::FromRequest<()>>::from_request(
            request,
            &(),
        )
        .await;
    let specs = match body
        .map_err(SubmitError::from)
        .and_then(|Json(raw)| specs_of(&raw, app.cfg.max_submit_batch))
    {
        Ok(specs) => specs,
        Err(SubmitError::Body(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return too_large(app.cfg.max_body);
        }
        Err(e) => return e.into_response(),
    };
    // Nothing new is taken while commits wait for space: the answer comes at once, rather
    // than after the core, which waits on the writer.
    if app
        .store_stats
        .out_of_space
        .load(std::sync::atomic::Ordering::Acquire)
    {
        return unavailable(
            "out_of_space",
            "the coordinator's data directory is out of space: nothing new is taken until there is room again (see the coordinator's log); try again later",
            "5",
        );
    }
    // Here, on the request's thread, not in the core: a kind's check parses the config.
    if let Some(check) = &app.cfg.config_check {
        for (i, spec) in specs.iter().enumerate() {
            if let Some(Err(why)) = (check.0)(&spec.kind, spec.config.get()) {
                let kind = &spec.kind;
                return ApiError::Invalid(format!(
                    "task {i}: the `{kind}` executor refuses its config: {why}"
                ))
                .into_response();
            }
        }
    }
    match ask(&app, |reply| Api::Submit { specs, reply }).await {
        Ok(done) => {
            let status = match done.made_any() {
                true => StatusCode::CREATED,
                false => StatusCode::OK,
            };
            let tasks = AuditTasks::of(&done.task_ids, &done.existing);
            let body = Submitted {
                task_ids: done.task_ids,
                existing: done.existing,
            };
            let mut answer = (status, Json(body)).into_response();
            answer.extensions_mut().insert(tasks);
            answer
        }
        Err(e) => e.into_response(),
    }
}

/// The tasks a submission made or found, as its audit line names them (`auth`): which tasks a
/// token made is an audit's first question, and the request line alone does not say. At most
/// [`AUDIT_TASKS_NAMED`] are named, then how many more.
#[derive(Debug, Clone)]
pub(crate) struct AuditTasks(pub String);

/// Most task ids an audit line names.
const AUDIT_TASKS_NAMED: usize = 8;

impl AuditTasks {
    fn of(ids: &[TaskId], existing: &[TaskId]) -> Self {
        let mut named: Vec<&str> = ids
            .iter()
            .take(AUDIT_TASKS_NAMED)
            .map(TaskId::as_str)
            .collect();
        let more = ids.len().saturating_sub(AUDIT_TASKS_NAMED);
        let more = (more > 0).then(|| format!("and {more} more"));
        named.extend(more.as_deref());
        let mut said = named.join(", ");
        if !existing.is_empty() {
            said.push_str(&format!(" ({} of them existing)", existing.len()));
        }
        AuditTasks(said)
    }
}

/// Most tasks one listing returns; more are read page by page (`after_seq`).
const LIST_MAX: usize = 100_000;

/// Most task ids one listing may name (`ids=a,b,c`); more are refused (`400 bad_request`).
/// The API reads a request target of up to [`MAX_TARGET_BYTES`] (56 KiB): at 128 bytes an id,
/// each byte percent-encoded (`%2B`), 128 ids are 48 KiB of it; ids of 36 bytes (a UUID),
/// under 5 KiB, within a proxy's common 8 KiB.
pub const LIST_IDS_MAX: usize = 128;

/// Longest request target (path and query) the API reads, in bytes; a longer one is refused
/// `414 uri_too_long`, saying so ([`target_limit`]). Below hyper's own bound (65,534 bytes, a
/// constant of its HTTP/1 parser, not a setting), which answers a bare `414` with an empty
/// body before any of the coordinator's code sees the request: the limit clients meet is this
/// one, in the API's words. Room for the longest listing by ids, with its other parameters.
pub const MAX_TARGET_BYTES: usize = 56 * 1024;

/// hyper's bound on a request target (`MAX_URI_LEN` of its HTTP/1 parser). A longer one is
/// answered by `admission` before hyper parses it, in the words of [`target_limit`].
pub(crate) const HYPER_MAX_TARGET: usize = u16::MAX as usize - 1;
const _: () = assert!(MAX_TARGET_BYTES < HYPER_MAX_TARGET);
// [`LIST_IDS_MAX`] ids of the longest, every byte percent-encoded, a comma after each, and
// 1 KiB for the path and the other parameters.
const _: () =
    assert!(LIST_IDS_MAX * (3 * tether_proto::ids::MAX_ID_LEN + 1) + 1024 <= MAX_TARGET_BYTES);

/// Middleware: a request whose target (path and query) is over [`MAX_TARGET_BYTES`] is
/// refused `414 uri_too_long` with the error body of every refusal, naming the limit, before
/// any other check (hyper's own refusal of a longer one comes first and has no body; a
/// request is not more welcome for having a token).
pub async fn target_limit(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let len = req.uri().path_and_query().map_or(0, |t| t.as_str().len());
    if len > MAX_TARGET_BYTES {
        return error_response(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            &target_too_long(&len.to_string()),
        );
    }
    next.run(req).await
}

/// The message of a `414 uri_too_long`, for a target of `len` bytes (a number, or "over N").
pub(crate) fn target_too_long(len: &str) -> String {
    format!(
        "the request target (path and query) is {len} bytes; this coordinator reads at most \
         {MAX_TARGET_BYTES}: ask for less a request (a listing names at most {LIST_IDS_MAX} ids)"
    )
}

/// The query of a task listing. A parameter it does not know is refused (`400 bad_request`,
/// as one whose value cannot be read): ignored, a typo (`state=failed`) listed every status,
/// and a paging scheme it does not have (`offset`, `page`) gave the first page for ever.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
    updated_since: Option<String>,
    after_seq: Option<u64>,
    ids: Option<String>,
    name: Option<String>,
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
        ("ids" = Option<String>, Query, description = "only the tasks with these ids, comma-separated (at most 128; a `+` in an id sent as %2B), each looked up rather than the table scanned; an id no task has is simply absent. Combines with the others: e.g. `ids=a,b&status=running` lists those of a and b running"),
        ("name" = Option<String>, Query, description = "only the tasks submitted under this name (their spec's `name`, exactly; at most 1024 bytes): a run's tasks, e.g. `name=nightly-42&status=failed`. Found through an index of the names, not a pass over the table"),
    ),
    responses(
        (status = 200, description = "Tasks in submission order (or the reverse); to a token of the read scope, each value of a config's `env` is `(redacted)`", body = Vec<crate::model::Task>),
        (status = 400, description = "A query that cannot be read (`bad_request`): a parameter other than status, limit, order, updated_since, after_seq, ids and name (named, with those), one given twice, a `limit` or `after_seq` that is not a whole number, or more than 128 `ids`", body = ErrorBody),
        (status = 422, description = "Unknown status or order, a time that is not RFC 3339, a `limit` above 100000, one of `ids` that is not a task id, or a `name` longer than 1024 bytes", body = ErrorBody),
        (status = 503, description = "`busy`: every turn for large answers was held for half the handshake deadline (Retry-After: 1); `shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn list_tasks(
    State(app): State<Arc<AppState>>,
    shown: EnvShown,
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
    // A limit the listing cannot honour is refused, not cut: a client paging by it would take
    // the cut page for the last one.
    let limit = match limit_within(q.limit, 1000, LIST_MAX) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    // Refused, not cut: a client would take the tasks of the ids cut for missing ones.
    let named = q.ids.as_deref().map_or(0, |ids| ids.split(',').count());
    if named > LIST_IDS_MAX {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!(
                "{named} ids in one listing; at most {LIST_IDS_MAX} (list more with more requests)"
            ),
        );
    }
    let ids = match q.ids.as_deref().map(parse_ids).transpose() {
        Ok(ids) => ids,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = name_within(q.name.as_deref()) {
        return e.into_response();
    }
    let query = TaskQuery {
        status,
        limit,
        newest_first,
        updated_since,
        after_seq: q.after_seq,
        ids,
        name: q.name,
    };
    let tasks = ask(&app, |reply| Api::ListTasks { query, reply });
    heavy_array(&app, async move { Ok(shown.tasks(tasks.await?)) }).await
}

/// A listing's `limit`: `default` when not given; above `max` refused (422), not cut, for a
/// client paging by it would take the cut page for the last one.
fn limit_within(asked: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match asked.unwrap_or(default) {
        l if l <= max => Ok(l),
        l => Err(ApiError::Invalid(format!(
            "limit {l} is out of range; use 0 to {max}"
        ))),
    }
}

/// A listing's `name`: no task has one over [`MAX_NAME_BYTES`], so asking for one is a
/// mistake (422), not an empty run.
fn name_within(name: Option<&str>) -> Result<(), ApiError> {
    match name.filter(|n| n.len() > MAX_NAME_BYTES) {
        Some(name) => Err(ApiError::Invalid(format!(
            "name of {} bytes; no task has a name over {MAX_NAME_BYTES}",
            name.len()
        ))),
        None => Ok(()),
    }
}

/// The `ids` of a listing: comma-separated task ids (at most [`LIST_IDS_MAX`], checked first).
fn parse_ids(s: &str) -> Result<BTreeSet<TaskId>, ApiError> {
    s.split(',')
        .map(|id| {
            TaskId::parse(id)
                .map_err(|e| ApiError::Invalid(format!("ids: {id:?} is not a task id ({e})")))
        })
        .collect()
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
        (status = 200, description = "The task with its spec, status, lease, attempts and latest checkpoint; to a token of the read scope, each value of its config's `env` is `(redacted)`", body = crate::model::Task),
        (status = 400, description = "A path parameter that is not valid percent-encoded UTF-8, or a query parameter (`bad_request`, naming it): the endpoint takes none", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 422, description = "Not a task id (`invalid`)", body = ErrorBody),
        (status = 503, description = "`busy`: every turn for large answers was held for half the handshake deadline (Retry-After: 1); `shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn get_task(
    State(app): State<Arc<AppState>>,
    shown: EnvShown,
    ApiPath(id): ApiPath<String>,
) -> Response {
    match parse_task(&id) {
        Ok(task) => {
            heavy(&app, async {
                let task = ask(&app, |reply| Api::GetTask { task, reply }).await;
                json(task.map(|t| shown.task(t)))
            })
            .await
        }
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
        TaskReadErrors,
    )
)]
pub async fn task_result(
    State(app): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> Response {
    heavy_of_task(&app, &id, |task, reply| Api::Results { task, reply }).await
}

#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/state",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, description = "The latest state the worker reported (attempt, state, updated_at), or null", body = serde_json::Value),
        TaskReadErrors,
    )
)]
pub async fn task_state(
    State(app): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> Response {
    heavy_of_task(&app, &id, |task, reply| Api::State { task, reply }).await
}

/// The core's answer to `question` of the task path parameter `id` names, made in a turn of
/// [`HEAVY_AT_ONCE`] (a task's results or state may run to megabytes).
async fn heavy_of_task<T: Serialize>(
    app: &AppState,
    id: &str,
    question: impl FnOnce(TaskId, oneshot::Sender<Result<T, ApiError>>) -> Api,
) -> Response {
    match parse_task(id) {
        Ok(task) => {
            heavy(app, async {
                json(ask(app, |reply| question(task, reply)).await)
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

/// What a read of one task through [`heavy_of_task`] answers besides its success, for the
/// document: said once for each of them.
pub(crate) struct TaskReadErrors;

impl utoipa::IntoResponses for TaskReadErrors {
    fn responses() -> std::collections::BTreeMap<
        String,
        utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
    > {
        [
            ("400", "A path parameter that is not valid percent-encoded UTF-8, or a query parameter (`bad_request`, naming it): the endpoint takes none"),
            ("404", "No such task"),
            ("422", "Not a task id (`invalid`)"),
            ("500", "The store could not be read (`internal`)"),
            ("503", "`busy`: every turn for large answers was held for half the handshake deadline (Retry-After: 1); `shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)"),
        ]
        .into_iter()
        .map(|(status, what)| (status.to_owned(), crate::openapi::error(what).into()))
        .collect()
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/checkpoints",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, description = "Complete checkpoints: checkpoint_id, attempt, size, created_at", body = serde_json::Value),
        (status = 400, description = "A path parameter that is not valid percent-encoded UTF-8, or a query parameter (`bad_request`, naming it): the endpoint takes none", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 422, description = "Not a task id (`invalid`)", body = ErrorBody),
        (status = 500, description = "The store could not be read (`internal`)", body = ErrorBody),
        (status = 503, description = "`shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn task_checkpoints(
    State(app): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
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
        (status = 200, description = "The bytes of a complete checkpoint of this task", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "A path parameter that is not valid percent-encoded UTF-8, or a query parameter (`bad_request`, naming it): the endpoint takes none", body = ErrorBody),
        (status = 404, description = "No such task, or no complete checkpoint of that id of this task", body = ErrorBody),
        (status = 422, description = "Not a task id, or not a checkpoint id (`invalid`)", body = ErrorBody),
        (status = 500, description = "The store could not be read (`internal`)", body = ErrorBody),
        (status = 503, description = "`busy`: every turn for large answers was held for half the handshake deadline (Retry-After: 1); `shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn checkpoint_data(
    State(app): State<Arc<AppState>>,
    ApiPath((id, cid)): ApiPath<(String, String)>,
) -> Response {
    let task = match parse_task(&id) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let checkpoint = match CheckpointId::parse(&cid) {
        Ok(c) => c,
        Err(e) => return ApiError::Invalid(format!("checkpoint id: {e}")).into_response(),
    };
    heavy(&app, async {
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
    })
    .await
}

#[utoipa::path(
    post,
    path = "/api/v1/tasks/{id}/{action}",
    tag = "tasks",
    params(("id" = String, Path, description = "task id"), ("action" = String, Path, description = "cancel, pause, resume or checkpoint")),
    responses(
        (status = 200, description = "The task after the command", body = crate::model::Task),
        (status = 400, description = "A path parameter that is not valid percent-encoded UTF-8, or a query parameter (`bad_request`, naming it): the endpoint takes none", body = ErrorBody),
        (status = 404, description = "No such task or action", body = ErrorBody),
        (status = 409, description = "Not possible in the task's state", body = ErrorBody),
        (status = 422, description = "Not a task id (`invalid`)", body = ErrorBody),
        (status = 503, description = "`busy`: every turn for controls' answers (2 at once, their own: readers of large answers do not hold them) was held for half the handshake deadline, and nothing was done (Retry-After: 1); `shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn control(
    State(app): State<Arc<AppState>>,
    ApiPath((id, action)): ApiPath<(String, String)>,
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
    let task = match parse_task(&id) {
        Ok(task) => task,
        Err(e) => return e.into_response(),
    };
    // The answer is the task, with its config of up to a frame: a large answer, whose turn
    // (of the controls' own, see `CONTROLS_AT_ONCE`) is taken before the control acts, so
    // that a busy answer did nothing.
    let turn = match turn_or_busy(
        &app,
        &app.controls,
        CONTROLS_AT_ONCE,
        "controls' answers are being made or sent",
    )
    .await
    {
        Ok(turn) => turn,
        Err(instead) => return instead,
    };
    in_turn(turn, async {
        json(ask(&app, |reply| Api::Control { task, op, reply }).await)
    })
    .await
}

#[utoipa::path(
    get,
    path = "/api/v1/workers",
    tag = "workers",
    responses(
        (status = 200, description = "Known workers: state, capabilities, tags, slots, leases, last_seen, connection statistics", body = Vec<crate::model::Worker>),
        (status = 400, description = "A query parameter (`bad_request`): the list takes none, and lists every worker", body = ErrorBody),
        (status = 503, description = "`busy`: every turn for large answers was held for half the handshake deadline (Retry-After: 1); `shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn list_workers(State(app): State<Arc<AppState>>, RawQuery(query): RawQuery) -> Response {
    // Refused rather than ignored, as the task listing refuses a parameter it does not know:
    // `?status=connected` answered with every worker, which a client took for the filtered list.
    if let Some(refused) = refuse_query(
        query.as_deref(),
        "the worker list",
        ": it lists every worker; filter it on the client",
    ) {
        return refused;
    }
    heavy_array(&app, ask(&app, |reply| Api::ListWorkers { reply })).await
}

#[utoipa::path(
    get,
    path = "/api/v1/workers/{id}",
    tag = "workers",
    params(("id" = String, Path, description = "worker id")),
    responses(
        (status = 200, description = "One worker", body = crate::model::Worker),
        (status = 400, description = "A path parameter that is not valid percent-encoded UTF-8, or a query parameter (`bad_request`, naming it): the endpoint takes none", body = ErrorBody),
        (status = 404, description = "No such worker", body = ErrorBody),
        (status = 422, description = "Not a worker id (`invalid`)", body = ErrorBody),
        (status = 503, description = "`shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn get_worker(
    State(app): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> Response {
    match WorkerId::parse(&id) {
        Ok(worker) => json(ask(&app, |reply| Api::GetWorker { worker, reply }).await),
        Err(e) => ApiError::Invalid(format!("worker id: {e}")).into_response(),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/workers/{id}/{action}",
    tag = "workers",
    params(("id" = String, Path, description = "worker id"), ("action" = String, Path, description = "drain or undrain")),
    responses(
        (status = 200, description = "The worker after the command. `drain`: no new task goes to it, what it holds runs on to its end (`draining` in its record; `leases` empty once it is drained); `undrain`: it takes tasks again. Kept across the worker's reconnections and restarts and the coordinator's; the same command again changes nothing", body = crate::model::Worker),
        (status = 400, description = "A path parameter that is not valid percent-encoded UTF-8, or a query parameter (`bad_request`, naming it): the endpoint takes none", body = ErrorBody),
        (status = 404, description = "No such worker or action", body = ErrorBody),
        (status = 422, description = "Not a worker id (`invalid`)", body = ErrorBody),
        (status = 503, description = "`shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn worker_action(
    State(app): State<Arc<AppState>>,
    ApiPath((id, action)): ApiPath<(String, String)>,
) -> Response {
    let drain = match action.as_str() {
        "drain" => true,
        "undrain" => false,
        other => {
            return error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no action {other:?}; use drain or undrain"),
            );
        }
    };
    match WorkerId::parse(&id) {
        Ok(worker) => json(
            ask(&app, |reply| Api::DrainWorker {
                worker,
                drain,
                reply,
            })
            .await,
        ),
        Err(e) => ApiError::Invalid(format!("worker id: {e}")).into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/overview",
    tag = "observe",
    responses(
        (status = 200, description = "Tasks by state, queue depth, workers by state, counters", body = crate::core::Overview),
        (status = 400, description = "A query parameter (`bad_request`, naming it): the endpoint takes none", body = ErrorBody),
        (status = 503, description = "`shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn overview(State(app): State<Arc<AppState>>) -> Response {
    json(ask(&app, |reply| Api::Overview { reply }).await)
}

/// The query of `GET /api/v1/runs`; anything else is refused, as the task listing refuses it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    name: Option<String>,
    limit: Option<usize>,
}

/// How many runs a listing gives at most, and by default.
const RUNS_MAX: usize = 1_000;
const RUNS_DEFAULT: usize = 20;

#[utoipa::path(
    get,
    path = "/api/v1/runs",
    tag = "tasks",
    params(
        ("name" = Option<String>, Query, description = "only the run of this name (its tasks' spec `name`, exactly; at most 1024 bytes): an empty list when no task has it"),
        ("limit" = Option<usize>, Query, description = "at most this many runs, the newest (by its latest submission) first (default 20, at most 1000)"),
    ),
    responses(
        (status = 200, description = "Runs (the tasks submitted under one name), the newest first, each by its tasks' latest tries: a task retried as a new task (`retried_by`, under any name) counts once, by its last retry. `verdict` is `running` while a latest try has not ended, then `passed` when every one completed, else `failed` (as `tether report` judges a run)", body = Vec<crate::core::RunSummary>),
        (status = 400, description = "A query that cannot be read (`bad_request`): a parameter other than name and limit, one given twice, or a `limit` that is not a whole number", body = ErrorBody),
        (status = 422, description = "A `limit` above 1000, or a `name` longer than 1024 bytes", body = ErrorBody),
        (status = 503, description = "`shutting_down`: the coordinator is stopping; `out_of_space`: its data directory is out of space, and answers wait behind commits that wait for room (Retry-After: 5 for both)", body = ErrorBody),
    )
)]
pub async fn list_runs(
    State(app): State<Arc<AppState>>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error_response(e.status(), "bad_request", &e.body_text()),
    };
    let limit = match limit_within(q.limit, RUNS_DEFAULT, RUNS_MAX) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = name_within(q.name.as_deref()) {
        return e.into_response();
    }
    let query = crate::core::RunQuery {
        name: q.name,
        limit,
    };
    json(ask(&app, |reply| Api::Runs { query, reply }).await)
}

/// The dashboard's chart samples of the last hour, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/history",
    tag = "observe",
    responses(
        (status = 200, description = "The last hour of samples (tasks, workers, reconnections, results, RTT), oldest first", body = Vec<crate::dashboard::Sample>),
        (status = 400, description = "A query parameter (`bad_request`, naming it): the endpoint takes none", body = ErrorBody),
    )
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

/// A route asked with a method it does not serve: a JSON error like every other (axum adds
/// the `Allow` header listing the methods it does serve).
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!(
            "{method} is not served at {}; the Allow header says what is",
            uri.path()
        ),
    )
}

fn json<T: serde::Serialize>(r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// A submission's audit line names its tasks, eight at most and then how many more, and
    /// how many of them were there already.
    #[test]
    fn a_submissions_audit_names_its_tasks_within_a_bound() {
        let ids: Vec<TaskId> = (0..11)
            .map(|i| TaskId::parse(&format!("t-{i}")).expect("id"))
            .collect();
        assert_eq!(AuditTasks::of(&ids[..1], &[]).0, "t-0");
        assert_eq!(
            AuditTasks::of(&ids, &ids[..2]).0,
            "t-0, t-1, t-2, t-3, t-4, t-5, t-6, t-7, and 3 more (2 of them existing)"
        );
    }

    /// [`specs_of`] of `body` as a client would send it, at the default limit.
    fn read(body: Value) -> Result<Vec<TaskSpec>, SubmitError> {
        let raw = serde_json::value::to_raw_value(&body).expect("raw");
        specs_of(&raw, crate::config::DEFAULT_MAX_SUBMIT_BATCH)
    }

    fn refusal(body: Value) -> String {
        match read(body) {
            Ok(specs) => panic!("accepted {specs:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn one_spec_or_a_batch_is_read_as_before() {
        let one = read(json!({"kind": "sleep", "priority": 2})).expect("one spec");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].priority, 2);
        let many =
            read(json!({"tasks": [{"kind": "a"}, {"kind": "b"}], "note": 1})).expect("a batch");
        let kinds: Vec<&str> = many.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["a", "b"]);
        let empty = read(json!({"tasks": []})).expect("an empty batch, refused by the core");
        assert!(empty.is_empty());
    }

    #[test]
    fn a_bad_field_of_one_spec_is_named() {
        let m = refusal(json!({"kind": "sleep", "confg": {}}));
        assert!(
            m.starts_with("confg: unknown field `confg`, expected one of"),
            "{m}"
        );
        assert!(m.contains("`config`"), "{m}");
        // Read from the text, not a tree: where in it, too (a body may be megabytes).
        let m = refusal(json!({"kind": 5}));
        assert_eq!(
            m,
            "kind: invalid type: integer `5`, expected a string at line 1 column 9"
        );
        let m = refusal(json!({"kind": "sleep", "priority": 300}));
        assert!(
            m.starts_with("priority: invalid value: integer `300`, expected u8 at line 1"),
            "{m}"
        );
        let m = refusal(json!({"config": {}}));
        assert!(m.starts_with("missing field `kind`"), "{m}");
    }

    #[test]
    fn a_bad_element_of_a_batch_is_named_with_its_index() {
        let body = json!({"tasks": [{"kind": "a"}, {"kind": "b"}, {"kind": "c", "confg": {}}]});
        let m = refusal(body);
        assert!(
            m.starts_with("tasks[2].confg: unknown field `confg`"),
            "{m}"
        );
        let m = refusal(json!({"tasks": [{"kind": "a"}, {"kind": "b", "tags": {"os": 1}}]}));
        assert!(
            m.starts_with("tasks[1].tags.os: invalid type: integer `1`, expected a string"),
            "{m}"
        );
        let m = refusal(json!({"tasks": {"kind": "a"}}));
        assert!(
            m.starts_with("tasks: invalid type: map, expected a sequence"),
            "{m}"
        );
    }

    /// The read stops at the first spec past the limit: a body of a million tiny specs costs
    /// no more than the limit's worth (a JSON tree of it cost the coordinator 1.1 GB).
    #[test]
    fn a_batch_over_the_limit_is_refused_at_the_first_spec_too_many() {
        let raw = |n: usize| {
            let specs = vec![r#"{"kind":"s"}"#; n].join(",");
            serde_json::value::RawValue::from_string(format!(r#"{{"tasks":[{specs}]}}"#))
                .expect("raw")
        };
        assert_eq!(specs_of(&raw(3), 3).expect("at the limit").len(), 3);
        match specs_of(&raw(4), 3) {
            Err(e @ SubmitError::TooMany { max: 3 }) => assert_eq!(
                e.to_string(),
                "more than 3 tasks in one request; at most 3 are accepted"
            ),
            other => panic!("{other:?}"),
        }
        // Counted before the specs past it are read: a bad one there is never reached.
        let body = serde_json::value::RawValue::from_string(
            r#"{"tasks":[{"kind":"a"},{"kind":"b"},{"bad":1}]}"#.into(),
        )
        .expect("raw");
        assert!(matches!(
            specs_of(&body, 1),
            Err(SubmitError::TooMany { max: 1 })
        ));
        // The spec just past the limit is counted, not read: a typo in it is not what the
        // client is told (it was, `tasks[2]: unknown field`, when it was read whole first).
        assert!(matches!(
            specs_of(&body, 2),
            Err(SubmitError::TooMany { max: 2 })
        ));
    }

    #[test]
    fn a_body_of_another_shape_is_told_the_two_shapes() {
        for (body, what) in [
            (json!([{"kind": "a"}]), "a JSON array"),
            (json!("sleep"), "a string"),
            (json!(7), "a number"),
            (json!(true), "a boolean"),
            (Value::Null, "null"),
        ] {
            let m = refusal(body);
            assert_eq!(
                m,
                format!("the body is {what}; send one task spec object or {{\"tasks\": [specs]}}")
            );
        }
    }

    /// An app whose core answers every listing of workers with `n` of them, counting the asks.
    fn app_listing(n: usize) -> (Arc<AppState>, Arc<std::sync::atomic::AtomicUsize>) {
        let (events, mut rx) = tokio::sync::mpsc::channel(16);
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = asked.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if let Event::Api(Api::Overview { .. }) = ev {
                    // Dropped unanswered: an event stream's snapshot asks this first.
                    counted.fetch_add(1000, std::sync::atomic::Ordering::SeqCst);
                } else if let Event::Api(Api::ListWorkers { reply }) = ev {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = reply.send(Ok(workers(n)));
                }
            }
        });
        (app_of(events), asked)
    }

    /// `n` workers, `w0`...
    fn workers(n: usize) -> Vec<crate::model::Worker> {
        (0..n)
            .map(|i| {
                let id = WorkerId::parse(&format!("w{i}")).expect("id");
                crate::model::Worker::new(id, Utc::now())
            })
            .collect()
    }

    /// A request that finds the coordinator stopping (its core gone) did nothing: it is told
    /// 503 with Retry-After, which a client retries, not 500 `internal`.
    #[tokio::test]
    async fn a_request_during_shutdown_is_unavailable_not_an_internal_error() {
        let (events, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        let r = overview(State(app_of(events))).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(axum::http::header::RETRY_AFTER));
        let body = axum::body::to_bytes(r.into_body(), 1 << 16)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["code"], "shutting_down", "{v}");
    }

    /// A core that does not answer (its replies held behind a commit waiting for space): the
    /// metrics are served all the same, the store's gauges among them, and say the model's
    /// are stale. The scrape used to wait for the core for as long as the space ran out.
    #[tokio::test(start_paused = true)]
    async fn metrics_are_served_while_the_core_does_not_answer() {
        let (events, _rx) = tokio::sync::mpsc::channel(16);
        let r = crate::metrics::scrape(State(app_of(events))).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), 1 << 24)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("tether_model_stale 1"), "{text}");
    }

    /// What the scrape reads beside the core's overview: the writer's failed fold rounds
    /// (`StoreStats::fold_failures`, which no metric showed) and the HTTP connections cut for
    /// reading their answers too slowly, each a counter of its own.
    #[tokio::test(start_paused = true)]
    async fn failed_fold_rounds_and_slow_readers_cut_are_served_as_metrics() {
        use std::sync::atomic::Ordering::Relaxed;
        let (events, _rx) = tokio::sync::mpsc::channel(16);
        let app = app_of(events);
        app.store_stats.fold_failures.store(7, Relaxed);
        app.counters.slow_http_closed.store(5, Relaxed);
        let r = crate::metrics::scrape(State(app)).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), 1 << 24)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        for line in [
            "tether_store_fold_failures_total 7",
            "tether_http_slow_closed_total 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }

    /// An app whose core events go to `events`.
    fn app_of(events: tokio::sync::mpsc::Sender<Event>) -> Arc<AppState> {
        Arc::new(AppState {
            cfg: Arc::new(crate::config::CoordinatorConfig::new("/nonexistent")),
            events,
            counters: Arc::default(),
            store_stats: Arc::default(),
            changes: tokio::sync::broadcast::channel(1).0,
            history: Arc::new(crate::dashboard::History::new(Duration::from_secs(1))),
            stop: tokio_util::sync::CancellationToken::new(),
            heavy: Arc::new(tokio::sync::Semaphore::new(HEAVY_AT_ONCE)),
            controls: Arc::new(tokio::sync::Semaphore::new(CONTROLS_AT_ONCE)),
            submits: Arc::new(tokio::sync::Semaphore::new(SUBMITS_AT_ONCE)),
            paces: crate::ws::Paces::default(),
            refusals: Arc::default(),
        })
    }

    /// An app whose core answers what an event stream's snapshot asks: an empty overview, `n`
    /// workers, no task.
    fn app_snapshotting(n: usize) -> Arc<AppState> {
        let (events, mut rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Api(Api::Overview { reply }) => {
                        let _ = reply.send(Ok(crate::core::Overview {
                            tasks: Default::default(),
                            queued: 0,
                            workers: Default::default(),
                            workers_connected: n,
                            workers_known: n,
                            workers_draining: 0,
                            rtt_p50_ms_mean: None,
                            counters: Default::default(),
                        }));
                    }
                    Event::Api(Api::ListWorkers { reply }) => {
                        let _ = reply.send(Ok(workers(n)));
                    }
                    Event::Api(Api::ListTasks { reply, .. }) => {
                        let _ = reply.send(Ok(Vec::new()));
                    }
                    _ => {}
                }
            }
        });
        app_of(events)
    }

    /// An event stream's snapshot (every worker, the newest tasks: megabytes) keeps its turn
    /// of large answers until the stream is read on: the connection asks for the next event
    /// only once it wrote most of that one, so clients that do not read hold turns, at most
    /// [`HEAVY_AT_ONCE`] snapshots, not one each.
    #[tokio::test(start_paused = true)]
    async fn an_event_streams_snapshot_keeps_its_turn_until_the_stream_is_read_on() {
        use futures_util::StreamExt;
        let app = app_snapshotting(3_000);
        let mut streams = Vec::new();
        for _ in 0..HEAVY_AT_ONCE {
            let stream = crate::dashboard::events::events(State(app.clone()), EnvShown(true)).await;
            let mut frames = stream.into_body().into_data_stream();
            let first = tokio::time::timeout(Duration::from_secs(2), frames.next())
                .await
                .expect("a snapshot")
                .expect("a frame")
                .expect("data");
            assert!(first.starts_with(b"event: snapshot"), "{first:?}");
            streams.push(frames);
        }
        assert_eq!(
            app.heavy.available_permits(),
            0,
            "each snapshot holds its turn"
        );
        // A listing waits for a turn, and is told to come back.
        let busy = list_workers(State(app.clone()), RawQuery(None)).await;
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        // A stream read on gives its turn back (it then waits for changes).
        let next = tokio::time::timeout(Duration::from_millis(100), streams[0].next()).await;
        assert!(next.is_err(), "no change to send");
        assert_eq!(app.heavy.available_permits(), 1);
        drop(streams);
        assert_eq!(app.heavy.available_permits(), HEAVY_AT_ONCE);
    }

    #[tokio::test(start_paused = true)]
    async fn large_answers_take_turns_each_held_until_its_body_is_read_or_dropped() {
        use futures_util::StreamExt;
        use std::sync::atomic::Ordering::SeqCst;
        let (app, asked) = app_listing(3_000);
        let mut held = Vec::new();
        for _ in 0..HEAVY_AT_ONCE {
            held.push(list_workers(State(app.clone()), RawQuery(None)).await);
        }
        assert_eq!(asked.load(SeqCst), HEAVY_AT_ONCE);
        // One more waits for a turn: the core is not even asked to make it.
        let waiting = tokio::spawn(list_workers(State(app.clone()), RawQuery(None)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(asked.load(SeqCst), HEAVY_AT_ONCE);
        // A body read in part keeps its turn (a slow client holds a turn, not more memory)...
        let first = held.remove(0);
        // A listing is made as it is taken: no length known ahead, a piece of about
        // HEAVY_PIECE made at a time (it ends with the item that filled it).
        assert!(
            !first
                .headers()
                .contains_key(axum::http::header::CONTENT_LENGTH)
        );
        let mut body = first.into_body().into_data_stream();
        let mut read = body.next().await.expect("a piece").expect("data").to_vec();
        assert!(
            (HEAVY_PIECE..HEAVY_PIECE + 1024).contains(&read.len()),
            "{} bytes",
            read.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        // ...until it is read whole, which ends it.
        while let Some(piece) = body.next().await {
            read.extend_from_slice(&piece.expect("data"));
        }
        assert!(
            read.len() > 2 * HEAVY_PIECE,
            "{} bytes: several pieces",
            read.len()
        );
        let workers: Vec<Value> = serde_json::from_slice(&read).expect("JSON");
        assert_eq!(workers.len(), 3_000);
        drop(body);
        let next = waiting.await.expect("answered");
        assert_eq!(next.status(), StatusCode::OK);
        assert_eq!(asked.load(SeqCst), HEAVY_AT_ONCE + 1);
        // A body dropped unread (the client went) ends its turn too.
        drop(held.remove(0));
        let again = list_workers(State(app.clone()), RawQuery(None)).await;
        assert_eq!(again.status(), StatusCode::OK);
        // Every turn held: one more waits HEAVY_WAIT and is told to come back.
        let busy = list_workers(State(app.clone()), RawQuery(None)).await;
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[axum::http::header::RETRY_AFTER], "1");
        assert_eq!(asked.load(SeqCst), HEAVY_AT_ONCE + 2);
        // An event stream's snapshot waits for a turn too (the core is not asked for it).
        let stream = crate::dashboard::events::events(State(app.clone()), EnvShown(true)).await;
        let mut frames = stream.into_body().into_data_stream();
        let first = tokio::time::timeout(Duration::from_secs(2), frames.next()).await;
        assert!(first.is_err(), "no snapshot without a turn");
        assert_eq!(asked.load(SeqCst), HEAVY_AT_ONCE + 2);
        drop(next);
        let _ = tokio::time::timeout(Duration::from_secs(5), frames.next()).await;
        assert_eq!(
            asked.load(SeqCst),
            HEAVY_AT_ONCE + 2 + 1000,
            "asked once a turn came"
        );
        drop((held, again));
    }
}
