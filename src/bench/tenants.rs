//! `blkplane bench --tenants N`: N exports in one daemon, each driven by a client process of
//! its own (`blkplane bench-client`, hidden), all started together. Reports the aggregate
//! IOPS, each tenant's IOPS, p50 and p99, and fairness (the slowest tenant's IOPS over the
//! mean), against qemu-storage-daemon with the same exports on one iothread and on an iothread
//! each, and against the host: N clients each on its own tenant's image through io_uring, no
//! daemon, what the storage itself gives at the same number of requests outstanding. With
//! `--repeat` every cell runs once a round, and `report::combine_repeats` keeps each cell's
//! median run with the ranges.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::report::{IdleResult, Report, RunResult};
use super::target::{DaemonProcess, TargetKind};
use super::workload::{self, ClientMode, Workload};
use super::{cpu, BenchError};

/// Most tenants one run may have (each is a client process and an export).
pub const MAX_TENANTS: usize = 256;
/// Bytes of tmpfs all tenants' images may take together: each gets its share, up to `--size`.
const ALL_IMAGES_BYTES: u64 = 4 << 30;
/// Smallest tenant image.
const MIN_TENANT_BYTES: u64 = 16 << 20;

/// The image size of each of `tenants` tenants when `--size` asks for `size` each.
pub fn tenant_image_bytes(size: u64, tenants: usize) -> u64 {
    let share = ALL_IMAGES_BYTES / tenants.max(1) as u64;
    (size.min(share) >> 20 << 20).max(MIN_TENANT_BYTES)
}

/// One tenant's client process, as `blkplane bench-client` takes it.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    #[arg(long)]
    pub target: TargetKind,
    /// The export's vhost-user socket; for the host target, the tenant's image.
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long)]
    pub workload: Workload,
    #[arg(long)]
    pub mode: ClientMode,
    #[arg(long)]
    pub span: u64,
    #[arg(long)]
    pub warmup: f64,
    #[arg(long)]
    pub runtime: f64,
    /// Start the workload at this time (milliseconds since the epoch), so that every
    /// tenant's measured window is the same.
    #[arg(long)]
    pub start_at_ms: u64,
    /// Instead of the workload: one request, then stay connected and idle for --runtime.
    #[arg(long)]
    pub idle: bool,
}

/// What one tenant measured (the client process prints it as JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TenantRun {
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub ios: u64,
    pub total_ios: u64,
    pub errors: u64,
}

/// Every tenant of one run, and how evenly they were served.
#[derive(Clone, Debug, Serialize)]
pub struct TenantFigures {
    pub tenants: usize,
    /// The slowest tenant's IOPS over the mean; with `--repeat`, the median over the runs
    /// (then `min_iops` and `each` are the median run's, and `spread` has the range).
    pub fairness: f64,
    pub min_iops: f64,
    pub each: Vec<TenantRun>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The client process: connect, wait for the common start, run, print the figures.
pub fn client_main(a: ClientArgs) -> Result<String, BenchError> {
    let w = a.workload;
    let mut client = workload::connect(a.target, &a.socket, 1, w.depth, w.block_bytes)?;
    let runtime = Duration::from_secs_f64(a.runtime);
    if a.idle {
        // One request wakes the queue up (so any polling would start), then nothing.
        let one = Workload { depth: 1, ..w };
        let m = workload::run(
            &mut client,
            one,
            a.mode,
            a.span,
            Duration::ZERO,
            Duration::from_millis(10),
        )?;
        let wait = a.start_at_ms.saturating_sub(now_ms());
        std::thread::sleep(Duration::from_millis(wait) + runtime);
        let run = TenantRun {
            iops: 0.0,
            p50_us: 0.0,
            p99_us: 0.0,
            ios: 0,
            total_ios: m.total_ios,
            errors: m.errors,
        };
        return serde_json::to_string(&run).map_err(|e| BenchError(e.to_string()));
    }
    let wait = a.start_at_ms.saturating_sub(now_ms());
    std::thread::sleep(Duration::from_millis(wait));
    let m =
        workload::run(&mut client, w, a.mode, a.span, Duration::from_secs_f64(a.warmup), runtime)?;
    let pct = |q: f64| m.latency_ns.value_at_quantile(q) as f64 / 1000.0;
    let run = TenantRun {
        iops: m.ios as f64 / runtime.as_secs_f64(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        ios: m.ios,
        total_ios: m.total_ios,
        errors: m.errors,
    };
    serde_json::to_string(&run).map_err(|e| BenchError(e.to_string()))
}

/// What tenant 0 does instead of the plan's workload (the noisy-neighbour run).
#[derive(Clone, Copy)]
enum FirstTenant {
    /// Connected and idle.
    Idle,
    /// This workload (a flood).
    Runs(Workload),
}

/// How the tenants' clients run.
struct ClientPlan<'a> {
    w: Workload,
    mode: ClientMode,
    span: u64,
    warmup: Duration,
    runtime: Duration,
    client_cpus: Option<&'a [usize]>,
    idle: bool,
    /// Tenant 0 apart, if set.
    first: Option<FirstTenant>,
}

/// One target of a tenants run: what each tenant's client opens, and the daemon, if any.
struct Served {
    target: TargetKind,
    /// A path per tenant: the daemon's export sockets, or for the host the images themselves.
    paths: Vec<PathBuf>,
    /// None for the host.
    daemon: Option<DaemonProcess>,
}

/// Starts every target of a tenants run in `targets`' order: a daemon serving an export per
/// image, or for the host nothing (its clients open the images).
fn start_targets(
    args: &super::BenchArgs,
    targets: &[TargetKind],
    images: &[PathBuf],
    span: u64,
    dir: &std::path::Path,
    qsd: Option<&std::path::Path>,
) -> Result<Vec<Served>, BenchError> {
    let mut served = Vec::with_capacity(targets.len());
    for &target in targets {
        if target == TargetKind::Host {
            served.push(Served { target, paths: images.to_vec(), daemon: None });
            continue;
        }
        for (_, d) in super::start_daemons(args, &[target], images, span, dir, qsd, None)? {
            served.push(Served { target, paths: d.sockets.clone(), daemon: Some(d) });
        }
    }
    Ok(served)
}

/// Starts one client process per path of `served`, all set to begin at the same moment.
/// Returns them and that moment.
fn start_clients(
    served: &Served,
    plan: &ClientPlan<'_>,
) -> Result<(Vec<std::process::Child>, u64), BenchError> {
    let ClientPlan { w, mode, span, warmup, runtime, client_cpus, idle, first } = *plan;
    let exe = std::env::current_exe().map_err(|e| BenchError(format!("finding blkplane: {e}")))?;
    let tenants = served.paths.len();
    // Time to start and connect every client before the common start.
    let start_at = now_ms() + 1000 + 20 * tenants as u64;
    let mut children = Vec::with_capacity(tenants);
    for (i, socket) in served.paths.iter().enumerate() {
        let (w, idle) = match (i, first) {
            (0, Some(FirstTenant::Idle)) => (w, true),
            (0, Some(FirstTenant::Runs(flood))) => (flood, false),
            _ => (w, idle),
        };
        let mut cmd = Command::new(&exe);
        cmd.arg("bench-client")
            .args(["--target", served.target.name()])
            .arg("--socket")
            .arg(socket)
            .args(["--workload", w.name, "--mode", &mode.to_string()])
            .args(["--span", &span.to_string()])
            .args(["--warmup", &warmup.as_secs_f64().to_string()])
            .args(["--runtime", &runtime.as_secs_f64().to_string()])
            .args(["--start-at-ms", &start_at.to_string()])
            .args(idle.then_some("--idle"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        super::target::prepare_child(&mut cmd, client_cpus.map(<[usize]>::to_vec));
        children.push(cmd.spawn().map_err(|e| BenchError(format!("starting a client: {e}")))?);
    }
    Ok((children, start_at))
}

/// Waits for every client and collects what each measured.
fn collect(
    target: TargetKind,
    children: Vec<std::process::Child>,
) -> Result<Vec<TenantRun>, BenchError> {
    let mut each = Vec::with_capacity(children.len());
    let mut failure = None;
    for child in children {
        let out = child.wait_with_output().map_err(|e| BenchError(e.to_string()))?;
        if !out.status.success() {
            failure.get_or_insert_with(|| {
                BenchError(format!(
                    "a {target} tenant's client failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            });
            continue;
        }
        let run: TenantRun = serde_json::from_slice(&out.stdout)
            .map_err(|e| BenchError(format!("a tenant's client said something odd: {e}")))?;
        each.push(run);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(each),
    }
}

/// Runs a workload on every tenant of `served` at once, one client process per tenant.
fn run_tenants(served: &Served, plan: &ClientPlan<'_>) -> Result<RunResult, BenchError> {
    let (each, cpu_used, foreign_cpus) = run_clients(served, plan)?;
    Ok(summarize(served.target, plan.w, plan.mode, each, cpu_used, foreign_cpus))
}

/// Runs every tenant's client once: what each measured, the daemon's CPU time (ns; None for
/// the host, which has no daemon) and the CPUs other processes used meanwhile.
fn run_clients(
    served: &Served,
    plan: &ClientPlan<'_>,
) -> Result<(Vec<TenantRun>, Option<u64>, f64), BenchError> {
    let (children, _) = start_clients(served, plan)?;
    let pid = served.daemon.as_ref().map(DaemonProcess::pid);
    // The clients are ours too (counted once waited for): only load from other processes
    // makes figures incomparable.
    let load = cpu::LoadWindow::start(pid.as_slice());
    // All of the process's CPU, threads that ended included (dedicated threads end with
    // their client).
    let cpu_before = pid.map(cpu::process_cpu_total_ns);
    let each = collect(served.target, children)?;
    let cpu_used =
        pid.zip(cpu_before).map(|(p, before)| cpu::process_cpu_total_ns(p).saturating_sub(before));
    Ok((each, cpu_used, load.foreign_cpus()))
}

/// The workload tenant 0 floods with in the noisy-neighbour run.
const FLOOD: &str = "randread-4k-qd32";

/// One cell of the noisy-neighbour run (`--flood-limit`): the other tenants' figures with
/// tenant 0 idle, flooding, and flooding under `limit` (set live on export0 and lifted
/// after), `repeat` rounds. Returns the three rows and a note with the verdict.
fn noisy_neighbour(
    served: &Served,
    plan: &ClientPlan<'_>,
    limit: &str,
    repeat: usize,
) -> Result<(Vec<RunResult>, String), BenchError> {
    let target = served.target;
    let flood: Workload = FLOOD.parse().map_err(BenchError)?;
    let control =
        served.daemon.as_ref().and_then(|d| d.control.as_deref()).ok_or_else(|| {
            BenchError(format!("{target} has no control socket to set limits on"))
        })?;
    let set_limit = |keys: &str| -> Result<(), BenchError> {
        let mut args = serde_json::Map::new();
        args.insert("id".into(), "export0".into());
        for (k, v) in crate::spec::split_pairs(keys, crate::qos::THROTTLE_KEYS)
            .map_err(|e| BenchError(e.0))?
        {
            args.insert(k, v.to_json());
        }
        let mut c = crate::control::ControlClient::connect_named(control)
            .map_err(|e| BenchError(e.to_string()))?;
        let reply = c
            .call("set-throttle", serde_json::Value::Object(args))
            .map_err(|e| BenchError(format!("set-throttle: {e}")))?;
        match reply.get("error") {
            Some(e) => Err(BenchError(format!("set-throttle {keys}: {}", e["message"]))),
            None => Ok(()),
        }
    };
    let phases = [
        ("alone", FirstTenant::Idle, None),
        ("+flood", FirstTenant::Runs(flood), None),
        ("+limited flood", FirstTenant::Runs(flood), Some(limit)),
    ];
    // Each round runs the three phases one after the other, so that a slow moment of the
    // machine falls on all three alike; each phase's row is its median round (by p99).
    let mut runs: Vec<Vec<(RunResult, f64)>> = vec![Vec::new(); phases.len()];
    for _ in 0..repeat {
        for (i, &(phase, first, limit)) in phases.iter().enumerate() {
            if let Some(keys) = limit {
                set_limit(keys)?;
            }
            let run = run_clients(served, &ClientPlan { first: Some(first), ..*plan });
            if limit.is_some() {
                set_limit("")?;
            }
            let (mut each, cpu_used, foreign_cpus) = run?;
            let flooder = each.remove(0);
            let mut r = summarize(target, plan.w, plan.mode, each, cpu_used, foreign_cpus);
            r.workload = format!("{} {phase}", r.workload);
            // The daemon's CPU went to the flood too: per QD1 request it says nothing.
            r.daemon_cpu_us_per_io = None;
            runs[i].push((r, flooder.iops));
        }
    }
    let mut rows = Vec::new();
    let mut flooder_iops = Vec::new();
    let mut ranges = Vec::new();
    for mut phase_runs in runs {
        phase_runs.sort_by(|a, b| a.0.p99_us.total_cmp(&b.0.p99_us));
        let (lo, hi) = (phase_runs[0].0.p99_us, phase_runs[phase_runs.len() - 1].0.p99_us);
        ranges.push(if phase_runs.len() > 1 {
            format!(" [{lo:.0}-{hi:.0}]")
        } else {
            String::new()
        });
        let (r, iops) = phase_runs.swap_remove(phase_runs.len() / 2);
        rows.push(r);
        flooder_iops.push(iops);
    }
    let p99 = |i: usize| rows[i].p99_us;
    let note = format!(
        "noisy neighbour, {target} {} {}, median of {repeat}: the other tenants' worst p99 \
         {:.1} us{} alone, {:.1} us{} ({:.2}x) beside tenant 0's QD32 flood ({:.0} IOPS), \
         {:.1} us{} ({:.2}x, target at most 1.5x) with the flood limited to {limit} ({:.0} IOPS)",
        plan.w.name,
        plan.mode,
        p99(0),
        ranges[0],
        p99(1),
        ranges[1],
        p99(1) / p99(0),
        flooder_iops[1],
        p99(2),
        ranges[2],
        p99(2) / p99(0),
        flooder_iops[2],
    );
    Ok((rows, note))
}

fn summarize(
    target: TargetKind,
    w: Workload,
    mode: ClientMode,
    each: Vec<TenantRun>,
    cpu_used_ns: Option<u64>,
    foreign_cpus: f64,
) -> RunResult {
    let n = each.len().max(1) as f64;
    let iops: f64 = each.iter().map(|t| t.iops).sum();
    let min_iops = each.iter().map(|t| t.iops).fold(f64::INFINITY, f64::min);
    let total_ios: u64 = each.iter().map(|t| t.total_ios).sum();
    let mut p50s: Vec<f64> = each.iter().map(|t| t.p50_us).collect();
    p50s.sort_by(f64::total_cmp);
    let worst_p99 = each.iter().map(|t| t.p99_us).fold(0.0, f64::max);
    let mean = iops / n;
    RunResult {
        workload: format!("{} x{}", w.name, each.len()),
        mode,
        target,
        iops,
        mb_per_s: iops * w.block_bytes as f64 / 1e6,
        // The median tenant's p50, and the worst tenant's p99.
        p50_us: p50s.get(p50s.len() / 2).copied().unwrap_or(0.0),
        p99_us: worst_p99,
        p999_us: 0.0,
        mean_us: 0.0,
        ios: each.iter().map(|t| t.ios).sum(),
        errors: each.iter().map(|t| t.errors).sum(),
        daemon_cpu_us_per_io: cpu_used_ns
            .filter(|_| total_ios > 0)
            .map(|ns| ns as f64 / 1000.0 / total_ios as f64),
        foreign_cpus,
        tenants: Some(TenantFigures {
            tenants: each.len(),
            fairness: if mean > 0.0 { min_iops / mean } else { 0.0 },
            min_iops,
            each,
        }),
        layers: None,
        spread: None,
    }
}

/// Resident memory of `pid` in bytes (VmRSS).
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
            })
        })
        .map_or(0, |kib| kib << 10)
}

/// CPU and memory of `served`'s daemon with every tenant connected and idle.
fn measure_idle(
    served: &Served,
    daemon: &DaemonProcess,
    span: u64,
    period: Duration,
) -> Result<IdleResult, BenchError> {
    let one = super::workload::WORKLOADS[0];
    let plan = ClientPlan {
        w: one,
        mode: ClientMode::Block,
        span,
        warmup: Duration::ZERO,
        runtime: period + Duration::from_secs(1),
        client_cpus: None,
        idle: true,
        first: None,
    };
    let rss_before = rss_bytes(daemon.pid());
    let (children, start_at) = start_clients(served, &plan)?;
    // Measure from half a second after every client connected and sent its request.
    std::thread::sleep(Duration::from_millis(start_at.saturating_sub(now_ms()) + 500));
    let before = cpu::process_cpu_ns(daemon.pid());
    std::thread::sleep(period);
    let used = cpu::process_cpu_ns(daemon.pid()).saturating_sub(before);
    let rss_connected = rss_bytes(daemon.pid());
    collect(served.target, children)?;
    let tenants = daemon.sockets.len().max(1) as u64;
    Ok(IdleResult {
        target: served.target,
        seconds: period.as_secs_f64(),
        cpu_percent: 100.0 * used as f64 / period.as_nanos() as f64,
        connected: daemon.sockets.len(),
        rss_per_connected_export_kib: Some(
            rss_connected.saturating_sub(rss_before) as f64 / 1024.0 / tenants as f64,
        ),
    })
}

/// Every (workload, mode, target) cell of a tenants run.
struct Cells<'a> {
    args: &'a super::BenchArgs,
    targets: &'a [Served],
    span: u64,
    client_cpus: Option<&'a [usize]>,
}

impl Cells<'_> {
    fn plan(&self, w: Workload, mode: ClientMode) -> ClientPlan<'_> {
        ClientPlan {
            w,
            mode,
            span: self.span,
            warmup: Duration::from_secs_f64(self.args.warmup),
            runtime: Duration::from_secs_f64(self.args.runtime),
            client_cpus: self.client_cpus,
            idle: false,
            first: None,
        }
    }

    fn progress(&self, rounds: usize) -> super::Progress {
        super::Progress {
            total: self.args.workloads.len() * self.args.modes.len() * self.targets.len() * rounds,
            done: 0,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }

    /// Runs every cell `--repeat` times, round after round (each round runs every cell once,
    /// so that a slow moment of the machine falls on every target alike), and folds each
    /// cell's runs into its median with the ranges.
    fn measure(&self, notes: &mut Vec<String>) -> Result<Vec<RunResult>, BenchError> {
        let repeat = self.args.repeat as usize;
        let mut progress = self.progress(repeat);
        let mut results = Vec::new();
        for round in 1..=repeat {
            let of =
                if repeat > 1 { format!(" (round {round} of {repeat})") } else { String::new() };
            for &w in &self.args.workloads {
                for &mode in &self.args.modes {
                    for served in self.targets {
                        let (t, tenants) = (served.target, served.paths.len());
                        progress.show(&format!("{t} {} {mode} x{tenants}{of}", w.name));
                        let r = run_tenants(served, &self.plan(w, mode))?;
                        if r.foreign_cpus > cpu::FOREIGN_LOAD_WARN_CPUS {
                            notes.push(format!(
                                "warning: other processes used {:.2} CPUs during {t} {} {mode}{of}",
                                r.foreign_cpus, w.name
                            ));
                        }
                        if r.ios == 0 {
                            return Err(BenchError(format!(
                                "{t} completed no I/O in {} {mode}",
                                w.name
                            )));
                        }
                        results.push(r);
                        progress.done += 1;
                    }
                }
            }
        }
        progress.finish();
        Ok(super::report::combine_repeats(results))
    }

    /// The noisy-neighbour run of every cell (`--flood-limit`), which repeats each of its
    /// three phases `--repeat` times itself.
    fn noisy_neighbours(
        &self,
        limit: &str,
        notes: &mut Vec<String>,
    ) -> Result<Vec<RunResult>, BenchError> {
        let mut progress = self.progress(1);
        let mut results = Vec::new();
        for &w in &self.args.workloads {
            for &mode in &self.args.modes {
                for served in self.targets {
                    let (t, tenants) = (served.target, served.paths.len());
                    progress.show(&format!("{t} {} {mode} x{tenants}", w.name));
                    let plan = self.plan(w, mode);
                    let (rows, note) =
                        noisy_neighbour(served, &plan, limit, self.args.repeat as usize)?;
                    notes.push(note);
                    results.extend(rows);
                    progress.done += 1;
                }
            }
        }
        progress.finish();
        Ok(results)
    }
}

/// `blkplane bench --tenants N`.
pub fn run(args: super::BenchArgs, tenants: usize) -> Result<Report, BenchError> {
    let date = crate::sys::utc_now_text();
    let mut notes = Vec::new();
    if args.image.is_some() {
        return Err(BenchError(
            "--tenants makes an image per tenant; --image does not go with it".into(),
        ));
    }
    let classic_default = [
        TargetKind::Host,
        TargetKind::Qsd,
        TargetKind::Blkplane,
        TargetKind::QsdNull,
        TargetKind::BlkplaneNull,
    ];
    // The host stays in the default, as in ordinary runs: what the storage gives N clients
    // with no daemon shows whether a ratio to qsd is one the storage allows at all.
    let mut targets = if args.targets == classic_default {
        vec![
            TargetKind::Host,
            TargetKind::Blkplane,
            TargetKind::BlkplaneDedicated,
            TargetKind::Qsd,
            TargetKind::QsdIothreads,
        ]
    } else {
        args.targets.clone()
    };
    if args.baseline.is_some() && !targets.contains(&TargetKind::Baseline) {
        targets.push(TargetKind::Baseline);
    }
    if let Some(keys) = &args.flood_limit {
        let pairs = crate::spec::split_pairs(keys, crate::qos::THROTTLE_KEYS)
            .map_err(|e| BenchError(format!("--flood-limit: {e}")))?;
        crate::qos::ThrottleConfig::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v)))
            .map_err(|e| BenchError(format!("--flood-limit: {e}")))?;
        if tenants < 2 {
            return Err(BenchError(
                "--flood-limit needs --tenants 2 or more (a flooder and the others)".into(),
            ));
        }
        let before = targets.len();
        targets.retain(|t| !t.is_qsd() && *t != TargetKind::Host);
        if targets.len() < before {
            notes.push("--flood-limit: host and qemu-storage-daemon targets skipped (limits are set with blkplane's set-throttle)".into());
        }
    }
    let qsd = super::find_qsd(&args, &mut targets, &mut notes)?;
    let base_dir = super::image_dir(&args);
    let work = tempfile::Builder::new()
        .prefix("blkplane-bench")
        .tempdir_in(&base_dir)
        .map_err(|e| BenchError(format!("creating a directory in {}: {e}", base_dir.display())))?;
    super::check_direct_io(work.path())?;
    let span = tenant_image_bytes(args.size, tenants);
    let images: Vec<PathBuf> =
        (0..tenants).map(|i| work.path().join(format!("tenant{i}.img"))).collect();
    eprintln!("creating {tenants} images of {} MiB in {}", span >> 20, work.path().display());
    for image in &images {
        super::make_image(image, span)?;
    }
    let client_cpus = args.cpus.as_ref().map(|(c, _)| c.clone());
    let served = start_targets(&args, &targets, &images, span, work.path(), qsd.as_deref())?;
    let cells = Cells { args: &args, targets: &served, span, client_cpus: client_cpus.as_deref() };
    let results = match &args.flood_limit {
        Some(limit) => cells.noisy_neighbours(limit, &mut notes)?,
        None => cells.measure(&mut notes)?,
    };
    let mut idle = Vec::new();
    if args.idle > 0.0 {
        for s in &served {
            // The host has no daemon to spend CPU while its clients idle.
            let Some(d) = &s.daemon else { continue };
            let t = s.target;
            eprintln!("measuring {t} idle for {} s with {tenants} clients connected", args.idle);
            idle.push(measure_idle(s, d, span, Duration::from_secs_f64(args.idle))?);
        }
    }
    drop(served);
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date,
        machine: super::machine(qsd.as_deref()),
        image: format!("{tenants} temporary images, in {}", base_dir.display()),
        image_fs: super::image_fs(&base_dir),
        span_bytes: span,
        runtime_s: args.runtime,
        warmup_s: args.warmup,
        queues: usize::from(args.queues),
        tenants,
        results,
        idle,
        notes,
        disk: None,
    })
}
