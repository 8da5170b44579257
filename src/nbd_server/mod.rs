//! The daemon's NBD server (`serve --nbd-server`, the `[nbd-server]` table): running exports
//! exposed to any NBD client (qemu-img, qemu-nbd, nbdkit's nbd plugin, nbd-client) by name,
//! read through their [`Disk`] off the data path, and written only where no guest runs.
//!
//! - `negotiate.rs`: the fixed newstyle handshake and its options (GO, INFO, LIST, ABORT,
//!   STRUCTURED_REPLY, SET/LIST_META_CONTEXT for `base:allocation`, STARTTLS), under one
//!   deadline per connection.
//! - `transmit.rs`: the transmission phase: read, write, flush, trim, write-zeroes, block
//!   status, disconnect; simple or structured replies.
//! - `tls.rs`: x509 credentials as QEMU's `tls-creds-x509` lays them out (rustls).
//! - `stream.rs`: a connection, in clear or in TLS.
//!
//! One thread per connection, at most `max-connections` (16) of them. It sits beside the
//! export servers: it reads `disk.rs` and the NBD numbers of `engine/nbd/wire.rs`, and the
//! daemon (`daemon.rs`) starts it and tells it what to expose.

mod negotiate;
mod stream;
mod tls;
mod transmit;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::info;

use crate::disk::{Backend, Disk};
use crate::listener::{ConnectionLimit, Listening, StoppableListener};
use crate::ratelimit::RateLimiter;
use crate::spec::{err, split_pairs, Key, Kind, Options, SpecError, Value};
use crate::vhost_user::{apply_socket_access, bind_socket, SocketAccess, SocketOptions};
use crate::warn_limited;
use stream::Socket;

/// Default and largest `max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;
pub const MAX_CONNECTIONS: usize = 256;
/// The largest read or write one request may ask for (the protocol's customary maximum,
/// what qemu-nbd says too): each connection buffers at most this much.
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;

/// The keys of `--nbd-server` and of the `[nbd-server]` table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdServerOptions {
    pub unix: Option<PathBuf>,
    /// `HOST:PORT` for TCP.
    pub addr: Option<String>,
    pub tls_creds: Option<PathBuf>,
    /// `tls=off` (plain TCP) or `tls=on`, as said.
    pub tls: Option<bool>,
    /// Clients must show a certificate the credentials' CA signed (default on, as QEMU's).
    pub verify_peer: Option<bool>,
    /// The Unix socket's mode, group and owner (the export socket's keys).
    pub access: SocketAccess,
    pub max_connections: Option<usize>,
}

/// One of the export socket's access keys, applied to the NBD server's Unix socket.
fn set_access(o: &mut NbdServerOptions, key: &str, v: &Value) -> Result<(), SpecError> {
    let mut socket = SocketOptions { access: o.access.clone(), ..SocketOptions::default() };
    if let Some((_, result)) = socket.set_key(key, v) {
        result?;
    }
    o.access = socket.access;
    Ok(())
}

fn get_access(o: &NbdServerOptions, key: &str) -> Option<Value> {
    let socket = SocketOptions { access: o.access.clone(), ..SocketOptions::default() };
    socket.pairs().into_iter().find(|(k, _)| *k == key).map(|(_, v)| v)
}

fn on_off(b: Option<bool>) -> Option<Value> {
    b.map(|b| Value::Str(if b { "on" } else { "off" }.into()))
}

impl Options for NbdServerOptions {
    const KEYS: &'static [Key<NbdServerOptions>] = &[
        Key {
            name: "unix",
            aliases: &["addr.path"],
            kind: Kind::Path,
            usage: "unix=PATH",
            help: "serve NBD on this Unix socket (created 0600, like an export's socket;\n\
                   socket-mode, socket-group and socket-owner widen it).",
            set: |o, v| {
                o.unix = Some(v.path("unix")?);
                Ok(())
            },
            get: |o| o.unix.as_ref().map(|p| Value::Str(p.display().to_string())),
        },
        Key {
            name: "addr",
            aliases: &[],
            kind: Kind::Text,
            usage: "addr=HOST:PORT",
            help: "serve NBD on TCP; needs tls-creds=DIR, or tls=off said on purpose.",
            set: |o, v| {
                let text = v.text("addr")?;
                match text.rsplit_once(':') {
                    Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                        o.addr = Some(text);
                        Ok(())
                    }
                    _ => err(format!("addr={text}: HOST:PORT, e.g. 0.0.0.0:10809")),
                }
            },
            get: |o| o.addr.clone().map(Value::Str),
        },
        Key {
            name: "tls-creds",
            aliases: &[],
            kind: Kind::Path,
            usage: "tls-creds=DIR",
            help: "x509 credentials as QEMU's tls-creds-x509 reads them: DIR/ca-cert.pem,\n\
                   DIR/server-cert.pem, DIR/server-key.pem. Clients must start TLS\n\
                   (NBD_OPT_STARTTLS) before anything else.",
            set: |o, v| {
                o.tls_creds = Some(v.path("tls-creds")?);
                Ok(())
            },
            get: |o| o.tls_creds.as_ref().map(|p| Value::Str(p.display().to_string())),
        },
        Key {
            name: "tls",
            aliases: &[],
            kind: Kind::Bool,
            usage: "tls=off",
            help: "serve TCP without TLS: whoever reaches the port reads the exposed\n\
                   exports (and writes the writable ones).",
            set: |o, v| {
                o.tls = Some(v.bool("tls")?);
                Ok(())
            },
            get: |o| on_off(o.tls),
        },
        Key {
            name: "verify-peer",
            aliases: &[],
            kind: Kind::Bool,
            usage: "verify-peer=on|off",
            help: "with tls-creds: clients must show a certificate signed by ca-cert.pem\n\
                   (default on, as QEMU's tls-creds-x509).",
            set: |o, v| {
                o.verify_peer = Some(v.bool("verify-peer")?);
                Ok(())
            },
            get: |o| on_off(o.verify_peer),
        },
        // The export socket's access keys, its rows (2, 3, 4: see the test) on our socket.
        SocketOptions::KEYS[2]
            .lifted(|o, v| set_access(o, "socket-mode", v), |o| get_access(o, "socket-mode"))
            .with_help("who may connect to the Unix socket, as for an export's socket."),
        SocketOptions::KEYS[3]
            .lifted(|o, v| set_access(o, "socket-group", v), |o| get_access(o, "socket-group")),
        SocketOptions::KEYS[4]
            .lifted(|o, v| set_access(o, "socket-owner", v), |o| get_access(o, "socket-owner")),
        Key {
            name: "max-connections",
            aliases: &[],
            kind: Kind::Number,
            usage: "max-connections=N",
            help: "clients served at once (default 16, at most 256); one more is closed.\n\
                   Each may buffer one request of up to 32 MiB.",
            set: |o, v| match v.number::<usize>("max-connections") {
                Ok(n) if (1..=MAX_CONNECTIONS).contains(&n) => {
                    o.max_connections = Some(n);
                    Ok(())
                }
                _ => err(format!("max-connections={v}: 1 to {MAX_CONNECTIONS}")),
            },
            get: |o| o.max_connections.map(|n| Value::Int(n as u64)),
        },
    ];
}

/// `serve --nbd-server`'s long help, from the rows.
pub fn help() -> String {
    format!(
        "The NBD server: comma-separated key=value pairs (as the [nbd-server] table of the \
         config file). It exposes no export until `blkplane ctl nbd-export id=ID` says so.\n\n{}",
        crate::spec::help_text(NbdServerOptions::infos())
    )
}

impl NbdServerOptions {
    fn key_list() -> String {
        Self::KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
    }

    /// Reads `--nbd-server`'s `key=value,...`.
    pub fn parse(spec: &str) -> Result<NbdServerOptions, SpecError> {
        Self::from_pairs(split_pairs(spec, &Self::key_list())?)
    }

    /// Reads typed pairs (the command line's text, the file's TOML values), then checks them
    /// together.
    pub fn from_pairs(pairs: Vec<(String, Value)>) -> Result<NbdServerOptions, SpecError> {
        let mut o = NbdServerOptions::default();
        let mut seen = Vec::new();
        for (key, value) in &pairs {
            match o.set_key(key, value) {
                Some((name, _)) if seen.contains(&name) => {
                    return err(format!("key '{name}' given twice"))
                }
                Some((name, result)) => {
                    result?;
                    seen.push(name);
                }
                None => return err(format!("unknown key '{key}' (keys: {})", Self::key_list())),
            }
        }
        o.check()?;
        Ok(o)
    }

    /// The keys together: one place to listen, TLS on TCP unless refused on purpose.
    pub fn check(&self) -> Result<(), SpecError> {
        match (&self.unix, &self.addr) {
            (None, None) => return err("the NBD server needs unix=PATH or addr=HOST:PORT"),
            (Some(_), Some(_)) => return err("unix= and addr= exclude each other"),
            _ => {}
        }
        match (self.tls, &self.tls_creds) {
            (Some(false), Some(_)) => return err("tls=off and tls-creds= exclude each other"),
            (Some(true), None) => return err("tls=on needs tls-creds=DIR"),
            (None, None) if self.addr.is_some() => {
                return err("addr= (TCP) needs tls-creds=DIR, or tls=off to serve without TLS \
                            (whoever reaches the port then reads the exposed exports)")
            }
            _ => {}
        }
        if self.verify_peer.is_some() && self.tls_creds.is_none() {
            return err("verify-peer= needs tls-creds=DIR");
        }
        if self.addr.is_some() && self.access != SocketAccess::default() {
            return err("socket-mode, socket-group and socket-owner are for unix= only");
        }
        Ok(())
    }

    /// Reads the credentials (for `--check-config` and at start).
    fn tls_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
        self.tls_creds
            .as_deref()
            .map(|dir| tls::load(dir, self.verify_peer.unwrap_or(true)))
            .transpose()
    }

    /// Everything that can be checked without binding: the credentials.
    pub fn check_files(&self) -> Result<(), String> {
        self.tls_config().map(|_| ())
    }
}

/// An export the server exposes.
pub struct Exposed {
    /// The NBD name clients ask for.
    pub name: String,
    /// The export's id.
    pub id: String,
    pub disk: Arc<Disk>,
    /// Writes are taken (when no guest runs on the disk).
    pub writable: bool,
}

/// What `nbd-export` answers.
#[derive(Debug, Clone, Serialize)]
pub struct ExposedInfo {
    pub id: String,
    pub name: String,
    pub writable: bool,
    pub size_bytes: u64,
}

enum Listener {
    Unix(StoppableListener<UnixListener>),
    Tcp(StoppableListener<TcpListener>),
}

/// A client being served: its export once it chose one, and its socket to end it with.
struct Client {
    serial: u64,
    export: Option<String>,
    socket: Socket,
}

/// The running NBD server.
pub struct NbdServer {
    options: NbdServerOptions,
    listener: Listener,
    /// Where it listens, for log lines and `dump-config`.
    pub address: String,
    tls: Option<Arc<rustls::ServerConfig>>,
    exports: Mutex<Vec<Arc<Exposed>>>,
    clients: Mutex<Vec<Client>>,
    permits: ConnectionLimit,
    next_serial: AtomicU64,
    /// Every line a client can cause goes through this.
    log: Mutex<RateLimiter>,
}

fn stoppable<L: Listening>(l: L) -> Result<StoppableListener<L>, String> {
    StoppableListener::new(l).map_err(|e| format!("eventfd: {e}"))
}

impl NbdServer {
    /// Reads the credentials and binds the socket; not yet accepting (see `run`).
    pub fn bind(options: &NbdServerOptions) -> Result<NbdServer, String> {
        let tls = options.tls_config()?;
        let (listener, address) = match (&options.unix, &options.addr) {
            (Some(path), _) => {
                let l = bind_socket(path)?;
                if let Err(e) = apply_socket_access(path, &options.access) {
                    let _ = std::fs::remove_file(path);
                    return Err(e);
                }
                (Listener::Unix(stoppable(l)?), path.display().to_string())
            }
            (None, Some(addr)) => {
                let l = TcpListener::bind(addr)
                    .map_err(|e| format!("NBD server: cannot listen on {addr}: {e}"))?;
                let local = l.local_addr().map_or(addr.clone(), |a| a.to_string());
                (Listener::Tcp(stoppable(l)?), local)
            }
            (None, None) => return Err("the NBD server needs unix=PATH or addr=HOST:PORT".into()),
        };
        Ok(NbdServer {
            options: options.clone(),
            listener,
            address,
            tls,
            exports: Mutex::default(),
            clients: Mutex::default(),
            permits: ConnectionLimit::new(
                options.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            ),
            next_serial: AtomicU64::new(0),
            log: Mutex::new(RateLimiter::default()),
        })
    }

    pub fn options(&self) -> &NbdServerOptions {
        &self.options
    }

    fn log(&self) -> std::sync::MutexGuard<'_, RateLimiter> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts clients until `shutdown`, one thread each, at most `max-connections`.
    pub fn run(self: &Arc<NbdServer>) {
        info!(address = %self.address, tls = self.tls.is_some(), "NBD server listening");
        loop {
            let accepted = match &self.listener {
                Listener::Unix(l) => l.accept().map(|r| r.map(Socket::Unix)),
                Listener::Tcp(l) => l.accept().map(|r| r.map(Socket::Tcp)),
            };
            let socket = match accepted {
                None => return,
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    warn_limited!(self.log(), "NBD server: accept: {e}");
                    continue;
                }
            };
            let Some(permit) = self.permits.try_take() else {
                warn_limited!(self.log(), "NBD server: all connections in use; closed a client");
                continue;
            };
            let server = Arc::clone(self);
            let spawned =
                std::thread::Builder::new().name("blkplane-nbd".into()).spawn(move || {
                    let _permit = permit;
                    server.serve(socket);
                });
            if let Err(e) = spawned {
                warn_limited!(self.log(), "NBD server: cannot start a client thread: {e}");
            }
        }
    }

    /// One client, from the handshake to its last reply.
    fn serve(&self, socket: Socket) {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let Ok(control) = socket.try_clone() else { return };
        let Ok(handle) = socket.try_clone() else { return };
        if !self.add_client(Client { serial, export: None, socket: handle }) {
            return;
        }
        match negotiate::negotiate(self, socket, &control, serial) {
            Ok(Some(mut session)) => {
                if let Err(e) = transmit::serve(&mut session, &control, &self.log) {
                    if !quiet(&e) {
                        warn_limited!(self.log(), parent: &session.exposed.disk.span, "NBD client: {e}");
                    }
                }
            }
            Ok(None) => {}
            Err(e) if quiet(&e) => {}
            Err(e) => warn_limited!(self.log(), "NBD client during negotiation: {e}"),
        }
        self.clients().retain(|c| c.serial != serial);
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_client(&self, client: Client) -> bool {
        if self.is_stopped() {
            return false;
        }
        self.clients().push(client);
        true
    }

    fn is_stopped(&self) -> bool {
        match &self.listener {
            Listener::Unix(l) => l.is_stopped(),
            Listener::Tcp(l) => l.is_stopped(),
        }
    }

    /// The client `serial` chose `export`, which must still be exposed: an unexport that
    /// came between its lookup and now ends it.
    fn attach_client(&self, serial: u64, exposed: &Arc<Exposed>) -> bool {
        let exports = self.exports();
        if !exports.iter().any(|e| Arc::ptr_eq(e, exposed)) {
            return false;
        }
        let mut clients = self.clients();
        match clients.iter_mut().find(|c| c.serial == serial) {
            Some(c) => {
                c.export = Some(exposed.id.clone());
                true
            }
            None => false,
        }
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Exposed>>> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The export a client names: by name, or the only one for the empty (default) name.
    fn find(&self, name: &str) -> Option<Arc<Exposed>> {
        let exports = self.exports();
        match exports.iter().find(|e| e.name == name) {
            Some(e) => Some(Arc::clone(e)),
            None if name.is_empty() && exports.len() == 1 => Some(Arc::clone(&exports[0])),
            None => None,
        }
    }

    fn names(&self) -> Vec<String> {
        self.exports().iter().map(|e| e.name.clone()).collect()
    }

    /// Exposes export `id` (its `disk`) as `name`. Writable only where it can be written
    /// and no guest runs on it.
    pub fn expose(
        &self,
        id: &str,
        name: &str,
        disk: &Arc<Disk>,
        writable: bool,
    ) -> Result<ExposedInfo, String> {
        if name.len() > 4096 {
            return Err("an NBD name is at most 4096 bytes".into());
        }
        match &disk.backend {
            Backend::File { .. } | Backend::Null => {}
            Backend::Nbd(_) | Backend::Rbd(_) => {
                return Err(format!(
                    "export {id} is backed by NBD or RBD: the NBD server exposes image files, \
                     block devices and null exports only"
                ))
            }
        }
        if writable && disk.readonly {
            return Err(format!("export {id} is read-only: writable=on refused"));
        }
        if writable && disk.guest_running() {
            return Err(format!(
                "export {id}'s guest is running (a frontend started its rings): writable=on \
                 refused, as writes over NBD would race with the guest's (a migration's \
                 destination is added with incoming=on and exposed before its guest arrives)"
            ));
        }
        let mut exports = self.exports();
        if let Some(e) = exports.iter().find(|e| e.id == id) {
            return Err(format!("export {id} is exposed already (as '{}')", e.name));
        }
        if exports.iter().any(|e| e.name == name) {
            return Err(format!("the NBD name '{name}' is taken"));
        }
        let exposed =
            Exposed { name: name.into(), id: id.into(), disk: Arc::clone(disk), writable };
        exports.push(Arc::new(exposed));
        info!(parent: &disk.span, name, writable, "exposed over NBD");
        Ok(ExposedInfo {
            id: id.into(),
            name: name.into(),
            writable,
            size_bytes: disk.capacity_bytes(),
        })
    }

    /// Stops exposing export `id` and ends its clients' connections. Whether it was exposed.
    pub fn unexpose(&self, id: &str) -> bool {
        let removed = {
            let mut exports = self.exports();
            let before = exports.len();
            exports.retain(|e| e.id != id);
            before != exports.len()
        };
        for c in self.clients().iter().filter(|c| c.export.as_deref() == Some(id)) {
            c.socket.shutdown();
        }
        removed
    }

    /// Export `id` now serves `disk` (a pivot): its exposure follows it, under the same name,
    /// and the clients connected to it are disconnected (they were reading the old disk,
    /// which they would hold open; they may connect again). A disk the server cannot expose
    /// (NBD, RBD) ends the exposure. Returns None if `id` was not exposed, else whether the
    /// exposure follows.
    pub fn follow(&self, id: &str, disk: &Arc<Disk>) -> Option<bool> {
        let follows = matches!(disk.backend, Backend::File { .. } | Backend::Null);
        {
            let mut exports = self.exports();
            let at = exports.iter().position(|e| e.id == id)?;
            let old = exports.remove(at);
            if follows {
                let writable = old.writable && !disk.readonly;
                let exposed = Exposed {
                    name: old.name.clone(),
                    id: id.into(),
                    disk: Arc::clone(disk),
                    writable,
                };
                exports.insert(at, Arc::new(exposed));
            }
        }
        for c in self.clients().iter().filter(|c| c.export.as_deref() == Some(id)) {
            c.socket.shutdown();
        }
        Some(follows)
    }

    /// Whether NBD clients are connected to export `id`.
    pub fn has_clients(&self, id: &str) -> bool {
        self.clients().iter().any(|c| c.export.as_deref() == Some(id))
    }

    /// Every exposed export.
    pub fn list(&self) -> Vec<ExposedInfo> {
        self.exports()
            .iter()
            .map(|e| ExposedInfo {
                id: e.id.clone(),
                name: e.name.clone(),
                writable: e.writable,
                size_bytes: e.disk.capacity_bytes(),
            })
            .collect()
    }

    /// Stops accepting and ends every client's connection.
    pub fn shutdown(&self) {
        match &self.listener {
            Listener::Unix(l) => l.stop(),
            Listener::Tcp(l) => l.stop(),
        }
        for c in self.clients().iter() {
            c.socket.shutdown();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(path) = &self.options.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Errors that are a client going away, not worth a line.
fn quiet(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | BrokenPipe | ConnectionReset | NotConnected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_access_rows_are_the_export_sockets() {
        let names: Vec<&str> = NbdServerOptions::KEYS[5..8].iter().map(|k| k.name).collect();
        assert_eq!(names, ["socket-mode", "socket-group", "socket-owner"]);
        let o =
            NbdServerOptions::parse("unix=/run/n.sock,socket-mode=0660,socket-group=kvm").unwrap();
        assert_eq!(o.access.mode, Some(0o660));
        assert_eq!(o.access.group.as_deref(), Some("kvm"));
        let pairs = o.pairs();
        assert!(pairs.contains(&("socket-mode", Value::Str("0660".into()))), "{pairs:?}");
    }

    #[test]
    fn tcp_needs_tls_or_says_it_does_without() {
        let e = NbdServerOptions::parse("addr=127.0.0.1:10809").unwrap_err().0;
        assert!(e.contains("needs tls-creds=DIR, or tls=off"), "{e}");
        assert!(NbdServerOptions::parse("addr=127.0.0.1:10809,tls=off").is_ok());
        assert!(NbdServerOptions::parse("addr=10809,tls=off").is_err());
        assert!(NbdServerOptions::parse("unix=/n,verify-peer=off").is_err());
        assert!(NbdServerOptions::parse("unix=/n,max-connections=0").is_err());
        assert!(NbdServerOptions::parse("unix=/n,unix=/m").is_err());
    }
}
