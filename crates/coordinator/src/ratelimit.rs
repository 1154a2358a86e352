//! Log lines a fleet can repeat without end, said once a window per worker and kind, and no
//! more than a few a minute over all of them.
//!
//! A worker refused its registration tries again, and again: a fleet left on an old secret
//! after a rotation, or on another protocol, made one WARN line per worker per attempt, for as
//! long as it ran, and so did a client that sends frames and never registers. The first
//! refusal of a worker of a kind is said at WARN; its repeats within [`WINDOW`] go to debug,
//! and the next WARN after the window says how many there were. Counters (the overview's
//! `auth_failures`, `pre_registration_overflows`, `tether_registrations_refused_total`) count
//! every one regardless.
//!
//! A client that makes up a new worker id at every attempt is a first every time: over every
//! worker and kind, at most [`WARNS_A_MINUTE`] first lines are said at WARN a minute
//! ([`CAP_WINDOW`]). The first one past them says so at WARN, the rest of the minute go to
//! debug (a worker's refusal among them is said at WARN when it comes again after the
//! minute), and the first refusal after the minute says at WARN how many went to debug.
//!
//! A kind is a `&'static str`, a class of the refusal and not its text: a reason may carry
//! what the attempt sent (an id, a clock's skew), and keyed on that every attempt would be a
//! first. The line still says the whole reason.
//!
//! Each coordinator has its own ([`Refusals`], shared by its sessions and its core): one
//! embedded beside another, or a test's, is not told its first lines were said by the other.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long repeats of a worker's refusal of the same kind are logged at debug after the WARN
/// line that said it.
pub const WINDOW: Duration = Duration::from_secs(600);

/// (worker, kind) pairs remembered at most; past it, windows that ended are forgotten, then
/// the oldest. A few MB at most, against ids made up by the attempt.
pub const MAX_KEYS: usize = 16_384;

/// First lines said at WARN at most a [`CAP_WINDOW`], over every worker and kind.
pub const WARNS_A_MINUTE: u64 = 20;

/// The window of [`WARNS_A_MINUTE`].
pub const CAP_WINDOW: Duration = Duration::from_secs(60);

/// How to say one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// At WARN (the first of its window), else at debug.
    pub warn: bool,
    /// Repeats logged at debug: for a WARN, those of the window before it (0 for the first);
    /// for a debug line, this one's number in its window (1 for the first repeat).
    pub repeats: u64,
}

/// What the cap over every worker says of itself, at WARN, before the event's own line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The cap was reached: this first line and the rest of the minute's go to debug.
    Capped,
    /// A minute began after one that sent `suppressed` first lines to debug over the cap.
    Suppressed(u64),
}

#[derive(Debug)]
struct Window {
    since: Instant,
    repeats: u64,
    /// Said at WARN: its repeats within the window go to debug. Not yet (the cap sent its
    /// first line to debug): the next is tried at WARN again.
    said: bool,
}

/// The first lines said at WARN in the current window, over every worker and kind.
#[derive(Debug)]
struct Cap {
    most: u64,
    window: Duration,
    since: Option<Instant>,
    said: u64,
    suppressed: u64,
}

impl Cap {
    /// Whether a first line may be said at WARN at `now`, and what the cap says first.
    fn take(&mut self, now: Instant) -> (bool, Option<Notice>) {
        let mut notice = None;
        if self
            .since
            .is_none_or(|since| now.saturating_duration_since(since) >= self.window)
        {
            notice = (self.suppressed > 0).then_some(Notice::Suppressed(self.suppressed));
            *self = Cap {
                since: Some(now),
                said: 0,
                suppressed: 0,
                ..*self
            };
        }
        if self.said < self.most {
            self.said += 1;
            return (true, notice);
        }
        self.suppressed += 1;
        // Not with `Suppressed`: a window that just began has room (`most` is at least 1).
        (false, (self.suppressed == 1).then_some(Notice::Capped))
    }
}

/// The windows of the (worker, kind) pairs seen lately, and the cap over all of them.
#[derive(Debug)]
pub struct Repeats {
    window: Duration,
    max_keys: usize,
    seen: HashMap<(String, &'static str), Window>,
    cap: Cap,
}

impl Repeats {
    /// Windows of `window`, for at most `max_keys` (worker, kind) pairs, and at most
    /// [`WARNS_A_MINUTE`] first lines at WARN a [`CAP_WINDOW`].
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            window,
            max_keys: max_keys.max(1),
            seen: HashMap::new(),
            cap: Cap {
                most: WARNS_A_MINUTE,
                window: CAP_WINDOW,
                since: None,
                said: 0,
                suppressed: 0,
            },
        }
    }

    /// At most `most` (at least 1) first lines at WARN a `window`, over every worker and kind.
    pub fn capped(mut self, most: u64, window: Duration) -> Self {
        self.cap.most = most.max(1);
        self.cap.window = window;
        self
    }

    /// Notes an event of `worker` of `kind` at `now` and says how to log it, and what the cap
    /// says before it.
    pub fn note(
        &mut self,
        worker: &str,
        kind: &'static str,
        now: Instant,
    ) -> (Verdict, Option<Notice>) {
        let key = (worker.to_owned(), kind);
        if let Some(w) = self.seen.get_mut(&key)
            && w.said
            && now.saturating_duration_since(w.since) < self.window
        {
            w.repeats += 1;
            let repeat = Verdict {
                warn: false,
                repeats: w.repeats,
            };
            return (repeat, None);
        }
        let (warn, notice) = self.cap.take(now);
        if !self.seen.contains_key(&key) {
            self.make_room(now);
        }
        let w = self.seen.entry(key).or_insert(Window {
            since: now,
            repeats: 0,
            said: false,
        });
        if !warn {
            w.repeats += 1;
            let demoted = Verdict {
                warn: false,
                repeats: w.repeats,
            };
            return (demoted, notice);
        }
        let window = Window {
            since: now,
            repeats: 0,
            said: true,
        };
        let repeats = std::mem::replace(w, window).repeats;
        (
            Verdict {
                warn: true,
                repeats,
            },
            notice,
        )
    }

    /// Room for one more pair: windows that ended are forgotten, then the oldest.
    fn make_room(&mut self, now: Instant) {
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
    }
}

/// What a coordinator's worker connections met or said before their registration was taken,
/// and the registrations its core refused (a failed authentication, a registration refused,
/// too many frames before one, an `error` reported), which a client may repeat at every
/// attempt without end: shared by its sessions and its core.
///
/// Beside them, the API requests refused (401, 403) by source address: [`Refusals::note_api`].
#[derive(Debug)]
pub struct Refusals(Mutex<Repeats>, Mutex<Repeats>);

/// How long repeats of an address's refused API requests are logged at debug after the WARN
/// line that said the first.
pub const API_WINDOW: Duration = Duration::from_secs(60);

impl Default for Refusals {
    fn default() -> Self {
        Self(
            Mutex::new(Repeats::new(WINDOW, MAX_KEYS)),
            Mutex::new(Repeats::new(API_WINDOW, MAX_KEYS)),
        )
    }
}

impl Refusals {
    /// Notes an API request from `peer` refused now (a bad or missing token, a scope too
    /// narrow): the first of an address a minute is said at WARN, its repeats at debug and
    /// counted in the next WARN line (over every address, [`WARNS_A_MINUTE`] at most).
    pub fn note_api(&self, peer: std::net::IpAddr) -> Verdict {
        let (verdict, notice) = self.1.lock().unwrap_or_else(|p| p.into_inner()).note(
            &peer.to_string(),
            "api",
            Instant::now(),
        );
        match notice {
            Some(Notice::Capped) => tracing::warn!(
                most = WARNS_A_MINUTE,
                "more API requests refused within a minute than said at WARN: the rest of this minute's are logged at debug (tether_counter_total{{name=\"api_auth_failures\"}} counts every one)"
            ),
            Some(Notice::Suppressed(n)) => tracing::warn!(
                suppressed = n,
                "refused API requests logged at debug in the last minute, past the WARN lines a minute allows"
            ),
            None => {}
        }
        verdict
    }

    /// Notes an event of `worker` of `kind` now, says what the cap has to say, and says how to
    /// log the event.
    pub fn note(&self, worker: &str, kind: &'static str) -> Verdict {
        // A panic elsewhere while holding it left a map that is still whole: go on with it.
        let (verdict, notice) =
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .note(worker, kind, Instant::now());
        match notice {
            Some(Notice::Capped) => {
                tracing::warn!(
                    most = WARNS_A_MINUTE,
                    "more workers refused within a minute than said at WARN (`most`): the rest of this minute's refusals are logged at debug, and their number when the minute is over (tether_registrations_refused_total counts every registration refused)"
                );
            }
            Some(Notice::Suppressed(n)) => {
                tracing::warn!(
                    suppressed = n,
                    "refusals of workers logged at debug in the last minute, past the WARN lines a minute allows (`suppressed`)"
                );
            }
            None => {}
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn say(warn: bool, repeats: u64) -> (Verdict, Option<Notice>) {
        (Verdict { warn, repeats }, None)
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
            assert!(r.note(w, "x", t0 + MIN * i as u32).0.warn);
        }
        // Full, none ended: the oldest (`a`) goes.
        assert!(r.note("d", "x", t0 + 3 * MIN).0.warn);
        assert_eq!(r.seen.len(), 3);
        assert!(!r.note("b", "x", t0 + 4 * MIN).0.warn);
        assert!(r.note("a", "x", t0 + 4 * MIN).0.warn, "a was forgotten");
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

    /// A client that makes up a worker id at every attempt is a first every time: over all of
    /// them at most the cap is said at WARN a window, the first past it saying so, and the
    /// first of the next window saying how many went to debug. A worker whose first line the
    /// cap sent to debug is said at WARN when it comes again after the flood, with its count;
    /// one said before the flood keeps its own window.
    #[test]
    fn a_flood_of_made_up_ids_is_said_at_warn_at_most_the_cap_a_minute_then_counted() {
        let t0 = Instant::now();
        let mut r = Repeats::new(10 * MIN, 1000).capped(5, MIN);
        assert_eq!(r.note("real", "bad signature", t0), say(true, 0));
        let (mut warned, mut notices) = (1, Vec::new());
        for i in 0..50u32 {
            let at = t0 + Duration::from_millis(100 * u64::from(i));
            let (said, notice) = r.note(&format!("made-up-{i}"), "other_worker", at);
            warned += u64::from(said.warn);
            notices.extend(notice);
            if i == 25 {
                // Another real worker, caught in the flood; the first one, quiet in its window.
                assert_eq!(r.note("late", "bad signature", at), say(false, 1));
                assert_eq!(r.note("real", "bad signature", at), say(false, 1));
            }
        }
        assert_eq!(warned, 5, "at most the cap a window");
        assert_eq!(
            notices,
            [Notice::Capped],
            "said once, as the cap is reached"
        );
        // The minute over: its count first (46 made up, 4 of 50 said with `real`'s, and
        // `late`), then `late` at WARN with the line that went to debug.
        let after = t0 + MIN + Duration::from_secs(5);
        assert_eq!(
            r.note("late", "bad signature", after),
            (
                Verdict {
                    warn: true,
                    repeats: 1
                },
                Some(Notice::Suppressed(47))
            )
        );
        assert_eq!(r.note("late", "bad signature", after), say(false, 1));
        assert_eq!(r.note("real", "bad signature", after), say(false, 2));
        // Said once: the next window has no count to say.
        assert_eq!(r.note("made-up-x", "other_worker", after), say(true, 0));
    }
}
