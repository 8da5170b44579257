//! The daemon restarts under a running frontend and loses nothing: the inflight region
//! (vhost-user INFLIGHT_SHMFD) read directly by the test's own frontend, a SIGKILL with
//! requests in flight and their resubmission by the next daemon, a SIGTERM that drains, and
//! regions a hostile frontend hands back. The requests are kept in flight by a blkio cgroup
//! that lets the daemon do one I/O per second on the image's disk (`common::Throttle`).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::frontend::{
    handshake, header, Buf, TestFrontend, DATA_AREA, F_RING_PACKED, HEADER_AREA, S_OK, T_FLUSH,
    T_IN, T_OUT,
};
use common::{disk_dir, make_image, pattern, wait_until, Daemon, Throttle};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;

const IMAGE_BYTES: u64 = 8 << 20;
const SEED: u64 = 31;
const RING: u16 = 16;

/// One request the test lays out itself: where its parts are in guest RAM.
struct Req {
    head: u16,
    status: u64,
    data: u64,
    len: u32,
}

fn status_gpa(k: u64) -> u64 {
    HEADER_AREA + k * 128 + 64
}

/// Lays out and posts request number `k` without waiting: on a split ring in descriptors
/// from `3 * k` (its head), on a packed ring as buffer ID `k` from the avail position on.
fn post(
    fe: &mut TestFrontend,
    k: u64,
    kind: u32,
    sector: u64,
    out: Option<&[u8]>,
    in_len: u32,
) -> Req {
    let hdr = HEADER_AREA + k * 128;
    let status = status_gpa(k);
    let data = DATA_AREA + k * 8192;
    fe.ram.write(hdr, &header(kind, sector));
    fe.ram.write(status, &[0xAA]);
    let mut bufs = vec![Buf { gpa: hdr, len: 16, writable: false }];
    let mut len = 0;
    if let Some(out) = out {
        fe.ram.write(data, out);
        bufs.push(Buf { gpa: data, len: out.len() as u32, writable: false });
        len = out.len() as u32;
    }
    if in_len > 0 {
        fe.ram.write(data, &vec![0xEE; in_len as usize]);
        bufs.push(Buf { gpa: data, len: in_len, writable: true });
        len = in_len;
    }
    bufs.push(Buf { gpa: status, len: 1, writable: true });
    let head = if fe.queues[0].packed.is_some() {
        fe.post_packed(0, k as u16, &bufs);
        k as u16
    } else {
        fe.post(0, 3 * k as u16, &bufs)
    };
    Req { head, status, data, len }
}

/// Heads in used[0..used_idx) of queue 0.
fn used_heads(fe: &TestFrontend) -> Vec<u16> {
    (0..fe.used_idx(0)).map(|n| fe.used_elem(0, n).0 as u16).collect()
}

/// How long each wait of these tests may take.
const WAIT: Duration = Duration::from_secs(10);

/// A stable look at the region: every head the frontend posted is either marked in flight or
/// in the used ring, never both, never neither. Returns the marked ones.
fn check_marks(fe: &TestFrontend, posted: &[u16]) -> BTreeSet<u16> {
    let region = fe.inflight.as_ref().unwrap();
    loop {
        let before = fe.used_idx(0);
        let marked: BTreeSet<u16> = region.marked(0).into_iter().collect();
        // Only a closed batch reads consistently: used->idx published and taken over.
        if fe.used_idx(0) != before || region.used_idx(0) != before {
            continue;
        }
        let used: BTreeSet<u16> = used_heads(fe).into_iter().collect();
        let posted: BTreeSet<u16> = posted.iter().copied().collect();
        assert!(marked.is_subset(&posted), "marked {marked:?}, only {posted:?} were posted");
        assert!(marked.is_disjoint(&used), "marked {marked:?} and used {used:?} overlap");
        let all: BTreeSet<u16> = marked.union(&used).copied().collect();
        assert_eq!(all, posted, "marked {marked:?} + used {used:?} must be what was posted");
        return marked;
    }
}

struct Setup {
    dir: tempfile::TempDir,
    image: PathBuf,
    sock: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = disk_dir();
        let image = dir.path().join("disk.raw");
        make_image(&image, IMAGE_BYTES, SEED);
        let sock = dir.path().join("blk.sock");
        Setup { dir, image, sock }
    }

    fn daemon(&self) -> Daemon {
        self.daemon_with("")
    }

    fn daemon_with(&self, extra: &str) -> Daemon {
        let spec = format!(
            "id=disk,socket={},image={},cache=none,queues=2{extra}",
            self.sock.display(),
            self.image.display()
        );
        Daemon::start(self.dir.path(), &[spec])
    }

    fn image_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let img = fs::read(&self.image).unwrap();
        img[offset as usize..offset as usize + len].to_vec()
    }
}

fn log_mentions(log: &str, what: &str) -> bool {
    log.lines().any(|l| l.contains(what))
}

fn resubmitted_count(log: &str) -> Option<usize> {
    let line = log.lines().find(|l| l.contains("resubmitted "))?;
    let after = line.split("resubmitted ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

/// The four requests the kill tests leave in flight: a write of fresh data to sector 8
/// (returned), reads of sectors 64 and 128, a flush.
fn post_four(fe: &mut TestFrontend) -> ([Req; 4], Vec<u8>) {
    let a = pattern(1000, 0, 4096);
    let reqs = [
        post(fe, 0, T_OUT, 8, Some(&a), 0),
        post(fe, 1, T_IN, 64, None, 4096),
        post(fe, 2, T_IN, 128, None, 4096),
        post(fe, 3, T_FLUSH, 0, None, 0),
    ];
    (reqs, a)
}

/// Once all four are answered: each OK, the reads' exact bytes, the write `a` in the image.
fn check_four(s: &Setup, fe: &TestFrontend, reqs: &[Req; 4], a: &[u8]) {
    for r in reqs {
        assert_eq!(fe.ram.read(r.status, 1)[0], S_OK, "request {} status", r.head);
    }
    assert_eq!(fe.ram.read(reqs[1].data, reqs[1].len as usize), pattern(SEED, 64 * 512, 4096));
    assert_eq!(fe.ram.read(reqs[2].data, reqs[2].len as usize), pattern(SEED, 128 * 512, 4096));
    assert_eq!(s.image_at(8 * 512, 4096), a, "the write landed");
}

#[test]
fn requests_in_flight_at_a_kill_are_resubmitted_once_by_the_next_daemon() {
    let s = Setup::new();
    let mut daemon = s.daemon();
    let throttle = Throttle::new(&s.image, 1);
    throttle.add(daemon.pid());
    let mut fe = TestFrontend::connect_inflight(&s.sock, 1, RING, 0);
    {
        let region = fe.inflight.as_ref().unwrap();
        assert_eq!(region.version(0), 1, "the daemon initializes a fresh region");
        assert_eq!(region.desc_num(0), 256);
        assert!(region.marked(0).is_empty());
    }

    let (reqs, a) = post_four(&mut fe);
    let posted: Vec<u16> = reqs.iter().map(|r| r.head).collect();
    assert_eq!(posted, vec![0, 3, 6, 9]);
    // The daemon takes all four at once; the cgroup lets one I/O through per second.
    wait_until("all four taken", WAIT, || {
        let region = fe.inflight.as_ref().unwrap();
        region.marked(0).len() + usize::from(fe.used_idx(0)) == 4
    });
    let marked = check_marks(&fe, &posted);
    assert!(!marked.is_empty(), "nothing in flight: the throttle did not hold the I/O");
    // Marked in the order taken: the counters follow the avail ring.
    let region = fe.inflight.as_ref().unwrap();
    let counters: Vec<u64> = marked.iter().map(|&h| region.counter(0, h)).collect();
    assert!(counters.windows(2).all(|w| w[0] < w[1]), "counters {counters:?} out of order");
    // Only heads are marked, never the chains' other descriptors.
    for d in [1, 2, 4, 5, 7, 8, 10] {
        assert!(!region.inflight(0, d), "descriptor {d} (not a head) marked");
    }

    daemon.kill();
    drop(throttle);
    let at_kill = check_marks(&fe, &posted);
    assert!(!at_kill.is_empty(), "everything finished before the kill");
    let answered_before = fe.used_idx(0);
    for r in &reqs {
        let status = fe.ram.read(r.status, 1)[0];
        if at_kill.contains(&r.head) {
            assert_eq!(status, 0xAA, "request {} in flight but answered", r.head);
        }
    }

    // The next daemon, on the same socket path; the frontend reconnects as QEMU does.
    let daemon2 = s.daemon();
    for started in fe.reconnect(&s.sock) {
        started.expect("ring restarts on the region");
    }
    wait_until("the resubmitted requests answered", WAIT, || fe.used_idx(0) == 4);
    let used = used_heads(&fe);
    let mut sorted = used.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, posted, "each request answered exactly once: used ring {used:?}");
    check_four(&s, &fe, &reqs, &a);
    let region = fe.inflight.as_ref().unwrap();
    assert!(region.marked(0).is_empty(), "marks left after everything was answered");
    assert_eq!(region.used_idx(0), 4);
    wait_until("the resubmission logged", WAIT, || resubmitted_count(&daemon2.log()).is_some());
    assert_eq!(
        resubmitted_count(&daemon2.log()),
        Some(at_kill.len()),
        "resubmitted what was marked ({} answered before the kill)\n{}",
        answered_before,
        daemon2.log()
    );

    // A replayed write must not land again later: overwrite its sector, and it stays so.
    let b = pattern(2000, 0, 4096);
    let w2 = post(&mut fe, 4, T_OUT, 8, Some(&b), 0);
    wait_until("the second write answered", WAIT, || fe.used_idx(0) == 5);
    assert_eq!(fe.ram.read(w2.status, 1)[0], S_OK);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.image_at(8 * 512, 4096), b, "an old write landed after a newer one");
    assert_eq!(fe.used_idx(0), 5, "a request was answered twice");
}

/// Takes every used element packed queue 0 has published so far: (buffer ID, length).
fn packed_answers(fe: &mut TestFrontend) -> Vec<(u16, u32)> {
    std::iter::from_fn(|| fe.wait_used(0, Duration::ZERO))
        .map(|(id, len)| (id as u16, len))
        .collect()
}

#[test]
fn requests_in_flight_on_a_packed_ring_at_a_kill_are_resubmitted_once() {
    let s = Setup::new();
    let mut daemon = s.daemon_with(",packed-ring=on");
    let mut fe = TestFrontend::connect_inflight(&s.sock, 1, RING, F_RING_PACKED);
    assert_ne!(fe.features & F_RING_PACKED, 0, "packed ring not negotiated");
    let region = fe.inflight.as_ref().unwrap();
    assert_eq!(region.info.mmap_size, (32 + 32 * 256u64).next_multiple_of(64));
    assert_eq!(region.packed_header(0), (1, 0x8000), "a fresh packed region, at 0 in lap 1");
    // Five flushes first (2 descriptors each), so that the requests below cross the ring's
    // end: positions 10..21 of a ring of 16, wrap counters flipping on both sides.
    for k in 10..15 {
        post(&mut fe, k, T_FLUSH, 0, None, 0);
        let (id, _) = fe.wait_used(0, WAIT).expect("a flush answered");
        assert_eq!(u64::from(id), k);
    }
    assert_eq!(fe.inflight.as_ref().unwrap().packed_header(0), (1, 10 | 0x8000));

    let throttle = Throttle::new(&s.image, 1);
    throttle.add(daemon.pid());
    let (reqs, a) = post_four(&mut fe);
    let mut answered = Vec::new();
    wait_until("all four taken", WAIT, || {
        answered.extend(packed_answers(&mut fe));
        fe.inflight.as_ref().unwrap().packed_marked_ids(0).len() + answered.len() == 4
    });
    daemon.kill();
    drop(throttle);
    answered.extend(packed_answers(&mut fe));
    let answered_ids: BTreeSet<u16> = answered.iter().map(|&(id, _)| id).collect();
    let at_kill: BTreeSet<u16> = (0..4).filter(|id| !answered_ids.contains(id)).collect();
    assert!(!at_kill.is_empty(), "everything finished before the kill: the throttle did not hold");
    let marked: BTreeSet<u16> =
        fe.inflight.as_ref().unwrap().packed_marked_ids(0).into_iter().collect();
    assert!(marked.is_superset(&at_kill), "in flight {at_kill:?}, marked {marked:?}");
    for id in &at_kill {
        assert_eq!(fe.ram.read(reqs[usize::from(*id)].status, 1)[0], 0xAA, "{id} answered");
    }

    // The next daemon; the frontend reconnects as QEMU 7.2 does, with a stale packed base.
    let daemon2 = s.daemon_with(",packed-ring=on");
    for started in fe.reconnect(&s.sock) {
        started.expect("ring restarts on the region");
    }
    for _ in 0..at_kill.len() {
        let (id, len) = fe.wait_used(0, WAIT).expect("a resubmitted request answered");
        answered.push((id as u16, len));
    }
    let mut ids: Vec<u16> = answered.iter().map(|&(id, _)| id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3], "each request answered exactly once: {answered:?}");
    check_four(&s, &fe, &reqs, &a);
    wait_until("the resubmission logged", WAIT, || resubmitted_count(&daemon2.log()).is_some());
    assert_eq!(resubmitted_count(&daemon2.log()), Some(at_kill.len()), "{}", daemon2.log());

    // The ring goes on where it stood: a new write to the same sector is answered once, at
    // the next position, and an old write does not land after it.
    let b = pattern(2000, 0, 4096);
    let w2 = post(&mut fe, 5, T_OUT, 8, Some(&b), 0);
    assert_eq!(fe.wait_used(0, WAIT), Some((5, 1)), "the new write's used element");
    assert_eq!(fe.ram.read(w2.status, 1)[0], S_OK);
    assert_eq!(fe.wait_used(0, Duration::from_millis(300)), None, "an answer too many");
    assert_eq!(s.image_at(8 * 512, 4096), b, "an old write landed after a newer one");
    let region = fe.inflight.as_ref().unwrap();
    assert!(region.packed_marked_ids(0).is_empty(), "marks left after everything was answered");
    // 10 + 11 + 3 descriptors: position 8 in the second lap (wrap counter 0).
    assert_eq!(region.packed_header(0), (1, 8));
}

#[test]
fn sigterm_drains_in_flight_requests_and_leaves_nothing_to_resubmit() {
    let s = Setup::new();
    let mut daemon = s.daemon();
    let throttle = Throttle::new(&s.image, 2);
    throttle.add(daemon.pid());
    let mut fe = TestFrontend::connect_inflight(&s.sock, 1, RING, 0);
    let a = pattern(3000, 0, 4096);
    let reqs = [
        post(&mut fe, 0, T_OUT, 16, Some(&a), 0),
        post(&mut fe, 1, T_IN, 256, None, 4096),
        post(&mut fe, 2, T_IN, 512, None, 4096),
    ];
    wait_until("all three taken", WAIT, || {
        fe.inflight.as_ref().unwrap().marked(0).len() + usize::from(fe.used_idx(0)) == 3
    });
    assert!(!fe.inflight.as_ref().unwrap().marked(0).is_empty(), "nothing in flight");
    let status = daemon.stop();
    assert!(status.success(), "SIGTERM exit {status}\n{}", daemon.log());
    // Everything in flight was answered before the daemon went.
    assert_eq!(fe.used_idx(0), 3, "SIGTERM left requests unanswered\n{}", daemon.log());
    for r in &reqs {
        assert_eq!(fe.ram.read(r.status, 1)[0], S_OK);
    }
    assert!(fe.inflight.as_ref().unwrap().marked(0).is_empty());
    assert_eq!(s.image_at(16 * 512, 4096), a);
    drop(throttle);

    let daemon2 = s.daemon();
    for started in fe.reconnect(&s.sock) {
        started.unwrap();
    }
    let r = post(&mut fe, 3, T_IN, 16, None, 4096);
    wait_until("a new request answered", WAIT, || fe.used_idx(0) == 4);
    assert_eq!(fe.ram.read(r.data, 4096), a);
    assert!(!log_mentions(&daemon2.log(), "resubmitted"), "{}", daemon2.log());
}

/// A handshake asking for INFLIGHT_SHMFD on a fresh connection (2 queues).
fn inflight_connection(
    sock: &Path,
    fe_ram: &common::frontend::GuestRam,
) -> vhost::vhost_user::Frontend {
    handshake(
        sock,
        2,
        0,
        vhost::vhost_user::message::VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        fe_ram,
    )
    .0
}

#[test]
fn inflight_messages_out_of_bounds_get_an_error_reply() {
    let s = Setup::new();
    let _daemon = s.daemon();
    let ram = common::frontend::GuestRam::memfd();
    let mut fe = inflight_connection(&s.sock, &ram);
    // More queues than the export has, and a queue size over its maximum.
    for (queues, size) in [(3u16, 128u16), (2, 2048)] {
        let ask = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        };
        // Answered with no region (mmap_size 0), as QEMU understands it.
        let (info, _) = fe.get_inflight_fd(&ask).unwrap();
        assert_eq!(info.mmap_size, 0, "GET_INFLIGHT_FD {queues}x{size} gave a region");
    }
    let ask = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 2, queue_size: 128 };
    let (info, file) = fe.get_inflight_fd(&ask).unwrap();
    assert_eq!(info.num_queues, 2);
    assert_eq!(info.mmap_size, 2 * (16 + 16 * 128 + 48));
    use std::os::fd::AsRawFd;
    // Too small for its geometry; larger than its file; a misaligned offset.
    let small = VhostUserInflight { mmap_size: info.mmap_size - 64, ..info };
    assert!(fe.set_inflight_fd(&small, file.as_raw_fd()).is_err());
    let beyond = VhostUserInflight { queue_size: 256, mmap_size: 2 * (16 + 16 * 256 + 48), ..info };
    assert!(fe.set_inflight_fd(&beyond, file.as_raw_fd()).is_err());
    let misaligned = VhostUserInflight { mmap_offset: 8, ..info };
    assert!(fe.set_inflight_fd(&misaligned, file.as_raw_fd()).is_err());
    // The connection goes on: the right one is taken, and the export serves.
    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    drop(fe);
    let mut t = TestFrontend::connect_inflight(&s.sock, 2, RING, 0);
    let (c, data) = t.request(1, T_IN, 0, &[], 512);
    assert_eq!(c.status, S_OK);
    assert_eq!(data, pattern(SEED, 0, 512));
}

/// Connects with an inflight region, hangs up (as a crash would leave the frontend), posts
/// one more request on queue 0 that nobody took (so the guest has something outstanding and
/// the region is read, not reset), lets `spoil` change queue 0's part, then reconnects to the
/// same daemon (handing the region back) and returns the rings' starts.
fn reconnect_with_spoiled_region(
    s: &Setup,
    spoil: impl FnOnce(&mut TestFrontend),
) -> (TestFrontend, Vec<vhost::Result<()>>) {
    let mut fe = TestFrontend::connect_inflight(&s.sock, 2, RING, 0);
    let (c, _) = fe.request(0, T_IN, 0, &[], 512);
    assert_eq!(c.status, S_OK);
    fe.hang_up();
    std::thread::sleep(Duration::from_millis(100));
    fe.push_avail(0, 0);
    spoil(&mut fe);
    let starts = fe.reconnect(&s.sock);
    (fe, starts)
}

/// Queue 1 still serves, through the same connection.
fn queue_one_serves(fe: &mut TestFrontend) {
    let (c, data) = fe.request(1, T_IN, 8, &[], 512);
    assert_eq!(c.status, S_OK);
    assert_eq!(data, pattern(SEED, 8 * 512, 512));
}

#[test]
fn a_hostile_region_breaks_only_its_queue() {
    let s = Setup::new();
    let mut daemon = s.daemon();

    // A version this daemon does not know.
    let (mut fe, starts) = reconnect_with_spoiled_region(&s, |fe| {
        let r = fe.inflight.as_ref().unwrap();
        r.write(r.queue_offset(0) + 8, &7u16.to_le_bytes());
    });
    assert!(starts[0].is_err(), "queue 0 started on a region of version 7");
    starts[1].as_ref().unwrap();
    queue_one_serves(&mut fe);
    assert!(log_mentions(&daemon.log(), "inflight region version 7"), "{}", daemon.log());
    drop(fe);

    // A head marked in flight beyond the ring (16) the region's part still holds (256).
    let (mut fe, starts) = reconnect_with_spoiled_region(&s, |fe| {
        let r = fe.inflight.as_ref().unwrap();
        r.write(r.desc_offset(0, 100), &[1]);
    });
    assert!(starts[0].is_err(), "queue 0 started with head 100 marked on a ring of 16");
    starts[1].as_ref().unwrap();
    queue_one_serves(&mut fe);
    drop(fe);

    // A last batch longer than the ring: used_idx far behind used->idx.
    let (mut fe, starts) = reconnect_with_spoiled_region(&s, |fe| {
        let r = fe.inflight.as_ref().unwrap();
        let used = fe.used_idx(0);
        r.write(r.queue_offset(0) + 14, &used.wrapping_sub(100).to_le_bytes());
    });
    assert!(starts[0].is_err(), "queue 0 started with a last batch of 100 on a ring of 16");
    starts[1].as_ref().unwrap();
    queue_one_serves(&mut fe);
    drop(fe);

    // A head marked in flight whose descriptor is not a chain (its next leaves the table):
    // the ring starts, finds it, and breaks; the other queue goes on.
    let (mut fe, starts) = reconnect_with_spoiled_region(&s, |fe| {
        fe.set_desc(0, 12, DATA_AREA, 16, common::frontend::DESC_F_NEXT, 200);
        let r = fe.inflight.as_ref().unwrap();
        r.write(r.desc_offset(0, 12), &[1]);
        r.write(r.desc_offset(0, 12) + 8, &1u64.to_le_bytes());
    });
    starts[0].as_ref().expect("the ring starts; the chain is looked at when taken");
    starts[1].as_ref().unwrap();
    queue_one_serves(&mut fe);
    wait_until("queue 0 broken", WAIT, || log_mentions(&daemon.log(), "queue broken by the guest"));
    let before = fe.used_idx(0);
    post(&mut fe, 1, T_IN, 0, None, 512);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fe.used_idx(0), before, "a broken queue answered");
    drop(fe);

    // The daemon serves a well-behaved frontend afterwards, with a fresh region.
    let mut fe = TestFrontend::connect_inflight(&s.sock, 2, RING, 0);
    let (c, _) = fe.request(0, T_IN, 0, &[], 512);
    assert_eq!(c.status, S_OK);
    assert!(daemon.alive());
}
