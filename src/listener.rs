//! A listener whose accept loop another thread can stop: the export servers, the control
//! socket and the metrics endpoint all wait in one (a reload moves the last two).

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// A listening socket: Unix or TCP.
pub trait Listening: AsRawFd {
    type Stream;
    fn accept_stream(&self) -> io::Result<Self::Stream>;
}

impl Listening for UnixListener {
    type Stream = UnixStream;
    fn accept_stream(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl Listening for TcpListener {
    type Stream = TcpStream;
    fn accept_stream(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
}

pub struct StoppableListener<L: Listening = UnixListener> {
    listener: L,
    stopped: AtomicBool,
    wake: EventFd,
}

impl<L: Listening> StoppableListener<L> {
    pub fn new(listener: L) -> io::Result<StoppableListener<L>> {
        Ok(StoppableListener {
            listener,
            stopped: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
        })
    }

    /// Waits for the next connection. `None` once `stop` was called; an accept error is
    /// returned for the caller to log, and the listener stays usable.
    pub fn accept(&self) -> Option<io::Result<L::Stream>> {
        loop {
            let mut fds = [
                libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: a valid pollfd array for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            // A descriptor closed under us (POLLNVAL) would be reported for ever: the loop
            // ends instead of spinning.
            if self.is_stopped() || fds[0].revents & libc::POLLNVAL != 0 {
                return None;
            }
            if fds[0].revents != 0 {
                return Some(self.listener.accept_stream());
            }
        }
    }

    /// Makes `accept` return `None`, now and from then on.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    pub fn local(&self) -> &L {
        &self.listener
    }
}

/// A cap on connections served at once (control clients, metrics scrapes): `try_take` gives
/// a permit while fewer than the cap are out; dropping the permit gives it back.
pub struct ConnectionLimit {
    in_use: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

pub struct ConnectionPermit(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl ConnectionLimit {
    pub fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit { in_use: Default::default(), max }
    }

    pub fn try_take(&self) -> Option<ConnectionPermit> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| ConnectionPermit(std::sync::Arc::clone(&self.in_use)))
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
