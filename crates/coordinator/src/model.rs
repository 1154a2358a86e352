//! The coordinator's in-memory model: tasks, leases and workers. The store persists every
//! change to it; on start the model is rebuilt from the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tether_proto::task::ConnStats;
use tether_proto::{Attempt, CheckpointId, Outcome, TaskId, TaskSpec, TaskStatus, WorkerId};

/// A map keyed by ids, hashed with foldhash (seeded per map) rather than SipHash: the core and
/// the store look ids up several times per message, and SipHash was 1-1.5 % of the
/// coordinator's samples under `message_flood`.
pub type IdMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;
/// A set of ids, hashed like [`IdMap`].
pub type IdSet<K> = std::collections::HashSet<K, foldhash::quality::RandomState>;

/// What the coordinator wants of a leased task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Paused,
}

/// A lease: one attempt of a task held by one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    #[schema(value_type = String)]
    pub worker: WorkerId,
    #[schema(value_type = u32)]
    pub attempt: Attempt,
    pub since: DateTime<Utc>,
    pub desired: Desired,
}

/// One attempt in a task's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptRecord {
    #[schema(value_type = u32)]
    pub attempt: Attempt,
    #[schema(value_type = String)]
    pub worker: WorkerId,
    pub started_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// How the attempt ended: an outcome, `lost`, `stopped` (its worker stopped gracefully
    /// without finishing it), `cancelled`, `superseded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// A result from this attempt was recorded (counted or stale).
    #[serde(default)]
    pub result_recorded: bool,
    /// Why this attempt's latest refused checkpoint was refused (larger than the coordinator
    /// keeps). A resume starts from the task's latest kept checkpoint, which may be earlier
    /// or later than this one, or afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_refused: Option<String>,
    /// Why the worker last said it could not provide a checkpoint of this attempt
    /// (`checkpoint_error`, the answer to a `checkpoint_request` it cannot serve), its first
    /// [`tether_proto::msg::LOGGED_MESSAGE_CHARS`] characters; `checkpoint_error_at` says when
    /// the coordinator received it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_error_at: Option<DateTime<Utc>>,
}

/// Metadata of a stored checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointMeta {
    #[schema(value_type = String)]
    pub checkpoint_id: CheckpointId,
    #[schema(value_type = String)]
    pub task_id: TaskId,
    #[schema(value_type = u32)]
    pub attempt: Attempt,
    #[schema(value_type = String)]
    pub worker: WorkerId,
    pub size: u64,
    pub chunks: u32,
    pub created_at: DateTime<Utc>,
}

/// A task as the coordinator records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Task {
    #[schema(value_type = String)]
    pub task_id: TaskId,
    /// The submitted spec: kind, config, requires, tags, priority, timeout_ms, max_attempts.
    #[schema(value_type = Object)]
    pub spec: Arc<TaskSpec>,
    /// queued, running, paused, completed, failed, cancelled or timed_out.
    #[schema(value_type = String)]
    pub status: TaskStatus,
    /// Number of the latest lease (`attempt_base` before the first).
    #[schema(value_type = u32)]
    pub attempt: Attempt,
    /// The last attempt number of earlier tasks of this id, removed by retention (0 when there
    /// were none): this task's attempts are numbered after them, so that a worker still holding
    /// one of theirs (a result in its outbox, an attempt it remembers finishing) can never
    /// mistake it for one of this task's, nor the coordinator count it.
    #[serde(default, skip_serializing_if = "Attempt::is_zero")]
    #[schema(value_type = u32)]
    pub attempt_base: Attempt,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    pub submit_seq: u64,
    pub submitted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The outcome of the counted result, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub outcome: Option<Outcome>,
    /// Why the task failed or was cancelled, when the coordinator decided it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<Box<CheckpointMeta>>,
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// The task submitted as this one's retry (whose spec's `retry_of` names this one), when
    /// there is one: at most one, so a chain of retries ends at a run's latest try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub retried_by: Option<TaskId>,
    /// The values of the spec's `env` were replaced by [`REDACTED`] in this copy, given to a
    /// caller who may not see them ([`Self::without_env_values`]): its spec, submitted again,
    /// would run with the placeholder. Only ever set on such copies, so never stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub env_redacted: bool,
    /// Monotonic start of the current lease, for the timeout backstop (at coordinator start,
    /// the lease's `since` taken back from now).
    #[serde(skip)]
    pub lease_started: Option<tokio::time::Instant>,
}

/// What a worker lacks to run a task ([`Worker::lacks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lack<'a> {
    /// The executor of the task's kind.
    Executor(&'a str),
    /// A capability the task requires.
    Capability(&'a str),
    /// A tag the task names, with its value.
    Tag(&'a str, &'a str),
}

impl std::fmt::Display for Lack<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lack::Executor(kind) => write!(f, "the `{kind}` executor"),
            Lack::Capability(c) => write!(f, "capability {c}"),
            Lack::Tag(k, v) => write!(f, "tag {k}={v}"),
        }
    }
}

/// What a task's `env` values are replaced with for a caller who may not see them
/// ([`crate::auth::EnvShown`]).
pub const REDACTED: &str = "(redacted)";

impl Task {
    /// A task of the tests: `id`, `spec`, `status`, submitted as `seq` at `at`, never leased.
    #[cfg(test)]
    pub(crate) fn fixture(
        id: &str,
        spec: TaskSpec,
        status: TaskStatus,
        seq: u64,
        at: DateTime<Utc>,
    ) -> Self {
        Task {
            task_id: TaskId::parse(id).expect("id"),
            spec: Arc::new(spec),
            status,
            attempt: Attempt::default(),
            attempt_base: Attempt::default(),
            lease: None,
            submit_seq: seq,
            submitted_at: at,
            updated_at: at,
            env_redacted: false,
            finished_at: None,
            outcome: None,
            error: None,
            latest_checkpoint: None,
            attempts: vec![],
            lease_started: None,
            retried_by: None,
        }
    }

    /// This task with each value of its config's `env` object replaced by [`REDACTED`], the
    /// names kept; as it is when it has none. A config without the text `"env"` (nor an
    /// escape, which could spell it) is not parsed.
    pub fn without_env_values(mut self) -> Self {
        let text = self.spec.config.get();
        if !text.contains("\"env\"") && !text.contains('\\') {
            return self;
        }
        let Ok(mut config) = self.spec.config.to_value() else {
            return self;
        };
        let Some(serde_json::Value::Object(env)) = config.get_mut("env") else {
            return self;
        };
        if env.is_empty() {
            return self;
        }
        for value in env.values_mut() {
            *value = serde_json::Value::String(REDACTED.into());
        }
        let mut spec = (*self.spec).clone();
        spec.config = config.into();
        self.spec = Arc::new(spec);
        self.env_redacted = true;
        self
    }

    pub fn max_attempts(&self) -> u32 {
        self.spec
            .max_attempts
            .unwrap_or(tether_proto::task::DEFAULT_MAX_ATTEMPTS)
    }

    /// Attempts this task has started (leases given), not counting earlier tasks of its id.
    pub fn attempts_started(&self) -> u32 {
        self.attempt.0.saturating_sub(self.attempt_base.0)
    }

    pub fn attempt_record(&mut self, attempt: Attempt) -> Option<&mut AttemptRecord> {
        self.attempts.iter_mut().find(|a| a.attempt == attempt)
    }

    /// The queue key: priority, then submission order.
    pub fn queue_key(&self) -> (u8, u64) {
        (self.spec.priority, self.submit_seq)
    }
}

/// A worker as the coordinator knows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Worker {
    #[schema(value_type = String)]
    pub worker_id: WorkerId,
    pub capabilities: BTreeSet<String>,
    pub tags: BTreeMap<String, String>,
    pub slots: u32,
    pub executors: BTreeSet<String>,
    pub boot_id: String,
    /// `connected` (registered session), `disconnected` (within grace), `lost`, or `stopped`
    /// (gracefully, holding nothing). A worker is listed once registered: a connection that has
    /// not registered is not a worker yet.
    pub state: WorkerState,
    #[schema(value_type = Vec<String>)]
    pub leases: BTreeSet<TaskId>,
    pub first_seen: DateTime<Utc>,
    /// The last frame from the worker: heartbeats too while it is connected.
    pub last_seen: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected_at: Option<DateTime<Utc>>,
    /// While disconnected: when the coordinator's grace for it ends and its leases go to other
    /// workers (`--lost-after` from the disconnection; for a worker a restarted coordinator
    /// found away, from that start). Set in the records the API and the event stream show
    /// (`Core::view`), never stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_at: Option<DateTime<Utc>>,
    pub sessions: u64,
    /// The worker said it is stopping (`worker_stopping`): it takes no new tasks. Cleared by
    /// its next registration (a process that starts again says so anew if it stops again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
    /// Drained by an operator (`POST /api/v1/workers/{id}/drain`, `tether drain`): it takes no
    /// new task, and what it holds runs on to its end, until undrained. Saved, and kept across
    /// the worker's sessions and processes and the coordinator's restarts: a machine taken
    /// out for maintenance stays out until someone puts it back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// While some: the worker reported that it could not run an attempt for a fault of its own
    /// (`worker_fault`: its disk, its process limits), and it takes no new task until the rest
    /// ends, so that a worker that cannot run anything does not take every queued task's
    /// attempts one after another. Not saved: a restarted coordinator tries it again at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resting: Option<Box<Rest>>,
    /// Results in a row that said the worker could not run its attempt; each doubles the
    /// next rest, and a result of a task it ran, or a new process, clears it.
    #[serde(skip)]
    pub faults_in_row: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The latest connection statistics the worker reported, and when (`reported_at`).
    #[schema(value_type = Option<Object>)]
    /// Boxed: most of the time nobody reads it, and inline it would size every worker's entry.
    pub stats: Option<Box<Reported>>,
    /// When the record was last saved with its statistics, by a registration or a telemetry
    /// report (telemetry saves it at most every `STATS_SAVE_EVERY`; core::messages).
    #[serde(skip)]
    pub stats_saved: Option<tokio::time::Instant>,
    /// When the record was last announced to event streams for its statistics alone (at most
    /// every `STATS_ANNOUNCE_EVERY`; core::messages).
    #[serde(skip)]
    pub stats_announced: Option<tokio::time::Instant>,
    /// Monotonic instant of the disconnect, for the grace period.
    #[serde(skip)]
    pub disconnected_mono: Option<tokio::time::Instant>,
    #[serde(skip)]
    pub session: Option<crate::core::SessionRef>,
    /// The `boot_id`s of processes a newer process of this worker id replaced (the latest
    /// few, kept across restarts): one of them registering again means two live
    /// processes share the id, and it is refused (core::messages::superseded_refusal).
    #[serde(skip)]
    pub superseded: Vec<String>,
}

/// A worker's rest after a fault of its own ([`Worker::resting`]).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Rest {
    /// When it takes tasks again.
    pub until: DateTime<Utc>,
    /// Results in a row that said it could not run its attempt, the one that began this rest
    /// included.
    pub faults: u32,
    /// The worker's words on the last of them.
    pub error: String,
    #[serde(skip)]
    pub ends: tokio::time::Instant,
}

/// A worker's latest connection statistics, and when the coordinator received them: they are
/// as old as the report (telemetry comes every 30 s by default).
#[derive(Debug, Clone, Serialize)]
pub struct Reported {
    #[serde(flatten)]
    pub stats: ConnStats,
    pub reported_at: DateTime<Utc>,
}

impl std::ops::Deref for Reported {
    type Target = ConnStats;

    fn deref(&self) -> &ConnStats {
        &self.stats
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Connected,
    Disconnected,
    Lost,
    /// Stopped gracefully: it said it was stopping, and its session ended holding no lease.
    /// Not lost (not counted in `workers_lost`); a registration makes it connected again.
    Stopped,
}

impl WorkerState {
    pub const ALL: [WorkerState; 4] = [
        WorkerState::Connected,
        WorkerState::Disconnected,
        WorkerState::Lost,
        WorkerState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Connected => "connected",
            WorkerState::Disconnected => "disconnected",
            WorkerState::Lost => "lost",
            WorkerState::Stopped => "stopped",
        }
    }
}

impl Worker {
    pub fn new(worker_id: WorkerId, now: DateTime<Utc>) -> Self {
        Self {
            worker_id,
            capabilities: BTreeSet::new(),
            tags: BTreeMap::new(),
            slots: 0,
            executors: BTreeSet::new(),
            boot_id: String::new(),
            state: WorkerState::Disconnected,
            leases: BTreeSet::new(),
            first_seen: now,
            last_seen: now,
            disconnected_at: Some(now),
            lost_at: None,
            sessions: 0,
            stopping: false,
            draining: false,
            resting: None,
            faults_in_row: 0,
            stats: None,
            stats_saved: None,
            stats_announced: None,
            disconnected_mono: Some(tokio::time::Instant::now()),
            session: None,
            superseded: Vec::new(),
        }
    }

    /// Takes the session's last frame into `last_seen`: the core sees no heartbeat, so its
    /// own `last_seen` is the last message it handled.
    pub fn fold_seen(&mut self) {
        if let Some(t) = self.session.as_ref().and_then(|s| s.seen.get()) {
            self.last_seen = self.last_seen.max(t);
        }
    }

    /// A copy as the API shows it: `last_seen` up to the session's last frame.
    pub fn seen_now(&self) -> Self {
        let mut w = self.clone();
        w.fold_seen();
        w
    }

    /// Free slots, when the worker may take work now (never once it said it is stopping, while
    /// it is drained, nor while it rests after a fault of its own).
    pub fn free_slots(&self) -> usize {
        if self.state != WorkerState::Connected
            || self.session.is_none()
            || self.stopping
            || self.draining
            || self.resting.is_some()
        {
            return 0;
        }
        (self.slots as usize).saturating_sub(self.leases.len())
    }

    /// Whether this worker can run `spec`.
    pub fn can_run(&self, spec: &TaskSpec) -> bool {
        self.lacks(&spec.kind, &spec.requires, &spec.tags).is_none()
    }

    /// What this worker lacks to run tasks of `kind` that require `requires` and name `tags`:
    /// the first the rule finds (the kind's executor, a capability, a tag with that value), or
    /// `None` when it can run them. The one rule: dispatch (`queue::Requirement::met_by`),
    /// [`Self::can_run`] and `tether task`'s account of a waiting task apply it. Inlined:
    /// dispatch asks it for every class of queued task against every free worker.
    #[inline]
    pub fn lacks<'a>(
        &self,
        kind: &'a str,
        requires: &'a [String],
        tags: &'a BTreeMap<String, String>,
    ) -> Option<Lack<'a>> {
        if !self.executors.contains(kind) {
            return Some(Lack::Executor(kind));
        }
        if let Some(c) = requires.iter().find(|c| !self.capabilities.contains(*c)) {
            return Some(Lack::Capability(c));
        }
        tags.iter()
            .find(|(k, v)| self.tags.get(*k) != Some(*v))
            .map(|(k, v)| Lack::Tag(k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_config(config: &str) -> Task {
        let spec: TaskSpec =
            serde_json::from_str(&format!(r#"{{"kind": "command", "config": {config}}}"#))
                .expect("spec");
        Task::fixture("t-1", spec, TaskStatus::Queued, 0, Utc::now())
    }

    fn config_after(config: &str) -> serde_json::Value {
        with_config(config)
            .without_env_values()
            .spec
            .config
            .to_value()
            .expect("json")
    }

    /// Each value of `env` is replaced, its names and the rest of the config kept, and the
    /// copy marked (`env_redacted`); a key spelled with an escape is the same key; a config
    /// without an `env` object, or with an empty one, is shown as submitted, unmarked.
    #[test]
    fn env_values_are_replaced_and_nothing_else() {
        assert_eq!(
            config_after(r#"{"program": "p", "args": ["a"], "env": {"K": "v", "N": 3}}"#),
            json!({"program": "p", "args": ["a"], "env": {"K": REDACTED, "N": REDACTED}})
        );
        assert_eq!(
            config_after(r#"{"shell": "s", "\u0065nv": {"K": "v"}}"#),
            json!({"shell": "s", "env": {"K": REDACTED}})
        );
        for kept in [
            r#"{"program": "env"}"#,
            r#"{"env": "not an object"}"#,
            r#"{"env": {}}"#,
            r#"{"nested": {"env": {"K": "v"}}}"#,
            r#"[1, "env"]"#,
        ] {
            let task = with_config(kept);
            let before = Arc::clone(&task.spec);
            let after = task.without_env_values();
            assert!(Arc::ptr_eq(&before, &after.spec), "{kept}: not rebuilt");
            assert!(!after.env_redacted, "{kept}: nothing hidden, not marked");
        }
        let hidden = with_config(r#"{"shell": "s", "env": {"K": "v"}}"#).without_env_values();
        assert!(hidden.env_redacted, "a copy with values hidden says so");
    }
}
