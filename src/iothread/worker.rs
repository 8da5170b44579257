//! The I/O thread's event loop over one queue and one engine.

mod align;
mod followup;
mod slots;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, error};

use super::poll::Poller;
use super::{QueueSetup, StopSignal};
use crate::blk::request::{self, Request, RequestError};
use crate::blk::status;
use crate::disk::Disk;
use crate::engine::aio::AioEngine;
use crate::engine::null::NullEngine;
use crate::engine::threads::ThreadsEngine;
use crate::engine::uring::UringEngine;
use crate::engine::{Engine, EngineKind, IoOp};
use crate::ratelimit::RateLimiter;
use crate::trace::sample::Sampler;
use crate::trace::{Kind, QueueStats};
use crate::virtq::{copy_to_guest, GuestMemory, QueueError, SplitQueue};
use crate::warn_limited;
use slots::Slots;

/// Sleep bound when the frontend gave no kick fd and we must poll the ring.
const KICKLESS_POLL_MS: i32 = 1;

fn kind_of(req: &Request) -> (Kind, u64) {
    match req {
        Request::Read { bytes, .. } => (Kind::Read, *bytes),
        Request::Write { bytes, .. } => (Kind::Write, *bytes),
        Request::Flush => (Kind::Flush, 0),
        Request::GetId { .. } => (Kind::GetId, 0),
        Request::Discard { bytes, .. } => (Kind::Discard, *bytes),
        Request::WriteZeroes { bytes, .. } => (Kind::WriteZeroes, *bytes),
    }
}

/// Runs the queue until stopped. Sends the start-up result on `ready` first.
pub(super) fn run(
    disk: Arc<Disk>,
    setup: QueueSetup,
    stop: Arc<StopSignal>,
    ready: SyncSender<io::Result<()>>,
) -> u16 {
    let fd = disk.backing.as_ref().map(|b| b.file.as_raw_fd());
    match (disk.engine, fd) {
        (EngineKind::Null, _) => serve(disk, setup, stop, ready, |size| Ok(NullEngine::new(size))),
        (EngineKind::IoUring, Some(fd)) => {
            serve(disk, setup, stop, ready, |size| UringEngine::new(fd, size))
        }
        (EngineKind::Native, Some(fd)) => {
            serve(disk, setup, stop, ready, |size| AioEngine::new(fd, size))
        }
        (EngineKind::Threads, Some(fd)) => {
            serve(disk, setup, stop, ready, |size| ThreadsEngine::new(fd, size))
        }
        (_, None) => serve::<NullEngine>(disk, setup, stop, ready, |_| {
            Err(io::Error::other("an export without a backing file needs engine=null"))
        }),
    }
}

/// Checks the queue, makes its engine with `make_engine(queue size)`, and serves the queue
/// until stopped; or reports on `ready` why either could not be done. The engine is made
/// here, on the I/O thread: an io_uring set up with SINGLE_ISSUER accepts submissions only
/// from the thread that made it. (The durability tests call this with a wrapped engine.)
pub(super) fn serve<E: Engine>(
    disk: Arc<Disk>,
    setup: QueueSetup,
    stop: Arc<StopSignal>,
    ready: SyncSender<io::Result<()>>,
    make_engine: impl FnOnce(u16) -> io::Result<E>,
) -> u16 {
    let queue = SplitQueue::new(
        &setup.memory,
        setup.addrs,
        setup.size,
        setup.next_avail,
        setup.event_idx,
        setup.indirect,
        slots::SLOT_IOVS,
    )
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()));
    match queue.and_then(|queue| Ok((queue, make_engine(setup.size)?))) {
        Ok((queue, engine)) => Worker::new(disk, setup, queue, engine, stop).run(ready),
        Err(e) => {
            let _ = ready.send(Err(e));
            setup.next_avail
        }
    }
}

struct Worker<E: Engine> {
    engine: E,
    core: Core,
}

/// Everything but the engine, so that the engine's completion callback can borrow it.
struct Core {
    disk: Arc<Disk>,
    /// Held for the thread's whole life: every GuestIov in `slots` points into it.
    memory: Arc<GuestMemory>,
    queue: SplitQueue,
    index: u16,
    slots: Slots,
    /// Used entries pushed since the last publish.
    unpublished: u16,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    stop: Arc<StopSignal>,
    broken: bool,
    /// Bytes of bounce buffers in use by requests in flight.
    bounce_bytes: usize,
    /// Cleared once the backing refuses FALLOC_FL_ZERO_RANGE; write-zeroes then punch holes.
    zero_range_supported: bool,
    /// Requests whose first operation completed and that need another (tags; preallocated).
    followups: Vec<(u16, followup::Followup)>,
    /// Requests taken from the ring and answered since the queue first started (mirrored in
    /// its shared statistics for resize's drain).
    admitted: u64,
    retired: u64,
    log: RateLimiter,
    stats: Arc<QueueStats>,
    stats_on: bool,
    /// Per-layer timestamps of one request in SAMPLE_EVERY (see crate::trace).
    sampler: Sampler,
}

impl<E: Engine> Worker<E> {
    fn new(
        disk: Arc<Disk>,
        setup: QueueSetup,
        queue: SplitQueue,
        engine: E,
        stop: Arc<StopSignal>,
    ) -> Self {
        let size = usize::from(setup.size);
        let stats = disk.stats.get(usize::from(setup.index)).cloned().unwrap_or_default();
        let disk_stats_on = disk.stats_on;
        // A queue restarted (new memory table, reconnect) goes on counting where it was.
        let admitted = stats.admitted.load(Ordering::SeqCst);
        let core = Core {
            disk,
            memory: setup.memory,
            queue,
            index: setup.index,
            slots: Slots::new(setup.size),
            unpublished: 0,
            kick: setup.kick,
            call: setup.call,
            err: setup.err,
            stop,
            broken: false,
            bounce_bytes: 0,
            zero_range_supported: true,
            followups: Vec::with_capacity(size),
            admitted,
            retired: admitted,
            log: RateLimiter::default(),
            stats_on: disk_stats_on,
            stats,
            sampler: Sampler::new(disk_stats_on, size),
        };
        Worker { engine, core }
    }

    fn run(mut self, ready: SyncSender<io::Result<()>>) -> u16 {
        let _ = ready.send(Ok(()));
        let core = &mut self.core;
        let engine = &mut self.engine;
        let mut poller = Poller::new(core.disk.poll.get());
        debug!(export = %core.disk.name, queue = core.index, "queue started");
        pin_to(&core.disk.cpus, core.index);
        // Kicks stay off while we are awake: we look at the ring ourselves.
        core.queue.disable_notifications();
        loop {
            let stopping = core.stop.requested();
            let mut progress = 0;
            if !stopping && !core.broken {
                progress += core.fetch(engine);
            }
            if let Err(e) = engine.submit() {
                warn_limited!(core.log, export = %core.disk.name, queue = core.index, "engine submit: {e}");
            }
            core.sampler.submitted();
            let before = core.slots.in_flight();
            engine.reap(|tag, result| core.complete(tag, result));
            progress += before - core.slots.in_flight().min(before);
            // Resubmitted work counts as progress: the next round submits it before sleeping.
            progress += core.send_followups(engine);
            core.publish();
            if progress > 0 {
                if let Some(polled) = poller.work_found() {
                    core.stats.counters.poll_ns.add(polled.as_nanos() as u64);
                    core.stats.counters.poll_hits.add(1);
                }
                continue;
            }
            if stopping && core.slots.in_flight() == 0 {
                break;
            }
            if !stopping && !core.broken && poller.keep_polling(&core.disk.poll) {
                if core.slots.in_flight() > 0 {
                    // Let a kernel worker finishing our I/O (io_uring punts writes that cannot
                    // be issued without blocking) have this CPU while we wait for it.
                    // SAFETY: sched_yield has no preconditions.
                    unsafe { libc::sched_yield() };
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            core.stats.counters.poll_ns.add(poller.polled_for().as_nanos() as u64);
            core.stats.counters.sleeps.add(1);
            let went_to_sleep = Instant::now();
            core.sleep(stopping, engine.completion_fd(), engine.has_unsubmitted());
            poller.slept(went_to_sleep.elapsed());
        }
        core.sampler.merge(&core.stats.histograms);
        core.stats.counters.in_flight.set(0);
        debug!(export = %core.disk.name, queue = core.index, "queue stopped");
        core.queue.next_avail()
    }
}

impl Core {
    /// Takes new requests from the avail ring, as many as there are free slots.
    fn fetch(&mut self, engine: &mut impl Engine) -> usize {
        let pending = match self.queue.avail_count() {
            Ok(n) => usize::from(n),
            Err(e) => {
                self.break_queue(e);
                return 0;
            }
        };
        let batch = pending.min(self.slots.free_count());
        if batch == 0 {
            return 0;
        }
        // The batch is counted as admitted before the capacity is read (both SeqCst): a resize
        // that publishes a smaller capacity and then reads this count either sees these
        // requests, and waits for them, or they see the smaller capacity (see Disk::resize).
        // Once per batch, not per request: the store is a locked instruction.
        self.admitted += batch as u64;
        self.stats.admitted.store(self.admitted, Ordering::SeqCst);
        let limits = self.disk.limits();
        let mut taken = 0;
        for _ in 0..batch {
            let head = match self.queue.pop_head() {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(e) => {
                    self.break_queue(e);
                    break;
                }
            };
            let Some(tag) = self.slots.take(head) else { break };
            taken += 1;
            self.sampler.seen(tag);
            let slot = &mut self.slots[tag];
            let outcome = match self.queue.walk_chain(&self.memory, head, &mut slot.chain) {
                Ok(outcome) => outcome,
                Err(e) => {
                    // The chain is not a chain: we cannot even find its status byte.
                    self.slots.give_back(tag);
                    taken -= 1;
                    self.break_queue(QueueError::Chain(e));
                    break;
                }
            };
            let parsed = request::parse(&mut slot.chain, outcome, &limits);
            slot.status = parsed.status;
            (slot.kind, slot.bytes) =
                parsed.result.as_ref().map(kind_of).unwrap_or((Kind::Other, 0));
            self.sampler.parsed(tag);
            match parsed.result {
                Ok(req) => self.start(engine, tag, req),
                Err(e) => self.finish(tag, Err(e)),
            }
        }
        // Counted as admitted above but never taken (the ring broke): nothing to wait for.
        self.count_retired((batch - taken) as u64);
        batch
    }

    /// Hands a parsed request to the engine, or answers it at once if there is nothing to do.
    fn start(&mut self, engine: &mut impl Engine, tag: u16, req: Request) {
        if let Some(answer) = self.align(engine, tag, &req) {
            return self.finish(tag, answer);
        }
        let slot = &mut self.slots[tag];
        let op = match &req {
            Request::Read { offset, data, bytes } => {
                if *bytes == 0 {
                    return self.finish(tag, Ok(0));
                }
                if slot.bounced {
                    IoOp::Read { offset: slot.bounce_offset, iov: slot.bounce.iovs() }
                } else {
                    IoOp::Read { offset: *offset, iov: slot.chain.iovs(data.clone()) }
                }
            }
            Request::Write { offset, data, bytes } => {
                if *bytes == 0 {
                    return self.finish(tag, Ok(0));
                }
                let dsync = self.disk.write_needs_dsync();
                if slot.bounced {
                    IoOp::Write { offset: slot.bounce_offset, iov: slot.bounce.iovs(), dsync }
                } else {
                    IoOp::Write { offset: *offset, iov: slot.chain.iovs(data.clone()), dsync }
                }
            }
            Request::Flush => {
                if self.disk.flush_failed() {
                    return self.finish(tag, Err(RequestError::FlushFailedBefore));
                }
                if !self.disk.cache.flush_syncs() {
                    return self.finish(tag, Ok(0));
                }
                IoOp::Flush
            }
            Request::GetId { data, bytes } => {
                let id = &self.disk.serial[..*bytes as usize];
                let written = copy_to_guest(slot.chain.iovs(data.clone()), id);
                return self.finish(tag, Ok(written as u32));
            }
            Request::Discard { offset, bytes } => IoOp::Discard { offset: *offset, bytes: *bytes },
            Request::WriteZeroes { offset, bytes, unmap } => {
                // Known to refuse ZERO_RANGE: punch at once, and only that.
                slot.punched = !*unmap && !self.zero_range_supported;
                IoOp::WriteZeroes {
                    offset: *offset,
                    bytes: *bytes,
                    unmap: *unmap || !self.zero_range_supported,
                }
            }
        };
        // SAFETY: the iovecs live in this slot's ChainBuf or BounceBuffer, which are neither
        // touched nor reused until the tag is reaped (the slot is off the free list until
        // then); the bounce memory is freed only in `finish`, and the guest memory is held by
        // self.memory for the thread's whole life.
        let queued = unsafe { engine.queue(tag, op) };
        let slot = &mut self.slots[tag];
        slot.request = Some(req);
        if queued.is_ok() {
            self.sampler.queued(tag);
        }
        if let Err(e) = queued {
            self.finish(tag, Err(RequestError::Host(e.raw_os_error().unwrap_or(libc::EIO))));
        }
    }

    /// Reaps completions until `done` holds, for the rare paths that must wait for requests
    /// in flight (a full bounce budget). Completions are answered as usual.
    fn wait_for(&mut self, engine: &mut impl Engine, mut done: impl FnMut(&Core) -> bool) {
        while !done(self) && self.slots.in_flight() > 0 {
            if let Err(e) = engine.submit() {
                warn_limited!(self.log, export = %self.disk.name, queue = self.index, "engine submit: {e}");
            }
            engine.reap(|tag, result| self.complete(tag, result));
            self.send_followups(engine);
            if done(self) {
                break;
            }
            if let Some(fd) = engine.completion_fd() {
                let mut fds = [pollfd(fd)];
                // SAFETY: fds is a valid one-entry pollfd array for the call's duration. The
                // engine's reap clears the readiness, as in `sleep`.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, KICKLESS_POLL_MS) };
            }
        }
    }

    /// One engine completion.
    fn complete(&mut self, tag: u16, result: i32) {
        if usize::from(tag) >= self.slots.len() || self.follow_up(tag, result) {
            return;
        }
        let outcome = self.outcome(tag, result);
        self.copy_out_bounce(tag, &outcome);
        self.finish(tag, outcome);
    }

    /// Turns an engine result into the request's outcome: bytes written into guest buffers.
    fn outcome(&self, tag: u16, result: i32) -> Result<u32, RequestError> {
        let req = self.slots[tag].request.as_ref();
        if result < 0 {
            let errno = -result;
            // A backing that cannot discard has discarded nothing, which a hint allows.
            if errno == libc::EOPNOTSUPP && matches!(req, Some(Request::Discard { .. })) {
                return Ok(0);
            }
            return Err(RequestError::Host(errno));
        }
        // A bounced request moved the bounce buffer, which may hold whole blocks around it.
        let slot = &self.slots[tag];
        let moved =
            |bytes: u64| if slot.bounced { slot.bounce.iovs()[0].len() as u64 } else { bytes };
        match req {
            Some(Request::Read { bytes, .. }) if result as u64 == moved(*bytes) => {
                Ok(*bytes as u32)
            }
            Some(Request::Write { bytes, .. }) if result as u64 == moved(*bytes) => Ok(0),
            Some(Request::Read { .. } | Request::Write { .. }) => Err(RequestError::ShortTransfer),
            _ => Ok(0),
        }
    }

    /// Writes the status byte, puts the chain in the used ring and frees the slot.
    /// `Ok(n)`: n bytes of data were written into the guest's buffers.
    fn finish(&mut self, tag: u16, result: Result<u32, RequestError>) {
        let slot = &mut self.slots[tag];
        slot.request = None;
        if slot.bounced {
            slot.bounced = false;
            self.bounce_bytes -= slot.bounce.iovs()[0].len();
            slot.bounce.shrink(align::BOUNCE_KEEP_BYTES);
        }
        let used_len = match (&result, slot.status) {
            (Ok(n), Some(status_byte)) => {
                status_byte.write_u8(status::OK);
                n.saturating_add(1)
            }
            (Err(e), Some(status_byte)) => {
                status_byte.write_u8(e.status());
                warn_limited!(self.log, export = %self.disk.name, queue = self.index, head = slot.head, "request failed: {e}");
                1
            }
            (_, None) => {
                warn_limited!(self.log, export = %self.disk.name, queue = self.index, head = slot.head, "request without a status byte returned unanswered");
                0
            }
        };
        self.queue.push_used(slot.head, used_len);
        self.unpublished += 1;
        if self.stats_on {
            let c = &self.stats.counters;
            let kind = if result.is_ok() { slot.kind } else { Kind::Other };
            c.requests[kind as usize].add(1);
            match &result {
                Ok(_) => c.bytes[kind as usize].add(slot.bytes),
                Err(e) if e.status() == status::UNSUPP => c.errors_unsupp.add(1),
                Err(_) => c.errors_ioerr.add(1),
            }
        }
        self.slots.give_back(tag);
        self.sampler.completed(tag);
        self.count_retired(1);
    }

    /// Counts `n` requests admitted by `fetch` as answered (or never taken from a ring that
    /// broke), for resize's drain.
    fn count_retired(&mut self, n: u64) {
        self.retired += n;
        self.stats.retired.store(self.retired, Ordering::Release);
    }

    /// Publishes the used entries of this round and interrupts the guest if it wants that.
    fn publish(&mut self) {
        if self.unpublished == 0 {
            return;
        }
        self.unpublished = 0;
        self.queue.publish_used();
        let published = self.sampler.has_done().then(Instant::now);
        if self.queue.needs_notification() {
            if let Some(call) = self.call.as_mut() {
                // An eventfd write of 1 only fails if the counter would overflow, which
                // means the guest already has a pending interrupt.
                let _ = call.write(&1u64.to_ne_bytes());
            }
            if self.stats_on {
                self.stats.counters.notifications_sent.add(1);
            }
        } else if self.stats_on {
            self.stats.counters.notifications_suppressed.add(1);
        }
        if self.stats_on {
            self.stats.counters.in_flight.set(self.slots.in_flight() as u64);
        }
        if let Some(published) = published {
            self.sampler.record(published, Instant::now(), &self.stats.histograms);
        }
    }

    fn break_queue(&mut self, e: QueueError) {
        if !self.broken {
            error!(export = %self.disk.name, queue = self.index, "queue broken by the guest: {e}; it serves nothing more until reset");
        }
        self.broken = true;
        if let Some(err) = self.err.as_mut() {
            let _ = err.write(&1u64.to_ne_bytes());
        }
    }

    /// Sleeps until the guest kicks, an I/O completes, or the control thread asks us to stop.
    fn sleep(&mut self, stopping: bool, completion_fd: Option<RawFd>, unsubmitted: bool) {
        let merge_in = self.sampler.merge_before_sleep(&self.stats.histograms);
        let accepting = !stopping && !self.broken;
        if accepting && self.queue.enable_notifications() {
            // Requests arrived while we were deciding to sleep.
            self.queue.disable_notifications();
            return;
        }
        let mut fds = [pollfd(self.stop.wake.as_raw_fd()), pollfd(-1), pollfd(-1)];
        if accepting {
            if let Some(kick) = &self.kick {
                fds[1] = pollfd(kick.as_raw_fd());
            }
        }
        if self.slots.in_flight() > 0 {
            if let Some(fd) = completion_fd {
                fds[2] = pollfd(fd);
            }
        }
        // Work the kernel would not take yet (EAGAIN) is retried soon, not after a kick.
        let mut timeout_ms =
            if (accepting && self.kick.is_none()) || unsubmitted { KICKLESS_POLL_MS } else { -1 };
        if let Some(d) = merge_in {
            let ms = d.as_millis().clamp(1, i32::MAX as u128) as i32;
            timeout_ms = if timeout_ms < 0 { ms } else { timeout_ms.min(ms) };
        }
        // SAFETY: fds is a valid array of pollfd for the duration of the call; negative fds
        // are ignored by poll.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc > 0 {
            if fds[0].revents != 0 {
                drain_eventfd(fds[0].fd);
            }
            if fds[1].revents != 0 {
                if let Some(kick) = self.kick.as_mut() {
                    let mut buf = [0u8; 8];
                    let _ = kick.read(&mut buf);
                }
            }
        }
        if accepting {
            self.queue.disable_notifications();
        }
    }
}

/// Pins the calling thread to `cpus[queue % len]` (no-op for an empty list).
fn pin_to(cpus: &[usize], queue: u16) {
    let Some(&cpu) = cpus.get(usize::from(queue) % cpus.len().max(1)) else { return };
    // SAFETY: an all-zero cpu_set_t is valid; CPU_SET writes inside it (cpu was checked to
    // exist, so it is below CPU_SETSIZE); sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::warn!(queue, cpu, "cannot pin the I/O thread: {}", io::Error::last_os_error());
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

fn drain_eventfd(fd: RawFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reading 8 bytes into an 8-byte buffer from a non-blocking eventfd we own.
    unsafe {
        libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
    }
}
