//! Free space in the data directory: a gauge, and a warning before the store runs out.
//!
//! A commit that fails for want of space waits for it (`store::space`): nothing is
//! acknowledged or taken meanwhile. The WAL alone may grow
//! to [`crate::store::WAL_RESTART_FRAMES`] pages before it starts over, so the warning comes
//! while there is still room for that and more.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Free space under which the coordinator warns: twice what the WAL may reach (4 KiB pages).
pub const LOW_SPACE: u64 = 2 * crate::store::WAL_RESTART_FRAMES * 4096;
/// How often free space is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How often the warning is repeated while space stays low.
pub const WARN_AGAIN: Duration = Duration::from_secs(600);

/// Bytes an unprivileged writer may still use in the file system holding `dir`.
pub fn available(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    #[allow(clippy::useless_conversion)] // the field types differ between platforms
    let (blocks, size) = (
        u64::from(s.blocks_available()),
        u64::from(s.fragment_size()),
    );
    Ok(blocks.saturating_mul(size))
}

/// What a look at the free space asks to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    /// Space is low: newly, or still, [`WARN_AGAIN`] after the last warning.
    Low,
    /// Space was low and is not any more.
    Recovered,
}

/// Whether space is low, and when that was last said.
#[derive(Debug, Default)]
pub struct Watch {
    warned: Option<Instant>,
}

impl Watch {
    /// Takes a look: `available` bytes at `now`.
    pub fn look(&mut self, available: u64, now: Instant) -> Option<Say> {
        let low = available < LOW_SPACE;
        match (low, self.warned) {
            (true, Some(at)) if now.saturating_duration_since(at) < WARN_AGAIN => None,
            (true, _) => {
                self.warned = Some(now);
                Some(Say::Low)
            }
            (false, Some(_)) => {
                self.warned = None;
                Some(Say::Recovered)
            }
            (false, None) => None,
        }
    }
}

/// Looks at the data directory's free space every [`CHECK_EVERY`] until `stop`: sets the
/// gauge, and warns while it is low.
pub async fn watch(dir: PathBuf, stop: CancellationToken) {
    let mut w = Watch::default();
    let mut failed = false;
    loop {
        match available(&dir) {
            Ok(bytes) => {
                // A later failure is said again.
                failed = false;
                metrics::gauge!(crate::metrics::DATA_DIR_AVAILABLE).set(bytes as f64);
                match w.look(bytes, Instant::now()) {
                    Some(Say::Low) => tracing::warn!(
                        data_dir = %dir.display(),
                        available_mib = bytes >> 20,
                        low_mib = LOW_SPACE >> 20,
                        "the data directory is running out of space: once it is out, commits wait for room and nothing new is taken"
                    ),
                    Some(Say::Recovered) => tracing::info!(
                        data_dir = %dir.display(),
                        available_mib = bytes >> 20,
                        "the data directory has space again"
                    ),
                    None => {}
                }
            }
            Err(e) if !std::mem::replace(&mut failed, true) => {
                tracing::warn!(data_dir = %dir.display(), error = %e, "cannot read the data directory's free space");
            }
            Err(_) => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_space_is_said_once_then_again_after_a_while_and_its_end_once() {
        let mut w = Watch::default();
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(w.look(LOW_SPACE, t0), None, "at the bound: not low");
        assert_eq!(w.look(LOW_SPACE - 1, secs(10)), Some(Say::Low));
        assert_eq!(w.look(1, secs(20)), None);
        assert_eq!(w.look(1, secs(10 + 599)), None);
        assert_eq!(w.look(1, secs(10 + 600)), Some(Say::Low));
        assert_eq!(w.look(LOW_SPACE * 2, secs(700)), Some(Say::Recovered));
        assert_eq!(w.look(LOW_SPACE * 2, secs(710)), None);
        assert_eq!(
            w.look(0, secs(720)),
            Some(Say::Low),
            "low again: said at once"
        );
    }

    #[test]
    fn the_free_space_of_a_real_directory_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(available(dir.path()).expect("statvfs") > 0);
        assert!(available(&dir.path().join("missing")).is_err());
    }
}
