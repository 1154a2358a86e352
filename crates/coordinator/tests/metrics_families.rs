//! A fresh coordinator's `/metrics`: every family the coordinator's table in
//! docs/OPERATIONS.md names is exported before anything happened, with the type the table
//! gives, so that a rule over a counter (`rate(tether_mac_failures_total[5m])`) reads 0, not
//! nothing, until its first event. The table is read from the document, so a family added to
//! it and not exported fails here.
//!
//! The recorder is process-wide, so this binary holds nothing else that records a family
//! before the first scrape: its other tests make no worker session (one only submits), and
//! its gauges are set from its own coordinator at each scrape.

use std::time::Duration;

mod support;
use support::{STEP, request, scraped, start, stop};

/// The (name, type) of every family in the coordinator's metrics table of OPERATIONS.md.
fn documented_families() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/OPERATIONS.md");
    let doc = std::fs::read_to_string(path).expect("read docs/OPERATIONS.md");
    let section = doc
        .split_once("### Coordinator (`/metrics` on the coordinator)")
        .expect("the coordinator's metrics section")
        .1;
    let mut families = Vec::new();
    for row in section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter(|l| l.starts_with("| `"))
    {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // "", metric(s), type, labels, meaning, "".
        let (names, kind) = (cells[1], cells[2]);
        for name in names.split('`').skip(1).step_by(2) {
            families.push((name.to_owned(), kind.to_owned()));
        }
    }
    families
}

#[tokio::test]
async fn a_fresh_coordinator_exports_every_documented_family() {
    let families = documented_families();
    // The table as it stood when this test was written had 44 names; a parse that finds far
    // fewer read the wrong lines.
    assert!(families.len() >= 40, "parsed {families:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, shutdown, join) =
        start(tether_coordinator::CoordinatorConfig::new(dir.path())).await;

    let text = scraped(addr).await;
    let missing: Vec<String> = families
        .iter()
        .filter(|(name, kind)| {
            let typed = text.contains(&format!("# TYPE {name} {kind}\n"));
            // A sample of it: `name 0`, `name{...} 0`, or a histogram's `name_count 0`.
            let sampled = text.lines().any(|l| {
                l.strip_prefix(name.as_str()).is_some_and(|rest| {
                    rest.starts_with(' ') || rest.starts_with('{') || rest.starts_with("_count")
                })
            });
            !(typed && sampled)
        })
        .map(|(name, kind)| format!("{name} ({kind})"))
        .collect();
    assert!(
        missing.is_empty(),
        "documented and not exported by a fresh coordinator: {missing:?}\n{text}"
    );

    stop(shutdown, join).await;
}

/// The labels cell of `family`'s row in the coordinator's metrics table of OPERATIONS.md.
fn documented_labels(family: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/OPERATIONS.md");
    let doc = std::fs::read_to_string(path).expect("read docs/OPERATIONS.md");
    let row = doc
        .lines()
        .find(|l| l.starts_with(&format!("| `{family}` |")))
        .unwrap_or_else(|| panic!("a row of {family} in OPERATIONS.md"));
    // "", metric(s), type, labels, meaning, "".
    row.split('|').nth(3).expect("a labels cell").to_owned()
}

/// Every way a worker's session ends ([`SessionEnd`], which the session's loop ends with) is
/// a `reason` of `tether_sessions_ended_total` at 0 before any session, and the table of
/// OPERATIONS.md names it: an end added and not registered, or not documented, fails here.
#[tokio::test]
async fn every_way_a_session_ends_is_a_reason_at_0_from_the_start_and_documented() {
    use tether_coordinator::metrics::{SESSIONS_ENDED, SessionEnd};
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, shutdown, join) =
        start(tether_coordinator::CoordinatorConfig::new(dir.path())).await;
    let text = scraped(addr).await;
    let documented = documented_labels(SESSIONS_ENDED);
    for end in SessionEnd::ALL {
        let sample = format!("{SESSIONS_ENDED}{{reason=\"{}\"}} 0\n", end.as_str());
        assert!(text.contains(&sample), "{sample:?} not in\n{text}");
        let mut words = documented.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
        assert!(
            words.any(|w| w == end.as_str()),
            "{end:?} ({}) is not among the reasons OPERATIONS.md lists: {documented}",
            end.as_str()
        );
    }
    // And no reason is exported that is not one of them.
    let exported = text
        .lines()
        .filter(|l| l.starts_with(&format!("{SESSIONS_ENDED}{{")))
        .count();
    assert_eq!(exported, SessionEnd::ALL.len(), "{text}");
    stop(shutdown, join).await;
}

/// The queue's depth by priority, `priority` "0" to "9", from a scrape.
fn depths(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tether_queue_depth{priority=\""))
        .filter_map(|rest| {
            let (p, v) = rest.split_once("\"} ")?;
            Some((p.to_owned(), v.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn the_queue_depth_is_exported_by_priority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, shutdown, join) =
        start(tether_coordinator::CoordinatorConfig::new(dir.path())).await;
    // No worker: they all wait.
    let tasks = r#"{"tasks": [
        {"kind": "sleep", "priority": 1},
        {"kind": "sleep", "priority": 1},
        {"kind": "sleep", "priority": 7}
    ]}"#;
    let (status, body) = tokio::time::timeout(STEP, request(addr, "POST", "/api/v1/tasks", tasks))
        .await
        .expect("submitted in time");
    assert_eq!(status, 201, "{body}");
    let want: Vec<(String, f64)> = (0..10)
        .map(|p| {
            let n = match p {
                1 => 2.0,
                7 => 1.0,
                _ => 0.0,
            };
            (p.to_string(), n)
        })
        .collect();
    // Queued by the core as the submission is answered; looked at until then, boundedly.
    let mut seen = Vec::new();
    for _ in 0..500 {
        let text = scraped(addr).await;
        seen = depths(&text);
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, want, "tether_queue_depth by priority");
    stop(shutdown, join).await;
}
