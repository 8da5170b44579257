//! What the benchmark measures against: the host itself (io_uring on the image, no daemon),
//! qemu-storage-daemon, and blkplane, each also with a null backend.

use std::fmt;
use std::fs;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::BenchError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// io_uring with O_DIRECT on the image, no daemon: the physical limit for a daemon.
    Host,
    /// qemu-storage-daemon, aio=io_uring, cache.direct=on, an iothread.
    Qsd,
    /// blkplane with its defaults.
    Blkplane,
    /// qemu-storage-daemon's null-co backend.
    QsdNull,
    /// blkplane's engine=null.
    BlkplaneNull,
    /// blkplane with a thread of its own per queue (`iothread=dedicated`): the model before
    /// shared I/O threads.
    BlkplaneDedicated,
    /// qemu-storage-daemon with an iothread per export (with one export: as `qsd`).
    QsdIothreads,
    /// Another blkplane binary (`--baseline PATH`, e.g. a previous version) with its defaults.
    Baseline,
}

impl TargetKind {
    pub const ALL: [TargetKind; 8] = [
        TargetKind::Host,
        TargetKind::Qsd,
        TargetKind::Blkplane,
        TargetKind::QsdNull,
        TargetKind::BlkplaneNull,
        TargetKind::BlkplaneDedicated,
        TargetKind::QsdIothreads,
        TargetKind::Baseline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Host => "host",
            TargetKind::Qsd => "qsd",
            TargetKind::Blkplane => "blkplane",
            TargetKind::QsdNull => "qsd-null",
            TargetKind::BlkplaneNull => "blkplane-null",
            TargetKind::BlkplaneDedicated => "blkplane-dedicated",
            TargetKind::QsdIothreads => "qsd-iothreads",
            TargetKind::Baseline => "baseline",
        }
    }

    pub fn is_qsd(self) -> bool {
        matches!(self, TargetKind::Qsd | TargetKind::QsdNull | TargetKind::QsdIothreads)
    }

    pub fn is_null(self) -> bool {
        matches!(self, TargetKind::QsdNull | TargetKind::BlkplaneNull)
    }

    /// The target a ratio is taken against: the host for real backends; for null backends
    /// there is no host equivalent, so qsd's null export.
    pub fn baseline(self) -> TargetKind {
        if self.is_null() {
            TargetKind::QsdNull
        } else {
            TargetKind::Host
        }
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TargetKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TargetKind::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            format!(
                "unknown target '{s}' (one of host, qsd, blkplane, qsd-null, blkplane-null, \
                 blkplane-dedicated, qsd-iothreads, baseline)"
            )
        })
    }
}

/// A daemon the benchmark started; killed and reaped when dropped.
pub struct DaemonProcess {
    child: Child,
    /// The first export's socket.
    pub socket: PathBuf,
    /// Every export's socket, one per image.
    pub sockets: Vec<PathBuf>,
    pub log_path: PathBuf,
    /// A blkplane target's control socket (for its per-layer statistics).
    pub control: Option<PathBuf>,
}

impl DaemonProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_for_sockets(&mut self, what: &str) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.sockets.iter().all(|s| s.exists()) && UnixStream::connect(&self.socket).is_ok()
            {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BenchError(format!(
                    "{what} exited ({status}) before its socket appeared: {}",
                    last_line(&self.log_path)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(BenchError(format!(
            "the socket {} of {what} never appeared within 15 s: {}",
            self.socket.display(),
            last_line(&self.log_path)
        )))
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn last_line(log: &Path) -> String {
    fs::read_to_string(log)
        .ok()
        .and_then(|s| s.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string))
        .unwrap_or_else(|| "(no output)".into())
}

/// Pins the child to `cpus` (if any) and makes it die with us, before it runs.
pub(crate) fn prepare_child(cmd: &mut Command, cpus: Option<Vec<usize>>) {
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (prctl, sched_setaffinity) on its own stack data.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if let Some(cpus) = &cpus {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for &c in cpus {
                    libc::CPU_SET(c, &mut set);
                }
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            Ok(())
        });
    }
}

pub struct DaemonSpec<'a> {
    pub kind: TargetKind,
    /// One export per image (for null targets: per entry, of `size_bytes`).
    pub images: &'a [PathBuf],
    /// The image behind a network backend instead (one export).
    pub remote: Option<&'a super::remote::Remote>,
    pub size_bytes: u64,
    pub queues: u16,
    pub dir: &'a Path,
    pub cpus: Option<Vec<usize>>,
    pub qsd_path: &'a Path,
    pub blkplane_opts: &'a str,
    /// The binary of the baseline target.
    pub baseline_bin: Option<&'a Path>,
}

/// Starts the daemon for a daemon target, with one export per image, and waits for its
/// sockets.
pub fn start_daemon(spec: DaemonSpec<'_>) -> Result<DaemonProcess, BenchError> {
    let name = spec.kind.name();
    let sockets: Vec<PathBuf> = (0..spec.images.len())
        .map(|i| match i {
            0 => spec.dir.join(format!("{name}.sock")),
            i => spec.dir.join(format!("{name}-{i}.sock")),
        })
        .collect();
    let log_path = spec.dir.join(format!("{name}.log"));
    let control = spec.dir.join(format!("{name}.ctl"));
    let is_blkplane = !spec.kind.is_qsd() && spec.kind != TargetKind::Host;
    let log = fs::File::create(&log_path)
        .map_err(|e| BenchError(format!("creating {}: {e}", log_path.display())))?;
    let mut cmd = match spec.kind {
        TargetKind::Blkplane
        | TargetKind::BlkplaneNull
        | TargetKind::BlkplaneDedicated
        | TargetKind::Baseline => {
            let exe = match (spec.kind, spec.baseline_bin) {
                (TargetKind::Baseline, Some(bin)) => bin.to_path_buf(),
                (TargetKind::Baseline, None) => {
                    return Err(BenchError("the baseline target needs --baseline PATH".into()))
                }
                _ => std::env::current_exe()
                    .map_err(|e| BenchError(format!("finding blkplane itself: {e}")))?,
            };
            let mut cmd = Command::new(exe);
            cmd.args(["serve", "--log-level", "warn", "--control"]).arg(&control);
            for (image, socket) in spec.images.iter().zip(&sockets) {
                let backing = if spec.kind == TargetKind::BlkplaneNull {
                    format!("engine=null,size={}", spec.size_bytes)
                } else if let Some(remote) = spec.remote {
                    remote.blkplane_keys()
                } else {
                    // force-share: the other blkplane target serves the same image (their
                    // clients take turns), and both take QEMU's image locks.
                    format!("image={},force-share=on", image.display())
                };
                let mut export =
                    format!("socket={},{backing},queues={}", socket.display(), spec.queues);
                if spec.kind == TargetKind::BlkplaneDedicated {
                    export.push_str(",iothread=dedicated");
                }
                // The baseline runs with its defaults: keys this build knows may be new to it.
                if !spec.blkplane_opts.is_empty() && spec.kind != TargetKind::Baseline {
                    export.push(',');
                    export.push_str(spec.blkplane_opts);
                }
                cmd.args(["--export", &export]);
            }
            cmd
        }
        TargetKind::Qsd | TargetKind::QsdNull | TargetKind::QsdIothreads => {
            let mut cmd = Command::new(spec.qsd_path);
            let per_export = spec.kind == TargetKind::QsdIothreads;
            let threads = if per_export { spec.images.len() } else { 1 };
            for t in 0..threads {
                cmd.args(["--object", &format!("iothread,id=iot{t}")]);
            }
            for (i, (image, socket)) in spec.images.iter().zip(&sockets).enumerate() {
                if let Some(remote) = spec.remote {
                    cmd.args(["--blockdev", &remote.qsd_blockdev(&format!("disk{i}"))]);
                } else if spec.kind == TargetKind::QsdNull {
                    cmd.args([
                        "--blockdev",
                        &format!(
                            "driver=null-co,node-name=disk{i},size={},read-zeroes=on",
                            spec.size_bytes
                        ),
                    ]);
                } else {
                    // locking=off: blkplane has the same image open (their clients take
                    // turns), and both take QEMU's image locks, which would stop the second.
                    cmd.args([
                        "--blockdev",
                        &format!(
                            "driver=file,node-name=file{i},filename={},cache.direct=on,aio=io_uring,locking=off",
                            image.display()
                        ),
                        "--blockdev",
                        &format!("driver=raw,node-name=disk{i},file=file{i}"),
                    ]);
                }
                let iothread = if per_export { i } else { 0 };
                cmd.args([
                    "--export",
                    &format!(
                        "type=vhost-user-blk,id=exp{i},node-name=disk{i},addr.type=unix,addr.path={},writable=on,num-queues={},iothread=iot{iothread}",
                        socket.display(),
                        spec.queues
                    ),
                ]);
            }
            cmd
        }
        TargetKind::Host => return Err(BenchError("the host target has no daemon".into())),
    };
    let err_log = log.try_clone().map_err(|e| BenchError(e.to_string()))?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(err_log);
    prepare_child(&mut cmd, spec.cpus);
    let child = cmd.spawn().map_err(|e| BenchError(format!("starting {name}: {e}")))?;
    let socket = sockets[0].clone();
    let control = is_blkplane.then_some(control);
    let mut daemon = DaemonProcess { child, socket, sockets, log_path, control };
    daemon.wait_for_sockets(name)?;
    Ok(daemon)
}
