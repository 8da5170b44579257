//! What timing every request (seen → notified, for the latency histograms) costs; see
//! BENCHMARKS.md ("Every request's latency").
//!
//! 1. The sampler's work alone, as an I/O thread does it each round of 32 requests (a clock
//!    read when the fetch takes the first, one after the notification, a histogram increment
//!    per request), with statistics on and off; nanoseconds per request.
//! 2. End to end against the real daemon (`engine=null`, so that only our own path is
//!    measured), the test suite's frontend spinning on the used ring at depth 1 and 32:
//!    this build with `stats=on` and `stats=off`, and, given a second binary (e.g. the build
//!    before the change), that one with its defaults; alternating runs, requests per second.
//!
//!     cargo build --release && cargo run --release --example latency_cost [REQUESTS [OLD_BINARY]]

#[path = "../tests/common/frontend.rs"]
#[allow(dead_code)]
mod frontend;
#[path = "common/spin.rs"]
mod spin;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blkplane::LatencyHistograms;
use blkplane::Sampler;
use frontend::TestFrontend;
use spin::{median, run};

fn sampler_ns_per_request(on: bool, rounds: u64) -> f64 {
    let mut sampler = Sampler::new(on, 256);
    let shared = Mutex::new(LatencyHistograms::default());
    let start = Instant::now();
    for round in 0..rounds {
        let first = (round % 8) as u16 * 32;
        sampler.round_begins();
        for tag in first..first + 32 {
            sampler.seen(std::hint::black_box(tag));
            sampler.parsed(tag);
            sampler.queued(tag);
        }
        sampler.submitted();
        for tag in first..first + 32 {
            sampler.completed(std::hint::black_box(tag), blkplane::RequestKind::Read);
        }
        if sampler.waiting() {
            let published = sampler.has_done().then(Instant::now);
            sampler.record(published, Instant::now(), &shared);
        }
    }
    start.elapsed().as_nanos() as f64 / (rounds * 32) as f64
}

fn start(bin: &Path, sock: &Path, extra: &str) -> Child {
    let child = Command::new(bin)
        .args(["serve", "--log-level", "warn", "--pool-threads", "1", "--export"])
        .arg(format!("socket={},engine=null,size=1G,queue-size=256{extra}", sock.display()))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the daemon (cargo build --release first)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn main() {
    let mut args = std::env::args().skip(1);
    let requests: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let old = args.next();
    for on in [false, true] {
        let micro: Vec<f64> = (0..5).map(|_| sampler_ns_per_request(on, 1_000_000)).collect();
        println!(
            "sampler work alone, statistics {}: {:.2} ns per request (median of 5 x 32M)",
            if on { "on " } else { "off" },
            median(micro)
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let this = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/blkplane"));
    let mut targets =
        vec![("stats=on", this.to_path_buf(), ""), ("stats=off", this.into(), ",stats=off")];
    if let Some(old) = &old {
        targets.push(("old binary", old.into(), ""));
    }
    let mut daemons: Vec<(Child, std::path::PathBuf)> = targets
        .iter()
        .enumerate()
        .map(|(i, (_, bin, extra))| {
            let sock = dir.path().join(format!("{i}.sock"));
            (start(bin, &sock, extra), sock)
        })
        .collect();
    for depth in [1u16, 32] {
        let mut rates = vec![Vec::new(); targets.len()];
        for _ in 0..5 {
            for (i, (_, sock)) in daemons.iter().enumerate() {
                let mut fe = TestFrontend::connect(sock, 1, 256, 0);
                run(&mut fe, depth, requests / 10);
                rates[i].push(run(&mut fe, depth, requests));
            }
        }
        let medians: Vec<f64> = rates.into_iter().map(median).collect();
        let line: Vec<String> = targets
            .iter()
            .zip(&medians)
            .map(|((name, _, _), r)| {
                format!("{name} {r:.0} req/s ({:+.1} %)", (r / medians[0] - 1.0) * 100.0)
            })
            .collect();
        println!(
            "end to end, depth {depth:>2}: {}; medians of 5 alternating runs of {requests}",
            line.join(", ")
        );
    }
    for (child, _) in &mut daemons {
        let _ = child.kill();
        let _ = child.wait();
    }
}
