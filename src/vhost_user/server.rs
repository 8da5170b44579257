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
use crate::export::Disk;
use crate::listener::StoppableListener;
use crate::ratelimit::RateLimiter;
use crate::warn_limited;

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
    UnixListener::bind(path).map_err(|e| format!("cannot bind socket {}: {e}", path.display()))
}

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
    listener: StoppableListener,
    connection: Mutex<Option<UnixStream>>,
    /// The connected frontend's backend channel, if it set one up.
    backend_channel: Mutex<Option<BackendChannel>>,
}

impl ExportServer {
    pub fn new(
        disk: Arc<Disk>,
        socket_path: PathBuf,
        listener: UnixListener,
    ) -> io::Result<ExportServer> {
        Ok(ExportServer {
            disk,
            socket_path,
            listener: StoppableListener::new(listener)?,
            connection: Mutex::new(None),
            backend_channel: Mutex::new(None),
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
        let mut log = RateLimiter::default();
        info!(export = %self.disk.name, "listening");
        while let Some(stream) = self.accept(&mut log) {
            self.serve(stream, &mut log);
        }
    }

    /// Waits for a frontend, or returns None on shutdown.
    fn accept(&self, log: &mut RateLimiter) -> Option<UnixStream> {
        loop {
            match self.listener.accept()? {
                Ok(stream) => return Some(stream),
                Err(e) => warn_limited!(log, export = %self.disk.name, "accept: {e}"),
            }
        }
    }

    fn serve(&self, stream: UnixStream, log: &mut RateLimiter) {
        let Ok(handle) = stream.try_clone() else { return };
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        if self.listener.is_stopped() {
            return;
        }
        info!(export = %self.disk.name, "frontend connected");
        let device = Arc::new(Mutex::new(BlkDevice::new(Arc::clone(&self.disk))));
        let Ok(peek) = stream.try_clone() else { return };
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&device));
        loop {
            // SET_BACKEND_REQ_FD is ours (see backend_channel.rs); the rest goes to the crate.
            match backend_channel::peek_header(&peek) {
                Ok(None) | Err(_) => break,
                Ok(Some(h)) if h.request == backend_channel::SET_BACKEND_REQ_FD => {
                    let reply_ack = device.lock().unwrap_or_else(|p| p.into_inner()).reply_ack();
                    match backend_channel::take_channel(&peek, h, reply_ack) {
                        Ok(channel) => {
                            *self.backend_channel.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(channel);
                        }
                        Err(e) => {
                            warn_limited!(log, export = %self.disk.name, "closing the connection: bad SET_BACKEND_REQ_FD: {e}");
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
                        warn_limited!(log, export = %self.disk.name, "closing the connection: {e}");
                    }
                    break;
                }
                Err(e) => {
                    warn_limited!(log, export = %self.disk.name, "refused a request: {e}");
                }
            }
        }
        // Queues stop after their in-flight requests complete.
        device.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
        *self.backend_channel.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        info!(export = %self.disk.name, "frontend disconnected");
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
        let _ = std::fs::remove_file(&self.socket_path);
    }
}
