//! One test per fault kind, asserting that the fault fired and what the client saw.

use std::io;
use std::time::Duration;

use tether_faultproxy::{Direction, Fault, FaultGuard, FaultKind, FaultPatch, Proxy};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::*;

#[tokio::test]
async fn bytes_pass_through_unchanged_in_both_directions_and_fin_is_passed_on() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let mut c = connect(proxy.listen_addr()).await;
    let data = pattern(300 * 1024);
    let (mut r, mut w) = c.split();
    let write = async {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let read = async {
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut got)
            .await
            .expect("read");
        got
    };
    let ((), got) = within("echo 300 KiB", async { tokio::join!(write, read) }).await;
    assert!(got == data, "bytes changed on the way");
    let stats = proxy.stats();
    assert_eq!(stats.bytes_upstream, data.len() as u64);
    assert_eq!(stats.bytes_downstream, data.len() as u64);
    assert_eq!(stats.connections_accepted, 1);
}

/// A proxy spreads its connections to a loopback upstream over several source addresses, so
/// that thousands of links do not search one address's ports for a free one (on Linux: other
/// systems have only 127.0.0.1 on the loopback).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn links_to_a_loopback_upstream_come_from_several_source_addresses() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let proxy = proxy_to(upstream.local_addr().expect("addr")).await;
    let mut clients = Vec::new();
    let mut sources = std::collections::HashSet::new();
    for _ in 0..4 {
        let mut c = connect(proxy.listen_addr()).await;
        c.write_all(b"x").await.expect("write");
        clients.push(c);
        let (_, peer) = within("accept", upstream.accept()).await.expect("accept");
        assert!(peer.ip().is_loopback(), "{peer}");
        sources.insert(peer.ip());
    }
    assert_eq!(sources.len(), 4, "{sources:?}");
}

#[tokio::test]
async fn latency_delays_the_echo_by_at_least_the_latency() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let kind = FaultKind::Latency {
        latency_ms: 150,
        jitter_ms: 0,
    };
    let guard = proxy
        .add_fault(Fault::new("lat", kind, Direction::Downstream))
        .await
        .expect("add");
    let mut c = connect(proxy.listen_addr()).await;
    let start = Instant::now();
    assert_eq!(round_trip(&mut c, b"ping").await, b"ping");
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "{:?}",
        start.elapsed()
    );
    let s = guard.stats();
    assert_eq!(
        (s.bytes_delayed, s.bytes_passed, s.connections_affected),
        (4, 4, 1)
    );
}

#[tokio::test]
async fn blackhole_drops_bytes_keeps_the_connection_open_and_heals_when_removed() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let mut c = connect(proxy.listen_addr()).await;
    assert_eq!(round_trip(&mut c, b"before").await, b"before");

    let guard = proxy
        .add_fault(Fault::new("cut", FaultKind::Blackhole, Direction::Upstream))
        .await
        .expect("add");
    c.write_all(b"lost")
        .await
        .expect("write into the blackhole");
    wait_for("4 bytes dropped", || guard.stats().bytes_dropped == 4).await;
    assert_open_and_silent(&c);
    assert_eq!(proxy.stats().faults.bytes_dropped, 4);

    drop(guard);
    assert!(proxy.faults().is_empty());
    assert_eq!(round_trip(&mut c, b"after").await, b"after");
}

/// An echo server behind a proxy with a blackhole on its upstream stream.
async fn blackholed() -> (Echo, Proxy, FaultGuard) {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let cut = Fault::new("cut", FaultKind::Blackhole, Direction::Upstream);
    let guard = proxy.add_fault(cut).await.expect("add");
    (echo, proxy, guard)
}

/// A link made while a blackhole sits on its upstream stream is as a connection whose SYN went
/// into the blackhole: a client that gives up leaves nothing upstream and nothing held in the
/// proxy; for one still there, the link connects at the SYN's first retransmission after the
/// fault is gone (1 s after the connect here), and what the client sent meanwhile goes through
/// then, as bytes a client could not have sent before its connection was up.
#[tokio::test]
async fn a_link_made_into_a_blackhole_connects_upstream_when_a_retransmitted_syn_would() {
    let (echo, proxy, guard) = blackholed().await;

    let mut gone = connect(proxy.listen_addr()).await;
    gone.write_all(&upgrade_request("w1")).await.expect("write");
    wait_for("the request read", || {
        proxy.links().first().is_some_and(|l| l.worker.is_some())
    })
    .await;
    drop(gone);
    wait_for("the abandoned link gone", || proxy.links().is_empty()).await;

    let start = Instant::now();
    let mut stays = connect(proxy.listen_addr()).await;
    stays.write_all(b"held").await.expect("write");
    wait_for("the link listed", || proxy.links().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let links = proxy.links();
    assert!(!links[0].connected, "{links:?}");
    assert_eq!(echo.accepted(), 0, "no connection may reach the upstream");
    assert_open_and_silent(&stays);

    drop(guard);
    let removed = start.elapsed();
    assert_eq!(read_n(&mut stays, 4).await, b"held");
    // At the first retransmission after the removal (1 s), not at the removal, nor at the
    // next one (3 s). The retransmissions are 1, 3, 7, 15... s after the SYN (the proxy's
    // accept, just after `start`); a machine so loaded that the removal itself came after
    // one of them moves the expected one on, and the bound with it. The bound is the next
    // retransmission, the earliest a link that skipped the expected one could connect: a
    // late timer has the 2 s or more between the two.
    let retransmission = |n: u32| Duration::from_secs((1 << n) - 1);
    let first = (1..)
        .find(|&n| retransmission(n) > removed)
        .expect("a retransmission after the removal");
    let waited = start.elapsed();
    assert!(
        (Duration::from_secs(1)..retransmission(first + 1)).contains(&waited),
        "connected {waited:?} after the client, the fault removed after {removed:?}"
    );
    assert_eq!(round_trip(&mut stays, b"after").await, b"after");
    assert_eq!(echo.accepted(), 1);
    assert!(proxy.links()[0].connected);
    assert_eq!(proxy.stats().faults.bytes_dropped, 0, "nothing swallowed");
}

/// A client that gives up behind a blackhole after sending more than the proxy holds (a chunk)
/// is noticed at once, though bytes of it are still unread, and the upstream never sees it,
/// even when the blackhole goes afterwards.
#[tokio::test]
async fn a_client_leaving_a_full_held_link_ends_it_at_once_and_reaches_nothing_upstream() {
    let (echo, proxy, guard) = blackholed().await;
    let mut c = connect(proxy.listen_addr()).await;
    let mut data = upgrade_request("w1");
    data.resize(40 * 1024, b'x');
    within("write 40 KiB", c.write_all(&data))
        .await
        .expect("write");
    wait_for("the request read", || {
        proxy.links().first().is_some_and(|l| l.worker.is_some())
    })
    .await;
    drop(c);
    // A few seconds at most, not the 127 s bound of a SYN never answered.
    let end = Instant::now() + Duration::from_secs(3);
    while !proxy.links().is_empty() {
        assert!(Instant::now() < end, "the abandoned link is still held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(guard);
    // The link task has ended, so nothing of it can reach the upstream any more.
    assert_eq!(
        echo.accepted(),
        0,
        "the abandoned link reached the upstream"
    );
    let s = proxy.stats();
    assert_eq!((s.connections_closed, s.bytes_upstream), (1, 0), "{s:?}");
}

/// A client that stays behind a blackhole with more than a chunk sent loses nothing: what the
/// proxy left unread while it watched the client goes through once the link connects.
#[tokio::test]
async fn a_full_held_link_passes_every_byte_once_the_blackhole_goes() {
    let (echo, proxy, guard) = blackholed().await;
    let mut c = connect(proxy.listen_addr()).await;
    let data = pattern(40 * 1024);
    within("write 40 KiB", c.write_all(&data))
        .await
        .expect("write");
    wait_for("the link listed", || proxy.links().len() == 1).await;
    drop(guard);
    assert!(
        read_n(&mut c, data.len()).await == data,
        "bytes lost or changed"
    );
    assert_eq!(echo.accepted(), 1);
}

/// A link whose last SYN retransmission (63 s) went into the blackhole is reset 127 s after its
/// connect, as the connect would have failed: a blackhole removed in between does not let it
/// through. Paused time: the runtime skips ahead whenever it has nothing to do.
#[tokio::test(start_paused = true)]
async fn a_link_held_past_its_last_syn_is_reset_though_the_blackhole_then_goes() {
    let (echo, proxy, guard) = blackholed().await;
    let mut c = tokio::net::TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    c.write_all(b"held").await.expect("write");
    tokio::time::sleep(Duration::from_secs(100)).await;
    drop(guard);
    let mut buf = [0u8; 16];
    let read = tokio::io::AsyncReadExt::read(&mut c, &mut buf).await;
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset)
    );
    assert_eq!(echo.accepted(), 0, "the link never reached the upstream");
}

/// A client that resets its connection right after its last bytes: the upstream gets those
/// bytes, then the reset, as over a direct connection, though a latency still holds them when
/// the reset reaches the proxy (the reset used to close the link at once, and the bytes were
/// lost). `echo_back_ms`: the upstream sends bytes back that reach the proxy's write to the
/// reset client (`None`: it sends nothing); that failed write must not end the link first.
async fn assert_the_last_words_before_a_reset_reach_the_upstream(echo_back_ms: Option<u64>) {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let proxy = proxy_to(upstream.local_addr().expect("addr")).await;
    let lat = |ms| FaultKind::Latency {
        latency_ms: ms,
        jitter_ms: 0,
    };
    let _up = proxy
        .add_fault(Fault::new("up", lat(200), Direction::Upstream))
        .await
        .expect("add");
    let _down = match echo_back_ms {
        Some(ms) => Some(
            proxy
                .add_fault(Fault::new("down", lat(ms), Direction::Downstream))
                .await
                .expect("add"),
        ),
        None => None,
    };
    let mut c = connect(proxy.listen_addr()).await;
    c.write_all(b"last words").await.expect("write");
    c.set_zero_linger().expect("linger");
    drop(c);
    let (mut server, _) = within("the link connects", upstream.accept())
        .await
        .expect("accept");
    if echo_back_ms.is_some() {
        server.write_all(b"reply").await.expect("write back");
    }
    let (bytes, err) = read_to_end(&mut server).await;
    assert_eq!(bytes, b"last words");
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
    wait_for("link reset", || proxy.stats().connections_reset == 1).await;
    wait_for("link gone", || proxy.links().is_empty()).await;
}

#[tokio::test]
async fn a_peers_reset_reaches_the_other_side_after_the_bytes_it_sent_before_it() {
    assert_the_last_words_before_a_reset_reach_the_upstream(None).await;
}

#[tokio::test]
async fn a_failed_write_to_a_peer_that_reset_does_not_cut_its_last_bytes_short() {
    assert_the_last_words_before_a_reset_reach_the_upstream(Some(50)).await;
}

/// A client resets while the proxy is behind reading it (a bandwidth fault: its queue is full
/// and bytes wait unread in the socket), and the server's reply then reaches the proxy: the
/// proxy's write to the client finds the reset before its reader does, and takes the error
/// from the socket, so the reader then sees the stream end as if by a FIN. The server must
/// still get every byte the proxy took from the client, then the reset: the failed write used
/// to reset the link at once, throwing away what was queued and unread.
#[tokio::test]
async fn a_reset_found_by_a_write_first_still_passes_on_the_bytes_sent_before_it() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let proxy = proxy_to(upstream.local_addr().expect("addr")).await;
    let rate: usize = 500_000;
    let kind = FaultKind::Bandwidth {
        bytes_per_sec: rate as u64,
    };
    let _bw = proxy
        .add_fault(Fault::new("bw", kind, Direction::Upstream))
        .await
        .expect("add");
    // A small send buffer: what the client's kernel still holds at its reset is lost (it
    // never reached the proxy), and a large one would take long to fill.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_send_buffer_size(16 * 1024).expect("send buffer");
    let mut c = within("connect", socket.connect(proxy.listen_addr()))
        .await
        .expect("connect");
    let data = pattern(16 << 20);
    c.write_all(&data[..1000]).await.expect("write");
    let (mut server, _) = within("the link connects", upstream.accept())
        .await
        .expect("accept");
    // Writes until the client's writes wait: the proxy's queue is full and its socket holds
    // bytes it has not read (128 KiB take a quarter of a second to make room for then).
    let mut sent = 1000;
    loop {
        let piece = &data[sent..sent + 128 * 1024];
        let r = tokio::time::timeout(Duration::from_millis(100), c.write_all(piece)).await;
        if r.is_err() {
            break;
        }
        sent += piece.len();
        assert!(
            sent + rate < data.len(),
            "the proxy took 16 MiB at {rate} B/s"
        );
    }
    c.set_zero_linger().expect("linger");
    drop(c);
    server.write_all(b"reply").await.expect("write back");
    let (got, err) = read_to_end(&mut server).await;
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
    // Every byte the client's finished writes handed over came through, unchanged, but for
    // what its send buffer (32 KiB) still held at the reset, which a reset throws away. More
    // than the proxy's queue holds was sent: the proxy was behind.
    assert!(sent > rate, "only {sent} bytes sent");
    assert!(
        got.len() + 64 * 1024 >= sent,
        "{} bytes of {sent} came through",
        got.len()
    );
    assert!(got == data[..got.len()], "bytes changed on the way");
    wait_for("link reset", || proxy.stats().connections_reset == 1).await;
    assert_eq!(proxy.stats().bytes_upstream, got.len() as u64);
}

/// A client that resets while the proxy still reads its first bytes (the request line is not
/// complete): the upstream gets those bytes, then the reset, not a clean FIN (Linux reports a
/// reset to one read only; sniffing swallowed it, and the next read saw an end of stream).
#[tokio::test]
async fn a_reset_while_the_first_bytes_are_sniffed_reaches_the_upstream_as_a_reset() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let proxy = proxy_to(upstream.local_addr().expect("addr")).await;
    let mut c = connect(proxy.listen_addr()).await;
    wait_for("link accepted", || proxy.links().len() == 1).await;
    c.write_all(b"GET /api/v1/wor").await.expect("write");
    c.set_zero_linger().expect("linger");
    drop(c);
    let (mut server, _) = within("the link connects", upstream.accept())
        .await
        .expect("accept");
    let (bytes, err) = read_to_end(&mut server).await;
    assert_eq!(bytes, b"GET /api/v1/wor");
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
    wait_for("link reset", || proxy.stats().connections_reset == 1).await;
    wait_for("link gone", || proxy.links().is_empty()).await;
}

/// A client that resets before sending a byte: the link ends reset (and is counted so) without
/// dialling the upstream, which has nothing to be told.
#[tokio::test]
async fn a_reset_before_the_first_byte_ends_the_link_reset_without_dialling() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let c = connect(proxy.listen_addr()).await;
    wait_for("link accepted", || proxy.links().len() == 1).await;
    c.set_zero_linger().expect("linger");
    drop(c);
    wait_for("link reset", || proxy.stats().connections_reset == 1).await;
    wait_for("link gone", || proxy.links().is_empty()).await;
    assert_eq!(proxy.stats().upstream_failures, 0);
    assert_eq!(echo.accepted(), 0, "the upstream was dialled");
}

/// A client that resets mid request line while a blackhole holds its link back: the link ends
/// reset at once, and the upstream never sees it.
#[tokio::test]
async fn a_reset_while_sniffing_a_held_link_ends_it_reset_without_dialling() {
    let (echo, proxy, _cut) = blackholed().await;
    let mut c = connect(proxy.listen_addr()).await;
    wait_for("link accepted", || proxy.links().len() == 1).await;
    c.write_all(b"GET /api/v1/wor").await.expect("write");
    c.set_zero_linger().expect("linger");
    drop(c);
    wait_for("link reset", || proxy.stats().connections_reset == 1).await;
    wait_for("link gone", || proxy.links().is_empty()).await;
    assert_eq!(echo.accepted(), 0, "the upstream was dialled");
}

/// A reset fault gives the client a connection reset, also on a link that a blackhole holds
/// back from its upstream (its timer runs from the connect all the same).
#[tokio::test]
async fn reset_gives_the_client_connection_reset() {
    for held in [false, true] {
        let echo = echo().await;
        let proxy = proxy_to(echo.addr).await;
        let mut hole = None;
        if held {
            let cut = Fault::new("cut", FaultKind::Blackhole, Direction::Upstream);
            hole = Some(proxy.add_fault(cut).await.expect("add"));
        }
        let guard = proxy
            .add_fault(Fault::new(
                "rst",
                FaultKind::Reset {
                    timeout_ms: if held { 200 } else { 0 },
                },
                Direction::Downstream,
            ))
            .await
            .expect("add");
        let mut c = connect(proxy.listen_addr()).await;
        c.write_all(b"hello").await.expect("write");
        let (_, err) = read_to_end(&mut c).await;
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
        wait_for("reset counted", || guard.stats().connections_reset == 1).await;
        wait_for("link closed", || proxy.stats().connections_reset == 1).await;
        if held {
            assert_eq!(
                echo.accepted(),
                0,
                "the held link never reached the upstream"
            );
        }
        drop(hole);
    }
}

/// A reset of timeout 0 cuts a new link before any of its bytes pass, either way: what the
/// client sent with its connection (as a worker sends its upgrade and registration) never
/// reaches the server.
#[tokio::test]
async fn a_reset_of_timeout_zero_lets_no_byte_of_a_new_link_through() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let guard = proxy
        .add_fault(Fault::new(
            "rst",
            FaultKind::Reset { timeout_ms: 0 },
            Direction::Both,
        ))
        .await
        .expect("add");
    for _ in 0..20 {
        let mut c = connect(proxy.listen_addr()).await;
        c.write_all(b"GET /ws/worker/w1 HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let (got, err) = read_to_end(&mut c).await;
        assert!(got.is_empty(), "{} bytes came back", got.len());
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
    }
    wait_for("20 resets counted", || {
        guard.stats().connections_reset == 20
    })
    .await;
    let s = proxy.stats();
    assert_eq!((s.bytes_upstream, s.bytes_downstream), (0, 0), "{s:?}");
    assert_eq!(guard.stats().bytes_passed, 0);
}

#[tokio::test]
async fn a_reset_added_to_a_live_link_resets_it() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let mut c = connect(proxy.listen_addr()).await;
    assert_eq!(round_trip(&mut c, b"alive").await, b"alive");
    let guard = proxy
        .add_fault(Fault::new(
            "rst",
            FaultKind::Reset { timeout_ms: 20 },
            Direction::Both,
        ))
        .await
        .expect("add");
    let (_, err) = read_to_end(&mut c).await;
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
    assert_eq!(guard.stats().connections_reset, 1);
}

#[tokio::test]
async fn limit_data_closes_the_link_after_exactly_n_bytes() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let guard = proxy
        .add_fault(Fault::new(
            "lim",
            FaultKind::LimitData { bytes: 10 },
            Direction::Downstream,
        ))
        .await
        .expect("add");
    let mut c = connect(proxy.listen_addr()).await;
    c.write_all(b"abcdefghijklmnopqrst").await.expect("write");
    let (got, _) = read_to_end(&mut c).await;
    assert_eq!(got, b"abcdefghij");
    let s = guard.stats();
    assert_eq!((s.connections_closed, s.bytes_passed), (1, 10));
}

/// Every byte the proxy took from either side and did not deliver when `limit_data` ended the
/// link counts as dropped by it: here the rest of a chunk a slicer cut (before the limit), a
/// chunk queued behind it, and a reply from the server held by a latency on the way back. Only
/// the part of a chunk past the limit used to count (none here: the limit falls between two
/// slices).
#[tokio::test]
async fn limit_data_counts_every_byte_it_left_undelivered_as_dropped() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let proxy = proxy_to(upstream.local_addr().expect("addr")).await;
    let lat = |latency_ms| FaultKind::Latency {
        latency_ms,
        jitter_ms: 0,
    };
    let slicer = FaultKind::Slicer {
        average_size: 100,
        size_variation: 0,
        delay_us: 0,
    };
    let limit = FaultKind::LimitData { bytes: 1000 };
    let faults = [
        ("hold", lat(300), Direction::Upstream),
        ("back", lat(5_000), Direction::Downstream),
        ("slice", slicer, Direction::Upstream),
        ("lim", limit, Direction::Upstream),
    ];
    let mut guards = Vec::new();
    for (name, kind, direction) in faults {
        let f = Fault::new(name, kind, direction);
        guards.push(proxy.add_fault(f).await.expect("add"));
    }
    let data = pattern(3500);
    let mut c = connect(proxy.listen_addr()).await;
    c.write_all(&data[..1500]).await.expect("write");
    let (mut server, _) = within("the link connects", upstream.accept())
        .await
        .expect("accept");
    server.write_all(&[1; 700]).await.expect("reply");
    c.write_all(&data[1500..]).await.expect("write");
    let (got, err) = read_to_end(&mut server).await;
    assert!(err.is_none(), "{err:?}");
    assert!(got == data[..1000], "{} bytes, or changed", got.len());
    let lim = &guards[3];
    wait_for("the link gone", || proxy.links().is_empty()).await;
    let s = lim.stats();
    assert_eq!(
        (s.bytes_passed, s.bytes_dropped, s.connections_closed),
        (1000, 2500 + 700, 1),
        "{s:?}"
    );
    let p = proxy.stats();
    assert_eq!(
        (p.bytes_upstream, p.bytes_downstream, p.faults.bytes_dropped),
        (1000, 0, 3200),
        "{p:?}"
    );
}

/// The proxy's fault totals are the sum of its faults' counters, the links they closed or
/// reset included (`GET /proxies/{name}/stats` and reports read them there).
#[tokio::test]
async fn links_a_fault_resets_or_closes_count_in_the_proxy_fault_totals() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let rst = proxy
        .add_fault(Fault::new(
            "rst",
            FaultKind::Reset { timeout_ms: 0 },
            Direction::Downstream,
        ))
        .await
        .expect("add");
    let mut c = connect(proxy.listen_addr()).await;
    let (_, err) = read_to_end(&mut c).await;
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
    wait_for("reset counted", || rst.stats().connections_reset == 1).await;
    drop(rst);
    assert_eq!(proxy.stats().faults.connections_reset, 1);

    let lim = proxy
        .add_fault(Fault::new(
            "lim",
            FaultKind::LimitData { bytes: 2 },
            Direction::Downstream,
        ))
        .await
        .expect("add");
    let mut c = connect(proxy.listen_addr()).await;
    c.write_all(b"abcd").await.expect("write");
    let (got, _) = read_to_end(&mut c).await;
    assert_eq!(got, b"ab");
    wait_for("close counted", || lim.stats().connections_closed == 1).await;
    let faults = proxy.stats().faults;
    assert_eq!(
        (faults.connections_reset, faults.connections_closed),
        (1, 1),
        "{faults:?}"
    );
}

/// `limit_data` before a fault that cuts chunks into pieces (slicer, bandwidth) still passes
/// every byte it promises: the link closes after the last piece, not the first.
#[tokio::test]
async fn limit_data_followed_by_a_splitting_fault_passes_all_its_bytes_before_the_close() {
    let echo = echo().await;
    let splitters = [
        FaultKind::Slicer {
            average_size: 100,
            size_variation: 0,
            delay_us: 0,
        },
        FaultKind::Bandwidth {
            bytes_per_sec: 5_000,
        },
    ];
    for splitter in splitters {
        let name = splitter.name();
        let proxy = proxy_to(echo.addr).await;
        let limit = FaultKind::LimitData { bytes: 1000 };
        let lim = proxy
            .add_fault(Fault::new("lim", limit, Direction::Downstream))
            .await
            .expect("add");
        let _split = proxy
            .add_fault(Fault::new(name, splitter, Direction::Downstream))
            .await
            .expect("add");
        let mut c = connect(proxy.listen_addr()).await;
        let data = pattern(2000);
        c.write_all(&data).await.expect("write");
        let (got, _) = read_to_end(&mut c).await;
        assert_eq!(got.len(), 1000, "{name}");
        assert!(got == data[..1000], "{name}: bytes changed on the way");
        wait_for("close counted", || lim.stats().connections_closed == 1).await;
    }
}

#[tokio::test]
async fn slicer_preserves_the_byte_stream_exactly() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let kind = FaultKind::Slicer {
        average_size: 7,
        size_variation: 5,
        delay_us: 10,
    };
    let guard = proxy
        .add_fault(Fault::new("slice", kind, Direction::Both))
        .await
        .expect("add");
    let mut c = connect(proxy.listen_addr()).await;
    let data = pattern(8 * 1024);
    assert!(round_trip(&mut c, &data).await == data);
    assert_eq!(guard.stats().bytes_passed, 2 * data.len() as u64);
    // Each byte delayed once at most: the pieces after the first of each chunk. A tail that
    // waited used to count whole at every cut (megabytes for a few kilobytes).
    let delayed = guard.stats().bytes_delayed;
    assert!(
        delayed > 0 && delayed <= 2 * data.len() as u64,
        "{delayed} bytes delayed of {}",
        2 * data.len()
    );
}

#[tokio::test]
async fn corrupt_at_rate_one_changes_every_byte_and_counts_it() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let guard = proxy
        .add_fault(Fault::new(
            "flip",
            FaultKind::Corrupt { rate: 1.0 },
            Direction::Downstream,
        ))
        .await
        .expect("add");
    let mut c = connect(proxy.listen_addr()).await;
    let data = pattern(1000);
    let got = round_trip(&mut c, &data).await;
    assert!(
        data.iter()
            .zip(&got)
            .all(|(a, b)| (a ^ b).count_ones() == 1)
    );
    assert_eq!(guard.stats().bytes_corrupted, 1000);
}

#[tokio::test]
async fn toxicity_zero_never_applies_and_one_always_applies() {
    let echo = echo().await;
    for (toxicity, affected) in [(0.0, 0), (1.0, 5)] {
        let proxy = proxy_to(echo.addr).await;
        let fault = Fault::new(
            "flip",
            FaultKind::Corrupt { rate: 1.0 },
            Direction::Downstream,
        )
        .with_toxicity(toxicity);
        let guard = proxy.add_fault(fault).await.expect("add");
        for _ in 0..5 {
            let mut c = connect(proxy.listen_addr()).await;
            let changed = round_trip(&mut c, b"data").await != b"data";
            assert_eq!(changed, toxicity == 1.0, "toxicity {toxicity}");
        }
        assert_eq!(guard.stats().connections_affected, affected);
    }
}

#[tokio::test]
async fn stall_bandwidth_and_slow_close_hold_data_at_least_as_long_as_asked() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let cases = [
        (
            FaultKind::Stall {
                loss_rate: 1.0,
                stall_ms: 120,
            },
            120,
        ),
        (
            FaultKind::Bandwidth {
                bytes_per_sec: 20_000,
            },
            200,
        ),
    ];
    for (kind, ms) in cases {
        let name = kind.name();
        let guard = proxy
            .add_fault(Fault::new(name, kind, Direction::Upstream))
            .await
            .expect("add");
        let mut c = connect(proxy.listen_addr()).await;
        let data = pattern(4000);
        let start = Instant::now();
        assert!(round_trip(&mut c, &data).await == data, "{name}");
        assert!(
            start.elapsed() >= Duration::from_millis(ms),
            "{name}: {:?}",
            start.elapsed()
        );
        assert!(guard.stats().bytes_delayed > 0, "{name}");
    }

    let proxy = proxy_to(echo.addr).await;
    let guard = proxy
        .add_fault(Fault::new(
            "slow",
            FaultKind::SlowClose { delay_ms: 150 },
            Direction::Upstream,
        ))
        .await
        .expect("add");
    let mut c = connect(proxy.listen_addr()).await;
    let start = Instant::now();
    c.shutdown().await.expect("shutdown");
    let (got, err) = read_to_end(&mut c).await;
    assert!(got.is_empty() && err.is_none());
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(guard.stats().connections_affected, 1);
}

/// Bandwidth faults stacked on one stream give it the rate of the slowest (20 kB/s here, in the
/// middle of the chain), as chained limits would; each used to add its own transmission time,
/// and 40, 20 and 40 kB/s gave 10, twice the time. Not faster than the slowest: 30 kB take at
/// least 1.5 s (timers never fire early). Not slower: the transfer keeps pace with the same
/// one through the slowest fault alone, run beside it at the same moment on another proxy, so
/// a loaded machine's late timers (each piece of the pacer starts when the last one's timer
/// fired) delay both alike; the old sum took 1.5 s more than that.
#[tokio::test]
async fn stacked_bandwidth_faults_give_the_rate_of_the_slowest() {
    let echo = echo().await;
    let stacked = proxy_to(echo.addr).await;
    let mut guards = Vec::new();
    for (name, bytes_per_sec) in [("bw1", 40_000), ("bw2", 20_000), ("bw3", 40_000)] {
        let kind = FaultKind::Bandwidth { bytes_per_sec };
        let bw = Fault::new(name, kind, Direction::Upstream);
        guards.push(stacked.add_fault(bw).await.expect("add"));
    }
    let alone = proxy_to(echo.addr).await;
    let kind = FaultKind::Bandwidth {
        bytes_per_sec: 20_000,
    };
    let slowest = alone
        .add_fault(Fault::new("bw", kind, Direction::Upstream))
        .await
        .expect("add");
    let data = pattern(30_000);
    let timed = |proxy: &Proxy| {
        let (addr, data) = (proxy.listen_addr(), &data);
        async move {
            let mut c = connect(addr).await;
            let start = Instant::now();
            assert!(round_trip(&mut c, data).await == *data);
            start.elapsed()
        }
    };
    let (took, took_alone) = tokio::join!(timed(&stacked), timed(&alone));
    // 1.5 s at 20 kB/s; 0.75 s at the fastest.
    let at_slowest = Duration::from_millis(1400);
    assert!(took >= at_slowest, "30 kB took {took:?}");
    assert!(took_alone >= at_slowest, "30 kB took {took_alone:?} alone");
    // Half the 1.5 s the old sum added.
    assert!(
        took < took_alone + Duration::from_millis(750),
        "30 kB took {took:?} through the stacked faults, {took_alone:?} through the slowest alone"
    );
    assert!(guards.iter().all(|g| g.stats().bytes_passed == 30_000));
    assert_eq!(slowest.stats().bytes_passed, 30_000);
}

/// A bandwidth fault lets about a second of its rate queue in the proxy (at least 64 KiB), so a
/// sender on a slow link has its writes stall as on a real one; without the fault the same
/// write goes through at once. The client's send buffer is fixed small: Linux grows an
/// unpinned one to 4 MiB on loopback, which would take the whole write by itself.
#[tokio::test]
async fn bandwidth_pushes_back_on_the_sender_instead_of_queueing_its_bytes() {
    let sink = sink().await;
    let data = vec![7u8; 1_000_000];
    for slow in [false, true] {
        let proxy = proxy_to(sink.addr).await;
        let mut guard = None;
        if slow {
            let kind = FaultKind::Bandwidth {
                bytes_per_sec: 1000,
            };
            let bw = Fault::new("bw", kind, Direction::Upstream);
            guard = Some(proxy.add_fault(bw).await.expect("add"));
        }
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_send_buffer_size(16 * 1024).expect("send buffer");
        let mut c = within("connect", socket.connect(proxy.listen_addr()))
            .await
            .expect("connect");
        let write = c.write_all(&data);
        match guard {
            None => within("1 MB written", write).await.expect("write"),
            Some(g) => {
                let r = tokio::time::timeout(Duration::from_secs(1), write).await;
                assert!(r.is_err(), "1 MB taken in under 1 s at 1000 B/s");
                assert!(g.stats().bytes_delayed > 0, "the fault did not fire");
            }
        }
    }
}

#[tokio::test]
async fn a_fault_changed_live_takes_effect_on_the_open_link() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr).await;
    let mut c = connect(proxy.listen_addr()).await;
    let guard = proxy
        .add_fault(Fault::new(
            "flip",
            FaultKind::Corrupt { rate: 0.0 },
            Direction::Downstream,
        ))
        .await
        .expect("add");
    assert_eq!(round_trip(&mut c, b"same").await, b"same");
    let patch: FaultPatch = serde_json::from_str(r#"{"attributes":{"rate":1.0}}"#).expect("patch");
    guard.update(&patch).expect("update");
    assert_ne!(round_trip(&mut c, b"same").await, b"same");
    assert_eq!(guard.stats().bytes_corrupted, 4);
}

/// A reset added while the proxy's write to the upstream waits (the upstream reads nothing, so
/// its socket and the proxy's are full) fires on time: the write used to be waited out first,
/// for as long as the upstream read nothing (here, for ever).
#[tokio::test]
async fn a_reset_added_while_a_write_waits_on_a_peer_that_reads_nothing_fires() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accepts and holds each connection, reading nothing.
    let deaf = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let proxy = proxy_to(addr).await;
    let mut c = connect(proxy.listen_addr()).await;
    // Writes until the client's own writes wait too: every buffer on the way is full.
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    while let Ok(Ok(())) =
        tokio::time::timeout(Duration::from_millis(500), c.write_all(&chunk)).await
    {
        written += chunk.len();
        assert!(written < 1 << 30, "the upstream took a gigabyte unread");
    }
    assert_an_upstream_reset_resets(&proxy, &mut c).await;
    deaf.abort();
}

/// Adds a reset of 20 ms on `proxy`'s upstream streams: client `c` sees its connection
/// reset, and the fault counts the one link.
async fn assert_an_upstream_reset_resets(proxy: &Proxy, c: &mut tokio::net::TcpStream) {
    let guard = proxy
        .add_fault(Fault::new(
            "rst",
            FaultKind::Reset { timeout_ms: 20 },
            Direction::Upstream,
        ))
        .await
        .expect("add");
    let (_, err) = within("the reset", read_to_end(c)).await;
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
    assert_eq!(guard.stats().connections_reset, 1);
}

/// A reset on a stream whose sender has finished (a half-closed link: the client shut its
/// sending side, the server still holds its own) still resets the link: the stream's end used
/// to end its watch of the faults, and the reset never fired.
#[tokio::test]
async fn a_reset_on_a_stream_already_ended_still_resets_a_half_closed_link() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Reads to the client's end, then holds its side open, sending nothing.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink).await;
            held.push(s);
        }
    });
    let proxy = proxy_to(addr).await;
    let mut c = connect(proxy.listen_addr()).await;
    c.write_all(b"last words").await.expect("write");
    c.shutdown().await.expect("shut the sending side");
    // The end has passed the proxy: the server's read ended.
    wait_for("the end to pass", || proxy.stats().bytes_upstream >= 10).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_an_upstream_reset_resets(&proxy, &mut c).await;
    holder.abort();
}
