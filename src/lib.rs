//! blkplane: a userspace virtio-blk data plane for KVM guests over vhost-user-blk.
//!
//! The layers follow the request path (see ARCHITECTURE.md):
//! [`vhost_user`] (control thread) → [`virtq`] (rings on guest memory) → [`blk`] (request
//! parsing) → [`engine`] (io_uring, null) → [`iothread`] (one event loop per queue).

#![deny(unsafe_op_in_unsafe_fn)]

mod advice;
mod bench;
mod blk;
mod cli;
mod config_file;
mod control;
mod daemon;
mod disk;
mod engine;
mod export;
mod iothread;
mod jobs;
mod listener;
mod logging;
mod manpages;
mod mirror;
mod nbd_server;
mod qos;
mod ratelimit;
mod serve;
mod service;
mod spec;
mod stat;
mod sys;
mod trace;
mod vhost_user;
mod virtq;

// What the binary, the tests and the examples use; everything else is the crate's own, so
// that the compiler reports what nothing uses.
pub use bench::cpu::{process_cpu_ns, process_cpu_total_ns};
pub use cli::main;
pub use control::ControlClient;
pub use qos::{now_ns, Cost, Throttle, ThrottleConfig};
pub use spec::Value;
pub use sys::filesystem_of;
pub use trace::sample::Sampler;
pub use trace::{Kind as RequestKind, LatencyHistograms};
pub use virtq::packed::{Desc as PackedDesc, RingPos};
pub use virtq::{InflightRegion, RingFormat, Tracker};
