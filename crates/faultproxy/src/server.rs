//! Many proxies by name: what the control API serves.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::proxy::{Proxy, ProxyConfig, ProxyError};

/// Why a server operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("a proxy named {0:?} exists already")]
    ProxyExists(String),
    #[error("no proxy named {0:?}")]
    NoSuchProxy(String),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

/// A set of named proxies, shared by the control API and the code that made it.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Server {
    seed: u64,
    proxies: Arc<Mutex<BTreeMap<String, Proxy>>>,
}

impl Server {
    /// An empty server; proxies created without a seed of their own get `seed`.
    pub fn new(seed: u64) -> Self {
        tracing::info!(seed, "fault proxy server created");
        Server {
            seed,
            proxies: Arc::default(),
        }
    }

    /// The default seed of proxies created here.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Starts a proxy and registers it; `enabled: false` leaves it down (bound once, so its
    /// port is known, then closed).
    pub async fn create(&self, config: ProxyConfig, enabled: bool) -> Result<Proxy, ServerError> {
        let mut proxies = self.proxies.lock().await;
        if proxies.contains_key(&config.name) {
            return Err(ServerError::ProxyExists(config.name));
        }
        let proxy = Proxy::start(config).await?;
        if !enabled {
            proxy.down().await;
        }
        proxies.insert(proxy.name().to_owned(), proxy.clone());
        Ok(proxy)
    }

    /// A proxy by name.
    pub async fn get(&self, name: &str) -> Result<Proxy, ServerError> {
        self.proxies
            .lock()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| ServerError::NoSuchProxy(name.to_owned()))
    }

    /// Every proxy, by name.
    pub async fn list(&self) -> Vec<Proxy> {
        self.proxies.lock().await.values().cloned().collect()
    }

    /// Takes a proxy down and forgets it.
    pub async fn remove(&self, name: &str) -> Result<(), ServerError> {
        let proxy = self
            .proxies
            .lock()
            .await
            .remove(name)
            .ok_or_else(|| ServerError::NoSuchProxy(name.to_owned()))?;
        proxy.down().await;
        proxy.clear_faults();
        tracing::info!(proxy = name, "proxy removed");
        Ok(())
    }

    /// Brings every proxy up and removes every fault. Tries every proxy; returns the first
    /// error.
    pub async fn reset(&self) -> Result<(), ServerError> {
        let mut first = None;
        for proxy in self.list().await {
            proxy.clear_faults();
            if let Err(e) = proxy.up().await {
                tracing::warn!(proxy = proxy.name(), error = %e, "reset could not bring proxy up");
                first.get_or_insert(e);
            }
        }
        tracing::info!("all proxies reset");
        first.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Takes every proxy down (for shutdown).
    pub async fn shutdown(&self) {
        for proxy in self.list().await {
            proxy.down().await;
        }
    }
}
