//! Telling the service manager how the daemon is doing (systemd's `Type=notify` protocol: a
//! datagram to `$NOTIFY_SOCKET`): ready once every export listens, the export count as its
//! status, reloading while a SIGHUP re-reads the configuration, stopping when a shutdown
//! signal came, and alive (WATCHDOG=1) while the service manager watches (`WatchdogSec=`).
//! Without `NOTIFY_SOCKET` these do nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify the service manager: {e}");
    }
}

fn serving(exports: usize) -> String {
    format!("serving {exports} export{}", if exports == 1 { "" } else { "s" })
}

/// Every export given at start listens (and the control socket, if any).
/// The listening sockets systemd passed for socket activation: `(fd, name)` for each of
/// LISTEN_FDS descriptors from 3 on, named by LISTEN_FDNAMES, when LISTEN_PID is this
/// process. The variables are removed, so that no child takes them too: call it before any
/// thread starts.
pub fn listen_fds() -> Vec<(i32, String)> {
    let var = |name: &str| std::env::var(name).ok();
    let ours = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = var("LISTEN_FDS").and_then(|n| n.parse::<i32>().ok()).unwrap_or(0).clamp(0, 1024);
    let names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    if !ours {
        return Vec::new();
    }
    (0..count)
        .map(|i| (3 + i, names.get(i as usize).cloned().unwrap_or_else(|| "unknown".into())))
        .collect()
}

pub fn ready(exports: usize) {
    send(&[NotifyState::Ready, NotifyState::Status(&serving(exports))]);
}

/// Exports were added or removed at run time.
pub fn status(exports: usize) {
    send(&[NotifyState::Status(&serving(exports))]);
}

/// A shutdown signal arrived: in-flight I/O drains, then the process exits.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping after in-flight I/O")]);
}

/// A SIGHUP: the configuration file is re-read (READY=1 follows with `ready`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => warn!("cannot read the monotonic clock for the service manager: {e}"),
    }
}

/// How often the main loop says it runs: half the service manager's watchdog interval
/// (`WATCHDOG_USEC`, for this process), so that one late wake-up is not a restart; None
/// without a watchdog.
pub fn watchdog_ping_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2).filter(|d| !d.is_zero())
}

/// The main loop runs: the service manager's watchdog is fed.
pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}
