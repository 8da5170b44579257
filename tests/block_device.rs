//! A host block device as the backing: a loop device over a file. Its size comes from the
//! device, data goes through to the file, discard and write-zeroes work, and the daemon
//! refuses to grow it beyond itself. With O_DIRECT, guest buffers the device cannot take
//! (odd addresses, odd segment lengths) go through bounce buffers, and are counted.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use blkplane::ControlClient;
use common::{make_image, pattern, tmpdir, Client, Daemon};

/// A loop device, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        Self::attach_with(file, &[])
    }

    fn attach_with(file: &std::path::Path, options: &[&str]) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .args(options)
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup needs root and /dev/loop-control: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn serve_loop_device(aio: &str) {
    let dir = tmpdir();
    let file = dir.path().join("backing.raw");
    make_image(&file, 16 << 20, 21);
    let dev = Loop::attach(&file);
    let sock = dir.path().join("blk.sock");
    let mut daemon = Daemon::start(
        dir.path(),
        &[format!("socket={},image={},aio={aio}", sock.display(), dev.0.display())],
    );
    {
        let mut c = Client::connect(&sock, 1);
        assert_eq!(c.capacity(), 16 << 20, "size from BLKGETSIZE64");
        assert!(c.read_at(0, 4096, 4096, 0).unwrap() == pattern(21, 4096, 4096));
        let data = pattern(99, 1 << 20, 65536);
        assert_eq!(c.write_at(0, 1 << 20, &data, 0), 0);
        assert_eq!(c.flush(0), 0);
        assert!(c.read_at(0, 1 << 20, 65536, 1 << 20).unwrap() == data);
        assert_eq!(
            c.write_zeroes(0, 4 << 20, 1 << 20, ReqFlags::NO_UNMAP),
            0,
            "write-zeroes on a block device"
        );
        assert!(c.read_at(0, 4 << 20, 1 << 20, 0).unwrap() == vec![0u8; 1 << 20]);
        assert_eq!(
            c.read_at(0, 16 << 20, 4096, 0),
            Err(-libc::EIO),
            "the device's end is the disk's end"
        );
    }
    assert!(daemon.stop().success());
    drop(dev);
    let img = std::fs::read(&file).unwrap();
    assert_eq!(
        img[1 << 20..(1 << 20) + 65536],
        pattern(99, 1 << 20, 65536)[..],
        "the write reached the file"
    );
    assert!(img[4 << 20..5 << 20].iter().all(|&b| b == 0));
}

#[test]
fn a_loop_device_is_served_with_io_uring() {
    serve_loop_device("io_uring");
}

#[test]
fn a_loop_device_is_served_with_native_aio() {
    serve_loop_device("native");
}

#[test]
fn a_loop_device_is_served_with_threads() {
    serve_loop_device("threads");
}

/// A loop device with 4096-byte sectors and direct I/O over a patterned file on ext4, so that
/// O_DIRECT reaches a filesystem that enforces alignment too (tmpfs takes anything).
struct FourKDevice {
    // Declared first, so detached before the directory holding its file goes.
    dev: Loop,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl FourKDevice {
    fn new(bytes: u64, seed: u64) -> FourKDevice {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = dir.path().join("backing.raw");
        make_image(&file, bytes, seed);
        let dev = Loop::attach_with(&file, &["--sector-size", "4096", "--direct-io=on"]);
        FourKDevice { dev, file, _dir: dir }
    }

    /// Detaches the device and returns the file's bytes.
    fn contents(self) -> Vec<u8> {
        drop(self.dev);
        std::fs::read(&self.file).unwrap()
    }
}

/// Starts a daemon serving `export` with a control socket; returns it and the control path.
fn start_with_control(dir: &Path, sock: &Path, export: String) -> (Daemon, PathBuf) {
    let control = dir.join("ctl.sock");
    let args = ["--control".into(), control.display().to_string(), "--export".into(), export];
    let daemon = Daemon::start_with(dir, &args, &[sock.to_path_buf(), control.clone()]);
    (daemon, control)
}

/// The bounce-buffer counter of every queue of the daemon's only export, summed.
fn bounce_count(control: &Path) -> u64 {
    let mut ctl = ControlClient::connect(control).expect("control socket");
    let reply = ctl.call("query-stats", serde_json::json!({})).unwrap();
    let queues = reply["result"][0]["queues"].as_array().unwrap_or_else(|| panic!("{reply}"));
    queues.iter().map(|q| q["bounce_buffers"].as_u64().unwrap()).sum()
}

/// Guest buffers at odd addresses and with odd segment lengths, to and from a 4096-byte-sector
/// loop device opened with O_DIRECT (which refuses such buffers with EINVAL): every such read
/// and write is served through a bounce buffer and counted; aligned ones are not. Then more
/// bounced bytes in flight at once than a queue's bounce budget (64 MiB), which makes later
/// requests wait for earlier ones. The file behind the device is checked byte for byte.
fn misaligned_buffers_bounce(aio: &str) {
    let dir = tmpdir();
    const DISK: u64 = 32 << 20;
    let device = FourKDevice::new(DISK, 5);
    let sock = dir.path().join("blk.sock");
    let export =
        format!("socket={},image={},aio={aio},cache=none", sock.display(), device.dev.0.display());
    let (mut daemon, control) = start_with_control(dir.path(), &sock, export);
    let mut expected = pattern(5, 0, DISK as usize);
    {
        let mut c = Client::connect(&sock, 1);
        assert_eq!(
            c.blkio.get_i32("request-alignment").ok(),
            Some(4096),
            "the guest sees 4K blocks"
        );

        // One write from two segments: 1000 bytes at an odd address, 7192 at another.
        let offset = 4096u64;
        let data = pattern(61, offset, 8192);
        let segs = [(1usize, 1000usize), ((1 << 20) + 3, 7192)];
        let mut iovs = Vec::new();
        let mut at = 0;
        for &(buf_at, len) in &segs {
            c.buf_slice(buf_at, len).copy_from_slice(&data[at..at + len]);
            iovs.push(libc::iovec { iov_base: c.buf_ptr(buf_at).cast(), iov_len: len });
            at += len;
        }
        c.queues[0].writev(offset, iovs.as_ptr(), 2, 0, ReqFlags::empty());
        assert_eq!(c.wait_one(0), 0, "misaligned writev");
        expected[offset as usize..offset as usize + 8192].copy_from_slice(&data);
        assert_eq!(bounce_count(&control), 1, "one bounced write");

        // Read it back into three segments at other odd places.
        let segs = [((2 << 20) + 5, 100usize), ((3 << 20) + 7, 4000), ((4 << 20) + 1, 4092)];
        let iovs: Vec<libc::iovec> = segs
            .iter()
            .map(|&(buf_at, len)| {
                c.buf_slice(buf_at, len).fill(0xEE);
                libc::iovec { iov_base: c.buf_ptr(buf_at).cast(), iov_len: len }
            })
            .collect();
        c.queues[0].readv(offset, iovs.as_ptr(), 3, 0, ReqFlags::empty());
        assert_eq!(c.wait_one(0), 0, "misaligned readv");
        let mut back = Vec::new();
        for &(buf_at, len) in &segs {
            back.extend_from_slice(c.buf_slice(buf_at, len));
        }
        assert!(back == data, "bounced read returned other bytes");
        assert_eq!(bounce_count(&control), 2, "and one bounced read");

        // Aligned buffers go straight through.
        assert!(c.read_at(0, 8 << 20, 65536, 0).unwrap() == pattern(5, 8 << 20, 65536));
        assert_eq!(bounce_count(&control), 2, "an aligned read is not bounced");

        // 12 writes of 8 MiB - 4 KiB from an address 4 bytes into the buffer: 96 MiB of bounce
        // buffers wanted at once. Each is split into segments of at most size_max (1 MiB), as
        // the device asks (a longer segment gets IOERR: see tests/isolation.rs).
        let len = (8 << 20) - 4096;
        let big = pattern(62, 0, len);
        c.buf_slice(4, len).copy_from_slice(&big);
        const WRITES: u64 = 12;
        assert_eq!(c.max_segment_bytes, 1 << 20, "libblkio reads size_max from the config space");
        let segments = c.segments(4, len);
        for i in 0..WRITES {
            let at = (i % 3) * (8 << 20);
            let n = segments.len() as u32;
            c.queues[0].writev(at, segments.as_ptr(), n, 0, ReqFlags::empty());
        }
        for _ in 0..WRITES {
            assert_eq!(c.wait_one(0), 0, "big bounced write");
        }
        for i in 0..3usize {
            expected[i * (8 << 20)..i * (8 << 20) + len].copy_from_slice(&big);
        }
        assert_eq!(bounce_count(&control), 2 + WRITES);
        assert_eq!(c.flush(0), 0);
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(
        device.contents() == expected,
        "the file behind the device differs from what was written"
    );
}

#[test]
fn misaligned_buffers_bounce_with_io_uring() {
    misaligned_buffers_bounce("io_uring");
}

#[test]
fn misaligned_buffers_bounce_with_native_aio() {
    misaligned_buffers_bounce("native");
}

#[test]
fn misaligned_buffers_bounce_with_threads() {
    misaligned_buffers_bounce("threads");
}

/// 512-byte sectors for the guest on a device with 4096-byte sectors opened with O_DIRECT
/// (`logical-block-size=512`): reads and writes off the 4K blocks go through bounce buffers,
/// writes by read-modify-write; 16 writes to neighbouring 512-byte sectors of the same 4K
/// blocks, in flight together, all land. With two queues the export is refused: another
/// queue's write could land between a read-modify-write's read and its write.
fn emulated_512_byte_sectors(aio: &str) {
    let dir = tmpdir();
    const DISK: u64 = 16 << 20;
    let device = FourKDevice::new(DISK, 8);
    let spec = |sock: &Path, extra: &str| {
        format!(
            "socket={},image={},aio={aio},cache=none,logical-block-size=512{extra}",
            sock.display(),
            device.dev.0.display()
        )
    };

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_blkplane"))
        .args(["serve", "--export", &spec(&dir.path().join("two.sock"), ",queues=2")])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("logical-block-size=512 is below the 4096 bytes its O_DIRECT I/O needs")
            && stderr.contains("queues=1"),
        "{stderr}"
    );
    assert!(!dir.path().join("two.sock").exists());

    let sock = dir.path().join("blk.sock");
    let (mut daemon, control) = start_with_control(dir.path(), &sock, spec(&sock, ""));
    let mut expected = pattern(8, 0, DISK as usize);
    {
        let mut c = Client::connect(&sock, 1);
        assert_eq!(c.blkio.get_i32("request-alignment").ok(), Some(512));
        // (offset, length): inside one block, across two, across three from mid-block, and
        // one on the blocks (not bounced).
        let writes: [(u64, usize); 4] =
            [(512, 512), (3584, 1536), (8192 + 1024, 8192 + 512), (65536, 4096)];
        for (i, &(offset, len)) in writes.iter().enumerate() {
            let data = pattern(70 + i as u64, offset, len);
            assert_eq!(c.write_at(0, offset, &data, 0), 0, "write {len} at {offset}");
            expected[offset as usize..offset as usize + len].copy_from_slice(&data);
        }
        assert_eq!(bounce_count(&control), 3, "three writes off the 4K blocks");
        for &(offset, len) in &writes {
            let back = c.read_at(0, offset, len, 1 << 20).unwrap();
            assert!(
                back == expected[offset as usize..offset as usize + len],
                "read {len} at {offset}"
            );
        }
        assert_eq!(bounce_count(&control), 6, "and three reads");
        // Untouched sectors next to the written ones kept their bytes.
        assert!(c.read_at(0, 0, 512, 0).unwrap() == expected[..512]);
        assert!(c.read_at(0, 1024, 2560, 0).unwrap() == expected[1024..3584]);

        // Sixteen 512-byte writes into two 4K blocks, all in flight at once.
        let base = 1u64 << 20;
        for k in 0..16u64 {
            let data = pattern(200 + k, base + 512 * k, 512);
            c.buf_slice(512 * k as usize, 512).copy_from_slice(&data);
            expected[(base + 512 * k) as usize..(base + 512 * (k + 1)) as usize]
                .copy_from_slice(&data);
        }
        for k in 0..16u64 {
            let src = c.buf_ptr(512 * k as usize);
            c.queues[0].write(base + 512 * k, src, 512, 0, ReqFlags::empty());
        }
        for _ in 0..16 {
            assert_eq!(c.wait_one(0), 0, "neighbouring sub-block write");
        }
        let back = c.read_at(0, base, 8192, 1 << 20).unwrap();
        assert!(
            back == expected[base as usize..base as usize + 8192],
            "a neighbour's write was lost"
        );
        assert_eq!(c.flush(0), 0);
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(device.contents() == expected, "the file differs from what was written");
}

#[test]
fn emulated_512_byte_sectors_with_io_uring() {
    emulated_512_byte_sectors("io_uring");
}

#[test]
fn emulated_512_byte_sectors_with_native_aio() {
    emulated_512_byte_sectors("native");
}

#[test]
fn emulated_512_byte_sectors_with_threads() {
    emulated_512_byte_sectors("threads");
}
