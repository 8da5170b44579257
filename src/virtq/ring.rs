//! One virtqueue whatever its layout: the I/O thread drives a [`Ring`] and never looks at
//! which format the frontend negotiated (VIRTIO_F_RING_PACKED). An enum rather than a trait
//! object: one predictable branch per call, inlined, and no allocation.

use super::memory::GuestMemory;
use super::packed::{self, PackedQueue};
use super::split::{self, ChainOutcome, ChainSink, QueueError, RingAddrs, SplitQueue};

/// The two virtqueue layouts of virtio 1.1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RingFormat {
    #[default]
    Split,
    Packed,
}

impl RingFormat {
    pub fn name(self) -> &'static str {
        match self {
            RingFormat::Split => "split",
            RingFormat::Packed => "packed",
        }
    }

    /// Bytes of the area the device writes besides buffers and the descriptor ring, from
    /// the used address on: the split ring's used ring, the packed ring's device event area.
    pub fn used_area_bytes(self, size: u16) -> u64 {
        match self {
            RingFormat::Split => split::used_ring_bytes(size),
            RingFormat::Packed => packed::EVENT_AREA_BYTES,
        }
    }
}

/// How a queue is laid out and where it starts, as the frontend set it up.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingSetup {
    pub addrs: RingAddrs,
    pub size: u16,
    /// VRING_BASE: the next avail index (split), or both positions with their wrap counters
    /// (packed: see [`packed::split_base`]).
    pub base: u32,
    pub format: RingFormat,
    pub event_idx: bool,
    pub indirect: bool,
}

/// A virtqueue being served by one I/O thread.
pub enum Ring {
    Split(SplitQueue),
    Packed(PackedQueue),
}

impl Ring {
    /// Validates the rings in guest memory and starts serving them, walking chains of at
    /// most `max_chain_len` buffers (the serving thread's bound, not the frontend's).
    pub fn new(mem: &GuestMemory, s: &RingSetup, max_chain_len: usize) -> Result<Ring, QueueError> {
        Ok(match s.format {
            RingFormat::Split => Ring::Split(SplitQueue::new(
                mem,
                s.addrs,
                s.size,
                s.base as u16,
                s.event_idx,
                s.indirect,
                max_chain_len,
            )?),
            RingFormat::Packed => Ring::Packed(PackedQueue::new(
                mem,
                s.addrs,
                s.size,
                s.base,
                s.event_idx,
                s.indirect,
                max_chain_len,
            )?),
        })
    }

    pub fn format(&self) -> RingFormat {
        match self {
            Ring::Split(_) => RingFormat::Split,
            Ring::Packed(_) => RingFormat::Packed,
        }
    }

    /// How many new requests the ring holds (fails if the guest broke the split ring's index).
    #[inline]
    pub fn avail_count(&mut self) -> Result<u16, QueueError> {
        match self {
            Ring::Split(q) => q.avail_count(),
            Ring::Packed(q) => Ok(q.avail_count()),
        }
    }

    /// Takes the next request and walks its chain into `sink`: its head (split) or buffer ID
    /// (packed), the tag its used element carries, and what the walk found.
    #[inline]
    pub fn pop(
        &mut self,
        mem: &GuestMemory,
        sink: &mut impl ChainSink,
    ) -> Result<Option<(u16, ChainOutcome)>, QueueError> {
        match self {
            Ring::Split(q) => {
                let Some(head) = q.pop_head()? else { return Ok(None) };
                let outcome = q.walk_chain(mem, head, sink).map_err(QueueError::Chain)?;
                Ok(Some((head, outcome)))
            }
            Ring::Packed(q) => q.pop(mem, sink),
        }
    }

    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        match self {
            Ring::Split(q) => q.push_used(head, len),
            Ring::Packed(q) => q.push_used(head, len),
        }
    }

    #[inline]
    pub fn publish_used(&mut self) {
        match self {
            Ring::Split(q) => q.publish_used(),
            Ring::Packed(q) => q.publish_used(),
        }
    }

    #[inline]
    pub fn needs_notification(&mut self) -> bool {
        match self {
            Ring::Split(q) => q.needs_notification(),
            Ring::Packed(q) => q.needs_notification(),
        }
    }

    #[inline]
    pub fn disable_notifications(&mut self) {
        match self {
            Ring::Split(q) => q.disable_notifications(),
            Ring::Packed(q) => q.disable_notifications(),
        }
    }

    #[inline]
    pub fn enable_notifications(&mut self) -> bool {
        match self {
            Ring::Split(q) => q.enable_notifications(),
            Ring::Packed(q) => q.enable_notifications(),
        }
    }

    /// The used index as published (split), or the next used position with its wrap
    /// counter in bit 15 (packed): what the inflight region records.
    pub fn used_index(&self) -> u16 {
        match self {
            Ring::Split(q) => q.used_index(),
            Ring::Packed(q) => q.next_used().bits(),
        }
    }

    /// The state GET_VRING_BASE hands back when the queue stops.
    pub fn base(&self) -> u32 {
        match self {
            Ring::Split(q) => u32::from(q.next_avail()),
            Ring::Packed(q) => q.base(),
        }
    }

    /// The descriptor ring's host range if the device writes it (packed), for the dirty log.
    pub fn device_written_ring(&self) -> Option<(usize, u64)> {
        match self {
            Ring::Split(_) => None,
            Ring::Packed(q) => Some(q.ring_host()),
        }
    }
}
