//! `blkplane serve`: the set of running exports, changed at start-up and through the control
//! socket, and a clean shutdown on SIGTERM or SIGINT.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use tracing::{info, warn};

use crate::config_file::DaemonSettings;
use crate::disk::{BackendSpec, Disk};
use crate::export::ExportConfig;
use crate::iothread::poll::{PollMode, PollPolicy};
use crate::iothread::registry::{
    dedicated_info, IoThreadConfig, IoThreadInfo, IoThreads, ThreadChoice,
};
use crate::iothread::Placement;
use crate::jobs::{JobError, Jobs};
use crate::mirror::JobInfo;
use crate::nbd_server::{ExposedInfo, NbdServer};
use crate::qos::{Throttle, ThrottleConfig};
use crate::trace::QueueReport;
use crate::vhost_user::{apply_socket_access, bind_socket, open_to_others, ExportServer};
use serde_json::Value;

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

impl From<JobError> for ControlError {
    fn from(e: JobError) -> ControlError {
        ControlError::new(e.code, e.message)
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
    /// Which I/O threads serve it (for a dedicated export, their polling).
    placement: Placement,
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
    /// `pool`, `dedicated` or the named threads (`a:b`).
    pub iothread: String,
    /// Polling of the export's dedicated threads (shared threads have their own).
    pub poll: String,
    pub poll_max_us: u32,
    pub stats: bool,
    pub client_connected: bool,
    /// Every key of the export as it runs now (a null export's size after a resize, a
    /// dedicated export's polling after set-polling), as `add-export` takes them.
    pub spec: serde_json::Map<String, Value>,
}

/// What `query-stats` says of one export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportStats {
    pub id: String,
    pub size_bytes: u64,
    pub client_connected: bool,
    /// A flush failed: writes may have been lost, and every later flush fails until the
    /// export is removed and added again.
    pub flush_failed: bool,
    /// The limits in force and whose they are.
    pub throttle: ThrottleReport,
    /// The connected frontend's guest memory table: regions and their bytes (0 without one).
    pub memory_regions: u64,
    pub memory_bytes: u64,
    /// The queues started since the export opened (those the VMM asked for), each with its
    /// index.
    pub queues: Vec<QueueReport>,
}

/// An export's limits as `query-stats` and `set-throttle` show them.
#[derive(Debug, Clone, Serialize)]
pub struct ThrottleReport {
    /// The throttle group whose limits these are; null: the export's own.
    pub group: Option<String>,
    /// The limit keys in force (none: no limit).
    pub limits: serde_json::Map<String, Value>,
}

impl ThrottleReport {
    fn of(t: &Throttle) -> ThrottleReport {
        ThrottleReport {
            group: t.group.clone(),
            limits: t
                .config()
                .to_pairs()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into()))
                .collect(),
        }
    }
}

/// The polling of an export's dedicated threads as it is now (set-polling may change it).
fn dedicated_poll(e: &Export) -> PollPolicy {
    match &e.placement {
        Placement::Dedicated { poll, .. } => poll.get(),
        _ => e.config.threads.poll,
    }
}

fn info_of(e: &Export) -> ExportInfo {
    let disk = e.server.disk();
    let poll = dedicated_poll(e);
    let d = &e.config.disk;
    ExportInfo {
        id: e.id.clone(),
        socket: e.server.socket_path().display().to_string(),
        backend: d.backend.describe(),
        size_bytes: disk.capacity_bytes(),
        queues: disk.num_queues,
        queue_size: d.queue_size,
        cache: d.cache.to_string(),
        readonly: d.readonly,
        serial: d.serial.clone(),
        iothread: e.config.threads.iothread.to_string(),
        poll: poll.mode.to_string(),
        poll_max_us: poll.max_us,
        stats: disk.stats_on,
        client_connected: e.server.has_client(),
        spec: running_config(e)
            .to_pairs()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_json()))
            .collect(),
    }
}

/// The figures of every queue started since the export opened; queue 0's zeros while none
/// has, so that an export nobody used yet still has its figures (metrics, `stat`).
fn queue_reports(disk: &Disk) -> Vec<QueueReport> {
    let mut queues: Vec<QueueReport> =
        disk.started_queue_stats().map(|(i, q)| q.report(i)).collect();
    if queues.is_empty() {
        queues.push(crate::trace::QueueStats::default().report(0));
    }
    queues
}

/// The export's configuration as it runs now: its id, its current size (null engine) and
/// polling (dedicated threads), which the control socket may have changed.
fn running_config(e: &Export) -> ExportConfig {
    let disk = e.server.disk();
    let mut config = e.config.clone();
    config.id = Some(e.id.clone());
    // An inherited socket with a path is shown by it (a later daemon can bind it).
    if config.socket.path.as_os_str().is_empty() && e.server.socket_path().is_absolute() {
        config.socket.path = e.server.socket_path().to_path_buf();
    }
    if let BackendSpec::Null { size_bytes } = &mut config.disk.backend {
        *size_bytes = disk.capacity_bytes();
    }
    config.threads.poll = dedicated_poll(e);
    // Limits changed with set-throttle (an export's own, or its group's).
    config.limits.throttle = disk.throttle.config();
    config
}

/// Where an export listens, for its log lines and `list-exports`: its `socket=`, or the path
/// of its inherited socket (`socket-fd:N` if it has none), checked to be a listening one.
fn socket_path_of(c: &ExportConfig) -> Result<std::path::PathBuf, String> {
    match c.socket.fd {
        None if c.socket.path.as_os_str().is_empty() => Err(format!(
            "missing socket=PATH (or socket-fd=N, or a socket systemd passes named '{}')",
            c.id.as_deref().unwrap_or_default()
        )),
        None => Ok(c.socket.path.clone()),
        Some(fd) => {
            let path = crate::sys::inspect_listening_socket(fd)?;
            Ok(if path.as_os_str().is_empty() { format!("socket-fd:{fd}").into() } else { path })
        }
    }
}

/// Stops an export's server thread (its frontend is hung up on, queues drained).
fn stop_export(export: &mut Export) {
    export.server.shutdown();
    if let Some(t) = export.thread.take() {
        let _ = t.join();
    }
}

/// The running exports and the I/O threads that serve them.
pub struct Daemon {
    exports: Mutex<Vec<Export>>,
    iothreads: IoThreads,
    /// Ids and socket paths of exports being added (opened and bound outside the lock).
    reserved: Mutex<Vec<(String, std::path::PathBuf)>>,
    next_id: AtomicUsize,
    /// Serializes resizes (each is publish, drain, truncate).
    resizing: Mutex<()>,
    /// Ids of the exports that came from the config file: a reload (SIGHUP) compares the file
    /// with these, and leaves exports added otherwise (--export, add-export) alone.
    from_file: Mutex<Vec<String>>,
    /// The daemon-wide settings in force, for `dump-config`.
    settings: Mutex<DaemonSettings>,
    /// What re-reads the whole configuration file (`serve` sets it: it owns the sockets and
    /// the log this daemon does not); `ctl reload` and SIGHUP call it.
    reloader: Mutex<Option<Reloader>>,
    /// The NBD server (`--nbd-server`), if one runs.
    nbd: Mutex<Option<Arc<NbdServer>>>,
    /// The exports' mirror jobs.
    jobs: Jobs,
}

/// See `Daemon::reloader`.
pub type Reloader = Arc<dyn Fn() -> Result<Value, ControlError> + Send + Sync>;

impl Daemon {
    /// A daemon with no exports yet: a shared pool of `pool_threads` I/O threads and the
    /// named threads of `iothreads`.
    pub fn new(pool_threads: usize, iothreads: &[IoThreadConfig]) -> Result<Daemon, String> {
        let threads = IoThreads::start(pool_threads)
            .map_err(|e| format!("starting the I/O thread pool: {e}"))?;
        for c in iothreads {
            if let Err((_, message)) = threads.add(c) {
                threads.shut_down();
                return Err(message);
            }
        }
        Ok(Daemon {
            exports: Mutex::default(),
            iothreads: threads,
            reserved: Mutex::default(),
            next_id: AtomicUsize::new(0),
            resizing: Mutex::default(),
            from_file: Mutex::default(),
            settings: Mutex::default(),
            reloader: Mutex::default(),
            nbd: Mutex::default(),
            jobs: Jobs::default(),
        })
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, Vec<Export>> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens, binds and starts every export of `configs`: all of them, or (on the first
    /// error) none, with nothing left behind.
    pub fn add_exports(&self, configs: Vec<ExportConfig>) -> Result<Vec<ExportInfo>, ControlError> {
        // Ids and sockets are reserved under the lock; images are opened and sockets bound
        // without it (an open can be slow), so other commands and scrapes never wait on them.
        let named = self.reserve(configs)?;
        let result = self.open_and_start(&named);
        let mut exports = self.exports();
        let reserved = &mut *self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        reserved.retain(|(id, _)| !named.iter().any(|(n, _)| n == id));
        let started = result?;
        let mut infos = Vec::with_capacity(started.len());
        for export in started {
            info!(parent: &export.server.disk().span, "export added");
            infos.push(info_of(&export));
            exports.push(export);
        }
        crate::service::status(exports.len());
        Ok(infos)
    }

    /// Names each config and reserves its id and socket path against concurrent adds.
    fn reserve(
        &self,
        configs: Vec<ExportConfig>,
    ) -> Result<Vec<(String, ExportConfig)>, ControlError> {
        let exports = self.exports();
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<String> = exports.iter().map(|e| e.id.clone()).collect();
        let mut sockets: Vec<_> = exports.iter().map(|e| e.config.socket.path.clone()).collect();
        ids.extend(reserved.iter().map(|(id, _)| id.clone()));
        sockets.extend(reserved.iter().map(|(_, s)| s.clone()));
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
            // (An inherited socket has no path here; its descriptor is taken only once.)
            let path = &c.socket.path;
            if !path.as_os_str().is_empty() && sockets.contains(path) {
                return Err(ControlError::new(
                    "exists",
                    format!("socket {} is given to two exports", path.display()),
                ));
            }
            ids.push(id.clone());
            sockets.push(path.clone());
            named.push((id, c));
        }
        reserved.extend(named.iter().map(|(id, c)| (id.clone(), c.socket.path.clone())));
        Ok(named)
    }

    /// Opens, binds and starts the named exports, all or nothing (what was started is
    /// stopped again on a failure).
    fn open_and_start(
        &self,
        named: &[(String, ExportConfig)],
    ) -> Result<Vec<Export>, ControlError> {
        let mut disks = Vec::with_capacity(named.len());
        for (id, c) in named {
            let t = &c.threads;
            let placement = self.iothreads.placement(t).map_err(|e| {
                ControlError::new("not-found", format!("iothread={}: {e}", t.iothread))
            })?;
            let socket = socket_path_of(c).map_err(|e| ControlError::new("bind-failed", e))?;
            let disk = Disk::open(id, &socket, &c.disk, &c.limits)
                .map_err(|e| ControlError::new("open-failed", e.to_string()))?;
            disks.push((disk, placement, socket));
        }
        let mut servers = Vec::with_capacity(named.len());
        for ((id, c), (disk, placement, socket)) in named.iter().zip(disks) {
            let bind_failed = |e| ControlError::new("bind-failed", e);
            let (listener, owns_path) = match c.socket.fd {
                Some(fd) => (crate::sys::take_listening_socket(fd).map_err(bind_failed)?, false),
                None => (bind_socket(&c.socket.path).map_err(bind_failed)?, true),
            };
            let server =
                ExportServer::new(Arc::new(disk), placement.clone(), socket, listener, owns_path)
                    .map_err(|e| ControlError::new("failed", e.to_string()))?;
            // The server removes its socket when dropped, also on the failures below.
            let server = Arc::new(server);
            // An inherited socket's permissions are its parent's choice.
            if owns_path {
                apply_socket_access(&c.socket.path, &c.socket.access).map_err(bind_failed)?;
                warn_if_open_to_others(id, c);
            }
            servers.push((server, placement));
        }
        let mut started = Vec::with_capacity(servers.len());
        for ((id, config), (server, placement)) in named.iter().zip(servers) {
            let s = Arc::clone(&server);
            let thread = std::thread::Builder::new()
                .name(format!("blkplane-ctl-{id}"))
                .spawn(move || s.run());
            let thread = match thread {
                Ok(t) => t,
                Err(e) => {
                    for mut export in started {
                        stop_export(&mut export);
                    }
                    return Err(ControlError::new(
                        "failed",
                        format!("starting the export thread: {e}"),
                    ));
                }
            };
            started.push(Export {
                id: id.clone(),
                config: config.clone(),
                server,
                placement,
                thread: Some(thread),
            });
        }
        Ok(started)
    }

    /// The daemon-wide settings in force, for `dump-config`.
    pub fn set_settings(&self, settings: DaemonSettings) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    /// The running configuration (settings, named I/O threads, every export as it runs now)
    /// as the TOML file `--config` reads.
    pub fn dump_config(&self) -> String {
        let settings = self.settings.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let exports: Vec<ExportConfig> = self.exports().iter().map(running_config).collect();
        let nbd = self.nbd_server();
        crate::config_file::render(
            &settings,
            &self.iothreads.named_configs(),
            &exports,
            nbd.as_ref().map(|n| n.options()),
        )
    }

    pub fn set_reloader(&self, reloader: Reloader) {
        *self.reloader.lock().unwrap_or_else(|p| p.into_inner()) = Some(reloader);
    }

    /// Re-reads the configuration file and applies all of it (`ctl reload`).
    pub fn reload(&self) -> Result<Value, ControlError> {
        let reloader = self.reloader.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match reloader {
            Some(reload) => reload(),
            None => Err(ControlError::new(
                "no-config",
                "the daemon was started without --config; there is no file to re-read",
            )),
        }
    }

    /// The daemon-wide settings in force.
    pub fn settings(&self) -> DaemonSettings {
        self.settings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The named I/O threads as they run.
    pub fn named_iothreads(&self) -> Vec<IoThreadConfig> {
        self.iothreads.named_configs()
    }

    /// Remembers which running exports came from the config file (see `reload_exports`).
    pub fn set_from_file(&self, ids: Vec<String>) {
        *self.from_file.lock().unwrap_or_else(|p| p.into_inner()) = ids;
    }

    /// Applies the exports of a re-read config file (SIGHUP): those new in it are added, those
    /// gone from it removed, those whose keys changed replaced; unchanged ones are not
    /// touched. An export with a frontend connected is neither removed nor replaced (it is
    /// reported). Exports given otherwise (--export, add-export) are left alone. Returns one
    /// line per thing not done.
    pub fn reload_exports(&self, wanted: Vec<ExportConfig>) -> Vec<String> {
        let mut problems = Vec::new();
        let previous = self.from_file.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let running: Vec<(String, ExportConfig)> = self
            .exports()
            .iter()
            .filter(|e| previous.contains(&e.id))
            .map(|e| (e.id.clone(), e.config.clone()))
            .collect();
        // Inherited descriptors (socket-fd, or systemd's LISTEN_FDS, which the file does not
        // show) are fixed at start: they are no change, and could not be taken again.
        let same = |r: &ExportConfig, c: &ExportConfig| {
            let without_fd = |e: &ExportConfig| {
                let mut e = e.clone();
                e.socket.fd = None;
                e
            };
            without_fd(r) == without_fd(c)
        };
        // An entry of the file is the running export with its id, or (without one) its socket.
        let matches = |c: &ExportConfig, id: &str, r: &ExportConfig| match &c.id {
            Some(want) => want == id,
            None => r.id.is_none() && c.socket.path == r.socket.path,
        };
        // Limits alone are changed live, as set-throttle does, also under a connected VM.
        let limits_only = |r: &ExportConfig, c: &ExportConfig| {
            let without_limits = |e: &ExportConfig| {
                let mut e = e.clone();
                e.limits.throttle = ThrottleConfig::default();
                e
            };
            same(&without_limits(r), &without_limits(c))
        };
        let mut kept = Vec::new();
        let mut to_add = Vec::new();
        for c in &wanted {
            match running.iter().find(|(id, r)| matches(c, id, r)) {
                Some((id, r)) if same(r, c) => kept.push(id.clone()),
                Some((id, r)) if limits_only(r, c) => {
                    if let Err(e) = self.set_throttle(Some(id), None, &c.limits.throttle) {
                        problems.push(format!(
                            "export '{id}': its new limits were not set: {}",
                            e.message
                        ));
                    }
                    self.set_running_config(id, c);
                    kept.push(id.clone());
                }
                Some((id, _)) => match self.remove(id, false) {
                    Ok(()) => to_add.push(c.clone()),
                    Err(e) => {
                        problems.push(format!(
                            "export '{id}' changed in the file but was not replaced: {}",
                            e.message
                        ));
                        kept.push(id.clone());
                    }
                },
                None => to_add.push(c.clone()),
            }
        }
        for (id, r) in &running {
            if wanted.iter().any(|c| matches(c, id, r)) {
                continue;
            }
            if let Err(e) = self.remove(id, false) {
                problems.push(format!(
                    "export '{id}' is gone from the file but was not removed: {}",
                    e.message
                ));
                kept.push(id.clone());
            }
        }
        for c in to_add {
            let name = c.id.clone().unwrap_or_else(|| c.socket.path.display().to_string());
            match self.add_exports(vec![c]) {
                Ok(infos) => kept.extend(infos.into_iter().map(|i| i.id)),
                Err(e) => problems.push(format!("export {name} was not added: {}", e.message)),
            }
        }
        self.set_from_file(kept);
        problems
    }

    /// Records `config` as what an export was started with (its limits changed by a
    /// reload), so that the next reload compares the file with it.
    fn set_running_config(&self, id: &str, config: &ExportConfig) {
        if let Some(e) = self.exports().iter_mut().find(|e| e.id == id) {
            e.config.limits.throttle = config.limits.throttle.clone();
        }
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
            if let Some(nbd) = self.nbd_server() {
                if nbd.has_clients(id) && !force {
                    return Err(ControlError::new(
                        "busy",
                        format!("export '{id}' has NBD clients connected; remove it with force=true to disconnect them"),
                    ));
                }
                nbd.unexpose(id);
            }
            exports.remove(pos)
        };
        let span = export.server.disk().span.clone();
        self.jobs.forget(id);
        stop_export(&mut export);
        info!(parent: &span, "export removed");
        crate::service::status(self.list().len());
        Ok(())
    }

    /// Changes an export's size and tells a connected VMM (config-change message).
    /// Resizes an export; a smaller size only with `shrink` (the bytes past the new end are
    /// lost, and a typo in a size must not be how that happens: qemu-img asks the same).
    pub fn resize(
        &self,
        id: &str,
        size_bytes: u64,
        shrink: bool,
    ) -> Result<ExportInfo, ControlError> {
        let server = self.with_export(id, |e| Arc::clone(&e.server))?;
        // One resize at a time: two interleaved (publish, drain, truncate) sequences could
        // leave the file and the published capacity disagreeing; and the size compared
        // against here is the one this resize changes.
        let _one_at_a_time = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let old_size_bytes = server.disk().capacity_bytes();
        if size_bytes < old_size_bytes && !shrink {
            return Err(ControlError::new(
                "invalid-size",
                format!(
                    "size {size_bytes} is below the export's {old_size_bytes} bytes; \
                     a shrink loses data: say shrink=on"
                ),
            ));
        }
        server.disk().resize(size_bytes).map_err(|e| ControlError::new("invalid-size", e))?;
        if size_bytes < old_size_bytes {
            warn!(
                parent: &server.disk().span,
                old_size_bytes,
                new_size_bytes = size_bytes,
                "export shrunk: the bytes past the new end are gone"
            );
        }
        // Outside the exports lock: the VMM answers by reading the config space, which the
        // export's own thread serves.
        if let Err(e) = server.notify_config_change() {
            return Err(ControlError::new(
                "notify-failed",
                format!("resized, but the client was not told: {e}"),
            ));
        }
        info!(parent: &server.disk().span, size_bytes, "export resized");
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
                let (memory_regions, memory_bytes) = disk.guest_memory();
                ExportStats {
                    memory_regions,
                    memory_bytes,
                    id: e.id.clone(),
                    size_bytes: disk.capacity_bytes(),
                    client_connected: e.server.has_client(),
                    flush_failed: disk.flush_failed(),
                    throttle: ThrottleReport::of(&disk.throttle),
                    queues: queue_reports(&disk),
                }
            })
            .collect())
    }

    /// Changes polling: of one export's dedicated threads (`id`), of one I/O thread
    /// (`iothread`, pool threads included), or of every thread and every export with
    /// dedicated threads (neither). Running loops pick it up at their next idle moment.
    pub fn set_polling(
        &self,
        id: Option<&str>,
        iothread: Option<&str>,
        mode: Option<PollMode>,
        max_us: Option<u32>,
    ) -> Result<Value, ControlError> {
        let exports = self.exports();
        if let Some(id) = id {
            let Some(e) = exports.iter().find(|e| e.id == id) else {
                return Err(ControlError::new("not-found", format!("no export with id '{id}'")));
            };
            if e.config.threads.iothread != ThreadChoice::Dedicated {
                return Err(ControlError::new(
                    "invalid-argument",
                    format!(
                        "export '{id}' runs on shared I/O threads (iothread={}); their polling is \
                         set with set-polling iothread=NAME",
                        e.config.threads.iothread
                    ),
                ));
            }
        }
        let mut exports_changed = Vec::new();
        if iothread.is_none() {
            for e in exports.iter().filter(|e| id.is_none_or(|id| e.id == id)) {
                let Placement::Dedicated { poll: settings, .. } = &e.placement else { continue };
                let old = settings.get();
                settings.set(PollPolicy {
                    mode: mode.unwrap_or(old.mode),
                    max_us: max_us.unwrap_or(old.max_us),
                });
                exports_changed.push(info_of(e));
            }
        }
        let threads_changed = if id.is_none() {
            self.iothreads
                .set_polling(iothread, mode, max_us)
                .map_err(|(code, message)| ControlError::new(code, message))?
        } else {
            Vec::new()
        };
        Ok(serde_json::json!({ "exports": exports_changed, "iothreads": threads_changed }))
    }

    /// Changes the limits of an export (`id`; its group's if it is in one) or of a throttle
    /// group (`group`), all at once: limits not given are lifted. Takes effect within 100 ms
    /// (requests waiting for the old limits look again that often).
    pub fn set_throttle(
        &self,
        id: Option<&str>,
        group: Option<&str>,
        config: &ThrottleConfig,
    ) -> Result<Value, ControlError> {
        let throttle = match (id, group) {
            (Some(id), None) => self.with_export(id, |e| Arc::clone(&e.server.disk().throttle))?,
            (None, Some(g)) => crate::qos::throttle::find_group(g).ok_or_else(|| {
                ControlError::new("not-found", format!("no export is in throttle group '{g}'"))
            })?,
            _ => return Err(ControlError::new(
                "invalid-argument",
                "set-throttle takes 'id' (an export) or 'group' (a throttle group), one of them",
            )),
        };
        throttle.set(config);
        let exports: Vec<String> = self
            .exports()
            .iter()
            .filter(|e| Arc::ptr_eq(&e.server.disk().throttle, &throttle))
            .map(|e| e.id.clone())
            .collect();
        info!(
            group = throttle.group.as_deref().unwrap_or("-"),
            exports = exports.join(","),
            "limits set: {}",
            crate::qos::throttle::describe(config)
        );
        Ok(serde_json::json!({ "throttle": ThrottleReport::of(&throttle), "exports": exports }))
    }

    /// Starts a named I/O thread.
    pub fn add_iothread(&self, config: &IoThreadConfig) -> Result<IoThreadInfo, ControlError> {
        self.iothreads.add(config).map_err(|(code, message)| ControlError::new(code, message))
    }

    /// Ends a named I/O thread that no export names.
    pub fn remove_iothread(&self, id: &str) -> Result<(), ControlError> {
        // Exports hold their placement (and so the thread) for their whole life.
        let _exports = self.exports();
        self.iothreads.remove(id).map_err(|(code, message)| ControlError::new(code, message))
    }

    /// Starts mirroring export `id` to `target` (`ctl mirror`).
    pub fn mirror(
        &self,
        id: &str,
        target: &str,
        speed_bytes_per_s: u64,
        tls_creds: Option<&std::path::Path>,
    ) -> Result<JobInfo, ControlError> {
        let disk = self.with_export(id, |e| e.server.disk())?;
        Ok(self.jobs.start_mirror(id, &disk, target, speed_bytes_per_s, tls_creds)?)
    }

    pub fn query_jobs(&self) -> Vec<JobInfo> {
        self.jobs.list()
    }

    pub fn job_cancel(&self, id: &str) -> Result<JobInfo, ControlError> {
        Ok(self.jobs.cancel(id)?)
    }

    /// Switches export `id` to its ready mirror job's target (the guest sees a pause), then
    /// lets the old image go (closed, and its lock with it).
    pub fn job_complete(&self, id: &str) -> Result<JobInfo, ControlError> {
        let (mirror, target) = self.jobs.of(id)?;
        let (server, mut config) =
            self.with_export(id, |e| (Arc::clone(&e.server), e.config.disk.clone()))?;
        config.backend = target.clone();
        let switched = mirror.complete(|take| {
            server.switch_disk(|old| {
                let target = take().ok_or("the job's target is gone (cancelled, or it failed)")?;
                old.switched_to(&config, target)
            })
        });
        if !mirror.state().mirrors() {
            // Ended (completed, or failed in the pivot): its thread lets the source go.
            self.jobs.ended(id);
        }
        switched.map_err(|e| {
            let code = if e.contains("not ready") { "not-ready" } else { "failed" };
            ControlError::new(code, e)
        })?;
        if let Some(e) = self.exports().iter_mut().find(|e| e.id == id) {
            e.config.disk.backend = target;
        }
        let disk = server.disk();
        info!(parent: &disk.span, "export switched to its mirror's target");
        // An NBD exposure would keep the old image open: it follows the export, or ends.
        match self.nbd_server().and_then(|nbd| nbd.follow(id, &disk)) {
            Some(true) => info!(
                parent: &disk.span,
                "the NBD exposure now serves the mirror's target; its clients were disconnected"
            ),
            Some(false) => info!(
                parent: &disk.span,
                "unexposed over NBD: the server does not expose the new backend (NBD or RBD)"
            ),
            None => {}
        }
        Ok(mirror.info())
    }

    /// The shared threads, then each export's dedicated ones (while their queues run).
    pub fn list_iothreads(&self) -> Vec<IoThreadInfo> {
        let mut all = self.iothreads.list();
        for e in self.exports().iter() {
            if let Placement::Dedicated { started, .. } = &e.placement {
                all.extend(started.running().iter().map(|t| dedicated_info(&e.id, t)));
            }
        }
        all
    }

    /// Stops every export: no new connections, clients hung up after in-flight I/O.
    /// The NBD server, started by `serve` (none: `nbd-export` is refused).
    pub fn set_nbd_server(&self, server: Option<Arc<NbdServer>>) {
        *self.nbd.lock().unwrap_or_else(|p| p.into_inner()) = server;
    }

    pub fn nbd_server(&self) -> Option<Arc<NbdServer>> {
        self.nbd.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn nbd_or_refuse(&self) -> Result<Arc<NbdServer>, ControlError> {
        self.nbd_server().ok_or_else(|| {
            ControlError::new(
                "no-nbd-server",
                "the daemon runs no NBD server (serve --nbd-server, or an [nbd-server] table)",
            )
        })
    }

    /// Exposes export `id` over NBD as `name` (default: its id).
    pub fn nbd_export(
        &self,
        id: &str,
        name: Option<&str>,
        writable: bool,
    ) -> Result<ExposedInfo, ControlError> {
        let nbd = self.nbd_or_refuse()?;
        // Under the exports' lock: the export cannot be removed between its lookup and its
        // exposure (remove unexposes under the same lock).
        let exports = self.exports();
        let e = exports
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| ControlError::new("not-found", format!("no export with id '{id}'")))?;
        nbd.expose(id, name.unwrap_or(id), &e.server.disk(), writable)
            .map_err(|m| ControlError::new("refused", m))
    }

    /// Stops exposing export `id` over NBD; its NBD clients are disconnected.
    pub fn nbd_unexport(&self, id: &str) -> Result<(), ControlError> {
        if self.nbd_or_refuse()?.unexpose(id) {
            Ok(())
        } else {
            Err(ControlError::new("not-found", format!("export '{id}' is not exposed over NBD")))
        }
    }

    pub fn shutdown(&self) {
        // NBD clients first: they read and write the exports' disks.
        if let Some(nbd) = self.nbd.lock().unwrap_or_else(|p| p.into_inner()).take() {
            nbd.shutdown();
        }
        self.jobs.cancel_all();
        let exports: Vec<Export> = std::mem::take(&mut *self.exports());
        for e in &exports {
            e.server.shutdown();
        }
        for mut e in exports {
            if let Some(t) = e.thread.take() {
                let _ = t.join();
            }
        }
        self.iothreads.shut_down();
    }
}

/// Says once, as the export starts, that its socket mode lets any local user connect: a
/// socket-mode with "other" bits is accepted (a test bed may want it) but is seldom meant.
fn warn_if_open_to_others(id: &str, c: &ExportConfig) {
    if let Some(mode) = c.socket.access.mode.filter(|m| open_to_others(*m)) {
        tracing::warn!(
            export = %id,
            "socket-mode={mode:04o} opens {} to users outside its owner and group: whoever \
             connects controls the disk",
            c.socket.path.display()
        );
    }
}
