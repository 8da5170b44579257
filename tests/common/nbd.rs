//! Real NBD servers for the tests: `qemu-nbd` and `nbdkit` serving an image file over a Unix
//! socket, which the test may kill and start again (the reconnect cases).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which server program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    QemuNbd,
    Nbdkit,
}

/// An NBD server on an image file, stopped when dropped.
pub struct NbdServer {
    pub server: Server,
    pub image: PathBuf,
    pub socket: PathBuf,
    /// `--shared` of qemu-nbd (connections at once; above 1 it allows multi-conn).
    shared: u32,
    child: Option<Child>,
}

impl NbdServer {
    /// Starts `server` on `image`, listening on `socket`, and waits until it answers.
    pub fn start(server: Server, image: &Path, socket: &Path) -> NbdServer {
        Self::start_shared(server, image, socket, 16)
    }

    pub fn start_shared(server: Server, image: &Path, socket: &Path, shared: u32) -> NbdServer {
        let mut s = NbdServer {
            server,
            image: image.to_path_buf(),
            socket: socket.to_path_buf(),
            shared,
            child: None,
        };
        s.restart();
        s
    }

    /// The URI blkplane's `image=` takes for this server's export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// SIGKILL, as a crashed server; returns once it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts the server (again) and waits until its socket answers.
    pub fn restart(&mut self) {
        self.kill();
        let mut cmd = match self.server {
            // -t: keep serving after a client goes; writeback: the default cache of both.
            Server::QemuNbd => {
                let mut c = Command::new("qemu-nbd");
                c.arg(format!("--socket={}", self.socket.display()))
                    .args(["--format=raw", "--discard=unmap", "--cache=writeback", "-t"])
                    .arg(format!("--shared={}", self.shared))
                    .arg(&self.image);
                c
            }
            Server::Nbdkit => {
                let mut c = Command::new("nbdkit");
                c.args(["--foreground", "--exit-with-parent", "--unix"])
                    .arg(&self.socket)
                    .arg("file")
                    .arg(&self.image);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", self.server));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "{:?} never listened", self.server);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nbdkit serving on `socket` with `args` (filters, the plugin and its parameters), stopped
/// when dropped; returns once it answers.
pub fn nbdkit(socket: &Path, args: &[String]) -> super::KillOnDrop {
    let child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start nbdkit: {e}"));
    let server = super::KillOnDrop(child);
    super::wait_until("nbdkit listens", Duration::from_secs(20), || {
        UnixStream::connect(socket).is_ok()
    });
    server
}
