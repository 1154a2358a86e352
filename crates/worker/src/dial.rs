//! Connection attempts paced by the backoff rather than by their outcome, on a silent path.
//!
//! An attempt that fails (refused, reset) is followed by the next after a backoff delay. One
//! that gets no answer at all is, as a rule, waited for until its connect timeout: a coordinator
//! busy with a herd of handshakes (after a restart, say) answers late, and a second attempt
//! beside each late one would only add to its work. But once the path has shown it swallows
//! what is sent (the last session ended by the liveness timeout, or an attempt of this outage
//! timed out), an attempt left unanswered for the delay the worker would wait had it failed
//! counts as failed, and the next starts beside it. On a blackhole that clears, the worker is
//! so back within its current delay instead of after the connect timeout of an attempt made
//! while it was silent. An attempt of a silent path that times out before its delay ran out
//! (a delay longer than the connect timeout) leaves the next due a delay after it started, not
//! a delay after the timeout: the rate stays the backoff's, and a path that clears meanwhile
//! is found within one delay, not a connect timeout and a delay. The rate of attempts is the
//! backoff's either way: at most
//! [`MAX_UNDER_WAY`] attempts of a worker are under way at once, the oldest is given up for a
//! newer one, and an attempt still under way when another opens is dropped unused (it never
//! registers, so it never displaces the session of the one that won).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::{Instant, Timeout};
use tokio_util::sync::CancellationToken;

use crate::adaptive;
use crate::agent::{Agent, AttemptStamp, unix_us};
use crate::backoff::Backoff;
use crate::connector::{ConnectError, WsStream, ws_config};
use crate::eventlog::Event;
use crate::metrics as m;
use crate::stats::ConnState;

/// The share of the coordinator's grace (`lost_after_ms`) a reconnect delay may take, at
/// most, while the worker holds leased work: a quarter leaves room for the connect timeout of
/// an attempt made into the outage, and for the coordinator having noticed the loss before
/// the worker did.
pub const GRACE_SHARE: u32 = 4;

/// Attempts of one worker under way at once.
pub const MAX_UNDER_WAY: usize = 2;

/// Why an attempt failed when its connect timeout passed.
const TIMED_OUT: &str = "connect timed out";

/// Why an attempt under way was dropped: a newer one was started beside it, or one beside it
/// opened first.
const TWIN_DROPPED: &str = "dropped for another attempt beside it";

/// How dialling ended.
pub(crate) enum Dialed {
    /// A WebSocket is open (boxed: the other outcomes are small); the attempt's generation.
    Open(Box<WsStream>, u64),
    /// The coordinator refused this worker at the upgrade (401, 403) on
    /// the last of `refusals_before_stop` connections in a row.
    Refused(String),
    /// `max_attempts` attempts failed in a row.
    GaveUp(u32),
    Shutdown,
}

/// One connection attempt under way.
struct Dialing {
    generation: u64,
    started: Instant,
    started_unix_us: u64,
    /// The backoff delay waited before it.
    delay: Duration,
    /// Its failure is in the backoff already: a newer attempt started while it was under way.
    counted: bool,
    connect: Connecting,
}

/// An attempt's connector future under its connect timeout.
type Connecting = Pin<Box<Timeout<BoxFuture<'static, Result<WsStream, ConnectError>>>>>;

/// How an attempt ended.
enum Ended {
    /// Boxed like [`Dialed::Open`]: the other outcomes are small.
    Open(Box<WsStream>),
    Refused(String),
    Failed(String),
    /// The coordinator's TLS certificate is not trusted: a misconfiguration, retried.
    Untrusted(String),
    /// No answer within the connect timeout: the path may be silent.
    TimedOut,
}

/// Polls every attempt under way; ready with the index and outcome of the first that ended.
struct FirstEnded<'a>(&'a mut VecDeque<Dialing>);

impl Future for FirstEnded<'_> {
    type Output = (usize, Ended);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        for (i, a) in self.0.iter_mut().enumerate() {
            if let Poll::Ready(r) = a.connect.as_mut().poll(cx) {
                let ended = match r {
                    Ok(Ok(ws)) => Ended::Open(Box::new(ws)),
                    Ok(Err(ConnectError::Refused(reason))) => Ended::Refused(reason),
                    Ok(Err(ConnectError::Transient(reason))) => Ended::Failed(reason),
                    Ok(Err(ConnectError::Untrusted(reason))) => Ended::Untrusted(reason),
                    Err(_) => Ended::TimedOut,
                };
                return Poll::Ready((i, ended));
            }
        }
        Poll::Pending
    }
}

impl Agent {
    /// Makes connection attempts until one opens a WebSocket, the first at once (`waited` is
    /// the delay waited before it), each next one a backoff delay after the newest failed or,
    /// on a `silent` path (or once an attempt timed out), when the newest is still unanswered,
    /// a backoff delay after it started.
    ///
    /// A refusal at the upgrade counts in `refusals` (the coordinator's refusals since the last
    /// registration): one may be an answer damaged on the wire, a proxy's hiccup or forged by
    /// someone on the path, so it is retried like a failure until the refusals reach
    /// `refusals_before_stop`.
    ///
    /// A `stop` (the worker told to stop while it holds work to hand back; `shutdown` ends
    /// the dialing for good) cuts short the delay it finds under way, once (`hurried`): the
    /// worker has a few seconds to reach the coordinator, and a delay of a long outage would
    /// outlast them.
    pub(crate) async fn dial(
        &mut self,
        backoff: &mut Backoff,
        waited: Duration,
        mut silent: bool,
        refusals: &mut u32,
        (stop, hurried): (&CancellationToken, &mut bool),
        shutdown: &CancellationToken,
    ) -> Dialed {
        let mut under_way: VecDeque<Dialing> = VecDeque::with_capacity(MAX_UNDER_WAY);
        // When the next attempt starts, and the delay it will have waited.
        let mut next: Option<(Instant, Duration)> = Some((Instant::now(), waited));
        loop {
            let due = next.map(|(at, _)| at);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Dialed::Shutdown,
                _ = stop.cancelled(), if !*hurried => {
                    *hurried = true;
                    if let Some((at, _)) = next.as_mut() {
                        tracing::info!(worker = %self.cfg.worker_id, "stopping while not connected: the next attempt starts now, to hand back what this worker holds");
                        *at = Instant::now();
                    }
                }
                (i, r) = FirstEnded(&mut under_way), if !under_way.is_empty() => {
                    let Some(a) = under_way.remove(i) else { continue };
                    match r {
                        Ended::Open(ws) => {
                            // The twins still under way are dropped here, unused.
                            for twin in &under_way {
                                self.twin_dropped(twin.generation);
                            }
                            self.shared
                                .attempt_started_unix_us
                                .store(a.started_unix_us, Ordering::Relaxed);
                            self.shared
                                .backoff_delay_us
                                .store(a.delay.as_micros() as u64, Ordering::Relaxed);
                            return Dialed::Open(ws, a.generation);
                        }
                        Ended::Refused(reason)
                            if *refusals + 1 >= self.cfg.refusals_before_stop =>
                        {
                            *refusals += 1;
                            self.attempt_failed(a.generation, &reason);
                            for twin in &under_way {
                                self.twin_dropped(twin.generation);
                            }
                            return Dialed::Refused(reason);
                        }
                        ended @ (Ended::Refused(_)
                        | Ended::Failed(_)
                        | Ended::Untrusted(_)
                        | Ended::TimedOut) => {
                            // Timed out on a path already known silent: the next attempt is
                            // due a delay after this one started (set when it started).
                            let paced = matches!(ended, Ended::TimedOut) && silent;
                            let reason = match ended {
                                Ended::Refused(reason) => {
                                    *refusals += 1;
                                    tracing::warn!(worker = %self.cfg.worker_id, generation = a.generation, %reason, refusals = *refusals, stop_after = self.cfg.refusals_before_stop, "coordinator refused this worker at the upgrade; trying again in case the answer was damaged or forged");
                                    reason
                                }
                                Ended::Failed(reason) => reason,
                                Ended::Untrusted(reason) => {
                                    // Not counted as a refusal: nothing the coordinator said, and
                                    // the fix (its certificate, or a CA bundle pushed to the file
                                    // read at each attempt) needs no restart of this worker.
                                    tracing::error!(worker = %self.cfg.worker_id, generation = a.generation, %reason, "the coordinator's TLS certificate is not trusted by this worker: a misconfiguration (its CA changed, or this worker was given another); trying again with backoff, the CA file read again at each attempt");
                                    reason
                                }
                                _ => {
                                    silent = true;
                                    TIMED_OUT.to_owned()
                                }
                            };
                            self.attempt_failed(a.generation, &reason);
                            if !a.counted {
                                next = match next {
                                    Some(due) if paced => self.timed_out(backoff, a.started, due),
                                    // The newest failed: the next waits a delay from now.
                                    _ => self.failed(backoff).map(|d| (Instant::now() + d, d)),
                                };
                            }
                            if under_way.is_empty() {
                                if next.is_none() {
                                    return Dialed::GaveUp(backoff.failed_attempts());
                                }
                                self.shared.set_state(ConnState::Disconnected);
                            } else {
                                self.shared.set_state(ConnState::Connecting);
                            }
                        }
                    }
                }
                _ = sleep_until_some(due), if due.is_some() => {
                    let Some((_, delay)) = next.take() else { continue };
                    // The newest attempt still under way and not yet counted: this is its
                    // delay running out (a counted one is an older attempt, whose successor
                    // failed and set this delay).
                    if let Some(newest) = under_way.back_mut().filter(|a| !a.counted) {
                        // Unanswered for the delay a failure would have waited: count it as
                        // failed (it may still open) and start the next beside it.
                        newest.counted = true;
                        self.tune(backoff);
                        backoff.record_failure();
                        if backoff.exhausted() {
                            continue;
                        }
                        tracing::info!(worker = %self.cfg.worker_id, generation = newest.generation, delay_ms = delay.as_millis() as u64, failures = backoff.failures(), "no answer within the backoff delay; another attempt beside it");
                    }
                    if under_way.len() == MAX_UNDER_WAY
                        && let Some(oldest) = under_way.pop_front()
                    {
                        self.twin_dropped(oldest.generation);
                    }
                    under_way.push_back(self.start_attempt(delay));
                    // On a silent path, when the next starts if this one is still unanswered.
                    self.tune(backoff);
                    next = silent.then(|| {
                        let d = backoff.upcoming(&mut self.rng);
                        (Instant::now() + d, d)
                    });
                    self.publish(backoff);
                }
            }
        }
    }

    fn start_attempt(&mut self, delay: Duration) -> Dialing {
        let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.stats().on_attempt();
        metrics::counter!(m::CONNECTION_ATTEMPTS).increment(1);
        let started_unix_us = unix_us();
        self.shared.stamp_attempt(AttemptStamp {
            started_unix_us,
            delay_us: delay.as_micros() as u64,
        });
        self.shared.set_state(ConnState::Connecting);
        let connect = self
            .connector
            .connect(self.endpoint.clone(), ws_config(self.cfg.max_frame));
        Dialing {
            generation,
            started: Instant::now(),
            started_unix_us,
            delay,
            counted: false,
            connect: Box::pin(tokio::time::timeout(self.cfg.connect_timeout, connect)),
        }
    }

    /// An attempt that did not open a session.
    pub(crate) fn attempt_failed(&self, generation: u64, reason: &str) {
        self.shared.stats().on_attempt_failed();
        self.event(Event::AttemptFailed {
            generation,
            reason: reason.to_owned(),
        });
        metrics::counter!(m::CONNECTION_FAILURES).increment(1);
        tracing::warn!(worker = %self.cfg.worker_id, generation, %reason, "connection attempt failed");
    }

    /// An attempt given up unanswered for a newer one, or left when its twin opened first: not
    /// a failure of the link (no failure metric, no warning), but it did not open a session.
    fn twin_dropped(&self, generation: u64) {
        self.shared.stats().on_attempt_failed();
        self.event(Event::AttemptFailed {
            generation,
            reason: TWIN_DROPPED.to_owned(),
        });
        tracing::debug!(worker = %self.cfg.worker_id, generation, "connection attempt dropped for its twin");
    }

    /// Records a failed attempt in the backoff: the delay before the next attempt, or `None`
    /// once `max_attempts` failed in a row.
    pub(crate) fn failed(&mut self, backoff: &mut Backoff) -> Option<Duration> {
        self.tune(backoff);
        let delay = backoff.next_delay(&mut self.rng);
        self.publish(backoff);
        if backoff.exhausted() {
            return None;
        }
        tracing::info!(worker = %self.cfg.worker_id, delay_ms = delay.as_millis() as u64, failures = backoff.failures(), "reconnecting after backoff");
        Some(delay)
    }

    /// Records the failure of the newest attempt, timed out on a silent path before the next
    /// was `due` (a delay after it `started`): the next stays due then, or `None` once
    /// `max_attempts` failed in a row.
    fn timed_out(
        &mut self,
        backoff: &mut Backoff,
        started: Instant,
        due: (Instant, Duration),
    ) -> Option<(Instant, Duration)> {
        self.tune(backoff);
        backoff.record_failure();
        self.publish(backoff);
        if backoff.exhausted() {
            return None;
        }
        let (at, delay) = due;
        tracing::info!(worker = %self.cfg.worker_id, delay_ms = delay.as_millis() as u64, in_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64, since_start_ms = started.elapsed().as_millis() as u64, failures = backoff.failures(), "reconnecting a backoff delay after the timed-out attempt started");
        Some(due)
    }

    /// Records a lost session in the backoff (no failed attempt: see
    /// [`Backoff::session_lost`]): the delay before the first attempt to reconnect.
    pub(crate) fn session_lost(&mut self, backoff: &mut Backoff, healthy: bool) -> Duration {
        self.tune(backoff);
        let delay = backoff.session_lost(healthy, &mut self.rng);
        self.publish(backoff);
        tracing::info!(worker = %self.cfg.worker_id, delay_ms = delay.as_millis() as u64, failures = backoff.failures(), "reconnecting after backoff");
        delay
    }

    /// Sets the backoff's adaptive boost from the link's record so far, and its ceiling from
    /// the coordinator's grace while this worker holds leased work (an idle one keeps the
    /// configured cap: a herd of them must not storm a coordinator that comes back).
    fn tune(&self, backoff: &mut Backoff) {
        backoff.set_ceiling(
            self.grace
                .filter(|_| crate::agent::holds_work(&self.outbox, &self.runner))
                .map(|g| g / GRACE_SHARE),
        );
        let (stability, sessions) = {
            let s = self.shared.stats();
            (s.link_stability().unwrap_or(1.0), s.sessions())
        };
        backoff.set_boost(adaptive::backoff_boost(
            &self.cfg.adaptive,
            stability,
            sessions,
        ));
    }

    /// Publishes the backoff's state, for statistics.
    fn publish(&self, backoff: &Backoff) {
        self.shared
            .backoff_factor_milli
            .store((backoff.factor() * 1000.0) as u64, Ordering::Relaxed);
        self.shared
            .next_backoff_ms
            .store(backoff.peek().as_millis() as u64, Ordering::Relaxed);
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
