//! Fetching the checkpoint an assignment named without its bytes (too large to travel in it):
//! byte ranges asked for a few at a time with `checkpoint_fetch`, each answered by one
//! `checkpoint_piece`. The requests go through the outbox, so one lost with a session is asked
//! again in the next, and one the coordinator never answers ends the session like any message
//! it never acknowledges.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tether_proto::msg::{CheckpointFetch, CheckpointPiece, ErrorCode, WorkerMsg, now};
use tether_proto::{Attempt, CheckpointId, Seq, TaskId};
use tokio::sync::{Semaphore, SemaphorePermit, mpsc};

use crate::executor::{StoredCheckpoint, TaskShared};
use crate::outbox::{Class, Outbox};

/// The largest piece asked for at once (smaller when a frame either end takes is smaller): the
/// size of an upload's pieces, so that no frame of a hand-over holds a session's heartbeats
/// back longer than one of the upload.
pub const FETCH_PIECE: usize = tether_proto::codec::CHECKPOINT_PIECE;

/// Pieces asked for and not yet answered, per checkpoint, once the link's rate to this worker
/// is measured (before, one of [`FIRST_PIECE`] at a time).
pub const FETCH_WINDOW: usize = 4;

/// The piece asked for alone while the link's rate to this worker is not measured: its answer
/// measures it. On a slow link what the coordinator sends besides waits behind it (at 16 kB/s,
/// four seconds), not behind a window of four whole pieces (a megabyte: a minute).
pub const FIRST_PIECE: usize = 64 * 1024;

/// Pieces asked for and not yet answered, over all the worker's fetches: half the coordinator's
/// bound of a session's fetches in flight, so that a `sync_state` resend of them all fits.
pub const WORKER_FETCHES: usize = 8;

/// How long a piece refused for now (`rate_limited`, `internal`) waits before it is asked for
/// again the first time; each refusal in a row doubles the wait, up to [`MAX_RETRY_DELAY`], and
/// a piece that comes starts over.
pub const RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest a refused-for-now piece waits before it is asked for again. There is no bound on
/// how often: a busy coordinator still holds the checkpoint, and giving up would run the
/// attempt from an older one or from nothing, whose first checkpoints then push the real
/// progress out of the coordinator's few kept. The attempt's stop (cancel, timeout, the
/// worker's stop) or a `not_leased` ends the wait.
pub const MAX_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// The wait before asking again after the `refusals`-th refusal in a row (from 1).
fn retry_delay(refusals: u32) -> std::time::Duration {
    let doublings = refusals.saturating_sub(1).min(16);
    RETRY_DELAY
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_DELAY)
}

/// The largest checkpoint this worker fetches: the size comes from the coordinator, and the
/// whole checkpoint is held in memory.
pub const MAX_FETCH_SIZE: u64 = tether_proto::codec::MAX_CHECKPOINT_BYTES;

/// The checkpoint to fetch: what the assignment said of it.
#[derive(Debug, Clone)]
pub(crate) struct Wanted {
    pub id: CheckpointId,
    /// The attempt that wrote it.
    pub attempt: Attempt,
    pub size: u64,
}

/// Why a fetch ended without the checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FetchError {
    /// The attempt was stopped (cancelled, superseded, the worker stopping).
    Stopped,
    /// The coordinator says the attempt holds no lease: it is to stop, without a result.
    NotLeased(String),
    /// The coordinator cannot serve it (not found, not its latest, a range out of bounds: it
    /// will not come however often asked), it is larger than this worker fetches, or the
    /// coordinator served something else. A refusal for now (`rate_limited`, `internal`) is
    /// no failure: the piece is asked for again.
    Failed(String),
}

/// The fetches in progress, by task: where the session hands the pieces it receives.
#[derive(Debug)]
pub(crate) struct Fetches {
    by_task: Mutex<HashMap<TaskId, mpsc::UnboundedSender<CheckpointPiece>>>,
    /// Pieces asked for and not answered, over every fetch of the worker: at most
    /// [`WORKER_FETCHES`], under the coordinator's bound for a session.
    permits: Semaphore,
}

impl Default for Fetches {
    fn default() -> Self {
        Self {
            by_task: Mutex::default(),
            permits: Semaphore::new(WORKER_FETCHES),
        }
    }
}

impl Fetches {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TaskId, mpsc::UnboundedSender<CheckpointPiece>>> {
        self.by_task.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a piece to the fetch of its task; one that no fetch waits for (its attempt ended,
    /// or it answers a request a previous process made) is dropped.
    pub(crate) fn deliver(&self, piece: CheckpointPiece) {
        let tx = self.lock().get(&piece.task_id).cloned();
        match tx {
            Some(tx) => {
                let _ = tx.send(piece);
            }
            None => {
                tracing::debug!(task = %piece.task_id, offset = piece.offset, "checkpoint piece for no fetch in progress; dropped")
            }
        }
    }
}

/// Removes a fetch from [`Fetches`] when it ends, unless a newer attempt's replaced it.
struct Registered<'a> {
    fetches: &'a Fetches,
    task_id: TaskId,
    tx: mpsc::UnboundedSender<CheckpointPiece>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut map = self.fetches.lock();
        if map
            .get(&self.task_id)
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            map.remove(&self.task_id);
        }
    }
}

/// A fetch's requests not yet answered, by sequence number: each one's offset, length and
/// the worker's permit it holds. Withdrawn from the outbox when the fetch ends, however it
/// ends (stopped, failed, not leased): sent, they would only bring pieces no fetch waits for,
/// count towards the coordinator's bound of a session's fetches in flight, and hold up the
/// shutdown's flush.
struct Asked<'a> {
    outbox: &'a Outbox,
    pending: HashMap<Seq, (u64, u64, SemaphorePermit<'a>)>,
}

impl Drop for Asked<'_> {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.outbox.withdraw(self.pending.keys().copied());
        }
    }
}

/// Fetches `wanted` for the attempt of `shared`. `piece()` says the most bytes a request asks
/// for and whether the link's rate was measured (asked at each request: the rate sizes it, see
/// `Runner::size_fetches_for`); unmeasured, one request waits alone for its answer.
pub(crate) async fn fetch(
    outbox: &Outbox,
    fetches: &Fetches,
    shared: &TaskShared,
    wanted: &Wanted,
    piece: impl Fn() -> (usize, bool),
) -> Result<StoredCheckpoint, FetchError> {
    let size = wanted.size;
    if size > MAX_FETCH_SIZE {
        return Err(FetchError::Failed(format!(
            "the checkpoint has {size} bytes, more than the {MAX_FETCH_SIZE} this worker fetches"
        )));
    }
    // Zeroed pages from the allocator: only what arrives is written.
    let mut data = vec![0u8; size as usize];
    let (tx, mut rx) = mpsc::unbounded_channel();
    fetches.lock().insert(shared.task_id.clone(), tx.clone());
    let _registered = Registered {
        fetches,
        task_id: shared.task_id.clone(),
        tx,
    };
    // A full outbox (a backlog after an outage) holds a request until acknowledgements make
    // room; a stop of the attempt does not wait for that.
    let ask = |offset: u64, len: u64| async move {
        tokio::select! {
            () = outbox.reserve() => {}
            _ = shared.cancel.cancelled() => return Err(FetchError::Stopped),
        }
        Ok(outbox.push(Class::Notice, None, |seq| {
            WorkerMsg::CheckpointFetch(CheckpointFetch {
                seq,
                task_id: shared.task_id.clone(),
                attempt: shared.attempt,
                checkpoint_id: wanted.id.clone(),
                offset,
                len,
                timestamp: now(),
            })
        }))
    };
    let mut asked = Asked {
        outbox,
        pending: HashMap::new(),
    };
    let (mut next, mut filled, mut retries) = (0u64, 0u64, 0u32);
    while filled < size {
        let (most, measured) = piece();
        let window = if measured { FETCH_WINDOW } else { 1 };
        while asked.pending.len() < window && next < size {
            // A fetch waits for a permit only while it holds none: one that holds some takes
            // its answers first (two fetches each waiting, holding what the other wants, would
            // wait for ever).
            let permit = match fetches.permits.try_acquire() {
                Ok(permit) => permit,
                Err(_) if !asked.pending.is_empty() => break,
                Err(_) => tokio::select! {
                    p = fetches.permits.acquire() => p.map_err(|_| FetchError::Stopped)?,
                    _ = shared.cancel.cancelled() => return Err(FetchError::Stopped),
                },
            };
            let len = (most.max(1) as u64).min(size - next);
            asked
                .pending
                .insert(ask(next, len).await?, (next, len, permit));
            next += len;
        }
        let p = tokio::select! {
            p = rx.recv() => p.ok_or(FetchError::Stopped)?,
            _ = shared.cancel.cancelled() => return Err(FetchError::Stopped),
        };
        // An answer to a request sent twice (a `sync_state` resends the outbox) comes twice.
        let Some((offset, len, permit)) = asked.pending.remove(&p.ack_seq) else {
            continue;
        };
        match (p.error, p.code) {
            (None, _) => {}
            (Some(error), Some(ErrorCode::NotLeased)) => return Err(FetchError::NotLeased(error)),
            // Busy, or a read that failed: the same range again, a moment later, for as long as
            // it takes (see `MAX_RETRY_DELAY`). Both come only to the lease holder: the
            // coordinator answers `not_leased` first.
            (Some(error), Some(ErrorCode::RateLimited | ErrorCode::Internal)) => {
                retries = retries.saturating_add(1);
                let delay = retry_delay(retries);
                tracing::warn!(task = %shared.task_id, checkpoint = %wanted.id, offset, %error, retries, delay_ms = delay.as_millis() as u64, "checkpoint piece refused for now; asking again");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.cancel.cancelled() => return Err(FetchError::Stopped),
                }
                asked
                    .pending
                    .insert(ask(offset, len).await?, (offset, len, permit));
                continue;
            }
            (Some(error), _) => return Err(FetchError::Failed(error)),
        }
        let bytes = p.data.map(|b| b.0).unwrap_or_default();
        let got = bytes.len() as u64;
        if p.checkpoint_id != wanted.id || p.offset != offset || got == 0 || got > len {
            return Err(FetchError::Failed(format!(
                "asked for {len} bytes at {offset} of checkpoint {}, got {got} bytes at {} of {}",
                wanted.id, p.offset, p.checkpoint_id
            )));
        }
        data[offset as usize..][..bytes.len()].copy_from_slice(&bytes);
        filled += got;
        retries = 0;
        if got < len {
            // Served shorter: the request was queued under a larger frame limit than the
            // coordinator's now (it restarted with a lower one). The rest, asked for again.
            tracing::debug!(task = %shared.task_id, checkpoint = %wanted.id, offset, len, got, "checkpoint piece served shorter than asked; asking for the rest");
            asked.pending.insert(
                ask(offset + got, len - got).await?,
                (offset + got, len - got, permit),
            );
            continue;
        }
        drop(permit);
    }
    Ok(StoredCheckpoint {
        id: wanted.id.clone(),
        attempt: wanted.attempt,
        data: Arc::new(data),
        piece: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Limits;
    use tether_proto::Seq;
    use tether_proto::task::Blob;

    fn id(s: &str) -> CheckpointId {
        CheckpointId::parse(s).expect("id")
    }

    /// The fetches the outbox holds unsent now, as (seq, offset, len).
    fn asked(outbox: &Outbox) -> Vec<(Seq, u64, u64)> {
        outbox
            .take_unsent(100)
            .into_iter()
            .map(|(seq, m)| match m.as_ref() {
                WorkerMsg::CheckpointFetch(f) => (seq, f.offset, f.len),
                other => panic!("not a fetch: {other:?}"),
            })
            .collect()
    }

    fn answer(seq: Seq, offset: u64, data: &[u8]) -> CheckpointPiece {
        CheckpointPiece {
            ack_seq: seq,
            task_id: TaskId::parse("t").expect("id"),
            checkpoint_id: id("c"),
            offset,
            data: Some(Blob(data.to_vec())),
            error: None,
            code: None,
            timestamp: now(),
        }
    }

    fn refusal(seq: Seq, offset: u64, code: ErrorCode) -> CheckpointPiece {
        CheckpointPiece {
            data: None,
            error: Some("no".into()),
            code: Some(code),
            ..answer(seq, offset, &[])
        }
    }

    /// Several fetches of one worker keep at most [`WORKER_FETCHES`] pieces asked for and not
    /// answered, all of them together, and each comes to its end: none waits holding permits
    /// another waits for.
    #[tokio::test]
    async fn the_worker_s_fetches_together_keep_a_bounded_number_in_flight() {
        let s = setup(40);
        let data: Vec<u8> = (0..40).collect();
        let tasks = ["t", "u", "v"];
        let shared: Vec<_> = tasks
            .iter()
            .map(|t| TaskShared::new(TaskId::parse(t).expect("id"), Attempt(2), None))
            .collect();
        let runs = futures_util::future::join_all(
            shared
                .iter()
                .map(|sh| fetch(&s.outbox, &s.fetches, sh, &s.wanted, || (3, true))),
        );
        tokio::pin!(runs);
        let mut most = 0;
        let done = loop {
            tokio::select! {
                r = &mut runs => break r,
                () = settle() => {
                    let batch: Vec<_> = s.outbox.take_unsent(100).into_iter().map(|(seq, m)| match m.as_ref() {
                        WorkerMsg::CheckpointFetch(f) => (seq, f.task_id.clone(), f.offset, f.len),
                        other => panic!("not a fetch: {other:?}"),
                    }).collect();
                    most = most.max(batch.len());
                    for (seq, task, offset, len) in batch {
                        s.outbox.ack(seq);
                        let mut p = answer(seq, offset, &data[offset as usize..(offset + len) as usize]);
                        p.task_id = task;
                        s.fetches.deliver(p);
                    }
                }
            }
        };
        for r in done {
            assert_eq!(*r.expect("fetched").data, data);
        }
        assert!(most <= WORKER_FETCHES, "{most} in flight at once");
        assert!(most > FETCH_WINDOW, "the fetches ran side by side: {most}");
    }

    /// Refused for now (busy, a failed read), a piece is asked for again, each time a little
    /// later up to [`MAX_RETRY_DELAY`], for as long as it takes: a fetch that gave up after
    /// five refusals ran its attempt from nothing, whose checkpoints then pushed the one it
    /// was to resume from out at the coordinator. A stop of the attempt ends the wait.
    #[tokio::test(start_paused = true)]
    async fn a_piece_refused_for_now_is_asked_again_until_it_comes_waiting_longer_each_time() {
        let refusals = 12;
        let s = setup(10);
        let data: Vec<u8> = (0..10).collect();
        let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (100, true));
        tokio::pin!(run);
        let (mut refused, mut asks) = (0, Vec::new());
        let r = loop {
            tokio::select! {
                r = &mut run => break r,
                () = settle() => {
                    for (seq, offset, _) in asked(&s.outbox) {
                        asks.push(tokio::time::Instant::now());
                        if refused < refusals {
                            refused += 1;
                            let code = [ErrorCode::Internal, ErrorCode::RateLimited][refused % 2];
                            s.fetches.deliver(refusal(seq, offset, code));
                        } else {
                            s.fetches.deliver(answer(seq, offset, &data));
                        }
                    }
                    tokio::time::sleep(RETRY_DELAY / 4).await;
                }
            }
        };
        assert_eq!(*r.expect("fetched").data, data);
        assert_eq!(asks.len(), refusals + 1);
        // Measured in quarters of the first delay: when the test looked, not to the instant.
        let waits: Vec<_> = asks.windows(2).map(|w| w[1] - w[0]).collect();
        let slack = RETRY_DELAY / 4;
        for (i, w) in waits.iter().enumerate() {
            let want = retry_delay(i as u32 + 1);
            assert!(
                *w >= want && *w <= want + slack,
                "wait {i}: {w:?}, not {want:?}: {waits:?}"
            );
        }
        assert_eq!(retry_delay(1), RETRY_DELAY);
        assert_eq!(retry_delay(refusals as u32), MAX_RETRY_DELAY);

        // Refused for ever: the attempt's stop ends the wait.
        let s = setup(10);
        let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (100, true));
        tokio::pin!(run);
        let t0 = tokio::time::Instant::now();
        let r = loop {
            tokio::select! {
                r = &mut run => break r,
                () = settle() => {
                    for (seq, offset, _) in asked(&s.outbox) {
                        s.fetches.deliver(refusal(seq, offset, ErrorCode::RateLimited));
                    }
                    if t0.elapsed() > MAX_RETRY_DELAY * 20 {
                        s.shared.cancel.cancel();
                    }
                    tokio::time::sleep(RETRY_DELAY / 4).await;
                }
            }
        };
        assert_eq!(r.err(), Some(FetchError::Stopped));
    }

    /// A fetch that ends early takes back what it asked and was not answered: the requests
    /// not yet sent leave the outbox at once, and a sent one is not sent again in the next
    /// session. Left there, they were sent all the same, counted towards the coordinator's
    /// bound of a session's fetches in flight, and held up the shutdown's flush.
    #[tokio::test]
    async fn a_fetch_that_ends_early_takes_back_the_requests_not_answered() {
        // Stopped with every request still unsent.
        let s = setup(40);
        let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (3, true));
        tokio::pin!(run);
        until_waiting(run.as_mut()).await;
        assert_eq!(s.outbox.len(), FETCH_WINDOW, "a window asked for");
        s.shared.cancel.cancel();
        assert_eq!(run.await.err(), Some(FetchError::Stopped));
        assert!(s.outbox.take_unsent(100).is_empty(), "none left to send");
        assert!(s.outbox.is_empty());

        // Told it holds no lease with two requests sent: the unsent leave, the other sent one
        // waits for its answer in this session and is not sent in the next.
        let s = setup(40);
        let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (3, true));
        tokio::pin!(run);
        until_waiting(run.as_mut()).await;
        let sent = s.outbox.take_unsent(2);
        let (seq, offset) = match sent[0].1.as_ref() {
            WorkerMsg::CheckpointFetch(f) => (f.seq, f.offset),
            other => panic!("not a fetch: {other:?}"),
        };
        s.outbox.ack(seq);
        s.fetches
            .deliver(refusal(seq, offset, ErrorCode::NotLeased));
        assert!(matches!(run.await, Err(FetchError::NotLeased(_))));
        assert!(s.outbox.take_unsent(100).is_empty(), "none left to send");
        assert_eq!(s.outbox.len(), 1, "the sent one, for its answer");
        s.outbox.requeue_all();
        assert!(s.outbox.take_unsent(100).is_empty(), "not sent again");
        assert!(s.outbox.is_empty());
    }

    struct Setup {
        outbox: Outbox,
        fetches: Fetches,
        shared: Arc<TaskShared>,
        wanted: Wanted,
    }

    fn setup(size: u64) -> Setup {
        Setup {
            outbox: Outbox::new(Limits::default()),
            fetches: Fetches::default(),
            shared: TaskShared::new(TaskId::parse("t").expect("id"), Attempt(2), None),
            wanted: Wanted {
                id: id("c"),
                attempt: Attempt(1),
                size,
            },
        }
    }

    /// Lets the fetch run until it waits.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Runs a fetch until it waits for answers.
    async fn until_waiting<F: std::future::Future>(run: std::pin::Pin<&mut F>) {
        tokio::select! {
            _ = run => panic!("ended before any answer"),
            () = settle() => {}
        }
    }

    #[tokio::test]
    async fn pieces_are_asked_a_window_at_a_time_and_put_together_in_any_order() {
        let s = setup(20);
        let data: Vec<u8> = (0..20).collect();
        let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (3, true));
        tokio::pin!(run);
        let mut answered = 0;
        loop {
            tokio::select! {
                r = &mut run => {
                    let cp = r.expect("fetched");
                    assert_eq!(*cp.data, data);
                    assert_eq!((cp.id, cp.attempt), (id("c"), Attempt(1)));
                    break;
                }
                () = settle() => {
                    let mut batch = asked(&s.outbox);
                    assert!(batch.len() <= FETCH_WINDOW, "{batch:?}");
                    assert!(!batch.is_empty(), "the fetch waits for nothing");
                    // Answered last first, the first one twice (a resent request).
                    batch.reverse();
                    for (seq, offset, len) in &batch {
                        let range = &data[*offset as usize..(*offset + *len) as usize];
                        s.fetches.deliver(answer(*seq, *offset, range));
                        answered += 1;
                    }
                    let (seq, offset, len) = batch[batch.len() - 1];
                    s.fetches
                        .deliver(answer(seq, offset, &data[offset as usize..(offset + len) as usize]));
                }
            }
        }
        assert_eq!(answered, 7, "20 bytes in pieces of 3");
        assert!(
            s.fetches.lock().is_empty(),
            "the fetch leaves no route behind"
        );
    }

    /// A piece served shorter than asked (the request was queued under a larger frame limit
    /// than the restarted coordinator's): what came is kept and the rest asked for, until the
    /// whole checkpoint is in.
    #[tokio::test]
    async fn a_piece_served_shorter_than_asked_is_kept_and_the_rest_asked_for() {
        let s = setup(10);
        let data: Vec<u8> = (0..10).collect();
        let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (100, true));
        tokio::pin!(run);
        let mut asks = Vec::new();
        let cp = loop {
            tokio::select! {
                r = &mut run => break r.expect("fetched"),
                () = settle() => {
                    let batch = asked(&s.outbox);
                    assert!(!batch.is_empty(), "the fetch waits for nothing");
                    for (seq, offset, len) in batch {
                        asks.push((offset, len));
                        // At most 4 bytes a piece.
                        let end = (offset + len.min(4)) as usize;
                        s.fetches.deliver(answer(seq, offset, &data[offset as usize..end]));
                    }
                }
            }
        };
        assert_eq!(*cp.data, data);
        assert_eq!(asks, [(0, 10), (4, 6), (8, 2)]);
    }

    #[tokio::test]
    async fn a_refused_or_wrong_piece_fails_the_fetch_and_a_stopped_attempt_stops_it() {
        for case in ["refused", "empty", "long", "moved"] {
            let s = setup(10);
            let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (100, true));
            tokio::pin!(run);
            until_waiting(run.as_mut()).await;
            let (seq, offset, _) = asked(&s.outbox)[0];
            let mut p = answer(seq, offset, &[0; 10]);
            match case {
                "refused" => {
                    p.data = None;
                    p.error = Some("task t is not leased".into());
                }
                "empty" => p.data = Some(Blob(Vec::new())),
                "long" => p.data = Some(Blob(vec![0; 11])),
                _ => p.offset = 1,
            }
            s.fetches.deliver(p);
            match run.await {
                Err(FetchError::Failed(e)) => assert!(!e.is_empty(), "{case}"),
                other => panic!("{case}: {other:?}"),
            }
        }
        // Told the attempt holds no lease: it is to stop, not to start afresh.
        let s = setup(10);
        let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (100, true));
        tokio::pin!(run);
        until_waiting(run.as_mut()).await;
        let (seq, offset, _) = asked(&s.outbox)[0];
        s.fetches
            .deliver(refusal(seq, offset, ErrorCode::NotLeased));
        assert!(matches!(run.await, Err(FetchError::NotLeased(_))));
        let mut s = setup(10);
        s.wanted.size = MAX_FETCH_SIZE + 1;
        let r = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (100, true)).await;
        assert!(matches!(r, Err(FetchError::Failed(_))), "too large: {r:?}");
        assert!(s.outbox.is_empty(), "nothing asked for");
        let s = setup(10);
        let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (100, true));
        tokio::pin!(run);
        until_waiting(run.as_mut()).await;
        s.shared.cancel.cancel();
        assert_eq!(run.await.err(), Some(FetchError::Stopped));
        // Stopped while its request waits for room in a full outbox (a backlog after an
        // outage): it stops then, not once acknowledgements make room.
        let mut s = setup(10);
        s.outbox = Outbox::new(Limits {
            max_entries: 1,
            ..Limits::default()
        });
        for _ in 0..2 {
            s.outbox.push(Class::Notice, None, |seq| {
                WorkerMsg::TaskPaused(tether_proto::msg::TaskNotice {
                    seq,
                    task_id: TaskId::parse("other").expect("id"),
                    attempt: Attempt(1),
                    timestamp: now(),
                })
            });
        }
        let run = fetch(&s.outbox, &s.fetches, &s.shared, &s.wanted, || (100, true));
        tokio::pin!(run);
        until_waiting(run.as_mut()).await;
        assert_eq!(s.outbox.len(), 2, "the request held by the full outbox");
        s.shared.cancel.cancel();
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(5), run).await;
        assert_eq!(
            stopped.expect("stopped at once").err(),
            Some(FetchError::Stopped)
        );
    }
}
