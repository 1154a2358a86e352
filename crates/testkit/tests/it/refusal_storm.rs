//! Storms of refused connections against a real coordinator: registrations that fail
//! authentication, registrations refused before the core hears of them (another worker's id,
//! another protocol, a frame limit too small), connections that only send frames and ones that
//! only report errors. Every one is refused, an honest worker keeps its session and its work
//! meanwhile, and the log says each (worker, kind) once at WARN and its repeats at debug,
//! numbered, as the coordinator's limiter (`ratelimit::refusal`, called where `ws` refuses or
//! logs before a registration) rules.
//!
//! The log is read from a subscriber set for this test's thread only: the test's runtime runs
//! on it (current-thread), and so do the coordinator's sessions it spawns, while other tests of
//! the binary log on their own threads. The limiter is process-wide: the ids here are used by
//! no other test.

use serde_json::json;
use tether_coordinator::auth::WorkerAuth;
use tether_proto::TaskSpec;
use tether_proto::auth::Secret;
use tether_testkit::*;

use crate::raw::{Raw, counter};
use crate::support::{CapturedLog, connected, coordinator_with};

/// The ids the storm registers as: no other test uses them, as the limiter remembers them for
/// the whole process.
const STORMERS: [&str; 2] = ["refusal-storm-a", "refusal-storm-b"];
/// Attempts of each stormer for each way it is refused.
const ROUNDS: u64 = 8;

/// What the coordinator's session logs at WARN for the first refusal of a window.
const SAID: &str = "worker authentication failed; closing with 4001";
/// What it logs at debug for a repeat within the window.
const REPEATED: &str = "worker authentication failed again; closing with 4001";

fn fleet_secret() -> Secret {
    Secret::new(b"fleet secret of the refusal storm test").expect("secret")
}

/// The coordinator's log as captured, read by worker and by reason.
struct Log(CapturedLog);

impl Log {
    /// Captures the coordinator's session log, debug and up, on this thread until the guard
    /// is dropped.
    fn capture() -> (Log, tracing::subscriber::DefaultGuard) {
        Self::capture_of("tether_coordinator::ws=debug")
    }

    /// Captures what `filter` lets through on this thread until the guard is dropped.
    fn capture_of(filter: &str) -> (Log, tracing::subscriber::DefaultGuard) {
        let (log, guard) = CapturedLog::capture(filter);
        (Log(log), guard)
    }

    /// Checks that `worker`'s lines of `reason` were said once at WARN (`said`, no repeats
    /// before it) and then `repeats` times at debug (`again`), numbered 1 to `repeats`.
    fn said_once_then_repeated(
        &self,
        (said, again): (&str, &str),
        worker: &str,
        reason: &str,
        repeats: u64,
    ) {
        let warned: Vec<String> = self
            .lines(said, worker)
            .into_iter()
            .filter(|l| l.contains(reason))
            .collect();
        assert_eq!(
            warned.len(),
            1,
            "{worker}, {reason}: said at WARN {warned:#?}"
        );
        assert!(warned[0].contains(" WARN "), "{}", warned[0]);
        assert_eq!(field(&warned[0], "repeats_at_debug"), 0, "{}", warned[0]);
        let numbered: Vec<u64> = self
            .lines(again, worker)
            .iter()
            .filter(|l| l.contains(reason))
            .map(|l| {
                assert!(l.contains(" DEBUG "), "{l}");
                field(l, "repeat")
            })
            .collect();
        assert_eq!(
            numbered,
            (1..=repeats).collect::<Vec<_>>(),
            "{worker}, {reason}: its repeats at debug"
        );
    }

    /// The lines that say `message` of `worker`.
    fn lines(&self, message: &str, worker: &str) -> Vec<String> {
        let worker = format!("worker={worker} ");
        self.all(message)
            .into_iter()
            .filter(|l| l.contains(&worker))
            .collect()
    }

    /// The lines that say `message`, of any worker.
    fn all(&self, message: &str) -> Vec<String> {
        self.0.lines(message)
    }
}

/// The number a line gives `field` (`field=12`).
fn field(line: &str, name: &str) -> u64 {
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("{name} in {line}"));
    line[at + name.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number for {name} in {line}"))
}

/// A way a registration fails its authentication.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// Signed with a secret that is not the fleet's.
    WrongSecret,
    /// Not signed.
    Unsigned,
    /// Signed with the fleet's secret at a time over an hour off, a second more each round: its
    /// reason (the skew in ms) is another text at every attempt.
    Stale,
}

/// One refused attempt of `id` (its `round`th) in `way`. Returns what the refusal said.
async fn refused(c: &TestCoordinator, id: &str, way: Way, round: u64) -> String {
    let wrong = Secret::new(b"a guess at the fleet secret, wrong").expect("secret");
    let mut raw = Raw::connect(c, id).await;
    let mut reg = raw.registration(Some(&wrong), &[]);
    match way {
        Way::WrongSecret => {}
        Way::Unsigned => drop(reg.as_object_mut().expect("object").remove("signature")),
        Way::Stale => {
            let offset = 3600 + i64::try_from(round).expect("round");
            let then = chrono::Utc::now() - chrono::Duration::seconds(offset);
            let worker = tether_proto::WorkerId::parse(id).expect("id");
            reg["timestamp"] = json!(then);
            reg["signature"] = tether_proto::auth::Challenge {
                worker: &worker,
                nonce: raw.welcome["nonce"].as_str().expect("nonce"),
                timestamp: then,
                boot_id: "b-raw",
            }
            .sign(&fleet_secret())
            .into();
        }
    }
    raw.send(&reg).await;
    let e = raw
        .next_error("unauthorized", "authentication failed")
        .await;
    assert_eq!(raw.close_code().await, Some(4001), "{id}: {e}");
    e["message"].as_str().unwrap_or_default().to_owned()
}

/// The ways of the storm, and what each is told.
const WAYS: [(Way, &str); 3] = [
    (Way::WrongSecret, "signature does not match"),
    (Way::Unsigned, "registration has no signature"),
    (Way::Stale, "registration timestamp is"),
];

#[tokio::test]
async fn a_storm_of_failed_authentications_is_refused_every_time_said_once_per_kind_at_warn_whatever_its_reason_says_and_an_honest_worker_keeps_working()
 {
    let (log, _logging) = Log::capture();
    let (_dir, c) =
        coordinator_with(|cfg| cfg.auth = Some(WorkerAuth::fleet(fleet_secret()))).await;
    let mut honest = fast_worker_config(&c.ws_url(), "refusal-storm-honest");
    honest.secret = Some(fleet_secret());
    let honest = connected(honest, tether_worker::Executors::builtin()).await;
    let client = c.client();

    let storm = async {
        for round in 0..ROUNDS {
            for id in STORMERS {
                for (way, told) in WAYS {
                    let said = refused(&c, id, way, round).await;
                    assert!(said.contains(told), "{id}: {said}");
                }
            }
        }
    };
    // Meanwhile the honest worker runs tasks, each counted once.
    let work = async {
        let specs: Vec<TaskSpec> = (0..4).map(|_| sleep_task(50, 2, 1)).collect();
        let ids = client.submit(&specs).await;
        for id in &ids {
            client.wait_status(id, "completed").await;
            assert_eq!(client.results(id).await.len(), 1, "task {id}");
        }
    };
    tokio::join!(storm, work);

    let storms = ROUNDS * (STORMERS.len() * WAYS.len()) as u64;
    let o = client.overview().await;
    assert_eq!(
        counter(&o, "auth_failures"),
        storms,
        "every attempt refused: {o}"
    );
    assert_eq!(counter(&o, "sessions_replaced"), 0, "{o}");
    assert_eq!(
        honest.handle.registrations(),
        1,
        "the honest session was kept"
    );

    // Each (stormer, way) said once at WARN, with no repeats before it; its other attempts at
    // debug, numbered 1 to ROUNDS - 1 in its window. Without the limiter, every attempt of
    // the storm is a WARN line; keyed on the reason's text, so is every stale one.
    for id in STORMERS {
        for (_, told) in WAYS {
            log.said_once_then_repeated((SAID, REPEATED), id, told, ROUNDS - 1);
        }
    }
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

/// The ids of the storm of registrations refused before the core: no other test uses them.
const MISFITS: [&str; 2] = ["refusal-storm-c", "refusal-storm-d"];

/// A way a connection to a coordinator without authentication is refused before the core hears
/// of it.
#[derive(Debug, Clone, Copy)]
enum Misfit {
    /// Frames, bad ones (malformed, of an unknown type), past those allowed before a
    /// registration.
    Chatter,
    /// A registration naming another worker than the endpoint's, a new one each time: the
    /// reason names it, so keyed on the reason each would be a first.
    OtherId,
    /// A registration of another protocol version.
    OldProtocol,
    /// A registration whose frame limit no peer could work within.
    TinyFrames,
    /// `error` frames, [`REPORTS`] an attempt, and no registration: not refused, but each a
    /// log line.
    Reporter,
}

/// The `error` frames a [`Misfit::Reporter`] sends an attempt.
const REPORTS: u64 = 3;

impl Misfit {
    const ALL: [Misfit; 5] = [
        Self::Chatter,
        Self::OtherId,
        Self::OldProtocol,
        Self::TinyFrames,
        Self::Reporter,
    ];

    /// The close code it is refused with (none for a reporter, which closes itself).
    fn code(self) -> Option<u16> {
        match self {
            Self::Chatter => Some(1008),
            Self::OtherId => Some(4003),
            Self::OldProtocol | Self::TinyFrames => Some(4002),
            Self::Reporter => None,
        }
    }

    /// The log lines it makes an attempt.
    fn lines(self) -> u64 {
        match self {
            Self::Reporter => REPORTS,
            _ => 1,
        }
    }

    /// What the WARN line says, what its repeats at debug say, and words of its reason.
    fn said(self) -> (&'static str, &'static str, &'static str) {
        const CLOSED: &str = "connection closed (1008) before its registration (its repeats";
        const CLOSED_AGAIN: &str = "connection closed (1008) before its registration, again";
        const REFUSED: &str = "registration refused (its repeats";
        const REFUSED_AGAIN: &str = "registration refused again";
        match self {
            Self::Chatter => (CLOSED, CLOSED_AGAIN, "too many frames before registration"),
            Self::OtherId => (REFUSED, REFUSED_AGAIN, "but this endpoint is for"),
            Self::OldProtocol => (REFUSED, REFUSED_AGAIN, "incompatible protocol"),
            Self::TinyFrames => (REFUSED, REFUSED_AGAIN, "frame limit too small"),
            Self::Reporter => (
                "worker reported an error before registering (its repeats",
                "worker reported an error before registering, again",
                "\"a report of the refusal storm\"",
            ),
        }
    }

    /// One attempt of `id` (its `round`th), which must be refused with its close code (a
    /// reporter's, taken to its end).
    async fn refused(self, c: &TestCoordinator, id: &str, round: u64) {
        let mut raw = Raw::connect(c, id).await;
        let mut reg = raw.registration(None, &[]);
        match self {
            Self::Chatter => {
                // One past the frames allowed before a registration (16), each answered.
                for n in 0..17 {
                    let frame = match n % 2 {
                        0 => json!({"type": "no-such-type", "n": n}),
                        _ => json!({"type": "heartbeat", "sequence": "not a number"}),
                    };
                    raw.send(&frame).await;
                }
            }
            Self::OtherId => reg["worker_id"] = format!("{id}-elsewhere-{round}").into(),
            Self::OldProtocol => {
                reg["protocol_version"] = (tether_proto::PROTOCOL_VERSION + 1).into();
            }
            Self::TinyFrames => reg["max_frame"] = 1.into(),
            Self::Reporter => {
                for _ in 0..REPORTS {
                    let now = chrono::Utc::now();
                    let e = json!({"type": "error", "code": "internal", "message": "a report of the refusal storm", "timestamp": now});
                    raw.send(&e).await;
                }
                // Answered once the reports before it were read (and logged).
                let now = chrono::Utc::now();
                raw.send(&json!({"type": "heartbeat", "sequence": 1, "timestamp": now}))
                    .await;
                raw.next_of("heartbeat").await;
                raw.ws.close(None).await.expect("close");
                return;
            }
        }
        if !matches!(self, Self::Chatter) {
            raw.send(&reg).await;
        }
        assert_eq!(
            raw.close_code().await,
            self.code(),
            "{id}, {self:?}, round {round}"
        );
    }
}

#[tokio::test]
async fn storms_of_registrations_refused_before_the_core_and_of_frames_without_one_are_refused_every_time_said_once_per_worker_and_kind_at_warn_and_an_honest_worker_keeps_working()
 {
    let (log, _logging) = Log::capture();
    let (_dir, c) = coordinator_with(|_| {}).await;
    let honest = fast_worker_config(&c.ws_url(), "refusal-storm-plain-honest");
    let honest = connected(honest, tether_worker::Executors::builtin()).await;
    let client = c.client();

    let storm = async {
        for round in 0..ROUNDS {
            for id in MISFITS {
                for way in Misfit::ALL {
                    way.refused(&c, id, round).await;
                }
            }
        }
    };
    let work = async {
        let specs: Vec<TaskSpec> = (0..4).map(|_| sleep_task(50, 2, 1)).collect();
        let ids = client.submit(&specs).await;
        for id in &ids {
            client.wait_status(id, "completed").await;
            assert_eq!(client.results(id).await.len(), 1, "task {id}");
        }
    };
    tokio::join!(storm, work);

    let o = client.overview().await;
    assert_eq!(
        counter(&o, "pre_registration_overflows"),
        ROUNDS * MISFITS.len() as u64,
        "every chatter counted: {o}"
    );
    assert_eq!(counter(&o, "registrations"), 1, "only the honest one: {o}");
    assert_eq!(counter(&o, "sessions_replaced"), 0, "{o}");
    assert_eq!(
        honest.handle.registrations(),
        1,
        "the honest session was kept"
    );

    // Each (misfit, way) said once at WARN, with no repeats before it; its other lines at
    // debug, numbered from 1 in its window. Without the limiter, every line is a WARN (and,
    // keyed on the reason, so is every OtherId one).
    for id in MISFITS {
        for way in Misfit::ALL {
            let (said, again, reason) = way.said();
            log.said_once_then_repeated((said, again), id, reason, ROUNDS * way.lines() - 1);
        }
    }
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

/// A client that makes up a new worker id at every attempt is refused every time, and its
/// refusals are said at WARN no more than the cap over the fleet allows a minute
/// (`ratelimit::WARNS_A_MINUTE`), the first past it saying so once, the rest at debug: every
/// made-up id is a first, and each was a WARN line. An honest worker keeps its session.
#[tokio::test]
async fn a_flood_of_made_up_worker_ids_is_said_at_warn_no_more_than_the_cap_a_minute_and_the_rest_at_debug()
 {
    use tether_coordinator::ratelimit::{CAP_WINDOW, WARNS_A_MINUTE};
    let (log, _logging) =
        Log::capture_of("tether_coordinator::ws=debug,tether_coordinator::ratelimit=debug");
    let (_dir, c) = coordinator_with(|_| {}).await;
    let honest = fast_worker_config(&c.ws_url(), "flood-honest");
    let honest = connected(honest, tether_worker::Executors::builtin()).await;
    let flood = 3 * WARNS_A_MINUTE;
    let began = tokio::time::Instant::now();
    for n in 0..flood {
        let id = format!("flood-made-up-{n}");
        Misfit::OldProtocol.refused(&c, &id, 0).await;
    }
    // A flood slower than a minute (a loaded machine) may say the cap again in each minute.
    let minutes = 1 + began.elapsed().as_secs() / CAP_WINDOW.as_secs();

    const REFUSED: &str = "registration refused (its repeats";
    const REFUSED_AGAIN: &str = "registration refused again";
    const CAPPED: &str = "more workers refused within a minute than said at WARN";
    let warned = log.all(REFUSED);
    assert!(warned.iter().all(|l| l.contains(" WARN ")), "{warned:#?}");
    let again = log.all(REFUSED_AGAIN);
    assert!(again.iter().all(|l| l.contains(" DEBUG ")), "{again:#?}");
    assert_eq!(
        (warned.len() + again.len()) as u64,
        flood,
        "every refusal said once, at WARN or at debug"
    );
    let capped = log.all(CAPPED);
    assert!(capped.iter().all(|l| l.contains(" WARN ")), "{capped:#?}");
    assert!(
        warned.len() as u64 <= WARNS_A_MINUTE * minutes,
        "{} WARN lines in {minutes} minute(s): {warned:#?}",
        warned.len()
    );
    if minutes == 1 {
        assert_eq!(warned.len() as u64, WARNS_A_MINUTE, "the cap, reached");
        assert_eq!(capped.len(), 1, "said once that the rest go to debug");
        assert!(
            capped[0].contains(&format!("most={WARNS_A_MINUTE}")),
            "{}",
            capped[0]
        );
    }
    let o = c.client().overview().await;
    assert_eq!(crate::raw::counter(&o, "sessions_replaced"), 0, "{o}");
    assert_eq!(
        honest.handle.registrations(),
        1,
        "the honest session was kept"
    );
    honest.stop().await.expect("clean stop");
    c.stop().await;
}

/// A worker's `error` is logged with its text in a field of its own (`error_message`), apart
/// from the line's message: in a field named `message` it was printed bare beside the line's
/// own words, one text run into the other, and a log reader keyed on `message` got either.
/// Before its registration (the session logs it) and after (the core does).
#[tokio::test]
async fn a_workers_error_is_logged_with_its_text_as_error_message_apart_from_the_lines_own_message()
{
    let (log, _logging) =
        Log::capture_of("tether_coordinator::ws=debug,tether_coordinator::core=debug");
    let (_dir, c) = coordinator_with(|_| {}).await;
    let report = |text: &str| {
        let now = chrono::Utc::now();
        json!({"type": "error", "code": "internal", "message": text, "timestamp": now})
    };
    let mut raw = Raw::connect(&c, "error-reporter").await;
    raw.send(&report("said before registering")).await;
    let reg = raw.registration(None, &[]);
    raw.send(&reg).await;
    raw.next_of("registration_ack").await;
    raw.send(&report("said once registered")).await;
    // Read by then: heartbeats are answered in order after it.
    let now = chrono::Utc::now();
    raw.send(&json!({"type": "heartbeat", "sequence": 1, "timestamp": now}))
        .await;
    raw.next_of("heartbeat").await;
    // The core logs it as it takes the frame, which the heartbeat's reply does not wait for.
    let end = tokio::time::Instant::now() + DEADLINE;
    while log.all("said once registered").is_empty() {
        assert!(tokio::time::Instant::now() < end, "the core's line in time");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for (says, text) in [
        (
            "worker reported an error before registering (its repeats",
            "said before registering",
        ),
        ("worker reported an error", "said once registered"),
    ] {
        let lines: Vec<String> = log
            .lines(says, "error-reporter")
            .into_iter()
            .filter(|l| l.contains(text))
            .collect();
        assert_eq!(lines.len(), 1, "{says}: {lines:#?}");
        let line = &lines[0];
        assert!(line.contains(" WARN "), "{line}");
        assert!(
            line.contains(&format!(" error_message=\"{text}\"")),
            "the worker's text in its own field: {line}"
        );
        assert_eq!(line.matches(text).count(), 1, "said once: {line}");
        assert!(
            !line.contains(" message="),
            "no field named message: {line}"
        );
    }
    raw.ws.close(None).await.expect("close");
    c.stop().await;
}
