//! How a worker reaches the coordinator: a TCP connector for real use, and any other transport
//! (in-memory pipes under paused time) for tests.

use std::pin::Pin;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A byte stream a WebSocket can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The WebSocket a session owns.
pub type WsStream = WebSocketStream<Pin<Box<dyn Io>>>;

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// Worth retrying: refused, reset, timed out, 5xx, 429.
    #[error("{0}")]
    Transient(String),
    /// Retrying will not help: bad credentials, path refused, id taken by policy.
    #[error("coordinator refused this worker: {0}")]
    Refused(String),
}

/// Opens a WebSocket to a URL.
pub trait Connector: Send + Sync + 'static {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>>;
}

/// Plain TCP (`ws://`).
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        Box::pin(async move {
            let parsed = url::Url::parse(&url)
                .map_err(|e| ConnectError::Refused(format!("bad url {url}: {e}")))?;
            if parsed.scheme() != "ws" {
                return Err(ConnectError::Refused(format!(
                    "scheme {} is not supported by this build; use ws://",
                    parsed.scheme()
                )));
            }
            let host = parsed.host_str().unwrap_or_default().to_owned();
            let port = parsed.port_or_known_default().unwrap_or(80);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| ConnectError::Transient(format!("connect {host}:{port}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let io: Pin<Box<dyn Io>> = Box::pin(tcp);
            handshake(url, io, config).await
        })
    }
}

/// Runs the WebSocket client handshake over any byte stream and classifies failures.
pub async fn handshake(
    url: String,
    io: Pin<Box<dyn Io>>,
    config: WebSocketConfig,
) -> Result<WsStream, ConnectError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match tokio_tungstenite::client_async_with_config(url.as_str(), io, Some(config)).await {
        Ok((ws, _resp)) => Ok(ws),
        Err(WsError::Http(resp)) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let msg = format!("HTTP {status} at upgrade: {}", body.trim());
            if status.as_u16() == 429 || status.is_server_error() {
                Err(ConnectError::Transient(msg))
            } else {
                Err(ConnectError::Refused(msg))
            }
        }
        Err(e) => Err(ConnectError::Transient(format!("handshake: {e}"))),
    }
}

/// WebSocket limits for a worker.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}
