//! A future polled again only once it has woken its task.
//!
//! A `select!` polls every branch each time its task wakes, whichever branch woke it. A wait
//! for a `CancellationToken` locks the token's mutex and then its notifier's at every poll, so
//! a session's loop, which wakes for every frame, or a task that wakes for every tick, paid two
//! locks a round for a wait that almost never ends (3 % of a stress fleet's CPU, spent mostly
//! on cache misses of the locks). [`WhenWoken`] hands the inner future a waker of its own and
//! polls it only after that waker was used.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Wraps `inner` so that it is polled on the first poll and afterwards only when it woke its
/// task since it was last polled.
pub fn when_woken<F: Future>(inner: F) -> WhenWoken<F> {
    let signal = Arc::new(Signal {
        woken: AtomicBool::new(false),
        task: AtomicWaker::new(),
    });
    WhenWoken {
        inner: Box::pin(inner),
        waker: Waker::from(signal.clone()),
        signal,
        task: None,
        polled: false,
    }
}

/// See [`when_woken`].
pub struct WhenWoken<F> {
    inner: Pin<Box<F>>,
    signal: Arc<Signal>,
    /// Wakes `signal`; the inner future is polled with it.
    waker: Waker,
    /// The task last registered in `signal`.
    task: Option<Waker>,
    polled: bool,
}

/// What the inner future's wake-up does: note it, and wake the task that polled us last.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // The task first, then the flag: a wake-up between the two is seen now, one after
        // them wakes this task. The shared slot is written only when the task changed or a
        // wake-up took the task out of it (writing it every poll missed the cache as often).
        let same = this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker()));
        if !same {
            this.signal.task.register(cx.waker());
            this.task = Some(cx.waker().clone());
        }
        let woken = || {
            this.signal.woken.load(Ordering::Acquire)
                && this.signal.woken.swap(false, Ordering::AcqRel)
        };
        if this.polled && !woken() {
            return Poll::Pending;
        }
        if same && this.polled {
            this.signal.task.register(cx.waker());
        }
        this.polled = true;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

impl<F> std::fmt::Debug for WhenWoken<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhenWoken")
            .field("woken", &self.signal.woken.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    /// Pending until `ready`; counts its polls and keeps the waker it was last polled with.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    impl Probe {
        /// Wakes whatever polled it last.
        fn wake(&self) {
            let waker = self.waker.lock().expect("lock").take();
            waker.expect("polled").wake();
        }
    }

    struct Polls(Arc<Probe>);

    impl Future for Polls {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            *self.0.waker.lock().expect("lock") = Some(cx.waker().clone());
            match self.0.ready.load(Ordering::SeqCst) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        }
    }

    /// Counts the wake-ups of the task that polls.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A wrapped [`Probe`], the task that polls it, and that task's waker.
    fn wrapped() -> (WhenWoken<Polls>, Arc<Probe>, Arc<Task>, Waker) {
        let probe = Arc::new(Probe::default());
        let task = Arc::new(Task::default());
        let waker = Waker::from(task.clone());
        (when_woken(Polls(probe.clone())), probe, task, waker)
    }

    #[test]
    fn the_inner_future_is_polled_again_only_after_it_woke_the_task() {
        let (mut fut, probe, task, waker) = wrapped();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(probe.polls.load(Ordering::SeqCst), 1);
        // The task wakes for other reasons: the inner future is left alone.
        for _ in 0..5 {
            assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        }
        assert_eq!(probe.polls.load(Ordering::SeqCst), 1);
        assert_eq!(task.0.load(Ordering::SeqCst), 0);

        // Its own wake-up wakes the task, and the next poll reaches it.
        probe.ready.store(true, Ordering::SeqCst);
        probe.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_ready());
        assert_eq!(probe.polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn every_wake_up_reaches_the_task_not_only_the_first() {
        let (mut fut, probe, task, waker) = wrapped();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        for round in 1..=3 {
            probe.wake();
            assert_eq!(task.0.load(Ordering::SeqCst), round);
            assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
            assert_eq!(probe.polls.load(Ordering::SeqCst), round + 1);
        }
    }

    #[test]
    fn a_wake_up_wakes_the_task_that_polled_last() {
        let probe = Arc::new(Probe::default());
        let (first, second) = (Arc::new(Task::default()), Arc::new(Task::default()));
        let mut fut = when_woken(Polls(probe.clone()));
        let w1 = Waker::from(first.clone());
        let w2 = Waker::from(second.clone());
        assert!(
            Pin::new(&mut fut)
                .poll(&mut Context::from_waker(&w1))
                .is_pending()
        );
        assert!(
            Pin::new(&mut fut)
                .poll(&mut Context::from_waker(&w2))
                .is_pending()
        );
        probe.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_cancellation_ends_the_wait_of_a_busy_select() {
        let token = tokio_util::sync::CancellationToken::new();
        let stop = when_woken(token.cancelled());
        tokio::pin!(stop);
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            canceller.cancel();
        });
        let mut rounds = 0u64;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stop => return rounds,
                    _ = tokio::time::sleep(std::time::Duration::from_micros(100)) => rounds += 1,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the cancellation was missed");
    }
}
