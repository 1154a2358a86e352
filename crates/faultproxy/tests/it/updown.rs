//! Taking a whole proxy down and up.

use std::io;

use tether_faultproxy::{Direction, Fault, FaultKind};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::*;

#[tokio::test]
async fn down_cuts_live_links_and_refuses_new_ones_and_up_accepts_on_the_same_port() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let addr = proxy.listen_addr();
    let _slow = proxy
        .add_fault(Fault::new(
            "lat",
            FaultKind::Latency {
                latency_ms: 1,
                jitter_ms: 0,
            },
            Direction::Both,
        ))
        .await
        .expect("add");
    let mut live = connect(addr).await;
    assert_eq!(round_trip(&mut live, b"one").await, b"one");
    wait_for("link listed", || proxy.links().len() == 1).await;

    within("down", proxy.down()).await;
    assert!(!proxy.is_enabled());
    assert!(proxy.links().is_empty());
    let (got, _) = read_to_end(&mut live).await;
    assert!(got.is_empty());
    let refused = within("connect while down", TcpStream::connect(addr)).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionRefused)
    );

    within("up", proxy.up()).await.expect("up");
    assert!(proxy.is_enabled());
    assert_eq!(proxy.listen_addr(), addr);
    let mut again = connect(addr).await;
    assert_eq!(round_trip(&mut again, b"two").await, b"two");
    assert_eq!(proxy.faults().len(), 1, "faults survive down and up");
    let stats = proxy.stats();
    assert_eq!(
        (stats.connections_accepted, stats.connections_closed),
        (2, 1)
    );
}

#[tokio::test]
async fn down_and_up_twice_are_harmless() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    proxy.up().await.expect("up while up");
    proxy.down().await;
    proxy.down().await;
    proxy.up().await.expect("up");
    let mut c = connect(proxy.listen_addr()).await;
    assert_eq!(round_trip(&mut c, b"x").await, b"x");
}

/// Captures what a test's tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// An upstream that is down refuses every link a reconnecting fleet makes: each is counted,
/// and the warnings are gated (one a second, saying how many more), not one per client.
#[tokio::test]
async fn an_unreachable_upstream_closes_each_client_counted_with_gated_warnings() {
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(log.clone())
        .finish();
    // The test's runtime has one thread: the proxy's tasks log through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    let gone = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = gone.local_addr().expect("addr");
    drop(gone);
    let proxy = proxy_to(upstream).await;
    const CLIENTS: u64 = 40;
    for _ in 0..CLIENTS {
        let mut c = connect(proxy.listen_addr()).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (got, _) = read_to_end(&mut c).await;
        assert!(got.is_empty(), "nothing comes back from no upstream");
    }
    wait_for("failures counted", || {
        proxy.stats().upstream_failures == CLIENTS
    })
    .await;
    let text = String::from_utf8(log.0.lock().expect("lock").clone()).expect("utf-8");
    let warnings = text.matches("cannot reach upstream").count() as u64;
    assert!(warnings >= 1, "the first failure is logged: {text}");
    assert!(
        warnings < CLIENTS / 2,
        "{warnings} warnings for {CLIENTS} refused clients: not gated\n{text}"
    );
}
