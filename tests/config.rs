//! One configuration spine (issue 29): the command line, the config file, the control socket
//! and reload read every key the same way, against the real daemon and `blkplane ctl`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use common::{background_io, ctl, free_port, tmpdir, wait_until, Client, Daemon};

/// `blkplane ctl ARGS` that must succeed; its JSON output.
fn ctl_ok(control: &Path, args: &[&str]) -> Value {
    let out = ctl(control, args);
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The status line of a GET /metrics, or the connection's error.
fn scrape_status(port: u16) -> Result<String, std::io::Error> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

#[test]
fn ctl_sends_values_as_given_and_the_control_socket_keeps_their_type() {
    let dir = tmpdir();
    let (_daemon, control) = Daemon::control_only(dir.path());
    let socket = |n: &str| format!("socket={}", dir.path().join(n).display());
    ctl_ok(
        &control,
        &["add-export", "id=007", "serial=00123", &socket("a.sock"), "engine=null", "size=1M"],
    );
    ctl_ok(&control, &["add-export", "id=123", &socket("b.sock"), "engine=null", "size=1M"]);
    let list = ctl_ok(&control, &["list-exports"]);
    assert_eq!(list[0]["id"], "007");
    assert_eq!(list[0]["serial"], "00123");
    assert_eq!(list[0]["spec"]["serial"], "00123");
    assert_eq!(list[1]["id"], "123");
    // An id of digits is still the export's name.
    assert_eq!(ctl_ok(&control, &["remove-export", "id=123"])["removed"], "123");
    ctl_ok(&control, &["resize", "id=007", "size=2M"]);
    assert_eq!(ctl_ok(&control, &["query-stats", "id=007"])[0]["size_bytes"], 2 << 20);

    // A request's fields are id, command and args: anything else is named.
    let mut s = UnixStream::connect(&control).unwrap();
    s.write_all(b"{\"id\": 1, \"command\": \"remove-export\", \"params\": {\"id\": \"007\"}}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).unwrap();
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["error"]["code"], "invalid-request");
    assert_eq!(
        reply["error"]["message"],
        "unknown field \"params\" (a request has id, command, args; arguments go in \"args\")"
    );
    assert_eq!(ctl_ok(&control, &["list-exports"]).as_array().unwrap().len(), 1, "nothing removed");
    // Over the socket a relative path would be the daemon's, not the client's: refused.
    let mut s = UnixStream::connect(&control).unwrap();
    s.write_all(
        b"{\"command\": \"add-export\", \"args\": {\"socket\": \"rel.sock\", \"engine\": \"null\", \"size\": 4096}}\n",
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).unwrap();
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        reply["error"]["message"],
        "'socket' must be an absolute path, not rel.sock (blkplane ctl makes its paths absolute)"
    );
}

#[test]
fn relative_paths_come_out_absolute_everywhere() {
    let dir = tmpdir();
    let d = dir.path();
    std::fs::create_dir(d.join("disks")).unwrap();
    common::make_image(&d.join("disks/vm1.raw"), 1 << 20, 1);
    // The daemon runs in d and is given paths relative to it.
    let log = std::fs::File::create(d.join("daemon.log")).unwrap();
    let child = Command::new(common::daemon_bin())
        .current_dir(d)
        .args([
            "serve",
            "--control",
            "ctl.sock",
            "--export",
            "id=vm1,socket=vm1.sock,image=disks/vm1.raw",
        ])
        .stderr(log)
        .spawn()
        .unwrap();
    let _child = common::KillOnDrop(child);
    let control = d.join("ctl.sock");
    wait_until("the control socket", Duration::from_secs(10), || control.exists());
    let list = ctl_ok(&control, &["list-exports"]);
    let (sock, image) = (d.join("vm1.sock"), d.join("disks/vm1.raw"));
    assert_eq!(list[0]["socket"], sock.display().to_string());
    assert_eq!(list[0]["spec"]["socket"], sock.display().to_string());
    assert_eq!(list[0]["spec"]["image"], image.display().to_string());
    let dump = String::from_utf8(ctl(&control, &["dump-config"]).stdout).unwrap();
    assert!(dump.contains(&format!("control = \"{}\"", control.display())), "{dump}");
    assert!(dump.contains(&format!("socket = \"{}\"", sock.display())), "{dump}");
    assert!(dump.contains(&format!("image = \"{}\"", image.display())), "{dump}");
    // ctl makes its own relative paths absolute, in its working directory.
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let out = Command::new(common::daemon_bin())
        .current_dir(&sub)
        .args([
            "ctl",
            "--control",
            "../ctl.sock",
            "add-export",
            "id=n",
            "socket=n.sock",
            "engine=null",
            "size=1M",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(sub.join("n.sock").exists());
    // vm-config: from the daemon and from keys, the socket by its absolute path; libvirt's
    // schema takes the domain.
    for args in [
        vec!["--id", "vm1", "--control", "ctl.sock"],
        vec!["--export", "socket=vm1.sock,image=disks/vm1.raw"],
    ] {
        let out = Command::new(common::daemon_bin())
            .current_dir(d)
            .args(["vm-config", "--for", "libvirt"])
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let xml = String::from_utf8(out.stdout).unwrap();
        assert!(
            xml.contains(&format!("path='{}'", sock.display()))
                || xml.contains(&format!("path=\"{}\"", sock.display())),
            "{xml}"
        );
        let file = d.join("domain.xml");
        std::fs::write(&file, &xml).unwrap();
        let check = Command::new("virt-xml-validate").arg(&file).arg("domain").output().unwrap();
        assert!(
            check.status.success(),
            "{}{}\n{xml}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// A config file with the given top-level keys and tables.
fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_reload_applies_every_key_while_an_unchanged_export_serves() {
    let dir = tmpdir();
    let d = dir.path();
    let (control, cfg) = (d.join("ctl.sock"), d.join("blkplane.toml"));
    let (a, b) = (d.join("a.sock"), d.join("b.sock"));
    let (p1, p2) = (free_port(), free_port());
    let export_a = format!(
        "[[export]]\nid = \"a\"\nsocket = \"{}\"\nengine = \"null\"\nsize = \"16M\"\n",
        a.display()
    );
    write_config(
        &cfg,
        &format!(
            "control = \"{}\"\nlog-level = \"info\"\nmetrics = \"127.0.0.1:{p1}\"\n{export_a}",
            control.display()
        ),
    );
    let mut daemon = Daemon::start_with(
        d,
        &["--config".into(), cfg.display().to_string()],
        &[a.clone(), control.clone()],
    );
    assert!(scrape_status(p1).unwrap().contains("200"));
    let stop = Arc::new(AtomicBool::new(false));
    let io = background_io(a.clone(), Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(200));
    write_config(
        &cfg,
        &format!(
            "control = \"{}\"\nlog-level = \"debug\"\nmetrics = \"127.0.0.1:{p2}\"\n{export_a}\n[[iothread]]\nid = \"t1\"\npoll = \"never\"\n\n[[export]]\nid = \"b\"\nsocket = \"{}\"\nengine = \"null\"\nsize = \"8M\"\niothread = \"t1\"\n",
            control.display(),
            b.display()
        ),
    );
    common::signal(daemon.pid(), libc::SIGHUP);
    wait_until("the reload", Duration::from_secs(10), || {
        daemon.log().contains("configuration re-read")
    });
    // The metrics moved.
    assert!(scrape_status(p2).unwrap().contains("200"));
    assert!(scrape_status(p1).is_err(), "the old metrics address still answers");
    // The new thread exists and serves the new export.
    let threads = ctl_ok(&control, &["list-iothreads"]);
    assert!(threads.as_array().unwrap().iter().any(|t| t["id"] == "t1"), "{threads}");
    let list = ctl_ok(&control, &["list-exports"]);
    assert_eq!(list[1]["id"], "b");
    assert_eq!(list[1]["iothread"], "t1");
    let mut c = Client::connect(&b, 1);
    assert!(c.read_at(0, 0, 4096, 0).unwrap().iter().all(|&x| x == 0));
    drop(c);
    // The new log level: the queue's start is a debug line.
    wait_until("a debug line", Duration::from_secs(5), || daemon.log().contains("queue started"));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (done, failed) = io.join().unwrap();
    assert!(done > 0);
    assert_eq!(failed, 0, "requests failed during the reload");
    assert!(!daemon.log().contains("not applied"), "{}", daemon.log());
    assert!(daemon.stop().success());
}

#[test]
fn ctl_reload_names_what_it_refuses_and_a_bad_file_changes_nothing() {
    let dir = tmpdir();
    let d = dir.path();
    let (control, cfg, a) = (d.join("ctl.sock"), d.join("blkplane.toml"), d.join("a.sock"));
    let good = format!(
        "control = \"{}\"\n\n[[export]]\nid = \"a\"\nsocket = \"{}\"\nengine = \"null\"\nsize = \"1M\"\n",
        control.display(),
        a.display()
    );
    write_config(&cfg, &good);
    let _daemon = Daemon::start_with(
        d,
        &["--config".into(), cfg.display().to_string()],
        &[a.clone(), control.clone()],
    );
    // A bad key on line 8, column 1, and a bad value on line 9: both named, nothing changed.
    write_config(&cfg, &format!("{good}colour = \"red\"\nqueues = 0\nserial = \"new\"\n"));
    let out = ctl(&control, &["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:8:1: export 1: unknown key 'colour'", cfg.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:9:10: export 1: queues=0: must be 1 to 256", cfg.display())),
        "{err}"
    );
    assert!(err.contains("(invalid-config)"), "{err}");
    assert_eq!(ctl_ok(&control, &["list-exports"])[0]["serial"], "");
    // A key a reload cannot apply is named, and the reload fails (for systemctl reload).
    write_config(&cfg, &format!("pool-threads = 7\n{good}"));
    let out = ctl(&control, &["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pool-threads: the shared pool keeps its size until a restart"), "{err}");
    // A good change is applied and said.
    write_config(&cfg, &good.replace("size = \"1M\"", "size = \"1M\"\nserial = \"new\""));
    let reply = ctl_ok(&control, &["reload"]);
    assert_eq!(ctl_ok(&control, &["list-exports"])[0]["serial"], "new", "{reply}");
}

#[test]
fn check_config_checks_the_file_of_a_running_daemon() {
    let dir = tmpdir();
    let d = dir.path();
    let (control, cfg, a) = (d.join("ctl.sock"), d.join("blkplane.toml"), d.join("a.sock"));
    let image = d.join("a.raw");
    common::make_image(&image, 1 << 20, 2);
    let text = format!(
        "control = \"{}\"\n\n[[export]]\nid = \"a\"\nsocket = \"{}\"\nimage = \"{}\"\n",
        control.display(),
        a.display(),
        image.display()
    );
    write_config(&cfg, &text);
    let _daemon = Daemon::start_with(
        d,
        &["--config".into(), cfg.display().to_string()],
        &[a.clone(), control.clone()],
    );
    let check = || {
        Command::new(common::daemon_bin())
            .args(["serve", "--check-config", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let out = check();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "configuration OK: 1 export(s)");
    write_config(&cfg, &format!("{text}cache = \"fast\"\nqueues = 999\n"));
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:7:9: export 1: unknown cache mode 'fast'", cfg.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:8:10: export 1: queues=999: must be 1 to 256", cfg.display())),
        "{err}"
    );
    // The running daemon was not disturbed.
    let mut c = Client::connect(&a, 1);
    assert!(c.read_at(0, 0, 4096, 0).is_ok());
}

#[test]
fn every_qsd_key_of_the_readme_is_taken_or_refused_with_its_spelling() {
    let dir = tmpdir();
    let image = dir.path().join("i.raw");
    common::make_image(&image, 1 << 20, 3);
    let check = |spec: String| {
        Command::new(common::daemon_bin())
            .args(["serve", "--check-config", "--export", &spec])
            .output()
            .unwrap()
    };
    let base =
        format!("addr.path={},image={}", dir.path().join("s.sock").display(), image.display());
    for taken in
        ["num-queues=2", "writable=on", "read-only=on", "discard=ignore", "iothread=dedicated"]
    {
        let out = check(format!("{base},{taken}"));
        assert!(out.status.success(), "{taken}: {}", String::from_utf8_lossy(&out.stderr));
    }
    for (refused, hint) in [
        ("node-name=n", "image=PATH names the image itself"),
        ("type=vhost-user-blk", "every export is vhost-user-blk"),
        ("addr.type=unix", "socket=PATH"),
        ("addr.str=3", "socket-fd=N"),
        ("fixed-iothread=on", "iothread=NAME"),
        ("cache.direct=on", "cache=none|directsync (on)"),
        ("cache.no-flush=on", "cache=unsafe"),
    ] {
        let out = check(format!("{base},{refused}"));
        assert_eq!(out.status.code(), Some(2), "{refused}");
        let err = String::from_utf8_lossy(&out.stderr);
        let key = refused.split('=').next().unwrap();
        assert!(
            err.contains(&format!("unknown key '{key}' (a qemu-storage-daemon key; blkplane: ")),
            "{err}"
        );
        assert!(err.contains(hint), "{refused}: {err}");
    }
}
