//! Client commands: talk to the coordinator's HTTP API; human tables by default, `--json` for
//! machines.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::output::outln;
use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use tether_proto::TaskSpec;

/// Default coordinator address for client commands.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:8765";

#[derive(Args, Clone)]
pub struct CommonArgs {
    /// Coordinator URL.
    #[arg(long, env = "TETHER_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// File holding the API bearer token (TETHER_TOKEN may hold the token itself).
    #[arg(long, env = "TETHER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of the CA that signed an `https://` coordinator's certificate (default: the
    /// system's roots).
    #[arg(long, env = "TETHER_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// Environment variable holding the API token itself (prefer a file).
pub const TOKEN_ENV: &str = "TETHER_TOKEN";

/// The API token from `--token-file`, else from `TETHER_TOKEN`, else none.
fn api_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let (raw, source) = match file {
        Some(f) => {
            crate::run::warn_if_open(f, "the API token file");
            let raw = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read token file {}", f.display()))?;
            (raw, format!("the token file {}", f.display()))
        }
        None => match std::env::var(TOKEN_ENV) {
            Ok(t) => (t, TOKEN_ENV.to_owned()),
            Err(_) => return Ok(None),
        },
    };
    token_of(&raw, &source).map(Some)
}

/// The token `raw` holds (read from `source`), or why it holds none: an empty one is said to
/// be empty (an exported `TETHER_TOKEN=`), not to hold spaces.
fn token_of(raw: &str, source: &str) -> anyhow::Result<String> {
    let token = raw.trim();
    if token.is_empty() {
        bail!("{source} is empty: give the API token there, or unset it to send none");
    }
    if token.contains(char::is_whitespace) {
        bail!("the API token in {source} must be one line without spaces");
    }
    Ok(token.to_owned())
}

pub(crate) struct Api {
    base: String,
    transport: Transport,
}

/// Plain HTTP through reqwest (built without TLS); `https://` through hyper with the same rustls
/// verification as the worker's (the CA of `--ca-file`, or the system's roots).
enum Transport {
    Plain(reqwest::Client),
    Tls {
        client: HttpsClient,
        auth: Option<reqwest::header::HeaderValue>,
    },
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// An error status from the API, with its message.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub(crate) struct Refused {
    pub(crate) status: u16,
    message: String,
}

impl Refused {
    pub(crate) fn of(status: http::StatusCode, body: &Value) -> Self {
        Refused {
            status: status.as_u16(),
            message: body["error"]["message"]
                .as_str()
                .unwrap_or("request failed")
                .to_owned(),
        }
    }
}

/// Whether the host of `url` is this machine: `localhost`, `127.0.0.0/8` or `::1`.
fn is_loopback(url: &str) -> bool {
    match url::Url::parse(url).ok().as_ref().and_then(url::Url::host) {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Times a GET is sent to a coordinator that answers it is busy.
const BUSY_TRIES: u32 = 5;
/// Longest wait for a whole answer to a request: a coordinator (or a path) that went silent
/// is an error, not a command that never returns. A large answer may wait a few seconds for its turn.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an idle pooled connection is kept for another request: well within the
/// coordinator's closing of idle HTTP connections (`Limits::http_idle`, 60 s), so a request is
/// not sent on a connection the coordinator is closing.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// Longest wait for a connection to the coordinator: well within [`REQUEST_TIMEOUT`], so a
/// request that timed out was sent on a connection, and one never sent fails as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A request that may have reached the coordinator and been carried out, to which no answer
/// came (the connection failed or went silent once it was sent). Said apart from "cannot
/// reach", which means nothing was sent: a submission sent again after this may be a second.
#[derive(Debug, thiserror::Error)]
#[error(
    "no answer from the coordinator at {base} to {request} once it was sent: whether it was \
     carried out is unknown"
)]
pub(crate) struct NoAnswer {
    base: String,
    request: String,
}

/// A response body as it arrives, chunk by chunk.
pub(crate) type Chunks =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = anyhow::Result<bytes::Bytes>> + Send>>;

/// A TLS request that reached no coordinator: said so, with a hint when what answered is no
/// TLS server (rustls reads a plain HTTP answer as "corrupt message of type
/// InvalidContentType"): a coordinator serving plain HTTP, asked through an https:// URL.
fn unreachable_tls(base: &str, e: impl Into<anyhow::Error>) -> anyhow::Error {
    let e = e.into();
    let hint = match format!("{e:#}").contains("InvalidContentType") {
        true => {
            " (what answered speaks no TLS: if the coordinator serves plain HTTP, use an http:// URL)"
        }
        false => "",
    };
    e.context(format!("cannot reach the coordinator at {base}{hint}"))
}

impl Api {
    pub(crate) fn new(c: &CommonArgs) -> anyhow::Result<Self> {
        let token = api_token(c.token_file.as_deref())?;
        Self::build(&c.coordinator, token, c.ca_file.as_deref())
    }

    /// A client of the coordinator at `coordinator` (any of its URLs), with an API token and,
    /// for `https://`, the CA that signed its certificate.
    pub(crate) fn build(
        coordinator: &str,
        token: Option<String>,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        Self::build_with(coordinator, token, ca_file, reqwest::Client::builder())
    }

    /// [`Api::build`], its plain HTTP client made from `http` (in which a test can set a
    /// proxy as the environment would).
    fn build_with(
        coordinator: &str,
        token: Option<String>,
        ca_file: Option<&std::path::Path>,
        http: reqwest::ClientBuilder,
    ) -> anyhow::Result<Self> {
        let base = tether_proto::endpoint::derive_http_base(coordinator)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let auth = match token {
            Some(token) => {
                let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                    .context("the API token holds characters a header cannot carry")?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let transport = if base.starts_with("https://") {
            let tls = tether_worker::connector::tls_client_config(ca_file)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
            tcp.enforce_http(false);
            tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*tls).clone())
                .https_only()
                .enable_http1()
                .wrap_connector(tcp);
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_idle_timeout(POOL_IDLE)
                    .pool_timer(hyper_util::rt::TokioTimer::new())
                    .build(connector);
            Transport::Tls { client, auth }
        } else {
            if ca_file.is_some() {
                bail!("--ca-file is for an https:// coordinator; {base} is plain HTTP");
            }
            let mut headers = reqwest::header::HeaderMap::new();
            if let Some(v) = auth {
                headers.insert(reqwest::header::AUTHORIZATION, v);
            }
            // reqwest takes a proxy from HTTP_PROXY and the like, loopback included unless
            // NO_PROXY names it; a proxy cannot reach this machine's coordinator for us. One
            // elsewhere may need the proxy.
            let http = match is_loopback(&base) {
                true => http.no_proxy(),
                false => http,
            };
            let http = http
                .default_headers(headers)
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_idle_timeout(POOL_IDLE)
                .build()
                .context("HTTP client")?;
            Transport::Plain(http)
        };
        Ok(Self { base, transport })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{}", self.base, path);
        // A request that may change something (a submission, a control), failed once it could
        // have been sent: its outcome is unknown, which "cannot reach" would hide. One that
        // failed connecting was not sent; a read is the same whenever it failed.
        let once_sent = !method.is_idempotent();
        let no_answer = || NoAnswer {
            base: self.base.clone(),
            request: format!("{method} {path}"),
        };
        let lost = |e: anyhow::Error, connecting: bool| match once_sent && !connecting {
            true => e.context(no_answer()),
            false => e.context(format!("cannot reach the coordinator at {}", self.base)),
        };
        let exchange = async {
            match &self.transport {
                Transport::Plain(http) => {
                    let mut req = http.request(method.clone(), &url);
                    if let Some(b) = body {
                        req = req.json(b);
                    }
                    let resp = req.send().await.map_err(|e| {
                        let connecting = e.is_connect();
                        lost(e.into(), connecting)
                    })?;
                    let status = resp.status();
                    let bytes = resp.bytes().await.map_err(|e| lost(e.into(), false))?;
                    anyhow::Ok((status, bytes))
                }
                Transport::Tls { client, auth } => {
                    use http_body_util::BodyExt;
                    let mut req = http::Request::builder()
                        .method(method.clone())
                        .uri(url.as_str());
                    if let Some(v) = auth {
                        req = req.header(http::header::AUTHORIZATION, v);
                    }
                    let payload = match body {
                        Some(b) => {
                            req = req.header(http::header::CONTENT_TYPE, "application/json");
                            bytes::Bytes::from(serde_json::to_vec(b)?)
                        }
                        None => bytes::Bytes::new(),
                    };
                    let req = req
                        .body(http_body_util::Full::new(payload))
                        .context("request")?;
                    let resp = client.request(req).await.map_err(|e| {
                        match once_sent && !e.is_connect() {
                            true => anyhow::Error::new(e).context(no_answer()),
                            false => unreachable_tls(&self.base, e),
                        }
                    })?;
                    let status = resp.status();
                    let bytes = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| lost(e.into(), false))?
                        .to_bytes();
                    Ok((status, bytes))
                }
            }
        };
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                let e = anyhow::anyhow!(
                    "the coordinator at {} did not answer {path} within {} s",
                    self.base,
                    REQUEST_TIMEOUT.as_secs()
                );
                // Past CONNECT_TIMEOUT: the request was sent on a connection.
                match once_sent {
                    true => e.context(no_answer()),
                    false => e,
                }
            })??;
        if !status.is_success() {
            // An error's body is the API's `{"error": ...}`, or whatever a proxy in between said.
            let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(Refused::of(status, &v).into());
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the coordinator's answer to {path} is not JSON ({} bytes)",
                bytes.len()
            )
        })
    }

    /// GET `path` and its body as it comes (an event stream). An error status is an error,
    /// with the API's message; so is no answer (its status and headers) within `answer_within`:
    /// a coordinator (or a path) that took the connection and went silent would otherwise hold
    /// the caller for ever, since the silence of a stream is only watched once it has begun.
    pub(crate) async fn stream(
        &self,
        path: &str,
        answer_within: Duration,
    ) -> anyhow::Result<Chunks> {
        tokio::time::timeout(answer_within, self.open_stream(path))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the coordinator at {} did not answer GET {path} within {} ms",
                    self.base,
                    answer_within.as_millis()
                )
            })?
    }

    /// [`Self::stream`] without its deadline.
    async fn open_stream(&self, path: &str) -> anyhow::Result<Chunks> {
        use futures_util::StreamExt;
        let url = format!("{}{}", self.base, path);
        let unreachable = || format!("cannot reach the coordinator at {}", self.base);
        let refused = |status: http::StatusCode, body: &[u8]| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            anyhow::Error::from(Refused::of(status, &v))
        };
        match &self.transport {
            Transport::Plain(http) => {
                let resp = http.get(&url).send().await.with_context(unreachable)?;
                let status = resp.status();
                if !status.is_success() {
                    let body = resp.bytes().await.unwrap_or_default();
                    return Err(refused(status, &body));
                }
                Ok(futures_util::stream::unfold(resp, |mut r| async move {
                    match r.chunk().await {
                        Ok(Some(b)) => Some((Ok(b), r)),
                        Ok(None) => None,
                        Err(e) => Some((Err(anyhow::Error::new(e).context("reading")), r)),
                    }
                })
                .boxed())
            }
            Transport::Tls { client, auth } => {
                use http_body_util::BodyExt;
                let mut req = http::Request::builder().uri(url.as_str());
                if let Some(v) = auth {
                    req = req.header(http::header::AUTHORIZATION, v);
                }
                let req = req
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .context("request")?;
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| unreachable_tls(&self.base, e))?;
                let status = resp.status();
                if !status.is_success() {
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    return Err(refused(status, &body));
                }
                let body = http_body_util::BodyDataStream::new(resp.into_body());
                Ok(body
                    .map(|r| r.map_err(|e| anyhow::Error::new(e).context("reading")))
                    .boxed())
            }
        }
    }

    /// GET `path`. A coordinator busy with large answers (`503`, each waited for its
    /// turn) is asked again, up to [`BUSY_TRIES`] times in all.
    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call_unless_busy(reqwest::Method::GET, path, None)
            .await
    }

    /// `call`, asked again while the coordinator answers busy (`503`): it gives that answer
    /// before doing anything (a control waits for its turn before it acts, a submission for
    /// its turn before its body is read), so asking again never does a thing twice.
    async fn call_unless_busy(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut tries = 1;
        loop {
            match self.call(method.clone(), path, body).await {
                Err(e)
                    if tries < BUSY_TRIES
                        && e.downcast_ref::<Refused>().is_some_and(|r| r.status == 503) =>
                {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                answer => return answer,
            }
        }
    }

    /// POST `path`; a busy answer is asked again as for [`Self::get`].
    pub(crate) async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call_unless_busy(reqwest::Method::POST, path, Some(body))
            .await
    }
}

/// The tasks `/api/v1/tasks?{query}` lists, a page at a time: each page after the first asks
/// for the tasks after the previous page's last `submit_seq`, so a listing of any size is read
/// whole, once each, however many tasks arrive meanwhile, and a reader that takes each page as
/// it comes holds one page, not the coordinator's whole table. A page is at most the API's
/// 100,000: a shorter page must mean the last one, not the API's cap.
pub(crate) struct TaskPages<'a> {
    api: &'a Api,
    query: &'a str,
    page: usize,
    /// The `submit_seq` the next page starts after; `None` before the first page.
    after: Option<u64>,
    done: bool,
}

impl<'a> TaskPages<'a> {
    pub(crate) fn new(api: &'a Api, query: &'a str, page: usize) -> Self {
        TaskPages {
            api,
            query,
            page: page.clamp(1, 100_000),
            after: None,
            done: false,
        }
    }

    /// The next page, `None` once the listing was read whole.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Vec<Value>>> {
        if self.done {
            return Ok(None);
        }
        let mut path = format!("/api/v1/tasks?limit={}", self.page);
        if !self.query.is_empty() {
            path.push('&');
            path.push_str(self.query);
        }
        if let Some(seq) = self.after {
            path.push_str(&format!("&after_seq={seq}"));
        }
        let Value::Array(got) = self.api.get(&path).await? else {
            bail!("the coordinator's task list is not a list");
        };
        let full = got.len() >= self.page;
        match got.last().map(|t| t["submit_seq"].as_u64()) {
            Some(Some(seq)) if full => self.after = Some(seq),
            Some(None) if full => bail!("the coordinator's tasks carry no submit_seq to page by"),
            _ => self.done = true,
        }
        Ok(Some(got))
    }
}

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// A JSON file with one spec or {"tasks": [specs]}: the spec comes from the file alone, so
    /// every flag that would shape it is refused beside this one, rather than ignored.
    #[arg(long, conflicts_with = "command")]
    file: Option<PathBuf>,
    /// Priority: high, normal, low, or 0 (most urgent) to 9.
    #[arg(long, default_value = "normal", value_parser = parse_priority, conflicts_with = "file")]
    priority: u8,
    /// A capability the worker must have (repeatable).
    #[arg(long = "require", conflicts_with = "file")]
    requires: Vec<String>,
    /// Timeout, e.g. 10m.
    #[arg(long, value_parser = crate::settings::parse_duration_arg, conflicts_with = "file")]
    timeout: Option<std::time::Duration>,
    /// Attempts before a task lost again and again fails.
    #[arg(long, conflicts_with = "file")]
    max_attempts: Option<u32>,
    /// A label shown in listings.
    #[arg(long, conflicts_with = "file")]
    name: Option<String>,
    /// The task's id (default: one the coordinator makes); the same id twice is refused while
    /// the coordinator keeps the task (a `--retention` removes ended ones), so a submission
    /// whose reply was lost can be sent again safely.
    /// Checked against the id rules as the arguments are read: a bad one is a usage error.
    #[arg(long, conflicts_with = "file")]
    id: Option<tether_proto::TaskId>,
    /// A tag the worker must carry, KEY=VALUE (repeatable).
    #[arg(long = "tag", value_parser = parse_key_value, conflicts_with = "file")]
    tags: Vec<(String, String)>,
    /// An environment variable for the command, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_key_value, conflicts_with = "file")]
    env: Vec<(String, String)>,
    /// The command's working directory on the worker.
    #[arg(long, conflicts_with = "file")]
    cwd: Option<String>,
    /// A script run with `/bin/sh -c` on the worker, instead of a command line after `--`.
    #[arg(long, conflicts_with_all = ["command", "file"])]
    shell: Option<String>,
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
        _ => Err(format!("{s:?}: use KEY=VALUE")),
    }
}

/// The spec of a `command` task from the flags: a command line after `--` or a `--shell`
/// script, with its environment, directory and the worker it needs.
fn command_spec(a: &SubmitArgs) -> anyhow::Result<TaskSpec> {
    let mut config = match (&a.shell, a.command.split_first()) {
        (Some(script), _) => json!({ "shell": script }),
        (None, Some((program, args))) => json!({ "program": program, "args": args }),
        (None, None) => bail!("give a command after `--`, --shell SCRIPT or --file FILE"),
    };
    if !a.env.is_empty() {
        let env: serde_json::Map<String, Value> =
            a.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        config["env"] = Value::Object(env);
    }
    if let Some(dir) = &a.cwd {
        config["cwd"] = json!(dir);
    }
    let mut spec = TaskSpec::new("command", config);
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
    spec.name = a.name.clone();
    Ok(spec)
}

fn parse_priority(s: &str) -> Result<u8, String> {
    match s {
        "high" => Ok(1),
        "normal" => Ok(tether_proto::task::DEFAULT_PRIORITY),
        "low" => Ok(9),
        n => match n.parse::<u8>() {
            Ok(p) if p <= tether_proto::task::MAX_PRIORITY => Ok(p),
            _ => Err(format!("priority {n:?}: use high, normal, low or 0..=9")),
        },
    }
}

pub async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    let submitted = send(&a).await;
    if !a.watch {
        return submitted.map(|_| ());
    }
    // With --watch the exit status says how the tasks ended: a submission that failed (or a
    // client that could not be made) left none to follow, which is 2, not the 1 of a task
    // that ended but did not complete.
    let (api, ids) = submitted.map_err(|e| e.context(crate::watch::Unfollowed))?;
    crate::watch::follow(&api, Some(ids), a.common.json, false, crate::watch::PAGE).await
}

/// Submits the tasks `a` describes and prints their ids; the client and the ids.
async fn send(a: &SubmitArgs) -> anyhow::Result<(Api, BTreeSet<String>)> {
    let api = Api::new(&a.common)?;
    let body = match &a.file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", f.display()))?;
            if v.get("tasks").is_some() {
                v
            } else {
                json!({ "tasks": [v] })
            }
        }
        None => json!({ "tasks": [command_spec(a)?] }),
    };
    let v = api.post("/api/v1/tasks", &body).await.map_err(|e| {
        if e.downcast_ref::<NoAnswer>().is_none() {
            return e;
        }
        // Sending it again blindly may submit it twice.
        e.context(match &a.id {
            Some(id) => format!(
                "the submission's outcome is unknown: task {id} may have been submitted; check \
                 with `tether task {id}`, or submit it again with the same --id, which is refused \
                 as a duplicate (HTTP 409) if it was"
            ),
            None => "the submission's outcome is unknown: the task may have been submitted; \
                     check with `tether tasks`, or submit with --id so that a retry is refused \
                     as a duplicate (HTTP 409)"
                .to_owned(),
        })
    })?;
    let ids = submitted_ids(&v, body["tasks"].as_array().map_or(0, Vec::len))?;
    if a.common.json {
        outln!("{v}")?;
    } else {
        for id in &ids {
            outln!("{}", shown(id))?;
        }
    }
    Ok((api, ids.into_iter().collect()))
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
    /// At most this many (the oldest first, or the newest with --newest); with --all, the
    /// tasks read a request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    limit: u64,
    /// Every task, read page by page, however many there are.
    #[arg(long)]
    all: bool,
    /// The newest first (by default the oldest first): on a busy coordinator, what came last.
    #[arg(long, conflicts_with = "all")]
    newest: bool,
}

pub async fn tasks(a: TasksArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let mut query = match &a.status {
        Some(s) => format!("status={s}"),
        None => String::new(),
    };
    if a.newest {
        query.push_str("&order=newest");
    }
    if a.all {
        // Printed a page at a time as each comes: the listing may be larger than memory.
        let mut listing = Listing::new(a.common.json);
        let mut pages = TaskPages::new(&api, &query, a.limit as usize);
        while let Some(page) = pages.next().await? {
            listing.page(&page)?;
        }
        return listing.end();
    }
    let v = api
        .get(&format!("/api/v1/tasks?limit={}&{query}", a.limit))
        .await?;
    if a.common.json {
        outln!("{v}")?;
        return Ok(());
    }
    let rows = rows_of(&v, task_row);
    Table::new(&TASK_HEAD).print(&rows)?;
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

const TASK_HEAD: [&str; 7] = [
    "TASK", "STATUS", "ATTEMPT", "WORKER", "KIND", "PRIO", "NAME",
];

/// A task's row in `tether tasks`.
fn task_row(t: &Value) -> Vec<String> {
    vec![
        s(&t["task_id"]),
        s(&t["status"]),
        t["attempt"].to_string(),
        // The lease's worker; once it ended, the last attempt's.
        match &t["lease"]["worker"] {
            Value::Null => s(t["attempts"]
                .as_array()
                .and_then(|a| a.last())
                .map_or(&Value::Null, |a| &a["worker"])),
            w => s(w),
        },
        s(&t["spec"]["kind"]),
        t["spec"]["priority"].to_string(),
        s(&t["spec"]["name"]),
    ]
}

/// `tether tasks --all` printed page by page, each page as it is read, so the listing is never
/// held whole: with `--json` one JSON array (the same line as a listing of one page), element
/// by element; else one table whose columns widen where a later page needs it.
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
    outln!("submitted {}", when(&t["submitted_at"]))?;
    if !t["error"].is_null() {
        outln!("error     {}", s(&t["error"]))?;
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
    Ok(())
}

pub async fn workers(a: CommonArgs) -> anyhow::Result<()> {
    let api = Api::new(&a)?;
    let v = api.get("/api/v1/workers").await?;
    if a.json {
        outln!("{v}")?;
        return Ok(());
    }
    // The statistics are the worker's last report's: how old it is, beside them.
    let now = chrono::Utc::now();
    let rows = rows_of(&v, |w| {
        let st = &w["stats"];
        vec![
            s(&w["worker_id"]),
            // A worker that said it is stopping takes no new task (`worker_stopping`).
            match (w["state"].as_str(), w["stopping"].as_bool()) {
                (Some("connected"), Some(true)) => "stopping".to_owned(),
                _ => s(&w["state"]),
            },
            w["slots"].to_string(),
            w["leases"]
                .as_array()
                .map(|l| l.len())
                .unwrap_or(0)
                .to_string(),
            fmt_f(&st["rtt_p50_ms"], 1),
            // The cadence the worker beats at (a large fleet's budget stretches it).
            st["heartbeat_interval_ms"]
                .as_f64()
                .map(|ms| format!("{:.1}", ms / 1000.0))
                .unwrap_or_else(|| "-".into()),
            // The link's delivery rate as the worker measures it ("-": not measured yet).
            st["send_bytes_per_sec"]
                .as_f64()
                .filter(|r| *r > 0.0)
                .map(|r| format!("{:.1}", r / 1000.0))
                .unwrap_or_else(|| "-".into()),
            fmt_f(&st["stability"], 3),
            st["reconnects"]
                .as_u64()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            age(&st["reported_at"], now),
            when(&w["last_seen"]),
        ]
    });
    print_table(
        &[
            "WORKER",
            "STATE",
            "SLOTS",
            "TASKS",
            "RTT_P50_MS",
            "HEARTBEAT_S",
            "SEND_KB_S",
            "STABILITY",
            "RECONNECTS",
            "REPORTED",
            "LAST_SEEN",
        ],
        &rows,
    )?;
    // A worker's statistics come with its telemetry: a "-" is not a fault. Said on stderr, so
    // the table stays the table.
    let new = v.as_array().map_or(0, |ws| {
        let new = |w: &&Value| w["state"] == "connected" && w["stats"].is_null();
        ws.iter().filter(new).count()
    });
    if new > 0 {
        eprintln!(
            "{new} connected worker(s) without statistics yet: a worker reports them with its \
             telemetry, the first within a telemetry interval (30 s by default) of connecting"
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ControlArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Task id. Checked against the id rules before any request: an id such as
    /// `x/../other` would otherwise be resolved by the URL into another task's.
    id: tether_proto::TaskId,
}

pub async fn control(a: ControlArgs, action: &str) -> anyhow::Result<()> {
    let api = Api::new(&a.common)?;
    let v = api
        .post(&format!("/api/v1/tasks/{}/{action}", a.id), &json!({}))
        .await?;
    if a.common.json {
        outln!("{v}")?;
        return Ok(());
    }
    outln!("{} {}", s(&v["task_id"]), s(&v["status"]))?;
    // A control of a task whose worker is away is kept for it (the lease's desired state):
    // said, so that `paused` is not read as done. A worker that cannot be read says nothing.
    if let (Some(worker), "pause" | "resume") = (v["lease"]["worker"].as_str(), action)
        && let Ok(w) = api.get(&format!("/api/v1/workers/{worker}")).await
        && w["state"] != "connected"
    {
        eprintln!(
            "(its worker {} is {}: it is told when it reconnects, and the task stays as asked if \
             it moves to another)",
            shown(worker),
            s(&w["state"])
        );
    }
    Ok(())
}

/// Characters of a task's config and of its state `tether task` shows (`--json` has all of
/// them): an executor's state may be megabytes.
const CONFIG_SHOWN: usize = 200;

/// `text` up to `max` characters, ending in `…` when it was longer.
fn cut_line(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// A value as a table or a listing shows it: a string bare, with its control characters
/// escaped (a task name is anyone's text: a newline would break the table, an escape sequence
/// would reach the terminal); anything else as JSON.
fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => shown(s),
        other => other.to_string(),
    }
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`).
/// How long before `now` the time `v` was, in whole seconds (`12s ago`), or `-`.
fn age(v: &Value, now: chrono::DateTime<chrono::Utc>) -> String {
    v.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            let secs = (now - t.with_timezone(&chrono::Utc)).num_seconds().max(0);
            format!("{secs}s ago")
        })
        .unwrap_or_else(|| "-".into())
}

/// A time of the API as tables show it: UTC to the millisecond, one format for every column
/// (the API gives some to the nanosecond, some with `+00:00`); anything else as it is.
fn when(v: &Value) -> String {
    match v
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    {
        Some(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string(),
        None => s(v),
    }
}

/// Anyone's text (a task's name, a worker's error) as a terminal line may show it: control
/// characters escaped (a newline would forge a line, an escape sequence would reach the
/// terminal), and the bidirectional overrides and isolates, which would reorder what follows.
pub(crate) fn shown(text: &str) -> String {
    let escaped = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(escaped) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| match escaped(c) {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

fn fmt_f(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|f| format!("{f:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// One table row per element of a JSON array.
fn rows_of(v: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array().into_iter().flatten().map(row).collect()
}

/// Characters of a table's cell shown (`--json` has all of it): a task's name or result is
/// anyone's text, and one of 70,000 characters would make every row of the listing that wide
/// (and is past what the formatter pads: it panicked).
const CELL_SHOWN: usize = 200;

fn print_table(head: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    Table::new(head).print(rows)
}

/// The lines of a table: a head, then a line a row, columns padded to their widest cell.
#[cfg(test)]
fn table_lines(head: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    Table::new(head).lines(rows)
}

/// A table printed in parts (a listing page by page): its head before the first part, each
/// column padded to its widest cell so far. A later part with a wider cell widens the column
/// from there on; the lines printed before stay as they were.
struct Table {
    head: Vec<String>,
    widths: Vec<usize>,
    /// The head is printed.
    started: bool,
}

impl Table {
    fn new(head: &[&str]) -> Self {
        Table {
            head: head.iter().map(|h| h.to_string()).collect(),
            widths: head.iter().map(|h| h.chars().count()).collect(),
            started: false,
        }
    }

    /// Prints `rows` (and the head, the first time).
    fn print(&mut self, rows: &[Vec<String>]) -> anyhow::Result<()> {
        for line in self.lines(rows) {
            outln!("{line}")?;
        }
        Ok(())
    }

    /// The lines [`Table::print`] prints.
    fn lines(&mut self, rows: &[Vec<String>]) -> Vec<String> {
        let rows: Vec<Vec<String>> = rows
            .iter()
            // Every cell escaped: a task's output (a result's `stdout_tail`) is anyone's bytes,
            // and JSON leaves C1 controls and bidirectional overrides as they are.
            .map(|r| r.iter().map(|c| cut_line(&shown(c), CELL_SHOWN)).collect())
            .collect();
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                self.widths[i] = self.widths[i].max(c.chars().count());
            }
        }
        let widths = &self.widths;
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    format!("{c}{}", " ".repeat(pad))
                })
                .collect();
            parts.join("  ").trim_end().to_owned()
        };
        let head = (!self.started).then(|| line(&self.head));
        self.started = true;
        head.into_iter()
            .chain(rows.iter().map(|r| line(r)))
            .collect()
    }
}

/// Serves `app` on a loopback port for a test; its address.
#[cfg(test)]
pub(crate) async fn serve_for_test(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The RECORD cell of a result: counted, or why not from how its attempt ended (`end`).
fn record_label(stale: bool, end: Option<&str>) -> String {
    match (stale, end) {
        (false, _) => "counted".into(),
        // The result of an attempt a cancel or the task's timeout stopped is not late, merely
        // not counted.
        (true, Some("cancelled")) => "not counted (task cancelled)".into(),
        (true, Some("timed_out")) => "not counted (task timed out)".into(),
        (true, Some(end)) => format!("stale (attempt {end})"),
        (true, None) => "stale".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result's RECORD cell says why it is not counted from how its attempt ended: stopped
    /// by a cancel or by the task's timeout it is not late; after a lost lease it is stale.
    #[test]
    fn a_results_record_says_why_it_is_not_counted() {
        assert_eq!(record_label(false, Some("lost")), "counted");
        assert_eq!(
            record_label(true, Some("cancelled")),
            "not counted (task cancelled)"
        );
        assert_eq!(
            record_label(true, Some("timed_out")),
            "not counted (task timed out)"
        );
        assert_eq!(record_label(true, Some("lost")), "stale (attempt lost)");
        assert_eq!(record_label(true, None), "stale");
    }

    /// A cell of 70,000 characters (a task's name is anyone's text) is cut, not padded to:
    /// the formatter refuses widths past 65,535 and panicked.
    #[test]
    fn a_very_long_cell_is_cut_and_the_table_printed() {
        let long = "n".repeat(70_000);
        let rows = vec![
            vec!["t1".to_owned(), long],
            vec!["t2".to_owned(), "short".into()],
        ];
        print_table(&["ID", "NAME"], &rows).expect("printed");
        assert_eq!(
            cut_line(&rows[0][1], CELL_SHOWN).chars().count(),
            CELL_SHOWN + 1
        );
    }

    /// An https:// URL to a coordinator that serves plain HTTP: the error says what to try.
    #[tokio::test]
    async fn tls_to_a_plain_http_coordinator_says_to_use_http() {
        let addr = serve_for_test(axum::Router::new()).await;
        let api = Api::build(&format!("https://{addr}"), None, None).expect("client");
        let e = api.get("/api/v1/tasks").await.expect_err("no TLS there");
        let said = format!("{e:#}");
        assert!(said.contains("use an http:// URL"), "{said}");
    }

    #[test]
    fn an_age_is_whole_seconds_before_now() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-04T20:52:40.100Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(age(&json!("2026-12-04T20:52:28.680Z"), now), "11s ago");
        assert_eq!(
            age(&json!("2026-12-04T20:52:50Z"), now),
            "0s ago",
            "a clock ahead"
        );
        assert_eq!(age(&Value::Null, now), "-");
    }

    /// Every time column in one format, whatever precision or offset the API gave.
    #[test]
    fn times_are_shown_in_one_format() {
        for t in [
            "2026-12-04T20:52:28.680Z",
            "2026-12-04T20:52:28.680993046Z",
            "2026-12-04T20:52:28.680+00:00",
        ] {
            assert_eq!(when(&json!(t)), "2026-12-04T20:52:28.680Z", "{t}");
        }
        assert_eq!(when(&Value::Null), s(&Value::Null));
    }

    #[test]
    fn a_tables_cells_are_escaped_a_results_output_too() {
        // A command's stdout tail in a result: JSON keeps C1 controls and bidi overrides raw.
        let result = json!({"stdout_tail": "\u{9b}2J\u{202e}evil"}).to_string();
        let lines = table_lines(&["ATTEMPT", "RESULT"], &[vec!["1".into(), result]]);
        assert!(
            lines[1].contains("\\u{9b}2J\\u{202e}evil"),
            "{:?}",
            lines[1]
        );
        assert!(!lines[1].contains('\u{9b}') && !lines[1].contains('\u{202e}'));
    }

    #[test]
    fn shown_text_escapes_control_characters_and_nothing_else() {
        assert_eq!(shown("nightly run 42 ü"), "nightly run 42 ü");
        assert_eq!(shown("a\nb"), "a\\nb");
        assert_eq!(shown("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(shown("a\u{202e}evil"), "a\\u{202e}evil");
        assert_eq!(s(&json!("tab\there")), "tab\\there");
        assert_eq!(s(&Value::Null), "-");
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

    #[test]
    fn a_long_config_is_cut_on_a_character_boundary_and_says_so() {
        assert_eq!(cut_line("abc", 3), "abc");
        assert_eq!(cut_line("abcd", 3), "abc…");
        assert_eq!(cut_line("ééé", 2), "éé…");
        assert_eq!(cut_line("", 0), "");
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
            &["--name", "bench"],
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
        // What does go with a file: the defaults, --watch and the client's own flags.
        let a = submit_args(&["--file", "t.json", "--watch", "--json"]).expect("parsed");
        assert!(a.watch && a.file.is_some());
        let a = submit_args(&[]).expect("parsed");
        let e = command_spec(&a).expect_err("nothing to run");
        assert!(e.to_string().contains("give a command"), "{e}");
        let e = submit_args(&["--id", "bad id!", "--", "true"])
            .err()
            .expect("a bad id is refused as it is read");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
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

    /// Six seconds: a second between tries.
    #[tokio::test]
    async fn a_get_answered_busy_is_asked_again_and_other_refusals_are_not() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        let asked = Arc::new(AtomicU32::new(0));
        let busy_for = Arc::new(AtomicU32::new(2));
        let (counted, busy) = (asked.clone(), busy_for.clone());
        let refusal = |status: http::StatusCode, code: &str| {
            let body = serde_json::json!({"error": {"code": code, "message": code}});
            (status, axum::Json(body))
        };
        let app = axum::Router::new()
            .route(
                "/busy",
                axum::routing::get(move || {
                    let n = counted.fetch_add(1, SeqCst) + 1;
                    let busy = n <= busy.load(SeqCst);
                    async move {
                        if busy {
                            refusal(http::StatusCode::SERVICE_UNAVAILABLE, "busy")
                        } else {
                            (http::StatusCode::OK, axum::Json(serde_json::json!([1])))
                        }
                    }
                }),
            )
            .route(
                "/missing",
                axum::routing::get(move || async move {
                    refusal(http::StatusCode::NOT_FOUND, "not_found")
                }),
            );
        let addr = serve_for_test(app).await;
        let api = Api::build(&format!("http://{addr}"), None, None).expect("client");
        let got = api.get("/busy").await.expect("answered");
        assert_eq!(got, serde_json::json!([1]));
        assert_eq!(asked.load(SeqCst), 3, "two busy answers, then the list");
        // Busy for good: given up after BUSY_TRIES, with the coordinator's word.
        asked.store(0, SeqCst);
        busy_for.store(u32::MAX, SeqCst);
        let e = api.get("/busy").await.expect_err("busy");
        assert_eq!(e.downcast_ref::<Refused>().map(|r| r.status), Some(503));
        assert_eq!(asked.load(SeqCst), BUSY_TRIES);
        // Any other refusal is final at once.
        let e = api.get("/missing").await.expect_err("refused");
        assert_eq!(e.downcast_ref::<Refused>().map(|r| r.status), Some(404));
    }

    #[tokio::test]
    async fn an_answer_cut_short_or_not_json_is_an_error_not_null() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut head = [0u8; 1024];
                let n = s.read(&mut head).await.unwrap_or(0);
                let reply: &[u8] = if head[..n].starts_with(b"GET /cut") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n[1, 2, 3,"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nnot json!"
                };
                let _ = s.write_all(reply).await;
                // Closed here: the cut answer ends 91 bytes short.
            }
        });
        let api = Api::build(&format!("http://{addr}"), None, None).expect("client");
        let e = api.get("/cut").await.expect_err("cut short");
        assert!(format!("{e:#}").contains("cannot reach"), "{e:#}");
        let e = api.get("/text").await.expect_err("not JSON");
        assert!(format!("{e:#}").contains("is not JSON"), "{e:#}");
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
            assert!(said.contains("409"), "{said}");
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

    #[test]
    fn an_empty_token_is_said_to_be_empty_not_to_hold_spaces() {
        for raw in ["", " \n"] {
            let e = token_of(raw, TOKEN_ENV).expect_err("empty");
            assert!(e.to_string().starts_with("TETHER_TOKEN is empty"), "{e}");
        }
        let e = token_of("a b", TOKEN_ENV).expect_err("two words");
        assert!(e.to_string().contains("one line without spaces"), "{e}");
        assert_eq!(token_of(" s3cret\n", TOKEN_ENV).expect("a token"), "s3cret");
    }

    /// A proxy from the environment (here given to the builder, as reqwest would take it from
    /// HTTP_PROXY) is not used for a coordinator on this machine, and is for one elsewhere.
    #[tokio::test]
    async fn a_coordinator_on_loopback_is_reached_directly_whatever_the_proxy() {
        let serve = serve_for_test;
        let coordinator = serve(axum::Router::new().route(
            "/up",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"from": "coordinator"})) }),
        ))
        .await;
        // A proxy that answers every request itself.
        let proxy = serve(
            axum::Router::new()
                .fallback(|| async { axum::Json(serde_json::json!({"from": "proxy"})) }),
        )
        .await;
        let proxied = || {
            let p = reqwest::Proxy::all(format!("http://{proxy}")).expect("proxy");
            reqwest::Client::builder().proxy(p)
        };
        for url in [
            format!("http://{coordinator}"),
            format!("http://localhost:{}", coordinator.port()),
        ] {
            let api = Api::build_with(&url, None, None, proxied()).expect("client");
            let got = api.get("/up").await.expect("answered");
            assert_eq!(got, serde_json::json!({"from": "coordinator"}), "{url}");
        }
        let far = Api::build_with("http://coordinator.invalid:8765", None, None, proxied())
            .expect("client");
        let got = far.get("/up").await.expect("answered by the proxy");
        assert_eq!(got, serde_json::json!({"from": "proxy"}));
        for (url, local) in [
            ("http://localhost:8765", true),
            ("http://LOCALHOST:8765", true),
            ("http://127.0.0.2:8765", true),
            ("http://[::1]:8765", true),
            ("http://10.0.0.1:8765", false),
            ("http://localhost.example.com:8765", false),
            ("http://[::2]:8765", false),
        ] {
            assert_eq!(is_loopback(url), local, "{url}");
        }
    }
}
