//! Many exports on few I/O threads: 256 connected exports are served by the pool alone, an
//! idle pool sleeps, and one export's reconnects and removal never stop its neighbours on
//! the same thread.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{make_image, pattern, tmpdir, Client, Daemon};

/// The names of the daemon's threads (from /proc/PID/task/*/comm).
fn thread_names(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

/// Each I/O thread's scheduler state letter (R running, S sleeping, ...).
fn io_thread_states(pid: i32) -> Vec<(String, char)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?.trim().to_string();
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            name.starts_with("blkplane-pool").then_some((name, state))
        })
        .collect()
}

#[test]
fn two_hundred_fifty_six_connected_exports_on_the_pool_alone() {
    const EXPORTS: usize = 256;
    const POOL: usize = 2;
    let dir = tmpdir();
    let d = dir.path();
    let mut args = vec!["--pool-threads".to_string(), POOL.to_string()];
    let mut sockets = Vec::new();
    for i in 0..EXPORTS {
        let sock = d.join(format!("e{i}.sock"));
        args.push("--export".into());
        args.push(format!("id=e{i},socket={},engine=null,size=1M", sock.display()));
        sockets.push(sock);
    }
    let daemon = Daemon::start_with(d, &args, &sockets);
    let mut clients: Vec<Client> = sockets.iter().map(|s| Client::connect(s, 1)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.read_at(0, (i as u64 % 256) * 4096, 4096, 0).unwrap(),
            vec![0u8; 4096],
            "export {i}"
        );
    }
    // Every queue runs on the pool: no thread of its own for any of them.
    let names = thread_names(daemon.pid());
    let pool = names.iter().filter(|n| n.starts_with("blkplane-pool")).count();
    assert_eq!(pool, POOL, "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("blkplane-q")), "{names:?}");
    // Idle, the pool sleeps: every pool thread is seen asleep again and again.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..20 {
        let states = io_thread_states(daemon.pid());
        assert_eq!(states.len(), POOL);
        assert!(states.iter().all(|(_, s)| *s == 'S'), "an idle pool thread is awake: {states:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // And every export still answers, the last as well as the first.
    for (i, c) in clients.iter_mut().enumerate().rev() {
        assert_eq!(c.read_at(0, 0, 512, 0).unwrap(), vec![0u8; 512], "export {i}");
    }
}

/// Reads and checks a pattern on `sock` until stopped; counts completions in `done`.
fn steady_reader(
    sock: PathBuf,
    seed: u64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = Client::connect(&sock, 1);
        let mut offset = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let got = c.read_at(0, offset, 4096, 0).unwrap();
            assert_eq!(got, pattern(seed, offset, 4096), "neighbour read at {offset}");
            offset = (offset + 4096) % (4 << 20);
            done.fetch_add(1, Ordering::Relaxed);
        }
    })
}

#[test]
fn a_neighbour_reconnecting_and_leaving_never_stops_the_other_queues_on_its_thread() {
    let dir = tmpdir();
    let d = dir.path();
    let (steady_img, churn_img) = (d.join("steady.raw"), d.join("churn.raw"));
    make_image(&steady_img, 4 << 20, 7);
    make_image(&churn_img, 4 << 20, 9);
    let (steady, churn) = (d.join("steady.sock"), d.join("churn.sock"));
    let ctl = d.join("ctl.sock");
    // One pool thread: both exports' queues share it.
    let args = [
        "--pool-threads".to_string(),
        "1".into(),
        "--control".into(),
        ctl.display().to_string(),
        "--export".into(),
        format!("id=steady,socket={},image={}", steady.display(), steady_img.display()),
        "--export".into(),
        format!("id=churn,socket={},image={},queues=2", churn.display(), churn_img.display()),
    ];
    let mut daemon = Daemon::start_with(d, &args, &[steady.clone(), churn.clone()]);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let reader = steady_reader(steady.clone(), 7, Arc::clone(&stop), Arc::clone(&done));
    // The neighbour connects (two queues join the thread), does I/O, disconnects (they
    // leave), forty times; the steady reader must complete requests throughout.
    let mut stalls = Vec::new();
    for round in 0..40 {
        let before = done.load(Ordering::Relaxed);
        {
            let mut c = Client::connect(&churn, 2);
            assert_eq!(c.read_at(round % 2, 4096, 4096, 0).unwrap(), pattern(9, 4096, 4096));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while done.load(Ordering::Relaxed) == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if done.load(Ordering::Relaxed) == before {
            stalls.push(round);
        }
    }
    assert!(stalls.is_empty(), "the steady export stalled in rounds {stalls:?}");
    // Removing the neighbour altogether leaves the thread serving the steady export.
    let mut control = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
    use std::io::{BufRead, Write};
    writeln!(
        control,
        r#"{{"id":1,"command":"remove-export","args":{{"id":"churn","force":true}}}}"#
    )
    .unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(&control).read_line(&mut reply).unwrap();
    assert!(reply.contains(r#""removed":"churn""#), "{reply}");
    let before = done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    assert!(done.load(Ordering::Relaxed) > before, "no progress after the neighbour left");
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert!(daemon.alive());
}

#[test]
fn requests_waiting_for_bounce_memory_are_parked_and_all_complete_in_order() {
    use common::frontend::{
        header, TestFrontend, DATA_AREA, DESC_F_NEXT, DESC_F_WRITE, F_RING_EVENT_IDX,
        F_RING_INDIRECT_DESC, HEADER_AREA, S_OK, T_IN,
    };
    const CHAINS: u16 = 20;
    const BUFS: u16 = 4;
    let dir = common::disk_dir();
    let d = dir.path();
    let image = d.join("a.raw");
    make_image(&image, 4 << 20, 3);
    let sock = d.join("a.sock");
    let args = [
        "--pool-threads".to_string(),
        "1".into(),
        "--export".into(),
        format!("socket={},image={},cache=none", sock.display(), image.display()),
    ];
    let _daemon = Daemon::start_with(d, &args, std::slice::from_ref(&sock));
    let mut fe = TestFrontend::connect(&sock, 1, 128, F_RING_INDIRECT_DESC | F_RING_EVENT_IDX);
    // Twenty reads of 4 MiB each into 1 MiB guest buffers at an odd address: each needs a
    // 4 MiB bounce buffer, 80 MiB together, over the queue's 64 MiB. The later ones wait.
    let per_chain = BUFS + 2;
    for c in 0..CHAINS {
        let hdr = HEADER_AREA + u64::from(c) * 128;
        fe.ram.write(hdr, &header(T_IN, 0));
        fe.ram.write(hdr + 64, &[0xAA]);
        let first = c * per_chain;
        fe.set_desc(0, first, hdr, 16, DESC_F_NEXT, first + 1);
        for b in 0..BUFS {
            let i = first + 1 + b;
            fe.set_desc(0, i, DATA_AREA + 1, 1 << 20, DESC_F_WRITE | DESC_F_NEXT, i + 1);
        }
        fe.set_desc(0, first + BUFS + 1, hdr + 64, 1, DESC_F_WRITE, 0);
        fe.push_avail(0, first);
    }
    fe.kick(0);
    let mut answered = Vec::new();
    for _ in 0..CHAINS {
        let (id, used_len) =
            fe.wait_used(0, Duration::from_secs(10)).expect("a parked request never completed");
        assert_eq!(used_len, (BUFS as u32) * (1 << 20) + 1);
        answered.push(id as u16 / per_chain);
    }
    for c in 0..CHAINS {
        assert_eq!(fe.ram.read(HEADER_AREA + u64::from(c) * 128 + 64, 1)[0], S_OK, "chain {c}");
    }
    let mut sorted = answered.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..CHAINS).collect::<Vec<_>>(), "each answered once");
    assert_eq!(fe.ram.read(DATA_AREA + 1, 4096), pattern(3, 3 << 20, 4096));
}

#[test]
fn queues_are_spread_over_the_named_threads_round_robin() {
    use std::io::{BufRead, Write};
    let dir = tmpdir();
    let d = dir.path();
    let (sock, ctl) = (d.join("a.sock"), d.join("ctl.sock"));
    let args = [
        "--control".to_string(),
        ctl.display().to_string(),
        "--iothread".into(),
        "id=t1".into(),
        "--iothread".into(),
        "id=t2,poll=never".into(),
        "--export".into(),
        format!("id=a,socket={},engine=null,size=1M,queues=3,iothread=t1:t2", sock.display()),
    ];
    let _daemon = Daemon::start_with(d, &args, &[sock.clone(), ctl.clone()]);
    let queues_on = |name: &str| -> u64 {
        let mut s = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
        writeln!(s, r#"{{"id":1,"command":"list-iothreads"}}"#).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
        let threads = reply["result"].as_array().unwrap().clone();
        let t = threads.iter().find(|t| t["id"] == name).unwrap_or_else(|| panic!("{line}"));
        t["queues"].as_u64().unwrap()
    };
    assert_eq!((queues_on("t1"), queues_on("t2")), (0, 0));
    let names = thread_names(_daemon.pid());
    assert!(names.contains(&"blkplane-t1".to_string()), "{names:?}");
    {
        let mut c = Client::connect(&sock, 3);
        for q in 0..3 {
            assert_eq!(c.read_at(q, 0, 4096, 0).unwrap(), vec![0u8; 4096]);
        }
        // Queues 0 and 2 on t1, queue 1 on t2; the pool has none of them.
        assert_eq!((queues_on("t1"), queues_on("t2")), (2, 1));
        assert_eq!(queues_on("pool.0"), 0);
    }
    // Gone with the client.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (queues_on("t1"), queues_on("t2")) != (0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!((queues_on("t1"), queues_on("t2")), (0, 0));
}
