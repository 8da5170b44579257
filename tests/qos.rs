//! Rate limits (issue 18): a libblkio client floods a real daemon and counts what its
//! limits let through, per export, per direction, in bytes, in bursts, for a throttle group
//! of three exports, and across live changes from the control socket; a held queue costs no
//! CPU and shows in query-stats and the metrics.
//!
//! Counts are compared with what the limits allow, computed from the configuration: the
//! average times the time, plus the burst the buckets allow at once (a tenth of a second's
//! worth without `-max`, as in QEMU). The floods run at queue depth 32, far above what the
//! limits let through, so the limit is the only thing that sets the rate.

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use serde_json::Value;

use common::{assert_usage_error, ctl, make_image, pattern, serve_refused, tmpdir, Client, Daemon};

const DEPTH: usize = 32;

/// Keeps `DEPTH` requests of `block` bytes in flight on queue 0 for `secs` seconds, reads
/// or writes (of the buffer as it is), at offsets that walk the first `span` bytes. Returns
/// when each completed, in seconds from the first submission; every one must succeed.
fn flood(c: &mut Client, write: bool, block: usize, span: u64, secs: f64) -> Vec<f64> {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    // One iovec per slot, alive until the end (libblkio may read them at do_io).
    let iovs: Vec<libc::iovec> = (0..DEPTH)
        .map(|i| libc::iovec { iov_base: c.buf_ptr(i * block).cast(), iov_len: block })
        .collect();
    let mut next_offset = 0u64;
    let mut submit = |c: &mut Client, slot: usize| {
        let offset = next_offset % span;
        next_offset += block as u64;
        let iov = &iovs[slot] as *const libc::iovec;
        if write {
            c.queues[0].writev(offset, iov, 1, slot, ReqFlags::empty());
        } else {
            c.queues[0].readv(offset, iov, 1, slot, ReqFlags::empty());
        }
    };
    for slot in 0..DEPTH {
        submit(c, slot);
    }
    let mut outstanding = DEPTH;
    let mut times = Vec::new();
    while outstanding > 0 {
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; DEPTH];
        let mut timeout = Duration::from_secs(10);
        let n = c.queues[0].do_io(&mut done, 1, Some(&mut timeout), None).expect("do_io");
        assert!(n > 0, "no completion within 10 s");
        let at = start.elapsed().as_secs_f64();
        for d in &done[..n] {
            // SAFETY: do_io initialised the first n entries.
            let d = unsafe { d.assume_init_read() };
            assert_eq!(d.ret, 0, "a throttled request must wait, never fail");
            times.push(at);
            if Instant::now() < end {
                submit(c, d.user_data);
            } else {
                outstanding -= 1;
            }
        }
    }
    times
}

/// Completions in `[from, to)` seconds.
fn count(times: &[f64], from: f64, to: f64) -> usize {
    times.iter().filter(|&&t| t >= from && t < to).count()
}

/// `n` is within `pct` percent of `want`.
fn assert_near(what: &str, n: f64, want: f64, pct: f64) {
    let (lo, hi) = (want * (1.0 - pct / 100.0), want * (1.0 + pct / 100.0));
    assert!((lo..=hi).contains(&n), "{what}: {n}, wanted {want} ± {pct}% ({lo:.0}..{hi:.0})");
}

/// A daemon with a control socket and the given exports.
fn daemon(d: &Path, exports: &[String], extra: &[&str]) -> (Daemon, PathBuf) {
    let ctl_path = d.join("ctl.sock");
    let mut args = vec!["--control".to_string(), ctl_path.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut sockets = vec![ctl_path.clone()];
    for e in exports {
        args.push("--export".into());
        args.push(e.clone());
        let sock = e.split(',').find_map(|kv| kv.strip_prefix("socket=")).unwrap();
        sockets.push(PathBuf::from(sock));
    }
    (Daemon::start_with(d, &args, &sockets), ctl_path)
}

/// `blkplane ctl` that must succeed: its JSON.
fn ctl_ok(control: &Path, args: &[&str]) -> Value {
    let out = ctl(control, args);
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `blkplane ctl` that must fail: its message.
fn ctl_err(control: &Path, args: &[&str]) -> String {
    let out = ctl(control, args);
    assert_eq!(out.status.code(), Some(1), "ctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn queue_stats(control: &Path, id: &str) -> Value {
    ctl_ok(control, &["query-stats", &format!("id={id}")])[0]["queues"][0].clone()
}

const NULL_BYTES: u64 = 1 << 30;

fn null_export(d: &Path, id: &str, keys: &str) -> String {
    format!(
        "id={id},socket={},engine=null,size={NULL_BYTES}{keys}",
        d.join(format!("{id}.sock")).display()
    )
}

/// A daemon serving one null export `id` with `keys`, and a client connected to it.
fn serve_null(d: &Path, id: &str, keys: &str) -> (Daemon, PathBuf, Client) {
    let (daemon, control) = daemon(d, &[null_export(d, id, keys)], &[]);
    let client = Client::connect(&d.join(format!("{id}.sock")), 1);
    (daemon, control, client)
}

#[test]
fn iops_total_holds_a_qd32_flood_to_its_rate() {
    let dir = tmpdir();
    let d = dir.path();
    let (_daemon, _, mut c) = serve_null(d, "e", ",iops-total=1000");
    let times = flood(&mut c, false, 4096, NULL_BYTES, 10.0);
    // 1000 per second and a tenth of a second's worth at once: 10 100 in 10 s.
    let n = count(&times, 0.0, 10.0) as f64;
    eprintln!(
        "iops-total=1000 at QD32: {n} in 10 s, {} from 2 s to 10 s",
        count(&times, 2.0, 10.0)
    );
    assert_near("IOPS over 10 s", n / 10.0, 1000.0, 5.0);
    assert_near("completions in 10 s", n, 10_100.0, 5.0);
    // After the burst, the rate itself.
    assert_near("IOPS from 2 s to 10 s", count(&times, 2.0, 10.0) as f64 / 8.0, 1000.0, 5.0);
}

#[test]
fn a_burst_goes_at_its_rate_for_its_capacity() {
    let dir = tmpdir();
    let d = dir.path();
    // 200/s on average; bursts at 1000/s, with a capacity of 1000 × 1 s (QEMU's meaning of
    // -max and -max-length): a tenth of a second of the burst rate at once, then 1000/s
    // until the capacity is spent (at 1.125 s, 800 net per second), then 200/s.
    let keys = ",iops-total=200,iops-total-max=1000,iops-total-max-length=1";
    let (_daemon, _, mut c) = serve_null(d, "b", keys);
    let times = flood(&mut c, false, 4096, NULL_BYTES, 5.0);
    assert_near("completions in the first second", count(&times, 0.0, 1.0) as f64, 1100.0, 5.0);
    assert_near("completions in 5 s", count(&times, 0.0, 5.0) as f64, 2000.0, 5.0);
    assert_near("IOPS from 2 s to 5 s", count(&times, 2.0, 5.0) as f64 / 3.0, 200.0, 5.0);
}

#[test]
fn bps_total_holds_bytes_and_every_write_lands() {
    let dir = tmpdir();
    let d = dir.path();
    let image = d.join("w.img");
    make_image(&image, 64 << 20, 3);
    let sock = d.join("w.sock");
    let spec = format!("id=w,socket={},image={},bps-total=8M", sock.display(), image.display());
    let (mut daemon, _) = daemon(d, &[spec], &[]);
    let mut c = Client::connect(&sock, 1);
    const BLOCK: usize = 64 << 10;
    let data = pattern(77, 0, BLOCK);
    for slot in 0..DEPTH {
        c.buf_slice(slot * BLOCK, BLOCK).copy_from_slice(&data);
    }
    let times = flood(&mut c, true, BLOCK, 64 << 20, 5.0);
    let bytes = count(&times, 0.0, 5.0) as f64 * BLOCK as f64;
    // 8 MiB per second and 0.8 MiB at once.
    assert_near("bytes in 5 s", bytes, 8.0 * 1048576.0 * 5.0 + 838_860.8, 5.0);
    assert_near(
        "bytes per second from 2 s to 5 s",
        count(&times, 2.0, 5.0) as f64 * BLOCK as f64 / 3.0,
        8.0 * 1048576.0,
        5.0,
    );
    drop(c);
    daemon.stop();
    // Every write went to its own block (less than the image was written): each holds it.
    let written = std::fs::read(&image).unwrap();
    for (i, block) in written.chunks(BLOCK).take(times.len()).enumerate() {
        assert!(block == &data[..], "block {i} of {} does not hold its write", times.len());
    }
    assert_eq!(
        &written[times.len() * BLOCK..][..4096],
        &pattern(3, (times.len() * BLOCK) as u64, 4096)[..]
    );
}

#[test]
fn directions_are_limited_apart() {
    let dir = tmpdir();
    let d = dir.path();
    let (_daemon, _, mut c) = serve_null(d, "r", ",iops-read=100");
    let reads = flood(&mut c, false, 4096, NULL_BYTES, 3.0);
    assert_near("reads in 3 s", count(&reads, 0.0, 3.0) as f64, 310.0, 5.0);
    // Writes are not limited: far beyond 100 per second.
    let writes = flood(&mut c, true, 4096, NULL_BYTES, 2.0);
    assert!(count(&writes, 0.0, 2.0) > 2000, "writes were held: {}", writes.len());
}

#[test]
fn a_throttle_group_shares_its_budget() {
    let dir = tmpdir();
    let d = dir.path();
    // The group's limits are given once; the other members name the group.
    let exports = [
        null_export(d, "g0", ",throttle-group=tenant-a,iops-total=900"),
        null_export(d, "g1", ",throttle-group=tenant-a"),
        null_export(d, "g2", ",throttle-group=tenant-a,iops-total=900"),
    ];
    let (_daemon, control) = daemon(d, &exports, &[]);
    let runs: Vec<_> = (0..3)
        .map(|i| {
            let sock = d.join(format!("g{i}.sock"));
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock, 1);
                flood(&mut c, false, 4096, NULL_BYTES, 6.0)
            })
        })
        .collect();
    let each: Vec<usize> = runs.into_iter().map(|r| count(&r.join().unwrap(), 0.0, 6.0)).collect();
    let total: usize = each.iter().sum();
    eprintln!("group of three: {each:?}, {total} in 6 s");
    // The three together: 900 per second and 90 at once (the clients start within a few
    // milliseconds of each other).
    assert_near("the group's completions in 6 s", total as f64, 900.0 * 6.0 + 90.0, 5.0);
    // And they take turns: none far from a third (a queue that grabbed every turn due
    // within its thread's wake-up gave one export half of what the others got).
    for (i, n) in each.iter().enumerate() {
        assert!(*n * 4 >= total, "export g{i} got {n} of {total}: {each:?}");
    }
    // Every member shows the group's limits; another export may not bring its own.
    let list = ctl_ok(&control, &["list-exports"]);
    assert_eq!(list[1]["spec"]["iops-total"], 900);
    assert_eq!(list[1]["spec"]["throttle-group"], "tenant-a");
    let other = format!(
        "id=g3,socket={},engine=null,size=1G,throttle-group=tenant-a,iops-total=1000",
        d.join("g3.sock").display()
    );
    let words: Vec<&str> = other.split(',').collect();
    let mut args = vec!["add-export"];
    args.extend(&words);
    let e = ctl_err(&control, &args);
    assert!(e.contains("throttle-group=tenant-a has limits already (iops-total=900)"), "{e}");
    // The group's limits change for all of them.
    let r = ctl_ok(&control, &["set-throttle", "group=tenant-a", "iops-total=300"]);
    assert_eq!(r["exports"], serde_json::json!(["g0", "g1", "g2"]));
    assert_eq!(r["throttle"]["limits"]["iops-total"], 300);
    let stats = ctl_ok(&control, &["query-stats", "id=g1"]);
    assert_eq!(stats[0]["throttle"]["group"], "tenant-a");
    assert_eq!(stats[0]["throttle"]["limits"]["iops-total"], 300);
}

#[test]
fn a_live_change_takes_effect_within_a_second() {
    let dir = tmpdir();
    let d = dir.path();
    let (_daemon, control) = daemon(d, &[null_export(d, "l", ",iops-total=100")], &[]);
    let sock = d.join("l.sock");
    let run = std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 1);
        flood(&mut c, false, 4096, NULL_BYTES, 6.0)
    });
    std::thread::sleep(Duration::from_millis(2000));
    let started = Instant::now();
    ctl_ok(&control, &["set-throttle", "id=l", "iops-total=2000"]);
    let raised = started.elapsed().as_secs_f64();
    let list = ctl_ok(&control, &["list-exports"]);
    assert_eq!(list[0]["spec"]["iops-total"], 2000);
    std::thread::sleep(Duration::from_millis(2000));
    ctl_ok(&control, &["set-throttle", "id=l"]);
    let list = ctl_ok(&control, &["list-exports"]);
    assert!(list[0]["spec"].get("iops-total").is_none(), "{}", list[0]["spec"]);
    let times = run.join().unwrap();
    // The flood's clock started a moment before ours; find the change on it by the rate.
    assert_near("IOPS from 0.5 s to 1.9 s", count(&times, 0.5, 1.9) as f64 / 1.4, 100.0, 10.0);
    // Raised at ~2 s: within the next second, 2000 per second (and its new burst).
    let at = 2.0 + raised;
    let first_second = count(&times, at, at + 1.0) as f64;
    assert!(first_second >= 1900.0, "{first_second} in the second after raising the limit to 2000");
    assert_near(
        "IOPS in the second after",
        count(&times, at + 1.0, at + 1.9) as f64 / 0.9,
        2000.0,
        5.0,
    );
    // Lifted at ~4 s: no limit (a null export answers tens of thousands per second).
    let lifted = count(&times, 4.5, 5.5) as f64;
    assert!(lifted > 5000.0, "{lifted} per second after lifting the limit");
}

#[test]
fn a_held_queue_sleeps_and_shows_in_the_stats() {
    let dir = tmpdir();
    let d = dir.path();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let (daemon, control) =
        daemon(d, &[null_export(d, "h", ",iops-total=20")], &["--metrics", &addr]);
    let sock = d.join("h.sock");
    let run = std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 1);
        flood(&mut c, false, 4096, NULL_BYTES, 5.0)
    });
    std::thread::sleep(Duration::from_millis(1000));
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid())).unwrap();
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        (f[0] + f[1]) as f64 / 100.0
    };
    let (cpu_before, sleeps_before) =
        (cpu(), queue_stats(&control, "h")["sleeps"].as_u64().unwrap());
    std::thread::sleep(Duration::from_millis(2000));
    let (cpu_after, stats) = (cpu(), queue_stats(&control, "h"));
    // 20 admissions a second and the statistics' merges: a few dozen wake-ups in 2 s, and
    // next to no CPU (a polling or spinning queue would burn a whole CPU).
    let sleeps = stats["sleeps"].as_u64().unwrap() - sleeps_before;
    assert!(sleeps < 150, "{sleeps} sleeps in 2 s");
    assert!(cpu_after - cpu_before < 0.1, "{:.2} s of CPU in 2 s", cpu_after - cpu_before);
    // 32 in flight at the client: one held, the rest in the ring (a few at most answered
    // and not yet sent again).
    let queued = stats["throttle_queued"].as_u64().unwrap();
    assert!((25..=32).contains(&queued), "throttle_queued {queued}");
    assert!(stats["throttled_requests"].as_u64().unwrap() >= 40, "{stats}");
    // Since the limit's burst ran out the queue was held nearly all the time.
    assert!(stats["throttled_ns"].as_u64().unwrap() > 2_000_000_000, "{stats}");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    // Per export by default (its one queue).
    let metric = |name: &str| -> f64 {
        let line = body
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{export=\"h\"}}")))
            .unwrap_or_else(|| panic!("no {name} in {body}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!((25.0..=32.0).contains(&metric("blkplane_throttle_queued_requests")));
    assert!(metric("blkplane_throttled_seconds_total") > 2.0);
    assert!(metric("blkplane_throttled_requests_total") >= 40.0);
    // `blkplane stat`: the queue held a request nearly all the interval.
    let out = std::process::Command::new(common::daemon_bin())
        .args(["stat", "--json", "--count", "1", "--interval", "0.5", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &view["exports"][0];
    assert!(e["throttled_percent"].as_f64().unwrap() > 80.0, "{view}");
    assert!(e["throttle_queued"].as_u64().unwrap() >= 25, "{view}");
    run.join().unwrap();
    // Idle again: nothing waits.
    assert_eq!(queue_stats(&control, "h")["throttle_queued"], 0);
}

#[test]
fn flushes_go_free_and_a_held_request_does_not_hold_up_a_reset() {
    let dir = tmpdir();
    let d = dir.path();
    let (mut daemon, _, mut c) = serve_null(d, "f", ",iops-total=1");
    let sock = d.join("f.sock");
    // The idle bucket lets one read through; flushes cost nothing (1 per second would
    // take 20 s).
    c.read_at(0, 0, 4096, 0).unwrap();
    let t = Instant::now();
    for _ in 0..20 {
        assert_eq!(c.flush(0), 0);
    }
    assert!(t.elapsed() < Duration::from_secs(2), "flushes took {:?}", t.elapsed());
    // Eight reads: one goes a second later, the rest wait. The client goes away meanwhile;
    // the queue stops at once (the held request is let go) and a new client is served.
    let iov = libc::iovec { iov_base: c.buf_ptr(0).cast(), iov_len: 4096 };
    for i in 0..8 {
        c.queues[0].readv(i * 4096, &iov, 1, i as usize, ReqFlags::empty());
    }
    let mut none = [const { MaybeUninit::<Completion>::uninit() }; 1];
    let mut brief = Duration::from_millis(300);
    assert_eq!(c.queues[0].do_io(&mut none, 0, Some(&mut brief), None).unwrap(), 0);
    drop(c);
    let t = Instant::now();
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.flush(0), 0);
    assert!(t.elapsed() < Duration::from_secs(2), "reconnecting took {:?}", t.elapsed());
    drop(c);
    assert!(daemon.stop().success(), "{}", daemon.log());
}

#[test]
fn bad_limits_are_refused() {
    let dir = tmpdir();
    let d = dir.path();
    let sock = d.join("x.sock").display().to_string();
    for (keys, want) in [
        ("iops-total=100,iops-read=5", "iops-total and iops-read/iops-write exclude each other"),
        ("bps-read-max=1M", "bps-read-max needs bps-read"),
        ("iops-write=10,iops-write-max=5", "iops-write-max=5 is below iops-write=10"),
        ("iops-total=ten", "iops-total=ten: not a whole number"),
        ("throttle-group=a/b", "throttle-group=a/b: 1 to 64 letters"),
    ] {
        let out = serve_refused(&[format!("socket={sock},engine=null,size=1M,{keys}")]);
        assert_usage_error(&out, want);
    }
    let (_daemon, control) = daemon(d, &[null_export(d, "x", "")], &[]);
    for (args, want) in [
        (
            &["set-throttle", "iops-total=5"][..],
            "set-throttle takes 'id' (an export) or 'group' (a throttle group), one of them",
        ),
        (&["set-throttle", "id=x", "group=g", "iops-total=5"], "one of them"),
        (&["set-throttle", "id=nope", "iops-total=5"], "no export with id 'nope'"),
        (&["set-throttle", "group=nope", "iops-total=5"], "no export is in throttle group 'nope'"),
        (&["set-throttle", "id=x", "iops=5"], "'iops' is not a limit"),
        (
            &["set-throttle", "id=x", "bps-total=1M", "bps-write=1M"],
            "bps-total and bps-read/bps-write exclude each other",
        ),
    ] {
        let e = ctl_err(&control, args);
        assert!(
            e.contains(want) && e.contains("invalid-argument") || e.contains("not-found"),
            "{args:?}: {e}"
        );
        assert!(e.contains(want), "{args:?}: {e}");
    }
    // Nothing changed, and the export still serves.
    let stats = ctl_ok(&control, &["query-stats", "id=x"]);
    assert_eq!(stats[0]["throttle"]["limits"], serde_json::json!({}));
    let mut c = Client::connect(&d.join("x.sock"), 1);
    assert_eq!(c.flush(0), 0);
}

#[test]
fn a_reload_that_changes_only_limits_applies_them_under_a_connected_vm() {
    let dir = tmpdir();
    let d = dir.path();
    let (ctl_path, sock, cfg) = (d.join("ctl.sock"), d.join("v.sock"), d.join("blkplane.toml"));
    let write_config = |iops: u32| {
        let text = format!(
            "control = \"{}\"\n\n[[export]]\nid = \"v\"\nsocket = \"{}\"\nengine = \"null\"\nsize = {NULL_BYTES}\niops-total = {iops}\n",
            ctl_path.display(),
            sock.display()
        );
        std::fs::write(&cfg, text).unwrap();
    };
    write_config(100);
    let daemon = Daemon::start_with(
        d,
        &["--config".into(), cfg.display().to_string()],
        &[ctl_path.clone(), sock.clone()],
    );
    let mut c = Client::connect(&sock, 1);
    assert_eq!(ctl_ok(&ctl_path, &["list-exports"])[0]["spec"]["iops-total"], 100);
    write_config(4000);
    common::signal(daemon.pid(), libc::SIGHUP);
    common::wait_until("the reload", Duration::from_secs(10), || {
        ctl_ok(&ctl_path, &["list-exports"])[0]["spec"]["iops-total"] == 4000
    });
    // Not replaced: the same client goes on, at the new rate (far above 100 per second).
    let times = flood(&mut c, false, 4096, NULL_BYTES, 2.0);
    assert_near(
        "IOPS after the reload",
        count(&times, 0.0, 2.0) as f64 / 2.0,
        4000.0 + 200.0,
        10.0,
    );
    assert!(!daemon.log().contains("was not replaced"), "{}", daemon.log());
}
