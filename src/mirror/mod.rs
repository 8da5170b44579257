//! Mirror jobs (`ctl mirror`): an export's image copied to another backend while the guest
//! runs, with the guest's writes copied too once the copy has passed them (QEMU's
//! `copy-mode=write-blocking`), so that the target converges whatever the guest writes.
//!
//! - `progress.rs`: the bookkeeping, pure (what is copied, the chunk being copied, what a
//!   guest write means), with its property test.
//! - `source.rs`: the export's image as the copy reads it (a file, NBD, RBD), blocking.
//! - `target.rs`: the target, written through blocking calls.
//! - `job.rs`: the job's own thread: the copy, chunk by chunk (each chunk's pieces by a few
//!   workers at once), at most `speed` bytes a second.
//!
//! The data path meets a mirror in one place: an I/O thread that answers a successful write,
//! discard or write-zeroes asks its disk's [`MirrorSlot`] (one atomic load when no job runs)
//! and, if a job runs, calls [`Mirror::guest_wrote`] before it answers the guest; a flush
//! calls [`Mirror::guest_flushed`]. A part the copy has passed is read again from the source
//! and written to the target on that I/O thread, so the guest hears of its write only once
//! both sides have it. Reading it back from the source (rather than the guest's buffers)
//! makes overlapping writes from several queues end on the target as they ended on the
//! source: those copies are serialized, and each reads after its own write completed.

pub mod job;
pub mod progress;
pub mod source;
pub mod target;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use progress::Progress;
use source::Source;
use target::{Target, PIECE_BYTES};

/// The copy's unit: a guest write to the chunk being copied makes the job copy this much
/// again. The bookkeeping's size is constant whatever the image's. Its pieces are copied
/// [`COPY_DEPTH`] at a time (job.rs), so it holds several of them: the workers are drained
/// at each chunk's end (the chunk is on the target before it counts as copied).
pub const CHUNK_BYTES: u64 = 8 << 20;
/// Pieces the job copies at once, each read and written by a worker (the job's thread and
/// threads started for the chunk) through a buffer of its own: reads overlap writes, and the target has several writes in
/// flight (a disk's O_DIRECT write of one piece at a time leaves it idle between them).
pub const COPY_DEPTH: usize = 4;
/// The alignment of the copy buffers (any O_DIRECT rule).
const BUFFER_ALIGN: usize = 4096;

/// A job's state, as query-jobs shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum JobState {
    /// Copying.
    Running = 0,
    /// Everything copied; guest writes go to both sides until job-complete or job-cancel.
    Ready = 1,
    /// Pivoted: the export serves the target.
    Completed = 2,
    /// The target (or reading the source) failed; the export goes on as before.
    Failed = 3,
    /// Stopped by job-cancel; the export goes on as before.
    Cancelled = 4,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Ready => "ready",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn of(n: u8) -> JobState {
        match n {
            0 => JobState::Running,
            1 => JobState::Ready,
            2 => JobState::Completed,
            3 => JobState::Failed,
            _ => JobState::Cancelled,
        }
    }

    /// Guest writes are copied to the target in this state.
    pub fn mirrors(self) -> bool {
        matches!(self, JobState::Running | JobState::Ready)
    }
}

/// Memory aligned for O_DIRECT, without `unsafe`: a vector a little larger than needed,
/// used from its first aligned byte.
pub struct AlignedBuffer {
    bytes: Vec<u8>,
}

impl AlignedBuffer {
    pub fn new(len: usize) -> AlignedBuffer {
        AlignedBuffer { bytes: vec![0u8; len + BUFFER_ALIGN] }
    }

    /// The first `len` aligned bytes (at most the length it was made with).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        let start = self.bytes.as_ptr().align_offset(BUFFER_ALIGN);
        &mut self.bytes[start..start + len]
    }
}

/// A mirror of one export's image: shared by its job thread and the export's I/O threads.
pub struct Mirror {
    /// The export's id (the job's).
    pub id: String,
    pub target_name: String,
    /// The export's image, read by the copy (the same open file, RBD handle or NBD export as
    /// the export's); None once the job ended, so that a pivot's old image closes.
    source: RwLock<Option<Source>>,
    size_bytes: u64,
    /// What reads and writes must be aligned to, on both sides.
    align_bytes: u64,
    /// None once the job ended: the target is closed (and unlocked).
    target: RwLock<Option<Target>>,
    progress: Mutex<Progress>,
    /// The guests' copy buffer, and the lock that serializes copying their writes again (and
    /// an exclusive chunk of the job's; see progress.rs).
    guest_copy: Mutex<AlignedBuffer>,
    state: AtomicU8,
    error: Mutex<Option<String>>,
    /// job-cancel asked for.
    cancel: AtomicBool,
    /// Bytes a second the copy may read (0: no limit).
    speed_bytes_per_s: AtomicU64,
    started: Instant,
    /// Nanoseconds from `started` to the end of the copy (0: not yet).
    copied_after_ns: AtomicU64,
}

/// What query-jobs shows of a job.
#[derive(Clone, Debug, serde::Serialize)]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub target: String,
    pub state: &'static str,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes copied a second, on average since the job started (until the copy completed).
    pub rate_bytes_per_s: u64,
    pub speed_bytes_per_s: u64,
    /// Bytes copied again: chunks a guest wrote to while they were copied, and guest writes
    /// to the copied part.
    pub recopied_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Mirror {
    /// A job copying `source` (of `size_bytes`, read with O_DIRECT rules of `source_align`)
    /// to `target`, which must be exactly as large.
    pub fn new(
        id: &str,
        source: Source,
        size_bytes: u64,
        source_align: u64,
        target: Target,
        speed_bytes_per_s: u64,
    ) -> Result<Mirror, String> {
        let target_name = target.describe();
        if target.size_bytes() != size_bytes {
            return Err(format!(
                "the target {target_name} has {} bytes, the export {size_bytes}: they must be equal",
                target.size_bytes()
            ));
        }
        let align_bytes = source_align.max(target.block_bytes()).max(512);
        if !align_bytes.is_power_of_two() || !CHUNK_BYTES.is_multiple_of(align_bytes) {
            return Err(format!("the target's block size {align_bytes} is not supported"));
        }
        if !size_bytes.is_multiple_of(align_bytes) {
            return Err(format!(
                "the export's size {size_bytes} is not a multiple of the target's {align_bytes}-byte blocks"
            ));
        }
        Ok(Mirror {
            id: id.to_string(),
            target_name,
            source: RwLock::new(Some(source)),
            size_bytes,
            align_bytes,
            target: RwLock::new(Some(target)),
            progress: Mutex::new(Progress::new(size_bytes, CHUNK_BYTES)),
            guest_copy: Mutex::new(AlignedBuffer::new(PIECE_BYTES)),
            state: AtomicU8::new(JobState::Running as u8),
            error: Mutex::new(None),
            cancel: AtomicBool::new(false),
            speed_bytes_per_s: AtomicU64::new(speed_bytes_per_s),
            started: Instant::now(),
            copied_after_ns: AtomicU64::new(0),
        })
    }

    pub fn state(&self) -> JobState {
        JobState::of(self.state.load(Ordering::Acquire))
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn info(&self) -> JobInfo {
        let (done, recopied) = {
            let p = self.progress();
            (p.copied_bytes(), p.recopied_bytes())
        };
        let ns = match self.copied_after_ns.load(Ordering::Acquire) {
            0 => self.started.elapsed().as_nanos() as u64,
            n => n,
        };
        JobInfo {
            id: self.id.clone(),
            kind: "mirror",
            target: self.target_name.clone(),
            state: self.state().name(),
            done_bytes: done,
            total_bytes: self.size_bytes,
            rate_bytes_per_s: (u128::from(done) * 1_000_000_000 / u128::from(ns.max(1))) as u64,
            speed_bytes_per_s: self.speed_bytes_per_s.load(Ordering::Relaxed),
            recopied_bytes: recopied,
            error: self.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Asks the job to stop; its thread leaves the export as it was.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// Switches a ready job's export to its target: `switch` gets the target (and the job's
    /// part in the export ends) once the export's rings stopped, and returns once they run on
    /// it. Err if the job is not ready or the switch failed (then the job fails and the
    /// export goes on with its source).
    pub fn complete(
        &self,
        switch: impl FnOnce(&dyn Fn() -> Option<Target>) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.state() != JobState::Ready {
            return Err(format!("the job is {}, not ready", self.state().name()));
        }
        let take = || {
            let target = self.take_target()?;
            // Writes the guest was answered for are durable on the target before it serves.
            match target.flush() {
                Ok(()) => Some(target),
                Err(why) => {
                    self.fail(why);
                    None
                }
            }
        };
        match switch(&take) {
            Ok(()) => {
                // Even if job-cancel came meanwhile: the export serves the target now.
                self.state.store(JobState::Completed as u8, Ordering::Release);
                tracing::info!(export = %self.id, "the export now serves {}", self.target_name);
                Ok(())
            }
            Err(why) => {
                let why = format!("the pivot failed: {why}");
                self.fail(why.clone());
                Err(why)
            }
        }
    }

    /// Moves to `to` unless the job already ended (the first end wins).
    fn set_state(&self, to: JobState) -> bool {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                JobState::of(n).mirrors().then_some(to as u8)
            })
            .is_ok()
    }

    /// The target or the source failed: the job fails, the guest's request does not.
    fn fail(&self, why: String) {
        if self.set_state(JobState::Failed) {
            tracing::error!(export = %self.id, "mirror to {} failed: {why}", self.target_name);
            *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        }
    }

    /// A guest write (or discard, or write-zeroes) of `bytes` at `offset` completed on the
    /// source; called by the I/O thread before it answers the guest. The part the copy has
    /// passed is copied again now (see the module's comment).
    pub fn guest_wrote(&self, offset: u64, bytes: u64) {
        if !self.state().mirrors() {
            return;
        }
        let mask = self.align_bytes - 1;
        let start = offset & !mask;
        let end = offset.saturating_add(bytes).saturating_add(mask) & !mask;
        let Some(passed) = self.progress().guest_wrote(start, end - start) else { return };
        let mut buffer = self.guest_copy.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(why) = self.copy(&mut buffer, passed) {
            self.fail(why);
        }
    }

    /// A guest flush completed on the source: the target flushes too (writes the guest was
    /// answered for are on it already).
    pub fn guest_flushed(&self) {
        if !self.state().mirrors() {
            return;
        }
        let target = self.target.read().unwrap_or_else(|p| p.into_inner());
        if let Some(Err(why)) = target.as_ref().map(Target::flush) {
            self.fail(why);
        }
    }

    /// The guest's rings all stopped for a migration's switch-over: no guest write comes
    /// any more, and each one answered is on the target (written before its answer). The
    /// target is flushed so that they are durable there too. The job goes on (ready, or
    /// copying): a migration that fails brings the guest back here, still mirrored; after one
    /// that completed, job-cancel ends it without another write to the target.
    pub fn switch_over(&self) {
        if !self.state().mirrors() {
            return;
        }
        let state = self.state().name();
        self.guest_flushed();
        match self.state() {
            JobState::Ready => tracing::info!(
                export = %self.id,
                "migration switch-over: the ready mirror flushed {}", self.target_name
            ),
            // The copy has not reached the end: a destination that runs on the target now
            // reads what was not copied yet. The VMM must migrate only once the job is ready.
            JobState::Running => tracing::error!(
                export = %self.id,
                "migration switch-over before the mirror to {} was ready ({state}): the \
                 target lacks what is not copied yet", self.target_name
            ),
            _ => {}
        }
    }

    /// Copies `range` (a guest's write, small, whose latency counts) of the source to the
    /// target through `buffer`, read as data without looking for holes (tmpfs answers
    /// SEEK_HOLE under the inode's lock, which other guest writes wait for); zeroes still
    /// become write-zeroes.
    fn copy(&self, buffer: &mut AlignedBuffer, range: Range<u64>) -> Result<(), String> {
        let target = self.target.read().unwrap_or_else(|p| p.into_inner());
        let source = self.source.read().unwrap_or_else(|p| p.into_inner());
        let (Some(target), Some(source)) = (target.as_ref(), source.as_ref()) else {
            return Ok(());
        };
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(PIECE_BYTES as u64) as usize;
            copy_piece(source, target, buffer, at, n)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Copies `n` bytes (at most [`PIECE_BYTES`]) at `at` through `buffer`: read from `source`,
/// then written to `target`, or zeroed there if they are all zeroes.
fn copy_piece(
    source: &Source,
    target: &Target,
    buffer: &mut AlignedBuffer,
    at: u64,
    n: usize,
) -> Result<(), String> {
    let piece = buffer.get(n);
    source.read_at(at, piece)?;
    if is_zero(piece) {
        target.write_zeroes(at, n as u64, piece)
    } else {
        target.write_at(at, piece)
    }
}

/// Whether `bytes` are all zeroes (eight at a time: the copy looks at every byte it reads).
fn is_zero(bytes: &[u8]) -> bool {
    let (words, rest) = bytes.split_at(bytes.len() & !7);
    words.chunks_exact(8).all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0)
        && rest.iter().all(|&b| b == 0)
}

/// Where an export's I/O threads find its mirror job, if one runs: one atomic load when none
/// does (the data path's cost of this feature), a lock and a reference count when one does.
#[derive(Default)]
pub struct MirrorSlot {
    active: AtomicBool,
    job: Mutex<Option<Arc<Mirror>>>,
}

impl MirrorSlot {
    /// The job whose writes are to be mirrored. SeqCst, paired with `install`: a guest write
    /// that completed before the job's copy began is read by the copy; one after it sees the
    /// job here.
    #[inline]
    pub fn job(&self) -> Option<Arc<Mirror>> {
        if !self.active.load(Ordering::SeqCst) {
            return None;
        }
        self.job.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs `job`, unless one runs already.
    pub fn install(&self, job: &Arc<Mirror>) -> Result<(), String> {
        let mut slot = self.job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = slot.as_ref() {
            return Err(format!("a mirror job to {} runs already", running.target_name));
        }
        *slot = Some(Arc::clone(job));
        self.active.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The job ended: guest writes are no longer copied.
    pub fn remove(&self) {
        let mut slot = self.job.lock().unwrap_or_else(|p| p.into_inner());
        self.active.store(false, Ordering::SeqCst);
        *slot = None;
    }
}
