//! The daemon under a service manager (systemd's `Type=notify`): READY=1 once every export
//! listens, STATUS= with the export count as exports come and go, STOPPING=1 on SIGTERM. The
//! test plays the manager with a datagram socket of its own in `NOTIFY_SOCKET`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{make_image, tmpdir, KillOnDrop};

/// The next notification, as text.
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn ctl(control: &std::path::Path, args: &[&str]) {
    let out = common::ctl(control, args);
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
    common::signal(daemon.id() as i32, libc::SIGTERM);
    let heard = next(&manager);
    assert!(heard.starts_with("STOPPING=1\n"), "{heard:?}");
    assert!(daemon.wait().unwrap().success());
}

/// Starts `blkplane serve` (a null export and a control socket) with `NOTIFY_SOCKET` the
/// manager's socket and `env` besides; returns once READY=1 arrived.
fn serve_under_manager(
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> (KillOnDrop, UnixDatagram) {
    let notify = dir.join("notify.sock");
    let manager = UnixDatagram::bind(&notify).unwrap();
    manager.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let sock = dir.join("a.sock");
    let daemon = Command::new(common::daemon_bin())
        .args(["serve", "--control"])
        .arg(dir.join("ctl.sock"))
        .arg("--export")
        .arg(format!("id=a,socket={},engine=null,size=1M", sock.display()))
        .env("NOTIFY_SOCKET", &notify)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while !next(&manager).contains("READY=1") {}
    (KillOnDrop(daemon), manager)
}

/// The notifications that arrive within `span`.
fn heard_within(manager: &UnixDatagram, span: Duration) -> Vec<String> {
    let end = std::time::Instant::now() + span;
    let mut heard = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
        manager.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        if let Ok(n) = manager.recv(&mut buf) {
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    heard
}

/// WatchdogSec=: with WATCHDOG_USEC set for this process the main loop sends WATCHDOG=1 at
/// half the interval; for another process's WATCHDOG_PID, or without it, nothing.
#[test]
fn the_main_loop_feeds_the_watchdog() {
    let dir = tmpdir();
    let (mut daemon, manager) =
        serve_under_manager(dir.path(), &[("WATCHDOG_USEC", "200000".into())]);
    let heard = heard_within(&manager, Duration::from_millis(1500));
    let pings = heard.iter().filter(|h| *h == "WATCHDOG=1\n").count();
    // One every 100 ms: 15 in 1.5 s, give or take a loaded machine.
    assert!((8..=17).contains(&pings), "{pings} pings in 1.5 s: {heard:?}");
    assert_eq!(pings, heard.len(), "{heard:?}");
    common::signal(daemon.0.id() as i32, libc::SIGTERM);
    assert!(daemon.0.wait().unwrap().success());

    for env in [vec![("WATCHDOG_USEC", "200000".to_string()), ("WATCHDOG_PID", "1".into())], vec![]]
    {
        let dir = tmpdir();
        let (_daemon, manager) = serve_under_manager(dir.path(), &env);
        let heard = heard_within(&manager, Duration::from_millis(600));
        assert_eq!(heard, Vec::<String>::new(), "{env:?}");
    }
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
    common::signal(child.id() as i32, libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("cannot notify the service manager"), "{log}");
}

/// contrib/: install.sh puts the binary, the unit, the sysusers and tmpfiles entries, the
/// configuration, the man pages and the completions in place (into a staging root) and makes
/// the unit's directories; the installed unit passes `systemd-analyze verify` (with ExecStart
/// pointed at the installed binary, and its Documentation= man pages found among those
/// installed) and `systemd-analyze security` rates it below 5.0; the installed bash
/// completion completes; the example configuration passes `--check-config` and serves (with
/// its paths moved into the staging root and its group made one this machine has).
#[test]
fn the_contrib_files_are_valid() {
    let dir = tmpdir();
    let staging = dir.path().join("root");
    install_sh(&staging, &[]);
    let usr = staging.join("usr");
    for file in INSTALLED {
        assert!(usr.join(file).is_file(), "install.sh did not install {file}");
    }
    assert!(staging.join("etc/blkplane/blkplane.toml").is_file());
    // The man page renders and documents the export keys and the exit statuses.
    let out = Command::new("man")
        .arg("-l")
        .arg(usr.join("share/man/man1/blkplane-serve.1"))
        .env("MANWIDTH", "100")
        .output()
        .expect("man (Debian's man-db)");
    // Bold and underline come as overstrikes (c, backspace, c): keep the last of each.
    let mut page = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        if c == '\u{8}' {
            page.pop();
        } else {
            page.push(c);
        }
    }
    assert!(page.contains("discard=MODE") && page.contains("--check-config"), "{page}");
    assert!(page.contains("NBD SERVER KEYS") && page.contains("tls-creds=DIR"), "{page}");
    let out = Command::new(usr.join("bin/blkplane")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("blkplane 0.1.0 (commit "));
    // The bash completion loads and completes the subcommands.
    let script = format!(
        "source {}; COMP_WORDS=(blkplane s); COMP_CWORD=1; COMP_LINE='blkplane s'; COMP_POINT=10; _blkplane blkplane s blkplane; echo ${{COMPREPLY[@]}}",
        usr.join("share/bash-completion/completions/blkplane").display()
    );
    let out = Command::new("bash").arg("-c").arg(&script).output().unwrap();
    let words = String::from_utf8_lossy(&out.stdout);
    assert_eq!(words.trim(), "serve stat", "{}", String::from_utf8_lossy(&out.stderr));

    let unit = std::fs::read_to_string(usr.join("lib/systemd/system/blkplane.service")).unwrap();
    for line in [
        "Type=notify\n",
        "WatchdogSec=30s\n",
        "Wants=network-online.target\n",
        "After=network-online.target local-fs.target\n",
        "ReadWritePaths=-/var/lib/blkplane -/run/blkplane\n",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
    // It would re-own /run/blkplane at every start, undoing the tmpfiles entry's group.
    assert!(!unit.lines().any(|l| l.starts_with("RuntimeDirectory")), "{unit}");
    staged_directories_are_made(&staging);
    let unit_path = dir.path().join("blkplane.service");
    let installed_bin = usr.join("bin/blkplane").display().to_string();
    std::fs::write(&unit_path, unit.replace("/usr/bin/blkplane", &installed_bin)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("MANPATH", usr.join("share/man"))
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert!(!stderr.contains("blkplane.service"), "systemd-analyze verify warns: {stderr}");
    let exposure = security_exposure(&unit_path);
    assert!(exposure < 5.0, "systemd-analyze security rates the unit {exposure}");
    // The example socket unit (socket activation by the export's id) verifies beside it.
    let socket = usr.join("share/doc/blkplane/examples/blkplane-vm1.socket");
    let socket_path = dir.path().join("blkplane-vm1.socket");
    std::fs::copy(&socket, &socket_path).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&socket_path)
        .arg(&unit_path)
        .env("MANPATH", usr.join("share/man"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify of the socket unit: {stderr}");
    assert!(!stderr.contains("blkplane-vm1.socket"), "systemd-analyze verify warns: {stderr}");

    the_example_configuration_serves(&staging, dir.path());
}

/// What install.sh installs under the prefix, for install and uninstall alike.
const INSTALLED: [&str; 13] = [
    "bin/blkplane",
    "lib/systemd/system/blkplane.service",
    "lib/tmpfiles.d/blkplane.conf",
    "lib/sysusers.d/blkplane.conf",
    "share/man/man1/blkplane.1",
    "share/man/man1/blkplane-serve.1",
    "share/man/man1/blkplane-ctl.1",
    "share/man/man1/blkplane-stat.1",
    "share/man/man5/blkplane.toml.5",
    "share/bash-completion/completions/blkplane",
    "share/zsh/vendor-completions/_blkplane",
    "share/fish/vendor_completions.d/blkplane.fish",
    "share/doc/blkplane/examples/blkplane-vm1.socket",
];

/// `DESTDIR=staging contrib/install.sh ARGS`, which must succeed.
fn install_sh(staging: &std::path::Path, args: &[&str]) -> String {
    let contrib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let out = Command::new("sh")
        .arg(contrib.join("install.sh"))
        .args(args)
        .env("DESTDIR", staging)
        .env("BLKPLANE_BIN", common::daemon_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// install.sh made the unit's directories as the tmpfiles entry says: 0750, root, group kvm
/// (made in the staging root's /etc/group by the sysusers entry where there was none).
fn staged_directories_are_made(staging: &std::path::Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let groups = std::fs::read_to_string(staging.join("etc/group")).unwrap();
    let kvm: u32 = groups
        .lines()
        .find_map(|l| l.strip_prefix("kvm:x:")?.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no group kvm in the staging root: {groups}"));
    for d in ["run/blkplane", "var/lib/blkplane"] {
        let m = std::fs::metadata(staging.join(d)).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert!(m.is_dir(), "{d}");
        assert_eq!(
            (m.permissions().mode() & 0o7777, m.uid(), m.gid()),
            (0o750, 0, kvm),
            "{d}: mode, owner, group"
        );
    }
}

/// The "Overall exposure level" `systemd-analyze security` gives the unit file.
fn security_exposure(unit: &std::path::Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for blkplane.service: "))
        .unwrap_or_else(|| panic!("no rating: {text}{}", String::from_utf8_lossy(&out.stderr)));
    let figure = line.split(": ").nth(1).and_then(|r| r.split(' ').next());
    figure.and_then(|f| f.parse().ok()).unwrap_or_else(|| panic!("no figure in {line:?}"))
}

/// The example configuration, with the staged paths: `--check-config` passes as installed
/// (the control socket alone: an export would need an image the operator has not made) and
/// with its export uncommented once the image is made; as installed the daemon starts and
/// answers on its control socket.
fn the_example_configuration_serves(staging: &std::path::Path, dir: &std::path::Path) {
    let toml = std::fs::read_to_string(staging.join("etc/blkplane/blkplane.toml")).unwrap();
    let staged = |text: &str| {
        text.replace("/run/blkplane", &staging.join("run/blkplane").display().to_string())
            .replace("/var/lib/blkplane", &staging.join("var/lib/blkplane").display().to_string())
            .replace("127.0.0.1:9180", "127.0.0.1:0")
            .replace("\"kvm\"", "\"root\"")
    };
    let config = dir.join("blkplane.toml");
    let with_export = dir.join("with-export.toml");
    std::fs::write(&config, staged(&toml)).unwrap();
    // Commented-out settings have no space after the '#'; comments have one.
    let uncommented: Vec<&str> = toml
        .lines()
        .map(|l| if l.starts_with("# ") { l } else { l.trim_start_matches('#') })
        .collect();
    assert!(uncommented.contains(&"[[export]]"), "the example has no export to uncomment");
    std::fs::write(&with_export, staged(&uncommented.join("\n"))).unwrap();
    make_image(&staging.join("var/lib/blkplane/vm1.raw"), 1 << 20, 1);
    for file in [&config, &with_export] {
        let out = Command::new(common::daemon_bin())
            .args(["serve", "--check-config", "--config"])
            .arg(file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "check-config {}: {stderr}", file.display());
    }
    let control = staging.join("run/blkplane/control.sock");
    let child = Command::new(common::daemon_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let daemon = KillOnDrop(child);
    common::wait_until("the control socket", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&control).is_ok()
    });
    let out = common::ctl(&control, &["list-exports"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[]\n");
    common::signal(daemon.0.id() as i32, libc::SIGTERM);
}

/// `install.sh --uninstall` removes what install.sh installed, and keeps the configuration
/// and the images (data).
#[test]
fn the_install_can_be_undone() {
    let dir = tmpdir();
    let staging = dir.path().join("root");
    install_sh(&staging, &[]);
    std::fs::write(staging.join("var/lib/blkplane/vm1.raw"), b"data").unwrap();
    let said = install_sh(&staging, &["--uninstall"]);
    assert_eq!(
        said,
        format!(
            "removed blkplane from {0}; kept {0}/etc/blkplane and {0}/var/lib/blkplane\n",
            staging.display()
        )
    );
    for file in INSTALLED {
        assert!(!staging.join("usr").join(file).exists(), "--uninstall left {file}");
    }
    let man1 = std::fs::read_dir(staging.join("usr/share/man/man1")).unwrap().count();
    assert_eq!(man1, 0, "--uninstall left man pages");
    assert!(!staging.join("run/blkplane").exists());
    assert!(staging.join("etc/blkplane/blkplane.toml").is_file());
    assert_eq!(std::fs::read(staging.join("var/lib/blkplane/vm1.raw")).unwrap(), b"data");
}

/// SIGHUP re-reads --config: a new export is added, a vanished one removed, an unchanged one
/// untouched (a client doing I/O on it sees no failure), one with a client connected is not
/// removed (reported), and a file that does not parse changes nothing. The service manager
/// hears RELOADING=1 and READY=1.
#[test]
fn sighup_applies_the_config_file() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tmpdir();
    let d = dir.path();
    for name in ["a", "b", "c"] {
        make_image(&d.join(format!("{name}.raw")), 4 << 20, 5);
    }
    let export = |name: &str| {
        format!(
            "[[export]]\nid = \"{name}\"\nsocket = \"{}\"\nimage = \"{}\"\n",
            d.join(format!("{name}.sock")).display(),
            d.join(format!("{name}.raw")).display()
        )
    };
    let config = d.join("blkplane.toml");
    std::fs::write(&config, format!("{}{}", export("a"), export("b"))).unwrap();
    let notify = d.join("notify.sock");
    let manager = UnixDatagram::bind(&notify).unwrap();
    manager.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let log = d.join("daemon.log");
    let mut daemon = Command::new(common::daemon_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    while !next(&manager).contains("READY=1") {}
    let stop = Arc::new(AtomicBool::new(false));
    let io = common::background_io(d.join("a.sock"), Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(300));
    let hup = |daemon: &std::process::Child| {
        common::signal(daemon.id() as i32, libc::SIGHUP);
        let mut heard = next(&manager);
        assert!(heard.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{heard:?}");
        while !heard.contains("READY=1") {
            heard = next(&manager);
        }
        heard
    };

    // b vanishes, c appears, a stays as it was.
    std::fs::write(&config, format!("{}{}", export("a"), export("c"))).unwrap();
    let heard = hup(&daemon);
    assert!(heard.contains("STATUS=serving 2 exports"), "{heard:?}");
    assert!(std::os::unix::net::UnixStream::connect(d.join("c.sock")).is_ok(), "c not served");
    assert!(!d.join("b.sock").exists(), "b still served");

    // A file that does not parse: nothing changes.
    std::fs::write(&config, "[[export]\nid = ").unwrap();
    hup(&daemon);
    assert!(std::os::unix::net::UnixStream::connect(d.join("c.sock")).is_ok());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("nothing changed"), "{text}");

    // a vanishes while its client is connected: kept, and said so.
    std::fs::write(&config, export("c")).unwrap();
    hup(&daemon);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("export 'a' is gone from the file but was not removed"), "{text}");
    stop.store(true, Ordering::Relaxed);
    let (requests, failed) = io.join().unwrap();
    assert!(requests > 0);
    assert_eq!(failed, 0, "requests on the unchanged export failed across the reloads");
    common::signal(daemon.id() as i32, libc::SIGTERM);
    assert!(daemon.wait().unwrap().success());
}

/// Every thread of the daemon blocks SIGTERM, SIGINT and SIGHUP, so that only the main
/// thread's sigwait takes them: a thread that did not would let their default action end the
/// daemon at once (no drain) whenever the main thread is not waiting (seen: a SIGHUP right
/// after a reload killed it).
#[test]
fn no_thread_can_take_the_handled_signals() {
    let dir = tmpdir();
    let sock = dir.path().join("a.sock");
    let ctl = dir.path().join("ctl.sock");
    let daemon = common::Daemon::start_with(
        dir.path(),
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--iothread".into(),
            "id=named".into(),
            "--export".into(),
            format!("socket={},engine=null,size=1M,iothread=named", sock.display()),
        ],
        &[sock.clone(), ctl.clone()],
    );
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).unwrap();
    let mut checked = 0;
    for task in tasks {
        let task = task.unwrap();
        // The main thread waits in sigwait, which unblocks them while it waits: it is the
        // one meant to take them.
        if task.file_name().to_string_lossy() == daemon.pid().to_string() {
            continue;
        }
        // A short-lived thread (a kernel io worker of a ring) may be gone by now.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let name = status.lines().next().unwrap_or("").to_string();
        // A thread that is exiting (here: the control client thread of Daemon::start's
        // readiness probe) has let go of the process's signal handling and can take no
        // signal; /proc then shows every set empty and "Threads: 0" (seen: 4 runs in 400).
        if status.lines().any(|l| l.split_whitespace().eq(["Threads:", "0"])) {
            continue;
        }
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGTERM] {
            assert!(blocked & (1 << (sig - 1)) != 0, "{name} does not block signal {sig}");
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} threads besides the main one");
}

/// Every line an export causes names it (`export=ID`, the socket its own field), from the
/// export's own thread and from the shared I/O thread alike; `--log-format json` gives one
/// JSON object per line with the export in its span.
#[test]
fn log_lines_name_their_export_in_text_and_json() {
    for format in ["text", "json"] {
        let dir = tmpdir();
        let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
        let args = [
            "--log-format".to_string(),
            format.into(),
            "--export".into(),
            format!("id=disk-a,socket={},engine=null,size=1M", a.display()),
            "--export".into(),
            format!("id=disk-b,socket={},engine=null,size=1M", b.display()),
        ];
        let mut daemon = common::Daemon::start_with(dir.path(), &args, &[a.clone(), b.clone()]);
        // A read past the end of disk-a: the I/O thread logs the failure.
        let mut fe = common::frontend::TestFrontend::connect(&a, 1, 64, 0);
        assert_eq!(fe.request(0, common::frontend::T_IN, 1 << 11, &[], 512).0.status, 1);
        drop(fe);
        assert!(daemon.stop().success());
        let log = daemon.log();
        let failed = log
            .lines()
            .find(|l| l.contains("request failed"))
            .unwrap_or_else(|| panic!("no failure logged:\n{log}"));
        let added_b = log
            .lines()
            .find(|l| l.contains("export added") && l.contains("disk-b"))
            .unwrap_or_else(|| panic!("no line for disk-b:\n{log}"));
        if format == "text" {
            let a_span = format!("export{{export=disk-a socket={}}}", a.display());
            assert!(failed.contains(&a_span), "{failed}");
            assert!(added_b.contains(&format!("export{{export=disk-b socket={}}}", b.display())));
            assert!(log.lines().any(|l| l.contains(&a_span) && l.ends_with("frontend connected")));
        } else {
            for line in log.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
            }
            let v: serde_json::Value = serde_json::from_str(failed).unwrap();
            assert_eq!(v["level"], "WARN");
            assert_eq!(v["span"]["export"], "disk-a", "{failed}");
            assert_eq!(v["span"]["socket"], a.display().to_string(), "{failed}");
            assert_eq!(v["fields"]["queue"], 0, "{failed}");
        }
    }
    // A format the daemon does not have is a usage error.
    let out = Command::new(common::daemon_bin())
        .args([
            "serve",
            "--log-format",
            "xml",
            "--export",
            "socket=/tmp/x.sock,engine=null,size=1M",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid value 'xml' for '--log-format <FORMAT>'"), "{err}");
}

/// Under systemd (stderr is the stream `JOURNAL_STREAM` names) every line starts with its
/// syslog priority, which journald keeps as the entry's priority; no timestamp (the journal
/// has its own). The test plays journald with a socket pair of its own.
#[test]
fn under_journald_lines_carry_their_priority() {
    use std::io::{BufRead, BufReader};
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;
    let dir = tmpdir();
    let sock = dir.path().join("a.sock");
    let (journal, daemon_end) = UnixStream::pair().unwrap();
    let meta = std::fs::metadata(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        daemon_end.as_raw_fd()
    }))
    .unwrap();
    let mut child = Command::new(common::daemon_bin())
        .args(["serve", "--export"])
        .arg(format!("id=j,socket={},engine=null,size=1M", sock.display()))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(Stdio::from(OwnedFd::from(daemon_end)))
        .spawn()
        .unwrap();
    journal.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut lines = BufReader::new(journal);
    let mut line = String::new();
    let prefix = format!(
        "<6> INFO export{{export=j socket={}}}: blkplane::daemon: export added",
        sock.display()
    );
    // The export's own thread may say "listening" first.
    for _ in 0..3 {
        line.clear();
        lines.read_line(&mut line).unwrap();
        if line.contains("export added") {
            break;
        }
        assert!(line.starts_with("<6> INFO "), "{line}");
    }
    assert_eq!(line.trim_end(), prefix);
    // A warning: a client that speaks nonsense.
    common::wait_until("the socket", Duration::from_secs(10), || sock.exists());
    let mut s = UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut s, &[0xff; 64]).unwrap();
    drop(s);
    let mut warned = false;
    for _ in 0..10 {
        line.clear();
        if lines.read_line(&mut line).unwrap() == 0 {
            break;
        }
        assert!(line.starts_with('<'), "no priority: {line}");
        if line.starts_with("<4> WARN export{export=j") {
            warned = true;
            break;
        }
    }
    assert!(warned, "no warning with priority 4");
    common::signal(child.id() as i32, libc::SIGTERM);
    assert!(child.wait().unwrap().success());
}

/// `blkplane manpages --dir DIR` into a fresh directory: the paths it wrote.
fn manpages() -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
    let dir = tmpdir();
    let out = Command::new(common::daemon_bin())
        .args(["manpages", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pages = String::from_utf8_lossy(&out.stdout).lines().map(Into::into).collect();
    (dir, pages)
}

/// Every page renders without a groff warning (the key tables were pre-formatted text that
/// roff filled), refers only to pages that exist, and offers only options its command takes.
#[test]
fn every_man_page_renders_clean_and_refers_to_pages_that_exist() {
    let (dir, pages) = manpages();
    let names: Vec<String> =
        pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["man1/blkplane.1", "man1/blkplane-serve.1", "man5/blkplane.toml.5"] {
        assert!(dir.path().join(want).is_file(), "no {want} among {names:?}");
    }
    for page in &pages {
        let out =
            Command::new("groff").args(["-ww", "-z", "-Tutf8", "-man"]).arg(page).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "groff -ww on {}", page.display());
        let text = std::fs::read_to_string(page).unwrap();
        for (at, _) in text.match_indices("(1)").chain(text.match_indices("(5)")) {
            let start = text[..at].rfind(|c: char| c.is_whitespace() || c == ',').unwrap() + 1;
            let name =
                text[start..at + 3].replace("\\-", "-").replace("\\fB", "").replace("\\fR", "");
            let file = format!("{}.{}", &name[..name.len() - 3], &name[name.len() - 2..][..1]);
            assert!(names.contains(&file), "{} refers to {name}, not generated", page.display());
        }
        let sub = names.iter().any(|n| page.ends_with(n) && n.starts_with("blkplane-"));
        assert!(!(sub && text.contains("\\-V")), "{} offers -V", page.display());
    }
    for (page, sections) in [
        ("man1/blkplane.1", &["SIGNALS", "FILES", "EXIT STATUS"][..]),
        ("man1/blkplane-serve.1", &["SIGNALS", "FILES", "EXIT STATUS", "EXPORT KEYS"]),
        ("man5/blkplane.toml.5", &["DAEMON KEYS", "IOTHREAD TABLES", "EXPORT TABLES", "FILES"]),
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        for s in sections {
            assert!(
                text.contains(&format!("\n.SH \"{s}\"\n"))
                    || text.contains(&format!("\n.SH {s}\n")),
                "{page}: no {s}"
            );
        }
    }
    let toml5 = std::fs::read_to_string(dir.path().join("man5/blkplane.toml.5")).unwrap();
    for key in [
        "image\\-lock\\-wait\\-ms",
        "pool\\-threads",
        "poll\\-max\\-us",
        "socket\\-mode",
        "iops\\-total",
    ] {
        assert!(toml5.contains(&format!("\\fB{key}")), "blkplane.toml(5) lacks {key}");
    }
}

/// What the installed-style bash completion offers for a command line that ends in a space.
fn bash_completes(line: &str) -> String {
    let dir = tmpdir();
    let script = dir.path().join("blkplane.bash");
    let out = Command::new(common::daemon_bin()).args(["completions", "bash"]).output().unwrap();
    std::fs::write(&script, out.stdout).unwrap();
    let words: Vec<&str> = line.split(' ').collect();
    let words_array: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let script = format!(
        "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; _blkplane blkplane '{}' '{}'; echo ${{COMPREPLY[@]}}",
        script.display(),
        words_array.join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let out = Command::new("bash").arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Completions offer the export keys after --export, the control commands after ctl, the log
/// levels, and no hidden command.
#[test]
fn bash_completes_export_keys_ctl_commands_and_log_levels() {
    let keys = bash_completes("blkplane serve --export ");
    for key in ["id=", "socket=", "image=", "cache=", "iops-total=", "socket-mode="] {
        assert!(keys.split(' ').any(|k| k == key), "{key} not offered after --export: {keys}");
    }
    let commands = bash_completes("blkplane ctl ");
    let commands: Vec<&str> = commands.split(' ').filter(|w| !w.starts_with('-')).collect();
    assert_eq!(
        commands.join(" "),
        "list-exports add-export remove-export resize query-stats set-polling set-throttle \
         list-iothreads add-iothread remove-iothread dump-config reload nbd-export nbd-unexport \
         nbd-list mirror query-jobs job-cancel job-complete"
    );
    let nbd_keys = bash_completes("blkplane serve --nbd-server ");
    for key in ["unix=", "addr=", "tls-creds=", "tls=", "verify-peer=", "max-connections="] {
        assert!(nbd_keys.split(' ').any(|k| k == key), "{key} not offered: {nbd_keys}");
    }
    assert_eq!(bash_completes("blkplane serve --log-level "), "off error warn info debug trace");
    assert_eq!(bash_completes("blkplane b"), "bench");
}
