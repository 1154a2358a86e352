//! Worker authentication: a challenge-response at registration.
//!
//! The coordinator's `welcome` carries a fresh random `nonce`; the worker's `registration`
//! carries `signature` = hex(HMAC-SHA256(secret, input)), where `input` is
//!
//! ```text
//! tether-auth-v1\n<worker id>\n<nonce>\n<registration timestamp, Unix ms>\n<boot id>
//! ```
//!
//! The secret (per worker, or one for the fleet) is provisioned out of band and never travels.
//! The nonce is used once (one per connection), the timestamp must be within a skew window, and
//! the signature is compared in constant time. Every reconnect authenticates again.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::ids::WorkerId;

/// Domain separation tag of the registration signature.
pub const AUTH_CONTEXT: &str = "tether-auth-v1";
/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest secret accepted, in bytes.
pub const MAX_SECRET_LEN: usize = 4096;
/// Longest secret file read, in bytes: a secret of [`MAX_SECRET_LEN`] and its line ending
/// (`\r\n`). A file that goes on past it is refused as too long, unread beyond.
pub const MAX_SECRET_FILE_LEN: usize = MAX_SECRET_LEN + 2;
/// Bytes of randomness in a nonce (sent as twice as many hex digits).
pub const NONCE_BYTES: usize = 32;
/// Default largest difference between the registration timestamp and the coordinator's clock.
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(120);
/// The smallest largest difference a coordinator may be set to take: below it, a worker's
/// registration ages past it on its way (a round trip over a slow link, a TLS handshake) and
/// a fleet whose clocks agree is refused.
pub const MIN_MAX_SKEW: Duration = Duration::from_secs(1);

type HmacSha256 = Hmac<Sha256>;

/// A shared secret. Its `Debug` never shows the bytes, so it cannot leak into logs, and its
/// memory is zeroed when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// Why authentication or a secret failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("secret is {len} bytes; at least {MIN_SECRET_LEN} are required")]
    SecretTooShort { len: usize },
    #[error("secret is over {MAX_SECRET_LEN} bytes")]
    SecretTooLong,
    #[error("cannot read secret file {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registration has no signature, but this coordinator requires authentication")]
    MissingSignature,
    #[error("signature is not 64 hex digits")]
    BadSignatureEncoding,
    #[error("signature does not match (wrong secret, or a replayed or altered registration)")]
    BadSignature,
    #[error(
        "this coordinator requires per-message integrity (hmac-sha256): the registration must carry a client_nonce of 64 hex digits and an integrity tag"
    )]
    IntegrityRequired,
    #[error("the registration's integrity tag does not verify")]
    BadIntegrityTag,
    #[error(
        "registration timestamp is {skew_ms} ms away from the coordinator's clock (at most {max_ms} ms allowed)"
    )]
    ClockSkew { skew_ms: i64, max_ms: u128 },
}

impl Secret {
    /// A secret from raw bytes; trailing ASCII whitespace (a file's newline) is not part of it.
    pub fn new(bytes: &[u8]) -> Result<Self, AuthError> {
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let bytes = &bytes[..end];
        if bytes.len() < MIN_SECRET_LEN {
            return Err(AuthError::SecretTooShort { len: bytes.len() });
        }
        if bytes.len() > MAX_SECRET_LEN {
            return Err(AuthError::SecretTooLong);
        }
        Ok(Self(Zeroizing::new(bytes.to_vec())))
    }

    /// Reads a secret file, no further than [`MAX_SECRET_FILE_LEN`] bytes: a path that leads
    /// to `/dev/zero` or a huge file is refused as too long instead of filling memory. A pipe
    /// is read like a file (`--secret-file <(pass show tether)`), so this waits for its
    /// writer: for a path a peer chooses, open it without waiting and check that it is a
    /// regular file, then use [`Secret::from_reader`].
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let file = std::fs::File::open(path).map_err(|source| AuthError::SecretFile {
            path: path.to_owned(),
            source,
        })?;
        Self::from_reader(file, path)
    }

    /// Reads a secret from `r` (opened from `path`, named in errors), no further than
    /// [`MAX_SECRET_FILE_LEN`] bytes and one more to tell a longer one.
    pub fn from_reader(r: impl Read, path: &Path) -> Result<Self, AuthError> {
        // Room for all that is read, so the buffer never moves and leaves no copy unzeroed.
        let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_SECRET_FILE_LEN + 1));
        r.take(MAX_SECRET_FILE_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| AuthError::SecretFile {
                path: path.to_owned(),
                source,
            })?;
        if bytes.len() > MAX_SECRET_FILE_LEN {
            return Err(AuthError::SecretTooLong);
        }
        Self::new(&bytes)
    }

    /// The bytes, to hash or MAC; never to log or send.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self) -> HmacSha256 {
        // INVARIANT: HMAC accepts keys of any length.
        HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("hmac takes any key"))
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The 32 bytes of a registration's signature, or why there are none: checked before any
/// secret is looked up, so that a worker id without a secret answers exactly like one with.
pub fn signature_bytes(signature: Option<&str>) -> Result<Vec<u8>, AuthError> {
    let sig = signature.ok_or(AuthError::MissingSignature)?;
    from_hex(sig)
        .filter(|b| b.len() == 32)
        .ok_or(AuthError::BadSignatureEncoding)
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// What a registration signature covers.
#[derive(Debug, Clone, Copy)]
pub struct Challenge<'a> {
    /// The worker id of the endpoint path.
    pub worker: &'a WorkerId,
    /// The `nonce` of this connection's `welcome`.
    pub nonce: &'a str,
    /// The registration's `timestamp`.
    pub timestamp: DateTime<Utc>,
    /// The registration's `boot_id`.
    pub boot_id: &'a str,
}

impl Challenge<'_> {
    /// The bytes the signature covers.
    pub fn input(&self) -> Vec<u8> {
        // The boot id is last: it is the only field that may hold a newline.
        format!(
            "{AUTH_CONTEXT}\n{}\n{}\n{}\n{}",
            self.worker,
            self.nonce,
            self.timestamp.timestamp_millis(),
            self.boot_id
        )
        .into_bytes()
    }

    /// The worker's `signature`.
    pub fn sign(&self, secret: &Secret) -> String {
        let mut mac = secret.mac();
        mac.update(&self.input());
        to_hex(&mac.finalize().into_bytes())
    }

    /// Checks a signature (in constant time), then the timestamp against `now`. The
    /// signature's presence and form are checked first, as [`signature_bytes`] does.
    pub fn verify(
        &self,
        secret: &Secret,
        signature: Option<&str>,
        now: DateTime<Utc>,
        max_skew: Duration,
    ) -> Result<(), AuthError> {
        let sig = signature_bytes(signature)?;
        let mut mac = secret.mac();
        mac.update(&self.input());
        mac.verify_slice(&sig)
            .map_err(|_| AuthError::BadSignature)?;
        // Checked after the signature, so an unauthenticated peer learns nothing of our clock.
        let skew_ms = (now - self.timestamp).num_milliseconds();
        if u128::from(skew_ms.unsigned_abs()) > max_skew.as_millis() {
            return Err(AuthError::ClockSkew {
                skew_ms,
                max_ms: max_skew.as_millis(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w() -> WorkerId {
        WorkerId::parse("gpu-box-7").expect("id")
    }

    fn secret() -> Secret {
        Secret::new(b"correct horse battery staple\n").expect("secret")
    }

    const SKEW: Duration = DEFAULT_MAX_SKEW;

    fn challenge<'a>(
        worker: &'a WorkerId,
        nonce: &'a str,
        ts: DateTime<Utc>,
        boot: &'a str,
    ) -> Challenge<'a> {
        Challenge {
            worker,
            nonce,
            timestamp: ts,
            boot_id: boot,
        }
    }

    #[test]
    fn a_signature_made_with_the_secret_verifies_and_any_change_breaks_it() {
        let now = Utc::now();
        let nonce = "ab".repeat(NONCE_BYTES);
        let worker = w();
        let sig = challenge(&worker, &nonce, now, "b-1").sign(&secret());
        assert_eq!(sig.len(), 64);
        let check = |c: Challenge<'_>, s: &Secret| c.verify(s, Some(&sig), now, SKEW);
        check(challenge(&worker, &nonce, now, "b-1"), &secret()).expect("valid");
        let bad = |r: Result<(), AuthError>| matches!(r, Err(AuthError::BadSignature));
        let other = Secret::new(b"another secret of some length").expect("secret");
        assert!(bad(check(challenge(&worker, &nonce, now, "b-1"), &other)));
        let other_nonce = "cd".repeat(NONCE_BYTES);
        assert!(bad(check(
            challenge(&worker, &other_nonce, now, "b-1"),
            &secret()
        )));
        assert!(bad(check(
            challenge(&worker, &nonce, now, "b-2"),
            &secret()
        )));
        let earlier = now - chrono::Duration::milliseconds(1);
        assert!(bad(check(
            challenge(&worker, &nonce, earlier, "b-1"),
            &secret()
        )));
        let other_worker = WorkerId::parse("gpu-box-8").expect("id");
        assert!(bad(check(
            challenge(&other_worker, &nonce, now, "b-1"),
            &secret()
        )));
    }

    #[test]
    fn missing_malformed_and_stale_signatures_are_told_apart() {
        let now = Utc::now();
        let nonce = "00".repeat(NONCE_BYTES);
        let worker = w();
        let c = challenge(&worker, &nonce, now, "b");
        let r = c.verify(&secret(), None, now, SKEW);
        assert!(matches!(r, Err(AuthError::MissingSignature)), "{r:?}");
        for junk in ["", "zz", "abc", &"0".repeat(62), &"é".repeat(32)] {
            let r = c.verify(&secret(), Some(junk), now, SKEW);
            assert!(
                matches!(r, Err(AuthError::BadSignatureEncoding)),
                "{junk:?}: {r:?}"
            );
        }
        let old = now - chrono::Duration::seconds(600);
        let c = challenge(&worker, &nonce, old, "b");
        let sig = c.sign(&secret());
        let r = c.verify(&secret(), Some(&sig), now, SKEW);
        assert!(matches!(r, Err(AuthError::ClockSkew { .. })), "{r:?}");
    }

    #[test]
    fn secrets_are_trimmed_bounded_and_never_printed() {
        assert!(matches!(
            Secret::new(b"short\n"),
            Err(AuthError::SecretTooShort { len: 5 })
        ));
        assert!(matches!(
            Secret::new(&[b'x'; MAX_SECRET_LEN + 1]),
            Err(AuthError::SecretTooLong)
        ));
        assert_eq!(
            secret(),
            Secret::new(b"correct horse battery staple").expect("s")
        );
        let shown = format!("{:?}", secret());
        assert!(!shown.contains("horse"), "{shown}");
        assert_eq!(to_hex(&[0, 15, 255]), "000fff");
        assert_eq!(from_hex("000fff"), Some(vec![0, 15, 255]));
    }

    /// A secret file is read no further than a secret and its line ending: one that never
    /// ends (`/dev/zero`, an endless reader) is refused as too long at once, where reading it
    /// whole first would fill memory. A longest secret with its `\r\n` is read.
    #[test]
    fn a_secret_file_is_read_no_further_than_a_secret_and_its_line_ending() {
        let endless = Secret::from_reader(std::io::repeat(b'x'), Path::new("endless"));
        assert!(
            matches!(endless, Err(AuthError::SecretTooLong)),
            "{endless:?}"
        );
        let longest = [&[b'x'; MAX_SECRET_LEN][..], b"\r\n"].concat();
        let read = Secret::from_reader(&longest[..], Path::new("longest")).expect("read");
        assert_eq!(read.expose().len(), MAX_SECRET_LEN);
        let more = [&longest[..], b"\n"].concat();
        let more = Secret::from_reader(&more[..], Path::new("more"));
        assert!(matches!(more, Err(AuthError::SecretTooLong)), "{more:?}");
        // In a thread: were it read whole, the test would fail on the deadline, not hang.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Secret::from_file(Path::new("/dev/zero")));
        });
        let zero = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("/dev/zero read within 10 s");
        assert!(matches!(zero, Err(AuthError::SecretTooLong)), "{zero:?}");
    }
}
