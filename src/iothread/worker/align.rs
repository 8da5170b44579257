//! The O_DIRECT alignment path of an I/O thread: bounce buffers for guest buffers O_DIRECT
//! would refuse, and read-modify-write for writes off the backing's blocks (512e). See
//! "O_DIRECT alignment" in ARCHITECTURE.md.

use std::io;
use std::os::fd::AsRawFd;

use super::queue::Core;
use crate::blk::request::{Request, RequestError};
use crate::virtq::{iovs_aligned, GuestIov};

/// A slot keeps a bounce buffer this small for its next misaligned request; larger ones are
/// freed when their request is done, so a burst of big ones does not pin memory.
pub(super) const BOUNCE_KEEP_BYTES: usize = 64 << 10;

/// Bounce memory one queue may have in flight. A request that would go over waits (parked,
/// see below) for earlier bounced requests to finish; one larger than this alone gets IOERR
/// (a guest whose driver aligns its buffers, as Linux's does, never bounces at all).
const BOUNCE_BUDGET_BYTES: usize = 64 << 20;

/// What the alignment path makes of a read or write.
pub(super) enum Aligned {
    /// Go ahead: as it is, or through the slot's bounce buffer (now prepared).
    Go,
    /// The request is done (a read-modify-write) or failed.
    Done(Result<u32, RequestError>),
    /// It must wait for requests of this queue in flight (bounce memory, or a
    /// read-modify-write that needs the queue to itself). The queue parks it and takes no new
    /// requests until it went; the thread's other queues are served meanwhile.
    Wait,
}

impl Core {
    /// Makes a read or write fit what O_DIRECT takes: a request off the backing's blocks goes
    /// through whole blocks in a bounce buffer (a write by read-modify-write, answered here),
    /// one whose guest buffers are off the backing's memory alignment through a bounce buffer
    /// of its own size.
    pub(super) fn align(&mut self, tag: u16, req: &Request) -> Aligned {
        let (Request::Read { offset, data, bytes } | Request::Write { offset, data, bytes }) = req
        else {
            return Aligned::Go;
        };
        let (offset, bytes, write) = (*offset, *bytes, matches!(req, Request::Write { .. }));
        let block = self.disk.rmw_block_bytes;
        let guest = self.slots[tag].chain.iovs(data.clone());
        let bounced = if bytes > 0 && block > 0 && (offset | bytes) % block != 0 {
            // Off the backing's blocks: do whole blocks through a bounce buffer.
            let start = offset / block * block;
            let len = (offset + bytes).next_multiple_of(block) - start;
            let skip = (offset - start) as usize;
            if write {
                return self.read_modify_write(tag, start, len, skip, data);
            }
            self.prepare_bounce(tag, start, len, skip)
        } else if bytes > 0 && !iovs_aligned(guest, self.disk.dio_mem_align) {
            self.prepare_bounce(tag, offset, bytes, 0).inspect(|&ready| {
                if ready && write {
                    let slot = &mut self.slots[tag];
                    slot.bounce.fill_from(0, slot.chain.iovs(data.clone()));
                }
            })
        } else {
            Ok(true)
        };
        match bounced {
            Ok(true) => Aligned::Go,
            Ok(false) => Aligned::Wait,
            Err(e) => Aligned::Done(Err(e)),
        }
    }

    /// A bounced read's data goes to the guest's buffers once the engine has read it.
    pub(super) fn copy_out_bounce(&mut self, tag: u16, outcome: &Result<u32, RequestError>) {
        let slot = &mut self.slots[tag];
        if let (true, Ok(n), Some(Request::Read { data, .. })) =
            (slot.bounced, outcome, &slot.request)
        {
            slot.bounce.copy_out(slot.bounce_skip, *n as usize, slot.chain.iovs(data.clone()));
        }
    }

    /// Gives a read or write that O_DIRECT would refuse as it is (guest buffers off the
    /// backing's memory alignment, or an offset off its blocks) an aligned buffer of its own
    /// for `bytes` on the disk from `offset`, the guest's data starting `skip` bytes in.
    /// `Ok(false)`: not now, the queue's bounce budget (or the daemon's) is in use by its
    /// requests in flight. A read's data is copied out in `complete`.
    fn prepare_bounce(
        &mut self,
        tag: u16,
        offset: u64,
        bytes: u64,
        skip: usize,
    ) -> Result<bool, RequestError> {
        let len = usize::try_from(bytes).map_err(|_| RequestError::BounceUnavailable)?;
        if len > BOUNCE_BUDGET_BYTES {
            return Err(RequestError::BounceUnavailable);
        }
        if self.bounce_bytes + len > BOUNCE_BUDGET_BYTES {
            return Ok(false);
        }
        if !self.slots[tag].bounce.prepare(len) {
            // The daemon's bounce budget is spent: wait for this queue's own bounced requests
            // (their buffers go back to it); with none, the budget is other queues' and this
            // request fails.
            return if self.bounce_bytes > 0 {
                Ok(false)
            } else {
                Err(RequestError::BounceUnavailable)
            };
        }
        let slot = &mut self.slots[tag];
        slot.bounced = true;
        slot.bounce_offset = offset;
        slot.bounce_skip = skip;
        self.bounce_bytes += len;
        self.stats.counters.bounce_buffers.add(1);
        Ok(true)
    }

    /// A write off the backing's blocks (the guest was given smaller ones): reads the whole
    /// blocks `[start, start + len)`, patches the guest's data in at `skip`, writes them back,
    /// synchronously. No other write may land on those blocks in between, and none can: the
    /// export has one queue (Disk::open insists) and this waits (parked) until nothing else
    /// is in flight on it.
    fn read_modify_write(
        &mut self,
        tag: u16,
        start: u64,
        len: u64,
        skip: usize,
        data: &std::ops::Range<usize>,
    ) -> Aligned {
        if self.slots.in_flight() > 1 {
            return Aligned::Wait;
        }
        match self.prepare_bounce(tag, start, len, skip) {
            Ok(true) => Aligned::Done(self.patch_blocks(tag, start, len, skip, data)),
            Ok(false) => Aligned::Wait,
            Err(e) => Aligned::Done(Err(e)),
        }
    }

    /// The read, patch and write of a read-modify-write, on the slot's prepared bounce buffer.
    fn patch_blocks(
        &mut self,
        tag: u16,
        start: u64,
        len: u64,
        skip: usize,
        data: &std::ops::Range<usize>,
    ) -> Result<u32, RequestError> {
        let fd =
            self.disk.backing().map(|b| b.file.as_raw_fd()).ok_or(RequestError::Host(libc::EIO))?;
        let flags = if self.disk.write_needs_dsync() { libc::RWF_DSYNC } else { 0 };
        let slot = &mut self.slots[tag];
        let whole = |n: isize| match n {
            n if n < 0 => Err(RequestError::Host(
                io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO),
            )),
            n if n as u64 != len => Err(RequestError::ShortTransfer),
            _ => Ok(()),
        };
        let iov = GuestIov::as_iovec_ptr(slot.bounce.iovs());
        // SAFETY: one iovec describing the slot's bounce buffer, which is allocated and not
        // otherwise in use for the duration of the call; the fd is the open backing.
        whole(unsafe { libc::preadv(fd, iov, 1, start as libc::off_t) })?;
        slot.bounce.fill_from(skip, slot.chain.iovs(data.clone()));
        let iov = GuestIov::as_iovec_ptr(slot.bounce.iovs());
        // SAFETY: as for the preadv above.
        whole(unsafe { libc::pwritev2(fd, iov, 1, start as libc::off_t, flags) })?;
        Ok(0)
    }
}
