//! The client commands: submit, tasks, task, workers and the controls.

use super::runs::{latest_tries_named, tasks_by_id};
use super::table::*;
use super::*;
use futures_util::StreamExt as _;
use std::collections::BTreeMap;
use tether_coordinator::model::REDACTED;
use tether_proto::task::{MAX_ATTEMPTS, MAX_LABELS};

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// A JSON file with one spec or `{"tasks": [specs]}`: the spec comes from the file alone, so
    /// every flag that would shape it is refused beside this one, rather than ignored.
    #[arg(long, conflicts_with = "command")]
    file: Option<PathBuf>,
    /// Priority: high (1), normal (5), low (9), or 0 (most urgent) to 9.
    #[arg(long, default_value = "normal", value_parser = parse_priority, conflicts_with = "file")]
    priority: u8,
    /// A capability the worker must have (repeatable): not blank, at most 256 bytes (the API's
    /// rules, checked as the arguments are read).
    #[arg(long = "require", value_parser = parse_require, conflicts_with = "file")]
    requires: Vec<String>,
    /// Timeout, e.g. 10m: more than zero, in whole milliseconds.
    #[arg(long, value_parser = parse_timeout, conflicts_with = "file")]
    timeout: Option<std::time::Duration>,
    /// Attempts the task gets (each lease is one, lost with its worker or ended as
    /// --retry-on names): 1 to 100 (the API's cap); default 3.
    #[arg(
        long,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_ATTEMPTS)),
        conflicts_with = "file"
    )]
    max_attempts: Option<u32>,
    /// Run the task again when an attempt ends so, while it has attempts left: `failed`,
    /// `timed_out`, or both (`--retry-on failed,timed_out`); for a flaky test. The last
    /// attempt's end is the task's; each attempt's result is kept (`tether task`).
    #[arg(
        long = "retry-on",
        value_parser = parse_retry_on,
        value_delimiter = ',',
        conflicts_with = "file"
    )]
    retry_on: Vec<tether_proto::RetryOn>,
    /// A label shown in listings, and a run's handle: `tether tasks --name` lists the tasks
    /// submitted under it, `tether watch --name` follows them. With `--file`, every task of the
    /// file gets it (one the file names otherwise is refused). At most 1024 bytes (the API's
    /// limit, checked as the arguments are read).
    #[arg(long, value_parser = parse_name)]
    name: Option<String>,
    /// The task's id (default: one the coordinator makes). While the coordinator keeps the task
    /// (a `--retention` removes ended ones), the id names it: a submission sent again with the
    /// same id and the same spec (its reply lost) makes nothing and exits 0, saying the task
    /// was already submitted; one with another spec is refused (HTTP 409), naming what
    /// differs. Checked against the id rules as the arguments are read: a bad one is a usage
    /// error.
    #[arg(long, conflicts_with = "file")]
    id: Option<tether_proto::TaskId>,
    /// A tag the worker must carry, KEY=VALUE (repeatable): a key not blank, each at most 256
    /// bytes (the API's rules, checked as the arguments are read); a key given again with
    /// another value is refused (a task carries one value a key).
    #[arg(long = "tag", value_parser = parse_tag, conflicts_with = "file")]
    tags: Vec<(String, String)>,
    /// An environment variable for the command, KEY=VALUE (repeatable); a key given again with
    /// another value is refused (a command has one value a variable).
    #[arg(long = "env", value_parser = parse_key_value, conflicts_with = "file")]
    env: Vec<(String, String)>,
    /// The command's working directory on the worker: an absolute path (a relative one would
    /// depend on where the worker was started, and is refused as the arguments are read).
    #[arg(long, value_parser = parse_cwd, conflicts_with = "file")]
    cwd: Option<String>,
    /// A script run with `/bin/sh -c` on the worker, instead of a command line after `--`.
    #[arg(long, conflicts_with_all = ["command", "file"])]
    shell: Option<String>,
    /// The task's kind: the executor that runs it (`command`, `sleep`, or one the fleet's
    /// workers registered); 1 to 64 characters.
    #[arg(long, default_value = "command", value_parser = parse_kind, conflicts_with = "file")]
    kind: String,
    /// The task's config, as JSON: its kind's keys (docs/OPERATIONS.md, "Task kinds and their
    /// configs"), e.g. `--kind sleep --config '{"ms": 5000}'`, or a `command`'s `tail_bytes`
    /// and `checkpoint_poll_ms`. Instead of a command after `--`, `--shell`, `--env` and
    /// `--cwd`, which make a `command`'s config. A built-in kind's config is checked as the
    /// coordinator checks it, before any request.
    #[arg(long, value_parser = parse_config, conflicts_with_all = ["file", "command", "shell", "env", "cwd"])]
    config: Option<Value>,
    /// Then follow the submitted tasks until each has ended, as `tether watch` does (exit 0
    /// only if all completed).
    #[arg(long)]
    pub(crate) watch: bool,
    /// The command line to run, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        // The value itself is not repeated: clap quotes it (cut when long, see `main`).
        _ => Err("use KEY=VALUE".to_owned()),
    }
}

/// What the coordinator says of a spec holding only what `set` puts in it: its rules for one
/// flag's value ([`TaskSpec::validate`], the function it refuses a submission with), so that a
/// value it would refuse is a usage error naming the flag, found before any request, in the
/// same words and by the same limits.
fn api_check(set: impl FnOnce(&mut TaskSpec)) -> Result<(), String> {
    let mut spec = TaskSpec::new("command", Value::Null);
    set(&mut spec);
    spec.validate()
}

/// `--cwd`: a directory on the worker, so an absolute path, as the `command` executor (and the
/// coordinator, by its check) takes only; a relative one was sent, and failed on the worker.
fn parse_cwd(s: &str) -> Result<String, String> {
    // The value itself is not repeated: clap quotes it (cut when long, see `main`).
    match std::path::Path::new(s).is_absolute() {
        true => Ok(s.to_owned()),
        false => Err("the working directory must be an absolute path on the worker".to_owned()),
    }
}

fn parse_kind(s: &str) -> Result<String, String> {
    api_check(|spec| spec.kind = s.to_owned())?;
    Ok(s.to_owned())
}

/// `--config`: JSON, said where it is not (clap quotes the value).
fn parse_config(s: &str) -> Result<Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

fn parse_require(s: &str) -> Result<String, String> {
    api_check(|spec| spec.requires = vec![s.to_owned()])?;
    Ok(s.to_owned())
}

pub(crate) fn parse_name(s: &str) -> Result<String, String> {
    api_check(|spec| spec.name = Some(s.to_owned()))?;
    Ok(s.to_owned())
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = parse_key_value(s)?;
    api_check(|spec| _ = spec.tags.insert(k.clone(), v.clone()))?;
    Ok((k, v))
}

impl SubmitArgs {
    /// What the coordinator would refuse of the whole submission and clap cannot see value by
    /// value, found before any request (`main` makes it a usage error, exit 2): a `--tag` key
    /// or an `--env` variable given twice with different values, more
    /// `--require`s or `--tag`s than a spec may hold ([`MAX_LABELS`], the bound
    /// [`TaskSpec::validate`] holds them to), and a command the `command` executor refuses
    /// (the check the coordinator makes of it at submission, e.g. an empty program or an
    /// `--env` the worker sets itself). With `--file`: a spec in it that parses but that
    /// [`TaskSpec::validate`] or its built-in executor (`sleep`, `command`) refuses; one that
    /// does not parse is left to the coordinator,
    /// which says where (line and column), and a file that cannot be read or is not JSON to
    /// the submission, which says so.
    pub(crate) fn check(&self) -> Result<(), String> {
        if let Some(f) = &self.file {
            return check_file(f, self.name.as_deref());
        }
        // One key given two values: the last was kept in silence.
        crate::one_value_a_key("--tag", &self.tags, "a task carries one value a key")?;
        crate::one_value_a_key("--env", &self.env, "a command has one value a variable")?;
        let tags: BTreeSet<&str> = self.tags.iter().map(|(k, _)| k.as_str()).collect();
        for (flag, given, what) in [
            ("--require", self.requires.len(), "capabilities"),
            ("--tag", tags.len(), "tags"),
        ] {
            if given > MAX_LABELS {
                return Err(format!(
                    "{given} {what} given ({flag}); a task may ask for at most {MAX_LABELS} (the \
                     API's limit)"
                ));
            }
        }
        // Nothing to run: refused here, with the usage, as every other refused input (it was
        // the run's error, exit 1).
        let config = spec_config(self)?;
        let check = crate::run::builtin_config_check();
        match (check.0)(&self.kind, &config.to_string()) {
            Some(Err(why)) if self.config.is_none() && self.kind == "command" => {
                Err(format!("the command executor refuses this command: {why}"))
            }
            Some(Err(why)) => Err(format!(
                "the `{}` executor refuses this --config: {why}",
                self.kind
            )),
            _ => Ok(()),
        }
    }
}

/// `--file`'s checks ([`SubmitArgs::check`]), with the `--name` given for all its tasks.
fn check_file(f: &std::path::Path, name: Option<&str>) -> Result<(), String> {
    // One that cannot be read or is not JSON is said as the submission reads it.
    let Some((text, v)) = std::fs::read_to_string(f).ok().and_then(|text| {
        let v = serde_json::from_str::<Value>(&text).ok()?;
        Some((text, v))
    }) else {
        return Ok(());
    };
    let shown = crate::cut_value(&f.display().to_string()).into_owned();
    #[derive(serde::Deserialize)]
    struct Many {
        tasks: Vec<TaskSpec>,
    }
    let specs = match v.get("tasks") {
        Some(_) => serde_json::from_str::<Many>(&text).map(|m| m.tasks),
        None => serde_json::from_str::<TaskSpec>(&text).map(|s| vec![s]),
    };
    let specs = match (specs, name) {
        (Ok(specs), _) => specs,
        // Left to the coordinator, which says where in the file, as the file is sent as
        // written; but one sent with --name is made over, its lines gone: said here.
        (Err(_), None) => return Ok(()),
        (Err(e), Some(_)) => return Err(format!("--file {shown}: {e}")),
    };
    // The coordinator's two checks, in its order and words: the spec's rules, then the
    // built-in executor's of its config (a kind it does not know is left to it).
    let check = crate::run::builtin_config_check();
    for (i, spec) in specs.iter().enumerate() {
        if let (Some(name), Some(own)) = (name, &spec.name)
            && own != name
        {
            return Err(format!(
                "--file {shown}: task {i} is named {:?}, and --name {name:?} names every task of \
                 the file: leave out one or the other",
                crate::cut_value(own)
            ));
        }
        spec.validate()
            .map_err(|e| format!("--file {shown}: task {i}: {e}"))?;
        if let Some(Err(why)) = (check.0)(&spec.kind, spec.config.get()) {
            let kind = &spec.kind;
            return Err(format!(
                "--file {shown}: task {i}: the `{kind}` executor refuses its config: {why}"
            ));
        }
    }
    Ok(())
}

/// A `--file` document (one spec, or `{"tasks": [specs]}`) with `name` set on each spec that
/// is an object (another name was refused by the checks; anything else is left for the
/// coordinator to refuse, as written).
fn named_specs(mut doc: Value, name: &str) -> Value {
    let name_it = |spec: &mut Value| {
        if let Some(fields) = spec.as_object_mut() {
            fields.insert("name".to_owned(), json!(name));
        }
    };
    match doc.get_mut("tasks") {
        Some(Value::Array(specs)) => specs.iter_mut().for_each(name_it),
        Some(_) => {}
        None => name_it(&mut doc),
    }
    doc
}

/// The config of a `command` task from the flags: a command line after `--` or a `--shell`
/// script, with its environment and directory; `None` without either.
fn command_config(a: &SubmitArgs) -> Option<Value> {
    let mut config = match (&a.shell, a.command.split_first()) {
        (Some(script), _) => json!({ "shell": script }),
        (None, Some((program, args))) => json!({ "program": program, "args": args }),
        (None, None) => return None,
    };
    if !a.env.is_empty() {
        let env: serde_json::Map<String, Value> =
            a.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        config["env"] = Value::Object(env);
    }
    if let Some(dir) = &a.cwd {
        config["cwd"] = json!(dir);
    }
    Some(config)
}

/// The config of the task the flags describe: `--config`, else a `command`'s from its flags
/// ([`command_config`]), else none (`null`, every default of the kind); an error, said as a
/// usage error, when there is nothing to run or a command is given to another kind.
fn spec_config(a: &SubmitArgs) -> Result<Value, String> {
    if let Some(config) = &a.config {
        return Ok(config.clone());
    }
    if a.kind == "command" {
        return command_config(a).ok_or_else(|| NO_COMMAND.to_owned());
    }
    let commandish = a.shell.is_some() || !a.command.is_empty();
    if commandish || !a.env.is_empty() || a.cwd.is_some() {
        return Err(format!(
            "a command after `--`, --shell, --env and --cwd make a `command` task's config, not \
             a `{}` one's: give its config with --config JSON",
            a.kind
        ));
    }
    Ok(Value::Null)
}

/// Why a submission without `--file` that names no command is refused.
const NO_COMMAND: &str = "give a command after `--`, --shell SCRIPT or --file FILE";

/// The spec of a `command` task from the flags ([`command_config`]) with the worker it needs.
fn command_spec(a: &SubmitArgs) -> anyhow::Result<TaskSpec> {
    let config = spec_config(a).map_err(anyhow::Error::msg)?;
    let mut spec = TaskSpec::new(a.kind.as_str(), config);
    spec.task_id = a.id.clone();
    spec.priority = a.priority;
    spec.requires = a.requires.clone();
    spec.tags = a.tags.iter().cloned().collect();
    spec.timeout_ms = a
        .timeout
        .map(|d| {
            u64::try_from(d.as_millis()).map_err(|_| {
                anyhow::anyhow!("--timeout {d:?} is longer than a task's timeout can be")
            })
        })
        .transpose()?;
    spec.max_attempts = a.max_attempts;
    spec.retry_on = a.retry_on.clone();
    spec.retry_on.sort_unstable();
    spec.retry_on.dedup();
    if !spec.retry_on.is_empty() && spec.max_attempts == Some(1) {
        bail!(
            "--retry-on with --max-attempts 1 never runs the task again: give --max-attempts 2 or more"
        );
    }
    spec.name = a.name.clone();
    Ok(spec)
}

/// An end of an attempt `--retry-on` names, as the API spells it.
fn parse_retry_on(s: &str) -> Result<tether_proto::RetryOn, String> {
    serde_json::from_value(json!(s))
        .map_err(|_| "an attempt's end a task retries on: failed or timed_out".to_owned())
}

/// A task's timeout as the API takes it (`timeout_ms`): refused as the arguments are read when
/// the coordinator would refuse it (zero) or could not hold it (a fraction of a millisecond,
/// which was cut off in silence), so the error names the flag, not the API's field.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = crate::settings::parse_duration_arg(s)?;
    // The value itself is not repeated: clap quotes it (cut when long, see `main`).
    if d.is_zero() {
        return Err("a task's timeout must be longer than zero".to_owned());
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err("a task's timeout is whole milliseconds (e.g. 1500ms, 2s)".to_owned());
    }
    Ok(d)
}

fn parse_priority(s: &str) -> Result<u8, String> {
    match s {
        "high" => Ok(1),
        "normal" => Ok(tether_proto::task::DEFAULT_PRIORITY),
        "low" => Ok(9),
        n => match n.parse::<u8>() {
            Ok(p) if p <= tether_proto::task::MAX_PRIORITY => Ok(p),
            // The value itself is not repeated: clap quotes it (cut when long, see `main`).
            _ => Err(format!(
                "use high, normal, low or 0..={}",
                tether_proto::task::MAX_PRIORITY
            )),
        },
    }
}

pub async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    // A submission that failed is that, --watch or not: its own error and exit status, not a
    // watch's "could not follow" (a duplicate id, refused, was said as a watch that lost its
    // tasks).
    let sent = std::time::Instant::now();
    let (api, ids) = send(&a).await?;
    if !a.watch {
        return Ok(());
    }
    crate::watch::follow_submitted(&api, ids, a.common.json, sent).await
}

/// Submits the tasks `a` describes and prints their ids; the client and the ids.
async fn send(a: &SubmitArgs) -> anyhow::Result<(Api, BTreeSet<String>)> {
    let api = Api::new(&a.common)?;
    // A file is sent as it is (the API takes one spec or {"tasks": [specs]}), so that the
    // coordinator's refusal is about the file: at its own lines and columns, and an array
    // said to be one. Made over into {"tasks": [...]}, the array was refused as the list's
    // first spec, on the one line the client had made.
    let (body, sent) = match &a.file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", f.display()))?;
            let sent = match v.get("tasks") {
                Some(tasks) => tasks.as_array().map_or(0, Vec::len),
                None => 1,
            };
            match &a.name {
                // Every spec named: the document made over (its syntax was checked above).
                Some(name) => {
                    let body = serde_json::to_vec(&named_specs(v, name))?;
                    (bytes::Bytes::from(body), sent)
                }
                None => (bytes::Bytes::from(text), sent),
            }
        }
        None => {
            let body = json!({ "tasks": [command_spec(a)?] });
            (bytes::Bytes::from(serde_json::to_vec(&body)?), 1)
        }
    };
    let v = api.post_text("/api/v1/tasks", body).await.map_err(|e| {
        if let (Some(r), Some(f)) = (e.downcast_ref::<Refused>(), &a.file)
            && r.too_many()
        {
            // What to do about it: the API takes {"tasks": [...]} a request, so several files.
            return anyhow::anyhow!(
                "{}; split {} into several files (each one spec or {{\"tasks\": [specs]}}) and \
                 submit each (HTTP {})",
                r.message,
                crate::cut_value(&f.display().to_string()),
                r.status
            );
        }
        if e.downcast_ref::<NoAnswer>().is_none() {
            return e;
        }
        // Sending it again blindly may submit it twice; under the same id, it is answered with
        // the task if that was made.
        e.context(match &a.id {
            Some(id) => format!(
                "the submission's outcome is unknown: task {id} may have been submitted; submit \
                 it again with the same --id and the same spec, which makes it only if it was \
                 not (else says it was already submitted), or check with `tether task {id}`"
            ),
            None => "the submission's outcome is unknown: the task may have been submitted; \
                     check with `tether tasks`; one whose tasks have ids (--id, or `task_id` in a \
                     --file) can be sent again safely: an id and its spec make a task once"
                .to_owned(),
        })
    })?;
    let ids = submitted_ids(&v, sent)?;
    // There already with the same spec (sent again): said beside the ids, which stay all the
    // output, so that a script reads the same whether its first try's reply was lost or not.
    let existing: BTreeSet<&str> = v["existing"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for id in ids.iter().filter(|id| existing.contains(id.as_str())) {
        eprintln!("task {} was already submitted (same spec)", shown(id));
    }
    if a.common.json {
        outln!("{v}")?;
    } else {
        for id in &ids {
            outln!("{}", shown(id))?;
        }
    }
    Ok((api, ids.into_iter().collect()))
}

#[derive(Args)]
pub struct RetryArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Ids of ended tasks (completed, failed, timed out or cancelled), each checked against the
    /// id rules before any request.
    #[arg(required_unless_present = "of", value_name = "TASK_ID")]
    ids: Vec<tether_proto::TaskId>,
    /// Instead of ids, a run's tasks that ended without completing (failed, timed out or
    /// cancelled): the latest try of each task submitted under this name (the task, or the
    /// last retry of it), so that a failure retried already is not retried again.
    #[arg(long, value_name = "RUN", value_parser = parse_name, conflicts_with = "ids")]
    of: Option<String>,
    /// The name of the new tasks, a run of their own (e.g. `nightly-42-r1`, followed with
    /// `tether watch --name`); by default each keeps the name it had.
    #[arg(long, value_parser = parse_name)]
    name: Option<String>,
    /// Then follow the new tasks until each has ended, as `tether watch` does (exit 0 only if
    /// all completed).
    #[arg(long)]
    pub(crate) watch: bool,
}

/// The spec of an ended task `t`, to submit again as a new task: its own id left out (the same
/// id and spec name the task that is there), `retry_of` naming it, everything else as
/// submitted. A task retried already is refused: the coordinator takes one retry of a task.
fn spec_to_retry(t: &Value) -> anyhow::Result<Value> {
    let id = s(&t["task_id"]);
    if !has_ended(t) {
        bail!(
            "task {id} is {}: only an ended task is run again (cancel it first: `tether cancel {id}`)",
            s(&t["status"])
        );
    }
    let mut spec = t["spec"].clone();
    let Some(fields) = spec.as_object_mut() else {
        bail!("task {id} has no spec in the coordinator's answer");
    };
    fields.remove("task_id");
    // The coordinator takes one retry of a task, and records it on the task (`retried_by`).
    if let Some(by) = t["retried_by"].as_str() {
        bail!("task {id} was retried already, by {by}: `tether retry {by}` runs that one again");
    }
    fields.insert("retry_of".into(), json!(id));
    // A read token sees env values replaced (and cannot submit): a spec that holds one would
    // run with the placeholder for the value. The coordinator marks such a copy; a value that
    // is the placeholder's text itself is a value like any other.
    if t["env_redacted"] == true {
        bail!(
            "task {id}'s env values are hidden from this token (`{REDACTED}`): run it again with an admin token"
        );
    }
    Ok(spec)
}

/// `tether retry`: ended tasks submitted again as new tasks, with their specs; a line each,
/// `NEW_ID (retry of OLD_ID)`, then, with `--watch`, followed to their end.
pub async fn retry(a: RetryArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let given: Vec<String> = match &a.of {
        Some(run) => {
            use tether_proto::TaskStatus;
            let unfinished = |status: &str| {
                TaskStatus::parse(status)
                    .is_some_and(|s| s.is_terminal() && s != TaskStatus::Completed)
            };
            let run_tries = latest_tries_named(&api, run).await?;
            let ids: Vec<String> = run_tries
                .tries
                .iter()
                .filter(|t| unfinished(&t.task.status))
                .map(|t| t.task.task_id.clone())
                .collect();
            if ids.is_empty() {
                eprintln!(
                    "none of the latest tries of the {} tasks named {run:?} ended failed, timed out or cancelled: nothing to retry",
                    run_tries.named
                );
                return Ok(());
            }
            ids
        }
        None => a.ids.iter().map(|id| id.as_str().to_owned()).collect(),
    };
    let found = tasks_by_id(&api, given.iter().map(String::as_str)).await?;
    let mut specs = Vec::with_capacity(given.len());
    for id in &given {
        let Some(t) = found.get(id.as_str()) else {
            bail!("no task {id} at this coordinator: `tether tasks` lists those it knows");
        };
        let mut spec = spec_to_retry(t)?;
        if let Some(name) = &a.name {
            spec["name"] = json!(name);
        }
        specs.push(spec);
    }
    let sent = std::time::Instant::now();
    let (ids, failed) = submit_in_parts(&api, &specs, |new, at| {
        if !a.common.json {
            for (new, old) in new.iter().zip(&given[at..]) {
                outln!("{} (retry of {old})", shown(new))?;
            }
        }
        Ok(())
    })
    .await;
    if a.common.json {
        // Each new id beside the one it is a retry of, in the order given.
        let of: Vec<&str> = given.iter().take(ids.len()).map(String::as_str).collect();
        outln!("{}", json!({ "task_ids": ids, "retry_of": of }))?;
    }
    if let Some(e) = failed {
        return Err(match ids.len() {
            0 => e,
            n => e.context(format!(
                "{n} of the {} tasks were submitted again (their new ids above); the rest were not",
                specs.len()
            )),
        });
    }
    if !a.watch {
        return Ok(());
    }
    crate::watch::follow_submitted(&api, ids.into_iter().collect(), a.common.json, sent).await
}

/// Most specs `tether retry` sends a request: within the coordinator's default of
/// 10,000 a submission.
const RETRY_PART: usize = 1000;

/// Submits `specs` (none with an id) in parts of at most [`RETRY_PART`]; a part the coordinator
/// refuses as too many tasks or too large a body (refused whole: nothing of it submitted) is
/// sent again in halves. `done` sees each part's new ids and the index of its first spec, as it
/// is submitted. The new ids in order, and the error that stopped it, if any: the parts before
/// it stay submitted.
async fn submit_in_parts(
    api: &Api,
    specs: &[Value],
    mut done: impl FnMut(&[String], usize) -> anyhow::Result<()>,
) -> (Vec<String>, Option<anyhow::Error>) {
    let mut ids = Vec::with_capacity(specs.len());
    let mut part = RETRY_PART;
    while ids.len() < specs.len() {
        let at = ids.len();
        let these = &specs[at..(at + part).min(specs.len())];
        let body = match serde_json::to_vec(&json!({ "tasks": these })) {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => return (ids, Some(e.into())),
        };
        let v = match api.post_text("/api/v1/tasks", body).await {
            Ok(v) => v,
            Err(e) if part > 1 && e.downcast_ref::<Refused>().is_some_and(Refused::too_many) => {
                part = these.len().div_ceil(2);
                continue;
            }
            Err(e) => {
                let e = match e.downcast_ref::<NoAnswer>() {
                    Some(_) => e.context(
                        "the submission's outcome is unknown: the tasks may have been submitted \
                         again; check with `tether tasks --newest` before retrying again",
                    ),
                    None => e,
                };
                return (ids, Some(e));
            }
        };
        match submitted_ids(&v, these.len()) {
            Ok(new) => {
                if let Err(e) = done(&new, at) {
                    return (ids, Some(e));
                }
                ids.extend(new);
            }
            Err(e) => return (ids, Some(e)),
        }
    }
    (ids, None)
}

/// The ids of the `sent` tasks from the answer `v` to their submission: an id each, or an
/// error that shows what came instead (a success without them, from a proxy or another
/// server, submitted nothing that can be named, watched or checked).
fn submitted_ids(v: &Value, sent: usize) -> anyhow::Result<Vec<String>> {
    let ids: Option<Vec<String>> = v["task_ids"].as_array().and_then(|ids| {
        ids.iter()
            .map(|id| id.as_str().map(str::to_owned))
            .collect()
    });
    match ids {
        Some(ids) if ids.len() == sent => Ok(ids),
        _ => bail!(
            "the coordinator's answer to the submission of {sent} task(s) does not name one task \
             id each (task_ids): it answered {}",
            cut_line(&shown(&v.to_string()), CONFIG_SHOWN)
        ),
    }
}

#[derive(Args)]
pub struct TasksArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Only tasks in this status.
    #[arg(long, value_parser = [
        "queued", "running", "paused", "completed", "failed", "cancelled", "timed_out",
    ])]
    status: Option<String>,
    /// Only the tasks submitted under this name (`tether submit --name`, a spec's `name`,
    /// exactly): a run's tasks.
    #[arg(long, value_parser = parse_name)]
    name: Option<String>,
    /// At most this many (the oldest first, or the newest with --newest); with --all, the
    /// tasks read a request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    limit: u64,
    /// Every task, read page by page, however many there are, each page printed as it comes:
    /// the table's columns are as wide as their widest cell so far, and a page that needs them
    /// wider begins under a head of its own.
    #[arg(long)]
    all: bool,
    /// The newest first (by default the oldest first): on a busy coordinator, what came last.
    #[arg(long, conflicts_with = "all")]
    newest: bool,
}

pub async fn tasks(a: TasksArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let query = tasks_query(a.status.as_deref(), a.name.as_deref(), a.newest);
    if a.all {
        // Printed a page at a time as each comes: the listing may be larger than memory.
        let mut listing = Listing::new(a.common.json);
        let mut away = Away::default();
        let mut pages = TaskPages::new(&api, &query, a.limit as usize);
        while let Some(page) = pages.next().await? {
            listing.page(&page)?;
            if !a.common.json {
                page.iter().for_each(|t| away.add(t));
            }
        }
        listing.end()?;
        away.say(&api).await;
        return Ok(());
    }
    let v = api.get(&tasks_path(a.limit, &query)).await?;
    if a.common.json {
        outln!("{v}")?;
        return Ok(());
    }
    let rows = rows_of(&v, task_row);
    Table::new(&TASK_HEAD).print(&rows)?;
    let mut away = Away::default();
    v.as_array().into_iter().flatten().for_each(|t| away.add(t));
    away.say(&api).await;
    // A full page may not be all: said on stderr, so the table stays the table.
    if rows.len() as u64 >= a.limit {
        eprintln!(
            "(the {} {} tasks; there may be more: --all lists every one, --limit N more or fewer{})",
            if a.newest { "newest" } else { "oldest" },
            a.limit,
            if a.newest {
                ""
            } else {
                ", --newest the last ones"
            }
        );
    }
    Ok(())
}

/// The query of a task listing past its `limit`: its parameters joined by `&`, none when
/// nothing is asked (a lone `&` ended the URL that errors quote).
fn tasks_query(status: Option<&str>, name: Option<&str>, newest: bool) -> String {
    let status = status.map(|s| format!("status={s}"));
    let name = name.map(name_param);
    let order = newest.then(|| "order=newest".to_owned());
    status
        .into_iter()
        .chain(name)
        .chain(order)
        .collect::<Vec<_>>()
        .join("&")
}

/// A listing's `name=` parameter: any text, encoded as a form value (`&`, `=`, `+` and spaces
/// kept what they are).
pub(crate) fn name_param(name: &str) -> String {
    let encoded: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
    format!("name={encoded}")
}

/// The path of one page of at most `limit` tasks with `query` ([`tasks_query`]).
fn tasks_path(limit: u64, query: &str) -> String {
    match query.is_empty() {
        true => format!("/api/v1/tasks?limit={limit}"),
        false => format!("/api/v1/tasks?limit={limit}&{query}"),
    }
}

const TASK_HEAD: [&str; 7] = [
    "TASK", "STATUS", "ATTEMPT", "WORKER", "KIND", "PRIO", "NAME",
];

/// A task's row in `tether tasks`.
fn task_row(t: &Value) -> Vec<String> {
    vec![
        s(&t["task_id"]),
        s(&t["status"]),
        task_attempt(t),
        task_worker(t),
        s(&t["spec"]["kind"]),
        t["spec"]["priority"].to_string(),
        s(&t["spec"]["name"]),
    ]
}

/// Why a queued task of `spec` waits, from the fleet's records (`GET /api/v1/workers`): how
/// many connected workers could run it and what keeps each from taking it now, or, when none
/// could, what the others lack (the coordinator's own rule, [`Worker::lacks`]). `None` when the
/// spec or a record does not read as this version's: nothing is said then.
///
/// [`Worker::lacks`]: tether_coordinator::model::Worker::lacks
fn why_waiting(spec: &Value, workers: &[Value]) -> Option<String> {
    use tether_coordinator::model::Worker;
    let spec: tether_proto::TaskSpec = serde_json::from_value(spec.clone()).ok()?;
    let mut lacks: BTreeMap<String, usize> = BTreeMap::new();
    let mut able: BTreeMap<&str, usize> = BTreeMap::new();
    let mut away = 0;
    for w in workers {
        // What the rule reads of the record: the worker's offer.
        let id = tether_proto::WorkerId::parse(w["worker_id"].as_str()?).ok()?;
        let mut offer = Worker::new(id, chrono::Utc::now());
        offer.executors = serde_json::from_value(w["executors"].clone()).ok()?;
        offer.capabilities = serde_json::from_value(w["capabilities"].clone()).ok()?;
        offer.tags = serde_json::from_value(w["tags"].clone()).ok()?;
        let missing = offer.lacks(&spec.kind, &spec.requires, &spec.tags);
        if w["state"] != "connected" {
            away += usize::from(missing.is_none() && w["state"] == "disconnected");
            continue;
        }
        if let Some(missing) = missing {
            *lacks.entry(missing.to_string()).or_default() += 1;
            continue;
        }
        // Why a connected worker takes no new task is its STATE column's word.
        let held = w["leases"].as_array().map_or(0, Vec::len) as u64;
        let why = match worker_state(w).as_str() {
            "stopping" => "stopping",
            "draining" | "drained" => "drained (tether undrain)",
            "resting" => "resting after a fault of its own",
            _ if held >= w["slots"].as_u64().unwrap_or(0) => "busy (every slot taken)",
            _ => "with a free slot (it takes the task at once, unless tasks ahead take it)",
        };
        *able.entry(why).or_default() += 1;
    }
    let workers_of = |n: usize| if n == 1 { "worker" } else { "workers" };
    let capable: usize = able.values().sum();
    let mut said = match capable {
        0 if lacks.is_empty() => "no worker is connected".to_owned(),
        0 => {
            let lacking: Vec<String> = lacks
                .iter()
                .map(|(what, n)| format!("{n} {} {what}", if *n == 1 { "lacks" } else { "lack" }))
                .collect();
            format!("no connected worker can run it: {}", lacking.join(", "))
        }
        n => {
            let parts: Vec<String> = able.iter().map(|(why, n)| format!("{n} {why}")).collect();
            format!(
                "{n} connected {} can run it: {}",
                workers_of(n),
                parts.join(", ")
            )
        }
    };
    if away > 0 {
        said.push_str(&format!("; {away} disconnected {} could", workers_of(away)));
    }
    Some(said)
}

/// Whether a task's status is one it ends in.
fn has_ended(t: &Value) -> bool {
    serde_json::from_value::<tether_proto::TaskStatus>(t["status"].clone())
        .is_ok_and(tether_proto::TaskStatus::is_terminal)
}

/// The attempt a task's row names: the lease's, or the last one of a task that ended. A task
/// waiting for a worker names its last attempt with how it ended (`1 lost`: queued again after
/// its worker went), or `-` before its first: the bare number read as the attempt it runs.
fn task_attempt(t: &Value) -> String {
    if has_ended(t) || !t["lease"].is_null() {
        return t["attempt"].to_string();
    }
    let last = t["attempts"].as_array().and_then(|a| a.last());
    match last.filter(|a| a["attempt"] == t["attempt"]) {
        Some(a) if !a["end"].is_null() => format!("{} {}", t["attempt"], s(&a["end"])),
        Some(_) => t["attempt"].to_string(),
        None => "-".to_owned(),
    }
}

/// The worker a task's row names: the lease's; once the task ended, the last attempt's (the
/// worker that ran it). A task waiting for a worker (queued again after its worker went, or
/// paused without a lease) has none: the last attempt's would read as where it runs.
fn task_worker(t: &Value) -> String {
    match &t["lease"]["worker"] {
        Value::Null if has_ended(t) => s(t["attempts"]
            .as_array()
            .and_then(|a| a.last())
            .map_or(&Value::Null, |a| &a["worker"])),
        w => s(w),
    }
}

/// Most running tasks whose worker `tether tasks` looks up ([`Away`]): a listing of more
/// leaves the rest out of its hint.
const AWAY_TASKS_HELD: usize = 10_000;
/// Most distinct workers looked up one by one ([`Away::say`]); more read the whole list.
const AWAY_WORKERS_ASKED: usize = 16;
/// Most task ids a line of the hint names.
const AWAY_TASKS_SHOWN: usize = 10;

/// The running tasks of a listing by the worker that holds their lease, for the hint below
/// the table ([`away_lines`]): a task whose worker is disconnected still says `running` on
/// that worker until the coordinator's grace ends, which read as running on a machine gone.
#[derive(Default)]
struct Away {
    by_worker: BTreeMap<String, Vec<String>>,
    held: usize,
}

impl Away {
    fn add(&mut self, t: &Value) {
        let (Some("running"), Some(w), Some(id)) = (
            t["status"].as_str(),
            t["lease"]["worker"].as_str(),
            t["task_id"].as_str(),
        ) else {
            return;
        };
        if self.held < AWAY_TASKS_HELD {
            self.held += 1;
            self.by_worker
                .entry(w.to_owned())
                .or_default()
                .push(id.to_owned());
        }
    }

    /// Reads the workers of the tasks held and says on stderr, a line each, those that are
    /// disconnected. A read that fails says nothing: the table above stands as the API gave it.
    async fn say(self, api: &Api) {
        if self.by_worker.is_empty() {
            return;
        }
        let workers: Vec<Value> = if self.by_worker.len() <= AWAY_WORKERS_ASKED {
            let reads = self
                .by_worker
                .keys()
                .map(|w| async move { api.get(&format!("/api/v1/workers/{w}")).await.ok() });
            futures_util::future::join_all(reads)
                .await
                .into_iter()
                .flatten()
                .collect()
        } else {
            match api.get("/api/v1/workers").await {
                Ok(Value::Array(all)) => all,
                _ => Vec::new(),
            }
        };
        for line in away_lines(&self.by_worker, &workers, chrono::Utc::now()) {
            eprintln!("{line}");
        }
    }
}

/// The hint's lines: for each disconnected worker among `workers` that holds running tasks
/// of `by_worker`, since when, which tasks, and what becomes of them. `tether task` and
/// `tether watch` say it in the same words.
pub(crate) fn away_lines(
    by_worker: &BTreeMap<String, Vec<String>>,
    workers: &[Value],
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<String> {
    workers
        .iter()
        .filter(|w| w["state"] == "disconnected")
        .filter_map(|w| {
            let id = w["worker_id"].as_str()?;
            let tasks = by_worker.get(id)?;
            let mut named: Vec<String> = tasks
                .iter()
                .take(AWAY_TASKS_SHOWN)
                .map(|t| shown(t))
                .collect();
            if tasks.len() > AWAY_TASKS_SHOWN {
                named.push(format!("and {} more", tasks.len() - AWAY_TASKS_SHOWN));
            }
            // When the grace ends, as the coordinator says (`lost_at`); one that does not say
            // it gets the rule.
            let until = match until(&w["lost_at"], now) {
                Some(until) => format!("the coordinator's grace ends {until} (--lost-after)"),
                None => {
                    "the coordinator's grace ends (--lost-after, from the disconnection)".into()
                }
            };
            Some(format!(
                "(worker {} disconnected {}: its running task(s) {} wait for it to come back until \
                 {until}, then go to another worker, resuming from their latest checkpoint)",
                shown(id),
                age(&w["disconnected_at"], now),
                named.join(", ")
            ))
        })
        .collect()
}

/// `tether tasks --all` printed page by page, each page as it is read, so the listing is never
/// held whole: with `--json` one JSON array (the same line as a listing of one page), element
/// by element; else one table whose columns widen where a later page needs it, that page under
/// a head of its own ([`Table`]).
struct Listing {
    json: bool,
    /// Tasks printed so far.
    printed: usize,
    table: Table,
}

impl Listing {
    fn new(json: bool) -> Self {
        Listing {
            json,
            printed: 0,
            table: Table::new(&TASK_HEAD),
        }
    }

    fn page(&mut self, tasks: &[Value]) -> anyhow::Result<()> {
        if !self.json {
            let rows: Vec<Vec<String>> = tasks.iter().map(task_row).collect();
            self.printed += rows.len();
            return self.table.print(&rows);
        }
        let mut text = String::new();
        for t in tasks {
            text.push(if self.printed == 0 { '[' } else { ',' });
            text.push_str(&t.to_string());
            self.printed += 1;
        }
        crate::output::part(&text)
    }

    fn end(mut self) -> anyhow::Result<()> {
        match (self.json, self.printed) {
            (true, 0) => outln!("[]"),
            (true, _) => outln!("]"),
            // The head, if no page had a row to print it with.
            (false, _) => self.table.print(&[]),
        }
    }
}

#[derive(Args)]
pub struct TaskArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Task id. Checked against the id rules before any request: an id such as
    /// `x/../other` would otherwise be resolved by the URL into another task's.
    id: tether_proto::TaskId,
}

pub async fn task(a: TaskArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    // Four independent reads: sent together, not one after another.
    let path = format!("/api/v1/tasks/{}", a.id);
    let [of_result, of_state, of_checkpoints] =
        ["result", "state", "checkpoints"].map(|sub| format!("{path}/{sub}"));
    let (t, results, state, checkpoints) = tokio::try_join!(
        api.get(&path),
        api.get(&of_result),
        api.get(&of_state),
        api.get(&of_checkpoints),
    )?;
    if a.common.json {
        outln!(
            "{}",
            json!({ "task": t, "results": results, "state": state, "checkpoints": checkpoints })
        )?;
        return Ok(());
    }
    let spec = &t["spec"];
    outln!("task      {}", s(&t["task_id"]))?;
    if let Some(name) = spec["name"].as_str() {
        outln!("name      {}", shown(name))?;
    }
    outln!("status    {}", s(&t["status"]))?;
    outln!("kind      {}", s(&spec["kind"]))?;
    outln!(
        "config    {}",
        cut_line(&shown(&spec["config"].to_string()), CONFIG_SHOWN)
    )?;
    outln!("priority  {}", spec["priority"])?;
    if let Some(r) = spec["requires"].as_array().filter(|r| !r.is_empty()) {
        let r: Vec<String> = r.iter().map(s).collect();
        outln!("requires  {}", r.join(", "))?;
    }
    if let Some(tags) = spec["tags"].as_object().filter(|t| !t.is_empty()) {
        let tags: Vec<String> = tags
            .iter()
            .map(|(k, v)| format!("{}={}", shown(k), s(v)))
            .collect();
        outln!("tags      {}", tags.join(", "))?;
    }
    if let Some(ms) = spec["timeout_ms"].as_u64() {
        outln!("timeout   {ms} ms")?;
    }
    if let Some(n) = spec["max_attempts"].as_u64() {
        outln!("attempts  at most {n}")?;
    }
    if let Some(on) = spec["retry_on"].as_array() {
        let on: Vec<String> = on.iter().map(s).collect();
        outln!("retries   on {}", on.join(", "))?;
    }
    outln!("submitted {}", when(&t["submitted_at"]))?;
    if let Some(of) = spec["retry_of"].as_str() {
        outln!("retry of  {of}")?;
    }
    if let Some(by) = t["retried_by"].as_str() {
        outln!("retried   by {by}")?;
    }
    if !t["error"].is_null() {
        outln!("error     {}", s(&t["error"]))?;
    }
    // A queued task: what keeps the fleet from taking it. Said from the workers' records; a
    // listing that cannot be read says nothing.
    if t["status"] == "queued"
        && let Ok(Value::Array(workers)) = api.get("/api/v1/workers").await
        && let Some(why) = why_waiting(spec, &workers)
    {
        outln!("waiting   {why}")?;
    }
    outln!()?;
    let rows = rows_of(&t["attempts"], |a| {
        vec![
            a["attempt"].to_string(),
            s(&a["worker"]),
            when(&a["started_at"]),
            s(&a["end"]),
        ]
    });
    print_table(&["ATTEMPT", "WORKER", "STARTED", "END"], &rows)?;
    // A checkpoint the coordinator refused (the table of kept ones below says where a resume
    // would start).
    for a in t["attempts"].as_array().into_iter().flatten() {
        if let Some(why) = a["checkpoint_refused"].as_str() {
            outln!(
                "attempt {}: checkpoint refused: {}",
                a["attempt"],
                shown(why)
            )?;
        }
        // The worker's answer to the last checkpoint asked of it that it could not make.
        if let Some(why) = a["checkpoint_error"].as_str() {
            outln!(
                "attempt {}: no checkpoint at {}: {}",
                a["attempt"],
                when(&a["checkpoint_error_at"]),
                shown(why)
            )?;
        }
    }
    outln!()?;
    // Why a result is not counted: how its attempt ended (`lost`, `cancelled`, ...).
    let end_of = |attempt: &Value| {
        t["attempts"]
            .as_array()
            .and_then(|a| a.iter().find(|a| &a["attempt"] == attempt))
            .and_then(|a| a["end"].as_str())
            .map(shown)
    };
    let rows = rows_of(&results, |r| {
        vec![
            r["attempt"].to_string(),
            s(&r["worker"]),
            s(&r["outcome"]),
            record_label(r["stale"] == true, end_of(&r["attempt"]).as_deref()),
            r["body"]["result"].to_string(),
        ]
    });
    print_table(&["ATTEMPT", "WORKER", "OUTCOME", "RECORD", "RESULT"], &rows)?;
    // Why an attempt failed, which its result's table cell does not say.
    for r in results.as_array().into_iter().flatten() {
        if let Some(why) = r["body"]["error"]["message"].as_str() {
            // The worker's text: a command's stderr tail may be long.
            let why = cut_line(&shown(why), 5 * CONFIG_SHOWN);
            outln!("attempt {} error: {why}", r["attempt"])?;
        }
    }
    if !state.is_null() {
        outln!()?;
        outln!(
            "state     {} (attempt {}, {})",
            cut_line(&shown(&state["state"].to_string()), CONFIG_SHOWN),
            state["attempt"],
            when(&state["updated_at"])
        )?;
    }
    if checkpoints.as_array().is_some_and(|c| !c.is_empty()) {
        outln!()?;
        let rows = rows_of(&checkpoints, |c| {
            vec![
                s(&c["checkpoint_id"]),
                c["attempt"].to_string(),
                c["size"].to_string(),
                when(&c["created_at"]),
            ]
        });
        print_table(&["CHECKPOINT", "ATTEMPT", "BYTES", "CREATED"], &rows)?;
    }
    // Running on a disconnected worker, it says `running` until the coordinator's grace ends:
    // said as `tether tasks` says it, on stderr.
    let mut away = Away::default();
    away.add(&t);
    away.say(&api).await;
    Ok(())
}

/// A worker's STATE column: its state, or, connected, why it takes no new task: it said it
/// is stopping (`worker_stopping`), it is drained, or it rests after a fault of its own
/// (`worker_fault`). One drained and not connected says both: it stays drained when it
/// comes back.
fn worker_state(w: &Value) -> String {
    match (w["state"].as_str(), w["stopping"].as_bool()) {
        (Some("connected"), Some(true)) => "stopping".to_owned(),
        // Drained by an operator: "draining" while its tasks run on, "drained" once it holds none.
        (Some("connected"), _) if w["draining"] == true => {
            match w["leases"].as_array().is_some_and(|l| !l.is_empty()) {
                true => "draining".to_owned(),
                false => "drained".to_owned(),
            }
        }
        (Some("connected"), _) if w["resting"].is_object() => "resting".to_owned(),
        _ if w["draining"] == true => format!("{}, drained", s(&w["state"])),
        _ => s(&w["state"]),
    }
}

/// `tether workers`: the fleet's table or, given an id, that worker in detail.
pub async fn workers(a: CommonArgs, id: Option<tether_proto::WorkerId>) -> anyhow::Result<()> {
    let api = Api::new(&a)?;
    if let Some(id) = id {
        return worker(&api, &id, a.json).await;
    }
    let v = api.get("/api/v1/workers").await?;
    if a.json {
        outln!("{v}")?;
        return Ok(());
    }
    let rows = rows_of(&v, |w| worker_row(w, chrono::Utc::now()));
    print_table(&WORKER_HEAD, &rows)?;
    // A worker's statistics come with its telemetry: a "-" is not a fault. Said on stderr, so
    // the table stays the table.
    let new = v.as_array().map_or(0, |ws| {
        let new = |w: &&Value| w["state"] == "connected" && w["stats"].is_null();
        ws.iter().filter(new).count()
    });
    if new > 0 {
        eprintln!("{new} connected worker(s) without statistics yet: {NO_STATS_YET}");
    }
    Ok(())
}

/// Why a connected worker shows no statistics.
const NO_STATS_YET: &str = "a worker reports them with its telemetry, the first within a \
                            telemetry interval (30 s by default) of connecting";

const WORKER_HEAD: [&str; 13] = [
    "WORKER",
    "STATE",
    "SLOTS",
    "TASKS",
    "RTT_P50_MS",
    "HEARTBEAT_S",
    "SEND_KB_S",
    "STABILITY",
    "RECONNECTS",
    "FAILED",
    "BACKOFF_S",
    "REPORTED",
    "LAST_SEEN",
];

/// A worker's row in `tether workers`, its ages counted to `now`. The statistics are the
/// worker's last report's: how old it is, beside them (REPORTED). FAILED and BACKOFF_S are
/// what a flaky path shows first: connection attempts that failed, and how long the worker
/// would wait before its next attempt were its session lost now.
fn worker_row(w: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    let st = &w["stats"];
    let count = |v: &Value| v.as_u64().map_or_else(|| "-".into(), |n| n.to_string());
    let secs = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".into(), |ms| format!("{:.1}", ms / 1000.0))
    };
    vec![
        s(&w["worker_id"]),
        worker_state(w),
        w["slots"].to_string(),
        w["leases"].as_array().map_or(0, Vec::len).to_string(),
        // No round trip measured yet: its 0 is no measure.
        match st["rtt_samples"].as_u64() {
            Some(0) => "-".into(),
            _ => fmt_f(&st["rtt_p50_ms"], 1),
        },
        // The cadence the worker beats at (a large fleet's budget stretches it).
        secs(&st["heartbeat_interval_ms"]),
        // The link's delivery rate as the worker measures it ("-": not measured yet).
        st["send_bytes_per_sec"]
            .as_f64()
            .filter(|r| *r > 0.0)
            .map_or_else(|| "-".into(), |r| format!("{:.1}", r / 1000.0)),
        stability(st),
        count(&st["reconnects"]),
        count(&st["failed_connections"]),
        secs(&st["next_backoff_ms"]),
        age(&st["reported_at"], now),
        // An age, as REPORTED: the timestamp made the table 15 columns wider, and
        // `tether workers ID` has it.
        age(&w["last_seen"], now),
    ]
}

/// Connected time under which a worker that never lost a session has no stability yet.
const STABILITY_FROM_SECS: f64 = 1.0;

/// A report's `stability` to 3 places, or `-` while it is no measure of the link: the worker
/// never lost a session and has been connected less than [`STABILITY_FROM_SECS`] (the report
/// made as its first session began), so the share is of the wait before that session, 0.000
/// for a worker just connected, read as "never connected". A worker that lost a session has a
/// measure, however short its time connected.
fn stability(st: &Value) -> String {
    let fresh = st["disconnections"].as_u64() == Some(0)
        && st["connected_secs"]
            .as_f64()
            .is_some_and(|c| c < STABILITY_FROM_SECS);
    match fresh {
        true => "-".into(),
        false => fmt_f(&st["stability"], 3),
    }
}

/// Most task ids `tether workers ID` lists on its `tasks` line (`--json` has all of them): a
/// worker of many slots holds as many leases.
const LEASES_SHOWN: usize = 20;

/// `tether workers ID`: the worker's record from `GET /api/v1/workers/{id}`, one field a line.
async fn worker(api: &Api, id: &tether_proto::WorkerId, json: bool) -> anyhow::Result<()> {
    let w = api
        .get(&format!("/api/v1/workers/{id}"))
        .await
        .map_err(|e| unknown_worker(e, id.as_str()))?;
    if json {
        outln!("{w}")?;
        return Ok(());
    }
    let fields = worker_fields(&w, chrono::Utc::now());
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    for (key, value) in fields {
        match key.is_empty() {
            // Between the worker's record and the statistics it reported.
            true => outln!()?,
            false => outln!("{key:width$}{value}")?,
        }
    }
    Ok(())
}

/// The lines of `tether workers ID` as (key, value), ages counted to `now`; an empty key is a
/// blank line. The record first (what the coordinator knows), then each connection statistic
/// the worker last reported, under when it reported them.
fn worker_fields(w: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<(&'static str, String)> {
    let list = |v: &Value| match v.as_array().filter(|a| !a.is_empty()) {
        Some(a) => a.iter().map(s).collect::<Vec<_>>().join(", "),
        None => "-".into(),
    };
    let at = |v: &Value| format!("{} ({})", when(v), age(v, now));
    let mut f = vec![("worker", s(&w["worker_id"]))];
    let state = worker_state(w);
    let why = match state.as_str() {
        "stopping" => " (connected; it said it is stopping: it takes no new task)",
        "resting" => " (connected; it takes no new task until its rest ends)",
        "draining" => " (connected; drained: it takes no new task, what it holds runs on)",
        "drained" => " (connected; drained: it takes no new task, and holds none)",
        _ if w["draining"] == true => " (it takes no new task when it comes back)",
        _ => "",
    };
    f.push(("state", format!("{state}{why}")));
    // While disconnected, the coordinator says when its grace ends.
    if let Some(left) = until(&w["lost_at"], now) {
        f.push((
            "lost at",
            format!(
                "{} ({left}) unless it comes back: its tasks then go to other workers",
                when(&w["lost_at"])
            ),
        ));
    }
    // A rest outlives a session: a worker that comes back before its end still rests.
    let rest = &w["resting"];
    if rest.is_object() {
        let until = match rest["until"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        {
            Some(t) => {
                let left = (t.with_timezone(&chrono::Utc) - now).num_seconds();
                format!("{} (in {})", when(&rest["until"]), span(left))
            }
            None => s(&rest["until"]),
        };
        f.push(("resting until", until));
        f.push((
            "rest for",
            format!(
                "{} fault(s) of its own in a row, the last: {}",
                rest["faults"],
                cut_line(&s(&rest["error"]), CONFIG_SHOWN)
            ),
        ));
    }
    let leases = w["leases"].as_array().map_or(&[][..], Vec::as_slice);
    let mut tasks: Vec<String> = leases.iter().take(LEASES_SHOWN).map(s).collect();
    if leases.len() > LEASES_SHOWN {
        tasks.push(format!(
            "… ({} in all; --json lists every one)",
            leases.len()
        ));
    }
    f.push(("slots", w["slots"].to_string()));
    f.push((
        "tasks",
        match tasks.is_empty() {
            true => "none".into(),
            false => tasks.join(", "),
        },
    ));
    f.push(("capabilities", list(&w["capabilities"])));
    let tags: Vec<String> = w["tags"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{}={}", shown(k), s(v)))
        .collect();
    f.push((
        "tags",
        match tags.is_empty() {
            true => "-".into(),
            false => tags.join(", "),
        },
    ));
    f.push(("executors", list(&w["executors"])));
    f.push(("sessions", w["sessions"].to_string()));
    f.push(("first seen", at(&w["first_seen"])));
    f.push(("last seen", at(&w["last_seen"])));
    if !w["disconnected_at"].is_null() {
        f.push(("disconnected", at(&w["disconnected_at"])));
    }
    f.push(("", String::new()));
    let st = &w["stats"];
    if !st.is_object() {
        f.push(("reported", format!("no statistics yet: {NO_STATS_YET}")));
        return f;
    }
    let count = |v: &Value| v.as_u64().map_or_else(|| "-".into(), |n| n.to_string());
    // With no round trip measured yet the worker reports its RTT figures as 0, no measure.
    let measured = st["rtt_samples"].as_u64() != Some(0);
    let ms = |v: &Value| match measured {
        true => fmt_f(v, 1) + " ms",
        false => "-".into(),
    };
    // A reconnection, the backoff or the heartbeat: in milliseconds under a second, else in
    // seconds to a tenth (a reconnection of `6271.9 ms` reads as 6.3 s).
    let dur = |v: &Value| match v.as_f64() {
        Some(ms) if ms >= 1000.0 => format!("{:.1} s", ms / 1000.0),
        Some(ms) => format!("{ms:.0} ms"),
        None => "-".into(),
    };
    // With no reconnect yet the worker reports its times as 0, no measure ("0 ms" read as
    // reconnects that took no time).
    let reconnect = |v: &Value| match st["reconnects"].as_u64() {
        Some(0) => "-".into(),
        _ => dur(v),
    };
    f.extend([
        ("reported", at(&st["reported_at"])),
        // The worker's own view of its connection when it reported.
        ("connection", s(&st["state"])),
        ("attempts", count(&st["connection_attempts"])),
        ("successful", count(&st["successful_connections"])),
        ("failed", count(&st["failed_connections"])),
        ("success rate", fmt_f(&st["success_rate"], 3)),
        ("disconnections", count(&st["disconnections"])),
        ("reconnects", count(&st["reconnects"])),
        ("reconnect avg", reconnect(&st["reconnect_avg_ms"])),
        ("reconnect max", reconnect(&st["reconnect_max_ms"])),
        ("rtt samples", count(&st["rtt_samples"])),
        ("rtt avg", ms(&st["rtt_avg_ms"])),
        ("rtt p50", ms(&st["rtt_p50_ms"])),
        ("rtt p95", ms(&st["rtt_p95_ms"])),
        ("rtt p99", ms(&st["rtt_p99_ms"])),
        ("heartbeat every", dur(&st["heartbeat_interval_ms"])),
        ("heartbeat timeout", dur(&st["heartbeat_timeout_ms"])),
        (
            "send rate",
            match st["send_bytes_per_sec"].as_f64() {
                Some(r) if r > 0.0 => format!("{:.1} kB/s", r / 1000.0),
                _ => "not measured yet (measured while more waits to go than goes at once)".into(),
            },
        ),
        (
            "stability",
            format!(
                "{} (connected {} s of {} s)",
                stability(st),
                fmt_f(&st["connected_secs"], 1),
                fmt_f(&st["total_secs"], 1)
            ),
        ),
        ("backoff factor", fmt_f(&st["backoff_factor"], 2)),
        ("next backoff", dur(&st["next_backoff_ms"])),
    ]);
    f
}

#[derive(Args)]
pub struct ControlArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Task ids, each checked against the id rules before any request: an id such as
    /// `x/../other` would otherwise be resolved by the URL into another task's. An id given
    /// twice is acted on once.
    #[arg(required_unless_present = "name", value_name = "TASK_ID")]
    ids: Vec<tether_proto::TaskId>,
    /// Instead of ids, a run's tasks: those submitted under this name that the action applies
    /// to (to cancel, every one not ended; to pause, the queued and running; to resume, the
    /// paused).
    #[arg(long, value_parser = parse_name, conflicts_with = "ids")]
    name: Option<String>,
}

/// Whether `action` applies to task `t` (for `--name`), and the words for the tasks it applies
/// to: a cancel to every task not ended ([`has_ended`]), a pause to the queued and running, a
/// resume to the paused.
fn applies(action: &str, t: &Value) -> bool {
    match action {
        "pause" => t["status"] == "queued" || t["status"] == "running",
        "resume" => t["status"] == "paused",
        _ => !has_ended(t),
    }
}

/// What [`applies`] takes, in words.
fn applies_to(action: &str) -> &'static str {
    match action {
        "pause" => "queued or running",
        "resume" => "paused",
        _ => "queued or running or paused",
    }
}

/// The ids of the tasks submitted under `name` that `action` [`applies`] to; an error if no
/// task has the name (a mistyped name is not a run with nothing to do).
async fn run_to_act_on(api: &Api, name: &str, action: &str) -> anyhow::Result<Vec<String>> {
    let (ids, named) = tasks_named(api, name, |t| applies(action, t)).await?;
    if ids.is_empty() {
        eprintln!(
            "none of the {named} tasks named {name:?} is {}: nothing to {action}",
            applies_to(action)
        );
    }
    Ok(ids)
}

/// The ids of the tasks submitted under `name` that `keep` keeps, read page by page, and how
/// many have the name; an error if none has (the controls of a run: a mistyped name would
/// otherwise be a run with nothing to do, which passed).
async fn tasks_named(
    api: &Api,
    name: &str,
    keep: impl Fn(&Value) -> bool,
) -> anyhow::Result<(Vec<String>, usize)> {
    let query = name_param(name);
    let mut pages = TaskPages::new(api, &query, 1000);
    let (mut ids, mut named) = (Vec::new(), 0);
    while let Some(page) = pages.next().await? {
        named += page.len();
        ids.extend(
            page.iter()
                .filter(|t| keep(t))
                .filter_map(|t| t["task_id"].as_str().map(str::to_owned)),
        );
    }
    if named == 0 {
        bail!(
            "no task named {name:?} at this coordinator (`tether tasks --name` lists a run's tasks)"
        );
    }
    Ok((ids, named))
}

/// Requests in flight at once when a command acts on many tasks or workers: the answers are
/// printed in the order the ids were given.
const CONTROLS_AT_ONCE: usize = 8;

/// The ids in the order given, each once.
fn each_once<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = BTreeSet::new();
    ids.into_iter().filter(|id| seen.insert(*id)).collect()
}

/// `tether cancel|pause|resume ID...`: each task asked in turn (a few requests at once), its
/// answer printed in the order given. With several ids, one refused (not found, already
/// ended) is said on stderr and the others go on; the command then fails, naming how many.
pub async fn control(a: ControlArgs, action: &str) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let of_run = match &a.name {
        Some(name) => run_to_act_on(&api, name, action).await?,
        None => Vec::new(),
    };
    let given = a.ids.iter().map(|id| id.as_str());
    let ids = each_once(given.chain(of_run.iter().map(String::as_str)));
    let json = a.common.json;
    let api = &api;
    let mut answers = futures_util::stream::iter(ids.iter().copied())
        .map(|id| async move { (id, control_one(api, id, action, json).await) })
        .buffered(CONTROLS_AT_ONCE);
    let mut refused = Vec::new();
    while let Some((id, answer)) = answers.next().await {
        match answer {
            Ok((line, note)) => {
                outln!("{line}")?;
                if let Some(note) = note {
                    eprintln!("{note}");
                }
            }
            // A run's task that moved on between the listing and the request (ended, or
            // resumed): said, and no failure of the run's control.
            Err(e)
                if a.name.is_some()
                    && e.downcast_ref::<Refused>().is_some_and(|r| r.status == 409) =>
            {
                eprintln!("task {id}: {e:#} (it changed since the run was listed)");
            }
            Err(e) => refused.push((id.to_owned(), e)),
        }
    }
    refused_of(refused, ids.len(), "task", &format!("refused the {action}"))
}

/// One task's control: the line to print of its answer (`ID STATUS`, or its JSON), and for a
/// pause or resume of a task whose worker is away, a note for stderr. Printed by the caller,
/// in the order the ids were given.
async fn control_one(
    api: &Api,
    id: &str,
    action: &str,
    json: bool,
) -> anyhow::Result<(String, Option<String>)> {
    let v = api
        .post(&format!("/api/v1/tasks/{id}/{action}"), &json!({}))
        .await?;
    if json {
        return Ok((v.to_string(), None));
    }
    let line = format!("{} {}", s(&v["task_id"]), s(&v["status"]));
    // A control of a task whose worker is away is kept for it (the lease's desired state):
    // said, so that `paused` is not read as done. A worker that cannot be read says nothing.
    if let (Some(worker), "pause" | "resume") = (v["lease"]["worker"].as_str(), action)
        && let Ok(w) = api.get(&format!("/api/v1/workers/{worker}")).await
        && w["state"] != "connected"
    {
        let note = format!(
            "(its worker {} is {}: it is told when it reconnects, and the task stays as asked if \
             it moves to another)",
            shown(worker),
            s(&w["state"])
        );
        return Ok((line, Some(note)));
    }
    Ok((line, None))
}

#[derive(Args)]
pub struct DrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Worker ids, each checked against the id rules before any request; an id given twice
    /// is drained once.
    #[arg(required = true, value_name = "WORKER_ID")]
    ids: Vec<tether_proto::WorkerId>,
    /// Wait until every worker named holds no task (exit 0), or DURATION passes (exit 1):
    /// `--wait` waits for as long as their tasks run, `--wait=30m` half an hour at most. Ends
    /// with exit 1 too if a worker is undrained meanwhile.
    #[arg(
        long,
        value_name = "DURATION",
        num_args = 0..=1,
        require_equals = true,
        value_parser = parse_wait
    )]
    wait: Option<Option<Duration>>,
}

/// How often `tether drain --wait` reads the worker.
const DRAIN_POLL: Duration = Duration::from_millis(500);

/// The tasks a worker's record says it holds, a few named.
fn held_tasks(w: &Value) -> String {
    let leases: Vec<String> = w["leases"]
        .as_array()
        .map(|l| l.iter().map(s).collect())
        .unwrap_or_default();
    match leases.len() {
        0 => "no task".to_owned(),
        n => {
            let named = leases[..n.min(LEASES_SHOWN)].join(", ");
            let more = n.saturating_sub(LEASES_SHOWN);
            let tasks = if n == 1 { "task" } else { "tasks" };
            match more {
                0 => format!("{n} {tasks} ({named})"),
                _ => format!("{n} {tasks} ({named} and {more} more)"),
            }
        }
    }
}

/// Drains or undrains (`action`) each of `ids` (a few requests at once), giving each worker's
/// record in the order given, or why it was refused. With several ids, a refusal does not stop
/// the others.
async fn worker_actions<'a>(
    api: &Api,
    ids: &[&'a str],
    action: &str,
) -> Vec<(&'a str, anyhow::Result<Value>)> {
    futures_util::stream::iter(ids.iter().copied())
        .map(|id| async move {
            let answer = api
                .post(&format!("/api/v1/workers/{id}/{action}"), &json!({}))
                .await
                .map_err(|e| unknown_worker(e, id));
            (id, answer)
        })
        .buffered(CONTROLS_AT_ONCE)
        .collect()
        .await
}

/// Ends a command on several tasks or workers (`noun`): each refusal said on stderr, then an
/// error naming how many of `of` were refused and `what` befell them; for one id (`of` 1),
/// its own error.
fn refused_of(
    mut refused: Vec<(String, anyhow::Error)>,
    of: usize,
    noun: &str,
    what: &str,
) -> anyhow::Result<()> {
    if of == 1
        && let Some((_, e)) = refused.pop()
    {
        return Err(e);
    }
    for (id, e) in &refused {
        eprintln!("{noun} {id}: {e:#}");
    }
    match refused.first() {
        None => Ok(()),
        Some((first, _)) => bail!(
            "{} of {of} {noun}s {what} (first {first}; each said above)",
            refused.len()
        ),
    }
}

/// `tether drain ID...`: each worker takes no new task; what it holds runs on. With `--wait`,
/// until none of them holds any.
pub async fn drain(a: DrainArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let ids = each_once(a.ids.iter().map(|id| id.as_str()));
    let mut refused = Vec::new();
    let mut waiting = Vec::new();
    for (id, answer) in worker_actions(&api, &ids, "drain").await {
        let w = match answer {
            Ok(w) => w,
            Err(e) => {
                refused.push((id.to_owned(), e));
                continue;
            }
        };
        if a.common.json && a.wait.is_none() {
            outln!("{w}")?;
            continue;
        }
        if !a.common.json {
            outln!(
                "worker {id} drained: it takes no new task until `tether undrain {id}`; it holds {}{}",
                held_tasks(&w),
                match w["leases"].as_array().is_some_and(|l| !l.is_empty()) {
                    true => ", which run on to their end",
                    false => "",
                }
            )?;
            if w["state"] != "connected" {
                eprintln!(
                    "(worker {id} is {}: the drain is kept for it, across its reconnections)",
                    s(&w["state"])
                );
            }
        }
        waiting.push((id, w));
    }
    if let Some(limit) = a.wait {
        refused.extend(wait_idle(&api, waiting, limit, a.common.json).await?);
    }
    let what = match a.wait {
        Some(_) => "not drained, or not emptied in the wait",
        None => "not drained",
    };
    refused_of(refused, ids.len(), "worker", what)
}

/// `tether drain --wait`: reads each drained worker (`waiting`, with its last record) until it
/// holds no task, each said as it empties; gives those undrained meanwhile, or still holding
/// tasks when `limit` passed, each with why.
async fn wait_idle(
    api: &Api,
    mut waiting: Vec<(&str, Value)>,
    limit: Option<Duration>,
    json: bool,
) -> anyhow::Result<Vec<(String, anyhow::Error)>> {
    let deadline = limit.map(|l| tokio::time::Instant::now() + l);
    let mut failed = Vec::new();
    loop {
        let mut still = Vec::new();
        for (id, w) in waiting {
            if w["leases"].as_array().is_none_or(Vec::is_empty) {
                match json {
                    true => outln!("{w}")?,
                    false => outln!("worker {id} holds no task")?,
                }
            } else if w["draining"] != true {
                let e = anyhow::anyhow!(
                    "worker {id} was undrained while `tether drain --wait` waited; it holds {}",
                    held_tasks(&w)
                );
                failed.push((id.to_owned(), e));
            } else {
                still.push((id, w));
            }
        }
        if still.is_empty() {
            return Ok(failed);
        }
        if let (Some(deadline), Some(limit)) = (deadline, limit)
            && tokio::time::Instant::now() >= deadline
        {
            for (id, w) in still {
                let e = anyhow::anyhow!(
                    "worker {id} still holds {} after {}",
                    held_tasks(&w),
                    humantime::format_duration(limit)
                );
                failed.push((id.to_owned(), e));
            }
            return Ok(failed);
        }
        tokio::time::sleep(DRAIN_POLL).await;
        waiting = Vec::with_capacity(still.len());
        for (id, _) in still {
            let w = api
                .get(&format!("/api/v1/workers/{id}"))
                .await
                .map_err(|e| unknown_worker(e, id))?;
            waiting.push((id, w));
        }
    }
}

#[derive(Args)]
pub struct UndrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Worker ids, each checked against the id rules before any request; an id given twice
    /// is undrained once.
    #[arg(required = true, value_name = "WORKER_ID")]
    ids: Vec<tether_proto::WorkerId>,
}

/// `tether undrain ID...`: each drained worker takes tasks again.
pub async fn undrain(a: UndrainArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let ids = each_once(a.ids.iter().map(|id| id.as_str()));
    let mut refused = Vec::new();
    for (id, answer) in worker_actions(&api, &ids, "undrain").await {
        match answer {
            Ok(w) if a.common.json => outln!("{w}")?,
            Ok(_) => outln!("worker {id} undrained: it takes tasks again")?,
            Err(e) => refused.push((id.to_owned(), e)),
        }
    }
    refused_of(refused, ids.len(), "worker", "not undrained")
}

/// An answer 404 about worker `id` said as such.
fn unknown_worker(e: anyhow::Error, id: &str) -> anyhow::Error {
    let unknown = e.downcast_ref::<Refused>().is_some_and(|r| r.status == 404);
    match unknown {
        true => e.context(format!(
            "no worker {id} at this coordinator: `tether workers` lists those it knows"
        )),
        false => e,
    }
}

/// How long `tether checkpoint --wait` waits when given no duration.
const CHECKPOINT_WAIT: &str = "30s";
/// How often `tether checkpoint --wait` reads the task.
const CHECKPOINT_POLL: Duration = Duration::from_millis(250);
/// How long `tether checkpoint --wait` still waits for a checkpoint once the worker said it
/// cannot give one: the runner answers at once that the attempt has made none yet, while its
/// executor, asked too, may be packing one.
const CHECKPOINT_ERROR_GRACE: Duration = Duration::from_secs(3);

#[derive(Args)]
pub struct CheckpointArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Task id, checked against the id rules before any request.
    id: tether_proto::TaskId,
    /// Wait until a checkpoint newer than the request is stored (exit 0, its id and size
    /// printed), the worker says why it cannot make one (exit 1), the task ends, or DURATION
    /// passes (exit 1): `--wait` waits 30 s, `--wait=2m` two minutes.
    #[arg(
        long,
        value_name = "DURATION",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = CHECKPOINT_WAIT,
        value_parser = parse_wait
    )]
    wait: Option<Duration>,
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    let d = crate::settings::parse_duration_arg(s)?;
    if d.is_zero() {
        return Err("a wait must be longer than zero".to_owned());
    }
    Ok(d)
}

/// The attempt's record in a task's JSON.
fn attempt_of(t: &Value, attempt: &Value) -> Value {
    t["attempts"]
        .as_array()
        .and_then(|a| a.iter().find(|a| &a["attempt"] == attempt))
        .cloned()
        .unwrap_or(Value::Null)
}

/// `tether checkpoint`: asks the task's worker for a checkpoint now, says of whom it was asked
/// and, with `--wait`, what came of it. A task that is not running on a connected worker is
/// refused by the coordinator (HTTP 409), which is said and exits 1.
pub async fn checkpoint(a: CheckpointArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let path = format!("/api/v1/tasks/{}", a.id);
    // What was there before the request: only what differs from it answers it.
    let before = match a.wait {
        Some(_) => Some(api.get(&path).await?),
        None => None,
    };
    let v = api.post(&format!("{path}/checkpoint"), &json!({})).await?;
    let (worker, attempt) = (&v["lease"]["worker"], &v["attempt"]);
    if !a.common.json || a.wait.is_none() {
        let asked = format!(
            "checkpoint asked of worker {} for {} (attempt {attempt})",
            s(worker),
            s(&v["task_id"])
        );
        match a.common.json {
            true => outln!("{v}")?,
            false => outln!("{asked}")?,
        }
        if v["status"] == "paused" {
            eprintln!("(the task is paused: a `command` task makes it once resumed)");
        }
    }
    let (Some(wait), Some(before)) = (a.wait, before) else {
        return Ok(());
    };
    let latest = |t: &Value| t["latest_checkpoint"]["checkpoint_id"].clone();
    let error_at = |t: &Value| attempt_of(t, attempt)["checkpoint_error_at"].clone();
    let (old_latest, old_error) = (latest(&before), error_at(&before));
    let deadline = tokio::time::Instant::now() + wait;
    let mut refused: Option<(tokio::time::Instant, String)> = None;
    loop {
        let t = api.get(&path).await?;
        let cp = &t["latest_checkpoint"];
        if !cp["checkpoint_id"].is_null() && latest(&t) != old_latest {
            match a.common.json {
                true => outln!("{cp}")?,
                false => outln!(
                    "checkpoint {} of {} (attempt {}): {} bytes",
                    s(&cp["checkpoint_id"]),
                    s(&t["task_id"]),
                    cp["attempt"],
                    cp["size"]
                )?,
            }
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if refused.is_none() && error_at(&t) != old_error && !error_at(&t).is_null() {
            let why = s(&attempt_of(&t, attempt)["checkpoint_error"]);
            refused = Some((now, why));
        }
        if let Some((since, why)) = &refused
            && (now >= *since + CHECKPOINT_ERROR_GRACE || now >= deadline)
        {
            bail!(
                "worker {} made no checkpoint of {}: {}",
                s(worker),
                a.id,
                shown(why)
            );
        }
        if &t["attempt"] != attempt || t["lease"].is_null() {
            bail!(
                "{} is {} (attempt {}) and no checkpoint of attempt {attempt} came",
                a.id,
                s(&t["status"]),
                t["attempt"]
            );
        }
        if now >= deadline {
            bail!(
                "no checkpoint of {} within {}: its executor may make none, or its checkpoint \
                 directory is unchanged since its latest checkpoint ({}), which holds its state",
                a.id,
                humantime::format_duration(wait),
                match old_latest.is_null() {
                    true => "none".to_owned(),
                    false => s(&old_latest),
                }
            );
        }
        tokio::time::sleep(CHECKPOINT_POLL.min(deadline - now)).await;
    }
}

/// Characters of a task's config and of its state `tether task` shows (`--json` has all of
/// them): an executor's state may be megabytes.
const CONFIG_SHOWN: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    /// An ended task's spec goes again without its id; a task not ended, or one whose env a
    /// read token saw replaced, is refused saying why.
    #[test]
    fn a_retry_sends_an_ended_tasks_spec_without_its_id() {
        // (A retry of a retry: its `retry_of` names the task retried now.)
        let spec = json!({"task_id": "t-1", "kind": "command", "priority": 1,
            "config": {"shell": "make", "env": {"K": "v"}}, "tags": {"os": "linux"},
            "retry_of": "t-0"});
        let t = json!({"task_id": "t-1", "status": "failed", "spec": spec});
        let again = spec_to_retry(&t).expect("an ended task");
        assert_eq!(
            again,
            json!({"kind": "command", "priority": 1,
                "config": {"shell": "make", "env": {"K": "v"}}, "tags": {"os": "linux"},
                "retry_of": "t-1"})
        );
        let retried = json!({"task_id": "t-1", "status": "failed", "spec": spec,
            "retried_by": "t-2"});
        let e = spec_to_retry(&retried).expect_err("retried").to_string();
        assert!(e.contains("task t-1 was retried already, by t-2"), "{e}");
        let running = json!({"task_id": "t-1", "status": "running", "spec": spec});
        let e = spec_to_retry(&running).expect_err("running").to_string();
        assert!(e.contains("task t-1 is running: only an ended task"), "{e}");
        let spec = json!({"kind": "command", "config": {"shell": "x", "env": {"K": REDACTED}}});
        let hidden = json!({"task_id": "t-1", "status": "completed", "spec": spec,
            "env_redacted": true});
        let e = spec_to_retry(&hidden).expect_err("redacted").to_string();
        assert!(e.contains("hidden from this token"), "{e}");
        // The placeholder's text given as a value, shown to an admin: run again as it is.
        let given = json!({"task_id": "t-1", "status": "completed", "spec": spec});
        let mut as_it_is = spec.clone();
        as_it_is["retry_of"] = json!("t-1");
        assert_eq!(spec_to_retry(&given).expect("not redacted"), as_it_is);
    }

    /// A queued task's `waiting` line: what the capable connected workers are doing, or what
    /// the others lack, and the disconnected ones that could run it.
    #[test]
    fn a_queued_task_says_what_keeps_the_fleet_from_taking_it() {
        let spec = json!({"kind": "command", "requires": ["cuda"], "tags": {"os": "linux"}});
        let worker = |state: &str, caps: Value, tags: Value, extra: Value| {
            let mut w = json!({"worker_id": "w", "state": state, "boot_id": "b",
                "executors": ["command", "sleep"], "capabilities": caps, "tags": tags,
                "slots": 1, "leases": [], "sessions": 1,
                "first_seen": "2026-12-07T00:00:00Z", "last_seen": "2026-12-07T00:00:00Z"});
            for (k, v) in extra.as_object().expect("object") {
                w[k] = v.clone();
            }
            w
        };
        let linux = json!({"os": "linux"});
        let fleet = [
            worker(
                "connected",
                json!(["cuda"]),
                linux.clone(),
                json!({"leases": ["t-1"]}),
            ),
            worker(
                "connected",
                json!(["cuda"]),
                linux.clone(),
                json!({"draining": true}),
            ),
            worker("connected", json!([]), linux.clone(), json!({})),
            worker(
                "connected",
                json!(["cuda"]),
                json!({"os": "mac"}),
                json!({}),
            ),
            worker("disconnected", json!(["cuda"]), linux.clone(), json!({})),
            worker("lost", json!(["cuda"]), linux.clone(), json!({})),
        ];
        assert_eq!(
            why_waiting(&spec, &fleet).as_deref(),
            Some(
                "2 connected workers can run it: 1 busy (every slot taken), 1 drained (tether \
             undrain); 1 disconnected worker could"
            )
        );
        assert_eq!(
            why_waiting(&spec, &fleet[2..4]).as_deref(),
            Some("no connected worker can run it: 1 lacks capability cuda, 1 lacks tag os=linux")
        );
        let other = json!({"kind": "gpu_bench"});
        assert_eq!(
            why_waiting(&other, &fleet[..1]).as_deref(),
            Some("no connected worker can run it: 1 lacks the `gpu_bench` executor")
        );
        assert_eq!(
            why_waiting(&spec, &[]).as_deref(),
            Some("no worker is connected")
        );
        assert_eq!(
            why_waiting(&spec, &fleet[4..5]).as_deref(),
            Some("no worker is connected; 1 disconnected worker could")
        );
        // A record that does not read as this version's: nothing is said.
        assert_eq!(why_waiting(&spec, &[json!({"state": "connected"})]), None);
    }

    /// The ATTEMPT of a listing's row: a leased or ended task's attempt; a task waiting again
    /// its last attempt with how it ended; a task never started none.
    #[test]
    fn a_rows_attempt_says_how_the_last_one_ended_while_the_task_waits() {
        let leased = json!({"status": "running", "attempt": 2, "lease": {"worker": "w"},
            "attempts": [{"attempt": 1, "end": "lost"}, {"attempt": 2}]});
        assert_eq!(task_attempt(&leased), "2");
        let requeued = json!({"status": "queued", "attempt": 1,
            "attempts": [{"attempt": 1, "end": "lost"}]});
        assert_eq!(task_attempt(&requeued), "1 lost");
        let fresh = json!({"status": "queued", "attempt": 0, "attempts": []});
        assert_eq!(task_attempt(&fresh), "-");
        // Earlier tasks of its id left their numbers (attempt_base), none of its own yet.
        let reused = json!({"status": "queued", "attempt": 4, "attempt_base": 4, "attempts": []});
        assert_eq!(task_attempt(&reused), "-");
        let done = json!({"status": "completed", "attempt": 3,
            "attempts": [{"attempt": 3, "end": "completed"}]});
        assert_eq!(task_attempt(&done), "3");
        let paused = json!({"status": "paused", "attempt": 1,
            "attempts": [{"attempt": 1, "end": "stopped"}]});
        assert_eq!(task_attempt(&paused), "1 stopped");
    }

    /// A listing's URL has no stray `&` (errors quote it: `/api/v1/tasks?limit=1000&`), and
    /// its parameters are joined by one `&` each.
    #[test]
    fn a_task_listings_path_joins_its_parameters_with_one_ampersand_each() {
        assert_eq!(
            tasks_path(1000, &tasks_query(None, None, false)),
            "/api/v1/tasks?limit=1000"
        );
        assert_eq!(
            tasks_path(7, &tasks_query(None, None, true)),
            "/api/v1/tasks?limit=7&order=newest"
        );
        assert_eq!(
            tasks_path(7, &tasks_query(Some("failed"), None, true)),
            "/api/v1/tasks?limit=7&status=failed&order=newest"
        );
        assert_eq!(
            tasks_path(7, &tasks_query(Some("failed"), None, false)),
            "/api/v1/tasks?limit=7&status=failed"
        );
        // A name is any text: what would end or change the parameter is encoded.
        assert_eq!(
            tasks_path(7, &tasks_query(None, Some("a&b=c+d e%"), false)),
            "/api/v1/tasks?limit=7&name=a%26b%3Dc%2Bd+e%25"
        );
    }

    /// The help of `--priority` says the number each named priority stands for, as parsed.
    #[test]
    fn the_priority_help_says_what_each_name_stands_for() {
        let cmd = <crate::Cli as clap::CommandFactory>::command();
        let submit = cmd.find_subcommand("submit").expect("submit");
        let arg = submit
            .get_arguments()
            .find(|a| a.get_long() == Some("priority"));
        let help = arg.and_then(|a| a.get_help()).expect("help").to_string();
        for name in ["high", "normal", "low"] {
            let n = parse_priority(name).expect(name);
            assert!(help.contains(&format!("{name} ({n})")), "{name}: {help}");
        }
    }

    fn submit_args(args: &[&str]) -> Result<SubmitArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            submit: SubmitArgs,
        }
        let argv = std::iter::once("submit").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).map(|c| c.submit)
    }

    /// `--kind` and `--config` make a task of any kind from the flags: the config as given
    /// (a `command`'s too, with keys no flag has), none for a kind's defaults; a command's
    /// flags with them, or for another kind, are refused, as is a config that is not JSON.
    #[test]
    fn kind_and_config_make_a_spec_of_any_kind_and_refuse_a_command_beside_them() {
        let a = submit_args(&["--kind", "sleep", "--config", r#"{"ms": 500, "steps": 5}"#])
            .expect("args");
        a.check().expect("a valid sleep config");
        let spec = command_spec(&a).expect("spec");
        assert_eq!(spec.kind, "sleep");
        assert_eq!(
            spec.config.get(),
            json!({"ms": 500, "steps": 5}).to_string()
        );
        let a = submit_args(&["--kind", "sleep"]).expect("args");
        a.check().expect("every default");
        assert_eq!(command_spec(&a).expect("spec").config.get(), "null");
        let a =
            submit_args(&["--config", r#"{"program": "x", "tail_bytes": 65536}"#]).expect("args");
        a.check().expect("a command's config");
        assert_eq!(command_spec(&a).expect("spec").kind, "command");
        let a = submit_args(&["--kind", "sleep", "--config", r#"{"msec": 1}"#]).expect("args");
        let e = a.check().expect_err("an unknown key");
        assert!(
            e.contains("the `sleep` executor refuses this --config") && e.contains("msec"),
            "{e}"
        );
        let a = submit_args(&["--kind", "sleep", "--", "true"]).expect("args");
        let e = a.check().expect_err("a command for a sleep");
        assert!(e.contains("--config JSON"), "{e}");
        for args in [
            &["--config", "{}", "--", "true"][..],
            &["--config", "{}", "--shell", "true"],
            &["--config", "{}", "--env", "A=1"],
            &["--config", "{}", "--cwd", "/tmp"],
            &["--config", "{}", "--file", "f.json"],
            &["--kind", "sleep", "--file", "f.json"],
            &["--config", "{not json"],
            &["--kind", "", "--config", "{}"],
        ] {
            assert!(submit_args(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn a_command_spec_carries_its_environment_directory_tags_and_id() {
        let a = submit_args(&[
            "--id",
            "nightly-1",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--cwd",
            "/srv",
            "--tag",
            "os=linux",
            "--priority",
            "high",
            "--",
            "make",
            "bench",
        ])
        .expect("parsed");
        let spec = command_spec(&a).expect("spec");
        assert_eq!(
            spec.task_id.map(|t| t.to_string()).as_deref(),
            Some("nightly-1")
        );
        assert_eq!(
            spec.config,
            json!({"program": "make", "args": ["bench"], "env": {"A": "1", "B": "x=y"}, "cwd": "/srv"})
        );
        assert_eq!(spec.tags.get("os").map(String::as_str), Some("linux"));
        assert_eq!(spec.priority, 1);
        let a = submit_args(&["--shell", "echo $A | wc -c"]).expect("parsed");
        assert_eq!(
            command_spec(&a).expect("spec").config,
            json!({"shell": "echo $A | wc -c"})
        );
    }

    #[test]
    fn bad_submit_flags_are_refused_with_a_clear_error() {
        let e = submit_args(&["--env", "NOEQUALS", "--", "true"])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("use KEY=VALUE"), "{e}");
        assert!(submit_args(&["--tag", "=v", "--", "true"]).is_err());
        // A timeout past what its milliseconds hold is refused, not wrapped around to seconds:
        // by the parser, as every duration past ten years is.
        let huge = submit_args(&["--timeout", "213503982334d 51956616ms", "--", "true"]);
        let e = huge.err().expect("refused");
        assert!(e.to_string().contains("--timeout"), "{e}");
        assert!(e.to_string().contains("longer than 3650 days"), "{e}");
        assert!(
            submit_args(&["--shell", "true", "--", "true"]).is_err(),
            "one or the other"
        );
        // The spec comes from the file alone: each flag that would shape it is refused beside
        // --file, by name, rather than accepted and ignored.
        for flag in [
            &["--priority", "high"][..],
            &["--require", "cuda"],
            &["--timeout", "10m"],
            &["--max-attempts", "3"],
            &["--id", "nightly-1"],
            &["--tag", "os=linux"],
            &["--env", "A=1"],
            &["--cwd", "/srv"],
            &["--shell", "true"],
        ] {
            let e = submit_args(&[&["--file", "t.json"][..], flag].concat())
                .err()
                .unwrap_or_else(|| panic!("--file with {flag:?} is refused"));
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
            assert!(e.to_string().contains(flag[0]), "{flag:?}: {e}");
        }
        let e = submit_args(&["--file", "t.json", "--", "true"])
            .err()
            .expect("--file with a command is refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        // What does go with a file: the defaults, --watch, --name (a run's, for every task of
        // the file) and the client's own flags.
        let a =
            submit_args(&["--file", "t.json", "--watch", "--json", "--name", "r"]).expect("parsed");
        assert!(a.watch && a.file.is_some() && a.name.as_deref() == Some("r"));
        let a = submit_args(&[]).expect("parsed");
        let e = command_spec(&a).expect_err("nothing to run");
        assert!(e.to_string().contains("give a command"), "{e}");
        let e = submit_args(&["--id", "bad id!", "--", "true"])
            .err()
            .expect("a bad id is refused as it is read");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
    }

    /// A connected worker that takes no new task says why in its STATE column; any other
    /// shows its state.
    #[test]
    fn a_workers_state_column_says_why_it_takes_no_task() {
        let rest = serde_json::json!({"until": "2026-12-06T17:00:00Z", "faults": 1, "error": "x"});
        for (w, want) in [
            (serde_json::json!({"state": "connected"}), "connected"),
            (
                serde_json::json!({"state": "connected", "stopping": true}),
                "stopping",
            ),
            (
                serde_json::json!({"state": "connected", "resting": rest}),
                "resting",
            ),
            (
                serde_json::json!({"state": "disconnected", "resting": rest}),
                "disconnected",
            ),
            (
                serde_json::json!({"state": "lost", "stopping": true}),
                "lost",
            ),
            (
                serde_json::json!({"state": "connected", "draining": true, "leases": ["t-1"]}),
                "draining",
            ),
            (
                serde_json::json!({"state": "connected", "draining": true, "leases": []}),
                "drained",
            ),
            (
                serde_json::json!({"state": "disconnected", "draining": true}),
                "disconnected, drained",
            ),
            (
                serde_json::json!({"state": "lost", "draining": false}),
                "lost",
            ),
        ] {
            assert_eq!(worker_state(&w), want, "{w}");
        }
    }

    /// A worker as `GET /api/v1/workers/{id}` gives it, connected, with statistics.
    fn reported_worker() -> Value {
        json!({
            "worker_id": "w-1", "state": "connected", "slots": 2, "sessions": 3,
            "leases": ["t-1", "t-2"], "capabilities": ["cpu", "cuda"], "tags": {"os": "linux"},
            "executors": ["command", "sleep"], "boot_id": "b",
            "first_seen": "2026-12-07T06:00:00Z", "last_seen": "2026-12-07T07:00:00Z",
            "stats": {
                "state": "connected", "connection_attempts": 9, "successful_connections": 4,
                "failed_connections": 5, "disconnections": 3, "connected_secs": 50.0,
                "total_secs": 60.0, "stability": 0.8333, "success_rate": 0.4444,
                "rtt_samples": 120, "rtt_avg_ms": 1.25, "rtt_p50_ms": 1.0, "rtt_p95_ms": 2.5,
                "rtt_p99_ms": 7.0, "reconnects": 3, "reconnect_avg_ms": 812.4,
                "reconnect_max_ms": 1500.0, "heartbeat_timeout_ms": 15000,
                "heartbeat_interval_ms": 5000, "send_bytes_per_sec": 123400,
                "backoff_factor": 2.0, "next_backoff_ms": 4000,
                "reported_at": "2026-12-07T06:59:48Z",
            },
        })
    }

    /// A worker's report as its first session began: connected no time yet, after 0.3 s of
    /// looking for the coordinator.
    fn just_connected() -> Value {
        let mut w = reported_worker();
        let st = &mut w["stats"];
        for (k, v) in [
            ("connection_attempts", json!(1)),
            ("successful_connections", json!(1)),
            ("failed_connections", json!(0)),
            ("disconnections", json!(0)),
            ("connected_secs", json!(0.0)),
            ("total_secs", json!(0.3)),
            ("stability", json!(0.0)),
            ("reconnects", json!(0)),
            ("reconnect_avg_ms", json!(0.0)),
            ("reconnect_max_ms", json!(0.0)),
        ] {
            st[k] = v;
        }
        w
    }

    /// STABILITY is `-` while it is no measure: a worker that never lost a session and has
    /// been connected under a second (its report came as its first session began: 0.000 read
    /// as "never connected"); a second in, or once a session was lost, it is the figure, 0
    /// included.
    #[test]
    fn stability_is_no_figure_until_a_worker_has_been_connected_a_second_or_lost_a_session() {
        let now = at("2026-12-07T07:00:00Z");
        let cell = |w: &Value| {
            let i = WORKER_HEAD
                .iter()
                .position(|h| *h == "STABILITY")
                .expect("head");
            worker_row(w, now)[i].clone()
        };
        let mut w = just_connected();
        assert_eq!(cell(&w), "-");
        w["stats"]["connected_secs"] = json!(0.999);
        assert_eq!(cell(&w), "-");
        w["stats"]["connected_secs"] = json!(1.0);
        w["stats"]["total_secs"] = json!(1.3);
        w["stats"]["stability"] = json!(0.769);
        assert_eq!(cell(&w), "0.769", "a second connected is a measure");
        let mut w = just_connected();
        w["stats"]["disconnections"] = json!(1);
        w["stats"]["connected_secs"] = json!(0.2);
        w["stats"]["total_secs"] = json!(600.0);
        w["stats"]["stability"] = json!(0.0003);
        assert_eq!(cell(&w), "0.000", "a lost session: a measure, however poor");
        assert_eq!(cell(&reported_worker()), "0.833");
    }

    fn at(t: &str) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339(t)
            .expect("time")
            .with_timezone(&chrono::Utc)
    }

    /// Below `tether tasks`' table, a running task whose worker is disconnected is named with
    /// its worker, since when and what becomes of it; one whose worker is connected, or that
    /// is not running, is not; past [`AWAY_TASKS_SHOWN`] tasks of a worker, a count.
    #[test]
    fn tasks_whose_worker_is_disconnected_are_named_below_the_table() {
        let now = at("2026-12-07T07:00:00Z");
        let mut away = Away::default();
        let leased = |id: &str, status: &str, w: &str| json!({"task_id": id, "status": status, "lease": {"worker": w}});
        away.add(&leased("t-1", "running", "w1"));
        away.add(&leased("t-2", "running", "w2"));
        away.add(&leased("t-3", "paused", "w1"));
        away.add(&json!({"task_id": "t-4", "status": "queued"}));
        for i in 0..12 {
            away.add(&leased(&format!("m-{i}"), "running", "w3"));
        }
        let workers = [
            json!({"worker_id": "w1", "state": "disconnected", "disconnected_at": "2026-12-07T06:59:52Z"}),
            json!({"worker_id": "w2", "state": "connected"}),
            json!({"worker_id": "w3", "state": "disconnected", "disconnected_at": "2026-12-07T06:59:00Z"}),
            json!({"worker_id": "w4", "state": "disconnected", "disconnected_at": "2026-12-07T06:59:00Z"}),
        ];
        let lines = away_lines(&away.by_worker, &workers, now);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("(worker w1 disconnected 8s ago: its running task(s) t-1 wait")
                && lines[0].contains("grace ends (--lost-after, from the disconnection)"),
            "{lines:?}"
        );
        assert!(!lines[0].contains("t-3"), "{lines:?}");
        assert!(
            lines[1].contains("m-0, m-1") && lines[1].contains("m-9, and 2 more wait"),
            "{lines:?}"
        );
        assert!(!lines[1].contains("m-10"), "{lines:?}");
    }

    /// A coordinator that says when a disconnected worker's grace ends (`lost_at`) is
    /// believed: the hint says how long is left (its `--lost-after` is not the default, or a
    /// restart began the grace anew), and `now` once it is past.
    #[test]
    fn the_hint_says_when_the_coordinators_grace_ends_when_it_says() {
        let now = at("2026-12-07T07:00:00Z");
        let mut away = Away::default();
        for (t, w) in [("t-1", "w1"), ("t-2", "w2")] {
            away.add(&json!({"task_id": t, "status": "running", "lease": {"worker": w}}));
        }
        let workers = [
            json!({"worker_id": "w1", "state": "disconnected", "disconnected_at": "2026-12-07T06:59:52Z", "lost_at": "2026-12-07T07:04:52Z"}),
            json!({"worker_id": "w2", "state": "disconnected", "disconnected_at": "2026-12-07T06:58:00Z", "lost_at": "2026-12-07T06:59:59.500Z"}),
        ];
        let lines = away_lines(&away.by_worker, &workers, now);
        assert!(
            lines[0].contains("until the coordinator's grace ends in 4m52s (--lost-after), then"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("until the coordinator's grace ends now (--lost-after), then"),
            "{lines:?}"
        );
    }

    /// A disconnected worker's view says when the coordinator's grace for it ends
    /// (`lost_at`); a connected one's has no such line.
    #[test]
    fn a_disconnected_workers_view_says_when_it_is_lost() {
        let now = at("2026-12-07T07:00:00Z");
        let mut w = reported_worker();
        assert!(!worker_fields(&w, now).iter().any(|(k, _)| *k == "lost at"));
        w["state"] = json!("disconnected");
        w["lost_at"] = json!("2026-12-07T07:00:42Z");
        let f = worker_fields(&w, now);
        let lost = f.iter().find(|(k, _)| *k == "lost at").expect("lost at");
        assert_eq!(
            lost.1,
            "2026-12-07T07:00:42.000Z (in 42s) unless it comes back: its tasks then go to other workers"
        );
    }

    /// `tether workers ID` shows each statistic the worker reported, one a line under its
    /// key, with how old the report is; and its record: tasks, labels, when it was seen.
    #[test]
    fn one_workers_view_has_every_statistic_it_reported_a_line_each() {
        let f = worker_fields(&reported_worker(), at("2026-12-07T07:00:00Z"));
        let got = |key: &str| {
            f.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("no {key}: {f:?}"))
        };
        for (key, want) in [
            ("worker", "w-1"),
            ("state", "connected"),
            ("slots", "2"),
            ("tasks", "t-1, t-2"),
            ("capabilities", "cpu, cuda"),
            ("tags", "os=linux"),
            ("executors", "command, sleep"),
            ("sessions", "3"),
            ("last seen", "2026-12-07T07:00:00.000Z (0s ago)"),
            ("reported", "2026-12-07T06:59:48.000Z (12s ago)"),
            ("connection", "connected"),
            ("attempts", "9"),
            ("successful", "4"),
            ("failed", "5"),
            ("success rate", "0.444"),
            ("disconnections", "3"),
            ("reconnects", "3"),
            ("reconnect avg", "812 ms"),
            ("reconnect max", "1.5 s"),
            ("rtt samples", "120"),
            ("rtt avg", "1.2 ms"),
            ("rtt p50", "1.0 ms"),
            ("rtt p95", "2.5 ms"),
            ("rtt p99", "7.0 ms"),
            ("heartbeat every", "5.0 s"),
            ("heartbeat timeout", "15.0 s"),
            ("send rate", "123.4 kB/s"),
            ("stability", "0.833 (connected 50.0 s of 60.0 s)"),
            ("backoff factor", "2.00"),
            ("next backoff", "4.0 s"),
        ] {
            assert_eq!(got(key), want, "{key}");
        }
        // Every field of the API's statistics is on a line of its own.
        let stats = reported_worker()["stats"].as_object().expect("stats").len();
        let after_blank = f.iter().skip_while(|(k, _)| !k.is_empty()).skip(1).count();
        assert_eq!(
            after_blank,
            stats - 2,
            "connected and total secs share a line: {f:?}"
        );
    }

    /// A worker that takes no new task says why: stopping, or resting until when and for
    /// what fault; one that has reported nothing says when it will.
    #[test]
    fn one_workers_view_says_why_it_takes_no_task_and_when_it_reports() {
        let now = at("2026-12-07T07:00:00Z");
        let field = |w: &Value, key: &str| {
            worker_fields(w, now)
                .into_iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v)
        };
        let mut w = reported_worker();
        w["stopping"] = json!(true);
        let state = field(&w, "state").expect("state");
        assert!(
            state.starts_with("stopping (") && state.contains("no new task"),
            "{state}"
        );
        let mut w = reported_worker();
        w["resting"] = json!({"until": "2026-12-07T07:01:30Z", "faults": 2, "error": "disk\nfull"});
        let state = field(&w, "state").expect("state");
        assert!(state.starts_with("resting ("), "{state}");
        assert_eq!(
            field(&w, "resting until").as_deref(),
            Some("2026-12-07T07:01:30.000Z (in 1m30s)")
        );
        assert_eq!(
            field(&w, "rest for").as_deref(),
            Some("2 fault(s) of its own in a row, the last: disk\\nfull")
        );
        let mut w = reported_worker();
        w["stats"]["rtt_samples"] = json!(0);
        for rtt in ["rtt_avg_ms", "rtt_p50_ms", "rtt_p95_ms", "rtt_p99_ms"] {
            w["stats"][rtt] = json!(0.0);
        }
        for key in ["rtt avg", "rtt p50", "rtt p95", "rtt p99"] {
            assert_eq!(field(&w, key).as_deref(), Some("-"), "{key}: no measure");
        }
        let w = just_connected();
        assert_eq!(
            field(&w, "stability").as_deref(),
            Some("- (connected 0.0 s of 0.3 s)"),
            "a worker just connected: no measure"
        );
        for key in ["reconnect avg", "reconnect max"] {
            assert_eq!(field(&w, key).as_deref(), Some("-"), "{key}: no reconnect");
        }
        let mut w = reported_worker();
        w["stats"] = Value::Null;
        w["leases"] = json!([]);
        let reported = field(&w, "reported").expect("reported");
        assert!(reported.starts_with("no statistics yet"), "{reported}");
        assert_eq!(field(&w, "failed"), None);
        assert_eq!(field(&w, "tasks").as_deref(), Some("none"));
    }

    /// The table's FAILED and BACKOFF_S columns: failed connection attempts and the next
    /// backoff, in seconds; `-` before any report.
    #[test]
    fn the_workers_table_has_failed_attempts_and_the_next_backoff() {
        let now = at("2026-12-07T07:00:00Z");
        let cell = |w: &Value, head: &str| {
            let i = WORKER_HEAD.iter().position(|h| *h == head).expect(head);
            worker_row(w, now)[i].clone()
        };
        let w = reported_worker();
        assert_eq!(cell(&w, "FAILED"), "5");
        assert_eq!(cell(&w, "BACKOFF_S"), "4.0");
        assert_eq!(cell(&w, "RECONNECTS"), "3");
        assert_eq!(cell(&w, "REPORTED"), "12s ago");
        assert_eq!(cell(&w, "LAST_SEEN"), "0s ago");
        let mut w = reported_worker();
        w["stats"]["rtt_samples"] = json!(0);
        w["stats"]["rtt_p50_ms"] = json!(0.0);
        assert_eq!(
            cell(&w, "RTT_P50_MS"),
            "-",
            "no round trip measured: no RTT"
        );
        let mut w = reported_worker();
        w["stats"] = Value::Null;
        assert_eq!(cell(&w, "FAILED"), "-");
        assert_eq!(cell(&w, "STABILITY"), "-");
        assert_eq!(cell(&w, "BACKOFF_S"), "-");
        assert_eq!(worker_row(&w, now).len(), WORKER_HEAD.len());
    }

    /// A capability, tag or name is held to the API's limits as it is read: refused past them
    /// (in the API's words), taken up to them.
    #[test]
    fn labels_are_held_to_the_apis_limits_as_they_are_read() {
        use tether_proto::task::{MAX_LABEL_BYTES, MAX_NAME_BYTES};
        let (label, name) = ("c".repeat(MAX_LABEL_BYTES), "n".repeat(MAX_NAME_BYTES));
        let tag = format!("{label}={label}");
        let a = submit_args(&[
            "--require",
            &label,
            "--tag",
            &tag,
            "--name",
            &name,
            "--",
            "true",
        ])
        .expect("at the limits");
        let spec = command_spec(&a).expect("spec");
        spec.validate().expect("the API takes it");
        for (flag, value, says) in [
            ("--require", "", "empty capability"),
            ("--require", " ", "empty capability"),
            ("--require", &format!("{label}c"), "of 257 bytes"),
            ("--tag", " =v", "empty key"),
            ("--tag", &format!("k={label}v"), "of 257 bytes"),
            ("--name", &format!("{name}n"), "name of 1025 bytes"),
        ] {
            let e = submit_args(&[flag, value, "--", "true"])
                .err()
                .unwrap_or_else(|| panic!("{flag} {value:?} is refused"));
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
            assert!(
                e.to_string().contains(flag) && e.to_string().contains(says),
                "{e}"
            );
        }
    }

    /// The WORKER column names where a task runs or, once it ended, where it ran: a task
    /// queued again after its worker went, or paused without a lease, runs nowhere, and showed
    /// its last attempt's worker as if it ran there.
    #[test]
    fn a_tasks_worker_is_its_leases_or_once_ended_its_last_attempts() {
        let worker_of = |status: &str, lease: Option<&str>| {
            let t = json!({
                "task_id": "t", "status": status, "attempt": 1,
                "lease": lease.map(|w| json!({"worker": w})),
                "attempts": [{"attempt": 1, "worker": "w1"}],
                "spec": {"kind": "command", "priority": 5},
            });
            task_row(&t)[3].clone()
        };
        assert_eq!(worker_of("running", Some("w2")), "w2");
        assert_eq!(worker_of("paused", Some("w2")), "w2");
        assert_eq!(worker_of("completed", None), "w1");
        assert_eq!(worker_of("failed", None), "w1");
        assert_eq!(worker_of("queued", None), "-");
        assert_eq!(worker_of("paused", None), "-");
    }

    /// A submission refused with --watch (a duplicate id) is the submission's failure, said
    /// in its own words with its exit status (1), not as a watch that could not follow (2).
    #[tokio::test]
    async fn a_submission_refused_with_watch_is_the_submissions_error_not_the_watchs() {
        let app = axum::Router::new().route(
            "/api/v1/tasks",
            axum::routing::post(|| async {
                let body = json!({"error": {"code": "conflict", "message": "task nightly-1 already exists"}});
                (http::StatusCode::CONFLICT, axum::Json(body))
            }),
        );
        let url = format!("http://{}", serve_for_test(app).await);
        let args = [
            "--coordinator",
            url.as_str(),
            "--watch",
            "--id",
            "nightly-1",
            "--",
            "true",
        ];
        let e = submit(submit_args(&args).expect("parsed"))
            .await
            .expect_err("refused");
        let said = crate::output::describe(&e);
        assert!(said.starts_with("task nightly-1 already exists"), "{said}");
        assert!(
            e.downcast_ref::<crate::watch::Unfollowed>().is_none(),
            "{said}"
        );
    }

    #[test]
    fn priorities_take_names_and_numbers() {
        assert_eq!(parse_priority("high"), Ok(1));
        assert_eq!(parse_priority("normal"), Ok(5));
        assert_eq!(parse_priority("low"), Ok(9));
        assert_eq!(parse_priority("0"), Ok(0));
        assert!(parse_priority("10").is_err());
        assert!(parse_priority("urgent").is_err());
    }

    /// A coordinator that read a whole submission and closed without a word may have
    /// committed it: the error says the outcome is unknown and how to check, not "cannot reach"
    /// (which invites sending it again, a second task). One refused a connection was sent
    /// nothing: "cannot reach" it stays.
    #[tokio::test]
    async fn a_submission_read_whole_and_never_answered_has_an_unknown_outcome() {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (read_tx, mut read) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let mut s = tokio::io::BufReader::new(s);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        let mut body = vec![0u8; length];
                        if s.read_exact(&mut body).await.is_ok() {
                            let _ = read_tx.send(body);
                        }
                        break;
                    }
                }
                // Closed here, the submission read and unanswered.
            }
        });
        let url = format!("http://{addr}");
        for id in [None, Some("nightly-1")] {
            let mut args = vec!["--coordinator", url.as_str()];
            args.extend(id.map(|id| ["--id", id]).into_iter().flatten());
            args.extend(["--", "true"]);
            let e = submit(submit_args(&args).expect("parsed"))
                .await
                .expect_err("no answer");
            let said = crate::output::describe(&e);
            assert!(said.contains("outcome is unknown"), "{said}");
            assert!(said.contains("--id"), "{said}");
            assert!(!said.contains("refused as a duplicate"), "{said}");
            assert!(!said.contains("cannot reach"), "{said}");
            let body = read
                .try_recv()
                .expect("the server read the whole submission");
            let body: Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(body["tasks"][0]["config"]["program"], "true");
        }
        // Nothing listening: nothing was sent.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", closed.local_addr().expect("addr"));
        drop(closed);
        let args = ["--coordinator", url.as_str(), "--", "true"];
        let e = submit(submit_args(&args).expect("parsed"))
            .await
            .expect_err("refused");
        let said = crate::output::describe(&e);
        assert!(said.contains("cannot reach"), "{said}");
        assert!(!said.contains("unknown"), "{said}");
    }

    /// A success that names no task (`200 {}`, say from a proxy or another server) is no
    /// submission to report: an error showing what came, not an empty success.
    #[tokio::test]
    async fn a_submission_answered_without_task_ids_is_an_error() {
        let answer = |v: Value| {
            let app = axum::Router::new().route(
                "/api/v1/tasks",
                axum::routing::post(move || async move { axum::Json(v) }),
            );
            serve_for_test(app)
        };
        for v in [json!({}), json!({"task_ids": []}), json!({"task_ids": [1]})] {
            let shows = format!("it answered {v}");
            let url = format!("http://{}", answer(v).await);
            let args = ["--coordinator", url.as_str(), "--", "true"];
            let e = submit(submit_args(&args).expect("parsed"))
                .await
                .expect_err("no task named");
            let said = format!("{e:#}");
            assert!(said.contains("task_ids"), "{said}");
            assert!(said.contains(&shows), "{said}");
        }
        let url = format!("http://{}", answer(json!({"task_ids": ["t-1"]})).await);
        let args = ["--coordinator", url.as_str(), "--", "true"];
        submit(submit_args(&args).expect("parsed"))
            .await
            .expect("one task, one id");
    }
}
