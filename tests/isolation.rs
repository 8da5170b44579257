//! A hostile tenant against the shared daemon: a VMM that sends what it likes over the
//! vhost-user socket, a guest that builds odd chains, a local user on the control socket and
//! the metrics port. Each test does one thing the daemon used to fail at, then checks that
//! the daemon lives, that the other tenant's export still serves the right bytes, and that
//! SIGTERM still stops it.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::frontend::*;
use common::{make_image, pattern, tmpdir, Client, Daemon};

const IMAGE_BYTES: u64 = 8 << 20;

/// A daemon with two exports: `a` (the attacker's) and `b` (a neighbour's).
struct Tenants {
    dir: tempfile::TempDir,
    a_sock: PathBuf,
    a_image: PathBuf,
    b_sock: PathBuf,
    daemon: Daemon,
}

fn tenants(a_extra: &str) -> Tenants {
    tenants_with(a_extra, &[])
}

fn tenants_with(a_extra: &str, daemon_args: &[&str]) -> Tenants {
    let dir = tmpdir();
    let a_image = dir.path().join("a.raw");
    let b_image = dir.path().join("b.raw");
    make_image(&a_image, IMAGE_BYTES, 1);
    make_image(&b_image, IMAGE_BYTES, 2);
    let a_sock = dir.path().join("a.sock");
    let b_sock = dir.path().join("b.sock");
    let mut args: Vec<String> = daemon_args.iter().map(|s| s.to_string()).collect();
    for spec in [
        format!("id=a,socket={},image={}{a_extra}", a_sock.display(), a_image.display()),
        format!("id=b,socket={},image={}", b_sock.display(), b_image.display()),
    ] {
        args.push("--export".into());
        args.push(spec);
    }
    let daemon = Daemon::start_with(dir.path(), &args, &[a_sock.clone(), b_sock.clone()]);
    Tenants { dir, a_sock, a_image, b_sock, daemon }
}

impl Tenants {
    /// The neighbour's export answers a read with its image's bytes.
    fn neighbour_serves(&mut self) {
        assert!(self.daemon.alive(), "the daemon died:\n{}", self.daemon.log());
        let mut c = Client::connect(&self.b_sock, 1);
        assert!(c.read_at(0, 12288, 8192, 0).unwrap() == pattern(2, 12288, 8192));
    }

    /// The attacker's own export serves a new, well-behaved client again.
    fn own_export_serves(&mut self) {
        let mut c = Client::connect(&self.a_sock, 1);
        assert!(c.read_at(0, 4096, 4096, 0).unwrap() == pattern(1, 4096, 4096));
    }

    /// SIGTERM still stops the daemon, cleanly.
    fn stops(mut self) {
        let status = self.daemon.stop();
        assert!(status.success(), "exit {status}:\n{}", self.daemon.log());
    }
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); after "pid (comm) " the first field is 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Whether `stream` was closed by the daemon within `within`.
fn hung_up_within(stream: &mut UnixStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match stream.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

// 1. A partial vhost-user header.

#[test]
fn partial_header_then_eof_is_a_disconnect_and_a_stalled_one_times_out() {
    let mut t = tenants("");
    for len in [1usize, 5, 11] {
        let mut s = UnixStream::connect(&t.a_sock).unwrap();
        s.write_all(&vec![1u8; len]).unwrap();
        drop(s);
    }
    // The export takes the next frontend, and the accept thread does not spin.
    t.own_export_serves();
    let before = cpu_ticks(t.daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(t.daemon.pid()) - before;
    assert!(used < 30, "the idle daemon used {used} ticks of CPU in one second");

    // A header that stops part-way, with the socket kept open, is hung up on.
    let mut stalled = UnixStream::connect(&t.a_sock).unwrap();
    stalled.write_all(&[1, 0, 0, 0, 1]).unwrap();
    let start = Instant::now();
    assert!(hung_up_within(&mut stalled, Duration::from_secs(15)), "stalled header kept");
    assert!(start.elapsed() >= Duration::from_secs(4), "hung up before the header timeout");
    t.own_export_serves();
    t.neighbour_serves();
    // And once more, stalled, while SIGTERM arrives.
    let mut again = UnixStream::connect(&t.a_sock).unwrap();
    again.write_all(&[1, 0]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    t.stops();
}
