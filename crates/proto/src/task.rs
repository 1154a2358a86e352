//! Task vocabulary shared by the wire messages and the HTTP API.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{Attempt, TaskId};
use crate::msg::JsonText;

/// One attempt of one task.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskRef {
    pub task_id: TaskId,
    pub attempt: Attempt,
    /// Whether the task is paused (inventory and heartbeats only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

impl TaskRef {
    pub fn new(task_id: TaskId, attempt: Attempt) -> Self {
        Self {
            task_id,
            attempt,
            paused: false,
        }
    }
}

/// How an attempt ended, as the worker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

/// An end of an attempt, reported by its worker, that runs the task again while it has
/// attempts left ([`TaskSpec::retry_on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    Failed,
    TimedOut,
}

impl RetryOn {
    /// The end `outcome` is, when it is one a task may be retried on.
    pub fn of(outcome: Outcome) -> Option<Self> {
        match outcome {
            Outcome::Failed => Some(Self::Failed),
            Outcome::TimedOut => Some(Self::TimedOut),
            Outcome::Completed | Outcome::Cancelled => None,
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Where a task is in its life, as the coordinator records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for a worker.
    Queued,
    /// Leased to a worker, which runs it.
    Running,
    /// Leased and paused on its worker.
    Paused,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Paused,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
        TaskStatus::TimedOut,
    ];

    /// Failed or timed out: an end a task may be run again on (`retry_on`), and one that makes
    /// a later completion of it flaky.
    pub fn is_failure(self) -> bool {
        matches!(self, TaskStatus::Failed | TaskStatus::TimedOut)
    }

    /// Whether `end` (a status, or an attempt's end such as `lost`) is a failure
    /// ([`Self::is_failure`]).
    pub fn is_failure_end(end: Option<&str>) -> bool {
        end.and_then(TaskStatus::parse)
            .is_some_and(TaskStatus::is_failure)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed
                | TaskStatus::Failed
                | TaskStatus::Cancelled
                | TaskStatus::TimedOut
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Paused => "paused",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl From<Outcome> for TaskStatus {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Completed => TaskStatus::Completed,
            Outcome::Failed => TaskStatus::Failed,
            Outcome::Cancelled => TaskStatus::Cancelled,
            Outcome::TimedOut => TaskStatus::TimedOut,
        }
    }
}

/// What a client submits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Optional caller-chosen id, which names one task while the coordinator keeps it: the
    /// same spec submitted again under it is answered with that task (nothing is made), another
    /// spec is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// Executor kind: `command`, `sleep`, or one an embedding program registered.
    pub kind: String,
    /// What the executor is given, as JSON (`null` when absent). Kept as the text it came in
    /// ([`JsonText`]): the coordinator never looks inside it.
    #[serde(default)]
    pub config: JsonText,
    /// Lower runs first; 0..=9, default 5.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Capabilities a worker must advertise.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Tags a worker must carry with these values.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Attempts the task gets: each lease is one, whether it was lost with its worker or
    /// ended in a way `retry_on` runs again; default 3, at most [`MAX_ATTEMPTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Ends of an attempt, as its worker reports them, that run the task again (a flaky test
    /// that failed, a benchmark that timed out) while it has attempts left: the attempt's
    /// result is kept, not counted, and the next attempt resumes from the task's latest
    /// checkpoint, as after a lost one. The last attempt's end is the task's. Default none:
    /// a reported failure ends the task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    /// Free-form label shown in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The ended task this one runs again: the coordinator records the retry on that task
    /// (its `retried_by`), and takes at most one retry of a task, so a run's latest try of
    /// each of its tasks is found by following `retried_by`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<TaskId>,
}

/// Default task priority.
pub const DEFAULT_PRIORITY: u8 = 5;
/// Lowest-urgency priority value accepted.
pub const MAX_PRIORITY: u8 = 9;
/// Default number of attempts.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Most attempts a task may ask for. Each lease adds an attempt record (up to about 250 bytes
/// with a long worker id) that every save of the task rewrites and its API answer carries: 100
/// keep a save under 25 KB and the bytes written over the task's life near 1 MB, where
/// 1,000,000 on a fleet the task keeps crashing grew without bound. A task lost 100 times is
/// not unlucky.
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest task name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Most capabilities a task may require, and most tags it may ask for.
pub const MAX_LABELS: usize = 64;
/// Longest capability, tag key or tag value a task may name, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;

fn default_priority() -> u8 {
    DEFAULT_PRIORITY
}

impl TaskSpec {
    /// A spec of the given kind and config with every other field at its default.
    pub fn new(kind: impl Into<String>, config: serde_json::Value) -> Self {
        let config = JsonText::from(&config);
        Self {
            task_id: None,
            kind: kind.into(),
            config,
            priority: DEFAULT_PRIORITY,
            requires: Vec::new(),
            tags: BTreeMap::new(),
            timeout_ms: None,
            max_attempts: None,
            retry_on: Vec::new(),
            name: None,
            retry_of: None,
        }
    }

    /// Whether an attempt that ended with `outcome` runs the task again (its `retry_on` names
    /// that end), attempts allowing.
    pub fn retries_on(&self, outcome: Outcome) -> bool {
        RetryOn::of(outcome).is_some_and(|on| self.retry_on.contains(&on))
    }

    /// Checks the fields a coordinator must refuse.
    pub fn validate(&self) -> Result<(), String> {
        if self.kind.is_empty() || self.kind.len() > 64 {
            return Err("kind must be 1 to 64 characters".into());
        }
        if self.priority > MAX_PRIORITY {
            return Err(format!("priority must be 0..={MAX_PRIORITY}"));
        }
        if let Some(n) = self
            .max_attempts
            .filter(|n| !(1..=MAX_ATTEMPTS).contains(n))
        {
            return Err(format!(
                "max_attempts of {n}; it must be 1..={MAX_ATTEMPTS}"
            ));
        }
        let mut on = self.retry_on.clone();
        on.sort_unstable();
        on.dedup();
        if on.len() != self.retry_on.len() {
            return Err("retry_on: each of failed and timed_out at most once".into());
        }
        if !self.retry_on.is_empty() && self.max_attempts == Some(1) {
            return Err(
                "retry_on with max_attempts 1 never runs the task again: give max_attempts 2 or more"
                    .into(),
            );
        }
        if self.timeout_ms == Some(0) {
            return Err("timeout_ms must be positive".into());
        }
        // What no worker could match: the task would wait in the queue for ever.
        if self.requires.iter().any(|c| c.trim().is_empty()) {
            return Err("requires: an empty capability is one no worker offers".into());
        }
        if self.tags.keys().any(|k| k.trim().is_empty()) {
            return Err("tags: an empty key is one no worker carries".into());
        }
        // Labels are shown in every listing and matched at every dispatch: bounded.
        if let Some(name) = self.name.as_ref().filter(|n| n.len() > MAX_NAME_BYTES) {
            return Err(format!(
                "name of {} bytes; at most {MAX_NAME_BYTES}",
                name.len()
            ));
        }
        if self.requires.len() > MAX_LABELS || self.tags.len() > MAX_LABELS {
            return Err(format!(
                "at most {MAX_LABELS} requires and {MAX_LABELS} tags"
            ));
        }
        let labels = self
            .requires
            .iter()
            .chain(self.tags.iter().flat_map(|(k, v)| [k, v]));
        if let Some(l) = labels.into_iter().find(|l| l.len() > MAX_LABEL_BYTES) {
            return Err(format!(
                "a capability or tag of {} bytes; at most {MAX_LABEL_BYTES}",
                l.len()
            ));
        }
        Ok(())
    }
}

/// Bytes carried in JSON as standard base64.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Blob(pub Vec<u8>);

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Blob)
            .map_err(serde::de::Error::custom)
    }
}

/// Connection statistics of a worker, with the formulas the original got wrong done right.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConnStats {
    /// `connecting`, `connected`, `disconnected`, `failed` or `shutdown`.
    pub state: String,
    pub connection_attempts: u64,
    pub successful_connections: u64,
    pub failed_connections: u64,
    /// Sessions that ended after they were established.
    pub disconnections: u64,
    /// Seconds connected, including the current session.
    pub connected_secs: f64,
    /// Seconds since the worker started.
    pub total_secs: f64,
    /// connected_secs / total_secs (1.0 before any time has passed).
    pub stability: f64,
    /// successful_connections / connection_attempts (1.0 before any attempt).
    pub success_rate: f64,
    /// The heartbeat round trips the RTT figures are over: those of the session under way (a
    /// new session, maybe over another path, starts them over), of the last 5 minutes, the
    /// latest 128 at most, each answered with no queue on the link (one sent behind 16 KiB
    /// unacknowledged, or answered behind as much, measures the queue and is left out). 0:
    /// none yet, and the figures below are 0, not a measure.
    pub rtt_samples: u64,
    /// The mean of those round trips, ms.
    pub rtt_avg_ms: f64,
    /// Their percentiles, ms, by nearest rank (over 60 samples, the p99 is the largest).
    pub rtt_p50_ms: f64,
    pub rtt_p95_ms: f64,
    pub rtt_p99_ms: f64,
    /// Sessions lost and followed by a registered one (a count).
    pub reconnects: u64,
    /// Time from losing a session to the next registered one: mean and longest, ms.
    pub reconnect_avg_ms: f64,
    pub reconnect_max_ms: f64,
    /// Current adaptive values.
    pub heartbeat_timeout_ms: u64,
    /// The session's heartbeat interval (the coordinator's when it asked for a longer one to
    /// keep its fleet within its heartbeat budget).
    #[serde(default)]
    pub heartbeat_interval_ms: u64,
    /// The link's delivery rate to the coordinator, bytes a second, as acknowledgements
    /// measured it while the worker had more to send than went at once (the send window or
    /// its pace held the rest): the most of such samples of the last 5 to 10 s, or the last
    /// such measure when there are none (an idle worker shows what its link carried when it
    /// was last busy). Messages sent with nothing behind them are left out: their samples say
    /// how little there was to send (one report over a 300 ms path reads 3 kB/s), not how fast
    /// the link is. 0: never so measured. The send window and checkpoint pieces are sized
    /// from every sample.
    #[serde(default)]
    pub send_bytes_per_sec: u64,
    pub backoff_factor: f64,
    pub next_backoff_ms: u64,
}

/// The longest `state` of [`ConnStats`] kept, bytes (the states are short words).
pub const MAX_CONN_STATE_BYTES: usize = 32;

impl ConnStats {
    /// Makes what a worker reported fit to be kept, summed and shown: a figure that is not a
    /// finite number of at least 0 becomes 0 (the coordinator sums round-trip times into a
    /// histogram, where one `1.7e308` or `-1e300` would spoil the fleet's figure until a
    /// restart), a ratio is held within 0 to 1, and the state is cut to
    /// [`MAX_CONN_STATE_BYTES`].
    pub fn sanitize(&mut self) {
        /// Figures past this (ms: more than a year; s: more than 30,000 years) are no
        /// measure.
        const MOST: f64 = 1e12;
        for v in [
            &mut self.connected_secs,
            &mut self.total_secs,
            &mut self.rtt_avg_ms,
            &mut self.rtt_p50_ms,
            &mut self.rtt_p95_ms,
            &mut self.rtt_p99_ms,
            &mut self.reconnect_avg_ms,
            &mut self.reconnect_max_ms,
            &mut self.backoff_factor,
        ] {
            if !(v.is_finite() && (0.0..=MOST).contains(v)) {
                *v = 0.0;
            }
        }
        for v in [&mut self.stability, &mut self.success_rate] {
            *v = if v.is_finite() {
                v.clamp(0.0, 1.0)
            } else {
                0.0
            };
        }
        if self.state.len() > MAX_CONN_STATE_BYTES {
            let mut end = MAX_CONN_STATE_BYTES;
            while !self.state.is_char_boundary(end) {
                end -= 1;
            }
            self.state.truncate(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{JsonText, MAX_JSON_DEPTH};

    #[test]
    fn reported_connection_figures_out_of_range_are_made_zero_and_ratios_held_to_one() {
        let mut s = ConnStats {
            state: "é".repeat(40),
            rtt_samples: 3,
            rtt_p50_ms: 1.7e308,
            rtt_p95_ms: -1e300,
            rtt_p99_ms: 12.5,
            stability: 7.0,
            success_rate: -1.0,
            connected_secs: f64::NAN,
            total_secs: f64::INFINITY,
            ..ConnStats::default()
        };
        s.sanitize();
        assert_eq!((s.rtt_p50_ms, s.rtt_p95_ms, s.rtt_p99_ms), (0.0, 0.0, 12.5));
        assert_eq!((s.stability, s.success_rate), (1.0, 0.0));
        assert_eq!((s.connected_secs, s.total_secs), (0.0, 0.0));
        assert_eq!(s.state, "é".repeat(16));
        assert_eq!(s.rtt_samples, 3);
    }

    /// A spec no worker could ever match is refused, not left queued for ever.
    #[test]
    fn a_spec_requiring_an_empty_capability_or_tag_key_is_refused() {
        let mut spec = TaskSpec::new("sleep", serde_json::json!({}));
        spec.requires = vec!["cpu".into()];
        spec.tags.insert("rack".into(), "r1".into());
        spec.validate().expect("valid");
        let mut empty = spec.clone();
        empty.requires.push(" ".into());
        assert!(empty.validate().expect_err("refused").contains("requires"));
        let mut keyless = spec.clone();
        keyless.tags.insert(String::new(), "x".into());
        assert!(keyless.validate().expect_err("refused").contains("tags"));
        let mut named = TaskSpec::new("sleep", serde_json::json!({}));
        named.name = Some("n".repeat(MAX_NAME_BYTES));
        named.validate().expect("a name at the limit");
        named.name = Some("n".repeat(MAX_NAME_BYTES + 1));
        assert!(
            named
                .validate()
                .expect_err("refused")
                .contains("name of 1025 bytes")
        );
        let mut labelled = TaskSpec::new("sleep", serde_json::json!({}));
        labelled
            .tags
            .insert("pool".into(), "v".repeat(MAX_LABEL_BYTES + 1));
        assert!(
            labelled
                .validate()
                .expect_err("refused")
                .contains("257 bytes")
        );
        labelled.tags.clear();
        labelled.requires = (0..=MAX_LABELS).map(|i| format!("c{i}")).collect();
        assert!(
            labelled
                .validate()
                .expect_err("refused")
                .contains("at most 64")
        );
    }

    #[test]
    fn max_attempts_is_refused_above_its_cap_and_at_zero_with_the_bounds_named() {
        let mut spec = TaskSpec::new("sleep", serde_json::json!({}));
        for ok in [
            None,
            Some(1),
            Some(DEFAULT_MAX_ATTEMPTS),
            Some(MAX_ATTEMPTS),
        ] {
            spec.max_attempts = ok;
            spec.validate().expect("within the bounds");
        }
        for (n, says) in [
            (MAX_ATTEMPTS + 1, "max_attempts of 101; it must be 1..=100"),
            (1_000_000, "max_attempts of 1000000; it must be 1..=100"),
            (0, "max_attempts of 0; it must be 1..=100"),
        ] {
            spec.max_attempts = Some(n);
            assert_eq!(spec.validate().expect_err("refused"), says);
        }
    }

    /// A failure is an end `failed` or `timed_out`, a status or an attempt's; a cancel, a
    /// completion, and an attempt's own ends (`lost`, `stopped`) are not.
    #[test]
    fn a_failure_is_failed_or_timed_out() {
        for end in ["failed", "timed_out"] {
            assert!(TaskStatus::is_failure_end(Some(end)), "{end}");
        }
        for end in [
            "completed",
            "cancelled",
            "running",
            "lost",
            "stopped",
            "worker_fault",
        ] {
            assert!(!TaskStatus::is_failure_end(Some(end)), "{end}");
        }
        assert!(!TaskStatus::is_failure_end(None));
    }

    /// `retry_on` reads the two ends a worker reports that may run a task again, each once, and
    /// needs an attempt to spare; anything else is refused with what to give.
    #[test]
    fn retry_on_takes_failed_and_timed_out_once_each_with_attempts_to_spare() {
        let read = |v: serde_json::Value| serde_json::from_value::<TaskSpec>(v);
        let spec = read(serde_json::json!({"kind": "sleep", "retry_on": ["failed", "timed_out"]}))
            .expect("a spec");
        assert_eq!(spec.retry_on, vec![RetryOn::Failed, RetryOn::TimedOut]);
        spec.validate().expect("valid");
        for end in ["completed", "cancelled", "lost"] {
            let e = read(serde_json::json!({"kind": "sleep", "retry_on": [end]}))
                .expect_err("not an end to retry on");
            assert!(e.to_string().contains("unknown variant"), "{end}: {e}");
        }
        let mut twice = spec.clone();
        twice.retry_on = vec![RetryOn::Failed, RetryOn::Failed];
        assert!(
            twice
                .validate()
                .expect_err("refused")
                .contains("at most once")
        );
        let mut one = spec;
        one.max_attempts = Some(1);
        assert!(
            one.validate()
                .expect_err("refused")
                .contains("max_attempts 2 or more")
        );
        one.max_attempts = Some(2);
        one.validate().expect("an attempt to spare");
        assert_eq!(RetryOn::of(Outcome::TimedOut), Some(RetryOn::TimedOut));
        assert_eq!(RetryOn::of(Outcome::Completed), None);
        assert_eq!(RetryOn::of(Outcome::Cancelled), None);
        assert!(one.retries_on(Outcome::Failed) && one.retries_on(Outcome::TimedOut));
        assert!(!one.retries_on(Outcome::Completed) && !one.retries_on(Outcome::Cancelled));
        one.retry_on = vec![RetryOn::Failed];
        assert!(
            !one.retries_on(Outcome::TimedOut),
            "an end it does not name"
        );
    }

    #[test]
    fn a_specs_config_is_kept_as_the_text_it_came_in_and_passed_on_as_it_is() {
        let text = r#"{"kind":"sleep","config":{"steps":3,"ms":20,"note":"b\u00e9"}}"#;
        let spec: TaskSpec = serde_json::from_str(text).expect("spec");
        // Not a tree made again: key order and escapes as sent.
        assert_eq!(spec.config.get(), r#"{"steps":3,"ms":20,"note":"b\u00e9"}"#);
        assert_eq!(
            spec.config,
            serde_json::json!({"ms": 20, "steps": 3, "note": "bé"})
        );
        let out = serde_json::to_string(&spec).expect("encode");
        assert!(
            out.contains(r#""config":{"steps":3,"ms":20,"note":"b\u00e9"}"#),
            "{out}"
        );
        // From a tree (the API's body is one), the text is the tree's.
        let v = serde_json::json!({"kind": "sleep", "config": {"ms": 1}});
        let from_tree: TaskSpec = serde_json::from_value(v).expect("from a tree");
        assert_eq!(from_tree.config.get(), r#"{"ms":1}"#);
    }

    #[test]
    fn an_absent_config_is_null_and_one_nested_too_deep_is_refused() {
        let spec: TaskSpec = serde_json::from_str(r#"{"kind":"sleep"}"#).expect("spec");
        assert_eq!(spec.config.get(), "null");
        assert_eq!(
            TaskSpec::new("sleep", serde_json::Value::Null).config,
            spec.config
        );
        assert_eq!(JsonText::default().get(), "null");
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let ok = format!(r#"{{"kind":"sleep","config":{}}}"#, deep(MAX_JSON_DEPTH));
        assert!(serde_json::from_str::<TaskSpec>(&ok).is_ok());
        let too = format!(
            r#"{{"kind":"sleep","config":{}}}"#,
            deep(MAX_JSON_DEPTH + 1)
        );
        let e = serde_json::from_str::<TaskSpec>(&too).expect_err("too deep");
        assert!(
            e.to_string()
                .contains(&format!("nested deeper than {MAX_JSON_DEPTH}")),
            "{e}"
        );
    }
}
