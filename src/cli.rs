//! The `blkplane` command line: its subcommands, their options and help. `main.rs` only
//! calls [`main`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::{Map, Value};

use crate::control::{print_out, ClientFailure, ControlClient, COMMAND_NAMES};
use crate::export::ExportConfig;
use crate::serve::{serve, usage_error, ServeOptions};

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
        after_help = "Commands: list-exports, add-export KEY=VALUE..., remove-export id=ID [force=true], reload, \
resize id=ID size=BYTES [shrink=on], query-stats [id=ID], set-polling [id=ID|iothread=NAME] [mode=adaptive|always|never] [max-us=N], \
set-throttle id=ID|group=NAME [iops-total=N] [bps-read=BYTES] ... (the limit keys of --export; those not given are lifted), \
list-iothreads, add-iothread id=NAME [cpus=LIST] [poll=MODE] [poll-max-us=N], remove-iothread id=NAME, \
dump-config (prints the running configuration as the TOML --config reads: keep runtime changes with \
`blkplane ctl dump-config > /etc/blkplane/blkplane.toml`), nbd-export id=ID [name=NAME] [writable=on], \
nbd-unexport id=ID, nbd-list (the NBD server of serve --nbd-server), \
mirror id=ID target=PATH|nbd://...|nbd+unix://... [speed=BYTES] [tls-creds=DIR] (copies the export's image to the target while the guest runs), \
query-jobs, job-cancel id=ID, job-complete id=ID.\n\
Values are sent as strings, as given; paths of export keys are made absolute first. \
docs/control.md describes every command, its arguments and its errors."
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
    Bench(Box<crate::bench::BenchArgs>),
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
    /// Write the man pages into a man directory: man1/blkplane.1, man1/blkplane-serve.1 and
    /// so on for the subcommands, and man5/blkplane.toml.5 for the configuration file.
    #[command(after_help = "Example:\n  blkplane manpages --dir /usr/share/man")]
    Manpages {
        /// Where to write them (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
    },
    /// One tenant's client of `bench --tenants` (run by the benchmark, not by people).
    #[command(hide = true)]
    BenchClient(crate::bench::tenants::ClientArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "export"])))]
struct VmConfigArgs {
    /// The VMM: qemu, libvirt or cloud-hypervisor.
    #[arg(long = "for", value_name = "VMM", value_enum)]
    vmm: crate::advice::vm_config::Vmm,
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
    use crate::advice::vm_config::{render, ExportShape, VmShape};
    let memory_bytes = match crate::spec::parse_size(&a.memory) {
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
    let host = crate::advice::Host::new(&a.root);
    client_exit(print_out(&render(a.vmm, &shape, vm, &host)))
}

fn doctor(control: &std::path::Path, json: bool, root: &std::path::Path) -> ExitCode {
    use crate::advice::doctor::{examine, render, ExportFacts, Finding, Severity, ThreadFacts};
    let host = crate::advice::Host::new(root);
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
                .filter_map(ThreadFacts::from_daemon)
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

/// key=value arguments as a JSON object of strings, sent as given: the daemon reads each
/// by its key's row (`007` stays `007`). Paths of export keys are made absolute here, in
/// the working directory of the command that names them.
fn args_to_json(args: &[String]) -> Result<Value, String> {
    let mut map = Map::new();
    for a in args {
        let (k, v) = a.split_once('=').ok_or_else(|| format!("'{a}' is not KEY=VALUE"))?;
        // A mirror's target= takes what image= takes.
        let path_key = ExportConfig::is_path_key(k) || k == "target";
        let value = if path_key && !crate::disk::is_network_image(v) {
            crate::spec::Value::Str(v.to_string()).path(k).map_err(|e| e.0)?.display().to_string()
        } else {
            v.to_string()
        };
        map.insert(k.to_string(), Value::String(value));
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
                    format!("\ncommands: {}", COMMAND_NAMES.join(", "))
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(options) => serve(options),
        Command::Ctl { control, command, args } => ctl(control, command, args),
        Command::Stat { control, interval, count, json } => {
            if !(interval > 0.0 && interval.is_finite()) {
                return usage_error("--interval must be a positive number of seconds");
            }
            let interval = Duration::from_secs_f64(interval);
            client_exit(crate::stat::run(&control, interval, count, json))
        }
        Command::VmConfig(args) => vm_config(args),
        Command::Doctor { control, json, root } => doctor(&control, json, &root),
        Command::Completions { shell } => {
            let mut cmd = crate::manpages::for_completion(Cli::command());
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "blkplane", &mut out);
            if shell == clap_complete::Shell::Fish {
                out.extend_from_slice(crate::manpages::fish_extra().as_bytes());
            }
            client_exit(print_out(&String::from_utf8_lossy(&out)))
        }
        Command::Manpages { dir } => match crate::manpages::write(Cli::command(), &dir) {
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
        Command::BenchClient(args) => match crate::bench::tenants::client_main(args) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("blkplane: bench-client: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => match crate::bench::run(*args) {
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
