//! The client commands against an `https://` coordinator: they verify its certificate against
//! `--ca-file` and refuse one they cannot verify. And the coordinator's own certificate file
//! replaced by a FIFO when it is looked at again: refused at once, TLS connections accepted
//! still, and its renewal served.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tether_testkit::*;

fn tether(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .env_remove("TETHER_CA_FILE")
        .env_remove("TETHER_TOKEN")
        .output()
        .expect("run tether")
}

/// [`tether`] on a blocking thread, so the test's runtime serves the coordinator meanwhile.
async fn tether_off_runtime(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tether(&args)
    })
    .await
    .expect("join")
}

/// A self-signed certificate for 127.0.0.1, written to `dir` as `cert.pem` and `key.pem`: the
/// certificate, and the two paths.
fn self_signed(dir: &Path) -> (rcgen::CertifiedKey<rcgen::KeyPair>, PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).expect("write cert");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
    (made, cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_speak_https_and_verify_the_coordinator_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tempfile::tempdir().expect("certs");
    let (_, cert, key) = self_signed(certs.path());
    // Another CA that did not sign the coordinator's certificate.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("certificate");
    let wrong = certs.path().join("wrong.pem");
    std::fs::write(&wrong, other.cert.pem()).expect("write");

    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.tls = Some(tether_coordinator::tls::server_config(&cert, &key).expect("server TLS"));
    let c = spawn_coordinator_with(cfg, None).await;
    let url = format!("https://127.0.0.1:{}", c.addr.port());
    let cert_s = cert.to_string_lossy().into_owned();

    let tasks_trusting = |ca: &str| {
        let args = ["tasks", "--json", "--coordinator", &url, "--ca-file", ca];
        tether_off_runtime(args.map(String::from).to_vec())
    };
    let ok = tasks_trusting(&cert_s).await;
    assert!(ok.status.success(), "{ok:?}");
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("JSON");
    assert!(v.is_array() || v["tasks"].is_array(), "{v}");

    // The event stream over TLS: a task cancelled before the watch starts ends it at once
    // (the watch reads it after the stream's snapshot), as not completed.
    let watched = tokio::task::spawn_blocking({
        let (url, cert_s) = (url.clone(), cert_s.clone());
        move || {
            let common = ["--coordinator", &url, "--ca-file", &cert_s];
            let submitted = tether(&[&["submit"][..], &common, &["--", "true"]].concat());
            assert!(submitted.status.success(), "{submitted:?}");
            let id = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
            let cancelled = tether(&[&["cancel", &id][..], &common].concat());
            assert!(cancelled.status.success(), "{cancelled:?}");
            (id.clone(), tether(&[&["watch", &id][..], &common].concat()))
        }
    })
    .await
    .expect("join");
    let (id, out) = watched;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a cancelled task is not completed");
    assert!(
        stdout.contains(&id) && stdout.contains("cancelled"),
        "{out:?}"
    );

    let untrusted = tasks_trusting(&wrong.to_string_lossy()).await;
    assert!(
        !untrusted.status.success(),
        "an unverified coordinator is refused"
    );
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(err.contains("not signed by the CA of --ca-file"), "{err}");
    // Without --ca-file: the system's roots, none of which signed it; the error names the
    // flag that gives its CA (as does the one of a system without roots).
    let args = ["tasks", "--json", "--coordinator", &url];
    let unknown = tether_off_runtime(args.map(String::from).to_vec()).await;
    assert!(!unknown.status.success(), "{unknown:?}");
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("with --ca-file (or TETHER_CA_FILE)"), "{err}");

    // The same coordinator by an http:// URL: plain HTTP, where a CA file has no use.
    let http = format!("http://127.0.0.1:{}", c.addr.port());
    let args = ["tasks", "--coordinator", &http, "--ca-file", &cert_s];
    let plain = tether_off_runtime(args.map(String::from).to_vec()).await;
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("--ca-file is for an https://"),
        "{plain:?}"
    );
    // Without the CA file: what answered is said to speak no plain HTTP, and what to give.
    let plain =
        tether_off_runtime(["tasks", "--coordinator", &http].map(String::from).to_vec()).await;
    assert!(!plain.status.success(), "{plain:?}");
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(
        err.contains(
            "(what answered speaks no plain HTTP: if the coordinator serves TLS, give an \
             https:// URL, with --ca-file (or TETHER_CA_FILE) when a CA this system does not \
             trust signed its certificate)"
        ),
        "{err}"
    );
    c.stop().await;
}

/// A TLS handshake with the coordinator at `addr` by a client trusting `ca`: the certificate
/// it was served, or why it failed (one that does not finish within 5 s fails).
fn handshake(
    addr: std::net::SocketAddr,
    ca: &Path,
) -> Result<rustls::pki_types::CertificateDer<'static>, String> {
    let client = tether_worker::connector::tls_client_config(Some(ca)).expect("client config");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut conn = rustls::ClientConnection::new(client, name).expect("client");
    let mut sock = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
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

/// How many threads of this process look at TLS files (`tls-reload`) now.
fn reload_threads() -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "tls-reload")
        .count()
}

/// `fifo` opened for writing without waiting: only while a reader has it open or waits in its
/// open.
fn writer_of(fifo: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(fifo)
        .ok()
}

/// Opens its FIFO for writing and closes it when dropped (at the test's end, or a panic): a
/// reader waiting in it reads an end of file, and its thread ends.
struct Unblock(PathBuf);

impl Drop for Unblock {
    fn drop(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_fifo()) {
            drop(writer_of(&self.0));
        }
    }
}

/// The certificate file replaced by a FIFO nobody writes: the look at it, due `RELOAD_CHECK`
/// after the start, refuses it at once, unread (no look is left waiting in it), TLS
/// connections go on being accepted with the certificate in use, and a renewed certificate
/// that takes the FIFO's place is served from a later look, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_the_certificate_files_place_is_refused_and_its_renewal_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tempfile::tempdir().expect("certs");
    let (made, cert, key) = self_signed(certs.path());
    let ca = certs.path().join("ca.pem");
    std::fs::write(&ca, made.cert.pem()).expect("write ca");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.tls = Some(tether_coordinator::tls::server_config(&cert, &key).expect("server TLS"));
    // The files were read no later than this: the first look is due `RELOAD_CHECK` after.
    let loaded = Instant::now();
    let c = spawn_coordinator_with(cfg, None).await;
    let addr = c.addr;
    let served = made.cert.der().clone();

    tokio::task::spawn_blocking(move || {
        assert_eq!(handshake(addr, &ca), Ok(served.clone()));
        std::fs::remove_file(&cert).expect("remove");
        let made = Command::new("mkfifo").arg(&cert).status().expect("mkfifo");
        assert!(made.success(), "mkfifo: {made}");
        // Should a look wait in the FIFO after all, it is let go at the test's end.
        let _unblock = Unblock(cert.clone());
        // Handshakes until one starts after the look is due: it starts the look.
        let due = loaded + tether_coordinator::tls::RELOAD_CHECK;
        let deadline = due + Duration::from_secs(20);
        loop {
            let after_due = Instant::now() > due;
            assert_eq!(handshake(addr, &ca), Ok(served.clone()), "in use");
            if after_due {
                break;
            }
            assert!(Instant::now() < deadline, "the look never came due");
            std::thread::sleep(Duration::from_millis(100));
        }
        // That look refused the FIFO at once: its thread ended, none waits in the FIFO.
        let deadline = Instant::now() + Duration::from_secs(10);
        while reload_threads() > 0 {
            assert!(Instant::now() < deadline, "a look waits in the FIFO");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(handshake(addr, &ca), Ok(served.clone()), "in use");

        // A renewed certificate (the key first) in the FIFO's place, trusted beside the first.
        let renewed =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("certificate");
        std::fs::remove_file(&cert).expect("remove");
        std::fs::write(&key, renewed.signing_key.serialize_pem()).expect("write key");
        std::fs::write(&cert, renewed.cert.pem()).expect("write cert");
        let both = format!(
            "{}{}",
            std::fs::read_to_string(&ca).expect("ca"),
            renewed.cert.pem()
        );
        std::fs::write(&ca, both).expect("write ca");
        let deadline =
            Instant::now() + tether_coordinator::tls::RELOAD_CHECK + Duration::from_secs(20);
        while handshake(addr, &ca).expect("handshake") != *renewed.cert.der() {
            assert!(
                Instant::now() < deadline,
                "the renewed certificate is never served"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .expect("handshakes");
    c.stop().await;
}

/// A `tether worker` process given `url` for its coordinator, its stderr read line by line
/// (killed when dropped).
struct WorkerProcess {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
}

impl WorkerProcess {
    fn start(url: &str) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .args([
                "--log",
                "warn",
                "worker",
                "--id",
                "w1",
                "--coordinator",
                url,
            ])
            .env_remove("TETHER_CA_FILE")
            .env_remove("TETHER_LOG")
            .env_remove("TETHER_SECRET")
            .env_remove("TETHER_SECRET_FILE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start tether worker");
        let stderr = child.stderr.take().expect("stderr");
        use tokio::io::AsyncBufReadExt;
        let lines = tokio::io::BufReader::new(stderr).lines();
        Self { child, lines }
    }

    /// The next `n` lines of its log that say an attempt failed, read within `DEADLINE`.
    async fn failed_attempts(&mut self, n: usize) -> Vec<String> {
        let mut failed = Vec::new();
        let read = async {
            while failed.len() < n {
                match self.lines.next_line().await.expect("read stderr") {
                    Some(line) if line.contains("connection attempt failed") => failed.push(line),
                    Some(_) => {}
                    None => panic!("the worker ended; it said: {failed:?}"),
                }
            }
        };
        tokio::time::timeout(DEADLINE, read)
            .await
            .unwrap_or_else(|_| panic!("{n} failed attempts not said in time: {failed:?}"));
        failed
    }

    /// Whether the process still runs (it retries rather than stop).
    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

/// A worker told `https://` (`wss://`) for a coordinator serving plain WebSocket, and one told
/// `http://` (`ws://`) for one serving TLS, each log at every attempt what the coordinator
/// answered in and what URL to give instead, and keep retrying (the coordinator may be
/// restarted with TLS on or off). Before, the first said only rustls's "received corrupt
/// message of type InvalidContentType", the second an httparse "invalid HTTP version" with a
/// question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_the_wrong_scheme_says_what_the_coordinator_serves_and_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = spawn_coordinator(dir.path().join("plain")).await;
    let certs = tempfile::tempdir().expect("certs");
    let (_, cert, key) = self_signed(certs.path());
    let mut cfg = fast_coordinator_config(dir.path().join("tls"));
    cfg.tls = Some(tether_coordinator::tls::server_config(&cert, &key).expect("server TLS"));
    let tls = spawn_coordinator_with(cfg, None).await;

    let at = format!("127.0.0.1:{}", plain.addr.port());
    let mut w = WorkerProcess::start(&format!("https://{at}"));
    let said = w.failed_attempts(2).await;
    for line in &said {
        assert!(
            line.contains(&format!(
                "the coordinator at {at} answered in plain text: it does not serve TLS; give an \
                 http:// or ws:// URL"
            )) && line.contains("retrying"),
            "{said:?}"
        );
    }
    assert!(w.running(), "retrying, not stopped: {said:?}");
    drop(w);

    let at = format!("127.0.0.1:{}", tls.addr.port());
    let mut w = WorkerProcess::start(&format!("http://{at}"));
    let said = w.failed_attempts(2).await;
    for line in &said {
        assert!(
            line.contains(&format!(
                "the coordinator at {at} answered with TLS: give an https:// or wss:// URL, with \
                 --ca-file or TETHER_CA_FILE"
            )) && line.contains("retrying"),
            "{said:?}"
        );
    }
    assert!(w.running(), "retrying, not stopped: {said:?}");
    drop(w);
    plain.stop().await;
    tls.stop().await;
}
