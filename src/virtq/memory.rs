//! Guest memory as the daemon sees it: the regions a frontend shared with us, each mapped once.
//!
//! This file and `split.rs` are the only places that turn guest addresses into host pointers
//! or dereference them. Everything a guest names (a buffer address, a length) is translated
//! here, checked against the regions, and handed out as a [`GuestIov`]: a host range that is
//! known to lie inside one mapping. Code downstream never sees a raw guest address.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::fault;
use crate::sys::{HUGETLBFS_MAGIC, TMPFS_MAGIC};

/// One region of guest memory, mapped into this process with `MAP_SHARED`.
///
/// The mapping lives as long as the `Arc<MappedRegion>` that holds it: a memory table that
/// drops a region keeps it mapped until every I/O thread that may still use it has let go.
pub struct MappedRegion {
    guest_phys_addr: u64,
    size: u64,
    /// The frontend's own virtual address of the region; vring addresses are given in it.
    user_addr: u64,
    /// Host address of the region's first byte (inside the mapping, past any page offset).
    host: *mut u8,
    mmap_base: *mut libc::c_void,
    mmap_len: usize,
    /// Its entry in the SIGBUS table (see `fault.rs`).
    registration: fault::Registration,
    /// The connection hung up on if the region's file shrinks; kept open while registered.
    _hangup: Option<Arc<OwnedFd>>,
    /// Whether a request's buffer (or header) was translated into it: told when the region
    /// is removed, so an operator (and a hot-plug test) sees the guest used it. Set with a
    /// plain load and store, never a read-modify-write, so I/O threads do not contend on it.
    used: AtomicBool,
}

/// Guest memory mapped by the whole daemon, every connection's regions together (bytes).
static MAPPED_BYTES: AtomicU64 = AtomicU64::new(0);
/// The most guest memory the daemon maps at once (`--max-mapped-guest-memory`).
static MAPPED_LIMIT_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_MAPPED_LIMIT_BYTES);
/// 64 TiB: half of x86-64's user address space, so one tenant's sparse regions cannot take
/// the room every other tenant's mappings (and the daemon's own) need.
pub const DEFAULT_MAPPED_LIMIT_BYTES: u64 = 64 << 40;

/// Sets the daemon-wide limit on mapped guest memory.
pub fn set_mapped_limit_bytes(bytes: u64) {
    MAPPED_LIMIT_BYTES.store(bytes, Ordering::Relaxed);
}

/// Takes `bytes` from the daemon-wide budget, or refuses. Given back by [`release_mapped`].
fn reserve_mapped(bytes: u64) -> Result<(), MemoryError> {
    let limit = MAPPED_LIMIT_BYTES.load(Ordering::Relaxed);
    MAPPED_BYTES
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
            now.checked_add(bytes).filter(|&total| total <= limit)
        })
        .map(|_| ())
        .map_err(|now| MemoryError::DaemonLimit { asked: bytes, mapped: now, limit })
}

fn release_mapped(bytes: u64) {
    MAPPED_BYTES.fetch_sub(bytes, Ordering::AcqRel);
}

// SAFETY: the region is plain shared memory; the pointer is only an address and every access
// through it goes through the checked helpers below, which any thread may call.
unsafe impl Send for MappedRegion {}
// SAFETY: as above; the struct itself is immutable after construction.
unsafe impl Sync for MappedRegion {}

/// Why a memory region or table was refused.
#[derive(Debug)]
pub enum MemoryError {
    /// Size zero, or an address range that wraps around.
    BadRange { guest_phys_addr: u64, size: u64 },
    /// The file behind the region is shorter than offset + size (touching it would SIGBUS).
    FileTooShort { needed: u64, actual: u64 },
    /// The region overlaps one already in the table.
    Overlap { guest_phys_addr: u64 },
    /// REM_MEM_REG named a region that is not in the table.
    NotFound { guest_phys_addr: u64, size: u64 },
    /// More regions than we said we support.
    TooManyRegions { max: usize },
    /// The connection's guest memory would exceed its `max-guest-memory`.
    ConnectionLimit { total: u64, limit: u64 },
    /// A dirty log bigger than the bitmap of the connection's `max-guest-memory`.
    LogLimit { log_bytes: u64, limit_bytes: u64 },
    /// The daemon's mapped guest memory would exceed `--max-mapped-guest-memory`.
    DaemonLimit { asked: u64, mapped: u64, limit: u64 },
    /// The daemon maps as many guest regions as it can track.
    TooManyMappings,
    /// The file is not one whose page faults only the kernel's own memory serves (see
    /// [`check_backing`]): touching it could put an I/O thread to sleep for as long as a
    /// tenant, or a hung server, likes.
    MayStall { fs: &'static str, magic: u64, regular: bool },
    /// mmap or fstat failed.
    Io(io::Error),
}

/// Names for the file systems a frontend might hand us, for the refusal (the magic numbers
/// of linux/magic.h).
const FILESYSTEM_NAMES: &[(u64, &str)] = &[
    (TMPFS_MAGIC, "tmpfs"),
    (HUGETLBFS_MAGIC, "hugetlbfs"),
    (0xef53, "ext4"),
    (0x5846_5342, "xfs"),
    (0x9123_683e, "btrfs"),
    (0xf2f5_2010, "f2fs"),
    (0x6573_5546, "fuse"),
    (0x6969, "nfs"),
    (0xff53_4d42, "cifs"),
    (0xfe53_4d42, "smb2"),
    (0x00c3_6400, "ceph"),
    (0x0102_1997, "9p"),
    (0x794c_7630, "overlayfs"),
    (0x2fc1_2fc1, "zfs"),
    (0x8584_58f6, "ramfs"),
    (0x5049_5045, "pipefs"),
    (0x534f_434b, "sockfs"),
    (0x0904_1934, "anon_inode"),
    (0x5345_434d, "secretmem"),
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
];

fn filesystem_name(magic: u64) -> &'static str {
    FILESYSTEM_NAMES.iter().find(|(m, _)| *m == magic).map_or("an unknown file system", |(_, n)| n)
}

/// Refuses a file to map for a tenant unless a page fault on it is served from memory the
/// kernel holds (shmem/tmpfs pages, possibly from swap; hugetlbfs's reserved pool), never by
/// a process or a server: a regular file on tmpfs (memfd included) or hugetlbfs. A file on
/// FUSE, NFS or a local disk file system could block the I/O thread that touches it for as
/// long as its server or device likes, and with it every queue that thread serves. The file
/// system of an open file cannot change, so checking once, before mapping, is enough.
pub fn check_backing(file: &File) -> Result<(), MemoryError> {
    let magic = crate::sys::filesystem_magic(file.as_raw_fd()).map_err(MemoryError::Io)?;
    let regular = file.metadata().map_err(MemoryError::Io)?.is_file();
    if regular && (magic == TMPFS_MAGIC || magic == HUGETLBFS_MAGIC) {
        return Ok(());
    }
    Err(MemoryError::MayStall { fs: filesystem_name(magic), magic, regular })
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::BadRange { guest_phys_addr, size } => {
                write!(f, "bad memory region at {guest_phys_addr:#x} size {size:#x}")
            }
            MemoryError::FileTooShort { needed, actual } => {
                write!(f, "memory region file has {actual} bytes, needs {needed}")
            }
            MemoryError::Overlap { guest_phys_addr } => {
                write!(f, "memory region at {guest_phys_addr:#x} overlaps another")
            }
            MemoryError::NotFound { guest_phys_addr, size } => {
                write!(f, "no memory region at {guest_phys_addr:#x} size {size:#x}")
            }
            MemoryError::TooManyRegions { max } => write!(f, "more than {max} memory regions"),
            MemoryError::ConnectionLimit { total, limit } => write!(
                f,
                "guest memory of {total} bytes is over this export's max-guest-memory of {limit}"
            ),
            MemoryError::LogLimit { log_bytes, limit_bytes } => write!(
                f,
                "a dirty log of {log_bytes} bytes is over the {limit_bytes} bytes of bitmap this \
                 export's max-guest-memory needs"
            ),
            MemoryError::DaemonLimit { asked, mapped, limit } => write!(
                f,
                "mapping {asked} more bytes of guest memory would exceed the daemon's limit of \
                 {limit} ({mapped} mapped)"
            ),
            MemoryError::TooManyMappings => {
                write!(f, "the daemon maps {} guest regions already", fault::MAX_MAPPINGS)
            }
            MemoryError::MayStall { fs, magic, regular } => {
                let what = if *regular { "on" } else { "not a regular file, on" };
                write!(
                    f,
                    "guest memory {what} {fs} ({magic:#x}): only memfd, tmpfs or hugetlbfs can \
                     be mapped without a page fault stalling an I/O thread"
                )
            }
            MemoryError::Io(e) => write!(f, "mapping guest memory: {e}"),
        }
    }
}

impl std::error::Error for MemoryError {}

impl MappedRegion {
    /// Maps `size` bytes of `file` from `mmap_offset`, to be found at `guest_phys_addr` in the
    /// guest and at `user_addr` in the frontend's address space. If the file shrinks under
    /// the mapping later, `hangup` (the frontend's connection) is shut down (see `fault.rs`).
    /// Only memory whose page faults cannot stall is taken ([`check_backing`]): every
    /// mapping a tenant gives us (guest RAM, inflight region, dirty log) comes through here.
    pub fn map(
        file: &File,
        mmap_offset: u64,
        guest_phys_addr: u64,
        size: u64,
        user_addr: u64,
        hangup: Option<Arc<OwnedFd>>,
    ) -> Result<MappedRegion, MemoryError> {
        let bad = MemoryError::BadRange { guest_phys_addr, size };
        if size == 0
            || guest_phys_addr.checked_add(size).is_none()
            || user_addr.checked_add(size).is_none()
        {
            return Err(bad);
        }
        let end_in_file = mmap_offset.checked_add(size).ok_or(bad)?;
        check_backing(file)?;
        let meta = file.metadata().map_err(MemoryError::Io)?;
        // A file has a length; touching a page past it raises SIGBUS, so a frontend must not
        // be able to make us map one. (hugetlbfs and memfd both report it.)
        if meta.len() < end_in_file {
            return Err(MemoryError::FileTooShort { needed: end_in_file, actual: meta.len() });
        }
        let page = crate::sys::page_size();
        let aligned_offset = mmap_offset & !(page - 1);
        let delta = (mmap_offset - aligned_offset) as usize;
        let mmap_len = usize::try_from(size)
            .ok()
            .and_then(|s| s.checked_add(delta))
            .ok_or(MemoryError::BadRange { guest_phys_addr, size })?;
        // The budget first: the address space is taken only once it is granted.
        reserve_mapped(mmap_len as u64)?;
        // SAFETY: a fresh shared mapping of a file descriptor we own for the duration of the
        // call; the kernel picks the address, so no existing mapping is replaced.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                mmap_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                aligned_offset as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            release_mapped(mmap_len as u64);
            return Err(MemoryError::Io(e));
        }
        let hangup_fd = hangup.as_ref().map(|fd| fd.as_raw_fd());
        let Some(registration) = fault::register(base as usize, mmap_len, hangup_fd) else {
            // SAFETY: the mapping made just above, used by nothing yet.
            unsafe { libc::munmap(base, mmap_len) };
            release_mapped(mmap_len as u64);
            return Err(MemoryError::TooManyMappings);
        };
        Ok(MappedRegion {
            guest_phys_addr,
            size,
            user_addr,
            // SAFETY: delta < page size <= mmap_len, so the result stays inside the mapping.
            host: unsafe { (base as *mut u8).add(delta) },
            mmap_base: base,
            mmap_len,
            registration,
            _hangup: hangup,
            used: AtomicBool::new(false),
        })
    }

    /// Whether the region's file shrank under it (it is now anonymous zeroes; see `fault.rs`).
    pub fn faulted(&self) -> bool {
        fault::faulted(&self.registration)
    }

    /// Host address of the region's first byte; `size` bytes from it are mapped.
    pub(super) fn host(&self) -> *mut u8 {
        self.host
    }

    fn contains_gpa(&self, gpa: u64) -> bool {
        gpa >= self.guest_phys_addr && gpa - self.guest_phys_addr < self.size
    }

    fn end_gpa(&self) -> u64 {
        self.guest_phys_addr + self.size
    }

    pub fn guest_phys_addr(&self) -> u64 {
        self.guest_phys_addr
    }

    /// Whether a request's buffer was ever translated into this region.
    pub fn used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    fn note_use(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // Out of the SIGBUS table before the range can be reused by another mapping.
        fault::unregister(&self.registration);
        // SAFETY: base and len are exactly what mmap returned; nothing references the mapping
        // any more because every user holds the Arc that is being dropped now.
        unsafe {
            libc::munmap(self.mmap_base, self.mmap_len);
        }
        release_mapped(self.mmap_len as u64);
    }
}

/// Most regions a frontend may register (GET_MAX_MEM_SLOTS): KVM's slot limit, as rust-vmm
/// and QEMU use it, which memory hot-plug (DIMMs, virtio-mem) needs. Translation finds a
/// region by binary search over the table kept sorted by guest address: 9 steps at 509.
pub const MAX_MEM_REGIONS: usize = 509;

/// An immutable snapshot of the guest's memory table. The control thread builds a new one for
/// every change and hands it to I/O threads; an I/O thread keeps the one it started with for
/// its whole life, so every pointer it translated stays mapped while it may use it.
#[derive(Clone, Default)]
pub struct GuestMemory {
    /// Sorted by guest-physical address; no two overlap.
    regions: Vec<Arc<MappedRegion>>,
    /// Indexes into `regions` in the order of their host addresses, for the dirty log's
    /// host-to-guest lookup ([`GuestMemory::gpa_of_host`]): a binary search, like the other
    /// way. (Mappings never overlap in the host either.)
    by_host: Vec<u16>,
}

impl GuestMemory {
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    pub fn regions(&self) -> &[Arc<MappedRegion>] {
        &self.regions
    }

    /// Bytes of guest memory in the table.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Whether any region's file shrank under it (see `fault.rs`).
    pub fn faulted(&self) -> bool {
        self.regions.iter().any(|r| r.faulted())
    }

    /// A table of exactly these regions (SET_MEM_TABLE).
    pub fn from_regions(regions: Vec<MappedRegion>) -> Result<GuestMemory, MemoryError> {
        let mut mem = GuestMemory::default();
        for region in regions {
            mem = mem.with_region(region)?;
        }
        Ok(mem)
    }

    /// This table plus one region (ADD_MEM_REG).
    pub fn with_region(&self, region: MappedRegion) -> Result<GuestMemory, MemoryError> {
        if self.regions.len() >= MAX_MEM_REGIONS {
            return Err(MemoryError::TooManyRegions { max: MAX_MEM_REGIONS });
        }
        let start = region.guest_phys_addr;
        let end = region.end_gpa();
        // The table is sorted and without overlaps: only the neighbours can overlap.
        let pos = self.regions.partition_point(|r| r.guest_phys_addr < start);
        let before = pos.checked_sub(1).map(|i| &self.regions[i]);
        let after = self.regions.get(pos);
        if before.is_some_and(|r| r.end_gpa() > start)
            || after.is_some_and(|r| r.guest_phys_addr < end)
        {
            return Err(MemoryError::Overlap { guest_phys_addr: start });
        }
        let mut regions = Vec::with_capacity(self.regions.len() + 1);
        regions.extend_from_slice(&self.regions[..pos]);
        regions.push(Arc::new(region));
        regions.extend_from_slice(&self.regions[pos..]);
        Ok(GuestMemory::sorted(regions))
    }

    /// This table minus the region at `guest_phys_addr` of `size` bytes (REM_MEM_REG).
    pub fn without_region(
        &self,
        guest_phys_addr: u64,
        size: u64,
    ) -> Result<GuestMemory, MemoryError> {
        let pos = self
            .regions
            .binary_search_by_key(&guest_phys_addr, |r| r.guest_phys_addr)
            .ok()
            .filter(|&i| self.regions[i].size == size)
            .ok_or(MemoryError::NotFound { guest_phys_addr, size })?;
        let mut regions = self.regions.clone();
        regions.remove(pos);
        Ok(GuestMemory::sorted(regions))
    }

    /// A table of `regions`, already sorted by guest address, with its host-ordered index.
    fn sorted(regions: Vec<Arc<MappedRegion>>) -> GuestMemory {
        // MAX_MEM_REGIONS (509) indexes fit in u16.
        let mut by_host: Vec<u16> = (0..regions.len() as u16).collect();
        by_host.sort_unstable_by_key(|&i| regions[usize::from(i)].host as usize);
        GuestMemory { regions, by_host }
    }

    /// The region holding guest-physical address `gpa`: a binary search.
    fn region_of(&self, gpa: u64) -> Option<&MappedRegion> {
        let pos = self.regions.partition_point(|r| r.guest_phys_addr <= gpa);
        let r = &self.regions[pos.checked_sub(1)?];
        r.contains_gpa(gpa).then_some(&**r)
    }

    /// The guest-physical address of host address `addr`, if it lies in one of the regions
    /// (for the dirty log, which counts in guest pages).
    pub fn gpa_of_host(&self, addr: usize) -> Option<u64> {
        let pos =
            self.by_host.partition_point(|&i| self.regions[usize::from(i)].host as usize <= addr);
        let r = &self.regions[usize::from(self.by_host[pos.checked_sub(1)?])];
        let offset = (addr - r.host as usize) as u64;
        (offset < r.size).then(|| r.guest_phys_addr + offset)
    }

    /// The end of the highest region (guest-physical): what a dirty log must cover.
    pub fn gpa_end(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.end_gpa())
    }

    /// Host pointer to `len` bytes at frontend virtual address `uva` (how vring addresses are
    /// given), if they lie inside one region.
    pub fn translate_user(&self, uva: u64, len: u64) -> Option<*mut u8> {
        let end = uva.checked_add(len)?;
        self.regions.iter().find_map(|r| {
            if uva >= r.user_addr && end <= r.user_addr + r.size {
                // SAFETY: uva - user_addr + len <= size, inside the mapping.
                Some(unsafe { r.host.add((uva - r.user_addr) as usize) })
            } else {
                None
            }
        })
    }

    /// Host pointer to `len` bytes at guest physical address `gpa`, if they lie inside one
    /// region.
    pub fn translate_contiguous(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let end = gpa.checked_add(len)?;
        let r = self.region_of(gpa)?;
        if end > r.end_gpa() {
            return None;
        }
        // SAFETY: gpa - guest_phys_addr + len <= size, inside the mapping.
        Some(unsafe { r.host.add((gpa - r.guest_phys_addr) as usize) })
    }

    /// Translates the guest range `[gpa, gpa + len)` into host ranges, one per region it
    /// crosses, passing each to `push`. Returns false (having pushed a prefix) if any byte of
    /// the range lies outside guest memory, or if `push` refuses a range.
    ///
    /// The loop is bounded: each step consumes the rest of one region, and regions do not
    /// overlap, so it runs at most once per region.
    pub fn translate(&self, gpa: u64, len: u32, mut push: impl FnMut(GuestIov) -> bool) -> bool {
        let mut addr = gpa;
        let mut left = u64::from(len);
        for _ in 0..=self.regions.len() {
            if left == 0 {
                return true;
            }
            let Some(r) = self.region_of(addr) else {
                return false;
            };
            r.note_use();
            let offset = addr - r.guest_phys_addr;
            let chunk = left.min(r.size - offset);
            // SAFETY: offset < size and offset + chunk <= size: inside the mapping.
            let base = unsafe { r.host.add(offset as usize) };
            if !push(GuestIov(libc::iovec { iov_base: base.cast(), iov_len: chunk as usize })) {
                return false;
            }
            addr += chunk;
            left -= chunk;
        }
        left == 0
    }
}

/// A host range inside guest memory, produced only by [`GuestMemory::translate`].
///
/// Layout is that of `libc::iovec`, so a slice of them can be handed to the kernel as an
/// iovec array. Holding one is only meaningful while the `GuestMemory` it came from is alive;
/// I/O threads guarantee that by keeping their memory snapshot for their whole life.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct GuestIov(libc::iovec);

// SAFETY: an address and a length; see the type's documentation for its lifetime contract.
unsafe impl Send for GuestIov {}

impl fmt::Debug for GuestIov {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuestIov({:#x}+{})", self.addr(), self.len())
    }
}

impl GuestIov {
    pub const EMPTY: GuestIov = GuestIov(libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 });

    pub fn len(&self) -> usize {
        self.0.iov_len
    }

    pub fn is_empty(&self) -> bool {
        self.0.iov_len == 0
    }

    pub fn addr(&self) -> usize {
        self.0.iov_base as usize
    }

    /// Drops the first `n` bytes (n <= len).
    pub fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.0.iov_len);
        let n = n.min(self.0.iov_len);
        // SAFETY: n <= len, so the new base stays inside (or one past) the same range.
        self.0.iov_base = unsafe { self.0.iov_base.cast::<u8>().add(n) }.cast();
        self.0.iov_len -= n;
    }

    /// Drops the last `n` bytes (n <= len).
    pub fn truncate_end(&mut self, n: usize) {
        self.0.iov_len -= n.min(self.0.iov_len);
    }

    /// Writes one byte at the start of the range (the status byte of a request).
    pub fn write_u8(&self, value: u8) {
        if self.0.iov_len >= 1 {
            // SAFETY: the range lies inside a live guest mapping (type invariant) and is at
            // least one byte long. The guest may race with us; a volatile write is what a
            // DMA-ing device does.
            unsafe { ptr::write_volatile(self.0.iov_base.cast::<u8>(), value) }
        }
    }

    pub fn as_iovec_ptr(slice: &[GuestIov]) -> *const libc::iovec {
        slice.as_ptr().cast()
    }

    /// The bytes a list of ranges covers.
    pub fn total_len(iovs: &[GuestIov]) -> u64 {
        iovs.iter().map(|i| i.len() as u64).sum()
    }
}

/// The iovec tables of a queue's slots, `count` of `each` entries, in one allocation that
/// costs resident memory only where a request has used it: an anonymous mapping, whose
/// pages the kernel fills with zeroes on first touch (and all-zero bytes are
/// [`GuestIov::EMPTY`]). A slot table of 256 slots holds 1 MiB of iovecs; a started queue
/// that stays idle, or serves one request at a time (free slots are reused last in, first
/// out), touches a page or two of it. Falls back to the heap if the mapping fails.
pub fn iov_tables(count: usize, each: usize) -> Vec<IovTable> {
    let arena = Arc::new(IovArena::new(count.saturating_mul(each)));
    (0..count)
        .map(|i| IovTable {
            // SAFETY: i * each + each <= count * each, the arena's length: inside it.
            start: unsafe { arena.base.add(i * each) },
            len: each,
            _arena: Arc::clone(&arena),
        })
        .collect()
}

/// The memory behind [`iov_tables`]: an anonymous mapping, or a leaked box if mapping failed.
struct IovArena {
    base: *mut GuestIov,
    len: usize,
    mapped: bool,
}

// SAFETY: plain memory; every access goes through an `IovTable`, each of which covers a range
// no other covers, and which is `Send` but not `Sync`-shared mutably.
unsafe impl Send for IovArena {}
// SAFETY: as above: the arena itself is never read or written through `&IovArena`.
unsafe impl Sync for IovArena {}

impl IovArena {
    fn new(len: usize) -> IovArena {
        let bytes = len.saturating_mul(std::mem::size_of::<GuestIov>());
        if bytes > 0 {
            // SAFETY: a fresh private anonymous mapping; the kernel picks the address.
            let base = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if base != libc::MAP_FAILED {
                return IovArena { base: base.cast(), len, mapped: true };
            }
        }
        let heap = vec![GuestIov::EMPTY; len].into_boxed_slice();
        IovArena { base: Box::into_raw(heap).cast(), len, mapped: false }
    }
}

impl Drop for IovArena {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: the mapping made in new(), of this length; every IovTable that pointed
            // into it held the Arc being dropped now.
            unsafe { libc::munmap(self.base.cast(), self.len * std::mem::size_of::<GuestIov>()) };
        } else {
            // SAFETY: the box leaked in new(), of this length, rebuilt once.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(self.base, self.len)) });
        }
    }
}

/// One slot's iovec table, a range of an arena made by [`iov_tables`] that no other table
/// covers.
pub struct IovTable {
    start: *mut GuestIov,
    len: usize,
    _arena: Arc<IovArena>,
}

// SAFETY: the table's range belongs to it alone and the arena lives as long as it does.
unsafe impl Send for IovTable {}

impl std::ops::Deref for IovTable {
    type Target = [GuestIov];
    fn deref(&self) -> &[GuestIov] {
        // SAFETY: start..start + len lies inside the arena this table keeps alive; its bytes
        // are valid GuestIovs (zero, or written through this table); no other table covers
        // them, and `&self` excludes this table's own mutable borrows.
        unsafe { std::slice::from_raw_parts(self.start, self.len) }
    }
}

impl std::ops::DerefMut for IovTable {
    fn deref_mut(&mut self) -> &mut [GuestIov] {
        // SAFETY: as for deref; `&mut self` makes this the only borrow of the range.
        unsafe { std::slice::from_raw_parts_mut(self.start, self.len) }
    }
}

/// Reads `dst.len()` bytes of guest memory from `src`: volatile (the guest may change them
/// under us; each is read once), a machine word at a time where `src` is word-aligned.
///
/// # Safety
/// `src..src + dst.len()` lies inside a live guest mapping.
unsafe fn read_guest(src: *const u8, dst: &mut [u8]) {
    const W: usize = std::mem::size_of::<u64>();
    let n = dst.len();
    let mut i = 0;
    while i < n && !(src as usize + i).is_multiple_of(W) {
        // SAFETY: i < n: inside the range (the caller's promise).
        dst[i] = unsafe { ptr::read_volatile(src.add(i)) };
        i += 1;
    }
    while i + W <= n {
        // SAFETY: an aligned word inside the range.
        let word = unsafe { ptr::read_volatile(src.add(i).cast::<u64>()) };
        dst[i..i + W].copy_from_slice(&word.to_ne_bytes());
        i += W;
    }
    while i < n {
        // SAFETY: i < n, as above.
        dst[i] = unsafe { ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

/// Writes `src` into guest memory at `dst`: volatile, a word at a time where `dst` is
/// word-aligned.
///
/// # Safety
/// `dst..dst + src.len()` lies inside a live guest mapping.
unsafe fn write_guest(dst: *mut u8, src: &[u8]) {
    const W: usize = std::mem::size_of::<u64>();
    let n = src.len();
    let mut i = 0;
    while i < n && !(dst as usize + i).is_multiple_of(W) {
        // SAFETY: i < n: inside the range (the caller's promise).
        unsafe { ptr::write_volatile(dst.add(i), src[i]) };
        i += 1;
    }
    while i + W <= n {
        let word = u64::from_ne_bytes(src[i..i + W].try_into().unwrap_or_default());
        // SAFETY: an aligned word inside the range.
        unsafe { ptr::write_volatile(dst.add(i).cast::<u64>(), word) };
        i += W;
    }
    while i < n {
        // SAFETY: i < n, as above.
        unsafe { ptr::write_volatile(dst.add(i), src[i]) };
        i += 1;
    }
}

/// Calls `each` with the parts of a list of guest ranges that hold `len` bytes from byte
/// `skip` on, in order, as (start, length). Returns the bytes passed (less than `len` if the
/// ranges were too short). Each part lies inside one range. The one walk over a request's
/// buffers from an offset: copies in and out, zero fills, and the NBD engine's writes sent
/// part by part.
pub fn guest_parts(
    iovs: &[GuestIov],
    mut skip: usize,
    len: usize,
    mut each: impl FnMut(*mut u8, usize),
) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == len {
            break;
        }
        if skip >= iov.len() {
            skip -= iov.len();
            continue;
        }
        let n = (iov.len() - skip).min(len - done);
        // SAFETY: skip < iov.len(): the pointer stays inside the range's mapping.
        each(unsafe { iov.0.iov_base.cast::<u8>().add(skip) }, n);
        done += n;
        skip = 0;
    }
    done
}

/// Copies bytes out of a list of guest ranges, skipping the first `skip` bytes. Returns how
/// many bytes were copied (less than `dst.len()` if the ranges were too short).
pub fn copy_from_guest(iovs: &[GuestIov], skip: usize, dst: &mut [u8]) -> usize {
    let mut done = 0;
    guest_parts(iovs, skip, dst.len(), |part, n| {
        // SAFETY: part..part + n lies inside one of `iovs`, so inside a live guest mapping
        // (GuestIov's invariant).
        unsafe { read_guest(part, &mut dst[done..done + n]) };
        done += n;
    })
}

/// Copies `src` into a list of guest ranges, skipping their first `skip` bytes. Returns the
/// bytes written (less than `src.len()` if the ranges were too short).
pub fn copy_to_guest(iovs: &[GuestIov], skip: usize, src: &[u8]) -> usize {
    let mut done = 0;
    guest_parts(iovs, skip, src.len(), |part, n| {
        // SAFETY: as in copy_from_guest; src is ours and cannot overlap guest memory.
        unsafe { write_guest(part, &src[done..done + n]) };
        done += n;
    })
}

/// Fills a list of guest ranges with zero bytes (reads from a disk with no backing).
pub fn zero_guest(iovs: &[GuestIov]) {
    for iov in iovs {
        // SAFETY: the range lies inside a live guest mapping (type invariant).
        unsafe { ptr::write_bytes(iov.0.iov_base.cast::<u8>(), 0, iov.len()) }
    }
}

/// Zeroes `len` bytes of a list of guest ranges, after their first `skip` bytes (a hole in
/// a read's reply). Returns the bytes zeroed.
pub fn zero_guest_range(iovs: &[GuestIov], skip: usize, len: usize) -> usize {
    guest_parts(iovs, skip, len, |part, n| {
        // SAFETY: as in copy_from_guest.
        unsafe { ptr::write_bytes(part, 0, n) }
    })
}

/// Whether every range starts and ends on an `align`-byte boundary (a power of two), which
/// is what O_DIRECT asks of the buffers it is given. An alignment of 1 (no O_DIRECT) is met
/// without looking at the ranges: this runs for every read and write.
pub fn iovs_aligned(iovs: &[GuestIov], align: usize) -> bool {
    let mask = align.saturating_sub(1);
    mask == 0 || iovs.iter().all(|iov| (iov.addr() | iov.len()) & mask == 0)
}

/// A host buffer aligned for O_DIRECT, standing in for guest buffers the backing cannot take
/// as they are (see the worker's bounce path). It is handed to engines as a one-entry iovec
/// array, so it obeys the [`GuestIov`] contract: it stays allocated and unmoved while an
/// operation on it is in flight (its owner, an I/O thread's request slot, guarantees that).
pub struct BounceBuffer {
    /// Start of the allocation (dangling while `capacity` is 0).
    base: ptr::NonNull<u8>,
    capacity: usize,
    /// The part in use, as the engine sees it.
    iov: [GuestIov; 1],
}

/// Bounce memory allocated by the whole daemon (in flight or kept by a slot for reuse).
static BOUNCE_BYTES: AtomicU64 = AtomicU64::new(0);
/// The most bounce memory the daemon allocates at once, whatever its tenants do.
pub const BOUNCE_DAEMON_LIMIT_BYTES: u64 = 1 << 30;

/// Bounce memory the daemon holds now (bytes).
#[cfg(test)]
pub fn bounce_bytes() -> u64 {
    BOUNCE_BYTES.load(Ordering::Relaxed)
}

impl BounceBuffer {
    /// Alignment of every bounce buffer: a page, which satisfies any O_DIRECT rule.
    pub const ALIGN: usize = 4096;

    /// An empty buffer; nothing is allocated until [`BounceBuffer::prepare`].
    pub fn new() -> BounceBuffer {
        BounceBuffer { base: ptr::NonNull::dangling(), capacity: 0, iov: [GuestIov::EMPTY] }
    }

    fn layout(capacity: usize) -> Option<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(capacity, Self::ALIGN).ok()
    }

    /// Makes the buffer `len` bytes long (keeping the allocation if it is large enough).
    /// Returns false if memory could not be had (the allocator's, or the daemon's bounce
    /// budget); the buffer is then empty.
    pub fn prepare(&mut self, len: usize) -> bool {
        if len > self.capacity {
            self.release();
            let capacity = len.next_multiple_of(Self::ALIGN);
            let Some(layout) = Self::layout(capacity) else { return false };
            let reserved = BOUNCE_BYTES.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(capacity as u64).filter(|&t| t <= BOUNCE_DAEMON_LIMIT_BYTES)
            });
            if reserved.is_err() {
                return false;
            }
            // SAFETY: the layout has a non-zero size (len > capacity >= 0) and a valid
            // power-of-two alignment.
            let Some(base) = ptr::NonNull::new(unsafe { std::alloc::alloc(layout) }) else {
                BOUNCE_BYTES.fetch_sub(capacity as u64, Ordering::AcqRel);
                return false;
            };
            self.base = base;
            self.capacity = capacity;
        }
        self.iov = [GuestIov(libc::iovec { iov_base: self.base.as_ptr().cast(), iov_len: len })];
        true
    }

    /// Frees the allocation if it is larger than `keep_bytes`.
    pub fn shrink(&mut self, keep_bytes: usize) {
        if self.capacity > keep_bytes {
            self.release();
        }
    }

    fn release(&mut self) {
        if let Some(layout) = Self::layout(self.capacity).filter(|_| self.capacity > 0) {
            // SAFETY: base was allocated by `prepare` with exactly this layout and is freed
            // once (capacity goes to 0 right after).
            unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) };
            BOUNCE_BYTES.fetch_sub(self.capacity as u64, Ordering::AcqRel);
        }
        self.base = ptr::NonNull::dangling();
        self.capacity = 0;
        self.iov = [GuestIov::EMPTY];
    }

    /// The part in use, as an iovec array for an engine.
    pub fn iovs(&self) -> &[GuestIov] {
        &self.iov
    }

    fn bytes(&mut self) -> &mut [u8] {
        if self.capacity == 0 {
            return &mut [];
        }
        // SAFETY: base points at `capacity` bytes we own, and iov_len <= capacity; the
        // mutable borrow of self keeps anyone else from touching them meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.iov[0].len()) }
    }

    /// Copies guest buffers (a write's payload) into the part in use from byte `at` on.
    /// Returns bytes copied.
    pub fn fill_from(&mut self, at: usize, guest: &[GuestIov]) -> usize {
        let bytes = self.bytes();
        let at = at.min(bytes.len());
        copy_from_guest(guest, 0, &mut bytes[at..])
    }

    /// Copies `len` bytes of the part in use, from byte `from` on, into guest buffers (a
    /// read's data). Returns bytes copied.
    pub fn copy_out(&mut self, from: usize, len: usize, guest: &[GuestIov]) -> usize {
        let bytes = self.bytes();
        let from = from.min(bytes.len());
        let len = len.min(bytes.len() - from);
        copy_to_guest(guest, 0, &bytes[from..from + len])
    }
}

impl Default for BounceBuffer {
    fn default() -> Self {
        BounceBuffer::new()
    }
}

impl Drop for BounceBuffer {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::virtq::testing::guest_ram;

    /// Guest ranges `[start, start + len)` for each `(start, len)`, from a 64 KiB guest RAM.
    fn ranges(mem: &GuestMemory, parts: &[(u64, u32)]) -> Vec<GuestIov> {
        let mut iovs = Vec::new();
        for &(start, len) in parts {
            assert!(mem.translate(start, len, |iov| {
                iovs.push(iov);
                true
            }));
        }
        iovs
    }

    proptest! {
        /// The word-at-a-time copies move exactly the bytes a byte-by-byte copy would, at
        /// any alignment of either side and any split of the guest ranges.
        #[test]
        fn guest_copies_move_exactly_the_bytes(
            parts in proptest::collection::vec((0u64..60_000, 0u32..700), 1..6),
            skip in 0usize..64,
            seed in any::<u8>(),
        ) {
            let (_file, mem) = guest_ram(64 << 10);
            let iovs = ranges(&mem, &parts);
            let total: usize = parts.iter().map(|p| p.1 as usize).sum();
            // Distinct ranges only: overlapping ones would make "expected" ambiguous.
            let mut sorted = parts.clone();
            sorted.sort();
            prop_assume!(sorted.windows(2).all(|w| w[0].0 + u64::from(w[0].1) <= w[1].0));
            let src: Vec<u8> = (0..total).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            prop_assert_eq!(copy_to_guest(&iovs, 0, &src), total);
            let mut back = vec![0u8; total.saturating_sub(skip)];
            prop_assert_eq!(copy_from_guest(&iovs, skip, &mut back), total.saturating_sub(skip));
            prop_assert_eq!(&back[..], &src[skip.min(total)..]);
            // Unaligned destination inside a host buffer: the same bytes.
            let mut host = vec![0u8; total + 9];
            copy_from_guest(&iovs, 0, &mut host[3..3 + total]);
            prop_assert_eq!(&host[3..3 + total], &src[..]);
            // Writing after a skip, and zeroing a range inside: exactly those bytes change.
            let at = skip.min(total);
            prop_assert_eq!(copy_to_guest(&iovs, at, &src[..total - at]), total - at);
            let mut expected = src.clone();
            expected.copy_within(..total - at, at);
            let hole = (total - at).min(37);
            prop_assert_eq!(zero_guest_range(&iovs, at, hole), hole);
            expected[at..at + hole].fill(0);
            let mut now = vec![0u8; total];
            copy_from_guest(&iovs, 0, &mut now);
            prop_assert_eq!(now, expected);
        }
    }

    /// The dirty log's host-to-guest lookup finds every byte of every region, whatever the
    /// order of the regions' host addresses against their guest addresses, and nothing
    /// outside them; removing a region takes it out of the lookup.
    #[test]
    fn host_addresses_map_back_to_their_guest_addresses() {
        const PAGE: u64 = 4096;
        let (file, _) = guest_ram(64 * PAGE);
        let mut mem = GuestMemory::default();
        // Guest addresses in an order unrelated to the mapping order (hence the host order).
        let gpas: Vec<u64> = (0..32u64).map(|i| ((i * 13) % 32) * 3 * PAGE).collect();
        for (i, &gpa) in gpas.iter().enumerate() {
            let region = MappedRegion::map(&file, i as u64 * PAGE, gpa, PAGE, gpa, None).unwrap();
            mem = mem.with_region(region).unwrap();
        }
        for &gpa in &gpas {
            let host = mem.translate_contiguous(gpa, PAGE).unwrap() as usize;
            assert_eq!(mem.gpa_of_host(host), Some(gpa));
            assert_eq!(mem.gpa_of_host(host + 4095), Some(gpa + 4095));
        }
        let lowest = mem.regions().iter().map(|r| r.host() as usize).min().unwrap();
        assert_eq!(mem.gpa_of_host(lowest - 1), None, "below every region");
        assert_eq!(mem.gpa_of_host(0), None);
        assert_eq!(mem.gpa_of_host(usize::MAX), None);
        let gone = gpas[7];
        let host = mem.translate_contiguous(gone, PAGE).unwrap() as usize;
        let fewer = mem.without_region(gone, PAGE).unwrap();
        // (The mapping stays while `mem` holds it: the address is not reused meanwhile.)
        assert_eq!(fewer.gpa_of_host(host), None, "a removed region");
        assert_eq!(fewer.gpa_of_host(host + 100), None);
        for &gpa in gpas.iter().filter(|&&g| g != gone) {
            let host = fewer.translate_contiguous(gpa, PAGE).unwrap() as usize;
            assert_eq!(fewer.gpa_of_host(host + 8), Some(gpa + 8));
        }
    }

    #[test]
    fn bounce_memory_has_a_daemon_wide_bound() {
        // Take all of the budget (not touched, so it costs address space only).
        let mut big = BounceBuffer::new();
        let before = bounce_bytes();
        let room = (BOUNCE_DAEMON_LIMIT_BYTES - before) as usize;
        assert!(big.prepare(room), "the whole budget");
        let mut small = BounceBuffer::new();
        assert!(!small.prepare(4096), "past the daemon's bounce budget");
        big.shrink(0);
        assert!(small.prepare(4096), "the budget came back");
        drop(small);
        assert_eq!(bounce_bytes(), before);
    }

    /// Only a regular file on tmpfs (memfd) or hugetlbfs is mapped; a file on a disk file
    /// system, whose page faults wait for the device, and a pipe are refused by name.
    #[test]
    fn only_memory_that_cannot_stall_a_fault_is_mapped() {
        let (memfd, _) = guest_ram(4096);
        assert!(check_backing(&memfd).is_ok());
        // /var/tmp is on the root file system, a disk (ext4 here), never tmpfs.
        let disk = tempfile::tempfile_in("/var/tmp").unwrap();
        disk.set_len(4096).unwrap();
        let magic = crate::sys::filesystem_magic(disk.as_raw_fd()).unwrap();
        let e = MappedRegion::map(&disk, 0, 0, 4096, 0, None).err().expect("mapped a disk file");
        let want = format!(
            "guest memory on {} ({magic:#x}): only memfd, tmpfs or hugetlbfs can be mapped \
             without a page fault stalling an I/O thread",
            filesystem_name(magic)
        );
        assert_eq!(e.to_string(), want);
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array, which we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors, each handed to one File.
        let (pipe, _w) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        let e = MappedRegion::map(&pipe, 0, 0, 4096, 0, None).err().expect("mapped a pipe");
        assert!(e.to_string().starts_with("guest memory not a regular file, on pipefs"), "{e}");
    }
}
