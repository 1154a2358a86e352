//! TCP fault injection for tether's end-to-end tests, its demo and `tether proxy`.
//!
//! This crate owns a Toxiproxy-like proxy: each [`Proxy`] listens on one address and forwards
//! every accepted connection (a *link*) to one upstream, through a chain of [`Fault`]s per
//! direction. Faults can be added, changed and removed while links are live, aimed at one
//! direction and at the links of chosen workers, and each counts what it did.
//!
//! How the modules fit, from the bytes up:
//!
//! - [`fault`]: what a fault is (kind, attributes, direction, toxicity, target) and its JSON.
//! - `stage`: the chain on one stream of one link, applied to one chunk at a time; pure logic
//!   that says wait, hold, drop, split or deliver, plus the seeded toxicity draws.
//! - `pump`: per stream, a reader task (chunks of at most 32 KiB, read into a buffer that
//!   starts at 4 KiB and grows when a read fills it, into a queue bounded in chunks and in
//!   bytes, a second's worth under a bandwidth fault) and a writer task (chunk through the
//!   stages, then to the socket), re-reading the chain on change.
//! - `sniff`: learns the worker id from the upgrade request line before anything is forwarded.
//! - `direct`: while no fault applies to a link, its own task moves both streams, each chunk
//!   written from the buffer it was read into; a fault that comes to apply hands the link,
//!   with the bytes it holds, to the pump tasks.
//! - `link`: one connection: sniff, wait while a blackhole holds it back (a lost SYN),
//!   connect upstream (to a loopback one from one of [`LOOPBACK_SOURCES`] source addresses
//!   on Linux),
//!   run it direct or through the four pump tasks, close with FIN or RST.
//! - [`proxy`]: the listener, live links, the fault chain in a `watch` channel, down and up,
//!   and (in `guard`) the [`FaultGuard`] tests hold.
//! - [`server`] and [`control`]: many proxies by name behind a Toxiproxy-shaped HTTP API.
//! - [`cli`]: `tether proxy`, run mode and the HTTP client subcommands.
//! - [`stats`]: counters per fault and per proxy.
//!
//! Every random draw comes from a seeded `SmallRng` (proxy seed mixed with the link number),
//! and every wait goes through `tokio::time`.
//!
//! ```no_run
//! # async fn demo(coordinator: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
//! use tether_faultproxy::{Direction, Fault, FaultKind, Proxy, ProxyConfig};
//!
//! let proxy = Proxy::start(ProxyConfig {
//!     name: "coordinator".into(),
//!     listen: "127.0.0.1:0".parse()?,
//!     upstream: coordinator,
//!     seed: 42,
//! })
//! .await?;
//! let guard = proxy
//!     .add_fault(Fault::new("partition", FaultKind::Blackhole, Direction::Both))
//!     .await?;
//! // ... point workers at proxy.listen_addr(), wait until guard.stats().bytes_dropped > 0 ...
//! drop(guard); // lifts the blackhole; what it swallowed on live links stays lost
//! # Ok(()) }
//! ```

pub mod cli;
pub mod control;
mod direct;
pub mod fault;
mod gate;
mod guard;
mod link;
pub mod proxy;
mod pump;
pub mod server;
mod sniff;
mod stage;
pub mod stats;

pub use fault::{Direction, Fault, FaultError, FaultKind, FaultPatch, Stream, Target};
pub use guard::FaultGuard;
pub use link::{CONNECT_TIMEOUT, LOOPBACK_SOURCES, LinkInfo};
pub use proxy::{FaultInfo, Proxy, ProxyConfig, ProxyError, ProxyInfo};
pub use pump::{CHUNK_SIZE, QUEUE_BYTES, QUEUE_CHUNKS, QUEUE_FLOOR};
pub use server::{Server, ServerError};
pub use sniff::{SNIFF_LIMIT, SNIFF_TIMEOUT};
pub use stats::{FaultStats, ProxyStats};
