//! A daemon killed with SIGKILL in the middle of a write-heavy run loses nothing that was
//! acknowledged before the last acknowledged FLUSH: after a restart, every such write reads
//! back intact.

mod common;

use blkio::ReqFlags;
use common::ceph::TestImage;
use common::{make_image, pattern, tmpdir, Client, Daemon, Strace};

const BLOCK: usize = 64 << 10;
const BATCH: usize = 8;

fn sigkill_mid_run(cache: &str, aio: &str) {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, 64 << 20, 3);
    let spec =
        format!("socket={},image={},cache={cache},aio={aio}", sock.display(), image.display());
    sigkill_mid_run_on(dir.path(), &sock, &spec);
}

/// The same on an RBD image: what librbd's cache held is lost with the daemon, what a FLUSH
/// acknowledged is in the cluster.
fn sigkill_mid_run_rbd(cache: &str) {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let image = TestImage::create(64 << 20);
    let spec = format!("socket={},{},cache={cache}", sock.display(), image.keys());
    sigkill_mid_run_on(dir.path(), &sock, &spec);
}

/// Writes in rounds with a FLUSH every fourth, SIGKILLs the daemon with a batch in flight,
/// starts it again on the same spec and reads every flushed write back.
fn sigkill_mid_run_on(dir: &std::path::Path, sock: &std::path::Path, spec: &str) {
    let (sock, spec) = (sock.to_path_buf(), spec.to_string());
    let mut daemon = Daemon::start(dir, std::slice::from_ref(&spec));
    let mut c = Client::connect(&sock, 1);
    let mut durable: Vec<u64> = Vec::new();
    let mut since_flush: Vec<u64> = Vec::new();
    let mut next_block = 0u64;
    let submit_batch = |c: &mut Client, next_block: &mut u64| -> Vec<u64> {
        let mut blocks = Vec::with_capacity(BATCH);
        for slot in 0..BATCH {
            let block = *next_block;
            *next_block += 1;
            let data = pattern(1000 + block, block * BLOCK as u64, BLOCK);
            c.buf_slice(slot * BLOCK, BLOCK).copy_from_slice(&data);
            let ptr = c.buf_ptr(slot * BLOCK);
            c.queues[0].write(block * BLOCK as u64, ptr, BLOCK, slot, ReqFlags::empty());
            blocks.push(block);
        }
        blocks
    };
    for round in 0..24 {
        let blocks = submit_batch(&mut c, &mut next_block);
        for _ in 0..BATCH {
            assert_eq!(c.wait_one(0), 0, "write in round {round}");
        }
        since_flush.extend(blocks);
        if round % 4 == 3 {
            assert_eq!(c.flush(0), 0, "flush in round {round}");
            durable.append(&mut since_flush);
        }
    }
    // A batch is in flight when the daemon dies.
    submit_batch(&mut c, &mut next_block);
    c.queues[0].do_io(&mut [], 0, None, None).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGKILL) };
    let status = daemon.stop_after_signal();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    drop(c);

    let _again = Daemon::start(dir, std::slice::from_ref(&spec));
    let mut c = Client::connect(&sock, 1);
    assert!(durable.len() >= 5 * BATCH, "too few flushed writes to prove anything");
    for block in &durable {
        let back = c.read_at(0, block * BLOCK as u64, BLOCK, 0).unwrap();
        assert!(
            back == pattern(1000 + block, block * BLOCK as u64, BLOCK),
            "block {block} lost ({spec})"
        );
    }
}

#[test]
fn sigkill_loses_no_flushed_write_cache_none() {
    sigkill_mid_run("none", "io_uring");
}

#[test]
fn sigkill_loses_no_flushed_write_cache_writeback() {
    sigkill_mid_run("writeback", "io_uring");
}

#[test]
fn sigkill_loses_no_flushed_write_rbd_cache_none() {
    sigkill_mid_run_rbd("none");
}

#[test]
fn sigkill_loses_no_flushed_write_rbd_cache_writeback() {
    sigkill_mid_run_rbd("writeback");
}

#[test]
fn sigkill_loses_no_flushed_write_native_aio() {
    sigkill_mid_run("none", "native");
}

#[test]
fn sigkill_loses_no_flushed_write_threads() {
    sigkill_mid_run("writeback", "threads");
}

/// The cache-mode contract, watched from outside the daemon: the image's open flags (from
/// /proc/PID/fdinfo) and, with aio=threads so that every operation is a system call, the
/// order of pwritev2 and fdatasync (from strace) for a write followed by a FLUSH.
fn cache_contract(cache: &str, direct: bool, dsync: bool, flush_syncs: bool) {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, 8 << 20, 4);
    let daemon = Daemon::start(
        dir.path(),
        &[format!("socket={},image={},cache={cache},aio=threads", sock.display(), image.display())],
    );
    let pid = daemon.pid();
    // The image's file descriptor and its open flags.
    let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .find(|e| std::fs::read_link(e.path()).map(|l| l == image).unwrap_or(false))
        .expect("the daemon has the image open")
        .file_name();
    let fdinfo =
        std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy())).unwrap();
    let flags_line = fdinfo.lines().find(|l| l.starts_with("flags:")).unwrap();
    let flags = i32::from_str_radix(flags_line.split_whitespace().nth(1).unwrap(), 8).unwrap();
    assert_eq!(flags & libc::O_DIRECT != 0, direct, "cache={cache}: O_DIRECT in {flags:o}");
    assert_eq!(
        flags & libc::O_DSYNC == libc::O_DSYNC,
        dsync,
        "cache={cache}: O_DSYNC in {flags:o}"
    );

    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.write_at(0, 0, &[7u8; 4096], 0), 0);
    let strace = Strace::attach(
        pid,
        &["-e", "trace=pwritev2,fdatasync,fsync"],
        &dir.path().join("strace.out"),
    );
    assert_eq!(c.write_at(0, 4096, &[8u8; 4096], 0), 0);
    assert_eq!(c.flush(0), 0);
    let text = strace.finish();
    let calls: Vec<&str> = text
        .lines()
        .filter_map(|l| ["pwritev2(", "fdatasync(", "fsync("].into_iter().find(|c| l.contains(c)))
        .collect();
    let want: Vec<&str> =
        if flush_syncs { vec!["pwritev2(", "fdatasync("] } else { vec!["pwritev2("] };
    assert_eq!(calls, want, "cache={cache}: system calls of a write then a FLUSH:\n{text}");
}

#[test]
fn cache_none_is_direct_and_flush_runs_fdatasync_after_the_write() {
    cache_contract("none", true, false, true);
}

#[test]
fn cache_directsync_is_direct_and_dsync() {
    cache_contract("directsync", true, true, false);
}

#[test]
fn cache_writeback_uses_the_page_cache_and_flush_runs_fdatasync() {
    cache_contract("writeback", false, false, true);
}

#[test]
fn cache_writethrough_is_dsync() {
    cache_contract("writethrough", false, true, false);
}

#[test]
fn cache_unsafe_ignores_flush() {
    cache_contract("unsafe", false, false, false);
}
