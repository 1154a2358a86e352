//! Coordinator and workers together over real sockets on 127.0.0.1.

mod audit;
mod backlog;
mod batching;
mod browser;
mod budget;
mod byte_limits;
mod checkpoint_request;
mod dashboard;
mod faults;
mod frames;
mod fuzz_http;
mod hostile;
mod idempotent_submit;
mod integrity;
mod lifecycle;
mod metrics;
mod openapi;
mod raw;
mod recovery;
mod redaction;
mod refusal_storm;
mod registration_frame;
mod secrets;
mod support;
mod tls;
mod worker_stats;
