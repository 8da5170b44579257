//! A hostile guest: the project's own frontend sends malformed requests and broken rings to a
//! running daemon and checks the exact answer, that nothing outside the disk changed, and
//! that the daemon keeps serving its other queues and the next connection.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::frontend::*;
use common::{make_image, pattern, tmpdir, Daemon};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const IMAGE_BYTES: u64 = 8 << 20;
const SECTORS: u64 = IMAGE_BYTES / 512;
const QSIZE: u16 = 64;

struct Setup {
    _dir: tempfile::TempDir,
    image: PathBuf,
    sock: PathBuf,
    daemon: Daemon,
}

fn setup(extra: &str) -> Setup {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 42);
    // Packed rings are offered by default; a frontend that does not ask gets split rings.
    let spec = format!("socket={},image={},queues=2{extra}", sock.display(), image.display());
    let daemon = Daemon::start(dir.path(), &[spec]);
    Setup { image, sock, daemon, _dir: dir }
}

fn connect(sock: &Path) -> TestFrontend {
    connect_ring(sock, Ring::Split)
}

/// The two virtqueue layouts; every hostile case runs on both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ring {
    Split,
    Packed,
}

fn connect_ring(sock: &Path, ring: Ring) -> TestFrontend {
    let packed = if ring == Ring::Packed { F_RING_PACKED } else { 0 };
    let fe =
        TestFrontend::connect(sock, 2, QSIZE, F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | packed);
    assert_eq!(fe.features & F_RING_PACKED, packed, "packed ring negotiated");
    fe
}

/// The queue still answers a good read with the image's bytes.
fn assert_queue_serves(fe: &mut TestFrontend, q: usize) {
    let (c, data) = fe.request(q, T_IN, 8, &[], 4096);
    assert_eq!(c.status, S_OK, "queue {q} read");
    assert_eq!(data, pattern(42, 8 * 512, 4096), "queue {q} data");
}

/// The image is exactly as made, apart from `changed` ranges.
fn assert_image_intact(image: &Path) {
    let img = fs::read(image).unwrap();
    assert_eq!(img.len() as u64, IMAGE_BYTES);
    assert!(img == pattern(42, 0, IMAGE_BYTES as usize), "image changed");
}

#[test]
fn well_formed_requests_get_exact_answers() {
    exact_answers(Ring::Split);
}

#[test]
fn well_formed_requests_get_exact_answers_on_a_packed_ring() {
    exact_answers(Ring::Packed);
}

fn exact_answers(ring: Ring) {
    let mut s = setup(",serial=blkplane-serial-1");
    let mut fe = connect_ring(&s.sock, ring);
    assert_eq!(fe.features & F_RING_EVENT_IDX, F_RING_EVENT_IDX);

    // Config space: capacity, num_queues, writeback on for cache=none.
    let cfg = fe.config(60);
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), SECTORS);
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2);
    assert_eq!(cfg[32], 1, "write cache on for cache=none");

    // GET_ID: the serial, zero-padded to 20 bytes; used length counts the id and status.
    let (c, id) = fe.request(0, T_GET_ID, 0, &[], 20);
    assert_eq!((c.status, c.used_len), (S_OK, 21));
    assert_eq!(&id[..], b"blkplane-serial-1\0\0\0");

    // Read: used length = data + status.
    let (c, data) = fe.request(0, T_IN, 16, &[], 8192);
    assert_eq!((c.status, c.used_len), (S_OK, 8193));
    assert_eq!(data, pattern(42, 16 * 512, 8192));
    // The guest was interrupted (the call eventfd counts).
    assert!(fe.queues[0].call.read().unwrap() >= 1, "no interrupt after completion");

    // Write then flush: used length is just the status.
    let payload = pattern(7, 0, 4096);
    let (c, _) = fe.request(1, T_OUT, 100, &payload, 0);
    assert_eq!((c.status, c.used_len), (S_OK, 1));
    let (c, _) = fe.request(1, T_FLUSH, 0, &[], 0);
    assert_eq!((c.status, c.used_len), (S_OK, 1));

    // Through an indirect table: header, two data buffers, status.
    let hdr = HEADER_AREA;
    fe.ram.write(hdr, &header(T_IN, 100));
    let c = fe
        .submit_indirect(
            0,
            &[
                Buf { gpa: hdr, len: 16, writable: false },
                Buf { gpa: DATA_AREA, len: 1024, writable: true },
                Buf { gpa: DATA_AREA + 0x10000, len: 3072, writable: true },
                Buf { gpa: hdr + 64, len: 1, writable: true },
            ],
        )
        .expect("indirect answered");
    assert_eq!((c.status, c.used_len), (S_OK, 4097));
    let mut back = fe.ram.read(DATA_AREA, 1024);
    back.extend(fe.ram.read(DATA_AREA + 0x10000, 3072));
    assert_eq!(back, payload, "indirect read returns what was written");

    drop(fe);
    assert!(s.daemon.stop().success());
    let img = fs::read(&s.image).unwrap();
    assert_eq!(img[100 * 512..100 * 512 + 4096], payload[..]);
}

#[test]
fn bad_requests_get_the_right_status_and_change_nothing() {
    bad_requests(Ring::Split);
}

#[test]
fn bad_requests_get_the_right_status_and_change_nothing_on_a_packed_ring() {
    bad_requests(Ring::Packed);
}

#[allow(clippy::type_complexity)]
fn bad_requests(ring: Ring) {
    let mut s = setup("");
    let mut fe = connect_ring(&s.sock, ring);
    let cases: Vec<(&str, u32, u64, Vec<u8>, u32, u8)> = vec![
        ("unknown type", 99, 0, vec![], 512, S_UNSUPP),
        ("GET_LIFETIME", 10, 0, vec![], 16, S_UNSUPP),
        ("read at the end", T_IN, SECTORS, vec![], 512, S_IOERR),
        ("read across the end", T_IN, SECTORS - 1, vec![], 1024, S_IOERR),
        ("sector overflow", T_IN, u64::MAX / 256, vec![], 512, S_IOERR),
        ("write across the end", T_OUT, SECTORS - 1, pattern(1, 0, 1024), 0, S_IOERR),
        ("read not a sector multiple", T_IN, 0, vec![], 100, S_IOERR),
        ("write not a sector multiple", T_OUT, 0, pattern(1, 0, 700), 0, S_IOERR),
    ];
    for (what, kind, sector, out, in_len, want) in cases {
        let (c, _) = fe.request(0, kind, sector, &out, in_len);
        assert_eq!(c.status, want, "{what}");
        assert_eq!(c.used_len, 1, "{what}: only the status byte was written");
    }
    // Discard: the unmap flag is not allowed (UNSUPP); a range past the end is IOERR; two
    // segments when we advertise one is UNSUPP (as QEMU answers), a segment and a half IOERR,
    // as is a sector count over the advertised maximum.
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend(n.to_le_bytes());
        v.extend(flags.to_le_bytes());
        v
    };
    assert_eq!(fe.request(0, T_DISCARD, 0, &seg(0, 8, 1), 0).0.status, S_UNSUPP);
    assert_eq!(fe.request(0, T_WRITE_ZEROES, 0, &seg(0, 8, 2), 0).0.status, S_UNSUPP);
    assert_eq!(fe.request(0, T_DISCARD, 0, &seg(SECTORS - 4, 8, 0), 0).0.status, S_IOERR);
    let mut two = seg(0, 8, 0);
    two.extend(seg(16, 8, 0));
    assert_eq!(fe.request(0, T_WRITE_ZEROES, 0, &two, 0).0.status, S_UNSUPP);
    assert_eq!(fe.request(0, T_DISCARD, 0, &two, 0).0.status, S_UNSUPP);
    assert_eq!(fe.request(0, T_DISCARD, 0, &two[..24], 0).0.status, S_IOERR);
    assert_eq!(fe.request(0, T_DISCARD, 0, &seg(0, u32::MAX, 0), 0).0.status, S_IOERR);

    // A header shorter than 16 bytes.
    fe.ram.write(HEADER_AREA, &header(T_IN, 0));
    let c = fe
        .submit_chain(
            0,
            &[
                Buf { gpa: HEADER_AREA, len: 8, writable: false },
                Buf { gpa: HEADER_AREA + 64, len: 1, writable: true },
            ],
        )
        .unwrap();
    assert_eq!((c.status, c.used_len), (S_IOERR, 1), "short header");

    // Data buffers outside guest memory, with a good status byte: IOERR, no crash.
    fe.ram.write(HEADER_AREA, &header(T_IN, 0));
    for (what, gpa) in [
        ("far away", 1u64 << 40),
        ("straddling the end", RAM_BYTES as u64 - 256),
        ("wrapping", u64::MAX - 100),
    ] {
        let c = fe
            .submit_chain(
                0,
                &[
                    Buf { gpa: HEADER_AREA, len: 16, writable: false },
                    Buf { gpa, len: 512, writable: true },
                    Buf { gpa: HEADER_AREA + 64, len: 1, writable: true },
                ],
            )
            .unwrap();
        assert_eq!((c.status, c.used_len), (S_IOERR, 1), "data {what}");
    }
    // A write whose payload lies outside guest memory.
    fe.ram.write(HEADER_AREA, &header(T_OUT, 0));
    let c = fe
        .submit_chain(
            0,
            &[
                Buf { gpa: HEADER_AREA, len: 16, writable: false },
                Buf { gpa: 1 << 40, len: 4096, writable: false },
                Buf { gpa: HEADER_AREA + 64, len: 1, writable: true },
            ],
        )
        .unwrap();
    assert_eq!(c.status, S_IOERR, "write from outside guest memory");
    // No writable status byte at all: the chain comes back with used length 0.
    fe.ram.write(HEADER_AREA, &header(T_IN, 0));
    let c = fe.submit_chain(0, &[Buf { gpa: HEADER_AREA, len: 16, writable: false }]).unwrap();
    assert_eq!(c.used_len, 0, "no status byte");

    assert_queue_serves(&mut fe, 0);
    assert_queue_serves(&mut fe, 1);
    drop(fe);
    assert!(s.daemon.stop().success());
    assert_image_intact(&s.image);
}

#[test]
fn readonly_export_refuses_writes_from_the_guest() {
    let mut s = setup(",readonly=on");
    let mut fe = connect(&s.sock);
    let offered = fe.fe.get_features().unwrap();
    assert_ne!(offered & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(offered & (1 << 13 | 1 << 14), 0, "no discard / write-zeroes on a read-only export");
    let (c, _) = fe.request(0, T_OUT, 0, &pattern(1, 0, 4096), 0);
    assert_eq!((c.status, c.used_len), (S_IOERR, 1));
    let mut seg = 0u64.to_le_bytes().to_vec();
    seg.extend(8u32.to_le_bytes());
    seg.extend(0u32.to_le_bytes());
    assert_eq!(fe.request(0, T_DISCARD, 0, &seg, 0).0.status, S_IOERR);
    assert_eq!(fe.request(0, T_WRITE_ZEROES, 0, &seg, 0).0.status, S_IOERR);
    assert_queue_serves(&mut fe, 0);
    drop(fe);
    assert!(s.daemon.stop().success());
    assert_image_intact(&s.image);
}

/// Sends a structurally broken chain on queue 0 and checks the queue goes quiet while queue 1,
/// the daemon, and the next connection keep working.
fn assert_breaks_only_its_queue(
    s: &mut Setup,
    what: &str,
    break_it: impl FnOnce(&mut TestFrontend),
) {
    assert_breaks_only_its_queue_on(s, Ring::Split, what, break_it)
}

fn assert_breaks_only_its_queue_on(
    s: &mut Setup,
    ring: Ring,
    what: &str,
    break_it: impl FnOnce(&mut TestFrontend),
) {
    let broken_before = s.daemon.log().matches("queue broken by the guest").count();
    let mut fe = connect_ring(&s.sock, ring);
    break_it(&mut fe);
    fe.kick(0);
    assert_eq!(fe.wait_used(0, Duration::from_millis(500)), None, "{what}: broken queue answered");
    assert_queue_serves(&mut fe, 1);
    assert!(s.daemon.alive(), "{what}: daemon died:\n{}", s.daemon.log());
    drop(fe);
    // A new connection starts from a clean slate.
    let mut fe = connect_ring(&s.sock, ring);
    assert_queue_serves(&mut fe, 0);
    assert_queue_serves(&mut fe, 1);
    let broken_after = s.daemon.log().matches("queue broken by the guest").count();
    assert_eq!(
        broken_after,
        broken_before + 1,
        "{what}: the daemon did not report one broken queue"
    );
}

#[test]
fn broken_rings_break_only_their_queue() {
    let mut s = setup("");
    assert_breaks_only_its_queue(&mut s, "loop", |fe| {
        fe.ram.write(HEADER_AREA, &header(T_IN, 0));
        fe.set_desc(0, 0, HEADER_AREA, 16, DESC_F_NEXT, 1);
        fe.set_desc(0, 1, DATA_AREA, 512, DESC_F_NEXT | DESC_F_WRITE, 0);
        fe.push_avail(0, 0);
    });
    assert_breaks_only_its_queue(&mut s, "chain longer than the queue", |fe| {
        for i in 0..QSIZE {
            fe.set_desc(0, i, DATA_AREA, 512, DESC_F_NEXT | DESC_F_WRITE, (i + 1) % QSIZE);
        }
        fe.set_desc(0, 0, HEADER_AREA, 16, DESC_F_NEXT, 1);
        fe.push_avail(0, 0);
    });
    assert_breaks_only_its_queue(&mut s, "next index out of range", |fe| {
        fe.set_desc(0, 0, HEADER_AREA, 16, DESC_F_NEXT, QSIZE + 5);
        fe.push_avail(0, 0);
    });
    assert_breaks_only_its_queue(&mut s, "head out of range", |fe| {
        fe.push_avail(0, QSIZE);
    });
    assert_breaks_only_its_queue(&mut s, "avail index jumps ahead", |fe| {
        fe.set_avail_idx(0, QSIZE + 1);
    });
    assert_breaks_only_its_queue(&mut s, "readable after writable", |fe| {
        fe.set_desc(0, 0, HEADER_AREA, 16, DESC_F_NEXT, 1);
        fe.set_desc(0, 1, DATA_AREA, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
        fe.set_desc(0, 2, DATA_AREA, 512, DESC_F_NEXT, 3);
        fe.set_desc(0, 3, HEADER_AREA + 64, 1, DESC_F_WRITE, 0);
        fe.push_avail(0, 0);
    });
    assert_breaks_only_its_queue(&mut s, "nested indirect", |fe| {
        fe.set_desc(0, 0, INDIRECT_AREA, 32, DESC_F_INDIRECT, 0);
        let mut d = INDIRECT_AREA.to_le_bytes().to_vec();
        d.extend(32u32.to_le_bytes());
        d.extend(DESC_F_INDIRECT.to_le_bytes());
        d.extend(0u16.to_le_bytes());
        fe.ram.write(INDIRECT_AREA, &d);
        fe.push_avail(0, 0);
    });
    assert_breaks_only_its_queue(&mut s, "indirect table outside memory", |fe| {
        fe.set_desc(0, 0, 1 << 40, 64, DESC_F_INDIRECT, 0);
        fe.push_avail(0, 0);
    });
    assert_breaks_only_its_queue(&mut s, "indirect length not a multiple of 16", |fe| {
        fe.set_desc(0, 0, INDIRECT_AREA, 40, DESC_F_INDIRECT, 0);
        fe.push_avail(0, 0);
    });
    assert!(s.daemon.stop().success());
    assert_image_intact(&s.image);
}

/// Makes packed ring 0's descriptors `descs` (addr, len, id, flags without the avail bits)
/// available from position 0 in the first lap, the head's flags last.
fn offer_packed(fe: &mut TestFrontend, descs: &[(u64, u32, u16, u16)]) {
    let avail = fe.queues[0].packed.as_ref().unwrap().avail_bits();
    for (i, &(addr, len, id, flags)) in descs.iter().enumerate().skip(1) {
        fe.set_packed_desc(0, i as u16, addr, len, id, flags | avail);
    }
    let (addr, len, id, flags) = descs[0];
    fe.set_packed_desc(0, 0, addr, len, id, flags | avail);
}

#[test]
fn packed_rings_are_offered_by_default_and_not_with_packed_ring_off() {
    // Packed rings are tracked across a crash like split ones (the inflight region), so an
    // export offers them unless told not to; with packed-ring=off a frontend asking for them
    // gets split rings, and is served.
    let dir = tmpdir();
    let sock = |name: &str| dir.path().join(name);
    let image = dir.path().join("disk.raw");
    make_image(&image, IMAGE_BYTES, 42);
    let spec = |name: &str, extra: &str| {
        format!("id={name},socket={},image={}{extra}", sock(name).display(), image.display())
    };
    let mut daemon = Daemon::start(
        dir.path(),
        &[spec("on", ""), spec("off", ",packed-ring=off,force-share=on")],
    );
    let mut fe = TestFrontend::connect(&sock("on"), 1, QSIZE, F_RING_PACKED);
    assert_ne!(fe.features & F_RING_PACKED, 0, "packed not offered by default");
    assert_queue_serves(&mut fe, 0);
    drop(fe);
    let mut fe = TestFrontend::connect(&sock("off"), 1, QSIZE, F_RING_PACKED);
    assert_eq!(fe.features & F_RING_PACKED, 0, "packed offered with packed-ring=off");
    assert!(fe.queues[0].packed.is_none());
    assert_queue_serves(&mut fe, 0);
    drop(fe);
    assert!(daemon.stop().success());
}

#[test]
fn broken_packed_rings_break_only_their_queue() {
    let mut s = setup("");
    let status = (HEADER_AREA + 64, 1, 0, DESC_F_WRITE);
    assert_breaks_only_its_queue_on(&mut s, Ring::Packed, "a chain round the ring", |fe| {
        fe.ram.write(HEADER_AREA, &header(T_IN, 0));
        let descs: Vec<_> =
            (0..QSIZE).map(|_| (DATA_AREA, 512, 0, DESC_F_NEXT | DESC_F_WRITE)).collect();
        offer_packed(fe, &descs);
    });
    assert_breaks_only_its_queue_on(&mut s, Ring::Packed, "buffer ID out of range", |fe| {
        fe.ram.write(HEADER_AREA, &header(T_IN, 0));
        offer_packed(
            fe,
            &[(HEADER_AREA, 16, QSIZE, DESC_F_NEXT), (HEADER_AREA + 64, 1, QSIZE, DESC_F_WRITE)],
        );
    });
    assert_breaks_only_its_queue_on(&mut s, Ring::Packed, "readable after writable", |fe| {
        offer_packed(
            fe,
            &[
                (HEADER_AREA, 16, 0, DESC_F_NEXT),
                (DATA_AREA, 512, 0, DESC_F_NEXT | DESC_F_WRITE),
                (DATA_AREA, 512, 0, DESC_F_NEXT),
                status,
            ],
        );
    });
    assert_breaks_only_its_queue_on(&mut s, Ring::Packed, "indirect after direct", |fe| {
        offer_packed(
            fe,
            &[(HEADER_AREA, 16, 0, DESC_F_NEXT), (INDIRECT_AREA, 32, 0, DESC_F_INDIRECT)],
        );
    });
    assert_breaks_only_its_queue_on(&mut s, Ring::Packed, "indirect with next", |fe| {
        offer_packed(fe, &[(INDIRECT_AREA, 32, 0, DESC_F_INDIRECT | DESC_F_NEXT), status]);
    });
    assert_breaks_only_its_queue_on(&mut s, Ring::Packed, "indirect table outside memory", |fe| {
        offer_packed(fe, &[(1 << 40, 64, 0, DESC_F_INDIRECT)]);
    });
    assert_breaks_only_its_queue_on(
        &mut s,
        Ring::Packed,
        "indirect length not a multiple of 16",
        |fe| {
            offer_packed(fe, &[(INDIRECT_AREA, 40, 0, DESC_F_INDIRECT)]);
        },
    );
    assert!(s.daemon.stop().success());
    assert_image_intact(&s.image);
}

/// Wrap counters that lie only hide a request: the daemon sees nothing available, breaks
/// nothing, and answers the first honest request at that position.
#[test]
fn lying_wrap_counters_hide_a_request_and_break_nothing() {
    let mut s = setup("");
    let mut fe = connect_ring(&s.sock, Ring::Packed);
    fe.ram.write(HEADER_AREA, &header(T_IN, 8));
    fe.ram.write(HEADER_AREA + 64, &[0xAA]);
    for (what, bits) in [
        ("AVAIL and USED both set: a used descriptor", PACKED_F_AVAIL | PACKED_F_USED),
        ("neither set: used in the lap before", 0),
        ("available only in the next lap (wrap counter 0)", PACKED_F_USED),
    ] {
        fe.set_packed_desc(0, 1, HEADER_AREA + 64, 1, 0, DESC_F_WRITE | bits);
        fe.set_packed_desc(0, 0, HEADER_AREA, 16, 0, DESC_F_NEXT | bits);
        let head = fe.ram.read(fe.queues[0].desc, 16);
        fe.kick(0);
        std::thread::sleep(Duration::from_millis(300));
        // An answer would have overwritten the head with a used element, and the status.
        assert_eq!(fe.ram.read(fe.queues[0].desc, 16), head, "{what}: answered");
        assert_eq!(fe.ram.read(HEADER_AREA + 64, 1)[0], 0xAA, "{what}: status written");
    }
    assert_queue_serves(&mut fe, 0);
    assert_queue_serves(&mut fe, 1);
    assert_eq!(s.daemon.log().matches("queue broken by the guest").count(), 0);
    // A whole lap and more of honest requests: the wrap counters turn over on both sides.
    for n in 0..(QSIZE as u64 + 10) {
        let (c, data) = fe.request(0, T_IN, n, &[], 512);
        assert_eq!(c.status, S_OK, "request {n}");
        assert_eq!(data, pattern(42, n * 512, 512), "request {n}");
    }
    let p = fe.queues[0].packed.clone().unwrap();
    assert!(!p.avail_wrap && !p.used_wrap, "the wrap counters turned over: {p:?}");
    drop(fe);
    assert!(s.daemon.stop().success());
    assert_image_intact(&s.image);
}

#[test]
fn indirect_without_negotiation_breaks_the_queue() {
    let mut s = setup("");
    // On a split ring, then on a packed one (its event suppression without EVENT_IDX:
    // ENABLE/DISABLE).
    for ring in [0, F_RING_PACKED] {
        let mut fe = TestFrontend::connect(&s.sock, 2, QSIZE, ring);
        assert_eq!(fe.features & (F_RING_INDIRECT_DESC | F_RING_PACKED), ring);
        fe.ram.write(HEADER_AREA, &header(T_IN, 0));
        let r = fe.submit_indirect(
            0,
            &[
                Buf { gpa: HEADER_AREA, len: 16, writable: false },
                Buf { gpa: HEADER_AREA + 64, len: 1, writable: true },
            ],
        );
        assert_eq!(r, None, "ring features {ring:#x}");
        // Without EVENT_IDX, queue 1 still works through flags-based notification.
        assert_queue_serves(&mut fe, 1);
    }
    assert!(s.daemon.stop().success());
}

#[test]
fn bad_control_messages_are_refused_and_the_connection_lives() {
    use vhost::VringConfigData;
    let mut s = setup("");
    let mut fe = connect(&s.sock);
    // A vring address outside guest memory: the kick that would start it is refused.
    fe.fe
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: 0xdead_0000_0000,
                used_ring_addr: 0xdead_0001_0000,
                avail_ring_addr: 0xdead_0002_0000,
                log_addr: None,
            },
        )
        .expect_err("running queue restarted on bad addresses");
    let kick = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    fe.fe.set_vring_kick(0, &kick).expect_err("ring outside memory refused");
    // Queue sizes that are not powers of two or too large, and queue indexes out of range.
    fe.fe.set_vring_num(1, 100).expect_err("size 100 refused");
    fe.fe.set_vring_num(1, 4096).expect_err("size 4096 refused");
    fe.fe.set_vring_num(7, 64).expect_err("queue 7 refused");
    // The connection still works: queue 1 was never touched by the failures above.
    assert_queue_serves(&mut fe, 1);
    assert!(s.daemon.alive());
    drop(fe);
    let mut fe = connect(&s.sock);
    assert_queue_serves(&mut fe, 0);
    drop(fe);
    assert!(s.daemon.stop().success());
}

#[test]
fn guest_can_turn_the_write_cache_off() {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    let s = setup(",cache=writeback");
    let mut fe = TestFrontend::connect(&s.sock, 2, QSIZE, 1 << 11);
    assert_eq!(fe.config(60)[32], 1);
    fe.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    assert_eq!(fe.config(60)[32], 0, "WCE off after the guest cleared it");
    let (c, _) = fe.request(0, T_OUT, 0, &pattern(3, 0, 4096), 0);
    assert_eq!(c.status, S_OK);
    drop(fe);
    // A new client starts with the cache mode's default again.
    let mut fe = connect(&s.sock);
    assert_eq!(fe.config(60)[32], 1);
    // A write-through mode stays write-through whatever the guest writes.
    drop(fe);
    drop(s);
    let s = setup(",cache=writethrough");
    let mut fe = TestFrontend::connect(&s.sock, 2, QSIZE, 1 << 11);
    assert_eq!(fe.config(60)[32], 0);
    fe.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[1]).unwrap();
    assert_eq!(fe.config(60)[32], 0);
}

#[test]
fn a_4k_logical_block_export_refuses_unaligned_io() {
    let mut s = setup(",logical-block-size=4096");
    let mut fe = connect(&s.sock);
    let cfg = fe.config(60);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 4096, "blk_size");
    assert_eq!(cfg[24], 0, "physical = logical: exponent 0");
    let (c, data) = fe.request(0, T_IN, 8, &[], 4096);
    assert_eq!(c.status, S_OK);
    assert_eq!(data, pattern(42, 8 * 512, 4096));
    assert_eq!(fe.request(0, T_IN, 1, &[], 4096).0.status, S_IOERR, "offset not on a 4 KiB block");
    assert_eq!(fe.request(0, T_IN, 8, &[], 512).0.status, S_IOERR, "length not a 4 KiB multiple");
    assert_eq!(
        fe.request(0, T_OUT, 9, &pattern(1, 0, 4096), 0).0.status,
        S_IOERR,
        "unaligned write"
    );
    drop(fe);
    assert!(s.daemon.stop().success());
    assert_image_intact(&s.image);
}
