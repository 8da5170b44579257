//! The daemon's NBD server (`--nbd-server`, `ctl nbd-export`) against real NBD clients:
//! qemu-img and qemu-io over a Unix socket and over TCP with TLS (certificates made here with
//! openssl), writes into a migration destination (`incoming=on`) and refused to an export
//! whose guest runs (a libblkio client), and a hostile client of this test's own.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    assert_usage_error, ctl, free_port, make_image, pattern, tmpdir, wait_until, Client, Daemon,
};

const IMAGE_BYTES: u64 = 64 << 20;

/// A daemon with a control socket and an NBD server (`nbd` is `--nbd-server`'s value);
/// `exports` are `--export` specs. Waits for the Unix sockets it names.
fn start(dir: &Path, nbd: &str, exports: &[String]) -> (Daemon, PathBuf) {
    let control = dir.join("ctl.sock");
    let mut args = vec!["--control".to_string(), control.display().to_string()];
    args.extend(["--nbd-server".to_string(), nbd.to_string()]);
    let mut wait = vec![control.clone()];
    for e in exports {
        args.extend(["--export".to_string(), e.clone()]);
        let sock = e.split(',').find_map(|kv| kv.strip_prefix("socket=")).unwrap();
        wait.push(PathBuf::from(sock));
    }
    if let Some(path) = nbd.split(',').find_map(|kv| kv.strip_prefix("unix=")) {
        wait.push(PathBuf::from(path));
    }
    (Daemon::start_with(dir, &args, &wait), control)
}

/// `ctl ARGS` that must succeed; its output as JSON.
fn ctl_ok(control: &Path, args: &[&str]) -> serde_json::Value {
    let out = ctl(control, args);
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `ctl ARGS` that must fail saying `want`.
fn ctl_refused(control: &Path, args: &[&str], want: &str) {
    let out = ctl(control, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ctl {args:?} succeeded");
    assert!(stderr.contains(want), "ctl {args:?}: wanted {want:?} in: {stderr}");
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn assert_ran(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An image of `IMAGE_BYTES` with a pattern in its first half and holes, then data, after.
fn make_sparse_image(path: &Path, seed: u64) {
    make_image(path, 32 << 20, seed);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(IMAGE_BYTES).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pattern(seed, 40 << 20, 1 << 20), 40 << 20).unwrap();
}

/// `qemu-img compare` of two raw images: identical, or the test fails with its words.
fn assert_same(a: &Path, b: &Path) {
    let out =
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(a).arg(b));
    assert_ran(&out, "qemu-img compare");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"));
}

fn unix_uri(name: &str, socket: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// qemu-img, and nbdkit's nbd plugin relaying to qemu-img, copy exposed exports over a Unix
/// socket; block status gives the holes; exposing and unexposing are checked.
#[test]
fn qemu_img_copies_exports_over_a_unix_socket() {
    let dir = tmpdir();
    let disk = common::disk_dir();
    let (img, direct) = (dir.path().join("a.raw"), disk.path().join("direct.raw"));
    make_sparse_image(&img, 1);
    make_sparse_image(&direct, 2);
    let nbd = dir.path().join("nbd.sock");
    let exports = [
        format!("id=vm1,socket={},image={}", dir.path().join("vm1.sock").display(), img.display()),
        format!(
            "id=vm2,socket={},image={},cache=none",
            dir.path().join("vm2.sock").display(),
            direct.display()
        ),
    ];
    let (_daemon, control) = start(dir.path(), &format!("unix={}", nbd.display()), &exports);
    // Nothing is exposed until nbd-export says so.
    let out = run(Command::new("qemu-img").arg("info").arg(unix_uri("vm1", &nbd)));
    assert!(!out.status.success());
    let info = ctl_ok(&control, &["nbd-export", "id=vm1"]);
    assert_eq!(info["name"], "vm1");
    assert_eq!(info["writable"], false);
    assert_eq!(info["size_bytes"], IMAGE_BYTES);
    ctl_ok(&control, &["nbd-export", "id=vm2", "name=direct disk"]);
    ctl_refused(&control, &["nbd-export", "id=vm1", "name=other"], "exposed already");
    ctl_refused(&control, &["nbd-export", "id=vm2", "name=vm1"], "exposed already");
    ctl_refused(&control, &["nbd-export", "id=nope"], "no export with id 'nope'");
    let list = ctl_ok(&control, &["nbd-list"]);
    assert_eq!(list["exports"].as_array().unwrap().len(), 2);

    for (name, image) in [("vm1", &img), ("direct%20disk", &direct)] {
        let out_img = dir.path().join("copy.raw");
        let _ = std::fs::remove_file(&out_img);
        let out = run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(unix_uri(name, &nbd))
            .arg(&out_img));
        assert_ran(&out, "qemu-img convert");
        assert_same(image, &out_img);
    }
    // Block status: the hole between the pattern and the data at 40 MiB reads as zero and
    // unallocated, as SEEK_HOLE says.
    let out = run(Command::new("qemu-img")
        .args(["map", "-f", "raw", "--output=json"])
        .arg(unix_uri("vm1", &nbd)));
    assert_ran(&out, "qemu-img map");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let extents: Vec<(u64, u64, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["data"] == true))
        .collect();
    assert_eq!(
        extents,
        vec![
            (0, 32 << 20, true),
            (32 << 20, 8 << 20, false),
            (40 << 20, 1 << 20, true),
            (41 << 20, IMAGE_BYTES - (41 << 20), false)
        ]
    );
    // nbdkit's nbd plugin as the client, serving what it reads to qemu-img in turn.
    let relay_sock = dir.path().join("relay.sock");
    let mut relay = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&relay_sock)
        .arg("nbd")
        .arg(format!("socket={}", nbd.display()))
        .arg("export=vm1")
        .spawn()
        .expect("start nbdkit");
    common::wait_until("nbdkit's socket", std::time::Duration::from_secs(10), || {
        relay_sock.exists()
    });
    let relayed = dir.path().join("relayed.raw");
    let out = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///?socket={}", relay_sock.display()))
        .arg(&relayed));
    let _ = relay.kill();
    let _ = relay.wait();
    assert_ran(&out, "qemu-img convert through nbdkit's nbd plugin");
    assert_same(&img, &relayed);
    // Unexported: its name is gone.
    ctl_ok(&control, &["nbd-unexport", "id=vm1"]);
    let out = run(Command::new("qemu-img").arg("info").arg(unix_uri("vm1", &nbd)));
    assert!(!out.status.success());
    ctl_refused(&control, &["nbd-unexport", "id=vm1"], "not exposed");
}

/// `qemu-img convert` from NBD over TCP with TLS, with the client credentials in `creds`.
fn convert_tls(port: u16, creds: &Path, to: &Path) -> std::process::Output {
    let _ = std::fs::remove_file(to);
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw", "--object"])
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", creds.display()))
        .arg("--image-opts")
        .arg(format!("driver=nbd,host=127.0.0.1,port={port},export=vm1,tls-creds=tls0"))
        .arg(to))
}

#[test]
fn qemu_img_copies_an_export_over_tcp_with_tls_and_foreign_clients_are_refused() {
    let dir = tmpdir();
    common::tls::make_certs(dir.path(), &["127.0.0.1"]);
    let img = dir.path().join("a.raw");
    make_sparse_image(&img, 3);
    let port = free_port();
    let exports = [format!(
        "id=vm1,socket={},image={}",
        dir.path().join("vm1.sock").display(),
        img.display()
    )];
    let nbd = format!("addr=127.0.0.1:{port},tls-creds={}", dir.path().join("srv").display());
    let (daemon, control) = start(dir.path(), &nbd, &exports);
    wait_until("the NBD port", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    ctl_ok(&control, &["nbd-export", "id=vm1"]);
    let copy = dir.path().join("copy.raw");
    assert_ran(&convert_tls(port, &dir.path().join("good"), &copy), "qemu-img convert with TLS");
    assert_same(&img, &copy);

    // A certificate from another CA, and none at all: the handshake fails.
    for creds in ["foreign", "nocert"] {
        let out = convert_tls(port, &dir.path().join(creds), &copy);
        assert!(!out.status.success(), "{creds}: the copy was served");
        // What qemu-img says depends on when it sees the server close (a TLS alert, or a reset
        // connection under load); the daemon's log below names each refusal.
    }
    wait_until("the refusals logged", Duration::from_secs(5), || {
        daemon.log().matches("TLS handshake failed").count() == 2
    });
    // A client in clear is told that TLS comes first (NBD_REP_ERR_TLS_REQD and its message).
    let out = run(Command::new("qemu-img").arg("info").arg(format!("nbd://127.0.0.1:{port}/vm1")));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("this server requires TLS: STARTTLS first"), "{stderr}");
    // And the server still serves the right client.
    assert_ran(&convert_tls(port, &dir.path().join("good"), &copy), "qemu-img convert again");
    assert_same(&img, &copy);
}

#[test]
fn bad_nbd_server_settings_are_refused_at_start() {
    let dir = tmpdir();
    let port = free_port();
    let serve = |nbd: &str| {
        run(Command::new(common::daemon_bin())
            .args(["serve", "--control"])
            .arg(dir.path().join("ctl.sock"))
            .args(["--nbd-server", nbd]))
    };
    let tcp = format!("addr=127.0.0.1:{port}");
    assert_usage_error(&serve(&tcp), "addr= (TCP) needs tls-creds=DIR, or tls=off");
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let with_creds = format!("{tcp},tls-creds={}", creds.display());
    assert_usage_error(&serve(&with_creds), "server-cert.pem");
    assert_usage_error(&serve(&format!("{with_creds},tls=off")), "exclude each other");
    let both = format!("{tcp},tls=off,unix={}", dir.path().join("n.sock").display());
    assert_usage_error(&serve(&both), "unix= and addr= exclude each other");
    assert_usage_error(&serve("unix=/x,bogus=1"), "unknown key 'bogus'");
    assert_usage_error(&serve(&format!("{tcp},tls=off,socket-mode=0660")), "unix= only");

    // The [nbd-server] table: plain TCP said on purpose, and shown by dump-config.
    let file = dir.path().join("blkplane.toml");
    let img = dir.path().join("a.raw");
    make_image(&img, 1 << 20, 4);
    std::fs::write(
        &file,
        format!(
            "control = \"{}\"\n[nbd-server]\naddr = \"127.0.0.1:{port}\"\ntls = false\n\
             [[export]]\nid = \"vm1\"\nsocket = \"{}\"\nimage = \"{}\"\n",
            dir.path().join("ctl.sock").display(),
            dir.path().join("vm1.sock").display(),
            img.display()
        ),
    )
    .unwrap();
    let args = ["--config".to_string(), file.display().to_string()];
    let control = dir.path().join("ctl.sock");
    let _daemon = Daemon::start_with(dir.path(), &args, std::slice::from_ref(&control));
    ctl_ok(&control, &["nbd-export", "id=vm1"]);
    let out = run(Command::new("qemu-img").arg("info").arg(format!("nbd://127.0.0.1:{port}/vm1")));
    assert_ran(&out, "qemu-img info over plain TCP");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 MiB"));
    let out = ctl(&control, &["dump-config"]);
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains("[nbd-server]") && dump.contains("tls = \"off\""), "{dump}");
    // A changed table is named by a reload, not applied.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("tls = false", "tls = false\nmax-connections = 3");
    std::fs::write(&file, text).unwrap();
    ctl_refused(&control, &["reload"], "nbd-server: the NBD server is set at start");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[nbd-server]\nunix = \"/x\"\nwat = 1\n").unwrap();
    let out = run(Command::new(common::daemon_bin())
        .args(["serve", "--check-config", "--config"])
        .arg(&bad));
    assert_usage_error(&out, "nbd-server: unknown key 'wat'");
}

/// A minimal NBD client of this test's own, to send what no well-behaved client sends.
struct RawNbd {
    s: UnixStream,
}

const NBD_OPT_GO: u32 = 7;
const NBD_REP_ACK: u32 = 1;
const NBD_REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const NBD_REP_ERR_INVALID: u32 = (1 << 31) | 3;
const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;
const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_BLOCK_STATUS: u16 = 7;
const NBD_EPERM: u32 = 1;
const NBD_EINVAL: u32 = 22;
const NBD_EOVERFLOW: u32 = 75;

impl RawNbd {
    /// Connects and reads the server's greeting; sends `client_flags`.
    fn connect(path: &Path, client_flags: u32) -> RawNbd {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = RawNbd { s };
        let mut hello = [0u8; 18];
        c.s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[0..16], b"NBDMAGICIHAVEOPT");
        c.s.write_all(&client_flags.to_be_bytes()).unwrap();
        c
    }

    /// Whether the server closed the connection (end of file or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut h = b"IHAVEOPT".to_vec();
        h.extend_from_slice(&option.to_be_bytes());
        h.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let _ = self.s.write_all(&h);
        let _ = self.s.write_all(data);
    }

    /// The option's replies up to its last (an ack or an error): (type, data).
    fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_option(option, data);
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), option);
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut body = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            self.s.read_exact(&mut body).unwrap();
            replies.push((kind, body));
            if kind == NBD_REP_ACK || kind & (1 << 31) != 0 {
                return replies;
            }
        }
    }

    fn last_reply(&mut self, option: u32, data: &[u8]) -> u32 {
        self.option(option, data).last().unwrap().0
    }

    /// GO for `name`: its size and flags.
    fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.option(NBD_OPT_GO, &go_data(name));
        assert_eq!(replies.last().unwrap().0, NBD_REP_ACK, "GO {name}: {replies:?}");
        let export = replies.iter().find(|(_, d)| d.len() == 12 && d[0..2] == [0, 0]).unwrap();
        let size = u64::from_be_bytes(export.1[2..10].try_into().unwrap());
        (size, u16::from_be_bytes([export.1[10], export.1[11]]))
    }

    fn send_request(&mut self, command: u16, offset: u64, length: u32, payload: &[u8]) {
        let mut h = 0x2560_9513u32.to_be_bytes().to_vec();
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&command.to_be_bytes());
        h.extend_from_slice(&0x1234u64.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&length.to_be_bytes());
        let _ = self.s.write_all(&h);
        let _ = self.s.write_all(payload);
    }

    /// A request and its simple reply: the error, and the data of a successful read.
    fn request(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        self.send_request(command, offset, length, payload);
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698);
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 0x1234);
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut data = Vec::new();
        if error == 0 && command == NBD_CMD_READ {
            data = vec![0u8; length as usize];
            self.s.read_exact(&mut data).unwrap();
        }
        (error, data)
    }
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

const FIXED_NO_ZEROES: u32 = 3;

#[test]
fn writes_go_into_an_incoming_export_and_are_refused_under_a_running_guest() {
    let dir = tmpdir();
    let (src, dst, live) =
        (dir.path().join("src.raw"), dir.path().join("dst.raw"), dir.path().join("live.raw"));
    make_sparse_image(&src, 5);
    std::fs::File::create(&dst).unwrap().set_len(IMAGE_BYTES).unwrap();
    make_image(&live, IMAGE_BYTES, 6);
    let nbd = dir.path().join("nbd.sock");
    let live_sock = dir.path().join("live.sock");
    let exports = [
        format!(
            "id=dst,socket={},image={},incoming=on",
            dir.path().join("dst.sock").display(),
            dst.display()
        ),
        format!("id=live,socket={},image={}", live_sock.display(), live.display()),
    ];
    let (_daemon, control) = start(dir.path(), &format!("unix={}", nbd.display()), &exports);

    // A migration's destination: qemu-img writes the whole source into it over NBD.
    ctl_ok(&control, &["nbd-export", "id=dst", "writable=on"]);
    let out = run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(unix_uri("dst", &nbd)));
    assert_ran(&out, "qemu-img convert into the incoming export");
    assert_same(&src, &dst);
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -z 2M 64k", "-c", "flush"])
        .arg(unix_uri("dst", &nbd)));
    assert_ran(&out, "qemu-io writes");
    let written = std::fs::read(&dst).unwrap();
    assert!(written[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 0xab));
    assert!(written[2 << 20..(2 << 20) + 65536].iter().all(|b| *b == 0));
    assert_eq!(written[(1 << 20) + 65536], pattern(5, (1 << 20) + 65536, 1)[0]);

    // An export whose guest is not running yet takes writes; once a frontend starts its
    // rings, every write is refused with EPERM (reads go on), and writable=on too.
    ctl_ok(&control, &["nbd-export", "id=live", "writable=on"]);
    let mut raw = RawNbd::connect(&nbd, FIXED_NO_ZEROES);
    assert_eq!(raw.go("live").0, IMAGE_BYTES);
    assert_eq!(raw.request(NBD_CMD_WRITE, 0, 4096, &[0x11; 4096]).0, 0);
    let guest = Client::connect(&live_sock, 1);
    let mut refused = (0, Vec::new());
    wait_until("writes refused", Duration::from_secs(5), || {
        refused = raw.request(NBD_CMD_WRITE, 4096, 4096, &[0x22; 4096]);
        refused.0 != 0
    });
    assert_eq!(refused.0, NBD_EPERM);
    let (error, data) = raw.request(NBD_CMD_READ, 0, 8192, &[]);
    assert_eq!(error, 0);
    assert_eq!(&data[..4096], &[0x11; 4096][..]);
    assert_eq!(&data[4096..], &pattern(6, 4096, 4096)[..]);
    drop(raw);
    ctl_ok(&control, &["nbd-unexport", "id=live"]);
    ctl_refused(&control, &["nbd-export", "id=live", "writable=on"], "guest is running");
    let info = ctl_ok(&control, &["nbd-export", "id=live"]);
    assert_eq!(info["writable"], false);
    drop(guest);
}

#[test]
fn hostile_nbd_clients_get_errors_or_are_closed_and_others_are_served() {
    let dir = tmpdir();
    let img = dir.path().join("a.raw");
    make_image(&img, IMAGE_BYTES, 7);
    let (nbd, sock) = (dir.path().join("nbd.sock"), dir.path().join("vm1.sock"));
    let exports = [format!("id=vm1,socket={},image={}", sock.display(), img.display())];
    let spec = format!("unix={},max-connections=2", nbd.display());
    let (daemon, control) = start(dir.path(), &spec, &exports);
    ctl_ok(&control, &["nbd-export", "id=vm1"]);

    // Not a fixed newstyle client; an option without its magic.
    assert!(RawNbd::connect(&nbd, 0).closed());
    let mut c = RawNbd::connect(&nbd, FIXED_NO_ZEROES);
    c.s.write_all(&[0xee; 16]).unwrap();
    assert!(c.closed());

    // Bad options are answered, and the negotiation goes on.
    let mut c = RawNbd::connect(&nbd, FIXED_NO_ZEROES);
    assert_eq!(c.last_reply(99, b"whatever"), NBD_REP_ERR_UNSUP);
    assert_eq!(c.last_reply(NBD_OPT_GO, &vec![0u8; 100 << 10]), NBD_REP_ERR_TOO_BIG);
    assert_eq!(c.last_reply(NBD_OPT_GO, &[0, 0, 1, 0, b'x']), NBD_REP_ERR_INVALID);
    assert_eq!(c.last_reply(NBD_OPT_GO, &go_data("nope")), NBD_REP_ERR_UNKNOWN);
    assert_eq!(c.last_reply(10, &[0, 0, 0, 0, 0, 0, 0, 0]), NBD_REP_ERR_INVALID);
    let (size, flags) = c.go("vm1");
    assert_eq!(size, IMAGE_BYTES);
    assert_ne!(flags & 2, 0, "read-only flag");

    // Bad requests get their error; the connection goes on.
    assert_eq!(c.request(NBD_CMD_READ, IMAGE_BYTES - 512, 1024, &[]).0, NBD_EINVAL);
    assert_eq!(c.request(NBD_CMD_READ, u64::MAX - 10, 512, &[]).0, NBD_EINVAL);
    assert_eq!(c.request(NBD_CMD_READ, 0, 64 << 20, &[]).0, NBD_EOVERFLOW);
    assert_eq!(c.request(42, 0, 512, &[]).0, NBD_EINVAL);
    assert_eq!(c.request(NBD_CMD_BLOCK_STATUS, 0, 512, &[]).0, NBD_EINVAL);
    assert_eq!(c.request(NBD_CMD_WRITE, 0, 512, &[0x33; 512]).0, NBD_EPERM);
    assert_eq!(c.request(NBD_CMD_WRITE, IMAGE_BYTES, 512, &[0x33; 512]).0, 28);
    // cache=none (the default): requests on the O_DIRECT blocks NBD_INFO_BLOCK_SIZE gave.
    assert_eq!(c.request(NBD_CMD_READ, 12345, 4000, &[]).0, NBD_EINVAL);
    let (error, data) = c.request(NBD_CMD_READ, 12288, 4096, &[]);
    assert_eq!(error, 0);
    assert_eq!(data, pattern(7, 12288, 4096));
    // A write over the 32 MiB limit, and a bad request magic, end the connection.
    c.send_request(NBD_CMD_WRITE, 0, 1 << 30, &[]);
    assert!(c.closed());
    let mut c = RawNbd::connect(&nbd, FIXED_NO_ZEROES);
    c.go("vm1");
    c.s.write_all(&[0x55; 28]).unwrap();
    assert!(c.closed());

    // Connections are bounded: two stalled clients take both places, a third is closed
    // before its greeting, and a place freed is taken again.
    let stalled: Vec<UnixStream> = (0..2).map(|_| UnixStream::connect(&nbd).unwrap()).collect();
    wait_until("both places taken", Duration::from_secs(5), || {
        let mut third = UnixStream::connect(&nbd).unwrap();
        third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        matches!(third.read(&mut b), Ok(0) | Err(_))
    });
    drop(stalled);
    wait_until("a place freed", Duration::from_secs(5), || {
        let mut c = UnixStream::connect(&nbd).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 8];
        c.read_exact(&mut hello).is_ok()
    });

    // Everything else was served throughout: qemu-img over NBD, a guest over vhost-user.
    let copy = dir.path().join("copy.raw");
    let out = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(unix_uri("vm1", &nbd))
        .arg(&copy));
    assert_ran(&out, "qemu-img convert after the hostile clients");
    assert_same(&img, &copy);
    let mut guest = Client::connect(&sock, 1);
    assert_eq!(guest.read_at(0, 0, 65536, 0).unwrap(), pattern(7, 0, 65536));
    assert!(daemon.log().contains("bad request magic"), "{}", daemon.log());
}
