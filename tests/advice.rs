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
const CH_MEMORY_ZONE_KEYS: &[&str] = &[
    "size",
    "file",
    "shared",
    "hugepages",
    "hugepage_size",
    "host_numa_node",
    "id",
    "hotplug_size",
    "hotplugged_size",
    "prefault",
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
    let words = common::shell_words(&text);
    assert_eq!(words.len(), 6, "{text}");
    for option in words.chunks(2) {
        let keys = match option[0].as_str() {
            "--disk" => CH_DISK_KEYS,
            "--memory" => CH_MEMORY_KEYS,
            "--cpus" => CH_CPUS_KEYS,
            "--memory-zone" => CH_MEMORY_ZONE_KEYS,
            other => panic!("{other} is not an option vm-config should print"),
        };
        for (k, v) in ch_pairs(&option[1]) {
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

/// Writes `text` at `rel` under `root`, making directories.
fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, format!("{text}\n")).unwrap();
}

/// A host that follows the advice: performance governor, shallow idle states only, huge
/// pages free, THP on madvise, io_uring on, room for Linux AIO, a recent kernel, no memlock
/// limit, one NUMA node.
fn healthy_host(root: &Path) {
    put(root, "sys/devices/system/cpu/online", "0-3");
    for cpu in 0..4 {
        let d = format!("sys/devices/system/cpu/cpu{cpu}");
        put(root, &format!("{d}/cpufreq/scaling_governor"), "performance");
        for (i, (name, latency)) in [("POLL", 0), ("C1", 2)].iter().enumerate() {
            put(root, &format!("{d}/cpuidle/state{i}/name"), name);
            put(root, &format!("{d}/cpuidle/state{i}/latency"), &latency.to_string());
            put(root, &format!("{d}/cpuidle/state{i}/disable"), "0");
        }
    }
    put(root, "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "512");
    put(root, "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "512");
    put(root, "sys/kernel/mm/transparent_hugepage/enabled", "always [madvise] never");
    put(root, "proc/sys/kernel/io_uring_disabled", "0");
    put(root, "proc/sys/kernel/osrelease", "6.1.0-13-amd64");
    put(root, "proc/sys/fs/aio-max-nr", "1048576");
    put(root, "proc/sys/fs/aio-nr", "0");
    put(root, "proc/self/limits", "Limit                     Soft Limit           Hard Limit           Units\nMax locked memory         unlimited            unlimited            bytes");
    put(root, "sys/devices/system/node/node0/cpulist", "0-3");
    put(root, "sys/module/kvm/parameters/halt_poll_ns", "200000");
}

fn doctor(root: &Path, control: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(common::daemon_bin())
        .args(["doctor", "--json", "--root"])
        .arg(root)
        .arg("--control")
        .arg(control)
        .output()
        .unwrap();
    serde_json::from_str::<serde_json::Value>(&stdout_of(&out)).unwrap().as_array().unwrap().clone()
}

/// The finding of `check` (about `subject`).
fn find<'a>(
    findings: &'a [serde_json::Value],
    check: &str,
    subject: &str,
) -> &'a serde_json::Value {
    findings
        .iter()
        .find(|f| f["check"] == check && f["subject"] == subject)
        .unwrap_or_else(|| panic!("no {check} finding for {subject}: {findings:#?}"))
}

#[test]
fn doctor_finds_nothing_on_a_host_that_follows_the_advice() {
    let dir = tmpdir();
    let root = dir.path().join("root");
    healthy_host(&root);
    let findings = doctor(&root, Path::new("/nonexistent.sock"));
    let checks: Vec<(&str, &str)> = findings
        .iter()
        .map(|f| (f["check"].as_str().unwrap(), f["severity"].as_str().unwrap()))
        .collect();
    assert_eq!(
        checks,
        [
            ("daemon", "note"),
            ("cpu-governor", "ok"),
            ("cpu-idle", "ok"),
            ("kernel", "ok"),
            ("io-uring", "ok"),
            ("huge-pages", "ok"),
            ("transparent-huge-pages", "ok"),
            ("aio-max-nr", "ok"),
            ("memlock", "ok"),
            ("kvm-halt-poll", "ok"),
            ("guest-halt-poll", "ok"),
        ]
    );
}

/// One host finding per case: a healthy host with one file changed.
#[test]
fn doctor_reports_each_departure_of_the_host_with_its_fix() {
    struct Case {
        change: &'static [(&'static str, &'static str)],
        check: &'static str,
        severity: &'static str,
        found: &'static str,
        fix: &'static str,
    }
    let cases = [
        Case {
            change: &[("sys/devices/system/cpu/cpu2/cpufreq/scaling_governor", "powersave"), ("sys/devices/system/cpu/cpu3/cpufreq/scaling_governor", "powersave")],
            check: "cpu-governor",
            severity: "warning",
            found: "CPUs 2-3 run the powersave governor",
            fix: "tuned-adm profile virtual-host (or: cpupower frequency-set -g performance)",
        },
        Case {
            change: &[("sys/devices/system/cpu/cpu1/cpuidle/state2/name", "C6"), ("sys/devices/system/cpu/cpu1/cpuidle/state2/latency", "133"), ("sys/devices/system/cpu/cpu1/cpuidle/state2/disable", "0")],
            check: "cpu-idle",
            severity: "warning",
            found: "CPUs 1 may enter C6 (wake-up 133 µs)",
            fix: "tuned-adm profile virtual-host (or: cpupower idle-set -D 50, which disables the states slower than 50 µs)",
        },
        Case {
            change: &[("proc/sys/kernel/osrelease", "4.19.0-27-amd64")],
            check: "kernel",
            severity: "warning",
            found: "kernel 4.19.0-27-amd64",
            fix: "boot a kernel 5.10 or newer (Debian 11 and later ship one)",
        },
        Case {
            change: &[("proc/sys/kernel/io_uring_disabled", "2")],
            check: "io-uring",
            severity: "critical",
            found: "io_uring is disabled (kernel.io_uring_disabled = 2)",
            fix: "sysctl -w kernel.io_uring_disabled=0 (and in /etc/sysctl.d/), or serve with aio=native (block devices) or aio=threads",
        },
        Case {
            change: &[("proc/sys/kernel/io_uring_disabled", "1")],
            check: "io-uring",
            severity: "warning",
            found: "io_uring is limited to one group (kernel.io_uring_disabled = 1)",
            fix: "run blkplane in the group of kernel.io_uring_group, or sysctl -w kernel.io_uring_disabled=0",
        },
        Case {
            change: &[("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "0"), ("sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "0")],
            check: "huge-pages",
            severity: "warning",
            found: "no 2 MiB huge pages are reserved",
            fix: "sysctl -w vm.nr_hugepages=N, N = the guests' memory / 2 MiB (and in /etc/sysctl.d/); blkplane vm-config then puts guests on them",
        },
        Case {
            change: &[("sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "0")],
            check: "huge-pages",
            severity: "note",
            found: "all 512 2 MiB huge pages are in use",
            fix: "raise vm.nr_hugepages by the new VM's memory / 2 MiB",
        },
        Case {
            change: &[("sys/kernel/mm/transparent_hugepage/enabled", "always madvise [never]")],
            check: "transparent-huge-pages",
            severity: "note",
            found: "transparent huge pages are off (never)",
            fix: "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (QEMU asks for them with madvise)",
        },
        Case {
            change: &[("proc/sys/fs/aio-max-nr", "65536"), ("proc/sys/fs/aio-nr", "60000")],
            check: "aio-max-nr",
            severity: "warning",
            found: "60000 of fs.aio-max-nr 65536 Linux AIO events in use, 5536 left",
            fix: "sysctl -w fs.aio-max-nr=1048576 (and in /etc/sysctl.d/)",
        },
        Case {
            change: &[("proc/sys/kernel/osrelease", "5.10.0-28-amd64"), ("proc/self/limits", "Max locked memory         65536                65536                bytes")],
            check: "memlock",
            severity: "warning",
            found: "this shell's (no daemon asked) locked-memory limit is 64 KiB",
            fix: "LimitMEMLOCK=infinity in the unit (contrib/blkplane.service has it), or ulimit -l unlimited",
        },
        Case {
            change: &[("sys/module/kvm/parameters/halt_poll_ns", "0")],
            check: "kvm-halt-poll",
            severity: "note",
            found: "KVM halt polling is off (halt_poll_ns = 0)",
            fix: "echo 200000 > /sys/module/kvm/parameters/halt_poll_ns (the kernel's default; options kvm halt_poll_ns=200000 in /etc/modprobe.d/ keeps it)",
        },
        Case {
            change: &[("sys/module/haltpoll/parameters/guest_halt_poll_ns", "0")],
            check: "guest-halt-poll",
            severity: "note",
            found: "this host is a VM whose idle CPUs halt at once (guest_halt_poll_ns = 0)",
            fix: "echo 200000 > /sys/module/haltpoll/parameters/guest_halt_poll_ns (haltpoll.guest_halt_poll_ns=200000 on the kernel command line keeps it)",
        },
    ];
    for case in cases {
        let dir = tmpdir();
        let root = dir.path().join("root");
        healthy_host(&root);
        for (file, text) in case.change {
            put(&root, file, text);
        }
        let findings = doctor(&root, Path::new("/nonexistent.sock"));
        let f = find(&findings, case.check, "host");
        assert_eq!(f["severity"], case.severity, "{f}");
        assert_eq!(f["found"], case.found, "{f}");
        assert_eq!(f["fix"], case.fix, "{f}");
        assert!(!f["why"].as_str().unwrap().is_empty());
        // Most important first.
        let order: Vec<&str> = findings.iter().map(|f| f["severity"].as_str().unwrap()).collect();
        let rank =
            |s: &str| ["critical", "warning", "note", "ok"].iter().position(|x| *x == s).unwrap();
        assert!(order.windows(2).all(|w| rank(w[0]) <= rank(w[1])), "{order:?}");
        // Everything else stays fine.
        let others = findings.iter().filter(|f| f["check"] != case.check && f["check"] != "daemon");
        for other in others {
            if case.check == "memlock" && other["check"] == "kernel" {
                continue;
            }
            assert_eq!(other["severity"], "ok", "{} changed {}", case.check, other);
        }
    }
}

/// The export and I/O thread checks, against a running daemon whose host facts (the image's
/// device, NUMA nodes, the threads' scheduler statistics) come from a fake tree.
#[test]
fn doctor_reports_what_the_exports_and_io_threads_do_against_the_advice() {
    use std::os::unix::fs::MetadataExt;
    let dir = common::disk_dir();
    let root = dir.path().join("root");
    healthy_host(&root);
    let image = dir.path().join("vm.raw");
    common::make_image(&image, 4 << 20, 1);
    let dev = std::fs::metadata(&image).unwrap().dev();
    // The image's file system is on "vdz": bfq, 16 requests, a volatile cache, node 1.
    put(&root, "sys/block/vdz/queue/scheduler", "[bfq] mq-deadline none");
    put(&root, "sys/block/vdz/queue/rotational", "0");
    put(&root, "sys/block/vdz/queue/nr_requests", "16");
    put(&root, "sys/block/vdz/queue/write_cache", "write back");
    put(&root, "sys/block/vdz/device/numa_node", "1");
    std::fs::create_dir_all(root.join("sys/dev/block")).unwrap();
    let link = root.join(format!("sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev)));
    std::os::unix::fs::symlink("../../block/vdz", link).unwrap();
    put(&root, "sys/devices/system/node/node0/cpulist", "0-1");
    put(&root, "sys/devices/system/node/node1/cpulist", "2-3");
    let (ctl, sock) = (dir.path().join("ctl.sock"), dir.path().join("vm.sock"));
    let slow_sock = dir.path().join("slow.sock");
    let _daemon = Daemon::start_with(
        dir.path(),
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--pool-threads".into(),
            "1".into(),
            "--iothread".into(),
            "id=io0,cpus=0".into(),
            "--iothread".into(),
            "id=spin,poll=always".into(),
            "--export".into(),
            format!(
                "id=vm,socket={},image={},aio=native,cache=unsafe,iothread=io0",
                sock.display(),
                image.display()
            ),
            "--export".into(),
            format!(
                "id=slow,socket={},engine=null,size=1M,iothread=dedicated,poll=never",
                slow_sock.display()
            ),
        ],
        &[ctl.clone(), sock, slow_sock.clone()],
    );
    // A client on the dedicated export: its queue's own thread is listed (slow/q0).
    let mut slow_client = common::Client::connect(&slow_sock, 1);
    assert_eq!(slow_client.read_at(0, 0, 4096, 0).unwrap(), vec![0u8; 4096]);
    // The threads' scheduler statistics: io0 and slow/q0 waited a quarter of their runnable
    // time.
    let threads: serde_json::Value = {
        let out = common::ctl(&ctl, &["list-iothreads"]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for t in threads.as_array().unwrap() {
        let tid = t["tid"].as_u64().unwrap();
        assert!(tid > 0, "{t}");
        let congested = t["id"] == "io0" || t["id"] == "slow/q0";
        let wait = if congested { "300000000" } else { "1000" };
        put(&root, &format!("proc/{tid}/schedstat"), &format!("900000000 {wait} 10"));
        put(
            &root,
            &format!("proc/{tid}/limits"),
            "Max locked memory         unlimited            unlimited            bytes",
        );
    }
    let findings = doctor(&root, &ctl);
    let summary: Vec<(&str, &str, &str)> = findings
        .iter()
        .filter(|f| f["severity"] != "ok")
        .map(|f| {
            (
                f["severity"].as_str().unwrap(),
                f["check"].as_str().unwrap(),
                f["subject"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("critical", "device-write-cache", "export vm"),
            ("warning", "congestion", "iothread io0"),
            ("warning", "congestion", "iothread slow/q0"),
            ("warning", "polling", "iothread spin"),
            ("warning", "export-cache", "export vm"),
            ("warning", "export-aio", "export vm"),
            ("warning", "device-scheduler", "export vm"),
            ("warning", "device-numa", "export vm"),
            ("note", "device-queue-depth", "export vm"),
            ("note", "polling", "export slow"),
        ]
    );
    let f = find(&findings, "polling", "iothread spin");
    assert_eq!(f["found"], "poll=always on CPUs it shares with everything else (not pinned)");
    assert_eq!(f["fix"], "blkplane ctl set-polling iothread=spin mode=adaptive (and poll=adaptive, the default, in its configuration), or pin it to CPUs of its own (cpus=LIST) that no vCPU uses");
    let f = find(&findings, "polling", "export slow");
    assert_eq!(f["found"], "poll=never");
    assert_eq!(f["fix"], "blkplane ctl set-polling id=slow mode=adaptive (and poll=adaptive, the default, in its configuration)");
    // No work yet: adaptive threads have not chosen, and say so.
    assert_eq!(
        find(&findings, "polling", "iothread io0")["found"],
        "poll=adaptive (no decision yet: no work seen)"
    );
    let f = find(&findings, "device-numa", "export vm");
    assert_eq!(
        f["found"],
        "vdz is on NUMA node 1 (CPUs 2-3); the export's I/O threads run on CPUs 0"
    );
    assert_eq!(f["fix"], "pin the export's I/O threads to node 1's CPUs: --iothread id=io-node1,cpus=2-3 and iothread=io-node1");
    let f = find(&findings, "congestion", "iothread io0");
    assert_eq!(f["found"], "waited for a CPU 25.0 % of its runnable time (0.300 s waiting, 0.900 s on a CPU since it started)");
    assert_eq!(find(&findings, "congestion", "iothread pool.0")["severity"], "ok");
    // A dedicated thread's fix is its export's key; its polling is the export's finding
    // alone (set-polling takes the export's id, not the thread's).
    assert_eq!(
        find(&findings, "congestion", "iothread slow/q0")["fix"],
        "pin the export's threads to CPUs the vCPUs do not use (its cpus=LIST key; blkplane vm-config pins the VMs around them), or run fewer vCPUs on this host"
    );
    assert!(!findings
        .iter()
        .any(|f| f["subject"] == "iothread slow/q0" && f["check"] == "polling"));
    drop(slow_client);
    assert_eq!(
        find(&findings, "device-scheduler", "export vm")["fix"],
        "echo none > /sys/block/vdz/queue/scheduler (a udev rule keeps it across reboots)"
    );
    assert_eq!(
        find(&findings, "device-queue-depth", "export vm")["fix"],
        "echo 256 > /sys/block/vdz/queue/nr_requests"
    );
    assert_eq!(
        find(&findings, "export-aio", "export vm")["fix"],
        "serve export vm with aio=io_uring (the default) or aio=threads"
    );
    assert_eq!(
        find(&findings, "memlock", "host")["found"],
        "the daemon's locked-memory limit is unlimited"
    );
}

/// Once on this machine, as it is: every finding says what it found, and every problem why
/// and how to fix it.
#[test]
fn doctor_runs_on_this_machine() {
    let dir = tmpdir();
    let (ctl, sock) = (dir.path().join("ctl.sock"), dir.path().join("vm.sock"));
    let _daemon = Daemon::start_with(
        dir.path(),
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--export".into(),
            format!("id=vm,socket={},engine=null,size=1G", sock.display()),
        ],
        &[ctl.clone(), sock],
    );
    let findings = doctor(Path::new("/"), &ctl);
    assert!(findings.iter().any(|f| f["check"] == "kernel"));
    assert!(findings.iter().any(|f| f["check"] == "congestion"), "the pool threads: {findings:#?}");
    assert!(findings.iter().any(|f| f["subject"] == "export vm"));
    for f in &findings {
        assert!(!f["found"].as_str().unwrap().is_empty(), "{f}");
        if f["severity"] != "ok" {
            assert!(
                !f["why"].as_str().unwrap().is_empty() && !f["fix"].as_str().unwrap().is_empty(),
                "{f}"
            );
        }
    }
    // The text form says the same, problems first.
    let out = Command::new(common::daemon_bin())
        .args(["doctor", "--control"])
        .arg(&ctl)
        .output()
        .unwrap();
    let text = stdout_of(&out);
    assert!(text.starts_with("blkplane doctor: "), "{text}");
    assert!(text.contains("\nfine:\n  "), "{text}");
}

/// On a host with several NUMA nodes, guest memory goes on the node of the image's device,
/// in each VMM's words; the libvirt domain still validates.
#[test]
fn vm_config_puts_guest_memory_on_the_devices_node() {
    use std::os::unix::fs::MetadataExt;
    let dir = common::disk_dir();
    let root = dir.path().join("root");
    healthy_host(&root);
    put(&root, "sys/devices/system/node/node0/cpulist", "0-1");
    put(&root, "sys/devices/system/node/node1/cpulist", "2-3");
    let image = dir.path().join("vm.raw");
    common::make_image(&image, 1 << 20, 1);
    let dev = std::fs::metadata(&image).unwrap().dev();
    put(&root, "sys/block/vdz/device/numa_node", "1");
    std::fs::create_dir_all(root.join("sys/dev/block")).unwrap();
    let link = root.join(format!("sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev)));
    std::os::unix::fs::symlink("../../block/vdz", link).unwrap();
    let spec = format!("id=vm,socket=/run/blkplane/vm.sock,image={}", image.display());
    let run = |vmm: &str| {
        stdout_of(&vm_config(&[
            "--for",
            vmm,
            "--memory",
            "1G",
            "--root",
            root.to_str().unwrap(),
            "--export",
            &spec,
        ]))
    };
    let qemu = run("qemu");
    assert!(
        qemu.contains("size=1G,share=on,hugetlb=on,hugetlbsize=2M,host-nodes=1,policy=bind"),
        "{qemu}"
    );
    assert!(qemu.contains("# memory: bound to NUMA node 1, where the image's device is"), "{qemu}");
    let xml = run("libvirt");
    assert!(
        xml.contains("<numatune>\n    <memory mode='strict' nodeset='1'/>\n  </numatune>"),
        "{xml}"
    );
    let file = dir.path().join("domain.xml");
    std::fs::write(&file, &xml).unwrap();
    let check = Command::new("virt-xml-validate").arg(&file).arg("domain").output().unwrap();
    assert!(check.status.success(), "{xml}\n{}", String::from_utf8_lossy(&check.stderr));
    let words = common::shell_words(&run("cloud-hypervisor"));
    let at = |flag: &str| words[words.iter().position(|w| w == flag).unwrap() + 1].clone();
    assert_eq!(at("--memory"), "size=0");
    assert_eq!(
        at("--memory-zone"),
        "id=blkplane-mem,size=1G,shared=on,hugepages=on,hugepage_size=2M,host_numa_node=1"
    );
    for (k, _) in ch_pairs(&at("--memory-zone")) {
        assert!(CH_MEMORY_ZONE_KEYS.contains(&k.as_str()), "{k}");
    }
    // One node: nothing is bound.
    std::fs::remove_dir_all(root.join("sys/devices/system/node/node1")).unwrap();
    assert!(!run("qemu").contains("host-nodes"));
}

/// A thread with work has chosen how to wait after its trials, and says so, with the figures
/// it chose by, in `list-iothreads`, the metrics and `doctor`.
#[test]
fn adaptive_polling_shows_what_it_chose_and_why() {
    let dir = tmpdir();
    let (ctl, sock) = (dir.path().join("ctl.sock"), dir.path().join("vm.sock"));
    let image = dir.path().join("vm.raw");
    common::make_image(&image, 4 << 20, 5);
    let addr = format!("127.0.0.1:{}", common::free_port());
    let _daemon = Daemon::start_with(
        dir.path(),
        &[
            "--control".into(),
            ctl.display().to_string(),
            "--metrics".into(),
            addr.clone(),
            "--pool-threads".into(),
            "1".into(),
            "--export".into(),
            format!("id=vm,socket={},image={}", sock.display(), image.display()),
        ],
        &[ctl.clone(), sock.clone()],
    );
    let pool_thread = || {
        let out = common::ctl(&ctl, &["list-iothreads"]);
        let threads: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        threads.as_array().unwrap().iter().find(|t| t["id"] == "pool.0").unwrap().clone()
    };
    assert_eq!(pool_thread()["chosen"], serde_json::Value::Null, "no work, no choice");
    // I/O without pause until the thread has been through its three trials (30 ms) with
    // work in each (a pause in the client would leave a trial without work).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = common::background_io(sock.clone(), stop.clone());
    let mut thread = pool_thread();
    let twenty_s = std::time::Duration::from_secs(20);
    common::wait_until("a choice made with work in every trial", twenty_s, || {
        thread = pool_thread();
        let measured = |w: &str| !thread["trials_us"][w].is_null();
        !thread["chosen"].is_null()
            && ["poll", "poll-requests", "sleep"].iter().all(|w| measured(w))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, failed) = io.join().unwrap();
    assert_eq!(failed, 0, "{n} requests");
    let chosen = thread["chosen"].as_str().unwrap();
    assert!(["poll", "poll-requests", "sleep"].contains(&chosen), "{thread}");
    assert!(thread["choices"][chosen].as_u64().unwrap() >= 1, "{thread}");
    for way in ["poll", "poll-requests", "sleep"] {
        let (wall, cpu) = (&thread["trials_us"][way]["wall"], &thread["trials_us"][way]["cpu"]);
        let (wall, cpu) = (wall.as_f64().unwrap(), cpu.as_f64().unwrap());
        // One thread cannot use more CPU than the time that passed.
        assert!(wall > 0.0 && cpu > 0.0 && cpu <= wall * 1.01, "{way}: {thread}");
    }
    let (_, body) = common::http_get(&addr, "/metrics", "");
    let body = String::from_utf8(body).unwrap();
    let line =
        format!("blkplane_iothread_poll_choices_total{{iothread=\"pool.0\",way=\"{chosen}\"}} ");
    let count: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in the metrics"))
        .parse()
        .unwrap();
    assert!(count >= 1);
    let findings = doctor(Path::new("/"), &ctl);
    let found =
        find(&findings, "polling", "iothread pool.0")["found"].as_str().unwrap().to_string();
    assert!(found.starts_with("poll=adaptive "), "{found}");
    assert!(found.contains("per request in its trials: poll "), "{found}");
    assert!(found.contains(", poll-requests ") && found.contains(", sleep "), "{found}");
}
