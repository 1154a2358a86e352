//! A write bounded by a liveness deadline that moves on while the connection takes bytes:
//! what both ends of a session use, so that a long frame written into a slow link (a socket
//! buffer that a slow path drains, as on a real one) is no stalled link. While a session waits
//! in a write it reads nothing, not even the other end's heartbeats or pings; the bytes its
//! socket keeps taking are its sign that the link and the peer's TCP still live.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::error::Elapsed;
use tokio::time::{Instant, timeout_at};

/// Waits for `write` until `deadline`, and on while the connection takes bytes (`written`,
/// its count of bytes written): at each deadline that passes with bytes taken since the last,
/// the deadline moves `timeout` on; one that passes with none taken ends the wait. The
/// deadline moved is the caller's: a session that waited long in a write has its whole
/// timeout from the last byte to hear its peer, whose frames waited unread meanwhile.
pub async fn while_draining<T>(
    write: impl Future<Output = T>,
    deadline: &mut Instant,
    timeout: Duration,
    written: &AtomicU64,
) -> Result<T, Elapsed> {
    let mut write = std::pin::pin!(write);
    let mut seen = written.load(Ordering::Relaxed);
    loop {
        match timeout_at(*deadline, &mut write).await {
            Ok(done) => return Ok(done),
            Err(elapsed) => {
                let now = written.load(Ordering::Relaxed);
                if now == seen {
                    return Err(elapsed);
                }
                seen = now;
                *deadline = Instant::now() + timeout;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A write's progress: a byte taken a second, `n` times.
    async fn taking(n: u32, written: Arc<AtomicU64>) {
        for _ in 0..n {
            tokio::time::sleep(Duration::from_secs(1)).await;
            written.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_keeps_taking_bytes_outlasts_its_deadline_and_moves_it() {
        let written = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let timeout = Duration::from_secs(2);
        let mut deadline = start + timeout;
        // Takes a byte every second for five seconds: never a whole timeout without one.
        let write = async {
            taking(5, written.clone()).await;
            "done"
        };
        let r = while_draining(write, &mut deadline, timeout, &written).await;
        assert_eq!(r.ok(), Some("done"));
        assert!(deadline > start + timeout, "the deadline moved on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_takes_no_byte_for_a_timeout_has_stalled() {
        let written = AtomicU64::new(0);
        let start = Instant::now();
        let timeout = Duration::from_secs(2);
        let mut deadline = start + timeout;
        let r = while_draining(
            std::future::pending::<()>(),
            &mut deadline,
            timeout,
            &written,
        )
        .await;
        assert!(r.is_err());
        assert_eq!(
            Instant::now(),
            start + timeout,
            "given up at the first deadline"
        );
        assert_eq!(deadline, start + timeout, "the deadline did not move");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_stops_taking_bytes_stalls_a_timeout_after_its_last() {
        let written = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let timeout = Duration::from_secs(2);
        let mut deadline = start + timeout;
        // Three bytes, a second apart, then nothing.
        let write = async {
            taking(3, written.clone()).await;
            std::future::pending::<()>().await
        };
        let r = while_draining(write, &mut deadline, timeout, &written).await;
        assert!(r.is_err());
        // Looked at 2 s (moved), 4 s (moved: the byte at 3 s), given up at 6 s.
        assert_eq!(Instant::now(), start + Duration::from_secs(6));
    }
}
