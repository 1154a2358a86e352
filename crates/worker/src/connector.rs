//! How a worker reaches the coordinator: a TCP connector for real use, and any other transport
//! (in-memory pipes under paused time) for tests.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A byte stream a WebSocket can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The stream itself, as [`Any`](std::any::Any): a [`Metered`] over a stream that
    /// [`tls_handshake`] made finds the counts of the socket under its TLS by it.
    fn as_any(&self) -> &dyn std::any::Any;
}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The WebSocket a session owns.
pub type WsStream = WebSocketStream<Metered>;

/// The bytes read from a connection's socket and written to it so far. Shared: under TLS they
/// are counted on the socket, beneath the stream a session reads, and a session waiting in a
/// write (which borrows the stream) reads the count written meanwhile.
#[derive(Clone, Default)]
struct Counts {
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl Counts {
    fn read(&self, n: usize) {
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

/// A connection's byte stream, counting the bytes read from its socket and written to it: a
/// frame still arriving (a long one on a slow link) shows in the count read before it
/// completes, and a long frame still being written in the count written, which is how a
/// session tells a slow link from a silent one.
///
/// Over TLS (a stream [`tls_handshake`] made) the counts are those of the socket under it,
/// ciphertext as it comes and goes: TLS hands out plaintext only once a whole record (up to
/// 16 KiB) has come, so that below about 1.1 KB/s the first record of a long frame took longer
/// than a 15 s timeout to show, and a flush of what TLS holds moved nothing above it. Over any
/// other stream (plain TCP, a test's pipe) it counts what passes through it.
pub struct Metered {
    io: Pin<Box<dyn Io>>,
    counts: Counts,
    /// This stream counts (no socket under its TLS does).
    counting: bool,
}

impl Metered {
    pub fn new(io: Pin<Box<dyn Io>>) -> Self {
        let under_tls = io
            .as_ref()
            .get_ref()
            .as_any()
            .downcast_ref::<Tls>()
            .map(|tls| tls.get_ref().0.counts.clone());
        Self {
            io,
            counting: under_tls.is_none(),
            counts: under_tls.unwrap_or_default(),
        }
    }

    /// Bytes read from the connection's socket so far (under TLS: ciphertext, as it comes).
    pub fn bytes_read(&self) -> u64 {
        self.counts.read.load(Ordering::Relaxed)
    }

    /// The count of bytes written to the connection's socket so far (under TLS: ciphertext,
    /// as it goes), as it grows.
    pub fn written(&self) -> Arc<AtomicU64> {
        self.counts.written.clone()
    }
}

impl AsyncRead for Metered {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = this.io.as_mut().poll_read(cx, buf);
        if this.counting {
            this.counts.read(buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = this.io.as_mut().poll_write(cx, buf);
        if this.counting {
            this.counts.wrote(&r);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().io.as_mut().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = this.io.as_mut().poll_write_vectored(cx, bufs);
        if this.counting {
            this.counts.wrote(&r);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The TLS stream [`tls_handshake`] makes: over a socket that counts its bytes.
type Tls = tokio_rustls::client::TlsStream<Counted>;

/// A socket under TLS, counting the bytes read from it and written to it as they come and go
/// (for the [`Metered`] over its TLS stream).
struct Counted {
    tcp: tokio::net::TcpStream,
    counts: Counts,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        self.counts.read(buf.filled().len() - before);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.counts.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.counts.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// Worth retrying: refused, reset, timed out, 5xx, 429.
    #[error("{0}")]
    Transient(String),
    /// Retrying will not help: bad credentials, path refused, id taken by policy.
    #[error("coordinator refused this worker: {0}")]
    Refused(String),
    /// The coordinator's TLS certificate is not one this worker trusts: a misconfiguration
    /// (its CA changed, or the worker was given another), said loudly but retried, since the
    /// fix is on the coordinator's side or in the CA file, which is read again at each attempt.
    #[error("{0}")]
    Untrusted(String),
}

/// Opens a WebSocket to a URL.
pub trait Connector: Send + Sync + 'static {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>>;
}

/// TCP, plain for `ws://` or with TLS for `wss://` when built [`TcpConnector::with_tls`] or
/// [`TcpConnector::with_ca_file`].
#[derive(Clone, Default)]
pub struct TcpConnector {
    tls: Option<tokio_rustls::TlsConnector>,
    /// The CA file trusted, read again at each attempt: a new bundle pushed to it (the
    /// coordinator's CA rotated) is trusted from the next attempt on, without a restart.
    ca: Option<Arc<CaFile>>,
}

impl std::fmt::Debug for TcpConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConnector")
            .field("tls", &(self.tls.is_some() || self.ca.is_some()))
            .finish()
    }
}

/// A CA file and the TLS client made from its latest readable contents.
struct CaFile {
    path: PathBuf,
    /// The contents the client trusts, and the client: made again only when they change, so
    /// that the client's TLS session cache (resumption) survives the attempts in between.
    held: std::sync::Mutex<(Vec<u8>, tokio_rustls::TlsConnector)>,
}

impl CaFile {
    /// The client trusting the file's current contents. A file that cannot be read now, or
    /// holds no certificate (a bundle half written), leaves the last good client in use.
    async fn current(&self) -> tokio_rustls::TlsConnector {
        let read = tokio::fs::read(&self.path).await;
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let pem = match read {
            Ok(pem) if pem == held.0 => return held.1.clone(),
            Ok(pem) => pem,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot read the CA file; trusting what it held before");
                return held.1.clone();
            }
        };
        match config_from_pem(&self.path, &pem) {
            Ok(config) => {
                tracing::info!(file = %self.path.display(), "the CA file changed: trusting its certificates from this attempt on");
                *held = (pem, tokio_rustls::TlsConnector::from(config));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the CA file changed but cannot be used; trusting what it held before");
            }
        }
        held.1.clone()
    }
}

/// Why the TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("no trusted root certificates (give a CA file)")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Config(#[from] rustls::Error),
}

/// A rustls client configuration trusting the certificates of `ca_file`, or the system's roots.
pub fn tls_client_config(
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| TlsSetupError::CaFile {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            return config_from_pem(path, &pem);
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
    }
    config_trusting(roots)
}

/// A rustls client configuration trusting the certificates of `pem`, the contents of the CA
/// file `path`.
fn config_from_pem(path: &Path, pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |reason: String| TlsSetupError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate in it (a PEM file of CERTIFICATE blocks)".into(),
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    config_trusting(roots)
}

fn config_trusting(
    roots: rustls::RootCertStore,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    if roots.is_empty() {
        return Err(TlsSetupError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl TcpConnector {
    /// A connector that speaks TLS to `wss://` URLs.
    pub fn with_tls(config: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls: Some(tokio_rustls::TlsConnector::from(config)),
            ca: None,
        }
    }

    /// A connector that speaks TLS to `wss://` URLs trusting the CA file `path`, read now
    /// (an unusable one is an error) and again at each attempt.
    pub fn with_ca_file(path: &Path) -> Result<Self, TlsSetupError> {
        let pem = std::fs::read(path).map_err(|e| TlsSetupError::CaFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let config = config_from_pem(path, &pem)?;
        Ok(Self {
            tls: None,
            ca: Some(Arc::new(CaFile {
                path: path.to_owned(),
                held: std::sync::Mutex::new((pem, tokio_rustls::TlsConnector::from(config))),
            })),
        })
    }
}

impl Connector for TcpConnector {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        let (tls, ca) = (self.tls.clone(), self.ca.clone());
        Box::pin(async move {
            let parsed = url::Url::parse(&url)
                .map_err(|e| ConnectError::Refused(format!("bad url {url}: {e}")))?;
            let tls = match ca {
                Some(ca) if parsed.scheme() == "wss" => Some(ca.current().await),
                _ => tls,
            };
            let tls = match (parsed.scheme(), tls) {
                ("ws", _) => None,
                ("wss", Some(tls)) => Some(tls),
                (scheme, _) => {
                    return Err(ConnectError::Refused(format!(
                        "scheme {scheme} is not set up in this connector"
                    )));
                }
            };
            // An IPv6 address without its URL brackets: with them it is looked up as a name,
            // which fails at every attempt (and reads as a passing DNS failure).
            let host = match parsed.host() {
                Some(url::Host::Ipv6(addr)) => addr.to_string(),
                Some(host) => host.to_string(),
                None => String::new(),
            };
            let port = parsed.port_or_known_default().unwrap_or(80);
            let tcp = connect_tcp(&host, port)
                .await
                .map_err(|e| ConnectError::Transient(format!("connect {host}:{port}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let io: Pin<Box<dyn Io>> = match tls {
                None => Box::pin(tcp),
                Some(tls) => tls_handshake(&tls, &host, port, tcp).await?,
            };
            handshake(url, io, config).await
        })
    }
}

/// How long a connection attempt to one of a host's addresses goes unanswered before the next
/// address is tried beside it (RFC 8305's connection attempt delay).
pub const NEXT_ADDRESS_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// Connects to `host`: each of its addresses in turn, the next one started once the one
/// before it failed or went [`NEXT_ADDRESS_AFTER`] unanswered, the first to connect taken.
/// Tried strictly one after another, an address whose packets are dropped (an IPv6 route
/// that swallows them) took the whole attempt's time and the working one was never reached.
async fn connect_tcp(host: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    connect_any(addrs, NEXT_ADDRESS_AFTER).await
}

async fn connect_any(
    addrs: Vec<std::net::SocketAddr>,
    stagger: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    use futures_util::StreamExt;
    let mut rest = addrs.into_iter();
    let mut racing = futures_util::stream::FuturesUnordered::new();
    let mut failed = None;
    loop {
        if racing.is_empty() {
            match rest.next() {
                Some(addr) => racing.push(tokio::net::TcpStream::connect(addr)),
                None => {
                    return Err(failed.unwrap_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                    }));
                }
            }
        }
        tokio::select! {
            Some(connected) = racing.next() => match connected {
                Ok(tcp) => return Ok(tcp),
                // The next address at once (or, with none left, the others racing).
                Err(e) => {
                    failed = Some(e);
                    if let Some(addr) = rest.next() {
                        racing.push(tokio::net::TcpStream::connect(addr));
                    }
                }
            },
            () = tokio::time::sleep(stagger), if rest.len() > 0 => {
                if let Some(addr) = rest.next() {
                    racing.push(tokio::net::TcpStream::connect(addr));
                }
            }
        }
    }
}

/// Runs the TLS client handshake over `tcp` with `host` (a DNS name or an IP address), and
/// classifies a failure: a certificate this client does not trust is [`ConnectError::Untrusted`]; one
/// outside its validity period (see `out_of_date`) and anything else (a reset, a timeout, a
/// record damaged on the wire) may pass on a retry.
///
/// The stream counts the bytes on `tcp`, ciphertext, for the [`Metered`] that [`handshake`]
/// puts over it; a wrapper between the two hides that count, and the plaintext is counted.
pub async fn tls_handshake(
    tls: &tokio_rustls::TlsConnector,
    host: &str,
    port: u16,
    tcp: tokio::net::TcpStream,
) -> Result<Pin<Box<dyn Io>>, ConnectError> {
    let name = rustls::pki_types::ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
    .map_err(|e| ConnectError::Refused(format!("TLS server name {host}: {e}")))?;
    let tcp = Counted {
        tcp,
        counts: Counts::default(),
    };
    let stream: Tls = tls.connect(name, tcp).await.map_err(|e| {
        let cause = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(dated) = cause.and_then(out_of_date) {
            return ConnectError::Transient(format!("TLS with {host}:{port}: {dated}"));
        }
        let untrusted = cause.is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
            )
        });
        if untrusted {
            let hint = cause.and_then(untrusted_hint).unwrap_or_default();
            ConnectError::Untrusted(format!("TLS with {host}:{port}: {e}{hint}"))
        } else if cause.is_some_and(answered_in_plain_text) {
            ConnectError::Transient(format!(
                "TLS with {host}:{port}: {e} (the coordinator at {host}:{port} answered in plain \
                 text: it does not serve TLS; give an http:// or ws:// URL, or start it with \
                 --tls-cert and --tls-key; retrying)"
            ))
        } else {
            ConnectError::Transient(format!("TLS with {host}:{port}: {e}"))
        }
    })?;
    Ok(Box::pin(stream))
}

/// What to add to a certificate refused as not signed by an authority this worker trusts: the
/// usual cause is a worker not given the coordinator's CA (a certificate of `tether cert`, or
/// of a private authority, is in no system's roots: `UnknownIssuer`), or given another CA of
/// the same name (`tether cert --force` made a new one: `BadSignature`).
fn untrusted_hint(e: &rustls::Error) -> Option<&'static str> {
    use rustls::CertificateError as C;
    matches!(
        e,
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)
    )
    .then_some(
        " (the coordinator's certificate is not signed by a CA this worker trusts: give the \
         CA that signed it with --ca-file or TETHER_CA_FILE)",
    )
}

/// Whether a TLS handshake failed on an answer that is no TLS record at all: what a coordinator
/// serving plain WebSocket sends to a `wss://` attempt (its HTTP 400 to the ClientHello, whose
/// first byte is no record type). Retried all the same: the coordinator may be restarted with
/// TLS on, and a proxy starting up may answer so for a moment; the reason says what to change.
fn answered_in_plain_text(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
    )
}

/// What to say of a certificate refused for its dates alone: expired, or not valid yet. That
/// is no verdict on whom the coordinator is, and passes without a change here: the
/// coordinator's renewed certificate (it takes one up without a restart), or this machine's
/// clock set right (a worker booted before its clock was synchronised). Refused for good, a
/// lapsed renewal stopped the whole fleet within seconds.
fn out_of_date(e: &rustls::Error) -> Option<String> {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(c) = e else {
        return None;
    };
    let check = "check the coordinator's certificate renewal and the clocks of both machines; \
                 retrying";
    match c {
        C::Expired => Some(format!(
            "the coordinator's certificate has expired: {check}"
        )),
        C::ExpiredContext { time, not_after } => Some(format!(
            "the coordinator's certificate expired at {}, and it is {} here: {check}",
            unix_time(not_after),
            unix_time(time)
        )),
        C::NotValidYet => Some(format!(
            "the coordinator's certificate is not valid yet: {check}"
        )),
        C::NotValidYetContext { time, not_before } => Some(format!(
            "the coordinator's certificate is not valid before {}, and it is {} here: {check}",
            unix_time(not_before),
            unix_time(time)
        )),
        _ => None,
    }
}

/// A certificate time, as RFC 3339.
fn unix_time(t: &rustls::pki_types::UnixTime) -> String {
    i64::try_from(t.as_secs())
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(|| format!("{}s", t.as_secs()), |d| d.to_rfc3339())
}

/// Runs the WebSocket client handshake over any byte stream and classifies failures.
pub async fn handshake(
    url: String,
    io: Pin<Box<dyn Io>>,
    config: WebSocketConfig,
) -> Result<WsStream, ConnectError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let io = Metered::new(io);
    match tokio_tungstenite::client_async_with_config(url.as_str(), io, Some(config)).await {
        Ok((ws, _resp)) => Ok(ws),
        Err(WsError::Http(resp)) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let msg = format!("HTTP {status} at upgrade: {}", body.trim());
            if is_refusal(status.as_u16()) {
                Err(ConnectError::Refused(msg))
            } else {
                Err(ConnectError::Transient(msg))
            }
        }
        Err(e) => Err(ConnectError::Transient(format!(
            "handshake: {e}{}",
            plain_to_tls_hint(&url, &e)
        ))),
    }
}

/// What to add to a plain (`ws://`) attempt's handshake that read no HTTP answer: a coordinator
/// serving TLS answers the upgrade request with a TLS alert (its handshake fails on the
/// request's first byte), which reads as "invalid HTTP version" and says nothing of TLS (the
/// CLI's client says the same of an `http://` URL). Retried all the same, as a plain answer
/// to a `wss://` attempt is ([`answered_in_plain_text`]).
fn plain_to_tls_hint(url: &str, e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    let Ok(parsed) = url::Url::parse(url) else {
        return String::new();
    };
    if parsed.scheme() != "ws" || !matches!(e, WsError::Protocol(ProtocolError::HttparseError(_))) {
        return String::new();
    }
    let host = parsed.host_str().unwrap_or_default();
    let port = parsed.port_or_known_default().unwrap_or(80);
    format!(
        " (the coordinator at {host}:{port} answered with TLS: give an https:// or wss:// URL, \
         with --ca-file or TETHER_CA_FILE naming the CA that signed its certificate unless the \
         system's roots hold it; retrying)"
    )
}

/// Whether an HTTP answer to the upgrade means "never": 401 or 403 only. Anything else may
/// pass and is retried with backoff: a 400 or 404 for a request damaged on the wire (even the
/// coordinator's own structured answer, since the damaged bytes may be the worker id or the
/// path), a proxy's answer while it restarts, a rate limit. A misconfigured URL shows as the
/// same failure logged at every attempt.
fn is_refusal(status: u16) -> bool {
    matches!(status, 401 | 403)
}

/// WebSocket limits for a worker.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::is_refusal;

    /// A CA file with no certificate in it is named, not taken for "no CA file given".
    #[test]
    fn a_ca_file_without_a_certificate_is_said_to_hold_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("hostname");
        std::fs::write(&f, "build-host\n").expect("write");
        let e = super::tls_client_config(Some(&f)).expect_err("no certificate");
        let said = e.to_string();
        assert!(
            said.contains("hostname") && said.contains("no certificate in it"),
            "{said}"
        );
    }

    /// A coordinator at an IPv6 address (`ws://[::1]:port`) is connected to: the address
    /// went to the resolver with its brackets, and every attempt failed as a lookup.
    #[tokio::test]
    async fn a_coordinator_at_an_ipv6_address_is_reached() {
        use super::Connector;
        let Ok(listener) = tokio::net::TcpListener::bind("[::1]:0").await else {
            eprintln!("no IPv6 loopback here; nothing to test");
            return;
        };
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            tokio_tungstenite::accept_async(tcp).await.map(|_| ())
        });
        let url = format!("ws://[::1]:{port}/api/v1/worker/w/ws");
        let connected = super::TcpConnector::default()
            .connect(url, super::ws_config(1 << 20))
            .await;
        assert!(connected.is_ok(), "{:?}", connected.err());
        server.await.expect("server").expect("handshake");
    }

    /// A host with an address that swallows connection attempts (a full listen queue on
    /// loopback drops SYNs, as a broken route does) before one that answers: the answering
    /// one is reached within a moment, not after the attempt's whole time.
    #[tokio::test]
    async fn an_address_that_does_not_answer_does_not_keep_the_next_one_from_being_tried() {
        let silent = tokio::net::TcpSocket::new_v4().expect("socket");
        silent
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let silent = silent.listen(1).expect("listen");
        let silent_addr = silent.local_addr().expect("addr");
        // Fill its queue (never accepted): further SYNs are dropped.
        let mut held = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(
                std::time::Duration::from_millis(200),
                tokio::net::TcpStream::connect(silent_addr),
            )
            .await
            {
                Ok(Ok(s)) => held.push(s),
                _ => break,
            }
        }
        let answering = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let good = answering.local_addr().expect("addr");
        let started = std::time::Instant::now();
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            super::connect_any(vec![silent_addr, good], super::NEXT_ADDRESS_AFTER),
        )
        .await
        .expect("reached within 5 s")
        .expect("connected");
        assert_eq!(tcp.peer_addr().expect("peer"), good);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Addresses that all refuse: the last refusal is said.
        drop(answering);
        let e = super::connect_any(vec![good], super::NEXT_ADDRESS_AFTER)
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        drop((held, silent));
    }

    /// A certificate authority named `ca`, and a certificate for localhost it signed, valid
    /// from `not_before` to `not_after` (year, month, day).
    struct Signed {
        ca: rustls::pki_types::CertificateDer<'static>,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    }

    fn signed(ca: &str, not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Signed {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, date_time_ymd,
        };
        let name = ca;
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("sign");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let mut leaf = CertificateParams::new(vec!["localhost".into()]).expect("params");
        leaf.not_before = date_time_ymd(not_before.0, not_before.1, not_before.2);
        leaf.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
        let cert = leaf.signed_by(&key, &issuer).expect("sign");
        Signed {
            ca: ca_cert.der().clone(),
            chain: vec![cert.der().clone(), ca_cert.der().clone()],
            key: rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }

    /// A server presenting `served`, and a client trusting `trusted`.
    fn tls_configs(
        served: Signed,
        trusted: rustls::pki_types::CertificateDer<'static>,
    ) -> (rustls::ServerConfig, tokio_rustls::TlsConnector) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(served.chain, served.key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, tokio_rustls::TlsConnector::from(Arc::new(client)))
    }

    /// A TLS server on a free loopback port that takes one connection and its handshake
    /// (which fails once the client gives up on the certificate, or is answered with an alert
    /// where the client sent a plain request): its port and its task.
    async fn serving_once(server: rustls::ServerConfig) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let serving = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let _ = acceptor.accept(tcp).await;
        });
        (port, serving)
    }

    /// The TLS handshake of a client trusting `trusted` with a server presenting `served`.
    async fn handshake_with(
        served: Signed,
        trusted: rustls::pki_types::CertificateDer<'static>,
    ) -> Result<(), super::ConnectError> {
        let (server, connector) = tls_configs(served, trusted);
        let (port, serving) = serving_once(server).await;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let r = super::tls_handshake(&connector, "localhost", port, tcp)
            .await
            .map(|_| ());
        serving.await.expect("server");
        r
    }

    /// A client's stream as [`super::tls_handshake`] makes it, under the [`super::Metered`]
    /// a session reads, and the server's end, over a socket that counts its bytes too. The
    /// server sends no session ticket: after the handshake, only what a test writes comes.
    async fn tls_pair() -> (
        super::Metered,
        tokio_rustls::server::TlsStream<super::Counted>,
    ) {
        let served = signed("ca", (2020, 1, 1), (4000, 1, 1));
        let ca = served.ca.clone();
        let (mut server, connector) = tls_configs(served, ca);
        server.send_tls13_tickets = 0;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (dialed, accepted) = tokio::join!(
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
            listener.accept()
        );
        let accepted = super::Counted {
            tcp: accepted.expect("accept").0,
            counts: Default::default(),
        };
        let (c, s) = tokio::join!(
            super::tls_handshake(&connector, "localhost", port, dialed.expect("connect")),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(accepted),
        );
        let c = c.expect("client handshake");
        (super::Metered::new(c), s.expect("server handshake"))
    }

    /// Over TLS, a session's counts are those of its socket (ciphertext, the handshake's
    /// too): the count read is what the peer's socket wrote, the count written what it read,
    /// both more than the plaintext carried.
    #[tokio::test]
    async fn under_tls_the_bytes_counted_are_those_on_the_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const SENT: usize = 100 * 1024;
        let (mut c, mut s) = tls_pair().await;
        let server = s.get_ref().0.counts.clone();
        let (echoed, back) = tokio::join!(
            async {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.expect("server read");
                s.write_all(&got).await.expect("server write");
                s.shutdown().await.expect("server shutdown");
                got.len()
            },
            async {
                c.write_all(&[7; SENT]).await.expect("client write");
                c.shutdown().await.expect("client shutdown");
                let mut back = Vec::new();
                c.read_to_end(&mut back).await.expect("client read");
                back.len()
            },
        );
        assert_eq!((echoed, back), (SENT, SENT));
        let written = c.written().load(Ordering::Relaxed);
        assert_eq!(c.bytes_read(), server.written.load(Ordering::Relaxed));
        assert_eq!(written, server.read.load(Ordering::Relaxed));
        assert!(c.bytes_read() > SENT as u64, "{}", c.bytes_read());
        assert!(written > SENT as u64, "{written}");
    }

    /// A TLS record still arriving shows in the count read as its bytes come, before any of
    /// it can be decrypted: the frame it carries is arriving. Counted after TLS, nothing moved
    /// until the record was whole (16 KiB: 15 s at 1.1 KB/s, a whole heartbeat timeout).
    #[tokio::test]
    async fn a_tls_record_still_arriving_shows_in_the_count_read() {
        use std::io::Write;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const RECORD: usize = 12 * 1024;
        const PART: usize = 1000;
        let (mut c, s) = tls_pair().await;
        let (mut tcp, mut tls) = s.into_inner();
        tls.writer().write_all(&[7; RECORD]).expect("plaintext");
        let mut wire = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut wire).expect("ciphertext");
        }
        assert!(wire.len() > RECORD, "one record: {}", wire.len());
        let before = c.bytes_read();
        tcp.write_all(&wire[..PART]).await.expect("write");
        let mut buf = vec![0; RECORD];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while c.bytes_read() - before < PART as u64 && std::time::Instant::now() < deadline {
            let read =
                tokio::time::timeout(std::time::Duration::from_millis(50), c.read(&mut buf)).await;
            assert!(read.is_err(), "plaintext of a record not whole: {read:?}");
        }
        assert_eq!(c.bytes_read() - before, PART as u64, "counted as it came");
        tcp.write_all(&wire[PART..]).await.expect("write");
        c.read_exact(&mut buf).await.expect("the record");
        assert_eq!(buf, [7; RECORD]);
        assert_eq!(c.bytes_read() - before, wire.len() as u64);
    }

    /// A certificate refused for its dates (expired: a renewal that lapsed; not valid yet: a
    /// worker booted before its clock was set) is retried, saying what to check: the
    /// coordinator takes up a renewed certificate without a restart. One from an authority
    /// the worker does not trust is said to be untrusted (retried by the agent, loudly).
    #[tokio::test]
    async fn a_certificate_out_of_date_is_retried_and_an_untrusted_one_said_untrusted() {
        use super::ConnectError;
        let expired = signed("ca", (2020, 1, 1), (2021, 1, 1));
        let ca = expired.ca.clone();
        match handshake_with(expired, ca).await {
            Err(ConnectError::Transient(said)) => assert!(
                said.contains("expired at 2021-01-01") && said.contains("clocks"),
                "{said}"
            ),
            other => panic!("an expired certificate: {other:?}"),
        }
        let early = signed("ca", (2090, 1, 1), (2091, 1, 1));
        let ca = early.ca.clone();
        match handshake_with(early, ca).await {
            Err(ConnectError::Transient(said)) => assert!(
                said.contains("not valid before 2090-01-01") && said.contains("renewal"),
                "{said}"
            ),
            other => panic!("a certificate not valid yet: {other:?}"),
        }
        let stranger = signed("stranger", (2020, 1, 1), (4000, 1, 1));
        let other_ca = signed("ca", (2020, 1, 1), (4000, 1, 1)).ca;
        match handshake_with(stranger, other_ca).await {
            Err(ConnectError::Untrusted(said)) => assert!(said.contains("UnknownIssuer"), "{said}"),
            other => panic!("a certificate of an unknown authority: {other:?}"),
        }
        // And one in date from the authority trusted passes: the test's setup is sound.
        let good = signed("ca", (2020, 1, 1), (4000, 1, 1));
        let ca = good.ca.clone();
        handshake_with(good, ca).await.expect("a valid certificate");
    }

    /// A certificate from an authority the worker does not trust (a worker not given the
    /// coordinator's CA, or given another of the same name) is refused saying how to give it;
    /// one refused otherwise is not told so.
    #[tokio::test]
    async fn an_unknown_issuer_is_refused_saying_to_give_the_coordinators_ca() {
        use super::ConnectError;
        let stranger = signed("stranger", (2020, 1, 1), (4000, 1, 1));
        let other_ca = signed("ca", (2020, 1, 1), (4000, 1, 1)).ca;
        match handshake_with(stranger, other_ca).await {
            Err(ConnectError::Untrusted(said)) => assert!(
                said.contains("UnknownIssuer")
                    && said.contains("give the CA that signed it with --ca-file or TETHER_CA_FILE"),
                "{said}"
            ),
            other => panic!("a certificate of an unknown authority: {other:?}"),
        }
        use rustls::CertificateError as C;
        let another_ca = rustls::Error::InvalidCertificate(C::BadSignature);
        assert!(super::untrusted_hint(&another_ca).is_some());
        for other in [C::NotValidForName, C::Revoked, C::UnknownRevocationStatus] {
            let e = rustls::Error::InvalidCertificate(other);
            assert_eq!(super::untrusted_hint(&e), None, "{e}");
        }
    }

    /// A `ws://` URL given for a coordinator serving TLS: the TLS alert read where an HTTP
    /// answer was due ("invalid HTTP version") is said with what to give instead.
    #[tokio::test]
    async fn a_plain_attempt_at_a_tls_coordinator_says_to_give_a_wss_url() {
        use super::{ConnectError, Connector};
        let served = signed("ca", (2020, 1, 1), (4000, 1, 1));
        let ca = served.ca.clone();
        let (server, _) = tls_configs(served, ca);
        let (port, serving) = serving_once(server).await;
        let attempt = super::TcpConnector::default().connect(
            format!("ws://127.0.0.1:{port}/ws/w1"),
            super::ws_config(1 << 20),
        );
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), attempt)
            .await
            .expect("the attempt ends");
        serving.await.expect("server");
        match r {
            Err(ConnectError::Transient(said)) => assert!(
                said.contains(&format!(
                    "(the coordinator at 127.0.0.1:{port} answered with TLS: give an https:// \
                     or wss:// URL, with --ca-file"
                )) && said.ends_with("retrying)"),
                "{said}"
            ),
            Err(other) => panic!("a plain attempt at a TLS server: {other:?}"),
            Ok(_) => panic!("a plain attempt at a TLS server opened"),
        }
    }

    /// A `wss://` URL given for a coordinator serving plain WebSocket: its HTTP answer to the
    /// ClientHello ("received corrupt message of type InvalidContentType" to rustls) is said
    /// to be plain text, with what to give instead, and retried (it may be restarted with TLS).
    #[tokio::test]
    async fn a_tls_attempt_at_a_plain_coordinator_says_to_give_a_ws_url() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // As an HTTP server does with bytes that are no request: 400, then close.
        let serving = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut hello = [0u8; 64];
            let _ = tcp.read(&mut hello).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        let served = signed("ca", (2020, 1, 1), (4000, 1, 1));
        let ca = served.ca.clone();
        let (_, connector) = tls_configs(served, ca);
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            super::tls_handshake(&connector, "localhost", port, tcp),
        )
        .await
        .expect("the handshake ends");
        serving.await.expect("server");
        match r {
            Err(super::ConnectError::Transient(said)) => assert!(
                said.contains("InvalidContentType")
                    && said.contains(&format!(
                        "(the coordinator at localhost:{port} answered in plain text: it does \
                         not serve TLS; give an http:// or ws:// URL, or start it with \
                         --tls-cert and --tls-key; retrying)"
                    )),
                "{said}"
            ),
            Err(other) => panic!("a TLS attempt at a plain server: {other:?}"),
            Ok(_) => panic!("a TLS attempt at a plain server opened"),
        }
        let other = rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidCcs);
        assert!(!super::answered_in_plain_text(&other));
    }

    #[test]
    fn only_auth_statuses_stop_the_worker_and_the_rest_is_retried() {
        assert!(is_refusal(401));
        assert!(is_refusal(403));
        for status in [400, 404, 408, 426, 429, 500, 502, 503] {
            assert!(!is_refusal(status), "{status}");
        }
    }

    /// PEM text of a certificate.
    fn pem(cert: &rustls::pki_types::CertificateDer<'_>) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    }

    /// A worker given a CA file that does not hold the coordinator's CA (the coordinator's CA
    /// was rotated) is told its certificate is untrusted, retryable; once a bundle with the
    /// new CA is pushed to the file, the next attempt reads it and opens a WebSocket over TLS,
    /// with no restart. Real TLS on loopback; the server takes WebSocket upgrades.
    #[tokio::test]
    async fn a_ca_bundle_pushed_to_the_ca_file_is_trusted_from_the_next_attempt() {
        use super::{ConnectError, Connector};
        let served = signed("ca", (2020, 1, 1), (4000, 1, 1));
        let new_ca = served.ca.clone();
        let old_ca = signed("ca", (2020, 1, 1), (4000, 1, 1)).ca;
        let (server, _) = tls_configs(served, new_ca.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let serving = tokio::spawn(async move {
            for _ in 0..2 {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if let Ok(tls) = acceptor.accept(tcp).await
                    && let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await
                {
                    use futures_util::StreamExt;
                    while let Some(Ok(_)) = ws.next().await {}
                }
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, pem(&old_ca)).expect("write");
        let connector = super::TcpConnector::with_ca_file(&file).expect("a usable CA file");
        let url = format!("wss://localhost:{port}/ws/w1");
        let first = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connector.connect(url.clone(), super::ws_config(1 << 20)),
        )
        .await
        .expect("the attempt ends");
        match first {
            Err(ConnectError::Untrusted(said)) => {
                assert!(said.contains("invalid peer certificate"), "{said}")
            }
            Err(other) => panic!("an untrusted certificate: {other:?}"),
            Ok(_) => panic!("an untrusted certificate: opened"),
        }
        // The rotation's bundle: the old CA and the new one.
        std::fs::write(&file, pem(&old_ca) + &pem(&new_ca)).expect("write");
        let second = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connector.connect(url, super::ws_config(1 << 20)),
        )
        .await
        .expect("the attempt ends");
        let ws = second.expect("trusted once the bundle holds the coordinator's CA");
        drop(ws);
        serving.await.expect("server");
    }
}
