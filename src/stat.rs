//! `blkplane stat`: a live view of a running daemon through its control socket — per export
//! IOPS, MB/s, latency, and the per-layer breakdown of where a request's time goes, and per
//! I/O thread its CPU and the time it waited for one, each for the last interval only. The daemon's figures are cumulative (counters and histogram
//! buckets since the export was opened); a view is the difference of two reads, summed over
//! the export's queues.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::control::{print_out, ClientFailure, ControlClient};
use crate::trace::BUCKET_BOUNDS_NS;

/// A latency histogram as the daemon reports it: cumulative bucket counts and exact sum.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    pub count: u64,
    pub sum_ns: u64,
    /// Cumulative counts at each of `BUCKET_BOUNDS_NS`.
    pub cumulative: Vec<u64>,
}

impl Buckets {
    fn from_report(v: &Value) -> Buckets {
        Buckets {
            count: v["count"].as_u64().unwrap_or(0),
            sum_ns: v["sum_ns"].as_u64().unwrap_or(0),
            cumulative: v["buckets"]
                .as_array()
                .map(|b| b.iter().map(|c| c.as_u64().unwrap_or(0)).collect())
                .unwrap_or_default(),
        }
    }

    fn add(&mut self, other: &Buckets) {
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        if self.cumulative.len() < other.cumulative.len() {
            self.cumulative.resize(other.cumulative.len(), 0);
        }
        for (mine, theirs) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *mine += theirs;
        }
    }

    /// What was recorded after `before`.
    fn since(&self, before: &Buckets) -> Buckets {
        Buckets {
            count: self.count.saturating_sub(before.count),
            sum_ns: self.sum_ns.saturating_sub(before.sum_ns),
            cumulative: self
                .cumulative
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(before.cumulative.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    pub fn mean_us(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64 / 1000.0
        }
    }

    /// The `q` quantile in µs, interpolated linearly inside its bucket (as Prometheus'
    /// `histogram_quantile` does); above the last bound, the last bound.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = q * self.count as f64;
        let mut below = 0u64;
        for (i, &cum) in self.cumulative.iter().enumerate() {
            if cum as f64 >= rank && cum > below {
                let lower = if i == 0 { 0 } else { BUCKET_BOUNDS_NS[i - 1] } as f64;
                let upper = BUCKET_BOUNDS_NS.get(i).copied().unwrap_or(0) as f64;
                let within = (rank - below as f64) / (cum - below) as f64;
                return (lower + within.clamp(0.0, 1.0) * (upper - lower)) / 1000.0;
            }
            below = cum;
        }
        BUCKET_BOUNDS_NS[BUCKET_BOUNDS_NS.len() - 1] as f64 / 1000.0
    }
}

/// One export's cumulative figures, summed over its queues.
#[derive(Clone, Debug, Default)]
struct Totals {
    requests: u64,
    bytes: u64,
    errors: u64,
    in_flight: u64,
    queues: u64,
    /// Time requests waited for the export's rate limits, summed over its queues.
    throttled_ns: u64,
    throttle_queued: u64,
    latency: Buckets,
    /// Per stage, in the daemon's order.
    stages: Vec<(String, Buckets)>,
}

fn sum_map(v: &Value) -> u64 {
    v.as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
}

/// Every export's totals, in the daemon's order.
fn totals(stats: &Value) -> Vec<(String, Totals)> {
    let mut out = Vec::new();
    for e in stats.as_array().into_iter().flatten() {
        let id = e["id"].as_str().unwrap_or("?").to_string();
        let mut t = Totals::default();
        for q in e["queues"].as_array().into_iter().flatten() {
            t.requests += sum_map(&q["requests"]);
            t.bytes += sum_map(&q["bytes"]);
            t.errors += sum_map(&q["errors_ioerr"]) + sum_map(&q["errors_unsupp"]);
            t.in_flight += q["in_flight"].as_u64().unwrap_or(0);
            t.queues += 1;
            t.throttled_ns += q["throttled_ns"].as_u64().unwrap_or(0);
            t.throttle_queued += q["throttle_queued"].as_u64().unwrap_or(0);
            t.latency.add(&Buckets::from_report(&q["latency"]));
            for (i, s) in q["stages"].as_array().into_iter().flatten().enumerate() {
                if t.stages.len() <= i {
                    t.stages
                        .push((s["stage"].as_str().unwrap_or("?").to_string(), Buckets::default()));
                }
                t.stages[i].1.add(&Buckets::from_report(s));
            }
        }
        out.push((id, t));
    }
    out
}

/// A latency over one interval.
#[derive(Debug, Serialize)]
pub struct IntervalLatency {
    pub requests: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl IntervalLatency {
    fn of(b: &Buckets) -> IntervalLatency {
        IntervalLatency {
            requests: b.count,
            mean_us: b.mean_us(),
            p50_us: b.quantile_us(0.5),
            p99_us: b.quantile_us(0.99),
        }
    }
}

/// A stage over one interval (sampled requests).
#[derive(Debug, Serialize)]
pub struct IntervalStage {
    pub stage: String,
    pub samples: u64,
    pub mean_us: f64,
    pub p99_us: f64,
    /// Share of the total's mean.
    pub share: f64,
}

/// One export over one interval.
#[derive(Debug, Serialize)]
pub struct ExportView {
    pub id: String,
    pub iops: f64,
    pub mb_per_s: f64,
    pub errors: u64,
    pub in_flight: u64,
    /// Share of the interval its queues held a request for the rate limits (averaged over
    /// the queues), and the requests waiting for them now.
    pub throttled_percent: f64,
    pub throttle_queued: u64,
    /// Every request answered in the interval, seen → notified.
    pub latency: IntervalLatency,
    pub stages: Vec<IntervalStage>,
}

/// One I/O thread over one interval: its share of a CPU, and the share of the interval it
/// was ready to run but waited for a CPU (the congestion figure: the host's CPUs are
/// overcommitted where it grows).
#[derive(Debug, Serialize)]
pub struct ThreadView {
    pub id: String,
    pub queues: u64,
    pub cpu_percent: f64,
    pub runqueue_wait_percent: f64,
}

/// One view: every export and I/O thread over the last interval.
#[derive(Debug, Serialize)]
pub struct View {
    pub interval_s: f64,
    pub exports: Vec<ExportView>,
    pub iothreads: Vec<ThreadView>,
}

/// Per I/O thread: (queues, cpu_ns, runqueue_wait_ns), cumulative.
type ThreadTotals = Vec<(String, (u64, u64, u64))>;

fn thread_totals(threads: &Value) -> ThreadTotals {
    threads
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let n = |k: &str| t[k].as_u64().unwrap_or(0);
            let id = t["id"].as_str().unwrap_or("?").to_string();
            (id, (n("queues"), n("cpu_ns"), n("runqueue_wait_ns")))
        })
        .collect()
}

fn thread_views(
    now: &ThreadTotals,
    before: &HashMap<String, (u64, u64, u64)>,
    seconds: f64,
) -> Vec<ThreadView> {
    now.iter()
        .map(|(id, (queues, cpu, wait))| {
            let (_, cpu0, wait0) = before.get(id).copied().unwrap_or((0, *cpu, *wait));
            let percent = |ns: u64| ns as f64 / 1e9 / seconds * 100.0;
            ThreadView {
                id: id.clone(),
                queues: *queues,
                cpu_percent: percent(cpu.saturating_sub(cpu0)),
                runqueue_wait_percent: percent(wait.saturating_sub(wait0)),
            }
        })
        .collect()
}

fn view(now: &[(String, Totals)], before: &HashMap<String, Totals>, seconds: f64) -> View {
    let exports = now
        .iter()
        .map(|(id, t1)| {
            // An export new since the last read: all it did is within the interval.
            let t0 = before.get(id).cloned().unwrap_or_default();
            let stage_delta = stages_since(t1, &t0);
            let total_mean = stage_delta
                .iter()
                .find(|(n, _)| n == "total")
                .map(|(_, b)| b.mean_us())
                .unwrap_or(0.0);
            ExportView {
                id: id.clone(),
                iops: t1.requests.saturating_sub(t0.requests) as f64 / seconds,
                mb_per_s: t1.bytes.saturating_sub(t0.bytes) as f64 / seconds / 1e6,
                errors: t1.errors.saturating_sub(t0.errors),
                in_flight: t1.in_flight,
                throttled_percent: 100.0 * t1.throttled_ns.saturating_sub(t0.throttled_ns) as f64
                    / 1e9
                    / seconds
                    / t1.queues.max(1) as f64,
                throttle_queued: t1.throttle_queued,
                latency: IntervalLatency::of(&t1.latency.since(&t0.latency)),
                stages: stage_delta
                    .iter()
                    .map(|(name, b)| IntervalStage {
                        stage: name.clone(),
                        samples: b.count,
                        mean_us: b.mean_us(),
                        p99_us: b.quantile_us(0.99),
                        share: if total_mean > 0.0 { b.mean_us() / total_mean } else { 0.0 },
                    })
                    .collect(),
            }
        })
        .collect();
    View { interval_s: seconds, exports, iothreads: Vec::new() }
}

/// Each stage's histogram of what was recorded after `before`.
fn stages_since(now: &Totals, before: &Totals) -> Vec<(String, Buckets)> {
    now.stages
        .iter()
        .map(|(name, b1)| {
            let b0 = before.stages.iter().find(|(n, _)| n == name).map(|(_, b)| b.clone());
            (name.clone(), b1.since(&b0.unwrap_or_default()))
        })
        .collect()
}

/// The first export's figures between two `query-stats` replies: every request's mean time
/// at the daemon (seen → notified), and each stage's mean over the sampled requests, in µs
/// (`blkplane bench`'s layer breakdown). `None` if no request was answered in between.
pub fn layers_between(before: &Value, after: &Value) -> Option<(f64, Vec<(String, f64)>)> {
    let t0 = totals(before).into_iter().next()?.1;
    let t1 = totals(after).into_iter().next()?.1;
    let latency = t1.latency.since(&t0.latency);
    if latency.count == 0 {
        return None;
    }
    let stages = stages_since(&t1, &t0).into_iter().map(|(n, b)| (n, b.mean_us())).collect();
    Some((latency.mean_us(), stages))
}

/// A view as text.
pub fn render(v: &View) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>7} {:>7}",
        "export",
        "IOPS",
        "MB/s",
        "mean µs",
        "p50 µs",
        "p99 µs",
        "errors",
        "in-flight",
        "held %",
        "queued"
    );
    for e in &v.exports {
        let l = &e.latency;
        let _ = writeln!(
            out,
            "{:<16} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>9} {:>7.1} {:>7}",
            e.id,
            e.iops,
            e.mb_per_s,
            l.mean_us,
            l.p50_us,
            l.p99_us,
            e.errors,
            e.in_flight,
            e.throttled_percent,
            e.throttle_queued
        );
        let sampled = e.stages.iter().map(|s| s.samples).max().unwrap_or(0);
        if sampled == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "  {:<10} {:>9} {:>9} {:>7}   ({sampled} sampled requests, all queues)",
            "layer", "mean µs", "p99 µs", "share"
        );
        for s in &e.stages {
            let _ = writeln!(
                out,
                "  {:<10} {:>9.2} {:>9.2} {:>6.1}%",
                s.stage,
                s.mean_us,
                s.p99_us,
                100.0 * s.share
            );
        }
    }
    if !v.iothreads.is_empty() {
        let _ =
            writeln!(out, "{:<16} {:>7} {:>10} {:>7}", "iothread", "CPU %", "waiting %", "queues");
        for t in &v.iothreads {
            let _ = writeln!(
                out,
                "{:<16} {:>7.1} {:>10.1} {:>7}",
                t.id, t.cpu_percent, t.runqueue_wait_percent, t.queues
            );
        }
    }
    out
}

/// Prints a view every `interval`, `count` times (or until interrupted): as text, or with
/// `json` as one JSON object per line.
pub fn run(
    control: &Path,
    interval: Duration,
    count: Option<u64>,
    json: bool,
) -> Result<(), ClientFailure> {
    let mut client = ControlClient::connect_named(control)?;
    let mut before: HashMap<String, Totals> =
        totals(&client.result("query-stats")?).into_iter().collect();
    let mut threads_before: HashMap<String, (u64, u64, u64)> =
        thread_totals(&client.result("list-iothreads")?).into_iter().collect();
    let mut at = Instant::now();
    let mut shown = 0;
    while count.is_none_or(|c| shown < c) {
        std::thread::sleep(interval);
        if interval >= crate::control::IDLE_TIMEOUT {
            // The daemon closes control connections idle that long: ask on a fresh one.
            client = ControlClient::connect_named(control)?;
        }
        let now = totals(&client.result("query-stats")?);
        let threads = thread_totals(&client.result("list-iothreads")?);
        let seconds = at.elapsed().as_secs_f64();
        at = Instant::now();
        let mut v = view(&now, &before, seconds);
        v.iothreads = thread_views(&threads, &threads_before, seconds);
        threads_before = threads.into_iter().collect();
        if json {
            print_out(&(serde_json::to_string(&v).unwrap_or_default() + "\n"))?;
        } else {
            print_out(&(render(&v) + "\n"))?;
        }
        before = now.into_iter().collect();
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(values_ns: &[u64]) -> Buckets {
        let mut cumulative = vec![0; BUCKET_BOUNDS_NS.len()];
        for &v in values_ns {
            for (i, b) in BUCKET_BOUNDS_NS.iter().enumerate() {
                if v <= *b {
                    cumulative[i] += 1;
                }
            }
        }
        Buckets { count: values_ns.len() as u64, sum_ns: values_ns.iter().sum(), cumulative }
    }

    #[test]
    fn an_interval_holds_only_what_happened_in_it() {
        // A day of fast requests, then an interval of slow ones: the interval's figures are
        // the slow ones alone.
        let day = buckets(&vec![20_000; 1000]);
        let mut after = day.clone();
        after.add(&buckets(&[4_000_000; 10]));
        let interval = after.since(&day);
        assert_eq!(interval.count, 10);
        assert_eq!(interval.mean_us(), 4000.0);
        // 4 ms lies in (2.5 ms, 5 ms]: the median is interpolated halfway into it.
        assert_eq!(interval.quantile_us(0.5), 3750.0);
        assert_eq!(interval.quantile_us(0.99), 4975.0);
        assert_eq!(Buckets::default().quantile_us(0.99), 0.0);
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        // Ten values in (10 µs, 25 µs], ten in (25 µs, 50 µs].
        let b = buckets(&[vec![20_000; 10], vec![40_000; 10]].concat());
        assert_eq!(b.quantile_us(0.25), 17.5);
        assert_eq!(b.quantile_us(0.5), 25.0);
        assert_eq!(b.quantile_us(1.0), 50.0);
        // Beyond the last bound: the last bound.
        assert_eq!(buckets(&[20_000_000_000]).quantile_us(0.5), 10_000_000.0);
    }
}
