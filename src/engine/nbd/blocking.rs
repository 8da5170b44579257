//! A blocking NBD client of one connection, one request at a time: what a mirror job writes its
//! target through (from its own thread, and from I/O threads copying a guest's write again).
//! Not an [`Engine`](crate::engine::Engine): a mirror's writes are few and large, and each
//! waits for its answer anyway. Every wait is bounded by the socket's timeouts.

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

    /// Writes `data` at `offset` (within the server's largest payload: the caller's pieces are
    /// smaller).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.request(wire::CMD_WRITE, 0, offset, data.len() as u32, data)
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
            self.request(wire::CMD_WRITE_ZEROES, 0, at, n as u32, &[])?;
            at += n;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), String> {
        if !self.negotiated.has(wire::TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request(wire::CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Sends one request and reads its answer (simple, or structured chunks up to the last).
    fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
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
        read_answer(reader, cookie).map_err(|e| fail("reading its answer", &e))
    }
}

/// Reads the answer to request `cookie`: Ok, or the error the server gave.
fn read_answer(r: &mut dyn Read, cookie: u64) -> io::Result<()> {
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
            Ok(())
        }
        wire::STRUCTURED_REPLY_MAGIC => {
            let mut magic_next = None;
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
                if length > 64 * 1024 {
                    return Err(bad(format!("a {length}-byte chunk to a write")));
                }
                let mut body = vec![0u8; length as usize];
                r.read_exact(&mut body)?;
                if kind & wire::REPLY_TYPE_ERROR_BIT != 0 {
                    let error = body
                        .get(0..4)
                        .map_or(5, |b| u32::from_be_bytes(b.try_into().unwrap_or_default()));
                    return Err(io::Error::from_raw_os_error(-wire::errno_of(error)));
                }
                if flags & wire::REPLY_FLAG_DONE != 0 {
                    return Ok(());
                }
                r.read_exact(&mut magic)?;
                magic_next = Some(u32::from_be_bytes(magic));
            }
        }
        other => Err(bad(format!("a reply magic {other:#x}"))),
    }
}
