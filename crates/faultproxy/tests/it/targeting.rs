//! Faults aimed at the links of chosen workers.

use tether_faultproxy::{Direction, Fault, FaultKind, Target};
use tether_proto::WorkerId;
use tokio::io::AsyncWriteExt;

use crate::*;

fn id(s: &str) -> WorkerId {
    WorkerId::parse(s).expect("worker id")
}

#[tokio::test]
async fn a_worker_targeted_fault_applies_only_to_the_link_that_names_that_worker() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let guard = proxy
        .add_fault(
            Fault::new("cut-w1", FaultKind::Blackhole, Direction::Upstream)
                .with_target(Target::Workers(vec![id("w1")])),
        )
        .await
        .expect("add");

    let mut w1 = connect(proxy.listen_addr()).await;
    let mut w2 = connect(proxy.listen_addr()).await;
    let mut anon = connect(proxy.listen_addr()).await;
    let req1 = [upgrade_request("w1"), b"ping".to_vec()].concat();
    let req2 = [upgrade_request("w2"), b"ping".to_vec()].concat();
    w1.write_all(&req1).await.expect("write w1");
    assert_eq!(round_trip(&mut w2, &req2).await, req2);
    assert_eq!(round_trip(&mut anon, b"plain bytes").await, b"plain bytes");

    // Only w1's link is held back from the upstream (made into its blackhole).
    wait_for("w1's link named", || {
        proxy.links().iter().any(|l| l.worker == Some(id("w1")))
    })
    .await;
    assert_open_and_silent(&w1);
    assert_eq!(guard.stats().connections_affected, 1);
    let mut workers: Vec<_> = proxy
        .links()
        .into_iter()
        .map(|l| (l.worker, l.connected))
        .collect();
    workers.sort();
    assert_eq!(
        workers,
        vec![
            (None, true),
            (Some(id("w1")), false),
            (Some(id("w2")), true)
        ]
    );

    drop(guard);
    assert_eq!(read_n(&mut w1, req1.len()).await, req1);
    assert_eq!(round_trip(&mut w1, b"healed").await, b"healed");
}

#[tokio::test]
async fn a_percent_encoded_worker_id_is_decoded_before_matching() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let guard = proxy
        .add_fault(
            Fault::new(
                "flip",
                FaultKind::Corrupt { rate: 1.0 },
                Direction::Downstream,
            )
            .with_target(Target::Workers(vec![id("a@b")])),
        )
        .await
        .expect("add");
    let mut c = connect(proxy.listen_addr()).await;
    let req = upgrade_request("a%40b");
    assert_ne!(round_trip(&mut c, &req).await, req);
    assert_eq!(guard.stats().bytes_corrupted, req.len() as u64);
}
