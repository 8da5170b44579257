//! A mirror job's thread: copies the image chunk by chunk, at most `speed` bytes a second,
//! then waits, ready, for job-complete or job-cancel.
//!
//! A thread of its own, not the I/O threads: the copy reads and writes a mebibyte at a time
//! with blocking calls (the target's client is blocking) and sleeps to keep to its speed;
//! either would stall every other queue an I/O thread serves. The I/O threads only copy the
//! guest's own writes again, which the guest waits for anyway.
//!
//! A chunk's pieces are copied by [`COPY_DEPTH`] workers at once (the job's thread and
//! threads started for the chunk), each reading and writing one piece at a time through a
//! buffer of its own, so reads go on while writes land and the target has several writes in
//! flight. Threads rather than io_uring on the job's
//! thread: every target (a file, an NBD connection, librbd) and source has a blocking call
//! already, the same for all of them, and the workers live for one chunk (scoped: they
//! borrow the job's buffers, and no request outlives the chunk's bookkeeping).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::progress::Copied;
use super::target::PIECE_BYTES;
use super::{copy_piece, AlignedBuffer, JobState, Mirror, MirrorSlot, COPY_DEPTH};

/// How often a ready (or speed-limited) job looks for job-complete and job-cancel.
const WAKE_MS: u64 = 20;

impl Mirror {
    /// Takes the target out of the job (for the pivot): from now on the job writes nothing.
    pub fn take_target(&self) -> Option<super::Target> {
        self.target.write().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The job's thread: copy, then wait, ready, until job-complete or job-cancel ends the
    /// job; `slot` is emptied when it ends, the source let go, and the target closed unless
    /// the pivot took it.
    pub fn run(self: Arc<Self>, slot: Arc<MirrorSlot>) {
        let mut buffers: Vec<AlignedBuffer> =
            (0..COPY_DEPTH).map(|_| AlignedBuffer::new(PIECE_BYTES)).collect();
        if let Err(why) = self.copy_all(&mut buffers) {
            self.fail(why);
        }
        if self.state() == JobState::Running && !self.cancel.load(Ordering::Acquire) {
            self.copied_after_ns
                .store(self.started.elapsed().as_nanos().max(1) as u64, Ordering::Release);
            if self.set_state(JobState::Ready) {
                tracing::info!(export = %self.id, "mirror to {} is ready", self.target_name);
            }
        }
        while self.state() == JobState::Ready && !self.cancel.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(WAKE_MS));
        }
        if self.cancel.load(Ordering::Acquire) && self.set_state(JobState::Cancelled) {
            tracing::info!(export = %self.id, "mirror to {} cancelled", self.target_name);
        }
        slot.remove();
        drop(self.source.write().unwrap_or_else(|p| p.into_inner()).take());
        // Closes the target (and gives its lock up) unless the pivot took it.
        drop(self.take_target());
    }

    /// The copy, until it is complete, cancelled or failed.
    fn copy_all(&self, buffers: &mut [AlignedBuffer]) -> Result<(), String> {
        let mut read_bytes = 0u64;
        let mut extent = (0, 0);
        let began = Instant::now();
        loop {
            if self.cancel.load(Ordering::Acquire) || !self.state().mirrors() {
                return Ok(());
            }
            let Some(chunk) = self.progress().begin() else { return Ok(()) };
            if chunk.exclusive {
                // Guest writes to it wait for this lock and copy it again themselves.
                let _guests = self.guest_copy.lock().unwrap_or_else(|p| p.into_inner());
                read_bytes += self.copy_chunk(buffers, chunk.range, &mut extent)?;
            } else {
                read_bytes += self.copy_chunk(buffers, chunk.range, &mut extent)?;
            }
            if self.progress().finish() == Copied::Again {
                continue;
            }
            self.keep_to_speed(read_bytes, began);
        }
    }

    /// Copies `range` of the source to the target: holes as write-zeroes, data in pieces
    /// copied by up to one worker per buffer. Returns the bytes read. The source's holes are
    /// found once per extent, and the last data extent found is kept in `extent`: a seek
    /// costs the file system a walk to the extent's end (tmpfs walks its pages under the
    /// inode's lock, which the guest's writes wait for), so it is not done per piece.
    fn copy_chunk(
        &self,
        buffers: &mut [AlignedBuffer],
        range: Range<u64>,
        extent: &mut (u64, u64),
    ) -> Result<u64, String> {
        let target = self.target.read().unwrap_or_else(|p| p.into_inner());
        let source = self.source.read().unwrap_or_else(|p| p.into_inner());
        let (Some(target), Some(source)) = (target.as_ref(), source.as_ref()) else {
            return Ok(0);
        };
        let Some(zeroes_buffer) = buffers.first_mut() else { return Ok(0) };
        let zeroes = zeroes_buffer.get(PIECE_BYTES);
        zeroes.fill(0);
        let mut pieces = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let known = *extent;
            let (data_start, data_end) = if known.0 <= at && at < known.1 {
                // A data extent found before stays data: at worst it reads zeroes a guest
                // discarded since (written as zeroes). Holes are never taken from it.
                known
            } else {
                let found = source.next_data(at, self.size_bytes)?;
                *extent = found.unwrap_or((self.size_bytes, self.size_bytes));
                *extent
            };
            let (data_start, data_end) = (data_start.min(range.end), data_end.min(range.end));
            // Extents from the file system are on its blocks, which our alignment divides.
            let data_start = (data_start & !(self.align_bytes - 1)).max(at);
            if data_start > at {
                target.write_zeroes(at, data_start - at, zeroes)?;
            }
            at = data_start;
            // At least one block: a file system that says an empty extent still gets read.
            let data_end = data_end
                .next_multiple_of(self.align_bytes)
                .max(at + self.align_bytes)
                .min(range.end);
            while at < data_end {
                let n = (data_end - at).min(PIECE_BYTES as u64) as usize;
                pieces.push((at, n));
                at += n as u64;
            }
        }
        copy_pieces(source, target, buffers, &pieces)?;
        Ok(pieces.iter().map(|&(_, n)| n as u64).sum())
    }

    /// Sleeps until `read_bytes` since `began` are within the speed (looking for job-cancel
    /// meanwhile).
    fn keep_to_speed(&self, read_bytes: u64, began: Instant) {
        loop {
            let speed = self.speed_bytes_per_s.load(Ordering::Relaxed);
            if speed == 0 || self.cancel.load(Ordering::Acquire) {
                return;
            }
            let due = Duration::from_nanos(
                (u128::from(read_bytes) * 1_000_000_000 / u128::from(speed)) as u64,
            );
            let left = due.saturating_sub(began.elapsed());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(WAKE_MS)));
        }
    }
}

/// Copies `pieces` (offset, bytes) with one worker per buffer (fewer if there are fewer
/// pieces): this thread and threads started for the chunk, each taking the next piece not
/// taken; the first error stops the others and is returned once every worker ended.
fn copy_pieces(
    source: &super::Source,
    target: &super::Target,
    buffers: &mut [AlignedBuffer],
    pieces: &[(u64, usize)],
) -> Result<(), String> {
    let Some((mine, others)) = buffers.split_first_mut() else { return Ok(()) };
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let work = |buffer: &mut AlignedBuffer| -> Result<(), String> {
        while !stop.load(Ordering::Relaxed) {
            let Some(&(at, n)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            copy_piece(source, target, buffer, at, n).inspect_err(|_| {
                stop.store(true, Ordering::Relaxed);
            })?;
        }
        Ok(())
    };
    let work = &work;
    std::thread::scope(|scope| {
        let helpers: Vec<_> = others
            .iter_mut()
            .take(pieces.len().saturating_sub(1))
            .map(|buffer| {
                std::thread::Builder::new()
                    .name("blkplane-mirror".into())
                    .spawn_scoped(scope, move || work(buffer))
            })
            .collect();
        let mut result = work(mine);
        for helper in helpers {
            let ended = match helper {
                Ok(h) => h.join().unwrap_or_else(|_| Err("a copy worker panicked".into())),
                Err(e) => Err(format!("starting a copy worker: {e}")),
            };
            result = result.and(ended);
        }
        result
    })
}
