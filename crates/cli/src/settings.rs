//! The optional TOML file. Precedence: flag, then environment variable, then file, then the
//! library default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::size::{Bytes, FloatRate, Rate};

/// `[coordinator]` and `[worker]` tables; every key optional. A byte size ([`Bytes`]) is an
/// integer or a string with a unit (`max_frame = "16MiB"`); a byte rate ([`Rate`],
/// [`FloatRate`]) a number or a string with a unit and an optional `/s` (`"64MiB/s"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub coordinator: CoordinatorFile,
    #[serde(default)]
    pub worker: WorkerFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub heartbeat_interval: Option<String>,
    pub heartbeat_timeout: Option<String>,
    pub heartbeat_budget: Option<u32>,
    pub idle_coalesce: Option<String>,
    pub lost_after: Option<String>,
    pub max_frame: Option<Bytes>,
    pub checkpoints_kept: Option<usize>,
    pub retention: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub next_secret_file: Option<PathBuf>,
    pub secrets_dir: Option<PathBuf>,
    pub auth_max_skew: Option<String>,
    pub message_mac: Option<bool>,
    pub max_connections: Option<usize>,
    pub connects_per_sec: Option<f64>,
    pub limit_loopback: Option<bool>,
    pub handshake_timeout: Option<String>,
    pub http_idle: Option<String>,
    pub min_answer_rate: Option<Rate>,
    pub max_messages_per_sec: Option<f64>,
    pub max_bytes_per_sec: Option<FloatRate>,
    pub registration_pool: Option<Bytes>,
    pub max_body: Option<Bytes>,
    pub max_checkpoint_bytes: Option<Bytes>,
    pub admin_token_file: Option<PathBuf>,
    pub read_token_file: Option<PathBuf>,
    pub metrics_token_file: Option<PathBuf>,
    pub durability: Option<tether_coordinator::store::Durability>,
    pub compression: Option<bool>,
    pub min_compress_size: Option<Bytes>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerFile {
    pub coordinator: Option<String>,
    pub id: Option<String>,
    pub capabilities: Option<Vec<String>>,
    pub tags: Option<BTreeMap<String, String>>,
    pub slots: Option<u32>,
    pub state_dir: Option<PathBuf>,
    pub heartbeat_interval: Option<String>,
    pub heartbeat_timeout: Option<String>,
    pub initial_reconnect_delay: Option<String>,
    pub max_reconnect_delay: Option<String>,
    pub reconnect_jitter: Option<String>,
    pub max_reconnect_attempts: Option<u32>,
    pub stop_reconnect: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub message_mac: Option<bool>,
    pub max_outbox_entries: Option<usize>,
    pub max_outbox_bytes: Option<Bytes>,
    pub compression: Option<bool>,
    pub min_compress_size: Option<Bytes>,
    pub event_log_max_bytes: Option<Bytes>,
}

pub fn load(path: Option<&Path>) -> anyhow::Result<FileConfig> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// The keys of table `section` of the config file at `path` (none without a file, or when it
/// does not parse: `load` says why).
pub fn keys(path: Option<&Path>, section: &str) -> std::collections::BTreeSet<String> {
    let table = path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| text.parse::<toml::Table>().ok());
    table
        .as_ref()
        .and_then(|t| t.get(section))
        .and_then(|s| s.as_table())
        .map(|s| s.keys().cloned().collect())
        .unwrap_or_default()
}

/// A setting that nothing gave and that has no default: its error is shown as written (it
/// names the flag, the variable and the key), never as a default's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Missing(pub &'static str);

/// The key of the config file (among `keys`) that gives the setting of `flag`
/// (`--max-frame`: `max_frame`); a repeatable flag (`--tag`, `--capability`) is a list in the
/// file (`tags`, `capabilities`).
fn file_key(keys: &std::collections::BTreeSet<String>, flag: &str) -> Option<String> {
    let key = flag.trim_start_matches("--").replace('-', "_");
    let plural = match key.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{key}s"),
    };
    [key, plural].into_iter().find(|k| keys.contains(k))
}

/// An error about settings, its flags named as the user gave them: a `--flag` the command
/// line (`given`) did not have but the config file's `keys` did is named by its key in `file`
/// (`--capability` and `--tag` by `capabilities` and `tags`); the setting an error is about
/// (the flag it starts with) that neither gave is the default, and said so. A flag its
/// environment variable gave ([`env_of`]) is named with it, ` (given by TETHER_X)` after its
/// first mention, unless the error names the variable already: the user who set the variable
/// gave no flag.
pub fn named_by_source(
    e: anyhow::Error,
    file: Option<&Path>,
    keys: &std::collections::BTreeSet<String>,
    given: impl Fn(&str) -> bool,
) -> anyhow::Error {
    named_by(e, file, keys, given, env_of)
}

/// [`named_by_source`], the variable that gave a flag told by `env`.
fn named_by(
    e: anyhow::Error,
    file: Option<&Path>,
    keys: &std::collections::BTreeSet<String>,
    given: impl Fn(&str) -> bool,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Error {
    if e.downcast_ref::<Missing>().is_some() {
        return e;
    }
    let text = crate::output::describe(&e);
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    let mut told = Vec::new();
    while let Some(at) = rest.find("--") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 2..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .unwrap_or(tail.len());
        let flag = &rest[at..at + 2 + len];
        let in_file = file_key(keys, flag);
        match (len > 0 && !given(flag), in_file, file) {
            (true, Some(key), Some(file)) => {
                out.push_str(&format!("{key} (in {})", file.display()));
            }
            // The subject of the error, from nowhere the user wrote: the default.
            (true, None, _) if out.is_empty() => out.push_str(&format!("the default {flag}")),
            _ => {
                out.push_str(flag);
                let by = (len > 0 && given(flag) && !told.contains(&flag))
                    .then(|| env(flag))
                    .flatten()
                    .filter(|var| !text.contains(var.as_str()));
                if let Some(var) = by {
                    out.push_str(&format!(" (given by {var})"));
                    told.push(flag);
                }
            }
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    anyhow::anyhow!(out)
}

/// A setting's value that the command, or the library it configures, refuses: by the flag
/// that gives it (`--max-frame`; its key in the config file is `max_frame`), and the flags of
/// the other settings the refusal weighs it against (`with`: a heartbeat timeout is refused
/// for an interval as long). [`said`] tells it by where those values came from, and as a
/// usage error when none came from the config file.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {why}{}", see(why, with))]
pub struct Refused {
    pub flag: String,
    pub with: Vec<String>,
    pub why: String,
}

impl Refused {
    pub fn new(flag: impl Into<String>, why: impl std::fmt::Display) -> Self {
        Self {
            flag: flag.into(),
            with: Vec::new(),
            why: why.to_string(),
        }
    }

    /// The refusal weighs the value against the setting of `flag` too; the error names it
    /// (`; see --heartbeat-interval`) when its reason does not already, so that [`said`] can
    /// say where it came from.
    pub fn with(mut self, flag: &str) -> Self {
        self.with.push(flag.to_owned());
        self
    }
}

/// `; see --a, --b`: the flags of `with` that `why` does not name, if any.
fn see(why: &str, with: &[String]) -> String {
    let unnamed: Vec<&str> = with
        .iter()
        .map(String::as_str)
        .filter(|f| !why.contains(f))
        .collect();
    match unnamed.is_empty() {
        true => String::new(),
        false => format!("; see {}", unnamed.join(", ")),
    }
}

/// Returns a [`Refused`] error: `refuse!("--slots", "{n} runs nothing: at least 1")`, as
/// `bail!` with the flag first.
macro_rules! refuse {
    ($flag:expr, $($why:tt)+) => {
        return Err($crate::settings::Refused::new($flag, format!($($why)+)).into())
    };
}
pub(crate) use refuse;

/// A usage error of the subcommand `command`, found once its settings were put together:
/// `main` says it as clap says its own, with the subcommand's usage, and exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct Usage {
    pub command: &'static str,
    pub why: String,
}

/// `e`, an error about the settings of the subcommand `command`, as the user is told it: its
/// flags named by where their values came from ([`named_by_source`]), and a [`Usage`] error
/// (exit 2, as clap's own refusals of a value) when it refuses a value ([`Refused`]) and no
/// value the refusal weighs (the refused setting's and those it is refused `with`) came from
/// the config file: each was given by the command line (or an environment variable, as clap
/// takes one, `given`) or is a default. So is a required setting nothing gave ([`Missing`]).
/// A refusal that weighs a value the file gave (a key in `keys` whose flag is not `given`)
/// stays an error of the run (exit 1) naming that key and the file, as does any other error.
/// (A default refused beside a flag's value was the file's error whenever the file set any
/// key of the section: a worker's file that names its coordinator made
/// `--heartbeat-interval 20s` exit 1.)
pub fn said(
    e: anyhow::Error,
    command: &'static str,
    file: Option<&Path>,
    keys: &std::collections::BTreeSet<String>,
    given: impl Fn(&str) -> bool,
) -> anyhow::Error {
    let refused = e.chain().find_map(|c| c.downcast_ref::<Refused>());
    // A required setting nothing gave is the command line's to give, as clap's own.
    let missing = e.chain().any(|c| c.is::<Missing>());
    let from_file = |flag: &str| !given(flag) && file_key(keys, flag).is_some();
    let usage = missing
        || refused.is_some_and(|r| {
            !std::iter::once(&r.flag)
                .chain(&r.with)
                .any(|f| from_file(f))
        });
    let named = named_by_source(e, file, keys, &given);
    if usage {
        return Usage {
            command,
            why: named.to_string(),
        }
        .into();
    }
    named
}

/// The command line as clap took it, kept by `main`: where each value of the running
/// subcommand came from (the command line, its environment variable, a default).
static MATCHES: std::sync::OnceLock<clap::ArgMatches> = std::sync::OnceLock::new();

/// Keeps `m`, the parsed command line, for [`on_command_line`] and [`given_outside_the_file`].
pub fn keep_matches(m: clap::ArgMatches) {
    let _ = MATCHES.set(m);
}

/// Whether the running subcommand's `flag` (`--max-frame`) was given on the command line.
pub fn on_command_line(flag: &str) -> bool {
    given_by(flag, |s| s == clap::parser::ValueSource::CommandLine)
}

/// Whether the running subcommand's `flag` was given by the command line or by its
/// environment variable (as `--idle-coalesce` has `TETHER_IDLE_COALESCE`): either beats the
/// file. Read from clap's own record of where each value came from.
pub fn given_outside_the_file(flag: &str) -> bool {
    use clap::parser::ValueSource::{CommandLine, EnvVariable};
    given_by(flag, |s| matches!(s, CommandLine | EnvVariable))
}

/// The command tree, built once: [`given_by`] looks a flag up in it for each flag an error or
/// a check names (a stress run's check of the flags that apply to its scenario asks about a
/// dozen), and building it is building every subcommand's every argument.
static COMMAND: std::sync::LazyLock<clap::Command> =
    std::sync::LazyLock::new(<crate::Cli as clap::CommandFactory>::command);

/// The environment variable that gave the running subcommand's `flag` its value (`TETHER_X`),
/// if one did: an error about that value names where the user set it, its flag still named
/// first so that [`said`] tells it by the flag.
pub fn env_of(flag: &str) -> Option<String> {
    if !given_by(flag, |s| s == clap::parser::ValueSource::EnvVariable) {
        return None;
    }
    let long = flag.trim_start_matches("--");
    let name = MATCHES.get()?.subcommand_name()?;
    let arg = COMMAND
        .find_subcommand(name)?
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?;
    arg.get_env().map(|v| v.to_string_lossy().into_owned())
}

/// ` (given by TETHER_X)`, as [`env_of`], or nothing.
pub fn by_env(flag: &str) -> String {
    env_of(flag).map_or_else(String::new, |var| format!(" (given by {var})"))
}

/// Whether the running subcommand's `flag` has a value whose source is `taken`.
fn given_by(flag: &str, taken: impl Fn(clap::parser::ValueSource) -> bool) -> bool {
    let Some((name, sub)) = MATCHES.get().and_then(|m| m.subcommand()) else {
        return false;
    };
    let long = flag.trim_start_matches("--");
    COMMAND
        .find_subcommand(name)
        .and_then(|c| c.get_arguments().find(|a| a.get_long() == Some(long)))
        .and_then(|a| sub.value_source(a.get_id().as_str()))
        .is_some_and(taken)
}

/// Parses a duration with a unit (`5s`, `250ms`, `1m`).
pub fn duration(s: &str) -> anyhow::Result<std::time::Duration> {
    parse_duration_arg(s).map_err(|e| anyhow::anyhow!("invalid duration {s:?}: {e}"))
}

/// [`pick_duration`] of a setting whose flag and config-file key share the field name:
/// `duration_setting!(a, file, lost_after)` is the flag `a.lost_after`, else the file's
/// `lost_after` (an error that names that key when it does not parse), else `None`; `?`
/// applied. The key named in the error is the field's own name, so the two cannot drift.
macro_rules! duration_setting {
    ($flags:ident, $file:ident, $key:ident) => {
        $crate::settings::pick_duration($flags.$key, $file.$key.as_deref(), stringify!($key))?
    };
}
pub(crate) use duration_setting;

/// A duration from a flag, else from the file's `key`, else none (the library default
/// applies). A bad value in the file is refused with the key's name.
pub fn pick_duration(
    flag: Option<std::time::Duration>,
    file: Option<&str>,
    key: &str,
) -> anyhow::Result<Option<std::time::Duration>> {
    match (flag, file) {
        (Some(d), _) => Ok(Some(d)),
        (None, Some(s)) => duration(s)
            .map(Some)
            .with_context(|| format!("{key} in the config file")),
        (None, None) => Ok(None),
    }
}

pub fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    // The value itself is not repeated (clap quotes it, cut when long: see `main`), nor is an
    // unknown unit past a bounded prefix (`5` and a megabyte of letters is one unit).
    let d = humantime::parse_duration(s).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. }
            if matches!(crate::cut_value(&unit), std::borrow::Cow::Owned(_)) =>
        {
            format!(
                "unknown time unit {:?} (use e.g. 5s, 250ms)",
                crate::cut_value(&unit)
            )
        }
        e => format!("{e} (use e.g. 5s, 250ms)"),
    })?;
    // A clock's instant plus a duration past this overflows: a deadline so far is no deadline
    // the user meant, and was a panic where it was added.
    if d > MAX_DURATION_ARG {
        return Err(format!(
            "longer than {} days",
            MAX_DURATION_ARG.as_secs() / 86_400
        ));
    }
    Ok(d)
}

/// Longest duration any flag takes: ten years.
pub const MAX_DURATION_ARG: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 86_400);

#[cfg(test)]
mod tests {
    use super::*;

    /// A setting the config file gave is named by its key there, in an error that names flags:
    /// the user gave no `--max-frame`. One the command line gave keeps its flag's name.
    /// A duration too long to add to a clock is refused with a clear error (it was a panic
    /// where a deadline was made of it).
    #[test]
    fn a_duration_past_ten_years_is_refused() {
        assert_eq!(
            parse_duration_arg("250ms"),
            Ok(std::time::Duration::from_millis(250))
        );
        let e = parse_duration_arg("18446744073709551615s").expect_err("too long");
        assert!(e.contains("longer than 3650 days"), "{e}");
        assert!(parse_duration_arg("11y").is_err());
    }

    #[test]
    fn an_error_names_a_setting_by_where_it_came_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[coordinator]\nmax_frame = 1000\nlost_after = \"1s\"\n",
        )
        .expect("write");
        let keys = keys(Some(&path), "coordinator");
        assert_eq!(
            keys.iter().map(String::as_str).collect::<Vec<_>>(),
            ["lost_after", "max_frame"]
        );
        let e = || anyhow::anyhow!("--max-frame 1000 is too small; see --heartbeat-timeout");
        let shown = named_by_source(e(), Some(&path), &keys, |_| false).to_string();
        assert_eq!(
            shown,
            format!(
                "max_frame (in {}) 1000 is too small; see --heartbeat-timeout",
                path.display()
            )
        );
        let given = named_by_source(e(), Some(&path), &keys, |f| f == "--max-frame").to_string();
        assert_eq!(given, e().to_string());
        // Without the file, a subject no one gave is the default.
        let none = Default::default();
        let no_file = named_by_source(e(), None, &none, |_| false).to_string();
        assert_eq!(no_file, format!("the default {}", e()));
        let given_no_file = named_by_source(e(), None, &none, |_| true).to_string();
        assert_eq!(given_no_file, e().to_string());
        // A repeatable flag's key is its plural; advice later in the text is left alone.
        std::fs::write(&path, "[worker]\ncapabilities = [\"\"]\n").expect("write");
        let worker_keys = super::keys(Some(&path), "worker");
        let e = anyhow::anyhow!("--capability an empty capability; give --capability");
        let shown = named_by_source(e, Some(&path), &worker_keys, |_| false).to_string();
        assert!(shown.starts_with("capabilities (in "), "{shown}");
        assert!(super::keys(None, "coordinator").is_empty());
    }

    /// A flag whose value an environment variable gave is named with the variable, once: its
    /// user gave no flag. An error that names the variable already (`--listen "x" (given by
    /// TETHER_LISTEN) ...`) is left as it is; a flag the command line gave, or the file, or
    /// none (a default), is named as before.
    #[test]
    fn a_flag_its_environment_variable_gave_is_named_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[coordinator]\nmax_frame = 1000\n").expect("write");
        let keys = keys(Some(&path), "coordinator");
        let env = |f: &str| (f == "--idle-coalesce").then(|| "TETHER_IDLE_COALESCE".to_owned());
        let named = |e: anyhow::Error, given: &[&str]| {
            named_by(e, Some(&path), &keys, |f| given.contains(&f), env).to_string()
        };
        let refused = || {
            anyhow::Error::from(Refused::new(
                "--idle-coalesce",
                "25ms: at most 20 ms; give --idle-coalesce 20ms or less",
            ))
        };
        assert_eq!(
            named(refused(), &["--idle-coalesce"]),
            "--idle-coalesce (given by TETHER_IDLE_COALESCE) 25ms: at most 20 ms; give \
             --idle-coalesce 20ms or less"
        );
        // Beside the file's value it weighs: the file's key named too.
        let r = Refused::new("--idle-coalesce", "25ms is too long").with("--max-frame");
        assert_eq!(
            named(r.into(), &["--idle-coalesce"]),
            format!(
                "--idle-coalesce (given by TETHER_IDLE_COALESCE) 25ms is too long; see \
                 max_frame (in {})",
                path.display()
            )
        );
        // Named already: not twice.
        let by = "\"x\" (given by TETHER_IDLE_COALESCE) is no duration";
        let e = anyhow::Error::from(Refused::new("--idle-coalesce", by));
        assert_eq!(
            named(e, &["--idle-coalesce"]),
            format!("--idle-coalesce {by}")
        );
        // Not given at all: the default, no variable named; given by the command line (no
        // variable): as written.
        assert_eq!(
            named(refused(), &[]),
            "the default --idle-coalesce 25ms: at most 20 ms; give --idle-coalesce 20ms or less"
        );
        let e = named_by(refused(), None, &keys, |_| true, |_| None);
        assert_eq!(e.to_string(), refused().to_string());
    }

    /// A refused value is a usage error when the file gave none of the values the refusal
    /// weighs: its flag was given, or it is a default. From the file it is the run's error; so
    /// is any other error.
    #[test]
    fn a_refused_value_is_a_usage_error_when_only_the_command_line_gave_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[coordinator]\nmax_frame = 1000\n").expect("write");
        let keys = keys(Some(&path), "coordinator");
        let none = Default::default();
        let refused = || anyhow::Error::from(Refused::new("--max-frame", "1000 is too small"));
        let usage = |e: anyhow::Error, keys, given: bool| {
            let e = said(e, "coordinator", Some(&path), keys, |_| given);
            e.downcast_ref::<Usage>()
                .map(|u| (u.command, u.why.clone()))
        };
        let shown = Some(("coordinator", "--max-frame 1000 is too small".to_owned()));
        assert_eq!(
            usage(refused(), &keys, true),
            shown,
            "the flag, over the file"
        );
        assert_eq!(usage(refused(), &none, true), shown, "the flag alone");
        assert_eq!(
            usage(refused().context("outer"), &none, true),
            shown.map(|(c, _)| (c, "outer: --max-frame 1000 is too small".to_owned()))
        );
        assert_eq!(usage(refused(), &keys, false), None, "the file's");
        let e = said(refused(), "coordinator", Some(&path), &keys, |_| false);
        assert!(e.to_string().starts_with("max_frame (in "), "{e}");
        // A default, beside the command line's values only: theirs.
        let default = usage(refused(), &none, false).expect("a usage error");
        assert_eq!(default.1, "the default --max-frame 1000 is too small");
        // A default beside file settings it is not refused with: not the file's (it was, as
        // the file set some key).
        std::fs::write(&path, "[coordinator]\nlost_after = \"9m\"\n").expect("write");
        let other = super::keys(Some(&path), "coordinator");
        let default = usage(refused(), &other, false).expect("a usage error");
        assert_eq!(default.1, "the default --max-frame 1000 is too small");
        // Not a refused value: the run's error, wherever its flags came from.
        let other_error = || anyhow::anyhow!("--tls-cert expired on 2021-01-01");
        assert_eq!(usage(other_error(), &none, true), None);
        // A required setting nothing gave: the command line's to give, with or without a
        // file, and said as written.
        let missing = || anyhow::Error::from(Missing("--id is required (or TETHER_WORKER_ID)"));
        let needed = Some((
            "coordinator",
            "--id is required (or TETHER_WORKER_ID)".to_owned(),
        ));
        assert_eq!(usage(missing(), &keys, false), needed);
        assert_eq!(usage(missing(), &none, false), needed);
    }

    /// A default refused `with` a flag's value is the command line's doing (a usage error
    /// naming the flag), whatever other keys the file sets (a worker's file names its
    /// coordinator and id: it was the file's error then); refused with a value the file gave,
    /// or a flag's value refused with one, it is the file's, naming the key and the file.
    #[test]
    fn a_refusal_is_the_files_only_when_a_value_it_weighs_came_from_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.toml");
        let refused = || {
            let why = "15s must be longer than the heartbeat interval (20s)";
            Refused::new("--heartbeat-timeout", why).with("--heartbeat-interval")
        };
        assert_eq!(
            refused().to_string(),
            "--heartbeat-timeout 15s must be longer than the heartbeat interval (20s); see \
             --heartbeat-interval"
        );
        let say = |text: &str, given: &[&str]| {
            std::fs::write(&path, text).expect("write");
            let keys = keys(Some(&path), "worker");
            let e = said(refused().into(), "worker", Some(&path), &keys, |f| {
                given.contains(&f)
            });
            let usage = e.downcast_ref::<Usage>().is_some();
            (usage, e.to_string())
        };
        let named = "[worker]\ncoordinator = \"ws://h:1\"\nid = \"w\"\n";
        let (usage, shown) = say(named, &["--heartbeat-interval"]);
        assert!(usage, "{shown}");
        assert_eq!(
            shown,
            "the default --heartbeat-timeout 15s must be longer than the heartbeat interval \
             (20s); see --heartbeat-interval"
        );
        // The flag over the file's value: still the command line's.
        let interval = format!("{named}heartbeat_interval = \"20s\"\n");
        let (usage, shown) = say(&interval, &["--heartbeat-interval"]);
        assert!(usage, "{shown}");
        // The file's interval: the file's error, naming the key and the file.
        let (usage, shown) = say(&interval, &[]);
        assert!(!usage, "{shown}");
        let key = format!("heartbeat_interval (in {})", path.display());
        assert!(
            shown.starts_with("the default --heartbeat-timeout "),
            "{shown}"
        );
        assert!(shown.ends_with(&format!("; see {key}")), "{shown}");
        // A flag's timeout refused with the file's interval: the file's too.
        let (usage, shown) = say(&interval, &["--heartbeat-timeout"]);
        assert!(!usage, "{shown}");
        assert!(shown.starts_with("--heartbeat-timeout 15s"), "{shown}");
        assert!(shown.contains(&key), "{shown}");
        // Named in the reason already: not named again; two unnamed: named together.
        let r = Refused::new(
            "--max-reconnect-delay",
            "shorter than --initial-reconnect-delay",
        );
        let r = r.with("--initial-reconnect-delay");
        assert_eq!(
            r.to_string(),
            "--max-reconnect-delay shorter than --initial-reconnect-delay"
        );
        let r = Refused::new("--max-bytes-per-sec", "1 is too few").with("--max-frame");
        let r = r.with("--heartbeat-timeout");
        assert_eq!(
            r.to_string(),
            "--max-bytes-per-sec 1 is too few; see --max-frame, --heartbeat-timeout"
        );
    }

    #[test]
    fn a_config_file_with_an_unknown_key_is_refused_clearly() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("t.toml");
        std::fs::write(&p, "[worker]\nslotz = 3\n").expect("write");
        let e = load(Some(&p)).expect_err("unknown key");
        assert!(format!("{e:#}").contains("slotz"), "{e:#}");
        std::fs::write(&p, "[worker]\nslots = 3\nheartbeat_interval = \"2s\"\n").expect("write");
        let c = load(Some(&p)).expect("valid");
        assert_eq!(c.worker.slots, Some(3));
        assert_eq!(
            duration("2s").expect("d"),
            std::time::Duration::from_secs(2)
        );
        assert!(duration("2 parsecs").is_err());
    }

    /// `duration_setting!` takes the flag over the file, and a file value that is no duration
    /// is refused naming the key: the field's own name.
    #[test]
    fn a_duration_setting_prefers_the_flag_and_names_its_key_when_the_file_is_wrong() {
        use std::time::Duration;
        struct Flags {
            lost_after: Option<Duration>,
        }
        struct File {
            lost_after: Option<String>,
        }
        fn pick(flag: Option<u64>, file: Option<&str>) -> anyhow::Result<Option<Duration>> {
            let a = Flags {
                lost_after: flag.map(Duration::from_secs),
            };
            let file = File {
                lost_after: file.map(str::to_owned),
            };
            Ok(duration_setting!(a, file, lost_after))
        }
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(pick(Some(5), Some("ten")).expect("the flag"), secs(5));
        assert_eq!(pick(None, Some("10s")).expect("the file"), secs(10));
        assert_eq!(pick(None, None).expect("neither"), None);
        let err = pick(None, Some("ten")).expect_err("no duration");
        assert!(
            format!("{err:#}")
                .starts_with("lost_after in the config file: invalid duration \"ten\""),
            "{err:#}"
        );
    }
}
