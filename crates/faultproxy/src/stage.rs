//! The chain of faults on one stream of one link, applied to one chunk at a time.
//!
//! [`Stages`] is pure logic: given a chunk and the time it answers with the next thing the
//! pump must do ([`Next`]): wait, hold, drop, split or deliver. The pump (see `pump.rs`) does
//! the waiting and the I/O. Progress is recorded on the chunk (stages done, deadlines planned),
//! so when the chain changes mid-wait the pump rebuilds the stages and asks again without
//! applying any stage twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tether_proto::WorkerId;
use tokio::time::Instant;

use crate::fault::{Fault, FaultKind, Stream};
use crate::pump::{QUEUE_BYTES, QUEUE_FLOOR};
use crate::stats::{FaultCounters, ProxyCounters, add};

/// Identity of one fault on one proxy; never reused, unlike names.
pub(crate) type FaultId = u64;

/// A fault as published to every link of its proxy.
#[derive(Debug)]
pub(crate) struct FaultEntry {
    pub id: FaultId,
    /// How many times the fault was changed: a deadline planned under older terms is planned
    /// again (a chunk waiting a latency of 5 s that was changed to 0 goes at once).
    pub revision: u64,
    pub fault: Fault,
    pub counters: Arc<FaultCounters>,
}

/// Every fault of a proxy in the order they were added; links filter it.
pub(crate) type Chain = Arc<Vec<Arc<FaultEntry>>>;

/// A piece of one stream on its way through the chain. An `eof` chunk carries the sender's FIN,
/// or with `reset` its RST.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// The bytes; pieces split off share the buffer, so a slicer cutting a chunk into many
    /// small pieces copies nothing (a `Vec` copied the rest at every cut).
    pub data: BytesMut,
    pub eof: bool,
    /// The sender reset its connection: the link is reset once the chunks before this one are
    /// delivered, as a direct connection's reader gets the bytes sent before an RST first.
    pub reset: bool,
    pub arrived: Instant,
    done: Vec<FaultId>,
    /// Deadlines planned: fault, its revision then, deadline.
    plan: Vec<(FaultId, u64, Instant)>,
    /// Set by `limit_data`: close the link once this chunk is delivered.
    pub close_after: Option<Arc<FaultEntry>>,
}

impl Chunk {
    pub fn data(data: BytesMut, arrived: Instant) -> Self {
        Chunk {
            data,
            eof: false,
            reset: false,
            arrived,
            done: Vec::new(),
            plan: Vec::new(),
            close_after: None,
        }
    }

    pub fn eof(arrived: Instant) -> Self {
        Chunk {
            eof: true,
            ..Chunk::data(BytesMut::new(), arrived)
        }
    }

    /// The end of a stream whose sender reset its connection. It goes through the stages as an
    /// `eof` chunk does (a latency delays it as it delayed the bytes before it), except that a
    /// blackhole does not hold it and a slow close does not delay it: both are about a FIN,
    /// and the sender's socket is gone.
    pub fn reset(arrived: Instant) -> Self {
        Chunk {
            reset: true,
            ..Chunk::eof(arrived)
        }
    }

    /// Splits off the bytes from `at` on into a chunk of their own that has not passed `stage`
    /// yet, optionally with `stage`'s deadline planned already (under its revision then). A
    /// close asked for by `limit_data` goes with the tail: it is due after the last byte, not
    /// the first piece.
    pub fn split_off(
        &mut self,
        at: usize,
        stage: FaultId,
        tail_plan: Option<(u64, Instant)>,
    ) -> Chunk {
        let mut plan: Vec<_> = self
            .plan
            .iter()
            .copied()
            .filter(|(id, _, _)| *id != stage)
            .collect();
        plan.extend(tail_plan.map(|(revision, t)| (stage, revision, t)));
        Chunk {
            data: self.data.split_off(at),
            eof: false,
            reset: false,
            arrived: self.arrived,
            done: self
                .done
                .iter()
                .copied()
                .filter(|id| *id != stage)
                .collect(),
            plan,
            close_after: self.close_after.take(),
        }
    }

    /// The deadline planned for `entry`, made now if none was or it was planned under an
    /// older revision of the fault.
    fn planned(&mut self, entry: &FaultEntry, make: impl FnOnce() -> Instant) -> Instant {
        if let Some(at) = self.plan_of(entry) {
            return at;
        }
        self.plan.retain(|(i, _, _)| *i != entry.id);
        let t = make();
        self.plan.push((entry.id, entry.revision, t));
        t
    }

    /// The deadline planned for `entry` under its current revision.
    fn plan_of(&self, entry: &FaultEntry) -> Option<Instant> {
        self.plan
            .iter()
            .find(|(i, r, _)| *i == entry.id && *r == entry.revision)
            .map(|(_, _, t)| *t)
    }
}

/// What the pump must do next with a chunk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Sleep until `until`, then call [`Stages::waited`] and ask again.
    Wait { until: Instant, fault: FaultId },
    /// Keep the chunk until the chain changes (a FIN behind a blackhole).
    Hold,
    /// Discard the chunk (already counted).
    Drop,
    /// Split the chunk with [`Chunk::split_off`], process the head now and the tail next.
    Split {
        at: usize,
        fault: FaultId,
        /// The tail's deadline for `fault`, under the fault's revision.
        tail_plan: Option<(u64, Instant)>,
    },
    /// Write the chunk out (an `eof` chunk: shut down the write side).
    Deliver,
}

/// Toxicity draws of one link, shared by its two streams: one uniform draw per fault per link,
/// derived from the proxy seed, the link number and the fault id, so the outcome does not
/// depend on which stream asks first. A fault applies when its draw is below its toxicity.
#[derive(Debug)]
pub(crate) struct Draws {
    seed: u64,
    link: u64,
    proxy: Arc<ProxyCounters>,
    /// Per fault: the uniform draw and whether the link was counted as affected.
    drawn: Mutex<HashMap<FaultId, (f64, bool)>>,
}

impl Draws {
    pub fn new(seed: u64, link: u64, proxy: Arc<ProxyCounters>) -> Self {
        Draws {
            seed,
            link,
            proxy,
            drawn: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets the draws of faults no longer in `chain` (removed: their ids never come back),
    /// so that a link open while faults come and go keeps no draw of each.
    pub fn keep_only(&self, chain: &[Arc<FaultEntry>]) {
        let mut drawn = self.drawn.lock().unwrap_or_else(PoisonError::into_inner);
        if drawn.len() > chain.len() {
            drawn.retain(|id, _| chain.iter().any(|e| e.id == *id));
        }
    }

    /// Whether `entry` applies to this link; counts the link as affected the first time.
    pub fn applies(&self, entry: &FaultEntry) -> bool {
        let mut drawn = self.drawn.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = drawn.entry(entry.id).or_insert_with(|| {
            let mut rng = SmallRng::seed_from_u64(mix(self.seed, self.link, entry.id ^ DRAW_SALT));
            (rng.random::<f64>(), false)
        });
        let hit = slot.0 < entry.fault.toxicity;
        if hit && !slot.1 {
            slot.1 = true;
            add(&entry.counters.connections_affected, 1);
            add(&self.proxy.faults.connections_affected, 1);
        }
        hit
    }
}

const DRAW_SALT: u64 = 0x7f4a_7c15_9e37_79b9;

/// Mixes a seed with two numbers into a new seed (SplitMix64 finaliser on each step).
pub(crate) fn mix(seed: u64, a: u64, b: u64) -> u64 {
    fn step(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    step(step(step(seed) ^ a) ^ b)
}

/// Per-link state a fault keeps across chunks; survives chain changes that keep the fault.
#[derive(Debug, Clone, Copy)]
enum State {
    /// When the link is free again at the rate of the fault's `revision` (another rate starts
    /// afresh).
    Bandwidth {
        next_free: Instant,
        revision: u64,
    },
    Limit {
        passed: u64,
    },
    Reset {
        since: Instant,
    },
}

/// The active faults of one stream of one link and their state.
#[derive(Debug)]
pub(crate) struct Stages {
    stream: Stream,
    worker: Option<WorkerId>,
    draws: Arc<Draws>,
    proxy: Arc<ProxyCounters>,
    rng: SmallRng,
    active: Vec<Arc<FaultEntry>>,
    /// The one bandwidth fault that paces the stream: the slowest (the first of equals).
    pacer: Option<FaultId>,
    states: HashMap<FaultId, State>,
}

impl Stages {
    pub fn new(
        stream: Stream,
        worker: Option<WorkerId>,
        draws: Arc<Draws>,
        proxy: Arc<ProxyCounters>,
        seed: u64,
    ) -> Self {
        Stages {
            stream,
            worker,
            draws,
            proxy,
            rng: SmallRng::seed_from_u64(seed),
            active: Vec::new(),
            pacer: None,
            states: HashMap::new(),
        }
    }

    /// Re-reads the chain: keeps the faults that sit on this stream, target this link and hit
    /// their toxicity draw. State of faults that stay (same id and kind) is kept.
    pub fn rebuild(&mut self, chain: &[Arc<FaultEntry>], now: Instant) {
        self.draws.keep_only(chain);
        let worker = self.worker.as_ref();
        self.active = chain
            .iter()
            .filter(|e| e.fault.direction.covers(self.stream) && e.fault.target.matches(worker))
            .filter(|e| self.draws.applies(e))
            .cloned()
            .collect();
        // Stacked limits give the rate of the slowest, as on a path of slow hops. Each paced in
        // turn, a chunk waited its transmission time at every one (two limits of r gave r/2):
        // one writer takes a chunk through the whole chain, so the stages are not a pipeline.
        self.pacer = self
            .active
            .iter()
            .filter_map(|e| match e.fault.kind {
                FaultKind::Bandwidth { bytes_per_sec } => Some((bytes_per_sec, e.id)),
                _ => None,
            })
            .min_by_key(|(rate, _)| *rate)
            .map(|(_, id)| id);
        let active = &self.active;
        self.states.retain(|id, st| {
            active.iter().any(|e| {
                e.id == *id
                    && match (&e.fault.kind, &*st) {
                        (FaultKind::Bandwidth { .. }, State::Bandwidth { revision, .. }) => {
                            *revision == e.revision
                        }
                        (FaultKind::LimitData { .. }, State::Limit { .. })
                        | (FaultKind::Reset { .. }, State::Reset { .. }) => true,
                        _ => false,
                    }
            })
        });
        for e in &self.active {
            if let FaultKind::Reset { .. } = e.fault.kind {
                self.states
                    .entry(e.id)
                    .or_insert(State::Reset { since: now });
            }
        }
    }

    /// Most bytes worth queueing ahead of these stages: about a second of the slowest
    /// bandwidth fault (at least [`QUEUE_FLOOR`]), so its sender feels the slow link as
    /// back-pressure; without one, [`QUEUE_BYTES`].
    pub fn queue_limit(&self) -> usize {
        self.active
            .iter()
            .filter_map(|e| match e.fault.kind {
                FaultKind::Bandwidth { bytes_per_sec } => Some(bytes_per_sec),
                _ => None,
            })
            .min()
            .map_or(QUEUE_BYTES, |rate| {
                usize::try_from(rate)
                    .unwrap_or(usize::MAX)
                    .clamp(QUEUE_FLOOR, QUEUE_BYTES)
            })
    }

    /// Whether no fault applies to this stream: a chunk would pass untouched and at once.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty()
    }

    /// The first active blackhole of this stream: what it is sent is swallowed whole.
    pub fn blackhole(&self) -> Option<&Arc<FaultEntry>> {
        self.active
            .iter()
            .find(|e| matches!(e.fault.kind, FaultKind::Blackhole))
    }

    /// The earliest pending reset of this stream and the fault that asks for it.
    pub fn reset_due(&self) -> Option<(Instant, Arc<FaultEntry>)> {
        self.active
            .iter()
            .filter_map(|e| match (&e.fault.kind, self.states.get(&e.id)) {
                (FaultKind::Reset { timeout_ms }, Some(State::Reset { since })) => {
                    Some((*since + Duration::from_millis(*timeout_ms), Arc::clone(e)))
                }
                _ => None,
            })
            .min_by_key(|(t, _)| *t)
    }

    /// The next step for `chunk` at time `now`.
    pub fn next(&mut self, chunk: &mut Chunk, now: Instant) -> Next {
        let Stages {
            active,
            pacer,
            states,
            rng,
            proxy,
            ..
        } = self;
        for entry in active.iter() {
            let id = entry.id;
            if chunk.done.contains(&id) {
                continue;
            }
            let len = chunk.data.len();
            match entry.fault.kind {
                FaultKind::Latency {
                    latency_ms,
                    jitter_ms,
                } => {
                    let arrived = chunk.arrived;
                    let until = chunk.planned(entry, || {
                        let j = i64::try_from(jitter_ms).unwrap_or(i64::MAX);
                        let offset = if j > 0 { rng.random_range(-j..=j) } else { 0 };
                        let ms = i64::try_from(latency_ms)
                            .unwrap_or(i64::MAX)
                            .saturating_add(offset)
                            .max(0);
                        arrived + Duration::from_millis(ms.unsigned_abs())
                    });
                    if until > now {
                        return Next::Wait { until, fault: id };
                    }
                }
                FaultKind::Stall {
                    loss_rate,
                    stall_ms,
                } if !chunk.eof => {
                    let until = chunk.planned(entry, || {
                        if rng.random::<f64>() < loss_rate {
                            now + Duration::from_millis(stall_ms)
                        } else {
                            now
                        }
                    });
                    if until > now {
                        return Next::Wait { until, fault: id };
                    }
                }
                // A faster limit on the same stream passes what the slowest lets through.
                FaultKind::Bandwidth { bytes_per_sec } if !chunk.eof && *pacer == Some(id) => {
                    let piece = usize::try_from(bytes_per_sec / 10)
                        .unwrap_or(usize::MAX)
                        .max(1);
                    if len > piece && chunk.plan_of(entry).is_none() {
                        return Next::Split {
                            at: piece,
                            fault: id,
                            tail_plan: None,
                        };
                    }
                    let until = chunk.planned(entry, || {
                        let next_free = match states.get(&id) {
                            Some(State::Bandwidth { next_free, .. }) => *next_free,
                            _ => now,
                        };
                        let nanos = (len as u128 * 1_000_000_000) / u128::from(bytes_per_sec);
                        let end = next_free.max(now)
                            + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
                        let revision = entry.revision;
                        states.insert(
                            id,
                            State::Bandwidth {
                                next_free: end,
                                revision,
                            },
                        );
                        end
                    });
                    if until > now {
                        return Next::Wait { until, fault: id };
                    }
                }
                FaultKind::Blackhole if chunk.reset => {}
                FaultKind::Blackhole => {
                    if chunk.eof {
                        return Next::Hold;
                    }
                    add(&entry.counters.bytes_dropped, len);
                    add(&proxy.faults.bytes_dropped, len);
                    return Next::Drop;
                }
                FaultKind::LimitData { bytes } if !chunk.eof => {
                    let passed = match states.get(&id) {
                        Some(State::Limit { passed }) => *passed,
                        _ => 0,
                    };
                    let remaining = usize::try_from(bytes.saturating_sub(passed)).unwrap_or(len);
                    if len >= remaining {
                        let cut = len - remaining;
                        chunk.data.truncate(remaining);
                        add(&entry.counters.bytes_dropped, cut);
                        add(&proxy.faults.bytes_dropped, cut);
                        chunk.close_after = Some(Arc::clone(entry));
                    }
                    let kept = chunk.data.len() as u64;
                    states.insert(
                        id,
                        State::Limit {
                            passed: passed + kept,
                        },
                    );
                }
                FaultKind::Slicer {
                    average_size,
                    size_variation,
                    delay_us,
                } if !chunk.eof => {
                    // A tail cut off before waits the delay; only the piece it lets go now
                    // counts as delayed (the rest waits again, and would count each time).
                    let was_held = delay_us > 0 && chunk.plan_of(entry).is_some();
                    let until = chunk.planned(entry, || now);
                    if until > now {
                        return Next::Wait { until, fault: id };
                    }
                    // Saturating: validation bounds the sizes, but a piece size must never
                    // overflow (and so panic the writer), whatever the fault says.
                    let low = average_size.saturating_sub(size_variation).max(1);
                    let high = average_size.saturating_add(size_variation).max(low);
                    let size = rng.random_range(low..=high);
                    if was_held {
                        add(&entry.counters.bytes_delayed, len.min(size));
                        add(&proxy.faults.bytes_delayed, len.min(size));
                    }
                    if len > size {
                        chunk.done.push(id);
                        count_passed(entry, proxy, size);
                        return Next::Split {
                            at: size,
                            fault: id,
                            tail_plan: Some((
                                entry.revision,
                                now + Duration::from_micros(delay_us),
                            )),
                        };
                    }
                }
                FaultKind::Corrupt { rate } if !chunk.eof && rate > 0.0 => {
                    let mut changed = 0;
                    for b in chunk.data.iter_mut() {
                        if rng.random::<f64>() < rate {
                            *b ^= 1 << rng.random_range(0..8u8);
                            changed += 1;
                        }
                    }
                    add(&entry.counters.bytes_corrupted, changed);
                    add(&proxy.faults.bytes_corrupted, changed);
                }
                FaultKind::SlowClose { delay_ms } if chunk.eof && !chunk.reset => {
                    let arrived = chunk.arrived;
                    let until = chunk.planned(entry, || arrived + Duration::from_millis(delay_ms));
                    if until > now {
                        return Next::Wait { until, fault: id };
                    }
                }
                _ => {}
            }
            chunk.done.push(id);
            count_passed(entry, proxy, chunk.data.len());
        }
        Next::Deliver
    }

    /// Records that `chunk` was held back by `fault` until its deadline (a slicer counts the
    /// piece it lets go, as it does): its bytes, and a clean close held back.
    pub fn waited(&self, chunk: &Chunk, fault: FaultId) {
        if let Some(e) = self
            .active
            .iter()
            .find(|e| e.id == fault && !matches!(e.fault.kind, FaultKind::Slicer { .. }))
        {
            add(&e.counters.bytes_delayed, chunk.data.len());
            add(&self.proxy.faults.bytes_delayed, chunk.data.len());
            if chunk.eof && !chunk.reset {
                add(&e.counters.closes_delayed, 1);
                add(&self.proxy.faults.closes_delayed, 1);
            }
        }
    }
}

fn count_passed(entry: &FaultEntry, proxy: &ProxyCounters, n: usize) {
    add(&entry.counters.bytes_passed, n);
    add(&proxy.faults.bytes_passed, n);
}

#[cfg(test)]
#[path = "stage_tests.rs"]
mod tests;
