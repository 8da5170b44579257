//! A virtio-blk request, parsed once from a walked descriptor chain.
//!
//! The chain's buffers arrive in a [`ChainBuf`] (device-readable first, then device-writable).
//! [`parse`] reads the header, checks the request against the disk, and returns either a
//! [`Request`] that the engine can execute without further checks, or a [`RequestError`]
//! that maps, exhaustively, to the status byte the guest sees.

use std::fmt;
use std::ops::Range;

use super::{
    req_type, status, HEADER_BYTES, ID_BYTES, MAX_DISCARD_SECTORS, SECTOR_SIZE, SEGMENT_BYTES,
    SIZE_MAX_BYTES,
};
use crate::virtq::{copy_from_guest, ChainOutcome, ChainSink, GuestIov};

/// The buffers of one descriptor chain, in chain order. Preallocated per slot.
pub struct ChainBuf {
    iov: Box<[GuestIov]>,
    len: usize,
    /// Index of the first device-writable buffer (== len while there is none).
    writable_from: usize,
}

impl ChainBuf {
    pub fn with_capacity(capacity: usize) -> ChainBuf {
        ChainBuf {
            iov: vec![GuestIov::EMPTY; capacity].into_boxed_slice(),
            len: 0,
            writable_from: 0,
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.writable_from = 0;
    }

    pub fn iovs(&self, range: Range<usize>) -> &[GuestIov] {
        &self.iov[range]
    }

    /// The device-writable buffers (data in, status): what a request may write into.
    pub fn writable(&self) -> &[GuestIov] {
        &self.iov[self.writable_from.min(self.len)..self.len]
    }

    fn readable(&self) -> &[GuestIov] {
        &self.iov[..self.writable_from]
    }
}

impl ChainSink for ChainBuf {
    fn push(&mut self, iov: GuestIov, writable: bool) -> bool {
        if self.len == self.iov.len() {
            return false;
        }
        self.iov[self.len] = iov;
        self.len += 1;
        if !writable {
            // The walker rejects readable-after-writable chains, so this only moves while
            // no writable buffer has been seen.
            self.writable_from = self.len;
        }
        true
    }
}

/// A validated request: offsets and lengths are inside the disk, buffers inside guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `bytes` at `offset` into the chain's buffers `data`.
    Read {
        offset: u64,
        data: Range<usize>,
        bytes: u64,
    },
    /// Write `bytes` at `offset` from the chain's buffers `data`.
    Write {
        offset: u64,
        data: Range<usize>,
        bytes: u64,
    },
    Flush,
    /// Write the serial into the chain's buffers `data` (at most `bytes` of them).
    GetId {
        data: Range<usize>,
        bytes: u64,
    },
    Discard {
        offset: u64,
        bytes: u64,
    },
    WriteZeroes {
        offset: u64,
        bytes: u64,
        unmap: bool,
    },
}

/// Why a request fails. The guest sees only `status()`; the operator sees the Display text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// Fewer than 16 device-readable bytes for the header.
    HeaderTooShort,
    /// No device-writable byte at the end of the chain for the status.
    NoStatusByte,
    /// A buffer lay outside guest memory, or the chain had more buffers than a slot holds
    /// (seg_max data segments, plus header and status).
    BadBuffers,
    /// A buffer longer than the size_max the device advertises.
    SegmentTooLong(u32),
    /// A request type we do not implement.
    UnsupportedType(u32),
    /// Data length not a multiple of 512 bytes.
    NotSectorMultiple,
    /// Reaches past the end of the disk.
    OutOfRange,
    /// A read or write not aligned to the logical block size the guest was given.
    Misaligned,
    /// A write, discard or write-zeroes on a read-only export.
    ReadOnly,
    /// Discard / write-zeroes payload not one well-formed segment.
    BadSegments,
    /// Discard / write-zeroes with more segments than the device offers (1): something this
    /// device does not do, as QEMU answers it.
    TooManySegments(u64),
    /// Discard with the unmap flag, or a segment flag we do not know.
    UnsupportedFlags,
    /// The host failed the I/O (positive errno).
    Host(i32),
    /// The host transferred fewer bytes than asked.
    ShortTransfer,
    /// Guest buffers O_DIRECT cannot take, and no bounce memory for them: more than the
    /// queue's budget for one request, or the daemon's budget spent.
    BounceUnavailable,
    /// A FLUSH after an earlier one failed: the data it should cover may be gone.
    FlushFailedBefore,
}

impl RequestError {
    /// The status byte for this error. No wildcard: a new variant must choose its byte.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_)
            | RequestError::UnsupportedFlags
            | RequestError::TooManySegments(_) => status::UNSUPP,
            RequestError::HeaderTooShort
            | RequestError::NoStatusByte
            | RequestError::BadBuffers
            | RequestError::SegmentTooLong(_)
            | RequestError::BounceUnavailable
            | RequestError::FlushFailedBefore
            | RequestError::NotSectorMultiple
            | RequestError::OutOfRange
            | RequestError::Misaligned
            | RequestError::ReadOnly
            | RequestError::BadSegments
            | RequestError::Host(_)
            | RequestError::ShortTransfer => status::IOERR,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::HeaderTooShort => write!(f, "request header shorter than 16 bytes"),
            RequestError::NoStatusByte => write!(f, "chain has no writable status byte"),
            RequestError::BadBuffers => {
                write!(f, "buffer outside guest memory or too many segments")
            }
            RequestError::SegmentTooLong(n) => {
                write!(f, "a {n}-byte buffer, over size_max ({SIZE_MAX_BYTES})")
            }
            RequestError::BounceUnavailable => write!(
                f,
                "misaligned buffers need a bounce buffer larger than the bounce memory left"
            ),
            RequestError::FlushFailedBefore => write!(
                f,
                "an earlier flush failed, so written data may be lost; flushes fail until the \
                 export is reopened"
            ),
            RequestError::UnsupportedType(t) => write!(f, "unsupported request type {t}"),
            RequestError::NotSectorMultiple => write!(f, "data length not a multiple of 512"),
            RequestError::OutOfRange => write!(f, "request beyond the end of the disk"),
            RequestError::Misaligned => {
                write!(f, "read or write not aligned to the logical block size")
            }
            RequestError::ReadOnly => write!(f, "write to a read-only export"),
            RequestError::BadSegments => write!(f, "malformed discard/write-zeroes segment"),
            RequestError::TooManySegments(n) => {
                write!(f, "{n} discard/write-zeroes segments; the device takes 1")
            }
            RequestError::UnsupportedFlags => write!(f, "unsupported segment flags"),
            RequestError::Host(errno) => {
                write!(f, "host I/O error: {}", std::io::Error::from_raw_os_error(*errno))
            }
            RequestError::ShortTransfer => write!(f, "short transfer from the host"),
        }
    }
}

/// What a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct DiskLimits {
    pub capacity_bytes: u64,
    pub readonly: bool,
    /// Reads and writes must start and end on this boundary (the blk_size the guest sees).
    pub logical_block_bytes: u64,
}

/// The parse result: the request, or an error, with the status byte to answer through.
pub struct Parsed {
    pub result: Result<Request, RequestError>,
    /// The header's request type, when the header could be read (also for requests that
    /// fail, so that their errors keep their kind).
    pub req_type: Option<u32>,
    /// Where the status byte goes; `None` only for `NoStatusByte`.
    pub status: Option<GuestIov>,
}

/// Checks that `[offset, offset + bytes)` lies on the disk; returns the byte offset.
fn checked_offset(sector: u64, bytes: u64, limits: &DiskLimits) -> Result<u64, RequestError> {
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(RequestError::OutOfRange)?;
    let end = offset.checked_add(bytes).ok_or(RequestError::OutOfRange)?;
    if end > limits.capacity_bytes {
        return Err(RequestError::OutOfRange);
    }
    Ok(offset)
}

/// Like `checked_offset`, for reads and writes, which must also fall on logical blocks.
fn checked_data_offset(sector: u64, bytes: u64, limits: &DiskLimits) -> Result<u64, RequestError> {
    let offset = checked_offset(sector, bytes, limits)?;
    let block = limits.logical_block_bytes.max(1);
    if !offset.is_multiple_of(block) || !bytes.is_multiple_of(block) {
        return Err(RequestError::Misaligned);
    }
    Ok(offset)
}

/// Parses the walked chain in `chain` (trimming its status byte and header in place).
pub fn parse(chain: &mut ChainBuf, outcome: ChainOutcome, limits: &DiskLimits) -> Parsed {
    let status = outcome.tail;
    if status.is_none() {
        return Parsed { result: Err(RequestError::NoStatusByte), req_type: None, status };
    }
    if outcome.unusable {
        return Parsed { result: Err(RequestError::BadBuffers), req_type: None, status };
    }
    // size_max bounds every buffer, and the slot's iovec table bounds their number (seg_max):
    // together they bound what one request may move, however its descriptors overlap.
    if outcome.longest_bytes > SIZE_MAX_BYTES {
        let result = Err(RequestError::SegmentTooLong(outcome.longest_bytes));
        return Parsed { result, req_type: None, status };
    }
    let mut req_type = None;
    let result = parse_usable(chain, limits, &mut req_type);
    Parsed { result, req_type, status }
}

fn parse_usable(
    chain: &mut ChainBuf,
    limits: &DiskLimits,
    req_type_seen: &mut Option<u32>,
) -> Result<Request, RequestError> {
    // The status byte is the chain's last byte, which is writable (the walker checked).
    // Take it off the buffers so that only data remains.
    if chain.len > chain.writable_from {
        let last = chain.len - 1;
        chain.iov[last].truncate_end(1);
        if chain.iov[last].is_empty() {
            chain.len -= 1;
        }
    }

    let mut header = [0u8; HEADER_BYTES];
    if copy_from_guest(chain.readable(), 0, &mut header) < HEADER_BYTES {
        return Err(RequestError::HeaderTooShort);
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    *req_type_seen = Some(kind);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());

    // Drop the header from the front of the readable buffers; what follows is payload.
    let mut payload_from = 0;
    let mut skip = HEADER_BYTES;
    while skip > 0 && payload_from < chain.writable_from {
        let iov = &mut chain.iov[payload_from];
        let n = skip.min(iov.len());
        iov.advance(n);
        skip -= n;
        if iov.is_empty() {
            payload_from += 1;
        }
    }
    let readable_payload = payload_from..chain.writable_from;
    let writable_data = chain.writable_from..chain.len;

    match kind {
        req_type::IN => {
            let bytes = GuestIov::total_len(&chain.iov[writable_data.clone()]);
            if !bytes.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::NotSectorMultiple);
            }
            let offset = checked_data_offset(sector, bytes, limits)?;
            Ok(Request::Read { offset, data: writable_data, bytes })
        }
        req_type::OUT => {
            if limits.readonly {
                return Err(RequestError::ReadOnly);
            }
            let bytes = GuestIov::total_len(&chain.iov[readable_payload.clone()]);
            if !bytes.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::NotSectorMultiple);
            }
            let offset = checked_data_offset(sector, bytes, limits)?;
            Ok(Request::Write { offset, data: readable_payload, bytes })
        }
        req_type::FLUSH => Ok(Request::Flush),
        req_type::GET_ID => {
            let bytes = GuestIov::total_len(&chain.iov[writable_data.clone()]).min(ID_BYTES as u64);
            Ok(Request::GetId { data: writable_data, bytes })
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            if limits.readonly {
                return Err(RequestError::ReadOnly);
            }
            let payload = &chain.iov[readable_payload];
            // We advertise max_discard_seg = max_write_zeroes_seg = 1. More whole segments
            // ask for what the device does not do (UNSUPP, as QEMU answers); a payload that
            // is not whole segments is malformed (IOERR).
            let payload_bytes = GuestIov::total_len(payload);
            if payload_bytes == 0 || !payload_bytes.is_multiple_of(SEGMENT_BYTES as u64) {
                return Err(RequestError::BadSegments);
            }
            if payload_bytes > SEGMENT_BYTES as u64 {
                return Err(RequestError::TooManySegments(payload_bytes / SEGMENT_BYTES as u64));
            }
            let mut seg = [0u8; SEGMENT_BYTES];
            copy_from_guest(payload, 0, &mut seg);
            let seg_sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            const UNMAP: u32 = 1;
            let unmap = flags & UNMAP != 0;
            if flags & !UNMAP != 0 || (kind == req_type::DISCARD && unmap) {
                return Err(RequestError::UnsupportedFlags);
            }
            if num_sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::BadSegments);
            }
            let bytes = u64::from(num_sectors) * SECTOR_SIZE;
            let offset = checked_offset(seg_sector, bytes, limits)?;
            if kind == req_type::DISCARD {
                Ok(Request::Discard { offset, bytes })
            } else {
                Ok(Request::WriteZeroes { offset, bytes, unmap })
            }
        }
        req_type::GET_LIFETIME | req_type::SECURE_ERASE => Err(RequestError::UnsupportedType(kind)),
        other => Err(RequestError::UnsupportedType(other)),
    }
}
