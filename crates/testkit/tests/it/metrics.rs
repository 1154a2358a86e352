//! `/metrics` scraped over HTTP after a real run. The recorder is process-wide and other tests
//! run beside this one, so counters and histograms are compared before and after (they can
//! only have moved more), and gauges of the model are this coordinator's own.

use tether_coordinator::metrics as m;
use tether_testkit::*;
use tether_worker::ConnState;
use tether_worker::metrics as wm;

use crate::support::{connected_worker, coordinator};

/// A counter or a histogram's `_count`, 0 when absent.
fn v(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(text, name, labels).unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_families_are_served_and_move_with_a_run_with_a_reconnection() {
    let (_dir, c) = coordinator().await;
    let url = format!("http://{}/metrics", c.addr);
    let before = scrape(&url).await;
    // The counters alerts watch with `increase()` are there from the start, so that their
    // first rise is an increase (a series born at 3 is none).
    for name in [
        m::WORKERS_LOST,
        m::ID_CONFLICTS,
        m::CHECKPOINTS_TOO_LARGE,
        m::RECONNECTIONS,
    ] {
        assert!(
            metric_value(&before, name, &[]).is_some(),
            "{name} missing:\n{before}"
        );
    }
    let relay = Relay::start(c.addr).await;
    let w = connected_worker(&relay.url(), "metrics-w1").await;
    let client = c.client();
    let ids = client.submit(&[sleep_task(30, 4, 2)]).await;
    client.wait_status(&ids[0], "completed").await;
    // An assignment over the compression threshold goes as a zstd binary frame.
    let big = client
        .submit(&[tether_proto::TaskSpec::new(
            "command",
            serde_json::json!({"program": "true", "args": ["compressible ".repeat(400)]}),
        )])
        .await;
    client.wait_status(&big[0], "completed").await;
    // A reconnection: cut the link, let the worker notice, restore it.
    relay.cut();
    w.wait_state(|s| s != ConnState::Connected).await;
    relay.restore();
    w.wait_state(|s| s == ConnState::Connected).await;
    // Telemetry carries the worker's RTT; wait until the coordinator has recorded some.
    let after = wait_for("telemetry with a heartbeat RTT", DEADLINE, || async {
        let t = scrape(&url).await;
        (v(&t, &format!("{}_count", m::HEARTBEAT_RTT), &[])
            > v(&before, &format!("{}_count", m::HEARTBEAT_RTT), &[]))
        .then_some(t)
    })
    .await;

    let grew = |name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (v(&before, name, labels), v(&after, name, labels));
        assert!(a > b, "{name}{labels:?} moved: before {b}, after {a}");
    };
    let count = |name: &str| format!("{name}_count");
    grew(m::CONNECTIONS, &[]);
    // The data directory's free space, looked at from the start.
    assert!(v(&after, m::DATA_DIR_AVAILABLE, &[]) > 0.0, "{after}");
    grew(m::RECONNECTIONS, &[]);
    grew(&count(m::RECONNECT_DURATION), &[]);
    grew(m::SESSIONS_ENDED, &[]);
    grew(m::MESSAGES_IN, &[("type", "registration")]);
    grew(m::MESSAGES_IN, &[("type", "task_result")]);
    grew(m::MESSAGES_IN, &[("type", "checkpoint_data")]);
    grew(m::MESSAGES_OUT, &[("type", "task_assignment")]);
    grew(m::MESSAGES_OUT, &[("type", "task_result_ack")]);
    grew(m::RESULTS, &[("disposition", "recorded")]);
    grew(m::TASKS_FINISHED, &[("status", "completed")]);
    grew(m::ASSIGNMENTS, &[]);
    grew(&count(m::DISPATCH_LATENCY), &[]);
    grew(&count(m::TASK_DURATION), &[("outcome", "completed")]);
    grew(m::CHECKPOINT_BYTES, &[]);
    grew(&count(m::CHECKPOINT_SIZE), &[]);
    grew(&count(m::STORE_COMMIT), &[]);
    grew(m::STORE_COMMITS, &[]);
    grew(m::STORE_MUTATIONS, &[]);
    // The state journal's gauges (any coordinator's in this process: at least a file header).
    assert!(
        metric_value(&after, m::STORE_JOURNAL_BYTES, &[]).is_some_and(|b| b >= 8.0),
        "journal bytes served"
    );
    assert!(
        metric_value(&after, m::STORE_UNFOLDED_STATES, &[]).is_some(),
        "unfolded states served"
    );
    // Histograms have buckets (not summaries).
    assert!(
        after.contains(&format!("{}_bucket{{le=\"0.005\"}}", m::STORE_COMMIT)),
        "store commit latency has buckets"
    );
    // The model's gauges are this coordinator's.
    assert_eq!(
        metric_value(&after, m::TASKS, &[("state", "completed")]),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&after, m::TASKS, &[("state", "queued")]),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&after, m::WORKERS, &[("state", "connected")]),
        Some(1.0)
    );
    assert_eq!(metric_value(&after, m::QUEUE_DEPTH, &[]), Some(0.0));
    // The core's counters, as the overview has them.
    let o = client.overview().await;
    for name in ["registrations", "reconnections", "results_recorded"] {
        let n = o["counters"][name].as_u64().expect("a counter");
        assert!(n >= 1, "{name}: {o}");
        let scraped = metric_value(&after, m::CORE_COUNTERS, &[("name", name)]);
        assert!(
            scraped.is_some_and(|v| v >= 1.0 && v <= n as f64),
            "{name}: scraped {scraped:?}, overview {n}"
        );
    }
    grew(m::COMPRESSION_RAW_BYTES, &[]);
    grew(m::COMPRESSION_WIRE_BYTES, &[]);
    let ratio = metric_value(&after, m::COMPRESSION_RATIO, &[]).unwrap_or(0.0);
    assert!(ratio > 1.0, "repetitive JSON compresses: ratio {ratio}");
    // The worker in this process records into the same recorder, shared with every test of
    // this binary: each family must have moved while this test ran, not merely be above 0.
    // The worker sets its compression totals when its `/metrics` is rendered.
    wm::render(&w.handle);
    let worker = scrape(&url).await;
    let worker_grew = |name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (v(&before, name, labels), v(&worker, name, labels));
        assert!(a > b, "{name}{labels:?} moved: before {b}, after {a}");
    };
    worker_grew(wm::COMPRESSION_RAW_BYTES, &[]);
    worker_grew(wm::COMPRESSION_WIRE_BYTES, &[]);
    worker_grew(&count(wm::HEARTBEAT_RTT), &[]);
    worker_grew(&count(wm::RECONNECT_DURATION), &[]);
    worker_grew(wm::SESSIONS_LOST, &[]);
    worker_grew(wm::MESSAGES_OUT, &[("type", "heartbeat")]);
    worker_grew(wm::TASKS_FINISHED, &[("outcome", "completed")]);
    // Every family of the coordinator has its help text.
    for line in after.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|l| l.split(' ').next())
            .filter(|n| !n.starts_with("tether_worker_"))
        {
            assert!(
                after.contains(&format!("# HELP {name} ")),
                "{name} has help"
            );
        }
    }
    // No label carries an id.
    for line in after.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("metrics-w1") && !line.contains(ids[0].as_str()),
            "an id in a label: {line}"
        );
    }
    w.stop().await.expect("stop");
    c.stop().await;
}
