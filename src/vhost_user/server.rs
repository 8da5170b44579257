//! [vhost-user] The control thread of one export: listen on its socket, serve one frontend at
//! a time, and when it goes away (VM shut down or crashed) stop its queues and wait for the
//! next one. The image stays open across connections.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing::info;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use vmm_sys_util::eventfd::EventFd;

use super::device::BlkDevice;
use crate::export::Disk;
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
    listener: UnixListener,
    shutdown: AtomicBool,
    shutdown_event: EventFd,
    connection: Mutex<Option<UnixStream>>,
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
            listener,
            shutdown: AtomicBool::new(false),
            shutdown_event: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
            connection: Mutex::new(None),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
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
            let mut fds = [
                libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd {
                    fd: self.shutdown_event.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: a valid pollfd array for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if self.shutdown.load(Ordering::Acquire) {
                return None;
            }
            if fds[0].revents == 0 {
                continue;
            }
            match self.listener.accept() {
                Ok((stream, _)) => return Some(stream),
                Err(e) => {
                    warn_limited!(log, export = %self.disk.name, "accept: {e}");
                }
            }
        }
    }

    fn serve(&self, stream: UnixStream, log: &mut RateLimiter) {
        let Ok(handle) = stream.try_clone() else { return };
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        if self.shutdown.load(Ordering::Acquire) {
            return;
        }
        info!(export = %self.disk.name, "frontend connected");
        let device = Arc::new(Mutex::new(BlkDevice::new(Arc::clone(&self.disk))));
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&device));
        loop {
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
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        info!(export = %self.disk.name, "frontend disconnected");
    }

    /// Asks `run` to return: wakes the accept loop and hangs up on the frontend.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        let _ = self.shutdown_event.write(1);
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
