//! [iothread] I/O threads: each runs one event loop (`worker.rs`) over a set of (export,
//! queue) pairs, with one io_uring shared by all of them.
//!
//! An I/O thread is an object of its own ([`IoThread`]): the daemon's default pool (one per
//! CPU the process may use), a named thread from `--iothread`, or a thread dedicated to one
//! queue. A queue joins a thread when its ring starts and leaves it when it stops
//! ([`QueueHandle`]); which thread is the export's [`Placement`]. The control thread talks to
//! a loop only by command: it hands a queue over with everything it needs, and asks it back
//! (the queue finishes its in-flight I/O first) to learn where it stopped. Any change to a
//! running queue (memory table, call fd, features) is a stop and a fresh start of that queue
//! alone, so the loop never needs a lock and the other queues on its thread go on.

#[cfg(test)]
mod order_tests;
pub mod poll;
pub mod registry;
mod worker;

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::disk::{Backend, Disk, RunningQueue};
use crate::engine::aio::AioEngine;
use crate::engine::nbd::engine::NbdEngine;
use crate::engine::null::NullEngine;
use crate::engine::threads::ThreadsEngine;
use crate::engine::uring::UringEngine;
use crate::engine::EngineKind;
use crate::virtq::dirty::QueueLog;
use crate::virtq::{GuestMemory, InflightRegion, RingSetup};
use poll::PollSettings;
use worker::{Command, LoopSetup, MakeQueue};

pub(crate) use worker::queue::Served;

/// Everything an I/O thread needs to serve one queue.
pub struct QueueSetup {
    pub index: u16,
    pub memory: Arc<GuestMemory>,
    /// The ring's layout, addresses, size and VRING_BASE, as the frontend set them up.
    pub ring: RingSetup,
    /// The guest's kick eventfd; `None` if the frontend asked us to poll instead.
    pub kick: Option<File>,
    /// Our interrupt eventfd towards the guest; `None`: the frontend polls the used ring.
    pub call: Option<File>,
    /// Where to signal that the queue broke.
    pub err: Option<File>,
    /// The frontend's inflight region (INFLIGHT_SHMFD), if it gave one: the queue marks what
    /// it takes there, and resubmits what an earlier process left marked.
    pub inflight: Option<Arc<InflightRegion>>,
    /// While the frontend migrates the guest: the dirty log the queue marks its writes in.
    pub log: Option<QueueLog>,
}

/// What an I/O thread did, for `list-iothreads` and the metrics.
#[derive(Default)]
pub struct ThreadStats {
    /// Queues it serves now.
    pub queues: AtomicUsize,
    /// Nanoseconds spent polling instead of sleeping.
    pub poll_ns: AtomicU64,
    /// Polling periods that found work before their window ended.
    pub poll_hits: AtomicU64,
    pub sleeps: AtomicU64,
    /// What adaptive polling chose at its last trials (`poll::Chooser`).
    pub choice: ChoiceStats,
}

/// An adaptive thread's polling decisions as the control plane reads them: written by the I/O
/// thread once per round of trials (a few times a second), never per request.
#[derive(Default)]
pub struct ChoiceStats {
    /// 0: no decision yet; else 1 + the index of the way chosen in `poll::Way::ALL`.
    now: AtomicU8,
    /// Per way: how often it was chosen.
    pub chosen: [AtomicU64; 3],
    /// Per way, per request in ns from its trials: wall time, then CPU (`u64::MAX`: its
    /// last trial saw no work).
    figures_ns: [[AtomicU64; 2]; 3],
}

/// [`ChoiceStats`] read at one moment; arrays are indexed as `poll::Way::ALL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChoiceSnapshot {
    /// `None` before the first decision.
    pub way: Option<poll::Way>,
    pub chosen: [u64; 3],
    /// Wall time and CPU in ns per request, where the way's trials saw work.
    pub figures_ns: [Option<(u64, u64)>; 3],
}

impl ChoiceStats {
    /// Units of work a request is: it is fetched, and answered.
    const WORK_PER_REQUEST: f64 = 2.0;

    pub fn record(&self, c: &poll::Choice) {
        for (cells, score) in self.figures_ns.iter().zip(c.scores) {
            let [wall, cpu] = match score {
                Some(s) => [s.wall_ns_per_work, s.cpu_ns_per_work]
                    .map(|ns| (ns * Self::WORK_PER_REQUEST) as u64),
                None => [u64::MAX; 2],
            };
            cells[0].store(wall, Ordering::Relaxed);
            cells[1].store(cpu, Ordering::Relaxed);
        }
        let i = poll::Way::ALL.iter().position(|w| *w == c.way).unwrap_or(2);
        self.chosen[i].fetch_add(1, Ordering::Relaxed);
        self.now.store(i as u8 + 1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ChoiceSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let way = (self.now.load(Ordering::Relaxed) as usize)
            .checked_sub(1)
            .and_then(|i| poll::Way::ALL.get(i).copied());
        ChoiceSnapshot {
            way,
            chosen: self.chosen.each_ref().map(load),
            figures_ns: self.figures_ns.each_ref().map(|[wall, cpu]| {
                let (wall, cpu) = (load(wall), load(cpu));
                // Before the first decision the cells hold nothing measured.
                (way.is_some() && wall != u64::MAX).then_some((wall, cpu))
            }),
        }
    }
}

/// Where an export's queues run.
#[derive(Clone)]
pub enum Placement {
    /// On the daemon's shared pool: each queue, when it starts, on the thread serving the
    /// fewest queues.
    Pool(Arc<[Arc<IoThread>]>),
    /// On these threads, queue i on thread i % len (QEMU's iothread-vq-mapping).
    Threads(Vec<Arc<IoThread>>),
    /// Each queue on a thread of its own, started and ended with it, polling by the export's
    /// settings (changeable with set-polling) and pinned by its `cpus` (queue i on
    /// cpus[i % len]); `started` finds them for `list-iothreads`.
    Dedicated { poll: Arc<PollSettings>, cpus: Vec<usize>, started: Arc<DedicatedThreads> },
}

/// The threads an export's queues started for themselves (`iothread=dedicated`), while they
/// run: weak, so a queue that ends ends its thread. Touched when a queue starts and when the
/// threads are listed, never by the data path.
#[derive(Default)]
pub struct DedicatedThreads(Mutex<Vec<std::sync::Weak<IoThread>>>);

impl DedicatedThreads {
    fn add(&self, thread: &Arc<IoThread>) {
        let mut threads = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Ended ones go first: at most one entry per running queue, plus this one.
        threads.retain(|t| t.strong_count() > 0);
        threads.push(Arc::downgrade(thread));
    }

    /// The threads still running, in the order their queues started.
    pub fn running(&self) -> Vec<Arc<IoThread>> {
        let threads = self.0.lock().unwrap_or_else(|p| p.into_inner());
        threads.iter().filter_map(std::sync::Weak::upgrade).collect()
    }
}

/// A running I/O thread.
pub struct IoThread {
    /// The kernel's id of the thread (for /proc/self/task/TID).
    pub tid: u32,
    pub id: String,
    /// The CPUs it may run on; empty: wherever the process may.
    pub cpus: Vec<usize>,
    pub poll: Arc<PollSettings>,
    pub stats: Arc<ThreadStats>,
    commands: Mutex<mpsc::Sender<Command>>,
    wake: Arc<EventFd>,
    join: Mutex<Option<JoinHandle<()>>>,
}

impl IoThread {
    /// Starts an I/O thread with no queues. `ring_entries`: submission entries of its ring
    /// (what the queues it will serve may have in flight, roughly).
    pub fn spawn(
        id: &str,
        cpus: Vec<usize>,
        poll: Arc<PollSettings>,
        ring_entries: u32,
    ) -> io::Result<Arc<IoThread>> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?);
        let stats = Arc::new(ThreadStats::default());
        let setup = LoopSetup {
            commands: rx,
            wake: Arc::clone(&wake),
            poll: Arc::clone(&poll),
            stats: Arc::clone(&stats),
            cpus: cpus.clone(),
            ring_entries,
        };
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let join = std::thread::Builder::new().name(format!("blkplane-{id}")).spawn(move || {
            let _abort = AbortOnPanic;
            worker::run(setup, ready_tx)
        })?;
        match ready_rx.recv() {
            Ok(Ok(tid)) => Ok(Arc::new(IoThread {
                id: id.to_string(),
                tid,
                cpus,
                poll,
                stats,
                commands: Mutex::new(tx),
                wake,
                join: Mutex::new(Some(join)),
            })),
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

    fn send(&self, command: Command) -> io::Result<()> {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(command)
            .map_err(|_| io::Error::other(format!("I/O thread {} has ended", self.id)))?;
        let _ = self.wake.write(1);
        Ok(())
    }

    /// Hands a queue to this thread; returns once it is served, or why it cannot be.
    pub(crate) fn attach_with(self: &Arc<Self>, make: MakeQueue) -> io::Result<QueueHandle> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Command::Attach { make, reply })?;
        let id = answer.recv().map_err(|_| io::Error::other("I/O thread ended"))??;
        Ok(QueueHandle { thread: Arc::clone(self), id, dedicated: false, running: None })
    }

    /// Ends the thread once it serves no queue (the caller stopped them) and waits for it.
    pub fn shut_down(&self) {
        let _ = self.send(Command::Exit);
        if let Some(join) = self.join.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = join.join();
        }
    }
}

/// A queue being served by an I/O thread.
pub struct QueueHandle {
    thread: Arc<IoThread>,
    id: u64,
    /// The thread exists for this queue alone and ends with it.
    dedicated: bool,
    /// Counts the ring as its guest's while it is served (see `Disk::guest_running`).
    running: Option<RunningQueue>,
}

impl QueueHandle {
    /// Takes the queue off its thread after its in-flight requests complete; returns the
    /// ring state at which it stopped (what GET_VRING_BASE answers). The thread's other
    /// queues are served throughout.
    pub fn stop(self) -> u32 {
        self.leave().wait()
    }

    /// Asks the thread to take the queue off (see `stop`) without waiting: several queues
    /// leave at once, so that stopping them all takes as long as the slowest, not the sum.
    pub fn leave(self) -> Leaving {
        let (reply, answer) = mpsc::sync_channel(1);
        let sent = self.thread.send(Command::Detach { id: self.id, reply }).is_ok();
        Leaving { handle: self, answer: sent.then_some(answer) }
    }
}

/// A queue asked to leave its thread.
pub struct Leaving {
    handle: QueueHandle,
    answer: Option<mpsc::Receiver<u32>>,
}

impl Leaving {
    /// Waits until the queue has left; returns the ring state at which it stopped.
    pub fn wait(self) -> u32 {
        let base = self.answer.and_then(|a| a.recv().ok());
        let thread = &self.handle.thread;
        if self.handle.dedicated {
            thread.shut_down();
        }
        base.unwrap_or_else(|| {
            tracing::error!(thread = %thread.id, "an I/O thread ended with a queue on it");
            0
        })
    }
}

/// Starts serving `setup`'s queue of `disk` where `placement` says. Returns once the queue
/// is validated and its engine is up, or with the reason it could not start.
pub fn start_queue(
    placement: &Placement,
    disk: &Arc<Disk>,
    setup: QueueSetup,
) -> io::Result<QueueHandle> {
    let index = usize::from(setup.index);
    let (thread, dedicated) = match placement {
        Placement::Pool(pool) => {
            let least = pool.iter().min_by_key(|t| t.stats.queues.load(Ordering::Relaxed));
            (Arc::clone(least.ok_or_else(|| io::Error::other("no I/O threads"))?), false)
        }
        Placement::Threads(threads) if !threads.is_empty() => {
            (Arc::clone(&threads[index % threads.len()]), false)
        }
        Placement::Threads(_) => return Err(io::Error::other("no I/O threads")),
        Placement::Dedicated { poll, cpus, started } => {
            let cpus = cpus.get(index % cpus.len().max(1)).into_iter().copied().collect();
            let name = format!("q{index}");
            let thread =
                IoThread::spawn(&name, cpus, Arc::clone(poll), u32::from(setup.ring.size))?;
            started.add(&thread);
            (thread, true)
        }
    };
    let running = RunningQueue::new(disk);
    let disk = Arc::clone(disk);
    let attached = thread.attach_with(Box::new(move |ring| make_queue(disk, setup, ring)));
    match attached {
        Ok(mut handle) => {
            handle.dedicated = dedicated;
            handle.running = Some(running);
            Ok(handle)
        }
        Err(e) => {
            if dedicated {
                thread.shut_down();
            }
            Err(e)
        }
    }
}

/// Makes the queue with the engine its disk asks for, on the loop's thread.
fn make_queue(
    disk: Arc<Disk>,
    setup: QueueSetup,
    ring: &std::rc::Rc<crate::engine::uring::SharedRing>,
) -> io::Result<Box<dyn Served>> {
    use std::os::fd::AsRawFd;
    let size = setup.ring.size;
    match &disk.backend {
        Backend::Null => worker::queue::start(disk, setup, NullEngine::new(size)),
        Backend::Nbd(target) => {
            let engine = NbdEngine::new(Arc::clone(target), setup.index, size)?;
            worker::queue::start(disk, setup, engine)
        }
        Backend::Rbd(image) => {
            use crate::engine::rbd::engine::RbdEngine;
            let engine = RbdEngine::new(Arc::clone(image), size)?;
            worker::queue::start(disk, setup, engine)
        }
        Backend::File { backing, engine } => {
            let fd = backing.file.as_raw_fd();
            match engine {
                EngineKind::Native => {
                    let engine = AioEngine::new(fd, size)?;
                    worker::queue::start(disk, setup, engine)
                }
                EngineKind::Threads => {
                    let engine = ThreadsEngine::new(fd, size)?;
                    worker::queue::start(disk, setup, engine)
                }
                EngineKind::IoUring => {
                    let engine = UringEngine::on(ring, fd, size, backing.on_tmpfs);
                    worker::queue::start(disk, setup, engine)
                }
            }
        }
    }
}

/// The default polling of shared threads.
#[cfg(test)]
pub fn default_poll() -> Arc<PollSettings> {
    Arc::new(PollSettings::new(poll::PollPolicy::default()))
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
            panic!("an I/O thread panic, on purpose");
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
