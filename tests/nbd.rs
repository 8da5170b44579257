//! The NBD engine against real servers (qemu-nbd, nbdkit) killed and started again under
//! I/O, against bad configurations at start, and against a hostile server of this test's own
//! that lies in every way the protocol allows a server to lie. (The whole client suite also
//! runs behind both real servers: tests/client.rs, `behind_qemu_nbd` and `behind_nbdkit`.)

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::frontend::{TestFrontend, S_IOERR, S_OK, T_IN};
use common::nbd::{nbdkit, NbdServer, Server};
use common::{
    assert_usage_error, fd_count, make_image, pattern, serve_refused, thread_count, tmpdir,
    wait_until, Client, Daemon, KillOnDrop,
};
use vhost::VhostBackend;

const IMAGE_BYTES: u64 = 64 << 20;
const EIO: i32 = -libc::EIO;

fn nbd_export(sock: &Path, uri: &str, extra: &str) -> String {
    format!("socket={},image={uri}{extra}", sock.display())
}

/// A server killed with requests in flight and started again within the reconnect delay:
/// the requests wait (no completion while it is down) and then complete, with the right
/// data, and the file holds every write.
fn requests_wait_for_a_restarted_server(server: Server) {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 21);
    let mut nbd = NbdServer::start(server, &image, &dir.path().join("nbd.sock"));
    let mut daemon =
        Daemon::start(dir.path(), &[nbd_export(&sock, &nbd.uri(), ",reconnect-delay=30")]);
    {
        let mut c = Client::connect(&sock, 1);
        // The queue's connection is up once a request was answered.
        assert!(c.read_at(0, 0, 4096, 4 << 20).unwrap() == pattern(21, 0, 4096));
        // I/O in flight when the server dies: 16 writes of 64 KiB.
        for i in 0..16usize {
            let data = pattern(300, i as u64 * 65536, 65536);
            c.buf_slice(i * 65536, 65536).copy_from_slice(&data);
            let buf = c.buf_ptr(i * 65536);
            c.queues[0].write(i as u64 * 65536, buf, 65536, i, ReqFlags::empty());
        }
        c.queues[0].do_io(&mut [], 0, None, None).unwrap();
        nbd.kill();
        // ... and new requests while it is down: a read and a flush.
        let buf = c.buf_ptr(2 << 20);
        c.queues[0].read(32 << 20, buf, 4096, 100, ReqFlags::empty());
        c.queues[0].flush(101, ReqFlags::empty());
        let mut done = c.completions(0, 18, Duration::from_millis(300));
        let before_restart = done.len();
        // Writes the server answered before it died may complete; the read and flush cannot.
        assert!(done.iter().all(|&(u, r)| u < 16 && r == 0), "while down: {done:?}");
        std::thread::sleep(Duration::from_millis(700));
        nbd.restart();
        done.extend(c.completions(0, 18 - before_restart, Duration::from_secs(20)));
        assert_eq!(done.len(), 18, "completions after the restart: {done:?}\n{}", daemon.log());
        assert!(done.iter().all(|&(_, r)| r == 0), "every request succeeded: {done:?}");
        assert!(c.buf_slice(2 << 20, 4096) == pattern(21, 32 << 20, 4096), "the waiting read");
        for i in 0..16u64 {
            let back = c.read_at(0, i * 65536, 65536, 4 << 20).unwrap();
            assert!(back == pattern(300, i * 65536, 65536), "write {i} after the restart");
        }
    }
    assert!(daemon.log().contains("lost the NBD connection"), "{}", daemon.log());
    assert!(daemon.stop().success());
    let img = fs::read(&image).unwrap();
    assert_eq!(img[..1 << 20], pattern(300, 0, 1 << 20)[..]);
}

#[test]
fn requests_wait_for_a_restarted_qemu_nbd() {
    requests_wait_for_a_restarted_server(Server::QemuNbd);
}

#[test]
fn requests_wait_for_a_restarted_nbdkit() {
    requests_wait_for_a_restarted_server(Server::Nbdkit);
}

/// Past `reconnect-delay` without a server, waiting requests fail (IOERR), new ones fail at
/// once; when the server is back, the export serves again without anything being done.
#[test]
fn past_the_reconnect_delay_requests_fail_until_the_server_is_back() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 22);
    let mut nbd = NbdServer::start(Server::QemuNbd, &image, &dir.path().join("nbd.sock"));
    let daemon = Daemon::start(dir.path(), &[nbd_export(&sock, &nbd.uri(), ",reconnect-delay=1")]);
    let mut c = Client::connect(&sock, 1);
    assert!(c.read_at(0, 0, 4096, 0).unwrap() == pattern(22, 0, 4096));
    nbd.kill();
    let started = Instant::now();
    let buf = c.buf_ptr(0);
    c.queues[0].read(4096, buf, 4096, 7, ReqFlags::empty());
    let done = c.completions(0, 1, Duration::from_secs(10));
    let waited = started.elapsed();
    assert_eq!(done, vec![(7, EIO)], "{}", daemon.log());
    assert!(waited >= Duration::from_millis(900), "failed after {waited:?}, before the delay");
    assert!(waited < Duration::from_secs(5), "failed only after {waited:?}");
    // New requests fail at once while the server is away.
    let started = Instant::now();
    assert_eq!(c.read_at(0, 0, 4096, 0), Err(EIO));
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    nbd.restart();
    wait_until("the export serves again", Duration::from_secs(10), || {
        c.read_at(0, 8192, 4096, 0).is_ok_and(|b| b == pattern(22, 8192, 4096))
    });
    let data = pattern(23, 1 << 20, 65536);
    assert_eq!(c.write_at(0, 1 << 20, &data, 0), 0);
    assert!(daemon.log().contains("unreachable for the reconnect delay"), "{}", daemon.log());
}

/// `nbd://HOST:PORT/EXPORT`: the same engine over TCP, against qemu-nbd on the loopback.
#[test]
fn an_export_over_tcp() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, 16 << 20, 24);
    let port = common::free_port();
    let _qnbd = KillOnDrop(
        Command::new("qemu-nbd")
            .args([
                "--bind=127.0.0.1",
                &format!("--port={port}"),
                "--format=raw",
                "-t",
                "--shared=4",
            ])
            .args(["--export-name=tcpdisk", "--cache=writeback"])
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("qemu-nbd listens on TCP", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let uri = format!("nbd://127.0.0.1:{port}/tcpdisk");
    let mut daemon = Daemon::start(dir.path(), &[nbd_export(&sock, &uri, ",queues=2")]);
    {
        let mut c = Client::connect(&sock, 2);
        assert_eq!(c.capacity(), 16 << 20);
        let data = pattern(25, 3 << 20, 1 << 20);
        assert_eq!(c.write_at(1, 3 << 20, &data, 0), 0);
        assert!(
            c.read_at(0, 3 << 20, 1 << 20, 2 << 20).unwrap() == data,
            "queue 0 sees queue 1's write"
        );
        assert!(c.read_at(1, 0, 65536, 0).unwrap() == pattern(24, 0, 65536));
        assert_eq!(c.flush(0), 0);
    }
    assert!(daemon.stop().success());
    let img = fs::read(&image).unwrap();
    assert_eq!(img[3 << 20..4 << 20], pattern(25, 3 << 20, 1 << 20)[..]);
}

/// A server whose largest payload (96 KiB here) is smaller than the guest's requests: each
/// read and write goes out in parts the server takes, the parts crossing the guest's buffer
/// segments, two such requests in flight at once, and every byte lands where it belongs.
/// (Before, such requests failed: IOERR, "beyond the NBD server's maximum".)
#[test]
fn requests_past_the_servers_largest_payload_go_in_parts() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    let nbd_sock = dir.path().join("nbd.sock");
    make_image(&image, 16 << 20, 26);
    // The policy filter advertises the block sizes and answers a longer request with EINVAL.
    let policy = ["blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=98304"];
    let mut args =
        vec!["--filter=blocksize-policy".into(), "file".into(), image.display().to_string()];
    args.extend(policy.map(String::from));
    args.push("blocksize-error-policy=error".into());
    let _nbdkit = nbdkit(&nbd_sock, &args);
    let uri = format!("nbd+unix:///?socket={}", nbd_sock.display());
    let mut daemon = Daemon::start(dir.path(), &[nbd_export(&sock, &uri, "")]);
    // Not a whole number of 96 KiB parts: the last part of each is short.
    let (a_at, b_at, len) = ((1 << 20) + 4096, 9 << 20, (3 << 20) + 8192);
    {
        let mut c = Client::connect(&sock, 1);
        for (i, (offset, seed)) in [(a_at, 601), (b_at, 602)].into_iter().enumerate() {
            let at = i * len;
            c.buf_slice(at, len).copy_from_slice(&pattern(seed, offset, len));
            let iovs = c.segments(at, len);
            let n = iovs.len() as u32;
            c.queues[0].writev(offset, iovs.as_ptr(), n, i, ReqFlags::empty());
        }
        let mut done = c.completions(0, 2, Duration::from_secs(20));
        done.sort_unstable();
        assert_eq!(done, [(0, 0), (1, 0)], "{}", daemon.log());
        let back = c.read_at(0, a_at, len, 0).unwrap();
        assert!(back == pattern(601, a_at, len), "the first write, read back");
        let back = c.read_at(0, b_at - 4096, len + 8192, 0).unwrap();
        assert!(back[..4096] == pattern(26, b_at - 4096, 4096), "before the second write");
        assert!(back[4096..4096 + len] == pattern(602, b_at, len), "the second write");
        assert!(back[4096 + len..] == pattern(26, b_at + len as u64, 4096), "after it");
    }
    assert!(daemon.stop().success());
    let img = fs::read(&image).unwrap();
    let (a, b) = (a_at as usize, b_at as usize);
    assert!(img[a..a + len] == pattern(601, a_at, len), "the first write in the image");
    assert!(img[b..b + len] == pattern(602, b_at, len), "the second write in the image");
    assert!(img[a - 4096..a] == pattern(26, a_at - 4096, 4096), "before the first write");
}

/// A cache mode without a write cache (`writethrough`, `directsync`) tells the guest its
/// writes are on disk when they complete, so they must not wait in the NBD server's cache:
/// each carries FUA, and a mode with a write cache (`none`) sends none. (Before, the writes
/// went plain and the guest, seeing no write cache, never flushed.)
#[test]
fn writes_without_a_write_cache_carry_fua() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let log = dir.path().join("nbdkit.log");
    let nbd_sock = dir.path().join("nbd.sock");
    make_image(&image, 16 << 20, 28);
    let args = [
        "--filter=log",
        "file",
        &image.display().to_string(),
        &format!("logfile={}", log.display()),
    ];
    let _nbdkit = nbdkit(&nbd_sock, &args.map(String::from));
    let uri = format!("nbd+unix:///?socket={}", nbd_sock.display());
    for (i, cache, fua) in [(0u64, "writethrough", 1), (1, "directsync", 1), (2, "none", 0)] {
        let sock = dir.path().join(format!("{cache}.sock"));
        let mut daemon =
            Daemon::start(dir.path(), &[nbd_export(&sock, &uri, &format!(",cache={cache}"))]);
        let offset = i << 20;
        {
            let mut c = Client::connect(&sock, 1);
            assert_eq!(c.write_at(0, offset, &pattern(800 + i, offset, 65536), 0), 0, "{cache}");
        }
        assert!(daemon.stop().success());
        let text = fs::read_to_string(&log).unwrap();
        let write = format!("Write id=1 offset={offset:#x} count=0x10000 fua={fua}");
        assert!(text.contains(&write), "cache={cache}: no '{write}' in\n{text}");
    }
}

/// A server without FUA: a durable write is followed by a flush under its cookie, sent as
/// soon as the write is answered, also by a thread that sleeps between requests
/// (`poll=never`), and the write completes only after the flush.
#[test]
fn a_durable_write_to_a_server_without_fua_is_flushed_at_once() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let flushes = dir.path().join("flushes");
    let sock = dir.path().join("blk.sock");
    let nbd_sock = dir.path().join("nbd.sock");
    make_image(&image, 16 << 20, 27);
    // nbdkit's eval plugin, as a file server that has FLUSH but not FUA; each flush leaves a
    // line in `flushes`.
    let img = image.display();
    let args = [
        "eval".into(),
        format!("get_size=echo {}", 16 << 20),
        format!("pread=dd if={img} skip=$4 count=$3 iflag=count_bytes,skip_bytes"),
        format!("pwrite=dd of={img} seek=$4 conv=notrunc oflag=seek_bytes status=none"),
        format!("flush=echo flush >> {}", flushes.display()),
        "can_write=exit 0".into(),
        "can_flush=exit 0".into(),
        "can_fua=echo none".into(),
    ];
    let _nbdkit = nbdkit(&nbd_sock, &args);
    let uri = format!("nbd+unix:///?socket={}", nbd_sock.display());
    let export = nbd_export(&sock, &uri, ",cache=writethrough,poll=never");
    let mut daemon = Daemon::start(dir.path(), &[export]);
    {
        let mut c = Client::connect(&sock, 1);
        for (i, offset) in [0u64, 5 << 20].into_iter().enumerate() {
            let started = Instant::now();
            assert_eq!(c.write_at(0, offset, &pattern(700 + i as u64, offset, 65536), 0), 0);
            // A flush left unsent went out only at the thread's next wake-up, the request
            // tick 5 s later (the engine's unit test a_durable_write_in_parts_ends_with_a_
            // flush_sent_by_the_reap checks the send itself).
            let took = started.elapsed();
            assert!(took < Duration::from_secs(4), "write {i} took {took:?}\n{}", daemon.log());
            let lines = fs::read_to_string(&flushes).unwrap_or_default();
            assert_eq!(lines.lines().count(), i + 1, "flushes after write {i}");
        }
    }
    assert!(daemon.stop().success());
    let img = fs::read(&image).unwrap();
    assert!(img[..65536] == pattern(700, 0, 65536), "the first write in the image");
    assert!(img[5 << 20..(5 << 20) + 65536] == pattern(701, 5 << 20, 65536), "the second");
}

/// What cannot be served is refused at start, in one line, with nothing left behind.
#[test]
fn bad_nbd_exports_are_refused_at_start() {
    let dir = tmpdir();
    let d = dir.path();
    let sock = d.join("blk.sock");
    let image = d.join("disk.raw");
    make_image(&image, 1 << 20, 1);
    let nbd_sock = d.join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", nbd_sock.display());
    let out = serve_refused(&[nbd_export(&sock, &uri, "")]);
    assert_usage_error(
        &out,
        &format!("NBD server {uri}: cannot connect: No such file or directory"),
    );
    assert!(!sock.exists(), "a socket was left behind");
    // qemu-nbd read-only, one connection at a time, export named "disk".
    let qnbd = KillOnDrop(
        Command::new("qemu-nbd")
            .arg(format!("--socket={}", nbd_sock.display()))
            .args(["--format=raw", "-t", "--read-only", "--shared=1", "--export-name=disk"])
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("qemu-nbd listens", Duration::from_secs(10), || {
        UnixStream::connect(&nbd_sock).is_ok()
    });
    let named = |name: &str| format!("nbd+unix:///{name}?socket={}", nbd_sock.display());
    let out = serve_refused(&[nbd_export(&sock, &named("other"), ",readonly=on")]);
    assert_usage_error(&out, "handshake: export 'other': no such export");
    let out = serve_refused(&[nbd_export(&sock, &named("disk"), "")]);
    assert_usage_error(&out, "the export is read-only; serve it with readonly=on");
    let out = serve_refused(&[nbd_export(&sock, &named("disk"), ",readonly=on,queues=2")]);
    assert_usage_error(
        &out,
        "queues=2 needs a connection per queue, which the server does not allow",
    );
    drop(qnbd);
    // Bad specs.
    for (spec, want) in [
        ("image=nbd://host:0/x", "port '0' is not 1 to 65535"),
        ("image=nbd+unix:///x", "missing ?socket=PATH"),
        ("image=nbd://h/x,aio=native", "aio= chooses how an image file is read"),
        ("image=nbd://h/x,reconnect-delay=3601", "reconnect-delay=3601: at most 3600 seconds"),
        (
            &format!("image={},reconnect-delay=5", image.display()),
            "reconnect-delay= is for NBD exports",
        ),
    ] {
        let out = serve_refused(&[format!("socket={},{spec}", sock.display())]);
        assert_usage_error(&out, want);
    }
    // Not an NBD server at all.
    let listener = UnixListener::bind(d.join("http.sock")).unwrap();
    let talker = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let out = serve_refused(&[nbd_export(
        &sock,
        &format!("nbd+unix:///?socket={}", d.join("http.sock").display()),
        "",
    )]);
    assert_usage_error(&out, "not an NBD server");
    talker.join().unwrap();
}

// ---- A hostile server ------------------------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const CHUNK_MAGIC: u32 = 0x668e_33ef;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const DONE: u16 = 1;

/// Reads at these offsets get a lie; anything else gets the truth from `data`.
const OUT_OF_BOUNDS_AT: u64 = 1 << 20;
const ERROR_CHUNK_AT: u64 = 2 << 20;
const NO_DATA_AT: u64 = 3 << 20;
const HOLE_THEN_DATA_AT: u64 = 4 << 20;
const UNKNOWN_COOKIE_AT: u64 = 5 << 20;
const HUGE_CHUNK_AT: u64 = 6 << 20;
const OVERFLOWING_CHUNK_AT: u64 = 7 << 20;
const SIMPLE_WITH_BAD_MAGIC_AT: u64 = 8 << 20;
/// A hole chunk at an offset that wraps: for a read of 8192 bytes at 4096, a hole of 8192 at
/// 2^64 - 4096 (offset - read start + length wraps to 0, and its length is the read's).
const WRAPPING_HOLE_AT: u64 = 4096;
/// The first half's data chunk twice, and nothing for the second half (the byte count adds
/// up, the range does not).
const SAME_DATA_TWICE_AT: u64 = 9 << 20;
/// The right data in two chunks, the second half first (the protocol allows any order).
const HALVES_REVERSED_AT: u64 = 10 << 20;
/// A read taken and never answered (the server goes on answering others).
const NEVER_ANSWERED_AT: u64 = 11 << 20;

struct Hostile {
    socket: PathBuf,

    size: Arc<AtomicU64>,
    /// The minimum block the server sends in NBD_INFO_BLOCK_SIZE (0: it sends none), for
    /// the connections it takes from now on.
    min_block: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    /// Cleared: the server takes no new connection (see `stop_accepting`).
    accepting: Arc<AtomicBool>,
    listener_fd: RawFd,
    /// Connections of the test's own that fill the listen backlog.
    backlog: Mutex<Vec<UnixStream>>,
}

impl Hostile {
    fn start(dir: &Path, size: u64) -> Hostile {
        Self::start_with_min_block(dir, size, None)
    }

    /// With `min_block`, the server sends NBD_INFO_BLOCK_SIZE with it as the minimum.
    fn start_with_min_block(dir: &Path, size: u64, min_block: Option<u32>) -> Hostile {
        let socket = dir.join("hostile.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let size = Arc::new(AtomicU64::new(size));
        let min_block = Arc::new(AtomicU32::new(min_block.unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let accepting = Arc::new(AtomicBool::new(true));
        let listener_fd = listener.as_raw_fd();
        let data = Arc::new(Mutex::new(pattern(40, 0, 16 << 20)));
        let (s, st, n) = (Arc::clone(&size), Arc::clone(&stop), Arc::clone(&connections));
        let acc = Arc::clone(&accepting);
        let min = Arc::clone(&min_block);
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if !acc.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        n.fetch_add(1, Ordering::Relaxed);
                        let size = s.load(Ordering::Relaxed);
                        let min_block = Some(min.load(Ordering::Relaxed)).filter(|&m| m > 0);
                        let data = Arc::clone(&data);
                        std::thread::spawn(move || {
                            let _ = serve_hostile(conn, size, min_block, &data);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Hostile {
            socket,
            size,
            min_block,
            stop,
            connections,
            accepting,
            listener_fd,
            backlog: Mutex::new(Vec::new()),
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The server stops accepting and its listen backlog fills up: a connect to it can
    /// only wait (a blocking one, for ever).
    fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Relaxed);
        // The accept loop looks at the flag every 5 ms.
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: listen(2) again on our own listening socket sets its backlog to 0 (the
        // kernel then queues one connection at most).
        assert_eq!(unsafe { libc::listen(self.listener_fd, 0) }, 0);
        self.backlog.lock().unwrap().push(UnixStream::connect(&self.socket).unwrap());
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn chunk(
    s: &mut UnixStream,
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(20 + payload.len());
    m.extend_from_slice(&CHUNK_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m)
}

fn option_reply(s: &mut UnixStream, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

fn serve_hostile(
    mut s: UnixStream,
    size: u64,
    min_block: Option<u32>,
    data: &Mutex<Vec<u8>>,
) -> std::io::Result<()> {
    s.write_all(&NBDMAGIC.to_be_bytes())?;
    s.write_all(&IHAVEOPT.to_be_bytes())?;
    s.write_all(&3u16.to_be_bytes())?;
    let mut b4 = [0u8; 4];
    s.read_exact(&mut b4)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body)?;
        match option {
            8 => option_reply(&mut s, 8, 1, &[])?,
            7 => {
                let mut info = vec![0u8, 0];
                info.extend_from_slice(&size.to_be_bytes());
                // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN
                info.extend_from_slice(&(1u16 | 4 | 8 | 32 | 64 | 256).to_be_bytes());
                option_reply(&mut s, 7, 3, &info)?;
                if let Some(min) = min_block {
                    let mut blocks = 3u16.to_be_bytes().to_vec();
                    for n in [min, 4096, 32 << 20] {
                        blocks.extend_from_slice(&n.to_be_bytes());
                    }
                    option_reply(&mut s, 7, 3, &blocks)?;
                }
                option_reply(&mut s, 7, 1, &[])?;
                break;
            }
            o => option_reply(&mut s, o, (1 << 31) | 1, &[])?,
        }
    }
    loop {
        let mut r = [0u8; 28];
        s.read_exact(&mut r)?;
        let kind = u16::from_be_bytes([r[6], r[7]]);
        let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(r[24..28].try_into().unwrap()) as usize;
        let at = |o: u64| o.to_be_bytes().to_vec();
        match kind {
            0 => {
                let truth = {
                    let d = data.lock().unwrap();
                    d[offset as usize..offset as usize + len].to_vec()
                };
                match offset {
                    OUT_OF_BOUNDS_AT => {
                        let mut p = at(offset - 4096);
                        p.extend_from_slice(&truth);
                        chunk(&mut s, DONE, 1, cookie, &p)?;
                    }
                    ERROR_CHUNK_AT => {
                        let mut p = 28u32.to_be_bytes().to_vec();
                        p.extend_from_slice(&9u16.to_be_bytes());
                        p.extend_from_slice(b"disk full");
                        chunk(&mut s, DONE, (1 << 15) | 1, cookie, &p)?;
                    }
                    NO_DATA_AT => chunk(&mut s, DONE, 0, cookie, &[])?,
                    HOLE_THEN_DATA_AT => {
                        let half = len / 2;
                        let mut hole = at(offset);
                        hole.extend_from_slice(&(half as u32).to_be_bytes());
                        chunk(&mut s, 0, 2, cookie, &hole)?;
                        let mut p = at(offset + half as u64);
                        p.extend_from_slice(&truth[half..]);
                        chunk(&mut s, DONE, 1, cookie, &p)?;
                    }
                    UNKNOWN_COOKIE_AT => {
                        let mut p = at(offset);
                        p.extend_from_slice(&truth);
                        chunk(&mut s, DONE, 1, cookie + 1000, &p)?;
                    }
                    HUGE_CHUNK_AT => {
                        chunk(&mut s, DONE, (1 << 15) | 1, cookie, &vec![0u8; 1 << 20])?
                    }
                    OVERFLOWING_CHUNK_AT => {
                        let mut p = at(u64::MAX - 10);
                        p.extend_from_slice(&truth);
                        chunk(&mut s, DONE, 1, cookie, &p)?;
                    }
                    SIMPLE_WITH_BAD_MAGIC_AT => {
                        let mut m = (SIMPLE_MAGIC ^ 1).to_be_bytes().to_vec();
                        m.extend_from_slice(&[0u8; 12]);
                        s.write_all(&m)?;
                    }
                    WRAPPING_HOLE_AT => {
                        let mut hole = at(offset.wrapping_sub(len as u64));
                        hole.extend_from_slice(&(len as u32).to_be_bytes());
                        chunk(&mut s, DONE, 2, cookie, &hole)?;
                    }
                    SAME_DATA_TWICE_AT => {
                        let half = len / 2;
                        let mut p = at(offset);
                        p.extend_from_slice(&truth[..half]);
                        chunk(&mut s, 0, 1, cookie, &p)?;
                        chunk(&mut s, DONE, 1, cookie, &p)?;
                    }
                    HALVES_REVERSED_AT => {
                        let half = len / 2;
                        let mut p = at(offset + half as u64);
                        p.extend_from_slice(&truth[half..]);
                        chunk(&mut s, 0, 1, cookie, &p)?;
                        let mut p = at(offset);
                        p.extend_from_slice(&truth[..half]);
                        chunk(&mut s, DONE, 1, cookie, &p)?;
                    }
                    NEVER_ANSWERED_AT => {}
                    _ => {
                        let mut p = at(offset);
                        p.extend_from_slice(&truth);
                        chunk(&mut s, DONE, 1, cookie, &p)?;
                    }
                }
            }
            1 => {
                let mut payload = vec![0u8; len];
                s.read_exact(&mut payload)?;
                data.lock().unwrap()[offset as usize..offset as usize + len]
                    .copy_from_slice(&payload);
                let mut m = SIMPLE_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&[0u8; 4]);
                m.extend_from_slice(&cookie.to_be_bytes());
                s.write_all(&m)?;
            }
            2 => return Ok(()),
            _ => chunk(&mut s, DONE, 0, cookie, &[])?,
        }
    }
}

/// Every lie of the hostile server costs the request it answers (IOERR), or the connection
/// when the stream can no longer be followed (then a new one is made); the daemon never
/// crashes, and truthful replies go on being served.
#[test]
fn a_hostile_server_costs_only_its_requests() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let hostile = Hostile::start(dir.path(), 16 << 20);
    let mut daemon =
        Daemon::start(dir.path(), &[nbd_export(&sock, &hostile.uri(), ",reconnect-delay=1")]);
    let mut c = Client::connect(&sock, 1);
    let truth = |offset: u64| pattern(40, offset, 8192);
    assert!(c.read_at(0, 0, 8192, 0).unwrap() == truth(0), "an honest read");
    let connections = hostile.connections.load(Ordering::Relaxed);
    // A chunk outside the read, an error chunk, no data at all, an offset that overflows:
    // that request fails, the connection goes on.
    for at in [OUT_OF_BOUNDS_AT, ERROR_CHUNK_AT, NO_DATA_AT, OVERFLOWING_CHUNK_AT] {
        assert_eq!(c.read_at(0, at, 8192, 0), Err(EIO), "read at {at:#x}\n{}", daemon.log());
        assert!(c.read_at(0, at + 8192, 8192, 0).unwrap() == truth(at + 8192), "after {at:#x}");
    }
    assert_eq!(hostile.connections.load(Ordering::Relaxed), connections, "no connection was lost");
    // A hole then data: zeroes, then the data.
    let back = c.read_at(0, HOLE_THEN_DATA_AT, 8192, 0).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0), "the hole reads as zeroes");
    assert!(back[4096..] == truth(HOLE_THEN_DATA_AT)[4096..], "the data after the hole");
    // Unknown cookies, a chunk too large to be metadata, a broken magic: the stream is lost,
    // the connection is made again and the request sent again, which gets the same lie,
    // until the reconnect delay fails it.
    for at in [UNKNOWN_COOKIE_AT, HUGE_CHUNK_AT, SIMPLE_WITH_BAD_MAGIC_AT] {
        // Each lie breaks connection after connection until the delay: the export's limiter
        // of connection lines (10 per 5 s) is spent; the next lie's lines need a new window.
        std::thread::sleep(Duration::from_secs(5));
        let before = hostile.connections.load(Ordering::Relaxed);
        assert_eq!(c.read_at(0, at, 8192, 0), Err(EIO), "read at {at:#x}");
        assert!(hostile.connections.load(Ordering::Relaxed) > before, "reconnected for {at:#x}");
        wait_until("the export serves again", Duration::from_secs(10), || {
            c.read_at(0, 0, 8192, 0).is_ok_and(|b| b == truth(0))
        });
    }
    let data = pattern(41, 12 << 20, 8192);
    assert_eq!(c.write_at(0, 12 << 20, &data, 0), 0);
    assert!(c.read_at(0, 12 << 20, 8192, 0).unwrap() == data);
    // A server that comes back with another size is not taken back.
    std::thread::sleep(Duration::from_secs(5));
    hostile.size.store(32 << 20, Ordering::Relaxed);
    assert_eq!(c.read_at(0, UNKNOWN_COOKIE_AT, 8192, 0), Err(EIO));
    assert_eq!(c.read_at(0, 0, 8192, 0), Err(EIO), "a server of another size is refused");
    let log = daemon.log();
    for want in [
        "data chunk at 1044480+8192 outside the read 1048576+8192",
        "NBD server reports error 28 for a request at 2097152: disk full",
        "answered a read of 8192 bytes with 0",
        "a reply with unknown cookie",
        "a chunk of type 32769 with 1048576 bytes",
        "reply magic 0x67446699",
        "the export is now 33554432 bytes, was 16777216",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
    assert!(daemon.alive());
    assert!(daemon.stop().success());
}

/// A server that comes back with a minimum block larger than the guest's blocks is not taken
/// back: the guest's requests (and the parts of long ones) are made of them. One that comes
/// back with a minimum the guest's blocks still meet is (first none, so 1 and the guest's
/// 512; then 512), and so is the refused one once it is back as it was.
#[test]
fn a_server_back_with_a_minimum_block_above_the_guests_is_refused() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let hostile = Hostile::start(dir.path(), 16 << 20);
    let export = nbd_export(&sock, &hostile.uri(), ",reconnect-delay=1");
    let mut daemon = Daemon::start(dir.path(), &[export]);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.blkio.get_i32("request-alignment").unwrap(), 512);
    assert!(c.read_at(0, 0, 8192, 0).unwrap() == pattern(40, 0, 8192), "an honest read");
    // A reply with an unknown cookie breaks the connection; the next ones meet the new block.
    hostile.min_block.store(512, Ordering::Relaxed);
    let connections = hostile.connections.load(Ordering::Relaxed);
    assert_eq!(c.read_at(0, UNKNOWN_COOKIE_AT, 8192, 0), Err(EIO));
    wait_until("the export serves again", Duration::from_secs(10), || {
        c.read_at(0, 0, 8192, 0).is_ok_and(|b| b == pattern(40, 0, 8192))
    });
    assert!(hostile.connections.load(Ordering::Relaxed) > connections, "it reconnected");
    std::thread::sleep(Duration::from_secs(5)); // a new window of the connection lines
    hostile.min_block.store(4096, Ordering::Relaxed);
    assert_eq!(c.read_at(0, UNKNOWN_COOKIE_AT, 8192, 0), Err(EIO));
    let refused = "the export's minimum block is now 4096 bytes, above the guest's 512-byte blocks";
    wait_until("the refusal is logged", Duration::from_secs(10), || daemon.log().contains(refused));
    assert_eq!(c.read_at(0, 0, 8192, 0), Err(EIO), "a server of another block size is refused");
    hostile.min_block.store(0, Ordering::Relaxed);
    wait_until("the export serves again", Duration::from_secs(10), || {
        c.read_at(0, 0, 8192, 0).is_ok_and(|b| b == pattern(40, 0, 8192))
    });
    assert!(!daemon.log().contains("minimum block is now 512"), "{}", daemon.log());
    assert!(daemon.stop().success());
}

/// A server that says its export is not a whole number of sectors is refused at start.
#[test]
fn a_server_with_a_ragged_size_is_refused() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let hostile = Hostile::start(dir.path(), (16 << 20) + 100);
    let out = serve_refused(&[nbd_export(&sock, &hostile.uri(), "")]);
    assert_usage_error(&out, "the export's size 16777316 is not a non-zero multiple of 512");
}

/// A server whose smallest block is 4096 bytes: the guest's logical block is 4096, and asking
/// for 512-byte blocks is refused (read-modify-write is for files only).
#[test]
fn the_servers_minimum_block_is_the_guests_logical_block() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let hostile = Hostile::start_with_min_block(dir.path(), 16 << 20, Some(4096));
    let out = serve_refused(&[nbd_export(&sock, &hostile.uri(), ",logical-block-size=512")]);
    assert_usage_error(
        &out,
        "logical-block-size=512 is below the server's 4096-byte minimum block",
    );
    let _daemon = Daemon::start(dir.path(), &[nbd_export(&sock, &hostile.uri(), "")]);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.blkio.get_i32("request-alignment").unwrap(), 4096);
    assert!(c.read_at(0, 8192, 4096, 0).unwrap() == pattern(40, 8192, 4096));
}

/// A file export beside the attacked one: the victim, whose reads must go on being answered.
fn victim(dir: &Path) -> (PathBuf, String) {
    let image = dir.join("victim.raw");
    make_image(&image, 8 << 20, 77);
    let sock = dir.join("victim.sock");
    let spec = format!("id=victim,socket={},image={}", sock.display(), image.display());
    (sock, spec)
}

/// The victim answers a read with its image's bytes.
fn victim_reads(sock: &Path) {
    let mut c = Client::connect(sock, 1);
    assert!(c.read_at(0, 1 << 20, 65536, 0).unwrap() == pattern(77, 1 << 20, 65536), "victim");
}

/// A read completes OK only when the reply covered each of its bytes exactly once: a hole at
/// an offset that wraps, or one data chunk sent twice (the byte count adds up, the range does
/// not), fail it (IOERR) instead of leaving the guest's own stale bytes as the data. Honest
/// replies, also in chunks out of order, go on being served.
#[test]
fn a_reply_that_does_not_cover_the_read_exactly_once_fails_it() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let hostile = Hostile::start(dir.path(), 16 << 20);
    let (victim_sock, victim_spec) = victim(dir.path());
    let daemon = Daemon::start(dir.path(), &[nbd_export(&sock, &hostile.uri(), ""), victim_spec]);
    let mut fe = TestFrontend::connect(&sock, 1, 64, 0);
    let truth = |offset: u64| pattern(40, offset, 8192);
    for at in [WRAPPING_HOLE_AT, SAME_DATA_TWICE_AT] {
        let (done, data) = fe.request(0, T_IN, at / 512, &[], 8192);
        let stale = data.iter().filter(|&&b| b == 0xEE).count();
        assert_eq!(
            done.status,
            S_IOERR,
            "read at {at:#x}: status {}, {stale} of its 8192 bytes still the guest's stale 0xEE\n{}",
            done.status,
            daemon.log()
        );
        let (done, data) = fe.request(0, T_IN, 0, &[], 8192);
        assert_eq!((done.status, data == truth(0)), (S_OK, true), "an honest read after {at:#x}");
    }
    let (done, data) = fe.request(0, T_IN, HALVES_REVERSED_AT / 512, &[], 8192);
    assert_eq!(done.status, S_OK, "halves in reverse order\n{}", daemon.log());
    assert!(data == truth(HALVES_REVERSED_AT), "halves in reverse order: the data");
    let (done, data) = fe.request(0, T_IN, HOLE_THEN_DATA_AT / 512, &[], 8192);
    assert_eq!(done.status, S_OK);
    assert!(
        data[..4096].iter().all(|&b| b == 0) && data[4096..] == truth(HOLE_THEN_DATA_AT)[4096..]
    );
    victim_reads(&victim_sock);
    let log = daemon.log();
    for want in [
        "hole chunk at 18446744073709547520+8192 outside the read 4096+8192",
        "chunk at 9437184+4096 overlapping the reply's earlier chunks",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
}

/// A request the server takes and never answers (while it answers others) counts as a lost
/// connection once unanswered for 30 s: the connection is made again and the request sent
/// again, and after the reconnect delay without an answer it fails (IOERR). The export's
/// other requests and the export beside it are served throughout.
#[test]
fn a_request_the_server_never_answers_fails_after_the_request_timeout() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let hostile = Hostile::start(dir.path(), 16 << 20);
    let (victim_sock, victim_spec) = victim(dir.path());
    let uri = hostile.uri();
    let daemon =
        Daemon::start(dir.path(), &[nbd_export(&sock, &uri, ",reconnect-delay=1"), victim_spec]);
    let mut c = Client::connect(&sock, 1);
    let started = Instant::now();
    let buf = c.buf_ptr(1 << 20);
    c.queues[0].read(NEVER_ANSWERED_AT, buf, 4096, 9, ReqFlags::empty());
    c.queues[0].do_io(&mut [], 0, None, None).unwrap();
    // Meanwhile the same queue's other reads are answered, and the victim's.
    assert!(c.read_at(0, 0, 8192, 0).unwrap() == pattern(40, 0, 8192));
    victim_reads(&victim_sock);
    let done = c.completions(0, 1, Duration::from_secs(60));
    let waited = started.elapsed();
    assert_eq!(done, vec![(9, EIO)], "after {waited:?}\n{}", daemon.log());
    assert!(waited >= Duration::from_secs(30), "failed after {waited:?}, before the timeout");
    assert!(waited < Duration::from_secs(45), "failed only after {waited:?}");
    // New requests fail at once until a connection is made again, as after any delay.
    wait_until("the export serves again", Duration::from_secs(10), || {
        c.read_at(0, 0, 8192, 0).is_ok_and(|b| b == pattern(40, 0, 8192))
    });
    victim_reads(&victim_sock);
    let log = daemon.log();
    assert!(log.contains("lost the NBD connection (a request unanswered for 30 s)"), "{log}");
}

/// A daemon with a control socket, export `a` on a server (`hostile`) that answers all but
/// reads at `NEVER_ANSWERED_AT`, and the victim. Returns it, its control socket, a's socket
/// and the victim's.
fn beside_a_silent_server(d: &Path, hostile: &Hostile) -> (Daemon, PathBuf, PathBuf, PathBuf) {
    let (victim_sock, victim_spec) = victim(d);
    let control = d.join("ctl.sock");
    let a = d.join("a.sock");
    let args: Vec<String> = vec![
        "--control".into(),
        control.display().to_string(),
        "--export".into(),
        format!("id=a,{}", nbd_export(&a, &hostile.uri(), "")),
        "--export".into(),
        victim_spec,
    ];
    let daemon = Daemon::start_with(d, &args, &[a.clone(), victim_sock.clone()]);
    (daemon, control, a, victim_sock)
}

/// A client of `sock` with a read in flight that the server will never answer (tag 1).
fn read_never_answered(sock: &Path) -> Client {
    let mut c = Client::connect(sock, 1);
    // An answer first: the connection is healthy (no reconnect delay is counting).
    assert!(c.read_at(0, 0, 8192, 0).unwrap() == pattern(40, 0, 8192));
    let buf = c.buf_ptr(0);
    c.queues[0].read(NEVER_ANSWERED_AT, buf, 4096, 1, ReqFlags::empty());
    c.queues[0].do_io(&mut [], 0, None, None).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    c
}

/// `remove-export force=true` does not wait on a server that never answers: the request in
/// flight fails (IOERR) within the stop's wait, the removal returns, and the export beside
/// keeps serving.
#[test]
fn remove_export_force_never_waits_on_a_server_that_does_not_answer() {
    let dir = tmpdir();
    let hostile = Hostile::start(dir.path(), 16 << 20);
    let (daemon, control, a, victim_sock) = beside_a_silent_server(dir.path(), &hostile);
    let mut c = read_never_answered(&a);
    let started = Instant::now();
    let (send, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(common::ctl(&control, &["remove-export", "id=a", "force=true"]));
    });
    let out = answer.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
        panic!("remove-export force=true did not return within 20 s\n{}", daemon.log())
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(10), "removal took {:?}", started.elapsed());
    assert_eq!(c.completions(0, 1, Duration::from_secs(5)), vec![(1, EIO)]);
    victim_reads(&victim_sock);
    assert!(daemon.log().contains("left requests unanswered while the queue stopped"));
}

/// SIGTERM does not wait on a server that never answers: the daemon ends within 10 s.
#[test]
fn sigterm_never_waits_on_a_server_that_does_not_answer() {
    let dir = tmpdir();
    let hostile = Hostile::start(dir.path(), 16 << 20);
    let (mut daemon, _control, a, victim_sock) = beside_a_silent_server(dir.path(), &hostile);
    let _c = read_never_answered(&a);
    victim_reads(&victim_sock);
    let pid = daemon.pid();
    let started = Instant::now();
    common::signal(pid, libc::SIGTERM);
    while !proc_is_zombie(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGTERM did not end the daemon within 10 s\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(daemon.stop_after_signal().success(), "{}", daemon.log());
}

/// Whether process `pid` has ended and waits for its parent to reap it.
fn proc_is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// 2000 queue restarts (a SET_VRING_CALL each) while the server has stopped accepting (its
/// listen backlog full, where a blocking connect waits for ever): the export connects each
/// queue index with one thread at most, each attempt under a deadline and called off when
/// its queue goes, so the daemon's threads and descriptors stay bounded and return to where
/// they were when the frontend goes; the lines logged stay within the export's rate limit;
/// the export beside keeps serving.
#[test]
fn queue_restarts_against_a_server_that_stopped_accepting_pile_nothing_up() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let hostile = Hostile::start(dir.path(), 16 << 20);
    let (victim_sock, victim_spec) = victim(dir.path());
    let daemon = Daemon::start(dir.path(), &[nbd_export(&sock, &hostile.uri(), ""), victim_spec]);
    let pid = daemon.pid();
    let mut victim = Client::connect(&victim_sock, 1);
    let (threads, fds) = (thread_count(pid), fd_count(pid));
    let mut fe = TestFrontend::connect(&sock, 1, 64, 0);
    let (done, data) = fe.request(0, T_IN, 0, &[], 8192);
    assert_eq!((done.status, data == pattern(40, 0, 8192)), (S_OK, true));
    hostile.stop_accepting();
    let log_before = daemon.log().len();
    let started = Instant::now();
    let (mut most_threads, mut most_fds) = (0, 0);
    for i in 0..2000 {
        fe.fe.set_vring_call(0, &fe.queues[0].call).unwrap();
        if i % 100 == 99 {
            most_threads = most_threads.max(thread_count(pid));
            most_fds = most_fds.max(fd_count(pid));
            assert!(victim.read_at(0, 0, 4096, 0).unwrap() == pattern(77, 0, 4096), "victim");
        }
    }
    let storm = started.elapsed();
    eprintln!("2000 restarts in {storm:?}: threads {threads} before, {most_threads} at most; fds {fds} before, {most_fds} at most");
    // The connected queue's own, whatever the count of restarts: its slot's thread; the
    // connection's socket and its duplicates, kick, call, err, the engine's epoll, two timers,
    // eventfd, the wish's eventfd and the socket being connected.
    assert!(
        most_threads <= threads + 1 && most_fds <= fds + 24,
        "daemon threads {most_threads} (before: {threads}), fds {most_fds} (before: {fds}) \
         during 2000 restarts in {storm:?}\n{}",
        daemon.log().lines().filter(|l| l.contains("NBD")).take(20).collect::<Vec<_>>().join("\n")
    );
    assert!(victim.read_at(0, 1 << 20, 65536, 0).unwrap() == pattern(77, 1 << 20, 65536));
    fe.hang_up();
    wait_until("threads and fds as before", Duration::from_secs(10), || {
        thread_count(pid) == threads && fd_count(pid) == fds
    });
    // The export's limiter of connection lines: 10 per 5 s (a dropped count rides on the next).
    let log = daemon.log();
    let nbd_lines = log[log_before..].lines().filter(|l| l.contains("NBD")).count();
    let allowed = 10 * (storm.as_secs() as usize / 5 + 2);
    eprintln!("{nbd_lines} NBD lines logged (limit {allowed})");
    assert!(nbd_lines <= allowed, "{nbd_lines} NBD lines in {storm:?}, above {allowed}");
}

/// A queue with nothing in flight leaves its I/O thread asleep whatever its engine's
/// descriptors say: a connection handed over, a reconnect delay that ran out, a server that
/// closed the idle connection.
#[test]
fn an_idle_nbd_queue_leaves_its_thread_asleep() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let mut nbd =
        NbdServer::start(Server::QemuNbd, &disk_with(dir.path()), &dir.path().join("n.sock"));
    let daemon = Daemon::start(dir.path(), &[nbd_export(&sock, &nbd.uri(), ",reconnect-delay=1")]);
    let pid = daemon.pid();
    // Connected, no request ever: the connection is handed over, the delay runs out.
    let _fe = TestFrontend::connect(&sock, 1, 64, 0);
    std::thread::sleep(Duration::from_millis(1500));
    let busy = cpu_ticks_over(pid, Duration::from_secs(2));
    assert!(
        busy < 20,
        "the daemon used {busy} clock ticks (1/100 s) of CPU in 2 s with an idle queue"
    );
    // The server goes away under the idle connection (EOF on its socket).
    nbd.kill();
    std::thread::sleep(Duration::from_millis(500));
    let busy = cpu_ticks_over(pid, Duration::from_secs(2));
    assert!(
        busy < 20,
        "the daemon used {busy} clock ticks (1/100 s) of CPU in 2 s after the server went"
    );
}

fn disk_with(dir: &Path) -> PathBuf {
    let image = dir.join("disk.raw");
    make_image(&image, 16 << 20, 5);
    image
}

/// Clock ticks (1/100 s) of CPU process `pid` used over `window`.
fn cpu_ticks_over(pid: i32, window: Duration) -> u64 {
    let ticks = || {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        // utime and stime: fields 14 and 15 of stat, 11 and 12 after the ')' (0: the state).
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = ticks();
    std::thread::sleep(window);
    ticks() - before
}

/// A server that sends its greeting a byte a second (each byte within any per-read time
/// limit) is given one deadline for the whole attempt, over TCP as over a Unix socket: the
/// export is refused after 5 s, not after the greeting's 18 seconds and more.
#[test]
fn a_server_that_dribbles_its_handshake_has_one_deadline() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let unix = dir.path().join("dribble.sock");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let unix_listener = UnixListener::bind(&unix).unwrap();
    let greeting = [NBDMAGIC.to_be_bytes(), IHAVEOPT.to_be_bytes()].concat();
    let dribble = move |mut s: Box<dyn Write + Send>| {
        for b in greeting.iter().chain([0u8, 3].iter()) {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        std::thread::sleep(Duration::from_secs(30));
    };
    let d = dribble.clone();
    std::thread::spawn(move || {
        while let Ok((s, _)) = tcp.accept() {
            let d = d.clone();
            std::thread::spawn(move || d(Box::new(s)));
        }
    });
    std::thread::spawn(move || {
        while let Ok((s, _)) = unix_listener.accept() {
            let d = dribble.clone();
            std::thread::spawn(move || d(Box::new(s)));
        }
    });
    for uri in
        [format!("nbd://127.0.0.1:{port}/x"), format!("nbd+unix:///x?socket={}", unix.display())]
    {
        let started = Instant::now();
        let out = serve_refused(&[nbd_export(&sock, &uri, "")]);
        let took = started.elapsed();
        assert_usage_error(&out, &format!("NBD server {uri}: handshake: timed out"));
        assert!(took < Duration::from_secs(8), "{uri}: refused after {took:?}");
    }
}
