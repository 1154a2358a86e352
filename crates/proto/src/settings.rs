//! What the coordinator's and the worker's configurations share: the error that refuses a
//! setting which would stop the work, naming it.

use std::time::Duration;

/// A setting no run can work with, by its field name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct ConfigError {
    pub field: &'static str,
    pub why: String,
}

impl ConfigError {
    pub fn new(field: &'static str, why: impl Into<String>) -> Self {
        Self {
            field,
            why: why.into(),
        }
    }
}

/// The smallest frame limit a library configuration runs with: room for a message's envelope
/// and as much again for what it carries (the `tether` commands ask for 1 MiB).
pub const MIN_FRAME: usize = 2 * crate::codec::ENVELOPE_BYTES;
/// The largest frame limit either end takes: a message is held whole in memory (and a
/// coordinator's state journal writes each state whole), so this bounds what one peer costs.
pub const MAX_FRAME: usize = 256 * 1024 * 1024;

/// Refuses a heartbeat interval under `min`, and a timeout that is not longer than the
/// interval (every session would end before its first answer could come).
pub fn check_heartbeat(
    interval: Duration,
    timeout: Duration,
    min: Duration,
) -> Result<(), ConfigError> {
    if interval < min {
        return Err(ConfigError::new(
            "heartbeat_interval",
            format!("{interval:?} is too short: at least {min:?}"),
        ));
    }
    if timeout <= interval {
        return Err(ConfigError::new(
            "heartbeat_timeout",
            format!("{timeout:?} must be longer than the heartbeat interval ({interval:?})"),
        ));
    }
    Ok(())
}

/// Refuses a frame limit under [`MIN_FRAME`] or over [`MAX_FRAME`].
pub fn check_frame(max_frame: usize) -> Result<(), ConfigError> {
    if max_frame < MIN_FRAME {
        return Err(ConfigError::new(
            "max_frame",
            format!("{max_frame} bytes is too small: at least {MIN_FRAME}"),
        ));
    }
    if max_frame > MAX_FRAME {
        return Err(ConfigError::new(
            "max_frame",
            format!("{max_frame} bytes is too large: at most {MAX_FRAME}"),
        ));
    }
    Ok(())
}
