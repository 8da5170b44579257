//! The split virtqueue (virtio 1.x, 2.7): descriptor table, avail ring and used ring, all in
//! guest memory, shared with a guest that may write anything into them at any time.
//!
//! Every index read from the guest is checked before use, every walk is bounded, and all
//! ring accesses are volatile or atomic. Memory-ordering notes say which barrier on the
//! driver's side each one pairs with.

use std::fmt;
use std::ptr;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use super::memory::{GuestIov, GuestMemory};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

/// avail->flags bit: the driver asks not to be interrupted (ignored with EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// used->flags bit: we ask the driver not to kick (ignored with EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;

/// Bytes of a used ring of `size` entries: flags, idx, the elements, avail_event.
pub fn used_ring_bytes(size: u16) -> u64 {
    6 + 8 * u64::from(size)
}

/// The three ring addresses, in the frontend's virtual address space (SET_VRING_ADDR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc_user_addr: u64,
    pub avail_user_addr: u64,
    pub used_user_addr: u64,
}

/// Faults that make the whole queue unusable: the guest broke the ring protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// A ring does not lie inside one region of guest memory.
    RingOutsideMemory(&'static str),
    /// A ring is not aligned as the spec requires.
    RingMisaligned(&'static str),
    /// avail->idx moved further ahead of us than the queue has entries.
    AvailIdxJump { avail_idx: u16, next_avail: u16, size: u16 },
    /// A head index in the avail ring is not a descriptor index.
    HeadOutOfRange { head: u16, size: u16 },
    /// A descriptor chain broke the rules (see the variant).
    Chain(ChainError),
    /// A packed ring's size is 0 or above 2^15.
    PackedSize { size: u16 },
    /// A packed ring's VRING_BASE names a position beyond the ring.
    PackedBase { base: u32, size: u16 },
    /// A packed ring's chain carries a buffer ID that is not below the queue size.
    BufferIdOutOfRange { id: u16, size: u16 },
}

/// Structural faults in one descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A `next` index beyond the table.
    IndexOutOfRange,
    /// More descriptors than the bound (loops end here).
    TooLong,
    /// An indirect descriptor inside an indirect table.
    NestedIndirect,
    /// An indirect descriptor that also has NEXT set.
    IndirectWithNext,
    /// An indirect table whose length is zero or not a multiple of 16.
    BadIndirectLength,
    /// INDIRECT used without the feature being negotiated.
    IndirectNotNegotiated,
    /// The indirect table itself is not inside one guest memory region.
    IndirectOutsideMemory,
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    /// A packed ring's indirect descriptor after direct ones in the same chain.
    IndirectAfterDirect,
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::RingOutsideMemory(which) => write!(f, "{which} ring outside guest memory"),
            QueueError::RingMisaligned(which) => write!(f, "{which} ring misaligned"),
            QueueError::AvailIdxJump { avail_idx, next_avail, size } => {
                write!(f, "avail index {avail_idx} is more than {size} ahead of {next_avail}")
            }
            QueueError::HeadOutOfRange { head, size } => {
                write!(f, "avail head {head} out of range for queue size {size}")
            }
            QueueError::Chain(e) => write!(f, "bad descriptor chain: {e:?}"),
            QueueError::PackedSize { size } => {
                write!(f, "packed ring size {size} is not between 1 and 32768")
            }
            QueueError::PackedBase { base, size } => {
                write!(f, "packed ring base {base:#x} names a position beyond queue size {size}")
            }
            QueueError::BufferIdOutOfRange { id, size } => {
                write!(f, "buffer ID {id} out of range for queue size {size}")
            }
        }
    }
}

/// Where a walked chain's buffers go. The request layer implements it.
pub trait ChainSink {
    /// Takes one host range. Returns false if there is no room (the request then fails).
    fn push(&mut self, iov: GuestIov, writable: bool) -> bool;
}

/// What a chain walk found besides the buffers it pushed.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChainOutcome {
    /// Some descriptor pointed outside guest memory or did not fit: the request cannot be
    /// served, but the chain itself was well formed.
    pub unusable: bool,
    /// The last byte of the chain's last descriptor, if it is device-writable and inside guest
    /// memory: where a failed request's status byte goes.
    pub tail: Option<GuestIov>,
    /// The longest buffer descriptor's length (what virtio-blk's size_max bounds).
    pub longest_bytes: u32,
}

#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Reads the 16 bytes of descriptor `index` of a table at `table` (either ring layout).
///
/// # Safety
/// `table` must point to at least `index + 1` descriptors inside a live guest mapping.
pub(super) unsafe fn read_raw_desc(table: *const u8, index: u16) -> [u8; 16] {
    // SAFETY: the caller guarantees the 16 bytes at this offset are mapped. The guest may
    // change them concurrently; one volatile read takes one snapshot that we then validate.
    unsafe { ptr::read_volatile(table.add(usize::from(index) * 16).cast::<[u8; 16]>()) }
}

/// Reads descriptor `index` of a table at `table`.
///
/// # Safety
/// As [`read_raw_desc`].
unsafe fn read_desc(table: *const u8, index: u16) -> Desc {
    // SAFETY: the caller's guarantee, passed on.
    let raw = unsafe { read_raw_desc(table, index) };
    Desc {
        addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
        len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
        flags: u16::from_le_bytes([raw[12], raw[13]]),
        next: u16::from_le_bytes([raw[14], raw[15]]),
    }
}

/// A split virtqueue being served by one I/O thread.
pub struct SplitQueue {
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
    next_avail: u16,
    /// avail->idx as last read; entries up to it were already validated as a batch.
    cached_avail_idx: u16,
    next_used: u16,
    /// next_used when the guest was last notified (EVENT_IDX arithmetic needs it).
    signalled_used: u16,
    signalled_valid: bool,
    event_idx: bool,
    indirect: bool,
    /// Bound on descriptors in one chain, including those of an indirect table.
    max_chain_len: usize,
}

// SAFETY: the pointers refer to guest memory kept mapped by the GuestMemory the owning I/O
// thread holds; the queue is used by exactly one thread at a time.
unsafe impl Send for SplitQueue {}

impl SplitQueue {
    /// Sets up the queue on the rings at `addrs`, validating that each lies inside guest
    /// memory and is aligned (spec 2.7: 16 for descriptors, 2 for avail, 4 for used).
    pub fn new(
        mem: &GuestMemory,
        addrs: RingAddrs,
        size: u16,
        next_avail: u16,
        event_idx: bool,
        indirect: bool,
        max_chain_len: usize,
    ) -> Result<SplitQueue, QueueError> {
        let n = u64::from(size);
        let desc = mem
            .translate_user(addrs.desc_user_addr, DESC_SIZE * n)
            .ok_or(QueueError::RingOutsideMemory("descriptor"))?;
        let avail = mem
            .translate_user(addrs.avail_user_addr, 6 + 2 * n)
            .ok_or(QueueError::RingOutsideMemory("avail"))?;
        let used = mem
            .translate_user(addrs.used_user_addr, used_ring_bytes(size))
            .ok_or(QueueError::RingOutsideMemory("used"))?;
        if !(desc as usize).is_multiple_of(16) {
            return Err(QueueError::RingMisaligned("descriptor"));
        }
        if !(avail as usize).is_multiple_of(2) {
            return Err(QueueError::RingMisaligned("avail"));
        }
        if !(used as usize).is_multiple_of(4) {
            return Err(QueueError::RingMisaligned("used"));
        }
        let mut q = SplitQueue {
            desc,
            avail,
            used,
            size,
            next_avail,
            cached_avail_idx: next_avail,
            next_used: 0,
            signalled_used: 0,
            signalled_valid: false,
            event_idx,
            indirect,
            max_chain_len: max_chain_len.max(usize::from(size)),
        };
        // We resume where the used ring says the device stopped: every request popped before
        // a stop was completed before it, so this equals next_avail on a well-behaved restart.
        q.next_used = q.used_idx().load(Ordering::Acquire);
        Ok(q)
    }

    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Takes new requests from `next_avail` on (after an inflight recovery, which knows
    /// better than the frontend's base how many the last process took).
    pub fn resume_at(&mut self, next_avail: u16) {
        self.next_avail = next_avail;
        self.cached_avail_idx = next_avail;
    }

    /// The driver's avail index as it is now.
    pub fn avail_index(&self) -> u16 {
        self.avail_idx().load(Ordering::Acquire)
    }

    /// The used index as published (read from the ring when the queue started).
    pub fn used_index(&self) -> u16 {
        self.next_used
    }

    fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: avail was validated to hold 6 + 2 * size bytes, 2-aligned; idx is at +2.
        unsafe { &*self.avail.add(2).cast::<AtomicU16>() }
    }

    fn avail_flags(&self) -> &AtomicU16 {
        // SAFETY: as avail_idx; flags is at +0.
        unsafe { &*self.avail.cast::<AtomicU16>() }
    }

    fn used_event(&self) -> &AtomicU16 {
        // SAFETY: as avail_idx; used_event follows the ring, at 4 + 2 * size.
        unsafe { &*self.avail.add(4 + 2 * usize::from(self.size)).cast::<AtomicU16>() }
    }

    fn used_flags(&self) -> &AtomicU16 {
        // SAFETY: used was validated to hold 6 + 8 * size bytes, 4-aligned; flags is at +0.
        unsafe { &*self.used.cast::<AtomicU16>() }
    }

    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: as used_flags; idx is at +2.
        unsafe { &*self.used.add(2).cast::<AtomicU16>() }
    }

    fn avail_event(&self) -> &AtomicU16 {
        // SAFETY: as used_flags; avail_event follows the ring, at 4 + 8 * size.
        unsafe { &*self.used.add(4 + 8 * usize::from(self.size)).cast::<AtomicU16>() }
    }

    /// How many new heads the avail ring holds. Fails if the guest moved its index further
    /// than the queue size (it would make us re-read entries it has not written).
    pub fn avail_count(&mut self) -> Result<u16, QueueError> {
        // Acquire pairs with the driver's write barrier between filling a ring entry and
        // publishing avail->idx: every entry up to idx is visible after this load.
        let avail_idx = self.avail_idx().load(Ordering::Acquire);
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > self.size {
            return Err(QueueError::AvailIdxJump {
                avail_idx,
                next_avail: self.next_avail,
                size: self.size,
            });
        }
        self.cached_avail_idx = avail_idx;
        Ok(pending)
    }

    /// Takes the next head from the avail ring; call only after `avail_count` said there is
    /// one.
    pub fn pop_head(&mut self) -> Result<Option<u16>, QueueError> {
        if self.next_avail == self.cached_avail_idx {
            return Ok(None);
        }
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: slot < size; the avail ring holds `size` u16 entries from offset 4.
        let head =
            u16::from_le(unsafe { ptr::read_volatile(self.avail.add(4 + 2 * slot).cast::<u16>()) });
        self.next_avail = self.next_avail.wrapping_add(1);
        if head >= self.size {
            return Err(QueueError::HeadOutOfRange { head, size: self.size });
        }
        Ok(Some(head))
    }

    /// Walks the chain starting at `head`, pushing each buffer (split at region boundaries)
    /// into `sink`. Every index is checked and the walk is bounded by `max_chain_len`, so a
    /// looping or endless chain ends in an error rather than a hang.
    pub fn walk_chain(
        &self,
        mem: &GuestMemory,
        head: u16,
        sink: &mut impl ChainSink,
    ) -> Result<ChainOutcome, ChainError> {
        let mut outcome = ChainOutcome::default();
        let mut table = self.desc;
        let mut table_len = self.size;
        let mut index = head;
        let mut in_indirect = false;
        let mut seen_writable = false;
        for _ in 0..=self.max_chain_len {
            if index >= table_len {
                return Err(ChainError::IndexOutOfRange);
            }
            // SAFETY: index < table_len, and table holds table_len descriptors: the ring was
            // validated in new(), an indirect table when it was entered below.
            let d = unsafe { read_desc(table, index) };
            if d.flags & DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if in_indirect {
                    return Err(ChainError::NestedIndirect);
                }
                if d.flags & DESC_F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext);
                }
                if d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 {
                    return Err(ChainError::BadIndirectLength);
                }
                let entries = u64::from(d.len) / DESC_SIZE;
                if entries > self.max_chain_len as u64 {
                    return Err(ChainError::TooLong);
                }
                table = mem
                    .translate_contiguous(d.addr, u64::from(d.len))
                    .ok_or(ChainError::IndirectOutsideMemory)?;
                table_len = entries as u16;
                index = 0;
                in_indirect = true;
                continue;
            }
            let writable = d.flags & DESC_F_WRITE != 0;
            if writable {
                seen_writable = true;
            } else if seen_writable {
                return Err(ChainError::ReadableAfterWritable);
            }
            outcome.longest_bytes = outcome.longest_bytes.max(d.len);
            if !outcome.unusable && !mem.translate(d.addr, d.len, |iov| sink.push(iov, writable)) {
                outcome.unusable = true;
            }
            if d.flags & DESC_F_NEXT == 0 {
                if writable && d.len > 0 {
                    mem.translate(d.addr.wrapping_add(u64::from(d.len) - 1), 1, |iov| {
                        outcome.tail = Some(iov);
                        true
                    });
                }
                return Ok(outcome);
            }
            index = d.next;
        }
        Err(ChainError::TooLong)
    }

    /// Puts a completed chain into the used ring (not yet visible: see `publish_used`).
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.next_used % self.size);
        // SAFETY: slot < size; used elements are 8 bytes each from offset 4, inside the
        // validated used ring and 4-aligned.
        unsafe {
            let elem = self.used.add(4 + 8 * slot);
            ptr::write_volatile(elem.cast::<u32>(), u32::from(head).to_le());
            ptr::write_volatile(elem.add(4).cast::<u32>(), len.to_le());
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Makes every `push_used` so far visible to the guest.
    pub fn publish_used(&mut self) {
        // Release pairs with the driver's read barrier after it reads used->idx: the elements
        // written above are visible before the index that covers them.
        self.used_idx().store(self.next_used, Ordering::Release);
    }

    /// Whether the guest wants an interrupt for what was published since the last one.
    pub fn needs_notification(&mut self) -> bool {
        // Full barrier between publishing used->idx and reading the driver's suppression
        // state; pairs with the driver's barrier between writing used_event (or flags) and
        // re-reading used->idx, so one of the two sides always sees the other.
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let notify = if self.event_idx {
            let old = self.signalled_used;
            let event = self.used_event().load(Ordering::Relaxed);
            !self.signalled_valid || new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.avail_flags().load(Ordering::Relaxed) & AVAIL_F_NO_INTERRUPT == 0
        };
        if notify {
            self.signalled_used = new;
            self.signalled_valid = true;
        }
        notify
    }

    /// Asks the guest not to kick while we are busy or polling anyway.
    pub fn disable_notifications(&mut self) {
        if !self.event_idx {
            self.used_flags().store(USED_F_NO_NOTIFY, Ordering::Relaxed);
        }
        // With EVENT_IDX, leaving avail_event behind the driver's index suppresses kicks.
    }

    /// Asks the guest to kick on its next request. Returns true if requests arrived in the
    /// meantime, in which case the caller must process them instead of sleeping.
    pub fn enable_notifications(&mut self) -> bool {
        if self.event_idx {
            self.avail_event().store(self.next_avail, Ordering::Relaxed);
        } else {
            self.used_flags().store(0, Ordering::Relaxed);
        }
        // Full barrier between publishing "kick me" and re-reading avail->idx; pairs with the
        // driver's barrier between publishing avail->idx and reading our suppression state.
        // Without it a request could slip in unseen with no kick coming: a lost wake-up.
        fence(Ordering::SeqCst);
        self.avail_idx().load(Ordering::Acquire) != self.next_avail
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::blk::request::{parse, ChainBuf, DiskLimits, Request};
    use crate::virtq::testing::{descriptor, request_header, write, USER_BASE};

    const RAM: u64 = 1 << 20;
    const QSIZE: u16 = 16;

    fn guest_ram() -> (std::fs::File, GuestMemory) {
        crate::virtq::testing::guest_ram(RAM)
    }

    #[derive(Debug, Clone)]
    struct RawDesc {
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    }

    fn desc_strategy() -> impl Strategy<Value = RawDesc> {
        let addr = prop_oneof![
            8 => 0x4000u64..RAM,            // inside guest memory
            1 => RAM - 64..RAM + 64,        // straddling its end
            1 => any::<u64>(),              // anywhere
        ];
        (addr, 0u32..70_000, 0u16..8, 0u16..(QSIZE + 4))
            .prop_map(|(addr, len, flags, next)| RawDesc { addr, len, flags, next })
    }

    proptest! {
        /// Whatever the guest writes into the descriptor table, the walk ends, never panics,
        /// and hands out only ranges inside guest memory.
        #[test]
        fn chain_walk_is_bounded_and_stays_in_guest_memory(
            descs in proptest::collection::vec(desc_strategy(), QSIZE as usize),
            indirect_table in proptest::collection::vec(desc_strategy(), 0..8),
            head in 0u16..QSIZE,
            indirect in any::<bool>(),
            hdr_kind in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            hdr_sector in prop_oneof![0u64..4096, any::<u64>()],
        ) {
            let (_file, mem) = guest_ram();
            for (i, d) in descs.iter().enumerate() {
                write(&mem, 16 * i as u64, &descriptor(d.addr, d.len, d.flags, d.next));
            }
            for (i, d) in indirect_table.iter().enumerate() {
                let flags = d.flags & !DESC_F_INDIRECT;
                write(&mem, 0x3000 + 16 * i as u64, &descriptor(d.addr, d.len, flags, d.next));
            }
            // Headers at every plausible data address, so parsing gets past the header often.
            for gpa in (0x4000..RAM).step_by(0x10000) {
                write(&mem, gpa, &request_header(hdr_kind, hdr_sector));
            }
            let addrs = RingAddrs {
                desc_user_addr: USER_BASE,
                avail_user_addr: USER_BASE + 0x1000,
                used_user_addr: USER_BASE + 0x2000,
            };
            let q = SplitQueue::new(&mem, addrs, QSIZE, 0, false, indirect, 32).unwrap();
            let mut chain = ChainBuf::with_capacity(32);
            let host_base = mem.translate_contiguous(0, 1).unwrap() as usize;
            let in_ram = |iov: &GuestIov| iov.addr() >= host_base && iov.addr() + iov.len() <= host_base + RAM as usize;
            if let Ok(outcome) = q.walk_chain(&mem, head, &mut chain) {
                if let Some(t) = outcome.tail {
                    prop_assert!(in_ram(&t) && t.len() == 1);
                }
                let limits =
                    DiskLimits { capacity_bytes: 1 << 30, readonly: false, logical_block_bytes: 512 };
                let parsed = parse(&mut chain, outcome, &limits);
                match parsed.result {
                    Ok(Request::Read { offset, bytes, data } | Request::Write { offset, bytes, data }) => {
                        prop_assert!(offset + bytes <= limits.capacity_bytes);
                        prop_assert_eq!(bytes % 512, 0);
                        for iov in chain.iovs(data) {
                            prop_assert!(in_ram(iov));
                        }
                    }
                    Ok(Request::Discard { offset, bytes } | Request::WriteZeroes { offset, bytes, .. }) => {
                        prop_assert!(offset + bytes <= limits.capacity_bytes);
                    }
                    Ok(Request::GetId { bytes, .. }) => prop_assert!(bytes <= 20),
                    Ok(Request::Flush) | Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn a_looping_chain_is_refused() {
        let (_file, mem) = guest_ram();
        // Descriptor 0 leads to 1, and 1 back to 0.
        write(&mem, 0, &descriptor(0x4000, 16, DESC_F_NEXT, 1));
        write(&mem, 16, &descriptor(0x4000, 16, DESC_F_NEXT, 0));
        let addrs = RingAddrs {
            desc_user_addr: USER_BASE,
            avail_user_addr: USER_BASE + 0x1000,
            used_user_addr: USER_BASE + 0x2000,
        };
        let q = SplitQueue::new(&mem, addrs, QSIZE, 0, false, false, 32).unwrap();
        let mut chain = ChainBuf::with_capacity(64);
        assert_eq!(q.walk_chain(&mem, 0, &mut chain).unwrap_err(), ChainError::TooLong);
    }

    #[test]
    fn rings_outside_memory_or_misaligned_are_refused() {
        let (_file, mem) = guest_ram();
        let good = RingAddrs {
            desc_user_addr: USER_BASE,
            avail_user_addr: USER_BASE + 0x1000,
            used_user_addr: USER_BASE + 0x2000,
        };
        let outside = RingAddrs { used_user_addr: USER_BASE + RAM - 8, ..good };
        assert_eq!(
            SplitQueue::new(&mem, outside, QSIZE, 0, false, false, 32).err(),
            Some(QueueError::RingOutsideMemory("used"))
        );
        let misaligned = RingAddrs { desc_user_addr: USER_BASE + 8, ..good };
        assert_eq!(
            SplitQueue::new(&mem, misaligned, QSIZE, 0, false, false, 32).err(),
            Some(QueueError::RingMisaligned("descriptor"))
        );
    }
}
