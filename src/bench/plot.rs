//! `bench --plot`: the run as an SVG a reader can take in: a title saying where it ran, one
//! small panel per workload and client mode with its own scale (so that the depth-1 runs are
//! not squashed by the depth-32 ones), values written on the bars, latency with its p99,
//! every target's IOPS relative to qemu-storage-daemon, and the null backends (software cost
//! only) apart from the real ones.

use std::fmt::Write as _;

use super::report::{Report, RunResult};
use super::target::TargetKind;
use super::workload::ClientMode;

const COLORS: [&str; 9] = [
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
    "#64b5cd",
];
const PANEL_W: f64 = 210.0;
const PANEL_H: f64 = 165.0;
/// Room in a panel for its title (top) and axis labels (left).
const PANEL_TOP: f64 = 30.0;
const PANEL_LEFT: f64 = 38.0;
const PANEL_BOTTOM: f64 = 12.0;
const COLUMNS: usize = 4;
const MARGIN: f64 = 20.0;

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A value for a bar label: 3 significant figures, k and M for large ones.
pub fn short(v: f64) -> String {
    let (v, unit) = if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{unit}")
}

struct Bar {
    color: &'static str,
    value: f64,
    /// A tick above the bar (p99 over a p50 bar).
    tick: Option<f64>,
    /// Written above the bar (or its tick).
    label: String,
    /// Written inside the bar, near its top, when it is tall enough (p50 under a p99 label).
    inner: Option<String>,
}

/// One panel at (x, y): its title, a scale from 0 to the largest value in it, the bars with
/// their values on top, and an optional reference line (1.0 for ratios).
///
/// The scale stops at 4 times the tallest bar: a tick beyond (one slow p99) is drawn at the
/// top with an arrow, its value still written, instead of flattening every bar.
fn panel(s: &mut String, x: f64, y: f64, title: &str, bars: &[Bar], reference: Option<f64>) {
    let tallest = bars.iter().map(|b| b.value).chain(reference).fold(0.0f64, f64::max);
    let max = bars
        .iter()
        .map(|b| b.tick.unwrap_or(b.value).max(b.value))
        .chain(reference)
        .fold(0.0f64, f64::max)
        .min(4.0 * tallest)
        .max(1e-9)
        * 1.15;
    let plot_w = PANEL_W - PANEL_LEFT - 8.0;
    let plot_h = PANEL_H - PANEL_TOP - PANEL_BOTTOM;
    let (left, base) = (x + PANEL_LEFT, y + PANEL_H - PANEL_BOTTOM);
    let _ = writeln!(
        s,
        r##"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{PANEL_H}" fill="#fafafa" stroke="#e0e0e0"/>"##,
        PANEL_W - 6.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" font-weight="bold">{}</text>"#,
        x + 6.0,
        y + 15.0,
        xml(title)
    );
    for frac in [0.0, 0.5, 1.0] {
        let v = max / 1.15 * frac;
        let ty = base - plot_h * v / max;
        let _ = writeln!(
            s,
            r##"<line x1="{left:.1}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#ddd"/>"##,
            left + plot_w
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="end" fill="#666">{}</text>"##,
            left - 3.0,
            ty + 3.0,
            short(v)
        );
    }
    if let Some(r) = reference {
        let ry = base - plot_h * r / max;
        let _ = writeln!(
            s,
            r##"<line x1="{left:.1}" y1="{ry:.1}" x2="{:.1}" y2="{ry:.1}" stroke="#333" stroke-dasharray="4,3"/>"##,
            left + plot_w
        );
    }
    let slot = plot_w / bars.len().max(1) as f64;
    let bar_w = (slot * 0.7).min(34.0);
    for (i, b) in bars.iter().enumerate() {
        let h = plot_h * b.value / max;
        let bx = left + slot * i as f64 + (slot - bar_w) / 2.0;
        let _ = writeln!(
            s,
            r#"<rect x="{bx:.1}" y="{:.1}" width="{bar_w:.1}" height="{h:.1}" fill="{}"/>"#,
            base - h,
            b.color
        );
        let mut top = base - h;
        if let Some(t) = b.tick {
            let clipped = t > max / 1.15;
            let ty = base - plot_h * t.min(max / 1.15) / max;
            if clipped {
                let _ = writeln!(
                    s,
                    r#"<path d="M{:.1},{:.1} l4,6 h-8 z" fill="black"/>"#,
                    bx + bar_w / 2.0,
                    ty - 8.0
                );
                top = top.min(ty - 8.0);
            }
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#000" stroke-width="2"/><line x1="{:.1}" y1="{ty:.1}" x2="{:.1}" y2="{:.1}" stroke="#000"/>"##,
                bx + 2.0,
                bx + bar_w - 2.0,
                bx + bar_w / 2.0,
                bx + bar_w / 2.0,
                base - h
            );
            top = top.min(ty);
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#,
            bx + bar_w / 2.0,
            top - 3.0,
            xml(&b.label)
        );
        if let Some(inner) = &b.inner {
            // Inside a tall enough bar in white; else just above it, left of the whisker.
            let (iy, fill, anchor, ix) = if h >= 14.0 {
                (base - h + 10.0, "white", "middle", bx + bar_w / 2.0)
            } else {
                (base - h - 2.0, "#333", "end", bx + bar_w / 2.0 - 2.0)
            };
            let _ = writeln!(
                s,
                r#"<text x="{ix:.1}" y="{iy:.1}" font-size="8" text-anchor="{anchor}" fill="{fill}">{}</text>"#,
                xml(inner)
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left:.1}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}" stroke="#333"/>"##,
        left + plot_w
    );
}

/// A grid of panels, one per (workload, mode), under a heading; returns the height used.
fn grid(
    s: &mut String,
    top: f64,
    heading: &str,
    groups: &[(String, ClientMode)],
    mut panel_of: impl FnMut(&str, ClientMode) -> (Vec<Bar>, Option<f64>),
) -> f64 {
    let _ = writeln!(
        s,
        r#"<text x="{MARGIN}" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
        top + 16.0,
        xml(heading)
    );
    let mut drawn = 0;
    for (workload, mode) in groups {
        let (bars, reference) = panel_of(workload, *mode);
        if bars.is_empty() {
            continue;
        }
        let (col, row) = (drawn % COLUMNS, drawn / COLUMNS);
        let x = MARGIN + col as f64 * PANEL_W;
        let y = top + 26.0 + row as f64 * (PANEL_H + 8.0);
        panel(s, x, y, &format!("{workload} · {mode}"), &bars, reference);
        drawn += 1;
    }
    let rows = drawn.div_ceil(COLUMNS);
    26.0 + rows as f64 * (PANEL_H + 8.0) + 14.0
}

/// The whole picture: the title, then the report's panels, then those of its run on a disk.
pub fn svg(report: &Report) -> String {
    let present = present_in(report);
    // Four columns wide whatever the number of panels, so that the headings fit.
    let width = MARGIN * 2.0 + PANEL_W * COLUMNS as f64;
    let mut body = String::new();
    let m = &report.machine;
    let _ = writeln!(
        body,
        r#"<text x="{MARGIN}" y="26" font-size="18" font-weight="bold">blkplane bench, {}</text>"#,
        xml(&report.date)
    );
    let _ = writeln!(
        body,
        r##"<text x="{MARGIN}" y="44" font-size="11" fill="#444">{} CPUs ({}), kernel {}{}</text>"##,
        m.cpus,
        xml(&m.cpu_model),
        xml(&m.kernel),
        report
            .results
            .iter()
            .find_map(|r| r.spread.as_ref())
            .map(|s| format!("; medians of {} runs", s.runs))
            .unwrap_or_default()
    );
    // Legend: one colour per target, the same in every panel.
    let mut lx = MARGIN;
    for t in &present {
        let _ = writeln!(
            body,
            r#"<rect x="{lx:.1}" y="54" width="11" height="11" fill="{}"/><text x="{:.1}" y="64" font-size="11">{}</text>"#,
            color_of(&present, *t),
            lx + 15.0,
            t.name()
        );
        lx += 22.0 + 7.0 * t.name().len() as f64;
    }
    let mut y = 74.0;
    for r in std::iter::once(report).chain(report.disk.as_deref()) {
        y = sections(&mut body, r, &present, y);
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" viewBox="0 0 {width:.0} {:.0}" font-family="DejaVu Sans, sans-serif">"#,
        y + MARGIN,
        y + MARGIN
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

fn groups_of(report: &Report) -> Vec<(String, ClientMode)> {
    let mut groups: Vec<(String, ClientMode)> = Vec::new();
    for r in &report.results {
        if !groups.iter().any(|(w, m)| *w == r.workload && *m == r.mode) {
            groups.push((r.workload.clone(), r.mode));
        }
    }
    groups
}

/// The targets of the report and of its disk run, in the usual order.
fn present_in(report: &Report) -> Vec<TargetKind> {
    let all: Vec<&RunResult> =
        report.results.iter().chain(report.disk.iter().flat_map(|d| d.results.iter())).collect();
    TargetKind::ALL.into_iter().filter(|t| all.iter().any(|r| r.target == *t)).collect()
}

fn color_of(present: &[TargetKind], t: TargetKind) -> &'static str {
    COLORS[present.iter().position(|p| *p == t).unwrap_or(0) % COLORS.len()]
}

/// One report's panels from `y` on, under a line saying where its image was; returns the
/// height reached.
fn sections(body: &mut String, report: &Report, present: &[TargetKind], mut y: f64) -> f64 {
    let groups = groups_of(report);
    let on = if report.image_fs == "tmpfs" {
        "tmpfs: the software's overhead, not a disk's".to_string()
    } else {
        report.image_fs.clone()
    };
    let _ = writeln!(
        body,
        r##"<rect x="{MARGIN}" y="{:.1}" width="{:.1}" height="22" fill="#eef2f7"/>"##,
        y + 4.0,
        PANEL_W * COLUMNS as f64 - 6.0
    );
    let _ = writeln!(
        body,
        r##"<text x="{:.1}" y="{:.1}" font-size="13" font-weight="bold" fill="#222">Image {} ({}), {} s per cell</text>"##,
        MARGIN + 6.0,
        y + 20.0,
        xml(&report.image),
        xml(&on),
        report.runtime_s
    );
    y += 30.0;
    let real: Vec<TargetKind> = present.iter().copied().filter(|t| !t.is_null()).collect();
    let null: Vec<TargetKind> = present.iter().copied().filter(|t| t.is_null()).collect();
    let find = |w: &str, m: ClientMode, t: TargetKind| -> Option<&RunResult> {
        report.results.iter().find(|r| r.workload == w && r.mode == m && r.target == t)
    };
    type Value<'a> = &'a dyn Fn(&RunResult) -> (f64, Option<f64>, String, Option<String>);
    let bars = |targets: &[TargetKind], w: &str, mode: ClientMode, value: Value| {
        targets
            .iter()
            .filter_map(|t| find(w, mode, *t).map(|r| (t, r)))
            .map(|(t, r)| {
                let (value, tick, label, inner) = value(r);
                Bar { color: color_of(present, *t), value, tick, label, inner }
            })
            .collect::<Vec<_>>()
    };
    let iops = |r: &RunResult| (r.iops, None, short(r.iops), None);
    let latency =
        |r: &RunResult| (r.p50_us, Some(r.p99_us), short(r.p99_us), Some(short(r.p50_us)));
    let has = |targets: &[TargetKind]| report.results.iter().any(|r| targets.contains(&r.target));
    if has(&real) {
        y += grid(body, y, "IOPS (each panel on its own scale)", &groups, |w, mode| {
            (bars(&real, w, mode, &iops), None)
        });
        y += grid(
            body,
            y,
            "Latency, µs: p50 (bar, value inside) and p99 (tick, value above)",
            &groups,
            |w, mode| (bars(&real, w, mode, &latency), None),
        );
        if has(&[TargetKind::Qsd]) {
            let others: Vec<TargetKind> =
                real.iter().copied().filter(|t| *t != TargetKind::Qsd).collect();
            y += grid(
                body,
                y,
                "IOPS relative to qemu-storage-daemon (dashed: 1.0, as fast as qsd)",
                &groups,
                |w, mode| {
                    let Some(q) = find(w, mode, TargetKind::Qsd).filter(|q| q.iops > 0.0) else {
                        return (Vec::new(), None);
                    };
                    let ratio = |r: &RunResult| {
                        (r.iops / q.iops, None, format!("{:.2}x", r.iops / q.iops), None)
                    };
                    (bars(&others, w, mode, &ratio), Some(1.0))
                },
            );
        }
    }
    if has(&null) {
        y += grid(
            body,
            y,
            "Null backends, IOPS: the software's own cost, no disk",
            &groups,
            |w, mode| (bars(&null, w, mode, &iops), None),
        );
    }
    y
}

#[cfg(test)]
mod tests {
    #[test]
    fn bar_labels_are_short() {
        assert_eq!(super::short(6_512_345.0), "6.51M");
        assert_eq!(super::short(86_758.0), "86.8k");
        assert_eq!(super::short(123_456.0), "123k");
        assert_eq!(super::short(8.43), "8.43");
        assert_eq!(super::short(29.1), "29.1");
        assert_eq!(super::short(0.0), "0.00");
    }
}
