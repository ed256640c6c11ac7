//! The picture of a [`Timeline`] as an SVG document (a core: a value in, a string out).
//!
//! Three panels share one story. The first shows every ping probe on a time axis
//! (replies as dots at their round-trip time, lost probes as red ticks), the
//! quiesce → resume window shaded, and each announce and the FDB move marked and
//! labelled with its offset from the quiesce. The second, on the same axis, shows the
//! pre-copy rounds as bars: pages sent and pages dirtied meanwhile. The third zooms on
//! the switch-over: from [`ZOOM_MARGIN_US`] before the quiesce to as long after the
//! last of resume, first announce and FDB move.
//!
//! The SVG is written by hand: a few rectangles, lines and labels, where a plotting
//! crate would bring its own layout and leave the annotations (shaded windows,
//! labelled marks) as much work as they are here.

use std::fmt::Write as _;

use super::Timeline;

/// Width of the picture.
pub const WIDTH: f64 = 960.0;
/// x of the left edge of every plot: where each time axis starts.
pub const PLOT_LEFT: f64 = 92.0;
/// x of the right edge of every plot: where each time axis ends.
pub const PLOT_RIGHT: f64 = 930.0;
/// The first panel spans from the earliest to the latest instant drawn, widened by
/// this fraction of that span on each side.
pub const MAIN_PAD: f64 = 0.02;
/// The zoom starts this long before the quiesce and ends this long after the last of
/// resume, first announce and FDB move.
pub const ZOOM_MARGIN_US: u64 = 50_000;
/// Marks later than this after the quiesce are left out of the zoom (and say so).
pub const ZOOM_MAX_US: u64 = 1_000_000;

const RTT_PLOT_H: f64 = 170.0;
const ROUNDS_PLOT_H: f64 = 90.0;
const LOST_STRIP_H: f64 = 16.0;
const LABEL_ROW_H: f64 = 15.0;
const CHAR_W: f64 = 6.4;

const C_REPLY: &str = "#1f4e79";
const C_LOST: &str = "#d62728";
const C_DOWN: &str = "#f4a261";
const C_STALE: &str = "#9e9e9e";
const C_EDGE: &str = "#b35806";
const C_ANNOUNCE: &str = "#7b3fa0";
const C_FDB: &str = "#1b8a3a";
const C_SENT: &str = "#4c72b0";
const C_DIRTY: &str = "#dd8452";
const C_GRID: &str = "#e6e6e6";
const C_AXIS: &str = "#444444";
const C_TEXT: &str = "#222222";
const C_NOTE: &str = "#555555";

/// Draws `t` as a standalone SVG document.
pub fn render(t: &Timeline) -> String {
    let mut d = Doc::default();
    let origin = t
        .quiesce_t_us
        .or_else(|| t.probes.iter().map(|p| p.sent_t_us).min())
        .unwrap_or(0);
    let rtt = RttScale::new(t);

    d.y = 30.0;
    let title = if t.from.is_empty() && t.to.is_empty() {
        format!("{}: live migration", t.vm)
    } else {
        format!("{}: live migration {} → {}", t.vm, t.from, t.to)
    };
    d.text(20.0, d.y, "start", 19.0, "bold", C_TEXT, "title", &title);
    d.y += 22.0;
    d.text(
        20.0,
        d.y,
        "start",
        13.0,
        "normal",
        C_NOTE,
        "subtitle",
        &headline(t),
    );
    d.y += 24.0;
    legend(&mut d);
    d.y += 30.0;

    // Panel 1 and 2: the whole run on one axis.
    let main = TimeScale::main(t);
    d.text(
        20.0,
        d.y,
        "start",
        14.0,
        "bold",
        C_TEXT,
        "panel-title",
        &format!(
            "The whole run: ping every {} from the client, and the pre-copy rounds",
            seconds(t.interval_s)
        ),
    );
    d.y += 8.0;
    let main_marks = marks(t, origin, &main);
    // Marks that the close-up shows are one label here: at this scale they touch.
    let zoom = TimeScale::zoom(t);
    let mut main_labels = Vec::new();
    let (near, far): (Vec<&Mark>, Vec<&Mark>) = main_marks
        .iter()
        .partition(|m| zoom.as_ref().is_some_and(|z| z.contains(m.t_us)));
    if let Some(first) = near.first() {
        main_labels.push(Label {
            x: main.x(first.t_us),
            text: "switch-over (close-up below)".into(),
            class: "switch-over-label main".into(),
            color: C_EDGE,
        });
    }
    for m in far {
        main_labels.extend(labels_of(std::slice::from_ref(m), &main, "main"));
    }
    let top = rtt_panel(&mut d, t, &main, &rtt, &main_labels, "main");
    let rtt_bottom = d.y;
    d.y += 26.0;
    let (rounds_top, rounds_bottom) = rounds_panel(&mut d, t, &main);
    // The marks run down through the rounds too, so rounds and loss line up.
    for m in &main_marks {
        let x = main.x(m.t_us);
        let class = format!("{}-line main", m.class);
        d.line_cls(&class, x, top, x, rtt_bottom, m.color, 1.0, Some("4 3"));
        d.line_cls(
            &class,
            x,
            rounds_top,
            x,
            rounds_bottom,
            m.color,
            1.0,
            Some("4 3"),
        );
    }
    time_axis(&mut d, &main, origin, rounds_bottom, "main");
    d.y = rounds_bottom + 48.0;

    // Panel 3: the switch-over, close up.
    if let Some(zoom) = zoom {
        d.y += 10.0;
        d.text(
            20.0,
            d.y,
            "start",
            14.0,
            "bold",
            C_TEXT,
            "panel-title",
            &format!(
                "The switch-over, close up: {} ms before the quiesce to {} ms after the FDB move",
                ZOOM_MARGIN_US / 1000,
                ZOOM_MARGIN_US / 1000
            ),
        );
        d.y += 8.0;
        let zmarks = marks(t, origin, &zoom);
        let zlabels = labels_of(&zmarks, &zoom, "zoom");
        let top = rtt_panel(&mut d, t, &zoom, &rtt, &zlabels, "zoom");
        let bottom = d.y;
        for m in &zmarks {
            d.line_cls(
                &format!("{}-line zoom", m.class),
                zoom.x(m.t_us),
                top,
                zoom.x(m.t_us),
                bottom,
                m.color,
                1.2,
                Some("4 3"),
            );
        }
        unreachable_bracket(&mut d, t, &zoom);
        time_axis(&mut d, &zoom, origin, bottom, "zoom");
        let late: Vec<Mark> = marks_all(t, origin)
            .into_iter()
            .filter(|m| !zoom.contains(m.t_us))
            .collect();
        d.y = bottom + 62.0;
        if !late.is_empty() {
            let names: Vec<&str> = late.iter().map(|m| m.short.as_str()).collect();
            d.text(
                PLOT_LEFT,
                d.y,
                "start",
                11.5,
                "normal",
                C_NOTE,
                "note",
                &format!("Outside this close-up (see above): {}.", names.join(", ")),
            );
            d.y += 16.0;
        }
    }
    d.text(
        PLOT_LEFT,
        d.y,
        "start",
        11.5,
        "normal",
        C_NOTE,
        "note",
        "Times are offsets from the quiesce on the machine's one clock; a probe is drawn when it was sent.",
    );
    d.y += 16.0;
    d.finish(t)
}

/// One line of the key figures.
fn headline(t: &Timeline) -> String {
    let (sent, lost) = t.probe_counts();
    let mut parts = vec![format!("{sent} probes, {lost} lost")];
    if let Some(g) = t.longest_gap_us() {
        parts.push(format!("longest gap between replies {}", ms(g)));
    }
    if let Some(d) = t.downtime_us() {
        parts.push(format!("downtime (quiesce → resume) {}", ms(d)));
    }
    if let (Some(q), Some(f)) = (t.quiesce_t_us, &t.fdb_move) {
        parts.push(format!(
            "quiesce → FDB move {}",
            ms(f.t_us.saturating_sub(q))
        ));
    }
    parts.join("  ·  ")
}

fn legend(d: &mut Doc) {
    let y = d.y;
    let mut x = 20.0;
    let mut item = |d: &mut Doc, glyph: &dyn Fn(&mut Doc, f64, f64), label: &str| {
        glyph(d, x, y);
        d.text(
            x + 18.0,
            y + 4.0,
            "start",
            11.5,
            "normal",
            C_TEXT,
            "legend",
            label,
        );
        x += 34.0 + label.chars().count() as f64 * 11.5 * 0.52;
    };
    item(
        d,
        &|d, x, y| d.circle("legend-glyph", x + 6.0, y, 3.0, C_REPLY),
        "reply (RTT)",
    );
    item(
        d,
        &|d, x, y| {
            d.line_cls(
                "legend-glyph",
                x + 6.0,
                y - 6.0,
                x + 6.0,
                y + 6.0,
                C_LOST,
                2.5,
                None,
            )
        },
        "no reply",
    );
    item(
        d,
        &|d, x, y| d.rect("legend-glyph", x, y - 6.0, 13.0, 12.0, C_DOWN, 0.55),
        "VM runs nowhere",
    );
    item(
        d,
        &|d, x, y| d.rect("legend-glyph", x, y - 6.0, 13.0, 12.0, C_STALE, 0.35),
        "switch still sends to the old port",
    );
    item(
        d,
        &|d, x, y| {
            d.line_cls(
                "legend-glyph",
                x + 6.0,
                y - 7.0,
                x + 6.0,
                y + 7.0,
                C_ANNOUNCE,
                1.5,
                Some("4 3"),
            )
        },
        "announce",
    );
    item(
        d,
        &|d, x, y| {
            d.line_cls(
                "legend-glyph",
                x + 6.0,
                y - 7.0,
                x + 6.0,
                y + 7.0,
                C_FDB,
                1.5,
                Some("4 3"),
            )
        },
        "FDB move",
    );
}

/// A label above a panel, at the x of what it names.
struct Label {
    x: f64,
    text: String,
    class: String,
    color: &'static str,
}

fn labels_of(marks: &[Mark], scale: &TimeScale, panel: &str) -> Vec<Label> {
    marks
        .iter()
        .map(|m| Label {
            x: scale.x(m.t_us),
            text: m.label.clone(),
            class: format!("{}-label {panel}", m.class),
            color: m.color,
        })
        .collect()
}

/// A labelled instant.
struct Mark {
    t_us: u64,
    class: &'static str,
    color: &'static str,
    label: String,
    short: String,
}

fn marks_all(t: &Timeline, origin: u64) -> Vec<Mark> {
    let mut v = Vec::new();
    if let Some(q) = t.quiesce_t_us {
        v.push(Mark {
            t_us: q,
            class: "quiesce",
            color: C_EDGE,
            label: if q == origin {
                "quiesce (t = 0)".to_string()
            } else {
                format!("quiesce {}", offset(q, origin))
            },
            short: "quiesce".into(),
        });
    }
    if let Some(r) = t.resume_t_us {
        v.push(Mark {
            t_us: r,
            class: "resume",
            color: C_EDGE,
            label: format!("resume {}", offset(r, origin)),
            short: "resume".into(),
        });
    }
    for (i, a) in t.announces.iter().enumerate() {
        let kind = a.kind.to_uppercase();
        v.push(Mark {
            t_us: a.t_us,
            class: "announce",
            color: C_ANNOUNCE,
            label: format!("{kind} {} {}", i + 1, offset(a.t_us, origin)),
            short: format!("{kind} {} {}", i + 1, offset(a.t_us, origin)),
        });
    }
    if let Some(f) = &t.fdb_move {
        v.push(Mark {
            t_us: f.t_us,
            class: "fdb-move",
            color: C_FDB,
            label: format!("FDB move {} → {} {}", f.from, f.to, offset(f.t_us, origin)),
            short: format!("FDB move {}", offset(f.t_us, origin)),
        });
    }
    v.sort_by_key(|m| m.t_us);
    v
}

fn marks(t: &Timeline, origin: u64, scale: &TimeScale) -> Vec<Mark> {
    marks_all(t, origin)
        .into_iter()
        .filter(|m| scale.contains(m.t_us))
        .collect()
}

/// Label band, lost strip and RTT plot; returns the y where mark lines start.
/// Leaves `d.y` at the bottom of the plot.
fn rtt_panel(
    d: &mut Doc,
    t: &Timeline,
    scale: &TimeScale,
    rtt: &RttScale,
    labels: &[Label],
    panel: &str,
) -> f64 {
    // Mark labels, packed into as few rows as keep them apart.
    let placed = pack(labels.iter().map(|l| (l.x, l.text.as_str())));
    let rows = placed.iter().map(|p| p.row + 1).max().unwrap_or(0);
    let band_top = d.y;
    let lines_top = band_top + 4.0;
    for (l, p) in labels.iter().zip(&placed) {
        let y = band_top + (p.row as f64 + 1.0) * LABEL_ROW_H;
        d.text(
            p.text_x, y, p.anchor, 11.5, "normal", l.color, &l.class, &l.text,
        );
    }
    d.y = band_top + rows as f64 * LABEL_ROW_H + 8.0;

    // Shading: from the quiesce to the resume the VM runs nowhere; from the resume to
    // the FDB move the switch still sends its frames to the old port.
    let shade_top = d.y;
    let plot_top = shade_top + LOST_STRIP_H + 8.0;
    let plot_bottom = plot_top + RTT_PLOT_H;
    if let (Some(q), Some(r)) = (t.quiesce_t_us, t.resume_t_us) {
        let (x0, x1) = (scale.x(q), scale.x(r).max(scale.x(q) + 2.0));
        d.rect(
            &format!("downtime {panel}"),
            x0,
            shade_top,
            x1 - x0,
            plot_bottom - shade_top,
            C_DOWN,
            0.45,
        );
        if let Some(f) = t.fdb_move.as_ref().filter(|f| f.t_us > r) {
            let x2 = scale.x(f.t_us.min(scale.t1)).max(x1 + 1.0);
            d.rect(
                &format!("stale {panel}"),
                x1,
                shade_top,
                x2 - x1,
                plot_bottom - shade_top,
                C_STALE,
                0.30,
            );
        }
    }

    // The lost strip.
    d.text(
        PLOT_LEFT - 8.0,
        shade_top + LOST_STRIP_H / 2.0 + 4.0,
        "end",
        11.0,
        "bold",
        C_LOST,
        "axis-label",
        "no reply",
    );
    d.rect(
        "strip",
        PLOT_LEFT,
        shade_top,
        PLOT_RIGHT - PLOT_LEFT,
        LOST_STRIP_H,
        C_LOST,
        0.06,
    );
    for p in t
        .probes
        .iter()
        .filter(|p| p.rtt_us.is_none() && scale.contains(p.sent_t_us))
    {
        let x = scale.x(p.sent_t_us);
        d.line_cls(
            &format!("lost {panel}"),
            x,
            shade_top + 1.0,
            x,
            shade_top + LOST_STRIP_H - 1.0,
            C_LOST,
            2.5,
            None,
        );
    }

    // RTT grid and axis.
    for (v, major) in rtt.ticks() {
        let y = rtt.y(v, plot_top, plot_bottom);
        d.line_cls(
            "grid",
            PLOT_LEFT,
            y,
            PLOT_RIGHT,
            y,
            C_GRID,
            if major { 1.0 } else { 0.5 },
            None,
        );
        if major {
            d.text(
                PLOT_LEFT - 8.0,
                y + 4.0,
                "end",
                11.0,
                "normal",
                C_AXIS,
                "tick-label",
                &format!("{} ms", trim_float(v)),
            );
        }
    }
    d.rotated_text(
        24.0,
        (plot_top + plot_bottom) / 2.0,
        12.0,
        C_AXIS,
        "round-trip time (log)",
    );
    d.line_cls(
        "axis",
        PLOT_LEFT,
        plot_top,
        PLOT_LEFT,
        plot_bottom,
        C_AXIS,
        1.0,
        None,
    );
    for p in &t.probes {
        if let Some(r) = p.rtt_us {
            if scale.contains(p.sent_t_us) {
                let y = rtt.y(r as f64 / 1000.0, plot_top, plot_bottom);
                d.circle(
                    &format!("reply {panel}"),
                    scale.x(p.sent_t_us),
                    y,
                    2.3,
                    C_REPLY,
                );
            }
        }
    }
    d.y = plot_bottom;
    lines_top
}

/// The client-visible loss window in the zoom: quiesce to FDB move.
fn unreachable_bracket(d: &mut Doc, t: &Timeline, scale: &TimeScale) {
    let (Some(q), Some(f)) = (t.quiesce_t_us, t.fdb_move.as_ref()) else {
        return;
    };
    if !scale.contains(f.t_us) || f.t_us <= q {
        return;
    }
    let (x0, x1) = (scale.x(q), scale.x(f.t_us));
    let y = d.y - 20.0;
    d.line_cls("bracket", x0, y, x1, y, C_TEXT, 1.2, None);
    d.line_cls("bracket", x0, y - 4.0, x0, y + 4.0, C_TEXT, 1.2, None);
    d.line_cls("bracket", x1, y - 4.0, x1, y + 4.0, C_TEXT, 1.2, None);
    let head = format!("{} unreachable for {}", t.vm, ms(f.t_us.saturating_sub(q)));
    let detail = t
        .resume_t_us
        .filter(|&r| r >= q && r <= f.t_us)
        .map(|r| {
            format!(
                "stopped {}, then the switch followed in {}",
                ms(r - q),
                ms(f.t_us - r)
            )
        })
        .unwrap_or_default();
    let w = head.len().max(detail.len()) as f64 * 11.5 * 0.55;
    // Right of the bracket if it fits, else left of it, and never off the picture.
    let (tx, anchor) = if x1 + 8.0 + w <= WIDTH - 8.0 {
        (x1 + 8.0, "start")
    } else if x0 - 8.0 - w >= 8.0 {
        (x0 - 8.0, "end")
    } else {
        ((WIDTH - 8.0 - w).max(8.0), "start")
    };
    d.text(
        tx,
        y - 4.0,
        anchor,
        12.0,
        "bold",
        C_TEXT,
        "bracket-label",
        &head,
    );
    if !detail.is_empty() {
        d.text(
            tx,
            y + 10.0,
            anchor,
            11.5,
            "normal",
            C_TEXT,
            "bracket-label",
            &detail,
        );
    }
}

/// Pre-copy rounds as bars on the main axis; returns the plot's top and bottom.
fn rounds_panel(d: &mut Doc, t: &Timeline, scale: &TimeScale) -> (f64, f64) {
    let max = t
        .rounds
        .iter()
        .map(|r| r.pages_sent.max(r.pages_dirtied))
        .max()
        .unwrap_or(1)
        .max(10);
    let decades = (max as f64).log10().ceil().max(1.0);
    // Round labels above the bars: long if they fit in three rows, short otherwise.
    let spans: Vec<(f64, f64)> = t
        .rounds
        .iter()
        .map(|r| {
            let x0 = scale.x(r.start_t_us);
            let x1 = scale.x(r.end_t_us).max(x0 + 4.0);
            (x0, x1)
        })
        .collect();
    let long: Vec<String> = t
        .rounds
        .iter()
        .map(|r| {
            format!(
                "round {}: {} sent, {} dirtied",
                r.round,
                group(r.pages_sent),
                group(r.pages_dirtied)
            )
        })
        .collect();
    let short: Vec<String> = t.rounds.iter().map(|r| format!("{}", r.round)).collect();
    let start = |i: usize| spans[i].0;
    let mut labels = long;
    let mut placed = pack(
        labels
            .iter()
            .enumerate()
            .map(|(i, l)| (start(i), l.as_str())),
    );
    if placed.iter().any(|p| p.row >= 3) {
        labels = short;
        placed = pack(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (start(i), l.as_str())),
        );
    }
    let rows = placed.iter().map(|p| p.row + 1).max().unwrap_or(0);
    if t.rounds.is_empty() {
        d.text(
            20.0,
            d.y,
            "start",
            12.0,
            "normal",
            C_AXIS,
            "panel-subtitle",
            "Pre-copy rounds: none recorded",
        );
    } else {
        let head = "Pre-copy rounds, while the VM keeps running:";
        d.text(
            20.0,
            d.y,
            "start",
            12.0,
            "normal",
            C_AXIS,
            "panel-subtitle",
            head,
        );
        let mut x = 20.0 + head.chars().count() as f64 * 12.0 * 0.55 + 12.0;
        for (color, what) in [
            (C_SENT, "pages the round sent (wide bar)"),
            (C_DIRTY, "pages the VM dirtied meanwhile (narrow bar)"),
        ] {
            d.rect("legend-glyph", x, d.y - 10.0, 13.0, 12.0, color, 1.0);
            d.text(
                x + 18.0,
                d.y,
                "start",
                12.0,
                "normal",
                C_AXIS,
                "legend",
                what,
            );
            x += 34.0 + what.chars().count() as f64 * 12.0 * 0.52;
        }
    }
    let band_top = d.y + 4.0;
    for (i, p) in placed.iter().enumerate() {
        d.text(
            p.text_x,
            band_top + (p.row as f64 + 1.0) * LABEL_ROW_H,
            p.anchor,
            11.0,
            "normal",
            C_TEXT,
            "round-label",
            &labels[i],
        );
    }
    let plot_top = band_top + rows as f64 * LABEL_ROW_H + 8.0;
    let plot_bottom = plot_top + ROUNDS_PLOT_H;
    let h = |pages: u64| {
        if pages == 0 {
            0.0
        } else {
            ((pages as f64).log10() / decades * ROUNDS_PLOT_H).max(1.5)
        }
    };
    for k in 0..=decades as u32 {
        let v = 10f64.powi(k as i32);
        let y = plot_bottom - (v.log10() / decades) * ROUNDS_PLOT_H;
        d.line_cls("grid", PLOT_LEFT, y, PLOT_RIGHT, y, C_GRID, 1.0, None);
        d.text(
            PLOT_LEFT - 8.0,
            y + 4.0,
            "end",
            11.0,
            "normal",
            C_AXIS,
            "tick-label",
            &group(v as u64),
        );
    }
    d.rotated_text(24.0, (plot_top + plot_bottom) / 2.0, 12.0, C_AXIS, "pages");
    for (r, &(x0, x1)) in t.rounds.iter().zip(&spans) {
        let w = x1 - x0;
        let hs = h(r.pages_sent);
        let hd = h(r.pages_dirtied);
        d.rect_titled(
            "round-sent",
            x0,
            plot_bottom - hs,
            w,
            hs,
            C_SENT,
            0.85,
            &format!("round {}: {} pages sent", r.round, group(r.pages_sent)),
        );
        d.rect_titled(
            "round-dirtied",
            x0 + w / 4.0,
            plot_bottom - hd,
            w / 2.0,
            hd,
            C_DIRTY,
            1.0,
            &format!(
                "round {}: {} pages dirtied meanwhile",
                r.round,
                group(r.pages_dirtied)
            ),
        );
    }
    d.line_cls(
        "axis",
        PLOT_LEFT,
        plot_top,
        PLOT_LEFT,
        plot_bottom,
        C_AXIS,
        1.0,
        None,
    );
    (plot_top, plot_bottom)
}

/// Ticks and labels under a plot whose bottom is `y`.
fn time_axis(d: &mut Doc, scale: &TimeScale, origin: u64, y: f64, panel: &str) {
    d.line_cls("axis", PLOT_LEFT, y, PLOT_RIGHT, y, C_AXIS, 1.0, None);
    let lo = (scale.t0 as i128 - origin as i128) as f64;
    let hi = (scale.t1 as i128 - origin as i128) as f64;
    let in_seconds = hi - lo >= 2_000_000.0;
    let unit = if in_seconds { 1e6 } else { 1e3 };
    let step = nice_step((hi - lo) / unit, 9.0);
    let mut v = (lo / unit / step).ceil() * step;
    while v <= hi / unit + 1e-9 {
        let x = scale.x_rel(origin, v * unit);
        d.line_cls("tick", x, y, x, y + 5.0, C_AXIS, 1.0, None);
        let label = if v.abs() < step / 1000.0 {
            "0".to_string()
        } else {
            let decimals = (-step.log10()).ceil().max(0.0) as usize;
            format!("{:+.*}", decimals, v).replace('-', "−")
        };
        d.text(
            x,
            y + 18.0,
            "middle",
            11.0,
            "normal",
            C_AXIS,
            &format!("tick-label time {panel}"),
            &label,
        );
        v += step;
    }
    d.text(
        (PLOT_LEFT + PLOT_RIGHT) / 2.0,
        y + 36.0,
        "middle",
        12.0,
        "normal",
        C_AXIS,
        "axis-title",
        if in_seconds {
            "seconds after the quiesce"
        } else {
            "milliseconds after the quiesce"
        },
    );
}

/// A linear time axis over [t0, t1] µs (absolute), drawn from PLOT_LEFT to PLOT_RIGHT.
struct TimeScale {
    t0: u64,
    t1: u64,
}

impl TimeScale {
    fn main(t: &Timeline) -> TimeScale {
        let times = t
            .probes
            .iter()
            .map(|p| p.sent_t_us)
            .chain(t.rounds.iter().flat_map(|r| [r.start_t_us, r.end_t_us]))
            .chain(t.quiesce_t_us)
            .chain(t.resume_t_us)
            .chain(t.announces.iter().map(|a| a.t_us))
            .chain(t.fdb_move.as_ref().map(|f| f.t_us));
        let (lo, hi) = times.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if lo > hi {
            return TimeScale { t0: 0, t1: 1_000 };
        }
        let span = (hi - lo).max(1_000);
        let pad = (span as f64 * MAIN_PAD).round() as u64;
        TimeScale {
            t0: lo.saturating_sub(pad),
            t1: hi + pad,
        }
    }

    fn zoom(t: &Timeline) -> Option<TimeScale> {
        let q = t.quiesce_t_us?;
        let limit = q + ZOOM_MAX_US;
        let last = [
            t.resume_t_us,
            t.announces.first().map(|a| a.t_us),
            t.fdb_move.as_ref().map(|f| f.t_us),
        ]
        .into_iter()
        .flatten()
        .filter(|&v| v <= limit)
        .fold(q, u64::max);
        Some(TimeScale {
            t0: q.saturating_sub(ZOOM_MARGIN_US),
            t1: last + ZOOM_MARGIN_US,
        })
    }

    fn contains(&self, t: u64) -> bool {
        (self.t0..=self.t1).contains(&t)
    }

    fn x(&self, t: u64) -> f64 {
        let off = t as i128 - self.t0 as i128;
        PLOT_LEFT + off as f64 / (self.t1 - self.t0) as f64 * (PLOT_RIGHT - PLOT_LEFT)
    }

    /// x of the instant `rel_us` after `origin`.
    fn x_rel(&self, origin: u64, rel_us: f64) -> f64 {
        let off = (origin as i128 - self.t0 as i128) as f64 + rel_us;
        PLOT_LEFT + off / (self.t1 - self.t0) as f64 * (PLOT_RIGHT - PLOT_LEFT)
    }
}

/// RTT axis, log scale over whole decades, ms.
struct RttScale {
    lo: f64,
    hi: f64,
}

impl RttScale {
    fn new(t: &Timeline) -> RttScale {
        let rtts: Vec<f64> = t
            .probes
            .iter()
            .filter_map(|p| p.rtt_us)
            .map(|r| (r as f64 / 1000.0).max(0.001))
            .collect();
        if rtts.is_empty() {
            return RttScale { lo: 0.1, hi: 10.0 };
        }
        let min = rtts.iter().copied().fold(f64::MAX, f64::min);
        let max = rtts.iter().copied().fold(0.0, f64::max);
        let lo = 10f64.powf(min.log10().floor());
        let mut hi = 10f64.powf(max.log10().ceil());
        if hi <= lo {
            hi = lo * 10.0;
        }
        RttScale { lo, hi }
    }

    fn y(&self, ms: f64, top: f64, bottom: f64) -> f64 {
        let f = (ms.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10());
        bottom - f * (bottom - top)
    }

    /// Decades (major) and their 2 and 5 (minor).
    fn ticks(&self) -> Vec<(f64, bool)> {
        let mut v = Vec::new();
        let mut d = self.lo;
        while d <= self.hi * 1.0001 {
            v.push((d, true));
            if d * 2.0 < self.hi {
                v.push((d * 2.0, false));
                v.push((d * 5.0, false));
            }
            d *= 10.0;
        }
        v
    }
}

/// Where a label goes: its text x, anchor and row.
struct Placed {
    text_x: f64,
    anchor: &'static str,
    row: usize,
}

/// Puts each label (at its mark's x) in the first row where it overlaps nothing:
/// right of its mark, or left of it near the right edge.
fn pack<'a>(labels: impl Iterator<Item = (f64, &'a str)>) -> Vec<Placed> {
    let mut row_ends: Vec<f64> = Vec::new();
    let mut out = Vec::new();
    for (x, text) in labels {
        let w = text.chars().count() as f64 * CHAR_W;
        let (text_x, anchor, a, b) = if x + 4.0 + w <= WIDTH - 8.0 {
            (x + 4.0, "start", x, x + 4.0 + w)
        } else {
            (x - 4.0, "end", x - 4.0 - w, x)
        };
        let row = match row_ends.iter().position(|&end| end + 8.0 <= a) {
            Some(r) => r,
            None => {
                row_ends.push(f64::MIN);
                row_ends.len() - 1
            }
        };
        row_ends[row] = b;
        out.push(Placed {
            text_x,
            anchor,
            row,
        });
    }
    out
}

/// A step of 1, 2 or 5 × 10^k giving about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// 1234567 → "1 234 567" (thin spaces).
fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        out.push(c);
    }
    out
}

/// Offset of `t` from `origin`, signed µs.
fn offset(t: u64, origin: u64) -> String {
    if t >= origin {
        format!("+{} µs", group(t - origin))
    } else {
        format!("−{} µs", group(origin - t))
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{} ms", trim_float(s * 1000.0))
    } else {
        format!("{} s", trim_float(s))
    }
}

/// XML text or attribute content.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// The document under construction: elements in drawing order and the current y.
#[derive(Default)]
struct Doc {
    body: String,
    y: f64,
}

impl Doc {
    #[allow(clippy::too_many_arguments)]
    fn text(
        &mut self,
        x: f64,
        y: f64,
        anchor: &str,
        size: f64,
        weight: &str,
        fill: &str,
        class: &str,
        content: &str,
    ) {
        let _ = writeln!(
            self.body,
            r#"<text class="{}" x="{x:.2}" y="{y:.2}" text-anchor="{anchor}" font-size="{size}" font-weight="{weight}" fill="{fill}">{}</text>"#,
            esc(class),
            esc(content)
        );
    }

    fn rotated_text(&mut self, x: f64, y: f64, size: f64, fill: &str, content: &str) {
        let _ = writeln!(
            self.body,
            r#"<text class="axis-title" x="{x:.2}" y="{y:.2}" text-anchor="middle" font-size="{size}" fill="{fill}" transform="rotate(-90 {x:.2} {y:.2})">{}</text>"#,
            esc(content)
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn line_cls(
        &mut self,
        class: &str,
        x1: f64,
        y1: f64,
        x2: f64,
        y2: f64,
        stroke: &str,
        width: f64,
        dash: Option<&str>,
    ) {
        let dash = dash
            .map(|d| format!(r#" stroke-dasharray="{d}""#))
            .unwrap_or_default();
        let _ = writeln!(
            self.body,
            r#"<line class="{}" x1="{x1:.2}" y1="{y1:.2}" x2="{x2:.2}" y2="{y2:.2}" stroke="{stroke}" stroke-width="{width}"{dash}/>"#,
            esc(class)
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn rect(&mut self, class: &str, x: f64, y: f64, w: f64, h: f64, fill: &str, opacity: f64) {
        let _ = writeln!(
            self.body,
            r#"<rect class="{}" x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="{fill}" fill-opacity="{opacity}"/>"#,
            esc(class)
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn rect_titled(
        &mut self,
        class: &str,
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: &str,
        opacity: f64,
        title: &str,
    ) {
        let _ = writeln!(
            self.body,
            r#"<rect class="{}" x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="{fill}" fill-opacity="{opacity}"><title>{}</title></rect>"#,
            esc(class),
            esc(title)
        );
    }

    fn circle(&mut self, class: &str, cx: f64, cy: f64, r: f64, fill: &str) {
        let _ = writeln!(
            self.body,
            r#"<circle class="{}" cx="{cx:.2}" cy="{cy:.2}" r="{r}" fill="{fill}"/>"#,
            esc(class)
        );
    }

    fn finish(self, t: &Timeline) -> String {
        let h = self.y.ceil() + 8.0;
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">
<title>{}</title>
<rect class="background" x="0" y="0" width="{WIDTH}" height="{h}" fill="white"/>
{}</svg>
"#,
            esc(&format!(
                "Live migration of {}: {} → {}",
                t.vm, t.from, t.to
            )),
            self.body
        )
    }
}
