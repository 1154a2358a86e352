//! What decoding a peer's frame costs in memory: at most a small multiple of the frame's
//! length, whatever the frame holds. A counting global allocator records the peak of bytes
//! allocated during one call; the tests take turns (one lock), since the count is
//! process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use tether_proto::codec::{MAX_BATCH_MESSAGES, decode_worker_batch};
use tether_proto::msg::WorkerMsg;
use tether_proto::{DecodeError, decode_worker, encode, samples};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `System::alloc`, with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as `System::dealloc`, with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `System::realloc`, with the caller's arguments.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as the new block taken before the old one is given back: the peak a
            // moving realloc reaches.
            let now = NOW.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
            NOW.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One test at a time: the counters are the whole process's, and a test making its input
/// while another measures would count in the other's peak.
static TURN: Mutex<()> = Mutex::new(());

fn my_turn() -> MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes allocated at the peak of `f`, beyond what was allocated before it, and its value.
/// The caller holds [`my_turn`].
fn peak_of<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let before = NOW.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (PEAK.load(Ordering::Relaxed).saturating_sub(before), out)
}

/// Bytes of a peer's frame in these tests: large enough that a tree built of it stands out
/// (an empty object as a `serde_json::Value` takes tens of bytes for its 3 of text).
const FRAME: usize = 1 << 20;

/// `n` bytes or a little more of `[x,x,...]`.
fn array_of(x: &str, n: usize) -> String {
    let mut s = String::with_capacity(n + x.len() + 2);
    s.push('[');
    while s.len() < n {
        s.push_str(x);
        s.push(',');
    }
    s.pop();
    s.push(']');
    s
}

/// A frame's decode may take this many times its length at its peak.
const MOST: usize = 4;

fn assert_bounded(what: &str, peak: usize, len: usize) {
    assert!(
        peak < MOST * len,
        "{what}: a frame of {len} bytes took {peak} bytes at the peak of its decode"
    );
}

/// The sample message of type `ty`, as frame text with `field` set to `value` (JSON text).
fn sample_with(ty: &str, field: &str, value: &str) -> String {
    let m = samples::worker_messages()
        .into_iter()
        .find(|m| m.type_name() == ty)
        .expect("a sample of every type");
    let mut v: serde_json::Value = serde_json::from_str(&encode(&m)).expect("json");
    v[field] = serde_json::Value::String("\u{1}".into());
    let text = v.to_string();
    text.replacen(r#""\u0001""#, value, 1)
}

#[test]
fn telemetry_metrics_are_kept_as_text_not_built_into_a_tree() {
    let _turn = my_turn();
    let text = sample_with("telemetry", "metrics", &array_of("{}", FRAME));
    let (peak, decoded) = peak_of(|| decode_worker(&text));
    assert!(
        matches!(decoded, Ok(WorkerMsg::Telemetry(_))),
        "{:?}",
        decoded.map(|m| m.type_name())
    );
    assert_bounded("telemetry", peak, text.len());
}

/// A frame with no type this side knows is only told what is wrong with it; what it holds
/// besides its `type` and `seq` (here a megabyte of zeros) is never built into a tree, and the
/// error says what it said before.
#[test]
fn a_frame_without_a_known_type_is_refused_without_building_its_fields() {
    let _turn = my_turn();
    let zeros = array_of("0", FRAME);
    let unknown = format!(r#"{{"type":"zzz","seq":{zeros}}}"#);
    let (peak, e) = peak_of(|| decode_worker(&unknown));
    assert_eq!(
        e,
        Err(DecodeError::UnknownType {
            ty: "zzz".into(),
            seq: None
        })
    );
    assert_bounded("unknown type", peak, unknown.len());

    let known = format!(r#"{{"type":"heartbeat","seq":{zeros}}}"#);
    let (peak, e) = peak_of(|| decode_worker(&known));
    assert!(
        matches!(&e, Err(DecodeError::Malformed { ty: Some(t), seq: None, .. }) if t == "heartbeat"),
        "{e:?}"
    );
    assert_bounded("known type", peak, known.len());

    let untyped = format!(r#"{{"pad":{zeros}}}"#);
    let (peak, e) = peak_of(|| decode_worker(&untyped));
    assert_eq!(
        e,
        Err(DecodeError::Malformed {
            ty: None,
            seq: None,
            reason: "missing field `type`".into()
        })
    );
    assert_bounded("no type", peak, untyped.len());
}

/// A registration's lists are held to one past their bound while decoded, before anything in
/// it is checked or authenticated: a megabyte of capabilities or tags is read, not kept.
#[test]
fn a_registration_past_its_bounds_is_not_held_in_full() {
    let _turn = my_turn();
    let caps = sample_with("registration", "capabilities", &array_of(r#""a""#, FRAME));
    let (peak, r) = peak_of(|| decode_worker(&caps));
    assert!(matches!(r, Ok(WorkerMsg::Registration(_))), "{r:?}");
    assert_bounded("capabilities", peak, caps.len());

    let mut tags = String::from("{");
    for i in 0.. {
        if tags.len() > FRAME {
            break;
        }
        tags.push_str(&format!(r#""{i}":"","#));
    }
    tags.pop();
    tags.push('}');
    let tags = sample_with("registration", "tags", &tags);
    let (peak, r) = peak_of(|| decode_worker(&tags));
    assert!(matches!(r, Ok(WorkerMsg::Registration(_))), "{r:?}");
    assert_bounded("tags", peak, tags.len());
}

/// A batch past its bound of messages is refused at the first element past it, in either
/// decoder path: its elements (here a megabyte of zeros, which the one pass refuses at the
/// first) are never all held.
#[test]
fn a_batch_past_its_bound_is_refused_without_holding_its_elements() {
    let _turn = my_turn();
    let zeros = array_of("0", FRAME);
    let (peak, e) = peak_of(|| decode_worker_batch(&zeros, MAX_BATCH_MESSAGES));
    let e = e.expect_err("past the bound");
    assert!(
        e.to_string()
            .contains(&format!("exceeds the limit of {MAX_BATCH_MESSAGES}")),
        "{e}"
    );
    assert_bounded("batch", peak, zeros.len());
}
