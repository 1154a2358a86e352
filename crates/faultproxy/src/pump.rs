//! The two tasks that move one stream of a link: a reader that cuts the source into chunks of
//! at most [`CHUNK_SIZE`] bytes and stamps their arrival, and a writer that takes each chunk
//! through the current [`Stages`] and writes it to the sink.
//!
//! Between them sits a [`queue`] of at most [`QUEUE_CHUNKS`] chunks and at most
//! [`QUEUE_BYTES`] bytes, or about a second of the slowest bandwidth fault on the stream (at
//! least [`QUEUE_FLOOR`]): that is what bounds the memory a delayed stream holds, and its
//! back-pressure reaches the sender through TCP, so a sender on a slow link stalls as on a real
//! one. The writer watches the proxy's fault chain, so faults added, changed or removed take
//! effect on live links, including on a chunk that is already waiting.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::fault::Stream;
use crate::link::{LinkCtl, Outcome};
use crate::stage::{Chain, Chunk, Next, Stages};
use crate::stats::ProxyCounters;

/// Largest chunk read from a socket at once.
pub const CHUNK_SIZE: usize = 32 * 1024;

/// Most chunks queued per stream of a link.
pub const QUEUE_CHUNKS: usize = 64;

/// Most bytes queued per stream of a link without a bandwidth fault (as many as
/// [`QUEUE_CHUNKS`] full chunks).
pub const QUEUE_BYTES: usize = QUEUE_CHUNKS * CHUNK_SIZE;

/// Fewest bytes a bandwidth fault lets queue on its stream, however slow it is. Its bound is
/// otherwise a second's worth: before, a 2 KB/s fault took 2 MiB from the sender at full
/// speed, so a worker never saw its writes stall on a slow link.
pub const QUEUE_FLOOR: usize = 64 * 1024;

/// Bytes queued on one stream and how many may be; shared by its reader and its writer.
#[derive(Debug)]
struct Budget {
    queued: AtomicUsize,
    limit: AtomicUsize,
    /// Signalled when bytes leave the queue or the limit changes; only the reader waits.
    room: Notify,
}

/// The queue between the reader and the writer of one stream, bounded in chunks and in bytes.
pub(crate) fn queue() -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
    let budget = Arc::new(Budget {
        queued: AtomicUsize::new(0),
        limit: AtomicUsize::new(QUEUE_BYTES),
        room: Notify::new(),
    });
    (
        QueueTx {
            tx,
            budget: Arc::clone(&budget),
        },
        QueueRx { rx, budget },
    )
}

/// The reader's end of a [`queue`].
pub(crate) struct QueueTx {
    /// Boxed: the channel allocates its slots in blocks of 32 when made, and a chunk inline
    /// (112 bytes) made each link's two queues take 7 KiB before a byte moved.
    tx: mpsc::Sender<Box<Chunk>>,
    budget: Arc<Budget>,
}

impl QueueTx {
    /// Queues `chunk` once its bytes fit under the limit; a chunk always fits an empty queue,
    /// so one larger than the limit still goes through. False when the writer is gone.
    /// Cancel-safe: the bytes count as queued only once the chunk is sent.
    async fn send(&self, chunk: Chunk) -> bool {
        let n = chunk.data.len();
        loop {
            let queued = self.budget.queued.load(Ordering::Acquire);
            let limit = self.budget.limit.load(Ordering::Acquire);
            if n == 0 || queued == 0 || queued.saturating_add(n) <= limit {
                break;
            }
            // A signal given since the check above is kept for this wait (one waiter).
            self.budget.room.notified().await;
        }
        let Ok(permit) = self.tx.reserve().await else {
            return false;
        };
        self.budget.queued.fetch_add(n, Ordering::AcqRel);
        permit.send(Box::new(chunk));
        true
    }

    /// Queues `chunk` without waiting, if there is a slot for it (the bytes limit aside).
    pub fn try_send(&self, chunk: Chunk) {
        let n = chunk.data.len();
        // Counted before it can be taken, so the count never runs below zero.
        self.budget.queued.fetch_add(n, Ordering::AcqRel);
        if self.tx.try_send(Box::new(chunk)).is_err() {
            self.budget.queued.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// The writer's end of a [`queue`].
pub(crate) struct QueueRx {
    rx: mpsc::Receiver<Box<Chunk>>,
    budget: Arc<Budget>,
}

impl QueueRx {
    async fn recv(&mut self) -> Option<Chunk> {
        let chunk = *self.rx.recv().await?;
        self.budget
            .queued
            .fetch_sub(chunk.data.len(), Ordering::AcqRel);
        self.budget.room.notify_one();
        Some(chunk)
    }

    /// Closes the queue and empties it; how many bytes were in it. Senders waiting for a slot
    /// fail from now on; one that had a slot already is waited for.
    async fn drain(&mut self) -> usize {
        self.rx.close();
        let mut n = 0;
        while let Some(chunk) = self.rx.recv().await {
            n += chunk.data.len();
        }
        n
    }

    fn set_limit(&self, limit: usize) {
        if self.budget.limit.swap(limit, Ordering::AcqRel) != limit {
            self.budget.room.notify_one();
        }
    }
}

/// A reader's first buffer. It doubles, up to [`CHUNK_SIZE`], each time a read fills it: a
/// link of small messages (a worker's heartbeats) holds 8 KiB of read buffers instead of
/// 64 KiB, and 10,000 links made at once no longer have the kernel zero 640 MiB of fresh pages
/// (41 % of a proxy's CPU in a thundering herd; docs/PERFORMANCE.md, nineteenth round).
pub const FIRST_READ: usize = 4 * 1024;

/// The read buffer's next length after a read of `n` bytes into `len`.
pub(crate) fn grown(len: usize, n: usize) -> usize {
    if n == len {
        (len * 2).min(CHUNK_SIZE)
    } else {
        len
    }
}

/// Reads `src`, the source of `stream`, into `tx` until EOF (sent on as an `eof` chunk), an
/// error or the link closes. A reset by the peer is sent on too, as a [`Chunk::reset`]: the
/// bytes read before it are delivered first (a direct connection's reader gets them before
/// the reset; closing the link at once threw away what waited in the queue, a split tail or
/// a latency). An end of stream after a write to this socket found it reset (the kernel tells
/// one of them only) is sent on as a FIN, which the writer turns into that reset (see
/// [`LinkCtl::source_reset`]). Another error closes the link at once. Returns the read half so
/// the link can choose how the socket closes.
pub(crate) async fn read_loop(
    mut src: OwnedReadHalf,
    stream: Stream,
    tx: QueueTx,
    link: Arc<LinkCtl>,
) -> OwnedReadHalf {
    // Nothing is zeroed before a read. A read of at least half the room asked leaves as a
    // chunk split off the buffer's front, sharing its allocation (nothing copied; the room
    // left is read into next, and when less than `want` is left the buffer is taken back
    // whole if every chunk of it has been written by then, or a new one is made). A smaller
    // one is copied out and the buffer reused: a chunk split off would keep the whole
    // allocation while it waits (under a latency fault, 64 heartbeats queued would hold
    // 64 buffers), so a queued chunk shares a buffer only when it filled half the room asked.
    let mut want = FIRST_READ;
    let mut buf = BytesMut::with_capacity(want);
    loop {
        if buf.capacity() < want {
            buf.reserve(want);
        }
        let mut room = (&mut buf).limit(want);
        let read = tokio::select! {
            biased;
            () = link.cancelled() => break,
            r = src.read_buf(&mut room) => r,
        };
        let chunk = match read {
            Ok(0) => Chunk::eof(Instant::now()),
            Ok(n) => {
                let data = if 2 * n >= want {
                    buf.split()
                } else {
                    let small = BytesMut::from(&buf[..]);
                    buf.clear();
                    small
                };
                want = grown(want, n);
                Chunk::data(data, Instant::now())
            }
            Err(e) if outcome_of(&e) == Outcome::Reset => {
                tracing::debug!(link = link.id, error = %e, "peer reset; passing the reset on");
                link.source_reset(stream);
                Chunk::reset(Instant::now())
            }
            Err(e) => {
                tracing::debug!(link = link.id, error = %e, "read failed");
                link.close(outcome_of(&e), None);
                break;
            }
        };
        let (eof, n) = (chunk.eof, chunk.data.len());
        let sent = tokio::select! {
            biased;
            () = link.cancelled() => false,
            sent = tx.send(chunk) => sent,
        };
        if !sent {
            link.undelivered(n);
            break;
        }
        if eof {
            break;
        }
    }
    src
}

/// Whether a failed read or write means the peer reset the connection.
pub(crate) fn outcome_of(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => Outcome::Reset,
        _ => Outcome::Close,
    }
}

enum Flow {
    Continue,
    Stop,
    /// The sender's FIN was passed on: the stream is over, the link may not be.
    Ended,
}

/// Sleeps until `t`, or forever when there is none. A deadline already reached is met at once:
/// a timer, even one already due, fires only on the time driver's next turn (up to a
/// millisecond on), and meanwhile a queued chunk won the writer's select. A `reset` of
/// `timeout_ms` 0 let a WebSocket upgrade and the registration behind it through on loopback,
/// and the coordinator saw the worker back before the link was cut.
pub(crate) async fn sleep_opt(t: Option<Instant>) {
    match t {
        Some(t) if t <= Instant::now() => {}
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The writing side of one stream of a link.
pub(crate) struct Writer {
    stream: Stream,
    sink: OwnedWriteHalf,
    queue: QueueRx,
    chain: watch::Receiver<Chain>,
    stages: Stages,
    link: Arc<LinkCtl>,
    proxy: Arc<ProxyCounters>,
    /// Tails of split chunks, in stream order, processed before the queue.
    pending: VecDeque<Chunk>,
}

impl Writer {
    pub fn new(
        stream: Stream,
        sink: OwnedWriteHalf,
        queue: QueueRx,
        chain: watch::Receiver<Chain>,
        stages: Stages,
        link: Arc<LinkCtl>,
        proxy: Arc<ProxyCounters>,
    ) -> Self {
        Writer {
            stream,
            sink,
            queue,
            chain,
            stages,
            link,
            proxy,
            pending: VecDeque::new(),
        }
    }

    /// Forwards chunks until the stream ends, the link closes or a fault closes it. Returns
    /// the write half so the link can choose how the socket closes.
    pub async fn run(mut self) -> OwnedWriteHalf {
        self.refresh();
        loop {
            let chunk = match self.pending.pop_front() {
                Some(c) => c,
                None => {
                    let reset = self.stages.reset_due().map(|(t, _)| t);
                    tokio::select! {
                        biased;
                        () = self.link.cancelled() => break,
                        () = sleep_opt(reset) => {
                            self.fire_reset();
                            break;
                        }
                        r = self.chain.changed() => {
                            if r.is_err() {
                                break;
                            }
                            self.refresh();
                            continue;
                        }
                        c = self.queue.recv() => match c {
                            Some(c) => c,
                            None => break,
                        },
                    }
                }
            };
            match self.forward(chunk).await {
                Flow::Continue => {}
                Flow::Stop => break,
                Flow::Ended => {
                    self.after_the_end().await;
                    break;
                }
            }
        }
        let left: usize = self.pending.drain(..).map(|c| c.data.len()).sum();
        self.link.undelivered(left + self.queue.drain().await);
        self.sink
    }

    /// For a stream whose end the direct path (`direct.rs`) already passed on before the link
    /// took the staged path: waits as [`Writer::run`] does after a FIN it passed itself.
    pub async fn run_ended(mut self) -> OwnedWriteHalf {
        self.refresh();
        self.after_the_end().await;
        self.link.undelivered(self.queue.drain().await);
        self.sink
    }

    /// The stream's end was passed on while the other stream goes on (a half-closed link): a
    /// reset fault on this stream, already there or added now, still fires on time, until the
    /// link ends.
    async fn after_the_end(&mut self) {
        if self.link.stream_ended(self.stream) {
            return;
        }
        loop {
            let reset = self.stages.reset_due().map(|(t, _)| t);
            tokio::select! {
                biased;
                () = self.link.cancelled() => return,
                () = sleep_opt(reset) => {
                    self.fire_reset();
                    return;
                }
                r = self.chain.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.refresh();
                }
            }
        }
    }

    fn refresh(&mut self) {
        refresh(&mut self.chain, &mut self.stages, &self.queue);
    }

    fn fire_reset(&self) {
        fire_reset(&self.stages, &self.link);
    }

    /// Takes one chunk through the stages, waiting where they say, and delivers it.
    async fn forward(&mut self, mut chunk: Chunk) -> Flow {
        loop {
            // INVARIANT: a chunk read after a fault was published is processed with it, since
            // the change is visible here before the chunk is looked at.
            if self.chain.has_changed().unwrap_or(false) {
                self.refresh();
            }
            // A FIN from a source since found reset (by a write to it) is that reset.
            let fin = chunk.eof && !chunk.reset;
            if fin && self.link.was_reset(self.stream) {
                chunk.reset = true;
                continue;
            }
            let wait = match self.stages.next(&mut chunk, Instant::now()) {
                Next::Deliver => return self.deliver(chunk).await,
                Next::Drop => {
                    if let Some(by) = chunk.close_after.take() {
                        self.link.close(Outcome::Close, Some(&by));
                        return Flow::Stop;
                    }
                    return Flow::Continue;
                }
                Next::Split {
                    at,
                    fault,
                    tail_plan,
                } => {
                    let tail = chunk.split_off(at, fault, tail_plan);
                    self.pending.push_front(tail);
                    continue;
                }
                Next::Wait { until, fault } => Some((until, fault)),
                Next::Hold => None,
            };
            let reset = self.stages.reset_due().map(|(t, _)| t);
            let stop = tokio::select! {
                biased;
                () = self.link.cancelled() => true,
                () = sleep_opt(reset) => {
                    self.fire_reset();
                    true
                }
                () = sleep_opt(wait.map(|(t, _)| t)) => {
                    if let Some((_, fault)) = wait {
                        self.stages.waited(&chunk, fault);
                    }
                    false
                }
                r = self.chain.changed() => {
                    if r.is_ok() {
                        self.refresh();
                    }
                    r.is_err()
                }
                () = self.link.reset_found(self.stream), if fin => false,
            };
            if stop {
                self.link.undelivered(chunk.data.len());
                return Flow::Stop;
            }
        }
    }

    /// Writes a chunk out. A write can wait for as long as the peer reads nothing; a reset
    /// added or changed meanwhile still fires on time (the chain is watched throughout).
    async fn deliver(&mut self, chunk: Chunk) -> Flow {
        if chunk.reset {
            // Every chunk before it is out: now the reset the sender sent.
            self.link.close(Outcome::Reset, None);
            return Flow::Stop;
        }
        let Writer {
            sink,
            chain,
            stages,
            queue,
            link,
            ..
        } = self;
        let mut written = 0;
        let result = 'write: {
            // Never dropped half done but when the link ends: the bytes it wrote would be
            // written again.
            let write = write_chunk(sink, &chunk, &mut written);
            tokio::pin!(write);
            loop {
                let reset = stages.reset_due().map(|(t, _)| t);
                tokio::select! {
                    biased;
                    () = link.cancelled() => break 'write None,
                    () = sleep_opt(reset) => {
                        fire_reset(stages, link);
                        break 'write None;
                    }
                    r = chain.changed() => {
                        if r.is_err() {
                            break 'write None;
                        }
                        refresh(chain, stages, queue);
                    }
                    r = &mut write => break 'write Some(r),
                }
            }
        };
        let Some(result) = result else {
            self.link.undelivered(chunk.data.len() - written);
            return Flow::Stop;
        };
        if let Err(e) = result {
            self.link.undelivered(chunk.data.len() - written);
            tracing::debug!(link = self.link.id, stream = ?self.stream, error = %e, "write failed");
            // The sink's peer reset it: the sink is the source of the other stream, whose writer
            // ends the link, with a reset, once the bytes read before it are out, whether this
            // write or that stream's reader found the reset first. Closing now would throw them
            // away. (Broken pipe: the reader took the reset from the socket just before.)
            let source = opposite(self.stream);
            let reset = outcome_of(&e) == Outcome::Reset || e.kind() == io::ErrorKind::BrokenPipe;
            if reset || self.link.was_reset(source) {
                self.link.source_reset(source);
            } else {
                self.link.close(outcome_of(&e), None);
            }
            return Flow::Stop;
        }
        self.proxy.delivered(self.stream, chunk.data.len());
        if let Some(by) = &chunk.close_after {
            self.link.close(Outcome::Close, Some(by));
            return Flow::Stop;
        }
        if chunk.eof {
            Flow::Ended
        } else {
            Flow::Continue
        }
    }
}

/// The other stream of a link: the one whose source is this stream's sink.
pub(crate) fn opposite(stream: Stream) -> Stream {
    match stream {
        Stream::Upstream => Stream::Downstream,
        Stream::Downstream => Stream::Upstream,
    }
}

/// Takes the chain's latest faults into `stages`, and the queue's bound with them.
fn refresh(chain: &mut watch::Receiver<Chain>, stages: &mut Stages, queue: &QueueRx) {
    let current = Arc::clone(&chain.borrow_and_update());
    stages.rebuild(&current, Instant::now());
    queue.set_limit(stages.queue_limit());
}

/// Closes the link with a reset, if a reset fault of `stages` is due.
fn fire_reset(stages: &Stages, link: &LinkCtl) {
    if let Some((_, by)) = stages.reset_due() {
        tracing::debug!(link = link.id, fault = %by.fault.name, "reset fault fired");
        link.close(Outcome::Reset, Some(&by));
    }
}

/// Writes a data chunk, or passes the FIN on for an `eof` chunk. `written` counts the bytes
/// written so far, so a write cut short still tells how many reached the socket.
async fn write_chunk(
    sink: &mut OwnedWriteHalf,
    chunk: &Chunk,
    written: &mut usize,
) -> io::Result<()> {
    if chunk.eof {
        return sink.shutdown().await;
    }
    while *written < chunk.data.len() {
        match sink.write(&chunk.data[*written..]).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => *written += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_buffer_grows_only_when_a_read_fills_it_and_never_past_a_chunk() {
        assert_eq!(grown(FIRST_READ, 100), FIRST_READ);
        assert_eq!(grown(FIRST_READ, FIRST_READ), 2 * FIRST_READ);
        let mut len = FIRST_READ;
        for _ in 0..10 {
            len = grown(len, len);
        }
        assert_eq!(len, CHUNK_SIZE);
        assert_eq!(grown(CHUNK_SIZE, CHUNK_SIZE), CHUNK_SIZE);
    }
}
