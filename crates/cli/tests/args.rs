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
/// a usage error (exit 2) as the flag gave it. Reading the command line as strings to name the
/// setting panicked (exit 101).
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
    assert_eq!(out.status.code(), Some(2), "{err}");
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

/// A TLS private key readable by other users is said so at start (whoever reads it can pose
/// as the coordinator), as a secret file is; an expired certificate is refused, naming when
/// it expired, rather than served to workers that would each refuse it.
#[test]
fn an_open_tls_key_is_warned_of_and_an_expired_certificate_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let made = tether(&["cert".as_ref(), "--out".as_ref(), dir.path().as_os_str()]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    // --message-mac without a secret: refused once the TLS files were read.
    let data = dir.path().join("data");
    let coordinator = |cert: &std::path::Path, key: &std::path::Path| {
        tether(&[
            "coordinator".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
            "--message-mac".as_ref(),
        ])
    };
    let out = coordinator(&cert, &key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the TLS private key is readable by other users"),
        "{err}"
    );
    // Expired yesterday.
    let old = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let expired = params.self_signed(&old).expect("sign");
    std::fs::write(&cert, expired.pem()).expect("cert");
    std::fs::write(&key, old.serialize_pem()).expect("key");
    let out = coordinator(&cert, &key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("expired on"), "{err}");
}

/// An API token that no `Authorization` header can carry as text (`ö`) is refused at start,
/// naming its file and line, before anything is made: taken, it could never authenticate,
/// and each request that sent it was told to send a token.
#[test]
fn an_api_token_no_header_can_carry_is_refused_at_start_with_its_file_and_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("admin.tokens");
    std::fs::write(&tokens, "good-token-0123456789\nprod-tökén-0123456789\n").expect("write");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let data = dir.path().join("data");
    // Taken, the coordinator would serve until stopped: it is given a while to refuse.
    let (data_s, tokens_s) = (data.display().to_string(), tokens.display().to_string());
    let args = [
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_s,
        "--admin-token-file",
        &tokens_s,
    ];
    let (code, err) = tether_bounded(&args, None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&tokens.display().to_string()), "{err}");
    assert!(
        err.contains("line 2") && err.contains("visible ASCII"),
        "{err}"
    );
    assert!(!data.exists(), "nothing made for a refused configuration");
}

/// A loopback port with nothing listening: connections to it are refused.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

/// A watch that cannot start (no client can be made) could not follow its tasks: exit 2, not
/// the 1 that says a task ended but did not complete. A submitted id that breaks the id rules
/// is a usage error, 2 as well.
#[test]
fn a_watch_that_cannot_start_exits_2_not_the_1_of_a_task_that_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing");
    let closed = closed_port();
    let cases: [(&str, Vec<&std::ffi::OsStr>); 4] = [
        (
            "a URL that is no coordinator's",
            vec![
                "watch".as_ref(),
                "--coordinator".as_ref(),
                "ftp://x".as_ref(),
                "t1".as_ref(),
            ],
        ),
        (
            "a missing token file",
            vec![
                "watch".as_ref(),
                "--token-file".as_ref(),
                missing.as_os_str(),
                "t1".as_ref(),
            ],
        ),
        (
            "a missing CA file",
            vec![
                "watch".as_ref(),
                "--coordinator".as_ref(),
                "https://127.0.0.1:9".as_ref(),
                "--ca-file".as_ref(),
                missing.as_os_str(),
                "t1".as_ref(),
            ],
        ),
        (
            "submit --id with a bad id",
            vec![
                "submit".as_ref(),
                "--coordinator".as_ref(),
                closed.as_ref(),
                "--id".as_ref(),
                "bad id!".as_ref(),
                "--".as_ref(),
                "true".as_ref(),
            ],
        ),
    ];
    for (what, args) in cases {
        let out = tether(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.starts_with("error"), "{what}: {err}");
    }
}

/// `tether` with string arguments.
fn tether_str(args: &[&str]) -> (Option<i32>, String) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::convert::AsRef::as_ref).collect();
    let out = tether(&args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Attempts and a timeout the API would refuse are usage errors (exit 2) naming the flag,
/// before any request (the port is closed: a request would fail "cannot reach"), with
/// --watch too. They went to the coordinator and came back in the API's words (`task 0:
/// timeout_ms must be positive`, exit 1, or 2 under "the watch could not follow" with
/// --watch); a timeout of a fraction of a millisecond was cut to whole ones in silence.
#[test]
fn submit_values_the_api_would_refuse_are_usage_errors_naming_the_flag() {
    let closed = closed_port();
    for watch in [&[][..], &["--watch"]] {
        for (flag, value) in [
            ("--max-attempts", "0"),
            ("--max-attempts", "101"),
            ("--timeout", "0s"),
            ("--timeout", "1500us"),
            ("--timeout", "2s 10ns"),
        ] {
            let args = ["submit", "--coordinator", &closed, flag, value];
            let (code, err) = tether_str(&[&args[..], watch, &["--", "true"]].concat());
            let what = format!("{flag} {value} {watch:?}");
            assert_eq!(code, Some(2), "{what}: {err}");
            assert!(err.contains(flag), "{what}: {err}");
            assert!(!err.contains("cannot reach"), "{what}: {err}");
            assert!(!err.contains("could not follow"), "{what}: {err}");
        }
    }
    // Values it takes are sent: here, to no one.
    let args = ["submit", "--coordinator", &closed, "--max-attempts", "1"];
    let (code, err) = tether_str(&[&args[..], &["--timeout", "1500ms", "--", "true"]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

/// An empty capability, a blank tag key and a capability, tag or name past the API's limits
/// (256 bytes for a label, 1024 for a name) are usage errors (exit 2) naming the flag and
/// why, before any request (the port is closed: a request would fail "cannot reach"), with
/// --watch too. Only the coordinator refused them, once the command had reached it.
#[test]
fn submit_labels_the_api_would_refuse_are_usage_errors_naming_the_flag() {
    let closed = closed_port();
    let label = "c".repeat(256);
    let name = "n".repeat(1024);
    for watch in [&[][..], &["--watch"]] {
        for (flag, value, says) in [
            ("--require", String::new(), "an empty capability"),
            ("--require", "  ".to_owned(), "an empty capability"),
            ("--require", format!("{label}c"), "257 bytes; at most 256"),
            ("--tag", " =linux".to_owned(), "an empty key"),
            ("--tag", format!("os={label}x"), "257 bytes; at most 256"),
            (
                "--name",
                format!("{name}n"),
                "name of 1025 bytes; at most 1024",
            ),
        ] {
            let args = ["submit", "--coordinator", &closed, flag, &value];
            let (code, err) = tether_str(&[&args[..], watch, &["--", "true"]].concat());
            let what = format!("{flag} {value:?} {watch:?}");
            assert_eq!(code, Some(2), "{what}: {err}");
            assert!(err.contains(&format!("for '{flag} ")), "{what}: {err}");
            assert!(err.contains(says), "{what}: {err}");
            assert!(!err.contains("cannot reach"), "{what}: {err}");
            assert!(!err.contains("could not follow"), "{what}: {err}");
        }
    }
    // At the limits, they are sent: here, to no one.
    let tag = format!("os={label}");
    let args = ["submit", "--coordinator", &closed, "--require", &label];
    let more = ["--tag", &tag, "--name", &name, "--", "true"];
    let (code, err) = tether_str(&[&args[..], &more].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

/// A submission that fails with --watch is the submission's failure, as without it: its own
/// error and exit status (1), not a watch that could not follow its tasks (2, under "the
/// watch could not follow its tasks to their end").
#[test]
fn a_submission_that_fails_with_watch_says_so_as_without_it() {
    let closed = closed_port();
    for (what, coordinator, says) in [
        ("a URL that is no coordinator's", "ftp://x", "ftp"),
        ("refused a connection", closed.as_str(), "cannot reach"),
    ] {
        for watch in [&[][..], &["--watch"]] {
            let args = ["submit", "--coordinator", coordinator];
            let (code, err) = tether_str(&[&args[..], watch, &["--", "true"]].concat());
            assert_eq!(code, Some(1), "{what} {watch:?}: {err}");
            assert!(err.contains(says), "{what} {watch:?}: {err}");
            assert!(!err.contains("could not follow"), "{what} {watch:?}: {err}");
        }
    }
}

/// A log filter asked for (`--log`, `TETHER_LOG`) is used by the client commands too, whose
/// default stays warnings only; it was replaced by `warn` in silence. An exported but empty
/// `TETHER_TOKEN` is said to be empty, not to hold spaces.
#[test]
fn a_client_command_logs_at_the_level_asked_and_says_an_empty_token_is_empty() {
    let closed = closed_port();
    let tasks = ["tasks".as_ref(), "--coordinator".as_ref(), closed.as_ref()];
    let debug_lines = |out: &Output| {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains(" DEBUG "))
            .count()
    };
    let quiet = tether(&tasks);
    assert_eq!(quiet.status.code(), Some(1));
    assert_eq!(debug_lines(&quiet), 0, "warnings only by default");
    let flag = tether(&[&["--log".as_ref(), "debug".as_ref()][..], &tasks].concat());
    assert!(
        debug_lines(&flag) > 0,
        "--log debug: {}",
        String::from_utf8_lossy(&flag.stderr)
    );
    let env = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(tasks)
        .env("TETHER_LOG", "debug")
        .env_remove("TETHER_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run tether");
    assert!(
        debug_lines(&env) > 0,
        "TETHER_LOG=debug: {}",
        String::from_utf8_lossy(&env.stderr)
    );
    let empty = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(tasks)
        .env_remove("TETHER_LOG")
        .env("TETHER_TOKEN", "")
        .stdin(Stdio::null())
        .output()
        .expect("run tether");
    let err = String::from_utf8_lossy(&empty.stderr);
    assert_eq!(empty.status.code(), Some(1), "{err}");
    assert!(err.contains("TETHER_TOKEN is empty"), "{err}");
    assert!(!err.contains("without spaces"), "{err}");
}

/// More `--require`s or `--tag`s than a spec may hold (tether-proto's `MAX_LABELS`, the bound
/// the coordinator refuses a submission by) are a usage error (exit 2) saying how many were
/// given and the bound, before any request (the port is closed: a request would fail "cannot
/// reach"), with --watch too; so are they in a `--file`'s spec. They were sent and refused
/// by the coordinator. At the bound, they are sent.
#[test]
fn submit_more_requires_or_tags_than_a_spec_holds_is_a_usage_error_before_any_request() {
    use tether_proto::task::MAX_LABELS;
    let closed = closed_port();
    let over = MAX_LABELS + 1;
    let labels = |flag: &str, n: usize| -> Vec<String> {
        (0..n)
            .flat_map(|i| [flag.to_owned(), format!("k{i}=v")])
            .collect()
    };
    for watch in [&[][..], &["--watch"]] {
        for (flag, what) in [("--tag", "tags"), ("--require", "capabilities")] {
            let mut args = vec!["submit".to_owned(), "--coordinator".into(), closed.clone()];
            args.extend(labels(flag, over));
            args.extend(watch.iter().map(|w| (*w).to_owned()));
            args.extend(["--".into(), "true".into()]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, err) = tether_str(&args);
            let says =
                format!("{over} {what} given ({flag}); a task may ask for at most {MAX_LABELS}");
            assert_eq!(code, Some(2), "{flag} {watch:?}: {err}");
            assert!(err.contains(&says), "{flag} {watch:?}: {err}");
            assert!(err.contains("Usage: tether submit"), "{err}");
            assert!(!err.contains("cannot reach"), "{flag} {watch:?}: {err}");
        }
    }
    let mut args = vec!["submit".to_owned(), "--coordinator".into(), closed.clone()];
    args.extend(labels("--tag", MAX_LABELS));
    args.extend(labels("--require", MAX_LABELS));
    args.extend(["--".into(), "true".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = tether_str(&args);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    // In a file: the spec's own bounds, by the same check.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tags.json");
    let tags: serde_json::Map<String, serde_json::Value> =
        (0..over).map(|i| (format!("k{i}"), "v".into())).collect();
    let spec = serde_json::json!({"tasks": [{"kind": "sleep"}, {"kind": "sleep", "tags": tags}]});
    std::fs::write(&file, spec.to_string()).expect("write");
    let path = file.to_str().expect("a UTF-8 path");
    let (code, err) = tether_str(&["submit", "--coordinator", &closed, "--file", path]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("--file {path}: task 1: at most {MAX_LABELS}")),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
}

/// An over-long value refused is quoted cut in the error (its first 64 characters and its
/// length), for clap's quote and the flag's own words alike: a `--name` of 100,000
/// characters was printed whole, twice over for a `--priority` or an `--env`.
#[test]
fn an_over_long_value_refused_is_quoted_cut() {
    let long = "n".repeat(100_000);
    let cut = format!("{}… (100000 characters)", "n".repeat(64));
    // Each of 100,000 characters too.
    let env = format!("N{}", &long[1..]);
    let timeout = format!("5{}", &long[1..]);
    for (flag, value, says) in [
        ("--name", &long, "name of 100000 bytes; at most 1024"),
        ("--require", &long, "of 100000 bytes; at most 256"),
        ("--priority", &long, "use high, normal, low or 0..=9"),
        ("--env", &env, "use KEY=VALUE"),
        ("--timeout", &timeout, "unknown time unit"),
        ("--max-attempts", &long, "invalid digit"),
        ("--id", &long, ""),
    ] {
        let (code, err) = tether_str(&["submit", flag, value, "--", "true"]);
        assert_eq!(code, Some(2), "{flag}: {}", &err[..err.len().min(300)]);
        assert!(
            err.len() < 1_000,
            "{flag}: {} bytes: {}",
            err.len(),
            &err[..300]
        );
        assert!(err.contains(flag) && err.contains(says), "{flag}: {err}");
        assert!(err.contains("(100000 characters)"), "{flag}: {err}");
    }
    let (code, err) = tether_str(&["submit", "--name", &long, "--", "true"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("invalid value '{cut}' for '--name ")),
        "{err}"
    );
}

/// A command the `command` executor refuses (an empty program, an `--env` the worker sets
/// itself) is a usage error (exit 2) in the executor's words, before any request: the
/// coordinator refused it by the same check at submission, once the command had reached it.
#[test]
fn submit_a_command_the_executor_refuses_is_a_usage_error_before_any_request() {
    let closed = closed_port();
    for (args, says) in [
        (&["--", ""][..], "`program` is empty"),
        (
            &["--env", "TETHER_TASK_ID=t-1", "--", "true"],
            "`env` cannot set TETHER_TASK_ID",
        ),
        (
            &["--env", "TETHER_TASK_ID=t-1", "--shell", "true"],
            "`env` cannot set TETHER_TASK_ID",
        ),
    ] {
        let head = ["submit", "--coordinator", &closed];
        let (code, err) = tether_str(&[&head[..], args].concat());
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("cannot reach"), "{args:?}: {err}");
    }
}

/// `tether` with `args` (and `--config file`, given), bounded in time: a coordinator that
/// took a setting it should have refused would serve until stopped.
fn tether_bounded(args: &[&str], config: Option<&std::path::Path>) -> (Option<i32>, String) {
    tether_bounded_env(args, config, &[])
}

/// [`tether_bounded`] with environment variables `env` set.
fn tether_bounded_env(
    args: &[&str],
    config: Option<&std::path::Path>,
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
    c.args(args).envs(env.iter().copied());
    if let Some(file) = config {
        c.arg("--config").arg(file);
    }
    let mut run = c
        .env_remove("TETHER_LOG")
        .env_remove("TETHER_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tether");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while run.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = run.kill();
            let _ = run.wait();
            panic!("tether {args:?} (config {config:?}) took a setting it should refuse");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = run.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--http-idle` and `--min-answer-rate` out of the library's range (an idle time under
/// 100 ms, a rate of 0 or past 128 MiB/s), past ten years or not a value at all are usage
/// errors (exit 2) naming the flag and the range (one that does not parse in clap's words,
/// one out of range in the library's, as any flag's value the settings refuse); the same
/// values as `http_idle` and
/// `min_answer_rate` in the config file are refused naming the key and its file (exit 1, as
/// any setting of the file is), before anything is made. Neither had a flag nor a key.
#[test]
fn http_idle_and_min_answer_rate_out_of_range_are_refused_naming_the_flag_or_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let head = ["coordinator", "--listen", "127.0.0.1:0", "--data-dir", data];
    for (flag, value, says, parsed) in [
        ("--http-idle", "0s", "at least 100 ms", true),
        ("--http-idle", "99ms", "at least 100 ms", true),
        ("--http-idle", "11y", "longer than 3650 days", false),
        ("--http-idle", "soon", "use e.g. 5s", false),
        ("--min-answer-rate", "0", "1 to 134217728", true),
        ("--min-answer-rate", "134217729", "1 to 134217728", true),
        ("--min-answer-rate", "64XB", "unknown size unit", false),
        ("--min-answer-rate", "fast", "bytes a second", false),
        // With a unit, taken: past the range in the library's words.
        ("--min-answer-rate", "256MiB/s", "1 to 134217728", true),
    ] {
        let (code, err) = tether_bounded(&[&head[..], &[flag, value]].concat(), None);
        let what = format!("{flag} {value}");
        assert_eq!(code, Some(2), "{what}: {err}");
        let named = match parsed {
            true => format!("error: {flag} "),
            false => format!("invalid value '{value}' for '{flag} "),
        };
        assert!(err.contains(&named), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
    }
    let file = dir.path().join("c.toml");
    for (key, value, says) in [
        ("http_idle", "\"50ms\"", "50 ms would cut answers"),
        ("http_idle", "\"soon\"", "invalid duration"),
        ("min_answer_rate", "0", "1 to 134217728"),
        ("min_answer_rate", "200000000", "1 to 134217728"),
    ] {
        std::fs::write(&file, format!("[coordinator]\n{key} = {value}\n")).expect("write");
        let (code, err) = tether_bounded(&head, Some(&file));
        let what = format!("{key} = {value}");
        assert_eq!(code, Some(1), "{what}: {err}");
        assert!(err.contains(key) && err.contains(says), "{what}: {err}");
        assert!(
            err.contains(&file.display().to_string()) || err.contains("config file"),
            "{what}: {err}"
        );
    }
    assert!(!std::path::Path::new(data).exists(), "nothing made");
}

/// `--http-idle 200ms` (or `http_idle = "200ms"` in the config file), beside a minimum answer
/// rate it takes, reaches the running coordinator: a connection idle after its answer is
/// closed by it, long before the default 60 s (the read waits up to 30 s for the close).
#[test]
fn http_idle_and_min_answer_rate_given_reach_the_running_coordinator() {
    use std::io::{BufRead, Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[coordinator]\nhttp_idle = \"200ms\"\nmin_answer_rate = 1048576\n",
    )
    .expect("write");
    let flags = ["--http-idle", "200ms", "--min-answer-rate", "1048576"];
    let config = ["--config", file.to_str().expect("utf-8 path")];
    for (i, given) in [flags.as_slice(), config.as_slice()]
        .into_iter()
        .enumerate()
    {
        let data = dir.path().join(format!("data-{i}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["--log", "info", "coordinator", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data)
            .args(given)
            .env_remove("TETHER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tether coordinator");
        // Its log, read on a thread of its own (it ends when the process does).
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut log = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{given:?}: no \"coordinator listening\" within 30 s: {log:#?}");
            };
            if line.contains("coordinator listening") {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .expect("the address logged")
                    .to_owned();
                break addr;
            }
            log.push(line);
        };
        let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
        conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .expect("read timeout");
        conn.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .expect("request");
        let mut answer = Vec::new();
        let read = conn.read_to_end(&mut answer);
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            read.is_ok(),
            "{given:?}: the idle connection was not closed within 30 s ({read:?}): {answer}"
        );
        assert!(answer.starts_with("HTTP/1.1 "), "{given:?}: {answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("connection: close"),
            "{given:?}: closed as asked by the answer, not for being idle: {answer}"
        );
    }
}

/// A `--tag` key given twice with different values (`--tag os=a --tag os=b`) is a usage error
/// (exit 2) naming the key and both values, each quoted cut as clap quotes a value, before
/// any request: the last was kept in silence. The same `KEY=VALUE` twice is one tag, taken.
#[test]
fn submit_a_tag_key_given_twice_with_different_values_is_a_usage_error_naming_both() {
    let closed = closed_port();
    for watch in [&[][..], &["--watch"]] {
        let args = ["submit", "--coordinator", &closed, "--tag", "os=a"];
        let more = ["--tag", "arch=x86", "--tag", "os=b", "--", "true"];
        let (code, err) = tether_str(&[&args[..], watch, &more].concat());
        assert_eq!(code, Some(2), "{watch:?}: {err}");
        assert!(
            err.contains(r#"--tag "os" given twice with different values, "a" and "b""#),
            "{watch:?}: {err}"
        );
        assert!(!err.contains("cannot reach"), "{watch:?}: {err}");
        assert!(!err.contains("could not follow"), "{watch:?}: {err}");
    }
    // Values at the API's limit (256 bytes): quoted cut, the error bounded.
    let (first, second) = (
        format!("k={}", "a".repeat(254)),
        format!("k={}", "b".repeat(254)),
    );
    let args = ["submit", "--coordinator", &closed, "--tag", &first];
    let (code, err) = tether_str(&[&args[..], &["--tag", &second, "--", "true"]].concat());
    assert_eq!(code, Some(2), "{err}");
    let cut = |c: &str| format!("\"{}… (254 characters)\"", c.repeat(64));
    assert!(err.contains(&cut("a")) && err.contains(&cut("b")), "{err}");
    assert!(err.len() < 1_000, "{} bytes: {err}", err.len());
    // The same tag twice is no conflict: sent, here to no one.
    let args = ["submit", "--coordinator", &closed, "--tag", "os=a"];
    let (code, err) = tether_str(&[&args[..], &["--tag", "os=a", "--", "true"]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

/// A worker's `--tag` key given twice with different values (`--tag os=a --tag os=b`) is a
/// usage error (exit 2) naming the key and both values, each quoted cut as clap quotes a
/// value, before anything is read or a connection tried: the last was kept in silence. The
/// same `KEY=VALUE` twice is one tag: the worker runs (and gives up on the closed port).
#[test]
fn worker_a_tag_key_given_twice_with_different_values_is_a_usage_error_naming_both() {
    let closed = closed_port();
    let head = ["worker", "--coordinator", &closed, "--id", "w"];
    let once = ["--max-reconnect-attempts", "1"];
    let tags = ["--tag", "os=a", "--tag", "arch=x86", "--tag", "os=b"];
    let (code, err) = tether_bounded(&[&head[..], &once, &tags].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(r#"--tag "os" given twice with different values, "a" and "b""#),
        "{err}"
    );
    assert!(err.contains("Usage: tether worker"), "{err}");
    assert!(!err.contains("connection attempt"), "{err}");
    // Long values: quoted cut, the error bounded.
    let (first, second) = (
        format!("k={}", "a".repeat(1000)),
        format!("k={}", "b".repeat(1000)),
    );
    let tags = ["--tag", &first, "--tag", &second];
    let (code, err) = tether_bounded(&[&head[..], &once, &tags].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    let cut = |c: &str| format!("\"{}… (1000 characters)\"", c.repeat(64));
    assert!(err.contains(&cut("a")) && err.contains(&cut("b")), "{err}");
    assert!(err.len() < 1_000, "{} bytes: {err}", err.len());
    // The same tag twice is no conflict: the worker runs.
    let tags = ["--tag", "os=a", "--tag", "os=a"];
    let (code, err) = tether_bounded(&[&head[..], &once, &tags].concat(), None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("gave up after 1"), "{err}");
}

/// A worker's `--capability` given twice is one capability, taken once: 257 of the same name
/// were counted against the registration's bound of 256 and refused the worker at start.
#[test]
fn worker_a_capability_given_twice_is_taken_once() {
    let closed = closed_port();
    let mut args = vec!["worker", "--coordinator", &closed, "--id", "w"];
    args.extend(["--max-reconnect-attempts", "1"]);
    for _ in 0..257 {
        args.extend(["--capability", "gpu"]);
    }
    let (code, err) = tether_bounded(&args, None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("gave up after 1"), "{err}");
    assert!(!err.contains("capabilities"), "{err}");
}

/// An `--env` variable given twice with different values (`--env K=1 --env K=2`) is a usage
/// error (exit 2) naming the variable and both values, each quoted cut (a value may be
/// long, or secret), before any request: the last was kept in silence. The same `K=V` twice
/// is one variable, sent.
#[test]
fn submit_an_env_variable_given_twice_with_different_values_is_a_usage_error_naming_both() {
    let closed = closed_port();
    for watch in [&[][..], &["--watch"]] {
        let args = ["submit", "--coordinator", &closed, "--env", "K=1"];
        let more = ["--env", "J=0", "--env", "K=2", "--", "true"];
        let (code, err) = tether_str(&[&args[..], watch, &more].concat());
        assert_eq!(code, Some(2), "{watch:?}: {err}");
        assert!(
            err.contains(r#"--env "K" given twice with different values, "1" and "2""#),
            "{watch:?}: {err}"
        );
        assert!(err.contains("Usage: tether submit"), "{watch:?}: {err}");
        assert!(!err.contains("cannot reach"), "{watch:?}: {err}");
        assert!(!err.contains("could not follow"), "{watch:?}: {err}");
    }
    // Long values (a secret-ish token, say): quoted cut, the error bounded.
    let (first, second) = (
        format!("TOKEN={}", "a".repeat(100_000)),
        format!("TOKEN={}", "b".repeat(100_000)),
    );
    let args = ["submit", "--coordinator", &closed, "--env", &first];
    let (code, err) = tether_str(&[&args[..], &["--env", &second, "--", "true"]].concat());
    assert_eq!(code, Some(2), "{}", &err[..err.len().min(300)]);
    let cut = |c: &str| format!("\"{}… (100000 characters)\"", c.repeat(64));
    assert!(err.contains(&cut("a")) && err.contains(&cut("b")), "{err}");
    assert!(err.len() < 1_000, "{} bytes", err.len());
    // The same variable twice is no conflict: sent, here to no one.
    let args = ["submit", "--coordinator", &closed, "--env", "K=1"];
    let (code, err) = tether_str(&[&args[..], &["--env", "K=1", "--", "true"]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

/// What the `error:` line of `err` says after `error: {flag} `, the refused setting named
/// first by its flag (a panic when it is not).
fn refusal<'a>(err: &'a str, flag: &str) -> &'a str {
    err.lines()
        .find_map(|l| l.strip_prefix("error: "))
        .and_then(|l| l.strip_prefix(flag))
        .and_then(|l| l.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no error naming {flag} first: {err}"))
}

/// A value the coordinator's settings refuse, given by a flag (or its environment variable),
/// is a usage error (exit 2) naming the flag (and the variable that gave it, if one did),
/// never the library's field, with the command's usage, whether the command refuses it
/// (`--max-frame 1000`, under its 1 MiB) or the library's check does (`--lost-after 500ms`),
/// and beside a config file that gave other settings; a default refused beside it (the
/// timeout, for a longer interval) too. The same values from the config file stay errors of
/// the run (exit 1) naming the key and the file. A flag's value was exit 1, and exit 2 only
/// for `--http-idle` and `--min-answer-rate`.
#[test]
fn a_coordinator_flag_value_the_settings_refuse_is_a_usage_error_and_a_file_key_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let head = ["coordinator", "--listen", "127.0.0.1:0", "--data-dir", data];
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "[coordinator]\nmax_body = 4096\n").expect("write");
    for (flag, value, key, says) in [
        ("--max-frame", "1000", "max_frame", "at least 1048576"),
        ("--lost-after", "500ms", "lost_after", "at least 1 s"),
        ("--retention", "59s", "retention", "at least 60s"),
        (
            "--max-checkpoint-bytes",
            "0",
            "max_checkpoint_bytes",
            "at least 1",
        ),
        (
            "--connects-per-sec",
            "0",
            "connects_per_sec",
            "a positive number",
        ),
        ("--idle-coalesce", "25ms", "idle_coalesce", "20 ms allowed"),
    ] {
        let what = format!("{flag} {value}");
        for config in [None, Some(other.as_path())] {
            let (code, err) = tether_bounded(&[&head[..], &[flag, value]].concat(), config);
            assert_eq!(code, Some(2), "{what} {config:?}: {err}");
            let said = refusal(&err, flag);
            assert!(said.contains(says), "{what}: {err}");
            assert!(!said.contains(key), "{what}: the field named: {err}");
            assert!(err.contains("Usage: tether coordinator"), "{what}: {err}");
        }
        // Its environment variable, where it has one: as the flag, as clap takes it, and
        // named, where the flag alone was (the user gave no flag).
        if flag == "--idle-coalesce" {
            let env = [("TETHER_IDLE_COALESCE", value)];
            let (code, err) = tether_bounded_env(&head, None, &env);
            assert_eq!(code, Some(2), "TETHER_IDLE_COALESCE={value}: {err}");
            let said = refusal(&err, flag);
            assert!(said.contains(says), "{err}");
            assert!(
                said.starts_with("(given by TETHER_IDLE_COALESCE) "),
                "{err}"
            );
        }
        // The same value in the file: the file's error, naming the key and the file.
        let file = dir.path().join("c.toml");
        let value = match value.parse::<f64>() {
            Ok(_) => value.to_owned(),
            Err(_) => format!("{value:?}"),
        };
        std::fs::write(&file, format!("[coordinator]\n{key} = {value}\n")).expect("write");
        let (code, err) = tether_bounded(&head, Some(&file));
        assert_eq!(code, Some(1), "{key} = {value}: {err}");
        let named = format!("{key} (in {})", file.display());
        assert!(err.contains(&named) && err.contains(says), "{key}: {err}");
        assert!(!err.contains("Usage:"), "{key}: {err}");
    }
    // A default the library refuses beside a flag's value: the flag's doing, a usage error.
    let interval = ["--heartbeat-interval", "20s"];
    let (code, err) = tether_bounded(&[&head[..], &interval].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("the default --heartbeat-timeout 15s must be longer than the heartbeat"),
        "{err}"
    );
    // The same beside the file's interval: the file's doing, as it was.
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[coordinator]\nheartbeat_interval = \"20s\"\n").expect("write");
    let (code, err) = tether_bounded(&head, Some(&file));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the default --heartbeat-timeout"), "{err}");
    assert!(!std::path::Path::new(data).exists(), "nothing made");
}

/// A value the worker's settings refuse, given by a flag, is a usage error (exit 2) naming the
/// flag, never the library's field (`backoff.max`, `slots`), with the command's usage; the
/// same value from the config file stays an error of the run (exit 1) naming the key and the
/// file. A flag's value was exit 1.
#[test]
fn a_worker_flag_value_the_settings_refuse_is_a_usage_error_and_a_file_key_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = closed_port();
    // Taken by mistake, the worker would give up on the closed port (exit 1, "gave up").
    let head = ["worker", "--coordinator", &closed, "--id", "w"];
    let once = ["--max-reconnect-attempts", "1"];
    for (flag, value, key, says) in [
        (
            "--max-reconnect-delay",
            "100ms",
            "max_reconnect_delay",
            "is shorter than --initial-reconnect-delay",
        ),
        ("--slots", "0", "slots", "at least 1"),
        ("--max-outbox-bytes", "0", "max_outbox_bytes", "at least 1"),
        (
            "--reconnect-jitter",
            "2",
            "reconnect_jitter",
            "outside 0..=1",
        ),
        (
            "--heartbeat-interval",
            "1ms",
            "heartbeat_interval",
            "at least",
        ),
    ] {
        let what = format!("{flag} {value}");
        let (code, err) = tether_bounded(&[&head[..], &once, &[flag, value]].concat(), None);
        assert_eq!(code, Some(2), "{what}: {err}");
        let said = refusal(&err, flag);
        assert!(said.contains(says), "{what}: {err}");
        assert!(!said.contains(key), "{what}: the field named: {err}");
        assert!(!said.contains("backoff."), "{what}: the field named: {err}");
        assert!(err.contains("Usage: tether worker"), "{what}: {err}");
        let file = dir.path().join("w.toml");
        let value = match value.parse::<f64>() {
            Ok(_) if key != "reconnect_jitter" => value.to_owned(),
            _ => format!("{value:?}"),
        };
        std::fs::write(&file, format!("[worker]\n{key} = {value}\n")).expect("write");
        let (code, err) = tether_bounded(&[&head[..], &once].concat(), Some(&file));
        assert_eq!(code, Some(1), "{key} = {value}: {err}");
        let named = format!("{key} (in {})", file.display());
        assert!(err.contains(&named) && err.contains(says), "{key}: {err}");
        assert!(!err.contains("Usage:"), "{key}: {err}");
    }
    // An id that breaks the id rules: refused as the flag is read, as `submit --id`; from the
    // file, the file's error.
    let head = ["worker", "--coordinator", &closed];
    let (code, err) = tether_bounded(&[&head[..], &once, &["--id", "w x"]].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("invalid value 'w x' for '--id "), "{err}");
    let file = dir.path().join("w.toml");
    std::fs::write(&file, "[worker]\nid = \"w x\"\n").expect("write");
    let (code, err) = tether_bounded(&[&head[..], &once].concat(), Some(&file));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("id in the config file"), "{err}");
    // A required setting that nothing gave is a usage error too, as clap's own (was exit 1).
    let no_coordinator = ["worker", "--id", "w"];
    let no_id = ["worker", "--coordinator", &closed];
    for (args, says) in [
        (&no_coordinator[..], "--coordinator is required"),
        (&no_id[..], "--id is required"),
    ] {
        let (code, err) = tether_bounded(args, None);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(err.contains("Usage: tether worker"), "{args:?}: {err}");
    }
}

/// `--event-log-max-bytes` under the least the worker takes (64 KiB) is a usage error (exit 2)
/// naming the flag and the least, before anything is made or a connection tried; as
/// `event_log_max_bytes` in the config file, the file's error (exit 1) naming the key. A
/// value that is no size (an unknown unit) is refused as the flag is read. At the least, the worker
/// runs (and gives up on the closed port). Neither had a flag nor a key.
#[test]
fn worker_an_event_log_bound_under_the_least_is_refused_naming_the_flag_or_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = closed_port();
    let head = ["worker", "--coordinator", &closed, "--id", "w"];
    let once = ["--max-reconnect-attempts", "1"];
    let flag = "--event-log-max-bytes";
    for value in ["0", "65535"] {
        let (code, err) = tether_bounded(&[&head[..], &once, &[flag, value]].concat(), None);
        assert_eq!(code, Some(2), "{value}: {err}");
        let said = refusal(&err, flag);
        assert!(said.contains("at least 65536"), "{value}: {err}");
        assert!(err.contains("Usage: tether worker"), "{value}: {err}");
        assert!(!err.contains("connection attempt"), "{value}: {err}");
    }
    let (code, err) = tether_bounded(&[&head[..], &once, &[flag, "64XB"]].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("invalid value '64XB' for '--event-log-max-bytes "),
        "{err}"
    );
    assert!(err.contains("unknown size unit"), "{err}");
    let file = dir.path().join("w.toml");
    std::fs::write(&file, "[worker]\nevent_log_max_bytes = 1000\n").expect("write");
    let (code, err) = tether_bounded(&[&head[..], &once].concat(), Some(&file));
    assert_eq!(code, Some(1), "{err}");
    let named = format!("event_log_max_bytes (in {})", file.display());
    assert!(
        err.contains(&named) && err.contains("at least 65536"),
        "{err}"
    );
    for value in ["65536", "64KiB"] {
        let (code, err) = tether_bounded(&[&head[..], &once, &[flag, value]].concat(), None);
        assert_eq!(code, Some(1), "{value}: {err}");
        assert!(err.contains("gave up after 1"), "{value}: {err}");
    }
}

/// A byte rate takes a unit and an optional `/s`: `--max-bytes-per-sec 1MiB/s` reaches the
/// coordinator's settings as 1048576 bytes a second (too low for the default 16 MiB frame,
/// refused naming it, as any flag's value the settings refuse), as does `max_bytes_per_sec =
/// "1MiB/s"` in the config file (refused naming the key and the file). `--min-answer-rate
/// 1.5MiB` (a fraction before a unit) and `64XB` are usage errors (exit 2) naming the flag;
/// `min_answer_rate = "1.5MiB"` in the file an error of the run (exit 1) naming key and file.
/// Rates took plain numbers only.
#[test]
fn a_byte_rate_takes_a_unit_from_the_flag_or_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let head = ["coordinator", "--listen", "127.0.0.1:0", "--data-dir", data];
    let rate = ["--max-bytes-per-sec", "1MiB/s"];
    let (code, err) = tether_bounded(&[&head[..], &rate].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    let said = refusal(&err, "--max-bytes-per-sec");
    assert!(
        said.starts_with(
            "1048576 would hold a session 16.0 s for one largest frame (16777216 bytes)"
        ),
        "{err}"
    );
    for value in ["1.5MiB", "64XB"] {
        let (code, err) =
            tether_bounded(&[&head[..], &["--min-answer-rate", value]].concat(), None);
        assert_eq!(code, Some(2), "{value}: {err}");
        assert!(
            err.contains(&format!("invalid value '{value}' for '--min-answer-rate ")),
            "{value}: {err}"
        );
    }
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[coordinator]\nmax_bytes_per_sec = \"1MiB/s\"\n").expect("write");
    let (code, err) = tether_bounded(&head, Some(&file));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("max_bytes_per_sec") && err.contains("1048576 would hold a session 16.0 s"),
        "{err}"
    );
    assert!(err.contains(&file.display().to_string()), "{err}");
    std::fs::write(&file, "[coordinator]\nmin_answer_rate = \"1.5MiB\"\n").expect("write");
    let (code, err) = tether_bounded(&head, Some(&file));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("min_answer_rate") && err.contains("whole number"),
        "{err}"
    );
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(!err.contains("Usage:"), "{err}");
    assert!(!std::path::Path::new(data).exists(), "nothing made");
}

/// A byte rate's unknown unit is a usage error (exit 2) naming the flag, and says that a rate
/// may end in `/s` (it listed the size units alone); a size's unknown unit does not.
#[test]
fn a_byte_rates_unknown_unit_says_a_rate_may_end_in_per_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let head = ["coordinator", "--listen", "127.0.0.1:0", "--data-dir", data];
    for (flag, value) in [
        ("--max-bytes-per-sec", "5XB/s"),
        ("--min-answer-rate", "3foo"),
    ] {
        let (code, err) = tether_bounded(&[&head[..], &[flag, value]].concat(), None);
        assert_eq!(code, Some(2), "{flag} {value}: {err}");
        assert!(
            err.contains(&format!("invalid value '{value}' for '{flag} ")),
            "{flag} {value}: {err}"
        );
        assert!(err.contains("unknown size unit"), "{flag} {value}: {err}");
        assert!(
            err.contains("optionally followed by /s, e.g. 64KiB/s"),
            "{flag} {value}: {err}"
        );
    }
    let (code, err) = tether_bounded(&[&head[..], &["--max-frame", "5XB"]].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown size unit \"XB\""), "{err}");
    assert!(!err.contains("/s"), "{err}");
    assert!(!std::path::Path::new(data).exists(), "nothing made");
}

/// A byte size takes a unit: `--max-frame 1MiB` reaches the coordinator's settings as
/// 1048576 bytes (a byte rate too low for that frame is refused naming it, a usage error as
/// any flag's value the settings refuse), `--max-frame 1000KiB` is refused as 1024000, under
/// the least; `max_frame = "1MiB"` in the config file is taken the same. A fraction or an
/// unknown unit is a usage error (exit 2) naming the flag; in the file, an error of the run
/// (exit 1) naming the key and the file. Units were refused: plain bytes only.
#[test]
fn a_byte_size_takes_a_unit_from_the_flag_or_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let head = ["coordinator", "--listen", "127.0.0.1:0", "--data-dir", data];
    let slow = ["--max-bytes-per-sec", "100000"];
    let (code, err) = tether_bounded(&[&head[..], &slow, &["--max-frame", "1MiB"]].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    let said = refusal(&err, "--max-bytes-per-sec");
    assert!(said.contains("one largest frame (1048576 bytes)"), "{err}");
    let (code, err) = tether_bounded(&[&head[..], &["--max-frame", "1000KiB"]].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        refusal(&err, "--max-frame").contains("1024000 is too small"),
        "{err}"
    );
    for value in ["1.5MiB", "10XB"] {
        let (code, err) = tether_bounded(&[&head[..], &["--max-frame", value]].concat(), None);
        assert_eq!(code, Some(2), "{value}: {err}");
        assert!(
            err.contains(&format!("invalid value '{value}' for '--max-frame ")),
            "{value}: {err}"
        );
    }
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[coordinator]\nmax_frame = \"1MiB\"\nmax_bytes_per_sec = 100000.0\n",
    )
    .expect("write");
    let (code, err) = tether_bounded(&head, Some(&file));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("one largest frame (1048576 bytes)"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    for (value, says) in [
        ("\"1.5MiB\"", "whole number"),
        ("\"10XB\"", "unknown size unit"),
    ] {
        std::fs::write(&file, format!("[coordinator]\nmax_frame = {value}\n")).expect("write");
        let (code, err) = tether_bounded(&head, Some(&file));
        assert_eq!(code, Some(1), "{value}: {err}");
        assert!(
            err.contains("max_frame") && err.contains(says),
            "{value}: {err}"
        );
        assert!(err.contains(&file.display().to_string()), "{value}: {err}");
        assert!(!err.contains("Usage:"), "{value}: {err}");
    }
    assert!(!std::path::Path::new(data).exists(), "nothing made");
}

/// A default refused beside a flag's value (`--heartbeat-interval 20s`, longer than the
/// default 15 s timeout) is a usage error (exit 2) naming the flag, though the config file
/// sets other keys of the section (a worker's file names its coordinator and id): it was the
/// file's error (exit 1) whenever the file set any key. The same interval from the file is
/// the file's error, naming the key and the file.
#[test]
fn a_default_refused_beside_a_flags_value_is_a_usage_error_beside_a_file_of_other_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = closed_port();
    let file = dir.path().join("w.toml");
    let named = format!("[worker]\ncoordinator = \"{closed}\"\nid = \"w\"\n");
    std::fs::write(&file, &named).expect("write");
    let once = ["worker", "--max-reconnect-attempts", "1"];
    let interval = ["--heartbeat-interval", "20s"];
    let (code, err) = tether_bounded(&[&once[..], &interval].concat(), Some(&file));
    assert_eq!(code, Some(2), "{err}");
    let said = refusal(&err, "the default --heartbeat-timeout");
    assert!(said.contains("see --heartbeat-interval"), "{err}");
    assert!(err.contains("Usage: tether worker"), "{err}");
    // The coordinator's, beside a file of another key: the same.
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let head = ["coordinator", "--listen", "127.0.0.1:0", "--data-dir", data];
    let other = dir.path().join("c.toml");
    std::fs::write(&other, "[coordinator]\nmax_body = 4096\n").expect("write");
    let (code, err) = tether_bounded(&[&head[..], &interval].concat(), Some(&other));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        refusal(&err, "the default --heartbeat-timeout").contains("see --heartbeat-interval"),
        "{err}"
    );
    // The interval from the file: the file's error, naming the key and the file.
    std::fs::write(&file, format!("{named}heartbeat_interval = \"20s\"\n")).expect("write");
    let (code, err) = tether_bounded(&once, Some(&file));
    assert_eq!(code, Some(1), "{err}");
    let key = format!("heartbeat_interval (in {})", file.display());
    assert!(err.contains("the default --heartbeat-timeout"), "{err}");
    assert!(err.contains(&key), "{err}");
    assert!(!err.contains("Usage:"), "{err}");
    assert!(!std::path::Path::new(data).exists(), "nothing made");
}

/// A coordinator URL the worker cannot use is refused with the other settings: from the flag
/// (or `TETHER_COORDINATOR`, named) a usage error (exit 2) naming `--coordinator`, from the
/// config file the run's error (exit 1) naming the key and the file. It was checked only as
/// the agent was built, after the worker had started: exit 1, "invalid coordinator URL", no
/// flag named.
#[test]
fn a_coordinator_url_the_worker_cannot_use_is_refused_naming_where_it_came_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let once = ["--max-reconnect-attempts", "1"];
    let says = "refused: coordinator URL \"ftp://x\" has scheme \"ftp\"";
    let flag = ["worker", "--coordinator", "ftp://x", "--id", "x"];
    let (code, err) = tether_bounded(&[&flag[..], &once].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(refusal(&err, "--coordinator").starts_with(says), "{err}");
    assert!(err.contains("Usage: tether worker"), "{err}");
    let env = [("TETHER_COORDINATOR", "ftp://x")];
    let (code, err) =
        tether_bounded_env(&[&["worker", "--id", "x"][..], &once].concat(), None, &env);
    assert_eq!(code, Some(2), "{err}");
    let said = refusal(&err, "--coordinator");
    assert!(
        said.starts_with("(given by TETHER_COORDINATOR) refused: "),
        "{err}"
    );
    let file = dir.path().join("w.toml");
    std::fs::write(&file, "[worker]\ncoordinator = \"ftp://x\"\n").expect("write");
    let (code, err) = tether_bounded(&[&["worker", "--id", "x"][..], &once].concat(), Some(&file));
    assert_eq!(code, Some(1), "{err}");
    let named = format!("coordinator (in {}) {says}", file.display());
    assert!(err.contains(&named), "{err}");
    assert!(!err.contains("Usage:"), "{err}");
    // A URL that names another worker is refused for the id too.
    let other = "ws://127.0.0.1:1/api/v1/worker/other/ws";
    let (code, err) = tether_bounded(&["worker", "--coordinator", other, "--id", "x"], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        refusal(&err, "--coordinator").contains("names worker \"other\""),
        "{err}"
    );
}

/// A `--listen` that is no address (`notanaddr`) is a usage error (exit 2) naming the flag,
/// or `TETHER_LISTEN`, before anything is made; the file's `listen`, the run's error naming
/// the key and the file. It was refused only at the bind: exit 1, "cannot listen on". An
/// address that parses but cannot be bound (one in use) stays the run's error.
#[test]
fn a_listen_address_that_does_not_parse_is_a_usage_error_and_one_in_use_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let head = ["coordinator", "--data-dir", data];
    let says = "\"notanaddr\" is not an address to listen on: give HOST:PORT";
    let (code, err) = tether_bounded(&[&head[..], &["--listen", "notanaddr"]].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(refusal(&err, "--listen").starts_with(says), "{err}");
    assert!(err.contains("Usage: tether coordinator"), "{err}");
    let env = [("TETHER_LISTEN", "notanaddr")];
    let (code, err) = tether_bounded_env(&head, None, &env);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        refusal(&err, "--listen").contains("(given by TETHER_LISTEN)"),
        "{err}"
    );
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[coordinator]\nlisten = \"notanaddr\"\n").expect("write");
    let (code, err) = tether_bounded(&head, Some(&file));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("listen (in {}) {says}", file.display())),
        "{err}"
    );
    assert!(!std::path::Path::new(data).exists(), "nothing made");
    // An address in use: the run's error, as it was.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, err) = tether_bounded(&[&head[..], &["--listen", &addr]].concat(), None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(!err.contains("Usage:"), "{err}");
}

/// A worker's `--metrics-listen` (or `TETHER_METRICS_LISTEN`) that is no address is a usage
/// error (exit 2) naming it, found with the other settings: it was exit 1, found at its bind,
/// once the worker was configured and had swept its temporary files.
#[test]
fn a_worker_metrics_address_that_does_not_parse_is_a_usage_error() {
    let closed = closed_port();
    let head = ["worker", "--coordinator", &closed, "--id", "w"];
    let once = ["--max-reconnect-attempts", "1"];
    let bogus = ["--metrics-listen", "bogus"];
    let (code, err) = tether_bounded(&[&head[..], &once, &bogus].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    let said = refusal(&err, "--metrics-listen");
    assert!(
        said.starts_with("\"bogus\" is not an address to listen on"),
        "{err}"
    );
    assert!(err.contains("Usage: tether worker"), "{err}");
    assert!(!err.contains("worker configured"), "{err}");
    let env = [("TETHER_METRICS_LISTEN", "bogus")];
    let (code, err) = tether_bounded_env(&[&head[..], &once].concat(), None, &env);
    assert_eq!(code, Some(2), "{err}");
    let said = refusal(&err, "--metrics-listen");
    assert!(said.contains("(given by TETHER_METRICS_LISTEN)"), "{err}");
}

/// `tether submit` with nothing to run is a usage error (exit 2) with the usage, as every
/// other refused submission, before any request: it was exit 1. So is an empty `--shell`
/// script, which was accepted and "completed" having run nothing, where an empty program was
/// refused.
#[test]
fn submit_with_no_command_or_an_empty_script_is_a_usage_error() {
    let closed = closed_port();
    let head = ["submit", "--coordinator", &closed];
    for (args, says) in [
        (
            &[][..],
            "give a command after `--`, --shell SCRIPT or --file FILE",
        ),
        (&["--shell", ""][..], "`shell` is empty"),
        (&["--shell", " \n"][..], "`shell` is empty"),
    ] {
        let (code, err) = tether_str(&[&head[..], args].concat());
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(err.contains("Usage: tether submit"), "{args:?}: {err}");
        assert!(!err.contains("cannot reach"), "{args:?}: {err}");
    }
}

/// The commands `tether cert` prints to use its files name the coordinator by the name the
/// certificate was made for (an IPv6 address in brackets), where they showed `<name>`.
#[test]
fn cert_prints_commands_with_the_name_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, host) in [
        (None, "localhost"),
        (Some("coordinator.example"), "coordinator.example"),
        (Some("::1"), "[::1]"),
    ] {
        let out_dir = dir.path().join(host);
        let mut args = vec!["cert".as_ref(), "--out".as_ref(), out_dir.as_os_str()];
        if let Some(n) = name {
            args.push("--name".as_ref());
            args.push(n.as_ref());
        }
        let out = tether(&args);
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{said}");
        assert!(!said.contains("<name>"), "{said}");
        assert!(
            said.contains(&format!("--coordinator wss://{host}:8765 ")),
            "{said}"
        );
        assert!(
            said.contains(&format!("--coordinator https://{host}:8765 ")),
            "{said}"
        );
    }
}

/// `tether coordinator --help` says the defaults of `--listen` and `--data-dir` (they are
/// no clap defaults: a default there would hide the config file's value), and `tether submit
/// --help` the number each named priority stands for.
#[test]
fn help_says_the_listen_and_data_dir_defaults_and_the_priorities_numbers() {
    let (code, help) = {
        let out = tether(&["coordinator".as_ref(), "--help".as_ref()]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{help}");
    assert!(help.contains("default 127.0.0.1:8765"), "{help}");
    assert!(help.contains("default ./tether-data"), "{help}");
    let out = tether(&["submit".as_ref(), "--help".as_ref()]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("high (1), normal (5), low (9)"), "{help}");
}

/// A value clap refuses that came from an environment variable names the variable beside the
/// flag (`'--id <ID>' (given by TETHER_WORKER_ID)`): the flag alone sent the user looking for
/// a flag never typed. The same value typed as the flag (the variable set too, and not taken)
/// names the flag alone.
#[test]
fn a_value_clap_refuses_from_an_environment_variable_names_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let worker = ["worker", "--coordinator", "http://127.0.0.1:1"];
    let coordinator = ["coordinator", "--listen", "127.0.0.1:0", "--data-dir", data];
    for (head, flag, var, value) in [
        (&worker[..], "--id <ID>", "TETHER_WORKER_ID", "bad id!"),
        (
            &coordinator,
            "--idle-coalesce <IDLE_COALESCE>",
            "TETHER_IDLE_COALESCE",
            "soon",
        ),
    ] {
        let named = format!("'{flag}' (given by {var})");
        let (code, err) = tether_bounded_env(head, None, &[(var, value)]);
        assert_eq!(code, Some(2), "{var}={value}: {err}");
        assert!(err.contains(&format!("invalid value '{value}'")), "{err}");
        assert!(err.contains(&named), "{var}={value}: {err}");
        let typed = [flag.split(' ').next().expect("the flag"), value];
        let (code, err) = tether_bounded_env(&[head, &typed].concat(), None, &[(var, value)]);
        assert_eq!(code, Some(2), "{typed:?}: {err}");
        assert!(err.contains(&format!("'{flag}'")), "{typed:?}: {err}");
        assert!(!err.contains("given by"), "{typed:?}: {err}");
    }
    assert!(!std::path::Path::new(data).exists(), "nothing made");
}

/// A flag that requires another, given by its environment variable alone (`TETHER_TLS_CERT`
/// without `--tls-key`): clap said only that the other was not provided, and the user, who
/// typed neither, did not know what required it. The error names the requiring flag with its
/// variable, and what to do; a variable set that requires nothing is not named, and the flag
/// typed (its variable set too, and not taken) leaves clap's error as it was.
#[test]
fn a_flag_its_variable_gave_is_named_when_the_flag_it_requires_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let coordinator = ["coordinator", "--listen", "127.0.0.1:0", "--data-dir", data];
    let pem = "/nonexistent/tls.pem";
    for (var, flag, missing) in [
        (
            "TETHER_TLS_CERT",
            "--tls-cert <TLS_CERT>",
            "--tls-key <TLS_KEY>",
        ),
        (
            "TETHER_TLS_KEY",
            "--tls-key <TLS_KEY>",
            "--tls-cert <TLS_CERT>",
        ),
    ] {
        let unrelated = ("TETHER_IDLE_COALESCE", "5ms");
        let (code, err) = tether_bounded_env(&coordinator, None, &[(var, pem), unrelated]);
        assert_eq!(code, Some(2), "{var}: {err}");
        assert!(
            err.contains(&format!("were not provided:\n  {missing}\n")),
            "{var}: {err}"
        );
        let named = format!("'{flag}' (given by {var}) requires it: give it too, or unset {var}");
        assert!(err.contains(&named), "{var}: {err}");
        assert!(!err.contains(unrelated.0), "{var}: {err}");
        let typed = [flag.split(' ').next().expect("the flag"), pem];
        let (code, err) =
            tether_bounded_env(&[&coordinator[..], &typed].concat(), None, &[(var, pem)]);
        assert_eq!(code, Some(2), "{typed:?}: {err}");
        assert!(err.contains(&format!("  {missing}\n")), "{typed:?}: {err}");
        assert!(!err.contains("given by"), "{typed:?}: {err}");
    }
    assert!(!std::path::Path::new(data).exists(), "nothing made");
}
