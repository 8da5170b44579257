//! The spinning client the cost examples share: the test suite's frontend posting reads and
//! busy-waiting on the used ring, so that only the daemon's own path is measured.

use crate::frontend::{header, Buf, TestFrontend, DATA_AREA, HEADER_AREA, T_IN};
use std::time::Instant;

/// Posts `depth` reads of 4 KiB (descriptors 3k..3k+2) and spins until all are answered;
/// `requests` in all. Returns requests per second.
pub fn run(fe: &mut TestFrontend, depth: u16, requests: u64) -> f64 {
    for k in 0..u64::from(depth) {
        fe.ram.write(HEADER_AREA + k * 32, &header(T_IN, k * 8));
    }
    let start = Instant::now();
    let mut done = 0;
    while done < requests {
        let target = fe.used_idx(0).wrapping_add(depth);
        for k in 0..depth {
            let bufs = [
                Buf { gpa: HEADER_AREA + u64::from(k) * 32, len: 16, writable: false },
                Buf { gpa: DATA_AREA + u64::from(k) * 4096, len: 4096, writable: true },
                Buf { gpa: HEADER_AREA + u64::from(k) * 32 + 16, len: 1, writable: true },
            ];
            fe.post(0, 3 * k, &bufs);
        }
        while fe.used_idx(0) != target {
            std::hint::spin_loop();
        }
        fe.queues[0].last_used = target;
        done += u64::from(depth);
    }
    done as f64 / start.elapsed().as_secs_f64()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
