//! The `blkplane` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::level_filters::LevelFilter;

use blkplane::export::ExportConfig;

const EXPORT_HELP: &str = "\
One export (repeat the option for more). Comma-separated key=value pairs; write ,, for a comma \
inside a value.

  socket=PATH        vhost-user socket to listen on (required). A stale socket file is
                     replaced; a socket another server listens on is refused.
  image=PATH         raw image file or host block device to serve. Never created or
                     truncated; its size must be a non-zero multiple of 512 bytes.
  engine=null        no backing at all: reads return zeroes, writes are discarded. Measures
                     the daemon's own overhead. Needs size=.
  size=BYTES         size of an engine=null export (suffixes K, M, G, T).
  queues=N           virtqueues offered to the guest, one I/O thread each (default 1, max 64).
  queue-size=N       largest virtqueue the guest may set up (power of two, default 256).
  cache=MODE         none (default): O_DIRECT, guest write cache on, FLUSH = fdatasync.
                     directsync: O_DIRECT|O_DSYNC, write cache off.
                     writeback: host page cache, write cache on, FLUSH = fdatasync.
                     writethrough: host page cache with O_DSYNC, write cache off.
                     unsafe: host page cache, FLUSH ignored: a host crash or power loss
                     may lose data the guest was told is on disk. For scratch disks only.
  aio=ENGINE         I/O engine for an image: io_uring (default).
  readonly=on|off    refuse writes, discards and write-zeroes (default off).
  serial=STR         serial number the guest reads with GET_ID (up to 20 bytes).
  poll=MODE          adaptive (default): after work, poll the rings for a self-tuning window
                     (up to poll-max-us) before sleeping; an idle export costs no CPU.
                     always: never sleep (for dedicated cores). never: sleep at once.
  poll-max-us=N      bound of the adaptive polling window in µs (default 64).
  cpus=LIST          pin the I/O threads: queue i runs on the i-th CPU of LIST (e.g. 1 or 2-3).
  stats=on|off       per-queue counters and sampled per-layer latency (default on).";

#[derive(Parser)]
#[command(
    name = "blkplane",
    version,
    about = "A userspace virtio-blk data plane: serves disk images to VMs over vhost-user-blk",
    long_about = "A userspace virtio-blk data plane for KVM guests. It serves raw disk images \
and host block devices to VMs (QEMU, Cloud Hypervisor, crosvm, libblkio) over the \
vhost-user-blk protocol, with one I/O thread per queue and io_uring for the I/O."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one or more exports until SIGTERM or SIGINT.
    #[command(
        after_help = "Example:\n  blkplane serve --export socket=/run/vm1.sock,image=/var/lib/vm1.raw,queues=2"
    )]
    Serve {
        /// An export: socket=PATH,image=PATH[,queues=N][,queue-size=N][,cache=MODE][,aio=ENGINE][,readonly=on][,serial=STR], or socket=PATH,engine=null,size=BYTES.
        #[arg(long = "export", value_name = "SPEC", required = true, long_help = EXPORT_HELP)]
        exports: Vec<String>,
        /// Log level: error, warn, info, debug or trace.
        #[arg(long, value_name = "LEVEL", default_value = "info")]
        log_level: LevelFilter,
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
}

/// Exit status for bad input on the command line.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { exports, log_level } => {
            tracing_subscriber::fmt().with_max_level(log_level).with_writer(std::io::stderr).init();
            let mut configs = Vec::with_capacity(exports.len());
            for spec in &exports {
                match ExportConfig::parse(spec) {
                    Ok(c) => configs.push(c),
                    Err(e) => {
                        eprintln!("blkplane: error: --export {spec}: {e}");
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
            }
            let servers = match blkplane::daemon::prepare(&configs) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("blkplane: error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            if let Err(e) = blkplane::daemon::serve(servers) {
                eprintln!("blkplane: error: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Command::Bench(args) => match blkplane::bench::run(*args) {
            Ok(report) => {
                print!("{}", report.table());
                println!();
                for line in report.verdicts() {
                    println!("{line}");
                }
                for note in &report.notes {
                    println!("{note}");
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
