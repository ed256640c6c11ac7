//! The timeline picture, read back as XML: every mark of a known timeline is where the
//! time axis says it must be (no root needed).

use roxmltree::{Document, Node};
use vfabric::timeline::svg::{self, MAIN_PAD, PLOT_LEFT, PLOT_RIGHT, ZOOM_MARGIN_US};
use vfabric::timeline::{AnnounceMark, FdbMove, Probe, Round, Timeline};

/// The quiesce, on the machine's clock (µs since the epoch).
const Q: u64 = 1_764_000_000_000_000;
const RESUME: u64 = Q + 3_000;
const FDB: u64 = Q + 3_150;
const ANNOUNCE_OFFSETS: [u64; 5] = [100, 50_100, 200_100, 450_100, 800_100];

/// Probes every 10 ms from 1 s before to 1 s after the quiesce, 0.1 ms each; the one
/// sent at the quiesce gets no reply. Three rounds before the quiesce.
fn known() -> Timeline {
    let probes = (0..=200u64)
        .map(|i| {
            let sent_t_us = Q - 1_000_000 + i * 10_000;
            Probe {
                seq: i + 1,
                sent_t_us,
                rtt_us: (sent_t_us != Q).then_some(100),
            }
        })
        .collect();
    let round = |round, start_t_us, end_t_us, pages_sent, pages_dirtied| Round {
        round,
        start_t_us,
        end_t_us,
        pages_sent,
        pages_dirtied,
    };
    Timeline {
        vm: "vm1".into(),
        from: "silo104".into(),
        to: "silo105".into(),
        interval_s: 0.01,
        probes,
        rounds: vec![
            round(1, Q - 900_000, Q - 100_000, 65_536, 2_031),
            round(2, Q - 100_000, Q - 20_000, 2_031, 151),
            round(3, Q - 20_000, Q - 1_000, 151, 12),
        ],
        quiesce_t_us: Some(Q),
        resume_t_us: Some(RESUME),
        announces: ANNOUNCE_OFFSETS
            .iter()
            .map(|o| AnnounceMark {
                t_us: RESUME + o,
                kind: "rarp".into(),
            })
            .collect(),
        fdb_move: Some(FdbMove {
            t_us: FDB,
            from: "silo104".into(),
            to: "silo105".into(),
            ethertype: "rarp".into(),
        }),
    }
}

/// x of `t` on an axis over [t0, t1].
fn x_of(t: u64, t0: u64, t1: u64) -> f64 {
    PLOT_LEFT + (t as f64 - t0 as f64) / (t1 - t0) as f64 * (PLOT_RIGHT - PLOT_LEFT)
}

/// The first panel: first to last probe (±1 s), padded by MAIN_PAD of the span.
fn main_x(t: u64) -> f64 {
    let pad = (2_000_000.0 * MAIN_PAD) as u64;
    x_of(t, Q - 1_000_000 - pad, Q + 1_000_000 + pad)
}

/// The close-up: ZOOM_MARGIN_US before the quiesce to as long after the last of
/// resume, first announce and FDB move (here the FDB move).
fn zoom_x(t: u64) -> f64 {
    x_of(t, Q - ZOOM_MARGIN_US, FDB + ZOOM_MARGIN_US)
}

fn has_class(n: &Node, class: &str) -> bool {
    n.attribute("class")
        .is_some_and(|c| c.split_whitespace().any(|w| w == class))
}

/// Elements carrying every class of `classes`.
fn all<'a>(doc: &'a Document, classes: &[&str]) -> Vec<Node<'a, 'a>> {
    doc.descendants()
        .filter(|n| n.is_element() && classes.iter().all(|c| has_class(n, c)))
        .collect()
}

fn num(n: &Node, attr: &str) -> f64 {
    n.attribute(attr)
        .unwrap_or_else(|| panic!("{:?} has no {attr}", n.tag_name()))
        .parse()
        .unwrap()
}

/// The x of every element of `classes` (lines: x1, which must equal x2; rects: x;
/// circles: cx), sorted.
fn xs(doc: &Document, classes: &[&str]) -> Vec<f64> {
    let mut v: Vec<f64> = all(doc, classes)
        .iter()
        .map(|n| match n.tag_name().name() {
            "line" => {
                assert!((num(n, "x1") - num(n, "x2")).abs() < 1e-9, "a slanted mark");
                num(n, "x1")
            }
            "circle" => num(n, "cx"),
            _ => num(n, "x"),
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn assert_near(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        // Coordinates are written with two decimals.
        assert!((g - w).abs() <= 0.01, "{what}: x {g} where {w} was due");
    }
}

/// Distinct values: a mark may be drawn as more than one segment.
fn dedup(mut v: Vec<f64>) -> Vec<f64> {
    v.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    v
}

#[test]
fn the_picture_is_xml_with_every_mark_on_its_instant() {
    let text = svg::render(&known());
    let doc = Document::parse(&text).expect("the SVG parses as XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );

    // The whole run.
    assert_near(
        &dedup(xs(&doc, &["announce-line", "main"])),
        &ANNOUNCE_OFFSETS.map(|o| main_x(RESUME + o)),
        "announces, whole run",
    );
    assert_near(
        &dedup(xs(&doc, &["fdb-move-line", "main"])),
        &[main_x(FDB)],
        "FDB move, whole run",
    );
    assert_near(&xs(&doc, &["lost", "main"]), &[main_x(Q)], "lost probe");
    let replies = xs(&doc, &["reply", "main"]);
    assert_eq!(replies.len(), 200);
    assert_near(&replies[..1], &[main_x(Q - 1_000_000)], "first reply");
    assert_near(
        &xs(&doc, &["round-sent"]),
        &[main_x(Q - 900_000), main_x(Q - 100_000), main_x(Q - 20_000)],
        "rounds",
    );
    // A round's bar spans the round.
    let r1 = all(&doc, &["round-sent"])
        .into_iter()
        .min_by(|a, b| num(a, "x").total_cmp(&num(b, "x")))
        .unwrap();
    assert!(
        (num(&r1, "width") - (main_x(Q - 100_000) - main_x(Q - 900_000))).abs() < 0.02,
        "round 1 is {} wide",
        num(&r1, "width")
    );
    // A round that sent more pages draws a taller bar.
    let mut heights: Vec<f64> = all(&doc, &["round-sent"])
        .iter()
        .map(|n| num(n, "height"))
        .collect();
    let sorted = {
        let mut s = heights.clone();
        s.sort_by(|a, b| b.total_cmp(a));
        s
    };
    heights.truncate(3);
    assert_eq!(heights, sorted);

    // The close-up: the downtime is shaded from the quiesce to the resume, and each
    // instant of the switch-over is marked where it happened.
    let shade = all(&doc, &["downtime", "zoom"]);
    assert_eq!(shade.len(), 1);
    assert!((num(&shade[0], "x") - zoom_x(Q)).abs() <= 0.01);
    assert!(
        (num(&shade[0], "width") - (zoom_x(RESUME) - zoom_x(Q))).abs() <= 0.02,
        "downtime shading is {} wide",
        num(&shade[0], "width")
    );
    assert_near(
        &xs(&doc, &["quiesce-line", "zoom"]),
        &[zoom_x(Q)],
        "quiesce",
    );
    assert_near(
        &xs(&doc, &["resume-line", "zoom"]),
        &[zoom_x(RESUME)],
        "resume",
    );
    assert_near(&xs(&doc, &["fdb-move-line", "zoom"]), &[zoom_x(FDB)], "FDB");
    // Only the first two announces fall within 50 ms of the FDB move.
    assert_near(
        &xs(&doc, &["announce-line", "zoom"]),
        &[zoom_x(RESUME + 100), zoom_x(RESUME + 50_100)],
        "announces, close-up",
    );
    assert_near(&xs(&doc, &["lost", "zoom"]), &[zoom_x(Q)], "lost, close-up");
    // The zoom's time axis: its "0" tick is the quiesce, "+20" is 20 ms later.
    let tick = |label: &str| {
        all(&doc, &["time", "zoom"])
            .into_iter()
            .find(|n| n.text() == Some(label))
            .map(|n| num(&n, "x"))
            .unwrap_or_else(|| panic!("no tick {label:?}"))
    };
    assert!((tick("0") - zoom_x(Q)).abs() <= 0.01);
    assert!((tick("+20") - zoom_x(Q + 20_000)).abs() <= 0.01);
    assert!((tick("−40") - zoom_x(Q - 40_000)).abs() <= 0.01);

    // Each mark of the close-up is labelled with its offset from the quiesce.
    let labels: Vec<String> = doc
        .descendants()
        .filter(|n| {
            n.attribute("class")
                .is_some_and(|c| c.ends_with("-label zoom"))
        })
        .filter_map(|n| n.text().map(str::to_string))
        .collect();
    for want in [
        "quiesce (t = 0)",
        "resume +3\u{2009}000 µs",
        "RARP 1 +3\u{2009}100 µs",
        "FDB move silo104 → silo105 +3\u{2009}150 µs",
        "RARP 2 +53\u{2009}100 µs",
    ] {
        assert!(
            labels.iter().any(|l| l == want),
            "no label {want:?} in {labels:?}"
        );
    }
}

#[test]
fn names_are_escaped_and_an_empty_timeline_still_draws() {
    let mut t = known();
    t.vm = "a<b>&\"c\"".into();
    let text = svg::render(&t);
    let doc = Document::parse(&text).expect("escaped names keep the SVG well-formed");
    assert!(doc
        .descendants()
        .any(|n| n.text().is_some_and(|s| s.contains("a<b>&\"c\""))));

    let empty = svg::render(&Timeline::default());
    let doc = Document::parse(&empty).expect("an empty timeline is still an SVG");
    assert!(all(&doc, &["reply"]).is_empty());
    assert!(all(&doc, &["zoom"]).is_empty(), "no quiesce, no close-up");
}
