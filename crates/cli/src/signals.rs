//! Ctrl-c and SIGTERM as the commands stop on them: a token cancelled at the first, and a
//! second that may do more (a worker's second signal stops its tasks at once).

/// A token cancelled on ctrl-c or SIGTERM.
pub(crate) fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    cancel_on_signals(None)
}

/// A token cancelled at the first ctrl-c or SIGTERM; `second`, given, runs at the next one.
pub(crate) fn cancel_on_signals(
    second: Option<Box<dyn FnOnce() + Send>>,
) -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        // Listening from the start: a second signal that comes before the first is handled
        // is not missed.
        let mut signals = Signals::new();
        signals.recv().await;
        t.cancel();
        if let Some(second) = second {
            signals.recv().await;
            second();
        }
    });
    token
}

/// Ctrl-c (SIGINT) and SIGTERM, each delivered once to [`Signals::recv`].
struct Signals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                int: signal(SignalKind::interrupt()).ok(),
                term: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for the next ctrl-c or SIGTERM.
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = next(&mut self.int) => {}
                () = next(&mut self.term) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
