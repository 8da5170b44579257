//! contrib/libvirt-hook, libvirt's `qemu` hook for live migration without shared storage, run
//! as libvirt runs it (the domain's XML on stdin) against two real daemons on this host: the
//! destination's NBD server over TCP with TLS (certificates made here), the source's export
//! under a client's writes.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{ctl, make_image, tmpdir, wait_until, Client, Daemon};

const IMAGE_BYTES: u64 = 32 << 20;

fn hook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/libvirt-hook")
}

/// The hook run as `qemu DOMAIN OPERATION SUB -` with `xml` on stdin and settings `conf`.
fn run_hook(conf: &Path, args: &[&str], xml: &str) -> Output {
    let mut child = Command::new(hook())
        .args(args)
        .arg("-")
        .env("BLKPLANE_HOOK_CONF", conf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run contrib/libvirt-hook");
    child.stdin.take().unwrap().write_all(xml.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn ctl_json(control: &Path, args: &[&str]) -> serde_json::Value {
    let out = ctl(control, args);
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// "migrate begin" on the destination makes the image, adds the incoming export, exposes it,
/// starts the mirror on the source and returns once it is ready; "stopped end" on the source
/// cancels it; the images then compare equal. A domain with no source host named is left
/// alone; an image that exists is not overwritten (the hook fails, which calls the migration
/// off).
#[test]
fn the_libvirt_hook_prepares_the_destination_and_mirrors_into_it() {
    let dir = tmpdir();
    let d = dir.path();
    common::tls::make_certs(d, &["127.0.0.1"]);
    let (src, dst, images, incoming) =
        (d.join("src"), d.join("dst"), d.join("images"), d.join("incoming"));
    for p in [&src, &dst, &images, &incoming] {
        fs::create_dir(p).unwrap();
    }
    let image = d.join("vm1.raw");
    make_image(&image, IMAGE_BYTES, 31);
    let (ctl_a, ctl_b) = (d.join("ctl-a.sock"), d.join("ctl-b.sock"));
    let port = common::free_port();
    let args_b = [
        "--control".to_string(),
        ctl_b.display().to_string(),
        "--nbd-server".to_string(),
        format!("addr=127.0.0.1:{port},tls-creds={}", d.join("srv").display()),
    ];
    let mut daemon_b = Daemon::start_with(d, &args_b, std::slice::from_ref(&ctl_b));
    let sock_a = src.join("vm1.sock");
    let args_a = [
        "--control".to_string(),
        ctl_a.display().to_string(),
        "--export".to_string(),
        format!("id=vm1,socket={},image={}", sock_a.display(), image.display()),
    ];
    let mut daemon_a = Daemon::start_with(d, &args_a, &[ctl_a.clone(), sock_a.clone()]);

    let bin = common::daemon_bin();
    let settings = |control: &Path| {
        format!(
            "BLKPLANE={bin}\nCONTROL={}\nIMAGE_DIR={}\nNBD_HOST=127.0.0.1\nNBD_PORT={port}\n\
             SOURCE_CTL='{bin} ctl --control {}'\nSOURCE_TLS_CREDS={}\nINCOMING_DIR={}\n\
             READY_TIMEOUT_S=60\n",
            control.display(),
            images.display(),
            ctl_a.display(),
            d.join("good").display(),
            incoming.display()
        )
    };
    let (conf_dst, conf_src) = (d.join("hook-dst.conf"), d.join("hook-src.conf"));
    fs::write(&conf_dst, settings(&ctl_b)).unwrap();
    fs::write(&conf_src, settings(&ctl_a)).unwrap();
    // The destination's XML: its disk's socket is where the destination export goes.
    let xml = |sock: &Path| {
        format!(
            "<domain type='kvm'><name>vm1</name><devices>\n\
             <disk type='file' device='disk'><source file='/var/lib/other.img'/><target dev='vdb'/></disk>\n\
             <disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>\
             <source type='unix' path='{}'><reconnect enabled='yes' timeout='1'/></source>\
             <target dev='vda' bus='virtio'/></disk>\n</devices></domain>\n",
            sock.display()
        )
    };
    let dst_xml = xml(&dst.join("vm1.sock"));

    // No source host named: shared storage, nothing to do.
    let out = run_hook(&conf_dst, &["vm1", "migrate", "begin"], &dst_xml);
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(ctl_json(&ctl_b, &["list-exports"]), serde_json::json!([]));

    // A client writes on the source all along.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, sock) = (Arc::clone(&stop), sock_a.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&sock, 1);
            let (mut n, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let at = (n * 7919 % (IMAGE_BYTES / 4096)) * 4096;
                failed += u64::from(c.write_at(0, at, &[(n % 251) as u8 + 1; 4096], 0) != 0);
                n += 1;
            }
            (n, failed)
        })
    };
    fs::write(incoming.join("vm1"), "sourcehost\n").unwrap();
    let out = run_hook(&conf_dst, &["vm1", "migrate", "begin"], &dst_xml);
    assert!(out.status.success(), "{}\n{}", said(&out), daemon_a.log());
    assert!(said(&out).contains("vm1: mirror ready"), "{}", said(&out));
    let job = &ctl_json(&ctl_a, &["query-jobs"])[0];
    assert_eq!(job["state"], "ready", "{job}");
    assert_eq!(job["target"], format!("nbd://127.0.0.1:{port}/vm1"), "{job}");
    let exports = ctl_json(&ctl_b, &["list-exports"]);
    assert_eq!(exports[0]["id"], "vm1", "{exports}");
    assert_eq!(exports[0]["socket"], dst.join("vm1.sock").display().to_string());
    assert_eq!(exports[0]["size_bytes"], IMAGE_BYTES);
    assert_eq!(ctl_json(&ctl_b, &["nbd-list"])["exports"][0]["writable"], true);

    // Again: the image exists now, and is not overwritten.
    let out = run_hook(&conf_dst, &["vm1", "migrate", "begin"], &dst_xml);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("exists: not overwritten"), "{}", said(&out));

    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (requests, failed) = writer.join().unwrap();
    assert!(requests > 100, "{requests}");
    assert_eq!(failed, 0, "{}", daemon_a.log());
    // The migrated domain is gone from the source: its job is cancelled.
    let out = run_hook(&conf_src, &["vm1", "stopped", "end"], &xml(&sock_a));
    assert!(out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("vm1: mirror cancelled"), "{}", said(&out));
    assert_eq!(ctl_json(&ctl_a, &["query-jobs"])[0]["state"], "cancelled");
    let copy = images.join("vm1.raw");
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(&image)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", said(&out));
    wait_until("both daemons alive", Duration::from_secs(1), || {
        daemon_a.alive() && daemon_b.alive()
    });
}
