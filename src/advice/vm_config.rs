//! `blkplane vm-config`: what a VMM needs to use an export well, following the advice: guest
//! memory shared with the daemon (vhost-user needs it) and on huge pages when the host has
//! enough free, one queue per vCPU, a socket that reconnects when the daemon restarts, and the
//! vCPUs kept off the CPUs of the export's I/O threads when those are pinned.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;

use super::{Host, HUGE_PAGE_BYTES};
use crate::disk::BackendSpec;
use crate::export::ExportConfig;
use crate::iothread::registry::ThreadChoice;
use crate::spec::format_cpu_list;

/// The VMM to write for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Vmm {
    /// QEMU command-line arguments.
    Qemu,
    /// A libvirt domain with the disk, memory backing and CPU pinning.
    Libvirt,
    /// Cloud Hypervisor command-line arguments.
    CloudHypervisor,
}

/// What the configuration needs to know of the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportShape {
    pub id: String,
    pub socket: PathBuf,
    pub queues: u16,
    pub queue_size: u16,
    /// CPUs the export's I/O threads are pinned to; empty when they are not (the shared pool,
    /// or threads without `cpus=`).
    pub io_cpus: Vec<usize>,
    /// The image (for the NUMA node of its device); `None` for `engine=null`.
    pub image: Option<PathBuf>,
}

impl ExportShape {
    /// From `--export` keys, without a daemon (named I/O threads' CPUs are unknown then).
    pub fn from_config(c: &ExportConfig) -> ExportShape {
        ExportShape {
            id: c.id.clone().unwrap_or_else(|| "export0".into()),
            socket: c.socket.path.clone(),
            queues: c.disk.queues.unwrap_or(crate::disk::MAX_QUEUES),
            queue_size: c.disk.queue_size,
            io_cpus: if c.threads.iothread == ThreadChoice::Dedicated {
                c.threads.cpus.clone()
            } else {
                Vec::new()
            },
            image: match &c.disk.backend {
                BackendSpec::Image(p) => Some(p.clone()),
                BackendSpec::Null { .. } | BackendSpec::Nbd { .. } | BackendSpec::Rbd(_) => None,
            },
        }
    }

    /// From a running daemon: one entry of `list-exports` and the reply of `list-iothreads`.
    /// Named threads count as pinned only if every one of the export's is.
    pub fn from_daemon(export: &Value, iothreads: &Value) -> Result<ExportShape, String> {
        let spec = &export["spec"];
        let text = |key: &str| spec[key].as_str().map(str::to_string);
        let number = |key: &str| {
            spec[key]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or(format!("no '{key}' in {spec}"))
        };
        let io_cpus = super::io_cpus_of(spec, iothreads);
        Ok(ExportShape {
            id: text("id").ok_or(format!("no 'id' in {spec}"))?,
            socket: text("socket").ok_or(format!("no 'socket' in {spec}"))?.into(),
            // What the export offers: its queues=, or as many as a VMM may ask for.
            queues: export["queues"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or(format!("no 'queues' in {export}"))?,
            queue_size: number("queue-size")?,
            io_cpus,
            image: spec["image"].as_str().map(PathBuf::from),
        })
    }
}

/// The VM around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmShape {
    pub vcpus: u16,
    pub memory_bytes: u64,
}

/// Quotes `s` for a POSIX shell when it needs it.
fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./,=:@%+-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `1G`, `512M`, or bytes: the size as QEMU and Cloud Hypervisor read it.
fn size_text(bytes: u64) -> String {
    match bytes {
        b if b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => b.to_string(),
    }
}

/// The facts the configuration rests on, and the advice it could not follow.
struct Plan {
    huge_pages: bool,
    /// Queues the VMM asks for: one per vCPU, at most what the export offers.
    queues: u16,
    /// CPUs for the vCPUs and the emulator: the online ones minus the I/O threads'; empty
    /// when there is nothing to pin (I/O threads not pinned, or they cover every CPU).
    guest_cpus: Vec<usize>,
    /// The NUMA node to put guest memory on: the image's device's (hosts with several).
    memory_node: Option<u32>,
    notes: Vec<String>,
}

fn plan(export: &ExportShape, vm: VmShape, host: &Host) -> Plan {
    let mut notes = Vec::new();
    let huge_pages = host.huge_pages_fit(vm.memory_bytes);
    if !huge_pages {
        let needed = vm.memory_bytes.div_ceil(HUGE_PAGE_BYTES);
        match host.free_huge_pages() {
            Some(free) => notes.push(format!(
                "huge pages: {free} free 2 MiB pages, the guest needs {needed}; reserve them \
                 (sysctl vm.nr_hugepages) for fewer TLB misses and memory that is never swapped"
            )),
            None => notes.push("huge pages: none configured on this host".into()),
        }
    }
    let queues = vm.vcpus.min(export.queues).max(1);
    if export.queues < vm.vcpus {
        notes.push(format!(
            "queues: the export offers {}, the VM has {} vCPUs; give the export queues={} for \
             one queue per vCPU",
            export.queues, vm.vcpus, vm.vcpus
        ));
    }
    let online = host.online_cpus();
    let guest_cpus: Vec<usize> =
        online.iter().copied().filter(|c| !export.io_cpus.contains(c)).collect();
    let guest_cpus = if export.io_cpus.is_empty() {
        notes.push(
            "pinning: the export's I/O threads are not pinned (the shared pool); to keep vCPUs \
             off them, serve it from pinned threads (--iothread id=io0,cpus=LIST and \
             iothread=io0, or iothread=dedicated,cpus=LIST)"
                .into(),
        );
        Vec::new()
    } else if guest_cpus.is_empty() {
        notes.push(format!(
            "pinning: the I/O threads' CPUs ({}) are all the host has; nothing left to pin the \
             vCPUs to",
            format_cpu_list(&export.io_cpus)
        ));
        Vec::new()
    } else {
        guest_cpus
    };
    let memory_node = export.image.as_deref().and_then(|i| host.numa_node_of(i));
    if let Some(n) = memory_node {
        notes.push(format!(
            "memory: bound to NUMA node {n}, where the image's device is, so that the daemon \
             moves data between the device and memory on one node"
        ));
    }
    notes.push(
        "guest: boot its kernel with cpuidle_haltpoll.force=1 (Linux 5.4 and later): an idle \
         vCPU then polls up to 200 µs before it halts, so its disk's completion finds it awake \
         (a depth-1 reader on a VM whose CPUs halted at once: p50 63 against 45-49 µs on ext4, \
         IOPS up by 10-35 %), for guest CPU spent while it waits; the export's I/O threads \
         choose their own polling by measurement (poll=adaptive)"
            .into(),
    );
    Plan { huge_pages, queues, guest_cpus, memory_node, notes }
}

/// The configuration for `vmm`, with `#` (or `<!-- -->`) comment lines first saying what
/// it follows and what it could not.
pub fn render(vmm: Vmm, export: &ExportShape, vm: VmShape, host: &Host) -> String {
    let p = plan(export, vm, host);
    match vmm {
        Vmm::Qemu => qemu(export, vm, &p),
        Vmm::Libvirt => libvirt(export, vm, &p),
        Vmm::CloudHypervisor => cloud_hypervisor(export, vm, &p),
    }
}

fn comment_lines(out: &mut String, prefix: &str, export: &ExportShape, vm: VmShape, p: &Plan) {
    let _ = writeln!(
        out,
        "{prefix} blkplane export '{}': {} vCPUs, {} of guest memory{}, {} queue(s) of {}",
        export.id,
        vm.vcpus,
        size_text(vm.memory_bytes),
        if p.huge_pages { " on 2 MiB huge pages" } else { "" },
        p.queues,
        export.queue_size
    );
    for note in &p.notes {
        let _ = writeln!(out, "{prefix} {note}");
    }
}

fn qemu(export: &ExportShape, vm: VmShape, p: &Plan) -> String {
    let mut out = String::new();
    comment_lines(&mut out, "#", export, vm, p);
    if !p.guest_cpus.is_empty() {
        let _ = writeln!(
            out,
            "# pinning: run QEMU on the CPUs the I/O threads leave free: taskset -c {} qemu-system-x86_64 ...",
            format_cpu_list(&p.guest_cpus)
        );
    }
    let size = size_text(vm.memory_bytes);
    let mut backend = format!("memory-backend-memfd,id=blkplane-mem,size={size},share=on");
    if p.huge_pages {
        backend.push_str(",hugetlb=on,hugetlbsize=2M");
    }
    if let Some(n) = p.memory_node {
        let _ = write!(backend, ",host-nodes={n},policy=bind");
    }
    let chardev = format!("blkplane-{}", export.id);
    // QEMU 9.2 and later also take reconnect-ms=1000.
    let args = [
        ("-smp", vm.vcpus.to_string()),
        ("-m", size),
        ("-object", backend),
        ("-numa", "node,memdev=blkplane-mem".to_string()),
        ("-chardev", format!("socket,id={chardev},path={},reconnect=1", export.socket.display())),
        (
            "-device",
            format!(
                "vhost-user-blk-pci,chardev={chardev},num-queues={},queue-size={}",
                p.queues, export.queue_size
            ),
        ),
    ];
    let lines: Vec<String> =
        args.iter().map(|(flag, value)| format!("{flag} {}", shell_word(value))).collect();
    out.push_str(&lines.join(" \\\n"));
    out.push('\n');
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;")
}

fn libvirt(export: &ExportShape, vm: VmShape, p: &Plan) -> String {
    let mut out = String::new();
    let mut notes = String::new();
    comment_lines(&mut notes, "  ", export, vm, p);
    let _ = writeln!(
        out,
        "<!-- The parts of a libvirt domain that serve blkplane export '{}' well: merge\n     \
         memoryBacking, vcpu, cputune and the disk into your domain.\n{}-->",
        export.id.replace("--", "- -"),
        notes.replace("--", "- -")
    );
    let _ = writeln!(out, "<domain type='kvm'>");
    let _ = writeln!(out, "  <name>{}</name>", xml_escape(&export.id));
    let _ = writeln!(out, "  <memory unit='KiB'>{}</memory>", vm.memory_bytes / 1024);
    let _ = writeln!(out, "  <memoryBacking>");
    if p.huge_pages {
        let _ = writeln!(
            out,
            "    <hugepages>\n      <page size='2048' unit='KiB'/>\n    </hugepages>"
        );
        // Huge pages are shared with the daemon through their hugetlbfs file.
    } else {
        let _ = writeln!(out, "    <source type='memfd'/>");
    }
    let _ = writeln!(out, "    <access mode='shared'/>");
    let _ = writeln!(out, "  </memoryBacking>");
    let _ = writeln!(out, "  <vcpu placement='static'>{}</vcpu>", vm.vcpus);
    if !p.guest_cpus.is_empty() {
        let cpuset = format_cpu_list(&p.guest_cpus);
        let _ = writeln!(out, "  <cputune>");
        for vcpu in 0..vm.vcpus {
            let _ = writeln!(out, "    <vcpupin vcpu='{vcpu}' cpuset='{cpuset}'/>");
        }
        let _ = writeln!(out, "    <emulatorpin cpuset='{cpuset}'/>");
        let _ = writeln!(out, "  </cputune>");
    }
    if let Some(n) = p.memory_node {
        let _ =
            writeln!(out, "  <numatune>\n    <memory mode='strict' nodeset='{n}'/>\n  </numatune>");
    }
    let _ = writeln!(out, "  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>");
    let _ = writeln!(out, "  <devices>");
    let _ = writeln!(out, "    <disk type='vhostuser' device='disk'>");
    let _ = writeln!(
        out,
        "      <driver name='qemu' type='raw' queues='{}' queue_size='{}'/>",
        p.queues, export.queue_size
    );
    let _ = writeln!(
        out,
        "      <source type='unix' path='{}'>",
        xml_escape(&export.socket.display().to_string())
    );
    let _ = writeln!(out, "        <reconnect enabled='yes' timeout='1'/>");
    let _ = writeln!(out, "      </source>");
    let _ = writeln!(out, "      <target dev='vda' bus='virtio'/>");
    let _ = writeln!(out, "    </disk>");
    let _ = writeln!(out, "  </devices>");
    let _ = writeln!(out, "</domain>");
    out
}

fn cloud_hypervisor(export: &ExportShape, vm: VmShape, p: &Plan) -> String {
    let mut out = String::new();
    comment_lines(&mut out, "#", export, vm, p);
    let mut cpus = format!("boot={}", vm.vcpus);
    if !p.guest_cpus.is_empty() {
        // Its option parser keeps commas inside brackets together: [0@[2-7],1@[2-7]].
        let set = format_cpu_list(&p.guest_cpus);
        let pins: Vec<String> = (0..vm.vcpus).map(|v| format!("{v}@[{set}]")).collect();
        cpus = format!("boot={},affinity=[{}]", vm.vcpus, pins.join(","));
    }
    let mut memory = format!("size={},shared=on", size_text(vm.memory_bytes));
    if p.huge_pages {
        memory.push_str(",hugepages=on,hugepage_size=2M");
    }
    // Memory on a node is a memory zone; the main memory is then empty.
    let zone = p.memory_node.map(|n| {
        let zone = format!("id=blkplane-mem,{memory},host_numa_node={n}");
        memory = "size=0".into();
        zone
    });
    let disk = format!(
        "vhost_user=on,socket={},num_queues={},queue_size={},id={}",
        export.socket.display(),
        p.queues,
        export.queue_size,
        export.id
    );
    let mut args = vec![("--cpus", cpus), ("--memory", memory)];
    if let Some(zone) = zone {
        args.push(("--memory-zone", zone));
    }
    args.push(("--disk", disk));
    let lines: Vec<String> =
        args.iter().map(|(flag, value)| format!("{flag} {}", shell_word(value))).collect();
    out.push_str(&lines.join(" \\\n"));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(free_huge_pages: Option<u64>, online: &str) -> (tempfile::TempDir, Host) {
        let dir = tempfile::tempdir().unwrap();
        let h = Host::new(dir.path());
        if let Some(n) = free_huge_pages {
            let p = h.path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages");
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{n}\n")).unwrap();
        }
        let p = h.path("/sys/devices/system/cpu/online");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{online}\n")).unwrap();
        (dir, h)
    }

    fn export(io_cpus: Vec<usize>) -> ExportShape {
        ExportShape {
            id: "vm1".into(),
            socket: "/run/blkplane/vm1.sock".into(),
            queues: 2,
            queue_size: 256,
            io_cpus,
            image: None,
        }
    }

    #[test]
    fn qemu_uses_huge_pages_only_when_enough_are_free() {
        let vm = VmShape { vcpus: 2, memory_bytes: 1 << 30 };
        let (_d, h) = host(Some(512), "0-3");
        let out = render(Vmm::Qemu, &export(vec![]), vm, &h);
        assert!(out.contains(
            "-object memory-backend-memfd,id=blkplane-mem,size=1G,share=on,hugetlb=on,hugetlbsize=2M \\\n"
        ), "{out}");
        assert!(out.ends_with(
            "-chardev socket,id=blkplane-vm1,path=/run/blkplane/vm1.sock,reconnect=1 \\\n-device vhost-user-blk-pci,chardev=blkplane-vm1,num-queues=2,queue-size=256\n"
        ), "{out}");
        let (_d, h) = host(Some(511), "0-3");
        let out = render(Vmm::Qemu, &export(vec![]), vm, &h);
        assert!(out.contains("size=1G,share=on \\\n"), "{out}");
        assert!(out.contains("# huge pages: 511 free 2 MiB pages, the guest needs 512"), "{out}");
        // The guest's own polling, which the I/O threads' cannot replace.
        assert!(out.contains("\n# guest: boot its kernel with cpuidle_haltpoll.force=1 "), "{out}");
    }

    #[test]
    fn vcpus_stay_off_the_io_threads_cpus() {
        let vm = VmShape { vcpus: 2, memory_bytes: 512 << 20 };
        let (_d, h) = host(None, "0-7");
        let out = render(Vmm::Libvirt, &export(vec![0, 1]), vm, &h);
        assert!(
            out.contains("    <vcpupin vcpu='1' cpuset='2-7'/>\n    <emulatorpin cpuset='2-7'/>"),
            "{out}"
        );
        assert!(out.contains("<source type='memfd'/>") && out.contains("<access mode='shared'/>"));
        let out = render(Vmm::CloudHypervisor, &export(vec![0, 1]), vm, &h);
        assert!(out.contains("--cpus 'boot=2,affinity=[0@[2-7],1@[2-7]]' \\\n"), "{out}");
        // Not pinned: no pinning, and a note saying how to get it.
        let out = render(Vmm::Libvirt, &export(vec![]), vm, &h);
        assert!(
            !out.contains("<cputune>")
                && out.contains("pinning: the export's I/O threads are not pinned")
        );
    }

    #[test]
    fn one_queue_per_vcpu_at_most_what_the_export_offers() {
        let (_d, h) = host(None, "0-3");
        let vm = VmShape { vcpus: 4, memory_bytes: 1 << 30 };
        let out = render(Vmm::CloudHypervisor, &export(vec![]), vm, &h);
        assert!(out.contains("--disk vhost_user=on,socket=/run/blkplane/vm1.sock,num_queues=2,queue_size=256,id=vm1\n"), "{out}");
        assert!(out.contains(
            "# queues: the export offers 2, the VM has 4 vCPUs; give the export queues=4"
        ));
        let vm = VmShape { vcpus: 1, memory_bytes: 1 << 30 };
        assert!(render(Vmm::Qemu, &export(vec![]), vm, &h).contains("num-queues=1,"));
    }

    #[test]
    fn odd_paths_are_quoted_for_the_shell() {
        assert_eq!(shell_word("/run/a b.sock"), "'/run/a b.sock'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word("size=1G,share=on"), "size=1G,share=on");
    }
}
