//! The report of a stress run: figures, distributions, verdicts; printed as Markdown or JSON.

use std::fmt::Write as _;

use serde::Serialize;

/// A distribution of measurements (ms unless the name says otherwise), nearest-rank
/// percentiles.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Dist {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1]
        };
        Some(Self {
            count: v.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: v[v.len() - 1],
        })
    }
}

/// A pass/fail check; a failed verdict makes `tether stress` exit non-zero.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// A performance target of issue 5, compared with a figure. Informative: a missed target is
/// reported, and does not fail the run (it depends on the machine).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    /// `None` when the run is not of the target's size or rate (smaller, or another load).
    pub met: Option<bool>,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub workers: u64,
    pub command: String,
    /// How the coordinator saw the run's sessions: authenticated or not, tagged or not, over
    /// TLS or not.
    pub security: String,
    /// What the coordinator's acknowledged commits survive (`--durability`).
    pub durability: String,
    /// Sessions whose frames carried integrity tags (the coordinator's `mac_sessions`).
    pub mac_sessions: Option<u64>,
    pub elapsed_s: f64,
    /// Simultaneous start: workers registered per second until the last one.
    pub connects_per_s: Option<f64>,
    /// Per-worker time from the simultaneous start until registered.
    pub time_to_register_ms: Option<Dist>,
    /// thundering_herd: how the workers were cut off (`--cut`) and for how long.
    pub cut: Option<String>,
    /// Per-worker time from the cut clearing (the restarted coordinator answering, the proxy
    /// up again, the reset fault removed) until re-registered. Negative for a worker back
    /// before the run stamped the clearing (see `reregistered_before_cleared`).
    pub reconnect_after_ready_ms: Option<Dist>,
    /// thundering_herd: workers that re-registered before the run stamped the cut's clearing
    /// on their path (when the control call returned, or the restarted coordinator first
    /// answered the run): their times after the clearing are below 0.
    #[serde(default)]
    pub reregistered_before_cleared: Option<u64>,
    /// Per-worker time from the start of the successful attempt until re-registered.
    pub reconnect_attempt_ms: Option<Dist>,
    /// Per-worker time until re-registered from the later of the cut clearing and the end of
    /// the backoff delay current then (the start of the worker's first attempt after the
    /// clearing, whether that attempt came back or failed; for an attempt under way through
    /// the clearing, when the next was due by the schedule): what the worker took past what its
    /// backoff made it wait. Never below 0.
    pub reconnect_beyond_delay_ms: Option<Dist>,
    /// thundering_herd: connection attempts each worker made from the cut until it was
    /// registered again (the successful one included).
    pub reconnect_attempts: Option<Dist>,
    /// The workers' largest reconnect delay with jitter: the jitter window.
    pub reconnect_window_ms: Option<f64>,
    /// Worker messages handled by the coordinator per second (its `messages_in` counter):
    /// between two marks, or in checkpoint_heavy until its last result (see the notes).
    pub messages_per_s: Option<f64>,
    /// State updates offered by the simulated tasks per second (before coalescing).
    pub offered_per_s: Option<f64>,
    /// Worker messages per worker frame (above 1 with batch frames).
    pub messages_per_frame: Option<f64>,
    /// Share of the handled messages acknowledged inside an `acks` (compact acknowledgements)
    /// rather than by an ack of their own.
    pub compact_acked_share: Option<f64>,
    /// message_flood: times, over the measured window, that a worker's outbox entries started
    /// to wait for its send window (about a second of its measured link), summed over the
    /// fleet; and how many workers waited so at least once.
    pub send_window_waits: Option<u64>,
    pub workers_window_waited: Option<u64>,
    /// message_flood: each worker's measure of its link at the window's end, kB a second.
    pub send_rate_kb_s: Option<Dist>,
    /// Round trip of an acknowledged message (telemetry -> the commits before it -> ack) under load.
    pub message_latency_ms: Option<Dist>,
    /// Tasks submitted, dispatched, executed and durably recorded per second. steady_load:
    /// results recorded while it submitted, over that time; checkpoint_heavy and
    /// mixed_priority: their tasks over the time from their submission to the last result
    /// recorded. The notes say which.
    pub tasks_per_s: Option<f64>,
    pub tasks: u64,
    pub checkpoints: Option<u64>,
    pub resumed_from_checkpoint: Option<u64>,
    pub high_priority_wait_ms: Option<Dist>,
    pub low_priority_wait_ms: Option<Dist>,
    /// CPU of every coordinator process of the run, each to its exit (the kernel's count once
    /// it exited: its shutdown included).
    pub coordinator_cpu_s: f64,
    /// Coordinator CPU per handled worker message over the measured window, microseconds
    /// (message_flood): its capacity is about 1e6 / this per core.
    pub coordinator_us_per_message: Option<f64>,
    /// The fleet's CPU per handled message over the same window, microseconds.
    pub fleet_us_per_message: Option<f64>,
    /// Coordinator CPU per task from the first submission until all were terminal,
    /// microseconds (steady_load).
    pub coordinator_us_per_task: Option<f64>,
    /// steady_load: workers replaced during the run by the coordinator's count (the fewer of
    /// the workers known and no longer connected, and those registered after the first).
    pub workers_replaced: Option<u64>,
    /// steady_load: workers drained through the API under the load (each then stopped once it
    /// held no task).
    pub drained_workers: Option<u64>,
    /// steady_load: from each drain's answer until the run saw the worker hold no task (its
    /// reads of the worker are [`super::scenarios::DRAIN_POLL`] apart).
    pub drain_to_idle_ms: Option<Dist>,
    /// CPU of the simulated workers' process (it shares the machine with the coordinator), to
    /// its exit (the kernel's count once it exited: its workers' stopping included).
    pub fleet_cpu_s: f64,
    /// Peak RSS of the simulated workers' process: its `ru_maxrss` once it exited (or was
    /// killed); `None` off Linux.
    #[serde(default)]
    pub fleet_peak_rss_kib: Option<u64>,
    /// Workers the fleet aborted at its exit, not stopped within
    /// [`super::fleet::EXIT_DRAIN`] of the exit command (the verdict "every worker stopped
    /// when told"); `None` when the fleet never printed its last status, which counts them.
    #[serde(default)]
    pub fleet_workers_aborted: Option<u64>,
    /// CPU of the fault proxies' processes (`--cut` through them), each to its exit (the
    /// kernel's count once it exited, after the fleet's).
    pub proxy_cpu_s: Option<f64>,
    /// Peak RSS of the fault proxies' processes, summed: each one's `ru_maxrss` once it exited.
    pub proxy_peak_rss_kib: Option<u64>,
    /// What the cut's fault did on the proxies (`--cut reset|blackhole`), summed over them:
    /// the connections it reset, the bytes it swallowed, the connections it touched.
    pub cut_fault: Option<tether_faultproxy::FaultStats>,
    /// The fleet process's niceness as `/proc` read it at the end (`--fleet-nice`).
    pub fleet_nice: Option<i64>,
    /// The coordinator's `--idle-coalesce`, milliseconds, when given.
    pub idle_coalesce_ms: Option<f64>,
    /// Frames compressed either way at the coordinator (the one running last).
    #[serde(default)]
    pub compressed_frames: Option<u64>,
    /// CPU of the coordinator over the idle window, % of one core.
    pub idle_cpu_pct: Option<f64>,
    /// Worker frames (heartbeats, telemetry) the coordinator read per second in the idle window.
    pub idle_frames_per_s: Option<f64>,
    /// The coordinator's CPU over the idle window divided by the frames read in it, µs.
    pub idle_us_per_frame: Option<f64>,
    /// Highest peak RSS of the coordinator processes: each one's `ru_maxrss` once it exited.
    pub coordinator_peak_rss_kib: u64,
    /// (RSS with the workers connected and idle - RSS before they came) / workers.
    pub memory_per_worker_kib: Option<f64>,
    pub lost: u64,
    /// Tasks that ended `failed`: no stress task is meant to (each runs a trivial executor).
    pub failed: u64,
    /// Results the store kept but did not count (from an attempt whose lease had ended).
    pub stale_results: u64,
    /// Tasks the store holds as run more than once: more than one attempt, or a result kept
    /// stale (judged by the verdict "no task ran again without a cause ...").
    #[serde(default)]
    pub tasks_run_again: Option<u64>,
    /// Of the attempts those reruns replaced, the ones whose result came back `completed` and
    /// was kept stale: finished work thrown away, the waste a user sees.
    #[serde(default)]
    pub completed_results_discarded: Option<u64>,
    pub recorded_twice: u64,
    /// Connections the fleet reset on purpose (`--reset-every`), by its last status: `None`
    /// when the run asked for none, or when the fleet never printed that status (unknown:
    /// `reset_every_ms` then says resets were asked for).
    #[serde(default)]
    pub connections_reset: Option<u64>,
    /// `--reset-every`, milliseconds, when given.
    #[serde(default)]
    pub reset_every_ms: Option<f64>,
    /// Results the coordinator running last answered `duplicate`: sent again after their
    /// acknowledgement was lost (a reset, a restart), known, and not recorded again.
    #[serde(default)]
    pub results_duplicate: Option<u64>,
    /// Checkpoint announcements and pieces the coordinator running last answered `duplicate`:
    /// sent again, already stored, not stored twice.
    #[serde(default)]
    pub checkpoint_messages_duplicate: Option<u64>,
    /// The machine's speed before the run and after both processes stopped.
    pub machine_before: Option<super::machine::Probe>,
    pub machine_after: Option<super::machine::Probe>,
    pub verdicts: Vec<Verdict>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn verdict(&mut self, name: &str, pass: bool, detail: impl Into<String>) {
        self.verdicts.push(Verdict {
            name: name.to_owned(),
            pass,
            detail: detail.into(),
        });
    }

    /// Compares a figure with a target; `at_size` says whether the run is as large as the
    /// target assumes.
    pub fn target(&mut self, name: &str, at_size: bool, met: bool, detail: impl Into<String>) {
        self.targets.push(Target {
            name: name.to_owned(),
            met: at_size.then_some(met),
            detail: detail.into(),
        });
    }

    /// What only the fleet's last status gives, the one it prints once every worker stopped
    /// (`exited.stopped`): the connections it reset, when the run asked for resets
    /// (`reset_every`), and the verdict "no worker gave up". A fleet that never printed it
    /// (it ended, or was killed, first) leaves both unknown, not the last counts it printed
    /// before: `connections_reset` null (the Markdown says unknown), and the verdict failed.
    pub fn fleet_last_counts(
        &mut self,
        exited: &super::procs::Exited,
        reset_every: Option<std::time::Duration>,
    ) {
        let last = exited.stopped.then_some(&exited.status);
        if let Some(every) = reset_every {
            self.reset_every_ms = Some(every.as_secs_f64() * 1000.0);
            self.connections_reset = last.map(|s| s.resets);
        }
        match last {
            Some(s) => self.verdict(
                "no worker gave up",
                s.failed == 0,
                format!("{} workers failed", s.failed),
            ),
            None => self.verdict(
                "no worker gave up",
                false,
                format!(
                    "unknown: the fleet never printed its last status ({} workers had failed \
                     by the last status it printed)",
                    exited.status.failed
                ),
            ),
        }
    }

    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.pass)
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# tether stress: {} ({} workers, {:.1} s)\n",
            self.scenario, self.workers, self.elapsed_s
        );
        let _ = writeln!(s, "`{}`\n", self.command);
        let _ = writeln!(s, "| figure | value |\n|---|---|");
        let mut row = |name: &str, v: String| {
            let _ = writeln!(s, "| {name} | {v} |");
        };
        let dist = |d: &Dist| {
            format!(
                "p50 {:.1} / p95 {:.1} / p99 {:.1} / max {:.1} (n={})",
                d.p50, d.p95, d.p99, d.max, d.count
            )
        };
        row("security", self.security.clone());
        row("durability", self.durability.clone());
        if let Some(v) = self.mac_sessions.filter(|&n| n > 0) {
            row("sessions with integrity tags", v.to_string());
        }
        if let Some(v) = self.connects_per_s {
            row("connects per second", format!("{v:.0}"));
        }
        if let Some(d) = &self.time_to_register_ms {
            row("time until registered, ms", dist(d));
        }
        if let Some(v) = &self.cut {
            row("cut", v.clone());
        }
        if let Some(d) = &self.reconnect_after_ready_ms {
            row(
                "re-registered after the cut cleared on its path, ms",
                dist(d),
            );
        }
        if let Some(n) = self.reregistered_before_cleared {
            row(
                "re-registered before the run stamped the cut's clearing (times below 0)",
                n.to_string(),
            );
        }
        if let Some(d) = &self.reconnect_beyond_delay_ms {
            row(
                "re-registered past the end of the backoff delay current when the cut cleared on its path (or past the clearing, if later), ms",
                dist(d),
            );
        }
        if let Some(d) = &self.reconnect_attempts {
            row("connection attempts to come back, per worker", dist(d));
        }
        if let Some(d) = &self.reconnect_attempt_ms {
            row("successful reconnect attempt, ms", dist(d));
        }
        if let Some(v) = self.reconnect_window_ms {
            row("workers' reconnect jitter window, ms", format!("{v:.0}"));
        }
        if let Some(v) = self.messages_per_s {
            row("worker messages handled per second", format!("{v:.0}"));
        }
        if let Some(v) = self.offered_per_s {
            row("state updates offered per second", format!("{v:.0}"));
        }
        if let Some(v) = self.messages_per_frame {
            row("worker messages per frame", format!("{v:.2}"));
        }
        if let Some(v) = self.compact_acked_share {
            row(
                "worker messages acknowledged in `acks`, %",
                format!("{:.1}", v * 100.0),
            );
        }
        if let (Some(waits), Some(workers)) = (self.send_window_waits, self.workers_window_waited) {
            row(
                "waits for a worker's send window (workers that waited)",
                format!("{waits} ({workers})"),
            );
        }
        if let Some(d) = &self.send_rate_kb_s {
            row("workers' measured link, kB/s", dist(d));
        }
        if let Some(d) = &self.message_latency_ms {
            row(
                "message latency (from when due to the ack, behind the commits before it), ms",
                dist(d),
            );
        }
        if let Some(v) = self.tasks_per_s {
            row("tasks per second end to end", format!("{v:.0}"));
        }
        row("tasks", self.tasks.to_string());
        if let Some(v) = self.workers_replaced {
            row(
                "workers replaced (left and joined), coordinator's count",
                v.to_string(),
            );
        }
        if let Some(v) = self.drained_workers {
            row("workers drained under the load", v.to_string());
        }
        if let Some(d) = &self.drain_to_idle_ms {
            row("from a drain until its worker held no task, ms", dist(d));
        }
        if let Some(v) = self.checkpoints {
            row("checkpoints written", v.to_string());
        }
        if let Some(v) = self.resumed_from_checkpoint {
            row("executions resumed from a checkpoint", v.to_string());
        }
        if let Some(d) = &self.high_priority_wait_ms {
            row("high-priority queue wait, ms", dist(d));
        }
        if let Some(d) = &self.low_priority_wait_ms {
            row("low-priority queue wait, ms", dist(d));
        }
        row(
            "coordinator CPU seconds",
            format!("{:.2}", self.coordinator_cpu_s),
        );
        row("fleet CPU seconds", format!("{:.2}", self.fleet_cpu_s));
        if let Some(v) = self.fleet_peak_rss_kib {
            row("fleet peak RSS, MiB", format!("{:.1}", v as f64 / 1024.0));
        }
        // Always shown: a row left out would read as none aborted.
        row(
            "workers the fleet aborted at its exit",
            match self.fleet_workers_aborted {
                Some(n) => n.to_string(),
                None => ABORTED_UNKNOWN.to_owned(),
            },
        );
        if let Some(v) = self.proxy_cpu_s {
            row("fault proxies' CPU seconds", format!("{v:.2}"));
        }
        if let Some(v) = self.proxy_peak_rss_kib {
            row("fault proxies' peak RSS, KiB (summed)", v.to_string());
        }
        if let Some(f) = &self.cut_fault {
            row(
                "the cut's fault",
                format!(
                    "{} connections touched, {} reset, {} bytes swallowed",
                    f.connections_affected, f.connections_reset, f.bytes_dropped
                ),
            );
        }
        if let Some(n) = self.fleet_nice.filter(|&n| n != 0) {
            row("fleet niceness", n.to_string());
        }
        if let Some(ms) = self.idle_coalesce_ms {
            row("coordinator idle coalescing, ms", format!("{ms}"));
        }
        if let Some(n) = self.compressed_frames {
            row("frames compressed (coordinator, both ways)", n.to_string());
        }
        if let Some(v) = self.coordinator_us_per_message {
            row(
                "coordinator CPU per handled message (window), µs",
                format!("{v:.1}"),
            );
        }
        if let Some(v) = self.fleet_us_per_message {
            row(
                "fleet CPU per handled message (window), µs",
                format!("{v:.1}"),
            );
        }
        if let Some(v) = self.coordinator_us_per_task {
            row(
                "coordinator CPU per task (first submission until every task ended), µs",
                format!("{v:.1}"),
            );
        }
        if let Some(v) = self.idle_cpu_pct {
            row("coordinator idle CPU, % of one core", format!("{v:.2}"));
        }
        if let Some(v) = self.idle_frames_per_s {
            row(
                "worker frames read per second (idle window)",
                format!("{v:.0}"),
            );
        }
        if let Some(v) = self.idle_us_per_frame {
            row(
                "coordinator CPU per frame read (idle window), µs",
                format!("{v:.1}"),
            );
        }
        row(
            "coordinator peak RSS, MiB",
            format!("{:.1}", self.coordinator_peak_rss_kib as f64 / 1024.0),
        );
        if let Some(v) = self.memory_per_worker_kib {
            row(
                "coordinator memory per connected worker, KiB",
                format!("{v:.2}"),
            );
        }
        let machine = |p: &super::machine::Probe| {
            let load = p
                .load_1m
                .map(|l| format!(", load {l:.2}"))
                .unwrap_or_default();
            let loopback = p
                .loopback_us
                .map(|l| format!(", loopback {l:.1} µs"))
                .unwrap_or_default();
            format!(
                "codec {:.2} µs{loopback}, memory {:.0} ns{load}",
                p.codec_us, p.memory_ns
            )
        };
        if let (Some(b), Some(a)) = (&self.machine_before, &self.machine_after) {
            row(
                "machine probe (a state update encoded and decoded; a 1 KiB loopback round \
                 trip; a random load in 32 MiB), before / after",
                format!("{} / {}", machine(b), machine(a)),
            );
        }
        row("lost", self.lost.to_string());
        row("recorded twice", self.recorded_twice.to_string());
        if let Some(n) = self.results_duplicate {
            row(
                "results sent again and answered duplicate (not recorded twice)",
                n.to_string(),
            );
        }
        if let Some(n) = self.checkpoint_messages_duplicate {
            row(
                "checkpoint messages sent again and answered duplicate",
                n.to_string(),
            );
        }
        let resets = match (self.connections_reset, self.reset_every_ms) {
            (Some(n), _) => Some(n.to_string()),
            (None, Some(_)) => Some(
                "unknown: the fleet never printed its last status, which counts them".to_owned(),
            ),
            (None, None) => None,
        };
        if let Some(v) = resets {
            row("connections reset by the fleet (--reset-every)", v);
        }
        row("ended failed", self.failed.to_string());
        row(
            "results kept as stale (an attempt whose lease had ended)",
            self.stale_results.to_string(),
        );
        if let Some(n) = self.tasks_run_again {
            row(
                "tasks run more than once (attempts, or a result kept stale)",
                n.to_string(),
            );
        }
        if let Some(n) = self.completed_results_discarded {
            row(
                "completed results thrown away (kept stale, the task run again)",
                n.to_string(),
            );
        }
        let _ = writeln!(s, "\n## Verdicts\n");
        for v in &self.verdicts {
            let mark = if v.pass { "PASS" } else { "FAIL" };
            let _ = writeln!(s, "- {mark} {}: {}", v.name, v.detail);
        }
        if !self.targets.is_empty() {
            let _ = writeln!(s, "\n## Targets (issue 5; informative)\n");
            for t in &self.targets {
                let mark = match t.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "n/a (not at the target's size or rate)",
                };
                let _ = writeln!(s, "- {mark} {}: {}", t.name, t.detail);
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}

/// The workers the fleet aborted at its exit, as the Markdown says them when the fleet never
/// printed the last status that counts them.
const ABORTED_UNKNOWN: &str = "unknown: the fleet never printed its last status, which counts them";

/// Handled messages a second that `message_flood`'s 200,000 a second target asks for.
pub const TOP_RATE: f64 = 200_000.0;

/// Whether a flood's p99 speaks to the target "p99 under 10 ms at half the top rate": a run
/// that handled about half of [`TOP_RATE`] (95 to 110 %), or more with the p99 under 10 ms
/// (which meets it at a harder rate). Far below half the rate a p99 under 10 ms shows nothing,
/// and well above it a p99 over 10 ms fails nothing.
pub fn at_half_rate(handled_per_s: f64, p99_ms: f64) -> bool {
    let half = TOP_RATE / 2.0;
    handled_per_s >= 0.95 * half && (handled_per_s <= 1.1 * half || p99_ms < 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_half_rate_latency_target_applies_at_half_the_top_rate_or_above_when_met() {
        // --rate 100: what is handled is a little under what is asked.
        assert!(at_half_rate(98_000.0, 14.0));
        assert!(at_half_rate(98_000.0, 8.0));
        assert!(at_half_rate(110_000.0, 14.0));
        // Below: a low p99 at a tenth of the rate shows nothing.
        assert!(!at_half_rate(10_000.0, 5.0));
        assert!(!at_half_rate(94_000.0, 14.0));
        // Above: met at a harder rate, or says nothing.
        assert!(at_half_rate(180_000.0, 9.0));
        assert!(!at_half_rate(180_000.0, 40.0));
    }

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_hundred() {
        let d = Dist::of((1..=100).map(f64::from).collect()).expect("non-empty");
        assert_eq!((d.p50, d.p95, d.p99, d.max), (50.0, 95.0, 99.0, 100.0));
        assert!(Dist::of(Vec::new()).is_none());
    }

    /// steady_load's CPU per task is over the whole run, from the first submission until
    /// every task ended (the drain and the churn in it), not its window of submissions.
    #[test]
    fn the_cpu_per_task_row_says_the_span_it_is_over() {
        let r = Report {
            coordinator_us_per_task: Some(39.2),
            ..Report::default()
        };
        let text = r.markdown();
        assert!(
            text.contains("coordinator CPU per task (first submission until every task ended), µs"),
            "{text}"
        );
        assert!(!text.contains("per task (window)"), "{text}");
    }

    /// A worker back before the run stamped the cut's clearing reads below 0 ms; the report
    /// counts them, so a distribution starting below 0 is explained.
    #[test]
    fn workers_back_before_the_clearing_was_stamped_are_counted_in_the_report() {
        let r = Report {
            reconnect_after_ready_ms: Dist::of(vec![-12.5, 40.0, 300.0]),
            reregistered_before_cleared: Some(1),
            ..Report::default()
        };
        let text = r.markdown();
        assert!(
            text.contains(
                "| re-registered before the run stamped the cut's clearing (times below 0) | 1 |"
            ),
            "{text}"
        );
        assert!(text.contains("max 300.0 (n=3)"), "{text}");
        let json = serde_json::to_value(&r).expect("JSON");
        assert_eq!(json["reregistered_before_cleared"], 1);
        assert_eq!(json["reconnect_after_ready_ms"]["p50"], 40.0);
    }

    /// The row of the connections the fleet reset, in the Markdown.
    const RESETS_ROW: &str = "| connections reset by the fleet (--reset-every) |";

    /// The verdict named `name` in the report's JSON.
    fn verdict_of<'a>(json: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
        json["verdicts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no verdict {name:?}: {json:#}"))
    }

    /// A fleet killed, ended with a failure, or exited cleanly without printing its last
    /// status (the one counted once its workers stopped) gets a report all the same, as the
    /// run builds it; what only that status counts is unknown there, not the counts it printed
    /// before (7 resets, no worker failed) nor 0: the connections it reset are null in the
    /// JSON and "unknown" in the Markdown, "no worker gave up" fails as unknown, and so the
    /// run fails (its exit code and the JSON's `passed` follow [`Report::passed`]).
    #[cfg(unix)]
    #[test]
    fn a_fleet_without_its_last_status_leaves_its_resets_and_workers_given_up_unknown() {
        use super::super::fleet::Status;
        use super::super::procs::Exited;
        use super::super::scenarios::fleet_end;
        use std::os::unix::process::ExitStatusExt;
        use std::time::Duration;
        let printed = Status {
            started: 5,
            failed: 0,
            resets: 7,
            ..Status::default()
        };
        let ended = |killed_after, exit_status| Exited {
            status: printed.clone(),
            usage: None,
            killed_after,
            exit_status,
            stopped: false,
        };
        for exited in [
            ended(Some(Duration::from_secs(30)), None),
            ended(None, Some(std::process::ExitStatus::from_raw(3 << 8))),
            ended(None, Some(std::process::ExitStatus::from_raw(0))),
        ] {
            let mut r = Report::default();
            r.verdict(
                "lost",
                true,
                "0 of 10 acknowledged tasks without a counted result",
            );
            r.fleet_last_counts(&exited, Some(Duration::from_millis(200)));
            // By this verdict alone, before the fleet's own.
            assert!(!r.passed(), "{exited:?}: {:?}", r.verdicts);
            fleet_end(&mut r, &exited, 1.0);
            assert!(!r.passed());
            let text = r.markdown();
            assert!(
                text.contains(&format!(
                    "{RESETS_ROW} unknown: the fleet never printed its last status"
                )),
                "{exited:?}: {text}"
            );
            assert!(
                text.contains(
                    "- FAIL no worker gave up: unknown: the fleet never printed its last status"
                ),
                "{exited:?}: {text}"
            );
            let json = serde_json::to_value(&r).expect("JSON");
            assert!(json["connections_reset"].is_null(), "{exited:?}: {json:#}");
            assert_eq!(json["reset_every_ms"], 200.0);
            let gave_up = verdict_of(&json, "no worker gave up");
            assert_eq!(gave_up["pass"], false, "{exited:?}: {gave_up}");
            assert!(
                gave_up["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("unknown")),
                "{gave_up}"
            );
        }

        // With its last status, its counts stand; without --reset-every, no resets at all.
        let stopped = Exited {
            stopped: true,
            ..ended(None, Some(std::process::ExitStatus::from_raw(0)))
        };
        let mut r = Report::default();
        r.fleet_last_counts(&stopped, Some(Duration::from_millis(200)));
        assert!(r.passed(), "{:?}", r.verdicts);
        let text = r.markdown();
        assert!(text.contains(&format!("{RESETS_ROW} 7 |")), "{text}");
        assert!(
            text.contains("- PASS no worker gave up: 0 workers failed"),
            "{text}"
        );
        assert_eq!(
            serde_json::to_value(&r).expect("JSON")["connections_reset"],
            7
        );
        let mut r = Report::default();
        r.fleet_last_counts(&stopped, None);
        assert!(!r.markdown().contains(RESETS_ROW));
        let json = serde_json::to_value(&r).expect("JSON");
        assert!(json["connections_reset"].is_null() && json["reset_every_ms"].is_null());
    }

    /// The row of the workers the fleet aborted at its exit, in the Markdown.
    const ABORTED_ROW: &str = "| workers the fleet aborted at its exit |";

    /// The workers the fleet aborted at its exit are shown when its last status counted them,
    /// none included, and said unknown, with why, when it never printed that status: the row
    /// left out read as none aborted. The JSON keeps null for unknown.
    #[test]
    fn workers_the_fleet_aborted_are_shown_and_said_unknown_when_never_counted() {
        let unknown = "unknown: the fleet never printed its last status, which counts them";
        for (aborted, shown) in [(Some(0), "0"), (Some(3), "3"), (None, unknown)] {
            let r = Report {
                fleet_workers_aborted: aborted,
                ..Report::default()
            };
            let text = r.markdown();
            assert!(
                text.contains(&format!("{ABORTED_ROW} {shown} |")),
                "{aborted:?}: {text}"
            );
            assert_eq!(text.matches(ABORTED_ROW).count(), 1, "{text}");
            let json = serde_json::to_value(&r).expect("JSON");
            assert_eq!(json["fleet_workers_aborted"], serde_json::json!(aborted));
        }
    }

    #[test]
    fn a_failed_verdict_fails_the_report() {
        let mut r = Report::default();
        r.verdict("lost", true, "0");
        assert!(r.passed());
        r.verdict("recorded twice", false, "1");
        assert!(!r.passed());
        assert!(r.markdown().contains("FAIL recorded twice"));
    }
}
