//! `tether coordinator` and `tether worker`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tether_coordinator::CoordinatorConfig;
use tether_coordinator::auth::{ApiTokens, Fleet, Scope, WorkerAuth};
use tether_proto::WorkerId;
use tether_proto::auth::Secret;
use tether_worker::backoff::Jitter;
use tether_worker::{Agent, Executors, WorkerConfig};

use crate::settings::{self, Refused, duration_setting, parse_duration_arg, refuse};
use crate::size;

/// Default listen address of the coordinator.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8765";

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Address to listen on, HOST:PORT (worker endpoint and HTTP API; default 127.0.0.1:8765).
    #[arg(long, env = "TETHER_LISTEN")]
    listen: Option<String>,
    /// Directory of the database (default ./tether-data).
    #[arg(long, env = "TETHER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Heartbeat interval announced to workers (at least 10ms; default 5s).
    #[arg(long, value_parser = parse_duration_arg)]
    heartbeat_interval: Option<Duration>,
    /// Silence after which a session is closed (default 15s; longer than the interval).
    #[arg(long, value_parser = parse_duration_arg)]
    heartbeat_timeout: Option<Duration>,
    /// Heartbeats a second the whole fleet may send (default 1000; 0: no limit). A fleet
    /// larger than the budget times the interval is told a longer interval, and the timeout
    /// grows in proportion (10,000 workers: every 10 s, closed after 30 s of silence).
    #[arg(long, env = "TETHER_HEARTBEAT_BUDGET")]
    heartbeat_budget: Option<u32>,
    /// How long a runtime thread with no work waits before it parks, so that an idle fleet's
    /// frames are taken several a wake-up (e.g. `4ms`; at most 20 ms; default 0: off). Spends
    /// less CPU on a large idle fleet; a message that finds the coordinator idle waits up to
    /// this much longer.
    #[arg(long, env = "TETHER_IDLE_COALESCE", value_parser = parse_duration_arg)]
    idle_coalesce: Option<Duration>,
    /// Time a disconnected worker keeps its tasks before they move elsewhere (default 60s, at
    /// least 1s).
    #[arg(long, value_parser = parse_duration_arg)]
    lost_after: Option<Duration>,
    /// Largest frame accepted, bytes or with a unit, e.g. `16MiB` (at least 1MiB, 1048576;
    /// default 16 MiB).
    #[arg(long, value_parser = size::parse_usize)]
    max_frame: Option<usize>,
    /// Remove finished tasks, their results, state and checkpoints this long after they
    /// finished (e.g. `7d`; at least `1m`), and lost or stopped workers this long after they
    /// were last seen; kept forever when unset. A removed task's id may be submitted again:
    /// the new task numbers its attempts after the removed one's (for as long again: then
    /// the id is forgotten).
    #[arg(long, value_parser = parse_duration_arg)]
    retention: Option<Duration>,
    /// File holding the fleet secret workers authenticate with (turns authentication on).
    #[arg(long, env = "TETHER_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// File holding the next fleet secret, accepted beside --secret-file's during a rotation
    /// (workers move to it one at a time; then it becomes --secret-file). Both are read again
    /// on SIGHUP.
    #[arg(long, requires = "secret_file")]
    next_secret_file: Option<PathBuf>,
    /// Directory of per-worker secret files named by worker id (turns authentication on;
    /// a worker's own file wins over the fleet secret).
    #[arg(long, env = "TETHER_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// Largest clock difference accepted in a worker's signed registration (default 120s).
    #[arg(long, value_parser = parse_duration_arg)]
    auth_max_skew: Option<Duration>,
    /// Require an integrity tag (HMAC-SHA256, per-session key) on every frame both ways after
    /// registration; needs --secret-file or --secrets-dir.
    #[arg(long)]
    message_mac: bool,
    /// File of admin API tokens, one per line (turns API authentication on; needed to listen
    /// on a non-loopback address).
    #[arg(long, env = "TETHER_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File of read-only API tokens, one per line.
    #[arg(long, env = "TETHER_READ_TOKEN_FILE")]
    read_token_file: Option<PathBuf>,
    /// File of metrics API tokens, one per line: they read GET /metrics and nothing else (the
    /// credential to give a Prometheus scraper).
    #[arg(long, env = "TETHER_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<PathBuf>,
    /// Most connections open at once; more are closed at accept (default 16384).
    #[arg(long)]
    max_connections: Option<usize>,
    /// New connections per second accepted from one source address (default 20; burst: 5 s
    /// worth).
    #[arg(long)]
    connects_per_sec: Option<f64>,
    /// Apply --connects-per-sec to loopback clients too.
    #[arg(long)]
    limit_loopback: bool,
    /// Time a new connection has to complete its request (slow-loris guard; default 10s, at
    /// least 100ms).
    #[arg(long, value_parser = parse_duration_arg)]
    handshake_timeout: Option<Duration>,
    /// Time an HTTP connection that is not reading a request (idle between requests, or its
    /// reader stopped reading the answer) may move no byte either way before it is closed
    /// (default 60s, at least 100ms); event streams send a keep-alive at least every third of
    /// it. A worker session's connection is exempt.
    #[arg(long, value_parser = parse_duration_arg)]
    http_idle: Option<Duration>,
    /// Bytes a second an HTTP answer must move, on average, while its reader keeps it
    /// waiting; a reader slower than this for about --http-idle is cut (bytes a second or
    /// with a unit, e.g. `64KiB/s`; default 65536, 64 KiB; 1 to 134217728, 128 MiB).
    #[arg(long, value_parser = size::parse_rate)]
    min_answer_rate: Option<u64>,
    /// Messages per second of one worker session (default 2000; burst: 2 s worth); excess
    /// waits.
    #[arg(long)]
    max_messages_per_sec: Option<f64>,
    /// Decoded bytes per second of one worker session (bytes a second or with a unit, e.g.
    /// `64MiB/s`; default 67108864, 64 MiB; inflated, for compressed frames; burst: 4 s worth,
    /// at least one largest frame); excess waits. The largest frame must pass within a third
    /// of the heartbeat timeout.
    #[arg(long, value_parser = size::parse_rate_f64)]
    max_bytes_per_sec: Option<f64>,
    /// Bytes shared by the WebSocket connections that read past their own 64 KiB before they
    /// registered (long registrations of workers back with many unacknowledged results;
    /// bytes or with a unit, e.g. `64MiB`; default 67108864, 64 MiB).
    #[arg(long, value_parser = size::parse_usize)]
    registration_pool: Option<usize>,
    /// Largest HTTP request body, bytes or with a unit, e.g. `16MiB` (default 16777216,
    /// 16 MiB).
    #[arg(long, value_parser = size::parse_usize)]
    max_body: Option<usize>,
    /// Largest checkpoint of a task, bytes or with a unit, e.g. `64MiB` (default 67108864,
    /// 64 MiB; at most 1 GiB, the most a worker fetches; incomplete ones together: twice
    /// this).
    #[arg(long, value_parser = size::parse)]
    max_checkpoint_bytes: Option<u64>,
    /// PEM certificate chain: serve TLS (wss://, https://); needs --tls-key.
    #[arg(long, env = "TETHER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TETHER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// What an acknowledged result, state or checkpoint survives: `process` (the coordinator
    /// killed; the default) or `machine` (also an OS crash or power loss: one fsync per group
    /// commit).
    #[arg(long)]
    durability: Option<tether_coordinator::store::Durability>,
    /// Refuse zstd compression when a worker offers it: every frame goes as JSON text.
    #[arg(long)]
    no_compression: bool,
    /// Messages (or batches) of at least this many bytes of JSON go zstd-compressed, once a
    /// worker agreed to it (bytes or with a unit, e.g. `4KiB`; default 1024).
    #[arg(long, value_parser = size::parse_usize)]
    min_compress_size: Option<usize>,
    /// TOML settings file ([coordinator] table).
    #[arg(long, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
}

pub async fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    let file = settings::load(a.config.as_deref())?.coordinator;
    let listen = a
        .listen
        .clone()
        .or(file.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    // An error names a setting the config file gave by its key there, not by its flag; a value
    // the command line gave that is refused is a usage error.
    let keys = settings::keys(a.config.as_deref(), "coordinator");
    let path = a.config.clone();
    let said = |e: anyhow::Error| {
        let given = settings::given_outside_the_file;
        settings::said(e, "coordinator", path.as_deref(), &keys, given)
    };
    // Before anything is made: a value that is no address was refused only at the bind.
    listen_address("--listen", &listen).map_err(|r| said(r.into()))?;
    let coalesce = duration_setting!(a, file, idle_coalesce)
        .map(|wait| {
            crate::coalesce::check(wait).map_err(|e| {
                let shown = humantime::format_duration(wait);
                anyhow::Error::from(Refused::new("--idle-coalesce", format!("{shown}: {e}")))
            })
        })
        .transpose()
        .map_err(said)?;
    let (cfg, reload) = coordinator_setup(a, file).map_err(said)?;
    if let Some(wait) = coalesce {
        crate::coalesce::set(wait);
        tracing::info!(wait_us = wait.as_micros() as u64, "idle coalescing on");
    }
    match &cfg.auth {
        Some(auth) => {
            tracing::info!(
                fleet_secret = auth.fleet.is_some(),
                secrets_dir = ?auth.dir,
                message_mac = auth.message_mac,
                "workers must authenticate"
            );
            match auth.unread_secret_files() {
                Ok(unread) => {
                    for u in unread {
                        tracing::warn!(file = ?u.name, why = %u.why, "a file in the secrets directory that no worker's registration reads");
                    }
                }
                Err(e) => {
                    tracing::warn!(dir = ?auth.dir, error = %e, "the secrets directory cannot be listed; each registration reads its worker's file there")
                }
            }
        }
        None => tracing::warn!(
            "worker authentication is off: any client can register under any worker id \
             (give --secret-file or --secrets-dir)"
        ),
    }
    let listener = bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let shutdown = crate::cancel_on_signal();
    crate::signals::on_hangup(move || reload.run());
    tether_coordinator::run(listener, cfg, shutdown).await?;
    Ok(())
}

/// The coordinator's settings: each from its flag, else the file, else the library default.
/// The built-in executors' checks of task configs (`sleep`, `command`): a coordinator refuses
/// at submission a task that their executor would refuse at every attempt.
pub(crate) fn builtin_config_check() -> tether_coordinator::config::ConfigCheck {
    let builtin = tether_worker::Executors::builtin();
    tether_coordinator::config::ConfigCheck(std::sync::Arc::new(move |kind, config| {
        builtin.check_config(kind, config)
    }))
}

/// The shortest `--connect-timeout` the worker takes.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(100);

/// The shortest `--retention` the command takes.
const MIN_RETENTION: Duration = Duration::from_secs(60);

#[cfg(test)]
fn coordinator_config(
    a: CoordinatorArgs,
    file: settings::CoordinatorFile,
) -> anyhow::Result<CoordinatorConfig> {
    coordinator_setup(a, file).map(|(cfg, _)| cfg)
}

/// The coordinator's settings (what the tests' `coordinator_config` reads) and what a reload
/// reads again.
fn coordinator_setup(
    a: CoordinatorArgs,
    file: settings::CoordinatorFile,
) -> anyhow::Result<(CoordinatorConfig, crate::reload::Reload)> {
    let mut tls_files = None;
    let data_dir = a
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(|| tether_coordinator::config::DEFAULT_DATA_DIR.into());
    let mut cfg = CoordinatorConfig::new(data_dir);
    cfg.config_check = Some(builtin_config_check());
    if let Some(d) = duration_setting!(a, file, heartbeat_interval) {
        cfg.heartbeat_interval = d;
    }
    if let Some(d) = duration_setting!(a, file, heartbeat_timeout) {
        cfg.heartbeat_timeout = d;
    }
    if let Some(n) = a.heartbeat_budget.or(file.heartbeat_budget) {
        cfg.heartbeat_budget = n;
    }
    if let Some(d) = duration_setting!(a, file, lost_after) {
        cfg.lost_after = d;
    }
    if let Some(d) = duration_setting!(a, file, retention) {
        // Shorter, results would go before anyone reads them (`0s`: within a second).
        if d < MIN_RETENTION {
            refuse!(
                "--retention",
                "{} would remove a finished task and its results before most readers see them: at least {}s (or leave it unset to keep them)",
                humantime::format_duration(d),
                MIN_RETENTION.as_secs()
            );
        }
        cfg.retention = Some(d);
    }
    if let Some(n) = a.max_frame.or(file.max_frame.map(size::Bytes::usize)) {
        cfg.max_frame = n;
    }
    if let Some(n) = file.checkpoints_kept {
        cfg.checkpoints_kept = n;
    }
    if let Some(d) = a.durability.or(file.durability) {
        cfg.durability = d;
    }
    cfg.compression = !a.no_compression && file.compression.unwrap_or(true);
    if let Some(n) = a
        .min_compress_size
        .or(file.min_compress_size.map(size::Bytes::usize))
    {
        cfg.compress_threshold = n;
    }
    apply_limits(&mut cfg, &a, &file)?;
    // First: the library's own floor is lower.
    let min_frame = tether_coordinator::config::MIN_MAX_FRAME;
    if cfg.max_frame < min_frame {
        refuse!(
            "--max-frame",
            "{} is too small: at least {min_frame} bytes (a worker's checkpoint piece and a batch \
             frame must fit)",
            cfg.max_frame
        );
    }
    cfg.validate().map_err(as_flag)?;
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        warn_if_open(key, "the TLS private key");
        let (tls, files) = tether_coordinator::tls::server_config_with_files(cert, key)
            .with_context(|| {
                format!(
                    "TLS certificate {} with key {}",
                    cert.display(),
                    key.display()
                )
            })?;
        cfg.tls = Some(tls);
        tls_files = Some(files);
    }
    cfg.auth = worker_auth(
        (
            a.secret_file.or(file.secret_file),
            a.next_secret_file.or(file.next_secret_file),
        ),
        a.secrets_dir.or(file.secrets_dir),
        duration_setting!(a, file, auth_max_skew),
        a.message_mac || file.message_mac.unwrap_or(false),
    )?;
    cfg.api_tokens = api_tokens(
        a.admin_token_file.or(file.admin_token_file),
        a.read_token_file.or(file.read_token_file),
        a.metrics_token_file.or(file.metrics_token_file),
    )?;
    let reload = crate::reload::Reload {
        tokens: cfg.api_tokens.clone(),
        fleet: cfg.auth.as_ref().and_then(|a| a.fleet.clone()),
        secrets_dir: cfg.auth.as_ref().and_then(|a| a.dir.clone()),
        tls: tls_files,
    };
    Ok((cfg, reload))
}

/// Connection, message, body and checkpoint limits: flag, else file.
fn apply_limits(
    cfg: &mut CoordinatorConfig,
    a: &CoordinatorArgs,
    file: &settings::CoordinatorFile,
) -> anyhow::Result<()> {
    let l = &mut cfg.limits;
    if let Some(n) = a.max_connections.or(file.max_connections) {
        l.max_connections = n;
    }
    if let Some(r) = a.connects_per_sec.or(file.connects_per_sec) {
        if !(r.is_finite() && r > 0.0) {
            refuse!("--connects-per-sec", "must be a positive number");
        }
        l.connects_per_sec = r;
        l.connect_burst = (r * 5.0).ceil().min(f64::from(u32::MAX)) as u32;
    }
    l.limit_loopback = a.limit_loopback || file.limit_loopback.unwrap_or(false);
    if let Some(d) = duration_setting!(a, file, handshake_timeout) {
        l.handshake_timeout = d;
    }
    // Checked with the rest by `validate`.
    if let Some(d) = duration_setting!(a, file, http_idle) {
        l.http_idle = d;
    }
    if let Some(n) = a.min_answer_rate.or(file.min_answer_rate.map(|r| r.0)) {
        l.min_answer_rate = n;
    }
    if let Some(r) = a.max_messages_per_sec.or(file.max_messages_per_sec) {
        if !(r.is_finite() && r > 0.0) {
            refuse!("--max-messages-per-sec", "must be a positive number");
        }
        l.messages_per_sec = r;
        l.message_burst = (r * 2.0).ceil().min(f64::from(u32::MAX)) as u32;
    }
    if let Some(r) = a.max_bytes_per_sec.or(file.max_bytes_per_sec.map(|r| r.0)) {
        // How low it may go depends on the frame size and heartbeat timeout: `validate`.
        if !(r.is_finite() && r > 0.0) {
            refuse!("--max-bytes-per-sec", "must be a positive number");
        }
        l.bytes_per_sec = r;
        // At least one largest frame, which must pass whole.
        let burst = (r * 4.0).max(cfg.max_frame as f64);
        l.byte_burst = burst.ceil().min(f64::from(u32::MAX)) as u32;
    }
    if let Some(n) = a
        .registration_pool
        .or(file.registration_pool.map(size::Bytes::usize))
    {
        l.registration_pool = n;
    }
    if let Some(n) = a.max_body.or(file.max_body.map(size::Bytes::usize)) {
        cfg.max_body = n;
    }
    if let Some(n) = a
        .max_checkpoint_bytes
        .or(file.max_checkpoint_bytes.map(|b| b.0))
    {
        if n == 0 {
            refuse!("--max-checkpoint-bytes", "must be at least 1");
        }
        cfg.max_checkpoint_bytes = n;
    }
    Ok(())
}

/// API tokens from files; none when no file is given.
fn api_tokens(
    admin: Option<PathBuf>,
    read: Option<PathBuf>,
    metrics: Option<PathBuf>,
) -> anyhow::Result<Option<ApiTokens>> {
    if admin.is_none() && read.is_none() && metrics.is_none() {
        return Ok(None);
    }
    if admin.is_none() {
        tracing::warn!(
            "no admin tokens are given (--admin-token-file): no request can submit or control a task"
        );
    }
    let mut tokens = ApiTokens::default();
    let files = [
        (admin, Scope::Admin),
        (read, Scope::Read),
        (metrics, Scope::Metrics),
    ];
    for (file, scope) in files {
        if let Some(f) = file {
            warn_if_open(&f, "an API token file");
            tokens
                .add_file(&f, scope)
                .with_context(|| format!("{} token file {}", scope.as_str(), f.display()))?;
        }
    }
    Ok(Some(tokens))
}

/// Says so when `path` (a secret, or a directory of them) is open to other users: anyone who
/// reads a worker secret can register as that worker, an API token acts with its scope.
pub(crate) fn warn_if_open(path: &std::path::Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        let mode = format!("{mode:o}");
        tracing::warn!(path = %path.display(), mode, "{what} is readable by other users (chmod 600, or 700 for a directory)");
    }
}

/// Worker authentication from a fleet secret file and/or a per-worker directory.
fn worker_auth(
    (secret_file, next_file): (Option<PathBuf>, Option<PathBuf>),
    dir: Option<PathBuf>,
    max_skew: Option<Duration>,
    message_mac: bool,
) -> anyhow::Result<Option<WorkerAuth>> {
    if secret_file.is_none() && dir.is_none() {
        if message_mac {
            refuse!(
                "--message-mac",
                "needs worker authentication: give --secret-file or --secrets-dir"
            );
        }
        if max_skew.is_some() {
            refuse!(
                "--auth-max-skew",
                "needs worker authentication: give --secret-file or --secrets-dir"
            );
        }
        return Ok(None);
    }
    if let Some(skew) = max_skew
        && skew < tether_proto::auth::MIN_MAX_SKEW
    {
        refuse!(
            "--auth-max-skew",
            "{} is too small: at least {} (a registration takes that long on its way, and every \
             worker would be refused)",
            humantime::format_duration(skew),
            humantime::format_duration(tether_proto::auth::MIN_MAX_SKEW)
        );
    }
    if next_file.is_some() && secret_file.is_none() {
        refuse!(
            "--next-secret-file",
            "is accepted beside the fleet secret: give --secret-file too"
        );
    }
    let fleet = secret_file
        .inspect(|f| warn_if_open(f, "the fleet secret file"))
        .map(|f| Fleet::from_file(&f))
        .transpose()
        .context("fleet secret")?;
    let fleet = match (fleet, next_file) {
        (Some(f), Some(next)) => {
            warn_if_open(&next, "the next fleet secret file");
            Some(f.with_next_file(&next).context("next fleet secret")?)
        }
        (fleet, _) => fleet,
    };
    if let Some(d) = &dir {
        if !d.is_dir() {
            bail!("secrets directory {} is not a directory", d.display());
        }
        warn_if_open(d, "the worker secrets directory");
        // Files are read at each registration (they may be added while running); one that
        // cannot serve is said now, where the operator looks, not only when its worker fails.
        for entry in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_file()
                && let Err(e) = Secret::from_file(&path)
            {
                tracing::warn!(file = %path.display(), error = %e, "a worker's secret file is unusable; that worker will be refused");
            }
        }
    }
    Ok(Some(WorkerAuth {
        fleet,
        dir,
        max_skew: max_skew.unwrap_or(tether_proto::auth::DEFAULT_MAX_SKEW),
        message_mac,
    }))
}

/// A worker's SIGHUP: its secret file read again, registered with from its next connection
/// (a fleet secret rotated without a restart, which would stop its tasks; the session under
/// way keeps its key), or, the file unusable, the secret in use kept, said at ERROR. Its other
/// settings are read at start only. The worker and its tasks go on.
fn worker_hangup(secret_file: Option<&Path>, agent: &tether_worker::AgentHandle) {
    let Some(file) = secret_file else {
        tracing::info!(
            "SIGHUP: nothing to reload (no secret file; the worker reads its settings at start, \
             restart it with SIGTERM to change them); the worker and its tasks go on"
        );
        return;
    };
    match Secret::from_file(file) {
        Ok(secret) => {
            warn_if_open(file, "the worker secret file");
            agent.replace_secret(secret);
            tracing::info!(file = %file.display(), "SIGHUP: the worker secret read again; it signs the next registration (this session keeps its key); the worker and its tasks go on");
        }
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "SIGHUP: the worker secret file read again cannot serve; the secret in use is kept")
        }
    }
}

/// Environment variable holding a worker's secret itself (prefer a file); its `command` tasks
/// do not inherit it.
pub const SECRET_ENV: &str = tether_worker::executor::command::ENV_SECRET;

/// Makes this process's memory and `/proc` files (its environment, where `TETHER_SECRET` may
/// be) unreadable by other processes of its user, tasks included: they run as the worker's
/// user. Linux only; elsewhere nothing changes.
fn keep_memory_private() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot keep the worker's memory from its tasks (prctl)");
    }
}

/// Makes the process `cmd` starts die with this one (Linux: `PR_SET_PDEATHSIG`, SIGKILL): a
/// run (`stress`, `e2e`) killed with SIGKILL, which can clean nothing up, leaves no
/// coordinator, worker, fleet or proxy of its own behind. The signal comes when the thread that
/// started the child ends: these runs start theirs from their runtime's threads, which live as
/// long as the run. Elsewhere nothing changes.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = nix::unistd::getpid();
        // SAFETY: between fork and exec the closure makes only async-signal-safe calls
        // (prctl, getppid) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                // The parent died before the call: no signal will come.
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
                }
                Ok(())
            });
        }
    }
}

/// Makes the worker a child subreaper (Linux): a process its tasks leave behind when its
/// parent ends (a daemon, `setsid cmd &`) re-parents to the worker, which reaps it
/// (`tether_worker::reaper`), instead of to init. Elsewhere nothing changes.
fn adopt_orphans() {
    #[cfg(target_os = "linux")]
    if let Err(e) = tether_worker::reaper::become_subreaper() {
        tracing::warn!(error = %e, "cannot adopt the orphans of tasks (the worker is no subreaper)");
    }
}

/// Connections the kernel may hold for the coordinator before it accepts them (the kernel caps
/// it at `net.core.somaxconn`). A fleet reconnecting at once must not overflow the queue: a
/// dropped handshake costs that worker a SYN retransmission, 1 s and then 3 s.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// `value` of `flag` as [`bind`] takes it: `HOST:PORT`, the host an IP address (`[::1]` for
/// IPv6) or a name resolved at the bind, the port a number. Refused as a setting (a usage error
/// from the command line): one that is no address was an error of the run, found only once the
/// command had started. An address that parses but cannot be bound stays the run's error.
fn listen_address(flag: &str, value: &str) -> Result<(), Refused> {
    if value.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let named = value.rsplit_once(':').is_some_and(|(host, port)| {
        !host.trim().is_empty()
            && !host.contains(char::is_whitespace)
            && port.parse::<u16>().is_ok()
    });
    match named {
        true => Ok(()),
        false => Err(Refused::new(
            flag,
            format!(
                "{:?}{} is not an address to listen on: give HOST:PORT, e.g. {DEFAULT_LISTEN}",
                crate::cut_value(value),
                settings::by_env(flag)
            ),
        )),
    }
}

/// Binds like `TcpListener::bind` (address reuse on), with [`LISTEN_BACKLOG`].
async fn bind(listen: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
    }))
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Coordinator base URL (host:port, ws://, http://, wss://, https://) or endpoint URL.
    #[arg(long, env = "TETHER_COORDINATOR")]
    coordinator: Option<String>,
    /// This worker's id (letters, digits, . _ ~ - : @ +; at most 128 bytes).
    #[arg(long, env = "TETHER_WORKER_ID")]
    id: Option<WorkerId>,
    /// A capability tasks may require (repeatable; one given twice is taken once).
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// A key=value tag tasks may require (repeatable; a key given again with another value is
    /// refused: a worker carries one value a key).
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Tasks run at once (default 1).
    #[arg(long)]
    slots: Option<u32>,
    /// Directory where the outbox, identity, running tasks and checkpoints survive restarts.
    #[arg(long, env = "TETHER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Heartbeat interval (at least 10ms; default 5s).
    #[arg(long, value_parser = parse_duration_arg)]
    heartbeat_interval: Option<Duration>,
    /// Silence after which the session is declared dead and reconnected (default 15s). Each
    /// session starts at this value and raises it, never lowers it: to the heartbeat interval
    /// plus 4 x the p95 round-trip time of its heartbeats (at most 60s, or this value if
    /// longer), and to the coordinator's timeout when it stretches the heartbeat interval for a
    /// large fleet.
    #[arg(long, value_parser = parse_duration_arg)]
    heartbeat_timeout: Option<Duration>,
    /// First reconnect delay (at least 10ms; default 1s), doubled up to the maximum.
    #[arg(long, value_parser = parse_duration_arg)]
    initial_reconnect_delay: Option<Duration>,
    /// Longest reconnect delay, before jitter (default 60s; at least the first delay).
    #[arg(long, value_parser = parse_duration_arg)]
    max_reconnect_delay: Option<Duration>,
    /// `0.2` for +/-20 %, `full` for full jitter, `0` for none (default 0.2).
    #[arg(long)]
    reconnect_jitter: Option<String>,
    /// Consecutive failed connection attempts before giving up (at least 1; a lost session is not
    /// one; default: never give up).
    #[arg(long)]
    max_reconnect_attempts: Option<u32>,
    /// Limit on one TCP connect plus WebSocket handshake (default 10s).
    #[arg(long, value_parser = parse_duration_arg)]
    connect_timeout: Option<Duration>,
    /// Stopped (SIGTERM, ctrl-c) while it cannot reach the coordinator, with tasks running or
    /// results unacknowledged: how long to keep trying to reconnect to hand them back
    /// (default 10s; 0s stops at once, leaving them to the coordinator's grace period).
    #[arg(long, value_parser = parse_duration_arg)]
    stop_reconnect: Option<Duration>,
    /// Seed of the reconnect jitter (default: random; the seed in use is logged).
    #[arg(long)]
    seed: Option<u64>,
    /// Append one JSON line per session registered or lost and per result ack to this file.
    #[arg(long, env = "TETHER_EVENT_LOG")]
    event_log: Option<PathBuf>,
    /// Bytes the event log's file may reach: a record that would take it past them first
    /// renames it to FILE.1 (replacing an older one) and starts a new FILE, so the log keeps at
    /// most about twice this (bytes or with a unit, e.g. `64MiB`; default 67108864, 64 MiB; at
    /// least 65536, 64 KiB).
    #[arg(long, value_parser = size::parse)]
    event_log_max_bytes: Option<u64>,
    /// File holding this worker's secret (or the fleet secret); TETHER_SECRET may hold the
    /// secret itself. Never a flag value, so it never shows in `ps`.
    #[arg(long, env = "TETHER_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// Refuse a coordinator that does not ask for an integrity tag on every frame (it would
    /// otherwise be used whenever the coordinator asks); needs a secret.
    #[arg(long)]
    message_mac: bool,
    /// Most messages the outbox holds while offline; producers (tasks) wait beyond it (default
    /// 10000).
    #[arg(long)]
    max_outbox_entries: Option<usize>,
    /// Most bytes the outbox holds while offline; producers (tasks) wait beyond it (bytes or
    /// with a unit, e.g. `64MiB`; default 67108864, 64 MiB).
    #[arg(long, value_parser = size::parse_usize)]
    max_outbox_bytes: Option<usize>,
    /// Do not offer zstd compression: every frame goes as JSON text.
    #[arg(long)]
    no_compression: bool,
    /// Messages (or batches) of at least this many bytes of JSON go zstd-compressed, once the
    /// coordinator agreed to it (bytes or with a unit, e.g. `4KiB`; default 1024).
    #[arg(long, value_parser = size::parse_usize)]
    min_compress_size: Option<usize>,
    /// PEM certificates to trust for a wss:// coordinator (default: the system's roots).
    #[arg(long, env = "TETHER_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// TOML settings file ([worker] table).
    #[arg(long, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9465); off by default.
    #[arg(long, env = "TETHER_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

impl WorkerArgs {
    /// What clap cannot check value by value, found before anything is read or made (`main`
    /// makes it a usage error, exit 2): a `--tag` key given twice with different values.
    pub(crate) fn check(&self) -> Result<(), String> {
        crate::one_value_a_key("--tag", &self.tags, "a worker carries one value a key")
    }
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("tag {s:?} is not key=value"))
}

fn parse_jitter(s: &str) -> Result<Jitter, String> {
    match s {
        "full" => Ok(Jitter::Full),
        "0" | "none" => Ok(Jitter::None),
        n => match n.parse::<f64>() {
            Ok(j) if (0.0..=1.0).contains(&j) => Ok(Jitter::Proportional(j)),
            Ok(j) => Err(format!("{j} is outside 0..=1")),
            Err(_) => Err(format!(
                "{:?} is not a fraction or `full`",
                crate::cut_value(n)
            )),
        },
    }
}

/// Where a worker's secret comes from.
#[derive(Debug, PartialEq)]
enum SecretSource {
    File(PathBuf),
    Env(std::ffi::OsString),
}

/// The worker's secret, by the order of every setting: `--secret-file` (or its environment
/// variable, `TETHER_SECRET_FILE`), then `TETHER_SECRET`, then the config file's `secret_file`.
/// A source passed over is said in the log: two secrets given, one is ignored.
fn secret_source(
    flag: Option<PathBuf>,
    env: Option<std::ffi::OsString>,
    in_file: Option<PathBuf>,
) -> Option<SecretSource> {
    match (flag, env, in_file) {
        (Some(f), env, in_file) => {
            if env.is_some() || in_file.is_some() {
                tracing::warn!(file = %f.display(), "the worker secret comes from --secret-file (or TETHER_SECRET_FILE); {SECRET_ENV} and the config file's secret_file, if set, are ignored");
            }
            Some(SecretSource::File(f))
        }
        (None, Some(v), in_file) => {
            if let Some(f) = in_file {
                tracing::warn!(ignored = %f.display(), "the worker secret comes from {SECRET_ENV}; the config file's secret_file is ignored");
            }
            Some(SecretSource::Env(v))
        }
        (None, None, in_file) => in_file.map(SecretSource::File),
    }
}

#[cfg(test)]
pub fn worker_config(a: WorkerArgs) -> anyhow::Result<WorkerConfig> {
    worker_setup(a).map(|(cfg, _)| cfg)
}

/// The worker's configuration, and the file its secret came from (read again on SIGHUP), if
/// one did.
fn worker_setup(a: WorkerArgs) -> anyhow::Result<(WorkerConfig, Option<PathBuf>)> {
    let file = settings::load(a.config.as_deref())?.worker;
    let coordinator = a.coordinator.or(file.coordinator).ok_or(settings::Missing(
        "--coordinator is required (or TETHER_COORDINATOR, or coordinator in the config file)",
    ))?;
    // The flag's (or TETHER_WORKER_ID's) was checked as the arguments were read.
    let id = match (a.id, file.id) {
        (Some(id), _) => id,
        (None, Some(id)) => WorkerId::parse(&id).with_context(|| {
            format!(
                "id in the config file: {:?} is no worker id",
                crate::cut_value(&id)
            )
        })?,
        (None, None) => Err(settings::Missing(
            "--id is required (or TETHER_WORKER_ID, or id in the config file)",
        ))?,
    };
    // Here, with the other settings (a usage error naming the flag, or the variable or the
    // file's key that gave it), not when the agent is built: that was an error of the run,
    // naming no flag, after the worker had started.
    if let Err(e) = tether_proto::endpoint::derive_endpoint(&coordinator, &id) {
        let mut why = e.to_string();
        if let std::borrow::Cow::Owned(cut) = crate::cut_value(&coordinator) {
            why = why.replace(&format!("{coordinator:?}"), &format!("{cut:?}"));
        }
        let by = settings::env_of("--coordinator")
            .map_or_else(String::new, |v| format!("(given by {v}) "));
        let refused = Refused::new("--coordinator", format!("{by}refused: {why}"));
        // A URL that names another worker is refused for the id as much as for itself.
        let mismatch = matches!(
            e,
            tether_proto::endpoint::EndpointError::WorkerIdMismatch { .. }
        );
        return Err(match mismatch {
            true => refused.with("--id"),
            false => refused,
        }
        .into());
    }
    let mut cfg = WorkerConfig::new(coordinator, id);
    let mut caps = if a.capabilities.is_empty() {
        file.capabilities.unwrap_or_default()
    } else {
        a.capabilities
    };
    // A capability named twice is one: taken once, in the order first given (each counted
    // against the registration's bound, they could refuse a worker that has few).
    let mut seen = std::collections::HashSet::new();
    caps.retain(|c| seen.insert(c.clone()));
    cfg.capabilities = caps;
    cfg.tags = if a.tags.is_empty() {
        file.tags.unwrap_or_default()
    } else {
        a.tags.into_iter().collect()
    };
    if let Some(n) = a.slots.or(file.slots) {
        if n == 0 {
            refuse!("--slots", "must be at least 1");
        }
        cfg.slots = n;
    }
    cfg.state_dir = a.state_dir.or(file.state_dir);
    if let Some(d) = duration_setting!(a, file, heartbeat_interval) {
        cfg.heartbeat_interval = d;
    }
    if let Some(d) = duration_setting!(a, file, heartbeat_timeout) {
        cfg.heartbeat_timeout = d;
    }
    if let Some(d) = duration_setting!(a, file, initial_reconnect_delay) {
        cfg.backoff.initial = d;
    }
    if let Some(d) = duration_setting!(a, file, max_reconnect_delay) {
        cfg.backoff.max = d;
    }
    if let Some(j) = a.reconnect_jitter.or(file.reconnect_jitter) {
        cfg.backoff.jitter = parse_jitter(&j).map_err(|e| Refused::new("--reconnect-jitter", e))?;
    }
    cfg.backoff.max_attempts = a.max_reconnect_attempts.or(file.max_reconnect_attempts);
    if let Some(d) = a.connect_timeout {
        // Shorter, no connect could finish: the worker would retry for ever, failing each.
        if d < MIN_CONNECT_TIMEOUT {
            refuse!(
                "--connect-timeout",
                "{} is too short: at least {} ms",
                humantime::format_duration(d),
                MIN_CONNECT_TIMEOUT.as_millis()
            );
        }
        cfg.connect_timeout = d;
    }
    if let Some(d) = duration_setting!(a, file, stop_reconnect) {
        cfg.stop_reconnect = d;
    }
    cfg.seed = a.seed;
    cfg.event_log = a.event_log;
    if let Some(n) = a
        .event_log_max_bytes
        .or(file.event_log_max_bytes.map(|b| b.0))
    {
        cfg.event_log_max_bytes = n;
    }
    cfg.ca_file = a.ca_file;
    let mut secret_file = None;
    cfg.secret = match secret_source(
        a.secret_file,
        std::env::var_os(SECRET_ENV),
        file.secret_file,
    ) {
        Some(SecretSource::File(f)) => {
            warn_if_open(&f, "the worker secret file");
            let secret = Secret::from_file(&f).context("worker secret")?;
            secret_file = Some(f);
            Some(secret)
        }
        Some(SecretSource::Env(v)) => Some(
            Secret::new(v.as_encoded_bytes())
                .with_context(|| format!("worker secret in {SECRET_ENV}"))?,
        ),
        None => None,
    };
    if cfg.secret.is_some() {
        keep_memory_private();
    }
    cfg.require_message_mac = a.message_mac || file.message_mac.unwrap_or(false);
    if let Some(n) = a.max_outbox_entries.or(file.max_outbox_entries) {
        if n == 0 {
            refuse!("--max-outbox-entries", "must be at least 1");
        }
        cfg.outbox.max_entries = n;
    }
    if let Some(n) = a
        .max_outbox_bytes
        .or(file.max_outbox_bytes.map(size::Bytes::usize))
    {
        if n == 0 {
            refuse!("--max-outbox-bytes", "must be at least 1");
        }
        cfg.outbox.max_bytes = n;
    }
    cfg.compression = !a.no_compression && file.compression.unwrap_or(true);
    if let Some(n) = a
        .min_compress_size
        .or(file.min_compress_size.map(size::Bytes::usize))
    {
        cfg.compress_threshold = n;
    }
    if cfg.require_message_mac && cfg.secret.is_none() {
        refuse!(
            "--message-mac",
            "needs this worker's secret: give --secret-file, TETHER_SECRET_FILE or TETHER_SECRET"
        );
    }
    cfg.validate().map_err(as_flag)?;
    Ok((cfg, secret_file))
}

/// A library's refusal of a setting, in terms of the flag that gives it (the same key, with
/// underscores, in the configuration file).
fn as_flag(e: tether_proto::settings::ConfigError) -> Refused {
    let flag = |field: &str| match field {
        "backoff.initial" => "--initial-reconnect-delay".to_owned(),
        "backoff.max" => "--max-reconnect-delay".to_owned(),
        "backoff.max_attempts" => "--max-reconnect-attempts".to_owned(),
        // Repeatable flags, named as one is given.
        "capabilities" => "--capability".to_owned(),
        "tags" => "--tag".to_owned(),
        field => format!("--{}", field.replace('_', "-")),
    };
    // The reason may name another setting (a cap below the first delay).
    let why = e.why.replace("backoff.initial", &flag("backoff.initial"));
    // The other settings each refusal weighs the field against: a usage error when none came
    // from the config file (`settings::said`).
    let with: &[&str] = match e.field {
        "heartbeat_timeout" | "max_messages_per_sec" => &["--heartbeat-interval"],
        "backoff.max" => &["--initial-reconnect-delay"],
        "max_bytes_per_sec" => &["--max-frame", "--heartbeat-timeout"],
        _ => &[],
    };
    with.iter()
        .fold(Refused::new(flag(e.field), why), |r, f| r.with(f))
}

pub async fn worker(mut a: WorkerArgs) -> anyhow::Result<()> {
    let metrics_listen = a.metrics_listen.take();
    let keys = settings::keys(a.config.as_deref(), "worker");
    let path = a.config.clone();
    let said = |e: anyhow::Error| {
        let given = settings::given_outside_the_file;
        settings::said(e, "worker", path.as_deref(), &keys, given)
    };
    // With the other settings: it was refused only at its bind, after the worker had started.
    if let Some(addr) = &metrics_listen {
        listen_address("--metrics-listen", addr).map_err(|r| said(r.into()))?;
    }
    let (cfg, secret_file) = worker_setup(a).map_err(said)?;
    adopt_orphans();
    let agent = Agent::new(cfg, Executors::builtin())?;
    // The first signal stops the worker gracefully (its tasks stop, what they leave is sent,
    // up to 10 s); a second one ends it now, its tasks' processes killed, not left behind.
    let shutdown = crate::cancel_on_signals(Some(Box::new(|| {
        tracing::error!(
            "a second stop signal: the tasks' processes are killed and the worker exits now (results not acknowledged stay in its --state-dir, if it has one)"
        );
        let killed = tether_worker::executor::command::kill_all_now();
        tracing::error!(killed, "exiting");
        std::process::exit(130);
    })));
    // A terminal's hangup, or a "reload" habit, no longer ends the worker with its tasks.
    let handle = agent.handle();
    crate::signals::on_hangup(move || worker_hangup(secret_file.as_deref(), &handle));
    let metrics = match metrics_listen {
        Some(addr) => {
            // Before the agent runs, so nothing it records is missed.
            tether_worker::metrics::install();
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for metrics"))?;
            let serve =
                tether_worker::metrics::serve(listener, agent.handle(), shutdown.child_token());
            Some(tokio::spawn(serve))
        }
        None => None,
    };
    let result = agent.run(shutdown.clone()).await;
    shutdown.cancel();
    if let Some(m) = metrics {
        match m.await {
            Ok(Err(e)) => tracing::error!(error = %e, "metrics endpoint failed"),
            Err(e) => tracing::error!(error = %e, "metrics endpoint panicked"),
            Ok(Ok(())) => {}
        }
    }
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `HOST:PORT` as the bind resolves it is taken (an IP address, IPv6 in brackets, a name);
    /// anything else is refused naming the flag: it was refused only at the bind.
    #[test]
    fn a_listen_address_is_host_and_port() {
        for ok in [
            "127.0.0.1:8765",
            "0.0.0.0:0",
            "[::1]:80",
            "localhost:9465",
            "coordinator.example:1",
        ] {
            assert!(listen_address("--listen", ok).is_ok(), "{ok}");
        }
        for bad in [
            "notanaddr",
            "127.0.0.1",
            ":80",
            "host:",
            "host:99999",
            "a b:1",
            "",
        ] {
            let e = listen_address("--listen", bad).expect_err(bad).to_string();
            assert!(
                e.starts_with(&format!("--listen {bad:?} is not an address to listen on")),
                "{e}"
            );
        }
    }

    /// The coordinator refuses at submission a `command` task whose `shell` script is empty
    /// or blank (it ran nothing and "completed"), as it refuses an empty `program`, by the
    /// executor's own check; a script and a program are taken.
    #[test]
    fn a_blank_shell_script_is_refused_by_the_submission_check() {
        let check = builtin_config_check();
        for blank in [r#"{"shell": ""}"#, r#"{"shell": " \n\t"}"#] {
            let said = (check.0)("command", blank);
            assert!(
                matches!(&said, Some(Err(why)) if why.contains("`shell` is empty")),
                "{blank}: {said:?}"
            );
        }
        for taken in [r#"{"shell": "true"}"#, r#"{"program": "true"}"#] {
            assert_eq!((check.0)("command", taken), Some(Ok(())), "{taken}");
        }
        // A kind no executor takes is left alone (the coordinator knows nothing of it).
        assert_eq!((check.0)("other", r#"{"shell": ""}"#), None);
    }

    /// The help of `--listen` and `--data-dir` says the defaults the command applies (not a
    /// clap default, which would hide the config file's value).
    #[test]
    fn the_coordinator_help_says_the_defaults_in_use() {
        let cmd = <crate::Cli as clap::CommandFactory>::command();
        let coord = cmd.find_subcommand("coordinator").expect("coordinator");
        let help = |long: &str| {
            let arg = coord.get_arguments().find(|a| a.get_long() == Some(long));
            let arg = arg.expect(long);
            assert!(
                arg.get_default_values().is_empty(),
                "{long}: a clap default"
            );
            arg.get_help().map(ToString::to_string).unwrap_or_default()
        };
        assert!(help("listen").contains(&format!("default {DEFAULT_LISTEN}")));
        let data_dir = tether_coordinator::config::DEFAULT_DATA_DIR;
        assert!(help("data-dir").contains(&format!("default {data_dir}")));
    }

    #[derive(Parser)]
    struct Coord {
        #[command(flatten)]
        a: CoordinatorArgs,
    }

    #[derive(Parser)]
    struct Work {
        #[command(flatten)]
        a: WorkerArgs,
    }

    fn file(dir: &std::path::Path, text: &str) -> PathBuf {
        let p = dir.join("tether.toml");
        std::fs::write(&p, text).expect("write config");
        p
    }

    /// The coordinator's config from `flags` beside a file in `dir` whose `[coordinator]`
    /// table holds `lines`.
    fn coordinator_from(
        dir: &std::path::Path,
        lines: &str,
        flags: &[&str],
    ) -> anyhow::Result<CoordinatorConfig> {
        let toml = file(dir, &format!("[coordinator]\n{lines}"));
        let mut args = vec!["t", "--config", toml.to_str().expect("utf-8")];
        args.extend_from_slice(flags);
        let a = Coord::try_parse_from(args).expect("flags").a;
        let file = settings::load(a.config.as_deref())
            .expect("file")
            .coordinator;
        coordinator_config(a, file)
    }

    #[test]
    fn every_coordinator_limit_comes_from_its_flag_else_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let toml = file(
            dir.path(),
            "[coordinator]\nmax_connections = 100\nconnects_per_sec = 3.0\nlimit_loopback = true\n\
             handshake_timeout = \"4s\"\nmax_messages_per_sec = 50.0\nmax_body = 4096\n\
             max_checkpoint_bytes = 1000000\nmax_frame = 2097152\nmax_bytes_per_sec = 4194304.0\n\
             registration_pool = 1024\n",
        );
        let parse = |flags: &[&str]| {
            let c = Coord::try_parse_from(["t"].iter().chain(flags)).expect("flags");
            let f = settings::load(Some(&toml)).expect("file").coordinator;
            coordinator_config(c.a, f)
        };
        let cfg = parse(&[]).expect("config");
        let l = &cfg.limits;
        assert_eq!(l.max_connections, 100);
        assert_eq!(l.connects_per_sec, 3.0);
        assert!(l.limit_loopback);
        assert_eq!(l.handshake_timeout, Duration::from_secs(4));
        assert_eq!(l.messages_per_sec, 50.0);
        assert_eq!(cfg.max_body, 4096);
        assert_eq!(cfg.max_checkpoint_bytes, 1_000_000);
        assert_eq!(cfg.max_frame, 2_097_152);
        assert_eq!((l.bytes_per_sec, l.byte_burst), (4_194_304.0, 16_777_216));
        assert_eq!(l.registration_pool, 1024);
        // A flag wins over the file.
        let cfg = parse(&["--max-connections", "7", "--max-checkpoint-bytes", "99"]).expect("c");
        assert_eq!(cfg.limits.max_connections, 7);
        assert_eq!(cfg.max_checkpoint_bytes, 99);
        // Nonsense is refused with the setting's name.
        let e = parse(&["--max-checkpoint-bytes", "0"]).expect_err("zero");
        assert!(e.to_string().contains("max-checkpoint-bytes"), "{e}");
        // 2 MiB frames (the file's) at 64 KiB/s would hold a session 32 s.
        let e = parse(&["--max-bytes-per-sec", "65536"]).expect_err("too few");
        assert!(e.to_string().contains("--max-bytes-per-sec"), "{e}");
        let e = parse(&["--max-bytes-per-sec=-1"]).expect_err("negative");
        assert!(e.to_string().contains("max-bytes-per-sec"), "{e}");
        let e = parse(&["--max-messages-per-sec=-1"]).expect_err("negative");
        assert!(e.to_string().contains("max-messages-per-sec"), "{e}");
        let e = parse(&["--message-mac"]).expect_err("no secret");
        assert!(e.to_string().contains("--message-mac"), "{e}");
    }

    /// Every key the file's `[table]` accepts: serde's error for an unknown key names them all.
    fn file_keys(table: &str) -> Vec<String> {
        let e = toml::from_str::<settings::FileConfig>(&format!("[{table}]\nno_such_key = 1\n"))
            .expect_err("an unknown key");
        let msg = e.to_string();
        let list = msg
            .split("expected one of")
            .nth(1)
            .unwrap_or_else(|| panic!("no key list in {msg:?}"));
        let mut keys: Vec<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    /// A secret file and a directory, for the keys that need one.
    fn secret_files(dir: &std::path::Path) -> (String, String) {
        let secret = dir.join("secret");
        std::fs::write(&secret, "a secret of the dead-key test, long enough").expect("secret");
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(&secrets).expect("secrets dir");
        let q = |p: PathBuf| format!("{:?}", p.display().to_string());
        (q(secret), q(secrets))
    }

    /// The fleet secret is kept with a next one and without: `--secret-file` alone once
    /// (9d33ca4) left the coordinator with no fleet secret, refusing every worker's
    /// registration as signed with a wrong secret.
    #[test]
    fn the_fleet_secret_is_kept_with_or_without_a_next_one() {
        let dir = tempfile::tempdir().expect("dir");
        let _ = secret_files(dir.path());
        let secret = dir.path().join("secret");
        for next in [None, Some(secret.clone())] {
            let auth = worker_auth((Some(secret.clone()), next.clone()), None, None, false)
                .expect("auth")
                .expect("on");
            assert!(auth.fleet.is_some(), "no fleet secret with next {next:?}");
        }
    }

    #[test]
    fn every_coordinator_key_of_the_file_changes_the_configuration() {
        let dir = tempfile::tempdir().expect("dir");
        let (secret, secrets) = secret_files(dir.path());
        let auth = format!("secret_file = {secret}");
        // Read where the coordinator starts (`coordinator()`), not by `coordinator_config`.
        let at_start = ["idle_coalesce", "listen"];
        // key = a value other than the default; lines every case of the key starts from.
        let cases: Vec<(&str, String, String)> = vec![
            ("data_dir", "\"/elsewhere\"".into(), String::new()),
            ("heartbeat_interval", "\"7s\"".into(), String::new()),
            ("heartbeat_timeout", "\"41s\"".into(), String::new()),
            ("heartbeat_budget", "77".into(), String::new()),
            ("lost_after", "\"9m\"".into(), String::new()),
            ("max_frame", "2000000".into(), String::new()),
            ("checkpoints_kept", "9".into(), String::new()),
            ("retention", "\"3d\"".into(), String::new()),
            ("secret_file", secret.clone(), String::new()),
            ("secrets_dir", secrets.clone(), String::new()),
            ("next_secret_file", secret.clone(), auth.clone()),
            ("auth_max_skew", "\"77s\"".into(), auth.clone()),
            ("message_mac", "true".into(), auth.clone()),
            ("max_connections", "7".into(), String::new()),
            ("connects_per_sec", "3.5".into(), String::new()),
            ("limit_loopback", "true".into(), String::new()),
            ("handshake_timeout", "\"4s\"".into(), String::new()),
            ("http_idle", "\"90s\"".into(), String::new()),
            ("min_answer_rate", "1048576".into(), String::new()),
            ("max_messages_per_sec", "50.0".into(), String::new()),
            ("max_bytes_per_sec", "33554432.0".into(), String::new()),
            ("registration_pool", "1024".into(), String::new()),
            ("max_body", "4096".into(), String::new()),
            ("max_checkpoint_bytes", "1000000".into(), String::new()),
            ("admin_token_file", secret.clone(), String::new()),
            ("read_token_file", secret.clone(), String::new()),
            ("metrics_token_file", secret.clone(), String::new()),
            ("durability", "\"machine\"".into(), String::new()),
            ("compression", "false".into(), String::new()),
            ("min_compress_size", "4096".into(), String::new()),
        ];
        let mut covered: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
        covered.extend(at_start.map(str::to_owned));
        covered.sort();
        assert_eq!(
            covered,
            file_keys("coordinator"),
            "every key has a case here"
        );
        let config = |lines: &str| {
            let toml = file(dir.path(), &format!("[coordinator]\n{lines}\n"));
            let c = Coord::try_parse_from(["t"]).expect("no flags");
            let f = settings::load(Some(&toml)).expect("file").coordinator;
            format!("{:?}", coordinator_config(c.a, f).expect("config"))
        };
        // The same file gives the same configuration, so a difference is the key's doing.
        assert_eq!(config(&auth), config(&auth));
        for (key, value, base) in &cases {
            let with = config(&format!("{base}\n{key} = {value}"));
            assert_ne!(with, config(base), "{key} = {value} changed nothing");
        }
    }

    /// The `--help` text of `cmd`'s `--flag`, its lines joined by single spaces.
    fn help_of(cmd: &clap::Command, flag: &str) -> String {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .unwrap_or_else(|| panic!("--{flag}"));
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        help.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// The defaults a flag's help states are the ones in force (a help text cannot name the
    /// constant it describes).
    #[test]
    fn the_defaults_the_help_states_are_the_ones_in_force() {
        use clap::CommandFactory;
        use tether_coordinator::config as cc;
        let secs = |d: Duration| format!("default {}s", d.as_secs());
        let coord: Vec<(&str, String)> = vec![
            ("heartbeat-timeout", secs(cc::DEFAULT_HEARTBEAT_TIMEOUT)),
            ("lost-after", secs(cc::DEFAULT_LOST_AFTER)),
            ("auth-max-skew", secs(tether_proto::auth::DEFAULT_MAX_SKEW)),
            (
                "max-connections",
                format!("default {}", cc::DEFAULT_MAX_CONNECTIONS),
            ),
            (
                "connects-per-sec",
                format!("default {}", cc::DEFAULT_CONNECTS_PER_SEC),
            ),
            ("handshake-timeout", secs(cc::DEFAULT_HANDSHAKE_TIMEOUT)),
            ("http-idle", secs(cc::DEFAULT_HTTP_IDLE)),
            (
                "min-answer-rate",
                format!("default {}", cc::DEFAULT_MIN_ANSWER_RATE),
            ),
            (
                "max-messages-per-sec",
                format!("default {}", cc::DEFAULT_MESSAGES_PER_SEC),
            ),
            (
                "max-bytes-per-sec",
                format!("default {}", cc::DEFAULT_BYTES_PER_SEC),
            ),
            (
                "registration-pool",
                format!("default {}", cc::DEFAULT_REGISTRATION_POOL),
            ),
            ("max-body", format!("default {}", cc::DEFAULT_MAX_BODY)),
            (
                "max-checkpoint-bytes",
                format!("default {}", cc::DEFAULT_MAX_CHECKPOINT_BYTES),
            ),
        ];
        let worker: Vec<(&str, String)> = vec![
            (
                "slots",
                format!("default {}", tether_worker::config::DEFAULT_SLOTS),
            ),
            (
                "reconnect-jitter",
                format!("default {}", tether_worker::backoff::DEFAULT_JITTER),
            ),
            (
                "heartbeat-timeout",
                secs(tether_worker::config::DEFAULT_HEARTBEAT_TIMEOUT),
            ),
            (
                "connect-timeout",
                secs(tether_worker::config::DEFAULT_CONNECT_TIMEOUT),
            ),
            (
                "max-outbox-entries",
                format!("default {}", tether_worker::outbox::DEFAULT_MAX_ENTRIES),
            ),
            (
                "max-outbox-bytes",
                format!("default {}", tether_worker::outbox::DEFAULT_MAX_BYTES),
            ),
            (
                "event-log-max-bytes",
                format!(
                    "default {}",
                    tether_worker::config::DEFAULT_EVENT_LOG_MAX_BYTES
                ),
            ),
            (
                "event-log-max-bytes",
                format!(
                    "at least {}",
                    tether_worker::config::MIN_EVENT_LOG_MAX_BYTES
                ),
            ),
        ];
        for (cmd, cases) in [(Coord::command(), coord), (Work::command(), worker)] {
            for (flag, default) in cases {
                let help = help_of(&cmd, flag);
                assert!(
                    help.contains(&default),
                    "--{flag}: {help:?} lacks {default:?}"
                );
            }
        }
    }

    /// The worker's secret follows the order of every setting: flag (or its variable), then
    /// `TETHER_SECRET`, then the file; a secret in the environment was once passed over for
    /// the file's.
    #[test]
    fn the_worker_secret_comes_from_the_flag_then_the_environment_then_the_file() {
        let (flag, in_file) = (PathBuf::from("/flag"), PathBuf::from("/file"));
        let env = std::ffi::OsString::from("s3cret");
        let pick = |f: bool, e: bool, c: bool| {
            secret_source(
                f.then(|| flag.clone()),
                e.then(|| env.clone()),
                c.then(|| in_file.clone()),
            )
        };
        let from_flag = Some(SecretSource::File(flag.clone()));
        assert_eq!(pick(true, true, true), from_flag);
        assert_eq!(pick(true, false, true), from_flag);
        assert_eq!(
            pick(false, true, true),
            Some(SecretSource::Env(env.clone()))
        );
        assert_eq!(
            pick(false, false, true),
            Some(SecretSource::File(in_file.clone()))
        );
        assert_eq!(pick(false, false, false), None);
    }

    #[test]
    fn every_worker_key_of_the_file_changes_the_configuration() {
        let dir = tempfile::tempdir().expect("dir");
        let (secret, _) = secret_files(dir.path());
        let base = "coordinator = \"ws://127.0.0.1:1\"\nid = \"w\"";
        let auth = format!("{base}\nsecret_file = {secret}");
        let cases: Vec<(&str, String, String)> = vec![
            (
                "coordinator",
                "\"ws://127.0.0.1:2\"".into(),
                "id = \"w\"".to_owned(),
            ),
            (
                "id",
                "\"w2\"".into(),
                "coordinator = \"ws://127.0.0.1:1\"".into(),
            ),
            ("capabilities", "[\"gpu\"]".into(), base.into()),
            ("tags", "{ rack = \"r1\" }".into(), base.into()),
            ("slots", "3".into(), base.into()),
            ("state_dir", "\"/elsewhere\"".into(), base.into()),
            ("heartbeat_interval", "\"7s\"".into(), base.into()),
            ("heartbeat_timeout", "\"41s\"".into(), base.into()),
            ("initial_reconnect_delay", "\"3s\"".into(), base.into()),
            ("max_reconnect_delay", "\"90s\"".into(), base.into()),
            ("reconnect_jitter", "\"full\"".into(), base.into()),
            ("max_reconnect_attempts", "5".into(), base.into()),
            ("stop_reconnect", "\"30s\"".into(), base.into()),
            ("secret_file", secret.clone(), base.into()),
            ("message_mac", "true".into(), auth.clone()),
            ("max_outbox_entries", "5".into(), base.into()),
            ("max_outbox_bytes", "6000".into(), base.into()),
            ("compression", "false".into(), base.into()),
            ("min_compress_size", "4096".into(), base.into()),
            ("event_log_max_bytes", "1048576".into(), base.into()),
        ];
        let mut covered: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
        covered.sort();
        assert_eq!(covered, file_keys("worker"), "every key has a case here");
        let config = |lines: &str| {
            let toml = file(dir.path(), &format!("[worker]\n{lines}\n"));
            let args = ["t", "--config", toml.to_str().expect("utf-8")];
            format!(
                "{:?}",
                worker_config(Work::try_parse_from(args).expect("flags").a)
            )
        };
        assert_eq!(config(&auth), config(&auth));
        for (key, value, other) in &cases {
            // The two required keys are compared against the configuration with the other
            // value they could have.
            let without = match *key {
                "coordinator" | "id" => config(base),
                _ => config(other),
            };
            let with = config(&format!("{other}\n{key} = {value}"));
            assert_ne!(with, without, "{key} = {value} changed nothing");
            assert!(!with.starts_with("Err"), "{key} = {value}: {with}");
        }
    }

    /// A capability given twice (by flags or in the file) is one, kept where first given.
    #[test]
    fn a_capability_given_twice_is_taken_once_in_the_order_given() {
        let flags = ["t", "--coordinator", "ws://127.0.0.1:1", "--id", "w"];
        let caps = [
            "--capability",
            "b",
            "--capability",
            "a",
            "--capability",
            "b",
        ];
        let args = Work::try_parse_from(flags.iter().chain(&caps)).expect("flags");
        let cfg = worker_config(args.a).expect("config");
        assert_eq!(cfg.capabilities, ["b", "a"]);
        let dir = tempfile::tempdir().expect("dir");
        let toml = file(
            dir.path(),
            "[worker]\ncapabilities = [\"x\", \"x\", \"y\"]\n",
        );
        let config = ["--config", toml.to_str().expect("utf-8")];
        let args = Work::try_parse_from(flags.iter().chain(&config)).expect("flags");
        let cfg = worker_config(args.a).expect("config");
        assert_eq!(cfg.capabilities, ["x", "y"]);
    }

    /// A required setting nothing gave is said to be required, not called a default's.
    #[test]
    fn a_missing_required_setting_is_named_as_required() {
        for (flags, shown) in [
            (
                &["t", "--id", "w"][..],
                "--coordinator is required (or TETHER_COORDINATOR, or coordinator in the config file)",
            ),
            (
                &["t", "--coordinator", "ws://127.0.0.1:1"],
                "--id is required (or TETHER_WORKER_ID, or id in the config file)",
            ),
        ] {
            let e =
                worker_config(Work::try_parse_from(flags).expect("flags").a).expect_err("refused");
            let named = settings::named_by_source(e, None, &Default::default(), |_| false);
            assert_eq!(named.to_string(), shown);
        }
    }

    #[test]
    fn settings_that_would_stop_the_work_are_refused_with_their_name() {
        let coord = |flags: &[&str]| {
            let c = Coord::try_parse_from(["t"].iter().chain(flags)).expect("flags");
            coordinator_config(c.a, Default::default())
        };
        for (flags, name) in [
            (&["--heartbeat-interval", "0s"][..], "--heartbeat-interval"),
            (&["--heartbeat-timeout", "0s"], "--heartbeat-timeout"),
            (&["--heartbeat-interval", "20s"], "--heartbeat-timeout"),
            (&["--max-frame", "0"], "--max-frame"),
            (&["--max-frame", "65536"], "at least 1048576"),
            (&["--max-frame", "1024"], "at least 1048576"),
            // `0s` removed results within a second of their task's end.
            (&["--retention", "0s"], "retention 0s would remove"),
            (&["--retention", "59s"], "at least 60s"),
            // Every connection was closed unanswered, its deadline passed at the accept.
            (&["--handshake-timeout", "0s"], "--handshake-timeout"),
        ] {
            let e = coord(flags).expect_err("refused");
            assert!(e.to_string().contains(name), "{flags:?}: {e}");
        }
        coord(&["--heartbeat-interval", "10ms", "--max-frame", "1048576"]).expect("the least");
        coord(&["--retention", "1m"]).expect("the least retention");
        coord(&["--handshake-timeout", "100ms"]).expect("the least handshake timeout");
        let work = |flags: &[&str]| {
            let base = ["t", "--coordinator", "ws://127.0.0.1:1", "--id", "w"];
            worker_config(
                Work::try_parse_from(base.iter().chain(flags))
                    .expect("flags")
                    .a,
            )
        };
        for (flags, name) in [
            (&["--heartbeat-interval", "0s"][..], "--heartbeat-interval"),
            (
                &["--initial-reconnect-delay", "0s"],
                "--initial-reconnect-delay",
            ),
            (&["--max-reconnect-delay", "100ms"], "--max-reconnect-delay"),
            (
                &["--max-reconnect-attempts", "0"],
                "--max-reconnect-attempts",
            ),
            (&["--capability", ""], "capabilit"),
            // Every connect would time out before it could finish, for ever.
            (&["--connect-timeout", "0s"], "--connect-timeout"),
        ] {
            let e = work(flags).expect_err("refused");
            assert!(e.to_string().contains(name), "{flags:?}: {e}");
        }
        // Too long to add to a clock: refused by the parser, not a panic at the deadline.
        let base = ["t", "--coordinator", "ws://127.0.0.1:1", "--id", "w"];
        let long = ["--heartbeat-timeout", "300000000000y"];
        assert!(Work::try_parse_from(base.iter().chain(&long)).is_err());
        work(&[
            "--initial-reconnect-delay",
            "10ms",
            "--max-reconnect-attempts",
            "1",
        ])
        .expect("the least");
        // A bad duration in the file names its key.
        let dir = tempfile::tempdir().expect("dir");
        let toml = file(dir.path(), "[coordinator]\nlost_after = \"5 parsecs\"\n");
        let c = Coord::try_parse_from(["t"]).expect("no flags");
        let f = settings::load(Some(&toml)).expect("file").coordinator;
        let e = coordinator_config(c.a, f).expect_err("bad duration");
        assert!(
            format!("{e:#}").contains("lost_after in the config file"),
            "{e:#}"
        );
    }

    #[test]
    fn an_authentication_setting_without_a_secret_is_refused_not_ignored() {
        for flag in ["--message-mac", "--auth-max-skew=10s"] {
            let c = Coord::try_parse_from(["t", flag]).expect("flags");
            let e = coordinator_config(c.a, Default::default()).expect_err("refused");
            let name = flag.split('=').next().unwrap_or(flag);
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    /// A skew so small that a registration ages past it on its way would refuse every
    /// worker (each stops after three refusals): refused at start, naming the least.
    #[test]
    fn an_authentication_skew_below_a_second_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let (secret, _) = secret_files(dir.path());
        let secret = secret.trim_matches('"').to_owned();
        for (skew, ok) in [("0s", false), ("999ms", false), ("1s", true)] {
            let c = Coord::try_parse_from(["t", "--secret-file", &secret, "--auth-max-skew", skew])
                .expect("flags");
            let r = coordinator_config(c.a, Default::default());
            match (r, ok) {
                (Ok(_), true) => {}
                (Err(e), false) => assert!(format!("{e:#}").contains("at least 1s"), "{e:#}"),
                (r, _) => panic!("{skew}: {:?}", r.map(|_| ())),
            }
        }
    }

    #[test]
    fn durability_comes_from_its_flag_else_the_file_and_a_bad_value_is_refused() {
        use tether_coordinator::store::Durability;
        let dir = tempfile::tempdir().expect("dir");
        let toml = file(dir.path(), "[coordinator]\ndurability = \"machine\"\n");
        let with_file = |flags: &[&str]| {
            let c = Coord::try_parse_from(["t"].iter().chain(flags)).expect("flags");
            let f = settings::load(Some(&toml)).expect("file").coordinator;
            coordinator_config(c.a, f).expect("config").durability
        };
        assert_eq!(with_file(&[]), Durability::Machine);
        assert_eq!(with_file(&["--durability", "process"]), Durability::Process);
        let c = Coord::try_parse_from(["t"]).expect("no flags");
        let cfg = coordinator_config(c.a, Default::default()).expect("config");
        assert_eq!(cfg.durability, Durability::Process, "the default");
        let e = Coord::try_parse_from(["t", "--durability", "disk"])
            .err()
            .expect("refused");
        assert!(
            e.to_string().contains("expected `process` or `machine`"),
            "{e}"
        );
        let bad = file(dir.path(), "[coordinator]\ndurability = \"disk\"\n");
        let e = settings::load(Some(&bad)).expect_err("refused in the file");
        assert!(format!("{e:#}").contains("durability"), "{e:#}");
    }

    #[test]
    fn compression_settings_come_from_their_flags_else_the_file_else_on_at_1024() {
        let dir = tempfile::tempdir().expect("dir");
        let toml = file(
            dir.path(),
            "[coordinator]\ncompression = true\nmin_compress_size = 4096\n\
             [worker]\ncoordinator = \"ws://127.0.0.1:1\"\nid = \"w\"\n\
             compression = true\nmin_compress_size = 4096\n",
        );
        let coord = |flags: &[&str], toml: Option<&std::path::Path>| {
            let c = Coord::try_parse_from(["t"].iter().chain(flags)).expect("flags");
            let f = settings::load(toml).expect("file").coordinator;
            let cfg = coordinator_config(c.a, f).expect("config");
            (cfg.compression, cfg.compress_threshold)
        };
        let work = |flags: &[&str], toml: Option<&std::path::Path>| {
            let mut args = vec!["t", "--coordinator", "ws://127.0.0.1:1", "--id", "w"];
            if let Some(t) = toml {
                args.extend(["--config", t.to_str().expect("utf-8")]);
            }
            args.extend_from_slice(flags);
            let cfg = worker_config(Work::try_parse_from(args).expect("flags").a).expect("config");
            (cfg.compression, cfg.compress_threshold)
        };
        for get in [
            &coord as &dyn Fn(&[&str], Option<&std::path::Path>) -> (bool, usize),
            &work,
        ] {
            assert_eq!(get(&[], None), (true, 1024), "the defaults");
            assert_eq!(get(&[], Some(&toml)), (true, 4096), "the file");
            assert_eq!(
                get(
                    &["--no-compression", "--min-compress-size", "100"],
                    Some(&toml)
                ),
                (false, 100),
                "the flags over the file"
            );
        }
    }

    /// The event log's rotation bound: the flag, else the file's key, else the library's
    /// default; under the least, refused naming the flag or the key.
    #[test]
    fn the_event_log_bound_comes_from_its_flag_else_the_file_else_the_default() {
        use tether_worker::config::{DEFAULT_EVENT_LOG_MAX_BYTES, MIN_EVENT_LOG_MAX_BYTES};
        let dir = tempfile::tempdir().expect("dir");
        let base = "[worker]\ncoordinator = \"ws://127.0.0.1:1\"\nid = \"w\"\n";
        let parse = |lines: &str, flags: &[&str]| {
            let toml = file(dir.path(), &format!("{base}{lines}"));
            let mut args = vec!["t", "--config", toml.to_str().expect("utf-8")];
            args.extend_from_slice(flags);
            worker_config(Work::try_parse_from(args).expect("flags").a)
        };
        let bound =
            |lines: &str, flags: &[&str]| parse(lines, flags).expect("config").event_log_max_bytes;
        assert_eq!(bound("", &[]), DEFAULT_EVENT_LOG_MAX_BYTES);
        let least = MIN_EVENT_LOG_MAX_BYTES.to_string();
        assert_eq!(
            bound("", &["--event-log-max-bytes", &least]),
            MIN_EVENT_LOG_MAX_BYTES
        );
        let in_file = "event_log_max_bytes = 1048576\n";
        assert_eq!(bound(in_file, &[]), 1_048_576);
        assert_eq!(
            bound(in_file, &["--event-log-max-bytes", "2097152"]),
            2_097_152
        );
        let under = (MIN_EVENT_LOG_MAX_BYTES - 1).to_string();
        let e = parse("", &["--event-log-max-bytes", &under]).expect_err("under the least");
        assert!(e.to_string().starts_with("--event-log-max-bytes "), "{e}");
        assert!(e.to_string().contains(&format!("at least {least}")), "{e}");
        // With a unit, from the flag or the file (a string there).
        assert_eq!(bound("", &["--event-log-max-bytes", "64MiB"]), 64 << 20);
        assert_eq!(bound("event_log_max_bytes = \"2MiB\"\n", &[]), 2 << 20);
        assert!(Work::try_parse_from(["t", "--event-log-max-bytes", "1.5MiB"]).is_err());
    }

    /// Every byte-rate flag takes a unit with an optional `/s` (`1MiB/s`, `1MiB`), as well as
    /// what it took (a plain number; a fraction where the rate is a float), says so in its
    /// help, and refuses a fraction before a unit or an unknown unit as it is read; its
    /// config file key takes the same as a string (`"1MiB/s"`), a number still being bytes a
    /// second. They took plain numbers only.
    #[test]
    fn every_byte_rate_flag_and_key_takes_a_unit() {
        use clap::CommandFactory;
        let cmd = Coord::command();
        let takes = |flag: &str, value: &str| Coord::try_parse_from(["t", flag, value]).is_ok();
        for flag in ["min-answer-rate", "max-bytes-per-sec"] {
            let help = help_of(&cmd, flag);
            assert!(help.contains("or with a unit"), "--{flag}: {help:?}");
            let long = format!("--{flag}");
            for good in ["65536", "1MiB", "1MiB/s", "64/s", "512 KiB/s"] {
                assert!(takes(&long, good), "{long} {good} refused");
            }
            for bad in ["1.5MiB", "1.5MiB/s", "64XB", "64KiB/m", "fast"] {
                assert!(!takes(&long, bad), "{long} {bad} taken");
            }
        }
        assert!(takes("--max-bytes-per-sec", "1500000.5"), "a float rate");
        assert!(!takes("--min-answer-rate", "1500.5"), "a whole rate");
        let dir = tempfile::tempdir().expect("dir");
        let coordinator = |lines: &str, flags: &[&str]| coordinator_from(dir.path(), lines, flags);
        let flags = [
            "--min-answer-rate",
            "512KiB/s",
            "--max-bytes-per-sec",
            "32MiB/s",
        ];
        let keys = "min_answer_rate = \"512KiB/s\"\nmax_bytes_per_sec = \"32mib\"\n";
        for cfg in [coordinator("", &flags), coordinator(keys, &[])] {
            let l = cfg.expect("config").limits;
            assert_eq!(l.min_answer_rate, 512 << 10);
            assert_eq!(l.bytes_per_sec, (32 << 20) as f64);
            assert_eq!(l.byte_burst, 128 << 20);
        }
        // Numbers in the file are still bytes a second; a float where it was.
        let cfg = coordinator(
            "min_answer_rate = 1000\nmax_bytes_per_sec = 20000000.5\n",
            &[],
        )
        .expect("config");
        assert_eq!(cfg.limits.min_answer_rate, 1000);
        assert_eq!(cfg.limits.bytes_per_sec, 20_000_000.5);
        for (line, says) in [
            ("min_answer_rate = \"1.5KiB\"", "whole number"),
            ("max_bytes_per_sec = \"64XB/s\"", "unknown size unit"),
        ] {
            let e = settings::load(Some(&file(dir.path(), &format!("[coordinator]\n{line}\n"))))
                .expect_err(line);
            let e = format!("{e:#}");
            let key = line.split(' ').next().expect("key");
            assert!(e.contains(key) && e.contains(says), "{line}: {e}");
        }
    }

    /// Every byte-size flag takes a unit (`1MiB`), says so in its help, and refuses a
    /// fraction or an unknown unit as it is read; its config file key takes the same as a
    /// string (`"1MiB"`), an integer still being bytes. They took plain bytes only.
    #[test]
    fn every_byte_size_flag_and_key_takes_a_unit() {
        use clap::CommandFactory;
        let coord = [
            "max-frame",
            "registration-pool",
            "max-body",
            "max-checkpoint-bytes",
            "min-compress-size",
        ];
        let worker = [
            "max-outbox-bytes",
            "event-log-max-bytes",
            "min-compress-size",
        ];
        let takes_coord = |argv: [&str; 3]| Coord::try_parse_from(argv).is_ok();
        let takes_work = |argv: [&str; 3]| Work::try_parse_from(argv).is_ok();
        for (cmd, flags, takes) in [
            (
                Coord::command(),
                &coord[..],
                &takes_coord as &dyn Fn([&str; 3]) -> bool,
            ),
            (Work::command(), &worker[..], &takes_work),
        ] {
            for flag in flags {
                let help = help_of(&cmd, flag);
                assert!(help.contains("bytes or with a unit"), "--{flag}: {help:?}");
                let long = format!("--{flag}");
                assert!(takes(["t", &long, "1MiB"]), "{long} 1MiB refused");
                for bad in ["1.5MiB", "10XB", "-1"] {
                    assert!(!takes(["t", &long, bad]), "{long} {bad} taken");
                }
            }
        }
        let dir = tempfile::tempdir().expect("dir");
        let coordinator = |lines: &str, flags: &[&str]| coordinator_from(dir.path(), lines, flags);
        let flags = [
            "--max-frame",
            "2MiB",
            "--max-body",
            "1MB",
            "--max-checkpoint-bytes",
            "1GiB",
            "--registration-pool",
            "32MiB",
            "--min-compress-size",
            "2KiB",
        ];
        let keys = "max_frame = \"2MiB\"\nmax_body = \"1MB\"\nmax_checkpoint_bytes = \"1GiB\"\n\
                    registration_pool = \"32MiB\"\nmin_compress_size = \"2kib\"\n";
        for cfg in [coordinator("", &flags), coordinator(keys, &[])] {
            let cfg = cfg.expect("config");
            assert_eq!(cfg.max_frame, 2 << 20);
            assert_eq!(cfg.max_body, 1_000_000);
            assert_eq!(cfg.max_checkpoint_bytes, 1 << 30);
            assert_eq!(cfg.limits.registration_pool, 32 << 20);
            assert_eq!(cfg.compress_threshold, 2048);
        }
        // An integer in the file is still bytes.
        let cfg = coordinator("max_frame = 2097152\n", &[]).expect("config");
        assert_eq!(cfg.max_frame, 2 << 20);
        let e = settings::load(Some(&file(
            dir.path(),
            "[coordinator]\nmax_frame = \"1.5MiB\"\n",
        )))
        .expect_err("a fraction");
        let e = format!("{e:#}");
        assert!(e.contains("max_frame") && e.contains("whole number"), "{e}");
        let base = "[worker]\ncoordinator = \"ws://127.0.0.1:1\"\nid = \"w\"\n";
        let worker = |lines: &str, flags: &[&str]| {
            let toml = file(dir.path(), &format!("{base}{lines}"));
            let mut args = vec!["t", "--config", toml.to_str().expect("utf-8")];
            args.extend_from_slice(flags);
            worker_config(Work::try_parse_from(args).expect("flags").a).expect("config")
        };
        let flags = ["--max-outbox-bytes", "8MiB", "--min-compress-size", "1kB"];
        let keys = "max_outbox_bytes = \"8MiB\"\nmin_compress_size = \"1kB\"\n";
        for cfg in [worker("", &flags), worker(keys, &[])] {
            assert_eq!(cfg.outbox.max_bytes, 8 << 20);
            assert_eq!(cfg.compress_threshold, 1000);
        }
    }

    #[test]
    fn worker_outbox_limits_and_integrity_come_from_flags_else_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let secret = dir.path().join("s");
        std::fs::write(&secret, "a secret of the worker config test").expect("secret");
        let toml = file(
            dir.path(),
            &format!(
                "[worker]\ncoordinator = \"ws://127.0.0.1:1\"\nid = \"w\"\nmax_outbox_entries = 5\n\
                 max_outbox_bytes = 6000\nmessage_mac = true\nsecret_file = {:?}\n",
                secret.display().to_string()
            ),
        );
        let parse = |flags: &[&str]| {
            let mut args = vec!["t", "--config", toml.to_str().expect("utf-8")];
            args.extend_from_slice(flags);
            worker_config(Work::try_parse_from(args).expect("flags").a)
        };
        let cfg = parse(&[]).expect("config");
        assert_eq!(cfg.outbox.max_entries, 5);
        assert_eq!(cfg.outbox.max_bytes, 6000);
        assert!(cfg.require_message_mac);
        assert!(cfg.secret.is_some());
        let cfg = parse(&["--max-outbox-entries", "9"]).expect("config");
        assert_eq!(cfg.outbox.max_entries, 9);
        let e = parse(&["--max-outbox-bytes", "0"]).expect_err("zero");
        assert!(e.to_string().contains("max-outbox-bytes"), "{e}");
    }
}
