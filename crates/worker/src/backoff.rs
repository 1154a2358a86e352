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
    /// Failures (attempts and sessions lost) since the last healthy session: the delays grow
    /// with them.
    failures: u32,
    /// Connection attempts failed in a row: what `max_attempts` counts. A lost session is no
    /// failed attempt (its attempt opened one), and ends the run.
    failed_attempts: u32,
    boost: f64,
    /// The longest delay while the worker holds work the coordinator leased to it (see
    /// [`Backoff::set_ceiling`]); `None`: the configured cap only.
    ceiling: Option<Duration>,
}

impl Backoff {
    pub fn new(cfg: BackoffConfig) -> Self {
        Self {
            cfg,
            failures: 0,
            failed_attempts: 0,
            boost: 1.0,
            ceiling: None,
        }
    }

    /// Consecutive failures since the last healthy session.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Connection attempts failed in a row, since the last one that opened a session.
    pub fn failed_attempts(&self) -> u32 {
        self.failed_attempts
    }

    /// Whether `max_attempts` connection attempts failed in a row.
    pub fn exhausted(&self) -> bool {
        self.cfg
            .max_attempts
            .is_some_and(|m| self.failed_attempts >= m)
    }

    /// Sets the adaptive multiplier of the factor (1.0 = as configured).
    pub fn set_boost(&mut self, boost: f64) {
        self.boost = boost.max(1.0);
    }

    /// Caps every delay, jitter included, at `ceiling` (never below the first delay), or
    /// lifts that cap (`None`). A worker holding leased work sets it well below the
    /// coordinator's grace, so that its own backoff never keeps it away, once the path is
    /// back, until its tasks are declared lost; an idle one keeps the configured cap, so a
    /// herd of them does not storm a coordinator that comes back.
    pub fn set_ceiling(&mut self, ceiling: Option<Duration>) {
        self.ceiling = ceiling.map(|c| c.max(self.cfg.initial.min(self.cfg.max)));
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

    /// Records a failed attempt and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let d = self.upcoming(rng);
        self.record_failure();
        d
    }

    /// Draws the delay the next failure would wait, without recording one: how long an
    /// attempt may stay unanswered before the next one starts beside it.
    pub fn upcoming(&self, rng: &mut impl Rng) -> Duration {
        let base = self.peek();
        match self.cfg.jitter {
            Jitter::None => base,
            Jitter::Full => base.mul_f64(rng.random_range(0.0..=1.0)),
            Jitter::Proportional(j) => {
                let j = j.clamp(0.0, 1.0);
                // Inside the ceiling: a fleet held at it still spreads, below it.
                let high = match self.ceiling {
                    Some(c) => (1.0 + j).min(c.as_secs_f64() / base.as_secs_f64().max(1e-9)),
                    None => 1.0 + j,
                };
                base.mul_f64(rng.random_range((1.0 - j)..=high.max(1.0 - j)))
            }
        }
    }

    /// Records a failed attempt whose delay was drawn by [`Backoff::upcoming`].
    pub fn record_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.failed_attempts = self.failed_attempts.saturating_add(1);
    }

    /// A session was lost, `healthy` or not: returns how long to wait before the first
    /// attempt to reconnect. Its attempt succeeded, so no failed attempt is counted and the
    /// run of them starts over (with `max_attempts` 1, one attempt follows); the delays start
    /// over after a healthy session only, and go on growing after one lost early (a link that
    /// drops each session soon after it opens is paced like one that fails).
    pub fn session_lost(&mut self, healthy: bool, rng: &mut impl Rng) -> Duration {
        if healthy {
            self.reset();
        }
        self.failed_attempts = 0;
        let d = self.upcoming(rng);
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// The delay the next failure would wait, before jitter (for statistics).
    pub fn peek(&self) -> Duration {
        let base = self.base(self.failures.saturating_add(1));
        self.ceiling.map_or(base, |c| base.min(c))
    }

    /// A healthy session: start again from the initial delay.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.failed_attempts = 0;
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
    fn a_lost_session_is_no_failed_attempt_and_the_delays_start_over_only_after_a_healthy_one() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(BackoffConfig {
            max_attempts: Some(1),
            jitter: Jitter::None,
            ..BackoffConfig::default()
        });
        assert_eq!(
            b.session_lost(true, &mut rng),
            Duration::from_secs(1),
            "the delays start over"
        );
        assert!(!b.exhausted(), "no attempt failed yet");
        assert_eq!(b.failed_attempts(), 0);
        assert_eq!(b.next_delay(&mut rng), Duration::from_secs(2));
        assert!(b.exhausted(), "the one attempt allowed failed");
        assert_eq!(b.failed_attempts(), 1);
        // A session lost early: the run of failed attempts ends, the delays go on growing.
        assert_eq!(b.session_lost(false, &mut rng), Duration::from_secs(4));
        assert!(!b.exhausted());
        assert_eq!(b.next_delay(&mut rng), Duration::from_secs(8));
        assert!(b.exhausted());
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

    #[test]
    fn a_ceiling_caps_every_delay_jitter_included_and_the_delays_still_spread() {
        let mut rng = StdRng::seed_from_u64(11);
        let ceiling = Duration::from_secs(15);
        let mut capped = Vec::new();
        for _ in 0..200 {
            let mut b = Backoff::new(BackoffConfig::default());
            b.set_ceiling(Some(ceiling));
            for _ in 0..8 {
                assert!(b.next_delay(&mut rng) <= ceiling);
            }
            capped.push(secs(b.next_delay(&mut rng)));
        }
        let min = capped.iter().copied().fold(f64::MAX, f64::min);
        let max = capped.iter().copied().fold(0.0, f64::max);
        assert!(max <= 15.0, "never past the ceiling: {max}");
        assert!(
            min >= 12.0 && max - min > 2.0,
            "spread below it: {min}..{max}"
        );
    }

    #[test]
    fn without_a_ceiling_the_delays_grow_to_the_configured_cap_again() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut b = Backoff::new(BackoffConfig {
            jitter: Jitter::None,
            ..BackoffConfig::default()
        });
        b.set_ceiling(Some(Duration::from_secs(15)));
        let held: Vec<f64> = (0..7).map(|_| secs(b.next_delay(&mut rng))).collect();
        assert_eq!(held, [1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]);
        assert_eq!(b.peek(), Duration::from_secs(15));
        b.set_ceiling(None);
        assert_eq!(b.next_delay(&mut rng), Duration::from_secs(60));
    }

    #[test]
    fn a_ceiling_below_the_first_delay_is_raised_to_it() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut b = Backoff::new(BackoffConfig {
            jitter: Jitter::None,
            ..BackoffConfig::default()
        });
        b.set_ceiling(Some(Duration::ZERO));
        for _ in 0..5 {
            assert_eq!(b.next_delay(&mut rng), Duration::from_secs(1));
        }
    }
}
