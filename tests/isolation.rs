//! A hostile tenant against the shared daemon: a VMM that sends what it likes over the
//! vhost-user socket, a guest that builds odd chains, a local user on the control socket and
//! the metrics port. Each test does one thing the daemon used to fail at, then checks that
//! the daemon lives, that the other tenant's export still serves the right bytes, and that
//! SIGTERM still stops it.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkplane::process_cpu_total_ns;
use common::disk_dir;
use common::frontend::*;
use common::raw::*;
use common::{
    free_port, make_image, pattern, pipe, proc_status_bytes, tmpdir, Client, Daemon, Mount,
};
use vhost::VhostBackend;

const IMAGE_BYTES: u64 = 8 << 20;

/// A daemon with two exports: `a` (the attacker's) and `b` (a neighbour's).
struct Tenants {
    dir: tempfile::TempDir,
    a_sock: PathBuf,
    a_image: PathBuf,
    b_sock: PathBuf,
    daemon: Daemon,
}

fn tenants(a_extra: &str) -> Tenants {
    tenants_with(a_extra, &[], tmpdir())
}

/// A directory on the root filesystem (ext4 here), where O_DIRECT wants aligned buffers.
/// Two tenants and a control socket (its path returned) in a tmpfs directory.
fn tenants_with_control(a_extra: &str, more_args: &[&str]) -> (Tenants, PathBuf) {
    let dir = tmpdir();
    let ctl = dir.path().join("ctl.sock");
    let ctl_arg = ctl.display().to_string();
    let mut args = vec!["--control", &ctl_arg];
    args.extend_from_slice(more_args);
    (tenants_with(a_extra, &args, dir), ctl)
}

/// Writes up to 64 MiB of `byte` to `stream` until the peer stops taking it; returns how
/// much it took.
fn flood(stream: &mut impl Write, byte: u8) -> usize {
    let chunk = vec![byte; 1 << 20];
    let mut sent = 0usize;
    while sent < 64 << 20 {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    sent
}

fn tenants_with(a_extra: &str, daemon_args: &[&str], dir: tempfile::TempDir) -> Tenants {
    let a_image = dir.path().join("a.raw");
    let b_image = dir.path().join("b.raw");
    make_image(&a_image, IMAGE_BYTES, 1);
    make_image(&b_image, IMAGE_BYTES, 2);
    let a_sock = dir.path().join("a.sock");
    let b_sock = dir.path().join("b.sock");
    let mut args: Vec<String> = daemon_args.iter().map(|s| s.to_string()).collect();
    for spec in [
        format!("id=a,socket={},image={}{a_extra}", a_sock.display(), a_image.display()),
        format!("id=b,socket={},image={}", b_sock.display(), b_image.display()),
    ] {
        args.push("--export".into());
        args.push(spec);
    }
    let daemon = Daemon::start_with(dir.path(), &args, &[a_sock.clone(), b_sock.clone()]);
    Tenants { dir, a_sock, a_image, b_sock, daemon }
}

impl Tenants {
    /// The neighbour's export answers a read with its image's bytes.
    fn neighbour_serves(&mut self) {
        assert!(self.daemon.alive(), "the daemon died:\n{}", self.daemon.log());
        let mut c = Client::connect(&self.b_sock, 1);
        assert!(c.read_at(0, 12288, 8192, 0).unwrap() == pattern(2, 12288, 8192));
    }

    /// The attacker's own export serves a new, well-behaved client again.
    fn own_export_serves(&mut self) {
        let mut c = Client::connect(&self.a_sock, 1);
        assert!(c.read_at(0, 4096, 4096, 0).unwrap() == pattern(1, 4096, 4096));
    }

    /// SIGTERM still stops the daemon, cleanly.
    fn stops(mut self) {
        let status = self.daemon.stop();
        assert!(status.success(), "exit {status}:\n{}", self.daemon.log());
    }
}

/// Whether `stream` was closed by the daemon within `within`.
fn hung_up_within(stream: &mut UnixStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match stream.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

// 1. A partial vhost-user header.

#[test]
fn partial_header_then_eof_is_a_disconnect_and_a_stalled_one_times_out() {
    let mut t = tenants("");
    for len in [1usize, 5, 11] {
        let mut s = UnixStream::connect(&t.a_sock).unwrap();
        s.write_all(&vec![1u8; len]).unwrap();
        drop(s);
    }
    // The export takes the next frontend, and the accept thread does not spin.
    t.own_export_serves();
    // Exited threads included: the client's queue threads ended during the window.
    let pid = t.daemon.pid() as u32;
    let before = process_cpu_total_ns(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = process_cpu_total_ns(pid) - before;
    assert!(used < 300_000_000, "the idle daemon used {used} ns of CPU in one second");

    // A header that stops part-way, with the socket kept open, is hung up on.
    let mut stalled = UnixStream::connect(&t.a_sock).unwrap();
    stalled.write_all(&[1, 0, 0, 0, 1]).unwrap();
    let start = Instant::now();
    assert!(hung_up_within(&mut stalled, Duration::from_secs(15)), "stalled header kept");
    assert!(start.elapsed() >= Duration::from_secs(4), "hung up before the header timeout");
    t.own_export_serves();
    t.neighbour_serves();
    // And once more, stalled, while SIGTERM arrives.
    let mut again = UnixStream::connect(&t.a_sock).unwrap();
    again.write_all(&[1, 0]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    t.stops();
}

// 2. Guest RAM that shrinks under the daemon.

const QSIZE: u16 = 64;
const WANT: u64 = F_RING_INDIRECT_DESC | F_RING_EVENT_IDX;

/// A read through the test frontend returns the image's bytes.
fn frontend_reads(fe: &mut TestFrontend, seed: u64) {
    let (c, data) = fe.request(0, T_IN, 8, &[], 4096);
    assert_eq!(c.status, S_OK);
    assert!(data == pattern(seed, 8 * 512, 4096), "wrong bytes");
}

fn memfd_ram(seal: bool) -> GuestRam {
    let ram = GuestRam::memfd();
    if seal {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our memfd.
        assert_eq!(unsafe { libc::fcntl(ram.file.as_raw_fd(), libc::F_ADD_SEALS, seals) }, 0);
    }
    ram
}

fn file_ram(path: &Path) -> GuestRam {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    file.set_len(RAM_BYTES as u64).unwrap();
    GuestRam::map(file)
}

/// A hugetlbfs mount with enough 2 MiB pages reserved for one guest RAM, or why not.
fn hugetlbfs(at: &Path) -> Result<Mount, String> {
    let nr = "/proc/sys/vm/nr_hugepages";
    let have: u64 = fs::read_to_string(nr).map_err(|e| e.to_string())?.trim().parse().unwrap();
    let need = (RAM_BYTES as u64 >> 21) * 2;
    let free: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    if free < need {
        fs::write(nr, (have + need).to_string()).map_err(|e| format!("{nr}: {e}"))?;
    }
    Mount::new("hugetlbfs", Some("pagesize=2M"), at)
}

#[test]
fn guest_ram_backings_serve_and_a_shrunk_one_costs_only_its_connection() {
    let mut t = tenants("");
    let huge = hugetlbfs(&t.dir.path().join("huge"));
    // Every kind of guest RAM QEMU shares serves a read.
    let mut kinds: Vec<(&str, GuestRam, bool)> = vec![
        ("memfd", memfd_ram(false), true),
        ("sealed memfd", memfd_ram(true), false),
        ("file on tmpfs", file_ram(&t.dir.path().join("ram")), true),
    ];
    match &huge {
        Ok(h) => kinds.push(("file on hugetlbfs", file_ram(&h.0.join("ram")), true)),
        Err(e) => panic!("this kernel offers hugetlbfs, but it could not be set up: {e}"),
    }
    let mut shrunk = 0;
    for (what, ram, can_shrink) in kinds {
        let mut fe = TestFrontend::connect_with_ram(&t.a_sock, 1, QSIZE, WANT, ram);
        frontend_reads(&mut fe, 1);
        if !can_shrink {
            // The seal holds: the frontend cannot shrink it, the daemon never sees SIGBUS.
            assert!(fe.ram.file.set_len(0).is_err(), "{what}: seal did not hold");
            continue;
        }
        // The frontend truncates its RAM (rings, descriptors and buffers with it) and kicks.
        fe.ram.file.set_len(0).unwrap();
        fe.kick(0);
        shrunk += 1;
        let lines = |t: &Tenants| t.daemon.log().matches("guest memory file shrank").count();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines(&t) < shrunk && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(t.daemon.alive(), "{what}: the daemon died:\n{}", t.daemon.log());
        assert_eq!(lines(&t), shrunk, "{what}: no log line:\n{}", t.daemon.log());
        // That connection is gone: the next message fails.
        assert!(fe.fe.get_features().is_err(), "{what}: connection still served");
        drop(fe);
        t.neighbour_serves();
        t.own_export_serves();
    }
    // Unmounted before the test's directory goes, which `stops` removes: a directory with a
    // mount in it cannot be removed, and each run left 17 MB in /dev/shm.
    let dir = t.dir.path().to_path_buf();
    drop(huge);
    t.stops();
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

// 3. Request size: seg_max and size_max are enforced; bounce memory is bounded.

#[test]
fn requests_over_the_advertised_limits_get_ioerr_and_bounce_memory_stays_bounded() {
    let mut t = tenants_with("", &[], disk_dir());
    let mut fe = TestFrontend::connect(&t.a_sock, 1, QSIZE, WANT);
    let cfg = fe.config(16);
    let size_max = u32::from_le_bytes(cfg[8..12].try_into().unwrap());
    assert_eq!(size_max, 1 << 20, "size_max advertised");
    let hdr = HEADER_AREA;
    let status = HEADER_AREA + 64;

    // One 2 MiB buffer: over size_max.
    fe.ram.write(hdr, &header(T_IN, 0));
    fe.ram.write(DATA_AREA, &[0xEE; 16]);
    let c = fe
        .submit_chain(
            0,
            &[
                Buf { gpa: hdr, len: 16, writable: false },
                Buf { gpa: DATA_AREA, len: 2 << 20, writable: true },
                Buf { gpa: status, len: 1, writable: true },
            ],
        )
        .unwrap();
    assert_eq!((c.status, c.used_len), (S_IOERR, 1), "a buffer over size_max");
    assert_eq!(fe.ram.read(DATA_AREA, 16), vec![0xEE; 16], "nothing was read into it");

    // 8 buffers of 1 MiB, all the same guest range at an odd address, under O_DIRECT: within
    // every limit, served through one 8 MiB bounce buffer.
    fe.ram.write(hdr, &header(T_IN, 0));
    let mut bufs = vec![Buf { gpa: hdr, len: 16, writable: false }];
    bufs.extend([Buf { gpa: DATA_AREA + 1, len: 1 << 20, writable: true }; 8]);
    bufs.push(Buf { gpa: status, len: 1, writable: true });
    let c = fe.submit_chain(0, &bufs).unwrap();
    assert_eq!((c.status, c.used_len), (S_OK, (8 << 20) + 1), "8 MiB through one bounce");
    let data = fe.ram.read(DATA_AREA + 1, 4096);
    assert!(data == pattern(1, 7 << 20, 4096), "the last buffer's bytes are last");
    drop(fe);
    t.neighbour_serves();
    t.stops();
}

/// Peak resident memory of a process, in bytes.
fn peak_rss_bytes(pid: i32) -> u64 {
    proc_status_bytes(pid, "VmHWM")
}

#[test]
fn one_request_cannot_make_the_daemon_bounce_hundreds_of_megabytes() {
    let dir = disk_dir();
    let image = dir.path().join("big.raw");
    fs::File::create(&image).unwrap().set_len(256 << 20).unwrap();
    let sock = dir.path().join("big.sock");
    let spec = format!("socket={},image={},queue-size=512", sock.display(), image.display());
    let mut daemon = Daemon::start(dir.path(), &[spec]);
    let mut fe = TestFrontend::connect(&sock, 1, 512, WANT);
    // 200 buffers of 1 MiB, every one the same guest range at an odd address: each within
    // size_max, together 200 MiB that O_DIRECT cannot take as they are.
    fe.ram.write(HEADER_AREA, &header(T_IN, 0));
    let mut bufs = vec![Buf { gpa: HEADER_AREA, len: 16, writable: false }];
    bufs.extend([Buf { gpa: DATA_AREA + 1, len: 1 << 20, writable: true }; 200]);
    bufs.push(Buf { gpa: HEADER_AREA + 64, len: 1, writable: true });
    let c = fe.submit_indirect(0, &bufs).unwrap();
    assert_eq!((c.status, c.used_len), (S_IOERR, 1), "200 MiB of bounce for one request");
    let peak = peak_rss_bytes(daemon.pid());
    assert!(peak < 100 << 20, "the daemon's resident memory peaked at {peak} bytes");
    // More data segments than seg_max (254), each small and aligned: IOERR too.
    let mut bufs = vec![Buf { gpa: HEADER_AREA, len: 16, writable: false }];
    bufs.extend((0..300).map(|i| Buf { gpa: DATA_AREA + 4096 * i, len: 4096, writable: true }));
    bufs.push(Buf { gpa: HEADER_AREA + 64, len: 1, writable: true });
    let c = fe.submit_indirect(0, &bufs).unwrap();
    assert_eq!((c.status, c.used_len), (S_IOERR, 1), "300 segments, over seg_max");
    // The queue goes on serving.
    let (c, _) = fe.request(0, T_IN, 0, &[], 4096);
    assert_eq!(c.status, S_OK);
    drop(fe);
    assert!(daemon.stop().success());
}

// 5. Kick, call and err descriptors.

#[test]
fn only_eventfds_are_taken_as_vring_descriptors_and_they_never_block() {
    let mut t = tenants("");
    let raw = RawFrontend::connect(&t.a_sock);
    raw.negotiate();
    let (pipe_r, _pipe_w) = pipe();
    let regular = fs::File::create(t.dir.path().join("not-an-eventfd")).unwrap();
    let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    for (what, request, fd) in [
        ("a pipe as call", SET_VRING_CALL, pipe_r.as_raw_fd()),
        ("a regular file as kick", SET_VRING_KICK, regular.as_raw_fd()),
        ("a pipe as err", SET_VRING_ERR, pipe_r.as_raw_fd()),
    ] {
        let status = raw.ack(request, &0u64.to_le_bytes(), &[fd]).unwrap();
        assert_ne!(status, 0, "{what} was accepted");
    }
    // An eventfd is accepted, and the connection still answers.
    assert_eq!(raw.ack(SET_VRING_CALL, &0u64.to_le_bytes(), &[efd.as_raw_fd()]).unwrap(), 0);
    assert_eq!(raw.get_u64(GET_QUEUE_NUM).unwrap(), 256);
    drop(raw);

    // A blocking eventfd whose counter is one below overflow, as the call descriptor: the
    // daemon's interrupt cannot be added, and must not wait for room.
    let mut fe = TestFrontend::connect(&t.a_sock, 1, QSIZE, WANT);
    let full = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    full.write(u64::MAX - 1).unwrap();
    fe.fe.set_vring_call(0, &full).unwrap();
    for _ in 0..3 {
        frontend_reads(&mut fe, 1);
    }
    drop(fe);
    t.neighbour_serves();
    t.stops();
}

// 6. Address-space exhaustion: mapped guest memory is capped per connection and per daemon.

fn map_ram(sock: &Path, bytes: u64, file: &fs::File) -> (RawFrontend, u64) {
    let raw = RawFrontend::connect(sock);
    raw.negotiate();
    let status = raw
        .ack(SET_MEM_TABLE, &mem_table(&[(0, bytes, 0x7000_0000_0000, 0)]), &[file.as_raw_fd()])
        .unwrap();
    (raw, status)
}

#[test]
fn mapped_guest_memory_is_capped_per_connection_and_per_daemon() {
    let mut t =
        tenants_with(",max-guest-memory=96M", &["--max-mapped-guest-memory", "160M"], tmpdir());
    let ram = memfd(4 << 40);
    // Over the export's own cap: refused, before anything is mapped.
    let (raw, status) = map_ram(&t.a_sock, 128 << 20, &ram);
    assert_ne!(status, 0, "128 MiB over max-guest-memory=96M accepted");
    // The same connection can still give a table within it.
    assert_eq!(
        raw.ack(
            SET_MEM_TABLE,
            &mem_table(&[(0, 64 << 20, 0x7000_0000_0000, 0)]),
            &[ram.as_raw_fd()]
        )
        .unwrap(),
        0
    );
    assert!(t.daemon.log().contains("over this export's max-guest-memory"), "{}", t.daemon.log());
    // b has the default cap (1 TiB): 2 TiB in one region is refused.
    let (_b_big, status) = map_ram(&t.b_sock, 2 << 40, &ram);
    assert_ne!(status, 0, "2 TiB over the default max-guest-memory accepted");
    drop(_b_big);
    std::thread::sleep(Duration::from_millis(200));
    // a holds 64 MiB of the daemon's 160: b may have 96 more, not 128.
    let (b, status) = map_ram(&t.b_sock, 128 << 20, &ram);
    assert_ne!(status, 0, "the daemon-wide cap let 64 + 128 MiB through");
    assert!(t.daemon.log().contains("exceed the daemon's limit"), "{}", t.daemon.log());
    assert_eq!(
        b.ack(SET_MEM_TABLE, &mem_table(&[(0, 96 << 20, 0x7000_0000_0000, 0)]), &[ram.as_raw_fd()])
            .unwrap(),
        0
    );
    drop(b);
    // Once a hangs up, its memory goes back to the daemon's budget.
    drop(raw);
    std::thread::sleep(Duration::from_millis(300));
    let (_b, status) = map_ram(&t.b_sock, 150 << 20, &ram);
    assert_eq!(status, 0, "memory not returned after a disconnect:\n{}", t.daemon.log());
    drop(_b);
    std::thread::sleep(Duration::from_millis(200));
    t.neighbour_serves();
    t.stops();
}

// 9. The metrics endpoint.

/// Scrape slots and reading slots of the metrics endpoint (src/control/metrics.rs).
const MAX_SCRAPES: usize = 4;
const MAX_READERS: usize = 64;

/// One scrape: the status line and how long it took.
fn scrape(port: u16) -> (String, Duration) {
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    (reply.lines().next().unwrap_or("").to_string(), start.elapsed())
}

#[test]
fn the_metrics_endpoint_bounds_requests_and_serves_scrapes_side_by_side() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut t = tenants_with("", &["--metrics", &addr], tmpdir());
    let (status, _) = scrape(port);
    assert_eq!(status, "HTTP/1.0 200 OK");

    // 64 MiB of request line without an end: the daemon stops reading and hangs up long
    // before, and does not grow.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let sent = flood(&mut s, b'a');
    assert!(sent < 64 << 20, "the daemon read all of a 64 MiB request line");
    drop(s);
    let peak = peak_rss_bytes(t.daemon.pid());
    assert!(peak < 40 << 20, "the daemon's resident memory peaked at {peak} bytes");

    // A client that connects and says nothing does not hold up another scrape.
    let _stalled = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, took) = scrape(port);
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert!(took < Duration::from_secs(2), "a scrape waited {took:?} behind a silent client");
    // Silent clients hold only reading slots, not the scrape slots: with as many as there
    // are scrape slots a scrape is still served at once.
    let more: Vec<_> = (1..MAX_SCRAPES)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (status, took) = scrape(port);
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert!(took < Duration::from_secs(1), "a scrape waited {took:?} behind silent clients");
    drop(more);
    // Silent clients in every reading slot: the next is told 503 at once; after the read
    // deadline (1 s) they are gone and scrapes are served again.
    let _more: Vec<_> = (0..MAX_READERS)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (status, _) = scrape(port);
    assert_eq!(status, "HTTP/1.0 503 Service Unavailable");
    std::thread::sleep(Duration::from_millis(1500));
    let (status, _) = scrape(port);
    assert_eq!(status, "HTTP/1.0 200 OK");
    t.neighbour_serves();
    t.stops();
}

// 10. The control socket.

#[test]
fn the_control_socket_bounds_lines_and_clients() {
    let (mut t, ctl) = tenants_with_control("", &[]);
    // An over-long line gets an error reply, then the connection is closed: the rest of the
    // line is never read.
    let mut s = UnixStream::connect(&ctl).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let sent = flood(&mut s, b' ');
    assert!(sent < 64 << 20, "the daemon read all of a 64 MiB line");
    let mut reply = String::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("\"too-long\""), "reply: {reply}");
    let peak = peak_rss_bytes(t.daemon.pid());
    assert!(peak < 40 << 20, "the daemon's resident memory peaked at {peak} bytes");

    // Sixteen clients at once; the seventeenth is told so and closed.
    let idle: Vec<UnixStream> = (0..16).map(|_| UnixStream::connect(&ctl).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = UnixStream::connect(&ctl).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = String::new();
    let _ = extra.read_to_string(&mut reply);
    assert!(reply.contains("\"busy\""), "reply: {reply}");
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    // An idle client is closed after a minute; a working one is served.
    let mut idle = UnixStream::connect(&ctl).unwrap();
    let mut ctl_client = blkplane::ControlClient::connect(&ctl).unwrap();
    let r = ctl_client.call("list-exports", serde_json::json!({})).unwrap();
    assert_eq!(r["result"].as_array().unwrap().len(), 2);
    let start = Instant::now();
    assert!(hung_up_within(&mut idle, Duration::from_secs(75)), "idle client kept");
    assert!(start.elapsed() >= Duration::from_secs(55), "closed too early");
    t.neighbour_serves();
    t.stops();
}

// 12. Who may connect.

#[test]
fn sockets_are_owner_only_unless_the_operator_widens_them() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (t, ctl) = tenants_with_control(",socket-mode=0660,socket-group=6,socket-owner=65534", &[]);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&t.b_sock), 0o600, "an export socket by default");
    assert_eq!(mode(&ctl), 0o600, "the control socket");
    let a = fs::metadata(&t.a_sock).unwrap();
    assert_eq!(a.permissions().mode() & 0o777, 0o660, "socket-mode");
    assert_eq!((a.uid(), a.gid()), (65534, 6), "socket-owner and socket-group");
    t.stops();
}

// 13. Opening images: never block on an open, never hold the exports lock across one.

#[test]
fn an_image_swapped_for_a_fifo_never_blocks_the_daemon() {
    let (mut t, ctl) = tenants_with_control("", &[]);
    let dir = t.dir.path();
    let (regular, fifo, image) = (dir.join("regular"), dir.join("fifo"), dir.join("image"));
    make_image(&regular, 1 << 20, 5);
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // A local user swaps the image path between a regular file and a FIFO, as fast as it
    // can, while the operator adds an export of it: whatever the daemon finds must not make
    // it wait (a read-only open of a FIFO blocks until a writer comes).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, regular, fifo, image) =
            (stop.clone(), regular.clone(), fifo.clone(), image.clone());
        let tmp = t.dir.path().join("swap-tmp");
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for src in [&regular, &fifo] {
                    let _ = fs::remove_file(&tmp);
                    fs::hard_link(src, &tmp).unwrap();
                    fs::rename(&tmp, &image).unwrap();
                }
            }
        })
    };
    let sock = t.dir.path().join("swapped.sock");
    let mut conn = UnixStream::connect(&ctl).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut call = |line: String| -> serde_json::Value {
        use std::io::BufRead;
        conn.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("the control socket stopped answering");
        serde_json::from_str(&reply).unwrap()
    };
    let (mut added, mut refused) = (0, 0);
    for _ in 0..1000 {
        let add = serde_json::json!({"command": "add-export", "args": {
            "id": "swapped", "socket": sock.display().to_string(),
            "image": image.display().to_string(), "cache": "writeback", "readonly": "on"}});
        let r = call(add.to_string());
        if r.get("result").is_some() {
            added += 1;
            let rm = serde_json::json!({"command": "remove-export", "args": {"id": "swapped"}});
            assert!(call(rm.to_string()).get("result").is_some());
        } else {
            assert_eq!(r["error"]["code"], "open-failed", "{r}");
            refused += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(added > 0 && refused > 0, "the race was not run: {added} added, {refused} refused");
    t.neighbour_serves();
    t.stops();
}

// 14. Frontend-triggered warnings are rate limited.

#[test]
fn a_frontend_cannot_flood_the_log() {
    let mut t = tenants("");
    let raw = RawFrontend::connect(&t.a_sock);
    raw.negotiate();
    for _ in 0..200 {
        // A vring size that is not a power of two: refused, and warned about.
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend(3u32.to_le_bytes());
        assert_ne!(raw.ack(SET_VRING_NUM, &p, &[]).unwrap(), 0);
    }
    let lines = t.daemon.log().matches("vring size 3 refused").count();
    assert!((1..=20).contains(&lines), "{lines} log lines for 200 refusals");
    drop(raw);
    // Reconnecting does not buy a fresh budget, for the warnings or the connection lines.
    for _ in 0..100 {
        let raw = RawFrontend::connect(&t.a_sock);
        raw.negotiate();
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend(3u32.to_le_bytes());
        assert_ne!(raw.ack(SET_VRING_NUM, &p, &[]).unwrap(), 0);
    }
    let log = t.daemon.log();
    let lines = log.matches("vring size 3 refused").count();
    assert!(lines <= 40, "{lines} log lines for 300 refusals over 101 connections");
    let connects = log.matches("frontend connected").count();
    assert!(connects <= 60, "{connects} connection lines for 101 connections");
    t.neighbour_serves();
    t.stops();
}

// 15. Memory a page fault could stall on: guest RAM, inflight regions and dirty logs only
// from memfd/tmpfs and hugetlbfs. (A file on FUSE or a hung NFS mount would put the I/O
// thread that touches it, and every queue it serves, to sleep for as long as the tenant
// likes; a file on ext4 is refused by the same check, by file-system type.)

/// The refusal of a file on the root file system (ext4 on the test machines).
const ON_EXT4: &str = "guest memory on ext4 (0xef53): only memfd, tmpfs or hugetlbfs can be \
                       mapped without a page fault stalling an I/O thread";

/// A file of `bytes` on the root file system (/var/tmp is never tmpfs there).
fn disk_file(dir: &Path, bytes: u64) -> fs::File {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("ram-on-disk"))
        .unwrap();
    file.set_len(bytes).unwrap();
    file
}

/// The daemon's mappings (/proc/PID/maps lines) of files whose path contains `part`.
fn mappings_of(pid: i32, part: &str) -> Vec<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines().filter(|l| l.contains(part)).map(str::to_string).collect()
}

#[test]
fn guest_memory_a_fault_could_stall_on_is_refused_by_file_system() {
    let mut t = tenants("");
    let disk = disk_dir();
    let fs_type = blkplane::filesystem_of(disk.path());
    assert_eq!(fs_type.as_deref(), Some("ext4"), "the test wants /var/tmp on ext4");
    let file = disk_file(disk.path(), RAM_BYTES as u64);
    let path = disk.path().join("ram-on-disk").display().to_string();
    let raw = RawFrontend::connect(&t.a_sock);
    raw.negotiate_with(PROTOCOL_INFLIGHT_SHMFD | PROTOCOL_LOG_SHMFD);
    let fd = [file.as_raw_fd()];
    let table = mem_table(&[(0, RAM_BYTES as u64, 0x7000_0000_0000, 0)]);
    assert_ne!(raw.ack(SET_MEM_TABLE, &table, &fd).unwrap(), 0, "guest RAM on ext4 was mapped");
    let region = one_region(0, RAM_BYTES as u64, 0x7000_0000_0000, 0);
    assert_ne!(raw.ack(ADD_MEM_REG, &region, &fd).unwrap(), 0, "a region on ext4 was mapped");
    let region = inflight_payload(inflight_bytes(1, 64), 0, 1, 64);
    let status = raw.ack(SET_INFLIGHT_FD, &region, &fd).unwrap();
    assert_ne!(status, 0, "an inflight region on ext4 was mapped");
    assert_eq!(mappings_of(t.daemon.pid(), &path), Vec::<String>::new(), "mapped from ext4");
    // The connection goes on: guest RAM in a memfd is taken.
    let ram = memfd(RAM_BYTES as u64);
    assert_eq!(raw.ack(SET_MEM_TABLE, &table, &[ram.as_raw_fd()]).unwrap(), 0);
    // A dirty log on ext4: SET_LOG_BASE has no error reply, so the connection ends.
    assert!(!raw.set_log_base(RAM_BYTES as u64 / 4096 / 8, file.as_raw_fd()), "log on ext4");
    assert!(mappings_of(t.daemon.pid(), &path).is_empty(), "mapped from ext4");
    let log = t.daemon.log();
    for (what, times) in [
        ("refused a memory region: ", 2),
        ("device: inflight region: ", 1),
        ("closing the connection: dirty log: ", 1),
    ] {
        let line = format!("{what}{ON_EXT4}");
        assert_eq!(log.matches(&line).count(), times, "'{line}' in:\n{log}");
    }
    drop(raw);
    t.neighbour_serves();
    t.own_export_serves();
    t.stops();
}

// 16. The dirty log is at most the bitmap of the connection's max-guest-memory, inside its
// budget: a log with no guest RAM cannot take the daemon-wide budget from other tenants.

#[test]
fn a_dirty_log_cannot_take_the_daemon_wide_budget() {
    let mut t =
        tenants_with(",max-guest-memory=32M", &["--max-mapped-guest-memory", "64M"], tmpdir());
    let ram = memfd(64 << 20);
    let attacker = RawFrontend::connect(&t.a_sock);
    attacker.negotiate_with(PROTOCOL_LOG_SHMFD);
    // 48 MiB of "log" before any memory table: within the daemon's 64 MiB, far over the 1 KiB
    // of bitmap 32 MiB of guest memory needs. Refused; the connection ends.
    assert!(!attacker.set_log_base(48 << 20, ram.as_raw_fd()), "a 48 MiB log was taken");
    // The victim's guest RAM still fits the daemon's budget.
    let (victim, status) = map_ram(&t.b_sock, 32 << 20, &ram);
    assert_eq!(status, 0, "the victim's SET_MEM_TABLE was refused:\n{}", t.daemon.log());
    drop(victim);
    let log = t.daemon.log();
    let want = "a dirty log of 50331648 bytes is over the 1024 bytes of bitmap this export's \
                max-guest-memory needs";
    assert!(log.contains(want), "{log}");
    // The bitmap of max-guest-memory itself is taken, and one word more is not.
    for (bytes, taken) in [(1024u64, true), (1032, false)] {
        let raw = RawFrontend::connect(&t.a_sock);
        raw.negotiate_with(PROTOCOL_LOG_SHMFD);
        assert_eq!(raw.set_log_base(bytes, ram.as_raw_fd()), taken, "a log of {bytes} bytes");
    }
    // Nothing stayed mapped: the whole daemon-wide budget is there for one tenant again.
    std::thread::sleep(Duration::from_millis(300));
    let (_b, status) = map_ram(&t.b_sock, 64 << 20, &ram);
    assert_eq!(status, 0, "mapped memory did not come back:\n{}", t.daemon.log());
    drop(_b);
    t.neighbour_serves();
    t.own_export_serves();
    t.stops();
}

// 17. Lines a frontend triggers by ordinary messages (dirty logging on and off, a migration's
// switch-over and its undoing) go through the export's rate limiter.

#[test]
fn toggling_dirty_logging_cannot_flood_the_log() {
    let mut t = tenants("");
    // The switch-over and the guest's return, 200 times: every ring stopped with logging
    // on gives the image up, a ring that starts takes it back.
    let extra = vhost::vhost_user::message::VhostUserProtocolFeatures::LOG_SHMFD;
    let mut fe = TestFrontend::connect_with_protocol(&t.a_sock, 1, QSIZE, WANT, extra);
    let log_bytes = RAM_BYTES as u64 / 4096 / 8;
    let bitmap = memfd(log_bytes);
    let region = vhost::VhostUserDirtyLogRegion {
        mmap_size: log_bytes,
        mmap_offset: 0,
        mmap_handle: bitmap.as_raw_fd(),
    };
    fe.fe.set_log_base(0, Some(region)).unwrap();
    fe.fe.set_features(fe.features | F_LOG_ALL).unwrap();
    for _ in 0..200 {
        fe.fe.get_vring_base(0).unwrap();
        fe.fe.set_vring_kick(0, &fe.queues[0].kick).unwrap();
    }
    frontend_reads(&mut fe, 1);
    drop(fe);
    let lines = t.daemon.log().matches("image's write permission").count();
    assert!((1..=20).contains(&lines), "{lines} lines for 200 switch-overs and returns");
    // Dirty logging on and off, 2000 times.
    let raw = RawFrontend::connect(&t.a_sock);
    raw.negotiate_with(PROTOCOL_LOG_SHMFD);
    let features = raw.get_u64(GET_FEATURES).unwrap() & FEATURES;
    for i in 0..2000u64 {
        let logging = if i % 2 == 0 { F_LOG_ALL } else { 0 };
        raw.send(SET_FEATURES, false, &(features | logging).to_le_bytes(), &[]).unwrap();
    }
    assert_eq!(raw.get_u64(GET_QUEUE_NUM).unwrap(), 256, "the connection stopped answering");
    drop(raw);
    let lines = t.daemon.log().matches("dirty logging").count();
    assert!((1..=20).contains(&lines), "{lines} lines for 2000 toggles of dirty logging");
    t.neighbour_serves();
    t.own_export_serves();
    t.stops();
}

/// Waits up to 5 s for `efd` (non-blocking) to be signalled; whether it was.
fn signalled_within_5s(efd: &vmm_sys_util::eventfd::EventFd) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if efd.read().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn a_queue_broken_and_restarted_in_a_loop_cannot_flood_the_log() {
    let mut t = tenants("");
    let mut fe = TestFrontend::connect(&t.a_sock, 1, QSIZE, WANT);
    let err = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    fe.fe.set_vring_err(0, &err).unwrap();
    // avail->idx 1000 ahead of a ring of 64 breaks the queue at its first look; every
    // SET_VRING_KICK starts it afresh, and it breaks again.
    fe.set_avail_idx(0, 1000);
    for round in 0..200 {
        fe.kick(0);
        assert!(signalled_within_5s(&err), "round {round}: the queue did not break");
        fe.fe.set_vring_kick(0, &fe.queues[0].kick).unwrap();
    }
    drop(fe);
    let lines = t.daemon.log().matches("queue broken by the guest").count();
    assert!((1..=20).contains(&lines), "{lines} lines for 200 queues broken");
    t.neighbour_serves();
    t.own_export_serves();
    t.stops();
}

// 11. Resize: block multiples only; serialized; a shrink is not undone by writes in flight.

fn ctl_ok(
    ctl: &mut blkplane::ControlClient,
    command: &str,
    args: serde_json::Value,
) -> serde_json::Value {
    let r = ctl.call(command, args.clone()).unwrap();
    r.get("result").cloned().unwrap_or_else(|| panic!("{command} {args}: {r}"))
}

#[test]
fn resizes_are_whole_blocks_serialized_and_a_shrink_stays_shrunk() {
    let (mut t, ctl_path) = tenants_with_control(",logical-block-size=4096,queues=2", &[]);
    let mut ctl = blkplane::ControlClient::connect(&ctl_path).unwrap();
    let r = ctl.call("resize", serde_json::json!({"id": "a", "size": (8 << 20) + 512})).unwrap();
    assert_eq!(r["error"]["code"], "invalid-size", "{r}");
    assert_eq!(fs::metadata(&t.a_image).unwrap().len(), 8 << 20, "the file changed");

    // Writes pour into the last MiB on two queues while the disk shrinks by that MiB and
    // grows back, again and again: once a shrink has returned, nothing written before it
    // may land past the new end (which would extend the file again).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut c = Client::connect(&t.a_sock, 2);
    let io = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for q in 0..2 {
                    for i in 0..16u64 {
                        let ptr = c.buf_ptr((i as usize) << 12);
                        let off = (7 << 20) + ((rounds * 16 + i) % 256) * 4096;
                        c.queues[q].write(off, ptr, 4096, 0, blkio::ReqFlags::empty());
                    }
                }
                for q in 0..2 {
                    for _ in 0..16 {
                        c.wait_one(q);
                    }
                }
                rounds += 1;
            }
            rounds
        })
    };
    for round in 0..30 {
        ctl_ok(&mut ctl, "resize", serde_json::json!({"id": "a", "size": 7 << 20, "shrink": "on"}));
        std::thread::sleep(Duration::from_millis(5));
        let len = fs::metadata(&t.a_image).unwrap().len();
        assert_eq!(
            len,
            7 << 20,
            "round {round}: a write checked against the old size extended the file"
        );
        ctl_ok(&mut ctl, "resize", serde_json::json!({"id": "a", "size": 8 << 20}));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(io.join().unwrap() > 10, "too few write rounds to mean anything");

    // Resizes from two control clients at once: the file and the size the guest is told
    // always agree at the end.
    let sizes = [4u64 << 20, 6 << 20, 10 << 20, 12 << 20];
    let racers: Vec<_> = (0..2)
        .map(|k| {
            let p = ctl_path.clone();
            std::thread::spawn(move || {
                let mut ctl = blkplane::ControlClient::connect(&p).unwrap();
                for i in 0..40 {
                    let size = sizes[(i * (k + 1)) % sizes.len()];
                    let args = serde_json::json!({"id": "a", "size": size, "shrink": true});
                    ctl_ok(&mut ctl, "resize", args);
                }
            })
        })
        .collect();
    for r in racers {
        r.join().unwrap();
    }
    let listed = ctl_ok(&mut ctl, "list-exports", serde_json::json!({}));
    let size = listed.as_array().unwrap().iter().find(|e| e["id"] == "a").unwrap()["size_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(fs::metadata(&t.a_image).unwrap().len(), size, "file and capacity disagree");
    t.neighbour_serves();
    t.stops();
}

// 11b. A shrink is never an accident: refused unless the request says shrink=on.

#[test]
fn a_resize_to_a_smaller_size_is_refused_without_shrink_on() {
    let (mut t, ctl_path) = tenants_with_control("", &[]);
    let before = fs::read(&t.a_image).unwrap();
    assert_eq!(before, pattern(1, 0, IMAGE_BYTES as usize), "the image as made");
    let want = "size 4194304 is below the export's 8388608 bytes; a shrink loses data: \
                say shrink=on";
    let mut ctl = blkplane::ControlClient::connect(&ctl_path).unwrap();
    for args in [
        serde_json::json!({"id": "a", "size": 4 << 20}),
        serde_json::json!({"id": "a", "size": "4M", "shrink": "off"}),
        serde_json::json!({"id": "a", "size": 4 << 20, "shrink": false}),
    ] {
        let r = ctl.call("resize", args.clone()).unwrap();
        assert_eq!(r["error"]["code"], "invalid-size", "{args}: {r}");
        assert_eq!(r["error"]["message"], want, "{args}: {r}");
    }
    // The command line says the same, and fails.
    let out = common::ctl(&ctl_path, &["resize", "id=a", "size=4M"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("blkplane: resize: {want} (invalid-size)\n")
    );
    let r = ctl.call("resize", serde_json::json!({"id": "a", "size": 4 << 20, "shrink": "maybe"}));
    assert_eq!(r.unwrap()["error"]["code"], "invalid-argument");
    assert_eq!(fs::read(&t.a_image).unwrap(), before, "a refused shrink changed the image");
    assert!(!t.daemon.log().contains("export shrunk"), "{}", t.daemon.log());

    // Growing needs no word; shrinking back with shrink=on does, and is a warning.
    ctl_ok(&mut ctl, "resize", serde_json::json!({"id": "a", "size": 12 << 20}));
    let out = common::ctl(&ctl_path, &["resize", "id=a", "size=4M", "shrink=on"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::metadata(&t.a_image).unwrap().len(), 4 << 20);
    assert_eq!(fs::read(&t.a_image).unwrap(), before[..4 << 20], "the kept bytes changed");
    let log = t.daemon.log();
    let warned: Vec<_> = log.lines().filter(|l| l.contains("export shrunk")).collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains("WARN")
            && warned[0].contains("old_size_bytes=12582912")
            && warned[0].contains("new_size_bytes=4194304"),
        "{}",
        warned[0]
    );
    t.neighbour_serves();
    t.stops();
}

// 14. A frontend that never reads its backend channel cannot wedge resize or its export.

#[test]
fn a_backend_channel_nobody_reads_times_out() {
    let (mut t, ctl_path) = tenants_with_control("", &[]);
    let raw = RawFrontend::connect(&t.a_sock);
    raw.send(SET_OWNER, false, &[], &[]).unwrap();
    let offered = raw.get_u64(GET_FEATURES).unwrap();
    raw.send(SET_FEATURES, false, &(offered & FEATURES).to_le_bytes(), &[]).unwrap();
    let _ = raw.get_u64(GET_PROTOCOL_FEATURES).unwrap();
    // MQ, CONFIG and BACKEND_REQ; no REPLY_ACK, so config changes are not waited for.
    let proto: u64 = (1 << 0) | (1 << 9) | (1 << 5);
    raw.send(SET_PROTOCOL_FEATURES, false, &proto.to_le_bytes(), &[]).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    // The smallest buffers, so that a few hundred unread messages fill them.
    for s in [&ours, &theirs] {
        for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            let small: libc::c_int = 1;
            // SAFETY: setsockopt with a valid int option value.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&small as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }
    const SET_BACKEND_REQ_FD: u32 = 21;
    raw.send(SET_BACKEND_REQ_FD, false, &[], &[theirs.as_raw_fd()]).unwrap();
    drop(theirs);
    assert_eq!(raw.get_u64(GET_QUEUE_NUM).unwrap(), 256, "channel taken");
    // Resize until the channel is full: that resize must come back with an error.
    let mut ctl = UnixStream::connect(&ctl_path).unwrap();
    ctl.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reader = std::io::BufReader::new(ctl.try_clone().unwrap());
    let mut failed = None;
    for i in 0..20_000u64 {
        use std::io::BufRead;
        let size = if i % 2 == 0 { 4 << 20 } else { 8 << 20 };
        let args = serde_json::json!({"id": "a", "size": size, "shrink": "on"});
        let line = serde_json::json!({"command": "resize", "args": args});
        ctl.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("resize never returned: the channel write blocked");
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
        if v.get("error").is_some() {
            failed = Some((i, v));
            break;
        }
    }
    let (i, v) = failed.expect("the channel never filled up");
    assert_eq!(v["error"]["code"], "notify-failed", "after {i} resizes: {v}");
    // The frontend's hang-up is handled (the disconnect path takes the channel too), and the
    // export serves the next client.
    drop(raw);
    drop(ours);
    t.own_export_serves();
    t.neighbour_serves();
    t.stops();
}

// 14. A thread pool that cannot start all its workers leaves none behind.

fn thread_names(pid: i32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn a_thread_pool_that_cannot_start_leaves_no_worker_behind() {
    let mut t = tenants(",aio=threads");
    let pid = t.daemon.pid();
    // A pids cgroup (v1 here) with room for the I/O thread and one worker only.
    let cg = PathBuf::from(format!("/sys/fs/cgroup/pids/blkplane-test-{pid}"));
    fs::create_dir(&cg).expect("a pids cgroup (needs root and the pids controller)");
    fs::write(cg.join("cgroup.procs"), pid.to_string()).unwrap();
    let before = thread_names(pid);
    fs::write(cg.join("pids.max"), (before.len() + 2).to_string()).unwrap();
    let refused = Client::try_connect(&t.a_sock, 1, false);
    assert!(refused.is_err(), "the queue started without its workers");
    drop(refused);
    fs::write(cg.join("pids.max"), "max").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = thread_names(pid);
    assert_eq!(
        after.iter().filter(|n| n.starts_with("blkplane-aio")).count(),
        0,
        "leaked workers: {after:?}"
    );
    assert_eq!(after.len(), before.len(), "threads before {before:?}, after {after:?}");
    // With room again, the export serves.
    t.own_export_serves();
    t.neighbour_serves();
    t.stops();
    let _ = fs::remove_dir(&cg);
}
