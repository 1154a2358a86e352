//! One proxy: a listener, its live links, and the chain of faults they all follow.
//!
//! The faults live in a `watch` channel; every link's writers hold a receiver, so adding,
//! changing or removing a fault reaches live links at once. Going down cancels the listener
//! and every link of the current generation and waits for them; going up binds the same
//! address again and starts a new generation.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::fault::{Fault, FaultError, FaultPatch, validate_name};
use crate::gate::{LogGate, WARN_EVERY};
use crate::guard::FaultGuard;
use crate::link::{self, LinkCtx, LinkInfo, Registry};
use crate::stage::{Chain, FaultEntry, FaultId};
use crate::stats::{FaultCounters, FaultStats, ProxyCounters, ProxyStats, add};

/// Listen backlog of a proxy's socket, as the coordinator's (the kernel caps it at
/// `net.core.somaxconn`): a herd of workers reconnecting at once through a proxy must not find
/// its queue full, have its SYNs dropped and wait a second for the retransmission (tokio's
/// default of 1,024 overflowed with 5,000 workers a proxy).
const BACKLOG: u32 = 65_535;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// How to start a [`Proxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Unique within a [`crate::Server`]; letters, digits and `. _ ~ -`.
    pub name: String,
    /// Address to listen on; port 0 picks a free port, kept across down/up.
    pub listen: SocketAddr,
    /// Address every link connects to.
    pub upstream: SocketAddr,
    /// Seed of every random draw (toxicity, jitter, slicing, corruption, stalls).
    pub seed: u64,
}

/// Why a proxy operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid proxy name: {0}")]
    Name(#[source] FaultError),
    #[error("proxy {proxy}: cannot listen on {addr}: {source}")]
    Bind {
        proxy: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "proxy {proxy}: upstream {upstream} is the proxy's own listen address ({listen}); \
         every link would connect to the proxy again, without end"
    )]
    UpstreamIsListen {
        proxy: String,
        listen: SocketAddr,
        upstream: SocketAddr,
    },
    #[error("proxy {proxy}: fault {fault:?} is invalid: {source}")]
    InvalidFault {
        proxy: String,
        fault: String,
        #[source]
        source: FaultError,
    },
    #[error("proxy {proxy} already has a fault named {fault:?}")]
    FaultExists { proxy: String, fault: String },
    #[error("proxy {proxy} has no fault named {fault:?}")]
    NoSuchFault { proxy: String, fault: String },
}

/// A fault as it stands now, with its counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultInfo {
    #[serde(flatten)]
    pub fault: Fault,
    pub stats: FaultStats,
}

/// A proxy as it stands now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyInfo {
    pub name: String,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub enabled: bool,
    pub seed: u64,
    pub faults: Vec<FaultInfo>,
    pub links: Vec<LinkInfo>,
    pub stats: ProxyStats,
}

/// A running TCP proxy with fault injection. Cheap to clone; when the last clone (and the last
/// [`FaultGuard`]) is dropped, the listener and every link stop.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    _alive: Arc<DropGuard>,
}

struct Shared {
    name: Arc<str>,
    upstream: SocketAddr,
    seed: u64,
    listen: Mutex<SocketAddr>,
    faults: watch::Sender<Chain>,
    fault_seq: AtomicU64,
    link_seq: AtomicU64,
    links: Registry,
    counters: Arc<ProxyCounters>,
    upstream_warnings: Arc<LogGate>,
    enabled: AtomicBool,
    /// Cancelled when the last handle is dropped.
    root: CancellationToken,
    /// The running generation, if up; the lock serialises down and up.
    run: tokio::sync::Mutex<Option<Generation>>,
}

/// The listener and links of one up period.
struct Generation {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("name", &self.name())
            .field("listen", &self.listen_addr())
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Binds `config.listen` and starts accepting. Logs the seed.
    pub async fn start(config: ProxyConfig) -> Result<Proxy, ProxyError> {
        validate_name(&config.name).map_err(ProxyError::Name)?;
        let looped = |listen| ProxyError::UpstreamIsListen {
            proxy: config.name.clone(),
            listen,
            upstream: config.upstream,
        };
        // Checked before binding (a port asked for), and again on the port bound (port 0).
        if config.listen.port() != 0 && reaches_itself(config.listen, config.upstream) {
            return Err(looped(config.listen));
        }
        let listener = bind(&config.name, config.listen)?;
        let listen = listener.local_addr().map_err(|source| ProxyError::Bind {
            proxy: config.name.clone(),
            addr: config.listen,
            source,
        })?;
        if reaches_itself(listen, config.upstream) {
            return Err(looped(listen));
        }
        let root = CancellationToken::new();
        let shared = Arc::new(Shared {
            name: Arc::from(config.name.as_str()),
            upstream: config.upstream,
            seed: config.seed,
            listen: Mutex::new(listen),
            faults: watch::Sender::new(Chain::default()),
            fault_seq: AtomicU64::new(0),
            link_seq: AtomicU64::new(0),
            links: Registry::default(),
            counters: Arc::default(),
            upstream_warnings: Arc::new(LogGate::new(WARN_EVERY)),
            enabled: AtomicBool::new(false),
            root: root.clone(),
            run: tokio::sync::Mutex::new(None),
        });
        *shared.run.lock().await = Some(Shared::spawn(&shared, listener));
        tracing::info!(proxy = %config.name, %listen, upstream = %config.upstream,
            seed = config.seed, "proxy started");
        Ok(Proxy {
            shared,
            _alive: Arc::new(root.drop_guard()),
        })
    }

    /// The proxy's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address clients connect to (the real port when started on port 0).
    pub fn listen_addr(&self) -> SocketAddr {
        *self
            .shared
            .listen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The address links connect to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The seed of the proxy's random draws.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// Whether the proxy is up (accepting connections).
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::SeqCst)
    }

    /// Adds a fault to every live and future link. It stays until the returned guard is
    /// dropped (or removed by name); call [`FaultGuard::keep`] to leave it in place.
    /// When this returns, every chunk read afterwards on any link goes through the fault.
    pub async fn add_fault(&self, fault: Fault) -> Result<FaultGuard, ProxyError> {
        let (id, name, counters) = self.insert_fault(fault)?;
        Ok(FaultGuard::new(self.clone(), id, name, counters))
    }

    fn insert_fault(
        &self,
        fault: Fault,
    ) -> Result<(FaultId, String, Arc<FaultCounters>), ProxyError> {
        fault
            .validate()
            .map_err(|source| self.invalid(&fault.name, source))?;
        let id = self.shared.fault_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(FaultEntry {
            id,
            revision: 0,
            fault,
            counters: Arc::default(),
        });
        let mut exists = false;
        self.shared.faults.send_if_modified(|chain| {
            exists = chain.iter().any(|e| e.fault.name == entry.fault.name);
            if !exists {
                let mut next = chain.as_ref().clone();
                next.push(Arc::clone(&entry));
                *chain = Arc::new(next);
            }
            !exists
        });
        let f = &entry.fault;
        if exists {
            return Err(ProxyError::FaultExists {
                proxy: self.name().to_owned(),
                fault: f.name.clone(),
            });
        }
        tracing::info!(proxy = %self.name(), fault = %f.name, kind = f.kind.name(),
            direction = ?f.direction, toxicity = f.toxicity, target = ?f.target, "fault added");
        Ok((id, f.name.clone(), Arc::clone(&entry.counters)))
    }

    /// Changes a live fault; its counters and per-link state carry on.
    pub fn update_fault(&self, name: &str, patch: &FaultPatch) -> Result<FaultInfo, ProxyError> {
        let mut result = Err(self.no_such(name));
        self.shared.faults.send_if_modified(|chain| {
            let Some(pos) = chain.iter().position(|e| e.fault.name == name) else {
                return false;
            };
            let old = &chain[pos];
            match old.fault.patched(patch) {
                Ok(fault) => {
                    // A new revision only when what the fault does changed: chunks waiting in
                    // it keep their timers through a change of who it applies to.
                    let same =
                        fault.kind == old.fault.kind && fault.direction == old.fault.direction;
                    let entry = Arc::new(FaultEntry {
                        id: old.id,
                        revision: old.revision + u64::from(!same),
                        fault,
                        counters: Arc::clone(&old.counters),
                    });
                    result = Ok(info_of(&entry));
                    let mut next = chain.as_ref().clone();
                    next[pos] = entry;
                    *chain = Arc::new(next);
                    true
                }
                Err(source) => {
                    result = Err(self.invalid(name, source));
                    false
                }
            }
        });
        if result.is_ok() {
            tracing::info!(proxy = %self.name(), fault = name, ?patch, "fault updated");
        }
        result
    }

    /// Removes a fault by name; returns it with its final counters.
    pub fn remove_fault(&self, name: &str) -> Result<FaultInfo, ProxyError> {
        self.remove_where(|e| e.fault.name == name)
            .ok_or_else(|| self.no_such(name))
    }

    pub(crate) fn remove_where(&self, pred: impl Fn(&FaultEntry) -> bool) -> Option<FaultInfo> {
        let mut removed = None;
        self.shared.faults.send_if_modified(|chain| {
            let Some(pos) = chain.iter().position(|e| pred(e)) else {
                return false;
            };
            let mut next = chain.as_ref().clone();
            removed = Some(info_of(&next.remove(pos)));
            *chain = Arc::new(next);
            true
        });
        if let Some(info) = &removed {
            tracing::info!(proxy = %self.name(), fault = %info.fault.name, stats = ?info.stats,
                "fault removed");
        }
        removed
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.shared.faults.send_if_modified(|chain| {
            let had = !chain.is_empty();
            *chain = Chain::default();
            had
        });
    }

    /// Every fault, in the order they were added (which is the order they apply in).
    pub fn faults(&self) -> Vec<FaultInfo> {
        self.shared
            .faults
            .borrow()
            .iter()
            .map(|e| info_of(e))
            .collect()
    }

    /// One fault by name.
    pub fn fault(&self, name: &str) -> Option<FaultInfo> {
        let chain = self.shared.faults.borrow();
        chain
            .iter()
            .find(|e| e.fault.name == name)
            .map(|e| info_of(e))
    }

    /// The live links, by link number.
    pub fn links(&self) -> Vec<LinkInfo> {
        let links = self
            .shared
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        links.values().cloned().collect()
    }

    /// The proxy's counters.
    pub fn stats(&self) -> ProxyStats {
        self.shared.counters.snapshot()
    }

    /// Everything about the proxy at once.
    pub fn info(&self) -> ProxyInfo {
        ProxyInfo {
            name: self.name().to_owned(),
            listen: self.listen_addr(),
            upstream: self.upstream(),
            enabled: self.is_enabled(),
            seed: self.seed(),
            faults: self.faults(),
            links: self.links(),
            stats: self.stats(),
        }
    }

    /// Stops listening and closes every live link (FIN), then returns. Faults stay.
    pub async fn down(&self) {
        let mut run = self.shared.run.lock().await;
        if let Some(g) = run.take() {
            self.shared.enabled.store(false, Ordering::SeqCst);
            g.cancel.cancel();
            g.tracker.close();
            g.tracker.wait().await;
            tracing::info!(proxy = %self.name(), "proxy down");
        }
    }

    /// Listens again on the same address. Does nothing if the proxy is up.
    pub async fn up(&self) -> Result<(), ProxyError> {
        let mut run = self.shared.run.lock().await;
        if run.is_none() {
            let listener = bind(self.name(), self.listen_addr())?;
            *run = Some(Shared::spawn(&self.shared, listener));
            tracing::info!(proxy = %self.name(), listen = %self.listen_addr(), "proxy up");
        }
        Ok(())
    }

    fn invalid(&self, fault: &str, source: FaultError) -> ProxyError {
        ProxyError::InvalidFault {
            proxy: self.name().to_owned(),
            fault: fault.to_owned(),
            source,
        }
    }

    fn no_such(&self, fault: &str) -> ProxyError {
        ProxyError::NoSuchFault {
            proxy: self.name().to_owned(),
            fault: fault.to_owned(),
        }
    }
}

fn info_of(e: &FaultEntry) -> FaultInfo {
    FaultInfo {
        fault: e.fault.clone(),
        stats: e.counters.snapshot(),
    }
}

/// Whether a proxy listening on `listen` would, dialling `upstream`, connect to itself: each
/// link would make another, without end, until the proxy ran out of ports and descriptors.
/// Same port and: the same address; or a wildcard `listen` (`0.0.0.0`, or `[::]`, which takes
/// IPv4 too) and an `upstream` that is an address of this host (loopback, wildcard, or one a
/// socket can bind); or a wildcard `upstream` (the kernel dials the host itself) and a
/// loopback or wildcard `listen`. IPv4-mapped IPv6 addresses count as IPv4.
pub(crate) fn reaches_itself(listen: SocketAddr, upstream: SocketAddr) -> bool {
    if listen.port() != upstream.port() {
        return false;
    }
    let (l, u) = (listen.ip().to_canonical(), upstream.ip().to_canonical());
    if l == u {
        return true;
    }
    // Whether a wildcard listener takes connections to `ip`: `0.0.0.0` IPv4 only, `[::]` both.
    let wildcard_takes = |ip: IpAddr| l.is_unspecified() && (l.is_ipv6() || ip.is_ipv4());
    if u.is_unspecified() {
        // The kernel dials the loopback address of the upstream's family.
        let lo: IpAddr = match u {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        return l == lo || wildcard_takes(lo);
    }
    wildcard_takes(u) && (u.is_loopback() || is_local_address(u))
}

/// Whether `ip` is an address of this host: only then can a socket be bound to it.
fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Binds with `SO_REUSEADDR`, so going up again works while old links sit in TIME_WAIT.
fn bind(proxy: &str, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let err = |source| ProxyError::Bind {
        proxy: proxy.to_owned(),
        addr,
        source,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(BACKLOG).map_err(err)
}

impl Shared {
    fn spawn(this: &Arc<Shared>, listener: TcpListener) -> Generation {
        let cancel = this.root.child_token();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            Arc::clone(this),
            listener,
            cancel.clone(),
            tracker.clone(),
        ));
        this.enabled.store(true, Ordering::SeqCst);
        Generation { cancel, tracker }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((socket, peer)) => {
                add(&shared.counters.connections_accepted, 1);
                let ctx = LinkCtx {
                    id: shared.link_seq.fetch_add(1, Ordering::Relaxed) + 1,
                    proxy: Arc::clone(&shared.name),
                    seed: shared.seed,
                    upstream: shared.upstream,
                    chain: shared.faults.subscribe(),
                    counters: Arc::clone(&shared.counters),
                    upstream_warnings: Arc::clone(&shared.upstream_warnings),
                    registry: Arc::clone(&shared.links),
                    cancel: cancel.child_token(),
                };
                tracker.spawn(link::run(ctx, socket, peer));
            }
            Err(e) => {
                tracing::warn!(proxy = %shared.name, error = %e, "accept failed");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_RETRY) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change of a fault's share of connections or its target keeps its revision (chunks
    /// waiting in it keep their deadlines: a stall 4.9 s into 5 s used to start its 5 s over);
    /// a change of what it does makes a new one.
    #[tokio::test]
    async fn only_a_change_of_what_a_fault_does_makes_a_new_revision() {
        let proxy = Proxy::start(ProxyConfig {
            name: "p".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            upstream: "127.0.0.1:9".parse().expect("addr"),
            seed: 1,
        })
        .await
        .expect("proxy");
        let fault = Fault::new(
            "s",
            crate::fault::FaultKind::Latency {
                latency_ms: 100,
                jitter_ms: 0,
            },
            crate::fault::Direction::Upstream,
        );
        let _guard = proxy.add_fault(fault).await.expect("fault");
        let revision = || proxy.shared.faults.borrow()[0].revision;
        let patch = |json: &str| {
            let p: FaultPatch = serde_json::from_str(json).expect("patch");
            proxy.update_fault("s", &p).expect("update");
        };
        patch(r#"{"toxicity": 0.5}"#);
        patch("{}");
        assert_eq!(revision(), 0);
        patch(r#"{"attributes": {"latency_ms": 200}}"#);
        assert_eq!(revision(), 1);
        patch(r#"{"direction": "downstream"}"#);
        assert_eq!(revision(), 2);
    }

    #[test]
    fn an_upstream_that_is_the_proxys_own_listen_address_is_told_apart() {
        let a = |s: &str| s.parse::<SocketAddr>().expect(s);
        for (listen, upstream, loops) in [
            ("127.0.0.1:4000", "127.0.0.1:4000", true),
            ("127.0.0.1:4000", "127.0.0.1:4001", false),
            ("127.0.0.1:4000", "127.0.0.2:4000", false),
            ("0.0.0.0:4000", "127.0.0.1:4000", true),
            ("0.0.0.0:4000", "127.0.0.9:4000", true),
            ("0.0.0.0:4000", "0.0.0.0:4000", true),
            ("0.0.0.0:4000", "[::1]:4000", false),
            ("0.0.0.0:4000", "192.0.2.1:4000", false),
            ("[::]:4000", "127.0.0.1:4000", true),
            ("[::]:4000", "[::1]:4000", true),
            ("127.0.0.1:4000", "0.0.0.0:4000", true),
            ("[::1]:4000", "0.0.0.0:4000", false),
            ("[::1]:4000", "[::]:4000", true),
            ("[::ffff:127.0.0.1]:4000", "127.0.0.1:4000", true),
        ] {
            assert_eq!(
                reaches_itself(a(listen), a(upstream)),
                loops,
                "{listen} -> {upstream}"
            );
        }
    }
}
