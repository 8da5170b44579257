//! The RBD engine: an export served from a Ceph RBD image through librbd, which is loaded
//! when the first RBD export opens (nothing is linked: a host without Ceph builds and runs
//! everything else).
//!
//! - `spec.rs`: the image's name as QEMU writes it, or as export keys.
//! - `ffi.rs`: the librados and librbd functions used, declared by hand and found at run
//!   time.
//! - `cluster.rs`: cluster connections shared by the daemon's exports, and open images.
//! - `engine.rs`: a queue's requests as librbd aio calls, completions through an eventfd.

pub mod cluster;
pub mod engine;
mod ffi;
pub mod spec;

pub use spec::{RbdOptions, RbdSpec};

/// Largest `ceph-op-timeout` (seconds).
pub const MAX_OP_TIMEOUT_S: u32 = 3600;
