//! API reads of committed data, on a connection and thread of their own.
//!
//! A read handed over by the writer after its group committed sees that commit (each of its
//! read transactions starts later, and WAL readers see every commit made before they start),
//! and it no longer holds up the commits behind it: a large checkpoint downloaded through the
//! API, or a task's state looked up in a long state log, used to run between two of the
//! writer's commits and delay every acknowledgement waiting on the next one.

use std::path::Path;
use std::sync::mpsc;

use rusqlite::Connection;

use super::Job;

/// The reader thread. Stops once dropped, after the reads already handed to it.
pub(super) struct Reader {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    pub fn start(path: &Path) -> std::io::Result<Self> {
        let conn = Connection::open(path)
            .and_then(|c| {
                c.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = ON;")
                    .map(|()| c)
            })
            .map_err(std::io::Error::other)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("tether-read".into())
            .spawn(move || {
                for job in rx {
                    job(&conn);
                }
            })?;
        Ok(Reader {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Hands `read` to the reader thread; gives it back if that thread is gone.
    pub fn run(&self, read: Job) -> Result<(), Job> {
        match &self.jobs {
            Some(jobs) => jobs.send(read).map_err(|e| e.0),
            None => Err(read),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
