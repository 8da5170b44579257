//! `aio=threads`: a small pool of worker threads doing preadv/pwritev/fdatasync/fallocate,
//! for filesystems where io_uring or native AIO would block. Each I/O thread has its own pool,
//! so nothing is shared between I/O threads; the pool's queue is shared with its workers
//! only, and costs a futex wake per batch and an eventfd write per completion — the price of
//! this engine, which is why it is not the default.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::{Engine, IoOp};
use crate::virtq::GuestIov;

/// Worker threads per I/O thread.
pub const WORKERS: usize = 4;

#[derive(Clone, Copy)]
enum Work {
    Read,
    Write { dsync: bool },
    Flush,
    Fallocate { mode: i32 },
}

#[derive(Clone, Copy)]
struct Job {
    tag: u16,
    work: Work,
    offset: u64,
    len: u64,
    iov: *const libc::iovec,
    iovcnt: i32,
}

// SAFETY: the iovec array and the buffers it points to stay valid until the job's completion
// is reaped (the contract of Engine::queue), whichever thread runs it.
unsafe impl Send for Job {}

struct State {
    jobs: VecDeque<Job>,
    done: Vec<(u16, i32)>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    work_ready: Condvar,
    done_event: EventFd,
    fd: RawFd,
}

pub struct ThreadsEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Jobs queued since the last submit.
    pending: Vec<Job>,
    /// Completions taken from the workers, swapped with theirs so neither side allocates.
    reaped: Vec<(u16, i32)>,
}

impl ThreadsEngine {
    /// A pool for at most `queue_size` operations in flight on `fd`, which the caller keeps
    /// open for the engine's lifetime.
    pub fn new(fd: RawFd, queue_size: u16) -> io::Result<ThreadsEngine> {
        let size = usize::from(queue_size);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: VecDeque::with_capacity(size),
                done: Vec::with_capacity(size),
                stop: false,
            }),
            work_ready: Condvar::new(),
            done_event: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
            fd,
        });
        let mut engine = ThreadsEngine {
            shared,
            workers: Vec::with_capacity(WORKERS),
            pending: Vec::with_capacity(size),
            reaped: Vec::with_capacity(size),
        };
        for i in 0..WORKERS {
            let s = Arc::clone(&engine.shared);
            // On a failure the engine is dropped here, which stops and joins the workers
            // started so far (they would otherwise wait for work forever).
            let worker = std::thread::Builder::new()
                .name(format!("blkplane-aio{i}"))
                .spawn(move || work(&s))?;
            engine.workers.push(worker);
        }
        Ok(engine)
    }
}

fn run_job(fd: RawFd, job: &Job) -> i32 {
    // SAFETY: the iovecs and buffers are valid (Job's Send note); fd is open.
    let rc: i64 = unsafe {
        match job.work {
            Work::Read => libc::preadv(fd, job.iov, job.iovcnt, job.offset as i64) as i64,
            Work::Write { dsync } => libc::pwritev2(
                fd,
                job.iov,
                job.iovcnt,
                job.offset as i64,
                if dsync { libc::RWF_DSYNC } else { 0 },
            ) as i64,
            Work::Flush => i64::from(libc::fdatasync(fd)),
            Work::Fallocate { mode } => {
                i64::from(libc::fallocate(fd, mode, job.offset as i64, job.len as i64))
            }
        }
    };
    if rc < 0 {
        -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    } else {
        i32::try_from(rc).unwrap_or(i32::MAX)
    }
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(job) = state.jobs.pop_front() {
                    break job;
                }
                if state.stop {
                    return;
                }
                state = shared.work_ready.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        let result = run_job(shared.fd, &job);
        shared.state.lock().unwrap_or_else(|p| p.into_inner()).done.push((job.tag, result));
        let _ = shared.done_event.write(1);
    }
}

impl Engine for ThreadsEngine {
    unsafe fn queue(&mut self, tag: u16, op: IoOp<'_>) -> io::Result<()> {
        let mut job =
            Job { tag, work: Work::Flush, offset: 0, len: 0, iov: std::ptr::null(), iovcnt: 0 };
        match op {
            IoOp::Read { offset, iov } | IoOp::Write { offset, iov, .. } => {
                job.work = match op {
                    IoOp::Write { dsync, .. } => Work::Write { dsync },
                    _ => Work::Read,
                };
                job.offset = offset;
                job.iov = GuestIov::as_iovec_ptr(iov);
                job.iovcnt = iov.len() as i32;
            }
            IoOp::Flush => {}
            IoOp::Discard { offset, bytes } => {
                job.work = Work::Fallocate {
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                };
                (job.offset, job.len) = (offset, bytes);
            }
            IoOp::WriteZeroes { offset, bytes, unmap } => {
                let mode =
                    if unmap { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
                job.work = Work::Fallocate { mode: mode | libc::FALLOC_FL_KEEP_SIZE };
                (job.offset, job.len) = (offset, bytes);
            }
        }
        self.pending.push(job);
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len();
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            state.jobs.extend(self.pending.drain(..));
        }
        if n == 1 {
            self.shared.work_ready.notify_one();
        } else {
            self.shared.work_ready.notify_all();
        }
        Ok(())
    }

    fn reap(&mut self, mut on_complete: impl FnMut(u16, i32)) {
        // Clear the wake-up first: a completion arriving after this read signals again.
        let _ = self.shared.done_event.read();
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.done.is_empty() {
                return;
            }
            std::mem::swap(&mut state.done, &mut self.reaped);
        }
        for (tag, result) in self.reaped.drain(..) {
            on_complete(tag, result);
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.shared.done_event.as_raw_fd())
    }
}

impl Drop for ThreadsEngine {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        self.shared.work_ready.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
