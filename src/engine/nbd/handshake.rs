//! Connecting to an NBD server and the fixed newstyle negotiation, blocking, each step under
//! [`CONNECT_TIMEOUT`](super::CONNECT_TIMEOUT). Everything the server says is checked: a
//! lying or broken server gets a one-line error here, not a confused data path later.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

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
}

impl Negotiated {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A connected, negotiated socket, blocking, ready for the transmission phase.
pub struct Connection {
    pub fd: OwnedFd,
    pub negotiated: Negotiated,
}

/// Connects to `spec`'s server and negotiates its export. The error says what failed, in one
/// line, naming the server.
pub fn connect(spec: &NbdSpec, timeout: Duration) -> Result<Connection, String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("NBD server {spec}: {what}: {e}");
    let fd: OwnedFd = match &spec.addr {
        NbdAddr::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| fail("cannot connect", &e))?;
            s.set_read_timeout(Some(timeout)).map_err(|e| fail("socket", &e))?;
            s.set_write_timeout(Some(timeout)).map_err(|e| fail("socket", &e))?;
            let mut s = s;
            let negotiated = negotiate(&mut s, &spec.export).map_err(|e| fail("handshake", &e))?;
            return Ok(Connection { fd: s.into(), negotiated });
        }
        NbdAddr::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| fail("cannot resolve the host", &e))?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let mut stream = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let Some(s) = stream else { return Err(fail("cannot connect", &last)) };
            // Requests are small and pipelined: Nagle would hold them for the previous ACK.
            s.set_nodelay(true).map_err(|e| fail("socket", &e))?;
            s.set_read_timeout(Some(timeout)).map_err(|e| fail("socket", &e))?;
            s.set_write_timeout(Some(timeout)).map_err(|e| fail("socket", &e))?;
            s.into()
        }
    };
    let mut stream = TcpStream::from(fd);
    let negotiated = negotiate(&mut stream, &spec.export).map_err(|e| fail("handshake", &e))?;
    Ok(Connection { fd: stream.into(), negotiated })
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

fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> io::Result<Negotiated> {
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
    s.write_all(&client_flags.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, _) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = kind == REP_ACK;
    if kind != REP_ACK && kind & REP_FLAG_ERROR == 0 {
        return Err(bad(format!("option reply type {kind} to STRUCTURED_REPLY")));
    }

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

/// Tells the server we are going (NBD_CMD_DISC), best effort, without waiting: on a
/// connection with nothing half-sent, before it is closed.
pub fn say_goodbye(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
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
