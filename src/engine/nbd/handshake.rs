//! Connecting to an NBD server and the fixed newstyle negotiation, each attempt (connect and
//! negotiation together) under one deadline, [`CONNECT_TIMEOUT`](super::CONNECT_TIMEOUT).
//! The socket is non-blocking from the start and every wait is a poll(2) that also watches a
//! descriptor the caller may make readable to call the attempt off: a server that never
//! accepts (a full listen backlog), never answers or answers a byte at a time costs one
//! attempt's deadline at most, and a queue that goes stops its attempt at once. Everything the
//! server says is checked: a lying or broken server gets a one-line error here, not a confused
//! data path later.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tls::ClientTls;
use super::uri::{NbdAddr, NbdSpec};
use super::wire::*;

/// The longest option reply we read (an error message, an info block): servers send tens of
/// bytes; anything larger is refused rather than buffered.
const MAX_OPTION_REPLY_BYTES: u32 = 64 * 1024;
/// Option replies we read for one GO before giving up on a server that never acks.
const MAX_OPTION_REPLIES: usize = 64;

/// What the server told us about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub size_bytes: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// Structured replies are on.
    pub structured: bool,
    /// NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum (1, 4096, 32 MiB when not sent).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    /// The id of the `base:allocation` metadata context, if it was asked for (a mirror
    /// reading an NBD source) and the server has it: block status answers in it.
    pub allocation_context: Option<u32>,
}

impl Negotiated {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The smallest block the export can be served in: the server's minimum, and at least a
    /// sector. The guest's logical block is this unless `logical-block-size` says more.
    pub fn smallest_block_bytes(&self) -> u32 {
        self.min_block.max(512)
    }

    /// The most bytes one read or write sends: the server's maximum payload in whole units of
    /// its preferred block and of `align` (a power of two: the guest's block, which every
    /// request's offset and length are made of), so every part starts where the server likes
    /// and on a guest block. A maximum below such a unit gives whole preferred blocks (the
    /// handshake made sure it holds one). A longer request goes out in parts of this size.
    pub fn part_max_bytes(&self, align: u32) -> u32 {
        let unit = self.preferred_block.max(align);
        match self.max_payload / unit * unit {
            0 => self.max_payload / self.preferred_block * self.preferred_block,
            whole_units => whole_units,
        }
    }
}

/// A socket, non-blocking, connected and negotiated, ready for the transmission phase.
pub struct Connection {
    pub fd: OwnedFd,
    pub negotiated: Negotiated,
}

/// What one attempt may spend: everything by `deadline`, and no more once `cancel` (an
/// eventfd of the caller's, if any) is readable.
#[derive(Clone, Copy)]
struct Limits {
    deadline: Instant,
    cancel: Option<RawFd>,
}

impl Limits {
    /// Waits until `fd` is ready for `events`: Err(TimedOut) at the deadline, and an error
    /// saying "cancelled" once the attempt is called off.
    fn wait(&self, fd: RawFd, events: libc::c_short) -> io::Result<()> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
            }
            let cancel = self.cancel.unwrap_or(-1);
            let mut fds = [
                libc::pollfd { fd, events, revents: 0 },
                // A negative fd is skipped by poll(2).
                libc::pollfd { fd: cancel, events: libc::POLLIN, revents: 0 },
            ];
            // Rounded up: a wait never ends just short of the deadline only to wait again.
            let ms = (left.as_millis() + 1).min(i32::MAX as u128) as i32;
            // SAFETY: a valid array of two pollfds for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                // Not ErrorKind::Interrupted: read_exact would retry that for ever.
                return Err(io::Error::other(CANCELLED));
            }
            if fds[0].revents != 0 {
                return Ok(());
            }
        }
    }
}

/// The error text of an attempt called off by its caller.
pub const CANCELLED: &str = "cancelled";

/// The negotiation's byte stream: a non-blocking socket whose every wait is under `limits`.
struct Stream {
    fd: OwnedFd,
    limits: Limits,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: recv into the caller's buffer, within its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => self.limits.wait(self.fd.as_raw_fd(), libc::POLLIN)?,
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: send from the caller's buffer, within its length; MSG_NOSIGNAL: a closed
            // peer is an error, not SIGPIPE.
            let n = unsafe {
                libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    self.limits.wait(self.fd.as_raw_fd(), libc::POLLOUT)?
                }
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to `spec`'s server and negotiates its export, all within `timeout`. The error
/// says what failed, in one line, naming the server.
pub fn connect(spec: &NbdSpec, timeout: Duration) -> Result<Connection, String> {
    attempt(spec, Limits { deadline: Instant::now() + timeout, cancel: None }, false)
}

/// Like [`connect`], asking for the `base:allocation` context too (block status).
pub fn connect_for_block_status(spec: &NbdSpec, timeout: Duration) -> Result<Connection, String> {
    attempt(spec, Limits { deadline: Instant::now() + timeout, cancel: None }, true)
}

/// Like [`connect`], called off (with an error saying "cancelled") as soon as `cancel` is
/// readable.
pub fn connect_unless(
    spec: &NbdSpec,
    timeout: Duration,
    cancel: RawFd,
) -> Result<Connection, String> {
    attempt(spec, Limits { deadline: Instant::now() + timeout, cancel: Some(cancel) }, false)
}

/// Like [`connect`], inside TLS (NBD_OPT_STARTTLS before any other option): the connection,
/// and the TLS session to go on with on its socket.
pub fn connect_tls(
    spec: &NbdSpec,
    timeout: Duration,
    tls: &ClientTls,
) -> Result<(Connection, rustls::ClientConnection), String> {
    let limits = Limits { deadline: Instant::now() + timeout, cancel: None };
    let (connection, session) = attempt_with(spec, limits, Some(tls), false)?;
    let session = session.ok_or_else(|| format!("NBD server {spec}: no TLS session"))?;
    Ok((connection, session))
}

fn attempt(spec: &NbdSpec, limits: Limits, allocation: bool) -> Result<Connection, String> {
    attempt_with(spec, limits, None, allocation).map(|(connection, _)| connection)
}

fn attempt_with(
    spec: &NbdSpec,
    limits: Limits,
    tls: Option<&ClientTls>,
    allocation: bool,
) -> Result<(Connection, Option<rustls::ClientConnection>), String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("NBD server {spec}: {what}: {e}");
    let fd = match &spec.addr {
        NbdAddr::Unix(path) => {
            connect_unix(path, limits).map_err(|e| fail("cannot connect", &e))?
        }
        NbdAddr::Tcp { host, port } => {
            // Name resolution is the C library's, blocking, bounded by the resolver's own
            // time limits (resolv.conf); it holds only the calling thread.
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| fail("cannot resolve the host", &e))?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let mut connected = None;
            for a in addrs {
                match connect_tcp(&a, limits) {
                    Ok(fd) => {
                        connected = Some(fd);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            connected.ok_or_else(|| fail("cannot connect", &last))?
        }
    };
    let mut stream = Stream { fd, limits };
    greet(&mut stream).map_err(|e| fail("handshake", &e))?;
    let Some(tls) = tls else {
        let negotiated =
            negotiate(&mut stream, &spec.export, allocation).map_err(|e| fail("handshake", &e))?;
        return Ok((Connection { fd: stream.fd, negotiated }, None));
    };
    let mut session = start_tls(&mut stream, tls).map_err(|e| fail("TLS", &e))?;
    let negotiated =
        negotiate(&mut rustls::Stream::new(&mut session, &mut stream), &spec.export, allocation)
            .map_err(|e| fail("handshake", &e))?;
    Ok((Connection { fd: stream.fd, negotiated }, Some(session)))
}

/// NBD_OPT_STARTTLS, then the TLS handshake, under the stream's limits.
fn start_tls(stream: &mut Stream, tls: &ClientTls) -> io::Result<rustls::ClientConnection> {
    send_option(stream, OPT_STARTTLS, &[])?;
    let (kind, data) = read_option_reply(stream, OPT_STARTTLS)?;
    if kind != REP_ACK {
        return Err(bad(format!("the server refused STARTTLS: {}", describe_error(kind, &data))));
    }
    let mut session =
        rustls::ClientConnection::new(Arc::clone(&tls.config), tls.server_name.clone())
            .map_err(io::Error::other)?;
    while session.is_handshaking() {
        session.complete_io(stream)?;
    }
    Ok(session)
}

/// A new non-blocking stream socket of `domain`.
fn stream_socket(domain: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; a descriptor it returns is ours alone.
    let fd = unsafe {
        libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects the non-blocking `fd` to `addr` (a `sockaddr_*` of the socket's family), waiting
/// under `limits` for a connection in progress.
fn connect_raw<T>(fd: &OwnedFd, addr: &T, limits: Limits) -> io::Result<()> {
    let len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `addr` is a whole sockaddr of the socket's family, `len` its size.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (addr as *const T).cast(), len) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A Unix socket whose listen backlog is full refuses a non-blocking connect at once;
        // the caller tries again later (a blocking one would wait for room without a limit).
        Some(libc::EAGAIN) => {
            Err(io::Error::new(io::ErrorKind::WouldBlock, "the server's listen backlog is full"))
        }
        Some(libc::EINPROGRESS) | Some(libc::EINTR) => {
            limits.wait(fd.as_raw_fd(), libc::POLLOUT)?;
            let mut error: libc::c_int = 0;
            let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: SO_ERROR into an int of ours, `size` its size.
            let r = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&mut error as *mut libc::c_int).cast(),
                    &mut size,
                )
            };
            match (r, error) {
                (0, 0) => Ok(()),
                (0, error) => Err(io::Error::from_raw_os_error(error)),
                _ => Err(io::Error::last_os_error()),
            }
        }
        _ => Err(e),
    }
}

fn connect_unix(path: &Path, limits: Limits) -> io::Result<OwnedFd> {
    // SAFETY: sockaddr_un is plain data; zeroed, its path is NUL-terminated.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the socket path is too long"));
    }
    for (to, from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    let fd = stream_socket(libc::AF_UNIX)?;
    connect_raw(&fd, &addr, limits)?;
    Ok(fd)
}

fn connect_tcp(to: &SocketAddr, limits: Limits) -> io::Result<OwnedFd> {
    let fd = match to {
        SocketAddr::V4(a) => {
            let fd = stream_socket(libc::AF_INET)?;
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            connect_raw(&fd, &addr, limits)?;
            fd
        }
        SocketAddr::V6(a) => {
            let fd = stream_socket(libc::AF_INET6)?;
            let addr = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            connect_raw(&fd, &addr, limits)?;
            fd
        }
    };
    // Requests are small and pipelined: Nagle would hold them for the previous ACK.
    let stream = TcpStream::from(fd);
    stream.set_nodelay(true)?;
    Ok(stream.into())
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg)
}

/// One option reply: its type and data.
fn read_option_reply(s: &mut impl Read, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let magic = read_u64(s)?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(bad(format!("option reply magic {magic:#x}")));
    }
    let replied = read_u32(s)?;
    if replied != option {
        return Err(bad(format!("a reply to option {replied} while asking {option}")));
    }
    let kind = read_u32(s)?;
    let len = read_u32(s)?;
    if len > MAX_OPTION_REPLY_BYTES {
        return Err(bad(format!("an option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((kind, data))
}

/// What an option error reply says, for the error message.
fn describe_error(kind: u32, data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let name = match kind {
        REP_ERR_UNSUP => "unsupported".to_string(),
        REP_ERR_UNKNOWN => "no such export".to_string(),
        k => format!("error {:#x}", k),
    };
    if text.trim().is_empty() {
        name
    } else {
        format!("{name} ({})", text.trim())
    }
}

/// The server's greeting and our flags: what comes before the first option.
fn greet<S: Read + Write>(s: &mut S) -> io::Result<()> {
    let magic = read_u64(s)?;
    if magic != NBDMAGIC {
        return Err(bad(format!("not an NBD server (greeting {magic:#018x})")));
    }
    let style = read_u64(s)?;
    if style != IHAVEOPT {
        return Err(bad("an oldstyle server; only newstyle negotiation is supported".into()));
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the server lacks fixed newstyle negotiation".into()));
    }
    let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&client_flags.to_be_bytes())
}

/// The options after the greeting: structured replies, then GO with `export`.
fn negotiate<S: Read + Write>(s: &mut S, export: &str, allocation: bool) -> io::Result<Negotiated> {
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, _) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = kind == REP_ACK;
    if kind != REP_ACK && kind & REP_FLAG_ERROR == 0 {
        return Err(bad(format!("option reply type {kind} to STRUCTURED_REPLY")));
    }
    let allocation_context =
        if allocation && structured { allocation_context(s, export)? } else { None };

    let mut go = Vec::with_capacity(8 + export.len());
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go)?;
    let mut export_info = None;
    let mut blocks = (1u32, 4096u32, 32 << 20);
    for _ in 0..MAX_OPTION_REPLIES {
        let (kind, data) = read_option_reply(s, OPT_GO)?;
        match kind {
            REP_ACK => {
                let Some((size_bytes, flags)) = export_info else {
                    return Err(bad("the server acked GO without the export's size".into()));
                };
                return Ok(Negotiated {
                    size_bytes,
                    flags,
                    structured,
                    min_block: blocks.0,
                    preferred_block: blocks.1,
                    max_payload: blocks.2,
                    allocation_context,
                });
            }
            REP_INFO if data.len() >= 2 => {
                let info = u16::from_be_bytes([data[0], data[1]]);
                match (info, data.len()) {
                    (INFO_EXPORT, 12) => {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        export_info = Some((size, flags));
                    }
                    (INFO_BLOCK_SIZE, 14) => {
                        let word =
                            |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
                        let (min, pref, max) = (word(2), word(6), word(10));
                        let power = |n: u32| n.is_power_of_two();
                        if !power(min) || !power(pref) || min > 65536 || pref < min || max < pref {
                            return Err(bad(format!(
                                "block sizes minimum {min}, preferred {pref}, maximum {max} are inconsistent"
                            )));
                        }
                        blocks = (min, pref, max);
                    }
                    (INFO_EXPORT | INFO_BLOCK_SIZE, n) => {
                        return Err(bad(format!("info {info} of {n} bytes")));
                    }
                    _ => {} // other information: not asked for, ignored
                }
            }
            k if k & REP_FLAG_ERROR != 0 => {
                return Err(bad(format!("export '{export}': {}", describe_error(k, &data))));
            }
            k => return Err(bad(format!("option reply type {k} to GO"))),
        }
    }
    Err(bad("the server never finished GO".into()))
}

/// Asks for the `base:allocation` metadata context (SET_META_CONTEXT): its id, or None if the
/// server has none (or refuses the option: block status is then not used).
fn allocation_context<S: Read + Write>(s: &mut S, export: &str) -> io::Result<Option<u32>> {
    const CONTEXT: &str = "base:allocation";
    let mut data = Vec::with_capacity(12 + export.len() + CONTEXT.len());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&(CONTEXT.len() as u32).to_be_bytes());
    data.extend_from_slice(CONTEXT.as_bytes());
    send_option(s, OPT_SET_META_CONTEXT, &data)?;
    let mut id = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let (kind, reply) = read_option_reply(s, OPT_SET_META_CONTEXT)?;
        match kind {
            REP_ACK => return Ok(id),
            REP_META_CONTEXT if reply.len() >= 4 => {
                if &reply[4..] == CONTEXT.as_bytes() {
                    id = Some(u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]));
                }
            }
            k if k & REP_FLAG_ERROR != 0 => return Ok(None),
            k => return Err(bad(format!("option reply type {k} to SET_META_CONTEXT"))),
        }
    }
    Err(bad("the server never finished SET_META_CONTEXT".into()))
}

/// Tells the server we are going (NBD_CMD_DISC), best effort, without waiting: on a
/// connection with nothing half-sent, before it is closed.
pub fn say_goodbye(fd: &OwnedFd) {
    let header = request_header(0, CMD_DISC, 0, 0, 0);
    // SAFETY: sends our own 28-byte buffer; MSG_NOSIGNAL: a closed peer is an error, not
    // SIGPIPE; MSG_DONTWAIT: never blocks the caller.
    unsafe {
        libc::send(
            fd.as_raw_fd(),
            header.as_ptr().cast(),
            header.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
}
