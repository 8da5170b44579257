//! The virtio-blk configuration space (virtio 1.2, 5.2.4), built from an export's settings.

use super::{MAX_DISCARD_SECTORS, SECTOR_SIZE, SEG_MAX, SIZE_MAX_BYTES};

/// Byte offsets of the fields we fill in.
pub mod offset {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const ALIGNMENT_OFFSET: usize = 25;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// Size of the config space we answer for. Fields past the ones we fill (secure erase,
/// zoned) belong to features we do not offer and read as zero.
pub const CONFIG_SPACE_BYTES: usize = 256;

/// What the config space is built from.
#[derive(Clone, Copy, Debug)]
pub struct ConfigInputs {
    pub capacity_bytes: u64,
    /// Logical block size the guest should use (512 or 4096).
    pub logical_block_bytes: u32,
    /// Physical block size (>= logical).
    pub physical_block_bytes: u32,
    pub num_queues: u16,
    pub writeback: bool,
}

/// Renders the config space, little-endian as virtio 1.x requires.
pub fn config_space(inputs: &ConfigInputs) -> [u8; CONFIG_SPACE_BYTES] {
    let mut c = [0u8; CONFIG_SPACE_BYTES];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(offset::CAPACITY, &(inputs.capacity_bytes / SECTOR_SIZE).to_le_bytes());
    put(offset::SIZE_MAX, &SIZE_MAX_BYTES.to_le_bytes());
    put(offset::SEG_MAX, &SEG_MAX.to_le_bytes());
    put(offset::BLK_SIZE, &inputs.logical_block_bytes.to_le_bytes());
    let ratio = (inputs.physical_block_bytes / inputs.logical_block_bytes.max(1)).max(1);
    put(offset::PHYSICAL_BLOCK_EXP, &[ratio.trailing_zeros() as u8]);
    put(offset::ALIGNMENT_OFFSET, &[0]);
    // min_io_size is in logical blocks; opt_io_size 0 means "no preference".
    put(offset::MIN_IO_SIZE, &(ratio as u16).to_le_bytes());
    put(offset::OPT_IO_SIZE, &0u32.to_le_bytes());
    put(offset::WRITEBACK, &[u8::from(inputs.writeback)]);
    put(offset::NUM_QUEUES, &inputs.num_queues.to_le_bytes());
    let sectors_per_block = inputs.logical_block_bytes / SECTOR_SIZE as u32;
    put(offset::MAX_DISCARD_SECTORS, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(offset::MAX_DISCARD_SEG, &1u32.to_le_bytes());
    put(offset::DISCARD_SECTOR_ALIGNMENT, &sectors_per_block.max(1).to_le_bytes());
    put(offset::MAX_WRITE_ZEROES_SECTORS, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(offset::MAX_WRITE_ZEROES_SEG, &1u32.to_le_bytes());
    put(offset::WRITE_ZEROES_MAY_UNMAP, &[1]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_land_where_the_spec_puts_them() {
        let c = config_space(&ConfigInputs {
            capacity_bytes: 1 << 30,
            logical_block_bytes: 512,
            physical_block_bytes: 4096,
            num_queues: 4,
            writeback: true,
        });
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 * 1024 * 1024);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3, "4096 / 512 = 2^3");
        assert_eq!(u16::from_le_bytes([c[26], c[27]]), 8);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 1);
        assert_eq!(c[56], 1);
        assert!(c[60..].iter().all(|&b| b == 0));
    }
}
