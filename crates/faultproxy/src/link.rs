//! One accepted connection ("link"): learn the worker id, wait while a blackhole holds the
//! link back (a lost SYN), connect upstream, move the bytes (direct while no fault applies,
//! `direct.rs`; else, or once one does, through the four pump tasks), then close the sockets
//! the way the link ended (FIN, or RST after a reset).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tether_proto::WorkerId;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::direct::{self, End, Pipe, State};
use crate::fault::Stream;
use crate::gate::LogGate;
use crate::pump::{CHUNK_SIZE, FIRST_READ, Writer, outcome_of, queue, read_loop, sleep_opt};
use crate::sniff::{Sniffed, sniff};
use crate::stage::{Chain, Chunk, Draws, FaultEntry, Stages, mix};
use crate::stats::{ProxyCounters, add};

/// Longest wait for the upstream to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Source addresses (127.0.0.1 ..= 127.0.0.N) a proxy spreads its connections to a loopback
/// upstream over, on Linux. From one address, every connection to the one upstream port needs a
/// port of its own, and the kernel finds each by a walk over the ones in use: with 10,000
/// workers' links and their closed predecessors in TIME_WAIT, that walk
/// (`__inet_hash_connect`) was two thirds of the proxies' CPU (docs/PERFORMANCE.md, nineteenth
/// round). Elsewhere (macOS, the BSDs) only 127.0.0.1 is configured on the loopback, so the
/// kernel picks the source as for any connection.
pub const LOOPBACK_SOURCES: u8 = 16;

/// The source address link `id` connects to `upstream` from: for a loopback IPv4 upstream on
/// Linux (where all of 127.0.0.0/8 is the loopback's), one of [`LOOPBACK_SOURCES`] by the id.
#[cfg(target_os = "linux")]
fn loopback_source(upstream: SocketAddr, id: u64) -> Option<Ipv4Addr> {
    match upstream {
        SocketAddr::V4(a) if a.ip().is_loopback() => Some(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (id % u64::from(LOOPBACK_SOURCES)) as u8,
        )),
        _ => None,
    }
}

/// The source address link `id` connects to `upstream` from: the kernel's choice, since only
/// 127.0.0.1 exists on this system's loopback (127.0.0.2 and on cannot be bound).
#[cfg(not(target_os = "linux"))]
fn loopback_source(_upstream: SocketAddr, _id: u64) -> Option<Ipv4Addr> {
    None
}

/// Connects link `id` to `upstream`, from the source address [`loopback_source`] picks.
async fn connect_upstream(upstream: SocketAddr, id: u64) -> std::io::Result<TcpStream> {
    match loopback_source(upstream, id) {
        Some(source) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source.into(), 0))?;
            socket.connect(upstream).await
        }
        None => TcpStream::connect(upstream).await,
    }
}

/// A live link, as listed by [`crate::Proxy::links`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkInfo {
    /// Number of the link within its proxy, from 1, never reused.
    pub id: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The worker named by the link's upgrade request, once known.
    pub worker: Option<WorkerId>,
    /// Whether the link has its upstream connection: not yet while its first bytes are read,
    /// nor while a blackhole on its upstream stream holds it back (see the blackhole fault).
    pub connected: bool,
}

/// The live links of one proxy.
pub(crate) type Registry = Arc<Mutex<BTreeMap<u64, LinkInfo>>>;

/// How a link ended, and so how its sockets close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// FIN (or whatever the kernel sends on close).
    Close,
    /// RST: `SO_LINGER` 0 on both sockets.
    Reset,
}

/// What every task of a link shares: how to end it, and how it ended.
#[derive(Debug)]
pub(crate) struct LinkCtl {
    pub id: u64,
    cancel: CancellationToken,
    /// How the link ended, and the fault that ended it, if one did.
    outcome: Mutex<Option<(Outcome, Option<Arc<FaultEntry>>)>>,
    /// Bytes read from either side that were not delivered to the other: counted, once the
    /// link's tasks are done, as dropped by the fault that ended it ([`LinkCtl::settle`]).
    undelivered: std::sync::atomic::AtomicUsize,
    /// The proxy's counters: a fault's close counts in its proxy's fault totals too.
    counters: Arc<ProxyCounters>,
    /// How far each stream got towards its end; one lock, so that a reset found after the
    /// stream's FIN was passed on is never missed by both sides.
    ends: Mutex<Ends>,
    /// Per stream: signalled when its source turns out to have been reset, so that its writer
    /// stops holding or delaying a FIN that is now a reset.
    reset_found: [Notify; 2],
}

/// Per stream (upstream, downstream) of a link.
#[derive(Debug, Default)]
struct Ends {
    /// The sender's FIN was passed on.
    passed: [bool; 2],
    /// The source's peer reset its connection.
    reset: [bool; 2],
}

impl LinkCtl {
    /// Ends the link. The first caller decides the outcome; `by` is the fault that asked, and
    /// the close counts for it and in its proxy's fault totals.
    pub fn close(&self, outcome: Outcome, by: Option<&Arc<FaultEntry>>) {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some((outcome, by.cloned()));
            if let Some(e) = by {
                let (fault, proxy) = match outcome {
                    Outcome::Close => (
                        &e.counters.connections_closed,
                        &self.counters.faults.connections_closed,
                    ),
                    Outcome::Reset => (
                        &e.counters.connections_reset,
                        &self.counters.faults.connections_reset,
                    ),
                };
                add(fault, 1);
                add(proxy, 1);
            }
        }
        drop(slot);
        self.cancel.cancel();
    }

    /// One stream's end was passed on: once both were, the link ends (closed, no fault's);
    /// until then the stream's writer stays, for a reset fault on that stream still fires on
    /// a half-closed link. If the source of `stream` was found reset meanwhile (by a write to
    /// it), the link ends now, reset. Whether the link ends now.
    pub fn stream_ended(&self, stream: Stream) -> bool {
        let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        ends.passed[stream as usize] = true;
        let outcome = if ends.reset[stream as usize] {
            Some(Outcome::Reset)
        } else {
            ends.passed.iter().all(|p| *p).then_some(Outcome::Close)
        };
        drop(ends);
        if let Some(o) = outcome {
            self.close(o, None);
        }
        outcome.is_some()
    }

    /// The source of `stream` was reset by its peer, as its reader found (the reset is then on
    /// its way through the stream's queue) or a write to that socket did. The kernel reports a
    /// reset once, so in the second case the reader sees only the end of the stream, and the
    /// stream's writer turns that FIN, after the bytes read before it, into the reset (also a
    /// FIN it holds or delays already). A FIN already passed on is followed by the reset at
    /// once: the link ends.
    pub fn source_reset(&self, stream: Stream) {
        let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        ends.reset[stream as usize] = true;
        let passed = ends.passed[stream as usize];
        drop(ends);
        self.reset_found[stream as usize].notify_one();
        if passed {
            self.close(Outcome::Reset, None);
        }
    }

    /// Whether the source of `stream` was reset by its peer.
    pub fn was_reset(&self, stream: Stream) -> bool {
        self.ends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reset[stream as usize]
    }

    /// Resolves once the source of `stream` is found reset (or was, since the last call).
    pub async fn reset_found(&self, stream: Stream) {
        self.reset_found[stream as usize].notified().await;
    }

    /// Resolves once the link is closing.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// `n` bytes read from one side will not reach the other (the link is ending, or their
    /// sink is gone).
    pub fn undelivered(&self, n: usize) {
        self.undelivered
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts the bytes left undelivered as dropped by the fault that ended the link (a
    /// `limit_data` or a reset): the tails of its split chunks, the chunks still queued on
    /// either stream, a chunk a reader held. Called once every task of the link is done, so
    /// nothing more can be left.
    fn settle(&self) {
        let n = self
            .undelivered
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        let slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, Some(by))) = &*slot {
            add(&by.counters.bytes_dropped, n);
            add(&self.counters.faults.bytes_dropped, n);
        }
    }

    fn outcome(&self) -> Outcome {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(Outcome::Close, |(o, _)| *o)
    }
}

/// What a proxy hands each link.
pub(crate) struct LinkCtx {
    pub id: u64,
    pub proxy: Arc<str>,
    pub seed: u64,
    pub upstream: SocketAddr,
    pub chain: watch::Receiver<Chain>,
    pub counters: Arc<ProxyCounters>,
    /// Gates the proxy's "cannot reach upstream" warnings (one a second at most).
    pub upstream_warnings: Arc<LogGate>,
    pub registry: Registry,
    /// Cancelled when the proxy goes down.
    pub cancel: CancellationToken,
}

/// Removes the link from its registry and counts it closed, however the link task ends.
struct Registered {
    id: u64,
    registry: Registry,
    counters: Arc<ProxyCounters>,
}

impl Registered {
    fn set(&self, change: impl FnOnce(&mut LinkInfo)) {
        let mut links = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(info) = links.get_mut(&self.id) {
            change(info);
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.counters
            .connections_active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        add(&self.counters.connections_closed, 1);
    }
}

enum Half {
    Read(OwnedReadHalf),
    Write(OwnedWriteHalf),
}

/// Runs one link to its end.
pub(crate) async fn run(ctx: LinkCtx, client: TcpStream, peer: SocketAddr) {
    let span = tracing::debug_span!("link", proxy = %ctx.proxy, link = ctx.id, client = %peer,
        worker = tracing::field::Empty);
    run_inner(ctx, client, peer).instrument(span).await;
}

async fn run_inner(ctx: LinkCtx, client: TcpStream, peer: SocketAddr) {
    // When the client's SYN came, near enough.
    let accepted = Instant::now();
    ctx.registry
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(
            ctx.id,
            LinkInfo {
                id: ctx.id,
                client: peer,
                worker: None,
                connected: false,
            },
        );
    add(&ctx.counters.connections_active, 1);
    let registered = Registered {
        id: ctx.id,
        registry: Arc::clone(&ctx.registry),
        counters: Arc::clone(&ctx.counters),
    };
    // Small writes must not wait for Nagle: the faults decide the timing, not the kernel.
    if let Err(e) = client.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    let (mut client_rd, client_wr) = client.into_split();
    // The steps before the link is open are boxed, each for its own time: inline, the largest
    // (sniffing's read buffer, the blackhole's timers) sized this future, which lives as long
    // as the link.
    let mut first = tokio::select! {
        biased;
        () = ctx.cancel.cancelled() => return,
        s = Box::pin(sniff(&mut client_rd)) => s,
    };
    if let Some(w) = &first.worker {
        tracing::Span::current().record("worker", tracing::field::display(w));
    }
    registered.set(|info| info.worker.clone_from(&first.worker));

    let link = Arc::new(LinkCtl {
        id: ctx.id,
        cancel: ctx.cancel.child_token(),
        outcome: Mutex::new(None),
        undelivered: Default::default(),
        counters: Arc::clone(&ctx.counters),
        ends: Mutex::default(),
        reset_found: Default::default(),
    });
    let draws = Arc::new(Draws::new(ctx.seed, ctx.id, Arc::clone(&ctx.counters)));
    let stages = |stream: Stream| {
        Stages::new(
            stream,
            first.worker.clone(),
            Arc::clone(&draws),
            Arc::clone(&ctx.counters),
            mix(ctx.seed, ctx.id, stream as u64 + 1),
        )
    };
    let mut up_stages = stages(Stream::Upstream);
    let mut down_stages = stages(Stream::Downstream);
    let passage = Box::pin(withhold(
        &ctx,
        &link,
        [&mut up_stages, &mut down_stages],
        &mut first,
        &mut client_rd,
        accepted,
    ))
    .await;
    if !passage {
        // What the client sent while held (a reset fault may have ended the hold).
        link.undelivered(first.bytes.len());
        link.settle();
        let halves = vec![Half::Read(client_rd), Half::Write(client_wr)];
        return close(halves, link.outcome(), &ctx.counters, registered);
    }
    if first.reset && first.bytes.is_empty() {
        // Reset before a byte: nothing to pass on, so the upstream is never dialled.
        tracing::debug!("client reset before sending anything");
        link.close(Outcome::Reset, None);
        let halves = vec![Half::Read(client_rd), Half::Write(client_wr)];
        return close(halves, link.outcome(), &ctx.counters, registered);
    }

    let Some(server) = Box::pin(dial(&ctx, &link)).await else {
        return;
    };
    registered.set(|info| info.connected = true);
    tracing::debug!("link open");
    let (server_rd, server_wr) = server.into_split();

    // The chain may have changed while the link was dialling: looked at again, so that a link
    // goes direct only while no fault applies to it.
    let mut chain = ctx.chain.clone();
    let current = Arc::clone(&chain.borrow_and_update());
    for s in [&mut up_stages, &mut down_stages] {
        s.rebuild(&current, Instant::now());
    }
    drop(current);
    let legs = if !first.reset && !first.eof && up_stages.is_idle() && down_stages.is_idle() {
        let mut pipes = [
            Pipe::new(
                Stream::Upstream,
                client_rd,
                server_wr,
                std::mem::take(&mut first.bytes),
                first.arrived,
            ),
            Pipe::new(
                Stream::Downstream,
                server_rd,
                client_wr,
                Vec::new(),
                Instant::now(),
            ),
        ];
        let end = direct::run(
            &mut pipes,
            &link,
            &mut chain,
            [&mut up_stages, &mut down_stages],
            &ctx.counters,
        )
        .await;
        if let End::Done = end {
            let mut halves = Vec::with_capacity(4);
            for p in pipes {
                link.undelivered(p.waiting().len());
                halves.extend([Half::Read(p.src), Half::Write(p.sink)]);
            }
            link.settle();
            return close(halves, link.outcome(), &ctx.counters, registered);
        }
        pipes.map(Leg::handed_over)
    } else {
        // The first bytes leave as a chunk of their own size; the sniffing buffer (1 KiB at
        // least) goes now, not with the link.
        let sniffed = std::mem::take(&mut first.bytes);
        let mut queued = Vec::with_capacity(2);
        if !sniffed.is_empty() {
            queued.push(Chunk::data(
                BytesMut::from(sniffed.as_slice()),
                first.arrived,
            ));
        }
        drop(sniffed);
        if first.reset {
            // After the bytes sniffed, the reset that ended sniffing (see `read_loop`).
            link.source_reset(Stream::Upstream);
            queued.push(Chunk::reset(first.arrived));
        } else if first.eof {
            queued.push(Chunk::eof(first.arrived));
        }
        let up = Leg {
            stream: Stream::Upstream,
            read: !(first.reset || first.eof),
            src: client_rd,
            sink: server_wr,
            queued,
            state: State::Open,
        };
        let down = Leg {
            stream: Stream::Downstream,
            read: true,
            src: server_rd,
            sink: client_wr,
            queued: Vec::new(),
            state: State::Open,
        };
        [up, down]
    };
    let halves = staged(&ctx, &link, chain, legs, [up_stages, down_stages]).await;
    link.settle();
    close(halves, link.outcome(), &ctx.counters, registered);
}

/// One stream of a link as the staged path takes it over.
struct Leg {
    stream: Stream,
    src: OwnedReadHalf,
    /// Whether `src` is still to be read (not once its end is queued).
    read: bool,
    sink: OwnedWriteHalf,
    /// Chunks read and not yet delivered, in order.
    queued: Vec<Chunk>,
    state: State,
}

impl Leg {
    /// What the direct path leaves of one stream when a fault comes to apply to the link.
    fn handed_over(p: Pipe) -> Leg {
        let waiting = p.waiting();
        let queued = if waiting.is_empty() {
            Vec::new()
        } else {
            vec![Chunk::data(BytesMut::from(waiting), p.arrived)]
        };
        Leg {
            stream: p.stream,
            read: p.state == State::Open,
            src: p.src,
            sink: p.sink,
            queued,
            state: p.state,
        }
    }
}

/// Runs the staged path of a link (per stream a reader task and a writer task, `pump`) to the
/// link's end; returns its socket halves.
async fn staged(
    ctx: &LinkCtx,
    link: &Arc<LinkCtl>,
    chain: watch::Receiver<Chain>,
    legs: [Leg; 2],
    stages: [Stages; 2],
) -> Vec<Half> {
    let mut tasks = JoinSet::new();
    let mut halves = Vec::with_capacity(4);
    for (leg, stages) in legs.into_iter().zip(stages) {
        if leg.state == State::Stopped {
            // Its sink failed and the link is ending; the staged path would only read its
            // source to drop what it reads.
            halves.extend([Half::Read(leg.src), Half::Write(leg.sink)]);
            continue;
        }
        let (tx, rx) = queue();
        // INVARIANT: the queue is empty here, so these sends cannot wait (and at most two
        // chunks are sent, which an empty queue always takes, whatever its bytes limit).
        for c in leg.queued {
            tx.try_send(c);
        }
        if leg.read {
            let l = Arc::clone(link);
            let (src, stream) = (leg.src, leg.stream);
            tasks.spawn(
                async move { Half::Read(read_loop(src, stream, tx, l).await) }.in_current_span(),
            );
        } else {
            halves.push(Half::Read(leg.src));
        }
        let writer = Writer::new(
            leg.stream,
            leg.sink,
            rx,
            chain.clone(),
            stages,
            Arc::clone(link),
            Arc::clone(&ctx.counters),
        );
        if leg.state == State::Ended {
            tasks.spawn(async move { Half::Write(writer.run_ended().await) }.in_current_span());
        } else {
            tasks.spawn(async move { Half::Write(writer.run().await) }.in_current_span());
        }
    }
    halves.extend(join_all(tasks, link).await);
    halves
}

/// Waits for every task of a link and collects what they hand back. A task that fails (a
/// panic) resets the link: its stream is broken, bytes of it may be lost, and the link's other
/// tasks would otherwise go on without it (its reader feeding a queue no one empties, the
/// other stream open), so the link stayed in `links()` and `connections_active` for good.
/// Reset, not closed: a FIN would tell the peers the stream ended whole.
async fn join_all<T: 'static>(mut tasks: JoinSet<T>, link: &LinkCtl) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(h) => out.push(h),
            Err(e) => {
                tracing::warn!(link = link.id, error = %e, "link task failed; resetting the link");
                link.close(Outcome::Reset, None);
            }
        }
    }
    out
}

/// First wait for the answer to a SYN, as Linux's: each retransmission waits twice as long.
const SYN_RTO: Duration = Duration::from_secs(1);

/// Retransmissions of an unanswered SYN before the connect fails (Linux's `tcp_syn_retries`).
const SYN_RETRIES: u32 = 6;

/// When a SYN sent at `sent` is next sent again after `now`, as Linux does it (1, 3, 7, 15, 31
/// and 63 s after the first); after the last, when the connect fails ([`syn_gives_up`]).
fn next_syn(sent: Instant, now: Instant) -> Instant {
    let mut at = sent;
    let mut wait = SYN_RTO;
    for _ in 0..SYN_RETRIES {
        at += wait;
        if at > now {
            return at;
        }
        wait *= 2;
    }
    at + wait
}

/// When a connect whose SYN (sent at `sent`) was never answered fails: the last retransmission
/// unanswered for twice its wait (127 s).
fn syn_gives_up(sent: Instant) -> Instant {
    sent + SYN_RTO * ((1 << (SYN_RETRIES + 1)) - 1)
}

/// Holds the link back from its upstream while a blackhole sits on its upstream stream, as a
/// connection whose SYN went into the blackhole: the upstream sees nothing until a
/// retransmission of that SYN finds the fault gone ([`next_syn`]; then the link connects and
/// what its client sent meanwhile goes through, as the bytes a client could not have sent
/// before its connection was up), and nothing at all if the client gives up first (closes, or
/// only shuts its sending side: the proxy cannot tell the two apart). At most a chunk is held
/// (a send buffer's worth); the client is then not read further but still watched
/// ([`read_or_watch`]), so its leaving ends the link at once even with bytes of it unread, and
/// a removal of the fault afterwards sends nothing upstream. A reset fault of the link still
/// fires on time; when the last retransmission goes unanswered the link is reset (the connect
/// would have failed).
/// Without this a fleet retrying behind a blackhole left a pair of sockets and an upstream
/// connection per abandoned attempt until the removal (the proxy ran out of descriptors;
/// docs/PERFORMANCE.md, twenty-third round). Returns whether the link may connect; if not, it
/// has ended.
async fn withhold(
    ctx: &LinkCtx,
    link: &LinkCtl,
    mut stages: [&mut Stages; 2],
    first: &mut Sniffed,
    client: &mut OwnedReadHalf,
    sent: Instant,
) -> bool {
    let mut chain = ctx.chain.clone();
    // Made only once a blackhole holds the link: most links pass at once.
    let mut buf = Vec::new();
    let mut due: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let current = Arc::clone(&chain.borrow_and_update());
        for s in stages.iter_mut() {
            s.rebuild(&current, now);
        }
        if now >= syn_gives_up(sent) {
            tracing::debug!("no SYN got through the blackhole; resetting the link");
            link.close(Outcome::Reset, None);
            return false;
        }
        if due.is_none_or(|t| t <= now) {
            let Some(hole) = stages[0].blackhole() else {
                if due.is_some() {
                    tracing::debug!("the blackhole is gone; connecting upstream");
                }
                return true;
            };
            if due.is_none() {
                tracing::debug!(fault = %hole.fault.name, "upstream held back by a blackhole");
            }
            due = Some(next_syn(sent, now));
        }
        if first.reset {
            // The client reset while held: the upstream never sees it, as with a FIN.
            link.close(Outcome::Reset, None);
            return false;
        }
        if first.eof {
            return false;
        }
        if buf.is_empty() {
            buf = vec![0u8; FIRST_READ];
        }
        let reset = stages
            .iter()
            .filter_map(|s| s.reset_due())
            .min_by_key(|(t, _)| *t);
        let room = CHUNK_SIZE.saturating_sub(first.bytes.len()).min(buf.len());
        tokio::select! {
            biased;
            () = link.cancelled() => return false,
            () = sleep_opt(reset.as_ref().map(|(t, _)| *t)) => {
                if let Some((_, by)) = reset {
                    link.close(Outcome::Reset, Some(&by));
                }
                return false;
            }
            () = sleep_opt(due) => {}
            r = chain.changed() => {
                if r.is_err() {
                    return false;
                }
            }
            r = read_or_watch(client, &mut buf[..room]) => match r {
                Ok(0) => first.eof = true,
                Ok(n) => {
                    if first.bytes.is_empty() {
                        first.arrived = Instant::now();
                    }
                    first.bytes.extend_from_slice(&buf[..n]);
                }
                Err(e) => {
                    link.close(outcome_of(&e), None);
                    return false;
                }
            },
        }
    }
}

/// How often a held link with no room left looks whether its client has left, while bytes of
/// the client wait unread in the kernel (the socket stays readable then, so a wait for
/// readiness alone would spin).
const LEAVE_POLL: Duration = Duration::from_millis(100);

/// Reads from a client held back by a blackhole into `buf`. With no room left (`buf` empty) it
/// reads nothing, so the client's further bytes stay in the kernel for when the link connects,
/// and answers 0 (as at EOF) once the client has closed its sending side or the connection:
/// read-closed readiness is seen even behind unread bytes. Before this, a client that gave up
/// with more than a chunk sent was not noticed until the 127 s bound, and a blackhole removed
/// first let the link connect and deliver the abandoned bytes upstream.
async fn read_or_watch(client: &mut OwnedReadHalf, buf: &mut [u8]) -> std::io::Result<usize> {
    if !buf.is_empty() {
        return client.read(buf).await;
    }
    loop {
        if client.ready(Interest::READABLE).await?.is_read_closed() {
            return Ok(0);
        }
        tokio::time::sleep(LEAVE_POLL).await;
    }
}

/// Closes a link's sockets the way it ended: dropped (FIN), or with RST after a reset.
fn close(halves: Vec<Half>, outcome: Outcome, counters: &ProxyCounters, registered: Registered) {
    if outcome == Outcome::Reset {
        add(&counters.connections_reset, 1);
        for h in halves {
            let sock: &TcpStream = match &h {
                Half::Read(r) => r.as_ref(),
                Half::Write(w) => w.as_ref(),
            };
            if let Err(e) = sock.set_zero_linger() {
                tracing::debug!(error = %e, "set_zero_linger failed");
            }
            // A dropped write half sends FIN first; forgotten, the socket closes with the
            // read half, and with linger 0 that close is a bare RST.
            if let Half::Write(w) = h {
                w.forget();
            }
        }
    } else {
        drop(halves);
    }
    tracing::debug!(?outcome, "link closed");
    drop(registered);
}

/// Connects the link upstream, without Nagle; `None` when the link closed meanwhile or the
/// upstream cannot be reached (counted and logged; the client is then closed).
async fn dial(ctx: &LinkCtx, link: &LinkCtl) -> Option<TcpStream> {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, connect_upstream(ctx.upstream, ctx.id));
    let failed = |reason: String| {
        add(&ctx.counters.upstream_failures, 1);
        match ctx.upstream_warnings.pass(Instant::now()) {
            Some(0) => {
                tracing::warn!(proxy = %ctx.proxy, upstream = %ctx.upstream, %reason, "cannot reach upstream; closing client")
            }
            Some(held) => {
                tracing::warn!(proxy = %ctx.proxy, upstream = %ctx.upstream, %reason, more = held, "cannot reach upstream; closing client (and `more` clients since the last such warning, counted in upstream_failures)")
            }
            None => {
                tracing::debug!(upstream = %ctx.upstream, %reason, "cannot reach upstream; closing client")
            }
        }
        None
    };
    let server = tokio::select! {
        biased;
        () = link.cancelled() => return None,
        r = connect => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return failed(e.to_string()),
            Err(_) => return failed("connect timed out".into()),
        },
    };
    if let Err(e) = server.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    Some(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link_ctl() -> Arc<LinkCtl> {
        Arc::new(LinkCtl {
            id: 1,
            cancel: CancellationToken::new(),
            outcome: Mutex::new(None),
            undelivered: Default::default(),
            counters: Arc::default(),
            ends: Mutex::default(),
            reset_found: Default::default(),
        })
    }

    #[tokio::test]
    async fn a_link_task_that_panics_resets_the_link_so_its_other_tasks_end() {
        let link = link_ctl();
        let mut tasks = JoinSet::new();
        for _ in 0..3 {
            let l = Arc::clone(&link);
            tasks.spawn(async move {
                l.cancelled().await;
                "ended"
            });
        }
        tasks.spawn(async { panic!("a link task fails") });
        let out = tokio::time::timeout(Duration::from_secs(10), join_all(tasks, &link))
            .await
            .expect("the other tasks end once the link is closed");
        assert_eq!(out, ["ended"; 3]);
        assert_eq!(link.outcome(), Outcome::Reset);
    }

    #[test]
    fn an_unanswered_syn_is_sent_again_as_linux_does_then_the_connect_fails() {
        let sent = Instant::now();
        let s = Duration::from_secs;
        let after = |t: Duration| next_syn(sent, sent + t) - sent;
        assert_eq!(after(s(0)), s(1));
        assert_eq!(after(Duration::from_millis(999)), s(1));
        assert_eq!(after(s(1)), s(3));
        assert_eq!(after(s(5)), s(7));
        assert_eq!(after(s(62)), s(63));
        // The sixth retransmission is the last: after it, the wait before giving up.
        assert_eq!(after(s(63)), s(127));
        assert_eq!(syn_gives_up(sent) - sent, s(127));
    }
}
