//! The HTTP control API of a [`Server`], shaped like Toxiproxy's (faults instead of toxics).
//!
//! | Method and path                       | Body            | Answer                         |
//! |---------------------------------------|-----------------|--------------------------------|
//! | `GET /proxies`                        |                 | 200 `[ProxyInfo]`              |
//! | `POST /proxies`                       | [`CreateProxy`] | 201 `ProxyInfo`                |
//! | `GET /proxies/{name}`                 |                 | 200 `ProxyInfo`                |
//! | `PATCH /proxies/{name}`               | [`ProxyPatch`]  | 200 `ProxyInfo`                |
//! | `DELETE /proxies/{name}`              |                 | 204                            |
//! | `GET /proxies/{name}/stats`           |                 | 200 [`StatsReport`]            |
//! | `GET /proxies/{name}/faults`          |                 | 200 `[FaultInfo]`              |
//! | `POST /proxies/{name}/faults`         | `Fault`         | 201 `FaultInfo`                |
//! | `GET /proxies/{name}/faults/{fault}`  |                 | 200 `FaultInfo`                |
//! | `PATCH /proxies/{name}/faults/{fault}`| `FaultPatch`    | 200 `FaultInfo`                |
//! | `DELETE /proxies/{name}/faults/{fault}`|                | 200 `FaultInfo` at removal     |
//! | `POST /reset`                         |                 | 204: all up, no faults         |
//!
//! Errors are `{"error": "<message>", "code": "<code>"}` with 400 (bad body or name, or an
//! upstream that is the proxy's own listen address), 403 (a
//! `Host` that is not a loopback name: see [`router`]), 404 (no such proxy or fault), 409 (name
//! or address taken), 415 (not JSON) or 500.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::extract::Request;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tether_proto::endpoint::is_loopback_host;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::fault::{Fault, FaultError, FaultPatch};
use crate::proxy::{FaultInfo, ProxyConfig, ProxyError, ProxyInfo};
use crate::server::{Server, ServerError};
use crate::stats::{FaultStats, ProxyStats};

/// Default address of the control API, as for Toxiproxy.
pub const DEFAULT_CONTROL_ADDR: &str = "127.0.0.1:8474";

/// Body of `POST /proxies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProxy {
    pub name: String,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Defaults to the server's seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Body of `PATCH /proxies/{name}`: `{"enabled": false}` takes the proxy down.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// Answer of `GET /proxies/{name}/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    pub proxy: ProxyStats,
    /// Current faults by name.
    pub faults: BTreeMap<String, FaultStats>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

/// Why the control API stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control API: serving failed: {0}")]
    Serve(#[source] io::Error),
}

/// The routes, for embedding or for tests. The API has no authentication and serves loopback
/// only, so a request must name a loopback host (see `host_guard`).
pub fn router(server: Server) -> Router {
    Router::new()
        .route("/proxies", get(list_proxies).post(create_proxy))
        .route(
            "/proxies/{name}",
            get(get_proxy).patch(patch_proxy).delete(delete_proxy),
        )
        .route("/proxies/{name}/stats", get(proxy_stats))
        .route("/proxies/{name}/faults", get(list_faults).post(add_fault))
        .route(
            "/proxies/{name}/faults/{fault}",
            get(get_fault).patch(patch_fault).delete(delete_fault),
        )
        .route("/reset", post(reset))
        // Everything else answers in the API's JSON error body too.
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no_such_route", "no such route")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(middleware::from_fn(host_guard))
        .with_state(server)
}

/// Refuses (403) a request whose `Host` is not a loopback name (`localhost` or a name under it,
/// an address in 127.0.0.0/8, `[::1]`; any port), as the coordinator's `browser_guard` does. A
/// web page that rebinds its own domain's DNS to 127.0.0.1 reaches a loopback listener, but
/// under its own name: without this it could create proxies (open relays) and faults. A
/// request without `Host` (HTTP/1.0) passes; browsers always send one.
async fn host_guard(req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST);
    if host.is_none_or(|h| h.to_str().is_ok_and(is_loopback_host)) {
        return next.run(req).await;
    }
    tracing::warn!(path = %req.uri().path(), ?host, "request for a host not loopback refused");
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "the control API answers only requests for a loopback host (localhost, 127.0.0.1, [::1])",
    )
    .into_response()
}

/// Serves the control API on `listener` until `shutdown` is cancelled. The proxies of
/// `server` keep running; the caller decides their fate.
pub async fn run(
    listener: TcpListener,
    server: Server,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "control API listening");
    }
    axum::serve(listener, router(server))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .into_future()
        .await
        .map_err(ControlError::Serve)
}

/// An error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl ToString) -> Self {
        ApiError {
            status,
            code,
            message: message.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            code: self.code.to_owned(),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            return ApiError::new(r.status(), "not_json", r.body_text());
        }
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(r.status(), "too_large", r.body_text());
        }
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", r.body_text())
    }
}

impl From<ProxyError> for ApiError {
    fn from(e: ProxyError) -> Self {
        use StatusCode as S;
        match &e {
            ProxyError::Name(_) => ApiError::new(S::BAD_REQUEST, "invalid_name", e),
            ProxyError::Bind { source, .. } => match source.kind() {
                io::ErrorKind::AddrInUse => ApiError::new(S::CONFLICT, "address_in_use", e),
                io::ErrorKind::AddrNotAvailable => {
                    ApiError::new(S::BAD_REQUEST, "address_not_available", e)
                }
                _ => ApiError::new(S::INTERNAL_SERVER_ERROR, "bind_failed", e),
            },
            ProxyError::UpstreamIsListen { .. } => {
                ApiError::new(S::BAD_REQUEST, "upstream_is_listen", e)
            }
            ProxyError::InvalidFault { .. } => ApiError::new(S::BAD_REQUEST, "invalid_fault", e),
            ProxyError::FaultExists { .. } => ApiError::new(S::CONFLICT, "fault_exists", e),
            ProxyError::NoSuchFault { .. } => ApiError::new(S::NOT_FOUND, "no_such_fault", e),
        }
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::ProxyExists(_) => ApiError::new(StatusCode::CONFLICT, "proxy_exists", e),
            ServerError::NoSuchProxy(_) => ApiError::new(StatusCode::NOT_FOUND, "no_such_proxy", e),
            ServerError::Proxy(e) => e.into(),
        }
    }
}

impl From<FaultError> for ApiError {
    fn from(e: FaultError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_fault", e)
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn list_proxies(State(s): State<Server>) -> Json<Vec<ProxyInfo>> {
    Json(s.list().await.iter().map(|p| p.info()).collect())
}

async fn create_proxy(
    State(s): State<Server>,
    body: Result<Json<CreateProxy>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ProxyInfo>)> {
    let Json(req) = body?;
    let config = ProxyConfig {
        name: req.name,
        listen: req.listen,
        upstream: req.upstream,
        seed: req.seed.unwrap_or(s.seed()),
    };
    let proxy = s.create(config, req.enabled).await?;
    Ok((StatusCode::CREATED, Json(proxy.info())))
}

async fn get_proxy(
    State(s): State<Server>,
    Path(name): Path<String>,
) -> ApiResult<Json<ProxyInfo>> {
    Ok(Json(s.get(&name).await?.info()))
}

async fn patch_proxy(
    State(s): State<Server>,
    Path(name): Path<String>,
    body: Result<Json<ProxyPatch>, JsonRejection>,
) -> ApiResult<Json<ProxyInfo>> {
    let Json(patch) = body?;
    let proxy = s.get(&name).await?;
    match patch.enabled {
        Some(true) => proxy.up().await?,
        Some(false) => proxy.down().await,
        None => {}
    }
    Ok(Json(proxy.info()))
}

async fn delete_proxy(State(s): State<Server>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    s.remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn proxy_stats(
    State(s): State<Server>,
    Path(name): Path<String>,
) -> ApiResult<Json<StatsReport>> {
    let proxy = s.get(&name).await?;
    Ok(Json(StatsReport {
        proxy: proxy.stats(),
        faults: proxy
            .faults()
            .into_iter()
            .map(|f| (f.fault.name, f.stats))
            .collect(),
    }))
}

async fn list_faults(
    State(s): State<Server>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<FaultInfo>>> {
    Ok(Json(s.get(&name).await?.faults()))
}

async fn add_fault(
    State(s): State<Server>,
    Path(name): Path<String>,
    body: Result<Json<Fault>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<FaultInfo>)> {
    let proxy = s.get(&name).await?;
    let Json(fault) = body?;
    let guard = proxy.add_fault(fault.clone()).await?;
    let info = FaultInfo {
        fault,
        stats: guard.stats(),
    };
    guard.keep();
    Ok((StatusCode::CREATED, Json(info)))
}

async fn get_fault(
    State(s): State<Server>,
    Path((name, fault)): Path<(String, String)>,
) -> ApiResult<Json<FaultInfo>> {
    let proxy = s.get(&name).await?;
    proxy
        .fault(&fault)
        .map(Json)
        .ok_or_else(|| ProxyError::NoSuchFault { proxy: name, fault }.into())
}

async fn patch_fault(
    State(s): State<Server>,
    Path((name, fault)): Path<(String, String)>,
    body: Result<Json<FaultPatch>, JsonRejection>,
) -> ApiResult<Json<FaultInfo>> {
    let proxy = s.get(&name).await?;
    let Json(patch) = body?;
    Ok(Json(proxy.update_fault(&fault, &patch)?))
}

/// Answers the removed fault with its counters, read in the same step as the removal (a `GET`
/// before the `DELETE` missed what the fault did between the two; a chunk a link's writer is
/// taking through the fault as it goes may still be counted after this snapshot).
async fn delete_fault(
    State(s): State<Server>,
    Path((name, fault)): Path<(String, String)>,
) -> ApiResult<Json<FaultInfo>> {
    Ok(Json(s.get(&name).await?.remove_fault(&fault)?))
}

async fn reset(State(s): State<Server>) -> ApiResult<StatusCode> {
    s.reset().await?;
    Ok(StatusCode::NO_CONTENT)
}
