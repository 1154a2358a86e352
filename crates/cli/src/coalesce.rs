//! Idle coalescing (`tether coordinator --idle-coalesce`): a runtime thread that has run out of
//! work waits this long before it parks, so that the frames arriving meanwhile are taken in one
//! wake-up instead of each in its own. An idle fleet's heartbeats come one at a time, and each
//! wake-up (the `epoll_wait` return, the context switches, waking the runtime's other thread)
//! costs about as much as the frame itself; under load the threads do not park, so nothing is
//! delayed. The price is latency while the coordinator is nearly idle: a message that finds
//! every thread waiting is read up to this much later (docs/OPERATIONS.md, "Idle coalescing").

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The longest wait accepted: beyond it the latency of a lightly loaded coordinator grows for
/// no further saving (at 1,000 frames a second, 4 ms already gathers four a wake-up).
pub const MAX_IDLE_COALESCE: Duration = Duration::from_millis(20);

/// Microseconds to wait before parking; 0: park at once (the default).
static WAIT_US: AtomicU64 = AtomicU64::new(0);

/// Sets the wait of every runtime thread from now on.
pub fn set(wait: Duration) {
    WAIT_US.store(wait.as_micros() as u64, Ordering::Relaxed);
}

/// The runtime's `on_thread_park` hook.
pub fn before_park() {
    let us = WAIT_US.load(Ordering::Relaxed);
    if us > 0 {
        std::thread::sleep(Duration::from_micros(us));
    }
}

/// The wait a setting names, refused past [`MAX_IDLE_COALESCE`].
pub fn check(wait: Duration) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        wait <= MAX_IDLE_COALESCE,
        "idle coalescing of {} ms is more than the {} ms allowed: every message that finds the \
         coordinator idle would wait that long",
        wait.as_millis(),
        MAX_IDLE_COALESCE.as_millis()
    );
    Ok(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_past_the_limit_is_refused_with_the_limit_named() {
        assert_eq!(
            check(Duration::from_millis(4)).expect("4 ms"),
            Duration::from_millis(4)
        );
        let e = check(Duration::from_millis(21))
            .expect_err("21 ms")
            .to_string();
        assert!(e.contains("21 ms") && e.contains("20 ms"), "{e}");
    }

    #[test]
    fn a_thread_about_to_park_waits_as_set() {
        set(Duration::from_millis(3));
        let start = std::time::Instant::now();
        before_park();
        assert!(start.elapsed() >= Duration::from_millis(3));
        set(Duration::ZERO);
    }
}
