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
    /// With `--repeat`: the figures above are the medians of the runs, these their ranges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
}

/// The ranges of a cell's repeated runs.
#[derive(Clone, Debug, Serialize)]
pub struct Spread {
    pub runs: usize,
    pub iops_min: f64,
    pub iops_max: f64,
    pub p50_min_us: f64,
    pub p50_max_us: f64,
    /// Each run's IOPS, round by round: two targets' runs of the same round ran side by side.
    pub iops_by_round: Vec<f64>,
    /// With `--tenants`: the range of the runs' fairness (`tenants.fairness` is the median).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fairness_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fairness_max: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The lowest and the highest of `v`.
fn range(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Folds repeated runs of a cell into one result: the run with the median IOPS stands for
/// the cell (its latency percentiles, CPU, layers and tenants), with IOPS, MB/s, p50 and a
/// tenants run's fairness replaced by the medians over the runs and their ranges in
/// `spread`. Cells keep the order of their first run, and their runs the order of the rounds.
pub fn combine_repeats(runs: Vec<RunResult>) -> Vec<RunResult> {
    let mut cells: Vec<Vec<RunResult>> = Vec::new();
    for r in runs {
        match cells
            .iter_mut()
            .find(|c| c[0].workload == r.workload && c[0].mode == r.mode && c[0].target == r.target)
        {
            Some(cell) => cell.push(r),
            None => cells.push(vec![r]),
        }
    }
    cells.into_iter().map(combine_cell).collect()
}

/// One cell's runs, in the order of the rounds, as one result (see [`combine_repeats`]).
fn combine_cell(mut cell: Vec<RunResult>) -> RunResult {
    if cell.len() == 1 {
        return cell.remove(0);
    }
    let iops: Vec<f64> = cell.iter().map(|r| r.iops).collect();
    let p50: Vec<f64> = cell.iter().map(|r| r.p50_us).collect();
    let fairness: Option<Vec<f64>> =
        cell.iter().map(|r| r.tenants.as_ref().map(|t| t.fairness)).collect();
    let ((iops_min, iops_max), (p50_min_us, p50_max_us)) = (range(&iops), range(&p50));
    let fairness_range = fairness.as_deref().map(range);
    let spread = Spread {
        runs: cell.len(),
        iops_min,
        iops_max,
        p50_min_us,
        p50_max_us,
        iops_by_round: iops.clone(),
        fairness_min: fairness_range.map(|(lo, _)| lo),
        fairness_max: fairness_range.map(|(_, hi)| hi),
    };
    let (median_iops, median_p50) = (median(iops), median(p50));
    cell.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    let mut r = cell.swap_remove(cell.len() / 2);
    r.mb_per_s *= median_iops / r.iops.max(1e-9);
    r.iops = median_iops;
    r.p50_us = median_p50;
    if let (Some(t), Some(f)) = (r.tenants.as_mut(), fairness) {
        t.fairness = median(f);
    }
    r.ios += cell.iter().map(|c| c.ios).sum::<u64>();
    r.errors += cell.iter().map(|c| c.errors).sum::<u64>();
    r.spread = Some(spread);
    r
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
    /// When the run started, in UTC.
    pub date: String,
    pub machine: Machine,
    pub image: String,
    /// What the image is on: a file system type (`tmpfs`, `ext4`) or `block device`. On
    /// tmpfs the figures are the software's overhead, not a disk's.
    pub image_fs: String,
    pub span_bytes: u64,
    pub runtime_s: f64,
    pub warmup_s: f64,
    pub queues: usize,
    /// Exports, each with a client process of its own (0: the single-client benchmark).
    pub tenants: usize,
    pub results: Vec<RunResult>,
    pub idle: Vec<IdleResult>,
    pub notes: Vec<String>,
    /// The same run on a disk, when the image above was on tmpfs (see `--disk-dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<Box<Report>>,
}

impl Report {
    /// What a target's ratios are taken against: with tenants, qsd with one shared iothread
    /// (the targets for many tenants are set against it; the verdicts give the host's share
    /// apart); otherwise the target's baseline.
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

    /// Where and how the run was made, in two lines.
    pub fn header(&self) -> String {
        let m = &self.machine;
        let what = if self.image_fs == "tmpfs" {
            "tmpfs: the software's overhead, not a disk's".to_string()
        } else {
            self.image_fs.clone()
        };
        format!(
            "blkplane bench, {}: {} CPUs ({}), kernel {}\nimage {} ({what}), {} MiB spread, {} s per cell after {} s of warm-up\n",
            self.date,
            m.cpus,
            m.cpu_model,
            m.kernel,
            self.image,
            self.span_bytes >> 20,
            self.runtime_s,
            self.warmup_s
        )
    }

    pub fn table(&self) -> String {
        let mut out = self.header();
        out.push('\n');
        let columns = format!(
            "{:<18} {:<5} {:<14} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8}",
            "workload",
            "mode",
            "target",
            "IOPS",
            "MB/s",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "CPU µs/IO",
            "IOPS/ref",
            "p50/ref"
        );
        let _ = writeln!(out, "{columns}");
        let with_fairness = self.tenants > 0;
        for (workload, mode) in self.groups() {
            let _ = writeln!(out, "{}", "-".repeat(columns.chars().count()));
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
                if let Some(sp) = &r.spread {
                    let _ = write!(
                        errors,
                        "  {} runs: IOPS {:.0}–{:.0}, p50 {:.1}–{:.1}",
                        sp.runs, sp.iops_min, sp.iops_max, sp.p50_min_us, sp.p50_max_us
                    );
                    if let (Some(lo), Some(hi)) = (sp.fairness_min, sp.fairness_max) {
                        let _ = write!(errors, ", fairness {lo:.2}–{hi:.2}");
                    }
                }
                let _ = writeln!(
                    out,
                    "{:<18} {:<5} {:<14} {:>10.0} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9} {:>8} {:>8}{flag}{errors}",
                    r.workload,
                    r.mode.to_string(),
                    r.target.name(),
                    r.iops,
                    r.mb_per_s,
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
            out.push_str("ref = qsd (one iothread for every export); host = each tenant's client on its own image through io_uring, no daemon; IOPS is the tenants' sum, p50 the median tenant's, p99 the worst tenant's; fairness = slowest tenant's IOPS / mean; with runs, IOPS, p50 and fairness are the medians over the runs\n");
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
                        // Repeated runs whose p50 ranges overlap cannot be told apart.
                        let overlap = match (&b.spread, &q.spread) {
                            (Some(x), Some(y)) => {
                                x.p50_min_us <= y.p50_max_us && y.p50_min_us <= x.p50_max_us
                            }
                            _ => false,
                        };
                        let word = if overlap {
                            "within noise of"
                        } else if lat < 0.97 {
                            "faster than"
                        } else if lat > 1.03 {
                            "slower than"
                        } else {
                            "as fast as"
                        };
                        let _ = write!(
                            line,
                            "{word} {} (p50 {:.2}x, IOPS {:.2}x",
                            theirs.name(),
                            lat,
                            iops
                        );
                        if let (Some(x), Some(y)) = (&b.spread, &q.spread) {
                            let _ = write!(
                                line,
                                "; p50 over {} runs {:.1}–{:.1} µs against {:.1}–{:.1} µs",
                                x.runs, x.p50_min_us, x.p50_max_us, y.p50_min_us, y.p50_max_us
                            );
                        }
                        line.push(')');
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
                // Without a qsd figure, blkplane's tenants against the host's.
                let host_row = self.find(&workload, mode, TargetKind::Host);
                let against = q.or(h);
                lines
                    .extend(against.and_then(|q| tenants_verdict(&workload, mode, b, q, host_row)));
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

    /// The run as an SVG (see `plot.rs`).
    pub fn svg(&self) -> String {
        super::plot::svg(self)
    }
}

/// For two targets' tenants runs of one workload and mode: `ours`'s aggregate IOPS against
/// `theirs`'s (the medians' ratio, and with repeats each round's, side by side), and both
/// fairness figures with their ranges. With a `host` run (the tenants straight on their
/// images, no daemon), each one's aggregate IOPS as a fraction of the host's, and the host's
/// against `theirs`: a ratio to `theirs` beyond that one is more than the storage gave the
/// same clients without a daemon. None unless both are tenants runs.
fn tenants_verdict(
    workload: &str,
    mode: ClientMode,
    ours: &RunResult,
    theirs: &RunResult,
    host: Option<&RunResult>,
) -> Option<String> {
    let (b, q) = (ours.tenants.as_ref()?, theirs.tenants.as_ref()?);
    if theirs.iops <= 0.0 {
        return None;
    }
    let mut line = format!(
        "{workload} {mode}, {} against {}: aggregate IOPS {:.2}x (",
        ours.target.name(),
        theirs.target.name(),
        ours.iops / theirs.iops
    );
    if let (Some(x), Some(y)) = (&ours.spread, &theirs.spread) {
        let rounds: Vec<String> = x
            .iops_by_round
            .iter()
            .zip(&y.iops_by_round)
            .map(|(a, b)| if *b > 0.0 { format!("{:.2}x", a / b) } else { "-".into() })
            .collect();
        let _ = write!(
            line,
            "medians of {} runs, {:.0} against {:.0}; round by round {}",
            x.runs,
            ours.iops,
            theirs.iops,
            rounds.join(", ")
        );
    } else {
        let _ = write!(line, "{:.0} against {:.0}", ours.iops, theirs.iops);
    }
    let fairness =
        |f: f64, sp: &Option<Spread>| match sp.as_ref().map(|s| (s.fairness_min, s.fairness_max)) {
            Some((Some(lo), Some(hi))) => format!("{f:.2} ({lo:.2}–{hi:.2})"),
            _ => format!("{f:.2}"),
        };
    let _ = write!(
        line,
        "); fairness {} against {}",
        fairness(b.fairness, &ours.spread),
        fairness(q.fairness, &theirs.spread)
    );
    let host = host.filter(|h| {
        h.tenants.is_some()
            && h.iops > 0.0
            && theirs.target != TargetKind::Host
            && !ours.target.is_null()
    });
    if let Some(h) = host {
        let _ = write!(
            line,
            "; host {:.0}: {} {:.2}x host, {} {:.2}x host (host {:.2}x {})",
            h.iops,
            ours.target.name(),
            ours.iops / h.iops,
            theirs.target.name(),
            theirs.iops / h.iops,
            h.iops / theirs.iops,
            theirs.target.name()
        );
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(target: TargetKind, iops: f64, p50_us: f64) -> RunResult {
        RunResult {
            workload: "randread-4k-qd1".into(),
            mode: ClientMode::Poll,
            target,
            iops,
            mb_per_s: iops * 4096.0 / 1e6,
            p50_us,
            p99_us: p50_us * 2.0,
            p999_us: p50_us * 3.0,
            mean_us: p50_us,
            ios: 100,
            errors: 0,
            daemon_cpu_us_per_io: None,
            foreign_cpus: 0.0,
            tenants: None,
            layers: None,
            spread: None,
        }
    }

    fn report(results: Vec<RunResult>) -> Report {
        Report {
            command: String::new(),
            date: "2026-11-22 22:51 UTC".into(),
            machine: Machine {
                cpus: 2,
                cpu_model: "x".into(),
                kernel: "6.1".into(),
                qsd_version: None,
            },
            image: "temporary, in /dev/shm".into(),
            image_fs: "tmpfs".into(),
            span_bytes: 1 << 30,
            runtime_s: 4.0,
            warmup_s: 0.5,
            queues: 1,
            tenants: 0,
            results,
            idle: Vec::new(),
            notes: Vec::new(),
            disk: None,
        }
    }

    #[test]
    fn repeated_runs_become_medians_with_their_spread() {
        let runs = vec![
            result(TargetKind::Blkplane, 100.0, 10.0),
            result(TargetKind::Qsd, 90.0, 11.0),
            result(TargetKind::Blkplane, 300.0, 8.0),
            result(TargetKind::Qsd, 95.0, 12.0),
            result(TargetKind::Blkplane, 200.0, 9.0),
            result(TargetKind::Qsd, 80.0, 13.0),
        ];
        let cells = combine_repeats(runs);
        assert_eq!(cells.len(), 2);
        let b = &cells[0];
        assert_eq!((b.target, b.iops, b.p50_us, b.ios), (TargetKind::Blkplane, 200.0, 9.0, 300));
        let sp = b.spread.as_ref().unwrap();
        assert_eq!(
            (sp.runs, sp.iops_min, sp.iops_max, sp.p50_min_us, sp.p50_max_us),
            (3, 100.0, 300.0, 8.0, 10.0)
        );
    }

    /// A tenants run of two tenants, the slower one at `fairness` of the mean.
    fn tenants_result(target: TargetKind, iops: f64, p50_us: f64, fairness: f64) -> RunResult {
        let tenant = |iops: f64| crate::bench::tenants::TenantRun {
            iops,
            p50_us,
            p99_us: p50_us * 2.0,
            ios: 10,
            total_ios: 10,
            errors: 0,
        };
        let min_iops = fairness * iops / 2.0;
        RunResult {
            workload: "randread-4k-qd1 x2".into(),
            mode: ClientMode::Block,
            tenants: Some(crate::bench::tenants::TenantFigures {
                tenants: 2,
                fairness,
                min_iops,
                each: vec![tenant(min_iops), tenant(iops - min_iops)],
            }),
            ..result(target, iops, p50_us)
        }
    }

    /// A report of two-tenant runs.
    fn tenants_report(results: Vec<RunResult>) -> Report {
        Report { tenants: 2, ..report(results) }
    }

    #[test]
    fn repeated_tenants_runs_become_medians_with_ranges_and_side_by_side_ratios() {
        // Three rounds, each running blkplane then qsd.
        let runs = vec![
            tenants_result(TargetKind::Blkplane, 100.0, 10.0, 0.6),
            tenants_result(TargetKind::Qsd, 50.0, 20.0, 0.8),
            tenants_result(TargetKind::Blkplane, 300.0, 8.0, 0.9),
            tenants_result(TargetKind::Qsd, 100.0, 12.0, 0.5),
            tenants_result(TargetKind::Blkplane, 200.0, 9.0, 0.7),
            tenants_result(TargetKind::Qsd, 80.0, 14.0, 0.45),
        ];
        let r = tenants_report(combine_repeats(runs));
        let b = &r.results[0];
        let (bt, sp) = (b.tenants.as_ref().unwrap(), b.spread.as_ref().unwrap());
        // The run of median IOPS (the third) stands for the cell: its tenants, the medians.
        assert_eq!((b.target, b.iops, b.p50_us, b.ios), (TargetKind::Blkplane, 200.0, 9.0, 300));
        assert_eq!(
            (bt.fairness, bt.min_iops, bt.each[0].iops, bt.each[1].iops),
            (0.7, 70.0, 70.0, 130.0)
        );
        assert_eq!(
            (sp.runs, sp.iops_min, sp.iops_max, sp.p50_min_us, sp.p50_max_us),
            (3, 100.0, 300.0, 8.0, 10.0)
        );
        assert_eq!((sp.fairness_min, sp.fairness_max), (Some(0.6), Some(0.9)));
        assert_eq!(sp.iops_by_round, [100.0, 300.0, 200.0]);
        let q = &r.results[1];
        assert_eq!((q.iops, q.p50_us, q.tenants.as_ref().unwrap().fairness), (80.0, 14.0, 0.5));
        let verdicts = r.verdicts();
        assert_eq!(
            verdicts[1],
            "randread-4k-qd1 x2 block, blkplane against qsd: aggregate IOPS 2.50x (medians of 3 \
             runs, 200 against 80; round by round 2.00x, 3.00x, 2.50x); fairness 0.70 \
             (0.60–0.90) against 0.50 (0.45–0.80)"
        );
        let table = r.table();
        let row = table.lines().find(|l| l.contains(" blkplane ")).unwrap();
        assert!(
            row.ends_with(
                "  fairness 0.70  3 runs: IOPS 100–300, p50 8.0–10.0, fairness 0.60–0.90"
            ),
            "{row}"
        );
        // The IOPS ratio to qsd in the table is the medians'.
        assert!(row.contains(" 2.50     0.64"), "{row}");
        // Two runs: the medians are the means; single runs: no ranges.
        let two = combine_repeats(vec![
            tenants_result(TargetKind::Blkplane, 100.0, 10.0, 0.6),
            tenants_result(TargetKind::Blkplane, 300.0, 8.0, 0.9),
        ]);
        assert_eq!(
            (two[0].iops, two[0].p50_us, two[0].tenants.as_ref().unwrap().fairness),
            (200.0, 9.0, 0.75)
        );
        let once = tenants_report(vec![
            tenants_result(TargetKind::Blkplane, 150.0, 10.0, 0.6),
            tenants_result(TargetKind::Qsd, 100.0, 20.0, 0.8),
        ]);
        assert_eq!(
            once.verdicts()[1],
            "randread-4k-qd1 x2 block, blkplane against qsd: aggregate IOPS 1.50x (150 against \
             100); fairness 0.60 against 0.80"
        );
    }

    #[test]
    fn tenants_verdicts_give_each_daemon_as_a_fraction_of_the_host() {
        let mut r = tenants_report(vec![
            tenants_result(TargetKind::Host, 200.0, 5.0, 0.9),
            tenants_result(TargetKind::Blkplane, 100.0, 10.0, 0.6),
            tenants_result(TargetKind::Qsd, 80.0, 20.0, 0.8),
            tenants_result(TargetKind::QsdIothreads, 120.0, 8.0, 0.7),
        ]);
        let verdicts = r.verdicts();
        assert_eq!(
            verdicts,
            [
                "randread-4k-qd1 x2 block, blkplane: faster than qsd (p50 0.50x, IOPS 1.25x); \
                 2.00x the host's p50, 50% of its IOPS",
                "randread-4k-qd1 x2 block, blkplane against qsd: aggregate IOPS 1.25x (100 \
                 against 80); fairness 0.60 against 0.80; host 200: blkplane 0.50x host, qsd \
                 0.40x host (host 2.50x qsd)",
                "randread-4k-qd1 x2 block, blkplane: slower than qsd-iothreads (p50 1.25x, IOPS \
                 0.83x)",
                "randread-4k-qd1 x2 block, blkplane against qsd-iothreads: aggregate IOPS 0.83x \
                 (100 against 120); fairness 0.60 against 0.70; host 200: blkplane 0.50x host, \
                 qsd-iothreads 0.60x host (host 1.67x qsd-iothreads)",
            ]
        );
        // The host's row is in the table, with no daemon CPU, its IOPS against qsd's.
        let table = r.table();
        let row = table.lines().find(|l| l.contains(" host ")).unwrap();
        assert!(row.contains("   -     2.50     0.25  fairness 0.90"), "{row}");
        // Without qsd, blkplane's tenants are set against the host's; without the host, no
        // host fractions.
        let no_qsd = tenants_report(vec![
            tenants_result(TargetKind::Host, 200.0, 5.0, 0.9),
            tenants_result(TargetKind::Blkplane, 100.0, 10.0, 0.6),
        ]);
        assert_eq!(
            no_qsd.verdicts()[1],
            "randread-4k-qd1 x2 block, blkplane against host: aggregate IOPS 0.50x (100 against \
             200); fairness 0.60 against 0.90"
        );
        r.results.remove(0);
        assert!(r.verdicts().iter().all(|l| !l.contains("host")), "{:?}", r.verdicts());
    }

    #[test]
    fn verdicts_say_within_noise_when_ranges_overlap() {
        // Ranges 8–10 µs and 9.5–12 µs overlap: no verdict either way.
        let runs = vec![
            result(TargetKind::Blkplane, 100.0, 8.0),
            result(TargetKind::Qsd, 90.0, 9.5),
            result(TargetKind::Blkplane, 100.0, 10.0),
            result(TargetKind::Qsd, 90.0, 12.0),
        ];
        let r = report(combine_repeats(runs));
        assert_eq!(
            r.verdicts()[0],
            "randread-4k-qd1 poll, blkplane: within noise of qsd (p50 0.84x, IOPS 1.11x; p50 over 2 runs 8.0–10.0 µs against 9.5–12.0 µs)"
        );
        // Apart: a verdict; equal single runs: "as fast as" (not "as fast than").
        let r = report(vec![
            result(TargetKind::Blkplane, 100.0, 10.0),
            result(TargetKind::Qsd, 100.0, 10.1),
        ]);
        assert_eq!(
            r.verdicts()[0],
            "randread-4k-qd1 poll, blkplane: as fast as qsd (p50 0.99x, IOPS 1.00x)"
        );
        let r = report(vec![
            result(TargetKind::Blkplane, 100.0, 5.0),
            result(TargetKind::Qsd, 50.0, 10.0),
        ]);
        assert!(r.verdicts()[0].contains(": faster than qsd (p50 0.50x, IOPS 2.00x)"));
        // The table has the run header, MB/s and a separator per group.
        let table = r.table();
        assert!(table.starts_with("blkplane bench, 2026-11-22 22:51 UTC: 2 CPUs (x), kernel 6.1\nimage temporary, in /dev/shm (tmpfs: the software's overhead, not a disk's)"), "{table}");
        assert!(table.contains("MB/s") && table.contains("\n-----"), "{table}");
    }
}
