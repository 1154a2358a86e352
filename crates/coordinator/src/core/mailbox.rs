//! A session's inbox of outgoing messages: many senders (the core, the store's effects), one
//! receiver (the session's task), unbounded like the channel it replaces.
//!
//! Why not `tokio::sync::mpsc`: an unbounded tokio channel allocates its first block of 32
//! slots and two cache-padded halves when it is created, for every session, before a single
//! message is sent. An idle worker's session receives a heartbeat reply every few seconds and
//! little else. Here an idle mailbox is one small allocation; its queue grows on first use and
//! keeps the few slots a session needs (docs/PERFORMANCE.md has the measured difference).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

struct Shared<T> {
    queue: Mutex<VecDeque<T>>,
    notify: Notify,
    senders: AtomicUsize,
    closed: AtomicBool,
}

/// The sending half; cheap to clone.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving half, owned by the session's task.
pub struct Receiver<T>(Arc<Shared<T>>);

/// The receiver is gone; the message comes back.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed<T>(pub T);

/// Nothing is waiting (or every sender is gone).
#[derive(Debug, PartialEq, Eq)]
pub enum TryRecvError {
    Empty,
    Disconnected,
}

/// A new mailbox.
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        notify: Notify::new(),
        senders: AtomicUsize::new(1),
        closed: AtomicBool::new(false),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Shared<T> {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        // A panic while holding this lock cannot leave the queue half-changed.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T> Sender<T> {
    /// Queues `msg` for the session; fails only when the session has ended.
    pub fn send(&self, msg: T) -> Result<(), Closed<T>> {
        if self.0.closed.load(Ordering::Acquire) {
            return Err(Closed(msg));
        }
        self.0.queue().push_back(msg);
        // Stores a permit when the receiver is not waiting: no wakeup is lost.
        self.0.notify.notify_one();
        Ok(())
    }

    /// Queues `msgs` in order, together: one lock and one wakeup for all of them. Fails only
    /// when the session has ended (the messages are dropped).
    pub fn send_all(&self, msgs: impl IntoIterator<Item = T>) -> Result<(), Closed<()>> {
        if self.0.closed.load(Ordering::Acquire) {
            return Err(Closed(()));
        }
        self.0.queue().extend(msgs);
        self.0.notify.notify_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        Self(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.notify.notify_one();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("closed", &self.0.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl<T> Receiver<T> {
    /// The next message in order; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            match self.try_recv() {
                Ok(msg) => return Some(msg),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.0.notify.notified().await,
            }
        }
    }

    /// How many messages are queued: what the session has still to write.
    pub fn len(&self) -> usize {
        self.0.queue().len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.0.queue().is_empty()
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        if let Some(msg) = self.0.queue().pop_front() {
            return Ok(msg);
        }
        if self.0.senders.load(Ordering::Acquire) == 0 {
            Err(TryRecvError::Disconnected)
        } else {
            Err(TryRecvError::Empty)
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        // What was queued for an ended session is dropped now, not when the last sender goes.
        self.0.queue().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_arrive_in_order_and_none_is_lost_to_a_late_wakeup() {
        let (tx, mut rx) = channel();
        let tx2 = tx.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(n) = rx.recv().await {
                got.push(n);
            }
            got
        });
        for n in 0..1000 {
            let t = if n % 2 == 0 { &tx } else { &tx2 };
            t.send(n).expect("open");
            if n % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        drop(tx2);
        let got = reader.await.expect("reader");
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_closed_mailbox_refuses_and_an_abandoned_one_reports_disconnected() {
        let (tx, mut rx) = channel();
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        tx.send(1).expect("open");
        assert_eq!(rx.try_recv(), Ok(1));
        let tx2 = tx.clone();
        drop(tx);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        drop(tx2);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));

        let (tx, rx) = channel();
        drop(rx);
        assert_eq!(tx.send(7), Err(Closed(7)));
    }

    #[test]
    fn messages_sent_together_arrive_in_order_after_those_before() {
        let (tx, mut rx) = channel();
        tx.send(1).expect("open");
        tx.send_all([2, 3, 4]).expect("open");
        tx.send(5).expect("open");
        assert_eq!(rx.len(), 5);
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        drop(rx);
        assert_eq!(tx.send_all([6]), Err(Closed(())));
    }
}
