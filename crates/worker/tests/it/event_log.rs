//! The worker's event log as an agent writes it.

use std::time::Duration;

use tether_proto::WorkerId;
use tether_worker::WorkerConfig;
use tether_worker::config::MIN_EVENT_LOG_MAX_BYTES;
use tether_worker::eventlog::{self, Event, EventLog};

use crate::fake::{FakeConnector, Running, Script};

/// An agent bounds its event log at `event_log_max_bytes`: a worker whose every connection is
/// refused writes a record an attempt, and once they would take the file past the bound it
/// goes on in a new one, the older file beside it, the numbers running on from one to the
/// other.
#[tokio::test(start_paused = true)]
async fn an_agent_rotates_its_event_log_at_the_configured_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.jsonl");
    let older = EventLog::rotated_path(&path);
    let fake = FakeConnector::new(Script::Refuse);
    let mut cfg = WorkerConfig::new(
        "ws://coordinator.invalid:1",
        WorkerId::parse("w").expect("id"),
    );
    cfg.event_log = Some(path.clone());
    cfg.event_log_max_bytes = MIN_EVENT_LOG_MAX_BYTES;
    cfg.backoff.initial = tether_worker::backoff::MIN_INITIAL;
    cfg.backoff.max = tether_worker::backoff::MIN_INITIAL;
    let running = Running::start(&fake, cfg);
    // A record is under 200 bytes: the bound is crossed within a few hundred attempts, some
    // seconds of virtual time.
    let end = tokio::time::Instant::now() + Duration::from_secs(600);
    while !older.exists() {
        assert!(
            tokio::time::Instant::now() < end,
            "not rotated after {} attempts",
            fake.attempts().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    let whole = |p: &std::path::Path| {
        let read = eventlog::read(p).expect("read");
        assert!(read.damaged.is_empty() && !read.torn, "{read:?}");
        read.records
    };
    let (old, new) = (whole(&older), whole(&path));
    let old_len = std::fs::metadata(&older).expect("older").len();
    assert!(old_len <= MIN_EVENT_LOG_MAX_BYTES, "{old_len}");
    assert!(
        matches!(old[0].event, Event::Started { .. }),
        "{:?}",
        old[0]
    );
    assert!(
        matches!(&new[0].event, Event::Rotated { bytes, .. } if *bytes == old_len),
        "{:?}",
        new[0]
    );
    let n: Vec<u64> = old
        .iter()
        .chain(&new)
        .map(|r| r.n.expect("numbered"))
        .collect();
    assert_eq!(n, (1..=n.len() as u64).collect::<Vec<_>>());
    assert!(matches!(
        new.last().expect("a record").event,
        Event::Stopped {
            write_failures: 0,
            rotation_failures: 0
        }
    ));
}
