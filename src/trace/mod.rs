//! [trace] Per-queue statistics: exact counters for every request, and, for a sample of
//! requests, the time spent between each pair of layer boundaries of the request path:
//!
//! ```text
//! seen ─parse─▶ parsed ─submit─▶ submitted ─backend─▶ completed ─publish─▶ published ─notify─▶ notified
//! ```
//!
//! and, for every request, its latency at the daemon (seen → notified).
//!
//! Cost on the data path: counters are plain loads and stores (each counter has one writer,
//! its I/O thread, so no locked read-modify-write is needed). Per-layer stamps are taken only
//! for one request in `SAMPLE_EVERY`; the every-request latency costs two clock reads per
//! round of the I/O thread (one when a fetch takes its first request, which stands for every
//! request that round takes, and one after the round's notification), not per request, and
//! one histogram increment per request. Each I/O thread keeps its own histograms and merges
//! them into the shared ones under a mutex a few times a second, never per request.
//!
//! The histograms are hdrhistograms (2 significant digits) kept for the export's life; they
//! are exported as cumulative buckets ([`BUCKET_BOUNDS_NS`]) with an exact sum, so that a
//! reader (Prometheus, `blkplane stat`) takes the difference of two reads for any window and
//! can add queues together.

pub mod sample;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// One request in this many carries timestamps.
pub const SAMPLE_EVERY: u32 = 64;
/// How often an I/O thread merges its histograms into the shared ones.
pub const MERGE_EVERY: Duration = Duration::from_millis(250);

/// The stages of a request, between consecutive layer boundaries, and the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Seen in the avail ring until parsed into a request (virtq + blk).
    Parse,
    /// Parsed until handed to the kernel (engine submit).
    Submit,
    /// In the engine: submitted until completed.
    Backend,
    /// Completed until visible in the used ring.
    Publish,
    /// Visible in the used ring until the guest was notified.
    Notify,
    /// Seen until notified.
    Total,
}

impl Stage {
    pub const ALL: [Stage; 6] =
        [Stage::Parse, Stage::Submit, Stage::Backend, Stage::Publish, Stage::Notify, Stage::Total];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Submit => "submit",
            Stage::Backend => "backend",
            Stage::Publish => "publish",
            Stage::Notify => "notify",
            Stage::Total => "total",
        }
    }
}

/// Request kinds counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// Failed before its kind mattered, or unknown.
    Other,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Read,
        Kind::Write,
        Kind::Flush,
        Kind::GetId,
        Kind::Discard,
        Kind::WriteZeroes,
        Kind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
            Kind::GetId => "get_id",
            Kind::Discard => "discard",
            Kind::WriteZeroes => "write_zeroes",
            Kind::Other => "other",
        }
    }
}

/// The kinds whose every-request latency is kept apart: reads, writes and flushes each
/// have their own histogram, the rare rest (discard, write zeroes, get id, other) share
/// one. Four histograms per queue rather than seven keep the memory per queue small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatencyKind {
    Read,
    Write,
    Flush,
    Other,
}

impl LatencyKind {
    pub const ALL: [LatencyKind; 4] =
        [LatencyKind::Read, LatencyKind::Write, LatencyKind::Flush, LatencyKind::Other];

    pub fn of(kind: Kind) -> LatencyKind {
        match kind {
            Kind::Read => LatencyKind::Read,
            Kind::Write => LatencyKind::Write,
            Kind::Flush => LatencyKind::Flush,
            Kind::GetId | Kind::Discard | Kind::WriteZeroes | Kind::Other => LatencyKind::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LatencyKind::Read => "read",
            LatencyKind::Write => "write",
            LatencyKind::Flush => "flush",
            LatencyKind::Other => "other",
        }
    }
}

/// Upper bounds of the exported latency buckets, in nanoseconds: 1-2.5-5 steps from 100 ns
/// (a null-backend stage) to 10 s (a device that stalls). Above the last is `+Inf`.
pub const BUCKET_BOUNDS_NS: [u64; 25] = [
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A counter with exactly one writer thread.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning I/O thread may call this: it is a load and a store, not an
    /// atomic read-modify-write, which is what keeps it cheap.
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters of one queue.
#[derive(Default)]
pub struct QueueCounters {
    /// Requests answered, by kind, whatever their status.
    pub requests: [Counter; 7],
    /// Bytes moved by successful requests, by kind.
    pub bytes: [Counter; 7],
    /// Requests answered VIRTIO_BLK_S_IOERR, by kind.
    pub errors_ioerr: [Counter; 7],
    /// Requests answered VIRTIO_BLK_S_UNSUPP, by kind.
    pub errors_unsupp: [Counter; 7],
    pub in_flight: Counter,
    /// Reads and writes whose guest buffers O_DIRECT would refuse, served through an aligned
    /// bounce buffer.
    pub bounce_buffers: Counter,
    /// Flushes (or write-through syncs) the host failed: data written before may be lost.
    pub flush_errors: Counter,
    pub notifications_sent: Counter,
    /// Used-ring publishes after which the guest did not want an interrupt.
    pub notifications_suppressed: Counter,
    /// Nanoseconds spent polling for work instead of sleeping.
    pub poll_ns: Counter,
    /// Polling windows that found work before they ended.
    pub poll_hits: Counter,
    /// Times the thread went to sleep.
    pub sleeps: Counter,
    /// Requests that had to wait for the export's limits (counted once each).
    pub throttled_requests: Counter,
    /// Nanoseconds requests waited for the limits (the queue took nothing meanwhile).
    pub throttled_ns: Counter,
    /// Requests waiting for the limits now: the one held and those behind it in the ring.
    pub throttle_queued: Counter,
}

/// One latency distribution, in nanoseconds, with the exact sum of what it recorded.
///
/// Its histogram (3968 counters, 31 KiB, all written when made) is made when the first value
/// lands, or up front with [`Latency::allocated`]: a queue's shared histograms are made at
/// the first merge that brings them a value, so a started queue that stays idle pays for
/// none of them; the I/O thread's own, recorded into per request, are made when the queue
/// starts, so the data path never allocates.
#[derive(Default)]
pub struct Latency {
    histogram: Option<Histogram<u64>>,
    sum_ns: u64,
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 100 s, 2 significant digits: bounds that cannot fail.
    Histogram::new_with_bounds(1, 100_000_000_000, 2).expect("histogram bounds")
}

impl Latency {
    /// With its histogram made now (see the type).
    pub fn allocated() -> Latency {
        Latency { histogram: Some(new_histogram()), sum_ns: 0 }
    }

    pub fn record(&mut self, ns: u64) {
        self.histogram.get_or_insert_with(new_histogram).saturating_record(ns.max(1));
        self.sum_ns = self.sum_ns.wrapping_add(ns);
    }

    /// Adds `self` to `other` and starts again from nothing. An empty one is left as it is:
    /// resetting writes all its counters (making an idle queue's pages resident for nothing).
    fn merge_into(&mut self, other: &mut Latency) {
        let Some(mine) = self.histogram.as_mut().filter(|h| !h.is_empty()) else {
            return;
        };
        // Same bounds on both sides: adding cannot fail.
        let _ = other.histogram.get_or_insert_with(new_histogram).add(&*mine);
        other.sum_ns = other.sum_ns.wrapping_add(self.sum_ns);
        mine.reset();
        self.sum_ns = 0;
    }

    /// Adds what `other` recorded to `self`.
    fn add(&mut self, other: &Latency) {
        if let Some(theirs) = other.histogram.as_ref().filter(|h| !h.is_empty()) {
            let _ = self.histogram.get_or_insert_with(new_histogram).add(theirs);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }

    pub fn count(&self) -> u64 {
        self.histogram.as_ref().map_or(0, Histogram::len)
    }

    pub fn mean_ns(&self) -> f64 {
        self.histogram.as_ref().map_or(0.0, Histogram::mean)
    }

    /// Values recorded at or below each of [`BUCKET_BOUNDS_NS`] (cumulative, as Prometheus
    /// wants them). A value within the histogram's 1 % precision of a bound may fall on
    /// either side of it.
    pub fn buckets(&self) -> Vec<u64> {
        let mut counts = vec![0u64; BUCKET_BOUNDS_NS.len()];
        let Some(h) = &self.histogram else { return counts };
        for v in h.iter_recorded() {
            let value = h.median_equivalent(v.value_iterated_to());
            if let Some(i) = BUCKET_BOUNDS_NS.iter().position(|&b| value <= b) {
                counts[i] += v.count_at_value();
            }
        }
        let mut running = 0;
        for c in &mut counts {
            running += *c;
            *c = running;
        }
        counts
    }

    pub fn report(&self) -> LatencyReport {
        let quantile_us =
            |q: f64| self.histogram.as_ref().map_or(0, |h| h.value_at_quantile(q)) as f64 / 1000.0;
        LatencyReport {
            count: self.count(),
            sum_ns: self.sum_ns,
            mean_us: self.mean_ns() / 1000.0,
            p50_us: quantile_us(0.5),
            p99_us: quantile_us(0.99),
            buckets: self.buckets(),
        }
    }
}

/// The latency histograms of a queue (or of one I/O thread's share of it before a merge):
/// each stage of the sampled requests, and every request's seen → notified by
/// [`LatencyKind`].
#[derive(Default)]
pub struct LatencyHistograms {
    stages: [Latency; Stage::ALL.len()],
    requests: [Latency; LatencyKind::ALL.len()],
}

impl LatencyHistograms {
    /// Every histogram made now: an I/O thread's own, recorded into per request.
    pub fn allocated() -> LatencyHistograms {
        LatencyHistograms {
            stages: std::array::from_fn(|_| Latency::allocated()),
            requests: std::array::from_fn(|_| Latency::allocated()),
        }
    }

    pub fn record(&mut self, stage: Stage, ns: u64) {
        self.stages[stage as usize].record(ns);
    }

    pub fn record_request(&mut self, kind: LatencyKind, ns: u64) {
        self.requests[kind as usize].record(ns);
    }

    pub fn merge_into(&mut self, other: &mut LatencyHistograms) {
        for (mine, theirs) in self.stages.iter_mut().zip(other.stages.iter_mut()) {
            mine.merge_into(theirs);
        }
        for (mine, theirs) in self.requests.iter_mut().zip(other.requests.iter_mut()) {
            mine.merge_into(theirs);
        }
    }

    pub fn get(&self, stage: Stage) -> &Latency {
        &self.stages[stage as usize]
    }

    pub fn requests(&self, kind: LatencyKind) -> &Latency {
        &self.requests[kind as usize]
    }

    /// Every request's latency, whatever its kind (a new histogram: not for the data path).
    pub fn all_requests(&self) -> Latency {
        let mut all = Latency::default();
        for l in &self.requests {
            all.add(l);
        }
        all
    }
}

/// Everything known about one queue, shared between its I/O thread and the readers.
#[derive(Default)]
pub struct QueueStats {
    pub counters: QueueCounters,
    pub histograms: Mutex<LatencyHistograms>,
    /// Requests taken from the ring and requests answered, since the export was opened,
    /// whatever `stats=` says: a resize that shrinks the disk waits until every request
    /// admitted before it is answered (see `Disk::resize`).
    pub admitted: std::sync::atomic::AtomicU64,
    pub retired: std::sync::atomic::AtomicU64,
    /// The ring layout the frontend negotiated, set when the queue starts (VIRTIO_F_RING_PACKED).
    pub packed_ring: std::sync::atomic::AtomicBool,
}

/// A latency distribution as reported: since the export was opened, percentiles and mean
/// in microseconds, the exact sum, and cumulative counts at each of [`BUCKET_BOUNDS_NS`].
#[derive(Clone, Debug, Serialize)]
pub struct LatencyReport {
    pub count: u64,
    pub sum_ns: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub buckets: Vec<u64>,
}

/// A stage as reported, with its share of the total's mean.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub stage: &'static str,
    #[serde(flatten)]
    pub latency: LatencyReport,
    pub share: f64,
}

/// The every-request latency of one [`LatencyKind`].
#[derive(Clone, Debug, Serialize)]
pub struct KindLatencyReport {
    pub kind: &'static str,
    #[serde(flatten)]
    pub latency: LatencyReport,
}

/// A queue's figures as `query-stats` reports them.
#[derive(Clone, Debug, Serialize)]
pub struct QueueReport {
    pub queue: usize,
    /// "packed" or "split": the layout of the queue's ring as it last started.
    pub ring: &'static str,
    pub requests: serde_json::Map<String, serde_json::Value>,
    pub bytes: serde_json::Map<String, serde_json::Value>,
    pub errors_ioerr: serde_json::Map<String, serde_json::Value>,
    pub errors_unsupp: serde_json::Map<String, serde_json::Value>,
    pub in_flight: u64,
    pub bounce_buffers: u64,
    pub flush_errors: u64,
    pub notifications_sent: u64,
    pub notifications_suppressed: u64,
    pub poll_ns: u64,
    pub poll_hits: u64,
    pub sleeps: u64,
    pub throttled_requests: u64,
    pub throttled_ns: u64,
    pub throttle_queued: u64,
    /// Every request, seen → notified.
    pub latency: LatencyReport,
    /// The same by kind: read, write, flush, other (discard, write zeroes, get id, other).
    pub latency_by_kind: Vec<KindLatencyReport>,
    /// The sampled requests, per layer.
    pub stages: Vec<StageReport>,
}

impl QueueStats {
    pub fn report(&self, queue: usize) -> QueueReport {
        let c = &self.counters;
        let by_kind = |cs: &[Counter; 7]| {
            Kind::ALL.iter().map(|k| (k.name().to_string(), cs[*k as usize].get().into())).collect()
        };
        let hist = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let total_mean = hist.get(Stage::Total).mean_ns();
        let stages = Stage::ALL
            .iter()
            .map(|&s| {
                let h = hist.get(s);
                StageReport {
                    stage: s.name(),
                    latency: h.report(),
                    share: if total_mean > 0.0 { h.mean_ns() / total_mean } else { 0.0 },
                }
            })
            .collect();
        let packed = self.packed_ring.load(std::sync::atomic::Ordering::Relaxed);
        QueueReport {
            queue,
            ring: if packed { "packed" } else { "split" },
            requests: by_kind(&c.requests),
            bytes: by_kind(&c.bytes),
            errors_ioerr: by_kind(&c.errors_ioerr),
            errors_unsupp: by_kind(&c.errors_unsupp),
            in_flight: c.in_flight.get(),
            bounce_buffers: c.bounce_buffers.get(),
            flush_errors: c.flush_errors.get(),
            notifications_sent: c.notifications_sent.get(),
            notifications_suppressed: c.notifications_suppressed.get(),
            poll_ns: c.poll_ns.get(),
            poll_hits: c.poll_hits.get(),
            sleeps: c.sleeps.get(),
            throttled_requests: c.throttled_requests.get(),
            throttled_ns: c.throttled_ns.get(),
            throttle_queued: c.throttle_queued.get(),
            latency: hist.all_requests().report(),
            latency_by_kind: LatencyKind::ALL
                .iter()
                .map(|&k| KindLatencyReport { kind: k.name(), latency: hist.requests(k).report() })
                .collect(),
            stages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_latency_is_kept_by_kind_and_sums_to_all() {
        let mut mine = LatencyHistograms::default();
        mine.record_request(LatencyKind::of(Kind::Read), 1_000);
        mine.record_request(LatencyKind::of(Kind::Read), 3_000);
        mine.record_request(LatencyKind::of(Kind::Write), 20_000);
        mine.record_request(LatencyKind::of(Kind::Discard), 7);
        let mut shared = LatencyHistograms::default();
        mine.merge_into(&mut shared);
        let counts: Vec<u64> =
            LatencyKind::ALL.iter().map(|&k| shared.requests(k).count()).collect();
        assert_eq!(counts, [2, 1, 0, 1], "read, write, flush, other");
        let all = shared.all_requests().report();
        assert_eq!((all.count, all.sum_ns), (4, 24_007));
        assert_eq!(mine.all_requests().count(), 0, "handed over");
    }
}
