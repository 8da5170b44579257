//! Where a mirror writes: an image file or block device, or an NBD server's export, opened
//! from the same `image=` values an export takes (`disk::parse_target`). Every call blocks
//! until the target has the data (or said no), and may come from several threads at once.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::engine::backing::{self, Backing};
use crate::engine::nbd::blocking::BlockingNbd;
use crate::engine::rbd::cluster::RbdHandle;
use std::sync::Arc;

/// The largest piece written at once (and the largest buffer of zeroes a target without a
/// way to zero a range is written from).
pub const PIECE_BYTES: usize = 1 << 20;

/// A mirror's target, open.
pub enum Target {
    /// An image file or block device, opened and locked as an export would open it.
    File { backing: Backing, path: PathBuf },
    /// An NBD server's export, through one blocking connection.
    Nbd(BlockingNbd),
    /// A Ceph RBD image, open as an export would open it (the pivot serves this handle).
    Rbd(Arc<RbdHandle>),
}

impl Target {
    /// What it is, for query-jobs and messages.
    pub fn describe(&self) -> String {
        match self {
            Target::File { path, .. } => path.display().to_string(),
            Target::Nbd(nbd) => nbd.spec.to_string(),
            Target::Rbd(image) => format!("rbd:{}", image.image().0.spec.name()),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        match self {
            Target::File { backing, .. } => backing.capacity_bytes,
            Target::Nbd(nbd) => nbd.negotiated.size_bytes,
            Target::Rbd(image) => image.size_bytes().unwrap_or(0),
        }
    }

    /// The alignment its writes need (offsets, lengths, and buffer addresses for O_DIRECT).
    pub fn block_bytes(&self) -> u64 {
        match self {
            Target::File { backing, .. } => {
                u64::from(backing.logical_block_bytes.max(backing.dio_mem_align))
            }
            Target::Nbd(nbd) => u64::from(nbd.negotiated.min_block.max(1)),
            Target::Rbd(_) => 512,
        }
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        match self {
            Target::File { backing, path } => backing
                .file
                .write_all_at(data, offset)
                .map_err(|e| format!("writing {}: {e}", path.display())),
            Target::Nbd(nbd) => nbd.write_at(offset, data),
            Target::Rbd(image) => image.image().0.write_at(offset, data),
        }
    }

    /// Makes `bytes` at `offset` read as zeroes; `zeroes` is a zeroed buffer for targets that
    /// must be written to.
    pub fn write_zeroes(&self, offset: u64, bytes: u64, zeroes: &[u8]) -> Result<(), String> {
        match self {
            Target::File { backing, path } => match backing::zero_range(backing, offset, bytes) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    let mut at = offset;
                    while at < offset + bytes {
                        let n = (offset + bytes - at).min(zeroes.len() as u64);
                        self.write_at(at, &zeroes[..n as usize])?;
                        at += n;
                    }
                    Ok(())
                }
                Err(e) => Err(format!("zeroing {}: {e}", path.display())),
            },
            Target::Nbd(nbd) => nbd.write_zeroes(offset, bytes),
            Target::Rbd(image) => image.image().0.write_zeroes(offset, bytes),
        }
    }

    pub fn flush(&self) -> Result<(), String> {
        match self {
            Target::File { backing, path } => {
                backing.file.sync_data().map_err(|e| format!("flushing {}: {e}", path.display()))
            }
            Target::Nbd(nbd) => nbd.flush(),
            Target::Rbd(image) => image.image().0.flush(),
        }
    }
}
