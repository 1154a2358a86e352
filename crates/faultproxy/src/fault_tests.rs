use super::*;

#[test]
fn json_round_trips_every_kind_with_defaults_filled_in() {
    let json = r#"{"name":"lat","kind":"latency","attributes":{"latency_ms":50}}"#;
    let f: Fault = serde_json::from_str(json).expect("parse");
    assert_eq!(
        f.kind,
        FaultKind::Latency {
            latency_ms: 50,
            jitter_ms: 0
        }
    );
    assert_eq!(f.direction, Direction::Downstream);
    assert_eq!(f.toxicity, 1.0);
    assert_eq!(f.target, Target::All);
    for kind in [
        FaultKind::Blackhole,
        FaultKind::Reset { timeout_ms: 5 },
        FaultKind::Slicer {
            average_size: 8,
            size_variation: 2,
            delay_us: 10,
        },
        FaultKind::Stall {
            loss_rate: 0.5,
            stall_ms: 10,
        },
    ] {
        let f = Fault::new("f", kind, Direction::Both)
            .with_target(Target::Workers(vec![WorkerId::parse("w1").expect("id")]));
        let text = serde_json::to_string(&f).expect("serialize");
        assert_eq!(serde_json::from_str::<Fault>(&text).expect(&text), f);
    }
    let bh: Fault = serde_json::from_str(r#"{"name":"b","kind":"blackhole","direction":"both"}"#)
        .expect("blackhole without attributes");
    assert_eq!(bh.kind, FaultKind::Blackhole);
}

#[test]
fn bad_faults_are_refused_with_the_reason() {
    for (json, what) in [
        (r#"{"name":"x","kind":"nope"}"#, "unknown fault kind"),
        (r#"{"name":"x","kind":"latency"}"#, "latency_ms"),
        (
            r#"{"name":"x","kind":"latency","attributes":{"latency_ms":1,"bogus":2}}"#,
            "bogus",
        ),
        (
            r#"{"name":"x","kind":"blackhole","toxicity":1.5}"#,
            "toxicity",
        ),
        (r#"{"name":"a b","kind":"blackhole"}"#, "name"),
        (
            r#"{"name":"x","kind":"corrupt","attributes":{"rate":2.0}}"#,
            "rate",
        ),
        (
            r#"{"name":"x","kind":"slicer","attributes":{"average_size":4,"size_variation":4}}"#,
            "size_variation",
        ),
        (
            r#"{"name":"x","kind":"slicer","attributes":{"average_size":18446744073709551615,"size_variation":8}}"#,
            "1073741824 bytes",
        ),
        (
            r#"{"name":"x","kind":"slicer","attributes":{"average_size":1073741824,"size_variation":1}}"#,
            "average_size",
        ),
        (
            r#"{"name":"x","kind":"bandwidth","attributes":{"bytes_per_sec":0}}"#,
            "bytes_per_sec",
        ),
        (
            r#"{"name":"x","kind":"blackhole","target":{"workers":[]}}"#,
            "worker",
        ),
        (
            r#"{"name":"x","kind":"blackhole","target":{"workers":["a/b"]}}"#,
            "id",
        ),
    ] {
        let err = serde_json::from_str::<Fault>(json).expect_err(json);
        assert!(err.to_string().contains(what), "{json}: {err}");
    }
}

/// The largest slicer accepted: its piece size is exactly [`MAX_SLICE`].
#[test]
fn a_slicer_up_to_the_largest_piece_is_accepted() {
    let json = format!(
        r#"{{"name":"x","kind":"slicer","attributes":{{"average_size":{},"size_variation":1}}}}"#,
        MAX_SLICE - 1
    );
    serde_json::from_str::<Fault>(&json).expect(&json);
}

#[test]
fn a_patch_merges_attributes_and_keeps_the_kind() {
    let f = Fault::new(
        "lat",
        FaultKind::Latency {
            latency_ms: 10,
            jitter_ms: 3,
        },
        Direction::Upstream,
    );
    let patch: FaultPatch =
        serde_json::from_str(r#"{"attributes":{"latency_ms":99},"toxicity":0.5}"#).expect("patch");
    let g = f.patched(&patch).expect("patched");
    assert_eq!(
        g.kind,
        FaultKind::Latency {
            latency_ms: 99,
            jitter_ms: 3
        }
    );
    assert_eq!(g.toxicity, 0.5);
    assert_eq!(g.direction, Direction::Upstream);
    let bad = FaultPatch {
        toxicity: Some(-1.0),
        ..FaultPatch::default()
    };
    assert!(f.patched(&bad).is_err());
}

#[test]
fn targets_match_only_known_named_workers() {
    let w1 = WorkerId::parse("w1").expect("id");
    let w2 = WorkerId::parse("w2").expect("id");
    let t = Target::Workers(vec![w1.clone()]);
    assert!(t.matches(Some(&w1)));
    assert!(!t.matches(Some(&w2)));
    assert!(!t.matches(None));
    assert!(Target::All.matches(None));
    assert!(Direction::Both.covers(Stream::Upstream));
    assert!(!Direction::Upstream.covers(Stream::Downstream));
}

#[test]
fn a_blackhole_takes_no_attributes() {
    let ok = r#"{"name":"b","kind":"blackhole","attributes":{}}"#;
    assert_eq!(
        serde_json::from_str::<Fault>(ok).expect(ok).kind,
        FaultKind::Blackhole
    );
    let bad = r#"{"name":"b","kind":"blackhole","attributes":{"timeout":0}}"#;
    let err = serde_json::from_str::<Fault>(bad).expect_err(bad);
    assert!(err.to_string().contains("timeout"), "{err}");
    let text = serde_json::to_string(&Fault::new("b", FaultKind::Blackhole, Direction::Both))
        .expect("serialize");
    assert!(text.contains(r#""attributes":{}"#), "{text}");
}
