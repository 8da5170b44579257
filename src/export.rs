//! An export as the operator asks for it: one `--export` spec (also a `[[export]]` table of
//! the config file or an add-export on the control socket) parsed into an [`ExportConfig`].
//! The disk it serves is `crate::disk::Disk`.

use std::fmt;
use std::path::PathBuf;

use crate::blk::{ID_BYTES, SECTOR_SIZE};
use crate::disk::MAX_NULL_BYTES;
use crate::engine::nbd::{self, NbdSpec};
use crate::engine::rbd::{self, RbdSpec};
use crate::engine::{CacheMode, EngineKind};
use crate::iothread::poll::{PollPolicy, MAX_POLL_MAX_US};
use crate::iothread::registry::ThreadChoice;
use crate::qos::ThrottleConfig;

/// What is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    Image(PathBuf),
    Null {
        size_bytes: u64,
    },
    /// An NBD server's export (`image=nbd://...` or `nbd+unix://...`); requests wait up to
    /// `reconnect_delay_s` for a lost server before they fail.
    Nbd {
        spec: NbdSpec,
        reconnect_delay_s: u32,
    },
    /// A Ceph RBD image (`image=rbd:POOL/IMAGE...` or `pool=`, `rbd-image=`); requests fail
    /// after `op_timeout_s` seconds without an answer from the cluster (0: they wait).
    Rbd {
        spec: RbdSpec,
        op_timeout_s: u32,
    },
}

/// One `--export` specification, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// Name used by the control socket and in statistics (default: export0, export1, ...).
    pub id: Option<String>,
    pub socket: PathBuf,
    pub backend: BackendSpec,
    pub queues: u16,
    pub queue_size: u16,
    pub cache: CacheMode,
    pub readonly: bool,
    pub serial: String,
    /// Which I/O threads serve the queues (`iothread=`; default the shared pool).
    pub iothread: ThreadChoice,
    /// Polling of the export's dedicated threads (`iothread=dedicated`).
    pub poll: PollPolicy,
    /// CPUs the dedicated I/O threads are pinned to, queue i on cpus[i % len]; empty: not
    /// pinned.
    pub cpus: Vec<usize>,
    /// Counters and sampled per-layer timestamps (default on).
    pub stats: bool,
    /// Serve the image even if another process locks it, and let others use it too.
    pub force_share: bool,
    /// The destination of a live migration: the image's write permission is taken when the
    /// guest first starts a ring here, not at open (see `Disk::activate`).
    pub incoming: bool,
    /// The engine for an image (io_uring, native or threads).
    pub aio: EngineKind,
    /// Block sizes the guest sees (512 or 4096); default: what the backing needs.
    pub logical_block_bytes: Option<u32>,
    pub physical_block_bytes: Option<u32>,
    /// The most guest RAM one frontend of this export may have the daemon map.
    pub max_guest_memory_bytes: u64,
    /// Who may connect to the socket: its mode (default 0600), group and owner.
    pub socket_access: SocketAccess,
    /// What the guest's discards do (`discard=`).
    pub discard: DiscardMode,
    /// A listening Unix socket inherited from the parent (`socket-fd=N`, or systemd's
    /// LISTEN_FDS matched by id) to serve on instead of binding `socket`; its path is left
    /// alone when the export goes. `socket` is then its path, for display.
    pub socket_fd: Option<i32>,
    /// Rate limits (`iops-total=`, `bps-read=`, ...): the export's own, or with
    /// `throttle_group` the group's, shared with every export that names it.
    pub throttle: ThrottleConfig,
    pub throttle_group: Option<String>,
}

/// The RBD keys of an export spec, before they become an [`RbdSpec`].
#[derive(Default)]
struct RbdKeys {
    pool: Option<String>,
    image: Option<String>,
    conf: Option<PathBuf>,
    user: Option<String>,
    op_timeout_s: Option<u32>,
}

impl RbdKeys {
    /// `rbd:POOL/IMAGE` from `pool=` and `rbd-image=`, if given.
    fn location(&self) -> Result<Option<String>, ConfigError> {
        match (&self.pool, &self.image) {
            (Some(pool), Some(image)) => {
                let escape = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
                Ok(Some(format!("rbd:{}/{}", escape(pool), escape(image))))
            }
            (Some(_), None) => err("pool= needs rbd-image=IMAGE"),
            (None, Some(_)) => err("rbd-image= needs pool=POOL"),
            (None, None) => Ok(None),
        }
    }

    /// The connection keys over what the `rbd:` string said.
    fn apply(&self, spec: &mut RbdSpec) {
        if let Some(conf) = &self.conf {
            spec.conf = Some(conf.clone());
        }
        if let Some(user) = &self.user {
            spec.user = Some(user.clone());
        }
    }

    /// Whether a key only an RBD image takes was given.
    fn any(&self) -> bool {
        self.conf.is_some() || self.user.is_some() || self.op_timeout_s.is_some()
    }
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

/// Permissions of an export's socket. The socket is created owner-only; these widen it on
/// purpose (for a VMM that runs as another user, as libvirt's QEMU does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Mode bits (e.g. 0o660); `None`: 0600.
    pub mode: Option<u32>,
    /// Group name or number.
    pub group: Option<String>,
    /// Owner name or number (the daemon must run as root to give it away).
    pub owner: Option<String>,
}

/// Default `max-guest-memory`: 1 TiB, more than a VM on one host has, far less than the
/// address space every tenant shares.
pub const DEFAULT_MAX_GUEST_MEMORY_BYTES: u64 = 1 << 40;

pub const DEFAULT_QUEUES: u16 = 1;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUES: u16 = 64;
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// The keys `--export` understands, for help text and error messages.
pub const EXPORT_KEYS: &str = "id, socket, image, engine, size, queues, queue-size, cache, aio, \
readonly, serial, iothread, poll, poll-max-us, cpus, stats, force-share, logical-block-size, \
physical-block-size, max-guest-memory, socket-mode, socket-group, socket-owner, incoming, discard, \
socket-fd, reconnect-delay, pool, rbd-image, ceph-conf, ceph-user, ceph-op-timeout, iops-total, \
iops-read, iops-write, bps-total, bps-read, bps-write (each also with -max and -max-length), \
iops-size, throttle-group";

/// qemu-storage-daemon's names for keys that mean the same here (`--export` of type
/// vhost-user-blk), so that its users' specs work: theirs → ours. `writable` is the opposite
/// of `readonly` and handled apart.
const QSD_ALIASES: [(&str, &str); 2] = [("num-queues", "queues"), ("addr.path", "socket")];

/// qemu-storage-daemon keys with no equivalent here, and what to write instead.
const QSD_ONLY: [(&str, &str); 4] = [
    ("node-name", "image=PATH names the image itself; there are no block nodes"),
    ("type", "every export is vhost-user-blk"),
    ("addr.type", "socket=PATH, a Unix socket"),
    ("fixed-iothread", "iothread=NAME"),
];

/// A bad `--export` value: one line naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Parses a byte count with an optional binary suffix: 4096, 64K, 1M, 10G, 1T.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        Some((i, 't' | 'T')) => (&s[..i], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| ConfigError(format!("'{s}' is not a size (e.g. 1048576, 64K, 1G)")))?;
    n.checked_mul(1 << shift).ok_or_else(|| ConfigError(format!("size '{s}' is too large")))
}

/// Longest export id or I/O thread name.
pub const MAX_NAME_BYTES: usize = 64;

/// Whether `s` can name an export or an I/O thread: 1 to 64 ASCII letters, digits, `-`, `_`
/// and `.` (safe in log lines, metric labels and file names alike).
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => err(format!("{key}={v}: expected on or off")),
    }
}

/// Parses a CPU list: `0`, `0,2`, `0-3`, `0-1,4`. Every CPU must be one this process may
/// run on (its affinity mask, which a cpuset narrows), not merely exist.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, ConfigError> {
    let allowed = crate::sys::allowed_cpus();
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let bad = || ConfigError(format!("'{part}' is not a CPU number or range"));
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => {
                (a.parse::<usize>().map_err(|_| bad())?, b.parse::<usize>().map_err(|_| bad())?)
            }
            None => {
                let c = part.parse::<usize>().map_err(|_| bad())?;
                (c, c)
            }
        };
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(bad());
        }
        if let Some(c) = (a..=b).find(|c| !allowed.contains(c)) {
            return Err(ConfigError(format!(
                "CPU {c} is not one this process may use (allowed: {})",
                format_cpu_list(&allowed)
            )));
        }
        cpus.extend(a..=b);
    }
    Ok(cpus)
}

/// Writes a CPU list the way `parse_cpu_list` reads it: `0-3,6`.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    parts.join(",")
}

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, ConfigError> {
    v.parse().map_err(|_| ConfigError(format!("{key}={v}: not a number")))
}

/// Splits `k=v,k=v` into pairs; `,,` stands for a literal comma inside a value. `keys` names
/// the keys the spec may have, for the error message.
pub fn split_pairs(spec: &str, keys: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
        .into_iter()
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => err(format!("'{item}' is not key=value (keys: {keys})")),
        })
        .collect()
}

/// Joins key/value pairs (from the control socket or the config file) into an --export
/// spec, so that every source of exports is parsed by `ExportConfig::parse`.
pub fn spec_from_pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a str, String)>,
) -> Result<String, ConfigError> {
    let mut parts = Vec::new();
    for (k, v) in pairs {
        if k.contains([',', '=']) {
            return err(format!("'{k}' is not an export key (keys: {EXPORT_KEYS})"));
        }
        parts.push(format!("{k}={}", v.replace(',', ",,")));
    }
    Ok(parts.join(","))
}

/// A value of a spec key, typed as the config file writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecValue {
    Str(String),
    Int(u64),
    Bool(bool),
}

impl fmt::Display for SpecValue {
    /// As `--export` writes it (booleans as on/off).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecValue::Str(s) => f.write_str(s),
            SpecValue::Int(n) => write!(f, "{n}"),
            SpecValue::Bool(b) => f.write_str(if *b { "on" } else { "off" }),
        }
    }
}

impl SpecValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            SpecValue::Str(s) => s.as_str().into(),
            SpecValue::Int(n) => (*n).into(),
            SpecValue::Bool(b) => (*b).into(),
        }
    }

    pub fn to_toml(&self) -> toml::Value {
        match self {
            SpecValue::Str(s) => toml::Value::String(s.clone()),
            // Sizes up to 2^60 bytes fit in TOML's signed integers; larger would not parse
            // back as sizes anyway.
            SpecValue::Int(n) => i64::try_from(*n)
                .map(toml::Value::Integer)
                .unwrap_or_else(|_| toml::Value::String(n.to_string())),
            SpecValue::Bool(b) => toml::Value::Boolean(*b),
        }
    }
}

impl ExportConfig {
    /// Every key of the export with its value, defaults included, such that
    /// `ExportConfig::parse` of them gives this config back: the whole spec, as
    /// `list-exports` and `dump-config` show it.
    pub fn to_pairs(&self) -> Vec<(&'static str, SpecValue)> {
        use SpecValue::{Bool, Int, Str};
        let path = |p: &std::path::Path| Str(p.display().to_string());
        let mut pairs = Vec::new();
        if let Some(id) = &self.id {
            pairs.push(("id", Str(id.clone())));
        }
        // An inherited socket is shown (and dumped) by its path when it has one: a later
        // daemon binds that path itself.
        match self.socket_fd {
            Some(fd) if self.socket.as_os_str().is_empty() => {
                pairs.push(("socket-fd", Int(fd as u64)))
            }
            _ => pairs.push(("socket", path(&self.socket))),
        }
        match &self.backend {
            BackendSpec::Image(p) => {
                pairs.push(("image", path(p)));
                let aio = match self.aio {
                    EngineKind::Native => "native",
                    EngineKind::Threads => "threads",
                    EngineKind::IoUring | EngineKind::Null | EngineKind::Nbd | EngineKind::Rbd => {
                        "io_uring"
                    }
                };
                pairs.push(("aio", Str(aio.into())));
            }
            BackendSpec::Null { size_bytes } => {
                pairs.push(("engine", Str("null".into())));
                pairs.push(("size", Int(*size_bytes)));
            }
            BackendSpec::Nbd { spec, reconnect_delay_s } => {
                pairs.push(("image", Str(spec.to_string())));
                pairs.push(("reconnect-delay", Int(u64::from(*reconnect_delay_s))));
            }
            BackendSpec::Rbd { spec, op_timeout_s } => {
                pairs.push(("pool", Str(spec.pool.clone())));
                let image = match &spec.snapshot {
                    Some(snap) => format!("{}@{snap}", spec.image),
                    None => spec.image.clone(),
                };
                pairs.push(("rbd-image", Str(image)));
                if let Some(conf) = &spec.conf {
                    pairs.push(("ceph-conf", path(conf)));
                }
                if let Some(user) = &spec.user {
                    pairs.push(("ceph-user", Str(user.clone())));
                }
                pairs.push(("ceph-op-timeout", Int(u64::from(*op_timeout_s))));
            }
        }
        pairs.push(("queues", Int(self.queues.into())));
        pairs.push(("queue-size", Int(self.queue_size.into())));
        pairs.push(("cache", Str(self.cache.to_string())));
        pairs.push(("readonly", Bool(self.readonly)));
        pairs.push(("discard", Str(self.discard.name().into())));
        pairs.push(("serial", Str(self.serial.clone())));
        pairs.push(("iothread", Str(self.iothread.to_string())));
        if self.iothread == ThreadChoice::Dedicated {
            pairs.push(("poll", Str(self.poll.mode.to_string())));
            pairs.push(("poll-max-us", Int(self.poll.max_us.into())));
            if !self.cpus.is_empty() {
                pairs.push(("cpus", Str(format_cpu_list(&self.cpus))));
            }
        }
        pairs.push(("stats", Bool(self.stats)));
        pairs.push(("force-share", Bool(self.force_share)));
        pairs.push(("incoming", Bool(self.incoming)));
        if let Some(n) = self.logical_block_bytes {
            pairs.push(("logical-block-size", Int(n.into())));
        }
        if let Some(n) = self.physical_block_bytes {
            pairs.push(("physical-block-size", Int(n.into())));
        }
        pairs.push(("max-guest-memory", Int(self.max_guest_memory_bytes)));
        if let Some(mode) = self.socket_access.mode {
            pairs.push(("socket-mode", Str(format!("{mode:04o}"))));
        }
        if let Some(g) = &self.socket_access.group {
            pairs.push(("socket-group", Str(g.clone())));
        }
        if let Some(o) = &self.socket_access.owner {
            pairs.push(("socket-owner", Str(o.clone())));
        }
        pairs.extend(self.throttle.to_pairs().into_iter().map(|(k, v)| (k, Int(v))));
        if let Some(g) = &self.throttle_group {
            pairs.push(("throttle-group", Str(g.clone())));
        }
        pairs
    }

    /// Parses `socket=PATH,image=PATH[,queues=N]...`.
    pub fn parse(spec: &str) -> Result<ExportConfig, ConfigError> {
        let mut id = None;
        let mut socket = None;
        let mut image = None;
        let mut engine = None;
        let mut size = None;
        let mut queues = DEFAULT_QUEUES;
        let mut queue_size = DEFAULT_QUEUE_SIZE;
        let mut cache = CacheMode::None;
        let mut readonly = false;
        let mut serial = String::new();
        let mut poll = PollPolicy::default();
        let mut cpus = Vec::new();
        let mut stats = true;
        let mut force_share = false;
        let mut incoming = false;
        let mut aio = EngineKind::IoUring;
        let mut logical_block_bytes = None;
        let mut physical_block_bytes = None;
        let mut max_guest_memory_bytes = DEFAULT_MAX_GUEST_MEMORY_BYTES;
        let mut socket_access = SocketAccess::default();
        let mut discard = DiscardMode::default();
        let mut socket_fd = None;
        let mut reconnect_delay_s = None;
        let mut rbd_keys = RbdKeys::default();
        let mut seen = Vec::new();
        let mut iothread = None;
        let mut thread_keys = Vec::new();
        let mut throttle = ThrottleConfig::default();
        let mut throttle_group = None;
        for (key, value) in split_pairs(spec, EXPORT_KEYS)? {
            let (key, value) = match key.as_str() {
                "writable" => ("readonly".to_string(), (!parse_bool(&key, &value)?).to_string()),
                k => match QSD_ALIASES.iter().find(|(theirs, _)| *theirs == k) {
                    Some((_, ours)) => (ours.to_string(), value),
                    None => (key, value),
                },
            };
            if let Some((k, instead)) = QSD_ONLY.iter().find(|(theirs, _)| *theirs == key) {
                return err(format!(
                    "unknown key '{k}' (a qemu-storage-daemon key; blkplane: {instead})"
                ));
            }
            if seen.contains(&key) {
                return err(format!("key '{key}' given twice"));
            }
            seen.push(key.clone());
            match key.as_str() {
                "id" => {
                    if !is_name(&value) {
                        return err(format!(
                            "id={value}: 1 to 64 letters, digits, '-', '_' or '.'"
                        ));
                    }
                    id = Some(value);
                }
                "socket" => socket = Some(PathBuf::from(&value)),
                "socket-fd" => match value.parse::<i32>() {
                    Ok(fd) if fd >= 0 => socket_fd = Some(fd),
                    _ => return err(format!("socket-fd={value}: a descriptor number")),
                },
                "image" => image = Some(PathBuf::from(&value)),
                "engine" => match value.as_str() {
                    "null" => engine = Some(EngineKind::Null),
                    other => return err(format!("engine={other}: the only engine= value is null")),
                },
                "size" => size = Some(parse_size(&value)?),
                "queues" => {
                    queues = parse_num(&key, &value)?;
                    if queues == 0 || queues > MAX_QUEUES {
                        return err(format!("queues={value}: must be 1 to {MAX_QUEUES}"));
                    }
                }
                "queue-size" => {
                    queue_size = parse_num(&key, &value)?;
                    if !queue_size.is_power_of_two() || !(4..=MAX_QUEUE_SIZE).contains(&queue_size)
                    {
                        return err(format!(
                            "queue-size={value}: must be a power of two from 4 to {MAX_QUEUE_SIZE}"
                        ));
                    }
                }
                "cache" => cache = value.parse().map_err(ConfigError)?,
                "aio" => match value.as_str() {
                    "io_uring" => aio = EngineKind::IoUring,
                    "native" => aio = EngineKind::Native,
                    "threads" => aio = EngineKind::Threads,
                    other => {
                        return err(format!(
                            "aio={other}: supported engines: io_uring, native, threads"
                        ))
                    }
                },
                "readonly" => readonly = parse_bool(&key, &value)?,
                "discard" => {
                    discard = match value.as_str() {
                        "unmap" | "on" => DiscardMode::Unmap,
                        "ignore" | "off" => DiscardMode::Ignore,
                        _ => return err(format!("discard={value}: unmap or ignore")),
                    }
                }
                "stats" => stats = parse_bool(&key, &value)?,
                "force-share" => force_share = parse_bool(&key, &value)?,
                "incoming" => incoming = parse_bool(&key, &value)?,
                "logical-block-size" | "physical-block-size" => {
                    let size = match value.as_str() {
                        "512" => 512,
                        "4096" | "4K" | "4k" => 4096,
                        _ => return err(format!("{key}={value}: 512 or 4096")),
                    };
                    if key == "logical-block-size" {
                        logical_block_bytes = Some(size);
                    } else {
                        physical_block_bytes = Some(size);
                    }
                }
                "serial" => {
                    if value.len() > ID_BYTES {
                        return err(format!("serial={value}: at most {ID_BYTES} bytes"));
                    }
                    serial = value;
                }
                "iothread" => iothread = Some(ThreadChoice::parse(&value).map_err(ConfigError)?),
                "poll" => {
                    thread_keys.push("poll");
                    poll.mode = value.parse().map_err(ConfigError)?
                }
                "poll-max-us" => {
                    thread_keys.push("poll-max-us");
                    poll.max_us = parse_num(&key, &value)?;
                    if poll.max_us > MAX_POLL_MAX_US {
                        return err(format!("poll-max-us={value}: at most {MAX_POLL_MAX_US}"));
                    }
                }
                "cpus" => {
                    thread_keys.push("cpus");
                    cpus = parse_cpu_list(&value)
                        .map_err(|e| ConfigError(format!("cpus={value}: {e}")))?
                }
                "max-guest-memory" => {
                    max_guest_memory_bytes = parse_size(&value)?;
                    if max_guest_memory_bytes == 0 {
                        return err("max-guest-memory=0: a guest needs some memory");
                    }
                }
                "socket-mode" => {
                    let mode = u32::from_str_radix(&value, 8).ok().filter(|m| *m <= 0o777);
                    match mode {
                        Some(m) if m & 0o600 == 0o600 => socket_access.mode = Some(m),
                        Some(_) => {
                            return err(format!(
                            "socket-mode={value}: the owner needs read and write (0600 at least)"
                        ))
                        }
                        None => {
                            return err(format!("socket-mode={value}: an octal mode like 0660"))
                        }
                    }
                }
                "socket-group" | "socket-owner" => {
                    if value.is_empty() {
                        return err(format!("{key}= is empty"));
                    }
                    if key == "socket-group" {
                        socket_access.group = Some(value);
                    } else {
                        socket_access.owner = Some(value);
                    }
                }
                "reconnect-delay" => {
                    let delay: u32 = parse_num(&key, &value)?;
                    if delay > nbd::MAX_RECONNECT_DELAY_S {
                        return err(format!(
                            "reconnect-delay={value}: at most {} seconds",
                            nbd::MAX_RECONNECT_DELAY_S
                        ));
                    }
                    reconnect_delay_s = Some(delay);
                }
                "pool" => rbd_keys.pool = Some(value),
                "rbd-image" => rbd_keys.image = Some(value),
                "ceph-conf" => rbd_keys.conf = Some(PathBuf::from(value)),
                "ceph-user" => rbd_keys.user = Some(value),
                "ceph-op-timeout" => {
                    let timeout: u32 = parse_num(&key, &value)?;
                    if timeout > rbd::MAX_OP_TIMEOUT_S {
                        return err(format!(
                            "ceph-op-timeout={value}: at most {} seconds",
                            rbd::MAX_OP_TIMEOUT_S
                        ));
                    }
                    rbd_keys.op_timeout_s = Some(timeout);
                }
                "throttle-group" => {
                    if !is_name(&value) {
                        return err(format!(
                            "throttle-group={value}: 1 to 64 letters, digits, '-', '_' or '.'"
                        ));
                    }
                    throttle_group = Some(value);
                }
                other => {
                    if !throttle.take_key(other, &value).map_err(|e| ConfigError(e.0))? {
                        return err(format!("unknown key '{other}' (keys: {EXPORT_KEYS})"));
                    }
                }
            }
        }
        throttle.check().map_err(|e| ConfigError(e.0))?;
        // poll, poll-max-us and cpus describe threads of the export's own: they ask for them
        // when no iothread= is given, and make no sense on threads shared with others (those
        // have their own settings, on --iothread).
        let iothread = match (iothread, thread_keys.first()) {
            (None, Some(_)) => ThreadChoice::Dedicated,
            (Some(ThreadChoice::Dedicated), _) => ThreadChoice::Dedicated,
            (choice, None) => choice.unwrap_or_default(),
            (Some(shared), Some(key)) => {
                return err(format!(
                    "{key}= is a setting of the export's own I/O threads (iothread=dedicated); \
                     iothread={shared} shares threads, whose polling and CPUs are set on --iothread"
                ))
            }
        };
        let socket = match (socket, socket_fd) {
            (Some(_), Some(_)) => return err("socket= and socket-fd= exclude each other"),
            (Some(s), None) if !s.as_os_str().is_empty() => s,
            // The inherited socket's path is looked up when the export opens.
            (None, Some(_)) => PathBuf::new(),
            _ => return err("missing socket=PATH (or socket-fd=N)"),
        };
        let image = match (image, rbd_keys.location()?) {
            (Some(_), Some(_)) => return err("image= and pool=/rbd-image= exclude each other"),
            (None, Some(location)) => Some(PathBuf::from(location)),
            (image, None) => image,
        };
        let backend = match (image, engine, size) {
            (Some(_), Some(_), _) => return err("image= and engine=null exclude each other"),
            (Some(_), None, Some(_)) => {
                return err("size= goes with engine=null; an image's size is its file size")
            }
            (Some(p), None, None) if p.as_os_str().is_empty() => return err("image= is empty"),
            (Some(p), None, None) if NbdSpec::is_uri(&p.to_string_lossy()) => {
                if seen.iter().any(|k| k == "aio") {
                    return err(
                        "aio= chooses how an image file is read; an NBD export has its own engine",
                    );
                }
                let spec = NbdSpec::parse(&p.to_string_lossy()).map_err(ConfigError)?;
                BackendSpec::Nbd {
                    spec,
                    reconnect_delay_s: reconnect_delay_s.unwrap_or(nbd::DEFAULT_RECONNECT_DELAY_S),
                }
            }
            (Some(p), None, None) if RbdSpec::is_uri(&p.to_string_lossy()) => {
                if seen.iter().any(|k| k == "aio") {
                    return err(
                        "aio= chooses how an image file is read; an RBD image has its own engine",
                    );
                }
                let mut spec = RbdSpec::parse(&p.to_string_lossy()).map_err(ConfigError)?;
                rbd_keys.apply(&mut spec);
                if spec.snapshot.is_some() && !readonly {
                    if seen.iter().any(|k| k == "readonly") {
                        return err(format!("{}: a snapshot is served read-only", spec.name()));
                    }
                    readonly = true;
                }
                BackendSpec::Rbd { spec, op_timeout_s: rbd_keys.op_timeout_s.unwrap_or(0) }
            }
            (Some(p), None, None) => BackendSpec::Image(p),
            (None, Some(EngineKind::Null), Some(bytes)) => {
                if bytes == 0 || bytes % SECTOR_SIZE != 0 || bytes > MAX_NULL_BYTES {
                    return err(format!(
                        "size={bytes}: must be a non-zero multiple of 512, at most 2^60"
                    ));
                }
                BackendSpec::Null { size_bytes: bytes }
            }
            (None, Some(_), None) => return err("engine=null needs size=BYTES"),
            (None, _, _) => return err("missing image=PATH (or engine=null,size=BYTES)"),
        };
        if reconnect_delay_s.is_some() && !matches!(backend, BackendSpec::Nbd { .. }) {
            return err("reconnect-delay= is for NBD exports (image=nbd://... or nbd+unix://...)");
        }
        if rbd_keys.any() && !matches!(backend, BackendSpec::Rbd { .. }) {
            return err("ceph-conf=, ceph-user= and ceph-op-timeout= are for RBD images (pool=, rbd-image=)");
        }
        Ok(ExportConfig {
            id,
            socket,
            backend,
            queues,
            queue_size,
            cache,
            readonly,
            serial,
            iothread,
            poll,
            cpus,
            stats,
            force_share,
            incoming,
            aio,
            logical_block_bytes,
            physical_block_bytes,
            max_guest_memory_bytes,
            socket_access,
            discard,
            socket_fd,
            throttle,
            throttle_group,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c = ExportConfig::parse(
            "socket=/s,image=/i,,x,queues=4,queue-size=128,cache=writeback,aio=io_uring,readonly=on,serial=abc",
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/s"));
        assert_eq!(c.backend, BackendSpec::Image(PathBuf::from("/i,x")));
        assert_eq!((c.queues, c.queue_size), (4, 128));
        assert_eq!(c.cache, CacheMode::Writeback);
        assert!(c.readonly);
        assert_eq!(c.serial, "abc");
    }

    #[test]
    fn null_engine_needs_size() {
        let c = ExportConfig::parse("socket=/s,engine=null,size=1G").unwrap();
        assert_eq!(c.backend, BackendSpec::Null { size_bytes: 1 << 30 });
        assert_eq!(
            ExportConfig::parse("socket=/s,engine=null").unwrap_err().0,
            "engine=null needs size=BYTES"
        );
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let cases = [
            ("image=/i", "missing socket=PATH (or socket-fd=N)"),
            ("socket=/s", "missing image=PATH (or engine=null,size=BYTES)"),
            ("socket=/s,image=/i,colour=red", "unknown key 'colour' (keys: id, socket, image, engine, size, queues, queue-size, cache, aio, readonly, serial, iothread, poll, poll-max-us, cpus, stats, force-share, logical-block-size, physical-block-size, max-guest-memory, socket-mode, socket-group, socket-owner, incoming, discard, socket-fd, reconnect-delay, pool, rbd-image, ceph-conf, ceph-user, ceph-op-timeout, iops-total, iops-read, iops-write, bps-total, bps-read, bps-write (each also with -max and -max-length), iops-size, throttle-group)"),
            ("socket=/s,image=/i,poll=sometimes", "poll=sometimes: one of adaptive, always, never"),
            ("socket=/s,image=/i,poll-max-us=1000000", "poll-max-us=1000000: at most 100000"),
            ("socket=/s,image=/i,queues=0", "queues=0: must be 1 to 64"),
            ("socket=/s,image=/i,queue-size=100", "queue-size=100: must be a power of two from 4 to 1024"),
            ("socket=/s,image=/i,cache=fast", "unknown cache mode 'fast' (one of none, directsync, writeback, writethrough, unsafe)"),
            ("socket=/s,image=/i,readonly=maybe", "readonly=maybe: expected on or off"),
            ("socket=/s,image=/i,serial=012345678901234567890", "serial=012345678901234567890: at most 20 bytes"),
            ("socket=/s,image=/i,socket=/t", "key 'socket' given twice"),
            ("socket=/s,engine=null,size=1000", "size=1000: must be a non-zero multiple of 512, at most 2^60"),
            ("socket=/s,image=/i,logical-block-size=1024", "logical-block-size=1024: 512 or 4096"),
            ("socket=/s,image=/i,id=a b", "id=a b: 1 to 64 letters, digits, '-', '_' or '.'"),
            ("socket=/s,image=/i,aio=posix", "aio=posix: supported engines: io_uring, native, threads"),
            ("socket=/s,image", "'image' is not key=value (keys: id, socket, image, engine, size, queues, queue-size, cache, aio, readonly, serial, iothread, poll, poll-max-us, cpus, stats, force-share, logical-block-size, physical-block-size, max-guest-memory, socket-mode, socket-group, socket-owner, incoming, discard, socket-fd, reconnect-delay, pool, rbd-image, ceph-conf, ceph-user, ceph-op-timeout, iops-total, iops-read, iops-write, bps-total, bps-read, bps-write (each also with -max and -max-length), iops-size, throttle-group)"),
        ];
        for (spec, want) in cases {
            assert_eq!(ExportConfig::parse(spec).unwrap_err().0, want, "spec {spec}");
        }
        let e = ExportConfig::parse("socket=/s,image=/i,cpus=999").unwrap_err().0;
        assert!(
            e.starts_with("cpus=999: CPU 999 is not one this process may use (allowed: "),
            "{e}"
        );
        assert_eq!(ExportConfig::parse("socket=/s,image=/i,cpus=0").unwrap().cpus, vec![0]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn qemu_storage_daemon_key_names_work_where_they_mean_the_same() {
        let c = ExportConfig::parse("addr.path=/s,image=/i,num-queues=4,writable=off").unwrap();
        assert_eq!(c.socket, std::path::PathBuf::from("/s"));
        assert_eq!(c.queues, 4);
        assert!(c.readonly);
        assert!(!ExportConfig::parse("socket=/s,image=/i,writable=on").unwrap().readonly);
        let e = ExportConfig::parse("socket=/s,image=/i,node-name=disk0").unwrap_err();
        assert_eq!(
            e.0,
            "unknown key 'node-name' (a qemu-storage-daemon key; blkplane: image=PATH names the image itself; there are no block nodes)"
        );
        let e = ExportConfig::parse("socket=/s,image=/i,queues=2,num-queues=4").unwrap_err();
        assert_eq!(e.0, "key 'queues' given twice");
    }

    #[test]
    fn the_whole_spec_parses_back_to_the_same_export() {
        for spec in [
            "socket=/s,image=/i",
            "id=vm-1,socket=/run/a,,b.sock,image=/img/x,,y.raw,queues=4,queue-size=128,cache=writeback,aio=threads,readonly=on,discard=ignore,serial=SN 1,stats=off,force-share=on,incoming=on,logical-block-size=4096,physical-block-size=4096,max-guest-memory=2G,socket-mode=0660,socket-group=kvm,socket-owner=qemu",
            "socket=/s,engine=null,size=1G,iothread=dedicated,poll=always,poll-max-us=10,cpus=0",
            "socket=/s,image=/i,iothread=a:b",
            "socket=/s,image=/i,iops-read=100,iops-read-max=300,iops-read-max-length=10,bps-write=4M,iops-size=16K,throttle-group=tenant-7",
        ] {
            let config = ExportConfig::parse(spec).unwrap();
            let pairs = config.to_pairs();
            let again = spec_from_pairs(pairs.iter().map(|(k, v)| (*k, v.to_string()))).unwrap();
            assert_eq!(ExportConfig::parse(&again).unwrap(), config, "{spec} → {again}");
        }
        let c = ExportConfig::parse("socket=/s,image=/i").unwrap();
        let keys: Vec<&str> = c.to_pairs().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "socket",
                "image",
                "aio",
                "queues",
                "queue-size",
                "cache",
                "readonly",
                "discard",
                "serial",
                "iothread",
                "stats",
                "force-share",
                "incoming",
                "max-guest-memory"
            ]
        );
    }

    #[test]
    fn discard_is_unmap_or_ignore() {
        let parse = |extra: &str| ExportConfig::parse(&format!("socket=/s,image=/i{extra}"));
        assert_eq!(parse("").unwrap().discard, DiscardMode::Unmap);
        assert_eq!(parse(",discard=unmap").unwrap().discard, DiscardMode::Unmap);
        assert_eq!(parse(",discard=ignore").unwrap().discard, DiscardMode::Ignore);
        // QEMU's -drive spellings.
        assert_eq!(parse(",discard=on").unwrap().discard, DiscardMode::Unmap);
        assert_eq!(parse(",discard=off").unwrap().discard, DiscardMode::Ignore);
        assert_eq!(parse(",discard=trim").unwrap_err().0, "discard=trim: unmap or ignore");
    }
}
