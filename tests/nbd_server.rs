//! The daemon's NBD server (`--nbd-server`, `ctl nbd-export`) against real NBD clients:
//! qemu-img and qemu-io over a Unix socket and over TCP with TLS (certificates made here with
//! openssl), writes into a migration destination (`incoming=on`) and refused to an export
//! whose guest runs (a libblkio client), and a hostile client of this test's own.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ctl, make_image, pattern, tmpdir, Daemon};

const IMAGE_BYTES: u64 = 64 << 20;

/// A daemon with a control socket and an NBD server (`nbd` is `--nbd-server`'s value);
/// `exports` are `--export` specs. Waits for the Unix sockets it names.
fn start(dir: &Path, nbd: &str, exports: &[String]) -> (Daemon, PathBuf) {
    let control = dir.join("ctl.sock");
    let mut args = vec!["--control".to_string(), control.display().to_string()];
    args.extend(["--nbd-server".to_string(), nbd.to_string()]);
    let mut wait = vec![control.clone()];
    for e in exports {
        args.extend(["--export".to_string(), e.clone()]);
        let sock = e.split(',').find_map(|kv| kv.strip_prefix("socket=")).unwrap();
        wait.push(PathBuf::from(sock));
    }
    if let Some(path) = nbd.split(',').find_map(|kv| kv.strip_prefix("unix=")) {
        wait.push(PathBuf::from(path));
    }
    (Daemon::start_with(dir, &args, &wait), control)
}

/// `ctl ARGS` that must succeed; its output as JSON.
fn ctl_ok(control: &Path, args: &[&str]) -> serde_json::Value {
    let out = ctl(control, args);
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `ctl ARGS` that must fail saying `want`.
fn ctl_refused(control: &Path, args: &[&str], want: &str) {
    let out = ctl(control, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ctl {args:?} succeeded");
    assert!(stderr.contains(want), "ctl {args:?}: wanted {want:?} in: {stderr}");
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn assert_ran(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An image of `IMAGE_BYTES` with a pattern in its first half and holes, then data, after.
fn make_sparse_image(path: &Path, seed: u64) {
    make_image(path, 32 << 20, seed);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(IMAGE_BYTES).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pattern(seed, 40 << 20, 1 << 20), 40 << 20).unwrap();
}

/// `qemu-img compare` of two raw images: identical, or the test fails with its words.
fn assert_same(a: &Path, b: &Path) {
    let out =
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(a).arg(b));
    assert_ran(&out, "qemu-img compare");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"));
}

fn unix_uri(name: &str, socket: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

#[test]
fn qemu_img_copies_exports_over_a_unix_socket() {
    let dir = tmpdir();
    let disk = common::disk_dir();
    let (img, direct) = (dir.path().join("a.raw"), disk.path().join("direct.raw"));
    make_sparse_image(&img, 1);
    make_sparse_image(&direct, 2);
    let nbd = dir.path().join("nbd.sock");
    let exports = [
        format!("id=vm1,socket={},image={}", dir.path().join("vm1.sock").display(), img.display()),
        format!(
            "id=vm2,socket={},image={},cache=none",
            dir.path().join("vm2.sock").display(),
            direct.display()
        ),
    ];
    let (_daemon, control) = start(dir.path(), &format!("unix={}", nbd.display()), &exports);
    // Nothing is exposed until nbd-export says so.
    let out = run(Command::new("qemu-img").arg("info").arg(unix_uri("vm1", &nbd)));
    assert!(!out.status.success());
    let info = ctl_ok(&control, &["nbd-export", "id=vm1"]);
    assert_eq!(info["name"], "vm1");
    assert_eq!(info["writable"], false);
    assert_eq!(info["size_bytes"], IMAGE_BYTES);
    ctl_ok(&control, &["nbd-export", "id=vm2", "name=direct disk"]);
    ctl_refused(&control, &["nbd-export", "id=vm1", "name=other"], "exposed already");
    ctl_refused(&control, &["nbd-export", "id=vm2", "name=vm1"], "exposed already");
    ctl_refused(&control, &["nbd-export", "id=nope"], "no export with id 'nope'");
    let list = ctl_ok(&control, &["nbd-list"]);
    assert_eq!(list["exports"].as_array().unwrap().len(), 2);

    for (name, image) in [("vm1", &img), ("direct%20disk", &direct)] {
        let out_img = dir.path().join("copy.raw");
        let _ = std::fs::remove_file(&out_img);
        let out = run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(unix_uri(name, &nbd))
            .arg(&out_img));
        assert_ran(&out, "qemu-img convert");
        assert_same(image, &out_img);
    }
    // Block status: the hole between the pattern and the data at 40 MiB reads as zero and
    // unallocated, as SEEK_HOLE says.
    let out = run(Command::new("qemu-img")
        .args(["map", "-f", "raw", "--output=json"])
        .arg(unix_uri("vm1", &nbd)));
    assert_ran(&out, "qemu-img map");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let extents: Vec<(u64, u64, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["data"] == true))
        .collect();
    assert_eq!(
        extents,
        vec![
            (0, 32 << 20, true),
            (32 << 20, 8 << 20, false),
            (40 << 20, 1 << 20, true),
            (41 << 20, IMAGE_BYTES - (41 << 20), false)
        ]
    );
    // Unexported: its name is gone.
    ctl_ok(&control, &["nbd-unexport", "id=vm1"]);
    let out = run(Command::new("qemu-img").arg("info").arg(unix_uri("vm1", &nbd)));
    assert!(!out.status.success());
    ctl_refused(&control, &["nbd-unexport", "id=vm1"], "not exposed");
}
