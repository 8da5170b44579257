//! The inflight region: which requests of each ring were taken and not yet answered, kept in
//! shared memory that the frontend holds across our restarts (vhost-user `INFLIGHT_SHMFD`,
//! "Inflight I/O tracking"). This file lays out the region and tracks split rings; a packed
//! ring's part has the spec's other layout and its own procedure (`inflight/packed.rs`).
//!
//! A daemon that dies (SIGKILL, OOM, a crash) leaves the region behind with the frontend; the
//! next daemon is handed it back (`SET_INFLIGHT_FD`) and resubmits exactly what was marked, in
//! the order it was first taken. The marks are plain stores into the mapping, ordered so that
//! a process dying between any two of them leaves a region the recovery below reads right:
//!
//! - taking a head: its `counter`, then `inflight = 1`, before the request starts;
//! - answering: the used element and the head linked into the "last batch" list
//!   (`desc[head].next = last_batch_head; last_batch_head = head`), then used->idx is
//!   published, then `inflight = 0` for the batch, then the region's `used_idx = used->idx`;
//! - recovering: if the region's `used_idx` differs from used->idx, the batch was published
//!   but not yet unmarked: unmark the `used->idx - used_idx` heads of the list, then take
//!   `used_idx` over. What is still marked was never answered.
//!
//! Only a dying process matters here, never another CPU: the frontend does not read the
//! region while we run, and stores a process made before it died are in the shared pages
//! whatever the CPU's store order. So the stores are atomics with Release ordering (plain
//! moves on x86), which keeps the compiler from reordering them.
//!
//! The region comes from the frontend, which may hand back anything: every field is checked
//! before it is trusted, every walk is bounded, and a bad region stops only the queue it
//! describes.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::memory::{MappedRegion, MemoryError};
use super::ring::{Ring, RingFormat};
use super::split::{ChainOutcome, ChainSink, QueueError};
use super::GuestMemory;

mod packed;
pub use packed::PackedInflight;

/// The one layout version we write and read.
pub const VERSION: u16 = 1;
/// Queue header: features (u64), version, desc_num, last_batch_head, used_idx (u16 each).
const HEADER_BYTES: u64 = 16;
/// One DescStateSplit: inflight (u8), padding, next (u16 at 6), counter (u64 at 8).
const DESC_STATE_BYTES: u64 = 16;
/// Each queue's part of the region starts on this boundary.
const QUEUE_ALIGN: u64 = 64;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_NEXT: usize = 6;
const DESC_OFF_COUNTER: usize = 8;

/// Bytes one queue of `queue_size` descriptors takes in the region: the spec's
/// `QueueRegionSplit` or `QueueRegionPacked`, for the ring layout the frontend negotiated.
pub fn queue_bytes(format: RingFormat, queue_size: u16) -> u64 {
    let (header, state) = match format {
        RingFormat::Split => (HEADER_BYTES, DESC_STATE_BYTES),
        RingFormat::Packed => (packed::HEADER_BYTES, packed::DESC_STATE_BYTES),
    };
    (header + state * u64::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Bytes of the whole region for `num_queues` queues of `queue_size`.
pub fn region_bytes(format: RingFormat, num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * queue_bytes(format, queue_size)
}

#[derive(Debug)]
pub enum InflightError {
    /// num_queues or queue_size zero, or over what the export offers.
    Geometry {
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_queue_size: u16,
    },
    /// The region given is smaller than its geometry needs.
    TooSmall {
        needed: u64,
        given: u64,
    },
    /// mmap_offset not a multiple of 64.
    Misaligned(u64),
    Map(MemoryError),
    Create(std::io::Error),
    /// A queue beyond the region's num_queues.
    NoSuchQueue {
        index: u16,
        num_queues: u16,
    },
    /// The ring has more descriptors than the region tracks.
    RingTooLarge {
        ring: u16,
        tracked: u16,
    },
    UnknownVersion(u16),
    /// The queue's desc_num is not the region's queue size.
    DescNum {
        found: u16,
        expected: u16,
    },
    /// The last batch is longer than the ring.
    BatchTooLong {
        batch: u16,
        ring: u16,
    },
    /// A head in the last batch list, or marked in flight, outside the ring.
    HeadOutOfRange {
        head: u16,
        ring: u16,
    },
    /// The region was laid out for one ring layout and the ring uses the other (the
    /// frontend asked for it before negotiating VIRTIO_F_RING_PACKED, or changed it since).
    Layout {
        region: RingFormat,
        ring: RingFormat,
    },
    /// A packed ring's part names a position, entry or chain that does not fit the ring.
    PackedState(&'static str),
    /// A packed ring has more descriptors in flight than its region has entries: the guest
    /// made descriptors available that the device still owns.
    OutOfEntries,
}

impl fmt::Display for InflightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InflightError::Geometry { num_queues, queue_size, max_queues, max_queue_size } => write!(
                f,
                "inflight region for {num_queues} queues of {queue_size} refused (1 to {max_queues} queues of 1 to {max_queue_size})"
            ),
            InflightError::TooSmall { needed, given } => {
                write!(f, "inflight region of {given} bytes, {needed} needed")
            }
            InflightError::Misaligned(o) => {
                write!(f, "inflight region offset {o} is not a multiple of {QUEUE_ALIGN}")
            }
            InflightError::Map(e) => write!(f, "inflight region: {e}"),
            InflightError::Create(e) => write!(f, "creating the inflight region: {e}"),
            InflightError::NoSuchQueue { index, num_queues } => {
                write!(f, "queue {index} is not in the inflight region ({num_queues} queues)")
            }
            InflightError::RingTooLarge { ring, tracked } => write!(
                f,
                "ring of {ring} descriptors but the inflight region tracks {tracked}"
            ),
            InflightError::UnknownVersion(v) => {
                write!(f, "inflight region version {v} (this daemon knows {VERSION})")
            }
            InflightError::DescNum { found, expected } => {
                write!(f, "inflight region desc_num {found}, expected {expected}")
            }
            InflightError::BatchTooLong { batch, ring } => write!(
                f,
                "inflight region's last batch of {batch} entries is longer than the ring ({ring})"
            ),
            InflightError::HeadOutOfRange { head, ring } => write!(
                f,
                "inflight region names head {head}, outside the ring of {ring}"
            ),
            InflightError::Layout { region, ring } => write!(
                f,
                "inflight region laid out for {} rings, but the ring is {}",
                region.name(),
                ring.name()
            ),
            InflightError::PackedState(what) => write!(f, "inflight region (packed ring): {what}"),
            InflightError::OutOfEntries => write!(
                f,
                "more descriptors in flight on the packed ring than it has: the guest reused descriptors the device owns"
            ),
        }
    }
}

impl std::error::Error for InflightError {}

fn sealable_memfd() -> std::io::Result<File> {
    // SAFETY: memfd_create with a valid C string; the fd it returns is ours alone.
    let fd = unsafe {
        libc::memfd_create(
            c"blkplane-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own and hand to File alone.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The file sent with a GET_INFLIGHT_FD reply that says "no region" (mmap_size 0): the
/// message must carry one, and an empty memfd maps nothing.
pub fn no_region_file() -> std::io::Result<File> {
    sealable_memfd()
}

/// A mapped inflight region: `num_queues` queue parts of `queue_size` descriptors each, laid
/// out for the ring format the frontend negotiated when it asked for the region.
pub struct InflightRegion {
    mapping: MappedRegion,
    format: RingFormat,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A fresh, zeroed region (GET_INFLIGHT_FD), and the memfd to hand the frontend. The
    /// memfd is sealed against shrinking, so the frontend cannot pull pages from under us.
    pub fn create(
        format: RingFormat,
        num_queues: u16,
        queue_size: u16,
        hangup: Option<Arc<OwnedFd>>,
    ) -> Result<(InflightRegion, File), InflightError> {
        let bytes = region_bytes(format, num_queues, queue_size);
        let file = sealable_memfd().map_err(InflightError::Create)?;
        let fd = file.as_raw_fd();
        file.set_len(bytes).map_err(InflightError::Create)?;
        // SAFETY: fcntl on an fd we own; F_ADD_SEALS takes an int argument.
        if unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        } < 0
        {
            return Err(InflightError::Create(std::io::Error::last_os_error()));
        }
        let region = InflightRegion::map(&file, 0, bytes, format, num_queues, queue_size, hangup)?;
        Ok((region, file))
    }

    /// Maps a region the frontend hands back (SET_INFLIGHT_FD). If its file shrinks later,
    /// the mapping reads zeroes and `hangup` is shut down (see `fault.rs`), as for guest RAM.
    #[allow(clippy::too_many_arguments)]
    pub fn map(
        file: &File,
        mmap_offset: u64,
        mmap_size: u64,
        format: RingFormat,
        num_queues: u16,
        queue_size: u16,
        hangup: Option<Arc<OwnedFd>>,
    ) -> Result<InflightRegion, InflightError> {
        let needed = region_bytes(format, num_queues, queue_size);
        if needed == 0 {
            return Err(InflightError::TooSmall { needed: QUEUE_ALIGN, given: mmap_size });
        }
        if mmap_size < needed {
            return Err(InflightError::TooSmall { needed, given: mmap_size });
        }
        if !mmap_offset.is_multiple_of(QUEUE_ALIGN) {
            return Err(InflightError::Misaligned(mmap_offset));
        }
        // Only what the geometry needs is mapped: a huge mmap_size buys the frontend nothing.
        let mapping = MappedRegion::map(file, mmap_offset, 0, needed, 0, hangup)
            .map_err(InflightError::Map)?;
        Ok(InflightRegion { mapping, format, num_queues, queue_size })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s part for a ring of `format` and `ring_size` descriptors, as the
    /// tracker of that layout.
    pub fn tracker(
        self: &Arc<Self>,
        index: u16,
        format: RingFormat,
        ring_size: u16,
    ) -> Result<Tracker, InflightError> {
        if format != self.format {
            return Err(InflightError::Layout { region: self.format, ring: format });
        }
        Ok(match format {
            RingFormat::Split => Tracker::Split(self.queue(index, ring_size)?),
            RingFormat::Packed => {
                let base = self.queue_base(index, ring_size)?;
                Tracker::Packed(PackedInflight::new(
                    Arc::clone(self),
                    base,
                    self.queue_size,
                    ring_size,
                ))
            }
        })
    }

    /// Where queue `index`'s part begins, once checked to lie in the region.
    fn queue_base(&self, index: u16, ring_size: u16) -> Result<*mut u8, InflightError> {
        if index >= self.num_queues {
            return Err(InflightError::NoSuchQueue { index, num_queues: self.num_queues });
        }
        if ring_size > self.queue_size {
            return Err(InflightError::RingTooLarge { ring: ring_size, tracked: self.queue_size });
        }
        let offset = u64::from(index) * queue_bytes(self.format, self.queue_size);
        // SAFETY: index < num_queues, so the queue's part (queue_bytes) lies inside the
        // mapping of region_bytes(format, num_queues, queue_size) bytes.
        Ok(unsafe { self.mapping.host().add(offset as usize) })
    }

    /// Queue `index`'s part of a split-ring region, for a ring of `ring_size` descriptors.
    pub fn queue(
        self: &Arc<Self>,
        index: u16,
        ring_size: u16,
    ) -> Result<InflightQueue, InflightError> {
        if self.format != RingFormat::Split {
            return Err(InflightError::Layout { region: self.format, ring: RingFormat::Split });
        }
        let base = self.queue_base(index, ring_size)?;
        Ok(InflightQueue {
            _region: Arc::clone(self),
            base,
            tracked: self.queue_size,
            ring_size,
            counter: 1,
        })
    }
}

/// One queue's part of the region, written by the I/O thread that serves the queue.
pub struct InflightQueue {
    /// Keeps the mapping alive while `base` points into it.
    _region: Arc<InflightRegion>,
    /// The queue's header; 64-aligned (the mapping is page-aligned plus a multiple of 64).
    base: *mut u8,
    /// Descriptor states in the region (desc_num).
    tracked: u16,
    /// Descriptors of the ring being served (heads are below it).
    ring_size: u16,
    /// Order in which heads were taken; the next one to give.
    counter: u64,
}

// SAFETY: `base` points into a mapping the Arc keeps alive; the queue is used by one thread
// at a time (the I/O thread serving the ring), like the SplitQueue beside it.
unsafe impl Send for InflightQueue {}

/// What [`InflightQueue::recover`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The region was fresh (version 0): nothing to resubmit, and the frontend's avail index
    /// stands.
    pub fresh: bool,
    /// Entries of the last batch that were published but still marked, now unmarked.
    pub batch_fixed: u16,
}

impl InflightQueue {
    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: callers pass header offsets (< 16) or descriptor fields of an index below
        // `tracked`, all inside the queue's part; the base is 64-aligned and every u16 field
        // is at an even offset.
        unsafe { &*self.base.add(offset).cast::<AtomicU16>() }
    }

    /// Offset of descriptor `head`'s state (16 bytes) from the queue's base.
    fn desc_offset(&self, head: u16) -> usize {
        debug_assert!(head < self.tracked);
        HEADER_BYTES as usize + DESC_STATE_BYTES as usize * usize::from(head)
    }

    fn desc_inflight(&self, head: u16) -> &AtomicU8 {
        // SAFETY: head < tracked: the state lies inside the queue's part.
        unsafe { &*self.base.add(self.desc_offset(head) + DESC_OFF_INFLIGHT).cast::<AtomicU8>() }
    }

    fn desc_next(&self, head: u16) -> &AtomicU16 {
        self.u16_at(self.desc_offset(head) + DESC_OFF_NEXT)
    }

    fn desc_counter(&self, head: u16) -> &AtomicU64 {
        // SAFETY: head < tracked: the state lies inside the queue's part; the counter is at
        // +8 of a 16-byte state that starts 16 + 16 * head bytes from a 64-aligned base.
        unsafe { &*self.base.add(self.desc_offset(head) + DESC_OFF_COUNTER).cast::<AtomicU64>() }
    }

    fn features(&self) -> &AtomicU64 {
        // SAFETY: the header's first 8 bytes, 64-aligned.
        unsafe { &*self.base.cast::<AtomicU64>() }
    }

    /// Reads what an earlier process left (or starts a fresh region) given the ring's
    /// used->idx and avail->idx; pushes the heads still in flight into `resubmit`, oldest
    /// first. After it, the ring resumes taking new requests at `used_idx + resubmit.len()`.
    pub fn recover(
        &mut self,
        used_idx: u16,
        avail_idx: u16,
        resubmit: &mut Vec<u16>,
    ) -> Result<Recovered, InflightError> {
        resubmit.clear();
        match self.u16_at(OFF_VERSION).load(Ordering::Acquire) {
            0 => {
                self.reset(used_idx);
                return Ok(Recovered { fresh: true, batch_fixed: 0 });
            }
            VERSION => {}
            other => return Err(InflightError::UnknownVersion(other)),
        }
        let desc_num = self.u16_at(OFF_DESC_NUM).load(Ordering::Relaxed);
        if desc_num != self.tracked {
            return Err(InflightError::DescNum { found: desc_num, expected: self.tracked });
        }
        // Everything the guest posted is answered: whatever the region says is stale (a ring
        // set up afresh after a guest reset, with a frontend that kept its region).
        if avail_idx == used_idx {
            self.reset(used_idx);
            return Ok(Recovered { fresh: false, batch_fixed: 0 });
        }
        let ring = self.ring_size;
        let check = |head: u16| {
            if head < ring {
                Ok(head)
            } else {
                Err(InflightError::HeadOutOfRange { head, ring })
            }
        };
        let region_used = self.u16_at(OFF_USED_IDX).load(Ordering::Relaxed);
        let batch = used_idx.wrapping_sub(region_used);
        if batch > ring {
            return Err(InflightError::BatchTooLong { batch, ring });
        }
        if batch > 0 {
            let mut head = check(self.u16_at(OFF_LAST_BATCH_HEAD).load(Ordering::Relaxed))?;
            for i in 0..batch {
                self.desc_inflight(head).store(0, Ordering::Release);
                if i + 1 < batch {
                    head = check(self.desc_next(head).load(Ordering::Relaxed))?;
                }
            }
            self.u16_at(OFF_USED_IDX).store(used_idx, Ordering::Release);
        }
        let mut marked: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.tracked {
            match self.desc_inflight(head).load(Ordering::Relaxed) {
                0 => {}
                _ => {
                    check(head)?;
                    marked.push((self.desc_counter(head).load(Ordering::Relaxed), head));
                }
            }
        }
        marked.sort_unstable();
        self.counter = marked.last().map_or(1, |&(c, _)| c.wrapping_add(1));
        resubmit.extend(marked.iter().map(|&(_, head)| head));
        Ok(Recovered { fresh: false, batch_fixed: batch })
    }

    /// Lays the header down and clears every state, the version last, so that a crash
    /// half-way leaves a region that reads as it did.
    fn reset(&mut self, used_idx: u16) {
        self.u16_at(OFF_VERSION).store(0, Ordering::Release);
        self.features().store(0, Ordering::Relaxed);
        self.u16_at(OFF_DESC_NUM).store(self.tracked, Ordering::Relaxed);
        self.u16_at(OFF_LAST_BATCH_HEAD).store(0, Ordering::Relaxed);
        self.u16_at(OFF_USED_IDX).store(used_idx, Ordering::Relaxed);
        for head in 0..self.tracked {
            self.desc_inflight(head).store(0, Ordering::Relaxed);
            self.desc_next(head).store(0, Ordering::Relaxed);
            self.desc_counter(head).store(0, Ordering::Relaxed);
        }
        self.u16_at(OFF_VERSION).store(VERSION, Ordering::Release);
        self.counter = 1;
    }

    /// A head was taken from the avail ring: mark it, in the order taken.
    #[inline]
    pub fn taken(&mut self, head: u16) {
        if head >= self.tracked {
            return;
        }
        self.desc_counter(head).store(self.counter, Ordering::Release);
        self.counter = self.counter.wrapping_add(1);
        self.desc_inflight(head).store(1, Ordering::Release);
    }

    /// A head's used element was written (not yet published): link it into the last batch.
    #[inline]
    pub fn used(&mut self, head: u16) {
        if head >= self.tracked {
            return;
        }
        let last = self.u16_at(OFF_LAST_BATCH_HEAD);
        self.desc_next(head).store(last.load(Ordering::Relaxed), Ordering::Release);
        last.store(head, Ordering::Release);
    }

    /// used->idx now covers the last `count` heads linked: unmark them, then record the
    /// index. The walk follows the list we wrote; bounded by `count` and by the ring.
    #[inline]
    pub fn published(&mut self, count: u16, used_idx: u16) {
        let mut head = self.u16_at(OFF_LAST_BATCH_HEAD).load(Ordering::Relaxed);
        for _ in 0..count {
            if head >= self.tracked {
                break;
            }
            self.desc_inflight(head).store(0, Ordering::Release);
            head = self.desc_next(head).load(Ordering::Relaxed);
        }
        self.u16_at(OFF_USED_IDX).store(used_idx, Ordering::Release);
    }

    /// Whether `head` is marked in flight (for tests and statistics).
    pub fn is_marked(&self, head: u16) -> bool {
        head < self.tracked && self.desc_inflight(head).load(Ordering::Relaxed) != 0
    }
}

/// One queue's part of the region, whichever ring layout it tracks: what the I/O thread
/// calls at each step of a request (the procedure above, or the one in `inflight/packed.rs`).
pub enum Tracker {
    Split(InflightQueue),
    Packed(PackedInflight),
}

impl Tracker {
    /// `ring` just gave request `head` (a split ring's head, a packed ring's buffer ID):
    /// marked before it starts. Fails only on a packed ring the guest overfilled.
    #[inline]
    pub fn taken(&mut self, ring: &Ring, head: u16) -> Result<(), InflightError> {
        match (self, ring) {
            (Tracker::Split(t), _) => {
                t.taken(head);
                Ok(())
            }
            (Tracker::Packed(t), Ring::Packed(q)) => t.taken(q.popped_descs(), head),
            (Tracker::Packed(_), Ring::Split(_)) => {
                Err(InflightError::Layout { region: RingFormat::Packed, ring: RingFormat::Split })
            }
        }
    }

    /// Request `head`'s used element was written (not yet published).
    #[inline]
    pub fn used(&mut self, head: u16) {
        match self {
            Tracker::Split(t) => t.used(head),
            Tracker::Packed(t) => t.used(head),
        }
    }

    /// The ring is about to publish its batch of used elements.
    #[inline]
    pub fn publishing(&mut self, ring: &Ring) {
        if let Tracker::Packed(t) = self {
            t.publishing(super::packed::RingPos::from_bits(ring.used_index()));
        }
    }

    /// The ring published its batch of `count` used elements.
    #[inline]
    pub fn published(&mut self, count: u16, ring: &Ring) {
        match self {
            Tracker::Split(t) => t.published(count, ring.used_index()),
            Tracker::Packed(t) => t.published(),
        }
    }

    /// Takes request `item` of a resubmission again (a split ring's head, a packed ring's
    /// entry in the region): its buffer's tag and what the chain walk found.
    pub fn resubmit(
        &self,
        ring: &mut Ring,
        mem: &GuestMemory,
        item: u16,
        sink: &mut impl ChainSink,
    ) -> Result<(u16, ChainOutcome), QueueError> {
        match (self, ring) {
            (Tracker::Split(_), Ring::Split(q)) => {
                q.walk_chain(mem, item, sink).map(|o| (item, o)).map_err(QueueError::Chain)
            }
            (Tracker::Packed(t), Ring::Packed(q)) => q.resubmit(mem, t.chain(item), sink),
            // `InflightRegion::tracker` made the tracker for the ring's own layout.
            _ => Err(QueueError::Chain(super::split::ChainError::IndexOutOfRange)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> Arc<InflightRegion> {
        Arc::new(InflightRegion::create(RingFormat::Split, queues, size, None).unwrap().0)
    }

    #[test]
    fn layout_matches_the_spec_structs() {
        // 16-byte header + 16 bytes per descriptor, each queue on a 64-byte boundary.
        assert_eq!(queue_bytes(RingFormat::Split, 128), 16 + 16 * 128 + 48);
        assert_eq!(queue_bytes(RingFormat::Split, 1), 64);
        assert_eq!(region_bytes(RingFormat::Split, 2, 256), 2 * (16 + 16 * 256 + 48));
    }

    #[test]
    fn fresh_region_is_initialized_and_resumes_nothing() {
        let r = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        let mut heads = vec![99];
        assert_eq!(q.recover(5, 5, &mut heads).unwrap(), Recovered { fresh: true, batch_fixed: 0 });
        assert!(heads.is_empty());
        assert_eq!(q.u16_at(OFF_VERSION).load(Ordering::Relaxed), VERSION);
        assert_eq!(q.u16_at(OFF_DESC_NUM).load(Ordering::Relaxed), 8);
        assert_eq!(q.u16_at(OFF_USED_IDX).load(Ordering::Relaxed), 5);
    }

    #[test]
    fn marked_heads_come_back_oldest_first_and_published_ones_do_not() {
        let r = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        q.recover(0, 0, &mut Vec::new()).unwrap();
        for head in [5, 2, 7, 1] {
            q.taken(head);
        }
        // 2 answered and published.
        q.used(2);
        q.published(1, 1);
        // 7 answered, published (used->idx 2) but the process died before unmarking it.
        q.used(7);
        let mut q2 = r.queue(0, 8).unwrap();
        let mut heads = Vec::new();
        let found = q2.recover(2, 4, &mut heads).unwrap();
        assert_eq!(found, Recovered { fresh: false, batch_fixed: 1 });
        assert_eq!(heads, vec![5, 1]);
        assert!(!q2.is_marked(7));
        // New heads are ordered after the resubmitted ones.
        q2.taken(3);
        assert!(
            q2.desc_counter(3).load(Ordering::Relaxed) > q2.desc_counter(1).load(Ordering::Relaxed)
        );
    }

    #[test]
    fn marks_are_stale_when_the_guest_has_nothing_outstanding() {
        let r = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        q.recover(0, 0, &mut Vec::new()).unwrap();
        q.taken(3);
        // The guest reset its ring (used and avail both 0) and the frontend kept the region.
        let mut heads = vec![];
        let found = q.recover(0, 0, &mut heads).unwrap();
        assert_eq!(found, Recovered { fresh: false, batch_fixed: 0 });
        assert!(heads.is_empty());
        assert!(!q.is_marked(3));
        assert_eq!(q.u16_at(OFF_VERSION).load(Ordering::Relaxed), VERSION);
    }

    #[test]
    fn hostile_regions_are_refused() {
        let r = region(2, 8);
        assert!(matches!(r.queue(2, 8), Err(InflightError::NoSuchQueue { .. })));
        assert!(matches!(r.queue(0, 16), Err(InflightError::RingTooLarge { .. })));
        let mut q = r.queue(0, 4).unwrap();
        q.recover(0, 0, &mut Vec::new()).unwrap();
        // A head marked beyond the ring in use.
        q.desc_inflight(6).store(1, Ordering::Relaxed);
        assert!(matches!(
            q.recover(0, 1, &mut Vec::new()),
            Err(InflightError::HeadOutOfRange { head: 6, ring: 4 })
        ));
        q.desc_inflight(6).store(0, Ordering::Relaxed);
        // A last batch longer than the ring.
        assert!(matches!(
            q.recover(9, 10, &mut Vec::new()),
            Err(InflightError::BatchTooLong { batch: 9, ring: 4 })
        ));
        // A batch list that leaves the ring.
        q.u16_at(OFF_LAST_BATCH_HEAD).store(300, Ordering::Relaxed);
        assert!(matches!(
            q.recover(1, 2, &mut Vec::new()),
            Err(InflightError::HeadOutOfRange { .. })
        ));
        q.u16_at(OFF_DESC_NUM).store(4, Ordering::Relaxed);
        assert!(matches!(q.recover(0, 1, &mut Vec::new()), Err(InflightError::DescNum { .. })));
        q.u16_at(OFF_VERSION).store(7, Ordering::Relaxed);
        assert!(matches!(q.recover(0, 1, &mut Vec::new()), Err(InflightError::UnknownVersion(7))));
        // Too small for its geometry, misaligned.
        let (_, file) = InflightRegion::create(RingFormat::Split, 1, 8, None).unwrap();
        assert!(matches!(
            InflightRegion::map(&file, 0, 64, RingFormat::Split, 2, 8, None),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::map(&file, 8, 4096, RingFormat::Split, 1, 8, None),
            Err(InflightError::Misaligned(8))
        ));
        // Bigger than its file: refused before anything is mapped.
        assert!(matches!(
            InflightRegion::map(&file, 0, 1 << 20, RingFormat::Split, 64, 256, None),
            Err(InflightError::Map(_))
        ));
    }
}
