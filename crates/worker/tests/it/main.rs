//! The worker's connection state machine under paused time, over in-memory pipes: backoff,
//! refusals, liveness. Deterministic and fast: a 60 s backoff takes no real time.

mod conformance;
mod fake;
mod state_machine;
