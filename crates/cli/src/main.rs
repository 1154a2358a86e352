//! `tether`: one binary with role subcommands. Thin: parse, configure, bind, call `run`.

mod cert;
mod client;
mod coalesce;
mod demo;
mod e2e;
mod output;
mod run;
mod settings;
mod stress;
mod watch;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: the coordinator allocates per message, and under
/// load glibc's malloc spent about a tenth of its CPU consolidating and unlinking chunks
/// (see docs/PERFORMANCE.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Distributed test and benchmark runs that survive bad networks"
)]
struct Cli {
    /// Log filter (e.g. info, debug, tether_worker=debug). Default: info; warn for the client
    /// commands (they print their own output), error for demo, e2e and stress (their own
    /// narrative).
    #[arg(long, global = true, env = "TETHER_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator.
    Coordinator(run::CoordinatorArgs),
    /// Run a worker agent.
    Worker(run::WorkerArgs),
    /// Submit a task: a command line after `--`, or a JSON file of specs.
    Submit(client::SubmitArgs),
    /// List tasks.
    Tasks(client::TasksArgs),
    /// Show one task with its attempts and results.
    Task(client::TaskArgs),
    /// Follow tasks as they change, until each named one has ended (exit 0 only if all
    /// completed, 1 if one ended otherwise, 2 if the watch could not follow them to their end),
    /// or every task until interrupted; survives a restart of the coordinator.
    Watch(watch::WatchArgs),
    /// List workers with their connection statistics.
    Workers(client::CommonArgs),
    /// Cancel a task.
    Cancel(client::ControlArgs),
    /// Pause a task: a running one stops at its next pause point; a queued one is held. It stays
    /// paused, wherever it is, until resumed.
    Pause(client::ControlArgs),
    /// Resume a paused task (a held one is queued again).
    Resume(client::ControlArgs),
    /// Ask a running task for a checkpoint now (an executor that checkpoints makes one at its
    /// next chance).
    Checkpoint(client::ControlArgs),
    /// A self-contained demonstration: a coordinator, workers, tasks and network faults.
    Demo(demo::DemoArgs),
    /// An end-to-end run: coordinator and worker processes, network faults and crashes on a
    /// seeded schedule, a verdict from ground truth and a report.
    E2e(e2e::E2eArgs),
    /// Write a private CA, a coordinator certificate signed by it and a fleet secret: the files
    /// of a TLS + authentication setup.
    Cert(cert::CertArgs),
    /// A TCP fault-injecting proxy and its control commands.
    Proxy(tether_faultproxy::cli::ProxyArgs),
    /// Load scenarios against a coordinator process, with simulated workers in another.
    Stress(stress::StressArgs),
    /// The simulated workers of `tether stress` (driven over stdin and stdout).
    #[command(hide = true)]
    StressFleet(stress::FleetArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The client commands that read or steer the coordinator and print what they got.
    let client = matches!(
        &cli.cmd,
        Cmd::Cert(_)
            | Cmd::Tasks(_)
            | Cmd::Task(_)
            | Cmd::Workers(_)
            | Cmd::Cancel(_)
            | Cmd::Pause(_)
            | Cmd::Resume(_)
            | Cmd::Checkpoint(_)
    );
    // Commands whose output is all they do: a reader that has seen enough (`| head`) ends them
    // with success. The others (a run's verdict, a watch's outcome) end with failure then,
    // since the outcome they exist to report was not read.
    let output_only = client
        || matches!(&cli.cmd, Cmd::Submit(s) if !s.watch)
        || matches!(&cli.cmd, Cmd::Proxy(p) if p.is_client());
    // Client commands print their own output and log only warnings; the demo prints its own
    // narrative and logs only errors. A level asked for (--log, TETHER_LOG) is what it says.
    let quiet = client || matches!(cli.cmd, Cmd::Submit(_) | Cmd::Watch(_));
    let level = match cli.log.as_deref().filter(|l| !l.is_empty()) {
        Some(asked) => asked,
        None if quiet => "warn",
        None if matches!(cli.cmd, Cmd::Demo(_) | Cmd::E2e(_) | Cmd::Stress(_)) => "error",
        None => "info",
    };
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
    if matches!(&cli.cmd, Cmd::Coordinator(_))
        || matches!(&cli.cmd, Cmd::Proxy(p) if !p.is_client())
    {
        no_huge_pages();
    }
    let mut builder = match &cli.cmd {
        Cmd::Proxy(p) if !p.is_client() && p.run.threads == 1 => {
            tokio::runtime::Builder::new_current_thread()
        }
        Cmd::Proxy(p) if !p.is_client() && p.run.threads > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(p.run.threads.into());
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder
        .on_thread_park(coalesce::before_park)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Coordinator(a) => run::coordinator(a).await,
            Cmd::Worker(a) => run::worker(a).await,
            Cmd::Submit(a) => client::submit(a).await,
            Cmd::Tasks(a) => client::tasks(a).await,
            Cmd::Task(a) => client::task(a).await,
            Cmd::Watch(a) => watch::run(a).await,
            Cmd::Workers(a) => client::workers(a).await,
            Cmd::Cancel(a) => client::control(a, "cancel").await,
            Cmd::Pause(a) => client::control(a, "pause").await,
            Cmd::Resume(a) => client::control(a, "resume").await,
            Cmd::Checkpoint(a) => client::control(a, "checkpoint").await,
            Cmd::Demo(a) => demo::run(a).await,
            Cmd::E2e(a) => e2e::run(a).await,
            Cmd::Cert(a) => cert::run(a).await,
            Cmd::Proxy(a) => tether_faultproxy::cli::run_cli(a).await,
            Cmd::Stress(a) => stress::run(a).await,
            Cmd::StressFleet(a) => stress::fleet(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of the output has seen enough (`tether tasks | head`).
        Err(e) if output_only && output::is_closed(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", output::describe(&e));
            match e.downcast_ref::<watch::Unfollowed>() {
                Some(_) => std::process::ExitCode::from(2),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

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

/// The coordinator's memory in 4 KiB pages only. The allocator asks the kernel for
/// transparent huge pages; each first touch of one zeroes 2 MiB on the thread that touched it,
/// and under a message flood these came in bursts of 35-40 ms on a runtime thread (`perf`:
/// `clear_page_erms` half the coordinator's samples during each stall of every probe); without
/// them its peak resident memory under the flood was 74-76 MB instead of 99-121
/// (docs/PERFORMANCE.md, thirty-first round). A fault proxy, which makes thousands of links
/// at once in a thundering herd, runs without them too: their zeroing took 5.8 % of its CPU
/// there, and without them the proxies used 16-25 % less (thirty-second round).
///
/// Says so at info, as read back from the kernel: kernels before 6.0 do not show the flag in
/// `/proc/<pid>/status`, and the tests read this line there instead.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    match nix::sys::prctl::set_thp_disable(true).and_then(|()| nix::sys::prctl::get_thp_disable()) {
        Ok(true) => tracing::info!("transparent huge pages off for this process"),
        Ok(false) => tracing::info!("transparent huge pages stay allowed: the kernel kept them on"),
        Err(error) => tracing::info!(%error, "transparent huge pages stay allowed"),
    }
}
