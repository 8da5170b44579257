//! The NBD engine: blkplane as a client of a network block device server (qemu-nbd, nbdkit,
//! any server of the protocol), over a Unix or TCP socket.
//!
//! - `uri.rs`: the standard URI syntax (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`).
//! - `handshake.rs`: connecting and the fixed newstyle negotiation (structured replies, GO
//!   with the export's size, flags and block sizes), each attempt under one deadline; done
//!   by the control thread at open, and by the connector threads, never by an I/O thread.
//! - `connector.rs`: the connector threads, at most one per queue index of an export.
//! - `wire.rs`: the transmission phase's constants and the request header.
//! - `engine.rs`: one connection per queue as an [`Engine`](super::Engine): requests
//!   pipelined with the slot tag as cookie, replies read into guest memory, and a lost
//!   connection re-established while its requests wait.

pub mod connector;
pub mod engine;
pub mod handshake;
pub mod uri;
pub mod wire;

use std::time::Duration;

pub use handshake::{connect, Negotiated};
pub use uri::{NbdAddr, NbdSpec};

/// How long one connection attempt (connect and negotiation together) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `reconnect-delay`: how long requests wait for a lost server before they fail.
pub const DEFAULT_RECONNECT_DELAY_S: u32 = 10;
/// Largest `reconnect-delay`.
pub const MAX_RECONNECT_DELAY_S: u32 = 3600;
