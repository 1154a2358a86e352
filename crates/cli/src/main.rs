//! `tether`: one binary with role subcommands. Thin: parse, configure, bind, call `run`.

mod cert;
mod client;
mod coalesce;
mod demo;
mod e2e;
mod output;
mod run;
mod settings;
mod size;
mod stress;
mod watch;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Cancel a task.
    Cancel(client::ControlArgs),
    /// Pause a task: a running one stops at its next pause point; a queued one is held. It stays
    /// paused, wherever it is, until resumed.
    Pause(client::ControlArgs),
    /// Resume a paused task (a held one is queued again).
    Resume(client::ControlArgs),
    /// Ask a running task for a checkpoint now (an executor that checkpoints makes one at its
    /// next chance: a `command` task's changed checkpoint directory is shipped at once); with
    /// `--wait`, wait for it.
    Checkpoint(client::CheckpointArgs),
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
            Cmd::Worker(w) => w.check().err().map(|why| ("worker", why)),
            _ => None,
        };
        match refused {
            Some((name, why)) => Err(usage_error(name, why)),
            None => Ok(self),
        }
    }
}

/// A usage error of the subcommand `name` (exit 2), said with its usage as clap's own.
fn usage_error(name: &str, why: impl std::fmt::Display) -> clap::Error {
    let mut cmd = Cli::command();
    cmd.build();
    let error = clap::error::ErrorKind::ValueValidation;
    match cmd.find_subcommand_mut(name) {
        Some(sub) => sub.error(error, why),
        None => cmd.error(error, why),
    }
}

/// Characters of a value an error quotes: a rejected argument may be megabytes (a name, a
/// file read into an argument), and was echoed whole.
const VALUE_SHOWN: usize = 64;

/// `value` as an error quotes it: whole up to [`VALUE_SHOWN`] characters, else that many and
/// how long it was (`nnnn… (1025 characters)`).
pub(crate) fn cut_value(value: &str) -> std::borrow::Cow<'_, str> {
    match value.char_indices().nth(VALUE_SHOWN) {
        Some((at, _)) => {
            let chars = value.chars().count();
            format!("{}… ({chars} characters)", &value[..at]).into()
        }
        None => value.into(),
    }
}

/// The first key of `pairs` (a repeatable `KEY=VALUE` flag, in the order given) given again
/// with another value, said naming `flag`, the key and both values, each quoted cut by
/// [`cut_value`] (a value may be long, or a secret an `--env` passes), then `why`: a map keeps
/// one value a key, and the last was kept in silence. The same `KEY=VALUE` again is the same
/// pair, taken once.
pub(crate) fn one_value_a_key(
    flag: &str,
    pairs: &[(String, String)],
    why: &str,
) -> Result<(), String> {
    let mut taken = std::collections::HashMap::<&str, &str>::new();
    for (key, value) in pairs {
        match taken.insert(key, value) {
            Some(first) if first != value => {
                return Err(format!(
                    "{flag} {:?} given twice with different values, {:?} and {:?}: {why}",
                    cut_value(key),
                    cut_value(first),
                    cut_value(value)
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Characters of a value parser's own words an error shows: more than any of them says, unless
/// it quotes the value.
const REASON_SHOWN: usize = 512;

/// `e` with every value it quotes (the rejected value, an unknown argument or subcommand)
/// cut by [`cut_value`]: clap quotes them whole. A value parser's own words that quote the
/// value again (`name "…"`, which clap cannot cut) are cut too, the error made again in
/// clap's words.
fn bounded(mut e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let long: Vec<_> = e
        .context()
        .filter_map(|(kind, v)| match v {
            ContextValue::String(s) if s.chars().nth(VALUE_SHOWN).is_some() => {
                Some((kind, s.clone(), cut_value(s).into_owned()))
            }
            _ => None,
        })
        .collect();
    let cut = |text: &str| {
        long.iter()
            .fold(text.to_owned(), |t, (_, whole, cut)| t.replace(whole, cut))
    };
    // The values themselves, and where they are quoted again (a tip: `use '-- --x…'`).
    let quoting: Vec<_> = e
        .context()
        .filter(|(kind, _)| *kind != ContextKind::Usage)
        .filter_map(|(kind, v)| {
            let quotes = |text: &str| long.iter().any(|(_, whole, _)| text.contains(whole));
            let v = match v {
                ContextValue::String(s) if quotes(s) => ContextValue::String(cut(s)),
                ContextValue::Strings(all) if all.iter().any(|s| quotes(s)) => {
                    ContextValue::Strings(all.iter().map(|s| cut(s)).collect())
                }
                ContextValue::StyledStr(s) if quotes(&s.to_string()) => {
                    ContextValue::StyledStr(cut(&s.to_string()).into())
                }
                ContextValue::StyledStrs(all) if all.iter().any(|s| quotes(&s.to_string())) => {
                    ContextValue::StyledStrs(
                        all.iter().map(|s| cut(&s.to_string()).into()).collect(),
                    )
                }
                _ => return None,
            };
            Some((kind, v))
        })
        .collect();
    for (kind, v) in quoting {
        e.insert(kind, v);
    }
    let Some(mut reason) = std::error::Error::source(&e).map(ToString::to_string) else {
        return e;
    };
    if reason.chars().nth(REASON_SHOWN).is_none() {
        return e;
    }
    for (_, whole, cut) in &long {
        reason = reason
            .replace(&format!("{whole:?}"), &format!("{cut:?}"))
            .replace(whole.as_str(), cut);
    }
    if let Some((at, _)) = reason.char_indices().nth(REASON_SHOWN) {
        reason.truncate(at);
        reason.push('…');
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return e;
    };
    let said = format!(
        "invalid value '{value}' for '{arg}': {reason}\n\nFor more information, try '--help'.\n"
    );
    clap::Error::raw(e.kind(), said).with_cmd(&Cli::command())
}

/// The arguments clap's error `e` names whose value came from their environment variable,
/// each as the error quotes it (`--id <ID>`) with the variable: the error names the flag
/// alone, and the user looks for a flag never typed. Clap takes a variable's value only when
/// the command line `argv` does not give the flag, so an argument is taken to have its value
/// from its variable when the words before `--` do not name it and the variable `is_set`.
fn given_by_env(
    e: &clap::Error,
    argv: &[std::ffi::OsString],
    is_set: impl Fn(&std::ffi::OsStr) -> bool,
) -> Vec<(String, String)> {
    use clap::error::{ContextKind, ContextValue};
    let named: Vec<&String> = [ContextKind::InvalidArg, ContextKind::PriorArg]
        .into_iter()
        .filter_map(|kind| e.get(kind))
        .flat_map(|v| match v {
            ContextValue::String(one) => std::slice::from_ref(one),
            ContextValue::Strings(all) => all.as_slice(),
            _ => &[],
        })
        .collect();
    if named.is_empty() {
        return Vec::new();
    }
    // After `--` every word is a value (a submitted command's own flags).
    let words: Vec<std::borrow::Cow<'_, str>> = argv
        .iter()
        .skip(1)
        .take_while(|w| *w != "--")
        .map(|w| w.to_string_lossy())
        .collect();
    // The subcommands the words name, outermost first: an argument is looked up from the
    // innermost out (a global one, `--log`, is the root's).
    let mut chain = vec![Cli::command()];
    for w in &words {
        let sub = chain.last().and_then(|c| c.find_subcommand(&**w)).cloned();
        chain.extend(sub);
    }
    let typed = |arg: &clap::Arg| {
        let longs = arg
            .get_long()
            .into_iter()
            .chain(arg.get_all_aliases().into_iter().flatten());
        let shorts: Vec<char> = arg.get_short_and_visible_aliases().unwrap_or_default();
        words.iter().any(|w| match w.strip_prefix("--") {
            Some(flag) => longs
                .clone()
                .any(|l| flag == l || flag.strip_prefix(l).is_some_and(|r| r.starts_with('='))),
            None => w
                .strip_prefix('-')
                .is_some_and(|s| shorts.iter().any(|c| s.starts_with(*c))),
        })
    };
    named
        .into_iter()
        .filter_map(|quoted| {
            let long = quoted.strip_prefix("--")?.split([' ', '=']).next()?;
            let arg = chain
                .iter()
                .rev()
                .find_map(|c| c.get_arguments().find(|a| a.get_long() == Some(long)))?;
            let var = arg.get_env()?;
            (!typed(arg) && is_set(var))
                .then(|| (quoted.clone(), var.to_string_lossy().into_owned()))
        })
        .collect()
}

/// `e` with each argument of `given` ([`given_by_env`]) followed by ` (given by TETHER_X)`
/// where it quotes it, as the settings' own errors name a variable; `e` itself when none is.
fn with_env_named(e: clap::Error, given: &[(String, String)]) -> clap::Error {
    if given.is_empty() {
        return e;
    }
    let text = e.render().to_string();
    let mut said = text.strip_prefix("error: ").unwrap_or(&text).to_owned();
    for (arg, var) in given {
        let quoted = format!("'{arg}'");
        said = said.replacen(&quoted, &format!("{quoted} (given by {var})"), 1);
    }
    clap::Error::raw(e.kind(), said).with_cmd(&Cli::command())
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
            let given = given_by_env(&e, &argv, |var| std::env::var_os(var).is_some());
            with_env_named(bounded(e), &given).exit()
        }
    };
    // The client commands that read or steer the coordinator and print what they got.
    let client = matches!(
        &cli.cmd,
        Cmd::Cert(_)
            | Cmd::Tasks(_)
            | Cmd::Task(_)
            | Cmd::Workers { .. }
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
    // A log line that cannot be written (the reader of a pipe went away: `| head`, a stopped
    // journal) is dropped. By default the subscriber reports the failure with `eprintln!`,
    // which panics on the same closed stderr: a worker died of it (exit 101) with its tasks.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false)
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
            Cmd::Workers { common, id } => client::workers(common, id).await,
            Cmd::Cancel(a) => client::control(a, "cancel").await,
            Cmd::Pause(a) => client::control(a, "pause").await,
            Cmd::Resume(a) => client::control(a, "resume").await,
            Cmd::Checkpoint(a) => client::checkpoint(a).await,
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
/// Says so at debug (at info, it came before every refusal of a bad configuration), as read
/// back from the kernel: kernels before 6.0 do not show the flag in `/proc/<pid>/status`, and
/// the tests read this line there instead (asking for `tether=debug`).
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    match nix::sys::prctl::set_thp_disable(true).and_then(|()| nix::sys::prctl::get_thp_disable()) {
        Ok(true) => tracing::debug!("transparent huge pages off for this process"),
        Ok(false) => {
            tracing::debug!("transparent huge pages stay allowed: the kernel kept them on")
        }
        Err(error) => tracing::debug!(%error, "transparent huge pages stay allowed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command, given a value of 100,000 characters that it refuses,
    /// is refused with an error of bounded length: the value quoted cut, by clap and by the
    /// argument's own parser. Clap quoted it whole, and some parsers quoted it again.
    #[test]
    fn an_over_long_value_is_quoted_cut_in_the_error_of_every_argument() {
        let long = "x".repeat(100_000);
        let mut tried = 0;
        let mut long_errors = Vec::new();
        let mut stack = vec![(vec!["tether".to_owned()], Cli::command())];
        while let Some((path, cmd)) = stack.pop() {
            for sub in cmd.get_subcommands() {
                let mut p = path.clone();
                p.push(sub.get_name().to_owned());
                stack.push((p, sub.clone()));
            }
            // An argument or a subcommand it does not know.
            for unknown in [format!("--{long}"), long.clone()] {
                let mut argv = path.clone();
                argv.push(unknown);
                tried += 1;
                if let Err(e) = Cli::try_parse_from(&argv).and_then(Cli::checked) {
                    let said = bounded(e).render().to_string();
                    if said.len() >= 2_000 {
                        long_errors.push(format!("{path:?} unknown: {} bytes", said.len()));
                    }
                }
            }
            for arg in cmd.get_arguments() {
                if !arg.get_action().takes_values() {
                    continue;
                }
                let mut argv = path.clone();
                match (arg.get_long(), arg.is_last_set()) {
                    (Some(l), _) => argv.push(format!("--{l}")),
                    (None, true) => argv.push("--".to_owned()),
                    (None, false) => {}
                }
                argv.push(long.clone());
                tried += 1;
                let Err(e) = Cli::try_parse_from(&argv).and_then(Cli::checked) else {
                    continue;
                };
                let said = bounded(e).render().to_string();
                if said.len() >= 2_000 {
                    long_errors.push(format!(
                        "{:?}: {} bytes: {}",
                        &argv[1..argv.len() - 1],
                        said.len(),
                        &said[..said.len().min(300)]
                    ));
                }
            }
        }
        assert!(tried > 50, "{tried} arguments tried");
        assert!(long_errors.is_empty(), "{}", long_errors.join("\n"));
    }

    /// A value clap refused is said to come from its environment variable when the command
    /// line did not give the flag (clap then takes the variable's value), in each form a flag
    /// may be typed, and only then.
    #[test]
    fn a_refused_value_is_named_by_its_variable_when_no_flag_gave_it() {
        let os =
            |words: &[&str]| -> Vec<std::ffi::OsString> { words.iter().map(Into::into).collect() };
        let typed = ["tether", "coordinator", "--idle-coalesce", "soon"];
        let e = Cli::try_parse_from(typed).err().expect("refused");
        let var = |v: &std::ffi::OsStr| v == "TETHER_IDLE_COALESCE";
        let arg = "--idle-coalesce <IDLE_COALESCE>".to_owned();
        let from_env = vec![(arg.clone(), "TETHER_IDLE_COALESCE".to_owned())];
        let none = Vec::new();
        for (argv, want) in [
            (&["tether", "coordinator"][..], &from_env),
            (
                &["tether", "coordinator", "--", "--idle-coalesce"][..],
                &from_env,
            ),
            (&typed[..], &none),
            (
                &["tether", "coordinator", "--idle-coalesce=soon"][..],
                &none,
            ),
        ] {
            assert_eq!(&given_by_env(&e, &os(argv), var), want, "{argv:?}");
        }
        let unset = given_by_env(&e, &os(&["tether", "coordinator"]), |_| false);
        assert_eq!(unset, none);
        let said = with_env_named(e, &from_env).render().to_string();
        assert!(
            said.contains(&format!("'{arg}' (given by TETHER_IDLE_COALESCE)")),
            "{said}"
        );
        assert!(said.starts_with("error: invalid value 'soon'"), "{said}");
        // A worker's id from TETHER_WORKER_ID: the worker's argument, not the client's.
        let e = Cli::try_parse_from(["tether", "worker", "--id", "a b"])
            .err()
            .expect("refused");
        let given = given_by_env(&e, &os(&["tether", "worker"]), |v| v == "TETHER_WORKER_ID");
        assert_eq!(
            given,
            [("--id <ID>".to_owned(), "TETHER_WORKER_ID".to_owned())]
        );
    }

    #[test]
    fn a_value_is_quoted_whole_up_to_its_bound_and_cut_past_it() {
        let at = "é".repeat(VALUE_SHOWN);
        assert_eq!(cut_value(&at), at);
        let past = format!("{at}é");
        assert_eq!(
            cut_value(&past),
            format!("{at}… ({} characters)", VALUE_SHOWN + 1)
        );
    }
}
