//! Latency probes: a few extra protocol clients that register like workers (without executors,
//! so nothing is assigned to them) and send telemetry one message at a time, timing each until
//! its `telemetry_ack`. The ack leaves the coordinator only after the message was committed,
//! so the round trip measures the coordinator's message path under the load of the run.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tether_proto::msg::{
    CoordMsg, Inventory, PROTOCOL_VERSION, Registration, Telemetry, WorkerMsg, now,
};
use tether_proto::task::ConnStats;
use tether_proto::{Seq, WorkerId, decode_coord, encode};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Runs `probes` clients, each sending `rate` messages per second, until `until`. Returns every
/// round trip in ms.
pub async fn run(base: String, probes: u32, rate: u32, until: Instant) -> anyhow::Result<Vec<f64>> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..probes {
        set.spawn(probe(base.clone(), i, rate.max(1), until));
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.context("probe task")??);
    }
    Ok(all)
}

async fn probe(base: String, i: u32, rate: u32, until: Instant) -> anyhow::Result<Vec<f64>> {
    let id = WorkerId::parse(&format!("probe-{i}"))?;
    let url = tether_proto::endpoint::derive_endpoint(&base, &id)?;
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("probe connect")?;
    let reg = WorkerMsg::Registration(Registration {
        worker_id: id.clone(),
        protocol_version: PROTOCOL_VERSION,
        boot_id: format!("probe-{i}-{}", std::process::id()),
        capabilities: Vec::new(),
        tags: Default::default(),
        slots: 1,
        executors: Vec::new(),
        inventory: Inventory::default(),
        signature: None,
        compression: Vec::new(),
        client_nonce: None,
        batching: false,
        timestamp: now(),
    });
    ws.send(Message::Text(encode(&reg).into())).await?;
    wait_for(&mut ws, |m| matches!(m, CoordMsg::RegistrationAck(_))).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    let mut seq = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        seq += 1;
        let msg = WorkerMsg::Telemetry(Telemetry {
            seq: Seq(seq),
            connection_stats: ConnStats::default(),
            metrics: serde_json::Value::Null,
            timestamp: now(),
        });
        let sent = Instant::now();
        ws.send(Message::Text(encode(&msg).into())).await?;
        wait_for(
            &mut ws,
            |m| matches!(m, CoordMsg::TelemetryAck(a) if a.ack_seq == Seq(seq)),
        )
        .await?;
        out.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = ws.close(None).await;
    Ok(out)
}

async fn wait_for<S>(ws: &mut S, f: impl Fn(&CoordMsg) -> bool) -> anyhow::Result<()>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("probe: no answer within 30 s")?;
        match frame {
            Some(Ok(Message::Text(t))) => {
                if let Ok(m) = decode_coord(t.as_str())
                    && f(&m)
                {
                    return Ok(());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("probe read: {e}"),
            None => bail!("probe: the coordinator closed the connection"),
        }
    }
}
