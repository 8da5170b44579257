//! The daemon under a service manager (systemd's `Type=notify`): READY=1 once every export
//! listens, STATUS= with the export count as exports come and go, STOPPING=1 on SIGTERM. The
//! test plays the manager with a datagram socket of its own in `NOTIFY_SOCKET`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{make_image, tmpdir};

/// The next notification, as text.
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn ctl(control: &std::path::Path, args: &[&str]) {
    let out = Command::new(common::daemon_bin())
        .args(["ctl", "--control"])
        .arg(control)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_service_manager_hears_ready_status_and_stopping() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    make_image(&image, 1 << 20, 3);
    let notify = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&notify).unwrap();
    manager.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (a, b, control) =
        (dir.path().join("a.sock"), dir.path().join("b.sock"), dir.path().join("ctl.sock"));
    let mut daemon = Command::new(common::daemon_bin())
        .args(["serve", "--control"])
        .arg(&control)
        .arg("--export")
        .arg(format!("id=a,socket={},image={}", a.display(), image.display()))
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The start: the export count first (as exports are added), then ready.
    let mut heard = next(&manager);
    while !heard.contains("READY=1") {
        heard = next(&manager);
    }
    assert!(heard.contains("STATUS=serving 1 export\n"), "{heard:?}");
    // Everything listens by the time READY=1 is sent.
    assert!(std::os::unix::net::UnixStream::connect(&a).is_ok());
    assert!(std::os::unix::net::UnixStream::connect(&control).is_ok());

    ctl(
        &control,
        &["add-export", "id=b", &format!("socket={}", b.display()), "engine=null", "size=1M"],
    );
    assert_eq!(next(&manager), "STATUS=serving 2 exports\n");
    ctl(&control, &["remove-export", "id=a"]);
    assert_eq!(next(&manager), "STATUS=serving 1 export\n");

    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let heard = next(&manager);
    assert!(heard.starts_with("STOPPING=1\n"), "{heard:?}");
    assert!(daemon.wait().unwrap().success());
}

/// Without NOTIFY_SOCKET nothing is sent and nothing fails; with one that goes nowhere the
/// daemon says so and serves on.
#[test]
fn a_missing_service_manager_is_not_an_error() {
    let dir = tmpdir();
    let sock = dir.path().join("a.sock");
    let mut daemon = common::Daemon::start_with(
        dir.path(),
        &["--export".into(), format!("socket={},engine=null,size=1M", sock.display())],
        std::slice::from_ref(&sock),
    );
    assert!(daemon.alive());
    assert!(daemon.stop().success());
    let gone = dir.path().join("nobody.sock");
    let log = dir.path().join("log");
    let mut child = Command::new(common::daemon_bin())
        .arg("serve")
        .arg("--export")
        .arg(format!("socket={},engine=null,size=1M", sock.display()))
        .env("NOTIFY_SOCKET", &gone)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "the daemon did not serve");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("cannot notify the service manager"), "{log}");
}

/// contrib/: the unit file passes `systemd-analyze verify` (with ExecStart pointed at the
/// binary under test), and the example configuration passes `--check-config` (with its paths
/// moved into a temporary directory and its group made one this machine has).
#[test]
fn the_contrib_files_are_valid() {
    let contrib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let dir = tmpdir();
    let unit = std::fs::read_to_string(contrib.join("blkplane.service")).unwrap();
    assert!(unit.contains("Type=notify"));
    let unit_path = dir.path().join("blkplane.service");
    std::fs::write(&unit_path, unit.replace("/usr/bin/blkplane", &common::daemon_bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert!(!stderr.contains("blkplane.service"), "systemd-analyze verify warns: {stderr}");

    let toml = std::fs::read_to_string(contrib.join("blkplane.toml")).unwrap();
    let d = dir.path().display().to_string();
    let toml = toml
        .replace("/run/blkplane", &d)
        .replace("/var/lib/blkplane", &d)
        .replace("127.0.0.1:9180", "127.0.0.1:0")
        .replace("\"kvm\"", "\"root\"");
    let config = dir.path().join("blkplane.toml");
    std::fs::write(&config, toml).unwrap();
    make_image(&dir.path().join("vm1.raw"), 1 << 20, 1);
    let out = Command::new(common::daemon_bin())
        .args(["serve", "--check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "check-config: {}", String::from_utf8_lossy(&out.stderr));
}
