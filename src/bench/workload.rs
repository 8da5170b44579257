//! The benchmark's workloads and the client loop that drives them through libblkio, exactly
//! as a guest driver would: a real virtio-blk driver on a vhost-user socket, or io_uring on
//! the image for the host baseline.

use std::fmt;
use std::mem::MaybeUninit;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use hdrhistogram::Histogram;

use super::target::TargetKind;
use super::BenchError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: &'static str,
    pub write: bool,
    pub sequential: bool,
    pub block_bytes: usize,
    pub depth: usize,
}

/// The standard set: latency (QD1 read and write), IOPS (QD32), bandwidth (128 KiB QD8).
pub const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "randread-4k-qd1",
        write: false,
        sequential: false,
        block_bytes: 4096,
        depth: 1,
    },
    Workload {
        name: "randwrite-4k-qd1",
        write: true,
        sequential: false,
        block_bytes: 4096,
        depth: 1,
    },
    Workload {
        name: "randread-4k-qd32",
        write: false,
        sequential: false,
        block_bytes: 4096,
        depth: 32,
    },
    Workload {
        name: "seqread-128k-qd8",
        write: false,
        sequential: true,
        block_bytes: 128 << 10,
        depth: 8,
    },
];

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WORKLOADS.into_iter().find(|w| w.name == s).ok_or_else(|| {
            let names: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
            format!("unknown workload '{s}' (one of {})", names.join(", "))
        })
    }
}

/// How the client waits for completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMode {
    /// Sleeps on the completion eventfd (what an interrupt-driven guest does).
    Block,
    /// Busy-polls the used ring (what a polling guest driver does).
    Poll,
}

impl fmt::Display for ClientMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientMode::Block => "block",
            ClientMode::Poll => "poll",
        })
    }
}

impl FromStr for ClientMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "block" => Ok(ClientMode::Block),
            "poll" => Ok(ClientMode::Poll),
            _ => Err(format!("unknown client mode '{s}' (block or poll)")),
        }
    }
}

/// A connected libblkio client.
pub struct Client {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    // Dropped last: the queues and region belong to it.
    _blkio: Blkio,
}

fn blkio_err(what: &str) -> impl Fn(blkio::Error) -> BenchError + '_ {
    move |e| BenchError(format!("{what}: {e}"))
}

/// Connects to `path` (a vhost-user socket, or the image for the host target) with `queues`
/// queues and a buffer region big enough for `depth` requests of `max_block_bytes` each.
pub fn connect(
    kind: TargetKind,
    path: &Path,
    queues: usize,
    depth: usize,
    max_block_bytes: usize,
) -> Result<Client, BenchError> {
    let driver = if kind == TargetKind::Host { "io_uring" } else { "virtio-blk-vhost-user" };
    let mut b = Blkio::new(driver).map_err(blkio_err("libblkio"))?;
    let path_str =
        path.to_str().ok_or_else(|| BenchError(format!("{} is not UTF-8", path.display())))?;
    b.set_str("path", path_str).map_err(blkio_err("libblkio path"))?;
    if kind == TargetKind::Host {
        b.set_bool("direct", true).map_err(blkio_err("libblkio direct"))?;
    }
    b.connect().map_err(blkio_err(&format!("connecting to {kind} at {}", path.display())))?;
    b.set_i32("num-queues", queues as i32).map_err(blkio_err("num-queues"))?;
    let started = b.start().map_err(blkio_err(&format!("starting {kind}")))?;
    let align = b.get_u64("mem-region-alignment").unwrap_or(4096).max(4096) as usize;
    let len = (queues * depth * max_block_bytes).div_ceil(align) * align;
    let region = b.alloc_mem_region(len).map_err(blkio_err("allocating buffers"))?;
    b.map_mem_region(&region).map_err(blkio_err("mapping buffers"))?;
    // Non-zero data, so writes write something.
    // SAFETY: the region was just allocated for us, len bytes at addr.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region.len) };
    Ok(Client { queues: started.queues, region, _blkio: b })
}

/// What one run measured.
pub struct Measurement {
    /// Completions inside the measured window.
    pub ios: u64,
    /// Completions over the whole run, warm-up included (for CPU per I/O).
    pub total_ios: u64,
    pub errors: u64,
    pub window: Duration,
    pub latency_ns: Histogram<u64>,
}

struct QueueResult {
    ios: u64,
    total_ios: u64,
    errors: u64,
    latency_ns: Histogram<u64>,
}

fn new_histogram() -> Histogram<u64> {
    // 10 ns to 10 s with three significant digits; cannot fail for these bounds.
    Histogram::new_with_bounds(10, 10_000_000_000, 3).expect("histogram bounds")
}

/// Runs `w` on every queue of `client` (one thread per queue) for `warmup` then `runtime`.
pub fn run(
    client: &mut Client,
    w: Workload,
    mode: ClientMode,
    span_bytes: u64,
    warmup: Duration,
    runtime: Duration,
) -> Result<Measurement, BenchError> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + runtime;
    let per_queue = w.depth * w.block_bytes;
    let base = client.region.addr;
    let results: Vec<Result<QueueResult, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                let buf = base + i * per_queue;
                s.spawn(move || drive(q, buf, w, mode, span_bytes, i as u64, measure_from, end))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("client thread panicked".into())))
            .collect()
    });
    let mut m = Measurement {
        ios: 0,
        total_ios: 0,
        errors: 0,
        window: runtime,
        latency_ns: new_histogram(),
    };
    for r in results {
        let r = r.map_err(BenchError)?;
        m.ios += r.ios;
        m.total_ios += r.total_ios;
        m.errors += r.errors;
        m.latency_ns
            .add(&r.latency_ns)
            .map_err(|e| BenchError(format!("merging histograms: {e}")))?;
    }
    Ok(m)
}

/// One queue's loop: keep `depth` requests in flight, time each from submission to completion.
#[allow(clippy::too_many_arguments)]
fn drive(
    q: &mut Blkioq,
    buf: usize,
    w: Workload,
    mode: ClientMode,
    span_bytes: u64,
    seed: u64,
    measure_from: Instant,
    end: Instant,
) -> Result<QueueResult, String> {
    let blocks = (span_bytes / w.block_bytes as u64).max(1);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (seed + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut next_seq = (seed * blocks / 4) % blocks;
    let mut submitted_at = vec![Instant::now(); w.depth];
    let mut free: Vec<usize> = (0..w.depth).collect();
    let mut done: Vec<MaybeUninit<Completion>> =
        (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut r = QueueResult { ios: 0, total_ios: 0, errors: 0, latency_ns: new_histogram() };
    let mut in_flight = 0usize;
    let min_completions = match mode {
        ClientMode::Block => 1,
        ClientMode::Poll => 0,
    };
    loop {
        let now = Instant::now();
        if now < end {
            while let Some(slot) = free.pop() {
                let block = if w.sequential {
                    next_seq = (next_seq + 1) % blocks;
                    next_seq
                } else {
                    // xorshift64: cheap, and plenty random for picking blocks.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % blocks
                };
                let offset = block * w.block_bytes as u64;
                let ptr = (buf + slot * w.block_bytes) as *mut u8;
                if w.write {
                    q.write(offset, ptr, w.block_bytes, slot, ReqFlags::empty());
                } else {
                    q.read(offset, ptr, w.block_bytes, slot, ReqFlags::empty());
                }
                submitted_at[slot] = now;
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            break;
        }
        let n =
            q.do_io(&mut done, min_completions, None, None).map_err(|e| format!("do_io: {e}"))?;
        let completed_at = Instant::now();
        for c in &done[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_read() };
            let slot = c.user_data;
            if slot >= w.depth {
                return Err(format!("completion for unknown request {slot}"));
            }
            in_flight -= 1;
            free.push(slot);
            r.total_ios += 1;
            if c.ret != 0 {
                r.errors += 1;
                continue;
            }
            if submitted_at[slot] >= measure_from && completed_at <= end {
                let ns = completed_at.duration_since(submitted_at[slot]).as_nanos() as u64;
                r.latency_ns.saturating_record(ns.max(10));
                r.ios += 1;
            }
        }
    }
    Ok(r)
}
