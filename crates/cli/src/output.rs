//! The commands' own output on standard output. A closed pipe (`tether tasks | head -1`) is its
//! reader saying it has seen enough: the command ends, where `println!` panicked on the failed
//! write; with success for a command whose output is all it does, with failure for one that
//! exists to report an outcome (a run's verdict, a watch), which went unread (`main`).

/// Standard output was closed by its reader; [`fn@line`] writes one line of a command's output
/// and says so. Shared with `tether proxy`'s commands, which live in the fault proxy's crate.
pub use tether_faultproxy::cli::{StdoutClosed as Closed, out_line as line};

/// Writes `text`, part of a line of a command's output, and sends it on its way at once (a
/// listing printed page by page reaches its reader a page at a time); as [`fn@line`] does, says
/// [`Closed`] when the reader has gone.
pub fn part(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Closed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to standard output")),
    }
}

/// Whether `e` is standard output's reader having gone (see [`Closed`]).
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Closed>())
}

/// An error and its causes for the user, each said once: a message that already ends with its
/// cause (an error type's `{source}`) is not followed by that cause again.
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // Said already, by a context that quotes its cause (`no task x at this coordinator`
        // over `no task x`, or over the coordinator's `no task x (HTTP 404)`).
        if out.contains(&text) || out.contains(without_status(&text)) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    // What a plain-HTTP client reads from a TLS server (its alert) says nothing of TLS. Said
    // as the https:// client says the converse (`client::tls_hint`), with the flag that gives
    // a private CA: a coordinator serving TLS has `--tls-cert`, often of a CA of its own.
    if out.contains("invalid HTTP version parsed") {
        out.push_str(TLS_ANSWER);
    }
    out
}

/// What [`describe`] adds to an error in which what answered an `http://` URL spoke no HTTP.
const TLS_ANSWER: &str = " (what answered speaks no plain HTTP: if the coordinator serves TLS, \
                          give an https:// URL, with --ca-file (or TETHER_CA_FILE) when a CA \
                          this system does not trust signed its certificate)";

/// `text` without the ` (HTTP nnn)` an answer of the coordinator ends with.
fn without_status(text: &str) -> &str {
    text.rsplit_once(" (HTTP ")
        .filter(|(_, code)| code.len() == 4 && code.ends_with(')'))
        .map_or(text, |(said, _)| said)
}

/// `println!` for a command's output: `outln!(...)?` ends the command on a closed pipe instead
/// of panicking.
macro_rules! outln {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open database d/tether.db: {source}")]
    struct Open {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_its_message_is_said_once() {
        let e = anyhow::Error::new(Open {
            source: std::io::Error::other("disk I/O error"),
        })
        .context("serving");
        assert_eq!(
            describe(&e),
            "serving: cannot open database d/tether.db: disk I/O error"
        );
        let e = anyhow::Error::new(std::io::Error::other("denied")).context("reading x");
        assert_eq!(describe(&e), "reading x: denied");
        let e = anyhow::anyhow!("no task x").context("no task x at this coordinator");
        assert_eq!(describe(&e), "no task x at this coordinator");
        let e = anyhow::anyhow!("no task x (HTTP 404)").context("no task x at this coordinator");
        assert_eq!(describe(&e), "no task x at this coordinator");
        let e = anyhow::anyhow!("invalid HTTP version parsed").context("GET http://h/api");
        assert!(describe(&e).ends_with(TLS_ANSWER), "{}", describe(&e));
    }

    #[test]
    fn a_closed_pipe_is_told_apart_from_other_errors() {
        assert!(is_closed(&anyhow::Error::new(Closed).context("listing")));
        assert!(!is_closed(&anyhow::anyhow!("broken")));
    }
}
