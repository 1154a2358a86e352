//! The HTTP control API over a real socket, and the CLI client commands against it.

use std::net::SocketAddr;

use clap::Parser;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tether_faultproxy::cli::{ProxyArgs, run_cli};
use tether_faultproxy::{FaultKind, Server, control};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::*;

/// A control API on 127.0.0.1:0; stops when dropped.
struct Control {
    base: String,
    server: Server,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Control {
    async fn start() -> Control {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind control");
        let addr = listener.local_addr().expect("addr");
        let server = Server::new(9);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (server, stop) = (server.clone(), stop.clone());
            async move { control::run(listener, server, stop).await.expect("serve") }
        });
        Control {
            base: format!("http://{addr}"),
            server,
            stop,
            task: Some(task),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = within("control call", req.send()).await.expect("send");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect(&text)
        };
        (status, value)
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            within("control stops", t).await.expect("control task");
        }
    }
}

use reqwest::Method as M;

#[tokio::test]
async fn control_api_round_trip_creates_faults_lists_deletes_and_resets() {
    let echo = echo().await;
    let ctl = Control::start().await;
    let create = json!({"name": "coord", "listen": "127.0.0.1:0", "upstream": echo.addr});
    let (st, proxy) = ctl.call(M::POST, "/proxies", Some(create.clone())).await;
    assert_eq!(st, StatusCode::CREATED, "{proxy}");
    let listen: SocketAddr = serde_json::from_value(proxy["listen"].clone()).expect("listen");
    assert_ne!(listen.port(), 0);
    assert_eq!(proxy["enabled"], json!(true));
    assert_eq!(proxy["seed"], json!(9));

    let (st, err) = ctl.call(M::POST, "/proxies", Some(create)).await;
    assert_eq!(
        (st, err["code"].as_str()),
        (StatusCode::CONFLICT, Some("proxy_exists"))
    );
    let (st, err) = ctl.call(M::GET, "/proxies/nope", None).await;
    assert_eq!(
        (st, err["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_such_proxy"))
    );

    // A link made before the blackhole: the fault swallows its bytes (one made into it would
    // not be connected yet, and hold them).
    let mut c = connect(listen).await;
    assert_eq!(round_trip(&mut c, b"first").await, b"first");
    let fault = json!({"name": "bh", "kind": "blackhole", "direction": "upstream"});
    let (st, f) = ctl
        .call(M::POST, "/proxies/coord/faults", Some(fault.clone()))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{f}");
    assert_eq!(
        (f["kind"].as_str(), f["toxicity"].as_f64()),
        (Some("blackhole"), Some(1.0))
    );
    let (st, _) = ctl
        .call(M::POST, "/proxies/coord/faults", Some(fault))
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let bad = json!({"name": "x", "kind": "latency", "attributes": {"latency_ms": -1}});
    let (st, err) = ctl.call(M::POST, "/proxies/coord/faults", Some(bad)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
    let (st, list) = ctl.call(M::GET, "/proxies/coord/faults", None).await;
    assert_eq!(
        (st, list.as_array().map(Vec::len)),
        (StatusCode::OK, Some(1))
    );

    c.write_all(b"12345").await.expect("write");
    let mut dropped = 0;
    for _ in 0..2000 {
        let (_, stats) = ctl.call(M::GET, "/proxies/coord/stats", None).await;
        dropped = stats["faults"]["bh"]["bytes_dropped"].as_u64().unwrap_or(0);
        if dropped == 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(dropped, 5);

    let patch = json!({"toxicity": 0.0});
    let (st, f) = ctl
        .call(M::PATCH, "/proxies/coord/faults/bh", Some(patch))
        .await;
    assert_eq!((st, f["toxicity"].as_f64()), (StatusCode::OK, Some(0.0)));
    let (st, f) = ctl.call(M::DELETE, "/proxies/coord/faults/bh", None).await;
    assert_eq!(
        (st, f["name"].as_str(), f["stats"]["bytes_dropped"].as_u64()),
        (StatusCode::OK, Some("bh"), Some(5)),
        "the removed fault with its final counters: {f}"
    );
    let (st, _) = ctl.call(M::GET, "/proxies/coord/faults/bh", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(round_trip(&mut c, b"flows").await, b"flows");

    let (st, p) = ctl
        .call(M::PATCH, "/proxies/coord", Some(json!({"enabled": false})))
        .await;
    assert_eq!((st, &p["enabled"]), (StatusCode::OK, &json!(false)));
    assert!(
        TcpStream::connect(listen).await.is_err(),
        "down proxy accepted"
    );
    let add = json!({"name": "lat", "kind": "latency", "attributes": {"latency_ms": 1}});
    ctl.call(M::POST, "/proxies/coord/faults", Some(add)).await;
    let (st, _) = ctl.call(M::POST, "/reset", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, p) = ctl.call(M::GET, "/proxies/coord", None).await;
    assert_eq!((&p["enabled"], &p["faults"]), (&json!(true), &json!([])));
    let mut again = connect(listen).await;
    assert_eq!(round_trip(&mut again, b"up").await, b"up");

    let (st, _) = ctl.call(M::DELETE, "/proxies/coord", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, all) = ctl.call(M::GET, "/proxies", None).await;
    assert_eq!((st, all), (StatusCode::OK, json!([])));
    ctl.stop().await;
}

/// A proxy whose upstream is its own listen address would dial itself on every link, without
/// end: it is refused (400) before it listens, also behind a wildcard listen address.
#[tokio::test]
async fn a_proxy_whose_upstream_is_its_own_listen_address_is_refused() {
    let ctl = Control::start().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    for (listen, upstream) in [
        (format!("127.0.0.1:{port}"), format!("127.0.0.1:{port}")),
        (format!("0.0.0.0:{port}"), format!("127.0.0.1:{port}")),
        (format!("[::]:{port}"), format!("127.0.0.1:{port}")),
        (format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}")),
    ] {
        let create = json!({"name": "self", "listen": listen, "upstream": upstream});
        let (st, err) = ctl.call(M::POST, "/proxies", Some(create)).await;
        assert_eq!(
            (st, err["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("upstream_is_listen")),
            "{listen} -> {upstream}: {err}"
        );
        assert!(
            err["error"]
                .as_str()
                .is_some_and(|e| e.contains("own listen address")),
            "{err}"
        );
    }
    let (_, list) = ctl.call(M::GET, "/proxies", None).await;
    assert_eq!(list, json!([]));
    ctl.stop().await;
}

#[tokio::test]
async fn bodies_that_are_not_json_or_have_unknown_fields_get_400_or_415() {
    let ctl = Control::start().await;
    let url = format!("{}/proxies", ctl.base);
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .post(&url)
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let body = json!({"name": "p", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1", "x": 1});
    let (st, err) = ctl.call(M::POST, "/proxies", Some(body)).await;
    assert_eq!(
        (st, err["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request"))
    );
    let body = json!({"name": "bad name", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"});
    let (st, err) = ctl.call(M::POST, "/proxies", Some(body)).await;
    assert_eq!(
        (st, err["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_name"))
    );
    // An unknown route, a method a route does not take and a body over the limit answer in
    // the same JSON body (`call` parses every answer as JSON).
    let (st, err) = ctl.call(M::GET, "/nowhere", None).await;
    assert_eq!(
        (st, err["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_such_route"))
    );
    let (st, err) = ctl.call(M::PUT, "/proxies", None).await;
    assert_eq!(
        (st, err["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    let huge = json!({"name": "p", "listen": "127.0.0.1:0", "upstream": "x".repeat(3_000_000)});
    let (st, err) = ctl.call(M::POST, "/proxies", Some(huge)).await;
    assert_eq!(
        (st, err["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large"))
    );
    ctl.stop().await;
}

/// Sends `GET /proxies` for `host` over a raw socket (a client library sets `Host` itself);
/// returns the status code and the body.
async fn get_for_host(base: &str, host: &str) -> (u16, Value) {
    let addr = base.trim_start_matches("http://");
    let mut s = connect(addr.parse().expect("control addr")).await;
    let req = format!("GET /proxies HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let (raw, _) = read_to_end(&mut s).await;
    let text = String::from_utf8(raw).expect("utf-8 answer");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect(&text);
    let (_, body) = text.split_once("\r\n\r\n").expect(&text);
    (status, serde_json::from_str(body).expect(body))
}

/// A web page that rebinds its domain's DNS to 127.0.0.1 reaches the control API under its own
/// name: refused, so it cannot open a relay. The API's own loopback names pass.
#[tokio::test]
async fn the_control_api_refuses_a_request_for_a_host_that_is_not_loopback() {
    let ctl = Control::start().await;
    let (status, err) = get_for_host(&ctl.base, "evil.example").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (403, Some("forbidden")),
        "{err}"
    );
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|m| m.contains("loopback"))
    );
    let real = ctl.base.trim_start_matches("http://").to_owned();
    for host in [real.as_str(), "localhost:8474", "[::1]"] {
        let (status, list) = get_for_host(&ctl.base, host).await;
        assert_eq!((status, list), (200, json!([])), "{host}");
    }
    let (st, _) = ctl.call(M::GET, "/proxies", None).await;
    assert_eq!(st, StatusCode::OK);
    ctl.stop().await;
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ProxyArgs,
}

/// Runs `tether proxy ARGS`; arguments clap refuses are an error like the command's own.
async fn cli(args: &[&str]) -> anyhow::Result<()> {
    let argv = std::iter::once("proxy").chain(args.iter().copied());
    let parsed = Cli::try_parse_from(argv)?;
    within("cli command", run_cli(parsed.args)).await
}

/// The client puts `--proxy` and `--name` into the request's path: a name that is not one
/// (`..` segments, a query) is refused before any request, not resolved into another path.
/// `fault remove --name ../../coordinator` was DELETE /proxies/coordinator (the proxy gone,
/// then an error), and `--name 'cut?x'` removed fault `cut`.
#[tokio::test]
async fn cli_names_that_would_reach_another_path_are_refused_before_any_request() {
    let echo = echo().await;
    let ctl = Control::start().await;
    let create = json!({"name": "coordinator", "listen": "127.0.0.1:0", "upstream": echo.addr});
    let (st, _) = ctl.call(M::POST, "/proxies", Some(create)).await;
    assert_eq!(st, StatusCode::CREATED);
    let cut = json!({"name": "cut", "kind": "blackhole", "direction": "both"});
    let (st, _) = ctl
        .call(M::POST, "/proxies/coordinator/faults", Some(cut))
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let base = ctl.base.clone();
    let c = ["--control", base.as_str()];
    let refused = [
        vec!["fault", "remove", c[0], c[1], "--name", "../../coordinator"],
        vec!["fault", "remove", c[0], c[1], "--name", "cut?x"],
        vec![
            "fault",
            "remove",
            c[0],
            c[1],
            "--proxy",
            "coordinator/faults/cut?",
            "--name",
            "x",
        ],
        vec![
            "fault",
            "list",
            c[0],
            c[1],
            "--proxy",
            "../proxies/coordinator",
        ],
        vec!["down", c[0], c[1], "--proxy", "../proxies/coordinator"],
    ];
    for args in refused {
        let err = cli(&args).await.expect_err("a name that is not one");
        assert!(err.to_string().contains("ASCII letters"), "{args:?}: {err}");
    }
    let (st, proxy) = ctl.call(M::GET, "/proxies/coordinator", None).await;
    assert_eq!(st, StatusCode::OK, "{proxy}");
    assert_eq!(proxy["enabled"], json!(true));
    let (st, faults) = ctl.call(M::GET, "/proxies/coordinator/faults", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(faults.as_array().map(Vec::len), Some(1), "{faults}");
    ctl.stop().await;
}

#[tokio::test]
async fn cli_client_commands_drive_a_running_control_api() {
    let echo = echo().await;
    let ctl = Control::start().await;
    let proxy = ctl
        .server
        .create(
            tether_faultproxy::ProxyConfig {
                name: "coordinator".into(),
                listen: "127.0.0.1:0".parse().expect("addr"),
                upstream: echo.addr,
                seed: 3,
            },
            true,
        )
        .await
        .expect("create");
    let base = ctl.base.clone();
    let c = ["--control", base.as_str()];
    let add = [
        "fault",
        "add",
        c[0],
        c[1],
        "--name",
        "slow",
        "--kind",
        "latency",
        "--direction",
        "both",
        "--attr",
        "latency_ms=5",
        "--worker",
        "w1",
    ];
    cli(&add).await.expect("fault add");
    let f = proxy.fault("slow").expect("fault added");
    assert_eq!(
        f.fault.kind,
        FaultKind::Latency {
            latency_ms: 5,
            jitter_ms: 0
        }
    );
    cli(&["fault", "list", c[0], c[1], "--json"])
        .await
        .expect("fault list");
    cli(&["list", c[0], c[1]]).await.expect("list");
    cli(&["down", c[0], c[1]]).await.expect("down");
    assert!(!proxy.is_enabled());
    cli(&["up", c[0], c[1], "--json"]).await.expect("up");
    assert!(proxy.is_enabled());
    cli(&["fault", "remove", c[0], c[1], "--name", "slow"])
        .await
        .expect("remove");
    assert!(proxy.faults().is_empty());
    cli(&["reset", c[0], c[1]]).await.expect("reset");

    let err = cli(&["down", c[0], c[1], "--proxy", "nope"])
        .await
        .expect_err("unknown proxy");
    assert!(err.to_string().contains("no proxy named"), "{err}");
    let bad = [
        "fault", "add", c[0], c[1], "--name", "x", "--kind", "corrupt", "--attr", "rate=3",
    ];
    assert!(cli(&bad).await.is_err());
    let twice = [
        "fault",
        "add",
        c[0],
        c[1],
        "--name",
        "x",
        "--kind",
        "latency",
        "--attr",
        "latency_ms=1",
        "--attr",
        "latency_ms=2",
    ];
    let err = cli(&twice).await.expect_err("an attribute given twice");
    assert!(err.to_string().contains("given twice"), "{err}");
    assert!(proxy.faults().is_empty());
    ctl.stop().await;
}
