//! The transmission phase: one request at a time per connection, read, checked (bounds,
//! alignment, permission), done on the export's disk with pread/pwrite/fdatasync/fallocate
//! (off the data path: these threads are the NBD server's own), and answered. A request the
//! server cannot make sense of (a bad magic, a write payload over the limit) ends the
//! connection; any other bad request gets an error reply and the connection goes on.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::negotiate::BASE_ALLOCATION_ID;
use super::stream::{Conn, Socket};
use super::{Exposed, MAX_PAYLOAD_BYTES};
use crate::disk::{Backend, DiscardMode, Disk};
use crate::engine::nbd::wire::*;
use crate::engine::CacheMode;
use crate::ratelimit::RateLimiter;
use crate::warn_limited;

/// How long the rest of a request (a write's payload) and the client's reading of a reply
/// may take; between requests a client may stay idle as long as it likes.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Buffers start aligned to this (O_DIRECT's rule for memory).
const BUFFER_ALIGN: usize = 4096;
/// A connection keeps a buffer up to this size between requests; a bigger one is freed.
const KEEP_BUFFER_BYTES: usize = 4 << 20;
/// Block status describes at most this many extents per reply.
const MAX_EXTENTS: usize = 1024;
/// Write-zeroes without fallocate writes zeroes in pieces of this size.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// A negotiated connection.
pub struct Session {
    conn: Conn,
    pub exposed: Arc<Exposed>,
    structured: bool,
    /// `base:allocation` was negotiated for this export.
    block_status: bool,
    buffer: Vec<u8>,
}

impl Session {
    pub fn new(conn: Conn, exposed: Arc<Exposed>, structured: bool, block_status: bool) -> Session {
        Session { conn, exposed, structured, block_status, buffer: Vec::new() }
    }
}

/// The flags a client sees for `exposed`. Multi-conn is offered for every export served
/// (files and null): every connection reads and writes the same open file, and a flush is
/// an fdatasync of that file, which covers writes completed on any connection.
pub fn transmission_flags(exposed: &Exposed) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_DF
        | TFLAG_CAN_MULTI_CONN;
    if !exposed.writable || exposed.disk.readonly {
        flags |= TFLAG_READ_ONLY;
    }
    flags
}

/// The smallest block requests must be made of: 1 through the page cache, the O_DIRECT
/// block otherwise (the guest's logical block, or the backing's when it is larger).
pub fn min_block_bytes(disk: &Disk) -> u32 {
    match &disk.backend {
        Backend::File { .. } if disk.cache.direct() => {
            disk.logical_block_bytes.max(disk.rmw_block_bytes as u32)
        }
        _ => 1,
    }
}

/// One request's header.
struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

impl Request {
    fn parse(h: &[u8; REQUEST_HEADER_BYTES]) -> Option<Request> {
        let be16 = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        if u32::from_be_bytes(h[0..4].try_into().unwrap()) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(4),
            command: be16(6),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(h[24..28].try_into().unwrap()),
        })
    }
}

/// An error reply's value and message.
struct Refusal(u32, &'static str);

/// Serves requests until the client disconnects or breaks the protocol.
pub fn serve(s: &mut Session, control: &Socket, log: &Mutex<RateLimiter>) -> io::Result<()> {
    control.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut header = [0u8; REQUEST_HEADER_BYTES];
    loop {
        control.set_read_timeout(None)?;
        if let Err(e) = s.conn.read_exact(&mut header) {
            return if e.kind() == io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e) };
        }
        let Some(r) = Request::parse(&header) else {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            warn_limited!(log, parent: &s.exposed.disk.span, "NBD client sent a bad request magic; closing");
            return Ok(());
        };
        if r.command == CMD_DISC {
            return Ok(());
        }
        control.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        if r.command == CMD_WRITE && r.length > MAX_PAYLOAD_BYTES {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            warn_limited!(log, parent: &s.exposed.disk.span, bytes = r.length, "NBD client wrote over the 32 MiB limit; closing");
            return Ok(());
        }
        let outcome = match r.command {
            CMD_READ => read(s, &r),
            CMD_WRITE => write(s, &r),
            CMD_FLUSH => flush(&s.exposed.disk),
            CMD_TRIM => trim(s, &r),
            CMD_WRITE_ZEROES => write_zeroes(s, &r),
            CMD_BLOCK_STATUS => block_status(s, &r),
            _ => Err(Refusal(EINVAL, "unknown command")),
        };
        match outcome {
            Ok(Sent::Yes) => {}
            Ok(Sent::No) => reply_done(s, &r)?,
            Err(Refusal(error, why)) => reply_error(s, &r, error, why)?,
        }
        if s.buffer.len() > KEEP_BUFFER_BYTES {
            s.buffer = Vec::new();
        }
    }
}

/// Whether a command sent its own reply (read, block status) or needs the plain one.
enum Sent {
    Yes,
    No,
}

type Outcome = Result<Sent, Refusal>;

/// The aligned part of `buffer` of `len` bytes, grown as needed.
fn aligned(buffer: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buffer.len() < len + BUFFER_ALIGN {
        *buffer = vec![0u8; len + BUFFER_ALIGN];
    }
    let start = buffer.as_ptr().align_offset(BUFFER_ALIGN).min(BUFFER_ALIGN);
    &mut buffer[start..start + len]
}

/// The request's range checked against the disk: inside it, on its blocks.
fn check_range(disk: &Disk, r: &Request, beyond: u32) -> Result<(), Refusal> {
    let end = r.offset.checked_add(u64::from(r.length));
    if end.is_none_or(|end| end > disk.capacity_bytes()) {
        return Err(Refusal(beyond, "beyond the end of the export"));
    }
    let block = u64::from(min_block_bytes(disk));
    if !r.offset.is_multiple_of(block) || !u64::from(r.length).is_multiple_of(block) {
        return Err(Refusal(EINVAL, "not on the export's blocks (see NBD_INFO_BLOCK_SIZE)"));
    }
    Ok(())
}

/// Writes are refused to a read-only exposure, and to a disk whose guest runs.
fn check_writable(exposed: &Exposed) -> Result<(), Refusal> {
    if !exposed.writable || exposed.disk.readonly {
        return Err(Refusal(EPERM, "the export is read-only over NBD"));
    }
    if exposed.disk.guest_running() {
        return Err(Refusal(EPERM, "the export's guest is running"));
    }
    Ok(())
}

fn io_error(e: &io::Error) -> Refusal {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => Refusal(ENOSPC, "no space left on the backing"),
        _ => Refusal(EIO, "I/O error on the backing"),
    }
}

fn file_of(disk: &Disk) -> Option<&File> {
    disk.backing().map(|b| &b.file)
}

fn read(s: &mut Session, r: &Request) -> Outcome {
    if r.length > MAX_PAYLOAD_BYTES {
        return Err(Refusal(EOVERFLOW, "read over the 32 MiB limit"));
    }
    check_range(&s.exposed.disk, r, EINVAL)?;
    let data = aligned(&mut s.buffer, r.length as usize);
    match file_of(&s.exposed.disk) {
        Some(f) => f.read_exact_at(data, r.offset).map_err(|e| io_error(&e))?,
        None => data.fill(0),
    }
    let sent = if s.structured {
        let chunk = chunk_header(REPLY_TYPE_OFFSET_DATA, r.cookie, 8 + r.length);
        s.conn.send(&[&chunk, &r.offset.to_be_bytes(), data])
    } else {
        s.conn.send(&[&simple_reply(0, r.cookie), data])
    };
    sent.map(|()| Sent::Yes).map_err(|_| Refusal(EIO, "reply failed"))
}

fn write(s: &mut Session, r: &Request) -> Outcome {
    let data = aligned(&mut s.buffer, r.length as usize);
    // The payload comes first, whatever the verdict: the stream stays in step.
    if s.conn.read_exact(data).is_err() {
        return Err(Refusal(EIO, "payload not received"));
    }
    check_range(&s.exposed.disk, r, ENOSPC)?;
    check_writable(&s.exposed)?;
    let disk = &s.exposed.disk;
    if let Some(f) = file_of(disk) {
        f.write_all_at(data, r.offset).map_err(|e| io_error(&e))?;
        after_write(disk, r)?;
    }
    Ok(Sent::No)
}

/// A write's durability: FUA, or a guest that turned its write cache off.
fn after_write(disk: &Disk, r: &Request) -> Result<(), Refusal> {
    if r.flags & CMD_FLAG_FUA != 0 || disk.write_needs_dsync() {
        flush(disk)?;
    }
    Ok(())
}

fn flush(disk: &Disk) -> Outcome {
    if disk.flush_failed() {
        return Err(Refusal(EIO, "a flush failed earlier: written data may be lost"));
    }
    let Some(f) = file_of(disk) else { return Ok(Sent::No) };
    if disk.cache == CacheMode::Unsafe {
        return Ok(Sent::No);
    }
    if let Err(e) = f.sync_data() {
        disk.flush_failed_with(e.raw_os_error().unwrap_or(libc::EIO), &disk.queue_stats(0));
        return Err(Refusal(EIO, "flush failed"));
    }
    Ok(Sent::No)
}

fn trim(s: &mut Session, r: &Request) -> Outcome {
    check_range(&s.exposed.disk, r, EINVAL)?;
    check_writable(&s.exposed)?;
    let disk = &s.exposed.disk;
    let Some(f) = file_of(disk) else { return Ok(Sent::No) };
    if disk.discard == DiscardMode::Unmap && r.length > 0 {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // A trim is advice: a backing that cannot punch holes keeps its data.
        let _ = crate::sys::fallocate(f, mode, r.offset, u64::from(r.length));
        if disk.range_changes_need_sync() {
            flush(disk)?;
        }
    }
    Ok(Sent::No)
}

fn write_zeroes(s: &mut Session, r: &Request) -> Outcome {
    check_range(&s.exposed.disk, r, ENOSPC)?;
    check_writable(&s.exposed)?;
    let disk = Arc::clone(&s.exposed.disk);
    let Some(f) = file_of(&disk) else { return Ok(Sent::No) };
    let (offset, len) = (r.offset, u64::from(r.length));
    let punch = r.flags & CMD_FLAG_NO_HOLE == 0 && disk.discard == DiscardMode::Unmap;
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let done = len == 0
        || (punch
            && crate::sys::fallocate(f, libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len).is_ok())
        || crate::sys::fallocate(f, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len).is_ok();
    if !done {
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZERO_CHUNK_BYTES);
            let zeroes = aligned(&mut s.buffer, n as usize);
            zeroes.fill(0);
            f.write_all_at(zeroes, at).map_err(|e| io_error(&e))?;
            at += n;
        }
    }
    if disk.range_changes_need_sync() {
        flush(&disk)?;
    }
    after_write(&disk, r)?;
    Ok(Sent::No)
}

/// `base:allocation` from SEEK_DATA/SEEK_HOLE on a regular file; everything is data on a
/// block device, and a null export is all zeroes.
fn block_status(s: &mut Session, r: &Request) -> Outcome {
    if !s.structured || !s.block_status {
        return Err(Refusal(EINVAL, "base:allocation was not negotiated"));
    }
    if r.length == 0 {
        return Err(Refusal(EINVAL, "an empty range"));
    }
    let disk = &s.exposed.disk;
    let size = disk.capacity_bytes();
    if r.offset >= size {
        return Err(Refusal(EINVAL, "beyond the end of the export"));
    }
    let end = size.min(r.offset + u64::from(r.length));
    let most = if r.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
    let extents = match &disk.backend {
        Backend::Null => vec![(end - r.offset, STATE_HOLE | STATE_ZERO)],
        Backend::File { backing, .. } if !backing.is_block_device => {
            file_extents(&backing.file, r.offset, end, size, most)
        }
        _ => vec![(end - r.offset, 0)],
    };
    let mut body = Vec::with_capacity(4 + 8 * extents.len());
    body.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (len, flags) in &extents {
        body.extend_from_slice(&(*len as u32).to_be_bytes());
        body.extend_from_slice(&flags.to_be_bytes());
    }
    let chunk = chunk_header(REPLY_TYPE_BLOCK_STATUS, r.cookie, body.len() as u32);
    s.conn.send(&[&chunk, &body]).map(|()| Sent::Yes).map_err(|_| Refusal(EIO, "reply failed"))
}

/// The extents of `file` from `offset` to `end` (at most `most`): (length, flags). A file
/// system without SEEK_DATA answers all data.
fn file_extents(file: &File, offset: u64, end: u64, size: u64, most: usize) -> Vec<(u64, u32)> {
    use crate::sys::seek_extent;
    let mut extents = Vec::new();
    let mut at = offset;
    while at < end && extents.len() < most {
        let data = match seek_extent(file, at, libc::SEEK_DATA) {
            Ok(d) => d.unwrap_or(size),
            Err(_) => {
                extents.push((end - at, 0));
                break;
            }
        };
        let (next, flags) = if data > at {
            (data, STATE_HOLE | STATE_ZERO)
        } else {
            match seek_extent(file, at, libc::SEEK_HOLE) {
                Ok(h) => (h.unwrap_or(size), 0),
                Err(_) => (end, 0),
            }
        };
        let next = next.clamp(at + 1, end);
        extents.push((next - at, flags));
        at = next;
    }
    extents
}

fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut h = [0u8; SIMPLE_REPLY_BYTES];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// The header of the request's one (and last) structured reply chunk.
fn chunk_header(kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_BYTES] {
    let mut h = [0u8; CHUNK_HEADER_BYTES];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&length.to_be_bytes());
    h
}

fn reply_done(s: &mut Session, r: &Request) -> io::Result<()> {
    if s.structured {
        s.conn.send(&[&chunk_header(REPLY_TYPE_NONE, r.cookie, 0)])
    } else {
        s.conn.send(&[&simple_reply(0, r.cookie)])
    }
}

fn reply_error(s: &mut Session, r: &Request, error: u32, why: &str) -> io::Result<()> {
    if s.structured {
        let chunk = chunk_header(REPLY_TYPE_ERROR, r.cookie, 6 + why.len() as u32);
        let mut body = error.to_be_bytes().to_vec();
        body.extend_from_slice(&(why.len() as u16).to_be_bytes());
        body.extend_from_slice(why.as_bytes());
        s.conn.send(&[&chunk, &body])
    } else {
        s.conn.send(&[&simple_reply(error, r.cookie)])
    }
}
