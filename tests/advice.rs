//! The advice commands against what reads their output: `vm-config`'s libvirt domain through
//! libvirt's own schema (`virt-xml-validate`), its Cloud Hypervisor arguments against that
//! VMM's documented option syntax, and the command against a running daemon. (Its QEMU
//! arguments boot the Linux guest in tests/guest.rs.) Host facts come from fake /sys trees
//! the tests build (`--root`).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{tmpdir, Daemon};

/// A fake host root: `free` free 2 MiB huge pages, these CPUs online.
fn fake_host(dir: &Path, free_huge_pages: u64, online: &str) {
    let hp = dir.join("sys/kernel/mm/hugepages/hugepages-2048kB");
    std::fs::create_dir_all(&hp).unwrap();
    std::fs::write(hp.join("free_hugepages"), format!("{free_huge_pages}\n")).unwrap();
    let cpu = dir.join("sys/devices/system/cpu");
    std::fs::create_dir_all(&cpu).unwrap();
    std::fs::write(cpu.join("online"), format!("{online}\n")).unwrap();
}

fn vm_config(args: &[&str]) -> Output {
    Command::new(common::daemon_bin()).arg("vm-config").args(args).output().unwrap()
}

fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn the_libvirt_domain_validates_against_libvirts_schema() {
    let dir = tmpdir();
    let root = dir.path().join("root");
    // Huge pages enough or not, I/O threads pinned or not: four shapes of the XML.
    for (free, spec_extra) in [
        (0, ""),
        (4096, ""),
        (0, ",iothread=dedicated,cpus=0"),
        (4096, ",iothread=dedicated,cpus=0"),
    ] {
        fake_host(&root, free, "0-3");
        let spec = format!(
            "id=vm-1,socket=/run/blkplane/vm-1.sock,engine=null,size=1G,queues=2{spec_extra}"
        );
        let out = vm_config(&[
            "--for",
            "libvirt",
            "--memory",
            "2G",
            "--root",
            root.to_str().unwrap(),
            "--export",
            &spec,
        ]);
        let xml = stdout_of(&out);
        assert_eq!(xml.contains("<hugepages>"), free > 0, "{xml}");
        assert_eq!(
            xml.contains("<vcpupin vcpu='1' cpuset='1-3'/>"),
            !spec_extra.is_empty(),
            "{xml}"
        );
        assert!(xml.contains("<driver name='qemu' type='raw' queues='2' queue_size='256'/>"));
        assert!(xml.contains("<reconnect enabled='yes' timeout='1'/>"));
        let file = dir.path().join("domain.xml");
        std::fs::write(&file, &xml).unwrap();
        let check = Command::new("virt-xml-validate")
            .arg(&file)
            .arg("domain")
            .output()
            .expect("virt-xml-validate (Debian's libvirt-clients)");
        assert!(
            check.status.success(),
            "libvirt's schema refuses:\n{xml}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// Cloud Hypervisor's documented option syntax (`cloud-hypervisor --help`): the keys each
/// option takes, and which of them are on/off toggles or numbers.
const CH_DISK_KEYS: &[&str] = &[
    "path",
    "readonly",
    "direct",
    "iommu",
    "num_queues",
    "queue_size",
    "vhost_user",
    "socket",
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
    "id",
    "pci_segment",
    "rate_limit_group",
    "queue_affinity",
    "serial",
];
const CH_MEMORY_KEYS: &[&str] = &[
    "size",
    "mergeable",
    "shared",
    "hugepages",
    "hugepage_size",
    "hotplug_method",
    "hotplug_size",
    "hotplugged_size",
    "prefault",
    "thp",
];
const CH_CPUS_KEYS: &[&str] =
    &["boot", "max", "topology", "kvm_hyperv", "max_phys_bits", "affinity", "features"];
const CH_TOGGLES: &[&str] = &[
    "readonly",
    "direct",
    "iommu",
    "vhost_user",
    "mergeable",
    "shared",
    "hugepages",
    "prefault",
    "thp",
];
const CH_NUMBERS: &[&str] = &["num_queues", "queue_size", "boot", "max"];

/// Splits `k=v,k=v` the way Cloud Hypervisor's option parser does: commas inside brackets
/// belong to the value.
fn ch_pairs(value: &str) -> Vec<(String, String)> {
    let (mut pairs, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in value.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                pairs.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    pairs.push(cur);
    pairs
        .into_iter()
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or_else(|| panic!("'{p}' is not key=value"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn the_cloud_hypervisor_arguments_follow_its_documented_syntax() {
    let dir = tmpdir();
    let root = dir.path().join("root");
    fake_host(&root, 4096, "0-3");
    let spec = "id=vm-1,socket=/run/blkplane/vm-1.sock,engine=null,size=1G,queues=4,queue-size=128,iothread=dedicated,cpus=0-1";
    let out = vm_config(&[
        "--for",
        "cloud-hypervisor",
        "--root",
        root.to_str().unwrap(),
        "--export",
        spec,
    ]);
    let text = stdout_of(&out);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    // Words as a shell splits them.
    let words = Command::new("sh")
        .arg("-c")
        .arg(format!("printf '%s\\0' {}", lines.join("\n")))
        .output()
        .unwrap();
    let words = String::from_utf8(words.stdout).unwrap();
    let words: Vec<&str> = words.split('\0').filter(|w| !w.is_empty()).collect();
    assert_eq!(words.len(), 6, "{text}");
    for option in words.chunks(2) {
        let keys = match option[0] {
            "--disk" => CH_DISK_KEYS,
            "--memory" => CH_MEMORY_KEYS,
            "--cpus" => CH_CPUS_KEYS,
            other => panic!("{other} is not an option vm-config should print"),
        };
        for (k, v) in ch_pairs(option[1]) {
            assert!(
                keys.contains(&k.as_str()),
                "{}: no key '{k}' in the documented syntax",
                option[0]
            );
            if CH_TOGGLES.contains(&k.as_str()) {
                assert!(v == "on" || v == "off", "{k}={v}: on|off");
            }
            if CH_NUMBERS.contains(&k.as_str()) {
                assert!(v.parse::<u32>().is_ok(), "{k}={v}: a number");
            }
        }
    }
    assert_eq!(words[1], "boot=4,affinity=[0@[2-3],1@[2-3],2@[2-3],3@[2-3]]");
    assert_eq!(words[3], "size=1G,shared=on,hugepages=on,hugepage_size=2M");
    assert_eq!(
        words[5],
        "vhost_user=on,socket=/run/blkplane/vm-1.sock,num_queues=4,queue_size=128,id=vm-1"
    );
}

/// `--id` asks the running daemon: its queues, and the CPUs of the named thread it runs on.
#[test]
fn vm_config_reads_a_running_export() {
    let dir = tmpdir();
    let root = dir.path().join("root");
    fake_host(&root, 0, "0-3");
    let (ctl, sock) = (dir.path().join("ctl.sock"), dir.path().join("vm.sock"));
    let _daemon = Daemon::start_with(
        dir.path(),
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--iothread".into(),
            "id=io0,cpus=0".into(),
            "--export".into(),
            format!("id=vm,socket={},engine=null,size=1G,queues=2,iothread=io0", sock.display()),
        ],
        &[ctl.clone(), sock.clone()],
    );
    let with_control = |args: &[&str]| {
        Command::new(common::daemon_bin())
            .arg("vm-config")
            .args(args)
            .args(["--root", root.to_str().unwrap()])
            .env("BLKPLANE_CONTROL", &ctl)
            .output()
            .unwrap()
    };
    let text = stdout_of(&with_control(&["--for", "qemu", "--id", "vm"]));
    assert!(text.contains("-smp 2 \\\n"), "{text}");
    assert!(text.contains(&format!("path={},reconnect=1", sock.display())), "{text}");
    assert!(text.contains("num-queues=2,queue-size=256"), "{text}");
    assert!(text.contains("taskset -c 1-3 "), "{text}");
    // Bad input: an unknown export (1), no daemon (3), nothing to describe or a bad size (2).
    let out = with_control(&["--for", "qemu", "--id", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "blkplane: no export with id 'nope'\n");
    let out = vm_config(&["--for", "qemu", "--id", "vm", "--control", "/nonexistent.sock"]);
    assert_eq!(out.status.code(), Some(3));
    let out = vm_config(&["--for", "qemu"]);
    assert_eq!(out.status.code(), Some(2));
    let out = vm_config(&[
        "--for",
        "qemu",
        "--export",
        "socket=/s,engine=null,size=1M",
        "--memory",
        "lots",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--memory: 'lots' is not a size"));
    let out = vm_config(&["--for", "xen", "--export", "socket=/s,engine=null,size=1M"]);
    assert_eq!(out.status.code(), Some(2));
}
