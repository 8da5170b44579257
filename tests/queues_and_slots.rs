//! Many queues and many memory regions (issue 31, parts 1 and 2): an export offers as many
//! queues as a VMM asks for (up to 256, what vhost-user's 8-bit ring index in
//! SET_VRING_KICK/CALL/ERR can address) and pays only for those started; a frontend may
//! hold up to 509 memory regions and add and remove them while its queues run, and a removed
//! region is never touched again.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::frontend::*;
use common::raw::*;
use common::{make_image, pattern, proc_status_bytes, tmpdir, Client, Daemon};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostUserMemoryRegionInfo;

const IMAGE_BYTES: u64 = 8 << 20;
const SEED: u64 = 31;
const QSIZE: u16 = 64;
const WANT: u64 = F_RING_INDIRECT_DESC | F_RING_EVENT_IDX;
/// What GET_QUEUE_NUM and the config space say without `queues=`.
const MAX_QUEUES: u64 = 256;
/// What GET_MAX_MEM_SLOTS says.
const MAX_REGIONS: usize = 509;

struct Setup {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    control: PathBuf,
    daemon: Daemon,
}

/// A daemon with a control socket and one export `disk` of an 8 MiB image, with `extra` keys.
fn setup(extra: &str) -> Setup {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    make_image(&image, IMAGE_BYTES, SEED);
    let sock = dir.path().join("blk.sock");
    let control = dir.path().join("ctl.sock");
    let export = format!("id=disk,socket={},image={}{extra}", sock.display(), image.display());
    let args = ["--control".into(), control.display().to_string(), "--export".into(), export];
    let daemon = Daemon::start_with(dir.path(), &args, &[sock.clone(), control.clone()]);
    Setup { _dir: dir, sock, control, daemon }
}

fn query_stats(control: &Path) -> serde_json::Value {
    let out = common::ctl(control, &["query-stats", "id=disk"]);
    assert!(out.status.success(), "query-stats: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone()
}

/// The virtio-blk config space's num_queues (at byte 34), as the frontend reads it.
fn config_num_queues(fe: &mut TestFrontend) -> u16 {
    let c = fe.config(36);
    u16::from_le_bytes([c[34], c[35]])
}

/// SET_VRING_NUM for ring `index` on a raw connection: the daemon's reply status.
fn set_vring_num(sock: &Path, index: u32) -> u64 {
    let raw = RawFrontend::connect(sock);
    raw.negotiate();
    let mut payload = index.to_le_bytes().to_vec();
    payload.extend(u32::from(QSIZE).to_le_bytes());
    raw.ack(SET_VRING_NUM, &payload, &[]).unwrap()
}

#[test]
fn an_export_offers_256_queues_unless_capped_and_refuses_ring_256() {
    let mut s = setup("");
    let raw = RawFrontend::connect(&s.sock);
    raw.negotiate();
    assert_eq!(raw.get_u64(GET_QUEUE_NUM).unwrap(), MAX_QUEUES);
    drop(raw);
    let mut fe = TestFrontend::connect(&s.sock, 1, QSIZE, WANT);
    assert_eq!(config_num_queues(&mut fe), MAX_QUEUES as u16);
    drop(fe);
    // Ring 255 is the last; ring 256 (the 257th) is refused with a reason in the log.
    assert_eq!(set_vring_num(&s.sock, 255), 0);
    assert_ne!(set_vring_num(&s.sock, 256), 0, "ring 256 accepted");
    let log = s.daemon.log();
    assert!(log.contains("ring 256 refused: the export offers 256 queues (0 to 255)"), "{log}");
    // list-exports says what is offered; the spec has no queues key (dump-config neither).
    let out = common::ctl(&s.control, &["list-exports"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["queues"], MAX_QUEUES);
    assert!(list[0]["spec"].get("queues").is_none(), "{}", list[0]["spec"]);
    s.daemon.stop();

    // queues=N caps it: the frontend and the guest see N.
    let mut s = setup(",queues=4");
    let raw = RawFrontend::connect(&s.sock);
    raw.negotiate();
    assert_eq!(raw.get_u64(GET_QUEUE_NUM).unwrap(), 4);
    drop(raw);
    let mut fe = TestFrontend::connect(&s.sock, 1, QSIZE, WANT);
    assert_eq!(config_num_queues(&mut fe), 4);
    drop(fe);
    assert_ne!(set_vring_num(&s.sock, 4), 0, "ring 4 of queues=4 accepted");
    let log = s.daemon.log();
    assert!(log.contains("ring 4 refused: the export offers 4 queues (0 to 3)"), "{log}");
    s.daemon.stop();
}

/// Reads 4 KiB at `sector` through every queue of `c`; checks the bytes.
fn read_on_every_queue(c: &mut Client, sector: u64) {
    for q in 0..c.queues.len() {
        let data = c.read_at(q, sector * 512, 4096, 0).unwrap_or_else(|e| panic!("queue {q}: {e}"));
        assert!(data == pattern(SEED, sector * 512, 4096), "queue {q}");
    }
}

#[test]
fn a_client_starts_256_queues_and_an_idle_started_queue_costs_little() {
    let mut s = setup("");
    let pid = s.daemon.pid();
    let mut one = Client::connect(&s.sock, 1);
    read_on_every_queue(&mut one, 8);
    std::thread::sleep(Duration::from_millis(300));
    let rss_one = proc_status_bytes(pid, "VmRSS");
    assert_eq!(query_stats(&s.control)["queues"].as_array().unwrap().len(), 1);
    drop(one);
    std::thread::sleep(Duration::from_millis(300));

    let mut all = Client::connect(&s.sock, MAX_QUEUES as i32);
    assert_eq!(all.queues.len(), MAX_QUEUES as usize);
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = proc_status_bytes(pid, "VmRSS");
    read_on_every_queue(&mut all, 16);
    std::thread::sleep(Duration::from_millis(300));
    let rss_all = proc_status_bytes(pid, "VmRSS");
    let stats = query_stats(&s.control);
    let queues = stats["queues"].as_array().unwrap();
    assert_eq!(queues.len(), MAX_QUEUES as usize, "query-stats lists the started queues");
    for (i, q) in queues.iter().enumerate() {
        assert_eq!(q["queue"], i);
        assert!(q["requests"]["read"].as_u64().unwrap() >= 1, "queue {i}: {q}");
    }
    let idle_per_queue = rss_idle.saturating_sub(rss_one) / (MAX_QUEUES - 1);
    let per_queue = rss_all.saturating_sub(rss_one) / (MAX_QUEUES - 1);
    eprintln!(
        "daemon RSS: {} KiB with 1 started queue that served a read; with 256 started (queue \
         size 256, libblkio's default): {} KiB before any request ({} KiB per queue), {} KiB \
         once each served one 4 KiB read ({} KiB per queue)",
        rss_one >> 10,
        rss_idle >> 10,
        idle_per_queue >> 10,
        rss_all >> 10,
        per_queue >> 10
    );
    // Measured: about 410 KiB idle (mostly the I/O thread's own 10 latency histograms, made
    // at start so that the data path never allocates), 630 KiB after a read (the queue's
    // shared histograms made at the first merge that brings them a value).
    assert!(idle_per_queue < 512 << 10, "a started idle queue costs {idle_per_queue} bytes");
    assert!(per_queue < 768 << 10, "a queue that served a read costs {per_queue} bytes");
    drop(all);
    s.daemon.stop();
}

/// A second memfd the frontend adds as many regions, mapped here too.
struct Extra {
    file: File,
    ptr: *mut u8,
    bytes: usize,
}

impl Extra {
    fn new(name: &std::ffi::CStr, bytes: usize) -> Extra {
        // SAFETY: memfd_create with a valid C string.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(bytes as u64).unwrap();
        // SAFETY: a new shared mapping of our memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Extra { file, ptr: ptr.cast(), bytes }
    }

    fn region(&self, gpa: u64, at: usize, bytes: usize) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: bytes as u64,
            userspace_addr: self.ptr as u64 + at as u64,
            mmap_offset: at as u64,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn read(&self, at: usize, len: usize) -> Vec<u8> {
        assert!(at + len <= self.bytes);
        // SAFETY: inside our mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.add(at), len) }.to_vec()
    }

    fn fill(&self, at: usize, len: usize, byte: u8) {
        assert!(at + len <= self.bytes);
        // SAFETY: inside our mapping.
        unsafe { std::ptr::write_bytes(self.ptr.add(at), byte, len) };
    }
}

impl Drop for Extra {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new().
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

const HDR_A: u64 = HEADER_AREA + 0x1000;
const STATUS_A: u64 = HDR_A + 64;
const DATA_A: u64 = DATA_AREA + (1 << 20);

/// Posts a 4 KiB read of `sector` into base RAM (descriptors 8..) without waiting.
fn post_read(fe: &mut TestFrontend, sector: u64) {
    fe.ram.write(HDR_A, &header(T_IN, sector));
    fe.ram.write(STATUS_A, &[0xAA]);
    let bufs = [
        Buf { gpa: HDR_A, len: 16, writable: false },
        Buf { gpa: DATA_A, len: 4096, writable: true },
        Buf { gpa: STATUS_A, len: 1, writable: true },
    ];
    fe.post(0, 8, &bufs);
}

/// Waits for the read `post_read` posted; checks its status and bytes.
fn check_posted(fe: &mut TestFrontend, sector: u64, what: &str) {
    let (id, _) = fe.wait_used(0, Duration::from_secs(10)).expect("posted read answered");
    assert_eq!(id, 8, "{what}");
    assert_eq!(fe.ram.read(STATUS_A, 1)[0], S_OK, "{what}");
    assert!(fe.ram.read(DATA_A, 4096) == pattern(SEED, sector * 512, 4096), "{what}");
}

/// A read of `len` bytes at `sector` into guest address `data_gpa`; returns its status.
fn read_into(fe: &mut TestFrontend, sector: u64, data_gpa: u64, len: u32) -> u8 {
    fe.ram.write(HEADER_AREA, &header(T_IN, sector));
    let bufs = [
        Buf { gpa: HEADER_AREA, len: 16, writable: false },
        Buf { gpa: data_gpa, len, writable: true },
        Buf { gpa: HEADER_AREA + 64, len: 1, writable: true },
    ];
    fe.submit_chain(0, &bufs).expect("read answered").status
}

/// Where the added regions start in guest-physical space, and each one's size.
const EXTRA_GPA: u64 = 1 << 32;
const SLOT_BYTES: usize = 64 << 10;

#[test]
fn memory_regions_up_to_509_come_and_go_while_requests_run() {
    let mut s = setup("");
    let mut fe = TestFrontend::connect(&s.sock, 1, QSIZE, WANT);
    assert_eq!(fe.fe.get_max_mem_slots().unwrap(), MAX_REGIONS as u64);
    let added = MAX_REGIONS - 1;
    let extra = Extra::new(c"extra-regions", added * SLOT_BYTES);
    let gpa = |k: usize| EXTRA_GPA + (k * SLOT_BYTES) as u64;
    // One by one, each added while a read is in flight; then a read lands in the new
    // region, and (from the second on) one crosses from the previous region into it.
    for k in 0..added {
        let sector = (k % 1000) as u64 * 8;
        post_read(&mut fe, sector);
        fe.fe.add_mem_region(&extra.region(gpa(k), k * SLOT_BYTES, SLOT_BYTES)).unwrap();
        check_posted(&mut fe, sector, &format!("read in flight across ADD_MEM_REG {k}"));
        assert_eq!(read_into(&mut fe, sector, gpa(k), 4096), S_OK, "region {k}");
        assert!(extra.read(k * SLOT_BYTES, 4096) == pattern(SEED, sector * 512, 4096));
        if k > 0 {
            let across = gpa(k) - 2048;
            assert_eq!(read_into(&mut fe, sector + 8, across, 4096), S_OK, "across {k}");
            let at = k * SLOT_BYTES - 2048;
            assert!(extra.read(at, 4096) == pattern(SEED, (sector + 8) * 512, 4096), "{k}");
        }
    }
    let stats = query_stats(&s.control);
    assert_eq!(stats["memory_regions"], MAX_REGIONS);
    let all_bytes = (RAM_BYTES + added * SLOT_BYTES) as u64;
    assert_eq!(stats["memory_bytes"], all_bytes);
    // The 510th is refused, with the reason; the table stays as it was.
    let one_more = Extra::new(c"region-510", SLOT_BYTES);
    assert!(fe.fe.add_mem_region(&one_more.region(gpa(added), 0, SLOT_BYTES)).is_err());
    let log = s.daemon.log();
    assert!(log.contains("refused a memory region: more than 509 memory regions"), "{log}");
    assert_eq!(query_stats(&s.control)["memory_regions"], MAX_REGIONS);

    // Removed one by one, last first, each while a read is in flight; a read into a removed
    // region fails and leaves its memory alone.
    for k in (0..added).rev() {
        let sector = (k % 1000) as u64 * 8;
        post_read(&mut fe, sector);
        fe.fe.remove_mem_region(&extra.region(gpa(k), k * SLOT_BYTES, SLOT_BYTES)).unwrap();
        check_posted(&mut fe, sector, &format!("read in flight across REM_MEM_REG {k}"));
        extra.fill(k * SLOT_BYTES, SLOT_BYTES, 0xEE);
        assert_eq!(read_into(&mut fe, sector, gpa(k), 4096), S_IOERR, "removed region {k}");
        assert!(extra.read(k * SLOT_BYTES, SLOT_BYTES).iter().all(|&b| b == 0xEE), "{k}");
        if k > 0 {
            assert_eq!(read_into(&mut fe, sector, gpa(k - 1), 4096), S_OK, "region {}", k - 1);
        }
    }
    let stats = query_stats(&s.control);
    assert_eq!(stats["memory_regions"], 1);
    assert_eq!(stats["memory_bytes"], RAM_BYTES as u64);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.daemon.pid())).unwrap();
    assert!(!maps.contains("extra-regions"), "removed regions still mapped:\n{maps}");
    // (The removals' log lines are rate limited: the first ones are there.)
    assert!(s.daemon.log().contains("removed (guest requests used it: yes)"));
    drop(fe);
    s.daemon.stop();
}

#[test]
fn a_region_removed_under_a_request_in_flight_is_never_touched_again() {
    // One request a second: the second read waits in its slot for the limit, in flight.
    let mut s = setup(",iops-total=1");
    let mut fe = TestFrontend::connect(&s.sock, 1, QSIZE, WANT);
    let region = Extra::new(c"removed-region", SLOT_BYTES);
    fe.fe.add_mem_region(&region.region(EXTRA_GPA, 0, SLOT_BYTES)).unwrap();
    assert_eq!(read_into(&mut fe, 0, DATA_AREA, 4096), S_OK);
    // The held read's buffer is in the region; it is removed at once.
    fe.ram.write(HDR_A, &header(T_IN, 64));
    fe.ram.write(STATUS_A, &[0xAA]);
    let bufs = [
        Buf { gpa: HDR_A, len: 16, writable: false },
        Buf { gpa: EXTRA_GPA, len: 4096, writable: true },
        Buf { gpa: STATUS_A, len: 1, writable: true },
    ];
    let used_before = fe.used_idx(0);
    fe.post(0, 8, &bufs);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fe.used_idx(0), used_before, "the read was not held by the limit");
    fe.fe.remove_mem_region(&region.region(EXTRA_GPA, 0, SLOT_BYTES)).unwrap();
    // The removal was acknowledged after the request was answered, and it was answered
    // in full while the region was still there.
    assert_eq!(fe.used_idx(0), used_before.wrapping_add(1), "REM_MEM_REG returned first");
    assert_eq!(fe.wait_used(0, Duration::from_secs(1)).map(|(id, _)| id), Some(8));
    assert_eq!(fe.ram.read(STATUS_A, 1)[0], S_OK);
    assert!(region.read(0, 4096) == pattern(SEED, 64 * 512, 4096));
    // The daemon has let go of it: not mapped, and shrinking its file (which would raise
    // SIGBUS in whoever touched it; the daemon's guard would log and hang up) changes nothing.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.daemon.pid())).unwrap();
    assert!(!maps.contains("removed-region"), "the removed region is still mapped:\n{maps}");
    region.file.set_len(0).unwrap();
    assert_eq!(read_into(&mut fe, 0, EXTRA_GPA, 4096), S_IOERR, "a read into it");
    assert_eq!(read_into(&mut fe, 8, DATA_AREA, 4096), S_OK, "the connection still serves");
    assert!(s.daemon.alive());
    let log = s.daemon.log();
    assert!(!log.contains("guest memory file shrank"), "{log}");
    assert!(log.contains("memory region 0x100000000+0x10000 removed (guest requests used it: yes)"));
    drop(fe);
    s.daemon.stop();
}
