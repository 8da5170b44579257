//! The RBD engine: an export served from a Ceph RBD image through librbd (cargo feature
//! `rbd`, on by default; it links librbd and librados).
//!
//! - `spec.rs`: the image's name as QEMU writes it, or as export keys (always built, so that
//!   a build without the feature still explains itself).
//! - `ffi.rs`: the librados and librbd functions used, declared by hand.
//! - `cluster.rs`: cluster connections shared by the daemon's exports, and open images.
//! - `engine.rs`: a queue's requests as librbd aio calls, completions through an eventfd.

#[cfg(feature = "rbd")]
pub mod cluster;
#[cfg(feature = "rbd")]
pub mod engine;
#[cfg(feature = "rbd")]
mod ffi;
pub mod spec;

pub use spec::{RbdOptions, RbdSpec};

/// Largest `ceph-op-timeout` (seconds).
pub const MAX_OP_TIMEOUT_S: u32 = 3600;
