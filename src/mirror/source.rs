//! What a mirror reads: the export's own image, through blocking calls that may come from
//! several threads at once (the job's copy workers, and I/O threads copying a guest's write
//! again). A file is read through a duplicate of the export's descriptor; an NBD export
//! through a connection of the job's own (the server must let a write that completed on the
//! export's connections be read on another, as servers of one image do); an RBD image through
//! the export's own handle.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::engine::backing;
use crate::engine::nbd::blocking::BlockingNbd;
use crate::engine::rbd::cluster::RbdHandle;

/// A mirror's source, open.
pub enum Source {
    /// An image file or block device: extents found with SEEK_DATA/SEEK_HOLE.
    File(File),
    /// An NBD server's export: extents from block status (`base:allocation`) where the
    /// server has it, else read whole (all-zero pieces still become write-zeroes).
    Nbd(BlockingNbd),
    /// A Ceph RBD image: read whole, as NBD.
    Rbd(Arc<RbdHandle>),
}

impl Source {
    /// Fills `into` from `offset` (within the image).
    pub fn read_at(&self, offset: u64, into: &mut [u8]) -> Result<(), String> {
        match self {
            Source::File(file) => file
                .read_exact_at(into, offset)
                .map_err(|e| format!("reading the source at {offset}: {e}")),
            Source::Nbd(nbd) => nbd.read_at(offset, into),
            Source::Rbd(image) => image.image().0.read_at(offset, into),
        }
    }

    /// The first extent at or after `offset` that may hold data, as (start, end), or None if
    /// only holes are left before `size_bytes`.
    pub fn next_data(&self, offset: u64, size_bytes: u64) -> Result<Option<(u64, u64)>, String> {
        match self {
            Source::File(file) => backing::next_data(file, offset, size_bytes)
                .map_err(|e| format!("looking for data in the source: {e}")),
            Source::Nbd(nbd) if nbd.has_block_status() => nbd_next_data(nbd, offset, size_bytes),
            Source::Nbd(_) | Source::Rbd(_) => {
                Ok((offset < size_bytes).then_some((offset, size_bytes)))
            }
        }
    }
}

/// [`Source::next_data`] by NBD block status: the first run of extents from `offset` that do
/// not read as zeroes (a server may describe less than asked: it is asked again from there).
fn nbd_next_data(
    nbd: &BlockingNbd,
    offset: u64,
    size_bytes: u64,
) -> Result<Option<(u64, u64)>, String> {
    let mut at = offset;
    while at < size_bytes {
        // The length is 32 bits; 1 GiB keeps it aligned.
        let ask = (size_bytes - at).min(1 << 30) as u32;
        let mut start = None;
        for (bytes, zero) in nbd.block_status(at, ask)? {
            match (zero, start) {
                (false, None) => start = Some(at),
                (true, Some(s)) => return Ok(Some((s, at))),
                _ => {}
            }
            at = at.saturating_add(bytes).min(size_bytes);
            if at >= size_bytes {
                break;
            }
        }
        if let Some(s) = start {
            return Ok(Some((s, at)));
        }
    }
    Ok(None)
}
