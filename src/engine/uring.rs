//! The io_uring engine: vectored reads and writes straight between the backing file and
//! guest memory, fdatasync for FLUSH, fallocate for DISCARD and WRITE_ZEROES.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::{Engine, IoOp};
use crate::virtq::GuestIov;

pub struct UringEngine {
    ring: IoUring,
    fd: RawFd,
    /// Entries pushed since the last submit.
    unsubmitted: u32,
}

impl UringEngine {
    /// A ring for at most `queue_size` operations in flight on `fd`. The caller keeps `fd`
    /// open for the engine's lifetime.
    pub fn new(fd: RawFd, queue_size: u16) -> io::Result<UringEngine> {
        let entries = u32::from(queue_size).next_power_of_two();
        let ring = IoUring::builder()
            // The CQ must hold a completion for every slot even if we reap late.
            .setup_cqsize(entries * 2)
            .setup_single_issuer()
            // No COOP_TASKRUN: completions that finish in the kernel's workers then interrupt
            // us to post their CQE, so a polling I/O thread sees them without a system call.
            .build(entries)?;
        Ok(UringEngine { ring, fd, unsubmitted: 0 })
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
        entry.user_data(u64::from(tag))
    }
}

impl Engine for UringEngine {
    unsafe fn queue(&mut self, tag: u16, op: IoOp<'_>) -> io::Result<()> {
        let entry = self.entry(tag, op);
        for _ in 0..2 {
            // SAFETY: the caller guarantees the iovec array and the guest buffers stay valid
            // until this tag is reaped (the contract of Engine::queue); the fd stays open
            // for the engine's lifetime (the contract of new()).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // The SQ is full: hand what is there to the kernel and try once more.
            self.submit()?;
        }
        Err(io::Error::other("io_uring submission queue stays full"))
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    // The kernel may take fewer than we pushed; the rest stays queued.
                    self.unsubmitted = self.ring.submission().len() as u32;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EAGAIN/EBUSY: the CQ is under pressure; the caller reaps and retries.
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, mut on_complete: impl FnMut(u16, i32)) {
        for cqe in self.ring.completion() {
            on_complete(cqe.user_data() as u16, cqe.result());
        }
    }

    fn has_unsubmitted(&self) -> bool {
        self.unsubmitted > 0
    }

    fn completion_fd(&self) -> Option<RawFd> {
        // The ring's own fd polls readable while completions wait in the CQ.
        Some(self.ring.as_raw_fd())
    }
}
