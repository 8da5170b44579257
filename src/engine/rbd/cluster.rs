//! Connections to Ceph clusters, shared by every export of the daemon that names the same
//! cluster (configuration file, user, options), and the RBD images opened on them.

use std::ffi::CString;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::ffi::{self, Ceph, RadosIoctxT, RadosT, RbdImageT};
use super::spec::RbdSpec;
use crate::engine::CacheMode;

/// How long connecting to the monitors may take (Ceph's own default is five minutes).
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// What makes two exports' cluster connections the same one.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ClusterKey {
    conf: Option<std::path::PathBuf>,
    user: Option<String>,
    options: Vec<(String, String)>,
    op_timeout_s: u32,
}

/// One connection to a cluster (a `rados_t`), shut down when its last image is closed.
pub struct Cluster {
    ceph: &'static Ceph,
    handle: RadosT,
    key: ClusterKey,
}

// SAFETY: librados handles are thread-safe; the handle is only shut down in Drop, when no
// image (and so no thread) uses it any more.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: created by rados_create2; every ioctx and image on it is gone (they hold
        // an Arc to this cluster).
        unsafe { (self.ceph.rados_shutdown)(self.handle) };
    }
}

/// The daemon's cluster connections, by key. Weak: a connection lives as long as the exports
/// using it.
static CLUSTERS: Mutex<Vec<Weak<Cluster>>> = Mutex::new(Vec::new());
/// Opening an image reads the cache settings from its cluster's configuration, which is set
/// just before: one open at a time.
static OPENING: Mutex<()> = Mutex::new(());

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

fn errno_text(rc: i32) -> String {
    std::io::Error::from_raw_os_error(-rc).to_string()
}

impl Cluster {
    /// Takes `dead` out of the daemon's connections, so that the next export to ask gets a
    /// new one (a blocklisted client stays fenced off for good; a new one has a new address).
    fn forget(dead: &Arc<Cluster>) {
        let mut clusters = CLUSTERS.lock().unwrap_or_else(|p| p.into_inner());
        clusters.retain(|w| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(dead)));
    }

    /// The connection for `spec`'s cluster: the daemon's existing one, or a new one.
    fn get(spec: &RbdSpec, op_timeout_s: u32) -> Result<Arc<Cluster>, String> {
        let key = ClusterKey {
            conf: spec.conf.clone(),
            user: spec.user.clone(),
            options: spec.options.clone(),
            op_timeout_s,
        };
        let mut clusters = CLUSTERS.lock().unwrap_or_else(|p| p.into_inner());
        clusters.retain(|w| w.strong_count() > 0);
        if let Some(c) = clusters.iter().filter_map(Weak::upgrade).find(|c| c.key == key) {
            return Ok(c);
        }
        let cluster = Arc::new(Self::connect(key)?);
        clusters.push(Arc::downgrade(&cluster));
        Ok(cluster)
    }

    fn connect(key: ClusterKey) -> Result<Cluster, String> {
        // The first RBD export loads the libraries.
        let ceph = ffi::load()?;
        let user = format!("client.{}", key.user.as_deref().unwrap_or("admin"));
        let name = cstring("the user", &user)?;
        let mut handle: RadosT = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; strings are NUL-terminated and outlive the call.
        let rc = unsafe { (ceph.rados_create2)(&mut handle, c"ceph".as_ptr(), name.as_ptr(), 0) };
        if rc < 0 {
            return Err(format!("cannot create a Ceph client: {}", errno_text(rc)));
        }
        // From here on Drop shuts the handle down on any error.
        let cluster = Cluster { ceph, handle, key };
        let conf = match &cluster.key.conf {
            Some(p) => {
                if !p.is_file() {
                    return Err(format!("Ceph configuration {} does not exist", p.display()));
                }
                Some(cstring("ceph-conf", &p.to_string_lossy())?)
            }
            None => None,
        };
        // SAFETY: a live handle; a null path means Ceph's default search.
        let rc = unsafe {
            (ceph.rados_conf_read_file)(
                cluster.handle,
                conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        if rc < 0 {
            let which = cluster
                .key
                .conf
                .as_ref()
                .map_or("the default Ceph configuration".into(), |p| p.display().to_string());
            return Err(format!("cannot read {which}: {}", errno_text(rc)));
        }
        let mut settings: Vec<(String, String)> = vec![
            ("client_mount_timeout".into(), MOUNT_TIMEOUT.as_secs().to_string()),
            ("rados_mon_op_timeout".into(), MOUNT_TIMEOUT.as_secs().to_string()),
            ("rados_osd_op_timeout".into(), cluster.key.op_timeout_s.to_string()),
            // Ceph's own logging would go to files under /var/log; errors reach our log.
            ("log_to_stderr".into(), "false".into()),
            ("err_to_stderr".into(), "false".into()),
            ("log_file".into(), String::new()),
        ];
        settings.extend(cluster.key.options.iter().cloned());
        for (k, v) in &settings {
            cluster.set(k, v)?;
        }
        // SAFETY: a configured handle. Blocks up to client_mount_timeout.
        let rc = unsafe { (ceph.rados_connect)(cluster.handle) };
        if rc < 0 {
            return Err(format!(
                "cannot connect to the Ceph cluster as {user}: {}",
                errno_text(rc)
            ));
        }
        Ok(cluster)
    }

    fn set(&self, key: &str, value: &str) -> Result<(), String> {
        let (k, v) = (cstring("a Ceph option", key)?, cstring("a Ceph option", value)?);
        // SAFETY: a live handle; NUL-terminated strings outliving the call.
        let rc = unsafe { (self.ceph.rados_conf_set)(self.handle, k.as_ptr(), v.as_ptr()) };
        if rc < 0 {
            return Err(format!("Ceph option {key}={value}: {}", errno_text(rc)));
        }
        Ok(())
    }
}

/// An open RBD image, shared by the export's queues (librbd's image handle takes requests
/// from any thread).
pub struct RbdImage {
    pub spec: RbdSpec,
    /// Whether librbd caches writes (cache modes with a write cache): a write the guest
    /// wants durable is followed by a flush.
    pub cached: bool,
    pub handle: RbdImageT,
    /// The Ceph functions, for the engine's calls on `handle`.
    pub ceph: &'static Ceph,
    ioctx: RadosIoctxT,
    /// Keeps the connection up while the image is open.
    cluster: Arc<Cluster>,
}

// SAFETY: librbd image handles are thread-safe for aio calls; close happens in Drop, after
// every engine (which hold an Arc) is gone.
unsafe impl Send for RbdImage {}
// SAFETY: as above.
unsafe impl Sync for RbdImage {}

impl Drop for RbdImage {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open on ioctx; no request is in flight (engines drain before
        // they drop, and hold this image until then).
        unsafe {
            (self.ceph.rbd_close)(self.handle);
            (self.ceph.rados_ioctx_destroy)(self.ioctx);
        }
    }
}

impl RbdImage {
    /// Opens `spec`'s image with the librbd cache settings `cache` asks for: no cache for
    /// the O_DIRECT modes (a write is acked once the OSDs have it), a write-back cache for
    /// writeback and unsafe (FLUSH flushes it), a write-through cache for writethrough.
    pub fn open(
        spec: &RbdSpec,
        readonly: bool,
        cache: CacheMode,
        op_timeout_s: u32,
    ) -> Result<RbdImage, String> {
        let cluster = Cluster::get(spec, op_timeout_s)?;
        let ceph = cluster.ceph;
        let pool = cstring("the pool", &spec.pool)?;
        let mut ioctx: RadosIoctxT = std::ptr::null_mut();
        // SAFETY: a connected cluster; out-pointer to a local.
        let rc = unsafe { (ceph.rados_ioctx_create)(cluster.handle, pool.as_ptr(), &mut ioctx) };
        if rc == -libc::ENOENT {
            return Err(format!("pool '{}' does not exist", spec.pool));
        }
        if rc < 0 {
            return Err(format!("pool '{}': {}", spec.pool, errno_text(rc)));
        }
        let image_name = cstring("the image", &spec.image)?;
        let snap = spec.snapshot.as_deref().map(|s| cstring("the snapshot", s)).transpose()?;
        let (cached, max_dirty) = match cache {
            CacheMode::None | CacheMode::DirectSync => (false, "0"),
            CacheMode::Writethrough => (true, "0"),
            CacheMode::Writeback | CacheMode::Unsafe => (true, "25165824"),
        };
        let mut handle: RbdImageT = std::ptr::null_mut();
        let rc = {
            let _one = OPENING.lock().unwrap_or_else(|p| p.into_inner());
            let set = cluster
                .set("rbd_cache", if cached { "true" } else { "false" })
                .and_then(|()| cluster.set("rbd_cache_max_dirty", max_dirty));
            if let Err(e) = set {
                // SAFETY: created above, unused.
                unsafe { (ceph.rados_ioctx_destroy)(ioctx) };
                return Err(e);
            }
            let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
            // SAFETY: a live ioctx; NUL-terminated names; out-pointer to a local.
            unsafe {
                if readonly || snap.is_some() {
                    (ceph.rbd_open_read_only)(ioctx, image_name.as_ptr(), &mut handle, snap_ptr)
                } else {
                    (ceph.rbd_open)(ioctx, image_name.as_ptr(), &mut handle, snap_ptr)
                }
            }
        };
        if rc < 0 {
            // SAFETY: created above; no image was opened on it.
            unsafe { (ceph.rados_ioctx_destroy)(ioctx) };
            return Err(if rc == -libc::ENOENT {
                match &spec.snapshot {
                    Some(s) => format!(
                        "image '{}' or its snapshot '{s}' does not exist in pool '{}'",
                        spec.image, spec.pool
                    ),
                    None => {
                        format!("image '{}' does not exist in pool '{}'", spec.image, spec.pool)
                    }
                }
            } else {
                format!("cannot open image {}: {}", spec.name(), errno_text(rc))
            });
        }
        Ok(RbdImage { spec: spec.clone(), cached, handle, ceph, ioctx, cluster })
    }

    pub fn size_bytes(&self) -> Result<u64, String> {
        let mut size = 0u64;
        // SAFETY: an open image; out-pointer to a local.
        let rc = unsafe { (self.ceph.rbd_get_size)(self.handle, &mut size) };
        if rc < 0 {
            return Err(format!("image {}: size: {}", self.spec.name(), errno_text(rc)));
        }
        Ok(size)
    }

    pub fn resize(&self, bytes: u64) -> Result<(), String> {
        // SAFETY: an open image.
        let rc = unsafe { (self.ceph.rbd_resize)(self.handle, bytes) };
        if rc < 0 {
            return Err(format!("resizing image {}: {}", self.spec.name(), errno_text(rc)));
        }
        Ok(())
    }
}

/// Blocking reads and writes, for a mirror job's source and target (`mirror/source.rs`,
/// `mirror/target.rs`): one aio call each, waited for.
impl RbdImage {
    fn wait_for(
        &self,
        what: &str,
        start: impl FnOnce(ffi::RbdCompletionT) -> std::ffi::c_int,
    ) -> Result<(), String> {
        let fail = |rc: i32| format!("RBD {}: {what}: {}", self.spec.name(), errno_text(rc));
        let mut c: ffi::RbdCompletionT = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; no callback, so no argument to outlive anything.
        let rc =
            unsafe { (self.ceph.rbd_aio_create_completion)(std::ptr::null_mut(), None, &mut c) };
        if rc < 0 {
            return Err(fail(rc));
        }
        let rc = start(c);
        if rc < 0 {
            // SAFETY: librbd refused the request, so the completion is still ours alone.
            unsafe { (self.ceph.rbd_aio_release)(c) };
            return Err(fail(rc));
        }
        // SAFETY: a completion librbd took a request on; waited for, then released once.
        let result = unsafe {
            (self.ceph.rbd_aio_wait_for_complete)(c);
            let r = (self.ceph.rbd_aio_get_return_value)(c);
            (self.ceph.rbd_aio_release)(c);
            r
        };
        if result < 0 {
            return Err(fail(result as i32));
        }
        Ok(())
    }

    /// Reads `into.len()` bytes at `offset`, within the image.
    pub fn read_at(&self, offset: u64, into: &mut [u8]) -> Result<(), String> {
        let iov = libc::iovec { iov_base: into.as_mut_ptr().cast(), iov_len: into.len() };
        // SAFETY: an open image; `iov` and `into` outlive the request (wait_for waits for it),
        // and nothing else touches `into` meanwhile (it is borrowed mutably).
        self.wait_for("read", |c| unsafe {
            (self.ceph.rbd_aio_readv)(self.handle, &iov, 1, offset, c)
        })
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        let iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
        // SAFETY: an open image; `iov` and `data` outlive the request (wait_for waits for it).
        self.wait_for("write", |c| unsafe {
            (self.ceph.rbd_aio_writev)(self.handle, &iov, 1, offset, c)
        })
    }

    pub fn write_zeroes(&self, offset: u64, bytes: u64) -> Result<(), String> {
        // SAFETY: an open image; nothing of ours is referenced.
        self.wait_for("write-zeroes", |c| unsafe {
            (self.ceph.rbd_aio_write_zeroes)(self.handle, offset, bytes as usize, c, 0, 0)
        })
    }

    pub fn flush(&self) -> Result<(), String> {
        // SAFETY: an open image.
        self.wait_for("flush", |c| unsafe { (self.ceph.rbd_aio_flush)(self.handle, c) })
    }
}

/// The errno librados gives every request of a client the cluster has blocklisted
/// (EBLOCKLISTED, which is ESHUTDOWN on Linux).
pub const EBLOCKLISTED: i32 = libc::ESHUTDOWN;

/// An export's image as its queues reach it: the open image, and a new one when the cluster
/// fenced the connection off (blocklisted it). Queues pick a new image up by its generation
/// at their next request; reopening runs on a thread of its own, never on an I/O thread.
pub struct RbdHandle {
    spec: RbdSpec,
    readonly: bool,
    cache: CacheMode,
    op_timeout_s: u32,
    current: Mutex<Arc<RbdImage>>,
    generation: std::sync::atomic::AtomicU64,
    reopening: std::sync::atomic::AtomicBool,
    span: tracing::Span,
}

impl RbdHandle {
    pub fn open(
        spec: &RbdSpec,
        readonly: bool,
        cache: CacheMode,
        op_timeout_s: u32,
        span: tracing::Span,
    ) -> Result<RbdHandle, String> {
        let image = RbdImage::open(spec, readonly, cache, op_timeout_s)?;
        Ok(RbdHandle {
            spec: spec.clone(),
            readonly,
            cache,
            op_timeout_s,
            current: Mutex::new(Arc::new(image)),
            generation: std::sync::atomic::AtomicU64::new(0),
            reopening: std::sync::atomic::AtomicBool::new(false),
            span,
        })
    }

    /// The image to send requests to now, and its generation.
    pub fn image(&self) -> (Arc<RbdImage>, u64) {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (Arc::clone(&current), self.generation.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Whether a newer image than generation `seen` is there (one atomic load).
    pub fn changed_since(&self, seen: u64) -> bool {
        self.generation.load(std::sync::atomic::Ordering::Acquire) != seen
    }

    /// `image` answered EBLOCKLISTED: connect again and open the image anew, in the
    /// background, once (later calls while it runs do nothing).
    pub fn reopen(self: &Arc<Self>, image: &Arc<RbdImage>) {
        use std::sync::atomic::Ordering;
        if self.reopening.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if !Arc::ptr_eq(&current, image) {
                // Already replaced: requests on the old one were late.
                self.reopening.store(false, Ordering::Release);
                return;
            }
        }
        Cluster::forget(&image.cluster);
        tracing::warn!(parent: &self.span, image = %self.spec.name(),
            "the Ceph cluster blocklisted this client; connecting again");
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("blkplane-rbd-reopen".into()).spawn(move || {
            let mut backoff_ms = 100;
            loop {
                match RbdImage::open(&me.spec, me.readonly, me.cache, me.op_timeout_s) {
                    Ok(image) => {
                        *me.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(image);
                        me.generation.fetch_add(1, Ordering::AcqRel);
                        tracing::info!(parent: &me.span, image = %me.spec.name(), "RBD image open again on a new connection");
                        me.reopening.store(false, Ordering::Release);
                        return;
                    }
                    Err(e) => tracing::warn!(parent: &me.span, "reopening RBD {}: {e}", me.spec.name()),
                }
                if Arc::strong_count(&me) == 1 {
                    // The export is gone.
                    return;
                }
                std::thread::sleep(Duration::from_millis(backoff_ms));
                backoff_ms = (backoff_ms * 2).min(5000);
            }
        });
        if spawned.is_err() {
            self.reopening.store(false, Ordering::Release);
        }
    }

    pub fn size_bytes(&self) -> Result<u64, String> {
        self.image().0.size_bytes()
    }

    pub fn resize(&self, bytes: u64) -> Result<(), String> {
        self.image().0.resize(bytes)
    }
}
