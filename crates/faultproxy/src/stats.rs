//! Counters per fault and per proxy: live atomics inside, plain snapshots outside.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::fault::Stream;

/// What one fault did, summed over every link it touched (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultStats {
    /// Bytes that went through the fault on links it applies to.
    pub bytes_passed: u64,
    /// Bytes the fault held back before passing them on.
    pub bytes_delayed: u64,
    /// Bytes the fault discarded, with those a link it closed or reset had read and not yet
    /// delivered (on either stream).
    pub bytes_dropped: u64,
    /// Bytes the fault changed.
    pub bytes_corrupted: u64,
    /// Links the fault closed with RST.
    pub connections_reset: u64,
    /// Links the fault closed cleanly.
    pub connections_closed: u64,
    /// Links on which the toxicity draw made the fault apply.
    pub connections_affected: u64,
    /// Clean closes (FINs) the fault held back before passing them on (`slow_close`: its
    /// bytes are none, so `bytes_delayed` cannot show it fired).
    #[serde(default)]
    pub closes_delayed: u64,
}

/// What a proxy carried, plus the sum of every fault it ever had (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStats {
    /// Client connections accepted.
    pub connections_accepted: u64,
    /// Links open now.
    pub connections_active: u64,
    /// Links that ended, for any reason.
    pub connections_closed: u64,
    /// Links that ended with RST, from a fault or from a peer.
    pub connections_reset: u64,
    /// Links given up because the upstream could not be reached.
    pub upstream_failures: u64,
    /// Bytes written to the upstream.
    pub bytes_upstream: u64,
    /// Bytes written to clients.
    pub bytes_downstream: u64,
    /// The sum of the counters of all faults, removed ones included.
    pub faults: FaultStats,
}

impl std::ops::Add for FaultStats {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            bytes_passed: self.bytes_passed + o.bytes_passed,
            bytes_delayed: self.bytes_delayed + o.bytes_delayed,
            bytes_dropped: self.bytes_dropped + o.bytes_dropped,
            bytes_corrupted: self.bytes_corrupted + o.bytes_corrupted,
            connections_reset: self.connections_reset + o.connections_reset,
            connections_closed: self.connections_closed + o.connections_closed,
            connections_affected: self.connections_affected + o.connections_affected,
            closes_delayed: self.closes_delayed + o.closes_delayed,
        }
    }
}

impl std::iter::Sum for FaultStats {
    /// The counters of several faults (or of one fault over several proxies) together.
    fn sum<I: Iterator<Item = Self>>(it: I) -> Self {
        it.fold(Self::default(), |a, b| a + b)
    }
}

impl std::ops::Add for ProxyStats {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            connections_accepted: self.connections_accepted + o.connections_accepted,
            connections_active: self.connections_active + o.connections_active,
            connections_closed: self.connections_closed + o.connections_closed,
            connections_reset: self.connections_reset + o.connections_reset,
            upstream_failures: self.upstream_failures + o.upstream_failures,
            bytes_upstream: self.bytes_upstream + o.bytes_upstream,
            bytes_downstream: self.bytes_downstream + o.bytes_downstream,
            faults: self.faults + o.faults,
        }
    }
}

impl std::iter::Sum for ProxyStats {
    /// The counters of several proxies together.
    fn sum<I: Iterator<Item = Self>>(it: I) -> Self {
        it.fold(Self::default(), |a, b| a + b)
    }
}

/// Live counters of one fault (and the per-proxy totals of all faults).
#[derive(Debug, Default)]
pub(crate) struct FaultCounters {
    pub bytes_passed: AtomicU64,
    pub bytes_delayed: AtomicU64,
    pub bytes_dropped: AtomicU64,
    pub bytes_corrupted: AtomicU64,
    pub connections_reset: AtomicU64,
    pub connections_closed: AtomicU64,
    pub connections_affected: AtomicU64,
    pub closes_delayed: AtomicU64,
}

impl FaultCounters {
    pub fn snapshot(&self) -> FaultStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultStats {
            bytes_passed: get(&self.bytes_passed),
            bytes_delayed: get(&self.bytes_delayed),
            bytes_dropped: get(&self.bytes_dropped),
            bytes_corrupted: get(&self.bytes_corrupted),
            connections_reset: get(&self.connections_reset),
            connections_closed: get(&self.connections_closed),
            connections_affected: get(&self.connections_affected),
            closes_delayed: get(&self.closes_delayed),
        }
    }
}

/// Live counters of one proxy.
#[derive(Debug, Default)]
pub(crate) struct ProxyCounters {
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub connections_closed: AtomicU64,
    pub connections_reset: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub bytes_upstream: AtomicU64,
    pub bytes_downstream: AtomicU64,
    pub faults: FaultCounters,
}

impl ProxyCounters {
    pub fn snapshot(&self) -> ProxyStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProxyStats {
            connections_accepted: get(&self.connections_accepted),
            connections_active: get(&self.connections_active),
            connections_closed: get(&self.connections_closed),
            connections_reset: get(&self.connections_reset),
            upstream_failures: get(&self.upstream_failures),
            bytes_upstream: get(&self.bytes_upstream),
            bytes_downstream: get(&self.bytes_downstream),
            faults: self.faults.snapshot(),
        }
    }

    pub fn delivered(&self, stream: Stream, n: usize) {
        let c = match stream {
            Stream::Upstream => &self.bytes_upstream,
            Stream::Downstream => &self.bytes_downstream,
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Adds `n` to a counter.
pub(crate) fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod sum_tests {
    use super::*;

    #[test]
    fn stats_add_field_by_field_and_sum_over_many() {
        let f = |n: u64| FaultStats {
            bytes_passed: n,
            bytes_delayed: 2 * n,
            bytes_dropped: 3 * n,
            bytes_corrupted: 4 * n,
            connections_reset: 5 * n,
            connections_closed: 6 * n,
            connections_affected: 7 * n,
            closes_delayed: 8 * n,
        };
        assert_eq!([f(1), f(2), f(4)].into_iter().sum::<FaultStats>(), f(7));
        let p = |n: u64| ProxyStats {
            connections_accepted: n,
            connections_active: 2 * n,
            connections_closed: 3 * n,
            connections_reset: 4 * n,
            upstream_failures: 5 * n,
            bytes_upstream: 6 * n,
            bytes_downstream: 7 * n,
            faults: f(n),
        };
        assert_eq!([p(1), p(3)].into_iter().sum::<ProxyStats>(), p(4));
        assert_eq!(std::iter::empty::<ProxyStats>().sum::<ProxyStats>(), p(0));
    }
}
