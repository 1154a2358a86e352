//! The direct path of a link: while no fault applies to either of its streams, the link's own
//! task moves both, each chunk written out of the buffer it was read into. No queue, no reader
//! or writer task, no wakeup between them: a link of a herd that only opens, carries a few
//! small frames and closes costs one task instead of five (docs/PERFORMANCE.md, session 57).
//!
//! The moment the chain changes so that a fault applies to the link, [`run`] stops and the link
//! hands what it holds (the bytes read and not yet written, which ends were passed on) to the
//! staged path (`pump`), which takes every chunk read from then on through the faults, as it
//! would have from the start. The direct path never comes back: a link that once had a fault
//! stays staged.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::fault::Stream;
use crate::link::{LinkCtl, Outcome};
use crate::pump::{FIRST_READ, grown, opposite, outcome_of};
use crate::stage::{Chain, Stages};
use crate::stats::ProxyCounters;

/// How far one stream of a direct link got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Its source is read and its sink written.
    Open,
    /// Its sender's FIN was passed on.
    Ended,
    /// Its sink failed; the link is ending (closed, or reset once the other stream's source
    /// tells its reset).
    Stopped,
}

/// One stream of a direct link: its source, its sink and the chunk between them.
pub(crate) struct Pipe {
    pub stream: Stream,
    pub src: OwnedReadHalf,
    pub sink: OwnedWriteHalf,
    /// The read buffer: `buf[start..end]` was read and is not written yet. Zeroed once when
    /// made or grown, not before each read.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// When the bytes waiting arrived.
    pub arrived: Instant,
    pub state: State,
}

/// What a pipe's step brought that its link must handle.
enum Step {
    /// Bytes were read: the chain is looked at again before they are written.
    Read,
    /// The sender's FIN.
    Eof,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
}

/// Why the link's task woke.
enum Event {
    Closing,
    /// The chain changed (`false`: its proxy is gone).
    Chain(bool),
    Pipe(usize, Step),
}

/// How [`run`] ended.
pub(crate) enum End {
    /// The link is over: close its sockets the way it ended.
    Done,
    /// A fault applies now: the link goes on through the staged path.
    Staged,
}

impl Pipe {
    /// A pipe whose first bytes (`first`, maybe none) are waiting to be written.
    pub fn new(
        stream: Stream,
        src: OwnedReadHalf,
        sink: OwnedWriteHalf,
        mut first: Vec<u8>,
        arrived: Instant,
    ) -> Self {
        let end = first.len();
        first.resize(end.max(FIRST_READ), 0);
        Pipe {
            stream,
            src,
            sink,
            buf: first,
            start: 0,
            end,
            arrived,
            state: State::Open,
        }
    }

    /// The bytes read and not yet written.
    pub fn waiting(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Writes what waits, then reads the next chunk; returns what the link must handle.
    fn poll_step(&mut self, cx: &mut Context<'_>, counters: &ProxyCounters) -> Poll<Step> {
        if self.state != State::Open {
            return Poll::Pending;
        }
        while self.start < self.end {
            let out = &self.buf[self.start..self.end];
            match Pin::new(&mut self.sink).poll_write(cx, out) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Step::WriteFailed(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.start += n;
                    counters.delivered(self.stream, n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Step::WriteFailed(e)),
            }
        }
        let mut room = ReadBuf::new(&mut self.buf);
        match Pin::new(&mut self.src).poll_read(cx, &mut room) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Step::ReadFailed(e)),
            Poll::Ready(Ok(())) => {
                let n = room.filled().len();
                if n == 0 {
                    return Poll::Ready(Step::Eof);
                }
                (self.start, self.end) = (0, n);
                self.arrived = Instant::now();
                let len = self.buf.len();
                let next = grown(len, n);
                if next > len {
                    self.buf.resize(next, 0);
                }
                Poll::Ready(Step::Read)
            }
        }
    }
}

/// Moves both streams of a link while no fault applies to either; `stages` are the link's
/// (upstream, downstream), kept current with `chain`. Returns when the link is over, or when
/// the chain changed so that a fault applies (the pipes then hold what the staged path must
/// take over).
pub(crate) async fn run(
    pipes: &mut [Pipe; 2],
    link: &LinkCtl,
    chain: &mut watch::Receiver<Chain>,
    mut stages: [&mut Stages; 2],
    counters: &ProxyCounters,
) -> End {
    let mut closing = pin!(link.cancelled());
    // Which pipe is looked at first, alternately, so a busy stream does not starve the other.
    let mut turn = 0;
    loop {
        let event = {
            // INVARIANT: made once per change and polled before the pipes on every wakeup, so
            // a change published before a read returned is seen before its bytes are written.
            let mut changed = pin!(chain.changed());
            loop {
                let event = poll_fn(|cx| {
                    if closing.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Closing);
                    }
                    if let Poll::Ready(r) = changed.as_mut().poll(cx) {
                        return Poll::Ready(Event::Chain(r.is_ok()));
                    }
                    turn ^= 1;
                    for i in [turn, 1 - turn] {
                        if let Poll::Ready(step) = pipes[i].poll_step(cx, counters) {
                            return Poll::Ready(Event::Pipe(i, step));
                        }
                    }
                    Poll::Pending
                })
                .await;
                let Event::Pipe(i, step) = event else {
                    break event;
                };
                if handle(&mut pipes[i], step, link).await == Flow::Over
                    || pipes.iter().all(|p| p.state != State::Open)
                {
                    return End::Done;
                }
            }
        };
        match event {
            Event::Chain(true) => {
                let current = std::sync::Arc::clone(&chain.borrow_and_update());
                let now = Instant::now();
                for s in stages.iter_mut() {
                    s.rebuild(&current, now);
                }
                // A fault that misses this link (another worker's, or its toxicity draw) leaves
                // it direct.
                if !stages.iter().all(|s| s.is_idle()) {
                    return End::Staged;
                }
            }
            Event::Closing | Event::Chain(false) | Event::Pipe(..) => return End::Done,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Go,
    Over,
}

/// Handles a pipe's step as the staged path's reader and writer would: a FIN is passed on (or
/// turned into the reset a write to its source found), a reset read is passed on once what was
/// read before it is out (it is: a pipe reads only when nothing waits), a failed write stops
/// the stream and tells the other.
async fn handle(pipe: &mut Pipe, step: Step, link: &LinkCtl) -> Flow {
    match step {
        Step::Read => Flow::Go,
        Step::Eof => {
            if link.was_reset(pipe.stream) {
                link.close(Outcome::Reset, None);
                return Flow::Over;
            }
            if let Err(e) = pipe.sink.shutdown().await {
                return write_failed(pipe, &e, link);
            }
            pipe.state = State::Ended;
            if link.stream_ended(pipe.stream) {
                Flow::Over
            } else {
                Flow::Go
            }
        }
        Step::ReadFailed(e) => {
            let outcome = outcome_of(&e);
            if outcome == Outcome::Reset {
                tracing::debug!(link = link.id, error = %e, "peer reset; passing the reset on");
                link.source_reset(pipe.stream);
            } else {
                tracing::debug!(link = link.id, error = %e, "read failed");
            }
            link.close(outcome, None);
            Flow::Over
        }
        Step::WriteFailed(e) => write_failed(pipe, &e, link),
    }
}

/// A write to the sink of `pipe` failed: as the staged writer does, the stream stops, and a
/// reset of the sink's peer is told as a reset of the other stream's source (whose bytes read
/// before it still go out first); another error closes the link.
fn write_failed(pipe: &mut Pipe, e: &io::Error, link: &LinkCtl) -> Flow {
    link.undelivered(pipe.end - pipe.start);
    pipe.start = pipe.end;
    pipe.state = State::Stopped;
    tracing::debug!(link = link.id, stream = ?pipe.stream, error = %e, "write failed");
    let source = opposite(pipe.stream);
    let reset = outcome_of(e) == Outcome::Reset || e.kind() == io::ErrorKind::BrokenPipe;
    if reset || link.was_reset(source) {
        link.source_reset(source);
        Flow::Go
    } else {
        link.close(outcome_of(e), None);
        Flow::Over
    }
}
