//! The command line: bad input gets one clear line and exit status 2, and nothing is created,
//! truncated or left behind; signals end the daemon cleanly.

mod common;

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};

use common::{assert_usage_error, make_image, tmpdir, Client, Daemon, BIN};

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run blkplane")
}

fn serve(exports: &[String]) -> Output {
    serve_with(&[], exports)
}

fn serve_with(options: &[&str], exports: &[String]) -> Output {
    let mut args = vec!["serve".to_string()];
    args.extend(options.iter().map(|o| o.to_string()));
    for e in exports {
        args.push("--export".into());
        args.push(e.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&args)
}

#[test]
fn help_explains_every_option() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("serve"));
    let out = run(&["serve", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for key in [
        "socket=",
        "image=",
        "engine=null",
        "size=",
        "queues=",
        "queue-size=",
        "cache=",
        "aio=",
        "readonly=",
        "serial=",
        "max-guest-memory=",
        "socket-mode=",
        "socket-group=",
        "socket-owner=",
        "--max-mapped-guest-memory",
    ] {
        assert!(help.contains(key), "serve --help lacks {key}");
    }
    for mode in ["none", "directsync", "writeback", "writethrough", "unsafe"] {
        assert!(help.contains(mode), "serve --help lacks cache mode {mode}");
    }
    assert!(help.contains("may lose data"), "--help must say unsafe loses data");
}

#[test]
fn bad_export_specs_exit_2_and_create_nothing() {
    let dir = tmpdir();
    let d = dir.path();
    let sock = d.join("s.sock");
    let missing = d.join("missing.raw");
    let out = serve(&[format!("socket={},image={}", sock.display(), missing.display())]);
    assert_usage_error(&out, &format!("image {} does not exist", missing.display()));
    assert!(!missing.exists(), "the missing image was created");
    assert!(!sock.exists(), "a socket was left behind");

    let image = d.join("disk.raw");
    make_image(&image, 1 << 20, 1);
    let out = serve(&[format!("socket={},image={},colour=red", sock.display(), image.display())]);
    assert_usage_error(&out, "unknown key 'colour'");

    let out = serve(&[format!("image={}", image.display())]);
    assert_usage_error(&out, "missing socket=PATH");

    let odd = d.join("odd.raw");
    fs::write(&odd, vec![7u8; 1000]).unwrap();
    let out = serve(&[format!("socket={},image={}", sock.display(), odd.display())]);
    assert_usage_error(&out, "is 1000 bytes, not a multiple of 512");
    assert_eq!(fs::read(&odd).unwrap(), vec![7u8; 1000], "the image was changed");

    let empty = d.join("empty.raw");
    fs::write(&empty, b"").unwrap();
    let out = serve(&[format!("socket={},image={}", sock.display(), empty.display())]);
    assert_usage_error(&out, "is empty");

    let out = serve(&[format!("socket={},image={}", sock.display(), d.display())]);
    assert_usage_error(&out, "is neither a regular file nor a block device");

    // A path that exists and is not a socket is never replaced.
    let not_sock = d.join("precious.txt");
    fs::write(&not_sock, b"keep me").unwrap();
    let out = serve(&[format!("socket={},image={}", not_sock.display(), image.display())]);
    assert_usage_error(&out, "exists and is not a socket");
    assert_eq!(fs::read(&not_sock).unwrap(), b"keep me");

    // The second export fails: the first one's socket must not be left behind.
    let good_sock = d.join("good.sock");
    let out = serve(&[
        format!("socket={},image={}", good_sock.display(), image.display()),
        format!("socket={},image={}", sock.display(), missing.display()),
    ]);
    assert_usage_error(&out, "does not exist");
    assert!(!good_sock.exists());

    let out = serve(&[
        format!("socket={},image={}", sock.display(), image.display()),
        format!("socket={},image={}", sock.display(), image.display()),
    ]);
    assert_usage_error(&out, "is given to two exports");

    let out = run(&["serve"]);
    assert_eq!(out.status.code(), Some(2), "no --export at all");
    let out = run(&["serve", "--export", "x", "--frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "unknown flag");
}

#[test]
fn a_socket_in_use_is_refused_and_the_owner_keeps_serving() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, 4 << 20, 3);
    let _first = Daemon::start(
        dir.path(),
        &[format!("socket={},image={}", sock.display(), image.display())],
    );
    // Another image, so that the socket is what collides.
    let other = dir.path().join("other.raw");
    make_image(&other, 4 << 20, 9);
    let out = serve(&[format!("socket={},image={}", sock.display(), other.display())]);
    assert_usage_error(&out, &format!("socket {} is in use by another server", sock.display()));
    // The first daemon's socket is still there and still serves.
    let mut c = Client::connect(&sock, 1);
    assert!(c.read_at(0, 0, 4096, 0).unwrap() == common::pattern(3, 0, 4096));
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, 4 << 20, 4);
    drop(UnixListener::bind(&sock).unwrap()); // leaves the file, with nobody listening
    assert!(sock.exists());
    let _d = Daemon::start(
        dir.path(),
        &[format!("socket={},image={}", sock.display(), image.display())],
    );
    let mut c = Client::connect(&sock, 1);
    assert!(c.read_at(0, 0, 4096, 0).unwrap() == common::pattern(4, 0, 4096));
}

fn stops_on(signal: i32) {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, 4 << 20, 5);
    let mut d = Daemon::start(
        dir.path(),
        &[format!("socket={},image={}", sock.display(), image.display())],
    );
    // With a client connected and queues running.
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.write_at(0, 0, &[9u8; 4096], 0), 0);
    common::signal(d.pid(), signal);
    let status = d.stop_after_signal();
    assert!(status.success(), "exit status {status}:\n{}", d.log());
    assert!(!Path::new(&sock).exists(), "socket left behind");
    assert_eq!(fs::read(&image).unwrap()[..4096], [9u8; 4096]);
    drop(c);
}

#[test]
fn sigterm_stops_cleanly() {
    stops_on(libc::SIGTERM);
}

#[test]
fn sigint_stops_cleanly() {
    stops_on(libc::SIGINT);
}

/// blkplane takes QEMU's image locks: a second writer is refused (exit 2, the reason named)
/// unless force-share=on, and qemu-storage-daemon refuses an image blkplane writes.
#[test]
fn images_are_locked_like_qemu_locks_them() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    make_image(&image, 4 << 20, 6);
    let a = dir.path().join("a.sock");
    let _first =
        Daemon::start(dir.path(), &[format!("socket={},image={}", a.display(), image.display())]);
    let b = dir.path().join("b.sock");
    let no_wait = ["--image-lock-wait-ms", "0"];
    let out = serve_with(&no_wait, &[format!("socket={},image={}", b.display(), image.display())]);
    assert_usage_error(
        &out,
        "does not share the \"write\" permission (use force-share=on to serve it anyway)",
    );
    assert!(!b.exists());
    let out = serve_with(
        &no_wait,
        &[format!("socket={},image={},readonly=on", b.display(), image.display())],
    );
    assert_usage_error(&out, "another process holds the \"write\" permission on the image");
    let forced = Daemon::start(
        dir.path(),
        &[format!("socket={},image={},force-share=on", b.display(), image.display())],
    );
    drop(forced);
    if let Ok(out) = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", image.display()))
        .args(["--blockdev", "driver=raw,node-name=d,file=f", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on",
            dir.path().join("q.sock").display()
        ))
        .output()
    {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Failed to get \"write\" lock"),
            "qsd: {err}"
        );
    }
}

/// A daemon that finds its image locked waits for the holder to let go, for
/// --image-lock-wait-ms (the restart of a daemon killed with I/O in flight), and is refused
/// only after that.
#[test]
fn a_locked_image_is_waited_for() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    make_image(&image, 4 << 20, 6);
    let a = dir.path().join("a.sock");
    let mut first =
        Daemon::start(dir.path(), &[format!("socket={},image={}", a.display(), image.display())]);
    let b = dir.path().join("b.sock");
    let second = std::process::Command::new(common::daemon_bin())
        .args(["serve", "--image-lock-wait-ms", "20000", "--export"])
        .arg(format!("socket={},image={}", b.display(), image.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!b.exists(), "the second daemon served a locked image");
    assert!(first.stop().success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !b.exists() {
        assert!(std::time::Instant::now() < deadline, "the second daemon never took the image");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    common::signal(second.id() as i32, libc::SIGTERM);
    let out = second.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("waiting for it to let go"), "{log}");
    assert!(log.contains("image lock taken"), "{log}");

    // Waiting has an end: a holder that stays is refused after the wait, as before.
    let _third =
        Daemon::start(dir.path(), &[format!("socket={},image={}", a.display(), image.display())]);
    let started = std::time::Instant::now();
    let out = serve_with(
        &["--image-lock-wait-ms", "300"],
        &[format!("socket={},image={}", b.display(), image.display())],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not share the \"write\" permission")
    );
}

/// `--version` names the commit the binary was built from.
#[test]
fn version_names_the_commit() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout).to_string();
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|_| std::process::Command::new("true").output().unwrap());
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    // Built outside a git checkout, the binary says so.
    let commit = if head.is_empty() { "unknown".to_string() } else { head };
    assert_eq!(version.trim(), format!("blkplane {} (commit {commit})", env!("CARGO_PKG_VERSION")));
}

/// `ctl` and `stat` find the control socket through BLKPLANE_CONTROL, and without it or
/// --control try the default path, naming it when it is not there.
#[test]
fn ctl_and_stat_find_the_control_socket_without_control() {
    let dir = tmpdir();
    let (_daemon, control) = Daemon::control_only(dir.path());
    for args in [&["ctl", "list-exports"][..], &["stat", "--count", "1", "--interval", "0.1"]] {
        let out = Command::new(common::daemon_bin())
            .args(args)
            .env("BLKPLANE_CONTROL", &control)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // No daemon there: both say so the same way, with the same status (3).
    for args in [&["ctl", "list-exports"][..], &["stat", "--count", "1"]] {
        let out = Command::new(common::daemon_bin())
            .args(args)
            .env_remove("BLKPLANE_CONTROL")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "blkplane: cannot connect to /run/blkplane/control.sock: No such file or directory (os error 2)\n",
            "{args:?}"
        );
    }
    // A bad command line is 2 for both.
    for args in [&["ctl", "list-exports", "oops"][..], &["stat", "--interval", "0"]] {
        let out = Command::new(common::daemon_bin())
            .args(args)
            .env("BLKPLANE_CONTROL", &control)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    // A reader that goes away (`stat | head -1`) ends stat quietly, no panic.
    let mut child = Command::new(common::daemon_bin())
        .args(["stat", "--interval", "0.05"])
        .env("BLKPLANE_CONTROL", &control)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_eq!(&first, b"export");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    // The exit statuses are documented where users look.
    let out = Command::new(common::daemon_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("3  (ctl, stat) no daemon answers at the control socket"), "{help}");
}

/// The release binary ships stripped: no debug sections, no symbol table (the `profiling`
/// profile keeps both for perf).
#[test]
fn the_release_binary_is_stripped() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(manifest.contains("[profile.release]\ndebug = 0\nstrip = true\n"), "{manifest}");
    assert!(manifest.contains("[profile.profiling]\ninherits = \"release\"\ndebug = 1\n"));
    if cfg!(debug_assertions) || std::env::var_os("BLKPLANE_TEST_BIN").is_some() {
        // Not a release build of this tree: the profile above is what can be checked.
        return;
    }
    let out = Command::new("readelf").args(["-S", "--wide"]).arg(common::daemon_bin()).output();
    let out = out.expect("readelf (Debian's binutils)");
    let sections = String::from_utf8_lossy(&out.stdout);
    assert!(sections.contains(".text"), "{sections}");
    for section in [".debug_info", ".debug_line", ".symtab"] {
        assert!(!sections.contains(section), "{section} in the release binary:\n{sections}");
    }
}
