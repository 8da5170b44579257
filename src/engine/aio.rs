//! `aio=native`: Linux AIO (io_setup / io_submit / io_getevents), batch-submitted, with an
//! eventfd that becomes readable when completions wait. Asynchronous only with O_DIRECT
//! (cache=none or directsync); on the page cache io_submit itself does the I/O. Linux AIO
//! has no fallocate, so discard and write-zeroes run synchronously on the I/O thread.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

use super::{Engine, IoOp};
use crate::virtq::GuestIov;

const IOCB_CMD_FDSYNC: u16 = 3;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;
const IOCB_FLAG_RESFD: u32 = 1;

/// `struct iocb` of linux/aio_abi.h (x86-64, little-endian field order).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

pub struct AioEngine {
    ctx: libc::c_ulong,
    fd: RawFd,
    /// One control block per slot (tag): the kernel reads it during io_submit.
    iocbs: Box<[Iocb]>,
    /// Control blocks queued since the last submit.
    batch: Vec<*mut Iocb>,
    events: Box<[IoEvent]>,
    /// Completions that did not go through the kernel's AIO (fallocate, refused submits).
    done_now: Vec<(u16, i32)>,
    ready: EventFd,
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

impl AioEngine {
    /// An AIO context for at most `queue_size` operations on `fd`, which the caller keeps
    /// open for the engine's lifetime.
    pub fn new(fd: RawFd, queue_size: u16) -> io::Result<AioEngine> {
        let size = usize::from(queue_size);
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context into ctx, which we own.
        if unsafe { libc::syscall(libc::SYS_io_setup, size as libc::c_long, &mut ctx) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AioEngine {
            ctx,
            fd,
            iocbs: vec![Iocb::default(); size].into_boxed_slice(),
            batch: Vec::with_capacity(size),
            events: vec![IoEvent::default(); size].into_boxed_slice(),
            done_now: Vec::with_capacity(size),
            ready: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
        })
    }

    fn fallocate_now(&mut self, tag: u16, mode: i32, offset: u64, len: u64) {
        // SAFETY: fallocate on an open fd has no memory-safety preconditions.
        let rc = unsafe { libc::fallocate(self.fd, mode, offset as i64, len as i64) };
        self.done_now.push((tag, if rc < 0 { -last_errno() } else { 0 }));
    }
}

impl Engine for AioEngine {
    unsafe fn queue(&mut self, tag: u16, op: IoOp<'_>) -> io::Result<()> {
        let Some(cb) = self.iocbs.get_mut(usize::from(tag)) else {
            return Err(io::Error::other("tag beyond the queue size"));
        };
        *cb = Iocb {
            aio_data: u64::from(tag),
            aio_fildes: self.fd as u32,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.ready.as_raw_fd() as u32,
            ..Iocb::default()
        };
        match op {
            IoOp::Read { offset, iov } | IoOp::Write { offset, iov, .. } => {
                cb.aio_lio_opcode = if matches!(op, IoOp::Read { .. }) {
                    IOCB_CMD_PREADV
                } else {
                    IOCB_CMD_PWRITEV
                };
                if let IoOp::Write { dsync: true, .. } = op {
                    cb.aio_rw_flags = libc::RWF_DSYNC;
                }
                cb.aio_buf = GuestIov::as_iovec_ptr(iov) as u64;
                cb.aio_nbytes = iov.len() as u64;
                cb.aio_offset = offset as i64;
            }
            IoOp::Flush => cb.aio_lio_opcode = IOCB_CMD_FDSYNC,
            IoOp::Discard { offset, bytes } => {
                self.fallocate_now(
                    tag,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    bytes,
                );
                return Ok(());
            }
            IoOp::WriteZeroes { offset, bytes, unmap } => {
                let mode =
                    if unmap { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
                self.fallocate_now(tag, mode | libc::FALLOC_FL_KEEP_SIZE, offset, bytes);
                return Ok(());
            }
        }
        let ptr: *mut Iocb = cb;
        self.batch.push(ptr);
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        while !self.batch.is_empty() {
            // SAFETY: every pointer is to a control block in self.iocbs, filled in by queue();
            // the buffers they name stay valid until reaped (Engine::queue's contract).
            let n = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    self.batch.len() as libc::c_long,
                    self.batch.as_mut_ptr(),
                )
            };
            if n > 0 {
                self.batch.drain(..n as usize);
                continue;
            }
            let errno = if n < 0 { last_errno() } else { libc::EAGAIN };
            if errno == libc::EAGAIN || errno == libc::EINTR {
                // Out of resources for now: what is left goes with the next submit.
                return Ok(());
            }
            // The first control block was refused: fail that request, go on with the rest.
            let cb = self.batch.remove(0);
            // SAFETY: cb points into self.iocbs (see above).
            let tag = unsafe { (*cb).aio_data } as u16;
            self.done_now.push((tag, -errno));
        }
        Ok(())
    }

    fn reap(&mut self, mut on_complete: impl FnMut(u16, i32)) {
        for (tag, result) in self.done_now.drain(..) {
            on_complete(tag, result);
        }
        let _ = self.ready.read();
        loop {
            let mut zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: events has room for events.len() entries; the timeout is ours.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    0 as libc::c_long,
                    self.events.len() as libc::c_long,
                    self.events.as_mut_ptr(),
                    &mut zero,
                )
            };
            if n <= 0 {
                return;
            }
            for e in &self.events[..n as usize] {
                on_complete(e.data as u16, i32::try_from(e.res).unwrap_or(-libc::EIO));
            }
            if (n as usize) < self.events.len() {
                return;
            }
        }
    }

    fn has_unsubmitted(&self) -> bool {
        !self.batch.is_empty()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.ready.as_raw_fd())
    }
}

impl Drop for AioEngine {
    fn drop(&mut self) {
        // SAFETY: destroys the context we created; the I/O thread completed every request
        // before dropping the engine.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}
