//! Folding the state log into `task_state`, a bounded piece after each group commit.
//!
//! A task state is appended to `task_state_log` when it is committed (one row at the table's
//! end, instead of rewriting the task's row in place). The log is folded in rounds: a round
//! takes the tasks logged since the previous round began, writes the newest logged state of
//! each into `task_state` in task-id order, then deletes the log rows the round covers, oldest
//! first. Each piece runs in its own short transaction after a group's effects, so no commit
//! waits long behind a fold: a fold of the whole log (8,000-15,000 rows) stalled the commits
//! behind it for 9-28 ms, and folding the oldest rows in small chunks instead rewrote most pages
//! of `task_state` for each chunk. In task-id order a piece touches only the pages of the tasks it writes.
//!
//! Reading a state takes the log first, so a task whose newer states arrive during a round
//! reads right whatever the round has done. A task's deletion folds the whole log inside its
//! commit ([`compact_states`]), and so does opening the database; the folder then starts over.

use std::time::{Duration, Instant};

use rusqlite::Connection;
use tether_proto::TaskId;

/// A round begins once this long has passed since the previous one began...
pub const FOLD_EVERY: Duration = Duration::from_secs(1);
/// ...or once this many states were logged since (about 32 MiB of log at a flood's 250 bytes a
/// row). A round writes each task's newest state once, however many it logged: under a flood
/// of 8,000 tasks at 200,000 states/s a round of 32,768 rows wrote a state for every 4 rows, a
/// round of this many writes one for every 16 (the fold was 6 % of the coordinator's CPU; see
/// docs/PERFORMANCE.md). Reading the state of a task with nothing logged scans the whole log on
/// the reader's connection (about 1 ms for 30,000 rows, so up to 4 ms), which is why the log
/// is kept this short.
pub const FOLD_ROWS: usize = 131_072;
/// Work of one piece: writing a task's state counts [`UPSERT_COST`], deleting a log row one
/// (64 states written, or 1,024 rows deleted). A piece holds up the commit behind it: pieces of
/// 4,096 took 2-7 ms under a flood of 100,000 messages/s and were most of the slowest
/// acknowledgements that the WAL's start-overs were not; pieces of 1,024 take under 2 ms.
pub const PIECE_BUDGET: usize = 1024;
const UPSERT_COST: usize = 16;

/// Where the writer is in folding the log.
#[derive(Debug)]
pub(super) struct Folder {
    /// Newest logged `seq` of each task logged since the current round began.
    pending: crate::model::IdMap<TaskId, i64>,
    /// `seq` of the first state logged since the current round began.
    pending_first: Option<i64>,
    /// The highest `seq` logged.
    last: i64,
    /// States logged since the current round began.
    pending_rows: usize,
    round: Option<Round>,
    round_began: Instant,
}

#[derive(Debug)]
struct Round {
    /// The `seq` of each task's state to write, in task-id order, and how many are written.
    seqs: Vec<i64>,
    written: usize,
    /// Next log row to delete, and the last one the round covers.
    delete_from: i64,
    bound: i64,
}

/// What one piece of folding did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Piece {
    pub states_written: usize,
    pub rows_deleted: usize,
}

impl Folder {
    pub fn new() -> Self {
        Folder {
            pending: Default::default(),
            pending_first: None,
            last: 0,
            pending_rows: 0,
            round: None,
            round_began: Instant::now(),
        }
    }

    /// A state of `task` was appended to the log as row `seq`.
    pub fn logged(&mut self, task: &TaskId, seq: i64) {
        self.pending_first.get_or_insert(seq);
        self.last = seq;
        self.pending_rows += 1;
        if let Some(s) = self.pending.get_mut(task) {
            *s = seq;
        } else {
            self.pending.insert(task.clone(), seq);
        }
    }

    /// The whole log was folded (a task's deletion, inside a commit): nothing is pending.
    pub fn emptied(&mut self) {
        self.pending.clear();
        self.pending_first = None;
        self.pending_rows = 0;
        self.round = None;
    }

    /// Makes a round due now (tests).
    #[cfg(test)]
    pub fn begin_now(&mut self) {
        self.round_began = Instant::now()
            .checked_sub(FOLD_EVERY)
            .unwrap_or(self.round_began);
    }

    /// Whether the next [`Folder::piece`] has anything to do.
    pub fn due(&self) -> bool {
        self.round.is_some()
            || (self.pending_first.is_some()
                && (self.pending_rows >= FOLD_ROWS || self.round_began.elapsed() >= FOLD_EVERY))
    }

    /// Does one piece of folding, at most [`PIECE_BUDGET`] of work, in a transaction of its
    /// own; begins a round first if one is due.
    pub fn piece(&mut self, conn: &Connection) -> rusqlite::Result<Piece> {
        if self.round.is_none() {
            if !self.due() {
                return Ok(Piece::default());
            }
            let Some(first) = self.pending_first.take() else {
                return Ok(Piece::default());
            };
            let mut tasks: Vec<(TaskId, i64)> = self.pending.drain().collect();
            tasks.sort_unstable();
            self.round = Some(Round {
                seqs: tasks.into_iter().map(|(_, seq)| seq).collect(),
                written: 0,
                delete_from: first,
                bound: self.last,
            });
            self.pending_rows = 0;
            self.round_began = Instant::now();
        }
        let Some(round) = &mut self.round else {
            return Ok(Piece::default());
        };
        let tx = conn.unchecked_transaction()?;
        let mut piece = Piece::default();
        let mut budget = PIECE_BUDGET;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO task_state (task_id, attempt, state, updated_at)
                 SELECT task_id, attempt, state, updated_at FROM task_state_log WHERE seq = ?1
                 ON CONFLICT(task_id) DO UPDATE SET attempt = excluded.attempt, state = excluded.state, updated_at = excluded.updated_at",
            )?;
            while budget >= UPSERT_COST {
                let Some(seq) = round.seqs.get(round.written) else {
                    break;
                };
                upsert.execute([seq])?;
                round.written += 1;
                piece.states_written += 1;
                budget -= UPSERT_COST;
            }
        }
        let all_written = round.written == round.seqs.len();
        if all_written && budget > 0 {
            let to = round
                .bound
                .min(round.delete_from.saturating_add(budget as i64 - 1));
            piece.rows_deleted = tx
                .prepare_cached("DELETE FROM task_state_log WHERE seq <= ?1")?
                .execute([to])?;
            round.delete_from = to + 1;
        }
        tx.commit()?;
        if all_written && round.delete_from > round.bound {
            self.round = None;
        }
        Ok(piece)
    }
}

/// Folds the whole state log into `task_state` (the latest logged state of each task replaces
/// its row) and empties it. Returns the log rows folded. Run it inside a transaction.
pub fn compact_states(conn: &Connection) -> rusqlite::Result<usize> {
    let latest = conn
        .prepare_cached(
            "INSERT INTO task_state (task_id, attempt, state, updated_at)
             SELECT task_id, attempt, state, updated_at FROM task_state_log
             WHERE seq IN (SELECT max(seq) FROM task_state_log GROUP BY task_id)
             ON CONFLICT(task_id) DO UPDATE SET attempt = excluded.attempt, state = excluded.state, updated_at = excluded.updated_at",
        )?
        .execute([])?;
    let rows = conn
        .prepare_cached("DELETE FROM task_state_log")?
        .execute([])?;
    debug_assert!(latest <= rows);
    Ok(rows)
}
