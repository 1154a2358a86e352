//! How a simulated worker reaches the coordinator: TCP from a chosen source address in
//! 127.0.0.0/8, TLS when set up, then the worker library's WebSocket handshake; and
//! `--reset-every`, which cuts its connections on the socket, beneath TLS.
//!
//! A reset is done on the socket, not by a stream wrapped around the connection: the session
//! tells a slow link from a silent one by the bytes of its socket, which
//! [`tls_handshake`]'s stream counts beneath rustls and a wrapper over it hides (the session
//! then counted plaintext, and a frame arriving slowly over `wss://` looked stalled until a
//! whole 16 KiB record decrypted). Nor does a wrapper fit beneath TLS: [`tls_handshake`]
//! takes the `TcpStream` itself.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tether_worker::connector::{ConnectError, Connector, Io, WsStream, handshake, tls_handshake};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::task::AbortOnDropHandle;

use super::{FLEET_READ_BUFFER, Shared};

/// A simulated worker's connector: TCP from `source`, TLS when set up, then the library's
/// handshake, and resets when `--reset-every` is given.
pub(super) struct BoundConnector {
    source: Ipv4Addr,
    tls: Option<tokio_rustls::TlsConnector>,
    reset: Option<Reset>,
    /// The reset of the latest connection, while still to come. It holds the socket open (a
    /// duplicate of its descriptor), so it is dropped at the next attempt and with the agent
    /// (a stop, a crash): a connection its session let go of before its reset is closed then,
    /// a backoff delay later at most, rather than at the moment drawn.
    pending: Arc<Mutex<Option<AbortOnDropHandle<()>>>>,
}

impl BoundConnector {
    pub(super) fn new(
        source: Ipv4Addr,
        tls: Option<tokio_rustls::TlsConnector>,
        reset: Option<Reset>,
    ) -> Self {
        Self {
            source,
            tls,
            reset,
            pending: Arc::default(),
        }
    }
}

/// `--reset-every`: how often a worker's connection is reset, and where resets are counted:
/// over the fleet, and for the worker (a fleet-wide count cannot tell that every worker was
/// reset).
#[derive(Clone)]
pub(super) struct Reset {
    pub(super) every: Duration,
    pub(super) shared: Arc<Shared>,
    pub(super) worker: Arc<AtomicU64>,
}

impl Reset {
    /// Resets the connection of `socket` (a duplicate of its descriptor) at a moment drawn
    /// now, between half and one and a half of `every` from now: its socket is shut for
    /// reading, so that the session's next read, beneath TLS or not, finds the connection
    /// ended wherever it was (a result sent and its acknowledgement not yet read, say), and
    /// the worker reconnects and sends again what was not acknowledged. (What the session
    /// writes before that read still goes out: only a read notices.) The socket has a zero
    /// linger: when the session lets go of it, it closes with a TCP reset, not a FIN, which is
    /// why the duplicate is let go of at the moment (or when the returned handle is dropped).
    fn arm(&self, socket: std::net::TcpStream) -> AbortOnDropHandle<()> {
        let share = 0.5 + rand::random::<f64>();
        let at = tokio::time::Instant::now() + self.every.mul_f64(share);
        let reset = self.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            reset.shared.resets.fetch_add(1, Ordering::Relaxed);
            reset.worker.fetch_add(1, Ordering::Relaxed);
            // Not `Both`: shutting the writing side sends a FIN, a clean end to the
            // coordinator. It fails only on a connection already gone.
            let _ = socket.shutdown(std::net::Shutdown::Read);
        }))
    }
}

impl Connector for BoundConnector {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        // The previous connection's reset, not come: that connection has ended otherwise.
        drop(
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        let (source, tls, reset) = (self.source, self.tls.clone(), self.reset.clone());
        let pending = self.pending.clone();
        Box::pin(async move {
            let parsed = url::Url::parse(&url)
                .map_err(|e| ConnectError::Refused(format!("bad url {url}: {e}")))?;
            let host: Ipv4Addr = parsed
                .host_str()
                .and_then(|h| h.parse().ok())
                .ok_or_else(|| ConnectError::Refused(format!("{url}: not an IPv4 loopback")))?;
            let port = parsed.port_or_known_default().unwrap_or(80);
            let transient = |e: std::io::Error| ConnectError::Transient(format!("connect: {e}"));
            let socket = tokio::net::TcpSocket::new_v4().map_err(transient)?;
            socket
                .bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))
                .map_err(transient)?;
            let tcp = socket
                .connect(SocketAddr::V4(SocketAddrV4::new(host, port)))
                .await
                .map_err(transient)?;
            let _ = tcp.set_nodelay(true);
            let reset = match reset {
                Some(r) => {
                    // Closed without a word: the coordinator sees a reset, not a FIN.
                    tcp.set_zero_linger().map_err(transient)?;
                    let dup = tcp.as_fd().try_clone_to_owned().map_err(transient)?;
                    Some((r, std::net::TcpStream::from(dup)))
                }
                None => None,
            };
            let io: Pin<Box<dyn Io>> = match tls {
                None => Box::pin(tcp),
                Some(tls) => tls_handshake(&tls, &host.to_string(), port, tcp).await?,
            };
            // From here, as the WebSocket handshake may be cut too; dropped if it fails.
            let armed = reset.map(|(r, socket)| r.arm(socket));
            let ws = handshake(url, io, config.read_buffer_size(FLEET_READ_BUFFER)).await?;
            *pending.lock().unwrap_or_else(|p| p.into_inner()) = armed;
            Ok(ws)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_tungstenite::tungstenite::Message;

    /// A socket that counts the bytes read from it and written to it (the server's, under
    /// its TLS).
    struct Counted {
        tcp: tokio::net::TcpStream,
        read: Arc<AtomicU64>,
        written: Arc<AtomicU64>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            r
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
            if let std::task::Poll::Ready(Ok(n)) = r {
                self.written.fetch_add(n as u64, Ordering::Relaxed);
            }
            r
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            Pin::new(&mut self.tcp).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            Pin::new(&mut self.tcp).poll_shutdown(cx)
        }
    }

    type ServerWs = tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<Counted>>;

    /// A `wss://` listener on 127.0.0.1 with certificates as `tether cert` makes them, its
    /// acceptor, and a fleet connector trusting its CA that resets its connections about
    /// every `every` (and the temporary directory of the certificates).
    async fn wss(
        every: Duration,
    ) -> (
        tokio::net::TcpListener,
        tokio_rustls::TlsAcceptor,
        BoundConnector,
        Reset,
        tempfile::TempDir,
    ) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = tempfile::tempdir().expect("tempdir");
        let w = crate::cert::write(&crate::cert::CertArgs::local(dir.path().join("tls")))
            .expect("certificates");
        let chain = CertificateDer::pem_file_iter(&w.cert)
            .expect("cert.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates");
        let key = PrivateKeyDer::from_pem_file(&w.key).expect("key.pem");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        // No session ticket: after the handshake, only what a test sends comes.
        server.send_tls13_tickets = 0;
        let client = tether_worker::connector::tls_client_config(Some(&w.ca)).expect("client");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let reset = Reset {
            every,
            shared: Arc::new(Shared::new()),
            worker: Arc::new(AtomicU64::new(0)),
        };
        let connector = BoundConnector::new(
            Ipv4Addr::LOCALHOST,
            Some(tokio_rustls::TlsConnector::from(client)),
            Some(reset.clone()),
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        (listener, acceptor, connector, reset, dir)
    }

    /// A worker's connection to the listener, and the server's end of it with the counts of
    /// its socket (read, written).
    /// The server's next read ends with a TCP reset (within 5 s).
    async fn sees_a_reset(server: &mut ServerWs) {
        let seen = tokio::time::timeout(Duration::from_secs(5), server.next())
            .await
            .expect("the server's read ends within 5 s");
        match seen {
            Some(Err(tokio_tungstenite::tungstenite::Error::Io(e))) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}")
            }
            other => panic!("the server saw no TCP reset: {other:?}"),
        }
    }

    async fn connect(
        listener: &tokio::net::TcpListener,
        acceptor: &tokio_rustls::TlsAcceptor,
        connector: &BoundConnector,
    ) -> (WsStream, ServerWs, Arc<AtomicU64>, Arc<AtomicU64>) {
        let port = listener.local_addr().expect("addr").port();
        let url = format!("wss://127.0.0.1:{port}/api/v1/worker/w/ws");
        let serve = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            let (read, written) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let tcp = Counted {
                tcp,
                read: read.clone(),
                written: written.clone(),
            };
            let tls = acceptor.accept(tcp).await.expect("server TLS");
            let ws = tokio_tungstenite::accept_async(tls)
                .await
                .expect("server WebSocket");
            (ws, read, written)
        };
        let (client, (server, read, written)) = tokio::join!(
            connector.connect(url, tether_worker::connector::ws_config(1 << 20)),
            serve
        );
        (client.expect("worker connects"), server, read, written)
    }

    /// With `--reset-every` over `wss://`, a simulated worker counts the bytes of its socket
    /// beneath TLS (ciphertext, as they come and go), as one without resets does: counted
    /// above TLS, a slow frame showed nothing until a whole record (16 KiB) decrypted.
    #[tokio::test]
    async fn with_resets_over_tls_a_worker_counts_the_bytes_on_its_socket() {
        const SENT: usize = 100 * 1024;
        let (listener, acceptor, connector, reset, _dir) = wss(Duration::from_secs(3600)).await;
        let (mut client, mut server, server_read, server_written) =
            connect(&listener, &acceptor, &connector).await;
        client
            .send(Message::binary(vec![7u8; SENT]))
            .await
            .expect("worker sends");
        let got = server.next().await.expect("a frame").expect("server reads");
        assert_eq!(got.len(), SENT);
        server.send(got).await.expect("server echoes");
        let back = client.next().await.expect("a frame").expect("worker reads");
        assert_eq!(back.len(), SENT);
        let (read, written) = (
            client.get_ref().bytes_read(),
            client.get_ref().written().load(Ordering::Relaxed),
        );
        assert_eq!(
            (read, written),
            (
                server_written.load(Ordering::Relaxed),
                server_read.load(Ordering::Relaxed)
            ),
            "the worker's counts (read, written) are its socket's: the server's (written, read)"
        );
        assert!(
            read > SENT as u64 && written > SENT as u64,
            "{read} {written}"
        );
        assert_eq!(
            reset.shared.resets.load(Ordering::Relaxed),
            0,
            "not reset yet"
        );
    }

    /// A connection the fleet resets ends the worker's session at the moment drawn, and the
    /// coordinator's end sees a TCP reset (not a clean close) once the worker lets go of it;
    /// the reset is counted for the fleet and for the worker.
    #[tokio::test]
    async fn a_reset_over_tls_ends_the_session_and_the_server_sees_a_tcp_reset() {
        let (listener, acceptor, connector, reset, _dir) = wss(Duration::from_millis(100)).await;
        let (mut client, mut server, _, _) = connect(&listener, &acceptor, &connector).await;
        let ended = tokio::time::timeout(Duration::from_secs(5), client.next())
            .await
            .expect("the session's read ends within 5 s");
        assert!(
            !matches!(ended, Some(Ok(_))),
            "no frame was sent, the read fails: {ended:?}"
        );
        assert_eq!(reset.shared.resets.load(Ordering::Relaxed), 1);
        assert_eq!(reset.worker.load(Ordering::Relaxed), 1);
        drop(client);
        sees_a_reset(&mut server).await;
    }

    /// A connection whose session ends before its reset (the worker lets go of it: a
    /// timeout, say) is closed, with a TCP reset, at the worker's next attempt at the latest,
    /// and its reset never comes: the duplicate of its socket kept for the reset goes then.
    #[tokio::test]
    async fn a_connection_ended_before_its_reset_is_closed_by_the_next_attempt() {
        let (listener, acceptor, connector, reset, _dir) = wss(Duration::from_secs(3600)).await;
        let (client, mut server, _, _) = connect(&listener, &acceptor, &connector).await;
        drop(client);
        // The next attempt (which fails: nothing listens there) lets go of the last one's.
        let nowhere = "wss://127.0.0.1:1/api/v1/worker/w/ws".to_owned();
        let refused = connector
            .connect(nowhere, tether_worker::connector::ws_config(1 << 20))
            .await;
        assert!(refused.is_err(), "nothing listens on port 1");
        sees_a_reset(&mut server).await;
        assert_eq!(reset.shared.resets.load(Ordering::Relaxed), 0);
    }
}
