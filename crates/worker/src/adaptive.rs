//! Adaptive connection parameters, within configured bounds: the heartbeat timeout follows the
//! measured RTT (a slow but live link is not declared dead), and the backoff factor grows on a
//! link that keeps connecting but does not stay up. The timeout is re-evaluated at every
//! heartbeat reply and the backoff after every lost session, from the first sample on (the
//! original waited 5 minutes and adapted only on failures).

use std::time::Duration;

/// Adaptation bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    pub enabled: bool,
    /// The heartbeat timeout never exceeds this.
    pub max_heartbeat_timeout: Duration,
    /// The timeout is at least `heartbeat interval + rtt_multiplier * p95 RTT`.
    pub rtt_multiplier: f64,
    /// Largest multiplier applied to the backoff factor.
    pub max_backoff_boost: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_heartbeat_timeout: Duration::from_secs(60),
            rtt_multiplier: 4.0,
            max_backoff_boost: 2.0,
        }
    }
}

/// The heartbeat timeout to use given the configured one and the recent p95 RTT.
pub fn heartbeat_timeout(
    cfg: &AdaptiveConfig,
    configured: Duration,
    interval: Duration,
    rtt_p95: Option<Duration>,
) -> Duration {
    if !cfg.enabled {
        return configured;
    }
    let Some(rtt) = rtt_p95 else {
        return configured;
    };
    let wanted = interval + rtt.mul_f64(cfg.rtt_multiplier);
    wanted
        .max(configured)
        .min(cfg.max_heartbeat_timeout.max(configured))
}

/// The backoff boost for a link that keeps connecting but does not stay up: `stability` is the
/// share of time connected, `sessions` the number of registered sessions so far. A coordinator
/// that is simply down (no session at all) gets the plain backoff, so recovery is not delayed.
pub fn backoff_boost(cfg: &AdaptiveConfig, stability: f64, sessions: u64) -> f64 {
    if !cfg.enabled || sessions < 3 {
        return 1.0;
    }
    let boost = if stability < 0.25 {
        cfg.max_backoff_boost
    } else if stability < 0.5 {
        1.0 + (cfg.max_backoff_boost - 1.0) / 2.0
    } else {
        1.0
    };
    boost.clamp(1.0, cfg.max_backoff_boost.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_slow_but_live_link_gets_a_longer_timeout_within_bounds() {
        let cfg = AdaptiveConfig::default();
        assert_eq!(heartbeat_timeout(&cfg, S(15), S(5), None), S(15));
        assert_eq!(
            heartbeat_timeout(&cfg, S(15), S(5), Some(Duration::from_millis(20))),
            S(15),
            "a fast link keeps the configured timeout"
        );
        assert_eq!(heartbeat_timeout(&cfg, S(15), S(5), Some(S(5))), S(25));
        assert_eq!(
            heartbeat_timeout(&cfg, S(15), S(5), Some(S(100))),
            S(60),
            "bounded"
        );
        let off = AdaptiveConfig {
            enabled: false,
            ..cfg
        };
        assert_eq!(heartbeat_timeout(&off, S(15), S(5), Some(S(5))), S(15));
    }

    #[test]
    fn backoff_grows_faster_on_a_flapping_link() {
        let cfg = AdaptiveConfig::default();
        assert_eq!(backoff_boost(&cfg, 1.0, 10), 1.0);
        assert_eq!(backoff_boost(&cfg, 0.1, 2), 1.0, "not enough evidence yet");
        assert_eq!(backoff_boost(&cfg, 0.4, 10), 1.5);
        assert_eq!(backoff_boost(&cfg, 0.1, 10), 2.0);
    }
}
