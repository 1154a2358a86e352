//! Free space in the data directory: a gauge, and a warning before the store runs out.
//!
//! A commit that fails for want of space waits for it (`store::space`): nothing is
//! acknowledged or taken meanwhile. The WAL alone may grow
//! to [`crate::store::WAL_RESTART_FRAMES`] pages before it starts over, so the warning comes
//! while there is still room for that and more.
//!
//! The room is the coordinator's own ([`Writer::of`]): the watcher's gauge and warning and the
//! store's reading of a failed open (`store::space`) count the same blocks: on ext2/3/4, those
//! kept for the superuser too where the kernel gives them to the coordinator
//! (`CAP_SYS_RESOURCE`, or the file system's `resuid` or `resgid`: [`Credentials::may_use`]).

use std::os::unix::fs::MetadataExt;
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

/// Where sysfs is mounted: ext4 says there what it keeps from every writer ([`Reserve::of`]).
pub const SYS: &str = "/sys";

/// The share of its blocks, in percent, taken for what ext4 keeps from every writer, the
/// superuser included, where its own count cannot be read ([`Room::kept_from_all`]). Its
/// reserved clusters (`s_resv_clusters`) are by default 2 % of its clusters or 4096 of them,
/// whichever is fewer: never more than 2 % of the blocks, whatever the cluster size.
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

/// Who writes, as a file system sees it: which of its free blocks and inodes are theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// A writer to whom the file system gives nothing of what it keeps from others: those
    /// free to an unprivileged writer (`f_bavail`, `f_favail`).
    Other,
    /// The superuser of an ext2, ext3 or ext4 file system: the free blocks and inodes
    /// (`f_bfree`, `f_ffree`; ext4 keeps 5 % of its blocks for it by default) but the `kept`
    /// blocks that ext4 keeps from every writer, itself included, and counts in `f_bfree` all
    /// the same ([`Room::kept_from_all`]; read as its own, a full ext4 was never full to root).
    Root {
        /// Blocks counted free that no writer may use.
        kept: u64,
    },
}

impl Writer {
    /// This process, writing in the file system holding `dir`, whose room is `room`:
    /// [`Writer::Root`] where the file system gives it the blocks it keeps for the superuser
    /// (an ext2, ext3 or ext4 whose reserve [`Credentials::may_use`], as read under [`PROC`]),
    /// with what ext4 keeps from everyone read under `sys` ([`SYS`]; a test gives a tree of its
    /// own), else [`Writer::Other`].
    pub fn of(dir: &Path, room: &Room, sys: &Path) -> Writer {
        Writer::of_in(dir, room, sys, Path::new(PROC))
    }

    /// [`Writer::of`], the writer's credentials and mounts read in `proc` (a process's
    /// directory in procfs: [`PROC`], this process's): `status`, `uid_map`, `gid_map`
    /// ([`Credentials::of`]) and `mountinfo` ([`Owners::of`]), at each call.
    pub fn of_in(dir: &Path, room: &Room, sys: &Path, proc: &Path) -> Writer {
        if !keeps_for_this_process(dir, proc) {
            return Writer::Other;
        }
        Writer::Root {
            kept: room.kept_from_all(Reserve::of(dir, sys)),
        }
    }
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

    /// The blocks and the inodes left to `who`.
    fn left(&self, who: Writer) -> (u64, u64) {
        match who {
            Writer::Other => (self.blocks_available, self.files_available),
            Writer::Root { kept } => (self.blocks_free.saturating_sub(kept), self.files_free),
        }
    }

    /// Bytes `who` may still use; `None` where the file system counts no blocks (`f_blocks`
    /// 0: a tmpfs mounted with `size=0`, some FUSE and virtual file systems), whose room is
    /// unbounded or not known, not nil. Read as 0 bytes, such a file system had the
    /// coordinator warn that it was running out of space every [`WARN_AGAIN`], for ever.
    pub fn available(&self, who: Writer) -> Option<u64> {
        (self.blocks > 0).then(|| self.left(who).0.saturating_mul(self.block))
    }

    /// Whether no block or no inode is left to `who`. Only what the file system counts can
    /// run out: one that counts no inodes (0 of them, 0 free: btrfs, vfat, a tmpfs with
    /// `nr_inodes=0`) or no blocks (see [`Room::available`]) has none to run out of.
    pub fn exhausted(&self, who: Writer) -> bool {
        let (blocks, files) = self.left(who);
        (self.files > 0 && files == 0) || (self.blocks > 0 && blocks == 0)
    }

    /// The blocks that ext4 keeps from every writer of this file system, the superuser too:
    /// its `reserve` where it was read ([`Reserve::of`]), else [`EXT4_KEPT_FROM_ALL_PERCENT`]
    /// of the blocks. That fallback is never less than ext4 keeps by default, whatever its
    /// cluster size, so that a disk full to root is still taken for full (an
    /// `SQLITE_CANTOPEN` there waited on for room, as since 95b74fd), at the cost of taking
    /// one with a little room for full too; it is more than ext4 keeps on any file system
    /// over 800 MiB (4096 clusters of 4 KiB), and more than an ext2 or ext3 mounted by its
    /// own driver keeps (none: those have no directory in `/sys/fs/ext4`).
    pub fn kept_from_all(&self, reserve: Option<Reserve>) -> u64 {
        match reserve {
            Some(r) => r.blocks(self.block),
            None => self.blocks.saturating_mul(EXT4_KEPT_FROM_ALL_PERCENT) / 100,
        }
    }
}

/// What ext4 keeps from every writer of a file system, as it says in sysfs: its reserved
/// clusters, `/sys/fs/ext4/<device>/reserved_clusters` (`s_resv_clusters`; its `statfs`
/// counts them in `f_bfree` and takes them out of `f_bavail`, and no allocation, the
/// superuser's included, may use them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserve {
    /// Clusters kept.
    pub clusters: u64,
    /// The size of a cluster, in bytes, at most: the block size but with `bigalloc`, where a
    /// cluster is 2^n blocks ([`cluster_bound`]).
    pub cluster: u64,
}

impl Reserve {
    /// The reserve of the file system holding `dir`, read under `sys` (sysfs's mount point:
    /// [`SYS`]): the device of `dir` (`st_dev`) names the file system's directory there
    /// ([`reserved_clusters`]), and the blocks charged to `dir` bound its cluster size. `None`
    /// where either cannot be read (no sysfs, not ext4, a directory charged nothing).
    pub fn of(dir: &Path, sys: &Path) -> Option<Reserve> {
        let meta = std::fs::metadata(dir).ok()?;
        Some(Reserve {
            clusters: reserved_clusters(sys, meta.dev())?,
            cluster: cluster_bound(meta.blocks())?,
        })
    }

    /// The clusters kept, in blocks of `block` bytes (`f_frsize`: ext4's block size).
    pub fn blocks(&self, block: u64) -> u64 {
        let per_cluster = (self.cluster / block.max(1)).max(1);
        self.clusters.saturating_mul(per_cluster)
    }
}

/// The clusters ext4 keeps from every writer of the file system on device `dev` (an
/// `st_dev`), as sysfs under `sys` says: `<sys>/dev/block/MAJOR:MINOR` is a link whose last
/// component is the device's name (`sda1`, `dm-0`, `loop3`), which ext4 names its directory
/// after (`<sys>/fs/ext4/<name>/reserved_clusters`, a count of clusters). `None` where any of
/// it is missing or not a count.
pub fn reserved_clusters(sys: &Path, dev: u64) -> Option<u64> {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let link = std::fs::read_link(sys.join(format!("dev/block/{major}:{minor}"))).ok()?;
    let name = link.file_name()?;
    let path = sys.join("fs/ext4").join(name).join("reserved_clusters");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The largest cluster size, in bytes, that a file charged `sectors` (`st_blocks`, 512 bytes
/// each) allows: ext4 charges whole clusters (blocks, but with `bigalloc`), so the bytes
/// charged are a multiple of its cluster size, a power of two. A directory of one block or
/// cluster, as the data directory is, gives the size itself; a larger one may give more (more
/// taken for kept: a disk with a little room taken for full, not the other way). `None` for
/// a file charged nothing (a directory kept in its inode, `inline_data`).
pub fn cluster_bound(sectors: u64) -> Option<u64> {
    let bytes = sectors.checked_mul(512).filter(|&b| b > 0)?;
    Some(1 << bytes.trailing_zeros())
}

/// Who this process is to ext2/3/4 when it allocates a block (`ext4_has_free_clusters`,
/// `ext2_has_free_blocks`): the blocks kept for the superuser are given to a process whose
/// fsuid is the file system's `resuid`, or which is in its `resgid` (but group 0), or which
/// holds `CAP_SYS_RESOURCE` in the first user namespace; its ids are compared as that
/// namespace knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The fsuid (the fourth of `Uid:`), mapped through `uid_map`; `None` where not mapped.
    pub fsuid: Option<u32>,
    /// The fsgid (the fourth of `Gid:`) and the supplementary groups (`Groups:`), mapped
    /// through `gid_map`; those not mapped left out.
    pub groups: Vec<u32>,
    /// `CAP_SYS_RESOURCE` is in the effective set (`CapEff`, bit [`CAP_SYS_RESOURCE`]) and the
    /// user namespace is the first (`uid_map` maps every id to itself, `0 0 4294967295`): held
    /// in a container's own user namespace, it gives nothing of the file system's.
    pub sys_resource: bool,
}

/// `CAP_SYS_RESOURCE`'s bit in the capability sets of `/proc/<pid>/status`.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// This process's directory in procfs: its credentials ([`Credentials::of`]) and mounts
/// ([`Owners::of`]) are read there.
pub const PROC: &str = "/proc/self";

impl Credentials {
    /// A process's, read in its procfs directory `proc` ([`PROC`]): `status`, `uid_map` and
    /// `gid_map` ([`Credentials::parse`]); what cannot be read gives nothing.
    pub fn of(proc: &Path) -> Credentials {
        let read = |name: &str| std::fs::read_to_string(proc.join(name));
        Credentials::parse(
            &read("status").unwrap_or_default(),
            &read("uid_map").unwrap_or_default(),
            &read("gid_map").unwrap_or_default(),
        )
    }

    /// From the text of `/proc/<pid>/status`, `uid_map` and `gid_map`. An id maps through the
    /// line of its map whose range holds it (`inside outside count`), to the parent user
    /// namespace's id: in a namespace nested in another one, not the first's, which this does
    /// not see (taken for the first's).
    pub fn parse(status: &str, uid_map: &str, gid_map: &str) -> Credentials {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .unwrap_or_default()
        };
        let fs_id = |name: &str| field(name).split_whitespace().nth(3)?.parse::<u32>().ok();
        let mut groups: Vec<u32> = fs_id("Gid")
            .into_iter()
            .chain(
                field("Groups")
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok()),
            )
            .filter_map(|g| map_id(gid_map, g))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        let cap_eff = u64::from_str_radix(field("CapEff").trim(), 16).unwrap_or(0);
        Credentials {
            fsuid: fs_id("Uid").and_then(|u| map_id(uid_map, u)),
            groups,
            sys_resource: cap_eff & (1 << CAP_SYS_RESOURCE) != 0 && first_namespace(uid_map),
        }
    }

    /// Whether a file system whose reserve is for `owners` (`None`: not known) gives it to
    /// these credentials: as the kernel decides, `resuid` is the fsuid, or `resgid` is not 0
    /// and one of the groups, or `CAP_SYS_RESOURCE` is held. Owners not known, only the
    /// capability counts: a process that the file system gives them but which is not counted
    /// so is told it has no room before it is so (it waits for room), where one counted so
    /// that is not given them takes an `SQLITE_CANTOPEN` on a disk full to it for another
    /// cause (refused with SQLite's error).
    pub fn may_use(&self, owners: Option<Owners>) -> bool {
        self.sys_resource
            || owners.is_some_and(|o| {
                self.fsuid == Some(o.resuid) || (o.resgid != 0 && self.groups.contains(&o.resgid))
            })
    }
}

/// `id` of a user namespace mapped as `map` says (`/proc/<pid>/uid_map` or `gid_map`: lines
/// of `inside outside count`) to its parent's; `None` where no line holds it.
fn map_id(map: &str, id: u32) -> Option<u32> {
    map.lines().find_map(|l| {
        let ids: Vec<u64> = l
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        let [inside, outside, count] = ids[..] else {
            return None;
        };
        let offset = u64::from(id).checked_sub(inside).filter(|&o| o < count)?;
        u32::try_from(outside + offset).ok()
    })
}

/// Whether `uid_map` is the first user namespace's: every id mapped to itself.
fn first_namespace(uid_map: &str) -> bool {
    let lines: Vec<Vec<&str>> = uid_map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|l: &Vec<&str>| !l.is_empty())
        .collect();
    matches!(lines.as_slice(), [only] if only.as_slice() == ["0", "0", "4294967295"])
}

/// Whom an ext2/3/4 gives the blocks it keeps for the superuser, besides the holders of
/// `CAP_SYS_RESOURCE`: its `resuid` and `resgid` (the mount's options, else the superblock's,
/// set by `tune2fs -u`/`-g`; 0 both by default, and so a process whose fsuid is the first
/// user namespace's 0 is given them without the capability).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owners {
    /// The user given them (`resuid`), as the first user namespace knows it.
    pub resuid: u32,
    /// The group given them (`resgid`; 0: none), as the first user namespace knows it.
    pub resgid: u32,
}

impl Owners {
    /// The owners of the file system on device `dev` (an `st_dev`), as `mountinfo` in a
    /// process's procfs directory `proc` ([`PROC`]) says ([`Owners::parse`]): the mounts of
    /// that process's mount namespace.
    pub fn of(proc: &Path, dev: u64) -> Option<Owners> {
        let mountinfo = std::fs::read_to_string(proc.join("mountinfo")).ok()?;
        Owners::parse(&mountinfo, dev)
    }

    /// From the text of `/proc/<pid>/mountinfo`: the super options of a mount of device `dev`
    /// (its third field `MAJOR:MINOR`). ext2, ext3 and ext4 list `resuid=` and `resgid=` there
    /// whenever either the mount's or the superblock's is not 0: one not listed is 0. `None`
    /// where no mount of `dev` is listed or an id is not a number.
    pub fn parse(mountinfo: &str, dev: u64) -> Option<Owners> {
        let dev = format!(
            "{}:{}",
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev)
        );
        let line = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(dev.as_str()))?;
        // After the optional fields, `-`, the type, the source, the super options.
        let mut after = line.split_whitespace().skip_while(|&f| f != "-").skip(3);
        let mut owners = Owners {
            resuid: 0,
            resgid: 0,
        };
        for option in after.next()?.split(',') {
            if let Some(uid) = option.strip_prefix("resuid=") {
                owners.resuid = uid.parse().ok()?;
            } else if let Some(gid) = option.strip_prefix("resgid=") {
                owners.resgid = gid.parse().ok()?;
            }
        }
        Some(owners)
    }
}

/// Whether the blocks that the file system holding `dir` keeps from others (`f_bfree` over
/// `f_bavail`) are the writer's ([`keeps_for`]), read in its procfs directory `proc`
/// ([`PROC`]).
fn keeps_for_this_process(dir: &Path, proc: &Path) -> bool {
    let Ok(fs) = nix::sys::statfs::statfs(dir) else {
        return false;
    };
    let owners = std::fs::metadata(dir)
        .ok()
        .and_then(|m| Owners::of(proc, m.dev()));
    keeps_for(fs.filesystem_type(), &Credentials::of(proc), owners)
}

/// Whether a process of credentials `who` may use what a file system of type `fs`, its
/// reserve for `owners`, keeps from others. Only ext2, ext3 and ext4 keep blocks for the
/// superuser (one magic number for the three): on btrfs `f_bfree` over `f_bavail` is room no
/// one may write (metadata's, RAID's), and read as root's a full btrfs was not full. And only
/// those the kernel gives them to ([`Credentials::may_use`]): not uid 0 in a rootless
/// container (another user to the file system), nor uid 0 without `CAP_SYS_RESOURCE` (a
/// Docker container's, by default) where `resuid` is another user; but a user that is the
/// `resuid`, root or not.
fn keeps_for(fs: nix::sys::statfs::FsType, who: &Credentials, owners: Option<Owners>) -> bool {
    fs == nix::sys::statfs::EXT4_SUPER_MAGIC && who.may_use(owners)
}

/// Bytes this process may still write in the file system holding `dir` ([`Writer::of`]);
/// `None` where it counts no blocks ([`Room::available`]).
pub fn available(dir: &Path) -> std::io::Result<Option<u64>> {
    Room::of(dir).map(|r| r.available(Writer::of(dir, &r, Path::new(SYS))))
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

/// One look at the free space: sets the gauge and says what `w` asks to. The bytes are this
/// process's ([`Writer::of`]), as the store's reading of a failed open counts them: on ext2/3/4,
/// where the kernel gives this process the blocks kept for the superuser, they are room (the
/// unprivileged count warned while root still had them), less what ext4 keeps from everyone. A
/// failed read (the
/// directory removed, its file system gone) sets the gauge to NaN, not to the last value
/// read, which would keep an alert on it quiet while nothing is known; it is said once
/// until a read succeeds again (`failed`). So does a file system that counts no blocks
/// ([`Room::available`]), not the 0 that `statvfs` says of its free blocks, which would fire
/// an alert on it for ever; it is said once at `info`.
fn look(dir: &Path, w: &mut Watch, failed: &mut bool) {
    look_as(dir, |room| Writer::of(dir, room, Path::new(SYS)), w, failed);
}

/// [`look`], the room counted being `who`'s.
fn look_as(dir: &Path, who: impl FnOnce(&Room) -> Writer, w: &mut Watch, failed: &mut bool) {
    let gauge = metrics::gauge!(crate::metrics::DATA_DIR_AVAILABLE);
    match Room::of(dir).map(|room| room.available(who(&room))) {
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

    /// A writer that is not the superuser.
    const USER: Writer = Writer::Other;
    /// The superuser of an ext4 of 1000 blocks: 2 % of them kept from everyone, as ext4 keeps
    /// by default on one so small.
    const ROOT: Writer = Writer::Root { kept: 20 };

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
        assert_eq!(counted.available(USER), Some(10 * 4096));
        assert!(!counted.exhausted(USER));
        assert!(
            Room {
                blocks_available: 0,
                ..counted
            }
            .exhausted(USER)
        );
        assert!(
            Room {
                files_available: 0,
                ..counted
            }
            .exhausted(USER)
        );
        let no_blocks = Room {
            blocks: 0,
            blocks_free: 0,
            blocks_available: 0,
            ..counted
        };
        assert_eq!(no_blocks.available(USER), None, "not known, not 0");
        assert!(!no_blocks.exhausted(USER));
        let no_inodes = Room {
            files: 0,
            files_free: 0,
            files_available: 0,
            ..counted
        };
        assert!(!no_inodes.exhausted(USER));
        assert!(
            !Room {
                files: 0,
                ..no_blocks
            }
            .exhausted(USER)
        );
        // As root too, with blocks to spare over the 2 % ext4 keeps from everyone.
        let no_inodes = Room {
            blocks_free: 100,
            blocks_available: 100,
            ..no_inodes
        };
        for root in [USER, ROOT] {
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
    /// of its clusters, or 4096 of them): full to root, it still says some free (4096 blocks
    /// of a 1,000,000, or 2 % of a small one). Those read as root's room, a full disk was not
    /// full to a coordinator running as root, and a database it could not open for want of
    /// room was refused instead of waited on. So it is, what ext4 says it keeps read or not.
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
        let of_4k = |clusters| Reserve {
            clusters,
            cluster: 4096,
        };
        let root = |room: &Room, reserve| Writer::Root {
            kept: room.kept_from_all(reserve),
        };
        for reserve in [Some(of_4k(4096)), None] {
            assert!(full.exhausted(root(&full, reserve)), "full to root");
        }
        let small = Room {
            blocks: 10_000,
            blocks_free: 200,
            ..full
        };
        for reserve in [Some(of_4k(200)), None] {
            assert!(small.exhausted(root(&small, reserve)), "2 % kept");
        }
        // Beyond what it keeps from everyone, the superuser's own reserve is room.
        let kept_for_root = Room {
            blocks_free: 50_000,
            ..full
        };
        assert!(kept_for_root.exhausted(USER));
        for reserve in [Some(of_4k(4096)), None] {
            assert!(!kept_for_root.exhausted(root(&kept_for_root, reserve)));
        }
    }

    /// On a large ext4, what it keeps from every writer is 4096 clusters (16 MiB of 4 KiB),
    /// not 2 % of it (20 GB of a 1 TB disk): read as 2 %, a disk with less than that free to
    /// root was taken for full, and a coordinator running as root waited for room on an
    /// `SQLITE_CANTOPEN` of another cause instead of exiting with SQLite's error, and warned
    /// of low space with gigabytes to spare. Read from sysfs, root's room is what `f_bfree`
    /// says over those clusters, in blocks (of 16 with `bigalloc`'s 64 KiB clusters).
    #[test]
    fn a_large_ext4_keeps_from_root_only_its_reserved_clusters() {
        let tb = Room {
            blocks: 268_435_456, // 1 TiB of 4 KiB
            blocks_free: 1_000_000,
            blocks_available: 0,
            block: 4096,
            files: 1000,
            files_free: 10,
            files_available: 10,
        };
        let reserve = Reserve {
            clusters: 4096,
            cluster: 4096,
        };
        let root = Writer::Root {
            kept: tb.kept_from_all(Some(reserve)),
        };
        assert_eq!(root, Writer::Root { kept: 4096 });
        assert!(!tb.exhausted(root), "under 2 % free, but room for root");
        assert_eq!(tb.available(root), Some((1_000_000 - 4096) * 4096));
        assert!(tb.exhausted(USER));
        // Full to root: only the reserved clusters are free.
        let full = Room {
            blocks_free: 4096,
            ..tb
        };
        assert!(full.exhausted(root));
        assert_eq!(full.available(root), Some(0));
        // bigalloc: 81 clusters of 64 KiB kept (2 % of a 1 GiB one's), 16 blocks each.
        let bigalloc = Reserve {
            clusters: 81,
            cluster: 65536,
        };
        assert_eq!(bigalloc.blocks(4096), 81 * 16);
        let full_bigalloc = Room {
            blocks_free: 81 * 16,
            ..tb
        };
        let root = Writer::Root {
            kept: tb.kept_from_all(Some(bigalloc)),
        };
        assert!(full_bigalloc.exhausted(root), "full to root");
        // Not read: 2 % of the blocks, as before (a disk with little room taken for full).
        let fallback = Writer::Root {
            kept: tb.kept_from_all(None),
        };
        assert_eq!(fallback, Writer::Root { kept: 5_368_709 });
        assert!(tb.exhausted(fallback));
    }

    /// The reserve is read from sysfs: the device's number names its directory
    /// (`dev/block/MAJ:MIN`, a link whose last component is the device's name), and
    /// `fs/ext4/<name>/reserved_clusters` says how many clusters are kept. Anything missing
    /// or not a count: not read.
    #[test]
    fn the_reserved_clusters_are_read_from_sysfs_through_the_device_name() {
        let sys = tempfile::tempdir().expect("tempdir");
        let sys = sys.path();
        let link = |dev: &str, to: &str| {
            std::fs::create_dir_all(sys.join("dev/block")).expect("mkdir");
            std::os::unix::fs::symlink(to, sys.join("dev/block").join(dev)).expect("symlink");
        };
        let ext4 = |name: &str, text: &str| {
            let dir = sys.join("fs/ext4").join(name);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("reserved_clusters"), text).expect("write");
        };
        let dev = nix::sys::stat::makedev;
        link("7:3", "../../devices/virtual/block/loop3");
        ext4("loop3", "1310\n");
        link(
            "259:5",
            "../../devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2",
        );
        ext4("nvme0n1p2", "4096\n");
        ext4("nvme0n1", "7\n");
        link("253:0", "../../devices/virtual/block/dm-0");
        ext4("dm-0", "many\n");
        link("8:1", "../../devices/pci0000:00/block/sda/sda1");
        assert_eq!(reserved_clusters(sys, dev(7, 3)), Some(1310));
        assert_eq!(
            reserved_clusters(sys, dev(259, 5)),
            Some(4096),
            "a partition: its own name, not its disk's"
        );
        assert_eq!(reserved_clusters(sys, dev(253, 0)), None, "not a count");
        assert_eq!(reserved_clusters(sys, dev(8, 1)), None, "not ext4's");
        assert_eq!(reserved_clusters(sys, dev(7, 4)), None, "no such device");
        assert_eq!(
            reserved_clusters(Path::new("/nonexistent-sys-of-tether"), dev(7, 3)),
            None,
            "no sysfs"
        );
    }

    /// The cluster size is not in sysfs; ext4 charges whole clusters to every file, so the
    /// bytes charged to the data directory bound it: exactly for one of a block or a cluster,
    /// from above (more kept, never less) for a larger one.
    #[test]
    fn the_cluster_size_is_bound_by_what_a_directory_is_charged() {
        assert_eq!(cluster_bound(8), Some(4096), "one 4 KiB block");
        assert_eq!(cluster_bound(2), Some(1024), "one 1 KiB block");
        assert_eq!(cluster_bound(128), Some(65536), "one 64 KiB cluster");
        assert_eq!(cluster_bound(3 * 8), Some(4096), "three 4 KiB blocks");
        assert_eq!(cluster_bound(2 * 8), Some(8192), "two: at most 8 KiB");
        assert_eq!(cluster_bound(0), None, "kept in its inode");
        let reserve = |cluster| Reserve {
            clusters: 100,
            cluster,
        };
        assert_eq!(reserve(4096).blocks(4096), 100);
        assert_eq!(reserve(1024).blocks(1024), 100);
        assert_eq!(reserve(65536).blocks(4096), 1600);
        assert_eq!(reserve(1024).blocks(4096), 100, "never under a block");
    }

    /// Through a real directory: its device's number leads to the fake tree's entry, and the
    /// blocks charged to it bound the cluster (a tmpfs charges a directory nothing: not read).
    #[test]
    fn the_reserve_of_a_real_directory_is_read_through_its_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = tempfile::tempdir().expect("tempdir");
        let meta = std::fs::metadata(dir.path()).expect("stat");
        let (major, minor) = (
            nix::sys::stat::major(meta.dev()),
            nix::sys::stat::minor(meta.dev()),
        );
        std::fs::create_dir_all(sys.path().join("dev/block")).expect("mkdir");
        std::os::unix::fs::symlink(
            "../../devices/virtual/block/tether-test0",
            sys.path().join(format!("dev/block/{major}:{minor}")),
        )
        .expect("symlink");
        let ext4 = sys.path().join("fs/ext4/tether-test0");
        std::fs::create_dir_all(&ext4).expect("mkdir");
        std::fs::write(ext4.join("reserved_clusters"), "77\n").expect("write");
        let read = Reserve::of(dir.path(), sys.path());
        match cluster_bound(meta.blocks()) {
            Some(cluster) => assert_eq!(
                read,
                Some(Reserve {
                    clusters: 77,
                    cluster
                })
            ),
            None => assert_eq!(read, None),
        }
        assert_eq!(Reserve::of(&dir.path().join("missing"), sys.path()), None);
    }

    /// The value of the free-space gauge as `handle` renders it (`NaN` where unknown).
    fn available_gauge(handle: &metrics_exporter_prometheus::PrometheusHandle) -> String {
        let text = handle.render();
        let line = text
            .lines()
            .find(|l| l.starts_with(crate::metrics::DATA_DIR_AVAILABLE))
            .expect("the gauge");
        line.rsplit(' ').next().expect("a value").to_owned()
    }

    /// The watcher counts the room as the store does, this process's: as root on ext4 the
    /// blocks kept for the superuser, less what ext4 keeps from everyone. It read the
    /// unprivileged count, and warned of low space (and showed it in the gauge) while root
    /// still had room; here root's room is nil where others have some, and it is that the
    /// gauge shows and the warning says.
    #[test]
    fn the_watcher_counts_the_room_of_the_writer_the_coordinator_is() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let dir = tempfile::tempdir().expect("tempdir");
        let gauge = || available_gauge(&handle).parse::<f64>().expect("a number");
        let (mut w, mut failed) = (Watch::default(), false);
        metrics::with_local_recorder(&recorder, || {
            look_as(dir.path(), |_| Writer::Other, &mut w, &mut failed)
        });
        assert!(gauge() > 0.0, "others have room");
        let mut asked = 0;
        let nil = |room: &Room| {
            asked += 1;
            Writer::Root {
                kept: room.blocks_free,
            }
        };
        metrics::with_local_recorder(&recorder, || look_as(dir.path(), nil, &mut w, &mut failed));
        assert_eq!(asked, 1, "the writer is asked for at each look");
        assert_eq!(gauge(), 0.0, "root's room shown");
        assert!(w.warned.is_some(), "low space said");
        assert!(!failed);
    }

    /// The writer of this process: the superuser's room only where the file system gives it
    /// to this process, then with what ext4 keeps read where it can be.
    #[test]
    fn this_process_is_root_only_where_the_file_system_keeps_room_for_it() {
        let dir = std::env::temp_dir();
        let room = Room::of(&dir).expect("statvfs");
        let sys = tempfile::tempdir().expect("tempdir");
        let proc = Path::new(PROC);
        match Writer::of(&dir, &room, sys.path()) {
            Writer::Other => assert!(!keeps_for_this_process(&dir, proc)),
            Writer::Root { kept } => {
                assert!(keeps_for_this_process(&dir, proc));
                assert_eq!(kept, room.kept_from_all(None), "no sysfs: 2 %");
            }
        }
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
        assert!(room.exhausted(USER), "none for others");
        assert!(!room.exhausted(ROOT), "the reserved blocks are root's");
        let inodes = Room {
            blocks_available: 10,
            files_free: 3,
            files_available: 0,
            ..room
        };
        assert!(inodes.exhausted(USER));
        assert!(!inodes.exhausted(ROOT));
        // None free at all: full for everyone.
        for root in [USER, ROOT] {
            let full = Room {
                blocks_free: 0,
                ..room
            };
            assert!(full.exhausted(root), "{root:?}");
            let no_inode = Room {
                files_free: 0,
                files_available: 0,
                ..inodes
            };
            assert!(no_inode.exhausted(root), "{root:?}");
        }
        // A tmpfs (as in the disk_full tests): free and available are the same.
        let tmpfs = Room {
            blocks_free: 0,
            blocks_available: 0,
            ..room
        };
        assert!(tmpfs.exhausted(USER) && tmpfs.exhausted(ROOT));
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
        let gauge = || available_gauge(&handle);
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

    /// This process's credentials are read from `/proc/self/status`: the fsuid (the fourth
    /// of `Uid:`), and `CAP_SYS_RESOURCE` in `CapEff`, counted only in the first user
    /// namespace.
    #[test]
    fn this_process_s_credentials_are_read_from_proc() {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .expect(name)
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let uid_map = std::fs::read_to_string("/proc/self/uid_map").expect("uid_map");
        let me = Credentials::of(Path::new(PROC));
        let fsuid: u32 = field("Uid:")[3].parse().expect("a uid");
        if first_namespace(&uid_map) {
            assert_eq!(me.fsuid, Some(fsuid));
        }
        let cap_eff = u64::from_str_radix(&field("CapEff:")[0], 16).expect("hex");
        assert_eq!(
            me.sys_resource,
            cap_eff & (1 << 24) != 0 && first_namespace(&uid_map),
            "{cap_eff:x}"
        );
        assert_eq!(
            Credentials::of(Path::new("/nonexistent-proc-of-tether")),
            Credentials::default(),
            "no procfs: nothing"
        );
    }

    /// A `/proc/<pid>/status` of a process of fsuid `uid`, fsgid `gid`, supplementary
    /// `groups` and effective capabilities `cap_eff`.
    fn status(uid: u32, gid: u32, groups: &str, cap_eff: &str) -> String {
        format!(
            "Name:\ttether\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{gid}\t{gid}\t{gid}\t{gid}\n\
             Groups:\t{groups}\nCapInh:\t0000000000000000\nCapPrm:\t{cap_eff}\n\
             CapEff:\t{cap_eff}\nCapBnd:\t{cap_eff}\n"
        )
    }
    /// The first user namespace's map.
    const FIRST: &str = "         0          0 4294967295\n";
    /// A rootless container's: uid 0 is 1000 outside.
    const ROOTLESS: &str = "         0       1000          1\n         1     100000      65536\n";
    /// Every capability, as root has them.
    const ALL_CAPS: &str = "000001ffffffffff";
    /// Every capability but `CAP_SYS_RESOURCE`: Docker's default set has more dropped, this
    /// one among them; this machine's root, too.
    const NO_SYS_RESOURCE: &str = "000001fffeffffff";
    /// An ext4's default owners: uid 0, no group.
    const DEFAULT_OWNERS: Owners = Owners {
        resuid: 0,
        resgid: 0,
    };

    /// The kernel gives the blocks kept for the superuser to a process holding
    /// `CAP_SYS_RESOURCE` in the first user namespace, whatever its uid and whoever the
    /// `resuid`; held in a rootless container's namespace, the capability gives nothing.
    #[test]
    fn cap_sys_resource_in_the_first_user_namespace_is_given_the_superusers_room() {
        let nobody_owns = Some(Owners {
            resuid: 65534,
            resgid: 65534,
        });
        let root = Credentials::parse(&status(0, 0, "0", ALL_CAPS), FIRST, FIRST);
        assert!(root.sys_resource);
        assert!(root.may_use(nobody_owns), "the capability");
        assert!(root.may_use(None), "owners not known");
        let capable_user = Credentials::parse(&status(1000, 1000, "", ALL_CAPS), FIRST, FIRST);
        assert!(capable_user.may_use(nobody_owns), "not root, but capable");
        let rootless = Credentials::parse(&status(0, 0, "", ALL_CAPS), ROOTLESS, ROOTLESS);
        assert!(!rootless.sys_resource, "its own namespace's capability");
        assert_eq!(rootless.fsuid, Some(1000), "uid 0 is 1000 outside");
        assert!(!rootless.may_use(nobody_owns));
        assert!(!rootless.may_use(Some(DEFAULT_OWNERS)), "not uid 0 outside");
        // A namespace mapping 0 to 0 but not all ids is not the first.
        let partial = "         0          0      65536\n";
        let partial = Credentials::parse(&status(0, 0, "", ALL_CAPS), partial, partial);
        assert!(!partial.sys_resource);
        assert!(
            partial.may_use(Some(DEFAULT_OWNERS)),
            "but its uid 0 is the resuid"
        );
    }

    /// Root without `CAP_SYS_RESOURCE` (in a Docker container by default, and this machine's
    /// root) is given the superuser's room only as the `resuid`: by default 0, so it is; but
    /// on an ext4 whose `resuid` is another user (this machine's root file system is mounted
    /// `resuid=65534`), it is not, and counting it a disk full to it was not full: an
    /// `SQLITE_CANTOPEN` there was refused with SQLite's error instead of waited on.
    #[test]
    fn root_without_cap_sys_resource_is_given_the_superusers_room_only_as_its_resuid() {
        let docker_root = Credentials::parse(&status(0, 0, "0", NO_SYS_RESOURCE), FIRST, FIRST);
        assert!(!docker_root.sys_resource);
        assert_eq!(docker_root.fsuid, Some(0));
        assert!(docker_root.may_use(Some(DEFAULT_OWNERS)), "resuid 0");
        let nobody_owns = Some(Owners {
            resuid: 65534,
            resgid: 65534,
        });
        assert!(!docker_root.may_use(nobody_owns), "resuid 65534");
        assert!(!docker_root.may_use(None), "owners not known: not counted");
        use nix::sys::statfs::EXT4_SUPER_MAGIC;
        assert!(!keeps_for(EXT4_SUPER_MAGIC, &docker_root, nobody_owns));
    }

    /// A user that is the file system's `resuid` (mounted `resuid=<uid>`, or `tune2fs -u`), or
    /// in its `resgid` (its fsgid or a supplementary group), is given the superuser's room,
    /// root or not; group 0 is no `resgid`. It was told there was no room while there was.
    #[test]
    fn the_resuid_and_the_resgid_are_given_the_superusers_room() {
        let owners = |resuid, resgid| Some(Owners { resuid, resgid });
        let user = Credentials::parse(&status(1000, 1000, "4 27 1000", "0"), FIRST, FIRST);
        assert_eq!(user.fsuid, Some(1000));
        assert_eq!(user.groups, vec![4, 27, 1000]);
        assert!(!user.sys_resource);
        assert!(user.may_use(owners(1000, 0)), "the resuid");
        assert!(
            user.may_use(owners(0, 27)),
            "a supplementary group the resgid"
        );
        assert!(user.may_use(owners(0, 1000)), "its fsgid the resgid");
        assert!(!user.may_use(owners(0, 0)), "not uid 0, no group");
        assert!(!user.may_use(owners(1001, 5)), "another's");
        assert!(!user.may_use(None), "owners not known");
        let in_root_group = Credentials::parse(&status(1000, 0, "0", "0"), FIRST, FIRST);
        assert!(!in_root_group.may_use(owners(0, 0)), "group 0 is none");
        // In a user namespace, ids are compared as the first one knows them.
        let mapped = "0 100000 65536\n";
        let inside = Credentials::parse(&status(1000, 1000, "", "0"), mapped, mapped);
        assert_eq!(inside.fsuid, Some(101_000));
        assert_eq!(inside.groups, vec![101_000]);
        assert!(inside.may_use(owners(101_000, 0)));
        assert!(
            !inside.may_use(owners(1000, 1000)),
            "inside's ids are not the file system's"
        );
        // Nothing read: nothing given.
        let nothing = Credentials::parse("", "", "");
        assert_eq!(nothing, Credentials::default());
        assert!(!nothing.may_use(Some(DEFAULT_OWNERS)));
    }

    /// The owners are read from the super options of a mount of the device in
    /// `/proc/self/mountinfo`, where ext2/3/4 lists them unless both are 0: an ext4 mounted
    /// `resuid=65534,resgid=65534` (as this machine's root), one of `tune2fs -u 1234`, and
    /// one of the defaults.
    #[test]
    fn the_owners_of_the_superusers_room_are_read_from_mountinfo() {
        let dev = nix::sys::stat::makedev;
        let mountinfo = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resuid=65534,resgid=65534
45 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw,discard,resuid=65534,resgid=65534
46 27 7:0 / /tmp/a\\040b rw,relatime shared:7 master:2 - ext4 /dev/loop0 rw,resuid=1234,resgid=1234
47 27 7:1 / /mnt/default rw,relatime - ext4 /dev/loop1 rw
48 27 7:2 / /mnt/bad rw,relatime - ext4 /dev/loop2 rw,resuid=many
49 27 0:30 / /tmp rw - tmpfs tmpfs rw,size=1024k
";
        let owners = |resuid, resgid| Some(Owners { resuid, resgid });
        assert_eq!(Owners::parse(mountinfo, dev(254, 0)), owners(65534, 65534));
        assert_eq!(
            Owners::parse(mountinfo, dev(7, 0)),
            owners(1234, 1234),
            "optional fields"
        );
        assert_eq!(
            Owners::parse(mountinfo, dev(7, 1)),
            owners(0, 0),
            "not listed: 0"
        );
        assert_eq!(Owners::parse(mountinfo, dev(7, 2)), None, "not a number");
        assert_eq!(Owners::parse(mountinfo, dev(0, 30)), owners(0, 0));
        assert_eq!(Owners::parse(mountinfo, dev(8, 1)), None, "not mounted");
        // Through a fake procfs, and none where it is missing.
        let proc = tempfile::tempdir().expect("tempdir");
        std::fs::write(proc.path().join("mountinfo"), mountinfo).expect("write");
        assert_eq!(Owners::of(proc.path(), dev(254, 0)), owners(65534, 65534));
        assert_eq!(
            Owners::of(Path::new("/nonexistent-proc-of-tether"), dev(254, 0)),
            None
        );
    }

    /// The blocks a file system keeps from others are a writer's only on ext2, ext3 and
    /// ext4, and only one the kernel gives them to: btrfs's are no one's (its `f_bfree` over
    /// `f_bavail` is metadata's), and uid 0 of a rootless container is another user to the
    /// file system. Taken for room, a disk full to such a root was not full, and a database
    /// it could not open for want of room was refused instead of waited on.
    #[test]
    fn only_ext4_keeps_room_for_the_superuser_of_the_first_user_namespace() {
        use nix::sys::statfs::{BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC};
        let first = Credentials::parse(&status(0, 0, "0", ALL_CAPS), FIRST, FIRST);
        let owners = Some(DEFAULT_OWNERS);
        assert!(keeps_for(EXT4_SUPER_MAGIC, &first, owners));
        assert!(!keeps_for(BTRFS_SUPER_MAGIC, &first, owners), "btrfs");
        assert!(!keeps_for(TMPFS_MAGIC, &first, owners), "tmpfs");
        let rootless = Credentials::parse(&status(0, 0, "0", ALL_CAPS), ROOTLESS, ROOTLESS);
        assert!(
            !keeps_for(EXT4_SUPER_MAGIC, &rootless, owners),
            "a rootless container"
        );
        let no_map = Credentials::parse(&status(0, 0, "0", ALL_CAPS), "", "");
        assert!(!keeps_for(EXT4_SUPER_MAGIC, &no_map, owners), "no map read");
        // This process: on the file system its directory is on, as its procfs says.
        let dir = std::env::temp_dir();
        let fs = nix::sys::statfs::statfs(&dir)
            .expect("statfs")
            .filesystem_type();
        let proc = Path::new(PROC);
        let dev = std::fs::metadata(&dir).expect("stat").dev();
        assert_eq!(
            keeps_for_this_process(&dir, proc),
            keeps_for(fs, &Credentials::of(proc), Owners::of(proc, dev))
        );
    }

    /// The writer is decided by the procfs given: a fake one's credentials and mounts.
    #[test]
    fn the_writer_is_decided_by_the_credentials_and_mounts_read_under_proc() {
        let dir = std::env::temp_dir();
        let room = Room::of(&dir).expect("statvfs");
        let ext4 = nix::sys::statfs::statfs(&dir)
            .expect("statfs")
            .filesystem_type()
            == nix::sys::statfs::EXT4_SUPER_MAGIC;
        let dev = std::fs::metadata(&dir).expect("stat").dev();
        let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        let sys = tempfile::tempdir().expect("tempdir");
        let proc = tempfile::tempdir().expect("tempdir");
        let fake = |status: &str, resuid: u32| {
            let me = proc.path();
            std::fs::write(me.join("status"), status).expect("write");
            std::fs::write(me.join("uid_map"), FIRST).expect("write");
            std::fs::write(me.join("gid_map"), FIRST).expect("write");
            let line = format!("1 0 {major}:{minor} / / rw - ext4 /dev/x rw,resuid={resuid}\n");
            std::fs::write(me.join("mountinfo"), line).expect("write");
            Writer::of_in(&dir, &room, sys.path(), proc.path())
        };
        let root = Writer::Root {
            kept: room.kept_from_all(None),
        };
        let docker_root = status(0, 0, "0", NO_SYS_RESOURCE);
        assert_eq!(fake(&docker_root, 65534), Writer::Other, "the Docker case");
        let resuid = status(1000, 1000, "", "0");
        let capable = status(0, 0, "0", ALL_CAPS);
        if ext4 {
            assert_eq!(fake(&docker_root, 0), root, "resuid 0");
            assert_eq!(fake(&resuid, 1000), root, "the resuid, not root");
            assert_eq!(fake(&capable, 65534), root, "the capability");
        } else {
            for (who, resuid) in [(&docker_root, 0), (&resuid, 1000), (&capable, 65534)] {
                assert_eq!(fake(who, resuid), Writer::Other, "not ext2/3/4");
            }
        }
    }
}
