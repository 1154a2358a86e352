use std::collections::VecDeque;

use super::*;
use crate::fault::{Direction, Target};
use crate::stats::FaultStats;

fn entry(id: FaultId, kind: FaultKind, direction: Direction) -> Arc<FaultEntry> {
    Arc::new(FaultEntry {
        id,
        revision: 0,
        fault: Fault::new(format!("f{id}"), kind, direction),
        counters: Arc::default(),
    })
}

/// `e` changed by `f`, as a patch changes a fault: its next revision.
fn with(e: &Arc<FaultEntry>, f: impl FnOnce(&mut Fault)) -> Arc<FaultEntry> {
    let mut fault = e.fault.clone();
    f(&mut fault);
    Arc::new(FaultEntry {
        id: e.id,
        revision: e.revision + 1,
        fault,
        counters: Arc::clone(&e.counters),
    })
}

fn stages_for(stream: Stream, worker: Option<&str>, link: u64) -> Stages {
    let proxy = Arc::new(ProxyCounters::default());
    let draws = Arc::new(Draws::new(7, link, Arc::clone(&proxy)));
    let worker = worker.map(|w| WorkerId::parse(w).expect("id"));
    Stages::new(stream, worker, draws, proxy, mix(7, link, 1))
}

/// A data chunk holding a copy of `bytes`.
fn data_chunk(bytes: impl AsRef<[u8]>, arrived: Instant) -> Chunk {
    Chunk::data(BytesMut::from(bytes.as_ref()), arrived)
}

fn stats(e: &FaultEntry) -> FaultStats {
    e.counters.snapshot()
}

/// Runs chunks through the stages the way the pump does, with a virtual clock.
/// Returns what was delivered (with delivery times) and the chunks left on hold.
fn drive(
    stages: &mut Stages,
    chunks: Vec<Chunk>,
    start: Instant,
) -> (Vec<(Vec<u8>, Instant)>, usize) {
    let mut now = start;
    let mut queue: VecDeque<Chunk> = chunks.into();
    let mut out = Vec::new();
    let mut held = 0;
    let mut steps = 0;
    while let Some(mut chunk) = queue.pop_front() {
        loop {
            steps += 1;
            assert!(steps < 100_000, "stages did not converge");
            match stages.next(&mut chunk, now) {
                Next::Wait { until, fault } => {
                    assert!(until > now);
                    now = until;
                    stages.waited(&chunk, fault);
                }
                Next::Split {
                    at,
                    fault,
                    tail_plan,
                } => {
                    let tail = chunk.split_off(at, fault, tail_plan);
                    queue.push_front(tail);
                }
                Next::Drop => break,
                Next::Hold => {
                    held += 1;
                    break;
                }
                Next::Deliver => {
                    out.push((chunk.data.to_vec(), now));
                    break;
                }
            }
        }
    }
    (out, held)
}

#[test]
fn latency_delays_each_chunk_from_its_arrival() {
    let e = entry(
        1,
        FaultKind::Latency {
            latency_ms: 100,
            jitter_ms: 0,
        },
        Direction::Downstream,
    );
    let mut s = stages_for(Stream::Downstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&[Arc::clone(&e)], t0);
    let chunks = vec![
        data_chunk(b"ab", t0),
        data_chunk(b"cd", t0 + Duration::from_millis(30)),
    ];
    let (out, _) = drive(&mut s, chunks, t0);
    assert_eq!(out[0], (b"ab".to_vec(), t0 + Duration::from_millis(100)));
    assert_eq!(out[1], (b"cd".to_vec(), t0 + Duration::from_millis(130)));
    let st = stats(&e);
    assert_eq!((st.bytes_passed, st.bytes_delayed), (4, 4));
}

#[test]
fn jitter_stays_within_bounds_and_repeats_with_the_seed() {
    let e = entry(
        1,
        FaultKind::Latency {
            latency_ms: 50,
            jitter_ms: 20,
        },
        Direction::Upstream,
    );
    let t0 = Instant::now();
    let run = || {
        let mut s = stages_for(Stream::Upstream, None, 3);
        s.rebuild(&[Arc::clone(&e)], t0);
        let chunks = (0..50).map(|_| data_chunk(vec![1], t0)).collect();
        let (out, _) = drive(&mut s, chunks, t0);
        out.iter().map(|(_, t)| *t - t0).collect::<Vec<_>>()
    };
    let a = run();
    assert!(
        a.iter().all(|d| (30..=70).contains(&d.as_millis())),
        "{a:?}"
    );
    assert!(a.iter().any(|d| d.as_millis() != 50));
    assert_eq!(a, run());
}

#[test]
fn blackhole_drops_data_and_holds_the_fin() {
    let e = entry(1, FaultKind::Blackhole, Direction::Both);
    let mut s = stages_for(Stream::Upstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&[Arc::clone(&e)], t0);
    let (out, held) = drive(
        &mut s,
        vec![data_chunk(vec![0; 10], t0), Chunk::eof(t0)],
        t0,
    );
    assert!(out.is_empty());
    assert_eq!(held, 1);
    assert_eq!(stats(&e).bytes_dropped, 10);
    s.rebuild(&[], t0);
    let (out, held) = drive(&mut s, vec![data_chunk(vec![1; 3], t0), Chunk::eof(t0)], t0);
    assert_eq!((out.len(), held), (2, 0));
}

/// A peer's reset waits behind a latency, as the bytes before it did, but neither a blackhole
/// nor a slow close (both about a FIN) holds it: the sender's socket is gone.
#[test]
fn a_peers_reset_waits_out_a_latency_but_no_blackhole_or_slow_close() {
    let lat = entry(
        1,
        FaultKind::Latency {
            latency_ms: 100,
            jitter_ms: 0,
        },
        Direction::Both,
    );
    let hole = entry(2, FaultKind::Blackhole, Direction::Both);
    let slow = entry(3, FaultKind::SlowClose { delay_ms: 5_000 }, Direction::Both);
    let mut s = stages_for(Stream::Upstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&[lat, hole, slow], t0);
    let (out, held) = drive(&mut s, vec![Chunk::reset(t0)], t0);
    assert_eq!(held, 0, "the reset was held");
    assert_eq!(out, [(Vec::new(), t0 + Duration::from_millis(100))]);
}

/// A slow close holds the clean close (FIN) for its delay, and counts it: it holds no byte.
#[test]
fn a_slow_close_holds_the_fin_for_its_delay_and_counts_it() {
    let e = entry(1, FaultKind::SlowClose { delay_ms: 700 }, Direction::Both);
    let mut s = stages_for(Stream::Upstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&[Arc::clone(&e)], t0);
    let (out, held) = drive(&mut s, vec![data_chunk(vec![1; 3], t0), Chunk::eof(t0)], t0);
    assert_eq!(held, 0);
    assert_eq!(
        out,
        [
            (vec![1; 3], t0),
            (Vec::new(), t0 + Duration::from_millis(700))
        ]
    );
    let st = stats(&e);
    assert_eq!((st.closes_delayed, st.bytes_delayed), (1, 0), "{st:?}");
    // A reset is not held, nor counted.
    let mut s = stages_for(Stream::Upstream, None, 1);
    s.rebuild(&[Arc::clone(&e)], t0);
    drive(&mut s, vec![Chunk::reset(t0)], t0);
    assert_eq!(stats(&e).closes_delayed, 1);
}

#[test]
fn limit_data_passes_exactly_the_limit_then_asks_to_close() {
    let e = entry(1, FaultKind::LimitData { bytes: 7 }, Direction::Downstream);
    let mut s = stages_for(Stream::Downstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&[Arc::clone(&e)], t0);
    let mut a = data_chunk(vec![1; 4], t0);
    assert_eq!(s.next(&mut a, t0), Next::Deliver);
    assert!(a.close_after.is_none());
    let mut b = data_chunk(vec![2; 10], t0);
    assert_eq!(s.next(&mut b, t0), Next::Deliver);
    assert_eq!(b.data, vec![2; 3]);
    assert!(b.close_after.is_some());
    let st = stats(&e);
    assert_eq!((st.bytes_passed, st.bytes_dropped), (7, 7));
}

#[test]
fn corrupt_at_rate_one_flips_exactly_one_bit_per_byte() {
    let e = entry(1, FaultKind::Corrupt { rate: 1.0 }, Direction::Downstream);
    let mut s = stages_for(Stream::Downstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&[Arc::clone(&e)], t0);
    let original: Vec<u8> = (0..=255).collect();
    let (out, _) = drive(&mut s, vec![data_chunk(original.clone(), t0)], t0);
    let got = &out[0].0;
    assert!(
        original
            .iter()
            .zip(got)
            .all(|(a, b)| (a ^ b).count_ones() == 1)
    );
    assert_eq!(stats(&e).bytes_corrupted, 256);
}

#[test]
fn slicer_cuts_pieces_within_bounds_and_keeps_every_byte() {
    let kind = FaultKind::Slicer {
        average_size: 10,
        size_variation: 4,
        delay_us: 500,
    };
    let e = entry(1, kind, Direction::Downstream);
    let mut s = stages_for(Stream::Downstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&[Arc::clone(&e)], t0);
    let original: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let (out, _) = drive(&mut s, vec![data_chunk(original.clone(), t0)], t0);
    assert!(out.len() >= 1000 / 14);
    assert!(out.iter().all(|(p, _)| (1..=14).contains(&p.len())));
    assert!(
        out.windows(2)
            .all(|w| w[1].1 >= w[0].1 + Duration::from_micros(500))
    );
    assert_eq!(out.concat_bytes(), original);
    assert_eq!(stats(&e).bytes_passed, 1000);
}

/// Validation bounds a slicer's sizes, but the stages never trust it: sizes at the top of
/// `usize` pass a chunk whole instead of overflowing the size draw (a panic in the writer).
#[test]
fn a_slicer_of_sizes_near_usize_max_passes_chunks_whole_without_overflowing() {
    for (average_size, size_variation) in [(usize::MAX, 8), (usize::MAX / 2 + 1, usize::MAX / 2)] {
        let kind = FaultKind::Slicer {
            average_size,
            size_variation,
            delay_us: 0,
        };
        let e = entry(1, kind, Direction::Downstream);
        let mut s = stages_for(Stream::Downstream, None, 1);
        let t0 = Instant::now();
        s.rebuild(&[Arc::clone(&e)], t0);
        let (out, _) = drive(&mut s, vec![data_chunk(vec![7u8; 100], t0)], t0);
        assert_eq!(out.len(), 1, "{average_size} ± {size_variation}");
        assert_eq!(out.concat_bytes(), vec![7u8; 100]);
    }
}

/// A slicer cuts a 32 KiB chunk into hundreds of pieces: each cut must not copy the rest.
#[test]
fn splitting_a_chunk_shares_its_buffer_instead_of_copying_the_rest() {
    let t0 = Instant::now();
    let mut head = data_chunk(vec![5u8; 1000], t0);
    let start = head.data.as_ptr();
    let tail = head.split_off(10, 1, None);
    assert_eq!((head.data.len(), tail.data.len()), (10, 990));
    assert_eq!(head.data.as_ptr(), start);
    assert_eq!(
        tail.data.as_ptr(),
        start.wrapping_add(10),
        "the tail was copied"
    );
}

#[test]
fn bandwidth_paces_the_stream_to_its_rate() {
    let e = entry(
        1,
        FaultKind::Bandwidth {
            bytes_per_sec: 1000,
        },
        Direction::Upstream,
    );
    let mut s = stages_for(Stream::Upstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&[Arc::clone(&e)], t0);
    let original = vec![9u8; 1000];
    let (out, _) = drive(&mut s, vec![data_chunk(original.clone(), t0)], t0);
    assert!(out.iter().all(|(p, _)| p.len() <= 100));
    assert_eq!(
        out.last().map(|(_, t)| *t),
        Some(t0 + Duration::from_secs(1))
    );
    assert_eq!(out.concat_bytes(), original);
}

/// Stacked limits on one stream give the rate of the slowest, wherever it sits in the chain:
/// each used to pace the chunk in turn, so 2000, 1000 and 2000 B/s gave 500.
#[test]
fn stacked_bandwidth_faults_pace_the_stream_to_the_slowest_not_the_sum_of_their_times() {
    let bw = |id, bytes_per_sec| {
        entry(
            id,
            FaultKind::Bandwidth { bytes_per_sec },
            Direction::Upstream,
        )
    };
    let chain = [bw(1, 2000), bw(2, 1000), bw(3, 2000)];
    let mut s = stages_for(Stream::Upstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&chain, t0);
    let original = vec![9u8; 1000];
    let (out, _) = drive(&mut s, vec![data_chunk(original.clone(), t0)], t0);
    assert_eq!(
        out.last().map(|(_, t)| *t - t0),
        Some(Duration::from_secs(1))
    );
    assert_eq!(out.concat_bytes(), original);
    for e in &chain {
        assert_eq!(stats(e).bytes_passed, 1000, "{}", e.fault.name);
    }
    assert_eq!(stats(&chain[0]).bytes_delayed, 0);
    assert_eq!(stats(&chain[1]).bytes_delayed, 1000);
}

#[test]
fn the_queue_holds_a_second_of_the_slowest_bandwidth_within_its_floor_and_default() {
    use crate::pump::{QUEUE_BYTES, QUEUE_FLOOR};
    let bw = |id, bytes_per_sec| {
        entry(
            id,
            FaultKind::Bandwidth { bytes_per_sec },
            Direction::Upstream,
        )
    };
    let t0 = Instant::now();
    let mut s = stages_for(Stream::Upstream, None, 1);
    let cases = [
        (vec![], QUEUE_BYTES),
        (vec![bw(1, 200_000), bw(2, 100_000)], 100_000),
        (vec![bw(1, 1000)], QUEUE_FLOOR),
        (vec![bw(1, 1 << 40)], QUEUE_BYTES),
        (
            vec![entry(1, FaultKind::Blackhole, Direction::Upstream)],
            QUEUE_BYTES,
        ),
    ];
    for (chain, limit) in cases {
        s.rebuild(&chain, t0);
        assert_eq!(s.queue_limit(), limit, "{chain:?}");
    }
}

#[test]
fn stall_holds_chunks_at_full_loss_and_never_at_zero() {
    let t0 = Instant::now();
    for (rate, expect) in [(1.0, 40), (0.0, 0)] {
        let e = entry(
            1,
            FaultKind::Stall {
                loss_rate: rate,
                stall_ms: 40,
            },
            Direction::Downstream,
        );
        let mut s = stages_for(Stream::Downstream, None, 1);
        s.rebuild(&[Arc::clone(&e)], t0);
        let (out, _) = drive(&mut s, vec![data_chunk(vec![1; 5], t0)], t0);
        assert_eq!(out[0].1 - t0, Duration::from_millis(expect));
        assert_eq!(stats(&e).bytes_delayed, if expect > 0 { 5 } else { 0 });
    }
}

#[test]
fn toxicity_is_drawn_once_per_link_and_counted_once_for_both_streams() {
    let half = entry(1, FaultKind::Blackhole, Direction::Both);
    let half = with(&half, |f| f.toxicity = 0.5);
    let t0 = Instant::now();
    let mut hits = 0;
    for link in 0..1000 {
        let proxy = Arc::new(ProxyCounters::default());
        let draws = Arc::new(Draws::new(7, link, Arc::clone(&proxy)));
        let a = draws.applies(&half);
        assert_eq!(a, draws.applies(&half), "a second ask draws again");
        let twin = Arc::new(FaultEntry {
            id: half.id,
            revision: half.revision,
            fault: half.fault.clone(),
            counters: Arc::default(),
        });
        assert_eq!(a, Draws::new(7, link, proxy).applies(&twin), "not seeded");
        hits += usize::from(a);
    }
    assert!((400..600).contains(&hits), "{hits} of 1000");
    assert_eq!(stats(&half).connections_affected, hits as u64);

    for (toxicity, affected) in [(0.0, 0), (1.0, 1)] {
        let e = with(&entry(2, FaultKind::Blackhole, Direction::Both), |f| {
            f.toxicity = toxicity
        });
        let proxy = Arc::new(ProxyCounters::default());
        let draws = Arc::new(Draws::new(7, 1, Arc::clone(&proxy)));
        for stream in [Stream::Upstream, Stream::Downstream] {
            let mut s = Stages::new(stream, None, Arc::clone(&draws), Arc::clone(&proxy), 1);
            s.rebuild(&[Arc::clone(&e)], t0);
            let (out, _) = drive(&mut s, vec![data_chunk(vec![1], t0)], t0);
            assert_eq!(out.len(), 1 - affected);
        }
        assert_eq!(stats(&e).connections_affected, affected as u64);
    }
}

#[test]
fn worker_targets_and_directions_select_the_stages() {
    let w1 = WorkerId::parse("w1").expect("id");
    let e = with(&entry(1, FaultKind::Blackhole, Direction::Upstream), |f| {
        f.target = Target::Workers(vec![w1]);
    });
    let t0 = Instant::now();
    let cases = [
        (Stream::Upstream, Some("w1"), 0),
        (Stream::Upstream, Some("w2"), 1),
        (Stream::Upstream, None, 1),
        (Stream::Downstream, Some("w1"), 1),
    ];
    for (stream, worker, delivered) in cases {
        let mut s = stages_for(stream, worker, 1);
        s.rebuild(&[Arc::clone(&e)], t0);
        let (out, _) = drive(&mut s, vec![data_chunk(vec![1], t0)], t0);
        assert_eq!(out.len(), delivered, "{stream:?} {worker:?}");
    }
}

#[test]
fn a_reset_is_due_its_timeout_after_it_became_active() {
    let e = entry(
        1,
        FaultKind::Reset { timeout_ms: 250 },
        Direction::Downstream,
    );
    let mut s = stages_for(Stream::Downstream, None, 1);
    let t0 = Instant::now();
    assert!(s.reset_due().is_none());
    s.rebuild(&[Arc::clone(&e)], t0);
    s.rebuild(&[Arc::clone(&e)], t0 + Duration::from_secs(5));
    let (due, by) = s.reset_due().expect("due");
    assert_eq!((due, by.id), (t0 + Duration::from_millis(250), 1));
}

#[test]
fn a_chain_change_mid_wait_does_not_apply_a_stage_twice() {
    let c = entry(1, FaultKind::Corrupt { rate: 1.0 }, Direction::Downstream);
    let l = entry(
        2,
        FaultKind::Latency {
            latency_ms: 100,
            jitter_ms: 0,
        },
        Direction::Downstream,
    );
    let mut s = stages_for(Stream::Downstream, None, 1);
    let t0 = Instant::now();
    s.rebuild(&[Arc::clone(&c), Arc::clone(&l)], t0);
    let mut chunk = data_chunk(vec![0; 4], t0);
    assert!(matches!(s.next(&mut chunk, t0), Next::Wait { .. }));
    // The latency fault is removed while the chunk waits.
    s.rebuild(&[Arc::clone(&c)], t0 + Duration::from_millis(10));
    assert_eq!(
        s.next(&mut chunk, t0 + Duration::from_millis(10)),
        Next::Deliver
    );
    assert!(chunk.data.iter().all(|b| b.count_ones() == 1));
    assert_eq!(stats(&c).bytes_corrupted, 4);
}

trait ConcatBytes {
    fn concat_bytes(&self) -> Vec<u8>;
}

impl ConcatBytes for Vec<(Vec<u8>, Instant)> {
    fn concat_bytes(&self) -> Vec<u8> {
        self.iter().flat_map(|(p, _)| p.iter().copied()).collect()
    }
}

/// A fault changed while a chunk waits on it applies its new terms to that chunk: a latency
/// cut from 5 s to 100 ms lets it go 100 ms after its arrival, and a bandwidth raised from
/// 100 B/s to 1 MB/s lets it go at the new rate, not at the end the old one planned. A chain
/// change that keeps the fault as it was keeps the deadline.
#[test]
fn a_fault_changed_while_a_chunk_waits_applies_its_new_terms_to_it() {
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    let latency = |latency_ms| FaultKind::Latency {
        latency_ms,
        jitter_ms: 0,
    };
    let slow = entry(1, latency(5_000), Direction::Downstream);
    let other = entry(2, FaultKind::Corrupt { rate: 0.0 }, Direction::Downstream);
    let mut s = stages_for(Stream::Downstream, None, 1);
    s.rebuild(&[Arc::clone(&slow)], t0);
    let mut chunk = data_chunk(vec![1; 4], t0);
    let waits = |until| Next::Wait { until, fault: 1 };
    assert_eq!(s.next(&mut chunk, at(0)), waits(at(5_000)));
    s.rebuild(&[Arc::clone(&slow), Arc::clone(&other)], at(5));
    assert_eq!(s.next(&mut chunk, at(5)), waits(at(5_000)), "unchanged");
    let fast = with(&slow, |f| f.kind = latency(100));
    s.rebuild(&[fast], at(10));
    assert_eq!(s.next(&mut chunk, at(10)), waits(at(100)));

    let rate = |bytes_per_sec| FaultKind::Bandwidth { bytes_per_sec };
    let narrow = entry(3, rate(100), Direction::Downstream);
    let mut s = stages_for(Stream::Downstream, None, 2);
    s.rebuild(&[Arc::clone(&narrow)], t0);
    let mut chunk = data_chunk(vec![1; 10], t0);
    assert_eq!(
        s.next(&mut chunk, at(0)),
        Next::Wait {
            until: at(100),
            fault: 3
        }
    );
    s.rebuild(&[with(&narrow, |f| f.kind = rate(1_000_000))], at(10));
    match s.next(&mut chunk, at(10)) {
        Next::Wait { until, fault: 3 } => assert!(until < at(11), "{:?}", until - t0),
        other => panic!("{other:?}"),
    }
}

/// A link keeps a toxicity draw only for the faults still in the chain: one open while
/// thousands of faults come and go (a test harness adding and removing them) does not keep
/// a draw of each.
#[test]
fn a_link_forgets_the_draws_of_faults_removed_from_the_chain() {
    let mut s = stages_for(Stream::Downstream, None, 1);
    let t0 = Instant::now();
    for id in 1..=1000 {
        let e = entry(id, FaultKind::Corrupt { rate: 0.0 }, Direction::Both);
        s.rebuild(&[e], t0);
    }
    let drawn = s.draws.drawn.lock().expect("draws").len();
    assert!(drawn <= 2, "{drawn} draws kept for 1 fault");
}
