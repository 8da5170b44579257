//! The control socket, `blkplane ctl`, `blkplane stat`, the Prometheus endpoint and the
//! config file, against a running daemon while a libblkio client does I/O.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use common::{background_io, make_image, pattern, tmpdir, Client, Daemon, BIN};

const EIO: i32 = -libc::EIO;

/// A raw line-oriented connection to the control socket.
struct Ctl {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Ctl {
    fn connect(path: &Path) -> Ctl {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Ctl { writer: s.try_clone().unwrap(), reader: BufReader::new(s) }
    }

    fn raw(&mut self, line: &str) -> Value {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
    }

    fn call(&mut self, command: &str, args: Value) -> Value {
        self.raw(&json!({"id": 7, "command": command, "args": args}).to_string())
    }

    fn ok(&mut self, command: &str, args: Value) -> Value {
        let r = self.call(command, args.clone());
        assert_eq!(r["id"], 7);
        r.get("result").cloned().unwrap_or_else(|| panic!("{command} {args}: {r}"))
    }

    fn err(&mut self, command: &str, args: Value) -> (String, String) {
        let r = self.call(command, args.clone());
        let e = r.get("error").unwrap_or_else(|| panic!("{command} {args} should fail: {r}"));
        (e["code"].as_str().unwrap().to_string(), e["message"].as_str().unwrap().to_string())
    }
}

#[test]
fn every_command_with_io_running() {
    let dir = tmpdir();
    let d = dir.path();
    let image = d.join("a.raw");
    make_image(&image, 16 << 20, 1);
    let (ctl_path, sock_a) = (d.join("ctl.sock"), d.join("a.sock"));
    let daemon = Daemon::start_with(
        d,
        &[
            "--control".into(),
            ctl_path.display().to_string(),
            "--export".into(),
            format!("id=a,socket={},image={}", sock_a.display(), image.display()),
        ],
        &[ctl_path.clone(), sock_a.clone()],
    );
    let mode = std::fs::metadata(&ctl_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    let stop = Arc::new(AtomicBool::new(false));
    let io = background_io(sock_a.clone(), Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(500));
    let mut ctl = Ctl::connect(&ctl_path);

    // list-exports
    let list = ctl.ok("list-exports", json!({}));
    assert_eq!(list.as_array().unwrap().len(), 1);
    let a = &list[0];
    assert_eq!(a["id"], "a");
    assert_eq!(a["size_bytes"], 16 << 20);
    assert_eq!(a["client_connected"], true);
    assert_eq!(a["poll"], "adaptive");

    // add-export: a null export, then a client on it.
    let sock_b = d.join("b.sock");
    let b = ctl.ok("add-export", json!({"id": "b", "socket": sock_b.to_str().unwrap(), "engine": "null", "size": "64M", "queues": 2}));
    assert_eq!(b["id"], "b");
    assert_eq!(b["queues"], 2);
    let mut cb = Client::connect(&sock_b, 2);
    assert_eq!(cb.capacity(), 64 << 20);
    assert!(cb.read_at(1, 4096, 4096, 0).unwrap() == vec![0u8; 4096]);
    let (code, msg) = ctl.err("add-export", json!({"id": "b", "socket": d.join("c.sock").to_str().unwrap(), "engine": "null", "size": "1M"}));
    assert_eq!((code.as_str(), msg.as_str()), ("exists", "an export with id 'b' exists already"));
    let (code, msg) = ctl.err("add-export", json!({"socket": d.join("c.sock").to_str().unwrap(), "image": d.join("nope.raw").to_str().unwrap()}));
    assert_eq!(code, "open-failed");
    assert!(msg.ends_with("nope.raw does not exist"), "{msg}");
    assert!(
        !d.join("c.sock").exists() && !d.join("nope.raw").exists(),
        "a failed add left something behind"
    );
    let (code, msg) = ctl.err("add-export", json!({"socket": "/x", "queues": "many"}));
    assert_eq!((code.as_str(), msg.as_str()), ("invalid-argument", "queues=many: not a number"));

    // query-stats: the background I/O shows in the counters and the stage histograms.
    std::thread::sleep(Duration::from_millis(600));
    let stats = ctl.ok("query-stats", json!({"id": "a"}));
    let q = &stats[0]["queues"][0];
    assert!(q["requests"]["read"].as_u64().unwrap() > 50, "{q}");
    assert!(q["requests"]["write"].as_u64().unwrap() > 50, "{q}");
    assert_eq!(q["bytes"]["read"].as_u64().unwrap() % 4096, 0);
    let stages: Vec<&str> =
        q["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["parse", "submit", "backend", "publish", "notify", "total"]);
    let total = &q["stages"][5];
    assert!(total["count"].as_u64().unwrap() > 0, "no sampled requests: {q}");
    // Every request's latency (merged from the I/O thread a few times a second: the exact
    // count is checked at rest in prometheus_metrics_parse).
    assert!(q["latency"]["count"].as_u64().unwrap() > 100, "{q}");
    assert_eq!(q["latency"]["buckets"].as_array().unwrap().len(), 25);
    assert!(total["p50_us"].as_f64().unwrap() > 0.0);
    assert!((total["share"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(ctl.ok("query-stats", json!({})).as_array().unwrap().len(), 2);

    // set-polling: an export on the shared pool has no polling of its own; its threads do.
    let (code, msg) = ctl.err("set-polling", json!({"id": "a", "mode": "never"}));
    assert_eq!(code, "invalid-argument");
    assert_eq!(
        msg,
        "export 'a' runs on shared I/O threads (iothread=pool); their polling is set with set-polling iothread=NAME"
    );
    let changed =
        ctl.ok("set-polling", json!({"iothread": "pool.0", "mode": "never", "max-us": 10}));
    assert_eq!(changed["iothreads"].as_array().unwrap().len(), 1, "{changed}");
    assert_eq!(changed["iothreads"][0]["poll"], "never");
    assert_eq!(changed["iothreads"][0]["poll_max_us"], 10);
    assert_eq!(ctl.ok("list-iothreads", json!({}))[0]["poll"], "never");
    assert_eq!(
        ctl.err("set-polling", json!({"iothread": "pool.0", "mode": "sometimes"})).0,
        "invalid-argument"
    );
    assert_eq!(ctl.err("set-polling", json!({"iothread": "pool.0"})).0, "invalid-argument");
    assert_eq!(ctl.err("set-polling", json!({"iothread": "zz", "mode": "always"})).0, "not-found");
    assert_eq!(ctl.err("set-polling", json!({"id": "zz", "mode": "always"})).0, "not-found");
    // An export with threads of its own: set-polling by export id changes them.
    let sock_d = d.join("d.sock");
    ctl.ok("add-export", json!({"id": "d", "socket": sock_d.to_str().unwrap(), "engine": "null", "size": "1M", "iothread": "dedicated"}));
    let changed = ctl.ok("set-polling", json!({"id": "d", "mode": "never", "max-us": 10}));
    assert_eq!(changed["exports"][0]["poll"], "never");
    assert_eq!(changed["exports"][0]["poll_max_us"], 10);
    assert_eq!(changed["iothreads"].as_array().unwrap().len(), 0);
    let all = ctl.ok("set-polling", json!({"mode": "adaptive", "max-us": 64}));
    assert_eq!(all["exports"].as_array().unwrap().len(), 1, "only d has threads of its own");
    assert!(all["iothreads"].as_array().unwrap().iter().all(|t| t["poll"] == "adaptive"));
    ctl.ok("remove-export", json!({"id": "d", "force": true}));

    // Named I/O threads: add, place an export on it, refuse removal while used, remove.
    let t = ctl.ok("add-iothread", json!({"id": "t1", "poll-max-us": 32}));
    assert_eq!(
        (t["id"].as_str(), t["kind"].as_str(), t["poll_max_us"].as_u64()),
        (Some("t1"), Some("named"), Some(32))
    );
    assert_eq!(ctl.err("add-iothread", json!({"id": "t1"})).0, "exists");
    assert_eq!(
        ctl.err("add-iothread", json!({"id": "pool.3"})),
        (
            "invalid-argument".to_string(),
            "'pool.3' is reserved (dedicated, pool, pool.N)".to_string()
        )
    );
    assert_eq!(
        ctl.err("add-iothread", json!({"id": "t2", "colour": "red"})).1,
        "unknown key 'colour' (keys: id, cpus, poll, poll-max-us)"
    );
    let sock_e = d.join("e.sock");
    let (code, msg) = ctl.err("add-export", json!({"id": "e", "socket": sock_e.to_str().unwrap(), "engine": "null", "size": "1M", "iothread": "t1:nope"}));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("not-found", "iothread=t1:nope: no I/O thread 'nope'")
    );
    assert!(!sock_e.exists());
    ctl.ok("add-export", json!({"id": "e", "socket": sock_e.to_str().unwrap(), "engine": "null", "size": "1M", "iothread": "t1"}));
    assert_eq!(
        ctl.ok("list-exports", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == "e")
            .unwrap()["iothread"],
        "t1"
    );
    {
        let mut ce = Client::connect(&sock_e, 1);
        assert_eq!(ce.read_at(0, 0, 4096, 0).unwrap(), vec![0u8; 4096]);
        let threads = ctl.ok("list-iothreads", json!({}));
        let t1 = threads.as_array().unwrap().iter().find(|t| t["id"] == "t1").unwrap();
        assert_eq!(t1["queues"], 1, "{threads}");
    }
    assert_eq!(ctl.err("remove-iothread", json!({"id": "t1"})).0, "busy");
    // (force: the client above may not have been seen leaving yet.)
    ctl.ok("remove-export", json!({"id": "e", "force": true}));
    ctl.ok("remove-iothread", json!({"id": "t1"}));
    assert_eq!(ctl.err("remove-iothread", json!({"id": "t1"})).0, "not-found");
    assert!(ctl
        .ok("list-iothreads", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["kind"] == "pool"));

    // The background client was doing I/O through all of the above without a failure.
    stop.store(true, Ordering::Relaxed);
    let (n, failed) = io.join().unwrap();
    assert!(n > 100, "background I/O made {n} requests");
    assert_eq!(failed, 0, "background I/O failures");

    // resize: the file grows, a connected libblkio client sees the new capacity. (A
    // vhost-user socket serves one frontend at a time, so this client comes after the first.)
    let mut ca = Client::connect(&sock_a, 1);
    let r = ctl.ok("resize", json!({"id": "a", "size": "32M"}));
    assert_eq!(r["size_bytes"], 32 << 20);
    assert_eq!(ca.capacity(), 32 << 20);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 32 << 20);
    assert!(
        ca.read_at(0, (32 << 20) - 4096, 4096, 0).unwrap() == vec![0u8; 4096],
        "the new space reads zeroes"
    );
    assert_eq!(ca.read_at(0, 32 << 20, 4096, 0), Err(EIO), "the new end is the end");
    for (args, code) in [
        (json!({"id": "a", "size": -1}), "invalid-argument"),
        (json!({"id": "a", "size": 1000, "shrink": "on"}), "invalid-size"),
        (json!({"id": "a", "size": 0, "shrink": "on"}), "invalid-size"),
        (json!({"id": "a", "size": "lots"}), "invalid-argument"),
        (json!({"id": "a", "size": true}), "invalid-argument"),
        (json!({"id": "a"}), "invalid-argument"),
        (json!({"id": "nope", "size": 4096}), "not-found"),
        (json!({"id": "b", "size": "2E"}), "invalid-argument"),
    ] {
        assert_eq!(ctl.err("resize", args.clone()).0, code, "resize {args}");
    }
    assert_eq!(ca.capacity(), 32 << 20, "failed resizes changed nothing");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 32 << 20);

    // Bad requests: the connection stays open and answers the next one.
    let r = ctl.raw("{not json");
    assert_eq!(r["error"]["code"], "invalid-json");
    assert_eq!(r["id"], Value::Null);
    let r = ctl.raw(r#"{"id": 3, "command": "frobnicate"}"#);
    assert_eq!(r["id"], 3);
    assert_eq!(r["error"]["code"], "unknown-command");
    assert!(r["error"]["message"].as_str().unwrap().starts_with("unknown command 'frobnicate'"));
    assert_eq!(ctl.raw(r#"{"id": 4}"#)["error"]["code"], "invalid-request");
    assert_eq!(ctl.raw(r#"[1, 2]"#)["error"]["code"], "invalid-request");
    assert_eq!(
        ctl.raw(r#"{"id": 5, "command": "list-exports", "args": 3}"#)["error"]["code"],
        "invalid-request"
    );
    // A number where text is meant is its digits: no export has the id "5".
    assert_eq!(ctl.err("remove-export", json!({"id": 5})).0, "not-found");
    assert_eq!(ctl.err("remove-export", json!({"id": true})).0, "invalid-argument");
    assert_eq!(
        ctl.err("remove-export", json!({"id": "a", "force": "maybe"})).0,
        "invalid-argument"
    );
    assert_eq!(ctl.err("list-exports", json!({"verbose": true})).0, "invalid-argument");
    assert_eq!(ctl.ok("list-exports", json!({})).as_array().unwrap().len(), 2);

    // remove-export: refused while a client is connected, done with force.
    let (code, _) = ctl.err("remove-export", json!({"id": "b"}));
    assert_eq!(code, "busy");
    assert!(sock_b.exists());
    assert_eq!(ctl.ok("remove-export", json!({"id": "b", "force": true})), json!({"removed": "b"}));
    assert!(!sock_b.exists(), "the removed export's socket is gone");
    let b_span = format!("export{{export=b socket={}}}", sock_b.display());
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains(&b_span) && l.ends_with("frontend disconnected")),
        "the client was not disconnected:\n{log}"
    );
    drop(cb);
    assert_eq!(ctl.err("remove-export", json!({"id": "b"})).0, "not-found");

    // The export that stayed keeps serving.
    assert!(ca.read_at(0, 0, 4096, 0).is_ok());
}

#[test]
fn ctl_and_stat_commands() {
    let dir = tmpdir();
    let d = dir.path();
    let (ctl_path, sock) = (d.join("ctl.sock"), d.join("n.sock"));
    let _daemon = Daemon::start_with(
        d,
        &[
            "--control".into(),
            ctl_path.display().to_string(),
            "--export".into(),
            format!("id=n,socket={},engine=null,size=1G", sock.display()),
        ],
        &[ctl_path.clone(), sock.clone()],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let io = background_io(sock.clone(), Arc::clone(&stop));
    let out = common::ctl(&ctl_path, &["list-exports"]);
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], "n");
    let out = common::ctl(&ctl_path, &["set-polling", "iothread=pool.0", "max-us=32"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = common::ctl(&ctl_path, &["resize", "id=n", "size=nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(invalid-argument)"));
    let out = common::ctl(&ctl_path, &["bogus"]);
    assert_eq!(out.status.code(), Some(1));
    let out = common::ctl(&ctl_path, &["list-exports", "oops"]);
    assert_eq!(out.status.code(), Some(2));

    let out = Command::new(BIN)
        .args(["stat", "--control"])
        .arg(&ctl_path)
        .args(["--interval", "0.5", "--count", "2"])
        .output()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    io.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches("IOPS").count(), 2, "two views:\n{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("n "))
        .unwrap_or_else(|| panic!("no row for n:\n{text}"));
    let iops: f64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(iops > 10.0, "IOPS {iops} while I/O ran:\n{text}");
    for stage in ["parse", "submit", "backend", "publish", "notify", "total"] {
        assert!(text.contains(&format!("  {stage}")), "no {stage} layer:\n{text}");
    }
    let stat_json = |count: &str| {
        let out = Command::new(BIN)
            .args(["stat", "--json", "--control"])
            .arg(&ctl_path)
            .args(["--interval", "0.5", "--count", count])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect::<Vec<_>>()
    };
    // With I/O running: one JSON object per view, the interval's figures.
    let stop = Arc::new(AtomicBool::new(false));
    let io = background_io(sock.clone(), Arc::clone(&stop));
    let views = stat_json("2");
    assert_eq!(views.len(), 2);
    for v in &views {
        let n = &v["exports"][0];
        assert_eq!(n["id"], "n");
        assert!(n["iops"].as_f64().unwrap() > 10.0, "{v}");
        let l = &n["latency"];
        assert!(l["requests"].as_u64().unwrap() > 0, "{v}");
        assert!(l["p99_us"].as_f64().unwrap() >= l["p50_us"].as_f64().unwrap(), "{v}");
        assert_eq!(n["stages"].as_array().unwrap().len(), 6, "{v}");
        // The pool thread serving the export worked, on a CPU, this interval.
        let busy = v["iothreads"].as_array().unwrap().iter().find(|t| t["queues"] == 1);
        let busy = busy.unwrap_or_else(|| panic!("no I/O thread with the queue: {v}"));
        assert!(busy["cpu_percent"].as_f64().unwrap() > 1.0, "{v}");
        assert!(busy["runqueue_wait_percent"].as_f64().unwrap() >= 0.0, "{v}");
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(io.join().unwrap().1, 0, "failed requests");
    // At rest: an interval without I/O shows none, however busy the export was before
    // (figures since start would still show the earlier latency).
    std::thread::sleep(Duration::from_millis(600));
    let v = &stat_json("1")[0];
    let n = &v["exports"][0];
    assert_eq!(n["iops"].as_f64(), Some(0.0), "{v}");
    assert_eq!(n["latency"]["requests"].as_u64(), Some(0), "{v}");
    assert_eq!(n["latency"]["p99_us"].as_f64(), Some(0.0), "{v}");
}

#[test]
fn prometheus_metrics_parse() {
    let dir = tmpdir();
    let d = dir.path();
    let sock = d.join("m.sock");
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _daemon = Daemon::start_with(
        d,
        &[
            "--metrics".into(),
            addr.clone(),
            "--export".into(),
            format!("id=m-1,socket={},engine=null,size=64M", sock.display()),
        ],
        std::slice::from_ref(&sock),
    );
    let mut c = Client::connect(&sock, 1);
    for i in 0..300 {
        c.read_at(0, i * 4096, 4096, 0).unwrap();
    }
    drop(c);
    // Failures keep their kind: a read past the end (IOERR), a discard with the unmap flag
    // (UNSUPP), from the project's own frontend.
    let mut fe = common::frontend::TestFrontend::connect(&sock, 1, 64, 0);
    let past_end = (64 << 20) / 512;
    assert_eq!(fe.request(0, common::frontend::T_IN, past_end, &[], 512).0.status, 1);
    let mut unmap_discard = vec![0u8; 16];
    unmap_discard[12] = 1;
    assert_eq!(fe.request(0, common::frontend::T_DISCARD, 0, &unmap_discard, 0).0.status, 2);
    // The I/O thread hands its histograms over when it goes idle.
    std::thread::sleep(Duration::from_millis(400));
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"));
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{body}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref v => panic!("{name} is {v:?}"),
        }
    };
    // 300 reads, one failed read, one discard (counted with its kind, failed or not).
    assert_eq!(value("blkplane_requests_total", &[("kind", "read")]), 301.0);
    assert_eq!(value("blkplane_requests_total", &[("kind", "discard")]), 1.0);
    assert_eq!(value("blkplane_errors_total", &[("kind", "read"), ("status", "ioerr")]), 1.0);
    assert_eq!(value("blkplane_errors_total", &[("kind", "discard"), ("status", "unsupp")]), 1.0);
    assert_eq!(value("blkplane_errors_total", &[("kind", "read"), ("status", "unsupp")]), 0.0);
    assert_eq!(value("blkplane_errors_total", &[("kind", "other"), ("status", "ioerr")]), 0.0);
    assert_eq!(value("blkplane_capacity_bytes", &[]), (64u64 << 20) as f64);
    assert_eq!(value("blkplane_requests_in_flight", &[("export", "m-1")]), 0.0);
    assert_eq!(value("blkplane_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(value("process_cpu_seconds_total", &[]) > 0.0);
    assert!(value("process_resident_memory_bytes", &[]) > 1e6);
    assert!(value("process_threads", &[]) >= 3.0);
    let fds = value("process_open_fds", &[]);
    assert!(fds >= 5.0 && fds < value("process_max_fds", &[]), "{fds}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let started = value("process_start_time_seconds", &[]);
    assert!(started > now.as_secs_f64() - 300.0 && started <= now.as_secs_f64() + 1.0);
    // The histograms: cumulative buckets ending in +Inf = _count, and a sum.
    let histogram = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => h.clone(),
                v => panic!("{name} is {v:?}"),
            })
            .unwrap_or_else(|| panic!("no histogram {name}{labels:?}:\n{body}"))
    };
    // By default (metrics-detail=export) the request latency is per export and kind, in
    // the 10 coarse buckets; the sampled stages only with metrics-detail=queue.
    let name = "blkplane_request_latency_seconds";
    let labels = [("export", "m-1"), ("kind", "read")];
    let h = histogram(name, &labels);
    assert_eq!(h.len(), 11, "10 bounds and +Inf");
    assert!(h.windows(2).all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count));
    let inf = h.last().unwrap();
    assert!(inf.less_than.is_infinite());
    assert_eq!(inf.count, value(&format!("{name}_count"), &labels));
    assert_eq!(inf.count, 301.0, "every read, the failed one too");
    let sum = value(&format!("{name}_sum"), &labels);
    assert!(sum > 0.0 && sum < inf.count, "{name}_sum {sum}");
    assert!(!body.contains("kind=\"discard\",le="), "the rare kinds only per queue");
    assert!(!body.contains("blkplane_stage_latency_seconds"), "stages only per queue");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /other HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.0 404"));
}

#[test]
fn config_file_and_check_config() {
    let dir = tmpdir();
    let d = dir.path();
    let image = d.join("disk.raw");
    make_image(&image, 8 << 20, 5);
    let (ctl_path, sock) = (d.join("ctl.sock"), d.join("vm.sock"));
    let cfg = d.join("blkplane.toml");
    std::fs::write(
        &cfg,
        format!(
            "control = \"{}\"\nlog-level = \"debug\"\n\n[[export]]\nid = \"vm\"\nsocket = \"{}\"\nimage = \"{}\"\nqueues = 2\nserial = \"from-toml\"\npoll = \"never\"\n",
            ctl_path.display(),
            sock.display(),
            image.display()
        ),
    )
    .unwrap();
    let out =
        Command::new(BIN).args(["serve", "--check-config", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "configuration OK: 1 export(s)");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "--check-config prints only its verdict");
    assert!(!sock.exists() && !ctl_path.exists(), "--check-config left sockets behind");
    // --metrics and --control are checked as serving would use them.
    let check_with = |extra: &[&str]| {
        Command::new(BIN)
            .args(["serve", "--check-config", "--config"])
            .arg(&cfg)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = check_with(&["--metrics", "9180"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "blkplane: error: metrics=9180: not an ADDRESS:PORT\n"
    );
    let out = check_with(&["--control", "/nonexistent/dir/ctl.sock"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "blkplane: error: control socket /nonexistent/dir/ctl.sock: no directory /nonexistent/dir\n"
    );

    let _daemon = Daemon::start_with(
        d,
        &["--config".into(), cfg.display().to_string()],
        &[ctl_path.clone(), sock.clone()],
    );
    let mut ctl = Ctl::connect(&ctl_path);
    let list = ctl.ok("list-exports", json!({}));
    assert_eq!(list[0]["id"], "vm");
    assert_eq!(list[0]["queues"], 2);
    assert_eq!(list[0]["serial"], "from-toml");
    assert_eq!(list[0]["poll"], "never");
    let mut c = Client::connect(&sock, 2);
    assert!(c.read_at(1, 0, 4096, 0).unwrap() == pattern(5, 0, 4096));

    let bad = d.join("bad.toml");
    std::fs::write(&bad, "[[export]]\nsocket = \"/tmp/x.sock\"\nimage = \"/nonexistent.raw\"\n")
        .unwrap();
    let out =
        Command::new(BIN).args(["serve", "--check-config", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("image /nonexistent.raw does not exist"));
    std::fs::write(&bad, "colour = \"red\"\n").unwrap();
    let out =
        Command::new(BIN).args(["serve", "--check-config", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:1:1: unknown key 'colour'"), "{err}");
}

/// Runtime changes can be kept: `list-exports` gives each export's whole spec as it runs,
/// and `ctl dump-config` prints a config file that starts the same daemon again.
#[test]
fn dump_config_keeps_runtime_changes() {
    let dir = tmpdir();
    let d = dir.path();
    let image = d.join("disk.raw");
    make_image(&image, 8 << 20, 7);
    let ctl_path = d.join("ctl.sock");
    let (sock_a, sock_b, sock_n) = (d.join("a.sock"), d.join("b,1.sock"), d.join("n.sock"));
    let args = [
        "--control".to_string(),
        ctl_path.display().to_string(),
        "--pool-threads".into(),
        "1".into(),
        "--image-lock-wait-ms".into(),
        "700".into(),
        "--export".into(),
        format!(
            "id=a,socket={},image={},queues=2,cache=writeback,discard=ignore,serial=s,,1",
            sock_a.display(),
            image.display()
        ),
    ];
    let mut daemon = Daemon::start_with(d, &args, &[ctl_path.clone(), sock_a.clone()]);
    let mut ctl = Ctl::connect(&ctl_path);
    // Changes at run time: a named thread, exports on it and on threads of their own, a
    // resize, a polling change.
    ctl.ok("add-iothread", json!({"id": "io-1", "poll": "never"}));
    ctl.ok(
        "add-export",
        json!({"id": "b", "socket": sock_b.to_str().unwrap(), "engine": "null", "size": "1M", "iothread": "io-1", "readonly": true}),
    );
    ctl.ok(
        "add-export",
        json!({"id": "n", "socket": sock_n.to_str().unwrap(), "engine": "null", "size": "1M", "iothread": "dedicated"}),
    );
    ctl.ok("resize", json!({"id": "n", "size": "2M"}));
    ctl.ok("set-polling", json!({"id": "n", "mode": "always", "max-us": 10}));
    let before = ctl.ok("list-exports", json!({}));
    let a = &before[0]["spec"];
    assert_eq!(a["image"], image.to_str().unwrap());
    assert_eq!((a["queues"].as_u64(), a["cache"].as_str()), (Some(2), Some("writeback")));
    assert_eq!((a["discard"].as_str(), a["serial"].as_str()), (Some("ignore"), Some("s,1")));
    assert_eq!(a["readonly"], false);
    let n = &before[2]["spec"];
    assert_eq!(
        (n["size"].as_u64(), n["poll"].as_str(), n["poll-max-us"].as_u64()),
        (Some(2 << 20), Some("always"), Some(10))
    );

    let out = common::ctl(&ctl_path, &["dump-config"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[[iothread]]\nid = \"io-1\"\npoll = \"never\""), "{text}");
    assert!(
        text.contains("image-lock-wait-ms = 700\n") && text.contains("pool-threads = 1\n"),
        "{text}"
    );
    let cfg = d.join("dumped.toml");
    std::fs::write(&cfg, &text).unwrap();
    drop(ctl);
    assert!(daemon.stop().success());

    // The dumped file is a valid configuration, and starts the same exports and threads.
    let out =
        Command::new(BIN).args(["serve", "--check-config", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "configuration OK: 3 export(s)\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _again = Daemon::start_with(
        d,
        &["--config".into(), cfg.display().to_string()],
        &[ctl_path.clone(), sock_a, sock_b, sock_n.clone()],
    );
    let mut ctl = Ctl::connect(&ctl_path);
    let after = ctl.ok("list-exports", json!({}));
    let specs = |list: &Value| {
        list.as_array().unwrap().iter().map(|e| e["spec"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(specs(&after), specs(&before));
    let threads = ctl.ok("list-iothreads", json!({}));
    let io1 = threads.as_array().unwrap().iter().find(|t| t["id"] == "io-1").unwrap();
    assert_eq!(io1["poll"], "never");
    // The resized export comes back at its new size.
    let c = Client::connect(&sock_n, 1);
    assert_eq!(c.capacity(), 2 << 20);
}

/// An export's own threads (`iothread=dedicated`) are in `list-iothreads` while its queues
/// run, as `EXPORT/qN` of kind `dedicated`, each the real thread of that name, pinned as
/// `cpus` says, with its CPU time, also in the metrics; they leave the list with their
/// queues, and the shared threads stay as they were.
#[test]
fn list_iothreads_shows_an_exports_dedicated_threads_while_its_queues_run() {
    let dir = tmpdir();
    let d = dir.path();
    let (ctl_path, sock) = (d.join("ctl.sock"), d.join("ded.sock"));
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let daemon = Daemon::start_with(
        d,
        &[
            "--control".into(),
            ctl_path.display().to_string(),
            "--metrics".into(),
            metrics.clone(),
            "--export".into(),
            format!(
                "id=ded,socket={},engine=null,size=8M,queues=2,iothread=dedicated,cpus=0",
                sock.display()
            ),
        ],
        &[ctl_path.clone(), sock.clone()],
    );
    let mut ctl = Ctl::connect(&ctl_path);
    let kinds = |threads: &Value| -> Vec<(String, String)> {
        let all = threads.as_array().unwrap().iter();
        all.map(|t| (t["id"].as_str().unwrap().into(), t["kind"].as_str().unwrap().into()))
            .collect()
    };
    let shared = kinds(&ctl.ok("list-iothreads", json!({})));
    assert!(shared.iter().all(|(_, kind)| kind == "pool"), "{shared:?}");
    {
        let mut c = Client::connect(&sock, 2);
        assert_eq!(c.read_at(1, 0, 4096, 0).unwrap(), vec![0u8; 4096]);
        let threads = ctl.ok("list-iothreads", json!({}));
        let mut expected = shared.clone();
        expected.extend(["ded/q0", "ded/q1"].map(|id| (id.to_string(), "dedicated".to_string())));
        assert_eq!(kinds(&threads), expected);
        for t in threads.as_array().unwrap().iter().filter(|t| t["kind"] == "dedicated") {
            let comm = format!("/proc/{}/task/{}/comm", daemon.pid(), t["tid"]);
            let queue = t["id"].as_str().unwrap().trim_start_matches("ded/");
            assert_eq!(std::fs::read_to_string(&comm).unwrap(), format!("blkplane-{queue}\n"));
            assert_eq!(t["cpus"], "0", "{t}");
            assert_eq!(t["queues"], 1, "{t}");
        }
        let q1 = threads.as_array().unwrap().iter().find(|t| t["id"] == "ded/q1").unwrap();
        assert!(q1["cpu_ns"].as_u64().unwrap() > 0, "the thread that served the read: {q1}");
        let (_, body) = common::http_get(&metrics, "/metrics", "");
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains("blkplane_iothread_queues{iothread=\"ded/q1\"} 1"), "{body}");
    }
    common::wait_until("the dedicated threads leave the list", Duration::from_secs(10), || {
        kinds(&ctl.ok("list-iothreads", json!({}))) == shared
    });
}
