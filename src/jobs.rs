//! The daemon's block jobs (`ctl mirror`, `query-jobs`, `job-cancel`, `job-complete`): at most
//! one mirror per export, its job id the export's id. A job that ended stays listed (with its
//! state and error) until the next job of its export, or the export, goes.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::disk::{parse_target, Backend, BackendSpec, Disk};
use crate::engine::backing::Backing;
use crate::engine::nbd::blocking::BlockingNbd;
use crate::engine::nbd::tls::ClientTls;
use crate::engine::nbd::uri::NbdAddr;
use crate::engine::nbd::wire;
use crate::engine::rbd::cluster::RbdHandle;
use crate::engine::rbd::RbdOptions;
use crate::mirror::source::Source;
use crate::mirror::target::Target;
use crate::mirror::{JobInfo, Mirror};

/// A refused job command: a stable code and a sentence (the control socket's error).
#[derive(Debug)]
pub struct JobError {
    pub code: &'static str,
    pub message: String,
}

fn refuse<T>(code: &'static str, message: impl Into<String>) -> Result<T, JobError> {
    Err(JobError { code, message: message.into() })
}

struct Job {
    mirror: Arc<Mirror>,
    /// What the target is, as an export's backend (for the pivot).
    target: BackendSpec,
    thread: Option<JoinHandle<()>>,
}

/// The jobs of the daemon's exports.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<Vec<Job>>,
}

/// Opens what `target=` names, writable and locked as an export would open it, with the
/// export's cache mode.
fn open_target(
    spec: BackendSpec,
    text: &str,
    disk: &Disk,
    tls_creds: Option<&Path>,
) -> Result<Target, JobError> {
    if tls_creds.is_some()
        && !matches!(&spec, BackendSpec::Nbd { spec, .. } if matches!(spec.addr, NbdAddr::Tcp { .. }))
    {
        return refuse(
            "invalid-argument",
            format!("tls-creds= is for an nbd:// target, not {text}"),
        );
    }
    match spec {
        BackendSpec::Image(path) => {
            let backing = Backing::open(&path, false, disk.cache, false, false)
                .map_err(|e| JobError { code: "failed", message: e.to_string() })?;
            Ok(Target::File { backing, path })
        }
        BackendSpec::Nbd { spec, .. } => {
            let tls = match (tls_creds, &spec.addr) {
                (Some(dir), NbdAddr::Tcp { host, .. }) => Some(
                    ClientTls::load(dir, host)
                        .map_err(|message| JobError { code: "invalid-argument", message })?,
                ),
                _ => None,
            };
            let nbd = BlockingNbd::connect(&spec, tls.as_ref())
                .map_err(|message| JobError { code: "failed", message })?;
            if nbd.negotiated.has(wire::TFLAG_READ_ONLY) {
                return refuse("failed", format!("NBD server {spec}: the export is read-only"));
            }
            Ok(Target::Nbd(nbd))
        }
        BackendSpec::Rbd(RbdOptions { spec, op_timeout_s }) => {
            let image = RbdHandle::open(&spec, false, disk.cache, op_timeout_s, disk.span.clone())
                .map_err(|e| JobError {
                    code: "failed",
                    message: format!("RBD {}: {e}", spec.name()),
                })?;
            Ok(Target::Rbd(Arc::new(image)))
        }
        BackendSpec::Null { .. } => {
            refuse("invalid-argument", format!("target={text}: a mirror's target is an image"))
        }
    }
}

/// What a mirror of `disk` reads, and the alignment its reads need: the export's own image
/// file or RBD handle, or a connection of its own to the export's NBD server.
fn open_source(disk: &Disk) -> Result<(Source, u64), JobError> {
    let failed = |message: String| JobError { code: "failed", message };
    match &disk.backend {
        Backend::File { backing, .. } => {
            let file = backing.file.try_clone().map_err(|e| failed(format!("the source: {e}")))?;
            let align = u64::from(backing.logical_block_bytes.max(backing.dio_mem_align));
            Ok((Source::File(file), align))
        }
        Backend::Nbd(export) => {
            let nbd = BlockingNbd::connect_for_block_status(&export.spec)
                .map_err(|e| failed(format!("connecting to the source: {e}")))?;
            let extents = if nbd.has_block_status() { "block status" } else { "none: read whole" };
            tracing::info!(parent: &disk.span, "mirror source {}: extents from {extents}", export.spec);
            let align = u64::from(nbd.negotiated.min_block.max(1));
            Ok((Source::Nbd(nbd), align))
        }
        Backend::Rbd(image) => Ok((Source::Rbd(Arc::clone(image)), 512)),
        // Nothing to copy: its reads are made-up zeroes and its writes are dropped, so a
        // target "equal" to it would be a blank image, and the guest's data is nowhere.
        Backend::Null => refuse(
            "unsupported",
            "an export of engine=null has no data to mirror (its writes are dropped)",
        ),
    }
}

impl Jobs {
    fn jobs(&self) -> MutexGuard<'_, Vec<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts mirroring export `id` (serving `disk`) to `target`, at most `speed_bytes_per_s`
    /// (0: no limit), an NBD target inside TLS with the credentials in `tls_creds`.
    pub fn start_mirror(
        &self,
        id: &str,
        disk: &Arc<Disk>,
        target: &str,
        speed_bytes_per_s: u64,
        tls_creds: Option<&Path>,
    ) -> Result<JobInfo, JobError> {
        if self.jobs().iter().any(|j| j.mirror.id == id && j.mirror.state().mirrors()) {
            return refuse("busy", format!("export '{id}' has a mirror job running"));
        }
        let spec = parse_target(target)
            .map_err(|e| JobError { code: "invalid-argument", message: e.0 })?;
        let (source, align) = open_source(disk)?;
        let target = open_target(spec.clone(), target, disk, tls_creds)?;
        let mirror =
            Mirror::new(id, source, disk.capacity_bytes(), align, target, speed_bytes_per_s)
                .map_err(|message| JobError { code: "invalid-argument", message })?;
        let mirror = Arc::new(mirror);
        let mut jobs = self.jobs();
        disk.mirror.install(&mirror).map_err(|message| JobError { code: "busy", message })?;
        let slot = Arc::clone(&disk.mirror);
        let runs = Arc::clone(&mirror);
        let thread = std::thread::Builder::new()
            .name("blkplane-mirror".into())
            .spawn(move || runs.run(slot));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                disk.mirror.remove();
                return refuse("failed", format!("starting the job's thread: {e}"));
            }
        };
        tracing::info!(parent: &disk.span, "mirror to {} started", mirror.target_name);
        jobs.retain(|j| j.mirror.id != id);
        let info = mirror.info();
        jobs.push(Job { mirror, target: spec, thread: Some(thread) });
        Ok(info)
    }

    pub fn list(&self) -> Vec<JobInfo> {
        self.jobs().iter().map(|j| j.mirror.info()).collect()
    }

    fn find(&self, id: &str) -> Result<Arc<Mirror>, JobError> {
        self.of(id).map(|(mirror, _)| mirror)
    }

    /// Waits for the thread of job `id` to end.
    fn join(&self, id: &str) {
        let thread =
            self.jobs().iter_mut().find(|j| j.mirror.id == id).and_then(|j| j.thread.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// Stops job `id` (if it still runs) and waits for it: the export goes on as it was.
    pub fn cancel(&self, id: &str) -> Result<JobInfo, JobError> {
        let mirror = self.find(id)?;
        mirror.cancel();
        self.join(id);
        Ok(mirror.info())
    }

    /// Job `id`, and its target as an export's backend: for job-complete.
    pub fn of(&self, id: &str) -> Result<(Arc<Mirror>, BackendSpec), JobError> {
        match self.jobs().iter().find(|j| j.mirror.id == id) {
            Some(j) => Ok((Arc::clone(&j.mirror), j.target.clone())),
            None => refuse("not-found", format!("no job with id '{id}'")),
        }
    }

    /// Job `id` completed (or failed to): waits for its thread, which lets the old image go.
    pub fn ended(&self, id: &str) {
        self.join(id);
    }

    /// Export `id` goes: its job is cancelled and forgotten.
    pub fn forget(&self, id: &str) {
        if self.find(id).is_ok() {
            let _ = self.cancel(id);
            self.jobs().retain(|j| j.mirror.id != id);
        }
    }

    /// The daemon stops: every job is cancelled.
    pub fn cancel_all(&self) {
        let ids: Vec<String> = self.jobs().iter().map(|j| j.mirror.id.clone()).collect();
        for id in ids {
            let _ = self.cancel(&id);
        }
    }
}
