//! Test support: a real blkplane daemon process, images, and a libblkio client.
#![allow(dead_code)]

pub mod behind;
pub mod ceph;
pub mod frontend;
pub mod nbd;
pub mod netns;
pub mod no_ceph;
pub mod raw;
pub mod tls;

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub const BIN: &str = env!("CARGO_BIN_EXE_blkplane");

/// The daemon binary the tests start: this build's, or `BLKPLANE_TEST_BIN` (to show that a
/// new test fails on an older build).
pub fn daemon_bin() -> String {
    std::env::var("BLKPLANE_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A running `blkplane serve`, stopped (SIGTERM) when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub log_path: PathBuf,
    /// What the daemon's exports are behind (see [`behind::on`]); they go after it.
    backends: Vec<behind::Backend>,
}

/// The I/O thread model a test's daemons run with (see [`on_threads`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// The daemon's defaults: a shared pool, one thread per CPU.
    Default,
    /// A shared pool of one thread: every queue of every export on it.
    OneShared,
    /// `iothread=dedicated` on every export: a thread of its own per queue.
    Dedicated,
}

thread_local! {
    static THREADS: std::cell::Cell<Threads> = const { std::cell::Cell::new(Threads::Default) };
}

/// Runs `test` with the daemons it starts through [`Daemon::start`] on `threads`.
pub fn on_threads(threads: Threads, test: fn()) {
    THREADS.with(|t| t.set(threads));
    test();
}

impl Daemon {
    /// Starts the daemon with `--export` for each spec and waits until every socket answers.
    /// The thread model is the test's (see [`on_threads`]).
    pub fn start(dir: &Path, exports: &[String]) -> Daemon {
        let mut args = Vec::new();
        let mut sockets = Vec::new();
        let threads = THREADS.with(|t| t.get());
        if threads == Threads::OneShared {
            args.extend(["--pool-threads".to_string(), "1".to_string()]);
        }
        let mut backends = Vec::new();
        for e in exports {
            let (e, backend) = behind::serve_behind(e, dir);
            backends.extend(backend);
            let e = &e;
            args.push("--export".to_string());
            let own_threads = ["iothread=", "poll=", "poll-max-us=", "cpus="];
            if threads == Threads::Dedicated && !own_threads.iter().any(|k| e.contains(k)) {
                args.push(format!("{e},iothread=dedicated"));
            } else {
                args.push(e.clone());
            }
            let sock = e
                .split(',')
                .find_map(|kv| kv.strip_prefix("socket="))
                .expect("export has a socket");
            sockets.push(PathBuf::from(sock));
        }
        let mut daemon = Self::start_with(dir, &args, &sockets);
        daemon.backends = backends;
        daemon
    }

    /// Starts a daemon with a control socket (`DIR/ctl.sock`) and no export yet.
    pub fn control_only(dir: &Path) -> (Daemon, PathBuf) {
        let control = dir.join("ctl.sock");
        let args = ["--control".to_string(), control.display().to_string()];
        (Self::start_with(dir, &args, std::slice::from_ref(&control)), control)
    }

    /// Starts `blkplane serve ARGS` and waits until every socket of `wait_for` answers.
    pub fn start_with(dir: &Path, args: &[String], wait_for: &[PathBuf]) -> Daemon {
        Self::start_command(dir, Command::new(daemon_bin()), args, wait_for)
    }

    /// As [`Daemon::start_with`], with `cmd` (the daemon binary, or a command that ends in
    /// executing it, as [`no_ceph::hiding_ceph`] does) as the program.
    pub fn start_command(
        dir: &Path,
        mut cmd: Command,
        args: &[String],
        wait_for: &[PathBuf],
    ) -> Daemon {
        let log_path = dir
            .join(format!("daemon-{}.log", std::process::id() as u64 * 1000 + rand_u16() as u64));
        let log = fs::File::create(&log_path).unwrap();
        cmd.arg("serve").arg("--log-level").arg("debug").args(args);
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("spawn blkplane");
        let mut d = Daemon { child: Some(child), log_path, backends: Vec::new() };
        for sock in wait_for {
            d.wait_for_socket(sock);
        }
        d
    }

    fn wait_for_socket(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(sock).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({status}) before listening:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("socket {} never appeared:\n{}", sock.display(), self.log());
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends SIGTERM and waits (at most 20 s) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        self.stop_after_signal()
    }

    /// Waits (at most 20 s) for the exit status after a signal was sent.
    pub fn stop_after_signal(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                for b in &self.backends {
                    b.daemon_stopped();
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash or the OOM killer would end it; returns once it is gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How many threads process `pid` has (from /proc/PID/task), not counting io_uring's
/// workers (`iou-wrk-*`: the kernel's, started and ended with the I/O it punts).
pub fn thread_count(pid: i32) -> usize {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| !name.starts_with("iou-"))
        .count()
}

/// How many of io_uring's kernel workers (`iou-wrk-*`, which run the operations a ring
/// punts) process `pid` has now.
pub fn io_uring_workers(pid: i32) -> usize {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("iou-wrk"))
        .count()
}

/// How many descriptors process `pid` has open (from /proc/PID/fd).
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `blkplane ctl --control CONTROL ARGS...`, run to its end.
pub fn ctl(control: &Path, args: &[&str]) -> std::process::Output {
    Command::new(daemon_bin())
        .args(["ctl", "--control"])
        .arg(control)
        .args(args)
        .output()
        .expect("run blkplane ctl")
}

/// A child process killed when the test ends, also when it fails (a server left running
/// would outlive the test and hold its output open).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `blkplane serve --export E...` run to its end: for exports that must be refused at start.
/// A daemon that serves instead is killed after 30 s and fails the test (rather than hang it).
pub fn serve_refused(exports: &[String]) -> std::process::Output {
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve");
    for e in exports {
        cmd.arg("--export").arg(e);
    }
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run blkplane serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("blkplane serve was not refused: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Exit status 2 and exactly one line on stderr, which says `want`.
pub fn assert_usage_error(out: &std::process::Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line, got: {stderr}");
    assert!(stderr.contains(want), "wanted {want:?} in: {stderr}");
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    u16::from_le_bytes(b)
}

/// A directory on a disk filesystem (ext4 here), where O_DIRECT asks for aligned buffers.
pub fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("blkplane-test").tempdir_in("/var/tmp").unwrap()
}

/// A temporary directory, on tmpfs when /dev/shm is there (O_DIRECT works on it).
pub fn tmpdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::Builder::new().prefix("blkplane-test").tempdir_in(shm).unwrap()
    } else {
        tempfile::Builder::new().prefix("blkplane-test").tempdir().unwrap()
    }
}

/// The byte a deterministic pattern has at `offset`, for a given `seed`.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (x >> 29) as u8 ^ (offset as u8)
}

pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(seed, offset + i)).collect()
}

/// Creates an image of `size` bytes filled with pattern `seed`.
pub fn make_image(path: &Path, size: u64, seed: u64) {
    let mut data = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let chunk = (size - off).min(1 << 20) as usize;
        data.extend(pattern(seed, off, chunk));
        off += chunk as u64;
    }
    fs::write(path, data).unwrap();
}

/// A libblkio virtio-blk-vhost-user client with one buffer region shared with the daemon.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub buf: MemoryRegion,
    pub blkio: Blkio,
    /// The device's size_max, as libblkio reports it: a driver splits buffers at it.
    pub max_segment_bytes: usize,
}

pub const CLIENT_BUF_BYTES: usize = 8 << 20;

impl Client {
    pub fn connect(sock: &Path, num_queues: i32) -> Client {
        Self::try_connect(sock, num_queues, false).unwrap_or_else(|e| panic!("connect: {e}"))
    }

    pub fn try_connect(
        sock: &Path,
        num_queues: i32,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", sock.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        let started = b.start()?;
        let buf = b.alloc_mem_region(CLIENT_BUF_BYTES)?;
        b.map_mem_region(&buf)?;
        let max_segment_bytes = match b.get_i32("max-segment-len")? {
            n if n > 0 => n as usize,
            _ => usize::MAX,
        };
        Ok(Client { queues: started.queues, buf, blkio: b, max_segment_bytes })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// Pointer into the shared buffer region.
    pub fn buf_ptr(&self, at: usize) -> *mut u8 {
        assert!(at < self.buf.len);
        (self.buf.addr + at) as *mut u8
    }

    #[allow(clippy::mut_from_ref)] // the region is shared memory, not owned by self
    pub fn buf_slice(&self, at: usize, len: usize) -> &mut [u8] {
        assert!(at + len <= self.buf.len);
        // SAFETY: inside the region libblkio allocated for us and keeps mapped.
        unsafe { std::slice::from_raw_parts_mut(self.buf_ptr(at), len) }
    }

    /// Waits for exactly one completion on queue `q` and returns its `ret`.
    pub fn wait_one(&mut self, q: usize) -> i32 {
        let mut c = [std::mem::MaybeUninit::<Completion>::uninit()];
        let mut timeout = Duration::from_secs(20);
        let n = self.queues[q].do_io(&mut c, 1, Some(&mut timeout), None).expect("do_io");
        assert_eq!(n, 1, "no completion within 20 s");
        // SAFETY: do_io initialised n = 1 entries.
        unsafe { c[0].assume_init_read() }.ret
    }

    /// The buffer region `[at, at + len)` as segments of at most size_max, the way a
    /// virtio-blk driver hands a large buffer to the device.
    pub fn segments(&self, at: usize, len: usize) -> Vec<libc::iovec> {
        let step = self.max_segment_bytes;
        (0..len)
            .step_by(step)
            .map(|o| libc::iovec {
                iov_base: self.buf_ptr(at + o).cast(),
                iov_len: step.min(len - o),
            })
            .collect()
    }

    /// Writes `data` at `offset` through queue `q` (data staged at buffer offset `at`).
    pub fn write_at(&mut self, q: usize, offset: u64, data: &[u8], at: usize) -> i32 {
        self.buf_slice(at, data.len()).copy_from_slice(data);
        let iovs = self.segments(at, data.len());
        self.queues[q].writev(offset, iovs.as_ptr(), iovs.len() as u32, 0, ReqFlags::empty());
        self.wait_one(q)
    }

    /// Reads `len` bytes at `offset` through queue `q` into buffer offset `at`.
    pub fn read_at(
        &mut self,
        q: usize,
        offset: u64,
        len: usize,
        at: usize,
    ) -> Result<Vec<u8>, i32> {
        self.buf_slice(at, len).fill(0xEE);
        let iovs = self.segments(at, len);
        self.queues[q].readv(offset, iovs.as_ptr(), iovs.len() as u32, 0, ReqFlags::empty());
        match self.wait_one(q) {
            0 => Ok(self.buf_slice(at, len).to_vec()),
            err => Err(err),
        }
    }

    /// Completions of queue `q` that arrive within `timeout` (at most `max`), as
    /// (user_data, ret): an empty list means the requests are still waiting.
    pub fn completions(&mut self, q: usize, max: usize, timeout: Duration) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while out.len() < max {
            let mut c = [std::mem::MaybeUninit::<Completion>::uninit()];
            let mut left = deadline.saturating_duration_since(Instant::now());
            let n = self.queues[q].do_io(&mut c, 0, Some(&mut left), None).expect("do_io");
            if n == 1 {
                // SAFETY: do_io initialised n = 1 entries.
                let done = unsafe { c[0].assume_init_read() };
                out.push((done.user_data, done.ret));
            } else if Instant::now() >= deadline {
                break;
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        out
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait_one(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait_one(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, flags: ReqFlags) -> i32 {
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.wait_one(q)
    }
}

/// strace following every thread of a running process, writing to a file.
pub struct Strace {
    child: Child,
    out: PathBuf,
}

impl Strace {
    /// Attaches to `pid` with the extra `options` (e.g. `-c`, `-e trace=...`) and waits until
    /// it is in place (strace attaches every thread before it reports anything).
    pub fn attach(pid: i32, options: &[&str], out: &Path) -> Strace {
        let child = Command::new("strace")
            .arg("-f")
            .args(options)
            .arg("-o")
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .expect("strace must be installed (scripts/test installs it)");
        std::thread::sleep(Duration::from_millis(1500));
        Strace { child, out: out.to_path_buf() }
    }

    /// Detaches and returns what strace wrote.
    pub fn finish(mut self) -> String {
        signal(self.child.id() as i32, libc::SIGINT);
        self.child.wait().unwrap();
        fs::read_to_string(&self.out).unwrap()
    }
}

/// A filesystem mounted for a test (root only), unmounted (lazily) when dropped.
pub struct Mount(pub PathBuf);

impl Mount {
    /// `mount -t FSTYPE [-o OPTIONS] blkplane-test AT`, creating AT.
    pub fn new(fstype: &str, options: Option<&str>, at: &Path) -> Result<Mount, String> {
        fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fstype]);
        if let Some(o) = options {
            cmd.args(["-o", o]);
        }
        let out = cmd.arg("blkplane-test").arg(at).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("mount -t {fstype}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A figure from /proc/PID/status given in kB (VmRSS, VmHWM, ...), in bytes.
pub fn proc_status_bytes(pid: i32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb << 10
}

/// A pipe: (read end, write end).
pub fn pipe() -> (fs::File, fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds we own.
    unsafe {
        use std::os::fd::FromRawFd;
        (fs::File::from_raw_fd(fds[0]), fs::File::from_raw_fd(fds[1]))
    }
}

/// A cgroup (v1 blkio) that caps the I/O operations per second its processes may do on the
/// block device holding a file: real I/O that stays in flight long enough for a test to look
/// at it, or to kill the daemon under it. Removed when dropped.
pub struct Throttle {
    dir: PathBuf,
}

impl Throttle {
    /// `iops` reads and writes per second on the device of `file` (which must be on a block
    /// device, as `disk_dir()` is).
    pub fn new(file: &Path, iops: u32) -> Throttle {
        Self::new_split(file, iops, iops)
    }

    /// Reads and writes limited apart: requests then complete out of the order they were
    /// taken in (reads overtake writes).
    pub fn new_split(file: &Path, read_iops: u32, write_iops: u32) -> Throttle {
        use std::os::unix::fs::MetadataExt;
        let dev = fs::metadata(file).unwrap().dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let root = Path::new("/sys/fs/cgroup/blkio");
        assert!(
            root.join("blkio.throttle.read_iops_device").exists(),
            "this test needs the cgroup v1 blkio controller at {}",
            root.display()
        );
        let dir = root.join(format!("blkplane-test-{}-{}", std::process::id(), rand_u16()));
        fs::create_dir(&dir).unwrap();
        for (knob, iops) in [
            ("blkio.throttle.read_iops_device", read_iops),
            ("blkio.throttle.write_iops_device", write_iops),
        ] {
            fs::write(dir.join(knob), format!("{major}:{minor} {iops}"))
                .unwrap_or_else(|e| panic!("{knob} for {major}:{minor}: {e}"));
        }
        Throttle { dir }
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: i32) {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = fs::write("/sys/fs/cgroup/blkio/cgroup.procs", pid);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Reads and writes through a libblkio client until stopped; returns (requests, failures).
pub fn background_io(
    sock: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 1);
        let (mut n, mut failed) = (0u64, 0u64);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let off = (n % 256) * 4096;
            if n % 2 == 0 {
                failed += u64::from(c.write_at(0, off, &[0x33; 4096], 0) != 0);
            } else {
                failed += u64::from(c.read_at(0, off, 4096, 0).is_err());
            }
            n += 1;
        }
        (n, failed)
    })
}

/// Waits until `cond` holds, looking every 2 ms; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The words a POSIX shell makes of `text` (a command line a tool printed, with `\`
/// continuations and quoting), leaving out its `#` comment lines.
pub fn shell_words(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("printf '%s\\0' {}", lines.join("\n")))
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// A port free on the loopback now, for a test's daemon, server or Prometheus to bind next.
///
/// It is taken outside the kernel's ephemeral range (below it, or above it where it starts
/// low): a port the kernel handed out (`bind` to port 0) is free only until the next outgoing
/// connection, which may be given it as its own local port before the daemon binds it
/// ("Address already in use"). Outside that range only an explicit bind can take it, and
/// each call in this process gets a different one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static CALLS: AtomicU16 = AtomicU16::new(0);
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let ends: Vec<u16> = range.split_whitespace().map(|p| p.parse().unwrap()).collect();
    let (lowest, span) = match (ends[0], ends[1]) {
        (low, _) if low > 11_000 => (10_000, low - 10_000),
        (_, high) if high < 64_535 => (high + 1, u16::MAX - high),
        _ => panic!("no room for test ports outside the ephemeral range {range:?}"),
    };
    // Test binaries run one at a time; a start drawn once at random keeps a rerun off the
    // last run's ports, which may still be in TIME_WAIT.
    static START: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    let start = *START.get_or_init(rand_u16) % span;
    for _ in 0..span {
        let offset =
            (u32::from(start) + u32::from(CALLS.fetch_add(1, Ordering::Relaxed))) % u32::from(span);
        let port = lowest + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port outside the ephemeral range {range:?}");
}

/// `GET path` over HTTP/1.0 with `headers` (each ending in CRLF): the response head and body.
pub fn http_get(addr: &str, path: &str, headers: &str) -> (String, Vec<u8>) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A daemon that refuses at once (503) may close before the request is written.
    let _ = write!(s, "GET {path} HTTP/1.0\r\n{headers}\r\n");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(reply.len());
    let head = String::from_utf8_lossy(&reply[..split]).to_string();
    (head, reply.get(split + 4..).unwrap_or_default().to_vec())
}
