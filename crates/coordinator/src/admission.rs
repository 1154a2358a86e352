//! Admission control at accept, before any HTTP parsing: a cap on open connections, a rate of
//! new connections per source address (reconnection storms), and a deadline for the server's
//! first byte, which a client that never finishes its request headers (slow-loris) never gets.
//! Refused connections are closed at once and counted; nothing is parsed for them.
//!
//! With TLS configured, every admitted connection is wrapped in a TLS handshake that runs on the
//! connection's own task. The bytes a connection reads and writes are counted on its socket,
//! under TLS: a worker session tells a slow frame still arriving, or a slow write still
//! draining, by them, and TLS alone would show them a whole record (up to 16 KiB) at a time.
//!
//! A connection that the worker endpoint upgrades to a WebSocket may then read only
//! [`PRE_REGISTRATION_BYTES`] (and what it can draw from a pool shared by all, for a
//! registration with a long inventory) until its session has registered: the WebSocket's frame
//! limit is set once, at the upgrade, to `max_frame`, and without this a client that never
//! authenticates could have the coordinator buffer that much per connection. The upgrade
//! handler reaches the connection's budget through [`Peer`], axum's `ConnectInfo`; HTTP requests
//! never arm it, so their bodies are bounded by `max_body` only.
//!
//! The same token bucket limits the messages and the bytes per second of each worker session
//! (`ws.rs`).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::config::Limits;
use crate::core::Counters;

/// Sources (IPv4 addresses, IPv6 /64s) whose connection rate is remembered at most. Past it,
/// those whose bucket is full again are forgotten (a full bucket is as good as a new one), and
/// if that is not enough the least recently seen eighth: a source connecting now (one over its
/// rate among them) is never the one forgotten, however many other sources connect.
const MAX_TRACKED_ADDRS: usize = 4096;
/// Bytes a WebSocket connection may read of its own before its session registered
/// (authenticated, with worker authentication on), counted from the upgrade. A signed
/// registration of a worker with 100 capabilities and 100 tags is about 4 KiB of JSON, and each
/// task its inventory lists adds about 60 bytes: this holds one listing about 900 tasks, with
/// the heartbeats allowed before it. A longer one (a worker back from a long outage lists every
/// unacknowledged result, up to 10,000 with the default outbox: about 600 KB) draws the rest
/// from the coordinator's `registration_pool`.
pub const PRE_REGISTRATION_BYTES: usize = 64 * 1024;

/// A rate: `per_sec` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    pub fn new(per_sec: f64, burst: u32) -> Self {
        Self {
            per_sec: per_sec.max(f64::MIN_POSITIVE),
            burst: f64::from(burst.max(1)),
        }
    }
}

/// A token bucket filled at a [`Rate`] its owner keeps (every session's buckets fill at the
/// same rates, so they are not stored in each: an idle session's state is its memory).
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket holding the whole burst.
    pub fn full(rate: Rate) -> Self {
        Self {
            tokens: rate.burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant, rate: Rate) {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * rate.per_sec;
        self.tokens = (self.tokens + earned).min(rate.burst);
        self.last = now;
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant, rate: Rate) -> bool {
        self.refill(now, rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the whole burst is saved up by `now`.
    pub fn is_full(&mut self, now: Instant, rate: Rate) -> bool {
        self.refill(now, rate);
        self.tokens >= rate.burst
    }

    /// Whether the whole burst is saved up by `now`, changing nothing (the bucket's last
    /// sight stays).
    fn full_by(&self, now: Instant, rate: Rate) -> bool {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * rate.per_sec;
        self.tokens + earned >= rate.burst
    }

    /// Whether a token is there, taking none.
    pub fn ready(&mut self, now: Instant, rate: Rate) -> bool {
        self.refill(now, rate);
        self.tokens >= 1.0
    }

    /// Takes `n` more tokens, into debt if need be: the next [`Bucket::take`] waits until the
    /// debt is paid.
    pub fn charge(&mut self, n: u64, rate: Rate) {
        if n > 0 {
            self.refill(Instant::now(), rate);
            self.tokens -= n as f64;
        }
    }

    /// When the next token is there: a year on at most (a rate so low that its next token is
    /// further off, or past what an instant can hold, waits that long, and does not panic).
    pub fn next_token_at(&self, rate: Rate) -> Instant {
        const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let missing = (1.0 - self.tokens).max(0.0);
        let wait = Duration::try_from_secs_f64(missing / rate.per_sec).map_or(FAR, |w| w.min(FAR));
        self.last + wait
    }
}

/// A listener that admits connections within the limits.
pub struct Admission {
    inner: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    open: Arc<AtomicUsize>,
    per_source: ConnectRates,
    counters: Arc<Counters>,
    /// `limits.registration_pool`, and who drew from it.
    pool: Arc<Pool>,
}

impl Admission {
    pub fn new(inner: TcpListener, limits: Limits, counters: Arc<Counters>) -> Self {
        Self {
            inner,
            tls: None,
            pool: Arc::new(Pool::new(limits.registration_pool)),
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            per_source: ConnectRates::default(),
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
        let Some(source) = pool_key(ip, self.limits.limit_loopback) else {
            return true;
        };
        let rate = Rate::new(self.limits.connects_per_sec, self.limits.connect_burst);
        self.per_source.admit(source, rate, Instant::now())
    }
}

/// New connections per source, a token bucket each: an IPv4 address, an IPv6 /64 (one host's
/// usual allocation: a host holds billions of addresses in it, each would otherwise be a
/// fresh burst). At most [`MAX_TRACKED_ADDRS`] sources are remembered.
#[derive(Debug, Default)]
struct ConnectRates {
    buckets: HashMap<IpAddr, Bucket>,
}

impl ConnectRates {
    /// Takes a token of `source` at `now`, if it has one.
    fn admit(&mut self, source: IpAddr, rate: Rate, now: Instant) -> bool {
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_TRACKED_ADDRS {
            self.make_room(rate, now);
        }
        self.buckets
            .entry(source)
            .or_insert_with(|| Bucket::full(rate))
            .take(now, rate)
    }

    /// Forgets the sources whose bucket is full again; if fewer than an eighth of the table
    /// were, also the least recently seen, to an eighth: so a source's turn to be forgotten
    /// comes after thousands of other sources, and a table filled and emptied costs a pass per
    /// eighth of it.
    fn make_room(&mut self, rate: Rate, now: Instant) {
        self.buckets.retain(|_, b| !b.full_by(now, rate));
        let room = MAX_TRACKED_ADDRS / 8;
        let over = (self.buckets.len() + room).saturating_sub(MAX_TRACKED_ADDRS);
        if over == 0 {
            return;
        }
        let mut seen: Vec<(Instant, IpAddr)> =
            self.buckets.iter().map(|(ip, b)| (b.last, *ip)).collect();
        seen.select_nth_unstable_by_key(over - 1, |&(last, _)| last);
        for (_, ip) in &seen[..over] {
            self.buckets.remove(ip);
        }
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
            let entry = Arc::new(Entry::new(
                self.pool.clone(),
                pool_key(addr.ip(), self.limits.limit_loopback),
            ));
            let tcp = Counted {
                tcp,
                entry: entry.clone(),
            };
            let tcp = match &self.tls {
                None => Stream::Plain(tcp),
                Some(acceptor) => Stream::Handshaking(Box::pin(acceptor.accept(tcp))),
            };
            let io = Guarded {
                tcp,
                open: self.open.clone(),
                deadline: Some(Box::pin(tokio::time::sleep(self.limits.handshake_timeout))),
                awaiting_answer: true,
                head: Head::Waiting,
                target: Target::Method(false),
                dropped: 0,
                moved: Instant::now(),
                stalled_since: None,
                slack: self.limits.http_idle,
                handshake_timeout: self.limits.handshake_timeout,
                http_idle: self.limits.http_idle,
                min_rate: self.limits.min_answer_rate,
                counters: self.counters.clone(),
                entry,
                entry_read: 0,
            };
            return (io, addr);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// What a request learns of its connection (axum's `ConnectInfo`): the peer's address, and the
/// connection's budget before registration, which the worker endpoint arms at its upgrade.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub entry: Arc<Entry>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Admission>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Admission>) -> Self {
        Peer {
            addr: *stream.remote_addr(),
            entry: stream.io().entry.clone(),
        }
    }
}

/// A connection's reading before its WebSocket session registered: shared by the connection,
/// which counts what it reads while armed, and the session, which ends it.
pub struct Entry {
    state: AtomicU8,
    /// Bytes taken from the pool, given back when the session registers or the connection ends.
    drawn: AtomicUsize,
    pool: Arc<Pool>,
    /// Whose share of the pool it draws on; `None`: no share (loopback, unless limited).
    key: Option<IpAddr>,
    /// Bytes read from the connection's socket so far (under TLS: ciphertext, as it comes),
    /// all along its life: the session tells a frame still arriving from a silent link by it.
    read: AtomicU64,
    /// Bytes written to the connection's socket so far (under TLS, as `read`): the session
    /// tells a write into a slow link, taking bytes, from a stalled one by it.
    written: AtomicU64,
}

/// Bytes shared by the connections reading past their own budget before registration. One
/// source (an IPv4 address, an IPv6 /64) holds at most an eighth of it at once, so that a
/// client that never registers cannot keep every honest worker's long registration out.
pub struct Pool {
    left: AtomicUsize,
    share: usize,
    drawn_by: std::sync::Mutex<HashMap<IpAddr, usize>>,
}

/// The source a connection from `ip` counts as, for its connection rate and its share of the
/// registration pool: an IPv4 address (also one mapped into IPv6), an IPv6 address by its /64
/// (one host's usual allocation); none for loopback unless loopback is limited too.
fn pool_key(ip: IpAddr, limit_loopback: bool) -> Option<IpAddr> {
    let ip = ip.to_canonical();
    if ip.is_loopback() && !limit_loopback {
        return None;
    }
    Some(match ip {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    })
}

/// The part of the pool one source may hold: 1 / this.
const POOL_SHARES: usize = 8;

impl Pool {
    pub fn new(bytes: usize) -> Self {
        Self {
            left: AtomicUsize::new(bytes),
            share: bytes / POOL_SHARES,
            drawn_by: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn drawn_by(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.drawn_by.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `n` bytes for `key`'s connection, within its share; false if either is short.
    fn draw(&self, key: Option<IpAddr>, n: usize) -> bool {
        let mut by = key.map(|_| self.drawn_by());
        if let (Some(by), Some(k)) = (&mut by, key)
            && by.get(&k).copied().unwrap_or(0).saturating_add(n) > self.share
        {
            return false;
        }
        let taken = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            })
            .is_ok();
        if taken && let (Some(by), Some(k)) = (&mut by, key) {
            *by.entry(k).or_default() += n;
        }
        taken
    }

    fn give_back(&self, key: Option<IpAddr>, n: usize) {
        if let Some(k) = key {
            let mut by = self.drawn_by();
            if let Some(d) = by.get_mut(&k) {
                *d = d.saturating_sub(n);
                if *d == 0 {
                    by.remove(&k);
                }
            }
        }
        self.left.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes left.
    pub fn left(&self) -> usize {
        self.left.load(Ordering::Relaxed)
    }
}

/// Not armed: an HTTP connection (or one whose upgrade is being answered).
const ENTRY_HTTP: u8 = 0;
/// A WebSocket whose session has not registered: reads are counted.
const ENTRY_ARMED: u8 = 1;
/// Registered: nothing counted any more.
const ENTRY_REGISTERED: u8 = 2;
/// Over its budget: every read fails.
const ENTRY_OVER: u8 = 3;

impl Entry {
    fn new(pool: Arc<Pool>, key: Option<IpAddr>) -> Self {
        Self {
            state: AtomicU8::new(ENTRY_HTTP),
            drawn: AtomicUsize::new(0),
            pool,
            key,
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    /// Bytes read from the connection so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// The count of bytes written to the connection so far, as it moves.
    pub fn written(&self) -> &AtomicU64 {
        &self.written
    }

    /// From now on the connection's reads count against its budget (the worker endpoint, as it
    /// answers an upgrade).
    pub fn arm(&self) {
        let _ = self.state.compare_exchange(
            ENTRY_HTTP,
            ENTRY_ARMED,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The session registered: nothing is counted any more, and what it drew goes back.
    pub fn registered(&self) {
        if self
            .state
            .compare_exchange(
                ENTRY_ARMED,
                ENTRY_REGISTERED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            self.give_back();
        }
    }

    fn give_back(&self) {
        let drawn = self.drawn.swap(0, Ordering::Relaxed);
        if drawn > 0 {
            self.pool.give_back(self.key, drawn);
        }
    }

    /// Counts `n` more bytes read (`read` so far, kept by the connection): past the
    /// connection's own budget, the rest is drawn from the pool, and when the pool cannot cover
    /// it the connection is over for good.
    fn count(&self, read: &mut usize, n: usize) -> Count {
        match self.state.load(Ordering::Relaxed) {
            ENTRY_ARMED => {}
            ENTRY_OVER => return Count::Over,
            _ => return Count::Within,
        }
        *read = read.saturating_add(n);
        let want = read
            .saturating_sub(PRE_REGISTRATION_BYTES)
            .saturating_sub(self.drawn.load(Ordering::Relaxed));
        if want == 0 {
            return Count::Within;
        }
        if self.pool.draw(self.key, want) {
            self.drawn.fetch_add(want, Ordering::Relaxed);
            return Count::Within;
        }
        self.state.store(ENTRY_OVER, Ordering::Relaxed);
        self.give_back();
        Count::Overflowed
    }
}

/// What a read did to its connection's budget before registration.
#[derive(Debug, PartialEq, Eq)]
enum Count {
    Within,
    /// This read went past it.
    Overflowed,
    /// An earlier one did.
    Over,
}

/// The read error of a connection over its budget before registration.
#[derive(Debug, thiserror::Error)]
#[error("more than {PRE_REGISTRATION_BYTES} bytes before registration")]
pub struct OverEntryBudget;

/// An admitted connection: counted while open. While it serves HTTP (until a worker session
/// takes it over), a request whose answer has not begun within the handshake deadline of its
/// first byte (of the accept, for the first request) closes it, and so does moving no byte
/// either way for `http_idle` otherwise (idle between requests, or a reader that stopped
/// reading its answer): a connection cannot be held open for ever by a client that sent one
/// request and went quiet. Nor can a reader that takes its answer a little at a time hold it
/// (and its turn of `http::HEAVY_AT_ONCE`): while writes wait for the reader, the time they
/// wait is paid from the connection's slack, which starts at `http_idle`, is earned back at
/// one second per `min_answer_rate` bytes written (up to `http_idle` again; [`Limits`], 64 KiB
/// by default), and closes the connection when it runs out (counted in `slow_http_closed`,
/// apart from the idle closes' `idle_http_closed`). The slack is the connection's, not an
/// answer's: a client cannot win it back by sending the next request in the middle of an answer.
pub struct Guarded {
    tcp: Stream,
    open: Arc<AtomicUsize>,
    /// The request's deadline while `awaiting_answer`, else the idle one (checked lazily
    /// against `moved`); `None` once a worker session took the connection over.
    deadline: Option<Pin<Box<Sleep>>>,
    /// A request is being read and its answer has not begun.
    awaiting_answer: bool,
    /// How far that request has come (see [`Head`]).
    head: Head,
    /// How far its target has come (see [`Target`]).
    target: Target,
    /// Bytes of a head whose target is over hyper's bound read and dropped so far.
    dropped: usize,
    /// When the answer last moved a byte (while not `awaiting_answer`).
    moved: Instant,
    /// Since when the answer's last write has been waiting for the reader to make room.
    stalled_since: Option<Instant>,
    /// How much longer writes may wait for the reader (see [`Guarded`]), not counting the
    /// wait since `stalled_since`.
    slack: Duration,
    handshake_timeout: Duration,
    http_idle: Duration,
    /// `Limits::min_answer_rate`: bytes written that earn back a second of slack.
    min_rate: u64,
    counters: Arc<Counters>,
    entry: Arc<Entry>,
    /// Bytes read since `entry` was armed.
    entry_read: usize,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.entry.give_back();
    }
}

/// The byte stream under a connection: plain, or TLS once its handshake is done.
enum Stream {
    Plain(Counted),
    Handshaking(Pin<Box<tokio_rustls::Accept<Counted>>>),
    Tls(Box<tokio_rustls::server::TlsStream<Counted>>),
    Failed,
}

/// A connection's socket, counting the bytes read and written on it into its [`Entry`]:
/// under TLS, as they come and go, not a record at a time.
struct Counted {
    tcp: TcpStream,
    entry: Arc<Entry>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.entry.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.entry.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.entry.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
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

/// How far the request being read has come, read off its bytes as they pass: nothing yet, its
/// head (up to the blank line that ends it) begun, or its head whole. A request cut at its
/// deadline with its head unfinished was the client's to finish: it is answered `408` before
/// the connection closes. Past the head the coordinator cannot tell a slow body from a slow
/// answer, and a connection on which nothing was sent may be a browser's preconnection, which
/// would take a `408` written into it for the answer to its next request: those are closed
/// without a word, as every deadline's connection was before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    Waiting,
    /// Line feeds seen in a row at the end of what was read, carriage returns aside.
    Reading(u8),
    Whole,
}

impl Head {
    /// The state once `bytes` more of the request were read.
    fn after(self, bytes: &[u8]) -> Head {
        let mut feeds = match self {
            Head::Whole => return Head::Whole,
            Head::Waiting => 0,
            Head::Reading(feeds) => feeds,
        };
        for &b in bytes {
            match b {
                b'\n' if feeds == 1 => return Head::Whole,
                b'\n' => feeds = 1,
                b'\r' => {}
                _ => feeds = 0,
            }
        }
        Head::Reading(feeds)
    }
}

/// How far the target of the request being read has come, read off its request line as it
/// passes: its method, then its target (this many bytes so far), then the rest. hyper refuses a
/// target over its bound (`http::HYPER_MAX_TARGET`) with a bare `414` and no body, before any
/// of the coordinator's code sees it: one that long is answered here instead, in the API's
/// words, as [`http::target_limit`](crate::http::target_limit) answers a shorter one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Its method: begun (`true`), or only empty lines so far.
    Method(bool),
    Reading(usize),
    /// Past the target, within the bound.
    Done,
    /// Over the bound: the request is refused.
    TooLong,
}

impl Target {
    /// The state once `bytes` more of the request were read.
    fn after(self, mut bytes: &[u8]) -> Target {
        let mut state = self;
        loop {
            match state {
                Target::Done | Target::TooLong => return state,
                Target::Method(begun) => {
                    let Some(at) = bytes.iter().position(|&b| matches!(b, b' ' | b'\n')) else {
                        let begun = begun || bytes.iter().any(|&b| b != b'\r');
                        return Target::Method(begun);
                    };
                    let begun = begun || bytes[..at].iter().any(|&b| b != b'\r');
                    state = match bytes[at] {
                        b' ' => Target::Reading(0),
                        // A line without a target: the parser's to refuse.
                        _ if begun => Target::Done,
                        // Empty lines before the request line are passed over, as the parser
                        // does.
                        _ => Target::Method(false),
                    };
                    bytes = &bytes[at + 1..];
                }
                Target::Reading(n) => {
                    let end = bytes
                        .iter()
                        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'));
                    let n = n.saturating_add(end.unwrap_or(bytes.len()));
                    return match end {
                        _ if n > crate::http::HYPER_MAX_TARGET => Target::TooLong,
                        Some(_) => Target::Done,
                        None => Target::Reading(n),
                    };
                }
            }
        }
    }
}

/// Bytes of a request head whose target is over hyper's bound read and dropped at most before
/// it is answered: hyper's own buffer for a head is about 400 KiB.
const DROPPED_MOST: usize = 512 * 1024;

/// The answer to a request whose target is over hyper's bound, closing the connection.
fn uri_too_long_answer() -> Vec<u8> {
    let message = crate::http::target_too_long(&format!("over {}", crate::http::HYPER_MAX_TARGET));
    let body = serde_json::json!({"error": {"code": "uri_too_long", "message": message}});
    closing_answer("414 URI Too Long", &body.to_string())
}

/// An answer of `status` with the JSON `body`, closing the connection.
fn closing_answer(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The answer to a request whose head was not whole by its deadline, closing the connection.
fn request_timeout_answer(deadline: Duration) -> Vec<u8> {
    let body = format!(
        "{{\"error\":{{\"code\":\"request_timeout\",\"message\":\"the request's head was not complete within {} s (the handshake deadline)\"}}}}",
        deadline.as_secs_f64()
    );
    closing_answer("408 Request Timeout", &body)
}

impl Guarded {
    /// Writes `answer`, which closes the connection, as far as the socket takes it now (a
    /// connection that has written nothing has room for it), over TLS when the connection has
    /// it.
    fn answer_closing(&mut self, cx: &mut Context<'_>, answer: &[u8]) {
        // Once: the error that follows ends the connection, however often it is polled.
        self.head = Head::Whole;
        if !matches!(self.tcp, Stream::Plain(_) | Stream::Tls(_)) {
            return;
        }
        let mut io = self.tcp.io();
        if let Poll::Ready(Ok(n)) = io.as_mut().poll_write(cx, answer) {
            if n < answer.len() {
                tracing::debug!(
                    written = n,
                    "an answer closing its connection was cut short"
                );
            }
            let _ = io.as_mut().poll_flush(cx);
        }
    }

    /// A request whose target is over hyper's bound: what is left of its head is read and
    /// dropped (closed with bytes unread, the connection would be reset, and the client could
    /// lose the answer), up to [`DROPPED_MOST`] bytes and the request's deadline, then it is
    /// answered `414 uri_too_long` and the read fails, closing the connection.
    fn refuse_long_target(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 4096];
        // Bounded: each turn reads a byte at least, or returns.
        while self.head != Head::Whole && self.dropped <= DROPPED_MOST {
            let mut read = ReadBuf::new(&mut scratch);
            match self.tcp.io().poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => break,
                Poll::Ready(Ok(())) => {
                    self.dropped += read.filled().len();
                    self.head = self.head.after(read.filled());
                }
            }
        }
        self.answer_closing(cx, &uri_too_long_answer());
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request target over hyper's bound",
        )))
    }

    /// The error that closes the connection when its deadline passed (see [`Guarded`]); polls
    /// the deadline so that this task wakes when it does.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let deadline = self.deadline.as_mut()?;
        if self.entry.state.load(Ordering::Relaxed) != ENTRY_HTTP {
            // A worker session's: its own liveness and limits govern it.
            self.deadline = None;
            return None;
        }
        loop {
            deadline.as_mut().poll(cx).is_ready().then_some(())?;
            if self.awaiting_answer {
                self.counters
                    .slow_handshakes
                    .fetch_add(1, Ordering::Relaxed);
                if self.target == Target::TooLong {
                    self.answer_closing(cx, &uri_too_long_answer());
                } else if matches!(self.head, Head::Reading(_)) {
                    self.answer_closing(cx, &request_timeout_answer(self.handshake_timeout));
                }
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request not complete by the handshake deadline",
                ));
            }
            let now = Instant::now();
            let idle_until = self.moved + self.http_idle;
            if idle_until <= now {
                self.counters
                    .idle_http_closed
                    .fetch_add(1, Ordering::Relaxed);
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "HTTP connection idle past its deadline",
                ));
            }
            let slow_until = self.stalled_since.map(|since| since + self.slack);
            if slow_until.is_some_and(|until| until <= now) {
                self.counters
                    .slow_http_closed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    written = self.entry.written.load(Ordering::Relaxed),
                    min_rate = self.min_rate,
                    "HTTP connection closed: its reader took its answer too slowly"
                );
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "HTTP answer read slower than its minimum rate",
                ));
            }
            // Bytes moved since it was set: it moves on, and is polled again to wait.
            deadline
                .as_mut()
                .reset(slow_until.map_or(idle_until, |slow| slow.min(idle_until)));
        }
    }

    /// A write of an answer found no room: the wait is paid from the slack from now on, and
    /// the deadline comes no later than the slack's end. The error when it has already run out.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.awaiting_answer || self.stalled_since.is_some() {
            return None;
        }
        let deadline = self.deadline.as_mut()?;
        let now = Instant::now();
        self.stalled_since = Some(now);
        let slow_until = now + self.slack;
        if slow_until < deadline.deadline() {
            deadline.as_mut().reset(slow_until);
        }
        // Polled with this task's context, so that it wakes when the slack runs out.
        self.expired(cx)
    }

    /// What a write came to, as the answer's pace sees it: bytes written ([`Self::wrote`]),
    /// or no room, paid from the slack ([`Self::stalled`]), the write failing once it is spent.
    fn paced(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => self.wrote(n),
            Poll::Pending => {
                if let Some(e) = self.stalled(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            Poll::Ready(Err(_)) => {}
        }
        r
    }

    /// `n` bytes were written: of an answer, the request's deadline gives way to the idle
    /// one (the socket's [`Counted`] counts them).
    fn wrote(&mut self, n: usize) {
        if n == 0 || self.deadline.is_none() {
            return;
        }
        self.moved = Instant::now();
        if let Some(since) = self.stalled_since.take() {
            self.slack = self
                .slack
                .saturating_sub(self.moved.saturating_duration_since(since));
        }
        let earned = Duration::from_secs_f64(n as f64 / self.min_rate as f64);
        self.slack = self.slack.saturating_add(earned).min(self.http_idle);
        if self.awaiting_answer {
            self.awaiting_answer = false;
            if let Some(d) = self.deadline.as_mut() {
                d.as_mut().reset(self.moved + self.http_idle);
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        ready_or_return!(self.tcp, cx);
        if self.target == Target::TooLong {
            return self.refuse_long_target(cx);
        }
        let before = buf.filled().len();
        let r = self.tcp.io().poll_read(cx, buf);
        let n = buf.filled().len() - before;
        let this = &mut *self;
        if n > 0 && !this.awaiting_answer && this.deadline.is_some() {
            // The next request: its answer must begin within the handshake deadline.
            this.awaiting_answer = true;
            this.head = Head::Waiting;
            this.target = Target::Method(false);
            if let Some(d) = this.deadline.as_mut() {
                d.as_mut().reset(Instant::now() + this.handshake_timeout);
            }
        }
        if n > 0 && this.awaiting_answer && this.head != Head::Whole && this.deadline.is_some() {
            let read = &buf.filled()[before..];
            this.head = this.head.after(read);
            this.target = this.target.after(read);
            if this.target == Target::TooLong {
                // hyper never sees it, nor answers it.
                buf.set_filled(before);
                return this.refuse_long_target(cx);
            }
        }
        let count = match n {
            0 => Count::Within,
            n => this.entry.count(&mut this.entry_read, n),
        };
        if count == Count::Within {
            return r;
        }
        if count == Count::Overflowed {
            this.counters
                .pre_registration_overflows
                .fetch_add(1, Ordering::Relaxed);
        }
        // What was read is dropped: the session learns of the budget from the error.
        buf.set_filled(before);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            OverEntryBudget,
        )))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        ready_or_return!(self.tcp, cx);
        let r = self.tcp.io().poll_write(cx, buf);
        self.paced(cx, r)
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
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        ready_or_return!(self.tcp, cx);
        let r = self.tcp.io().poll_write_vectored(cx, bufs);
        self.paced(cx, r)
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

    /// Under TLS, a connection counts the bytes on its socket (ciphertext, the handshake's
    /// too), as they come and go: each side's count read is the other's count written, and
    /// more than the plaintext carried.
    #[tokio::test]
    async fn under_tls_the_bytes_counted_are_those_on_the_socket() {
        use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![made.cert.der().clone()], key.into())
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let counted = |tcp| Counted {
            tcp,
            entry: Arc::new(Entry::new(Arc::new(Pool::new(0)), None)),
        };
        let server_side = counted(accepted.expect("accept").0);
        let client_side = counted(dialed.expect("connect"));
        let (s_entry, c_entry) = (server_side.entry.clone(), client_side.entry.clone());
        let name = ServerName::try_from("localhost").expect("name");
        let (s, c) = tokio::join!(
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(server_side),
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, client_side),
        );
        let (mut s, mut c) = (s.expect("server handshake"), c.expect("client handshake"));
        const SENT: usize = 100 * 1024;
        let (echoed, back) = tokio::join!(
            async {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.expect("server read");
                s.write_all(&got).await.expect("server write");
                s.shutdown().await.expect("server shutdown");
                got.len()
            },
            async {
                c.write_all(&[7; SENT]).await.expect("client write");
                c.shutdown().await.expect("client shutdown");
                let mut back = Vec::new();
                c.read_to_end(&mut back).await.expect("client read");
                back.len()
            },
        );
        assert_eq!((echoed, back), (SENT, SENT));
        assert_eq!(
            s_entry.bytes_read(),
            c_entry.written().load(Ordering::Relaxed)
        );
        assert_eq!(
            c_entry.bytes_read(),
            s_entry.written().load(Ordering::Relaxed)
        );
        assert!(
            s_entry.bytes_read() > SENT as u64,
            "{}",
            s_entry.bytes_read()
        );
        assert!(
            c_entry.bytes_read() > SENT as u64,
            "{}",
            c_entry.bytes_read()
        );
    }

    #[test]
    fn a_request_head_is_whole_at_its_blank_line_however_the_bytes_are_cut() {
        let head = b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{\"a\": 1}";
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").expect("end") + 4;
        // Read in pieces of every size, the head is whole exactly when its last byte is read.
        for piece in 1..=head.len() {
            let mut state = Head::Waiting;
            let mut read = 0;
            for chunk in head.chunks(piece) {
                let was_whole = state == Head::Whole;
                state = state.after(chunk);
                read += chunk.len();
                if !was_whole {
                    assert_eq!(
                        state == Head::Whole,
                        read >= end,
                        "pieces of {piece}, {read} read"
                    );
                }
            }
        }
        // Bare line feeds end it too (as the parser allows); a lone return or a dribble of
        // header lines does not.
        assert_eq!(
            Head::Waiting.after(b"GET / HTTP/1.1\nHost: x\n\n"),
            Head::Whole
        );
        assert_eq!(
            Head::Waiting.after(b"GET / HTTP/1.1\r\n\r"),
            Head::Reading(1)
        );
        let mut dribble = Head::Waiting.after(b"GET / HTTP/1.1\r\n");
        for n in 0..100 {
            dribble = dribble.after(format!("X-Slow-{n}: 1\r\n").as_bytes());
            assert_eq!(dribble, Head::Reading(1));
        }
        assert_eq!(Head::Waiting.after(b""), Head::Reading(0));
    }

    /// A target over hyper's bound is told from the bytes of its request line however they
    /// are cut, and one at the bound is not: it is hyper's to read, and the API's to refuse.
    #[test]
    fn a_target_over_hypers_bound_is_found_however_the_bytes_are_cut() {
        let bound = crate::http::HYPER_MAX_TARGET;
        for (len, want) in [(bound, Target::Done), (bound + 1, Target::TooLong)] {
            let head = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "x".repeat(len - 1));
            for piece in [1, 7, 4096, head.len()] {
                let mut state = Target::Method(false);
                for chunk in head.as_bytes().chunks(piece) {
                    state = state.after(chunk);
                }
                assert_eq!(
                    state, want,
                    "a target of {len} bytes read in pieces of {piece}"
                );
            }
        }
        // Empty lines before the request line are passed over; a line without a version ends
        // its target; a request not yet past its method has none yet; a line without a target
        // has none, and a long header after it is not taken for one.
        let at_once = |bytes: &[u8]| Target::Method(false).after(bytes);
        assert_eq!(at_once(b"\r\nGET /a\r\n"), Target::Done);
        assert_eq!(at_once(b"\r\n").after(b"\r\nGET /a\r\n"), Target::Done);
        assert_eq!(at_once(b"GET /a"), Target::Reading(2));
        assert_eq!(at_once(b"GE"), Target::Method(true));
        assert_eq!(at_once(b"GE").after(b"T\r\nX: y\r\n"), Target::Done);
        let header = format!("X: {}\r\n", "y".repeat(bound + 1));
        assert_eq!(at_once(b"GET\r\n").after(header.as_bytes()), Target::Done);
    }

    #[test]
    fn the_408_answer_is_one_whole_http_response_that_closes() {
        let answer =
            String::from_utf8(request_timeout_answer(Duration::from_millis(2500))).expect("utf-8");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
        assert!(
            head.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(v["error"]["code"], "request_timeout");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("text")
                .contains("2.5 s"),
            "{v}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate::new(10.0, 3);
        let mut b = Bucket::full(rate);
        let now = Instant::now();
        assert!(b.take(now, rate) && b.take(now, rate) && b.take(now, rate));
        assert!(!b.take(now, rate));
        assert_eq!(b.next_token_at(rate), now + Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.take(Instant::now(), rate));
        assert!(!b.take(Instant::now(), rate));
        tokio::time::advance(Duration::from_secs(60)).await;
        let now = Instant::now();
        assert!(b.take(now, rate) && b.take(now, rate) && b.take(now, rate));
        assert!(!b.take(now, rate), "never more than the burst saved up");
    }

    /// A rate too low for its next token to be an instant (validation refuses 0, but any
    /// positive rate passes) waits a year at most, and never panics.
    #[tokio::test(start_paused = true)]
    async fn the_next_token_of_a_vanishing_rate_is_far_off_not_a_panic() {
        for per_sec in [1e-300, 0.0, -1.0, f64::NAN] {
            let rate = Rate::new(per_sec, 1);
            let mut b = Bucket::full(rate);
            let now = Instant::now();
            assert!(b.take(now, rate));
            assert!(!b.take(now, rate));
            let at = b.next_token_at(rate);
            assert!(at > now + Duration::from_secs(3600), "{per_sec}");
            assert!(
                at <= now + Duration::from_secs(366 * 24 * 3600),
                "{per_sec}"
            );
        }
    }

    /// The connection rate is per source: the addresses of one IPv6 /64 share one bucket (a
    /// host holds billions of them), an IPv4 address is its own source whether mapped into
    /// IPv6 or not, and loopback is not limited unless asked.
    #[tokio::test(start_paused = true)]
    async fn the_connection_rate_is_per_ipv4_address_and_per_ipv6_64() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let limits = Limits {
            connects_per_sec: 0.001,
            connect_burst: 2,
            ..Limits::default()
        };
        let mut a = Admission::new(listener, limits, Arc::new(Counters::default()));
        let mut admit = |ip: &str| a.admit(ip.parse().expect("ip"));
        assert!(admit("2001:db8::1") && admit("2001:db8::2:1"));
        assert!(!admit("2001:db8::ffff:ffff:ffff:ffff"), "the same /64");
        assert!(admit("2001:db8:0:1::1"), "another /64");
        assert!(admit("192.0.2.1") && admit("::ffff:192.0.2.1"));
        assert!(!admit("192.0.2.1"), "a mapped IPv4 address is that address");
        assert!(admit("192.0.2.2"), "another IPv4 address");
        assert!((0..10).all(|_| admit("127.0.0.1") && admit("::1")));
    }

    /// However many other sources connect, one over its rate stays over it: the table
    /// forgets sources whose bucket is full again, then the least recently seen, never every
    /// source at once (which gave a source over its rate a fresh burst). Its size stays bounded.
    #[test]
    fn a_source_over_its_rate_stays_limited_while_ten_thousand_others_connect() {
        let rate = Rate::new(0.001, 2);
        let mut t = ConnectRates::default();
        let start = Instant::now();
        let hot: IpAddr = [192, 0, 2, 1].into();
        assert!(t.admit(hot, rate, start) && t.admit(hot, rate, start));
        let mut hot_admitted = 0;
        for i in 0..10_000u32 {
            let now = start + Duration::from_millis(u64::from(i) + 1);
            let other = IpAddr::from((0x0a00_0000_u32 + i).to_be_bytes());
            assert!(t.admit(other, rate, now), "a new source has its burst");
            assert!(t.buckets.len() <= MAX_TRACKED_ADDRS);
            if i % 100 == 0 && t.admit(hot, rate, now) {
                hot_admitted += 1;
            }
        }
        assert_eq!(
            hot_admitted, 0,
            "10 s at 0.001 a second earns no connection"
        );
        assert!(t.buckets.contains_key(&hot));
        // Sources whose bucket is full again go first: at a rate that refills in half a
        // second, every source seen since is kept.
        let quick = Rate::new(2.0, 2);
        let mut t = ConnectRates::default();
        let source = |i: u32| IpAddr::from((0x0a00_0000_u32 + i).to_be_bytes());
        for i in 0..10_000u32 {
            let now = start + Duration::from_millis(u64::from(i));
            assert!(t.admit(source(i), quick, now));
            assert!(t.buckets.len() <= MAX_TRACKED_ADDRS);
        }
        assert!((9_500..10_000).all(|i| t.buckets.contains_key(&source(i))));
    }

    /// A connection reads within its own budget, then draws from the pool; past what the pool
    /// has it is over for good. What it drew goes back when its session registers or the
    /// connection ends, and an HTTP connection (never armed) is not counted at all.
    #[test]
    fn a_connection_before_registration_reads_its_budget_then_the_pool_and_gives_back_what_it_drew()
    {
        let own = PRE_REGISTRATION_BYTES;
        let pool = Arc::new(Pool::new(100));
        let left = || pool.left();

        let http = Entry::new(pool.clone(), None);
        let mut read = 0;
        assert_eq!(http.count(&mut read, 64 << 20), Count::Within);
        assert_eq!((read, left()), (0, 100));

        let ws = Entry::new(pool.clone(), None);
        ws.arm();
        let mut read = 0;
        assert_eq!(ws.count(&mut read, own), Count::Within);
        assert_eq!(left(), 100, "its own budget");
        assert_eq!(ws.count(&mut read, 60), Count::Within);
        assert_eq!(left(), 40);
        let other = Entry::new(pool.clone(), None);
        other.arm();
        let mut other_read = 0;
        assert_eq!(other.count(&mut other_read, own + 50), Count::Overflowed);
        assert_eq!(other.count(&mut other_read, 1), Count::Over);
        assert_eq!(left(), 40, "nothing drawn by the one refused");
        ws.registered();
        assert_eq!(left(), 100, "given back at registration");
        assert_eq!(ws.count(&mut read, 64 << 20), Count::Within);
        assert_eq!(left(), 100, "nothing counted once registered");

        let dropped = Entry::new(pool.clone(), None);
        dropped.arm();
        let mut read = 0;
        assert_eq!(dropped.count(&mut read, own + 30), Count::Within);
        assert_eq!(left(), 70);
        dropped.give_back();
        assert_eq!(left(), 100, "given back when the connection ends");
    }

    /// One source holds at most an eighth of the pool, however many connections it opens;
    /// others still draw, and a share comes back as its connections give back.
    #[test]
    fn one_source_holds_at_most_an_eighth_of_the_registration_pool() {
        let own = PRE_REGISTRATION_BYTES;
        let pool = Arc::new(Pool::new(800));
        let attacker = Some(IpAddr::from([192, 0, 2, 1]));
        let honest = Some(IpAddr::from([198, 51, 100, 7]));
        let armed = |key| {
            let e = Entry::new(pool.clone(), key);
            e.arm();
            e
        };
        let (a1, a2) = (armed(attacker), armed(attacker));
        let (mut r1, mut r2) = (0, 0);
        assert_eq!(a1.count(&mut r1, own + 60), Count::Within);
        assert_eq!(
            a2.count(&mut r2, own + 41),
            Count::Overflowed,
            "past its share"
        );
        assert_eq!(pool.left(), 740);
        let h = armed(honest);
        let mut rh = 0;
        assert_eq!(h.count(&mut rh, own + 100), Count::Within, "its own share");
        assert_eq!(pool.left(), 640);
        a1.give_back();
        let a3 = armed(attacker);
        let mut r3 = 0;
        assert_eq!(
            a3.count(&mut r3, own + 100),
            Count::Within,
            "its share back"
        );
        // An IPv6 source is its /64; a mapped IPv4 address is that address; loopback has no
        // share unless limited.
        let key = |ip: &str, limited| pool_key(ip.parse().expect("ip"), limited);
        assert_eq!(key("2001:db8::1", false), key("2001:db8::ffff:1", false));
        assert_ne!(key("2001:db8::1", false), key("2001:db8:0:1::1", false));
        assert_eq!(key("::ffff:192.0.2.1", false), attacker);
        assert_eq!(key("127.0.0.1", false), None);
        assert_eq!(key("::1", false), None);
        assert!(key("127.0.0.1", true).is_some());
    }
}
