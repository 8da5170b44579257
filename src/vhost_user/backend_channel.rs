//! The backend-to-frontend channel (protocol feature BACKEND_REQ), for the one message we
//! send on it: CONFIG_CHANGE_MSG, after an export was resized, so the VMM re-reads the config
//! space and tells the guest. The vhost crate (0.18) accepts the channel but has no way to send
//! this message, so we take SET_BACKEND_REQ_FD off the socket ourselves before the crate sees
//! the next message, and speak the few bytes of this exchange here.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// FrontendReq::SET_BACKEND_REQ_FD.
pub const SET_BACKEND_REQ_FD: u32 = 21;
/// BackendReq::CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;
const HEADER_BYTES: usize = 12;
/// How long we wait for the frontend to acknowledge a config change.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A vhost-user message header: request, flags, payload size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

fn encode(h: Header) -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    b[0..4].copy_from_slice(&h.request.to_le_bytes());
    b[4..8].copy_from_slice(&h.flags.to_le_bytes());
    b[8..12].copy_from_slice(&h.size.to_le_bytes());
    b
}

fn decode(b: &[u8; HEADER_BYTES]) -> Header {
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Header { request: word(0), flags: word(4), size: word(8) }
}

/// How long the rest of a message header may take once its first byte arrived. A frontend
/// writes a header in one go; one that stops part-way is stalled or hostile.
pub const HEADER_TIMEOUT: std::time::Duration = Duration::from_secs(5);

/// Looks at the next message's header without taking it. `None`: the frontend hung up,
/// including after a partial header (a short header followed by EOF is a disconnect). An
/// idle connection waits here for as long as it likes; once a header has begun, the rest must
/// come within [`HEADER_TIMEOUT`] (a `TimedOut` error otherwise).
pub fn peek_header(stream: &UnixStream) -> io::Result<Option<Header>> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    let mut b = [0u8; HEADER_BYTES];
    let mut deadline: Option<std::time::Instant> = None;
    loop {
        // Wait for data (or a hang-up). Before the first byte: without a limit; after it:
        // until the deadline, in short steps, since a socket with some bytes queued polls
        // readable at once and poll cannot wait for "more".
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "a partial message header stalled",
                    ));
                }
                left.as_millis().clamp(1, 10) as i32
            }
        };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if deadline.is_some() && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) == 0 {
            // Partial header, peer still there: sleep the step out before peeking again.
            if rc == 1 {
                std::thread::sleep(Duration::from_millis(timeout_ms as u64));
            }
        }
        // SAFETY: recv writes at most b.len() bytes into b, which we own.
        let n = unsafe {
            libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        match n {
            0 => return Ok(None),
            n if n as usize == HEADER_BYTES => return Ok(Some(decode(&b))),
            n if n > 0 => {
                if pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
                    // The frontend closed its end after part of a header: nothing more comes.
                    return Ok(None);
                }
                deadline.get_or_insert_with(|| std::time::Instant::now() + HEADER_TIMEOUT);
            }
            _ => {
                let e = io::Error::last_os_error();
                let broken = pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
                if !broken
                    && matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock)
                {
                    continue;
                }
                // Nothing to read on a socket poll calls broken: waiting again would spin.
                return Err(e);
            }
        }
    }
}

/// Takes a SET_BACKEND_REQ_FD message (whose header `peek_header` returned) off `stream`,
/// acknowledges it if asked to, and returns the channel.
pub fn take_channel(
    stream: &UnixStream,
    header: Header,
    reply_ack: bool,
) -> io::Result<BackendChannel> {
    if header.size > 64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SET_BACKEND_REQ_FD with a payload",
        ));
    }
    let mut buf = vec![0u8; HEADER_BYTES + header.size as usize];
    let (n, file) = stream.recv_with_fd(&mut buf)?;
    let mut got = n;
    while got < buf.len() {
        let m = (&*stream).read(&mut buf[got..])?;
        if m == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += m;
    }
    let file = file.ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "SET_BACKEND_REQ_FD without a file descriptor")
    })?;
    if reply_ack && header.flags & FLAG_NEED_REPLY != 0 {
        let reply = encode(Header {
            request: SET_BACKEND_REQ_FD,
            flags: FLAG_VERSION | FLAG_REPLY,
            size: 8,
        });
        let mut msg = reply.to_vec();
        msg.extend_from_slice(&0u64.to_le_bytes());
        (&*stream).write_all(&msg)?;
    }
    let channel = UnixStream::from(std::os::fd::OwnedFd::from(file));
    channel.set_read_timeout(Some(ACK_TIMEOUT))?;
    // A frontend that stops reading must not block the control-socket thread that sends a
    // config change (and holds the channel's mutex, which the disconnect path needs).
    channel.set_write_timeout(Some(ACK_TIMEOUT))?;
    Ok(BackendChannel { stream: channel, reply_ack })
}

/// Our end of the backend channel.
pub struct BackendChannel {
    stream: UnixStream,
    reply_ack: bool,
}

impl BackendChannel {
    /// Tells the frontend the config space changed; waits for its acknowledgement if the
    /// connection uses REPLY_ACK. The frontend then reads the config space on the main
    /// channel, so the caller must not hold anything the main channel's thread needs.
    pub fn config_changed(&mut self) -> io::Result<()> {
        let flags = FLAG_VERSION | if self.reply_ack { FLAG_NEED_REPLY } else { 0 };
        self.stream.write_all(&encode(Header { request: CONFIG_CHANGE_MSG, flags, size: 0 }))?;
        if !self.reply_ack {
            return Ok(());
        }
        let mut reply = [0u8; HEADER_BYTES + 8];
        self.stream.read_exact(&mut reply)?;
        let header = decode(reply[..HEADER_BYTES].try_into().unwrap_or(&[0; HEADER_BYTES]));
        let value = u64::from_le_bytes(reply[HEADER_BYTES..].try_into().unwrap_or_default());
        if header.request != CONFIG_CHANGE_MSG || header.flags & FLAG_REPLY == 0 || value != 0 {
            return Err(io::Error::other(format!(
                "the frontend refused the config change (reply {header:?}, status {value})"
            )));
        }
        Ok(())
    }
}
