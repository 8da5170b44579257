//! The slot table of an I/O thread: one preallocated slot per entry of its ring, holding an
//! in-flight request's buffers, parse result and bounce buffer. The slot index is the
//! request's tag (io_uring `user_data`); a free list hands slots out without allocating.

use std::ops::{Index, IndexMut};

use crate::blk::request::{ChainBuf, Request};
use crate::blk::SEG_MAX;
use crate::trace::Kind;
use crate::virtq::{iov_tables, BounceBuffer, GuestIov};

/// Buffers one slot can hold: header + seg_max data segments + status, plus slack for
/// segments that cross a memory-region boundary and so become two host ranges.
pub(super) const SLOT_IOVS: usize = SEG_MAX as usize + 2 + 8;

/// An in-flight request. The slot index is the engine tag (io_uring user_data).
pub(super) struct Slot {
    pub(super) head: u16,
    pub(super) chain: ChainBuf,
    pub(super) status: Option<GuestIov>,
    pub(super) request: Option<Request>,
    pub(super) kind: Kind,
    /// Data bytes the request moves (reads and writes).
    pub(super) bytes: u64,
    /// Stands in for the guest's buffers when O_DIRECT cannot take them; see `prepare_bounce`.
    pub(super) bounce: BounceBuffer,
    pub(super) bounced: bool,
    /// Where the bounce buffer's first byte is on the disk, and where the guest's data
    /// starts inside it (not 0 for requests off the backing's blocks).
    pub(super) bounce_offset: u64,
    pub(super) bounce_skip: usize,
    /// Follow-ups already sent for this request (each at most once, so nothing loops).
    pub(super) punched: bool,
    pub(super) synced: bool,
}

/// Every slot of a queue, and which are free.
pub(super) struct Slots {
    table: Box<[Slot]>,
    free: Vec<u16>,
    in_flight: usize,
}

impl Slots {
    /// A slot for each of `size` ring entries, all free.
    pub(super) fn new(size: u16) -> Slots {
        // One arena for every slot's iovecs: an idle queue's slots cost no resident memory.
        let table = iov_tables(usize::from(size), SLOT_IOVS)
            .into_iter()
            .map(|iovs| Slot {
                head: 0,
                chain: ChainBuf::on(iovs),
                status: None,
                request: None,
                kind: Kind::Other,
                bytes: 0,
                bounce: BounceBuffer::new(),
                bounced: false,
                bounce_offset: 0,
                bounce_skip: 0,
                punched: false,
                synced: false,
            })
            .collect();
        Slots { table, free: (0..size).rev().collect(), in_flight: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    pub(super) fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Requests in flight: slots taken and not given back.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Takes a free slot, cleared for a chain (whose head the caller sets once the walk
    /// found it); its index is the tag.
    pub(super) fn take(&mut self) -> Option<u16> {
        let tag = self.free.pop()?;
        self.in_flight += 1;
        let slot = &mut self.table[usize::from(tag)];
        slot.chain.clear();
        slot.punched = false;
        slot.synced = false;
        Some(tag)
    }

    /// The request in slot `tag` is done with it.
    pub(super) fn give_back(&mut self, tag: u16) {
        self.free.push(tag);
        self.in_flight -= 1;
    }
}

impl Index<u16> for Slots {
    type Output = Slot;

    fn index(&self, tag: u16) -> &Slot {
        &self.table[usize::from(tag)]
    }
}

impl IndexMut<u16> for Slots {
    fn index_mut(&mut self, tag: u16) -> &mut Slot {
        &mut self.table[usize::from(tag)]
    }
}
