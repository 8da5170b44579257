//! blkplane on a host without Ceph: the binary links no Ceph library, and with librbd and
//! librados out of reach everything but an RBD export works, and an RBD export is refused
//! with one line naming the library and the package (issue 30, 1). The RBD engine with the
//! libraries loaded is tests/rbd.rs.

mod common;

use std::process::Command;

use common::no_ceph::hiding_ceph;
use common::{assert_usage_error, ctl, daemon_bin, make_image, pattern, tmpdir, Client, Daemon};

/// What an RBD export says where librbd cannot be found.
const NO_LIBRBD: &str = "RBD rbd/disk: cannot load librbd.so.1, which RBD exports need \
    (Debian package librbd1): librbd.so.1: cannot open shared object file: No such file or \
    directory";

#[test]
fn the_binary_needs_no_ceph_library() {
    let out = Command::new("readelf").arg("-d").arg(daemon_bin()).output();
    let out = out.expect("readelf (Debian's binutils)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.strip_suffix(']'))
        .collect();
    assert!(needed.contains(&"libc.so.6"), "{dynamic}");
    let ceph: Vec<_> =
        needed.iter().filter(|n| n.starts_with("librbd") || n.starts_with("librados")).collect();
    assert!(ceph.is_empty(), "the binary needs {ceph:?}:\n{dynamic}");
}

#[test]
fn without_ceph_libraries_only_an_rbd_export_fails() {
    let dir = tmpdir();
    let bin = daemon_bin();
    let out = hiding_ceph(&bin, dir.path()).arg("--help").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Usage: blkplane"), "{stdout}");

    let out = hiding_ceph(&bin, dir.path())
        .args(["serve", "--export"])
        .arg(format!("socket={},image=rbd:rbd/disk", dir.path().join("rbd.sock").display()))
        .output()
        .unwrap();
    assert_usage_error(&out, NO_LIBRBD);

    // A file export and a null export serve; adding an RBD export fails alone.
    let image = dir.path().join("disk.raw");
    make_image(&image, 1 << 20, 7);
    let (file_sock, null_sock) = (dir.path().join("file.sock"), dir.path().join("null.sock"));
    let control = dir.path().join("ctl.sock");
    let args = [
        "--control".to_string(),
        control.display().to_string(),
        "--export".into(),
        format!("socket={},image={}", file_sock.display(), image.display()),
        "--export".into(),
        format!("socket={},engine=null,size=1M", null_sock.display()),
    ];
    let wait_for = [file_sock.clone(), null_sock.clone()];
    let mut daemon =
        Daemon::start_command(dir.path(), hiding_ceph(&bin, dir.path()), &args, &wait_for);
    let mut file = Client::connect(&file_sock, 1);
    assert_eq!(file.read_at(0, 4096, 4096, 0).unwrap(), pattern(7, 4096, 4096));
    assert_eq!(file.write_at(0, 0, &[0x5a; 4096], 0), 0);
    assert_eq!(file.read_at(0, 0, 4096, 0).unwrap(), vec![0x5a; 4096]);
    let mut null = Client::connect(&null_sock, 1);
    assert_eq!(null.read_at(0, 0, 4096, 0).unwrap(), vec![0; 4096]);
    let rbd_sock = format!("socket={}", dir.path().join("rbd.sock").display());
    let out = ctl(&control, &["add-export", &rbd_sock, "image=rbd:rbd/disk"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(NO_LIBRBD), "{stderr}");
    assert_eq!(file.read_at(0, 0, 4096, 0).unwrap(), vec![0x5a; 4096]);
    assert!(daemon.alive(), "{}", daemon.log());
}
