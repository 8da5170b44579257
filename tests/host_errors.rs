//! Errors from the host's side: a backing filesystem that fills up gives the guest IOERR for
//! the requests that hit it, is logged at a bounded rate, and the daemon and its other
//! exports keep serving; a filesystem that refuses fallocate ends write-zeroes with IOERR
//! instead of looping; a flush that failed once keeps failing (the kernel reports it once).

mod common;

use std::path::Path;
use std::process::Command;

use blkio::ReqFlags;
use blkplane::ControlClient;
use common::{make_image, pattern, tmpdir, Client, Daemon, Mount};

const EIO: i32 = -libc::EIO;

/// A 1 MiB tmpfs, mounted for the test.
fn small_tmpfs(at: &Path) -> Mount {
    Mount::new("tmpfs", Some("size=1m"), at).expect("mounting a 1 MiB tmpfs needs root")
}

fn full_filesystem(aio: &str) {
    let dir = tmpdir();
    let fs = small_tmpfs(&dir.path().join("small"));
    // A sparse 16 MiB image on a 1 MiB filesystem: writes fill it up.
    let full = fs.0.join("sparse.raw");
    std::fs::File::create(&full).unwrap().set_len(16 << 20).unwrap();
    let good = dir.path().join("good.raw");
    make_image(&good, 4 << 20, 8);
    let (sock_full, sock_good) = (dir.path().join("full.sock"), dir.path().join("good.sock"));
    let mut daemon = Daemon::start(
        dir.path(),
        &[
            format!("socket={},image={},aio={aio}", sock_full.display(), full.display()),
            format!("socket={},image={}", sock_good.display(), good.display()),
        ],
    );
    let mut c = Client::connect(&sock_full, 1);
    let chunk = 64 << 10;
    let mut written = Vec::new();
    let mut failures = 0;
    for i in 0..64u64 {
        let data = pattern(i, i * chunk as u64, chunk);
        match c.write_at(0, i * chunk as u64, &data, 0) {
            0 => written.push((i, data)),
            EIO => failures += 1,
            other => panic!("write {i}: unexpected result {other}"),
        }
    }
    assert!(failures > 0, "a 4 MiB write to a 1 MiB filesystem never failed");
    assert!(!written.is_empty(), "nothing fit");
    // What was acknowledged is there; the daemon and both exports still serve.
    for (i, data) in &written {
        assert!(c.read_at(0, i * chunk as u64, chunk, 1 << 20).unwrap() == *data, "chunk {i}");
    }
    assert!(
        c.read_at(0, 15 << 20, 4096, 0).unwrap() == vec![0u8; 4096],
        "unwritten space reads zeroes"
    );
    let mut g = Client::connect(&sock_good, 1);
    assert!(g.read_at(0, 0, 4096, 0).unwrap() == pattern(8, 0, 4096));
    assert_eq!(g.write_at(0, 0, &[1u8; 4096], 0), 0);
    assert!(daemon.alive());
    let log = daemon.log();
    let lines = log.lines().filter(|l| l.contains("No space left on device")).count();
    assert!(lines >= 1, "the failure was not logged:\n{log}");
    assert!(lines <= 10, "{lines} log lines for {failures} failures: not rate limited");
    drop(c);
    drop(g);
    assert!(daemon.stop().success());
}

#[test]
fn a_full_filesystem_fails_writes_with_ioerr_and_the_daemon_serves_on() {
    full_filesystem("io_uring");
}

#[test]
fn a_full_filesystem_fails_writes_with_ioerr_with_native_aio() {
    full_filesystem("native");
}

#[test]
fn a_full_filesystem_fails_writes_with_ioerr_with_threads() {
    full_filesystem("threads");
}

fn write_zeroes_on_a_filesystem_without_fallocate(aio: &str) {
    let dir = tmpdir();
    // ramfs refuses both FALLOC_FL_ZERO_RANGE and FALLOC_FL_PUNCH_HOLE, as vfat, NFS and
    // many FUSE filesystems do.
    let fs = Mount::new("ramfs", None, &dir.path().join("ramfs")).unwrap();
    let image = fs.0.join("disk.raw");
    make_image(&image, 4 << 20, 3);
    let sock = dir.path().join("fat.sock");
    let spec =
        format!("socket={},image={},aio={aio},cache=writeback", sock.display(), image.display());
    let mut daemon = Daemon::start(dir.path(), &[spec]);
    let mut c = Client::connect(&sock, 1);
    // ZERO_RANGE refused, then PUNCH_HOLE refused: IOERR, once each, at once.
    for (what, flags) in [
        ("write-zeroes", ReqFlags::NO_UNMAP),
        ("again", ReqFlags::NO_UNMAP),
        ("unmap", ReqFlags::empty()),
    ] {
        assert_eq!(c.write_zeroes(0, 65536, 65536, flags), EIO, "{what}");
    }
    // Nothing was zeroed; the queue serves on.
    assert!(c.read_at(0, 65536, 65536, 0).unwrap() == pattern(3, 65536, 65536));
    assert_eq!(c.write_at(0, 0, &[7u8; 4096], 0), 0);
    drop(c);
    assert!(daemon.stop().success(), "{}", daemon.log());
}

#[test]
fn write_zeroes_ends_with_ioerr_when_the_filesystem_refuses_fallocate() {
    write_zeroes_on_a_filesystem_without_fallocate("io_uring");
    write_zeroes_on_a_filesystem_without_fallocate("threads");
    write_zeroes_on_a_filesystem_without_fallocate("native");
}

/// A loop device over a sparse file on a full tmpfs: writes land in the page cache, and
/// fail only when they are written back (at fdatasync).
struct FailingDevice {
    dev: String,
    _fs: Mount,
}

impl FailingDevice {
    fn new(dir: &Path) -> FailingDevice {
        let fs = small_tmpfs(&dir.join("small"));
        let backing = fs.0.join("sparse.raw");
        std::fs::File::create(&backing).unwrap().set_len(16 << 20).unwrap();
        let out =
            Command::new("losetup").args(["--find", "--show"]).arg(&backing).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        FailingDevice { dev, _fs: fs }
    }
}

impl Drop for FailingDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn a_failed_flush_fails_every_later_flush_until_the_export_is_reopened() {
    let dir = tmpdir();
    let device = FailingDevice::new(dir.path());
    let sock = dir.path().join("dev.sock");
    let ctl = dir.path().join("ctl.sock");
    let spec = format!("id=dev,socket={},image={},cache=writeback", sock.display(), device.dev);
    let args =
        ["--control".to_string(), ctl.display().to_string(), "--export".into(), spec.clone()];
    let mut daemon = Daemon::start_with(dir.path(), &args, std::slice::from_ref(&sock));
    let mut c = Client::connect(&sock, 1);
    for i in 0..64u64 {
        assert_eq!(c.write_at(0, i << 16, &pattern(i, 0, 65536), 0), 0, "write {i} (page cache)");
    }
    assert_eq!(c.flush(0), EIO, "the write-back failed");
    // The kernel has reported the error once; the daemon keeps reporting it.
    assert_eq!(c.flush(0), EIO, "a second flush succeeded after lost writes");
    assert_eq!(c.write_at(0, 0, &[1u8; 4096], 0), 0);
    assert_eq!(c.flush(0), EIO, "a third flush");
    let mut control = ControlClient::connect(&ctl).unwrap();
    let stats = control.call("query-stats", serde_json::json!({"id": "dev"})).unwrap();
    let export = &stats["result"][0];
    assert_eq!(export["flush_failed"], true, "{stats}");
    assert!(export["queues"][0]["flush_errors"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(daemon.log().matches("flush failed: ").count(), 1, "logged once:\n{}", daemon.log());
    // Reopened (removed and added again), the export flushes what it has from then on.
    drop(c);
    let r = control.call("remove-export", serde_json::json!({"id": "dev", "force": true})).unwrap();
    assert!(r.get("error").is_none(), "{r}");
    let add = serde_json::json!({"id": "dev", "socket": sock.display().to_string(), "image": device.dev, "cache": "writeback"});
    let r = control.call("add-export", add).unwrap();
    assert!(r.get("error").is_none(), "{r}");
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.flush(0), 0, "a reopened export forgets the old error");
    drop(c);
    assert!(daemon.stop().success());
}
