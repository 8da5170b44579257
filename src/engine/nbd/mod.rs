//! The NBD engine: blkplane as a client of a network block device server (qemu-nbd, nbdkit,
//! any server of the protocol), over a Unix or TCP socket.
//!
//! - `uri.rs`: the standard URI syntax (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`).
//! - `handshake.rs`: connecting and the fixed newstyle negotiation (structured replies, GO
//!   with the export's size, flags and block sizes), each attempt under one deadline; done
//!   by the control thread at open, and by the connector threads, never by an I/O thread.
//! - `connector.rs`: the connector threads, at most one per queue index of an export.
//! - `tls.rs`: TLS as a client (a mirror's `tls-creds=DIR`), and the certificate files.
//! - `wire.rs`: the transmission phase's constants and the request header.
//! - `engine.rs`: one connection per queue as an [`Engine`](super::Engine): requests
//!   pipelined with the slot tag as cookie, replies read into guest memory, and a lost
//!   connection re-established while its requests wait.

pub mod blocking;
pub mod connector;
pub mod engine;
pub mod handshake;
pub mod tls;
pub mod uri;
pub mod wire;

use std::time::Duration;

pub use handshake::connect;
pub use uri::NbdSpec;

use crate::spec::{err, Key, Kind, Options, Value};

/// How long one connection attempt (connect and negotiation together) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `reconnect-delay`: how long requests wait for a lost server before they fail.
pub const DEFAULT_RECONNECT_DELAY_S: u32 = 10;
/// Largest `reconnect-delay`.
pub const MAX_RECONNECT_DELAY_S: u32 = 3600;

/// The export keys of an NBD export besides its `image=nbd://...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// How long requests wait for a lost server before they fail.
    pub reconnect_delay_s: u32,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions { reconnect_delay_s: DEFAULT_RECONNECT_DELAY_S }
    }
}

impl Options for NbdOptions {
    const KEYS: &'static [Key<NbdOptions>] = &[Key {
        name: "reconnect-delay",
        aliases: &[],
        kind: Kind::Number,
        usage: "reconnect-delay=SECONDS",
        help: "(NBD) how long requests wait for a lost server before they fail\n\
               (default 10, at most 3600).",
        set: |o, v| {
            let delay: u32 = v.number("reconnect-delay")?;
            if delay > MAX_RECONNECT_DELAY_S {
                return err(format!(
                    "reconnect-delay={v}: at most {MAX_RECONNECT_DELAY_S} seconds"
                ));
            }
            o.reconnect_delay_s = delay;
            Ok(())
        },
        get: |o| Some(Value::Int(o.reconnect_delay_s.into())),
    }];
}
