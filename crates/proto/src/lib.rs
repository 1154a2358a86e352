//! Wire types of the tether protocol, shared by the coordinator and the worker.
//!
//! - [`auth`]: secrets and the registration challenge-response (HMAC-SHA256).
//! - [`integrity`]: per-message HMAC-SHA256 tags with a per-session key.
//! - [`compress`]: negotiated zstd compression of large messages, with a bounded inflate.
//! - [`ids`]: newtypes for worker, task and checkpoint ids, attempts and sequence numbers.
//! - [`endpoint`]: the worker endpoint URL, derived on the worker and parsed on the coordinator.
//! - [`msg`]: one closed, `type`-tagged enum per direction ([`WorkerMsg`], [`CoordMsg`]).
//! - [`task`]: task specs, statuses, outcomes and connection statistics.
//! - [`codec`]: frame text to message and back, with structured decode errors.
//! - [`samples`]: one sample of every variant, for conformance tests.
//!
//! No async runtime here: this crate is what a worker in another language would re-implement.
//! Behind features, helpers the coordinator and worker share: `counters` (metrics by message
//! type), `lockfile` (one process to a directory), `drain` (a write bounded by a liveness
//! deadline that moves while bytes are taken), `whole_file` (a new database file made whole
//! before it takes its name).

pub mod auth;
pub mod codec;
pub mod compress;
#[cfg(feature = "metrics")]
pub mod counters;
#[cfg(feature = "drain")]
pub mod drain;
pub mod endpoint;
#[cfg(feature = "file-modes")]
pub mod file_modes;
pub mod ids;
pub mod integrity;
#[cfg(feature = "lockfile")]
pub mod lockfile;
pub mod msg;
pub mod samples;
pub mod settings;
pub mod task;
pub mod time;
#[cfg(feature = "whole-file")]
pub mod whole_file;

pub use codec::{Batch, DecodeError, decode_coord, decode_worker, encode, is_batch};
pub use ids::{Attempt, CheckpointId, Seq, TaskId, WorkerId};
pub use msg::{CoordMsg, PROTOCOL_VERSION, WorkerMsg};
pub use task::{Outcome, RetryOn, TaskRef, TaskSpec, TaskStatus};
