//! A packed ring's part of the inflight region (vhost-user "Inflight I/O tracking",
//! `QueueRegionPacked`). Unlike a split ring's, a packed ring's state is not all in guest
//! memory: the device overwrites the descriptors of requests still in flight with used
//! elements, and the frontend (QEMU 7.2) cannot say where the ring stood after losing us. So
//! the region keeps both: a copy of every descriptor taken (`DescStatePacked` entries, on a
//! free list) and the used position with its wrap counter.
//!
//! Entries: a chain of n ring descriptors takes n entries off the free list (from
//! `free_head`, following `next`), the first one being its head entry (`inflight`,
//! `counter`, `num` = n, `last` = its last entry). Answering puts the whole chain back on the
//! list (`desc[last].next = free_head; free_head = head`).
//!
//! The stores, in this order (we are the region's only writer while we run; only a dying
//! process matters, see `inflight.rs`):
//!
//! - taking a chain, after the ring walk accepted it: head entry `num = 0`, `counter`,
//!   `inflight = 1`; the descriptor copies; the head's `last` and `num`; then `free_head`,
//!   then `old_free_head` (the chain is committed: `old_free_head == free_head` between
//!   chains);
//! - publishing a batch of used elements: each answered chain pushed on the free list, then
//!   one 8-byte store of `used_idx`/`used_wrap_counter` (the `old_` pair unchanged), then the
//!   ring's publish (the batch's first used element's flags), then `inflight = 0` for the
//!   batch's heads, then `old_free_head = free_head` and one 8-byte store making the `old_`
//!   pair equal to the new one. The chains are put back at publish time, not as each is
//!   answered, because a request answered while the round still takes new ones would
//!   otherwise lend its entries to a new chain before the batch is committed.
//! - recovering (the spec's procedure): if the used pair differs from the old pair, the
//!   descriptor at the old used position tells whether the batch reached the guest (it no
//!   longer reads as available in that lap): if so it is committed (old = new), else rolled
//!   back (new = old, `free_head = old_free_head`). Every entry on the free list is then not
//!   in flight; the heads still marked are resubmitted in `counter` order from their copies,
//!   and the ring resumes with used elements at the old used position and new requests
//!   after the descriptors those chains took.
//!
//! The 8-byte stores keep a position and its wrap counter from ever being seen torn. The
//! region comes from the frontend: recovery checks every index, count and position before it
//! trusts them, and rebuilds the free list from what is not in flight; on the data path every
//! index read back from the region is checked again before it is used.

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::{InflightError, InflightRegion, VERSION};
use crate::virtq::packed::{Desc, RingPos};

/// Queue header (`QueueRegionPacked` up to `desc[]`): features, version, desc_num,
/// free_head, old_free_head, used_idx, old_used_idx, used_wrap_counter,
/// old_used_wrap_counter, 7 bytes of padding, then the u64-aligned array.
pub(super) const HEADER_BYTES: u64 = 32;
/// One `DescStatePacked`.
pub(super) const DESC_STATE_BYTES: u64 = 32;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_FREE_HEAD: usize = 12;
const OFF_OLD_FREE_HEAD: usize = 14;
/// used_idx (16), old_used_idx (18), used_wrap_counter (20), old_used_wrap_counter (21) and
/// two bytes of padding: one aligned u64.
const OFF_POSITIONS: usize = 16;

const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_NEXT: usize = 2;
const DESC_OFF_LAST: usize = 4;
const DESC_OFF_NUM: usize = 6;
const DESC_OFF_COUNTER: usize = 8;
const DESC_OFF_ID: usize = 16;
const DESC_OFF_FLAGS: usize = 18;
const DESC_OFF_LEN: usize = 20;
const DESC_OFF_ADDR: usize = 24;

/// The used position as the region records it: the current and the committed ("old") one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Positions {
    used: RingPos,
    old: RingPos,
}

impl Positions {
    fn settled(pos: RingPos) -> Positions {
        Positions { used: pos, old: pos }
    }

    fn to_word(self) -> u64 {
        u64::from(self.used.index)
            | u64::from(self.old.index) << 16
            | u64::from(self.used.wrap) << 32
            | u64::from(self.old.wrap) << 40
    }

    fn from_word(w: u64) -> Positions {
        Positions {
            used: RingPos { index: w as u16, wrap: (w >> 32) as u8 != 0 },
            old: RingPos { index: (w >> 16) as u16, wrap: (w >> 40) as u8 != 0 },
        }
    }
}

/// What [`PackedInflight::recover`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct PackedRecovered {
    /// The region was fresh (version 0): nothing to resubmit, the frontend's base stands.
    pub fresh: bool,
    /// Where used elements go next.
    pub used: RingPos,
    /// Ring descriptors the resubmitted chains took: new requests are looked for after them.
    pub in_flight_descs: u16,
    /// The last batch had reached the guest but was not yet committed in the region.
    pub committed: bool,
}

/// A packed ring's part of the region, written by the I/O thread that serves the queue.
pub struct PackedInflight {
    /// Keeps the mapping alive while `base` points into it.
    _region: Arc<InflightRegion>,
    /// The queue's header; 64-aligned (the mapping is page-aligned plus a multiple of 64).
    base: *mut u8,
    /// Entries in the region (desc_num).
    tracked: u16,
    /// Descriptors of the ring being served.
    ring_size: u16,
    /// Order in which chains were taken; the next one to give.
    counter: u64,
    /// The used position the region holds as committed (mirrors its `old_` pair).
    committed: RingPos,
    /// Head entry of each buffer ID's chain while it is in flight (by ID, below ring_size).
    entry_of_id: Box<[u16]>,
    /// Head entries answered since the last publish: at most one per request in flight, so
    /// never more than the ring size (allocated once, at queue start).
    batch: Box<[u16]>,
    batch_len: usize,
}

// SAFETY: `base` points into a mapping the Arc keeps alive; the queue is used by one thread
// at a time (the I/O thread serving the ring), like the PackedQueue beside it.
unsafe impl Send for PackedInflight {}

impl PackedInflight {
    pub(super) fn new(
        region: Arc<InflightRegion>,
        base: *mut u8,
        tracked: u16,
        ring_size: u16,
    ) -> PackedInflight {
        PackedInflight {
            _region: region,
            base,
            tracked,
            ring_size,
            counter: 1,
            committed: RingPos { index: 0, wrap: true },
            entry_of_id: vec![0; usize::from(ring_size)].into_boxed_slice(),
            batch: vec![0; usize::from(ring_size)].into_boxed_slice(),
            batch_len: 0,
        }
    }

    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        debug_assert!(offset < self.part_bytes() && offset.is_multiple_of(2));
        // SAFETY: callers pass header offsets (< 32) or fields of an entry below `tracked`,
        // all inside the queue's part; the base is 64-aligned, every u16 field is at an even
        // offset.
        unsafe { &*self.base.add(offset).cast::<AtomicU16>() }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset < self.part_bytes() && offset.is_multiple_of(8));
        // SAFETY: as u16_at; the u64 fields (features, the positions word, counter, addr)
        // are at multiples of 8 from a 64-aligned base (header and entries are 32 bytes).
        unsafe { &*self.base.add(offset).cast::<AtomicU64>() }
    }

    fn part_bytes(&self) -> usize {
        HEADER_BYTES as usize + DESC_STATE_BYTES as usize * usize::from(self.tracked)
    }

    /// Offset of entry `e` (32 bytes) from the queue's base; `e` below `tracked`.
    fn entry(&self, e: u16) -> usize {
        debug_assert!(e < self.tracked);
        HEADER_BYTES as usize + DESC_STATE_BYTES as usize * usize::from(e)
    }

    fn inflight(&self, e: u16) -> &AtomicU8 {
        // SAFETY: e < tracked: the entry lies inside the queue's part.
        unsafe { &*self.base.add(self.entry(e) + DESC_OFF_INFLIGHT).cast::<AtomicU8>() }
    }

    fn len_field(&self, e: u16) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: e < tracked: inside the queue's part; len is at +20 of a 32-byte entry
        // that starts at a multiple of 32 from a 64-aligned base, so 4-aligned.
        unsafe {
            &*self.base.add(self.entry(e) + DESC_OFF_LEN).cast::<std::sync::atomic::AtomicU32>()
        }
    }

    fn next(&self, e: u16) -> u16 {
        self.u16_at(self.entry(e) + DESC_OFF_NEXT).load(Ordering::Relaxed)
    }

    fn positions(&self) -> Positions {
        Positions::from_word(self.u64_at(OFF_POSITIONS).load(Ordering::Acquire))
    }

    fn set_positions(&self, p: Positions) {
        self.u64_at(OFF_POSITIONS).store(p.to_word(), Ordering::Release);
    }

    /// Entry `e`'s copy of a ring descriptor.
    fn copy(&self, e: u16) -> Desc {
        let at = self.entry(e);
        Desc {
            addr: self.u64_at(at + DESC_OFF_ADDR).load(Ordering::Relaxed),
            len: self.len_field(e).load(Ordering::Relaxed),
            id: self.u16_at(at + DESC_OFF_ID).load(Ordering::Relaxed),
            flags: self.u16_at(at + DESC_OFF_FLAGS).load(Ordering::Relaxed),
        }
    }

    fn set_copy(&self, e: u16, d: Desc) {
        let at = self.entry(e);
        self.u64_at(at + DESC_OFF_ADDR).store(d.addr, Ordering::Release);
        self.len_field(e).store(d.len, Ordering::Release);
        self.u16_at(at + DESC_OFF_ID).store(d.id, Ordering::Release);
        self.u16_at(at + DESC_OFF_FLAGS).store(d.flags, Ordering::Release);
    }

    /// The descriptors of the chain whose head entry is `head`, from the copies; ends early
    /// (the walk then finds the chain too short) if an index no longer fits.
    pub fn chain(&self, head: u16) -> impl Iterator<Item = Desc> + '_ {
        let num = if head < self.tracked {
            self.u16_at(self.entry(head) + DESC_OFF_NUM).load(Ordering::Relaxed)
        } else {
            0
        };
        let mut e = head;
        (0..num.min(self.ring_size)).map_while(move |k| {
            if k > 0 {
                e = self.next(e);
            }
            (e < self.tracked).then(|| self.copy(e))
        })
    }

    /// Reads what an earlier process left (or starts a fresh region at `start_used`, the
    /// frontend's used position), pushing the head entries still in flight into `resubmit`,
    /// oldest first. `published_at` says whether the ring's descriptor at a position no
    /// longer reads as available (see [`crate::virtq::packed::PackedQueue::published_at`]).
    pub fn recover(
        &mut self,
        start_used: RingPos,
        published_at: impl Fn(RingPos) -> bool,
        resubmit: &mut Vec<u16>,
    ) -> Result<PackedRecovered, InflightError> {
        resubmit.clear();
        match self.u16_at(OFF_VERSION).load(Ordering::Acquire) {
            0 => {
                self.reset(start_used);
                let fresh = PackedRecovered {
                    fresh: true,
                    used: start_used,
                    in_flight_descs: 0,
                    committed: false,
                };
                return Ok(fresh);
            }
            VERSION => {}
            other => return Err(InflightError::UnknownVersion(other)),
        }
        let desc_num = self.u16_at(OFF_DESC_NUM).load(Ordering::Relaxed);
        if desc_num != self.tracked {
            return Err(InflightError::DescNum { found: desc_num, expected: self.tracked });
        }
        let committed = self.settle_last_batch(&published_at)?;
        let free = self.clear_free_list();
        let (heads, in_flight_descs) = self.chains_in_flight(&free)?;
        self.rebuild_free_list(&heads, &free);
        let mut marked: Vec<(u64, u16)> = heads
            .iter()
            .map(|&h| (self.u64_at(self.entry(h) + DESC_OFF_COUNTER).load(Ordering::Relaxed), h))
            .collect();
        marked.sort_unstable();
        self.counter = marked.last().map_or(1, |&(c, _)| c.wrapping_add(1));
        resubmit.extend(marked.iter().map(|&(_, h)| h));
        Ok(PackedRecovered { fresh: false, used: self.committed, in_flight_descs, committed })
    }

    /// Commits the last batch if it reached the guest, else rolls it back; either way the
    /// region's used pair and free head are then settled. Returns whether it committed.
    fn settle_last_batch(
        &mut self,
        published_at: &impl Fn(RingPos) -> bool,
    ) -> Result<bool, InflightError> {
        let p = self.positions();
        for pos in [p.used, p.old] {
            if pos.index >= self.ring_size {
                return Err(InflightError::PackedState("used position outside the ring"));
            }
        }
        let committed = p.used != p.old && published_at(p.old);
        let settled = if committed {
            let free_head = self.u16_at(OFF_FREE_HEAD).load(Ordering::Relaxed);
            self.u16_at(OFF_OLD_FREE_HEAD).store(free_head, Ordering::Release);
            p.used
        } else {
            let old_free_head = self.u16_at(OFF_OLD_FREE_HEAD).load(Ordering::Relaxed);
            self.u16_at(OFF_FREE_HEAD).store(old_free_head, Ordering::Release);
            p.old
        };
        self.set_positions(Positions::settled(settled));
        self.committed = settled;
        Ok(committed)
    }

    /// Walks the free list (bounded by the entries), unmarking every entry on it: a chain
    /// put back by a committed batch, or one whose taking was cut short. Returns which
    /// entries are free.
    fn clear_free_list(&mut self) -> Vec<bool> {
        let mut free = vec![false; usize::from(self.tracked)];
        let mut e = self.u16_at(OFF_FREE_HEAD).load(Ordering::Relaxed);
        for _ in 0..self.tracked {
            if e >= self.tracked || free[usize::from(e)] {
                break;
            }
            free[usize::from(e)] = true;
            self.inflight(e).store(0, Ordering::Release);
            e = self.next(e);
        }
        free
    }

    /// The head entries still marked, checked: each chain's entries in range, not free and
    /// not another chain's, its last entry where `last` says, its buffer ID in the ring and
    /// unique, and all chains together no longer than the ring. Returns them and the ring
    /// descriptors they took.
    fn chains_in_flight(&mut self, free: &[bool]) -> Result<(Vec<u16>, u16), InflightError> {
        let mut owned = free.to_vec();
        let mut id_seen = vec![false; usize::from(self.ring_size)];
        let mut heads = Vec::new();
        let mut descs = 0u32;
        for head in 0..self.tracked {
            if free[usize::from(head)] || self.inflight(head).load(Ordering::Relaxed) == 0 {
                continue;
            }
            let at = self.entry(head);
            let num = self.u16_at(at + DESC_OFF_NUM).load(Ordering::Relaxed);
            if num == 0 || num > self.ring_size {
                return Err(InflightError::PackedState("a chain of no or too many descriptors"));
            }
            let mut e = head;
            for k in 0..num {
                if k > 0 {
                    e = self.next(e);
                }
                if e >= self.tracked || owned[usize::from(e)] {
                    return Err(InflightError::PackedState(
                        "a chain's entries overlap or leave it",
                    ));
                }
                owned[usize::from(e)] = true;
            }
            if self.u16_at(at + DESC_OFF_LAST).load(Ordering::Relaxed) != e {
                return Err(InflightError::PackedState(
                    "a chain's last entry is not where it ends",
                ));
            }
            let id = self.copy(e).id;
            if id >= self.ring_size || std::mem::replace(&mut id_seen[usize::from(id)], true) {
                return Err(InflightError::PackedState("a buffer ID outside the ring or twice"));
            }
            self.entry_of_id[usize::from(id)] = head;
            descs += u32::from(num);
            heads.push(head);
        }
        if descs > u32::from(self.ring_size) {
            return Err(InflightError::PackedState("more descriptors in flight than the ring"));
        }
        Ok((heads, descs as u16))
    }

    /// Links every entry that no chain in flight holds into a new free list, in index
    /// order, the free head last: whatever the list was, the ring's worth of entries is free
    /// again. A crash half-way leaves links between free entries only, which the next
    /// recovery's bounded walk reads right.
    fn rebuild_free_list(&mut self, heads: &[u16], free: &[bool]) {
        let mut held = vec![false; usize::from(self.tracked)];
        for &head in heads {
            let mut e = head;
            let num = self.u16_at(self.entry(head) + DESC_OFF_NUM).load(Ordering::Relaxed);
            for k in 0..num {
                if k > 0 {
                    e = self.next(e);
                }
                held[usize::from(e)] = true;
            }
        }
        debug_assert!(free.iter().zip(&held).all(|(f, h)| !(*f && *h)));
        let mut first = self.tracked;
        for e in (0..self.tracked).rev().filter(|&e| !held[usize::from(e)]) {
            self.inflight(e).store(0, Ordering::Release);
            self.u16_at(self.entry(e) + DESC_OFF_NEXT).store(first, Ordering::Release);
            first = e;
        }
        self.u16_at(OFF_FREE_HEAD).store(first, Ordering::Release);
        self.u16_at(OFF_OLD_FREE_HEAD).store(first, Ordering::Release);
    }

    /// Lays the header down and every entry on the free list, the version last, so that a
    /// crash half-way leaves a region that reads as it did.
    fn reset(&mut self, used: RingPos) {
        self.u16_at(OFF_VERSION).store(0, Ordering::Release);
        self.u64_at(0).store(0, Ordering::Relaxed);
        self.u16_at(OFF_DESC_NUM).store(self.tracked, Ordering::Relaxed);
        for e in 0..self.tracked {
            let at = self.entry(e);
            self.inflight(e).store(0, Ordering::Relaxed);
            self.u16_at(at + DESC_OFF_NEXT).store(e + 1, Ordering::Relaxed);
            self.u16_at(at + DESC_OFF_LAST).store(0, Ordering::Relaxed);
            self.u16_at(at + DESC_OFF_NUM).store(0, Ordering::Relaxed);
            self.u64_at(at + DESC_OFF_COUNTER).store(0, Ordering::Relaxed);
            self.set_copy(e, Desc::default());
        }
        self.u16_at(OFF_FREE_HEAD).store(0, Ordering::Relaxed);
        self.u16_at(OFF_OLD_FREE_HEAD).store(0, Ordering::Relaxed);
        self.set_positions(Positions::settled(used));
        self.u16_at(OFF_VERSION).store(VERSION, Ordering::Release);
        self.committed = used;
        self.counter = 1;
    }

    /// The ring gave buffer `id`, whose ring descriptors are `descs`: copies them into
    /// entries off the free list and marks the chain, before the request starts. Fails if
    /// the list runs out, which only a guest that made descriptors available twice causes.
    #[inline]
    pub fn taken(
        &mut self,
        descs: impl Iterator<Item = Desc>,
        id: u16,
    ) -> Result<(), InflightError> {
        let head = self.u16_at(OFF_OLD_FREE_HEAD).load(Ordering::Relaxed);
        if head >= self.tracked || usize::from(id) >= self.entry_of_id.len() {
            return Err(InflightError::OutOfEntries);
        }
        let at = self.entry(head);
        self.u16_at(at + DESC_OFF_NUM).store(0, Ordering::Release);
        self.u64_at(at + DESC_OFF_COUNTER).store(self.counter, Ordering::Release);
        self.counter = self.counter.wrapping_add(1);
        self.inflight(head).store(1, Ordering::Release);
        // Between chains free_head is old_free_head: the copies start at the head entry.
        let (mut e, mut last, mut num) = (head, head, 0u16);
        for d in descs {
            if e >= self.tracked {
                return Err(InflightError::OutOfEntries);
            }
            self.set_copy(e, d);
            last = e;
            num += 1;
            e = self.next(e);
        }
        self.u16_at(at + DESC_OFF_LAST).store(last, Ordering::Release);
        self.u16_at(at + DESC_OFF_NUM).store(num, Ordering::Release);
        self.u16_at(OFF_FREE_HEAD).store(e, Ordering::Release);
        self.u16_at(OFF_OLD_FREE_HEAD).store(e, Ordering::Release);
        self.entry_of_id[usize::from(id)] = head;
        Ok(())
    }

    /// Buffer `id`'s used element was written (not yet published): its chain goes back on
    /// the free list when the batch is published.
    #[inline]
    pub fn used(&mut self, id: u16) {
        let Some(&head) = self.entry_of_id.get(usize::from(id)) else { return };
        if let Some(slot) = self.batch.get_mut(self.batch_len) {
            *slot = head;
            self.batch_len += 1;
        }
    }

    /// Before the ring publishes its batch (whose used elements end at `used`): the batch's
    /// chains go back on the free list, then the new used position is recorded beside the
    /// committed one.
    #[inline]
    pub fn publishing(&mut self, used: RingPos) {
        let mut free_head = self.u16_at(OFF_FREE_HEAD).load(Ordering::Relaxed);
        for i in 0..self.batch_len {
            let head = self.batch[i];
            if head >= self.tracked {
                continue;
            }
            let last = self.u16_at(self.entry(head) + DESC_OFF_LAST).load(Ordering::Relaxed);
            if last >= self.tracked {
                continue;
            }
            self.u16_at(self.entry(last) + DESC_OFF_NEXT).store(free_head, Ordering::Release);
            free_head = head;
            self.u16_at(OFF_FREE_HEAD).store(free_head, Ordering::Release);
        }
        self.set_positions(Positions { used, old: self.committed });
        self.committed = used;
    }

    /// The ring published the batch: its heads are unmarked and the batch is committed.
    #[inline]
    pub fn published(&mut self) {
        for i in 0..self.batch_len {
            let head = self.batch[i];
            if head < self.tracked {
                self.inflight(head).store(0, Ordering::Release);
            }
        }
        self.batch_len = 0;
        let free_head = self.u16_at(OFF_FREE_HEAD).load(Ordering::Relaxed);
        self.u16_at(OFF_OLD_FREE_HEAD).store(free_head, Ordering::Release);
        self.set_positions(Positions::settled(self.committed));
    }

    /// Whether the chain of head entry `head` is marked in flight (for tests).
    #[cfg(test)]
    pub fn is_marked(&self, head: u16) -> bool {
        head < self.tracked && self.inflight(head).load(Ordering::Relaxed) != 0
    }
}

#[cfg(test)]
mod tests;
