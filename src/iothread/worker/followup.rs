//! Follow-up operations: what a request still needs from the engine after its first one
//! completed. A WRITE_ZEROES the backing refused as a zero range goes again as a hole punch;
//! a DISCARD or WRITE_ZEROES under a write-through contract gets an fdatasync before its ack.
//! Each at most once per request, so nothing loops. A failed fdatasync (a FLUSH's or a
//! follow-up's) is recorded on the disk: later flushes fail (`Disk::flush_failed_with`).

use super::queue::Core;
use crate::blk::request::{Request, RequestError};
use crate::engine::{Engine, IoOp};

/// What a request still needs from the engine after its first operation completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Followup {
    /// WRITE_ZEROES again as a hole punch: the backing refused FALLOC_FL_ZERO_RANGE.
    Punch,
    /// An fdatasync: a DISCARD or WRITE_ZEROES under a write-through contract (O_DSYNC does
    /// not cover fallocate).
    Sync,
}

impl Core {
    /// Looks at an engine result before it becomes the request's outcome: records a failed
    /// sync, and queues a follow-up if the request needs one (true: the request is not done).
    pub(super) fn follow_up(&mut self, tag: u16, result: i32) -> bool {
        let slot = &mut self.slots[tag];
        let request = slot.request.as_ref();
        if result == -libc::EOPNOTSUPP
            && !slot.punched
            && matches!(request, Some(Request::WriteZeroes { unmap: false, .. }))
        {
            // This filesystem (tmpfs, for one) cannot ZERO_RANGE; a punched hole reads back
            // as zeroes too. Remember, and send this one again, once: a backing that refuses
            // both (vfat, ramfs, many FUSE filesystems) fails the request.
            slot.punched = true;
            self.zero_range_supported = false;
            self.followups.push((tag, Followup::Punch));
            return true;
        }
        let syncing = slot.synced || matches!(request, Some(Request::Flush));
        if syncing && result < 0 {
            self.disk.flush_failed_with(-result, &self.stats);
        }
        let range_change =
            matches!(request, Some(Request::Discard { .. } | Request::WriteZeroes { .. }));
        if range_change && result >= 0 && !slot.synced && self.disk.range_changes_need_sync() {
            // Write-through: the range change must be on stable storage before the ack.
            slot.synced = true;
            self.followups.push((tag, Followup::Sync));
            return true;
        }
        false
    }

    /// Sends the follow-up operations that completions asked for (see [`Followup`]).
    pub(super) fn send_followups(&mut self, engine: &mut impl Engine) -> usize {
        let count = self.followups.len();
        while let Some((tag, followup)) = self.followups.pop() {
            let op = match (followup, &self.slots[tag].request) {
                (Followup::Punch, Some(Request::WriteZeroes { offset, bytes, .. })) => {
                    IoOp::WriteZeroes { offset: *offset, bytes: *bytes, unmap: true }
                }
                (Followup::Sync, _) => IoOp::Flush,
                _ => continue,
            };
            // SAFETY: the operation carries no buffers; the tag stays reserved until reaped.
            if let Err(e) = unsafe { engine.queue(tag, op) } {
                self.finish(tag, Err(RequestError::Host(e.raw_os_error().unwrap_or(libc::EIO))));
            }
        }
        count
    }
}
