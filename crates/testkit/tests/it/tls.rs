//! TLS over real sockets with a certificate made in the test (rcgen): a worker that trusts it
//! works over `wss://`, one that does not is refused for good, a plain client gets nowhere, and
//! the API answers over `https://`.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};
use tether_testkit::*;
use tether_worker::{Agent, AgentError, Executors};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{builtin_and, connected};

/// One HTTPS request with `Connection: close`; returns status and JSON body.
async fn https(
    addr: std::net::SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let tls = tether_worker::connector::tls_client_config(Some(ca)).expect("client config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut s = tokio_rustls::TlsConnector::from(Arc::clone(&tls))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let body = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let json_at = text.find("\r\n\r\n").map_or(text.len(), |i| i + 4);
    let v = serde_json::from_str(&text[json_at..]).unwrap_or(Value::Null);
    (status, v)
}

/// A coordinator serving TLS with a self-signed certificate made for the test.
struct TlsCoordinator {
    c: TestCoordinator,
    /// The certificate, which is its own CA.
    cert: std::path::PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl TlsCoordinator {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tune: impl FnOnce(&mut tether_coordinator::CoordinatorConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = tempfile::tempdir().expect("certs");
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("self-signed certificate");
        let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).expect("write cert");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
        let mut cfg = fast_coordinator_config(dir.path().to_owned());
        cfg.tls = Some(tether_coordinator::tls::server_config(&cert, &key).expect("server TLS"));
        tune(&mut cfg);
        let c = spawn_coordinator_with(cfg, None).await;
        Self {
            c,
            cert,
            _dirs: (dir, certs),
        }
    }
}

/// A request whose head is not whole by the handshake deadline is answered 408 over TLS too:
/// the answer goes through the connection's TLS session, not around it.
#[tokio::test]
async fn a_request_head_left_unfinished_over_tls_is_answered_408_in_the_tls_session() {
    let TlsCoordinator { c, cert, _dirs } = TlsCoordinator::start_with(|cfg| {
        cfg.limits.handshake_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    let tls = tether_worker::connector::tls_client_config(Some(&cert)).expect("client config");
    let tcp = tokio::net::TcpStream::connect(c.addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .expect("write");
    s.flush().await.expect("flush");
    let mut out = Vec::new();
    let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "not cut at the deadline");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text:?}"
    );
    assert!(text.contains("\"code\":\"request_timeout\""), "{text:?}");
    c.stop().await;
}

#[tokio::test]
async fn tls_workers_verify_the_coordinator_and_untrusted_or_plain_clients_get_nowhere() {
    let TlsCoordinator { c, cert, _dirs } = TlsCoordinator::start().await;
    let url = format!("wss://127.0.0.1:{}", c.addr.port());

    let mut wcfg = fast_worker_config(&url, "tls-w");
    wcfg.ca_file = Some(cert.clone());
    let w = connected(wcfg, Executors::builtin()).await;

    // Without the CA the worker does not trust the coordinator: it never registers, and keeps
    // trying (a CA bundle pushed to its --ca-file heals it) rather than stopping for good (or
    // cannot even start when the machine has no system roots).
    match Agent::new(
        fast_worker_config(&url, "tls-untrusted"),
        Executors::builtin(),
    ) {
        Err(AgentError::Tls(msg)) => assert!(msg.contains("root"), "{msg}"),
        Err(other) => panic!("unexpected {other:?}"),
        Ok(agent) => {
            let u = spawn_agent(agent);
            wait_for("failed attempts of the untrusting worker", DEADLINE, || {
                let failed = u.handle.stats().failed_connections;
                async move { (failed >= 2).then_some(()) }
            })
            .await;
            assert_eq!(u.handle.registrations(), 0);
            u.stop().await.expect("clean stop");
        }
    }
    // A plain WebSocket client gets no session.
    let plain = format!("ws://{}/api/v1/worker/plain/ws", c.addr);
    assert!(tokio_tungstenite::connect_async(&plain).await.is_err());

    // The API over https: submit, and the TLS worker completes it.
    let (s, v) = https(
        c.addr,
        &cert,
        "POST",
        "/api/v1/tasks",
        &json!({"tasks": [sleep_task(50, 2, 1)]}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["task_ids"][0].as_str().expect("an id").to_owned();
    wait_for("the task to complete over TLS", DEADLINE, || async {
        let (_, t) = https(
            c.addr,
            &cert,
            "GET",
            &format!("/api/v1/tasks/{id}"),
            &Value::Null,
        )
        .await;
        (t["status"] == "completed").then_some(())
    })
    .await;
    assert_eq!(w.handle.executions(), 1);
    w.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn workers_reconnecting_over_tls_resume_their_sessions_however_many_they_are() {
    let TlsCoordinator { c, cert, _dirs } = TlsCoordinator::start().await;
    // One TLS client per worker, as each worker process has; more of them than a session cache
    // of 256 holds.
    let clients: Vec<_> = (0..300)
        .map(|_| {
            tokio_rustls::TlsConnector::from(
                tether_worker::connector::tls_client_config(Some(&cert)).expect("client config"),
            )
        })
        .collect();
    // A handshake, then a request whose answer carries the session tickets.
    let visit = |tls: tokio_rustls::TlsConnector| async move {
        let tcp = tokio::net::TcpStream::connect(c.addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut s = tls.connect(name, tcp).await.expect("TLS handshake");
        let kind = s.get_ref().1.handshake_kind();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        kind
    };
    for tls in &clients {
        assert_eq!(visit(tls.clone()).await, Some(rustls::HandshakeKind::Full));
    }
    let mut resumed = 0;
    for tls in &clients {
        if visit(tls.clone()).await == Some(rustls::HandshakeKind::Resumed) {
            resumed += 1;
        }
    }
    assert_eq!(
        resumed,
        clients.len(),
        "every reconnect resumed its session"
    );
    c.stop().await;
}

/// A frame arriving over `wss://` slower than the heartbeat timeout keeps its session: the
/// coordinator counts the bytes that come on the connection, ciphertext, as the worker's life
/// (PROTOCOL §4). Counted after TLS, nothing showed until a whole record (up to 16 KiB) was
/// decrypted: at 4 KiB/s the first record of a 48 KiB heartbeat took 4 s against a 2 s
/// timeout, and the session was dropped while its bytes kept coming.
#[tokio::test]
async fn a_frame_arriving_over_tls_slower_than_the_heartbeat_timeout_keeps_the_session() {
    use futures_util::{SinkExt, StreamExt};
    use tether_faultproxy::{Direction, Fault, FaultKind};
    use tokio_tungstenite::tungstenite::Message;
    const PADDED: usize = 48 * 1024;
    let TlsCoordinator { c, cert, _dirs } = TlsCoordinator::start_with(|cfg| {
        cfg.heartbeat_interval = std::time::Duration::from_millis(500);
        cfg.heartbeat_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let proxy = crate::faults::proxy_in_front(&c, 9).await;
    let tls = tether_worker::connector::tls_client_config(Some(&cert)).expect("client config");
    let tcp = tokio::net::TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let url = format!(
        "wss://127.0.0.1:{}/api/v1/worker/slow-tls/ws",
        proxy.listen_addr().port()
    );
    let (mut ws, _) = tokio_tungstenite::client_async(url, s)
        .await
        .expect("upgrade");
    // The next message of `ty`, skipping pings and others; `None` if the session ends.
    async fn next_of<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, ty: &str) -> Option<Value>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        loop {
            let m = tokio::time::timeout(DEADLINE, ws.next())
                .await
                .expect("a frame in time");
            match m? {
                Ok(Message::Text(t)) => {
                    for v in messages_of(serde_json::from_str(t.as_str()).expect("json")) {
                        if v["type"] == ty {
                            return Some(v);
                        }
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
    next_of(&mut ws, "welcome").await.expect("a welcome");
    let registration = json!({
        "type": "registration",
        "worker_id": "slow-tls",
        "protocol_version": tether_proto::PROTOCOL_VERSION,
        "boot_id": "b-slow-tls",
        "capabilities": [],
        "slots": 1,
        "executors": ["sleep"],
        "timestamp": chrono::Utc::now(),
    });
    ws.send(Message::text(registration.to_string()))
        .await
        .expect("send");
    next_of(&mut ws, "registration_ack")
        .await
        .expect("registered");
    let slow = proxy
        .add_fault(Fault::new(
            "slow",
            FaultKind::Bandwidth {
                bytes_per_sec: 4 * 1024,
            },
            Direction::Upstream,
        ))
        .await
        .expect("fault");
    let heartbeat = json!({
        "type": "heartbeat",
        "sequence": 1,
        "timestamp": chrono::Utc::now(),
        "pad": "x".repeat(PADDED),
    });
    let started = std::time::Instant::now();
    ws.send(Message::text(heartbeat.to_string()))
        .await
        .expect("send");
    let reply = next_of(&mut ws, "heartbeat").await;
    let took = started.elapsed();
    let stats = slow.remove();
    assert!(
        reply.is_some(),
        "the session was dropped after {took:?} while its frame was arriving"
    );
    assert_eq!(reply.expect("a reply")["response_to"], 1);
    assert!(
        took > std::time::Duration::from_secs(6),
        "the frame must take several timeouts for this test to mean anything: {took:?}"
    );
    assert!(stats.bytes_delayed as usize > PADDED, "{stats:?}");
    let (_, o) = https(c.addr, &cert, "GET", "/api/v1/overview", &Value::Null).await;
    assert!(
        o["counters"]["keepalive_pings"].as_u64() > Some(0),
        "the coordinator pinged while the frame arrived: {o}"
    );
    let (_, seen) = https(
        c.addr,
        &cert,
        "GET",
        "/api/v1/workers/slow-tls",
        &Value::Null,
    )
    .await;
    assert_eq!(seen["sessions"], 1, "one session all along: {seen}");
    drop(ws);
    c.stop().await;
}

/// Answers the length of its config's `pad`: a task whose assignment is as long as wanted.
struct PadLength;

impl tether_worker::Executor for PadLength {
    fn execute(
        &self,
        input: tether_worker::TaskInput,
        _ctx: tether_worker::TaskCtx,
    ) -> futures_util::future::BoxFuture<'static, Result<Value, tether_worker::ExecError>> {
        let len = input.config["pad"].as_str().map_or(0, str::len);
        Box::pin(async move { Ok(json!({ "len": len })) })
    }
}

/// A frame to the worker arriving over `wss://` slower than the worker's heartbeat timeout
/// keeps its session, as the other way round: the worker counts the bytes that come on its
/// socket, ciphertext, as the coordinator's life (PROTOCOL §4). Counted after TLS, nothing
/// showed until a whole record (up to 16 KiB) was decrypted: at 4 KiB/s the first record of a
/// 48 KiB assignment took 4 s against a 2 s timeout, and the worker dropped its session while
/// the bytes kept coming (its reconnections then timed out as well).
#[tokio::test]
async fn a_frame_to_the_worker_arriving_over_tls_slower_than_its_heartbeat_timeout_keeps_the_session()
 {
    use tether_faultproxy::{Direction, Fault, FaultKind};
    const PADDED: usize = 48 * 1024;
    let TlsCoordinator { c, cert, _dirs } = TlsCoordinator::start().await;
    let proxy = crate::faults::proxy_in_front(&c, 10).await;
    let mut wcfg = fast_worker_config(&format!("wss://{}", proxy.listen_addr()), "slow-tls-w");
    wcfg.ca_file = Some(cert.clone());
    // Uncompressed, so that the assignment's frame is as long as its config.
    wcfg.compression = false;
    let w = connected(wcfg, builtin_and("pad_length", PadLength)).await;
    let timeout = w.handle.stats().heartbeat_timeout_ms;
    let slow = proxy
        .add_fault(Fault::new(
            "slow",
            FaultKind::Bandwidth {
                bytes_per_sec: 4 * 1024,
            },
            Direction::Downstream,
        ))
        .await
        .expect("fault");
    // Pseudorandom hex: nothing between the two ends shrinks it.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let pad: String = (0..PADDED)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x >> 60) as u32, 16).expect("a hex digit")
        })
        .collect();
    let started = std::time::Instant::now();
    let (s, v) = https(
        c.addr,
        &cert,
        "POST",
        "/api/v1/tasks",
        &json!({"tasks": [tether_proto::TaskSpec::new("pad_length", json!({ "pad": pad }))]}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["task_ids"][0].as_str().expect("an id").to_owned();
    // Completed, or the worker's session lost (it would be lost again in each session after).
    let done = wait_for(
        "the task to complete or the session lost",
        DEADLINE,
        || async {
            if w.handle.stats().disconnections > 0 {
                return Some(Value::Null);
            }
            let (_, t) = https(
                c.addr,
                &cert,
                "GET",
                &format!("/api/v1/tasks/{id}"),
                &Value::Null,
            )
            .await;
            (t["status"] == "completed").then_some(t)
        },
    )
    .await;
    let took = started.elapsed();
    let stats = slow.remove();
    assert_eq!(
        w.handle.stats().disconnections,
        0,
        "the worker dropped its session after {took:?} while the assignment was arriving"
    );
    assert_eq!(w.handle.registrations(), 1);
    assert!(stats.bytes_delayed as usize > PADDED, "{stats:?}");
    assert!(
        took > std::time::Duration::from_millis(3 * timeout),
        "the frame must take several timeouts ({timeout} ms) for this test to mean anything: \
         {took:?}"
    );
    assert_eq!(done["attempt"], 1, "{done}");
    let (_, results) = https(
        c.addr,
        &cert,
        "GET",
        &format!("/api/v1/tasks/{id}/result"),
        &Value::Null,
    )
    .await;
    assert_eq!(results[0]["body"]["result"]["len"], PADDED, "{results}");
    assert_eq!(w.handle.executions(), 1);
    let (_, seen) = https(
        c.addr,
        &cert,
        "GET",
        "/api/v1/workers/slow-tls-w",
        &Value::Null,
    )
    .await;
    assert_eq!(seen["sessions"], 1, "one session all along: {seen}");
    w.stop().await.expect("clean stop");
    c.stop().await;
}
