//! A link no fault applies to runs direct (its own task moves both streams); a fault that
//! comes to apply takes it to the staged path with nothing lost.

use std::time::Duration;

use tether_faultproxy::{Direction, Fault, FaultKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::*;

/// Tasks alive on this test's runtime.
fn tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// A link with no fault is one task (beside the echo server's for its connection); a fault
/// for every link turns it into the link's task and its four pump tasks, and applies to the
/// next bytes. Without the direct path a link was five tasks from its first byte.
#[tokio::test]
async fn a_link_no_fault_applies_to_runs_in_one_task_until_a_fault_does() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let before = tasks();
    let mut c = connect(proxy.listen_addr()).await;
    assert_eq!(round_trip(&mut c, b"direct").await, b"direct");
    wait_for("the link's task and the echo's", || tasks() == before + 2).await;

    let guard = proxy
        .add_fault(Fault::new(
            "slow",
            FaultKind::Latency {
                latency_ms: 50,
                jitter_ms: 0,
            },
            Direction::Downstream,
        ))
        .await
        .expect("add");
    let sent = tokio::time::Instant::now();
    assert_eq!(round_trip(&mut c, b"staged").await, b"staged");
    assert!(sent.elapsed() >= Duration::from_millis(50), "not delayed");
    assert_eq!(guard.stats().bytes_delayed, 6);
    assert_eq!(
        tasks(),
        before + 6,
        "the link's task, four pump tasks, the echo's"
    );
}

/// Bytes the direct path had read and not yet written when a fault came to apply (the
/// upstream read nothing, so they waited) are passed on first, once, in order, and the bytes
/// after them through the fault.
#[tokio::test]
async fn bytes_a_direct_link_holds_when_a_fault_comes_go_through_once_in_order() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = proxy_to(listener.local_addr().expect("addr")).await;
    let mut c = connect(proxy.listen_addr()).await;
    let (mut server, _) = within("accept", listener.accept()).await.expect("accept");
    // Writes until every buffer on the way is full, the proxy's read buffer too: the socket
    // stays unwritable for a while. (`try_write`: a `write_all` cut short by a timeout would not
    // tell how much of its slice went.)
    let data = pattern(16 * 1024 * 1024);
    let mut written = 0usize;
    while written < data.len() {
        match tokio::time::timeout(Duration::from_millis(300), c.writable()).await {
            Ok(r) => r.expect("writable"),
            Err(_) => break,
        }
        match c.try_write(&data[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(written < data.len(), "the upstream took 16 MiB unread");
    let guard = proxy
        .add_fault(Fault::new(
            "slices",
            FaultKind::Slicer {
                average_size: 1000,
                size_variation: 500,
                delay_us: 0,
            },
            Direction::Upstream,
        ))
        .await
        .expect("add");
    // What the client's write left unwritten, then more through the fault, then the end.
    let rest = pattern(written + 300 * 1024);
    let tail = rest[written..].to_vec();
    let send = async move {
        c.write_all(&tail).await.expect("write");
        c.shutdown().await.expect("shutdown");
        c
    };
    let receive = async {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        got
    };
    let (_c, got) = within("the rest", async { tokio::join!(send, receive) }).await;
    assert_eq!(got.len(), rest.len());
    assert!(
        got == rest,
        "bytes lost, repeated or reordered at the handover"
    );
    assert!(guard.stats().bytes_passed > 0, "the slicer never applied");
}
