//! `blkplane serve`: open every export, bind every socket, run one control thread per export,
//! and shut down cleanly on SIGTERM or SIGINT.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;

use tracing::info;

use crate::export::{Disk, ExportConfig};
use crate::vhost_user::{bind_socket, ExportServer};

/// Signals that end the daemon.
fn shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Opens and binds everything `configs` ask for. On any error, returns it with nothing left
/// behind (sockets bound so far are removed; images are never created or truncated).
pub fn prepare(configs: &[ExportConfig]) -> Result<Vec<Arc<ExportServer>>, String> {
    let mut sockets = HashSet::new();
    for c in configs {
        if !sockets.insert(&c.socket) {
            return Err(format!("socket {} is given to two exports", c.socket.display()));
        }
    }
    let mut disks = Vec::with_capacity(configs.len());
    for c in configs {
        disks.push(Disk::open(c).map_err(|e| e.to_string())?);
    }
    let mut servers = Vec::with_capacity(configs.len());
    for (c, disk) in configs.iter().zip(disks) {
        // A server removes its socket when dropped, so an early return cleans up.
        let listener = bind_socket(&c.socket)?;
        let server = ExportServer::new(Arc::new(disk), c.socket.clone(), listener)
            .map_err(|e| format!("cannot create the export for {}: {e}", c.socket.display()))?;
        servers.push(Arc::new(server));
    }
    Ok(servers)
}

/// Serves until SIGTERM or SIGINT, then stops every export after its in-flight I/O.
pub fn serve(servers: Vec<Arc<ExportServer>>) -> io::Result<()> {
    let signals = shutdown_signals();
    // Block the signals before any thread starts so every thread inherits the mask and only
    // sigwait below receives them.
    // SAFETY: a valid signal set; no old mask is requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let mut threads = Vec::with_capacity(servers.len());
    for server in &servers {
        let s = Arc::clone(server);
        let name = format!("blkplane-ctl-{}", threads.len());
        threads.push(std::thread::Builder::new().name(name).spawn(move || s.run())?);
    }
    info!(exports = servers.len(), "serving");
    let mut signal: libc::c_int = 0;
    // SAFETY: a valid set and a valid out-pointer.
    let rc = unsafe { libc::sigwait(&signals, &mut signal) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    info!(signal, "shutting down after in-flight I/O");
    for server in &servers {
        server.shutdown();
    }
    for t in threads {
        let _ = t.join();
    }
    info!("stopped");
    Ok(())
}
