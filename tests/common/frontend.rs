//! A small vhost-user frontend with its own virtqueue writer, for sending the daemon what no
//! well-behaved driver would: broken chains, wild addresses, jumping indices. It plays the
//! part of QEMU (the vhost-user messages, through rust-vmm's `vhost` frontend) and of the
//! guest driver (descriptors and rings it writes itself into shared memory).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_RING_PACKED: u64 = 1 << 34;

/// Packed-ring descriptor flags (virtio 1.1, 2.8): whose turn a descriptor is.
pub const PACKED_F_AVAIL: u16 = 1 << 7;
pub const PACKED_F_USED: u16 = 1 << 15;

/// Guest RAM: one memfd, guest physical address 0 at its start.
pub const RAM_BYTES: usize = 16 << 20;
const RING_AREA: u64 = 0;
const RING_STRIDE: u64 = 0x10000;
pub const INDIRECT_AREA: u64 = 0x10_0000;
pub const HEADER_AREA: u64 = 0x20_0000;
pub const DATA_AREA: u64 = 0x40_0000;

pub struct GuestRam {
    pub file: File,
    ptr: *mut u8,
}

impl GuestRam {
    /// A memfd of RAM_BYTES (what QEMU's memory-backend-memfd gives).
    pub fn memfd() -> GuestRam {
        GuestRam::map(memfd(RAM_BYTES as u64))
    }

    /// RAM_BYTES of `file` (sized by the caller), as memory-backend-file shares it.
    pub fn map(file: File) -> GuestRam {
        assert!(file.metadata().unwrap().len() >= RAM_BYTES as u64);
        // SAFETY: a new shared mapping of our memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestRam { file, ptr: ptr.cast() }
    }

    pub fn hva(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        assert!(gpa as usize + data.len() <= RAM_BYTES);
        // SAFETY: inside our mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa as usize), data.len())
        }
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= RAM_BYTES);
        let mut v = vec![0u8; len];
        // SAFETY: inside our mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), len) }
        v
    }

    fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new().
        unsafe { libc::munmap(self.ptr.cast(), RAM_BYTES) };
    }
}

pub struct TestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
    /// The driver's side of a packed ring (F_RING_PACKED acked): `desc` is the descriptor
    /// ring, `avail` the driver event area, `used` the device event area.
    pub packed: Option<PackedDriver>,
}

/// Where a packed ring's driver makes the next chain available and expects the next used
/// element, with the wrap counters (2.8.1), and how many descriptors each buffer ID took.
#[derive(Debug, Clone)]
pub struct PackedDriver {
    pub avail: u16,
    pub avail_wrap: bool,
    pub used: u16,
    pub used_wrap: bool,
    pub descs_by_id: Vec<u16>,
}

impl PackedDriver {
    fn new(size: u16) -> PackedDriver {
        PackedDriver {
            avail: 0,
            avail_wrap: true,
            used: 0,
            used_wrap: true,
            descs_by_id: vec![1; usize::from(size)],
        }
    }

    /// The AVAIL/USED bits that make a descriptor available in the driver's current lap.
    pub fn avail_bits(&self) -> u16 {
        if self.avail_wrap {
            PACKED_F_AVAIL
        } else {
            PACKED_F_USED
        }
    }

    /// Moves the avail position `n` on, flipping its wrap counter past the end.
    pub fn advance_avail(&mut self, n: u16, size: u16) {
        advance(&mut self.avail, &mut self.avail_wrap, n, size);
    }

    fn advance_used(&mut self, n: u16, size: u16) {
        advance(&mut self.used, &mut self.used_wrap, n, size);
    }
}

/// Moves a packed ring position `n` on, flipping its wrap counter past the end.
fn advance(pos: &mut u16, wrap: &mut bool, n: u16, size: u16) {
    *pos += n;
    if *pos >= size {
        *pos -= size;
        *wrap = !*wrap;
    }
}

/// One buffer of a chain to build.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub gpa: u64,
    pub len: u32,
    pub writable: bool,
}

/// What came back for a request.
#[derive(Debug, PartialEq, Eq)]
pub struct Completed {
    pub id: u32,
    pub used_len: u32,
    pub status: u8,
}

pub struct TestFrontend {
    pub fe: Frontend,
    pub ram: GuestRam,
    pub queues: Vec<TestQueue>,
    pub features: u64,
    /// The inflight region, if the connection asked for one.
    pub inflight: Option<InflightFd>,
}

/// Queue size the tests' inflight regions are asked for (QEMU's default is 128; bigger than
/// the rings the tests use, as a guest may choose a ring smaller than the device's maximum).
pub const INFLIGHT_QUEUE_SIZE: u16 = 256;

/// The inflight region the daemon gave us (GET_INFLIGHT_FD), kept as QEMU keeps it, and
/// readable here per the vhost-user spec's split-ring layout: a 16-byte header (features u64,
/// version, desc_num, last_batch_head, used_idx as u16) and 16 bytes per descriptor
/// (inflight u8 at 0, next u16 at 6, counter u64 at 8).
pub struct InflightFd {
    pub file: File,
    pub info: VhostUserInflight,
    ptr: *mut u8,
}

impl InflightFd {
    fn map(file: File, info: VhostUserInflight) -> InflightFd {
        // SAFETY: a new shared mapping of the region's fd, of the size the daemon gave.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                info.mmap_size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                info.mmap_offset as libc::off_t,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        InflightFd { file, info, ptr: ptr.cast() }
    }

    /// Byte offset of queue `q`'s part: each starts on a 64-byte boundary.
    pub fn queue_offset(&self, q: usize) -> usize {
        q * (16 + 16 * usize::from(self.info.queue_size)).next_multiple_of(64)
    }

    pub fn read(&self, at: usize, len: usize) -> Vec<u8> {
        assert!(at + len <= self.info.mmap_size as usize);
        let mut v = vec![0u8; len];
        // SAFETY: inside our mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), v.as_mut_ptr(), len) };
        v
    }

    pub fn write(&self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.info.mmap_size as usize);
        // SAFETY: inside our mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(at), data.len()) };
    }

    fn u16_at(&self, at: usize) -> u16 {
        let b = self.read(at, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    pub fn version(&self, q: usize) -> u16 {
        self.u16_at(self.queue_offset(q) + 8)
    }

    pub fn desc_num(&self, q: usize) -> u16 {
        self.u16_at(self.queue_offset(q) + 10)
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.u16_at(self.queue_offset(q) + 14)
    }

    /// Offset of descriptor `head`'s state in queue `q`.
    pub fn desc_offset(&self, q: usize, head: u16) -> usize {
        self.queue_offset(q) + 16 + 16 * usize::from(head)
    }

    pub fn inflight(&self, q: usize, head: u16) -> bool {
        self.read(self.desc_offset(q, head), 1)[0] != 0
    }

    pub fn counter(&self, q: usize, head: u16) -> u64 {
        u64::from_le_bytes(self.read(self.desc_offset(q, head) + 8, 8).try_into().unwrap())
    }

    /// Heads of queue `q` marked in flight.
    pub fn marked(&self, q: usize) -> Vec<u16> {
        (0..self.info.queue_size).filter(|&h| self.inflight(q, h)).collect()
    }

    /// Queue `q`'s offset in a region laid out for packed rings (the spec's
    /// `QueueRegionPacked`: a 32-byte header, 32 bytes per `DescStatePacked`).
    fn packed_queue_offset(&self, q: usize) -> usize {
        q * (32 + 32 * usize::from(self.info.queue_size)).next_multiple_of(64)
    }

    /// Packed layout: version (u16 at 8) and the committed used position (old_used_idx at
    /// 18, old_used_wrap_counter at 21) with its wrap counter in bit 15.
    pub fn packed_header(&self, q: usize) -> (u16, u16) {
        let at = self.packed_queue_offset(q);
        let wrap = u16::from(self.read(at + 21, 1)[0] != 0) << 15;
        (self.u16_at(at + 8), self.u16_at(at + 18) | wrap)
    }

    /// Packed layout: the buffer IDs of the chains marked in flight in queue `q`, each read
    /// from the copy of its last descriptor (entry fields: inflight u8 at 0, next u16 at 2,
    /// num u16 at 6, id u16 at 16).
    pub fn packed_marked_ids(&self, q: usize) -> Vec<u16> {
        let base = self.packed_queue_offset(q) + 32;
        let entry = |e: u16| base + 32 * usize::from(e);
        let mut ids = Vec::new();
        for head in 0..self.info.queue_size {
            if self.read(entry(head), 1)[0] == 0 {
                continue;
            }
            let mut e = head;
            for _ in 1..self.u16_at(entry(head) + 6) {
                e = self.u16_at(entry(e) + 2);
            }
            ids.push(self.u16_at(entry(e) + 16));
        }
        ids.sort_unstable();
        ids
    }
}

impl Drop for InflightFd {
    fn drop(&mut self) {
        // SAFETY: the mapping made in map().
        unsafe { libc::munmap(self.ptr.cast(), self.info.mmap_size as usize) };
    }
}

/// SET_OWNER, features, protocol features (those every test needs, and `extra`), queue count
/// and the memory table: what every connection starts with.
pub fn handshake(
    sock: &Path,
    num_queues: usize,
    want: u64,
    extra: VhostUserProtocolFeatures,
    ram: &GuestRam,
) -> (Frontend, u64) {
    let mut fe = Frontend::connect(sock, num_queues as u64).expect("vhost-user connect");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let features = offered & (want | F_PROTOCOL_FEATURES | F_VERSION_1);
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    let need = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | extra;
    assert!(proto.contains(need), "protocol features {proto:?}");
    fe.set_protocol_features(need).unwrap();
    assert!(fe.get_queue_num().unwrap() >= num_queues as u64);
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: RAM_BYTES as u64,
        userspace_addr: ram.hva(0),
        mmap_offset: 0,
        mmap_handle: ram.file.as_raw_fd(),
    }])
    .unwrap();
    (fe, features)
}

impl TestFrontend {
    /// Connects and sets up `num_queues` queues of `size`, acking `want` of what is offered.
    pub fn connect(sock: &Path, num_queues: usize, size: u16, want: u64) -> TestFrontend {
        Self::connect_with_ram(sock, num_queues, size, want, GuestRam::memfd())
    }

    /// Like `connect`, with guest RAM of the caller's making.
    pub fn connect_with_ram(
        sock: &Path,
        num_queues: usize,
        size: u16,
        want: u64,
        ram: GuestRam,
    ) -> TestFrontend {
        Self::connect_full(sock, num_queues, size, want, ram, VhostUserProtocolFeatures::empty())
    }

    /// Like `connect`, also negotiating the protocol features `extra` (the inflight region is
    /// asked for if they hold INFLIGHT_SHMFD).
    pub fn connect_with_protocol(
        sock: &Path,
        num_queues: usize,
        size: u16,
        want: u64,
        extra: VhostUserProtocolFeatures,
    ) -> TestFrontend {
        Self::connect_full(sock, num_queues, size, want, GuestRam::memfd(), extra)
    }

    /// Like `connect`, asking the daemon for an inflight region (INFLIGHT_SHMFD) of
    /// `num_queues` queues of 256 first, as QEMU's vhost-user-blk does.
    pub fn connect_inflight(sock: &Path, num_queues: usize, size: u16, want: u64) -> TestFrontend {
        let extra = VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        Self::connect_full(sock, num_queues, size, want, GuestRam::memfd(), extra)
    }

    fn connect_full(
        sock: &Path,
        num_queues: usize,
        size: u16,
        want: u64,
        ram: GuestRam,
        extra: VhostUserProtocolFeatures,
    ) -> TestFrontend {
        let inflight = extra.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let (fe, features) = handshake(sock, num_queues, want, extra, &ram);
        let mut t = TestFrontend { fe, ram, queues: Vec::new(), features, inflight: None };
        if inflight {
            let ask = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: num_queues as u16,
                queue_size: INFLIGHT_QUEUE_SIZE,
            };
            let (info, file) = t.fe.get_inflight_fd(&ask).expect("GET_INFLIGHT_FD");
            t.fe.set_inflight_fd(&info, file.as_raw_fd()).expect("SET_INFLIGHT_FD");
            t.inflight = Some(InflightFd::map(file, info));
        }
        for i in 0..num_queues {
            let base = RING_AREA + i as u64 * RING_STRIDE;
            t.queues.push(TestQueue {
                size,
                desc: base,
                avail: base + 16 * u64::from(size),
                used: base + 0x8000,
                avail_idx: 0,
                last_used: 0,
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                packed: (features & F_RING_PACKED != 0).then(|| PackedDriver::new(size)),
            });
            // A packed ring starts at position 0 with wrap counter 1 (bit 15).
            let base = if features & F_RING_PACKED != 0 { 0x8000 } else { 0 };
            t.start_ring(i, base).expect("start ring");
        }
        t
    }

    /// Hands ring `i` to the daemon from avail index `base`; the daemon's answer to the
    /// kick that starts it.
    fn start_ring(&mut self, i: usize, base: u16) -> vhost::Result<()> {
        let q = &self.queues[i];
        self.fe.set_vring_num(i, q.size).unwrap();
        self.fe
            .set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: q.size,
                    queue_size: q.size,
                    flags: 0,
                    desc_table_addr: self.ram.hva(q.desc),
                    used_ring_addr: self.ram.hva(q.used),
                    avail_ring_addr: self.ram.hva(q.avail),
                    log_addr: None,
                },
            )
            .unwrap();
        self.fe.set_vring_base(i, base).unwrap();
        self.fe.set_vring_call(i, &q.call).unwrap();
        // The kick starts the ring: where the daemon says whether it can.
        let started = self.fe.set_vring_kick(i, &q.kick);
        let enabled = self.fe.set_vring_enable(i, true);
        started.and(enabled)
    }

    /// Hangs up the connection (the daemon stops its queues); `reconnect` makes a new one.
    pub fn hang_up(&self) {
        // SAFETY: shutdown(2) on the connection's own fd, which stays open until replaced.
        unsafe { libc::shutdown(self.fe.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Sends ring `i`'s addresses again, with the LOG flag and `log_addr` if given (what QEMU
    /// does when a migration starts and ends).
    pub fn set_ring_log(&mut self, i: usize, log_addr: Option<u64>) -> vhost::Result<()> {
        let q = &self.queues[i];
        self.fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: if log_addr.is_some() { 1 } else { 0 },
                desc_table_addr: self.ram.hva(q.desc),
                used_ring_addr: self.ram.hva(q.used),
                avail_ring_addr: self.ram.hva(q.avail),
                log_addr,
            },
        )
    }

    /// Connects again after the daemon went away, as QEMU's reconnecting chardev does: the
    /// same guest RAM and rings, the inflight region handed back, and each ring's base taken
    /// from its used index (all QEMU knows after losing the daemon).
    /// Returns each ring's start (the daemon may refuse one whose region part is bad).
    pub fn reconnect(&mut self, sock: &Path) -> Vec<vhost::Result<()>> {
        // The daemon serves one frontend at a time: hang up the old connection first (a
        // daemon that died already saw it go).
        self.hang_up();
        let extra = if self.inflight.is_some() {
            VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            VhostUserProtocolFeatures::empty()
        };
        let (fe, features) = handshake(sock, self.queues.len(), self.features, extra, &self.ram);
        assert_eq!(features, self.features, "features changed across the reconnect");
        self.fe = fe;
        if let Some(r) = &self.inflight {
            self.fe.set_inflight_fd(&r.info, r.file.as_raw_fd()).expect("SET_INFLIGHT_FD");
        }
        (0..self.queues.len())
            .map(|i| {
                // A split ring's used index is in guest memory. A packed ring's positions are
                // not: QEMU 7.2 sends again what it sent when the ring started (position 0,
                // wrap counter 1 in these tests), whatever the dead daemon did since.
                let base = if self.queues[i].packed.is_some() { 0x8000 } else { self.used_idx(i) };
                self.start_ring(i, base)
            })
            .collect()
    }

    /// The used ring's index as the daemon last published it.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.ram.read_u16(self.queues[q].used + 2)
    }

    /// The used ring's `n`-th element (head id, length).
    pub fn used_elem(&self, q: usize, n: u16) -> (u32, u32) {
        let slot = u64::from(n % self.queues[q].size);
        let e = self.ram.read(self.queues[q].used + 4 + 8 * slot, 8);
        (
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            u32::from_le_bytes(e[4..8].try_into().unwrap()),
        )
    }

    /// Lays `bufs` out as a chain in descriptors `first..`, publishes its head and kicks;
    /// does not wait. Returns the head.
    pub fn post(&mut self, q: usize, first: u16, bufs: &[Buf]) -> u16 {
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags =
                if b.writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            let idx = first + i as u16;
            self.set_desc(q, idx, b.gpa, b.len, flags, idx + 1);
        }
        self.push_avail(q, first);
        self.kick(q);
        first
    }

    pub fn config(&mut self, len: u32) -> Vec<u8> {
        let (_, buf) = self
            .fe
            .get_config(0, len, VhostUserConfigFlags::WRITABLE, &vec![0u8; len as usize])
            .unwrap();
        buf
    }

    /// Writes descriptor `idx` of queue `q`'s table.
    pub fn set_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.queues[q].desc + 16 * u64::from(idx);
        write_desc(&self.ram, at, addr, len, flags, next);
    }

    /// Puts `head` in the avail ring and publishes it.
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let (avail, idx, size) =
            (self.queues[q].avail, self.queues[q].avail_idx, self.queues[q].size);
        self.ram.write_u16(avail + 4 + 2 * u64::from(idx % size), head);
        fence(Ordering::SeqCst);
        self.set_avail_idx(q, idx.wrapping_add(1));
    }

    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.queues[q].avail_idx = idx;
        self.ram.write_u16(self.queues[q].avail + 2, idx);
        fence(Ordering::SeqCst);
    }

    pub fn kick(&self, q: usize) {
        self.queues[q].kick.write(1).unwrap();
    }

    /// Waits up to `timeout` for the next used entry of queue `q`.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Option<(u32, u32)> {
        if self.queues[q].packed.is_some() {
            return self.wait_packed_used(q, timeout);
        }
        let deadline = Instant::now() + timeout;
        let used = self.queues[q].used;
        loop {
            let idx = self.ram.read_u16(used + 2);
            if idx != self.queues[q].last_used {
                fence(Ordering::SeqCst);
                let slot = u64::from(self.queues[q].last_used % self.queues[q].size);
                let e = self.ram.read(used + 4 + 8 * slot, 8);
                self.queues[q].last_used = self.queues[q].last_used.wrapping_add(1);
                return Some((
                    u32::from_le_bytes(e[0..4].try_into().unwrap()),
                    u32::from_le_bytes(e[4..8].try_into().unwrap()),
                ));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits up to `timeout` for the next used element of packed queue `q`: (id, len).
    fn wait_packed_used(&mut self, q: usize, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            let (size, at, wrap) = {
                let tq = &self.queues[q];
                let p = tq.packed.as_ref().unwrap();
                (tq.size, tq.desc + 16 * u64::from(p.used), p.used_wrap)
            };
            let flags = self.ram.read_u16(at + 14);
            if (flags & PACKED_F_AVAIL != 0) == wrap && (flags & PACKED_F_USED != 0) == wrap {
                fence(Ordering::SeqCst);
                let e = self.ram.read(at + 8, 6);
                let len = u32::from_le_bytes(e[0..4].try_into().unwrap());
                let id = u16::from_le_bytes([e[4], e[5]]);
                let p = self.queues[q].packed.as_mut().unwrap();
                let descs = p.descs_by_id.get(usize::from(id)).copied().unwrap_or(1);
                p.advance_used(descs, size);
                return Some((u32::from(id), len));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Writes packed ring `q`'s descriptor at position `pos` as the guest would.
    pub fn set_packed_desc(&self, q: usize, pos: u16, addr: u64, len: u32, id: u16, flags: u16) {
        let at = self.queues[q].desc + 16 * u64::from(pos);
        self.ram.write(at, &packed_descriptor(addr, len, id, flags));
    }

    /// Makes `bufs` available on packed ring `q` as buffer `id` (descriptors from the avail
    /// position on, the head's flags written last) and kicks; does not wait.
    pub fn post_packed(&mut self, q: usize, id: u16, bufs: &[Buf]) {
        let size = self.queues[q].size;
        let mut p = self.queues[q].packed.clone().expect("a packed ring");
        let head = (p.avail, p.avail_bits());
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = p.avail_bits()
                | if b.writable { DESC_F_WRITE } else { 0 }
                | if last { 0 } else { DESC_F_NEXT };
            if i == 0 {
                self.set_packed_desc(q, p.avail, b.gpa, b.len, id, flags & !head.1);
            } else {
                self.set_packed_desc(q, p.avail, b.gpa, b.len, id, flags);
            }
            p.advance_avail(1, size);
        }
        fence(Ordering::SeqCst);
        // The head's own avail bits last: the chain becomes available at once.
        let at = self.queues[q].desc + 16 * u64::from(head.0) + 14;
        let head_flags = self.ram.read_u16(at) | head.1;
        self.ram.write_u16(at, head_flags);
        fence(Ordering::SeqCst);
        if let Some(n) = p.descs_by_id.get_mut(usize::from(id)) {
            *n = bufs.len() as u16;
        }
        self.queues[q].packed = Some(p);
        self.kick(q);
    }

    /// Lays out `bufs` as a chain in descriptors 0.. of queue `q`, submits it, and waits for
    /// the answer. The status byte is read from the last buffer's last byte.
    pub fn submit_chain(&mut self, q: usize, bufs: &[Buf]) -> Option<Completed> {
        if self.queues[q].packed.is_some() {
            let status_gpa = bufs.last().map(|b| b.gpa + u64::from(b.len) - 1);
            if let Some(s) = status_gpa {
                self.ram.write(s, &[0xAA]);
            }
            let id = self.queues[q].packed.as_ref().unwrap().avail;
            self.post_packed(q, id, bufs);
            return self.packed_answer(q, status_gpa);
        }
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags =
                if b.writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            self.set_desc(q, i as u16, b.gpa, b.len, flags, i as u16 + 1);
        }
        self.submit_head(q, 0, bufs.last().map(|b| b.gpa + u64::from(b.len) - 1))
    }

    /// Waits 5 s at most for packed queue `q`'s next used element; reads the status.
    fn packed_answer(&mut self, q: usize, status_gpa: Option<u64>) -> Option<Completed> {
        let (id, used_len) = self.wait_used(q, Duration::from_secs(5))?;
        let status = status_gpa.map(|s| self.ram.read(s, 1)[0]).unwrap_or(0xAA);
        Some(Completed { id, used_len, status })
    }

    /// Same, with the chain in an indirect table referenced by descriptor 0.
    pub fn submit_indirect(&mut self, q: usize, bufs: &[Buf]) -> Option<Completed> {
        if self.queues[q].packed.is_some() {
            // Packed indirect tables (2.8.19): entries in order, only WRITE means anything.
            for (i, b) in bufs.iter().enumerate() {
                let flags = if b.writable { DESC_F_WRITE } else { 0 };
                let d = packed_descriptor(b.gpa, b.len, 0, flags);
                self.ram.write(INDIRECT_AREA + 16 * i as u64, &d);
            }
            let status_gpa = bufs.last().map(|b| b.gpa + u64::from(b.len) - 1);
            if let Some(s) = status_gpa {
                self.ram.write(s, &[0xAA]);
            }
            let p = self.queues[q].packed.clone().unwrap();
            let table = 16 * bufs.len() as u32;
            let flags = p.avail_bits() | DESC_F_INDIRECT;
            self.set_packed_desc(q, p.avail, INDIRECT_AREA, table, p.avail, flags);
            let size = self.queues[q].size;
            let p = self.queues[q].packed.as_mut().unwrap();
            p.descs_by_id[usize::from(p.avail)] = 1;
            p.advance_avail(1, size);
            self.kick(q);
            return self.packed_answer(q, status_gpa);
        }
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags =
                if b.writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            write_desc(&self.ram, INDIRECT_AREA + 16 * i as u64, b.gpa, b.len, flags, i as u16 + 1);
        }
        self.set_desc(q, 0, INDIRECT_AREA, 16 * bufs.len() as u32, DESC_F_INDIRECT, 0);
        self.submit_head(q, 0, bufs.last().map(|b| b.gpa + u64::from(b.len) - 1))
    }

    /// Publishes `head`, kicks, waits 5 s at most; reads the status at `status_gpa`.
    pub fn submit_head(
        &mut self,
        q: usize,
        head: u16,
        status_gpa: Option<u64>,
    ) -> Option<Completed> {
        if let Some(s) = status_gpa {
            self.ram.write(s, &[0xAA]);
        }
        self.push_avail(q, head);
        self.kick(q);
        let (id, used_len) = self.wait_used(q, Duration::from_secs(5))?;
        let status = status_gpa.map(|s| self.ram.read(s, 1)[0]).unwrap_or(0xAA);
        Some(Completed { id, used_len, status })
    }

    /// A well-formed request: header, optional data, status. Returns (completion, data read).
    pub fn request(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> (Completed, Vec<u8>) {
        let hdr = HEADER_AREA;
        let status = HEADER_AREA + 64;
        let data = DATA_AREA;
        self.ram.write(hdr, &header(kind, sector));
        let mut bufs = vec![Buf { gpa: hdr, len: 16, writable: false }];
        if !out.is_empty() {
            self.ram.write(data, out);
            bufs.push(Buf { gpa: data, len: out.len() as u32, writable: false });
        }
        if in_len > 0 {
            self.ram.write(data, &vec![0xEE; in_len as usize]);
            bufs.push(Buf { gpa: data, len: in_len, writable: true });
        }
        bufs.push(Buf { gpa: status, len: 1, writable: true });
        let c = self.submit_chain(q, &bufs).expect("no answer from the daemon within 5 s");
        let read = self.ram.read(data, in_len as usize);
        (c, read)
    }
}

/// A memfd of `bytes` (sparse: nothing is allocated until written), sealable.
pub fn memfd(bytes: u64) -> File {
    // SAFETY: memfd_create with a valid C string.
    let fd = unsafe {
        libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes).unwrap();
    file
}

pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One packed-ring descriptor as the guest lays it out: addr, len, buffer id, flags.
pub fn packed_descriptor(addr: u64, len: u32, id: u16, flags: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&id.to_le_bytes());
    d[14..16].copy_from_slice(&flags.to_le_bytes());
    d
}

/// One split-ring descriptor as the guest lays it out.
pub fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

fn write_desc(ram: &GuestRam, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    ram.write(at, &descriptor(addr, len, flags, next));
}
