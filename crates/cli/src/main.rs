//! `tether`: one binary with role subcommands. Thin: parse, configure, bind, call `run`.

mod arg_errors;
mod cert;
mod client;
mod coalesce;
mod demo;
mod e2e;
mod huge_pages;
mod logging;
mod output;
mod reload;
mod run;
mod settings;
mod signals;
mod size;
mod stress;
mod watch;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use arg_errors::{
    bounded, given_by_env, required_by_env, usage_error, with_env_named, with_requirers_named,
};
pub(crate) use arg_errors::{cut_value, one_value_a_key};
pub(crate) use signals::{cancel_on_signal, cancel_on_signals};

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
    /// List workers with their connection statistics; given a worker's id, that worker in
    /// detail.
    Workers {
        #[command(flatten)]
        common: client::CommonArgs,
        /// A worker's id: that worker in detail, with every connection statistic it last
        /// reported. Checked against the id rules before any request, as a task's id is.
        #[arg(value_name = "WORKER_ID")]
        id: Option<tether_proto::WorkerId>,
    },
    /// Cancel tasks (one or several ids, or a run's with `--name`; each answer printed in the
    /// order given, a refusal said and the others cancelled all the same).
    Cancel(client::ControlArgs),
    /// Pause tasks: a running one stops at its next pause point; a queued one is held. It stays
    /// paused, wherever it is, until resumed.
    Pause(client::ControlArgs),
    /// Resume paused tasks (a held one is queued again).
    Resume(client::ControlArgs),
    /// Ask a running task for a checkpoint now (an executor that checkpoints makes one at its
    /// next chance: a `command` task's changed checkpoint directory is shipped at once); with
    /// `--wait`, wait for it.
    Checkpoint(client::CheckpointArgs),
    /// Run ended tasks again: each submitted anew, as a new task, with the spec it had (the
    /// new ids printed, `NEW (retry of OLD)`); with `--watch`, follow them to their end. The
    /// coordinator records each as its task's one retry (`retried_by`): a task retried
    /// already is refused (retry its retry).
    Retry(client::RetryArgs),
    /// A run's verdict: its tasks (`--name`), each by its latest try, as a table, JSON or
    /// JUnit XML (`--junit FILE`) for a CI system; exit 0 only if every one completed.
    Report(client::ReportArgs),
    /// The newest runs (the tasks of one `--name`), each judged by its tasks' latest tries:
    /// running, passed or failed, with the latest tries by status.
    Runs(client::RunsArgs),
    /// Drain workers (one or several ids): no new task goes to them, and what they run goes on
    /// to its end; with `--wait`, wait until none holds any. A worker stays drained, across its
    /// restarts and the coordinator's, until undrained.
    Drain(client::DrainArgs),
    /// Put drained workers back: they take tasks again.
    Undrain(client::UndrainArgs),
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

impl Cli {
    /// What clap cannot check value by value but the command can before it does anything: a
    /// usage error (exit 2) with the subcommand's usage, as clap's own.
    fn checked(self) -> Result<Self, clap::Error> {
        let refused = match &self.cmd {
            Cmd::Submit(s) => s.check().err().map(|why| ("submit", why)),
            Cmd::Report(r) => r.check().err().map(|why| ("report", why)),
            Cmd::Worker(w) => w.check().err().map(|why| ("worker", why)),
            _ => None,
        };
        match refused {
            Some((name, why)) => Err(usage_error(name, why)),
            None => Ok(self),
        }
    }
}

fn main() -> std::process::ExitCode {
    // Parsed in two steps, so that the settings can ask clap where each value came from.
    let parsed = Cli::command().try_get_matches().and_then(|m| {
        let cli = Cli::from_arg_matches(&m).map_err(|e| e.format(&mut Cli::command()));
        settings::keep_matches(m);
        cli
    });
    let cli = match parsed.and_then(Cli::checked) {
        Ok(cli) => cli,
        Err(e) => {
            let argv: Vec<_> = std::env::args_os().collect();
            let set = |var: &std::ffi::OsStr| std::env::var_os(var).is_some();
            let given = given_by_env(&e, &argv, set);
            let requiring = required_by_env(&e, &argv, set, |cmd| cmd.try_get_matches_from(&argv));
            with_requirers_named(with_env_named(bounded(e), &given), &requiring).exit()
        }
    };
    // The client commands that read or steer the coordinator and print what they got.
    let client = matches!(
        &cli.cmd,
        Cmd::Cert(_)
            | Cmd::Tasks(_)
            | Cmd::Runs(_)
            | Cmd::Task(_)
            | Cmd::Workers { .. }
            | Cmd::Cancel(_)
            | Cmd::Pause(_)
            | Cmd::Resume(_)
            | Cmd::Checkpoint(_)
            | Cmd::Drain(_)
            | Cmd::Undrain(_)
    );
    // Commands whose output is all they do: a reader that has seen enough (`| head`) ends them
    // with success. The others (a run's verdict, a watch's outcome) end with failure then,
    // since the outcome they exist to report was not read.
    let output_only = client
        || matches!(&cli.cmd, Cmd::Submit(s) if !s.watch)
        || matches!(&cli.cmd, Cmd::Retry(r) if !r.watch)
        || matches!(&cli.cmd, Cmd::Proxy(p) if p.is_client());
    // Client commands print their own output and log only warnings; the demo prints its own
    // narrative and logs only errors. A level asked for (--log, TETHER_LOG) is what it says.
    let quiet = client
        || matches!(
            cli.cmd,
            Cmd::Submit(_) | Cmd::Retry(_) | Cmd::Watch(_) | Cmd::Report(_)
        );
    let level = match cli.log.as_deref().filter(|l| !l.is_empty()) {
        Some(asked) => asked,
        None if quiet => "warn",
        None if matches!(cli.cmd, Cmd::Demo(_) | Cmd::E2e(_) | Cmd::Stress(_)) => "error",
        None => "info",
    };
    logging::init(level);
    if matches!(&cli.cmd, Cmd::Coordinator(_))
        || matches!(&cli.cmd, Cmd::Proxy(p) if !p.is_client())
    {
        huge_pages::no_huge_pages();
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
            Cmd::Workers { common, id } => client::workers(common, id).await,
            Cmd::Cancel(a) => client::control(a, "cancel").await,
            Cmd::Pause(a) => client::control(a, "pause").await,
            Cmd::Resume(a) => client::control(a, "resume").await,
            Cmd::Checkpoint(a) => client::checkpoint(a).await,
            Cmd::Retry(a) => client::retry(a).await,
            Cmd::Report(a) => client::report(a).await,
            Cmd::Runs(a) => client::runs(a).await,
            Cmd::Drain(a) => client::drain(a).await,
            Cmd::Undrain(a) => client::undrain(a).await,
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
        // A setting's value the command line gave, refused once the settings were put together:
        // a usage error, as clap's refusal of a value (`settings::said`).
        Err(e) if e.is::<settings::Usage>() => {
            if let Some(u) = e.downcast_ref::<settings::Usage>() {
                let _ = usage_error(u.command, &u.why).print();
            }
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {}", output::describe(&e));
            match e.downcast_ref::<watch::Unfollowed>() {
                Some(_) => std::process::ExitCode::from(2),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}
