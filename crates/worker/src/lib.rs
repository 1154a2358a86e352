//! The tether worker agent, usable as a library by programs with their own executors.
//!
//! - [`agent`]: [`Agent`] owns the connection task and its state machine; [`AgentHandle`]
//!   observes it.
//! - [`session`]: one WebSocket session: registration and reconciliation, outbox replay,
//!   heartbeats, liveness.
//! - [`connector`]: how a session's WebSocket is opened (TCP, or in-memory pipes in tests).
//! - `dial`: connection attempts; on a path that went silent, one left unanswered for a
//!   backoff delay gets a newer one beside it.
//! - [`backoff`], [`adaptive`]: reconnect delays and adaptive parameters.
//! - [`link`]: the link's delivery rate, measured from acknowledgements, and the send window
//!   and checkpoint pieces it sizes.
//! - [`stats`]: connection statistics.
//! - [`metrics`]: Prometheus metric names and the optional `/metrics` endpoint.
//! - [`outbox`]: what must be delivered, bounded, ordered and coalesced.
//! - [`runner`]: runs assignments on their own tasks; cancel, pause, resume. A resumed task's
//!   checkpoint too large for its assignment is fetched first (`fetch`).
//! - [`executor`]: the [`Executor`] trait, the task context and the built-in executors.
//! - [`reaper`]: the worker as a child subreaper (Linux): reaps the orphans of its tasks.
//! - [`statedir`]: the `--state-dir`: lock, identity, outbox journal, running set, checkpoints.
//! - [`eventlog`]: the optional JSON-lines record of sessions and result acks.
//! - [`config`]: settings and their defaults.

pub mod adaptive;
pub mod agent;
pub mod backoff;
pub mod config;
pub mod connector;
mod dial;
pub mod eventlog;
pub mod executor;
mod fetch;
pub mod link;
pub mod metrics;
pub mod outbox;
mod pace;
pub mod reaper;
pub mod runner;
pub mod session;
pub mod statedir;
pub mod stats;
#[cfg(all(test, unix))]
mod testutil;
mod woken;

pub use agent::{AckHook, Agent, AgentError, AgentHandle};
pub use config::WorkerConfig;
pub use dial::GRACE_SHARE;
pub use executor::{ExecError, Executor, Executors, TaskCtx, TaskInput};
pub use stats::ConnState;
