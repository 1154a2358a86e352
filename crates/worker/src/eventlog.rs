//! The worker's own record of what happened to its connection and its results, as JSON lines
//! appended to a file (`tether worker --event-log FILE`). End-to-end runs read it as ground
//! truth from the worker's side: when each session registered and when it was lost (and why),
//! and every result acknowledgement with its disposition.
//!
//! One line per event, written with a single `write` call and no user-space buffer, so a line
//! survives a SIGKILL of the process the moment the call returns (it is not fsynced: a machine
//! crash may lose the tail). A line cut short that way is cut off when the log is opened
//! again, so the next process's first line starts a line of its own. Lines carry wall-clock
//! times (RFC 3339, UTC) so that records of several processes on one machine can be compared.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tether_proto::msg::Disposition;
use tether_proto::{Attempt, Seq, TaskId};

/// Why the event log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("cannot open the event log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The process started (a restart on the same log appends a new one).
    Started { boot_id: String },
    /// A session registered (the coordinator answered the registration).
    Registered { generation: u64, session_id: u64 },
    /// A registered session ended; `dead` when no frame came for the heartbeat timeout.
    SessionLost {
        generation: u64,
        reason: String,
        dead: bool,
    },
    /// A connection attempt ended before registration.
    AttemptFailed { generation: u64, reason: String },
    /// The coordinator acknowledged a result.
    ResultAck {
        task_id: TaskId,
        /// The attempt of the acknowledged result, when it was still held (a repeated ack of a
        /// result already acknowledged finds nothing to look up).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<Attempt>,
        seq: Seq,
        disposition: Disposition,
    },
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub at: DateTime<Utc>,
    pub worker: String,
    #[serde(flatten)]
    pub event: Event,
}

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct EventLog {
    worker: String,
    file: Mutex<File>,
    path: PathBuf,
}

impl EventLog {
    /// Opens `path` for appending, creating it. A last line without its newline (a write the
    /// previous process was killed during) is cut off first: appended to, it would glue this
    /// process's first record onto the fragment and damage both. The log is one process's:
    /// another writing it meanwhile could lose a line being written.
    pub fn open(path: &Path, worker: &str) -> Result<Self, EventLogError> {
        let err = |source| EventLogError::Open {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let whole = whole_lines_len(&mut file, len).map_err(err)?;
        if whole < len {
            tracing::warn!(path = %path.display(), bytes = len - whole, "cutting off the event log's torn last line");
            file.set_len(whole).map_err(err)?;
            // The cut is made durable before anything is appended after it.
            file.sync_data().map_err(err)?;
        }
        Ok(Self {
            worker: worker.to_owned(),
            file: Mutex::new(file),
            path: path.to_owned(),
        })
    }

    /// Appends one event. A failed write is logged, never fatal: the log is a witness, and the
    /// worker's job is to keep running.
    pub fn record(&self, event: Event) {
        let rec = Record {
            at: Utc::now(),
            worker: self.worker.clone(),
            event,
        };
        let mut line = match serde_json::to_vec(&rec) {
            Ok(l) => l,
            Err(error) => {
                tracing::error!(%error, "cannot encode an event log record");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = file.write_all(&line) {
            tracing::error!(path = %self.path.display(), %error, "cannot write the event log");
        }
    }
}

/// The length of `file` (of `len` bytes) up to and with its last newline: 0 when it has none.
fn whole_lines_len(file: &mut File, len: u64) -> std::io::Result<u64> {
    const CHUNK: u64 = 4096;
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        // Both are within one chunk: the cast cannot truncate.
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// A log as read.
#[derive(Debug, Default)]
pub struct Read {
    pub records: Vec<Record>,
    /// The numbers (from 1) of whole lines that do not parse: damage.
    pub damaged: Vec<usize>,
    /// The last line lacks its newline and does not parse: a write cut short (the process was
    /// killed during it, and nothing was written after it).
    pub torn: bool,
}

/// Reads every record of a log (see [`parse`]).
pub fn read(path: &Path) -> std::io::Result<Read> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

/// The records of a log's text; lines that do not parse are skipped and told apart: a torn
/// last line, or damage.
pub fn parse(text: &str) -> Read {
    let mut read = Read::default();
    // Only the last piece can lack its newline.
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => read.records.push(r),
            Err(_) if !line.ends_with('\n') => read.torn = true,
            Err(_) => read.damaged.push(n + 1),
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_the_file_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "w1").expect("open");
        log.record(Event::Registered {
            generation: 1,
            session_id: 7,
        });
        log.record(Event::ResultAck {
            task_id: TaskId::parse("t1").expect("id"),
            attempt: Some(Attempt(2)),
            seq: Seq(9),
            disposition: Disposition::Recorded,
        });
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).expect("reopen");
        f.write_all(b"{\"at\":\"20").expect("torn line");
        let read = read(&path).expect("read");
        assert!(read.torn && read.damaged.is_empty(), "{read:?}");
        let records = read.records;
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].worker, "w1");
        assert!(matches!(
            records[1].event,
            Event::ResultAck {
                attempt: Some(Attempt(2)),
                disposition: Disposition::Recorded,
                ..
            }
        ));
        let text = std::fs::read_to_string(&path).expect("text");
        assert!(text.starts_with("{\"at\":"), "{text}");
        assert!(text.contains("\"event\":\"result_ack\""), "{text}");
    }

    #[test]
    fn a_restart_cuts_off_a_torn_last_line_before_it_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "w1").expect("open");
        log.record(Event::Registered {
            generation: 1,
            session_id: 7,
        });
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).expect("reopen");
        f.write_all(b"{\"at\":\"20").expect("torn line");
        drop(f);
        let log = EventLog::open(&path, "w1").expect("open again");
        log.record(Event::Started {
            boot_id: "b2".into(),
        });
        let read = read(&path).expect("read");
        assert!(!read.torn && read.damaged.is_empty(), "{read:?}");
        let events: Vec<_> = read.records.into_iter().map(|r| r.event).collect();
        assert!(
            matches!(
                events[..],
                [Event::Registered { .. }, Event::Started { .. }]
            ),
            "{events:?}"
        );
    }

    #[test]
    fn a_log_that_is_only_a_fragment_is_cut_to_nothing_and_a_whole_one_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        // Longer than a chunk of the backwards search, and no newline at all.
        std::fs::write(&path, vec![b'x'; 10_000]).expect("fragment");
        let log = EventLog::open(&path, "w1").expect("open");
        log.record(Event::Started {
            boot_id: "b1".into(),
        });
        let text = std::fs::read_to_string(&path).expect("text");
        assert!(
            text.starts_with("{\"at\":") && text.ends_with('\n'),
            "{text}"
        );
        // Whole lines are kept as they are; a fragment longer than a chunk of the backwards
        // search is cut back to the newline before it.
        let mut whole = vec![b'y'; 4095];
        whole.push(b'\n');
        std::fs::write(&path, &whole).expect("whole lines");
        drop(EventLog::open(&path, "w1").expect("open"));
        assert_eq!(std::fs::read(&path).expect("bytes"), whole);
        let mut torn = whole.clone();
        torn.extend(vec![b'z'; 8191]);
        std::fs::write(&path, &torn).expect("torn");
        drop(EventLog::open(&path, "w1").expect("open"));
        assert_eq!(std::fs::read(&path).expect("bytes"), whole);
    }
}
