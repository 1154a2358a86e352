//! What a fault is: its kind and attributes, the stream it sits on, its toxicity and the links
//! it targets; validation, and the JSON shape shared by the Rust API and the control API.
//!
//! JSON: `{"name":"bh","kind":"blackhole","attributes":{},"direction":"upstream",
//! "toxicity":1.0,"target":"all"}`; `target` is `"all"` or `{"workers":["w1","w2"]}`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tether_proto::WorkerId;

/// Longest proxy or fault name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Longest delay any attribute may ask for (one hour), so deadlines never overflow.
pub const MAX_DELAY_MS: u64 = 3_600_000;

/// Largest slicer piece (`average_size + size_variation`) accepted: 1 GiB, far above any chunk
/// (32 KiB), so every useful slicer fits. Unbounded, `average_size` near `usize::MAX` passed
/// validation and overflowed the size draw in the link's writer.
pub const MAX_SLICE: usize = 1 << 30;

/// Default `direction` of a fault given as JSON without one (as in Toxiproxy).
pub const DEFAULT_DIRECTION: Direction = Direction::Downstream;

/// Default `toxicity`: the fault applies to every connection.
pub const DEFAULT_TOXICITY: f64 = 1.0;

/// Which stream(s) of every link a fault sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client to server: worker to coordinator.
    Upstream,
    /// Server to client: coordinator to worker.
    Downstream,
    /// Both streams; one toxicity draw per connection covers both.
    Both,
}

impl Direction {
    /// Whether a fault with this direction sits on `stream`.
    pub fn covers(self, stream: Stream) -> bool {
        matches!(
            (self, stream),
            (Direction::Both, _)
                | (Direction::Upstream, Stream::Upstream)
                | (Direction::Downstream, Stream::Downstream)
        )
    }
}

impl Default for Direction {
    fn default() -> Self {
        DEFAULT_DIRECTION
    }
}

/// One of the two byte streams of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Client to server.
    Upstream,
    /// Server to client.
    Downstream,
}

/// Which links a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Every link.
    #[default]
    All,
    /// Only links whose upgrade request named one of these workers. Links whose worker is
    /// unknown never match.
    Workers(Vec<WorkerId>),
}

impl Target {
    /// Whether a link that carries `worker` (if known) is targeted.
    pub fn matches(&self, worker: Option<&WorkerId>) -> bool {
        match self {
            Target::All => true,
            Target::Workers(ids) => worker.is_some_and(|w| ids.contains(w)),
        }
    }
}

/// What a fault does to the chunks of the stream it sits on. Attributes are in the units their
/// names say; every delay is at most [`MAX_DELAY_MS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    content = "attributes",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum FaultKind {
    /// Delay each chunk by `latency_ms` ± a uniform draw in `[-jitter_ms, jitter_ms]`,
    /// measured from the chunk's arrival at the proxy.
    Latency {
        latency_ms: u64,
        #[serde(default)]
        jitter_ms: u64,
    },
    /// Pace the stream to `bytes_per_sec`, in pieces of at most a tenth of a second's worth.
    /// About a second's worth (at least 64 KiB) waits in the proxy; beyond that the sender's
    /// writes stall, as on a slow link. Of several on one stream the slowest paces it, as on a
    /// path of slow hops: their pacing does not add up (the others pass its pieces as they come).
    Bandwidth { bytes_per_sec: u64 },
    /// Drop every byte silently and keep the connection open. Unlike a network partition,
    /// the bytes are gone for good, not resent: a link that outlives the fault carries on with
    /// a hole in its stream where they were (real TCP would retransmit them once the path
    /// healed, or give the connection up), so what is sent after the fault goes does not line
    /// up with what came before. A FIN from the sender is held, not dropped, and goes through
    /// once the fault is removed. A link made while a blackhole sits on its upstream stream is
    /// as a connection whose SYN went into it: not connected upstream until a retransmission
    /// of that SYN (1, 3, 7, 15, 31, 63 s after the connect, as Linux) finds the fault gone,
    /// then everything its client sent meanwhile goes through, nothing lost (the proxy holds up
    /// to 32 KiB of it, the rest waits in the client's connection); if its client leaves first
    /// (or only shuts its sending side), the upstream never sees it; 127 s after the connect it
    /// is reset.
    Blackhole,
    /// Close the whole link with TCP RST (`SO_LINGER` 0) on both sockets, `timeout_ms` after
    /// the fault became active on the link. What the link held then, on either stream, counts
    /// as dropped by the fault.
    Reset {
        #[serde(default)]
        timeout_ms: u64,
    },
    /// Pass `bytes` bytes on this stream, then close the whole link; the rest is dropped. Every
    /// byte the link read and did not deliver, on either stream, counts as dropped by the fault.
    LimitData { bytes: u64 },
    /// Split chunks into pieces of `average_size` ± `size_variation` bytes, `delay_us` apart.
    Slicer {
        average_size: usize,
        #[serde(default)]
        size_variation: usize,
        #[serde(default)]
        delay_us: u64,
    },
    /// Hold the sender's FIN for `delay_ms` before passing it on.
    SlowClose { delay_ms: u64 },
    /// Flip one random bit in each byte with probability `rate`.
    Corrupt { rate: f64 },
    /// Loss as TCP shows it: hold each chunk `stall_ms` with probability `loss_rate`.
    Stall { loss_rate: f64, stall_ms: u64 },
}

/// Names of the fault kinds, as used in JSON and on the command line.
pub const KIND_NAMES: [&str; 9] = [
    "latency",
    "bandwidth",
    "blackhole",
    "reset",
    "limit_data",
    "slicer",
    "slow_close",
    "corrupt",
    "stall",
];

/// Kinds without attributes.
const UNIT_KINDS: [&str; 1] = ["blackhole"];

impl FaultKind {
    /// The kind's name, as in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Latency { .. } => "latency",
            FaultKind::Bandwidth { .. } => "bandwidth",
            FaultKind::Blackhole => "blackhole",
            FaultKind::Reset { .. } => "reset",
            FaultKind::LimitData { .. } => "limit_data",
            FaultKind::Slicer { .. } => "slicer",
            FaultKind::SlowClose { .. } => "slow_close",
            FaultKind::Corrupt { .. } => "corrupt",
            FaultKind::Stall { .. } => "stall",
        }
    }

    /// Builds a kind from its name and an attribute object; absent attributes take their
    /// defaults where they have one.
    pub fn from_parts(kind: &str, attributes: Map<String, Value>) -> Result<Self, FaultError> {
        if !KIND_NAMES.contains(&kind) {
            return Err(FaultError::UnknownKind {
                kind: kind.to_owned(),
            });
        }
        let mut obj = Map::new();
        obj.insert("kind".into(), Value::String(kind.to_owned()));
        if UNIT_KINDS.contains(&kind) {
            if let Some(attr) = attributes.keys().next() {
                return Err(FaultError::Attributes {
                    kind: kind.to_owned(),
                    reason: format!("unknown attribute `{attr}`; {kind} takes none"),
                });
            }
        } else {
            obj.insert("attributes".into(), Value::Object(attributes));
        }
        serde_json::from_value(Value::Object(obj)).map_err(|e| FaultError::Attributes {
            kind: kind.to_owned(),
            reason: e.to_string(),
        })
    }

    /// The attribute object of this kind.
    pub fn attributes(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(mut obj)) => match obj.remove("attributes") {
                Some(Value::Object(attrs)) => attrs,
                _ => Map::new(),
            },
            _ => Map::new(),
        }
    }

    fn validate(&self) -> Result<(), FaultError> {
        let bad = |attr: &'static str, reason: String| {
            Err(FaultError::Attribute {
                kind: self.name(),
                attr,
                reason,
            })
        };
        let delay = |attr: &'static str, ms: u64| {
            if ms > MAX_DELAY_MS {
                bad(attr, format!("{ms} ms is more than {MAX_DELAY_MS} ms"))
            } else {
                Ok(())
            }
        };
        let probability = |attr: &'static str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                bad(attr, format!("{p} is not a probability in [0, 1]"))
            }
        };
        match *self {
            FaultKind::Latency {
                latency_ms,
                jitter_ms,
            } => {
                delay("latency_ms", latency_ms)?;
                delay("jitter_ms", jitter_ms)
            }
            FaultKind::Bandwidth { bytes_per_sec: 0 } => {
                bad("bytes_per_sec", "must be at least 1".into())
            }
            FaultKind::Reset { timeout_ms } => delay("timeout_ms", timeout_ms),
            FaultKind::Slicer {
                average_size,
                size_variation,
                delay_us,
            } => {
                if average_size == 0 {
                    return bad("average_size", "must be at least 1".into());
                }
                if size_variation >= average_size {
                    return bad("size_variation", "must be less than average_size".into());
                }
                if average_size.saturating_add(size_variation) > MAX_SLICE {
                    return bad(
                        "average_size",
                        format!(
                            "{average_size} + size_variation {size_variation} is more than \
                             {MAX_SLICE} bytes"
                        ),
                    );
                }
                delay("delay_us", delay_us / 1000)
            }
            FaultKind::SlowClose { delay_ms } => delay("delay_ms", delay_ms),
            FaultKind::Corrupt { rate } => probability("rate", rate),
            FaultKind::Stall {
                loss_rate,
                stall_ms,
            } => {
                probability("loss_rate", loss_rate)?;
                delay("stall_ms", stall_ms)
            }
            FaultKind::Bandwidth { .. } | FaultKind::Blackhole | FaultKind::LimitData { .. } => {
                Ok(())
            }
        }
    }
}

/// A fault as given to [`crate::Proxy::add_fault`] or `POST /proxies/{name}/faults`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawFault", into = "RawFault")]
pub struct Fault {
    /// Unique within its proxy; letters, digits and `. _ ~ -`.
    pub name: String,
    pub kind: FaultKind,
    pub direction: Direction,
    /// Share of connections the fault applies to, in `[0, 1]`, drawn once per connection.
    pub toxicity: f64,
    pub target: Target,
}

impl Fault {
    /// A fault on every connection (toxicity 1) of every worker.
    pub fn new(name: impl Into<String>, kind: FaultKind, direction: Direction) -> Self {
        Fault {
            name: name.into(),
            kind,
            direction,
            toxicity: DEFAULT_TOXICITY,
            target: Target::All,
        }
    }

    /// Sets the toxicity.
    pub fn with_toxicity(mut self, toxicity: f64) -> Self {
        self.toxicity = toxicity;
        self
    }

    /// Sets the target.
    pub fn with_target(mut self, target: Target) -> Self {
        self.target = target;
        self
    }

    /// Checks the name, toxicity, target and attributes.
    pub fn validate(&self) -> Result<(), FaultError> {
        validate_name(&self.name)?;
        if !(0.0..=1.0).contains(&self.toxicity) {
            return Err(FaultError::Toxicity {
                value: self.toxicity,
            });
        }
        if matches!(&self.target, Target::Workers(ids) if ids.is_empty()) {
            return Err(FaultError::EmptyTarget);
        }
        self.kind.validate()
    }

    /// This fault with `patch` applied and validated; the kind cannot change.
    pub fn patched(&self, patch: &FaultPatch) -> Result<Fault, FaultError> {
        let mut out = self.clone();
        if let Some(attrs) = &patch.attributes {
            let mut merged = self.kind.attributes();
            merged.extend(attrs.clone());
            out.kind = FaultKind::from_parts(self.kind.name(), merged)?;
        }
        if let Some(d) = patch.direction {
            out.direction = d;
        }
        if let Some(t) = patch.toxicity {
            out.toxicity = t;
        }
        if let Some(t) = &patch.target {
            out.target = t.clone();
        }
        out.validate()?;
        Ok(out)
    }
}

/// A change to a live fault (`PATCH /proxies/{name}/faults/{fault}`): attributes are merged
/// into the current ones; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toxicity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
}

/// The JSON form of [`Fault`]: the kind's attributes in an object of their own.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    name: String,
    kind: String,
    #[serde(default)]
    attributes: Map<String, Value>,
    #[serde(default)]
    direction: Direction,
    #[serde(default = "default_toxicity")]
    toxicity: f64,
    #[serde(default)]
    target: Target,
}

fn default_toxicity() -> f64 {
    DEFAULT_TOXICITY
}

impl TryFrom<RawFault> for Fault {
    type Error = FaultError;

    fn try_from(raw: RawFault) -> Result<Self, FaultError> {
        let fault = Fault {
            kind: FaultKind::from_parts(&raw.kind, raw.attributes)?,
            name: raw.name,
            direction: raw.direction,
            toxicity: raw.toxicity,
            target: raw.target,
        };
        fault.validate()?;
        Ok(fault)
    }
}

impl From<Fault> for RawFault {
    fn from(f: Fault) -> Self {
        RawFault {
            kind: f.kind.name().to_owned(),
            attributes: f.kind.attributes(),
            name: f.name,
            direction: f.direction,
            toxicity: f.toxicity,
            target: f.target,
        }
    }
}

/// Checks a proxy or fault name: 1 to [`MAX_NAME_LEN`] of ASCII letters, digits, `. _ ~ -`,
/// so it can stand in a URL path unencoded.
pub fn validate_name(name: &str) -> Result<(), FaultError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-'));
    if ok {
        Ok(())
    } else {
        Err(FaultError::Name {
            name: name.to_owned(),
        })
    }
}

/// Why a fault (or a name) is not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultError {
    #[error("name {name:?} is not 1 to {MAX_NAME_LEN} ASCII letters, digits or . _ ~ -")]
    Name { name: String },
    #[error("toxicity {value} is not in [0, 1]")]
    Toxicity { value: f64 },
    #[error("a worker target needs at least one worker id")]
    EmptyTarget,
    #[error("unknown fault kind {kind:?}; known kinds: {}", KIND_NAMES.join(", "))]
    UnknownKind { kind: String },
    #[error("attributes of a {kind} fault: {reason}")]
    Attributes { kind: String, reason: String },
    #[error("attribute {attr} of a {kind} fault: {reason}")]
    Attribute {
        kind: &'static str,
        attr: &'static str,
        reason: String,
    },
}

#[cfg(test)]
#[path = "fault_tests.rs"]
mod tests;
