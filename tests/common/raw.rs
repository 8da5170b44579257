//! A vhost-user frontend that writes the wire format itself, for messages no well-behaved
//! frontend library would send: any request code, any payload, any descriptors attached.

use std::io::{self, Read};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const SET_VRING_ERR: u32 = 14;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const GET_CONFIG: u32 = 24;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;

const FLAG_VERSION: u32 = 0x1;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Protocol features: MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS.
pub const PROTOCOL_FEATURES: u64 = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15);
/// Protocol feature INFLIGHT_SHMFD.
pub const PROTOCOL_INFLIGHT_SHMFD: u64 = 1 << 12;
/// Protocol feature LOG_SHMFD (the dirty log of a live migration, SET_LOG_BASE).
pub const PROTOCOL_LOG_SHMFD: u64 = 1 << 1;
/// Virtio feature VHOST_F_LOG_ALL: the frontend migrates the guest, writes are logged.
pub const F_LOG_ALL: u64 = 1 << 26;
/// Virtio features: VERSION_1 and vhost-user's PROTOCOL_FEATURES bit.
pub const FEATURES: u64 = (1 << 32) | (1 << 30);

pub struct RawFrontend {
    pub sock: UnixStream,
}

impl RawFrontend {
    pub fn connect(path: &Path) -> RawFrontend {
        let sock = UnixStream::connect(path).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawFrontend { sock }
    }

    /// Sends one message: header (with NEED_REPLY if `need_reply`), payload, descriptors.
    pub fn send(
        &self,
        request: u32,
        need_reply: bool,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        let flags = FLAG_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend(request.to_le_bytes());
        msg.extend(flags.to_le_bytes());
        msg.extend((payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        let n = self.sock.send_with_fds(&[&msg[..]], fds).map_err(io::Error::from)?;
        assert_eq!(n, msg.len(), "short send");
        Ok(())
    }

    /// Reads one reply: (request, payload).
    pub fn reply(&self) -> io::Result<(u32, Vec<u8>)> {
        let mut header = [0u8; 12];
        (&self.sock).read_exact(&mut header)?;
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(8) as usize];
        (&self.sock).read_exact(&mut payload)?;
        Ok((word(0), payload))
    }

    /// Sends with NEED_REPLY and returns the acknowledgement's status (0: accepted).
    pub fn ack(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<u64> {
        self.send(request, true, payload, fds)?;
        let (req, body) = self.reply()?;
        assert_eq!(req, request, "reply to another request");
        Ok(u64::from_le_bytes(body[..8].try_into().unwrap()))
    }

    /// A request whose answer is a u64 (GET_FEATURES, GET_PROTOCOL_FEATURES, ...).
    pub fn get_u64(&self, request: u32) -> io::Result<u64> {
        self.send(request, false, &[], &[])?;
        let (_, body) = self.reply()?;
        Ok(u64::from_le_bytes(body[..8].try_into().unwrap()))
    }

    /// The usual opening: owner, features, protocol features with REPLY_ACK.
    pub fn negotiate(&self) {
        self.negotiate_with(0);
    }

    /// The usual opening, with the protocol features `extra` as well (those offered).
    pub fn negotiate_with(&self, extra: u64) {
        self.send(SET_OWNER, false, &[], &[]).unwrap();
        let offered = self.get_u64(GET_FEATURES).unwrap();
        self.send(SET_FEATURES, false, &(offered & FEATURES).to_le_bytes(), &[]).unwrap();
        let proto = self.get_u64(GET_PROTOCOL_FEATURES).unwrap();
        let want = proto & (PROTOCOL_FEATURES | extra);
        self.send(SET_PROTOCOL_FEATURES, false, &want.to_le_bytes(), &[]).unwrap();
    }

    /// SET_LOG_BASE of `mmap_size` bytes of `fd`: whether the log was taken (its reply, an
    /// echo, came back). The message has no error reply; a refused log ends the connection.
    pub fn set_log_base(&self, mmap_size: u64, fd: RawFd) -> bool {
        let mut payload = mmap_size.to_le_bytes().to_vec();
        payload.extend(0u64.to_le_bytes());
        self.send(SET_LOG_BASE, false, &payload, &[fd]).is_ok()
            && matches!(self.reply(), Ok((SET_LOG_BASE, echo)) if echo == payload)
    }
}

/// A SET_MEM_TABLE payload for `regions` of (guest_phys_addr, size, user_addr, mmap_offset).
pub fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend((regions.len() as u32).to_le_bytes());
    p.extend(0u32.to_le_bytes());
    for &(gpa, size, uaddr, offset) in regions {
        for v in [gpa, size, uaddr, offset] {
            p.extend(v.to_le_bytes());
        }
    }
    p
}

/// A GET_INFLIGHT_FD / SET_INFLIGHT_FD payload: mmap_size, mmap_offset, num_queues,
/// queue_size (and padding).
pub fn inflight_payload(
    mmap_size: u64,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
) -> Vec<u8> {
    let mut p = mmap_size.to_le_bytes().to_vec();
    p.extend(mmap_offset.to_le_bytes());
    p.extend(num_queues.to_le_bytes());
    p.extend(queue_size.to_le_bytes());
    p.extend([0u8; 4]);
    p
}

/// Bytes of an inflight region for `num_queues` rings of `queue_size` (each queue's part
/// 16 + 16 per descriptor, on a 64-byte boundary: the vhost-user split-ring layout).
pub fn inflight_bytes(num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * (16 + 16 * u64::from(queue_size)).next_multiple_of(64)
}

/// An ADD_MEM_REG / REM_MEM_REG payload for one region.
pub fn one_region(gpa: u64, size: u64, uaddr: u64, offset: u64) -> Vec<u8> {
    let mut p = 0u64.to_le_bytes().to_vec();
    for v in [gpa, size, uaddr, offset] {
        p.extend(v.to_le_bytes());
    }
    p
}
