//! Guest RAM for the crate's own tests: a memfd mapped as one region, and the driver's side
//! of filling it (descriptors, request headers), written once for every test that plays guest.

use std::fs::File;
use std::os::fd::FromRawFd;

use super::{copy_from_guest, copy_to_guest, GuestMemory, MappedRegion};

/// The frontend's virtual address of guest-physical 0 (ring addresses are given in it).
pub const USER_BASE: u64 = 0x7000_0000;

/// `bytes` of guest RAM from guest-physical 0, seen by the frontend at [`USER_BASE`]. The
/// file keeps the memfd for as long as the test holds it.
pub fn guest_ram(bytes: u64) -> (File, GuestMemory) {
    // SAFETY: memfd_create with a valid name; the fd it returns is ours alone.
    let file = unsafe { File::from_raw_fd(libc::memfd_create(c"guest".as_ptr(), 0)) };
    file.set_len(bytes).unwrap();
    let region = MappedRegion::map(&file, 0, 0, bytes, USER_BASE, None).unwrap();
    let mem = GuestMemory::default().with_region(region).unwrap();
    (file, mem)
}

/// Writes `bytes` at guest-physical `gpa` (which must lie in RAM).
pub fn write(mem: &GuestMemory, gpa: u64, bytes: &[u8]) {
    assert!(mem.translate(gpa, bytes.len() as u32, |iov| {
        copy_to_guest(&[iov], 0, bytes);
        true
    }));
}

/// Reads `len` bytes at guest-physical `gpa` (which must lie in RAM).
pub fn read(mem: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    assert!(mem.translate(gpa, len as u32, |iov| {
        copy_from_guest(&[iov], 0, &mut out);
        true
    }));
    out
}

/// One split-ring descriptor as the guest lays it out.
pub fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    raw
}

/// One packed-ring descriptor as the guest lays it out: addr, len, buffer ID, flags.
pub fn packed_descriptor(addr: u64, len: u32, id: u16, flags: u16) -> [u8; 16] {
    let mut raw = descriptor(addr, len, 0, 0);
    raw[12..14].copy_from_slice(&id.to_le_bytes());
    raw[14..16].copy_from_slice(&flags.to_le_bytes());
    raw
}

/// A virtio-blk request header: type, reserved, sector.
pub fn request_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}
