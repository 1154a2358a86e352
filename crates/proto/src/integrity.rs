//! Per-message integrity: an HMAC-SHA256 tag on every frame of an authenticated session.
//!
//! Agreed at connect: the coordinator's `welcome` names [`HMAC_SHA256`] in `integrity`, the
//! worker answers with a fresh `client_nonce` in its `registration`. Both sides derive the
//! session key from the shared secret and the two nonces ([`SessionKey::derive`]); it never
//! travels, and it is new for every connection.
//!
//! Every data frame from the registration on (worker to coordinator) and from the first frame
//! after the registration (coordinator to worker) carries a tag over
//!
//! ```text
//! "tether-mac-v1" | direction (1 byte) | frame number (u64, big-endian) | opcode (1 byte) | frame bytes
//! ```
//!
//! appended to the frame: a text frame ends with `\n` and the 64 hex digits of the tag, a
//! binary frame with the 32 raw bytes. The tag of a text frame is its last 65 bytes, and the
//! frame is split there (at its last newline), never at its first: the JSON before it may hold
//! raw newlines, since JSON kept as text (a config submitted pretty-printed, a result, a state)
//! is passed on byte for byte. Frame
//! numbers count from 0 in each direction and are implicit: a frame that is forged, altered,
//! replayed, reordered or taken from another session fails, and the receiver does not advance
//! its count, so the next genuine frame still verifies. Pongs and closes are not tagged; they
//! carry no message, and with tags on neither keeps a session alive nor ends one for good.
//!
//! A keyed session's pings carry a tag as their payload (32 bytes, [`Sealer::seal_ping`]), over
//! the same prefix with opcode `p`, an empty body and a count of its own (pings numbered from 0
//! in each direction, apart from data frames): a coordinator pings a worker whose long frame it
//! is still reading, and the worker, whose heartbeats wait behind that frame, takes the ping as
//! the coordinator alive. Untagged, anyone on the path could keep a black-holed session alive
//! with pings; tagged, a ping that does not verify is ignored ([`Opener::open_ping`]).
//!
//! Because the key needs the secret and the worker's fresh nonce, the coordinator's first
//! tagged frame also proves to the worker that it talks to a coordinator that holds its
//! secret (mutual authentication without TLS).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::{Secret, to_hex};
use crate::ids::WorkerId;

/// The one integrity algorithm, as named in `welcome.integrity`.
pub const HMAC_SHA256: &str = "hmac-sha256";
/// Domain separation tag of the session key.
const KEY_CONTEXT: &str = "tether-mac-key-v1";
/// Domain separation tag of every frame tag.
const FRAME_CONTEXT: &[u8] = b"tether-mac-v1";
/// Bytes of a tag.
pub const TAG_BYTES: usize = 32;
/// Bytes a tag adds to a text frame: a newline and 64 hex digits.
pub const TEXT_TRAILER: usize = 1 + 2 * TAG_BYTES;
/// Failed frames after which a session is closed (the peer reconnects and starts afresh).
pub const DEFAULT_MAX_FAILURES: u32 = 3;

type HmacSha256 = Hmac<Sha256>;

/// Which way a frame travels; part of every tag, so a frame cannot be reflected back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToCoordinator,
    ToWorker,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::ToCoordinator => b'c',
            Direction::ToWorker => b'w',
        }
    }
}

/// What kind of WebSocket data frame was tagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Text,
    Binary,
    Ping,
}

impl Opcode {
    fn byte(self) -> u8 {
        match self {
            Opcode::Text => b't',
            Opcode::Binary => b'b',
            Opcode::Ping => b'p',
        }
    }
}

/// Why a frame's tag did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("frame carries no integrity tag")]
    Missing,
    #[error("frame's integrity tag does not verify (forged, altered, replayed or out of order)")]
    Mismatch,
}

/// The key of one session, keyed and ready to tag. Never logged: its `Debug` shows nothing.
#[derive(Clone)]
pub struct SessionKey(HmacSha256);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

impl SessionKey {
    /// The key both sides derive: HMAC-SHA256(secret, context, worker id, the coordinator's
    /// nonce, the worker's nonce).
    pub fn derive(secret: &Secret, worker: &WorkerId, nonce: &str, client_nonce: &str) -> Self {
        let mut kdf = keyed(secret.expose());
        kdf.update(format!("{KEY_CONTEXT}\n{worker}\n{nonce}\n{client_nonce}").as_bytes());
        Self(keyed(&kdf.finalize().into_bytes()))
    }

    fn tag(&self, dir: Direction, number: u64, op: Opcode, frame: &[u8]) -> HmacSha256 {
        let mut mac = self.0.clone();
        mac.update(FRAME_CONTEXT);
        mac.update(&[dir.byte()]);
        mac.update(&number.to_be_bytes());
        mac.update(&[op.byte()]);
        mac.update(frame);
        mac
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // INVARIANT: HMAC accepts keys of any length.
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!("hmac takes any key"))
}

/// Tags the frames one side sends.
#[derive(Debug)]
pub struct Sealer {
    key: SessionKey,
    dir: Direction,
    next: u64,
    /// The number of the next ping.
    pings: u64,
}

impl Sealer {
    pub fn new(key: SessionKey, dir: Direction) -> Self {
        Self {
            key,
            dir,
            next: 0,
            pings: 0,
        }
    }

    /// The payload of the next ping: its tag.
    pub fn seal_ping(&mut self) -> [u8; TAG_BYTES] {
        let tag = self.key.tag(self.dir, self.pings, Opcode::Ping, &[]);
        self.pings += 1;
        tag.finalize().into_bytes().into()
    }

    /// Appends the tag to a text frame.
    pub fn seal_text(&mut self, mut text: String) -> String {
        let tag = self.next_tag(Opcode::Text, text.as_bytes());
        text.reserve(TEXT_TRAILER);
        text.push('\n');
        text.push_str(&to_hex(&tag));
        text
    }

    /// Appends the tag to a binary frame.
    pub fn seal_binary(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        let tag = self.next_tag(Opcode::Binary, &bytes);
        bytes.extend_from_slice(&tag);
        bytes
    }

    fn next_tag(&mut self, op: Opcode, frame: &[u8]) -> [u8; TAG_BYTES] {
        let tag = self
            .key
            .tag(self.dir, self.next, op, frame)
            .finalize()
            .into_bytes();
        self.next += 1;
        tag.into()
    }
}

/// Verifies the frames one side receives, and counts those that fail.
#[derive(Debug)]
pub struct Opener {
    key: SessionKey,
    dir: Direction,
    next: u64,
    failures: u32,
    /// The number of the next ping.
    pings: u64,
}

impl Opener {
    pub fn new(key: SessionKey, dir: Direction) -> Self {
        Self {
            key,
            dir,
            next: 0,
            failures: 0,
            pings: 0,
        }
    }

    /// Whether a ping's `payload` is the tag of the next ping. One that is not (untagged,
    /// forged, replayed) is not counted as a failure: a ping carries no message, and is only
    /// ignored.
    pub fn open_ping(&mut self, payload: &[u8]) -> bool {
        let genuine = self
            .key
            .tag(self.dir, self.pings, Opcode::Ping, &[])
            .verify_slice(payload)
            .is_ok();
        self.pings += u64::from(genuine);
        genuine
    }

    /// The frame text without its tag, when the tag verifies as the next frame.
    pub fn open_text<'a>(&mut self, frame: &'a str) -> Result<&'a str, MacError> {
        let split = frame
            .len()
            .checked_sub(TEXT_TRAILER)
            .filter(|&at| frame.is_char_boundary(at) && frame.as_bytes()[at] == b'\n');
        let Some(at) = split else {
            return Err(self.fail(MacError::Missing));
        };
        let Some(tag) = from_hex(&frame.as_bytes()[at + 1..]) else {
            return Err(self.fail(MacError::Missing));
        };
        let body = &frame[..at];
        self.check(Opcode::Text, body.as_bytes(), &tag)?;
        Ok(body)
    }

    /// The frame bytes without their tag, when the tag verifies as the next frame.
    pub fn open_binary<'a>(&mut self, frame: &'a [u8]) -> Result<&'a [u8], MacError> {
        let Some(at) = frame.len().checked_sub(TAG_BYTES) else {
            return Err(self.fail(MacError::Missing));
        };
        let (body, tag) = frame.split_at(at);
        let tag: [u8; TAG_BYTES] = tag.try_into().map_err(|_| MacError::Missing)?;
        self.check(Opcode::Binary, body, &tag)?;
        Ok(body)
    }

    /// Frames that failed in this session.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Frames that verified in this session.
    pub fn verified(&self) -> u64 {
        self.next
    }

    fn check(&mut self, op: Opcode, body: &[u8], tag: &[u8; TAG_BYTES]) -> Result<(), MacError> {
        // `verify_slice` compares in constant time.
        match self
            .key
            .tag(self.dir, self.next, op, body)
            .verify_slice(tag)
        {
            Ok(()) => {
                self.next += 1;
                Ok(())
            }
            Err(_) => Err(self.fail(MacError::Mismatch)),
        }
    }

    fn fail(&mut self, e: MacError) -> MacError {
        self.failures = self.failures.saturating_add(1);
        e
    }
}

/// The text of a frame without anything shaped like a tag at its end, unverified: to read the
/// registration whose client nonce the key needs, before the key exists.
pub fn peek_text(frame: &str) -> &str {
    frame
        .len()
        .checked_sub(TEXT_TRAILER)
        .filter(|&at| frame.is_char_boundary(at) && frame.as_bytes()[at] == b'\n')
        .filter(|&at| from_hex(&frame.as_bytes()[at + 1..]).is_some())
        .map_or(frame, |at| &frame[..at])
}

/// Whether `nonce` has the shape of a nonce: 64 lower- or upper-case hex digits.
pub fn is_nonce(nonce: &str) -> bool {
    nonce.len() == 2 * crate::auth::NONCE_BYTES && nonce.bytes().all(|b| b.is_ascii_hexdigit())
}

fn from_hex(digits: &[u8]) -> Option<[u8; TAG_BYTES]> {
    if digits.len() != 2 * TAG_BYTES {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; TAG_BYTES];
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(client_nonce: &str) -> SessionKey {
        let secret = Secret::new(b"correct horse battery staple").expect("secret");
        let worker = WorkerId::parse("w-1").expect("id");
        SessionKey::derive(&secret, &worker, &"ab".repeat(32), client_nonce)
    }

    fn pair() -> (Sealer, Opener) {
        let k = key("cd");
        (
            Sealer::new(k.clone(), Direction::ToCoordinator),
            Opener::new(k, Direction::ToCoordinator),
        )
    }

    #[test]
    fn sealed_frames_open_in_order_and_lose_their_tag() {
        let (mut seal, mut open) = pair();
        let a = seal.seal_text(r#"{"type":"heartbeat"}"#.to_owned());
        assert_eq!(a.len(), 20 + TEXT_TRAILER);
        let b = seal.seal_binary(vec![1, 2, 3]);
        assert_eq!(b.len(), 3 + TAG_BYTES);
        assert_eq!(open.open_text(&a), Ok(r#"{"type":"heartbeat"}"#));
        assert_eq!(open.open_binary(&b), Ok(&[1u8, 2, 3][..]));
        assert_eq!((open.verified(), open.failures()), (2, 0));
    }

    /// JSON kept as text goes byte for byte, raw newlines and all (a config submitted
    /// pretty-printed): the frame opens at its last newline, to the very message sent.
    #[test]
    fn a_text_frame_whose_json_holds_raw_newlines_opens_at_its_last_newline() {
        use crate::msg::{CoordMsg, JsonText};
        let mut assignment = crate::samples::coord_messages()
            .into_iter()
            .find(|m| matches!(m, CoordMsg::TaskAssignment(_)))
            .expect("a sample assignment");
        let pretty = "{\n  \"ms\": 1,\n  \"note\": \"a\\nb\"\n}";
        if let CoordMsg::TaskAssignment(a) = &mut assignment {
            a.config = JsonText::from_text(pretty.to_owned()).expect("json");
        }
        let body = crate::codec::encode(&assignment);
        assert!(body.contains(pretty), "passed on byte for byte: {body}");
        let k = key("cd");
        let mut seal = Sealer::new(k.clone(), Direction::ToWorker);
        let mut open = Opener::new(k, Direction::ToWorker);
        let frame = seal.seal_text(body.clone());
        // The tag is the last 65 bytes: a newline and 64 hex digits. The first newline is
        // inside the JSON.
        assert_eq!(frame.rsplit_once('\n').map(|(b, _)| b), Some(body.as_str()));
        assert_ne!(frame.split_once('\n').map(|(b, _)| b), Some(body.as_str()));
        assert_eq!(peek_text(&frame), body);
        assert_eq!(open.open_text(&frame), Ok(body.as_str()));
        assert_eq!(crate::codec::decode_coord(&body), Ok(assignment));
    }

    #[test]
    fn altered_replayed_reordered_reflected_or_foreign_frames_fail_and_the_next_genuine_one_passes()
    {
        let (mut seal, mut open) = pair();
        let first = seal.seal_text(r#"{"n":1}"#.to_owned());
        let second = seal.seal_text(r#"{"n":2}"#.to_owned());
        // Out of order.
        assert_eq!(open.open_text(&second), Err(MacError::Mismatch));
        // Altered by one byte.
        let altered = first.replacen("1", "2", 1);
        assert_eq!(open.open_text(&altered), Err(MacError::Mismatch));
        // From another session (another client nonce).
        let mut other = Sealer::new(key("ef"), Direction::ToCoordinator);
        assert_eq!(
            open.open_text(&other.seal_text(r#"{"n":1}"#.to_owned())),
            Err(MacError::Mismatch)
        );
        // Reflected: the same key, the other direction.
        let mut back = Sealer::new(key("cd"), Direction::ToWorker);
        assert_eq!(
            open.open_text(&back.seal_text(r#"{"n":1}"#.to_owned())),
            Err(MacError::Mismatch)
        );
        // Text tag on a binary frame.
        assert_eq!(open.open_binary(first.as_bytes()), Err(MacError::Mismatch));
        // Untagged.
        assert_eq!(open.open_text(r#"{"n":1}"#), Err(MacError::Missing));
        assert_eq!(open.open_binary(&[0; 5]), Err(MacError::Missing));
        assert_eq!(open.failures(), 7);
        // The genuine frames still verify, in order; a replay of the first then fails.
        assert_eq!(open.open_text(&first), Ok(r#"{"n":1}"#));
        assert_eq!(open.open_text(&second), Ok(r#"{"n":2}"#));
        assert_eq!(open.open_text(&first), Err(MacError::Mismatch));
    }

    #[test]
    fn pings_verify_in_their_own_order_and_a_forged_or_replayed_one_is_ignored() {
        let (mut seal, mut open) = pair();
        let first = seal.seal_ping();
        // A data frame between two pings does not move the pings' count.
        let frame = seal.seal_text(r#"{"n":1}"#.to_owned());
        let second = seal.seal_ping();
        assert!(!open.open_ping(&[]), "untagged");
        assert!(!open.open_ping(&second), "out of order");
        assert!(open.open_ping(&first));
        assert!(!open.open_ping(&first), "replayed");
        // Reflected: a ping of the other direction.
        let mut back = Sealer::new(key("cd"), Direction::ToWorker);
        assert!(!open.open_ping(&back.seal_ping()));
        assert!(open.open_ping(&second));
        assert_eq!(open.open_text(&frame), Ok(r#"{"n":1}"#));
        assert_eq!(open.failures(), 0, "a ping is ignored, not counted");
    }

    #[test]
    fn a_tag_of_the_wrong_shape_is_missing_not_a_panic() {
        let (_, mut open) = pair();
        let hex64 = "0".repeat(64);
        let zz64 = "z".repeat(64);
        let multibyte = format!("{{}}\n{}", "é".repeat(32));
        for junk in [
            "",
            "\n",
            hex64.as_str(),
            &format!("{{}}\n{zz64}"),
            &multibyte,
            &format!("{{}}x{hex64}"),
        ] {
            assert_eq!(open.open_text(junk), Err(MacError::Missing), "{junk:?}");
        }
        assert_eq!(
            open.open_text(&format!("{{}}\n{hex64}")),
            Err(MacError::Mismatch)
        );
    }

    #[test]
    fn the_session_key_depends_on_the_secret_the_worker_and_both_nonces() {
        let secret = Secret::new(b"correct horse battery staple").expect("secret");
        let other_secret = Secret::new(b"another secret, just as long").expect("secret");
        let w1 = WorkerId::parse("w-1").expect("id");
        let w2 = WorkerId::parse("w-2").expect("id");
        let tag = |k: SessionKey| Sealer::new(k, Direction::ToWorker).seal_text("{}".into());
        let base = tag(SessionKey::derive(&secret, &w1, "n", "c"));
        for k in [
            SessionKey::derive(&other_secret, &w1, "n", "c"),
            SessionKey::derive(&secret, &w2, "n", "c"),
            SessionKey::derive(&secret, &w1, "m", "c"),
            SessionKey::derive(&secret, &w1, "n", "d"),
        ] {
            assert_ne!(tag(k), base);
        }
        assert_eq!(tag(SessionKey::derive(&secret, &w1, "n", "c")), base);
        assert!(!format!("{:?}", key("cd")).contains("Hmac"));
    }
}
