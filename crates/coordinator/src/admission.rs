//! Admission control at accept, before any HTTP parsing: a cap on open connections, a rate of
//! new connections per source address (reconnection storms), and a deadline for the server's
//! first byte, which a client that never finishes its request headers (slow-loris) never gets.
//! Refused connections are closed at once and counted; nothing is parsed for them.
//!
//! With TLS configured, every admitted connection is wrapped in a TLS handshake that runs on the
//! connection's own task.
//!
//! The same token bucket limits the messages per second of each worker session (`ws.rs`).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::config::Limits;
use crate::core::Counters;

/// Source addresses remembered before idle ones are forgotten.
const MAX_TRACKED_ADDRS: usize = 4096;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            tokens: burst,
            last: Instant::now(),
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.last = now;
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` more tokens, into debt if need be: the next [`Bucket::take`] waits until the
    /// debt is paid.
    pub fn charge(&mut self, n: u32) {
        if n > 0 {
            self.refill(Instant::now());
            self.tokens -= f64::from(n);
        }
    }

    /// When the next token is there.
    pub fn next_token_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.last + Duration::from_secs_f64(missing / self.rate)
    }
}

/// A listener that admits connections within the limits.
pub struct Admission {
    inner: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    open: Arc<AtomicUsize>,
    per_addr: HashMap<IpAddr, Bucket>,
    counters: Arc<Counters>,
}

impl Admission {
    pub fn new(inner: TcpListener, limits: Limits, counters: Arc<Counters>) -> Self {
        Self {
            inner,
            tls: None,
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            per_addr: HashMap::new(),
            counters,
        }
    }

    /// Serves TLS on every admitted connection (the handshake runs on the connection's own
    /// task, under the handshake deadline, never in the accept loop).
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(config));
        self
    }

    fn admit(&mut self, ip: IpAddr) -> bool {
        if ip.is_loopback() && !self.limits.limit_loopback {
            return true;
        }
        let now = Instant::now();
        if self.per_addr.len() >= MAX_TRACKED_ADDRS {
            // A full bucket is as good as a forgotten one.
            let (rate, burst) = (self.limits.connects_per_sec, self.limits.connect_burst);
            let full_after = Duration::from_secs_f64(f64::from(burst) / rate.max(1e-9));
            self.per_addr
                .retain(|_, b| now.saturating_duration_since(b.last) < full_after);
            if self.per_addr.len() >= MAX_TRACKED_ADDRS {
                self.per_addr.clear();
            }
        }
        let limits = &self.limits;
        self.per_addr
            .entry(ip)
            .or_insert_with(|| Bucket::new(limits.connects_per_sec, limits.connect_burst))
            .take(now)
    }
}

impl axum::serve::Listener for Admission {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        loop {
            let (tcp, addr) = match self.inner.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if self.open.load(Ordering::Relaxed) >= self.limits.max_connections {
                self.counters
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%addr, "connection refused: too many open connections");
                continue;
            }
            if !self.admit(addr.ip()) {
                self.counters
                    .connections_throttled
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%addr, "connection refused: too many new connections from this address");
                continue;
            }
            let _ = tcp.set_nodelay(true);
            self.open.fetch_add(1, Ordering::Relaxed);
            let tcp = match &self.tls {
                None => Stream::Plain(tcp),
                Some(acceptor) => Stream::Handshaking(Box::pin(acceptor.accept(tcp))),
            };
            let io = Guarded {
                tcp,
                open: self.open.clone(),
                first_byte: Some(Box::pin(tokio::time::sleep(self.limits.handshake_timeout))),
                counters: self.counters.clone(),
            };
            return (io, addr);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An admitted connection: counted while open, and closed if the server has not written
/// anything (a response, or the 101 of an upgrade) by the handshake deadline.
pub struct Guarded {
    tcp: Stream,
    open: Arc<AtomicUsize>,
    first_byte: Option<Pin<Box<Sleep>>>,
    counters: Arc<Counters>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The byte stream under a connection: plain, or TLS once its handshake is done.
enum Stream {
    Plain(TcpStream),
    Handshaking(Pin<Box<tokio_rustls::Accept<TcpStream>>>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Failed,
}

impl Stream {
    /// Drives a TLS handshake; `Ready(Ok)` once the stream can carry data.
    fn ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Stream::Handshaking(accept) = self {
            match accept.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(tls)) => *self = Stream::Tls(Box::new(tls)),
                Poll::Ready(Err(e)) => {
                    *self = Stream::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        match self {
            Stream::Failed => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "TLS handshake failed",
            ))),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn io(&mut self) -> Pin<&mut dyn AsyncReadWrite> {
        match self {
            Stream::Plain(t) => Pin::new(t),
            Stream::Tls(t) => Pin::new(&mut **t),
            // INVARIANT: callers poll `ready` first, which leaves only Plain or Tls here.
            Stream::Handshaking(_) | Stream::Failed => unreachable!("stream not ready"),
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

macro_rules! ready_or_return {
    ($s:expr, $cx:expr) => {
        match $s.ready($cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    };
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(deadline) = self.first_byte.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.first_byte = None;
            self.counters
                .slow_handshakes
                .fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request not complete by the handshake deadline",
            )));
        }
        ready_or_return!(self.tcp, cx);
        self.tcp.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready_or_return!(self.tcp, cx);
        let r = self.tcp.io().poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.first_byte = None;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready_or_return!(self.tcp, cx);
        self.tcp.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready_or_return!(self.tcp, cx);
        self.tcp.io().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready_or_return!(self.tcp, cx);
        let r = self.tcp.io().poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.first_byte = None;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        match &self.tcp {
            Stream::Plain(t) => t.is_write_vectored(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket::new(10.0, 3);
        let now = Instant::now();
        assert!(b.take(now) && b.take(now) && b.take(now));
        assert!(!b.take(now));
        assert_eq!(b.next_token_at(), now + Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.take(Instant::now()));
        assert!(!b.take(Instant::now()));
        tokio::time::advance(Duration::from_secs(60)).await;
        let now = Instant::now();
        assert!(b.take(now) && b.take(now) && b.take(now));
        assert!(!b.take(now), "never more than the burst saved up");
    }
}
