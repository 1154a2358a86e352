//! The disruption schedule: which kinds a scenario uses, and a seeded plan of rounds, each
//! round every kind of the scenario once in a shuffled order with drawn targets and parameters.
//! The same seed, scenario, worker count and interval give the same plan.

use std::time::Duration;

use anyhow::bail;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tether_faultproxy::{Direction, FaultKind};

/// What a disruption does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Delay every chunk on every link.
    Latency,
    /// Squeeze one worker's link to a few KB/s.
    Bandwidth,
    /// Drop everything on one worker's link, no FIN, no RST.
    Blackhole,
    /// RST one worker's link.
    Reset,
    /// Cut one worker's link after a few bytes.
    LimitData,
    /// Split every chunk into small pieces with delays.
    Slicer,
    /// Loss as TCP shows it: chunks held at random.
    Stall,
    /// Flip bits on one worker's link.
    Corrupt,
    /// The whole proxy goes down (listener closed, every link cut), then up.
    ProxyDown,
    /// SIGKILL one worker process; restart it on the same state directory.
    WorkerKill,
    /// SIGTERM one worker process (a graceful stop: what it could not finish moves at once);
    /// restart it on the same state directory.
    WorkerStop,
    /// SIGKILL the coordinator; restart it on the same data directory and port.
    CoordinatorKill,
    /// Drop everything on the link of one worker that holds a lease, past the coordinator's
    /// lost-after: its leases move to other workers while it runs on, and what it finished
    /// meanwhile comes back after its lease moved (adopted, or kept stale once another
    /// attempt started).
    LeaseLoss,
    /// Hold both FINs of one worker's link (`slow_close`) while that worker stops gracefully
    /// (SIGTERM) and starts again: its old link outlives its process, and the new session
    /// opens beside it.
    SlowClose,
    /// An operator's drain of one worker through the API (`POST .../drain`), held, then
    /// undrained: a wave of tasks goes in while it is drained, none may start on it, and no
    /// session may end for it.
    Drain,
    /// Kernel-made (`--netns`): one worker's veth link down, TCP left to retransmit into
    /// nothing, then up.
    LinkDown,
    /// Kernel-made (`--netns`): one worker's veth paced to a few kilobits per second both ways
    /// by a token-bucket filter, which drops what overflows its short queue.
    LinkCrawl,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Latency,
        Kind::Bandwidth,
        Kind::Blackhole,
        Kind::Reset,
        Kind::LimitData,
        Kind::Slicer,
        Kind::Stall,
        Kind::Corrupt,
        Kind::ProxyDown,
        Kind::WorkerKill,
        Kind::WorkerStop,
        Kind::CoordinatorKill,
        Kind::LeaseLoss,
        Kind::SlowClose,
        Kind::Drain,
    ];

    /// Kinds that need `--netns`.
    pub const KERNEL: [Kind; 2] = [Kind::LinkDown, Kind::LinkCrawl];

    /// Every kind there is.
    pub fn every() -> impl Iterator<Item = Kind> {
        Kind::ALL.into_iter().chain(Kind::KERNEL)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Latency => "latency",
            Kind::Bandwidth => "bandwidth",
            Kind::Blackhole => "blackhole",
            Kind::Reset => "reset",
            Kind::LimitData => "limit_data",
            Kind::Slicer => "slicer",
            Kind::Stall => "stall",
            Kind::Corrupt => "corrupt",
            Kind::ProxyDown => "proxy_down",
            Kind::WorkerKill => "worker_kill",
            Kind::WorkerStop => "worker_stop",
            Kind::CoordinatorKill => "coordinator_kill",
            Kind::LeaseLoss => "lease_loss",
            Kind::SlowClose => "slow_close",
            Kind::Drain => "drain",
            Kind::LinkDown => "link_down",
            Kind::LinkCrawl => "link_crawl",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::every().find(|k| k.as_str() == s)
    }

    /// Whether the disruption must end the sessions of the workers it affects. The others
    /// must fire; of those, the ones that [`Kind::rides_through`] must leave every session
    /// up, and the rest may end some (and every session ended must come back).
    pub fn cuts(self) -> bool {
        matches!(
            self,
            Kind::Blackhole
                | Kind::Reset
                | Kind::LimitData
                | Kind::ProxyDown
                | Kind::WorkerKill
                | Kind::WorkerStop
                | Kind::CoordinatorKill
                | Kind::LeaseLoss
                | Kind::SlowClose
                | Kind::LinkDown
        )
    }

    /// Whether something independent of the run shows that the disruption was noticed: a
    /// session it ended in the worker's own log, the coordinator's disconnect, frames it
    /// counted undecodable. The slow links (latency, bandwidth, slicer, stall, link_crawl) end
    /// nothing on purpose: nothing records noticing them, and their detection is not
    /// applicable rather than taken to be their firing; nor does a drain, which is no fault.
    pub fn detectable(self) -> bool {
        !matches!(
            self,
            Kind::Latency
                | Kind::Bandwidth
                | Kind::Slicer
                | Kind::Stall
                | Kind::LinkCrawl
                | Kind::Drain
        )
    }

    /// Whether every session must live through it: a drain (no network fault at all), and the
    /// slow links that slow a link without ever leaving it silent for long. Latency of at
    /// most 450 ms each way is well inside the worker's 1.5 s liveness timeout (which grows
    /// with the measured round trip); the slicer passes tens of kilobytes a second and a
    /// bandwidth fault 2 to 8 KB/s, well above what
    /// heartbeats and small task messages need, and far below the counter task's checkpoints
    /// (600 KB of noise, a piece of it taking longer than the timeout): their sessions live
    /// because a frame still arriving counts as life on both sides (docs/PROTOCOL.md section
    /// 4; before that, they were lost in most runs). Each is held past that timeout
    /// ([`past_liveness`]), or no silence could outlast it and losing none would show nothing.
    /// Not among them, since they can end a live session by design:
    /// `stall`, whose holds stack (the proxy reads ahead and draws for every queued chunk, so
    /// four or five holds of 400 ms in a row, about one draw in a hundred, are a silence past
    /// the timeout before it has grown), and `link_crawl`, whose filter drops packets and so
    /// doubles TCP's retransmission timer past the timeout.
    pub fn rides_through(self) -> bool {
        matches!(
            self,
            Kind::Latency | Kind::Bandwidth | Kind::Slicer | Kind::Drain
        )
    }

    /// Whether it is an operator's action through the API, not a fault: none of `network`.
    pub fn operator(self) -> bool {
        self == Kind::Drain
    }

    /// Whether it ends a process (a kill, or a worker's graceful stop): none of `network`.
    pub fn ends_a_process(self) -> bool {
        matches!(
            self,
            Kind::WorkerKill | Kind::WorkerStop | Kind::CoordinatorKill | Kind::SlowClose
        )
    }

    /// Whether the worker it aims at stops and starts again (its sessions end with its
    /// process, not through the network).
    pub fn restarts_its_worker(self) -> bool {
        matches!(self, Kind::WorkerKill | Kind::WorkerStop | Kind::SlowClose)
    }

    /// Whether it aims at one worker (the others aim at every worker).
    pub fn targeted(self) -> bool {
        matches!(
            self,
            Kind::Bandwidth
                | Kind::Blackhole
                | Kind::Reset
                | Kind::LimitData
                | Kind::Corrupt
                | Kind::WorkerKill
                | Kind::WorkerStop
                | Kind::LeaseLoss
                | Kind::SlowClose
                | Kind::Drain
                | Kind::LinkDown
                | Kind::LinkCrawl
        )
    }
}

/// The kinds of a `--scenario`: `all`, `network` (proxy faults only), `crash` (the two kills),
/// `kernel` (faults made by the kernel), or a comma-separated list of kind names. With
/// `netns`, `all` includes the kernel-made kinds; without, they are refused.
pub fn scenario_kinds(scenario: &str, netns: bool) -> anyhow::Result<Vec<Kind>> {
    let kinds = match scenario {
        "all" if netns => Kind::every().collect(),
        "all" => Kind::ALL.to_vec(),
        "kernel" => Kind::KERNEL.to_vec(),
        "network" => Kind::ALL
            .into_iter()
            .filter(|k| !k.ends_a_process() && !k.operator())
            .collect(),
        "crash" => vec![Kind::WorkerKill, Kind::CoordinatorKill],
        list => {
            let mut v = Vec::new();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                match Kind::parse(name) {
                    Some(k) if !v.contains(&k) => v.push(k),
                    Some(_) => {}
                    None => bail!(
                        "unknown disruption {name:?}; use all, network, crash, kernel, or a list of: {}",
                        Kind::every()
                            .map(Kind::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            }
            v
        }
    };
    if kinds.is_empty() {
        bail!("the scenario {scenario:?} has no disruption");
    }
    if !netns && let Some(k) = kinds.iter().find(|k| Kind::KERNEL.contains(k)) {
        bail!(
            "{} is made by the kernel and needs --netns (root, iproute2)",
            k.as_str()
        );
    }
    Ok(kinds)
}

/// Kinds that another worker must answer: a `lease_loss` fires when one of the lost worker's
/// tasks started elsewhere, a `drain` is put to the test by tasks starting elsewhere.
pub const NEED_ANOTHER_WORKER: [Kind; 2] = [Kind::LeaseLoss, Kind::Drain];

/// `kinds` of `scenario` for a fleet of `workers`: with one worker, the kinds that need
/// another ([`NEED_ANOTHER_WORKER`]) are left out of a named scenario (`all`, `network`), and
/// refused in a list that names them. The kinds kept, and those left out.
pub fn for_fleet(
    mut kinds: Vec<Kind>,
    scenario: &str,
    workers: usize,
) -> anyhow::Result<(Vec<Kind>, Vec<Kind>)> {
    if workers >= 2 {
        return Ok((kinds, Vec::new()));
    }
    let (out, kept): (Vec<Kind>, Vec<Kind>) = kinds
        .drain(..)
        .partition(|k| NEED_ANOTHER_WORKER.contains(k));
    let named = ["all", "network", "crash", "kernel"].contains(&scenario);
    if !out.is_empty() && !named {
        bail!(
            "{} need(s) at least 2 workers (another must take the tasks): use --workers 2 or more",
            out.iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if kept.is_empty() {
        bail!("the scenario {scenario:?} has no disruption for a fleet of one worker");
    }
    Ok((kept, out))
}

/// One planned disruption.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Disruption {
    pub index: usize,
    pub kind: Kind,
    /// Index of the targeted worker (0-based) for targeted kinds.
    pub target: Option<usize>,
    /// The proxy fault, for kinds made by the proxy.
    pub fault: Option<FaultKind>,
    /// The kernel's pace in bits per second, for `link_crawl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u32>,
    pub direction: Direction,
    /// How long a timed fault stays, or how long a killed process or the proxy stays down.
    /// Faults that must fire or be detected stay until then (bounded by `MAX_HOLD`).
    #[serde(with = "humantime_ms")]
    pub hold: Duration,
}

/// Bit flips per byte of `corrupt` without integrity tags: high on purpose, every frame it
/// touches is garbled beyond parsing. A low rate can flip one digit of a JSON value into
/// another digit, which nothing above TCP detects without tags (docs/ARCHITECTURE.md,
/// "End-to-end run").
pub const CORRUPT_RATE: f64 = 0.2;
/// Bit flips per byte of `corrupt` with integrity tags (`--message-mac`): low, so that most
/// damaged frames still parse, and only the tags tell them from genuine ones.
pub const CORRUPT_RATE_TAGGED: f64 = 0.002;

/// The paces of `link_crawl`, bits per second each way: below what a worker's heartbeats
/// alone put on its link (every 250 ms, about 5.4 kbit/s; with its tasks' messages 8 to 14
/// kbit/s were seen), so that the filter holds its packets back. At 8 to 24 kbit/s, as
/// before, two `--netns` runs of three passed a 2.5 s crawl within the bucket's first burst
/// and never met the filter.
pub const CRAWL_RATES: std::ops::RangeInclusive<u32> = 1_500..=4_000;

/// Longest a disruption that waits to fire or be detected stays in place.
pub const MAX_HOLD: Duration = Duration::from_secs(20);

/// How far past the worker's liveness timeout a disruption every session must ride through
/// stays on at least, and how long after the last disruption's removal the run still charges
/// a lost session to it.
pub const PAST_LIVENESS: Duration = Duration::from_secs(1);

/// The least hold of a kind that [`Kind::rides_through`], and the least window of the last
/// disruption: the worker's liveness timeout and [`PAST_LIVENESS`]. A slow link held for less
/// than the timeout could never leave a silence long enough to end a session, and the check
/// that every session rode through it would pass whether or not a frame still arriving counts
/// as life (paced chunks flush at once when the fault goes).
pub fn past_liveness() -> Duration {
    super::procs::TIMINGS.worker_liveness() + PAST_LIVENESS
}

/// The longest a `lease_loss` blackhole stays: until the coordinator declares its worker lost
/// (its heartbeat timeout, then its lost-after) and one of the worker's tasks started on
/// another worker, which [`MAX_HOLD`] bounds.
pub fn lease_loss_hold() -> Duration {
    super::procs::TIMINGS.coordinator_grace() + MAX_HOLD
}

/// The disruption kind that schedules each of the proxy's fault kinds. The match has no
/// wildcard: a fault kind added to the proxy does not compile here until the plan uses it
/// (and `every_fault_kind_of_the_proxy_is_in_every_full_plan` holds the plan to it).
pub fn kind_of_fault(f: &FaultKind) -> Kind {
    match f {
        FaultKind::Latency { .. } => Kind::Latency,
        FaultKind::Bandwidth { .. } => Kind::Bandwidth,
        FaultKind::Blackhole => Kind::Blackhole,
        FaultKind::Reset { .. } => Kind::Reset,
        FaultKind::LimitData { .. } => Kind::LimitData,
        FaultKind::Slicer { .. } => Kind::Slicer,
        FaultKind::SlowClose { .. } => Kind::SlowClose,
        FaultKind::Corrupt { .. } => Kind::Corrupt,
        FaultKind::Stall { .. } => Kind::Stall,
    }
}

/// The most disruptions a plan holds. The plan is built in full before the run starts (the
/// report lists it), so `--duration 24h --disruption-interval 1ms` asked for 86 million of
/// them, gigabytes, before the first ran. A disruption is held at least 300 ms and then waits
/// for the fleet to be whole again: no run gets through more than a few a second, and this is
/// more than a day at one a second.
pub const MAX_PLANNED: u128 = 100_000;

/// How many rounds of `kinds` kinds the plan of a run holds: enough for one disruption to start
/// every `interval` for `duration` (an interval under a millisecond counts as one), and at
/// least one (the first round always runs to its end). A plan of more than [`MAX_PLANNED`]
/// disruptions is refused, naming the flags that asked for it.
pub fn rounds(kinds: usize, duration: Duration, interval: Duration) -> anyhow::Result<usize> {
    let per_round = kinds.max(1) as u128;
    let slots = duration.as_millis() / interval.as_millis().max(1);
    let rounds = slots.div_ceil(per_round).max(1);
    let planned = rounds * per_round;
    if planned > MAX_PLANNED {
        bail!(
            "--duration {} with --disruption-interval {} plans {planned} disruptions ({rounds} \
             rounds of {per_round}), more than the {MAX_PLANNED} a run holds (the plan is built \
             before the run): lengthen --disruption-interval or shorten --duration",
            humantime::format_duration(duration),
            humantime::format_duration(interval),
        );
    }
    // At most MAX_PLANNED: it fits.
    Ok(usize::try_from(rounds)?)
}

/// Rounds of the scenario's kinds, each shuffled, `rounds` of them.
pub fn plan(
    kinds: &[Kind],
    rounds: usize,
    workers: usize,
    interval: Duration,
    seed: u64,
    corrupt_rate: f64,
) -> Vec<Disruption> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let timed = (interval / 2).clamp(Duration::from_secs(1), Duration::from_secs(5));
    let ride = past_liveness();
    let mut out = Vec::new();
    for _ in 0..rounds.max(1) {
        let mut round = kinds.to_vec();
        round.shuffle(&mut rng);
        for kind in round {
            let target = kind.targeted().then(|| rng.random_range(0..workers.max(1)));
            let ms = |rng: &mut SmallRng, lo: u64, hi: u64| {
                Duration::from_millis(rng.random_range(lo..=hi))
            };
            let rate_bps = (kind == Kind::LinkCrawl).then(|| rng.random_range(CRAWL_RATES));
            let (fault, direction, hold) = match kind {
                Kind::Latency => (
                    Some(FaultKind::Latency {
                        latency_ms: rng.random_range(150..=400),
                        jitter_ms: 50,
                    }),
                    Direction::Both,
                    timed,
                ),
                Kind::Bandwidth => (
                    Some(FaultKind::Bandwidth {
                        bytes_per_sec: rng.random_range(2_000..=8_000),
                    }),
                    Direction::Both,
                    timed,
                ),
                Kind::Blackhole => (Some(FaultKind::Blackhole), Direction::Both, MAX_HOLD),
                Kind::Reset => (
                    Some(FaultKind::Reset { timeout_ms: 0 }),
                    Direction::Both,
                    MAX_HOLD,
                ),
                Kind::LimitData => (
                    Some(FaultKind::LimitData {
                        bytes: rng.random_range(256..=2_048),
                    }),
                    Direction::Upstream,
                    MAX_HOLD,
                ),
                Kind::Slicer => (
                    Some(FaultKind::Slicer {
                        average_size: 16,
                        size_variation: 8,
                        delay_us: 500,
                    }),
                    Direction::Both,
                    timed,
                ),
                Kind::Stall => (
                    Some(FaultKind::Stall {
                        loss_rate: 0.3,
                        stall_ms: rng.random_range(100..=400),
                    }),
                    Direction::Both,
                    timed,
                ),
                Kind::Corrupt => (
                    Some(FaultKind::Corrupt { rate: corrupt_rate }),
                    Direction::Both,
                    MAX_HOLD,
                ),
                // Held until the coordinator took the worker for lost and another worker took
                // one of its tasks (`disrupt`), at most this long.
                Kind::LeaseLoss => (
                    Some(FaultKind::Blackhole),
                    Direction::Both,
                    lease_loss_hold(),
                ),
                // The hold is the FINs' delay: the run waits that long, and a little more, for
                // the stopped worker's old link to close.
                Kind::SlowClose => {
                    let delay = ms(&mut rng, 1_000, 2_500);
                    (
                        Some(FaultKind::SlowClose {
                            delay_ms: delay.as_millis() as u64,
                        }),
                        Direction::Both,
                        delay,
                    )
                }
                Kind::ProxyDown => (None, Direction::Both, ms(&mut rng, 800, 1_500)),
                Kind::WorkerKill | Kind::WorkerStop | Kind::CoordinatorKill => {
                    (None, Direction::Both, ms(&mut rng, 300, 1_000))
                }
                // Until both sides declared the silent link dead, like a blackhole.
                Kind::LinkDown => (None, Direction::Both, MAX_HOLD),
                Kind::LinkCrawl => (None, Direction::Both, timed),
                // At least past the liveness timeout ([`Kind::rides_through`]).
                Kind::Drain => (None, Direction::Both, timed),
            };
            // Each proxy fault is scheduled by its own kind (a lease loss is a blackhole held
            // longer).
            debug_assert!(fault.as_ref().is_none_or(|f| {
                let by = kind_of_fault(f);
                by == kind || (kind, by) == (Kind::LeaseLoss, Kind::Blackhole)
            }));
            let hold = if kind.rides_through() {
                hold.max(ride)
            } else {
                hold
            };
            out.push(Disruption {
                index: out.len(),
                kind,
                target,
                fault,
                rate_bps,
                direction,
                hold,
            });
        }
    }
    out
}

/// Durations as whole milliseconds in JSON.
mod humantime_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// One worker cannot answer a lease loss or a drain: a named scenario leaves them out, a
    /// list that names them is refused; two workers keep every kind.
    #[test]
    fn the_kinds_that_need_another_worker_are_left_out_or_refused_with_one() {
        let all = scenario_kinds("all", false).expect("all");
        let (kept, out) = for_fleet(all.clone(), "all", 1).expect("all, one worker");
        assert_eq!(out, [Kind::LeaseLoss, Kind::Drain]);
        assert_eq!(kept.len(), all.len() - 2);
        assert!(!kept.iter().any(|k| NEED_ANOTHER_WORKER.contains(k)));
        assert_eq!(for_fleet(all.clone(), "all", 2).expect("two").0, all);
        let listed = scenario_kinds("reset,drain", false).expect("list");
        let e = for_fleet(listed.clone(), "reset,drain", 1).expect_err("refused");
        assert!(
            e.to_string().contains("drain need(s) at least 2 workers"),
            "{e}"
        );
        assert_eq!(
            for_fleet(listed.clone(), "reset,drain", 3)
                .expect("three")
                .0,
            listed
        );
        let alone = scenario_kinds("reset", false).expect("list");
        assert_eq!(for_fleet(alone, "reset", 1).expect("one").0, [Kind::Reset]);
    }

    /// The crawl's fastest pace is below what a worker's heartbeats alone put on its link at
    /// the run's heartbeat interval (the frame, its WebSocket, TCP/IP and Ethernet headers),
    /// so the filter always has packets to hold back, however quiet the worker's tasks are.
    #[test]
    fn a_crawl_is_slower_than_the_heartbeats_it_carries() {
        use tether_proto::msg::{Heartbeat, WorkerMsg, now};
        let beat = tether_proto::encode(&WorkerMsg::Heartbeat(Heartbeat {
            sequence: 1,
            active_tasks: Vec::new(),
            timestamp: now(),
        }));
        // A masked client frame's header, TCP/IP with timestamps, Ethernet.
        let wire = (beat.len() + 6 + 52 + 14) as f64;
        let every: Duration = super::super::procs::TIMINGS
            .worker_heartbeat_interval
            .parse::<humantime::Duration>()
            .expect("interval")
            .into();
        let heartbeat_bps = wire * 8.0 / every.as_secs_f64();
        assert!(
            f64::from(*CRAWL_RATES.end()) < heartbeat_bps,
            "{CRAWL_RATES:?} against {heartbeat_bps:.0} bit/s of heartbeats"
        );
        let kinds = [Kind::LinkCrawl];
        for seed in 0..50 {
            for d in plan(&kinds, 2, 4, Duration::from_secs(5), seed, CORRUPT_RATE) {
                assert!(
                    d.rate_bps.is_some_and(|r| CRAWL_RATES.contains(&r)),
                    "{d:?}"
                );
            }
        }
    }

    /// The slow links every session must live through stay on longer than the worker's
    /// liveness timeout at the intervals the suite runs (1 s and 1.5 s gave them 1 s, under
    /// the 1.5 s timeout: no silence could outlast it, and `slow_links_ridden_through` could
    /// not fail), so that losing one is possible and the check means something.
    #[test]
    fn a_slow_link_to_ride_through_is_held_past_the_workers_liveness_timeout() {
        let timeout = super::super::procs::TIMINGS.worker_liveness();
        assert_eq!(timeout, Duration::from_millis(1_500));
        let kinds = scenario_kinds("all", false).expect("all");
        for ms in [1_000, 1_500, 4_000, 20_000] {
            for seed in 0..20 {
                let p = plan(&kinds, 1, 3, Duration::from_millis(ms), seed, CORRUPT_RATE);
                let ridden: Vec<_> = p.iter().filter(|d| d.kind.rides_through()).collect();
                assert_eq!(ridden.len(), 4);
                for d in ridden {
                    assert!(d.hold >= timeout + PAST_LIVENESS, "{ms} ms: {d:?}");
                }
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_plan_and_every_round_has_every_kind() {
        let kinds = scenario_kinds("all", false).expect("all");
        let a = plan(&kinds, 3, 4, Duration::from_secs(4), 9, CORRUPT_RATE);
        let b = plan(&kinds, 3, 4, Duration::from_secs(4), 9, CORRUPT_RATE);
        let c = plan(&kinds, 3, 4, Duration::from_secs(4), 10, CORRUPT_RATE);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 3 * Kind::ALL.len());
        for round in a.chunks(Kind::ALL.len()) {
            let mut seen: Vec<Kind> = round.iter().map(|d| d.kind).collect();
            seen.sort();
            assert_eq!(seen, Kind::ALL.to_vec());
        }
        assert!(a.iter().all(|d| d.target.is_none_or(|t| t < 4)));
        assert!(a.iter().all(|d| d.kind.targeted() == d.target.is_some()));
    }

    /// Every fault kind the proxy offers (its own list of names, which its tests hold to its
    /// enum) is scheduled by every round of a full plan, by the kind [`kind_of_fault`] names:
    /// a fault kind added to the proxy and left out of the plan fails here.
    #[test]
    fn every_fault_kind_of_the_proxy_is_in_every_full_plan() {
        use tether_faultproxy::fault::KIND_NAMES;
        let kinds = scenario_kinds("all", false).expect("all");
        for seed in 0..5 {
            let p = plan(&kinds, 2, 3, Duration::from_secs(2), seed, CORRUPT_RATE);
            for round in p.chunks(kinds.len()) {
                let mut faults = BTreeSet::new();
                for d in round {
                    let Some(f) = &d.fault else { continue };
                    // A lease loss is a blackhole held longer.
                    let by = match d.kind {
                        Kind::LeaseLoss => Kind::Blackhole,
                        k => k,
                    };
                    assert_eq!(kind_of_fault(f), by, "{d:?}");
                    faults.insert(f.name());
                }
                for name in KIND_NAMES {
                    assert!(faults.contains(name), "{name} not in the plan: {faults:?}");
                }
            }
        }
    }

    #[test]
    fn a_plan_of_more_disruptions_than_a_run_holds_is_refused_naming_the_flags() {
        let s = Duration::from_secs;
        // The defaults: 24 slots of 5 s in 120 s, two rounds of the twelve kinds.
        assert_eq!(rounds(12, s(120), s(5)).expect("defaults"), 2);
        // `0s` runs the first round alone.
        assert_eq!(rounds(12, s(0), s(5)).expect("one round"), 1);
        // A day at one a second fits; at one a millisecond it was 86 million disruptions.
        assert_eq!(rounds(12, s(86_400), s(1)).expect("a day"), 7_200);
        let e = rounds(12, s(86_400), Duration::from_millis(1)).expect_err("too many");
        let said = e.to_string();
        for flag in ["--duration 1day", "--disruption-interval 1ms", "86400000"] {
            assert!(said.contains(flag), "{flag}: {said}");
        }
        // The bound itself, and one past it.
        let ms = Duration::from_millis;
        let most = u64::try_from(MAX_PLANNED).expect("bound");
        assert_eq!(rounds(1, ms(most), ms(1)).expect("the most"), most as usize);
        assert!(rounds(1, ms(most + 1), ms(1)).is_err());
        // Far past anything a usize holds: refused, not cut to one round.
        assert!(rounds(12, Duration::MAX, ms(1)).is_err());
        assert!(rounds(12, Duration::MAX, Duration::from_nanos(1)).is_err());
    }

    #[test]
    fn scenarios_name_kinds_and_unknown_names_are_refused() {
        assert_eq!(
            scenario_kinds("crash", false).expect("crash"),
            [Kind::WorkerKill, Kind::CoordinatorKill]
        );
        // `network` is proxy faults only: no process is killed or stopped, no operator acts,
        // every disruption is a fault of the proxy's or the proxy down.
        let network = scenario_kinds("network", false).expect("network");
        for k in [
            Kind::WorkerKill,
            Kind::WorkerStop,
            Kind::CoordinatorKill,
            Kind::Drain,
        ] {
            assert!(!network.contains(&k), "{k:?} in {network:?}");
        }
        for d in plan(&network, 1, 4, Duration::from_secs(4), 5, CORRUPT_RATE) {
            assert!(d.fault.is_some() || d.kind == Kind::ProxyDown, "{d:?}");
        }
        assert_eq!(network.len(), Kind::ALL.len() - 5);
        assert_eq!(
            scenario_kinds("reset, blackhole,reset", false).expect("list"),
            [Kind::Reset, Kind::Blackhole]
        );
        let e = scenario_kinds("reset,meteor", false).expect_err("unknown");
        assert!(e.to_string().contains("meteor"), "{e}");
        assert!(scenario_kinds(",", false).is_err());
        let e = scenario_kinds("link_down", false).expect_err("needs --netns");
        assert!(e.to_string().contains("--netns"), "{e}");
        assert_eq!(
            scenario_kinds("kernel", true).expect("kernel"),
            [Kind::LinkDown, Kind::LinkCrawl]
        );
        let e = scenario_kinds("link_crawl", false).expect_err("needs --netns");
        assert!(e.to_string().contains("--netns"), "{e}");
        assert!(
            scenario_kinds("all", true)
                .expect("all")
                .contains(&Kind::LinkDown)
        );
    }
}
