//! The dirty log of a live migration (vhost-user `LOG_SHMFD`, `VHOST_F_LOG_ALL`): a bitmap the
//! frontend shares with us, one bit per 4 KiB page of guest-physical memory, which we set for
//! every page we write while the frontend migrates the guest, so that it sends those pages
//! again.
//!
//! Which writes: data the engine read into guest buffers (the kernel wrote those pages; they
//! are marked when the request completes, before its used entry is published), bounce-buffer
//! copies, GET_ID strings, status bytes (all of them in a request's device-writable buffers),
//! and the used ring (its entries, index, flags and avail_event), which is logged at the ring's
//! own log address (SET_VRING_ADDR's `log_guest_addr`) when its LOG flag is set.
//!
//! Bits are set with atomic OR: the frontend reads and clears the bitmap while we write it.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::memory::{GuestIov, GuestMemory, MappedRegion, MemoryError};

/// Bytes of guest memory one bit stands for (VHOST_LOG_PAGE).
pub const LOG_PAGE_BYTES: u64 = 0x1000;

/// Bytes of bitmap that cover guest-physical addresses below `end`.
pub fn bitmap_bytes_for(end: u64) -> u64 {
    end.div_ceil(LOG_PAGE_BYTES).div_ceil(8)
}

/// The most bitmap a connection may map: the bitmap of its `max-guest-memory`, rounded up
/// to whole 64-bit words (QEMU sizes its log in them). The log is thus inside the
/// connection's own budget, as its guest RAM is, and never more than 1/32768 of it.
pub fn max_log_bytes(max_guest_memory_bytes: u64) -> u64 {
    bitmap_bytes_for(max_guest_memory_bytes).next_multiple_of(8)
}

/// The frontend's dirty bitmap, mapped.
pub struct DirtyLog {
    mapping: MappedRegion,
    bytes: u64,
}

impl DirtyLog {
    /// Maps `mmap_size` bytes of `file` from `mmap_offset` (SET_LOG_BASE), if they are at most
    /// `limit_bytes` ([`max_log_bytes`]); the mapping counts in the daemon-wide budget as
    /// guest RAM does. If the file shrinks under the mapping, the bits land in zeroes and
    /// `hangup` is shut down.
    pub fn map(
        file: &File,
        mmap_offset: u64,
        mmap_size: u64,
        limit_bytes: u64,
        hangup: Option<Arc<OwnedFd>>,
    ) -> Result<DirtyLog, MemoryError> {
        if mmap_size > limit_bytes {
            return Err(MemoryError::LogLimit { log_bytes: mmap_size, limit_bytes });
        }
        let mapping = MappedRegion::map(file, mmap_offset, 0, mmap_size, 0, hangup)?;
        Ok(DirtyLog { mapping, bytes: mmap_size })
    }

    /// Whether the bitmap has a bit for every page below `end`.
    pub fn covers(&self, end: u64) -> bool {
        bitmap_bytes_for(end) <= self.bytes
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Marks the pages of `len` bytes from guest-physical `gpa`. Pages beyond the bitmap are
    /// not marked (the frontend sized it for its memory; covers() is checked beforehand).
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE_BYTES;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_BYTES;
        for page in first..=last {
            let byte = page / 8;
            if byte >= self.bytes {
                return;
            }
            self.byte(byte).fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }

    fn byte(&self, index: u64) -> &AtomicU8 {
        debug_assert!(index < self.bytes);
        // SAFETY: index < bytes, the mapping's length; AtomicU8 has no alignment needs.
        unsafe { &*self.mapping.host().add(index as usize).cast::<AtomicU8>() }
    }

    /// Whether the page holding `gpa` is marked (for tests).
    #[cfg(test)]
    pub fn is_marked(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE_BYTES;
        page / 8 < self.bytes
            && self.byte(page / 8).load(Ordering::Relaxed) & (1 << (page % 8)) != 0
    }
}

/// What one queue logs while its frontend migrates the guest.
pub struct QueueLog {
    pub log: Arc<DirtyLog>,
    /// Where the used ring's writes are logged (SET_VRING_ADDR's log address, with the ring's
    /// LOG flag), and its length; None: the frontend does not want them logged.
    pub used: Option<(u64, u64)>,
}

impl QueueLog {
    /// Marks the pages under a host range the queue wrote (a buffer of guest memory).
    #[inline]
    pub fn mark_buffer(&self, memory: &GuestMemory, iov: &GuestIov) {
        if let Some(gpa) = memory.gpa_of_host(iov.addr()) {
            self.log.mark(gpa, iov.len() as u64);
        }
    }

    /// Marks the whole used ring (a few pages at most): after a publish, and after the ring's
    /// flags or avail_event change.
    #[inline]
    pub fn mark_used_ring(&self) {
        if let Some((addr, len)) = self.used {
            self.log.mark(addr, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtq::testing::guest_ram;

    #[test]
    fn pages_are_marked_bit_by_bit() {
        assert_eq!(bitmap_bytes_for(0), 0);
        assert_eq!(bitmap_bytes_for(1), 1);
        assert_eq!(bitmap_bytes_for(8 * 4096), 1);
        assert_eq!(bitmap_bytes_for(8 * 4096 + 1), 2);
        let (file, _) = guest_ram(4096);
        let log = DirtyLog::map(&file, 0, 4096, 4096, None).unwrap();
        assert!(log.covers(4096 * 8 * 4096));
        assert!(!log.covers(4096 * 8 * 4096 + 1));
        log.mark(4095, 2); // pages 0 and 1
        log.mark(10 * 4096 + 5, 1); // page 10
        let marked: Vec<u64> = (0..64).filter(|p| log.is_marked(p * 4096)).collect();
        assert_eq!(marked, vec![0, 1, 10]);
        // Beyond the bitmap: nothing, and no fault.
        log.mark(u64::MAX - 10, 100);
    }

    #[test]
    fn a_log_is_at_most_the_bitmap_of_max_guest_memory() {
        // 1 TiB of guest memory: 2^28 pages, 32 MiB of bitmap.
        assert_eq!(max_log_bytes(1 << 40), 32 << 20);
        // 16 MiB + 1 byte: 4097 pages, 513 bytes, rounded up to a word.
        assert_eq!(max_log_bytes((16 << 20) + 1), 520);
        let (file, _) = guest_ram(8192);
        let e = DirtyLog::map(&file, 0, 8192, 4096, None).err().expect("a log over its limit");
        assert_eq!(
            e.to_string(),
            "a dirty log of 8192 bytes is over the 4096 bytes of bitmap this export's \
             max-guest-memory needs"
        );
    }
}
