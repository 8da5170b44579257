//! [iothread] One thread per virtqueue: drain the avail ring, submit the batch with one call,
//! reap completions, publish the used ring once and notify once.
//!
//! A queue belongs to exactly one I/O thread for the thread's whole life. The control thread
//! talks to it only through [`IoThread`]: it starts the thread with everything the queue
//! needs, and stops it (the thread finishes in-flight I/O first) to learn where the queue
//! stopped. Any change to a running queue (memory table, call fd, features) is a stop and a
//! fresh start, so the thread never needs a lock.

#[cfg(test)]
mod order_tests;
pub mod poll;
mod worker;

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::disk::Disk;
use crate::virtq::{GuestMemory, RingAddrs};

/// Everything an I/O thread needs to serve one queue.
pub struct QueueSetup {
    pub index: u16,
    pub memory: Arc<GuestMemory>,
    pub addrs: RingAddrs,
    pub size: u16,
    pub next_avail: u16,
    pub event_idx: bool,
    pub indirect: bool,
    /// The guest's kick eventfd; `None` if the frontend asked us to poll instead.
    pub kick: Option<File>,
    /// Our interrupt eventfd towards the guest; `None`: the frontend polls the used ring.
    pub call: Option<File>,
    /// Where to signal that the queue broke.
    pub err: Option<File>,
}

/// How the control thread asks an I/O thread to stop.
pub(crate) struct StopSignal {
    requested: AtomicBool,
    wake: EventFd,
}

impl StopSignal {
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}

/// A running I/O thread.
pub struct IoThread {
    stop: Arc<StopSignal>,
    join: JoinHandle<u16>,
}

impl IoThread {
    /// Starts a thread serving `setup`'s queue. Returns once the queue is validated and the
    /// engine is up, or with the reason it could not start.
    pub fn spawn(disk: Arc<Disk>, setup: QueueSetup) -> io::Result<IoThread> {
        let stop = Arc::new(StopSignal {
            requested: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
        });
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_stop = Arc::clone(&stop);
        let name = format!("blkplane-q{}", setup.index);
        let join = std::thread::Builder::new().name(name).spawn(move || {
            let _abort = AbortOnPanic;
            worker::run(disk, setup, thread_stop, ready_tx)
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(IoThread { stop, join }),
            Ok(Err(e)) => {
                let _ = join.join();
                Err(e)
            }
            Err(_) => {
                let _ = join.join();
                Err(io::Error::other("I/O thread exited during start-up"))
            }
        }
    }

    /// Stops the thread after its in-flight requests complete; returns the avail index at
    /// which the queue stopped (what GET_VRING_BASE answers).
    pub fn stop(self) -> u16 {
        self.stop.requested.store(true, Ordering::Release);
        let _ = self.stop.wake.write(1);
        match self.join.join() {
            Ok(next_avail) => next_avail,
            Err(_) => {
                tracing::error!("an I/O thread panicked");
                0
            }
        }
    }
}

/// Ends the process if an I/O thread panics. Unwinding would free the slot table and bounce
/// buffers while the kernel may still be reading or writing them (io_uring, AIO and the thread
/// pool hold pointers into them until their completions are reaped): a panic there is a bug
/// of ours, and memory corruption is worse than a restart, which systemd does.
struct AbortOnPanic;

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("an I/O thread panicked with I/O possibly in flight; aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::AbortOnPanic;

    /// The guard every I/O thread runs under turns a panic into an abort (checked in a child
    /// process: this test binary, run again for this test alone).
    #[test]
    fn a_panic_under_the_io_thread_guard_aborts_the_process() {
        if std::env::var_os("BLKPLANE_PANIC_CHILD").is_some() {
            let _guard = AbortOnPanic;
            panic!("an I/O thread bug, on purpose");
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "iothread::tests::a_panic_under_the_io_thread_guard_aborts_the_process",
            ])
            .args(["--test-threads", "1", "--nocapture"])
            .env("BLKPLANE_PANIC_CHILD", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{out:?}");
    }
}
