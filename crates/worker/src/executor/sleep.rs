//! `sleep`: a task that waits, in steps, for tests and load. It reports progress every step,
//! checkpoints every `checkpoint_every` steps, resumes from its latest checkpoint, honours
//! pause at every step and cancellation at once, and can fail on purpose.
//!
//! Config: `{"ms": 1000, "steps": 10, "checkpoint_every": 0, "fail": false}`; all optional.

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::{ExecError, Executor, TaskCtx, TaskInput};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    ms: u64,
    #[serde(default = "default_steps")]
    steps: u32,
    #[serde(default)]
    checkpoint_every: u32,
    #[serde(default)]
    fail: bool,
    /// Report progress state every step (default true).
    #[serde(default = "default_true")]
    report: bool,
}

fn default_steps() -> u32 {
    10
}

fn default_true() -> bool {
    true
}

/// The `sleep` executor.
#[derive(Debug, Default, Clone, Copy)]
pub struct SleepExecutor;

impl Executor for SleepExecutor {
    fn execute(
        &self,
        input: TaskInput,
        ctx: TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
        Box::pin(run(input, ctx))
    }

    fn check_config(&self, config: &str) -> Result<(), String> {
        // `null` (no config) is every default.
        serde_json::from_str::<Option<Config>>(config)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

async fn run(input: TaskInput, ctx: TaskCtx) -> Result<serde_json::Value, ExecError> {
    let cfg: Config = if input.config.is_null() {
        serde_json::from_value(serde_json::json!({}))
    } else {
        serde_json::from_value(input.config)
    }
    .map_err(|e| ExecError::InvalidConfig(e.to_string()))?;
    let steps = cfg.steps.max(1);
    let step = Duration::from_millis(cfg.ms / u64::from(steps));
    let resumed_at = ctx
        .latest_checkpoint()
        .and_then(|d| std::str::from_utf8(&d).ok()?.trim().parse::<u32>().ok())
        .unwrap_or(0)
        .min(steps);
    for i in resumed_at..steps {
        ctx.pause_point().await;
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = ctx.cancelled() => return Err(ExecError::Cancelled),
        }
        let done = i + 1;
        if cfg.report {
            ctx.report_state(serde_json::json!({
                "progress": f64::from(done) * 100.0 / f64::from(steps),
                "current_iteration": done,
            }))
            .await?;
        }
        let due = cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0 && done < steps;
        if due || (ctx.checkpoint_requested() && done < steps) {
            ctx.checkpoint(done.to_string().into_bytes()).await;
        }
    }
    let result = serde_json::json!({
        "steps": steps,
        "resumed_at": resumed_at,
        "attempt": ctx.attempt().0,
    });
    if cfg.fail {
        return Err(ExecError::Failed {
            message: "failed on purpose".into(),
            result,
        });
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::{Attempt, TaskId};

    fn input(config: serde_json::Value) -> TaskInput {
        TaskInput {
            task_id: TaskId::parse("t").expect("id"),
            attempt: Attempt(1),
            config,
            timeout: None,
        }
    }

    #[test]
    fn the_check_takes_what_a_run_takes_and_refuses_what_it_refuses() {
        let check = |text: &str| SleepExecutor.check_config(text);
        for ok in [
            "null",
            "{}",
            r#"{"ms": 5, "steps": 2, "checkpoint_every": 1, "fail": true}"#,
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            (r#"{"ms": "abc"}"#, "invalid type: string"),
            (r#"{"ms": -1}"#, "invalid value"),
            (r#"{"colour": 1}"#, "unknown field `colour`"),
            ("\"fast\"", "invalid type: string"),
        ] {
            let m = check(bad).expect_err(bad);
            assert!(m.contains(says), "{bad}: {m}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_resumes_from_its_latest_checkpoint() {
        let (ctx, _) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(2));
        let ctx = ctx.with_checkpoint(b"6".to_vec());
        let out = SleepExecutor
            .execute(input(serde_json::json!({"ms": 100, "steps": 10})), ctx)
            .await
            .expect("completed");
        assert_eq!(out["resumed_at"], 6);
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_checkpoints_on_schedule_and_stops_on_cancel() {
        let (ctx, control) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        let run = tokio::spawn(SleepExecutor.execute(
            input(serde_json::json!({"ms": 10_000, "steps": 10, "checkpoint_every": 2})),
            ctx,
        ));
        tokio::time::sleep(Duration::from_millis(4_500)).await;
        assert_eq!(
            control.latest_checkpoint().as_deref().map(Vec::as_slice),
            Some(&b"4"[..])
        );
        control.cancel();
        assert_eq!(run.await.expect("joined"), Err(ExecError::Cancelled));
    }

    #[tokio::test]
    async fn bad_config_is_reported() {
        let (ctx, _) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        let r = SleepExecutor
            .execute(input(serde_json::json!({"ms": "soon"})), ctx)
            .await;
        assert!(matches!(r, Err(ExecError::InvalidConfig(_))));
    }
}
