//! Client commands: talk to the coordinator's HTTP API; human tables by default, `--json` for
//! machines.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::output::outln;
use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use tether_coordinator::auth::token_lines;
use tether_proto::TaskSpec;

mod commands;
mod runs;
mod table;

pub use commands::{
    CheckpointArgs, ControlArgs, DrainArgs, RetryArgs, SubmitArgs, TaskArgs, TasksArgs,
    UndrainArgs, checkpoint, control, drain, retry, submit, task, tasks, undrain, workers,
};
pub(crate) use commands::{away_lines, parse_name};
pub(crate) use runs::latest_tries_named;
pub use runs::{ReportArgs, RunsArgs, report, runs};
pub(crate) use table::shown;

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
            // Both given: which one is sent must not be a guess (the worker says the same of
            // its secrets).
            if std::env::var_os(TOKEN_ENV).is_some_and(|t| !t.is_empty()) {
                tracing::warn!(file = %f.display(), "both a token file (--token-file or TETHER_TOKEN_FILE) and {TOKEN_ENV} are set: the file's token is sent, {TOKEN_ENV} is passed over");
            }
            // Bytes, not text: a byte no header carries is named by its column, as the
            // coordinator names it in its own files.
            let raw = tether_coordinator::auth::read_token_file(f)
                .with_context(|| format!("token file {}", f.display()))?;
            (raw, format!("the token file {}", f.display()))
        }
        None => match std::env::var_os(TOKEN_ENV) {
            Some(t) => {
                use std::os::unix::ffi::OsStringExt;
                (t.into_vec(), TOKEN_ENV.to_owned())
            }
            None => return Ok(None),
        },
    };
    token_of(&raw, &source).map(Some)
}

/// The token `raw` holds (read from `source`), or why it holds none. Its lines are read by the
/// coordinator's own rule ([`token_lines`]: blank lines and `#` comment lines skipped, 16 to
/// 4096 bytes of visible ASCII, spaces inside too), so a token the coordinator takes from its
/// files is one the client sends, and one it would refuse is refused here, in its words,
/// before any request: sent, it could only be answered "unknown token". An empty one is said
/// to be empty (an exported `TETHER_TOKEN=`). One with several tokens (a coordinator's file in
/// a rotation) is refused, not read for its first: a client sends one token, and the first of
/// a rotation is as likely the one being retired, which would work until the day it is
/// removed.
fn token_of(raw: &[u8], source: &str) -> anyhow::Result<String> {
    if raw.trim_ascii().is_empty() {
        bail!("{source} is empty: give the API token there, or unset it to send none");
    }
    let mut tokens = Vec::new();
    for (line, token) in token_lines(raw) {
        match token {
            Ok(token) => tokens.push((line, token)),
            Err(why) => bail!("the API token on line {line} of {source} is not usable: {why}"),
        }
    }
    match tokens[..] {
        [] => bail!(
            "{source} holds only # comments, no token: give the API token there, on a line of \
             its own"
        ),
        // Visible ASCII, so text as it is.
        [(_, token)] => Ok(String::from_utf8_lossy(token).into_owned()),
        ref several => {
            let lines: Vec<String> = several.iter().map(|(i, _)| i.to_string()).collect();
            bail!(
                "{source} holds {} tokens (lines {}); a client sends one: give a file (or \
                 TETHER_TOKEN) with only the one to use",
                several.len(),
                lines.join(", ")
            )
        }
    }
}

pub(crate) struct Api {
    base: String,
    transport: Transport,
    /// Whether requests carry an API token: a refusal of the token is told apart from one
    /// for the lack of it.
    sends_token: bool,
}

/// Plain HTTP through reqwest (built without TLS); `https://` through hyper with the same rustls
/// verification as the worker's (the CA of `--ca-file`, or the system's roots).
enum Transport {
    Plain(reqwest::Client),
    Tls {
        client: HttpsClient,
        auth: Option<reqwest::header::HeaderValue>,
        /// Whether the CA came from `--ca-file` (else the system's roots).
        ca_given: bool,
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
    /// The coordinator's `error.code`, when its answer had one.
    code: Option<String>,
}

impl Refused {
    pub(crate) fn of(status: http::StatusCode, body: &Value) -> Self {
        let said = body["error"]["message"].as_str();
        let message = match said {
            // The coordinator's own words name its limit; others (axum's "Failed to buffer the
            // request body: length limit exceeded", a proxy's page) say nothing to act on.
            Some(m) if body["error"]["code"] == "too_large" => m,
            _ if status == http::StatusCode::PAYLOAD_TOO_LARGE => TOO_LARGE,
            Some(m) => m,
            // The HTTP server's own (a target past hyper's bound) or a proxy's, without words.
            None if status == http::StatusCode::URI_TOO_LONG => TOO_LONG,
            None => "request failed",
        };
        Refused {
            status: status.as_u16(),
            message: message.to_owned(),
            code: body["error"]["code"].as_str().map(str::to_owned),
        }
    }
}

/// What an answer 413 without the coordinator's own words is said as.
const TOO_LARGE: &str =
    "the request is larger than the coordinator accepts (the limit is its --max-body)";
/// What an answer 414 without the coordinator's own words is said as.
const TOO_LONG: &str = "the request's URL (path and query) is longer than the coordinator, or \
     a proxy before it, reads";

impl Refused {
    /// Whether the coordinator refused the request as larger than it accepts (HTTP 413).
    pub(crate) fn too_large(&self) -> bool {
        self.status == http::StatusCode::PAYLOAD_TOO_LARGE.as_u16()
    }

    /// Whether the coordinator refused a submission whole as more than it takes at once: too
    /// large a body (HTTP 413), or more tasks than one request may carry (HTTP 422
    /// `too_many`): in fewer parts, the same tasks may be taken.
    pub(crate) fn too_many(&self) -> bool {
        self.too_large()
            || (self.status == http::StatusCode::UNPROCESSABLE_ENTITY.as_u16()
                && self.code.as_deref() == Some("too_many"))
    }

    /// This refusal, told how a client command gives a token when it refused the request's
    /// token (see [`token_hint`]); the coordinator's words cannot know the client's flags.
    fn with_token_hint(mut self, asks_for_bearer: bool, sent_token: bool) -> Self {
        if let Some(hint) = token_hint(self.status, asks_for_bearer, sent_token) {
            self.message = format!("{}; {hint}", self.message);
        }
        self
    }
}

/// What a client command is told when the coordinator refused the request's token: an answer
/// 401 (no token, or one it does not know), or 403 asking for a bearer token (a read-only
/// token on a command, a metrics token on anything but `/metrics`; the coordinator's other 403s, to a browser's page, ask for none), with
/// whether the request `sent_token`.
fn token_hint(status: u16, asks_for_bearer: bool, sent_token: bool) -> Option<&'static str> {
    match (status, sent_token) {
        (401, false) => Some(
            "give the API token with --token-file FILE (or TETHER_TOKEN_FILE=FILE), or the \
             token itself in TETHER_TOKEN",
        ),
        (401, true) => Some(
            "the token given (--token-file, TETHER_TOKEN_FILE or TETHER_TOKEN) is not one this \
             coordinator accepts",
        ),
        (403, true) if asks_for_bearer => Some(
            "the token given (--token-file, TETHER_TOKEN_FILE or TETHER_TOKEN) has a narrower \
             scope than this request needs (a read token may only read, a metrics token only \
             scrape /metrics): give one of the scope named",
        ),
        _ => None,
    }
}

/// Whether an answer asks for a bearer token (`WWW-Authenticate: Bearer`), as the
/// coordinator's refusals of a request's token do.
fn asks_for_bearer(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.trim_start()
                .get(..6)
                .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
        })
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

/// A TLS request that reached no coordinator: said so, with a hint ([`tls_hint`]) when the
/// cause says what to do.
fn unreachable_tls(base: &str, ca_given: bool, e: impl Into<anyhow::Error>) -> anyhow::Error {
    let e = e.into();
    let hint = tls_hint(&format!("{e:#}"), ca_given);
    e.context(format!("cannot reach the coordinator at {base}{hint}"))
}

/// What a failed TLS connection, whose causes are `said`, is told besides: when what answered
/// is no TLS server (rustls reads a plain HTTP answer as "corrupt message of type
/// InvalidContentType"), a coordinator serving plain HTTP asked through an https:// URL; when
/// its certificate's chain is unknown (`UnknownIssuer`), the CA to give, or that the one given
/// (`ca_given`) did not sign it; so too when the CA given has the name of the one that signed it
/// but not its key (`BadSignature`: two CAs made with one tool's default name).
fn tls_hint(said: &str, ca_given: bool) -> &'static str {
    let not_its_ca = said.contains("UnknownIssuer") || (ca_given && said.contains("BadSignature"));
    if said.contains("InvalidContentType") {
        " (what answered speaks no TLS: if the coordinator serves plain HTTP, use an http:// URL)"
    } else if !not_its_ca {
        ""
    } else if ca_given {
        " (its certificate is not signed by the CA of --ca-file (TETHER_CA_FILE): give the CA \
         that signed it)"
    } else {
        " (its certificate is not signed by a CA this system trusts: give the PEM file of the \
         CA that signed it with --ca-file (or TETHER_CA_FILE))"
    }
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
        let sends_token = token.is_some();
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
            let tls = tether_worker::connector::tls_client_config(ca_file).map_err(|e| match e {
                tether_worker::connector::TlsSetupError::NoRoots => anyhow::anyhow!(
                    "this system has no trusted root certificates to verify {base} by: give the \
                     PEM file of the CA that signed its certificate with --ca-file (or \
                     TETHER_CA_FILE)"
                ),
                e => anyhow::anyhow!("{e}"),
            })?;
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
            Transport::Tls {
                client,
                auth,
                ca_given: ca_file.is_some(),
            }
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
        Ok(Self {
            base,
            transport,
            sends_token,
        })
    }

    /// `method` on `path`, with `body` (JSON text) when given.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&bytes::Bytes>,
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
                        req = req
                            .header(http::header::CONTENT_TYPE, "application/json")
                            .body(b.clone());
                    }
                    let resp = req.send().await.map_err(|e| {
                        let connecting = e.is_connect();
                        lost(e.into(), connecting)
                    })?;
                    let status = resp.status();
                    let bearer = asks_for_bearer(resp.headers());
                    let bytes = resp.bytes().await.map_err(|e| lost(e.into(), false))?;
                    anyhow::Ok((status, bearer, bytes))
                }
                Transport::Tls {
                    client,
                    auth,
                    ca_given,
                } => {
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
                            b.clone()
                        }
                        None => bytes::Bytes::new(),
                    };
                    let req = req
                        .body(http_body_util::Full::new(payload))
                        .context("request")?;
                    let resp = client.request(req).await.map_err(|e| {
                        match once_sent && !e.is_connect() {
                            true => anyhow::Error::new(e).context(no_answer()),
                            false => unreachable_tls(&self.base, *ca_given, e),
                        }
                    })?;
                    let status = resp.status();
                    let bearer = asks_for_bearer(resp.headers());
                    let bytes = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| lost(e.into(), false))?
                        .to_bytes();
                    Ok((status, bearer, bytes))
                }
            }
        };
        let (status, bearer, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
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
            return Err(self.refused(status, bearer, &bytes));
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the coordinator's answer to {path} is not JSON ({} bytes)",
                bytes.len()
            )
        })
    }

    /// The error of an answer `status` with `body` (the API's `{"error": ...}`, or whatever a
    /// proxy in between said), `bearer` if it asks for a bearer token.
    fn refused(&self, status: http::StatusCode, bearer: bool, body: &[u8]) -> anyhow::Error {
        let v = serde_json::from_slice(body).unwrap_or(Value::Null);
        Refused::of(status, &v)
            .with_token_hint(bearer, self.sends_token)
            .into()
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
        match &self.transport {
            Transport::Plain(http) => {
                let resp = http.get(&url).send().await.with_context(unreachable)?;
                let status = resp.status();
                if !status.is_success() {
                    let bearer = asks_for_bearer(resp.headers());
                    let body = resp.bytes().await.unwrap_or_default();
                    return Err(self.refused(status, bearer, &body));
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
            Transport::Tls {
                client,
                auth,
                ca_given,
            } => {
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
                    .map_err(|e| unreachable_tls(&self.base, *ca_given, e))?;
                let status = resp.status();
                if !status.is_success() {
                    let bearer = asks_for_bearer(resp.headers());
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    return Err(self.refused(status, bearer, &body));
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
        body: Option<&bytes::Bytes>,
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
        let body = bytes::Bytes::from(serde_json::to_vec(body)?);
        self.post_text(path, body).await
    }

    /// [`Self::post`] of a body that is JSON text already (a user's file, sent as written, so
    /// that the coordinator's errors name its lines and columns).
    pub(crate) async fn post_text(&self, path: &str, body: bytes::Bytes) -> anyhow::Result<Value> {
        self.call_unless_busy(reqwest::Method::POST, path, Some(&body))
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

    /// The listing from the task after the one with `submit_seq` `seq` on (from the first
    /// with `None`): a reader that wants no task older than one it knows reads no more.
    pub(crate) fn after(mut self, seq: Option<u64>) -> Self {
        self.after = seq;
        self
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A 413 is said plainly: in the coordinator's own words when they are its (`too_large`,
    /// naming its limit), else (axum's "Failed to buffer the request body", a proxy's page)
    /// as larger than the coordinator accepts, its --max-body; other refusals as they came.
    #[test]
    fn an_answer_413_says_the_request_was_larger_than_the_coordinator_accepts() {
        let too_large = http::StatusCode::PAYLOAD_TOO_LARGE;
        let axum = serde_json::json!({"error": {"code": "bad_request",
            "message": "Failed to buffer the request body: length limit exceeded"}});
        for body in [axum, Value::Null, serde_json::json!("<html>")] {
            let r = Refused::of(too_large, &body);
            assert!(r.too_large());
            assert_eq!(r.to_string(), format!("{TOO_LARGE} (HTTP 413)"), "{body}");
        }
        let own = serde_json::json!({"error": {"code": "too_large", "message": "at most 9"}});
        assert_eq!(
            Refused::of(too_large, &own).to_string(),
            "at most 9 (HTTP 413)"
        );
        let other = serde_json::json!({"error": {"code": "conflict", "message": "exists"}});
        let r = Refused::of(http::StatusCode::CONFLICT, &other);
        assert!(!r.too_large());
        assert_eq!(r.to_string(), "exists (HTTP 409)");
    }

    /// A submission refused as more than one request takes (413, or the coordinator's 422 for
    /// too many tasks) may go in parts; one refused for its content may not.
    #[test]
    fn a_submission_refused_for_its_size_may_go_in_parts_and_one_refused_for_its_content_not() {
        let words = |code: &str, message: &str| serde_json::json!({"error": {"code": code, "message": message}});
        let unprocessable = http::StatusCode::UNPROCESSABLE_ENTITY;
        let many = words(
            "too_many",
            "more than 3 tasks in one request; at most 3 are accepted",
        );
        assert!(Refused::of(unprocessable, &many).too_many());
        assert!(Refused::of(http::StatusCode::PAYLOAD_TOO_LARGE, &Value::Null).too_many());
        let bad = words("invalid", "tasks[2].kind: unknown kind");
        assert!(!Refused::of(unprocessable, &bad).too_many());
        assert!(!Refused::of(http::StatusCode::CONFLICT, &many).too_many());
    }

    /// A 414 in the coordinator's words is said as it came; a bare one (hyper's own, past its
    /// bound, or a proxy's) says the URL was too long, not "request failed".
    #[test]
    fn an_answer_414_without_words_says_the_url_was_too_long() {
        let too_long = http::StatusCode::URI_TOO_LONG;
        for body in [Value::Null, serde_json::json!("<html>")] {
            let r = Refused::of(too_long, &body).to_string();
            assert_eq!(r, format!("{TOO_LONG} (HTTP 414)"), "{body}");
        }
        let own = serde_json::json!({"error": {"code": "uri_too_long", "message": "at most 9"}});
        assert_eq!(
            Refused::of(too_long, &own).to_string(),
            "at most 9 (HTTP 414)"
        );
        let bare = Refused::of(http::StatusCode::BAD_GATEWAY, &Value::Null).to_string();
        assert_eq!(bare, "request failed (HTTP 502)");
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

    #[test]
    fn an_empty_token_is_said_to_be_empty_not_to_hold_spaces() {
        for raw in ["", " \n"] {
            let e = token_of(raw.as_bytes(), TOKEN_ENV).expect_err("empty");
            assert!(e.to_string().starts_with("TETHER_TOKEN is empty"), "{e}");
        }
        let token = token_of(b" s3cret-of-the-client\n", TOKEN_ENV).expect("a token");
        assert_eq!(token, "s3cret-of-the-client");
    }

    /// A file in the coordinator's token format serves a client when it holds one token: its
    /// comments and blank lines are skipped; one of a rotation, with several, is refused
    /// saying so, not as a token with spaces.
    #[test]
    fn a_token_file_with_comments_gives_its_one_token_and_one_with_several_is_refused() {
        let file = "the token file t";
        let one = "# admin token, made 2026-12-01\n\n  s3cret-of-the-client  \r\n# end\n";
        let token = token_of(one.as_bytes(), file).expect("one token");
        assert_eq!(token, "s3cret-of-the-client");
        let rotation =
            "# rotation: new first, old until Friday\nnew-token-0123456789\nold-token-0123456789\n";
        let e = token_of(rotation.as_bytes(), file)
            .expect_err("two tokens")
            .to_string();
        assert_eq!(
            e,
            "the token file t holds 2 tokens (lines 2, 3); a client sends one: give a file (or \
             TETHER_TOKEN) with only the one to use"
        );
        let e = token_of(b"# nothing yet\n\n", file).expect_err("comments only");
        assert!(
            e.to_string()
                .starts_with("the token file t holds only # comments, no token"),
            "{e}"
        );
    }

    /// The client reads its token by the coordinator's rule: a line the coordinator takes
    /// from its token file (spaces or a tab inside, punctuation, 16 bytes, 4096) is the token
    /// the client sends, and the coordinator knows what it sends; a line the coordinator
    /// refuses (too short, too long, a byte no header carries) the client refuses too, in the
    /// coordinator's words. A space inside used to be refused by the client alone.
    #[test]
    fn a_token_the_coordinator_takes_the_client_sends_and_one_it_refuses_the_client_refuses() {
        use tether_coordinator::auth::{ApiTokens, Scope};
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        let longest = "t".repeat(tether_proto::auth::MAX_SECRET_LEN);
        let lines = [
            "with spaces inside it".to_owned(),
            "with\ttab inside-0123".to_owned(),
            "exactly-16-bytes".to_owned(),
            "  indented, and a CRLF-0123\r".to_owned(),
            longest.clone(),
            "fifteen-bytes!!".to_owned(),
            format!("{longest}t"),
            "prod-tökén-0123456789".to_owned(),
            "control\x7f-0123456789".to_owned(),
        ];
        let mut taken = 0;
        for line in &lines {
            let text = format!("# the admin token\n{line}\n");
            std::fs::write(&path, &text).expect("write");
            let mut tokens = ApiTokens::default();
            let coordinator = tokens.add_file(&path, Scope::Admin);
            let client = token_of(text.as_bytes(), "the token file t");
            match (coordinator, client) {
                (Ok(_), Ok(sent)) => {
                    taken += 1;
                    assert_eq!(tokens.scope_of(&sent), Some(Scope::Admin), "{line:?}");
                    let header = format!("Bearer {sent}");
                    assert!(
                        reqwest::header::HeaderValue::from_str(&header).is_ok(),
                        "{line:?}"
                    );
                }
                (Err(coordinator), Err(client)) => {
                    let (coordinator, client) = (coordinator.to_string(), client.to_string());
                    let why = coordinator
                        .strip_prefix("the token on line 2 is not usable: ")
                        .expect("the line's reason");
                    assert_eq!(
                        client,
                        format!("the API token on line 2 of the token file t is not usable: {why}")
                    );
                }
                (coordinator, client) => panic!("{line:?}: {coordinator:?} but {client:?}"),
            }
        }
        assert_eq!(taken, 5, "the lines the coordinator takes");
    }

    /// A refusal of the request's token says how a client command gives one; other refusals
    /// (a 403 to a browser's page, which asks for no bearer token; a 404) are as they came.
    #[test]
    fn a_refused_token_is_told_how_to_give_one() {
        let body = |m: &str| serde_json::json!({"error": {"code": "x", "message": m}});
        let told = |status: u16, bearer: bool, sent: bool| {
            let status = http::StatusCode::from_u16(status).expect("status");
            Refused::of(status, &body("said"))
                .with_token_hint(bearer, sent)
                .to_string()
        };
        assert_eq!(
            told(401, true, false),
            "said; give the API token with --token-file FILE (or TETHER_TOKEN_FILE=FILE), or \
             the token itself in TETHER_TOKEN (HTTP 401)"
        );
        // A 401 from something in between that asks for no bearer token: the same.
        assert_eq!(told(401, false, false), told(401, true, false));
        let unknown = told(401, true, true);
        assert!(
            unknown.contains("the token given (--token-file, TETHER_TOKEN_FILE or TETHER_TOKEN) is not one this coordinator accepts"),
            "{unknown}"
        );
        let read_only = told(403, true, true);
        assert!(
            read_only.contains("a read token may only read")
                && read_only.contains("give one of the scope named")
                && read_only.ends_with("(HTTP 403)"),
            "{read_only}"
        );
        assert_eq!(told(403, false, true), "said (HTTP 403)");
        assert_eq!(told(403, false, false), "said (HTTP 403)");
        assert_eq!(told(404, true, true), "said (HTTP 404)");
        let mut h = http::HeaderMap::new();
        assert!(!asks_for_bearer(&h));
        h.insert(
            http::header::WWW_AUTHENTICATE,
            "Basic realm=x".parse().expect("value"),
        );
        assert!(!asks_for_bearer(&h));
        h.append(
            http::header::WWW_AUTHENTICATE,
            "bearer".parse().expect("value"),
        );
        assert!(asks_for_bearer(&h));
    }

    /// A certificate whose chain is unknown names the flag that gives its CA, or says the CA
    /// given did not sign it; a plain HTTP answer says to use http://; other failures get no
    /// hint.
    #[test]
    fn an_unknown_issuer_names_the_ca_file() {
        let unknown = "client error (Connect): invalid peer certificate: UnknownIssuer";
        assert!(
            tls_hint(unknown, false).contains(
                "give the PEM file of the CA that signed it with --ca-file (or TETHER_CA_FILE)"
            ),
            "{}",
            tls_hint(unknown, false)
        );
        assert!(
            tls_hint(unknown, true).contains("not signed by the CA of --ca-file"),
            "{}",
            tls_hint(unknown, true)
        );
        let bad = "client error (Connect): invalid peer certificate: BadSignature";
        assert_eq!(tls_hint(bad, true), tls_hint(unknown, true));
        assert_eq!(tls_hint(bad, false), "");
        let plain = "received corrupt message of type InvalidContentType";
        assert!(tls_hint(plain, false).contains("use an http:// URL"));
        assert_eq!(tls_hint("Connection refused (os error 111)", false), "");
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
