//! blkplane: a userspace virtio-blk data plane for KVM guests over vhost-user-blk.
//!
//! The layers follow the request path (see ARCHITECTURE.md):
//! [`vhost_user`] (control thread) → [`virtq`] (rings on guest memory) → [`blk`] (request
//! parsing) → [`engine`] (io_uring, null) → [`iothread`] (one event loop per queue).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod advice;
pub mod bench;
pub mod blk;
pub mod cli;
pub mod config_file;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod engine;
pub mod export;
pub mod iothread;
pub mod listener;
pub mod logging;
pub mod qos;
pub mod ratelimit;
pub mod serve;
pub mod service;
pub mod spec;
pub mod stat;
pub mod sys;
pub mod trace;
pub mod vhost_user;
pub mod virtq;
