//! Thin safe wrappers over the few system calls the control side needs that touch no guest
//! pointer: checking descriptors a frontend hands us, file-creation masks, CPU affinity.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

/// Accepts `file` as a kick, call or err descriptor only if it is an eventfd, and makes it
/// non-blocking: a pipe, a regular file or a blocking eventfd near overflow would otherwise
/// block or spin the I/O thread that reads or writes it.
pub fn checked_eventfd(file: File) -> io::Result<File> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an eventfd ({})", link.display()),
        ));
    }
    set_status_flags(file.as_raw_fd(), libc::O_NONBLOCK, 0)?;
    Ok(file)
}

/// Sets the file status flags `add` and clears `remove` on `fd` (F_SETFL: O_NONBLOCK,
/// O_DIRECT and the few others Linux lets change after open).
pub fn set_status_flags(fd: RawFd, add: libc::c_int, remove: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller holds open; F_GETFL/F_SETFL take no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, (flags & !remove) | add) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// fallocate(2) on an open file: `mode` is FALLOC_FL_PUNCH_HOLE or FALLOC_FL_ZERO_RANGE
/// (with FALLOC_FL_KEEP_SIZE where wanted). For the NBD server's trim and write-zeroes.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on a descriptor `file` keeps open; it takes no pointers.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// lseek(2) with SEEK_DATA or SEEK_HOLE from `offset`: the next offset of that kind, or
/// `None` when there is none before the end (ENXIO).
pub fn seek_extent(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let Ok(offset) = i64::try_from(offset) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: lseek on a descriptor `file` keeps open; it takes no pointers. The NBD server
    // reads with pread only, so moving the file offset disturbs no one.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    Ok(Some(at as u64))
}

/// Serializes the code that changes the process's umask (it is process-wide).
static UMASK: Mutex<()> = Mutex::new(());

/// Runs `f` with the file-creation mask `mask`, so that what `f` creates (a socket: bind has
/// no mode argument) never exists with looser permissions, not even for a moment.
pub fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
    let _guard = UMASK.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: umask has no memory-safety preconditions.
    let old = unsafe { libc::umask(mask) };
    let result = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    result
}

/// Signals the main thread handles: SIGTERM and SIGINT end the daemon, SIGHUP reloads its
/// configuration file (without this, SIGHUP's default action would kill it at once).
fn shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and every thread started after, so that
/// only `wait_for_shutdown_signal` receives them. Call before starting any thread.
pub fn block_shutdown_signals() -> io::Result<()> {
    let signals = shutdown_signals();
    // SAFETY: a valid signal set; no old mask is requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits at most `timeout` for SIGTERM, SIGINT or SIGHUP: the signal number, or None when
/// the time ran out (or another signal's handler interrupted the wait), so that the caller
/// can do its periodic work (the service manager's watchdog) and wait again.
pub fn wait_for_shutdown_signal(timeout: std::time::Duration) -> io::Result<Option<i32>> {
    let signals = shutdown_signals();
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid set and timeout; no siginfo is asked for (null).
    let signal = unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), &timeout) };
    if signal >= 0 {
        return Ok(Some(signal));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EINTR) => Ok(None),
        _ => Err(e),
    }
}

/// The CPU ids this process may run on (its affinity mask, which cpusets narrow).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is valid; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pid 0 is this thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        return (0..n).collect();
    }
    // SAFETY: CPU_ISSET reads inside the set for every id below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// Raises the soft limit on open descriptors to the hard one: each connected export holds
/// a handful (socket, kick, call, memory regions), so a daemon serving hundreds of VMs needs
/// more than the customary 1024. Returns the limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(limit.rlim_cur)
    }
}

/// A positive `sysconf` value, or `fallback`.
fn sysconf_or(name: libc::c_int, fallback: u64) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let value = unsafe { libc::sysconf(name) };
    if value > 0 {
        value as u64
    } else {
        fallback
    }
}

pub fn page_size() -> u64 {
    sysconf_or(libc::_SC_PAGESIZE, 4096)
}

/// The unit of the CPU times in /proc (USER_HZ).
pub fn clock_ticks_per_second() -> u64 {
    sysconf_or(libc::_SC_CLK_TCK, 100)
}

/// The soft limit on open descriptors now in force.
pub fn fd_limit() -> io::Result<u64> {
    // SAFETY: getrlimit writes one rlimit we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(limit.rlim_cur)
    }
}

/// User and system CPU time of the whole process, in seconds (microsecond resolution, where
/// /proc's ticks have ten milliseconds).
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The kernel's id of the calling thread.
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid as u32
}

/// A schedstat file's first two figures: nanoseconds on a CPU, and nanoseconds waiting on a
/// run queue for one.
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
}

/// The CPU time the calling thread has used, in ns (0 if the clock cannot be read).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec for clock_gettime to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time and run-queue wait of one of this process's threads
/// (`/proc/self/task/TID/schedstat`).
pub fn thread_schedstat(tid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    parse_schedstat(&text)
}

/// The type of the file system `path` is on (`tmpfs`, `ext4`, ...), from the longest mount
/// point of /proc/self/mounts that contains it.
pub fn filesystem_of(path: &std::path::Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            // Spaces in mount points are written as \040.
            let point = std::path::PathBuf::from(point.replace("\\040", " "));
            path.starts_with(&point).then(|| (point.as_os_str().len(), fstype.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fstype)| fstype)
}

/// tmpfs, and shmem in general: memfd_create, /dev/shm, SysV and anonymous shared memory.
pub const TMPFS_MAGIC: u64 = 0x0102_1994;
pub const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// The file system type (`f_type`, its magic number) of the file `fd` is open on.
pub fn filesystem_magic(fd: RawFd) -> io::Result<u64> {
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes one statfs into the buffer we pass, which outlives the call.
    if unsafe { libc::fstatfs(fd, stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs returned 0, so it filled the whole struct.
    let stat = unsafe { stat.assume_init() };
    // f_type is signed on some targets; the magic numbers are 32-bit patterns.
    Ok(stat.f_type as u64 & 0xffff_ffff)
}

/// Now, in UTC, as `2026-11-22 22:51 UTC`.
pub fn utc_now_text() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rest / 3600, rest % 3600 / 60)
}

/// The descriptors open when the process started (`note_inherited_fds`): only these may be
/// taken as an export's socket (`socket-fd=`); any other number is one of the daemon's own
/// (an export's socket, the control socket), which a second owner would close under it.
static INHERITED_FDS: std::sync::OnceLock<Vec<i32>> = std::sync::OnceLock::new();

/// Records the descriptors this process inherited. Call first thing, before anything opens
/// a descriptor.
pub fn note_inherited_fds() {
    let listed: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    // The listing's own descriptor was in it and is closed now: keep those still open.
    // SAFETY: F_GETFD only reads a descriptor's flags; a closed one is an error return.
    let open: Vec<i32> =
        listed.into_iter().filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0).collect();
    let _ = INHERITED_FDS.set(open);
}

/// Descriptors taken over as listening sockets ([`take_listening_socket`]): each only once,
/// since after the first owner closes it the number may name something else.
static TAKEN_FDS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

fn sockopt_int(fd: i32, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which we own; a bad fd is
    // an error return, not undefined behaviour.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Checks that `fd` is a listening Unix stream socket this process may serve on, and returns
/// the path it is bound to (empty for an unnamed or abstract one). Takes nothing over.
pub fn inspect_listening_socket(fd: i32) -> Result<std::path::PathBuf, String> {
    let what = |e: io::Error| match e.raw_os_error() {
        Some(libc::EBADF) => format!("socket-fd={fd}: not an open descriptor"),
        Some(libc::ENOTSOCK) => format!("socket-fd={fd}: not a socket"),
        _ => format!("socket-fd={fd}: {e}"),
    };
    let domain = sockopt_int(fd, libc::SO_DOMAIN).map_err(what)?;
    let kind = sockopt_int(fd, libc::SO_TYPE).map_err(what)?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(format!("socket-fd={fd}: not a Unix stream socket"));
    }
    if sockopt_int(fd, libc::SO_ACCEPTCONN).map_err(what)? == 0 {
        return Err(format!("socket-fd={fd}: not listening"));
    }
    if !INHERITED_FDS.get().is_some_and(|fds| fds.contains(&fd)) {
        return Err(format!(
            "socket-fd={fd}: not a descriptor the daemon inherited at start (the daemon's own \
             sockets cannot be given to an export)"
        ));
    }
    if TAKEN_FDS.lock().unwrap_or_else(|p| p.into_inner()).contains(&fd) {
        return Err(format!("socket-fd={fd}: already taken by another export"));
    }
    // SAFETY: sockaddr_un is plain data; getsockname writes at most `len` bytes into it.
    let (addr, len) = unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) != 0 {
            return Err(what(io::Error::last_os_error()));
        }
        (addr, len as usize)
    };
    let path_len = len.saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    let bytes: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    // An abstract socket starts with a NUL: no path.
    let path: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(bytes);
    Ok(std::path::PathBuf::from(path))
}

/// Takes over `fd`, an inherited listening Unix socket (checked as
/// [`inspect_listening_socket`] does), as this process's own: close-on-exec from now on.
pub fn take_listening_socket(fd: i32) -> Result<std::os::unix::net::UnixListener, String> {
    use std::os::fd::FromRawFd;
    inspect_listening_socket(fd)?;
    let mut taken = TAKEN_FDS.lock().unwrap_or_else(|p| p.into_inner());
    if taken.contains(&fd) {
        return Err(format!("socket-fd={fd}: already taken by another export"));
    }
    // SAFETY: fcntl on an open descriptor (checked above) changes only its flags.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    taken.push(fd);
    // SAFETY: the descriptor is an open listening socket that nothing else in this process
    // owns: it was inherited for this export, and TAKEN_FDS lets it be taken only once.
    Ok(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn schedstat_gives_cpu_and_wait() {
        assert_eq!(super::parse_schedstat("123 456 7\n"), Some((123, 456)));
        assert_eq!(super::parse_schedstat("123"), None);
        assert_eq!(super::parse_schedstat("x 1 2"), None);
        // Spin until this thread has had 2 ms of CPU (by its own CPU clock: on a loaded
        // machine 2 ms of wall time may hold far less), then leave the CPU once: the running
        // slice is counted when the thread leaves it.
        let start_ns = super::thread_cpu_ns();
        assert!(start_ns > 0);
        while super::thread_cpu_ns() - start_ns < 2_000_000 {
            std::hint::spin_loop();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        let (cpu, _wait) = super::thread_schedstat(super::gettid()).unwrap();
        assert!(cpu >= 1_000_000, "{cpu} ns after spinning 2 ms");
    }

    #[test]
    fn file_systems_and_dates() {
        assert_eq!(
            super::filesystem_of(std::path::Path::new("/proc/self")).as_deref(),
            Some("proc")
        );
        let now = super::utc_now_text();
        assert!(now.starts_with("20") && now.ends_with(" UTC") && now.len() == 20, "{now}");
        let date = std::process::Command::new("date").args(["-u", "+%Y-%m-%d"]).output().unwrap();
        assert_eq!(&now[..10], String::from_utf8_lossy(&date.stdout).trim());
    }
}

/// Which name-service database a name is looked up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    User,
    Group,
}

/// Largest buffer a passwd or group entry may need (a group of many members is the large
/// case); getpwnam_r/getgrnam_r answer ERANGE until the buffer holds the entry.
const MAX_ENTRY_BYTES: usize = 1 << 20;

/// The uid or gid of `name` through the system's name service (getpwnam_r/getgrnam_r, so
/// whatever nsswitch.conf names: files, LDAP, sssd, systemd-userdb); `None` if it has none.
pub fn id_of(kind: IdKind, name: &str) -> io::Result<Option<u32>> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))?;
    let mut buf_bytes = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; buf_bytes];
        let (rc, id) = match kind {
            IdKind::User => user_entry(&name, &mut buf),
            IdKind::Group => group_entry(&name, &mut buf),
        };
        match rc {
            0 => return Ok(id),
            libc::ERANGE if buf_bytes < MAX_ENTRY_BYTES => buf_bytes *= 4,
            // What the manual lists besides 0 for a name that is not there.
            libc::ENOENT | libc::ESRCH => return Ok(None),
            rc => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

/// getpwnam_r into `buf`: its return code and the uid if found.
fn user_entry(name: &std::ffi::CStr, buf: &mut [libc::c_char]) -> (libc::c_int, Option<u32>) {
    let mut entry = std::mem::MaybeUninit::<libc::passwd>::uninit();
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: `name` is NUL-terminated; `entry`, `buf` (with its true length) and `found`
    // are ours and outlive the call, which writes only into them.
    let rc = unsafe {
        libc::getpwnam_r(name.as_ptr(), entry.as_mut_ptr(), buf.as_mut_ptr(), buf.len(), &mut found)
    };
    // SAFETY: a non-null `found` points to `entry`, which the call filled.
    (rc, (rc == 0 && !found.is_null()).then(|| unsafe { (*found).pw_uid }))
}

/// getgrnam_r into `buf`: its return code and the gid if found.
fn group_entry(name: &std::ffi::CStr, buf: &mut [libc::c_char]) -> (libc::c_int, Option<u32>) {
    let mut entry = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `user_entry`, for the group database.
    let rc = unsafe {
        libc::getgrnam_r(name.as_ptr(), entry.as_mut_ptr(), buf.as_mut_ptr(), buf.len(), &mut found)
    };
    // SAFETY: a non-null `found` points to `entry`, which the call filled.
    (rc, (rc == 0 && !found.is_null()).then(|| unsafe { (*found).gr_gid }))
}
