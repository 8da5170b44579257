//! CPU accounting for the benchmark: how much CPU a daemon spent, and whether something else
//! on the machine was busy while we measured (which makes figures incomparable).

use std::fs;

/// Nanoseconds of CPU every thread of `pid` has run so far (from /proc/PID/task/*/schedstat).
/// Threads that exited are not counted, so measure while the threads of interest live.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// CPU time of process `pid`, exited threads included (from /proc/PID/stat, in clock ticks).
pub fn process_cpu_total_ns(pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = [11usize, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    (ticks as f64 / ticks_per_second() * 1e9) as u64
}

/// Busy time of the whole machine, in clock ticks (every CPU, everything but idle and iowait).
fn machine_busy_ticks() -> u64 {
    let Ok(stat) = fs::read_to_string("/proc/stat") else { return 0 };
    let Some(line) = stat.lines().next() else { return 0 };
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let pick = |i: usize| fields.get(i).copied().unwrap_or(0);
    pick(0) + pick(1) + pick(2) + pick(5) + pick(6) + pick(7)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU time of this process, threads that already exited included.
/// CPU time of this process and of its children that ended and were waited for (the
/// benchmark's client processes; the daemons are waited for only at the end).
fn own_cpu_ns() -> u64 {
    let used = |who: libc::c_int| {
        // SAFETY: getrusage writes one rusage into the zeroed value we pass.
        let usage = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut u);
            u
        };
        let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
        tv(usage.ru_utime) + tv(usage.ru_stime)
    };
    used(libc::RUSAGE_SELF) + used(libc::RUSAGE_CHILDREN)
}

/// A window over which foreign CPU load is measured: the machine's busy time minus the CPU
/// time of the processes we know about (this one and the daemons).
pub struct LoadWindow {
    busy_ticks: u64,
    ours_ns: u64,
    daemon_pids: Vec<u32>,
    started: std::time::Instant,
}

impl LoadWindow {
    pub fn start(daemon_pids: &[u32]) -> LoadWindow {
        let mut w = LoadWindow {
            busy_ticks: machine_busy_ticks(),
            ours_ns: 0,
            daemon_pids: daemon_pids.to_vec(),
            started: std::time::Instant::now(),
        };
        w.ours_ns = w.ours_now();
        w
    }

    fn ours_now(&self) -> u64 {
        own_cpu_ns() + self.daemon_pids.iter().map(|&p| process_cpu_total_ns(p)).sum::<u64>()
    }

    /// CPUs' worth of load from other processes since `start` (1.0 = one CPU fully busy).
    /// Busy time is counted in clock ticks, so short windows are coarse.
    pub fn foreign_cpus(&self) -> f64 {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let busy_s =
            machine_busy_ticks().saturating_sub(self.busy_ticks) as f64 / ticks_per_second();
        let ours_s = self.ours_now().saturating_sub(self.ours_ns) as f64 / 1e9;
        ((busy_s - ours_s) / elapsed).max(0.0)
    }
}

/// Above this, figures are flagged as taken on a busy machine.
pub const FOREIGN_LOAD_WARN_CPUS: f64 = 0.25;
