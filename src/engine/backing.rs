//! Opening what an export serves: a raw image file or a host block device, with the flags its
//! cache mode asks for, and learning its size and block sizes.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::blk::SECTOR_SIZE;

/// The cache modes of DESIGN.md, with the names QEMU and libvirt use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT; the guest sees a write cache; FLUSH = fdatasync.
    None,
    /// O_DIRECT | O_DSYNC; no write cache; FLUSH has nothing to do.
    DirectSync,
    /// Page cache; the guest sees a write cache; FLUSH = fdatasync.
    Writeback,
    /// Page cache with O_DSYNC; no write cache; FLUSH has nothing to do.
    Writethrough,
    /// Page cache; FLUSH is ignored: a host crash may lose acknowledged data.
    Unsafe,
}

impl CacheMode {
    pub const NAMES: &'static str = "none, directsync, writeback, writethrough, unsafe";

    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    pub fn dsync(self) -> bool {
        matches!(self, CacheMode::DirectSync | CacheMode::Writethrough)
    }

    /// Whether the guest sees a volatile write cache (the WCE bit).
    pub fn write_cache(self) -> bool {
        !self.dsync()
    }

    /// Whether FLUSH must reach the backing (fdatasync) before it is acknowledged.
    pub fn flush_syncs(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Writeback)
    }
}

impl FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => CacheMode::None,
            "directsync" => CacheMode::DirectSync,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "unsafe" => CacheMode::Unsafe,
            other => return Err(format!("unknown cache mode '{other}' (one of {})", Self::NAMES)),
        })
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::None => "none",
            CacheMode::DirectSync => "directsync",
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Unsafe => "unsafe",
        })
    }
}

/// Why an image could not be opened. Each names the path and the problem in one line.
#[derive(Debug)]
pub enum OpenError {
    Missing(PathBuf),
    NotFileOrDevice(PathBuf),
    Empty(PathBuf),
    NotSectorMultiple(PathBuf, u64),
    NoDirectIo(PathBuf),
    Locked(PathBuf, String),
    BlockSize(PathBuf, String),
    Io(PathBuf, io::Error),
    /// A network backend's server refused or failed (the message names it).
    Remote(String),
    /// The export's settings cannot be met as given (the message says why).
    Config(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Missing(p) => write!(f, "image {} does not exist", p.display()),
            OpenError::NotFileOrDevice(p) => {
                write!(f, "image {} is neither a regular file nor a block device", p.display())
            }
            OpenError::Empty(p) => write!(f, "image {} is empty", p.display()),
            OpenError::NotSectorMultiple(p, size) => write!(
                f,
                "image {} is {size} bytes, not a multiple of 512",
                p.display()
            ),
            OpenError::NoDirectIo(p) => write!(
                f,
                "image {} is on a filesystem without O_DIRECT; use cache=writeback or cache=writethrough",
                p.display()
            ),
            OpenError::Locked(p, why) | OpenError::BlockSize(p, why) => {
                write!(f, "image {}: {why}", p.display())
            }
            OpenError::Io(p, e) => write!(f, "cannot open image {}: {e}", p.display()),
            OpenError::Remote(why) | OpenError::Config(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for OpenError {}

/// An opened image or block device.
pub struct Backing {
    pub file: File,
    pub capacity_bytes: u64,
    pub logical_block_bytes: u32,
    pub physical_block_bytes: u32,
    /// What O_DIRECT needs of buffer addresses and lengths (1: anything goes, as without
    /// O_DIRECT). Guest buffers that miss it go through a bounce buffer.
    pub dio_mem_align: u32,
    pub is_block_device: bool,
    /// A regular file on tmpfs: the io_uring engine does its small reads and writes on the
    /// I/O thread (`engine::uring`). Not a device node: devtmpfs says tmpfs too.
    pub on_tmpfs: bool,
}

// Block-device ioctls (linux/fs.h).
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn ioctl_value<T: Default>(file: &File, request: libc::c_ulong) -> io::Result<T> {
    let mut value = T::default();
    // SAFETY: each request used here writes exactly one value of the type its caller names
    // (int for BLKSSZGET/BLKPBSZGET, u64 for BLKGETSIZE64) through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut value as *mut T) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// What O_DIRECT needs on this file or device, from statx(STATX_DIOALIGN): the alignment of
/// buffer addresses and lengths, and of file offsets.
fn dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx only writes into the buffer we pass; all-zero is a valid statx value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd, an empty path with AT_EMPTY_PATH, and a buffer of the right type.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0)
        .then_some((stx.stx_dio_mem_align.max(1), stx.stx_dio_offset_align))
}

fn clamp_block(bytes: u32) -> u32 {
    bytes.clamp(SECTOR_SIZE as u32, 4096).next_power_of_two()
}

impl Backing {
    /// The current size of a block device.
    pub fn device_size(&self) -> io::Result<u64> {
        ioctl_value(&self.file, BLKGETSIZE64)
    }

    /// Opens `path` for an export. Never creates or truncates anything.
    pub fn open(
        path: &Path,
        readonly: bool,
        cache: CacheMode,
        force_share: bool,
        incoming: bool,
    ) -> Result<Backing, OpenError> {
        // Open first, then check what was opened: checking the path and then opening it
        // would let a FIFO (or anything else) be swapped in between. O_NONBLOCK so that the
        // open itself never blocks (a FIFO with no writer would), cleared once we know it is
        // a file or a block device. O_DIRECT is set then too (a FIFO would refuse it at
        // open, which would misname the problem).
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;
        if cache.dsync() {
            flags |= libc::O_DSYNC;
        }
        let file =
            OpenOptions::new().read(true).write(!readonly).custom_flags(flags).open(path).map_err(
                |e| match e.raw_os_error() {
                    Some(libc::ENOENT) => OpenError::Missing(path.into()),
                    Some(libc::EISDIR | libc::ENXIO) => OpenError::NotFileOrDevice(path.into()),
                    _ => OpenError::Io(path.into(), e),
                },
            )?;
        let meta = file.metadata().map_err(|e| OpenError::Io(path.into(), e))?;
        let is_block_device = meta.file_type().is_block_device();
        if !meta.is_file() && !is_block_device {
            return Err(OpenError::NotFileOrDevice(path.into()));
        }
        let on_tmpfs = regular_on_tmpfs(&file, &meta);
        // Back to blocking I/O for the engines that expect it (threads, read-modify-write),
        // and O_DIRECT for the cache modes that bypass the page cache.
        let direct = if cache.direct() { libc::O_DIRECT } else { 0 };
        crate::sys::set_status_flags(file.as_raw_fd(), direct, libc::O_NONBLOCK).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) && cache.direct() {
                OpenError::NoDirectIo(path.into())
            } else {
                OpenError::Io(path.into(), e)
            }
        })?;
        // A migration's destination writes only once its guest arrives (Disk::activate).
        if incoming && !readonly && !force_share {
            super::lock::lock_inactive(&file)
        } else {
            super::lock::lock_image(&file, readonly, force_share)
        }
        .map_err(|why| OpenError::Locked(path.into(), why))?;
        // Without statx's answer, assume what every Linux block device accepts: 512-byte
        // aligned buffers.
        let dio = if cache.direct() { dio_align(&file) } else { None };
        let dio_mem_align = if cache.direct() { dio.map_or(512, |(mem, _)| mem) } else { 1 };
        let (capacity_bytes, logical, physical) = if is_block_device {
            let size: u64 =
                ioctl_value(&file, BLKGETSIZE64).map_err(|e| OpenError::Io(path.into(), e))?;
            let logical: libc::c_int = ioctl_value(&file, BLKSSZGET).unwrap_or(512);
            let physical: libc::c_int = ioctl_value(&file, BLKPBSZGET).unwrap_or(logical);
            (size, logical as u32, physical as u32)
        } else {
            let logical = dio.map_or(512, |(_, offset)| offset);
            (meta.len(), logical, 4096)
        };
        if capacity_bytes == 0 {
            return Err(OpenError::Empty(path.into()));
        }
        if capacity_bytes % SECTOR_SIZE != 0 {
            return Err(OpenError::NotSectorMultiple(path.into(), capacity_bytes));
        }
        let logical_block_bytes = clamp_block(logical);
        Ok(Backing {
            file,
            capacity_bytes,
            logical_block_bytes,
            physical_block_bytes: clamp_block(physical).max(logical_block_bytes),
            dio_mem_align: dio_mem_align.next_power_of_two(),
            is_block_device,
            on_tmpfs,
        })
    }
}

/// Whether `file` (with `meta`) is a regular file on tmpfs. A device node's fstatfs names
/// the file system it lives on, devtmpfs, which says tmpfs too.
fn regular_on_tmpfs(file: &File, meta: &std::fs::Metadata) -> bool {
    meta.is_file()
        && crate::sys::filesystem_magic(file.as_raw_fd()).ok() == Some(crate::sys::TMPFS_MAGIC)
}

/// Where data lies in a file from `offset` on, as `lseek(SEEK_DATA/SEEK_HOLE)` say: the next
/// extent `(start, end)` holding data (allocated, or not known to be a hole), or None if only
/// holes follow. A file system (or block device) that cannot tell says all of it is data.
pub fn next_data(file: &File, offset: u64, size_bytes: u64) -> io::Result<Option<(u64, u64)>> {
    if offset >= size_bytes {
        return Ok(None);
    }
    let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        // SAFETY: lseek takes a valid descriptor and plain integers and touches no memory of
        // ours; it moves the file's offset, which no I/O of the daemon uses (every read and
        // write names its own offset).
        let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        match io::Error::last_os_error() {
            // No data at or after `from`.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let start = match seek(offset, libc::SEEK_DATA) {
        Ok(Some(start)) => start,
        Ok(None) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((offset, size_bytes))),
        Err(e) => return Err(e),
    };
    if start >= size_bytes {
        return Ok(None);
    }
    let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size_bytes).min(size_bytes);
    Ok(Some((start, end.max(start))))
}

/// Makes `bytes` at `offset` of an image read as zeroes, without writing them if the file
/// system or device can: fallocate(ZERO_RANGE), else a punched hole (files), else
/// BLKZEROOUT (block devices). Err(Unsupported) when none can; the caller writes zeroes.
pub fn zero_range(backing: &Backing, offset: u64, bytes: u64) -> io::Result<()> {
    let fd = backing.file.as_raw_fd();
    if backing.is_block_device {
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        let range = [offset, bytes];
        // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer, which points at
        // an array of two.
        let rc = unsafe { libc::ioctl(fd, BLKZEROOUT, range.as_ptr()) };
        return if rc == 0 { Ok(()) } else { Err(io::ErrorKind::Unsupported.into()) };
    }
    for mode in [libc::FALLOC_FL_ZERO_RANGE, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE]
    {
        // SAFETY: fallocate takes a valid descriptor and integers and touches no memory.
        let rc = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, bytes as libc::off_t) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) {
            return Err(e);
        }
    }
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_tmpfs(path: &Path) -> bool {
        let file = File::open(path).unwrap();
        regular_on_tmpfs(&file, &file.metadata().unwrap())
    }

    #[test]
    fn only_regular_files_on_tmpfs_count_as_on_tmpfs() {
        let shm = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        assert!(on_tmpfs(shm.path()), "a file on tmpfs");
        let disk = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        assert!(!on_tmpfs(disk.path()), "a file on a disk file system");
        // A device node: its fstatfs is devtmpfs's, which says tmpfs.
        let null = File::open("/dev/null").unwrap();
        assert_eq!(
            crate::sys::filesystem_magic(null.as_raw_fd()).unwrap(),
            crate::sys::TMPFS_MAGIC
        );
        assert!(!on_tmpfs(Path::new("/dev/null")), "a device node on devtmpfs");
    }
}
