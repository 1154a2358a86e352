//! Latency probes: a few extra protocol clients that register like workers (without executors,
//! so nothing is assigned to them) and send telemetry one message at a time, timing each until
//! its `telemetry_ack`. The ack leaves the coordinator behind every acknowledgement queued before
//! it, so while the store has commits in hand (as under load) it waits for them as a state
//! update's ack does; when the store has nothing unfinished it leaves at once (the statistics
//! themselves are saved at most every few minutes). The round trip measures the coordinator's
//! message path under the load of the run. They authenticate and tag their frames like the
//! workers when the run does.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tether_proto::auth::{Challenge, NONCE_BYTES, Secret, to_hex};
use tether_proto::integrity::{Direction, Opener, Sealer, SessionKey};
use tether_proto::msg::{
    CoordMsg, Inventory, PROTOCOL_VERSION, Registration, Telemetry, WorkerMsg, now,
};
use tether_proto::task::ConnStats;
use tether_proto::{Seq, WorkerId, decode_coord, encode};
use tether_worker::config::DEFAULT_MAX_FRAME;
use tether_worker::connector::{Connector, TcpConnector, WsStream, ws_config};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Runs `probes` clients, each sending `rate` messages per second, until `until`. Returns every
/// round trip in ms. With a `secret` they authenticate, and tag their frames when the
/// coordinator asks for integrity, as workers do.
pub async fn run(
    base: String,
    probes: u32,
    rate: u32,
    secret: Option<Secret>,
    tls: Option<Arc<rustls::ClientConfig>>,
    until: Instant,
) -> anyhow::Result<Vec<f64>> {
    let connector = match tls {
        Some(config) => TcpConnector::with_tls(config),
        None => TcpConnector::default(),
    };
    let mut set = tokio::task::JoinSet::new();
    let rate = rate.max(1);
    // The probes' ticks are spread evenly over the period: in step, they would all time the
    // same instants (and queue behind each other), so p99 would rest on a quarter of the
    // moments.
    let clock = Clock {
        epoch: Instant::now(),
        period: Duration::from_secs(1) / rate,
        probes: probes.max(1),
    };
    for i in 0..probes {
        let c = connector.clone();
        set.spawn(probe(c, base.clone(), i, clock, secret.clone(), until));
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.context("probe task")??);
    }
    Ok(all)
}

/// A probe's connection: tags what it sends and checks what it receives once keyed.
struct Link {
    ws: WsStream,
    seal: Option<Sealer>,
    open: Option<Opener>,
}

impl Link {
    async fn send(&mut self, msg: &WorkerMsg) -> anyhow::Result<()> {
        let mut text = encode(msg);
        if let Some(s) = &mut self.seal {
            text = s.seal_text(text);
        }
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// Waits (at most 30 s) for a message that `f` accepts; others are skipped.
    async fn wait_for(&mut self, f: impl Fn(&CoordMsg) -> bool) -> anyhow::Result<CoordMsg> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("probe: no answer within 30 s")?;
            let text = match frame {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("probe read: {e}"),
                None => bail!("probe: the coordinator closed the connection"),
            };
            let body = match &mut self.open {
                Some(o) => o.open_text(text.as_str()).map_err(|e| {
                    anyhow::anyhow!("probe: a frame failed its integrity tag: {e:?}")
                })?,
                None => text.as_str(),
            };
            if let Ok(m) = decode_coord(body)
                && f(&m)
            {
                return Ok(m);
            }
        }
    }
}

/// The probes' shared clock: probe `i` ticks at `epoch + period * (k + i / probes)`.
#[derive(Clone, Copy)]
struct Clock {
    epoch: Instant,
    period: Duration,
    probes: u32,
}

impl Clock {
    /// Probe `i`'s first tick at or after `now`.
    fn first_tick(&self, i: u32, now: Instant) -> Instant {
        let phase = self.epoch + self.period * (i % self.probes) / self.probes;
        let behind = now.saturating_duration_since(phase);
        let periods = behind.as_nanos().div_ceil(self.period.as_nanos().max(1));
        phase + self.period * u32::try_from(periods).unwrap_or(u32::MAX)
    }
}

async fn probe(
    connector: TcpConnector,
    base: String,
    i: u32,
    clock: Clock,
    secret: Option<Secret>,
    until: Instant,
) -> anyhow::Result<Vec<f64>> {
    let id = WorkerId::parse(&format!("probe-{i}"))?;
    let url = tether_proto::endpoint::derive_endpoint(&base, &id)?;
    let ws = connector
        .connect(url.to_string(), ws_config(DEFAULT_MAX_FRAME))
        .await
        .context("probe connect")?;
    let mut link = Link {
        ws,
        seal: None,
        open: None,
    };
    let CoordMsg::Welcome(welcome) = link.wait_for(|m| matches!(m, CoordMsg::Welcome(_))).await?
    else {
        bail!("probe: no welcome");
    };
    let boot_id = format!("probe-{i}-{}", std::process::id());
    let timestamp = now();
    let (signature, client_nonce) = match (&welcome.nonce, &secret) {
        (None, _) => (None, None),
        (Some(_), None) => {
            bail!("the coordinator asks probes to authenticate; the run has no secret")
        }
        (Some(nonce), Some(secret)) => {
            let signature = Challenge {
                worker: &id,
                nonce,
                timestamp,
                boot_id: &boot_id,
            }
            .sign(secret);
            let client_nonce = welcome.integrity.as_ref().map(|_| {
                let client_nonce = to_hex(&rand::random::<[u8; NONCE_BYTES]>());
                let key = SessionKey::derive(secret, &id, nonce, &client_nonce);
                link.seal = Some(Sealer::new(key.clone(), Direction::ToCoordinator));
                link.open = Some(Opener::new(key, Direction::ToWorker));
                client_nonce
            });
            (Some(signature), client_nonce)
        }
    };
    link.send(&WorkerMsg::Registration(Registration {
        worker_id: id.clone(),
        protocol_version: PROTOCOL_VERSION,
        boot_id,
        capabilities: Vec::new(),
        tags: Default::default(),
        slots: 1,
        executors: Vec::new(),
        inventory: Inventory::default(),
        signature,
        compression: Vec::new(),
        client_nonce,
        batching: false,
        // Probes time their own telemetry_ack.
        compact_acks: false,
        max_frame: None,
        checkpoint_fetch: false,
        // No liveness timeout: it waits at most 30 s for each answer, pings or not.
        heartbeat_timeout_ms: None,
        timestamp,
    }))
    .await?;
    link.wait_for(|m| matches!(m, CoordMsg::RegistrationAck(_)))
        .await?;
    let tick = tokio::time::interval_at(clock.first_tick(i, Instant::now()), clock.period);
    let out = timed(tick, until, &mut link, |link, seq| {
        Box::pin(async move {
            let msg = WorkerMsg::Telemetry(Telemetry {
                seq: Seq(seq),
                connection_stats: ConnStats::default(),
                metrics: serde_json::Value::Null.into(),
                timestamp: now(),
            });
            link.send(&msg).await?;
            link.wait_for(|m| matches!(m, CoordMsg::TelemetryAck(a) if a.ack_seq == Seq(seq)))
                .await?;
            anyhow::Ok(())
        })
    })
    .await?;
    let _ = link.ws.close(None).await;
    Ok(out)
}

/// Runs `round_trip` once for each tick of `tick` due before `until`, one at a time, and times
/// each from when its tick was due, not from when it could be sent: a round trip held up a
/// second holds up the ticks behind it, and their waits count too (at 50 a second, a stall of
/// a second is 50 slow samples, not one), as a probe that sent on time would have seen them.
/// So do those of a stall that began before `until` and ended after it: the ticks it held up
/// were due in the window, and are sent and timed once it ends.
async fn timed<L>(
    mut tick: tokio::time::Interval,
    until: Instant,
    link: &mut L,
    round_trip: for<'a> fn(
        &'a mut L,
        u64,
    ) -> futures_util::future::BoxFuture<'a, anyhow::Result<()>>,
) -> anyhow::Result<Vec<f64>> {
    // Ticks missed while a round trip was held up come at once after it, each with its time.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut out = Vec::new();
    let mut seq = 0u64;
    loop {
        let due = tick.tick().await;
        if due >= until {
            break;
        }
        seq += 1;
        round_trip(link, seq).await?;
        out.push(due.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stall_counts_for_every_tick_it_held_up_not_once() {
        // 50 round trips a second for 10 s, each taking 1 ms but for one held up a second.
        let start = Instant::now();
        let tick = tokio::time::interval_at(start, Duration::from_millis(20));
        let out = timed(tick, start + Duration::from_secs(10), &mut (), |_, seq| {
            Box::pin(async move {
                let pause = if seq == 100 { 1_000 } else { 1 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                Ok(())
            })
        })
        .await
        .expect("timed");
        let mut sorted = out.clone();
        sorted.sort_by(f64::total_cmp);
        let p99 = sorted[(sorted.len() * 99).div_ceil(100) - 1];
        // The ticks due during the stall waited for it: about 50 samples of up to a second.
        let slow = out.iter().filter(|&&ms| ms > 100.0).count();
        assert!((45..=55).contains(&slow), "{slow} slow samples");
        assert!(p99 >= 800.0, "p99 {p99} ms");
        assert!(
            sorted[sorted.len() / 2] < 5.0,
            "p50 {} ms",
            sorted[sorted.len() / 2]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_across_the_end_of_the_window_counts_for_every_tick_it_held_up_in_it() {
        // 50 round trips a second for 10 s, each taking 1 ms but for the one due at 9.78 s,
        // held up a second: to 10.78 s, past the end.
        let start = Instant::now();
        let tick = tokio::time::interval_at(start, Duration::from_millis(20));
        let out = timed(tick, start + Duration::from_secs(10), &mut (), |_, seq| {
            Box::pin(async move {
                let pause = if seq == 490 { 1_000 } else { 1 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                Ok(())
            })
        })
        .await
        .expect("timed");
        // Every tick due in the window is timed, none due after it.
        assert_eq!(out.len(), 500);
        // The stalled one and the ten due from 9.80 s to 9.98 s behind it: 800 ms and more.
        let slow = out.iter().filter(|&&ms| ms > 100.0).count();
        assert!(slow >= 10, "{slow} slow samples");
        assert_eq!(slow, 11);
        assert!(
            out[490..].iter().all(|&ms| ms >= 800.0),
            "{:?}",
            &out[490..]
        );
    }

    #[test]
    fn probes_tick_on_their_own_phase_of_a_shared_clock() {
        let epoch = Instant::now();
        let clock = Clock {
            epoch,
            period: Duration::from_millis(20),
            probes: 4,
        };
        // Before its phase, a probe waits for it; later, for its next tick on the grid.
        let at = |ms: u64| epoch + Duration::from_millis(ms);
        let firsts: Vec<_> = (0..4).map(|i| clock.first_tick(i, at(0))).collect();
        assert_eq!(firsts, vec![at(0), at(5), at(10), at(15)]);
        assert_eq!(clock.first_tick(1, at(6)), at(25));
        assert_eq!(clock.first_tick(1, at(25)), at(25));
        assert_eq!(clock.first_tick(3, at(1_000)), at(1_015));
    }
}
