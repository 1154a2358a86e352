//! Frame text <-> message. Decoding tells an unknown `type` from a malformed frame so that the
//! receiver can answer with the right structured `error` and go on.
//!
//! A frame holds one message (a JSON object) or, once both sides agreed to batching at
//! registration, a batch: a JSON array of messages, each of which is what it would be alone
//! (same seq, same ack). A batch spares the per-frame costs (a read, a wakeup, a write, a
//! TCP segment and an integrity tag) when many small messages are ready at once. One bad
//! message in a batch is refused alone; the others are handled.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::msg::{COORD_MSG_TYPES, CoordMsg, WORKER_MSG_TYPES, WorkerMsg};

/// Default largest frame accepted, in bytes.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
/// Room a message needs besides the payload it carries (its other fields, escaping, an
/// integrity tag): a payload is sent only if it fits in the frame limit less this.
pub const ENVELOPE_BYTES: usize = 16 * 1024;

/// Whether a message whose payload is `len` bytes of JSON fits in a frame of `max_frame`.
pub fn fits(len: usize, max_frame: usize) -> bool {
    len.saturating_add(ENVELOPE_BYTES) <= max_frame
}

/// Bytes of `v` as JSON, counted as it is written (nothing is kept): what a payload will take
/// in its message. 0 for a value that does not serialise.
pub fn json_len(v: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    match serde_json::to_writer(&mut n, v) {
        Ok(()) => n.0,
        Err(_) => 0,
    }
}

/// A checkpoint piece, bytes: what the Rust worker uploads and fetches at a time, and the
/// largest checkpoint the coordinator hands over inside an assignment.
pub const CHECKPOINT_PIECE: usize = 256 * 1024;

/// The most bytes one `checkpoint_fetch` may ask for (and what a frame both ends take holds).
pub const MAX_FETCH_LEN: u64 = 1024 * 1024;

/// The largest checkpoint a coordinator may be set to keep (`max_checkpoint_bytes`), and the
/// largest a Rust worker fetches (it holds the whole checkpoint in memory): a coordinator that
/// kept larger ones would name checkpoints to new attempts that no worker takes up.
pub const MAX_CHECKPOINT_BYTES: u64 = 1 << 30;

/// The most pieces (`checkpoint_data`) one checkpoint may come in; the coordinator refuses a
/// `checkpoint` announcing more (each piece is a row, and its index is remembered until the
/// checkpoint completes).
pub const MAX_CHECKPOINT_CHUNKS: u64 = 65_536;

/// Bytes of JSON that `bytes` of binary take as base64 ([`crate::task::Blob`]).
pub fn base64_len(bytes: usize) -> usize {
    bytes.div_ceil(3).saturating_mul(4)
}

/// The most binary bytes (a checkpoint, a piece of one) a message may carry as base64 in a
/// frame of `max_frame`.
pub fn largest_blob(max_frame: usize) -> usize {
    max_frame.saturating_sub(ENVELOPE_BYTES) / 4 * 3
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame has unknown message type {ty:?}")]
    UnknownType { ty: String, seq: Option<u64> },
    #[error("malformed frame{}: {reason}", ty.as_ref().map(|t| format!(" of type {t:?}")).unwrap_or_default())]
    Malformed {
        ty: Option<String>,
        seq: Option<u64>,
        reason: String,
    },
}

impl DecodeError {
    pub fn offending_type(&self) -> Option<String> {
        match self {
            DecodeError::UnknownType { ty, .. } => Some(ty.clone()),
            DecodeError::Malformed { ty, .. } => ty.clone(),
        }
    }

    pub fn seq(&self) -> Option<u64> {
        match self {
            DecodeError::UnknownType { seq, .. } | DecodeError::Malformed { seq, .. } => *seq,
        }
    }
}

/// Decodes a worker frame.
pub fn decode_worker(text: &str) -> Result<WorkerMsg, DecodeError> {
    decode_typed(text)
}

/// Decodes a coordinator frame.
pub fn decode_coord(text: &str) -> Result<CoordMsg, DecodeError> {
    decode_typed(text)
}

/// Decodes straight into the variant named by the message's `type` (see [`type_of`]); a
/// message without a known type is never one, and is only told what is wrong with it.
fn decode_typed<T: Typed>(text: &str) -> Result<T, DecodeError> {
    match type_of(text).and_then(|ty| T::from_text(&ty, text)) {
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(classify(text, T::TYPES, Some(e))),
        // Not decoded as the `type`-tagged enum, which would only fail, and would first copy
        // every field before the `type` into a tree (a peer's megabytes, many times over).
        None => Err(classify(text, T::TYPES, None)),
    }
}

/// The `type` of a message: read off its front when it starts with it, as every message this
/// crate encodes does, else found by a pass over its keys. Knowing the type first lets the
/// variant's struct be decoded straight from the text (it ignores the `type` key like any
/// unknown field); decoding the `type`-tagged enum would first copy the whole message into an
/// intermediate tree (a third of the time of a `task_state` decode, measured in the codec
/// benchmark).
fn type_of(text: &str) -> Option<Cow<'_, str>> {
    if let Some(rest) = text.strip_prefix(r#"{"type":""#)
        && let Some(ty) = rest.split('"').next()
        && !ty.contains('\\')
    {
        return Some(Cow::Borrowed(ty));
    }
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        ty: Cow<'a, str>,
    }
    serde_json::from_str::<Tag<'_>>(text).ok().map(|t| t.ty)
}

/// A message enum whose variants are told apart by the `type` key.
trait Typed: DeserializeOwned {
    /// The names of its types, as in [`WORKER_MSG_TYPES`].
    const TYPES: &'static [&'static str];

    /// Decodes the variant of type `ty` from `d` (which may or may not still hold the `type`
    /// key: the variants' structs ignore it like any unknown field); `None` for a type this
    /// side does not know.
    fn variant<'de, D: Deserializer<'de>>(ty: &str, d: D) -> Option<Result<Self, D::Error>>;

    /// [`Typed::variant`] from a message's whole text.
    fn from_text(ty: &str, text: &str) -> Option<serde_json::Result<Self>> {
        let mut de = serde_json::Deserializer::from_str(text);
        let m = Self::variant(ty, &mut de)?;
        Some(m.and_then(|m| de.end().map(|()| m)))
    }
}

impl Typed for WorkerMsg {
    const TYPES: &'static [&'static str] = WORKER_MSG_TYPES;

    fn variant<'de, D: Deserializer<'de>>(ty: &str, d: D) -> Option<Result<Self, D::Error>> {
        Some(match ty {
            "registration" => Deserialize::deserialize(d).map(WorkerMsg::Registration),
            "heartbeat" => Deserialize::deserialize(d).map(WorkerMsg::Heartbeat),
            "task_result" => Deserialize::deserialize(d).map(WorkerMsg::TaskResult),
            "task_state" => Deserialize::deserialize(d).map(WorkerMsg::TaskState),
            "checkpoint" => Deserialize::deserialize(d).map(WorkerMsg::Checkpoint),
            "checkpoint_data" => Deserialize::deserialize(d).map(WorkerMsg::CheckpointData),
            "checkpoint_error" => Deserialize::deserialize(d).map(WorkerMsg::CheckpointError),
            "checkpoint_fetch" => Deserialize::deserialize(d).map(WorkerMsg::CheckpointFetch),
            "state_error" => Deserialize::deserialize(d).map(WorkerMsg::StateError),
            "task_cancelled" => Deserialize::deserialize(d).map(WorkerMsg::TaskCancelled),
            "task_paused" => Deserialize::deserialize(d).map(WorkerMsg::TaskPaused),
            "task_resumed" => Deserialize::deserialize(d).map(WorkerMsg::TaskResumed),
            "telemetry" => Deserialize::deserialize(d).map(WorkerMsg::Telemetry),
            "worker_stopping" => Deserialize::deserialize(d).map(WorkerMsg::WorkerStopping),
            "worker_stopped" => Deserialize::deserialize(d).map(WorkerMsg::WorkerStopped),
            "error" => Deserialize::deserialize(d).map(WorkerMsg::Error),
            _ => return None,
        })
    }
}

impl Typed for CoordMsg {
    const TYPES: &'static [&'static str] = COORD_MSG_TYPES;

    fn variant<'de, D: Deserializer<'de>>(ty: &str, d: D) -> Option<Result<Self, D::Error>> {
        Some(match ty {
            "welcome" => Deserialize::deserialize(d).map(CoordMsg::Welcome),
            "registration_ack" => Deserialize::deserialize(d).map(CoordMsg::RegistrationAck),
            "heartbeat" => Deserialize::deserialize(d).map(CoordMsg::Heartbeat),
            "task_assignment" => Deserialize::deserialize(d).map(CoordMsg::TaskAssignment),
            "task_result_ack" => Deserialize::deserialize(d).map(CoordMsg::TaskResultAck),
            "task_state_ack" => Deserialize::deserialize(d).map(CoordMsg::TaskStateAck),
            "checkpoint_ack" => Deserialize::deserialize(d).map(CoordMsg::CheckpointAck),
            "checkpoint_data_ack" => Deserialize::deserialize(d).map(CoordMsg::CheckpointDataAck),
            "task_cancelled_ack" => Deserialize::deserialize(d).map(CoordMsg::TaskCancelledAck),
            "task_paused_ack" => Deserialize::deserialize(d).map(CoordMsg::TaskPausedAck),
            "task_resumed_ack" => Deserialize::deserialize(d).map(CoordMsg::TaskResumedAck),
            "telemetry_ack" => Deserialize::deserialize(d).map(CoordMsg::TelemetryAck),
            "acks" => Deserialize::deserialize(d).map(CoordMsg::Acks),
            "checkpoint_request" => Deserialize::deserialize(d).map(CoordMsg::CheckpointRequest),
            "checkpoint_piece" => Deserialize::deserialize(d).map(CoordMsg::CheckpointPiece),
            "state_request" => Deserialize::deserialize(d).map(CoordMsg::StateRequest),
            "cancel_task" => Deserialize::deserialize(d).map(CoordMsg::CancelTask),
            "pause_task" => Deserialize::deserialize(d).map(CoordMsg::PauseTask),
            "resume_task" => Deserialize::deserialize(d).map(CoordMsg::ResumeTask),
            "error" => Deserialize::deserialize(d).map(CoordMsg::Error),
            _ => return None,
        })
    }
}

/// Encodes a message as frame text.
pub fn encode<T: serde::Serialize>(msg: &T) -> String {
    // INVARIANT: our message types serialise infallibly (string keys, no non-finite floats
    // reach them: stats are computed with guards).
    serde_json::to_string(msg).unwrap_or_else(|e| {
        serde_json::json!({
            "type": "error",
            "code": "internal",
            "message": format!("encode failed: {e}"),
            "timestamp": crate::msg::now(),
        })
        .to_string()
    })
}

/// Default bounds of a batch frame: most messages, most bytes of JSON text.
pub const MAX_BATCH_MESSAGES: u32 = 256;
pub const MAX_BATCH_BYTES: u64 = 64 * 1024;

/// Whether a frame's text is a batch (a JSON array) rather than one message.
pub fn is_batch(text: &str) -> bool {
    text.trim_start().starts_with('[')
}

/// Decodes a batch of worker messages: each element decoded on its own, in order.
pub fn decode_worker_batch(
    text: &str,
    max_messages: u32,
) -> Result<Vec<Result<WorkerMsg, DecodeError>>, DecodeError> {
    decode_batch(text, max_messages)
}

/// Decodes a batch of coordinator messages: each element decoded on its own, in order.
pub fn decode_coord_batch(
    text: &str,
    max_messages: u32,
) -> Result<Vec<Result<CoordMsg, DecodeError>>, DecodeError> {
    decode_batch(text, max_messages)
}

/// Decodes a batch in one pass over its text when every element is a message of a known type
/// with its `type` first, as every batch this crate encodes is. Otherwise (or when any element
/// is bad) it splits the batch into its elements without decoding them, then decodes each, so
/// that each bad one is refused alone. The batch itself fails when it is not an array of 1 to
/// `max_messages` elements.
fn decode_batch<T: Typed>(
    text: &str,
    max_messages: u32,
) -> Result<Vec<Result<T, DecodeError>>, DecodeError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let one_pass = serde::Deserializer::deserialize_seq(
        &mut de,
        OnePass::<T> {
            max: max_messages as usize,
            of: std::marker::PhantomData,
        },
    )
    .and_then(|msgs| de.end().map(|()| msgs));
    if let Ok(msgs) = one_pass
        && !msgs.is_empty()
    {
        return Ok(msgs.into_iter().map(Ok).collect());
    }
    let malformed = |reason: String| DecodeError::Malformed {
        ty: None,
        seq: None,
        reason: echoed(reason, 2 * ECHOED_CHARS),
    };
    let too_many = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    let parts = serde::Deserializer::deserialize_seq(
        &mut de,
        Parts {
            max: max_messages as usize,
            too_many: &too_many,
        },
    )
    .and_then(|parts| de.end().map(|()| parts));
    let parts = match parts {
        Err(_) if too_many.get() => {
            return Err(malformed(format!(
                "batch of more than {max_messages} messages exceeds the limit of {max_messages}"
            )));
        }
        Err(e) => return Err(malformed(format!("not a batch: {e}"))),
        Ok(parts) if parts.is_empty() => return Err(malformed("empty batch".into())),
        Ok(parts) => parts,
    };
    Ok(parts.into_iter().map(|p| decode_typed(p.get())).collect())
}

/// The elements of a batch as their text, not decoded: at most `max`, failing at the one past
/// it (and saying so in `too_many`), so that a batch of a million elements is never held.
struct Parts<'a> {
    max: usize,
    too_many: &'a std::cell::Cell<bool>,
}

impl<'de> Visitor<'de> for Parts<'_> {
    type Value = Vec<&'de serde_json::value::RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(part) = seq.next_element()? {
            if out.len() == self.max {
                self.too_many.set(true);
                return Err(serde::de::Error::custom("too many messages"));
            }
            out.push(part);
        }
        Ok(out)
    }
}

/// The one pass of [`decode_batch`]: up to `max` elements, each decoded straight into the
/// variant its first key names. Any surprise is an error, and the batch takes the slow path.
struct OnePass<T> {
    max: usize,
    of: std::marker::PhantomData<T>,
}

impl<'de, T: Typed> Visitor<'de> for OnePass<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(m) = seq.next_element_seed(Element(std::marker::PhantomData))? {
            if out.len() == self.max {
                return Err(serde::de::Error::custom("too many messages"));
            }
            out.push(m);
        }
        Ok(out)
    }
}

/// One element of [`OnePass`]: an object whose first key is `type`.
struct Element<T>(std::marker::PhantomData<T>);

impl<'de, T: Typed> DeserializeSeed<'de> for Element<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Typed> Visitor<'de> for Element<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a message with its type first")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        use serde::de::Error;
        // Borrowed: a key or type with escapes fails here and takes the slow path.
        if map.next_key::<&'de str>()? != Some("type") {
            return Err(A::Error::custom("type not first"));
        }
        let ty: &'de str = map.next_value()?;
        T::variant(ty, MapAccessDeserializer::new(map))
            .unwrap_or_else(|| Err(A::Error::custom("unknown type")))
    }
}

/// Builds one frame's text from several messages: the message itself when there is one, a
/// batch when there are more.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    count: usize,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages pushed since the last [`Batch::take`].
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the frame text so far (the closing bracket aside).
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Adds a message.
    pub fn push<T: serde::Serialize>(&mut self, msg: &T) {
        self.buf.push(if self.count == 0 { b'[' } else { b',' });
        let start = self.buf.len();
        if serde_json::to_writer(&mut self.buf, msg).is_err() {
            self.buf.truncate(start);
            self.buf.extend_from_slice(encode(msg).as_bytes());
        }
        self.count += 1;
    }

    /// Adds a message, keeping the batch within `max_bytes`: when this message would take it
    /// past them, the messages before it are returned as one frame's text and this one starts
    /// the next batch. A single message larger than `max_bytes` still goes, alone.
    pub fn push_within<T: serde::Serialize>(
        &mut self,
        msg: &T,
        max_bytes: usize,
    ) -> Option<String> {
        let before = self.buf.len();
        self.push(msg);
        if self.count < 2 || self.buf.len() < max_bytes {
            return None;
        }
        // With its closing bracket the batch would pass `max_bytes`. Everything after the
        // separating comma is the new message.
        let tail = self.buf.split_off(before + 1);
        self.buf.truncate(before);
        self.count -= 1;
        let full = self.take();
        self.buf.push(b'[');
        self.buf.extend_from_slice(&tail);
        self.count = 1;
        Some(full)
    }

    /// The frame text of the messages pushed (empty when none), and a fresh start.
    pub fn take(&mut self) -> String {
        let mut buf = std::mem::take(&mut self.buf);
        match std::mem::take(&mut self.count) {
            0 => buf.clear(),
            // One message goes as itself: drop the opening bracket.
            1 => {
                buf.remove(0);
            }
            _ => buf.push(b']'),
        }
        // INVARIANT: serde_json writes UTF-8, and the brackets and commas are ASCII.
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Characters of a peer's text (an unknown `type`, a serde error quoting a value) a
/// [`DecodeError`] keeps: what it becomes (an `error` reply, a log line) stays small however
/// large the frame was. Every known type is far shorter.
pub const ECHOED_CHARS: usize = 128;

/// `text` cut to `max` characters, marked with `…` when it was longer.
pub fn echoed(text: String, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// What is wrong with a frame that is not a message: its `type` unknown (or missing, or not a
/// string), or, for a known type, `err` (or, without one, that it is not a JSON object). Only
/// the `type` and `seq` are read, as text spans of the frame: nothing the size of the frame is
/// built, whatever it holds.
fn classify(text: &str, known: &[&str], err: Option<serde_json::Error>) -> DecodeError {
    use serde_json::value::RawValue;
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(rename = "type", borrow)]
        ty: Option<&'a RawValue>,
        #[serde(borrow)]
        seq: Option<&'a RawValue>,
    }
    match serde_json::from_str::<Probe<'_>>(text) {
        Ok(p) => {
            let seq = p
                .seq
                .and_then(|s| serde_json::from_str::<u64>(s.get()).ok());
            match p.ty.map(|t| serde_json::from_str::<String>(t.get())) {
                Some(Ok(ty)) if !known.contains(&ty.as_str()) => DecodeError::UnknownType {
                    ty: echoed(ty, ECHOED_CHARS),
                    seq,
                },
                Some(Ok(ty)) => DecodeError::Malformed {
                    ty: Some(ty),
                    seq,
                    reason: match err {
                        Some(e) => echoed(e.to_string(), 2 * ECHOED_CHARS),
                        None => "not a JSON object".into(),
                    },
                },
                Some(Err(_)) => DecodeError::Malformed {
                    ty: None,
                    seq,
                    reason: "field `type` is not a string".into(),
                },
                None => DecodeError::Malformed {
                    ty: None,
                    seq,
                    reason: "missing field `type`".into(),
                },
            }
        }
        Err(e) => DecodeError::Malformed {
            ty: None,
            seq: None,
            reason: echoed(format!("not a JSON object: {e}"), 2 * ECHOED_CHARS),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's own text comes back in an `error` reply and a log line: bounded, however
    /// large the frame (9 MiB of `type` came back twice, an 18.9 MB reply).
    #[test]
    fn what_a_decode_error_quotes_of_the_frame_is_bounded() {
        let huge = "z".repeat(1 << 20);
        let e = decode_worker(&format!(r#"{{"type":"{huge}","seq":4}}"#)).expect_err("unknown");
        assert!(
            e.to_string().len() < 4 * ECHOED_CHARS,
            "{}",
            e.to_string().len()
        );
        assert!(
            e.offending_type()
                .is_some_and(|t| t.chars().count() == ECHOED_CHARS + 1)
        );
        let e = decode_worker(&format!(
            r#"{{"type":"task_result","seq":3,"task_id":"t","attempt":1,"outcome":"{huge}","result":null,"started_at":"2026-01-01T00:00:00Z","finished_at":"2026-01-01T00:00:00Z","duration_ms":1}}"#
        ))
        .expect_err("malformed");
        assert!(
            e.to_string().len() < 4 * ECHOED_CHARS,
            "{}",
            e.to_string().len()
        );
        assert_eq!(e.offending_type().as_deref(), Some("task_result"));
    }
    use crate::samples;

    #[test]
    fn every_worker_message_round_trips_and_has_a_listed_type() {
        let all = samples::worker_messages();
        let mut types: Vec<&str> = all.iter().map(WorkerMsg::type_name).collect();
        types.sort_unstable();
        types.dedup();
        let mut listed = WORKER_MSG_TYPES.to_vec();
        listed.sort_unstable();
        assert_eq!(types, listed, "samples cover every worker message type");
        for m in all {
            let text = encode(&m);
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            assert_eq!(v["type"], m.type_name());
            assert_eq!(decode_worker(&text), Ok(m));
        }
    }

    #[test]
    fn every_coordinator_message_round_trips_and_has_a_listed_type() {
        let all = samples::coord_messages();
        let mut types: Vec<&str> = all.iter().map(CoordMsg::type_name).collect();
        types.sort_unstable();
        types.dedup();
        let mut listed = COORD_MSG_TYPES.to_vec();
        listed.sort_unstable();
        assert_eq!(
            types, listed,
            "samples cover every coordinator message type"
        );
        for m in all {
            let text = encode(&m);
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            assert_eq!(v["type"], m.type_name());
            assert_eq!(decode_coord(&text), Ok(m));
        }
    }

    #[test]
    fn unknown_types_and_malformed_frames_are_told_apart() {
        assert_eq!(
            decode_worker(r#"{"type":"launch_missiles","seq":7}"#),
            Err(DecodeError::UnknownType {
                ty: "launch_missiles".into(),
                seq: Some(7)
            })
        );
        let e = decode_worker(r#"{"type":"task_result","seq":3}"#).expect_err("missing fields");
        assert!(
            matches!(e, DecodeError::Malformed { ty: Some(ref t), seq: Some(3), .. } if t == "task_result")
        );
        for junk in [
            "",
            "nul",
            "[1,2]",
            "42",
            r#"{"seq":1}"#,
            r#"{"type":5}"#,
            "{\"type\":\"heartbeat\"",
        ] {
            let e = decode_worker(junk).expect_err(junk);
            assert!(
                matches!(e, DecodeError::Malformed { .. }),
                "{junk:?}: {e:?}"
            );
        }
    }

    #[test]
    fn a_batch_round_trips_and_one_message_goes_as_itself() {
        let all = samples::worker_messages();
        let mut b = Batch::new();
        for m in &all {
            b.push(m);
        }
        assert_eq!(b.len(), all.len());
        let text = b.take();
        assert!(is_batch(&text));
        assert!(b.is_empty() && b.bytes() == 0, "take starts afresh");
        let decoded = decode_worker_batch(&text, MAX_BATCH_MESSAGES).expect("batch");
        assert_eq!(decoded, all.iter().cloned().map(Ok).collect::<Vec<_>>());

        b.push(&all[1]);
        let one = b.take();
        assert!(!is_batch(&one));
        assert_eq!(decode_worker(&one), Ok(all[1].clone()));
        assert_eq!(b.take(), "", "nothing pushed, nothing to send");

        // Within a byte bound: the batch splits before the message that would overflow it.
        let hb = encode(&all[1]);
        let bound = 2 * hb.len() + 3;
        let mut frames = Vec::new();
        for _ in 0..5 {
            frames.extend(b.push_within(&all[1], bound));
        }
        frames.push(b.take());
        assert_eq!(frames.len(), 3, "{frames:?}");
        for f in &frames[..2] {
            assert!(f.len() <= bound, "{} > {bound}", f.len());
            assert_eq!(decode_worker_batch(f, 2).expect("batch").len(), 2);
        }
        assert_eq!(decode_worker(&frames[2]), Ok(all[1].clone()));
        // A message larger than the bound goes alone.
        assert_eq!(b.push_within(&all[0], 10), None);
        assert_eq!(
            b.push_within(&all[1], 10).map(|f| decode_worker(&f)),
            Some(Ok(all[0].clone()))
        );
        assert_eq!(decode_worker(&b.take()), Ok(all[1].clone()));

        let coord = samples::coord_messages();
        for m in &coord {
            b.push(m);
        }
        let decoded = decode_coord_batch(&b.take(), MAX_BATCH_MESSAGES).expect("batch");
        assert_eq!(decoded, coord.into_iter().map(Ok).collect::<Vec<_>>());
    }

    #[test]
    fn a_bad_message_in_a_batch_fails_alone_and_a_bad_batch_fails_whole() {
        let hb = encode(&samples::worker_messages()[1]);
        let text = format!(
            r#"[{hb},{{"type":"launch_missiles","seq":7}},{{"type":"task_result","seq":3}},{hb}]"#
        );
        let decoded = decode_worker_batch(&text, MAX_BATCH_MESSAGES).expect("batch");
        assert_eq!(decoded.len(), 4);
        assert!(decoded[0].is_ok() && decoded[3].is_ok());
        assert!(matches!(
            &decoded[1],
            Err(DecodeError::UnknownType { seq: Some(7), .. })
        ));
        assert!(matches!(
            &decoded[2],
            Err(DecodeError::Malformed { seq: Some(3), .. })
        ));
        let nested = format!("[[{hb}]]");
        assert!(matches!(
            decode_worker_batch(&nested, MAX_BATCH_MESSAGES).expect("batch")[0],
            Err(DecodeError::Malformed { .. })
        ));
        for junk in ["[]", "[", "[1,", "{}", "", &format!("[{hb},{hb},{hb}]")] {
            let e = decode_worker_batch(junk, 2).expect_err(junk);
            assert!(
                matches!(e, DecodeError::Malformed { ty: None, .. }),
                "{junk:?}: {e:?}"
            );
        }
    }

    #[test]
    fn every_type_decodes_straight_into_its_variant_wherever_the_type_key_is() {
        for m in samples::worker_messages() {
            let text = encode(&m);
            assert_eq!(type_of(&text).as_deref(), Some(m.type_name()));
            let direct = WorkerMsg::from_text(m.type_name(), &text).expect("a known type");
            assert_eq!(direct.expect("decodes"), m);
            // The same message with `type` last, and with spaces: the slow way to the type.
            let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
            let ty = v
                .as_object_mut()
                .expect("object")
                .remove("type")
                .expect("type");
            v.as_object_mut().expect("object").insert("type".into(), ty);
            let moved = serde_json::to_string_pretty(&v).expect("json");
            assert!(!moved.starts_with(r#"{"type""#));
            assert_eq!(decode_worker(&moved), Ok(m));
        }
        for m in samples::coord_messages() {
            let text = encode(&m);
            let direct = CoordMsg::from_text(m.type_name(), &text).expect("a known type");
            assert_eq!(direct.expect("decodes"), m);
        }
        let escaped = r#"{"type":"heart\u0062eat","sequence":1,"active_tasks":[],"timestamp":"2026-01-01T00:00:00Z"}"#;
        assert!(matches!(
            decode_worker(escaped),
            Ok(WorkerMsg::Heartbeat(_))
        ));
    }

    /// Every sample message in a batch, each with its `type` first (one pass) and moved last
    /// (the slow path), decodes to the message itself, on both sides.
    #[test]
    fn a_batch_decodes_the_same_in_one_pass_and_element_by_element() {
        fn type_last(text: &str) -> String {
            let mut v: serde_json::Value = serde_json::from_str(text).expect("json");
            let o = v.as_object_mut().expect("object");
            let ty = o.remove("type").expect("type");
            o.insert("type".into(), ty);
            v.to_string()
        }
        let worker = samples::worker_messages();
        let texts: Vec<String> = worker.iter().map(encode).collect();
        let batch = format!("[{}]", texts.join(","));
        let want: Vec<_> = worker.iter().cloned().map(Ok).collect();
        assert_eq!(decode_worker_batch(&batch, 256), Ok(want.clone()));
        // The one pass itself, not only its fallback, reads this batch.
        let mut de = serde_json::Deserializer::from_str(&batch);
        let one: Vec<WorkerMsg> = serde::Deserializer::deserialize_seq(
            &mut de,
            OnePass::<WorkerMsg> {
                max: 256,
                of: std::marker::PhantomData,
            },
        )
        .expect("one pass");
        assert_eq!(one, worker);
        let moved: Vec<String> = texts.iter().map(|t| type_last(t)).collect();
        let slow = format!("[{}]", moved.join(","));
        assert_eq!(decode_worker_batch(&slow, 256), Ok(want));
        let coord = samples::coord_messages();
        let texts: Vec<String> = coord.iter().map(encode).collect();
        let batch = format!("[ {} ]", texts.join(" , "));
        let want: Vec<_> = coord.into_iter().map(Ok).collect();
        assert_eq!(decode_coord_batch(&batch, 256), Ok(want));
    }

    /// A bad element makes the one pass give up; the slow path then refuses that element alone,
    /// and the bounds of the batch hold either way.
    #[test]
    fn a_batch_with_a_bad_element_refuses_it_alone_and_the_bounds_hold() {
        let good = encode(&samples::worker_messages()[1]);
        let unknown = r#"{"type":"from_the_future","seq":7}"#;
        let broken = r#"{"type":"heartbeat","sequence":"not a number"}"#;
        let batch = format!("[{good},{unknown},{good},{broken}]");
        let out = decode_worker_batch(&batch, 256).expect("a batch");
        assert_eq!(out.len(), 4);
        assert!(out[0].is_ok() && out[2].is_ok());
        assert!(
            matches!(&out[1], Err(DecodeError::UnknownType { ty, .. }) if ty == "from_the_future")
        );
        assert!(matches!(&out[3], Err(DecodeError::Malformed { .. })));
        let three = format!("[{good},{good},{good}]");
        assert_eq!(decode_worker_batch(&three, 3).map(|v| v.len()), Ok(3));
        let e = decode_worker_batch(&three, 2).expect_err("over the limit");
        assert!(e.to_string().contains("exceeds the limit of 2"), "{e}");
        let e = decode_worker_batch("[]", 2).expect_err("empty");
        assert!(e.to_string().contains("empty batch"), "{e}");
        let e = decode_worker_batch(&format!("[{good}] trailing"), 2).expect_err("trailing");
        assert!(e.to_string().contains("not a batch"), "{e}");
    }

    #[test]
    fn payload_sizes_are_counted_as_the_json_they_become() {
        let v = serde_json::json!({"a": [1, 2, "x\"y"]});
        assert_eq!(json_len(&v), serde_json::to_string(&v).expect("json").len());
        assert_eq!(base64_len(3), 4);
        assert_eq!(base64_len(4), 8);
        let frame = 1 << 20;
        assert!(fits(base64_len(largest_blob(frame)), frame));
        assert!(!fits(base64_len(largest_blob(frame) + 3), frame));
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let text = r#"{"type":"heartbeat","sequence":1,"active_tasks":[],"timestamp":"2026-01-01T00:00:00Z","future":true}"#;
        assert!(matches!(decode_worker(text), Ok(WorkerMsg::Heartbeat(_))));
        // The original put `worker_id` in every message; outside `registration` it is ignored.
        let text = r#"{"type":"heartbeat","worker_id":"w1","sequence":1,"active_tasks":[],"timestamp":"2026-01-01T00:00:00Z"}"#;
        assert!(matches!(decode_worker(text), Ok(WorkerMsg::Heartbeat(_))));
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let text = encode(&samples::worker_messages()[1]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let ts = v["timestamp"].as_str().expect("timestamp");
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
        assert!(ts.ends_with('Z'), "{ts}");
    }
}
