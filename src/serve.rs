//! `blkplane serve`: reads the command line and the config file through the key tables,
//! starts the daemon, its control socket and metrics endpoint, and reloads all of it on
//! SIGHUP or `ctl reload` (`Runtime::reload`). `--check-config` checks without binding or
//! locking anything, so it can check the file of a running daemon.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::builder::PossibleValuesParser;
use clap::Args;
use serde_json::{json, Value};
use tracing::level_filters::LevelFilter;

use crate::config_file::{self, ConfigFile, DaemonSettings};
use crate::control::{metrics, ControlServer};
use crate::daemon::{ControlError, Daemon};
use crate::disk::BackendSpec;
use crate::engine::lock;
use crate::export::ExportConfig;
use crate::iothread::registry::{IoThreadConfig, IoThreads};
use crate::listener::StoppableListener;
use crate::logging::LogFormat;
use crate::nbd_server::{NbdServer, NbdServerOptions};
use crate::spec::{Options, SpecError, Value as SpecValue};
use crate::virtq::memory::{set_mapped_limit_bytes, DEFAULT_MAPPED_LIMIT_BYTES};

/// Exit status for bad input on the command line.
pub const EXIT_USAGE: u8 = 2;

pub fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("blkplane: error: {message}");
    ExitCode::from(EXIT_USAGE)
}

#[derive(Args)]
pub struct ServeOptions {
    /// An export: socket=PATH,image=PATH[,queues=N][,queue-size=N][,cache=MODE][,aio=ENGINE][,readonly=on][,serial=STR], or socket=PATH,engine=null,size=BYTES.
    #[arg(long = "export", value_name = "SPEC", long_help = crate::export::help())]
    pub exports: Vec<String>,
    /// A TOML file describing exports, the control socket and the metrics address (see
    /// blkplane.toml(5) and the README); --export and the other options add to it, and win
    /// over its keys of the same name.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration and exit, printing every problem (with the file's line and
    /// column) or the verdict: keys and values, images that open read-only, directories of
    /// sockets. Binds nothing and locks nothing, so it checks a running daemon's file too.
    #[arg(long)]
    pub check_config: bool,
    /// Open a control socket (JSON, one request per line; mode 0600) at PATH.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// What a scrape shows: export (default; queues summed) or queue (per queue, every
    /// latency bucket, the per-stage histograms: about 10 times the series).
    #[arg(long, value_name = "DETAIL", value_parser = PossibleValuesParser::new(metrics::DETAILS))]
    pub metrics_detail: Option<String>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", value_parser = PossibleValuesParser::new(config_file::LOG_LEVELS))]
    pub log_level: Option<String>,
    /// Log lines as text (default) or JSON objects, on stderr. Under systemd (stderr is the
    /// journal) each line also carries its priority, so journalctl -p works.
    #[arg(long, value_name = "FORMAT", value_parser = PossibleValuesParser::new(config_file::LOG_FORMATS))]
    pub log_format: Option<String>,
    /// A named I/O thread: id=NAME[,cpus=LIST][,poll=MODE][,poll-max-us=N]. Exports put
    /// their queues on it with iothread=NAME. cpus= is the thread's affinity (`,,` between
    /// CPUs: cpus=0,,2); poll= and poll-max-us= as for an export.
    #[arg(long = "iothread", value_name = "SPEC")]
    pub iothreads: Vec<String>,
    /// Threads of the shared I/O thread pool (default: one per CPU the process may use).
    #[arg(long, value_name = "N")]
    pub pool_threads: Option<String>,
    /// The most guest memory the daemon maps for all its frontends together (e.g. 64T,
    /// the default); a memory table that would go over is refused. Each export also has
    /// its own max-guest-memory.
    #[arg(long, value_name = "SIZE")]
    pub max_mapped_guest_memory: Option<String>,
    /// How long to wait for an image another process has locked before refusing it
    /// (default 5000). A daemon killed with I/O in flight keeps its images locked until that
    /// I/O completes; its successor waits for it rather than fail.
    #[arg(long, value_name = "MS")]
    pub image_lock_wait_ms: Option<String>,
    /// Serve exports over NBD (ctl nbd-export chooses which): unix=PATH[,socket-mode=..],
    /// or addr=HOST:PORT,tls-creds=DIR (x509 as QEMU's tls-creds-x509; tls=off for plain
    /// TCP, said on purpose). Wins over the file's [nbd-server] table.
    #[arg(long, value_name = "SPEC", long_help = crate::nbd_server::help())]
    pub nbd_server: Option<String>,
}

impl ServeOptions {
    /// The daemon-wide options of the command line, read by the same rows as the file's
    /// top-level keys.
    fn settings(&self) -> Result<DaemonSettings, SpecError> {
        let text = |o: &Option<String>| o.clone().map(SpecValue::Str);
        let given = [
            ("control", self.control.as_ref().map(|p| SpecValue::Str(p.display().to_string()))),
            ("metrics", text(&self.metrics)),
            ("metrics-detail", text(&self.metrics_detail)),
            ("log-level", text(&self.log_level)),
            ("log-format", text(&self.log_format)),
            ("max-mapped-guest-memory", text(&self.max_mapped_guest_memory)),
            ("pool-threads", text(&self.pool_threads)),
            ("image-lock-wait-ms", text(&self.image_lock_wait_ms)),
        ];
        let mut settings = DaemonSettings::default();
        for (key, value) in given {
            if let Some(v) = value {
                if let Some((_, result)) = settings.set_key(key, &v) {
                    result.map_err(|e| SpecError(format!("--{key}: {e}")))?;
                }
            }
        }
        Ok(settings)
    }
}

/// Everything `serve` was told, before anything starts.
struct Plan {
    settings: DaemonSettings,
    cli: DaemonSettings,
    iothreads: Vec<IoThreadConfig>,
    exports: Vec<ExportConfig>,
    exports_from_file: usize,
    iothreads_from_file: usize,
    nbd_server: Option<NbdServerOptions>,
    /// `--nbd-server` was given: the file's table is not the server's.
    nbd_from_cli: bool,
}

fn plan(o: &ServeOptions) -> Result<Plan, String> {
    let file = match &o.config {
        Some(path) => config_file::load(path)?,
        None => ConfigFile::default(),
    };
    let cli = o.settings().map_err(|e| e.0)?;
    let mut exports = file.exports;
    let exports_from_file = exports.len();
    for spec in &o.exports {
        exports.push(ExportConfig::parse(spec).map_err(|e| format!("--export {spec}: {e}"))?);
    }
    let mut iothreads = file.iothreads;
    let iothreads_from_file = iothreads.len();
    for spec in &o.iothreads {
        iothreads.push(IoThreadConfig::parse(spec).map_err(|e| format!("--iothread {spec}: {e}"))?);
    }
    let settings = file.settings.overridden_by(&cli);
    let nbd_server = match &o.nbd_server {
        Some(spec) => {
            Some(NbdServerOptions::parse(spec).map_err(|e| format!("--nbd-server {spec}: {e}"))?)
        }
        None => file.nbd_server,
    };
    // Unreadable credentials are a usage error, said before anything starts.
    if let Some(nbd) = &nbd_server {
        nbd.check_files().map_err(|e| format!("nbd-server: {e}"))?;
    }
    Ok(Plan {
        settings,
        cli,
        iothreads,
        exports,
        exports_from_file,
        iothreads_from_file,
        nbd_server,
        nbd_from_cli: o.nbd_server.is_some(),
    })
}

fn log_level(settings: &DaemonSettings) -> LevelFilter {
    settings.log_level.as_deref().and_then(|l| l.parse().ok()).unwrap_or(LevelFilter::INFO)
}

fn log_format(settings: &DaemonSettings) -> LogFormat {
    settings.log_format.as_deref().and_then(|f| f.parse().ok()).unwrap_or_default()
}

/// Socket activation: an export whose id names a socket systemd passed serves on it.
fn take_passed_sockets(exports: &mut [ExportConfig]) {
    for (fd, name) in crate::service::listen_fds() {
        match exports.iter_mut().find(|e| e.id.as_deref() == Some(name.as_str())) {
            Some(e) if e.socket.fd.is_none() => e.socket.fd = Some(fd),
            _ => tracing::warn!(fd, name, "systemd passed a socket no export has the id of"),
        }
    }
}

/// `--check-config`: every problem of what `serve` would start, found without binding a
/// socket or taking a lock (the file may be a running daemon's).
fn check(plan: &Plan) -> Vec<String> {
    let mut problems = Vec::new();
    let dir_of = |what: &str, path: &Path, problems: &mut Vec<String>| {
        if let Some(dir) = path.parent().filter(|d| !d.is_dir()) {
            problems.push(format!("{what} {}: no directory {}", path.display(), dir.display()));
        }
    };
    if let Some(c) = &plan.settings.control {
        dir_of("control socket", c, &mut problems);
    }
    if let Some(m) = &plan.settings.metrics {
        if std::net::ToSocketAddrs::to_socket_addrs(m.as_str()).is_err() {
            problems.push(format!("metrics={m}: not an ADDRESS:PORT"));
        }
    }
    if let Some(nbd) = &plan.nbd_server {
        if let Some(path) = &nbd.unix {
            dir_of("nbd-server: unix", path, &mut problems);
        }
    }
    let names: Vec<&str> = plan.iothreads.iter().map(|t| t.id.as_str()).collect();
    for (i, e) in plan.exports.iter().enumerate() {
        let name = e.id.clone().unwrap_or_else(|| format!("export {}", i + 1));
        if !e.socket.path.as_os_str().is_empty() && e.socket.fd.is_none() {
            dir_of(&format!("{name}: socket"), &e.socket.path, &mut problems);
        }
        if let crate::iothread::registry::ThreadChoice::Named(wanted) = &e.threads.iothread {
            for w in wanted.iter().filter(|w| !names.contains(&w.as_str())) {
                problems.push(format!("{name}: iothread={w}: no such I/O thread"));
            }
        }
        if let BackendSpec::Image(path) = &e.disk.backend {
            // Read-only, and no lock: the running daemon's locks are left alone.
            let opened = crate::engine::Backing::open(path, true, e.disk.cache, true, false);
            if let Err(err) = opened {
                problems.push(format!("{name}: {err}"));
            }
        }
    }
    problems
}

pub fn serve(o: ServeOptions) -> ExitCode {
    crate::sys::note_inherited_fds();
    let mut plan = match plan(&o) {
        Ok(p) => p,
        Err(e) => return usage_error(e),
    };
    if o.check_config {
        let problems = check(&plan);
        if problems.is_empty() {
            println!("configuration OK: {} export(s)", plan.exports.len());
            return ExitCode::SUCCESS;
        }
        return usage_error(problems.join("\nblkplane: error: "));
    }
    let level = log_level(&plan.settings);
    crate::logging::init(level, log_format(&plan.settings), crate::logging::stderr_is_journal());
    take_passed_sockets(&mut plan.exports);
    if plan.exports.is_empty() && plan.settings.control.is_none() && plan.nbd_server.is_none() {
        return usage_error("nothing to serve: give --export, a --config with exports, or --control to add them later");
    }
    apply_limits(&plan.settings);
    if let Err(e) = crate::sys::raise_fd_limit() {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
    // Before any thread starts (the I/O threads start here): a thread that does not block
    // them could take SIGTERM or SIGHUP while the main thread is not in sigwait, and their
    // default action would end the daemon at once, without its drain.
    if let Err(e) = crate::sys::block_shutdown_signals() {
        eprintln!("blkplane: error: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match start(o.config.clone(), plan, level) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let signal = match runtime.wait_for_shutdown() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("blkplane: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(signal, "shutting down after in-flight I/O");
    crate::service::stopping();
    runtime.close_control();
    runtime.daemon.shutdown();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Starts the daemon, its exports, control socket and metrics as `plan` says, and tells the
/// service manager once every export listens. A failure is the exit status to end with.
fn start(
    config: Option<PathBuf>,
    plan: Plan,
    level: LevelFilter,
) -> Result<Arc<Runtime>, ExitCode> {
    let pool = plan.settings.pool_threads.unwrap_or_else(IoThreads::default_pool_size);
    let daemon = match Daemon::new(pool, &plan.iothreads) {
        Ok(d) => Arc::new(d),
        Err(e) => return Err(usage_error(e)),
    };
    let runtime = Arc::new(Runtime {
        daemon: Arc::clone(&daemon),
        config,
        cli: plan.cli.clone(),
        nbd_from_cli: plan.nbd_from_cli,
        cli_iothreads: plan.iothreads[plan.iothreads_from_file..]
            .iter()
            .map(|t| t.id.clone())
            .collect(),
        control: Mutex::default(),
        metrics: Mutex::default(),
    });
    if let Err(e) = runtime.open_control(plan.settings.control.as_deref()) {
        return Err(usage_error(e));
    }
    if let Some(options) = &plan.nbd_server {
        let server = NbdServer::bind(options).map_err(usage_error)?;
        daemon.set_nbd_server(Some(Arc::new(server)));
    }
    let metrics = match plan.settings.metrics.as_deref().map(metrics::bind).transpose() {
        Ok(m) => m,
        Err(e) => return Err(usage_error(e)),
    };
    let mut settings = plan.settings.clone();
    settings.log_level = Some(level.to_string().to_lowercase());
    settings.log_format = Some(format!("{:?}", log_format(&plan.settings)).to_lowercase());
    settings.pool_threads = Some(pool);
    settings.image_lock_wait_ms = Some(lock::lock_wait_ms());
    daemon.set_settings(settings);
    match daemon.add_exports(plan.exports) {
        Ok(infos) => daemon
            .set_from_file(infos.into_iter().take(plan.exports_from_file).map(|i| i.id).collect()),
        Err(e) => return Err(usage_error(e)),
    }
    runtime.start_control();
    if let Some(nbd) = daemon.nbd_server() {
        let spawned =
            std::thread::Builder::new().name("blkplane-nbd".into()).spawn(move || nbd.run());
        if let Err(e) = spawned {
            eprintln!("blkplane: error: cannot start the NBD server's thread: {e}");
            return Err(ExitCode::FAILURE);
        }
    }
    if let Some(l) = metrics {
        runtime.serve_metrics(l);
    }
    let weak = Arc::downgrade(&runtime);
    daemon.set_reloader(Arc::new(move || match weak.upgrade() {
        Some(r) => r.reload(),
        None => Err(ControlError::new("failed", "the daemon is stopping")),
    }));
    tracing::info!(exports = daemon.list().len(), "serving");
    crate::service::ready(daemon.list().len());
    Ok(runtime)
}

/// `wanted` with what a key left out means: its default (as filled in at start), and for
/// the pool, the size it has (its default is what it was started with).
fn with_defaults(mut wanted: DaemonSettings, running: &DaemonSettings) -> DaemonSettings {
    wanted.log_level.get_or_insert_with(|| LevelFilter::INFO.to_string().to_lowercase());
    wanted.log_format.get_or_insert_with(|| "text".into());
    wanted.image_lock_wait_ms.get_or_insert(lock::DEFAULT_LOCK_WAIT_MS);
    if wanted.pool_threads.is_none() {
        wanted.pool_threads = running.pool_threads;
    }
    wanted
}

/// The daemon-wide limits a setting gives (its default where it gives none).
fn apply_limits(settings: &DaemonSettings) {
    set_mapped_limit_bytes(
        settings.max_mapped_guest_memory_bytes.unwrap_or(DEFAULT_MAPPED_LIMIT_BYTES),
    );
    lock::set_lock_wait_ms(settings.image_lock_wait_ms.unwrap_or(lock::DEFAULT_LOCK_WAIT_MS));
}

/// What `serve` runs besides the daemon, and how to reload the whole configuration.
struct Runtime {
    daemon: Arc<Daemon>,
    config: Option<PathBuf>,
    /// The command line's settings: they win over the file's, at start and at reloads.
    cli: DaemonSettings,
    /// The threads `--iothread` made: not the file's to remove.
    cli_iothreads: Vec<String>,
    /// `--nbd-server` was given: it wins over the file's table.
    nbd_from_cli: bool,
    control: Mutex<Option<Control>>,
    metrics: Mutex<Option<Arc<StoppableListener<TcpListener>>>>,
}

/// The control socket and the thread that accepts on it (none until it is started).
type Control = (Arc<ControlServer>, Option<JoinHandle<()>>);

/// A key a reload did not apply, and why.
struct NotApplied {
    key: String,
    why: String,
}

impl Runtime {
    /// Binds the control socket at `path` (none: no control socket); not yet serving.
    fn open_control(&self, path: Option<&Path>) -> Result<(), String> {
        let server = path.map(ControlServer::bind).transpose()?.map(Arc::new);
        *self.control.lock().unwrap_or_else(|p| p.into_inner()) = server.map(|s| (s, None));
        Ok(())
    }

    /// Serves the bound control socket on a thread of its own.
    fn start_control(&self) {
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((server, thread @ None)) = control.as_mut() {
            let (c, d) = (Arc::clone(server), Arc::clone(&self.daemon));
            *thread = std::thread::Builder::new()
                .name("blkplane-control".into())
                .spawn(move || c.run(d))
                .ok();
        }
    }

    /// Stops the control socket's accept loop and removes its file.
    fn close_control(&self) {
        let old = self.control.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((server, thread)) = old {
            server.shutdown();
            if let Some(t) = thread {
                // The loop ends at once; a reload from a control client runs on another thread.
                if t.thread().id() != std::thread::current().id() {
                    let _ = t.join();
                }
            }
        }
    }

    fn serve_metrics(&self, listener: Arc<StoppableListener<TcpListener>>) {
        let (l, d) = (Arc::clone(&listener), Arc::clone(&self.daemon));
        // The metrics thread ends when its listener is stopped (a reload moves it).
        let _ = std::thread::Builder::new()
            .name("blkplane-metrics".into())
            .spawn(move || metrics::run(l, d));
        if let Some(old) = self.metrics.lock().unwrap_or_else(|p| p.into_inner()).replace(listener)
        {
            old.stop();
        }
    }

    /// The main loop: reloads on SIGHUP, feeds the service manager's watchdog, and returns
    /// the signal that ends the daemon (SIGTERM, SIGINT). The watchdog is fed by the clock,
    /// not by each wake-up, so that a stream of SIGHUPs cannot starve it.
    fn wait_for_shutdown(&self) -> std::io::Result<i32> {
        // Without a watchdog the wait still ends now and then; nothing is sent.
        let ping_every = crate::service::watchdog_ping_interval();
        let wait = ping_every.unwrap_or(Duration::from_secs(3600));
        let mut next_ping = Instant::now() + wait;
        loop {
            let left = next_ping.saturating_duration_since(Instant::now());
            match crate::sys::wait_for_shutdown_signal(left)? {
                Some(libc::SIGHUP) => self.reload_on_signal(),
                Some(signal) => return Ok(signal),
                None => {}
            }
            if Instant::now() >= next_ping {
                if ping_every.is_some() {
                    crate::service::watchdog_ping();
                }
                next_ping = Instant::now() + wait;
            }
        }
    }

    fn reload_on_signal(&self) {
        crate::service::reloading();
        match self.reload() {
            Ok(_) => {}
            Err(e) => tracing::error!("SIGHUP: {}", e.message),
        }
        crate::service::ready(self.daemon.list().len());
    }

    /// Re-reads the file and applies every key of it, or names each key it could not apply
    /// and why (one log line each). A file with any problem changes nothing.
    fn reload(&self) -> Result<Value, ControlError> {
        let Some(path) = &self.config else {
            return Err(ControlError::new(
                "no-config",
                "the daemon was started without --config; there is no file to re-read",
            ));
        };
        let file = config_file::load(path)
            .map_err(|e| ControlError::new("invalid-config", format!("{e}\nnothing changed")))?;
        let mut not_applied = Vec::new();
        let mut applied = Vec::new();
        let settings = self.reload_settings(&file.settings, &mut applied, &mut not_applied);
        self.daemon.set_settings(settings);
        self.reload_iothreads(&file.iothreads, &mut applied, &mut not_applied, true);
        for problem in self.daemon.reload_exports(file.exports) {
            not_applied.push(NotApplied { key: "export".into(), why: problem });
        }
        self.reload_iothreads(&file.iothreads, &mut applied, &mut not_applied, false);
        if let Some(why) = self.nbd_server_change(file.nbd_server.as_ref()) {
            not_applied.push(NotApplied { key: "nbd-server".into(), why });
        }
        for n in &not_applied {
            tracing::warn!("reload: {} not applied: {}", n.key, n.why);
        }
        tracing::info!(
            exports = self.daemon.list().len(),
            applied = applied.join(","),
            "configuration re-read"
        );
        if not_applied.is_empty() {
            Ok(json!({ "applied": applied, "exports": self.daemon.list().len() }))
        } else {
            let list: Vec<String> =
                not_applied.iter().map(|n| format!("{}: {}", n.key, n.why)).collect();
            Err(ControlError::new(
                "not-applied",
                format!("applied: [{}]; not applied: {}", applied.join(", "), list.join("; ")),
            ))
        }
    }

    /// The top-level keys: applied where they changed (the log level, the control socket
    /// and metrics addresses move, the daemon-wide limits), or named. Returns the settings
    /// now in force.
    fn reload_settings(
        &self,
        file: &DaemonSettings,
        applied: &mut Vec<String>,
        not_applied: &mut Vec<NotApplied>,
    ) -> DaemonSettings {
        let old = self.daemon.settings();
        let wanted = with_defaults(file.overridden_by(&self.cli), &old);
        let mut now = old.clone();
        for key in DaemonSettings::KEYS {
            if (key.get)(&old) == (key.get)(&wanted) {
                continue;
            }
            let mut refuse =
                |why: &str| not_applied.push(NotApplied { key: key.name.into(), why: why.into() });
            if (key.get)(&self.cli).is_some() {
                refuse("given on the command line, which wins over the file");
                continue;
            }
            let outcome = match key.name {
                "log-level" => {
                    crate::logging::set_level(log_level(&wanted));
                    now.log_level = wanted.log_level.clone();
                    Ok(())
                }
                "control" => self
                    .move_control(wanted.control.as_deref())
                    .map(|()| now.control = wanted.control.clone()),
                "metrics" => self
                    .move_metrics(wanted.metrics.as_deref())
                    .map(|()| now.metrics = wanted.metrics.clone()),
                "metrics-detail" => {
                    now.metrics_detail = wanted.metrics_detail.clone();
                    Ok(())
                }
                "max-mapped-guest-memory" | "image-lock-wait-ms" => {
                    now.max_mapped_guest_memory_bytes = wanted.max_mapped_guest_memory_bytes;
                    now.image_lock_wait_ms = wanted.image_lock_wait_ms;
                    apply_limits(&now);
                    Ok(())
                }
                "log-format" => {
                    Err("the log format is chosen at start; restart to change it".to_string())
                }
                "pool-threads" => Err("the shared pool keeps its size until a restart".to_string()),
                _ => Err("not a setting a reload changes".to_string()),
            };
            match outcome {
                Ok(()) => applied.push(key.name.to_string()),
                Err(why) => refuse(&why),
            }
        }
        now
    }

    /// Why the file's `[nbd-server]` table cannot be applied, if it differs from the server
    /// running: the server's socket, credentials and limits are fixed at start (what it
    /// exposes changes with nbd-export and nbd-unexport).
    fn nbd_server_change(&self, wanted: Option<&NbdServerOptions>) -> Option<String> {
        // --nbd-server wins over the file, at start and at reloads.
        let running = self.daemon.nbd_server();
        if self.nbd_from_cli || running.as_ref().map(|n| n.options()) == wanted {
            return None;
        }
        Some("the NBD server is set at start; restart to change it".into())
    }

    fn move_control(&self, path: Option<&Path>) -> Result<(), String> {
        let new = path.map(ControlServer::bind).transpose()?;
        self.close_control();
        *self.control.lock().unwrap_or_else(|p| p.into_inner()) = new.map(|s| (Arc::new(s), None));
        self.start_control();
        Ok(())
    }

    fn move_metrics(&self, addr: Option<&str>) -> Result<(), String> {
        match addr {
            Some(a) => self.serve_metrics(metrics::bind(a)?),
            None => {
                if let Some(old) = self.metrics.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    old.stop();
                }
            }
        }
        Ok(())
    }

    /// The file's I/O threads: new ones are started before the exports (`adding`), gone
    /// ones ended after them; a changed one takes its new polling, and is named if its
    /// CPUs changed.
    fn reload_iothreads(
        &self,
        wanted: &[IoThreadConfig],
        applied: &mut Vec<String>,
        not_applied: &mut Vec<NotApplied>,
        adding: bool,
    ) {
        let running = self.daemon.named_iothreads();
        let key = |id: &str| format!("iothread {id}");
        if adding {
            for t in wanted {
                match running.iter().find(|r| r.id == t.id) {
                    None => match self.daemon.add_iothread(t) {
                        Ok(_) => applied.push(key(&t.id)),
                        Err(e) => not_applied.push(NotApplied { key: key(&t.id), why: e.message }),
                    },
                    Some(r) if r == t => {}
                    Some(r) => {
                        if r.cpus != t.cpus {
                            not_applied.push(NotApplied {
                                key: key(&t.id),
                                why: "its CPUs change only when it is removed and added again"
                                    .into(),
                            });
                        }
                        if r.poll != t.poll {
                            match self.daemon.set_polling(
                                None,
                                Some(&t.id),
                                Some(t.poll.mode),
                                Some(t.poll.max_us),
                            ) {
                                Ok(_) => applied.push(key(&t.id)),
                                Err(e) => {
                                    not_applied.push(NotApplied { key: key(&t.id), why: e.message })
                                }
                            }
                        }
                    }
                }
            }
            return;
        }
        // Threads given with --iothread are the command line's, not the file's.
        let gone = |r: &&IoThreadConfig| {
            !wanted.iter().any(|t| t.id == r.id) && !self.cli_iothreads.contains(&r.id)
        };
        for r in running.iter().filter(gone) {
            match self.daemon.remove_iothread(&r.id) {
                Ok(()) => applied.push(key(&r.id)),
                Err(e) => not_applied.push(NotApplied { key: key(&r.id), why: e.message }),
            }
        }
    }
}
