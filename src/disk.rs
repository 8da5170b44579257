//! The disk behind an export ([`Disk`]): its backing, capacity, block sizes and cache mode,
//! shared read-mostly (atomics only) between the export's control thread and its I/O
//! threads. This is what the data path reads. Its options ([`DiskOptions`], the disk's
//! export keys in one table) are opened into a [`Disk`]; `export.rs` composes them with the
//! other layers' keys.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::blk::config::{config_space, ConfigInputs, CONFIG_SPACE_BYTES};
use crate::blk::request::DiskLimits;
use crate::blk::{feature, ID_BYTES, SECTOR_SIZE};
use crate::engine::nbd::engine::NbdTarget;
use crate::engine::nbd::{self, wire, NbdOptions, NbdSpec};
use crate::engine::rbd::{RbdOptions, RbdSpec};
use crate::engine::{lock, Backing, CacheMode, EngineKind, OpenError};
use crate::mirror::target::Target;
use crate::mirror::MirrorSlot;
use crate::qos::{LimitOptions, Throttle};
use crate::ratelimit::RateLimiter;
use crate::spec::{err, Key, Kind, Options, SpecError, Value};
use crate::trace::QueueStats;

/// How long a shrinking resize waits for requests checked against the old size.
const RESIZE_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Largest size of an engine=null export (and of a resize of one).
pub const MAX_NULL_BYTES: u64 = 1 << 60;

/// What is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    Image(PathBuf),
    Null {
        size_bytes: u64,
    },
    /// An NBD server's export (`image=nbd://...` or `nbd+unix://...`).
    Nbd {
        spec: NbdSpec,
        options: NbdOptions,
    },
    /// A Ceph RBD image (`image=rbd:POOL/IMAGE...` or `pool=`, `rbd-image=`).
    Rbd(RbdOptions),
}

impl BackendSpec {
    /// What the export serves, in one word or path (for list-exports and messages).
    pub fn describe(&self) -> String {
        match self {
            BackendSpec::Image(p) => p.display().to_string(),
            BackendSpec::Null { .. } => "null".into(),
            BackendSpec::Nbd { spec, .. } => spec.to_string(),
            BackendSpec::Rbd(o) => format!("rbd:{}", o.spec.name()),
        }
    }
}

/// Whether an `image=` value names a network backend (an NBD or RBD URI) rather than a path:
/// such a value is never made absolute.
pub fn is_network_image(text: &str) -> bool {
    NbdSpec::is_uri(text) || RbdSpec::is_uri(text)
}

/// What a mirror's `target=` names: any value `image=` takes (an image file or block device,
/// an NBD URI, an RBD image), read by the same key.
pub fn parse_target(text: &str) -> Result<BackendSpec, SpecError> {
    let mut options = DiskOptions::default();
    if let Some((_, result)) = options.set_key("image", &Value::Str(text.to_string())) {
        result?;
    }
    options.check(false, false).map_err(|e| SpecError(format!("target={text}: {}", e.0)))?;
    if options.readonly {
        return err(format!("target={text}: a snapshot is read-only; a mirror writes its target"));
    }
    Ok(options.backend)
}

/// `discard=`: whether the guest's discards free the backing's blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// Discards punch holes, and write-zeroes that allow it unmap (the default here).
    #[default]
    Unmap,
    /// Discards succeed and do nothing, write-zeroes always allocate: the image stays as
    /// allocated as it was (QEMU's and libvirt's default). The guest still sees the
    /// DISCARD feature, so that a VM moves between daemons without its features changing.
    Ignore,
}

impl DiscardMode {
    pub fn name(self) -> &'static str {
        match self {
            DiscardMode::Unmap => "unmap",
            DiscardMode::Ignore => "ignore",
        }
    }
}

/// Default `max-guest-memory`: 1 TiB, more than a VM on one host has, far less than the
/// address space every tenant shares.
pub const DEFAULT_MAX_GUEST_MEMORY_BYTES: u64 = 1 << 40;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The most queues an export offers, and what it offers without `queues=`, so that a VM
/// gets as many as its VMM asks for (QEMU's vhost-user-blk-pci asks for one per vCPU by
/// default and refuses to start with fewer). 256, not QEMU's 1024 (VIRTIO_QUEUE_MAX): the
/// vhost-user messages that hand over a ring's kick, call and err descriptors carry the
/// ring's index in 8 bits (bits 0-7 of their payload, bit 8 is "no descriptor"; QEMU's
/// vhost-user code masks the index with 0xff when it sends them), so ring 256 would be taken
/// for ring 0. Offering 256 makes a VMM asking for more fail at start
/// with the number, instead of a queue that never starts. A queue costs memory only once
/// the VMM starts it (see ARCHITECTURE.md, "Resource budget").
pub const MAX_QUEUES: u16 = 256;
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// The disk an export serves, as its keys say: what backs it and how the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    pub backend: BackendSpec,
    /// The operator's cap on the queues offered (`queues=`); None: as many as the VMM asks,
    /// up to [`MAX_QUEUES`] (see [`Disk::num_queues`]).
    pub queues: Option<u16>,
    pub queue_size: u16,
    pub cache: CacheMode,
    /// The engine for an image (io_uring, native or threads).
    pub aio: EngineKind,
    pub readonly: bool,
    pub serial: String,
    /// Counters and sampled per-layer timestamps (default on).
    pub stats: bool,
    /// Serve the image even if another process locks it, and let others use it too.
    pub force_share: bool,
    /// Offer packed virtqueues (VIRTIO_F_RING_PACKED; default on).
    pub packed_ring: bool,
    /// The destination of a live migration: the image's write permission is taken when the
    /// guest first starts a ring here, not at open (see `Disk::activate`).
    pub incoming: bool,
    /// Block sizes the guest sees (512 or 4096); default: what the backing needs.
    pub logical_block_bytes: Option<u32>,
    pub physical_block_bytes: Option<u32>,
    /// The most guest RAM one frontend of this export may have the daemon map.
    pub max_guest_memory_bytes: u64,
    pub discard: DiscardMode,
    /// While the keys are read: what they said of the backend, resolved by `check`.
    pending: PendingBackend,
}

/// The backend keys as given, before `DiskOptions::check` makes one [`BackendSpec`] of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PendingBackend {
    image: Option<String>,
    null: bool,
    size_bytes: Option<u64>,
    aio_given: bool,
    readonly_given: bool,
    nbd: NbdOptions,
    rbd: RbdOptions,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            backend: BackendSpec::Null { size_bytes: 0 },
            queues: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            cache: CacheMode::None,
            aio: EngineKind::IoUring,
            readonly: false,
            serial: String::new(),
            stats: true,
            force_share: false,
            packed_ring: true,
            incoming: false,
            logical_block_bytes: None,
            physical_block_bytes: None,
            max_guest_memory_bytes: DEFAULT_MAX_GUEST_MEMORY_BYTES,
            discard: DiscardMode::default(),
            pending: PendingBackend::default(),
        }
    }
}

impl DiskOptions {
    /// The NBD keys while they are read (`reconnect-delay`), before the backend is known.
    pub fn nbd_keys(&mut self) -> &mut NbdOptions {
        &mut self.pending.nbd
    }

    /// The RBD keys while they are read (`pool`, `rbd-image`, ...).
    pub fn rbd_keys(&mut self) -> &mut RbdOptions {
        &mut self.pending.rbd
    }

    /// Makes the backend of the keys given (`image=` a path or a URI, `engine=null,size=`,
    /// `pool=,rbd-image=`), and checks the keys that depend on it. `nbd_keys` and
    /// `rbd_keys` say whether keys of those engines were given.
    pub fn check(&mut self, nbd_keys: bool, rbd_keys: bool) -> Result<(), SpecError> {
        let p = std::mem::take(&mut self.pending);
        let image = match p.image {
            Some(uri) if RbdSpec::is_uri(&uri) => {
                Some(Image::Rbd(p.rbd.with_uri(&uri).map_err(SpecError)?))
            }
            Some(uri) if NbdSpec::is_uri(&uri) => {
                Some(Image::Nbd(NbdSpec::parse(&uri).map_err(SpecError)?))
            }
            Some(path) => Some(Image::File(PathBuf::from(path))),
            None if p.rbd.located() => {
                p.rbd.check_located().map_err(SpecError)?;
                Some(Image::Rbd(p.rbd.clone()))
            }
            None => None,
        };
        self.backend = match (image, p.null, p.size_bytes) {
            (Some(_), true, _) => return err("image= and engine=null exclude each other"),
            (Some(_), false, Some(_)) => {
                return err("size= goes with engine=null; an image's size is its file size")
            }
            (Some(Image::File(path)), false, None) => BackendSpec::Image(path),
            (Some(Image::Nbd(spec)), false, None) => BackendSpec::Nbd { spec, options: p.nbd },
            (Some(Image::Rbd(rbd)), false, None) => {
                if rbd.spec.snapshot.is_some() && !self.readonly {
                    if p.readonly_given {
                        return err(format!("{}: a snapshot is served read-only", rbd.spec.name()));
                    }
                    self.readonly = true;
                }
                BackendSpec::Rbd(rbd)
            }
            (None, true, Some(bytes)) => {
                if bytes == 0 || bytes % SECTOR_SIZE != 0 || bytes > MAX_NULL_BYTES {
                    return err(format!(
                        "size={bytes}: must be a non-zero multiple of 512, at most 2^60"
                    ));
                }
                BackendSpec::Null { size_bytes: bytes }
            }
            (None, true, None) => return err("engine=null needs size=BYTES"),
            (None, false, _) => return err("missing image=PATH (or engine=null,size=BYTES)"),
        };
        let network = match &self.backend {
            BackendSpec::Nbd { .. } => Some("an NBD export"),
            BackendSpec::Rbd(_) => Some("an RBD image"),
            _ => None,
        };
        if let (Some(what), true) = (network, p.aio_given) {
            return err(format!(
                "aio= chooses how an image file is read; {what} has its own engine"
            ));
        }
        if nbd_keys && !matches!(self.backend, BackendSpec::Nbd { .. }) {
            return err("reconnect-delay= is for NBD exports (image=nbd://... or nbd+unix://...)");
        }
        if rbd_keys && !matches!(self.backend, BackendSpec::Rbd(_)) {
            return err("ceph-conf=, ceph-user= and ceph-op-timeout= are for RBD images (pool=, rbd-image=)");
        }
        Ok(())
    }

    fn set_block_size(key: &str, value: &Value) -> Result<Option<u32>, SpecError> {
        match value.text(key)?.as_str() {
            "512" => Ok(Some(512)),
            "4096" | "4K" | "4k" => Ok(Some(4096)),
            _ => err(format!("{key}={value}: 512 or 4096")),
        }
    }
}

/// What `image=` named, before the other keys are checked against it.
enum Image {
    File(PathBuf),
    Nbd(NbdSpec),
    Rbd(RbdOptions),
}

fn on_off(b: bool) -> Option<Value> {
    Some(Value::Bool(b))
}

impl Options for DiskOptions {
    const KEYS: &'static [Key<DiskOptions>] = &[
        Key {
            name: "image",
            aliases: &[],
            kind: Kind::Path,
            usage: "image=PATH",
            help: "raw image file or host block device to serve. Never created or\n\
                   truncated; its size must be a non-zero multiple of 512 bytes.\n\
                   Or an NBD server's export: nbd+unix:///EXPORT?socket=PATH or\n\
                   nbd://HOST[:PORT]/EXPORT; or a Ceph RBD image:\n\
                   rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER] (a snapshot is read-only).",
            set: |d, v| {
                let text = v.text("image")?;
                d.pending.image = Some(if is_network_image(&text) {
                    text
                } else {
                    v.path("image")?.display().to_string()
                });
                Ok(())
            },
            get: |d| match &d.backend {
                BackendSpec::Image(p) => Some(Value::Str(p.display().to_string())),
                BackendSpec::Nbd { spec, .. } => Some(Value::Str(spec.to_string())),
                _ => None,
            },
        },
        Key {
            name: "aio",
            aliases: &[],
            kind: Kind::Choice(&["io_uring", "native", "threads"]),
            usage: "aio=ENGINE",
            help: "I/O engine for an image: io_uring (default); native (Linux AIO, for\n\
                   O_DIRECT on block devices); threads (a pool of worker threads doing\n\
                   preadv/pwritev, for filesystems where the others block).",
            set: |d, v| {
                d.aio = match v.text("aio")?.as_str() {
                    "io_uring" => EngineKind::IoUring,
                    "native" => EngineKind::Native,
                    "threads" => EngineKind::Threads,
                    other => {
                        return err(format!(
                            "aio={other}: supported engines: io_uring, native, threads"
                        ))
                    }
                };
                d.pending.aio_given = true;
                Ok(())
            },
            get: |d| {
                let name = match d.aio {
                    EngineKind::Native => "native",
                    EngineKind::Threads => "threads",
                    EngineKind::IoUring => "io_uring",
                };
                matches!(d.backend, BackendSpec::Image(_)).then(|| Value::Str(name.into()))
            },
        },
        Key {
            name: "engine",
            aliases: &[],
            kind: Kind::Choice(&["null"]),
            usage: "engine=null",
            help: "no backing at all: reads return zeroes, writes are discarded. Measures\n\
                   the daemon's own overhead. Needs size=.",
            set: |d, v| match v.text("engine")?.as_str() {
                "null" => {
                    d.pending.null = true;
                    Ok(())
                }
                other => err(format!("engine={other}: the only engine= value is null")),
            },
            get: |d| {
                matches!(d.backend, BackendSpec::Null { .. }).then(|| Value::Str("null".into()))
            },
        },
        Key {
            name: "size",
            aliases: &[],
            kind: Kind::Size,
            usage: "size=BYTES",
            help: "size of an engine=null export (suffixes K, M, G, T).",
            set: |d, v| {
                d.pending.size_bytes = Some(v.size("size")?);
                Ok(())
            },
            get: |d| match d.backend {
                BackendSpec::Null { size_bytes } => Some(Value::Int(size_bytes)),
                _ => None,
            },
        },
        Key {
            name: "queues",
            aliases: &["num-queues"],
            kind: Kind::Number,
            usage: "queues=N",
            help: "the most virtqueues offered to the guest, 1 to 256 (default: as many\n\
                   as the VMM asks, up to 256, vhost-user's limit; 1 where read-modify-write\n\
                   or an NBD server without multi-conn needs it). The guest sees this number\n\
                   when it is set.",
            set: |d, v| {
                let n: u16 = v.number("queues")?;
                if n == 0 || n > MAX_QUEUES {
                    return err(format!("queues={v}: must be 1 to {MAX_QUEUES}"));
                }
                d.queues = Some(n);
                Ok(())
            },
            get: |d| d.queues.map(|n| Value::Int(n.into())),
        },
        Key {
            name: "queue-size",
            aliases: &[],
            kind: Kind::Number,
            usage: "queue-size=N",
            help: "largest virtqueue the guest may set up (power of two, default 256).",
            set: |d, v| {
                let n: u16 = v.number("queue-size")?;
                if !n.is_power_of_two() || !(4..=MAX_QUEUE_SIZE).contains(&n) {
                    return err(format!(
                        "queue-size={v}: must be a power of two from 4 to {MAX_QUEUE_SIZE}"
                    ));
                }
                d.queue_size = n;
                Ok(())
            },
            get: |d| Some(Value::Int(d.queue_size.into())),
        },
        Key {
            name: "cache",
            aliases: &[],
            kind: Kind::Choice(&["none", "directsync", "writeback", "writethrough", "unsafe"]),
            usage: "cache=MODE",
            help: "none (default): O_DIRECT, guest write cache on, FLUSH = fdatasync.\n\
                   directsync: O_DIRECT|O_DSYNC, write cache off.\n\
                   writeback: host page cache, write cache on, FLUSH = fdatasync.\n\
                   writethrough: host page cache with O_DSYNC, write cache off.\n\
                   unsafe: host page cache, FLUSH ignored: a host crash or power loss\n\
                   may lose data the guest was told is on disk. For scratch disks only.\n\
                   NBD: without a write cache every write carries FUA (or a flush).",
            set: |d, v| {
                d.cache = v.text("cache")?.parse().map_err(SpecError)?;
                Ok(())
            },
            get: |d| Some(Value::Str(d.cache.to_string())),
        },
        Key {
            name: "readonly",
            aliases: &["read-only"],
            kind: Kind::Bool,
            usage: "readonly=on|off",
            help: "refuse writes, discards and write-zeroes (default off).",
            set: |d, v| {
                d.readonly = v.bool("readonly")?;
                d.pending.readonly_given = true;
                Ok(())
            },
            get: |d| on_off(d.readonly),
        },
        Key {
            name: "writable",
            aliases: &[],
            kind: Kind::Bool,
            usage: "writable=on|off",
            help: "qemu-storage-daemon's opposite of readonly (exports here are writable\n\
                   by default).",
            set: |d, v| {
                d.readonly = !v.bool("writable")?;
                d.pending.readonly_given = true;
                Ok(())
            },
            get: |_| None,
        },
        Key {
            name: "discard",
            aliases: &[],
            kind: Kind::Choice(&["unmap", "ignore"]),
            usage: "discard=MODE",
            help: "unmap (default): the guest's discards punch holes in the image and its\n\
                   write-zeroes may too. ignore: discards succeed and do nothing, write-\n\
                   zeroes allocate; the image stays allocated (QEMU's and libvirt's default).",
            set: |d, v| {
                d.discard = match v.text("discard")?.as_str() {
                    // QEMU's -drive spellings too.
                    "unmap" | "on" => DiscardMode::Unmap,
                    "ignore" | "off" => DiscardMode::Ignore,
                    _ => return err(format!("discard={v}: unmap or ignore")),
                };
                Ok(())
            },
            get: |d| Some(Value::Str(d.discard.name().into())),
        },
        Key {
            name: "serial",
            aliases: &[],
            kind: Kind::Text,
            usage: "serial=STR",
            help: "serial number the guest reads with GET_ID (up to 20 bytes).",
            set: |d, v| {
                let serial = v.text("serial")?;
                if serial.len() > ID_BYTES {
                    return err(format!("serial={serial}: at most {ID_BYTES} bytes"));
                }
                d.serial = serial;
                Ok(())
            },
            get: |d| Some(Value::Str(d.serial.clone())),
        },
        Key {
            name: "stats",
            aliases: &[],
            kind: Kind::Bool,
            usage: "stats=on|off",
            help: "per-queue counters and sampled per-layer latency (default on).",
            set: |d, v| {
                d.stats = v.bool("stats")?;
                Ok(())
            },
            get: |d| on_off(d.stats),
        },
        Key {
            name: "packed-ring",
            aliases: &[],
            kind: Kind::Bool,
            usage: "packed-ring=off",
            help: "offer packed virtqueues (VIRTIO_F_RING_PACKED: QEMU's packed=on; default\n\
                   on). Their requests are tracked in the inflight region like a split\n\
                   ring's, so a guest on them resumes after any restart. Off: a VMM that\n\
                   asks for packed rings gets split ones.",
            set: |d, v| {
                d.packed_ring = v.bool("packed-ring")?;
                Ok(())
            },
            get: |d| on_off(d.packed_ring),
        },
        Key {
            name: "force-share",
            aliases: &[],
            kind: Kind::Bool,
            usage: "force-share=on",
            help: "serve an image that another process (QEMU, qemu-storage-daemon, another\n\
                   blkplane) has locked, and let others use it too. blkplane takes\n\
                   QEMU-compatible locks, so by default two of them cannot write one image.",
            set: |d, v| {
                d.force_share = v.bool("force-share")?;
                Ok(())
            },
            get: |d| on_off(d.force_share),
        },
        Key {
            name: "incoming",
            aliases: &[],
            kind: Kind::Bool,
            usage: "incoming=on",
            help: "the destination of a live migration: the image may still be written\n\
                   by the source (another export or daemon on the same image); this export\n\
                   takes the write permission only when the migrated guest starts its\n\
                   rings, waiting for the source to give it up (--image-lock-wait-ms).\n\
                   A source gives it up when the guest's rings stop while its frontend\n\
                   logs dirty pages (the switch-over), and takes it back if they restart.",
            set: |d, v| {
                d.incoming = v.bool("incoming")?;
                Ok(())
            },
            get: |d| on_off(d.incoming),
        },
        Key {
            name: "logical-block-size",
            aliases: &[],
            kind: Kind::Choice(&["512", "4096"]),
            usage: "logical-block-size=512|4096, physical-block-size=512|4096",
            help: "block sizes the guest sees (default: what the backing needs). Reads\n\
                   and writes not on a logical block fail. Smaller than O_DIRECT needs\n\
                   (512 on a 4K-sector disk with cache=none) works with queues=1: writes\n\
                   off the backing's blocks are then read-modify-write, slowly.",
            set: |d, v| {
                d.logical_block_bytes = DiskOptions::set_block_size("logical-block-size", v)?;
                Ok(())
            },
            get: |d| d.logical_block_bytes.map(|n| Value::Int(n.into())),
        },
        Key {
            name: "physical-block-size",
            aliases: &[],
            kind: Kind::Choice(&["512", "4096"]),
            usage: "physical-block-size=512|4096",
            help: "",
            set: |d, v| {
                d.physical_block_bytes = DiskOptions::set_block_size("physical-block-size", v)?;
                Ok(())
            },
            get: |d| d.physical_block_bytes.map(|n| Value::Int(n.into())),
        },
        Key {
            name: "max-guest-memory",
            aliases: &[],
            kind: Kind::Size,
            usage: "max-guest-memory=SIZE",
            help: "the most guest RAM one frontend may have the daemon map (default 1T);\n\
                   a larger memory table is refused.",
            set: |d, v| {
                let bytes = v.size("max-guest-memory")?;
                if bytes == 0 {
                    return err("max-guest-memory=0: a guest needs some memory");
                }
                d.max_guest_memory_bytes = bytes;
                Ok(())
            },
            get: |d| Some(Value::Int(d.max_guest_memory_bytes)),
        },
    ];
}

/// The disk behind an export, as its threads share it.
pub struct Disk {
    /// The export's identity in every log line it causes, whichever thread logs it:
    /// `export{export=ID socket=PATH}` (an error-level span, so that it exists whenever
    /// anything is logged). Events name it as their parent; nothing enters it on the data path.
    pub span: tracing::Span,
    pub backend: Backend,
    pub cache: CacheMode,
    pub readonly: bool,
    /// VIRTIO_F_RING_PACKED is offered (`packed-ring`, default on).
    packed_ring: bool,
    pub serial: [u8; ID_BYTES],
    /// The queues offered (GET_QUEUE_NUM, the config space's num_queues): `queues=`, or
    /// [`MAX_QUEUES`] (1 where only one can be served). The VMM starts those it wants.
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
    pub stats_on: bool,
    /// Whether discards free blocks (`discard=`).
    pub discard: DiscardMode,
    /// Per-queue statistics, made when the queue first starts (a queue never started costs
    /// one empty cell); they outlive the I/O threads (which restart on reconfiguration).
    stats: Box<[OnceLock<Arc<QueueStats>>]>,
    /// Per-queue log budgets, kept across the queue's restarts so that a frontend restarting
    /// a queue in a loop (one message each) gets no fresh budget: a queue takes its limiter
    /// when it starts and gives it back when it is dropped (no lock while it runs).
    pub queue_logs: Vec<Mutex<RateLimiter>>,
    /// The most guest RAM one frontend may have mapped (`max-guest-memory`).
    pub max_guest_memory_bytes: u64,
    /// The rate limits the queues obey: the export's own, or its throttle group's.
    pub throttle: Arc<Throttle>,
    capacity_bytes: AtomicU64,
    /// The connected frontend's memory table: its regions and their bytes (0 when none is
    /// connected), for query-stats; written by the export's control thread on every change.
    guest_memory_regions: AtomicU64,
    guest_memory_bytes: AtomicU64,
    /// The write-cache-enable bit as the guest sees it; the guest may turn it off (CONFIG_WCE).
    writeback: AtomicBool,
    /// An fdatasync failed. Linux reports a writeback error once per open file, so a later
    /// one would succeed although data was lost: from now on every FLUSH fails instead.
    flush_failed: AtomicBool,
    /// Whether the export holds the image's write permission now: None when it has none to
    /// hand over (read-only, force-share, engine=null); Some(false) between a migration's
    /// switch-over and the guest's arrival.
    write_lock: Option<Mutex<bool>>,
    /// Rings a frontend started and has not stopped: the guest is running on this disk
    /// (the NBD server refuses to write to it then). Counted by [`RunningQueue`].
    running_queues: AtomicUsize,
    /// The export's mirror job, if one runs: the I/O threads copy the guest's writes to its
    /// target too (see crate::mirror).
    pub mirror: Arc<MirrorSlot>,
}

/// A started ring of the disk's guest, counted while it lives (held by its `QueueHandle`).
pub struct RunningQueue(Arc<Disk>);

impl RunningQueue {
    pub fn new(disk: &Arc<Disk>) -> RunningQueue {
        disk.running_queues.fetch_add(1, Ordering::SeqCst);
        RunningQueue(Arc::clone(disk))
    }
}

impl Drop for RunningQueue {
    fn drop(&mut self) {
        self.0.running_queues.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a disk reads and writes, open.
pub enum Backend {
    /// An image file or block device, and the engine that reads it (io_uring, native, threads).
    File { backing: Backing, engine: EngineKind },
    /// Nothing: reads are zeroes, writes are dropped.
    Null,
    /// An NBD server's export, what it said at open and how long requests wait for it.
    Nbd(Arc<NbdTarget>),
    /// An RBD image, open for the export's life.
    Rbd(Arc<crate::engine::rbd::cluster::RbdHandle>),
}

impl Disk {
    /// Opens the backing `config` names, for the export `id` on `socket`, obeying `limits`.
    /// Creates and truncates nothing.
    pub fn open(
        id: &str,
        socket: &std::path::Path,
        config: &DiskOptions,
        limits: &LimitOptions,
    ) -> Result<Disk, OpenError> {
        let span = tracing::error_span!("export", export = %id, socket = %socket.display());
        // The image lock's waiting is logged from here.
        let _in_span = span.enter();
        // Before the image is opened: a group that refuses this export's limits costs nothing.
        let throttle = crate::qos::throttle::join(limits.group.as_deref(), &limits.throttle)
            .map_err(OpenError::Config)?;
        let (backend, capacity, logical, physical) = match &config.backend {
            BackendSpec::Image(path) => {
                let b = Backing::open(
                    path,
                    config.readonly,
                    config.cache,
                    config.force_share,
                    config.incoming,
                )?;
                let (c, l, p) = (b.capacity_bytes, b.logical_block_bytes, b.physical_block_bytes);
                (Backend::File { backing: b, engine: config.aio }, c, l, p)
            }
            BackendSpec::Null { size_bytes } => (Backend::Null, *size_bytes, 512, 4096),
            BackendSpec::Nbd { spec, options } => {
                nbd_backend(open_nbd(config, spec, options.reconnect_delay_s, &span)?)
            }
            BackendSpec::Rbd(RbdOptions { spec, op_timeout_s }) => {
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
                // RBD stores objects of 4 MiB; 4 KiB is what its writes align to best.
                (Backend::Rbd(Arc::new(image)), size, 512, 4096)
            }
        };
        Disk::assemble(config, span.clone(), throttle, backend, capacity, logical, physical)
    }

    /// The disk around an opened `backend` of `capacity` bytes with the backend's `logical`
    /// and `physical` block sizes: checks the block sizes the export's keys ask for.
    fn assemble(
        config: &DiskOptions,
        span: tracing::Span,
        throttle: Arc<Throttle>,
        backend: Backend,
        capacity: u64,
        logical: u32,
        physical: u32,
    ) -> Result<Disk, OpenError> {
        let name = || match &config.backend {
            BackendSpec::Null { .. } => "engine=null".into(),
            other => PathBuf::from(other.describe()),
        };
        // O_DIRECT needs offsets on the backing's blocks; the page cache takes any. The guest
        // sees the backing's block size unless told otherwise. Smaller blocks than O_DIRECT
        // needs (512-byte sectors on a 4K-sector disk) mean read-modify-write for writes off
        // the backing's blocks, which must not race with other writes to the same blocks:
        // blkplane does it on the only queue, with nothing else in flight.
        let direct_block = if config.cache.direct() { logical } else { SECTOR_SIZE as u32 };
        let engine_block = logical;
        let logical = config.logical_block_bytes.unwrap_or(logical);
        let backing = match &backend {
            Backend::File { backing, .. } => Some(backing),
            _ => None,
        };
        if backing.is_none() && logical < engine_block {
            // Read-modify-write works on a file only; a network engine's smallest block is
            // the server's rule for every cache mode.
            return Err(OpenError::BlockSize(
                name(),
                format!("logical-block-size={logical} is below the server's {engine_block}-byte minimum block"),
            ));
        }
        let rmw_block_bytes = if logical < direct_block && backing.is_some() {
            if config.queues.is_some_and(|n| n != 1) {
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
        let dio_mem_align = backing.map_or(1, |b| b.dio_mem_align as usize);
        let mut serial = [0u8; ID_BYTES];
        serial[..config.serial.len()].copy_from_slice(config.serial.as_bytes());
        let has_write_lock = backing.is_some() && !config.readonly && !config.force_share;
        let num_queues = offered_queues(config, &backend, rmw_block_bytes);
        Ok(Disk {
            span,
            backend,
            cache: config.cache,
            readonly: config.readonly,
            packed_ring: config.packed_ring,
            serial,
            num_queues,
            max_queue_size: config.queue_size,
            logical_block_bytes: logical,
            physical_block_bytes: physical,
            dio_mem_align,
            rmw_block_bytes,
            stats_on: config.stats,
            discard: config.discard,
            stats: (0..num_queues).map(|_| OnceLock::new()).collect(),
            queue_logs: (0..num_queues).map(|_| Mutex::default()).collect(),
            max_guest_memory_bytes: config.max_guest_memory_bytes,
            throttle,
            capacity_bytes: AtomicU64::new(capacity),
            guest_memory_regions: AtomicU64::new(0),
            guest_memory_bytes: AtomicU64::new(0),
            writeback: AtomicBool::new(config.cache.write_cache()),
            flush_failed: AtomicBool::new(false),
            write_lock: has_write_lock.then(|| Mutex::new(!config.incoming)),
            running_queues: AtomicUsize::new(0),
            mirror: Arc::default(),
        })
    }

    /// The disk a mirror's pivot switches the export to: `target`, already open (and locked)
    /// by the job, served with the export's keys (`config`, whose backend names the target),
    /// keeping this disk's statistics, limits, log identity and the guest's write-cache bit.
    pub fn switched_to(&self, config: &DiskOptions, target: Target) -> Result<Disk, String> {
        let (backend, capacity, logical, physical) = match (target, &config.backend) {
            (Target::File { backing, .. }, _) => {
                let (c, l, p) = (
                    backing.capacity_bytes,
                    backing.logical_block_bytes,
                    backing.physical_block_bytes,
                );
                (Backend::File { backing, engine: config.aio }, c, l, p)
            }
            (Target::Nbd(connection), BackendSpec::Nbd { spec, options }) => {
                // The export's queues make connections of their own.
                drop(connection);
                nbd_backend(
                    open_nbd(config, spec, options.reconnect_delay_s, &self.span)
                        .map_err(|e| e.to_string())?,
                )
            }
            (Target::Rbd(image), _) => {
                // RBD stores objects of 4 MiB; 4 KiB is what its writes align to best.
                let size = image.size_bytes()?;
                (Backend::Rbd(image), size, 512, 4096)
            }
            (Target::Nbd(_), other) => {
                return Err(format!("an NBD target for the backend {}", other.describe()))
            }
        };
        if capacity != self.capacity_bytes() {
            return Err(format!(
                "the target has {capacity} bytes, the export {}",
                self.capacity_bytes()
            ));
        }
        let mut disk = Disk::assemble(
            config,
            self.span.clone(),
            Arc::clone(&self.throttle),
            backend,
            capacity,
            logical,
            physical,
        )
        .map_err(|e| e.to_string())?;
        if disk.logical_block_bytes != self.logical_block_bytes {
            return Err(format!(
                "the target's {}-byte blocks are not the guest's {}",
                disk.logical_block_bytes, self.logical_block_bytes
            ));
        }
        disk.stats = self.stats.clone();
        disk.set_writeback(self.writeback());
        Ok(disk)
    }

    /// Takes the image's write permission if the export does not hold it (a migration's
    /// destination when its guest arrives, a source whose guest comes back after a failed
    /// migration), waiting for another holder to give it up (`--image-lock-wait-ms`). Called
    /// before a ring starts; a ring never runs without it. Returns whether it was taken now (the
    /// caller logs it through its export's rate limiter).
    pub fn activate(&self) -> Result<bool, String> {
        let (Some(state), Some(backing)) = (&self.write_lock, self.backing()) else {
            return Ok(false);
        };
        let mut active = state.lock().unwrap_or_else(|p| p.into_inner());
        if *active {
            return Ok(false);
        }
        lock::lock_image(&backing.file, false, false)?;
        *active = true;
        Ok(true)
    }

    /// Gives the image's write permission up: the guest's rings all stopped while its frontend
    /// logged dirty pages, which is a migration's switch-over; the destination may now write.
    /// Returns whether it was given up now (the caller logs it, through its export's rate
    /// limiter: a frontend can make this happen at will).
    ///
    /// Flushes first, as QEMU does before it inactivates an image: with `cache=writeback` (or
    /// `unsafe`) writes the guest saw complete may still be in this host's page cache, and a
    /// destination on another host would read the image without them. A flush that fails, now
    /// or before, keeps the permission here: the destination then waits for an image it cannot
    /// have rather than run on one that lost writes.
    pub fn inactivate(&self) -> Result<bool, String> {
        let (Some(state), Some(backing)) = (&self.write_lock, self.backing()) else {
            return Ok(false);
        };
        let mut active = state.lock().unwrap_or_else(|p| p.into_inner());
        if !*active {
            return Ok(false);
        }
        if self.flush_failed() {
            return Err("a flush failed earlier: written data may be lost".into());
        }
        backing.file.sync_data().map_err(|e| format!("flushing the image failed: {e}"))?;
        lock::lock_inactive(&backing.file)?;
        *active = false;
        Ok(true)
    }

    /// Whether a guest runs on the disk: a frontend has a ring of it started.
    pub fn guest_running(&self) -> bool {
        self.running_queues.load(Ordering::SeqCst) > 0
    }

    /// The image file or block device, if the disk has one.
    pub fn backing(&self) -> Option<&Backing> {
        match &self.backend {
            Backend::File { backing, .. } => Some(backing),
            _ => None,
        }
    }

    /// Records the connected frontend's memory table: `regions` of `bytes` together.
    pub fn note_guest_memory(&self, regions: usize, bytes: u64) {
        self.guest_memory_regions.store(regions as u64, Ordering::Relaxed);
        self.guest_memory_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The connected frontend's memory table: (regions, bytes).
    pub fn guest_memory(&self) -> (u64, u64) {
        let regions = self.guest_memory_regions.load(Ordering::Relaxed);
        (regions, self.guest_memory_bytes.load(Ordering::Relaxed))
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
        if let Backend::Nbd(target) = &self.backend {
            return Err(format!(
                "an NBD export is as large as its server says ({}); resize it there",
                target.spec
            ));
        }
        if let Backend::Rbd(image) = &self.backend {
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
        let file = match self.backing() {
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

    /// Queue `index`'s statistics, made when it first starts (`index` < `num_queues`).
    pub fn queue_stats(&self, index: u16) -> Arc<QueueStats> {
        match self.stats.get(usize::from(index)) {
            Some(cell) => Arc::clone(cell.get_or_init(Arc::default)),
            None => Arc::default(),
        }
    }

    /// The statistics of every queue started since the export opened, with its index.
    pub fn started_queue_stats(&self) -> impl Iterator<Item = (usize, &Arc<QueueStats>)> {
        self.stats.iter().enumerate().filter_map(|(i, cell)| cell.get().map(|q| (i, q)))
    }

    /// Waits until every request admitted so far, on every queue, has been answered.
    fn drain_admitted(&self, timeout: std::time::Duration) -> Result<(), String> {
        // A queue never started has admitted nothing; one starting now reads the new size.
        let started: Vec<&Arc<QueueStats>> = self.stats.iter().filter_map(OnceLock::get).collect();
        let admitted: Vec<u64> =
            started.iter().map(|q| q.admitted.load(Ordering::SeqCst)).collect();
        let deadline = std::time::Instant::now() + timeout;
        while started.iter().zip(&admitted).any(|(q, &a)| q.retired.load(Ordering::Acquire) < a) {
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
        if self.backing().is_none() {
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
        if self.packed_ring {
            f |= feature::RING_PACKED;
        }
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

/// An NBD export's backend with its size and block sizes. The server's minimum block (1 for
/// qemu-nbd on a file, 4096 on a 4K-sector disk with O_DIRECT) is the guest's logical block:
/// requests off it would be refused. Its preferred block is what the guest should align to.
fn nbd_backend(target: NbdTarget) -> (Backend, u64, u32, u32) {
    let n = target.negotiated;
    // `logical-block-size` may not go below it (the check is the disk's).
    let logical = n.smallest_block_bytes();
    let physical = n.preferred_block.clamp(logical, 4096);
    (Backend::Nbd(Arc::new(target)), n.size_bytes, logical, physical)
}

/// The queues an export offers: its `queues=`, or as many as a VMM may ask for, except where
/// only one can be served (read-modify-write; an NBD server without multi-conn).
fn offered_queues(config: &DiskOptions, backend: &Backend, rmw_block_bytes: u64) -> u16 {
    match (config.queues, backend) {
        (Some(n), _) => n,
        (None, Backend::Nbd(t)) if !t.negotiated.has(wire::TFLAG_CAN_MULTI_CONN) => 1,
        (None, _) if rmw_block_bytes != 0 => 1,
        (None, _) => MAX_QUEUES,
    }
}

/// Connects to an NBD export's server once, to learn the export and check that it can be
/// served as asked; the queues make connections of their own.
fn open_nbd(
    config: &DiskOptions,
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
    let multi_conn = n.has(wire::TFLAG_CAN_MULTI_CONN);
    if let Some(queues) = config.queues.filter(|&q| q > 1 && !multi_conn) {
        return refuse(format!(
            "queues={queues} needs a connection per queue, which the server does not allow \
             (no multi-conn; qemu-nbd allows it with --shared=N); use queues=1"
        ));
    }
    let mut target = NbdTarget::new(
        spec.clone(),
        n,
        config.readonly,
        config.cache.dsync(),
        std::time::Duration::from_secs(u64::from(reconnect_delay_s)),
        span.clone(),
        config.queues.unwrap_or(if multi_conn { MAX_QUEUES } else { 1 }),
    );
    // The guest's block as the disk will give it (one below the server's is refused there).
    target.guest_block_bytes = config.logical_block_bytes.unwrap_or(target.guest_block_bytes);
    Ok(target)
}
