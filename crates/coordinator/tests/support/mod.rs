//! What the coordinator's integration tests share: a coordinator started on `127.0.0.1:0`, and
//! its `/metrics` scraped over a plain HTTP/1.1 connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a step may take before the test fails rather than hangs.
pub const STEP: Duration = Duration::from_secs(30);

/// A coordinator on `127.0.0.1:0` with `cfg`, started: its address, what stops it, its task.
pub async fn start(
    cfg: tether_coordinator::CoordinatorConfig,
) -> (
    SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), tether_coordinator::ServerError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let (started, on_start) = tokio::sync::oneshot::channel();
    let join = tokio::spawn(tether_coordinator::run_with(
        listener,
        cfg,
        shutdown.clone(),
        move |_| {
            let _ = started.send(());
        },
    ));
    tokio::time::timeout(STEP, on_start)
        .await
        .expect("started in time")
        .expect("started");
    (addr, shutdown, join)
}

/// `method path` with `body` (JSON) on a connection of its own: the status and the body.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("send the request");
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .await
        .expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// `/metrics`, answered 200 within [`STEP`].
pub async fn scraped(addr: SocketAddr) -> String {
    let (status, text) = tokio::time::timeout(STEP, request(addr, "GET", "/metrics", ""))
        .await
        .expect("scraped in time");
    assert_eq!(status, 200, "{text}");
    text
}

/// Stops a coordinator [`start`] started, which must stop cleanly within [`STEP`].
pub async fn stop(
    shutdown: CancellationToken,
    join: tokio::task::JoinHandle<Result<(), tether_coordinator::ServerError>>,
) {
    shutdown.cancel();
    let stopped = tokio::time::timeout(STEP, join)
        .await
        .expect("stopped in time")
        .expect("the coordinator's task");
    stopped.expect("stopped cleanly");
}
