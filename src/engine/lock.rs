//! Image locking, compatible with QEMU's (block/file-posix.c): open-file-description byte
//! locks that say which permissions a user of the image holds and which it does not share.
//! qemu-storage-daemon, QEMU and blkplane thereby refuse to serve an image another of them
//! writes, and two blkplane daemons cannot serve the same writable image.
//!
//! Byte `100 + i` is read-locked by every user holding permission bit `i`; byte `200 + i` by
//! every user that does not let others hold it. A user may take permission `i` only if nobody
//! locks `200 + i`, and may refuse to share it only if nobody locks `100 + i`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's BLK_PERM bits, by index.
const CONSISTENT_READ: u32 = 0;
const WRITE: u32 = 1;
const WRITE_UNCHANGED: u32 = 2;
const RESIZE: u32 = 3;
const ALL_PERMS: [(u32, &str); 4] = [
    (CONSISTENT_READ, "consistent read"),
    (WRITE, "write"),
    (WRITE_UNCHANGED, "write unchanged"),
    (RESIZE, "resize"),
];

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value that we then fill in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Whether another open file description holds a lock on `byte`.
fn locked_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass; the fd is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn read_lock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: F_OFD_SETLK reads the flock we pass; the fd is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How long `lock_image` waits for a conflicting lock to go (`--image-lock-wait-ms`).
static LOCK_WAIT_MS: AtomicU64 = AtomicU64::new(DEFAULT_LOCK_WAIT_MS);
/// A daemon killed with I/O in flight holds its image until that I/O completes: the kernel
/// keeps the open file (and its locks) for the requests it still runs. Its successor waits
/// that long rather than fail, and must: serving the image earlier could let one of the old
/// writes land after a newer one.
pub const DEFAULT_LOCK_WAIT_MS: u64 = 5000;
pub const MAX_LOCK_WAIT_MS: u64 = 600_000;

pub fn set_lock_wait_ms(ms: u64) {
    LOCK_WAIT_MS.store(ms.min(MAX_LOCK_WAIT_MS), Ordering::Relaxed);
}

pub fn lock_wait_ms() -> u64 {
    LOCK_WAIT_MS.load(Ordering::Relaxed)
}

/// Takes the locks of an export on `file`. A writable export holds read, write and resize and
/// shares only reading; a read-only one holds read and shares neither write nor resize.
/// `force_share`: share everything and check nothing (another writer may then change the
/// image under the guest: the operator's call). The locks last as long as the file is open.
/// A conflict is retried every 10 ms for `--image-lock-wait-ms` before it is an error.
pub fn lock_image(file: &File, readonly: bool, force_share: bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_millis(LOCK_WAIT_MS.load(Ordering::Relaxed));
    let mut said = false;
    loop {
        match try_lock_image(file, readonly, force_share) {
            Err(Refused::Conflict(why)) if Instant::now() < deadline => {
                if !said {
                    info!("{why}; waiting for it to let go");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(Refused::Conflict(why) | Refused::Io(why)) => return Err(why),
            Ok(()) => {
                if said {
                    info!("image lock taken");
                }
                return Ok(());
            }
        }
    }
}

enum Refused {
    /// Another user holds what we need: may go away.
    Conflict(String),
    Io(String),
}

fn try_lock_image(file: &File, readonly: bool, force_share: bool) -> Result<(), Refused> {
    let held: &[u32] =
        if readonly { &[CONSISTENT_READ] } else { &[CONSISTENT_READ, WRITE, RESIZE] };
    let shared: &[u32] = if force_share {
        &[CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE]
    } else {
        &[CONSISTENT_READ, WRITE_UNCHANGED]
    };
    let io_err = |e: io::Error| Refused::Io(format!("cannot lock the image: {e}"));
    if !force_share {
        for &(bit, name) in &ALL_PERMS {
            if held.contains(&bit)
                && locked_by_other(file, SHARED_BASE + i64::from(bit)).map_err(io_err)?
            {
                return Err(Refused::Conflict(format!("another process uses the image and does not share the \"{name}\" permission (use force-share=on to serve it anyway)")));
            }
            if !shared.contains(&bit)
                && locked_by_other(file, PERM_BASE + i64::from(bit)).map_err(io_err)?
            {
                return Err(Refused::Conflict(format!("another process holds the \"{name}\" permission on the image (use force-share=on to serve it anyway)")));
            }
        }
    }
    for &(bit, _) in &ALL_PERMS {
        if held.contains(&bit) {
            read_lock(file, PERM_BASE + i64::from(bit)).map_err(io_err)?;
        }
        if !shared.contains(&bit) {
            read_lock(file, SHARED_BASE + i64::from(bit)).map_err(io_err)?;
        }
    }
    Ok(())
}

/// The locks of an export that does not write the image now (a migration's destination
/// before the guest arrives, or its source after it left): it holds consistent read and
/// shares everything, so the export that writes is not disturbed. `lock_image` later turns
/// it into a writer.
pub fn lock_inactive(file: &File) -> Result<(), String> {
    for &(bit, _) in &ALL_PERMS {
        unlock(file, SHARED_BASE + i64::from(bit))
            .map_err(|e| format!("cannot lock the image: {e}"))?;
        if bit != CONSISTENT_READ {
            unlock(file, PERM_BASE + i64::from(bit))
                .map_err(|e| format!("cannot lock the image: {e}"))?;
        }
    }
    read_lock(file, PERM_BASE + i64::from(CONSISTENT_READ))
        .map_err(|e| format!("cannot lock the image: {e}"))
}

fn unlock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock(libc::F_UNLCK as libc::c_short, byte);
    // SAFETY: F_OFD_SETLK reads the flock we pass; the fd is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
