//! A gate for a warning that a fault can make many times at once: the first goes through, then
//! at most one an interval, saying how many it stood for.
//!
//! An upstream that is down refuses every link a fleet makes to the proxy: 10,000 workers
//! reconnecting in one jitter window made 10,000 identical warnings, which said nothing the
//! first did not (each is still counted in the proxy's `upstream_failures`).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How often a gated warning may be logged.
pub const WARN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct LogGate {
    every: Duration,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    last: Option<Instant>,
    held: u64,
}

impl LogGate {
    pub(crate) fn new(every: Duration) -> Self {
        LogGate {
            every,
            state: Mutex::default(),
        }
    }

    /// Whether a warning at `now` may be logged: `Some(n)` with the `n` held back since the last
    /// one that was, or `None` (this one is held back and counted).
    pub(crate) fn pass(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match s.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                s.held += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_warning_passes_then_one_an_interval_with_the_count_held_back() {
        let gate = LogGate::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(gate.pass(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(gate.pass(t0 + Duration::from_millis(100 * i)), None);
        }
        assert_eq!(gate.pass(t0 + Duration::from_millis(999)), None);
        assert_eq!(gate.pass(t0 + Duration::from_secs(1)), Some(6));
        // The interval runs from the warning that passed, and the count starts again.
        assert_eq!(gate.pass(t0 + Duration::from_millis(1500)), None);
        assert_eq!(gate.pass(t0 + Duration::from_secs(5)), Some(1));
        assert_eq!(gate.pass(t0 + Duration::from_secs(7)), Some(0));
    }
}
