//! Reconnect backoff: exponential, capped, with jitter applied after the cap (so a fleet at the
//! cap still spreads out), and an adaptive boost of the factor on unstable links.

use std::time::Duration;

use rand::Rng;

/// Default first delay.
pub const DEFAULT_INITIAL: Duration = Duration::from_secs(1);
/// Default growth factor.
pub const DEFAULT_FACTOR: f64 = 2.0;
/// Default cap.
pub const DEFAULT_MAX: Duration = Duration::from_secs(60);
/// Shortest first delay: with none, a worker would retry in a tight loop (what the original's
/// reconnect storms were made of).
pub const MIN_INITIAL: Duration = Duration::from_millis(10);
/// Default proportional jitter (+/- 20 %).
pub const DEFAULT_JITTER: f64 = 0.2;

/// How the delay is randomised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// Uniform in `[d * (1 - j), d * (1 + j)]`.
    Proportional(f64),
    /// Uniform in `[0, d]` ("full jitter").
    Full,
    /// No randomness (tests).
    None,
}

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
    pub jitter: Jitter,
    /// Consecutive failed attempts before giving up; `None` retries forever.
    pub max_attempts: Option<u32>,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: DEFAULT_INITIAL,
            factor: DEFAULT_FACTOR,
            max: DEFAULT_MAX,
            jitter: Jitter::Proportional(DEFAULT_JITTER),
            max_attempts: None,
        }
    }
}

/// Backoff state of one worker.
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    failures: u32,
    boost: f64,
}

impl Backoff {
    pub fn new(cfg: BackoffConfig) -> Self {
        Self {
            cfg,
            failures: 0,
            boost: 1.0,
        }
    }

    /// Consecutive failures since the last healthy session.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether `max_attempts` consecutive failures have happened.
    pub fn exhausted(&self) -> bool {
        self.cfg.max_attempts.is_some_and(|m| self.failures >= m)
    }

    /// Sets the adaptive multiplier of the factor (1.0 = as configured).
    pub fn set_boost(&mut self, boost: f64) {
        self.boost = boost.max(1.0);
    }

    /// The factor in effect.
    pub fn factor(&self) -> f64 {
        self.cfg.factor * self.boost
    }

    /// The capped delay before jitter for the `n`-th consecutive failure (n >= 1).
    pub fn base(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.cfg.initial.as_secs_f64() * self.factor().powi(exp);
        let capped = secs.min(self.cfg.max.as_secs_f64());
        Duration::from_secs_f64(if capped.is_finite() {
            capped
        } else {
            self.cfg.max.as_secs_f64()
        })
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let d = self.upcoming(rng);
        self.record_failure();
        d
    }

    /// Draws the delay the next failure would wait, without recording one: how long an
    /// attempt may stay unanswered before the next one starts beside it.
    pub fn upcoming(&self, rng: &mut impl Rng) -> Duration {
        let base = self.base(self.failures.saturating_add(1));
        match self.cfg.jitter {
            Jitter::None => base,
            Jitter::Full => base.mul_f64(rng.random_range(0.0..=1.0)),
            Jitter::Proportional(j) => {
                let j = j.clamp(0.0, 1.0);
                base.mul_f64(rng.random_range((1.0 - j)..=(1.0 + j)))
            }
        }
    }

    /// Records a failure whose delay was drawn by [`Backoff::upcoming`].
    pub fn record_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// The delay the next failure would wait, before jitter (for statistics).
    pub fn peek(&self) -> Duration {
        self.base(self.failures.saturating_add(1))
    }

    /// A healthy session: start again from the initial delay.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn without_jitter_the_delays_double_up_to_the_cap() {
        let mut b = Backoff::new(BackoffConfig {
            jitter: Jitter::None,
            ..BackoffConfig::default()
        });
        let mut rng = StdRng::seed_from_u64(1);
        let got: Vec<f64> = (0..9).map(|_| secs(b.next_delay(&mut rng))).collect();
        assert_eq!(got, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]);
    }

    #[test]
    fn jitter_is_applied_after_the_cap_so_capped_delays_still_spread() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut at_cap = Vec::new();
        for _ in 0..200 {
            let mut b = Backoff::new(BackoffConfig::default());
            for _ in 0..10 {
                b.next_delay(&mut rng);
            }
            at_cap.push(secs(b.next_delay(&mut rng)));
        }
        let min = at_cap.iter().copied().fold(f64::MAX, f64::min);
        let max = at_cap.iter().copied().fold(0.0, f64::max);
        assert!(min >= 48.0 && max <= 72.0, "{min}..{max}");
        assert!(
            max - min > 10.0,
            "delays at the cap are spread: {min}..{max}"
        );
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_base() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(BackoffConfig {
            jitter: Jitter::Full,
            ..BackoffConfig::default()
        });
        for n in 1..20 {
            let d = b.next_delay(&mut rng);
            assert!(d <= b.base(n), "attempt {n}: {d:?}");
        }
    }

    #[test]
    fn max_attempts_exhausts_and_reset_starts_over() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(BackoffConfig {
            max_attempts: Some(3),
            jitter: Jitter::None,
            ..BackoffConfig::default()
        });
        b.next_delay(&mut rng);
        b.next_delay(&mut rng);
        assert!(!b.exhausted());
        b.next_delay(&mut rng);
        assert!(b.exhausted());
        b.reset();
        assert!(!b.exhausted());
        assert_eq!(b.next_delay(&mut rng), Duration::from_secs(1));
    }

    #[test]
    fn an_upcoming_delay_records_nothing_until_its_failure_is() {
        let cfg = BackoffConfig::default();
        let (mut a, mut b) = (Backoff::new(cfg), Backoff::new(cfg));
        let (mut ra, mut rb) = (StdRng::seed_from_u64(5), StdRng::seed_from_u64(5));
        for _ in 0..8 {
            let peeked = a.upcoming(&mut ra);
            let before = a.failures();
            a.upcoming(&mut StdRng::seed_from_u64(9));
            assert_eq!(a.failures(), before, "drawing records no failure");
            a.record_failure();
            assert_eq!(peeked, b.next_delay(&mut rb), "the same draw as next_delay");
            assert_eq!(a.failures(), b.failures());
        }
    }

    #[test]
    fn a_boost_grows_the_delay_faster_but_never_past_the_cap() {
        let mut b = Backoff::new(BackoffConfig {
            jitter: Jitter::None,
            ..BackoffConfig::default()
        });
        b.set_boost(1.5);
        assert_eq!(b.base(3), Duration::from_secs(9));
        assert_eq!(b.base(30), Duration::from_secs(60));
    }
}
