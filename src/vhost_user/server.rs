//! [vhost-user] The control thread of one export: listen on its socket, serve one frontend at
//! a time, and when it goes away (VM shut down or crashed) stop its queues and wait for the
//! next one. The image stays open across connections.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use tracing::info;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use super::backend_channel::{self, BackendChannel};
use super::device::BlkDevice;
use crate::disk::Disk;
use crate::iothread::Placement;
use crate::listener::StoppableListener;
use crate::ratelimit::RateLimiter;
use crate::spec::{err, Key, Kind, Options, SpecError, Value};
use crate::sys::IdKind;
use crate::{info_limited, warn_limited};

/// Permissions of an export's socket. The socket is created owner-only; these widen it on
/// purpose (for a VMM that runs as another user, as libvirt's QEMU does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Mode bits (e.g. 0o660); `None`: 0600.
    pub mode: Option<u32>,
    /// Group name or number.
    pub group: Option<String>,
    /// Owner name or number (the daemon must run as root to give it away).
    pub owner: Option<String>,
}

/// Where an export listens and who may connect: the socket keys of `--export`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketOptions {
    /// The socket's path (absolute); empty for an inherited socket until it is looked up.
    pub path: PathBuf,
    /// A listening Unix socket inherited from the parent (`socket-fd=N`, or systemd's
    /// LISTEN_FDS matched by the export's id) to serve on instead of binding `path`; its
    /// path is left alone when the export goes.
    pub fd: Option<i32>,
    pub access: SocketAccess,
}

impl SocketOptions {
    /// Checks the keys together: one of `socket=` and `socket-fd=`, or neither when the
    /// export's socket is found by its id among the sockets systemd passed (`by_name`).
    pub fn check(&self, by_name: bool) -> Result<(), SpecError> {
        match (self.path.as_os_str().is_empty(), self.fd) {
            (false, Some(_)) => err("socket= and socket-fd= exclude each other"),
            (true, None) if !by_name => err("missing socket=PATH (or socket-fd=N)"),
            _ => Ok(()),
        }
    }
}

fn set_name(slot: &mut Option<String>, key: &str, v: &Value) -> Result<(), SpecError> {
    let name = v.text(key)?;
    if name.is_empty() {
        return err(format!("{key}= is empty"));
    }
    *slot = Some(name);
    Ok(())
}

impl Options for SocketOptions {
    const KEYS: &'static [Key<SocketOptions>] = &[
        Key {
            name: "socket",
            aliases: &["addr.path"],
            kind: Kind::Path,
            usage: "socket=PATH",
            help: "vhost-user socket to listen on (required, or socket-fd). A stale socket\n\
                   file is replaced; a socket another server listens on is refused. Under\n\
                   systemd socket activation an export whose id is the name of a passed\n\
                   socket (FileDescriptorName=) uses it without this key.",
            set: |o, v| {
                o.path = v.path("socket")?;
                Ok(())
            },
            get: |o| {
                (o.fd.is_none() || !o.path.as_os_str().is_empty())
                    .then(|| Value::Str(o.path.display().to_string()))
            },
        },
        Key {
            name: "socket-fd",
            aliases: &[],
            kind: Kind::Number,
            usage: "socket-fd=N",
            help: "serve on listening Unix socket N, inherited from the parent (an\n\
                   orchestrator, a test harness); its file is left alone when the export\n\
                   goes.",
            set: |o, v| match v.number::<i32>("socket-fd") {
                Ok(fd) if fd >= 0 => {
                    o.fd = Some(fd);
                    Ok(())
                }
                _ => err(format!("socket-fd={v}: a descriptor number")),
            },
            // An inherited socket is shown by its path when it has one: a later daemon
            // binds that path itself.
            get: |o| match o.fd {
                Some(fd) if o.path.as_os_str().is_empty() => Some(Value::Int(fd as u64)),
                _ => None,
            },
        },
        Key {
            name: "socket-mode",
            aliases: &[],
            kind: Kind::Text,
            usage: "socket-mode=MODE, socket-group=GROUP, socket-owner=USER",
            help: "who may connect: the socket is created 0600 (owner only); these widen\n\
                   it on purpose, e.g. for QEMU run by libvirt as its own user\n\
                   (socket-group=libvirt-qemu,socket-mode=0660). Names go through the\n\
                   system's name service (LDAP, sssd too). socket-owner needs root. A mode\n\
                   open to other users (0606, 0777) is warned about: they could take the\n\
                   disk over.",
            set: |o, v| {
                let text = v.text("socket-mode")?;
                match u32::from_str_radix(&text, 8).ok().filter(|m| *m <= 0o777) {
                    Some(m) if m & 0o600 == 0o600 => {
                        o.access.mode = Some(m);
                        Ok(())
                    }
                    Some(_) => err(format!(
                        "socket-mode={text}: the owner needs read and write (0600 at least)"
                    )),
                    None => err(format!("socket-mode={text}: an octal mode like 0660")),
                }
            },
            get: |o| o.access.mode.map(|m| Value::Str(format!("{m:04o}"))),
        },
        Key {
            name: "socket-group",
            aliases: &[],
            kind: Kind::Text,
            usage: "socket-group=GROUP",
            help: "",
            set: |o, v| set_name(&mut o.access.group, "socket-group", v),
            get: |o| o.access.group.clone().map(Value::Str),
        },
        Key {
            name: "socket-owner",
            aliases: &[],
            kind: Kind::Text,
            usage: "socket-owner=USER",
            help: "",
            set: |o, v| set_name(&mut o.access.owner, "socket-owner", v),
            get: |o| o.access.owner.clone().map(Value::Str),
        },
    ];
}

/// Binds a vhost-user socket at `path`. Refuses a path in use by a live server and anything
/// that is not a socket; a stale socket file (nobody listening) is replaced.
pub fn bind_socket(path: &Path) -> Result<UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(format!("socket {} is in use by another server", path.display()));
            }
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
        }
        Ok(_) => return Err(format!("{} exists and is not a socket", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot use socket path {}: {e}", path.display())),
    }
    // Created owner-only from the start: bind has no mode argument, so the umask decides,
    // and a socket that exists even briefly with the umask's 0755 could be connected to.
    crate::sys::with_umask(0o177, || UnixListener::bind(path))
        .map_err(|e| format!("cannot bind socket {}: {e}", path.display()))
}

/// Widens a socket's permissions as the operator asked (`socket-mode`, `socket-group`,
/// `socket-owner`), for a VMM that runs as another user.
pub fn apply_socket_access(path: &Path, access: &SocketAccess) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        format!("cannot set the {what} of socket {}: {e}", path.display())
    };
    let owner = access.owner.as_deref().map(|o| lookup_id("socket-owner", IdKind::User, o));
    let group = access.group.as_deref().map(|g| lookup_id("socket-group", IdKind::Group, g));
    let (owner, group) = (owner.transpose()?, group.transpose()?);
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(path, owner, group).map_err(|e| fail("owner or group", &e))?;
    }
    if let Some(mode) = access.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail("mode", &e))?;
    }
    Ok(())
}

/// A user or group id for `key`: a number, or a name looked up through the system's name
/// service (so users and groups from LDAP, sssd or systemd-userdb are found too).
fn lookup_id(key: &str, kind: IdKind, name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let what = match kind {
        IdKind::User => "user",
        IdKind::Group => "group",
    };
    match crate::sys::id_of(kind, name) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(format!("{key}={name}: no such {what}")),
        Err(e) => Err(format!("{key}={name}: cannot look the {what} up: {e}")),
    }
}

/// Whether `mode` lets users outside the socket's owner and group at it: whoever can
/// connect controls the disk.
pub fn open_to_others(mode: u32) -> bool {
    mode & 0o007 != 0
}

/// How long the rest of a message, or the frontend's reading of a reply, may take.
const MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the connection must end after this error. Errors of our handler were answered
/// (a REPLY_ACK failure) and the frontend may go on; a message the vhost crate refused got
/// no answer at all, so a frontend waiting for one would hang: hanging up tells it.
fn ends_connection(e: &VhostError) -> bool {
    !matches!(
        e,
        VhostError::InvalidParam
            | VhostError::InvalidOperation(_)
            | VhostError::ReqHandlerError(_)
            | VhostError::BackendInternalError
    )
}

/// One export's listener and its (at most one) connected frontend.
pub struct ExportServer {
    /// What the export serves; a mirror's pivot replaces it (`switch_disk`).
    disk: Mutex<Arc<Disk>>,
    /// The connected frontend's device, for a pivot to stop and restart its rings.
    device: Mutex<Weak<Mutex<BlkDevice>>>,
    /// Which I/O threads serve the queues.
    placement: Placement,
    socket_path: PathBuf,
    owns_path: bool,
    listener: StoppableListener,
    connection: Mutex<Option<UnixStream>>,
    /// The connected frontend's backend channel, if it set one up.
    backend_channel: Mutex<Option<BackendChannel>>,
    /// Every warning a frontend can cause goes through this; it lasts as long as the export,
    /// so a frontend that reconnects in a loop does not get a fresh budget.
    log: Arc<Mutex<RateLimiter>>,
    /// The same for the connect and disconnect lines.
    connections_log: Mutex<RateLimiter>,
}

impl ExportServer {
    /// `owns_path`: the socket file is ours to remove when the export goes (not for a
    /// socket inherited from the parent, whose path is the parent's).
    pub fn new(
        disk: Arc<Disk>,
        placement: Placement,
        socket_path: PathBuf,
        listener: UnixListener,
        owns_path: bool,
    ) -> io::Result<ExportServer> {
        Ok(ExportServer {
            disk: Mutex::new(disk),
            device: Mutex::new(Weak::new()),
            placement,
            socket_path,
            owns_path,
            listener: StoppableListener::new(listener)?,
            connection: Mutex::new(None),
            backend_channel: Mutex::new(None),
            log: Arc::default(),
            connections_log: Mutex::new(RateLimiter::new(20, std::time::Duration::from_secs(5))),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub fn disk(&self) -> Arc<Disk> {
        Arc::clone(&self.disk.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Switches the export to the disk `make` opens (given the current one), under a running
    /// guest: the frontend's rings stop (their requests in flight complete first; the device's
    /// lock keeps the frontend's messages out meanwhile), `make` runs, and the rings start again
    /// on the new disk where they stopped. The guest sees a pause. If `make` fails the rings
    /// start again on the old disk.
    pub fn switch_disk(
        &self,
        make: impl FnOnce(&Arc<Disk>) -> Result<Disk, String>,
    ) -> Result<(), String> {
        // Held throughout: a frontend that connects meanwhile gets the new disk.
        let mut disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let device = self.device.lock().unwrap_or_else(|p| p.into_inner()).upgrade();
        let mut device = device.as_ref().map(|d| d.lock().unwrap_or_else(|p| p.into_inner()));
        let running = device.as_mut().map(|d| d.stop_running()).unwrap_or_default();
        let new = match make(&disk) {
            Ok(new) => Arc::new(new),
            Err(e) => {
                if let Some(d) = device.as_mut() {
                    if let Err(again) = d.restart_on(Arc::clone(&disk), &running) {
                        return Err(format!("{e}; and restarting on the old disk: {again}"));
                    }
                }
                return Err(e);
            }
        };
        *disk = Arc::clone(&new);
        match device.as_mut() {
            Some(d) => d.restart_on(new, &running),
            None => Ok(()),
        }
    }

    /// Whether a frontend is connected.
    pub fn has_client(&self) -> bool {
        self.connection.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Tells the connected frontend that the config space changed (after a resize). Returns
    /// false if there is no frontend with a backend channel to tell.
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let mut channel = self.backend_channel.lock().unwrap_or_else(|p| p.into_inner());
        match channel.as_mut() {
            Some(c) => c.config_changed().map(|()| true),
            None => Ok(false),
        }
    }

    /// Serves frontends one after another until `shutdown`.
    pub fn run(&self) {
        info!(parent: &self.disk().span, "listening");
        while let Some(stream) = self.accept() {
            self.serve(stream);
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, RateLimiter> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connections_log(&self) -> std::sync::MutexGuard<'_, RateLimiter> {
        self.connections_log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a frontend, or returns None on shutdown.
    fn accept(&self) -> Option<UnixStream> {
        loop {
            match self.listener.accept()? {
                Ok(stream) => return Some(stream),
                Err(e) => warn_limited!(self.log(), parent: &self.disk().span, "accept: {e}"),
            }
        }
    }

    fn serve(&self, stream: UnixStream) {
        // Once a message header has been peeked, its payload follows at once, and a frontend
        // reads its replies: neither may block this thread (and the export) for long.
        if stream.set_read_timeout(Some(MESSAGE_TIMEOUT)).is_err()
            || stream.set_write_timeout(Some(MESSAGE_TIMEOUT)).is_err()
        {
            return;
        }
        let Ok(handle) = stream.try_clone() else { return };
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        if self.listener.is_stopped() {
            return;
        }
        info_limited!(self.connections_log(), parent: &self.disk().span, "frontend connected");
        let Ok(hangup) = stream.try_clone() else { return };
        let hangup = Arc::new(std::os::fd::OwnedFd::from(hangup));
        let device = {
            // Made and registered under the disk's lock: a pivot sees it or comes before it.
            let disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
            let device = Arc::new(Mutex::new(BlkDevice::new(
                Arc::clone(&disk),
                self.placement.clone(),
                hangup,
                Arc::clone(&self.log),
            )));
            *self.device.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(&device);
            device
        };
        let Ok(peek) = stream.try_clone() else { return };
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&device));
        loop {
            // SET_BACKEND_REQ_FD is ours (see backend_channel.rs); the rest goes to the crate.
            match backend_channel::peek_header(&peek) {
                Ok(None) => break,
                Err(e) => {
                    warn_limited!(self.log(), parent: &self.disk().span, "closing the connection: {e}");
                    break;
                }
                Ok(Some(h)) if h.request == backend_channel::SET_BACKEND_REQ_FD => {
                    let reply_ack = device.lock().unwrap_or_else(|p| p.into_inner()).reply_ack();
                    match backend_channel::take_channel(&peek, h, reply_ack) {
                        Ok(channel) => {
                            *self.backend_channel.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(channel);
                        }
                        Err(e) => {
                            warn_limited!(self.log(), parent: &self.disk().span, "closing the connection: bad SET_BACKEND_REQ_FD: {e}");
                            break;
                        }
                    }
                    continue;
                }
                Ok(Some(_)) => {}
            }
            match handler.handle_request() {
                Ok(()) => {}
                Err(e) if ends_connection(&e) => {
                    if !matches!(e, VhostError::Disconnected | VhostError::PartialMessage) {
                        warn_limited!(self.log(), parent: &self.disk().span, "closing the connection: {e}");
                    }
                    break;
                }
                Err(e) => {
                    warn_limited!(self.log(), parent: &self.disk().span, "refused a request: {e}");
                }
            }
        }
        // Queues stop after their in-flight requests complete.
        let mut device = device.lock().unwrap_or_else(|p| p.into_inner());
        if device.memory_faulted() {
            warn_limited!(self.log(), parent: &self.disk().span, "closing the connection: the frontend's guest memory file shrank under a mapped region (truncated); its pages now read as zeroes and nothing more is served to it");
        }
        device.stop_all();
        drop(device);
        *self.backend_channel.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        info_limited!(self.connections_log(), parent: &self.disk().span, "frontend disconnected");
    }

    /// Asks `run` to return: wakes the accept loop and hangs up on the frontend.
    pub fn shutdown(&self) {
        self.listener.stop();
        if let Some(conn) = self.connection.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for ExportServer {
    fn drop(&mut self) {
        if self.owns_path {
            let _ = std::fs::remove_file(&self.socket_path);
        }
    }
}
