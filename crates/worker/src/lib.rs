//! The tether worker agent.

pub mod executor;
pub mod outbox;
