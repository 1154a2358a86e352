//! One sample of every message variant, for conformance tests on both ends and in docs.

use crate::ids::{Attempt, CheckpointId, Seq, TaskId, WorkerId};
use crate::msg::*;
use crate::task::{Blob, ConnStats, Outcome, TaskError, TaskRef};

fn task() -> TaskId {
    TaskId::parse("t-sample").expect("valid")
}

fn ckpt() -> CheckpointId {
    CheckpointId::parse("c-sample").expect("valid")
}

fn worker() -> WorkerId {
    WorkerId::parse("worker-sample").expect("valid")
}

/// One of each [`WorkerMsg`] variant, in declaration order.
pub fn worker_messages() -> Vec<WorkerMsg> {
    let ts = now();
    let r = TaskRef::new(task(), Attempt(2));
    let notice = TaskNotice {
        seq: Seq(9),
        task_id: task(),
        attempt: Attempt(2),
        timestamp: ts,
    };
    vec![
        WorkerMsg::Registration(Registration {
            worker_id: worker(),
            protocol_version: PROTOCOL_VERSION,
            boot_id: "b-1".into(),
            capabilities: vec!["cpu".into()],
            tags: [("os".to_string(), "linux".to_string())].into(),
            slots: 2,
            executors: vec!["command".into(), "sleep".into()],
            inventory: Inventory {
                running: vec![r.clone()],
                finished: vec![],
                lost: vec![],
                acked_seq: Seq(4),
                replay_through: Some(Seq(6)),
            },
            signature: Some("0".repeat(64)),
            compression: vec![crate::compress::ZSTD.into()],
            client_nonce: Some("cd".repeat(32)),
            batching: true,
            compact_acks: true,
            max_frame: Some(16 * 1024 * 1024),
            checkpoint_fetch: true,
            heartbeat_timeout_ms: Some(15_000),
            timestamp: ts,
        }),
        WorkerMsg::Heartbeat(Heartbeat {
            sequence: 3,
            active_tasks: vec![r],
            timestamp: ts,
        }),
        WorkerMsg::TaskResult(TaskResult {
            seq: Seq(5),
            task_id: task(),
            attempt: Attempt(2),
            outcome: Outcome::Failed,
            result: serde_json::json!({"exit_code": 1}).into(),
            error: Some(TaskError {
                message: "exit status 1".into(),
                detail: None,
            }),
            worker_fault: false,
            started_at: ts,
            finished_at: ts,
            duration_ms: 12,
            timestamp: ts,
        }),
        WorkerMsg::TaskState(TaskState {
            seq: Seq(6),
            task_id: task(),
            attempt: Attempt(2),
            state: serde_json::json!({"progress": 50.0}).into(),
            timestamp: ts,
        }),
        WorkerMsg::Checkpoint(Checkpoint {
            seq: Seq(7),
            task_id: task(),
            attempt: Attempt(2),
            checkpoint_id: ckpt(),
            size: 3,
            chunks: 1,
            timestamp: ts,
        }),
        WorkerMsg::CheckpointData(CheckpointData {
            seq: Seq(8),
            task_id: task(),
            attempt: Attempt(2),
            checkpoint_id: ckpt(),
            chunk: 0,
            data: Blob(vec![1, 2, 3]),
            timestamp: ts,
        }),
        WorkerMsg::CheckpointError(CheckpointError {
            task_id: task(),
            checkpoint_id: None,
            error: "no checkpoint".into(),
            timestamp: ts,
        }),
        WorkerMsg::CheckpointFetch(CheckpointFetch {
            seq: Seq(10),
            task_id: task(),
            attempt: Attempt(3),
            checkpoint_id: ckpt(),
            offset: 1_048_576,
            len: 1_048_576,
            timestamp: ts,
        }),
        WorkerMsg::StateError(StateError {
            task_id: Some(task()),
            error: "unknown task".into(),
            timestamp: ts,
        }),
        WorkerMsg::TaskCancelled(notice.clone()),
        WorkerMsg::TaskPaused(notice.clone()),
        WorkerMsg::TaskResumed(notice),
        WorkerMsg::Telemetry(Telemetry {
            seq: Seq(10),
            connection_stats: ConnStats {
                state: "connected".into(),
                stability: 1.0,
                success_rate: 1.0,
                ..ConnStats::default()
            },
            metrics: serde_json::json!({}).into(),
            timestamp: ts,
        }),
        WorkerMsg::WorkerStopping(StopNotice { timestamp: ts }),
        WorkerMsg::WorkerStopped(StopNotice { timestamp: ts }),
        WorkerMsg::Error(ErrorMsg {
            code: ErrorCode::UnknownType,
            message: "unknown".into(),
            offending_type: Some("x".into()),
            ref_seq: None,
            timestamp: ts,
        }),
    ]
}

/// One of each [`CoordMsg`] variant, in declaration order.
pub fn coord_messages() -> Vec<CoordMsg> {
    let ts = now();
    let ack = Ack {
        ack_seq: Seq(5),
        task_id: Some(task()),
        checkpoint_id: None,
        chunk: None,
        disposition: Disposition::Recorded,
        reason: None,
        timestamp: ts,
    };
    let control = TaskControl {
        task_id: task(),
        attempt: Attempt(2),
        reason: String::new(),
        timestamp: ts,
    };
    vec![
        CoordMsg::Welcome(Welcome {
            worker_id: worker(),
            protocol_version: PROTOCOL_VERSION,
            session_id: 1,
            heartbeat_interval_ms: 5000,
            heartbeat_timeout_ms: 15000,
            nonce: Some("ab".repeat(32)),
            integrity: Some(crate::integrity::HMAC_SHA256.into()),
            timestamp: ts,
        }),
        CoordMsg::RegistrationAck(RegistrationAck {
            worker_id: worker(),
            session_id: 1,
            directives: vec![Directive {
                task_id: task(),
                attempt: Attempt(2),
                action: DirectiveAction::Continue,
                reason: String::new(),
            }],
            compression: Some(crate::compress::ZSTD.into()),
            batching: Some(Batching {
                max_messages: 256,
                max_bytes: 65_536,
            }),
            compact_acks: true,
            max_frame: Some(16 * 1024 * 1024),
            max_checkpoint: Some(64 * 1024 * 1024),
            message_rate: Some(Rate {
                per_sec: 2000.0,
                burst: 4000,
            }),
            byte_rate: Some(Rate {
                per_sec: 67_108_864.0,
                burst: 268_435_456,
            }),
            lost_after_ms: Some(60_000),
            timestamp: ts,
        }),
        CoordMsg::Heartbeat(HeartbeatReply {
            response_to: Some(3),
            actions: vec![HeartbeatAction::SyncState],
            heartbeat_interval_ms: Some(10_000),
            heartbeat_timeout_ms: Some(30_000),
            draining: true,
            timestamp: ts,
        }),
        CoordMsg::TaskAssignment(TaskAssignment {
            task_id: task(),
            attempt: Attempt(2),
            kind: "sleep".into(),
            config: serde_json::json!({"ms": 10}).into(),
            timeout_ms: Some(1000),
            checkpoint: Some(CheckpointBlob {
                checkpoint_id: ckpt(),
                attempt: Attempt(1),
                data: Some(Blob(b"{}".to_vec())),
                size: None,
            }),
            attempt_base: None,
            submit_seq: None,
            timestamp: ts,
        }),
        CoordMsg::TaskResultAck(Ack {
            disposition: Disposition::Stale,
            reason: Some("the task was cancelled".into()),
            ..ack.clone()
        }),
        CoordMsg::TaskStateAck(ack.clone()),
        CoordMsg::CheckpointAck(Ack {
            checkpoint_id: Some(ckpt()),
            ..ack.clone()
        }),
        CoordMsg::CheckpointDataAck(Ack {
            checkpoint_id: Some(ckpt()),
            chunk: Some(0),
            ..ack.clone()
        }),
        CoordMsg::TaskCancelledAck(ack.clone()),
        CoordMsg::TaskPausedAck(ack.clone()),
        CoordMsg::TaskResumedAck(ack.clone()),
        CoordMsg::TelemetryAck(Ack {
            task_id: None,
            ..ack
        }),
        CoordMsg::Acks(Acks {
            recorded: vec![(Seq(7), Seq(9)), (Seq(12), Seq(12))],
            timestamp: ts,
        }),
        CoordMsg::CheckpointRequest(CheckpointRequest {
            task_id: task(),
            attempt: Attempt(2),
            checkpoint_id: None,
            timestamp: ts,
        }),
        CoordMsg::CheckpointPiece(CheckpointPiece {
            ack_seq: Seq(10),
            task_id: task(),
            checkpoint_id: ckpt(),
            offset: 1_048_576,
            data: Some(Blob(vec![4, 5, 6])),
            error: None,
            code: None,
            timestamp: ts,
        }),
        CoordMsg::StateRequest(StateRequest {
            task_id: Some(task()),
            timestamp: ts,
        }),
        CoordMsg::CancelTask(control.clone()),
        CoordMsg::PauseTask(control.clone()),
        CoordMsg::ResumeTask(control),
        CoordMsg::error(ErrorCode::BadFrame, "bad", None, Some(1)),
    ]
}
