//! The io_uring engine: vectored reads and writes straight between the backing file and
//! guest memory, fdatasync for FLUSH, fallocate for DISCARD and WRITE_ZEROES.
//!
//! One ring per I/O thread ([`SharedRing`]), shared by every queue the thread serves, so that
//! they share one reap and one completion descriptor; the loop submits each queue's batch
//! as soon as it is fetched ([`SUBMIT_CHUNK`] entries per call).
//! Each queue drives it through its own [`UringEngine`] handle: an operation's `user_data`
//! carries the queue's number on the ring beside the slot tag, and whichever handle reaps
//! first sorts every completion into its queue's preallocated list, from which each handle
//! takes its own.
//!
//! Reads and writes of up to [`INLINE_MAX_BYTES`] on a regular file on tmpfs are done on the
//! I/O thread itself, with one `preadv2`/`pwritev2`, and their results go straight into the
//! queue's list. tmpfs cannot try an operation without waiting (no `RWF_NOWAIT`), so io_uring
//! hands every one of them to a kernel worker: a wake-up, a context switch and task work to
//! post the completion, where the copy itself takes a microsecond. tmpfs waits for no device
//! (only for memory: a page swapped out, or reclaim for a write), so the copy is what the
//! I/O thread pays for. Larger operations, and those past [`INLINE_ROUND_BYTES`] in one
//! round, keep going to the workers, so that the thread's other queues wait for little.
//! (A device node's `fstatfs` says tmpfs too, from devtmpfs: only regular files qualify.)

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use io_uring::{opcode, squeue, types, IoUring};

use super::{Engine, IoOp};
use crate::virtq::GuestIov;

/// An I/O thread's ring. Lives on that thread only (`Rc`): an io_uring set up with
/// SINGLE_ISSUER accepts submissions from the thread that made it alone.
pub struct SharedRing {
    state: RefCell<RingState>,
    fd: RawFd,
}

struct RingState {
    ring: IoUring,
    /// Entries pushed since the last submit.
    unsubmitted: u32,
    /// Bytes the queues may still copy inline in this round of the I/O thread.
    inline_left: u64,
    /// Completions reaped but not yet taken, per queue number: (tag, result). Each list has
    /// room for its queue's size (a tag has one operation in flight at a time), so sorting
    /// never allocates.
    done: Vec<Option<Vec<(u16, i32)>>>,
}

impl SharedRing {
    /// A ring with `sq_entries` submission entries (rounded up to a power of two) and a
    /// completion queue four times that. More completions than that at once are held by the
    /// kernel (IORING_FEAT_NODROP) until reaped, never lost.
    pub fn new(sq_entries: u32) -> io::Result<Rc<SharedRing>> {
        let entries = sq_entries.clamp(1, 4096).next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_single_issuer()
            // No COOP_TASKRUN: completions that finish in the kernel's workers then interrupt
            // us to post their CQE, so a polling I/O thread sees them without a system call.
            .build(entries)?;
        let fd = ring.as_raw_fd();
        Ok(Rc::new(SharedRing {
            state: RefCell::new(RingState {
                ring,
                unsubmitted: 0,
                inline_left: INLINE_ROUND_BYTES,
                done: Vec::new(),
            }),
            fd,
        }))
    }

    /// The ring's descriptor: it polls readable while completions wait.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Whether entries were pushed that the kernel has not taken yet.
    pub fn has_unsubmitted(&self) -> bool {
        self.state.borrow().unsubmitted > 0
    }

    /// Whether completions were sorted into a queue's list and not taken yet.
    pub fn has_sorted(&self) -> bool {
        self.state.borrow().done.iter().flatten().any(|list| !list.is_empty())
    }

    /// A round of the I/O thread begins: its queues may copy [`INLINE_ROUND_BYTES`] inline
    /// between them. (Not renewed by a submit: the loop submits queue by queue.)
    pub fn begin_round(&self) {
        self.state.borrow_mut().inline_left = INLINE_ROUND_BYTES;
    }

    /// Submits everything pushed since the last call, [`SUBMIT_CHUNK`] entries per system
    /// call (none if nothing was pushed).
    pub fn submit(&self) -> io::Result<()> {
        self.state.borrow_mut().submit()
    }

    /// Takes every completion off the ring into its queue's list.
    fn sort_completions(state: &mut RingState) {
        let RingState { ring, done, .. } = state;
        let flush = held_back_flags(ring);
        if flush != 0 {
            // A submit would flush them too, but a thread with nothing to submit would
            // otherwise wake for them forever.
            // SAFETY: no argument is passed (None).
            let _ = unsafe { ring.submitter().enter::<libc::sigset_t>(0, 0, flush, None) };
        }
        for cqe in ring.completion() {
            let data = cqe.user_data();
            let queue = (data >> 16) as usize;
            if let Some(Some(list)) = done.get_mut(queue) {
                list.push((data as u16, cqe.result()));
            }
        }
    }

    /// A queue number for a queue of `size` entries, with its completion list.
    fn register(&self, size: u16) -> u16 {
        let mut state = self.state.borrow_mut();
        let list = Some(Vec::with_capacity(usize::from(size)));
        match state.done.iter().position(Option::is_none) {
            Some(i) => {
                state.done[i] = list;
                i as u16
            }
            None => {
                state.done.push(list);
                (state.done.len() - 1) as u16
            }
        }
    }
}

/// Most entries one `io_uring_enter` hands to the kernel. The kernel plugs the block
/// requests of one call and starts them only when the call ends, so a round's whole batch
/// (30 reads at depth 32) reached the disk about 75 µs after its first one was ready, and
/// the disk idled meanwhile: on this machine's ext4, depth 32, 4 at a time gave 82k IOPS
/// against 68k for the whole batch at once (BENCHMARKS.md, issue 27), and 1 or 2 at a time
/// no more than 4, for more system calls.
pub const SUBMIT_CHUNK: u32 = 4;

/// `io_uring_enter`'s flag to flush completions the kernel holds because the CQ was full.
const IORING_ENTER_GETEVENTS: u32 = 1;

/// The `io_uring_enter` flags that bring back the completions the kernel holds because the CQ
/// was full (IORING_FEAT_NODROP): they come only with GETEVENTS. None when nothing is held.
fn held_back_flags(ring: &mut IoUring) -> u32 {
    if ring.submission().cq_overflow() {
        IORING_ENTER_GETEVENTS
    } else {
        0
    }
}

impl RingState {
    /// Hands every pushed entry to the kernel, [`SUBMIT_CHUNK`] per system call.
    fn submit(&mut self) -> io::Result<()> {
        while self.unsubmitted > 0 {
            let chunk = self.unsubmitted.min(SUBMIT_CHUNK);
            let flags = held_back_flags(&mut self.ring);
            // SAFETY: no argument is passed (None); the entries being submitted were pushed
            // under the contract of Engine::queue, which keeps what they point to valid.
            let entered =
                unsafe { self.ring.submitter().enter::<libc::sigset_t>(chunk, 0, flags, None) };
            match entered {
                // The kernel may take fewer than we asked; the rest stays queued.
                Ok(_) => {
                    let left = self.ring.submission().len() as u32;
                    let took_all = left + chunk <= self.unsubmitted;
                    self.unsubmitted = left;
                    if !took_all {
                        return Ok(());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EAGAIN/EBUSY: the CQ is under pressure; the caller reaps and retries.
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Largest read or write done on the I/O thread on a tmpfs file (the module comment says
/// why): about 10 µs of copying.
pub const INLINE_MAX_BYTES: u64 = 64 << 10;
/// Most bytes a thread copies inline in one round, all its queues together (about 30 µs):
/// the rest of the round's operations go through the ring, so the queues fetched after a
/// burst of inline copies wait no longer than that.
pub const INLINE_ROUND_BYTES: u64 = 256 << 10;

/// One queue's handle on its thread's ring, for operations on one backing file.
pub struct UringEngine {
    ring: Rc<SharedRing>,
    fd: RawFd,
    /// This queue's number on the ring (the high bits of user_data).
    queue: u16,
    /// Small reads and writes are done inline (the file is a regular file on tmpfs).
    inline: bool,
}

impl UringEngine {
    /// A handle on `ring` for a queue of at most `queue_size` operations in flight on `fd`,
    /// doing small reads and writes inline if `on_tmpfs` (`Backing::on_tmpfs`). The caller
    /// keeps `fd` open for the engine's lifetime.
    pub fn on(ring: &Rc<SharedRing>, fd: RawFd, queue_size: u16, on_tmpfs: bool) -> UringEngine {
        let queue = ring.register(queue_size);
        UringEngine { ring: Rc::clone(ring), fd, queue, inline: on_tmpfs }
    }

    /// Does `op` at once if it is a small read or write on tmpfs, and returns its result (the
    /// byte count, or a negative errno); `None` if it goes through the ring.
    ///
    /// # Safety
    /// As for [`Engine::queue`]: the iovecs and the guest memory they name are valid.
    unsafe fn try_inline(&self, op: &IoOp<'_>) -> Option<i32> {
        if !self.inline {
            return None;
        }
        let (offset, iov, flags, write) = match *op {
            IoOp::Read { offset, iov } => (offset, iov, 0, false),
            IoOp::Write { offset, iov, dsync } => {
                (offset, iov, if dsync { libc::RWF_DSYNC } else { 0 }, true)
            }
            _ => return None,
        };
        let bytes = GuestIov::total_len(iov);
        {
            let mut state = self.ring.state.borrow_mut();
            if bytes > INLINE_MAX_BYTES || bytes > state.inline_left {
                return None;
            }
            state.inline_left -= bytes;
        }
        let (ptr, count) = (GuestIov::as_iovec_ptr(iov), iov.len() as libc::c_int);
        loop {
            // SAFETY: the caller guarantees the iovecs and the guest buffers they name are
            // valid (the contract of Engine::queue), and the call ends before we return, so
            // nothing refers to them afterwards; the fd stays open for the engine's lifetime.
            let done = unsafe {
                if write {
                    libc::pwritev2(self.fd, ptr, count, offset as libc::off_t, flags)
                } else {
                    libc::preadv2(self.fd, ptr, count, offset as libc::off_t, flags)
                }
            };
            if done >= 0 {
                return Some(done as i32);
            }
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            if errno != libc::EINTR {
                return Some(-errno);
            }
        }
    }

    fn entry(&self, tag: u16, op: IoOp<'_>) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        let entry = match op {
            IoOp::Read { offset, iov } => {
                opcode::Readv::new(fd, GuestIov::as_iovec_ptr(iov), iov.len() as u32)
                    .offset(offset)
                    .build()
            }
            IoOp::Write { offset, iov, dsync } => {
                opcode::Writev::new(fd, GuestIov::as_iovec_ptr(iov), iov.len() as u32)
                    .offset(offset)
                    .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            IoOp::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            IoOp::Discard { offset, bytes } => opcode::Fallocate::new(fd, bytes)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoOp::WriteZeroes { offset, bytes, unmap } => {
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(fd, bytes).offset(offset).mode(mode).build()
            }
        };
        entry.user_data(u64::from(self.queue) << 16 | u64::from(tag))
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The queue's number is free again once it has nothing in flight (the I/O thread
        // drops a queue only then).
        if let Some(slot) = self.ring.state.borrow_mut().done.get_mut(usize::from(self.queue)) {
            *slot = None;
        }
    }
}

impl Engine for UringEngine {
    unsafe fn queue(&mut self, tag: u16, op: IoOp<'_>) -> io::Result<()> {
        // SAFETY: passed on from our caller (the contract of Engine::queue).
        if let Some(result) = unsafe { self.try_inline(&op) } {
            let mut state = self.ring.state.borrow_mut();
            let Some(Some(list)) = state.done.get_mut(usize::from(self.queue)) else {
                // Never so (the list lives as long as this handle); answered as failed rather
                // than never.
                return Err(io::Error::other("the queue has no completion list on its ring"));
            };
            // Room for it: the list holds one entry per tag, and this tag had none.
            list.push((tag, result));
            return Ok(());
        }
        let entry = self.entry(tag, op);
        let mut state = self.ring.state.borrow_mut();
        for _ in 0..2 {
            // SAFETY: the caller guarantees the iovec array and the guest buffers stay valid
            // until this tag is reaped (the contract of Engine::queue); the fd stays open
            // for the engine's lifetime (the contract of on()).
            if unsafe { state.ring.submission().push(&entry) }.is_ok() {
                state.unsubmitted += 1;
                return Ok(());
            }
            // The SQ is full: hand what is there to the kernel and try once more.
            state.submit()?;
        }
        Err(io::Error::other("io_uring submission queue stays full"))
    }

    fn submit(&mut self) -> io::Result<()> {
        self.ring.submit()
    }

    fn reap(&mut self, mut on_complete: impl FnMut(u16, i32)) {
        let mut state = self.ring.state.borrow_mut();
        SharedRing::sort_completions(&mut state);
        let Some(Some(list)) = state.done.get_mut(usize::from(self.queue)) else { return };
        // Taken out while the callbacks run (they answer requests; follow-ups are queued
        // after the reap, since the reap holds the engine).
        let mut mine = std::mem::take(list);
        drop(state);
        for (tag, result) in mine.drain(..) {
            on_complete(tag, result);
        }
        if let Some(Some(list)) = self.ring.state.borrow_mut().done.get_mut(usize::from(self.queue))
        {
            // Give the (empty, still allocated) list back. The callbacks answer requests and
            // queue follow-ups but never reap, so nothing was sorted into the list meanwhile;
            // should that change, what was sorted is kept rather than dropped.
            if list.is_empty() {
                *list = mine;
            }
        }
    }

    fn has_unsubmitted(&self) -> bool {
        self.ring.has_unsubmitted()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        // The ring's own fd polls readable while completions wait in the CQ.
        Some(self.ring.fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtq::testing::guest_ram;
    use crate::virtq::GuestMemory;

    /// A 1 MiB image in `dir`, 1 MiB of guest RAM, and the iovecs of its first `bytes`.
    fn image_and_buffer(dir: &str, bytes: u32) -> (std::fs::File, GuestMemory, Vec<GuestIov>) {
        let image = tempfile::tempfile_in(dir).unwrap();
        image.set_len(1 << 20).unwrap();
        let (_ram_fd, mem) = guest_ram(1 << 20);
        let mut iovs = Vec::new();
        assert!(mem.translate(0, bytes, |iov| {
            iovs.push(iov);
            true
        }));
        (image, mem, iovs)
    }

    /// The inline budget is the round's, for all the thread's queues together: a queue's
    /// submit in the middle of the round (the loop submits queue by queue) does not renew it.
    #[test]
    fn a_rounds_queues_share_one_inline_budget() {
        let (file, _ram, iovs) = image_and_buffer("/dev/shm", INLINE_MAX_BYTES as u32);
        let read = IoOp::Read { offset: 0, iov: &iovs };
        let ring = SharedRing::new(64).unwrap();
        let fd = file.as_raw_fd();
        let mut a = UringEngine::on(&ring, fd, 16, true);
        let mut b = UringEngine::on(&ring, fd, 16, true);
        let on_ring = || ring.state.borrow().unsubmitted;

        ring.begin_round();
        for tag in 0..(INLINE_ROUND_BYTES / INLINE_MAX_BYTES) as u16 {
            // SAFETY: `iovs` and the guest RAM outlive the engines; b's read is reaped below.
            unsafe { a.queue(tag, read) }.unwrap();
        }
        assert_eq!(on_ring(), 0, "the round's first 256 KiB are copied inline");
        a.submit().unwrap();
        // SAFETY: as above.
        unsafe { b.queue(0, read) }.unwrap();
        assert_eq!(on_ring(), 1, "another queue's read past the budget goes to the ring");
        b.submit().unwrap();
        let mut done = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.is_empty() && std::time::Instant::now() < deadline {
            b.reap(|tag, result| done.push((tag, result)));
        }
        assert_eq!(done, [(0, INLINE_MAX_BYTES as i32)]);

        ring.begin_round();
        // SAFETY: as above.
        unsafe { b.queue(1, read) }.unwrap();
        assert_eq!(on_ring(), 0, "a new round copies inline again");
    }

    /// More completions than the CQ holds are kept by the kernel and reaped later, none lost,
    /// by a thread that has nothing more to submit.
    #[test]
    fn completions_past_a_full_cq_are_all_reaped() {
        let (file, _ram, iovs) = image_and_buffer("/var/tmp", 4096);
        let read = IoOp::Read { offset: 0, iov: &iovs };
        // 4 SQ entries and 16 CQ entries, for 64 reads in flight.
        let ring = SharedRing::new(4).unwrap();
        let mut engine = UringEngine::on(&ring, file.as_raw_fd(), 64, false);
        for tag in 0..64 {
            // SAFETY: `iovs` and the guest RAM outlive the engine; every read is reaped below.
            unsafe { engine.queue(tag, read) }.unwrap();
        }
        engine.submit().unwrap();
        let mut done = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.len() < 64 && std::time::Instant::now() < deadline {
            engine.reap(|tag, result| done.push((tag, result)));
        }
        done.sort_unstable();
        let all: Vec<(u16, i32)> = (0..64).map(|tag| (tag, 4096)).collect();
        assert_eq!(done, all);
    }
}
