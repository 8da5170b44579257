//! Live migration, the source's side: with LOG_ALL the daemon marks in the frontend's dirty
//! log exactly the guest pages it writes (data it read, status bytes, GET_ID strings, the used
//! ring at its log address), nothing when logging is off, and malformed logging input is
//! refused without touching anything else. The test's own frontend reads the bitmap.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;

use common::frontend::{
    memfd, GuestRam, TestFrontend, DATA_AREA, HEADER_AREA, RAM_BYTES, S_OK, T_GET_ID, T_IN, T_OUT,
};
use common::{make_image, pattern, tmpdir, Daemon};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

const IMAGE_BYTES: u64 = 8 << 20;
const SEED: u64 = 41;
const F_LOG_ALL: u64 = 1 << 26;
const PAGE: u64 = 4096;
const RING: u16 = 16;

/// The frontend's dirty bitmap: a memfd it maps and reads.
struct Bitmap {
    file: std::fs::File,
    bytes: usize,
}

impl Bitmap {
    fn new(bytes: usize) -> Bitmap {
        Bitmap { file: memfd(bytes as u64), bytes }
    }

    fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.bytes as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Marked pages, as page numbers; and clears them (as QEMU's sync does). The daemon's
    /// stores are in the memfd's pages, which reads of the file see.
    fn take(&self) -> Vec<u64> {
        use std::os::unix::fs::FileExt;
        let mut bits = vec![0u8; self.bytes];
        self.file.read_exact_at(&mut bits, 0).unwrap();
        self.file.write_all_at(&vec![0u8; self.bytes], 0).unwrap();
        (0..self.bytes as u64 * 8)
            .filter(|p| bits[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }
}

fn daemon(dir: &Path) -> (Daemon, std::path::PathBuf) {
    let image = dir.join("disk.raw");
    make_image(&image, IMAGE_BYTES, SEED);
    let sock = dir.join("blk.sock");
    let d = Daemon::start(dir, &[format!("socket={},image={}", sock.display(), image.display())]);
    (d, sock)
}

fn connect(sock: &Path) -> TestFrontend {
    TestFrontend::connect_with_protocol(sock, 1, RING, 0, VhostUserProtocolFeatures::LOG_SHMFD)
}

/// Turns logging on as QEMU does when a migration starts: the log, LOG_ALL, the ring's LOG
/// flag with its used ring's guest-physical address.
fn start_logging(fe: &mut TestFrontend, bitmap: &Bitmap) {
    fe.fe.set_log_base(0, Some(bitmap.region())).expect("SET_LOG_BASE");
    fe.fe.set_features(fe.features | F_LOG_ALL).expect("SET_FEATURES with LOG_ALL");
    let used = fe.queues[0].used;
    fe.set_ring_log(0, Some(used)).expect("SET_VRING_ADDR with LOG");
}

fn page(gpa: u64) -> u64 {
    gpa / PAGE
}

#[test]
fn exactly_the_pages_the_daemon_writes_are_marked() {
    let dir = tmpdir();
    let (_daemon, sock) = daemon(dir.path());
    let mut fe = connect(&sock);
    let bitmap = Bitmap::new(common::frontend::RAM_BYTES / PAGE as usize / 8);
    let used_page = page(fe.queues[0].used);
    // The request helper's header and status share a page; data is at DATA_AREA.
    let status_page = page(HEADER_AREA + 64);
    let data_page = page(DATA_AREA);

    // Logging off: nothing is marked.
    fe.fe.set_log_base(0, Some(bitmap.region())).expect("SET_LOG_BASE");
    let (c, _) = fe.request(0, T_IN, 0, &[], 4096);
    assert_eq!(c.status, S_OK);
    assert_eq!(bitmap.take(), Vec::<u64>::new(), "pages marked with logging off");

    start_logging(&mut fe, &bitmap);
    bitmap.take();
    // A read writes its data pages, its status byte and the used ring.
    let (c, data) = fe.request(0, T_IN, 16, &[], 2 * 4096);
    assert_eq!(c.status, S_OK);
    assert_eq!(data, pattern(SEED, 16 * 512, 2 * 4096));
    let mut want = vec![page(fe.queues[0].used), status_page, data_page, data_page + 1];
    want.sort_unstable();
    assert_eq!(bitmap.take(), want, "after a read");
    // A write reads guest memory: only its status byte and the used ring are written.
    let (c, _) = fe.request(0, T_OUT, 32, &pattern(7, 0, 4096), 0);
    assert_eq!(c.status, S_OK);
    let mut want = vec![used_page, status_page];
    want.sort_unstable();
    assert_eq!(bitmap.take(), want, "after a write");
    // GET_ID writes its string.
    let (c, _) = fe.request(0, T_GET_ID, 0, &[], 20);
    assert_eq!(c.status, S_OK);
    let mut want = vec![used_page, status_page, data_page];
    want.sort_unstable();
    assert_eq!(bitmap.take(), want, "after GET_ID");

    // The used ring at its log address: a ring logged elsewhere is marked there.
    let elsewhere = (RAM_BYTES as u64) / 2;
    fe.set_ring_log(0, Some(elsewhere)).unwrap();
    bitmap.take();
    let (c, _) = fe.request(0, T_OUT, 32, &pattern(8, 0, 4096), 0);
    assert_eq!(c.status, S_OK);
    let mut want = vec![page(elsewhere), status_page];
    want.sort_unstable();
    assert_eq!(bitmap.take(), want, "used ring logged at its log address");
    // Without the ring's LOG flag its used ring is not logged; data still is.
    fe.set_ring_log(0, None).unwrap();
    bitmap.take();
    let (c, _) = fe.request(0, T_IN, 0, &[], 4096);
    assert_eq!(c.status, S_OK);
    assert_eq!(bitmap.take(), vec![status_page, data_page], "LOG flag off");

    // Logging off again: nothing.
    fe.set_ring_log(0, Some(fe.queues[0].used)).unwrap();
    fe.fe.set_features(fe.features).unwrap();
    bitmap.take();
    let (c, _) = fe.request(0, T_IN, 0, &[], 4096);
    assert_eq!(c.status, S_OK);
    assert_eq!(bitmap.take(), Vec::<u64>::new(), "pages marked after logging was turned off");
}

#[test]
fn logging_switches_on_and_off_under_running_io_and_loses_nothing() {
    let dir = tmpdir();
    let (_daemon, sock) = daemon(dir.path());
    let mut fe = connect(&sock);
    let bitmap = Bitmap::new(RAM_BYTES / PAGE as usize / 8);
    for round in 0..6u64 {
        // Five reads in flight (descriptors 0 to 14 of 16), each into its own page, then
        // the switch.
        let heads: Vec<u16> = (0..5u16)
            .map(|k| {
                let hdr = HEADER_AREA + u64::from(k) * 128;
                fe.ram.write(hdr, &common::frontend::header(T_IN, u64::from(k) * 8));
                fe.ram.write(hdr + 64, &[0xAA]);
                let bufs = [
                    common::frontend::Buf { gpa: hdr, len: 16, writable: false },
                    common::frontend::Buf {
                        gpa: DATA_AREA + u64::from(k) * PAGE,
                        len: 4096,
                        writable: true,
                    },
                    common::frontend::Buf { gpa: hdr + 64, len: 1, writable: true },
                ];
                fe.post(0, 3 * k, &bufs)
            })
            .collect();
        if round % 2 == 0 {
            start_logging(&mut fe, &bitmap);
        } else {
            fe.fe.set_features(fe.features).unwrap();
            fe.set_ring_log(0, None).unwrap();
        }
        for _ in &heads {
            fe.wait_used(0, std::time::Duration::from_secs(5)).unwrap_or_else(|| {
                panic!("a request lost in the switch, round {round}, used {}", fe.used_idx(0))
            });
        }
        for k in 0..5u64 {
            assert_eq!(fe.ram.read(HEADER_AREA + k * 128 + 64, 1)[0], S_OK);
            assert_eq!(fe.ram.read(DATA_AREA + k * PAGE, 4096), pattern(SEED, k * 8 * 512, 4096));
        }
        bitmap.take();
    }
}

#[test]
fn malformed_logging_input_is_refused_and_the_export_serves_on() {
    let dir = tmpdir();
    let (mut daemon, sock) = daemon(dir.path());

    // A log too small for guest memory (16 MiB needs 512 bytes): the connection is closed.
    let fe = connect(&sock);
    let small = Bitmap::new(256);
    assert!(fe.fe.set_log_base(0, Some(small.region())).is_err(), "a short log was taken");
    drop(fe);

    // A used ring log address outside the log: that ring does not start with it.
    let mut fe = connect(&sock);
    let bitmap = Bitmap::new(RAM_BYTES / PAGE as usize / 8);
    fe.fe.set_log_base(0, Some(bitmap.region())).unwrap();
    fe.fe.set_features(fe.features | F_LOG_ALL).unwrap();
    assert!(fe.set_ring_log(0, Some(1 << 40)).is_err(), "a log address outside the log");
    drop(fe);

    // LOG_ALL without a log: the ring refuses to start rather than run unlogged.
    let fe = connect(&sock);
    assert!(fe.fe.set_features(fe.features | F_LOG_ALL).is_err(), "LOG_ALL with no log");
    drop(fe);

    // SET_LOG_BASE without LOG_SHMFD negotiated: the connection is closed.
    let ram = GuestRam::memfd();
    let (fe, _) =
        common::frontend::handshake(&sock, 1, 0, VhostUserProtocolFeatures::empty(), &ram);
    let bitmap = Bitmap::new(512);
    let _ = fe.set_log_base(0, Some(bitmap.region()));
    drop(fe);

    // The export serves a well-behaved frontend after all of it.
    let mut fe = connect(&sock);
    let (c, data) = fe.request(0, T_IN, 0, &[], 512);
    assert_eq!(c.status, S_OK);
    assert_eq!(data, pattern(SEED, 0, 512));
    assert!(daemon.alive());
    let log = daemon.log();
    assert!(log.contains("does not cover guest memory"), "{log}");
    assert!(log.contains("outside the dirty log"), "{log}");
    assert!(log.contains("no log was given"), "{log}");
}

/// The image lock hand-over: a destination export (`incoming=on`) opens the image the source
/// still writes, its guest's first ring waits until the source's rings stop with logging on
/// (the switch-over), and from then on the source cannot start a ring on it: two writers never
/// run at once.
#[test]
fn the_image_passes_from_source_to_destination_at_the_switch_over() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    make_image(&image, IMAGE_BYTES, SEED);
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut daemon = Daemon::start_with(
        dir.path(),
        &[
            "--image-lock-wait-ms".into(),
            "1500".into(),
            "--export".into(),
            format!("id=src,socket={},image={}", a.display(), image.display()),
            "--export".into(),
            format!("id=dst,socket={},image={},incoming=on", b.display(), image.display()),
        ],
        &[a.clone(), b.clone()],
    );
    let mut src = connect(&a);
    let data = pattern(99, 0, 4096);
    let (c, _) = src.request(0, T_OUT, 64, &data, 0);
    assert_eq!(c.status, S_OK);
    let bitmap = Bitmap::new(RAM_BYTES / PAGE as usize / 8);
    start_logging(&mut src, &bitmap);

    // The destination's guest arrives early: its ring waits for the image.
    let dst = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let mut fe = connect(&b);
        let waited = started.elapsed();
        let (c, read) = fe.request(0, T_IN, 64, &[], 4096);
        (waited, c.status, read)
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    src.fe.get_vring_base(0).expect("GET_VRING_BASE");
    let (waited, status, read) = dst.join().unwrap();
    assert!(
        waited >= std::time::Duration::from_millis(400),
        "the destination did not wait: {waited:?}"
    );
    assert_eq!(status, S_OK);
    assert_eq!(read, data, "the destination reads what the source wrote");
    let log = daemon.log();
    assert!(log.contains("gave up the image's write permission"), "{log}");
    assert!(log.contains("took the image's write permission"), "{log}");

    // The source's rings cannot come back while the destination holds the image.
    let starts = src.reconnect(&a);
    assert!(starts[0].is_err(), "the source started a ring on an image the destination writes");
    assert!(daemon.log().contains("cannot start the ring"), "{}", daemon.log());
    assert!(daemon.alive());
}

/// At the switch-over the source flushes before it gives the image up: with cache=writeback
/// the guest's writes may still be in this host's page cache, and a destination on another
/// host would read the image without them. strace shows the order: the image's fdatasync,
/// then the release of its write permission (byte 101, QEMU's WRITE bit, unlocked). A
/// neighbour export serves throughout.
#[test]
fn the_source_flushes_the_image_before_it_gives_it_up() {
    let dir = common::disk_dir();
    let (image, neighbour_image) = (dir.path().join("disk.raw"), dir.path().join("b.raw"));
    make_image(&image, IMAGE_BYTES, SEED);
    make_image(&neighbour_image, IMAGE_BYTES, 2);
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut daemon = Daemon::start(
        dir.path(),
        &[
            format!("id=src,socket={},image={},cache=writeback", a.display(), image.display()),
            format!("id=b,socket={},image={}", b.display(), neighbour_image.display()),
        ],
    );
    let mut src = connect(&a);
    let (c, _) = src.request(0, T_OUT, 64, &pattern(99, 0, 4096), 0);
    assert_eq!(c.status, S_OK);
    let bitmap = Bitmap::new(RAM_BYTES / PAGE as usize / 8);
    start_logging(&mut src, &bitmap);
    let out = dir.path().join("strace.out");
    let trace = "trace=fdatasync,fsync,fcntl";
    let strace = common::Strace::attach(daemon.pid(), &["-e", trace], &out);
    src.fe.get_vring_base(0).expect("GET_VRING_BASE");
    let calls = strace.finish();
    // "PID fdatasync(FD) = 0" and "PID fcntl(FD, F_OFD_SETLK, {l_type=F_UNLCK, ...,
    // l_start=101, l_len=1}) = 0".
    let fd_of = |line: &str| line.split('(').nth(1)?.split([')', ',']).next().map(str::to_string);
    let lines: Vec<&str> = calls.lines().collect();
    let released = lines
        .iter()
        .position(|l| l.contains("F_UNLCK") && l.contains("l_start=101"))
        .unwrap_or_else(|| panic!("the write permission was not released:\n{calls}"));
    let image_fd = fd_of(lines[released]);
    let flushed = lines[..released]
        .iter()
        .any(|l| l.contains("fdatasync(") && l.ends_with("= 0") && fd_of(l) == image_fd);
    assert!(flushed, "no fdatasync of the image before its write lock was released:\n{calls}");
    assert!(daemon.log().contains("gave up the image's write permission"), "{}", daemon.log());
    let mut neighbour = common::Client::connect(&b, 1);
    assert_eq!(neighbour.read_at(0, 4096, 4096, 0).unwrap(), pattern(2, 4096, 4096));
    drop(neighbour);
    drop(src);
    assert!(daemon.stop().success(), "{}", daemon.log());
}
