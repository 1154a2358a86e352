//! Connection statistics with correct formulas: every interval counts (including the current
//! one), failures are counted, RTT percentiles come from a window of recent samples of the
//! session under way.

use std::collections::VecDeque;
use std::time::Duration;

use tether_proto::task::ConnStats;
use tokio::time::Instant;

/// Samples kept for the RTT percentiles, and reconnect durations kept for their mean.
const WINDOW: usize = 128;
/// The oldest RTT sample the percentiles count. With heartbeats every 5 s the window holds the
/// last 60 samples: enough for a p95, and a path that changed within a session (a route, a
/// proxy's added latency) shows in the p50 within half of it and wholly within it, where 128
/// samples of any age held the old path for over ten minutes.
pub const RTT_AGE: Duration = Duration::from_secs(300);

/// The connection state machine's states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected,
    Disconnected,
    Failed,
    Shutdown,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
            ConnState::Disconnected => "disconnected",
            ConnState::Failed => "failed",
            ConnState::Shutdown => "shutdown",
        }
    }
}

/// The least time between a report of these statistics and one sent early for a moved RTT
/// ([`StatsTracker::report_stale`]).
pub const EARLY_REPORT_GAP: Duration = Duration::from_secs(5);
/// The RTT samples of the session a report sent early needs at least: one or two round trips
/// of a new path are no figure to correct the coordinator's by.
pub const EARLY_REPORT_SAMPLES: usize = 3;
/// How far the RTT p50 must have moved from the one last reported for a report to go early:
/// by more than this share of it, and by more than [`EARLY_REPORT_MS`].
pub const EARLY_REPORT_SHARE: f64 = 0.5;
/// See [`EARLY_REPORT_SHARE`]: on a LAN path of a millisecond or two, jitter alone moves the
/// p50 by more than half.
pub const EARLY_REPORT_MS: f64 = 20.0;

/// The unit of an RTT sample's time: fine enough beside [`RTT_AGE`], and a `u32` of them
/// lasts some 13 years.
const TICK: Duration = Duration::from_millis(100);

/// One RTT sample, in 8 bytes (an `Instant` and an `f64` took 24): when it was taken, in
/// [`TICK`]s since its tracker started, and the round trip in ms (an `f32` holds a round trip
/// to a millionth of itself).
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: u32,
    ms: f32,
}

impl Sample {
    /// Older than [`RTT_AGE`] at tick `now`.
    fn aged(self, now: u32) -> bool {
        u128::from(now.saturating_sub(self.at)) * TICK.as_millis() > RTT_AGE.as_millis()
    }
}

/// Tracks one worker's connection history.
#[derive(Debug, Clone)]
pub struct StatsTracker {
    started: Instant,
    pub state: ConnState,
    attempts: u64,
    successes: u64,
    failures: u64,
    disconnections: u64,
    connected_total: Duration,
    connected_since: Option<Instant>,
    /// The last frame of the session under way as the session last said ([`Self::on_heard`]):
    /// the end of what its loss would count as alive.
    heard_until: Option<Instant>,
    /// When the first session registered: the link's record starts there (time before it is
    /// a coordinator not there yet, not a link that does not stay up).
    first_registered: Option<Instant>,
    lost_at: Option<Instant>,
    /// RTT samples of the session under way, with when each was taken: at most [`WINDOW`],
    /// none older than [`RTT_AGE`] counted. Grown as samples come (a 5 s heartbeat fills
    /// 60 in [`RTT_AGE`]), not held at [`WINDOW`] from the start: at 24 bytes a sample the
    /// 128 preallocated cost a fleet of 10,000 workers in one process some 30 MB.
    rtts: VecDeque<Sample>,
    reconnects: u64,
    reconnect_ms: VecDeque<f64>,
    reconnect_max_ms: f64,
    /// The last report of these statistics sent (`telemetry`): when, and the RTT p50 it
    /// showed (`None`: it had no RTT sample). What the coordinator shows until the next.
    reported: Option<(Instant, Option<f64>)>,
}

impl StatsTracker {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            state: ConnState::Disconnected,
            attempts: 0,
            successes: 0,
            failures: 0,
            disconnections: 0,
            connected_total: Duration::ZERO,
            connected_since: None,
            heard_until: None,
            first_registered: None,
            lost_at: None,
            rtts: VecDeque::new(),
            reconnects: 0,
            reconnect_ms: VecDeque::new(),
            reconnect_max_ms: 0.0,
            reported: None,
        }
    }

    pub fn on_attempt(&mut self) {
        self.attempts += 1;
        self.state = ConnState::Connecting;
    }

    /// An attempt that did not reach a registered session.
    pub fn on_attempt_failed(&mut self) {
        self.failures += 1;
        self.state = ConnState::Disconnected;
    }

    /// A session registered. Returns the reconnect duration if this ends an outage.
    ///
    /// The RTT samples start over: a new connection may take another path (a failover, a
    /// proxy that came back with other latency), and the figures describe the path in use.
    pub fn on_registered(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.rtts.clear();
        self.successes += 1;
        self.connected_since = Some(now);
        self.heard_until = Some(now);
        self.first_registered.get_or_insert(now);
        self.state = ConnState::Connected;
        let outage = self.lost_at.take().map(|t| now - t);
        if let Some(d) = outage {
            let ms = d.as_secs_f64() * 1e3;
            self.reconnects += 1;
            push_window(&mut self.reconnect_ms, ms);
            self.reconnect_max_ms = self.reconnect_max_ms.max(ms);
        }
        outage
    }

    /// The session under way heard from the coordinator at `at` (its latest frame, as the
    /// session last looked: with its duties and at each heartbeat answer, never per frame).
    pub fn on_heard(&mut self, at: Instant) {
        if self.connected_since.is_some() {
            self.heard_until = self.heard_until.max(Some(at));
        }
    }

    /// How long the registered session under way was alive as of the session's last look:
    /// from its registration to the last frame it had heard then, which is what its loss would
    /// hold against `healthy_after` (frames since that look, at most a heartbeat interval's,
    /// are not counted yet). Not its age: a session silent since its registration is not
    /// healthy however long its liveness timeout takes. `None` between sessions.
    pub fn alive_age(&self) -> Option<Duration> {
        Some(
            self.heard_until?
                .saturating_duration_since(self.connected_since?),
        )
    }

    /// A registered session ended.
    pub fn on_session_end(&mut self) {
        let now = Instant::now();
        self.heard_until = None;
        if let Some(since) = self.connected_since.take() {
            self.connected_total += now - since;
            self.disconnections += 1;
            self.lost_at = Some(now);
        }
        self.state = ConnState::Disconnected;
    }

    /// A round trip measured in the session under way.
    pub fn on_rtt(&mut self, rtt: Duration) {
        let now = self.tick(Instant::now());
        if self.rtts.len() == WINDOW {
            self.rtts.pop_front();
        }
        self.rtts.push_back(Sample {
            at: now,
            ms: (rtt.as_secs_f64() * 1e3) as f32,
        });
        // Aged samples leave here too, so the window never holds more than it counts for long.
        while self.rtts.front().is_some_and(|s| s.aged(now)) {
            self.rtts.pop_front();
        }
    }

    /// `at` in [`TICK`]s since the tracker started (saturating, some 13 years on).
    fn tick(&self, at: Instant) -> u32 {
        let ticks = at.saturating_duration_since(self.started).as_millis() / TICK.as_millis();
        u32::try_from(ticks).unwrap_or(u32::MAX)
    }

    /// The RTT samples the figures count now, ms: the session's, of the last [`RTT_AGE`].
    fn recent_rtts(&self) -> VecDeque<f64> {
        let now = self.tick(Instant::now());
        self.rtts
            .iter()
            .filter(|s| !s.aged(now))
            .map(|s| f64::from(s.ms))
            .collect()
    }

    /// A report of these statistics, `sent` (a snapshot), went out.
    pub fn on_reported(&mut self, sent: &ConnStats) {
        let p50 = (sent.rtt_samples > 0).then_some(sent.rtt_p50_ms);
        self.reported = Some((Instant::now(), p50));
    }

    /// Whether the RTT the coordinator shows, the last report's p50, is wrong enough that a
    /// report should go before the next telemetry interval: the session's p50, over at least
    /// [`EARLY_REPORT_SAMPLES`] round trips, moved from it by more than
    /// [`EARLY_REPORT_SHARE`] of it and more than [`EARLY_REPORT_MS`], and the last report
    /// went [`EARLY_REPORT_GAP`] ago or more.
    ///
    /// Never for a registration alone: the figure compared with is the last report's of any
    /// session, so a reconnect over the same path (a herd's, after a coordinator's restart)
    /// finds nothing moved; and a worker that has reported no RTT yet has no figure shown to
    /// correct (the coordinator shows none, not a wrong one), so a fleet's first sessions
    /// wait for their periodic reports.
    pub fn report_stale(&self) -> bool {
        let Some((at, Some(shown))) = self.reported else {
            return false;
        };
        if at.elapsed() < EARLY_REPORT_GAP {
            return false;
        }
        let rtts = self.recent_rtts();
        if rtts.len() < EARLY_REPORT_SAMPLES {
            return false;
        }
        percentile(&rtts, 50.0).is_some_and(|p50| {
            (p50 - shown).abs() > (shown * EARLY_REPORT_SHARE).max(EARLY_REPORT_MS)
        })
    }

    /// The given percentile (0..=100) of recent RTT samples, in ms.
    pub fn rtt_percentile(&self, p: f64) -> Option<f64> {
        percentile(&self.recent_rtts(), p)
    }

    pub fn reset(&mut self) {
        let state = self.state;
        let connected = self.connected_since.is_some();
        *self = Self::new();
        self.state = state;
        if connected {
            self.connected_since = Some(self.started);
            self.heard_until = Some(self.started);
            self.first_registered = Some(self.started);
        }
    }

    /// Sessions registered so far.
    pub fn sessions(&self) -> u64 {
        self.successes
    }

    /// The share of time connected since the first session registered (`None` before one):
    /// how well the link stays up, for the backoff's boost. The lifetime `stability` also
    /// counts the wait for a coordinator not there yet, which says nothing of the link.
    pub fn link_stability(&self) -> Option<f64> {
        let since = self.first_registered?.elapsed().as_secs_f64();
        Some(match since > 0.0 {
            true => (self.connected_time().as_secs_f64() / since).clamp(0.0, 1.0),
            false => 1.0,
        })
    }

    /// Connected time including the current session.
    pub fn connected_time(&self) -> Duration {
        self.connected_total
            + self
                .connected_since
                .map(|s| Instant::now() - s)
                .unwrap_or_default()
    }

    /// A snapshot for telemetry and the API.
    pub fn snapshot(&self) -> ConnStats {
        let total = self.started.elapsed().as_secs_f64();
        let connected = self.connected_time().as_secs_f64();
        let rtts = self.recent_rtts();
        ConnStats {
            state: self.state.as_str().to_owned(),
            connection_attempts: self.attempts,
            successful_connections: self.successes,
            failed_connections: self.failures,
            disconnections: self.disconnections,
            connected_secs: connected,
            total_secs: total,
            stability: if total > 0.0 {
                (connected / total).clamp(0.0, 1.0)
            } else {
                1.0
            },
            success_rate: if self.attempts > 0 {
                self.successes as f64 / self.attempts as f64
            } else {
                1.0
            },
            rtt_samples: rtts.len() as u64,
            rtt_avg_ms: mean(&rtts),
            rtt_p50_ms: percentile(&rtts, 50.0).unwrap_or(0.0),
            rtt_p95_ms: percentile(&rtts, 95.0).unwrap_or(0.0),
            rtt_p99_ms: percentile(&rtts, 99.0).unwrap_or(0.0),
            reconnects: self.reconnects,
            reconnect_avg_ms: mean(&self.reconnect_ms),
            reconnect_max_ms: self.reconnect_max_ms,
            heartbeat_timeout_ms: 0,
            heartbeat_interval_ms: 0,
            send_bytes_per_sec: 0,
            backoff_factor: 0.0,
            next_backoff_ms: 0,
        }
    }
}

impl Default for StatsTracker {
    fn default() -> Self {
        Self::new()
    }
}

fn push_window(w: &mut VecDeque<f64>, v: f64) {
    if w.len() == WINDOW {
        w.pop_front();
    }
    w.push_back(v);
}

fn mean(w: &VecDeque<f64>) -> f64 {
    if w.is_empty() {
        0.0
    } else {
        w.iter().sum::<f64>() / w.len() as f64
    }
}

/// Nearest-rank percentile.
pub fn percentile(w: &VecDeque<f64>, p: f64) -> Option<f64> {
    if w.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = w.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stability_counts_the_current_session_and_every_interval() {
        let mut s = StatsTracker::new();
        s.on_attempt();
        s.on_registered();
        tokio::time::sleep(Duration::from_secs(8)).await;
        s.on_session_end();
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.on_attempt();
        s.on_attempt_failed();
        s.on_attempt();
        let outage = s.on_registered().expect("reconnect measured");
        assert_eq!(outage, Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let snap = s.snapshot();
        assert!((snap.stability - 0.9).abs() < 1e-9, "{}", snap.stability);
        assert_eq!(snap.connection_attempts, 3);
        assert_eq!(snap.successful_connections, 2);
        assert_eq!(snap.failed_connections, 1);
        assert!((snap.success_rate - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(snap.reconnects, 1);
        assert!((snap.reconnect_avg_ms - 2000.0).abs() < 1e-6);
    }

    /// Half an hour waiting for a coordinator, then three long sessions a second apart: the
    /// link stays up (its stability since the first session is nearly 1), whatever the
    /// lifetime figure says.
    #[tokio::test(start_paused = true)]
    async fn the_links_stability_starts_at_its_first_session() {
        let mut s = StatsTracker::new();
        assert_eq!(s.link_stability(), None);
        tokio::time::sleep(Duration::from_secs(1800)).await;
        for _ in 0..3 {
            s.on_attempt();
            s.on_registered();
            tokio::time::sleep(Duration::from_secs(400)).await;
            s.on_session_end();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let link = s.link_stability().expect("a session");
        assert!(link > 0.99, "{link}");
        let lifetime = s.snapshot().stability;
        assert!(lifetime < 0.5, "{lifetime}");
        // What the backoff's boost is taken from: no boost for this link.
        let cfg = crate::adaptive::AdaptiveConfig::default();
        assert_eq!(
            crate::adaptive::backoff_boost(&cfg, link, s.sessions()),
            1.0
        );
    }

    #[test]
    fn rtt_percentiles_use_nearest_rank_over_a_window() {
        let mut s = StatsTracker::new();
        for ms in 1..=100 {
            s.on_rtt(Duration::from_millis(ms));
        }
        let snap = s.snapshot();
        assert_eq!(snap.rtt_p50_ms, 50.0);
        assert_eq!(snap.rtt_p95_ms, 95.0);
        assert_eq!(snap.rtt_p99_ms, 99.0);
        assert!((snap.rtt_avg_ms - 50.5).abs() < 1e-9);
        for _ in 0..200 {
            s.on_rtt(Duration::from_millis(7));
        }
        assert_eq!(s.snapshot().rtt_p99_ms, 7.0, "old samples leave the window");
        assert_eq!(
            s.snapshot().rtt_samples,
            WINDOW as u64,
            "the samples the figures are over"
        );
    }

    /// A path whose latency rose mid-session (200 ms to 900 ms): within [`RTT_AGE`] the
    /// figures are the new path's alone, and a session whose heartbeats stopped being answered
    /// reports no figure rather than one minutes old.
    #[tokio::test(start_paused = true)]
    async fn rtt_samples_older_than_the_window_age_out() {
        let mut s = StatsTracker::new();
        s.on_attempt();
        s.on_registered();
        for _ in 0..60 {
            s.on_rtt(Duration::from_millis(200));
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        assert_eq!(s.snapshot().rtt_p50_ms, 200.0);
        for _ in 0..30 {
            s.on_rtt(Duration::from_millis(900));
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let half = s.snapshot();
        assert_eq!(
            (half.rtt_p50_ms, half.rtt_p95_ms),
            (200.0, 900.0),
            "half-way"
        );
        for _ in 0..31 {
            s.on_rtt(Duration::from_millis(900));
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let snap = s.snapshot();
        assert_eq!(snap.rtt_p50_ms, 900.0);
        assert_eq!(snap.rtt_avg_ms, 900.0, "no sample of the old path is left");
        assert!(snap.rtt_samples <= 61, "{}", snap.rtt_samples);
        tokio::time::sleep(RTT_AGE).await;
        let silent = s.snapshot();
        assert_eq!((silent.rtt_samples, silent.rtt_p50_ms), (0, 0.0));
        assert_eq!(s.rtt_percentile(95.0), None);
    }

    /// The RTT figures describe the path of the session under way: a reconnect (maybe over
    /// another path) starts them over, and its first reply is the whole window.
    #[tokio::test(start_paused = true)]
    async fn a_new_session_starts_its_rtt_figures_over() {
        let mut s = StatsTracker::new();
        s.on_attempt();
        s.on_registered();
        for _ in 0..20 {
            s.on_rtt(Duration::from_millis(300));
        }
        s.on_session_end();
        assert_eq!(
            s.snapshot().rtt_p50_ms,
            300.0,
            "the last session's, until the next"
        );
        s.on_attempt();
        s.on_registered();
        let fresh = s.snapshot();
        assert_eq!((fresh.rtt_samples, fresh.rtt_p99_ms), (0, 0.0));
        s.on_rtt(Duration::from_millis(12));
        assert_eq!(s.snapshot().rtt_samples, 1);
        assert_eq!(s.snapshot().rtt_p99_ms, 12.0);
        assert_eq!(s.rtt_percentile(95.0), Some(12.0));
    }

    /// A sample takes 8 bytes, and a tracker holds room for none until samples come: a fleet
    /// of 10,000 workers in one process (the stress fleet) held 3 KiB each of room for 128
    /// samples of 24 bytes, some 30 MB.
    #[test]
    fn a_tracker_holds_room_only_for_the_samples_it_took() {
        assert_eq!(std::mem::size_of::<Sample>(), 8);
        let mut s = StatsTracker::new();
        assert_eq!((s.rtts.capacity(), s.reconnect_ms.capacity()), (0, 0));
        for _ in 0..3 {
            s.on_rtt(Duration::from_millis(5));
        }
        assert!(s.rtts.capacity() < WINDOW, "{}", s.rtts.capacity());
    }

    /// The tracker's half of the early report: the session's p50 against the last report's,
    /// by more than half and 20 ms, over three samples or more, 5 s after that report at the
    /// soonest; nothing for a worker that reported no RTT yet, nor for a new session over the
    /// same path.
    #[tokio::test(start_paused = true)]
    async fn a_report_is_stale_once_the_rtt_moved_far_from_the_one_reported() {
        let ms = Duration::from_millis;
        let mut s = StatsTracker::new();
        s.on_attempt();
        s.on_registered();
        for _ in 0..5 {
            s.on_rtt(ms(100));
        }
        assert!(
            !s.report_stale(),
            "no report sent: no figure shown to correct"
        );
        s.on_reported(&s.snapshot());
        tokio::time::sleep(EARLY_REPORT_GAP).await;
        // A reconnect over the same path: nothing moved.
        s.on_session_end();
        s.on_attempt();
        s.on_registered();
        for _ in 0..5 {
            s.on_rtt(ms(110));
            assert!(!s.report_stale(), "within half of 100 ms");
        }
        // The path slowed: 160 ms is more than half again, but only once most samples are.
        for n in 1..=6 {
            s.on_rtt(ms(160));
            assert_eq!(s.report_stale(), n == 6, "after {n} slow samples");
        }
        s.on_reported(&s.snapshot());
        assert!(!s.report_stale(), "reported");
        for _ in 0..20 {
            s.on_rtt(ms(1_000));
        }
        assert!(!s.report_stale(), "within 5 s of the last report");
        tokio::time::sleep(EARLY_REPORT_GAP).await;
        assert!(s.report_stale());

        // A LAN path: 1 ms to 15 ms is more than half again but not 20 ms more; 25 ms is
        // both, once over three samples.
        let mut lan = StatsTracker::new();
        let session = |lan: &mut StatsTracker| {
            lan.on_session_end();
            lan.on_attempt();
            lan.on_registered();
        };
        session(&mut lan);
        for _ in 0..3 {
            lan.on_rtt(ms(1));
        }
        lan.on_reported(&lan.snapshot());
        tokio::time::sleep(EARLY_REPORT_GAP).await;
        session(&mut lan);
        for _ in 0..3 {
            lan.on_rtt(ms(15));
        }
        assert!(!lan.report_stale(), "15 ms against 1 ms");
        session(&mut lan);
        for n in 1..=3 {
            lan.on_rtt(ms(25));
            assert_eq!(lan.report_stale(), n == 3, "after {n} samples of 25 ms");
        }
    }

    #[test]
    fn an_empty_tracker_reports_neutral_values() {
        let snap = StatsTracker::new().snapshot();
        assert_eq!(snap.success_rate, 1.0);
        assert_eq!(snap.rtt_avg_ms, 0.0);
    }
}
