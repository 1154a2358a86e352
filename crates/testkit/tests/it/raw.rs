//! A hand-driven worker connection for tests that speak the protocol frame by frame.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tether_proto::WorkerId;
use tether_proto::auth::{Challenge, Secret};
use tether_testkit::*;
use tokio_tungstenite::tungstenite::Message;

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A hand-driven worker connection.
pub(crate) struct Raw {
    pub ws: Ws,
    pub id: String,
    pub welcome: Value,
    /// Messages of a batch frame not read yet.
    pending: VecDeque<Value>,
    /// Heartbeats [`Raw::next`] sent while it waited: frames the coordinator counts in
    /// `frames_in` like any other.
    pub beats: u64,
}

impl Raw {
    pub(crate) async fn connect(c: &TestCoordinator, id: &str) -> Raw {
        Self::connect_at(c.addr, id).await
    }

    /// Connects to whatever listens at `addr` (a coordinator, or a proxy in front of one).
    pub(crate) async fn connect_at(addr: std::net::SocketAddr, id: &str) -> Raw {
        let url = format!("ws://{addr}/api/v1/worker/{id}/ws");
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        let mut raw = Raw {
            ws,
            id: id.to_owned(),
            welcome: Value::Null,
            pending: VecDeque::new(),
            beats: 0,
        };
        raw.welcome = raw.next().await;
        assert_eq!(raw.welcome["type"], "welcome", "{}", raw.welcome);
        raw
    }

    /// The next message (a frame's, or the next of a batch frame's), skipping pings and pongs;
    /// heartbeats while it waits, so the coordinator does not close a quiet session.
    pub(crate) async fn next(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        let end = tokio::time::Instant::now() + DEADLINE;
        let mut beat = 0u64;
        loop {
            let m = match tokio::time::timeout(Duration::from_millis(300), self.ws.next()).await {
                Ok(m) => m.expect("open").expect("frame"),
                Err(_) => {
                    assert!(tokio::time::Instant::now() < end, "no frame in time");
                    beat += 1;
                    self.beats += 1;
                    let hb = json!({"type": "heartbeat", "sequence": beat, "timestamp": chrono::Utc::now()});
                    self.send(&hb).await;
                    continue;
                }
            };
            match m {
                Message::Text(t) => {
                    self.pending
                        .extend(messages_of(serde_json::from_str(t.as_str()).expect("json")));
                    if let Some(v) = self.pending.pop_front() {
                        return v;
                    }
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The next frame of `ty`, skipping others (heartbeats, assignments...).
    pub(crate) async fn next_of(&mut self, ty: &str) -> Value {
        self.next_of_each(&[ty]).await.remove(0)
    }

    /// The next `error`, which must have `code` and say `says` in its message.
    pub(crate) async fn next_error(&mut self, code: &str, says: &str) -> Value {
        let e = self.next_of("error").await;
        assert_eq!(e["code"], code, "{e}");
        assert!(
            e["message"].as_str().unwrap_or_default().contains(says),
            "{e}"
        );
        e
    }

    /// One frame of each type in `types`, in any order, skipping others.
    pub(crate) async fn next_of_each(&mut self, types: &[&str]) -> Vec<Value> {
        let end = tokio::time::Instant::now() + DEADLINE;
        let mut found: Vec<Option<Value>> = vec![None; types.len()];
        while found.iter().any(Option::is_none) {
            assert!(
                tokio::time::Instant::now() < end,
                "no {types:?} in time; have {found:?}"
            );
            let v = self.next().await;
            if let Some(i) = types.iter().position(|t| v["type"] == *t)
                && found[i].is_none()
            {
                found[i] = Some(v);
            }
        }
        found.into_iter().flatten().collect()
    }

    pub(crate) async fn send(&mut self, v: &Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    /// The close code the coordinator ends with, skipping other frames.
    pub(crate) async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(DEADLINE, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return None,
                Err(_) => panic!("no close in time"),
            }
        }
    }

    /// A registration, signed over this connection's nonce when `secret` is given.
    pub(crate) fn registration(&self, secret: Option<&Secret>, capabilities: &[&str]) -> Value {
        let ts = chrono::Utc::now();
        let boot = "b-raw";
        let mut reg = json!({
            "type": "registration",
            "worker_id": self.id,
            "protocol_version": tether_proto::PROTOCOL_VERSION,
            "boot_id": boot,
            "capabilities": capabilities,
            "slots": 1,
            "executors": ["sleep"],
            "timestamp": ts,
        });
        if let (Some(secret), Some(nonce)) = (secret, self.welcome["nonce"].as_str()) {
            let id = WorkerId::parse(&self.id).expect("id");
            reg["signature"] = Challenge {
                worker: &id,
                nonce,
                timestamp: ts,
                boot_id: boot,
            }
            .sign(secret)
            .into();
        }
        reg
    }
}

/// A counter of the coordinator's overview.
pub(crate) fn counter(o: &Value, name: &str) -> u64 {
    o["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {o}"))
}
