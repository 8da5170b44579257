//! Where the vhost-user-blk spec leaves room, blkplane behaves as qemu-storage-daemon does,
//! so that tooling written for it keeps working: an interrupt on a new call fd, and
//! listening sockets handed over by a parent (`socket-fd=N`) or by systemd (`LISTEN_FDS`).
//! (Discard segments beyond the device's one are tests/hostile.rs.)

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::frontend::{TestFrontend, S_OK, T_IN};
use common::{tmpdir, wait_until, Client, Daemon};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

/// A used entry published before the frontend switches call fds is noticed after: the new
/// call fd is signalled once when it is set.
#[test]
fn a_new_call_fd_is_signalled_when_set() {
    let dir = tmpdir();
    let sock = dir.path().join("a.sock");
    let _daemon =
        Daemon::start(dir.path(), &[format!("socket={},engine=null,size=1M", sock.display())]);
    let mut fe = TestFrontend::connect(&sock, 1, 64, 0);
    let (c, _) = fe.request(0, T_IN, 0, &[], 512);
    assert_eq!(c.status, S_OK);
    // What the old fd got is gone with it; the new one has heard nothing yet.
    let _ = fe.queues[0].call.read();
    let new_call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert!(new_call.read().is_err(), "a fresh eventfd is empty");
    fe.fe.set_vring_call(0, &new_call).unwrap();
    wait_until("an interrupt on the new call fd", Duration::from_secs(5), || {
        new_call.read().is_ok()
    });
    // The ring still serves, and answers on the new fd.
    fe.queues[0].call = new_call;
    let (c, _) = fe.request(0, T_IN, 8, &[], 512);
    assert_eq!(c.status, S_OK);
}

/// Starts `blkplane serve ARGS` with `fds` (listening sockets of ours) as its descriptors
/// 3, 4, ...; with `systemd_names`, also LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID as systemd sets
/// them (LISTEN_PID through a shell that execs the daemon, to have its pid).
fn spawn_with_fds(
    dir: &Path,
    fds: &[RawFd],
    args: &[String],
    systemd_names: Option<&str>,
) -> Child {
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut cmd = match systemd_names {
        Some(names) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("LISTEN_PID=$$ exec \"$@\"")
                .arg("sh")
                .arg(common::daemon_bin())
                .env("LISTEN_FDS", fds.len().to_string())
                .env("LISTEN_FDNAMES", names);
            c
        }
        None => Command::new(common::daemon_bin()),
    };
    cmd.arg("serve").args(args).stdout(Stdio::null()).stderr(log);
    assert!(fds.len() <= 8);
    let mut given = [-1 as RawFd; 8];
    given[..fds.len()].copy_from_slice(fds);
    let count = fds.len();
    // SAFETY: between fork and exec only fcntl and dup2 run, on descriptors the parent keeps
    // open, with no allocation.
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (a source may already be 3 or 4), then down to 3, 4, ...;
            // dup2 clears close-on-exec on the copy.
            let mut high = [-1 as RawFd; 8];
            for i in 0..count {
                high[i] = libc::fcntl(given[i], libc::F_DUPFD, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in high.iter().enumerate().take(count) {
                if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn stop(mut child: Child) -> std::process::ExitStatus {
    common::signal(child.id() as i32, libc::SIGTERM);
    child.wait().unwrap()
}

#[test]
fn an_inherited_listening_socket_is_served_with_socket_fd() {
    let dir = tmpdir();
    let path = dir.path().join("passed.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let ctl = dir.path().join("ctl.sock");
    let child = spawn_with_fds(
        dir.path(),
        &[listener.as_raw_fd()],
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--export".into(),
            "id=a,socket-fd=3,engine=null,size=1M".into(),
        ],
        None,
    );
    wait_until("the control socket", Duration::from_secs(10), || ctl.exists());
    // Our own copy stays open: the daemon's must be the one that accepts and serves.
    let mut c = Client::connect(&path, 1);
    assert!(c.read_at(0, 0, 4096, 0).unwrap().iter().all(|&b| b == 0));
    drop(c);
    let out = common::ctl(&ctl, &["list-exports"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["socket"], path.display().to_string());
    assert_eq!(list[0]["spec"]["socket"], path.display().to_string(), "shown by its path");
    assert!(stop(child).success());
    assert!(path.exists(), "the parent's socket file was removed");
}

#[test]
fn systemd_socket_activation_matches_names_to_export_ids() {
    let dir = tmpdir();
    let (pa, pb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let (la, lb) = (UnixListener::bind(&pa).unwrap(), UnixListener::bind(&pb).unwrap());
    let ctl = dir.path().join("ctl.sock");
    let child = spawn_with_fds(
        dir.path(),
        &[la.as_raw_fd(), lb.as_raw_fd()],
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--export".into(),
            format!("id=vm-b,socket={},engine=null,size=2M", pb.display()),
            "--export".into(),
            "id=vm-a,socket-fd=3,engine=null,size=1M".into(),
        ],
        Some("other:vm-b"),
    );
    wait_until("the control socket", Duration::from_secs(10), || ctl.exists());
    // vm-b listens on the socket named for it (fd 4): its own path was not bound anew.
    let c = Client::connect(&pb, 1);
    assert_eq!(c.capacity(), 2 << 20);
    drop(c);
    let c = Client::connect(&pa, 1);
    assert_eq!(c.capacity(), 1 << 20);
    drop(c);
    assert!(stop(child).success());
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("systemd passed a socket no export has the id of fd=3 name=\"other\""),
        "{log}"
    );
    assert!(pa.exists() && pb.exists(), "inherited socket files are the parent's");
}

/// An export whose id names a socket systemd passed needs no socket= (serve --help says
/// so), on the command line and in the config file.
#[test]
fn an_export_found_only_by_its_systemd_socket_name_serves() {
    let dir = tmpdir();
    let (pa, pb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let (la, lb) = (UnixListener::bind(&pa).unwrap(), UnixListener::bind(&pb).unwrap());
    let cfg = dir.path().join("blkplane.toml");
    std::fs::write(&cfg, "[[export]]\nid = \"vm-b\"\nengine = \"null\"\nsize = \"2M\"\n").unwrap();
    let ctl = dir.path().join("ctl.sock");
    let child = spawn_with_fds(
        dir.path(),
        &[la.as_raw_fd(), lb.as_raw_fd()],
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--config".into(),
            cfg.display().to_string(),
            "--export".into(),
            "id=vm-a,engine=null,size=1M".into(),
        ],
        Some("vm-a:vm-b"),
    );
    wait_until("the control socket", Duration::from_secs(10), || ctl.exists());
    let c = Client::connect(&pa, 1);
    assert_eq!(c.capacity(), 1 << 20);
    drop(c);
    let c = Client::connect(&pb, 1);
    assert_eq!(c.capacity(), 2 << 20);
    drop(c);
    assert!(stop(child).success());
    // Without a passed socket of its name, the export says what it misses.
    let out = Command::new(common::daemon_bin())
        .args(["serve", "--export", "id=vm-c,engine=null,size=1M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "missing socket=PATH (or socket-fd=N, or a socket systemd passes named 'vm-c')"
        ),
        "{err}"
    );
}

/// `socket-fd=` takes only descriptors inherited at start: none of the daemon's own (an
/// export's listening socket, the control socket) can be handed to a second owner, which
/// would close it under the first (issue 28, 5).
#[test]
fn add_export_cannot_take_a_socket_the_daemon_owns() {
    let dir = tmpdir();
    let victim = dir.path().join("victim.sock");
    let ctl = dir.path().join("ctl.sock");
    let mut daemon = common::Daemon::start_with(
        dir.path(),
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--export".into(),
            format!("id=victim,socket={},engine=null,size=1M", victim.display()),
        ],
        &[victim.clone(), ctl.clone()],
    );
    let sockets: Vec<i32> = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    assert!(sockets.len() >= 2, "the daemon's sockets: {sockets:?}");
    for fd in sockets {
        let out = common::ctl(
            &ctl,
            &["add-export", &format!("socket-fd={fd}"), "engine=null", "size=1M"],
        );
        assert_eq!(out.status.code(), Some(1), "socket-fd={fd} was taken");
        let err = String::from_utf8_lossy(&out.stderr);
        // A connection's socket (a ctl call's, accepted) may have closed since the listing:
        // then it is refused as closed.
        let closed = !Path::new(&format!("/proc/{}/fd/{fd}", daemon.pid())).exists();
        let refused = err
            .contains(&format!("socket-fd={fd}: not a descriptor the daemon inherited at start"))
            || err.contains(&format!("socket-fd={fd}: not listening"))
            || (closed && err.contains(&format!("socket-fd={fd}: not an open descriptor")));
        assert!(refused, "socket-fd={fd}: {err}");
    }
    // Everything still serves, and nothing spins.
    let mut c = Client::connect(&victim, 1);
    assert!(c.read_at(0, 0, 4096, 0).is_ok());
    drop(c);
    assert!(common::ctl(&ctl, &["list-exports"]).status.success());
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid())).unwrap();
        let fields: Vec<u64> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        fields[10] + fields[11]
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    assert!(cpu() - before < 20, "the daemon spins: {} ticks in 1 s", cpu() - before);
    assert!(daemon.stop().success());
}

#[test]
fn a_bad_socket_fd_is_refused_with_one_line() {
    let dir = tmpdir();
    let run = |spec: &str| {
        Command::new(common::daemon_bin()).args(["serve", "--export", spec]).output().unwrap()
    };
    for (spec, want) in [
        ("socket-fd=57,engine=null,size=1M", "socket-fd=57: not an open descriptor"),
        ("socket-fd=1,engine=null,size=1M", "socket-fd=1: not a socket"),
        ("socket-fd=x,engine=null,size=1M", "socket-fd=x: a descriptor number"),
        ("socket=/s,socket-fd=3,engine=null,size=1M", "socket= and socket-fd= exclude each other"),
    ] {
        let out = run(spec);
        assert_eq!(out.status.code(), Some(2), "{spec}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{spec}: {err}");
    }
    // A Unix socket that does not listen.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let child = spawn_with_fds(
        dir.path(),
        &[a.as_raw_fd()],
        &["--export".into(), "socket-fd=3,engine=null,size=1M".into()],
        None,
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("socket-fd=3: not listening"), "{log}");
}

/// Inherited descriptors are fixed at start: a SIGHUP that finds a `socket-fd` export
/// unchanged in the file leaves it serving (taking its descriptor again would fail).
#[test]
fn a_reload_keeps_an_inherited_socket_export() {
    let dir = tmpdir();
    let path = dir.path().join("passed.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let cfg = dir.path().join("blkplane.toml");
    std::fs::write(
        &cfg,
        "[[export]]\nid = \"a\"\nsocket-fd = 3\nengine = \"null\"\nsize = \"1M\"\n",
    )
    .unwrap();
    let child = spawn_with_fds(
        dir.path(),
        &[listener.as_raw_fd()],
        &["--config".into(), cfg.display().to_string()],
        None,
    );
    let log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    wait_until("the export", Duration::from_secs(10), || log().contains("listening"));
    common::signal(child.id() as i32, libc::SIGHUP);
    wait_until("the reload", Duration::from_secs(10), || log().contains("configuration re-read"));
    assert!(!log().contains("was not"), "{}", log());
    assert_eq!(log().matches("export added").count(), 1, "{}", log());
    let mut c = Client::connect(&path, 1);
    assert!(c.read_at(0, 0, 4096, 0).unwrap().iter().all(|&b| b == 0));
    drop(c);
    assert!(stop(child).success());
}
