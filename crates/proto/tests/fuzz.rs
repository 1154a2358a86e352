//! Property tests over everything a peer controls: the frame decoder, the upgrade path parser
//! and the URL rules. They run in CI with a bounded number of cases (`PROPTEST_CASES`, 256 by
//! default); inputs that once broke something stay below as plain regression tests.

use proptest::prelude::*;
use serde_json::Value;
use tether_proto::codec::{MAX_BATCH_MESSAGES, decode_coord_batch, decode_worker_batch};
use tether_proto::endpoint::{derive_endpoint, parse_endpoint_path};
use tether_proto::msg::{COORD_MSG_TYPES, WORKER_MSG_TYPES};
use tether_proto::{Batch, WorkerId, decode_coord, decode_worker, encode, is_batch, samples};

/// Any JSON value, nested a few levels, with strings that include the message types.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        prop::sample::select(WORKER_MSG_TYPES).prop_map(Value::from),
        prop::sample::select(COORD_MSG_TYPES).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_owned()),
                    Just("seq".to_owned()),
                    Just("task_id".to_owned()),
                    Just("attempt".to_owned()),
                    any::<String>()
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid frame of either direction, as text.
fn sample_frame() -> impl Strategy<Value = String> {
    let mut frames: Vec<String> = samples::worker_messages().iter().map(encode).collect();
    frames.extend(samples::coord_messages().iter().map(encode));
    prop::sample::select(frames)
}

/// A valid frame with one field replaced by any JSON value.
fn mutated_frame() -> impl Strategy<Value = String> {
    (sample_frame(), json_value(), any::<prop::sample::Index>()).prop_map(|(text, v, i)| {
        let mut obj: serde_json::Map<String, Value> =
            serde_json::from_str(&text).expect("a sample is an object");
        let keys: Vec<String> = obj.keys().cloned().collect();
        let k = i.get(&keys).clone();
        obj.insert(k, v);
        Value::Object(obj).to_string()
    })
}

/// A valid frame with bytes cut, doubled or replaced (kept as text).
fn damaged_frame() -> impl Strategy<Value = String> {
    (
        sample_frame(),
        any::<prop::sample::Index>(),
        0u8..3,
        any::<char>(),
    )
        .prop_map(|(text, i, op, c)| {
            let chars: Vec<char> = text.chars().collect();
            let at = i.index(chars.len());
            let mut out: Vec<char> = chars.clone();
            match op {
                0 => {
                    out.truncate(at);
                }
                1 => out.insert(at, c),
                _ => out[at] = c,
            }
            out.into_iter().collect()
        })
}

/// Decodes in both directions, as a message and as a batch; a frame that decodes must re-encode
/// to a frame that decodes to a message of the same type (opaque JSON payloads may lose float
/// digits, so not equality).
fn decode_is_total(text: &str) {
    let worker = decode_worker_batch(text, MAX_BATCH_MESSAGES).unwrap_or_default();
    for m in worker.into_iter().flatten().chain(decode_worker(text)) {
        let again = decode_worker(&encode(&m)).expect("re-encoded message decodes");
        assert_eq!(again.type_name(), m.type_name());
    }
    let coord = decode_coord_batch(text, MAX_BATCH_MESSAGES).unwrap_or_default();
    for m in coord.into_iter().flatten().chain(decode_coord(text)) {
        let again = decode_coord(&encode(&m)).expect("re-encoded message decodes");
        assert_eq!(again.type_name(), m.type_name());
    }
}

proptest! {
    #[test]
    fn any_text_decodes_or_fails_cleanly(text in any::<String>()) {
        decode_is_total(&text);
    }

    #[test]
    fn any_json_decodes_or_fails_cleanly(v in json_value()) {
        decode_is_total(&v.to_string());
    }

    #[test]
    fn frames_with_a_replaced_field_decode_or_fail_cleanly(text in mutated_frame()) {
        decode_is_total(&text);
    }

    #[test]
    fn damaged_frames_decode_or_fail_cleanly(text in damaged_frame()) {
        decode_is_total(&text);
    }

    #[test]
    fn arrays_of_damaged_or_mutated_frames_decode_element_by_element(
        parts in prop::collection::vec(prop_oneof![mutated_frame(), damaged_frame(), sample_frame()], 0..6)
    ) {
        decode_is_total(&format!("[{}]", parts.join(",")));
    }

    #[test]
    fn batches_within_any_byte_bound_give_back_every_message_in_order(
        picks in prop::collection::vec(any::<prop::sample::Index>(), 1..40),
        bound in 1usize..4096,
    ) {
        let all = samples::worker_messages();
        let sent: Vec<_> = picks.iter().map(|i| i.get(&all).clone()).collect();
        let mut batch = Batch::new();
        let mut frames = Vec::new();
        for m in &sent {
            frames.extend(batch.push_within(m, bound));
        }
        frames.push(batch.take());
        let mut got = Vec::new();
        for f in &frames {
            if is_batch(f) {
                prop_assert!(f.len() <= bound, "a batch of {} bytes over the bound {bound}", f.len());
                for m in decode_worker_batch(f, MAX_BATCH_MESSAGES).expect("a batch") {
                    got.push(m.expect("an element"));
                }
            } else {
                got.push(decode_worker(f).expect("a message"));
            }
        }
        prop_assert_eq!(got, sent);
    }

    #[test]
    fn any_upgrade_path_parses_or_is_refused(path in any::<String>()) {
        let _ = parse_endpoint_path(&path);
    }

    #[test]
    fn any_id_segment_parses_or_is_refused_and_an_accepted_id_round_trips(
        seg in "[a-zA-Z0-9%._~:@+/{} -]{0,40}"
    ) {
        if let Ok(id) = parse_endpoint_path(&format!("/api/v1/worker/{seg}/ws")) {
            let url = derive_endpoint("ws://127.0.0.1:1", &id).expect("a valid id derives");
            let parsed = url::Url::parse(&url).expect("a derived endpoint is a URL");
            prop_assert_eq!(parse_endpoint_path(parsed.path()).expect("parses back"), id);
        }
    }

    #[test]
    fn any_configured_url_derives_an_endpoint_that_parses_back_or_is_refused(
        configured in any::<String>(),
        structured in "(ws|wss|http|https|ftp)?(://)?[a-z0-9.{}:%]{0,20}(/[a-zA-Z0-9{}_%.:@+~-]{0,12}){0,6}/?",
    ) {
        let id = WorkerId::parse("w-1:x@y+z").expect("id");
        for c in [configured.as_str(), structured.as_str()] {
            if let Ok(url) = derive_endpoint(c, &id) {
                let parsed = url::Url::parse(&url).expect("a derived endpoint is a URL");
                let path = parsed.path();
                let at = path.find("/api/v1/worker/").expect("the endpoint path");
                prop_assert_eq!(parse_endpoint_path(&path[at..]).expect("parses back"), id.clone());
            }
        }
    }
}

#[test]
fn deeply_nested_json_is_refused_without_exhausting_the_stack() {
    for depth in [200, 10_000, 1_000_000] {
        let deep = "[".repeat(depth);
        assert!(decode_worker(&deep).is_err());
        let inner = format!(
            r#"{{"type":"task_state","seq":1,"task_id":"t-x","attempt":1,"state":{deep}1{},"timestamp":"2026-01-01T00:00:00Z"}}"#,
            "]".repeat(depth)
        );
        assert!(decode_worker(&inner).is_err(), "depth {depth}");
    }
}

/// Found by `any_id_segment_parses_or_is_refused_and_an_accepted_id_round_trips`: the id `.`
/// derived `/api/v1/worker/./ws`, which URL parsers normalise to `/api/v1/worker/ws`, so that
/// worker could never connect. Dot segments are no longer ids.
#[test]
fn dot_segment_ids_are_refused_everywhere() {
    for dots in [".", "..", "%2e", "%2E%2e", ".%2e"] {
        assert!(
            parse_endpoint_path(&format!("/api/v1/worker/{dots}/ws")).is_err(),
            "{dots}"
        );
    }
    assert!(WorkerId::parse(".").is_err());
    assert!(WorkerId::parse("..").is_err());
    assert!(
        WorkerId::parse("...").is_ok(),
        "three dots are no dot segment"
    );
    assert!(tether_proto::TaskId::parse("..").is_err());
}

/// Found by `any_configured_url_derives_an_endpoint_that_parses_back_or_is_refused`: `\\` was
/// accepted as a host, and URL parsers read a backslash as a slash in ws/http URLs, so the
/// worker would have connected somewhere else than the text said. Refused now.
#[test]
fn backslashes_in_a_configured_url_are_refused() {
    let id = WorkerId::parse("w").expect("id");
    for bad in ["\\", "ws://\\evil/x", "ws://h:1\\api", "h:1/a\\b"] {
        assert!(derive_endpoint(bad, &id).is_err(), "{bad:?}");
    }
}
