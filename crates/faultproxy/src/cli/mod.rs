//! `tether proxy`: run a fault proxy with its control API, or drive a running one over HTTP.
//!
//! ```text
//! tether proxy --listen 127.0.0.1:9000 --upstream 127.0.0.1:8765 [--control 127.0.0.1:8474] [--seed N]
//! tether proxy fault add --proxy coordinator --name cut --kind blackhole --direction both
//! tether proxy fault add --name slow --kind latency --attr latency_ms=200 --worker w1
//! tether proxy fault list | remove --name cut
//! tether proxy down | up [--proxy NAME]
//! tether proxy list | reset
//! ```
//!
//! The client subcommands take `--control URL` (default `http://127.0.0.1:8474`, or
//! `TETHER_PROXY_CONTROL`) and `--json` for machine output.

mod attrs;
mod client;

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::{self, DEFAULT_CONTROL_ADDR};
use crate::fault::{Direction, KIND_NAMES, validate_name};
use crate::proxy::ProxyConfig;
use crate::server::Server;

/// Name of the proxy `tether proxy` runs, and the default `--proxy` of the client commands.
pub const DEFAULT_PROXY_NAME: &str = "coordinator";

/// Default `--control` URL of the client commands.
pub const DEFAULT_CONTROL_URL: &str = "http://127.0.0.1:8474";

/// Arguments of `tether proxy`.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ProxyArgs {
    #[command(subcommand)]
    pub command: Option<ProxyCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

impl ProxyArgs {
    /// A client subcommand (one request to a control API), not the proxy itself.
    pub fn is_client(&self) -> bool {
        self.command.is_some()
    }
}

/// Run mode: a proxy (optional) plus the control API, until ctrl-c or SIGTERM.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address the proxy listens on (port 0 picks one).
    #[arg(long, requires = "upstream")]
    pub listen: Option<SocketAddr>,
    /// Address the proxy forwards to (the coordinator).
    #[arg(long, requires = "listen")]
    pub upstream: Option<SocketAddr>,
    /// Name of the proxy.
    #[arg(long, default_value = DEFAULT_PROXY_NAME)]
    pub name: String,
    /// Address of the control API; loopback only, since it has no authentication.
    #[arg(long, default_value = DEFAULT_CONTROL_ADDR)]
    pub control: SocketAddr,
    /// Seed of every random draw; logged and printed. Defaults to one taken from the clock.
    #[arg(long, env = "TETHER_PROXY_SEED")]
    pub seed: Option<u64>,
    /// Print the addresses and seed as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Runtime threads: 1 (the default) runs every link and the control API on one thread, 0
    /// one thread per core. One measured best with thousands of links made at once (each
    /// chunk passes between a link's reader and writer without waking another thread;
    /// docs/PERFORMANCE.md, thirty-second round); more helps only a proxy whose links move
    /// more bytes than one core can copy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub threads: u16,
}

/// Client subcommands of `tether proxy`.
#[derive(Debug, Clone, Subcommand)]
pub enum ProxyCommand {
    /// Add, remove or list the faults of a proxy.
    Fault {
        #[command(subcommand)]
        command: FaultCommand,
    },
    /// List the proxies.
    List(ClientArgs),
    /// Take a proxy down: close its listener and every live link.
    Down(ProxyRef),
    /// Bring a proxy up again on the same address.
    Up(ProxyRef),
    /// Bring every proxy up and remove every fault.
    Reset(ClientArgs),
}

/// `tether proxy fault ...`
#[derive(Debug, Clone, Subcommand)]
pub enum FaultCommand {
    /// Add a fault.
    #[command(after_help = attrs::help())]
    Add(FaultAddArgs),
    /// Remove a fault by name; prints it with its counters at the removal.
    Remove(FaultRef),
    /// List the faults of a proxy with their counters.
    List(ProxyRef),
}

/// Where the control API is and how to print.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// URL (or host:port) of the control API.
    #[arg(long, env = "TETHER_PROXY_CONTROL", default_value = DEFAULT_CONTROL_URL)]
    pub control: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A proxy on a control API.
#[derive(Debug, Clone, Args)]
pub struct ProxyRef {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Name of the proxy.
    #[arg(long, default_value = DEFAULT_PROXY_NAME, value_parser = parse_name)]
    pub proxy: String,
}

/// A fault of a proxy.
#[derive(Debug, Clone, Args)]
pub struct FaultRef {
    #[command(flatten)]
    pub proxy: ProxyRef,
    /// Name of the fault.
    #[arg(long, value_parser = parse_name)]
    pub name: String,
}

/// `tether proxy fault add`.
#[derive(Debug, Clone, Args)]
pub struct FaultAddArgs {
    #[command(flatten)]
    pub fault: FaultRef,
    /// Kind of fault.
    #[arg(long, value_parser = KIND_NAMES)]
    pub kind: String,
    /// Stream the fault sits on: upstream (worker to coordinator), downstream or both.
    #[arg(long, default_value = "downstream", value_parser = parse_direction)]
    pub direction: Direction,
    /// Share of connections the fault applies to, in [0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub toxicity: f64,
    /// Attribute of the kind as key=value, e.g. latency_ms=200; repeatable. Each kind's are
    /// listed below.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    pub attrs: Vec<(String, serde_json::Value)>,
    /// Apply only to links of this worker; repeatable. Default: every link. A link's worker is
    /// read from its plaintext upgrade request: a TLS (wss://) link's is unknown, so a fault
    /// limited to workers never applies to it (the proxy warns once when it sees one).
    #[arg(long = "worker", value_name = "ID")]
    pub workers: Vec<tether_proto::WorkerId>,
}

/// A proxy's or a fault's name, as the control API takes it. The client puts names into the
/// request's path, so one checked only by the server could name something else: `../../x`
/// resolves to `/proxies/x` (a fault's removal deleted that proxy), and `cut?x` to fault `cut`.
fn parse_name(s: &str) -> Result<String, String> {
    validate_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

fn parse_direction(s: &str) -> Result<Direction, String> {
    serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
        .map_err(|_| format!("{s:?} is not upstream, downstream or both"))
}

/// `key=value`; the value is read as JSON when it is a number or boolean, else as a string.
fn parse_attr(s: &str) -> Result<(String, serde_json::Value), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    let value = match serde_json::from_str::<serde_json::Value>(value) {
        Ok(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v,
        _ => serde_json::Value::String(value.to_owned()),
    };
    Ok((key.to_owned(), value))
}

/// Standard output was closed by its reader (`tether proxy list | head -1`): the client
/// command ends there instead of panicking on the write.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct StdoutClosed;

/// Writes one line of a command's output: [`StdoutClosed`] when the reader has gone, any other
/// failure as an error that says where it happened.
pub fn out_line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to standard output")),
    }
}

/// `println!` for a command's output (see [`out_line`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out_line(format_args!($($arg)*))
    };
}
pub(crate) use out;

/// Runs `tether proxy` with parsed arguments.
pub async fn run_cli(args: ProxyArgs) -> anyhow::Result<()> {
    match args.command {
        None => run_server(args.run, shutdown_signal()).await,
        Some(cmd) => client::run(cmd).await,
    }
}

/// Serves until `stop` resolves (ctrl-c or SIGTERM in the binary).
async fn run_server(
    args: RunArgs,
    stop: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.control.ip().is_loopback(),
        "--control {} is not a loopback address; the control API has no authentication",
        args.control
    );
    let seed = args.seed.unwrap_or_else(seed_from_clock);
    let server = Server::new(seed);
    let listener = TcpListener::bind(args.control)
        .await
        .with_context(|| format!("cannot listen for the control API on {}", args.control))?;
    let control_addr = listener.local_addr().context("control API address")?;
    if let (Some(listen), Some(upstream)) = (args.listen, args.upstream) {
        let config = ProxyConfig {
            name: args.name.clone(),
            listen,
            upstream,
            seed,
        };
        server.create(config, true).await?;
    }
    let proxies: Vec<_> = server.list().await.iter().map(|p| p.info()).collect();
    if args.json {
        let line = serde_json::json!({
            "control": format!("http://{control_addr}"),
            "seed": seed,
            "proxies": proxies,
        });
        out!("{line}")?;
    } else {
        for p in &proxies {
            out!("proxy {}: {} -> {}", p.name, p.listen, p.upstream)?;
        }
        out!("control API on http://{control_addr}, seed {seed}; ctrl-c to stop")?;
    }
    let shutdown = CancellationToken::new();
    let serve = control::run(listener, server.clone(), shutdown.clone());
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r?,
        r = stop => {
            r?;
            shutdown.cancel();
            serve.await?;
        }
    }
    server.shutdown().await;
    Ok(())
}

/// A seed when none was given: the clock's nanoseconds, printed so a run can be repeated.
fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot listen for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot listen for ctrl-c")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for ctrl-c")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Debug, Subcommand)]
    enum Top {
        Proxy(ProxyArgs),
    }

    fn parse(args: &[&str]) -> Result<ProxyArgs, clap::Error> {
        let argv = ["tether", "proxy"].iter().chain(args);
        Cli::try_parse_from(argv).map(|c| match c.cmd {
            Top::Proxy(p) => p,
        })
    }

    #[tokio::test]
    async fn run_mode_serves_until_stopped_and_refuses_a_public_control_address() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let args = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.local_addr().expect("addr").to_string(),
            "--control",
            "127.0.0.1:0",
            "--seed",
            "1",
        ])
        .expect("parse");
        run_server(args.run.clone(), async { Ok(()) })
            .await
            .expect("run mode starts and stops");
        let mut public = args.run;
        public.control = "0.0.0.0:0".parse().expect("addr");
        let err = run_server(public, async { Ok(()) })
            .await
            .expect_err("public control address");
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    #[test]
    fn run_mode_takes_listen_upstream_control_and_seed() {
        let a = parse(&[
            "--listen",
            "127.0.0.1:9000",
            "--upstream",
            "127.0.0.1:8765",
            "--seed",
            "7",
        ])
        .expect("parse");
        assert!(a.command.is_none());
        assert_eq!(a.run.listen, Some("127.0.0.1:9000".parse().expect("addr")));
        assert_eq!(a.run.control, DEFAULT_CONTROL_ADDR.parse().expect("addr"));
        assert_eq!(a.run.seed, Some(7));
        assert!(
            parse(&["--listen", "127.0.0.1:9000"]).is_err(),
            "upstream required"
        );
    }

    #[test]
    fn fault_add_takes_attributes_workers_and_direction() {
        let a = parse(&[
            "fault",
            "add",
            "--control",
            "127.0.0.1:1",
            "--proxy",
            "p",
            "--name",
            "slow",
            "--kind",
            "latency",
            "--direction",
            "upstream",
            "--toxicity",
            "0.5",
            "--attr",
            "latency_ms=200",
            "--attr",
            "label=x",
            "--worker",
            "w1",
            "--worker",
            "w2",
            "--json",
        ])
        .expect("parse");
        let Some(ProxyCommand::Fault {
            command: FaultCommand::Add(add),
        }) = a.command
        else {
            panic!("not fault add: {a:?}");
        };
        assert_eq!(add.direction, Direction::Upstream);
        assert_eq!(add.attrs[0], ("latency_ms".into(), serde_json::json!(200)));
        assert_eq!(add.attrs[1], ("label".into(), serde_json::json!("x")));
        assert_eq!(add.workers.len(), 2);
        assert!(add.fault.proxy.client.json);
        assert!(parse(&["fault", "add", "--name", "x", "--kind", "nope"]).is_err());
        assert!(
            parse(&[
                "fault", "add", "--name", "x", "--kind", "reset", "--attr", "x"
            ])
            .is_err()
        );
    }

    /// `fault add --help` lists each kind's attributes, required and optional, with units.
    #[test]
    fn fault_add_help_lists_each_kinds_attributes() {
        let e = parse(&["fault", "add", "--help"]).expect_err("help");
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        let help = e.to_string();
        for line in [
            "  latency     latency_ms=<ms> [jitter_ms=<ms> (default 0)]",
            "  blackhole   (none)",
            "  corrupt     rate=<0..1>",
            "  stall       loss_rate=<0..1> stall_ms=<ms>",
        ] {
            assert!(help.contains(line), "{line:?} not in:\n{help}");
        }
        for kind in KIND_NAMES {
            assert!(
                help.contains(&format!("\n  {kind} ")),
                "{kind} not in:\n{help}"
            );
        }
    }

    #[test]
    fn down_up_reset_and_list_parse_with_defaults() {
        for (args, ok) in [
            (&["down", "--proxy", "p"][..], true),
            (&["up"], true),
            (&["reset", "--json"], true),
            (&["list"], true),
            (&["fault", "list"], true),
            (&["fault", "remove", "--name", "x"], true),
            (&["down", "--listen", "127.0.0.1:1"], false),
        ] {
            assert_eq!(parse(args).is_ok(), ok, "{args:?}");
        }
    }
}
