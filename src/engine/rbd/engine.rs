//! A queue's requests to an RBD image through librbd's asynchronous calls.
//!
//! librbd finishes requests on its own threads and calls back there. The callback stores the
//! result into the tag's slot and sets the tag's bit in a ready bitmap, without a lock or an
//! allocation; the I/O thread takes the bitmap's words with one atomic swap each when it
//! reaps. Only while the I/O thread sleeps (`arm` .. `disarm`) does the callback also write
//! the queue's eventfd, the engine's completion descriptor, to wake it: a thread that is
//! polling or busy costs nobody a system call per completion. The flag and the bits are a
//! Dekker pair (each side writes its own, then reads the other's, all SeqCst): either the
//! thread sees the bit and does not sleep, or the callback sees the flag and wakes it.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::cluster::{RbdHandle, RbdImage, EBLOCKLISTED};
use super::ffi::{Ceph, RbdCompletionT, RBD_WRITE_ZEROES_FLAG_THICK_PROVISION};
use crate::engine::{Engine, IoOp};
use crate::virtq::GuestIov;

/// One tag's callback argument: where its completion goes.
struct Slot {
    owner: *const Completions,
    tag: u16,
}

/// What librbd's threads write and the I/O thread reads.
struct Completions {
    /// The Ceph functions (the callback releases the completion with them).
    ceph: &'static Ceph,
    event: EventFd,
    /// The I/O thread sleeps, or is about to: completions must write `event`.
    sleeping: AtomicBool,
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
        let r = (shared.ceph.rbd_aio_get_return_value)(c);
        (shared.ceph.rbd_aio_release)(c);
        r
    };
    let tag = usize::from(slot.tag);
    shared.results[tag].store(result as i64, Ordering::Relaxed);
    shared.ready[tag / 64].fetch_or(1 << (tag % 64), Ordering::SeqCst);
    if shared.sleeping.load(Ordering::SeqCst) {
        let _ = shared.event.write(1);
    }
}

pub struct RbdEngine {
    handle: Arc<RbdHandle>,
    image: Arc<RbdImage>,
    /// The handle's generation `image` is of.
    generation: u64,
    /// Images replaced while requests were in flight on them: kept open until they drain.
    retired: Vec<Arc<RbdImage>>,
    shared: Arc<Completions>,
    /// Per tag: a write the guest wants durable on a cached image; its flush follows.
    then_flush: Box<[bool]>,
    /// Per tag: a write's byte count, which is its result once done (librbd answers a write
    /// with 0), kept while its flush runs.
    write_result: Box<[Option<i32>]>,
    in_flight: usize,
}

impl RbdEngine {
    pub fn new(handle: Arc<RbdHandle>, queue_size: u16) -> io::Result<RbdEngine> {
        let (image, generation) = handle.image();
        let size = usize::from(queue_size);
        let event = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?;
        let shared = Arc::new_cyclic(|me| Completions {
            ceph: image.ceph,
            event,
            sleeping: AtomicBool::new(false),
            ready: (0..size.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            results: (0..size).map(|_| AtomicI64::new(0)).collect(),
            slots: (0..size).map(|tag| Slot { owner: me.as_ptr(), tag: tag as u16 }).collect(),
        });
        Ok(RbdEngine {
            handle,
            image,
            generation,
            retired: Vec::new(),
            shared,
            then_flush: vec![false; size].into_boxed_slice(),
            write_result: vec![None; size].into_boxed_slice(),
            in_flight: 0,
        })
    }

    /// Starts one librbd request for `tag`.
    fn start(&mut self, tag: u16, op: &IoOp<'_>) -> io::Result<()> {
        let slot = &self.shared.slots[usize::from(tag)];
        let ceph = self.image.ceph;
        let mut c: RbdCompletionT = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the argument (the tag's slot) outlives the request.
        let rc = unsafe {
            (ceph.rbd_aio_create_completion)(
                slot as *const Slot as *mut c_void,
                Some(rbd_done),
                &mut c,
            )
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
                    (ceph.rbd_aio_readv)(image, GuestIov::as_iovec_ptr(iov), iovcnt(iov), offset, c)
                }
                IoOp::Write { offset, iov, .. } => (ceph.rbd_aio_writev)(
                    image,
                    GuestIov::as_iovec_ptr(iov),
                    iovcnt(iov),
                    offset,
                    c,
                ),
                IoOp::Flush => (ceph.rbd_aio_flush)(image, c),
                IoOp::Discard { offset, bytes } => (ceph.rbd_aio_discard)(image, offset, bytes, c),
                IoOp::WriteZeroes { offset, bytes, unmap } => {
                    let flags = if unmap { 0 } else { RBD_WRITE_ZEROES_FLAG_THICK_PROVISION };
                    (ceph.rbd_aio_write_zeroes)(image, offset, bytes as usize, c, flags, 0)
                }
            }
        };
        if rc < 0 {
            // SAFETY: librbd refused the request, so the completion is still ours alone.
            unsafe { (ceph.rbd_aio_release)(c) };
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
        if result == -EBLOCKLISTED {
            self.handle.reopen(&self.image);
        }
        let written = self.write_result[tag].take();
        let result = match written {
            Some(w) if result >= 0 => w,
            _ => result,
        };
        self.then_flush[tag] = false;
        self.in_flight -= 1;
        if self.in_flight == 0 && !self.retired.is_empty() {
            self.retired.clear();
        }
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
            std::mem::forget(std::mem::take(&mut self.retired));
        }
    }
}

impl Engine for RbdEngine {
    unsafe fn queue(&mut self, tag: u16, op: IoOp<'_>) -> io::Result<()> {
        let index = usize::from(tag);
        if index >= self.then_flush.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if self.handle.changed_since(self.generation) {
            // The image was opened again on a new connection (after a blocklisting).
            let (image, generation) = self.handle.image();
            let old = std::mem::replace(&mut self.image, image);
            if self.in_flight > 0 {
                self.retired.push(old);
            }
            self.generation = generation;
        }
        self.start(tag, &op)?;
        self.then_flush[index] = matches!(op, IoOp::Write { dsync: true, .. }) && self.image.cached;
        self.write_result[index] = match op {
            IoOp::Write { iov, .. } => {
                Some(i32::try_from(GuestIov::total_len(iov)).unwrap_or(i32::MAX))
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
        if self.in_flight == 0 {
            return;
        }
        for word in 0..self.shared.ready.len() {
            let mut bits = self.shared.ready[word].swap(0, Ordering::Acquire);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                self.finish_one(word * 64 + bit, &mut on_complete);
            }
        }
    }

    fn arm(&mut self) -> bool {
        // Set even with nothing in flight: `disarm` then clears a count a late callback may
        // have left in the eventfd, which would otherwise keep the thread awake.
        self.shared.sleeping.store(true, Ordering::SeqCst);
        self.in_flight > 0 && self.shared.ready.iter().any(|w| w.load(Ordering::SeqCst) != 0)
    }

    fn disarm(&mut self) {
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            let _ = self.shared.event.read();
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.shared.event.as_raw_fd())
    }
}
