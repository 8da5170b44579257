//! A mirror job's thread: copies the image chunk by chunk, at most `speed` bytes a second,
//! then waits, ready, for job-complete or job-cancel.
//!
//! A thread of its own, not the I/O threads: the copy reads and writes a mebibyte at a time
//! with blocking calls (the target's client is blocking) and sleeps to keep to its speed;
//! either would stall every other queue an I/O thread serves. The I/O threads only copy the
//! guest's own writes again, which the guest waits for anyway.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::progress::Copied;
use super::target::PIECE_BYTES;
use super::{AlignedBuffer, JobState, Mirror, MirrorSlot};

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
        let mut buffer = AlignedBuffer::new(PIECE_BYTES);
        if let Err(why) = self.copy_all(&mut buffer) {
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
    fn copy_all(&self, buffer: &mut AlignedBuffer) -> Result<(), String> {
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
                let mut guests = self.guest_copy.lock().unwrap_or_else(|p| p.into_inner());
                read_bytes += self.copy(&mut guests, chunk.range, Some(&mut extent))?;
            } else {
                read_bytes += self.copy(buffer, chunk.range, Some(&mut extent))?;
            }
            if self.progress().finish() == Copied::Again {
                continue;
            }
            self.keep_to_speed(read_bytes, began);
        }
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
