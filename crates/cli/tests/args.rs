//! The `tether` binary with arguments it must refuse clearly: an exit code and a message,
//! never a panic.

use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output, Stdio};

fn tether(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .env_remove("TETHER_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run tether")
}

/// An argument that is not UTF-8 (a Latin-1 path) beside a bad setting: the setting's error,
/// exit 1. Reading the command line as strings to name the setting panicked (exit 101).
#[test]
fn a_bad_setting_beside_an_argument_that_is_not_utf8_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut latin1 = dir.path().as_os_str().as_bytes().to_vec();
    latin1.extend_from_slice(b"/caf\xe9");
    let out = tether(&[
        "coordinator".as_ref(),
        "--data-dir".as_ref(),
        std::ffi::OsStr::from_bytes(&latin1),
        "--max-frame".as_ref(),
        "1000".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--max-frame"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A `--log` that is no log filter is refused (exit 2), not replaced by `info` in silence.
#[test]
fn a_log_filter_that_does_not_parse_is_refused() {
    let out = tether(&[
        "--log".as_ref(),
        "tether_coordinator=verbose".as_ref(),
        "coordinator".as_ref(),
        "--max-frame".as_ref(),
        "0".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a log filter"), "{err}");
}
