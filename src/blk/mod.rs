//! [blk] virtio-blk: the device's features, its configuration space, and requests parsed
//! once from a descriptor chain into a validated [`request::Request`].

pub mod config;
pub mod request;

/// Request types (virtio 1.2, 5.2.6).
pub mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const GET_LIFETIME: u32 = 10;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
    pub const SECURE_ERASE: u32 = 14;
}

/// Status byte values the guest sees.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Feature bits (virtio 1.2, 5.2.3 and 6).
pub mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const TOPOLOGY: u64 = 1 << 10;
    pub const CONFIG_WCE: u64 = 1 << 11;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const RING_PACKED: u64 = 1 << 34;
    /// vhost's own bit: the backend logs its writes to guest memory (live migration).
    pub const VHOST_LOG_ALL: u64 = 1 << 26;
    /// vhost-user's own bit: the backend speaks protocol features.
    pub const VHOST_USER_PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Bytes in a virtio-blk sector: the unit of every `sector` field, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Length of the request header (type, reserved, sector).
pub const HEADER_BYTES: usize = 16;
/// Length of one discard / write-zeroes segment.
pub const SEGMENT_BYTES: usize = 16;
/// The most data segments one request may carry (seg_max). Linux and QEMU pair a queue of
/// 256 with 254; a larger value would make every slot's iovec table bigger for no gain.
pub const SEG_MAX: u32 = 254;
/// The most bytes one data segment may hold (size_max).
pub const SIZE_MAX_BYTES: u32 = 1 << 20;
/// Discard and write-zeroes: one segment per request, up to this many sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
