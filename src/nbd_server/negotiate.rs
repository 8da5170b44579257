//! The fixed newstyle negotiation, server side. Everything a client says is checked; a
//! malformed option gets an error reply (or, where the protocol leaves no way to answer, the
//! connection is closed). The whole negotiation, TLS handshake included, has one deadline,
//! so a client that stalls or trickles bytes holds a connection slot for at most
//! [`NEGOTIATION_TIMEOUT`].

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::stream::{Conn, Socket};
use super::transmit::{transmission_flags, Session};
use super::{Exposed, NbdServer, MAX_PAYLOAD_BYTES};
use crate::engine::nbd::wire::*;

/// How long a client may take from connecting to its choice of export.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest option data read; a longer option is skipped and refused (`REP_ERR_TOO_BIG`).
const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Options one client may send before choosing an export.
const MAX_OPTIONS: usize = 1024;
/// The meta context the server offers, and its id in replies.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The negotiation's state: the connection and what the client asked for so far.
struct Negotiation<'a> {
    server: &'a NbdServer,
    conn: Conn,
    control: &'a Socket,
    deadline: Instant,
    structured: bool,
    /// The export name `base:allocation` was set for (SET_META_CONTEXT).
    allocation_for: Option<String>,
}

/// What an option leads to.
enum Next {
    Continue,
    Close,
    Transmit(Arc<Exposed>),
}

/// Negotiates with a new client: the session to serve, or None when the client left or was
/// refused (answered and closed).
pub fn negotiate(
    server: &NbdServer,
    socket: Socket,
    control: &Socket,
    serial: u64,
) -> io::Result<Option<Session>> {
    control.set_write_timeout(Some(NEGOTIATION_TIMEOUT))?;
    let mut n = Negotiation {
        server,
        conn: Conn::Clear(socket),
        control,
        deadline: Instant::now() + NEGOTIATION_TIMEOUT,
        structured: false,
        allocation_for: None,
    };
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    n.conn.send(&[&hello])?;
    let client_flags = n.read_u32()?;
    let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    if client_flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 || client_flags & !known != 0 {
        // The protocol gives no way to answer: only fixed newstyle clients are served.
        return Ok(None);
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
    for _ in 0..MAX_OPTIONS {
        match n.option(no_zeroes)? {
            Next::Continue => {}
            Next::Close => return Ok(None),
            Next::Transmit(exposed) => {
                if !server.attach_client(serial, &exposed) {
                    return Ok(None);
                }
                let block_status = n.allocation_for.as_deref() == Some(exposed.name.as_str());
                return Ok(Some(Session::new(n.conn, exposed, n.structured, block_status)));
            }
        }
    }
    Ok(None)
}

impl Negotiation<'_> {
    /// Reads exactly `buf`, each wait bounded by what is left of the deadline.
    fn read_exact(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "negotiation timed out"));
            }
            self.control.set_read_timeout(Some(left))?;
            match self.conn.read(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "negotiation timed out"))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// Reads and drops `len` bytes of an option not read whole (bounded memory).
    fn skip(&mut self, mut len: u64) -> io::Result<()> {
        let mut sink = [0u8; 4096];
        while len > 0 {
            let n = len.min(sink.len() as u64) as usize;
            self.read_exact(&mut sink[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut h = [0u8; 20];
        h[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&option.to_be_bytes());
        h[12..16].copy_from_slice(&kind.to_be_bytes());
        h[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
        self.conn.send(&[&h, data])
    }

    fn refuse(&mut self, option: u32, kind: u32, why: &str) -> io::Result<Next> {
        self.reply(option, kind, why.as_bytes())?;
        Ok(Next::Continue)
    }

    /// Reads and answers one option.
    fn option(&mut self, no_zeroes: bool) -> io::Result<Next> {
        let mut h = [0u8; 16];
        self.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        if magic != IHAVEOPT {
            return Ok(Next::Close);
        }
        let tls_required = self.server.tls.is_some() && !self.conn.is_tls();
        if tls_required && option == OPT_EXPORT_NAME {
            // EXPORT_NAME has no error reply: the connection ends.
            return Ok(Next::Close);
        }
        if len > MAX_OPTION_BYTES {
            self.skip(u64::from(len))?;
            return self.refuse(option, REP_ERR_TOO_BIG, "option data too long");
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data)?;
        if tls_required && option != OPT_STARTTLS && option != OPT_ABORT {
            return self.refuse(
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: STARTTLS first",
            );
        }
        match option {
            OPT_ABORT => {
                let _ = self.reply(option, REP_ACK, &[]);
                Ok(Next::Close)
            }
            OPT_EXPORT_NAME => self.export_name(&data, no_zeroes),
            OPT_LIST => self.list(option, &data),
            OPT_STARTTLS => self.starttls(option, &data),
            OPT_INFO | OPT_GO => self.info_or_go(option, &data),
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                self.refuse(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            }
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                self.reply(option, REP_ACK, &[])?;
                Ok(Next::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, &data),
            _ => self.refuse(option, REP_ERR_UNSUP, "option not supported"),
        }
    }

    fn export_name(&mut self, data: &[u8], no_zeroes: bool) -> io::Result<Next> {
        let Some(exposed) = std::str::from_utf8(data).ok().and_then(|n| self.server.find(n)) else {
            return Ok(Next::Close);
        };
        let mut reply = Vec::with_capacity(134);
        reply.extend_from_slice(&exposed.disk.capacity_bytes().to_be_bytes());
        reply.extend_from_slice(&transmission_flags(&exposed).to_be_bytes());
        if !no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        self.conn.send(&[&reply])?;
        Ok(Next::Transmit(exposed))
    }

    fn list(&mut self, option: u32, data: &[u8]) -> io::Result<Next> {
        if !data.is_empty() {
            return self.refuse(option, REP_ERR_INVALID, "LIST takes no data");
        }
        for name in self.server.names() {
            let mut entry = Vec::with_capacity(4 + name.len());
            entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            self.reply(option, REP_SERVER, &entry)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(Next::Continue)
    }

    fn starttls(&mut self, option: u32, data: &[u8]) -> io::Result<Next> {
        let Some(config) = self.server.tls.clone() else {
            return self.refuse(option, REP_ERR_POLICY, "this server has no TLS credentials");
        };
        if self.conn.is_tls() {
            return self.refuse(option, REP_ERR_INVALID, "TLS is on already");
        }
        if !data.is_empty() {
            return self.refuse(option, REP_ERR_INVALID, "STARTTLS takes no data");
        }
        self.reply(option, REP_ACK, &[])?;
        let Conn::Clear(socket) =
            std::mem::replace(&mut self.conn, Conn::Clear(self.control.try_clone()?))
        else {
            return Ok(Next::Close);
        };
        let session = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(session, socket);
        while tls.conn.is_handshaking() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"));
            }
            self.control.set_read_timeout(Some(left))?;
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
        }
        self.conn = Conn::Tls(Box::new(tls));
        // What was negotiated in clear does not carry over (the protocol's rule).
        self.structured = false;
        self.allocation_for = None;
        Ok(Next::Continue)
    }

    /// INFO and GO: `[name length][name][count][count info types]`.
    fn info_or_go(&mut self, option: u32, data: &[u8]) -> io::Result<Next> {
        let Some((name, requests)) = parse_info_request(data) else {
            return self.refuse(option, REP_ERR_INVALID, "malformed request");
        };
        let Some(exposed) = self.server.find(&name) else {
            let why = format!("no export named '{name}'");
            return self.refuse(option, REP_ERR_UNKNOWN, &why);
        };
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&exposed.disk.capacity_bytes().to_be_bytes());
        export.extend_from_slice(&transmission_flags(&exposed).to_be_bytes());
        self.reply(option, REP_INFO, &export)?;
        if requests.contains(&INFO_NAME) {
            let mut info = INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(exposed.name.as_bytes());
            self.reply(option, REP_INFO, &info)?;
        }
        let min = super::transmit::min_block_bytes(&exposed.disk);
        if requests.contains(&INFO_BLOCK_SIZE) || min > 1 {
            let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            info.extend_from_slice(&min.to_be_bytes());
            info.extend_from_slice(&min.max(4096).to_be_bytes());
            info.extend_from_slice(&MAX_PAYLOAD_BYTES.to_be_bytes());
            self.reply(option, REP_INFO, &info)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(if option == OPT_GO { Next::Transmit(exposed) } else { Next::Continue })
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT: only `base:allocation` exists.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<Next> {
        let Some((name, queries)) = parse_meta_request(data) else {
            return self.refuse(option, REP_ERR_INVALID, "malformed request");
        };
        if option == OPT_SET_META_CONTEXT && !self.structured {
            return self.refuse(option, REP_ERR_INVALID, "STRUCTURED_REPLY first");
        }
        if self.server.find(&name).is_none() {
            let why = format!("no export named '{name}'");
            return self.refuse(option, REP_ERR_UNKNOWN, &why);
        }
        let listing = option == OPT_LIST_META_CONTEXT;
        let matches = queries.iter().any(|q| q == BASE_ALLOCATION || (listing && q == "base:"))
            || (listing && queries.is_empty());
        if option == OPT_SET_META_CONTEXT {
            self.allocation_for = matches.then(|| name.clone());
        }
        if matches {
            let mut context = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            context.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &context)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(Next::Continue)
    }
}

/// Takes a length-prefixed (u32) string off the front of `data`.
fn take_string(data: &mut &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let text = data.get(4..4usize.checked_add(len)?)?;
    let s = std::str::from_utf8(text).ok()?.to_string();
    *data = &data[4 + len..];
    Some(s)
}

/// An INFO or GO request: the export name and the info types asked for.
fn parse_info_request(mut data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name = take_string(&mut data)?;
    let count = u16::from_be_bytes(data.get(0..2)?.try_into().ok()?) as usize;
    let rest = &data[2..];
    if rest.len() != count * 2 {
        return None;
    }
    let requests = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Some((name, requests))
}

/// A meta context request: the export name and the queries.
fn parse_meta_request(mut data: &[u8]) -> Option<(String, Vec<String>)> {
    let name = take_string(&mut data)?;
    let count = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    data = &data[4..];
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if count > data.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(take_string(&mut data)?);
    }
    data.is_empty().then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn info_requests_are_checked_whole() {
        let mut ok = string("vm1");
        ok.extend_from_slice(&[0, 2, 0, 1, 0, 3]);
        assert_eq!(parse_info_request(&ok), Some(("vm1".into(), vec![1, 3])));
        let mut short = string("vm1");
        short.extend_from_slice(&[0, 2, 0, 1]);
        assert_eq!(parse_info_request(&short), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 9, b'a']), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn meta_requests_are_checked_whole() {
        let mut ok = string("vm1");
        ok.extend_from_slice(&1u32.to_be_bytes());
        ok.extend_from_slice(&string(BASE_ALLOCATION));
        assert_eq!(parse_meta_request(&ok), Some(("vm1".into(), vec![BASE_ALLOCATION.into()])));
        let mut lying = string("vm1");
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&lying), None);
        let mut trailing = ok.clone();
        trailing.push(0);
        assert_eq!(parse_meta_request(&trailing), None);
    }
}
