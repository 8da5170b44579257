//! The null engine: reads return zeroes, writes are discarded, everything completes at once.
//! It measures what the rest of the data path costs.

use std::io;
use std::os::fd::RawFd;

use super::{Engine, IoOp};
use crate::virtq::{zero_guest, GuestIov};

pub struct NullEngine {
    /// Finished operations waiting to be reaped: (tag, result). Preallocated to the queue
    /// size, which bounds the operations in flight.
    done: Vec<(u16, i32)>,
}

impl NullEngine {
    pub fn new(queue_size: u16) -> NullEngine {
        NullEngine { done: Vec::with_capacity(usize::from(queue_size)) }
    }
}

impl Engine for NullEngine {
    unsafe fn queue(&mut self, tag: u16, op: IoOp<'_>) -> io::Result<()> {
        let result = match op {
            IoOp::Read { iov, .. } => {
                zero_guest(iov);
                GuestIov::total_len(iov)
            }
            IoOp::Write { iov, .. } => GuestIov::total_len(iov),
            IoOp::Flush | IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => 0,
        };
        // Requests are at most a few MiB (seg_max x size_max), far below i32::MAX.
        self.done.push((tag, i32::try_from(result).unwrap_or(i32::MAX)));
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, mut on_complete: impl FnMut(u16, i32)) {
        for (tag, result) in self.done.drain(..) {
            on_complete(tag, result);
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
}
