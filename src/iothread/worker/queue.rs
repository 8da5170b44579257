//! One queue as its I/O thread serves it: take requests from the avail ring, hand them to
//! the queue's engine, answer what completed, publish the used ring and notify once per
//! round. The thread's loop (`worker.rs`) drives every queue it serves through [`Served`],
//! one phase at a time for all of them, so that their work shares each system call.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use super::slots::{self, Slots};
use super::{align, followup};
use crate::blk::request::{self, Request, RequestError};
use crate::blk::{req_type, status};
use crate::disk::DiscardMode;
use crate::disk::Disk;
use crate::engine::{Engine, IoOp};
use crate::iothread::QueueSetup;
use crate::qos::{self, Cost};
use crate::ratelimit::RateLimiter;
use crate::trace::sample::Sampler;
use crate::trace::{Kind, QueueStats};
use crate::virtq::dirty::QueueLog;
use crate::virtq::inflight::PackedInflight;
use crate::virtq::packed::PackedQueue;
use crate::virtq::{
    copy_to_guest, GuestMemory, InflightError, InflightQueue, Ring, RingFormat, SplitQueue, Tracker,
};
use crate::{info_limited, log_limited, warn_limited};

/// Sleep bound when the frontend gave no kick fd and we must poll the ring.
pub(super) const KICKLESS_POLL_MS: i32 = 1;
/// A request held for its limits is looked at again at least this often, so that a limit
/// raised or lifted from the control socket takes effect within this time, whatever the old
/// limit told the request to wait.
const THROTTLE_RECHECK_NS: u64 = 100_000_000;
/// The granularity of a queue's turns: a held request is looked at no sooner than this after
/// it was held, so that the requests whose turns came meanwhile go together (one wake-up of
/// the thread and one interrupt of the guest for several requests instead of one each), and
/// one request whose turn is at most this far off may go early. The buckets allow a tenth of
/// a second of burst at least, so going up to this late or early changes nothing of the rate.
const THROTTLE_TICK_NS: u64 = 5_000_000;

/// When a request held at `now_ns` and free to go at `go_ns` is looked at next.
fn check_at(now_ns: u64, go_ns: u64) -> u64 {
    go_ns.max(now_ns + THROTTLE_TICK_NS).min(now_ns + THROTTLE_RECHECK_NS)
}

/// What a request costs against the export's limits; flushes and get-id are free (QEMU
/// throttles neither), a discard counts as a write operation that moves no bytes.
fn throttle_cost(req: &Request) -> Option<Cost> {
    match req {
        Request::Read { bytes, .. } => Some(Cost::Read(*bytes)),
        Request::Write { bytes, .. } | Request::WriteZeroes { bytes, .. } => {
            Some(Cost::Write(*bytes))
        }
        Request::Discard { .. } => Some(Cost::Write(0)),
        Request::Flush | Request::GetId { .. } => None,
    }
}

/// Bytes a request moves (counted when it succeeds).
fn bytes_of(req: &Request) -> u64 {
    match req {
        Request::Read { bytes, .. }
        | Request::Write { bytes, .. }
        | Request::Discard { bytes, .. }
        | Request::WriteZeroes { bytes, .. } => *bytes,
        Request::Flush | Request::GetId { .. } => 0,
    }
}

/// Tells a mirror job of a request that succeeded on the source (see crate::mirror).
#[cold]
fn mirror_request(mirror: &crate::mirror::Mirror, request: &Request) {
    match request {
        Request::Write { offset, bytes, .. }
        | Request::Discard { offset, bytes }
        | Request::WriteZeroes { offset, bytes, .. } => mirror.guest_wrote(*offset, *bytes),
        Request::Flush => mirror.guest_flushed(),
        Request::Read { .. } | Request::GetId { .. } => {}
    }
}

/// A request's kind, from its header's type (also for one that failed to parse).
fn kind_of_type(req_type: u32) -> Kind {
    match req_type {
        req_type::IN => Kind::Read,
        req_type::OUT => Kind::Write,
        req_type::FLUSH => Kind::Flush,
        req_type::GET_ID => Kind::GetId,
        req_type::DISCARD => Kind::Discard,
        req_type::WRITE_ZEROES => Kind::WriteZeroes,
        _ => Kind::Other,
    }
}

/// A queue as the thread's loop drives it, whatever its engine. Each round the loop calls
/// `fetch` on every queue, then `submit`, then `complete`; between rounds with nothing to do
/// it `arm`s them all and sleeps on their descriptors.
pub(crate) trait Served {
    /// Takes at most `budget` new requests from the ring and starts them.
    fn fetch(&mut self, budget: usize) -> usize;
    /// Hands the operations fetched so far to the kernel (for a shared ring: whatever is on
    /// it, which after each queue's fetch is that queue's batch).
    fn submit(&mut self);
    /// Answers what completed, sends follow-ups, publishes and notifies. Returns the work done.
    fn complete(&mut self) -> usize;
    fn in_flight(&self) -> usize;
    /// Operations the kernel would not take yet: the thread must come back soon.
    fn has_unsubmitted(&self) -> bool;
    /// Before a sleep: turns guest kicks on; true if requests arrived meanwhile (then the
    /// thread must not sleep).
    fn arm(&mut self) -> bool;
    /// After a sleep (or an aborted one): kicks off again, the thread looks itself.
    fn disarm(&mut self);
    /// The guest's kick eventfd, while the queue takes requests.
    fn kick_fd(&self) -> Option<RawFd>;
    /// The queue takes requests but has no kick fd: the ring must be looked at every 1 ms.
    fn kickless(&self) -> bool;
    /// The engine's completion descriptor, if it has one.
    fn completion_fd(&self) -> Option<RawFd>;
    /// Before a sleep: hands sampled latencies over if due; then how soon the thread must
    /// wake up for this queue without a kick or a completion (the next merge, the time a
    /// request held for its limits may go).
    fn timer_due(&mut self) -> Option<Duration>;
    /// Stop taking requests; what is in flight still completes.
    fn begin_stop(&mut self);
    /// Stopping and nothing left in flight.
    fn drained(&self) -> bool;
    /// A request waits for the export's limits: nothing happens on this queue before its
    /// timer (polling for it would only burn the CPU).
    fn held(&self) -> bool;
    /// The queue leaves its thread: returns the ring state at which it stopped (VRING_BASE).
    fn finish(&mut self) -> u32;
    fn stats(&self) -> &QueueStats;
}

/// Checks the queue and starts serving it with `engine`. With an inflight region, first
/// reads what an earlier daemon left in flight: those requests go before any new one.
pub(crate) fn start<E: Engine + 'static>(
    disk: Arc<Disk>,
    mut setup: QueueSetup,
    engine: E,
) -> io::Result<Box<dyn Served>> {
    let invalid =
        |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
    let mut queue =
        Ring::new(&setup.memory, &setup.ring, slots::SLOT_IOVS).map_err(|e| invalid(&e))?;
    let mut resubmit = Vec::new();
    // (batch_fixed, next_avail, frontend_base), logged once the queue has its log budget.
    let mut recovered = None;
    let inflight = match setup.inflight.take() {
        Some(region) => {
            let mut tracker = region
                .tracker(setup.index, queue.format(), setup.ring.size)
                .map_err(|e| invalid(&e))?;
            let found = match (&mut tracker, &mut queue) {
                (Tracker::Split(t), Ring::Split(q)) => {
                    recover_split(t, q, setup.ring.base, &mut resubmit)
                }
                (Tracker::Packed(t), Ring::Packed(q)) => {
                    recover_packed(t, q, setup.ring.base, &mut resubmit)
                }
                // The region's layout was checked against the ring's by `tracker`.
                _ => Ok(None),
            }
            .map_err(|e| invalid(&e))?;
            if let Some(found) = found {
                recovered = Some(found);
                // Completions the last process published while the frontend was switching
                // to new call fds may never have been signalled; one interrupt too many is
                // harmless, one too few leaves the guest waiting.
                if let Some(call) = setup.call.as_mut() {
                    let _ = call.write(&1u64.to_ne_bytes());
                }
            }
            Some(tracker)
        }
        None => None,
    };
    let dirty = setup.log.take();
    let mut worker = QueueWorker::new(disk, setup, queue, engine);
    worker.core.inflight = inflight;
    worker.core.dirty = dirty;
    worker.core.resubmit = Resubmission { heads: resubmit, ..Resubmission::default() };
    if let Some((batch_fixed, next_avail, frontend_base)) = recovered {
        let core = &mut worker.core;
        let resubmit = core.resubmit.heads.len();
        info_limited!(core.log, parent: &core.disk.span, queue = core.index, resubmit, batch_fixed, next_avail, frontend_base, "recovered the queue from its inflight region");
    }
    // Kicks stay off while the thread is awake: it looks at the ring itself.
    worker.core.queue.disable_notifications();
    worker.core.log_used_ring();
    let ring = worker.core.queue.format().name();
    debug!(parent: &worker.core.disk.span, queue = worker.core.index, ring, "queue started");
    Ok(Box::new(worker))
}

/// Reads what an earlier daemon left in flight on a split ring and resumes after it.
/// Returns (batch_fixed, next_avail, frontend_base) if that differs from a clean stop.
fn recover_split(
    tracked: &mut InflightQueue,
    queue: &mut SplitQueue,
    base: u32,
    resubmit: &mut Vec<u16>,
) -> Result<Option<(u16, u32, u32)>, InflightError> {
    let found = tracked.recover(queue.used_index(), queue.avail_index(), resubmit)?;
    if found.fresh {
        return Ok(None);
    }
    // The last process took exactly what it answered plus what is still marked.
    let resume = queue.used_index().wrapping_add(resubmit.len() as u16);
    queue.resume_at(resume);
    let frontend_base = base as u16;
    let changed = !resubmit.is_empty() || found.batch_fixed > 0 || resume != frontend_base;
    Ok(changed.then_some((found.batch_fixed, u32::from(resume), u32::from(frontend_base))))
}

/// Reads what an earlier daemon left in flight on a packed ring and resumes where the region
/// says: after a crash the frontend's base is stale (QEMU cannot read a packed ring's
/// positions from guest memory), the region's used position is not. Returns
/// (batch committed, resumed base, frontend_base) if that differs from a clean stop.
fn recover_packed(
    tracked: &mut PackedInflight,
    queue: &mut PackedQueue,
    base: u32,
    resubmit: &mut Vec<u16>,
) -> Result<Option<(u16, u32, u32)>, InflightError> {
    let found = tracked.recover(queue.next_used(), |pos| queue.published_at(pos), resubmit)?;
    if found.fresh {
        return Ok(None);
    }
    queue.resume(found.used, found.in_flight_descs);
    let resumed = queue.base();
    let changed = !resubmit.is_empty() || found.committed || resumed != base;
    Ok(changed.then_some((u16::from(found.committed), resumed, base)))
}

/// A request held for the export's limits: in slot `tag` since `since_ns`, free to go at
/// `go_ns` (its reservation under the limits of `generation`), looked at again by
/// `check_ns` at the latest (on the clock of `qos::now_ns`).
#[derive(Clone, Copy)]
pub(super) struct Held {
    tag: u16,
    since_ns: u64,
    go_ns: u64,
    check_ns: u64,
    generation: u64,
}

/// Requests an earlier daemon left in flight, taken again before anything new.
#[derive(Default)]
pub(super) struct Resubmission {
    /// In the order they were first taken: heads (split ring) or the region's head entries
    /// of their copies (packed ring).
    heads: Vec<u16>,
    next: usize,
    /// How many of each kind went, for the line logged when all have.
    kinds: [u32; Kind::ALL.len()],
}

impl Resubmission {
    fn pending(&self) -> usize {
        self.heads.len() - self.next
    }
}

struct QueueWorker<E: Engine> {
    engine: E,
    core: Core,
}

/// Everything but the engine, so that the engine's completion callback can borrow it.
pub(super) struct Core {
    pub(super) disk: Arc<Disk>,
    /// Held for the thread's whole life: every GuestIov in `slots` points into it.
    pub(super) memory: Arc<GuestMemory>,
    pub(super) queue: Ring,
    pub(super) index: u16,
    pub(super) slots: Slots,
    /// Used entries pushed since the last publish.
    pub(super) unpublished: u16,
    pub(super) kick: Option<File>,
    pub(super) call: Option<File>,
    pub(super) err: Option<File>,
    /// Taking no more requests: the queue is leaving its thread.
    pub(super) stopping: bool,
    pub(super) broken: bool,
    /// Bytes of bounce buffers in use by requests in flight.
    pub(super) bounce_bytes: usize,
    /// Cleared once the backing refuses FALLOC_FL_ZERO_RANGE; write-zeroes then punch holes.
    pub(super) zero_range_supported: bool,
    /// A request that waits for this queue's requests in flight before it can start (bounce
    /// memory, a read-modify-write); see `align.rs`.
    pub(super) parked: Option<u16>,
    /// A request that waits for the export's limits (see crate::qos); the rest wait in the
    /// ring behind it, so the order holds and nothing more is taken or buffered.
    pub(super) throttled: Option<Held>,
    /// The turn of the last request that went before it (see `go_early`).
    pub(super) early_until_ns: u64,
    /// Requests whose first operation completed and that need another (tags; preallocated).
    pub(super) followups: Vec<(u16, followup::Followup)>,
    /// Requests taken from the ring and answered since the queue first started (mirrored in
    /// its shared statistics for resize's drain).
    pub(super) admitted: u64,
    pub(super) retired: u64,
    pub(super) log: RateLimiter,
    pub(super) stats: Arc<QueueStats>,
    pub(super) stats_on: bool,
    /// Per-layer timestamps of one request in SAMPLE_EVERY (see crate::trace).
    pub(super) sampler: Sampler,
    /// The queue's part of the frontend's inflight region, if it gave one.
    pub(super) inflight: Option<Tracker>,
    pub(super) resubmit: Resubmission,
    /// While the guest migrates: where the queue marks the guest pages it writes.
    pub(super) dirty: Option<QueueLog>,
}

impl<E: Engine> QueueWorker<E> {
    fn new(disk: Arc<Disk>, setup: QueueSetup, queue: Ring, engine: E) -> Self {
        let size = usize::from(setup.ring.size);
        let stats = disk.queue_stats(setup.index);
        let disk_stats_on = disk.stats_on;
        let packed = queue.format() == RingFormat::Packed;
        stats.packed_ring.store(packed, Ordering::Relaxed);
        // A queue restarted (new memory table, reconnect) goes on counting where it was.
        let admitted = stats.admitted.load(Ordering::SeqCst);
        let log = disk
            .queue_logs
            .get(usize::from(setup.index))
            .map(|budget| std::mem::take(&mut *budget.lock().unwrap_or_else(|p| p.into_inner())));
        let core = Core {
            disk,
            memory: setup.memory,
            queue,
            index: setup.index,
            slots: Slots::new(setup.ring.size),
            unpublished: 0,
            kick: setup.kick,
            call: setup.call,
            err: setup.err,
            stopping: false,
            broken: false,
            bounce_bytes: 0,
            zero_range_supported: true,
            parked: None,
            throttled: None,
            early_until_ns: 0,
            followups: Vec::with_capacity(size),
            admitted,
            retired: admitted,
            log: log.unwrap_or_default(),
            stats_on: disk_stats_on,
            stats,
            sampler: Sampler::new(disk_stats_on, size),
            inflight: None,
            resubmit: Resubmission::default(),
            dirty: None,
        };
        QueueWorker { engine, core }
    }
}

impl<E: Engine> Served for QueueWorker<E> {
    fn fetch(&mut self, budget: usize) -> usize {
        // A request held for the limits or parked goes before any new one.
        if !self.core.takes_requests() {
            return 0;
        }
        self.core.fetch(&mut self.engine, budget)
    }

    fn submit(&mut self) {
        let core = &mut self.core;
        if let Err(e) = self.engine.submit() {
            warn_limited!(core.log, parent: &core.disk.span, queue = core.index, "engine submit: {e}");
        }
        core.sampler.submitted();
    }

    fn complete(&mut self) -> usize {
        let core = &mut self.core;
        let before = core.slots.in_flight();
        // Nothing in flight, nothing to reap: an idle queue costs its thread's rounds no
        // system call (Linux AIO's reap is two).
        if before > 0 {
            self.engine.reap(|tag, result| core.complete(tag, result));
        }
        let mut progress = before - core.slots.in_flight().min(before);
        progress += core.resume_throttled(&mut self.engine);
        progress += core.resume_parked(&mut self.engine);
        // Resubmitted work counts as progress: the next round submits it before sleeping.
        progress += core.send_followups(&mut self.engine);
        core.publish();
        progress
    }

    fn in_flight(&self) -> usize {
        self.core.slots.in_flight()
    }

    fn has_unsubmitted(&self) -> bool {
        self.engine.has_unsubmitted()
    }

    fn arm(&mut self) -> bool {
        if self.engine.arm() {
            // Completions arrived while we were deciding to sleep.
            self.engine.disarm();
            return true;
        }
        let core = &mut self.core;
        // A queue that takes nothing now (a request held for its limits or parked) wants no
        // kicks: it wakes for its timer or its completions.
        if !core.takes_requests() {
            return false;
        }
        let arrived = core.queue.enable_notifications();
        if arrived {
            // Requests arrived while we were deciding to sleep.
            core.queue.disable_notifications();
            self.engine.disarm();
        }
        core.log_used_ring();
        arrived
    }

    fn disarm(&mut self) {
        self.engine.disarm();
        if self.core.takes_requests() {
            self.core.queue.disable_notifications();
            self.core.log_used_ring();
        }
    }

    fn kick_fd(&self) -> Option<RawFd> {
        self.core.kick.as_ref().filter(|_| self.core.takes_requests()).map(AsRawFd::as_raw_fd)
    }

    fn kickless(&self) -> bool {
        self.core.takes_requests() && self.core.kick.is_none()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.engine.completion_fd()
    }

    fn timer_due(&mut self) -> Option<Duration> {
        let merge = self.core.sampler.merge_before_sleep(&self.core.stats.histograms);
        let held = self
            .core
            .throttled
            .map(|h| Duration::from_nanos(h.check_ns.saturating_sub(qos::now_ns())));
        match (merge, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn begin_stop(&mut self) {
        self.core.stopping = true;
        self.engine.begin_stop();
    }

    fn held(&self) -> bool {
        self.core.throttled.is_some()
    }

    fn drained(&self) -> bool {
        self.core.stopping && self.core.slots.in_flight() == 0 && !self.engine.has_unsubmitted()
    }

    fn finish(&mut self) -> u32 {
        let core = &mut self.core;
        core.sampler.merge(&core.stats.histograms);
        core.stats.counters.in_flight.set(0);
        debug!(parent: &core.disk.span, queue = core.index, "queue stopped");
        core.queue.base()
    }

    fn stats(&self) -> &QueueStats {
        &self.core.stats
    }
}

impl Drop for Core {
    /// Gives the queue's log budget back to its export, for the queue's next start.
    fn drop(&mut self) {
        if let Some(budget) = self.disk.queue_logs.get(usize::from(self.index)) {
            *budget.lock().unwrap_or_else(|p| p.into_inner()) = std::mem::take(&mut self.log);
        }
    }
}

impl Core {
    /// Serving the ring: neither leaving its thread nor broken by the guest.
    fn accepting(&self) -> bool {
        !self.stopping && !self.broken
    }

    /// Taking new requests from the ring now: accepting, and no request waits before them.
    fn takes_requests(&self) -> bool {
        self.accepting() && self.parked.is_none() && self.throttled.is_none()
    }

    /// Takes new requests from the avail ring: at most `budget`, and as many as there are
    /// free slots.
    fn fetch(&mut self, engine: &mut impl Engine, budget: usize) -> usize {
        self.sampler.round_begins();
        // What an earlier daemon left in flight goes first, before the avail ring is read.
        let resubmitting = self.resubmit.pending() > 0;
        let pending = if resubmitting {
            self.resubmit.pending()
        } else {
            match self.queue.avail_count() {
                Ok(n) => usize::from(n),
                Err(e) => {
                    self.break_queue(e);
                    return 0;
                }
            }
        };
        let batch = pending.min(self.slots.free_count()).min(budget);
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
        // One relaxed load per batch when the export has no limits; the clock is read once
        // per batch, and only if it has.
        let throttling = self.disk.throttle.active();
        let mut now_ns = None;
        let mut taken = 0;
        for _ in 0..batch {
            let Some(tag) = self.slots.take() else { break };
            self.sampler.seen(tag);
            let slot = &mut self.slots[tag];
            let popped = match (&self.inflight, resubmitting) {
                (Some(tracker), true) => {
                    let item = self.resubmit.heads[self.resubmit.next];
                    self.resubmit.next += 1;
                    tracker.resubmit(&mut self.queue, &self.memory, item, &mut slot.chain).map(Some)
                }
                _ => self.queue.pop(&self.memory, &mut slot.chain),
            };
            let (head, outcome) = match popped {
                Ok(Some(popped)) => popped,
                Ok(None) => {
                    self.slots.give_back(tag);
                    break;
                }
                Err(e) => {
                    // Not a chain (or not a ring): we cannot even find its status byte.
                    self.slots.give_back(tag);
                    self.break_queue(e);
                    break;
                }
            };
            // Marked before the request can start; a resubmitted one still is.
            if let (Some(inflight), false) = (self.inflight.as_mut(), resubmitting) {
                if let Err(e) = inflight.taken(&self.queue, head) {
                    self.slots.give_back(tag);
                    self.break_queue(e);
                    break;
                }
            }
            self.slots[tag].head = head;
            taken += 1;
            let slot = &mut self.slots[tag];
            let parsed = request::parse(&mut slot.chain, outcome, &limits);
            slot.status = parsed.status;
            slot.kind = parsed.req_type.map_or(Kind::Other, kind_of_type);
            slot.bytes = parsed.result.as_ref().map_or(0, bytes_of);
            self.sampler.parsed(tag);
            if resubmitting {
                self.resubmit.kinds[slot.kind as usize] += 1;
            }
            match parsed.result {
                Ok(req) => {
                    if let (true, Some(cost)) = (throttling, throttle_cost(&req)) {
                        let now = *now_ns.get_or_insert_with(qos::now_ns);
                        let generation = self.disk.throttle.generation();
                        let wait_ns = self.disk.throttle.admit(now, cost);
                        if wait_ns > 0 && !self.go_early(now, now + wait_ns) {
                            self.hold(tag, req, now, wait_ns, generation);
                            break;
                        }
                    }
                    if let Some(req) = self.start(engine, tag, req) {
                        self.park(tag, req);
                        break;
                    }
                }
                Err(e) => self.finish(tag, Err(e)),
            }
        }
        // Counted as admitted above but never taken (the ring broke): nothing to wait for.
        self.count_retired((batch - taken) as u64);
        if resubmitting && self.resubmit.pending() == 0 {
            self.resubmitted();
        }
        batch
    }

    /// Every request left in flight by an earlier daemon has been taken again: say what.
    fn resubmitted(&mut self) {
        let done = std::mem::take(&mut self.resubmit);
        let kinds: Vec<String> = Kind::ALL
            .iter()
            .filter(|k| done.kinds[**k as usize] > 0)
            .map(|k| format!("{} {}", done.kinds[*k as usize], k.name()))
            .collect();
        info_limited!(
            self.log,
            parent: &self.disk.span,
            queue = self.index,
            "resubmitted {} requests left in flight by the last daemon: {}",
            done.heads.len(),
            kinds.join(", ")
        );
    }

    /// Hands a parsed request to the engine, or answers it at once if there is nothing to do.
    /// Gives the request back if it must wait (see [`align::Aligned::Wait`]).
    fn start(&mut self, engine: &mut impl Engine, tag: u16, req: Request) -> Option<Request> {
        match self.align(tag, &req) {
            align::Aligned::Go => self.issue(engine, tag, req),
            align::Aligned::Done(answer) => self.finish(tag, answer),
            align::Aligned::Wait => return Some(req),
        }
        None
    }

    /// A request over the export's limits stays in its slot until [`Core::resume_throttled`]
    /// lets it go at its reserved time; the queue takes nothing more meanwhile.
    fn hold(&mut self, tag: u16, req: Request, now_ns: u64, wait_ns: u64, generation: u64) {
        self.slots[tag].request = Some(req);
        let go_ns = now_ns + wait_ns;
        self.throttled = Some(Held {
            tag,
            since_ns: now_ns,
            go_ns,
            check_ns: check_at(now_ns, go_ns),
            generation,
        });
        self.stats.counters.throttled_requests.add(1);
        self.count_throttle_queue();
    }

    /// Whether a request whose turn is at `go_ns` may go now, at `now_ns`: if its turn is
    /// within the tick and no other request of this queue went before its turn and is still
    /// early. The buckets' burst absorbs going early; one early request per queue keeps the
    /// queues of a group taking turns (a queue that took every turn within the tick would
    /// take them from the others).
    fn go_early(&mut self, now_ns: u64, go_ns: u64) -> bool {
        if go_ns > now_ns + THROTTLE_TICK_NS || self.early_until_ns > now_ns {
            return false;
        }
        self.early_until_ns = go_ns;
        true
    }

    /// Publishes how many requests wait for the limits: the one held and those behind it in
    /// the ring.
    fn count_throttle_queue(&mut self) {
        let behind = self.queue.avail_count().map_or(0, u64::from);
        self.stats.counters.throttle_queued.set(1 + behind);
    }

    /// Starts the request held for the limits once its reserved time has come (or at once if
    /// the queue is stopping: it leaves its thread with nothing held). If the limits changed
    /// meanwhile, it reserves again under the new ones. Returns 1 if it went.
    fn resume_throttled(&mut self, engine: &mut impl Engine) -> usize {
        let Some(mut held) = self.throttled else { return 0 };
        let now = qos::now_ns();
        if now < held.check_ns && !self.stopping {
            return 0;
        }
        let throttle = &self.disk.throttle;
        let generation = throttle.generation();
        if now < held.go_ns && generation != held.generation && !self.stopping {
            let cost = self.slots[held.tag].request.as_ref().and_then(throttle_cost);
            let wait_ns = cost.map_or(0, |c| throttle.admit(now, c));
            held.go_ns = now + wait_ns;
            held.generation = generation;
        }
        if now < held.go_ns && !self.stopping && !self.go_early(now, held.go_ns) {
            held.check_ns = check_at(now, held.go_ns);
            self.throttled = Some(held);
            self.count_throttle_queue();
            return 0;
        }
        self.throttled = None;
        let c = &self.stats.counters;
        c.throttled_ns.add(now.saturating_sub(held.since_ns));
        c.throttle_queued.set(0);
        let Some(req) = self.slots[held.tag].request.take() else { return 0 };
        if let Some(req) = self.start(engine, held.tag, req) {
            self.park(held.tag, req);
        }
        1
    }

    /// A request that must wait goes back into its slot until [`Core::resume_parked`] can
    /// start it; the queue takes no new requests meanwhile, so its order holds.
    fn park(&mut self, tag: u16, req: Request) {
        self.slots[tag].request = Some(req);
        self.parked = Some(tag);
    }

    /// Starts the parked request if what it waited for has happened. Returns 1 if it went.
    fn resume_parked(&mut self, engine: &mut impl Engine) -> usize {
        let Some(tag) = self.parked.take() else { return 0 };
        let Some(req) = self.slots[tag].request.take() else { return 0 };
        match self.start(engine, tag, req) {
            Some(req) => {
                self.park(tag, req);
                0
            }
            None => 1,
        }
    }

    /// Queues a request's engine operation, or answers it at once if there is nothing to do.
    fn issue(&mut self, engine: &mut impl Engine, tag: u16, mut req: Request) {
        if let Request::WriteZeroes { unmap, .. } = &mut req {
            // discard=ignore keeps the blocks allocated, whatever the guest allows (a backing
            // without ZERO_RANGE still gets its zeroes as a hole: see followup.rs).
            *unmap &= self.disk.discard == DiscardMode::Unmap;
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
                let written = copy_to_guest(slot.chain.iovs(data.clone()), 0, id);
                return self.finish(tag, Ok(written as u32));
            }
            Request::Discard { .. } if self.disk.discard == DiscardMode::Ignore => {
                // discard=ignore: a hint the export was told not to act on.
                return self.finish(tag, Ok(0));
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
    pub(super) fn finish(&mut self, tag: u16, result: Result<u32, RequestError>) {
        let slot = &mut self.slots[tag];
        let request = slot.request.take();
        if let (Some(request), Ok(_)) = (&request, &result) {
            // A mirror job copies what the guest changed before the guest hears of it.
            if let Some(mirror) = self.disk.mirror.job() {
                mirror_request(&mirror, request);
            }
        }
        let slot = &mut self.slots[tag];
        if slot.bounced {
            slot.bounced = false;
            self.bounce_bytes -= slot.bounce.iovs()[0].len();
            slot.bounce.shrink(align::BOUNCE_KEEP_BYTES);
        }
        let (span, index, head) = (&self.disk.span, self.index, slot.head);
        let used_len = match (&result, slot.status) {
            (Ok(n), Some(status_byte)) => {
                status_byte.write_u8(status::OK);
                n.saturating_add(1)
            }
            (Err(e), Some(status_byte)) => {
                status_byte.write_u8(e.status());
                warn_limited!(self.log, parent: span, queue = index, head, "request failed: {e}");
                1
            }
            (_, None) => {
                warn_limited!(self.log, parent: span, queue = index, head, "request without a status byte returned unanswered");
                0
            }
        };
        // Whatever the request wrote into guest memory (data, status) was written by now.
        if let Some(log) = &self.dirty {
            for iov in slot.chain.writable() {
                log.mark_buffer(&self.memory, iov);
            }
            if let Some(status_byte) = &slot.status {
                log.mark_buffer(&self.memory, status_byte);
            }
        }
        self.queue.push_used(slot.head, used_len);
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.used(slot.head);
        }
        self.unpublished += 1;
        if self.stats_on {
            let c = &self.stats.counters;
            let kind = slot.kind as usize;
            c.requests[kind].add(1);
            match &result {
                Ok(_) => c.bytes[kind].add(slot.bytes),
                Err(e) if e.status() == status::UNSUPP => c.errors_unsupp[kind].add(1),
                Err(_) => c.errors_ioerr[kind].add(1),
            }
        }
        let kind = slot.kind;
        self.slots.give_back(tag);
        self.sampler.completed(tag, kind);
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
        let count = std::mem::take(&mut self.unpublished);
        // The region records the batch before the ring publishes it, and unmarks it only
        // once the ring covers it (see virtq/inflight.rs and virtq/inflight/packed.rs).
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.publishing(&self.queue);
        }
        self.queue.publish_used();
        self.log_used_ring();
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.published(count, &self.queue);
        }
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
        if self.sampler.waiting() {
            self.sampler.record(published, Instant::now(), &self.stats.histograms);
        }
    }

    /// After the used ring was written (entries, index, flags, avail_event), while logging.
    fn log_used_ring(&self) {
        if let Some(log) = &self.dirty {
            log.mark_used_ring();
            // A packed ring's used elements are written into its descriptor ring.
            if let Some((host, bytes)) = self.queue.device_written_ring() {
                if let Some(gpa) = self.memory.gpa_of_host(host) {
                    log.log.mark(gpa, bytes);
                }
            }
        }
    }

    fn break_queue(&mut self, e: impl std::fmt::Display) {
        if !self.broken {
            log_limited!(tracing::Level::ERROR, self.log, parent: &self.disk.span, queue = self.index, "queue broken by the guest: {e}; it serves nothing more until reset");
        }
        self.broken = true;
        if let Some(err) = self.err.as_mut() {
            let _ = err.write(&1u64.to_ne_bytes());
        }
    }
}
