//! Who may connect: worker secrets for the registration challenge-response, and bearer tokens
//! for the HTTP API.
//!
//! Worker secrets come from a fleet secret file, a directory of per-worker secret files (named
//! by worker id, read at each connection so workers can be provisioned without a restart), or
//! both (the per-worker file wins). Secrets are never logged and never sent.

use std::path::PathBuf;
use std::time::Duration;

use tether_proto::WorkerId;
use tether_proto::auth::{AuthError, Secret};

/// How workers authenticate. `None` in the config means authentication is off.
#[derive(Debug, Clone)]
pub struct WorkerAuth {
    /// The secret every worker without its own file uses.
    pub fleet: Option<Secret>,
    /// A directory holding one secret file per worker, named by the worker id.
    pub dir: Option<PathBuf>,
    /// Largest difference between a registration's timestamp and this clock.
    pub max_skew: Duration,
}

impl WorkerAuth {
    /// Authentication with one fleet secret.
    pub fn fleet(secret: Secret) -> Self {
        Self {
            fleet: Some(secret),
            dir: None,
            max_skew: tether_proto::auth::DEFAULT_MAX_SKEW,
        }
    }

    /// The secret `worker` must prove it holds; `None` when it has none (it cannot register).
    pub async fn secret_for(&self, worker: &WorkerId) -> Result<Option<Secret>, AuthError> {
        if let Some(dir) = &self.dir
            // Ids may be `.` or `..`; those never name a secret file.
            && !worker.as_str().starts_with('.')
        {
            let path = dir.join(worker.as_str());
            match tokio::fs::read(&path).await {
                Ok(bytes) => return Secret::new(&bytes).map(Some),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(AuthError::SecretFile { path, source }),
            }
        }
        Ok(self.fleet.clone())
    }
}
