//! How fast the machine was when a run began and ended. This machine's speed drifts (the same
//! build handled 172,000 and 200,000 messages a second an hour apart, with no load of its own
//! visible): a report carries a fixed probe of single-thread speed and the load average, so
//! that runs are compared knowing the phase they ran in.

use std::time::Instant;

use serde::Serialize;
use tether_proto::msg::{StateJson, TaskState, WorkerMsg};
use tether_proto::{Attempt, Seq, TaskId};

/// Round trips in one timed batch, and the batches whose median is reported.
const PER_BATCH: u32 = 2_000;
const BATCHES: usize = 5;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Probe {
    /// Microseconds to encode a state update and decode it again (the median of several
    /// batches, on one thread).
    pub codec_us: f64,
    /// The 1-minute load average, from `/proc/loadavg` (`None` where there is none).
    pub load_1m: Option<f64>,
}

/// Times a fixed piece of work: a `task_state` like the flood's, encoded and decoded.
pub fn probe() -> Probe {
    let msg = WorkerMsg::TaskState(TaskState {
        seq: Seq(1),
        task_id: TaskId::fresh(),
        attempt: Attempt(1),
        // INVARIANT: a literal JSON object.
        state: StateJson::from_text(format!(r#"{{"n":1,"pad":"{}"}}"#, "x".repeat(64)))
            .unwrap_or_else(|_| StateJson::from(serde_json::Value::Null)),
        timestamp: tether_proto::msg::now(),
    });
    let mut batches: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..PER_BATCH {
                let text = tether_proto::codec::encode(std::hint::black_box(&msg));
                let _ = std::hint::black_box(tether_proto::codec::decode_worker(&text));
            }
            t.elapsed().as_secs_f64() * 1e6 / f64::from(PER_BATCH)
        })
        .collect();
    batches.sort_by(f64::total_cmp);
    Probe {
        codec_us: batches[BATCHES / 2],
        load_1m: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_times_real_work() {
        let p = probe();
        assert!(p.codec_us > 0.0 && p.codec_us.is_finite(), "{p:?}");
    }
}
