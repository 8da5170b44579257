//! [engine] I/O engines behind one small trait, the backing file they work on, and the cache
//! modes that decide how it is opened and what FLUSH does.

pub mod aio;
pub mod backing;
pub mod lock;
pub mod nbd;
pub mod null;
pub mod rbd;
pub mod threads;
pub mod uring;

use std::io;
use std::os::fd::RawFd;

use crate::virtq::GuestIov;

pub use backing::{Backing, CacheMode, OpenError};

/// Which engine moves the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring on the backing file (the default).
    IoUring,
    /// Linux AIO (io_submit) on the backing file.
    Native,
    /// A pool of worker threads doing preadv/pwritev on the backing file.
    Threads,
}

/// One operation for an engine, built from a validated request.
#[derive(Clone, Copy)]
pub enum IoOp<'a> {
    Read {
        offset: u64,
        iov: &'a [GuestIov],
    },
    /// `dsync`: make this write durable before completing (the guest turned its write
    /// cache off on a cache mode that otherwise has one).
    Write {
        offset: u64,
        iov: &'a [GuestIov],
        dsync: bool,
    },
    Flush,
    Discard {
        offset: u64,
        bytes: u64,
    },
    WriteZeroes {
        offset: u64,
        bytes: u64,
        unmap: bool,
    },
}

/// An I/O engine as an I/O thread drives it: queue a batch, submit it with one call, reap
/// what completed. One engine per I/O thread; nothing is shared between threads.
pub trait Engine {
    /// Queues `op`; its completion will carry `tag`. May submit earlier work to make room.
    ///
    /// # Safety
    /// The iovec array in `op` and the guest memory it points to must stay valid and
    /// unmoved until the completion for `tag` has been reaped.
    unsafe fn queue(&mut self, tag: u16, op: IoOp<'_>) -> io::Result<()>;

    /// Submits everything queued since the last call, with as few system calls as the
    /// engine allows (io_uring: one per `SUBMIT_CHUNK` entries).
    fn submit(&mut self) -> io::Result<()>;

    /// Calls `on_complete(tag, result)` for every finished operation, where `result` is the
    /// byte count (or 0) on success and a negative errno on failure. Never blocks.
    fn reap(&mut self, on_complete: impl FnMut(u16, i32));

    /// A descriptor that becomes readable when completions are waiting, for sleeping in
    /// poll(2); `None` if completions are always ready at once.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Whether operations were queued that the kernel has not taken yet (a submit that
    /// returned EAGAIN): the I/O thread must not sleep on them.
    fn has_unsubmitted(&self) -> bool {
        false
    }

    /// The I/O thread is about to sleep: from now on completions must make `completion_fd`
    /// readable. True if some are waiting already (then it does not sleep). For engines that
    /// signal their descriptor only on request, so that a thread that is awake (polling, or
    /// busy) costs nobody a system call per completion.
    fn arm(&mut self) -> bool {
        false
    }

    /// The I/O thread is awake again (after a sleep, or instead of one).
    fn disarm(&mut self) {}

    /// The queue is leaving its thread and waits for what is in flight. An engine whose
    /// backend may never answer (a network server) bounds that wait here: it completes what
    /// is left (with an error) within a bound of its own. Engines whose operations the kernel
    /// holds (their buffers in use until it completes them) cannot, and wait.
    fn begin_stop(&mut self) {}
}
