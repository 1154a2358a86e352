//! `tether watch`: follows tasks as they change, from the coordinator's event stream
//! (`/api/v1/events`), until each named task has ended, or, with no task named, until
//! interrupted. A lost stream (a coordinator restart, a dropped connection) is opened again
//! with a growing delay, and what changed meanwhile is caught up from the API, so nothing in
//! between goes unreported and nothing is reported twice. A task's checkpoints are folded
//! in the text output (`fold`): a checkpoint alone makes no line. A followed task running on a
//! worker that is disconnected is said on stderr, as `tether tasks` says it: it says `running`
//! until the coordinator's grace ends.

mod fold;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use futures_util::StreamExt;
use serde_json::Value;
use tether_proto::TaskStatus;

use crate::client::{Api, CommonArgs, Refused, TaskPages};
use crate::output::outln;

/// First delay before the stream is opened again; doubled per failure up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How far before the latest change it saw the watch asks, after a gap, for the tasks changed
/// since: room for the coordinator's clock to have been set back a little meanwhile.
const CATCH_UP_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(2);
/// Silence of the event stream after which it is taken for lost and opened again: the
/// coordinator sends a keep-alive every 15 s, so a path that went dead (a half-open connection
/// no write will reveal) shows as this much silence.
const SILENCE: Duration = Duration::from_secs(45);
/// Named tasks read by their ids after every gap ([`IDS_AT_ONCE`] a request); more are read
/// from the task listing (but at the first catch-up, by their ids too: see
/// [`Watch::read_named`]).
const BY_IDS: usize = 64;
/// Named tasks one listing request names at most (`ids=`): the coordinator's bound.
const IDS_AT_ONCE: usize = tether_coordinator::http::LIST_IDS_MAX;
/// Bytes of ids one listing request names at most, so that its request line passes a proxy
/// with a common 8 KiB limit (128 ids of 128 bytes would be 16 KiB and more).
const IDS_BYTES: usize = 6 * 1024;
/// Reads of one named task each that a catch-up has in flight at once: a few, so that a first
/// catch-up of thousands is not one round trip after another, and not the coordinator's every
/// turn for large answers (8), which other clients' reads share.
const READS_AT_ONCE: usize = 4;
/// A gap at least this long may have hidden a named task that ended and was removed by the
/// coordinator's retention (at least a minute, `MIN_RETENTION`): the many named tasks are then
/// read from the whole listing, where a task missing was removed, not from the tasks changed
/// in the gap, where it would be missing just the same as one that did not change.
const REMOVAL_GAP: chrono::TimeDelta = chrono::TimeDelta::seconds(30);
/// Tasks a watch of every task keeps (to tell a change from a copy already reported) before
/// it forgets those that ended long enough ago.
const SEEN_MAX: usize = 100_000;
/// What [`Watch::ended`] holds for a named task removed before its end was seen.
const REMOVED: &str = "removed";
/// Tasks read a request when catching up after a gap (`--page-size`), page after page.
pub(crate) const PAGE: usize = 10_000;

#[derive(Args)]
pub struct WatchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Tasks to follow until each has ended; with none, every task's changes until interrupted.
    ids: Vec<String>,
    /// Follow a run: the latest try of each task submitted under this name (`tether submit
    /// --name`; the task, or the last retry of it, `tether retry`) when the watch starts,
    /// until each has ended (exit 0 only if all completed). A task submitted under it later is
    /// not followed.
    #[arg(long, value_parser = crate::client::parse_name, conflicts_with = "ids")]
    name: Option<String>,
    /// Show workers' changes too (connected, disconnected, lost).
    #[arg(long)]
    workers: bool,
    /// A line for every checkpoint of a task. Without it, a checkpoint alone makes no line: a
    /// task's next line names its latest checkpoint and how many came since its last line, and
    /// one that only checkpoints gets a line at most every 30 s. (`--json` writes every change.)
    #[arg(long)]
    checkpoints: bool,
    /// Tasks read a request when catching up on what changed while the stream was down; the
    /// catch-up reads page after page until it has every such task.
    #[arg(long, default_value_t = PAGE as u64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    page_size: u64,
}

pub async fn run(a: WatchArgs) -> anyhow::Result<()> {
    // An id no task can have cannot be followed: exit status 2, not the 1 of a task that
    // failed.
    for id in &a.ids {
        tether_proto::TaskId::parse(id)
            .map_err(|e| anyhow::Error::new(Unfollowed).context(format!("task id {id:?}: {e}")))?;
    }
    // Nor can any task be followed without a client (a token file missing, a URL that is no
    // coordinator's, a CA file that does not load): 2 as well.
    let api = Api::new(&a.common).map_err(|e| e.context(Unfollowed))?;
    let ids = match &a.name {
        Some(name) => Some(
            run_tasks(&api, name)
                .await
                .map_err(|e| e.context(Unfollowed))?,
        ),
        None => (!a.ids.is_empty()).then(|| a.ids.iter().cloned().collect()),
    };
    let mut watch = Watch::new(ids, a.common.json, a.workers);
    watch.page = a.page_size as usize;
    watch.folds.every = a.checkpoints;
    judge(&api, watch).await
}

/// The ids of the latest tries of the tasks submitted under `name` (each task, or the last
/// retry of it); none named is an error ([`crate::client::latest_tries_named`]).
async fn run_tasks(api: &Api, name: &str) -> anyhow::Result<BTreeSet<String>> {
    let run = crate::client::latest_tries_named(api, name).await?;
    let ids: BTreeSet<String> = run.tries.iter().map(|t| t.task.task_id.clone()).collect();
    match (ids.len() == run.named, run.elsewhere) {
        (true, 0) => eprintln!("following the {} tasks named {name:?}", ids.len()),
        (_, elsewhere) => eprintln!(
            "following the latest tries of the {} tasks named {name:?}: {} tasks ({elsewhere} of \
             them retries named otherwise)",
            run.named,
            ids.len()
        ),
    }
    Ok(ids)
}

/// Why a watch could not tell how its tasks ended (interrupted, unreachable, refused): exit
/// status 2, where tasks that ended but not all completed are 1.
#[derive(Debug)]
pub(crate) struct Unfollowed;

impl std::error::Error for Unfollowed {}

impl std::fmt::Display for Unfollowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the watch could not follow its tasks to their end")
    }
}

/// A watch of the tasks `ids` that the coordinator at `api` took in a submission sent at
/// `sent` (`submit --watch`): it was up, so an event stream it does not answer at first is
/// asked again as through any restart (one between the submission and the stream's
/// opening), not taken for a wrong address; and many tasks are first read from those changed
/// since the submission, not from the coordinator's whole table.
pub(crate) async fn follow_submitted(
    api: &Api,
    ids: BTreeSet<String>,
    json: bool,
    sent: std::time::Instant,
) -> anyhow::Result<()> {
    let mut watch = Watch::new(Some(ids), json, false);
    watch.submitted = Some(sent);
    judge(api, watch).await
}

/// Follows as `watch` is set up, and says how its tasks ended: `Ok` once every named task has
/// completed, an error naming those that ended otherwise, or one with the context
/// [`Unfollowed`] when it could not follow them.
async fn judge(api: &Api, mut watch: Watch) -> anyhow::Result<()> {
    match follow_with(api, &mut watch).await {
        // Every task, until interrupted: nothing to judge.
        Ok(()) if watch.ids.is_none() => Ok(()),
        Ok(()) => watch.verdict(),
        Err(e) => Err(e.context(Unfollowed)),
    }
}

/// Follows until every named task ended (`Ok`), or the watch cannot go on.
async fn follow_with(api: &Api, watch: &mut Watch) -> anyhow::Result<()> {
    let stop = crate::cancel_on_signal();
    let named = watch.ids.is_some();
    let mut delay = RETRY_FIRST;
    let mut opened_once = false;
    loop {
        let outcome = tokio::select! {
            o = watch.stream(api) => o,
            () = stop.cancelled() => {
                watch.show_held()?;
                return match named {
                    false => Ok(()),
                    true => Err(anyhow::anyhow!("interrupted before every task ended")),
                };
            }
        };
        match outcome {
            Ok(Turn::Done) => return Ok(()),
            Err(Fatal(e)) => return Err(e),
            Ok(Turn::Lost {
                opened,
                reached,
                why,
            }) => {
                if opened {
                    opened_once = true;
                    delay = RETRY_FIRST;
                } else if !opened_once && !reached && watch.submitted.is_none() {
                    // Never reached: a wrong address or a coordinator that is not up; say so
                    // rather than wait for it. One that answered and ended the stream before
                    // its snapshot (busy with large answers) is asked again, and so is one
                    // that took the tasks followed.
                    return Err(why);
                }
                // What the gap would hold back longer than its period.
                watch.show_held()?;
                eprintln!(
                    "watch: {why:#}; opening the event stream again in {} ms",
                    delay.as_millis()
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => continue,
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// How one opening of the event stream ended.
enum Turn {
    /// Every named task has ended.
    Done,
    /// The stream ended or failed; `opened` if it had delivered its snapshot, `reached` if the
    /// coordinator answered the request for it.
    Lost {
        opened: bool,
        reached: bool,
        why: anyhow::Error,
    },
}

/// An error that retrying will not mend (a task that does not exist, a refused token).
struct Fatal(anyhow::Error);

/// What a task looked like when it was last reported: a change of any of it is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: String,
    attempt: u64,
    /// The task's place in the order of submission: a task submitted again under the id of
    /// one that retention removed has a higher one, and is newer than any copy of the old.
    submit_seq: u64,
    worker: Option<String>,
    checkpoint: Option<String>,
}

impl Seen {
    fn of(t: &Value) -> Self {
        Seen {
            status: t["status"].as_str().unwrap_or("?").to_owned(),
            attempt: t["attempt"].as_u64().unwrap_or(0),
            submit_seq: t["submit_seq"].as_u64().unwrap_or(0),
            worker: t["lease"]["worker"].as_str().map(str::to_owned),
            checkpoint: t["latest_checkpoint"]["checkpoint_id"]
                .as_str()
                .map(str::to_owned),
        }
    }

    fn ended(&self) -> bool {
        status_of(&self.status).is_some_and(TaskStatus::is_terminal)
    }

    /// Whether `other` differs from this in its checkpoint at most: no change a user watches
    /// for (status, attempt, worker, the task itself).
    fn same_but_checkpoint(&self, other: &Seen) -> bool {
        (&self.status, self.attempt, self.submit_seq, &self.worker)
            == (
                &other.status,
                other.attempt,
                other.submit_seq,
                &other.worker,
            )
    }
}

/// A task as the watch last saw it.
#[derive(Debug)]
struct Known {
    shown: Seen,
    /// When it changed, by the coordinator's clock: an older copy (a read that crossed an
    /// event) is not reported as a change.
    at: Option<DateTime<Utc>>,
}

fn status_of(s: &str) -> Option<TaskStatus> {
    serde_json::from_value(Value::String(s.to_owned())).ok()
}

struct Watch {
    /// The tasks followed; `None`: all.
    ids: Option<BTreeSet<String>>,
    json: bool,
    workers: bool,
    /// Each task as last reported (or taken as seen), and when it changed then.
    seen: HashMap<String, Known>,
    /// The latest change seen, by the coordinator's clock: after a gap, the tasks changed since
    /// are read from the API.
    high_water: Option<DateTime<Utc>>,
    /// Named tasks that ended, with their status.
    ended: BTreeMap<String, String>,
    /// Workers' states as last reported.
    worker_states: HashMap<String, String>,
    /// The followed tasks running on each worker, as last seen (text output only): a worker's
    /// disconnection is said with them ([`Watch::on_away`]).
    running: HashMap<String, BTreeSet<String>>,
    /// The disconnection said of each worker (its `disconnected_at`): said once, however
    /// often the stream is opened again.
    told_away: HashMap<String, String>,
    /// Checkpoints since each task's last line, and the lines held back for them (text only).
    folds: fold::Folds,
    /// Tasks read a request when catching up.
    page: usize,
    /// Following every task: a first snapshot has set what counts as already seen.
    baseline: bool,
    /// Silence after which the stream is taken for lost ([`SILENCE`]).
    silence: Duration,
    /// The first snapshot's time, by the coordinator's clock (following every task).
    started: Option<DateTime<Utc>>,
    /// Tasks known when ended ones are next forgotten ([`SEEN_MAX`]).
    forget_at: usize,
    /// When the tasks followed were submitted, if the watch follows a submission: the
    /// coordinator answered then (it took them), so one not reached at the first opening is
    /// restarting, not a wrong address; and the tasks changed no earlier.
    submitted: Option<std::time::Instant>,
    /// The coordinator refused the listing's `ids` filter (400) or ignored it: named tasks are
    /// read one by one from then on, without asking for the filter again at every catch-up. A
    /// failure that says nothing of the filter (busy, a dropped connection) is not taken so,
    /// nor is a request refused for its length (see `ids_bytes`).
    no_ids_filter: bool,
    /// Bytes of ids one listing request names at most: [`IDS_BYTES`], halved for the rest of
    /// the watch each time a request naming several is refused for its length (400, 414 or
    /// 431 from the coordinator or a proxy before it, not saying the filter is unknown).
    ids_bytes: usize,
}

impl Watch {
    fn new(ids: Option<BTreeSet<String>>, json: bool, workers: bool) -> Self {
        Watch {
            ids,
            json,
            workers,
            seen: HashMap::new(),
            high_water: None,
            ended: BTreeMap::new(),
            worker_states: HashMap::new(),
            running: HashMap::new(),
            told_away: HashMap::new(),
            folds: fold::Folds::new(),
            page: PAGE,
            baseline: false,
            silence: SILENCE,
            started: None,
            forget_at: SEEN_MAX,
            submitted: None,
            no_ids_filter: false,
            ids_bytes: IDS_BYTES,
        }
    }

    fn done(&self) -> bool {
        self.ids
            .as_ref()
            .is_some_and(|ids| ids.len() == self.ended.len())
    }

    /// Opens the stream once and follows it until every named task ended or it is lost.
    async fn stream(&mut self, api: &Api) -> Result<Turn, Fatal> {
        // A coordinator that took the connection and never answered is as lost as one that
        // went silent later: the same deadline.
        let mut chunks = match api.stream("/api/v1/events", self.silence).await {
            Ok(c) => c,
            Err(e) if is_refusal(&e) => return Err(Fatal(e)),
            Err(why) => {
                return Ok(Turn::Lost {
                    opened: false,
                    reached: false,
                    why,
                });
            }
        };
        let lost = |opened, why| Turn::Lost {
            opened,
            reached: true,
            why,
        };
        let mut parser = SseParser::default();
        let mut opened = false;
        let mut quiet = tokio::time::Instant::now() + self.silence;
        loop {
            // A line held back for a task's checkpoints is due while the stream says nothing.
            let due = self.folds.next_due();
            let next = tokio::select! {
                // A line already due goes first, even with chunks waiting.
                biased;
                () = tokio::time::sleep_until(due.unwrap_or(quiet)), if due.is_some() => {
                    self.show_due().map_err(Fatal)?;
                    continue;
                }
                next = tokio::time::timeout_at(quiet, chunks.next()) => next,
            };
            quiet = tokio::time::Instant::now() + self.silence;
            let chunk = match next {
                Ok(Some(Ok(c))) => c,
                Ok(Some(Err(why))) => return Ok(lost(opened, why)),
                Ok(None) => {
                    let why = anyhow::anyhow!("the coordinator closed the event stream");
                    return Ok(lost(opened, why));
                }
                Err(_) => {
                    let why = anyhow::anyhow!(
                        "the event stream was silent for {} ms (the coordinator sends a \
                         keep-alive every 15 s)",
                        self.silence.as_millis()
                    );
                    return Ok(lost(opened, why));
                }
            };
            for ev in parser.push(&chunk) {
                match ev.event.as_str() {
                    "snapshot" => {
                        let snap: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                        // The stream is live from here on: whatever changed before it is in
                        // the snapshot or read now, whatever changes after it comes as events.
                        if let Err(why) = self.catch_up(api, &snap).await {
                            if is_refusal(&why) || crate::output::is_closed(&why) {
                                return Err(Fatal(why));
                            }
                            return Ok(lost(opened, why));
                        }
                        opened = true;
                    }
                    "task" => {
                        if let Ok(t) = serde_json::from_str::<Value>(&ev.data) {
                            self.on_task(&t).map_err(Fatal)?;
                        }
                    }
                    // Read only when shown, or when followed tasks run on some worker.
                    "worker" if self.workers || !self.running.is_empty() => {
                        if let Ok(w) = serde_json::from_str::<Value>(&ev.data) {
                            if self.workers {
                                self.on_worker(&w).map_err(Fatal)?;
                            }
                            self.on_away(&w);
                        }
                    }
                    "task_removed" => {
                        // Retention removed an ended task: nothing to follow any more.
                        if let Ok(t) = serde_json::from_str::<Value>(&ev.data)
                            && let Some(id) = t["task_id"].as_str()
                        {
                            self.folds.forget(id);
                            match self.ids {
                                None => self.forget(id),
                                Some(_) => self.on_removed(id).map_err(Fatal)?,
                            }
                        }
                    }
                    // `resync` is followed by a fresh snapshot; `sample` is for the dashboard.
                    _ => {}
                }
                if self.done() {
                    return Ok(Turn::Done);
                }
            }
        }
    }

    /// After a snapshot: each named task still running is read, so a change made while no
    /// stream was open is reported now; without names, every task changed since the latest
    /// change seen (all of them if none was) is read and compared with what was reported (the
    /// first snapshot only sets the baseline).
    async fn catch_up(&mut self, api: &Api, snap: &Value) -> anyhow::Result<()> {
        // The latest change seen before this snapshot; from the snapshot on, the stream is live.
        let before = self.high_water;
        match self.read_gap(api, snap, before).await {
            Ok(()) => {
                self.high_water = self.high_water.max(time(&snap["at"]));
                Ok(())
            }
            Err(e) => {
                // The next snapshot asks again from the same mark: the tasks read so far moved
                // it, but those the failure left unread changed after it too.
                self.high_water = before;
                Err(e)
            }
        }
    }

    /// What [`Watch::catch_up`] reads, `before` being the latest change seen before the gap.
    async fn read_gap(
        &mut self,
        api: &Api,
        snap: &Value,
        before: Option<DateTime<Utc>>,
    ) -> anyhow::Result<()> {
        match self.ids.clone() {
            Some(ids) => {
                let open: Vec<String> = ids
                    .into_iter()
                    .filter(|id| !self.ended.contains_key(id))
                    .collect();
                self.read_named(api, snap, before, &open).await?;
            }
            None if !self.baseline => {
                self.baseline = true;
                self.started = time(&snap["at"]);
                for t in snap["tasks"].as_array().into_iter().flatten() {
                    self.know(t);
                }
            }
            None => {
                // The snapshot holds the newest tasks only; an older one may have changed too.
                // Page by page: a gap may have changed any number of tasks.
                let query = changed_since(before);
                let mut pages = TaskPages::new(api, &query, self.page);
                while let Some(page) = pages.next().await? {
                    self.read_changed(&page, before)?;
                }
            }
        }
        for w in snap["workers"].as_array().into_iter().flatten() {
            if self.workers {
                self.on_worker(w)?;
            }
            // Disconnected while no stream was open, or before the watch began.
            self.on_away(w);
        }
        Ok(())
    }

    /// Following every task, one page of the tasks changed in a gap that began after `before`.
    fn read_changed(
        &mut self,
        changed: &[Value],
        before: Option<DateTime<Utc>>,
    ) -> anyhow::Result<()> {
        for t in changed {
            let id = t["task_id"].as_str().unwrap_or_default();
            // Never seen and last changed before the watch started, or well before the gap: as
            // it was when the watch started (the first snapshot holds the newest tasks only),
            // not a change. Just before the gap it may be a change stamped by a clock set back.
            let at = time(&t["updated_at"]);
            let unchanged = !self.seen.contains_key(id)
                && at.is_some_and(|at| {
                    self.started.is_some_and(|s| at <= s)
                        || before.is_some_and(|b| at <= b - CATCH_UP_MARGIN)
                });
            if unchanged {
                self.know(t);
            } else {
                self.on_task(t)?;
            }
        }
        Ok(())
    }

    /// The named tasks not ended yet, `open`, after a gap that began after `before`.
    async fn read_named(
        &mut self,
        api: &Api,
        snap: &Value,
        before: Option<DateTime<Utc>>,
        open: &[String],
    ) -> anyhow::Result<()> {
        let many = open.len() > BY_IDS;
        if !many || before.is_none() {
            // A few names: by their ids at every catch-up (a request a name made a watch of 60
            // tasks send 60 at each gap). Many, at the first catch-up: where the named tasks
            // start in the listing is not known yet, so a listing would be read from the
            // coordinator's oldest task on, the whole table (gigabytes on one that keeps a
            // million) for tasks submitted long ago. Just submitted (`submit --watch`): among
            // the tasks changed since. Else (and those not there, their change stamped by a
            // clock set back meanwhile) by their ids, 128 a request: a request per 128 names,
            // whatever the table holds. One not found so is read by itself (refused as missing
            // at the first catch-up, removed by retention at a later one). Once each of many
            // was seen, a later listing starts at the oldest of them.
            let missing = match self.since_submitted(snap) {
                Some(since) if many => self.read_named_listed(api, open, Some(since)).await?,
                _ => open.to_vec(),
            };
            let missing = self.read_by_ids(api, &missing).await?;
            return self.read_one_by_one(api, &missing, before).await;
        }
        // After a gap long enough for retention to have removed a task unseen, every task (from
        // the oldest named one on); after a shorter one, those changed in it, where a task
        // missing is one that did not change.
        let gap = before.zip(time(&snap["at"])).map(|(b, at)| at - b);
        let since = before.filter(|_| gap.is_some_and(|g| g < REMOVAL_GAP));
        let missing = self.read_named_listed(api, open, since).await?;
        if since.is_some() {
            return Ok(());
        }
        // `before` is some: a name the whole listing lacks was found at an earlier catch-up,
        // and retention removed it since.
        for id in missing {
            self.on_removed(&id)?;
        }
        Ok(())
    }

    /// Named tasks, `ids`, read from the listing by their ids ([`IDS_AT_ONCE`] a request, fewer
    /// when they are long), not with a request each: a first catch-up of 5,000 names made 5,000
    /// requests. The names the listing did not hold; all those not read yet when the
    /// coordinator does not know the filter (it refuses the parameter with 400 saying so, or,
    /// one that ignores parameters it does not know, lists tasks not asked for): they are read
    /// one by one, and so are they at every later catch-up of the watch (`no_ids_filter`). A
    /// request naming several refused otherwise (400, 414, 431: too long for the coordinator or
    /// a proxy) is sent again naming half as many bytes of ids, and so are the later ones
    /// (`ids_bytes`); it was taken for a coordinator without the filter, every later catch-up
    /// a request per name. One name refused so: the filter is taken for unknown. One name
    /// alone is left to be read by itself: a request either way, and that one tells a missing
    /// task (404) at once and needs no filter.
    async fn read_by_ids(&mut self, api: &Api, ids: &[String]) -> anyhow::Result<Vec<String>> {
        if ids.len() < 2 || self.no_ids_filter {
            return Ok(ids.to_vec());
        }
        let mut missing = Vec::new();
        let mut rest = ids;
        while !rest.is_empty() {
            let mut bytes = 0;
            let n = rest
                .iter()
                .take(IDS_AT_ONCE)
                .take_while(|id| {
                    bytes += id.len() + 2 * id.matches('+').count() + 1;
                    bytes <= self.ids_bytes
                })
                .count()
                .max(1);
            let (chunk, after) = rest.split_at(n);
            // `+` is the only id character a query does not take as itself.
            let named = chunk.join(",").replace('+', "%2B");
            let path = format!("/api/v1/tasks?limit={n}&ids={named}");
            let got = match api.get(&path).await {
                Ok(Value::Array(got)) => got,
                Err(e) if matches!(status(&e), Some(400 | 414 | 431)) => {
                    if n == 1 || unknown_ids_parameter(&e) {
                        self.no_ids_filter = true;
                        return Ok([missing, rest.to_vec()].concat());
                    }
                    // INVARIANT: fewer ids at each refusal of this chunk, down to one.
                    self.ids_bytes = named.len() / 2;
                    tracing::debug!(ids = n, bytes = named.len(), error = %format!("{e:#}"), "a listing by ids refused: asking for fewer a request");
                    continue;
                }
                Ok(_) => anyhow::bail!("the coordinator's task list is not a list"),
                Err(e) => return Err(e),
            };
            let asked: std::collections::HashSet<&str> = chunk.iter().map(String::as_str).collect();
            if !got
                .iter()
                .all(|t| t["task_id"].as_str().is_some_and(|id| asked.contains(id)))
            {
                self.no_ids_filter = true;
                return Ok([missing, rest.to_vec()].concat());
            }
            let mut found = std::collections::HashSet::new();
            for t in &got {
                found.insert(t["task_id"].as_str().unwrap_or_default().to_owned());
                self.on_task(t)?;
            }
            missing.extend(chunk.iter().filter(|id| !found.contains(*id)).cloned());
            rest = after;
        }
        Ok(missing)
    }

    /// Named tasks, `ids`, read with a request each ([`READS_AT_ONCE`] in flight), in order.
    /// One found at an earlier catch-up (`before` is some) and gone now ended while no stream
    /// was open, and retention removed it; one never found is refused.
    async fn read_one_by_one(
        &mut self,
        api: &Api,
        ids: &[String],
        before: Option<DateTime<Utc>>,
    ) -> anyhow::Result<()> {
        let mut reads = futures_util::stream::iter(ids)
            .map(|id| async move { (id, api.get(&format!("/api/v1/tasks/{id}")).await) })
            .buffered(READS_AT_ONCE);
        while let Some((id, read)) = reads.next().await {
            match read {
                Ok(t) => self.on_task(&t)?,
                Err(e) if before.is_some() && status(&e) == Some(404) => self.on_removed(id)?,
                Err(e) if status(&e) == Some(404) => {
                    return Err(e.context(format!("no task {id} at this coordinator")));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Many named tasks, `open`: read from the listing, page by page (those changed since
    /// `since`, else all), not with a request each: a watch of thousands of tasks whose stream
    /// lags would read them all again at every snapshot. Once each has been seen, the listing
    /// starts at the oldest of them (by `submit_seq`), not at the coordinator's oldest task.
    /// The names the listing did not hold.
    async fn read_named_listed(
        &mut self,
        api: &Api,
        open: &[String],
        since: Option<DateTime<Utc>>,
    ) -> anyhow::Result<Vec<String>> {
        let query = changed_since(since);
        let wanted: std::collections::HashSet<&str> = open.iter().map(String::as_str).collect();
        let mut found = std::collections::HashSet::new();
        let mut pages = TaskPages::new(api, &query, self.page).after(self.oldest_seq(open));
        while let Some(page) = pages.next().await? {
            for t in &page {
                if let Some(id) = t["task_id"].as_str().filter(|id| wanted.contains(id)) {
                    found.insert(id.to_owned());
                    self.on_task(t)?;
                }
            }
        }
        Ok(open
            .iter()
            .filter(|id| !found.contains(*id))
            .cloned()
            .collect())
    }

    /// The `submit_seq` a listing of the tasks `open` can start after: just before the
    /// oldest of them, once each has been seen (a task submitted again under a removed one's
    /// id has a higher one, so nothing of theirs is before it); `None` until then.
    fn oldest_seq(&self, open: &[String]) -> Option<u64> {
        let seqs: Option<Vec<u64>> = open
            .iter()
            .map(|id| self.seen.get(id).map(|k| k.shown.submit_seq))
            .collect();
        seqs?.into_iter().min()?.checked_sub(1)
    }

    /// For the first reading of tasks just submitted: the time, by the coordinator's clock
    /// (the snapshot's), a little before they were submitted, so they changed since.
    fn since_submitted(&self, snap: &Value) -> Option<DateTime<Utc>> {
        let ago = chrono::TimeDelta::from_std(self.submitted?.elapsed()).ok()?;
        time(&snap["at"])?.checked_sub_signed(ago)
    }

    /// A named task removed by the coordinator's retention before the watch saw it end (it
    /// ended, and was removed, while no stream was open; or its removal came first on a
    /// stream): its outcome is unknown, so the watch could not follow it to its end (exit 2).
    fn on_removed(&mut self, id: &str) -> anyhow::Result<()> {
        self.folds.forget(id);
        let named = self.ids.as_ref().is_some_and(|ids| ids.contains(id));
        if !named || self.ended.contains_key(id) {
            return Ok(());
        }
        if self.json {
            outln!("{}", serde_json::json!({"task_id": id, "removed": true}))?;
        } else {
            outln!(
                "{id} removed by the coordinator's retention before its end was seen (outcome unknown)"
            )?;
        }
        self.ended.insert(id.to_owned(), REMOVED.into());
        Ok(())
    }

    /// Reports `t` if it is followed and changed since it was last reported.
    fn on_task(&mut self, t: &Value) -> anyhow::Result<()> {
        let Some(id) = t["task_id"].as_str() else {
            return Ok(());
        };
        if self.ids.as_ref().is_some_and(|ids| !ids.contains(id)) {
            return Ok(());
        }
        let Some(now) = self.fresh(id, t) else {
            return Ok(());
        };
        let before = self.seen.get(id).map(|k| &k.shown);
        if before.is_none_or(|b| *b != now.shown) {
            if self.json {
                outln!("{t}")?;
            } else if let Some(line) =
                self.folds
                    .line(t, before, &now.shown, tokio::time::Instant::now())
            {
                outln!("{line}")?;
            }
            if now.shown.ended() && self.ids.is_some() {
                self.ended.insert(id.to_owned(), now.shown.status.clone());
            }
        }
        self.keep(id, now);
        self.forget_old_ends();
        Ok(())
    }

    /// Following every task, the tasks that ended well before the latest change are forgotten
    /// once [`SEEN_MAX`] are known (a watch of a busy coordinator ran out of memory): an ended
    /// task changes no more, and a catch-up never lists it again (it reads changes from just
    /// before the latest only; one that predates the watch is not reported).
    fn forget_old_ends(&mut self) {
        if self.ids.is_some() || self.seen.len() < self.forget_at {
            return;
        }
        let Some(cutoff) = self.high_water.map(|h| h - CATCH_UP_MARGIN * 2) else {
            return;
        };
        self.seen
            .retain(|_, k| !(k.shown.ended() && k.at.is_some_and(|at| at < cutoff)));
        let seen = &self.seen;
        self.folds.retain(|id| seen.contains_key(id));
        // What is left is running (or just ended): look again once as many more came, so that
        // a look costs a pass over the tasks only as often as that many changes.
        self.forget_at = (2 * self.seen.len()).max(SEEN_MAX);
    }

    /// Writes the lines held back for tasks' checkpoints that are due now.
    fn show_due(&mut self) -> anyhow::Result<()> {
        for line in self.folds.due_lines(tokio::time::Instant::now()) {
            outln!("{line}")?;
        }
        Ok(())
    }

    /// Writes every line held back for tasks' checkpoints, due or not.
    fn show_held(&mut self) -> anyhow::Result<()> {
        for line in self.folds.held_lines(tokio::time::Instant::now()) {
            outln!("{line}")?;
        }
        Ok(())
    }

    /// Takes `t` as it is for seen, without reporting it.
    fn know(&mut self, t: &Value) {
        let Some(id) = t["task_id"].as_str() else {
            return;
        };
        if let Some(now) = self.fresh(id, t) {
            self.keep(id, now);
        }
    }

    /// `t` as the watch would know it, unless a later copy of it was seen already; its time
    /// moves the high-water mark. Later means submitted later first (retention removed a task
    /// and its id was submitted again, the removal unseen in a gap: the new task's copies are
    /// not older than the old one's end), then further along (an ended task does not run
    /// again; a later attempt follows an earlier one), then changed later by the coordinator's
    /// clock: a clock set back must not hide a task's end, after which nothing comes.
    fn fresh(&mut self, id: &str, t: &Value) -> Option<Known> {
        let at = time(&t["updated_at"]);
        let shown = Seen::of(t);
        let known = self.seen.get(id);
        let seen_at = known.and_then(|k| k.at);
        if let Some(k) = known {
            let along = |s: &Seen| (s.submit_seq, s.ended(), s.attempt);
            let older = match along(&shown).cmp(&along(&k.shown)) {
                std::cmp::Ordering::Less => true,
                std::cmp::Ordering::Greater => false,
                std::cmp::Ordering::Equal => seen_at.zip(at).is_some_and(|(seen, at)| seen > at),
            };
            if older {
                return None;
            }
        }
        self.high_water = self.high_water.max(at);
        Some(Known {
            shown,
            at: at.or(seen_at),
        })
    }

    /// Takes `now` for what the watch knows of task `id`, and files it under the worker it
    /// runs on, if it runs ([`Watch::running`]).
    fn keep(&mut self, id: &str, now: Known) {
        fn on(s: &Seen) -> Option<&str> {
            s.worker.as_deref().filter(|_| s.status == "running")
        }
        let was = self.seen.get(id).and_then(|k| on(&k.shown));
        let is = on(&now.shown).filter(|_| !self.json);
        if was != is {
            if let Some(w) = was {
                let w = w.to_owned();
                self.unfile(id, &w);
            }
            if let Some(w) = is {
                let tasks = self.running.entry(w.to_owned()).or_default();
                tasks.insert(id.to_owned());
            }
        }
        self.seen.insert(id.to_owned(), now);
    }

    /// Forgets task `id` (retention removed it).
    fn forget(&mut self, id: &str) {
        if let Some(k) = self.seen.remove(id)
            && let Some(w) = &k.shown.worker
        {
            self.unfile(id, w);
        }
    }

    /// Takes task `id` off the tasks running on worker `w`.
    fn unfile(&mut self, id: &str, w: &str) {
        if let Some(tasks) = self.running.get_mut(w) {
            tasks.remove(id);
            if tasks.is_empty() {
                self.running.remove(w);
            }
        }
    }

    /// Says on stderr, as `tether tasks` does, that worker `w` is disconnected while followed
    /// tasks run on it, once a disconnection; a worker back (or lost, its tasks moving on)
    /// can be said again at its next one.
    fn on_away(&mut self, w: &Value) {
        let Some(id) = w["worker_id"].as_str() else {
            return;
        };
        if w["state"] != "disconnected" {
            self.told_away.remove(id);
            return;
        }
        let Some(tasks) = self.running.get(id) else {
            return;
        };
        let since = w["disconnected_at"].as_str().unwrap_or_default();
        if self.told_away.get(id).is_some_and(|told| told == since) {
            return;
        }
        let by_worker = BTreeMap::from([(id.to_owned(), tasks.iter().cloned().collect())]);
        let lines = crate::client::away_lines(&by_worker, std::slice::from_ref(w), Utc::now());
        for line in lines {
            eprintln!("{line}");
        }
        self.told_away.insert(id.to_owned(), since.to_owned());
    }

    fn on_worker(&mut self, w: &Value) -> anyhow::Result<()> {
        let (Some(id), Some(state)) = (w["worker_id"].as_str(), w["state"].as_str()) else {
            return Ok(());
        };
        if self.worker_states.get(id).map(String::as_str) == Some(state) {
            return Ok(());
        }
        self.worker_states.insert(id.to_owned(), state.to_owned());
        if self.json {
            outln!("{}", serde_json::json!({ "worker": w }))?;
        } else {
            outln!("{}  worker {id}  {state}", time_of(&w["last_seen"]))?;
        }
        Ok(())
    }

    /// `Ok` when every named task completed; else an error naming the others, with the
    /// context [`Unfollowed`] when one was removed before its end was seen: how that one ended
    /// is unknown, and the 1 of a task that ended but did not complete would say it is known.
    fn verdict(&self) -> anyhow::Result<()> {
        let (removed, unsuccessful): (Vec<_>, Vec<_>) = self
            .ended
            .iter()
            .filter(|(_, s)| status_of(s) != Some(TaskStatus::Completed))
            .partition(|(_, s)| *s == REMOVED);
        if !self.json {
            outln!(
                "{} of {} tasks completed",
                self.ended.len() - unsuccessful.len() - removed.len(),
                self.ended.len()
            )?;
        }
        let unsuccessful: Vec<String> = unsuccessful
            .into_iter()
            .map(|(id, s)| format!("{id} {s}"))
            .collect();
        let not_completed = format!("not completed: {}", unsuccessful.join(", "));
        if removed.is_empty() {
            return match unsuccessful.is_empty() {
                true => Ok(()),
                false => Err(anyhow::anyhow!(not_completed)),
            };
        }
        let removed: Vec<&str> = removed.into_iter().map(|(id, _)| id.as_str()).collect();
        let mut why = format!(
            "{} removed by the coordinator's retention before its end was seen (outcome unknown)",
            removed.join(", ")
        );
        if !unsuccessful.is_empty() {
            why.push_str(&format!("; {not_completed}"));
        }
        Err(anyhow::anyhow!(why).context(Unfollowed))
    }
}

/// Whether `e`, a listing's refusal, says the coordinator does not know its `ids` parameter,
/// as one before the filter said (its query's fields were checked: ``unknown field `ids`,
/// expected one of ...``).
fn unknown_ids_parameter(e: &anyhow::Error) -> bool {
    let said = format!("{e:#}");
    said.contains("unknown field `ids`") || (said.contains("`ids`") && said.contains("unknown"))
}

/// The HTTP status of a refusal, if `e` is one.
fn status(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<Refused>().map(|r| r.status)
}

/// A refusal that another try would get again: a bad token, a missing task.
fn is_refusal(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>()
        .is_some_and(|r| matches!(r.status, 401 | 403 | 404))
}

/// The listing's query for the tasks changed in a gap that began after `before` (with room for
/// a clock set back a little), or for every task when nothing was seen before it.
fn changed_since(before: Option<DateTime<Utc>>) -> String {
    before.map_or_else(String::new, |t| {
        let since = (t - CATCH_UP_MARGIN).to_rfc3339_opts(SecondsFormat::Micros, true);
        format!("updated_since={since}")
    })
}

/// An RFC 3339 time of the API.
fn time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn time_of(v: &Value) -> String {
    v.as_str()
        .and_then(|s| s.get(11..19))
        .unwrap_or("--:--:--")
        .to_owned()
}

/// `10:31:02  <task>  running  attempt 1  on w1  <checkpoint>  <name>  <error>`, the
/// checkpoint part as [`fold`] words it.
fn task_line(t: &Value, seen: &Seen, checkpoint: Option<&str>) -> String {
    let mut line = format!(
        "{}  {}  {}  attempt {}",
        time_of(&t["updated_at"]),
        t["task_id"].as_str().unwrap_or("?"),
        seen.status,
        seen.attempt
    );
    if let Some(w) = &seen.worker {
        line.push_str(&format!("  on {w}"));
    }
    if let Some(c) = checkpoint {
        line.push_str(&format!("  {c}"));
    }
    // Anyone's text: escaped as `tether task` and `tether tasks` show it.
    if let Some(n) = t["spec"]["name"].as_str() {
        line.push_str(&format!("  {}", crate::client::shown(n)));
    }
    if let Some(e) = t["error"].as_str() {
        line.push_str(&format!("  ({})", crate::client::shown(e)));
    }
    line
}

/// One server-sent event.
#[derive(Debug, PartialEq, Eq)]
struct SseEvent {
    event: String,
    data: String,
}

/// Server-sent events out of a byte stream cut anywhere (the text/event-stream format: fields
/// per line, an event ends at a blank line; comments and unknown fields are skipped).
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    /// Bytes of `buf` known to hold no line end: a line of many megabytes (a snapshot) that
    /// comes in small chunks is scanned once, not once a chunk.
    scanned: usize,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buf[self.scanned..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|at| self.scanned + at)
        {
            self.scanned = 0;
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(SseEvent {
                        event: match self.event.is_empty() {
                            true => "message".into(),
                            false => std::mem::take(&mut self.event),
                        },
                        data: self.data.join("\n"),
                    });
                }
                self.event.clear();
                self.data.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event = value.to_owned(),
                "data" => self.data.push(value.to_owned()),
                _ => {}
            }
        }
        self.scanned = self.buf.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A task's name and error are anyone's text: a watcher's terminal gets them escaped, as
    /// `tether task` shows them, never an escape sequence, a forged line or a reordering.
    #[test]
    fn a_task_line_escapes_the_name_and_the_error() {
        let t = serde_json::json!({
            "task_id": "esc1", "status": "failed", "attempt": 1,
            "updated_at": "2026-12-04T23:40:00Z",
            "spec": {"name": "A\u{1b}[31mRED\u{1b}]0;pwned\u{7}\u{202e}evil\r\n23:40:00  x  completed"},
            "error": "boom\nforged"
        });
        let line = task_line(&t, &Seen::of(&t), None);
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{line:?}"
        );
        assert!(
            line.contains("\\u{1b}[31mRED") && line.contains("\\r\\n"),
            "{line}"
        );
        assert!(line.ends_with("(boom\\nforged)"), "{line}");
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn a_line_of_megabytes_in_small_chunks_is_scanned_once() {
        let mut p = SseParser::default();
        let data = "x".repeat(8 << 20);
        let text = format!("event: snapshot\ndata: {data}\n\n");
        let mut got = Vec::new();
        let mut scanned = 0usize;
        for chunk in text.as_bytes().chunks(4096) {
            // What a push scans: the bytes it had not scanned before, and this chunk.
            scanned += p.buf.len() - p.scanned + chunk.len();
            got.extend(p.push(chunk));
        }
        assert_eq!(got, vec![ev("snapshot", &data)]);
        assert!(
            scanned <= 2 * text.len(),
            "{scanned} bytes scanned for {}",
            text.len()
        );
    }

    #[test]
    fn events_are_parsed_from_chunks_cut_anywhere() {
        let text = ": keep-alive\n\nevent: snapshot\ndata: {\"a\":1}\n\nevent:task\r\ndata: x\r\ndata: y\r\n\r\ndata: plain\n\n";
        let want = vec![
            ev("snapshot", "{\"a\":1}"),
            ev("task", "x\ny"),
            ev("message", "plain"),
        ];
        for cut in 1..text.len() {
            let mut p = SseParser::default();
            let mut got = p.push(&text.as_bytes()[..cut]);
            got.extend(p.push(&text.as_bytes()[cut..]));
            assert_eq!(got, want, "cut at {cut}");
        }
        // A byte at a time.
        let mut p = SseParser::default();
        let got: Vec<_> = text.bytes().flat_map(|b| p.push(&[b])).collect();
        assert_eq!(got, want);
    }

    fn task(id: &str, status: &str, attempt: u64, worker: Option<&str>) -> Value {
        json!({
            "task_id": id,
            "status": status,
            "attempt": attempt,
            "lease": worker.map(|w| json!({ "worker": w })),
            "updated_at": "2026-12-01T10:31:02.123Z",
        })
    }

    #[test]
    fn a_named_task_is_reported_once_per_change_and_ends_the_watch_when_terminal() {
        let mut w = Watch::new(Some(["a".to_owned(), "b".to_owned()].into()), true, false);
        w.on_task(&task("a", "queued", 0, None)).expect("written");
        w.on_task(&task("a", "queued", 0, None)).expect("written");
        w.on_task(&task("c", "running", 1, Some("w1")))
            .expect("written");
        assert_eq!(
            w.seen.len(),
            1,
            "a repeat and an unnamed task are not reported"
        );
        w.on_task(&task("a", "running", 1, Some("w1")))
            .expect("written");
        w.on_task(&task("a", "completed", 1, Some("w1")))
            .expect("written");
        assert!(!w.done());
        w.on_task(&task("b", "failed", 3, None)).expect("written");
        assert!(w.done());
        let err = w.verdict().expect_err("b failed");
        assert!(err.to_string().contains("b failed"), "{err}");
    }

    #[test]
    fn a_missing_task_or_a_refused_token_is_final_and_a_lost_connection_is_not() {
        let refused = |status: u16| {
            let status = http::StatusCode::from_u16(status).expect("status");
            anyhow::Error::from(Refused::of(status, &json!({"error": {"message": "x"}})))
        };
        assert!(is_refusal(
            &refused(404).context("no task a at this coordinator")
        ));
        assert!(is_refusal(&refused(401)) && is_refusal(&refused(403)));
        assert!(!is_refusal(&refused(503)), "a coordinator starting up");
        assert!(!is_refusal(&anyhow::anyhow!(
            "cannot reach the coordinator"
        )));
    }

    #[test]
    fn an_older_copy_of_a_task_is_not_reported_as_a_change() {
        let at = |mut t: Value, time: &str| {
            t["updated_at"] = json!(time);
            t
        };
        let mut w = Watch::new(None, true, false);
        // A read after a gap returned the task completed; an event from before arrives after.
        w.on_task(&at(task("a", "completed", 1, None), "2026-12-01T10:31:05Z"))
            .expect("written");
        w.on_task(&at(
            task("a", "running", 1, Some("w1")),
            "2026-12-01T10:31:04Z",
        ))
        .expect("written");
        assert_eq!(w.seen["a"].shown.status, "completed");
        // Nor taken as seen when it comes in a catch-up's list.
        w.know(&at(
            task("a", "running", 1, Some("w1")),
            "2026-12-01T10:31:04Z",
        ));
        assert_eq!(w.seen["a"].shown.status, "completed");
        w.on_task(&at(task("b", "queued", 0, None), "2026-12-01T10:31:03Z"))
            .expect("written");
        let latest = DateTime::parse_from_rfc3339("2026-12-01T10:31:05Z").expect("time");
        assert_eq!(w.high_water, Some(latest.with_timezone(&Utc)));
    }

    /// Retention removed task `a` and its id was submitted again while the watch missed the
    /// removal (a gap, or a resync after lag): the new task's copies, running when the old one
    /// had ended, are newer (a higher `submit_seq`), not older copies of the old task's end.
    #[test]
    fn a_task_submitted_again_under_a_removed_tasks_id_is_reported() {
        let copy = |status: &str, attempt: u64, seq: u64, time: &str| {
            let mut t = task("a", status, attempt, None);
            t["submit_seq"] = json!(seq);
            t["updated_at"] = json!(time);
            t
        };
        let mut w = Watch::new(None, true, false);
        w.know(&copy("completed", 1, 1, "2026-12-01T10:31:02Z"));
        let again = copy("running", 2, 9, "2026-12-01T10:40:00Z");
        w.read_changed(&[again], None).expect("written");
        assert_eq!(w.seen["a"].shown.status, "running");
        // Queued, before its first attempt (numbered after the old task's), too.
        let mut w = Watch::new(None, true, false);
        w.know(&copy("completed", 1, 1, "2026-12-01T10:31:02Z"));
        w.on_task(&copy("queued", 1, 9, "2026-12-01T10:40:00Z"))
            .expect("written");
        assert_eq!(w.seen["a"].shown.status, "queued");
    }

    #[test]
    fn every_named_task_completed_is_a_success() {
        let mut w = Watch::new(Some(["a".to_owned()].into()), true, false);
        w.on_task(&task("a", "completed", 1, None))
            .expect("written");
        assert!(w.done());
        assert!(w.verdict().is_ok());
    }

    #[test]
    fn a_tasks_end_stamped_by_a_clock_set_back_is_still_its_end() {
        let at = |mut t: Value, time: &str| {
            t["updated_at"] = json!(time);
            t
        };
        let mut w = Watch::new(Some(["a".to_owned()].into()), true, false);
        w.on_task(&at(
            task("a", "running", 1, Some("w1")),
            "2026-12-01T10:31:05Z",
        ))
        .expect("written");
        // The coordinator restarted with its clock 3 s back, then the task completed.
        w.on_task(&at(task("a", "completed", 1, None), "2026-12-01T10:31:02Z"))
            .expect("written");
        assert!(
            w.done(),
            "nothing comes after a task's end: it must not be dropped"
        );
        assert!(w.verdict().is_ok());
    }

    /// A coordinator whose event stream sends its headers and a snapshot, then nothing; and
    /// whose task listings fail.
    async fn silent_coordinator() -> Api {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = listener.accept().await {
                let mut head = [0u8; 2048];
                let n = tokio::io::AsyncReadExt::read(&mut s, &mut head)
                    .await
                    .unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..n]);
                let reply: &[u8] = if head.starts_with("GET /api/v1/events") {
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n\
                      event: snapshot\ndata: {\"at\": \"2026-12-01T10:40:00Z\", \"tasks\": []}\n\n"
                } else {
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\
                      connection: close\r\n\r\n{}"
                };
                let _ = s.write_all(reply).await;
                held.push(s);
            }
        });
        Api::build(&format!("http://{addr}"), None, None).expect("client")
    }

    #[tokio::test]
    async fn a_silent_event_stream_is_taken_for_lost_and_a_failed_catch_up_keeps_its_mark() {
        let api = silent_coordinator().await;
        let mut w = Watch::new(None, true, false);
        w.silence = Duration::from_millis(300);
        // The first snapshot sets the baseline (no read); then the stream says nothing.
        let started = std::time::Instant::now();
        match w.stream(&api).await {
            Ok(Turn::Lost { opened, why, .. }) => {
                assert!(opened);
                assert!(format!("{why:#}").contains("silent"), "{why:#}");
            }
            _ => panic!("the silent stream must be lost"),
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        // A gap's catch-up that fails leaves the mark where it was: the next one asks again
        // from it, not from this snapshot's time.
        let mark = time(&json!("2026-12-01T10:30:00Z"));
        w.high_water = mark;
        let snap = json!({"at": "2026-12-01T10:40:00Z", "tasks": []});
        assert!(w.catch_up(&api, &snap).await.is_err());
        assert_eq!(w.high_water, mark);
    }

    /// A listener that takes connections and never answers (a coordinator hung, or a path
    /// that went dead after the handshake): the opening of the stream is lost after the
    /// watch's silence, not waited on for ever.
    #[tokio::test]
    async fn an_event_stream_that_never_answers_is_taken_for_lost() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (taken_tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
                let _ = taken_tx.send(());
            }
        });
        let api = Api::build(&format!("http://{addr}"), None, None).expect("client");
        let mut w = Watch::new(Some(["t0".to_owned()].into()), true, false);
        w.silence = Duration::from_millis(300);
        let turn = tokio::time::timeout(Duration::from_secs(10), w.stream(&api))
            .await
            .expect("the opening must not hang");
        match turn {
            Ok(Turn::Lost {
                opened,
                reached,
                why,
            }) => {
                assert!(!opened && !reached);
                assert!(format!("{why:#}").contains("did not answer"), "{why:#}");
            }
            _ => panic!("a stream that never answers must be lost"),
        }
        assert!(taken.try_recv().is_ok(), "the listener took the connection");
    }

    #[tokio::test]
    async fn an_id_no_task_can_have_is_refused_before_any_request() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            watch: WatchArgs,
        }
        // Port 9 (discard) on loopback: nothing answers, and nothing must be asked.
        for id in ["x#y", "x?limit=1", "a/b"] {
            let argv = ["watch", "--coordinator", "http://127.0.0.1:9", id];
            let a = <Cli as clap::Parser>::try_parse_from(argv)
                .expect("parsed")
                .watch;
            let e = run(a).await.expect_err("refused");
            assert!(
                format!("{e:#}").starts_with(&format!("task id {id:?}")),
                "{e:#}"
            );
        }
    }

    #[test]
    fn a_watch_of_every_task_forgets_tasks_that_ended_long_before_and_keeps_the_rest() {
        let mut w = Watch::new(None, true, false);
        let base = DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let stamped = |id: String, status: &str, secs: i64| {
            let mut t = task(&id, status, 1, None);
            t["updated_at"] = json!(base + chrono::TimeDelta::seconds(secs));
            t
        };
        // Ended long ago, and still running from then.
        for i in 0..SEEN_MAX / 2 {
            w.on_task(&stamped(format!("old-{i}"), "completed", 0))
                .expect("written");
        }
        for i in 0..SEEN_MAX / 2 - 1 {
            w.on_task(&stamped(format!("run-{i}"), "running", 0))
                .expect("written");
        }
        assert_eq!(w.seen.len(), SEEN_MAX - 1, "nothing forgotten yet");
        // A change a minute later fills the watch: the ended ones of then are forgotten, not
        // the running ones.
        w.on_task(&stamped("new".into(), "completed", 60))
            .expect("written");
        assert_eq!(w.seen.len(), SEEN_MAX / 2);
        assert!(w.seen.contains_key("run-7") && w.seen.contains_key("new"));
        assert!(!w.seen.contains_key("old-7"));
    }

    /// Task `id` running on `w1`, of submission `seq`, last changed `at`.
    fn stamped(id: String, seq: u64, at: &str) -> Value {
        let mut t = task(&id, "running", 1, Some("w1"));
        t["submit_seq"] = json!(seq);
        t["updated_at"] = json!(at);
        t
    }

    /// Many named tasks submitted long ago were first looked for in the listing from the
    /// coordinator's oldest task on, the whole table (gigabytes against one that keeps a
    /// million), then read each by itself (5,000 requests for 5,000 names): the first catch-up
    /// reads them from the listing by their ids, [`IDS_AT_ONCE`] a request, never the whole
    /// listing; once each was seen, a later catch-up reads the listing from the oldest of them
    /// on. A name the coordinator lacks is refused as a missing task is. A coordinator without
    /// the filter (refusing the parameter, or ignoring it) has each read by itself.
    #[tokio::test]
    async fn many_named_tasks_are_first_read_by_their_ids_not_from_the_whole_listing() {
        let n = 2 * IDS_AT_ONCE + 6;
        // Others' tasks before and after the named ones.
        let mut table: Vec<Value> = (0..5)
            .map(|i| stamped(format!("old-{i}"), i, "2026-12-01T09:00:00Z"))
            .collect();
        table.extend(
            (0..n).map(|i| stamped(format!("t+{i}"), 100 + i as u64, "2026-12-01T10:39:59Z")),
        );
        table.extend(
            (0..200).map(|i| stamped(format!("new-{i}"), 1000 + i, "2026-12-01T09:30:00Z")),
        );
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(table));
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let api = honest(tasks.clone(), asked.clone()).await;
        let names: BTreeSet<String> = (0..n).map(|i| format!("t+{i}")).collect();
        let mut w = Watch::new(Some(names.clone()), true, false);
        w.page = 10;
        w.catch_up(&api, &snapshot_at("2026-12-01T10:40:00Z"))
            .await
            .expect("every name found");
        assert_eq!(w.seen.len(), n, "every named task read");
        let first = std::mem::take(&mut *asked.lock().expect("asked"));
        assert_eq!(first.len(), n.div_ceil(IDS_AT_ONCE), "{first:?}");
        assert!(first.iter().all(|q| q.contains("ids=t%2B")), "{first:?}");
        // A short gap: the tasks changed in it, listed from the oldest named one on.
        w.catch_up(&api, &snapshot_at("2026-12-01T10:40:10Z"))
            .await
            .expect("read");
        let later = std::mem::take(&mut *asked.lock().expect("asked"));
        assert!(later[0].contains("after_seq=99"), "{later:?}");
        assert!(later.iter().all(|q| !q.starts_with("GET ")), "{later:?}");
        // A name the coordinator lacks is refused as a missing task is.
        let mut more = names.clone();
        more.insert("nope".into());
        let mut w = Watch::new(Some(more), true, false);
        let e = w
            .catch_up(&api, &snapshot_at("2026-12-01T10:40:00Z"))
            .await
            .expect_err("no such task");
        assert!(is_refusal(&e), "{e:#}");
        assert!(format!("{e:#}").contains("no task nope"), "{e:#}");
        // Without the filter: one listing request, then a read each.
        for mode in [Ids::Refuses, Ids::Ignores] {
            let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let api = honest_with(tasks.clone(), asked.clone(), mode).await;
            let mut w = Watch::new(Some(names.clone()), true, false);
            w.catch_up(&api, &snapshot_at("2026-12-01T10:40:00Z"))
                .await
                .expect("every name found");
            assert_eq!(w.seen.len(), n, "every named task read");
            let first = std::mem::take(&mut *asked.lock().expect("asked"));
            assert_eq!(first.len(), n + 1, "{first:?}");
            assert!(first[0].contains("ids="), "{first:?}");
        }
    }

    /// A coordinator for the catch-up tests: its listing and its reads of one task give the
    /// tasks in `tasks` (a task missing from it is 404), so a test changes what a later
    /// catch-up finds; its event stream sends the body `events` gives for each opening (the
    /// openings counted from 0), then holds the stream open.
    async fn scripted(
        tasks: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
        events: fn(usize) -> String,
    ) -> Api {
        use axum::extract::{Path, State};
        use std::sync::atomic::{AtomicUsize, Ordering};
        type Tasks = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;
        let opened = std::sync::Arc::new(AtomicUsize::new(0));
        let stream = move || {
            use futures_util::{StreamExt, stream};
            let text = events(opened.fetch_add(1, Ordering::SeqCst));
            // An empty body ends at once; any other is held open after it.
            let held = match text.is_empty() {
                true => stream::empty().boxed(),
                false => stream::once(async { Ok::<_, std::convert::Infallible>(text) })
                    .chain(stream::pending())
                    .boxed(),
            };
            async move {
                (
                    [(http::header::CONTENT_TYPE, "text/event-stream")],
                    axum::body::Body::from_stream(held),
                )
            }
        };
        let list = |State(t): State<Tasks>| async move {
            axum::Json(Value::from(t.lock().expect("tasks").clone()))
        };
        let one = |State(t): State<Tasks>, Path(id): Path<String>| async move {
            let t = t.lock().expect("tasks");
            match t.iter().find(|t| t["task_id"] == id.as_str()) {
                Some(t) => Ok(axum::Json(t.clone())),
                None => Err(http::StatusCode::NOT_FOUND),
            }
        };
        let app = axum::Router::new()
            .route("/api/v1/events", axum::routing::get(stream))
            .route("/api/v1/tasks", axum::routing::get(list))
            .route("/api/v1/tasks/{id}", axum::routing::get(one))
            .with_state(tasks);
        let addr = crate::client::serve_for_test(app).await;
        Api::build(&format!("http://{addr}"), None, None).expect("client")
    }

    /// `n` tasks `t0`.. in `status`, with the `submit_seq` the listing pages by.
    fn numbered(n: usize, status: &str) -> Vec<Value> {
        (0..n)
            .map(|i| {
                let mut t = task(&format!("t{i}"), status, 1, None);
                t["submit_seq"] = json!(i);
                t
            })
            .collect()
    }

    fn snapshot_at(at: &str) -> Value {
        json!({"at": at, "tasks": []})
    }

    /// A named task that ended and was removed by retention while the watch had no stream is
    /// gone from every listing: the watch used to wait for its end for ever. It ends the watch
    /// as removed (outcome unknown: exit 2), whether the names are read by their ids or
    /// from the listing; a short gap's listing (the tasks changed in it) cannot tell a removed
    /// task from an unchanged one, and retention removes none that ended so recently.
    #[tokio::test]
    async fn a_named_task_removed_while_the_watch_had_no_stream_ends_it_as_removed() {
        for n in [2, BY_IDS + 6] {
            let tasks = std::sync::Arc::new(std::sync::Mutex::new(numbered(n, "running")));
            let api = scripted(tasks.clone(), |_| String::new()).await;
            let names: BTreeSet<String> = (0..n).map(|i| format!("t{i}")).collect();
            let mut w = Watch::new(Some(names), true, false);
            w.catch_up(&api, &snapshot_at("2026-12-01T10:40:00Z"))
                .await
                .expect("every name found");
            assert!(w.ended.is_empty());
            tasks.lock().expect("tasks").remove(0);
            if n > BY_IDS {
                w.catch_up(&api, &snapshot_at("2026-12-01T10:40:10Z"))
                    .await
                    .expect("a short gap");
                assert!(w.ended.is_empty(), "n {n}: {:?}", w.ended);
            }
            w.catch_up(&api, &snapshot_at("2026-12-01T10:42:00Z"))
                .await
                .expect("a removed task is no error");
            assert_eq!(
                w.ended.get("t0").map(String::as_str),
                Some("removed"),
                "n {n}"
            );
            assert_eq!(w.ended.len(), 1, "n {n}: {:?}", w.ended);
            // Its outcome is unknown: exit 2, as a watch that could not follow its tasks, not
            // the 1 of a task known not to have completed.
            let e = w.verdict().expect_err("not completed");
            assert!(e.downcast_ref::<Unfollowed>().is_some(), "{e:#}");
            let said = crate::output::describe(&e);
            assert!(
                said.contains("t0 removed by the coordinator's retention"),
                "{said}"
            );
            assert!(said.contains("outcome unknown"), "{said}");
        }
    }

    /// A coordinator whose listing honours `updated_since`, `after_seq`, `limit` and `ids` over
    /// `tasks`, and whose reads of one task give them (404 when missing); each listing's query
    /// and each read's id are written to `asked`.
    async fn honest(
        tasks: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
        asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> Api {
        honest_with(tasks, asked, Ids::Filters).await
    }

    /// What a coordinator does with the listing's `ids` parameter.
    #[derive(Clone, Copy, PartialEq)]
    enum Ids {
        Filters,
        /// As one before the filter did with a parameter it did not know.
        Refuses,
        /// As one that ignores parameters it does not know.
        Ignores,
    }

    /// [`honest`], with `ids` taken as `mode` says.
    async fn honest_with(
        tasks: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
        asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        mode: Ids,
    ) -> Api {
        use axum::extract::{Path, Query, RawQuery};
        use std::collections::HashMap;
        let (list_tasks, list_asked) = (tasks.clone(), asked.clone());
        let list = move |RawQuery(raw): RawQuery, Query(q): Query<HashMap<String, String>>| {
            list_asked
                .lock()
                .expect("asked")
                .push(raw.unwrap_or_default());
            let since = q.get("updated_since").and_then(|t| time(&json!(t)));
            let after = q.get("after_seq").and_then(|a| a.parse::<u64>().ok());
            let limit = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(1000);
            let ids: Option<BTreeSet<&str>> = match mode {
                Ids::Filters => q.get("ids").map(|ids| ids.split(',').collect()),
                _ => None,
            };
            if mode == Ids::Refuses && q.contains_key("ids") {
                // In the words of a coordinator before the filter (its query's fields checked).
                let said = "Failed to deserialize query string: unknown field `ids`, expected \
                            one of `status`, `limit`, `order`, `updated_since`, `after_seq`";
                let body = json!({"error": {"code": "bad_request", "message": said}});
                return std::future::ready(Err((http::StatusCode::BAD_REQUEST, axum::Json(body))));
            }
            let mut got: Vec<Value> = list_tasks
                .lock()
                .expect("tasks")
                .iter()
                .filter(|t| since.is_none_or(|s| time(&t["updated_at"]) >= Some(s)))
                .filter(|t| after.is_none_or(|a| t["submit_seq"].as_u64() > Some(a)))
                .filter(|t| {
                    ids.as_ref()
                        .is_none_or(|ids| t["task_id"].as_str().is_some_and(|id| ids.contains(id)))
                })
                .cloned()
                .collect();
            got.sort_by_key(|t| t["submit_seq"].as_u64());
            got.truncate(limit);
            std::future::ready(Ok(axum::Json(Value::from(got))))
        };
        let one = move |Path(id): Path<String>| {
            asked.lock().expect("asked").push(format!("GET {id}"));
            let t = tasks.lock().expect("tasks");
            let found = t.iter().find(|t| t["task_id"] == id.as_str()).cloned();
            async move { found.map(axum::Json).ok_or(http::StatusCode::NOT_FOUND) }
        };
        let app = axum::Router::new()
            .route("/api/v1/tasks", axum::routing::get(list))
            .route("/api/v1/tasks/{id}", axum::routing::get(one));
        let addr = crate::client::serve_for_test(app).await;
        Api::build(&format!("http://{addr}"), None, None).expect("client")
    }

    /// Many named tasks were read from the coordinator's whole table: gigabytes against one
    /// that keeps a million. Tasks just submitted (`submit --watch`) are first read among those
    /// changed since the submission (one missing there, stamped by a clock set back, is asked
    /// for by its id), and every later listing starts at the oldest named task, not at the
    /// coordinator's oldest; a task removed by retention is still told from the rest.
    #[tokio::test]
    async fn many_named_tasks_are_read_without_the_whole_table() {
        let n = BY_IDS + 6;
        // Older tasks of others, then the submitted ones; t5's change stamped earlier.
        let mut table: Vec<Value> = (0..5)
            .map(|i| stamped(format!("old-{i}"), i, "2026-12-01T09:00:00Z"))
            .collect();
        table.extend((0..n).map(|i| {
            let at = match i {
                5 => "2026-12-01T10:30:00Z",
                _ => "2026-12-01T10:39:59Z",
            };
            stamped(format!("t{i}"), 1000 + i as u64, at)
        }));
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(table));
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let api = honest(tasks.clone(), asked.clone()).await;
        let names = (0..n).map(|i| format!("t{i}")).collect();
        let mut w = Watch::new(Some(names), true, false);
        w.submitted = Some(std::time::Instant::now());
        w.catch_up(&api, &snapshot_at("2026-12-01T10:40:00Z"))
            .await
            .expect("every name found");
        assert_eq!(w.seen.len(), n, "every named task read");
        let first = std::mem::take(&mut *asked.lock().expect("asked"));
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(
            first[0].contains("updated_since=2026-12-01T10:39:5"),
            "{first:?}"
        );
        // t5 by its id: alone, read by itself.
        assert_eq!(first[1], "GET t5", "{first:?}");
        // A long gap, in which retention removed t3: the listing starts at the oldest named task.
        tasks
            .lock()
            .expect("tasks")
            .retain(|t| t["task_id"] != "t3");
        w.catch_up(&api, &snapshot_at("2026-12-01T10:45:00Z"))
            .await
            .expect("read");
        let later = std::mem::take(&mut *asked.lock().expect("asked"));
        assert_eq!(later.len(), 1, "{later:?}");
        assert!(later[0].contains("after_seq=999"), "{later:?}");
        assert!(!later[0].contains("updated_since"), "{later:?}");
        assert_eq!(w.ended.get("t3").map(String::as_str), Some("removed"));
        assert_eq!(w.ended.len(), 1, "{:?}", w.ended);
    }

    /// A few named tasks were read with a request each at every catch-up: a watch of 60 tasks
    /// sent 60 at each gap in its stream. They are read by their ids, one listing request, at
    /// every catch-up; one the listing lacks is read by itself (refused as missing at the
    /// first, removed by retention at a later one); a watch of one task reads it by itself;
    /// a coordinator without the filter (refusing it, or ignoring it) has each read by itself,
    /// and is not asked for the filter again at a later catch-up (it was, at every one).
    #[tokio::test]
    async fn a_few_named_tasks_are_read_by_their_ids_at_every_catch_up() {
        let n = 10;
        let mut table: Vec<Value> = (0..5)
            .map(|i| stamped(format!("old-{i}"), i, "2026-12-01T09:00:00Z"))
            .collect();
        table.extend((0..n).map(|i| stamped(format!("t{i}"), 100 + i, "2026-12-01T10:39:59Z")));
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(table));
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let api = honest(tasks.clone(), asked.clone()).await;
        let names: BTreeSet<String> = (0..n).map(|i| format!("t{i}")).collect();
        let mut w = Watch::new(Some(names.clone()), true, false);
        // The requests of a catch-up at `at`.
        async fn asked_at(
            w: &mut Watch,
            api: &Api,
            asked: &std::sync::Mutex<Vec<String>>,
            at: &str,
        ) -> Vec<String> {
            w.catch_up(api, &snapshot_at(at)).await.expect("read");
            std::mem::take(&mut *asked.lock().expect("asked"))
        }
        let first = asked_at(&mut w, &api, &asked, "2026-12-01T10:40:00Z").await;
        assert_eq!(w.seen.len(), n as usize, "every named task read");
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(first[0].contains("ids=t0,t1,"), "{first:?}");
        // A name the coordinator lacks is refused as a missing task is.
        let mut more = names.clone();
        more.insert("nope".into());
        let mut other = Watch::new(Some(more), true, false);
        let e = other
            .catch_up(&api, &snapshot_at("2026-12-01T10:40:00Z"))
            .await
            .expect_err("no such task");
        assert!(format!("{e:#}").contains("no task nope"), "{e:#}");
        asked.lock().expect("asked").clear();
        // A short gap, then a long one in which retention removed t3.
        let later = asked_at(&mut w, &api, &asked, "2026-12-01T10:40:10Z").await;
        assert_eq!(later, first, "{later:?}");
        tasks
            .lock()
            .expect("tasks")
            .retain(|t| t["task_id"] != "t3");
        let later = asked_at(&mut w, &api, &asked, "2026-12-01T10:45:00Z").await;
        assert_eq!(later.len(), 2, "{later:?}");
        assert_eq!(later[0], first[0], "{later:?}");
        assert_eq!(later[1], "GET t3", "{later:?}");
        assert_eq!(w.ended.get("t3").map(String::as_str), Some("removed"));
        assert_eq!(w.ended.len(), 1, "{:?}", w.ended);
        // One name: a request either way, by itself.
        let mut w = Watch::new(Some(["t0".to_owned()].into()), true, false);
        let one = asked_at(&mut w, &api, &asked, "2026-12-01T10:40:00Z").await;
        assert_eq!(one, ["GET t0"], "{one:?}");
        // Without the filter: one listing request at the first catch-up, then a read each;
        // at later ones a read each, the filter not asked for again.
        let left: BTreeSet<String> = names.into_iter().filter(|id| id != "t3").collect();
        for mode in [Ids::Refuses, Ids::Ignores] {
            let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let api = honest_with(tasks.clone(), asked.clone(), mode).await;
            let mut w = Watch::new(Some(left.clone()), true, false);
            let got = asked_at(&mut w, &api, &asked, "2026-12-01T10:46:00Z").await;
            assert_eq!(got.len(), 1 + left.len(), "{got:?}");
            assert!(got[0].contains("ids="), "{got:?}");
            for at in ["2026-12-01T10:46:10Z", "2026-12-01T10:47:00Z"] {
                let got = asked_at(&mut w, &api, &asked, at).await;
                assert_eq!(got.len(), left.len(), "{got:?}");
                assert!(got.iter().all(|q| q.starts_with("GET ")), "{got:?}");
            }
            assert_eq!(w.seen.len(), left.len(), "every named task read");
        }
    }

    /// A removal on the stream of a named task whose end the watch missed (its stream lagged)
    /// ends it too.
    #[tokio::test]
    async fn a_named_tasks_removal_on_the_stream_ends_the_watch() {
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(numbered(1, "running")));
        let api = scripted(tasks, |_| {
            "event: snapshot\ndata: {\"at\": \"2026-12-01T10:40:00Z\", \"tasks\": []}\n\n\
             event: task_removed\ndata: {\"task_id\": \"t0\"}\n\n"
                .to_owned()
        })
        .await;
        let mut w = Watch::new(Some(["t0".to_owned()].into()), true, false);
        let turn = tokio::time::timeout(Duration::from_secs(10), w.stream(&api)).await;
        assert!(matches!(turn, Ok(Ok(Turn::Done))), "the watch ended");
        assert_eq!(w.ended.get("t0").map(String::as_str), Some("removed"));
    }

    /// A task that only checkpoints, then goes quiet: the line held back for its checkpoints
    /// is written a period after its last line, while the stream says nothing, not at the
    /// task's next change (which may be an hour away).
    #[tokio::test]
    async fn a_line_held_for_checkpoints_is_written_when_due_while_the_stream_is_quiet() {
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(numbered(1, "running")));
        let api = scripted(tasks, |_| {
            let mut text =
                "event: snapshot\ndata: {\"at\": \"2026-12-01T10:40:00Z\", \"tasks\": []}\n\n"
                    .to_owned();
            for n in 1..=3 {
                let mut t = task("t0", "running", 1, None);
                t["submit_seq"] = json!(0);
                t["updated_at"] = json!(format!("2026-12-01T10:40:0{n}Z"));
                t["latest_checkpoint"] = json!({"checkpoint_id": format!("c-{n}"), "size": n});
                text.push_str(&format!("event: task\ndata: {t}\n\n"));
            }
            text
        })
        .await;
        let mut w = Watch::new(Some(["t0".to_owned()].into()), false, false);
        w.folds.period = Duration::from_millis(50);
        w.silence = Duration::from_millis(500);
        let turn = tokio::time::timeout(Duration::from_secs(10), w.stream(&api)).await;
        assert!(
            matches!(turn, Ok(Ok(Turn::Lost { opened: true, .. }))),
            "the quiet stream is lost after its silence"
        );
        assert_eq!(w.seen["t0"].shown.checkpoint.as_deref(), Some("c-3"));
        assert_eq!(w.folds.next_due(), None, "the held line was written");
    }

    /// A coordinator that answers the event stream but ends it before its snapshot (busy with
    /// large answers) is up: the watch opens the stream again rather than exit as if it were
    /// unreachable.
    #[tokio::test]
    async fn a_stream_ended_before_its_first_snapshot_is_opened_again() {
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(numbered(1, "completed")));
        let api = scripted(tasks, |opening| match opening {
            0 => String::new(),
            _ => "event: snapshot\ndata: {\"at\": \"2026-12-01T10:40:00Z\", \"tasks\": []}\n\n"
                .to_owned(),
        })
        .await;
        let mut w = Watch::new(Some(["t0".to_owned()].into()), true, false);
        let followed = tokio::time::timeout(Duration::from_secs(10), follow_with(&api, &mut w))
            .await
            .expect("in time");
        assert!(followed.is_ok(), "{followed:?}");
        assert!(w.verdict().is_ok());
    }
}
