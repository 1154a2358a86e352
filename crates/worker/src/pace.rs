//! The worker's own pace, below the rates the coordinator enforces.
//!
//! The coordinator reads a session that sends faster than its message rate, or its byte rate,
//! only as fast as the rate allows, and tells it so once a second (`rate_limited`,
//! `bytes_limited`). Nothing is lost that way, but a busy worker of the built-in executors (16
//! slots of short `sleep` tasks, each reporting state every step) was held back every second
//! of its life, with a warning on both sides each time, and what waited were frames already
//! written: states made stale by newer ones, with results queued behind them. Paced here
//! instead, what waits stays in the outbox, where a task's newer state replaces its older one
//! and results go first; the coordinator's limiter is left for workers that do not pace
//! themselves. The same holds for bytes: under a low byte rate, a large checkpoint's pieces
//! wait in the outbox, and a result written after them goes first.
//!
//! Each bucket keeps its level across sessions, as the coordinator's do (a reconnect does not
//! refill them), and runs at [`SHARE`] of the coordinator's rate with half its burst, which
//! leaves room for the two clocks' difference. The messages sent outside the outbox
//! (heartbeats, answers to state requests, notices) go at once whatever the pace, and are
//! charged to it: the outbox yields them their share. As the coordinator's, the byte bucket
//! lets a frame go whenever it is not in debt, and is charged the frame's whole text, into
//! debt if need be.

use std::time::Duration;

use tether_proto::msg::Rate;
use tokio::time::Instant;

/// The share of the coordinator's rates the worker paces itself to.
pub const SHARE: f64 = 0.9;

/// Once held back, the pace lets messages go again when this much of its rates has gathered
/// (at least one message or byte, at most a send batch's worth of messages), not one at a
/// time.
const GATHER: Duration = Duration::from_millis(10);

/// The longest the message bucket holds the outbox back while it has something to send,
/// whatever the messages sent outside it have spent: a worker whose heartbeats alone run past
/// the coordinator's message rate (a misconfiguration, which the coordinator's limiter then
/// meets) still delivers its results, a message a second, instead of none for ever. (Bytes
/// sent outside the outbox are a heartbeat's hundred, against a byte rate that passes a
/// largest frame within a third of the heartbeat timeout: they cannot starve it.)
const STARVED: Duration = Duration::from_secs(1);

/// The longest a bucket says it holds the outbox back: about 30 years, as tokio's own far
/// future, so that adding it to an `Instant` cannot overflow.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// A token bucket at [`SHARE`] of one of the coordinator's rates, with half its burst.
#[derive(Debug, Clone)]
struct Bucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket for `rate`; `None` for a rate that is not a positive finite number.
    fn new(rate: Rate, now: Instant) -> Option<Self> {
        let (per_sec, burst) = Self::scaled(rate)?;
        Some(Bucket {
            per_sec,
            burst,
            tokens: burst,
            at: now,
        })
    }

    fn scaled(rate: Rate) -> Option<(f64, f64)> {
        (rate.per_sec.is_finite() && rate.per_sec > 0.0)
            .then(|| (rate.per_sec * SHARE, (f64::from(rate.burst) / 2.0).max(1.0)))
    }

    /// Follows a new `rate` keeping the level; a new bucket when there was none; `None` when
    /// the rate is none.
    fn follow(old: Option<Self>, rate: Option<Rate>, now: Instant) -> Option<Self> {
        let rate = rate?;
        let Some(mut b) = old else {
            return Self::new(rate, now);
        };
        let (per_sec, burst) = Self::scaled(rate)?;
        b.refill(now);
        b.per_sec = per_sec;
        b.burst = burst;
        b.tokens = b.tokens.min(burst);
        Some(b)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.at = now;
    }

    /// Whole tokens there now (none while in debt).
    fn whole(&mut self, now: Instant) -> usize {
        self.refill(now);
        // A bucket holds at most its burst, a u32's half: the cast cannot overflow.
        self.tokens.max(0.0).floor() as usize
    }

    /// When the bucket holds `want` tokens (at most its burst; now or earlier if it does). A
    /// wait too long to say (a rate so small that it overflows a `Duration` or an `Instant`) is
    /// [`FAR`]: the rate is the coordinator's to choose, and no value of it may panic here.
    fn holds_at(&self, want: f64) -> Instant {
        let missing = (want.min(self.burst) - self.tokens).max(0.0);
        let wait = Duration::try_from_secs_f64(missing / self.per_sec).map_or(FAR, |d| d.min(FAR));
        self.at.checked_add(wait).unwrap_or(self.at)
    }

    /// What the bucket gathers in [`GATHER`], at least one token.
    fn gathering(&self) -> f64 {
        (self.per_sec * GATHER.as_secs_f64()).max(1.0)
    }
}

/// What the pace lets go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Allowance {
    /// Messages.
    pub messages: usize,
    /// Bytes of their text; the first message goes whatever its size (the bucket is charged
    /// its whole size, into debt).
    pub bytes: usize,
}

/// The buckets of the coordinator's message and byte rates (either may be unsaid).
#[derive(Debug, Clone)]
pub(crate) struct Pace {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    /// When the outbox last took messages (or the pace began).
    took: Instant,
}

impl Pace {
    /// The pace for a coordinator's rates, with full buckets; `None` when it said neither (or
    /// neither is a positive finite number).
    #[cfg(test)]
    pub(crate) fn new(messages: Option<Rate>, bytes: Option<Rate>, now: Instant) -> Option<Self> {
        Self::follow(None, messages, bytes, now)
    }

    /// Follows a coordinator's rates (a new session's, perhaps another coordinator's), keeping
    /// the levels the buckets have; `None` when it said neither.
    pub(crate) fn follow(
        old: Option<Self>,
        messages: Option<Rate>,
        bytes: Option<Rate>,
        now: Instant,
    ) -> Option<Self> {
        let (m, b, took) = old.map_or((None, None, now), |p| (p.messages, p.bytes, p.took));
        let pace = Pace {
            messages: Bucket::follow(m, messages, now),
            bytes: Bucket::follow(b, bytes, now),
            took,
        };
        (pace.messages.is_some() || pace.bytes.is_some()).then_some(pace)
    }

    /// What the outbox may send now; `None` when held back (no whole message token, or bytes
    /// in debt). Held back by messages alone for [`STARVED`] since it last took any, it may
    /// send one.
    pub(crate) fn allowed(&mut self, now: Instant) -> Option<Allowance> {
        let mut messages = self.messages.as_mut().map_or(usize::MAX, |b| b.whole(now));
        let bytes = self.bytes.as_mut().map_or(usize::MAX, |b| b.whole(now));
        if messages == 0 && now >= self.took + STARVED {
            messages = 1;
        }
        (messages > 0 && bytes > 0).then_some(Allowance { messages, bytes })
    }

    /// Counts `n` messages the outbox took, at `now`; their bytes are counted as written.
    pub(crate) fn took(&mut self, n: usize, now: Instant) {
        if n > 0 {
            self.took = now;
        }
        if let Some(b) = &mut self.messages {
            b.tokens -= n as f64;
        }
    }

    /// Counts `bytes` of frame text written.
    pub(crate) fn wrote(&mut self, bytes: usize) {
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
    }

    /// Counts a message of `bytes` sent outside the outbox.
    pub(crate) fn sent_aside(&mut self, bytes: usize) {
        if let Some(b) = &mut self.messages {
            b.tokens -= 1.0;
        }
        self.wrote(bytes);
    }

    /// When, held back now, the pace lets a gathering go: a gathering of messages (at most
    /// `most`; or the outbox held back for [`STARVED`], if that is sooner) and of bytes, each
    /// of a rate said.
    pub(crate) fn resume_at(&self, most: usize) -> Instant {
        let messages = self
            .messages
            .as_ref()
            .map(|b| b.holds_at(b.gathering().min(most.max(1) as f64)));
        let messages = messages.map(|at| at.min(self.took + STARVED));
        let bytes = self.bytes.as_ref().map(|b| b.holds_at(b.gathering()));
        // INVARIANT: a pace has at least one bucket (`follow`).
        messages.max(bytes).unwrap_or_else(Instant::now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_sec: f64, burst: u32) -> Rate {
        Rate { per_sec, burst }
    }

    /// A pace of messages only.
    fn of_messages(per_sec: f64, burst: u32, t0: Instant) -> Pace {
        Pace::new(Some(rate(per_sec, burst)), None, t0).expect("a pace")
    }

    /// The messages `p` lets go at `t` (0 when held back).
    fn messages(p: &mut Pace, t: Instant) -> usize {
        p.allowed(t).map_or(0, |a| a.messages)
    }

    /// A pace of messages only whose bucket was emptied at `t0`.
    fn emptied(per_sec: f64, burst: u32, t0: Instant) -> Pace {
        let mut p = of_messages(per_sec, burst, t0);
        let n = messages(&mut p, t0);
        p.took(n, t0);
        p
    }

    /// Within a microsecond (the rates are scaled in floating point).
    fn near(a: Instant, b: Instant) -> bool {
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        hi - lo < Duration::from_micros(1)
    }

    #[test]
    fn the_pace_starts_with_half_the_burst_and_refills_at_a_share_of_the_rate() {
        let t0 = Instant::now();
        let mut p = of_messages(100.0, 40, t0);
        assert_eq!(
            p.allowed(t0),
            Some(Allowance {
                messages: 20,
                bytes: usize::MAX
            })
        );
        p.took(20, t0);
        p.wrote(1 << 30);
        assert_eq!(
            p.allowed(t0),
            None,
            "bytes are not paced without a byte rate"
        );
        // 90 a second: 9 in 100 ms, never more than the bucket's 20.
        assert_eq!(messages(&mut p, t0 + Duration::from_millis(100)), 9);
        assert_eq!(messages(&mut p, t0 + Duration::from_secs(60)), 20);
    }

    #[test]
    fn held_back_it_resumes_when_a_gathering_is_in_and_not_before() {
        let t0 = Instant::now();
        let mut p = emptied(1000.0, 100, t0);
        // 900 a second, gathered for 10 ms: 9 messages, in 10 ms.
        let at = p.resume_at(64);
        assert!(near(at, t0 + Duration::from_millis(10)), "{:?}", at - t0);
        assert_eq!(messages(&mut p, at - Duration::from_millis(1)), 8);
        assert_eq!(messages(&mut p, at), 9);
        // A slow rate gathers one at a time; a batch bounds a fast one.
        assert!(near(
            emptied(2.0, 2, t0).resume_at(64),
            t0 + Duration::from_secs_f64(1.0 / 1.8)
        ));
        assert!(near(
            emptied(1e6, 1_000_000, t0).resume_at(64),
            t0 + Duration::from_secs_f64(64.0 / 9e5)
        ));
    }

    #[test]
    fn a_new_sessions_rate_keeps_the_buckets_level_and_no_rate_is_no_pace() {
        let t0 = Instant::now();
        let mut p = of_messages(100.0, 40, t0);
        p.took(18, t0);
        let mut p = Pace::follow(Some(p), Some(rate(100.0, 40)), None, t0).expect("a pace");
        assert_eq!(messages(&mut p, t0), 2, "a reconnect does not refill it");
        let t1 = t0 + Duration::from_secs(1);
        let mut smaller = Pace::follow(Some(p), Some(rate(100.0, 2)), None, t1).expect("a pace");
        assert_eq!(messages(&mut smaller, t1), 1, "within the new burst");
        assert!(Pace::new(Some(rate(0.0, 10)), None, t0).is_none());
        assert!(Pace::new(Some(rate(f64::NAN, 10)), None, t0).is_none());
        assert!(Pace::new(None, None, t0).is_none());
        assert!(Pace::follow(Some(smaller), Some(rate(-1.0, 10)), None, t0).is_none());
    }

    #[test]
    fn bytes_go_while_the_bucket_is_not_in_debt_and_a_large_message_runs_it_into_debt() {
        let t0 = Instant::now();
        // 10,000 bytes a second: 9,000 paced, a bucket of 5,000.
        let mut p = Pace::new(None, Some(rate(10_000.0, 10_000)), t0).expect("a pace");
        let a = p.allowed(t0).expect("a full bucket");
        assert_eq!((a.messages, a.bytes), (usize::MAX, 5_000));
        // A 20,000-byte piece goes whole, and the debt holds the next back for 15,000 bytes'
        // time and a gathering (90 bytes): 1.6767 s.
        p.took(1, t0);
        p.wrote(20_000);
        assert_eq!(p.allowed(t0 + Duration::from_secs(1)), None);
        let at = p.resume_at(64);
        assert!(
            near(at, t0 + Duration::from_secs_f64(15_090.0 / 9_000.0)),
            "{:?}",
            at - t0
        );
        // 90, or 89 for the floating point's rounding.
        let bytes = p.allowed(at).map(|a| a.bytes);
        assert!(matches!(bytes, Some(89..=90)), "{bytes:?}");
    }

    #[test]
    fn held_back_by_either_rate_it_waits_for_both() {
        let t0 = Instant::now();
        let mut p =
            Pace::new(Some(rate(100.0, 20)), Some(rate(1_000.0, 2_000)), t0).expect("a pace");
        assert_eq!(
            p.allowed(t0),
            Some(Allowance {
                messages: 10,
                bytes: 1_000
            })
        );
        // Two messages of 1,450 bytes: messages are left, bytes are 1,900 in debt (2.11 s at
        // 900 a second, and a gathering of 9 more).
        p.took(2, t0);
        p.wrote(2_900);
        assert_eq!(p.allowed(t0), None);
        let at = p.resume_at(64);
        assert!(
            near(at, t0 + Duration::from_secs_f64(1_909.0 / 900.0)),
            "{:?}",
            at - t0
        );
        // Bytes to spare, messages spent: the message bucket says when (one at 90 a second).
        let mut q =
            Pace::new(Some(rate(100.0, 2)), Some(rate(1e6, 2_000_000)), t0).expect("a pace");
        q.took(1, t0);
        q.wrote(10);
        assert_eq!(q.allowed(t0), None);
        assert!(near(
            q.resume_at(64),
            t0 + Duration::from_secs_f64(1.0 / 90.0)
        ));
        // A new session's byte rate joins the message pace, and an unsaid one leaves it.
        let joined =
            Pace::follow(Some(q), Some(rate(100.0, 2)), Some(rate(50.0, 10)), t0).expect("a pace");
        let mut left =
            Pace::follow(Some(joined.clone()), Some(rate(100.0, 2)), None, t0).expect("a pace");
        assert!(joined.bytes.is_some() && left.bytes.is_none());
        assert_eq!(left.allowed(t0), None, "the message bucket kept its level");
    }

    #[test]
    fn what_is_sent_aside_counts_and_cannot_starve_the_outbox() {
        let t0 = Instant::now();
        // 10 a second: 9 paced, a bucket of 5.
        let mut p = of_messages(10.0, 10, t0);
        for _ in 0..5 {
            p.sent_aside(100);
        }
        assert_eq!(p.allowed(t0), None, "heartbeats spent the bucket");
        // Heartbeats at 20 a second, past the rate: the outbox is let send one a second.
        let mut t = t0;
        let mut sent = Vec::new();
        while t < t0 + Duration::from_millis(3_500) {
            t += Duration::from_millis(50);
            p.sent_aside(100);
            if let Some(a) = p.allowed(t) {
                assert_eq!(a.messages, 1);
                p.took(1, t);
                sent.push(t - t0);
            }
        }
        assert_eq!(
            sent,
            [1_000, 2_000, 3_000].map(Duration::from_millis),
            "one a second"
        );
        assert_eq!(
            p.resume_at(64),
            t0 + Duration::from_millis(4_000),
            "the timer wakes the outbox for it"
        );
    }

    #[test]
    fn a_tiny_rate_holds_the_outbox_back_far_and_does_not_panic() {
        let t0 = Instant::now();
        for per_sec in [1e-30, 1e-20, f64::MIN_POSITIVE, 5e-324] {
            // Messages: the outbox is let send one a second all the same (STARVED).
            let p = emptied(per_sec, 1, t0);
            assert_eq!(p.resume_at(64), t0 + STARVED, "{per_sec:e}");
            // Bytes: in debt, the bucket holds the outbox back for a far future.
            let mut q = Pace::new(None, Some(rate(per_sec, 10)), t0).expect("a pace");
            q.took(1, t0);
            q.wrote(1000);
            assert_eq!(q.allowed(t0 + Duration::from_secs(3600)), None);
            let at = q.resume_at(64);
            assert!(at >= t0 + FAR, "{per_sec:e}: {:?}", at - t0);
        }
    }

    #[test]
    fn a_byte_debt_is_honoured_however_long_the_outbox_waits() {
        let t0 = Instant::now();
        let mut p =
            Pace::new(Some(rate(100.0, 10)), Some(rate(1_000.0, 1_000)), t0).expect("a pace");
        p.took(1, t0);
        p.wrote(10_000);
        // 9,500 bytes in debt at 900 a second: 10.56 s, and a gathering, whatever STARVED is.
        let at = p.resume_at(64);
        assert!(at > t0 + Duration::from_secs(10), "{:?}", at - t0);
        assert_eq!(p.allowed(t0 + Duration::from_secs(5)), None);
    }
}
