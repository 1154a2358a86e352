//! The client commands against an `https://` coordinator: they verify its certificate against
//! `--ca-file` and refuse one they cannot verify.

use std::process::Command;

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
