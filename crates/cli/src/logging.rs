//! The log of a command: `tracing` to stderr, at the level the command line asked for or the
//! command's own default.

/// Logs at `level` (a filter: `info`, `tether_worker=debug`) to stderr from here on. A filter
/// that does not parse is a usage error: said, exit 2.
pub(crate) fn init(level: &str) {
    let filter = match tracing_subscriber::EnvFilter::try_new(level) {
        Ok(f) => f,
        // Said, not replaced by `info` in silence: the user asked for something else.
        Err(e) => {
            eprintln!(
                "error: --log {level:?} is not a log filter ({e}); use e.g. info, debug or tether_worker=debug"
            );
            std::process::exit(2);
        }
    };
    // Colour for a terminal only: a log sent to a file or a journal stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    // A log line that cannot be written (the reader of a pipe went away: `| head`, a stopped
    // journal) is dropped. By default the subscriber reports the failure with `eprintln!`,
    // which panics on the same closed stderr: a worker died of it (exit 101) with its tasks.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false)
        .try_init();
}
