//! The `blkplane` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::{Map, Value};
use tracing::level_filters::LevelFilter;

use blkplane::config_file;
use blkplane::control::{
    metrics, print_out, ClientFailure, ControlClient, ControlServer, COMMANDS,
};
use blkplane::daemon::{self, Daemon};
use blkplane::engine::lock;
use blkplane::export::ExportConfig;
use blkplane::iothread::registry::{IoThreadConfig, IoThreads, MAX_POOL_THREADS};

const EXPORT_HELP: &str = "\
One export (repeat the option for more). Comma-separated key=value pairs; write ,, for a comma \
inside a value.

  id=NAME            name of the export on the control socket (default export0, export1, ...).
  socket=PATH        vhost-user socket to listen on (required, or socket-fd). A stale socket
                     file is replaced; a socket another server listens on is refused.
  socket-fd=N        serve on listening Unix socket N, inherited from the parent (an
                     orchestrator, a test harness); its file is left alone when the export
                     goes. Under systemd socket activation an export whose id is the name of
                     a passed socket (FileDescriptorName=) uses it without this key.
  image=PATH         raw image file or host block device to serve. Never created or
                     truncated; its size must be a non-zero multiple of 512 bytes.
  engine=null        no backing at all: reads return zeroes, writes are discarded. Measures
                     the daemon's own overhead. Needs size=.
  size=BYTES         size of an engine=null export (suffixes K, M, G, T).
  queues=N           virtqueues offered to the guest (default 1, max 64).
  queue-size=N       largest virtqueue the guest may set up (power of two, default 256).
  cache=MODE         none (default): O_DIRECT, guest write cache on, FLUSH = fdatasync.
                     directsync: O_DIRECT|O_DSYNC, write cache off.
                     writeback: host page cache, write cache on, FLUSH = fdatasync.
                     writethrough: host page cache with O_DSYNC, write cache off.
                     unsafe: host page cache, FLUSH ignored: a host crash or power loss
                     may lose data the guest was told is on disk. For scratch disks only.
  aio=ENGINE         I/O engine for an image: io_uring (default); native (Linux AIO, for
                     O_DIRECT on block devices); threads (a pool of worker threads doing
                     preadv/pwritev, for filesystems where the others block).
  readonly=on|off    refuse writes, discards and write-zeroes (default off).
  discard=MODE       unmap (default): the guest's discards punch holes in the image and its
                     write-zeroes may too. ignore: discards succeed and do nothing, write-
                     zeroes allocate; the image stays allocated (QEMU's and libvirt's default).
  serial=STR         serial number the guest reads with GET_ID (up to 20 bytes).
  iothread=WHERE     which I/O threads serve the queues. Default: the shared pool (each queue
                     on its least busy thread). NAME or NAME:NAME...: threads made with
                     --iothread, queue i on the i-th name, round-robin. dedicated: a thread of
                     the export's own per queue, with the polling and pinning keys below.
  poll=MODE          (dedicated threads; giving it implies iothread=dedicated)
                     adaptive (default): after work, poll the rings for a self-tuning window
                     (up to poll-max-us) before sleeping; an idle export costs no CPU.
                     always: never sleep (for dedicated cores). never: sleep at once.
  poll-max-us=N      bound of the adaptive polling window in µs (default 64; dedicated threads).
  cpus=LIST          pin the dedicated threads: queue i on the i-th CPU of LIST (e.g. 1 or 2-3).
  stats=on|off       per-queue counters and sampled per-layer latency (default on).
  logical-block-size=512|4096, physical-block-size=512|4096
                     block sizes the guest sees (default: what the backing needs). Reads
                     and writes not on a logical block fail. Smaller than O_DIRECT needs
                     (512 on a 4K-sector disk with cache=none) works with queues=1: writes
                     off the backing's blocks are then read-modify-write, slowly.
  num-queues, addr.path, writable
                     qemu-storage-daemon's names, accepted: queues, socket, and the opposite
                     of readonly (exports here are writable by default).
  force-share=on     serve an image that another process (QEMU, qemu-storage-daemon, another
                     blkplane) has locked, and let others use it too. blkplane takes
                     QEMU-compatible locks, so by default two of them cannot write one image.
  incoming=on        the destination of a live migration: the image may still be written
                     by the source (another export or daemon on the same image); this export
                     takes the write permission only when the migrated guest starts its
                     rings, waiting for the source to give it up (--image-lock-wait-ms).
                     A source gives it up when the guest's rings stop while its frontend
                     logs dirty pages (the switch-over), and takes it back if they restart.
  max-guest-memory=SIZE
                     the most guest RAM one frontend may have the daemon map (default 1T);
                     a larger memory table is refused.
  socket-mode=MODE, socket-group=GROUP, socket-owner=USER
                     who may connect: the socket is created 0600 (owner only); these widen
                     it on purpose, e.g. for QEMU run by libvirt as its own user
                     (socket-group=libvirt-qemu,socket-mode=0660). socket-owner needs root.
  image=nbd+unix:///EXPORT?socket=PATH, image=nbd://HOST[:PORT]/EXPORT
                     an NBD server's export; reconnect-delay=SECONDS (default 10) is how long
                     requests wait for a lost server before they fail.
  image=rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER], or pool=, rbd-image=, ceph-conf=,
  ceph-user=         a Ceph RBD image (a snapshot is served read-only); ceph-op-timeout=
                     SECONDS fails requests the cluster does not answer (default 0: wait).
  iops-total=N, iops-read=N, iops-write=N, bps-total=BYTES, bps-read=BYTES, bps-write=BYTES
                     rate limits, per second (QEMU's meaning). Each also takes -max (the rate
                     of a burst) and -max-length (seconds a burst at -max may last, default
                     1). A total and a per-direction limit of one unit exclude each other.
  iops-size=BYTES    a larger request counts as BYTES-sized operations.
  throttle-group=NAME
                     exports naming one group share its limits (given by its first export);
                     change them live with ctl set-throttle id=ID|group=NAME KEY=VALUE...";

/// Where `ctl` and `stat` look for the control socket when neither --control nor
/// BLKPLANE_CONTROL says: the path of contrib/'s unit and configuration.
const DEFAULT_CONTROL: &str = "/run/blkplane/control.sock";

/// The exit statuses every subcommand keeps to (README: "Exit status").
const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  success (serve: stopped by SIGTERM or SIGINT after its drain)
  1  a failure at run time (serve: the daemon could not go on; ctl, stat: the daemon
     refused the request, or the connection broke)
  2  a bad command line or configuration
  3  (ctl, stat) no daemon answers at the control socket";

#[derive(Parser)]
#[command(
    name = "blkplane",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("BLKPLANE_COMMIT"), ")"),
    about = "A userspace virtio-blk data plane: serves disk images to VMs over vhost-user-blk",
    long_about = "A userspace virtio-blk data plane for KVM guests. It serves raw disk images \
and host block devices to VMs (QEMU, Cloud Hypervisor, crosvm, libblkio) over the \
vhost-user-blk protocol, with a few polling I/O threads shared by all exports and io_uring \
for the I/O.",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve exports until SIGTERM or SIGINT.
    #[command(
        after_help = "Example:\n  blkplane serve --export socket=/run/vm1.sock,image=/var/lib/vm1.raw,queues=2 --control /run/blkplane.ctl"
    )]
    Serve(ServeOptions),
    /// Send one command to a running daemon's control socket and print the reply.
    #[command(
        after_help = "Commands: list-exports, add-export KEY=VALUE..., remove-export id=ID [force=true], \
resize id=ID size=BYTES, query-stats [id=ID], set-polling [id=ID|iothread=NAME] [mode=adaptive|always|never] [max-us=N], \
set-throttle id=ID|group=NAME [iops-total=N] [bps-read=BYTES] ... (the limit keys of --export; those not given are lifted), \
list-iothreads, add-iothread id=NAME [cpus=LIST] [poll=MODE] [poll-max-us=N], remove-iothread id=NAME, \
dump-config (prints the running configuration as the TOML --config reads: keep runtime changes with \
`blkplane ctl dump-config > /etc/blkplane/blkplane.toml`).\n\
Values true/false and whole numbers are sent as JSON booleans and numbers, the rest as strings."
    )]
    Ctl {
        /// The daemon's control socket (default: $BLKPLANE_CONTROL, else the path the
        /// example configuration in contrib/ gives, /run/blkplane/control.sock).
        #[arg(long, value_name = "PATH", env = "BLKPLANE_CONTROL", default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        /// The command.
        command: String,
        /// Its arguments.
        #[arg(value_name = "KEY=VALUE")]
        args: Vec<String>,
    },
    /// A live view of every export over each interval: IOPS, MB/s, every request's latency,
    /// and where each microsecond of the sampled ones goes.
    Stat {
        /// The daemon's control socket (default: $BLKPLANE_CONTROL, else the path the
        /// example configuration in contrib/ gives, /run/blkplane/control.sock).
        #[arg(long, value_name = "PATH", env = "BLKPLANE_CONTROL", default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        /// Seconds between views.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
        /// Views to print (default: until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// One JSON object per view and line, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Compare blkplane with the host and with qemu-storage-daemon, side by side in one run.
    #[command(
        after_help = "Workloads: randread-4k-qd1, randwrite-4k-qd1, randread-4k-qd32, seqread-128k-qd8; \
each with a client that sleeps on the completion eventfd (block) and one that busy-polls (poll).\n\
Targets: host (io_uring with O_DIRECT on the image, no daemon), qsd (qemu-storage-daemon, \
aio=io_uring, cache.direct=on, an iothread), blkplane (defaults), and the null backends \
qsd-null and blkplane-null (pure software cost)."
    )]
    Bench(Box<blkplane::bench::BenchArgs>),
    /// What a VMM needs to use an export well: QEMU arguments, a libvirt domain or Cloud
    /// Hypervisor arguments (shared and huge-page memory, a queue per vCPU, a reconnecting
    /// socket, vCPUs pinned off the export's I/O threads).
    #[command(
        after_help = "Examples:\n  blkplane vm-config --for qemu --id vm1 --vcpus 4 --memory 8G\n  \
blkplane vm-config --for libvirt --export socket=/run/blkplane/vm1.sock,image=/var/lib/vm1.raw,queues=2"
    )]
    VmConfig(VmConfigArgs),
    /// Where this host and the running daemon's exports depart from the tuning advice for KVM
    /// disk I/O, most important first, each with why it matters and the exact fix.
    #[command(after_help = "Checks: cpu-governor, cpu-idle, kernel, io-uring, huge-pages, \
transparent-huge-pages, aio-max-nr, memlock, congestion (per I/O thread), and per export: export-cache, \
export-aio, device-scheduler, device-queue-depth, device-write-cache, device-numa.")]
    Doctor {
        /// The daemon's control socket, for its exports and I/O threads (default:
        /// $BLKPLANE_CONTROL, else /run/blkplane/control.sock); without a daemon only the
        /// host is examined.
        #[arg(long, value_name = "PATH", env = "BLKPLANE_CONTROL", default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        /// One JSON array of findings, for scripts.
        #[arg(long)]
        json: bool,
        /// Where the host's /sys and /proc are (for tests: a fake tree).
        #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Print the completion script of a shell (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Example:\n  blkplane completions bash > /usr/share/bash-completion/completions/blkplane"
    )]
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (blkplane.1, and blkplane-serve.1 and so on for the subcommands)
    /// into a directory.
    #[command(after_help = "Example:\n  blkplane manpages --dir /usr/share/man/man1")]
    Manpages {
        /// Where to write them (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
    },
    /// One tenant's client of `bench --tenants` (run by the benchmark, not by people).
    #[command(hide = true)]
    BenchClient(blkplane::bench::tenants::ClientArgs),
}

/// Exit status for bad input on the command line.
const EXIT_USAGE: u8 = 2;

fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("blkplane: error: {message}");
    ExitCode::from(EXIT_USAGE)
}

#[derive(Args)]
struct ServeOptions {
    /// An export: socket=PATH,image=PATH[,queues=N][,queue-size=N][,cache=MODE][,aio=ENGINE][,readonly=on][,serial=STR], or socket=PATH,engine=null,size=BYTES.
    #[arg(long = "export", value_name = "SPEC", long_help = EXPORT_HELP)]
    exports: Vec<String>,
    /// A TOML file describing exports, the control socket and the metrics address (see the
    /// README); --export and the other options add to it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration (exports parse, images open, export and control sockets
    /// free, the metrics address bindable) and exit, printing only the verdict.
    #[arg(long)]
    check_config: bool,
    /// Open a control socket (JSON, one request per line; mode 0600) at PATH.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<LevelFilter>,
    /// Log lines as text (default) or JSON objects, on stderr. Under systemd (stderr is the
    /// journal) each line also carries its priority, so journalctl -p works.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<blkplane::logging::LogFormat>,
    /// A named I/O thread: id=NAME[,cpus=LIST][,poll=MODE][,poll-max-us=N]. Exports put
    /// their queues on it with iothread=NAME. cpus= is the thread's affinity (`,,` between
    /// CPUs: cpus=0,,2); poll= and poll-max-us= as for an export.
    #[arg(long = "iothread", value_name = "SPEC")]
    iothreads: Vec<String>,
    /// Threads of the shared I/O thread pool (default: one per CPU the process may use).
    #[arg(long, value_name = "N")]
    pool_threads: Option<usize>,
    /// The most guest memory the daemon maps for all its frontends together (e.g. 64T,
    /// the default); a memory table that would go over is refused. Each export also has
    /// its own max-guest-memory.
    #[arg(long, value_name = "SIZE")]
    max_mapped_guest_memory: Option<String>,
    /// How long to wait for an image another process has locked before refusing it
    /// (default 5000). A daemon killed with I/O in flight keeps its images locked until that
    /// I/O completes; its successor waits for it rather than fail.
    #[arg(long, value_name = "MS")]
    image_lock_wait_ms: Option<u64>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "export"])))]
struct VmConfigArgs {
    /// The VMM: qemu, libvirt or cloud-hypervisor.
    #[arg(long = "for", value_name = "VMM", value_enum)]
    vmm: blkplane::advice::vm_config::Vmm,
    /// The export's id on a running daemon (see --control).
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Or the export's keys as `serve --export` takes them, without asking a daemon.
    #[arg(long, value_name = "SPEC")]
    export: Option<String>,
    /// The daemon's control socket, for --id (default: $BLKPLANE_CONTROL, else
    /// /run/blkplane/control.sock).
    #[arg(long, value_name = "PATH", env = "BLKPLANE_CONTROL", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
    /// The VM's vCPUs (default: one per queue of the export).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    vcpus: Option<u16>,
    /// The VM's memory (suffixes K, M, G, T).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    memory: String,
    /// Where the host's /sys and /proc are (for tests: a fake tree).
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    root: PathBuf,
}

fn vm_config(a: VmConfigArgs) -> ExitCode {
    use blkplane::advice::vm_config::{render, ExportShape, VmShape};
    let memory_bytes = match blkplane::export::parse_size(&a.memory) {
        Ok(b) if b >= 1 << 20 => b,
        Ok(_) => return usage_error(format!("--memory {}: at least 1M", a.memory)),
        Err(e) => return usage_error(format!("--memory: {e}")),
    };
    let shape = match (&a.id, &a.export) {
        (_, Some(spec)) => match ExportConfig::parse(spec) {
            Ok(c) => ExportShape::from_config(&c),
            Err(e) => return usage_error(format!("--export {spec}: {e}")),
        },
        (Some(id), None) => {
            let found =
                ControlClient::exports_and_threads(&a.control).and_then(|(exports, threads)| {
                    let export = exports
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|e| e["id"].as_str() == Some(id.as_str()))
                        .ok_or_else(|| {
                            ClientFailure::Failed(format!("no export with id '{id}'"))
                        })?;
                    ExportShape::from_daemon(export, &threads).map_err(ClientFailure::Failed)
                });
            match found {
                Ok(shape) => shape,
                Err(e) => return client_exit(Err(e)),
            }
        }
        (None, None) => return usage_error("give --id or --export"),
    };
    let vm = VmShape { vcpus: a.vcpus.unwrap_or(shape.queues), memory_bytes };
    let host = blkplane::advice::Host::new(&a.root);
    client_exit(print_out(&render(a.vmm, &shape, vm, &host)))
}

fn doctor(control: &std::path::Path, json: bool, root: &std::path::Path) -> ExitCode {
    use blkplane::advice::doctor::{examine, render, ExportFacts, Finding, Severity, ThreadFacts};
    let host = blkplane::advice::Host::new(root);
    let (exports, threads, absent) = match ControlClient::exports_and_threads(control) {
        Ok((exports, threads)) => {
            let e: Vec<ExportFacts> = exports
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| ExportFacts::from_daemon(e, &threads))
                .collect();
            let t: Vec<ThreadFacts> = threads
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| {
                    let tid = t["tid"].as_u64().and_then(|n| u32::try_from(n).ok())?;
                    Some(ThreadFacts { id: t["id"].as_str()?.to_string(), tid })
                })
                .collect();
            (e, t, None)
        }
        Err(e) => (Vec::new(), Vec::new(), Some(e.to_string())),
    };
    let mut findings = examine(&host, &exports, &threads);
    if let Some(why) = absent {
        findings.push(Finding {
            check: "daemon",
            severity: Severity::Note,
            subject: "daemon".into(),
            found: format!("{why}: exports and I/O threads not examined"),
            why: "the export checks (cache, aio, device, NUMA) and the congestion of the I/O threads need the running daemon".into(),
            fix: "blkplane doctor --control PATH (or BLKPLANE_CONTROL=PATH)".into(),
        });
        findings.sort_by_key(|f| f.severity);
    }
    let text = if json {
        serde_json::to_string_pretty(&findings).unwrap_or_default() + "\n"
    } else {
        render(&findings)
    };
    client_exit(print_out(&text))
}

/// SIGHUP: re-reads the configuration file and applies its exports (`Daemon::reload`). A
/// file that does not parse changes nothing; what could not be applied is logged.
fn reload(daemon: &Daemon, config: Option<&std::path::Path>) {
    let Some(path) = config else {
        tracing::warn!("SIGHUP: the daemon was started without --config; nothing to re-read");
        return;
    };
    blkplane::service::reloading();
    match config_file::load(path) {
        Err(e) => tracing::error!("SIGHUP: {e}; nothing changed"),
        Ok(file) => {
            for problem in daemon.reload(file.exports) {
                tracing::warn!("SIGHUP: {problem}");
            }
            tracing::info!(exports = daemon.list().len(), "SIGHUP: configuration re-read");
        }
    }
    blkplane::service::ready(daemon.list().len());
}

fn serve(o: ServeOptions) -> ExitCode {
    let mut file = match &o.config {
        Some(path) => match config_file::load(path) {
            Ok(f) => f,
            Err(e) => return usage_error(e),
        },
        None => config_file::ConfigFile::default(),
    };
    let level = match (o.log_level, file.log_level.as_deref()) {
        (Some(l), _) => l,
        (None, Some(text)) => match text.parse() {
            Ok(l) => l,
            Err(_) => {
                return usage_error(format!(
                    "log-level '{text}': one of error, warn, info, debug, trace"
                ))
            }
        },
        (None, None) => LevelFilter::INFO,
    };
    // --check-config prints its verdict and nothing else.
    let level = if o.check_config { LevelFilter::OFF } else { level };
    let log_format = match (o.log_format, file.log_format.as_deref()) {
        (Some(f), _) => f,
        (None, Some(text)) => match text.parse() {
            Ok(f) => f,
            Err(e) => return usage_error(e),
        },
        (None, None) => blkplane::logging::LogFormat::Text,
    };
    blkplane::logging::init(level, log_format, blkplane::logging::stderr_is_journal());
    let exports_from_file = file.exports.len();
    for spec in &o.exports {
        match ExportConfig::parse(spec) {
            Ok(c) => file.exports.push(c),
            Err(e) => return usage_error(format!("--export {spec}: {e}")),
        }
    }
    // Socket activation: an export whose id names a socket systemd passed serves on it.
    for (fd, name) in blkplane::service::listen_fds() {
        match file.exports.iter_mut().find(|e| e.id.as_deref() == Some(name.as_str())) {
            Some(e) if e.socket_fd.is_none() => e.socket_fd = Some(fd),
            _ => tracing::warn!(fd, name, "systemd passed a socket no export has the id of"),
        }
    }
    if let Some(text) =
        o.max_mapped_guest_memory.as_deref().or(file.max_mapped_guest_memory.as_deref())
    {
        match blkplane::export::parse_size(text) {
            Ok(0) => return usage_error("max-mapped-guest-memory=0: guests need some memory"),
            Ok(bytes) => blkplane::virtq::memory::set_mapped_limit_bytes(bytes),
            Err(e) => return usage_error(format!("max-mapped-guest-memory: {e}")),
        }
    }
    match o.image_lock_wait_ms.or(file.image_lock_wait_ms) {
        Some(ms) if ms > lock::MAX_LOCK_WAIT_MS => {
            return usage_error(format!(
                "image-lock-wait-ms {ms}: at most {}",
                lock::MAX_LOCK_WAIT_MS
            ))
        }
        Some(ms) => lock::set_lock_wait_ms(ms),
        None => {}
    }
    let control_path = o.control.or(file.control.take());
    let metrics_addr = o.metrics.or(file.metrics.take());
    if file.exports.is_empty() && control_path.is_none() {
        return usage_error("nothing to serve: give --export, a --config with exports, or --control to add them later");
    }
    if let Err(e) = blkplane::sys::raise_fd_limit() {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
    for spec in &o.iothreads {
        match IoThreadConfig::parse(spec) {
            Ok(c) => file.iothreads.push(c),
            Err(e) => return usage_error(format!("--iothread {spec}: {e}")),
        }
    }
    let pool_threads = match o.pool_threads.or(file.pool_threads) {
        Some(n) if n == 0 || n > MAX_POOL_THREADS => {
            return usage_error(format!("--pool-threads {n}: from 1 to {MAX_POOL_THREADS}"))
        }
        Some(n) => n,
        None => IoThreads::default_pool_size(),
    };
    // Before any thread starts (the I/O threads start here): a thread that does not block
    // them could take SIGTERM or SIGHUP while the main thread is not in sigwait, and their
    // default action would end the daemon at once, without its drain.
    if let Err(e) = daemon::block_shutdown_signals() {
        eprintln!("blkplane: error: {e}");
        return ExitCode::FAILURE;
    }
    let daemon = match Daemon::new(pool_threads, &file.iothreads) {
        Ok(d) => Arc::new(d),
        Err(e) => return usage_error(e),
    };
    let control = match &control_path {
        Some(p) => match ControlServer::bind(p) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => return usage_error(e),
        },
        None => None,
    };
    let metrics_listener = match &metrics_addr {
        Some(a) => match metrics::bind(a) {
            Ok(l) => Some(l),
            Err(e) => return usage_error(e),
        },
        None => None,
    };
    if o.check_config {
        // Open and bind everything as serving would (exports, --control, --metrics), then
        // let it all go again: only the verdict is printed.
        return match daemon.add_exports(file.exports) {
            Ok(infos) => {
                daemon.shutdown();
                drop((control, metrics_listener));
                println!("configuration OK: {} export(s)", infos.len());
                ExitCode::SUCCESS
            }
            Err(e) => usage_error(e),
        };
    }
    daemon.set_settings(config_file::DaemonSettings {
        control: control_path.clone(),
        metrics: metrics_addr.clone(),
        log_level: Some(level.to_string().to_lowercase()),
        log_format: Some(format!("{log_format:?}").to_lowercase()),
        max_mapped_guest_memory: o
            .max_mapped_guest_memory
            .clone()
            .or(file.max_mapped_guest_memory.clone()),
        pool_threads: Some(pool_threads),
        image_lock_wait_ms: Some(lock::lock_wait_ms()),
    });
    match daemon.add_exports(file.exports) {
        Ok(infos) => {
            daemon.set_from_file(infos.into_iter().take(exports_from_file).map(|i| i.id).collect())
        }
        Err(e) => return usage_error(e),
    }
    let control_thread = control.as_ref().map(|c| {
        let (c, d) = (Arc::clone(c), Arc::clone(&daemon));
        std::thread::Builder::new().name("blkplane-control".into()).spawn(move || c.run(d))
    });
    if let Some(l) = metrics_listener {
        let d = Arc::clone(&daemon);
        // The metrics thread ends with the process.
        let _ = std::thread::Builder::new()
            .name("blkplane-metrics".into())
            .spawn(move || metrics::run(l, d));
    }
    tracing::info!(exports = daemon.list().len(), "serving");
    blkplane::service::ready(daemon.list().len());
    let signal = loop {
        match daemon::wait_for_shutdown_signal() {
            Ok(libc::SIGHUP) => reload(&daemon, o.config.as_deref()),
            Ok(s) => break s,
            Err(e) => {
                eprintln!("blkplane: error: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    tracing::info!(signal, "shutting down after in-flight I/O");
    blkplane::service::stopping();
    if let Some(c) = &control {
        c.shutdown();
    }
    if let Some(Ok(t)) = control_thread {
        let _ = t.join();
    }
    daemon.shutdown();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// key=value arguments as a JSON object: true/false become booleans, whole numbers numbers.
fn args_to_json(args: &[String]) -> Result<Value, String> {
    let mut map = Map::new();
    for a in args {
        let (k, v) = a.split_once('=').ok_or_else(|| format!("'{a}' is not KEY=VALUE"))?;
        let value = match v {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => match v.parse::<u64>() {
                Ok(n) => Value::from(n),
                Err(_) => Value::String(v.to_string()),
            },
        };
        map.insert(k.to_string(), value);
    }
    Ok(Value::Object(map))
}

fn ctl(control: PathBuf, command: String, args: Vec<String>) -> ExitCode {
    let args = match args_to_json(&args) {
        Ok(a) => a,
        Err(e) => return usage_error(e),
    };
    let result = ControlClient::connect_named(&control).and_then(|mut client| {
        let reply =
            client.call(&command, args).map_err(|e| ClientFailure::Failed(e.to_string()))?;
        match (reply.get("result"), reply.get("error")) {
            // A text (dump-config's file) is printed as it is.
            (Some(Value::String(text)), _) => print_out(text),
            (Some(result), _) => {
                print_out(&(serde_json::to_string_pretty(result).unwrap_or_default() + "\n"))
            }
            (_, Some(err)) => {
                let code = err.get("code").and_then(Value::as_str).unwrap_or("error");
                let message = err.get("message").and_then(Value::as_str).unwrap_or("");
                let hint = if code == "unknown-command" {
                    format!("\ncommands: {COMMANDS}")
                } else {
                    String::new()
                };
                Err(ClientFailure::Failed(format!("{command}: {message} ({code}){hint}")))
            }
            _ => Err(ClientFailure::Failed(format!(
                "a reply with neither result nor error: {reply}"
            ))),
        }
    });
    client_exit(result)
}

/// The exit status of `ctl` and `stat`, with the failure on stderr.
fn client_exit(result: Result<(), ClientFailure>) -> ExitCode {
    match result {
        Ok(()) | Err(ClientFailure::OutputClosed) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkplane: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Renders blkplane.1 and a page per visible subcommand (blkplane-serve.1, ...) into `dir`
/// from the clap definitions. Returns the files written.
fn write_manpages(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut pages = vec![("blkplane".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("blkplane-{}", sub.get_name());
        let version = cmd.get_version().unwrap_or_default().to_string();
        pages.push((name.clone(), sub.clone().name(name).version(version)));
    }
    let mut written = Vec::new();
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        std::fs::write(&path, out)?;
        written.push(path);
    }
    Ok(written)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(options) => serve(options),
        Command::Ctl { control, command, args } => ctl(control, command, args),
        Command::Stat { control, interval, count, json } => {
            if !(interval > 0.0 && interval.is_finite()) {
                return usage_error("--interval must be a positive number of seconds");
            }
            let interval = Duration::from_secs_f64(interval);
            client_exit(blkplane::stat::run(&control, interval, count, json))
        }
        Command::VmConfig(args) => vm_config(args),
        Command::Doctor { control, json, root } => doctor(&control, json, &root),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "blkplane", &mut out);
            client_exit(print_out(&String::from_utf8_lossy(&out)))
        }
        Command::Manpages { dir } => match write_manpages(&dir) {
            Ok(written) => {
                for path in written {
                    println!("{}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("blkplane: manpages: {e}");
                ExitCode::FAILURE
            }
        },
        Command::BenchClient(args) => match blkplane::bench::tenants::client_main(args) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("blkplane: bench-client: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => match blkplane::bench::run(*args) {
            Ok(report) => {
                for (i, r) in std::iter::once(&report).chain(report.disk.as_deref()).enumerate() {
                    if i > 0 {
                        println!("\nThe same on a disk:\n");
                    }
                    print!("{}", r.table());
                    println!();
                    let layers = r.layers_table();
                    if !layers.is_empty() {
                        println!("{layers}");
                    }
                    for line in r.verdicts() {
                        println!("{line}");
                    }
                    for note in &r.notes {
                        println!("{note}");
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("blkplane: bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
