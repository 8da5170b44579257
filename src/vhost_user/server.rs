//! [vhost-user] The control thread of one export: listen on its socket, serve one frontend at
//! a time, and when it goes away (VM shut down or crashed) stop its queues and wait for the
//! next one. The image stays open across connections.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::info;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use super::backend_channel::{self, BackendChannel};
use super::device::BlkDevice;
use crate::disk::Disk;
use crate::export::SocketAccess;
use crate::listener::StoppableListener;
use crate::ratelimit::RateLimiter;
use crate::{info_limited, warn_limited};

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
    let owner = access.owner.as_deref().map(|o| lookup_id("/etc/passwd", o)).transpose()?;
    let group = access.group.as_deref().map(|g| lookup_id("/etc/group", g)).transpose()?;
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(path, owner, group).map_err(|e| fail("owner or group", &e))?;
    }
    if let Some(mode) = access.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail("mode", &e))?;
    }
    Ok(())
}

/// A user or group id: a number, or a name looked up in `/etc/passwd` or `/etc/group`.
fn lookup_id(db: &str, name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let text = std::fs::read_to_string(db).map_err(|e| format!("reading {db}: {e}"))?;
    text.lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[0] == name)
        .and_then(|f| f[2].parse().ok())
        .ok_or_else(|| format!("no '{name}' in {db}"))
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
    disk: Arc<Disk>,
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
        socket_path: PathBuf,
        listener: UnixListener,
        owns_path: bool,
    ) -> io::Result<ExportServer> {
        Ok(ExportServer {
            disk,
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

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Whether a frontend is connected.
    pub fn has_client(&self) -> bool {
        self.connection.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Hangs up on the connected frontend (its queues stop after in-flight I/O); the export
    /// goes on accepting.
    pub fn disconnect_client(&self) {
        if let Some(conn) = self.connection.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
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
        info!(parent: &self.disk.span, "listening");
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
                Err(e) => warn_limited!(self.log(), parent: &self.disk.span, "accept: {e}"),
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
        info_limited!(self.connections_log(), parent: &self.disk.span, "frontend connected");
        let Ok(hangup) = stream.try_clone() else { return };
        let hangup = Arc::new(std::os::fd::OwnedFd::from(hangup));
        let device = Arc::new(Mutex::new(BlkDevice::new(
            Arc::clone(&self.disk),
            hangup,
            Arc::clone(&self.log),
        )));
        let Ok(peek) = stream.try_clone() else { return };
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&device));
        loop {
            // SET_BACKEND_REQ_FD is ours (see backend_channel.rs); the rest goes to the crate.
            match backend_channel::peek_header(&peek) {
                Ok(None) => break,
                Err(e) => {
                    warn_limited!(self.log(), parent: &self.disk.span, "closing the connection: {e}");
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
                            warn_limited!(self.log(), parent: &self.disk.span, "closing the connection: bad SET_BACKEND_REQ_FD: {e}");
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
                        warn_limited!(self.log(), parent: &self.disk.span, "closing the connection: {e}");
                    }
                    break;
                }
                Err(e) => {
                    warn_limited!(self.log(), parent: &self.disk.span, "refused a request: {e}");
                }
            }
        }
        // Queues stop after their in-flight requests complete.
        let mut device = device.lock().unwrap_or_else(|p| p.into_inner());
        if device.memory_faulted() {
            warn_limited!(self.log(), parent: &self.disk.span, "closing the connection: the frontend's guest memory file shrank under a mapped region (truncated); its pages now read as zeroes and nothing more is served to it");
        }
        device.stop_all();
        drop(device);
        *self.backend_channel.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        info_limited!(self.connections_log(), parent: &self.disk.span, "frontend disconnected");
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
