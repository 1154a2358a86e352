//! Frame text <-> message. Decoding tells an unknown `type` from a malformed frame so that the
//! receiver can answer with the right structured `error` and go on.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::msg::{COORD_MSG_TYPES, CoordMsg, WORKER_MSG_TYPES, WorkerMsg};

/// Default largest frame accepted, in bytes.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

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
    decode(text, WORKER_MSG_TYPES)
}

/// Decodes a coordinator frame.
pub fn decode_coord(text: &str) -> Result<CoordMsg, DecodeError> {
    decode(text, COORD_MSG_TYPES)
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

fn decode<T: DeserializeOwned>(text: &str, known: &[&str]) -> Result<T, DecodeError> {
    match serde_json::from_str::<T>(text) {
        Ok(m) => Ok(m),
        Err(e) => Err(classify(text, known, e)),
    }
}

/// Slow path: find out what the bad frame claimed to be.
fn classify(text: &str, known: &[&str], err: serde_json::Error) -> DecodeError {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "type")]
        ty: Option<serde_json::Value>,
        seq: Option<serde_json::Value>,
    }
    match serde_json::from_str::<Probe>(text) {
        Ok(p) => {
            let seq = p.seq.as_ref().and_then(serde_json::Value::as_u64);
            match p.ty {
                Some(serde_json::Value::String(ty)) if !known.contains(&ty.as_str()) => {
                    DecodeError::UnknownType { ty, seq }
                }
                Some(serde_json::Value::String(ty)) => DecodeError::Malformed {
                    ty: Some(ty),
                    seq,
                    reason: err.to_string(),
                },
                Some(_) => DecodeError::Malformed {
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
            reason: format!("not a JSON object: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let text = r#"{"type":"heartbeat","sequence":1,"active_tasks":[],"timestamp":"2026-01-01T00:00:00Z","future":true}"#;
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
