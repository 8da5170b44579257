//! A blocking NBD client of one connection, one request at a time: what a mirror job writes its
//! target through, and reads an NBD source through (from its own threads, and from I/O threads
//! copying a guest's write again). Not an [`Engine`](crate::engine::Engine): a mirror's
//! requests are few and large, and each waits for its answer anyway. Every wait is bounded by
//! the socket's timeouts.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use super::handshake::Negotiated;
use super::tls::ClientTls;
use super::uri::NbdAddr;
use super::{wire, NbdSpec};

/// How long one request waits for its answer before the target counts as lost.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest write-zeroes or trim sent at once (the length is 32 bits).
const MAX_RANGE_BYTES: u64 = 1 << 30;

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// TCP inside TLS (`tls-creds=`).
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// One connection to an NBD server's export, negotiated, shared by the threads that write
/// through it (a mutex: one request and its answer at a time).
pub struct BlockingNbd {
    pub spec: NbdSpec,
    pub negotiated: Negotiated,
    stream: Mutex<(Stream, u64)>,
}

impl BlockingNbd {
    /// Connects and negotiates within the connection timeout, inside TLS with `tls` (a TCP
    /// server only).
    pub fn connect(spec: &NbdSpec, tls: Option<&ClientTls>) -> Result<BlockingNbd, String> {
        let (connection, session) = match tls {
            None => (super::connect(spec, super::CONNECT_TIMEOUT)?, None),
            Some(tls) => {
                if matches!(spec.addr, NbdAddr::Unix(_)) {
                    return Err(format!("NBD server {spec}: TLS is for nbd:// (TCP) servers"));
                }
                let (connection, session) =
                    super::handshake::connect_tls(spec, super::CONNECT_TIMEOUT, tls)?;
                (connection, Some(session))
            }
        };
        Self::from(spec, connection, session)
    }

    /// Like [`connect`](Self::connect) (without TLS), asking for block status
    /// (`base:allocation`) too: for reading a mirror's source.
    pub fn connect_for_block_status(spec: &NbdSpec) -> Result<BlockingNbd, String> {
        let timeout = super::CONNECT_TIMEOUT;
        Self::from(spec, super::handshake::connect_for_block_status(spec, timeout)?, None)
    }

    fn from(
        spec: &NbdSpec,
        connection: super::handshake::Connection,
        session: Option<rustls::ClientConnection>,
    ) -> Result<BlockingNbd, String> {
        let fail = |e: io::Error| format!("NBD server {spec}: {e}");
        crate::sys::set_status_flags(connection.fd.as_raw_fd(), 0, libc::O_NONBLOCK)
            .map_err(fail)?;
        let stream = match spec.addr {
            NbdAddr::Unix(_) => {
                let s = UnixStream::from(connection.fd);
                s.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(fail)?;
                s.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(fail)?;
                Stream::Unix(s)
            }
            NbdAddr::Tcp { .. } => {
                let s = TcpStream::from(connection.fd);
                s.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(fail)?;
                s.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(fail)?;
                let _ = s.set_nodelay(true);
                match session {
                    Some(session) => Stream::Tls(Box::new(rustls::StreamOwned::new(session, s))),
                    None => Stream::Tcp(s),
                }
            }
        };
        Ok(BlockingNbd {
            spec: spec.clone(),
            negotiated: connection.negotiated,
            stream: Mutex::new((stream, 0)),
        })
    }

    /// Writes `data` at `offset`, in requests of at most the server's largest payload.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        let part_max = self.negotiated.part_max_bytes(1) as usize;
        for (at, part) in (offset..).step_by(part_max).zip(data.chunks(part_max)) {
            self.request(wire::CMD_WRITE, 0, at, part.len() as u32, part, None, None)?;
        }
        Ok(())
    }

    /// Reads `into.len()` bytes at `offset`, in requests of at most the server's largest
    /// payload. Hole chunks of a structured reply read as zeroes.
    pub fn read_at(&self, offset: u64, into: &mut [u8]) -> Result<(), String> {
        let part_max = self.negotiated.part_max_bytes(1) as usize;
        for (at, part) in (offset..).step_by(part_max).zip(into.chunks_mut(part_max)) {
            let len = part.len() as u32;
            self.request(wire::CMD_READ, 0, at, len, &[], Some(part), None)?;
        }
        Ok(())
    }

    /// Whether block status can be asked: the server has the `base:allocation` context.
    pub fn has_block_status(&self) -> bool {
        self.negotiated.allocation_context.is_some()
    }

    /// The extents from `offset` (at most `bytes`, within the export) as the server describes
    /// them in `base:allocation`: (length, reads as zeroes), in order, at least one. Err if
    /// the server has no such context or answers out of the rules.
    pub fn block_status(&self, offset: u64, bytes: u32) -> Result<Vec<(u64, bool)>, String> {
        let Some(context) = self.negotiated.allocation_context else {
            return Err(format!("NBD server {}: no block status", self.spec));
        };
        let mut status = Vec::new();
        self.request(wire::CMD_BLOCK_STATUS, 0, offset, bytes, &[], None, Some(&mut status))?;
        let bad = |why: &str| format!("NBD server {}: block status: {why}", self.spec);
        let words = status.get(4..).ok_or_else(|| bad("no block status chunk"))?;
        if status[0..4] != context.to_be_bytes() || words.len() % 8 != 0 || words.is_empty() {
            return Err(bad("a chunk of another context, or of no whole extent"));
        }
        let extents: Vec<(u64, bool)> = words
            .chunks_exact(8)
            .map(|e| {
                let length = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
                let flags = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                (u64::from(length), flags & wire::STATE_ZERO != 0)
            })
            .collect();
        if extents[0].0 == 0 {
            return Err(bad("an empty first extent"));
        }
        Ok(extents)
    }

    /// Makes `bytes` at `offset` zeroes (write-zeroes if the server has it, else writes).
    pub fn write_zeroes(&self, offset: u64, bytes: u64) -> Result<(), String> {
        if !self.negotiated.has(wire::TFLAG_SEND_WRITE_ZEROES) {
            let zeroes = vec![0u8; bytes.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + bytes {
                let n = (offset + bytes - at).min(zeroes.len() as u64);
                self.write_at(at, &zeroes[..n as usize])?;
                at += n;
            }
            return Ok(());
        }
        let mut at = offset;
        while at < offset + bytes {
            let n = (offset + bytes - at).min(MAX_RANGE_BYTES);
            self.request(wire::CMD_WRITE_ZEROES, 0, at, n as u32, &[], None, None)?;
            at += n;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), String> {
        if !self.negotiated.has(wire::TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request(wire::CMD_FLUSH, 0, 0, 0, &[], None, None)
    }

    /// Sends one request and reads its answer (simple, or structured chunks up to the last);
    /// a read's data lands in `read`, which is `length` bytes; a block status chunk's body
    /// in `status`.
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        read: Option<&mut [u8]>,
        status: Option<&mut Vec<u8>>,
    ) -> Result<(), String> {
        let mut guard = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let (stream, next_cookie) = &mut *guard;
        *next_cookie += 1;
        let cookie = *next_cookie;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!("NBD server {}: {what}: {e}", self.spec)
        };
        let header = wire::request_header(flags, command, cookie, offset, length);
        let sent = match stream {
            Stream::Unix(s) => s.write_all(&header).and_then(|()| s.write_all(payload)),
            Stream::Tcp(s) => s.write_all(&header).and_then(|()| s.write_all(payload)),
            // One record for both where they fit, and the data on the wire before the wait.
            Stream::Tls(s) => {
                s.write_all(&header).and_then(|()| s.write_all(payload)).and_then(|()| s.flush())
            }
        };
        sent.map_err(|e| fail("sending a request", &e))?;
        let reader: &mut dyn Read = match stream {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.as_mut(),
        };
        read_answer(reader, cookie, offset, read, status)
            .map_err(|e| fail("reading its answer", &e))
    }
}

/// Reads the answer to request `cookie`: Ok, or the error the server gave. A read's data
/// (`read`, of the request at `offset`) must be covered exactly: a chunk outside it, or a
/// total other than its length, is an error (servers send no overlapping chunks).
fn read_answer(
    r: &mut dyn Read,
    cookie: u64,
    offset: u64,
    mut read: Option<&mut [u8]>,
    mut status: Option<&mut Vec<u8>>,
) -> io::Result<()> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    match u32::from_be_bytes(magic) {
        wire::SIMPLE_REPLY_MAGIC => {
            let mut rest = [0u8; 12];
            r.read_exact(&mut rest)?;
            let error = u32::from_be_bytes(rest[0..4].try_into().unwrap_or_default());
            let got = u64::from_be_bytes(rest[4..12].try_into().unwrap_or_default());
            if got != cookie {
                return Err(bad(format!("an answer to request {got}, not {cookie}")));
            }
            if error != 0 {
                return Err(io::Error::from_raw_os_error(-wire::errno_of(error)));
            }
            if let Some(data) = read {
                r.read_exact(data)?;
            }
            Ok(())
        }
        wire::STRUCTURED_REPLY_MAGIC => {
            let mut magic_next = None;
            let mut covered = 0u64;
            loop {
                if let Some(m) = magic_next.take() {
                    if m != wire::STRUCTURED_REPLY_MAGIC {
                        return Err(bad(format!("a reply magic {m:#x}")));
                    }
                }
                let mut rest = [0u8; 16];
                r.read_exact(&mut rest)?;
                let flags = u16::from_be_bytes([rest[0], rest[1]]);
                let kind = u16::from_be_bytes([rest[2], rest[3]]);
                let got = u64::from_be_bytes(rest[4..12].try_into().unwrap_or_default());
                let length = u32::from_be_bytes(rest[12..16].try_into().unwrap_or_default());
                if got != cookie {
                    return Err(bad(format!("an answer to request {got}, not {cookie}")));
                }
                if kind == wire::REPLY_TYPE_OFFSET_DATA || kind == wire::REPLY_TYPE_OFFSET_HOLE {
                    let Some(data) = read.as_deref_mut() else {
                        return Err(bad(format!("a data chunk of type {kind} to a write")));
                    };
                    covered += read_chunk(r, kind, length, offset, data)?;
                } else {
                    if length > 64 * 1024 {
                        return Err(bad(format!("a {length}-byte chunk of type {kind}")));
                    }
                    let mut body = vec![0u8; length as usize];
                    r.read_exact(&mut body)?;
                    if kind == wire::REPLY_TYPE_BLOCK_STATUS {
                        if let Some(into) = status.as_deref_mut().filter(|v| v.is_empty()) {
                            *into = body;
                            body = Vec::new();
                        }
                    }
                    if kind & wire::REPLY_TYPE_ERROR_BIT != 0 {
                        let error = body
                            .get(0..4)
                            .map_or(5, |b| u32::from_be_bytes(b.try_into().unwrap_or_default()));
                        return Err(io::Error::from_raw_os_error(-wire::errno_of(error)));
                    }
                }
                if flags & wire::REPLY_FLAG_DONE != 0 {
                    return match read {
                        Some(data) if covered != data.len() as u64 => Err(bad(format!(
                            "{covered} bytes of a {}-byte read answered",
                            data.len()
                        ))),
                        _ => Ok(()),
                    };
                }
                r.read_exact(&mut magic)?;
                magic_next = Some(u32::from_be_bytes(magic));
            }
        }
        other => Err(bad(format!("a reply magic {other:#x}"))),
    }
}

/// Reads one data or hole chunk of `length` bytes (after its header) into `data`, the read at
/// `offset`; returns the bytes of the read it covers.
fn read_chunk(
    r: &mut dyn Read,
    kind: u16,
    length: u32,
    offset: u64,
    data: &mut [u8],
) -> io::Result<u64> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let hole = kind == wire::REPLY_TYPE_OFFSET_HOLE;
    if (hole && length != 12) || (!hole && length < 8) {
        return Err(bad(format!("a chunk of type {kind} of {length} bytes")));
    }
    let mut at = [0u8; 8];
    r.read_exact(&mut at)?;
    let at = u64::from_be_bytes(at);
    let bytes = if hole {
        let mut hole_bytes = [0u8; 4];
        r.read_exact(&mut hole_bytes)?;
        u64::from(u32::from_be_bytes(hole_bytes))
    } else {
        u64::from(length - 8)
    };
    let start = at
        .checked_sub(offset)
        .filter(|s| s.checked_add(bytes).is_some_and(|end| end <= data.len() as u64))
        .ok_or_else(|| bad(format!("a chunk of {bytes} bytes at {at}, outside the read")))?;
    let range = start as usize..(start + bytes) as usize;
    if hole {
        data[range].fill(0);
    } else {
        r.read_exact(&mut data[range])?;
    }
    Ok(bytes)
}
