//! [`FaultGuard`]: a fault that lives as long as a value in a test.

use std::sync::Arc;

use crate::fault::FaultPatch;
use crate::proxy::{FaultInfo, Proxy, ProxyError};
use crate::stage::FaultId;
use crate::stats::{FaultCounters, FaultStats};

/// A fault added with [`Proxy::add_fault`]. Dropping it removes the fault from the proxy.
#[must_use = "dropping the guard removes the fault at once; call keep() to leave it in place"]
#[derive(Debug)]
pub struct FaultGuard {
    proxy: Proxy,
    id: FaultId,
    name: String,
    counters: Arc<FaultCounters>,
    armed: bool,
}

impl FaultGuard {
    pub(crate) fn new(
        proxy: Proxy,
        id: FaultId,
        name: String,
        counters: Arc<FaultCounters>,
    ) -> Self {
        FaultGuard {
            proxy,
            id,
            name,
            counters,
            armed: true,
        }
    }

    /// The fault's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fault's counters now.
    pub fn stats(&self) -> FaultStats {
        self.counters.snapshot()
    }

    /// Changes the fault on live links; see [`Proxy::update_fault`].
    pub fn update(&self, patch: &FaultPatch) -> Result<FaultInfo, ProxyError> {
        self.proxy.update_fault(&self.name, patch)
    }

    /// Leaves the fault in place after the guard is gone; remove it by name later.
    pub fn keep(mut self) {
        self.armed = false;
    }

    /// Removes the fault now and returns its counters as they stand once it is removed (read
    /// before, they missed what links counted in between). Not final, though: a link applying
    /// the fault to a chunk at that moment may still count that chunk, and the bytes a link
    /// the fault ended (a `limit_data`, a reset) still held are counted as dropped once that
    /// link's tasks are done, which can be later (the proxy's own counters,
    /// [`Proxy::stats`], take those too).
    pub fn remove(mut self) -> FaultStats {
        self.armed = false;
        let id = self.id;
        self.proxy.remove_where(|e| e.id == id);
        self.counters.snapshot()
    }
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        if self.armed {
            let id = self.id;
            self.proxy.remove_where(|e| e.id == id);
        }
    }
}
