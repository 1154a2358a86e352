//! The dashboard in a real headless chromium: a real coordinator, real workers (one behind the
//! fault proxy), the page fed by its event stream. Where chromium is not installed, skipped
//! with a line that says so, or failed in CI (`CI` set: `.ci/run` installs it).

use std::time::Duration;

use serde_json::json;
use tether_faultproxy::{Direction, Fault, FaultKind, Target};
use tether_proto::{TaskId, WorkerId};
use tether_testkit::*;
use tether_worker::Executors;

use crate::browser::{Browser, chromium};
use crate::faults::proxy_in_front;
use crate::support::{connected_worker, coordinator, coordinator_with};

/// Says the test is skipped, or fails it in CI (which installs chromium).
#[track_caller]
fn no_browser() {
    skip_unless_ci(
        "a headless chromium (Debian's chromium, or TETHER_CHROMIUM)",
        &format!("nothing at {}", chromium().display()),
    );
}

fn worker_state(id: &str) -> String {
    format!("document.querySelector('#workers tr[data-worker=\"{id}\"]')?.dataset.state ?? null")
}

fn task_status(id: &str) -> String {
    format!("document.querySelector('#tasks tr[data-task=\"{id}\"]')?.dataset.status ?? null")
}

/// Opens the dashboard of `c` and waits until its event stream is live.
async fn open_page(browser: &mut Browser, c: &TestCoordinator) {
    browser.navigate(&format!("http://{}/", c.addr)).await;
    browser
        .wait_eval(
            "the event stream",
            "document.querySelector('#feed')?.dataset.feed ?? null",
            json!("live"),
        )
        .await;
}

#[tokio::test]
async fn the_dashboard_shows_the_fleet_a_task_and_a_worker_cut_off_and_back() {
    let Some(mut browser) = Browser::start().await else {
        no_browser();
        return;
    };
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.history_interval = Duration::from_millis(250);
        cfg.lost_after = Duration::from_secs(60);
    })
    .await;
    let proxy = proxy_in_front(&c, 5).await;
    let w1 = connected_worker(&c.ws_url(), "w1").await;
    let w2 = connected_worker(&format!("ws://{}", proxy.listen_addr()), "w2").await;

    // The page loads and shows the workers.
    open_page(&mut browser, &c).await;
    browser
        .wait_eval("w1 connected", &worker_state("w1"), json!("connected"))
        .await;
    browser
        .wait_eval("w2 connected", &worker_state("w2"), json!("connected"))
        .await;

    // A task submitted through the API appears and finishes.
    let client = c.client();
    let ids = client.submit(&[sleep_task(400, 4, 2)]).await;
    let id = ids[0].as_str();
    let expr = format!("({}) !== null", task_status(id));
    browser
        .wait_eval("the task to appear", &expr, json!(true))
        .await;
    browser
        .wait_eval("the task to finish", &task_status(id), json!("completed"))
        .await;
    client.wait_status(&ids[0], "completed").await;

    // Its timeline opens on a click.
    browser
        .eval(&format!(
            "document.querySelector('#tasks tr[data-task=\"{id}\"]').click()"
        ))
        .await;
    browser
        .wait_eval(
            "the timeline",
            "document.querySelectorAll('#detail ol.timeline li').length > 1",
            json!(true),
        )
        .await;

    // The controls reach a running task through the API.
    let long = client.submit(&[sleep_task(60_000, 600, 5)]).await;
    let long_id = long[0].as_str();
    browser
        .wait_eval(
            "the long task to run",
            &task_status(long_id),
            json!("running"),
        )
        .await;
    browser
        .eval(&format!(
            "document.querySelector('#tasks tr[data-task=\"{long_id}\"]').click()"
        ))
        .await;
    for (action, status) in [("pause", "paused"), ("resume", "running")] {
        browser
            .eval(&format!(
                "document.querySelector('#detail button[data-action=\"{action}\"]').click()"
            ))
            .await;
        browser
            .wait_eval(action, &task_status(long_id), json!(status))
            .await;
    }
    // A typed admin token is kept and sent as a bearer token with the controls.
    browser
        .eval(
            "(() => { const t = document.querySelector('#token'); t.value = 'secret-token'; \
             t.dispatchEvent(new Event('change')); window.seen = []; const f = window.fetch; \
             window.fetch = (u, o) => { window.seen.push([String(u), o?.headers?.Authorization ?? null]); \
             return f(u, o); }; })()",
        )
        .await;
    browser
        .eval("document.querySelector('#detail button[data-action=\"checkpoint\"]').click()")
        .await;
    browser
        .wait_eval(
            "the checkpoint request",
            "document.querySelector('#control-message').textContent",
            json!("checkpoint: sent"),
        )
        .await;
    assert_eq!(
        browser
            .eval("window.seen.find(([u]) => u.endsWith('/checkpoint'))?.[1] ?? null")
            .await,
        json!("Bearer secret-token")
    );
    assert_eq!(
        browser.eval("sessionStorage.getItem('tether.token')").await,
        json!("secret-token")
    );
    browser
        .eval("document.querySelector('#detail button[data-action=\"cancel\"]').click()")
        .await;
    browser
        .wait_eval("cancel", &task_status(long_id), json!("cancelled"))
        .await;
    assert_eq!(client.status(&long[0]).await, "cancelled");

    // Retried from its detail: a new task with its spec, recorded as its retry, and shown.
    let click_retry = "document.querySelector('#detail button[data-action=\"retry\"]').click()";
    browser.eval(click_retry).await;
    let said = browser
        .wait_until(
            "the retry",
            "(() => { const m = document.querySelector('#control-message').textContent; \
             return m.startsWith('retry: submitted as ') ? m : null; })()",
        )
        .await;
    let again = said
        .as_str()
        .and_then(|m| m.strip_prefix("retry: submitted as "))
        .map(|id| TaskId::parse(id).expect("a task id"))
        .expect("the new id");
    let old = client.task(&long[0]).await;
    assert_eq!(old["retried_by"], json!(again.as_str()), "{old}");
    let new = client.task(&again).await;
    assert_eq!(new["spec"]["retry_of"], json!(long_id), "{new}");
    assert_eq!(new["spec"]["config"], old["spec"]["config"]);
    browser
        .wait_eval(
            "the retry's detail",
            "document.querySelector('#detail .retry-of')?.textContent ?? null",
            json!(format!("retry of {long_id}")),
        )
        .await;
    // The new one runs: the coordinator's refusal of its retry is said.
    client.wait_status(&again, "running").await;
    browser.eval(click_retry).await;
    browser
        .wait_until(
            "the refusal",
            "document.querySelector('#control-message').textContent.includes('only an ended task is retried') || null",
        )
        .await;
    client.control(&again, "cancel").await;

    // w2 is cut off by the fault proxy: shown disconnected, then connected again.
    let hole = proxy
        .add_fault(
            Fault::new("cut-w2", FaultKind::Blackhole, Direction::Both)
                .with_target(Target::Workers(vec![WorkerId::parse("w2").expect("id")])),
        )
        .await
        .expect("fault");
    browser
        .wait_eval(
            "w2 disconnected",
            &worker_state("w2"),
            json!("disconnected"),
        )
        .await;
    assert_eq!(
        browser.eval(&worker_state("w1")).await,
        json!("connected"),
        "w1 is not affected"
    );
    let fired = hole.remove();
    assert!(
        fired.bytes_dropped > 0,
        "the black hole dropped bytes: {fired:?}"
    );
    browser
        .wait_eval("w2 reconnected", &worker_state("w2"), json!("connected"))
        .await;
    browser
        .wait_eval(
            "w2's reconnection counted",
            "document.querySelector('#workers tr[data-worker=\"w2\"]')?.dataset.reconnects ?? null",
            json!("1"),
        )
        .await;

    // The charts have samples to draw.
    browser
        .wait_eval(
            "chart samples",
            "fetch('/api/v1/history').then(r => r.json()).then(h => h.length > 2)",
            json!(true),
        )
        .await;
    let path = browser.screenshot("dashboard.png").await;
    println!("dashboard screenshot: {}", path.display());
    assert!(std::fs::metadata(&path).expect("screenshot").len() > 10_000);

    // The text filter finds a run's task by its name, in any case.
    let mut named = sleep_task(10, 1, 5);
    named.name = Some("nightly-42".into());
    let named = client.submit(&[named]).await.remove(0);
    let expr = format!("({}) !== null", task_status(named.as_str()));
    browser
        .wait_eval("the named task to appear", &expr, json!(true))
        .await;
    browser
        .eval(
            "(() => { const f = document.querySelector('#text-filter'); f.value = 'NIGHTLY-4'; \
             f.dispatchEvent(new Event('input')); })()",
        )
        .await;
    browser
        .wait_eval(
            "only the named task shown",
            "[...document.querySelectorAll('#tasks tbody tr')].map(r => r.dataset.task)",
            json!([named.as_str()]),
        )
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#tasks tbody tr td.name')?.textContent ?? null")
            .await,
        json!("nightly-42"),
        "its name in its row"
    );

    w1.stop().await.expect("stop w1");
    w2.stop().await.expect("stop w2");
    c.stop().await;
}

/// A run (tasks of one name) is shown by its latest tries, as the coordinator judges it:
/// failed with a failure in it, running while the failure's retry runs, passed once the retry
/// completed; its name shows its tasks, and a task's detail says what it runs again on.
#[tokio::test]
async fn the_dashboard_shows_a_run_by_its_latest_tries() {
    let Some(mut browser) = Browser::start().await else {
        no_browser();
        return;
    };
    let (_dir, c) = coordinator().await;
    let w = connected_worker(&c.ws_url(), "w1").await;
    open_page(&mut browser, &c).await;
    let run = |what: &str| {
        format!("document.querySelector('#runs tr[data-run=\"nightly-7\"]')?.{what} ?? null")
    };
    let client = c.client();
    let passes = tether_proto::TaskSpec {
        name: Some("nightly-7".into()),
        ..sleep_task(10, 1, 0)
    };
    let fails = tether_proto::TaskSpec {
        config: json!({"ms": 10, "steps": 1, "fail": true}).into(),
        retry_on: vec![tether_proto::RetryOn::Failed],
        max_attempts: Some(2),
        ..passes.clone()
    };
    // Every request for the runs from here on, when it starts and how many are in flight.
    browser
        .eval(
            "(() => { window.runsAsked = []; window.runsInFlight = 0; window.runsMostInFlight = 0; \
             const f = window.fetch; window.fetch = async (u, o) => { \
               if (!String(u).startsWith('/api/v1/runs')) return f(u, o); \
               window.runsAsked.push(performance.now()); \
               window.runsMostInFlight = Math.max(window.runsMostInFlight, ++window.runsInFlight); \
               try { return await f(u, o); } finally { window.runsInFlight--; } }; })()",
        )
        .await;
    let ids = client.submit(&[passes.clone(), fails]).await;
    client.wait_status(&ids[1], "failed").await;
    browser
        .wait_eval("the run failed", &run("dataset.verdict"), json!("failed"))
        .await;
    assert_eq!(
        browser.eval(&run("children[3].textContent")).await,
        json!("1 completed, 1 failed")
    );

    // The failure retried, as a task of no name that takes a while and then completes: the
    // run is running, then passed, each of its two tasks counted once.
    let retry = tether_proto::TaskSpec {
        retry_of: Some(ids[1].clone()),
        ..sleep_task(1_500, 3, 0)
    };
    let again = client.submit(&[retry]).await.remove(0);
    browser
        .wait_eval("the run running", &run("dataset.verdict"), json!("running"))
        .await;
    client.wait_status(&again, "completed").await;
    browser
        .wait_eval("the run passed", &run("dataset.verdict"), json!("passed"))
        .await;
    assert_eq!(
        browser.eval(&run("children[3].textContent")).await,
        json!("2 completed")
    );
    // One retry, and flaky: it completed after a failure.
    for column in [4, 5] {
        assert_eq!(
            browser
                .eval(&run(&format!("children[{column}].textContent")))
                .await,
            json!("1"),
            "column {column}"
        );
    }

    // Its name shows its tasks: the two submitted under it, and nothing else (not its
    // retry, of no name, nor an unnamed task, nor one of a run whose name it begins).
    let others = client
        .submit(&[
            sleep_task(10, 1, 0),
            tether_proto::TaskSpec {
                name: Some("nightly-7-b".into()),
                ..sleep_task(10, 1, 0)
            },
        ])
        .await;
    for other in &others {
        browser
            .wait_eval(
                "the other tasks",
                &format!("({}) !== null", task_status(other.as_str())),
                json!(true),
            )
            .await;
    }
    browser.eval(&run("querySelector('a').click()")).await;
    let mut want = vec![ids[0].to_string(), ids[1].to_string()];
    want.sort();
    let shown = "[...document.querySelectorAll('#tasks tbody tr')].map(r => r.dataset.task).sort()";
    browser
        .wait_eval("the run's tasks", shown, json!(want))
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#run-filter').textContent")
            .await,
        json!("run nightly-7 ×")
    );

    // The failing task's detail says what it runs again on.
    browser
        .eval(&format!(
            "document.querySelector('#tasks tr[data-task=\"{}\"]').click()",
            ids[1]
        ))
        .await;
    browser
        .wait_eval(
            "what it retries on",
            "document.querySelector('#detail .retry-on')?.textContent ?? null",
            json!("runs again when an attempt failed, up to 2 attempts"),
        )
        .await;
    // However many of the run's tasks changed, the runs were asked one request at a time and
    // at most once a second (each change asked for them).
    let asked = browser
        .eval("window.runsAsked.map((t, i, a) => i ? t - a[i - 1] : 0)")
        .await;
    let gaps: Vec<f64> = asked
        .as_array()
        .expect("the requests")
        .iter()
        .skip(1)
        .filter_map(serde_json::Value::as_f64)
        .collect();
    assert!(
        gaps.len() >= 2,
        "the runs were asked again as tasks changed: {asked}"
    );
    assert!(gaps.iter().all(|g| *g >= 990.0), "a second apart: {gaps:?}");
    assert_eq!(browser.eval("window.runsMostInFlight").await, json!(1));
    // The run's filter taken off: every task again.
    browser
        .eval("document.querySelector('#run-filter').click()")
        .await;
    browser
        .wait_eval(
            "every task",
            "document.querySelectorAll('#tasks tbody tr').length",
            json!(5),
        )
        .await;
    w.stop().await.expect("stop w1");
    c.stop().await;
}

/// Types `token` into the page's token field.
async fn type_token(browser: &mut Browser, token: &str) {
    browser
        .eval(&format!(
            "(() => {{ const t = document.querySelector('#token'); t.value = '{token}'; \
             t.dispatchEvent(new Event('change')); }})()"
        ))
        .await;
}

#[tokio::test]
async fn with_tokens_the_dashboard_asks_for_one_and_its_controls_need_the_admin_scope() {
    use tether_coordinator::auth::{ApiTokens, Scope};
    use tether_proto::auth::Secret;
    let Some(mut browser) = Browser::start().await else {
        no_browser();
        return;
    };
    let (_dir, c) = coordinator_with(|cfg| {
        let mut tokens = ApiTokens::default();
        tokens.add(
            &Secret::new(b"admin-token-for-tests").expect("t"),
            Scope::Admin,
        );
        tokens.add(
            &Secret::new(b"read-token-for-tests").expect("t"),
            Scope::Read,
        );
        cfg.api_tokens = Some(tokens);
    })
    .await;
    let w = connected_worker(&c.ws_url(), "w1").await;
    let admin = Client::with_token(&format!("http://{}", c.addr), "admin-token-for-tests");

    // The page itself is public; its data is not.
    browser.navigate(&format!("http://{}/", c.addr)).await;
    let feed = "document.querySelector('#feed')?.dataset.feed ?? null";
    browser
        .wait_eval("a token to be asked for", feed, json!("token needed"))
        .await;
    type_token(&mut browser, "read-token-for-tests").await;
    browser
        .wait_eval("the event stream", feed, json!("live"))
        .await;
    browser
        .wait_eval("w1 connected", &worker_state("w1"), json!("connected"))
        .await;

    // A read token sees the task but cannot cancel it; the admin token can.
    let ids = admin.submit(&[sleep_task(60_000, 600, 0)]).await;
    let id = ids[0].as_str();
    browser
        .wait_eval("the task to run", &task_status(id), json!("running"))
        .await;
    browser
        .eval(&format!(
            "document.querySelector('#tasks tr[data-task=\"{id}\"]').click()"
        ))
        .await;
    let cancel = "document.querySelector('#detail button[data-action=\"cancel\"]').click()";
    let message = "document.querySelector('#control-message').textContent";
    browser.eval(cancel).await;
    browser
        .wait_eval(
            "the refusal",
            &format!("{message}.startsWith('cancel: ') && {message}.includes('admin')"),
            json!(true),
        )
        .await;
    assert_eq!(admin.status(&ids[0]).await, "running");
    // Nor drain a worker.
    let drain = |action: &str| {
        format!(
            "document.querySelector('#workers tr[data-worker=\"w1\"] button[data-drain=\"{action}\"]').click()"
        )
    };
    let fleet = "document.querySelector('#fleet-message').textContent";
    browser.eval(&drain("drain")).await;
    browser
        .wait_eval(
            "the drain's refusal",
            &format!("{fleet}.startsWith('w1 drain: ') && {fleet}.includes('admin')"),
            json!(true),
        )
        .await;
    type_token(&mut browser, "admin-token-for-tests").await;
    browser.eval(cancel).await;
    browser
        .wait_eval("cancel", &task_status(id), json!("cancelled"))
        .await;
    assert_eq!(admin.status(&ids[0]).await, "cancelled");
    // The admin token drains w1 from its row (holding nothing now: drained), and undrains it.
    let badge = "document.querySelector('#workers tr[data-worker=\"w1\"] .badge').textContent";
    let draining = || async { admin.get("/api/v1/workers/w1").await.1["draining"].clone() };
    assert_eq!(
        draining().await,
        json!(null),
        "not drained by the read token"
    );
    browser.eval(&drain("drain")).await;
    browser
        .wait_eval("w1 drained", badge, json!("drained"))
        .await;
    assert_eq!(draining().await, json!(true));
    browser.eval(&drain("undrain")).await;
    browser
        .wait_eval("w1 undrained", badge, json!("connected"))
        .await;
    assert_eq!(draining().await, json!(null));
    // Drained again and gone: its badge says both, as `tether workers` does.
    browser.eval(&drain("drain")).await;
    browser
        .wait_eval("w1 drained again", badge, json!("drained"))
        .await;
    w.stop().await.expect("stop");
    browser
        .wait_eval(
            "w1 gone, still drained",
            &format!("{badge}.endsWith(', drained') && !{badge}.startsWith('connected')"),
            json!(true),
        )
        .await;
    c.stop().await;
}

#[tokio::test]
async fn the_dashboard_assets_and_the_api_description_are_served_from_the_binary() {
    let (_dir, c) = coordinator().await;
    let base = format!("http://{}", c.addr);
    for (path, kind, needle) in [
        ("/", "text/html", "/dashboard/app.js"),
        ("/dashboard/app.js", "text/javascript", "/api/v1/events"),
        ("/dashboard/style.css", "text/css", "--bg"),
    ] {
        let r = loopback_client(reqwest::Client::builder())
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let ct = r.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .to_owned();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        // No other site may frame it (clickjacking) or make it load from elsewhere.
        let policy = r.headers()["content-security-policy"]
            .to_str()
            .unwrap_or_default()
            .to_owned();
        for rule in [
            "default-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'none'",
        ] {
            assert!(policy.contains(rule), "{path}: {policy}");
        }
        assert_eq!(r.headers()["x-frame-options"], "DENY", "{path}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
        let body = r.text().await.expect("body");
        assert!(body.contains(needle), "{path} contains {needle}");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path} loads nothing from elsewhere"
        );
    }
    let (status, _) = c.client().get("/dashboard/nope.js").await;
    assert_eq!(status, 404);
    // A file name that is not UTF-8 gets the JSON error every route answers with.
    let (status, body) = c.client().get("/dashboard/%FF").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_path", "{body}");
    let (status, doc) = c.client().get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    assert!(doc["paths"]["/api/v1/tasks"]["post"].is_object());
    c.stop().await;
}

/// Reads the next server-sent event: its name and JSON data (comments are skipped).
pub(crate) async fn next_event(
    resp: &mut reqwest::Response,
    buf: &mut String,
) -> Option<(String, serde_json::Value)> {
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = n.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if !data.is_empty() {
                return Some((
                    name,
                    serde_json::from_str(&data).expect("event data is JSON"),
                ));
            }
        }
        let chunk = tokio::time::timeout(DEADLINE, resp.chunk())
            .await
            .expect("an event in time")
            .ok()??;
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// Opens the coordinator's event stream and reads its first event, the snapshot.
async fn open_events(c: &TestCoordinator) -> (reqwest::Response, String, serde_json::Value) {
    let mut resp = loopback_client(reqwest::Client::builder())
        .get(format!("http://{}/api/v1/events", c.addr))
        .send()
        .await
        .expect("events");
    let mut buf = String::new();
    let (name, snap) = next_event(&mut resp, &mut buf).await.expect("snapshot");
    assert_eq!(name, "snapshot");
    (resp, buf, snap)
}

#[tokio::test]
async fn the_event_stream_starts_with_a_snapshot_follows_changes_and_ends_with_the_coordinator() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.history_interval = Duration::from_millis(100);
    })
    .await;
    let mut resp = loopback_client(reqwest::Client::builder())
        .get(format!("http://{}/api/v1/events", c.addr))
        .send()
        .await
        .expect("events");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers()["content-type"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut buf = String::new();
    let (name, snap) = next_event(&mut resp, &mut buf).await.expect("snapshot");
    assert_eq!(name, "snapshot");
    assert_eq!(snap["workers"], json!([]));
    assert_eq!(snap["tasks"], json!([]));
    assert_eq!(snap["history_interval_ms"], 100);

    // A submitted task (no worker: it stays queued) and a worker that registers are announced.
    let ids = c.client().submit(&[sleep_task(10, 1, 0)]).await;
    let w = spawn_worker(
        fast_worker_config(&c.ws_url(), "sse-w1"),
        Executors::builtin(),
    );
    let (mut saw_queued, mut saw_worker, mut saw_done, mut saw_sample) =
        (false, false, false, false);
    while !(saw_queued && saw_worker && saw_done && saw_sample) {
        let (name, v) = next_event(&mut resp, &mut buf).await.expect("an event");
        match name.as_str() {
            "task" if v["task_id"] == ids[0].as_str() => {
                saw_queued |= v["status"] == "queued";
                saw_done |= v["status"] == "completed";
            }
            "worker" => saw_worker |= v["worker_id"] == "sse-w1" && v["state"] == "connected",
            "sample" => saw_sample |= v["tasks"]["queued"].is_u64(),
            _ => {}
        }
    }
    w.stop().await.expect("stop");
    // An open stream does not keep the coordinator from stopping, and it ends then.
    tokio::time::timeout(DEADLINE, c.stop())
        .await
        .expect("the coordinator stops with a dashboard open");
    let rest = tokio::time::timeout(DEADLINE, async {
        while next_event(&mut resp, &mut buf).await.is_some() {}
    })
    .await;
    assert!(rest.is_ok(), "the stream ends with the coordinator");
}

#[tokio::test]
async fn tasks_can_be_listed_by_when_they_last_changed_and_page_by_page() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let first = client.submit(&[sleep_task(10, 1, 0)]).await.remove(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = client
        .submit(&[sleep_task(10, 1, 0), sleep_task(10, 1, 0)])
        .await;
    let since = client.task(&later[0]).await["updated_at"]
        .as_str()
        .expect("updated_at")
        .to_owned();
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .filter_map(|t| t["task_id"].as_str().map(str::to_owned))
            .collect()
    };
    let (status, changed) = client
        .get(&format!("/api/v1/tasks?updated_since={since}"))
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(ids(&changed), [later[0].to_string(), later[1].to_string()]);
    // A change moves an older task into the window: cancelled now, it was updated now.
    let (status, _) = client.control(&first, "cancel").await;
    assert_eq!(status, 200);
    let (_, changed) = client
        .get(&format!("/api/v1/tasks?updated_since={since}&order=newest"))
        .await;
    assert_eq!(
        ids(&changed),
        [
            later[1].to_string(),
            later[0].to_string(),
            first.to_string()
        ]
    );
    let (_, none) = client
        .get("/api/v1/tasks?updated_since=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(ids(&none), Vec::<String>::new());
    // Page by page: a page's last submit_seq asks for the next, combined with the filter.
    let (_, page) = client
        .get(&format!(
            "/api/v1/tasks?updated_since={since}&order=newest&limit=2"
        ))
        .await;
    assert_eq!(ids(&page), [later[1].to_string(), later[0].to_string()]);
    let cursor = page[1]["submit_seq"].as_u64().expect("submit_seq");
    let (status, next) = client
        .get(&format!(
            "/api/v1/tasks?updated_since={since}&order=newest&limit=2&after_seq={cursor}"
        ))
        .await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(ids(&next), [first.to_string()]);
    let (status, e) = client.get("/api/v1/tasks?after_seq=last").await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("after_seq")),
        "{e}"
    );
    let (status, e) = client.get("/api/v1/tasks?updated_since=yesterday").await;
    assert_eq!(status, 422, "{e}");
    assert_eq!(e["error"]["code"], "invalid");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("RFC 3339")),
        "{e}"
    );
    c.stop().await;
}

#[tokio::test]
async fn tasks_can_be_listed_newest_first() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let ids = client
        .submit(&[
            sleep_task(10, 1, 0),
            sleep_task(10, 1, 0),
            sleep_task(10, 1, 0),
        ])
        .await;
    let (status, newest) = client.get("/api/v1/tasks?order=newest&limit=2").await;
    assert_eq!(status, 200);
    let got: Vec<&str> = newest
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()]);
    let (status, oldest) = client.get("/api/v1/tasks?limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(oldest[0]["task_id"], ids[0].as_str());
    let (status, e) = client.get("/api/v1/tasks?order=sideways").await;
    assert_eq!(status, 422, "{e}");
    assert_eq!(e["error"]["code"], "invalid");
    // A parameter the listing does not know is refused like one it cannot read (`limit=abc`),
    // naming it and the ones it knows: ignored, a typo of `status` listed every status, and
    // `offset` or `page` gave the first page again for ever.
    for query in ["state=failed", "offset=1000", "page=2"] {
        let (status, e) = client.get(&format!("/api/v1/tasks?{query}")).await;
        assert_eq!(status, 400, "{query}: {e}");
        assert_eq!(e["error"]["code"], "bad_request", "{query}: {e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        let name = query.split('=').next().unwrap_or_default();
        assert!(message.contains(&format!("`{name}`")), "{query}: {e}");
        for known in ["status", "limit", "order", "updated_since", "after_seq"] {
            assert!(message.contains(known), "{query}: {e}");
        }
    }
    // The worker list takes no parameter: `status` is refused, not ignored (it answered every
    // worker, which a client took for the filtered list).
    let (status, e) = client.get("/api/v1/workers?status=connected").await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    let message = e["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("`status`"), "{e}");
    let (status, e) = client.get("/api/v1/workers").await;
    assert_eq!(status, 200, "{e}");
    // The runs take a name and a limit, nothing else; a limit over 1000 is refused, not cut.
    let (status, e) = client.get("/api/v1/runs?status=failed").await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("`status`"),
        "{e}"
    );
    let (status, e) = client.get("/api/v1/runs?limit=1001").await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (422, Some("invalid")),
        "{e}"
    );
    let (status, runs) = client.get("/api/v1/runs?name=no-such-run").await;
    assert_eq!((status, runs), (200, json!([])));
    // Nor do the other endpoints take one: a query is refused, naming it, not ignored
    // (`/result?attempt=1` answered with the latest attempt's result).
    let id = ids[0].as_str();
    for path in [
        format!("/api/v1/tasks/{id}"),
        format!("/api/v1/tasks/{id}/result"),
        format!("/api/v1/tasks/{id}/state"),
        format!("/api/v1/tasks/{id}/checkpoints"),
        format!("/api/v1/tasks/{id}/checkpoints/c-1"),
        "/api/v1/workers/w-1".to_owned(),
        "/api/v1/overview".to_owned(),
        "/api/v1/history".to_owned(),
        "/api/v1/events".to_owned(),
    ] {
        let (status, e) = client.get(&format!("{path}?attempt=1&x")).await;
        assert_eq!(status, 400, "{path}: {e}");
        assert_eq!(e["error"]["code"], "bad_request", "{path}: {e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("`attempt`, `x`"), "{path}: {e}");
        assert!(message.contains(&format!("`{path}`")), "{path}: {e}");
    }
    for (path, body) in [
        (format!("/api/v1/tasks/{id}/pause?force=true"), json!({})),
        (
            "/api/v1/tasks?priority=high".to_owned(),
            json!({"kind": "sleep"}),
        ),
    ] {
        let (status, e) = client.post(&path, &body).await;
        assert_eq!(status, 400, "{path}: {e}");
        assert_eq!(e["error"]["code"], "bad_request", "{path}: {e}");
    }
    // Without one, they answer as ever (the events stream is read elsewhere).
    for path in [format!("/api/v1/tasks/{id}"), "/api/v1/overview".to_owned()] {
        let (status, e) = client.get(&path).await;
        assert_eq!(status, 200, "{path}: {e}");
    }
    c.stop().await;
}

#[tokio::test]
async fn a_client_that_lagged_gets_a_fresh_snapshot_and_no_sample_older_than_its_history() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.history_interval = Duration::from_millis(50);
    })
    .await;
    let (mut resp, mut buf, _) = open_events(&c).await;
    // The client stops reading; 20,000 changes of 2 KiB fill the sockets' buffers and overrun
    // its share of the change buffer (4,096), while samples pile up behind it.
    c.client().submit_padded("lag", 20000, 2048).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Reading again: what was written before the overrun, then `resync` and a fresh snapshot.
    let mut resynced = false;
    let snap = loop {
        let (name, v) = next_event(&mut resp, &mut buf).await.expect("an event");
        match name.as_str() {
            "resync" => resynced = true,
            "snapshot" => break v,
            _ => {}
        }
    };
    assert!(resynced, "the snapshot follows a resync");
    let last = snap["history"]
        .as_array()
        .and_then(|h| h.last())
        .and_then(|s| s["at"].as_str())
        .expect("the snapshot holds the chart's history")
        .to_owned();
    let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).expect("RFC 3339");
    // Samples after the snapshot are newer than its history: none that were queued before it.
    let mut after = 0;
    while after < 5 {
        let (name, v) = next_event(&mut resp, &mut buf).await.expect("an event");
        if name == "sample" {
            let t = v["at"].as_str().expect("at");
            assert!(
                at(t) >= at(&last),
                "sample of {t} after a snapshot whose history ends {last}"
            );
            after += 1;
        }
    }
    c.stop().await;
}

#[tokio::test]
async fn a_client_that_stopped_reading_its_event_stream_does_not_hold_up_the_stop() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (dir, c) = coordinator().await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer size");
    let mut stalled = socket.connect(c.addr).await.expect("connect");
    let request = format!("GET /api/v1/events HTTP/1.1\r\nHost: {}\r\n\r\n", c.addr);
    stalled
        .write_all(request.as_bytes())
        .await
        .expect("request");
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head).await.expect("status line");
    assert_eq!(&head[9..12], b"200");
    // Changes of 2 KiB each until the server's writes to it block: it is never read again.
    c.client().submit_padded("stall", 5000, 2048).await;
    tokio::time::timeout(tether_coordinator::server::DRAIN + DEADLINE, c.stop())
        .await
        .expect("the coordinator stops with a client that reads nothing");
    drop(stalled);
    // What was submitted is there after a restart.
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let (status, t) = c.client().get("/api/v1/tasks/stall-4999").await;
    assert_eq!(status, 200, "{t}");
    c.stop().await;
}

#[tokio::test]
async fn what_retention_removes_is_announced_on_the_event_stream() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.retention = Some(Duration::from_millis(500));
    })
    .await;
    let (mut resp, mut buf, _) = open_events(&c).await;
    let w = spawn_worker(
        fast_worker_config(&c.ws_url(), "short-lived"),
        Executors::builtin(),
    );
    let id = c.client().submit(&[sleep_task(10, 1, 0)]).await.remove(0);
    c.client().wait_status(&id, "completed").await;
    // The worker goes for good: lost after `lost_after`, then forgotten by retention.
    w.stop().await.expect("stop");
    let (mut task_gone, mut worker_gone) = (false, false);
    while !(task_gone && worker_gone) {
        let (name, v) = next_event(&mut resp, &mut buf).await.expect("an event");
        match name.as_str() {
            "task_removed" => task_gone |= v["task_id"] == id.as_str(),
            "worker_removed" => worker_gone |= v["worker_id"] == "short-lived",
            _ => {}
        }
    }
    assert_eq!(c.client().get(&format!("/api/v1/tasks/{id}")).await.0, 404);
    c.stop().await;
}

/// A coordinator whose `http_idle` is shorter than the event stream's 15 s keep-alive keeps a
/// quiet stream alive all the same: the keep-alive comes at a third of `http_idle` (the
/// stream was cut at `http_idle`, and a dashboard or `tether watch` reconnected for ever).
#[tokio::test]
async fn a_quiet_event_stream_outlives_a_short_http_idle() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.limits.http_idle = Duration::from_millis(600);
        // No chart sample within the test but the first: keep-alives alone move on the stream.
        cfg.history_interval = Duration::from_secs(3600);
    })
    .await;
    let (mut resp, _, _) = open_events(&c).await;
    // Five idle periods: every read ends in a chunk (a keep-alive comment), none in the end
    // of the stream.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut chunks = 0;
    let mut samples = 0;
    while tokio::time::Instant::now() < until {
        let chunk = tokio::time::timeout(DEADLINE, resp.chunk())
            .await
            .expect("a keep-alive in time");
        match chunk {
            Ok(Some(c)) if c.starts_with(b"event: sample") && samples == 0 => samples += 1,
            Ok(Some(c)) => {
                assert!(
                    c.starts_with(b":"),
                    "only keep-alives on a quiet stream: {c:?}"
                );
                chunks += 1;
            }
            other => panic!("the stream ended after {chunks} keep-alives: {other:?}"),
        }
    }
    assert!(chunks >= 3, "{chunks} keep-alives in 3 s");
    c.stop().await;
}
