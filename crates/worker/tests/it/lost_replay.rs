//! Tasks that died with the previous process are reported `lost` until the coordinator has the
//! replay of what that process sent (docs/PROTOCOL.md, section 7): a coordinator restarted
//! before the replay was through forgot that it held those tasks for it, and learns of them
//! again at the next registration. Forgotten at the first registration's ack, they were not
//! reported again, and that coordinator sent the dead attempt back as if it still ran. Real
//! time and a real state directory; the coordinator is scripted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tether_proto::msg::{CoordMsg, Inventory, TaskState, now};
use tether_proto::{Attempt, Seq, TaskId, TaskRef, WorkerId, WorkerMsg, decode_worker, encode};
use tether_worker::connector::{ConnectError, Connector, WsStream};
use tether_worker::outbox::{Class, Journal, Put};
use tether_worker::statedir::StateDir;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::fake::{Running, next_connection, piped, registration_ack, until, welcome};

const LOST: &str = "t-dead";

/// A coordinator that, on its first connection, acknowledges the registration and nothing
/// else, and closes once the replay's message came (it restarts before storing it); on the
/// second it acknowledges that message and closes; on later ones it acknowledges everything.
/// Records each registration's inventory, and each
/// message acknowledged.
#[derive(Clone, Default)]
struct Coordinator {
    connections: Arc<Mutex<usize>>,
    inventories: Arc<Mutex<Vec<Inventory>>>,
    acked: Arc<Mutex<Vec<Seq>>>,
}

impl Connector for Coordinator {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        let conn = next_connection(&self.connections);
        let coord = self.clone();
        piped(url, config, move |io| serve(coord, conn, io))
    }
}

async fn serve(coord: Coordinator, conn: usize, io: tokio::io::DuplexStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(io).await else {
        return;
    };
    let send = |m: CoordMsg| Message::text(encode(&m));
    let session = conn as u64 + 1;
    if ws.send(send(welcome(session, 5000, 15000))).await.is_err() {
        return;
    }
    let mut registered = false;
    while let Some(Ok(m)) = ws.next().await {
        let Message::Text(t) = m else { continue };
        let Ok(msg) = decode_worker(t.as_str()) else {
            continue;
        };
        let reply = match msg {
            WorkerMsg::Registration(r) if !registered => {
                registered = true;
                coord.inventories.lock().expect("lock").push(r.inventory);
                CoordMsg::RegistrationAck(registration_ack(session))
            }
            WorkerMsg::Heartbeat(h) => {
                CoordMsg::Heartbeat(tether_proto::msg::HeartbeatReply::answering(h.sequence))
            }
            WorkerMsg::TaskState(_) if conn == 0 => {
                // The replay's message came; the coordinator goes before it is stored.
                let _ = ws.close(None).await;
                return;
            }
            WorkerMsg::TaskState(s) => {
                coord.acked.lock().expect("lock").push(s.seq);
                CoordMsg::TaskStateAck(tether_proto::msg::Ack {
                    ack_seq: s.seq,
                    task_id: None,
                    checkpoint_id: None,
                    chunk: None,
                    disposition: tether_proto::msg::Disposition::Recorded,
                    reason: None,
                    timestamp: now(),
                })
            }
            _ => continue,
        };
        let state_acked = matches!(reply, CoordMsg::TaskStateAck(_));
        if ws.send(send(reply)).await.is_err() {
            return;
        }
        if state_acked && conn == 1 {
            // Restarted again, now that it stored the state: the next registration shows
            // what the worker reports once the replay is through.
            let _ = ws.close(None).await;
            return;
        }
    }
}

/// The previous process ran `t-dead` at attempt 1 and sent a state of it, unacknowledged,
/// when it died. The restarted worker reports the attempt lost, with the replay through that
/// state, at every registration until the state is acknowledged: the first coordinator went
/// before it stored the state, so the second registration reports it again. Once the state is
/// acknowledged the attempt is no longer reported, here or on disk.
#[tokio::test]
async fn tasks_lost_are_reported_until_the_replay_through_them_is_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = WorkerId::parse("w").expect("id");
    let task = TaskId::parse(LOST).expect("id");
    let dead = TaskRef::new(task.clone(), Attempt(1));
    let state_seq = Seq(7);
    {
        let (sd, _) = StateDir::open(dir.path(), &id).expect("open");
        sd.task_started(&task, Attempt(1)).expect("start");
        let state = WorkerMsg::TaskState(TaskState {
            seq: state_seq,
            task_id: task.clone(),
            attempt: Attempt(1),
            state: serde_json::json!({"step": 3}).into(),
            timestamp: now(),
        });
        sd.write(Some(Put::new(Class::State, state_seq, &state)), &[])
            .expect("journal");
    }
    let coord = Coordinator::default();
    let mut cfg = tether_worker::WorkerConfig::new("ws://coordinator.invalid:1", id.clone());
    cfg.state_dir = Some(dir.path().to_owned());
    cfg.backoff.initial = Duration::from_millis(10);
    cfg.backoff.max = Duration::from_millis(100);
    let agent = tether_worker::Agent::with_transport(
        cfg,
        tether_worker::Executors::builtin(),
        coord.clone(),
    )
    .expect("valid config");
    assert_eq!(agent.lost(), std::slice::from_ref(&dead));
    let running = Running::start_agent(agent);
    until("three registrations", Duration::from_secs(20), || {
        coord.inventories.lock().expect("lock").len() >= 3
    })
    .await;
    running.stop().await;
    let inventories = coord.inventories.lock().expect("lock").clone();
    for (i, inv) in inventories[..2].iter().enumerate() {
        assert_eq!(
            (&inv.lost[..], inv.replay_through),
            (std::slice::from_ref(&dead), Some(state_seq)),
            "registration {i}: the dead attempt reported lost, the replay through its state"
        );
    }
    assert_eq!(*coord.acked.lock().expect("lock"), [state_seq]);
    assert_eq!(
        (&inventories[2].lost[..], inventories[2].replay_through),
        (&[][..], None),
        "registration 2, after the state was acknowledged"
    );
    let (_sd, restored) = StateDir::open(dir.path(), &id).expect("reopen");
    assert_eq!(restored.lost, [], "forgotten on disk too");
}
