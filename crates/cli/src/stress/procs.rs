//! The child processes of a stress run: the coordinator (killed and restarted on the same port
//! and data directory when a scenario asks), the fleet of simulated workers, and the fault
//! proxies between them when the workers are cut off through one; plus what `/proc/<pid>`
//! says about their CPU and memory while they run, and what the kernel counted of their whole
//! lives once they exited.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command as Proc};
use tokio::sync::{mpsc, watch};

use super::fleet::{Command, Event, FleetReport, PREFIX, Status, worker_name};

/// How long a fault proxy's control API has to answer a call.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings handed to the coordinator process.
#[derive(Debug, Clone)]
pub struct CoordOpts {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub lost_after: Duration,
    /// The fleet secret workers must authenticate with.
    pub secret_file: Option<PathBuf>,
    /// Every frame carries an integrity tag.
    pub message_mac: bool,
    /// The coordinator serves TLS with these files.
    pub tls: Option<TlsFiles>,
    pub durability: tether_coordinator::store::Durability,
    /// `--idle-coalesce`, when given.
    pub idle_coalesce: Option<Duration>,
    /// `--no-compression`.
    pub no_compression: bool,
}

/// A coordinator certificate, its key, and the CA that signed it (`tether cert`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// CPU and memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Its niceness (-20..19).
    pub nice: i64,
}

/// Reads `/proc/<pid>/stat` (utime + stime, nice) and `/proc/<pid>/status` (VmRSS, VmHWM).
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces: state is field 3, so utime
    // (field 14) and stime (field 15) are at 11 and 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let nice: i64 = fields.get(16)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(Sample {
        cpu_s: ticks as f64 / hz,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        nice,
    })
}

/// [`sample`], or why `/proc` could not say.
fn read_sample(pid: u32) -> anyhow::Result<Sample> {
    sample(pid).with_context(|| format!("reading /proc/{pid}/stat and /proc/{pid}/status"))
}

/// What a process used over its whole life, its end included, as the kernel counts it once it
/// exited: `/proc` has no VmHWM after the exit, and a sample before it leaves out the
/// shutdown (the store's last commits, closing every session).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_s: f64,
    /// `ru_maxrss`: its peak resident set, KiB.
    pub peak_rss_kib: u64,
}

/// The [`Usage`] of the child `pid` if it has exited, read without reaping it: `waitid` with
/// `WNOWAIT` and the Linux system call's fifth argument, the child's rusage (its own and its
/// reaped children's; a coordinator starts none). The child stays waitable, for its `Child`'s
/// `wait` to reap as usual. `None` while it runs, and off Linux.
fn exited_usage(pid: u32) -> std::io::Result<Option<Usage>> {
    #[cfg(target_os = "linux")]
    {
        use nix::libc;
        // SAFETY: both are plain C structs, for which all bytes zero is a valid value.
        let (mut info, mut usage): (libc::siginfo_t, libc::rusage) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: the pointers are to live, writable values of the types the call fills in,
        // and it writes nothing else. WNOHANG: it does not block; WNOWAIT: it reaps nothing.
        let r = unsafe {
            libc::syscall(
                libc::SYS_waitid,
                libc::P_PID,
                libc::id_t::from(pid),
                &mut info as *mut libc::siginfo_t,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
                &mut usage as *mut libc::rusage,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: waitid set the field: the child's pid, or 0 when it has not exited yet.
        if unsafe { info.si_pid() } == 0 {
            return Ok(None);
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(Some(Usage {
            cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            peak_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        }))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        Ok(None)
    }
}

/// Waits until the child `pid` has exited, at most until `deadline`, and gives its [`Usage`]
/// (see [`exited_usage`]): `None` if it did not exit in time or none can be read.
async fn usage_at_exit(pid: u32, deadline: tokio::time::Instant) -> anyhow::Result<Option<Usage>> {
    loop {
        if let Some(u) = exited_usage(pid).with_context(|| format!("waitid on {pid}"))? {
            return Ok(Some(u));
        }
        if cfg!(not(target_os = "linux")) || tokio::time::Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How long a child killed (SIGKILL) for not exiting in time has to be gone.
const KILLED_WITHIN: Duration = Duration::from_secs(10);

/// How a child told to end ([`end`]) ended.
#[derive(Debug)]
struct Ended {
    /// Its [`Usage`] to its exit; `None` off Linux, or when it had already been reaped.
    usage: Option<Usage>,
    /// Its exit status; `None` when it had to be killed.
    status: Option<std::process::ExitStatus>,
}

/// Waits until `child`, told to end, has exited, at most until `deadline`, then SIGKILLs it:
/// either way its [`Usage`] to its exit is read from the kernel ([`usage_at_exit`]) before it
/// is reaped, and it is reaped, so no zombie stays behind.
async fn end(child: &mut Child, deadline: tokio::time::Instant) -> anyhow::Result<Ended> {
    let pid = child.id();
    let mut usage = match pid {
        Some(pid) => usage_at_exit(pid, deadline).await?,
        None => None,
    };
    if let Ok(status) = tokio::time::timeout_at(deadline, child.wait()).await {
        let status = status.context("waiting for a child process")?;
        return Ok(Ended {
            usage,
            status: Some(status),
        });
    }
    // It may have exited just as the deadline passed.
    if let Some(status) = child.try_wait().context("waiting for a child process")? {
        return Ok(Ended {
            usage,
            status: Some(status),
        });
    }
    child.start_kill().context("killing a child process")?;
    let soon = tokio::time::Instant::now() + KILLED_WITHIN;
    if let Some(pid) = pid {
        usage = usage_at_exit(pid, soon).await?;
    }
    tokio::time::timeout_at(soon, child.wait())
        .await
        .context("a child process killed did not end")?
        .context("waiting for a child process")?;
    Ok(Ended {
        usage,
        status: None,
    })
}

/// The coordinator as a child process.
pub struct Coordinator {
    exe: PathBuf,
    pub addr: std::net::SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    opts: CoordOpts,
    child: Option<Child>,
    /// CPU seconds of coordinator processes that already ended, each to its exit.
    cpu_before: f64,
    /// Highest peak RSS over all coordinator processes: VmHWM while one runs, its rusage's
    /// `ru_maxrss` once it exited (its shutdown included).
    pub peak_rss_kib: u64,
    /// When the running coordinator process was started (a restart sets it again).
    pub spawned_at: chrono::DateTime<chrono::Utc>,
}

impl Coordinator {
    pub async fn start(exe: &Path, dir: &Path, opts: CoordOpts) -> anyhow::Result<Self> {
        // A free port, reused by a restarted coordinator.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?;
        let mut c = Self {
            exe: exe.to_owned(),
            addr,
            data_dir: dir.join("data"),
            log: dir.join("coordinator.log"),
            opts,
            child: None,
            cpu_before: 0.0,
            peak_rss_kib: 0,
            spawned_at: chrono::Utc::now(),
        };
        c.spawn().await?;
        Ok(c)
    }

    pub fn url(&self) -> String {
        self.url_at(self.addr)
    }

    /// The coordinator's URL as reached through `addr` (a fault proxy in front of it).
    pub fn url_at(&self, addr: std::net::SocketAddr) -> String {
        let scheme = if self.opts.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{addr}")
    }

    /// A client of the coordinator's HTTP API.
    pub fn api(&self) -> anyhow::Result<crate::client::Api> {
        crate::client::Api::build(
            &self.url(),
            None,
            self.opts.tls.as_ref().map(|t| t.ca.as_path()),
        )
    }

    /// Sends `signal` to the running coordinator.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("the coordinator is not running")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("{signal} to the coordinator"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join(tether_coordinator::store::DB_FILE)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts the process and waits until it answers `/healthz`.
    pub async fn spawn(&mut self) -> anyhow::Result<()> {
        // Before the process: everything it records is stamped later.
        self.spawned_at = chrono::Utc::now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("opening the coordinator log")?;
        let d = |d: Duration| format!("{}ms", d.as_millis());
        let mut flags = Vec::new();
        if let Some(f) = &self.opts.secret_file {
            flags.push("--secret-file".into());
            flags.push(f.clone().into_os_string());
        }
        if self.opts.message_mac {
            flags.push("--message-mac".into());
        }
        flags.push("--durability".into());
        flags.push(self.opts.durability.as_str().into());
        if self.opts.no_compression {
            flags.push("--no-compression".into());
        }
        if let Some(w) = self.opts.idle_coalesce {
            flags.push("--idle-coalesce".into());
            flags.push(format!("{}us", w.as_micros()).into());
        }
        if let Some(t) = &self.opts.tls {
            flags.push("--tls-cert".into());
            flags.push(t.cert.clone().into_os_string());
            flags.push("--tls-key".into());
            flags.push(t.key.clone().into_os_string());
        }
        let mut cmd = Proc::new(&self.exe);
        crate::run::die_with_parent(&mut cmd);
        let child = cmd
            .arg("--log")
            .arg("warn")
            .arg("coordinator")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--heartbeat-interval")
            .arg(d(self.opts.heartbeat_interval))
            .arg("--heartbeat-timeout")
            .arg(d(self.opts.heartbeat_timeout))
            .arg("--lost-after")
            .arg(d(self.opts.lost_after))
            .args(flags)
            .env_remove("TETHER_CONFIG")
            // What the report says of it is what was passed.
            .env_remove("TETHER_IDLE_COALESCE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting the coordinator process")?;
        self.child = Some(child);
        let api = self.api()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if api.get("/healthz").await.is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "the coordinator exited at start ({status}); see {}",
                    self.log.display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the coordinator did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// CPU seconds over every coordinator process so far, and the current memory (none
    /// between a kill or stop and a restart). A running process whose `/proc` files cannot
    /// be read is an error: its figures would read 0, and targets "met".
    pub fn sample(&mut self) -> anyhow::Result<Sample> {
        let now = match self.pid() {
            Some(pid) => read_sample(pid)?,
            None => Sample::default(),
        };
        self.peak_rss_kib = self.peak_rss_kib.max(now.hwm_kib);
        Ok(Sample {
            cpu_s: self.cpu_before + now.cpu_s,
            ..now
        })
    }

    /// SIGKILL: nothing is flushed, nothing is said to the workers.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let ended = self.cpu_before;
        let sampled = self.sample()?;
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        c.start_kill().context("killing the coordinator")?;
        let end = end(&mut c, tokio::time::Instant::now() + STOP_WITHIN)
            .await
            .context("killing the coordinator")?;
        self.count_exit(ended, sampled, end.usage);
        Ok(())
    }

    /// SIGTERM and wait for a clean exit (the store is closed after it).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let ended = self.cpu_before;
        let sampled = self.sample()?;
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let end = end(&mut c, tokio::time::Instant::now() + STOP_WITHIN)
            .await
            .context("waiting for the coordinator")?;
        // Killed or not, what it used is counted.
        self.count_exit(ended, sampled, end.usage);
        match end.status {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!(
                "the coordinator exited with {status}; see {}",
                self.log.display()
            ),
            None => bail!("the coordinator did not stop within 30 s"),
        }
    }

    /// Adds a coordinator process, signalled to end, to the totals once it exited: its CPU
    /// and peak RSS to its exit, from the kernel (`usage`). `ended`: the CPU of the processes
    /// before it; `sampled`: the totals read just before the signal, which stand if the exit
    /// could not be read (off Linux).
    fn count_exit(&mut self, ended: f64, sampled: Sample, usage: Option<Usage>) {
        self.cpu_before = sampled.cpu_s;
        if let Some(u) = usage {
            self.cpu_before = ended + u.cpu_s;
            self.peak_rss_kib = self.peak_rss_kib.max(u.peak_rss_kib);
        }
    }
}

/// How long the coordinator has to exit once told to stop.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// The fleet as a child process, driven over its stdin and stdout.
pub struct Fleet {
    /// Its live workers, as the commands sent made them.
    pub roster: Roster,
    child: Child,
    stdin: ChildStdin,
    pub status: watch::Receiver<Status>,
    reports: mpsc::Receiver<FleetReport>,
    /// The fleet's last status, sent once every worker stopped.
    exited: tokio::sync::oneshot::Receiver<Status>,
    reader: tokio::task::JoinHandle<()>,
}

/// The ids of a fleet's live workers, oldest first, as the orchestrator's commands made them:
/// the fleet names the i-th worker it started [`worker_name`]`(`[`PREFIX`]`, i)`, and stops
/// only those a command names. So the orchestrator picks whom to stop without asking the
/// fleet for its 10,000 workers' records.
#[derive(Debug, Default)]
pub struct Roster {
    started: u64,
    live: VecDeque<String>,
}

impl Roster {
    /// Takes in a command sent to the fleet.
    fn sent(&mut self, cmd: &Command) {
        match cmd {
            Command::Start { count } => {
                let next = self.started + u64::from(*count);
                self.live
                    .extend((self.started..next).map(|i| worker_name(PREFIX, i)));
                self.started = next;
            }
            Command::Stop { ids, .. } => {
                let ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
                self.live.retain(|id| !ids.contains(id.as_str()));
            }
            Command::Report | Command::Exit => {}
        }
    }

    /// The live workers, oldest first.
    pub fn live(&self) -> impl Iterator<Item = &String> {
        self.live.iter()
    }

    /// The `k` oldest live workers not in `except`.
    pub fn oldest(&self, k: usize, except: &HashSet<String>) -> Vec<String> {
        self.live
            .iter()
            .filter(|id| !except.contains(*id))
            .take(k)
            .cloned()
            .collect()
    }
}

/// What [`Fleet::exit`] gives: the fleet's last status. What the coordinator counts of the
/// workers' results is read with it in hand, so after the workers stopped: a worker may still
/// reconnect while stopping to hand back a result not yet acknowledged.
///
/// And what the process used over its whole life, its stopping included, from the kernel once
/// it exited (`None` off Linux): a `/proc` sample before the exit leaves out the workers'
/// shutdown.
///
/// A fleet that did not exit in time is killed and still gives both (`killed_after` says
/// so), and so does one that exited with a failure or without its last status
/// (`exit_status`, `stopped`): the run reports it, with a failed verdict, rather than end
/// without a report.
#[derive(Debug)]
pub struct Exited {
    /// The last status: the one printed once every worker stopped when `stopped` holds,
    /// else the last one the process printed before it ended or was killed.
    pub status: Status,
    pub usage: Option<Usage>,
    /// How long it was given after the exit command when it did not exit within that and was
    /// killed (its usage is then to its kill); `None` when it exited by itself.
    pub killed_after: Option<Duration>,
    /// How it exited by itself (a failure: an exit code other than 0, or a signal); `None`
    /// when it was killed.
    pub exit_status: Option<std::process::ExitStatus>,
    /// Whether it printed its last status, the one after every worker stopped (or was
    /// aborted, 10 s on: [`Status::aborted`] counts those).
    pub stopped: bool,
}

impl Fleet {
    /// Starts `exe stress-fleet args`, through `nice -n nice` when `nice` is above 0.
    pub fn spawn(exe: &Path, log: &Path, args: &[String], nice: u8) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log).context("creating the fleet log")?;
        let mut cmd = match nice {
            0 => Proc::new(exe),
            n => {
                let mut c = Proc::new("nice");
                c.arg("-n").arg(n.to_string()).arg(exe);
                c
            }
        };
        crate::run::die_with_parent(&mut cmd);
        let mut child = cmd
            .arg("--log")
            .arg("error")
            .arg("stress-fleet")
            .args(args)
            .env_remove("TETHER_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting the fleet process")?;
        let stdin = child.stdin.take().context("fleet stdin")?;
        let stdout = child.stdout.take().context("fleet stdout")?;
        let (status_tx, status) = watch::channel(Status::default());
        let (report_tx, reports) = mpsc::channel(4);
        let (exited_tx, exited) = tokio::sync::oneshot::channel();
        let mut exited_tx = Some(exited_tx);
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Event>(&line) {
                    Ok(Event::Status(s)) => {
                        let _ = status_tx.send(s);
                    }
                    Ok(Event::Report(r)) => {
                        let _ = report_tx.send(r).await;
                    }
                    Ok(Event::Exited(s)) => {
                        let _ = status_tx.send(s.clone());
                        if let Some(tx) = exited_tx.take() {
                            let _ = tx.send(s);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable fleet output"),
                }
            }
        });
        Ok(Self {
            roster: Roster::default(),
            child,
            stdin,
            status,
            reports,
            exited,
            reader,
        })
    }

    pub async fn send(&mut self, cmd: &Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(cmd)?;
        line.push(b'\n');
        self.stdin
            .write_all(&line)
            .await
            .context("the fleet process is gone")?;
        self.stdin.flush().await?;
        self.roster.sent(cmd);
        Ok(())
    }

    /// CPU seconds the fleet process used so far.
    pub fn cpu_s(&self) -> anyhow::Result<f64> {
        Ok(self.sample()?.cpu_s)
    }

    /// What `/proc` says of the fleet process.
    pub fn sample(&self) -> anyhow::Result<Sample> {
        read_sample(self.child.id().context("the fleet process has exited")?)
    }

    pub fn now(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Waits for a fresh status satisfying `f`, at most `limit`.
    pub async fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        f: impl Fn(&Status) -> bool,
    ) -> anyhow::Result<Status> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            {
                let s = self.status.borrow_and_update();
                if f(&s) {
                    return Ok(s.clone());
                }
            }
            match tokio::time::timeout_at(deadline, self.status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("the fleet process ended while waiting until {what}"),
                Err(_) => bail!(
                    "timed out after {} s waiting until {what} (fleet: {:?})",
                    limit.as_secs(),
                    self.now()
                ),
            }
        }
    }

    pub async fn report(&mut self) -> anyhow::Result<FleetReport> {
        self.send(&Command::Report).await?;
        tokio::time::timeout(Duration::from_secs(60), self.reports.recv())
            .await
            .context("the fleet did not report within 60 s")?
            .context("the fleet process ended before reporting")
    }

    /// Stops every worker, waits for the process and gives its last status, the one it
    /// printed once its workers stopped.
    ///
    /// One that has not exited [`FLEET_EXIT_WITHIN`] after the exit command is killed and
    /// given back all the same, marked ([`Exited::killed_after`]): it stops its workers
    /// within 10 s and then aborts those left, so one still running by then holds a worker
    /// that did not stop. One that exited with a failure, or without printing its last
    /// status, is given back too, marked ([`Exited::exit_status`], [`Exited::stopped`]).
    /// An error only when the process could not be waited for.
    pub async fn exit(&mut self) -> anyhow::Result<Exited> {
        self.exit_within(FLEET_EXIT_WITHIN).await
    }

    /// [`Fleet::exit`], the process killed if it has not exited `within`.
    async fn exit_within(&mut self, within: Duration) -> anyhow::Result<Exited> {
        let _ = self.send(&Command::Exit).await;
        let end = end(&mut self.child, tokio::time::Instant::now() + within)
            .await
            .context("waiting for the fleet")?;
        let killed_after = end.status.is_none().then_some(within);
        // Its output is read to the end (the process is gone: it comes at once).
        let last = tokio::time::timeout(Duration::from_secs(5), &mut self.exited).await;
        self.reader.abort();
        let (status, stopped) = match last {
            Ok(Ok(status)) => (status, true),
            // Ended or killed before it printed its last status: the last it printed stands
            // in.
            _ => (self.now(), false),
        };
        Ok(Exited {
            status,
            usage: end.usage,
            killed_after,
            exit_status: end.status,
            stopped,
        })
    }
}

/// How long the fleet has to exit after the exit command before it is killed: its workers'
/// 10 s to stop, and its runtimes' to wind down, with room on a busy machine.
pub const FLEET_EXIT_WITHIN: Duration = Duration::from_secs(30);

/// A fault proxy between the workers and the coordinator, as a child process (`tether proxy`):
/// each holds two sockets a worker, so several share a large fleet within the open-file limit.
/// Driven through its control API.
pub struct FaultProxy {
    child: Child,
    /// Where the workers connect.
    pub listen: std::net::SocketAddr,
    control: String,
    http: reqwest::Client,
}

/// Name of the proxy inside each proxy process.
const PROXY_NAME: &str = "stress";

impl FaultProxy {
    /// Starts `exe proxy` in front of `upstream` on a free loopback port and reads the address
    /// it listens on and its control API's from the line it prints.
    pub async fn spawn(
        exe: &Path,
        log: &Path,
        upstream: std::net::SocketAddr,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log).context("creating the proxy log")?;
        let mut cmd = Proc::new(exe);
        crate::run::die_with_parent(&mut cmd);
        let mut child = cmd
            .args(["--log", "warn", "proxy", "--listen", "127.0.0.1:0"])
            .arg("--upstream")
            .arg(upstream.to_string())
            .args([
                "--name",
                PROXY_NAME,
                "--control",
                "127.0.0.1:0",
                "--seed",
                "0",
                "--json",
            ])
            .env_remove("TETHER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting a fault proxy process")?;
        let stdout = child.stdout.take().context("proxy stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the fault proxy did not start within 30 s")??
            .context("the fault proxy exited at start")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("fault proxy said {line:?}"))?;
        let control = v["control"]
            .as_str()
            .context("no control address in the fault proxy's line")?
            .to_owned();
        let listen = v["proxies"][0]["listen"]
            .as_str()
            .context("no listen address in the fault proxy's line")?
            .parse()?;
        Ok(Self {
            child,
            listen,
            control,
            // A control call that hangs is an error of the run, not minutes added to its cut.
            // The control API is on loopback: a proxy from HTTP_PROXY could not reach it.
            http: reqwest::Client::builder()
                .timeout(CONTROL_TIMEOUT)
                .no_proxy()
                .build()?,
        })
    }

    /// Sends one control request; an error answer is an error.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}/proxies/{PROXY_NAME}{path}", self.control);
        let resp = self
            .http
            .request(method.clone(), &url)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{method} {url}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or_default())
    }

    /// Takes the proxy down (`true`: listener closed, every link cut) or brings it up.
    pub async fn set_down(&self, down: bool) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::PATCH,
            "",
            serde_json::json!({ "enabled": !down }),
        )
        .await
        .map(drop)
    }

    /// Adds a fault (its JSON shape, `tether_faultproxy::Fault`).
    pub async fn add_fault(&self, fault: &tether_faultproxy::Fault) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            "/faults",
            serde_json::to_value(fault)?,
        )
        .await
        .map(drop)
    }

    /// Removes a fault; its counters, as the removal answers them (one request: a proxy short
    /// of descriptors may not accept a second connection for a while).
    pub async fn remove_fault(&self, name: &str) -> anyhow::Result<tether_faultproxy::FaultStats> {
        let path = format!("/faults/{name}");
        let info = self
            .call(reqwest::Method::DELETE, &path, serde_json::Value::Null)
            .await?;
        serde_json::from_value(info["stats"].clone()).context("the fault's counters")
    }

    /// SIGTERM, and what the process used over its whole life, to its exit: its CPU seconds
    /// and peak RSS from the kernel once it exited, its last links' closing included; a
    /// `/proc` sample, read just before the signal, off Linux. One that has not exited
    /// `within` is killed, counted all the same (`killed`), and reaped.
    pub async fn stop(&mut self, within: Duration) -> anyhow::Result<ProxyEnd> {
        let pid = self.child.id().context("the fault proxy has exited")?;
        let sampled = read_sample(pid)?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid)?),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = end(&mut self.child, tokio::time::Instant::now() + within)
            .await
            .context("stopping a fault proxy")?;
        Ok(ProxyEnd {
            usage: end.usage.unwrap_or(Usage {
                cpu_s: sampled.cpu_s,
                peak_rss_kib: sampled.hwm_kib,
            }),
            killed: end.status.is_none(),
        })
    }
}

/// What [`FaultProxy::stop`] gives.
#[derive(Debug, Clone, Copy)]
pub struct ProxyEnd {
    pub usage: Usage,
    /// It did not exit in time after the SIGTERM and was killed.
    pub killed: bool,
}

/// How long a fault proxy has to exit once told to stop.
pub const PROXY_STOP_WITHIN: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::fleet::Event;

    /// The roster names the workers as the fleet does, in the order it starts them, and
    /// forgets only those a stop named, whichever they were: the orchestrator stops the
    /// drained ones by name after others left.
    #[test]
    fn the_roster_follows_the_fleets_starts_and_the_stops_that_name_workers() {
        let mut r = Roster::default();
        r.sent(&Command::Start { count: 3 });
        assert_eq!(r.oldest(2, &HashSet::new()), ["sim-0", "sim-1"]);
        let drained: HashSet<String> = ["sim-0".to_owned()].into();
        assert_eq!(r.oldest(2, &drained), ["sim-1", "sim-2"]);
        r.sent(&Command::Stop {
            ids: vec!["sim-1".into(), "sim-9".into()],
            abrupt: true,
        });
        r.sent(&Command::Start { count: 2 });
        r.sent(&Command::Report);
        let live: Vec<&String> = r.live().collect();
        assert_eq!(live, ["sim-0", "sim-2", "sim-3", "sim-4"]);
        assert_eq!(r.oldest(9, &drained), ["sim-2", "sim-3", "sim-4"]);
    }

    /// A fleet process played by a shell script: it prints `status`, reads the exit command,
    /// then prints what `on_exit` holds (lines of JSON) and ends.
    fn scripted_fleet(dir: &Path, status: &Status, on_exit: &[Event]) -> Fleet {
        scripted_fleet_then(dir, status, on_exit, "")
    }

    /// Waits (at most 10 s) for the fleet's first status, of `completed` tasks.
    async fn first_status(fleet: &mut Fleet, completed: u64) {
        fleet
            .wait("the first status", Duration::from_secs(10), |s| {
                s.completed == completed
            })
            .await
            .expect("status");
    }

    /// The report of a run that ended with `exited`, with `sampled_cpu_s` as the fleet's CPU
    /// where the kernel's count is missing.
    fn report_of(exited: &Exited, sampled_cpu_s: f64) -> crate::stress::report::Report {
        let mut r = crate::stress::report::Report::default();
        crate::stress::scenarios::fleet_end(&mut r, exited, sampled_cpu_s);
        r
    }

    /// The report of a run (its losses none) whose fleet, `exited`, failed to end as told
    /// before it printed its last status: it fails, says so, and carries the fleet's `usage`;
    /// its text and its JSON.
    fn failed_before_its_last_status(
        exited: &Exited,
        usage: &Usage,
    ) -> (String, serde_json::Value) {
        let mut r = crate::stress::report::Report::default();
        r.verdict("lost", true, "0");
        crate::stress::scenarios::fleet_end(&mut r, exited, 99.0);
        assert!(!r.passed());
        let text = r.markdown();
        assert!(text.contains("it never printed its last status"), "{text}");
        assert!(text.contains("| fleet peak RSS, MiB |"), "{text}");
        let json = serde_json::to_value(&r).expect("JSON");
        assert_eq!(json["fleet_cpu_s"], usage.cpu_s);
        assert_eq!(json["fleet_peak_rss_kib"], usage.peak_rss_kib);
        (text, json)
    }

    /// [`scripted_fleet`], which then runs `then` (shell) before it ends.
    fn scripted_fleet_then(dir: &Path, status: &Status, on_exit: &[Event], then: &str) -> Fleet {
        let line = |e: &Event| serde_json::to_string(e).expect("JSON");
        let mut script = format!(
            "#!/bin/sh\necho '{}'\nread cmd\n",
            line(&Event::Status(status.clone()))
        );
        for e in on_exit {
            script.push_str(&format!("echo '{}'\n", line(e)));
        }
        script.push_str(then);
        script.push('\n');
        let exe = dir.join("fleet.sh");
        std::fs::write(&exe, script).expect("script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // A process another test thread forks while the script is open for writing holds it
        // open until it execs: the script is then "busy" (ETXTBSY) for a moment.
        for _ in 0..50 {
            match Fleet::spawn(&exe, &dir.join("fleet.log"), &[], 0) {
                Ok(fleet) => return fleet,
                Err(e) if format!("{e:#}").contains("busy") => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("spawn: {e:#}"),
            }
        }
        panic!("the script stayed busy for a second")
    }

    /// Shell that counts to 100,000 (CPU) and reads 32 MB into a variable (a peak RSS far
    /// above the one or two MB a shell runs at).
    const HEAVY_END: &str = r#"i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; x=$(head -c 32000000 /dev/zero | tr "\000" a)"#;

    /// A shell child running `trap`, then `script`, once it set its trap: it says so on its
    /// output, which is read before it is given back.
    async fn shell(trap: &str, script: &str) -> Child {
        let mut child = Proc::new("sh")
            .args(["-c", &format!("{trap}; echo trapped; {script}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("sh");
        let out = child.stdout.take().expect("stdout");
        let line = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::BufReader::new(out).lines().next_line(),
        )
        .await
        .expect("the shell set its trap within 10 s")
        .expect("read");
        assert_eq!(line.as_deref(), Some("trapped"));
        child
    }

    /// A process idle until SIGTERM, then, in its shutdown, [`HEAVY_END`] before it exits.
    async fn heavy_on_sigterm() -> Child {
        shell(
            &format!("trap '{HEAVY_END}; exit 0' TERM"),
            "while :; do sleep 0.02; done",
        )
        .await
    }

    /// A coordinator played by a shell: idle until SIGTERM, then, in its shutdown, it counts to
    /// 100,000 (CPU) and reads 32 MB into a variable before it exits.
    async fn shutdown_heavy(dir: &Path) -> Coordinator {
        let child = heavy_on_sigterm().await;
        Coordinator {
            exe: PathBuf::from("sh"),
            addr: "127.0.0.1:1".parse().expect("addr"),
            data_dir: dir.join("data"),
            log: dir.join("coordinator.log"),
            opts: CoordOpts {
                heartbeat_interval: Duration::from_secs(1),
                heartbeat_timeout: Duration::from_secs(3),
                lost_after: Duration::from_secs(1),
                secret_file: None,
                message_mac: false,
                tls: None,
                durability: tether_coordinator::store::Durability::Process,
                idle_coalesce: None,
                no_compression: false,
            },
            child: Some(child),
            cpu_before: 0.5,
            peak_rss_kib: 0,
            spawned_at: chrono::Utc::now(),
        }
    }

    /// The coordinator's CPU seconds and peak RSS are its whole life's, shutdown included: read
    /// from the kernel once it exited, not from `/proc` before the SIGTERM (which left out
    /// what its shutdown did, and a VmHWM `/proc` no longer has after the exit).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_coordinators_cpu_and_peak_rss_take_in_its_shutdown() {
        let dir = tempfile::tempdir().expect("dir");
        let mut c = shutdown_heavy(dir.path()).await;
        // Running: `/proc` has it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = c.sample().expect("running");
        assert!(before.hwm_kib < 16_000, "{before:?}");
        c.stop().await.expect("a clean exit");
        assert_eq!(c.pid(), None);
        let after = c.sample().expect("stopped");
        // The 0.5 s of the processes before it, then its own, shutdown included.
        assert!(
            after.cpu_s >= before.cpu_s + 0.02,
            "{} s before the SIGTERM, {} s in all",
            before.cpu_s,
            after.cpu_s
        );
        assert!(c.peak_rss_kib >= 31_000, "{} KiB", c.peak_rss_kib);
        // A kill, too: its CPU and peak to its end are counted, and it is reaped.
        let mut k = shutdown_heavy(dir.path()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        k.kill().await.expect("killed");
        assert_eq!(k.pid(), None);
        assert!(k.sample().expect("killed").cpu_s >= 0.5);
        assert!(k.peak_rss_kib > 0);
    }

    /// A fault proxy played by `child`, a shell.
    fn scripted_proxy(child: Child) -> FaultProxy {
        FaultProxy {
            child,
            listen: "127.0.0.1:1".parse().expect("addr"),
            control: "http://127.0.0.1:1".to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Whether `pid` is no child of this process any more: reaped, not a zombie.
    fn reaped(pid: u32) -> bool {
        matches!(exited_usage(pid), Err(e) if e.raw_os_error() == Some(nix::libc::ECHILD))
    }

    /// The fleet's CPU seconds and peak RSS are its whole life's, its stopping included: the
    /// kernel's once it exited, not a `/proc` sample before the exit command (which left out
    /// the workers' shutdown).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_fleets_cpu_and_peak_rss_take_in_its_stopping() {
        let dir = tempfile::tempdir().expect("dir");
        let running = Status {
            completed: 1,
            ..Status::default()
        };
        let last = [Event::Exited(running.clone())];
        // Its last status printed, it still works and grows before it ends.
        let mut fleet = scripted_fleet_then(dir.path(), &running, &last, HEAVY_END);
        first_status(&mut fleet, 1).await;
        let before = fleet.sample().expect("running");
        assert!(before.hwm_kib < 16_000, "{before:?}");
        let pid = fleet.child.id().expect("pid");
        let exited = fleet.exit().await.expect("exit");
        assert_eq!(exited.killed_after, None);
        assert!(exited.stopped);
        let r = report_of(&exited, 0.0);
        assert!(r.passed(), "{:?}", r.verdicts);
        assert_eq!(r.fleet_workers_aborted, Some(0));
        let usage = exited.usage.expect("the kernel's count");
        assert!(
            usage.cpu_s >= before.cpu_s + 0.02,
            "{} s before the exit command, {} s in all",
            before.cpu_s,
            usage.cpu_s
        );
        assert!(usage.peak_rss_kib >= 31_000, "{usage:?}");
        assert!(reaped(pid));
    }

    /// A fleet that does not exit in time is killed and reaped, and given back all the same:
    /// its usage to its kill, the kill marked, and the last status it printed. The run's
    /// report then carries its CPU and peak RSS and a failed verdict on its exit (the run
    /// used to end in an error, its figures read and dropped).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_fleet_that_does_not_exit_in_time_is_killed_reaped_and_reported_failed() {
        let dir = tempfile::tempdir().expect("dir");
        let running = Status {
            completed: 3,
            ..Status::default()
        };
        // Deaf to SIGTERM and never ending once told to exit.
        let forever = "trap '' TERM; while :; do sleep 0.02; done";
        let mut fleet = scripted_fleet_then(dir.path(), &running, &[], forever);
        first_status(&mut fleet, 3).await;
        let pid = fleet.child.id().expect("pid");
        let within = Duration::from_millis(200);
        let exited = fleet.exit_within(within).await.expect("killed, given back");
        assert!(reaped(pid));
        assert_eq!(exited.killed_after, Some(within));
        assert!(!exited.stopped);
        assert_eq!(exited.status.completed, 3, "{:?}", exited.status);
        let usage = exited.usage.expect("the kernel's count to its kill");
        assert!(usage.peak_rss_kib > 0, "{usage:?}");

        let (text, _) = failed_before_its_last_status(&exited, &usage);
        assert!(
            text.contains(
                "- FAIL the fleet stopped when told: the fleet process did not exit within 0.2 s \
                 of the exit command and was killed"
            ),
            "{text}"
        );

        // One that printed its last status, its workers stopped, and then hung: its counts are
        // that status, and it fails all the same.
        let stopped = Status {
            completed: 4,
            ..Status::default()
        };
        let last = [Event::Exited(stopped)];
        let mut fleet = scripted_fleet_then(dir.path(), &running, &last, forever);
        let exited = fleet.exit_within(within).await.expect("killed, given back");
        assert_eq!(exited.killed_after, Some(within));
        assert!(exited.stopped);
        assert_eq!(exited.status.completed, 4, "{:?}", exited.status);
        let r = report_of(&exited, 0.0);
        assert!(!r.passed());
        assert!(
            r.verdicts[0].detail.contains("printed its last status"),
            "{:?}",
            r.verdicts
        );
    }

    /// A fleet that ends with a failure after the exit command (an exit code, a signal) is
    /// reaped and given back with its usage to its end and the last status it printed; the
    /// run's report carries its CPU and peak RSS and fails "the fleet stopped when told",
    /// saying how it ended, and, when it never printed its last status, "every worker stopped
    /// when told", the count of workers aborted missing (the run used to end in an error with
    /// no report).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_fleet_that_exits_with_a_failure_is_reported_failed_with_its_usage() {
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().expect("dir");
        let running = Status {
            completed: 3,
            ..Status::default()
        };
        let mut fleet = scripted_fleet_then(dir.path(), &running, &[], "exit 3");
        first_status(&mut fleet, 3).await;
        let pid = fleet.child.id().expect("pid");
        let exited = fleet.exit().await.expect("ended, given back");
        assert!(reaped(pid));
        assert_eq!(exited.killed_after, None);
        assert_eq!(exited.exit_status.and_then(|s| s.code()), Some(3));
        assert!(!exited.stopped);
        assert_eq!(exited.status.completed, 3, "{:?}", exited.status);
        let usage = exited.usage.expect("the kernel's count to its end");
        assert!(usage.peak_rss_kib > 0, "{usage:?}");

        let (text, json) = failed_before_its_last_status(&exited, &usage);
        assert!(
            text.contains(
                "- FAIL the fleet stopped when told: the fleet process ended with exit status: 3 \
                 after the exit command"
            ),
            "{text}"
        );
        assert!(
            text.contains("- FAIL every worker stopped when told: unknown"),
            "{text}"
        );
        assert!(json["fleet_workers_aborted"].is_null(), "missing, not 0");

        // Killed by a signal of its own after its last status: how it ended is said, and its
        // workers' count stands.
        let stopped = Status {
            completed: 4,
            ..Status::default()
        };
        let last = [Event::Exited(stopped)];
        let mut fleet = scripted_fleet_then(dir.path(), &running, &last, "kill -KILL $$");
        let exited = fleet.exit().await.expect("ended, given back");
        assert_eq!(exited.killed_after, None);
        assert_eq!(exited.exit_status.and_then(|s| s.signal()), Some(9));
        assert!(exited.stopped);
        assert_eq!(exited.status.completed, 4, "{:?}", exited.status);
        assert!(exited.usage.is_some());
        let r = report_of(&exited, 0.0);
        assert!(!r.passed());
        let said = &r.verdicts[0];
        assert!(!said.pass);
        assert!(said.detail.contains("ended with signal: 9"), "{said:?}");
        assert!(
            said.detail.contains("it printed its last status first"),
            "{said:?}"
        );
        assert_eq!(r.fleet_workers_aborted, Some(0));
    }

    /// A fleet that exits cleanly but never printed its last status is given back with its
    /// usage and the last status it printed, and fails "the fleet stopped when told" with
    /// "no last status" (the run used to end in an error with no report).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_fleet_that_exits_without_its_last_status_is_reported_failed_with_its_usage() {
        let dir = tempfile::tempdir().expect("dir");
        let running = Status {
            completed: 2,
            resets: 7,
            ..Status::default()
        };
        let mut fleet = scripted_fleet(dir.path(), &running, &[]);
        first_status(&mut fleet, 2).await;
        let exited = fleet.exit().await.expect("exited, given back");
        assert_eq!(exited.killed_after, None);
        assert!(exited.exit_status.is_some_and(|s| s.success()));
        assert!(!exited.stopped);
        assert_eq!(exited.status.completed, 2, "{:?}", exited.status);
        let usage = exited.usage.expect("the kernel's count to its exit");
        let r = report_of(&exited, 99.0);
        assert!(!r.passed());
        let text = r.markdown();
        assert!(
            text.contains(
                "- FAIL the fleet stopped when told: the fleet process exited cleanly but with \
                 no last status"
            ),
            "{text}"
        );
        assert!(
            text.contains("- FAIL every worker stopped when told: unknown"),
            "{text}"
        );
        assert_eq!(r.fleet_cpu_s, usage.cpu_s);
        assert_eq!(r.fleet_peak_rss_kib, Some(usage.peak_rss_kib));
        assert_eq!(r.fleet_workers_aborted, None);
    }

    /// The workers the fleet aborted at its exit, as its last status counts them, fail "every
    /// worker stopped when told" and are shown in the report, though the process itself
    /// exited as told.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn workers_the_fleet_aborted_at_its_exit_fail_a_verdict_and_are_shown() {
        let dir = tempfile::tempdir().expect("dir");
        let last = [Event::Exited(Status {
            started: 5,
            aborted: 2,
            ..Status::default()
        })];
        let mut fleet = scripted_fleet(dir.path(), &Status::default(), &last);
        let exited = fleet.exit().await.expect("exit");
        assert!(exited.stopped);
        assert_eq!(exited.status.aborted, 2);
        let r = report_of(&exited, 0.0);
        assert!(!r.passed());
        let text = r.markdown();
        assert!(
            text.contains("- PASS the fleet stopped when told"),
            "{text}"
        );
        assert!(
            text.contains(
                "- FAIL every worker stopped when told: 2 of 5 workers did not stop within 10 s \
                 of the exit command and were aborted"
            ),
            "{text}"
        );
        assert!(
            text.contains("| workers the fleet aborted at its exit | 2 |"),
            "{text}"
        );
        let json = serde_json::to_value(&r).expect("JSON");
        assert_eq!(json["fleet_workers_aborted"], 2);
    }

    /// A fault proxy's CPU seconds and peak RSS are its whole life's, to its exit after the
    /// SIGTERM: the kernel's, not a `/proc` sample before the stop (which left out its last
    /// seconds). One that does not exit in time is killed, counted to its kill, and reaped.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_fault_proxys_cpu_and_peak_rss_take_in_its_last_seconds() {
        let mut p = scripted_proxy(heavy_on_sigterm().await);
        let pid = p.child.id().expect("pid");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = read_sample(pid).expect("running");
        assert!(before.hwm_kib < 16_000, "{before:?}");
        let end = p.stop(Duration::from_secs(30)).await.expect("stopped");
        assert!(!end.killed);
        assert!(
            end.usage.cpu_s >= before.cpu_s + 0.02,
            "{} s before the SIGTERM, {} s in all",
            before.cpu_s,
            end.usage.cpu_s
        );
        assert!(end.usage.peak_rss_kib >= 31_000, "{:?}", end.usage);
        assert!(reaped(pid));

        // Deaf to SIGTERM and spinning: killed after the time given, its CPU to then counted.
        let mut deaf = scripted_proxy(shell("trap '' TERM", "while :; do :; done").await);
        let pid = deaf.child.id().expect("pid");
        let before = read_sample(pid).expect("running");
        let end = deaf.stop(Duration::from_millis(200)).await.expect("killed");
        assert!(end.killed);
        assert!(end.usage.cpu_s > before.cpu_s, "{before:?} {end:?}");
        assert!(end.usage.peak_rss_kib > 0, "{end:?}");
        assert!(reaped(pid));
    }

    /// The usage of a child is read without reaping it: its `wait` still gets its status.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_childs_usage_at_exit_leaves_it_to_be_reaped() {
        let mut child = Proc::new("sh")
            .args(["-c", "exit 3"])
            .kill_on_drop(true)
            .spawn()
            .expect("sh");
        let pid = child.id().expect("pid");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let usage = usage_at_exit(pid, deadline).await.expect("waitid");
        assert!(usage.is_some_and(|u| u.peak_rss_kib > 0), "{usage:?}");
        let status = child.wait().await.expect("reaped");
        assert_eq!(status.code(), Some(3));
        // One still running: nothing, within the deadline.
        let mut running = Proc::new("sleep")
            .arg("5")
            .kill_on_drop(true)
            .spawn()
            .expect("sleep");
        let soon = tokio::time::Instant::now() + Duration::from_millis(50);
        let pid = running.id().expect("pid");
        assert_eq!(usage_at_exit(pid, soon).await.expect("waitid"), None);
        running.kill().await.expect("killed");
    }

    /// The counts a run ends on are the fleet's last, printed once its workers stopped, not
    /// the status before the exit: a worker stopping may still hand back a result.
    #[tokio::test]
    async fn a_fleet_exit_gives_the_status_printed_after_its_workers_stopped() {
        let dir = tempfile::tempdir().expect("dir");
        let running = Status {
            completed: 1,
            ..Status::default()
        };
        let stopped = Status {
            completed: 2,
            ..Status::default()
        };
        let last = [
            Event::Status(running.clone()),
            Event::Exited(stopped.clone()),
        ];
        let mut fleet = scripted_fleet(dir.path(), &running, &last);
        first_status(&mut fleet, 1).await;
        let exited = fleet.exit().await.expect("exit");
        assert_eq!(exited.status.completed, 2, "{:?}", exited.status);
        assert!(exited.stopped);
        // A fleet that ends without its last status (it crashed while stopping) is marked so,
        // its count not taken for the last, and fails its verdict (it used to be an error
        // that ended the run with no report).
        let mut fleet = scripted_fleet(dir.path(), &running, &[Event::Status(stopped)]);
        let exited = fleet.exit().await.expect("given back");
        assert!(!exited.stopped);
        let r = report_of(&exited, 0.0);
        assert!(!r.passed());
        assert!(
            r.verdicts[0].detail.contains("no last status"),
            "{:?}",
            r.verdicts
        );
    }
}
