//! The live dashboard at `/`: static assets embedded in the binary (plain HTML, JS and CSS, no
//! build step, no CDN), fed by server-sent events on `/api/v1/events`.
//!
//! - The first event of a stream is a `snapshot` (overview, workers, the newest tasks, the
//!   last hour of samples); then `task` and `worker` events as the core commits changes, and a
//!   `sample` every `history_interval` for the charts. A client that falls behind gets a fresh
//!   `snapshot`.
//! - [`History`] keeps the last hour of samples (reconnections, RTT, finished tasks); the
//!   sampler asks the core for its overview every `history_interval`.
//! - The page's controls use the ordinary API routes (cancel, pause, resume, checkpoint).

pub mod events;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use events::events;

use crate::core::{Api, Overview};
use crate::server::AppState;

/// Samples kept at most (one hour at one per second).
const HISTORY_MAX: usize = 3600;
/// Tasks in a snapshot: the newest ones.
pub const SNAPSHOT_TASKS: usize = 500;
/// Changes buffered per dashboard client before it is sent a fresh snapshot instead.
pub const CHANGES_BUFFER: usize = 4096;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// `GET /`: the dashboard page.
#[utoipa::path(
    get,
    path = "/",
    tag = "observe",
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String))
)]
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /dashboard/{file}`: the page's script and style sheet.
#[utoipa::path(
    get,
    path = "/dashboard/{file}",
    tag = "observe",
    params(("file" = String, Path, description = "app.js or style.css")),
    responses(
        (status = 200, description = "A static asset of the dashboard", body = String),
        (status = 400, description = "A path that is not UTF-8 (`bad_path`)", body = crate::http::ErrorBody),
        (status = 404, description = "No such file", body = crate::http::ErrorBody),
    )
)]
pub async fn file(crate::http::ApiPath(name): crate::http::ApiPath<String>) -> Response {
    match name.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "style.css" => asset("text/css; charset=utf-8", STYLE_CSS),
        _ => crate::http::error_response(StatusCode::NOT_FOUND, "not_found", "no such file"),
    }
}

/// What the page may do, and who may show it: its own script, style and API only (it has no
/// inline script or style and loads nothing from elsewhere), in no other site's frame (a
/// framed dashboard could be clicked for the user), no forms, no referrer.
const PAGE_POLICY: &str = "default-src 'self'; connect-src 'self'; img-src 'self'; \
                           frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// One point of the charts.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Sample {
    pub at: DateTime<Utc>,
    /// Tasks by state.
    pub tasks: BTreeMap<&'static str, u64>,
    pub queued: usize,
    pub workers: BTreeMap<&'static str, u64>,
    /// Reconnections since the coordinator started (a counter).
    pub reconnections: u64,
    /// Results counted since the coordinator started (a counter).
    pub results: u64,
    /// Mean of the connected workers' reported median heartbeat RTT, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

impl Sample {
    pub fn from_overview(o: &Overview) -> Self {
        Sample {
            at: Utc::now(),
            tasks: o.tasks.clone(),
            queued: o.queued,
            workers: o.workers.clone(),
            reconnections: o.counters.get("reconnections").copied().unwrap_or(0),
            results: o.counters.get("results_recorded").copied().unwrap_or(0),
            rtt_ms: o.rtt_p50_ms_mean,
        }
    }
}

/// The last hour of samples, and the channel that announces new ones.
pub struct History {
    samples: Mutex<VecDeque<Arc<Sample>>>,
    cap: usize,
    pub tx: broadcast::Sender<Arc<Sample>>,
}

impl History {
    pub fn new(interval: Duration) -> Self {
        let per_hour = 3600.0 / interval.as_secs_f64().max(0.001);
        Self {
            samples: Mutex::new(VecDeque::new()),
            cap: (per_hour.ceil() as usize).clamp(1, HISTORY_MAX),
            tx: broadcast::channel(16).0,
        }
    }

    fn push(&self, s: Sample) {
        let s = Arc::new(s);
        {
            let mut v = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            if v.len() == self.cap {
                v.pop_front();
            }
            v.push_back(s.clone());
        }
        let _ = self.tx.send(s);
    }

    pub fn all(&self) -> Vec<Arc<Sample>> {
        let v = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        v.iter().cloned().collect()
    }
}

/// Samples the core's overview every `interval` until `stop`.
pub async fn sample(app: Arc<AppState>, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match crate::http::ask(&app, |reply| Api::Overview { reply }).await {
            Ok(o) => app.history.push(Sample::from_overview(&o)),
            // The charts skip the samples of a store waiting for space.
            Err(crate::core::ApiError::OutOfSpace) => {}
            Err(_) => return,
        }
    }
}
