//! What inflight tracking (INFLIGHT_SHMFD) and dirty logging (a live migration's LOG_ALL)
//! cost per request, measured two ways; see BENCHMARKS.md ("Restart", "Live migration").
//!
//! 1. The region's own work in isolation: marking 32 heads taken, linking their used
//!    entries, unmarking them after a publish, as the I/O thread does each round, on a real
//!    region (a memfd mapping); nanoseconds per request.
//! 2. End to end against the real daemon (`engine=null`, so that only our own path is
//!    measured): the test suite's frontend, spinning on the used ring, at queue depth 1 and
//!    in batches of 32, with the region off and on, alternating runs; requests per second.
//!
//!     cargo build --release && cargo run --release --example inflight_cost [REQUESTS]

#[path = "../tests/common/frontend.rs"]
#[allow(dead_code)]
mod frontend;
#[path = "common/spin.rs"]
mod spin;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkplane::{InflightRegion, PackedDesc, RingFormat, RingPos, Tracker};
use frontend::TestFrontend;
use spin::{median, run};
use std::os::fd::AsRawFd;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

fn region_ns_per_request(rounds: u64) -> f64 {
    let (region, _file) = InflightRegion::create(RingFormat::Split, 1, 256, None).unwrap();
    let region = Arc::new(region);
    let mut q = region.queue(0, 256).unwrap();
    q.recover(0, 0, &mut Vec::new()).unwrap();
    let mut used_idx = 0u16;
    let start = Instant::now();
    for round in 0..rounds {
        let first = (round % 8) as u16 * 32;
        for head in first..first + 32 {
            q.taken(std::hint::black_box(head));
        }
        for head in first..first + 32 {
            q.used(std::hint::black_box(head));
        }
        used_idx = used_idx.wrapping_add(32);
        q.published(32, used_idx);
    }
    start.elapsed().as_nanos() as f64 / (rounds * 32) as f64
}

/// As [`region_ns_per_request`] on a packed ring's part: each request a chain of 3
/// descriptors (header, data, status) copied into the region when taken, put back on its
/// free list at publish.
fn packed_region_ns_per_request(rounds: u64) -> f64 {
    let (region, _file) = InflightRegion::create(RingFormat::Packed, 1, 256, None).unwrap();
    let region = Arc::new(region);
    let Ok(Tracker::Packed(mut q)) = region.tracker(0, RingFormat::Packed, 256) else {
        panic!("a packed tracker");
    };
    let start_pos = RingPos { index: 0, wrap: true };
    q.recover(start_pos, |_| false, &mut Vec::new()).unwrap();
    let chain =
        |id: u16| {
            [(0x1000, 16, 1), (0x2000, 4096, 3), (0x3000, 1, 2)]
                .map(|(addr, len, flags)| PackedDesc { addr, len, id, flags })
        };
    let start = Instant::now();
    for round in 0..rounds {
        let first = (round % 2) as u16 * 32;
        for id in first..first + 32 {
            q.taken(chain(std::hint::black_box(id)).into_iter(), id).unwrap();
        }
        for id in first..first + 32 {
            q.used(std::hint::black_box(id));
        }
        let used = RingPos { index: ((round + 1) * 96 % 256) as u16, wrap: true };
        q.publishing(used);
        q.published();
    }
    start.elapsed().as_nanos() as f64 / (rounds * 32) as f64
}

fn main() {
    let requests: u64 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let micro: Vec<f64> = (0..5).map(|_| region_ns_per_request(1_000_000)).collect();
    println!("region work alone: {:.2} ns per request (median of 5 x 32M)", median(micro));
    let micro: Vec<f64> = (0..5).map(|_| packed_region_ns_per_request(1_000_000)).collect();
    println!("packed region work alone: {:.2} ns per request (median of 5 x 32M)", median(micro));

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/blkplane");
    let mut daemon = Command::new(bin)
        .args(["serve", "--log-level", "warn", "--export"])
        .arg(format!("socket={},engine=null,size=1G,queue-size=256", sock.display()))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start target/release/blkplane (cargo build --release first)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = frontend::memfd(4096);
    for depth in [1u16, 32] {
        let mut rates = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..3 {
            for (mode, rates) in rates.iter_mut().enumerate() {
                let mut fe = match mode {
                    0 => TestFrontend::connect(&sock, 1, 256, 0),
                    1 => TestFrontend::connect_inflight(&sock, 1, 256, 0),
                    _ => {
                        let extra = VhostUserProtocolFeatures::LOG_SHMFD;
                        let mut fe = TestFrontend::connect_with_protocol(&sock, 1, 256, 0, extra);
                        let region = VhostUserDirtyLogRegion {
                            mmap_size: 4096,
                            mmap_offset: 0,
                            mmap_handle: log.as_raw_fd(),
                        };
                        fe.fe.set_log_base(0, Some(region)).unwrap();
                        fe.fe.set_features(fe.features | (1 << 26)).unwrap();
                        let used = fe.queues[0].used;
                        fe.set_ring_log(0, Some(used)).unwrap();
                        fe
                    }
                };
                run(&mut fe, depth, requests / 10);
                rates.push(run(&mut fe, depth, requests));
            }
        }
        let [plain, inflight, logging] = rates.map(median);
        println!(
            "end to end, depth {depth:>2}: plain {plain:>9.0} req/s, inflight region {inflight:>9.0} ({:+.1} %), dirty logging {logging:>9.0} ({:+.1} %); medians of 3 alternating runs of {requests}",
            (inflight / plain - 1.0) * 100.0,
            (logging / plain - 1.0) * 100.0
        );
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}
