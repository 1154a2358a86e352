//! TLS for the coordinator's one listener (`wss://` for workers, `https://` for the API): a
//! certificate chain and a private key from PEM files, served with rustls.
//!
//! The files are read again when they change (looked at, at most, every
//! [`RELOAD_CHECK`] at a handshake), so a renewed certificate is served without a restart
//! that would drop every worker's session. Only a regular file (or a link to one, as
//! cert-manager places them) is read: anything else in a file's place (a FIFO, a socket, a
//! device, a directory) is refused unread, at once, as a change that does not load is (a FIFO
//! nobody writes would hold its read for good), and so is a file larger than [`MAX_FILE_LEN`]
//! (a wrong path to a log or a disk image is not read into memory). Each different failure
//! to read the files is logged once, the same one seen again not again. The look runs on a
//! thread of its own, and no handshake waits for it: a file system that does not answer (a
//! hung network mount) leaves
//! the certificate in use served, where reading it on the handshake stopped every handshake
//! and a runtime thread with it. A look that has not returned when the next is due is warned
//! of (once) and left to its thread, and the next look starts beside it on a thread of its
//! own, so that once the files answer again (the mount back) the new certificate is served
//! without a restart. A read that never returns holds its thread (and the little it owns) for
//! the rest of the process: the thread is leaked, and at most [`MAX_HUNG_LOOKS`] looks run at
//! once; with that many hung, no other starts until one returns (warned of once). What that
//! leaves: a mount that never answers again holds [`MAX_HUNG_LOOKS`] threads and no look
//! starts again, so the certificate served stays until the process ends; a restart does not
//! help either (the files are read at start, and that read hangs as well). A look that
//! returns after a later one was taken is dropped: what it read is older. A change is served
//! from the handshakes that follow the look that read it. A certificate that is expired or
//! not valid yet is refused at start (every worker would refuse it, and stop after three
//! refusals) and never replaces the one served; one not valid yet is tried again at each
//! look, and served once it is valid (a renewal placed ahead of its start). The certificate served is warned of when it
//! expires within [`EXPIRY_WARNING`], and again every [`EXPIRY_REMINDER`] (every
//! [`EXPIRED_REMINDER`] once it has expired).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often, at most, a handshake starts a look whether the certificate or key file changed.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// The most a certificate file or a key file may hold, in bytes: a larger one is refused
/// unread (at start, and at a look, where the certificate served stays), so that a wrong path
/// to a log or a disk image is not read whole into memory at start and at each change. Far
/// beyond what real files weigh: a Let's Encrypt full chain is 4 to 6 KiB in PEM, a 4096-bit
/// RSA key about 3.3 KiB, a chain of five certificates with 4096-bit RSA keys under 15 KiB;
/// even a bundle of every root a distribution trusts (Debian's
/// `/etc/ssl/certs/ca-certificates.crt`, some 140 roots) is about 215 KiB.
pub const MAX_FILE_LEN: u64 = 1 << 20;

/// How many looks at the files may run at once: looks whose reads do not return (a hung
/// mount: each holds its thread, leaked while it hangs) and the one started beside them.
pub const MAX_HUNG_LOOKS: usize = 4;

/// A certificate that expires sooner than this is warned of, at start, at each reload, and
/// while it is served every [`EXPIRY_REMINDER`].
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// How often, at most, the certificate served is warned of again while it expires soon.
pub const EXPIRY_REMINDER: Duration = Duration::from_secs(24 * 3600);

/// How often, at most, the certificate served is warned of again once it has expired (every
/// worker refuses it).
pub const EXPIRED_REMINDER: Duration = Duration::from_secs(3600);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    /// Refused for now: it will be valid from `from`.
    #[error("TLS certificate file {path}: the certificate is not valid before {from}")]
    NotYetValid { path: PathBuf, from: String },
    #[error("TLS key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Config(#[from] rustls::Error),
}

/// A rustls server configuration from a PEM certificate chain and a PEM private key, which
/// serves the files' new contents once they change.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let files = CertFiles::load(cert, key, provider.clone(), RELOAD_CHECK)?;
    serving(Arc::new(files), provider)
}

/// Like [`server_config`], with a handle that has the files looked at now
/// ([`TlsFiles::look_now`]: on SIGHUP) rather than at the first handshake past
/// [`RELOAD_CHECK`].
pub fn server_config_with_files(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<rustls::ServerConfig>, TlsFiles), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let files = Arc::new(CertFiles::load(cert, key, provider.clone(), RELOAD_CHECK)?);
    Ok((serving(files.clone(), provider)?, TlsFiles(files)))
}

/// The certificate and key files a configuration of [`server_config_with_files`] serves.
#[derive(Debug, Clone)]
pub struct TlsFiles(Arc<CertFiles>);

impl TlsFiles {
    /// Starts a look at the files now, on a thread of its own, as a handshake starts one when
    /// due: what it finds is logged as the looks log it (a change served, or refused and the
    /// certificate in use kept), nothing when the files are unchanged. None starts while
    /// [`MAX_HUNG_LOOKS`] have not returned.
    pub fn look_now(&self) {
        {
            let mut schedule = self.0.schedule();
            let past = Instant::now().checked_sub(self.0.check_every);
            schedule.last = past.unwrap_or(schedule.last);
        }
        self.0.look_if_due();
    }

    /// The certificate file and the key file.
    pub fn paths(&self) -> (&Path, &Path) {
        (&self.0.cert, &self.0.key)
    }
}

/// A rustls server configuration that serves `files`.
fn serving(
    files: Arc<CertFiles>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Reloading(files)));
    // Workers reconnect after every network fault. With a session ticket a reconnecting worker
    // resumes its TLS session (a key exchange, no certificate and no signature); stateless
    // tickets, under keys that rotate in memory every 6 hours, serve any number of workers,
    // where rustls's default session cache remembers 256.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// The certificate served, read from its files and read again when they change.
#[derive(Debug)]
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    check_every: Duration,
    /// What handshakes serve. INVARIANT: written only to swap in a new certificate, so a
    /// handshake's read never waits on a file.
    served: RwLock<Arc<CertifiedKey>>,
    /// Held by a look once it has read the files (never across a read, which may hang) and
    /// never by a handshake.
    looked: Mutex<Looked>,
    /// When a look is due, and whether one runs: held by a handshake only to decide, never
    /// across a file read.
    schedule: Mutex<Schedule>,
    /// Holds looks after their read, as a hung mount holds them in it.
    #[cfg(test)]
    stall: tests::Stall,
}

/// When the files were last looked at, and the looks running.
#[derive(Debug)]
struct Schedule {
    /// When the last look started.
    last: Instant,
    /// The looks running on threads of their own, by number, with when each started, oldest
    /// first: the last is the one started last; those before it have not returned (hung). At
    /// most [`MAX_HUNG_LOOKS`].
    running: Vec<(u64, Instant)>,
    /// The number the next look takes (numbers grow in the order looks start).
    next: u64,
    /// The latest look warned of as not returning: each is warned of once.
    hang_warned: Option<u64>,
    /// [`MAX_HUNG_LOOKS`] looks run and no other starts: warned of (once, until one returns).
    full_warned: bool,
}

impl Schedule {
    /// A number for a look starting now.
    fn number(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

/// What the last look at the files found, and what is known of the certificate served.
#[derive(Debug)]
struct Looked {
    /// What the files held then: a change is read once, whether it loads or not, unless
    /// `retry`.
    stamp: Stamp,
    /// The number of that look: a look numbered before it read the files earlier (it hung),
    /// and what it read is dropped.
    look: u64,
    /// Those contents were refused only because their certificate is not valid yet: they are
    /// tried again at each look until they load or are refused for good.
    retry: bool,
    /// The end of the served certificate's validity, in Unix seconds.
    served_until: i64,
    /// When the served certificate's end was last warned of, and how near it was then.
    expiry_warned: Option<(Instant, Expiry)>,
}

/// What a look at the files did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Too soon after the last look, or the files are as they were.
    Unchanged,
    /// Their new contents are served.
    Served,
    /// A file could not be read, or their new contents cannot be served (logged once, saying
    /// which, and not tried again).
    Refused,
    /// Their certificate is not valid yet: tried again at the next look.
    NotYetValid,
    /// A look started later was taken first: this one's read (older) is dropped.
    Outrun,
}

/// How near the end of its validity a certificate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// Further than [`EXPIRY_WARNING`].
    Far,
    /// Within [`EXPIRY_WARNING`].
    Soon,
    Expired,
}

impl Expiry {
    fn of(until: i64, now: SystemTime) -> Self {
        let left = until - unix_secs(now);
        if left < 0 {
            Expiry::Expired
        } else if (left as u64) < EXPIRY_WARNING.as_secs() {
            Expiry::Soon
        } else {
            Expiry::Far
        }
    }

    /// Warns of a certificate valid `until` (Unix seconds) that expires soon or has expired.
    fn warn(self, until: i64, now: SystemTime) {
        let expires = chrono::DateTime::from_timestamp(until, 0)
            .map_or_else(|| until.to_string(), |t| t.to_rfc3339());
        match self {
            Expiry::Far => {}
            Expiry::Soon => {
                let days_left = (until - unix_secs(now)) / 86_400;
                tracing::warn!(%expires, days_left, "the TLS certificate expires soon: replace its file (the coordinator serves the new one without a restart)");
            }
            Expiry::Expired => {
                tracing::error!(%expires, "the TLS certificate served has expired: workers refuse it; replace its file (the coordinator serves the new one without a restart)");
            }
        }
    }
}

impl Looked {
    /// How near its end the served certificate is at `now`, when that is to be warned of
    /// (at `at`): the first time it is near, when it comes nearer, and then every
    /// [`EXPIRY_REMINDER`] ([`EXPIRED_REMINDER`] once expired).
    fn expiry_due(&mut self, now: SystemTime, at: Instant) -> Option<Expiry> {
        let expiry = Expiry::of(self.served_until, now);
        let every = match expiry {
            Expiry::Far => return None,
            Expiry::Soon => EXPIRY_REMINDER,
            Expiry::Expired => EXPIRED_REMINDER,
        };
        let due = self
            .expiry_warned
            .is_none_or(|(last, was)| was != expiry || at.saturating_duration_since(last) >= every);
        if !due {
            return None;
        }
        self.expiry_warned = Some((at, expiry));
        Some(expiry)
    }
}

/// What tells the files changed: a digest of their contents (a modification time is only as
/// fine as the kernel's clock tick, and a renewed certificate often has the size of the old
/// one), or which file could not be read and why, so that another failure (a FIFO, then the
/// file gone) is a change, logged, and the same one seen again is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    /// A digest of both files' contents.
    Read([u8; 32]),
    /// The certificate file (`cert`), else the key file, could not be read.
    Unread { cert: bool, why: Unread },
}

/// Why a file was not read: what tells one failure from another. Not its message, which may
/// hold a size that changes at each look (a log growing in the file's place would be logged
/// at each one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unread {
    /// The system's error: its number where it has one (a file missing, permission denied).
    Io(std::io::ErrorKind, Option<i32>),
    /// Not a regular file but this (a FIFO, a directory, ...).
    NotRegular(&'static str),
    /// Larger than [`MAX_FILE_LEN`].
    TooLarge,
}

impl Unread {
    fn io(e: &std::io::Error) -> (Self, String) {
        (Unread::Io(e.kind(), e.raw_os_error()), e.to_string())
    }
}

/// The certificate file's and the key file's contents, read together.
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// Why the files could not be read: the error, and its [`Stamp`].
struct ReadFailed {
    error: TlsError,
    stamp: Stamp,
}

impl From<ReadFailed> for TlsError {
    fn from(failed: ReadFailed) -> Self {
        failed.error
    }
}

impl Contents {
    fn read(cert: &Path, key: &Path) -> Result<Self, ReadFailed> {
        let failed = |cert: bool, path: &Path| {
            let path = path.to_owned();
            move |(why, reason): (Unread, String)| ReadFailed {
                error: if cert {
                    TlsError::Cert { path, reason }
                } else {
                    TlsError::Key { path, reason }
                },
                stamp: Stamp::Unread { cert, why },
            }
        };
        let cert = read_regular(cert).map_err(failed(true, cert))?;
        let key = read_regular(key).map_err(failed(false, key))?;
        Ok(Self { cert, key })
    }

    fn stamp(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update((self.cert.len() as u64).to_le_bytes());
        h.update(&self.cert);
        h.update(&self.key);
        h.finalize().into()
    }
}

/// The contents of `path` if it is a regular file (links followed: cert-manager and the like
/// place a link to the renewed file), or why not. Anything else is refused unread, at once:
/// the read of a FIFO waits for a writer that may never come, a device may never end, and
/// neither is a certificate. A file larger than [`MAX_FILE_LEN`] is refused as well: by its
/// size before it is read, and while it is read should it grow after that.
fn read_regular(path: &Path) -> Result<Vec<u8>, (Unread, String)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // The metadata of a FIFO or a device comes at once, where opening one may wait (a FIFO
    // for a writer) or do something (a tape rewinds).
    let kind = std::fs::metadata(path)
        .map_err(|e| Unread::io(&e))?
        .file_type();
    if !kind.is_file() {
        return Err(not_regular(kind));
    }
    // Opened without waiting, and checked again once open: a FIFO put in the file's place
    // after the check is found then, not waited on in the open or the read. On Linux
    // O_NONBLOCK changes nothing for a regular file: its reads wait for the disk as they
    // would without it (open(2)), so the file is read as before.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Unread::io(&e))?;
    let meta = file.metadata().map_err(|e| Unread::io(&e))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(meta.file_type()));
    }
    if meta.len() > MAX_FILE_LEN {
        let reason = format!(
            "{} bytes, more than the {MAX_FILE_LEN} (1 MiB) a certificate chain or key may hold \
             (a wrong path?): not read",
            meta.len()
        );
        return Err((Unread::TooLarge, reason));
    }
    read_bounded(&mut file)
}

/// All `from` holds, if that is at most [`MAX_FILE_LEN`] bytes: no more than one byte past
/// that is read (a file may grow after its size was checked).
fn read_bounded(from: &mut impl std::io::Read) -> Result<Vec<u8>, (Unread, String)> {
    use std::io::Read as _;
    let mut contents = Vec::new();
    from.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut contents)
        .map_err(|e| Unread::io(&e))?;
    if contents.len() as u64 > MAX_FILE_LEN {
        let reason = format!(
            "more than {MAX_FILE_LEN} bytes (1 MiB), the most a certificate chain or key may \
             hold, once read (it grew after its size was checked): refused"
        );
        return Err((Unread::TooLarge, reason));
    }
    Ok(contents)
}

/// Why a file of type `kind` (not a regular file) is not read.
fn not_regular(kind: std::fs::FileType) -> (Unread, String) {
    use std::os::unix::fs::FileTypeExt as _;
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "of another type"
    };
    let reason = format!("not a regular file but {what} (links followed): not read");
    (Unread::NotRegular(what), reason)
}

impl CertFiles {
    fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<CryptoProvider>,
        check_every: Duration,
    ) -> Result<Self, TlsError> {
        let contents = Contents::read(cert, key)?;
        let now = SystemTime::now();
        let (served, until) = certified_key((cert, key), &contents, &provider, now)?;
        let mut looked = Looked {
            stamp: Stamp::Read(contents.stamp()),
            look: 0,
            retry: false,
            served_until: until,
            expiry_warned: None,
        };
        if let Some(expiry) = looked.expiry_due(now, Instant::now()) {
            expiry.warn(until, now);
        }
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            check_every,
            served: RwLock::new(Arc::new(served)),
            looked: Mutex::new(looked),
            schedule: Mutex::new(Schedule {
                last: Instant::now(),
                running: Vec::new(),
                next: 0,
                hang_warned: None,
                full_warned: false,
            }),
            #[cfg(test)]
            stall: tests::Stall::default(),
        })
    }

    /// The certificate handshakes serve now.
    fn served(&self) -> Arc<CertifiedKey> {
        self.served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a look at the files ([`CertFiles::look`]) on a thread of its own when one is
    /// due: `check_every` after the last one started. Never waits: not for a look, nor for
    /// another handshake deciding. A look due while the last one still runs (its file system
    /// does not answer, a hung mount; a FIFO or a device is refused at once, unread, and
    /// hangs no look) warns of that one as hung (once for each) and starts beside it, unless
    /// [`MAX_HUNG_LOOKS`] run: then none starts until one returns (warned of once), and the
    /// first handshake after that starts one (the last start is long past). Nothing better is
    /// at hand there: a blocked read cannot be taken back from its thread, and more threads
    /// would hang on the same mount, so a mount that never answers again holds
    /// [`MAX_HUNG_LOOKS`] threads and no look starts again (the certificate served stays; a
    /// restart, which reads the files at start, would hang there as well).
    ///
    /// A std thread, not the runtime's blocking pool: a read that never returns must not hold
    /// the runtime's shutdown, which waits for its blocking tasks. Such a thread is leaked.
    fn look_if_due(self: &Arc<Self>) {
        let mut schedule = match self.schedule.try_lock() {
            Ok(s) => s,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // Another handshake is deciding (a few instructions): it starts the look if due.
            Err(TryLockError::WouldBlock) => return,
        };
        let now = Instant::now();
        if now.saturating_duration_since(schedule.last) < self.check_every {
            return;
        }
        if schedule.running.len() >= MAX_HUNG_LOOKS {
            let warn = !std::mem::replace(&mut schedule.full_warned, true);
            drop(schedule);
            if warn {
                tracing::warn!(cert = %self.cert.display(), key = %self.key.display(), hung = MAX_HUNG_LOOKS, "reads of the TLS certificate and key files have not returned: the previous certificate is served still, and no other read starts until one returns");
            }
            return;
        }
        // The last look started `check_every` ago or more and has not returned: hung.
        let hung = schedule
            .running
            .last()
            .copied()
            .filter(|(n, _)| schedule.hang_warned.is_none_or(|w| w < *n));
        if let Some((n, _)) = hung {
            schedule.hang_warned = Some(n);
        }
        let number = schedule.number();
        schedule.last = now;
        schedule.running.push((number, now));
        drop(schedule);
        if let Some((_, started)) = hung {
            tracing::warn!(cert = %self.cert.display(), key = %self.key.display(), waited_s = now.saturating_duration_since(started).as_secs(), "reading the TLS certificate and key files has not returned (a hung mount?): the previous certificate is served still; the read is left to its thread and the files are read again beside it");
        }
        let files = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("tls-reload".into())
            .spawn(move || {
                let _ended = LookEnded(&files, number);
                files.look(number);
            });
        if let Err(e) = spawned {
            self.schedule().running.retain(|(n, _)| *n != number);
            tracing::error!(error = %e, "cannot start a thread to look at the TLS certificate and key files: the certificate served stays; tried again at a later handshake");
        }
    }

    /// A look at the files now, on this thread (see [`CertFiles::look`]).
    #[cfg(test)]
    fn reload_if_changed(&self) -> Look {
        let number = self.schedule().number();
        self.look(number)
    }

    /// Look number `number`: reads the files again if they changed since they were last
    /// looked at (on the thread [`CertFiles::look_if_due`] starts). What a look read is
    /// dropped when a look started after it was taken first (it hung, and read older files). A change that does not load (a half-written file,
    /// a key that does not match, a certificate expired) or a file that cannot be read (gone,
    /// not a regular file, too large) is logged once, saying which ([`Refusal::message`]), and
    /// the certificate served stays; one whose certificate is not valid yet is logged once and
    /// tried again at each look, until it loads or is refused for good. Warns of the served
    /// certificate's expiry, as often as [`Looked::expiry_due`] says.
    fn look(&self, number: u64) -> Look {
        // Read outside the lock: a read that hangs must not hold the looks after it.
        let contents = Contents::read(&self.cert, &self.key);
        #[cfg(test)]
        self.stall.hold(number);
        // Under the lock from here: one look decides at a time (never a handshake, which only
        // starts one), and a load (a parse, a key check) only follows a change.
        let mut looked = self.looked.lock().unwrap_or_else(|p| p.into_inner());
        if number < looked.look {
            return Look::Outrun;
        }
        looked.look = number;
        let now = SystemTime::now();
        let stamp = match &contents {
            Ok(contents) => Stamp::Read(contents.stamp()),
            Err(failed) => failed.stamp,
        };
        let retrying = stamp == looked.stamp;
        if retrying && !looked.retry {
            if let Some(expiry) = looked.expiry_due(now, Instant::now()) {
                expiry.warn(looked.served_until, now);
            }
            return Look::Unchanged;
        }
        looked.stamp = stamp;
        looked.retry = false;
        let paths = (self.cert.as_path(), self.key.as_path());
        match loaded(paths, contents, &self.provider, now) {
            Ok((new, until)) => {
                *self.served.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
                tracing::info!(cert = %self.cert.display(), key = %self.key.display(), "TLS certificate changed on disk: serving the new one");
                looked.served_until = until;
                looked.expiry_warned = None;
                if let Some(expiry) = looked.expiry_due(now, Instant::now()) {
                    expiry.warn(until, now);
                }
                Look::Served
            }
            Err(Refusal::Unloadable(e @ TlsError::NotYetValid { .. })) => {
                looked.retry = true;
                if !retrying {
                    tracing::warn!(error = %e, "TLS certificate changed on disk but is not valid yet: it will be served once it is; the previous certificate is served until then");
                }
                Look::NotYetValid
            }
            Err(refused) => {
                tracing::error!(cert = %self.cert.display(), key = %self.key.display(), "{}", refused.message());
                Look::Refused
            }
        }
    }
}

/// Why a look does not serve what it found in the files.
#[derive(Debug)]
enum Refusal {
    /// A file could not be read: missing, not a regular file, too large, permission denied.
    Unread(TlsError),
    /// The files were read, and what they hold does not load: a half-written file, a key that
    /// does not match, a certificate expired (or not valid yet).
    Unloadable(TlsError),
}

impl Refusal {
    /// The line a look logs (once for each different failure, [`Stamp`]): a file that could
    /// not be read is said to be so, by its path and why (an operator looks at the file, its
    /// path or its permissions); what was read and does not load cannot be served (an operator
    /// looks at what the file holds).
    fn message(&self) -> String {
        const KEPT: &str = "the previous certificate is served still";
        match self {
            Refusal::Unread(TlsError::Cert { path, reason }) => format!(
                "TLS certificate file {} could not be read: {reason}; {KEPT}",
                path.display()
            ),
            Refusal::Unread(TlsError::Key { path, reason }) => format!(
                "TLS key file {} could not be read: {reason}; {KEPT}",
                path.display()
            ),
            Refusal::Unread(e) => {
                format!("TLS certificate or key file could not be read: {e}; {KEPT}")
            }
            Refusal::Unloadable(e) => {
                format!("TLS certificate or key changed on disk but cannot be served: {e}; {KEPT}")
            }
        }
    }
}

/// The certificate and key that `contents`, as a look read them from the files `paths`,
/// hold, with the end of the certificate's validity (see [`certified_key`]); or why not.
fn loaded(
    paths: (&Path, &Path),
    contents: Result<Contents, ReadFailed>,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<(CertifiedKey, i64), Refusal> {
    let contents = contents.map_err(|failed| Refusal::Unread(failed.error))?;
    certified_key(paths, &contents, provider, now).map_err(Refusal::Unloadable)
}

/// Marks look number `.1` as ended when its thread ends (a panic included), so that it no
/// longer counts among those running.
struct LookEnded<'a>(&'a CertFiles, u64);

impl Drop for LookEnded<'_> {
    fn drop(&mut self) {
        let mut schedule = self.0.schedule();
        let at = schedule.running.iter().position(|(n, _)| *n == self.1);
        let started = at.map(|at| schedule.running.remove(at).1);
        schedule.full_warned = false;
        let warned = schedule.hang_warned.is_some_and(|w| w >= self.1);
        drop(schedule);
        if warned {
            let took_s = started.map_or(0, |s| s.elapsed().as_secs());
            tracing::info!(
                took_s,
                "a read of the TLS certificate and key files returned at last"
            );
        }
    }
}

/// What handshakes ask for a certificate: the one served now, at once; a look at the files
/// is started beside it when one is due.
#[derive(Debug)]
struct Reloading(Arc<CertFiles>);

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.look_if_due();
        Some(self.0.served())
    }
}

/// The chain and the key of `contents` (read from the files `cert` and `key`), checked to
/// match and the certificate to be valid at `now`, with the end of its validity (Unix
/// seconds).
fn certified_key(
    (cert, key): (&Path, &Path),
    contents: &Contents,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<(CertifiedKey, i64), TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: cert.to_owned(),
        reason,
    };
    let key_error = |reason: String| TlsError::Key {
        path: key.to_owned(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    let Some(leaf) = certs.first() else {
        return Err(cert_error("no certificate in it".into()));
    };
    let until = check_validity(leaf, now).map_err(|e| match e {
        Invalid::NotYet(from) => TlsError::NotYetValid {
            path: cert.to_owned(),
            from,
        },
        Invalid::Other(reason) => cert_error(reason),
    })?;
    let der = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => key_error(
            "no private key in it (PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE \
             KEY\", unencrypted)"
                .into(),
        ),
        e => key_error(e.to_string()),
    })?;
    let served = CertifiedKey::from_der(certs, der, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => key_error(format!(
            "not the key of the certificate in {}",
            cert.display()
        )),
        e => key_error(e.to_string()),
    })?;
    Ok((served, until))
}

/// Why a certificate is not valid now.
enum Invalid {
    /// Not yet: valid from this time on.
    NotYet(String),
    /// Expired, or unreadable.
    Other(String),
}

/// The end of the end-entity certificate's validity (Unix seconds), if it is valid at `now`:
/// workers refuse one that is not, and one refused three times in a row stops a worker.
fn check_validity(leaf: &CertificateDer<'_>, now: SystemTime) -> Result<i64, Invalid> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| Invalid::Other(format!("the certificate cannot be read: {e}")))?;
    let validity = parsed.validity();
    let now_s = unix_secs(now);
    let (from, until) = (validity.not_before, validity.not_after);
    if now_s < from.timestamp() {
        return Err(Invalid::NotYet(from.to_string()));
    }
    if now_s > until.timestamp() {
        return Err(Invalid::Other(format!(
            "the certificate expired on {until}: workers would refuse it"
        )));
    }
    Ok(until.timestamp())
}

/// `t` in whole seconds since the Unix epoch (0 before it).
fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    /// A self-signed certificate for localhost valid from `from` to `until` days from now,
    /// written with its key into `dir` as cert.pem and key.pem.
    fn write_cert(dir: &Path, from: i64, until: i64) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        let day = |d: i64| {
            let t = chrono::Utc::now() + chrono::Duration::days(d);
            use chrono::Datelike;
            rcgen::date_time_ymd(t.year(), t.month() as u8, t.day() as u8)
        };
        params.not_before = day(from);
        params.not_after = day(until);
        let cert = params.self_signed(&key).expect("sign");
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn an_expired_or_not_yet_valid_certificate_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -30, -1);
        let e = server_config(&c, &k).expect_err("expired").to_string();
        assert!(e.contains("expired on"), "{e}");
        let (c, k) = write_cert(dir.path(), 2, 30);
        let e = server_config(&c, &k)
            .expect_err("not yet valid")
            .to_string();
        assert!(e.contains("not valid before"), "{e}");
        let (c, k) = write_cert(dir.path(), -1, 30);
        server_config(&c, &k).expect("valid");
    }

    #[test]
    fn a_key_file_without_a_key_or_with_another_key_is_named_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, _) = write_cert(dir.path(), -1, 30);
        let e = server_config(&c, &c).expect_err("no key").to_string();
        assert!(e.contains("no private key in it"), "{e}");
        let other = dir.path().join("other");
        std::fs::create_dir(&other).expect("dir");
        let (_, k) = write_cert(&other, -1, 30);
        let e = server_config(&c, &k).expect_err("another key").to_string();
        assert!(e.contains("not the key of the certificate"), "{e}");
    }

    /// The certificate `files` serve after a look at them.
    fn served_by(files: &CertFiles) -> CertificateDer<'static> {
        files.reload_if_changed();
        files.served.read().expect("served").cert[0].clone()
    }

    /// The certificate a client trusting `roots` (certificates for localhost) is served in a
    /// handshake with `config` over a real socket, or why the handshake failed: one that does
    /// not finish within 5 s fails.
    fn handshake(
        config: &Arc<rustls::ServerConfig>,
        roots: &[CertificateDer<'static>],
    ) -> Result<CertificateDer<'static>, String> {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = Arc::clone(config);
        // Detached: a server stuck in its handshake must not hold the test that reports it.
        std::thread::spawn(move || -> Result<(), String> {
            let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            store.add(root.clone()).expect("root");
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(store)
            .with_no_client_auth();
        let name = "localhost".try_into().expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(client), name).expect("client");
        let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let bound = Some(Duration::from_secs(5));
        sock.set_read_timeout(bound).expect("timeout");
        sock.set_write_timeout(bound).expect("timeout");
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .map_err(|e| format!("handshake: {e}"))?;
        }
        conn.peer_certificates()
            .and_then(|c| c.first())
            .cloned()
            .ok_or_else(|| "no certificate".into())
    }

    /// `fifo` opened for writing without waiting: only while a reader has it open or waits in
    /// its open.
    fn writer_of(fifo: &Path) -> Option<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(fifo)
            .ok()
    }

    /// Opens its FIFO for writing and closes it when dropped (at the test's end, or a
    /// panic): a reader waiting in it reads an end of file, and its thread ends.
    struct Unblock(PathBuf);

    impl Drop for Unblock {
        fn drop(&mut self) {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_fifo()) {
                drop(writer_of(&self.0));
            }
        }
    }

    /// Holds the looks numbered from the one after `let_go` up to `to` after their read, until
    /// they are let go, as a file system that does not answer holds them in it (at most a
    /// minute, so that no test leaves a thread for good).
    #[derive(Debug, Default)]
    pub(super) struct Stall {
        held: Mutex<Held>,
        changed: std::sync::Condvar,
    }

    #[derive(Debug, Default)]
    struct Held {
        let_go: u64,
        to: u64,
        /// How many looks wait now.
        waiting: usize,
    }

    impl Held {
        fn holds(&self, number: u64) -> bool {
            self.let_go < number && number <= self.to
        }
    }

    impl Stall {
        fn held(&self) -> MutexGuard<'_, Held> {
            self.held.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Look `number` waits here while it is held.
        pub(super) fn hold(&self, number: u64) {
            let mut held = self.held();
            if !held.holds(number) {
                return;
            }
            held.waiting += 1;
            self.changed.notify_all();
            let (mut held, _) = self
                .changed
                .wait_timeout_while(held, Duration::from_secs(60), |h| h.holds(number))
                .unwrap_or_else(|p| p.into_inner());
            held.waiting -= 1;
            self.changed.notify_all();
        }

        /// Holds the looks numbered up to `to`.
        fn hold_up_to(&self, to: u64) {
            self.held().to = to;
        }

        /// Lets the looks numbered up to `to` go on.
        fn let_go(&self, to: u64) {
            self.held().let_go = to;
            self.changed.notify_all();
        }

        /// Waits (at most 10 s) until `n` looks are held.
        fn wait_holding(&self, n: usize) {
            let held = self.held();
            let (held, _) = self
                .changed
                .wait_timeout_while(held, Duration::from_secs(10), |h| h.waiting < n)
                .unwrap_or_else(|p| p.into_inner());
            assert_eq!(held.waiting, n, "looks held");
        }
    }

    /// What `f` returns, on a thread of its own: one that has not returned within 10 s (a read
    /// that waits in a FIFO) fails the test, where it would hang it.
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(Duration::from_secs(10))
            .expect("returned within 10 s")
    }

    /// Only a regular file, or a link to one, is read: a FIFO, a directory, a socket or a
    /// device in a file's place is refused at start, at once and unread, and named so.
    #[test]
    fn a_file_that_is_no_regular_file_is_refused_unread_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -1, 30);
        let refused = |cert: &Path, key: &Path| {
            let (cert, key) = (cert.to_owned(), key.to_owned());
            within(move || server_config(&cert, &key))
                .expect_err("refused")
                .to_string()
        };
        // A link to the file (cert-manager's way) is read.
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&c, &link).expect("symlink");
        server_config(&link, &k).expect("a link to a regular file is read");

        let fifo = dir.path().join("fifo.pem");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let _unblock = Unblock(fifo.clone());
        let e = refused(&fifo, &k);
        assert!(e.contains("not a regular file but a FIFO"), "{e}");
        let e = refused(dir.path(), &k);
        assert!(e.contains("not a regular file but a directory"), "{e}");
        let sock = dir.path().join("sock.pem");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let e = refused(&sock, &k);
        assert!(e.contains("not a regular file but a socket"), "{e}");
        let null = dir.path().join("null.pem");
        std::os::unix::fs::symlink("/dev/null", &null).expect("symlink");
        let e = refused(&c, &null);
        assert!(
            e.contains("TLS key file") && e.contains("not a regular file but a device"),
            "{e}"
        );
    }

    /// `path` made `len` bytes long (its contents kept, zeros after them; sparse, so that a
    /// file of gigabytes takes no room).
    fn grow(path: &Path, len: u64) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .expect("open");
        file.set_len(len).expect("set_len");
    }

    /// A certificate or key file larger than [`MAX_FILE_LEN`] (a wrong path to a log or a
    /// disk image) is refused at start unread, its size and the limit named.
    #[test]
    fn a_file_over_the_size_limit_is_refused_at_start_with_its_size_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -1, 30);
        // A certificate followed by junk: it would load, read whole.
        grow(&c, MAX_FILE_LEN + 1);
        let e = server_config(&c, &k).expect_err("too large").to_string();
        assert!(
            e.contains("TLS certificate file")
                && e.contains(&format!(
                    "{} bytes, more than the {MAX_FILE_LEN}",
                    MAX_FILE_LEN + 1
                )),
            "{e}"
        );
        let (c, k) = write_cert(dir.path(), -1, 30);
        grow(&c, MAX_FILE_LEN);
        server_config(&c, &k).expect("a file of the limit's size is read");
        // A disk image in the key's place: refused by its size, not read into memory.
        let (c, k) = write_cert(dir.path(), -1, 30);
        grow(&k, 4 << 30);
        let e = server_config(&c, &k).expect_err("too large").to_string();
        assert!(
            e.contains("TLS key file") && e.contains("4294967296 bytes, more than the"),
            "{e}"
        );
    }

    /// A file that grows past [`MAX_FILE_LEN`] after its size was checked is read no further
    /// than one byte past the limit, and refused.
    #[test]
    fn a_file_that_grows_past_the_limit_after_its_size_was_checked_is_refused_once_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("growing.pem");
        grow(&path, MAX_FILE_LEN);
        // Opened (its size the limit, as at the check), then grown before the read.
        let mut file = std::fs::File::open(&path).expect("open");
        grow(&path, 8 * MAX_FILE_LEN);
        let (why, reason) = read_bounded(&mut file).expect_err("refused");
        assert_eq!(why, Unread::TooLarge);
        assert!(
            reason.contains(&format!("more than {MAX_FILE_LEN} bytes")),
            "{reason}"
        );
        use std::io::Seek as _;
        let read = file.stream_position().expect("position");
        assert_eq!(read, MAX_FILE_LEN + 1, "read past the limit");

        let mut file = std::fs::File::open(&path).expect("open");
        std::fs::File::create(&path).expect("truncate");
        grow(&path, MAX_FILE_LEN);
        let contents = read_bounded(&mut file).expect("the limit's size is read");
        assert_eq!(contents.len() as u64, MAX_FILE_LEN);
    }

    /// A certificate file replaced by one over [`MAX_FILE_LEN`] is refused at a look (once:
    /// it growing further is no new failure) and handshakes are served the certificate in
    /// use; a renewed certificate in its place is then served.
    #[test]
    fn a_file_over_the_size_limit_is_refused_at_a_look_and_the_served_certificate_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k, first, files, config) = serve_first(dir.path());
        let roots = [first.clone()];
        served_and_looked(&config, &roots, &files);

        grow(&c, MAX_FILE_LEN + 1);
        assert_eq!(files.reload_if_changed(), Look::Refused, "too large");
        assert_eq!(files.reload_if_changed(), Look::Unchanged, "logged once");
        grow(&c, 2 * MAX_FILE_LEN);
        assert_eq!(
            files.reload_if_changed(),
            Look::Unchanged,
            "grown further: the same failure, not logged again"
        );
        assert_eq!(handshake(&config, &roots), Ok(first.clone()), "in use");
        looks_ended(&files);
        assert_eq!(files.served().cert[0], first);

        renew_and_serve(
            dir.path(),
            (&c, &k),
            &config,
            first,
            "the renewed certificate is never served",
        );
        looks_ended(&files);
    }

    /// Each different failure to read the files is a change, logged (once): the operator
    /// learns each reason in turn; the same failure seen again is not logged again. (Run as
    /// root, as here, permission denied cannot be made: it is an error number like the rest.)
    #[test]
    fn each_different_failure_to_read_the_files_is_logged_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -1, 30);
        let files = Arc::new(CertFiles::load(&c, &k, provider(), Duration::ZERO).expect("load"));
        let look = || {
            let files = Arc::clone(&files);
            within(move || files.reload_if_changed())
        };
        let good = std::fs::read(&c).expect("read");
        let mut failures = 0;
        let mut refused_once = |what: &str| {
            assert_eq!(look(), Look::Refused, "{what}: logged");
            assert_eq!(look(), Look::Unchanged, "{what}: logged once");
            failures += 1;
        };
        std::fs::remove_file(&c).expect("remove");
        refused_once("the certificate missing");
        nix::unistd::mkfifo(&c, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let _unblock = Unblock(c.clone());
        refused_once("a FIFO in its place");
        std::fs::remove_file(&c).expect("remove");
        std::fs::create_dir(&c).expect("dir");
        refused_once("a directory in its place");
        std::fs::remove_dir(&c).expect("rmdir");
        grow(&c, MAX_FILE_LEN + 1);
        refused_once("a file too large in its place");
        std::fs::write(&c, &good).expect("write");
        std::fs::remove_file(&k).expect("remove");
        refused_once("the key missing");
        std::fs::remove_file(&c).expect("remove");
        refused_once("the certificate missing, then the key too");
        assert_eq!(failures, 6);
        let c2 = renew(dir.path(), &c, &k);
        assert_eq!(look(), Look::Served);
        assert_eq!(
            files.served().cert[0],
            CertificateDer::from_pem_file(&c2).expect("pem")
        );
    }

    /// A look that cannot read a file says so, naming the file and why (gone, a directory in
    /// its place); one that read the files and cannot load what they hold says the change
    /// cannot be served. Every refusal said "cannot be served", a file never read included.
    #[test]
    fn a_refused_change_says_whether_a_file_could_not_be_read_or_cannot_be_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -1, 30);
        let refused = |cert: &Path, key: &Path| {
            let contents = Contents::read(cert, key);
            match loaded((cert, key), contents, &provider(), SystemTime::now()) {
                Ok(_) => panic!("{} and {} served", cert.display(), key.display()),
                Err(refusal) => refusal.message(),
            }
        };
        let kept = "; the previous certificate is served still";
        let gone = dir.path().join("gone.pem");
        let why = std::fs::metadata(&gone).expect_err("gone").to_string();
        assert_eq!(
            refused(&gone, &k),
            format!(
                "TLS certificate file {} could not be read: {why}{kept}",
                gone.display()
            )
        );
        let key_dir = dir.path().join("key.d");
        std::fs::create_dir(&key_dir).expect("mkdir");
        let said = refused(&c, &key_dir);
        let read = format!("TLS key file {} could not be read: ", key_dir.display());
        assert!(said.starts_with(&read), "{said}");
        assert!(
            said.contains("not a regular file but a directory"),
            "{said}"
        );
        let half = dir.path().join("half.pem");
        std::fs::write(&half, "half a certificate").expect("write");
        assert_eq!(
            refused(&half, &k),
            format!(
                "TLS certificate or key changed on disk but cannot be served: TLS certificate \
                 file {}: no certificate in it{kept}",
                half.display()
            )
        );
    }

    /// A FIFO in the certificate file's place (nobody writes it) is refused by each look at
    /// once, unread: no look is left waiting in it, however many looks see it (more than
    /// [`MAX_HUNG_LOOKS`]), handshakes go on being served the certificate in use, and once a
    /// renewed certificate takes the FIFO's place it is served.
    #[test]
    fn a_fifo_in_the_certificates_place_is_refused_at_each_look_and_its_renewal_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k, first, files, config) = serve_first(dir.path());
        let roots = [first.clone()];
        served_and_looked(&config, &roots, &files);

        std::fs::remove_file(&c).expect("remove");
        nix::unistd::mkfifo(&c, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        // Should a look wait in the FIFO after all, it is let go at the test's end.
        let _unblock = Unblock(c.clone());
        let look = || {
            let files = Arc::clone(&files);
            within(move || files.reload_if_changed())
        };
        assert_eq!(look(), Look::Refused, "a FIFO is no certificate");
        assert_eq!(look(), Look::Unchanged, "refused once (and logged once)");
        // Each handshake starts a look (due at once here), which returns with its refusal.
        let started = files.schedule().next;
        for _ in 0..3 * MAX_HUNG_LOOKS {
            if files.schedule().next > started + MAX_HUNG_LOOKS as u64 {
                break;
            }
            assert_eq!(handshake(&config, &roots), Ok(first.clone()), "in use");
            looks_ended(&files);
        }
        let looked = files.schedule().next - started;
        assert!(
            looked > MAX_HUNG_LOOKS as u64,
            "{looked} looks saw the FIFO"
        );

        std::fs::remove_file(&c).expect("remove");
        renew_and_serve(
            dir.path(),
            (&c, &k),
            &config,
            first,
            "the renewed certificate is never served",
        );
        looks_ended(&files);
    }

    /// Writes a renewed certificate and key (valid for 60 days) over `c` and `k`, the key
    /// first; the renewed certificate's own file, made in `dir`.
    fn renew(dir: &Path, c: &Path, k: &Path) -> PathBuf {
        let renewed = dir.join("renewed");
        std::fs::create_dir(&renewed).expect("dir");
        let (c2, k2) = write_cert(&renewed, -1, 60);
        std::fs::copy(&k2, k).expect("copy");
        std::fs::copy(&c2, c).expect("copy");
        c2
    }

    /// Writes a certificate (valid for 30 days) and its key in `dir`, loads them (looks due
    /// at once) and serves them: the two files, the certificate, the loaded files and the
    /// server config serving them.
    fn serve_first(
        dir: &Path,
    ) -> (
        PathBuf,
        PathBuf,
        CertificateDer<'static>,
        Arc<CertFiles>,
        Arc<rustls::ServerConfig>,
    ) {
        let (c, k) = write_cert(dir, -1, 30);
        let first = CertificateDer::from_pem_file(&c).expect("pem");
        let files = Arc::new(CertFiles::load(&c, &k, provider(), Duration::ZERO).expect("load"));
        let config = serving(Arc::clone(&files), provider()).expect("config");
        (c, k, first, files, config)
    }

    /// Checks that a handshake is served the first of `roots`, and waits for the look it
    /// started (due at once after [`serve_first`]) to end: a test that changes the files next
    /// would otherwise race it on a loaded machine (it could read the change first, and the
    /// test's own look find the refusal made already, or be outrun).
    fn served_and_looked(
        config: &Arc<rustls::ServerConfig>,
        roots: &[CertificateDer<'static>],
        files: &CertFiles,
    ) {
        assert_eq!(handshake(config, roots), Ok(roots[0].clone()));
        looks_ended(files);
    }

    /// Renews the certificate and key `(c, k)` (see [`renew`]) and waits until handshakes,
    /// trusting `first` and the renewal, are served the renewal (else fails saying `never`);
    /// the renewed certificate.
    fn renew_and_serve(
        dir: &Path,
        (c, k): (&Path, &Path),
        config: &Arc<rustls::ServerConfig>,
        first: CertificateDer<'static>,
        never: &str,
    ) -> CertificateDer<'static> {
        let c2 = renew(dir, c, k);
        let second = CertificateDer::from_pem_file(&c2).expect("pem");
        let roots = [first, second.clone()];
        served_in_time(config, &roots, &second, never);
        second
    }

    /// Waits (at most 10 s) until handshakes are served `want`; else fails saying `never`.
    fn served_in_time(
        config: &Arc<rustls::ServerConfig>,
        roots: &[CertificateDer<'static>],
        want: &CertificateDer<'static>,
        never: &str,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while handshake(config, roots).expect("handshake") != *want {
            assert!(Instant::now() < deadline, "{never}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (at most 10 s) until no look runs.
    fn looks_ended(files: &CertFiles) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !files.schedule().running.is_empty() {
            assert!(Instant::now() < deadline, "a look never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A look whose read never returns (its file system does not answer: here held after its
    /// read) holds its thread, yet the next look starts beside it: once the files answer,
    /// handshakes are served the renewed certificate without a restart. The hung look, when
    /// it returns at last with the older files it read, is dropped: the renewed certificate
    /// stays served.
    #[test]
    fn a_look_that_never_returns_does_not_stop_a_renewed_certificate_being_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k, first, files, config) = serve_first(dir.path());

        files.stall.hold_up_to(1);
        files.look_if_due();
        // The look has read the files (the first ones) and is held.
        files.stall.wait_holding(1);
        let second = renew_and_serve(
            dir.path(),
            (&c, &k),
            &config,
            first,
            "the renewed certificate is never served while a look hangs",
        );
        {
            let schedule = files.schedule();
            assert_eq!(schedule.running.first().map(|(n, _)| *n), Some(1), "hung");
            // Warned of (a look started by a handshake may have been warned of since).
            assert!(schedule.hang_warned.is_some_and(|w| w >= 1), "warned of");
        }
        // The hung look returns at last, with the older certificate and key it read: a pair
        // that loads, but older than what a later look took. It is dropped.
        files.stall.let_go(1);
        looks_ended(&files);
        let served = files.served().cert[0].clone();
        assert_eq!(
            served, second,
            "the hung look's older pair replaced the renewed one"
        );
    }

    /// Reads that never return hold at most [`MAX_HUNG_LOOKS`] threads: with that many hung,
    /// a due look starts none; one that returns frees its place for the next due look; once
    /// all return, looks start again.
    #[test]
    fn at_most_a_bounded_number_of_looks_hang_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -1, 30);
        let files = Arc::new(CertFiles::load(&c, &k, provider(), Duration::ZERO).expect("load"));
        files.stall.hold_up_to(u64::MAX);
        for _ in 0..3 * MAX_HUNG_LOOKS {
            files.look_if_due();
        }
        {
            let schedule = files.schedule();
            assert_eq!(schedule.running.len(), MAX_HUNG_LOOKS);
            assert!(schedule.full_warned);
            assert_eq!(schedule.next, MAX_HUNG_LOOKS as u64, "looks started");
        }
        // The first returns: the next due look starts in its place, and then none again.
        files.stall.let_go(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while files.schedule().running.len() == MAX_HUNG_LOOKS {
            assert!(Instant::now() < deadline, "the look let go never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
        files.look_if_due();
        files.look_if_due();
        {
            let schedule = files.schedule();
            assert_eq!(schedule.running.len(), MAX_HUNG_LOOKS);
            assert!(schedule.full_warned, "full again: warned of again");
            assert_eq!(schedule.next, MAX_HUNG_LOOKS as u64 + 1, "one look started");
        }
        files.stall.let_go(u64::MAX);
        looks_ended(&files);
        files.look_if_due();
        looks_ended(&files);
        assert_eq!(files.schedule().next, MAX_HUNG_LOOKS as u64 + 2);
    }

    /// A renewed certificate is served once its files change; a change that cannot be served
    /// (expired, or a key of another certificate) leaves the previous one served.
    #[test]
    fn a_changed_certificate_is_served_and_a_bad_change_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -1, 30);
        let files = CertFiles::load(&c, &k, provider(), Duration::ZERO).expect("load");
        let served = || served_by(&files);
        let first = served();
        assert_eq!(served(), first, "unchanged files: the same certificate");
        let renewed = dir.path().join("renewed");
        std::fs::create_dir(&renewed).expect("dir");
        let (c2, k2) = write_cert(&renewed, -1, 60);
        std::fs::copy(&c2, &c).expect("copy");
        std::fs::copy(&k2, &k).expect("copy");
        let second = served();
        assert_ne!(second, first, "the renewed certificate is served");
        assert_eq!(second, CertificateDer::from_pem_file(&c).expect("pem"));
        // Expired: refused, the renewed one stays.
        let (c3, k3) = write_cert(&renewed, -30, -2);
        std::fs::copy(&c3, &c).expect("copy");
        std::fs::copy(&k3, &k).expect("copy");
        assert_eq!(served(), second);
        // The certificate alone replaced (its key not yet): refused until the key comes.
        let (c4, k4) = write_cert(&renewed, -1, 90);
        std::fs::copy(&c4, &c).expect("copy");
        assert_eq!(served(), second);
        std::fs::copy(&k4, &k).expect("copy");
        assert_eq!(served(), CertificateDer::from_pem_file(&c4).expect("pem"));
    }

    /// A renewed certificate placed ahead of its start of validity is refused while it is not
    /// valid yet and served once it is: it is tried again at later looks, where a change
    /// refused for good (another key, an expired certificate) is not.
    #[test]
    fn a_renewed_certificate_not_valid_yet_is_served_once_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -1, 30);
        let files = CertFiles::load(&c, &k, provider(), Duration::ZERO).expect("load");
        let served = || served_by(&files);
        let first = served();
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        let valid_from = SystemTime::now() + Duration::from_secs(2);
        params.not_before = valid_from.into();
        params.not_after = (SystemTime::now() + Duration::from_secs(30 * 86_400)).into();
        let cert = params.self_signed(&key).expect("sign");
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        assert_eq!(served(), first, "not valid yet: the previous one is served");
        let deadline = Instant::now() + Duration::from_secs(10);
        let now_served = loop {
            let now_served = served();
            if now_served != first {
                break now_served;
            }
            assert!(
                Instant::now() < deadline,
                "the renewed certificate is never served"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(now_served, cert.der().clone());
        // X.509 times are whole seconds: valid from the second `valid_from` falls in.
        let second = valid_from
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("time")
            .as_secs();
        assert!(
            SystemTime::now() >= SystemTime::UNIX_EPOCH + Duration::from_secs(second),
            "served before its start of validity"
        );
    }

    /// A change refused for good is tried (and logged) once; one refused only because its
    /// certificate is not valid yet is tried at every look.
    #[test]
    fn a_change_refused_for_good_is_tried_once_and_one_not_valid_yet_at_every_look() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -1, 30);
        let files = CertFiles::load(&c, &k, provider(), Duration::ZERO).expect("load");
        assert_eq!(files.reload_if_changed(), Look::Unchanged);
        write_cert(dir.path(), -30, -2);
        assert_eq!(files.reload_if_changed(), Look::Refused, "expired");
        assert_eq!(
            files.reload_if_changed(),
            Look::Unchanged,
            "not tried again"
        );
        write_cert(dir.path(), 2, 30);
        assert_eq!(files.reload_if_changed(), Look::NotYetValid);
        assert_eq!(files.reload_if_changed(), Look::NotYetValid, "tried again");
        let (c2, _) = write_cert(dir.path(), -1, 60);
        assert_eq!(files.reload_if_changed(), Look::Served);
        assert_eq!(files.reload_if_changed(), Look::Unchanged);
        let served = files.served.read().expect("served").cert[0].clone();
        assert_eq!(served, CertificateDer::from_pem_file(&c2).expect("pem"));
    }

    /// The certificate served is warned of when it nears its end and again once a day, and at
    /// once when it expires, then every hour: never at every look.
    #[test]
    fn the_certificate_served_is_warned_of_as_it_nears_its_end_at_bounded_intervals() {
        let now = SystemTime::now();
        let t0 = Instant::now();
        let day = Duration::from_secs(86_400);
        let mut looked = Looked {
            stamp: Stamp::Read([0; 32]),
            look: 0,
            retry: false,
            served_until: unix_secs(now + 60 * day),
            expiry_warned: None,
        };
        assert_eq!(looked.expiry_due(now, t0), None, "far from its end");
        looked.served_until = unix_secs(now + 5 * day);
        assert_eq!(looked.expiry_due(now, t0), Some(Expiry::Soon));
        let hour = Duration::from_secs(3600);
        assert_eq!(looked.expiry_due(now + hour, t0 + hour), None);
        assert_eq!(looked.expiry_due(now + day, t0 + day), Some(Expiry::Soon));
        let later = 6 * day;
        assert_eq!(
            looked.expiry_due(now + later, t0 + day + Duration::from_secs(1)),
            Some(Expiry::Expired),
            "at once when it expires"
        );
        let t1 = t0 + day + Duration::from_secs(1);
        assert_eq!(looked.expiry_due(now + later, t1 + hour / 2), None);
        assert_eq!(
            looked.expiry_due(now + later, t1 + hour),
            Some(Expiry::Expired)
        );
    }
}
