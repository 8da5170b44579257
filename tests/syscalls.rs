//! Hot-path discipline, counted: strace follows every thread of a running daemon while a
//! libblkio client sends N requests, and the daemon may make no more system calls than the
//! I/O itself needs (one io_uring_enter) plus the guest's interrupt (one eventfd write).
//! Not a timing test: it counts calls, which noise does not change.

mod common;

use std::collections::HashMap;
use std::path::Path;

use std::time::{Duration, Instant};

use blkio::ReqFlags;
use blkplane::process_cpu_ns;
use common::{disk_dir, make_image, tmpdir, Client, Daemon, Strace};

const REQUESTS: u64 = 2000;

/// Runs `REQUESTS` 4 KiB reads at depth 1 under strace; returns calls per syscall name.
fn count_syscalls(dir: &Path, spec: &str) -> HashMap<String, u64> {
    let sock = dir.join("blk.sock");
    let daemon = Daemon::start(dir, &[format!("socket={},{spec}", sock.display())]);
    let mut c = Client::connect(&sock, 1);
    for i in 0..50 {
        c.read_at(0, i * 4096, 4096, 0).unwrap();
    }
    let strace = Strace::attach(daemon.pid(), &["-c"], &dir.join("strace.out"));
    let started = Instant::now();
    for i in 0..REQUESTS {
        assert!(c.read_at(0, (i % 1000) * 4096, 4096, 0).is_ok());
    }
    eprintln!("{REQUESTS} requests under strace took {:?}", started.elapsed());
    let calls = counts(&strace.finish());
    drop(c);
    drop(daemon);
    calls
}

/// Calls per system call name from `strace -c`'s table.
fn counts(table: &str) -> HashMap<String, u64> {
    eprintln!("{table}");
    let mut calls = HashMap::new();
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors,] syscall
        if f.len() >= 5 && f[0].parse::<f64>().is_ok() {
            let name = f[f.len() - 1].to_string();
            if name != "total" {
                calls.insert(name, f[3].parse().unwrap());
            }
        }
    }
    calls
}

/// sched_yield is what a polling I/O thread does instead of spinning while the kernel still
/// works on its I/O (so a kernel worker may use the CPU): it is waiting, not per-request work.
const WAITING: &[&str] = &["sched_yield"];

/// Memory calls a queue makes a few times in its life, not per request: its shared latency
/// histograms are made at their first merge (glibc grows the I/O thread's arena with
/// mprotect, or maps a new one). Each is allowed up to this many calls in all.
const ONCE_PER_QUEUE: &[(&str, u64)] = &[("mprotect", 32), ("mmap", 8), ("brk", 8)];

fn assert_per_request(calls: &HashMap<String, u64>, allowed: &[(&str, f64)]) {
    let once = |name: &str| ONCE_PER_QUEUE.iter().find(|(n, _)| *n == name).map(|(_, max)| *max);
    for (name, n) in calls {
        if let Some(max) = once(name) {
            assert!(*n <= max, "{name}: {n} calls, more than once per queue: {calls:?}");
            continue;
        }
        assert!(
            allowed.iter().any(|(a, _)| a == name) || WAITING.contains(&name.as_str()),
            "unexpected system call {name} on the data path: {calls:?}"
        );
    }
    let total: u64 = calls
        .iter()
        .filter(|(name, _)| !WAITING.contains(&name.as_str()) && once(name).is_none())
        .map(|(_, n)| n)
        .sum();
    let budget: f64 = allowed.iter().map(|(_, per)| per).sum();
    for (name, per) in allowed {
        let n = calls.get(*name).copied().unwrap_or(0) as f64;
        assert!(
            n <= per * REQUESTS as f64 * 1.05 + 20.0,
            "{name}: {n} calls for {REQUESTS} requests: {calls:?}"
        );
    }
    assert!(
        total as f64 <= budget * REQUESTS as f64 * 1.05 + 40.0,
        "{total} system calls for {REQUESTS} requests, budget {budget}/request: {calls:?}"
    );
    for alloc in ["mmap", "munmap", "brk", "mremap"] {
        assert_eq!(
            calls.get(alloc).copied().unwrap_or(0),
            0,
            "{alloc} on the data path: {calls:?}"
        );
    }
}

#[test]
fn null_engine_makes_one_syscall_per_request_the_interrupt() {
    let dir = tmpdir();
    let calls = count_syscalls(dir.path(), "engine=null,size=64M,poll=always");
    assert_per_request(&calls, &[("write", 1.0)]);
}

#[test]
fn io_uring_engine_adds_one_io_uring_enter_per_request() {
    let dir = disk_dir();
    let image = dir.path().join("disk.raw");
    make_image(&image, 8 << 20, 1);
    let calls = count_syscalls(dir.path(), &format!("image={},poll=always", image.display()));
    assert_per_request(&calls, &[("io_uring_enter", 1.0), ("write", 1.0)]);
}

/// On tmpfs a small read is one preadv2 on the I/O thread, in place of the io_uring_enter
/// that would hand it to a kernel worker.
#[test]
fn io_uring_engine_on_tmpfs_reads_with_one_preadv2_per_request() {
    let dir = tmpdir();
    assert_eq!(blkplane::filesystem_of(dir.path()).as_deref(), Some("tmpfs"));
    let image = dir.path().join("disk.raw");
    make_image(&image, 8 << 20, 1);
    let calls = count_syscalls(dir.path(), &format!("image={},poll=always", image.display()));
    assert_per_request(&calls, &[("preadv2", 1.0), ("write", 1.0)]);
}

/// With default (adaptive) polling, an export whose client went quiet stops polling: its
/// threads sleep. A daemon that kept spinning would show a whole CPU here.
#[test]
fn an_idle_export_sleeps() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let daemon =
        Daemon::start(dir.path(), &[format!("socket={},engine=null,size=64M", sock.display())]);
    let mut c = Client::connect(&sock, 1);
    for i in 0..2000 {
        c.read_at(0, (i % 100) * 4096, 4096, 0).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = process_cpu_ns(daemon.pid() as u32);
    std::thread::sleep(Duration::from_secs(1));
    let used = process_cpu_ns(daemon.pid() as u32) - before;
    assert!(used < 50_000_000, "the idle daemon used {} ms of CPU in 1 s", used / 1_000_000);
}

/// A batch of 32 reads that reaches the I/O thread at once is handed to the kernel four at a
/// time (`SUBMIT_CHUNK`): the kernel starts the block requests of one io_uring_enter only
/// when the call ends, so a whole batch in one call kept the disk waiting for its last entry.
#[test]
fn a_batch_of_32_reads_goes_to_the_kernel_four_at_a_time() {
    const BATCHES: u64 = 50;
    let dir = disk_dir();
    let image = dir.path().join("disk.raw");
    make_image(&image, 8 << 20, 1);
    let sock = dir.path().join("blk.sock");
    // The thread sleeps between batches, so each arrives whole, with the client's one kick.
    let spec = format!("socket={},image={},poll=never", sock.display(), image.display());
    let daemon = Daemon::start(dir.path(), &[spec]);
    let mut c = Client::connect(&sock, 1);
    let batch = |c: &mut Client, b: u64| {
        for i in 0..32u64 {
            let iov = c.segments(i as usize * 4096, 4096);
            let offset = (b * 32 + i) % 2048 * 4096;
            c.queues[0].readv(offset, iov.as_ptr(), 1, i as usize, ReqFlags::empty());
        }
        let done = c.completions(0, 32, Duration::from_secs(20));
        assert_eq!(done.len(), 32, "batch {b}");
        assert!(done.iter().all(|(_, ret)| *ret == 0), "batch {b}: {done:?}");
    };
    batch(&mut c, 0);
    let strace = Strace::attach(
        daemon.pid(),
        &["-c", "-e", "trace=io_uring_enter"],
        &dir.path().join("strace.out"),
    );
    for b in 1..=BATCHES {
        batch(&mut c, b);
    }
    let enters = counts(&strace.finish()).get("io_uring_enter").copied().unwrap_or(0);
    assert!(
        (7 * BATCHES..=9 * BATCHES).contains(&enters),
        "{enters} io_uring_enter calls for {BATCHES} batches of 32 reads: not 8 a batch"
    );
    drop(c);
    drop(daemon);
}
