//! A run (the tasks of one name) judged by its latest tries: the reading `tether watch --name`
//! and `tether retry --of` share, and `tether report`, a run's verdict as a table, JSON or a
//! JUnit XML file for a CI system.

use super::commands::name_param;
use super::table::*;
use super::*;
use futures_util::StreamExt as _;
use std::collections::{BTreeMap, HashMap};
use tether_proto::TaskStatus;

/// The tasks of these ids the coordinator has, by id: read as listings of the ids, as many a
/// request as the API takes, not one request each.
pub(super) async fn tasks_by_id<'a>(
    api: &Api,
    ids: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<BTreeMap<String, Value>> {
    let unique: BTreeSet<&str> = ids.into_iter().collect();
    let unique: Vec<&str> = unique.into_iter().collect();
    let mut found = BTreeMap::new();
    for ids in unique.chunks(tether_coordinator::http::LIST_IDS_MAX) {
        let path = format!("/api/v1/tasks?limit={}&ids={}", ids.len(), ids.join(","));
        for t in api.get(&path).await?.as_array().into_iter().flatten() {
            found.insert(s(&t["task_id"]), t.clone());
        }
    }
    Ok(found)
}

/// The latest try of one of a run's tasks.
pub(crate) struct Try {
    /// The latest try: the task itself, or the last retry of it, with the fields a run's
    /// readers look at ([`slim`]).
    pub task: Slim,
    /// What it runs ([`what_it_runs`]), read before its config was let go.
    pub what: String,
    /// How many tasks the chain holds, this one included: 1 for a task never retried.
    pub tries: usize,
    /// An earlier try ended failed or timed out (not one cancelled, say).
    pub failed_before: bool,
}

/// A task as a run's reading keeps it ([`slim`]): the fields the readers of a run look at,
/// typed, the rest let go (a field absent is `None`, or empty).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct Slim {
    pub task_id: String,
    #[serde(default)]
    pub status: String,
    pub error: Option<String>,
    pub retried_by: Option<String>,
    #[serde(default)]
    pub spec: SlimSpec,
    #[serde(default)]
    pub attempts: Vec<SlimAttempt>,
}

/// Of a task's spec, its run and what it retries.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct SlimSpec {
    pub name: Option<String>,
    pub retry_of: Option<String>,
}

/// Of an attempt, how and when it ended.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct SlimAttempt {
    pub end: Option<String>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub ended_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Task `t` as a run's reading keeps it, with what it runs: the fields the readers of a run
/// look at (its id, status, error, retry links, name, and its attempts' ends and times), the
/// rest let go (its config, up to a frame's size; its checkpoint's record, its lease, its
/// attempts' workers...), in a typed record, so that a run of many tasks costs the client
/// little a task. A task the coordinator listed that does not read as one is an error.
fn slim(t: Value) -> anyhow::Result<(Slim, String)> {
    let what = what_it_runs(&t["spec"]);
    let kept = <Slim as serde::Deserialize>::deserialize(&t).with_context(|| {
        format!(
            "the coordinator listed a task that does not read as one: {}",
            cut_line(&t.to_string(), 200)
        )
    })?;
    Ok((kept, what))
}

/// Whether task `t` ended failed or timed out, or had an attempt that did (one its spec's
/// `retry_on` ran again).
fn failed(t: &Slim) -> bool {
    TaskStatus::is_failure_end(Some(&t.status))
        || t.attempts
            .iter()
            .any(|a| TaskStatus::is_failure_end(a.end.as_deref()))
}

/// A run's latest tries ([`latest_tries_named`]).
pub(crate) struct RunTries {
    /// The latest try of each of the run's tasks, in the order the run's tasks were
    /// submitted.
    pub tries: Vec<Try>,
    /// How many tasks have the run's name.
    pub named: usize,
    /// How many of `tries` are retries named otherwise (`tether retry --of RUN --name NEW`).
    pub elsewhere: usize,
}

/// The latest try of each task submitted under `name`: the end of the chain of retries its
/// `retried_by` starts (each a task submitted with `retry_of`, under any name; a task never
/// retried is its own latest try). A task of the run that is the retry of another of its tasks
/// is a link of that task's chain, not a task of its own. The links the run does not hold are
/// read a link at a time for all the chains at once. None named is an error: a mistyped name
/// would otherwise be a run with nothing to judge, which passed.
pub(crate) async fn latest_tries_named(api: &Api, name: &str) -> anyhow::Result<RunTries> {
    let query = name_param(name);
    let mut pages = TaskPages::new(api, &query, 1000);
    let mut run = Vec::new();
    while let Some(page) = pages.next().await? {
        for t in page {
            run.push(slim(t)?);
        }
    }
    let named = run.len();
    if named == 0 {
        bail!(
            "no task named {name:?} at this coordinator (`tether tasks --name` lists a run's tasks)"
        );
    }
    // Each task once: in `known` until a chain takes it.
    let ids: Vec<String> = run.iter().map(|(t, _)| t.task_id.clone()).collect();
    let mut known: HashMap<String, (Slim, String)> = ids.iter().cloned().zip(run).collect();
    let first: Vec<&String> = ids
        .iter()
        .filter(|id| {
            let of = known[*id].0.spec.retry_of.as_deref();
            !of.is_some_and(|of| known.contains_key(of))
        })
        .collect();
    // Each chain from its first task (a task of the run that is no retry of another of its
    // tasks), followed below to its latest try.
    let mut chains: Vec<Try> = first
        .into_iter()
        .filter_map(|id| known.remove(id))
        .map(|(task, what)| Try {
            task,
            what,
            tries: 1,
            failed_before: false,
        })
        .collect();
    // Every task passed: a chain cannot loop, whatever the records say. And the retries the
    // coordinator no longer has (removed by retention before the task they repeat): that task
    // is the latest it has.
    let mut passed: BTreeSet<String> = chains.iter().map(|c| c.task.task_id.clone()).collect();
    let mut gone = BTreeSet::new();
    loop {
        // Follow each chain as far as the tasks known go; the links to read next.
        let mut wanted = BTreeSet::new();
        for c in &mut chains {
            while let Some(by) = c.task.retried_by.clone() {
                if passed.contains(&by) || gone.contains(&by) {
                    break;
                }
                let Some((next, what)) = known.remove(&by) else {
                    wanted.insert(by);
                    break;
                };
                c.failed_before |= failed(&c.task);
                (c.task, c.what) = (next, what);
                c.tries += 1;
                passed.insert(by);
            }
        }
        if wanted.is_empty() {
            break;
        }
        let mut found = tasks_by_id(api, wanted.iter().map(String::as_str)).await?;
        for by in wanted {
            match found.remove(&by) {
                Some(next) => {
                    known.insert(by, slim(next)?);
                }
                None => {
                    gone.insert(by);
                }
            }
        }
    }
    let elsewhere = chains
        .iter()
        .filter(|c| c.task.spec.name.as_deref() != Some(name))
        .count();
    Ok(RunTries {
        tries: chains,
        named,
        elsewhere,
    })
}

#[derive(Args)]
pub struct ReportArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The run: the tasks submitted under this name (`tether submit --name`), each judged by
    /// its latest try (the task, or the last retry of it).
    #[arg(long, value_parser = parse_name)]
    name: String,
    /// Also write the run as JUnit XML to this file (`-`: to stdout, instead of the table),
    /// for a CI system: a test case a task, named by what it runs; a failure with the error
    /// and the output its worker kept; a task that completed after a failure marked flaky.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Also read each task's figures: the `output` its result carries (what a `command` task
    /// wrote to `$TETHER_RESULT_FILE`), in the JSON beside each task and in JUnit as the
    /// property `output`. One request a task (8 at once), where only the failures' results are
    /// read otherwise.
    #[arg(long)]
    outputs: bool,
}

impl ReportArgs {
    /// What clap cannot check value by value: the command's own usage errors.
    pub fn check(&self) -> Result<(), String> {
        if self.common.json && self.junit.as_deref() == Some(std::path::Path::new("-")) {
            return Err("--json and --junit - both write to stdout: give --junit a file".into());
        }
        Ok(())
    }
}

/// Most results read at once for a report's failures.
const RESULTS_AT_ONCE: usize = 8;

/// Longest text of a task's command a report shows.
const WHAT_SHOWN: usize = 200;

/// One of a run's tasks in a report: its latest try and what the report says of it.
struct Case {
    try_: Try,
    /// Of the counted result of its latest try, when read (one that failed or timed out, or
    /// with `--outputs` every one), what the report says.
    result: Option<Kept>,
}

/// What a report keeps of a counted result: its error, the output tails its worker kept, its
/// figures; each `None` when the result has none (the row's other fields let go as it is
/// read, so that a report over a large run holds little a result).
#[derive(Debug, Default)]
struct Kept {
    error: Option<String>,
    stdout_tail: Option<String>,
    stderr_tail: Option<String>,
    output: Option<Value>,
}

impl Kept {
    /// Of a result row as `GET /api/v1/tasks/{id}/result` lists it.
    fn of(row: &Value) -> Self {
        let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        let result = &row["body"]["result"];
        Kept {
            error: text(&row["body"]["error"]["message"]),
            stdout_tail: text(&result["stdout_tail"]),
            stderr_tail: text(&result["stderr_tail"]),
            output: Some(result["output"].clone()).filter(|v| !v.is_null()),
        }
    }
}

impl Case {
    fn status(&self) -> &str {
        &self.try_.task.status
    }

    /// Completed after a failure: of an earlier try, or of an earlier attempt of its latest.
    fn flaky(&self) -> bool {
        let attempts = &self.try_.task.attempts;
        let earlier = &attempts[..attempts.len().saturating_sub(1)];
        self.status() == "completed"
            && (self.try_.failed_before
                || earlier
                    .iter()
                    .any(|a| TaskStatus::is_failure_end(a.end.as_deref())))
    }

    /// Its latest try's last attempt, from its start to its end, in seconds.
    fn took(&self) -> Option<f64> {
        let a = self.try_.task.attempts.last()?;
        let (start, end) = (a.started_at?, a.ended_at?);
        Some((end - start).num_milliseconds().max(0) as f64 / 1000.0)
    }

    /// How many attempts its latest try had.
    fn attempts(&self) -> usize {
        self.try_.task.attempts.len()
    }

    fn of(try_: Try) -> Self {
        Case { try_, result: None }
    }

    /// The error the latest try ended with, if any: the coordinator's, or its result's.
    fn error(&self) -> Option<String> {
        self.try_
            .task
            .error
            .as_deref()
            .or_else(|| self.result.as_ref()?.error.as_deref())
            .map(str::to_owned)
    }

    /// The tail of its latest try's stdout its worker kept, when it was read and the executor
    /// keeps one (`command`).
    fn stdout(&self) -> Option<&str> {
        self.result.as_ref()?.stdout_tail.as_deref()
    }

    /// The same of its stderr.
    fn stderr(&self) -> Option<&str> {
        self.result.as_ref()?.stderr_tail.as_deref()
    }

    /// The figures its latest try left (`output`), when its result was read and has them.
    fn figures(&self) -> Option<&Value> {
        self.result.as_ref()?.output.as_ref()
    }

    /// Its line of `--json`; `output` with `outputs` (`null` for none).
    fn json(&self, outputs: bool) -> Value {
        let t = &self.try_.task;
        let mut v = json!({
            "task_id": t.task_id,
            "status": t.status,
            "tries": self.try_.tries,
            "attempts": self.attempts(),
            "took_s": self.took(),
            "what": self.try_.what,
            "error": self.error(),
            "flaky": self.flaky(),
        });
        if outputs {
            v["output"] = self.figures().cloned().unwrap_or(Value::Null);
        }
        v
    }
}

/// What a task runs, in a line: a `command` task's script or program and arguments, another
/// kind's name and config; cut to [`WHAT_SHOWN`].
fn what_it_runs(spec: &Value) -> String {
    let config = &spec["config"];
    let text = match (spec["kind"].as_str(), config["shell"].as_str()) {
        (Some("command"), Some(script)) => script.to_owned(),
        (Some("command"), None) => {
            let args = config["args"].as_array().into_iter().flatten().map(s);
            std::iter::once(s(&config["program"]))
                .chain(args)
                .collect::<Vec<_>>()
                .join(" ")
        }
        _ => format!("{} {}", s(&spec["kind"]), config),
    };
    cut_line(&shown(&text), WHAT_SHOWN)
}

/// `tether report --name RUN`: the run's tasks by their latest tries, as a table (or JSON), and
/// with `--junit` as JUnit XML; exit 0 only if every latest try completed.
pub async fn report(a: ReportArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let run = latest_tries_named(&api, &a.name).await?;
    let mut cases: Vec<Case> = run.tries.into_iter().map(Case::of).collect();
    // The results of those that failed, for their error and output (with --outputs, of every
    // one that ended, for its figures); a few requests at once.
    let unfinished: Vec<usize> = (0..cases.len())
        .filter(|&i| match cases[i].status() {
            s if TaskStatus::is_failure_end(Some(s)) => true,
            s => a.outputs && matches!(s, "completed" | "cancelled"),
        })
        .collect();
    let paths: Vec<String> = unfinished
        .iter()
        .map(|&i| format!("/api/v1/tasks/{}/result", cases[i].try_.task.task_id))
        .collect();
    // Each answer is cut to what the report keeps as it comes, not all held whole first.
    let mut results = futures_util::stream::iter(&paths)
        .map(|p| api.get(p))
        .buffered(RESULTS_AT_ONCE);
    for i in unfinished {
        let Some(r) = results.next().await else {
            break;
        };
        cases[i].result = r?
            .as_array()
            .and_then(|all| all.iter().find(|r| r["stale"] == false))
            .map(Kept::of);
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for c in &cases {
        *counts.entry(c.status().to_owned()).or_default() += 1;
    }
    let completed = counts.get("completed").copied().unwrap_or(0);
    let flaky = cases.iter().filter(|c| c.flaky()).count();
    let to_stdout = a.junit.as_deref() == Some(std::path::Path::new("-"));
    if let Some(path) = &a.junit {
        // Written as it is made, not held whole first.
        let written = match to_stdout {
            true => junit(
                std::io::BufWriter::new(std::io::stdout().lock()),
                &a.name,
                &cases,
            )
            .and_then(|mut w| std::io::Write::flush(&mut w)),
            false => std::fs::File::create(path)
                .and_then(|f| junit(std::io::BufWriter::new(f), &a.name, &cases))
                .and_then(|mut w| std::io::Write::flush(&mut w)),
        };
        match written {
            Ok(()) => {}
            Err(e) if to_stdout && e.kind() == std::io::ErrorKind::BrokenPipe => {
                return Err(crate::output::Closed.into());
            }
            Err(e) if to_stdout => {
                return Err(anyhow::Error::new(e).context("cannot write to standard output"));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot write the JUnit XML to {}", path.display())));
            }
        }
    }
    if a.common.json {
        let head = json!({
            "name": a.name,
            "counts": counts,
            "flaky": flaky,
            "passed": completed == cases.len(),
        });
        write_json(&head, &cases, a.outputs, crate::output::part)?;
    } else if !to_stdout {
        let rows: Vec<Vec<String>> = cases
            .iter()
            .map(|c| {
                vec![
                    shown(&c.try_.task.task_id),
                    match c.flaky() {
                        true => "completed (flaky)".to_owned(),
                        false => shown(c.status()),
                    },
                    c.try_.tries.to_string(),
                    c.attempts().to_string(),
                    c.took().map_or_else(String::new, |s| format!("{s:.1} s")),
                    c.try_.what.clone(),
                ]
            })
            .collect();
        print_table(
            &["TASK", "STATUS", "TRIES", "ATTEMPTS", "TOOK", "WHAT"],
            &rows,
        )?;
        for c in cases.iter().filter(|c| c.status() != "completed") {
            if let Some(e) = c.error() {
                outln!(
                    "{} {}: {}",
                    shown(&c.try_.task.task_id),
                    shown(c.status()),
                    shown(&e)
                )?;
            }
        }
        let said: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
        outln!(
            "run {:?}: {} tasks: {}{}",
            a.name,
            cases.len(),
            said.join(", "),
            match flaky {
                0 => String::new(),
                n => format!(" ({n} after a failure: flaky)"),
            }
        )?;
    }
    if completed < cases.len() {
        bail!(
            "{} of the {} tasks of run {:?} did not complete",
            cases.len() - completed,
            cases.len(),
            a.name
        );
    }
    Ok(())
}

/// Writes the report's `--json` document to `out` (a line): `head`'s fields and the cases as
/// `tasks`, a part at a time as they are made, so that a large run's document is never held
/// whole. The keys in the order serde_json writes a map's (sorted: `tasks` comes last).
fn write_json(
    head: &Value,
    cases: &[Case],
    outputs: bool,
    mut out: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    const PART: usize = 64 * 1024;
    let head = head.to_string();
    let mut buf = String::with_capacity(PART + 1024);
    buf.push_str(head.strip_suffix('}').unwrap_or(&head));
    buf.push_str(",\"tasks\":[");
    for (i, c) in cases.iter().enumerate() {
        if i > 0 {
            buf.push(',');
        }
        buf.push_str(&c.json(outputs).to_string());
        if buf.len() >= PART {
            out(&buf)?;
            buf.clear();
        }
    }
    buf.push_str("]}\n");
    out(&buf)
}

/// The run as a JUnit XML document: one test suite, a test case a task (its latest try),
/// named by what it runs (the task's id added where two run the same). A task that failed or
/// timed out is a `failure`, one cancelled `skipped`, one not ended an `error`; the error and
/// the output its worker kept go with it. Written to `out`, which is given back.
fn junit<W: std::io::Write>(out: W, name: &str, cases: &[Case]) -> std::io::Result<W> {
    use quick_xml::events::{BytesDecl, Event};
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for c in cases {
        *seen.entry(&c.try_.what).or_default() += 1;
    }
    let count = |f: &dyn Fn(&Case) -> bool| cases.iter().filter(|c| f(c)).count().to_string();
    let failures = count(&|c| TaskStatus::is_failure_end(Some(c.status())));
    let skipped = count(&|c| c.status() == "cancelled");
    let errors = count(&|c| !TaskStatus::parse(c.status()).is_some_and(TaskStatus::is_terminal));
    let time = format!("{:.3}", cases.iter().filter_map(Case::took).sum::<f64>());
    let tests = cases.len().to_string();
    let mut w = quick_xml::Writer::new_with_indent(out, b' ', 2);
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
    let suite = [
        ("name", xml_text(name)),
        ("tests", tests),
        ("failures", failures),
        ("errors", errors),
        ("skipped", skipped),
        ("time", time),
    ];
    let suite: Vec<(&str, &str)> = suite.iter().map(|(k, v)| (*k, v.as_str())).collect();
    w.create_element("testsuites")
        .with_attributes(suite.iter().copied())
        .write_inner_content(|w| {
            w.create_element("testsuite")
                .with_attributes(suite.iter().copied())
                .write_inner_content(|w| {
                    for c in cases {
                        test_case(w, name, c, seen[c.try_.what.as_str()] > 1)?;
                    }
                    Ok(())
                })?;
            Ok(())
        })?;
    let mut out = w.into_inner();
    out.write_all(b"\n")?;
    Ok(out)
}

/// One task's `testcase` element ([`junit`]).
fn test_case<W: std::io::Write>(
    w: &mut quick_xml::Writer<W>,
    run: &str,
    c: &Case,
    same_what: bool,
) -> std::io::Result<()> {
    use quick_xml::events::BytesText;
    let id = shown(&c.try_.task.task_id);
    let name = match same_what {
        true => format!("{} [{id}]", c.try_.what),
        false => c.try_.what.clone(),
    };
    let time = format!("{:.3}", c.took().unwrap_or(0.0));
    let (name, run) = (xml_text(&name), xml_text(run));
    let attrs = [
        ("name", name.as_str()),
        ("classname", run.as_str()),
        ("time", time.as_str()),
    ];
    w.create_element("testcase")
        .with_attributes(attrs)
        .write_inner_content(|w| {
            let tries = c.try_.tries.to_string();
            let attempts = c.attempts().to_string();
            let flaky = c.flaky().to_string();
            let figures = c.figures().map(|v| xml_text(&v.to_string()));
            w.create_element("properties").write_inner_content(|w| {
                let output = figures.as_deref().map(|v| ("output", v));
                for (k, v) in [
                    ("task_id", id.as_str()),
                    ("tries", tries.as_str()),
                    ("attempts", attempts.as_str()),
                    ("flaky", flaky.as_str()),
                ]
                .into_iter()
                .chain(output)
                {
                    w.create_element("property")
                        .with_attributes([("name", k), ("value", v)])
                        .write_empty()?;
                }
                Ok(())
            })?;
            let status = c.status();
            let error = xml_text(&c.error().unwrap_or_else(|| status.to_owned()));
            let stderr = c.stderr().map(xml_text);
            match status {
                "completed" => {}
                "failed" | "timed_out" => {
                    let failure = w
                        .create_element("failure")
                        .with_attributes([("message", error.as_str()), ("type", status)]);
                    match &stderr {
                        Some(text) => failure.write_text_content(BytesText::new(text))?,
                        None => failure.write_empty()?,
                    };
                }
                "cancelled" => {
                    w.create_element("skipped")
                        .with_attribute(("message", error.as_str()))
                        .write_empty()?;
                }
                other => {
                    let said = format!("not ended: {other}");
                    w.create_element("error")
                        .with_attributes([("message", said.as_str()), ("type", "not_ended")])
                        .write_empty()?;
                }
            }
            if let Some(out) = c.stdout() {
                w.create_element("system-out")
                    .write_text_content(BytesText::new(&xml_text(out)))?;
            }
            if let Some(err) = &stderr {
                w.create_element("system-err")
                    .write_text_content(BytesText::new(err))?;
            }
            Ok(())
        })?;
    Ok(())
}

/// `text` as XML 1.0 may hold it: a character it forbids (a control character other than tab,
/// newline and carriage return, as in a terminal's colour codes) is written as `\xNN`; the
/// writer escapes the rest.
fn xml_text(text: &str) -> String {
    let allowed = |c: char| {
        matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
    };
    match text.chars().all(allowed) {
        true => text.to_owned(),
        false => text
            .chars()
            .map(|c| match allowed(c) {
                true => c.to_string(),
                false => format!("\\x{:02x}", u32::from(c)),
            })
            .collect(),
    }
}

#[derive(Args)]
pub struct RunsArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Only the run of this name.
    #[arg(long, value_parser = parse_name)]
    name: Option<String>,
    /// At most this many runs, the newest (by its latest submission) first.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    limit: u64,
}

const RUNS_HEAD: [&str; 8] = [
    "RUN",
    "VERDICT",
    "TASKS",
    "LATEST TRIES",
    "RETRIED",
    "FLAKY",
    "LAST SUBMITTED",
    "TOOK",
];

/// `tether runs`: the newest runs as the coordinator judges them (`GET /api/v1/runs`), each
/// by its tasks' latest tries; `tether report --name` has one in detail.
pub async fn runs(a: RunsArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let mut path = format!("/api/v1/runs?limit={}", a.limit);
    if let Some(name) = &a.name {
        path = format!("{path}&{}", name_param(name));
    }
    let v = api.get(&path).await?;
    if a.common.json {
        outln!("{v}")?;
        return Ok(());
    }
    if v.as_array().is_none_or(Vec::is_empty) {
        match &a.name {
            Some(name) => eprintln!("no task named {:?} at this coordinator", shown(name)),
            None => eprintln!("no run yet: tasks submitted under one name (`--name`) make one"),
        }
        return Ok(());
    }
    print_table(&RUNS_HEAD, &rows_of(&v, run_row))?;
    Ok(())
}

/// A run's row in `tether runs`.
fn run_row(r: &Value) -> Vec<String> {
    let statuses = r["by_status"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(status, n)| format!("{n} {status}"))
        .collect::<Vec<_>>()
        .join(", ");
    let took = [&r["first_submitted_at"], &r["finished_at"]].map(|t| {
        t.as_str()
            .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
    });
    let took = match took {
        [Some(from), Some(to)] => span((to - from).num_seconds()),
        _ => "-".to_owned(),
    };
    vec![
        s(&r["name"]),
        s(&r["verdict"]),
        r["tasks"].to_string(),
        statuses,
        r["retried"].to_string(),
        r["flaky"].to_string(),
        when(&r["last_submitted_at"]),
        took,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A case of a latest try with `status` that runs `what`, after `tries - 1` earlier tries
    /// (each failed), its attempts ending `ends`.
    fn case(status: &str, what: &str, tries: usize, ends: &[&str], result: Option<Value>) -> Case {
        let attempts: Vec<Value> = ends
            .iter()
            .map(|end| {
                json!({"end": end, "started_at": "2026-12-07T10:00:00Z",
                       "ended_at": "2026-12-07T10:00:01.5Z"})
            })
            .collect();
        let task = json!({
            "task_id": format!("t-{status}-{tries}"),
            "status": status,
            "spec": {"kind": "command", "config": {"shell": what}},
            "attempts": attempts,
        });
        let (task, what) = slim(task).expect("a task");
        let mut c = Case::of(Try {
            task,
            what,
            tries,
            failed_before: tries > 1,
        });
        c.result = result.as_ref().map(Kept::of);
        c
    }

    /// An element read back: its name, attributes and text.
    struct Element {
        name: String,
        attrs: Vec<(String, String)>,
        text: String,
    }

    impl Element {
        fn attr(&self, key: &str) -> &str {
            self.attrs
                .iter()
                .find(|(k, _)| k == key)
                .map_or("", |(_, v)| v.as_str())
        }
    }

    /// Every element of a document with its attributes and text, read back by an XML parser:
    /// a document the parser refuses fails the test.
    fn read_back(xml: &[u8]) -> Vec<Element> {
        use quick_xml::events::{BytesStart, Event};
        let element = |e: &BytesStart| {
            let attrs = e
                .attributes()
                .map(|a| {
                    let a = a.expect("an attribute");
                    let v = a.unescape_value().expect("a value").into_owned();
                    (String::from_utf8_lossy(a.key.as_ref()).into_owned(), v)
                })
                .collect();
            Element {
                name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                attrs,
                text: String::new(),
            }
        };
        let mut r = quick_xml::Reader::from_reader(xml);
        let (mut out, mut open, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let text = match r.read_event_into(&mut buf).expect("well-formed XML") {
                Event::Start(e) => {
                    open.push(out.len());
                    out.push(element(&e));
                    None
                }
                Event::Empty(e) => {
                    out.push(element(&e));
                    None
                }
                Event::End(_) => {
                    open.pop();
                    None
                }
                Event::Text(t) => Some(t.decode().expect("text").into_owned()),
                Event::GeneralRef(g) => Some(
                    match g.decode().expect("a reference").as_ref() {
                        "lt" => "<",
                        "gt" => ">",
                        "amp" => "&",
                        "quot" => "\"",
                        "apos" => "'",
                        other => panic!("an unexpected reference {other}"),
                    }
                    .to_owned(),
                ),
                Event::Eof => return out,
                _ => None,
            };
            // Text inside an element's own start and end (the writer's indentation between
            // elements belongs to the element around them).
            if let (Some(text), Some(&i)) = (text, open.last()) {
                out[i].text.push_str(&text);
            }
            buf.clear();
        }
    }

    /// The JUnit document counts each kind of end, names each case by what it runs (the id
    /// added to two that run the same), carries a failure's error and the output its worker
    /// kept, escaped, with the control characters XML forbids written out, and marks a task
    /// that completed after a failure flaky.
    #[test]
    fn a_run_in_junit_counts_its_ends_and_carries_each_failure_with_its_output() {
        let failed = json!({"stale": false, "body": {
            "error": {"message": "exit status 3"},
            "result": {"stderr_tail": "assert 1 < 2 & \u{1b}[31mred\u{1b}[0m\n", "stdout_tail": "ran 4 tests"},
        }});
        let figures = json!({"stale": false, "body": {"result": {"output": {"p50_ms": 1.5}}}});
        let cases = [
            case("completed", "pytest a.py", 1, &["completed"], Some(figures)),
            case(
                "completed",
                "pytest b.py",
                1,
                &["failed", "completed"],
                None,
            ),
            case("failed", "pytest c.py <x>", 2, &["failed"], Some(failed)),
            case("timed_out", "pytest d.py", 1, &["timed_out"], None),
            case("cancelled", "pytest e.py", 1, &["cancelled"], None),
            case("running", "same", 1, &[], None),
            case("queued", "same", 1, &[], None),
        ];
        let xml = junit(Vec::new(), "nightly \"42\"", &cases).expect("written");
        let doc = read_back(&xml);
        let suite = doc.iter().find(|e| e.name == "testsuite").expect("a suite");
        for (key, want) in [
            ("name", "nightly \"42\""),
            ("tests", "7"),
            ("failures", "2"),
            ("skipped", "1"),
            ("errors", "2"),
            ("time", "7.500"),
        ] {
            assert_eq!(suite.attr(key), want, "{key}");
        }
        let names: Vec<&str> = doc
            .iter()
            .filter(|e| e.name == "testcase")
            .map(|e| e.attr("name"))
            .collect();
        assert_eq!(
            names,
            [
                "pytest a.py",
                "pytest b.py",
                "pytest c.py <x>",
                "pytest d.py",
                "pytest e.py",
                "same [t-running-1]",
                "same [t-queued-1]"
            ]
        );
        // The values of the cases' properties named `name`, in order.
        let property = |name: &str| -> Vec<&str> {
            doc.iter()
                .filter(|e| e.name == "property" && e.attr("name") == name)
                .map(|e| e.attr("value"))
                .collect()
        };
        assert_eq!(
            property("flaky"),
            ["false", "true", "false", "false", "false", "false", "false"]
        );
        let outputs = property("output");
        assert_eq!(
            outputs,
            [r#"{"p50_ms":1.5}"#],
            "the figures of the one read"
        );
        let failure = doc.iter().find(|e| e.name == "failure").expect("a failure");
        assert_eq!(failure.attr("message"), "exit status 3");
        assert_eq!(failure.attr("type"), "failed");
        assert_eq!(failure.text, "assert 1 < 2 & \\x1b[31mred\\x1b[0m\n");
        let out = doc
            .iter()
            .find(|e| e.name == "system-out")
            .expect("its stdout");
        assert_eq!(out.text, "ran 4 tests");
        let timed_out = doc
            .iter()
            .filter(|e| e.name == "failure")
            .nth(1)
            .expect("the timeout");
        assert_eq!(timed_out.attr("type"), "timed_out");
        let not_ended: Vec<&str> = doc
            .iter()
            .filter(|e| e.name == "error")
            .map(|e| e.attr("message"))
            .collect();
        assert_eq!(not_ended, ["not ended: running", "not ended: queued"]);
    }

    /// The `--json` document written a part at a time is the one serde_json writes whole, in
    /// parts of at most about 64 KiB, however many tasks.
    #[test]
    fn the_json_report_written_in_parts_is_the_whole_document() {
        let cases: Vec<Case> = (0..2_000)
            .map(|i| {
                case(
                    "completed",
                    &format!("make test-{i}"),
                    1,
                    &["completed"],
                    None,
                )
            })
            .collect();
        let head = json!({"name": "r", "counts": {"completed": 2_000}, "flaky": 0, "passed": true});
        let mut parts = Vec::new();
        write_json(&head, &cases, false, |p| {
            parts.push(p.to_owned());
            Ok(())
        })
        .expect("written");
        assert!(parts.len() > 1, "in parts");
        assert!(parts.iter().all(|p| p.len() < 70 * 1024));
        let mut whole = head.clone();
        whole["tasks"] = cases.iter().map(|c| c.json(false)).collect();
        assert_eq!(parts.concat(), format!("{whole}\n"));
        // No task: an empty list.
        let mut parts = String::new();
        write_json(&head, &[], false, |p| {
            parts.push_str(p);
            Ok(())
        })
        .expect("written");
        let v: Value = serde_json::from_str(&parts).expect("JSON");
        assert_eq!(v["tasks"], json!([]));
    }

    /// What makes a completed task flaky: an earlier try or attempt that failed or timed out;
    /// one cancelled is no failure.
    #[test]
    fn a_failure_before_is_an_end_failed_or_timed_out() {
        let t = |status: &str, ends: &[&str]| {
            let attempts: Vec<Value> = ends.iter().map(|e| json!({"end": e})).collect();
            let task = json!({"task_id": "t-1", "status": status, "attempts": attempts});
            failed(&slim(task).expect("a task").0)
        };
        assert!(t("failed", &["failed"]));
        assert!(t("timed_out", &["timed_out"]));
        assert!(
            t("completed", &["failed", "completed"]),
            "retried on failure"
        );
        assert!(!t("cancelled", &["cancelled"]));
        assert!(!t("cancelled", &["lost", "cancelled"]));
        assert!(!t("completed", &["worker_fault", "completed"]));
    }

    #[test]
    fn a_task_is_named_by_what_it_runs() {
        let of = |spec: Value| what_it_runs(&spec);
        assert_eq!(
            of(json!({"kind": "command", "config": {"program": "make", "args": ["bench", "-j2"]}})),
            "make bench -j2"
        );
        assert_eq!(
            of(json!({"kind": "command", "config": {"shell": "make && ./t"}})),
            "make && ./t"
        );
        assert_eq!(
            of(json!({"kind": "sleep", "config": {"ms": 5}})),
            r#"sleep {"ms":5}"#
        );
        assert!(
            of(json!({"kind": "command", "config": {"shell": "x".repeat(500)}}))
                .chars()
                .count()
                <= WHAT_SHOWN + 1
        );
    }
}
