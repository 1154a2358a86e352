//! Just enough of the Chrome DevTools protocol to drive a headless chromium in a test: start
//! it, open a page, evaluate JavaScript, take a screenshot. Over the WebSocket client the
//! workspace already builds (tokio-tungstenite), so no browser-automation crate is needed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Debian's chromium; `TETHER_CHROMIUM` names another binary.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The browser binary the tests use.
pub fn chromium() -> std::path::PathBuf {
    std::env::var_os("TETHER_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CHROMIUM))
}

/// A headless chromium with one page, killed when dropped.
pub struct Browser {
    _child: Child,
    _profile: tempfile::TempDir,
    page: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Browser {
    /// Starts chromium, or returns `None` when it is not installed.
    pub async fn start() -> Option<Browser> {
        let bin = chromium();
        if !bin.exists() {
            return None;
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1400,1100",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it chose into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 = tether_testkit::wait_for(
            "chromium's DevTools port",
            tether_testkit::DEADLINE,
            || async {
                let text = tokio::fs::read_to_string(&port_file).await.ok()?;
                text.lines().next()?.trim().parse().ok()
            },
        )
        .await;
        let list_url = format!("http://127.0.0.1:{port}/json/list");
        let ws_url = tether_testkit::wait_for(
            "chromium's page target",
            tether_testkit::DEADLINE,
            || async {
                let targets: Vec<Value> =
                    tether_testkit::loopback_client(reqwest::Client::builder())
                        .get(&list_url)
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                targets
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                    .map(str::to_owned)
            },
        )
        .await;
        let (page, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .expect("connect to the page");
        Some(Browser {
            _child: child,
            _profile: profile,
            page,
            next_id: 0,
        })
    }

    /// Sends one command and waits for its reply (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params});
        self.page
            .send(Message::text(msg.to_string()))
            .await
            .expect("send to chromium");
        let reply = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(m) = self.page.next().await {
                let Ok(Message::Text(t)) = m else { continue };
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                if v["id"] == id {
                    return v;
                }
            }
            panic!("chromium closed the page");
        })
        .await
        .unwrap_or_else(|_| panic!("no reply to {method}"));
        assert!(reply.get("error").is_none(), "{method}: {reply}");
        reply["result"].clone()
    }

    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// Evaluates `expr` in the page and returns its value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr} threw: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Waits until `expr` evaluates to `want` in the page.
    pub async fn wait_eval(&mut self, what: &str, expr: &str, want: Value) {
        let wanted = want.to_string();
        self.wait_for(what, expr, &wanted, |got| *got == want).await;
    }

    /// Waits until `expr` evaluates to something other than `null` in the page; that value.
    pub async fn wait_until(&mut self, what: &str, expr: &str) -> Value {
        self.wait_for(what, expr, "a value", |got| !got.is_null())
            .await
    }

    /// Waits until `expr`'s value is one `done` takes (`wanted` says which, if it times out).
    async fn wait_for(
        &mut self,
        what: &str,
        expr: &str,
        wanted: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = tokio::time::Instant::now() + tether_testkit::DEADLINE;
        loop {
            let got = self.eval(expr).await;
            if done(&got) {
                return got;
            }
            if tokio::time::Instant::now() >= end {
                panic!("timed out waiting for {what}: `{expr}` is {got}, not {wanted}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG screenshot of the page as `name` under `target/test-artifacts/`.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap_or_default())
            .expect("screenshot is base64");
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir).expect("artifacts dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        std::fs::canonicalize(&path).unwrap_or(path)
    }
}

/// `target/test-artifacts` of this workspace (or of `CARGO_TARGET_DIR`).
pub fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("test-artifacts")
}
