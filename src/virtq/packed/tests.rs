//! The packed ring against a driver written here from the spec (2.8): laps, chains across
//! the ring's end, indirect tables, batches, event suppression, and guests that lie.

use proptest::prelude::*;

use super::*;
use crate::virtq::testing::{packed_descriptor as packed_desc, read, write, USER_BASE};
use crate::virtq::GuestIov;

const RAM: u64 = 1 << 20;
const RING_GPA: u64 = 0;
const DRIVER_EVENT_GPA: u64 = 0x1000;
const DEVICE_EVENT_GPA: u64 = 0x2000;
const INDIRECT_GPA: u64 = 0x3000;
const DATA_GPA: u64 = 0x10000;

/// The host ranges a walk hands out, in order (the virtq layer's own sink: no request layer).
#[derive(Default)]
struct Sink(Vec<GuestIov>);

impl ChainSink for Sink {
    fn push(&mut self, iov: GuestIov, _writable: bool) -> bool {
        self.0.push(iov);
        true
    }
}

fn guest_ram() -> (std::fs::File, GuestMemory) {
    crate::virtq::testing::guest_ram(RAM)
}

fn addrs() -> RingAddrs {
    RingAddrs {
        desc_user_addr: USER_BASE + RING_GPA,
        avail_user_addr: USER_BASE + DRIVER_EVENT_GPA,
        used_user_addr: USER_BASE + DEVICE_EVENT_GPA,
    }
}

fn fresh_base() -> u32 {
    base_bits(RingPos::START, RingPos::START)
}

fn queue(mem: &GuestMemory, size: u16, event_idx: bool, indirect: bool) -> PackedQueue {
    PackedQueue::new(mem, addrs(), size, fresh_base(), event_idx, indirect, 8).unwrap()
}

fn avail_flags(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL
    } else {
        DESC_F_USED
    }
}

/// The driver's side: its next position and wrap counter, and where it reads used ones.
struct Driver {
    size: u16,
    avail: RingPos,
    used: RingPos,
}

impl Driver {
    fn new(size: u16) -> Driver {
        Driver { size, avail: RingPos::START, used: RingPos::START }
    }

    /// Makes a chain of (gpa, len, writable) buffers available as buffer `id`, head last.
    fn offer(&mut self, mem: &GuestMemory, id: u16, bufs: &[(u64, u32, bool)]) {
        let head = self.avail;
        let mut head_raw = None;
        for (i, &(gpa, len, writable)) in bufs.iter().enumerate() {
            let mut flags = avail_flags(self.avail.wrap);
            if writable {
                flags |= DESC_F_WRITE;
            }
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let raw = packed_desc(gpa, len, id, flags);
            if i == 0 {
                head_raw = Some(raw);
            } else {
                write(mem, RING_GPA + 16 * u64::from(self.avail.index), &raw);
            }
            self.avail.advance(1, self.size);
        }
        write(mem, RING_GPA + 16 * u64::from(head.index), &head_raw.unwrap());
    }

    /// Makes an indirect table of `bufs` available as buffer `id`.
    fn offer_indirect(&mut self, mem: &GuestMemory, id: u16, bufs: &[(u64, u32, bool)]) {
        for (i, &(gpa, len, writable)) in bufs.iter().enumerate() {
            let flags = if writable { DESC_F_WRITE } else { 0 };
            write(mem, INDIRECT_GPA + 16 * i as u64, &packed_desc(gpa, len, 0, flags));
        }
        let flags = avail_flags(self.avail.wrap) | DESC_F_INDIRECT;
        let raw = packed_desc(INDIRECT_GPA, 16 * bufs.len() as u32, id, flags);
        write(mem, RING_GPA + 16 * u64::from(self.avail.index), &raw);
        self.avail.advance(1, self.size);
    }

    /// The next used element, if the device published one: (id, len). `descs` is how many
    /// ring descriptors that buffer took (the driver remembers it by ID).
    fn take_used(&mut self, mem: &GuestMemory, descs: u16) -> Option<(u16, u32)> {
        let raw = read(mem, RING_GPA + 16 * u64::from(self.used.index), 16);
        let flags = u16::from_le_bytes([raw[14], raw[15]]);
        let used = (flags & DESC_F_AVAIL != 0) == self.used.wrap
            && (flags & DESC_F_USED != 0) == self.used.wrap;
        if !used {
            return None;
        }
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
        let id = u16::from_le_bytes([raw[12], raw[13]]);
        self.used.advance(descs, self.size);
        Some((id, len))
    }

    fn set_event(mem: &GuestMemory, off_wrap: u16, flags: u16) {
        let mut raw = [0u8; 4];
        raw[0..2].copy_from_slice(&off_wrap.to_le_bytes());
        raw[2..4].copy_from_slice(&flags.to_le_bytes());
        write(mem, DRIVER_EVENT_GPA, &raw);
    }
}

fn pop(q: &mut PackedQueue, mem: &GuestMemory) -> Result<Option<(u16, Sink)>, QueueError> {
    let mut chain = Sink::default();
    Ok(q.pop(mem, &mut chain)?.map(|(id, _)| (id, chain)))
}

#[test]
fn requests_go_round_the_ring_lap_after_lap() {
    let (_file, mem) = guest_ram();
    let mut q = queue(&mem, 4, false, false);
    let mut driver = Driver::new(4);
    // Three laps of a 4-entry ring, three descriptors a chain: chains cross the end.
    for n in 0..4u16 {
        let id = n % 4;
        driver.offer(
            &mem,
            id,
            &[(DATA_GPA, 16, false), (DATA_GPA + 512, 512, true), (DATA_GPA + 4096, 1, true)],
        );
        assert_eq!(q.avail_count(), 1);
        let (got, chain) = pop(&mut q, &mem).unwrap().unwrap();
        assert_eq!(got, id);
        assert_eq!(chain.0.len(), 3);
        assert_eq!(pop(&mut q, &mem).unwrap().map(|(id, _)| id), None);
        q.push_used(id, 513);
        assert_eq!(driver.take_used(&mem, 3), None, "visible before publish");
        q.publish_used();
        assert_eq!(driver.take_used(&mem, 3), Some((id, 513)));
        assert_eq!(q.next_avail(), driver.avail);
        assert_eq!(q.next_used(), driver.used);
    }
    // 12 descriptors in a ring of 4: three laps, the wrap counter flipped three times.
    assert_eq!(q.next_avail(), RingPos { index: 0, wrap: false });
    assert_eq!(q.base(), 0);
}

#[test]
fn a_batch_becomes_visible_at_once_and_out_of_order() {
    let (_file, mem) = guest_ram();
    let mut q = queue(&mem, 8, false, false);
    let mut driver = Driver::new(8);
    driver.offer(&mem, 5, &[(DATA_GPA, 16, false), (DATA_GPA + 16, 1, true)]);
    driver.offer(&mem, 2, &[(DATA_GPA + 32, 1, true)]);
    driver.offer(&mem, 7, &[(DATA_GPA + 48, 16, false), (DATA_GPA + 64, 1, true)]);
    assert_eq!(q.avail_count(), 3);
    for expect in [5, 2, 7] {
        assert_eq!(pop(&mut q, &mem).unwrap().unwrap().0, expect);
    }
    // Completed 2, 7, 5: used elements go in completion order, each moving the used
    // position by its own chain's length.
    q.push_used(2, 0);
    q.push_used(7, 1);
    assert_eq!(driver.take_used(&mem, 1), None, "the batch's first element is held back");
    q.publish_used();
    q.push_used(5, 2);
    q.publish_used();
    assert_eq!(driver.take_used(&mem, 1), Some((2, 0)));
    assert_eq!(driver.take_used(&mem, 2), Some((7, 1)));
    assert_eq!(driver.take_used(&mem, 2), Some((5, 2)));
    assert_eq!(driver.take_used(&mem, 1), None);
    assert_eq!(q.next_used(), RingPos { index: 5, wrap: true });
}

#[test]
fn an_indirect_table_is_walked_in_order() {
    let (_file, mem) = guest_ram();
    let mut q = queue(&mem, 4, false, true);
    let mut driver = Driver::new(4);
    let bufs = [(DATA_GPA, 16, false), (DATA_GPA + 512, 512, true), (DATA_GPA + 8192, 1, true)];
    driver.offer_indirect(&mem, 3, &bufs);
    let mut chain = Sink::default();
    let (id, outcome) = q.pop(&mem, &mut chain).unwrap().unwrap();
    assert_eq!(id, 3);
    let host = |gpa: u64| mem.translate_contiguous(gpa, 1).unwrap() as usize;
    let got: Vec<(usize, usize)> = chain.0.iter().map(|i| (i.addr(), i.len())).collect();
    assert_eq!(
        got,
        vec![(host(DATA_GPA), 16), (host(DATA_GPA + 512), 512), (host(DATA_GPA + 8192), 1)]
    );
    assert_eq!(outcome.tail.map(|t| t.addr()), Some(host(DATA_GPA + 8192)));
    // One ring descriptor for the whole table.
    assert_eq!(q.next_avail(), RingPos { index: 1, wrap: true });

    // Not negotiated: the chain is refused.
    let mut q = queue(&mem, 4, false, false);
    assert_eq!(pop(&mut q, &mem).err(), Some(QueueError::Chain(ChainError::IndirectNotNegotiated)));
}

#[test]
fn chains_that_go_round_or_lie_are_refused_without_a_hang() {
    let (_file, mem) = guest_ram();
    // Every descriptor of the ring says NEXT: the chain would go round for ever.
    for i in 0..4u64 {
        let flags = DESC_F_AVAIL | DESC_F_NEXT;
        write(&mem, RING_GPA + 16 * i, &packed_desc(DATA_GPA, 16, 0, flags));
    }
    let mut q = queue(&mem, 4, false, false);
    assert_eq!(q.avail_count(), 1);
    assert_eq!(pop(&mut q, &mem).err(), Some(QueueError::Chain(ChainError::TooLong)));

    // Longer than the chain bound (8) in a larger ring.
    for i in 0..16u64 {
        let flags = DESC_F_AVAIL | if i < 12 { DESC_F_NEXT } else { 0 };
        write(&mem, RING_GPA + 16 * i, &packed_desc(DATA_GPA, 16, 0, flags));
    }
    let mut q = queue(&mem, 16, false, false);
    assert_eq!(pop(&mut q, &mem).err(), Some(QueueError::Chain(ChainError::TooLong)));

    // A buffer ID beyond the queue size.
    write(&mem, RING_GPA, &packed_desc(DATA_GPA, 1, 4, DESC_F_AVAIL | DESC_F_WRITE));
    let mut q = queue(&mem, 4, false, false);
    assert_eq!(pop(&mut q, &mem).err(), Some(QueueError::BufferIdOutOfRange { id: 4, size: 4 }));

    // Indirect after a direct descriptor, and with NEXT.
    let mut q = queue(&mem, 4, false, true);
    write(&mem, RING_GPA, &packed_desc(DATA_GPA, 16, 0, DESC_F_AVAIL | DESC_F_NEXT));
    write(&mem, RING_GPA + 16, &packed_desc(INDIRECT_GPA, 16, 0, DESC_F_AVAIL | DESC_F_INDIRECT));
    assert_eq!(pop(&mut q, &mem).err(), Some(QueueError::Chain(ChainError::IndirectAfterDirect)));
    let flags = DESC_F_AVAIL | DESC_F_INDIRECT | DESC_F_NEXT;
    write(&mem, RING_GPA, &packed_desc(INDIRECT_GPA, 16, 0, flags));
    assert_eq!(pop(&mut q, &mem).err(), Some(QueueError::Chain(ChainError::IndirectWithNext)));
}

#[test]
fn wrap_counters_that_lie_show_nothing() {
    let (_file, mem) = guest_ram();
    let mut q = queue(&mem, 4, false, false);
    // AVAIL and USED equal: a used descriptor, not an available one, in either lap.
    for flags in [0, DESC_F_AVAIL | DESC_F_USED] {
        write(&mem, RING_GPA, &packed_desc(DATA_GPA, 1, 0, flags | DESC_F_WRITE));
        assert_eq!(q.avail_count(), 0);
        assert!(pop(&mut q, &mem).unwrap().is_none());
    }
    // Available for the next lap (wrap counter 0) while we are in lap 1.
    write(&mem, RING_GPA, &packed_desc(DATA_GPA, 1, 0, DESC_F_USED | DESC_F_WRITE));
    assert_eq!(q.avail_count(), 0);
    assert!(!q.enable_notifications());
}

#[test]
fn buffers_outside_memory_make_the_request_unusable_not_the_ring() {
    let (_file, mem) = guest_ram();
    let mut q = queue(&mem, 4, false, false);
    let mut driver = Driver::new(4);
    driver.offer(&mem, 1, &[(RAM - 8, 16, false), (u64::MAX - 4, 100, true), (DATA_GPA, 1, true)]);
    let mut chain = Sink::default();
    let (id, outcome) = q.pop(&mem, &mut chain).unwrap().unwrap();
    assert_eq!(id, 1);
    assert!(outcome.unusable);
    // The status byte is still found, and the ring goes on.
    assert!(outcome.tail.is_some());
    assert_eq!(q.next_avail(), RingPos { index: 3, wrap: true });
}

#[test]
fn event_suppression_decides_the_interrupts() {
    let (_file, mem) = guest_ram();
    for event_idx in [false, true] {
        let mut q = queue(&mem, 8, event_idx, false);
        let mut drv = Driver::new(8);
        for id in 0..8 {
            drv.offer(&mem, id, &[(DATA_GPA, 1, true)]);
        }
        for _ in 0..8 {
            pop(&mut q, &mem).unwrap().unwrap();
        }
        Driver::set_event(&mem, 0, EVENT_DISABLE);
        q.push_used(0, 1);
        q.publish_used();
        assert!(!q.needs_notification(), "disabled");
        Driver::set_event(&mem, 0, EVENT_ENABLE);
        q.push_used(1, 1);
        q.publish_used();
        assert!(q.needs_notification(), "enabled");
        // DESC: interrupt once the used position passes descriptor 4 of this lap.
        Driver::set_event(&mem, 4 | WRAP_BIT, EVENT_DESC);
        q.push_used(2, 1);
        q.publish_used();
        q.push_used(3, 1);
        q.publish_used();
        // Without EVENT_IDX, DESC is reserved and we interrupt rather than leave it waiting.
        assert_eq!(q.needs_notification(), !event_idx, "used up to 4, event at 4");
        q.push_used(4, 1);
        q.publish_used();
        assert!(q.needs_notification(), "used element 4 written");
        // An event in the next lap (wrap 0) at position 1: elements 5, 6, 7 end this lap,
        // the used position wraps to 0; not yet at 1.
        Driver::set_event(&mem, 1, EVENT_DESC);
        for id in 5..8 {
            q.push_used(id, 1);
        }
        q.publish_used();
        assert_eq!(q.next_used(), RingPos { index: 0, wrap: false });
        assert_eq!(q.needs_notification(), !event_idx);
    }
}

#[test]
fn notifications_from_the_guest_are_turned_off_and_on() {
    let (_file, mem) = guest_ram();
    let mut q = queue(&mem, 4, true, false);
    let flags = || u16::from_le_bytes(read(&mem, DEVICE_EVENT_GPA + 2, 2).try_into().unwrap());
    q.disable_notifications();
    assert_eq!(flags(), EVENT_DISABLE);
    assert!(!q.enable_notifications());
    assert_eq!(flags(), EVENT_ENABLE);
    Driver::new(4).offer(&mem, 0, &[(DATA_GPA, 1, true)]);
    assert!(q.enable_notifications(), "a request arrived meanwhile");
}

/// After a daemon died with a batch written but not published: the next one resumes at the
/// committed used position, past the chains it resubmits from copies, and the dead daemon's
/// unpublished used elements no longer read as used, so the driver takes only new answers.
#[test]
fn a_resumed_ring_hides_unpublished_answers_and_resubmits_from_copies() {
    let (_file, mem) = guest_ram();
    let mut q = queue(&mem, 8, false, false);
    let mut driver = Driver::new(8);
    // Position 6 on: chains of 2 and 3 descriptors, the second crossing the ring's end.
    for n in 0..3u16 {
        driver.offer(&mem, n, &[(DATA_GPA, 16, false), (DATA_GPA + 512, 1, true)]);
        let (id, _) = pop(&mut q, &mem).unwrap().unwrap();
        q.push_used(id, 1);
        q.publish_used();
        assert_eq!(driver.take_used(&mem, 2), Some((n, 1)));
    }
    driver.offer(&mem, 4, &[(DATA_GPA, 16, false), (DATA_GPA + 512, 1, true)]);
    let bufs = [(DATA_GPA + 1024, 16, false), (DATA_GPA + 2048, 4096, true), (DATA_GPA, 1, true)];
    driver.offer(&mem, 5, &bufs);
    let mut copies = Vec::new();
    for want in [4, 5] {
        let (id, _) = pop(&mut q, &mem).unwrap().unwrap();
        assert_eq!(id, want);
        copies.push(q.popped_descs().collect::<Vec<_>>());
    }
    assert_eq!(copies[1].len(), 3);
    assert_eq!(
        (copies[1][0].addr, copies[1][1].len, copies[1][2].flags & DESC_F_NEXT),
        (DATA_GPA + 1024, 4096, 0)
    );
    // 4 answered (its element at 6, flags held back), then 5 (at 0 in the next lap, its
    // flags written): neither published when the daemon dies.
    q.push_used(4, 1);
    q.push_used(5, 1);
    let committed = RingPos { index: 6, wrap: true };
    assert!(!q.published_at(committed), "the batch's first element is not published");

    let mut q2 = PackedQueue::new(&mem, addrs(), 8, fresh_base(), false, false, 8).unwrap();
    q2.resume(committed, 5);
    assert_eq!(q2.next_used(), committed);
    assert_eq!(q2.next_avail(), RingPos { index: 3, wrap: false });
    assert_eq!(driver.take_used(&mem, 2), None, "a dead daemon's answer shows");
    let mut sink = Sink::default();
    let (id, _) = q2.resubmit(&mem, copies[1].iter().copied(), &mut sink).unwrap();
    assert_eq!((id, sink.0.len()), (5, 3));
    assert!(q2.resubmit(&mem, copies[1][..2].iter().copied(), &mut Sink::default()).is_err());
    q2.resubmit(&mem, copies[0].iter().copied(), &mut Sink::default()).unwrap();
    q2.push_used(4, 7);
    q2.publish_used();
    assert_eq!(driver.take_used(&mem, 2), Some((4, 7)));
    assert_eq!(driver.take_used(&mem, 3), None, "the element the dead daemon wrote shows");
    q2.push_used(5, 9);
    q2.publish_used();
    assert_eq!(driver.take_used(&mem, 3), Some((5, 9)));
    assert!(q2.published_at(committed));
}

#[test]
fn vring_base_carries_both_positions_and_wrap_counters() {
    let (_file, mem) = guest_ram();
    let avail = RingPos { index: 3, wrap: false };
    let used = RingPos { index: 2, wrap: true };
    let base = base_bits(avail, used);
    assert_eq!(base, 0x8002_0003);
    assert_eq!(split_base(base), (avail, used));
    // Only the low half: nothing in flight, used is where avail is.
    assert_eq!(
        split_base(0x8003),
        (RingPos { index: 3, wrap: true }, RingPos { index: 3, wrap: true })
    );
    let q = PackedQueue::new(&mem, addrs(), 4, base, false, false, 8).unwrap();
    assert_eq!((q.next_avail(), q.next_used(), q.base()), (avail, used, base));
    assert_eq!(
        PackedQueue::new(&mem, addrs(), 4, 0x8004, false, false, 8).err(),
        Some(QueueError::PackedBase { base: 0x8004, size: 4 })
    );
    let outside = RingAddrs { used_user_addr: USER_BASE + RAM - 2, ..addrs() };
    assert_eq!(
        PackedQueue::new(&mem, outside, 4, fresh_base(), false, false, 8).err(),
        Some(QueueError::RingOutsideMemory("device event area"))
    );
    let misaligned = RingAddrs { avail_user_addr: USER_BASE + DRIVER_EVENT_GPA + 2, ..addrs() };
    assert_eq!(
        PackedQueue::new(&mem, misaligned, 4, fresh_base(), false, false, 8).err(),
        Some(QueueError::RingMisaligned("driver event area"))
    );
}

#[derive(Debug, Clone)]
struct RawDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

fn desc_strategy() -> impl Strategy<Value = RawDesc> {
    let addr = prop_oneof![
        8 => 0x4000u64..RAM,
        1 => RAM - 64..RAM + 64,
        1 => any::<u64>(),
    ];
    let flags = prop_oneof![
        4 => (0u16..8).prop_map(|f| f | DESC_F_AVAIL),
        1 => any::<u16>(),
    ];
    (addr, 0u32..70_000, 0u16..20, flags).prop_map(|(addr, len, id, flags)| RawDesc {
        addr,
        len,
        id,
        flags,
    })
}

proptest! {
    /// Whatever the guest writes into the ring and an indirect table, every pop ends, never
    /// panics, hands out only ranges inside guest memory, and the positions stay in the ring.
    #[test]
    fn pops_are_bounded_and_stay_in_guest_memory(
        ring in proptest::collection::vec(desc_strategy(), 16),
        table in proptest::collection::vec(desc_strategy(), 0..10),
        indirect in any::<bool>(),
    ) {
        let (_file, mem) = guest_ram();
        for (i, d) in ring.iter().enumerate() {
            write(&mem, RING_GPA + 16 * i as u64, &packed_desc(d.addr, d.len, d.id, d.flags));
        }
        for (i, d) in table.iter().enumerate() {
            write(&mem, INDIRECT_GPA + 16 * i as u64, &packed_desc(d.addr, d.len, d.id, d.flags));
        }
        let mut q = queue(&mem, 16, true, indirect);
        let host_base = mem.translate_contiguous(0, 1).unwrap() as usize;
        let in_ram = |iov: &GuestIov| iov.addr() >= host_base && iov.addr() + iov.len() <= host_base + RAM as usize;
        prop_assert!(q.avail_count() <= 16);
        for _ in 0..32 {
            let mut chain = Sink::default();
            match q.pop(&mem, &mut chain) {
                Ok(Some((id, outcome))) => {
                    prop_assert!(id < 16);
                    for iov in &chain.0[..] {
                        prop_assert!(in_ram(iov));
                    }
                    if let Some(t) = outcome.tail {
                        prop_assert!(in_ram(&t) && t.len() == 1);
                    }
                    q.push_used(id, 1);
                    q.publish_used();
                    prop_assert!(q.next_used().index < 16);
                }
                Ok(None) | Err(_) => break,
            }
            prop_assert!(q.next_avail().index < 16);
        }
    }
}
