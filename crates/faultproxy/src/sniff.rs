//! Learning a link's worker id from the first bytes of its upstream stream.
//!
//! A worker opens its connection with an HTTP upgrade request whose request line names it:
//! `GET /api/v1/worker/<id>/ws HTTP/1.1`. The link buffers the first bytes until that line is
//! complete (or clearly not coming) before it forwards anything, so faults that target workers
//! apply from the first byte.

use std::time::Duration;

use tether_proto::WorkerId;
use tether_proto::endpoint::parse_endpoint_path;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::Instant;

use crate::link::Outcome;
use crate::pump::outcome_of;

/// Most bytes buffered while looking for the request line.
pub const SNIFF_LIMIT: usize = 8 * 1024;

/// Longest wait for the request line; after it the link goes on with an unknown worker.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest HTTP method token we wait for.
const MAX_METHOD_LEN: usize = 16;

/// What the first bytes tell so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sniff {
    /// More bytes could still make a request line.
    Incomplete,
    /// Decided: the worker named by the request line, or `None` when there is none.
    Done(Option<WorkerId>),
}

/// Looks at the first bytes of an upstream stream.
pub(crate) fn inspect(buf: &[u8]) -> Sniff {
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len > MAX_METHOD_LEN || (method_len < buf.len() && buf[method_len] != b' ') {
        return Sniff::Done(None);
    }
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= SNIFF_LIMIT {
            Sniff::Done(None)
        } else {
            Sniff::Incomplete
        };
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Sniff::Done(None);
    };
    let mut parts = line.split(' ');
    let worker = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_method), Some(target), Some(version), None) if version.starts_with("HTTP/") => {
            // The path, without the query (`?pipelined=1` of a worker that registers first).
            let path = target.split_once('?').map_or(target, |(path, _)| path);
            parse_endpoint_path(path).ok()
        }
        _ => None,
    };
    Sniff::Done(worker)
}

/// Whether a stream opens with a TLS handshake record (a `wss://` worker): its request line,
/// and so its worker, cannot be read.
fn worker_hidden_by_tls(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, ..])
}

/// Says once a process that links carry TLS, so faults limited to workers never apply to them.
fn warn_tls_once() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!("a link carries TLS (wss://): its worker is unknown to the proxy, so a fault limited with --worker never applies to it (faults for every link do)");
    });
}

/// The first bytes of a link's upstream stream and what they told.
#[derive(Debug)]
pub(crate) struct Sniffed {
    pub bytes: Vec<u8>,
    pub arrived: Instant,
    pub eof: bool,
    /// The client reset its connection while sniffing. Linux reports the reset once, to one
    /// read, and the next read answers 0 as at a FIN: unrecorded, the reset reached the
    /// upstream as a clean close.
    pub reset: bool,
    pub worker: Option<WorkerId>,
}

/// Reads from `src` until [`inspect`] decides, the client closes, [`SNIFF_LIMIT`] bytes are
/// buffered or [`SNIFF_TIMEOUT`] passes. A read error ends sniffing too; a reset is recorded,
/// since it is reported only once, to this read (another error: the pump will see it).
pub(crate) async fn sniff(src: &mut OwnedReadHalf) -> Sniffed {
    let mut out = Sniffed {
        bytes: Vec::with_capacity(1024),
        arrived: Instant::now(),
        eof: false,
        reset: false,
        worker: None,
    };
    let deadline = Instant::now() + SNIFF_TIMEOUT;
    let mut buf = [0u8; 1024];
    while out.bytes.len() < SNIFF_LIMIT {
        let room = (SNIFF_LIMIT - out.bytes.len()).min(buf.len());
        let read = tokio::time::timeout_at(deadline, src.read(&mut buf[..room])).await;
        match read {
            Ok(Ok(0)) => {
                out.eof = true;
                break;
            }
            Ok(Ok(n)) => {
                if out.bytes.is_empty() {
                    out.arrived = Instant::now();
                }
                out.bytes.extend_from_slice(&buf[..n]);
                if let Sniff::Done(worker) = inspect(&out.bytes) {
                    out.worker = worker;
                    if worker_hidden_by_tls(&out.bytes) {
                        warn_tls_once();
                    }
                    break;
                }
            }
            Ok(Err(e)) => {
                out.reset = outcome_of(&e) == Outcome::Reset;
                break;
            }
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_handshake_is_told_from_a_request_line() {
        assert!(worker_hidden_by_tls(&[0x16, 0x03, 0x01, 0x02, 0x00]));
        assert_eq!(inspect(&[0x16, 0x03, 0x01]), Sniff::Done(None));
        assert!(!worker_hidden_by_tls(
            b"GET /api/v1/worker/w/ws HTTP/1.1\r\n"
        ));
    }

    fn w(s: &str) -> Option<WorkerId> {
        Some(WorkerId::parse(s).expect("id"))
    }

    #[test]
    fn the_upgrade_request_line_names_the_worker() {
        let req = b"GET /api/v1/worker/w-1/ws HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(inspect(req), Sniff::Done(w("w-1")));
        assert_eq!(
            inspect(b"GET /api/v1/worker/a%40b/ws HTTP/1.1\n"),
            Sniff::Done(w("a@b"))
        );
        assert_eq!(
            inspect(b"GET /api/v1/worker/w-2/ws?pipelined=1 HTTP/1.1\r\n"),
            Sniff::Done(w("w-2"))
        );
    }

    #[test]
    fn a_partial_request_line_waits_for_more() {
        for prefix in [
            &b"G"[..],
            b"GET",
            b"GET ",
            b"GET /api/v1/worker/w1/ws HTTP/1.1\r",
        ] {
            assert_eq!(inspect(prefix), Sniff::Incomplete, "{prefix:?}");
        }
    }

    #[test]
    fn other_traffic_is_decided_at_once_without_a_worker() {
        for buf in [
            &b"hello"[..],
            b"\x00\x01",
            b"GET /metrics HTTP/1.1\r\n",
            b"GET /api/v1/worker/w1/ws\r\n",
            b"GET /api/v1/worker/a%2Fb/ws HTTP/1.1\r\n",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            b"GET\t/",
        ] {
            assert_eq!(inspect(buf), Sniff::Done(None), "{buf:?}");
        }
        let long = [b"GET /".as_slice(), &[b'a'; SNIFF_LIMIT]].concat();
        assert_eq!(inspect(&long), Sniff::Done(None));
    }
}
