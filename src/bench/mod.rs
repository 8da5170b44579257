//! `blkplane bench`: the same workloads, in one process run, against the host (io_uring on
//! the image, no daemon), qemu-storage-daemon and blkplane, each with a real virtio-blk driver
//! in userspace (libblkio). Every performance figure of the project comes from here.

pub mod cpu;
pub mod plot;
pub mod remote;
pub mod report;
pub mod target;
pub mod tenants;
pub mod workload;

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::spec::{parse_cpu_list, parse_size};
use report::{Machine, Report, RunResult};
use target::{start_daemon, DaemonProcess, DaemonSpec, TargetKind};
use workload::{ClientMode, Workload};

/// A benchmark failure: one line saying what went wrong.
#[derive(Debug)]
pub struct BenchError(pub String);

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Benchmark this image or block device instead of a temporary one. The write workload
    /// overwrites data in it.
    #[arg(long, value_name = "PATH", conflicts_with = "dir")]
    pub image: Option<PathBuf>,
    /// Directory for the temporary image (default /dev/shm, a tmpfs, where software overhead
    /// shows). Its filesystem must support O_DIRECT.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Without --image or --dir the image is on tmpfs, which shows the software's overhead
    /// but not what a disk does: the run is then made again, without the null backends, on
    /// an image in this directory (default: /var/tmp, when it is on a disk file system that
    /// takes O_DIRECT; `none` skips it).
    #[arg(long, value_name = "DIR")]
    pub disk_dir: Option<PathBuf>,
    /// Bytes the workloads spread over (suffixes K, M, G); the size of a temporary image.
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_size_arg)]
    pub size: u64,
    /// Seconds measured per workload, client mode and target.
    #[arg(long, value_name = "SECONDS", default_value_t = 4.0)]
    pub runtime: f64,
    /// Seconds of warm-up before each measurement.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.5)]
    pub warmup: f64,
    /// Workloads to run (comma-separated).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "randread-4k-qd1,randwrite-4k-qd1,randread-4k-qd32,seqread-128k-qd8"
    )]
    pub workloads: Vec<Workload>,
    /// Client modes: block (sleep on the completion eventfd) and/or poll (busy-poll).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "block,poll")]
    pub modes: Vec<ClientMode>,
    /// Targets: host, qsd, blkplane, qsd-null, blkplane-null, blkplane-dedicated (a thread
    /// per queue), qsd-iothreads (an iothread per export). With --tenants the default is
    /// host (each tenant's client on its own image, no daemon), blkplane, blkplane-dedicated,
    /// qsd, qsd-iothreads.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "host,qsd,blkplane,qsd-null,blkplane-null"
    )]
    pub targets: Vec<TargetKind>,
    /// Queues per export, each driven by its own client thread at the workload's depth.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub queues: u16,
    /// N exports in one daemon, each driven by a client process of its own at the workload's
    /// depth, all at once; reports aggregate IOPS, per-tenant p50/p99 and fairness (slowest
    /// tenant over the mean), compared with qemu-storage-daemon and with the host (the same
    /// clients straight on the images, no daemon). Each tenant's image is --size or its share
    /// of 4 GiB, whichever is smaller.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=tenants::MAX_TENANTS as i64))]
    pub tenants: Option<u16>,
    /// With --tenants: the noisy-neighbour run. Tenant 0 floods at queue depth 32
    /// (randread-4k-qd32) while the others run the workloads; each cell is measured with the
    /// flooder idle, flooding, and flooding under these limits (export keys, e.g.
    /// iops-total=2000, set live with set-throttle). blkplane targets only.
    #[arg(long, value_name = "KEYS")]
    pub flood_limit: Option<String>,
    /// Write every figure as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw IOPS and latency percentiles side by side as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Pin the client and the daemons: CLIENT_CPUS:DAEMON_CPUS, e.g. 0:1 or 0,1:2-3.
    #[arg(long, value_name = "CLIENT:DAEMON", value_parser = parse_cpu_split)]
    pub cpus: Option<(Vec<usize>, Vec<usize>)>,
    /// Seconds to measure the daemons' CPU with a client connected and no I/O (0: skip).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub idle: f64,
    /// Extra export keys for this build's blkplane targets, not the baseline (e.g.
    /// cache=none,queue-size=128).
    #[arg(long, value_name = "KEYS", default_value = "")]
    pub blkplane_opts: String,
    /// Another blkplane binary to measure beside this one (target `baseline`, added to the
    /// targets when given), e.g. the previous version, with its default settings.
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<PathBuf>,
    /// Run every cell (workload, mode, target) this many times, interleaved (each round runs
    /// every cell once), and report the median with the spread; verdicts then say "within
    /// noise" when the ranges overlap. With --tenants: the run of median aggregate IOPS, with
    /// the ranges of aggregate IOPS, fairness and the median tenant's p50, and a verdict
    /// giving the IOPS ratio to qsd of the medians and of each round (and each daemon's
    /// median as a fraction of the host's). With --flood-limit: each of the three phases this
    /// many times.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,
    /// The qemu-storage-daemon binary (default: from PATH).
    #[arg(long, value_name = "PATH", default_value = "qemu-storage-daemon")]
    pub qsd: PathBuf,
    /// Where the image is served from: file (each target opens it), nbd (qemu-nbd serves
    /// it; blkplane and qemu-storage-daemon are its NBD clients) or rbd (an RBD image made
    /// from it; the host row is fio's rbd engine).
    #[arg(long, value_enum, default_value = "file")]
    pub backend: remote::Backend,
    /// The Ceph cluster of `--backend rbd` (default: BLKPLANE_CEPH_CONF, else
    /// /etc/ceph/ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,
    /// The pool `--backend rbd` makes its image in.
    #[arg(long, value_name = "POOL", default_value = "rbd")]
    pub rbd_pool: String,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.0)
}

fn parse_cpu_split(s: &str) -> Result<(Vec<usize>, Vec<usize>), String> {
    let (client, daemon) = s.split_once(':').ok_or("expected CLIENT_CPUS:DAEMON_CPUS, e.g. 0:1")?;
    Ok((parse_cpu_list(client).map_err(|e| e.0)?, parse_cpu_list(daemon).map_err(|e| e.0)?))
}

fn pin_self(cpus: &[usize]) -> Result<(), BenchError> {
    // SAFETY: an all-zero cpu_set_t is valid; CPU_SET only writes inside it; numbers were
    // checked below CPU_SETSIZE.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(BenchError(format!("pinning the client: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

/// Finds qemu-storage-daemon; without it the qsd targets are dropped from `targets`, with a
/// note. Fails if no target is left.
fn find_qsd(
    args: &BenchArgs,
    targets: &mut Vec<TargetKind>,
    notes: &mut Vec<String>,
) -> Result<Option<PathBuf>, BenchError> {
    let qsd = find_in_path(&args.qsd);
    if qsd.is_none() && targets.iter().any(|t| t.is_qsd()) {
        notes.push(format!("{} not found: the qsd targets are skipped", args.qsd.display()));
        targets.retain(|t| !t.is_qsd());
    }
    if targets.is_empty() {
        return Err(BenchError("no target left to benchmark".into()));
    }
    Ok(qsd)
}

/// Starts a daemon for each of `targets`, each serving an export per image, pinned as
/// `--cpus` says.
fn start_daemons(
    args: &BenchArgs,
    targets: &[TargetKind],
    images: &[PathBuf],
    span: u64,
    dir: &Path,
    qsd: Option<&Path>,
    remote: Option<&remote::Remote>,
) -> Result<Vec<(TargetKind, DaemonProcess)>, BenchError> {
    let mut daemons = Vec::with_capacity(targets.len());
    for &t in targets {
        let d = start_daemon(DaemonSpec {
            kind: t,
            images,
            remote,
            size_bytes: span,
            queues: args.queues,
            dir,
            cpus: args.cpus.as_ref().map(|(_, d)| d.clone()),
            qsd_path: qsd.unwrap_or(&args.qsd),
            blkplane_opts: &args.blkplane_opts,
            baseline_bin: args.baseline.as_deref(),
        })?;
        daemons.push((t, d));
    }
    Ok(daemons)
}

/// Where the second run on a real disk goes (see `--disk-dir`): only when the image is a
/// temporary one in the default place, tmpfs.
fn disk_run_dir(args: &BenchArgs) -> Option<PathBuf> {
    if args.image.is_some()
        || args.dir.is_some()
        || args.tenants.is_some()
        || args.backend != remote::Backend::File
    {
        return None;
    }
    match &args.disk_dir {
        Some(d) if d.as_os_str() == "none" => None,
        Some(d) => Some(d.clone()),
        None => {
            let d = PathBuf::from("/var/tmp");
            let on_disk = crate::sys::filesystem_of(&d).is_some_and(|fs| fs != "tmpfs");
            (on_disk && check_direct_io(&d).is_ok()).then_some(d)
        }
    }
}

/// Where temporary images go: `--dir`, else /dev/shm (a tmpfs), else the temporary directory.
fn image_dir(args: &BenchArgs) -> PathBuf {
    match &args.dir {
        Some(d) => d.clone(),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    }
}

/// Whether `dir`'s filesystem accepts O_DIRECT (tmpfs does since Linux 6.6).
fn check_direct_io(dir: &Path) -> Result<(), BenchError> {
    let probe = dir.join(".blkplane-odirect-probe");
    let result = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let _ = fs::remove_file(&probe);
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(BenchError(format!(
            "--dir {}: its filesystem does not support O_DIRECT",
            dir.display()
        ))),
        Err(e) => Err(BenchError(format!("--dir {}: {e}", dir.display()))),
    }
}

/// Fills a new image with non-zero data (a sparse or zero image would flatter reads).
fn make_image(path: &Path, size: u64) -> Result<(), BenchError> {
    let err = |e: std::io::Error| BenchError(format!("creating {}: {e}", path.display()));
    let mut f = OpenOptions::new().create_new(true).write(true).open(path).map_err(err)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut written = 0;
    while written < size {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x as u8) | 1;
        }
        let n = (size - written).min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).map_err(err)?;
        written += n as u64;
    }
    f.sync_all().map_err(err)
}

/// What an image is on: `block device`, or its file system's type.
fn image_fs(path: &Path) -> String {
    use std::os::unix::fs::FileTypeExt;
    if fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
        return "block device".into();
    }
    crate::sys::filesystem_of(path).unwrap_or_else(|| "unknown".into())
}

fn image_size(path: &Path) -> Result<u64, BenchError> {
    let f =
        fs::File::open(path).map_err(|e| BenchError(format!("image {}: {e}", path.display())))?;
    let meta = f.metadata().map_err(|e| BenchError(e.to_string()))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::End(0)).map_err(|e| BenchError(format!("image {}: {e}", path.display())))
}

fn find_in_path(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|c| c.is_file()))
        .unwrap_or(None)
}

fn machine(qsd: Option<&Path>) -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel =
        fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let qsd_version =
        qsd.and_then(|q| std::process::Command::new(q).arg("--version").output().ok()).and_then(
            |o| String::from_utf8(o.stdout).ok().and_then(|s| s.lines().next().map(str::to_string)),
        );
    Machine {
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_model,
        kernel,
        qsd_version,
    }
}

struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn show(&mut self, what: &str) {
        let mut err = std::io::stderr();
        if self.tty {
            let width = 30;
            let filled = width * self.done / self.total.max(1);
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {}/{} {what}",
                "#".repeat(filled),
                ".".repeat(width - filled),
                self.done,
                self.total
            );
        } else {
            let _ = writeln!(err, "[{}/{}] {what}", self.done + 1, self.total);
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}

/// CPU a daemon spends with a client connected that does no I/O, after one request woke
/// its queue up (so that any polling would have started).
fn measure_idle(
    kind: TargetKind,
    daemon: &DaemonProcess,
    queues: u16,
    period: Duration,
) -> Result<report::IdleResult, BenchError> {
    let one =
        Workload { name: "idle", write: false, sequential: false, block_bytes: 4096, depth: 1 };
    let mut client = workload::connect(kind, &daemon.socket, usize::from(queues), 1, 4096)?;
    workload::run(
        &mut client,
        one,
        ClientMode::Block,
        1 << 20,
        Duration::ZERO,
        Duration::from_millis(10),
    )?;
    let before = cpu::process_cpu_ns(daemon.pid());
    std::thread::sleep(period);
    let used = cpu::process_cpu_ns(daemon.pid()).saturating_sub(before);
    drop(client);
    Ok(report::IdleResult {
        target: kind,
        seconds: period.as_secs_f64(),
        cpu_percent: 100.0 * used as f64 / period.as_nanos() as f64,
        connected: 1,
        rss_per_connected_export_kib: None,
    })
}

/// A blkplane daemon's control connection, reading its statistics around a measured window.
struct LayerProbe(crate::control::ControlClient);

impl LayerProbe {
    /// For a daemon with a control socket (the blkplane targets).
    fn open(daemon: Option<&DaemonProcess>) -> Option<LayerProbe> {
        let path = daemon?.control.as_deref()?;
        crate::control::ControlClient::connect(path).ok().map(LayerProbe)
    }

    /// Its `query-stats`, once the idle I/O thread has handed over its histograms (within
    /// MERGE_EVERY of going idle), so that the reads on both sides of a window hold exactly
    /// the requests made in between.
    fn read(&mut self) -> Option<serde_json::Value> {
        std::thread::sleep(crate::trace::MERGE_EVERY + Duration::from_millis(50));
        self.0.result("query-stats").ok()
    }
}

/// Runs the benchmark and returns its report (written as JSON and SVG if asked).
pub fn run(args: BenchArgs) -> Result<Report, BenchError> {
    let (json, plot) = (args.json.clone(), args.plot.clone());
    let disk_dir = disk_run_dir(&args);
    let report = match args.tenants {
        Some(_) if args.backend != remote::Backend::File => {
            return Err(BenchError("--tenants measures file images only (--backend file)".into()))
        }
        Some(n) => {
            check_times(&args)?;
            tenants::run(args, usize::from(n))?
        }
        None => {
            let disk_args = disk_dir.map(|dir| BenchArgs {
                dir: Some(dir),
                targets: args.targets.iter().copied().filter(|t| !t.is_null()).collect(),
                idle: 0.0,
                ..args.clone()
            });
            let mut report = run_single(args)?;
            if let Some(disk_args) = disk_args.filter(|a| !a.targets.is_empty()) {
                eprintln!(
                    "again on a disk, in {}",
                    disk_args.dir.as_deref().unwrap_or(Path::new("?")).display()
                );
                report.disk = Some(Box::new(run_single(disk_args)?));
            }
            report
        }
    };
    if let Some(path) = &json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| BenchError(e.to_string()))?;
        fs::write(path, text)
            .map_err(|e| BenchError(format!("writing {}: {e}", path.display())))?;
    }
    if let Some(path) = &plot {
        fs::write(path, report.svg())
            .map_err(|e| BenchError(format!("writing {}: {e}", path.display())))?;
    }
    Ok(report)
}

/// The Ceph configuration `--backend rbd` uses.
fn ceph_conf(args: &BenchArgs) -> PathBuf {
    args.ceph_conf
        .clone()
        .or_else(|| std::env::var_os("BLKPLANE_CEPH_CONF").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/ceph/ceph.conf"))
}

fn check_times(args: &BenchArgs) -> Result<(), BenchError> {
    let valid = args.runtime > 0.0
        && args.runtime.is_finite()
        && args.warmup >= 0.0
        && args.warmup.is_finite();
    if valid {
        Ok(())
    } else {
        Err(BenchError("--runtime must be > 0 and --warmup >= 0".into()))
    }
}

/// The single-client benchmark: one export per target, one client at a time.
fn run_single(args: BenchArgs) -> Result<Report, BenchError> {
    check_times(&args)?;
    let date = crate::sys::utc_now_text();
    let mut notes = Vec::new();
    let mut targets = args.targets.clone();
    if args.baseline.is_some() && !targets.contains(&TargetKind::Baseline) {
        targets.push(TargetKind::Baseline);
    }
    targets.dedup();
    let qsd = find_qsd(&args, &mut targets, &mut notes)?;
    let max_block = args.workloads.iter().map(|w| w.block_bytes).max().unwrap_or(4096);
    let max_depth = args.workloads.iter().map(|w| w.depth).max().unwrap_or(1);

    // The image: the user's, or a temporary one filled with non-zero data.
    let base_dir = image_dir(&args);
    let work = tempfile::Builder::new()
        .prefix("blkplane-bench")
        .tempdir_in(if args.image.is_some() { std::env::temp_dir() } else { base_dir.clone() })
        .map_err(|e| BenchError(format!("creating a directory in {}: {e}", base_dir.display())))?;
    let (image, span) = match &args.image {
        Some(img) => {
            let size = image_size(img)?;
            if size < args.size {
                return Err(BenchError(format!(
                    "image {} is {size} bytes, smaller than the workload span --size {}",
                    img.display(),
                    args.size
                )));
            }
            (img.clone(), args.size)
        }
        None => {
            check_direct_io(work.path())?;
            if args.size < max_block as u64 * max_depth as u64 || !args.size.is_multiple_of(4096) {
                return Err(BenchError(format!(
                    "--size {} is too small or not a multiple of 4096 for these workloads",
                    args.size
                )));
            }
            let img = work.path().join("bench.img");
            eprintln!("creating a {} MiB image in {}", args.size >> 20, work.path().display());
            make_image(&img, args.size)?;
            (img, args.size)
        }
    };

    let remote = remote::Remote::start(
        args.backend,
        &image,
        work.path(),
        &ceph_conf(&args),
        &args.rbd_pool,
    )?;
    if remote.is_some() {
        let dropped: Vec<TargetKind> = targets
            .iter()
            .copied()
            .filter(|t| {
                t.is_null() || (*t == TargetKind::Host && args.backend != remote::Backend::Rbd)
            })
            .collect();
        if !dropped.is_empty() {
            let names: Vec<&str> = dropped.iter().map(|t| t.name()).collect();
            notes.push(format!(
                "--backend {:?}: no {} (null backends serve no image; the host row exists for rbd only, as fio's rbd engine)",
                args.backend,
                names.join(", ")
            ).to_lowercase());
            targets.retain(|t| !dropped.contains(t));
        }
        let qsd_bin = qsd.as_deref().unwrap_or(&args.qsd);
        if args.backend == remote::Backend::Rbd
            && targets.iter().any(|t| t.is_qsd())
            && !remote::qsd_has_rbd(qsd_bin)
        {
            notes.push(format!(
                "{} has no rbd driver (Debian: qemu-block-extra): the qsd targets are skipped",
                qsd_bin.display()
            ));
            targets.retain(|t| !t.is_qsd());
        }
        if args.backend == remote::Backend::Rbd && targets.contains(&TargetKind::Host) {
            notes.push(
                "host = fio --ioengine=rbd: librbd in the benchmark's own process, no daemon"
                    .into(),
            );
        }
        if args.backend == remote::Backend::Rbd {
            notes.push("the Ceph daemons, when they run on this machine, count as other processes in the load warnings".into());
        }
        if targets.is_empty() {
            return Err(BenchError("no target left to benchmark".into()));
        }
    }

    let idle = cpu::LoadWindow::start(&[]);
    std::thread::sleep(Duration::from_millis(500));
    let foreign = idle.foreign_cpus();
    if foreign > cpu::FOREIGN_LOAD_WARN_CPUS {
        let line = format!(
            "warning: other processes use {foreign:.2} CPUs before the run; figures will not be comparable"
        );
        eprintln!("{line}");
        notes.push(line);
    }

    let daemon_targets: Vec<TargetKind> =
        targets.iter().copied().filter(|t| *t != TargetKind::Host).collect();
    let daemons = start_daemons(
        &args,
        &daemon_targets,
        std::slice::from_ref(&image),
        span,
        work.path(),
        qsd.as_deref(),
        remote.as_ref(),
    )?;
    if let Some((c, _)) = &args.cpus {
        pin_self(c)?;
    }

    let mut progress = Progress {
        total: args.workloads.len() * args.modes.len() * targets.len() * args.repeat as usize,
        done: 0,
        tty: std::io::stderr().is_terminal(),
    };
    let mut results = Vec::new();
    let warmup = Duration::from_secs_f64(args.warmup);
    let runtime = Duration::from_secs_f64(args.runtime);
    // The NBD server works for every target alike: not a foreign load.
    let daemon_pids: Vec<u32> = daemons
        .iter()
        .map(|(_, d)| d.pid())
        .chain(remote.as_ref().and_then(remote::Remote::server_pid))
        .collect();
    for round in 1..=args.repeat {
        for &w in &args.workloads {
            for &mode in &args.modes {
                for &t in &targets {
                    let of = if args.repeat > 1 {
                        format!(" (round {round} of {})", args.repeat)
                    } else {
                        String::new()
                    };
                    progress.show(&format!("{t} {} {mode}{of}", w.name));
                    if let (TargetKind::Host, Some(r)) = (t, &remote) {
                        results.push(remote::fio_rbd(
                            r,
                            w,
                            mode,
                            usize::from(args.queues),
                            span,
                            warmup,
                            runtime,
                        )?);
                        progress.done += 1;
                        continue;
                    }
                    let daemon = daemons.iter().find(|(k, _)| *k == t).map(|(_, d)| d);
                    let path = daemon.map(|d| d.socket.as_path()).unwrap_or(&image);
                    let mut client = workload::connect(
                        t,
                        path,
                        usize::from(args.queues),
                        w.depth,
                        w.block_bytes,
                    )?;
                    // A blkplane daemon's statistics around the measured window (the warm-up
                    // runs apart) give the layer breakdown.
                    let mut probe = LayerProbe::open(daemon);
                    let warmup = match probe {
                        Some(_) if !warmup.is_zero() => {
                            workload::run(&mut client, w, mode, span, Duration::ZERO, warmup)?;
                            Duration::ZERO
                        }
                        _ => warmup,
                    };
                    let stats_before = probe.as_mut().and_then(LayerProbe::read);
                    let load = cpu::LoadWindow::start(&daemon_pids);
                    let cpu_before = daemon.map(|d| cpu::process_cpu_ns(d.pid()));
                    let m = workload::run(&mut client, w, mode, span, warmup, runtime)?;
                    let cpu_after = daemon.map(|d| cpu::process_cpu_ns(d.pid()));
                    let stats_after = probe.as_mut().and_then(LayerProbe::read);
                    let layers = stats_before
                        .zip(stats_after)
                        .and_then(|(before, after)| crate::stat::layers_between(&before, &after))
                        .map(|(daemon_us, stages)| {
                            report::Layers::new(m.latency_ns.mean() / 1000.0, daemon_us, &stages)
                        });
                    // After the disconnect, so that the client's io_uring workers have exited
                    // and been counted as ours.
                    drop(client);
                    let foreign_cpus = load.foreign_cpus();
                    let secs = m.window.as_secs_f64();
                    let iops = m.ios as f64 / secs;
                    let pct = |q: f64| m.latency_ns.value_at_quantile(q) as f64 / 1000.0;
                    let daemon_cpu_us_per_io = match (cpu_before, cpu_after) {
                        (Some(a), Some(b)) if m.total_ios > 0 => {
                            Some(b.saturating_sub(a) as f64 / 1000.0 / m.total_ios as f64)
                        }
                        _ => None,
                    };
                    if foreign_cpus > cpu::FOREIGN_LOAD_WARN_CPUS {
                        notes.push(format!(
                        "warning: other processes used {foreign_cpus:.2} CPUs during {t} {} {mode}",
                        w.name
                    ));
                    }
                    if m.ios == 0 {
                        return Err(BenchError(format!(
                            "{t} completed no I/O in {} {mode}",
                            w.name
                        )));
                    }
                    results.push(RunResult {
                        workload: w.name.to_string(),
                        mode,
                        target: t,
                        iops,
                        mb_per_s: iops * w.block_bytes as f64 / 1e6,
                        p50_us: pct(0.5),
                        p99_us: pct(0.99),
                        p999_us: pct(0.999),
                        mean_us: m.latency_ns.mean() / 1000.0,
                        ios: m.ios,
                        errors: m.errors,
                        daemon_cpu_us_per_io,
                        foreign_cpus,
                        tenants: None,
                        layers,
                        spread: None,
                    });
                    progress.done += 1;
                }
            }
        }
    }
    progress.finish();
    let results = report::combine_repeats(results);
    let mut idle = Vec::new();
    if args.idle > 0.0 {
        for (t, d) in
            daemons.iter().filter(|(t, _)| matches!(t, TargetKind::Blkplane | TargetKind::Qsd))
        {
            eprintln!("measuring {t} idle for {} s with a client connected", args.idle);
            idle.push(measure_idle(*t, d, args.queues, Duration::from_secs_f64(args.idle))?);
        }
    }
    drop(daemons);
    let image_text = match (&remote, args.image.is_some()) {
        (Some(r), _) => r.describe(),
        (None, true) => image.display().to_string(),
        (None, false) => format!("temporary, in {}", base_dir.display()),
    };
    drop(remote);
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date,
        machine: machine(qsd.as_deref()),
        image: image_text,
        image_fs: image_fs(&image),
        span_bytes: span,
        runtime_s: args.runtime,
        warmup_s: args.warmup,
        queues: usize::from(args.queues),
        tenants: 0,
        results,
        idle,
        notes,
        disk: None,
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_split("0:1").unwrap(), (vec![0], vec![1]));
        assert!(parse_cpu_split("0").is_err());
        assert!(parse_cpu_split("0:x").is_err());
        assert!(parse_cpu_split("0:5000").is_err());
        assert!(parse_cpu_list("1-0").is_err());
        assert_eq!(parse_cpu_list("0-1").unwrap(), vec![0, 1]);
    }
}
