//! The examples in `docs/PROTOCOL.md` are real frames: every ```` ```json wire ```` block must
//! decode as a worker or a coordinator message, may hold no field the decoder would drop, and
//! together the blocks must show every message type of both directions.

use std::collections::BTreeSet;

use serde_json::Value;
use tether_proto::msg::{COORD_MSG_TYPES, WORKER_MSG_TYPES};
use tether_proto::{decode_coord, decode_worker};

const FENCE_OPEN: &str = "```json wire";
const FENCE_CLOSE: &str = "```";

/// One example: its first line in the document and its text.
struct Block {
    line: usize,
    text: String,
}

fn protocol_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn wire_blocks(doc: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in doc.lines().enumerate() {
        let trimmed = line.trim_end();
        match &mut open {
            None if trimmed == FENCE_OPEN => {
                open = Some(Block {
                    line: i + 2,
                    text: String::new(),
                })
            }
            None => {}
            Some(_) if trimmed == FENCE_CLOSE => blocks.extend(open.take()),
            Some(b) => {
                b.text.push_str(line);
                b.text.push('\n');
            }
        }
    }
    if let Some(b) = open {
        panic!(
            "the json wire block at line {} is never closed:\n{}",
            b.line, b.text
        );
    }
    blocks
}

/// Paths of fields in `example` that are missing from `decoded`, i.e. fields the decoder
/// ignored. Opaque payloads survive a round trip whole, so they never show up here.
fn dropped_fields(example: &Value, decoded: &Value, at: &str, out: &mut Vec<String>) {
    match (example, decoded) {
        (Value::Object(e), Value::Object(d)) => {
            for (k, v) in e {
                let path = format!("{at}.{k}");
                match d.get(k) {
                    Some(dv) => dropped_fields(v, dv, &path, out),
                    None => out.push(path),
                }
            }
        }
        (Value::Array(e), Value::Array(d)) => {
            for (i, (ev, dv)) in e.iter().zip(d).enumerate() {
                dropped_fields(ev, dv, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Decodes one direction; `Ok(type)` when the frame decodes and no field was dropped.
fn understood<M: serde::Serialize>(
    example: &Value,
    decoded: Result<M, tether_proto::DecodeError>,
) -> Result<String, String> {
    let msg = decoded.map_err(|e| e.to_string())?;
    let again = serde_json::to_value(&msg).map_err(|e| e.to_string())?;
    let mut dropped = Vec::new();
    dropped_fields(example, &again, "", &mut dropped);
    if !dropped.is_empty() {
        return Err(format!("fields ignored by the decoder: {dropped:?}"));
    }
    Ok(again["type"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn every_wire_example_in_the_protocol_doc_decodes_and_every_message_type_is_shown() {
    let doc = protocol_doc();
    let blocks = wire_blocks(&doc);
    assert!(
        blocks.len() >= WORKER_MSG_TYPES.len() + COORD_MSG_TYPES.len(),
        "only {} json wire blocks in docs/PROTOCOL.md",
        blocks.len()
    );
    let mut worker_seen = BTreeSet::new();
    let mut coord_seen = BTreeSet::new();
    let mut failures = Vec::new();
    for b in &blocks {
        let example: Value = match serde_json::from_str(&b.text) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!(
                    "line {}: not one JSON value ({e}):\n{}",
                    b.line, b.text
                ));
                continue;
            }
        };
        let as_worker = understood(&example, decode_worker(&b.text));
        let as_coord = understood(&example, decode_coord(&b.text));
        if let Ok(t) = &as_worker {
            worker_seen.insert(t.clone());
        }
        if let Ok(t) = &as_coord {
            coord_seen.insert(t.clone());
        }
        if let (Err(w), Err(c)) = (as_worker, as_coord) {
            failures.push(format!(
                "line {}: decodes in neither direction\n  as worker message: {w}\n  as coordinator message: {c}\n{}",
                b.line, b.text
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let missing_worker: Vec<&str> = WORKER_MSG_TYPES
        .iter()
        .copied()
        .filter(|t| !worker_seen.contains(*t))
        .collect();
    let missing_coord: Vec<&str> = COORD_MSG_TYPES
        .iter()
        .copied()
        .filter(|t| !coord_seen.contains(*t))
        .collect();
    assert!(
        missing_worker.is_empty() && missing_coord.is_empty(),
        "docs/PROTOCOL.md has no example of worker messages {missing_worker:?} \
         or of coordinator messages {missing_coord:?}"
    );
}

#[test]
fn the_block_extractor_finds_only_json_wire_blocks() {
    let doc = "text\n```json\n{\"not\": 1}\n```\n```json wire\n{\"a\": 1}\n```\n```json wire  \n{\"b\": 2}\n```\n";
    let blocks = wire_blocks(doc);
    let texts: Vec<&str> = blocks.iter().map(|b| b.text.as_str()).collect();
    assert_eq!(texts, ["{\"a\": 1}\n", "{\"b\": 2}\n"]);
    assert_eq!(blocks[0].line, 6);
}

/// A tagged text frame's JSON may hold raw newlines (JSON kept as text is passed on byte for
/// byte): the document must tell a worker written from it to split the frame at its last
/// newline, not claim there is only one.
#[test]
fn the_protocol_doc_splits_a_tagged_text_frame_at_its_last_newline() {
    let doc = protocol_doc()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        !doc.contains("never holds a raw newline"),
        "the doc claims frame JSON has no raw newline"
    );
    assert!(
        doc.contains("split a text frame at its last newline"),
        "the doc does not say where a tagged text frame splits"
    );
}
