//! Renewing the coordinator's certificate with `tether cert --renew`, with real processes: the
//! CA's key is kept (private) beside `ca.pem`, the renewed certificate is served by a running
//! coordinator without a restart, and a worker that trusts only the `ca.pem` first made
//! registers over a full TLS handshake with a restarted coordinator serving it. A directory
//! whose CA key was not kept is refused, saying how to rotate the CA instead.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tether_testkit::wait_for;
use tokio::process::{Child, Command};

#[path = "support/cli_proc.rs"]
mod cli_proc;
use cli_proc::{LONG, mode, run, tether, text};

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `tether cert` with `args` into `dir`, which must succeed; its stdout.
async fn cert(dir: &Path, args: &[&str]) -> String {
    let out = run(tether().arg("cert").args(args).arg("--out").arg(dir)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The first certificate of the PEM file `p`, DER.
fn der_of(p: &Path) -> Vec<u8> {
    CertificateDer::from_pem_slice(&read(p))
        .expect("a PEM certificate")
        .to_vec()
}

/// The certificate the coordinator on `port` serves now to a client that trusts `ca`, over a
/// full handshake (a new client has no session to resume); `None` while it does not answer.
async fn served(port: u16, ca: &Path) -> Option<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&read(ca)).ok()?)
        .ok()?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let name = ServerName::try_from("127.0.0.1").ok()?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()?;
    Some(tls.get_ref().1.peer_certificates()?.first()?.to_vec())
}

/// A port free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

struct Setup {
    dir: tempfile::TempDir,
    certs: PathBuf,
    port: u16,
}

impl Setup {
    fn coordinator(&self) -> Child {
        let certs = &self.certs;
        tether()
            .args([
                "coordinator",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
            ])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--tls-cert")
            .arg(certs.join("cert.pem"))
            .arg("--tls-key")
            .arg(certs.join("key.pem"))
            .arg("--secret-file")
            .arg(certs.join("fleet.secret"))
            .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "2s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tether coordinator")
    }

    /// A client command against the coordinator, trusting `ca`.
    fn client(&self, ca: &Path, args: &[&str]) -> Command {
        let mut c = tether();
        c.args(args)
            .args(["--coordinator", &format!("https://127.0.0.1:{}", self.port)])
            .arg("--ca-file")
            .arg(ca);
        c
    }

    /// Waits until the worker `id` is connected, as the coordinator lists it.
    async fn connected(&self, ca: &Path, id: &str) {
        wait_for(&format!("{id} to be connected"), LONG, || async {
            let out = run(&mut self.client(ca, &["workers", "--json"])).await;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v.as_array()?
                .iter()
                .any(|w| w["worker_id"] == id && w["state"] == "connected")
                .then_some(())
        })
        .await;
    }

    /// Submits `echo <word>` and waits until it completes.
    async fn completes(&self, ca: &Path, word: &str) {
        let out = run(self.client(ca, &["submit"]).args(["--", "echo", word])).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        // `submit` prints the task's id alone.
        let id = text(&out.stdout).trim().to_owned();
        wait_for(&format!("task {id} to complete"), LONG, || async {
            let out = run(&mut self.client(ca, &["task", &id, "--json"])).await;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["task"]["status"] == "completed").then_some(())
        })
        .await;
    }
}

/// Stops `child` with SIGTERM, as an operator's restart does, and waits for it to exit.
async fn stop(mut child: Child) {
    let pid = child.id().expect("running") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    tokio::time::timeout(LONG, child.wait())
        .await
        .expect("the coordinator stops")
        .expect("wait");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_live_and_a_worker_trusting_the_first_ca_registers_after_a_restart()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    cert(&certs, &["--name", "127.0.0.1"]).await;
    // What a worker was given once, at provisioning: the CA as it was made.
    let trusted = dir.path().join("trusted-ca.pem");
    std::fs::copy(certs.join("ca.pem"), &trusted).expect("copy");
    let s = Setup {
        dir,
        certs: certs.clone(),
        port: free_port(),
    };
    let coordinator = s.coordinator();
    let first = wait_for("the coordinator to serve TLS", LONG, || {
        served(s.port, &trusted)
    })
    .await;
    assert_eq!(first, der_of(&certs.join("cert.pem")));
    let _worker = tether()
        .args([
            "worker",
            "--coordinator",
            &format!("wss://127.0.0.1:{}", s.port),
        ])
        .args(["--id", "renew-w", "--ca-file"])
        .arg(&trusted)
        .arg("--secret-file")
        .arg(certs.join("fleet.secret"))
        .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "2s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tether worker");
    s.connected(&trusted, "renew-w").await;

    let (ca, ca_key) = (read(&certs.join("ca.pem")), read(&certs.join("ca-key.pem")));
    let said = cert(&certs, &["--renew"]).await;
    assert!(
        said.contains("kept") && said.contains("nothing to restart"),
        "{said}"
    );
    assert_eq!(read(&certs.join("ca.pem")), ca, "the CA is kept");
    assert_eq!(read(&certs.join("ca-key.pem")), ca_key, "its key is kept");
    let renewed = der_of(&certs.join("cert.pem"));
    assert_ne!(renewed, first, "a new certificate");
    assert_eq!(mode(&certs.join("key.pem")), 0o600);
    // Served without a restart: the coordinator looks at its files again at a handshake,
    // RELOAD_CHECK (10 s) after its last look.
    wait_for("the renewed certificate to be served", LONG, || async {
        (served(s.port, &trusted).await? == renewed).then_some(())
    })
    .await;

    // A new process has new ticket keys: the worker's next connection is a full handshake,
    // which verifies the renewed certificate against the CA it was given at first.
    stop(coordinator).await;
    let _coordinator = s.coordinator();
    wait_for("the restarted coordinator to serve TLS", LONG, || async {
        (served(s.port, &trusted).await? == renewed).then_some(())
    })
    .await;
    s.connected(&trusted, "renew-w").await;
    s.completes(&trusted, "after the renewal").await;
}

#[tokio::test]
async fn renewing_a_directory_without_the_ca_key_fails_saying_how_to_rotate_the_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    cert(&certs, &[]).await;
    // As a directory an older tether cert made: no CA key.
    std::fs::remove_file(certs.join("ca-key.pem")).expect("remove");
    let (cert_pem, key_pem) = (read(&certs.join("cert.pem")), read(&certs.join("key.pem")));
    let out = run(tether().args(["cert", "--renew", "--out"]).arg(&certs)).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("ca-key.pem is missing") && err.contains("Rotating the CA"),
        "{err}"
    );
    assert!(err.contains("holding both CAs"), "says how: {err}");
    assert_eq!(read(&certs.join("cert.pem")), cert_pem, "nothing written");
    assert_eq!(read(&certs.join("key.pem")), key_pem, "nothing written");
}

#[tokio::test]
async fn the_ca_key_is_private_and_the_ca_outlives_the_certificates_renewed_under_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    cert(&certs, &["--name", "coordinator.example", "--name", "::1"]).await;
    assert_eq!(mode(&certs.join("ca-key.pem")), 0o600);
    let validity = |p: &Path| {
        let der = der_of(p);
        let (_, c) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let names: Vec<String> = c
            .subject_alternative_name()
            .expect("san")
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect()
            })
            .unwrap_or_default();
        (c.validity().not_after.timestamp(), names)
    };
    let (ca_until, _) = validity(&certs.join("ca.pem"));
    let (leaf_until, names) = validity(&certs.join("cert.pem"));
    let year = 365 * 86_400;
    assert!(ca_until - leaf_until > 8 * year, "{ca_until} {leaf_until}");
    cert(&certs, &["--renew", "--days", "30"]).await;
    assert_eq!(mode(&certs.join("ca-key.pem")), 0o600, "still private");
    let (renewed_until, renewed_names) = validity(&certs.join("cert.pem"));
    assert_eq!(renewed_names, names, "the names of the certificate renewed");
    assert!(renewed_until < leaf_until, "--days 30");
    // A CA that ends before the certificate asked for is refused, saying what fits.
    let short = dir.path().join("short");
    cert(&short, &["--ca-days", "20", "--days", "10"]).await;
    let out = run(tether()
        .args(["cert", "--renew", "--days", "40", "--out"])
        .arg(&short))
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("ends on") && err.contains("or fewer") && err.contains("Rotating the CA"),
        "{err}"
    );
}
