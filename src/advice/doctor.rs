//! `blkplane doctor`: what the advice says against what this host and its exports do. Each
//! check gives one finding: its severity (`critical`, `warning`, `note`, or `ok` when the
//! host follows the advice), what was found, why it matters for a VM's disk, and the exact
//! fix. Everything is read under a [`Host`] root, so the tests run it on fake trees.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::{parse_cpu_ranges, Host};
use crate::spec::format_cpu_list;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    Note,
    Ok,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Note => "note",
            Severity::Ok => "ok",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// A stable name of the check (`cpu-governor`, `device-numa`, ...).
    pub check: &'static str,
    pub severity: Severity,
    /// What it is about: `host`, `export vm1`, `iothread pool.0`.
    pub subject: String,
    /// What this host does.
    pub found: String,
    /// Why it matters (empty when fine).
    pub why: String,
    /// The exact fix (empty when fine).
    pub fix: String,
}

fn ok(check: &'static str, subject: &str, found: String) -> Finding {
    Finding {
        check,
        severity: Severity::Ok,
        subject: subject.into(),
        found,
        why: String::new(),
        fix: String::new(),
    }
}

fn finding(
    check: &'static str,
    severity: Severity,
    subject: &str,
    found: String,
    why: &str,
    fix: String,
) -> Finding {
    Finding { check, severity, subject: subject.into(), found, why: why.into(), fix }
}

/// An export as the doctor sees it (from a running daemon's `list-exports`).
#[derive(Clone, Debug)]
pub struct ExportFacts {
    pub id: String,
    /// The image; `None` for `engine=null`.
    pub image: Option<PathBuf>,
    pub cache: String,
    pub aio: String,
    pub queue_size: u64,
    /// CPUs its I/O threads are pinned to; empty: not pinned.
    pub io_cpus: Vec<usize>,
    /// Its polling mode when it runs on dedicated threads (their `poll=`); `None` on the pool
    /// or named threads, whose own modes `ThreadFacts` has.
    pub dedicated_poll: Option<String>,
}

impl ExportFacts {
    pub fn from_daemon(export: &Value, iothreads: &Value) -> ExportFacts {
        let spec = &export["spec"];
        let text = |k: &str| spec[k].as_str().unwrap_or_default().to_string();
        ExportFacts {
            id: text("id"),
            image: spec["image"].as_str().map(PathBuf::from),
            cache: text("cache"),
            aio: text("aio"),
            queue_size: spec["queue-size"].as_u64().unwrap_or(256),
            io_cpus: super::io_cpus_of(spec, iothreads),
            dedicated_poll: (text("iothread") == "dedicated")
                .then(|| spec["poll"].as_str().unwrap_or("adaptive").to_string()),
        }
    }
}

/// An I/O thread of the daemon (from `list-iothreads`).
#[derive(Clone, Debug, Default)]
pub struct ThreadFacts {
    pub id: String,
    /// The kernel's id of the thread.
    pub tid: u32,
    /// Its polling mode, and the CPUs it is pinned to (empty: not pinned).
    pub poll: String,
    pub cpus: Vec<usize>,
    /// Adaptive polling's last choice (`poll`, `poll-requests` or `sleep`) and the figures it
    /// chose by: per way, per request, µs of wall time and of CPU (`None`: no work seen).
    pub chosen: Option<String>,
    pub trials_us: Vec<(String, Option<(f64, f64)>)>,
    /// A thread of one export's queue alone (`iothread=dedicated`, listed as `EXPORT/qN`):
    /// its polling and pinning are the export's keys.
    pub dedicated: bool,
}

impl ThreadFacts {
    /// One entry of `list-iothreads`; `None` without an id or a thread id.
    pub fn from_daemon(t: &Value) -> Option<ThreadFacts> {
        let figures = |v: &Value| Some((v["wall"].as_f64()?, v["cpu"].as_f64()?));
        Some(ThreadFacts {
            id: t["id"].as_str()?.to_string(),
            tid: t["tid"].as_u64().and_then(|n| u32::try_from(n).ok())?,
            poll: t["poll"].as_str().unwrap_or("adaptive").to_string(),
            cpus: parse_cpu_ranges(t["cpus"].as_str().unwrap_or_default()),
            chosen: t["chosen"].as_str().map(str::to_string),
            trials_us: ["poll", "poll-requests", "sleep"]
                .iter()
                .map(|w| (w.to_string(), figures(&t["trials_us"][w])))
                .collect(),
            dedicated: t["kind"] == "dedicated",
        })
    }
}

/// Every check, most important first (then in the order they are listed here).
pub fn examine(host: &Host, exports: &[ExportFacts], threads: &[ThreadFacts]) -> Vec<Finding> {
    let mut all = vec![
        cpu_governor(host),
        cpu_idle(host),
        kernel(host),
        io_uring(host),
        huge_pages(host),
        transparent_huge_pages(host),
        aio_max_nr(host, exports),
        memlock(host, threads),
        kvm_halt_polling(host),
        guest_halt_polling(host),
    ];
    all.extend(threads.iter().map(|t| congestion(host, t)));
    // A dedicated thread's polling is its export's, checked once per export below.
    all.extend(threads.iter().filter(|t| !t.dedicated).map(thread_polling));
    for e in exports {
        all.extend(export_checks(host, e));
        if let Some(mode) = &e.dedicated_poll {
            let place = Polled::Export(&e.id);
            all.push(polling(place, mode, &e.io_cpus, None));
        }
    }
    all.sort_by_key(|f| f.severity);
    all
}

/// `cpuN` directories under /sys/devices/system/cpu, by number.
fn cpu_dirs(host: &Host) -> BTreeMap<usize, PathBuf> {
    let mut cpus = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(host.path("/sys/devices/system/cpu")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix("cpu").and_then(|n| n.parse::<usize>().ok()) {
                cpus.insert(n, e.path());
            }
        }
    }
    cpus
}

/// The choice a sysfs file marks among its options: `madvise` of `always [madvise] never`.
fn selected(text: &str) -> Option<&str> {
    text.split_once('[').and_then(|(_, r)| r.split_once(']')).map(|(s, _)| s)
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn cpu_governor(host: &Host) -> Finding {
    let mut by_governor: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (n, dir) in cpu_dirs(host) {
        if let Some(g) = read_trimmed(&dir.join("cpufreq/scaling_governor")) {
            by_governor.entry(g).or_default().push(n);
        }
    }
    if by_governor.is_empty() {
        return ok(
            "cpu-governor",
            "host",
            "no CPU frequency scaling exposed (a fixed clock, or a VM)".into(),
        );
    }
    let slow: Vec<String> = by_governor
        .iter()
        .filter(|(g, _)| g.as_str() != "performance")
        .map(|(g, cpus)| format!("CPUs {} run the {g} governor", format_cpu_list(cpus)))
        .collect();
    if slow.is_empty() {
        return ok("cpu-governor", "host", "every CPU runs the performance governor".into());
    }
    finding(
        "cpu-governor",
        Severity::Warning,
        "host",
        slow.join("; "),
        "a governor that lowers the clock of CPUs that look idle makes the polling I/O threads and the vCPUs wait for it to rise again; latency at low queue depth suffers first",
        "tuned-adm profile virtual-host (or: cpupower frequency-set -g performance)".into(),
    )
}

/// Idle states whose wake-up takes longer than this are the deep ones the advice avoids.
const DEEP_IDLE_LATENCY_US: u64 = 50;

fn cpu_idle(host: &Host) -> Finding {
    let mut deep: BTreeMap<(String, u64), Vec<usize>> = BTreeMap::new();
    let mut any = false;
    for (n, dir) in cpu_dirs(host) {
        let Ok(states) = std::fs::read_dir(dir.join("cpuidle")) else { continue };
        for s in states.flatten() {
            let p = s.path();
            let latency = read_trimmed(&p.join("latency")).and_then(|l| l.parse::<u64>().ok());
            let (Some(name), Some(latency)) = (read_trimmed(&p.join("name")), latency) else {
                continue;
            };
            any = true;
            let disabled = read_trimmed(&p.join("disable")).as_deref() == Some("1");
            if latency > DEEP_IDLE_LATENCY_US && !disabled {
                deep.entry((name, latency)).or_default().push(n);
            }
        }
    }
    if !any {
        return ok("cpu-idle", "host", "no CPU idle states exposed".into());
    }
    if deep.is_empty() {
        return ok(
            "cpu-idle",
            "host",
            format!("no idle state enabled with a wake-up over {DEEP_IDLE_LATENCY_US} µs"),
        );
    }
    let found: Vec<String> = deep
        .iter()
        .map(|((name, latency), cpus)| {
            format!("CPUs {} may enter {name} (wake-up {latency} µs)", format_cpu_list(cpus))
        })
        .collect();
    finding(
        "cpu-idle",
        Severity::Warning,
        "host",
        found.join("; "),
        "a CPU in a deep idle state takes that long to wake for the next request or interrupt; every request after a pause pays it",
        format!("tuned-adm profile virtual-host (or: cpupower idle-set -D {DEEP_IDLE_LATENCY_US}, which disables the states slower than {DEEP_IDLE_LATENCY_US} µs)"),
    )
}

/// `major.minor` of a kernel release string.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel(host: &Host) -> Finding {
    let Some(release) = host.read("/proc/sys/kernel/osrelease") else {
        return ok("kernel", "host", "kernel release unknown".into());
    };
    match kernel_version(&release) {
        Some(v) if v < (5, 10) => finding(
            "kernel",
            Severity::Warning,
            "host",
            format!("kernel {release}"),
            "io_uring before 5.10 lacks much of what the default engine relies on for speed (registered buffers, fast polling, no memlock accounting), and older blk-mq paths cost more per request",
            "boot a kernel 5.10 or newer (Debian 11 and later ship one)".into(),
        ),
        _ => ok("kernel", "host", format!("kernel {release}")),
    }
}

fn io_uring(host: &Host) -> Finding {
    match host.read_u64("/proc/sys/kernel/io_uring_disabled") {
        Some(2) => finding(
            "io-uring",
            Severity::Critical,
            "host",
            "io_uring is disabled (kernel.io_uring_disabled = 2)".into(),
            "exports with aio=io_uring, the default, cannot start",
            "sysctl -w kernel.io_uring_disabled=0 (and in /etc/sysctl.d/), or serve with aio=native (block devices) or aio=threads".into(),
        ),
        Some(1) => finding(
            "io-uring",
            Severity::Warning,
            "host",
            "io_uring is limited to one group (kernel.io_uring_disabled = 1)".into(),
            "the daemon can use io_uring only if it runs as root or in the group kernel.io_uring_group names",
            "run blkplane in the group of kernel.io_uring_group, or sysctl -w kernel.io_uring_disabled=0".into(),
        ),
        _ if host.root() == Path::new("/") => match io_uring::IoUring::new(2) {
            // On the real host, ask the kernel itself.
            Ok(_) => ok("io-uring", "host", "io_uring is available (a ring was set up)".into()),
            Err(e) => finding(
                "io-uring",
                Severity::Critical,
                "host",
                format!("io_uring_setup fails: {e}"),
                "exports with aio=io_uring, the default, cannot start",
                "a kernel with io_uring (5.1 or newer, CONFIG_IO_URING), or serve with aio=native (block devices) or aio=threads".into(),
            ),
        },
        _ => ok("io-uring", "host", "io_uring is available".into()),
    }
}

fn huge_pages(host: &Host) -> Finding {
    let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let nr = host.read_u64(&format!("{dir}/nr_hugepages")).unwrap_or(0);
    let free = host.read_u64(&format!("{dir}/free_hugepages")).unwrap_or(0);
    if nr == 0 {
        return finding(
            "huge-pages",
            Severity::Warning,
            "host",
            "no 2 MiB huge pages are reserved".into(),
            "guest memory on 4 KiB pages costs TLB misses on every access by the guest and by the daemon, and can be compacted or swapped under the VM",
            "sysctl -w vm.nr_hugepages=N, N = the guests' memory / 2 MiB (and in /etc/sysctl.d/); blkplane vm-config then puts guests on them".into(),
        );
    }
    if free == 0 {
        return finding(
            "huge-pages",
            Severity::Note,
            "host",
            format!("all {nr} 2 MiB huge pages are in use"),
            "the next VM gets 4 KiB pages",
            "raise vm.nr_hugepages by the new VM's memory / 2 MiB".into(),
        );
    }
    ok("huge-pages", "host", format!("{free} of {nr} 2 MiB huge pages free"))
}

fn transparent_huge_pages(host: &Host) -> Finding {
    let Some(text) = host.read("/sys/kernel/mm/transparent_hugepage/enabled") else {
        return ok("transparent-huge-pages", "host", "not exposed".into());
    };
    match selected(&text) {
        Some("never") => finding(
            "transparent-huge-pages",
            Severity::Note,
            "host",
            "transparent huge pages are off (never)".into(),
            "guest memory not on reserved huge pages stays on 4 KiB pages",
            "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (QEMU asks for them with madvise)".into(),
        ),
        Some(m) => ok("transparent-huge-pages", "host", format!("transparent huge pages: {m}")),
        None => ok("transparent-huge-pages", "host", format!("transparent huge pages: {text}")),
    }
}

fn aio_max_nr(host: &Host, exports: &[ExportFacts]) -> Finding {
    let (Some(max), Some(used)) =
        (host.read_u64("/proc/sys/fs/aio-max-nr"), host.read_u64("/proc/sys/fs/aio-nr"))
    else {
        return ok("aio-max-nr", "host", "not exposed".into());
    };
    // io_setup(n) takes at least 2n of the system-wide budget (the kernel doubles it).
    let per_queue: Vec<u64> =
        exports.iter().filter(|e| e.aio == "native").map(|e| 2 * e.queue_size).collect();
    let largest = per_queue.iter().copied().max().unwrap_or(2 * 256);
    let left = max.saturating_sub(used);
    if left < 16 * largest || used * 10 > max * 8 {
        return finding(
            "aio-max-nr",
            Severity::Warning,
            "host",
            format!("{used} of fs.aio-max-nr {max} Linux AIO events in use, {left} left"),
            "every queue of an aio=native export reserves events when it starts (twice its queue size); when they run out, io_setup fails with EAGAIN and the queue does not start",
            format!("sysctl -w fs.aio-max-nr={} (and in /etc/sysctl.d/)", (max * 4).max(1_048_576)),
        );
    }
    ok("aio-max-nr", "host", format!("{used} of {max} Linux AIO events in use"))
}

/// The soft limit of a limits file's row, in bytes (`None`: unlimited or missing).
fn soft_limit(limits: &str, row: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with(row))?;
    line[row.len()..].split_whitespace().next()?.parse().ok()
}

fn memlock(host: &Host, threads: &[ThreadFacts]) -> Finding {
    let (path, whose) = match threads.first() {
        Some(t) => (format!("/proc/{}/limits", t.tid), "the daemon's"),
        None => ("/proc/self/limits".to_string(), "this shell's (no daemon asked)"),
    };
    let Some(limits) = host.read(&path) else {
        return ok("memlock", "host", "limits not readable".into());
    };
    let old_kernel = host
        .read("/proc/sys/kernel/osrelease")
        .and_then(|r| kernel_version(&r))
        .is_some_and(|v| v < (5, 12));
    match soft_limit(&limits, "Max locked memory") {
        Some(bytes) if old_kernel && bytes < 64 << 20 => finding(
            "memlock",
            Severity::Warning,
            "host",
            format!("{whose} locked-memory limit is {} KiB", bytes / 1024),
            "before Linux 5.12 io_uring charges its rings to it: queues fail to start with ENOMEM once it is used up",
            "LimitMEMLOCK=infinity in the unit (contrib/blkplane.service has it), or ulimit -l unlimited".into(),
        ),
        Some(bytes) => ok("memlock", "host", format!("{whose} locked-memory limit is {} KiB", bytes / 1024)),
        None => ok("memlock", "host", format!("{whose} locked-memory limit is unlimited")),
    }
}

/// Run-queue wait above this share of a thread's runnable time is congestion.
const CONGESTED_WAIT_PERCENT: f64 = 10.0;

fn congestion(host: &Host, t: &ThreadFacts) -> Finding {
    let subject = format!("iothread {}", t.id);
    let stat = host
        .read(&format!("/proc/{}/schedstat", t.tid))
        .and_then(|s| crate::sys::parse_schedstat(&s));
    let Some((cpu_ns, wait_ns)) = stat else {
        return ok("congestion", &subject, "scheduler statistics not readable".into());
    };
    let runnable = cpu_ns + wait_ns;
    let percent = if runnable == 0 { 0.0 } else { wait_ns as f64 * 100.0 / runnable as f64 };
    let found = format!(
        "waited for a CPU {percent:.1} % of its runnable time ({:.3} s waiting, {:.3} s on a CPU since it started)",
        wait_ns as f64 / 1e9,
        cpu_ns as f64 / 1e9
    );
    if runnable >= 100_000_000 && percent > CONGESTED_WAIT_PERCENT {
        // A dedicated thread is pinned by its export's key, a shared one by being named.
        let (give, key) = if t.dedicated {
            ("pin the export's threads to", "its cpus=LIST key")
        } else {
            ("give the I/O threads", "--iothread id=io0,cpus=LIST and iothread=io0")
        };
        return finding(
            "congestion",
            Severity::Warning,
            &subject,
            found,
            "an I/O thread that waits for a CPU delays every request it serves by that long; CPU load figures do not show it, the run-queue wait does",
            format!(
                "{give} CPUs the vCPUs do not use ({key}; blkplane vm-config pins the VMs around them), or run fewer vCPUs on this host"
            ),
        );
    }
    ok("congestion", &subject, found)
}

fn kvm_halt_polling(host: &Host) -> Finding {
    let param = "/sys/module/kvm/parameters/halt_poll_ns";
    match host.read_u64(param) {
        None => ok("kvm-halt-poll", "host", "KVM is not loaded (no VMs on this host)".into()),
        Some(0) => finding(
            "kvm-halt-poll",
            Severity::Note,
            "host",
            "KVM halt polling is off (halt_poll_ns = 0)".into(),
            "a vCPU waiting for its disk's completion halts and sleeps in the host at once; the completion's interrupt must then wait for the scheduler to wake it, on every request at low queue depth",
            format!("echo 200000 > {param} (the kernel's default; options kvm halt_poll_ns=200000 in /etc/modprobe.d/ keeps it)"),
        ),
        Some(ns) => ok("kvm-halt-poll", "host", format!("KVM halt polling up to {ns} ns")),
    }
}

/// On a host that is itself a VM: whether its idle CPUs poll before they halt.
fn guest_halt_polling(host: &Host) -> Finding {
    let param = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";
    match host.read_u64(param) {
        None => ok("guest-halt-poll", "host", "not a VM with the haltpoll idle driver".into()),
        Some(0) => finding(
            "guest-halt-poll",
            Severity::Note,
            "host",
            "this host is a VM whose idle CPUs halt at once (guest_halt_poll_ns = 0)".into(),
            "a frontend or client woken after a sleep waits for its halted CPU to be woken by the hypervisor: measured on such a VM, a depth-1 reader's p50 was 63 µs on ext4 and 23 µs on tmpfs, against 45–49 and 22 µs with 200000 (IOPS up by 10–35 %)",
            format!("echo 200000 > {param} (haltpoll.guest_halt_poll_ns=200000 on the kernel command line keeps it)"),
        ),
        Some(ns) => ok("guest-halt-poll", "host", format!("idle CPUs poll up to {ns} ns before they halt")),
    }
}

/// Whose polling a finding is about, and how its mode is changed at run time.
#[derive(Clone, Copy)]
enum Polled<'a> {
    Thread(&'a str),
    Export(&'a str),
}

fn thread_polling(t: &ThreadFacts) -> Finding {
    let choice = t.chosen.as_deref().map(|c| (c, t.trials_us.as_slice()));
    polling(Polled::Thread(&t.id), &t.poll, &t.cpus, choice)
}

/// An adaptive thread's last choice and the figures it chose by, as `found` text.
fn choice_text(chosen: &str, trials_us: &[(String, Option<(f64, f64)>)]) -> String {
    let now = match chosen {
        "poll" => "polls",
        "poll-requests" => "polls for requests only",
        _ => "sleeps",
    };
    let ways: Vec<String> = trials_us
        .iter()
        .map(|(way, figures)| match figures {
            Some((wall, cpu)) => format!("{way} {wall:.0} µs at {cpu:.0} µs of CPU"),
            None => format!("{way} saw no work"),
        })
        .collect();
    format!("poll=adaptive {now} now (per request in its trials: {})", ways.join(", "))
}

type Choice<'a> = (&'a str, &'a [(String, Option<(f64, f64)>)]);

fn polling(place: Polled, mode: &str, cpus: &[usize], choice: Option<Choice>) -> Finding {
    let (subject, target) = match place {
        Polled::Thread(id) => (format!("iothread {id}"), format!("iothread={id}")),
        Polled::Export(id) => (format!("export {id}"), format!("id={id}")),
    };
    let fix = format!(
        "blkplane ctl set-polling {target} mode=adaptive (and poll=adaptive, the default, in its configuration)"
    );
    match mode {
        "always" if cpus.is_empty() => finding(
            "polling",
            Severity::Warning,
            &subject,
            "poll=always on CPUs it shares with everything else (not pinned)".into(),
            "a thread that never sleeps holds a CPU even while its guests are idle, and takes it from the vCPUs and threads the scheduler puts beside it; a frontend it wakes must then run elsewhere, which on hosts whose idle CPUs halt delays the frontend's next request (about 20 µs a request, measured on a depth-1 disk workload)",
            format!("{fix}, or pin it to CPUs of its own (cpus=LIST) that no vCPU uses"),
        ),
        "always" => ok("polling", &subject, format!("poll=always on CPUs {} of its own", format_cpu_list(cpus))),
        "never" => finding(
            "polling",
            Severity::Note,
            &subject,
            "poll=never".into(),
            "it gives up what polling buys where the backend answers within microseconds (on tmpfs a depth-1 read took 21 µs polled against 40–56 µs slept, BENCHMARKS.md); adaptive polling tries both ways every 200 ms and sleeps where polling does not pay for its CPU, as on a disk",
            fix,
        ),
        _ => match choice {
            Some((chosen, trials)) => ok("polling", &subject, choice_text(chosen, trials)),
            None => ok("polling", &subject, format!("poll={mode} (no decision yet: no work seen)")),
        },
    }
}

fn export_checks(host: &Host, e: &ExportFacts) -> Vec<Finding> {
    let subject = format!("export {}", e.id);
    let mut out = Vec::new();
    out.push(match e.cache.as_str() {
        "unsafe" => finding(
            "export-cache",
            Severity::Warning,
            &subject,
            "cache=unsafe".into(),
            "flushes are ignored: a host crash or power loss loses data the guest was told is on disk",
            format!("serve export {} with cache=none (keep unsafe for scratch disks only)", e.id),
        ),
        "writeback" | "writethrough" => finding(
            "export-cache",
            Severity::Note,
            &subject,
            format!("cache={} (the host page cache)", e.cache),
            "the host page cache keeps a second copy of what the guest caches: host memory pressure and less predictable latency, for no gain on a guest with a page cache of its own",
            format!("serve export {} with cache=none (O_DIRECT; the guest's flushes still reach the disk)", e.id),
        ),
        c => ok("export-cache", &subject, format!("cache={c}")),
    });
    let Some(image) = &e.image else { return out };
    let device = host.block_device_dir(image);
    let is_device = device.as_ref().is_some_and(|(_, d)| *d)
        || std::fs::metadata(image).is_ok_and(|m| m.file_type().is_block_device());
    if e.aio == "native" && !is_device {
        out.push(finding(
            "export-aio",
            Severity::Warning,
            &subject,
            format!("aio=native on a file ({})", image.display()),
            "io_submit blocks on file systems whenever they allocate blocks or touch metadata, stalling the I/O thread and every queue on it",
            format!("serve export {} with aio=io_uring (the default) or aio=threads", e.id),
        ));
    } else {
        out.push(ok("export-aio", &subject, format!("aio={}", e.aio)));
    }
    let Some((dir, _)) = device else { return out };
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let sys_block = |file: &str| format!("/sys/block/{name}/queue/{file}");
    let rotational = read_trimmed(&dir.join("queue/rotational")).as_deref() == Some("1");
    if let Some(text) = read_trimmed(&dir.join("queue/scheduler")) {
        let current = selected(&text).unwrap_or(&text).to_string();
        out.push(match (rotational, current.as_str()) {
            (false, "none") | (true, "mq-deadline") | (true, "bfq") => {
                ok("device-scheduler", &subject, format!("{name}: the {current} scheduler"))
            }
            (false, s) => finding(
                "device-scheduler",
                if s == "bfq" { Severity::Warning } else { Severity::Note },
                &subject,
                format!("{name} (non-rotational) uses the {s} I/O scheduler"),
                "an SSD or NVMe device orders requests itself; a scheduler in front of it adds latency and CPU per request",
                format!("echo none > {} (a udev rule keeps it across reboots)", sys_block("scheduler")),
            ),
            (true, s) => finding(
                "device-scheduler",
                Severity::Note,
                &subject,
                format!("{name} (rotational) uses the {s} I/O scheduler"),
                "a spinning disk needs requests sorted to avoid seeks",
                format!("echo mq-deadline > {}", sys_block("scheduler")),
            ),
        });
    }
    if let Some(depth) =
        read_trimmed(&dir.join("queue/nr_requests")).and_then(|d| d.parse::<u64>().ok())
    {
        out.push(if depth < 64 {
            finding(
                "device-queue-depth",
                Severity::Note,
                &subject,
                format!("{name} takes at most {depth} requests at once"),
                "a guest at depth 32 on several queues waits in the host's queue instead of the device's",
                format!("echo 256 > {}", sys_block("nr_requests")),
            )
        } else {
            ok("device-queue-depth", &subject, format!("{name}: {depth} requests at once"))
        });
    }
    if let Some(cache) = read_trimmed(&dir.join("queue/write_cache")) {
        out.push(if cache == "write back" && e.cache == "unsafe" {
            finding(
                "device-write-cache",
                Severity::Critical,
                &subject,
                format!("{name} has a volatile write cache, and the export ignores flushes (cache=unsafe)"),
                "nothing ever tells the device to write its cache out: a power loss loses what guests were told is on disk",
                format!("serve export {} with cache=none", e.id),
            )
        } else {
            ok("device-write-cache", &subject, format!("{name}: {cache}"))
        });
    }
    out.push(device_numa(host, e, &subject, &dir, &name));
    out
}

fn device_numa(host: &Host, e: &ExportFacts, subject: &str, dir: &Path, name: &str) -> Finding {
    let Some(node) = host.device_numa_node(dir) else {
        return ok("device-numa", subject, format!("{name}: one NUMA node, nothing to place"));
    };
    let cpulist = host.read(&format!("/sys/devices/system/node/node{node}/cpulist"));
    let Some(local) = cpulist.map(|l| parse_cpu_ranges(&l)) else {
        return ok("device-numa", subject, format!("{name} is on node {node}"));
    };
    let local_list = format_cpu_list(&local);
    if e.io_cpus.is_empty() {
        return finding(
            "device-numa",
            Severity::Note,
            subject,
            format!("{name} is on NUMA node {node}; the export's I/O threads are not pinned"),
            "an I/O thread on another node reaches the device and its interrupts across the interconnect",
            format!("serve export {} from threads on node {node}'s CPUs: --iothread id=io-node{node},cpus={local_list} and iothread=io-node{node}", e.id),
        );
    }
    if e.io_cpus.iter().any(|c| local.contains(c)) {
        return ok(
            "device-numa",
            subject,
            format!("{name} is on node {node}, as are I/O thread CPUs"),
        );
    }
    finding(
        "device-numa",
        Severity::Warning,
        subject,
        format!("{name} is on NUMA node {node} (CPUs {local_list}); the export's I/O threads run on CPUs {}", format_cpu_list(&e.io_cpus)),
        "every request and completion crosses between nodes: memory and interrupts of the device are remote to the thread that serves it",
        format!("pin the export's I/O threads to node {node}'s CPUs: --iothread id=io-node{node},cpus={local_list} and iothread=io-node{node}"),
    )
}

/// The findings as text: problems first with why and fix, then the checks that are fine.
pub fn render(findings: &[Finding]) -> String {
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    let mut out = format!(
        "blkplane doctor: {} critical, {} warnings, {} notes, {} checks fine\n",
        count(Severity::Critical),
        count(Severity::Warning),
        count(Severity::Note),
        count(Severity::Ok)
    );
    for f in findings.iter().filter(|f| f.severity != Severity::Ok) {
        out.push_str(&format!(
            "\n{:<8} {} ({}): {}\n         why: {}\n         fix: {}\n",
            f.severity.name().to_uppercase(),
            f.check,
            f.subject,
            f.found,
            f.why,
            f.fix
        ));
    }
    let fine: Vec<String> = findings
        .iter()
        .filter(|f| f.severity == Severity::Ok)
        .map(|f| format!("  {} ({}): {}", f.check, f.subject, f.found))
        .collect();
    if !fine.is_empty() {
        out.push_str("\nfine:\n");
        out.push_str(&fine.join("\n"));
        out.push('\n');
    }
    out
}
