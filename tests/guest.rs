//! An unmodified Linux guest under QEMU (TCG) uses blkplane as its disk.
//!
//! `scripts/guest-assets.sh` fetches and caches QEMU, a Debian kernel, busybox and fio;
//! `scripts/guest-init.sh` is the guest's /init, which checks the disk and prints its verdict
//! on the serial console. Here we serve an image with the real daemon, boot the guest, and
//! afterwards check on the host that the guest's bytes are in the image file.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{make_image, rand_u16, tmpdir, Daemon};

const IMAGE_BYTES: u64 = 64 << 20;
/// A hung guest or daemon fails the test after this long.
const GUEST_TIMEOUT_S: u32 = 240;

fn assets() -> &'static Path {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    CACHE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest-assets.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/guest-assets.sh");
        assert!(out.status.success(), "fetching the guest assets failed");
        let stdout = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(stdout.lines().last().expect("cache path").trim())
    })
}

struct Scenario {
    name: &'static str,
    /// Grow the export to this size through the control socket while the guest runs.
    resize_to: Option<u64>,
    vcpus: u16,
    queues: u16,
    readonly: bool,
    cache: &'static str,
    serial: &'static str,
    /// QEMU's vCPUs, memory and disk come from `blkplane vm-config --for qemu`.
    vm_config: bool,
    /// The image behind a network backend instead of served from the file (it is written
    /// back to the file when the daemon stops, for the same checks).
    behind: Option<common::behind::Behind>,
    /// The rings' layout QEMU asks for; the daemon's statistics must show it in use.
    ring: Ring,
}

/// QEMU (TCG) booting the test's kernel and initramfs with `append`, under `timeout`, without
/// vCPUs, memory or disks yet; the caller adds them, sets stdio and spawns it.
fn qemu_base(cache: &Path, append: &str) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(GUEST_TIMEOUT_S.to_string())
        .arg(cache.join("qemu/usr/bin/qemu-system-x86_64"))
        .env("QEMU_MODULE_DIR", cache.join("qemu/usr/lib/x86_64-linux-gnu/qemu"))
        .args(["-L", &cache.join("qemu/usr/share/qemu").display().to_string()])
        .args(["-L", &cache.join("qemu/usr/share/seabios").display().to_string()])
        .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-kernel", &cache.join("vmlinux").display().to_string()])
        .args(["-initrd", &cache.join("initramfs.cpio").display().to_string()])
        .args(["-append", append])
        .args(["-display", "none", "-nodefaults", "-serial", "stdio", "-no-reboot"]);
    cmd
}

/// [`qemu_base`] with `vcpus`, 512 MiB of shared memory and one vhost-user-blk disk per
/// (socket, queues).
fn qemu(
    cache: &Path,
    vcpus: u16,
    disks: &[(&Path, u16)],
    reconnect: bool,
    append: &str,
) -> Command {
    qemu_on(cache, vcpus, disks, reconnect, append, Ring::Split)
}

/// The virtqueue layout QEMU's vhost-user-blk-pci device asks for (its `packed` property).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ring {
    Split,
    Packed,
}

impl Ring {
    fn name(self) -> &'static str {
        match self {
            Ring::Split => "split",
            Ring::Packed => "packed",
        }
    }
}

/// [`qemu`] with the disks' rings in layout `ring`.
fn qemu_on(
    cache: &Path,
    vcpus: u16,
    disks: &[(&Path, u16)],
    reconnect: bool,
    append: &str,
    ring: Ring,
) -> Command {
    let packed = if ring == Ring::Packed { ",packed=on" } else { "" };
    let mut cmd = qemu_base(cache, append);
    cmd.args(["-m", "512M", "-smp", &vcpus.to_string()]).args([
        "-object",
        "memory-backend-memfd,id=mem,size=512M,share=on",
        "-numa",
        "node,memdev=mem",
    ]);
    for (i, (sock, queues)) in disks.iter().enumerate() {
        let reconnect = if reconnect { ",reconnect=1" } else { "" };
        cmd.args(["-chardev", &format!("socket,id=char{i},path={}{reconnect}", sock.display())])
            .args([
                "-device",
                &format!("vhost-user-blk-pci,chardev=char{i},num-queues={queues}{packed}"),
            ]);
    }
    cmd
}

/// The arguments `blkplane vm-config --for qemu` gives for export `id` of the daemon at
/// `control`, split into words by a shell as a user's shell would.
fn vm_config_args(control: &Path, id: &str, vcpus: u16) -> Vec<String> {
    let out = Command::new(common::daemon_bin())
        .args(["vm-config", "--for", "qemu", "--control"])
        .arg(control)
        .args(["--id", id, "--vcpus", &vcpus.to_string(), "--memory", "512M"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "vm-config: {}", String::from_utf8_lossy(&out.stderr));
    // The comment lines first say what the arguments follow; the rest is one command's worth.
    let args = common::shell_words(&text);
    assert!(args.contains(&"-device".to_string()), "vm-config printed:\n{text}");
    args
}

/// The guest's `BLKPLANE-CHECK` lines of `console` (what it verified), one a line.
fn check_lines(console: &str) -> String {
    console.lines().filter(|l| l.starts_with("BLKPLANE-CHECK")).collect::<Vec<_>>().join("\n")
}

/// Checks every "PREFIX offset length md5" line of the guest's console against `image`;
/// returns how many there were.
fn check_md5s(console: &str, prefix: &str, image: &[u8], dir: &Path) -> usize {
    let lines: Vec<&str> = console.lines().filter(|l| l.starts_with(prefix)).collect();
    for line in &lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len): (usize, usize) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        assert_eq!(
            md5_of(&image[off..off + len], dir),
            f[3],
            "{prefix}: image bytes at {off}+{len}"
        );
    }
    lines.len()
}

fn md5_of(bytes: &[u8], dir: &Path) -> String {
    let p = dir.join("md5-input");
    fs::write(&p, bytes).unwrap();
    let out = Command::new("md5sum").arg(&p).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

fn run(s: &Scenario) {
    let cache = assets();
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 77);
    let original = fs::read(&image).unwrap();
    let spec = format!(
        "socket={},image={},queues={},cache={},serial={},readonly={},packed-ring={}",
        sock.display(),
        image.display(),
        s.queues,
        s.cache,
        s.serial,
        if s.readonly { "on" } else { "off" },
        if s.ring == Ring::Packed { "on" } else { "off" }
    );
    let ctl = dir.path().join("ctl.sock");
    let backend = s.behind.map(|b| common::behind::spec_behind(b, &spec, dir.path()));
    let spec = backend.as_ref().map_or(spec.clone(), |(spec, _)| spec.clone());
    let mut daemon = Daemon::start_with(
        dir.path(),
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--export".into(),
            format!("id=disk,{spec}"),
        ],
        &[ctl.clone(), sock.clone()],
    );
    let runid = format!("{:04x}{:04x}{}", rand_u16(), rand_u16(), std::process::id());
    let wce = u8::from(matches!(s.cache, "none" | "writeback" | "unsafe"));
    let mode = match (s.resize_to, s.readonly) {
        (Some(_), _) => "resize",
        (None, true) => "ro",
        (None, false) => "rw",
    };
    let append = format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 blkplane.mode={mode} blkplane.runid={runid} \
         blkplane.sectors={} blkplane.serial={} blkplane.queues={} blkplane.wce={wce} \
         blkplane.newsectors={}",
        IMAGE_BYTES / 512,
        s.serial,
        s.queues,
        s.resize_to.unwrap_or(0) / 512,
    );
    let console_path = dir.path().join("console.log");
    let console = fs::File::create(&console_path).unwrap();
    let mut guest = if s.vm_config {
        let mut cmd = qemu_base(cache, &append);
        cmd.args(vm_config_args(&ctl, "disk", s.vcpus));
        cmd
    } else {
        qemu_on(cache, s.vcpus, &[(&sock, s.queues)], false, &append, s.ring)
    };
    let mut guest = guest
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .spawn()
        .expect("start QEMU");
    if let Some(new_size) = s.resize_to {
        // Wait for the guest to be ready, then resize through the control socket.
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(u64::from(GUEST_TIMEOUT_S));
        while !fs::read_to_string(&console_path)
            .unwrap_or_default()
            .contains("BLKPLANE-WAIT-RESIZE")
        {
            if guest.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = common::ctl(&ctl, &["resize", "id=disk", &format!("size={new_size}")]);
        assert!(out.status.success(), "resize failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let status = guest.wait().expect("wait for QEMU");
    let console = fs::read_to_string(&console_path).unwrap_or_default();
    let rings = rings_used(&ctl);
    let daemon_alive = daemon.alive();
    let stopped = daemon.stop();
    if let Some((_, Some(b))) = &backend {
        b.daemon_stopped();
    }
    let report = || format!("--- console ---\n{console}\n--- daemon log ---\n{}", daemon.log());
    assert!(
        status.code() != Some(124),
        "{}: guest timed out after {GUEST_TIMEOUT_S} s\n{}",
        s.name,
        report()
    );
    assert!(daemon_alive, "{}: daemon died while the guest ran\n{}", s.name, report());
    assert!(stopped.success(), "{}: daemon exit {stopped}\n{}", s.name, report());
    assert!(
        !console.contains("BLKPLANE-FAIL"),
        "{}: the guest reported a failure\n{}",
        s.name,
        report()
    );
    assert!(
        console.contains("BLKPLANE-PASS"),
        "{}: no verdict from the guest\n{}",
        s.name,
        report()
    );

    // Every queue the guest used ran on the ring layout QEMU was told to ask for.
    assert_eq!(
        rings,
        vec![s.ring.name(); usize::from(s.queues)],
        "{}: the queues' rings (query-stats)",
        s.name
    );
    // The guest's bytes are in the image file.
    let img = fs::read(&image).unwrap();
    let checked = check_md5s(&console, "BLKPLANE-MD5 ", &img, dir.path());
    assert!(checked > 0, "{}: no checksums from the guest", s.name);
    if let Some(new_size) = s.resize_to {
        assert_eq!(img.len() as u64, new_size, "{}: image file size after the resize", s.name);
    } else if s.readonly {
        assert!(img == original, "{}: the read-only image changed", s.name);
    } else {
        let id = format!("BLKPLANE-RUN-{runid}");
        assert_eq!(&img[..id.len()], id.as_bytes(), "{}: run id not in the image", s.name);
    }
    eprintln!(
        "{}: guest passed\n{}",
        s.name,
        console.lines().filter(|l| l.starts_with("BLKPLANE")).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn linux_guest_one_vcpu_one_queue() {
    run(&Scenario {
        name: "1 vCPU, 1 queue",
        resize_to: None,
        vcpus: 1,
        queues: 1,
        readonly: false,
        cache: "none",
        serial: "guest-disk-1",
        vm_config: false,
        behind: None,
        ring: Ring::Split,
    });
}

/// Its QEMU arguments (vCPUs, shared memory, the reconnecting disk) are those `blkplane
/// vm-config --for qemu` prints for the running export.
#[test]
fn linux_guest_two_vcpus_two_queues() {
    run(&Scenario {
        name: "2 vCPUs, 2 queues",
        resize_to: None,
        vcpus: 2,
        queues: 2,
        readonly: false,
        cache: "writethrough",
        serial: "guest-disk-2",
        vm_config: true,
        behind: None,
        ring: Ring::Split,
    });
}

/// `packed=on`: the guest's verified I/O runs on packed rings, and the daemon says so.
#[test]
fn linux_guest_on_packed_rings() {
    run(&Scenario {
        name: "2 vCPUs, 2 packed queues",
        resize_to: None,
        vcpus: 2,
        queues: 2,
        readonly: false,
        cache: "none",
        serial: "guest-disk-packed",
        vm_config: false,
        behind: None,
        ring: Ring::Packed,
    });
}

#[test]
fn linux_guest_readonly() {
    run(&Scenario {
        name: "read-only",
        resize_to: None,
        vcpus: 1,
        queues: 1,
        readonly: true,
        cache: "none",
        serial: "guest-disk-ro",
        vm_config: false,
        behind: None,
        ring: Ring::Split,
    });
}

#[test]
fn linux_guest_sees_a_resize_without_reboot() {
    run(&Scenario {
        name: "resize",
        resize_to: Some(IMAGE_BYTES * 2),
        vcpus: 1,
        queues: 1,
        readonly: false,
        cache: "none",
        serial: "guest-disk-rs",
        vm_config: false,
        behind: None,
        ring: Ring::Split,
    });
}

/// The guest's disk is an RBD image of the test command's Ceph cluster, with librbd's
/// write-back cache (cache=writeback): the guest's checks pass, and its writes are in the
/// image, read back after the daemon stopped.
#[test]
fn linux_guest_on_rbd() {
    run(&Scenario {
        name: "RBD",
        resize_to: None,
        vcpus: 1,
        queues: 1,
        readonly: false,
        cache: "writeback",
        serial: "guest-disk-rbd",
        vm_config: false,
        behind: Some(common::behind::Behind::Rbd),
        ring: Ring::Split,
    });
}

/// A Linux guest's own fio, at depth 16, is held to its disk's rate limit (iops-total=300):
/// the IOPS fio reports in the guest are the limit's, a tenth of a second's burst spread
/// over its 6 s included.
#[test]
fn linux_guest_is_held_to_its_limit() {
    let cache = assets();
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 78);
    let export = format!(
        "id=disk,socket={},image={},serial=limited,iops-total=300",
        sock.display(),
        image.display()
    );
    let mut daemon =
        Daemon::start_with(dir.path(), &["--export".into(), export], std::slice::from_ref(&sock));
    let append = format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 blkplane.mode=limit blkplane.sectors={} \
         blkplane.serial=limited blkplane.queues=1 blkplane.wce=1",
        IMAGE_BYTES / 512
    );
    let console_path = dir.path().join("console.log");
    let console = fs::File::create(&console_path).unwrap();
    let status = qemu(cache, 1, &[(&sock, 1)], false, &append)
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .status()
        .expect("run QEMU");
    let console = fs::read_to_string(&console_path).unwrap_or_default();
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(status.code() != Some(124), "the guest timed out\n{console}");
    assert!(console.contains("BLKPLANE-PASS"), "no verdict from the guest\n{console}");
    let iops: f64 = console
        .lines()
        .find_map(|l| l.strip_prefix("BLKPLANE-IOPS "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no IOPS figure from the guest\n{console}"));
    eprintln!("the guest's fio under iops-total=300: {iops} IOPS");
    assert!(
        (285.0..=320.0).contains(&iops),
        "{iops} IOPS in the guest under iops-total=300\n{console}"
    );
}

/// Requests the exports have answered since their daemon started (query-stats on the control
/// socket); None while the daemon does not answer.
fn answered(ctl: &Path) -> Option<u64> {
    let v = query_stats(ctl)?;
    let exports = v["result"].as_array()?;
    Some(
        exports
            .iter()
            .flat_map(|e| e["queues"].as_array().into_iter().flatten())
            .flat_map(|q| q["requests"].as_object().into_iter().flat_map(|m| m.values()))
            .filter_map(|n| n.as_u64())
            .sum(),
    )
}

/// query-stats on the control socket; None while the daemon does not answer.
fn query_stats(ctl: &Path) -> Option<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(ctl).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"{\"id\":1,\"command\":\"query-stats\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// The ring layout ("split", "packed") of every queue that answered requests, as
/// query-stats reports it.
fn rings_used(ctl: &Path) -> Vec<String> {
    let v = query_stats(ctl).unwrap_or_default();
    let queues = v["result"].as_array().into_iter().flatten().flat_map(|e| {
        e["queues"].as_array().into_iter().flatten().filter(|q| {
            let requests = q["requests"].as_object().into_iter().flat_map(|m| m.values());
            requests.filter_map(|n| n.as_u64()).sum::<u64>() > 0
        })
    });
    queues.map(|q| q["ring"].as_str().unwrap_or("none").to_string()).collect()
}

/// Types `word` on the guest's console, again every second, until `done` (a line can be lost
/// on the way: typed while the guest reads with a timeout, or while a migrated guest is not
/// yet running).
fn type_until(
    console: &mut std::process::ChildStdin,
    word: &str,
    deadline: Instant,
    mut done: impl FnMut() -> bool,
) {
    use std::io::Write;
    while !done() {
        assert!(Instant::now() < deadline, "the guest never heard {word:?}");
        // A guest that has stopped reading may have closed the console: nothing to do then.
        let _ = writeln!(console, "{word}");
        for _ in 0..50 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits until `cond` holds, failing the test at `deadline`.
fn wait_for(what: &str, deadline: Instant, cond: impl FnMut() -> bool) {
    common::wait_until(what, deadline.saturating_duration_since(Instant::now()), cond);
}

/// How a daemon of the restart test goes away.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill,
    Term,
}

/// The daemon of the restart test, started again on the same socket, control socket and image.
struct Restarting {
    dir: PathBuf,
    args: Vec<String>,
    waits: Vec<PathBuf>,
    ctl: PathBuf,
    daemon: Option<Daemon>,
    /// Every daemon's log, in order.
    logs: String,
}

impl Restarting {
    fn start(&mut self) {
        self.daemon = Some(Daemon::start_with(&self.dir, &self.args, &self.waits));
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().unwrap()
    }

    /// Ends the daemon the given way and starts the next; returns (kill → listening again,
    /// kill → first guest request answered by the new daemon).
    fn restart(&mut self, how: Stop, deadline: Instant) -> (Duration, Duration) {
        let mut old = self.daemon.take().unwrap();
        let t0 = Instant::now();
        match how {
            Stop::Kill => old.kill(),
            Stop::Term => assert!(old.stop().success(), "SIGTERM exit\n{}", old.log()),
        }
        self.logs.push_str(&old.log());
        self.start();
        let listening = t0.elapsed();
        wait_for("the guest's first request after the restart", deadline, || {
            answered(&self.ctl).unwrap_or(0) > 0
        });
        (listening, t0.elapsed())
    }
}

/// A Linux guest runs fio with verification while the daemon is killed (SIGKILL) four times
/// at random moments, two of them with many requests in flight completing out of order (a
/// blkio cgroup lets reads overtake writes), stopped once with SIGTERM, and killed once more
/// with a FLUSH in flight on a second disk; QEMU's chardevs reconnect each time, the
/// inflight regions bring back what was in flight, and the guest sees no error.
#[test]
fn linux_guest_survives_daemon_kills_and_restarts() {
    let stops = [
        (Stop::Kill, false),
        (Stop::Kill, true),
        (Stop::Term, false),
        (Stop::Kill, false),
        (Stop::Kill, true),
    ];
    restart_run(Ring::Split, &stops, true);
}

/// `packed=on` across restarts: the guest's fio verify runs on packed rings while the daemon
/// is killed twice (once with many requests in flight completing out of order) and stopped
/// once; QEMU 7.2 cannot tell a packed ring's positions after losing its daemon, so the next
/// daemon takes them, and the requests to resubmit, from the packed inflight region.
#[test]
fn linux_guest_on_packed_rings_survives_daemon_kills() {
    let stops = [(Stop::Kill, true), (Stop::Kill, false), (Stop::Term, false)];
    restart_run(Ring::Packed, &stops, false);
}

/// The restart tests: `stops`, each (how, with requests completing out of order), while the
/// guest's fio verifies on rings of layout `ring`; then, if `flush_kill`, kills with a FLUSH
/// in flight on the second disk.
fn restart_run(ring: Ring, stops: &[(Stop, bool)], flush_kill: bool) {
    let cache = assets();
    let dir = common::disk_dir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    let wb_image = dir.path().join("wb.raw");
    let wb_sock = dir.path().join("wb.sock");
    let ctl = dir.path().join("ctl.sock");
    make_image(&image, IMAGE_BYTES, 78);
    make_image(&wb_image, IMAGE_BYTES, 79);
    let args = vec![
        "--image-lock-wait-ms".to_string(),
        "30000".to_string(),
        "--control".to_string(),
        ctl.display().to_string(),
        "--export".to_string(),
        format!(
            "id=disk,socket={},image={},cache=none,serial=restart",
            sock.display(),
            image.display()
        ),
        "--export".to_string(),
        format!("id=wb,socket={},image={},cache=writeback", wb_sock.display(), wb_image.display()),
    ];
    let mut d = Restarting {
        dir: dir.path().to_path_buf(),
        args,
        waits: vec![ctl.clone(), sock.clone(), wb_sock.clone()],
        ctl: ctl.clone(),
        daemon: None,
        logs: String::new(),
    };
    d.start();
    let runid = format!("{:04x}{:04x}{}", rand_u16(), rand_u16(), std::process::id());
    let append = format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 blkplane.mode=restart blkplane.runid={runid} \
         blkplane.sectors={} blkplane.serial=restart blkplane.queues=1 blkplane.wce=1",
        IMAGE_BYTES / 512
    );
    let console_path = dir.path().join("console.log");
    let console = fs::File::create(&console_path).unwrap();
    // reconnect=1: QEMU tries a socket again every second while the daemon is away.
    let mut guest = qemu_on(cache, 1, &[(&sock, 1), (&wb_sock, 1)], true, &append, ring)
        .stdin(Stdio::piped())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .spawn()
        .expect("start QEMU");
    let mut typing = guest.stdin.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(u64::from(GUEST_TIMEOUT_S) - 20);
    let console_has =
        |what: &str| fs::read_to_string(&console_path).unwrap_or_default().contains(what);
    let report = |d: &Restarting| {
        format!(
            "--- console ---\n{}\n--- daemon logs ---\n{}{}",
            fs::read_to_string(&console_path).unwrap_or_default(),
            d.logs,
            d.daemon.as_ref().map(|x| x.log()).unwrap_or_default()
        )
    };
    wait_for("the guest to start its I/O", deadline, || {
        console_has("BLKPLANE-IO-START") || console_has("BLKPLANE-FAIL")
    });
    assert!(!console_has("BLKPLANE-FAIL"), "{}", report(&d));

    // Each stop once the guest's I/O flows, at a random moment. Before the out-of-order ones
    // the daemon may read 200 and write 20 times a second for a moment, so that many
    // requests are in flight and reads complete before writes taken earlier.
    for &(how, out_of_order) in stops {
        wait_for("guest I/O before the next stop", deadline, || {
            answered(&d.ctl).unwrap_or(0) >= 200
        });
        std::thread::sleep(Duration::from_millis(100 + u64::from(rand_u16() % 900)));
        let throttle = out_of_order.then(|| {
            let t = common::Throttle::new_split(&image, 200, 20);
            t.add(d.daemon().pid());
            std::thread::sleep(Duration::from_millis(500));
            t
        });
        let (listening, first_io) = d.restart(how, deadline);
        drop(throttle);
        let kind = if out_of_order { "SIGKILL, out of order" } else { &format!("{how:?}") };
        eprintln!("restart ({kind}): listening again after {listening:?}, first guest request answered after {first_io:?}");
    }
    // The queues of the last daemon ran on the layout QEMU asked for.
    let rings = rings_used(&ctl);
    assert!(
        !rings.is_empty() && rings.iter().all(|r| r == ring.name()),
        "rings {rings:?}, expected {}\n{}",
        ring.name(),
        report(&d)
    );
    type_until(&mut typing, "flush", deadline, || {
        console_has("BLKPLANE-FLUSH-PHASE") || console_has("BLKPLANE-FAIL")
    });
    if !flush_kill {
        type_until(&mut typing, "stop", deadline, || {
            console_has("BLKPLANE-PASS") || console_has("BLKPLANE-FAIL")
        });
    }

    // A kill with a FLUSH in flight: the daemon may write twice a second while the guest
    // flushes 1 MiB it wrote to the second disk, so the FLUSH (the data, unless the host wrote
    // it back already, and the journal and cache flush in any case) takes a second or more;
    // the next daemon must say it resubmitted it. A kill that missed the FLUSH is tried
    // again, three times at most.
    let mut flush_killed = !flush_kill;
    for n in (1..=3).filter(|_| flush_kill) {
        let marker = format!("BLKPLANE-FLUSHING {n}");
        wait_for("the guest's flush", deadline, || {
            console_has(&marker) || console_has("BLKPLANE-FAIL")
        });
        assert!(!console_has("BLKPLANE-FAIL"), "{}", report(&d));
        let throttle = common::Throttle::new(&wb_image, 2);
        throttle.add(d.daemon().pid());
        std::thread::sleep(Duration::from_millis(300));
        let (listening, first_io) = d.restart(Stop::Kill, deadline);
        drop(throttle);
        eprintln!("restart (SIGKILL during a flush): listening again after {listening:?}, first guest request answered after {first_io:?}");
        wait_for("the flush answered", deadline, || {
            console_has(&format!("BLKPLANE-FLUSHED {n}")) || console_has("BLKPLANE-FAIL")
        });
        let log = d.daemon().log();
        flush_killed = log.lines().any(|l| l.contains("resubmitted") && l.contains("flush"));
        if flush_killed {
            type_until(&mut typing, "stop", deadline, || {
                console_has("BLKPLANE-PASS") || console_has("BLKPLANE-FAIL")
            });
            break;
        }
        // Not typing "stop": the guest flushes again after 5 s.
    }
    assert!(flush_killed, "no kill caught a FLUSH in flight\n{}", report(&d));

    let status = guest.wait().expect("wait for QEMU");
    let alive = d.daemon().alive();
    let stopped = d.daemon().stop();
    let report = report(&d);
    assert!(status.code() != Some(124), "guest timed out\n{report}");
    assert!(alive, "the last daemon died\n{report}");
    assert!(stopped.success(), "daemon exit {stopped}\n{report}");
    let console = fs::read_to_string(&console_path).unwrap_or_default();
    assert!(!console.contains("BLKPLANE-FAIL"), "the guest reported a failure\n{report}");
    assert!(console.contains("BLKPLANE-PASS"), "no verdict from the guest\n{report}");
    // The out-of-order kills left requests in flight that the next daemon resubmitted.
    let resubmitted: Vec<&str> = report.lines().filter(|l| l.contains("resubmitted")).collect();
    let out_of_order = stops.iter().filter(|s| s.1).count();
    assert!(resubmitted.len() >= out_of_order, "fewer than {out_of_order} resubmissions\n{report}");
    let img = fs::read(&image).unwrap();
    let id = format!("BLKPLANE-RUN-{runid}");
    assert_eq!(&img[..id.len()], id.as_bytes(), "run id not in the image");
    let wb = fs::read(&wb_image).unwrap();
    let checked = check_md5s(&console, "BLKPLANE-MD5-VDB ", &wb, dir.path());
    assert_eq!(checked, 1, "no checksum of the flushed data\n{report}");
    eprintln!("guest passed:\n{}\n{}", check_lines(&console), resubmitted.join("\n"));
}

/// A QMP connection to a QEMU: the greeting read and capabilities negotiated.
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    /// Events read while waiting for a command's return, for [`Qmp::event`].
    events: Vec<serde_json::Value>,
}

impl Qmp {
    fn connect(path: &Path, deadline: Instant) -> Qmp {
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("QMP socket {}: {e}", path.display()),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp {
            writer: stream.try_clone().unwrap(),
            reader: std::io::BufReader::new(stream),
            events: Vec::new(),
        };
        q.line(); // the greeting
        q.call("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QMP read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP said {line:?}: {e}"))
    }

    /// Runs a command; returns its "return" (events on the way are kept for [`Qmp::event`]).
    fn call(&mut self, command: &str, args: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        let msg = serde_json::json!({"execute": command, "arguments": args});
        writeln!(self.writer, "{msg}").unwrap_or_else(|e| panic!("QMP {command}: {e}"));
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "QMP {command}: {v}");
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Waits for the event `name` whose data matches `pick` (one already seen counts).
    fn event(
        &mut self,
        name: &str,
        pick: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let matches = |v: &serde_json::Value| v["event"] == name && pick(&v["data"]);
        if let Some(i) = self.events.iter().position(matches) {
            return self.events.remove(i);
        }
        loop {
            let v = self.line();
            if matches(&v) {
                return v;
            }
        }
    }
}

/// Migrates the VM behind `q` to `uri` through QMP: fast, but kept from finishing for 3 s
/// (no downtime allowed) so that the guest's I/O goes on into pages the migration has sent
/// already, which only the daemon's log can get sent again; then it may finish. Returns
/// query-migrate's answer once it completed or failed (or at `deadline`).
fn migrate(q: &mut Qmp, uri: &str, deadline: Instant) -> serde_json::Value {
    let limit = |ms: u64| serde_json::json!({"max-bandwidth": 1u64 << 30, "downtime-limit": ms});
    q.call("migrate-set-parameters", limit(0));
    q.call("migrate", serde_json::json!({ "uri": uri }));
    std::thread::sleep(Duration::from_secs(3));
    q.call("migrate-set-parameters", limit(300));
    loop {
        let info = q.call("query-migrate", serde_json::json!({}));
        let status = info["status"].as_str().unwrap_or("").to_string();
        if status == "completed" || status == "failed" || Instant::now() > deadline {
            return info;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After a migration: tells the guest on the destination `dst` (whose console `console`
/// reads) to stop and waits for its verdict and exit; ends the source `src` (paused after a
/// migration until told to go, if it has not gone already) through its QMP `q`. Returns the
/// destination's exit status.
fn end_migrated(
    dst: &mut std::process::Child,
    src: &mut std::process::Child,
    q: &mut Qmp,
    deadline: Instant,
    console: impl Fn() -> String,
) -> std::process::ExitStatus {
    type_until(dst.stdin.as_mut().unwrap(), "stop", deadline, || {
        let text = console();
        text.contains("BLKPLANE-PASS") || text.contains("BLKPLANE-FAIL")
    });
    let status = dst.wait().unwrap();
    {
        use std::io::Write;
        let _ = writeln!(q.writer, "{}", serde_json::json!({"execute": "quit"}));
    }
    let _ = src.kill();
    let _ = src.wait();
    status
}

/// A guest runs fio with verification (`workload`: write, or read of data written first)
/// while QEMU live-migrates it to a second QEMU on this host through QMP `migrate`; both disks
/// are blkplane exports of the one image (the destination's with `incoming=on`). The
/// migration completes, fio finishes on the destination without a verify error, and the
/// image holds the guest's data.
fn migrate_run(workload: &str, ring: Ring) {
    let cache = assets();
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let (a, b) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    make_image(&image, IMAGE_BYTES, 80);
    // Packed rings are offered by default: a split-ring run says so.
    let ring_key = if ring == Ring::Packed { "" } else { ",packed-ring=off" };
    let args: Vec<String> = vec![
        "--image-lock-wait-ms".into(),
        "30000".into(),
        "--export".into(),
        format!("id=src,socket={},image={},serial=mig{ring_key}", a.display(), image.display()),
        "--export".into(),
        format!(
            "id=dst,socket={},image={},serial=mig,incoming=on{ring_key}",
            b.display(),
            image.display()
        ),
    ];
    let mut daemon = Daemon::start_with(dir.path(), &args, &[a.clone(), b.clone()]);
    let runid = format!("{:04x}{:04x}{}", rand_u16(), rand_u16(), std::process::id());
    let append = format!(
        // init_on_alloc=0: the guest kernel must not zero the page cache's pages itself,
        // which QEMU would see as writes: only the daemon writes them, and only its log can
        // tell QEMU to send them again.
        "console=ttyS0 panic=-1 quiet loglevel=4 init_on_alloc=0 blkplane.mode=migrate blkplane.runid={runid} \
         blkplane.sectors={} blkplane.serial=mig blkplane.queues=1 blkplane.wce=1 blkplane.workload={workload}",
        IMAGE_BYTES / 512
    );
    let console = |name: &str| dir.path().join(format!("console-{name}.log"));
    let qmp = |name: &str| dir.path().join(format!("qmp-{name}.sock"));
    let migration = dir.path().join("migration.sock");
    let mut src = qemu_on(cache, 1, &[(&a, 1)], false, &append, ring)
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp("src").display())])
        .stdin(Stdio::null())
        .stdout(fs::File::create(console("src")).unwrap())
        .stderr(fs::File::create(dir.path().join("stderr-src.log")).unwrap())
        .spawn()
        .expect("start the source QEMU");
    let mut dst = qemu_on(cache, 1, &[(&b, 1)], false, &append, ring)
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp("dst").display())])
        .args(["-incoming", &format!("unix:{}", migration.display())])
        .stdin(Stdio::piped())
        .stdout(fs::File::create(console("dst")).unwrap())
        .stderr(fs::File::create(dir.path().join("stderr-dst.log")).unwrap())
        .spawn()
        .expect("start the destination QEMU");
    let deadline = Instant::now() + Duration::from_secs(u64::from(GUEST_TIMEOUT_S) - 20);
    let read = |name: &str| fs::read_to_string(console(name)).unwrap_or_default();
    let report = |daemon: &Daemon| {
        format!(
            "--- source console ---\n{}\n--- destination console ---\n{}\n--- QEMU stderr ---\n{}{}\n--- daemon log ---\n{}",
            read("src"),
            read("dst"),
            fs::read_to_string(dir.path().join("stderr-src.log")).unwrap_or_default(),
            fs::read_to_string(dir.path().join("stderr-dst.log")).unwrap_or_default(),
            daemon.log()
        )
    };
    wait_for("the guest's I/O", deadline, || {
        read("src").contains("BLKPLANE-IO-START") || read("src").contains("BLKPLANE-FAIL")
    });
    assert!(!read("src").contains("BLKPLANE-FAIL"), "{}", report(&daemon));
    std::thread::sleep(Duration::from_millis(1500));

    let rounds_before = read("src").matches("BLKPLANE-ROUND").count();
    let mut q = Qmp::connect(&qmp("src"), deadline);
    let started = Instant::now();
    let status = migrate(&mut q, &format!("unix:{}", migration.display()), deadline);
    assert_eq!(status["status"], "completed", "migration: {status}\n{}", report(&daemon));
    let rounds_during = read("src").matches("BLKPLANE-ROUND").count() - rounds_before;
    eprintln!(
        "migration ({workload}) completed in {:?}, the guest doing {rounds_during} rounds of I/O meanwhile: {} ms of downtime, {} bytes transferred",
        started.elapsed(),
        status["downtime"],
        status["ram"]["transferred"]
    );

    // The guest runs on the destination now, in the middle of the round the switch-over
    // interrupted: it ends with that round.
    let dst_status = end_migrated(&mut dst, &mut src, &mut q, deadline, || read("dst"));
    let report = report(&daemon);
    assert!(dst_status.code() != Some(124), "the destination guest timed out\n{report}");
    let console_dst = read("dst");
    assert!(
        !console_dst.contains("BLKPLANE-FAIL"),
        "the guest failed after the migration\n{report}"
    );
    assert!(console_dst.contains("BLKPLANE-PASS"), "no verdict from the destination\n{report}");
    let log = daemon.log();
    assert!(log.contains("dirty logging on"), "the source never logged\n{report}");
    assert!(log.contains("gave up the image's write permission"), "{report}");
    assert!(log.contains("took the image's write permission"), "{report}");
    // Both sides' queues ran on the layout QEMU asked for once the guest's kernel drove
    // them (SeaBIOS looks for a boot disk on a split ring before): at least once on each
    // side, and never on the other layout after the first start on this one.
    let other = if ring == Ring::Packed { Ring::Split } else { Ring::Packed };
    let mark = |r: Ring| format!("ring=\"{}\"", r.name());
    let starts = log.matches(&mark(ring)).count();
    assert!(starts >= 2, "queues started on {} rings: {starts}\n{report}", ring.name());
    let first = log.find(&mark(ring)).unwrap_or(0);
    assert!(
        !log[first..].contains(&mark(other)),
        "a queue went back to {}\n{report}",
        other.name()
    );
    assert!(daemon.alive());
    assert!(daemon.stop().success());
    let img = fs::read(&image).unwrap();
    let id = format!("BLKPLANE-RUN-{runid}");
    assert_eq!(&img[..id.len()], id.as_bytes(), "run id not in the image");
    // What the guest read on the source and kept in its page cache is the image's bytes.
    let checked = check_md5s(&console_dst, "BLKPLANE-MD5 ", &img, dir.path());
    assert_eq!(checked, usize::from(workload == "read"), "checksums from the guest\n{report}");
    eprintln!(
        "migration ({workload}): guest passed on the destination\n{}",
        check_lines(&console_dst)
    );
}

#[test]
fn linux_guest_migrates_while_writing() {
    migrate_run("write", Ring::Split);
}

#[test]
fn linux_guest_migrates_while_reading() {
    migrate_run("read", Ring::Split);
}

/// The device writes a packed ring's used elements into its descriptor ring: the log must
/// mark those pages, or the destination's guest finds requests that never complete.
#[test]
fn linux_guest_migrates_while_writing_on_packed_rings() {
    migrate_run("write", Ring::Packed);
}

/// A QEMU under `timeout` (through `ip netns exec`, which runs it in place) that a failing
/// test does not leave behind: SIGTERM, which `timeout` passes on to QEMU, when dropped.
struct Vm(std::process::Child);

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            common::signal(self.0.id() as i32, libc::SIGTERM);
            let _ = self.0.wait();
        }
    }
}

/// `ctl ARGS` on the daemon at `control` that must succeed: its JSON answer.
fn ctl_json(control: &Path, args: &[&str]) -> serde_json::Value {
    let out = common::ctl(control, args);
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Live migration without shared storage between two hosts: network namespaces joined by a
/// veth pair. Daemon A (host A) serves image A to the source QEMU; daemon B (host B) serves a
/// different image B with `incoming=on`, exposed writable by its NBD server over TCP with
/// TLS (certificates made here; the server asks for the client's). While the guest runs fio
/// with verification, A mirrors image A to B (`ctl mirror ... tls-creds=`); once the job is
/// ready, QEMU migrates the guest over TCP to the destination QEMU on host B, started with
/// `-S` so that it waits, as libvirt's destination does, until it is told to run. At that
/// point (the source's rings stopped) the two images compare equal: every write the guest
/// was answered for is on B. The source's job is cancelled (no write to B), B's exposure
/// ended, the destination resumed: fio finishes and verifies on B without an error.
#[test]
fn linux_guest_migrates_to_another_host_and_image_through_a_tls_mirror() {
    use common::netns::NetPair;
    let cache = assets();
    let dir = tmpdir();
    let d = dir.path();
    let net = NetPair::new("mig");
    common::tls::make_certs(d, &[NetPair::ADDR_B]);
    let (image_a, image_b) = (d.join("a.raw"), d.join("b.raw"));
    make_image(&image_a, IMAGE_BYTES, 81);
    // B starts as another disk's bytes: whatever the mirror does not copy shows.
    make_image(&image_b, IMAGE_BYTES, 82);
    let (sock_a, sock_b, ctl_a, ctl_b) =
        (d.join("a.sock"), d.join("b.sock"), d.join("ctl-a.sock"), d.join("ctl-b.sock"));
    let nbd_addr = format!("{}:10809", NetPair::ADDR_B);
    let daemon_in = |ns: &str| NetPair::exec_in(ns, &Command::new(common::daemon_bin()));
    let args_b: Vec<String> = vec![
        "--control".into(),
        ctl_b.display().to_string(),
        "--nbd-server".into(),
        format!("addr={nbd_addr},tls-creds={}", d.join("srv").display()),
        "--export".into(),
        format!(
            "id=vm,socket={},image={},serial=mig,incoming=on",
            sock_b.display(),
            image_b.display()
        ),
    ];
    let mut daemon_b =
        Daemon::start_command(d, daemon_in(&net.b), &args_b, &[ctl_b.clone(), sock_b.clone()]);
    ctl_json(&ctl_b, &["nbd-export", "id=vm", "writable=on"]);
    let args_a: Vec<String> = vec![
        "--control".into(),
        ctl_a.display().to_string(),
        "--export".into(),
        format!("id=vm,socket={},image={},serial=mig", sock_a.display(), image_a.display()),
    ];
    let mut daemon_a =
        Daemon::start_command(d, daemon_in(&net.a), &args_a, &[ctl_a.clone(), sock_a.clone()]);

    let runid = format!("{:04x}{:04x}{}", rand_u16(), rand_u16(), std::process::id());
    let append = format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 init_on_alloc=0 blkplane.mode=migrate blkplane.runid={runid} \
         blkplane.sectors={} blkplane.serial=mig blkplane.queues=1 blkplane.wce=1 blkplane.workload=write",
        IMAGE_BYTES / 512
    );
    let console = |name: &str| d.join(format!("console-{name}.log"));
    let qmp = |name: &str| d.join(format!("qmp-{name}.sock"));
    let stderr = |name: &str| fs::File::create(d.join(format!("stderr-{name}.log"))).unwrap();
    let mut src = qemu(cache, 1, &[(&sock_a, 1)], false, &append);
    src.args(["-qmp", &format!("unix:{},server=on,wait=off", qmp("src").display())]);
    let src = NetPair::exec_in(&net.a, &src)
        .stdin(Stdio::null())
        .stdout(fs::File::create(console("src")).unwrap())
        .stderr(stderr("src"))
        .spawn()
        .expect("start the source QEMU");
    let mut src = Vm(src);
    let migration_uri = format!("tcp:{}:4444", NetPair::ADDR_B);
    let mut dst = qemu(cache, 1, &[(&sock_b, 1)], false, &append);
    dst.args(["-qmp", &format!("unix:{},server=on,wait=off", qmp("dst").display())]).args([
        "-incoming",
        &migration_uri,
        "-S",
    ]);
    let dst = NetPair::exec_in(&net.b, &dst)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(console("dst")).unwrap())
        .stderr(stderr("dst"))
        .spawn()
        .expect("start the destination QEMU");
    let mut dst = Vm(dst);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(u64::from(GUEST_TIMEOUT_S) - 20);
    let read = |name: &str| fs::read_to_string(console(name)).unwrap_or_default();
    let report = |a: &Daemon, b: &Daemon| {
        format!(
            "--- source console ---\n{}\n--- destination console ---\n{}\n--- QEMU stderr ---\n{}{}\n--- daemon A ---\n{}\n--- daemon B ---\n{}",
            read("src"),
            read("dst"),
            fs::read_to_string(d.join("stderr-src.log")).unwrap_or_default(),
            fs::read_to_string(d.join("stderr-dst.log")).unwrap_or_default(),
            a.log(),
            b.log()
        )
    };
    wait_for("the guest's I/O", deadline, || {
        read("src").contains("BLKPLANE-IO-START") || read("src").contains("BLKPLANE-FAIL")
    });
    assert!(!read("src").contains("BLKPLANE-FAIL"), "{}", report(&daemon_a, &daemon_b));

    // fio under way (it starts a while after the guest says so).
    std::thread::sleep(Duration::from_millis(1500));

    // The mirror, from host A to host B, inside TLS; at 32 MiB/s it copies for 2 s, the
    // guest writing into what it has copied, what it copies and what it has not reached.
    let target = format!("target=nbd://{nbd_addr}/vm");
    let creds = format!("tls-creds={}", d.join("good").display());
    let started = ctl_json(&ctl_a, &["mirror", "id=vm", &target, &creds, "speed=32M"]);
    assert_eq!(started["state"], "running", "{started}");
    let mirror_t0 = Instant::now();
    let job = || ctl_json(&ctl_a, &["query-jobs"])[0].clone();
    wait_for("the mirror ready", deadline, || job()["state"] != "running");
    let ready = job();
    assert_eq!(ready["state"], "ready", "{ready}\n{}", report(&daemon_a, &daemon_b));
    let mirror_s = mirror_t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));

    let mut q = Qmp::connect(&qmp("src"), deadline);
    let migration_t0 = Instant::now();
    let status = migrate(&mut q, &migration_uri, deadline);
    assert_eq!(
        status["status"],
        "completed",
        "migration: {status}\n{}",
        report(&daemon_a, &daemon_b)
    );
    let migration_s = migration_t0.elapsed();
    // The destination has the guest, paused (-S): its rings have not started.
    let mut qd = Qmp::connect(&qmp("dst"), deadline);
    wait_for("the destination paused", deadline, || {
        qd.call("query-status", serde_json::json!({}))["status"] == "paused"
    });
    // The source's rings stopped at the switch-over: the mirror flushed the target then.
    assert!(
        daemon_a.log().contains("migration switch-over: the ready mirror flushed"),
        "{}",
        report(&daemon_a, &daemon_b)
    );
    let cancelled = ctl_json(&ctl_a, &["job-cancel", "id=vm"]);
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let recopied = cancelled["recopied_bytes"].as_u64().unwrap();
    assert!(recopied > 0, "the guest's writes were mirrored: {cancelled}");
    // Every write the guest was answered for on host A is on host B.
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(&image_a)
        .arg(&image_b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the images differ at the switch-over: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        report(&daemon_a, &daemon_b)
    );
    ctl_json(&ctl_b, &["nbd-unexport", "id=vm"]);
    qd.call("cont", serde_json::json!({}));

    // The guest runs on host B now, in the middle of the round the switch-over interrupted:
    // it ends with that round and verifies its data once more.
    let dst_status = end_migrated(&mut dst.0, &mut src.0, &mut q, deadline, || read("dst"));
    let report = report(&daemon_a, &daemon_b);
    assert!(dst_status.code() != Some(124), "the destination guest timed out\n{report}");
    let console_dst = read("dst");
    assert!(!console_dst.contains("BLKPLANE-FAIL"), "the guest failed on host B\n{report}");
    assert!(console_dst.contains("BLKPLANE-PASS"), "no verdict from host B\n{report}");
    assert!(daemon_a.log().contains("gave up the image's write permission"), "{report}");
    assert!(daemon_b.log().contains("took the image's write permission"), "{report}");
    assert!(daemon_a.alive() && daemon_b.alive(), "{report}");
    assert!(daemon_a.stop().success());
    assert!(daemon_b.stop().success());
    let img = fs::read(&image_b).unwrap();
    let id = format!("BLKPLANE-RUN-{runid}");
    assert_eq!(&img[..id.len()], id.as_bytes(), "run id not in image B");
    eprintln!(
        "migration without shared storage: mirror ready after {mirror_s:?} ({recopied} bytes \
         copied again for the guest's writes by the end), migration {migration_s:?} ({} ms \
         downtime), whole test {:?}\n{}",
        status["downtime"],
        t0.elapsed(),
        check_lines(&console_dst)
    );
}

/// QEMU's defaults start against blkplane's: a VM with 2 vCPUs and no `num-queues` on its
/// disk (QEMU then asks for one queue per vCPU) against an export with no `queues=`, and a
/// second disk with `num-queues=128`, over 64, the most blkplane offered before (QEMU
/// refused to start either: "The maximum number of queues supported by the backend is 1",
/// "... is 64"). The guest uses one queue per vCPU on each disk, checked in /sys, and writes
/// and reads back 1 MiB on each disk from each vCPU; query-stats shows the queues it used.
#[test]
fn linux_guest_gets_a_queue_per_vcpu_with_qemus_defaults_and_starts_with_128() {
    const VCPUS: u16 = 2;
    let cache = assets();
    let dir = tmpdir();
    let ctl = dir.path().join("ctl.sock");
    let mut args = vec!["--control".to_string(), ctl.display().to_string()];
    let mut waits = vec![ctl.clone()];
    for (id, seed) in [("a", 78), ("b", 79)] {
        let image = dir.path().join(format!("{id}.raw"));
        make_image(&image, IMAGE_BYTES, seed);
        let sock = dir.path().join(format!("{id}.sock"));
        args.push("--export".into());
        args.push(format!(
            "id={id},serial={id},socket={},image={}",
            sock.display(),
            image.display()
        ));
        waits.push(sock);
    }
    let mut daemon = Daemon::start_with(dir.path(), &args, &waits);
    let runid = format!("{:04x}{:04x}{}", rand_u16(), rand_u16(), std::process::id());
    let append = format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 blkplane.mode=many blkplane.runid={runid} \
         blkplane.sectors={} blkplane.serial=a blkplane.queues={VCPUS} blkplane.queues2=128 \
         blkplane.wce=1",
        IMAGE_BYTES / 512
    );
    let console_path = dir.path().join("console.log");
    let console = fs::File::create(&console_path).unwrap();
    let mut cmd = qemu_base(cache, &append);
    cmd.args(["-m", "512M", "-smp", &VCPUS.to_string()])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .args(["-chardev", &format!("socket,id=char0,path={}", waits[1].display())])
        .args(["-device", "vhost-user-blk-pci,chardev=char0"])
        .args(["-chardev", &format!("socket,id=char1,path={}", waits[2].display())])
        .args(["-device", "vhost-user-blk-pci,chardev=char1,num-queues=128"]);
    let status = cmd
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .status()
        .expect("run QEMU");
    let console = fs::read_to_string(&console_path).unwrap_or_default();
    let stats = common::ctl(&ctl, &["query-stats"]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap_or_default();
    let alive = daemon.alive();
    daemon.stop();
    let report = || format!("--- console ---\n{console}\n--- daemon log ---\n{}", daemon.log());
    assert!(alive, "the daemon died\n{}", report());
    assert!(status.success(), "QEMU: {status}\n{}", report());
    assert!(console.contains("BLKPLANE-PASS"), "no pass from the guest\n{}", report());
    for (i, id) in ["a", "b"].iter().enumerate() {
        let img = fs::read(dir.path().join(format!("{id}.raw"))).unwrap();
        let disk = if i == 0 { "vda" } else { "vdb" };
        let checked = check_md5s(&console, &format!("BLKPLANE-MD5-{disk} "), &img, dir.path());
        assert_eq!(checked, usize::from(VCPUS), "{disk}: checksums\n{}", report());
        let mark = format!("BLKPLANE-RUN-{runid}");
        assert_eq!(&img[..mark.len()], mark.as_bytes(), "{disk}: run id not in the image");
        // The queues the guest used, one per vCPU, each with the writes and reads of its CPU.
        let export = stats.as_array().into_iter().flatten().find(|e| e["id"] == *id);
        let queues = export.map(|e| e["queues"].clone()).unwrap_or_default();
        let queues = queues.as_array().cloned().unwrap_or_default();
        assert_eq!(queues.len(), usize::from(VCPUS), "export {id}: {stats}");
        for q in &queues {
            assert!(q["requests"]["write"].as_u64() >= Some(1), "export {id}: {q}");
            assert!(q["requests"]["read"].as_u64() >= Some(1), "export {id}: {q}");
        }
    }
    eprintln!(
        "{}",
        console.lines().filter(|l| l.starts_with("BLKPLANE")).collect::<Vec<_>>().join("\n")
    );
}

/// Bytes of QEMU's guest memory (its memfds, "memory-backend-memfd") the process `pid` maps,
/// from /proc/PID/maps.
fn guest_memory_mapped_bytes(pid: i32) -> u64 {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let span = |line: &str| {
        let (start, end) = line.split_whitespace().next()?.split_once('-')?;
        Some(u64::from_str_radix(end, 16).ok()? - u64::from_str_radix(start, 16).ok()?)
    };
    maps.lines().filter(|l| l.contains("memfd:memory-backend-memfd")).filter_map(span).sum()
}

/// Memory hot-plug while a guest writes and verifies with fio: a VM started with 384 MiB (the
/// least its 84 MiB initramfs unpacks in) gets a 256 MiB `pc-dimm` (its own shared memfd) over QMP; the guest kernel onlines it as
/// movable memory, which user pages take first, with its old memory filled besides, so the
/// buffers of fio's later rounds are in the DIMM, and the daemon says so when the region is
/// removed ("guest requests used it: yes"). The guest then takes the DIMM out of use (its
/// memory blocks offline), QEMU unplugs it (`device_del`, DEVICE_DELETED), and fio goes on:
/// no request fails, no data differs, and the daemon maps exactly the memory it mapped
/// before the plug. (QEMU 7.2, with CONFIGURE_MEM_SLOTS negotiated, sent the boot RAM's
/// region and the DIMM's as ADD_MEM_REG and the unplug as REM_MEM_REG in this test's runs:
/// the checks below find the DIMM's region in the daemon's lines for those two.)
#[test]
fn linux_guest_memory_hot_plug_and_unplug_under_io() {
    const DIMM_BYTES: u64 = 256 << 20;
    let cache = assets();
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    make_image(&image, IMAGE_BYTES, 81);
    let export =
        format!("id=disk,socket={},image={},serial=hotplug", sock.display(), image.display());
    let args = ["--control".into(), ctl.display().to_string(), "--export".into(), export];
    let mut daemon = Daemon::start_with(dir.path(), &args, &[ctl.clone(), sock.clone()]);
    let runid = format!("{:04x}{:04x}{}", rand_u16(), rand_u16(), std::process::id());
    let append = format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 memhp_default_state=online_movable \
         blkplane.mode=hotplug blkplane.runid={runid} blkplane.sectors={} \
         blkplane.serial=hotplug blkplane.queues=1 blkplane.wce=1",
        IMAGE_BYTES / 512
    );
    let console_path = dir.path().join("console.log");
    let qmp_path = dir.path().join("qmp.sock");
    let mut guest = qemu_base(cache, &append)
        .args(["-m", "384M,slots=2,maxmem=1G", "-smp", "1"])
        .args(["-object", "memory-backend-memfd,id=mem,size=384M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .args(["-chardev", &format!("socket,id=char0,path={}", sock.display())])
        .args(["-device", "vhost-user-blk-pci,chardev=char0,num-queues=1"])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())])
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&console_path).unwrap())
        .stderr(fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .expect("start QEMU");
    let mut typing = guest.stdin.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(u64::from(GUEST_TIMEOUT_S) - 20);
    let read = || fs::read_to_string(&console_path).unwrap_or_default();
    let report = |daemon: &Daemon| {
        format!(
            "--- console ---\n{}\n--- QEMU stderr ---\n{}\n--- daemon log ---\n{}",
            read(),
            fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default(),
            daemon.log()
        )
    };
    let failed = || read().contains("BLKPLANE-FAIL");
    // Waits for `cond`, failing with the consoles and the log at the deadline.
    let wait = |what: &str, daemon: &Daemon, cond: &dyn Fn() -> bool| {
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", report(daemon));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let rounds = || read().matches("BLKPLANE-ROUND").count();
    wait("the guest's I/O", &daemon, &|| read().contains("BLKPLANE-IO-START") || failed());
    assert!(!failed(), "{}", report(&daemon));
    let pid = daemon.pid();
    let mapped_before = guest_memory_mapped_bytes(pid);
    assert!(
        mapped_before >= 383 << 20,
        "guest memory mapped: {mapped_before}\n{}",
        report(&daemon)
    );
    let regions = || query_stats(&ctl).map(|v| v["result"][0]["memory_regions"].clone());
    let regions_before = regions();

    // The plug, while fio runs.
    let mut q = Qmp::connect(&qmp_path, deadline);
    let size = serde_json::json!(DIMM_BYTES);
    q.call(
        "object-add",
        serde_json::json!({"qom-type": "memory-backend-memfd", "id": "dimm-mem", "size": size, "share": true}),
    );
    q.call(
        "device_add",
        serde_json::json!({"driver": "pc-dimm", "id": "dimm0", "memdev": "dimm-mem"}),
    );
    wait("the daemon to map the DIMM", &daemon, &|| {
        guest_memory_mapped_bytes(pid) == mapped_before + DIMM_BYTES
    });
    wait("the guest to online the DIMM", &daemon, &|| {
        read().contains("BLKPLANE-ONLINE") || failed()
    });
    assert!(!failed(), "{}", report(&daemon));
    // A whole fio round (at least) with the DIMM online, then the guest takes it out of use.
    let online_rounds = rounds();
    wait("fio rounds on the DIMM", &daemon, &|| rounds() >= online_rounds + 2 || failed());
    type_until(&mut typing, "offline", deadline, || {
        read().contains("BLKPLANE-OFFLINE") || failed()
    });
    assert!(!failed(), "{}", report(&daemon));

    // The unplug, while fio runs: the daemon lets go of the region's mapping.
    let offline_rounds = rounds();
    q.call("device_del", serde_json::json!({"id": "dimm0"}));
    q.event("DEVICE_DELETED", |d| d["device"] == "dimm0");
    q.call("object-del", serde_json::json!({"id": "dimm-mem"}));
    wait("the daemon to unmap the DIMM", &daemon, &|| {
        guest_memory_mapped_bytes(pid) == mapped_before
    });
    assert_eq!(regions(), regions_before, "memory regions after the unplug");
    wait("fio rounds after the unplug", &daemon, &|| rounds() >= offline_rounds + 2 || failed());
    type_until(&mut typing, "stop", deadline, || read().contains("BLKPLANE-PASS") || failed());
    let status = guest.wait().expect("wait for QEMU");
    let stats = query_stats(&ctl).unwrap_or_default();
    let alive = daemon.alive();
    let report = report(&daemon);
    assert!(alive, "the daemon died\n{report}");
    assert!(daemon.stop().success(), "daemon exit\n{report}");
    assert!(status.success(), "QEMU: {status}\n{report}");
    assert!(!report.contains("BLKPLANE-FAIL"), "the guest reported a failure\n{report}");
    assert!(report.contains("BLKPLANE-PASS"), "no verdict from the guest\n{report}");

    // The DIMM was a region of its own, added and removed while the queue ran, and guest
    // requests used it.
    let log = daemon.log();
    let region = log
        .lines()
        .find_map(|l| {
            let at = l.find("memory region ")? + "memory region ".len();
            let (gpa, rest) = l[at..].split_once('+')?;
            rest.starts_with(&format!("{DIMM_BYTES:#x} added")).then(|| gpa.to_string())
        })
        .unwrap_or_else(|| panic!("no region of the DIMM's size added\n{report}"));
    let removed =
        format!("memory region {region}+{DIMM_BYTES:#x} removed (guest requests used it: yes)");
    assert!(log.contains(&removed), "wanted {removed:?}\n{report}");
    // No request failed on the daemon's side either.
    for q in stats["result"][0]["queues"].as_array().into_iter().flatten() {
        for kind in ["errors_ioerr", "errors_unsupp"] {
            let n: u64 = q[kind]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
                .filter_map(|v| v.as_u64())
                .sum();
            assert_eq!(n, 0, "{kind}: {q}");
        }
    }
    let img = fs::read(&image).unwrap();
    let id = format!("BLKPLANE-RUN-{runid}");
    assert_eq!(&img[..id.len()], id.as_bytes(), "run id not in the image");
    eprintln!(
        "memory hot-plug: {} fio rounds, {online_rounds} before the DIMM was online, {offline_rounds} before it went out of use\n{}",
        rounds(),
        check_lines(&report)
    );
}
