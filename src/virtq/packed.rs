//! The packed virtqueue (virtio 1.1, 2.8): one descriptor ring that the driver fills with
//! available descriptors and the device overwrites with used ones, and two small event
//! suppression areas (the driver's, which we read, and the device's, which we write). Whose
//! turn a descriptor is goes by its AVAIL and USED flag bits against a wrap counter each side
//! keeps and flips at every lap of the ring.
//!
//! As in the split ring, the guest may write anything into the ring at any time: a chain is
//! bounded by the ring's size and by `max_chain_len`, buffer IDs are checked, and what the
//! guest claims about wrap counters decides only whether we see a request, never where we
//! read or write.

use std::ptr;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};

use super::memory::GuestMemory;
use super::split::{read_raw_desc, ChainError, ChainOutcome, ChainSink, QueueError, RingAddrs};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_F_AVAIL: u16 = 1 << 7;
const DESC_F_USED: u16 = 1 << 15;
const DESC_BYTES: u64 = 16;

/// Event suppression flags (2.8.10): notify always, never, or at one descriptor (EVENT_IDX).
const EVENT_ENABLE: u16 = 0;
const EVENT_DISABLE: u16 = 1;
const EVENT_DESC: u16 = 2;
const EVENT_FLAGS_MASK: u16 = 3;

/// Bytes of either event suppression area: off_wrap and flags.
pub const EVENT_AREA_BYTES: u64 = 4;
/// The largest packed ring (2.8: queue sizes up to 2^15, the 16th bit is the wrap counter).
pub const MAX_SIZE: u16 = 1 << 15;
/// Where a ring position carries its wrap counter (in VRING_BASE and in off_wrap).
const WRAP_BIT: u16 = 1 << 15;

/// A position in the ring and the wrap counter of the lap it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingPos {
    pub index: u16,
    pub wrap: bool,
}

impl RingPos {
    /// Where both sides start: position 0, wrap counter 1 (2.8.1).
    #[cfg(test)]
    pub const START: RingPos = RingPos { index: 0, wrap: true };

    /// From the 16-bit form (bits 0-14 the position, bit 15 the wrap counter).
    pub fn from_bits(bits: u16) -> RingPos {
        RingPos { index: bits & !WRAP_BIT, wrap: bits & WRAP_BIT != 0 }
    }

    pub fn bits(self) -> u16 {
        self.index | if self.wrap { WRAP_BIT } else { 0 }
    }

    /// Moves `n` (at most `size`) descriptors on, flipping the wrap counter past the end.
    fn advance(&mut self, n: u16, size: u16) {
        let next = u32::from(self.index) + u32::from(n);
        if next >= u32::from(size) {
            self.index = (next - u32::from(size)) as u16;
            self.wrap = !self.wrap;
        } else {
            self.index = next as u16;
        }
    }
}

/// The ring state VHOST_USER_GET/SET_VRING_BASE carry for a packed ring, as QEMU lays it out:
/// the next available position in bits 0-15, the next used position in bits 16-31, each
/// with its wrap counter in its top bit.
pub fn base_bits(avail: RingPos, used: RingPos) -> u32 {
    u32::from(avail.bits()) | u32::from(used.bits()) << 16
}

/// Splits a VRING_BASE value into (next available, next used). A frontend that sends only
/// the low half (no used position) had nothing in flight: used is where avail is.
pub fn split_base(base: u32) -> (RingPos, RingPos) {
    let avail = RingPos::from_bits(base as u16);
    let used = match (base >> 16) as u16 {
        0 => avail,
        bits => RingPos::from_bits(bits),
    };
    (avail, used)
}

/// One descriptor of the ring or of an indirect table, as read (or as the inflight region
/// keeps a copy of it, see `inflight/packed.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

/// Reads descriptor `index` of a table or ring at `table`.
///
/// # Safety
/// `table` must point to at least `index + 1` descriptors inside a live guest mapping.
unsafe fn read_desc(table: *const u8, index: u16) -> Desc {
    // SAFETY: the caller's guarantee, passed on.
    let raw = unsafe { read_raw_desc(table, index) };
    Desc {
        addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
        len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
        id: u16::from_le_bytes([raw[12], raw[13]]),
        flags: u16::from_le_bytes([raw[14], raw[15]]),
    }
}

/// Whether a descriptor with `flags` is available in the lap whose wrap counter is `wrap`:
/// AVAIL equals the counter and USED does not (2.8.1).
fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) != wrap
}

/// A packed virtqueue being served by one I/O thread.
pub struct PackedQueue {
    desc: *mut u8,
    driver_event: *const u8,
    device_event: *mut u8,
    size: u16,
    avail: RingPos,
    used: RingPos,
    /// Ring descriptors the chain of each buffer ID took, by ID: how far its used element
    /// moves the used position (2.8.6). Allocated once, when the queue starts.
    chain_descs: Box<[u16]>,
    /// The first used element written since the last publish: its position and the flags
    /// that make it used, written last so the guest sees the whole batch at once.
    unpublished_first: Option<(u16, u16)>,
    /// Where the last chain `pop` took began, and how many ring descriptors it took: what
    /// the inflight region copies (see [`PackedQueue::popped_descs`]).
    last_popped: (u16, u16),
    /// Used elements written since the guest was last notified (EVENT_IDX arithmetic).
    unsignalled: u32,
    signalled_valid: bool,
    event_idx: bool,
    indirect: bool,
    /// Bound on buffer descriptors in one chain, including those of an indirect table.
    max_chain_len: usize,
}

// SAFETY: the pointers refer to guest memory kept mapped by the GuestMemory the owning I/O
// thread holds; the queue is used by exactly one thread at a time.
unsafe impl Send for PackedQueue {}

impl PackedQueue {
    /// Sets up the queue on the ring and event areas at `addrs` (descriptor ring, driver
    /// area, device area: SET_VRING_ADDR's descriptor, avail and used addresses), validating
    /// that each lies inside guest memory and is aligned (2.8.10.1: 16 for the ring, 4 for
    /// the areas). `base` is the VRING_BASE value (see [`split_base`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: &GuestMemory,
        addrs: RingAddrs,
        size: u16,
        base: u32,
        event_idx: bool,
        indirect: bool,
        max_chain_len: usize,
    ) -> Result<PackedQueue, QueueError> {
        if size == 0 || size > MAX_SIZE {
            return Err(QueueError::PackedSize { size });
        }
        let (avail, used) = split_base(base);
        if avail.index >= size || used.index >= size {
            return Err(QueueError::PackedBase { base, size });
        }
        let desc = mem
            .translate_user(addrs.desc_user_addr, DESC_BYTES * u64::from(size))
            .ok_or(QueueError::RingOutsideMemory("descriptor"))?;
        let driver_event = mem
            .translate_user(addrs.avail_user_addr, EVENT_AREA_BYTES)
            .ok_or(QueueError::RingOutsideMemory("driver event area"))?;
        let device_event = mem
            .translate_user(addrs.used_user_addr, EVENT_AREA_BYTES)
            .ok_or(QueueError::RingOutsideMemory("device event area"))?;
        if !(desc as usize).is_multiple_of(16) {
            return Err(QueueError::RingMisaligned("descriptor"));
        }
        if !(driver_event as usize).is_multiple_of(4) {
            return Err(QueueError::RingMisaligned("driver event area"));
        }
        if !(device_event as usize).is_multiple_of(4) {
            return Err(QueueError::RingMisaligned("device event area"));
        }
        Ok(PackedQueue {
            desc,
            driver_event,
            device_event,
            size,
            avail,
            used,
            chain_descs: vec![1; usize::from(size)].into_boxed_slice(),
            unpublished_first: None,
            last_popped: (0, 0),
            unsignalled: 0,
            signalled_valid: false,
            event_idx,
            indirect,
            max_chain_len: max_chain_len.max(1),
        })
    }

    /// Where the next request is looked for.
    #[cfg(test)]
    pub fn next_avail(&self) -> RingPos {
        self.avail
    }

    /// Where the next used element goes.
    pub fn next_used(&self) -> RingPos {
        self.used
    }

    /// The state to hand back in GET_VRING_BASE.
    pub fn base(&self) -> u32 {
        base_bits(self.avail, self.used)
    }

    /// The descriptor ring's host address and length: the device writes used elements into
    /// it, so a migration must log it.
    pub fn ring_host(&self) -> (usize, u64) {
        (self.desc as usize, DESC_BYTES * u64::from(self.size))
    }

    fn flags_at(&self, index: u16) -> &AtomicU16 {
        debug_assert!(index < self.size);
        // SAFETY: index < size, and the ring was validated to hold size descriptors,
        // 16-aligned; flags are the last 2 bytes of each, so 2-aligned.
        unsafe { &*self.desc.add(usize::from(index) * 16 + 14).cast::<AtomicU16>() }
    }

    fn driver_event(&self) -> &AtomicU32 {
        // SAFETY: validated to hold 4 bytes, 4-aligned: off_wrap (low half) and flags.
        unsafe { &*self.driver_event.cast::<AtomicU32>() }
    }

    fn device_event_flags(&self) -> &AtomicU16 {
        // SAFETY: validated to hold 4 bytes, 4-aligned; flags are at +2.
        unsafe { &*self.device_event.add(2).cast::<AtomicU16>() }
    }

    /// Whether the head at the next available position is available, acquiring what the
    /// driver wrote before it: pairs with the driver's write barrier between filling a
    /// chain and publishing its head's flags.
    fn head_available(&self) -> bool {
        let flags = u16::from_le(self.flags_at(self.avail.index).load(Ordering::Acquire));
        is_avail(flags, self.avail.wrap)
    }

    /// How many chains are available from the next position on (at most one ring's worth).
    /// Only heads are checked: the driver makes a chain available by its head's flags, last.
    pub fn avail_count(&self) -> u16 {
        let mut pos = self.avail;
        let mut chains = 0u16;
        let mut descs = 0u16;
        while descs < self.size {
            let mut flags = u16::from_le(self.flags_at(pos.index).load(Ordering::Acquire));
            if !is_avail(flags, pos.wrap) {
                break;
            }
            chains += 1;
            loop {
                descs += 1;
                pos.advance(1, self.size);
                if flags & DESC_F_NEXT == 0 || descs >= self.size {
                    break;
                }
                flags = u16::from_le(self.flags_at(pos.index).load(Ordering::Relaxed));
            }
        }
        chains
    }

    /// Takes the next available chain, pushing its buffers (split at region boundaries)
    /// into `sink`; returns its buffer ID and what the walk found, or None if nothing is
    /// available. The walk is bounded by the ring's size and by `max_chain_len`, so a chain
    /// that goes round the ring ends in an error rather than a hang.
    pub fn pop(
        &mut self,
        mem: &GuestMemory,
        sink: &mut impl ChainSink,
    ) -> Result<Option<(u16, ChainOutcome)>, QueueError> {
        if !self.head_available() {
            return Ok(None);
        }
        let start = self.avail.index;
        let (id, ring_descs, outcome) = self
            .walk(mem, sink, self.ring_descs_from(start, self.size))
            .map_err(QueueError::Chain)?;
        if id >= self.size {
            return Err(QueueError::BufferIdOutOfRange { id, size: self.size });
        }
        self.chain_descs[usize::from(id)] = ring_descs;
        self.last_popped = (start, ring_descs);
        self.avail.advance(ring_descs, self.size);
        Ok(Some((id, outcome)))
    }

    /// Takes a chain again from copies of its descriptors (an inflight resubmission: the
    /// ring itself may have been overwritten by used elements since), as `pop` would.
    pub fn resubmit(
        &mut self,
        mem: &GuestMemory,
        descs: impl Iterator<Item = Desc>,
        sink: &mut impl ChainSink,
    ) -> Result<(u16, ChainOutcome), QueueError> {
        let (id, ring_descs, outcome) = self.walk(mem, sink, descs).map_err(QueueError::Chain)?;
        if id >= self.size {
            return Err(QueueError::BufferIdOutOfRange { id, size: self.size });
        }
        self.chain_descs[usize::from(id)] = ring_descs;
        Ok((id, outcome))
    }

    /// The ring descriptors of the chain the last `pop` took, read again for the inflight
    /// region's copies (nothing overwrites them before that chain is answered).
    pub fn popped_descs(&self) -> impl Iterator<Item = Desc> + '_ {
        let (start, count) = self.last_popped;
        self.ring_descs_from(start, count)
    }

    /// `count` (at most `size`) descriptors of the ring from position `start` on, wrapping.
    fn ring_descs_from(&self, start: u16, count: u16) -> impl Iterator<Item = Desc> + '_ {
        let mut index = start;
        (0..count.min(self.size)).map(move |_| {
            // SAFETY: index < size (start is a ring position, wrapped below), and the ring
            // was validated to hold size descriptors.
            let d = unsafe { read_desc(self.desc, index) };
            index = if index + 1 == self.size { 0 } else { index + 1 };
            d
        })
    }

    /// Resumes after a daemon that died: used elements go from `used` on, and the
    /// `in_flight_descs` descriptors after it belong to the chains being resubmitted, so the
    /// next new chain is looked for past them. Those positions are the device's; any used
    /// element the dead daemon wrote there but never published is made to read as not used
    /// again, or the guest would take it once our first batch lands before it.
    pub fn resume(&mut self, used: RingPos, in_flight_descs: u16) {
        self.used = used;
        let mut pos = used;
        for _ in 0..in_flight_descs.min(self.size) {
            let flags = u16::from_le(self.flags_at(pos.index).load(Ordering::Relaxed));
            let lap = if pos.wrap { DESC_F_AVAIL } else { DESC_F_USED };
            let flags = flags & !(DESC_F_AVAIL | DESC_F_USED) | lap;
            self.flags_at(pos.index).store(flags.to_le(), Ordering::Relaxed);
            pos.advance(1, self.size);
        }
        self.avail = pos;
    }

    /// Whether the device made the descriptor at `pos` used in that lap (or the driver has
    /// gone past it), i.e. it no longer reads as available: how the inflight recovery tells a
    /// batch that was published from one that was not (its first element's flags go last).
    pub fn published_at(&self, pos: RingPos) -> bool {
        if pos.index >= self.size {
            return false;
        }
        let flags = u16::from_le(self.flags_at(pos.index).load(Ordering::Acquire));
        !is_avail(flags, pos.wrap)
    }

    /// Walks the chain whose descriptors `descs` gives in order (the ring from the next
    /// available position, or an inflight region's copies): (buffer ID, ring descriptors
    /// taken, outcome). A chain that does not end within `descs` is too long.
    fn walk(
        &self,
        mem: &GuestMemory,
        sink: &mut impl ChainSink,
        descs: impl Iterator<Item = Desc>,
    ) -> Result<(u16, u16, ChainOutcome), ChainError> {
        let mut walk = Walk::default();
        let mut ring_descs = 0u16;
        for d in descs {
            ring_descs += 1;
            if d.flags & DESC_F_INDIRECT != 0 {
                if ring_descs > 1 {
                    return Err(ChainError::IndirectAfterDirect);
                }
                self.walk_indirect(mem, d, sink, &mut walk)?;
                return Ok((d.id, ring_descs, walk.outcome));
            }
            let last = d.flags & DESC_F_NEXT == 0;
            walk.buffer(mem, d, last, self.max_chain_len, sink)?;
            if last {
                return Ok((d.id, ring_descs, walk.outcome));
            }
        }
        Err(ChainError::TooLong)
    }

    /// The buffers of an indirect table (2.8.19): entries one after the other, only their
    /// WRITE flag meaning anything.
    fn walk_indirect(
        &self,
        mem: &GuestMemory,
        d: Desc,
        sink: &mut impl ChainSink,
        walk: &mut Walk,
    ) -> Result<(), ChainError> {
        if !self.indirect {
            return Err(ChainError::IndirectNotNegotiated);
        }
        if d.flags & DESC_F_NEXT != 0 {
            return Err(ChainError::IndirectWithNext);
        }
        if d.len == 0 || u64::from(d.len) % DESC_BYTES != 0 {
            return Err(ChainError::BadIndirectLength);
        }
        let entries = u64::from(d.len) / DESC_BYTES;
        if entries > self.max_chain_len as u64 {
            return Err(ChainError::TooLong);
        }
        let table = mem
            .translate_contiguous(d.addr, u64::from(d.len))
            .ok_or(ChainError::IndirectOutsideMemory)?;
        let entries = entries as u16;
        for i in 0..entries {
            // SAFETY: i < entries, and the table was translated as entries * 16 bytes.
            let mut e = unsafe { read_desc(table, i) };
            e.flags &= DESC_F_WRITE;
            walk.buffer(mem, e, i + 1 == entries, self.max_chain_len, sink)?;
        }
        Ok(())
    }

    /// Writes a used element for buffer `id` having written `len` bytes (not yet visible:
    /// see `publish_used`). `id` must come from `pop`.
    pub fn push_used(&mut self, id: u16, len: u32) {
        let index = self.used.index;
        let flags = if self.used.wrap { DESC_F_AVAIL | DESC_F_USED } else { 0 };
        // SAFETY: index < size (RingPos::advance keeps it so), inside the validated ring.
        unsafe {
            let elem = self.desc.add(usize::from(index) * 16);
            ptr::write_volatile(elem.add(8).cast::<u32>(), len.to_le());
            ptr::write_volatile(elem.add(12).cast::<u16>(), id.to_le());
        }
        if self.unpublished_first.is_none() {
            self.unpublished_first = Some((index, flags));
        } else {
            // Release: the guest that sees these flags sees the id and len above. It reads
            // no further than the first element, held back until publish.
            self.flags_at(index).store(flags.to_le(), Ordering::Release);
        }
        let descs = self.chain_descs.get(usize::from(id)).copied().unwrap_or(1);
        self.used.advance(descs, self.size);
        self.unsignalled = self.unsignalled.saturating_add(1);
    }

    /// Makes every `push_used` so far visible to the guest.
    pub fn publish_used(&mut self) {
        if let Some((index, flags)) = self.unpublished_first.take() {
            // Release pairs with the driver's read barrier after it sees a used descriptor's
            // flags: every element of the batch was written before this store.
            self.flags_at(index).store(flags.to_le(), Ordering::Release);
        }
    }

    /// Whether the guest wants an interrupt for what was published since the last one,
    /// from its event suppression area (2.8.10): never, always, or once the used position
    /// passed the descriptor it named (EVENT_IDX).
    pub fn needs_notification(&mut self) -> bool {
        // Full barrier between publishing used elements and reading the driver's
        // suppression state; pairs with the driver's barrier between writing its area and
        // re-reading the ring, so one of the two sides always sees the other.
        fence(Ordering::SeqCst);
        let event = u32::from_le(self.driver_event().load(Ordering::Relaxed));
        let (off_wrap, flags) = (event as u16, (event >> 16) as u16 & EVENT_FLAGS_MASK);
        let notify = match flags {
            EVENT_DISABLE => false,
            EVENT_DESC if self.event_idx => self.passed_event(off_wrap),
            // ENABLE, and DESC without EVENT_IDX (reserved): notify rather than leave the
            // guest waiting.
            _ => true,
        };
        if notify {
            self.unsignalled = 0;
            self.signalled_valid = true;
        }
        notify
    }

    /// Whether the used elements written since the last notification cover the position
    /// `off_wrap` names. Positions are compared in one lap's coordinates: an event in the
    /// lap before the current one counts `size` below 0, as the driver's own test does.
    fn passed_event(&self, off_wrap: u16) -> bool {
        if !self.signalled_valid || self.unsignalled >= u32::from(self.size) {
            return true;
        }
        let event_pos = RingPos::from_bits(off_wrap);
        let mut event = event_pos.index;
        if event_pos.wrap != self.used.wrap {
            event = event.wrapping_sub(self.size);
        }
        let new = self.used.index;
        let old = new.wrapping_sub(self.unsignalled as u16);
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// Asks the guest not to kick while we are busy or polling anyway.
    pub fn disable_notifications(&mut self) {
        self.device_event_flags().store(EVENT_DISABLE.to_le(), Ordering::Relaxed);
    }

    /// Asks the guest to kick on its next request. Returns true if a request arrived in the
    /// meantime, in which case the caller must process it instead of sleeping.
    pub fn enable_notifications(&mut self) -> bool {
        self.device_event_flags().store(EVENT_ENABLE.to_le(), Ordering::Relaxed);
        // Full barrier between publishing "kick me" and re-reading the ring; pairs with the
        // driver's barrier between making a chain available and reading our area. Without
        // it a request could slip in unseen with no kick coming: a lost wake-up.
        fence(Ordering::SeqCst);
        self.head_available()
    }
}

/// What a walk found so far, across ring and indirect descriptors.
#[derive(Default)]
struct Walk {
    outcome: ChainOutcome,
    buffers: usize,
    seen_writable: bool,
}

impl Walk {
    /// One buffer descriptor: checked for order and the chain's bound, pushed into `sink`.
    fn buffer(
        &mut self,
        mem: &GuestMemory,
        d: Desc,
        last: bool,
        max_chain_len: usize,
        sink: &mut impl ChainSink,
    ) -> Result<(), ChainError> {
        self.buffers += 1;
        if self.buffers > max_chain_len {
            return Err(ChainError::TooLong);
        }
        let writable = d.flags & DESC_F_WRITE != 0;
        if writable {
            self.seen_writable = true;
        } else if self.seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        let outcome = &mut self.outcome;
        outcome.longest_bytes = outcome.longest_bytes.max(d.len);
        if !outcome.unusable && !mem.translate(d.addr, d.len, |iov| sink.push(iov, writable)) {
            outcome.unusable = true;
        }
        if last && writable && d.len > 0 {
            mem.translate(d.addr.wrapping_add(u64::from(d.len) - 1), 1, |iov| {
                outcome.tail = Some(iov);
                true
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
