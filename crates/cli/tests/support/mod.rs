//! What the client tests share: a stand-in coordinator served from an axum router, and a
//! client command (`tether watch`) run as a process whose output is read as it comes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest wait for a line of a [`Watcher`]'s output.
const LINE_WAIT: Duration = Duration::from_secs(90);

/// Serves `app` on a loopback port until the test ends; its base URL.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A `tether` client command with its stdout lines arriving on a channel and its stderr kept in
/// a file (killed when dropped).
pub struct Watcher {
    proc: tether_testkit::Killed,
    pub lines: mpsc::Receiver<String>,
    /// The stdout lines read so far.
    pub seen: Vec<String>,
    stderr: tempfile::NamedTempFile,
}

impl Watcher {
    /// Runs `tether` with `args`, without the log level, token or token file of the test's own
    /// environment.
    pub fn start(args: &[&str]) -> Self {
        let stderr = tempfile::NamedTempFile::new().expect("stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(args)
            .env_remove("TETHER_LOG")
            .env_remove("TETHER_TOKEN")
            .env_remove("TETHER_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().expect("stderr"))
            .spawn()
            .expect("start tether");
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watcher {
            proc: tether_testkit::Killed(child),
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits for a stdout line holding every one of `parts`.
    pub fn wait_line(&mut self, parts: &[&str]) -> String {
        let deadline = Instant::now() + LINE_WAIT;
        loop {
            if let Some(l) = self
                .seen
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "no line with {parts:?}; got {:?}; stderr: {}",
                    self.seen,
                    self.stderr_text()
                ),
            }
        }
    }

    /// Its exit status, once it has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.0.try_wait().expect("wait")
    }

    /// Its stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    /// Waits (for `within` at most) until its stderr holds `part`; all of it then.
    pub async fn wait_stderr(&self, part: &str, within: Duration) -> String {
        tether_testkit::wait_for(part, within, || async {
            let err = self.stderr_text();
            err.contains(part).then_some(err)
        })
        .await
    }
}
