//! How fast the link to the coordinator carries what the worker sends, and what that sizes: the
//! send window and the pieces of checkpoints. A message sent is acknowledged once the
//! coordinator has read it; the bytes acknowledged between its send and its acknowledgement,
//! over that time, are a sample of the delivery rate (as BBR takes its samples), whatever queued
//! ahead of it. The most of the recent samples is the link's rate: a sample taken while the
//! worker had little to send reads low, never high.
//!
//! Sized to about [`WAIT`] of that rate, the window and the pieces bound how long a result, a
//! notice or a state update waits behind what was sent before it: on a link of 8 kB/s, a
//! checkpoint of 256 KiB in one piece held a result behind it for half a minute.

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

/// The send window for a link of `rate` bytes a second (`None`: not measured yet).
pub fn window_for(rate: Option<f64>) -> usize {
    rate.map_or(MAX_WINDOW, |r| {
        (r * WAIT.as_secs_f64()).clamp(MIN_WINDOW as f64, MAX_WINDOW as f64) as usize
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
        assert_eq!(window_for(None), MAX_WINDOW);
        assert_eq!(window_for(Some(8_000.0)), MIN_WINDOW);
        assert_eq!(window_for(Some(100_000.0)), 100_000);
        assert_eq!(window_for(Some(1e9)), MAX_WINDOW);
        assert_eq!(piece_for(None), usize::MAX);
        assert_eq!(piece_for(Some(2_000.0)), MIN_PIECE);
        assert_eq!(piece_for(Some(100_000.0)), 100_000);
    }
}
