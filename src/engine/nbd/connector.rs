//! The threads that connect an export's NBD queues: at most one per queue index, whatever
//! the frontend does.
//!
//! Connecting blocks (a connect in progress, the negotiation), so it is never done by an I/O
//! thread. A queue's engine lives only as long as the queue runs, and a frontend can restart
//! a queue thousands of times a second (every SET_VRING_CALL, every reconnection); a thread
//! per engine would pile up behind a server that does not answer. So the threads belong to
//! the export ([`Slots`], one slot per queue index, in the export's `NbdTarget`): an engine
//! asks its slot for a connection (a [`Wish`]); the slot's thread, started when none runs,
//! connects for whichever wish is current, hands the connection over and ends when no wish is
//! left. An engine that goes calls its wish off, which wakes the thread out of any wait (the
//! wish's eventfd is in every poll of the attempt), so the thread ends at once or moves on to
//! the next engine's wish. Threads per export: at most its `queues`.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::engine::NbdTarget;
use super::handshake::{self, Connection};
use super::wire::TFLAG_READ_ONLY;
use crate::warn_limited;

/// Back-off between connection attempts, growing from the first to the last.
const RECONNECT_BACKOFF_MS: (u64, u64) = (50, 1000);

/// One engine's request for a connection.
pub struct Wish {
    /// Made readable when the engine no longer wants the connection: it is in every poll
    /// of the attempt, so the thread stops waiting at once.
    cancel: EventFd,
    cancelled: AtomicBool,
    /// The connection, once made, until the engine takes it.
    made: Mutex<Option<Connection>>,
    /// Written (under `made`'s lock, after filling it) to wake the engine's I/O thread.
    ready: Arc<EventFd>,
}

impl Wish {
    /// The connection, if it was made (then `ready` was written already).
    pub fn take(&self) -> Option<Connection> {
        self.made.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The engine no longer wants the connection (it goes, or it wants a fresh one).
    pub fn call_off(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        let _ = self.cancel.write(1);
    }

    fn called_off(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct SlotState {
    /// The wish the slot's thread works for (the newest engine's of this queue index).
    wish: Option<Arc<Wish>>,
    /// The slot's thread; `running` false once it decided to end (then joining is quick).
    thread: Option<JoinHandle<()>>,
    running: bool,
}

/// One connector slot per queue index of an export.
pub struct Slots(Box<[Mutex<SlotState>]>);

impl Slots {
    pub fn new(queues: u16) -> Slots {
        Slots((0..queues.max(1)).map(|_| Mutex::default()).collect())
    }

    fn slot(&self, index: u16) -> MutexGuard<'_, SlotState> {
        let i = usize::from(index) % self.0.len();
        self.0[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Asks queue `index`'s slot of `target` for a connection, signalled on `ready`. A wish
/// the slot held before (an engine that did not call it off) is called off: one queue index
/// has one engine at a time.
pub fn ask(target: &Arc<NbdTarget>, index: u16, ready: Arc<EventFd>) -> io::Result<Arc<Wish>> {
    let wish = Arc::new(Wish {
        cancel: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
        cancelled: AtomicBool::new(false),
        made: Mutex::new(None),
        ready,
    });
    let mut slot = target.connectors.slot(index);
    if let Some(old) = slot.wish.replace(Arc::clone(&wish)) {
        old.call_off();
    }
    if !slot.running {
        // The thread that ran last decided to end under this lock: joining it is quick.
        if let Some(t) = slot.thread.take() {
            let _ = t.join();
        }
        let t = Arc::clone(target);
        let thread = std::thread::Builder::new()
            .name("blkplane-nbd-connect".into())
            .spawn(move || run(&t, index));
        match thread {
            Ok(thread) => {
                slot.thread = Some(thread);
                slot.running = true;
            }
            Err(e) => {
                slot.wish = None;
                return Err(e);
            }
        }
    }
    Ok(wish)
}

/// The wish the slot's thread should work for now; None: the thread ends (marked so under
/// the lock, so that the next `ask` starts another).
fn current(target: &NbdTarget, index: u16) -> Option<Arc<Wish>> {
    let mut slot = target.connectors.slot(index);
    match &slot.wish {
        Some(w) if !w.called_off() => Some(Arc::clone(w)),
        _ => {
            slot.wish = None;
            slot.running = false;
            None
        }
    }
}

/// The slot's thread: connects until no engine wants a connection any more.
fn run(target: &NbdTarget, index: u16) {
    let mut backoff_ms = RECONNECT_BACKOFF_MS.0;
    let mut last_error = String::new();
    while let Some(wish) = current(target, index) {
        match attempt(target, &wish) {
            Ok(connection) => {
                let mut made = wish.made.lock().unwrap_or_else(|p| p.into_inner());
                *made = Some(connection);
                let _ = wish.ready.write(1);
                drop(made);
                // This wish is fulfilled: the slot waits for the next.
                let mut slot = target.connectors.slot(index);
                if slot.wish.as_ref().is_some_and(|w| Arc::ptr_eq(w, &wish)) {
                    slot.wish = None;
                }
                backoff_ms = RECONNECT_BACKOFF_MS.0;
            }
            Err(_) if wish.called_off() => {}
            Err(e) => {
                // Each new kind of failure once per thread, and the export's limit over all.
                if e != last_error {
                    warn_limited!(target.connection_log(), parent: &target.span, queue = index, "{e}");
                    last_error = e;
                }
                pause(&wish, Duration::from_millis(backoff_ms));
                backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MS.1);
            }
        }
    }
}

/// One connection attempt, with the checks a reconnection must pass.
fn attempt(target: &NbdTarget, wish: &Wish) -> Result<Connection, String> {
    let c =
        handshake::connect_unless(&target.spec, super::CONNECT_TIMEOUT, wish.cancel.as_raw_fd())?;
    let n = c.negotiated;
    if n.size_bytes != target.negotiated.size_bytes {
        return Err(format!(
            "NBD server {}: the export is now {} bytes, was {}",
            target.spec, n.size_bytes, target.negotiated.size_bytes
        ));
    }
    // The guest's requests, and the parts of long ones, are made of its logical blocks: a
    // server whose minimum block is larger may refuse them.
    if n.min_block > target.guest_block_bytes {
        return Err(format!(
            "NBD server {}: the export's minimum block is now {} bytes, above the guest's {}-byte blocks",
            target.spec, n.min_block, target.guest_block_bytes
        ));
    }
    if !target.readonly && n.has(TFLAG_READ_ONLY) {
        return Err(format!("NBD server {}: the export is now read-only", target.spec));
    }
    Ok(c)
}

/// Sleeps `pause`, or less if the wish is called off.
fn pause(wish: &Wish, pause: Duration) {
    let mut fd = libc::pollfd { fd: wish.cancel.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, pause.as_millis() as libc::c_int) };
}
