//! The RBD engine against the test command's Ceph cluster (one monitor, one manager, one
//! in-memory OSD; scripts/ceph-cluster): what cannot be served is refused at start, a
//! snapshot is read-only, resize resizes the image, and an OSD stopped under I/O gives errors
//! or waits as configured, and the export serves again once it is back. (The client suite
//! runs behind RBD too: tests/client.rs `behind_rbd`; and the durability and guest tests.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::ceph::{ceph_conf, rbd, TestImage};
use common::{
    assert_usage_error, make_image, pattern, serve_refused, tmpdir, wait_until, Client, Daemon,
};

const EIO: i32 = -libc::EIO;

/// Tests that stop the cluster's only OSD take this for writing; the others for reading.
static OSD: RwLock<()> = RwLock::new(());

#[test]
fn bad_rbd_exports_are_refused_at_start() {
    let _shared = OSD.read().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let conf = ceph_conf();
    let image = TestImage::create(1 << 20);
    let spec = |keys: &str| format!("socket={},{keys}", sock.display());
    let c = conf.display();
    for (keys, want) in [
        (
            format!("image=rbd:nopool/x:conf={c}"),
            "RBD nopool/x: pool 'nopool' does not exist".to_string(),
        ),
        (
            format!("image=rbd:rbd/nope:conf={c}"),
            "RBD rbd/nope: image 'nope' does not exist in pool 'rbd'".into(),
        ),
        (
            format!("pool=rbd,rbd-image={}@nosnap,ceph-conf={c}", image.name),
            format!("image '{}' or its snapshot 'nosnap' does not exist in pool 'rbd'", image.name),
        ),
        (
            "image=rbd:rbd/x:conf=/nonexistent.conf".into(),
            "Ceph configuration /nonexistent.conf does not exist".into(),
        ),
        (
            "image=rbd:disk".into(),
            "rbd:disk: expected rbd:POOL/IMAGE[@SNAPSHOT][:conf=PATH][:id=USER]".into(),
        ),
        ("pool=rbd".into(), "pool= needs rbd-image=IMAGE".into()),
        (
            "image=/x.raw,ceph-user=admin".into(),
            "ceph-conf=, ceph-user= and ceph-op-timeout= are for RBD images".into(),
        ),
        (
            "pool=rbd,rbd-image=x,ceph-op-timeout=9999".into(),
            "ceph-op-timeout=9999: at most 3600 seconds".into(),
        ),
        (
            "pool=rbd,rbd-image=x@s,readonly=off".into(),
            "rbd/x@s: a snapshot is served read-only".into(),
        ),
        ("image=rbd:rbd/x,aio=native".into(), "aio= chooses how an image file is read".into()),
    ] {
        let out = serve_refused(&[spec(&keys)]);
        assert_usage_error(&out, &want);
        assert!(!sock.exists(), "a socket was left behind by {keys}");
    }
    // A monitor that is not there: refused within the mount timeout, not Ceph's 5 minutes.
    let dead = dir.path().join("dead.conf");
    std::fs::write(&dead, "[global]\nmon host = v1:127.0.0.1:9\nauth client required = none\n")
        .unwrap();
    let started = Instant::now();
    let out = serve_refused(&[spec(&format!("image=rbd:rbd/x:conf={}", dead.display()))]);
    assert_usage_error(&out, "cannot connect to the Ceph cluster as client.admin");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}

/// `rbd:POOL/IMAGE@SNAP` serves the snapshot, read-only, whatever the image holds now.
#[test]
fn a_snapshot_is_served_read_only() {
    let _shared = OSD.read().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir();
    let file = dir.path().join("disk.raw");
    make_image(&file, 8 << 20, 31);
    let image = TestImage::import(&file);
    rbd(&["snap", "create", &format!("rbd/{}@before", image.name)]);
    // The image moves on after the snapshot: rbd bench writes all of it.
    let head = format!("rbd/{}", image.name);
    rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "64K",
        "--io-total",
        "8M",
        "--io-pattern",
        "seq",
        &head,
    ]);
    image.export_to(&file);
    assert!(
        std::fs::read(&file).unwrap()[..65536] != pattern(31, 0, 65536)[..],
        "the head changed"
    );
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let spec = format!("id=snap,socket={},{}", sock.display(), image.snapshot_keys("before"));
    let _daemon = Daemon::start_with(
        dir.path(),
        &["--control".into(), ctl.display().to_string(), "--export".into(), spec],
        std::slice::from_ref(&sock),
    );
    let err = Client::try_connect(&sock, 1, false).err().expect("read-write start refused");
    assert_eq!(err.errno().raw_os_error(), libc::EROFS, "{err}");
    let mut c = Client::try_connect(&sock, 1, true).expect("read-only client");
    assert_eq!(c.capacity(), 8 << 20);
    for offset in [0u64, 4096, 5 << 20] {
        assert!(
            c.read_at(0, offset, 65536, 0).unwrap() == pattern(31, offset, 65536),
            "at {offset}"
        );
    }
    let out = common::ctl(&ctl, &["list-exports"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains(&format!("\"rbd-image\": \"{}@before\"", image.name)), "{listed}");
    assert!(listed.contains("\"readonly\": true"), "{listed}");
}

fn image_size(name: &str) -> u64 {
    let info: serde_json::Value =
        serde_json::from_str(&rbd(&["info", "--format", "json", &format!("rbd/{name}")])).unwrap();
    info["size"].as_u64().unwrap()
}

/// `resize` on the control socket resizes the RBD image itself, up and down.
#[test]
fn resize_resizes_the_image() {
    let _shared = OSD.read().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir();
    let image = TestImage::create(16 << 20);
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let _daemon = Daemon::start_with(
        dir.path(),
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--export".into(),
            format!("id=r,socket={},{}", sock.display(), image.keys()),
        ],
        std::slice::from_ref(&sock),
    );
    let resize =
        |bytes: u64| common::ctl(&ctl, &["resize", "id=r", &format!("size={bytes}"), "shrink=on"]);
    let mut c = Client::connect(&sock, 1);
    let data = pattern(50, 0, 65536);
    assert_eq!(c.write_at(0, 0, &data, 0), 0);
    assert!(resize(32 << 20).status.success());
    assert_eq!(image_size(&image.name), 32 << 20);
    assert_eq!(c.write_at(0, 30 << 20, &data, 0), 0, "a write in the new room");
    assert!(resize(8 << 20).status.success());
    assert_eq!(image_size(&image.name), 8 << 20);
    assert!(c.read_at(0, 0, 65536, 0).unwrap() == data, "data below the new end");
    let out = resize(1000);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
}

fn cluster_script(command: &str) {
    let dir: PathBuf = ceph_conf().parent().unwrap().to_path_buf();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster");
    let out = Command::new(script).arg(command).arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "ceph-cluster {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the OSD again (also when the test failed) and waits until the pool serves.
struct OsdDown;

impl OsdDown {
    fn stop() -> OsdDown {
        cluster_script("osd-stop");
        OsdDown
    }
}

impl Drop for OsdDown {
    fn drop(&mut self) {
        cluster_script("osd-start");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let last = match common::ceph::ceph_try(&["pg", "stat"]) {
                Ok(stat) if stat.contains(" 9 active+clean") => break,
                Ok(stat) => stat,
                Err(e) => e,
            };
            assert!(Instant::now() < deadline, "the cluster never became clean again: {last}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// With `ceph-op-timeout`, requests to a stopped OSD fail (IOERR) after the timeout; once the
/// OSD is back, the export serves again, with its data.
#[test]
fn an_osd_outage_fails_requests_after_the_op_timeout_then_the_export_recovers() {
    let _alone = OSD.write().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir();
    let image = TestImage::create(16 << 20);
    let sock = dir.path().join("blk.sock");
    let daemon = Daemon::start(
        dir.path(),
        &[format!("socket={},{},ceph-op-timeout=3", sock.display(), image.keys())],
    );
    let mut c = Client::connect(&sock, 1);
    let data = pattern(60, 0, 65536);
    assert_eq!(c.write_at(0, 0, &data, 0), 0);
    {
        let _down = OsdDown::stop();
        let started = Instant::now();
        assert_eq!(c.read_at(0, 1 << 20, 4096, 0), Err(EIO), "{}", daemon.log());
        assert_eq!(c.write_at(0, 2 << 20, &data, 0), EIO);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(5), "failed after {waited:?}, before the timeouts");
    }
    wait_until("the export serves again", Duration::from_secs(60), || {
        c.read_at(0, 0, 65536, 0).is_ok_and(|b| b == data)
    });
    assert_eq!(c.write_at(0, 2 << 20, &data, 0), 0);
    assert_eq!(c.flush(0), 0, "a flush after the outage");
}

/// Without a timeout (the default), requests wait for a stopped OSD and complete when it is
/// back.
#[test]
fn without_a_timeout_requests_wait_for_a_stopped_osd() {
    let _alone = OSD.write().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir();
    let file = dir.path().join("disk.raw");
    make_image(&file, 16 << 20, 61);
    let image = TestImage::import(&file);
    let sock = dir.path().join("blk.sock");
    let _daemon =
        Daemon::start(dir.path(), &[format!("socket={},{}", sock.display(), image.keys())]);
    let mut c = Client::connect(&sock, 1);
    assert!(c.read_at(0, 0, 4096, 0).unwrap() == pattern(61, 0, 4096));
    let data = pattern(62, 4 << 20, 65536);
    c.buf_slice(1 << 20, 65536).copy_from_slice(&data);
    let down = OsdDown::stop();
    let (read_buf, write_buf) = (c.buf_ptr(0), c.buf_ptr(1 << 20));
    c.queues[0].read(8 << 20, read_buf, 4096, 1, ReqFlags::empty());
    c.queues[0].write(4 << 20, write_buf, 65536, 2, ReqFlags::empty());
    let early = c.completions(0, 2, Duration::from_secs(3));
    assert_eq!(early, vec![], "completed while the OSD was down");
    drop(down);
    let mut done = c.completions(0, 2, Duration::from_secs(60));
    done.sort();
    assert_eq!(done, vec![(1, 0), (2, 0)]);
    assert!(c.buf_slice(0, 4096) == pattern(61, 8 << 20, 4096));
    assert!(c.read_at(0, 4 << 20, 65536, 2 << 20).unwrap() == data);
}

/// A client the cluster blocklists is fenced off for good; its requests fail (IOERR), and the
/// export opens the image again on a new connection and serves again by itself.
#[test]
fn a_blocklisted_client_fails_requests_then_connects_again() {
    let _shared = OSD.read().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir();
    let image = TestImage::create(16 << 20);
    let sock = dir.path().join("blk.sock");
    let daemon =
        Daemon::start(dir.path(), &[format!("socket={},{}", sock.display(), image.keys())]);
    let mut c = Client::connect(&sock, 1);
    let data = pattern(70, 0, 65536);
    assert_eq!(c.write_at(0, 0, &data, 0), 0);
    let status: serde_json::Value =
        serde_json::from_str(&rbd(&["status", "--format", "json", &format!("rbd/{}", image.name)]))
            .unwrap();
    let address = status["watchers"][0]["address"].as_str().expect("the daemon watches its image");
    common::ceph::ceph(&["osd", "blocklist", "add", address]);
    let mut failed = false;
    wait_until("a request fails once the client is blocklisted", Duration::from_secs(30), || {
        failed = c.write_at(0, 1 << 20, &data, 0) == EIO;
        failed
    });
    wait_until("the export serves again", Duration::from_secs(60), || {
        c.write_at(0, 2 << 20, &data, 0) == 0
    });
    common::ceph::ceph(&["osd", "blocklist", "rm", address]);
    assert!(c.read_at(0, 0, 65536, 0).unwrap() == data, "data from before the blocklisting");
    assert!(c.read_at(0, 2 << 20, 65536, 0).unwrap() == data, "data written after it");
    let log = daemon.log();
    assert!(log.contains("the Ceph cluster blocklisted this client; connecting again"), "{log}");
    assert!(log.contains("RBD image open again on a new connection"), "{log}");
}
