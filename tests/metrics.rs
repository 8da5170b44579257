//! Metrics for a host of VMs (issue 30, part 4): a daemon of 100 exports of 4 queues, scraped
//! by `promtool` and by a real Prometheus server, with idle connections held open.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, http_get, tmpdir, Client, Daemon, KillOnDrop};

const EXPORTS: usize = 100;
const QUEUES: usize = 4;
/// The series of one export in the default scrape (README, "Metrics"): info, capacity and
/// connected (3), requests and bytes by 7 kinds (14), errors by 7 kinds and 2 statuses (14),
/// 10 per-export figures, and read, write and flush latency of 10 buckets, +Inf, sum and
/// count (39).
const SERIES_PER_EXPORT: usize = 80;
const READS: u64 = 400;
const WRITES: u64 = 40;

/// 100 null exports of 4 queues on one daemon, `--metrics` at `addr`.
fn hundred_exports(dir: &Path, addr: &str, extra: &[&str]) -> (Daemon, Vec<PathBuf>) {
    let mut args: Vec<String> = vec!["--metrics".into(), addr.into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let socks: Vec<PathBuf> = (0..EXPORTS).map(|i| dir.join(format!("e-{i}.sock"))).collect();
    for (i, sock) in socks.iter().enumerate() {
        args.push("--export".into());
        args.push(format!(
            "id=e-{i},socket={},engine=null,size=64M,queues={QUEUES}",
            sock.display()
        ));
    }
    (Daemon::start_with(dir, &args, &socks), socks)
}

/// Reads spread over the four queues, writes and one flush per queue, on `sock`.
fn drive(sock: &Path) {
    let mut c = Client::connect(sock, QUEUES as i32);
    for i in 0..READS {
        c.read_at(i as usize % QUEUES, i * 4096, 4096, 0).unwrap();
    }
    for i in 0..WRITES {
        assert_eq!(c.write_at(i as usize % QUEUES, i * 4096, &[7u8; 4096], 0), 0);
    }
    for q in 0..QUEUES {
        assert_eq!(c.flush(q), 0);
    }
}

/// The sample lines (not comments) of `body` that carry `export="id"`.
fn series_of(body: &str, id: &str) -> Vec<String> {
    let label = format!("export=\"{id}\"");
    body.lines().filter(|l| !l.starts_with('#') && l.contains(&label)).map(String::from).collect()
}

/// The value of the one sample line that starts with `prefix`.
fn sample(body: &str, prefix: &str) -> f64 {
    let lines: Vec<&str> = body.lines().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(lines.len(), 1, "{prefix}: {lines:?}");
    lines[0].rsplit_once(' ').unwrap().1.parse().unwrap()
}

/// `histogram_quantile(q, ...)` as Prometheus computes it from cumulative `(le, count)`
/// buckets ending in +Inf: linear inside the bucket the rank falls in.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let total = buckets.last().unwrap().1;
    let rank = q * total;
    let i = buckets.iter().position(|&(_, c)| c >= rank).unwrap();
    if buckets[i].0.is_infinite() {
        return buckets[i - 1].0;
    }
    let (start, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    let (end, count) = buckets[i];
    start + (end - start) * (rank - below) / (count - below)
}

/// The read latency buckets of export `id` in a default scrape.
fn read_buckets(body: &str, id: &str) -> Vec<(f64, f64)> {
    let prefix =
        format!("blkplane_request_latency_seconds_bucket{{export=\"{id}\",kind=\"read\",le=\"");
    body.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (le, count) = rest.split_once("\"} ").unwrap();
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
            (le, count.parse().unwrap())
        })
        .collect()
}

fn promtool_check(body: &str, dir: &Path) {
    let file = dir.join("scrape.txt");
    std::fs::write(&file, body).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .expect("promtool (Debian package prometheus)");
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");
}

fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server scraping `target` every second, its storage in `dir`.
fn prometheus(dir: &Path, target: &str) -> (KillOnDrop, String) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: blkplane\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package prometheus)");
    (KillOnDrop(child), web)
}

/// Asks Prometheus `query` until it answers one sample (within 60 s): its value.
fn query_until_answered(web: &str, query: &str, dir: &Path) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let path = format!("/api/v1/query?query={}", percent_encoded(query));
    let mut last = String::new();
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(web).is_ok() {
            let (_, body) = http_get(web, &path, "");
            last = String::from_utf8_lossy(&body).to_string();
            let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
            if let Some(r) = v["data"]["result"].as_array().and_then(|r| r.first()) {
                return r["value"][1].as_str().unwrap().parse().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    panic!("Prometheus never answered {query}: {last}\n{log}");
}

#[test]
fn a_hundred_exports_scrape_small_and_prometheus_reads_them() {
    let dir = tmpdir();
    let d = dir.path();
    let addr = format!("127.0.0.1:{}", free_port());
    let (_daemon, socks) = hundred_exports(d, &addr, &[]);
    drive(&socks[0]);
    // The I/O thread hands its histograms over when it goes idle.
    std::thread::sleep(Duration::from_millis(500));
    let (head, body) = http_get(&addr, "/metrics", "");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let body = String::from_utf8(body).unwrap();
    for id in ["e-0", "e-1", "e-99"] {
        let series = series_of(&body, id);
        assert_eq!(series.len(), SERIES_PER_EXPORT, "{id}:\n{}", series.join("\n"));
    }
    assert!(!body.contains("queue=\""), "no queue label by default");
    assert!(!body.contains("blkplane_stage_latency_seconds"), "no stages by default");
    let latency = "blkplane_request_latency_seconds";
    for (kind, count) in [("read", READS), ("write", WRITES), ("flush", QUEUES as u64)] {
        let count_of = format!("{latency}_count{{export=\"e-0\",kind=\"{kind}\"}}");
        assert_eq!(sample(&body, &count_of), count as f64, "{kind}: the four queues summed");
    }
    assert_eq!(sample(&body, "blkplane_requests_total{export=\"e-0\",kind=\"read\"}"), 400.0);
    assert_eq!(
        sample(&body, "blkplane_export_info{export=\"e-7\","),
        1.0,
        "one info series per export"
    );
    assert!(body.contains(
        "blkplane_export_info{export=\"e-7\",image=\"null\",cache=\"none\",aio=\"\",iothread=\"pool\",limits=\"none\"} 1"
    ), "{}", series_of(&body, "e-7")[0]);
    let threads =
        body.lines().filter(|l| l.starts_with("blkplane_iothread_cpu_seconds_total{")).count();
    assert!(threads >= 1, "I/O thread CPU seconds");
    assert!(body.contains("blkplane_iothread_runqueue_wait_seconds_total{iothread="));
    promtool_check(&body, d);

    // Gzip when asked, the same text; a query string is ignored.
    let (zhead, zipped) = http_get(&addr, "/metrics", "Accept-Encoding: gzip\r\n");
    assert!(zhead.contains("Content-Encoding: gzip"), "{zhead}");
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&zipped[..]).read_to_string(&mut unzipped).unwrap();
    assert_eq!(series_of(&unzipped, "e-5").len(), SERIES_PER_EXPORT);
    println!("scrape of {EXPORTS} exports: {} bytes, {} gzipped", body.len(), zipped.len());
    let (qhead, _) = http_get(&addr, "/metrics?x", "");
    assert!(qhead.starts_with("HTTP/1.0 200"), "{qhead}");

    // A real Prometheus scrapes it and computes a read latency quantile of one export: the
    // figure this scrape's buckets give (no read since).
    let (_prometheus, web) = prometheus(d, &addr);
    let query = "histogram_quantile(0.9, blkplane_request_latency_seconds_bucket{export=\"e-0\",kind=\"read\"})";
    let answered = query_until_answered(&web, query, d);
    let expected = quantile(0.9, &read_buckets(&body, "e-0"));
    assert!(expected > 0.0 && expected < 1.0, "{expected}");
    assert!(
        (answered - expected).abs() <= expected * 1e-9,
        "Prometheus {answered}, ours {expected}"
    );
}

#[test]
fn idle_connections_do_not_keep_a_scrape_out() {
    let dir = tmpdir();
    let d = dir.path();
    let addr = format!("127.0.0.1:{}", free_port());
    let (_daemon, _socks) = hundred_exports(d, &addr, &[]);
    let idle: Vec<_> = (0..8).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let (head, body) = http_get(&addr, "/metrics", "");
    let took = start.elapsed();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(took < Duration::from_secs(1), "the scrape took {took:?} behind 8 idle connections");
    assert_eq!(series_of(&String::from_utf8(body).unwrap(), "e-3").len(), SERIES_PER_EXPORT);
    drop(idle);
}

#[test]
fn queue_detail_adds_the_queue_label_and_the_stages() {
    let dir = tmpdir();
    let d = dir.path();
    let addr = format!("127.0.0.1:{}", free_port());
    let (_daemon, socks) = hundred_exports(d, &addr, &["--metrics-detail", "queue"]);
    drive(&socks[0]);
    std::thread::sleep(Duration::from_millis(500));
    let (_, body) = http_get(&addr, "/metrics", "");
    let body = String::from_utf8(body).unwrap();
    let latency = "blkplane_request_latency_seconds";
    for q in 0..QUEUES as u64 {
        let count_of = format!("{latency}_count{{export=\"e-0\",queue=\"{q}\",kind=\"read\"}}");
        assert_eq!(sample(&body, &count_of), (READS / QUEUES as u64) as f64, "queue {q}");
    }
    // Per queue: the 3 export-wide series stay per export; 38 figures, 4 kinds of latency
    // and 6 stages of 28 series each, for each started queue (e-0's), or for queue 0's zeros
    // where none started (e-1's): offered queues nobody started have no series.
    assert_eq!(series_of(&body, "e-0").len(), 3 + QUEUES * (38 + 10 * 28));
    assert_eq!(series_of(&body, "e-1").len(), 3 + (38 + 10 * 28));
    promtool_check(&body, d);
}

#[test]
fn a_reload_changes_the_metrics_detail() {
    let dir = tmpdir();
    let d = dir.path();
    let addr = format!("127.0.0.1:{}", free_port());
    let (control, sock, cfg) = (d.join("ctl.sock"), d.join("r.sock"), d.join("blkplane.toml"));
    let file = |detail: &str| {
        format!(
            "control = \"{}\"\nmetrics = \"{addr}\"\n{detail}\n[[export]]\nid = \"r\"\nsocket = \"{}\"\nengine = \"null\"\nsize = \"64M\"\nqueues = 2\n",
            control.display(),
            sock.display()
        )
    };
    std::fs::write(&cfg, file("")).unwrap();
    let args = ["--config".to_string(), cfg.display().to_string()];
    let _daemon = Daemon::start_with(d, &args, std::slice::from_ref(&sock));
    let labels_of = || {
        let body = String::from_utf8(http_get(&addr, "/metrics", "").1).unwrap();
        let line = "blkplane_requests_in_flight{";
        body.lines().filter(|l| l.starts_with(line)).map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(labels_of(), ["blkplane_requests_in_flight{export=\"r\"} 0"]);
    std::fs::write(&cfg, file("metrics-detail = \"queue\"")).unwrap();
    let out = common::ctl(&control, &["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // No frontend started a queue: queue 0's zeros stand for the export.
    assert_eq!(labels_of(), ["blkplane_requests_in_flight{export=\"r\",queue=\"0\"} 0"]);
}

/// A mirror job in the scrape: its bytes done and total, and its state as one series per
/// state, while it runs (speed-limited), once ready, and once cancelled; promtool passes the
/// scrape with a job in it.
#[test]
fn mirror_jobs_are_in_the_scrape() {
    let dir = tmpdir();
    let d = dir.path();
    let addr = format!("127.0.0.1:{}", free_port());
    let (control, sock, image, target) =
        (d.join("ctl.sock"), d.join("m.sock"), d.join("m.raw"), d.join("target.raw"));
    let size: u64 = 64 << 20;
    for path in [&image, &target] {
        std::fs::File::create(path).unwrap().set_len(size).unwrap();
    }
    std::fs::write(&image, vec![0x5Au8; 16 << 20]).unwrap();
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(size).unwrap();
    let args = [
        "--metrics".to_string(),
        addr.clone(),
        "--control".to_string(),
        control.display().to_string(),
        "--export".to_string(),
        format!("id=m,socket={},image={}", sock.display(), image.display()),
    ];
    let _daemon = Daemon::start_with(d, &args, &[sock.clone(), control.clone()]);
    let scrape = || String::from_utf8(http_get(&addr, "/metrics", "").1).unwrap();
    let labels = format!("export=\"m\",type=\"mirror\",target=\"{}\"", target.display());
    let state_of = |body: &str| -> Vec<String> {
        ["running", "ready", "completed", "failed", "cancelled"]
            .iter()
            .filter(|s| {
                sample(body, &format!("blkplane_job_state{{{labels},state=\"{s}\"}}")) == 1.0
            })
            .map(|s| s.to_string())
            .collect()
    };
    let body = scrape();
    assert!(!body.contains("blkplane_job_state{"), "no job, no job series");
    let ctl_ok = |args: &[&str]| {
        let out = common::ctl(&control, args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // 4 MiB/s: the job runs for seconds after its first chunk.
    ctl_ok(&["mirror", "id=m", &format!("target={}", target.display()), "speed=4M"]);
    let done_of = |body: &str| sample(body, &format!("blkplane_job_done_bytes{{{labels}}}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let body = scrape();
        if done_of(&body) > 0.0 {
            break body;
        }
        assert!(Instant::now() < deadline, "no progress: {body}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(state_of(&body), ["running"], "{body}");
    let done = done_of(&body);
    assert!(done > 0.0 && done < size as f64, "running: {done} of {size}");
    assert_eq!(sample(&body, &format!("blkplane_job_total_bytes{{{labels}}}")), size as f64);
    assert_eq!(sample(&body, &format!("blkplane_job_recopied_bytes{{{labels}}}")), 0.0);
    promtool_check(&body, d);
    ctl_ok(&["job-cancel", "id=m"]);
    let body = scrape();
    assert_eq!(state_of(&body), ["cancelled"], "{body}");
    // Without a limit the job reaches ready: everything done.
    ctl_ok(&["mirror", "id=m", &format!("target={}", target.display())]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let body = scrape();
        if state_of(&body) == ["ready"] {
            break body;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(done_of(&body), size as f64);
    promtool_check(&body, d);
    ctl_ok(&["job-cancel", "id=m"]);
}
