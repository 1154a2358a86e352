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

/// The share of its blocks, in percent, that ext4 keeps at most from every writer, the
/// superuser included (its reserved clusters, `s_resv_clusters`: 2 % or 4096 clusters,
/// whichever is fewer), yet counts as free in `f_bfree` ([`Room::exhausted`]).
pub const EXT4_KEPT_FROM_ALL_PERCENT: u64 = 2;

/// What `statvfs` says of the room in a file system: its blocks (of [`Room::block`] bytes) and
/// its inodes, each in all, free, and free to an unprivileged writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Room {
    /// Blocks in all (`f_blocks`): 0 where the file system counts none.
    pub blocks: u64,
    /// Blocks free (`f_bfree`), those kept for the superuser among them.
    pub blocks_free: u64,
    /// Blocks free to an unprivileged writer (`f_bavail`).
    pub blocks_available: u64,
    /// The size of a block, in bytes (`f_frsize`).
    pub block: u64,
    /// Inodes in all (`f_files`): 0 where the file system counts none.
    pub files: u64,
    /// Inodes free (`f_ffree`).
    pub files_free: u64,
    /// Inodes free to an unprivileged writer (`f_favail`).
    pub files_available: u64,
}

impl Room {
    /// The room in the file system holding `dir`.
    pub fn of(dir: &Path) -> std::io::Result<Room> {
        let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
        #[allow(clippy::useless_conversion)] // the field types differ between platforms
        Ok(Room {
            blocks: u64::from(s.blocks()),
            blocks_free: u64::from(s.blocks_free()),
            blocks_available: u64::from(s.blocks_available()),
            block: u64::from(s.fragment_size()),
            files: u64::from(s.files()),
            files_free: u64::from(s.files_free()),
            files_available: u64::from(s.files_available()),
        })
    }

    /// Bytes an unprivileged writer may still use; `None` where the file system counts no
    /// blocks (`f_blocks` 0: a tmpfs mounted with `size=0`, some FUSE and virtual file
    /// systems), whose room is unbounded or not known, not nil. Read as 0 bytes, such a file
    /// system had the coordinator warn that it was running out of space every
    /// [`WARN_AGAIN`], for ever.
    pub fn available(&self) -> Option<u64> {
        (self.blocks > 0).then(|| self.blocks_available.saturating_mul(self.block))
    }

    /// Whether no block or no inode is left for a writer, the superuser of an ext2, ext3 or
    /// ext4 file system when `root` (the caller tells: `store::space`). Such a superuser may
    /// use the free blocks and inodes kept from others (`f_bfree` and `f_ffree`, not
    /// `f_bavail` and `f_favail`; ext4 keeps 5 % of its blocks so by default), but not what
    /// ext4 keeps from every writer, itself included, which `f_bfree` counts all the same
    /// (its reserved clusters: 2 % of the blocks or 4096 clusters, whichever is fewer): the
    /// superuser's room is what `f_bfree` says over 2 % of the blocks
    /// ([`EXT4_KEPT_FROM_ALL_PERCENT`]; read as its own, a full ext4 was never full to root).
    /// Only what the file system counts can run out: one that counts no inodes (0 of them, 0
    /// free: btrfs, vfat, a tmpfs with `nr_inodes=0`) or no blocks (see [`Room::available`])
    /// has none to run out of.
    pub fn exhausted(&self, root: bool) -> bool {
        let (blocks, files) = match root {
            true => {
                let kept = self.blocks.saturating_mul(EXT4_KEPT_FROM_ALL_PERCENT) / 100;
                (self.blocks_free.saturating_sub(kept), self.files_free)
            }
            false => (self.blocks_available, self.files_available),
        };
        (self.files > 0 && files == 0) || (self.blocks > 0 && blocks == 0)
    }
}

/// Bytes an unprivileged writer may still use in the file system holding `dir`; `None` where
/// it counts no blocks ([`Room::available`]).
pub fn available(dir: &Path) -> std::io::Result<Option<u64>> {
    Room::of(dir).map(|r| r.available())
}

/// What a look at the free space asks to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    /// Space is low: newly, or still, [`WARN_AGAIN`] after the last warning.
    Low,
    /// Space was low and is not any more.
    Recovered,
    /// The file system counts no blocks ([`Room::available`]): how much room it has is not
    /// known, and no warning comes. Said once, until it counts them again.
    Uncounted,
}

/// Whether space is low, and when that was last said.
#[derive(Debug, Default)]
pub struct Watch {
    warned: Option<Instant>,
    /// [`Say::Uncounted`] was said, and the file system has counted no blocks since.
    uncounted: bool,
}

impl Watch {
    /// Takes a look: `available` bytes at `now`.
    pub fn look(&mut self, available: u64, now: Instant) -> Option<Say> {
        self.uncounted = false;
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

    /// Takes a look at a file system that counts no blocks: nothing to warn of (a warning
    /// said before is over with no more said of it), and [`Say::Uncounted`] once.
    pub fn uncounted(&mut self) -> Option<Say> {
        self.warned = None;
        (!std::mem::replace(&mut self.uncounted, true)).then_some(Say::Uncounted)
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
/// until a read succeeds again (`failed`). So does a file system that counts no blocks
/// ([`Room::available`]), not the 0 that `statvfs` says of its free blocks, which would fire
/// an alert on it for ever; it is said once at `info`.
fn look(dir: &Path, w: &mut Watch, failed: &mut bool) {
    let gauge = metrics::gauge!(crate::metrics::DATA_DIR_AVAILABLE);
    match available(dir) {
        Ok(Some(bytes)) => {
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
                Some(Say::Uncounted) | None => {}
            }
        }
        Ok(None) => {
            *failed = false;
            gauge.set(f64::NAN);
            if w.uncounted().is_some() {
                tracing::info!(
                    data_dir = %dir.display(),
                    "the data directory's file system counts no blocks (a tmpfs without a size, say): its free space is not known, and no warning of low space comes"
                );
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

    /// A file system that counts no blocks (a tmpfs mounted with `size=0`, some FUSE file
    /// systems: `f_blocks` 0, and so 0 free) read as 0 bytes available, and the coordinator
    /// warned that the data directory was running out of space every 10 minutes, for ever.
    /// Its room is not known: no warning (a warning before is over), said once; nor is it
    /// taken for exhausted. Nor is one that counts no inodes.
    #[test]
    fn a_file_system_that_counts_no_blocks_is_not_low_on_space_nor_full() {
        let counted = Room {
            blocks: 1000,
            blocks_free: 10,
            blocks_available: 10,
            block: 4096,
            files: 100,
            files_free: 5,
            files_available: 5,
        };
        assert_eq!(counted.available(), Some(10 * 4096));
        assert!(!counted.exhausted(false));
        assert!(
            Room {
                blocks_available: 0,
                ..counted
            }
            .exhausted(false)
        );
        assert!(
            Room {
                files_available: 0,
                ..counted
            }
            .exhausted(false)
        );
        let no_blocks = Room {
            blocks: 0,
            blocks_free: 0,
            blocks_available: 0,
            ..counted
        };
        assert_eq!(no_blocks.available(), None, "not known, not 0");
        assert!(!no_blocks.exhausted(false));
        let no_inodes = Room {
            files: 0,
            files_free: 0,
            files_available: 0,
            ..counted
        };
        assert!(!no_inodes.exhausted(false));
        assert!(
            !Room {
                files: 0,
                ..no_blocks
            }
            .exhausted(false)
        );
        // As root too, with blocks to spare over the 2 % ext4 keeps from everyone.
        let no_inodes = Room {
            blocks_free: 100,
            blocks_available: 100,
            ..no_inodes
        };
        for root in [false, true] {
            assert!(!no_blocks.exhausted(root) && !no_inodes.exhausted(root));
        }

        let mut w = Watch::default();
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(w.look(0, t0), Some(Say::Low));
        assert_eq!(w.uncounted(), Some(Say::Uncounted), "said once");
        for _ in 0..(2 * WARN_AGAIN.as_secs() / CHECK_EVERY.as_secs()) {
            assert_eq!(w.uncounted(), None, "nothing more said, no warning");
        }
        assert_eq!(
            w.look(0, secs(1)),
            Some(Say::Low),
            "counted again, and low: said at once"
        );
        assert_eq!(w.uncounted(), Some(Say::Uncounted), "said again");
    }

    /// ext4 counts in `f_bfree` the clusters it keeps from every writer, the superuser too (2 %
    /// of its blocks, or 4096 clusters): full to root, it still says some free (4096 blocks of
    /// a 1,000,000, or 2 % of a small one). Those read as root's room, a full disk was not
    /// full to a coordinator running as root, and a database it could not open for want of
    /// room was refused instead of waited on.
    #[test]
    fn the_superuser_has_no_room_in_what_ext4_keeps_from_everyone() {
        let full = Room {
            blocks: 1_000_000,
            blocks_free: 4096,
            blocks_available: 0,
            block: 4096,
            files: 1000,
            files_free: 10,
            files_available: 10,
        };
        assert!(full.exhausted(true), "full to root");
        let small = Room {
            blocks: 10_000,
            blocks_free: 200,
            ..full
        };
        assert!(small.exhausted(true), "2 % kept");
        // Beyond what it keeps from everyone, the superuser's own reserve is room.
        let kept_for_root = Room {
            blocks_free: 50_000,
            ..full
        };
        assert!(kept_for_root.exhausted(false));
        assert!(!kept_for_root.exhausted(true));
    }

    /// On ext4 the superuser may still use the blocks (and inodes) kept from others: with
    /// none left for others but some free, the file system was taken for full for a
    /// coordinator running as root, and a database SQLite could not open for another reason
    /// was waited on for room instead of refused with its error.
    #[test]
    fn the_superuser_has_room_in_the_blocks_and_inodes_kept_for_it() {
        let room = Room {
            blocks: 1000,
            blocks_free: 50,
            blocks_available: 0,
            block: 4096,
            files: 100,
            files_free: 5,
            files_available: 5,
        };
        assert!(room.exhausted(false), "none for others");
        assert!(!room.exhausted(true), "the reserved blocks are root's");
        let inodes = Room {
            blocks_available: 10,
            files_free: 3,
            files_available: 0,
            ..room
        };
        assert!(inodes.exhausted(false));
        assert!(!inodes.exhausted(true));
        // None free at all: full for everyone.
        for root in [false, true] {
            let full = Room {
                blocks_free: 0,
                ..room
            };
            assert!(full.exhausted(root), "root {root}");
            let no_inode = Room {
                files_free: 0,
                files_available: 0,
                ..inodes
            };
            assert!(no_inode.exhausted(root), "root {root}");
        }
        // A tmpfs (as in the disk_full tests): free and available are the same.
        let tmpfs = Room {
            blocks_free: 0,
            blocks_available: 0,
            ..room
        };
        assert!(tmpfs.exhausted(false) && tmpfs.exhausted(true));
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
        assert!(available(dir.path()).expect("statvfs").expect("counted") > 0);
        assert!(available(&dir.path().join("missing")).is_err());
    }
}
