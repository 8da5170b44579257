//! A structure-aware fuzzer against the real daemon over its real socket (stable Rust, no
//! instrumentation: it judges the daemon by what a tenant could do to it).
//!
//! Each case is one hostile frontend on export `a`: a mostly-valid vhost-user conversation
//! (well-framed messages, most of them sensible, some with random fields, wrong descriptors
//! attached or no descriptor at all), then rounds of random descriptor tables, chains and
//! request headers written into its guest RAM, with kicks; now and then its guest RAM shrinks
//! under the daemon. After every case: the daemon lives, export `b` (a neighbour) answers a
//! read with the right bytes, and the daemon's resident memory stays under its bound.
//!
//! `cargo test --release --test fuzz` runs for `BLKPLANE_FUZZ_SECS` seconds (60 by default,
//! the test command's short run) from `BLKPLANE_FUZZ_SEED` (random by default; printed, so a
//! failing run can be repeated). A long run:
//! `BLKPLANE_FUZZ_SECS=3600 cargo test --release --test fuzz -- --nocapture`.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use common::frontend::{
    descriptor, header, packed_descriptor, GuestRam, DESC_F_INDIRECT, PACKED_F_AVAIL,
    PACKED_F_USED, RAM_BYTES,
};
use common::raw::*;
use common::{make_image, pattern, pipe, proc_status_bytes, Client, Daemon};
use vmm_sys_util::eventfd::EventFd;

/// The daemon's resident memory may not pass this, whatever the cases did (its bounds:
/// bounce buffers per queue, guest RAM mapped per connection, control-plane buffers).
const RSS_BOUND_BYTES: u64 = 512 << 20;
/// Where the frontend pretends its guest RAM lives (vring addresses are given in it).
const UADDR: u64 = 0x7f00_0000_0000;
const IMAGE_BYTES: u64 = 8 << 20;

/// splitmix64: small, fast, good enough to pick cases, and repeatable from a seed. `wild`:
/// this case also garbles the setup messages (otherwise only the rings are random).
struct Rng(u64, bool);

impl Rng {
    /// A value that is usually `good`, sometimes near it, sometimes anything (in wild cases;
    /// otherwise always `good`).
    fn fuzzed(&mut self, good: u64) -> u64 {
        if !self.1 {
            return good;
        }
        match self.below(20) {
            0 => self.next(),
            1 => good.wrapping_add(self.below(8192)).wrapping_sub(4096),
            2 => u64::MAX - self.below(16),
            _ => good,
        }
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Writes into the case's guest RAM where it still exists: the RAM may have shrunk, and our
/// own mapping would SIGBUS past the file's end, so what lies beyond it is dropped.
fn write_ram(ram: &GuestRam, gpa: u64, bytes: &[u8]) {
    let len = ram.file.metadata().map(|m| m.len()).unwrap_or(0).min(RAM_BYTES as u64);
    if gpa.checked_add(bytes.len() as u64).is_some_and(|end| end <= len) {
        ram.write(gpa, bytes);
    }
}

/// Descriptors a case may attach to a message.
struct Fds {
    kick: EventFd,
    call: EventFd,
    /// A pipe's read end (and its write end, kept open with it).
    pipe: (File, File),
    /// A regular file on the root file system (ext4): long enough to map, but a page fault
    /// on it waits for the disk, so the daemon must never map it.
    file: File,
    /// /dev/zero: a character device that mmap takes.
    zero: File,
}

/// The name of [`Fds::file`] in its directory.
const PLAIN_FILE: &str = "plain-file";

impl Fds {
    fn new(dir: &Path) -> Fds {
        let file = File::create(dir.join(PLAIN_FILE)).unwrap();
        file.set_len(RAM_BYTES as u64).unwrap();
        let zero = std::fs::OpenOptions::new().read(true).write(true).open("/dev/zero").unwrap();
        Fds {
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            pipe: pipe(),
            file,
            zero,
        }
    }

    /// Memory to map for an inflight region or a dirty log: the guest RAM's memfd, or a file
    /// no page fault may touch (ext4, a pipe, /dev/zero).
    fn memory_fd(&self, rng: &mut Rng, ram: &GuestRam) -> RawFd {
        let odd = [self.file.as_raw_fd(), self.pipe.0.as_raw_fd(), self.zero.as_raw_fd()];
        if rng.chance(50) {
            ram.file.as_raw_fd()
        } else {
            rng.pick(&odd)
        }
    }

    /// Mostly the right eventfd; sometimes none, a pipe, a regular file, or the memfd.
    fn vring_fd(&self, rng: &mut Rng, ram: &GuestRam, right: &EventFd) -> Vec<RawFd> {
        if !rng.1 {
            return vec![right.as_raw_fd()];
        }
        match rng.below(20) {
            0 => vec![],
            1 => vec![self.pipe.0.as_raw_fd()],
            2 => vec![self.file.as_raw_fd()],
            3 => vec![ram.file.as_raw_fd()],
            4 => vec![right.as_raw_fd(), right.as_raw_fd()],
            _ => vec![right.as_raw_fd()],
        }
    }
}

const QSIZES: [u32; 6] = [64, 64, 64, 16, 256, 3];
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x8000;
const USED: u64 = 0x9000;
const HEADERS: u64 = 0x10_0000;
const INDIRECT: u64 = 0x18_0000;
const DATA: u64 = 0x40_0000;

fn u32s(a: u32, b: u32) -> Vec<u8> {
    let mut v = a.to_le_bytes().to_vec();
    v.extend(b.to_le_bytes());
    v
}

/// One message of the conversation, mostly well-formed.
fn message(
    rng: &mut Rng,
    step: u32,
    ram: &GuestRam,
    fds: &Fds,
    qsize: u32,
    packed: bool,
) -> (u32, Vec<u8>, Vec<RawFd>) {
    let ring_packed = if packed { F_RING_PACKED } else { 0 };
    let q = if !rng.1 || rng.chance(90) { 0 } else { rng.below(4) as u32 };
    match step {
        0 => (SET_OWNER, vec![], vec![]),
        1 => (GET_FEATURES, vec![], vec![]),
        2 => (
            SET_FEATURES,
            rng.fuzzed(FEATURES | (1 << 28) | (1 << 29) | ring_packed).to_le_bytes().to_vec(),
            vec![],
        ),
        3 => (GET_PROTOCOL_FEATURES, vec![], vec![]),
        4 => {
            let features = PROTOCOL_FEATURES | PROTOCOL_INFLIGHT_SHMFD | PROTOCOL_LOG_SHMFD;
            (SET_PROTOCOL_FEATURES, rng.fuzzed(features).to_le_bytes().to_vec(), vec![])
        }
        5 => {
            let size = rng.fuzzed(RAM_BYTES as u64);
            let regions = match if rng.1 { rng.below(12) } else { 9 } {
                0 => vec![],
                1 => {
                    vec![(0, size, UADDR, 0), (RAM_BYTES as u64, size, UADDR + RAM_BYTES as u64, 0)]
                }
                2 => (0..rng.below(80)).map(|i| (i << 30, 4096, UADDR + (i << 30), 0)).collect(),
                _ => vec![(rng.fuzzed(0), size, rng.fuzzed(UADDR), rng.fuzzed(0))],
            };
            let n = regions.len();
            let fd = vec![
                ram.file.as_raw_fd();
                if !rng.1 || rng.chance(90) { n } else { rng.below(3) as usize }
            ];
            (SET_MEM_TABLE, mem_table(&regions), fd)
        }
        6 => (SET_VRING_NUM, u32s(q, rng.fuzzed(u64::from(qsize)) as u32), vec![]),
        7 => {
            let mut p = u32s(q, if !rng.1 || rng.chance(95) { 0 } else { rng.next() as u32 });
            for (good, len) in [(DESC, 8), (USED, 8), (AVAIL, 8), (0, 8)] {
                let v = rng.fuzzed(UADDR + good);
                p.extend(&v.to_le_bytes()[..len]);
            }
            (SET_VRING_ADDR, p, vec![])
        }
        // A packed ring starts at position 0 with wrap counter 1 (bit 15) on both sides.
        8 => {
            let base = if packed { 0x8000_8000 } else { 0 };
            (SET_VRING_BASE, u32s(q, rng.fuzzed(base) as u32), vec![])
        }
        9 => {
            (SET_VRING_CALL, u64::from(q).to_le_bytes().to_vec(), fds.vring_fd(rng, ram, &fds.call))
        }
        10 => {
            let nofd = if rng.1 && rng.chance(5) { 0x100 } else { 0 };
            (
                SET_VRING_KICK,
                (u64::from(q) | nofd).to_le_bytes().to_vec(),
                fds.vring_fd(rng, ram, &fds.kick),
            )
        }
        11 => (
            SET_VRING_ENABLE,
            u32s(q, if !rng.1 || rng.chance(90) { 1 } else { rng.below(3) as u32 }),
            vec![],
        ),
        12 => log_base(rng, ram, fds),
        _ => random_message(rng, ram, fds),
    }
}

/// SET_LOG_BASE: a log of the size guest RAM needs, none, or an absurd one (the export's
/// max-guest-memory of 64 MiB allows 2 KiB), in guest RAM's memfd or in odd files; often
/// before any memory table.
fn log_base(rng: &mut Rng, ram: &GuestRam, fds: &Fds) -> (u32, Vec<u8>, Vec<RawFd>) {
    let fits = RAM_BYTES as u64 / 4096 / 8;
    let size = rng.pick(&[fits, fits, 0, 1, 2048, 2056, RAM_BYTES as u64, 1 << 40, u64::MAX]);
    let mut payload = rng.fuzzed(size).to_le_bytes().to_vec();
    payload.extend(rng.fuzzed(0).to_le_bytes());
    (SET_LOG_BASE, payload, vec![fds.memory_fd(rng, ram)])
}

/// Any message: a known request with a random payload, or an unknown one.
fn random_message(rng: &mut Rng, ram: &GuestRam, fds: &Fds) -> (u32, Vec<u8>, Vec<RawFd>) {
    let request = if rng.chance(90) { rng.below(45) as u32 } else { rng.next() as u32 };
    let len = rng.pick(&[0usize, 4, 8, 12, 16, 24, 40, 48, 64, 256]);
    let mut payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    if request == GET_CONFIG && rng.chance(70) {
        // offset, size, flags, then the bytes.
        let size = rng.below(300) as u32;
        payload = u32s(rng.below(300) as u32, size);
        payload.extend(0u32.to_le_bytes());
        payload.extend(vec![0u8; size as usize]);
    }
    if (request == ADD_MEM_REG || request == REM_MEM_REG) && rng.chance(70) {
        payload = one_region(
            rng.fuzzed(RAM_BYTES as u64),
            rng.fuzzed(RAM_BYTES as u64),
            rng.fuzzed(UADDR),
            rng.fuzzed(0),
        );
    }
    if (request == GET_INFLIGHT_FD || request == SET_INFLIGHT_FD) && rng.chance(70) {
        // A SET hands over guest RAM as the region (whatever the rings left there is what it
        // says) or an odd file.
        let queues = rng.below(4) as u16;
        let any = rng.below(65536) as u16;
        let size = rng.pick(&[1u16, 16, 128, 256, 1024, any]);
        let bytes = rng.fuzzed(inflight_bytes(queues, size));
        payload = inflight_payload(bytes, rng.fuzzed(0), queues, size);
        if request == SET_INFLIGHT_FD {
            return (request, payload, vec![fds.memory_fd(rng, ram)]);
        }
    }
    if request == SET_LOG_BASE && rng.chance(70) {
        return log_base(rng, ram, fds);
    }
    let fd = match rng.below(6) {
        0 => vec![ram.file.as_raw_fd()],
        1 => vec![fds.kick.as_raw_fd()],
        _ => vec![],
    };
    (request, payload, fd)
}

/// Random descriptor tables, chains and headers in the RAM, then avail entries and a kick.
fn ring_round(rng: &mut Rng, ram: &GuestRam, fds: &Fds, qsize: u32, avail_idx: &mut u16) {
    let qsize = qsize.clamp(1, 256) as u16;
    let n = rng.below(u64::from(qsize)) as u16 + 1;
    for i in 0..n {
        // Usually a request: header, some data, status; sometimes anything.
        let slot = HEADERS + u64::from(i) * 64;
        let kind = rng.pick(&[0u32, 0, 1, 1, 4, 8, 10, 11, 13, 13, 14, 99]);
        let any = rng.next();
        let sector =
            rng.pick(&[0u64, 8, IMAGE_BYTES / 512 - 8, IMAGE_BYTES / 512, u64::MAX / 512, any]);
        write_ram(ram, slot, &header(kind, sector));
        if kind == 11 || kind == 13 {
            let mut seg = rng.below(IMAGE_BYTES / 512).to_le_bytes().to_vec();
            seg.extend((rng.below(64) as u32).to_le_bytes());
            seg.extend((rng.below(3) as u32).to_le_bytes());
            write_ram(ram, slot + 16, &seg);
        }
        let data_len = rng.pick(&[512u32, 4096, 4096, 65536, 1 << 20, (1 << 20) + 512, 1000, 0]);
        let near = DATA + rng.below(8) * 4096 + rng.pick(&[0, 0, 1, 511]);
        let data_gpa = rng.fuzzed(near);
        let mut chain = vec![(slot, 16u32, 0u16)];
        if kind == 11 || kind == 13 {
            chain.push((slot + 16, 16, 0));
        } else if kind != 4 {
            let writable = if kind == 1 { 0 } else { 2 };
            chain.push((data_gpa, data_len, writable));
        }
        chain.push((slot + 40, 1, 2));
        let indirect = rng.chance(15);
        let base = if indirect { INDIRECT + u64::from(i) * 0x400 } else { DESC };
        let first = if indirect { 0 } else { (i * 3) % qsize };
        for (k, &(addr, len, write)) in chain.iter().enumerate() {
            let last = k + 1 == chain.len();
            let idx = if indirect { k as u16 } else { (first + k as u16) % qsize };
            let next = if indirect { k as u16 + 1 } else { (idx + 1) % qsize };
            let mut flags = write | if last { 0 } else { 1 };
            if rng.chance(3) {
                flags = rng.next() as u16 & 7;
            }
            let addr = rng.fuzzed(addr);
            let len = if rng.chance(97) { len } else { rng.next() as u32 };
            let next = if rng.chance(97) { next } else { rng.next() as u16 };
            write_ram(ram, base + 16 * u64::from(idx), &descriptor(addr, len, flags, next));
        }
        let head = if indirect {
            let head = (i * 3) % qsize;
            let table = rng.fuzzed(INDIRECT + u64::from(i) * 0x400);
            let d = descriptor(table, 16 * chain.len() as u32, DESC_F_INDIRECT, 0);
            write_ram(ram, DESC + 16 * u64::from(head), &d);
            head
        } else {
            first
        };
        let head = if rng.chance(97) { head } else { rng.next() as u16 };
        write_ram(ram, AVAIL + 4 + 2 * u64::from(*avail_idx % qsize), &head.to_le_bytes());
        *avail_idx = avail_idx.wrapping_add(1);
    }
    if rng.chance(3) {
        *avail_idx = rng.next() as u16;
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    write_ram(ram, AVAIL + 2, &avail_idx.to_le_bytes());
    let _ = fds.kick.write(1);
}

/// VIRTIO_F_RING_PACKED.
const F_RING_PACKED: u64 = 1 << 34;

/// A packed ring's driver position: where the next chain goes, and the lap's wrap counter.
struct PackedPos {
    index: u16,
    wrap: bool,
}

/// The packed ring's round: random chains (mostly requests) made available from the
/// driver's position on, head last, with flags and wrap bits that sometimes lie, indirect
/// tables, wild IDs; then a kick.
fn packed_round(rng: &mut Rng, ram: &GuestRam, fds: &Fds, qsize: u32, pos: &mut PackedPos) {
    let qsize = qsize.clamp(1, 256) as u16;
    let n = rng.below(u64::from(qsize)) as u16 + 1;
    for i in 0..n {
        let slot = HEADERS + u64::from(i) * 64;
        let kind = rng.pick(&[0u32, 0, 1, 1, 4, 8, 13, 99]);
        let any = rng.next();
        let sector = rng.pick(&[0u64, 8, IMAGE_BYTES / 512 - 8, IMAGE_BYTES / 512, any]);
        write_ram(ram, slot, &header(kind, sector));
        let data_len = rng.pick(&[512u32, 4096, 65536, 1 << 20, 1000, 0]);
        let near = DATA + rng.below(8) * 4096;
        let data_gpa = rng.fuzzed(near);
        let mut chain = vec![(slot, 16u32, 0u16)];
        if kind != 4 {
            chain.push((data_gpa, data_len, if kind == 1 { 0 } else { 2 }));
        }
        chain.push((slot + 40, 1, 2));
        let id = if rng.chance(95) { pos.index } else { rng.next() as u16 };
        let avail = |wrap: bool| if wrap { PACKED_F_AVAIL } else { PACKED_F_USED };
        if rng.chance(15) {
            for (k, &(addr, len, write)) in chain.iter().enumerate() {
                let d = packed_descriptor(rng.fuzzed(addr), len, 0, write);
                write_ram(ram, INDIRECT + u64::from(i) * 0x400 + 16 * k as u64, &d);
            }
            let table = rng.fuzzed(INDIRECT + u64::from(i) * 0x400);
            let mut flags = DESC_F_INDIRECT | avail(pos.wrap);
            if rng.chance(5) {
                flags = rng.next() as u16;
            }
            let d = packed_descriptor(table, 16 * chain.len() as u32, id, flags);
            write_ram(ram, DESC + 16 * u64::from(pos.index), &d);
            advance(pos, 1, qsize);
            continue;
        }
        let head = pos.index;
        let mut head_desc = None;
        for (k, &(addr, len, write)) in chain.iter().enumerate() {
            let last = k + 1 == chain.len();
            let mut flags = write | if last { 0 } else { 1 } | avail(pos.wrap);
            if rng.chance(3) {
                // Any flags: lying wrap bits, NEXT round the ring, INDIRECT mid-chain.
                flags = rng.next() as u16;
            }
            let len = if rng.chance(97) { len } else { rng.next() as u32 };
            let d = packed_descriptor(rng.fuzzed(addr), len, id, flags);
            if k == 0 {
                head_desc = Some(d);
            } else {
                write_ram(ram, DESC + 16 * u64::from(pos.index), &d);
            }
            advance(pos, 1, qsize);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if let Some(d) = head_desc {
            write_ram(ram, DESC + 16 * u64::from(head), &d);
        }
    }
    if rng.chance(3) {
        pos.wrap = !pos.wrap;
    }
    let _ = fds.kick.write(1);
}

fn advance(pos: &mut PackedPos, n: u16, qsize: u16) {
    pos.index += n;
    if pos.index >= qsize {
        pos.index -= qsize;
        pos.wrap = !pos.wrap;
    }
}

/// The daemon's mappings of memory a page fault could stall on (the ext4 file, /dev/zero):
/// there must be none, whatever a case sent.
fn stallable_mappings(pid: i32, dir: &Path) -> Vec<String> {
    let plain = dir.join(PLAIN_FILE).display().to_string();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|l| l.contains(&plain) || l.contains("/dev/zero"))
        .map(String::from)
        .collect()
}

/// One hostile frontend, start to hang-up. Returns the stallable mappings it found the
/// daemon holding (none, unless the daemon maps what it must not).
fn case(rng: &mut Rng, sock: &Path, dir: &Path, pid: i32) -> Vec<String> {
    let ram = GuestRam::memfd();
    let fds = Fds::new(dir);
    let Ok(conn) = std::os::unix::net::UnixStream::connect(sock) else { return Vec::new() };
    conn.set_nonblocking(true).unwrap();
    let raw = RawFrontend { sock: conn };
    let qsize = if rng.1 { rng.pick(&QSIZES) } else { rng.pick(&[16, 64, 256]) };
    // Half the cases negotiate packed rings (unless the features are garbled).
    let packed = rng.chance(50);
    let mut steps: Vec<u32> = (0..12).collect();
    if rng.1 {
        for _ in 0..rng.below(6) {
            let at = rng.below(steps.len() as u64 + 1) as usize;
            steps.insert(at, 100);
        }
        if rng.chance(10) {
            steps.retain(|_| rng.chance(80));
        }
    }
    if rng.chance(40) {
        // A dirty log, anywhere: before the memory table in most cases.
        let at = rng.below(steps.len() as u64 + 1) as usize;
        steps.insert(at, 12);
    }
    let drain = |raw: &RawFrontend| {
        let mut buf = [0u8; 4096];
        while matches!((&raw.sock).read(&mut buf), Ok(n) if n > 0) {}
    };
    for step in steps {
        let (request, payload, fd) = message(rng, step, &ram, &fds, qsize, packed);
        let need_reply = rng.chance(50);
        if raw.send(request, need_reply, &payload, &fd).is_err() {
            return Vec::new();
        }
        drain(&raw);
    }
    // A round trip, so the rings are written while the queue runs (in most cases), and
    // every message before it has been handled.
    if raw.send(GET_QUEUE_NUM, false, &[], &[]).is_ok() {
        raw.sock.set_nonblocking(false).unwrap();
        let _ = raw.reply();
        raw.sock.set_nonblocking(true).unwrap();
    }
    let stallable = stallable_mappings(pid, dir);
    let mut avail_idx = 0u16;
    let mut pos = PackedPos { index: 0, wrap: true };
    for _ in 0..rng.below(12) {
        if packed {
            packed_round(rng, &ram, &fds, qsize, &mut pos);
        } else {
            ring_round(rng, &ram, &fds, qsize, &mut avail_idx);
        }
        if rng.chance(30) {
            std::thread::sleep(Duration::from_millis(rng.below(5)));
        }
        if rng.chance(3) {
            // The guest RAM shrinks under the daemon.
            let len = if rng.chance(50) { 0 } else { rng.below(RAM_BYTES as u64 / 4096) * 4096 };
            let _ = ram.file.set_len(len);
        }
        if rng.chance(10) {
            let (request, payload, fd) = random_message(rng, &ram, &fds);
            let _ = raw.send(request, rng.chance(50), &payload, &fd);
        }
        drain(&raw);
    }
    std::thread::sleep(Duration::from_millis(rng.below(3)));
    stallable
}

#[test]
fn fuzz_the_daemon_over_its_socket() {
    let secs: u64 =
        std::env::var("BLKPLANE_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("BLKPLANE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(common::rand_u16()) << 16 | u64::from(common::rand_u16()));
    eprintln!("fuzz: seed {seed}, {secs} s (BLKPLANE_FUZZ_SEED={seed} repeats this run)");
    // Export a on the root filesystem (O_DIRECT wants aligned buffers there, so odd ones
    // bounce); export b, the neighbour, on tmpfs.
    let dir = tempfile::Builder::new().prefix("blkplane-fuzz").tempdir_in("/var/tmp").unwrap();
    let (a_img, b_img) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    make_image(&a_img, IMAGE_BYTES, 1);
    make_image(&b_img, IMAGE_BYTES, 2);
    let (a_sock, b_sock) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut daemon = Daemon::start(
        dir.path(),
        &[
            format!(
                "id=a,socket={},image={},queues=2,queue-size=256,max-guest-memory=64M",
                a_sock.display(),
                a_img.display()
            ),
            format!("id=b,socket={},image={},cache=writeback", b_sock.display(), b_img.display()),
        ],
    );
    let mut neighbour = Client::connect(&b_sock, 1);
    let mut rng = Rng(seed, false);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut cases = 0u64;
    let mut peak_rss = 0;
    while Instant::now() < deadline {
        let case_seed = rng.next();
        let pid = daemon.pid();
        let stallable =
            case(&mut Rng(case_seed, case_seed.is_multiple_of(3)), &a_sock, dir.path(), pid);
        cases += 1;
        assert!(
            stallable.is_empty(),
            "case {cases} (seed {case_seed}): the daemon mapped memory a fault could stall on: \
             {stallable:?}"
        );
        assert!(
            daemon.alive(),
            "case {cases} (seed {case_seed}) killed the daemon:\n{}",
            daemon.log()
        );
        let got = neighbour.read_at(0, (cases % 2000) * 4096, 4096, 0);
        assert!(
            got.as_deref() == Ok(&pattern(2, (cases % 2000) * 4096, 4096)[..]),
            "case {cases} (seed {case_seed}): the neighbour's read failed"
        );
        let rss = proc_status_bytes(daemon.pid(), "VmRSS");
        peak_rss = peak_rss.max(rss);
        assert!(rss < RSS_BOUND_BYTES, "case {cases} (seed {case_seed}): RSS {rss} bytes");
    }
    // The target export still serves a well-behaved client, with its image's bytes.
    let mut c = Client::connect(&a_sock, 1);
    let back = c.read_at(0, IMAGE_BYTES - 4096, 4096, 0).unwrap();
    assert_eq!(back.len(), 4096);
    drop(c);
    drop(neighbour);
    let log = daemon.log();
    let packed_started = log.matches("ring=\"packed\"").count();
    // Half the cases ask for packed rings: after a few dozen, some must have started.
    assert!(cases < 100 || packed_started > 0, "no queue started on a packed ring");
    eprintln!(
        "fuzz: {cases} cases in {secs} s, peak RSS {} MiB; the daemon started {} queues ({} \
         on packed rings), broke {}, failed {} requests, refused {} messages, dropped {} shrunk \
         guest RAMs",
        peak_rss >> 20,
        log.matches("queue started").count(),
        packed_started,
        log.matches("queue broken").count(),
        log.matches("request failed").count(),
        log.matches("refused").count(),
        log.matches("memory file shrank").count(),
    );
    let status = daemon.stop();
    assert!(status.success(), "exit {status}:\n{}", daemon.log());
}
