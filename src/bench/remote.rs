//! `bench --backend nbd|rbd`: the benchmark's image behind a network backend, which every
//! target reaches the same way its users would: blkplane with its NBD or RBD engine,
//! qemu-storage-daemon with its own NBD or RBD block driver, and, for RBD, fio's `rbd` engine
//! (librbd straight from the benchmark, no daemon) in the `host` row, the limit.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::report::RunResult;
use super::target::TargetKind;
use super::workload::{ClientMode, Workload};
use super::BenchError;

/// Where the benchmark's image lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// A file (or block device) each target opens itself.
    File,
    /// The file served by qemu-nbd on a Unix socket (--cache=none, --aio=io_uring).
    Nbd,
    /// An RBD image made from the file in `--rbd-pool` of the cluster `--ceph-conf` names.
    Rbd,
}

/// A running network backend, torn down when dropped.
pub enum Remote {
    Nbd { socket: PathBuf, server: Child },
    Rbd { pool: String, image: String, conf: PathBuf },
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<String, BenchError> {
    let out = cmd.output().map_err(|e| BenchError(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(BenchError(format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Remote {
    /// Puts `file` behind `backend` (None for `Backend::File`).
    pub fn start(
        backend: Backend,
        file: &Path,
        dir: &Path,
        ceph_conf: &Path,
        pool: &str,
    ) -> Result<Option<Remote>, BenchError> {
        match backend {
            Backend::File => Ok(None),
            Backend::Nbd => {
                let socket = dir.join("qemu-nbd.sock");
                let server = Command::new("qemu-nbd")
                    .arg(format!("--socket={}", socket.display()))
                    .args(["--format=raw", "--cache=none", "--aio=io_uring", "--shared=16", "-t"])
                    .arg(file)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| BenchError(format!("starting qemu-nbd: {e}")))?;
                let remote = Remote::Nbd { socket: socket.clone(), server };
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::os::unix::net::UnixStream::connect(&socket).is_err() {
                    if Instant::now() > deadline {
                        return Err(BenchError("qemu-nbd never listened".into()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(Some(remote))
            }
            Backend::Rbd => {
                if !ceph_conf.is_file() {
                    return Err(BenchError(format!(
                        "--backend rbd: no Ceph configuration at {} (--ceph-conf)",
                        ceph_conf.display()
                    )));
                }
                // Every client the same: librbd without its cache (cache=none for the
                // daemons; fio's engine has no such option, so its configuration says it).
                let conf = dir.join("ceph-bench.conf");
                let original = fs::read_to_string(ceph_conf)
                    .map_err(|e| BenchError(format!("reading {}: {e}", ceph_conf.display())))?;
                fs::write(&conf, format!("{original}\n[client]\nrbd cache = false\n"))
                    .map_err(|e| BenchError(format!("writing {}: {e}", conf.display())))?;
                let image = format!("blkplane-bench-{}", std::process::id());
                eprintln!("importing the image into RBD {pool}/{image}");
                run_tool(
                    Command::new("rbd")
                        .arg("-c")
                        .arg(&conf)
                        .args(["import", "--no-progress"])
                        .arg(file)
                        .arg(format!("{pool}/{image}")),
                    "rbd import",
                )?;
                Ok(Some(Remote::Rbd { pool: pool.to_string(), image, conf }))
            }
        }
    }

    /// blkplane's export keys for it.
    pub fn blkplane_keys(&self) -> String {
        match self {
            Remote::Nbd { socket, .. } => format!("image=nbd+unix:///?socket={}", socket.display()),
            Remote::Rbd { pool, image, conf } => {
                format!("image=rbd:{pool}/{image}:conf={},cache=none", conf.display())
            }
        }
    }

    /// qemu-storage-daemon's `--blockdev` for it, as node `node`.
    pub fn qsd_blockdev(&self, node: &str) -> String {
        match self {
            Remote::Nbd { socket, .. } => format!(
                "driver=nbd,node-name={node},server.type=unix,server.path={}",
                socket.display()
            ),
            Remote::Rbd { pool, image, conf } => format!(
                "driver=rbd,node-name={node},pool={pool},image={image},conf={},cache.direct=on",
                conf.display()
            ),
        }
    }

    /// The server process the benchmark started, if any (qemu-nbd).
    pub fn server_pid(&self) -> Option<u32> {
        match self {
            Remote::Nbd { server, .. } => Some(server.id()),
            Remote::Rbd { .. } => None,
        }
    }

    /// For the report's image line.
    pub fn describe(&self) -> String {
        match self {
            Remote::Nbd { .. } => "behind qemu-nbd (Unix socket, cache=none, aio=io_uring)".into(),
            Remote::Rbd { pool, image, .. } => {
                format!("RBD {pool}/{image} (librbd cache off for every client)")
            }
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        match self {
            Remote::Nbd { server, .. } => {
                let _ = server.kill();
                let _ = server.wait();
            }
            Remote::Rbd { pool, image, conf } => {
                let _ = Command::new("rbd")
                    .arg("-c")
                    .arg(&*conf)
                    .args(["rm", "--no-progress", &format!("{pool}/{image}")])
                    .output();
            }
        }
    }
}

/// Whether qemu-storage-daemon at `qsd` has its rbd block driver (a module Debian ships in
/// qemu-block-extra).
pub fn qsd_has_rbd(qsd: &Path) -> bool {
    let out = Command::new(qsd)
        .args(["--blockdev", "driver=rbd,node-name=probe,pool=none,image=none,conf=/dev/null"])
        .output();
    match out {
        Ok(o) => !String::from_utf8_lossy(&o.stderr).contains("Unknown driver 'rbd'"),
        Err(_) => false,
    }
}

/// fio's `rbd` engine on the image: `queues` jobs at the workload's depth (busy-polling its
/// completions in poll mode), after `warmup`, for `runtime`: the host row of the table.
pub fn fio_rbd(
    remote: &Remote,
    w: Workload,
    mode: ClientMode,
    queues: usize,
    span: u64,
    warmup: Duration,
    runtime: Duration,
) -> Result<RunResult, BenchError> {
    let Remote::Rbd { pool, image, conf } = remote else {
        return Err(BenchError("fio's rbd engine needs --backend rbd".into()));
    };
    let rw = match (w.write, w.sequential) {
        (false, false) => "randread",
        (true, false) => "randwrite",
        (false, true) => "read",
        (true, true) => "write",
    };
    let out = run_tool(
        Command::new("fio")
            .env("CEPH_CONF", conf)
            .args(["--name=host", "--ioengine=rbd", "--clientname=admin"])
            .arg(format!("--pool={pool}"))
            .arg(format!("--rbdname={image}"))
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={}", w.block_bytes))
            .arg(format!("--iodepth={}", w.depth))
            .arg(format!("--numjobs={queues}"))
            .arg(format!("--size={span}"))
            .arg(format!("--busy_poll={}", u8::from(mode == ClientMode::Poll)))
            .arg(format!("--ramp_time={}ms", warmup.as_millis()))
            .arg(format!("--runtime={}ms", runtime.as_millis().max(1)))
            .args(["--time_based", "--group_reporting", "--lat_percentiles=1"])
            .args(["--percentile_list=50:99:99.9", "--output-format=json"]),
        "fio --ioengine=rbd",
    )?;
    parse_fio(&out, w, mode)
}

/// The figures of fio's JSON output for the workload's direction, as the host's row.
fn parse_fio(json: &str, w: Workload, mode: ClientMode) -> Result<RunResult, BenchError> {
    // fio may print warnings before the JSON.
    let start = json.find('{').ok_or_else(|| BenchError("fio printed no JSON".into()))?;
    let v: serde_json::Value =
        serde_json::from_str(&json[start..]).map_err(|e| BenchError(format!("fio's JSON: {e}")))?;
    let job = &v["jobs"][0];
    let side = &job[if w.write { "write" } else { "read" }];
    let lat = &side["lat_ns"];
    let pct = |p: &str| lat["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    let iops = side["iops"].as_f64().unwrap_or(0.0);
    let result = RunResult {
        workload: w.name.to_string(),
        mode,
        target: TargetKind::Host,
        iops,
        mb_per_s: iops * w.block_bytes as f64 / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        p999_us: pct("99.900000"),
        mean_us: lat["mean"].as_f64().unwrap_or(0.0) / 1000.0,
        ios: side["total_ios"].as_u64().unwrap_or(0),
        errors: job["error"].as_u64().unwrap_or(0),
        daemon_cpu_us_per_io: None,
        foreign_cpus: 0.0,
        tenants: None,
        layers: None,
        spread: None,
    };
    if result.ios == 0 || result.p50_us == 0.0 {
        return Err(BenchError("fio --ioengine=rbd completed no I/O".into()));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fio_json() {
        let json = r#"fio: a warning
{"jobs":[{"error":0,"read":{"iops":1234.5,"total_ios":5000,
 "lat_ns":{"mean":81000.0,"percentile":{"50.000000":80000,"99.000000":150000,"99.900000":300000}}},
 "write":{"iops":0,"total_ios":0,"lat_ns":{"mean":0}}}]}"#;
        let [read, write, ..] = crate::bench::workload::WORKLOADS;
        let r = parse_fio(json, read, ClientMode::Block).unwrap();
        assert_eq!(
            (r.iops, r.p50_us, r.p99_us, r.p999_us, r.mean_us, r.ios),
            (1234.5, 80.0, 150.0, 300.0, 81.0, 5000)
        );
        assert_eq!((r.target, r.mb_per_s), (TargetKind::Host, 1234.5 * 4096.0 / 1e6));
        assert_eq!(
            parse_fio(json, write, ClientMode::Block).err().unwrap().0,
            "fio --ioengine=rbd completed no I/O"
        );
    }
}
