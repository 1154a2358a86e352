//! The client subcommands: one HTTP request each to the control API, then text or JSON out.

use anyhow::{Context, bail};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{ClientArgs, FaultCommand, ProxyCommand, ProxyRef, out};
use crate::control::{ErrorBody, ProxyPatch};
use crate::fault::{Fault, FaultKind, Target};
use crate::proxy::{FaultInfo, ProxyInfo};

/// A control API at one base URL.
struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        Client::with(reqwest::Client::builder(), &args.control)
    }

    /// A client of the control API at `control` (a URL or host:port), built from `builder`
    /// with every proxy off, those of `HTTP_PROXY` and the like included: the API is on
    /// loopback, and a proxy meant for the outside would not reach it (or be down).
    fn with(builder: reqwest::ClientBuilder, control: &str) -> anyhow::Result<Self> {
        let raw = control.trim().trim_end_matches('/');
        let base = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("http://{raw}")
        };
        let http = builder
            .no_proxy()
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client { http, base })
    }

    /// Sends one request; an error answer becomes an error with the API's message.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<Option<Value>> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the control API at {}", self.base))?;
        let status = resp.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let text = resp
            .text()
            .await
            .with_context(|| format!("reading the answer to {method} {url}"))?;
        if !status.is_success() {
            let msg = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            bail!("{method} {url}: {status}: {msg}");
        }
        let value = serde_json::from_str(&text)
            .with_context(|| format!("{method} {url} answered with something not JSON"))?;
        Ok(Some(value))
    }

    async fn typed<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<(T, Value)> {
        let value = self
            .call(method, path, body)
            .await?
            .context("the control API answered without a body")?;
        let typed = serde_json::from_value(value.clone()).context("unexpected answer shape")?;
        Ok((typed, value))
    }
}

const NO_BODY: Option<&()> = None;

pub(super) async fn run(cmd: ProxyCommand) -> anyhow::Result<()> {
    match cmd {
        ProxyCommand::Fault { command } => fault(command).await,
        ProxyCommand::List(args) => {
            let c = Client::new(&args)?;
            let (proxies, raw): (Vec<ProxyInfo>, _) =
                c.typed(Method::GET, "/proxies", NO_BODY).await?;
            if args.json {
                return print_json(&raw);
            }
            out!(
                "{:<20} {:<22} {:<22} {:<8} {:>6} {:>6}",
                "NAME",
                "LISTEN",
                "UPSTREAM",
                "ENABLED",
                "FAULTS",
                "LINKS"
            )?;
            for p in proxies {
                out!(
                    "{:<20} {:<22} {:<22} {:<8} {:>6} {:>6}",
                    p.name,
                    p.listen,
                    p.upstream,
                    p.enabled,
                    p.faults.len(),
                    p.links.len()
                )?;
            }
            Ok(())
        }
        ProxyCommand::Down(target) => set_enabled(&target, false).await,
        ProxyCommand::Up(target) => set_enabled(&target, true).await,
        ProxyCommand::Reset(args) => {
            Client::new(&args)?
                .call(Method::POST, "/reset", NO_BODY)
                .await?;
            if args.json {
                return print_json(&serde_json::json!({ "reset": true }));
            }
            out!("every proxy is up and every fault removed")?;
            Ok(())
        }
    }
}

async fn set_enabled(target: &ProxyRef, enabled: bool) -> anyhow::Result<()> {
    let c = Client::new(&target.client)?;
    let patch = ProxyPatch {
        enabled: Some(enabled),
    };
    let path = format!("/proxies/{}", target.proxy);
    let (info, raw): (ProxyInfo, _) = c.typed(Method::PATCH, &path, Some(&patch)).await?;
    if target.client.json {
        return print_json(&raw);
    }
    let state = if info.enabled { "up" } else { "down" };
    out!("proxy {} is {state} (listen {})", info.name, info.listen)?;
    Ok(())
}

async fn fault(cmd: FaultCommand) -> anyhow::Result<()> {
    match cmd {
        FaultCommand::Add(args) => {
            let target = &args.fault.proxy;
            let mut attrs = Map::new();
            for (k, v) in args.attrs {
                if attrs.insert(k.clone(), v).is_some() {
                    bail!("--attr {k} is given twice");
                }
            }
            if let Some(why) = super::attrs::missing(&args.kind, &attrs) {
                bail!("{why}");
            }
            let fault = Fault {
                name: args.fault.name.clone(),
                kind: FaultKind::from_parts(&args.kind, attrs)?,
                direction: args.direction,
                toxicity: args.toxicity,
                target: if args.workers.is_empty() {
                    Target::All
                } else {
                    Target::Workers(args.workers)
                },
            };
            fault.validate()?;
            let c = Client::new(&target.client)?;
            let path = format!("/proxies/{}/faults", target.proxy);
            let (info, raw): (FaultInfo, _) = c.typed(Method::POST, &path, Some(&fault)).await?;
            if target.client.json {
                return print_json(&raw);
            }
            out!("added to proxy {}: {}", target.proxy, describe(&info))?;
            Ok(())
        }
        FaultCommand::Remove(args) => {
            let target = &args.proxy;
            let c = Client::new(&target.client)?;
            let path = format!("/proxies/{}/faults/{}", target.proxy, args.name);
            let (info, raw): (FaultInfo, _) = c.typed(Method::DELETE, &path, NO_BODY).await?;
            if target.client.json {
                return print_json(&raw);
            }
            out!(
                "removed from proxy {}: {}; its counters {}",
                target.proxy,
                describe(&info),
                serde_json::to_string(&info.stats)?
            )?;
            Ok(())
        }
        FaultCommand::List(target) => {
            let c = Client::new(&target.client)?;
            let path = format!("/proxies/{}/faults", target.proxy);
            let (faults, raw): (Vec<FaultInfo>, _) = c.typed(Method::GET, &path, NO_BODY).await?;
            if target.client.json {
                return print_json(&raw);
            }
            if faults.is_empty() {
                out!("proxy {} has no faults", target.proxy)?;
            }
            for f in &faults {
                out!("{}", describe(f))?;
                let s = &f.stats;
                out!(
                    "    passed {} delayed {} dropped {} corrupted {} bytes; \
                     {} affected, {} reset, {} closed connections; {} closes delayed",
                    s.bytes_passed,
                    s.bytes_delayed,
                    s.bytes_dropped,
                    s.bytes_corrupted,
                    s.connections_affected,
                    s.connections_reset,
                    s.connections_closed,
                    s.closes_delayed
                )?;
            }
            Ok(())
        }
    }
}

/// One line about a fault: `name: kind {attrs} direction, toxicity t, target`.
fn describe(info: &FaultInfo) -> String {
    let f = &info.fault;
    let target = match &f.target {
        Target::All => "all workers".to_owned(),
        Target::Workers(ids) => {
            let ids: Vec<_> = ids.iter().map(|w| w.as_str()).collect();
            format!("workers {}", ids.join(","))
        }
    };
    format!(
        "{}: {} {} {}, toxicity {}, {target}",
        f.name,
        f.kind.name(),
        Value::Object(f.kind.attributes()),
        serde_json::to_value(f.direction)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        f.toxicity
    )
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::control;
    use crate::server::Server;

    /// `HTTP_PROXY=http://127.0.0.1:1` gives reqwest a proxy for every `http://` URL, loopback
    /// ones included; here the builder gets that proxy directly (the process environment is
    /// shared by the tests running beside this one). Nothing listens on port 1.
    #[tokio::test]
    async fn the_client_reaches_a_loopback_control_api_past_a_configured_http_proxy() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let serve = tokio::spawn(control::run(listener, Server::new(1), stop.clone()));
        let proxy = reqwest::Proxy::http("http://127.0.0.1:1").expect("proxy url");
        let builder = reqwest::Client::builder().proxy(proxy);
        let client = Client::with(builder, &addr.to_string()).expect("client");
        let call = client.call(Method::GET, "/proxies", NO_BODY);
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), call)
            .await
            .expect("answered within 10 s")
            .expect("the control API reached");
        assert_eq!(answer, Some(Value::Array(Vec::new())));
        stop.cancel();
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), serve).await;
        assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
    }
}
