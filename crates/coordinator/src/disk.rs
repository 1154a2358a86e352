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
        look(&dir, &mut w, &mut failed);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

/// One look at the free space: sets the gauge and says what `w` asks to. A failed read (the
/// directory removed, its file system gone) sets the gauge to NaN, not to the last value
/// read, which would keep an alert on it quiet while nothing is known; it is said once
/// until a read succeeds again (`failed`).
fn look(dir: &Path, w: &mut Watch, failed: &mut bool) {
    let gauge = metrics::gauge!(crate::metrics::DATA_DIR_AVAILABLE);
    match available(dir) {
        Ok(bytes) => {
            // A later failure is said again.
            *failed = false;
            gauge.set(bytes as f64);
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
        Err(e) => {
            gauge.set(f64::NAN);
            if !std::mem::replace(failed, true) {
                tracing::warn!(data_dir = %dir.display(), error = %e, "cannot read the data directory's free space");
            }
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

    /// The gauge follows each look; one that fails makes it NaN (unknown), not the last
    /// value read.
    #[test]
    fn the_gauge_is_unknown_while_the_free_space_cannot_be_read() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let gauge = || {
            let text = handle.render();
            let line = text
                .lines()
                .find(|l| l.starts_with(crate::metrics::DATA_DIR_AVAILABLE))
                .map(str::to_owned);
            line.expect("the gauge")
                .rsplit(' ')
                .next()
                .expect("a value")
                .to_owned()
        };
        let (mut w, mut failed) = (Watch::default(), false);
        metrics::with_local_recorder(&recorder, || look(&data, &mut w, &mut failed));
        let read: f64 = gauge().parse().expect("a number");
        assert!(read > 0.0, "{read}");
        std::fs::remove_dir(&data).expect("rmdir");
        metrics::with_local_recorder(&recorder, || look(&data, &mut w, &mut failed));
        assert_eq!(gauge(), "NaN");
        assert!(failed);
    }

    #[test]
    fn the_free_space_of_a_real_directory_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(available(dir.path()).expect("statvfs") > 0);
        assert!(available(&dir.path().join("missing")).is_err());
    }
}
