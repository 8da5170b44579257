//! Smoke test of `blkplane bench`: a tiny run in which every target must produce numbers. No
//! performance assertions: timings on shared machines are noisy (BENCHMARKS.md has figures).

mod common;

use std::process::Command;

use common::{tmpdir, BIN};

fn have_qsd() -> bool {
    Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `blkplane bench ARGS --json DIR/bench.json`, which must succeed: its stdout, its
/// stderr and the JSON report.
fn bench_json(dir: &std::path::Path, args: &[&str]) -> (String, String, serde_json::Value) {
    let json = dir.join("bench.json");
    let out = Command::new(BIN).arg("bench").args(args).arg("--json").arg(&json).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "bench {args:?} failed:\n{stdout}\n{stderr}");
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (stdout, stderr, report)
}

#[test]
fn every_target_produces_numbers() {
    let dir = tmpdir();
    let json = dir.path().join("bench.json");
    let svg = dir.path().join("bench.svg");
    let out = Command::new(BIN)
        .args(["bench", "--size", "64M", "--runtime", "0.3", "--warmup", "0.05", "--idle", "0.5"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    let mut targets = vec!["host", "blkplane", "blkplane-null"];
    if have_qsd() {
        targets.extend(["qsd", "qsd-null"]);
    } else {
        assert!(stdout.contains("not found: the qsd targets are skipped"), "{stdout}");
    }
    let workloads = ["randread-4k-qd1", "randwrite-4k-qd1", "randread-4k-qd32", "seqread-128k-qd8"];
    for t in &targets {
        for w in workloads {
            for mode in ["block", "poll"] {
                let r = results
                    .iter()
                    .find(|r| r["target"] == *t && r["workload"] == w && r["mode"] == mode)
                    .unwrap_or_else(|| panic!("no result for {t} {w} {mode}"));
                assert!(r["ios"].as_u64().unwrap() > 0, "{t} {w} {mode}: no I/O");
                assert_eq!(r["errors"].as_u64().unwrap(), 0, "{t} {w} {mode}: errors");
                assert!(r["iops"].as_f64().unwrap() > 0.0);
                assert!(r["p50_us"].as_f64().unwrap() > 0.0);
                assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap());
                if *t != "host" {
                    assert!(
                        r["daemon_cpu_us_per_io"].as_f64().is_some(),
                        "{t}: no daemon CPU figure"
                    );
                }
                // blkplane's own statistics split the client's time into layers.
                if t.starts_with("blkplane") {
                    let l = &r["layers"];
                    let (client, daemon) =
                        (l["client_us"].as_f64().unwrap(), l["daemon_us"].as_f64().unwrap());
                    // The daemon's window holds the client's requests only: its part of
                    // each is inside the client's time.
                    assert!(daemon > 0.0 && client > daemon * 0.99, "{t} {w} {mode}: {l}");
                    assert!((l["outside_us"].as_f64().unwrap() - (client - daemon)).abs() < 1e-6);
                    assert!(l["notify_us"].as_f64().unwrap() > 0.0, "{t} {w} {mode}: {l}");
                } else {
                    assert!(r.get("layers").is_none(), "{t}: layers without blkplane statistics");
                }
            }
        }
    }
    assert_eq!(results.len(), targets.len() * workloads.len() * 2);
    let idle = report["idle"].as_array().unwrap();
    assert!(idle.iter().any(|i| i["target"] == "blkplane" && i["cpu_percent"].as_f64().is_some()));
    // The table and the verdicts are printed; the plot is an SVG.
    assert!(stdout.contains("IOPS/ref"), "{stdout}");
    assert!(stdout.contains("Where the client's time goes"), "{stdout}");
    assert!(stdout.contains("randread-4k-qd1 poll, blkplane:"), "{stdout}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("blkplane-null"));
    // A title saying where it ran, a panel per workload and mode, values on the bars, the
    // null backends apart; and it renders.
    assert!(plot.contains(&format!("blkplane bench, {}", report["date"].as_str().unwrap())));
    assert!(plot.contains(&format!("kernel {}", report["machine"]["kernel"].as_str().unwrap())));
    assert_eq!(plot.matches("randread-4k-qd32 · poll").count(), if have_qsd() { 4 } else { 3 });
    assert!(plot.contains("Null backends, IOPS"));
    let png = dir.path().join("bench.png");
    let rendered = Command::new("rsvg-convert").arg("-o").arg(&png).arg(&svg).output();
    let rendered = rendered.expect("rsvg-convert (Debian's librsvg2-bin)");
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let png_bytes = std::fs::read(&png).unwrap();
    assert_eq!(&png_bytes[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png_bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png_bytes[20..24].try_into().unwrap());
    assert!(width >= 800 && height > 1000, "{width}x{height}");
    std::fs::remove_file(&png).unwrap();
    // Everything it created is gone: only our own files remain in the directory.
    let mut left: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["bench.json", "bench.svg"]);
}

#[test]
fn bad_input_fails_cleanly() {
    let dir = tmpdir();
    // An image smaller than the span.
    let small = dir.path().join("small.img");
    std::fs::write(&small, vec![1u8; 1 << 20]).unwrap();
    let out =
        Command::new(BIN).args(["bench", "--size", "64M", "--image"]).arg(&small).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is 1048576 bytes, smaller than the workload span --size 67108864"),
        "{err}"
    );

    // A "qemu-storage-daemon" that exits at once: a clear error, and nothing left behind.
    let out = Command::new(BIN)
        .args([
            "bench",
            "--size",
            "16M",
            "--runtime",
            "0.1",
            "--targets",
            "qsd,blkplane",
            "--qsd",
            "/bin/true",
        ])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("qsd exited (exit status: 0) before its socket appeared"), "{err}");
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["small.img"], "files left behind");

    // Unknown names.
    let out = Command::new(BIN).args(["bench", "--targets", "nvme"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).args(["bench", "--workloads", "randread-1m"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).args(["bench", "--cpus", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Without --dir the image is on tmpfs; the run is made again on a disk (/var/tmp here, ext4)
/// without the null backends, and --repeat gives medians with their ranges.
#[test]
fn a_default_run_also_measures_a_disk_and_repeats_give_ranges() {
    let dir = tmpdir();
    let run = |extra: &[&str]| {
        let mut args = vec!["--size", "16M", "--runtime", "0.2", "--warmup", "0.05", "--idle", "0"];
        args.extend(["--workloads", "randread-4k-qd1", "--modes", "poll"]);
        args.extend(["--targets", "blkplane,blkplane-null"]);
        args.extend(extra);
        let (stdout, _, report) = bench_json(dir.path(), &args);
        (stdout, report)
    };
    let (stdout, report) = run(&["--repeat", "2"]);
    assert_eq!(report["image_fs"], "tmpfs");
    assert!(stdout.contains("(tmpfs: the software's overhead, not a disk's)"), "{stdout}");
    let disk = &report["disk"];
    assert_eq!(disk["image_fs"], "ext4", "{report}");
    assert!(disk["image"].as_str().unwrap().contains("/var/tmp"));
    // The disk run has no null backends: they touch no disk.
    let targets: Vec<&str> =
        disk["results"].as_array().unwrap().iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["blkplane"]);
    assert!(stdout.contains("The same on a disk:"), "{stdout}");
    for r in report["results"].as_array().unwrap().iter().chain(disk["results"].as_array().unwrap())
    {
        let spread = &r["spread"];
        assert_eq!(spread["runs"], 2, "{r}");
        let (lo, hi, mid) = (
            spread["iops_min"].as_f64().unwrap(),
            spread["iops_max"].as_f64().unwrap(),
            r["iops"].as_f64().unwrap(),
        );
        assert!(lo <= mid && mid <= hi, "{r}");
    }
    // --disk-dir none: the tmpfs run only.
    let (_, report) = run(&["--disk-dir", "none"]);
    assert!(report.get("disk").is_none(), "{report}");
}

/// `--backend nbd` and `--backend rbd`: every target that applies gives numbers through the
/// network backend (qemu-storage-daemon and blkplane as NBD or RBD clients; fio's rbd engine
/// as the host row for RBD), and the report says what it left out and why.
#[test]
fn network_backends_produce_numbers() {
    // Debian's qemu-storage-daemon has its rbd driver only with qemu-block-extra.
    let qsd_rbd = !String::from_utf8_lossy(
        &Command::new("qemu-storage-daemon")
            .args(["--blockdev", "driver=rbd,node-name=p,pool=p,image=i,conf=/dev/null"])
            .output()
            .unwrap()
            .stderr,
    )
    .contains("Unknown driver 'rbd'");
    let rbd_targets: &[&str] =
        if qsd_rbd { &["host", "qsd", "blkplane"] } else { &["host", "blkplane"] };
    for (backend, targets, want) in [
        ("nbd", "host,qsd,blkplane,blkplane-null", &["qsd", "blkplane"][..]),
        ("rbd", "host,qsd,blkplane", rbd_targets),
    ] {
        let dir = tmpdir();
        let json = dir.path().join("bench.json");
        let out = Command::new(BIN)
            .args(["bench", "--backend", backend, "--targets", targets, "--size", "32M"])
            .args(["--runtime", "0.3", "--warmup", "0.05", "--idle", "0"])
            .args(["--workloads", "randread-4k-qd1,randwrite-4k-qd1", "--modes", "block"])
            .arg("--ceph-conf")
            .arg(common::ceph::ceph_conf())
            .arg("--dir")
            .arg(dir.path())
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "bench --backend {backend}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let results = report["results"].as_array().unwrap();
        let ran: std::collections::BTreeSet<&str> =
            results.iter().map(|r| r["target"].as_str().unwrap()).collect();
        assert_eq!(ran, want.iter().copied().collect(), "{backend}");
        for r in results {
            assert!(r["ios"].as_u64().unwrap() > 0, "{backend} {r}");
            assert_eq!(r["errors"].as_u64().unwrap(), 0, "{backend} {r}");
        }
        let image = report["image"].as_str().unwrap();
        match backend {
            "nbd" => {
                assert!(image.starts_with("behind qemu-nbd"), "{image}");
                assert!(stdout.contains("--backend nbd: no host, blkplane-null"), "{stdout}");
            }
            _ => {
                assert!(image.starts_with("RBD rbd/blkplane-bench-"), "{image}");
                assert!(stdout.contains("host = fio --ioengine=rbd"), "{stdout}");
                let skipped =
                    "has no rbd driver (Debian: qemu-block-extra): the qsd targets are skipped";
                assert_eq!(stdout.contains(skipped), !qsd_rbd, "{stdout}");
            }
        }
    }
    // The bench's RBD image is gone afterwards.
    assert!(!common::ceph::rbd(&["ls", "rbd"]).contains("blkplane-bench-"));
}

/// `--tenants` with `--repeat`: every cell runs once a round, and the row is the median run
/// with the ranges of the aggregate IOPS, the fairness and the median tenant's p50, in the
/// JSON and the table; against qsd, a verdict gives the IOPS ratio of the medians and of each
/// round side by side, and both fairness figures.
#[test]
fn tenants_repeat_gives_medians_with_their_ranges() {
    let dir = tmpdir();
    let targets = if have_qsd() { "blkplane,qsd" } else { "blkplane" };
    let mut args = vec!["--tenants", "2", "--repeat", "2", "--runtime", "0.3", "--warmup", "0.1"];
    args.extend(["--targets", targets, "--size", "16M", "--idle", "0"]);
    args.extend(["--workloads", "randread-4k-qd1", "--modes", "block"]);
    args.extend(["--dir", dir.path().to_str().unwrap()]);
    let (stdout, stderr, report) = bench_json(dir.path(), &args);
    // Each cell ran once a round, every target in a round before the next round.
    let rounds: Vec<&str> = stderr.lines().filter(|l| l.contains(" x2")).collect();
    assert_eq!(rounds.len(), 2 * targets.split(',').count(), "{stderr}");
    assert!(
        rounds[0].ends_with("(round 1 of 2)")
            && rounds[rounds.len() - 1].ends_with("(round 2 of 2)"),
        "{stderr}"
    );
    assert_eq!(report["tenants"], 2);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), targets.split(',').count(), "{report}");
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    for r in results {
        let (sp, t) = (&r["spread"], &r["tenants"]);
        assert_eq!(sp["runs"], 2, "{r}");
        assert_eq!(t["each"].as_array().unwrap().len(), 2, "{r}");
        // Two runs: the median is their mean, the range their lowest and highest.
        let by_round: Vec<f64> = sp["iops_by_round"].as_array().unwrap().iter().map(f).collect();
        assert_eq!(by_round.len(), 2, "{r}");
        let (lo, hi) = (by_round[0].min(by_round[1]), by_round[0].max(by_round[1]));
        assert_eq!((f(&sp["iops_min"]), f(&sp["iops_max"])), (lo, hi), "{r}");
        assert!(lo > 0.0 && (f(&r["iops"]) - (lo + hi) / 2.0).abs() < 1e-6 * hi, "{r}");
        let fairness = f(&t["fairness"]);
        assert!(f(&sp["fairness_min"]) <= fairness && fairness <= f(&sp["fairness_max"]), "{r}");
        assert!(f(&sp["fairness_min"]) > 0.0 && f(&sp["fairness_max"]) <= 1.0, "{r}");
        let p50 = f(&r["p50_us"]);
        assert!(f(&sp["p50_min_us"]) <= p50 && p50 <= f(&sp["p50_max_us"]), "{r}");
        // The table shows the median and the ranges.
        let row = stdout
            .lines()
            .find(|l| {
                l.starts_with("randread-4k-qd1 x2")
                    && l.contains(&format!(" {} ", r["target"].as_str().unwrap()))
            })
            .unwrap_or_else(|| panic!("no row for {r}:\n{stdout}"));
        let ranges = format!(
            "fairness {fairness:.2}  2 runs: IOPS {lo:.0}–{hi:.0}, p50 {:.1}–{:.1}, fairness {:.2}–{:.2}",
            f(&sp["p50_min_us"]),
            f(&sp["p50_max_us"]),
            f(&sp["fairness_min"]),
            f(&sp["fairness_max"])
        );
        assert!(row.ends_with(&ranges), "{row}\n{ranges}");
    }
    if have_qsd() {
        let find = |t: &str| results.iter().find(|r| r["target"] == t).unwrap();
        let (b, q) = (find("blkplane"), find("qsd"));
        let round =
            |i: usize| f(&b["spread"]["iops_by_round"][i]) / f(&q["spread"]["iops_by_round"][i]);
        let verdict = format!(
            "randread-4k-qd1 x2 block, blkplane against qsd: aggregate IOPS {:.2}x (medians of 2 runs, {:.0} against {:.0}; round by round {:.2}x, {:.2}x); fairness {:.2} ({:.2}–{:.2}) against {:.2} ({:.2}–{:.2})",
            f(&b["iops"]) / f(&q["iops"]),
            f(&b["iops"]),
            f(&q["iops"]),
            round(0),
            round(1),
            f(&b["tenants"]["fairness"]),
            f(&b["spread"]["fairness_min"]),
            f(&b["spread"]["fairness_max"]),
            f(&q["tenants"]["fairness"]),
            f(&q["spread"]["fairness_min"]),
            f(&q["spread"]["fairness_max"]),
        );
        assert!(stdout.lines().any(|l| l == verdict), "{verdict}\n{stdout}");
    }
    // The images are gone.
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["bench.json"]);
}

/// `--tenants` with the host target: each tenant's client runs on its own image through
/// io_uring, no daemon, as the ceiling a daemon is measured against; its row has the tenants'
/// figures and no daemon CPU, `--idle` leaves it out (no daemon), and the verdict gives
/// blkplane's aggregate IOPS as a fraction of the host's.
#[test]
fn tenants_run_the_host_as_the_ceiling() {
    let dir = tmpdir();
    let mut args = vec!["--tenants", "2", "--targets", "host,blkplane", "--repeat", "1"];
    args.extend(["--runtime", "0.3", "--warmup", "0.1", "--size", "16M", "--idle", "0.3"]);
    args.extend(["--workloads", "randread-4k-qd1", "--modes", "block"]);
    args.extend(["--dir", dir.path().to_str().unwrap()]);
    let (stdout, stderr, report) = bench_json(dir.path(), &args);
    assert!(!stdout.contains("skipped"), "{stdout}");
    assert!(stderr.contains("host randread-4k-qd1 block x2"), "{stderr}");
    let results = report["results"].as_array().unwrap();
    let targets: Vec<&str> = results.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["host", "blkplane"], "{report}");
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    let (h, b) = (&results[0], &results[1]);
    assert_eq!(h["workload"], "randread-4k-qd1 x2", "{h}");
    let each = h["tenants"]["each"].as_array().unwrap();
    assert_eq!((h["tenants"]["tenants"].as_u64(), each.len()), (Some(2), 2), "{h}");
    for t in each {
        assert!(t["ios"].as_u64().unwrap() > 0 && t["errors"] == 0, "{h}");
    }
    assert_eq!(
        h["ios"].as_u64().unwrap(),
        each.iter().map(|t| t["ios"].as_u64().unwrap()).sum::<u64>()
    );
    assert!(h["daemon_cpu_us_per_io"].is_null(), "{h}");
    assert!(f(&b["daemon_cpu_us_per_io"]) > 0.0, "{b}");
    let fairness = f(&h["tenants"]["fairness"]);
    assert!(fairness > 0.0 && fairness <= 1.0, "{h}");
    // The median tenant's p50 and the worst p99, from the tenants' own figures.
    let p99 = each.iter().map(|t| f(&t["p99_us"])).fold(0.0, f64::max);
    assert_eq!(f(&h["p99_us"]), p99, "{h}");
    // --idle measures the daemon only.
    let idle: Vec<&str> =
        report["idle"].as_array().unwrap().iter().map(|i| i["target"].as_str().unwrap()).collect();
    assert_eq!(idle, ["blkplane"], "{report}");
    // No qsd ran: blkplane's tenants are set against the host's.
    let verdict = format!(
        "randread-4k-qd1 x2 block, blkplane against host: aggregate IOPS {:.2}x ({:.0} against {:.0}); fairness {:.2} against {:.2}",
        f(&b["iops"]) / f(&h["iops"]),
        f(&b["iops"]),
        f(&h["iops"]),
        f(&b["tenants"]["fairness"]),
        fairness,
    );
    assert!(stdout.lines().any(|l| l == verdict), "{verdict}\n{stdout}");
    let first = format!(
        "randread-4k-qd1 x2 block, blkplane: no qemu-storage-daemon figure to compare with; {:.2}x the host's p50, {:.0}% of its IOPS",
        f(&b["p50_us"]) / f(&h["p50_us"]),
        100.0 * f(&b["iops"]) / f(&h["iops"]),
    );
    assert!(stdout.lines().any(|l| l == first), "{first}\n{stdout}");
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["bench.json"]);
}
