//! Who may connect: worker secrets for the registration challenge-response, and bearer tokens
//! for the HTTP API.
//!
//! Worker secrets come from a fleet secret file, a directory of per-worker secret files (named
//! by worker id, read at each connection so workers can be provisioned without a restart), or
//! both (the per-worker file wins). Secrets are never logged and never sent.
//!
//! API tokens have a scope: `read` for GET and HEAD, `admin` for everything. Only their SHA-256
//! digests are kept, compared in constant time. [`require_token`] is a middleware on the whole
//! router: every route needs the scope of its method except the [`is_public`] paths.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tether_proto::WorkerId;
use tether_proto::auth::{AuthError, MAX_SECRET_LEN, MIN_SECRET_LEN, Secret};
use tether_proto::endpoint::is_loopback_host;

use crate::server::AppState;

/// The fleet secret, and the next one during a rotation (both accepted): shared by the clones
/// of a [`WorkerAuth`], and read again from their files on [`Fleet::reload`] (SIGHUP), so a
/// new secret is asked of the registrations that follow without a restart.
#[derive(Clone)]
pub struct Fleet {
    current: Arc<std::sync::RwLock<(Secret, Option<Secret>)>>,
    file: Option<PathBuf>,
    next_file: Option<PathBuf>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Fleet(file: {:?}, next: {:?})",
            self.file, self.next_file
        )
    }
}

impl From<Secret> for Fleet {
    fn from(secret: Secret) -> Self {
        Self {
            current: Arc::new(std::sync::RwLock::new((secret, None))),
            file: None,
            next_file: None,
        }
    }
}

impl Fleet {
    /// The fleet secret of the file at `path`, which [`Fleet::reload`] reads again.
    pub fn from_file(path: &std::path::Path) -> Result<Self, AuthError> {
        let secret = Secret::from_file(path)?;
        Ok(Self {
            file: Some(path.to_owned()),
            ..Self::from(secret)
        })
    }

    /// With a next secret from the file at `path`, accepted beside the fleet secret: workers
    /// move to it one at a time, and then it becomes the fleet secret (no flag day).
    pub fn with_next_file(mut self, path: &std::path::Path) -> Result<Self, AuthError> {
        let next = Secret::from_file(path)?;
        self.current.write().unwrap_or_else(|p| p.into_inner()).1 = Some(next);
        self.next_file = Some(path.to_owned());
        Ok(self)
    }

    /// The secret asked of a registration now.
    pub fn secret(&self) -> Secret {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// The secrets a registration may prove: the fleet secret, then the next one if any.
    pub fn secrets(&self) -> Vec<Secret> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        std::iter::once(current.0.clone())
            .chain(current.1.clone())
            .collect()
    }

    /// Reads the files again: `Ok(true)` when a secret changed (asked from the next
    /// registration on; sessions under way keep theirs), `Ok(false)` when they are the same or
    /// there is no file. A file that holds no usable secret keeps both in use.
    pub fn reload(&self) -> Result<bool, AuthError> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let new = Secret::from_file(path)?;
        let next = self
            .next_file
            .as_deref()
            .map(Secret::from_file)
            .transpose()?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let same = |a: &Secret, b: &Secret| bool::from(a.expose().ct_eq(b.expose()));
        let changed = !same(&new, &current.0)
            || match (&next, &current.1) {
                (Some(a), Some(b)) => !same(a, b),
                (None, None) => false,
                _ => true,
            };
        *current = (new, next);
        Ok(changed)
    }

    /// The file of the next secret, if any.
    pub fn next_file(&self) -> Option<&std::path::Path> {
        self.next_file.as_deref()
    }

    /// The file the secret is read from, if any.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }
}

/// How workers authenticate. `None` in the config means authentication is off.
#[derive(Debug, Clone)]
pub struct WorkerAuth {
    /// The secret every worker without its own file uses.
    pub fleet: Option<Fleet>,
    /// A directory holding one secret file per worker, named by the worker id.
    pub dir: Option<PathBuf>,
    /// Largest difference between a registration's timestamp and this clock.
    pub max_skew: Duration,
    /// Require an integrity tag (HMAC-SHA256 under a per-session key) on every frame after the
    /// welcome, both ways; workers that cannot are refused.
    pub message_mac: bool,
}

impl WorkerAuth {
    /// Authentication with one fleet secret.
    pub fn fleet(secret: Secret) -> Self {
        Self {
            fleet: Some(secret.into()),
            dir: None,
            max_skew: tether_proto::auth::DEFAULT_MAX_SKEW,
            message_mac: false,
        }
    }

    /// The secret `worker` must prove it holds; `None` when it has none (it cannot register).
    pub async fn secret_for(&self, worker: &WorkerId) -> Result<Option<Secret>, SecretError> {
        if let Some(dir) = &self.dir
            // Ids may be `.` or `..`; those never name a secret file.
            && !worker.as_str().starts_with('.')
        {
            let path = dir.join(worker.as_str());
            let read = tokio::task::spawn_blocking(move || read_secret_file(path)).await;
            match read {
                Ok(Ok(None)) => {}
                Ok(found) => return found,
                // The read panicked: nothing the worker did.
                Err(e) => {
                    return Err(SecretError::Unreadable {
                        path: dir.join(worker.as_str()),
                        source: std::io::Error::other(e),
                    });
                }
            }
        }
        Ok(self.fleet.as_ref().map(Fleet::secret))
    }

    /// The secrets `worker` may prove it holds (its own file's, else the fleet secret and the
    /// next one), and whether it has any: see [`WorkerAuth::secret_or_decoy`].
    pub async fn secrets_or_decoy(
        &self,
        worker: &WorkerId,
    ) -> Result<(Vec<Secret>, bool), SecretError> {
        let (secret, known) = self.secret_or_decoy(worker).await?;
        let from_fleet = self.fleet.as_ref().filter(|f| {
            // The worker's own file wins: the fleet's secrets are its only when they gave it.
            known && bool::from(f.secret().expose().ct_eq(secret.expose()))
        });
        Ok(match from_fleet {
            Some(fleet) => (fleet.secrets(), true),
            None => (vec![secret], known),
        })
    }

    /// The secret `worker` must prove it holds and whether it has one: a worker without one
    /// gets a decoy (random, this process's), so that its registration costs what a known
    /// worker's does (a signature computed and compared) and the time of the refusal does not
    /// tell which ids exist. The decoy never verifies: its refusal is `bad_signature`.
    pub async fn secret_or_decoy(&self, worker: &WorkerId) -> Result<(Secret, bool), SecretError> {
        static DECOY: std::sync::OnceLock<Secret> = std::sync::OnceLock::new();
        Ok(match self.secret_for(worker).await? {
            Some(secret) => (secret, true),
            None => {
                let decoy = DECOY.get_or_init(|| {
                    let random = tether_proto::auth::to_hex(&rand::random::<[u8; 32]>());
                    Secret::new(random.as_bytes()).expect("64 hex digits are a secret")
                });
                (decoy.clone(), false)
            }
        })
    }
}

/// Why the secret of a worker with a file in the secrets directory is not at hand.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file was read and holds no secret (empty, too short, too long). The operator's to
    /// fix, and until then the worker is refused as with a wrong secret: the answer tells
    /// nothing of the file, and the log names it.
    #[error("secret file {path} holds no usable secret: {reason}")]
    Unusable { path: PathBuf, reason: AuthError },
    /// The worker's entry is not a regular file (a directory, a device, a FIFO, or a link to
    /// one), so it is not read; refused as [`SecretError::Unusable`] is.
    #[error("secret file {path} is not a regular file (or a link to one): not read")]
    NotAFile { path: PathBuf },
    /// The coordinator could not read the file (too many open files in a reconnect storm, an
    /// I/O error, a stale or unreadable mount). Its own trouble, likely to pass, and nothing
    /// the worker could change: refused, every worker would stop for good after three of
    /// these, so the worker is told to try again instead.
    #[error("cannot read secret file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads the secret file at `path`, which an unauthenticated peer names (its worker id):
/// `None` when there is none. Only a regular file (links followed) is read, and no further
/// than a secret's length: a link to `/dev/zero` would fill memory, and a FIFO would hold the
/// registration (and a blocking thread) until someone writes to it. It is opened without
/// waiting, so a FIFO put in the file's place is found by the check after the open, not
/// waited on by it.
fn read_secret_file(path: PathBuf) -> Result<Option<Secret>, SecretError> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SecretError::Unreadable { path, source }),
    };
    match file.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(SecretError::NotAFile { path }),
        Err(source) => return Err(SecretError::Unreadable { path, source }),
    }
    match Secret::from_reader(file, &path) {
        Ok(secret) => Ok(Some(secret)),
        Err(AuthError::SecretFile { path, source }) => {
            Err(SecretError::Unreadable { path, source })
        }
        Err(reason) => Err(SecretError::Unusable { path, reason }),
    }
}

/// An entry of the secrets directory that no registration will ever read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadSecret {
    pub name: String,
    pub why: String,
}

impl WorkerAuth {
    /// The entries of the secrets directory that no worker's registration will read: names
    /// that are not worker ids (`worker 1`, `worker-1#`, a name that is not UTF-8), and entries that are
    /// not files. Hidden files (a leading `.`) are never read either, by design, and are not
    /// listed. A snapshot: the directory is read again at each registration, so a file added
    /// later is found then.
    pub fn unread_secret_files(&self) -> std::io::Result<Vec<UnreadSecret>> {
        let Some(dir) = &self.dir else {
            return Ok(Vec::new());
        };
        let mut unread = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(text) = name.to_str() else {
                unread.push(UnreadSecret {
                    name: name.to_string_lossy().into_owned(),
                    why: "the name is not UTF-8, so it names no worker id".into(),
                });
                continue;
            };
            if text.starts_with('.') {
                continue;
            }
            if let Err(e) = WorkerId::parse(text) {
                unread.push(UnreadSecret {
                    name: text.to_owned(),
                    why: format!("the name is not a worker id ({e})"),
                });
                continue;
            }
            // Followed, as the read at registration follows it.
            if !std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
                unread.push(UnreadSecret {
                    name: text.to_owned(),
                    why: "not a file (or a link to none): the worker named so is refused".into(),
                });
            }
        }
        unread.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(unread)
    }
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// `GET /metrics` and nothing else: a scraper's credential, which reads no task, its
    /// `--env` values and output included.
    Metrics,
    /// GET and HEAD: list and read tasks, workers, results, metrics.
    Read,
    /// Everything: submit, cancel, pause, resume, and all reads.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Metrics => "metrics",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    /// The scope a request needs: reads for safe methods, admin for the rest.
    pub fn needed_for(method: &Method) -> Scope {
        if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
            Scope::Read
        } else {
            Scope::Admin
        }
    }

    /// The scope a request for `path` needs: [`Scope::needed_for`] its method, but a read of
    /// `/metrics` needs only [`Scope::Metrics`].
    pub fn needed(method: &Method, path: &str) -> Scope {
        match Scope::needed_for(method) {
            Scope::Read if path == "/metrics" => Scope::Metrics,
            needed => needed,
        }
    }
}

/// The most a token file may hold, bytes: room for hundreds of the longest tokens, rotation
/// included. A larger file is refused, not read whole: a path that names `/dev/zero` or a
/// runaway log would otherwise fill the memory of the process that reads it.
pub const MAX_TOKEN_FILE_LEN: u64 = 1 << 20;

/// Why a token file cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    #[error(
        "it holds more than {MAX_TOKEN_FILE_LEN} bytes (1 MiB), which no token file needs: \
         is it the right file?"
    )]
    TooLarge,
    #[error("it holds no token (one a line; a line that starts with # is a comment)")]
    Empty,
    #[error("the token on line {line} is not usable: {reason}")]
    Token { line: usize, reason: TokenError },
}

/// Why a line is no API token. [`token_lines`] is the one rule of what a token is, read by
/// the coordinator from its token files and by the client (`--token-file`, `TETHER_TOKEN`)
/// for the one it sends: a token one side takes, the other takes too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("{len} bytes, at least {MIN_SECRET_LEN} are required")]
    TooShort { len: usize },
    #[error("{len} bytes, at most {MAX_SECRET_LEN} are taken")]
    TooLong { len: usize },
    /// A header carries a token as text: one with any other byte could never be presented,
    /// and every request with it would be told to send a token.
    #[error(
        "byte {byte:#04x} at column {column} is not visible ASCII: an Authorization header \
         carries only visible ASCII, so no request could present it"
    )]
    NotHeaderText { byte: u8, column: usize },
}

/// The tokens of a token file's text (or of the client's `TETHER_TOKEN`), each with its line
/// number (from 1) and whether it is one: one token a line; blank lines and lines that start
/// with `#` are skipped; the ASCII whitespace around a line (an indent, a `\r\n` ending) is
/// not part of its token. A token is 16 to 4096 bytes of visible ASCII, spaces and tabs
/// inside it too: what an `Authorization` header carries as text, and what the coordinator
/// reads back unchanged from `Authorization: Bearer <token>`.
pub fn token_lines(text: &[u8]) -> impl Iterator<Item = (usize, Result<&[u8], TokenError>)> {
    text.split(|b| *b == b'\n')
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim_ascii();
            let skipped = line.is_empty() || line.starts_with(b"#");
            (!skipped).then(|| (i + 1, token(line).map(|()| line)))
        })
}

/// Whether a line of a token file, trimmed, is a token (see [`token_lines`]).
fn token(line: &[u8]) -> Result<(), TokenError> {
    if let Some((byte, column)) = not_header_text(line) {
        return Err(TokenError::NotHeaderText { byte, column });
    }
    match line.len() {
        len if len < MIN_SECRET_LEN => Err(TokenError::TooShort { len }),
        len if len > MAX_SECRET_LEN => Err(TokenError::TooLong { len }),
        _ => Ok(()),
    }
}

/// What the token file `path` holds, if that is at most [`MAX_TOKEN_FILE_LEN`] bytes: read
/// no more than one byte past it, however much the file would give. The coordinator reads its
/// token files with it, and the CLI client its `--token-file`.
pub fn read_token_file(path: &std::path::Path) -> Result<Vec<u8>, TokenFileError> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE_LEN + 1).read_to_end(&mut text))
        .map_err(TokenFileError::Read)?;
    match text.len() as u64 > MAX_TOKEN_FILE_LEN {
        true => Err(TokenFileError::TooLarge),
        false => Ok(text),
    }
}

/// Bearer tokens of the HTTP API, by digest, each with a label that names it in the log
/// (its file and line, never the token). Clones share one set: [`ApiTokens::reload`] (SIGHUP,
/// or [`ApiTokens::watch`] seeing a file change) replaces it for every clone at once.
#[derive(Clone, Default)]
pub struct ApiTokens {
    shared: Arc<std::sync::RwLock<TokenSet>>,
}

/// What the token files held when last read, and the tokens given in code.
#[derive(Default)]
struct TokenSet {
    /// Tokens read from files, replaced whole by a reload.
    read: Vec<Token>,
    /// Tokens given by [`ApiTokens::add`], kept by reloads.
    given: Vec<Token>,
    /// The files, in the order they were added, with their scope.
    files: Vec<(PathBuf, Scope)>,
    /// A digest of what the files held at the last read (the watch's change test).
    stamp: [u8; 32],
}

struct Token {
    digest: [u8; 32],
    scope: Scope,
    label: Arc<str>,
}

/// What a presented token is: its scope and the label that names it in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub scope: Scope,
    /// `admin.token:2` (the file's name and the token's line), never the token.
    pub label: Arc<str>,
}

/// The scope of the token a request was let in with, when the coordinator has tokens (a
/// request extension [`require_token`] adds): what an answer shows may depend on it
/// ([`EnvShown`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted(pub Scope);

/// Whether an answer shows the values of tasks' `env` (their config's `env` object, which
/// `tether submit --env` fills, and where secrets a task needs go): to a caller with the admin
/// scope, or to anyone when the coordinator has no tokens (everyone may submit then); to a
/// read token, the names with each value replaced ([`crate::model::Task::without_env_values`]).
/// Outputs are not filtered: a task that prints a secret shows it to a read token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvShown(pub bool);

impl EnvShown {
    /// `task` as this caller may see it.
    pub fn task(self, task: crate::model::Task) -> crate::model::Task {
        match self.0 {
            true => task,
            false => task.without_env_values(),
        }
    }

    /// `tasks` as this caller may see them.
    pub fn tasks(self, tasks: Vec<crate::model::Task>) -> Vec<crate::model::Task> {
        match self.0 {
            true => tasks,
            false => tasks.into_iter().map(|t| self.task(t)).collect(),
        }
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for EnvShown {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let admitted = parts.extensions.get::<Admitted>();
        Ok(EnvShown(admitted.is_none_or(|a| a.0 >= Scope::Admin)))
    }
}

/// What a reload of the token files did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Tokens before and after, by scope: (admin, read, metrics).
    pub before: (usize, usize, usize),
    pub after: (usize, usize, usize),
    /// Whether the files held anything else than at the last read.
    pub changed: bool,
}

/// A token file that refused a reload: every token in use is kept.
#[derive(Debug, thiserror::Error)]
#[error("{} token file {}: {error}", .scope.as_str(), .path.display())]
pub struct ReloadError {
    pub path: PathBuf,
    pub scope: Scope,
    pub error: TokenFileError,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (admin, read, metrics) = self.set().counts();
        write!(
            f,
            "ApiTokens({admin} admin, {read} read, {metrics} metrics)"
        )
    }
}

impl TokenSet {
    fn all(&self) -> impl Iterator<Item = &Token> {
        self.read.iter().chain(&self.given)
    }

    fn counts(&self) -> (usize, usize, usize) {
        let n = |scope| self.all().filter(|t| t.scope == scope).count();
        (n(Scope::Admin), n(Scope::Read), n(Scope::Metrics))
    }
}

impl ApiTokens {
    fn set(&self) -> std::sync::RwLockReadGuard<'_, TokenSet> {
        self.shared.read().unwrap_or_else(|p| p.into_inner())
    }

    fn set_mut(&self) -> std::sync::RwLockWriteGuard<'_, TokenSet> {
        self.shared.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a token with a scope.
    pub fn add(&mut self, token: &Secret, scope: Scope) {
        let mut set = self.set_mut();
        let label = format!("token {} given in code", set.given.len() + 1).into();
        set.given.push(Token {
            digest: digest(token.expose()),
            scope,
            label,
        });
    }

    /// Reads a token file: one token per line (several allow rotation), as [`token_lines`]
    /// reads them; a line that is no token (too short, or with a byte no header carries as
    /// text: `ö`, a control character) refuses the file, by its number. The file is read
    /// again by [`ApiTokens::reload`].
    pub fn add_file(
        &mut self,
        path: &std::path::Path,
        scope: Scope,
    ) -> Result<usize, TokenFileError> {
        let text = read_token_file(path)?;
        let tokens = file_tokens(path, &text, scope)?;
        let n = tokens.len();
        let mut set = self.set_mut();
        set.read.extend(tokens);
        set.files.push((path.to_owned(), scope));
        let mut stamp = Sha256::new();
        stamp.update(set.stamp);
        stamp.update(digest(&text));
        set.stamp = stamp.finalize().into();
        Ok(n)
    }

    pub fn is_empty(&self) -> bool {
        let set = self.set();
        set.read.is_empty() && set.given.is_empty()
    }

    /// Whether any token comes from a file (a reload has something to read).
    pub fn has_files(&self) -> bool {
        !self.set().files.is_empty()
    }

    /// The scope of a presented token; every known token is compared, in constant time.
    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        self.caller(presented).map(|c| c.scope)
    }

    /// The scope and label of a presented token; every known token is compared, in constant
    /// time. A token on several lines is taken with its widest scope.
    pub fn caller(&self, presented: &str) -> Option<Caller> {
        let d = digest(presented.as_bytes());
        let set = self.set();
        let mut best: Option<&Token> = None;
        for known in set.all() {
            if bool::from(known.digest.ct_eq(&d)) && best.is_none_or(|b| b.scope < known.scope) {
                best = Some(known);
            }
        }
        best.map(|t| Caller {
            scope: t.scope,
            label: t.label.clone(),
        })
    }

    /// Reads every token file again and, if all of them serve, takes their tokens in place of
    /// those read before (tokens given in code stay). One that does not (unreadable, empty, a
    /// line that is no token) keeps every token in use, and says which file and why.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let files = self.set().files.clone();
        let mut read = Vec::new();
        let mut stamp = [0u8; 32];
        for (path, scope) in &files {
            let refused = |error| ReloadError {
                path: path.clone(),
                scope: *scope,
                error,
            };
            let text = read_token_file(path).map_err(refused)?;
            read.extend(file_tokens(path, &text, *scope).map_err(refused)?);
            let mut next = Sha256::new();
            next.update(stamp);
            next.update(digest(&text));
            stamp = next.finalize().into();
        }
        let mut set = self.set_mut();
        let before = set.counts();
        let changed = set.stamp != stamp;
        set.read = read;
        set.stamp = stamp;
        Ok(Reloaded {
            before,
            after: set.counts(),
            changed,
        })
    }

    /// Reads the token files every `every` until `stop`, and reloads them when what they hold
    /// changed since the last read (a change that does not serve is logged once, and the
    /// tokens in use are kept): a rotation needs no signal. Each read runs on a thread of its
    /// own, not the runtime's blocking pool (a hung mount must not hold the process's exit),
    /// and none starts while the last one has not returned.
    pub async fn watch(self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = Arc::new(std::sync::Mutex::new(None::<[u8; 32]>));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if running.swap(true, std::sync::atomic::Ordering::AcqRel) {
                continue;
            }
            let (tokens, running, refused) = (self.clone(), running.clone(), refused.clone());
            let spawned = std::thread::Builder::new()
                .name("token-reload".into())
                .spawn(move || {
                    tokens.look(&refused);
                    running.store(false, std::sync::atomic::Ordering::Release);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread to read the API token files; tried again later");
            }
        }
    }

    /// One look of [`ApiTokens::watch`]: reloads when the files changed; a refused change is
    /// logged once (`refused` holds what it read), not at every look.
    fn look(&self, refused: &std::sync::Mutex<Option<[u8; 32]>>) {
        let files = self.set().files.clone();
        let mut stamp = [0u8; 32];
        for (path, _) in &files {
            // Unreadable: the reload below says why (once).
            let text = read_token_file(path).unwrap_or_default();
            let mut next = Sha256::new();
            next.update(stamp);
            next.update(digest(&text));
            stamp = next.finalize().into();
        }
        let mut refused = refused.lock().unwrap_or_else(|p| p.into_inner());
        if stamp == self.set().stamp || *refused == Some(stamp) {
            return;
        }
        match self.reload() {
            Ok(r) => {
                *refused = None;
                tracing::info!(
                    admin = r.after.0,
                    read = r.after.1,
                    metrics = r.after.2,
                    "API token files changed on disk: their tokens are taken"
                );
            }
            Err(e) => {
                *refused = Some(stamp);
                tracing::error!(error = %e, "an API token file changed on disk but cannot serve: every token in use is kept");
            }
        }
    }
}

/// The tokens of a token file's `text`, labelled by its name and their line.
fn file_tokens(
    path: &std::path::Path,
    text: &[u8],
    scope: Scope,
) -> Result<Vec<Token>, TokenFileError> {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut tokens = Vec::new();
    for (line, token) in token_lines(text) {
        let token = token.map_err(|reason| TokenFileError::Token { line, reason })?;
        tokens.push(Token {
            digest: digest(token),
            scope,
            label: format!("{name}:{line}").into(),
        });
    }
    if tokens.is_empty() {
        return Err(TokenFileError::Empty);
    }
    Ok(tokens)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Why a listener is refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to serve on {addr} without API tokens: anyone who can reach it could submit \
     commands to run on the workers; listen on a loopback address or configure tokens \
     (--admin-token-file)"
)]
pub struct Exposed {
    pub addr: SocketAddr,
}

/// Without tokens, only a loopback address may be served.
pub fn check_exposure(addr: SocketAddr, tokens: Option<&ApiTokens>) -> Result<(), Exposed> {
    match tokens {
        Some(t) if !t.is_empty() => Ok(()),
        _ if addr.ip().is_loopback() => Ok(()),
        _ => Err(Exposed { addr }),
    }
}

/// Paths served without a token: the worker endpoint (workers authenticate with their own
/// handshake), the health check, and the dashboard's static files (they hold no data; the data
/// comes from the API).
pub fn is_public(path: &str) -> bool {
    path == "/healthz"
        || path == "/"
        || path.starts_with("/api/v1/worker/")
        || path.starts_with("/dashboard/")
}

/// Refusals of [`browser_guard`] logged in a second; past it they are counted, and the next
/// second's first line says how many went unlogged.
const REFUSALS_LOGGED_PER_SEC: u32 = 20;

/// The second under way, the refusals logged in it and those not logged.
static REFUSALS_LOGGED: std::sync::Mutex<(Option<std::time::Instant>, u32, u64)> =
    std::sync::Mutex::new((None, 0, 0));

/// Whether one more refusal may be logged this second.
fn refusal_logged() -> bool {
    let mut budget = REFUSALS_LOGGED.lock().unwrap_or_else(|p| p.into_inner());
    let now = std::time::Instant::now();
    let (second, _, unlogged) = *budget;
    if second.is_none_or(|s| now.duration_since(s) >= std::time::Duration::from_secs(1)) {
        if unlogged > 0 {
            tracing::warn!(
                unlogged,
                per_sec = REFUSALS_LOGGED_PER_SEC,
                "requests refused by the browser guard not logged: over the log's budget"
            );
        }
        *budget = (Some(now), 0, 0);
    }
    let (_, used, unlogged) = &mut *budget;
    let admitted = *used < REFUSALS_LOGGED_PER_SEC;
    match admitted {
        true => *used += 1,
        false => *unlogged += 1,
    }
    admitted
}

/// Middleware against browsers turned on the coordinator. A web page may not open the worker
/// endpoint (a browser always sends `Origin` on a WebSocket upgrade; workers do not); without
/// API tokens a request to the API or the dashboard must name a loopback host (a page that
/// rebinds its own domain's DNS to 127.0.0.1 reaches a loopback listener, but under its own
/// name); and a command (any method but GET, HEAD, OPTIONS) from another site's page is
/// refused: a form on any site may POST to `http://127.0.0.1:8765/api/v1/tasks/{id}/cancel`
/// under the right name, but its browser says where it comes from (`Origin`,
/// `Sec-Fetch-Site`). The dashboard's own commands come from its origin; the CLI sends neither.
pub async fn browser_guard(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let refuse = |message: &str| {
        // Before any token is asked for: anyone who reaches the port chooses the path and the
        // headers, and how often. Each line shows a bounded part of them, and the lines a
        // second are bounded.
        if refusal_logged() {
            let shown = |name| {
                let v = req
                    .headers()
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()));
                v.map(|v| format!("{:?}", tether_proto::msg::logged(&v)))
            };
            tracing::warn!(path = ?tether_proto::msg::logged(req.uri().path()), host = ?shown(header::HOST), origin = ?shown(header::ORIGIN), "{message}");
        }
        crate::http::error_response(StatusCode::FORBIDDEN, "forbidden", message)
    };
    if req.uri().path().starts_with("/api/v1/worker/") {
        // Workers may come through a forwarder under another name (a fault proxy on a veth's
        // address): for them the Origin check is the guard.
        if req.headers().contains_key(header::ORIGIN) {
            return refuse(
                "the worker endpoint does not serve web pages (the request has an Origin)",
            );
        }
        return next.run(req).await;
    }
    let tokenless = app.cfg.api_tokens.as_ref().is_none_or(|t| t.is_empty());
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if tokenless && !host.is_none_or(is_loopback_host) {
        return refuse(
            "without API tokens this coordinator answers only requests for a loopback host \
             (localhost, 127.0.0.1, [::1])",
        );
    }
    if Scope::needed_for(req.method()) == Scope::Admin && from_another_site(&req, host) {
        return refuse("commands are not taken from another site's page");
    }
    next.run(req).await
}

/// Whether a browser says `req` comes from a page of another origin than the one it asks:
/// `Sec-Fetch-Site` other than `same-origin` or `none` (typed by the user), or an `Origin`
/// whose host and port are not `host` (`null` included: a sandboxed or local page).
fn from_another_site(req: &Request, host: Option<&str>) -> bool {
    let site = req
        .headers()
        .get("sec-fetch-site")
        .map(|v| v.to_str().unwrap_or_default());
    if site.is_some_and(|s| s != "same-origin" && s != "none") {
        return true;
    }
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return false;
    };
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, authority)| authority);
    match (authority, host) {
        (Some(a), Some(h)) => !a.eq_ignore_ascii_case(h),
        _ => true,
    }
}

/// Middleware: the request needs a bearer token of the scope it needs ([`Scope::needed`]), when
/// tokens are configured. 401 without a valid token, 403 with a token of a narrower scope.
///
/// The audit trail: a refusal is logged with the peer's address, the method, the path and the
/// token's label when the token is known (never the token), at WARN once an address a minute
/// ([`crate::ratelimit::Refusals::note_api`]: anyone who reaches the port sends them as often
/// as they like), its repeats at debug; every command (a method that needs the admin scope:
/// submissions, cancels, pauses, resumes, checkpoints) is logged at INFO with the peer, the
/// token's label (`none` without tokens) and the status answered, so who did what can be told.
pub async fn require_token(
    State(app): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if is_public(path) {
        return next.run(req).await;
    }
    let needed = Scope::needed(req.method(), path);
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::admission::Peer>>()
        .map(|c| c.0.addr);
    let method = req.method().clone();
    let path = path.to_owned();
    let shown = tether_proto::msg::logged(&path);
    let label = match app.cfg.api_tokens.as_ref().filter(|t| !t.is_empty()) {
        None => None,
        Some(tokens) => match checked(tokens, &req, needed) {
            Ok(caller) => {
                req.extensions_mut().insert(Admitted(caller.scope));
                Some(caller.label)
            }
            Err((status, code, message, label)) => {
                app.counters
                    .api_auth_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let said = peer.map(|p| app.refusals.note_api(p.ip()));
                let token = label.as_deref().unwrap_or("none known");
                let status_code = status.as_u16();
                match said {
                    Some(v) if !v.warn => {
                        tracing::debug!(peer = ?peer, %method, path = ?shown, token, status = status_code, repeat = v.repeats, "API request refused again: {message}")
                    }
                    _ => {
                        let repeats = said.map_or(0, |v| v.repeats);
                        tracing::warn!(peer = ?peer, %method, path = ?shown, token, status = status_code, repeats_at_debug = repeats, "API request refused: {message} (this address's repeats within a minute are logged at debug; `repeats_at_debug` counts those of the last)")
                    }
                }
                let mut r = crate::http::error_response(status, code, &message);
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
        },
    };
    if needed < Scope::Admin {
        return next.run(req).await;
    }
    let answer = next.run(req).await;
    let token = label.as_deref().unwrap_or("none (no API tokens)");
    let status = answer.status().as_u16();
    match answer.extensions().get::<crate::http::AuditTasks>() {
        Some(tasks) => {
            tracing::info!(peer = ?peer, %method, path = ?shown, token, status, tasks = %tasks.0, "API command")
        }
        None => tracing::info!(peer = ?peer, %method, path = ?shown, token, status, "API command"),
    }
    answer
}

/// A refusal of [`require_token`]: its status, code, message and the label of the token
/// presented, when it is a known one.
type Refused = (StatusCode, &'static str, String, Option<Arc<str>>);

/// Who presented `req`'s token, if `tokens` know it with the scope `needed`.
fn checked(tokens: &ApiTokens, req: &Request, needed: Scope) -> Result<Caller, Refused> {
    let presented = presented(req.headers().get(header::AUTHORIZATION))
        .map_err(|why| (StatusCode::UNAUTHORIZED, "unauthorized", why, None))?;
    let Some(presented) = presented else {
        let message = "this API needs a bearer token (Authorization: Bearer ...)";
        return Err((
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            message.into(),
            None,
        ));
    };
    match tokens.caller(presented) {
        None => Err((
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown token".into(),
            None,
        )),
        Some(caller) if caller.scope < needed => Err((
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this request needs the {} scope; the token given has the {} scope",
                needed.as_str(),
                caller.scope.as_str()
            ),
            Some(caller.label),
        )),
        Some(caller) => Ok(caller),
    }
}

/// The bearer token of an `Authorization` header, `None` without one (no header, another
/// scheme); `Err` says why a header that is there cannot be read as text (a byte that is not
/// visible ASCII: no token has one, [`ApiTokens::add_file`] refuses them).
fn presented(value: Option<&HeaderValue>) -> Result<Option<&str>, String> {
    let Some(value) = value else { return Ok(None) };
    match value.to_str() {
        Ok(text) => Ok(bearer_token(text)),
        Err(_) => Err(format!(
            "malformed Authorization header: {}; send Authorization: Bearer <token>, a token being visible ASCII",
            not_header_text(value.as_bytes()).map_or_else(
                || "it is not text".to_owned(),
                |(byte, column)| format!(
                    "byte {byte:#04x} at column {column} is not visible ASCII"
                )
            )
        )),
    }
}

/// The first byte of `bytes` an HTTP header value cannot carry as text (HeaderValue::to_str
/// takes visible ASCII, spaces and tabs), and its column (from 1).
fn not_header_text(bytes: &[u8]) -> Option<(u8, usize)> {
    let at = bytes
        .iter()
        .position(|&b| !(b == b'\t' || (b' '..=b'~').contains(&b)))?;
    Some((bytes[at], at + 1))
}

/// The token of an `Authorization: Bearer <token>` value; the scheme's name in any case
/// (RFC 7235: `bearer` is `Bearer`).
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refusals before any token check are logged within a budget a second (anyone who
    /// reaches the port sends them as fast as they like); the rest are counted.
    #[test]
    fn browser_guard_refusals_are_logged_within_a_budget_a_second() {
        let admitted = (0..200).filter(|_| refusal_logged()).count();
        assert!(
            admitted <= 2 * REFUSALS_LOGGED_PER_SEC as usize,
            "{admitted} of 200 logged (a second may have turned meanwhile)"
        );
    }

    /// A worker without a secret is checked against a decoy, as a known one is against its
    /// own: the same work (a signature computed and compared), so the time of a refusal does
    /// not tell which ids exist. (The timing itself is not asserted: on a shared machine it
    /// could not fail reliably; what is asserted is that the unknown id's path computes a
    /// signature under a real secret and is told it is not known.)
    #[tokio::test]
    async fn an_unknown_worker_is_checked_against_a_decoy_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("known"),
            b"a-secret-of-enough-length-0123456789",
        )
        .expect("write");
        let auth = WorkerAuth {
            fleet: None,
            dir: Some(dir.path().to_owned()),
            max_skew: tether_proto::auth::DEFAULT_MAX_SKEW,
            message_mac: false,
        };
        let id = |s: &str| WorkerId::parse(s).expect("id");
        let (_, known) = auth.secret_or_decoy(&id("known")).await.expect("read");
        assert!(known);
        let (decoy, known) = auth.secret_or_decoy(&id("stranger")).await.expect("read");
        assert!(!known);
        let at = tether_proto::msg::now();
        let challenge = |w: &WorkerId, secret: &Secret| {
            tether_proto::auth::Challenge {
                worker: w,
                nonce: "n",
                timestamp: at,
                boot_id: "b",
            }
            .sign(secret)
        };
        let (again, _) = auth.secret_or_decoy(&id("other")).await.expect("read");
        let w = id("stranger");
        assert_eq!(challenge(&w, &decoy), challenge(&w, &again), "one decoy");
    }

    #[tokio::test]
    async fn secret_files_no_registration_reads_are_listed_and_read_ones_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = b"a-secret-of-enough-length-0123456789";
        for name in ["w1", "worker 2", "w3#", "w5~", ".gitkeep"] {
            std::fs::write(dir.path().join(name), secret).expect("write");
        }
        std::fs::create_dir(dir.path().join("w4")).expect("mkdir");
        let auth = WorkerAuth {
            fleet: None,
            dir: Some(dir.path().to_owned()),
            max_skew: tether_proto::auth::DEFAULT_MAX_SKEW,
            message_mac: false,
        };
        let unread = auth.unread_secret_files().expect("listed");
        let names: Vec<&str> = unread.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["w3#", "w4", "worker 2"], "{unread:?}");
        assert!(unread[0].why.contains("not a worker id"), "{unread:?}");
        assert!(unread[1].why.contains("not a file"), "{unread:?}");
        // What is listed is what a registration cannot use, and the rest it can.
        let id = |s: &str| WorkerId::parse(s).expect("id");
        assert!(auth.secret_for(&id("w1")).await.expect("read").is_some());
        assert!(auth.secret_for(&id("w5~")).await.expect("read").is_some());
        let w4 = auth.secret_for(&id("w4")).await;
        assert!(matches!(w4, Err(SecretError::NotAFile { .. })), "{w4:?}");
        assert!(WorkerId::parse("worker 2").is_err());
        // No directory, nothing to list; a directory that cannot be read is an error.
        assert!(
            WorkerAuth::fleet(Secret::new(secret).expect("secret"))
                .unread_secret_files()
                .expect("none")
                .is_empty()
        );
        let gone = WorkerAuth {
            dir: Some(dir.path().join("missing")),
            ..auth
        };
        assert!(gone.unread_secret_files().is_err());
    }

    /// A worker's entry that is a link to `/dev/zero` or a FIFO is refused at once, unread:
    /// read whole, the one filled memory and the other held the registration until someone
    /// wrote to it (a registration names its id before it authenticates). A file too long is
    /// refused as too long, read no further than a secret's length.
    #[tokio::test]
    async fn a_secret_entry_that_is_no_regular_file_is_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("w-zero")).expect("symlink");
        nix::unistd::mkfifo(
            &dir.path().join("w-fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
        let long = std::fs::File::create(dir.path().join("w-long")).expect("create");
        long.set_len(1 << 30).expect("a sparse GiB");
        let auth = WorkerAuth {
            fleet: None,
            dir: Some(dir.path().to_owned()),
            max_skew: tether_proto::auth::DEFAULT_MAX_SKEW,
            message_mac: false,
        };
        for name in ["w-zero", "w-fifo", "w-long"] {
            let worker = WorkerId::parse(name).expect("id");
            let read = tokio::time::timeout(Duration::from_secs(10), auth.secret_for(&worker))
                .await
                .unwrap_or_else(|_| panic!("{name}: no answer within 10 s"));
            match name {
                "w-long" => assert!(
                    matches!(
                        read,
                        Err(SecretError::Unusable {
                            reason: AuthError::SecretTooLong,
                            ..
                        })
                    ),
                    "{name}: {read:?}"
                ),
                _ => assert!(
                    matches!(read, Err(SecretError::NotAFile { .. })),
                    "{name}: {read:?}"
                ),
            }
        }
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case_and_nothing_else_is_a_token() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    fn tokens() -> ApiTokens {
        let mut t = ApiTokens::default();
        t.add(
            &Secret::new(b"admin-token-0123456789").expect("t"),
            Scope::Admin,
        );
        t.add(
            &Secret::new(b"read-token-0123456789").expect("t"),
            Scope::Read,
        );
        t
    }

    /// A reload takes the files' tokens in place of those read before: a token added works,
    /// one removed is refused, in every clone (the server's and the signal handler's). A file
    /// that does not serve keeps every token in use.
    #[test]
    fn a_reload_takes_a_token_added_drops_one_removed_and_keeps_all_on_a_bad_file() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("admin.token");
        std::fs::write(&p, "# ops\nfirst-token-0123456789\n").expect("w");
        let mut t = ApiTokens::default();
        t.add_file(&p, Scope::Admin).expect("read");
        let served = t.clone();
        let caller = served.caller("first-token-0123456789").expect("known");
        assert_eq!(&*caller.label, "admin.token:2");
        std::fs::write(&p, "second-token-0123456789\n").expect("w");
        let r = t.reload().expect("reloaded");
        assert!(r.changed);
        assert_eq!((r.before, r.after), ((1, 0, 0), (1, 0, 0)));
        assert_eq!(served.scope_of("first-token-0123456789"), None);
        assert_eq!(
            served.scope_of("second-token-0123456789"),
            Some(Scope::Admin)
        );
        assert!(!t.reload().expect("again").changed);
        std::fs::write(&p, "second-token-0123456789\nshort\n").expect("w");
        let e = t.reload().expect_err("a bad file").to_string();
        assert!(
            e.contains("admin token file") && e.contains("line 2"),
            "{e}"
        );
        assert_eq!(
            served.scope_of("second-token-0123456789"),
            Some(Scope::Admin)
        );
        std::fs::remove_file(&p).expect("rm");
        assert!(t.reload().is_err());
        assert_eq!(
            served.scope_of("second-token-0123456789"),
            Some(Scope::Admin)
        );
    }

    /// A token file changed on disk is taken without a signal, by the watch.
    #[tokio::test]
    async fn a_token_file_changed_on_disk_is_taken_by_the_watch() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("read.token");
        std::fs::write(&p, "first-token-0123456789\n").expect("w");
        let mut t = ApiTokens::default();
        t.add_file(&p, Scope::Read).expect("read");
        let stop = tokio_util::sync::CancellationToken::new();
        let watch = tokio::spawn(t.clone().watch(Duration::from_millis(20), stop.clone()));
        std::fs::write(&p, "second-token-0123456789\n").expect("w");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while t.scope_of("second-token-0123456789").is_none() {
            assert!(std::time::Instant::now() < deadline, "not taken in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(t.scope_of("first-token-0123456789"), None);
        stop.cancel();
        watch.await.expect("watch ends on stop");
    }

    /// The fleet secret read again from its file: a new one is asked of registrations from
    /// then on; a file that holds none keeps the one in use.
    #[tokio::test]
    async fn a_fleet_secret_reload_takes_a_new_secret_and_keeps_it_on_a_bad_file() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("fleet.secret");
        std::fs::write(&p, "the-first-fleet-secret-0123\n").expect("w");
        let auth = WorkerAuth {
            fleet: Some(Fleet::from_file(&p).expect("fleet")),
            dir: None,
            max_skew: tether_proto::auth::DEFAULT_MAX_SKEW,
            message_mac: false,
        };
        let served = auth.clone();
        let w = WorkerId::parse("w1").expect("id");
        async fn secret(a: &WorkerAuth, w: &WorkerId) -> Vec<u8> {
            let s = a.secret_for(w).await.expect("read").expect("a secret");
            s.expose().to_vec()
        }
        assert_eq!(secret(&served, &w).await, b"the-first-fleet-secret-0123");
        let fleet = auth.fleet.as_ref().expect("fleet");
        assert!(!fleet.reload().expect("same"));
        std::fs::write(&p, "the-second-fleet-secret-0123\n").expect("w");
        assert!(fleet.reload().expect("new"));
        assert_eq!(secret(&served, &w).await, b"the-second-fleet-secret-0123");
        std::fs::write(&p, "short\n").expect("w");
        assert!(fleet.reload().is_err());
        assert_eq!(secret(&served, &w).await, b"the-second-fleet-secret-0123");
    }

    /// A metrics token reads `/metrics` and nothing else; a read token reads it too.
    #[test]
    fn a_metrics_scope_reads_metrics_only() {
        let get = Method::GET;
        assert_eq!(Scope::needed(&get, "/metrics"), Scope::Metrics);
        assert_eq!(Scope::needed(&get, "/api/v1/tasks"), Scope::Read);
        assert_eq!(Scope::needed(&get, "/api/v1/tasks/t-1"), Scope::Read);
        assert_eq!(Scope::needed(&Method::POST, "/metrics"), Scope::Admin);
        assert!(Scope::Metrics < Scope::Read && Scope::Read < Scope::Admin);
    }

    #[test]
    fn tokens_map_to_their_scope_and_unknown_tokens_to_none() {
        let t = tokens();
        assert_eq!(t.scope_of("admin-token-0123456789"), Some(Scope::Admin));
        assert_eq!(t.scope_of("read-token-0123456789"), Some(Scope::Read));
        assert_eq!(t.scope_of("read-token-012345678"), None);
        assert_eq!(t.scope_of(""), None);
        assert!(!format!("{t:?}").contains("token-0123"));
        assert_eq!(Scope::needed_for(&Method::GET), Scope::Read);
        assert_eq!(Scope::needed_for(&Method::POST), Scope::Admin);
        assert_eq!(Scope::needed_for(&Method::DELETE), Scope::Admin);
    }

    #[test]
    fn without_tokens_only_loopback_addresses_are_served() {
        let lo: SocketAddr = "127.0.0.1:8765".parse().expect("addr");
        let lo6: SocketAddr = "[::1]:8765".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:8765".parse().expect("addr");
        let lan: SocketAddr = "192.168.1.4:8765".parse().expect("addr");
        assert!(check_exposure(lo, None).is_ok());
        assert!(check_exposure(lo6, None).is_ok());
        assert!(check_exposure(any, None).is_err());
        assert!(check_exposure(lan, Some(&ApiTokens::default())).is_err());
        assert!(check_exposure(lan, Some(&tokens())).is_ok());
        let e = check_exposure(any, None).expect_err("exposed").to_string();
        assert!(e.contains("0.0.0.0:8765") && e.contains("token"), "{e}");
    }

    #[test]
    fn a_token_file_holds_one_token_per_line() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("admin");
        std::fs::write(&p, "first-token-0123456789\n\nsecond-token-0123456789\n").expect("w");
        let mut t = ApiTokens::default();
        assert_eq!(t.add_file(&p, Scope::Admin).expect("read"), 2);
        assert_eq!(t.scope_of("second-token-0123456789"), Some(Scope::Admin));
        std::fs::write(&p, "# the admin token\nshort\n").expect("w");
        let e = ApiTokens::default()
            .add_file(&p, Scope::Read)
            .expect_err("short");
        assert_eq!(
            e.to_string(),
            "the token on line 2 is not usable: 5 bytes, at least 16 are required"
        );
        std::fs::write(&p, "\n# only a comment\n").expect("w");
        let e = ApiTokens::default()
            .add_file(&p, Scope::Read)
            .expect_err("empty");
        assert!(matches!(e, TokenFileError::Empty), "{e}");
        assert!(e.to_string().contains("holds no token"), "{e}");
    }

    /// A token file is read to its bound and no further: one past it is refused, and a file
    /// without end (`/dev/zero`) is refused as well, not read into memory for good.
    #[test]
    fn a_token_file_past_its_bound_is_refused_unread() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("admin");
        let line = format!("{}\n", "t".repeat(63));
        let at_bound = line.repeat((MAX_TOKEN_FILE_LEN / 64) as usize);
        std::fs::write(&p, &at_bound).expect("w");
        let n = ApiTokens::default()
            .add_file(&p, Scope::Admin)
            .expect("at the bound");
        assert_eq!(n as u64, MAX_TOKEN_FILE_LEN / 64);
        std::fs::write(&p, format!("{at_bound}#")).expect("w");
        let e = ApiTokens::default()
            .add_file(&p, Scope::Admin)
            .expect_err("past the bound");
        assert!(matches!(e, TokenFileError::TooLarge), "{e}");
        assert!(e.to_string().contains("1 MiB"), "{e}");
        let zero = std::path::Path::new("/dev/zero");
        if zero.exists() {
            let e = read_token_file(zero).expect_err("endless");
            assert!(matches!(e, TokenFileError::TooLarge), "{e}");
        }
    }

    /// The one rule of what a token is: 16 to 4096 bytes of visible ASCII, spaces and tabs
    /// inside it too, one a line with the whitespace around it left out; each token a file
    /// takes is the one its `Authorization: Bearer` header presents, read back unchanged.
    #[test]
    fn a_token_is_a_line_of_16_to_4096_header_bytes_and_its_header_presents_it() {
        let longest = "t".repeat(MAX_SECRET_LEN);
        let text = format!(
            "# rotation\n\n  with spaces inside it\t\r\nwith\ttab inside-0123\n\
             exactly-16-bytes\n{longest}\n!\"#$%&'()*+,-./:;<=>?@[\\]^_`{{|}}~\n"
        );
        let read: Vec<(usize, &[u8])> = token_lines(text.as_bytes())
            .map(|(line, t)| (line, t.expect("a token")))
            .collect();
        let tokens: Vec<&[u8]> = read.iter().map(|(_, t)| *t).collect();
        assert_eq!(
            tokens,
            [
                &b"with spaces inside it"[..],
                b"with\ttab inside-0123",
                b"exactly-16-bytes",
                longest.as_bytes(),
                br##"!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~"##,
            ]
        );
        assert_eq!(
            read.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            [3, 4, 5, 6, 7]
        );
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("admin");
        std::fs::write(&p, &text).expect("w");
        let mut t = ApiTokens::default();
        assert_eq!(t.add_file(&p, Scope::Admin).expect("taken"), 5);
        for token in tokens {
            let token = std::str::from_utf8(token).expect("ASCII");
            let header = HeaderValue::from_str(&format!("Bearer {token}")).expect("a header");
            assert_eq!(
                presented(Some(&header)).map(|p| p.map(|p| t.scope_of(p))),
                Ok(Some(Some(Scope::Admin))),
                "{token:?}"
            );
        }
        let refused = |line: &str| {
            let mut lines = token_lines(line.as_bytes());
            let (_, token) = lines.next().expect("a line");
            token.expect_err("refused")
        };
        assert_eq!(refused("fifteen-bytes!!"), TokenError::TooShort { len: 15 });
        assert_eq!(
            refused(&format!("{longest}t")),
            TokenError::TooLong {
                len: MAX_SECRET_LEN + 1
            }
        );
        assert_eq!(
            refused("vertical\x0btab-0123456789"),
            TokenError::NotHeaderText {
                byte: 0x0b,
                column: 9
            }
        );
        assert_eq!(
            refused("nbsp\u{a0}inside-0123456789"),
            TokenError::NotHeaderText {
                byte: 0xc2,
                column: 5
            }
        );
        assert_eq!(token_lines(b"\n  \r\n# only comments\n").count(), 0);
    }

    /// A token line with a byte an `Authorization` header cannot carry as text (not visible
    /// ASCII: `ö`, a control character) is refused at load, by its line: taken, it could never
    /// be presented, and every request with it was told to send a token.
    #[test]
    fn a_token_that_no_header_can_carry_is_refused_by_its_line() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("admin");
        for (line, reason) in [
            ("prod-tökén-0123456789", "byte 0xc3 at column 7"),
            ("prod-token\x7f-0123456789", "byte 0x7f at column 11"),
            ("prod-token\x01-0123456789", "byte 0x01 at column 11"),
        ] {
            std::fs::write(&p, format!("good-token-0123456789\n{line}\n")).expect("w");
            let e = ApiTokens::default()
                .add_file(&p, Scope::Admin)
                .expect_err("refused")
                .to_string();
            assert!(e.starts_with("the token on line 2 is not usable: "), "{e}");
            assert!(e.contains(reason) && e.contains("visible ASCII"), "{e}");
        }
        // What a header carries as text is taken: punctuation, a space or tab inside.
        std::fs::write(&p, "prod token!\t~0123456789\r\n").expect("w");
        let mut t = ApiTokens::default();
        assert_eq!(t.add_file(&p, Scope::Admin).expect("taken"), 1);
        let header = HeaderValue::from_static("Bearer prod token!\t~0123456789");
        assert_eq!(
            presented(Some(&header)).map(|p| p.map(|p| t.scope_of(p))),
            Ok(Some(Some(Scope::Admin)))
        );
    }

    /// An `Authorization` header that is there but not text is called malformed, not missing:
    /// the client sent something, and is told what is wrong with it.
    #[test]
    fn an_authorization_header_that_is_not_text_is_malformed_not_missing() {
        assert_eq!(presented(None), Ok(None));
        let not_text =
            HeaderValue::from_bytes("Bearer prod-tökén-0123456789".as_bytes()).expect("obs-text");
        let e = presented(Some(&not_text)).expect_err("malformed");
        assert!(e.starts_with("malformed Authorization header"), "{e}");
        assert!(e.contains("visible ASCII"), "{e}");
        let basic = HeaderValue::from_static("Basic abc");
        assert_eq!(presented(Some(&basic)), Ok(None));
        let bearer = HeaderValue::from_static("Bearer abc");
        assert_eq!(presented(Some(&bearer)), Ok(Some("abc")));
    }
}
