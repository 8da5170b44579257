//! The field's tuning advice for KVM disk I/O (shared/ADVICE.md), turned into commands:
//! `vm-config` writes a VMM's configuration for an export ([`vm_config`]), `doctor` says
//! where the host and the exports depart from the advice ([`doctor`]). Off the data path:
//! everything here reads the host through [`Host`], a root directory (`/`, or a fake tree in
//! the tests) under which `/sys` and `/proc` are looked up.

pub mod doctor;
pub mod vm_config;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The host as files under a root: `/` for the real one.
#[derive(Clone, Debug)]
pub struct Host {
    root: PathBuf,
}

/// 2 MiB, the huge page size the configurations ask for.
pub const HUGE_PAGE_BYTES: u64 = 2 << 20;

impl Host {
    pub fn new(root: impl Into<PathBuf>) -> Host {
        Host { root: root.into() }
    }

    /// The path of `abs` (an absolute path on the host) under the root.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// A file's text, trimmed; `None` if it cannot be read.
    pub fn read(&self, abs: &str) -> Option<String> {
        std::fs::read_to_string(self.path(abs)).ok().map(|s| s.trim().to_string())
    }

    /// A file holding one number.
    pub fn read_u64(&self, abs: &str) -> Option<u64> {
        self.read(abs)?.parse().ok()
    }

    /// Free 2 MiB huge pages (`None`: the kernel has none configured or the file is missing).
    pub fn free_huge_pages(&self) -> Option<u64> {
        self.read_u64("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
    }

    /// Whether `bytes` of guest memory fit in the free 2 MiB huge pages.
    pub fn huge_pages_fit(&self, bytes: u64) -> bool {
        self.free_huge_pages().is_some_and(|free| free * HUGE_PAGE_BYTES >= bytes)
    }

    /// The online CPUs (`/sys/devices/system/cpu/online`, a list like `0-3,6`).
    pub fn online_cpus(&self) -> Vec<usize> {
        self.read("/sys/devices/system/cpu/online")
            .map(|list| parse_cpu_ranges(&list))
            .unwrap_or_default()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// NUMA nodes of the host (`/sys/devices/system/node/nodeN`).
    pub fn numa_nodes(&self) -> usize {
        std::fs::read_dir(self.path("/sys/devices/system/node"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        name.strip_prefix("node").is_some_and(|n| n.parse::<u32>().is_ok())
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// The sysfs directory of the block device an image lives on (the device itself for a
    /// block device, the file system's device for a file), and whether the image is a device.
    pub fn block_device_dir(&self, image: &Path) -> Option<(PathBuf, bool)> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(image).ok()?;
        let is_device = meta.file_type().is_block_device();
        let dev = if is_device { meta.rdev() } else { meta.dev() };
        // A link to the device's directory, named as the kernel names it (vda, nvme0n1).
        let link = self.path(&format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev)));
        let dir = std::fs::canonicalize(link).ok()?;
        // A partition: the queue and the device are its disk's.
        if dir.join("partition").exists() {
            return Some((dir.parent()?.to_path_buf(), is_device));
        }
        Some((dir, is_device))
    }

    /// The NUMA node of the device `image` is on (see [`Host::device_numa_node`]).
    pub fn numa_node_of(&self, image: &Path) -> Option<u32> {
        self.device_numa_node(&self.block_device_dir(image)?.0)
    }

    /// The NUMA node of the block device whose sysfs directory is `dir`, when the host has
    /// more than one node and the device says which.
    pub fn device_numa_node(&self, dir: &Path) -> Option<u32> {
        if self.numa_nodes() < 2 {
            return None;
        }
        let node = std::fs::read_to_string(dir.join("device/numa_node")).ok()?;
        node.trim().parse::<i64>().ok().filter(|n| *n >= 0).map(|n| n as u32)
    }
}

/// A kernel CPU list (`0-3,6`) as numbers; what does not parse is left out.
pub fn parse_cpu_ranges(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
            if a <= b && b < 1 << 16 {
                cpus.extend(a..=b);
            }
        }
    }
    cpus
}

/// The CPUs an export's I/O threads are pinned to, from its whole spec (`list-exports`) and
/// `list-iothreads`: a dedicated export's `cpus`, or the union of its named threads' CPUs
/// when every one of them is pinned. Empty: not pinned (the shared pool, or a named thread
/// without CPUs).
pub fn io_cpus_of(spec: &Value, iothreads: &Value) -> Vec<usize> {
    let text = |key: &str| spec[key].as_str().unwrap_or_default();
    match text("iothread") {
        "pool" | "" => Vec::new(),
        "dedicated" => parse_cpu_ranges(text("cpus")),
        names => {
            let mut cpus = Vec::new();
            for name in names.split(':') {
                let thread = iothreads
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|t| t["id"].as_str() == Some(name));
                let list = thread.and_then(|t| t["cpus"].as_str()).unwrap_or_default();
                if list.is_empty() {
                    return Vec::new();
                }
                cpus.extend(parse_cpu_ranges(list));
            }
            cpus.sort_unstable();
            cpus.dedup();
            cpus
        }
    }
}
