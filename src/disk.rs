//! The disk behind an export ([`Disk`]): its backing, capacity, block sizes and cache mode,
//! shared read-mostly (atomics only) between the export's control thread and its I/O
//! threads. This is what the data path reads; `export.rs` only turns `--export` specs into
//! the [`ExportConfig`] a disk is opened from.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::blk::config::{config_space, ConfigInputs, CONFIG_SPACE_BYTES};
use crate::blk::request::DiskLimits;
use crate::blk::{feature, ID_BYTES, SECTOR_SIZE};
use crate::engine::nbd::engine::NbdTarget;
use crate::engine::nbd::{self, wire};
use crate::engine::{lock, Backing, CacheMode, EngineKind, OpenError};
use crate::export::{BackendSpec, ExportConfig};
use crate::iothread::poll::PollSettings;
use crate::iothread::Placement;
use crate::qos::Throttle;
use crate::trace::QueueStats;

/// How long a shrinking resize waits for requests checked against the old size.
const RESIZE_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Largest size of an engine=null export (and of a resize of one).
pub const MAX_NULL_BYTES: u64 = 1 << 60;

/// The disk behind an export, as its threads share it.
pub struct Disk {
    /// The export's id (its socket path where it has none, in unit tests).
    pub name: String,
    /// The export's identity in every log line it causes, whichever thread logs it:
    /// `export{export=ID socket=PATH}` (an error-level span, so that it exists whenever
    /// anything is logged). Events name it as their parent; nothing enters it on the data path.
    pub span: tracing::Span,
    pub backing: Option<Backing>,
    /// An NBD export's server, what it said at open and how long requests wait for it.
    pub nbd: Option<Arc<NbdTarget>>,
    /// An RBD export's image, open for the export's life.
    #[cfg(feature = "rbd")]
    pub rbd: Option<Arc<crate::engine::rbd::cluster::RbdHandle>>,
    pub engine: EngineKind,
    pub cache: CacheMode,
    pub readonly: bool,
    pub serial: [u8; ID_BYTES],
    pub num_queues: u16,
    pub max_queue_size: u16,
    pub logical_block_bytes: u32,
    pub physical_block_bytes: u32,
    /// Reads and writes off these blocks (bytes; 0: none) are done on whole blocks through a
    /// bounce buffer, writes by read-modify-write: the guest's blocks are smaller than what
    /// the backing's O_DIRECT needs.
    pub rmw_block_bytes: u64,
    /// Guest buffers must start and end on this boundary to go to the backing as they are
    /// (O_DIRECT's rule); others are bounced. 1 when the backing takes any buffer.
    pub dio_mem_align: usize,
    /// Which I/O threads serve the queues.
    pub placement: Placement,
    /// Polling and pinning of the export's dedicated threads (`Placement::Dedicated`).
    pub poll: Arc<PollSettings>,
    pub cpus: Vec<usize>,
    pub stats_on: bool,
    /// Whether discards free blocks (`discard=`).
    pub discard: crate::export::DiscardMode,
    /// Per-queue statistics; they outlive the I/O threads (which restart on reconfiguration).
    pub stats: Vec<Arc<QueueStats>>,
    /// The most guest RAM one frontend may have mapped (`max-guest-memory`).
    pub max_guest_memory_bytes: u64,
    /// The rate limits the queues obey: the export's own, or its throttle group's.
    pub throttle: Arc<Throttle>,
    capacity_bytes: AtomicU64,
    /// The write-cache-enable bit as the guest sees it; the guest may turn it off (CONFIG_WCE).
    writeback: AtomicBool,
    /// An fdatasync failed. Linux reports a writeback error once per open file, so a later
    /// one would succeed although data was lost: from now on every FLUSH fails instead.
    flush_failed: AtomicBool,
    /// Whether the export holds the image's write permission now: None when it has none to
    /// hand over (read-only, force-share, engine=null); Some(false) between a migration's
    /// switch-over and the guest's arrival.
    write_lock: Option<Mutex<bool>>,
}

impl Disk {
    /// Opens the backing of `config`, to be served on the threads `placement` gives. Creates
    /// and truncates nothing.
    pub fn open(config: &ExportConfig, placement: Placement) -> Result<Disk, OpenError> {
        let export_id = config.id.clone().unwrap_or_else(|| config.socket.display().to_string());
        let span =
            tracing::error_span!("export", export = %export_id, socket = %config.socket.display());
        // The image lock's waiting is logged from here.
        let _in_span = span.enter();
        // Before the image is opened: a group that refuses this export's limits costs nothing.
        let throttle =
            crate::qos::throttle::join(config.throttle_group.as_deref(), &config.throttle)
                .map_err(OpenError::Config)?;
        let mut nbd_target = None;
        #[cfg(feature = "rbd")]
        let mut rbd_image = None;
        let (backing, engine, capacity, logical, physical) = match &config.backend {
            BackendSpec::Image(path) => {
                let b = Backing::open(
                    path,
                    config.readonly,
                    config.cache,
                    config.force_share,
                    config.incoming,
                )?;
                let (c, l, p) = (b.capacity_bytes, b.logical_block_bytes, b.physical_block_bytes);
                (Some(b), config.aio, c, l, p)
            }
            BackendSpec::Null { size_bytes } => (None, EngineKind::Null, *size_bytes, 512, 4096),
            BackendSpec::Nbd { spec, reconnect_delay_s } => {
                let target = open_nbd(config, spec, *reconnect_delay_s, &span)?;
                let n = target.negotiated;
                // The server's minimum block (1 for qemu-nbd on a file, 4096 on a 4K-sector
                // disk with O_DIRECT) is the guest's logical block: requests off it would be
                // refused. Its preferred block is what the guest should align to.
                let logical = n.min_block.max(512);
                let physical = n.preferred_block.clamp(logical, 4096);
                nbd_target = Some(Arc::new(target));
                (None, EngineKind::Nbd, n.size_bytes, logical, physical)
            }
            #[cfg(feature = "rbd")]
            BackendSpec::Rbd { spec, op_timeout_s } => {
                use crate::engine::rbd::cluster::RbdHandle;
                let image = RbdHandle::open(
                    spec,
                    config.readonly,
                    config.cache,
                    *op_timeout_s,
                    span.clone(),
                )
                .map_err(|e| OpenError::Remote(format!("RBD {}: {e}", spec.name())))?;
                let size = image.size_bytes().map_err(OpenError::Remote)?;
                if size == 0 || size % SECTOR_SIZE != 0 {
                    return Err(OpenError::Remote(format!(
                        "RBD {}: its size {size} is not a non-zero multiple of 512",
                        spec.name()
                    )));
                }
                rbd_image = Some(Arc::new(image));
                // RBD stores objects of 4 MiB; 4 KiB is what its writes align to best.
                (None, EngineKind::Rbd, size, 512, 4096)
            }
            #[cfg(not(feature = "rbd"))]
            BackendSpec::Rbd { spec, .. } => {
                return Err(OpenError::Remote(format!(
                    "RBD {}: this blkplane was built without RBD support (cargo feature rbd)",
                    spec.name()
                )))
            }
        };
        let name = || match &config.backend {
            BackendSpec::Image(p) => p.clone(),
            BackendSpec::Null { .. } => "engine=null".into(),
            BackendSpec::Nbd { spec, .. } => spec.to_string().into(),
            BackendSpec::Rbd { spec, .. } => format!("rbd:{}", spec.name()).into(),
        };
        // O_DIRECT needs offsets on the backing's blocks; the page cache takes any. The guest
        // sees the backing's block size unless told otherwise. Smaller blocks than O_DIRECT
        // needs (512-byte sectors on a 4K-sector disk) mean read-modify-write for writes off
        // the backing's blocks, which must not race with other writes to the same blocks:
        // blkplane does it on the only queue, with nothing else in flight.
        let direct_block = if config.cache.direct() { logical } else { SECTOR_SIZE as u32 };
        let engine_block = logical;
        let logical = config.logical_block_bytes.unwrap_or(logical);
        if backing.is_none() && logical < engine_block {
            // Read-modify-write works on a file only; a network engine's smallest block is
            // the server's rule for every cache mode.
            return Err(OpenError::BlockSize(
                name(),
                format!("logical-block-size={logical} is below the server's {engine_block}-byte minimum block"),
            ));
        }
        let rmw_block_bytes = if logical < direct_block && backing.is_some() {
            if config.queues != 1 {
                return Err(OpenError::BlockSize(
                    name(),
                    format!(
                        "logical-block-size={logical} is below the {direct_block} bytes its O_DIRECT I/O needs; \
                         that takes read-modify-write, which needs queues=1 (or a cache mode without O_DIRECT)"
                    ),
                ));
            }
            if !capacity.is_multiple_of(u64::from(direct_block)) {
                return Err(OpenError::BlockSize(
                    name(),
                    format!(
                        "its size {capacity} is not a multiple of its {direct_block}-byte blocks"
                    ),
                ));
            }
            u64::from(direct_block)
        } else {
            0
        };
        let physical = config.physical_block_bytes.unwrap_or(physical.max(logical));
        if physical < logical {
            return Err(OpenError::BlockSize(
                name(),
                format!("physical-block-size={physical} is below logical-block-size={logical}"),
            ));
        }
        if !capacity.is_multiple_of(u64::from(logical)) {
            return Err(OpenError::BlockSize(
                name(),
                format!(
                    "its size {capacity} is not a multiple of the {logical}-byte logical block"
                ),
            ));
        }
        let dio_mem_align = backing.as_ref().map_or(1, |b| b.dio_mem_align as usize);
        let mut serial = [0u8; ID_BYTES];
        serial[..config.serial.len()].copy_from_slice(config.serial.as_bytes());
        let has_write_lock = backing.is_some() && !config.readonly && !config.force_share;
        Ok(Disk {
            name: export_id,
            span: span.clone(),
            backing,
            nbd: nbd_target,
            #[cfg(feature = "rbd")]
            rbd: rbd_image,
            engine,
            cache: config.cache,
            readonly: config.readonly,
            serial,
            num_queues: config.queues,
            max_queue_size: config.queue_size,
            logical_block_bytes: logical,
            physical_block_bytes: physical,
            dio_mem_align,
            rmw_block_bytes,
            placement,
            poll: Arc::new(PollSettings::new(config.poll)),
            cpus: config.cpus.clone(),
            stats_on: config.stats,
            discard: config.discard,
            stats: (0..config.queues).map(|_| Arc::new(QueueStats::default())).collect(),
            max_guest_memory_bytes: config.max_guest_memory_bytes,
            throttle,
            capacity_bytes: AtomicU64::new(capacity),
            writeback: AtomicBool::new(config.cache.write_cache()),
            flush_failed: AtomicBool::new(false),
            write_lock: has_write_lock.then(|| Mutex::new(!config.incoming)),
        })
    }

    /// Takes the image's write permission if the export does not hold it (a migration's
    /// destination when its guest arrives, a source whose guest comes back after a failed
    /// migration), waiting for another holder to give it up (`--image-lock-wait-ms`). Called
    /// before a ring starts; a ring never runs without it.
    pub fn activate(&self) -> Result<(), String> {
        let (Some(state), Some(backing)) = (&self.write_lock, &self.backing) else { return Ok(()) };
        let mut active = state.lock().unwrap_or_else(|p| p.into_inner());
        if !*active {
            lock::lock_image(&backing.file, false, false)?;
            *active = true;
            info!(parent: &self.span, "took the image's write permission");
        }
        Ok(())
    }

    /// Gives the image's write permission up: the guest's rings all stopped while its frontend
    /// logged dirty pages, which is a migration's switch-over; the destination may now write.
    pub fn inactivate(&self) {
        let (Some(state), Some(backing)) = (&self.write_lock, &self.backing) else { return };
        let mut active = state.lock().unwrap_or_else(|p| p.into_inner());
        if *active {
            match lock::lock_inactive(&backing.file) {
                Ok(()) => {
                    *active = false;
                    info!(parent: &self.span, "gave up the image's write permission (migration switch-over)");
                }
                Err(e) => {
                    warn!(parent: &self.span, "cannot give up the image's write permission: {e}")
                }
            }
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes.load(Ordering::Relaxed)
    }

    /// What requests are checked against. The capacity is read SeqCst, after the I/O thread
    /// counted the request as admitted (see `resize`).
    pub fn limits(&self) -> DiskLimits {
        DiskLimits {
            capacity_bytes: self.capacity_bytes.load(Ordering::SeqCst),
            readonly: self.readonly,
            logical_block_bytes: u64::from(self.logical_block_bytes),
        }
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Changes the size the guest sees. A regular file is truncated or extended to the new
    /// size (as qemu-storage-daemon's block_resize does); a block device cannot grow beyond
    /// itself; a null export takes any size. The caller serializes resizes of one disk.
    ///
    /// Growing extends the file, then publishes the capacity. Shrinking publishes the smaller
    /// capacity first, then waits until every request admitted before that was answered (a
    /// write checked against the old size could otherwise land after the truncation and
    /// extend the file again), then truncates.
    pub fn resize(&self, new_bytes: u64) -> Result<(), String> {
        let block = u64::from(self.logical_block_bytes).max(self.rmw_block_bytes).max(SECTOR_SIZE);
        if new_bytes == 0 || !new_bytes.is_multiple_of(block) {
            return Err(format!(
                "size {new_bytes} is not a non-zero multiple of the {block}-byte block size"
            ));
        }
        if let Some(target) = &self.nbd {
            return Err(format!(
                "an NBD export is as large as its server says ({}); resize it there",
                target.spec
            ));
        }
        #[cfg(feature = "rbd")]
        if let Some(image) = &self.rbd {
            if self.readonly {
                return Err("a read-only RBD export cannot be resized".into());
            }
            // As for a file: grow the image before the guest may use the room; shrink it
            // after every request checked against the old size is answered.
            if new_bytes >= self.capacity_bytes() {
                image.resize(new_bytes)?;
                self.capacity_bytes.store(new_bytes, Ordering::SeqCst);
                return Ok(());
            }
            self.capacity_bytes.store(new_bytes, Ordering::SeqCst);
            self.drain_admitted(RESIZE_DRAIN_TIMEOUT)?;
            return image.resize(new_bytes);
        }
        let file = match &self.backing {
            None => {
                if new_bytes > MAX_NULL_BYTES {
                    return Err(format!(
                        "size {new_bytes} is beyond the null engine's {MAX_NULL_BYTES}"
                    ));
                }
                None
            }
            Some(b) if b.is_block_device => {
                let device =
                    b.device_size().map_err(|e| format!("reading the device size: {e}"))?;
                if new_bytes > device {
                    return Err(format!(
                        "size {new_bytes} is beyond the block device's {device} bytes"
                    ));
                }
                None
            }
            Some(_) if self.readonly => {
                return Err("a read-only image file cannot be resized".into());
            }
            Some(b) => Some(&b.file),
        };
        let truncate = |f: &std::fs::File| {
            f.set_len(new_bytes).map_err(|e| format!("resizing the image file: {e}"))
        };
        if new_bytes >= self.capacity_bytes() {
            if let Some(f) = file {
                truncate(f)?;
            }
            self.capacity_bytes.store(new_bytes, Ordering::SeqCst);
            return Ok(());
        }
        self.capacity_bytes.store(new_bytes, Ordering::SeqCst);
        self.drain_admitted(RESIZE_DRAIN_TIMEOUT)?;
        if let Some(f) = file {
            truncate(f)?;
        }
        Ok(())
    }

    /// Waits until every request admitted so far, on every queue, has been answered.
    fn drain_admitted(&self, timeout: std::time::Duration) -> Result<(), String> {
        let admitted: Vec<u64> =
            self.stats.iter().map(|q| q.admitted.load(Ordering::SeqCst)).collect();
        let deadline = std::time::Instant::now() + timeout;
        while self.stats.iter().zip(&admitted).any(|(q, &a)| q.retired.load(Ordering::Acquire) < a)
        {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "requests in flight did not finish within {} s; the guest sees the new size, \
                     the file keeps its old one",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// Whether a flush has failed on this export (see `flush_failed`).
    pub fn flush_failed(&self) -> bool {
        self.flush_failed.load(Ordering::Acquire)
    }

    /// A flush failed with `errno`: counted on `stats`. On a file (an fdatasync) every later
    /// FLUSH fails too, logged the first time (Linux reports a writeback error once per open
    /// file). A network backend's flush is the server's or cluster's to keep honest, and
    /// fails while it is unreachable: the next flush asks again, so that the export recovers
    /// with the server.
    pub fn flush_failed_with(&self, errno: i32, stats: &QueueStats) {
        stats.counters.flush_errors.add(1);
        if self.backing.is_none() {
            return;
        }
        if !self.flush_failed.swap(true, Ordering::AcqRel) {
            tracing::error!(
                parent: &self.span,
                "flush failed: {}; written data may be lost, so every later flush fails until the export is removed and added again",
                std::io::Error::from_raw_os_error(errno)
            );
        }
    }

    /// Whether a DISCARD or WRITE_ZEROES must be followed by an fdatasync before its ack:
    /// the guest was promised write-through (a cache mode without a write cache, or the
    /// guest turned it off), and O_DSYNC does not cover fallocate.
    pub fn range_changes_need_sync(&self) -> bool {
        self.cache != CacheMode::Unsafe && !self.writeback()
    }

    /// The guest wrote the WCE bit. Modes without a write cache stay write-through.
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on && self.cache.write_cache(), Ordering::Relaxed);
    }

    /// Back to the cache mode's default, for a new client.
    pub fn reset_writeback(&self) {
        self.writeback.store(self.cache.write_cache(), Ordering::Relaxed);
    }

    /// Whether a write must carry RWF_DSYNC: the guest switched a write cache off.
    pub fn write_needs_dsync(&self) -> bool {
        self.cache.write_cache() && self.cache != CacheMode::Unsafe && !self.writeback()
    }

    /// The virtio feature bits this export offers.
    pub fn features(&self) -> u64 {
        let mut f = feature::VERSION_1
            | feature::RING_INDIRECT_DESC
            | feature::RING_EVENT_IDX
            | feature::VHOST_USER_PROTOCOL_FEATURES
            | feature::VHOST_LOG_ALL
            | feature::SEG_MAX
            | feature::SIZE_MAX
            | feature::BLK_SIZE
            | feature::TOPOLOGY
            | feature::FLUSH
            | feature::CONFIG_WCE
            | feature::MQ;
        if self.readonly {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        f
    }

    pub fn config_space(&self) -> [u8; CONFIG_SPACE_BYTES] {
        config_space(&ConfigInputs {
            capacity_bytes: self.capacity_bytes(),
            logical_block_bytes: self.logical_block_bytes,
            physical_block_bytes: self.physical_block_bytes,
            num_queues: self.num_queues,
            writeback: self.writeback(),
        })
    }
}

/// Connects to an NBD export's server once, to learn the export and check that it can be
/// served as asked; the queues make connections of their own.
fn open_nbd(
    config: &ExportConfig,
    spec: &nbd::NbdSpec,
    reconnect_delay_s: u32,
    span: &tracing::Span,
) -> Result<NbdTarget, OpenError> {
    let connection = nbd::connect(spec, nbd::CONNECT_TIMEOUT).map_err(OpenError::Remote)?;
    nbd::handshake::say_goodbye(&connection.fd);
    let n = connection.negotiated;
    let refuse = |why: String| Err(OpenError::Remote(format!("NBD server {spec}: {why}")));
    if n.size_bytes == 0 || n.size_bytes % SECTOR_SIZE != 0 || n.size_bytes > MAX_NULL_BYTES {
        return refuse(format!(
            "the export's size {} is not a non-zero multiple of 512 up to 2^60",
            n.size_bytes
        ));
    }
    if n.min_block > 4096 {
        return refuse(format!("the export's minimum block is {} bytes, above 4096", n.min_block));
    }
    if n.has(wire::TFLAG_READ_ONLY) && !config.readonly {
        return refuse("the export is read-only; serve it with readonly=on".into());
    }
    if config.queues > 1 && !n.has(wire::TFLAG_CAN_MULTI_CONN) {
        return refuse(format!(
            "queues={} needs a connection per queue, which the server does not allow \
             (no multi-conn; qemu-nbd allows it with --shared=N); use queues=1",
            config.queues
        ));
    }
    Ok(NbdTarget::new(
        spec.clone(),
        n,
        config.readonly,
        std::time::Duration::from_secs(u64::from(reconnect_delay_s)),
        span.clone(),
        config.queues,
    ))
}
