//! [trace] Per-queue statistics: exact counters for every request, and, for a sample of
//! requests, the time spent between each pair of layer boundaries of the request path:
//!
//! ```text
//! seen ─parse─▶ parsed ─submit─▶ submitted ─backend─▶ completed ─publish─▶ published ─notify─▶ notified
//! ```
//!
//! Cost on the data path: counters are plain loads and stores (each counter has one writer,
//! its I/O thread, so no locked read-modify-write is needed); clock reads are taken only for
//! one request in `SAMPLE_EVERY`, so the latency of the others does not change. Each I/O
//! thread keeps its own histograms and merges them into the shared ones under a mutex a few
//! times a second, never per request.

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
    pub requests: [Counter; 7],
    pub bytes: [Counter; 7],
    /// Requests answered VIRTIO_BLK_S_IOERR.
    pub errors_ioerr: Counter,
    /// Requests answered VIRTIO_BLK_S_UNSUPP.
    pub errors_unsupp: Counter,
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
}

/// Stage histograms, in nanoseconds.
pub struct StageHistograms {
    stages: Vec<Histogram<u64>>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 100 s, 2 significant digits: bounds that cannot fail.
    Histogram::new_with_bounds(1, 100_000_000_000, 2).expect("histogram bounds")
}

impl Default for StageHistograms {
    fn default() -> Self {
        StageHistograms { stages: Stage::ALL.iter().map(|_| new_histogram()).collect() }
    }
}

impl StageHistograms {
    pub fn record(&mut self, stage: Stage, ns: u64) {
        self.stages[stage as usize].saturating_record(ns.max(1));
    }

    pub fn merge_into(&mut self, other: &mut StageHistograms) {
        for (mine, theirs) in self.stages.iter_mut().zip(other.stages.iter_mut()) {
            // Same bounds on both sides: adding cannot fail.
            let _ = theirs.add(&*mine);
            mine.reset();
        }
    }

    pub fn get(&self, stage: Stage) -> &Histogram<u64> {
        &self.stages[stage as usize]
    }
}

/// Everything known about one queue, shared between its I/O thread and the readers.
#[derive(Default)]
pub struct QueueStats {
    pub counters: QueueCounters,
    pub histograms: Mutex<StageHistograms>,
    /// Requests taken from the ring and requests answered, since the export was opened,
    /// whatever `stats=` says: a resize that shrinks the disk waits until every request
    /// admitted before it is answered (see `Disk::resize`).
    pub admitted: std::sync::atomic::AtomicU64,
    pub retired: std::sync::atomic::AtomicU64,
}

/// A stage as reported: percentiles and mean in microseconds, and share of the total mean.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub stage: &'static str,
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub share: f64,
}

/// A queue's figures as `query-stats` reports them.
#[derive(Clone, Debug, Serialize)]
pub struct QueueReport {
    pub queue: usize,
    pub requests: serde_json::Map<String, serde_json::Value>,
    pub bytes: serde_json::Map<String, serde_json::Value>,
    pub errors_ioerr: u64,
    pub errors_unsupp: u64,
    pub in_flight: u64,
    pub bounce_buffers: u64,
    pub flush_errors: u64,
    pub notifications_sent: u64,
    pub notifications_suppressed: u64,
    pub poll_ns: u64,
    pub poll_hits: u64,
    pub sleeps: u64,
    pub stages: Vec<StageReport>,
}

impl QueueStats {
    pub fn report(&self, queue: usize) -> QueueReport {
        let c = &self.counters;
        let by_kind = |cs: &[Counter; 7]| {
            Kind::ALL.iter().map(|k| (k.name().to_string(), cs[*k as usize].get().into())).collect()
        };
        let hist = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let total_mean = hist.get(Stage::Total).mean();
        let stages = Stage::ALL
            .iter()
            .map(|&s| {
                let h = hist.get(s);
                StageReport {
                    stage: s.name(),
                    samples: h.len(),
                    mean_us: h.mean() / 1000.0,
                    p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
                    p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
                    share: if total_mean > 0.0 { h.mean() / total_mean } else { 0.0 },
                }
            })
            .collect();
        QueueReport {
            queue,
            requests: by_kind(&c.requests),
            bytes: by_kind(&c.bytes),
            errors_ioerr: c.errors_ioerr.get(),
            errors_unsupp: c.errors_unsupp.get(),
            in_flight: c.in_flight.get(),
            bounce_buffers: c.bounce_buffers.get(),
            flush_errors: c.flush_errors.get(),
            notifications_sent: c.notifications_sent.get(),
            notifications_suppressed: c.notifications_suppressed.get(),
            poll_ns: c.poll_ns.get(),
            poll_hits: c.poll_hits.get(),
            sleeps: c.sleeps.get(),
            stages,
        }
    }
}
