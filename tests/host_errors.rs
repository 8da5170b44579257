//! Errors from the host's side: a backing filesystem that fills up gives the guest IOERR for
//! the requests that hit it, is logged at a bounded rate, and the daemon and its other
//! exports keep serving.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{make_image, pattern, tmpdir, Client, Daemon};

const EIO: i32 = -libc::EIO;

/// A 1 MiB tmpfs mounted for the test, unmounted when dropped.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(at: &Path) -> SmallTmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "blkplane-test"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a 1 MiB tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallTmpfs(at.to_path_buf())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn full_filesystem(aio: &str) {
    let dir = tmpdir();
    let fs = SmallTmpfs::mount(&dir.path().join("small"));
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
