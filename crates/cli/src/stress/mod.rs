//! `tether stress`: load scenarios against a real coordinator process, with the simulated
//! workers in another process so that their resources are measured apart.
//!
//! - [`procs`]: the coordinator and fleet child processes; CPU and memory from `/proc`.
//! - [`mod@fleet`]: the hidden `tether stress-fleet` subcommand: many [`tether_worker::Agent`]s in
//!   one process, driven by JSON lines.
//! - [`scenarios`]: thundering_herd, steady_load, message_flood, checkpoint_heavy,
//!   mixed_priority.
//! - [`probe`]: latency probes (telemetry round trips from when due to the ack, behind the commits before it).
//! - [`truth`]: lost and recorded-twice verdicts from the coordinator's database.
//! - [`rerun`]: the verdict that no task ran again without a cause: a fault of the run took
//!   its worker away.
//! - [`report`]: the figures, as Markdown or JSON.

pub mod fleet;
mod machine;
mod probe;
mod procs;
mod report;
mod rerun;
mod scenarios;
pub(crate) mod truth;

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

pub use fleet::FleetArgs;

use crate::output::outln;
use crate::settings::parse_duration_arg;

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// All workers connect at once; they are all cut off (the coordinator killed and restarted,
    /// or `--cut` through fault proxies); all reconnect.
    #[value(name = "thundering_herd", alias = "thundering-herd")]
    ThunderingHerd,
    /// Trivial tasks flow while workers keep leaving and joining.
    #[value(name = "steady_load", alias = "steady-load")]
    SteadyLoad,
    /// State updates at a set rate and size per worker, with latency probes.
    #[value(name = "message_flood", alias = "message-flood")]
    MessageFlood,
    /// Long tasks checkpointing often; workers crash and others resume the tasks.
    #[value(name = "checkpoint_heavy", alias = "checkpoint-heavy")]
    CheckpointHeavy,
    /// A backlog of low-priority tasks, then high-priority ones that must not wait behind it.
    #[value(name = "mixed_priority", alias = "mixed-priority")]
    MixedPriority,
}

/// How `thundering_herd` cuts every worker off from the coordinator at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Cut {
    /// The coordinator is killed (SIGKILL) and restarted on the same port and data.
    Kill,
    /// The workers reach the coordinator through fault proxies (`tether proxy` processes,
    /// 5,000 workers each); the proxies go down: listener closed and every link cut, so that
    /// every new connection is refused until they come up again. The coordinator lives on and
    /// sees every session end.
    ProxyDown,
    /// Through the fault proxies, a `reset` fault on every link, old and new: each connection
    /// is reset (TCP RST) as soon as it is made, until the fault is removed. Every reconnect
    /// attempt connects and fails, instead of being refused.
    Reset,
    /// Through the fault proxies, a `blackhole` on every link, both ways: the bytes of live
    /// links are swallowed, new connections are held back as lost SYNs, nothing is closed: a
    /// silent stall. Workers
    /// find it by their liveness timeout (the coordinator's heartbeat timeout, three
    /// `--heartbeat-interval`s), so `--outage` must be longer; a worker whose message waits as
    /// long for its acknowledgement ends its session too.
    Blackhole,
    /// The coordinator process is stopped (SIGSTOP) and, after the outage, continued
    /// (SIGCONT): its sockets stay open and silent and new connections wait in its listen
    /// queue, as with a frozen host. Workers find it by their liveness timeout, so `--outage`
    /// must be longer, as for `blackhole`; the attempts they make meanwhile are all answered
    /// at once when it goes on.
    Stall,
}

impl Cut {
    pub fn name(self) -> &'static str {
        match self {
            Cut::Kill => "kill",
            Cut::ProxyDown => "proxy-down",
            Cut::Reset => "reset",
            Cut::Blackhole => "blackhole",
            Cut::Stall => "stall",
        }
    }

    /// Whether the workers reach the coordinator through fault proxies.
    pub fn proxied(self) -> bool {
        !matches!(self, Cut::Kill | Cut::Stall)
    }
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::ThunderingHerd => "thundering_herd",
            Scenario::SteadyLoad => "steady_load",
            Scenario::MessageFlood => "message_flood",
            Scenario::CheckpointHeavy => "checkpoint_heavy",
            Scenario::MixedPriority => "mixed_priority",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct StressArgs {
    pub scenario: Scenario,
    /// Simulated workers (default: 10,000 thundering_herd, 1,000 message_flood, 200
    /// checkpoint_heavy, 100 otherwise).
    #[arg(long)]
    pub workers: Option<u64>,
    /// Length of the measured phase (default 10s; checkpoint_heavy: the length of a task;
    /// steady_load ends it sooner once it submitted 1,000,000 tasks, the most a run holds).
    #[arg(long, value_parser = parse_duration_arg)]
    pub duration: Option<Duration>,
    /// Tasks (thundering_herd: running during the outage, default workers/10; checkpoint_heavy:
    /// default one per worker; mixed_priority: low-priority backlog, default 20,000).
    #[arg(long)]
    pub tasks: Option<u64>,
    /// Slots per worker (default 4 in steady_load, 8 in message_flood, 1 otherwise).
    #[arg(long)]
    pub slots: Option<u32>,
    /// message_flood: state updates per second per worker, at most 1,000 per slot (each slot's
    /// task reports at most once a millisecond). The default offers a quarter more
    /// than the 200,000 a second the coordinator is to handle from 1,000 workers, so that what
    /// it handles measures it, not the offer; `--rate 100` is the half rate of the latency target.
    #[arg(long, default_value_t = 250)]
    pub rate: u64,
    /// message_flood: bytes of padding per state update.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// checkpoint_heavy: bytes of each checkpoint, at least 12 (over 256 KiB, a resumed task
    /// fetches its checkpoint in pieces).
    #[arg(long, default_value_t = 1024)]
    pub checkpoint_size: usize,
    /// message_flood: the tasks of each worker report in step (each worker on its own phase of
    /// a fleet-wide clock), so a worker's updates leave together in one frame; by default each
    /// task reports at its own pace.
    #[arg(long)]
    pub in_step: bool,
    /// thundering_herd: how long the cut lasts (the coordinator dead, the proxies down, the
    /// reset fault in place).
    #[arg(long, default_value = "2s", value_parser = parse_duration_arg)]
    pub outage: Duration,
    /// The coordinator's `--lost-after`: how long a disconnected worker keeps its tasks before
    /// they go back to the queue (default 60s in thundering_herd, so that the outage loses no
    /// worker, 1s otherwise, so that crashed workers' tasks move on at once). A thundering_herd
    /// whose `--outage` outlasts it has every task taken from its cut-off worker and run again.
    /// The verdict that no task ran again without a cause lets off only a task whose worker
    /// the run stopped or kept away this long; any other run again fails the run.
    #[arg(long, value_parser = parse_duration_arg)]
    pub lost_after: Option<Duration>,
    /// thundering_herd: how every worker is cut off from the coordinator at once.
    #[arg(long, value_enum, default_value_t = Cut::Kill)]
    pub cut: Cut,
    /// thundering_herd: idle window over which CPU and memory per worker are measured.
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
    pub idle: Duration,
    /// steady_load: fraction of the workers replaced every second (each second in turn they
    /// are drained then stopped once idle, crash, or shut down).
    #[arg(long, default_value_t = 0.05)]
    pub churn: f64,
    /// message_flood: latency probes, at least 1: the message latency is their round trips,
    /// and a flood without them would pass with no latency figure at all.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub probes: u32,
    /// message_flood: messages per second of each probe.
    #[arg(long, default_value_t = 50)]
    pub probe_rate: u32,
    /// Source addresses 127.0.0.1 .. 127.0.0.N the workers connect from.
    #[arg(long, default_value_t = 16)]
    pub source_addrs: u8,
    /// Reset each simulated worker's connection about this often (a TCP reset mid-stream, at
    /// a moment drawn for each connection between half and one and a half of it), so that
    /// results and checkpoints go unacknowledged and are sent again: the "recorded twice"
    /// verdict then faces real duplicates, counted in the report. Not in thundering_herd,
    /// whose fault is `--cut`.
    #[arg(long, value_parser = parse_duration_arg)]
    pub reset_every: Option<Duration>,
    /// Workers' heartbeat interval.
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    pub heartbeat_interval: Duration,
    /// Workers' largest reconnect delay (before jitter of +/-20 %).
    #[arg(long, default_value = "1s", value_parser = parse_duration_arg)]
    pub max_reconnect_delay: Duration,
    /// Give up (and fail) after this long.
    #[arg(long, default_value = "600s", value_parser = parse_duration_arg)]
    pub deadline: Duration,
    /// Niceness of the fleet process (0-19). Above 0 the load generator yields the CPU to the
    /// coordinator when both want it, as workers on other machines would not compete with it;
    /// the report says so. 0 (the default): the same priority.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub fleet_nice: u8,
    /// What the coordinator's acknowledged commits survive: `process` (the default) or
    /// `machine` (one fsync per group commit), to measure what the second costs.
    #[arg(long, default_value = "process")]
    pub durability: tether_coordinator::store::Durability,
    /// The coordinator's idle coalescing (`tether coordinator --idle-coalesce`, e.g. `4ms`):
    /// off by default, as in the coordinator.
    #[arg(long, value_parser = parse_duration_arg)]
    pub idle_coalesce: Option<Duration>,
    /// The coordinator offers no compression (`tether coordinator --no-compression`): every
    /// frame of the run goes as text, to compare (the report counts compressed frames).
    #[arg(long)]
    pub no_compression: bool,
    /// Workers do not offer batch frames: one message per frame, to compare.
    #[arg(long)]
    pub no_batching: bool,
    /// Workers do not offer compact acknowledgements: one `*_ack` per message, to compare.
    #[arg(long)]
    pub no_compact_acks: bool,
    /// Workers (and probes) authenticate with a fleet secret made for the run (HMAC
    /// challenge-response at registration).
    #[arg(long)]
    pub auth: bool,
    /// Every frame both ways carries an HMAC-SHA256 integrity tag; implies --auth.
    #[arg(long)]
    pub message_mac: bool,
    /// The coordinator serves TLS (a private CA and certificate made for the run); workers and
    /// probes connect with wss:// and trust that CA only.
    #[arg(long)]
    pub tls: bool,
    /// Print the report as JSON instead of Markdown.
    #[arg(long)]
    pub json: bool,
    /// Keep the work directory (database, logs) when the run passes too; a run that fails
    /// always keeps it and prints its path.
    #[arg(long)]
    pub keep: bool,
}

/// The most simulated workers (`--workers`): each is a socket in the fleet process and one
/// in the coordinator's, far past any machine's open-file limit, and the fleet is driven with
/// counts of 32 bits.
pub const MAX_WORKERS: u64 = 1_000_000;
/// The most tasks a run holds at once: `--tasks`, and `--workers` x `--slots` (message_flood
/// submits a task for every slot). Every task's spec is built before it is submitted and its id
/// kept to judge it, so the run's memory grows with them.
pub const MAX_TASKS: u64 = 1_000_000;
/// The most messages a second a probe sends (`--probe-rate`): its period must be at least the
/// timer's millisecond (a shorter one is not kept; a period of 0 ns stops the run).
pub const MAX_PROBE_RATE: u32 = 1_000;
/// The shortest `--idle`. The coordinator's CPU time is read from `/proc` in clock ticks of
/// 10 ms; over a window of W the idle figure moves in steps of 10 ms / W of a core. Under a
/// second one tick is more than a point of a core, a fifth of the 5 % target, and the figure
/// cannot tell a met target from a missed one (at 0 s it divides by nothing at all).
pub const MIN_IDLE: Duration = Duration::from_secs(1);
/// The shortest `--reset-every`.
pub const MIN_RESET_EVERY: Duration = Duration::from_millis(50);
/// The largest `--size` of a state update: a message must fit in a frame with room to spare.
pub const MAX_UPDATE_SIZE: usize = 1024 * 1024;
/// The largest `--checkpoint-size`: a quarter of the coordinator's default checkpoint bound
/// (each worker of the fleet holds its task's latest checkpoint, and its outbox the ones not
/// yet acknowledged).
pub const MAX_CHECKPOINT_SIZE: usize = 16 * 1024 * 1024;

impl StressArgs {
    /// The simulated workers: `--workers`, else the scenario's default.
    pub fn fleet_size(&self) -> u64 {
        self.workers.unwrap_or(match self.scenario {
            Scenario::ThunderingHerd => 10_000,
            Scenario::MessageFlood => 1_000,
            Scenario::CheckpointHeavy => 200,
            _ => 100,
        })
    }

    /// Refuses a scenario's option given to another scenario, which would be echoed in the
    /// report as though it shaped the run. `given` says whether a flag was on the command line
    /// (these have defaults, so their values cannot tell).
    pub fn check_applicable(&self, given: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        use Scenario::*;
        // Options with no default, which no flag name is needed to see.
        let unused: [(&str, bool, &[Scenario]); 2] = [
            (
                "--duration",
                self.duration.is_some(),
                &[SteadyLoad, MessageFlood, CheckpointHeavy],
            ),
            (
                "--tasks",
                self.tasks.is_some(),
                &[ThunderingHerd, CheckpointHeavy, MixedPriority],
            ),
        ];
        for (flag, given, uses) in unused {
            if given && !uses.contains(&self.scenario) {
                let users: Vec<&str> = uses.iter().map(|s| s.name()).collect();
                bail!(
                    "{flag} does not apply to {}: only {} use it",
                    self.scenario.name(),
                    users.join(", ")
                );
            }
        }
        let only: [(&str, Scenario); 10] = [
            ("--rate", MessageFlood),
            ("--size", MessageFlood),
            ("--in-step", MessageFlood),
            ("--probes", MessageFlood),
            ("--probe-rate", MessageFlood),
            ("--checkpoint-size", CheckpointHeavy),
            ("--outage", ThunderingHerd),
            ("--cut", ThunderingHerd),
            ("--idle", ThunderingHerd),
            ("--churn", SteadyLoad),
        ];
        for (flag, scenario) in only {
            if scenario != self.scenario && given(flag) {
                bail!(
                    "{flag} does not apply to {}: only {} uses it",
                    self.scenario.name(),
                    scenario.name()
                );
            }
        }
        Ok(())
    }

    /// Refuses, by flag name, values no run can use, before anything starts.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.workers == Some(0) {
            bail!("--workers must be at least 1");
        }
        if self.fleet_size() > MAX_WORKERS {
            bail!(
                "--workers must be at most {MAX_WORKERS}: each simulated worker holds a socket in \
                 the fleet and one in the coordinator"
            );
        }
        if self.tasks.is_some_and(|t| t > MAX_TASKS) {
            bail!(
                "--tasks must be at most {MAX_TASKS}: every task's spec is built and its id kept \
                 to judge it"
            );
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            bail!("--duration must be longer than 0");
        }
        if self.tasks == Some(0) {
            bail!("--tasks must be at least 1: a run without tasks has nothing to judge");
        }
        if self.slots == Some(0) {
            bail!("--slots must be at least 1: a worker without slots runs nothing");
        }
        // Both at most their bounds above: the product fits in a u64.
        let slots_in_all = self.fleet_size() * u64::from(scenarios::flood_slots(self));
        if slots_in_all > MAX_TASKS {
            bail!(
                "--slots x --workers ({slots_in_all}) must be at most {MAX_TASKS}: a task can run \
                 in every slot, and message_flood submits one for each at once"
            );
        }
        if self.scenario == Scenario::MixedPriority {
            let (low, slots) = (self.tasks.unwrap_or(20_000), self.slots.unwrap_or(1));
            let running = self.fleet_size() * u64::from(slots);
            if low <= running {
                bail!(
                    "--tasks must be more than --workers x --slots ({running}) in mixed_priority: \
                     with every low-priority task running at once there is no backlog for the \
                     high-priority ones to pass"
                );
            }
        }
        if let Some(wait) = self.idle_coalesce {
            crate::coalesce::check(wait).context("--idle-coalesce")?;
        }
        if self.rate == 0 {
            bail!("--rate must be at least 1 (updates a second per worker)");
        }
        // Each of a worker's flood tasks (one a slot) reports at its share of the rate, at
        // most as often as its timer ticks: more would be asked and not offered, and the
        // report would print the rate asked.
        let slots = u64::from(scenarios::flood_slots(self).max(1));
        let most = u64::from(fleet::MAX_FLOOD_TASK_RATE) * slots;
        if self.scenario == Scenario::MessageFlood && self.rate > most {
            bail!(
                "--rate must be at most {most} updates a second per worker with {slots} slots: each slot's flood task reports at most {} times a second",
                fleet::MAX_FLOOD_TASK_RATE
            );
        }
        let first = scenarios::FLEET_BACKOFF_INITIAL;
        if self.max_reconnect_delay < first {
            bail!(
                "--max-reconnect-delay must be at least {first:?}, the fleet's first reconnect delay"
            );
        }
        if self.size > MAX_UPDATE_SIZE {
            bail!("--size must be at most {MAX_UPDATE_SIZE} bytes");
        }
        let least = fleet::MIN_STEP_CHECKPOINT;
        if !(least..=MAX_CHECKPOINT_SIZE).contains(&self.checkpoint_size) {
            bail!(
                "--checkpoint-size must be {least} to {MAX_CHECKPOINT_SIZE} bytes: a checkpoint \
                 holds its step and at least a word drawn from its task, by which a checkpoint \
                 of another task is told apart"
            );
        }
        if !(0.0..=1.0).contains(&self.churn) {
            bail!("--churn must be a share of the workers, 0 to 1");
        }
        if !(1..=MAX_PROBE_RATE).contains(&self.probe_rate) {
            bail!(
                "--probe-rate must be 1 to {MAX_PROBE_RATE} messages a second: a probe's period \
                 must be at least the timer's millisecond"
            );
        }
        if self.source_addrs == 0 {
            bail!("--source-addrs must be at least 1");
        }
        if self.heartbeat_interval < tether_coordinator::config::MIN_HEARTBEAT_INTERVAL {
            bail!(
                "--heartbeat-interval must be at least {:?}",
                tether_coordinator::config::MIN_HEARTBEAT_INTERVAL
            );
        }
        if let Some(every) = self.reset_every {
            if self.scenario == Scenario::ThunderingHerd {
                bail!(
                    "--reset-every does not apply to thundering_herd: its fault is --cut, and \
                     resets would blur its registration and reconnect figures"
                );
            }
            if every < MIN_RESET_EVERY {
                bail!(
                    "--reset-every must be at least {MIN_RESET_EVERY:?}: a connection must live \
                     long enough to register and carry work"
                );
            }
        }
        if self.idle < MIN_IDLE {
            bail!(
                "--idle must be at least {MIN_IDLE:?}: the coordinator's CPU is read in clock \
                 ticks of 10 ms, too coarse to measure idle CPU over a shorter window"
            );
        }
        if self.outage.is_zero() {
            bail!("--outage must be longer than 0");
        }
        // Workers find a silent stall by their liveness timeout: the one the coordinator
        // announces, three intervals, stretched by its heartbeat budget for a large fleet (30 s
        // for 10,000 workers). A shorter blackhole leaves an idle worker's session up, and no
        // re-registration would come.
        let workers = self.fleet_size();
        let mut announced = tether_coordinator::config::CoordinatorConfig::new("unused");
        announced.heartbeat_interval = self.heartbeat_interval;
        announced.heartbeat_timeout = self.heartbeat_interval * 3;
        let announced = announced.beat(workers).timeout;
        if self.scenario == Scenario::ThunderingHerd
            && matches!(self.cut, Cut::Blackhole | Cut::Stall)
            && self.outage <= announced
        {
            bail!(
                "--cut {} needs an --outage longer than the workers' liveness timeout \
                 ({} ms for {workers} workers: 3 x --heartbeat-interval, stretched by the \
                 coordinator's heartbeat budget), or idle workers never notice it",
                self.cut.name(),
                announced.as_millis()
            );
        }
        Ok(())
    }
}

pub async fn run(a: StressArgs) -> anyhow::Result<()> {
    if let Err(e) = a
        .check_applicable(crate::settings::on_command_line)
        .and_then(|()| a.check())
    {
        // A bad argument, as the parser's own refusals: said, and exit code 2.
        clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{e:#}\n")).exit();
    }
    raise_open_files();
    let report = match scenarios::run(a.clone()).await {
        Ok(report) => report,
        // A run that ended without a report (its deadline, a scenario's error) still gives
        // `--json` a document, which says it failed and why: a reader of stdout parses that,
        // not nothing.
        Err(e) if a.json => {
            let failed = serde_json::json!({
                "scenario": a.scenario.name(),
                "passed": false,
                "error": crate::output::describe(&e),
            });
            outln!("{}", serde_json::to_string_pretty(&failed)?)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["passed"] = report.passed().into();
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        outln!("{}", report.markdown())?;
    }
    if !report.passed() {
        let failed: Vec<&str> = report
            .verdicts
            .iter()
            .filter(|v| !v.pass)
            .map(|v| v.name.as_str())
            .collect();
        bail!("verdicts failed: {}", failed.join(", "));
    }
    Ok(())
}

pub async fn fleet(a: FleetArgs) -> anyhow::Result<()> {
    fleet::run(a).await
}

/// Raises the soft open-file limit to the hard limit: every simulated worker holds a socket.
pub fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// The open-file limit now, for the report.
pub fn open_file_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stress arguments as the command line would give them.
    fn args(line: &[&str]) -> StressArgs {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            a: StressArgs,
        }
        let line = std::iter::once("stress").chain(line.iter().copied());
        <Flags as clap::Parser>::try_parse_from(line)
            .expect("flags")
            .a
    }

    /// What `check` says of `line`: `None` when it takes it.
    fn refusal(line: &[&str]) -> Option<String> {
        args(line).check().err().map(|e| e.to_string())
    }

    /// Asserts `check` refuses `line` naming `flag` first.
    fn refused(line: &[&str], flag: &str) {
        let said = refusal(line);
        assert!(
            said.as_deref().is_some_and(|s| s.starts_with(flag)),
            "{line:?}: {said:?}"
        );
    }

    #[test]
    fn more_workers_than_a_run_can_hold_are_refused_not_cut_to_32_bits() {
        let most = MAX_WORKERS.to_string();
        assert_eq!(refusal(&["thundering_herd", "--workers", &most]), None);
        let over = (MAX_WORKERS + 1).to_string();
        refused(&["thundering_herd", "--workers", &over], "--workers");
        // 2^32 + 1 workers were started as 1.
        let wraps = (u64::from(u32::MAX) + 2).to_string();
        refused(&["steady_load", "--workers", &wraps], "--workers");
    }

    #[test]
    fn more_tasks_than_a_run_can_hold_at_once_are_refused() {
        let most = MAX_TASKS.to_string();
        assert_eq!(refusal(&["checkpoint_heavy", "--tasks", &most]), None);
        refused(
            &["checkpoint_heavy", "--tasks", &u64::MAX.to_string()],
            "--tasks",
        );
        refused(
            &["mixed_priority", "--tasks", &(MAX_TASKS + 1).to_string()],
            "--tasks",
        );
    }

    #[test]
    fn more_slots_in_all_than_tasks_a_run_can_hold_are_refused_without_overflow() {
        // 1,000 workers x 1,000 slots: a million flood tasks, the most.
        let fits = ["message_flood", "--workers", "1000", "--slots", "1000"];
        assert_eq!(refusal(&fits), None);
        refused(
            &["message_flood", "--workers", "1000", "--slots", "1001"],
            "--slots",
        );
        // The largest of each: their product was past a u64 in mixed_priority's check.
        let (workers, slots) = (MAX_WORKERS.to_string(), u32::MAX.to_string());
        refused(
            &["mixed_priority", "--workers", &workers, "--slots", &slots],
            "--slots",
        );
        // The default slots count: 8 in message_flood.
        refused(&["message_flood", "--workers", "125001"], "--slots");
    }

    #[test]
    fn a_flood_rate_above_what_a_slots_task_can_report_is_refused() {
        // 8 slots by default, each task at most 1,000 updates a second.
        assert_eq!(refusal(&["message_flood", "--rate", "8000"]), None);
        refused(&["message_flood", "--rate", "8001"], "--rate");
        let one = ["message_flood", "--slots", "1", "--rate"];
        assert_eq!(refusal(&[&one[..], &["1000"]].concat()), None);
        refused(&[&one[..], &["1001"]].concat(), "--rate");
        refused(&[&one[..], &[&*u64::MAX.to_string()]].concat(), "--rate");
    }

    #[test]
    fn a_probe_rate_whose_period_is_under_a_millisecond_is_refused() {
        let most = MAX_PROBE_RATE.to_string();
        assert_eq!(refusal(&["message_flood", "--probe-rate", &most]), None);
        for rate in ["0", "1001", &u32::MAX.to_string()] {
            refused(&["message_flood", "--probe-rate", rate], "--probe-rate");
        }
    }

    /// `--duration` and `--tasks` have no default, so their value tells whether they were
    /// given: a scenario that ignores them refuses them, as it does another's flags.
    #[test]
    fn duration_and_tasks_are_refused_by_the_scenarios_that_ignore_them() {
        let applicable = |line: &[&str]| {
            args(line)
                .check_applicable(|_| false)
                .err()
                .map(|e| e.to_string())
        };
        for line in [
            &["thundering_herd", "--duration", "5s"][..],
            &["mixed_priority", "--duration", "5s"],
            &["steady_load", "--tasks", "10"],
            &["message_flood", "--tasks", "10"],
        ] {
            let said = applicable(line);
            let flag = line[1];
            assert!(
                said.as_deref()
                    .is_some_and(|s| s.starts_with(&format!("{flag} does not apply"))),
                "{line:?}: {said:?}"
            );
        }
        for line in [
            &["steady_load", "--duration", "5s"][..],
            &["message_flood", "--duration", "5s"],
            &["checkpoint_heavy", "--duration", "5s", "--tasks", "10"],
            &["thundering_herd", "--tasks", "10"],
            &["mixed_priority", "--tasks", "1000"],
        ] {
            assert_eq!(applicable(line), None, "{line:?}");
        }
    }

    /// The probes are what message_flood measures its latency with: none would leave the
    /// latency figure out and the run passing. Refused by the parser (exit code 2).
    #[test]
    fn a_flood_without_latency_probes_is_refused_by_the_parser() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            a: StressArgs,
        }
        let parsed =
            <Flags as clap::Parser>::try_parse_from(["stress", "message_flood", "--probes", "0"]);
        let e = parsed.err().expect("--probes 0 refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--probes"), "{e}");
        assert_eq!(args(&["message_flood", "--probes", "1"]).probes, 1);
    }

    #[test]
    fn an_idle_window_too_short_to_measure_cpu_in_is_refused() {
        for idle in ["0s", "999ms"] {
            let said = refusal(&["thundering_herd", "--idle", idle]);
            assert!(
                said.as_deref().is_some_and(|s| s.starts_with("--idle")),
                "{idle}: {said:?}"
            );
        }
        assert_eq!(refusal(&["thundering_herd", "--idle", "1s"]), None);
    }

    #[test]
    fn a_checkpoint_too_small_to_hold_a_word_drawn_from_its_task_is_refused() {
        let least = fleet::MIN_STEP_CHECKPOINT.to_string();
        let under = (fleet::MIN_STEP_CHECKPOINT - 1).to_string();
        let said = refusal(&["checkpoint_heavy", "--checkpoint-size", &under]);
        assert!(
            said.as_deref()
                .is_some_and(|s| s.starts_with("--checkpoint-size")),
            "{said:?}"
        );
        assert_eq!(
            refusal(&["checkpoint_heavy", "--checkpoint-size", &least]),
            None
        );
    }
}
