use super::*;
use crate::virtq::RingFormat;

fn region(size: u16) -> Arc<InflightRegion> {
    Arc::new(InflightRegion::create(RingFormat::Packed, 1, size, None).unwrap().0)
}

fn tracker(r: &Arc<InflightRegion>, ring: u16) -> PackedInflight {
    match r.tracker(0, RingFormat::Packed, ring).unwrap() {
        super::super::Tracker::Packed(t) => t,
        super::super::Tracker::Split(_) => unreachable!(),
    }
}

const START: RingPos = RingPos { index: 0, wrap: true };

/// A chain of `n` descriptors for buffer `id` (NEXT on all but the last).
fn chain(id: u16, n: u16) -> Vec<Desc> {
    (0..n)
        .map(|k| Desc {
            addr: 0x1000 * u64::from(id) + u64::from(k),
            len: 512 + u32::from(k),
            id,
            flags: if k + 1 < n { 1 } else { 0 },
        })
        .collect()
}

fn never_published(_: RingPos) -> bool {
    false
}

#[test]
fn layout_matches_the_spec_structs() {
    // QueueRegionPacked: a 32-byte header, 32 bytes per DescStatePacked, each queue on 64.
    assert_eq!(crate::virtq::inflight::queue_bytes(RingFormat::Packed, 128), 32 + 32 * 128 + 32);
    assert_eq!(crate::virtq::inflight::queue_bytes(RingFormat::Packed, 1), 64);
    assert_eq!(crate::virtq::inflight::queue_bytes(RingFormat::Packed, 256), 32 * 257 + 32);
    let w = Positions { used: RingPos { index: 5, wrap: false }, old: START }.to_word();
    // used_idx at byte 16, old_used_idx at 18, used_wrap_counter at 20, old_used_wrap at 21.
    assert_eq!(w.to_le_bytes(), [5, 0, 0, 0, 0, 1, 0, 0]);
    assert_eq!(Positions::from_word(w).used, RingPos { index: 5, wrap: false });
}

#[test]
fn chains_in_flight_come_back_oldest_first_with_their_copies() {
    let r = region(16);
    let mut t = tracker(&r, 8);
    let mut heads = vec![9];
    let found = t.recover(START, never_published, &mut heads).unwrap();
    assert!(found.fresh && heads.is_empty());
    // Buffers 3 (3 descriptors), 0 (1), 5 (2) taken; 0 answered and published.
    for (id, n) in [(3, 3), (0, 1), (5, 2)] {
        t.taken(chain(id, n).into_iter(), id).unwrap();
    }
    t.used(0);
    t.publishing(RingPos { index: 1, wrap: true });
    t.published();
    // 5 answered, its batch recorded but the process died before the ring published it.
    t.used(5);
    t.publishing(RingPos { index: 3, wrap: true });
    let mut t2 = tracker(&r, 8);
    let found = t2.recover(START, never_published, &mut heads).unwrap();
    assert_eq!(
        found,
        PackedRecovered {
            fresh: false,
            used: RingPos { index: 1, wrap: true },
            in_flight_descs: 5,
            committed: false
        }
    );
    assert_eq!(heads.len(), 2);
    assert_eq!(t2.chain(heads[0]).collect::<Vec<_>>(), chain(3, 3));
    assert_eq!(t2.chain(heads[1]).collect::<Vec<_>>(), chain(5, 2));
    // The same batch, had the ring published it: committed, and 5 is no longer in flight.
    let mut t3 = tracker(&r, 8);
    t3.recover(START, never_published, &mut heads).unwrap();
    t3.used(5);
    t3.publishing(RingPos { index: 3, wrap: true });
    let mut t4 = tracker(&r, 8);
    let found = t4.recover(START, |p| p == RingPos { index: 1, wrap: true }, &mut heads).unwrap();
    assert!(found.committed);
    assert_eq!(found.used, RingPos { index: 3, wrap: true });
    assert_eq!(found.in_flight_descs, 3);
    assert_eq!(heads.len(), 1);
    assert_eq!(t4.chain(heads[0]).collect::<Vec<_>>(), chain(3, 3));
    // Entries are free again: a full ring's worth of new descriptors fits (3 in flight).
    for id in [1, 2, 4, 6, 7] {
        t4.taken(chain(id, 1).into_iter(), id).unwrap();
    }
    assert!(matches!(t4.taken(chain(0, 9).into_iter(), 0), Err(InflightError::OutOfEntries)));
}

#[test]
fn a_take_cut_short_is_not_resubmitted() {
    let r = region(8);
    let mut t = tracker(&r, 8);
    t.recover(START, never_published, &mut Vec::new()).unwrap();
    t.taken(chain(2, 2).into_iter(), 2).unwrap();
    // The next chain's head was marked and one copy written, then the process died.
    let head = t.u16_at(OFF_OLD_FREE_HEAD).load(Ordering::Relaxed);
    t.inflight(head).store(1, Ordering::Relaxed);
    t.set_copy(head, chain(4, 1)[0]);
    let mut heads = Vec::new();
    let found = tracker(&r, 8).recover(START, never_published, &mut heads).unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!(found.in_flight_descs, 2);
    assert!(!t.is_marked(head));
}

#[test]
fn hostile_regions_are_refused() {
    let r = region(8);
    let mut t = tracker(&r, 4);
    t.recover(START, never_published, &mut Vec::new()).unwrap();
    t.taken(chain(1, 2).into_iter(), 1).unwrap();
    let recover =
        |r: &Arc<InflightRegion>| tracker(r, 4).recover(START, never_published, &mut Vec::new());
    // A used position beyond the ring.
    t.set_positions(Positions::settled(RingPos { index: 6, wrap: true }));
    assert!(matches!(recover(&r), Err(InflightError::PackedState(_))));
    t.set_positions(Positions::settled(START));
    // A chain longer than the ring, a chain whose entries run out of the region.
    let num_at = t.entry(0) + DESC_OFF_NUM;
    t.u16_at(num_at).store(5, Ordering::Relaxed);
    assert!(matches!(recover(&r), Err(InflightError::PackedState(_))));
    t.u16_at(num_at).store(2, Ordering::Relaxed);
    let next_at = t.entry(0) + DESC_OFF_NEXT;
    t.u16_at(next_at).store(300, Ordering::Relaxed);
    assert!(matches!(recover(&r), Err(InflightError::PackedState(_))));
    t.u16_at(next_at).store(1, Ordering::Relaxed);
    // A buffer ID outside the ring.
    t.u16_at(t.entry(1) + DESC_OFF_ID).store(4, Ordering::Relaxed);
    assert!(matches!(recover(&r), Err(InflightError::PackedState(_))));
    t.u16_at(t.entry(1) + DESC_OFF_ID).store(1, Ordering::Relaxed);
    assert!(recover(&r).is_ok());
    // A free list that loops is walked a bounded number of times.
    t.u16_at(t.entry(2) + DESC_OFF_NEXT).store(2, Ordering::Relaxed);
    t.u16_at(OFF_FREE_HEAD).store(2, Ordering::Relaxed);
    t.u16_at(OFF_OLD_FREE_HEAD).store(2, Ordering::Relaxed);
    assert!(recover(&r).is_ok());
    t.u16_at(OFF_VERSION).store(3, Ordering::Relaxed);
    assert!(matches!(recover(&r), Err(InflightError::UnknownVersion(3))));
    // A split ring on a packed region, and the other way round.
    assert!(matches!(r.tracker(0, RingFormat::Split, 4), Err(InflightError::Layout { .. })));
}
