//! A worker refused for its signature (a wrong secret) stops at the third refusal, told where
//! its secret comes from.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tether_proto::encode;
use tether_proto::msg::{CoordMsg, ErrorCode};
use tether_worker::connector::{ConnectError, Connector, WsStream};
use tether_worker::{AgentError, WorkerConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::fake::{Running, until_registration, welcome};

/// A coordinator that refuses every registration as a coordinator refuses a wrong secret:
/// `error` `unauthorized`, untagged, then close 4001. Counts the connections.
#[derive(Clone, Default)]
struct Refusing {
    connections: Arc<AtomicUsize>,
}

impl Connector for Refusing {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        self.connections.fetch_add(1, Ordering::SeqCst);
        crate::fake::piped(url, config, serve)
    }
}

async fn serve(io: tokio::io::DuplexStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(io).await else {
        return;
    };
    if ws
        .send(Message::text(encode(&welcome(1, 5000, 15000))))
        .await
        .is_err()
    {
        return;
    }
    until_registration(&mut ws).await;
    let refusal = CoordMsg::error(
        ErrorCode::Unauthorized,
        format!(
            "authentication failed: {}",
            tether_proto::auth::AuthError::BadSignature
        ),
        Some("registration".into()),
        None,
    );
    if ws.send(Message::text(encode(&refusal))).await.is_err() {
        return;
    }
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "authentication failed".into(),
        }))
        .await;
    while let Some(Ok(_)) = ws.next().await {}
}

fn config() -> WorkerConfig {
    let mut c = crate::fake::steady_config();
    c.secret = Some(
        tether_proto::auth::Secret::new(b"not the coordinator's secret at all").expect("secret"),
    );
    c
}

/// Three refusals of its signature stop the worker with "authentication failed", naming
/// where its secret comes from.
#[tokio::test(start_paused = true)]
async fn a_wrong_secret_stops_the_worker_naming_where_its_secret_comes_from() {
    let coordinator = Refusing::default();
    let r = Running::start_with(coordinator.clone(), config())
        .ended()
        .await;
    match r {
        Err(AgentError::Refused(said)) => assert!(
            said.contains("authentication failed")
                && said.contains("check this worker's secret: --secret-file"),
            "{said}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(coordinator.connections.load(Ordering::SeqCst), 3);
}
