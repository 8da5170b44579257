//! [qos] Quality of service: rate limits per export and per throttle group, so that one
//! tenant cannot take the device from the others.
//!
//! - `config.rs`: the limits as operators write them (QEMU's and libvirt's keys), checked.
//! - `throttle.rs`: the limits as the I/O threads enforce them, shared by the queues of an
//!   export or by every export of a group, changed live from the control socket.
//! - `gcra.rs`: the rate algorithm of each bucket (one atomic word, no lock).
//!
//! On the data path (`iothread/worker/queue.rs`), a queue asks its throttle before it
//! starts each read or write; one that must wait keeps the request in its slot, takes
//! nothing more from its ring, turns the guest's kicks off and sleeps until the throttle
//! said it may go (a timeout of its thread's sleep: no polling).

pub mod config;
pub mod gcra;
pub mod throttle;

use std::sync::OnceLock;
use std::time::Instant;

pub use config::{LimitOptions, ThrottleConfig, THROTTLE_KEYS};
pub use throttle::{Cost, Throttle};

/// Nanoseconds on the clock every throttle counts in (monotonic, from the first call; never
/// 0 after it, which the buckets read as "long idle").
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(std::time::Duration::from_secs(1)).unwrap_or(now)
    });
    epoch.elapsed().as_nanos() as u64
}
