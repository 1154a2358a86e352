//! Log lines a fleet can repeat without end, said once a window per worker and kind.
//!
//! A worker refused its registration tries again, and again: a fleet left on an old secret
//! after a rotation, or on another protocol, made one WARN line per worker per attempt, for as
//! long as it ran, and so did a client that sends frames and never registers. The first
//! refusal of a worker of a kind is said at WARN; its repeats within [`WINDOW`] go to debug,
//! and the next WARN after the window says how many there were. Counters (the overview's
//! `auth_failures`, `pre_registration_overflows`) count every one regardless.
//!
//! A kind is a `&'static str`, a class of the refusal and not its text: a reason may carry
//! what the attempt sent (an id, a clock's skew), and keyed on that every attempt would be a
//! first. The line still says the whole reason.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// How long repeats of a worker's refusal of the same kind are logged at debug after the WARN
/// line that said it.
pub const WINDOW: Duration = Duration::from_secs(600);

/// (worker, kind) pairs remembered at most; past it, windows that ended are forgotten, then
/// the oldest. A few MB at most, against ids made up by the attempt.
pub const MAX_KEYS: usize = 16_384;

/// How to say one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// At WARN (the first of its window), else at debug.
    pub warn: bool,
    /// Repeats logged at debug: for a WARN, those of the window before it (0 for the first);
    /// for a debug line, this one's number in its window (1 for the first repeat).
    pub repeats: u64,
}

#[derive(Debug)]
struct Window {
    since: Instant,
    repeats: u64,
}

/// The windows of the (worker, kind) pairs seen lately.
#[derive(Debug)]
pub struct Repeats {
    window: Duration,
    max_keys: usize,
    seen: HashMap<(String, &'static str), Window>,
}

impl Repeats {
    /// Windows of `window`, for at most `max_keys` (worker, kind) pairs.
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            window,
            max_keys: max_keys.max(1),
            seen: HashMap::new(),
        }
    }

    /// Notes an event of `worker` of `kind` at `now` and says how to log it.
    pub fn note(&mut self, worker: &str, kind: &'static str, now: Instant) -> Verdict {
        let key = (worker.to_owned(), kind);
        if let Some(w) = self.seen.get_mut(&key) {
            if now.saturating_duration_since(w.since) < self.window {
                w.repeats += 1;
                return Verdict {
                    warn: false,
                    repeats: w.repeats,
                };
            }
            let repeats = std::mem::replace(
                w,
                Window {
                    since: now,
                    repeats: 0,
                },
            )
            .repeats;
            return Verdict {
                warn: true,
                repeats,
            };
        }
        if self.seen.len() >= self.max_keys {
            let window = self.window;
            self.seen
                .retain(|_, w| now.saturating_duration_since(w.since) < window);
        }
        if self.seen.len() >= self.max_keys {
            let oldest = self
                .seen
                .iter()
                .min_by_key(|(_, w)| w.since)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.seen.remove(&k);
            }
        }
        self.seen.insert(
            key,
            Window {
                since: now,
                repeats: 0,
            },
        );
        Verdict {
            warn: true,
            repeats: 0,
        }
    }
}

/// Notes what a worker connection met or said before its registration was taken, of `kind` (a
/// failed authentication, a registration refused, too many frames before one, an `error` it
/// reported), which it may repeat at every attempt without end; process-wide as the log is.
/// Says how to log it.
pub fn refusal(worker: &str, kind: &'static str) -> Verdict {
    static REFUSALS: OnceLock<Mutex<Repeats>> = OnceLock::new();
    let refusals = REFUSALS.get_or_init(|| Mutex::new(Repeats::new(WINDOW, MAX_KEYS)));
    // A panic elsewhere while holding it left a map that is still whole: go on with it.
    let mut r = refusals.lock().unwrap_or_else(|p| p.into_inner());
    r.note(worker, kind, Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn say(warn: bool, repeats: u64) -> Verdict {
        Verdict { warn, repeats }
    }

    #[test]
    fn a_worker_refused_again_within_the_window_is_said_once_at_warn_then_with_its_count() {
        let t0 = Instant::now();
        let mut r = Repeats::new(10 * MIN, 100);
        assert_eq!(r.note("w1", "bad signature", t0), say(true, 0));
        for n in 1..=50u32 {
            assert_eq!(
                r.note("w1", "bad signature", t0 + MIN * n / 10),
                say(false, u64::from(n))
            );
        }
        // Another worker, and the same worker for another reason, each get their own WARN.
        assert_eq!(r.note("w2", "bad signature", t0 + MIN), say(true, 0));
        assert_eq!(r.note("w1", "integrity required", t0 + MIN), say(true, 0));
        assert_eq!(r.note("w1", "bad signature", t0 + 9 * MIN), say(false, 51));
        // The window over: WARN again, with how many went to debug in it; then quiet again.
        assert_eq!(r.note("w1", "bad signature", t0 + 10 * MIN), say(true, 51));
        assert_eq!(r.note("w1", "bad signature", t0 + 11 * MIN), say(false, 1));
        assert_eq!(r.note("w1", "bad signature", t0 + 25 * MIN), say(true, 1));
        // A worker quiet for a window is said at WARN when it comes back.
        assert_eq!(r.note("w2", "bad signature", t0 + 30 * MIN), say(true, 0));
    }

    #[test]
    fn the_pairs_kept_are_bounded_forgetting_ended_windows_then_the_oldest() {
        let t0 = Instant::now();
        let mut r = Repeats::new(10 * MIN, 3);
        for (i, w) in ["a", "b", "c"].into_iter().enumerate() {
            assert!(r.note(w, "x", t0 + MIN * i as u32).warn);
        }
        // Full, none ended: the oldest (`a`) goes.
        assert!(r.note("d", "x", t0 + 3 * MIN).warn);
        assert_eq!(r.seen.len(), 3);
        assert!(!r.note("b", "x", t0 + 4 * MIN).warn);
        assert!(r.note("a", "x", t0 + 4 * MIN).warn, "a was forgotten");
        // Past every window: all are forgotten at once, and the map stays bounded.
        for i in 0..100u32 {
            r.note(
                &format!("n{i}"),
                "x",
                t0 + 60 * MIN + Duration::from_secs(u64::from(i)),
            );
            assert!(r.seen.len() <= 3);
        }
    }
}
