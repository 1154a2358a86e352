//! `command`: runs a program. (Being written.)

use futures_util::future::BoxFuture;

use super::{ExecError, Executor, TaskCtx, TaskInput};

/// The `command` executor.
#[derive(Debug, Default, Clone)]
pub struct CommandExecutor;

impl Executor for CommandExecutor {
    fn execute(
        &self,
        _input: TaskInput,
        _ctx: TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
        Box::pin(async { Err(ExecError::InvalidConfig("command executor not built yet".into())) })
    }
}
