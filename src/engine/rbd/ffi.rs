//! The few librados and librbd C functions the RBD engine calls (no maintained Rust binding
//! exists), found at run time: the libraries are loaded when the first RBD export opens, not
//! linked, so that a host that serves no RBD image needs no Ceph library to build or run
//! blkplane (QEMU loads its rbd driver as a module for the same reason). `cluster.rs` and
//! `engine.rs` call them through the table [`load`] returns.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

pub type RadosT = *mut c_void;
pub type RadosIoctxT = *mut c_void;
pub type RbdImageT = *mut c_void;
pub type RbdCompletionT = *mut c_void;
pub type RbdCallbackT = Option<unsafe extern "C" fn(c: RbdCompletionT, arg: *mut c_void)>;

/// `rbd_aio_write_zeroes`: allocate the zeroed range instead of deallocating it.
pub const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

/// The libraries by their sonames (what the runtime packages install; the unversioned
/// `librbd.so` comes only with the -dev package), and the Debian package that has each.
const LIBRBD: &str = "librbd.so.1";
const LIBRADOS: &str = "librados.so.2";
const LIBRBD_PACKAGE: &str = "librbd1";
const LIBRADOS_PACKAGE: &str = "librados2";

type Ioctx = RadosIoctxT;
type Image = RbdImageT;
type Completion = RbdCompletionT;

/// The functions used, as declared in `rados/librados.h` and `rbd/librbd.h` (Ceph 15 and
/// later: `rbd_aio_write_zeroes` is the newest), and the libraries that hold them.
pub struct Ceph {
    pub rados_create2:
        unsafe extern "C" fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(RadosT),
    pub rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut Ioctx) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(Ioctx),
    /// (ioctx, name, image out, snapshot or null)
    pub rbd_open: unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(Image, u64) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, RbdCallbackT, *mut Completion) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(Completion) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(Completion),
    pub rbd_aio_wait_for_complete: unsafe extern "C" fn(Completion) -> c_int,
    /// (image, iov, iovcnt, offset, completion)
    pub rbd_aio_readv:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(Image, Completion) -> c_int,
    /// (image, offset, length, completion)
    pub rbd_aio_discard: unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int,
    /// (image, offset, length, completion, zero flags, op flags)
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(Image, u64, usize, Completion, c_int, c_int) -> c_int,
    /// Never unloaded: the function pointers above point into them.
    _rbd: Library,
    _rados: Library,
}

/// The table, once loaded. A failed load is not kept: an export added after the operator
/// installed the package finds the libraries.
static CEPH: OnceLock<Ceph> = OnceLock::new();

/// The Ceph functions, loading librbd and librados on the first call. The error is one line
/// naming the library and the Debian package that installs it.
pub fn load() -> Result<&'static Ceph, String> {
    if let Some(ceph) = CEPH.get() {
        return Ok(ceph);
    }
    // Two exports opening at once may both load: dlopen counts references, and the loser's
    // copy of the table is dropped (dlclose only lowers the count).
    let ceph = Ceph::load()?;
    Ok(CEPH.get_or_init(|| ceph))
}

fn open(name: &str, package: &str) -> Result<Library, String> {
    // SAFETY: librbd's and librados' initialisers (C++ static constructors) only set up
    // their own globals; they are thread-safe to run at any point of the process's life.
    unsafe { Library::new(name) }.map_err(|e| {
        format!("cannot load {name}, which RBD exports need (Debian package {package}): {e}")
    })
}

/// The function `name` of `lib`, as the type `T` the caller's field declares.
///
/// # Safety
/// `T` must be the function's C prototype.
unsafe fn function<T: Copy>(lib: &Library, lib_name: &str, name: &str) -> Result<T, String> {
    let symbol = format!("{name}\0");
    // SAFETY: the caller promises `T` is the function's type; the pointer is copied out and
    // stays valid as long as `lib` is loaded, which `Ceph` keeps for the process's life.
    match unsafe { lib.get::<T>(symbol.as_bytes()) } {
        Ok(f) => Ok(*f),
        Err(_) => Err(format!("{lib_name} has no {name}: Ceph 15 (Octopus) or later is needed")),
    }
}

impl Ceph {
    fn load() -> Result<Ceph, String> {
        // librbd first: it needs librados, and its error names that if librados is missing.
        let rbd = open(LIBRBD, LIBRBD_PACKAGE)?;
        let rados = open(LIBRADOS, LIBRADOS_PACKAGE)?;
        let (r, b) = ((&rados, LIBRADOS), (&rbd, LIBRBD));
        // SAFETY: every field's type is the prototype of the function of its name in
        // librados.h and librbd.h (checked against Ceph 16's headers).
        unsafe {
            Ok(Ceph {
                rados_create2: function(r.0, r.1, "rados_create2")?,
                rados_conf_read_file: function(r.0, r.1, "rados_conf_read_file")?,
                rados_conf_set: function(r.0, r.1, "rados_conf_set")?,
                rados_connect: function(r.0, r.1, "rados_connect")?,
                rados_shutdown: function(r.0, r.1, "rados_shutdown")?,
                rados_ioctx_create: function(r.0, r.1, "rados_ioctx_create")?,
                rados_ioctx_destroy: function(r.0, r.1, "rados_ioctx_destroy")?,
                rbd_open: function(b.0, b.1, "rbd_open")?,
                rbd_open_read_only: function(b.0, b.1, "rbd_open_read_only")?,
                rbd_close: function(b.0, b.1, "rbd_close")?,
                rbd_get_size: function(b.0, b.1, "rbd_get_size")?,
                rbd_resize: function(b.0, b.1, "rbd_resize")?,
                rbd_aio_create_completion: function(b.0, b.1, "rbd_aio_create_completion")?,
                rbd_aio_get_return_value: function(b.0, b.1, "rbd_aio_get_return_value")?,
                rbd_aio_release: function(b.0, b.1, "rbd_aio_release")?,
                rbd_aio_wait_for_complete: function(b.0, b.1, "rbd_aio_wait_for_complete")?,
                rbd_aio_readv: function(b.0, b.1, "rbd_aio_readv")?,
                rbd_aio_writev: function(b.0, b.1, "rbd_aio_writev")?,
                rbd_aio_flush: function(b.0, b.1, "rbd_aio_flush")?,
                rbd_aio_discard: function(b.0, b.1, "rbd_aio_discard")?,
                rbd_aio_write_zeroes: function(b.0, b.1, "rbd_aio_write_zeroes")?,
                _rbd: rbd,
                _rados: rados,
            })
        }
    }
}
