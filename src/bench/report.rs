//! The benchmark's output: a table a person reads at a glance, one verdict per workload, every
//! figure as JSON, and an SVG of IOPS and latency side by side.

use std::fmt::Write as _;

use serde::Serialize;

use super::target::TargetKind;
use super::workload::ClientMode;

/// One workload, client mode and target.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub workload: String,
    pub mode: ClientMode,
    pub target: TargetKind,
    pub iops: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    pub ios: u64,
    pub errors: u64,
    /// CPU time the daemon spent per completed I/O; None for the host (no daemon).
    pub daemon_cpu_us_per_io: Option<f64>,
    /// Load from other processes during the run, in CPUs.
    pub foreign_cpus: f64,
    /// With `--tenants`: every tenant's figures (then `iops` is their sum, `p50_us` the
    /// median tenant's p50 and `p99_us` the worst tenant's p99).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenants: Option<super::tenants::TenantFigures>,
    /// A blkplane target's breakdown of the client's mean latency (from its statistics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<Layers>,
}

/// Where a request's time went, in µs (means): the client's latency, split into the
/// daemon's stages (sampled requests: seen → parsed → submitted → completed → published →
/// notified) and what is left outside the daemon (the client's kick and submission, the
/// daemon's and the client's wake-ups).
#[derive(Clone, Debug, Serialize)]
pub struct Layers {
    pub client_us: f64,
    /// Every request's time at the daemon, seen → notified.
    pub daemon_us: f64,
    pub parse_us: f64,
    pub submit_us: f64,
    pub backend_us: f64,
    pub publish_us: f64,
    pub notify_us: f64,
    /// `client_us - daemon_us`.
    pub outside_us: f64,
}

impl Layers {
    /// From the client's mean and the daemon's figures ([`crate::stat::layers_between`]).
    pub fn new(client_us: f64, daemon_us: f64, stages: &[(String, f64)]) -> Layers {
        let stage = |name: &str| stages.iter().find(|(n, _)| n == name).map_or(0.0, |(_, m)| *m);
        Layers {
            client_us,
            daemon_us,
            parse_us: stage("parse"),
            submit_us: stage("submit"),
            backend_us: stage("backend"),
            publish_us: stage("publish"),
            notify_us: stage("notify"),
            outside_us: client_us - daemon_us,
        }
    }
}

/// CPU a daemon used while a client was connected and idle.
#[derive(Clone, Debug, Serialize)]
pub struct IdleResult {
    pub target: TargetKind,
    pub seconds: f64,
    /// Percent of one CPU.
    pub cpu_percent: f64,
    /// Clients connected meanwhile (one per export).
    pub connected: usize,
    /// How much the daemon's resident memory grew per export when its client connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_connected_export_kib: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub qsd_version: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub image: String,
    pub span_bytes: u64,
    pub runtime_s: f64,
    pub warmup_s: f64,
    pub queues: usize,
    /// Exports, each with a client process of its own (0: the single-client benchmark).
    pub tenants: usize,
    pub results: Vec<RunResult>,
    pub idle: Vec<IdleResult>,
    pub notes: Vec<String>,
}

impl Report {
    /// What a target's ratios are taken against: with tenants, qsd with one shared iothread
    /// (there is no host equivalent of many exports); otherwise the target's baseline.
    fn reference(&self, target: TargetKind) -> TargetKind {
        match (self.tenants > 0, target.is_null()) {
            (true, false) => TargetKind::Qsd,
            _ => target.baseline(),
        }
    }

    fn find(&self, workload: &str, mode: ClientMode, target: TargetKind) -> Option<&RunResult> {
        self.results.iter().find(|r| r.workload == workload && r.mode == mode && r.target == target)
    }

    /// (workload, mode) pairs in the order they ran.
    fn groups(&self) -> Vec<(String, ClientMode)> {
        let mut groups: Vec<(String, ClientMode)> = Vec::new();
        for r in &self.results {
            if !groups.iter().any(|(w, m)| *w == r.workload && *m == r.mode) {
                groups.push((r.workload.clone(), r.mode));
            }
        }
        groups
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<18} {:<5} {:<14} {:>10} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8}",
            "workload",
            "mode",
            "target",
            "IOPS",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "CPU µs/IO",
            "IOPS/ref",
            "p50/ref"
        );
        let with_fairness = self.tenants > 0;
        for (workload, mode) in self.groups() {
            for r in self.results.iter().filter(|r| r.workload == workload && r.mode == mode) {
                let reference = self.find(&workload, mode, self.reference(r.target));
                let ratio = |a: f64, b: Option<f64>| match b {
                    Some(b) if b > 0.0 => format!("{:.2}", a / b),
                    _ => "-".into(),
                };
                let cpu =
                    r.daemon_cpu_us_per_io.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into());
                let flag =
                    if r.foreign_cpus > super::cpu::FOREIGN_LOAD_WARN_CPUS { " !busy" } else { "" };
                let mut errors =
                    if r.errors > 0 { format!(" ({} errors)", r.errors) } else { String::new() };
                if let (true, Some(t)) = (with_fairness, &r.tenants) {
                    let _ = write!(errors, "  fairness {:.2}", t.fairness);
                }
                let _ = writeln!(
                    out,
                    "{:<18} {:<5} {:<14} {:>10.0} {:>8.1} {:>8.1} {:>9.1} {:>9} {:>8} {:>8}{flag}{errors}",
                    r.workload,
                    r.mode.to_string(),
                    r.target.name(),
                    r.iops,
                    r.p50_us,
                    r.p99_us,
                    r.p999_us,
                    cpu,
                    ratio(r.iops, reference.map(|x| x.iops)),
                    ratio(r.p50_us, reference.map(|x| x.p50_us)),
                );
            }
        }
        if self.tenants > 0 {
            out.push_str("ref = qsd (one iothread for every export); IOPS is the tenants' sum, p50 the median tenant's, p99 the worst tenant's; fairness = slowest tenant's IOPS / mean\n");
        } else {
            out.push_str("ref = host for real backends, qsd-null for null backends\n");
        }
        out
    }

    /// The layer breakdown of every blkplane result that has one (empty if none).
    pub fn layers_table(&self) -> String {
        let rows: Vec<&RunResult> = self.results.iter().filter(|r| r.layers.is_some()).collect();
        if rows.is_empty() {
            return String::new();
        }
        let mut out = String::from(
            "Where the client's time goes (means, µs; daemon stages from one request in 64):\n",
        );
        let _ = writeln!(
            out,
            "{:<18} {:<5} {:<14} {:>8} {:>8} {:>7} {:>7} {:>8} {:>8} {:>7} {:>8}",
            "workload",
            "mode",
            "target",
            "client",
            "daemon",
            "parse",
            "submit",
            "backend",
            "publish",
            "notify",
            "outside"
        );
        for r in rows {
            let Some(l) = &r.layers else { continue };
            let _ = writeln!(
                out,
                "{:<18} {:<5} {:<14} {:>8.1} {:>8.1} {:>7.2} {:>7.2} {:>8.1} {:>8.2} {:>7.2} {:>8.1}",
                r.workload,
                r.mode.to_string(),
                r.target.name(),
                l.client_us,
                l.daemon_us,
                l.parse_us,
                l.submit_us,
                l.backend_us,
                l.publish_us,
                l.notify_us,
                l.outside_us
            );
        }
        out.push_str("daemon = seen in the ring until the guest is notified (every request); outside = client − daemon: the kick, the wake-ups, the client's own work\n");
        out
    }

    /// One line per workload and mode comparing blkplane with qemu-storage-daemon and the host.
    pub fn verdicts(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (workload, mode) in self.groups() {
            for (ours, theirs, host) in [
                (TargetKind::Blkplane, TargetKind::Qsd, Some(TargetKind::Host)),
                (TargetKind::Blkplane, TargetKind::QsdIothreads, None),
                (TargetKind::Blkplane, TargetKind::BlkplaneDedicated, None),
                (TargetKind::Blkplane, TargetKind::Baseline, None),
                (TargetKind::BlkplaneNull, TargetKind::QsdNull, None),
            ] {
                let Some(b) = self.find(&workload, mode, ours) else { continue };
                let q = self.find(&workload, mode, theirs);
                // The extra comparisons only when both sides ran.
                if q.is_none() && !matches!(theirs, TargetKind::Qsd | TargetKind::QsdNull) {
                    continue;
                }
                let h = host.and_then(|h| self.find(&workload, mode, h));
                let mut line = format!("{workload} {mode}, {}: ", ours.name());
                match q {
                    Some(q) if q.p50_us > 0.0 && q.iops > 0.0 => {
                        let lat = b.p50_us / q.p50_us;
                        let iops = b.iops / q.iops;
                        let word = if lat < 0.97 {
                            "faster"
                        } else if lat > 1.03 {
                            "slower"
                        } else {
                            "as fast"
                        };
                        let _ = write!(
                            line,
                            "{word} than {} (p50 {:.2}x, IOPS {:.2}x)",
                            theirs.name(),
                            lat,
                            iops
                        );
                    }
                    _ => line.push_str("no qemu-storage-daemon figure to compare with"),
                }
                if let Some(h) = h {
                    if h.p50_us > 0.0 && h.iops > 0.0 {
                        let _ = write!(
                            line,
                            "; {:.2}x the host's p50, {:.0}% of its IOPS",
                            b.p50_us / h.p50_us,
                            100.0 * b.iops / h.iops
                        );
                    }
                }
                lines.push(line);
            }
        }
        for i in &self.idle {
            let mut line = format!(
                "idle: {} used {:.2}% of one CPU over {:.0} s with {} client(s) connected and no I/O",
                i.target, i.cpu_percent, i.seconds, i.connected
            );
            if let Some(kib) = i.rss_per_connected_export_kib {
                let _ = write!(line, "; {kib:.0} KiB of resident memory per connected export");
            }
            lines.push(line);
        }
        lines
    }

    /// IOPS (top) and p50 latency with a p99 whisker (bottom), grouped by workload and mode.
    pub fn svg(&self) -> String {
        let groups = self.groups();
        let targets: Vec<TargetKind> = TargetKind::ALL
            .into_iter()
            .filter(|t| self.results.iter().any(|r| r.target == *t))
            .collect();
        let colors = [
            "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
        ];
        let bar_w = 14.0;
        let group_w = bar_w * targets.len() as f64 + 18.0;
        let left = 70.0;
        let chart_h = 220.0;
        let width = left + group_w * groups.len() as f64 + 150.0;
        let height = 2.0 * chart_h + 200.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        type Value = fn(&RunResult) -> (f64, Option<f64>);
        let panels: [(&str, f64, Value); 2] = [
            ("IOPS", 30.0, |r| (r.iops, None)),
            ("latency p50 (bar) and p99 (line), µs", 30.0 + chart_h + 90.0, |r| {
                (r.p50_us, Some(r.p99_us))
            }),
        ];
        for (title, top, value) in panels {
            let max = self
                .results
                .iter()
                .map(|r| {
                    let (v, w) = value(r);
                    w.unwrap_or(v).max(v)
                })
                .fold(0.0f64, f64::max)
                .max(1e-9);
            let _ = writeln!(
                s,
                r#"<text x="{left}" y="{:.0}" font-size="13">{title}</text>"#,
                top - 10.0
            );
            let base = top + chart_h;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{base}" x2="{:.0}" y2="{base}" stroke="#333"/>"##,
                width - 150.0
            );
            for tick in 0..=4 {
                let v = max * tick as f64 / 4.0;
                let y = base - chart_h * tick as f64 / 4.0;
                let _ = writeln!(
                    s,
                    r##"<text x="{:.0}" y="{y:.0}" text-anchor="end" fill="#555">{}</text>"##,
                    left - 5.0,
                    human(v)
                );
                let _ = writeln!(
                    s,
                    r##"<line x1="{left}" y1="{y:.0}" x2="{:.0}" y2="{y:.0}" stroke="#ddd"/>"##,
                    width - 150.0
                );
            }
            for (gi, (workload, mode)) in groups.iter().enumerate() {
                let gx = left + 9.0 + gi as f64 * group_w;
                for (ti, t) in targets.iter().enumerate() {
                    let Some(r) = self.find(workload, *mode, *t) else { continue };
                    let (v, whisker) = value(r);
                    let h = chart_h * v / max;
                    let x = gx + ti as f64 * bar_w;
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{} {} {}: {}</title></rect>"#,
                        base - h,
                        bar_w - 2.0,
                        colors[ti % colors.len()],
                        workload,
                        mode,
                        t.name(),
                        human(v)
                    );
                    if let Some(w) = whisker {
                        let wy = base - chart_h * w / max;
                        let _ = writeln!(
                            s,
                            r##"<line x1="{x:.1}" y1="{wy:.1}" x2="{:.1}" y2="{wy:.1}" stroke="#000" stroke-width="2"/>"##,
                            x + bar_w - 2.0
                        );
                    }
                }
                let _ = writeln!(
                    s,
                    r#"<text transform="translate({:.1},{:.1}) rotate(35)">{workload} {mode}</text>"#,
                    gx,
                    base + 12.0
                );
            }
        }
        for (ti, t) in targets.iter().enumerate() {
            let y = 40.0 + ti as f64 * 18.0;
            let x = width - 140.0;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{:.0}" width="12" height="12" fill="{}"/>"#,
                y - 10.0,
                colors[ti % colors.len()]
            );
            let _ = writeln!(s, r#"<text x="{:.0}" y="{y:.0}">{}</text>"#, x + 18.0, t.name());
        }
        s.push_str("</svg>\n");
        s
    }
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
