//! Guest RAM that shrinks under us. A frontend shares its RAM as a file (a memfd, a file on
//! tmpfs or hugetlbfs) that it can truncate at any time; touching a mapped page past the new
//! end raises SIGBUS, whose default action would kill the whole daemon and every tenant's disk
//! with it. Sealing cannot be demanded (QEMU does not seal `memory-backend-file`), so the
//! daemon catches the signal instead.
//!
//! Every guest mapping is registered here, in a fixed table a signal handler can read without
//! locks. On SIGBUS inside a registered mapping the handler replaces the whole mapping with
//! anonymous memory (so the faulting access and any later one succeed, on zeroes nobody else
//! sees), marks it faulted, and shuts down the socket of the connection that owns it: that
//! connection's control thread sees the hang-up, stops its queues and logs why. A SIGBUS
//! anywhere else goes to the handler that was there before (the default: the process dies,
//! as it should for a bug of ours).
//!
//! Why the faulting thread can use the table entry safely: the access that faulted was made
//! through a `MappedRegion` that thread holds (I/O threads keep their memory snapshot for
//! their whole life), so the mapping cannot be unregistered or unmapped while the handler
//! runs on it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Guest mappings the whole daemon may hold at once (every connection's regions, inflight
/// regions and dirty logs together). A frontend holds at most 509 regions, an inflight region
/// and a dirty log (two while a new log replaces one): 512. 32768 serves 64 frontends at that
/// worst case at once (and any number of ordinary VMs, which use a few regions each), and
/// stays under half of Linux's default `vm.max_map_count` (65530), which also counts the
/// daemon's own mappings (thread stacks, rings, heaps). The table is zero-initialised (no
/// space in the binary) and scanned only when a mapping is registered or faults.
pub const MAX_MAPPINGS: usize = 32768;

struct Entry {
    /// Mapping start; 0 = free, 1 = being filled in.
    start: AtomicUsize,
    len: AtomicUsize,
    /// The socket to shut down when the mapping faults, plus one; 0: none.
    hangup_fd_plus_1: AtomicI32,
    faulted: AtomicBool,
}

static TABLE: [Entry; MAX_MAPPINGS] = [const {
    Entry {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        hangup_fd_plus_1: AtomicI32::new(0),
        faulted: AtomicBool::new(false),
    }
}; MAX_MAPPINGS];

static INSTALL: Once = Once::new();
/// The SIGBUS action in place before ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered mapping; unregister it (before unmapping) with [`unregister`].
#[derive(Debug)]
pub struct Registration(usize);

/// Registers `[start, start + len)`, to be replaced and hung up on (`hangup_fd`, which must
/// stay open until [`unregister`]) if it faults. `None` when the table is full.
pub fn register(start: usize, len: usize, hangup_fd: Option<RawFd>) -> Option<Registration> {
    INSTALL.call_once(install);
    for (i, e) in TABLE.iter().enumerate() {
        // A plain load first: a full table is passed over without a locked instruction per entry.
        if e.start.load(Ordering::Relaxed) == 0
            && e.start.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok()
        {
            e.len.store(len, Ordering::Relaxed);
            e.hangup_fd_plus_1.store(hangup_fd.map_or(0, |fd| fd + 1), Ordering::Relaxed);
            e.faulted.store(false, Ordering::Relaxed);
            // Publishes len and fd with the start (the handler loads start with Acquire).
            e.start.store(start, Ordering::Release);
            return Some(Registration(i));
        }
    }
    None
}

/// Whether the registered mapping faulted (its file shrank) since it was registered.
pub fn faulted(r: &Registration) -> bool {
    TABLE[r.0].faulted.load(Ordering::Acquire)
}

/// Forgets a mapping; call before unmapping it.
pub fn unregister(r: &Registration) {
    let e = &TABLE[r.0];
    e.hangup_fd_plus_1.store(0, Ordering::Relaxed);
    e.start.store(0, Ordering::Release);
}

fn install() {
    // SAFETY: a zeroed sigaction is a valid starting point; we fill in a handler with the
    // SA_SIGINFO signature and an empty mask, and read the old action into `old`.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut old) == 0 {
            let _ = PREVIOUS.set(old);
        }
    }
}

/// The SIGBUS handler. Only async-signal-safe work: atomics, mmap, shutdown.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for e in TABLE.iter() {
        let start = e.start.load(Ordering::Acquire);
        if start <= 1 {
            continue;
        }
        let len = e.len.load(Ordering::Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: [start, start + len) is a live mapping of ours (see the module note); a
        // fixed anonymous mapping replaces it in one step, so no other mapping can appear in
        // the range. NORESERVE: nothing is committed until touched.
        unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            );
        }
        e.faulted.store(true, Ordering::Release);
        let fd = e.hangup_fd_plus_1.load(Ordering::Relaxed) - 1;
        if fd >= 0 {
            // SAFETY: shutdown has no memory-safety preconditions; the fd stays open while
            // the mapping is registered (the contract of `register`).
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        return;
    }
    // Not guest memory: whatever was there before decides (by default the process dies).
    match PREVIOUS.get() {
        Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the old handler was installed with the SA_SIGINFO signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: the old handler was installed with the plain signature.
                let f: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: restoring the default action and returning re-runs the faulting
            // access, which then ends the process with the usual SIGBUS.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}
