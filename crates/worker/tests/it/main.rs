//! The worker's connection state machine under paused time, over in-memory pipes: backoff,
//! refusals, liveness, and a seeded simulation of partitions, holds and repairs (`sim`).
//! Deterministic and fast: a 60 s backoff takes no real time.

mod ack_wait;
mod backoff_stat;
mod conformance;
mod event_log;
mod fake;
mod frame_limit;
mod fresh_stats;
mod lost_replay;
mod outage;
mod restart;
mod scratch;
mod settle;
mod shown_rate;
mod sim;
mod state_machine;
mod wrong_secret;
