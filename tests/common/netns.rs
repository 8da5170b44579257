//! Two network namespaces joined by a veth pair: two "hosts" on one machine, for tests whose
//! traffic must cross a network (a migration without shared storage). Needs root (`ip`).

use std::process::Command;

/// The namespaces `a` and `b`, with addresses [`NetPair::ADDR_A`] and [`NetPair::ADDR_B`] on
/// the link between them; deleted when dropped.
pub struct NetPair {
    pub a: String,
    pub b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetPair {
    pub const ADDR_A: &'static str = "10.77.0.1";
    pub const ADDR_B: &'static str = "10.77.0.2";

    /// Makes the pair, named after this process (so parallel test processes do not meet).
    pub fn new(tag: &str) -> NetPair {
        let id = std::process::id() % 100_000;
        let pair = NetPair { a: format!("bp{tag}{id}a"), b: format!("bp{tag}{id}b") };
        // Left over by a run that was killed: its names are ours again.
        pair.delete();
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        let (va, vb) = (format!("v{id}a"), format!("v{id}b"));
        ip(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ]);
        for (ns, dev, addr) in [(&pair.a, &va, Self::ADDR_A), (&pair.b, &vb, Self::ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    fn delete(&self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }

    /// `cmd` run inside namespace `ns` (`ip netns exec` executes it in place: the process
    /// it starts is `cmd`'s program, with its arguments and environment).
    pub fn exec_in(ns: &str, cmd: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", ns]).arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        wrapped
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        self.delete();
    }
}
