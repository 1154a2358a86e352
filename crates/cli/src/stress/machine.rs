//! How fast the machine was when a run began and ended. This machine's speed drifts (the same
//! build handled 172,000 and 200,000 messages a second an hour apart, with no load of its own
//! visible): a report carries fixed probes of single-thread speed, of the loopback network
//! path and of memory latency, and the load average. None of them has followed the drift so
//! far (the flood cost 15 % more CPU a message in one hour than in the hour before, every
//! probe unchanged: docs/PERFORMANCE.md, eighth round); they rule those causes out, and only
//! interleaved runs compare builds.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use serde::Serialize;
use tether_proto::msg::{StateJson, TaskState, WorkerMsg};
use tether_proto::{Attempt, Seq, TaskId};

/// Round trips in one timed batch, and the batches whose median is reported.
const PER_BATCH: u32 = 2_000;
const BATCHES: usize = 5;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Probe {
    /// Microseconds to encode a state update and decode it again (the median of several
    /// batches, on one thread).
    pub codec_us: f64,
    /// Microseconds for a 1 KiB message (a flood frame's size) to go over a loopback TCP
    /// connection and back, on one thread (so kernel work, not scheduling); `None` when no
    /// loopback connection could be made.
    pub loopback_us: Option<f64>,
    /// Nanoseconds a dependent load takes at random across 32 MiB (cache misses).
    pub memory_ns: f64,
    /// The 1-minute load average, from `/proc/loadavg` (`None` where there is none).
    pub load_1m: Option<f64>,
}

/// Times a fixed piece of work: a `task_state` like the flood's, encoded and decoded.
pub fn probe() -> Probe {
    let msg = WorkerMsg::TaskState(TaskState {
        seq: Seq(1),
        task_id: TaskId::fresh(),
        attempt: Attempt(1),
        // INVARIANT: a literal JSON object.
        state: StateJson::from_text(format!(r#"{{"n":1,"pad":"{}"}}"#, "x".repeat(64)))
            .unwrap_or_else(|_| StateJson::from(serde_json::Value::Null)),
        timestamp: tether_proto::msg::now(),
    });
    let mut batches: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..PER_BATCH {
                let text = tether_proto::codec::encode(std::hint::black_box(&msg));
                let _ = std::hint::black_box(tether_proto::codec::decode_worker(&text));
            }
            t.elapsed().as_secs_f64() * 1e6 / f64::from(PER_BATCH)
        })
        .collect();
    Probe {
        codec_us: median(&mut batches),
        loopback_us: loopback().ok(),
        memory_ns: memory(),
        load_1m: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok()),
    }
}

fn median(batches: &mut [f64]) -> f64 {
    batches.sort_by(f64::total_cmp);
    batches[batches.len() / 2]
}

/// Median round trip of a 1 KiB message over loopback TCP, written and read on this thread.
fn loopback() -> std::io::Result<f64> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let out = [7u8; 1024];
    let mut back = [0u8; 1024];
    let mut batches = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let t = Instant::now();
        for _ in 0..PER_BATCH {
            client.write_all(&out)?;
            server.read_exact(&mut back)?;
            server.write_all(&back)?;
            client.read_exact(&mut back)?;
        }
        batches.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(PER_BATCH));
    }
    Ok(median(&mut batches))
}

/// Median time of a dependent load at random in 32 MiB: each slot holds the next slot of a
/// full-period linear congruential sequence (`a·i + c mod 2^k`, `c` odd and `a ≡ 1 mod 4`:
/// one cycle through every slot), so each load's address comes from the one before and jumps
/// far. Filling it is one cheap pass, also in a debug build (the smoke tests run the probe).
fn memory() -> f64 {
    const SLOTS: u32 = 8 << 20;
    const LOADS: u32 = 200_000;
    const A: u32 = 1_664_525;
    const C: u32 = 1_013_904_223;
    let next: Vec<u32> = (0..SLOTS)
        .map(|i| i.wrapping_mul(A).wrapping_add(C) & (SLOTS - 1))
        .collect();
    let mut at = 0u32;
    let mut batches: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..LOADS {
                at = next[at as usize];
            }
            t.elapsed().as_secs_f64() * 1e9 / f64::from(LOADS)
        })
        .collect();
    std::hint::black_box(at);
    median(&mut batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_times_real_work() {
        let p = probe();
        assert!(p.codec_us > 0.0 && p.codec_us.is_finite(), "{p:?}");
        let loopback = p.loopback_us.expect("a loopback connection");
        assert!(loopback > 0.0 && loopback.is_finite(), "{p:?}");
        assert!(p.memory_ns > 0.0 && p.memory_ns.is_finite(), "{p:?}");
    }
}
