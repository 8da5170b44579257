//! The test command's Ceph cluster (scripts/ceph-cluster, started by scripts/test) and RBD
//! images on it, removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The cluster's configuration: `BLKPLANE_CEPH_CONF`, or where scripts/ceph-cluster puts it.
pub fn ceph_conf() -> PathBuf {
    let conf = std::env::var_os("BLKPLANE_CEPH_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/blkplane-ceph/ceph.conf"));
    assert!(
        conf.is_file(),
        "no Ceph cluster at {}: the RBD tests need the one scripts/test starts \
         (scripts/ceph-cluster start)",
        conf.display()
    );
    conf
}

/// `rbd ARGS` on the test cluster; panics with its stderr if it fails.
pub fn rbd(args: &[&str]) -> String {
    let conf = ceph_conf();
    let out = Command::new("rbd").arg("-c").arg(&conf).args(args).output().expect("run rbd");
    assert!(out.status.success(), "rbd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ceph ARGS` on the test cluster.
pub fn ceph(args: &[&str]) -> String {
    ceph_try(args).unwrap_or_else(|e| panic!("ceph {args:?}: {e}"))
}

/// `ceph ARGS`, its output or its error (for polling a cluster that is coming back, whose
/// manager may not answer yet).
pub fn ceph_try(args: &[&str]) -> Result<String, String> {
    let conf = ceph_conf();
    let out = Command::new("ceph")
        .arg("-c")
        .arg(&conf)
        .args(["--connect-timeout", "30"])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An image in pool `rbd`, removed (with its snapshots) when dropped.
pub struct TestImage {
    pub name: String,
}

impl TestImage {
    fn unique() -> String {
        format!("t{}-{}", std::process::id(), super::rand_u16())
    }

    /// A new image of `bytes`, all zeroes.
    pub fn create(bytes: u64) -> TestImage {
        let name = Self::unique();
        rbd(&["create", "--size", &format!("{}K", bytes >> 10), &format!("rbd/{name}")]);
        TestImage { name }
    }

    /// A new image with `file`'s contents.
    pub fn import(file: &Path) -> TestImage {
        let name = Self::unique();
        rbd(&["import", "--no-progress", &file.to_string_lossy(), &format!("rbd/{name}")]);
        TestImage { name }
    }

    /// The image's contents written over `file`.
    pub fn export_to(&self, file: &Path) {
        let tmp = file.with_extension("rbd-export");
        let _ = std::fs::remove_file(&tmp);
        rbd(&["export", "--no-progress", &format!("rbd/{}", self.name), &tmp.to_string_lossy()]);
        std::fs::rename(&tmp, file).unwrap();
    }

    /// The export keys naming it.
    pub fn keys(&self) -> String {
        format!("image=rbd:rbd/{}:conf={}", self.name, ceph_conf().display())
    }

    /// The export keys naming its snapshot `snap`.
    pub fn snapshot_keys(&self, snap: &str) -> String {
        format!("image=rbd:rbd/{}@{snap}:conf={}", self.name, ceph_conf().display())
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let conf = ceph_conf();
        let spec = format!("rbd/{}", self.name);
        let _ = Command::new("rbd").arg("-c").arg(&conf).args(["snap", "purge", &spec]).output();
        let _ =
            Command::new("rbd").arg("-c").arg(&conf).args(["rm", "--no-progress", &spec]).output();
    }
}
