//! Checkpoint pieces in the outbox journal, by reference.
//!
//! A `checkpoint_data` entry pushed with where its bytes lie in its checkpoint
//! ([`crate::outbox::Outbox::push_piece`]) is journaled as that place (task, checkpoint, chunk,
//! offset, length), a few hundred bytes, not with its bytes: `checkpoints.db` holds them
//! already, and the journal is written on the runtime under the outbox's lock, which the
//! session needs for every send and ack. Journaled whole, a checkpoint of 64 MiB wrote 85 MiB of
//! base64 into `worker.db` there, 341 KiB an insert, with the WAL's syncs inline.
//!
//! At a start each is rebuilt from the checkpoint `checkpoints.db` holds for its task, read
//! once a task. One whose checkpoint is no longer held there (a newer checkpoint of the task
//! replaced it, its attempt ended and its checkpoints went, its store failed, or it was never
//! stored here: a re-upload of the coordinator's own) cannot be: it leaves the journal with
//! the other pieces of its upload and the upload's announcement, if still held. The coordinator
//! completes no upload it is not sent whole; it deletes an incomplete one when the attempt's
//! lease ends, and that happens at the new process's registration anyway (the attempt is
//! reported lost, or its result is replayed ahead of its pieces), after which a piece would
//! only come back `stale`. The task's newer checkpoint, if any, has an upload of its own.
//!
//! Pieces journaled whole (by a worker before this one) are read as any entry. A worker
//! before this one does not decode a piece by reference, and sets it aside (`discarded`), as
//! any entry it cannot read: it never sends a piece without its bytes.

use rusqlite::Connection;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tether_proto::msg::{CheckpointData, WorkerMsg};
use tether_proto::task::Blob;
use tether_proto::{Attempt, CheckpointId, Seq, TaskId};

use super::StateDirError;
use crate::outbox::Class;

/// How a journaled piece by reference starts (its `type` is serialized first): told apart from
/// a message without parsing it.
const PREFIX: &str = r#"{"type":"checkpoint_data_ref","#;
const TYPE: &str = "checkpoint_data_ref";

/// A journaled checkpoint piece, without its bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct PieceRef {
    #[serde(rename = "type")]
    ty: String,
    pub(super) seq: Seq,
    task_id: TaskId,
    attempt: Attempt,
    checkpoint_id: CheckpointId,
    chunk: u32,
    offset: u64,
    len: u64,
    #[serde(with = "tether_proto::time")]
    timestamp: chrono::DateTime<chrono::Utc>,
}

/// The journal text of `msg`, a piece at `offset` of its checkpoint, by reference; `None` if
/// it is no piece.
pub(super) fn encode(msg: &WorkerMsg, offset: u64) -> Option<Result<String, serde_json::Error>> {
    let WorkerMsg::CheckpointData(d) = msg else {
        return None;
    };
    let piece = PieceRef {
        ty: TYPE.to_owned(),
        seq: d.seq,
        task_id: d.task_id.clone(),
        attempt: d.attempt,
        checkpoint_id: d.checkpoint_id.clone(),
        chunk: d.chunk,
        offset,
        len: d.data.0.len() as u64,
        timestamp: d.timestamp,
    };
    Some(serde_json::to_string(&piece))
}

/// The piece by reference journaled as `json`, if it is one.
pub(super) fn decode(json: &str) -> Option<PieceRef> {
    if !json.starts_with(PREFIX) {
        return None;
    }
    serde_json::from_str::<PieceRef>(json)
        .ok()
        .filter(|p| p.ty == TYPE)
}

/// Rebuilds the journaled `pieces` from the checkpoints `cp` (at `cp_path`) holds, into
/// `entries` (kept in sequence order). The pieces of an upload whose checkpoint is no longer
/// held, and the upload's announcement among `entries`, are left out: their sequence numbers
/// are returned, for the caller to delete from the journal.
pub(super) fn rebuild(
    cp: &Connection,
    cp_path: &Path,
    pieces: Vec<(Class, PieceRef)>,
    entries: &mut Vec<(Class, WorkerMsg)>,
) -> Result<Vec<Seq>, StateDirError> {
    if pieces.is_empty() {
        return Ok(Vec::new());
    }
    // By upload: a checkpoint is read once (and only when it is the one kept), for all its
    // pieces.
    let mut uploads: BTreeMap<(TaskId, CheckpointId), Vec<(Class, PieceRef)>> = BTreeMap::new();
    for (class, p) in pieces {
        let key = (p.task_id.clone(), p.checkpoint_id.clone());
        uploads.entry(key).or_default().push((class, p));
    }
    let mut gone = BTreeSet::new();
    let mut dropped = Vec::new();
    for ((task, id), pieces) in uploads {
        let kept = match super::checkpoints::describe(cp, &task, cp_path)? {
            Some(kept) if kept.id == id => super::checkpoints::read(cp, &task, cp_path)?,
            _ => None,
        };
        let data = kept.filter(|c| c.id == id).map(|c| c.data);
        let bytes: Option<Vec<Vec<u8>>> = pieces
            .iter()
            .map(|(_, p)| {
                let start = usize::try_from(p.offset).ok()?;
                let end = start.checked_add(usize::try_from(p.len).ok()?)?;
                data.as_ref()?.get(start..end).map(<[u8]>::to_vec)
            })
            .collect();
        let Some(bytes) = bytes else {
            dropped.extend(pieces.iter().map(|(_, p)| p.seq));
            gone.insert((task, id));
            continue;
        };
        for ((class, p), bytes) in pieces.into_iter().zip(bytes) {
            let piece = WorkerMsg::CheckpointData(CheckpointData {
                seq: p.seq,
                task_id: p.task_id,
                attempt: p.attempt,
                checkpoint_id: p.checkpoint_id,
                chunk: p.chunk,
                data: Blob(bytes),
                timestamp: p.timestamp,
            });
            entries.push((class, piece));
        }
    }
    // The announcements of the uploads dropped: alone, each would leave an upload that never
    // completes at the coordinator.
    entries.retain(|(_, msg)| match msg {
        WorkerMsg::Checkpoint(c)
            if gone.contains(&(c.task_id.clone(), c.checkpoint_id.clone())) =>
        {
            dropped.push(c.seq);
            false
        }
        _ => true,
    });
    entries.sort_by_key(|(_, msg)| msg.seq());
    if !gone.is_empty() {
        let uploads: Vec<String> = gone.iter().map(|(t, c)| format!("{t}/{c}")).collect();
        tracing::warn!(
            ?uploads,
            entries = dropped.len(),
            "journaled checkpoint uploads dropped: their checkpoints are no longer kept here (replaced by a newer one, or their attempt ended); the coordinator deletes an upload left incomplete when its attempt's lease ends"
        );
    }
    dropped.sort_unstable();
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::{StoredCheckpoint, upload_checkpoint};
    use crate::outbox::{Journal, Limits, Outbox, Put};
    use crate::statedir::StateDir;
    use std::sync::Arc;
    use tether_proto::WorkerId;

    const PIECE: usize = 256 * 1024;

    fn tid(s: &str) -> TaskId {
        TaskId::parse(s).expect("id")
    }

    fn open(dir: &Path) -> (Arc<StateDir>, super::super::Restored) {
        StateDir::open(dir, &WorkerId::parse("w").expect("id")).expect("open")
    }

    /// A checkpoint of `len` bytes that differ from piece to piece, stored for `task` (running
    /// at attempt 1).
    fn stored(sd: &StateDir, task: &str, len: usize) -> StoredCheckpoint {
        let data: Vec<u8> = (0..len).map(|i| (i / 997 % 251) as u8).collect();
        let cp = StoredCheckpoint {
            id: CheckpointId::random(),
            attempt: Attempt(1),
            data: Arc::new(data),
            piece: PIECE,
        };
        sd.task_started(&tid(task), Attempt(1)).expect("start");
        sd.store_checkpoint(&tid(task), &cp).expect("store");
        cp
    }

    /// What the journal holds: its rows and the bytes of their text.
    fn journal_size(sd: &StateDir) -> (i64, i64) {
        sd.conn()
            .query_row(
                "SELECT count(*), coalesce(sum(length(msg)), 0) FROM outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("journal")
    }

    /// A checkpoint of 16 MiB uploaded in pieces of 256 KiB with the state directory as the
    /// outbox's journal: its 65 entries take a few KiB of `worker.db`, written under the
    /// outbox's lock, not 21 MiB of base64 (the bytes are in `checkpoints.db` already).
    #[tokio::test]
    async fn a_checkpoints_pieces_are_journaled_by_reference_not_with_their_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sd, _) = open(dir.path());
        let outbox = Outbox::new(Limits::default()).with_journal(sd.clone());
        let cp = stored(&sd, "t", 16 << 20);
        upload_checkpoint(&outbox, &tid("t"), &cp, PIECE, u64::MAX).await;
        assert_eq!(outbox.len(), 65, "an announcement and 64 pieces");
        let (rows, bytes) = journal_size(&sd);
        assert_eq!(rows, 65);
        assert!(bytes < 32 * 1024, "{bytes} bytes journaled");
    }

    /// A worker restarted with pieces journaled by reference replays them with their bytes,
    /// read from the checkpoint kept, and not those acknowledged. The upload of a checkpoint
    /// no longer kept (a newer one of its task replaced it) leaves the journal whole, its
    /// announcement with it; a piece journaled whole (by the worker before this one) is
    /// replayed as it is.
    #[tokio::test]
    async fn pieces_journaled_by_reference_are_replayed_with_their_bytes_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (kept, newer, whole) = {
            let (sd, _) = open(dir.path());
            let outbox = Outbox::new(Limits::default()).with_journal(sd.clone());
            let kept = stored(&sd, "t", 3 * PIECE + 100);
            upload_checkpoint(&outbox, &tid("t"), &kept, PIECE, u64::MAX).await;
            let replaced = stored(&sd, "u", 2 * PIECE);
            // Queued, then replaced in checkpoints.db by the next before it was sent.
            upload_checkpoint(&outbox, &tid("u"), &replaced, PIECE, u64::MAX).await;
            let newer = stored(&sd, "u", 10);
            upload_checkpoint(&outbox, &tid("u"), &newer, PIECE, u64::MAX).await;
            // The announcement and the first piece of the kept one were acknowledged.
            let acked: Vec<Seq> = outbox
                .snapshot()
                .iter()
                .map(|(_, s, _)| *s)
                .take(2)
                .collect();
            assert_eq!(outbox.take_acked_all(acked).len(), 2);
            // As the worker before this one journaled a piece: whole.
            let whole = WorkerMsg::CheckpointData(CheckpointData {
                seq: Seq(outbox.last_seq().0 + 1),
                task_id: tid("v"),
                attempt: Attempt(1),
                checkpoint_id: CheckpointId::random(),
                chunk: 0,
                data: Blob(b"whole".to_vec()),
                timestamp: tether_proto::msg::now(),
            });
            sd.write(
                Some(Put::new(Class::State, whole.seq().expect("seq"), &whole)),
                &[],
            )
            .expect("write");
            (kept, newer, whole)
        };
        let (sd, restored) = open(dir.path());
        let pieces: Vec<(String, CheckpointId, u32, Vec<u8>)> = restored
            .entries
            .iter()
            .filter_map(|(_, m)| match m {
                WorkerMsg::CheckpointData(d) => Some((
                    d.task_id.to_string(),
                    d.checkpoint_id.clone(),
                    d.chunk,
                    d.data.0.clone(),
                )),
                _ => None,
            })
            .collect();
        let bytes = |cp: &StoredCheckpoint, chunk: usize| {
            cp.data[chunk * PIECE..cp.data.len().min((chunk + 1) * PIECE)].to_vec()
        };
        let want = vec![
            ("t".to_owned(), kept.id.clone(), 1, bytes(&kept, 1)),
            ("t".to_owned(), kept.id.clone(), 2, bytes(&kept, 2)),
            ("t".to_owned(), kept.id.clone(), 3, bytes(&kept, 3)),
            ("u".to_owned(), newer.id.clone(), 0, bytes(&newer, 0)),
            ("v".to_owned(), whole_id(&whole), 0, b"whole".to_vec()),
        ];
        assert!(
            pieces == want,
            "{:?}",
            pieces
                .iter()
                .map(|p| (&p.0, p.2, p.3.len()))
                .collect::<Vec<_>>()
        );
        let announced: Vec<&CheckpointId> = restored
            .entries
            .iter()
            .filter_map(|(_, m)| match m {
                WorkerMsg::Checkpoint(c) => Some(&c.checkpoint_id),
                _ => None,
            })
            .collect();
        assert_eq!(
            announced,
            [&newer.id],
            "not the replaced one's, nor the acknowledged"
        );
        let seqs: Vec<Option<Seq>> = restored.entries.iter().map(|(_, m)| m.seq()).collect();
        assert!(seqs.is_sorted(), "in sequence order: {seqs:?}");
        // What was dropped left the journal; the rest stays, as before.
        assert_eq!(journal_size(&sd).0, 6);
        drop(sd);
        let (_sd, again) = open(dir.path());
        assert_eq!(again.entries, restored.entries);
    }

    /// The pieces of an attempt whose result the coordinator acknowledged leave the journal
    /// with the outbox ([`Outbox::settle_attempt`]), those not sent and the one in flight:
    /// a restarted worker sends none of them (the coordinator would store none). Another
    /// task's upload is replayed whole.
    #[tokio::test]
    async fn an_attempts_pieces_dropped_once_its_result_is_acknowledged_are_not_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (done, other) = {
            let (sd, _) = open(dir.path());
            let outbox = Outbox::new(Limits::default()).with_journal(sd.clone());
            let done = stored(&sd, "done", 3 * PIECE);
            upload_checkpoint(&outbox, &tid("done"), &done, PIECE, u64::MAX).await;
            let other = stored(&sd, "other", 2 * PIECE);
            upload_checkpoint(&outbox, &tid("other"), &other, PIECE, u64::MAX).await;
            // The announcement and first piece of done's upload are in flight.
            assert_eq!(outbox.take_unsent(2).len(), 2);
            assert_eq!(outbox.settle_attempt(&tid("done"), Attempt(1)), 4);
            (done, other)
        };
        let (_sd, restored) = open(dir.path());
        let replayed: Vec<(String, CheckpointId, Option<u32>)> = restored
            .entries
            .iter()
            .map(|(_, m)| match m {
                WorkerMsg::Checkpoint(c) => (c.task_id.to_string(), c.checkpoint_id.clone(), None),
                WorkerMsg::CheckpointData(d) => (
                    d.task_id.to_string(),
                    d.checkpoint_id.clone(),
                    Some(d.chunk),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        let of_other = |chunk| ("other".to_owned(), other.id.clone(), chunk);
        assert_eq!(
            replayed,
            [of_other(None), of_other(Some(0)), of_other(Some(1))],
            "nothing of {}",
            done.id
        );
    }

    fn whole_id(msg: &WorkerMsg) -> CheckpointId {
        match msg {
            WorkerMsg::CheckpointData(d) => d.checkpoint_id.clone(),
            other => panic!("{other:?}"),
        }
    }
}
