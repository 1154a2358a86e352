//! The client commands against an `https://` coordinator: they verify its certificate against
//! `--ca-file` and refuse one they cannot verify. And the coordinator's own certificate file
//! not answering when it is looked at again: TLS connections are accepted still.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_speak_https_and_verify_the_coordinator_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tempfile::tempdir().expect("certs");
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("certificate");
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).expect("write cert");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
    // Another CA that did not sign the coordinator's certificate.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("certificate");
    let wrong = certs.path().join("wrong.pem");
    std::fs::write(&wrong, other.cert.pem()).expect("write");

    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.tls = Some(tether_coordinator::tls::server_config(&cert, &key).expect("server TLS"));
    let c = spawn_coordinator_with(cfg, None).await;
    let url = format!("https://127.0.0.1:{}", c.addr.port());
    let cert_s = cert.to_string_lossy().into_owned();

    let ok = tokio::task::spawn_blocking({
        let (url, cert_s) = (url.clone(), cert_s.clone());
        move || {
            tether(&[
                "tasks",
                "--json",
                "--coordinator",
                &url,
                "--ca-file",
                &cert_s,
            ])
        }
    })
    .await
    .expect("join");
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

    let untrusted = tokio::task::spawn_blocking({
        let (url, wrong) = (url.clone(), wrong.to_string_lossy().into_owned());
        move || {
            tether(&[
                "tasks",
                "--json",
                "--coordinator",
                &url,
                "--ca-file",
                &wrong,
            ])
        }
    })
    .await
    .expect("join");
    assert!(
        !untrusted.status.success(),
        "an unverified coordinator is refused"
    );
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    let plain = tokio::task::spawn_blocking({
        let (port, cert_s) = (c.addr.port(), cert_s.clone());
        move || {
            tether(&[
                "tasks",
                "--coordinator",
                &format!("http://127.0.0.1:{port}"),
                "--ca-file",
                &cert_s,
            ])
        }
    })
    .await
    .expect("join");
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("--ca-file is for an https://"),
        "{plain:?}"
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

/// The certificate file replaced by one that does not answer (a FIFO nobody writes, as a file
/// on a hung mount): the look at it, due `RELOAD_CHECK` after the start, waits in it, and
/// TLS connections go on being accepted with the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_file_that_does_not_answer_leaves_tls_connections_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tempfile::tempdir().expect("certs");
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("certificate");
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let ca = certs.path().join("ca.pem");
    for path in [&cert, &ca] {
        std::fs::write(path, made.cert.pem()).expect("write cert");
    }
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.tls = Some(tether_coordinator::tls::server_config(&cert, &key).expect("server TLS"));
    let c = spawn_coordinator_with(cfg, None).await;
    let addr = c.addr;
    let served = made.cert.der().clone();

    tokio::task::spawn_blocking(move || {
        assert_eq!(handshake(addr, &ca), Ok(served.clone()));
        std::fs::remove_file(&cert).expect("remove");
        let made = Command::new("mkfifo").arg(&cert).status().expect("mkfifo");
        assert!(made.success(), "mkfifo: {made}");
        let _unblock = Unblock(cert.clone());
        // Handshakes until one has started a look that waits in the FIFO's open (a writer
        // that does not wait opens it only then).
        let bound = tether_coordinator::tls::RELOAD_CHECK + Duration::from_secs(20);
        let deadline = Instant::now() + bound;
        let writer = loop {
            assert_eq!(handshake(addr, &ca), Ok(served.clone()), "in use");
            if let Some(w) = writer_of(&cert) {
                break w;
            }
            assert!(Instant::now() < deadline, "no look opened the FIFO");
            std::thread::sleep(Duration::from_millis(100));
        };
        // The look now waits in its read (a writer, nothing written).
        for _ in 0..3 {
            assert_eq!(handshake(addr, &ca), Ok(served.clone()), "in use");
        }
        // The certificate back in its place, and the read ended (nothing in it: refused).
        std::fs::remove_file(&cert).expect("remove");
        std::fs::copy(&ca, &cert).expect("copy");
        drop(writer);
        assert_eq!(handshake(addr, &ca), Ok(served), "in use");
    })
    .await
    .expect("handshakes");
    c.stop().await;
}
