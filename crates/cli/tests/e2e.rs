//! A short `tether e2e` run as part of the suite: three worker processes, a coordinator
//! process, every kind of disruption once (the first round of the plan always runs to its
//! end), then the exit code and the JSON report's verdict and figures. A run that cannot
//! start. And the README's first command, `tether demo`, as a newcomer runs it.

use std::process::{Command, Stdio};

use serde_json::Value;

/// The earliest a worker of these runs may notice a silence: its liveness timeout (1.5 s) less
/// two heartbeat intervals (250 ms each) by which its last frame may predate the fault.
const SILENCE_FLOOR_WORKER_MS: f64 = 1000.0;
/// The same for the coordinator (3 s timeout).
const SILENCE_FLOOR_COORDINATOR_MS: f64 = 2500.0;

/// The last lines of every process log of a run, for a failure message.
fn log_tails(work: &std::path::Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(work) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            out.push_str(&format!("--- {}\n{tail}\n", p.display()));
        }
    }
    out
}

/// Longest a `tether e2e` run of this suite may take (they take under a minute or two).
const E2E_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs `tether e2e` with `args` in `dir` (report in `dir/report/`, processes' files in
/// `dir/work`), asserts that it passed (with the report and the logs' tails if not), and
/// returns the JSON report, the Markdown report and the process id of the run.
fn run_e2e(dir: &std::path::Path, args: &[&str]) -> (Value, String, u32) {
    let report_dir = dir.join("report/");
    let child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("e2e")
        .args(args)
        .args(["--drain-timeout", "60s", "--report"])
        .arg(&report_dir)
        .arg("--work-dir")
        .arg(dir.join("work"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tether e2e");
    let pid = child.id();
    // A run that hangs must not hold the suite: past the limit it is killed (its processes
    // die with it) and the test fails.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(E2E_LIMIT) {
        Ok(out) => out.expect("wait for tether e2e"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!(
                "tether e2e did not end within {E2E_LIMIT:?}\nlogs:\n{}",
                log_tails(&dir.join("work"))
            );
        }
    };
    let md = std::fs::read_to_string(report_dir.join("e2e-report.md")).unwrap_or_default();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}\nreport:\n{md}\nlogs:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log_tails(&dir.join("work"))
    );
    let text = std::fs::read_to_string(report_dir.join("e2e-report.json")).expect("JSON report");
    let r: Value = serde_json::from_str(&text).expect("report is JSON");
    assert_eq!(r["verdict"]["pass"], true, "{md}");
    (r, md, pid)
}

/// A run whose coordinator exits at start (a setting it cannot parse, from its environment)
/// fails with an error that names the coordinator's log in a temporary work directory, and
/// that file is still there to read.
#[test]
fn a_run_that_cannot_start_keeps_the_log_its_error_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["e2e", "--workers", "1", "--duration", "1s"])
        .env("TMPDIR", tmp.path())
        .env("TETHER_HEARTBEAT_BUDGET", "not-a-number")
        .stdin(Stdio::null())
        .output()
        .expect("run tether e2e");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let log = stderr
        .split_whitespace()
        .find(|w| w.ends_with("coordinator.log"))
        .unwrap_or_else(|| panic!("no log named: {stderr}"));
    assert!(log.starts_with(&*tmp.path().to_string_lossy()), "{log}");
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{log}: {e}\n{stderr}"));
    assert!(
        text.contains("TETHER_HEARTBEAT_BUDGET") || text.contains("heartbeat-budget"),
        "{text}"
    );
}

const KINDS: [&str; 15] = [
    "latency",
    "bandwidth",
    "blackhole",
    "reset",
    "limit_data",
    "slicer",
    "stall",
    "corrupt",
    "proxy_down",
    "worker_kill",
    "worker_stop",
    "coordinator_kill",
    "lease_loss",
    "slow_close",
    "drain",
];

#[test]
fn a_short_e2e_run_with_every_disruption_passes_on_ground_truth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, md, _) = run_e2e(
        dir.path(),
        &[
            "--workers",
            "3",
            "--duration",
            "1s",
            "--disruption-interval",
            "1500ms",
            "--seed",
            "7",
            "--scenario",
            "all",
        ],
    );
    for c in r["verdict"]["checks"].as_array().expect("checks") {
        assert_eq!(c["pass"], true, "{c}");
    }
    assert_eq!(r["config"]["seed"], 7);

    // Every kind ran, fired and was recovered from; every kind that ends sessions or damages
    // frames was detected, and a slow link's detection is not applicable (not its firing).
    for k in KINDS {
        let f = &r["by_kind"][k];
        assert!(f["count"].as_u64() >= Some(1), "{k} ran: {md}");
        assert_eq!(f["fired"], f["count"], "{k}");
        match k {
            "latency" | "bandwidth" | "slicer" | "stall" | "drain" => {
                assert!(f["detected"].is_null(), "{k}: {f}")
            }
            _ => assert_eq!(f["detected"], f["count"], "{k}"),
        }
        assert_eq!(f["recovered"], f["count"], "{k}");
    }
    // The proxy's own counters show that its faults did something.
    let faults = &r["proxy"]["faults"];
    for counter in ["bytes_delayed", "bytes_dropped", "bytes_corrupted"] {
        assert!(faults[counter].as_u64() > Some(0), "{counter}: {faults}");
    }
    assert!(
        r["proxy"]["connections_reset"].as_u64() > Some(0),
        "{}",
        r["proxy"]
    );
    for o in r["disruptions"].as_array().expect("disruptions") {
        let counter = match o["kind"].as_str() {
            Some("reset") => "connections_reset",
            Some("limit_data") => "connections_closed",
            Some("blackhole") => "bytes_dropped",
            Some("corrupt") => "bytes_corrupted",
            Some("latency" | "bandwidth" | "slicer" | "stall") => "bytes_delayed",
            // Kinds without counters fired by their evidence: the kill's exit status, the
            // proxy's links and listener.
            Some("worker_kill" | "coordinator_kill") => {
                let e = o["evidence"].as_str().unwrap_or_default();
                assert_eq!(e, "ended by SIGKILL", "{o}");
                if o["kind"] == "worker_kill" {
                    // The task processes it ran were looked for and none outlived it.
                    assert!(o["outlived"]["ran"].is_u64(), "{o}");
                    assert_eq!(o["outlived"]["left"], serde_json::json!([]), "{o}");
                }
                continue;
            }
            Some("lease_loss") => {
                // Its blackhole dropped bytes, and the coordinator took the worker for lost
                // while it held leases.
                let e = o["evidence"].as_str().unwrap_or_default();
                assert!(e.contains("listed lost: after"), "{o}");
                "bytes_dropped"
            }
            Some("slow_close") => {
                // The stopped worker's link outlived its process: the FINs were held, as the
                // proxy counted.
                let e = o["evidence"].as_str().unwrap_or_default();
                assert!(e.starts_with("exited 0 after SIGTERM"), "{o}");
                "closes_delayed"
            }
            Some("worker_stop") => {
                let e = o["evidence"].as_str().unwrap_or_default();
                assert_eq!(e, "exited 0 after SIGTERM", "{o}");
                // What became of its leases was read from the coordinator's attempts (none
                // left to the grace period: the verdict's check).
                assert!(o["handback"]["handed_back"].is_u64(), "{o}");
                assert_eq!(o["handback"]["left"], serde_json::json!([]), "{o}");
                continue;
            }
            Some("drain") => {
                // The coordinator's record said so at the end of the hold; the attempts
                // started meanwhile were read from its tasks, none on the drained worker (the
                // verdict's check, which also wants some started elsewhere).
                let e = o["evidence"].as_str().unwrap_or_default();
                assert!(e.starts_with("its record said draining true"), "{o}");
                assert_eq!(o["drained"]["on_it"], serde_json::json!([]), "{o}");
                // Through the proxy, its heartbeat replies told the worker, as its log says.
                assert_eq!(o["drained"]["told"], true, "{o}");
                assert!(o["drained"]["elsewhere"].is_u64(), "{o}");
                continue;
            }
            Some("proxy_down") => {
                let e = o["evidence"].as_str().unwrap_or_default();
                assert!(
                    e.contains("0 after") && e.ends_with("refused a connection"),
                    "{o}"
                );
                continue;
            }
            _ => continue,
        };
        assert!(
            o["fault_stats"][counter].as_u64() > Some(0),
            "{counter}: {o}"
        );
    }

    // The silent partition was found by the worker's liveness timeout and by the coordinator.
    let b = &r["blackhole"];
    assert!(b["worker_detect"]["samples"].as_u64() >= Some(1), "{b}");
    assert!(
        b["coordinator_detect"]["samples"].as_u64() >= Some(1),
        "{b}"
    );
    for o in r["disruptions"].as_array().expect("disruptions") {
        if o["kind"] == "blackhole" {
            let t = o["target"].as_str().expect("target");
            assert_eq!(o["worker_detect_dead"][t], true, "{o}");
            // Silence cannot be noticed before its timeout (1.5 s and 3 s) has passed since
            // the last frame, which may predate the fault by a heartbeat interval (250 ms), and
            // by more when the heartbeat came late: two intervals allowed (one came 333 ms
            // before the fault on a machine at load 16).
            assert!(
                o["worker_detect_ms"][t].as_f64() >= Some(SILENCE_FLOOR_WORKER_MS),
                "{o}"
            );
            assert!(
                o["coordinator_detect_ms"][t].as_f64() >= Some(SILENCE_FLOOR_COORDINATOR_MS),
                "{o}"
            );
        }
    }

    // Task outcomes: all accounted for, the failing ones failed (their retries too).
    let t = &r["tasks"];
    let submitted = t["submitted"].as_u64().expect("submitted");
    assert!(submitted >= 12 * 5, "{t}");
    assert_eq!(
        t["by_status"]["completed"].as_u64().unwrap_or(0)
            + t["by_status"]["failed"].as_u64().unwrap_or(0),
        submitted,
        "{t}"
    );
    assert_eq!(t["by_status"]["failed"], t["expected_to_fail"], "{t}");
    assert_eq!(r["coordinator_starts"].as_u64(), Some(2));
    let workers = r["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 3);
    // Each kill and each graceful stop restarted one worker.
    let restarts: u64 = workers
        .iter()
        .map(|w| w["process_starts"].as_u64().unwrap_or(0).saturating_sub(1))
        .sum();
    let ran = |k: &str| r["by_kind"][k]["count"].as_u64().unwrap_or(0);
    assert_eq!(
        restarts,
        ran("worker_kill") + ran("worker_stop") + ran("slow_close"),
        "{workers:?}"
    );
    // The lease loss brought back results after their lease moved, and the verdict said how
    // each was judged (adopted, or kept stale behind a started attempt).
    let late = r["verdict"]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "late_results_explained")
        .expect("the late_results_explained check");
    let said = late["detail"].as_str().unwrap_or_default();
    assert!(
        !said.starts_with("0 results"),
        "no result came after its lease moved: {said}\n{md}"
    );
    // Each wave's flaky task failed its first attempt and was run again on that failure
    // (`retry_on`), through the same disruptions.
    assert!(t["flaky"].as_u64() >= Some(5), "{t}");
    // Tasks failing on purpose were retried as new tasks (`retry_of`) through the disruptions
    // that followed, each recorded on the task it retries (the verdict's retries_recorded).
    assert!(t["retries"].as_u64() >= Some(3), "{t}");
    assert!(
        said.contains("kept uncounted because their task runs again on that end"),
        "{said}"
    );
    assert!(md.contains("# tether e2e: PASS"), "{md}");
}

#[test]
fn with_integrity_tags_a_low_rate_of_bit_flips_is_caught_and_every_result_is_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, md, _) = run_e2e(
        dir.path(),
        &[
            "--message-mac",
            "--workers",
            "2",
            "--duration",
            "4s",
            "--disruption-interval",
            "1s",
            "--seed",
            "11",
            "--scenario",
            "corrupt,coordinator_kill,worker_kill",
        ],
    );
    assert_eq!(r["config"]["message_mac"], true);
    // The Markdown says so too: the same faults mean something else with tags.
    assert!(md.contains("`--message-mac`"), "{md}");
    // Given with --work-dir, the directory stays and the report names it.
    assert!(md.contains("Logs and state: `"), "{md}");
    // At this rate most damaged frames still parse: the tags must catch them, and no counted
    // result may differ from what its executor produced.
    assert!(r["config"]["corrupt_rate"].as_f64() < Some(0.01), "{md}");
    let intact = r["verdict"]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "results_intact")
        .expect("the results_intact check");
    assert_eq!(intact["pass"], true, "{intact}");
    let corrupt = &r["by_kind"]["corrupt"];
    assert!(corrupt["count"].as_u64() >= Some(1), "{md}");
    // The corruption stayed on for more than a frame or two (it used to be removed at its
    // first flipped byte, a heartbeat's, and almost never met a result), and integrity tags
    // caught damaged frames in it.
    let corrupted: Vec<&Value> = r["disruptions"]
        .as_array()
        .expect("disruptions")
        .iter()
        .filter(|o| o["kind"] == "corrupt")
        .collect();
    let sum = |f: &dyn Fn(&Value) -> Option<u64>| -> u64 {
        corrupted.iter().map(|o| f(o).unwrap_or(0)).sum()
    };
    let flipped = sum(&|o| o["fault_stats"]["bytes_corrupted"].as_u64());
    // At this rate the first flip ends the session (a frame dropped for its tag ends it on
    // the worker's side) and garbles the next handshakes, about a byte a second: the fault
    // stays 3 s and until 24 bytes changed (20 s at most); 16 are the least it takes that.
    assert!(flipped >= 16, "{flipped} bytes corrupted: {md}");
    // Caught at either end: damage soon ends a session (the coordinator's `bad_mac` for one
    // of the worker's frames, the worker's third dropped frame), so most flips meet
    // handshakes, and the coordinator's tag check may meet no frame at all. A registration it
    // refuses (its tag, or its signature over a damaged welcome's nonce) counts, and so do the
    // frames the worker's own check dropped (its event log). Nothing caught at either end
    // still fails.
    let caught = sum(&|o| o["caught"]["total"].as_u64());
    let ends: Vec<&Value> = corrupted.iter().map(|o| &o["caught"]).collect();
    assert!(caught > 0, "no end's tags caught a frame: {ends:?}\n{md}");
    assert_eq!(corrupt["fired"], corrupt["count"], "{md}");
    assert_eq!(corrupt["detected"], corrupt["count"], "{md}");
    // Restarted processes authenticated again with the secret file.
    assert!(r["coordinator_starts"].as_u64() >= Some(2), "{md}");
}

/// Why network namespaces cannot be used here, if they cannot.
enum Netns {
    /// What `.ci/run` provides is missing (root, iproute2): a failure in CI.
    Missing(String),
    /// Root with iproute2, but the kernel or the container refuses a namespace: no install
    /// can help, so the test is skipped even in CI, saying why.
    Refused(String),
}

fn netns_unavailable() -> Option<Netns> {
    if !nix::unistd::geteuid().is_root() {
        return Some(Netns::Missing("not root".into()));
    }
    let probe = format!("tether-test-probe-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            None
        }
        Ok(o) => Some(Netns::Refused(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Some(Netns::Missing(format!("cannot run `ip` (iproute2): {e}"))),
    }
}

#[test]
fn workers_in_network_namespaces_survive_a_kernel_link_down_and_a_kernel_paced_link() {
    match netns_unavailable() {
        None => {}
        Some(Netns::Missing(why)) => {
            tether_testkit::skip_unless_ci("root and iproute2 for network namespaces", &why);
            return;
        }
        // In CI a refusal fails the test unless the CI configuration says, by setting
        // TETHER_ALLOW_NETNS_SKIP, that its machine cannot have namespaces: the kernel-made
        // faults are never skipped quietly.
        Some(Netns::Refused(why)) => {
            if std::env::var_os("CI").is_some()
                && std::env::var_os("TETHER_ALLOW_NETNS_SKIP").is_none()
            {
                panic!(
                    "this machine refuses network namespaces ({why}); set \
                     TETHER_ALLOW_NETNS_SKIP=1 if the CI machine cannot have them"
                );
            }
            eprintln!("skipped: this machine refuses network namespaces ({why})");
            return;
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, md, pid) = run_e2e(
        dir.path(),
        &[
            "--netns",
            "--workers",
            "2",
            "--duration",
            "1s",
            "--disruption-interval",
            "1s",
            "--seed",
            "3",
            "--scenario",
            "link_down,link_crawl,worker_kill",
        ],
    );
    let link = &r["by_kind"]["link_down"];
    assert_eq!(link["count"], 1, "{md}");
    assert_eq!(link["fired"], 1, "{md}");
    assert_eq!(link["detected"], 1, "{md}");
    assert_eq!(link["recovered"], 1, "{md}");
    let crawl = &r["by_kind"]["link_crawl"];
    assert_eq!(crawl["count"], 1, "{md}");
    assert_eq!(crawl["fired"], 1, "{md}");
    // A crawling link is to be ridden through: nothing to detect.
    assert!(crawl["detected"].is_null(), "{md}");
    for o in r["disruptions"].as_array().expect("disruptions") {
        if o["kind"] == "link_crawl" {
            // The kernel's token bucket held packets back (or dropped them) on that link.
            let k = &o["shape_stats"];
            assert!(k["sent_packets"].as_u64() > Some(0), "{o}");
            assert!(
                k["overlimits"].as_u64() > Some(0) || k["dropped"].as_u64() > Some(0),
                "{o}"
            );
        }
        if o["kind"] == "link_down" {
            // Fired by the kernel's account of the link, read at the end of the hold.
            assert_eq!(
                o["evidence"].as_str(),
                Some("host end operstate down at the end of the hold"),
                "{o}"
            );
            let t = o["target"].as_str().expect("target");
            // A link taken down by the kernel is silence: found by the liveness timeouts.
            assert_eq!(o["worker_detect_dead"][t], true, "{o}");
            assert!(
                o["coordinator_detect_ms"][t].as_f64() >= Some(SILENCE_FLOOR_COORDINATOR_MS),
                "{o}"
            );
        }
    }
    // Every namespace and link this run made is gone.
    let ns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let names = String::from_utf8_lossy(&ns.stdout).to_string();
    assert!(!names.contains(&format!("tether-{pid}-")), "{names}");
}

/// The README's main job: `tether demo` on its embedded defaults passes its own ground truth
/// (every task completed once, nothing lost, nothing recorded twice, every fault fired and was
/// recovered from) and exits 0.
#[test]
fn the_readme_demo_passes_its_ground_truth_on_its_defaults() {
    let text = demo_passes(&[]);
    for line in [
        "tasks submitted      40",
        "tasks completed      40",
        "lost                 0",
        "recorded twice       0",
        "proxy went down      yes",
        "stall was silent     yes",
        "API agrees           yes",
        "acks hold            yes",
        "judged from          the coordinator's database",
        "verdict: PASS",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert!(
        text.contains("silent stall")
            && text.contains("detected after")
            && !text.contains("NOT detected"),
        "{text}"
    );
}

/// With a single task the demo's tasks may all end before the stalled worker is back from its
/// reconnect delay: the demo waits for it rather than judge a recovery still under way (it
/// failed its own verdict with nothing lost).
#[test]
fn the_demo_with_one_task_waits_for_the_stalled_worker_and_passes() {
    let text = demo_passes(&["--tasks", "1"]);
    for line in [
        "tasks completed      1",
        "stalled worker back  yes",
        "verdict: PASS",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
}

/// Runs `tether demo` with `args`, asserts it exited 0 and left nothing in its temporary
/// directory (its workers' scratch directory, `tether-worker-<pid>`, was left behind, lock
/// file and all, for the next worker to sweep), and returns what it printed.
fn demo_passes(args: &[&str]) -> String {
    let temp = tempfile::tempdir().expect("tempdir");
    let child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("demo")
        .args(args)
        .env("TMPDIR", temp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tether demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for tether demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{text}\n{err}", out.status);
    let scratch = temp.path().join(format!("tether-worker-{pid}"));
    assert!(!scratch.exists(), "{} left behind", scratch.display());
    text
}
