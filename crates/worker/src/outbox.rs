//! The outbox: everything the worker must deliver and that needs an ack.
//!
//! Entries are sent in order of class (results first, then control notices, then state and
//! checkpoints, then telemetry) and by sequence number within a class. An entry stays until
//! the coordinator acknowledges its sequence number (or its sender withdraws it: a fetch that
//! ended; or its attempt's result was acknowledged: a checkpoint's announcement or piece,
//! which the coordinator would no longer store); on every new session all of them are sent
//! again. State updates of one attempt of a task coalesce to the latest, as does telemetry.
//! Heartbeats never enter the outbox. The outbox is bounded: producers wait for room ([`Outbox::reserve`]),
//! telemetry is dropped first, and the first time it fills a warning is logged and counted.
//! With a [`Journal`] (the state directory) every change is written through before it takes
//! effect, so a restarted worker finds what was not yet acknowledged; a write that fails (the
//! disk is full) is logged and counted, and a result's push says so ([`Outbox::push_journaled`]):
//! its attempt is not recorded as ended on the strength of it. A checkpoint's pieces are
//! journaled by where they lie in the checkpoint ([`Outbox::push_piece`]), whose bytes the
//! state directory keeps in a file of its own: the journal write under the lock stays small.

use std::collections::{HashMap, VecDeque};

/// foldhash rather than SipHash: every entry is hashed several times between push and ack.
type Hasher = foldhash::quality::RandomState;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tether_proto::msg::WorkerMsg;
use tether_proto::{Attempt, CheckpointId, Seq, TaskId, TaskRef};
use tokio::sync::Notify;

/// Default bound on entries.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// Default bound on encoded bytes held.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Delivery class; lower is sent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Result = 0,
    Notice = 1,
    State = 2,
    Telemetry = 3,
}

/// Coalescing key: a newer entry with the same key replaces the older one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Coalesce {
    /// The state of one attempt of a task: a newer attempt's state never replaces (nor is
    /// replaced by) an older attempt's still queued, which the coordinator files apart.
    TaskState(TaskId, Attempt),
    Telemetry,
}

impl Coalesce {
    /// The key of a `task_state` of `attempt` of `task`.
    pub fn task_state(task: &TaskId, attempt: Attempt) -> Self {
        Coalesce::TaskState(task.clone(), attempt)
    }
}

/// A journal write that did not reach the disk (it is full, say): what it put survives no
/// crash, and what it removed is found again by a restart.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the outbox journal could not be written: {0}")]
pub struct JournalError(pub String);

/// An entry that entered the outbox, as its journal write carries it.
#[derive(Debug, Clone, Copy)]
pub struct Put<'a> {
    pub class: Class,
    pub seq: Seq,
    pub msg: &'a WorkerMsg,
    /// For a checkpoint piece (`checkpoint_data`) pushed by [`Outbox::push_piece`]: where its
    /// bytes lie in its checkpoint. The state directory keeps the checkpoint's bytes already,
    /// in a file of its own: it records the piece by reference, a few hundred bytes, not its
    /// bytes again (base64 under the outbox's lock, which the session needs for every send and
    /// ack), and rebuilds it when the journal is read. `None`: the message is journaled whole.
    pub offset: Option<u64>,
}

impl<'a> Put<'a> {
    /// `msg`, held under `seq` in `class`, journaled whole.
    pub fn new(class: Class, seq: Seq, msg: &'a WorkerMsg) -> Self {
        Self {
            class,
            seq,
            msg,
            offset: None,
        }
    }
}

/// Where the outbox writes itself through (the state directory). Called with the outbox's lock
/// held, so writes land in the order the outbox changed; a write is complete (durable) when
/// the call returns.
pub trait Journal: Send + Sync {
    /// `put` entered the outbox and the entries `removed` left it (acked, coalesced away or
    /// dropped), as one write, saying whether it reached the disk: a result the journal did not
    /// take must not let its attempt be recorded as ended. The caller logs and counts a failure
    /// (the outbox does, [`Outbox::journal_failures`]).
    fn write(&self, put: Option<Put<'_>>, removed: &[Seq]) -> Result<(), JournalError>;
}

#[derive(Debug)]
struct Entry {
    msg: std::sync::Arc<WorkerMsg>,
    bytes: usize,
    class: Class,
    /// Sent in this session (not in `unsent`).
    sent: bool,
    /// Its sender no longer wants it ([`Outbox::withdraw`]), but it was sent: held until the
    /// answer acknowledges it, never sent again.
    withdrawn: bool,
    coalesce: Option<Coalesce>,
}

/// The four classes, in send order.
const CLASSES: usize = 4;

#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    /// Held entries by sequence number.
    entries: HashMap<u64, Entry, Hasher>,
    /// Unsent entries of each class (indexed by [`Class`]), in sequence order. A queue, not an
    /// ordered set: new entries come at its end, sent ones leave at its front, and a set's
    /// node was allocated and freed each time a worker's queue filled and emptied.
    unsent: [VecDeque<u64>; CLASSES],
    coalesced: HashMap<Coalesce, u64, Hasher>,
    bytes: usize,
    acked_max: u64,
    full: bool,
    /// When "outbox is full" was last logged as a warning, and whether it was for the
    /// current episode: said at most every [`FULL_SAID_EVERY`], as an entry larger than the
    /// whole bound (a checkpoint's piece) fills it each time it is queued.
    full_said: Option<std::time::Instant>,
    full_loud: bool,
    /// Attempts whose results the coordinator acknowledged ([`Outbox::settle_attempt`]):
    /// their checkpoints are not held. The latest [`SETTLED_KEPT`], oldest first in
    /// `settled_order`; one forgotten only lets a late piece of it be sent, acknowledged
    /// `stale`.
    settled: std::collections::HashSet<(TaskId, Attempt), Hasher>,
    settled_order: VecDeque<(TaskId, Attempt)>,
    /// Held checkpoint announcements and pieces: an attempt's result acknowledged while there
    /// are none (nearly always) looks through no entries for them.
    checkpoints: usize,
    /// Entries removed so far (acknowledged, withdrawn, replaced): what is held at or below a
    /// sequence number already handed out changes only with it ([`Outbox::removed`]).
    removed: u64,
}

/// How many attempts whose results were acknowledged the outbox remembers, to hold no more of
/// their checkpoints: an upload still under way when its attempt's result is acknowledged
/// ends within a few pieces. Past it the oldest is forgotten, and a piece or announcement of
/// it pushed later (its upload still going after 1024 more results were acknowledged) is
/// held and sent again, as before [`Outbox::settle_attempt`]. That is harmless: it costs the
/// link the piece's bytes, never a wrong checkpoint, since the coordinator stores no
/// checkpoint of an attempt whose lease its result ended; what arrives after the result is
/// acknowledged `stale` (docs/PROTOCOL.md, section 11).
const SETTLED_KEPT: usize = 1024;

/// The task and attempt of a checkpoint's announcement or piece.
fn checkpoint_of(msg: &WorkerMsg) -> Option<(&TaskId, Attempt)> {
    match msg {
        WorkerMsg::Checkpoint(c) => Some((&c.task_id, c.attempt)),
        WorkerMsg::CheckpointData(d) => Some((&d.task_id, d.attempt)),
        _ => None,
    }
}

/// The least time between two "outbox is full" warnings (the others are debug lines).
const FULL_SAID_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Bounds of an outbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// What the session and the producers ask at every turn, published at the end of each use of
/// the lock, so that they ask without taking it.
#[derive(Debug, Default)]
struct Flags {
    /// Some entry is unsent.
    unsent: AtomicBool,
    /// Past a bound: producers wait in [`Outbox::reserve`].
    over: AtomicBool,
}

/// The outbox's lock, held: publishes the [`Flags`] as it is released.
struct Locked<'a> {
    inner: MutexGuard<'a, Inner>,
    flags: &'a Flags,
    limits: &'a Limits,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Still under the lock (the guard drops after this): the flags change in the lock's
        // order, and a notification sent after the release finds them set.
        let unsent = self.inner.unsent.iter().any(|u| !u.is_empty());
        self.flags.unsent.store(unsent, Ordering::Release);
        let over = self.inner.over(self.limits);
        self.flags.over.store(over, Ordering::Release);
    }
}

/// The outbox. Shared (`Arc`) between the executors that fill it and the session that drains it.
pub struct Outbox {
    inner: Mutex<Inner>,
    flags: Flags,
    limits: Limits,
    journal: Option<std::sync::Arc<dyn Journal>>,
    /// Woken when an entry becomes sendable.
    ready: Notify,
    /// Woken when room is made.
    room: Notify,
    /// Times the outbox was found full.
    pub full_events: AtomicU64,
    /// Telemetry entries dropped to make room.
    pub dropped: AtomicU64,
    /// Entries found too large for the coordinator's frames when about to be sent
    /// ([`Outbox::too_large`]): results made failures of their attempts, the rest dropped.
    pub oversize: AtomicU64,
    /// Journal writes that failed ([`JournalError`]).
    pub journal_failures: AtomicU64,
}

/// What became of an entry too large for the coordinator's frames ([`Outbox::too_large`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversize {
    /// A result: replaced, under its sequence number, by the failure of its attempt saying
    /// why, and queued to be sent.
    Failed,
    /// Anything else: dropped unsent (it is not acknowledged: `acked_max` stays).
    Dropped,
    /// No longer held (acknowledged meanwhile).
    NotHeld,
}

/// Whether a frame of `text_len` bytes of message text fits within the peer's `limit`, with
/// the integrity tag a keyed session appends (a compressed frame is inflated against the
/// same limit).
pub fn frame_fits(text_len: usize, limit: usize) -> bool {
    text_len.saturating_add(tether_proto::integrity::TEXT_TRAILER) <= limit
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("limits", &self.limits)
            .field("journal", &self.journal.is_some())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    pub fn new(limits: Limits) -> Self {
        Self::starting_at(limits, Seq(0))
    }

    /// An outbox whose next sequence number follows `last` (restored from a state directory).
    pub fn starting_at(limits: Limits, last: Seq) -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_seq: last.0 + 1,
                acked_max: last.0,
                ..Inner::default()
            }),
            flags: Flags::default(),
            limits,
            journal: None,
            ready: Notify::new(),
            room: Notify::new(),
            full_events: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            oversize: AtomicU64::new(0),
            journal_failures: AtomicU64::new(0),
        }
    }

    /// Writes every later change through `journal` (set once, at construction).
    pub fn with_journal(mut self, journal: std::sync::Arc<dyn Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    fn journal(&self, put: Option<Put<'_>>, removed: &[u64]) {
        // Logged and counted by `journal_checked`. A removal that did not reach the disk leaves
        // the entry there, and a restart sends it again: the coordinator answers `duplicate` or
        // `stale`. Only a result put needs more (`push_journaled`).
        let _ = self.journal_checked(put, removed);
    }

    /// [`Outbox::journal`], saying whether the write reached the disk (without a journal
    /// nothing is promised: `Ok`). A failure is logged and counted here.
    fn journal_checked(&self, put: Option<Put<'_>>, removed: &[u64]) -> Result<(), JournalError> {
        if put.is_none() && removed.is_empty() {
            return Ok(());
        }
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let removed: Vec<Seq> = removed.iter().copied().map(Seq).collect();
        let written = j.write(put, &removed);
        if let Err(error) = &written {
            self.journal_failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::JOURNAL_FAILURES).increment(1);
            let (seq, class) = (put.map(|p| p.seq.0), put.map(|p| p.class));
            tracing::error!(%error, seq, ?class, removed = removed.len(), "outbox journal write failed: what it put is still sent, but would not survive a crash");
        }
        written
    }

    fn lock(&self) -> Locked<'_> {
        // A panic while holding this lock leaves consistent data (every mutation is a few
        // map operations), so poisoning is ignored.
        Locked {
            inner: self.inner.lock().unwrap_or_else(|p| p.into_inner()),
            flags: &self.flags,
            limits: &self.limits,
        }
    }

    /// Adds an entry built from its sequence number and returns that number. Never blocks and
    /// never refuses: callers that produce at will call [`Outbox::reserve`] first.
    pub fn push(
        &self,
        class: Class,
        coalesce: Option<Coalesce>,
        make: impl FnOnce(Seq) -> WorkerMsg,
    ) -> Seq {
        self.push_at(class, coalesce, None, make).0
    }

    /// [`Outbox::push`], saying whether the journal took the entry (`Err`: the disk is full,
    /// say, and a crash would lose it). Held and sent either way; [`Outbox::rejournal`] writes
    /// it again.
    pub fn push_journaled(
        &self,
        class: Class,
        coalesce: Option<Coalesce>,
        make: impl FnOnce(Seq) -> WorkerMsg,
    ) -> (Seq, Result<(), JournalError>) {
        self.push_at(class, coalesce, None, make)
    }

    /// Writes the entry `seq` through the journal again, if it is still held: one whose first
    /// write failed. `Ok(false)`: no longer held (acknowledged meanwhile).
    pub fn rejournal(&self, seq: Seq) -> Result<bool, JournalError> {
        let inner = self.lock();
        let Some(e) = inner.entries.get(&seq.0) else {
            return Ok(false);
        };
        // INVARIANT: under the lock, as a push is: the removal an ack journals never lands
        // before it.
        self.journal_checked(Some(Put::new(e.class, seq, &e.msg)), &[])
            .map(|()| true)
    }

    /// [`Outbox::push`] of a checkpoint piece (`checkpoint_data`, class state) whose bytes lie
    /// at `offset` of its checkpoint, which the journal keeps already: it journals the piece
    /// by reference ([`Put::offset`]). Held here with its bytes, as any entry; not held at all
    /// (nor journaled, its number left unused) once its attempt's result was acknowledged
    /// ([`Outbox::settle_attempt`]), as a checkpoint's announcement pushed then is not.
    pub fn push_piece(&self, offset: u64, make: impl FnOnce(Seq) -> WorkerMsg) -> Seq {
        self.push_at(Class::State, None, Some(offset), make).0
    }

    fn push_at(
        &self,
        class: Class,
        coalesce: Option<Coalesce>,
        offset: Option<u64>,
        make: impl FnOnce(Seq) -> WorkerMsg,
    ) -> (Seq, Result<(), JournalError>) {
        let seq = {
            let mut inner = self.lock();
            let seq = inner.next_seq;
            inner.next_seq += 1;
            let mut removed = Vec::new();
            if let Some(key) = &coalesce {
                // One lookup, and the key copied only when new.
                let old = match inner.coalesced.get_mut(key) {
                    Some(s) => Some(std::mem::replace(s, seq)),
                    None => {
                        inner.coalesced.insert(key.clone(), seq);
                        None
                    }
                };
                if let Some(old) = old
                    && inner.remove(old).is_some()
                {
                    removed.push(old);
                }
            }
            let msg = std::sync::Arc::new(make(Seq(seq)));
            // The attempt's result was acknowledged: nothing of its checkpoints is stored any
            // more. Its number is left unused, as a dropped entry's is.
            if coalesce.is_none()
                && checkpoint_of(&msg).is_some_and(|(t, a)| inner.settled.contains(&(t.clone(), a)))
            {
                return (Seq(seq), Ok(()));
            }
            inner.insert(seq, class, msg.clone(), coalesce);
            if inner.over(&self.limits) {
                removed.extend(self.make_room(&mut inner));
            }
            // INVARIANT: journaled under the lock, before the entry can be acked or returned.
            let put = Put {
                class,
                seq: Seq(seq),
                msg: &msg,
                offset,
            };
            let journaled = self.journal_checked(Some(put), &removed);
            (Seq(seq), !removed.is_empty(), journaled)
        };
        let (seq, replaced, journaled) = seq;
        self.ready.notify_one();
        if replaced {
            // A state replaced by a smaller one, or telemetry dropped: room a producer waits for.
            self.room.notify_waiters();
        }
        (seq, journaled)
    }

    /// Waits until the outbox is below its bounds. Results, notices, state and checkpoints wait
    /// here rather than being dropped: nothing a task produced is lost.
    pub async fn reserve(&self) {
        // Nearly always: room, known without the lock.
        if !self.flags.over.load(Ordering::Acquire) {
            return;
        }
        loop {
            let room = self.room.notified();
            {
                let mut inner = self.lock();
                if !inner.over(&self.limits) {
                    return;
                }
                let dropped = self.make_room(&mut inner);
                self.journal(None, &dropped);
                if !inner.over(&self.limits) {
                    return;
                }
            }
            room.await;
        }
    }

    /// Drops telemetry until within bounds; returns the sequence numbers dropped.
    fn make_room(&self, inner: &mut Inner) -> Vec<u64> {
        // Telemetry goes first: it is the only class that may be dropped.
        let mut telemetry: Vec<u64> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.class == Class::Telemetry)
            .map(|(seq, _)| *seq)
            .collect();
        telemetry.sort_unstable();
        let mut dropped = Vec::new();
        for seq in telemetry {
            if !inner.over(&self.limits) {
                break;
            }
            inner.remove(seq);
            dropped.push(seq);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if inner.over(&self.limits) && !inner.full {
            inner.full = true;
            self.full_events.fetch_add(1, Ordering::Relaxed);
            let loud = inner.full_loud_at(std::time::Instant::now());
            let (entries, bytes) = (inner.entries.len(), inner.bytes);
            let (max_entries, max_bytes) = (self.limits.max_entries, self.limits.max_bytes);
            if !loud {
                tracing::debug!(
                    entries,
                    bytes,
                    max_entries,
                    max_bytes,
                    "outbox is full again"
                );
            } else {
                tracing::warn!(
                    entries,
                    bytes,
                    max_entries,
                    max_bytes,
                    "outbox is full; tasks wait until the coordinator acknowledges what is queued (said at most once a minute)"
                );
            }
        }
        dropped
    }

    /// The entry `seq`, taken to be sent, turned out `bytes` long as a message, more than the
    /// coordinator's frames take (`limit`, its `max_frame`: it was lowered since the entry
    /// was queued or journaled, say by a coordinator restarted with a smaller one). Sent, it
    /// would end the session (close 1009), and every later one as it was sent again. A result
    /// becomes the failure of its attempt, saying so, under the same sequence number (the
    /// attempt still ends with one result) and is queued again; anything else is dropped
    /// unsent. Logged, counted in [`Outbox::oversize`], and written through the journal.
    pub fn too_large(&self, seq: Seq, bytes: usize, limit: usize) -> Oversize {
        let (outcome, ty) = {
            let mut inner = self.lock();
            let Some(e) = inner.entries.get(&seq.0) else {
                return Oversize::NotHeld;
            };
            let ty = e.msg.type_name();
            let failure = match e.msg.as_ref() {
                WorkerMsg::TaskResult(r) => Some(oversize_failure(r, bytes, limit)),
                _ => None,
            }
            .filter(|f| frame_fits(tether_proto::encode(f).len(), limit));
            match failure {
                Some(failure) => {
                    let class = e.class;
                    let msg = std::sync::Arc::new(failure);
                    // INVARIANT: journaled under the lock, as a push is.
                    self.journal(Some(Put::new(class, seq, &msg)), &[]);
                    inner.replace(seq.0, msg);
                    (Oversize::Failed, ty)
                }
                None => {
                    inner.remove(seq.0);
                    self.journal(None, &[seq.0]);
                    (Oversize::Dropped, ty)
                }
            }
        };
        self.oversize.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::OVERSIZE, "type" => ty).increment(1);
        match outcome {
            Oversize::Failed => {
                tracing::error!(
                    seq = seq.0,
                    bytes,
                    limit,
                    "a queued result is larger than the coordinator's frames take; its attempt fails saying so instead"
                );
                self.ready.notify_one();
                // The failure is a fraction of the result's bytes.
                self.room.notify_waiters();
            }
            _ => {
                tracing::error!(
                    seq = seq.0,
                    r#type = ty,
                    bytes,
                    limit,
                    "a queued message is larger than the coordinator's frames take; it is dropped, not sent"
                );
                self.room.notify_waiters();
            }
        }
        outcome
    }

    /// The message held under `seq`, if it is still held.
    pub fn held(&self, seq: Seq) -> Option<std::sync::Arc<WorkerMsg>> {
        self.lock().entries.get(&seq.0).map(|e| e.msg.clone())
    }

    /// Marks `seq` delivered. Returns whether it was still held.
    pub fn ack(&self, seq: Seq) -> bool {
        self.take_acked(seq).is_some()
    }

    /// Like [`Outbox::ack`], returning the acknowledged message if it was still held.
    pub fn take_acked(&self, seq: Seq) -> Option<std::sync::Arc<WorkerMsg>> {
        self.take_acked_all([seq]).pop().map(|(_, msg)| msg)
    }

    /// Marks every sequence number of `seqs` delivered, under one lock and with one journal
    /// write (an `acks` message covers many); returns the messages that were still held, with
    /// their sequence numbers, in the order of `seqs`.
    pub fn take_acked_all(
        &self,
        seqs: impl IntoIterator<Item = Seq>,
    ) -> Vec<(Seq, std::sync::Arc<WorkerMsg>)> {
        self.take_acked_but(seqs, |_| false)
    }

    /// [`Outbox::take_acked_all`], leaving held each message `kept` says (a result named in
    /// `acks`, which never acknowledges one: only a confused or forged frame would).
    pub fn take_acked_but(
        &self,
        seqs: impl IntoIterator<Item = Seq>,
        kept: impl Fn(&WorkerMsg) -> bool,
    ) -> Vec<(Seq, std::sync::Arc<WorkerMsg>)> {
        let taken = {
            let mut inner = self.lock();
            let taken: Vec<(Seq, std::sync::Arc<WorkerMsg>)> = seqs
                .into_iter()
                .filter_map(|seq| {
                    if inner.entries.get(&seq.0).is_some_and(|e| kept(&e.msg)) {
                        return None;
                    }
                    inner.acked_max = inner.acked_max.max(seq.0);
                    inner.remove(seq.0).map(|msg| (seq, msg))
                })
                .collect();
            if self.journal.is_some() {
                let removed: Vec<u64> = taken.iter().map(|(seq, _)| seq.0).collect();
                self.journal(None, &removed);
            }
            if inner.full && !inner.over(&self.limits) {
                inner.room_again();
            }
            taken
        };
        if !taken.is_empty() {
            self.room.notify_waiters();
        }
        taken
    }

    /// Drops the held pieces (`checkpoint_data`) of the upload of checkpoint `id` of `task`
    /// announced at `announced`, sent or not: that announcement was rejected, so none of them
    /// would be stored (each would only come back `rejected`). The upload's pieces are those
    /// queued after its announcement and before the next announcement of the same checkpoint
    /// (a re-upload, whose pieces stay: an earlier upload still under way is not one of those
    /// either, its pieces come before `announced`). Returns how many were dropped.
    pub fn drop_checkpoint_pieces(
        &self,
        task: &TaskId,
        id: &CheckpointId,
        announced: Seq,
    ) -> usize {
        let dropped = {
            let mut inner = self.lock();
            let next = inner
                .entries
                .iter()
                .filter(|(seq, e)| {
                    **seq > announced.0
                        && matches!(e.msg.as_ref(), WorkerMsg::Checkpoint(c)
                            if &c.task_id == task && &c.checkpoint_id == id)
                })
                .map(|(seq, _)| *seq)
                .min()
                .unwrap_or(u64::MAX);
            let seqs: Vec<u64> = inner
                .entries
                .iter()
                .filter(|(seq, e)| {
                    (announced.0 + 1..next).contains(*seq)
                        && matches!(e.msg.as_ref(), WorkerMsg::CheckpointData(d)
                            if &d.task_id == task && &d.checkpoint_id == id)
                })
                .map(|(seq, _)| *seq)
                .collect();
            for seq in &seqs {
                inner.remove(*seq);
            }
            if !seqs.is_empty() {
                // INVARIANT: journaled under the lock, as an ack is.
                self.journal(None, &seqs);
            }
            if inner.full && !inner.over(&self.limits) {
                inner.room_again();
            }
            seqs.len()
        };
        if dropped > 0 {
            self.room.notify_waiters();
        }
        dropped
    }

    /// Takes back the held entries of `seqs` that their sender no longer wants (the requests
    /// of a checkpoint fetch that ended): an unsent one leaves at once; a sent one stays until
    /// its answer acknowledges it (the session counts it in flight until then) but is not sent
    /// again, leaving at the next [`Outbox::requeue_all`] instead. Neither survives a restart:
    /// their removal is journaled now. Returns how many were held.
    pub fn withdraw(&self, seqs: impl IntoIterator<Item = Seq>) -> usize {
        let (held, removed) = {
            let mut inner = self.lock();
            self.withdraw_locked(&mut inner, seqs.into_iter().map(|s| s.0))
        };
        if removed {
            self.room.notify_waiters();
        }
        held
    }

    /// [`Outbox::withdraw`] under the lock: how many were held, and whether one left at once.
    fn withdraw_locked(
        &self,
        inner: &mut Inner,
        seqs: impl IntoIterator<Item = u64>,
    ) -> (usize, bool) {
        let mut held = Vec::new();
        let mut removed = false;
        for seq in seqs {
            let Some(e) = inner.entries.get_mut(&seq) else {
                continue;
            };
            held.push(seq);
            if e.sent {
                e.withdrawn = true;
            } else {
                inner.remove(seq);
                removed = true;
            }
        }
        // INVARIANT: journaled under the lock, as an ack is.
        self.journal(None, &held);
        if inner.full && !inner.over(&self.limits) {
            inner.room_again();
        }
        (held.len(), removed)
    }

    /// The coordinator acknowledged the result of `attempt` of `task` (whatever its
    /// disposition: the attempt's lease has ended, and the coordinator answers what follows
    /// of its checkpoints `stale`, storing none of it; docs/PROTOCOL.md, section 11). Its
    /// checkpoint announcements and pieces still held are withdrawn ([`Outbox::withdraw`]):
    /// those not yet sent leave at once, those in flight are not sent again, and none survives
    /// a restart. Nothing waits for their sequence numbers: the coordinator acknowledges each
    /// message by its own. Pieces of that attempt pushed later are not held
    /// ([`Outbox::push_piece`]), nor its announcements: an upload still under way (a re-upload
    /// the coordinator asked for) queues nothing more. Checkpoints of the task's other
    /// attempts, and of other tasks, are untouched. Returns how many were held.
    pub fn settle_attempt(&self, task: &TaskId, attempt: Attempt) -> usize {
        let (held, removed) = {
            let mut inner = self.lock();
            let key = (task.clone(), attempt);
            if inner.settled.insert(key.clone()) {
                inner.settled_order.push_back(key);
                while inner.settled_order.len() > SETTLED_KEPT {
                    if let Some(old) = inner.settled_order.pop_front() {
                        inner.settled.remove(&old);
                    }
                }
            }
            if inner.checkpoints == 0 {
                return 0;
            }
            let mut seqs: Vec<u64> = inner
                .entries
                .iter()
                .filter(|(_, e)| checkpoint_of(&e.msg) == Some((task, attempt)))
                .map(|(seq, _)| *seq)
                .collect();
            seqs.sort_unstable();
            self.withdraw_locked(&mut inner, seqs)
        };
        if removed {
            self.room.notify_waiters();
        }
        held
    }

    /// Whether the result of `attempt` of `task` was acknowledged ([`Outbox::settle_attempt`]):
    /// its checkpoints are no longer queued.
    pub fn is_settled(&self, task: &TaskId, attempt: Attempt) -> bool {
        self.lock().settled.contains(&(task.clone(), attempt))
    }

    /// Starts a new session: everything held becomes unsent again, in order; what was
    /// withdrawn ([`Outbox::withdraw`]) leaves instead, unanswered: its answer would have come
    /// in the session that ended.
    pub fn requeue_all(&self) {
        let mut inner = self.lock();
        let withdrawn: Vec<u64> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.withdrawn)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &withdrawn {
            inner.remove(*seq);
        }
        let Inner {
            entries, unsent, ..
        } = &mut *inner;
        let mut held: [Vec<u64>; CLASSES] = Default::default();
        for (seq, e) in entries.iter_mut() {
            e.sent = false;
            held[e.class as usize].push(*seq);
        }
        // Built from sorted runs (in bulk), not by an insert per entry in the map's order.
        for (unsent, mut seqs) in unsent.iter_mut().zip(held) {
            seqs.sort_unstable();
            *unsent = seqs.into();
        }
        if !withdrawn.is_empty() && inner.full && !inner.over(&self.limits) {
            inner.room_again();
        }
        drop(inner);
        self.ready.notify_one();
        if !withdrawn.is_empty() {
            self.room.notify_waiters();
        }
    }

    /// Takes up to `max` unsent entries, in send order.
    pub fn take_unsent(&self, max: usize) -> Vec<(Seq, std::sync::Arc<WorkerMsg>)> {
        self.take_unsent_within(max, usize::MAX)
            .into_iter()
            .map(|(seq, msg, _)| (seq, msg))
            .collect()
    }

    /// Takes up to `max` unsent entries, in send order, whose estimated sizes add up to at most
    /// `budget` bytes (always at least one when any is unsent), with those sizes.
    pub fn take_unsent_within(
        &self,
        max: usize,
        budget: usize,
    ) -> Vec<(Seq, std::sync::Arc<WorkerMsg>, usize)> {
        let mut inner = self.lock();
        let Inner {
            entries, unsent, ..
        } = &mut *inner;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for unsent in unsent.iter_mut() {
            while out.len() < max {
                let Some(&seq) = unsent.front() else {
                    break;
                };
                // INVARIANT: `unsent` holds only held entries (`Inner::remove` keeps it so).
                let Some(e) = entries.get_mut(&seq) else {
                    unsent.pop_front();
                    continue;
                };
                if !out.is_empty() && bytes.saturating_add(e.bytes) > budget {
                    return out;
                }
                bytes = bytes.saturating_add(e.bytes);
                e.sent = true;
                out.push((Seq(seq), e.msg.clone(), e.bytes));
                unsent.pop_front();
            }
        }
        out
    }

    /// Puts entries taken by [`Outbox::take_unsent_within`] and then not written back as
    /// unsent, in their place in send order. Entries no longer held (acknowledged meanwhile)
    /// or not marked sent are left alone; one withdrawn meanwhile ([`Outbox::withdraw`])
    /// leaves.
    pub fn unsend(&self, seqs: impl IntoIterator<Item = Seq>) {
        let mut inner = self.lock();
        let Inner {
            entries, unsent, ..
        } = &mut *inner;
        let mut any = false;
        let mut withdrawn = Vec::new();
        for seq in seqs {
            let Some(e) = entries.get_mut(&seq.0).filter(|e| e.sent) else {
                continue;
            };
            // Withdrawn after it was taken: never written, so nothing answers it.
            if e.withdrawn {
                withdrawn.push(seq.0);
                continue;
            }
            e.sent = false;
            let queue = &mut unsent[e.class as usize];
            if let Err(at) = queue.binary_search(&seq.0) {
                queue.insert(at, seq.0);
            }
            any = true;
        }
        for seq in &withdrawn {
            inner.remove(*seq);
        }
        if !withdrawn.is_empty() && inner.full && !inner.over(&self.limits) {
            inner.room_again();
        }
        drop(inner);
        if any {
            self.ready.notify_one();
        }
        if !withdrawn.is_empty() {
            self.room.notify_waiters();
        }
    }

    /// Waits until an entry may be sendable.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Whether some entry is unsent (without taking the lock: as of the last change).
    pub fn has_unsent(&self) -> bool {
        self.flags.unsent.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Highest sequence number acknowledged so far.
    pub fn acked_max(&self) -> Seq {
        Seq(self.lock().acked_max)
    }

    /// Last sequence number handed out.
    pub fn last_seq(&self) -> Seq {
        Seq(self.lock().next_seq - 1)
    }

    /// The highest sequence number held unacknowledged, telemetry left out (it may be
    /// replaced before it is sent), if any: what the replay after a registration reaches. A
    /// scan, once a registration.
    pub fn last_pending(&self) -> Option<Seq> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| e.class != Class::Telemetry)
            .map(|(seq, _)| *seq)
            .max()
            .map(Seq)
    }

    /// How many entries were removed so far: [`Outbox::holds_through`] of a sequence number
    /// already handed out can change only when this does (new entries are numbered past it).
    pub fn removed(&self) -> u64 {
        self.lock().removed
    }

    /// Whether something other than telemetry is held at or below `through`.
    pub fn holds_through(&self, through: Seq) -> bool {
        self.lock()
            .entries
            .iter()
            .any(|(seq, e)| *seq <= through.0 && e.class != Class::Telemetry)
    }

    /// Whether nothing is held but telemetry: every result, state, notice and checkpoint
    /// piece is acknowledged (a stopping worker's last step, see the session).
    pub fn holds_only_telemetry(&self) -> bool {
        self.lock()
            .entries
            .values()
            .all(|e| e.class == Class::Telemetry)
    }

    /// Tasks whose result waits for an ack, for the inventory.
    pub fn pending_results(&self) -> Vec<TaskRef> {
        let inner = self.lock();
        let mut results: Vec<(u64, TaskRef)> = inner
            .entries
            .iter()
            .filter_map(|(seq, e)| match e.msg.as_ref() {
                WorkerMsg::TaskResult(r) => {
                    Some((*seq, TaskRef::new(r.task_id.clone(), r.attempt)))
                }
                _ => None,
            })
            .collect();
        results.sort_unstable_by_key(|(seq, _)| *seq);
        results.into_iter().map(|(_, r)| r).collect()
    }

    /// A snapshot of every held entry, in send order (for persistence and tests).
    pub fn snapshot(&self) -> Vec<(Class, Seq, std::sync::Arc<WorkerMsg>)> {
        let inner = self.lock();
        let mut all: Vec<(Class, Seq, std::sync::Arc<WorkerMsg>)> = inner
            .entries
            .iter()
            .map(|(seq, e)| (e.class, Seq(*seq), e.msg.clone()))
            .collect();
        all.sort_unstable_by_key(|(class, seq, _)| (*class, *seq));
        all
    }

    /// Puts back an entry restored from a state directory, keeping its sequence number.
    pub fn restore(&self, class: Class, msg: WorkerMsg) {
        let Some(seq) = msg.seq() else { return };
        let mut inner = self.lock();
        inner.next_seq = inner.next_seq.max(seq.0 + 1);
        // Not acknowledged: what the registration reports as acknowledged stays below it.
        inner.acked_max = inner.acked_max.min(seq.0.saturating_sub(1));
        let coalesce = match &msg {
            WorkerMsg::TaskState(s) => Some(Coalesce::task_state(&s.task_id, s.attempt)),
            WorkerMsg::Telemetry(_) => Some(Coalesce::Telemetry),
            _ => None,
        };
        if let Some(key) = &coalesce {
            inner.coalesced.insert(key.clone(), seq.0);
        }
        inner.insert(seq.0, class, std::sync::Arc::new(msg), coalesce);
    }
}

impl Inner {
    /// Whether a full episode entered at `now` is said as a warning: not when one was within
    /// [`FULL_SAID_EVERY`].
    fn full_loud_at(&mut self, now: std::time::Instant) -> bool {
        let quiet = self
            .full_said
            .is_some_and(|at| now.saturating_duration_since(at) < FULL_SAID_EVERY);
        if !quiet {
            self.full_said = Some(now);
        }
        self.full_loud = !quiet;
        self.full_loud
    }

    /// Leaves a full episode, saying so as loudly as it was entered.
    fn room_again(&mut self) {
        self.full = false;
        if std::mem::take(&mut self.full_loud) {
            tracing::info!("outbox has room again");
        } else {
            tracing::debug!("outbox has room again");
        }
    }

    fn over(&self, limits: &Limits) -> bool {
        self.entries.len() > limits.max_entries || self.bytes > limits.max_bytes
    }

    /// Holds a new entry, unsent.
    fn insert(
        &mut self,
        seq: u64,
        class: Class,
        msg: std::sync::Arc<WorkerMsg>,
        coalesce: Option<Coalesce>,
    ) {
        let bytes = approx_size(&msg);
        self.bytes += bytes;
        self.checkpoints += usize::from(checkpoint_of(&msg).is_some());
        let unsent = &mut self.unsent[class as usize];
        match unsent.back() {
            // New entries: at the end.
            Some(&last) if last >= seq => {
                // Restored ones may come in any order.
                if let Err(at) = unsent.binary_search(&seq) {
                    unsent.insert(at, seq);
                }
            }
            _ => unsent.push_back(seq),
        }
        self.entries.insert(
            seq,
            Entry {
                msg,
                bytes,
                class,
                sent: false,
                withdrawn: false,
                coalesce,
            },
        );
    }

    /// Puts `msg` in place of the message of the held entry `seq` (same class, key and
    /// number), unsent.
    fn replace(&mut self, seq: u64, msg: std::sync::Arc<WorkerMsg>) {
        let Some(e) = self.entries.get_mut(&seq) else {
            return;
        };
        let bytes = approx_size(&msg);
        self.bytes = self.bytes - e.bytes + bytes;
        self.checkpoints = self.checkpoints - usize::from(checkpoint_of(&e.msg).is_some())
            + usize::from(checkpoint_of(&msg).is_some());
        e.bytes = bytes;
        e.msg = msg;
        if std::mem::replace(&mut e.sent, false) {
            let unsent = &mut self.unsent[e.class as usize];
            if let Err(at) = unsent.binary_search(&seq) {
                unsent.insert(at, seq);
            }
        }
    }

    /// Removes an entry; the message if it was held.
    fn remove(&mut self, seq: u64) -> Option<std::sync::Arc<WorkerMsg>> {
        let e = self.entries.remove(&seq)?;
        self.removed += 1;
        self.checkpoints -= usize::from(checkpoint_of(&e.msg).is_some());
        if !e.sent {
            let unsent = &mut self.unsent[e.class as usize];
            if let Ok(at) = unsent.binary_search(&seq) {
                unsent.remove(at);
            }
        }
        self.bytes -= e.bytes;
        if let Some(c) = e.coalesce
            && let std::collections::hash_map::Entry::Occupied(o) = self.coalesced.entry(c)
            && *o.get() == seq
        {
            o.remove();
        }
        Some(e.msg)
    }
}

/// The failure of the attempt whose result `r` is `bytes` long as a message, over `limit`:
/// what it ran and when is kept; an error it reported is kept as the detail, cut to a KiB.
fn oversize_failure(r: &tether_proto::msg::TaskResult, bytes: usize, limit: usize) -> WorkerMsg {
    let detail = r.error.as_ref().map(|e| {
        let mut cut = 1024.min(e.message.len());
        while !e.message.is_char_boundary(cut) {
            cut -= 1;
        }
        e.message[..cut].to_owned()
    });
    WorkerMsg::TaskResult(tether_proto::msg::TaskResult {
        seq: r.seq,
        task_id: r.task_id.clone(),
        attempt: r.attempt,
        outcome: tether_proto::Outcome::Failed,
        result: serde_json::json!({}).into(),
        error: Some(tether_proto::task::TaskError {
            message: format!(
                "the result ({bytes} bytes as a message) is larger than a message may be ({limit} bytes, the coordinator's limit); it was not sent"
            ),
            detail,
        }),
        worker_fault: false,
        started_at: r.started_at,
        finished_at: r.finished_at,
        duration_ms: r.duration_ms,
        timestamp: tether_proto::msg::now(),
    })
}

/// Size estimate without encoding: the payload-carrying fields dominate.
fn approx_size(msg: &WorkerMsg) -> usize {
    const BASE: usize = 160;
    match msg {
        WorkerMsg::CheckpointData(d) => BASE + d.data.0.len() * 4 / 3,
        WorkerMsg::TaskResult(r) => BASE + r.result.get().len(),
        WorkerMsg::TaskState(s) => BASE + s.state.get().len(),
        WorkerMsg::Telemetry(t) => BASE + 600 + t.metrics.get().len(),
        _ => BASE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox filled again and again (each piece of a checkpoint larger than its whole
    /// bound) warns once a minute, not once a piece.
    #[test]
    fn a_full_outbox_is_said_at_most_once_a_minute() {
        let mut inner = Inner::default();
        let t0 = std::time::Instant::now();
        assert!(inner.full_loud_at(t0));
        assert!(!inner.full_loud_at(t0 + std::time::Duration::from_secs(1)));
        assert!(!inner.full_loud_at(t0 + std::time::Duration::from_secs(59)));
        assert!(inner.full_loud_at(t0 + FULL_SAID_EVERY));
    }
    use tether_proto::msg::{TaskState, Telemetry, now};
    use tether_proto::task::ConnStats;

    fn tid(s: &str) -> TaskId {
        TaskId::parse(s).expect("id")
    }

    fn state(ob: &Outbox, task: &str, v: i64) -> Seq {
        state_of(ob, task, 1, v)
    }

    fn state_of(ob: &Outbox, task: &str, attempt: u32, v: i64) -> Seq {
        let key = Coalesce::task_state(&tid(task), Attempt(attempt));
        ob.push(Class::State, Some(key), |seq| {
            WorkerMsg::TaskState(TaskState {
                seq,
                task_id: tid(task),
                attempt: Attempt(attempt),
                state: serde_json::json!({ "v": v }).into(),
                timestamp: now(),
            })
        })
    }

    fn result(ob: &Outbox, task: &str) -> Seq {
        result_of(ob, task, 1, serde_json::json!({}))
    }

    /// Pushes the completed result `body` of `task` at `attempt`.
    fn result_of(ob: &Outbox, task: &str, attempt: u32, body: serde_json::Value) -> Seq {
        ob.push(Class::Result, None, |seq| {
            WorkerMsg::TaskResult(tether_proto::msg::TaskResult {
                seq,
                task_id: tid(task),
                attempt: Attempt(attempt),
                outcome: tether_proto::Outcome::Completed,
                result: body.into(),
                error: None,
                worker_fault: false,
                started_at: now(),
                finished_at: now(),
                duration_ms: 0,
                timestamp: now(),
            })
        })
    }

    fn telemetry(ob: &Outbox) -> Seq {
        ob.push(Class::Telemetry, Some(Coalesce::Telemetry), |seq| {
            WorkerMsg::Telemetry(Telemetry {
                seq,
                connection_stats: ConnStats::default(),
                metrics: serde_json::json!({}).into(),
                timestamp: now(),
            })
        })
    }

    fn order(ob: &Outbox) -> Vec<u64> {
        ob.take_unsent(usize::MAX)
            .into_iter()
            .map(|(s, _)| s.0)
            .collect()
    }

    fn piece(ob: &Outbox, task: &str, checkpoint: &str, chunk: u32) -> Seq {
        ob.push(Class::State, None, |seq| {
            WorkerMsg::CheckpointData(tether_proto::msg::CheckpointData {
                seq,
                task_id: tid(task),
                attempt: Attempt(1),
                checkpoint_id: CheckpointId::parse(checkpoint).expect("id"),
                chunk,
                data: tether_proto::task::Blob(vec![chunk as u8; 8]),
                timestamp: now(),
            })
        })
    }

    fn announcement(ob: &Outbox, task: &str, checkpoint: &str) -> Seq {
        ob.push(Class::State, None, |seq| {
            WorkerMsg::Checkpoint(tether_proto::msg::Checkpoint {
                seq,
                task_id: tid(task),
                attempt: Attempt(1),
                checkpoint_id: CheckpointId::parse(checkpoint).expect("id"),
                size: 16,
                chunks: 2,
                timestamp: now(),
            })
        })
    }

    /// The pieces of a refused checkpoint leave, sent or not; another checkpoint's, another
    /// What a registration's replay reaches (`Inventory::replay_through`): the highest
    /// sequence number held, acknowledged ones and telemetry (replaced before it goes) left
    /// out; none with nothing else held.
    #[test]
    fn the_last_pending_message_leaves_out_the_acknowledged_and_telemetry() {
        let ob = Outbox::new(Limits::default());
        assert_eq!(ob.last_pending(), None);
        let announced = announcement(&ob, "a", "c-1");
        let data = piece(&ob, "a", "c-1", 0);
        telemetry(&ob);
        assert_eq!(ob.last_pending(), Some(data));
        assert!(ob.ack(data));
        assert_eq!(ob.last_pending(), Some(announced));
        assert!(ob.ack(announced));
        assert_eq!(ob.last_pending(), None, "telemetry alone");
    }

    /// Whether the replay through a sequence number is acknowledged: anything but telemetry
    /// held at or below it says not; a later message held does not.
    #[test]
    fn what_is_held_through_a_sequence_number_leaves_out_telemetry_and_later_messages() {
        let ob = Outbox::new(Limits::default());
        let announced = announcement(&ob, "a", "c-1");
        let data = piece(&ob, "a", "c-1", 0);
        let report = telemetry(&ob);
        assert!(ob.holds_through(announced) && ob.holds_through(data));
        // The session checks again only when something left: pushes count nothing.
        assert_eq!(ob.removed(), 0);
        assert!(ob.ack(announced));
        assert_eq!(ob.removed(), 1);
        assert!(!ob.holds_through(announced), "only a later message held");
        assert!(ob.holds_through(report), "the piece below the telemetry");
        telemetry(&ob);
        assert!(ob.ack(data));
        assert!(!ob.holds_through(report), "telemetry alone");
        assert_eq!(
            ob.removed(),
            3,
            "two acks and the report replaced by the next"
        );
    }

    /// task's and everything else stay.
    #[test]
    fn the_pieces_of_a_refused_checkpoint_are_dropped_and_nothing_else() {
        let ob = Outbox::new(Limits::default());
        let announced = announcement(&ob, "a", "c-1");
        assert!(ob.take_acked(announced).is_some(), "acknowledged: rejected");
        let sent = piece(&ob, "a", "c-1", 0);
        assert_eq!(order(&ob), vec![sent.0]);
        let unsent = piece(&ob, "a", "c-1", 1);
        let other = piece(&ob, "a", "c-2", 0);
        let other_task = piece(&ob, "b", "c-1", 0);
        let r = result(&ob, "a");
        let c1 = CheckpointId::parse("c-1").expect("id");
        let dropped = ob.drop_checkpoint_pieces(&tid("a"), &c1, announced);
        assert_eq!(dropped, 2);
        assert_eq!(ob.len(), 3);
        assert!(ob.take_acked(sent).is_none() && ob.take_acked(unsent).is_none());
        assert_eq!(order(&ob), vec![r.0, other.0, other_task.0]);
    }

    /// A re-upload of a checkpoint whose first upload is still under way, refused (by a
    /// coordinator that saw another count of pieces for it): the first upload's pieces, queued
    /// before the refused announcement, stay; so do those of a later re-upload.
    #[test]
    fn a_refused_re_upload_drops_its_own_pieces_not_another_uploads_of_the_checkpoint() {
        let ob = Outbox::new(Limits::default());
        let first = announcement(&ob, "a", "c-1");
        let kept = [piece(&ob, "a", "c-1", 0), piece(&ob, "a", "c-1", 1)];
        let again = announcement(&ob, "a", "c-1");
        let dropped = [piece(&ob, "a", "c-1", 0), piece(&ob, "a", "c-1", 1)];
        let later = announcement(&ob, "a", "c-1");
        let kept_later = piece(&ob, "a", "c-1", 0);
        assert!(ob.take_acked(first).is_some());
        assert!(ob.take_acked(again).is_some(), "acknowledged: rejected");
        let c1 = CheckpointId::parse("c-1").expect("id");
        assert_eq!(ob.drop_checkpoint_pieces(&tid("a"), &c1, again), 2);
        let left = order(&ob);
        assert_eq!(left, vec![kept[0].0, kept[1].0, later.0, kept_later.0]);
        assert!(dropped.iter().all(|s| !left.contains(&s.0)));
    }

    /// The outbox remembers the latest [`SETTLED_KEPT`] settled attempts: settling one more
    /// forgets the oldest, whose late piece is then held (and sent: the coordinator answers it
    /// `stale`), while the oldest still remembered holds none. Settling one already settled
    /// again forgets nothing.
    #[test]
    fn past_the_settled_window_the_oldest_attempt_is_forgotten_and_its_late_piece_is_held() {
        let ob = Outbox::new(Limits::default());
        let task = |i: usize| format!("t{i}");
        for i in 0..SETTLED_KEPT {
            assert_eq!(
                ob.settle_attempt(&tid(&task(i)), Attempt(1)),
                0,
                "none held"
            );
        }
        assert!(
            ob.is_settled(&tid("t0"), Attempt(1)),
            "the window holds all"
        );
        ob.settle_attempt(&tid("t1"), Attempt(1));
        assert!(
            ob.is_settled(&tid("t0"), Attempt(1)),
            "a repeat forgets nothing"
        );
        ob.settle_attempt(&tid(&task(SETTLED_KEPT)), Attempt(1));
        assert!(
            !ob.is_settled(&tid("t0"), Attempt(1)),
            "the oldest forgotten"
        );
        assert!(ob.is_settled(&tid("t1"), Attempt(1)));
        assert!(ob.is_settled(&tid(&task(SETTLED_KEPT)), Attempt(1)));
        let late = piece(&ob, "t0", "c-1", 0);
        piece(&ob, "t1", "c-1", 0);
        announcement(&ob, "t1", "c-1");
        assert_eq!(
            order(&ob),
            vec![late.0],
            "only the forgotten attempt's piece is held"
        );
    }

    /// Entries their sender withdrew (the requests of a fetch that ended): the unsent leave at
    /// once, journaled; a sent one stays for its answer to acknowledge, but leaves rather than
    /// go again in a new session; one taken to be sent and then not written leaves as it is
    /// put back. Nothing else is touched.
    #[test]
    fn withdrawn_entries_are_never_sent_again_and_a_sent_one_waits_for_its_answer() {
        let rec = std::sync::Arc::new(Recorder::default());
        let ob = Outbox::new(Limits::default()).with_journal(rec.clone());
        let r = result(&ob, "r");
        let [sent, taken, unsent] = ["a", "b", "c"].map(|task| state(&ob, task, 1));
        assert_eq!(order(&ob), vec![r.0, sent.0, taken.0, unsent.0]);
        ob.requeue_all();
        assert_eq!(ob.take_unsent(3).len(), 3, "r, sent and taken");
        let before = rec.0.lock().expect("recorder").len();
        assert_eq!(ob.withdraw([sent, taken, unsent, Seq(999)]), 3);
        assert_eq!(
            rec.0.lock().expect("recorder")[before..],
            [(None, vec![sent.0, taken.0, unsent.0])],
            "journaled as they are withdrawn"
        );
        assert!(ob.take_unsent(10).is_empty(), "the unsent one left");
        assert_eq!(ob.len(), 3, "r and the two sent wait for answers");
        ob.unsend([taken]);
        assert_eq!(ob.len(), 2, "the one not written left");
        assert!(ob.take_unsent(10).is_empty());
        ob.requeue_all();
        assert_eq!(order(&ob), vec![r.0], "the sent one is not sent again");
        assert_eq!(ob.len(), 1);
    }

    #[test]
    fn results_go_first_then_state_then_telemetry_in_sequence_order() {
        let ob = Outbox::new(Limits::default());
        let t = telemetry(&ob);
        let s1 = state(&ob, "a", 1);
        let r1 = result(&ob, "x");
        let s2 = state(&ob, "b", 1);
        let r2 = result(&ob, "y");
        assert_eq!(order(&ob), vec![r1.0, r2.0, s1.0, s2.0, t.0]);
    }

    #[test]
    fn taking_within_a_byte_budget_stops_at_the_budget_but_always_takes_one() {
        let ob = Outbox::new(Limits::default());
        let seqs: Vec<Seq> = (0..5).map(|i| result(&ob, &format!("t{i}"))).collect();
        let one = ob.take_unsent_within(10, 1);
        assert_eq!(
            one.len(),
            1,
            "a budget smaller than any entry still takes one"
        );
        assert_eq!(one[0].0, seqs[0]);
        let size = one[0].2;
        let two = ob.take_unsent_within(10, 2 * size + size / 2);
        let got: Vec<Seq> = two.iter().map(|(s, _, _)| *s).collect();
        assert_eq!(got, seqs[1..3], "in order, as many as fit");
        let rest = ob.take_unsent_within(10, usize::MAX);
        assert_eq!(rest.len(), 2);
        assert!(!ob.has_unsent());
    }

    /// Entries taken but not written go back in their place in send order; one acknowledged
    /// meanwhile, or never taken, is left alone.
    #[test]
    fn entries_taken_and_not_written_are_put_back_in_send_order() {
        let ob = Outbox::new(Limits::default());
        let s1 = state(&ob, "a", 1);
        let r1 = result(&ob, "x");
        let r2 = result(&ob, "y");
        let taken: Vec<Seq> = ob.take_unsent(2).into_iter().map(|(s, _)| s).collect();
        assert_eq!(taken, [r1, r2]);
        let s2 = state(&ob, "b", 1);
        ob.ack(r1);
        ob.unsend([r2, r1, s2]);
        assert!(ob.has_unsent());
        assert_eq!(order(&ob), vec![r2.0, s1.0, s2.0]);
        ob.unsend([r2]);
        assert_eq!(order(&ob), vec![r2.0]);
        assert!(!ob.has_unsent());
    }

    #[test]
    fn state_updates_of_one_task_coalesce_to_the_latest() {
        let ob = Outbox::new(Limits::default());
        state(&ob, "a", 1);
        state(&ob, "b", 1);
        let latest = state(&ob, "a", 2);
        let sent = ob.take_unsent(10);
        assert_eq!(sent.len(), 2);
        let a = sent
            .iter()
            .find(|(s, _)| *s == latest)
            .expect("latest state of a is held");
        match a.1.as_ref() {
            WorkerMsg::TaskState(s) => assert_eq!(s.state.to_value().expect("json")["v"], 2),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A task's new attempt (the coordinator moved it here again) reports its state while the
    /// older attempt's last state still waits: neither replaces the other, as they are filed
    /// apart by the coordinator; each attempt's own updates still coalesce, after a restart
    /// too.
    #[test]
    fn state_updates_coalesce_per_attempt_not_per_task() {
        let ob = Outbox::new(Limits::default());
        let old = state_of(&ob, "a", 1, 1);
        let newer = state_of(&ob, "a", 2, 1);
        let latest = state_of(&ob, "a", 2, 2);
        let held: Vec<Seq> = ob.snapshot().iter().map(|(_, s, _)| *s).collect();
        assert_eq!(
            held,
            [old, latest],
            "attempt 1's state kept, attempt 2's coalesced"
        );
        assert!(ob.held(newer).is_none());
        let restored = Outbox::new(Limits::default());
        for (class, _, msg) in ob.snapshot() {
            restored.restore(class, (*msg).clone());
        }
        let after = state_of(&restored, "a", 2, 3);
        let held: Vec<Seq> = restored.snapshot().iter().map(|(_, s, _)| *s).collect();
        assert_eq!(held, [old, after], "restored entries keep their keys");
        let first = state_of(&restored, "a", 1, 9);
        let held: Vec<Seq> = restored.snapshot().iter().map(|(_, s, _)| *s).collect();
        assert_eq!(
            held,
            [after, first],
            "a late update of attempt 1 replaces only its own"
        );
    }

    #[test]
    fn unacked_entries_are_sent_again_on_a_new_session_and_acked_ones_are_not() {
        let ob = Outbox::new(Limits::default());
        let a = result(&ob, "a");
        let b = result(&ob, "b");
        assert_eq!(order(&ob), vec![a.0, b.0]);
        assert!(order(&ob).is_empty(), "sent once per session");
        assert!(ob.ack(a));
        assert!(!ob.ack(a), "a second ack is harmless");
        ob.requeue_all();
        assert_eq!(order(&ob), vec![b.0]);
        assert_eq!(ob.acked_max(), a);
        assert_eq!(ob.pending_results().len(), 1);
    }

    #[test]
    fn a_full_outbox_drops_telemetry_first_and_keeps_results() {
        let ob = Outbox::new(Limits {
            max_entries: 3,
            max_bytes: usize::MAX,
        });
        telemetry(&ob);
        result(&ob, "a");
        result(&ob, "b");
        result(&ob, "c");
        assert_eq!(ob.len(), 3);
        assert_eq!(ob.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(ob.pending_results().len(), 3);
        result(&ob, "d");
        assert_eq!(ob.len(), 4, "results are never dropped");
        assert_eq!(ob.full_events.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn producers_wait_for_room_until_an_ack_makes_it() {
        let ob = std::sync::Arc::new(Outbox::new(Limits {
            max_entries: 1,
            max_bytes: usize::MAX,
        }));
        let a = result(&ob, "a");
        result(&ob, "b");
        let waiter = {
            let ob = ob.clone();
            tokio::spawn(async move { ob.reserve().await })
        };
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "no room yet");
        ob.ack(a);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }

    /// A result too large for the coordinator's frames becomes its small failure: the bytes it
    /// gave back wake a producer waiting for room (it slept until the next acknowledgement).
    #[tokio::test(start_paused = true)]
    async fn a_result_made_its_small_failure_wakes_a_producer_waiting_for_room() {
        let ob = std::sync::Arc::new(Outbox::new(Limits {
            max_entries: usize::MAX,
            max_bytes: 64 * 1024,
        }));
        let blob = serde_json::json!({"blob": "x".repeat(100 * 1024)});
        let big = result_of(&ob, "big", 1, blob);
        let waiter = {
            let ob = ob.clone();
            tokio::spawn(async move { ob.reserve().await })
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "no room yet");
        assert_eq!(ob.too_large(big, 100 * 1024, 32 * 1024), Oversize::Failed);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }

    /// Entries restored from a state directory were not acknowledged: the highest sequence
    /// number the registration reports as acknowledged stays below the oldest of them.
    #[test]
    fn restored_entries_are_not_reported_acknowledged() {
        let restored = Outbox::new(Limits::default());
        let held = result(&restored, "t");
        let ob = Outbox::starting_at(Limits::default(), Seq(7));
        let msg = restored.take_acked(held).expect("held");
        ob.restore(Class::Result, (*msg).clone());
        assert!(ob.acked_max() < held, "{:?}", ob.acked_max());
        assert_eq!(ob.pending_results().len(), 1);
    }

    /// What `acks` acknowledges leaves the outbox, but a result named there stays held (`acks`
    /// never acknowledges one: a confused or forged frame would have it dropped undelivered).
    #[test]
    fn a_result_named_where_results_are_never_acknowledged_stays_held() {
        let ob = Outbox::new(Limits::default());
        let r = result(&ob, "r");
        let st = state(&ob, "s", 1);
        let results = |m: &WorkerMsg| matches!(m, WorkerMsg::TaskResult(_));
        let taken = ob.take_acked_but([r, st], results);
        assert_eq!(taken.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [st]);
        assert_eq!(ob.pending_results().len(), 1, "the result is still held");
    }

    #[test]
    fn whether_anything_is_unsent_or_over_the_bounds_is_published_at_every_change() {
        let ob = Outbox::new(Limits {
            max_entries: 2,
            max_bytes: usize::MAX,
        });
        let over = |ob: &Outbox| ob.flags.over.load(Ordering::Acquire);
        assert!(!ob.has_unsent());
        state(&ob, "a", 1);
        let a = state(&ob, "a", 2);
        assert!(ob.has_unsent());
        assert_eq!(ob.take_unsent(10).len(), 1, "coalesced");
        assert!(!ob.has_unsent(), "all sent");
        ob.requeue_all();
        assert!(ob.has_unsent(), "a new session sends it again");
        ob.take_unsent(10);
        ob.ack(a);
        assert!(!ob.has_unsent());
        let [x, y] = [result(&ob, "x"), result(&ob, "y")];
        assert!(!over(&ob), "at the bound, not past it");
        result(&ob, "z");
        assert!(over(&ob));
        ob.take_unsent(1);
        assert!(ob.has_unsent(), "two left");
        ob.take_acked_all([x, y]);
        assert!(!over(&ob), "an ack made room");
        assert!(ob.has_unsent());
    }

    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<(Option<u64>, Vec<u64>)>>);

    impl Journal for Recorder {
        fn write(&self, put: Option<Put<'_>>, removed: &[Seq]) -> Result<(), JournalError> {
            let removed = removed.iter().map(|s| s.0).collect();
            self.0
                .lock()
                .expect("recorder")
                .push((put.map(|p| p.seq.0), removed));
            Ok(())
        }
    }

    #[test]
    fn the_journal_sees_pushes_coalesced_replacements_and_acks() {
        let rec = std::sync::Arc::new(Recorder::default());
        let ob = Outbox::new(Limits::default()).with_journal(rec.clone());
        let s1 = state(&ob, "a", 1);
        let s2 = state(&ob, "a", 2);
        let r = result(&ob, "x");
        assert!(ob.ack(r));
        assert!(!ob.ack(r), "a repeated ack writes nothing");
        let log = rec.0.lock().expect("recorder").clone();
        assert_eq!(
            log,
            vec![
                (Some(s1.0), vec![]),
                (Some(s2.0), vec![s1.0]),
                (Some(r.0), vec![]),
                (None, vec![r.0]),
            ]
        );
    }

    #[test]
    fn acks_taken_together_leave_in_one_journal_write_and_skip_what_is_not_held() {
        let rec = std::sync::Arc::new(Recorder::default());
        let ob = Outbox::new(Limits::default()).with_journal(rec.clone());
        let a = result(&ob, "a");
        let s = state(&ob, "t", 1);
        let b = result(&ob, "b");
        assert_eq!(order(&ob), vec![a.0, b.0, s.0]);
        let taken: Vec<Seq> = ob
            .take_acked_all([b, Seq(999), a])
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(taken, vec![b, a], "held ones, in the order asked");
        let log = rec.0.lock().expect("recorder").clone();
        assert_eq!(log.last(), Some(&(None, vec![b.0, a.0])), "one write");
        assert!(ob.take_acked_all([a, b]).is_empty(), "acked twice: nothing");
        assert_eq!(
            rec.0.lock().expect("recorder").len(),
            log.len(),
            "nor written"
        );
        ob.requeue_all();
        assert_eq!(order(&ob), vec![s.0], "the unacked one goes again");
    }

    /// Entries found too large for the coordinator's frames as they are about to be sent: a
    /// result becomes its attempt's failure under the same number, queued again and
    /// journaled; anything else is dropped, not acknowledged; both counted.
    #[test]
    fn an_entry_too_large_for_the_peer_fails_its_result_or_is_dropped_and_never_resent() {
        let rec = std::sync::Arc::new(Recorder::default());
        let ob = Outbox::new(Limits::default()).with_journal(rec.clone());
        let r = ob.push(Class::Result, None, |seq| {
            WorkerMsg::TaskResult(tether_proto::msg::TaskResult {
                seq,
                task_id: tid("big"),
                attempt: Attempt(3),
                outcome: tether_proto::Outcome::Completed,
                result: serde_json::json!({ "pad": "r".repeat(100_000) }).into(),
                error: None,
                worker_fault: false,
                started_at: now(),
                finished_at: now(),
                duration_ms: 7,
                timestamp: now(),
            })
        });
        let s = state(&ob, "a", 1);
        let acked_before = ob.acked_max();
        assert_eq!(order(&ob), vec![r.0, s.0], "both taken to be sent");
        let bytes_before = ob.bytes();
        assert_eq!(ob.too_large(r, 100_200, 65_536), Oversize::Failed);
        assert_eq!(ob.too_large(s, 70_000, 65_536), Oversize::Dropped);
        assert_eq!(ob.too_large(s, 70_000, 65_536), Oversize::NotHeld);
        assert_eq!(ob.oversize.load(Ordering::Relaxed), 2);
        assert_eq!(ob.acked_max(), acked_before, "dropped is not acknowledged");
        assert!(ob.bytes() < bytes_before / 10, "the failure is small");
        // The failure goes in the result's place, once; the state never again.
        let again = ob.take_unsent(10);
        assert_eq!(again.len(), 1);
        let WorkerMsg::TaskResult(f) = again[0].1.as_ref() else {
            panic!("{:?}", again[0].1);
        };
        assert_eq!((f.seq, &f.task_id, f.attempt), (r, &tid("big"), Attempt(3)));
        assert_eq!(f.outcome, tether_proto::Outcome::Failed);
        assert_eq!(f.duration_ms, 7);
        let message = f.error.as_ref().map_or("", |e| e.message.as_str());
        assert!(
            message.contains("larger than a message may be"),
            "{message}"
        );
        assert!(frame_fits(tether_proto::encode(f).len(), 65_536));
        ob.requeue_all();
        assert_eq!(order(&ob), vec![r.0]);
        let log = rec.0.lock().expect("recorder").clone();
        assert_eq!(&log[2..], [(Some(r.0), vec![]), (None, vec![s.0])]);
    }

    #[test]
    fn entries_restored_out_of_order_are_sent_in_order() {
        let ob = Outbox::new(Limits::default());
        let seqs: Vec<Seq> = (0..4).map(|i| result(&ob, &format!("t{i}"))).collect();
        let mut snap = ob.snapshot();
        snap.reverse();
        snap.swap(0, 2);
        let ob2 = Outbox::new(Limits::default());
        for (class, _, msg) in snap {
            ob2.restore(class, (*msg).clone());
        }
        let s = state(&ob2, "a", 1);
        let later = result(&ob2, "later");
        let mut want: Vec<u64> = seqs.iter().map(|s| s.0).collect();
        want.push(later.0);
        want.push(s.0);
        assert_eq!(order(&ob2), want);
    }

    #[test]
    fn restored_entries_keep_their_sequence_and_later_pushes_follow() {
        let ob = Outbox::new(Limits::default());
        let s = result(&ob, "a");
        let snap = ob.snapshot();
        let ob2 = Outbox::new(Limits::default());
        for (class, _, msg) in snap {
            ob2.restore(class, (*msg).clone());
        }
        assert_eq!(order(&ob2), vec![s.0]);
        let next = result(&ob2, "b");
        assert!(next > s);
    }
}
