//! Registrations refused, counted: every way a real WebSocket connection's registration is
//! refused (by the session before the core hears of it, or by the core) moves its own
//! `reason` of `tether_registrations_refused_total`, by one, and no other.
//!
//! The recorder is process-wide, so this binary holds this one test: nothing else refuses a
//! registration while it counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tether_coordinator::metrics::{REGISTRATIONS_REFUSED, Refused};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

mod support;
use support::{STEP, scraped, start, stop};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// `reason` -> value of every sample of the family, from a scrape of `/metrics`.
async fn refused(addr: SocketAddr) -> BTreeMap<String, u64> {
    let answer = scraped(addr).await;
    let prefix = format!("{REGISTRATIONS_REFUSED}{{reason=\"");
    answer
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A connection to `id`'s endpoint, its welcome read.
async fn connect(addr: SocketAddr, id: &str) -> (Ws, Value) {
    let url = format!("ws://{addr}/api/v1/worker/{id}/ws");
    let (mut ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(&url))
        .await
        .expect("connected in time")
        .expect("connect");
    let welcome = next_of(&mut ws, "welcome").await;
    (ws, welcome)
}

/// The next message of type `ty`, skipping others.
async fn next_of(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let frame = tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {ty} in time"))
            .expect("open")
            .expect("a frame");
        if let Message::Text(t) = frame {
            let v: Value = serde_json::from_str(t.as_str()).expect("json");
            if v["type"] == ty {
                return v;
            }
        }
    }
}

/// The code the connection is closed with, skipping other frames.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(STEP, ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return None,
            Err(_) => panic!("no close in time"),
        }
    }
}

/// A registration of `id` as process `boot`, unsigned.
fn registration(id: &str, boot: &str) -> Value {
    json!({
        "type": "registration",
        "worker_id": id,
        "protocol_version": tether_proto::PROTOCOL_VERSION,
        "boot_id": boot,
        "capabilities": [],
        "slots": 1,
        "executors": ["sleep"],
        "timestamp": chrono::Utc::now(),
    })
}

async fn send(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Sends `reg` on a new connection to `id`'s endpoint and checks it is closed with `code`,
/// and that this moved `reason` by one and no other reason.
async fn refused_once(addr: SocketAddr, id: &str, reg: Value, code: u16, reason: Refused) {
    let before = refused(addr).await;
    let (mut ws, _) = connect(addr, id).await;
    send(&mut ws, &reg).await;
    assert_eq!(close_code(&mut ws).await, Some(code), "{reason:?}: {reg}");
    let mut want = before.clone();
    *want.entry(reason.as_str().to_owned()).or_default() += 1;
    // Counted as the refusal is made, before its close is sent.
    assert_eq!(refused(addr).await, want, "{reason:?} moved, and only it");
}

#[tokio::test]
async fn every_refused_registration_moves_its_own_reason_by_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = tether_coordinator::CoordinatorConfig::new(dir.path());
    let (addr, shutdown, join) = start(cfg).await;

    // Every reason at 0 before the first refusal, and no other.
    let fresh = refused(addr).await;
    let zeros: BTreeMap<String, u64> = Refused::ALL
        .iter()
        .map(|r| (r.as_str().to_owned(), 0))
        .collect();
    assert_eq!(fresh, zeros);

    // Refused by the session before the core hears of the connection.
    let other = registration("refused-elsewhere", "b-1");
    refused_once(addr, "refused-w", other, 4003, Refused::OtherWorker).await;
    let mut old = registration("refused-w", "b-1");
    old["protocol_version"] = (tether_proto::PROTOCOL_VERSION + 1).into();
    refused_once(addr, "refused-w", old, 4002, Refused::IncompatibleProtocol).await;
    let mut tiny = registration("refused-w", "b-1");
    tiny["max_frame"] = 1.into();
    refused_once(addr, "refused-w", tiny, 4002, Refused::FrameLimit).await;
    let mut many = registration("refused-w", "b-1");
    let labels = tether_proto::msg::MAX_WORKER_LABELS + 1;
    many["capabilities"] = (0..labels).map(|n| format!("c{n}")).collect();
    refused_once(addr, "refused-w", many, 4002, Refused::OutOfBounds).await;

    // Refused by the core: a process that a newer one of its id replaced, while the newer
    // one's session is live.
    let (mut first, _) = connect(addr, "refused-twice").await;
    send(&mut first, &registration("refused-twice", "b-first")).await;
    next_of(&mut first, "registration_ack").await;
    let (mut newer, _) = connect(addr, "refused-twice").await;
    send(&mut newer, &registration("refused-twice", "b-newer")).await;
    next_of(&mut newer, "registration_ack").await;
    assert_eq!(close_code(&mut first).await, Some(4009), "replaced");
    let back = registration("refused-twice", "b-first");
    refused_once(addr, "refused-twice", back, 4003, Refused::Replaced).await;
    drop(newer);

    stop(shutdown, join).await;

    // Refused by authentication: an unsigned registration to a coordinator that checks.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = tether_coordinator::CoordinatorConfig::new(dir.path());
    let secret =
        tether_proto::auth::Secret::new(b"the fleet secret of the refusals test").expect("secret");
    cfg.auth = Some(tether_coordinator::auth::WorkerAuth::fleet(secret));
    let (addr, shutdown, join) = start(cfg).await;
    let unsigned = registration("refused-w", "b-1");
    refused_once(addr, "refused-w", unsigned, 4001, Refused::Unauthorized).await;
    stop(shutdown, join).await;
}
