//! The transport's floor on this machine: what WebSocket frames alone cost, with no protocol
//! behind them, so that `tether stress message_flood`'s figures can be read against it.
//!
//! `cargo run --release --example transport_floor -- [--conns 1000] [--rate 300] [--per-frame 2]
//! [--secs 8]` starts a server process (axum, the coordinator's WebSocket buffer sizes; it
//! answers every frame with one frame of acknowledgement-sized text per message, as the
//! coordinator does per commit) and a client process (`--conns` tokio-tungstenite
//! connections from 16 source addresses in 127.0.0.0/8, each sending `--rate` messages a second
//! in frames of `--per-frame` task_state-sized messages), then prints the messages answered per
//! second and each process's CPU per message, read from `/proc`. Loopback only, bounded by
//! `--secs`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite;

/// A task_state message of the flood, as the worker encodes it (about 190 bytes).
const STATE: &str = r#"{"type":"task_state","seq":1234,"task_id":"0b6a3a5e-8f3c-4b5e-9a64-1f1e2b3c4d5e","attempt":1,"state":{"step":417,"progress":0.4170,"phase":"flood"},"timestamp":"2026-11-30T09:12:33.123456Z"}"#;
/// One acknowledgement, as the coordinator encodes it (about 140 bytes).
const ACK: &str = r#"{"type":"ack","ack_seq":1234,"task_id":"0b6a3a5e-8f3c-4b5e-9a64-1f1e2b3c4d5e","disposition":"recorded","timestamp":"2026-11-30T09:12:33.124001Z"}"#;

struct Args {
    conns: usize,
    rate: f64,
    per_frame: usize,
    secs: u64,
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
        })
        .unwrap_or(default)
}

fn batch(one: &str, n: usize) -> String {
    let items = vec![one; n];
    format!("[{}]", items.join(","))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = Args {
        conns: arg(&args, "--conns", 1000),
        rate: arg(&args, "--rate", 300.0),
        per_frame: arg(&args, "--per-frame", 2),
        secs: arg(&args, "--secs", 8),
    };
    let rt = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        Some(mode @ ("serve" | "serve-tt")) => serve_on(mode),
        Some("serve-raw") => rt.block_on(serve_raw()),
        Some("client") => {
            let url = arg(&args, "--url", String::new());
            rt.block_on(client(&url, &parsed))
        }
        _ => rt.block_on(drive(&parsed)),
    }
}

/// Serves `mode` on the runtime `FLOOR_RT` names: `multi` (tokio's default, a thread per
/// core), `current` (one thread), or `shards` (a one-thread runtime per core, each accepting
/// on its own listener of the same port, `SO_REUSEPORT`, the kernel spreading connections).
fn serve_on(mode: &str) -> anyhow::Result<()> {
    let rt_kind = std::env::var("FLOOR_RT").unwrap_or_else(|_| "multi".into());
    let listen = |addr: SocketAddr| -> anyhow::Result<std::net::TcpListener> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let l = socket.listen(4096)?;
        Ok(l.into_std()?)
    };
    let tt = mode == "serve-tt";
    let shards = match rt_kind.as_str() {
        "multi" => 0,
        "current" => 1,
        "shards" => std::thread::available_parallelism().map_or(2, |n| n.get()),
        other => anyhow::bail!("FLOOR_RT: multi, current or shards, not {other}"),
    };
    let first = {
        let _rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let _g = _rt.enter();
        listen("127.0.0.1:0".parse()?)?
    };
    let addr = first.local_addr()?;
    println!("{addr}");
    if shards == 0 {
        let rt = tokio::runtime::Runtime::new()?;
        return rt.block_on(serve_one(tt, first));
    }
    let mut more = Vec::new();
    for _ in 1..shards {
        let _rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let _g = _rt.enter();
        let l = listen(addr)?;
        more.push(std::thread::spawn(move || shard(tt, l)));
    }
    shard(tt, first)
}

fn shard(tt: bool, l: std::net::TcpListener) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve_one(tt, l))
}

async fn serve_one(tt: bool, l: std::net::TcpListener) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::from_std(l)?;
    if tt {
        serve_tt(l).await
    } else {
        serve(l).await
    }
}

async fn serve(listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/ws",
        get(|ws: WebSocketUpgrade| async move {
            ws.read_buffer_size(512)
                .write_buffer_size(16 * 1024)
                .on_upgrade(answer)
        }),
    );
    axum::serve(listener, app.into_make_service()).await?;
    Ok(())
}

/// The same answers from tokio-tungstenite on the accepted stream, without hyper and axum.
async fn serve_tt(listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let cfg = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(16 * 1024);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(cfg)).await
            else {
                return;
            };
            let acks: Vec<String> = (0..=16).map(|n| batch(ACK, n)).collect();
            while let Some(Ok(msg)) = ws.next().await {
                let tungstenite::Message::Text(text) = msg else {
                    continue;
                };
                let n = text.as_str().matches("\"type\"").count().min(16);
                let reply = tungstenite::Message::Text(acks[n].as_str().into());
                if ws.send(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// No WebSocket on the server: after the handshake, each read is answered with one unmasked
/// text frame of one acknowledgement (the floor of tokio and the kernel alone).
async fn serve_raw() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            let mut stream = ws.into_inner();
            let mut frame = match ACK.len() {
                n @ 0..126 => vec![0x81u8, n as u8],
                n => vec![0x81u8, 126, (n >> 8) as u8, n as u8],
            };
            frame.extend_from_slice(ACK.as_bytes());
            let mut buf = [0u8; 512];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if stream.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Answers each frame of n messages with one frame of n acknowledgements.
async fn answer(mut ws: WebSocket) {
    let acks: Vec<String> = (0..=16).map(|n| batch(ACK, n)).collect();
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let n = text.as_str().matches("\"type\"").count().min(16);
        if ws
            .send(Message::Text(acks[n].clone().into()))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn client(url: &str, a: &Args) -> anyhow::Result<()> {
    let answered = Arc::new(AtomicU64::new(0));
    let addr: SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()?;
    let frame = batch(STATE, a.per_frame);
    let period = Duration::from_secs_f64(a.per_frame as f64 / a.rate);
    let mut tasks = Vec::new();
    for i in 0..a.conns {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 16) as u8));
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(addr).await?;
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
        let (mut tx, mut rx) = ws.split();
        let frame = frame.clone();
        let answered = answered.clone();
        let per = a.per_frame as u64;
        tasks.push(tokio::spawn(async move {
            let reader = async {
                while let Some(Ok(m)) = rx.next().await {
                    if m.is_text() {
                        answered.fetch_add(per, Ordering::Relaxed);
                    }
                }
            };
            let writer = async {
                // Spread the connections' ticks over the period.
                tokio::time::sleep(period.mul_f64((i % 97) as f64 / 97.0)).await;
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let msg = tungstenite::Message::Text(frame.as_str().into());
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! { () = reader => {}, () = writer => {} }
        }));
    }
    println!("connected");
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = answered.load(Ordering::Relaxed);
        println!("{}", now - last);
        last = now;
    }
}

fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks / hz
}

async fn drive(a: &Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mode = std::env::var("FLOOR_SERVER").unwrap_or_else(|_| "serve".into());
    let mut server = tokio::process::Command::new(&exe)
        .arg(&mode)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(server.stdout.take().expect("piped")).lines();
    let addr = lines.next_line().await?.unwrap_or_default();
    let mut client = tokio::process::Command::new(&exe)
        .args(["client", "--url", &format!("ws://{addr}/ws")])
        .args([
            "--conns",
            &a.conns.to_string(),
            "--rate",
            &a.rate.to_string(),
        ])
        .args(["--per-frame", &a.per_frame.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = tokio::io::BufReader::new(client.stdout.take().expect("piped")).lines();
    while out.next_line().await?.as_deref() != Some("connected") {}
    // Two seconds to settle, then the window.
    for _ in 0..2 {
        out.next_line().await?;
    }
    let (sp, cp) = (server.id().unwrap_or(0), client.id().unwrap_or(0));
    let (s0, c0, t0) = (cpu_s(sp), cpu_s(cp), Instant::now());
    let mut answered = 0u64;
    for _ in 0..a.secs {
        answered += out.next_line().await?.unwrap_or_default().parse::<u64>()?;
    }
    let (s1, c1, dt) = (cpu_s(sp), cpu_s(cp), t0.elapsed().as_secs_f64());
    let rate = answered as f64 / dt;
    println!(
        "conns {} offered {:.0}/s in frames of {}: answered {:.0} messages/s; \
         server {:.2} CPU-s ({:.2} us/msg), client {:.2} CPU-s ({:.2} us/msg)",
        a.conns,
        a.conns as f64 * a.rate,
        a.per_frame,
        rate,
        s1 - s0,
        (s1 - s0) * 1e6 / answered.max(1) as f64,
        c1 - c0,
        (c1 - c0) * 1e6 / answered.max(1) as f64,
    );
    Ok(())
}
