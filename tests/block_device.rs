//! A host block device as the backing: a loop device over a file. Its size comes from the
//! device, data goes through to the file, discard and write-zeroes work, and the daemon
//! refuses to grow it beyond itself.

mod common;

use std::path::PathBuf;
use std::process::Command;

use blkio::ReqFlags;
use common::{make_image, pattern, tmpdir, Client, Daemon};

/// A loop device, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        let out =
            Command::new("losetup").args(["-f", "--show"]).arg(file).output().expect("losetup");
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
