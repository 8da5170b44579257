//! [virtq] The virtqueue engine on guest memory: the only layer that turns guest addresses
//! into host pointers and reads or writes the rings.

pub mod dirty;
pub mod fault;
pub mod inflight;
pub mod memory;
pub mod packed;
pub mod ring;
pub mod split;
#[cfg(test)]
pub(crate) mod testing;

pub use inflight::{InflightError, InflightQueue, InflightRegion, Tracker};
pub use memory::{
    copy_from_guest, copy_to_guest, guest_parts, iov_tables, iovs_aligned, zero_guest,
    zero_guest_range, BounceBuffer, GuestIov, GuestMemory, IovTable, MappedRegion, MemoryError,
};
pub use ring::{Ring, RingFormat, RingSetup};
pub use split::{ChainOutcome, ChainSink, RingAddrs, SplitQueue};
