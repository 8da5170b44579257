//! Mirror jobs (`ctl mirror`, `query-jobs`, `job-cancel`, `job-complete`) against the real
//! daemon, a libblkio client writing verified data all along, and real targets: an image
//! file, and qemu-nbd (which the test kills mid-copy). `qemu-img compare` judges the copies.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::nbd::{nbdkit, NbdServer, Server};
use common::{ctl, pattern, tmpdir, wait_until, Client, Daemon};
use serde_json::Value;

const IMAGE_BYTES: u64 = 32 << 20;
const BLOCK: u64 = 4096;

/// An image whose first half holds a pattern and whose second half is a hole but for one
/// MiB of pattern in its middle (so the copy meets data, holes and zeroes).
fn make_sparse_image(path: &Path, seed: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(IMAGE_BYTES).unwrap();
    for at in (0..IMAGE_BYTES / 2).step_by(1 << 20) {
        f.write_all_at(&pattern(seed, at, 1 << 20), at).unwrap();
    }
    let middle = IMAGE_BYTES * 3 / 4;
    f.write_all_at(&pattern(seed, middle, 1 << 20), middle).unwrap();
}

fn blank_image(path: &Path) {
    let f = fs::File::create(path).unwrap();
    f.set_len(IMAGE_BYTES).unwrap();
    // Garbage the copy must overwrite, holes included.
    f.write_all_at(&[0xA5; 1 << 20], IMAGE_BYTES - (1 << 20)).unwrap();
    f.write_all_at(&[0x5A; 1 << 20], IMAGE_BYTES / 2 + (1 << 20)).unwrap();
}

/// `ctl CMD ARGS` that must succeed: its JSON result.
fn ctl_ok(control: &Path, args: &[&str]) -> Value {
    let out = ctl(control, args);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("ctl {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    })
}

/// `ctl CMD ARGS` that the daemon must refuse (exit 1) with `want` in its message.
fn ctl_refused(control: &Path, args: &[&str], want: &str) {
    let out = ctl(control, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "ctl {args:?}: {stderr}");
    assert!(stderr.contains(want), "ctl {args:?}: wanted {want:?} in: {stderr}");
}

fn job(control: &Path, id: &str) -> Value {
    let jobs = ctl_ok(control, &["query-jobs"]);
    jobs.as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no job {id} in {jobs}"))
}

fn wait_for_state(control: &Path, id: &str, state: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let j = job(control, id);
        if j["state"] == state {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} never became {state}: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-img compare` of two raw images (shared locks: the daemon holds them open).
fn qemu_img_compare(a: &Path, b: &Path) -> std::process::Output {
    Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img")
}

fn assert_same(a: &Path, b: &Path) {
    let out = qemu_img_compare(a, b);
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the writer did: its requests, those that failed, and the image as it must read.
struct Written {
    requests: u64,
    failures: u64,
    model: Vec<u8>,
}

/// A libblkio client that writes (8 requests in flight at distinct places, some of them
/// write-zeroes and discards, a flush after each batch), reads back and checks, until
/// stopped. Starts from the image's content `initial`.
fn verified_writer(sock: PathBuf, initial: Vec<u8>, stop: Arc<AtomicBool>) -> JoinHandle<Written> {
    writer_with(sock, initial, stop, true)
}

/// As [`verified_writer`]; without `discards` (RBD may skip a discard of part of an object,
/// which a discard allows: the model could not say what it reads).
fn writer_with(
    sock: PathBuf,
    initial: Vec<u8>,
    stop: Arc<AtomicBool>,
    discards: bool,
) -> JoinHandle<Written> {
    std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 1);
        let mut w = Written { requests: 0, failures: 0, model: initial };
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let blocks = IMAGE_BYTES / BLOCK;
        let mut batch = 0u64;
        while !stop.load(Ordering::Relaxed) {
            batch += 1;
            let mut taken: Vec<u64> = Vec::new();
            for i in 0..8usize {
                // 1 to 8 blocks anywhere, not overlapping the others of the batch.
                let len_blocks = 1 + next() % 8;
                let first = next() % (blocks - len_blocks);
                if taken.iter().any(|&t| first < t + 8 && t < first + len_blocks) {
                    continue;
                }
                taken.push(first);
                let (offset, len) = (first * BLOCK, len_blocks * BLOCK);
                let range = offset as usize..(offset + len) as usize;
                match next() % 10 {
                    0 => {
                        c.queues[0].write_zeroes(offset, len, i, ReqFlags::NO_UNMAP);
                        w.model[range].fill(0);
                    }
                    1 => {
                        c.queues[0].write_zeroes(offset, len, i, ReqFlags::empty());
                        w.model[range].fill(0);
                    }
                    2 if discards => {
                        // discard=unmap (the default) punches a hole, which reads as zeroes.
                        c.queues[0].discard(offset, len, i, ReqFlags::empty());
                        w.model[range].fill(0);
                    }
                    _ => {
                        let data = pattern(1000 + batch, offset, len as usize);
                        let at = i * (64 << 10);
                        c.buf_slice(at, data.len()).copy_from_slice(&data);
                        let iovs = c.segments(at, data.len());
                        c.queues[0].writev(
                            offset,
                            iovs.as_ptr(),
                            iovs.len() as u32,
                            i,
                            ReqFlags::empty(),
                        );
                        w.model[range].copy_from_slice(&data);
                    }
                }
                w.requests += 1;
            }
            let done = c.completions(0, taken.len(), Duration::from_secs(30));
            assert_eq!(done.len(), taken.len(), "every request of the batch answered");
            w.failures += done.iter().filter(|(_, r)| *r != 0).count() as u64;
            w.failures += u64::from(c.flush(0) != 0);
            let check = (next() % blocks) * BLOCK;
            match c.read_at(0, check, 8192.min((IMAGE_BYTES - check) as usize), 1 << 20) {
                Ok(back) => {
                    let want = &w.model[check as usize..check as usize + back.len()];
                    assert!(back == want, "read back at {check} differs from what was written");
                }
                Err(_) => w.failures += 1,
            }
            w.requests += 2;
        }
        w
    })
}

struct Setup {
    _dir: tempfile::TempDir,
    image: PathBuf,
    sock: PathBuf,
    control: PathBuf,
    daemon: Daemon,
}

fn setup(dir: tempfile::TempDir) -> Setup {
    let image = dir.path().join("source.raw");
    let sock = dir.path().join("vm1.sock");
    let control = dir.path().join("ctl.sock");
    make_sparse_image(&image, 7);
    let args = [
        "--control".to_string(),
        control.display().to_string(),
        "--export".to_string(),
        format!("id=vm1,socket={},image={}", sock.display(), image.display()),
    ];
    let daemon = Daemon::start_with(dir.path(), &args, &[sock.clone(), control.clone()]);
    Setup { _dir: dir, image, sock, control, daemon }
}

/// Runs a mirror of vm1 to `target` under the verified writer until it is ready and a while
/// after; then stops the writer and checks the client, the source and the target.
fn mirror_under_writes(s: &Setup, target: &str, target_file: &Path) {
    mirror_under_writes_with(s, target, target_file, &[]);
}

/// [`mirror_under_writes`] with more `ctl mirror` arguments.
fn mirror_under_writes_with(s: &Setup, target: &str, target_file: &Path, more: &[&str]) {
    mirror_while_writing(s, target, target_file, more, true, &|| s.image.clone());
}

/// Mirrors vm1 to `target` (whose data lands in `target_file`) with `more` `ctl mirror`
/// arguments, under a verified writer (with or without discards), until ready and a while
/// after; returns what the writer wrote, once the target compares equal to `source_now()`
/// (the source's content then) and to the writer's model. The job stays ready.
fn mirror_while_writing(
    s: &Setup,
    target: &str,
    target_file: &Path,
    more: &[&str],
    discards: bool,
    source_now: &dyn Fn() -> PathBuf,
) -> Written {
    let stop = Arc::new(AtomicBool::new(false));
    let writer =
        writer_with(s.sock.clone(), fs::read(&s.image).unwrap(), Arc::clone(&stop), discards);
    std::thread::sleep(Duration::from_millis(200));
    // 16 MiB/s: the copy of 32 MiB (of which 23 MiB data) takes over a second, with
    // guest writes ahead of it, behind it and into the chunk it copies.
    let target_arg = format!("target={target}");
    let mut args = vec!["mirror", "id=vm1", &target_arg, "speed=16M"];
    args.extend_from_slice(more);
    let started = ctl_ok(&s.control, &args);
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(started["total_bytes"], IMAGE_BYTES);
    // Generous: the machine may be busy (a job of 2 s at its speed).
    let ready = wait_for_state(&s.control, "vm1", "ready", Duration::from_secs(120));
    assert_eq!(ready["done_bytes"], IMAGE_BYTES, "{ready}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let w = writer.join().unwrap();
    assert!(w.requests > 100, "the writer wrote: {} requests", w.requests);
    assert_eq!(w.failures, 0, "no request failed\n{}", s.daemon.log());
    let j = job(&s.control, "vm1");
    assert_eq!(j["state"], "ready", "{j}");
    assert!(j["recopied_bytes"].as_u64().unwrap() > 0, "guest writes were mirrored: {j}");
    let source = source_now();
    assert!(fs::read(&source).unwrap() == w.model, "the source holds every write");
    assert_same(&source, target_file);
    w
}

/// A mirror to an image file under verified writes converges; the file then compares equal;
/// job-cancel of the ready job leaves the export on its source, serving, and closes the
/// target. The commands' errors are exact.
#[test]
fn mirror_to_a_file_under_verified_writes() {
    let s = setup(tmpdir());
    let target = s._dir.path().join("target.raw");
    blank_image(&target);
    // Refusals first: nothing starts.
    let small = s._dir.path().join("small.raw");
    fs::File::create(&small).unwrap().set_len(IMAGE_BYTES / 2).unwrap();
    ctl_refused(
        &s.control,
        &["mirror", "id=vm1", &format!("target={}", small.display())],
        "must be equal",
    );
    ctl_refused(
        &s.control,
        &["mirror", "id=nope", &format!("target={}", target.display())],
        "no export with id 'nope'",
    );
    ctl_refused(
        &s.control,
        &["mirror", "id=vm1", &format!("target={}", s.image.display())],
        "does not share the \"write\" permission",
    );
    ctl_refused(&s.control, &["mirror", "id=vm1"], "missing 'target'");
    ctl_refused(
        &s.control,
        &["mirror", "id=vm1", "target=/x", "bogus=1"],
        "takes no argument 'bogus'",
    );
    ctl_refused(&s.control, &["job-cancel", "id=vm1"], "no job with id 'vm1'");
    assert_eq!(ctl_ok(&s.control, &["query-jobs"]), serde_json::json!([]));

    mirror_under_writes(&s, &target.display().to_string(), &target);
    ctl_refused(
        &s.control,
        &["mirror", "id=vm1", &format!("target={}", small.display())],
        "has a mirror job running",
    );
    let pid = s.daemon.pid();
    let holds = |p: &Path| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .any(|e| fs::read_link(e.unwrap().path()).is_ok_and(|l| l == p))
    };
    assert!(holds(&target), "the job holds its target open");
    let cancelled = ctl_ok(&s.control, &["job-cancel", "id=vm1"]);
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert!(!holds(&target), "the target is closed once the job ended");
    assert!(holds(&s.image), "the export still serves its image");
    ctl_refused(&s.control, &["job-complete", "id=vm1"], "cancelled, not ready");
    // The export serves on, from its source, and nothing goes to the old target.
    let before = fs::read(&target).unwrap();
    let mut c = Client::connect(&s.sock, 1);
    assert_eq!(c.write_at(0, 0, &[0x77; 4096], 0), 0);
    assert_eq!(c.read_at(0, 0, 4096, 0).unwrap(), vec![0x77; 4096]);
    assert!(fs::read(&target).unwrap() == before, "the target is left alone after cancel");
}

/// job-cancel in the middle of the copy: the source is untouched (it holds exactly what the
/// client wrote), the job says cancelled, and the daemon serves on.
#[test]
fn cancel_mid_copy_leaves_the_source_untouched() {
    let s = setup(tmpdir());
    let target = s._dir.path().join("target.raw");
    blank_image(&target);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = verified_writer(s.sock.clone(), fs::read(&s.image).unwrap(), Arc::clone(&stop));
    ctl_ok(&s.control, &["mirror", "id=vm1", &format!("target={}", target.display()), "speed=4M"]);
    wait_until("some progress", Duration::from_secs(10), || {
        job(&s.control, "vm1")["done_bytes"].as_u64().unwrap() >= 2 << 20
    });
    let cancelled = ctl_ok(&s.control, &["job-cancel", "id=vm1"]);
    assert_eq!(cancelled["state"], "cancelled");
    let done = cancelled["done_bytes"].as_u64().unwrap();
    assert!(done < IMAGE_BYTES, "cancelled before the end: {cancelled}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let w = writer.join().unwrap();
    assert_eq!(w.failures, 0, "{}", s.daemon.log());
    assert!(fs::read(&s.image).unwrap() == w.model, "the source holds every write, nothing else");
    assert!(s.daemon.log().contains("mirror to"), "{}", s.daemon.log());
}

/// A mirror to qemu-nbd under verified writes converges and compares equal; a second mirror
/// to a qemu-nbd killed mid-copy fails with an error naming the server, while the client's
/// I/O goes on without an error.
#[test]
fn mirror_to_qemu_nbd_and_a_target_that_dies() {
    let s = setup(tmpdir());
    let target = s._dir.path().join("nbd-target.raw");
    blank_image(&target);
    let nbd = NbdServer::start(Server::QemuNbd, &target, &s._dir.path().join("nbd.sock"));
    mirror_under_writes(&s, &nbd.uri(), &target);
    assert_eq!(ctl_ok(&s.control, &["job-cancel", "id=vm1"])["state"], "cancelled");
    drop(nbd);

    let doomed = s._dir.path().join("doomed.raw");
    blank_image(&doomed);
    let mut nbd = NbdServer::start(Server::QemuNbd, &doomed, &s._dir.path().join("nbd2.sock"));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = verified_writer(s.sock.clone(), fs::read(&s.image).unwrap(), Arc::clone(&stop));
    ctl_ok(&s.control, &["mirror", "id=vm1", &format!("target={}", nbd.uri()), "speed=4M"]);
    wait_until("some progress", Duration::from_secs(10), || {
        job(&s.control, "vm1")["done_bytes"].as_u64().unwrap() >= 2 << 20
    });
    nbd.kill();
    let failed = wait_for_state(&s.control, "vm1", "failed", Duration::from_secs(40));
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("NBD server"), "the error names the target: {failed}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let w = writer.join().unwrap();
    assert!(w.requests > 50, "{}", w.requests);
    assert_eq!(w.failures, 0, "no guest request failed\n{}", s.daemon.log());
    assert!(fs::read(&s.image).unwrap() == w.model, "the source holds every write");
    assert!(s.daemon.log().contains("failed"), "{}", s.daemon.log());
}

/// A target whose largest request (64 KiB) is below the mirror's 1 MiB pieces: each piece
/// goes in parts it takes (the server answers a longer one EINVAL), and the copy converges
/// as to any other target.
#[test]
fn mirror_to_a_server_of_small_requests() {
    let s = setup(tmpdir());
    let target = s._dir.path().join("nbd-target.raw");
    blank_image(&target);
    let sock = s._dir.path().join("nbd.sock");
    let args = [
        "--filter=blocksize-policy",
        "file",
        &target.display().to_string(),
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ]
    .map(String::from);
    let _nbdkit = nbdkit(&sock, &args);
    mirror_under_writes(&s, &format!("nbd+unix:///?socket={}", sock.display()), &target);
    assert_eq!(ctl_ok(&s.control, &["job-cancel", "id=vm1"])["state"], "cancelled");
}

/// Whether process `pid` has `path` open.
fn holds_open(pid: i32, path: &Path) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .any(|e| fs::read_link(e.unwrap().path()).is_ok_and(|l| l == path))
}

/// job-complete under a running writer: the export switches to the target (no request fails,
/// every write reads back), the old image is closed (and unlocked: qemu-img can write it),
/// list-exports names the target, and the old image changes no more.
#[test]
fn pivot_to_a_file_under_a_running_writer() {
    let s = setup(tmpdir());
    let target = s._dir.path().join("target.raw");
    blank_image(&target);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = verified_writer(s.sock.clone(), fs::read(&s.image).unwrap(), Arc::clone(&stop));
    ctl_refused(&s.control, &["job-complete", "id=vm1"], "no job with id 'vm1'");
    ctl_ok(&s.control, &["mirror", "id=vm1", &format!("target={}", target.display()), "speed=32M"]);
    ctl_refused(&s.control, &["job-complete", "id=vm1"], "not ready");
    wait_for_state(&s.control, "vm1", "ready", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(200));
    let done = ctl_ok(&s.control, &["job-complete", "id=vm1"]);
    assert_eq!(done["state"], "completed", "{done}");
    let pid = s.daemon.pid();
    assert!(!holds_open(pid, &s.image), "the old image is closed after job-complete");
    assert!(holds_open(pid, &target), "the export serves the target");
    let exports = ctl_ok(&s.control, &["list-exports"]);
    assert_eq!(exports[0]["backend"], target.display().to_string(), "{exports}");
    let old = fs::read(&s.image).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let w = writer.join().unwrap();
    assert!(w.requests > 100, "{}", w.requests);
    assert_eq!(w.failures, 0, "no request failed across the pivot\n{}", s.daemon.log());
    assert!(fs::read(&target).unwrap() == w.model, "the target holds every write");
    assert!(fs::read(&s.image).unwrap() == old, "nothing reaches the old image after the pivot");
    // Its lock went with it: another writer may have it.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(&s.image)
        .output()
        .expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io writes the old image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ctl_refused(&s.control, &["job-complete", "id=vm1"], "completed, not ready");
}

/// The showcase: a file-backed export moved to an RBD image on the test cluster under a
/// running libblkio writer: no request fails, the image holds every write, and the file is
/// no longer open.
#[test]
fn pivot_from_a_file_to_rbd_under_a_running_writer() {
    use common::ceph::TestImage;
    let s = setup(tmpdir());
    let image = TestImage::create(IMAGE_BYTES);
    let target = format!("rbd:rbd/{}:conf={}", image.name, common::ceph::ceph_conf().display());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = writer_with(s.sock.clone(), fs::read(&s.image).unwrap(), Arc::clone(&stop), false);
    let started = ctl_ok(&s.control, &["mirror", "id=vm1", &format!("target={target}")]);
    assert_eq!(started["target"], format!("rbd:rbd/{}", image.name), "{started}");
    wait_for_state(&s.control, "vm1", "ready", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    let done = ctl_ok(&s.control, &["job-complete", "id=vm1"]);
    assert_eq!(done["state"], "completed", "{done}");
    assert!(!holds_open(s.daemon.pid(), &s.image), "the file is closed after the pivot");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let w = writer.join().unwrap();
    assert!(w.requests > 50, "{}", w.requests);
    assert_eq!(w.failures, 0, "no request failed across the pivot\n{}", s.daemon.log());
    let exported = s._dir.path().join("exported.raw");
    image.export_to(&exported);
    let got = fs::read(&exported).unwrap();
    let differs = got.iter().zip(&w.model).position(|(a, b)| a != b);
    assert_eq!(differs, None, "the RBD image holds every write");
}

/// A daemon serving export vm1 with `keys` (its backend) and, beside it, `nul` of
/// engine=null; the writer's model starts from `initial`.
fn setup_serving(dir: tempfile::TempDir, keys: &str, image: PathBuf) -> Setup {
    let sock = dir.path().join("vm1.sock");
    let null_sock = dir.path().join("nul.sock");
    let control = dir.path().join("ctl.sock");
    let args = [
        "--control".to_string(),
        control.display().to_string(),
        "--export".to_string(),
        format!("id=vm1,socket={},{keys}", sock.display()),
        "--export".to_string(),
        format!("id=nul,socket={},engine=null,size={IMAGE_BYTES}", null_sock.display()),
    ];
    let daemon = Daemon::start_with(dir.path(), &args, &[sock.clone(), control.clone()]);
    Setup { _dir: dir, image, sock, control, daemon }
}

/// [`mirror_while_writing`] to the file `target` from an export whose source is not its
/// image file (`source_now()` gives what it holds), then job-cancel.
fn mirror_source_under_writes(
    s: &Setup,
    target: &Path,
    discards: bool,
    source_now: &dyn Fn() -> PathBuf,
) -> Written {
    let uri = target.display().to_string();
    let w = mirror_while_writing(s, &uri, target, &[], discards, source_now);
    assert_eq!(ctl_ok(&s.control, &["job-cancel", "id=vm1"])["state"], "cancelled");
    w
}

/// An export of an NBD server's export (qemu-nbd) is mirrored to a file under a verified
/// writer: its pieces are read through a connection of the job's own, the guest's writes
/// copied again from it, and the target compares equal to the image behind the server. An
/// export of engine=null is refused with the reason.
#[test]
fn mirror_from_an_nbd_source_under_verified_writes() {
    let dir = tmpdir();
    let image = dir.path().join("behind-nbd.raw");
    make_sparse_image(&image, 11);
    let nbd = NbdServer::start(Server::QemuNbd, &image, &dir.path().join("nbd.sock"));
    let s = setup_serving(dir, &format!("image={}", nbd.uri()), image.clone());
    let target = s._dir.path().join("target.raw");
    blank_image(&target);
    ctl_refused(
        &s.control,
        &["mirror", "id=nul", &format!("target={}", target.display())],
        "an export of engine=null has no data to mirror",
    );
    mirror_source_under_writes(&s, &target, true, &|| image.clone());
    // qemu-nbd has base:allocation: the copy found the source's holes by block status.
    assert!(s.daemon.log().contains("extents from block status"), "{}", s.daemon.log());
    // The job's own connection to the server is gone with the job; the export serves on.
    let mut c = Client::connect(&s.sock, 1);
    assert_eq!(c.write_at(0, 0, &[0x3C; 4096], 0), 0);
    assert_eq!(c.read_at(0, 0, 4096, 0).unwrap(), vec![0x3C; 4096]);
    drop(nbd);
}

/// An export of an RBD image on the test cluster is mirrored to a file under a verified
/// writer (without discards: RBD may keep a discarded part of an object); the target then
/// holds exactly what the image holds.
#[test]
fn mirror_from_an_rbd_source_under_verified_writes() {
    use common::ceph::TestImage;
    let dir = tmpdir();
    let initial = dir.path().join("initial.raw");
    make_sparse_image(&initial, 13);
    let rbd = TestImage::import(&initial);
    let s = setup_serving(dir, &rbd.keys(), initial.clone());
    let target = s._dir.path().join("target.raw");
    blank_image(&target);
    let exported = s._dir.path().join("exported.raw");
    mirror_source_under_writes(&s, &target, false, &|| {
        rbd.export_to(&exported);
        exported.clone()
    });
}

/// A second daemon with export vm1 of `image` as a migration's destination (`incoming=on`)
/// and an NBD server (`--nbd-server nbd`), vm1 exposed writable; its control socket.
fn destination(dir: &Path, image: &Path, nbd: &str) -> (Daemon, PathBuf) {
    let control = dir.join("dst-ctl.sock");
    let sock = dir.join("dst-vm1.sock");
    let args = [
        "--control".to_string(),
        control.display().to_string(),
        "--nbd-server".to_string(),
        nbd.to_string(),
        "--export".to_string(),
        format!("id=vm1,socket={},image={},incoming=on", sock.display(), image.display()),
    ];
    let daemon = Daemon::start_with(dir, &args, &[sock, control.clone()]);
    let exposed = ctl_ok(&control, &["nbd-export", "id=vm1", "writable=on"]);
    assert_eq!(exposed["writable"], true, "{exposed}");
    (daemon, control)
}

/// Through blkplane's own NBD server to another blkplane: the second daemon serves the
/// target image as an `incoming=on` export exposed over a Unix socket; the mirror under
/// verified writes converges, the two images compare equal, and job-cancel leaves the
/// destination as it was (no write after the end), which can then be unexposed.
#[test]
fn mirror_through_blkplanes_nbd_server_to_another_blkplane() {
    let s = setup(tmpdir());
    let target = s._dir.path().join("dst.raw");
    blank_image(&target);
    let nbd = s._dir.path().join("dst-nbd.sock");
    let (mut dst, dst_control) =
        destination(s._dir.path(), &target, &format!("unix={}", nbd.display()));
    let uri = format!("nbd+unix:///vm1?socket={}", nbd.display());
    mirror_under_writes(&s, &uri, &target);
    let before = fs::read(&target).unwrap();
    assert_eq!(ctl_ok(&s.control, &["job-cancel", "id=vm1"])["state"], "cancelled");
    let mut c = Client::connect(&s.sock, 1);
    assert_eq!(c.write_at(0, 0, &[0x66; 4096], 0), 0);
    drop(c);
    assert!(fs::read(&target).unwrap() == before, "the destination is left alone after cancel");
    ctl_ok(&dst_control, &["nbd-unexport", "id=vm1"]);
    assert!(dst.alive(), "{}", dst.log());
}

/// The same over TCP with TLS (certificates made here): the mirror's client shows its
/// certificate; without TLS, without a client certificate, or with one from another CA the
/// job is refused with the reason, and nothing is written.
#[test]
fn mirror_over_tcp_with_tls_to_another_blkplane() {
    let s = setup(tmpdir());
    let dir = s._dir.path();
    common::tls::make_certs(dir, &["127.0.0.1"]);
    let target = dir.join("dst.raw");
    blank_image(&target);
    let blank = fs::read(&target).unwrap();
    let port = common::free_port();
    let nbd = format!("addr=127.0.0.1:{port},tls-creds={}", dir.join("srv").display());
    let (mut dst, _) = destination(dir, &target, &nbd);
    let uri = format!("nbd://127.0.0.1:{port}/vm1");
    let creds = |name: &str| format!("tls-creds={}", dir.join(name).display());
    ctl_refused(&s.control, &["mirror", "id=vm1", &format!("target={uri}")], "requires TLS");
    ctl_refused(
        &s.control,
        &["mirror", "id=vm1", &format!("target={uri}"), &creds("nocert")],
        "CertificateRequired",
    );
    ctl_refused(
        &s.control,
        &["mirror", "id=vm1", &format!("target={uri}"), &creds("foreign")],
        "UnknownCA",
    );
    ctl_refused(
        &s.control,
        &["mirror", "id=vm1", &format!("target={}", target.display()), &creds("good")],
        "tls-creds= is for an nbd:// target",
    );
    ctl_refused(
        &s.control,
        &["mirror", "id=vm1", &format!("target={uri}"), "tls-creds=relative"],
        "absolute path",
    );
    assert!(fs::read(&target).unwrap() == blank, "refused mirrors wrote nothing");
    mirror_under_writes_with(&s, &uri, &target, &[&creds("good")]);
    assert_eq!(ctl_ok(&s.control, &["job-cancel", "id=vm1"])["state"], "cancelled");
    assert!(dst.alive(), "{}", dst.log());
}

/// After a pivot an NBD exposure serves the export's new image, not the old one (which it
/// held open before): the old file is closed, a client connected before is disconnected, and
/// what NBD reads compares equal to the target.
#[test]
fn an_nbd_exposure_follows_the_pivot() {
    let dir = tmpdir();
    let image = dir.path().join("source.raw");
    let sock = dir.path().join("vm1.sock");
    let control = dir.path().join("ctl.sock");
    let nbd = dir.path().join("nbd.sock");
    make_sparse_image(&image, 9);
    let args = [
        "--control".to_string(),
        control.display().to_string(),
        "--nbd-server".to_string(),
        format!("unix={}", nbd.display()),
        "--export".to_string(),
        format!("id=vm1,socket={},image={}", sock.display(), image.display()),
    ];
    let daemon = Daemon::start_with(dir.path(), &args, &[sock.clone(), control.clone()]);
    ctl_ok(&control, &["nbd-export", "id=vm1"]);
    let uri = format!("nbd+unix:///vm1?socket={}", nbd.display());
    // A client connected to the exposure across the pivot (qemu-io reads its commands).
    let mut held = Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run qemu-io");
    let target = dir.path().join("target.raw");
    blank_image(&target);
    ctl_ok(&control, &["mirror", "id=vm1", &format!("target={}", target.display())]);
    wait_for_state(&control, "vm1", "ready", Duration::from_secs(60));
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.write_at(0, 0, &[0x42; 4096], 0), 0);
    drop(c);
    let pid = daemon.pid();
    assert!(holds_open(pid, &image), "before the pivot the NBD exposure reads the image");
    assert_eq!(ctl_ok(&control, &["job-complete", "id=vm1"])["state"], "completed");
    wait_until("the old image closed", Duration::from_secs(10), || !holds_open(pid, &image));
    assert!(daemon.log().contains("the NBD exposure now serves the mirror's target"));
    let listed = ctl_ok(&control, &["nbd-list"]);
    assert_eq!(listed["exports"][0]["name"], "vm1", "{listed}");
    {
        use std::io::Write;
        let stdin = held.stdin.as_mut().unwrap();
        let _ = stdin.write_all(b"read 0 4k\nquit\n");
    }
    let out = held.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!said.contains("read 4096/4096 bytes"), "the old connection still read: {said}");
    // A new client reads the target through the exposure.
    let copy = dir.path().join("copy.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same(&target, &copy);
    assert_eq!(&fs::read(&copy).unwrap()[..4096], &[0x42; 4096][..]);
}
