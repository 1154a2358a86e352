//! How fast the link to the coordinator carries what the worker sends, and what that sizes: the
//! send window and the pieces of checkpoints. A message sent is acknowledged once the
//! coordinator has read it; the bytes acknowledged between its send and its acknowledgement,
//! over that time, are a sample of the delivery rate (as BBR takes its samples), whatever queued
//! ahead of it. The most of the recent samples is the link's rate: a sample taken while the
//! worker had little to send reads low, never high.
//!
//! Sized to about [`WAIT`] of that rate, the window and the pieces bound how long a result, a
//! notice or a state update waits behind what was sent before it: on a link of 8 kB/s, a
//! checkpoint of 256 KiB in one piece held a result behind it for half a minute. The window
//! holds a round trip of the rate more ([`window_for`]): what is in flight is not waiting in a
//! queue, and a window of less than a round trip measures itself, not the link.

use std::time::Duration;

use tokio::time::Instant;

/// About how long what is sent next waits behind what was sent before it.
pub const WAIT: Duration = Duration::from_secs(1);
/// The most sent and not yet acknowledged: on a fast link, or one not measured yet, a whole
/// window goes at once.
pub const MAX_WINDOW: usize = 512 * 1024;
/// The least sent and not yet acknowledged.
pub const MIN_WINDOW: usize = 32 * 1024;
/// The smallest checkpoint piece cut for a slow link: the envelope of a piece (its message and
/// base64) stays a small share of it.
pub const MIN_PIECE: usize = 16 * 1024;
/// How long a sample counts towards the rate: one bucket of samples is kept whole while the
/// next fills, so a sample counts for between one and two of these.
const BUCKET: Duration = Duration::from_secs(5);

/// The delivery rate: the most of the samples of the last one or two `BUCKET`s.
#[derive(Debug, Default)]
pub struct DeliveryRate {
    /// The most of the bucket filling, and of the one before (bytes a second).
    current: f64,
    previous: f64,
    /// When the bucket filling started; `None` before the first sample.
    started: Option<Instant>,
}

impl DeliveryRate {
    /// `bytes` were acknowledged over `over` (from a message's send to its acknowledgement).
    pub fn sample(&mut self, bytes: u64, over: Duration, now: Instant) {
        let secs = over.as_secs_f64();
        if bytes == 0 || secs <= 0.0 {
            return;
        }
        self.roll(now);
        self.current = self.current.max(bytes as f64 / secs);
    }

    /// The link's rate (bytes a second) as of `now`; `None` before a sample, or once the last
    /// is two buckets old.
    pub fn estimate(&self, now: Instant) -> Option<f64> {
        let started = self.started?;
        let age = now.saturating_duration_since(started);
        let rate = match age {
            a if a < BUCKET => self.current.max(self.previous),
            a if a < 2 * BUCKET => self.current,
            _ => 0.0,
        };
        (rate > 0.0).then_some(rate)
    }

    /// Starts a new bucket when the one filling is full (both anew after two buckets' time).
    fn roll(&mut self, now: Instant) {
        match self.started {
            Some(s) if now.saturating_duration_since(s) < BUCKET => {}
            Some(s) if now.saturating_duration_since(s) < 2 * BUCKET => {
                self.previous = self.current;
                self.current = 0.0;
                self.started = Some(s + BUCKET);
            }
            _ => {
                self.previous = 0.0;
                self.current = 0.0;
                self.started = Some(now);
            }
        }
    }
}

/// The delivery rate the statistics show (`send_bytes_per_sec`): the most of the recent
/// samples of messages sent while more waited to go (held by the window or the pace), so that
/// the link, or the coordinator's byte rate the worker paces itself to, set the figure. A
/// message sent with nothing behind it is application-limited, as BBR marks such samples: it
/// says how little the worker had to send (one report over a 300 ms path reads 3 kB/s,
/// whatever the link carries), and is left out. Once the recent samples age out, the last
/// measure stays: an idle worker shows what its link carried when last busy, not a figure of
/// its idleness. (The window and the pieces are sized from every sample, [`DeliveryRate`]:
/// a link that slowed while idle must be measured again before the next checkpoint is cut.)
#[derive(Debug, Default)]
pub struct ShownRate {
    rate: DeliveryRate,
    last: Option<f64>,
}

impl ShownRate {
    /// A sample as [`DeliveryRate::sample`] takes it, of a message sent while more waited
    /// (`backlogged`); the others are not counted.
    pub fn sample(&mut self, bytes: u64, over: Duration, now: Instant, backlogged: bool) {
        if backlogged {
            self.rate.sample(bytes, over, now);
        }
    }

    /// The rate to show as of `now` (bytes a second): the recent samples' most, or the last
    /// such measure once they aged out; `None` before any sample that counted.
    pub fn estimate(&mut self, now: Instant) -> Option<f64> {
        if let Some(r) = self.rate.estimate(now) {
            self.last = Some(r);
        }
        self.last
    }
}

/// The send window for a link of `rate` bytes a second (`None`: not measured yet) whose round
/// trip is `rtt` (zero: not measured yet): a round trip of the rate, what the link holds in
/// flight, and [`WAIT`] of it more, what waits in a queue, within [`MIN_WINDOW`] and
/// [`MAX_WINDOW`]. The link then carries `min(its rate, window / rtt)`.
///
/// A window of [`WAIT`] alone shrank on every path slower than it: with the window in flight
/// and a round trip of `rtt`, each acknowledgement measures `window / rtt` (the link is not
/// full, so the window, not the link, sets the rate), and the next window was that times
/// [`WAIT`], less than the last whenever `rtt` > [`WAIT`], down to [`MIN_WINDOW`]: a
/// satellite path of 1.2 s under load carried 27 kB/s whatever its rate (a 64 MiB checkpoint
/// in 41 minutes, not one over a link of 1 MB/s). With the round trip counted, a window the
/// link is not full with grows (`window / rtt * (rtt + WAIT)`) until the link is full, and a
/// full one is a round trip of the link and [`WAIT`] of queue.
pub fn window_for(rate: Option<f64>, rtt: Duration) -> usize {
    rate.map_or(MAX_WINDOW, |r| {
        (r * (rtt + WAIT).as_secs_f64()).clamp(MIN_WINDOW as f64, MAX_WINDOW as f64) as usize
    })
}

/// The largest checkpoint piece for a link of `rate` bytes a second (`None`: no bound).
pub fn piece_for(rate: Option<f64>) -> usize {
    rate.map_or(usize::MAX, |r| {
        (r * WAIT.as_secs_f64()).max(MIN_PIECE as f64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_the_most_of_recent_samples() {
        let t0 = Instant::now();
        let mut r = DeliveryRate::default();
        assert_eq!(r.estimate(t0), None);
        r.sample(8_000, Duration::from_secs(1), t0);
        // A sample taken with little to send reads low: it does not lower the rate.
        r.sample(100, Duration::from_millis(100), t0 + Duration::from_secs(1));
        assert_eq!(r.estimate(t0 + Duration::from_secs(1)), Some(8_000.0));
        // Kept over the next bucket too, then forgotten.
        r.sample(100, Duration::from_millis(100), t0 + Duration::from_secs(6));
        assert_eq!(r.estimate(t0 + Duration::from_secs(6)), Some(8_000.0));
        assert_eq!(r.estimate(t0 + Duration::from_secs(10)), Some(1_000.0));
        assert_eq!(r.estimate(t0 + Duration::from_secs(16)), None);
        // A faster link shows at once.
        r.sample(
            1_000_000,
            Duration::from_millis(10),
            t0 + Duration::from_secs(16),
        );
        assert_eq!(r.estimate(t0 + Duration::from_secs(16)), Some(1e8));
    }

    /// The window a link settles on, round after round of a window in flight: each
    /// acknowledgement samples what the link carried, `min(rate, window / rtt)`, and the next
    /// window is sized from it. The throughput rule: the settled window carries
    /// `min(rate, MAX_WINDOW / rtt)`, whatever the round trip. Before, with a window of a
    /// second of the sample alone, a round trip over a second shrank it to [`MIN_WINDOW`] on
    /// any link: a satellite path of 1.2 s carried 32 KiB / 1.2 s, 27 kB/s.
    #[test]
    fn a_path_slower_than_a_second_keeps_a_window_that_fills_the_link() {
        let settled = |rate: f64, rtt: Duration| {
            let mut window = MAX_WINDOW;
            for _ in 0..50 {
                let carried = rate.min(window as f64 / rtt.as_secs_f64());
                window = window_for(Some(carried), rtt);
            }
            (window, rate.min(window as f64 / rtt.as_secs_f64()))
        };
        let ms = Duration::from_millis;
        for (rate, rtt) in [
            (200_000.0, ms(1_200)),
            (200_000.0, ms(2_500)),
            (1_000_000.0, ms(1_200)),
            (1_000_000.0, ms(600)),
            (8_000.0, ms(1_500)),
            (5e6, ms(40)),
        ] {
            let (window, carried) = settled(rate, rtt);
            let rule = rate.min(MAX_WINDOW as f64 / rtt.as_secs_f64());
            assert!(
                (carried - rule).abs() <= rule * 1e-9,
                "{rate} B/s over {rtt:?}: window {window} carries {carried} B/s, not {rule}"
            );
        }
        // A link it fills: a round trip of it in flight and a second of it queued.
        assert_eq!(settled(200_000.0, ms(1_200)).0, 440_000);
    }

    /// An idle worker on a path of 300 ms: its reports, each sent with nothing behind it,
    /// read 3 kB/s. The shown rate leaves them out and keeps what the link carried when the
    /// worker last had more to send than went at once, past the samples' age; the rate that
    /// sizes the window and the pieces follows every sample.
    #[test]
    fn the_shown_rate_leaves_out_samples_of_a_worker_with_little_to_send() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut shown = ShownRate::default();
        let mut sizing = DeliveryRate::default();
        let report = |shown: &mut ShownRate, sizing: &mut DeliveryRate, at| {
            shown.sample(900, Duration::from_millis(300), at, false);
            sizing.sample(900, Duration::from_millis(300), at);
        };
        report(&mut shown, &mut sizing, t0);
        assert_eq!(shown.estimate(t0), None, "no measure of the link yet");
        assert_eq!(sizing.estimate(t0), Some(3_000.0));
        // An upload kept the window full: 2 MB/s.
        shown.sample(600_000, Duration::from_millis(300), t0 + secs(1), true);
        assert_eq!(shown.estimate(t0 + secs(1)), Some(2_000_000.0));
        // Idle again, for long past two buckets.
        for i in 0..12 {
            report(&mut shown, &mut sizing, t0 + secs(30 + 30 * i));
        }
        let later = t0 + secs(30 * 12);
        assert_eq!(shown.estimate(later), Some(2_000_000.0), "the last measure");
        assert_eq!(sizing.estimate(later), Some(3_000.0));
        // A busy spell on a link that slowed shows at once, lower.
        shown.sample(150_000, Duration::from_millis(300), later + secs(1), true);
        assert_eq!(shown.estimate(later + secs(1)), Some(500_000.0));
    }

    #[test]
    fn samples_of_nothing_or_no_time_are_ignored() {
        let t0 = Instant::now();
        let mut r = DeliveryRate::default();
        r.sample(0, Duration::from_secs(1), t0);
        r.sample(1_000, Duration::ZERO, t0);
        assert_eq!(r.estimate(t0), None);
    }

    #[test]
    fn the_window_and_pieces_hold_about_a_second_of_the_link_within_bounds() {
        let zero = Duration::ZERO;
        assert_eq!(window_for(None, zero), MAX_WINDOW);
        assert_eq!(window_for(Some(8_000.0), zero), MIN_WINDOW);
        assert_eq!(window_for(Some(100_000.0), zero), 100_000);
        assert_eq!(
            window_for(Some(100_000.0), Duration::from_millis(500)),
            150_000
        );
        assert_eq!(window_for(Some(1e9), zero), MAX_WINDOW);
        assert_eq!(piece_for(None), usize::MAX);
        assert_eq!(piece_for(Some(2_000.0)), MIN_PIECE);
        assert_eq!(piece_for(Some(100_000.0)), 100_000);
    }
}
