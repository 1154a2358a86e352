//! Taking a whole proxy down and up.

use std::io;

use tether_faultproxy::{Direction, Fault, FaultKind};
use tokio::net::TcpStream;

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
