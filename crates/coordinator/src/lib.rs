//! The tether coordinator.
//!
//! - [`server`]: `run(listener, config, shutdown)`, the axum router on one listener.
//! - [`ws`]: worker sessions on `/api/v1/worker/{worker_id}/ws`.
//! - [`http`]: the JSON HTTP API; [`openapi`]: its OpenAPI description.
//! - [`dashboard`]: the live web page at `/` and its event stream.
//! - [`metrics`]: Prometheus metric names and `/metrics`.
//! - [`core`]: the single owner of the model; applies events, dispatches, sweeps.
//! - [`model`]: tasks, leases, workers.
//! - [`store`]: SQLite persistence with group commit; effects run after commit.
//! - [`admission`]: connection limits at accept, and the token bucket of rate limits.
//! - [`auth`]: worker secrets and API tokens.
//! - [`ratelimit`]: log lines a fleet can repeat without end, said once a window, and a few a
//!   minute over the fleet.
//! - [`tls`]: the rustls server configuration from PEM files.
//! - [`config`]: settings and their defaults.

pub mod admission;
pub mod auth;
pub mod config;
pub mod core;
pub mod dashboard;
pub mod disk;
pub mod http;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod tls;
pub mod ws;

pub use config::CoordinatorConfig;
pub use server::{Handles, ServerError, run, run_with};
