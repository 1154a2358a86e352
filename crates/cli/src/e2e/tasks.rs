//! The task mix: waves of short sleeps, long sleeps that checkpoint, commands that checkpoint
//! through `$TETHER_CHECKPOINT_DIR` and resume from it, tasks that fail on purpose, and a
//! flaky one that fails its first attempt and is run again on a failure (`retry_on`). One
//! wave goes in at the start and one after each disruption, so work is in flight through all
//! of them.

use rand::Rng;
use rand::rngs::SmallRng;
use serde_json::json;
use tether_proto::{RetryOn, TaskId, TaskSpec};

use super::verdict::{Body, Expect};

/// Attempts allowed to tasks that must complete: a task may be lost with a killed worker or
/// a killed coordinator several times in a run; running out of attempts is not what the run
/// tests.
pub const MAX_ATTEMPTS: u32 = 10;

/// A command that counts to 12 in steps of 300 ms (long enough to be running at the next
/// disruption, often: a `worker_kill` hits it mid-way), keeping its count in the checkpoint
/// directory, so an attempt that resumes starts where the last shipped checkpoint was. The
/// directory also holds 300 KB of noise (twice), written once and compared on every resume:
/// its checkpoints are larger than an assignment carries, so an attempt that resumes from the
/// coordinator's checkpoint fetches it in pieces, through whatever the run does to the network,
/// and one that got a damaged checkpoint fails (`cmp`), which the verdict counts.
const COUNTER: &str = r#"d="$TETHER_CHECKPOINT_DIR"; i=$(cat "$d/count" 2>/dev/null || echo 0); start=$i
if [ -f "$d/noise" ]; then cmp -s "$d/noise" "$d/noise.copy" || { echo "damaged checkpoint" >&2; exit 9; }
else head -c 300000 /dev/urandom > "$d/noise.tmp" && cp "$d/noise.tmp" "$d/noise.copy" && mv "$d/noise.tmp" "$d/noise"; fi
while [ "$i" -lt 12 ]; do i=$((i+1)); echo "$i" > "$d/count.tmp" && mv "$d/count.tmp" "$d/count"; sleep 0.3; done
echo "counted from $start to $i""#;

/// A flaky test: fails its first attempt, passes on any later one (`$TETHER_ATTEMPT`).
const FLAKY: &str = r#"if [ "$TETHER_ATTEMPT" -lt 2 ]; then echo "attempt $TETHER_ATTEMPT fails on purpose" >&2; exit 4; fi
echo "flaky passed on attempt $TETHER_ATTEMPT""#;

/// What [`COUNTER`] counts to, and how long each step takes.
pub const COUNTER_TO: u32 = 12;
pub const COUNTER_STEP: std::time::Duration = std::time::Duration::from_millis(300);

/// How long a counter that has counted to `count` runs on, at least.
pub fn counter_left(count: u32) -> std::time::Duration {
    COUNTER_STEP * COUNTER_TO.saturating_sub(count)
}

/// What the counted result of `spec` must say when it completes.
pub fn expected_body(spec: &TaskSpec) -> Body {
    let config = spec.config.to_value().unwrap_or_default();
    match spec.kind.as_str() {
        "sleep" => config["steps"].as_u64().map_or(Body::Any, Body::Steps),
        "command" if config["shell"] == COUNTER => Body::StdoutEnds("to 12"),
        "command" if config["shell"] == FLAKY => Body::StdoutContains("flaky passed on attempt"),
        _ => Body::Any,
    }
}

/// One wave of tasks, named `e2e-{wave}-{n}-{kind}`, each with its name for its id: a wave
/// sent again after a lost answer (the coordinator killed between its commit and its reply)
/// is answered with the tasks it made, not made twice.
pub fn wave(wave: usize, rng: &mut SmallRng) -> anyhow::Result<Vec<(TaskSpec, Expect)>> {
    let mut out = Vec::new();
    let mut add = |kind: &str, config: serde_json::Value, expect: Expect, what: &str| {
        let mut s = TaskSpec::new(kind, config);
        s.name = Some(format!("e2e-{wave}-{}-{what}", out.len()));
        s.max_attempts = Some(MAX_ATTEMPTS);
        if expect == Expect::Flaky {
            s.retry_on = vec![RetryOn::Failed];
        }
        out.push((s, expect));
    };
    for _ in 0..2 {
        let ms = rng.random_range(200..=1_000);
        add(
            "sleep",
            json!({"ms": ms, "steps": 4}),
            Expect::Complete,
            "short",
        );
    }
    let ms = rng.random_range(3_000..=6_000);
    add(
        "sleep",
        json!({"ms": ms, "steps": 15, "checkpoint_every": 3}),
        Expect::Complete,
        "long",
    );
    add(
        "command",
        json!({"shell": COUNTER, "checkpoint_poll_ms": 200}),
        Expect::Complete,
        "counter",
    );
    add("command", json!({"shell": FLAKY}), Expect::Flaky, "flaky");
    if wave.is_multiple_of(2) {
        add(
            "sleep",
            json!({"ms": 300, "steps": 3, "fail": true}),
            Expect::Fail,
            "fail",
        );
    } else {
        add(
            "command",
            json!({"shell": "echo failing on purpose >&2; exit 3"}),
            Expect::Fail,
            "fail",
        );
    }
    for (s, _) in &mut out {
        s.task_id = Some(TaskId::parse(s.name.as_deref().unwrap_or_default())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The counter's script counts as [`counter_left`] says.
    #[test]
    fn the_counter_counts_to_its_constants() {
        assert!(
            COUNTER.contains(&format!("-lt {COUNTER_TO} ]")),
            "{COUNTER}"
        );
        let step = format!("sleep {}", COUNTER_STEP.as_secs_f64());
        assert!(COUNTER.contains(&step), "{step} in {COUNTER}");
        assert_eq!(counter_left(9), std::time::Duration::from_millis(900));
    }

    #[test]
    fn a_wave_mixes_every_kind_of_task_and_valid_specs() {
        let mut rng = SmallRng::seed_from_u64(1);
        for w in 0..2 {
            let v = wave(w, &mut rng).expect("a wave");
            assert!(
                v.iter()
                    .all(|(s, _)| s.task_id.as_ref().map(TaskId::as_str) == s.name.as_deref()),
                "each named by its id: {v:?}"
            );
            assert!(v.iter().all(|(s, _)| s.validate().is_ok()));
            assert_eq!(v.iter().filter(|(_, e)| *e == Expect::Fail).count(), 1);
            let flaky: Vec<&TaskSpec> = v
                .iter()
                .filter(|(_, e)| *e == Expect::Flaky)
                .map(|(s, _)| s)
                .collect();
            assert!(
                matches!(flaky.as_slice(), [s] if s.retry_on == [RetryOn::Failed]),
                "{flaky:?}"
            );
            assert_eq!(
                expected_body(flaky[0]),
                Body::StdoutContains("flaky passed on attempt")
            );
            assert!(v.iter().any(|(s, _)| s.kind == "command"));
            assert!(v.iter().any(|(s, _)| {
                s.config.to_value().expect("json")["checkpoint_every"].as_u64() == Some(3)
            }));
            let bodies: Vec<Body> = v.iter().map(|(s, _)| expected_body(s)).collect();
            assert!(bodies.contains(&Body::StdoutEnds("to 12")), "{bodies:?}");
            assert!(bodies.contains(&Body::Steps(15)), "{bodies:?}");
        }
    }
}
