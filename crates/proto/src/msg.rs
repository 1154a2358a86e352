//! The messages, one closed enum per direction. JSON text frames, one object per frame, the
//! `type` field selects the variant. Names follow the original system's vocabulary; what the
//! original lacked (protocol version, sequence numbers, attempts, structured errors,
//! reconciliation directives) is added here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, CheckpointId, Seq, TaskId, WorkerId};
use crate::task::{Blob, ConnStats, Outcome, TaskError, TaskRef};

/// Version of this protocol. Peers with a different major refuse each other at registration.
pub const PROTOCOL_VERSION: u32 = 1;

/// Now, as the UTC timestamp every message carries.
pub fn now() -> DateTime<Utc> {
    Utc::now()
}

/// Messages a worker sends to the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMsg {
    Registration(Registration),
    Heartbeat(Heartbeat),
    TaskResult(TaskResult),
    TaskState(TaskState),
    Checkpoint(Checkpoint),
    CheckpointData(CheckpointData),
    CheckpointError(CheckpointError),
    CheckpointFetch(CheckpointFetch),
    StateError(StateError),
    TaskCancelled(TaskNotice),
    TaskPaused(TaskNotice),
    TaskResumed(TaskNotice),
    Telemetry(Telemetry),
    WorkerStopping(StopNotice),
    WorkerStopped(StopNotice),
    Error(ErrorMsg),
}

/// Messages the coordinator sends to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordMsg {
    Welcome(Welcome),
    RegistrationAck(RegistrationAck),
    Heartbeat(HeartbeatReply),
    TaskAssignment(TaskAssignment),
    TaskResultAck(Ack),
    TaskStateAck(Ack),
    CheckpointAck(Ack),
    CheckpointDataAck(Ack),
    TaskCancelledAck(Ack),
    TaskPausedAck(Ack),
    TaskResumedAck(Ack),
    TelemetryAck(Ack),
    Acks(Acks),
    CheckpointRequest(CheckpointRequest),
    CheckpointPiece(CheckpointPiece),
    StateRequest(StateRequest),
    CancelTask(TaskControl),
    PauseTask(TaskControl),
    ResumeTask(TaskControl),
    Error(ErrorMsg),
}

/// First message of a worker session, and again after every reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub worker_id: WorkerId,
    pub protocol_version: u32,
    /// Random id of this worker process; a new one means the worker restarted. At most
    /// [`MAX_BOOT_ID_BYTES`], and no control characters (see [`Registration::label_problem`]).
    pub boot_id: String,
    /// Capabilities a task may require, e.g. `cpu`, `cuda`. Decoded up to one past
    /// [`MAX_WORKER_LABELS`] (see [`Registration::label_problem`]).
    #[serde(default, deserialize_with = "bounded::worker_labels")]
    pub capabilities: Vec<String>,
    /// Key/value tags a task may require, e.g. `os=linux`. Decoded up to one past
    /// [`crate::task::MAX_LABELS`].
    #[serde(default, deserialize_with = "bounded::tags")]
    pub tags: BTreeMap<String, String>,
    /// How many tasks the worker runs at once.
    pub slots: u32,
    /// Executor kinds this worker can run. Decoded up to one past [`MAX_WORKER_LABELS`].
    #[serde(default, deserialize_with = "bounded::worker_labels")]
    pub executors: Vec<String>,
    /// What the worker holds, for reconciliation.
    #[serde(default)]
    pub inventory: Inventory,
    /// hex(HMAC-SHA256) answering the welcome's `nonce` (see [`crate::auth`]); required when
    /// the coordinator sent a nonce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Compressions the worker can receive and send, e.g. `["zstd"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compression: Vec<String>,
    /// The worker's fresh random nonce (64 hex digits) when the welcome asked for per-message
    /// integrity; with the welcome's `nonce` it keys the session (see [`crate::integrity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_nonce: Option<String>,
    /// The worker reads batch frames (a JSON array of messages, see [`crate::codec::Batch`])
    /// and sends them once the coordinator agrees in `registration_ack`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batching: bool,
    /// The worker reads `acks` (the sequence numbers of several recorded messages in one
    /// message) in place of their `*_ack`s once the coordinator agrees in `registration_ack`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compact_acks: bool,
    /// The largest frame the worker accepts, bytes: the coordinator sends it nothing larger
    /// (a resumed task's checkpoint that would not fit goes by `checkpoint_fetch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame: Option<u64>,
    /// The worker fetches a resumed task's checkpoint that its assignment names without its
    /// bytes (`checkpoint_fetch`). Without it, a checkpoint too large for the assignment is
    /// left out of it (the task starts afresh).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checkpoint_fetch: bool,
    /// The worker's liveness timeout as it registers, ms: it declares the link dead after this
    /// long without any inbound frame. The coordinator pings a worker it keeps waiting (its
    /// `registration_ack` behind a held commit, its frames unread behind a busy core, a frame
    /// of it still arriving) every third of it, or every heartbeat interval of the session
    /// when that is shorter; absent (an older worker), every 250 ms at most. At least
    /// [`MIN_STATED_TIMEOUT_MS`] (see [`Registration::label_problem`]); a long one is taken as
    /// it is (the session's heartbeat interval bounds the pings' period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_ms: Option<u64>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// The most capabilities, and the most executors, a registration names.
pub const MAX_WORKER_LABELS: usize = 256;
/// The longest `boot_id`, bytes (the Rust worker's are 34).
pub const MAX_BOOT_ID_BYTES: usize = 128;
/// The shortest liveness timeout a registration may state (`heartbeat_timeout_ms`), ms: both
/// ends refuse a heartbeat interval under 10 ms and a timeout not longer than it, so no worker
/// configured to work states less. A worker that gives up on its link sooner could be kept by
/// no coordinator, and pinging it three times within its timeout would take a ping every 3 ms
/// or less; a timeout of 0, pings without end.
pub const MIN_STATED_TIMEOUT_MS: u64 = 10;

impl Registration {
    /// Why what the registration says of the worker is out of bounds, if it is: at most
    /// [`MAX_WORKER_LABELS`] capabilities and executors, [`crate::task::MAX_LABELS`] tags
    /// (as a task may require), each name, key and value of at most
    /// [`crate::task::MAX_LABEL_BYTES`], a `boot_id` of at most [`MAX_BOOT_ID_BYTES`] and
    /// without control characters. The coordinator keeps, shows and streams all of it:
    /// unbounded, one worker's registration would weigh on every reader of the fleet's events.
    /// A boot id is the worker's own random id (the Rust worker's is `b-` and 32 hex digits),
    /// and the coordinator's logs name it: a `\n` in it could forge log lines (with
    /// authentication off, anyone who reaches the port may register).
    ///
    /// A stated `heartbeat_timeout_ms` is at least [`MIN_STATED_TIMEOUT_MS`].
    ///
    /// A decoded registration holds at most one capability, executor or tag past its bound
    /// (what follows is read, not kept: a peer's megabyte of them, before it authenticated,
    /// is never held), so a count past the bound is told as "at least".
    pub fn label_problem(&self) -> Option<String> {
        if self.boot_id.len() > MAX_BOOT_ID_BYTES {
            return Some(format!(
                "a boot_id of {} bytes; at most {MAX_BOOT_ID_BYTES}",
                self.boot_id.len()
            ));
        }
        if let Some((at, c)) = self.boot_id.char_indices().find(|(_, c)| c.is_control()) {
            return Some(format!(
                "a boot_id with a control character ({c:?} at byte {at}); a boot id is printable text"
            ));
        }
        if let Some(ms) = self
            .heartbeat_timeout_ms
            .filter(|&ms| ms < MIN_STATED_TIMEOUT_MS)
        {
            return Some(format!(
                "a heartbeat_timeout_ms of {ms}; at least {MIN_STATED_TIMEOUT_MS} (a heartbeat interval is at least 10 ms, and the timeout longer)"
            ));
        }
        labels_problem(&self.capabilities, &self.tags, &self.executors, "at least ")
            .map(|(_, why)| why)
    }
}

/// Deserializers of a registration's lists that keep at most one element past their bound:
/// enough for [`Registration::label_problem`] to refuse it, saying why.
mod bounded {
    use std::collections::BTreeMap;
    use std::marker::PhantomData;

    use serde::Deserializer;
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

    /// Capabilities or executors: up to [`super::MAX_WORKER_LABELS`] + 1 kept.
    pub(super) fn worker_labels<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(Bounded::<Vec<String>>::new(super::MAX_WORKER_LABELS))
    }

    /// Tags: up to [`crate::task::MAX_LABELS`] + 1 kept.
    pub(super) fn tags<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, String>, D::Error> {
        d.deserialize_map(Bounded::<BTreeMap<String, String>>::new(
            crate::task::MAX_LABELS,
        ))
    }

    struct Bounded<T> {
        most: usize,
        of: PhantomData<T>,
    }

    impl<T> Bounded<T> {
        fn new(most: usize) -> Self {
            Bounded {
                most,
                of: PhantomData,
            }
        }
    }

    impl<'de> Visitor<'de> for Bounded<Vec<String>> {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of strings")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while out.len() <= self.most {
                match seq.next_element()? {
                    Some(s) => out.push(s),
                    None => return Ok(out),
                }
            }
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(out)
        }
    }

    impl<'de> Visitor<'de> for Bounded<BTreeMap<String, String>> {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of strings")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            // Counted as kept: a key given twice is one tag (the last value), as before.
            while out.len() <= self.most {
                match map.next_entry()? {
                    Some((k, v)) => drop(out.insert(k, v)),
                    None => return Ok(out),
                }
            }
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(out)
        }
    }
}

/// Why a worker's capabilities, tags or executors are past the bounds a registration is held
/// to ([`Registration::label_problem`]), with the field that is: the coordinator refuses
/// such a registration, and the worker refuses such a configuration at start.
pub fn worker_labels_problem(
    capabilities: &[String],
    tags: &BTreeMap<String, String>,
    executors: &[String],
) -> Option<(&'static str, String)> {
    labels_problem(capabilities, tags, executors, "")
}

/// [`worker_labels_problem`], a count past its bound told after `counted` ("at least " when
/// the lists were cut one past their bound).
fn labels_problem(
    capabilities: &[String],
    tags: &BTreeMap<String, String>,
    executors: &[String],
    counted: &str,
) -> Option<(&'static str, String)> {
    use crate::task::{MAX_LABEL_BYTES, MAX_LABELS};
    let counts = [
        ("capabilities", capabilities.len(), MAX_WORKER_LABELS),
        ("executors", executors.len(), MAX_WORKER_LABELS),
        ("tags", tags.len(), MAX_LABELS),
    ];
    if let Some((field, n, most)) = counts.into_iter().find(|(_, n, most)| n > most) {
        return Some((field, format!("{counted}{n} {field}; at most {most}")));
    }
    let tag_words = tags.iter().flat_map(|(k, v)| [k, v]);
    let labels = (capabilities.iter().map(|l| ("capabilities", l)))
        .chain(executors.iter().map(|l| ("executors", l)))
        .chain(tag_words.map(|l| ("tags", l)));
    let (field, long) = labels
        .into_iter()
        .find(|(_, l)| l.len() > MAX_LABEL_BYTES)?;
    Some((
        field,
        format!(
            "a capability, executor or tag of {} bytes; at most {MAX_LABEL_BYTES}",
            long.len()
        ),
    ))
}

/// A worker's account of its tasks, sent at registration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Inventory {
    /// Tasks executing now (running or paused).
    #[serde(default)]
    pub running: Vec<TaskRef>,
    /// Tasks finished whose result is not acknowledged yet (it follows in the outbox replay).
    #[serde(default)]
    pub finished: Vec<TaskRef>,
    /// Tasks that were running when a previous process of this worker died.
    #[serde(default)]
    pub lost: Vec<TaskRef>,
    /// Highest sequence number acknowledged by a coordinator so far.
    #[serde(default)]
    pub acked_seq: Seq,
    /// The highest sequence number among the messages the worker holds unacknowledged, which
    /// it sends again right after the registration: the tasks in `lost` stay off the queue
    /// until that replay is through, so that a checkpoint of theirs that the dead process
    /// wrote and no coordinator acknowledged is resumed from. Absent (an older worker, or
    /// nothing to replay): they are requeued at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_through: Option<Seq>,
}

/// Application heartbeat, worker to coordinator. Never queued: sent only on a live session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub sequence: u64,
    #[serde(default)]
    pub active_tasks: Vec<TaskRef>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// The one final result of one attempt of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub seq: Seq,
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub outcome: Outcome,
    /// Kept as the text it came in ([`JsonText`]): the coordinator stores it without building
    /// a tree (16 MiB of `[{},{},...]` as a tree took 477 MB of its memory, even from a
    /// worker that did not hold the task).
    #[serde(default)]
    pub result: JsonText,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// The attempt could not run on this worker for a fault of the worker's own (its disk, its
    /// process limits), not the task's; sent with outcome `failed`, and only when true. The
    /// coordinator then requeues the task, as for an attempt lost with its worker, instead of
    /// ending it `failed`. A coordinator that does not know the field records the failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub worker_fault: bool,
    #[serde(with = "crate::time")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "crate::time")]
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Progress or state of a running task. Updates for one task coalesce to the latest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    pub seq: Seq,
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub state: StateJson,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Deepest nesting of arrays and objects accepted in JSON kept as text ([`JsonText`]: a task's
/// state, a task's config): serde_json's own limit for a tree (it refuses the 128th opening
/// bracket), so that any text accepted can be made a tree ([`JsonText::to_value`]) where it is
/// used: a config accepted one level deeper would fail on the worker, and the task never run.
pub const MAX_JSON_DEPTH: usize = 127;
/// Deepest nesting of arrays and objects accepted in a task's state ([`MAX_JSON_DEPTH`]).
pub const MAX_STATE_DEPTH: usize = MAX_JSON_DEPTH;

/// JSON kept as text, as it was made or received, and shared: a task's state and a task's
/// config, which the coordinator stores, holds and passes on without building a tree and
/// serialising it again (a config of one key held as a tree took about 650 bytes of the
/// coordinator's memory for as long as the task was kept; as text, its length). A worker keeps
/// a task's latest state (to answer `state_request`) as the same shared text the message
/// carries. Decoding checks that it is nested at most [`MAX_JSON_DEPTH`] deep.
#[derive(Debug, Clone)]
pub struct JsonText(std::sync::Arc<serde_json::value::RawValue>);

/// A task's state as JSON text ([`JsonText`]).
pub type StateJson = JsonText;

impl Default for JsonText {
    /// `null`.
    fn default() -> Self {
        JsonText::from(&serde_json::Value::Null)
    }
}

impl JsonText {
    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The JSON as a tree.
    pub fn to_value(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_str(self.get())
    }

    /// JSON already made as text (by a program's output, or by a format string): the text is
    /// checked, as when decoded, and kept as it is.
    pub fn from_text(text: String) -> Result<Self, JsonTextError> {
        let raw = serde_json::value::RawValue::from_string(text)
            .map_err(|e| JsonTextError::NotJson(e.to_string()))?;
        Self::checked(raw)
    }

    /// JSON text nested at most [`MAX_JSON_DEPTH`] deep, made or decoded.
    fn checked(raw: Box<serde_json::value::RawValue>) -> Result<Self, JsonTextError> {
        let text = JsonText(raw.into());
        text.check_depth()?;
        Ok(text)
    }

    /// Whether this is nested at most [`MAX_JSON_DEPTH`] deep, as decoding it asks. JSON made
    /// from a tree (`From<serde_json::Value>`) is not checked when made: a sender asks this
    /// before it sends a state, since a deeper one would never be decoded, nor acknowledged, at
    /// the other end.
    pub fn check_depth(&self) -> Result<(), JsonTextError> {
        // Each level of nesting takes an opening and a closing bracket: a text this short
        // cannot be too deep, and is not scanned (most states are).
        let text = self.get();
        if text.len() > 2 * MAX_JSON_DEPTH && nesting(text) > MAX_JSON_DEPTH {
            return Err(JsonTextError::TooDeep);
        }
        Ok(())
    }
}

/// Deepest nesting of arrays and objects in a task's result that a `task_result` can carry
/// ([`MAX_JSON_DEPTH`], as a state): a result nested deeper is never decoded, so never
/// acknowledged, by the other end.
pub const MAX_RESULT_DEPTH: usize = MAX_JSON_DEPTH;

/// The deepest nesting of arrays and objects in `v` (0 for a scalar, 1 for `[]` or `{}`),
/// counted without recursion (a tree made by a program may be deeper than any stack) and
/// only up to `limit + 1`: enough to tell that it is deeper than `limit`.
pub fn value_depth(v: &serde_json::Value, limit: usize) -> usize {
    use serde_json::Value;
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(v, 1)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        deepest = deepest.max(depth);
        if deepest > limit {
            break;
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    deepest
}

/// Why a text is not [`JsonText`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonTextError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("nested deeper than {MAX_JSON_DEPTH}")]
    TooDeep,
}

/// Why a text is not a task state ([`JsonTextError`]).
pub type StateTextError = JsonTextError;

impl From<&serde_json::Value> for JsonText {
    fn from(v: &serde_json::Value) -> Self {
        // A `Value` always serialises (its map keys are strings).
        let raw = serde_json::value::to_raw_value(v).unwrap_or_else(|_| {
            serde_json::value::RawValue::from_string("null".into()).expect("null is JSON")
        });
        JsonText(raw.into())
    }
}

impl From<serde_json::Value> for JsonText {
    fn from(v: serde_json::Value) -> Self {
        JsonText::from(&v)
    }
}

/// Equal as JSON: the same text, or texts that differ only in spacing or key order.
impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
            || matches!((self.to_value(), other.to_value()), (Ok(a), Ok(b)) if a == b)
    }
}

/// Equal as JSON to the tree.
impl PartialEq<serde_json::Value> for JsonText {
    fn eq(&self, other: &serde_json::Value) -> bool {
        self.to_value().is_ok_and(|v| &v == other)
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        JsonText::checked(raw).map_err(serde::de::Error::custom)
    }
}

/// The deepest nesting of arrays and objects in `json` (valid JSON: brackets inside strings
/// do not count).
fn nesting(json: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Checkpoint metadata; the bytes follow in `chunks` [`CheckpointData`] messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: Seq,
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub checkpoint_id: CheckpointId,
    pub size: u64,
    pub chunks: u32,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// One piece of a checkpoint's bytes, so that a large checkpoint never blocks heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointData {
    pub seq: Seq,
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub checkpoint_id: CheckpointId,
    pub chunk: u32,
    pub data: Blob,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Reply to a `checkpoint_request` that cannot be served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointError {
    pub task_id: TaskId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_id: Option<CheckpointId>,
    pub error: String,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Asks for a byte range of the checkpoint an assignment named without its bytes (too large
/// to travel in the assignment); answered by one `checkpoint_piece`. Through the outbox, so a
/// request lost with a session is asked again in the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointFetch {
    pub seq: Seq,
    pub task_id: TaskId,
    /// The attempt the assignment leased (the one that will resume from the checkpoint).
    pub attempt: Attempt,
    pub checkpoint_id: CheckpointId,
    pub offset: u64,
    pub len: u64,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Reply to a `checkpoint_fetch`: the bytes asked for, or why they cannot be served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointPiece {
    /// The `seq` of the fetch this answers (it acknowledges it).
    pub ack_seq: Seq,
    pub task_id: TaskId,
    pub checkpoint_id: CheckpointId,
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Blob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With `error`: `not_leased` (the fetch's attempt holds no lease: stop it),
    /// `rate_limited` or `internal` (ask again later), `bad_frame` (a fetch never to repeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Reply to a `state_request` that cannot be served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    pub error: String,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// `worker_stopping`: the worker is stopping and takes no more tasks (its running ones are
/// being stopped, their results and checkpoints still flow). `worker_stopped`: it stopped
/// every task and what they left is acknowledged (every result; states and checkpoints too,
/// unless its flush ran out first); the tasks it still holds leases on
/// will never report, so the coordinator moves them at once instead of after the grace
/// period. Neither is acknowledged: a notice lost with its connection leaves the grace period
/// to do its work, as for a worker that never sent one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopNotice {
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// `task_cancelled`, `task_paused`, `task_resumed`: the worker applied a control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskNotice {
    pub seq: Seq,
    pub task_id: TaskId,
    pub attempt: Attempt,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Periodic connection statistics and worker metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub seq: Seq,
    pub connection_stats: ConnStats,
    /// Kept as the text it came in ([`JsonText`], as a result): the coordinator does not read
    /// it, and as a tree 16 MiB of `[{},{},...]` took 477 MB of its memory.
    #[serde(default)]
    pub metrics: JsonText,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Structured error, both directions: what was wrong with which frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
    /// The `type` of the offending frame, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offending_type: Option<String>,
    /// The `seq` of the offending frame, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_seq: Option<u64>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Characters of a peer's error text that a log line shows.
pub const LOGGED_MESSAGE_CHARS: usize = 256;

impl ErrorMsg {
    /// The peer's text as a log line may show it: see [`logged`].
    pub fn logged(&self) -> impl std::fmt::Debug + '_ {
        logged(&self.message)
    }
}

/// A peer's text as a log line may show it: its first [`LOGGED_MESSAGE_CHARS`] characters,
/// quoted and escaped by `Debug` (a newline in it cannot forge another line), so that a
/// megabyte of it makes no megabyte of log.
pub fn logged(text: &str) -> impl std::fmt::Debug + '_ {
    let end = text
        .char_indices()
        .nth(LOGGED_MESSAGE_CHARS)
        .map_or(text.len(), |(i, _)| i);
    &text[..end]
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame parsed as JSON but its `type` is not a known message.
    UnknownType,
    /// The frame is not a JSON object, or a known message with missing or invalid fields.
    BadFrame,
    /// The message is valid but not allowed now (e.g. before registration).
    Unexpected,
    /// The worker is not allowed to report on this task or attempt.
    NotLeased,
    /// The protocol versions are incompatible.
    IncompatibleProtocol,
    /// Authentication failed; the session is closed with 4001.
    Unauthorized,
    /// Too many messages; slow down.
    RateLimited,
    /// A frame's integrity tag did not verify; the frame was dropped.
    BadMac,
    /// The peer could not process a valid message.
    Internal,
}

impl ErrorCode {
    /// Every code, for metrics registered before their first event.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::UnknownType,
        ErrorCode::BadFrame,
        ErrorCode::Unexpected,
        ErrorCode::NotLeased,
        ErrorCode::IncompatibleProtocol,
        ErrorCode::Unauthorized,
        ErrorCode::RateLimited,
        ErrorCode::BadMac,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::Unexpected => "unexpected",
            ErrorCode::NotLeased => "not_leased",
            ErrorCode::IncompatibleProtocol => "incompatible_protocol",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BadMac => "bad_mac",
            ErrorCode::Internal => "internal",
        }
    }
}

/// First frame of every accepted connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub worker_id: WorkerId,
    pub protocol_version: u32,
    /// Coordinator-wide session number of this connection.
    pub session_id: u64,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// A fresh random challenge (64 hex digits) when the coordinator requires authentication:
    /// the registration must carry its `signature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// `hmac-sha256` when every frame after the registration must carry an integrity tag
    /// (see [`crate::integrity`]); only with a `nonce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Reply to `registration`: the coordinator's decision for each task in the inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationAck {
    pub worker_id: WorkerId,
    pub session_id: u64,
    #[serde(default)]
    pub directives: Vec<Directive>,
    /// The compression both sides use from now on for large messages; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Present when the coordinator agrees to the worker's `batching`: from the next frame on,
    /// both sides may send batch frames within these bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<Batching>,
    /// The coordinator agrees to the worker's `compact_acks`: from the next frame on, messages
    /// it records (other than results) may be acknowledged in `acks`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compact_acks: bool,
    /// The largest frame the coordinator accepts, bytes: the worker sends nothing larger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame: Option<u64>,
    /// The largest checkpoint the coordinator keeps, bytes: the worker uploads none larger
    /// (its announcement would be refused after every piece had been sent for nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_checkpoint: Option<u64>,
    /// The messages a second this worker's sessions may send, which the coordinator enforces
    /// by reading a session that exceeds it only as fast as it allows. The worker paces what
    /// it sends below it, so that a well-behaved worker is never the one held back (its
    /// state updates coalesce while they wait). Absent: no limit said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_rate: Option<Rate>,
    /// The bytes a second of frame text (as decoded, after inflating) this worker's sessions
    /// may send, enforced and paced as the message rate is. Absent: no limit said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_rate: Option<Rate>,
    /// How long, ms, the coordinator waits for a disconnected worker before it declares it
    /// lost and hands its tasks to others (its `--lost-after`). A worker holding leased work
    /// keeps its reconnect delays well below it. Absent (an older coordinator): not said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after_ms: Option<u64>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// A sustained rate, of messages or of bytes, and the burst allowed above it (a token
/// bucket's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

/// Bounds of the batch frames a coordinator accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batching {
    /// Most messages in one batch frame.
    pub max_messages: u32,
    /// Most bytes of one batch frame's JSON text.
    pub max_bytes: u64,
}

/// What the worker must do with a task it reported at registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Directive {
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub action: DirectiveAction,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectiveAction {
    /// The lease is still this worker's: go on.
    Continue,
    /// Go on, but paused.
    Pause,
    /// Stop the task and do not report a result (it moved on or was cancelled).
    Cancel,
}

/// Reply to a heartbeat, echoing its sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub response_to: Option<u64>,
    #[serde(default)]
    pub actions: Vec<HeartbeatAction>,
    /// The session's heartbeat interval from now on, when the coordinator changed it (it
    /// stretches its interval as its fleet grows, to keep within its heartbeat budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    /// The silence after which the coordinator closes the session, with that interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// The worker is drained by an operator (`tether drain`): the coordinator gives it no new
    /// task until it is undrained; what it holds runs on. For the worker's log and metrics;
    /// absent (false) when it is not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

impl HeartbeatReply {
    /// The plain answer to heartbeat `sequence`: no actions, the interval unchanged.
    pub fn answering(sequence: u64) -> Self {
        Self {
            response_to: Some(sequence),
            actions: Vec::new(),
            heartbeat_interval_ms: None,
            heartbeat_timeout_ms: None,
            draining: false,
            timestamp: now(),
        }
    }

    /// A reply that answers no heartbeat (`response_to` null) and says whether the worker is
    /// drained: sent at once when an operator drains or undrains it.
    pub fn drain_notice(draining: bool) -> Self {
        Self {
            response_to: None,
            draining,
            ..Self::answering(0)
        }
    }
}

/// Actions a heartbeat reply may carry (the original's vocabulary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HeartbeatAction {
    /// Replay the outbox and send the state of every running task.
    SyncState,
    /// Zero the connection statistics.
    ResetConnectionStats,
}

/// A lease on one attempt of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAssignment {
    pub task_id: TaskId,
    pub attempt: Attempt,
    /// Executor kind: `command`, `sleep`, or one an embedding program registered.
    pub kind: String,
    /// The spec's config, as the coordinator holds it: text, passed on as it is.
    #[serde(default)]
    pub config: JsonText,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Latest checkpoint of an earlier attempt, to resume from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointBlob>,
    /// The last attempt of earlier tasks of this id, removed by retention, when there were
    /// any: this task's attempts are numbered after them, so a checkpoint a worker kept of an
    /// attempt up to it is one of theirs, not this task's past.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_base: Option<Attempt>,
    /// The coordinator's number of the submission this task came from (`submit_seq`), one per
    /// task, never reused: a task submitted again under a removed task's id has another. A
    /// worker keeps it with what it keeps of the attempt (its local checkpoint), and resumes
    /// no task from a checkpoint of another submission, whatever their attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_seq: Option<u64>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// The checkpoint handed to a resumed attempt: its bytes, or, when they are too large to
/// travel in one message, their size, for the worker to fetch in pieces (`checkpoint_fetch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointBlob {
    pub checkpoint_id: CheckpointId,
    /// The attempt that wrote it.
    pub attempt: Attempt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Blob>,
    /// The checkpoint's size in bytes; given when `data` is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// Acknowledgement of a worker message that carried a `seq`; all `*_ack` types share it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub ack_seq: Seq,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_id: Option<CheckpointId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<u32>,
    pub disposition: Disposition,
    /// Why a `stale` message no longer counts (its attempt's end, e.g. the task was cancelled
    /// or its worker declared lost), for the worker's log; absent on the other dispositions (a
    /// `rejected` message's why comes in the `error` sent before its ack). Free text: a worker
    /// logs its first [`LOGGED_MESSAGE_CHARS`] characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Several recorded messages acknowledged at once (agreed at registration, `compact_acks`):
/// each sequence number in `recorded` is acknowledged as its own `*_ack` with disposition
/// `recorded` would be. Results, and messages with any other disposition, keep their own ack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Acks {
    /// Inclusive ranges `[first, last]` of sequence numbers, ascending.
    pub recorded: Vec<(Seq, Seq)>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// Most sequence numbers one `acks` may cover; a worker refuses one that covers more (a
/// coordinator makes an `acks` of one flush, at most a few hundred).
pub const MAX_ACKS_COVERED: u64 = 65_536;

impl Acks {
    /// Ranges over `seqs`, in any order.
    pub fn of(mut seqs: Vec<Seq>) -> Acks {
        seqs.sort_unstable();
        let mut recorded: Vec<(Seq, Seq)> = Vec::new();
        for s in seqs {
            match recorded.last_mut() {
                Some((_, last)) if s.0 <= last.0.saturating_add(1) => *last = (*last).max(s),
                _ => recorded.push((s, s)),
            }
        }
        Acks {
            recorded,
            timestamp: now(),
        }
    }

    /// Every sequence number covered, or `None` when a range is inverted or they cover more
    /// than [`MAX_ACKS_COVERED`].
    pub fn seqs(&self) -> Option<Vec<Seq>> {
        let mut total = 0u64;
        for (first, last) in &self.recorded {
            total = total.checked_add(last.0.checked_sub(first.0)?.checked_add(1)?)?;
        }
        if total > MAX_ACKS_COVERED {
            return None;
        }
        Some(
            self.recorded
                .iter()
                .flat_map(|(first, last)| (first.0..=last.0).map(Seq))
                .collect(),
        )
    }
}

/// What the coordinator did with an acknowledged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Recorded now.
    Recorded,
    /// Already recorded earlier; nothing changed.
    Duplicate,
    /// From an attempt that no longer holds the lease; kept for the record, never counted.
    Stale,
    /// Refused (e.g. not this worker's task); do not resend.
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRequest {
    pub task_id: TaskId,
    pub attempt: Attempt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_id: Option<CheckpointId>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

/// `cancel_task`, `pause_task`, `resume_task`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskControl {
    pub task_id: TaskId,
    pub attempt: Attempt,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
}

impl WorkerMsg {
    /// The wire `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            WorkerMsg::Registration(_) => "registration",
            WorkerMsg::Heartbeat(_) => "heartbeat",
            WorkerMsg::TaskResult(_) => "task_result",
            WorkerMsg::TaskState(_) => "task_state",
            WorkerMsg::Checkpoint(_) => "checkpoint",
            WorkerMsg::CheckpointData(_) => "checkpoint_data",
            WorkerMsg::CheckpointError(_) => "checkpoint_error",
            WorkerMsg::CheckpointFetch(_) => "checkpoint_fetch",
            WorkerMsg::StateError(_) => "state_error",
            WorkerMsg::TaskCancelled(_) => "task_cancelled",
            WorkerMsg::TaskPaused(_) => "task_paused",
            WorkerMsg::TaskResumed(_) => "task_resumed",
            WorkerMsg::Telemetry(_) => "telemetry",
            WorkerMsg::WorkerStopping(_) => "worker_stopping",
            WorkerMsg::WorkerStopped(_) => "worker_stopped",
            WorkerMsg::Error(_) => "error",
        }
    }

    /// The sequence number, for messages that need an ack.
    pub fn seq(&self) -> Option<Seq> {
        match self {
            WorkerMsg::TaskResult(m) => Some(m.seq),
            WorkerMsg::TaskState(m) => Some(m.seq),
            WorkerMsg::Checkpoint(m) => Some(m.seq),
            WorkerMsg::CheckpointData(m) => Some(m.seq),
            WorkerMsg::CheckpointFetch(m) => Some(m.seq),
            WorkerMsg::TaskCancelled(m) | WorkerMsg::TaskPaused(m) | WorkerMsg::TaskResumed(m) => {
                Some(m.seq)
            }
            WorkerMsg::Telemetry(m) => Some(m.seq),
            WorkerMsg::Registration(_)
            | WorkerMsg::Heartbeat(_)
            | WorkerMsg::CheckpointError(_)
            | WorkerMsg::StateError(_)
            | WorkerMsg::WorkerStopping(_)
            | WorkerMsg::WorkerStopped(_)
            | WorkerMsg::Error(_) => None,
        }
    }

    /// The task this message is about, for messages about one task.
    pub fn task_id_mut(&mut self) -> Option<&mut TaskId> {
        match self {
            WorkerMsg::TaskResult(m) => Some(&mut m.task_id),
            WorkerMsg::TaskState(m) => Some(&mut m.task_id),
            WorkerMsg::Checkpoint(m) => Some(&mut m.task_id),
            WorkerMsg::CheckpointData(m) => Some(&mut m.task_id),
            WorkerMsg::CheckpointError(m) => Some(&mut m.task_id),
            WorkerMsg::CheckpointFetch(m) => Some(&mut m.task_id),
            WorkerMsg::StateError(m) => m.task_id.as_mut(),
            WorkerMsg::TaskCancelled(m) | WorkerMsg::TaskPaused(m) | WorkerMsg::TaskResumed(m) => {
                Some(&mut m.task_id)
            }
            WorkerMsg::Registration(_)
            | WorkerMsg::Heartbeat(_)
            | WorkerMsg::Telemetry(_)
            | WorkerMsg::WorkerStopping(_)
            | WorkerMsg::WorkerStopped(_)
            | WorkerMsg::Error(_) => None,
        }
    }
}

impl CoordMsg {
    /// The wire `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            CoordMsg::Welcome(_) => "welcome",
            CoordMsg::RegistrationAck(_) => "registration_ack",
            CoordMsg::Heartbeat(_) => "heartbeat",
            CoordMsg::TaskAssignment(_) => "task_assignment",
            CoordMsg::TaskResultAck(_) => "task_result_ack",
            CoordMsg::TaskStateAck(_) => "task_state_ack",
            CoordMsg::CheckpointAck(_) => "checkpoint_ack",
            CoordMsg::CheckpointDataAck(_) => "checkpoint_data_ack",
            CoordMsg::TaskCancelledAck(_) => "task_cancelled_ack",
            CoordMsg::TaskPausedAck(_) => "task_paused_ack",
            CoordMsg::TaskResumedAck(_) => "task_resumed_ack",
            CoordMsg::TelemetryAck(_) => "telemetry_ack",
            CoordMsg::Acks(_) => "acks",
            CoordMsg::CheckpointRequest(_) => "checkpoint_request",
            CoordMsg::CheckpointPiece(_) => "checkpoint_piece",
            CoordMsg::StateRequest(_) => "state_request",
            CoordMsg::CancelTask(_) => "cancel_task",
            CoordMsg::PauseTask(_) => "pause_task",
            CoordMsg::ResumeTask(_) => "resume_task",
            CoordMsg::Error(_) => "error",
        }
    }

    /// The acknowledgement this message is, when it acknowledges a message other than a
    /// result: the kind that `acks` may carry (a result's ack names its task, which a worker
    /// logs, and always travels alone).
    pub fn message_ack(&self) -> Option<&Ack> {
        match self {
            CoordMsg::TaskStateAck(a)
            | CoordMsg::CheckpointAck(a)
            | CoordMsg::CheckpointDataAck(a)
            | CoordMsg::TaskCancelledAck(a)
            | CoordMsg::TaskPausedAck(a)
            | CoordMsg::TaskResumedAck(a)
            | CoordMsg::TelemetryAck(a) => Some(a),
            _ => None,
        }
    }

    /// An `error` message; its texts bounded, whatever they quote of the peer's frame (an
    /// error reply is never larger than the frame limit the peer announced).
    pub fn error(
        code: ErrorCode,
        message: impl Into<String>,
        offending_type: Option<String>,
        ref_seq: Option<u64>,
    ) -> CoordMsg {
        use crate::codec::{ECHOED_CHARS, echoed};
        CoordMsg::Error(ErrorMsg {
            code,
            message: echoed(message.into(), 8 * ECHOED_CHARS),
            offending_type: offending_type.map(|t| echoed(t, ECHOED_CHARS)),
            ref_seq,
            timestamp: now(),
        })
    }
}

/// Every wire `type` a worker may send.
pub const WORKER_MSG_TYPES: &[&str] = &[
    "registration",
    "heartbeat",
    "task_result",
    "task_state",
    "checkpoint",
    "checkpoint_data",
    "checkpoint_error",
    "checkpoint_fetch",
    "state_error",
    "task_cancelled",
    "task_paused",
    "task_resumed",
    "telemetry",
    "worker_stopping",
    "worker_stopped",
    "error",
];

/// Every wire `type` a coordinator may send.
pub const COORD_MSG_TYPES: &[&str] = &[
    "welcome",
    "registration_ack",
    "heartbeat",
    "task_assignment",
    "task_result_ack",
    "task_state_ack",
    "checkpoint_ack",
    "checkpoint_data_ack",
    "task_cancelled_ack",
    "task_paused_ack",
    "task_resumed_ack",
    "telemetry_ack",
    "acks",
    "checkpoint_request",
    "checkpoint_piece",
    "state_request",
    "cancel_task",
    "pause_task",
    "resume_task",
    "error",
];

#[cfg(test)]
mod tests {
    use super::*;

    /// [`ErrorCode::ALL`] lists every code once: a code added to `ErrorCode` stops this
    /// match compiling until it is listed here, and then fails it until it is listed there.
    #[test]
    fn every_error_code_is_listed_once() {
        let every = |c: ErrorCode| match c {
            ErrorCode::UnknownType
            | ErrorCode::BadFrame
            | ErrorCode::Unexpected
            | ErrorCode::NotLeased
            | ErrorCode::IncompatibleProtocol
            | ErrorCode::Unauthorized
            | ErrorCode::RateLimited
            | ErrorCode::BadMac
            | ErrorCode::Internal => c,
        };
        let all = [
            every(ErrorCode::UnknownType),
            every(ErrorCode::BadFrame),
            every(ErrorCode::Unexpected),
            every(ErrorCode::NotLeased),
            every(ErrorCode::IncompatibleProtocol),
            every(ErrorCode::Unauthorized),
            every(ErrorCode::RateLimited),
            every(ErrorCode::BadMac),
            every(ErrorCode::Internal),
        ];
        assert_eq!(ErrorCode::ALL, all);
    }

    /// The sample assignment.
    fn sample_assignment() -> TaskAssignment {
        crate::samples::coord_messages()
            .into_iter()
            .find_map(|m| match m {
                CoordMsg::TaskAssignment(a) => Some(a),
                _ => None,
            })
            .expect("a sample assignment")
    }

    /// `a` through the wire: its text, and the assignment decoded from it.
    fn assignment_wire(a: &TaskAssignment) -> (String, TaskAssignment) {
        let text = crate::encode(&CoordMsg::TaskAssignment(a.clone()));
        match crate::decode_coord(&text) {
            Ok(CoordMsg::TaskAssignment(a)) => (text, a),
            other => panic!("{text}: {other:?}"),
        }
    }

    /// `attempt_base` travels when given, is left out when not, and an assignment of a
    /// coordinator that does not send it decodes without it.
    #[test]
    fn an_assignments_attempt_base_round_trips_and_may_be_missing() {
        let sample = sample_assignment();
        let with = TaskAssignment {
            attempt_base: Some(Attempt(3)),
            ..sample.clone()
        };
        let (text, back) = assignment_wire(&with);
        assert!(text.contains(r#""attempt_base":3"#), "{text}");
        assert_eq!(back, with);

        let without = TaskAssignment {
            attempt_base: None,
            ..sample
        };
        let (text, back) = assignment_wire(&without);
        assert!(!text.contains("attempt_base"), "{text}");
        assert_eq!(back, without);
    }

    /// `worker_fault` travels only when true, and a result of a worker that does not send it
    /// decodes without it.
    #[test]
    fn a_results_worker_fault_travels_only_when_true() {
        let sample = crate::samples::worker_messages()
            .into_iter()
            .find_map(|m| match m {
                WorkerMsg::TaskResult(r) => Some(r),
                _ => None,
            })
            .expect("a sample result");
        let decoded = |r: &TaskResult| {
            let text = crate::encode(&WorkerMsg::TaskResult(r.clone()));
            match crate::decode_worker(&text) {
                Ok(WorkerMsg::TaskResult(r)) => (text, r),
                other => panic!("{text}: {other:?}"),
            }
        };
        let with = TaskResult {
            worker_fault: true,
            ..sample.clone()
        };
        let (text, back) = decoded(&with);
        assert!(text.contains(r#""worker_fault":true"#), "{text}");
        assert_eq!(back, with);

        let without = TaskResult {
            worker_fault: false,
            ..sample
        };
        let (text, back) = decoded(&without);
        assert!(!text.contains("worker_fault"), "{text}");
        assert_eq!(back, without);
    }

    /// `submit_seq` travels when given, is left out when not, and an assignment of a
    /// coordinator that does not send it decodes without it.
    #[test]
    fn an_assignments_submit_seq_round_trips_and_may_be_missing() {
        let sample = sample_assignment();
        let with = TaskAssignment {
            submit_seq: Some(41),
            ..sample.clone()
        };
        let (text, back) = assignment_wire(&with);
        assert!(text.contains(r#""submit_seq":41"#), "{text}");
        assert_eq!(back, with, "{text}");
        let (text, back) = assignment_wire(&sample);
        assert!(!text.contains("submit_seq"), "{text}");
        assert!(back.submit_seq.is_none(), "{text}");
    }

    #[test]
    fn a_peers_error_text_is_logged_escaped_and_cut() {
        let mut e = match CoordMsg::error(ErrorCode::BadFrame, "x", None, None) {
            CoordMsg::Error(e) => e,
            _ => unreachable!(),
        };
        e.message = "ok\nFAKE authentication failed".into();
        assert_eq!(
            format!("{:?}", e.logged()),
            r#""ok\nFAKE authentication failed""#
        );
        e.message = "é".repeat(10_000);
        let shown = format!("{:?}", e.logged());
        assert_eq!(
            shown.chars().count(),
            LOGGED_MESSAGE_CHARS + 2,
            "quotes around"
        );
    }

    /// A registration's lists are decoded up to one past their bound, and a registration past
    /// it is refused saying so; within it, every element is kept.
    #[test]
    fn registration_lists_are_kept_to_one_past_their_bound_and_refused_saying_so() {
        let reg = |field: &str, value: serde_json::Value| {
            let m = crate::samples::worker_messages().remove(0);
            let mut v = serde_json::to_value(&m).expect("json");
            v[field] = value;
            match crate::decode_worker(&v.to_string()) {
                Ok(WorkerMsg::Registration(r)) => r,
                other => panic!("{field}: {other:?}"),
            }
        };
        let names =
            |n: usize| serde_json::json!((0..n).map(|i| format!("c{i}")).collect::<Vec<_>>());
        let tags = |n: usize| {
            serde_json::Value::Object((0..n).map(|i| (format!("k{i}"), "v".into())).collect())
        };
        for field in ["capabilities", "executors"] {
            let r = reg(field, names(MAX_WORKER_LABELS));
            assert_eq!(r.label_problem(), None, "{field}");
            let r = reg(field, names(10_000));
            let kept = if field == "capabilities" {
                &r.capabilities
            } else {
                &r.executors
            };
            assert_eq!(kept.len(), MAX_WORKER_LABELS + 1, "{field}");
            assert_eq!(
                r.label_problem(),
                Some(format!("at least 257 {field}; at most 256"))
            );
        }
        let r = reg("tags", tags(crate::task::MAX_LABELS));
        assert_eq!((r.tags.len(), r.label_problem()), (64, None));
        for n in [65, 10_000] {
            let r = reg("tags", tags(n));
            assert_eq!(r.tags.len(), 65);
            assert_eq!(
                r.label_problem().as_deref(),
                Some("at least 65 tags; at most 64")
            );
        }
        // A tag named twice is one tag, as before; elements are still checked for their type.
        let twice = r#"{"k":"a","k":"b"}"#;
        let r = reg("tags", serde_json::from_str(twice).expect("json"));
        assert_eq!(r.tags.get("k").map(String::as_str), Some("b"));
        let m = crate::samples::worker_messages().remove(0);
        let mut v = serde_json::to_value(&m).expect("json");
        v["capabilities"] = serde_json::json!(["cpu", 5]);
        assert!(crate::decode_worker(&v.to_string()).is_err());
    }

    /// The liveness timeout a registration states travels when given and is left out when
    /// not; an older worker's registration, without it, decodes. Under
    /// [`MIN_STATED_TIMEOUT_MS`] it is refused saying so (0 would have the coordinator ping
    /// without end); a long one is taken as it is.
    #[test]
    fn a_registrations_stated_timeout_round_trips_may_be_missing_and_is_bounded_below() {
        let sample = match crate::samples::worker_messages().remove(0) {
            WorkerMsg::Registration(r) => r,
            other => panic!("{other:?}"),
        };
        let wire = |r: &Registration| {
            let text = crate::encode(&WorkerMsg::Registration(r.clone()));
            match crate::decode_worker(&text) {
                Ok(WorkerMsg::Registration(r)) => (text, r),
                other => panic!("{text}: {other:?}"),
            }
        };
        let with = Registration {
            heartbeat_timeout_ms: Some(15_000),
            ..sample.clone()
        };
        let (text, back) = wire(&with);
        assert!(text.contains(r#""heartbeat_timeout_ms":15000"#), "{text}");
        assert_eq!(back, with);
        let without = Registration {
            heartbeat_timeout_ms: None,
            ..sample
        };
        let (text, back) = wire(&without);
        assert!(!text.contains("heartbeat_timeout_ms"), "{text}");
        assert_eq!(back, without);
        // An older worker's registration, field by field as it sent them.
        let older = serde_json::json!({"type": "registration", "worker_id": "w",
            "protocol_version": PROTOCOL_VERSION, "boot_id": "b", "slots": 1,
            "timestamp": "2026-01-01T00:00:00Z"});
        match crate::decode_worker(&older.to_string()) {
            Ok(WorkerMsg::Registration(r)) => {
                assert_eq!(r.heartbeat_timeout_ms, None);
                assert_eq!(r.label_problem(), None);
            }
            other => panic!("{other:?}"),
        }
        for ms in [0, 1, MIN_STATED_TIMEOUT_MS - 1] {
            let r = Registration {
                heartbeat_timeout_ms: Some(ms),
                ..with.clone()
            };
            assert_eq!(
                r.label_problem(),
                Some(format!(
                    "a heartbeat_timeout_ms of {ms}; at least 10 (a heartbeat interval is at least 10 ms, and the timeout longer)"
                ))
            );
        }
        for ms in [MIN_STATED_TIMEOUT_MS, 15_000, 86_400_000 * 365, u64::MAX] {
            let r = Registration {
                heartbeat_timeout_ms: Some(ms),
                ..with.clone()
            };
            assert_eq!(r.label_problem(), None, "{ms}");
            assert_eq!(wire(&r).1, r, "{ms}");
        }
    }

    /// A boot id with a control character (a newline that would forge a log line, an escape
    /// sequence for the terminal that shows the log) is refused, saying which and where, and
    /// the reason holds the character escaped, not as itself.
    #[test]
    fn a_boot_id_with_a_control_character_is_refused_saying_which() {
        let mut r = match crate::samples::worker_messages().remove(0) {
            WorkerMsg::Registration(r) => r,
            other => panic!("{other:?}"),
        };
        r.boot_id = "b-0123456789abcdef0123456789abcdef".into();
        assert_eq!(r.label_problem(), None);
        r.boot_id = "b-é-ü".into();
        assert_eq!(r.label_problem(), None, "printable text beyond ASCII");
        for (boot, shown) in [
            ("b-1\nINFO forged line", r#"('\n' at byte 3)"#),
            ("b-1\r", r#"('\r' at byte 3)"#),
            ("\u{1b}[2J", r#"('\u{1b}' at byte 0)"#),
            ("b\u{7f}", r#"('\u{7f}' at byte 1)"#),
        ] {
            r.boot_id = boot.into();
            let why = r.label_problem().expect("refused");
            assert!(
                why.contains("control character") && why.contains(shown),
                "{why}"
            );
            assert!(!why.chars().any(char::is_control), "{why:?}");
        }
    }

    /// The depth bound is serde_json's own: a text accepted at the bound can be made a tree
    /// (a task's config is, on the worker), one level deeper is refused.
    #[test]
    fn json_text_accepted_at_the_depth_bound_converts_to_a_tree() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let at = JsonText::from_text(deep(MAX_JSON_DEPTH)).expect("at the bound");
        assert!(at.to_value().is_ok(), "{:?}", at.to_value());
        let objects = format!(
            "{}1{}",
            r#"{"k":"#.repeat(MAX_JSON_DEPTH),
            "}".repeat(MAX_JSON_DEPTH)
        );
        let at = JsonText::from_text(objects).expect("at the bound");
        assert!(at.to_value().is_ok(), "{:?}", at.to_value());
        assert_eq!(
            JsonText::from_text(deep(MAX_JSON_DEPTH + 1)).map(|_| ()),
            Err(JsonTextError::TooDeep)
        );
        assert!(serde_json::from_str::<serde_json::Value>(&deep(MAX_JSON_DEPTH + 1)).is_err());
    }

    /// Every `*_ack` but a result's is a message ack; nothing else is.
    #[test]
    fn message_acks_are_the_acks_of_everything_but_results() {
        let mut seen = 0;
        for m in crate::samples::coord_messages() {
            let ty = m.type_name();
            let expect =
                ty.ends_with("_ack") && ty != "task_result_ack" && ty != "registration_ack";
            assert_eq!(m.message_ack().is_some(), expect, "{ty}");
            seen += usize::from(expect);
        }
        assert_eq!(seen, 7, "one sample of each message ack");
    }

    fn state(json: &str) -> serde_json::Result<StateJson> {
        serde_json::from_str(json)
    }

    /// A state is kept as the text received, nested at most MAX_STATE_DEPTH deep; brackets
    /// inside strings (escaped quotes included) do not count.
    fn nested(n: usize) -> serde_json::Value {
        let mut v = serde_json::json!(1);
        for i in 0..n {
            v = match i % 2 {
                0 => serde_json::json!([v]),
                _ => serde_json::json!({ "k": v }),
            };
        }
        v
    }

    /// A result nested MAX_RESULT_DEPTH deep is decoded in a `task_result`, alone or in a
    /// batch; one level more is not (so a worker must not send one); `value_depth` tells them
    /// apart, and a state made from a tree too deep is caught by `check_depth`.
    #[test]
    fn a_result_nested_up_to_the_limit_decodes_and_one_level_more_does_not() {
        use crate::codec::{decode_worker, decode_worker_batch, encode};
        let Some(WorkerMsg::TaskResult(sample)) = crate::samples::worker_messages()
            .into_iter()
            .find(|m| m.type_name() == "task_result")
        else {
            panic!("no task_result sample");
        };
        for (depth, decodes) in [(MAX_RESULT_DEPTH, true), (MAX_RESULT_DEPTH + 1, false)] {
            let v = nested(depth);
            assert_eq!(value_depth(&v, usize::MAX), depth);
            assert_eq!(
                value_depth(&v, MAX_RESULT_DEPTH) > MAX_RESULT_DEPTH,
                !decodes
            );
            let mut r = sample.clone();
            r.result = JsonText::from(&v);
            let text = encode(&WorkerMsg::TaskResult(r));
            assert_eq!(decode_worker(&text).is_ok(), decodes, "depth {depth}");
            let batch = decode_worker_batch(&format!("[{text},{text}]"), 8).expect("batch");
            assert!(batch.iter().all(|m| m.is_ok() == decodes), "depth {depth}");
        }
        assert_eq!(value_depth(&serde_json::json!(1), 5), 0);
        assert_eq!(value_depth(&serde_json::json!({"a": [1, {}]}), 5), 3);
        assert_eq!(
            value_depth(&nested(1_000), 5),
            6,
            "counted only past the limit"
        );
        let state = StateJson::from(nested(MAX_STATE_DEPTH + 1));
        assert_eq!(state.check_depth(), Err(StateTextError::TooDeep));
        assert_eq!(
            StateJson::from(nested(MAX_STATE_DEPTH)).check_depth(),
            Ok(())
        );
    }

    #[test]
    fn a_state_keeps_its_text_and_is_refused_past_the_depth_limit() {
        let s = state(r#"{"a": [1, "]]]\"[[[[", {"b": null}]}"#).expect("state");
        assert_eq!(s.get(), r#"{"a": [1, "]]]\"[[[[", {"b": null}]}"#);
        assert_eq!(nesting(s.get()), 3);
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(state(&deep(MAX_STATE_DEPTH)).is_ok());
        let e = state(&deep(MAX_STATE_DEPTH + 1)).expect_err("too deep");
        assert!(e.to_string().contains("nested deeper"), "{e}");
        // The shortest text that is too deep (texts up to twice the limit are not scanned).
        let tightest = format!(
            "{}{}",
            "[".repeat(MAX_STATE_DEPTH + 1),
            "]".repeat(MAX_STATE_DEPTH + 1)
        );
        assert!(state(&tightest).is_err());
        assert!(state("{").is_err(), "not JSON");
        // Made from a tree, it is that tree's text; equal to any spacing of it.
        let v = serde_json::json!({"n": 1, "pad": "x"});
        let made = StateJson::from(&v);
        assert_eq!(made.to_value().expect("json"), v);
        assert_eq!(made, state(r#"{ "pad": "x", "n": 1 }"#).expect("state"));
        assert_ne!(made, state(r#"{"n": 2, "pad": "x"}"#).expect("state"));
        // Made from text, it is checked as when decoded and kept as it is.
        let text = StateJson::from_text(r#"{"n":1,"pad":"x"}"#.into()).expect("text");
        assert_eq!(text.get(), r#"{"n":1,"pad":"x"}"#);
        assert_eq!(text, made);
        assert!(StateJson::from_text(deep(MAX_STATE_DEPTH)).is_ok());
        assert_eq!(
            StateJson::from_text(deep(MAX_STATE_DEPTH + 1)).expect_err("too deep"),
            StateTextError::TooDeep
        );
        assert!(matches!(
            StateJson::from_text(r#"{"n":1"#.into()),
            Err(StateTextError::NotJson(_))
        ));
    }

    fn seqs(v: &[u64]) -> Vec<Seq> {
        v.iter().copied().map(Seq).collect()
    }

    #[test]
    fn acks_cover_each_sequence_number_given_once_in_ascending_ranges() {
        let a = Acks::of(seqs(&[9, 3, 4, 5, 12, 4, 10, 11, 20]));
        assert_eq!(
            a.recorded,
            vec![(Seq(3), Seq(5)), (Seq(9), Seq(12)), (Seq(20), Seq(20))]
        );
        assert_eq!(a.seqs(), Some(seqs(&[3, 4, 5, 9, 10, 11, 12, 20])));
        assert_eq!(Acks::of(Vec::new()).recorded, vec![]);
    }

    #[test]
    fn acks_with_an_inverted_range_or_covering_too_many_are_refused() {
        let at = |recorded: Vec<(Seq, Seq)>| Acks {
            recorded,
            timestamp: now(),
        };
        assert_eq!(at(vec![(Seq(5), Seq(4))]).seqs(), None);
        assert_eq!(at(vec![(Seq(0), Seq(u64::MAX))]).seqs(), None);
        let limit = at(vec![(Seq(1), Seq(MAX_ACKS_COVERED))]);
        assert_eq!(limit.seqs().map(|s| s.len() as u64), Some(MAX_ACKS_COVERED));
        let over = at(vec![
            (Seq(1), Seq(MAX_ACKS_COVERED)),
            (Seq(MAX_ACKS_COVERED + 5), Seq(MAX_ACKS_COVERED + 5)),
        ]);
        assert_eq!(over.seqs(), None);
    }
}
