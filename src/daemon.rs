//! `blkplane serve`: the set of running exports, changed at start-up and through the control
//! socket, and a clean shutdown on SIGTERM or SIGINT.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use tracing::info;

use crate::export::{BackendSpec, Disk, ExportConfig};
use crate::iothread::poll::{PollMode, PollPolicy, MAX_POLL_MAX_US};
use crate::trace::QueueReport;
use crate::vhost_user::{bind_socket, ExportServer};

/// An error answered on the control socket: a stable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlError {
    pub code: &'static str,
    pub message: String,
}

impl ControlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> ControlError {
        ControlError { code, message: message.into() }
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

struct Export {
    id: String,
    config: ExportConfig,
    server: Arc<ExportServer>,
    thread: Option<JoinHandle<()>>,
}

/// What `list-exports` says of one export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportInfo {
    pub id: String,
    pub socket: String,
    pub backend: String,
    pub size_bytes: u64,
    pub queues: u16,
    pub queue_size: u16,
    pub cache: String,
    pub readonly: bool,
    pub serial: String,
    pub poll: String,
    pub poll_max_us: u32,
    pub stats: bool,
    pub client_connected: bool,
}

/// What `query-stats` says of one export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportStats {
    pub id: String,
    pub size_bytes: u64,
    pub client_connected: bool,
    pub queues: Vec<QueueReport>,
}

fn info_of(e: &Export) -> ExportInfo {
    let disk = e.server.disk();
    let poll = disk.poll.get();
    ExportInfo {
        id: e.id.clone(),
        socket: e.config.socket.display().to_string(),
        backend: match &e.config.backend {
            BackendSpec::Image(p) => p.display().to_string(),
            BackendSpec::Null { .. } => "null".into(),
        },
        size_bytes: disk.capacity_bytes(),
        queues: e.config.queues,
        queue_size: e.config.queue_size,
        cache: e.config.cache.to_string(),
        readonly: e.config.readonly,
        serial: e.config.serial.clone(),
        poll: poll.mode.to_string(),
        poll_max_us: poll.max_us,
        stats: disk.stats_on,
        client_connected: e.server.has_client(),
    }
}

/// The running exports.
#[derive(Default)]
pub struct Daemon {
    exports: Mutex<Vec<Export>>,
    next_id: AtomicUsize,
}

impl Daemon {
    fn exports(&self) -> std::sync::MutexGuard<'_, Vec<Export>> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens, binds and starts every export of `configs`: all of them, or (on the first
    /// error) none, with nothing left behind.
    pub fn add_exports(&self, configs: Vec<ExportConfig>) -> Result<Vec<ExportInfo>, ControlError> {
        let mut exports = self.exports();
        let mut ids: Vec<String> = exports.iter().map(|e| e.id.clone()).collect();
        let mut sockets: Vec<_> = exports.iter().map(|e| e.config.socket.clone()).collect();
        let mut named = Vec::with_capacity(configs.len());
        for c in configs {
            let id = match &c.id {
                Some(id) => id.clone(),
                None => loop {
                    let candidate =
                        format!("export{}", self.next_id.fetch_add(1, Ordering::Relaxed));
                    if !ids.contains(&candidate) {
                        break candidate;
                    }
                },
            };
            if ids.contains(&id) {
                return Err(ControlError::new(
                    "exists",
                    format!("an export with id '{id}' exists already"),
                ));
            }
            if sockets.contains(&c.socket) {
                return Err(ControlError::new(
                    "exists",
                    format!("socket {} is given to two exports", c.socket.display()),
                ));
            }
            ids.push(id.clone());
            sockets.push(c.socket.clone());
            named.push((id, c));
        }
        let mut disks = Vec::with_capacity(named.len());
        for (_, c) in &named {
            disks.push(Disk::open(c).map_err(|e| ControlError::new("open-failed", e.to_string()))?);
        }
        let mut servers = Vec::with_capacity(named.len());
        for ((_, c), disk) in named.iter().zip(disks) {
            // A server removes its socket when dropped, so an early return cleans up.
            let listener =
                bind_socket(&c.socket).map_err(|e| ControlError::new("bind-failed", e))?;
            let server = ExportServer::new(Arc::new(disk), c.socket.clone(), listener)
                .map_err(|e| ControlError::new("failed", e.to_string()))?;
            servers.push(Arc::new(server));
        }
        let mut infos = Vec::with_capacity(servers.len());
        for ((id, config), server) in named.into_iter().zip(servers) {
            let s = Arc::clone(&server);
            let thread = std::thread::Builder::new()
                .name(format!("blkplane-ctl-{id}"))
                .spawn(move || s.run())
                .map_err(|e| {
                    ControlError::new("failed", format!("starting the export thread: {e}"))
                })?;
            info!(export = %id, socket = %config.socket.display(), "export added");
            let export = Export { id, config, server, thread: Some(thread) };
            infos.push(info_of(&export));
            exports.push(export);
        }
        Ok(infos)
    }

    pub fn list(&self) -> Vec<ExportInfo> {
        self.exports().iter().map(info_of).collect()
    }

    fn with_export<T>(&self, id: &str, f: impl FnOnce(&Export) -> T) -> Result<T, ControlError> {
        let exports = self.exports();
        let e = exports
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| ControlError::new("not-found", format!("no export with id '{id}'")))?;
        Ok(f(e))
    }

    /// Removes an export. With a client connected it refuses, unless `force`: then the client
    /// is disconnected after its in-flight I/O completes.
    pub fn remove(&self, id: &str, force: bool) -> Result<(), ControlError> {
        let mut export = {
            let mut exports = self.exports();
            let pos = exports.iter().position(|e| e.id == id).ok_or_else(|| {
                ControlError::new("not-found", format!("no export with id '{id}'"))
            })?;
            if exports[pos].server.has_client() && !force {
                return Err(ControlError::new(
                    "busy",
                    format!("export '{id}' has a client connected; remove it with force=true to disconnect it"),
                ));
            }
            exports.remove(pos)
        };
        export.server.shutdown();
        if let Some(t) = export.thread.take() {
            let _ = t.join();
        }
        info!(export = %id, "export removed");
        Ok(())
    }

    /// Changes an export's size and tells a connected VMM (config-change message).
    pub fn resize(&self, id: &str, size_bytes: u64) -> Result<ExportInfo, ControlError> {
        let server = self.with_export(id, |e| Arc::clone(&e.server))?;
        server.disk().resize(size_bytes).map_err(|e| ControlError::new("invalid-size", e))?;
        // Outside the exports lock: the VMM answers by reading the config space, which the
        // export's own thread serves.
        if let Err(e) = server.notify_config_change() {
            return Err(ControlError::new(
                "notify-failed",
                format!("resized, but the client was not told: {e}"),
            ));
        }
        info!(export = %id, size_bytes, "export resized");
        self.with_export(id, info_of)
    }

    pub fn stats(&self, id: Option<&str>) -> Result<Vec<ExportStats>, ControlError> {
        let exports = self.exports();
        if let Some(id) = id {
            if !exports.iter().any(|e| e.id == id) {
                return Err(ControlError::new("not-found", format!("no export with id '{id}'")));
            }
        }
        Ok(exports
            .iter()
            .filter(|e| id.is_none_or(|id| e.id == id))
            .map(|e| {
                let disk = e.server.disk();
                ExportStats {
                    id: e.id.clone(),
                    size_bytes: disk.capacity_bytes(),
                    client_connected: e.server.has_client(),
                    queues: disk.stats.iter().enumerate().map(|(i, q)| q.report(i)).collect(),
                }
            })
            .collect())
    }

    /// Changes the polling of one export (or all): running I/O threads pick it up at their
    /// next idle moment.
    pub fn set_polling(
        &self,
        id: Option<&str>,
        mode: Option<PollMode>,
        max_us: Option<u32>,
    ) -> Result<Vec<ExportInfo>, ControlError> {
        if let Some(m) = max_us {
            if m > MAX_POLL_MAX_US {
                return Err(ControlError::new(
                    "invalid-argument",
                    format!("max-us {m}: at most {MAX_POLL_MAX_US}"),
                ));
            }
        }
        let exports = self.exports();
        if let Some(id) = id {
            if !exports.iter().any(|e| e.id == id) {
                return Err(ControlError::new("not-found", format!("no export with id '{id}'")));
            }
        }
        let mut changed = Vec::new();
        for e in exports.iter().filter(|e| id.is_none_or(|id| e.id == id)) {
            let settings = &e.server.disk().poll;
            let old = settings.get();
            settings.set(PollPolicy {
                mode: mode.unwrap_or(old.mode),
                max_us: max_us.unwrap_or(old.max_us),
            });
            changed.push(info_of(e));
        }
        Ok(changed)
    }

    /// Stops every export: no new connections, clients hung up after in-flight I/O.
    pub fn shutdown(&self) {
        let exports: Vec<Export> = std::mem::take(&mut *self.exports());
        for e in &exports {
            e.server.shutdown();
        }
        for mut e in exports {
            if let Some(t) = e.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Signals that end the daemon.
fn shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in this thread and every thread started after, so that only
/// `wait_for_shutdown_signal` receives them. Call before starting any thread.
pub fn block_shutdown_signals() -> io::Result<()> {
    let signals = shutdown_signals();
    // SAFETY: a valid signal set; no old mask is requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT; returns the signal number.
pub fn wait_for_shutdown_signal() -> io::Result<i32> {
    let signals = shutdown_signals();
    let mut signal: libc::c_int = 0;
    // SAFETY: a valid set and a valid out-pointer.
    let rc = unsafe { libc::sigwait(&signals, &mut signal) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(signal)
}
