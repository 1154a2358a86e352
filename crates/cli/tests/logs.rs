//! What `tether coordinator` logs at which level: its start at the default level (info) says
//! one line for the database's migration and nothing of huge pages; `--log debug` says each
//! migration step, so that the lines missing at info are known to be there one level down.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start or a stop may take before the test gives up on it.
const LONG: Duration = Duration::from_secs(60);

/// The start of a fresh data directory, at the default level: one `database migrated` line,
/// from 0 to the schema's version in as many steps, no line of a step (1649424, 618fc6a: a new
/// database logged one line a step at info, nine in all), and no line of transparent huge
/// pages (17a8363: it came first thing, before every refusal). A second start of the same
/// directory migrates nothing and says nothing of it. At debug, the start of a fresh directory
/// says each step, as many as the summary counted, and what it did about huge pages.
#[test]
fn a_fresh_coordinator_says_its_migration_in_one_line_at_info_and_each_step_at_debug() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let log = run_and_stop(&[], &data, &dir.path().join("info.log"));
    let migrated = lines_with(&log, "database migrated");
    assert_eq!(migrated.len(), 1, "{log}");
    let from = field(migrated[0], "from");
    let (to, steps) = (field(migrated[0], "to"), field(migrated[0], "steps"));
    assert_eq!(from, Some(0), "{log}");
    assert!(to.is_some_and(|to| to > 0), "{log}");
    assert_eq!(steps, to, "{log}");
    assert!(
        lines_with(&log, "database migration applied").is_empty(),
        "{log}"
    );
    assert!(
        lines_with(&log, "transparent huge pages").is_empty(),
        "{log}"
    );

    let again = run_and_stop(&[], &data, &dir.path().join("again.log"));
    assert!(lines_with(&again, "database migrat").is_empty(), "{again}");

    let fresh = dir.path().join("fresh");
    let debug = run_and_stop(&["--log", "debug"], &fresh, &dir.path().join("debug.log"));
    let applied = lines_with(&debug, "database migration applied");
    let steps = steps.expect("the steps") as usize;
    assert_eq!(applied.len(), steps, "{debug}");
    assert_eq!(lines_with(&debug, "database migrated").len(), 1, "{debug}");
    #[cfg(target_os = "linux")]
    assert_eq!(
        lines_with(&debug, "transparent huge pages").len(),
        1,
        "{debug}"
    );
}

/// The lines of `log` that hold `text`.
fn lines_with<'a>(log: &'a str, text: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(text)).collect()
}

/// The number a log line gives its field `name` (`steps=9`).
fn field(line: &str, name: &str) -> Option<u64> {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
}

/// Starts `tether [log_args] coordinator` on a port of its own with `data` as its data
/// directory, its log (stderr) to the file `log`; once it says it is listening, stops it as
/// a service manager would (SIGTERM) and returns the whole log, the stop's line in it.
fn run_and_stop(log_args: &[&str], data: &Path, log: &Path) -> String {
    let file = std::fs::File::create(log).expect("create the log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(log_args)
        .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env_remove("TETHER_LOG")
        .env_remove("TETHER_CONFIG")
        .env_remove("TETHER_LISTEN")
        .env_remove("TETHER_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start tether coordinator");
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + LONG;
    while !read().contains("coordinator listening") {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "the coordinator ended before it listened: {status}\n{}",
                read()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the coordinator did not listen within {LONG:?}\n{}", read());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + LONG;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the coordinator did not stop within {LONG:?}\n{}", read());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let said = read();
    assert!(status.success(), "{status}\n{said}");
    assert!(said.contains("coordinator stopped"), "{said}");
    said
}
