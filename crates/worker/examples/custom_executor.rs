//! Embedding the worker with an executor of your own that checkpoints and resumes.
//!
//! The executor below "trains" for `epochs` epochs, writing a checkpoint after each; when a
//! task is resumed (on this worker or another, after a loss), it starts from the epoch in the
//! latest checkpoint instead of from zero.
//!
//! ```sh
//! cargo run --release -- coordinator &
//! cargo run -p tether-worker --example custom_executor -- ws://127.0.0.1:8765 trainer-1
//! curl -s localhost:8765/api/v1/tasks -d '{"kind":"train","config":{"epochs":20}}' -H 'content-type: application/json'
//! ```

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tether_proto::WorkerId;
use tether_worker::{Agent, ExecError, Executor, Executors, TaskCtx, TaskInput, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// A training loop with an epoch counter as its checkpoint.
struct Train;

impl Executor for Train {
    fn execute(
        &self,
        input: TaskInput,
        ctx: TaskCtx,
    ) -> BoxFuture<'static, Result<Value, ExecError>> {
        Box::pin(async move {
            let epochs = input.config["epochs"].as_u64().unwrap_or(10);
            // Resume from the latest checkpoint, if an earlier attempt left one.
            let start = ctx
                .latest_checkpoint()
                .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
                .and_then(|v| v["epoch"].as_u64())
                .unwrap_or(0);
            let mut loss = 1.0f64;
            for epoch in start..epochs {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = ctx.cancelled() => return Err(ExecError::Cancelled),
                }
                loss *= 0.9;
                ctx.report_state(json!({"epoch": epoch + 1, "loss": loss}))
                    .await?;
                // A paused task parks inside `checkpoint` until it is resumed.
                let data = json!({"epoch": epoch + 1, "loss": loss})
                    .to_string()
                    .into_bytes();
                ctx.checkpoint(data).await;
            }
            Ok(json!({"epochs": epochs, "resumed_from": start, "loss": loss}))
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let coordinator = args.next().unwrap_or_else(|| "ws://127.0.0.1:8765".into());
    let id = WorkerId::parse(&args.next().unwrap_or_else(|| "trainer-1".into()))?;
    let mut executors = Executors::builtin();
    executors.register("train", Train);
    let agent = Agent::new(WorkerConfig::new(coordinator, id), executors)?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    agent.run(shutdown).await?;
    Ok(())
}
