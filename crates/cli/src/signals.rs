//! Ctrl-c and SIGTERM as the commands stop on them: a token cancelled at the first, and a
//! second that may do more (a worker's second signal stops its tasks at once). SIGHUP, for
//! the commands that take it ([`on_hangup`]), reloads instead of ending the process.

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

/// Runs `reload` at each SIGHUP, on the blocking pool and one at a time, in place of the
/// signal's default action, which ends the process at once (no log line, no drain: a worker's
/// tasks killed and not handed back). Signals that come while one runs are taken as one.
pub(crate) fn on_hangup(reload: impl Fn() + Send + Sync + 'static) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP: it ends this process");
                return;
            }
        };
        let reload = std::sync::Arc::new(reload);
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let reload = reload.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || (*reload)()).await {
                    tracing::error!(error = %e, "the SIGHUP reload failed");
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = reload;
}
