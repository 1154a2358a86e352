//! Integration tests of tether-faultproxy: real sockets on 127.0.0.1, a tiny echo server as
//! the upstream, and every wait bounded by a deadline.

mod control;
mod direct;
mod faults;
mod targeting;
mod updown;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tether_faultproxy::{Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Longest any test waits for anything.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// An echo server on 127.0.0.1:0: writes back what it reads, passes the client's FIN on.
/// Stops when dropped.
pub struct Echo {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    /// Connections the echo server has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn echo() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            conns.spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    Echo {
        addr,
        accepted,
        task,
    }
}

/// A server on 127.0.0.1:0 that reads everything it is sent and throws it away. Stops when
/// dropped.
pub struct Sink {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn sink() -> Sink {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("sink addr");
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut s, _)) = listener.accept().await {
            conns.spawn(async move {
                let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
            });
        }
    });
    Sink { addr, task }
}

pub async fn proxy_to(upstream: SocketAddr) -> Proxy {
    Proxy::start(ProxyConfig {
        name: "it".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        upstream,
        seed: 1,
    })
    .await
    .expect("start proxy")
}

/// Runs `f` with the test deadline.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {DEADLINE:?}"),
    }
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "{what}: not true within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to proxy")
}

/// Reads exactly `n` bytes.
pub async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    within("read", s.read_exact(&mut buf)).await.expect("read");
    buf
}

/// Reads until EOF or an error; returns the bytes and the error, if any.
pub async fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match within("read to end", s.read(&mut buf)).await {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Writes `data` and reads as many bytes back.
pub async fn round_trip(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    within("write", s.write_all(data)).await.expect("write");
    read_n(s, data.len()).await
}

/// Asserts that nothing can be read now and the connection is not closed.
pub fn assert_open_and_silent(s: &TcpStream) {
    let mut buf = [0u8; 16];
    match s.try_read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        other => panic!("expected an open, silent connection, got {other:?}"),
    }
}

/// A deterministic byte pattern.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

/// The upgrade request a worker sends, and its path.
pub fn upgrade_request(worker: &str) -> Vec<u8> {
    format!("GET /api/v1/worker/{worker}/ws HTTP/1.1\r\nHost: coordinator\r\n\r\n").into_bytes()
}
