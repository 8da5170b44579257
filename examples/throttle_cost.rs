//! What a rate limit costs per request on the I/O thread, in isolation; see BENCHMARKS.md
//! ("Rate limits"). `Throttle::admit` as the queues call it: with no limit (one relaxed
//! load), with an iops and a bps limit that never bind (two buckets, a compare-and-swap
//! each), and the same limits shared by two and by four threads at once (a throttle group
//! whose queues run on different I/O threads: the buckets' cache lines bounce between the
//! CPUs). Nanoseconds per request, median of 5 runs.
//!
//!     cargo run --release --example throttle_cost [REQUESTS_PER_THREAD]

use std::sync::Arc;
use std::time::Instant;

use blkplane::{now_ns, Cost, Throttle, ThrottleConfig, Value};

/// `threads` threads each admit `n` 4 KiB reads on `t`, one clock read per 32 (as a fetch
/// batch does): nanoseconds per request per thread.
fn ns_per_request(t: &Arc<Throttle>, threads: usize, n: u64) -> f64 {
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let t = Arc::clone(t);
            std::thread::spawn(move || {
                let mut waited = 0u64;
                let mut now = now_ns();
                for i in 0..n {
                    if i % 32 == 0 {
                        now = now_ns();
                    }
                    waited = waited.wrapping_add(t.admit(now, Cost::Read(4096)));
                }
                waited
            })
        })
        .collect();
    let waited: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(waited, 0, "the limits were meant never to bind");
    start.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000_000);
    let none = Throttle::own(&ThrottleConfig::default());
    let (iops, bps) = (Value::Int(1_000_000_000_000), Value::Int(1_000_000_000_000_000));
    let limits =
        ThrottleConfig::from_pairs([("iops-total", &iops), ("bps-total", &bps)]).expect("limits");
    let limited = Throttle::own(&limits);
    println!("ns per request (median of 5 runs of {n} requests per thread)");
    for (what, t, threads) in [
        ("no limit", &none, 1),
        ("iops + bps limit, one thread", &limited, 1),
        ("iops + bps limit, shared by 2 threads", &limited, 2),
        ("iops + bps limit, shared by 4 threads", &limited, 4),
    ] {
        let runs: Vec<f64> = (0..5).map(|_| ns_per_request(t, threads, n)).collect();
        println!("{what:40} {:7.1}", median(runs));
    }
}
