//! The secure setup of docs/SECURITY.md, end to end with real processes: `tether cert` writes
//! a private CA, the coordinator's certificate and a fleet secret; a coordinator serves wss://
//! and https:// with worker authentication, per-message integrity and an admin token; a worker
//! that trusts only that CA and insists on integrity tags runs a task submitted and watched
//! through the https:// client commands.

use std::process::Stdio;

use tether_testkit::wait_for;

#[path = "support/cli_proc.rs"]
mod cli_proc;
use cli_proc::{LONG, mode, run, tether, text};

#[tokio::test]
async fn tether_cert_files_make_a_working_tls_authenticated_tagged_deployment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let made = run(tether()
        .args(["cert", "--name", "127.0.0.1", "--out"])
        .arg(&certs))
    .await;
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(
        text(&made.stdout).contains("--ca-file"),
        "{}",
        text(&made.stdout)
    );
    // The worker command printed has a place for the id it needs: `--id` is required, and
    // pasted without it the command failed.
    assert!(
        text(&made.stdout)
            .lines()
            .any(|l| l.contains("tether worker --coordinator wss://")
                && l.contains(" --id <worker-id> ")),
        "{}",
        text(&made.stdout)
    );
    let (ca, cert, key, secret) = (
        certs.join("ca.pem"),
        certs.join("cert.pem"),
        certs.join("key.pem"),
        certs.join("fleet.secret"),
    );
    #[cfg(unix)]
    {
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&secret), 0o600);
    }
    let secret_bytes = std::fs::read(&secret).expect("secret");
    // Run again: refused without --force, nothing touched; with --force the certificates are
    // new and the fleet secret is kept (workers provisioned with it keep working).
    let cert_bytes = std::fs::read(&cert).expect("cert");
    let again = run(tether().args(["cert", "--out"]).arg(&certs)).await;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read(&cert).expect("cert"), cert_bytes);
    let forced = run(tether()
        .args(["cert", "--force", "--name", "127.0.0.1", "--out"])
        .arg(&certs))
    .await;
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_ne!(std::fs::read(&cert).expect("cert"), cert_bytes);
    assert_eq!(std::fs::read(&secret).expect("secret"), secret_bytes);

    let token = dir.path().join("admin.token");
    std::fs::write(&token, "admin-token-of-the-secure-setup\n").expect("token");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let _coordinator = tether()
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--secret-file")
        .arg(&secret)
        .arg("--message-mac")
        .arg("--admin-token-file")
        .arg(&token)
        .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "2s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tether coordinator");
    let https = format!("https://127.0.0.1:{port}");
    let client = |args: &[&str]| {
        let mut c = tether();
        c.args(args)
            .args(["--coordinator", &https, "--ca-file"])
            .arg(&ca)
            .arg("--token-file")
            .arg(&token);
        c
    };
    wait_for("the coordinator to answer over https", LONG, || async {
        run(&mut client(&["tasks"]))
            .await
            .status
            .success()
            .then_some(())
    })
    .await;
    let _worker = tether()
        .args([
            "worker",
            "--coordinator",
            &format!("wss://127.0.0.1:{port}"),
        ])
        .args(["--id", "secure-w", "--message-mac", "--ca-file"])
        .arg(&ca)
        .arg("--secret-file")
        .arg(&secret)
        .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "2s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tether worker");
    let submitted = run(client(&["submit", "--json"]).args(["--", "echo", "over tls"])).await;
    assert!(submitted.status.success(), "{}", text(&submitted.stderr));
    wait_for(
        "the task to complete on the secure worker",
        LONG,
        || async {
            let out = run(&mut client(&["tasks", "--json"])).await;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let tasks = v.as_array()?;
            (tasks.len() == 1 && tasks[0]["status"] == "completed").then(|| tasks[0].clone())
        },
    )
    .await;
    // The worker registered over wss:// with tags on (it refuses a coordinator that does not
    // ask for them), and is listed as connected.
    let workers = run(&mut client(&["workers", "--json"])).await;
    let v: serde_json::Value = serde_json::from_slice(&workers.stdout).expect("json");
    assert_eq!(v[0]["worker_id"], "secure-w", "{v}");
    // The table names the worker and the cadence each beats at.
    let table = run(&mut client(&["workers"])).await;
    let table = text(&table.stdout);
    assert!(
        table.contains("HEARTBEAT_S") && table.contains("secure-w"),
        "{table}"
    );
    // Its statistics come with its first telemetry (15 to 30 s in): until then the "-" in
    // their columns is explained on stderr.
    let fresh = v[0]["stats"].is_null();
    let note = text(&run(&mut client(&["workers"])).await.stderr);
    assert_eq!(fresh, note.contains("without statistics yet"), "{v} {note}");
    // A client that does not trust the CA gets nowhere.
    let untrusted = run(tether()
        .args(["tasks", "--coordinator", &https, "--token-file"])
        .arg(&token))
    .await;
    assert!(!untrusted.status.success());
}
