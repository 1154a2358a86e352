//! Worker sessions. The upgrade path is parsed strictly before the upgrade (anything else is a
//! 4xx, never an accepted-then-closed socket). Each session: welcome, then frames to the core,
//! heartbeats answered here, a structured `error` for unknown or malformed frames (the session
//! goes on), 1009 for oversize frames, and a close when nothing arrives for `heartbeat_timeout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{OriginalUri, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tether_proto::endpoint::{PathError, parse_endpoint_path};
use tether_proto::msg::{
    CoordMsg, ErrorCode, HeartbeatReply, PROTOCOL_VERSION, Welcome, WorkerMsg, now,
};
use tether_proto::{DecodeError, WorkerId, decode_worker, encode};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

use crate::core::{Event, Outgoing, SessionRef};
use crate::metrics as m;
use crate::server::AppState;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Close code for frames over the size limit.
const CLOSE_TOO_BIG: u16 = 1009;
/// Initial read buffer of a session's WebSocket. The library default (128 KiB, allocated and
/// zeroed per connection) would make 10,000 idle workers cost 1.25 GiB; worker frames are
/// small, and the buffer grows for a larger one (up to `max_frame`).
pub const WS_READ_BUFFER: usize = 4 * 1024;

/// `GET /api/v1/worker/{worker_id}/ws`
#[utoipa::path(
    get,
    path = "/api/v1/worker/{worker_id}/ws",
    tag = "protocol",
    params(("worker_id" = String, Path, description = "the worker's id, percent-encoded")),
    responses(
        (status = 101, description = "WebSocket session; messages in docs/PROTOCOL.md"),
        (status = 400, description = "Invalid worker id", body = crate::http::ErrorBody),
        (status = 404, description = "Not the endpoint's shape", body = crate::http::ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade", body = crate::http::ErrorBody),
    )
)]
pub async fn upgrade(
    State(app): State<Arc<AppState>>,
    OriginalUri(uri): OriginalUri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let worker = match parse_endpoint_path(uri.path()) {
        Ok(w) => w,
        Err(e) => {
            let status = match e {
                PathError::Shape(_) => StatusCode::NOT_FOUND,
                PathError::Id { .. } | PathError::Encoding(_) => StatusCode::BAD_REQUEST,
            };
            return crate::http::error_response(status, "bad_path", &e.to_string());
        }
    };
    let Ok(ws) = ws else {
        return crate::http::error_response(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only",
        );
    };
    let max = app.cfg.max_frame;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| session(app, worker, socket))
}

async fn session(app: Arc<AppState>, worker: WorkerId, socket: WebSocket) {
    let session_id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (mut sink, mut stream) = socket.split();
    let timeout = app.cfg.heartbeat_timeout;
    let welcome = CoordMsg::Welcome(Welcome {
        worker_id: worker.clone(),
        protocol_version: PROTOCOL_VERSION,
        session_id,
        heartbeat_interval_ms: app.cfg.heartbeat_interval.as_millis() as u64,
        heartbeat_timeout_ms: timeout.as_millis() as u64,
        timestamp: now(),
    });
    if !send_by(Instant::now() + timeout, &mut sink, &welcome).await {
        return;
    }
    let session = SessionRef { id: session_id, tx };
    if app
        .events
        .send(Event::Connected {
            worker: worker.clone(),
            session,
        })
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(worker = %worker, session = session_id, "session open");
    metrics::counter!(m::CONNECTIONS).increment(1);
    let mut deadline = Instant::now() + timeout;
    let (kind, reason): (&'static str, String) = loop {
        tokio::select! {
            frame = timeout_at(deadline, stream.next()) => {
                let frame = match frame {
                    Err(_) => {
                        // The last frame arrived `timeout` before the deadline.
                        m::observe(m::DEAD_DETECT, Instant::now() + timeout - deadline);
                        break ("timeout", format!("no frame for {} ms", timeout.as_millis()));
                    }
                    Ok(None) => break ("closed", "closed".into()),
                    Ok(Some(Err(e))) => {
                        if is_too_big(&e) {
                            app.counters.oversize_frames.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!(m::OVERSIZE_FRAMES).increment(1);
                            let _ = sink.send(Message::Close(Some(CloseFrame {
                                code: CLOSE_TOO_BIG,
                                reason: "frame exceeds the size limit".into(),
                            }))).await;
                            break ("oversize", "oversize frame".into());
                        }
                        break ("error", format!("read: {e}"));
                    }
                    Ok(Some(Ok(m))) => m,
                };
                deadline = Instant::now() + timeout;
                let reply = match frame {
                    Message::Text(t) => on_text(&app, &worker, session_id, t.as_str()).await,
                    Message::Binary(_) => Some(CoordMsg::error(
                        ErrorCode::BadFrame,
                        "binary frames are not accepted without negotiated compression",
                        None,
                        None,
                    )),
                    Message::Close(_) => break ("closed", "closed by worker".into()),
                    Message::Ping(_) | Message::Pong(_) => None,
                };
                if let Some(reply) = reply
                    && !send_by(deadline, &mut sink, &reply).await
                {
                    break ("error", "write failed".into());
                }
            }
            out = rx.recv() => match out {
                Some(Outgoing::Msg(m)) => {
                    if !send_by(deadline, &mut sink, &m).await {
                        break ("error", "write failed".into());
                    }
                }
                Some(Outgoing::Close(code, reason)) => {
                    let _ = timeout_at(deadline, sink.send(Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.clone().into(),
                    })))).await;
                    break ("coordinator", format!("closed by coordinator: {reason}"));
                }
                None => break ("coordinator", "core stopped".into()),
            },
        }
    };
    tracing::info!(worker = %worker, session = session_id, %reason, "session ended");
    metrics::counter!(m::SESSIONS_ENDED, "reason" => kind).increment(1);
    let _ = app
        .events
        .send(Event::Disconnected { worker, session_id })
        .await;
}

/// Decodes a frame; heartbeats are answered here, everything else goes to the core.
async fn on_text(
    app: &AppState,
    worker: &WorkerId,
    session_id: u64,
    text: &str,
) -> Option<CoordMsg> {
    let decoded = decode_worker(text);
    if let Ok(msg) = &decoded {
        metrics::counter!(m::MESSAGES_IN, "type" => msg.type_name()).increment(1);
    }
    match decoded {
        Ok(WorkerMsg::Heartbeat(h)) => Some(CoordMsg::Heartbeat(HeartbeatReply {
            response_to: Some(h.sequence),
            actions: Vec::new(),
            timestamp: now(),
        })),
        Ok(msg) => {
            let _ = app
                .events
                .send(Event::Frame {
                    worker: worker.clone(),
                    session_id,
                    msg,
                })
                .await;
            None
        }
        Err(e) => {
            let code = match e {
                DecodeError::UnknownType { .. } => {
                    app.counters.unknown_frames.fetch_add(1, Ordering::Relaxed);
                    ErrorCode::UnknownType
                }
                DecodeError::Malformed { .. } => {
                    app.counters
                        .malformed_frames
                        .fetch_add(1, Ordering::Relaxed);
                    ErrorCode::BadFrame
                }
            };
            tracing::debug!(worker = %worker, error = %e, "undecodable frame");
            Some(CoordMsg::error(
                code,
                e.to_string(),
                e.offending_type(),
                e.seq(),
            ))
        }
    }
}

/// Sends with a deadline; false when the write failed or stalled.
async fn send_by(
    deadline: Instant,
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    m: &CoordMsg,
) -> bool {
    metrics::counter!(crate::metrics::MESSAGES_OUT, "type" => m.type_name()).increment(1);
    if let CoordMsg::Error(e) = m {
        metrics::counter!(crate::metrics::ERRORS, "code" => e.code.as_str(), "direction" => "sent")
            .increment(1);
    }
    matches!(timeout_at(deadline, sink.send(text(m))).await, Ok(Ok(())))
}

fn text(m: &CoordMsg) -> Message {
    Message::Text(encode(m).into())
}

fn is_too_big(e: &axum::Error) -> bool {
    use std::error::Error as _;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = source {
        if let Some(WsError::Capacity(_)) = err.downcast_ref::<WsError>() {
            return true;
        }
        source = err.source();
    }
    false
}
