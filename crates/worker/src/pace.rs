//! The worker's own pace, below the message rate the coordinator enforces.
//!
//! The coordinator reads a session that sends faster than its message rate only as fast as
//! the rate allows, and tells it so once a second (`rate_limited`). Nothing is lost that way,
//! but a busy worker of the built-in executors (16 slots of short `sleep` tasks, each
//! reporting state every step) was held back every second of its life, with a warning on both
//! sides each time, and what waited were frames already written: states made stale by newer
//! ones, with results queued behind them. Paced here instead, what waits stays in the outbox,
//! where a task's newer state replaces its older one and results go first; the coordinator's
//! limiter is left for workers that do not pace themselves.
//!
//! The bucket keeps its level across sessions, as the coordinator's does (a reconnect does not
//! refill it), and runs at [`SHARE`] of the coordinator's rate with half its burst, which
//! leaves room for the messages sent outside the outbox (heartbeats, answers to state
//! requests) and for the two clocks' difference.

use std::time::Duration;

use tether_proto::msg::MessageRate;
use tokio::time::Instant;

/// The share of the coordinator's rate the worker paces itself to.
pub const SHARE: f64 = 0.9;

/// Once held back, the pace lets messages go again when this much of its rate has gathered
/// (at least one, at most a send batch's worth), not one at a time.
const GATHER: Duration = Duration::from_millis(10);

/// A token bucket of messages.
#[derive(Debug, Clone)]
pub(crate) struct Pace {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    /// The pace for a coordinator's `rate`, with a full bucket; `None` for a rate that is not
    /// a positive finite number (no pace).
    pub(crate) fn new(rate: MessageRate, now: Instant) -> Option<Self> {
        let (per_sec, burst) = Self::scaled(rate)?;
        Some(Pace {
            per_sec,
            burst,
            tokens: burst,
            at: now,
        })
    }

    fn scaled(rate: MessageRate) -> Option<(f64, f64)> {
        (rate.per_sec.is_finite() && rate.per_sec > 0.0)
            .then(|| (rate.per_sec * SHARE, (f64::from(rate.burst) / 2.0).max(1.0)))
    }

    /// Follows a coordinator's rate (a new session's, perhaps another coordinator's) keeping
    /// the level the bucket has; `None` when the new rate is none.
    pub(crate) fn retuned(self, rate: MessageRate, now: Instant) -> Option<Self> {
        let (per_sec, burst) = Self::scaled(rate)?;
        let mut p = self;
        p.refill(now);
        p.per_sec = per_sec;
        p.burst = burst;
        p.tokens = p.tokens.min(burst);
        Some(p)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.at = now;
    }

    /// Messages that may go now.
    pub(crate) fn allowed(&mut self, now: Instant) -> usize {
        self.refill(now);
        // A bucket holds at most its burst: the cast cannot overflow.
        self.tokens.max(0.0).floor() as usize
    }

    /// Counts `n` messages sent.
    pub(crate) fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// When, held back now, the pace lets a gathering of messages go (at most `most`).
    pub(crate) fn resume_at(&self, most: usize) -> Instant {
        let want = (self.per_sec * GATHER.as_secs_f64())
            .clamp(1.0, most.max(1) as f64)
            .min(self.burst);
        let missing = (want - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / self.per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_sec: f64, burst: u32) -> MessageRate {
        MessageRate { per_sec, burst }
    }

    /// A pace for `per_sec` and `burst` whose bucket was emptied at `t0`.
    fn emptied(per_sec: f64, burst: u32, t0: Instant) -> Pace {
        let mut p = Pace::new(rate(per_sec, burst), t0).expect("a pace");
        let n = p.allowed(t0);
        p.spend(n);
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
        let mut p = Pace::new(rate(100.0, 40), t0).expect("a pace");
        assert_eq!(p.allowed(t0), 20);
        p.spend(20);
        assert_eq!(p.allowed(t0), 0);
        // 90 a second: 9 in 100 ms, never more than the bucket's 20.
        assert_eq!(p.allowed(t0 + Duration::from_millis(100)), 9);
        assert_eq!(p.allowed(t0 + Duration::from_secs(60)), 20);
    }

    #[test]
    fn held_back_it_resumes_when_a_gathering_is_in_and_not_before() {
        let t0 = Instant::now();
        let mut p = emptied(1000.0, 100, t0);
        // 900 a second, gathered for 10 ms: 9 messages, in 10 ms.
        let at = p.resume_at(64);
        assert!(near(at, t0 + Duration::from_millis(10)), "{:?}", at - t0);
        assert_eq!(p.allowed(at - Duration::from_millis(1)), 8);
        assert_eq!(p.allowed(at), 9);
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
        let mut p = Pace::new(rate(100.0, 40), t0).expect("a pace");
        p.spend(18);
        let mut p = p.retuned(rate(100.0, 40), t0).expect("a pace");
        assert_eq!(p.allowed(t0), 2, "a reconnect does not refill it");
        let mut smaller = p
            .retuned(rate(100.0, 2), t0 + Duration::from_secs(1))
            .expect("a pace");
        assert_eq!(
            smaller.allowed(t0 + Duration::from_secs(1)),
            1,
            "within the new burst"
        );
        assert!(Pace::new(rate(0.0, 10), t0).is_none());
        assert!(Pace::new(rate(f64::NAN, 10), t0).is_none());
        assert!(smaller.retuned(rate(-1.0, 10), t0).is_none());
    }
}
