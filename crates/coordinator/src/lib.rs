//! The tether coordinator.
//!
//! - [`server`]: `run(listener, config, shutdown)`, the axum router on one listener.
//! - [`ws`]: worker sessions on `/api/v1/worker/{worker_id}/ws`.
//! - [`http`]: the JSON HTTP API.
//! - [`core`]: the single owner of the model; applies events, dispatches, sweeps.
//! - [`model`]: tasks, leases, workers.
//! - [`store`]: SQLite persistence with group commit; effects run after commit.
//! - [`config`]: settings and their defaults.

pub mod config;
pub mod core;
pub mod http;
pub mod model;
pub mod server;
pub mod store;
pub mod ws;

pub use config::CoordinatorConfig;
pub use server::{Handles, ServerError, run, run_with};
