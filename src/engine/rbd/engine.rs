//! A queue's requests to an RBD image through librbd's asynchronous calls.
//!
//! librbd finishes requests on its own threads and calls back there. The callback does three
//! stores and no allocation: the result into the tag's slot, the tag's bit into a ready
//! bitmap, and a count into the queue's eventfd, which is the engine's completion descriptor.
//! The I/O thread takes the bitmap's words with one atomic swap each when it reaps, and reads
//! the eventfd once per round that found completions (each completion wrote one count, so
//! none is left behind to keep the thread awake, and none is consumed before its bit is set).

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::cluster::RbdImage;
use super::ffi::*;
use crate::engine::{Engine, IoOp};
use crate::virtq::GuestIov;

/// One tag's callback argument: where its completion goes.
struct Slot {
    owner: *const Completions,
    tag: u16,
}

/// What librbd's threads write and the I/O thread reads.
struct Completions {
    event: EventFd,
    ready: Box<[AtomicU64]>,
    results: Box<[AtomicI64]>,
    slots: Box<[Slot]>,
}

// SAFETY: Slot's pointer is to the Completions that holds it (set once at creation); every
// other field is atomic or an eventfd.
unsafe impl Send for Completions {}
// SAFETY: as above.
unsafe impl Sync for Completions {}

/// librbd's completion callback (on a librbd thread).
unsafe extern "C" fn rbd_done(c: RbdCompletionT, arg: *mut c_void) {
    // SAFETY: arg is the Slot given at queue time, inside Completions, which lives until every
    // request is reaped (the engine keeps it, and leaks it if dropped with requests out).
    let slot = unsafe { &*(arg as *const Slot) };
    // SAFETY: as above.
    let shared = unsafe { &*slot.owner };
    // SAFETY: c is this request's completion, released here and never used again.
    let result = unsafe {
        let r = rbd_aio_get_return_value(c);
        rbd_aio_release(c);
        r
    };
    let tag = usize::from(slot.tag);
    shared.results[tag].store(result as i64, Ordering::Relaxed);
    shared.ready[tag / 64].fetch_or(1 << (tag % 64), Ordering::Release);
    let _ = shared.event.write(1);
}

pub struct RbdEngine {
    image: Arc<RbdImage>,
    shared: Arc<Completions>,
    /// Per tag: a write the guest wants durable on a cached image; its flush follows.
    then_flush: Box<[bool]>,
    /// Per tag: a write's byte count, which is its result once done (librbd answers a write
    /// with 0), kept while its flush runs.
    write_result: Box<[Option<i32>]>,
    in_flight: usize,
    /// Completions reaped whose eventfd count was not read yet.
    events_owed: u64,
}

impl RbdEngine {
    pub fn new(image: Arc<RbdImage>, queue_size: u16) -> io::Result<RbdEngine> {
        let size = usize::from(queue_size);
        let event = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?;
        let shared = Arc::new_cyclic(|me| Completions {
            event,
            ready: (0..size.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            results: (0..size).map(|_| AtomicI64::new(0)).collect(),
            slots: (0..size).map(|tag| Slot { owner: me.as_ptr(), tag: tag as u16 }).collect(),
        });
        Ok(RbdEngine {
            image,
            shared,
            then_flush: vec![false; size].into_boxed_slice(),
            write_result: vec![None; size].into_boxed_slice(),
            in_flight: 0,
            events_owed: 0,
        })
    }

    /// Starts one librbd request for `tag`.
    fn start(&mut self, tag: u16, op: &IoOp<'_>) -> io::Result<()> {
        let slot = &self.shared.slots[usize::from(tag)];
        let mut c: RbdCompletionT = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the argument (the tag's slot) outlives the request.
        let rc = unsafe {
            rbd_aio_create_completion(slot as *const Slot as *mut c_void, Some(rbd_done), &mut c)
        };
        if rc < 0 {
            return Err(io::Error::from_raw_os_error(-rc));
        }
        let image = self.image.handle;
        let iovcnt = |iov: &[GuestIov]| i32::try_from(iov.len()).unwrap_or(i32::MAX);
        // SAFETY: an open image; the iovecs point into guest memory that stays mapped until
        // the tag is reaped (Engine::queue's contract); c is ours until librbd takes it.
        let rc = unsafe {
            match *op {
                IoOp::Read { offset, iov } => {
                    rbd_aio_readv(image, GuestIov::as_iovec_ptr(iov), iovcnt(iov), offset, c)
                }
                IoOp::Write { offset, iov, .. } => {
                    rbd_aio_writev(image, GuestIov::as_iovec_ptr(iov), iovcnt(iov), offset, c)
                }
                IoOp::Flush => rbd_aio_flush(image, c),
                IoOp::Discard { offset, bytes } => rbd_aio_discard(image, offset, bytes, c),
                IoOp::WriteZeroes { offset, bytes, unmap } => {
                    let flags = if unmap { 0 } else { RBD_WRITE_ZEROES_FLAG_THICK_PROVISION };
                    rbd_aio_write_zeroes(image, offset, bytes as usize, c, flags, 0)
                }
            }
        };
        if rc < 0 {
            // SAFETY: librbd refused the request, so the completion is still ours alone.
            unsafe { rbd_aio_release(c) };
            return Err(io::Error::from_raw_os_error(-rc));
        }
        Ok(())
    }
}

impl RbdEngine {
    /// A completion taken from the bitmap: answered, or followed by its flush.
    fn finish_one(&mut self, tag: usize, on_complete: &mut impl FnMut(u16, i32)) {
        let result = self.shared.results[tag].load(Ordering::Relaxed);
        let result =
            i32::try_from(result).unwrap_or(if result < 0 { -libc::EIO } else { i32::MAX });
        if self.then_flush[tag] && result >= 0 {
            // The write is in librbd's cache; the guest wants it durable.
            self.then_flush[tag] = false;
            if let Err(e) = self.start(tag as u16, &IoOp::Flush) {
                self.write_result[tag] = None;
                self.in_flight -= 1;
                on_complete(tag as u16, -e.raw_os_error().unwrap_or(libc::EIO));
            }
            return;
        }
        let written = self.write_result[tag].take();
        let result = match written {
            Some(w) if result >= 0 => w,
            _ => result,
        };
        self.then_flush[tag] = false;
        self.in_flight -= 1;
        on_complete(tag as u16, result);
    }
}

impl Drop for RbdEngine {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // librbd still holds pointers into the completion slots: they must outlive it.
            // (The I/O thread drains a queue before dropping its engine; this is a last guard.)
            std::mem::forget(Arc::clone(&self.shared));
            std::mem::forget(Arc::clone(&self.image));
        }
    }
}

impl Engine for RbdEngine {
    unsafe fn queue(&mut self, tag: u16, op: IoOp<'_>) -> io::Result<()> {
        let index = usize::from(tag);
        if index >= self.then_flush.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.start(tag, &op)?;
        self.then_flush[index] = matches!(op, IoOp::Write { dsync: true, .. }) && self.image.cached;
        self.write_result[index] = match op {
            IoOp::Write { iov, .. } => {
                Some(i32::try_from(iov.iter().map(|i| i.len()).sum::<usize>()).unwrap_or(i32::MAX))
            }
            _ => None,
        };
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        // librbd sends each request when it is queued.
        Ok(())
    }

    fn reap(&mut self, mut on_complete: impl FnMut(u16, i32)) {
        if self.in_flight == 0 && self.events_owed == 0 {
            return;
        }
        let any = self.shared.ready.iter().any(|w| w.load(Ordering::Relaxed) != 0);
        if !any && self.events_owed == 0 {
            return;
        }
        // The eventfd first, then the bits: a count read here belongs to a completion whose
        // bit was set before it was written, which the swaps below see; a completion that
        // writes after this read leaves the eventfd readable and wakes the thread again.
        let counted = self.shared.event.read().unwrap_or(0);
        let mut found = 0u64;
        for word in 0..self.shared.ready.len() {
            let mut bits = self.shared.ready[word].swap(0, Ordering::Acquire);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                found += 1;
                self.finish_one(word * 64 + bit, &mut on_complete);
            }
        }
        self.events_owed = (self.events_owed + found).saturating_sub(counted);
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.shared.event.as_raw_fd())
    }
}
