//! An export as the operator asks for it: one `--export` spec (also a `[[export]]` table of
//! the config file or an add-export on the control socket) read into an [`ExportConfig`].
//!
//! Each layer owns its keys, one table each (`spec::Key` rows): the socket's in
//! `vhost_user/server.rs`, the disk's in `disk.rs`, NBD's and RBD's in their engines, the
//! threads' in `iothread/`, the limits' in `qos/`. This module composes them: parsing,
//! printing (`list-exports`, `dump-config`), the list of keys in errors, `serve --help`, the
//! man page and the completions all come from the same rows.

use crate::disk::{BackendSpec, DiskOptions};
use crate::engine::nbd::NbdOptions;
use crate::engine::rbd::RbdOptions;
use crate::iothread::registry::ThreadOptions;
use crate::qos::LimitOptions;
use crate::spec::{self, Key, KeyInfo, Kind, Options, SpecError, Value};
use crate::vhost_user::SocketOptions;

/// One `--export` specification, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportConfig {
    /// Name used by the control socket and in statistics (default: export0, export1, ...).
    pub id: Option<String>,
    pub socket: SocketOptions,
    pub disk: DiskOptions,
    pub threads: ThreadOptions,
    pub limits: LimitOptions,
}

/// The export's own key.
const ID_KEYS: &[Key<ExportConfig>] = &[Key {
    name: "id",
    aliases: &[],
    kind: Kind::Text,
    usage: "id=NAME",
    help: "name of the export on the control socket (default export0, export1, ...).",
    set: |c, v| {
        c.id = Some(spec::name("id", v)?);
        Ok(())
    },
    get: |c| c.id.clone().map(Value::Str),
}];

/// The tables an export's keys come from, in the order they are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    Id,
    Socket,
    Disk,
    Nbd,
    Rbd,
    Threads,
    Limits,
    Group,
}

const TABLES: [Table; 8] = [
    Table::Id,
    Table::Socket,
    Table::Disk,
    Table::Nbd,
    Table::Rbd,
    Table::Threads,
    Table::Limits,
    Table::Group,
];

impl Table {
    fn infos(self) -> Vec<KeyInfo> {
        match self {
            Table::Id => ID_KEYS.iter().map(Key::info).collect(),
            Table::Socket => SocketOptions::infos().collect(),
            Table::Disk => DiskOptions::infos().collect(),
            Table::Nbd => NbdOptions::infos().collect(),
            Table::Rbd => RbdOptions::infos().collect(),
            Table::Threads => ThreadOptions::infos().collect(),
            Table::Limits => LimitOptions::infos().collect(),
            Table::Group => LimitOptions::GROUP_KEYS.iter().map(Key::info).collect(),
        }
    }

    fn set(
        self,
        c: &mut ExportConfig,
        key: &str,
        value: &Value,
    ) -> Option<(&'static str, Result<(), SpecError>)> {
        match self {
            Table::Id => spec::set_in(ID_KEYS, c, key, value),
            Table::Socket => c.socket.set_key(key, value),
            Table::Disk => c.disk.set_key(key, value),
            Table::Nbd => c.disk.nbd_keys().set_key(key, value),
            Table::Rbd => c.disk.rbd_keys().set_key(key, value),
            Table::Threads => c.threads.set_key(key, value),
            Table::Limits => c.limits.set_key(key, value),
            Table::Group => spec::set_in(LimitOptions::GROUP_KEYS, &mut c.limits, key, value),
        }
    }

    /// The table's keys with a value in `c`. An engine's keys are printed from its backend.
    fn pairs(self, c: &ExportConfig) -> Vec<(&'static str, Value)> {
        match self {
            Table::Id => spec::pairs_of(ID_KEYS, c),
            Table::Socket => c.socket.pairs(),
            Table::Disk => c.disk.pairs(),
            Table::Nbd => match &c.disk.backend {
                BackendSpec::Nbd { options, .. } => options.pairs(),
                _ => Vec::new(),
            },
            Table::Rbd => match &c.disk.backend {
                BackendSpec::Rbd(options) => options.pairs(),
                _ => Vec::new(),
            },
            Table::Threads => c.threads.pairs(),
            Table::Limits => c.limits.pairs(),
            Table::Group => spec::pairs_of(LimitOptions::GROUP_KEYS, &c.limits),
        }
    }
}

/// qemu-storage-daemon keys (`--export` of type vhost-user-blk, `--blockdev`) with no
/// equivalent here, and what to write instead. Those that mean the same are aliases in the
/// tables (`num-queues`, `addr.path`, `read-only`) or rows (`writable`).
const QSD_ONLY: [(&str, &str); 7] = [
    ("node-name", "image=PATH names the image itself; there are no block nodes"),
    ("type", "every export is vhost-user-blk"),
    ("addr.type", "socket=PATH, a Unix socket, or socket-fd=N"),
    ("addr.str", "socket-fd=N"),
    ("fixed-iothread", "iothread=NAME"),
    ("cache.direct", "cache=none|directsync (on) or cache=writeback|writethrough|unsafe (off)"),
    ("cache.no-flush", "cache=unsafe (on)"),
];

/// What a problem found by `ExportConfig::read` is about: the key of pair i, its value, or
/// the keys together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Key(usize),
    Value(usize),
    Whole,
}

struct KeyProblem {
    of_value: bool,
    error: SpecError,
}

impl KeyProblem {
    fn at(&self, i: usize) -> At {
        if self.of_value {
            At::Value(i)
        } else {
            At::Key(i)
        }
    }
}

/// Every key an export takes, with what its row says of it.
pub fn key_infos() -> Vec<KeyInfo> {
    TABLES.iter().flat_map(|t| t.infos()).collect()
}

/// The names of every key, for error messages.
pub fn key_names() -> String {
    key_infos().iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// `serve --help`'s text for `--export`, from the rows.
pub fn help() -> String {
    format!(
        "One export (repeat the option for more). Comma-separated key=value pairs; write ,, for \
         a comma inside a value.\n\n{}  num-queues, addr.path, read-only\n{:21}qemu-storage-daemon's \
         names, accepted: queues, socket, readonly.",
        spec::help_text(key_infos()),
        ""
    )
}

impl ExportConfig {
    /// Parses `socket=PATH,image=PATH[,queues=N]...`.
    pub fn parse(text: &str) -> Result<ExportConfig, SpecError> {
        Self::from_pairs(spec::split_pairs(text, &key_names())?)
    }

    /// Reads key/value pairs (a spec, a config-file table, an add-export request) and
    /// checks them together; the first problem.
    pub fn from_pairs(
        pairs: impl IntoIterator<Item = (String, Value)>,
    ) -> Result<ExportConfig, SpecError> {
        Self::read(pairs).map_err(|mut problems| problems.swap_remove(0).1)
    }

    /// As `from_pairs`, with every problem and what it is about.
    pub fn read(
        pairs: impl IntoIterator<Item = (String, Value)>,
    ) -> Result<ExportConfig, Vec<(At, SpecError)>> {
        let mut c = ExportConfig::default();
        let mut seen: Vec<(&'static str, Table)> = Vec::new();
        let mut problems = Vec::new();
        for (i, (key, value)) in pairs.into_iter().enumerate() {
            if let Err(e) = c.set(&key, &value, &mut seen) {
                problems.push((e.at(i), e.error));
            }
        }
        if problems.is_empty() {
            if let Err(e) = c.check(&seen) {
                problems.push((At::Whole, e));
            }
        }
        if problems.is_empty() {
            Ok(c)
        } else {
            Err(problems)
        }
    }

    /// Sets one key, refusing a key given twice (under any of its names).
    fn set(
        &mut self,
        key: &str,
        value: &Value,
        seen: &mut Vec<(&'static str, Table)>,
    ) -> Result<(), KeyProblem> {
        let of_key = |error| KeyProblem { of_value: false, error };
        if let Some((k, instead)) = QSD_ONLY.iter().find(|(theirs, _)| *theirs == key) {
            return Err(of_key(SpecError(format!(
                "unknown key '{k}' (a qemu-storage-daemon key; blkplane: {instead})"
            ))));
        }
        let found = TABLES.iter().find_map(|t| t.set(self, key, value).map(|r| (*t, r)));
        let Some((table, (name, result))) = found else {
            return Err(of_key(SpecError(format!("unknown key '{key}' (keys: {})", key_names()))));
        };
        if seen.iter().any(|(k, _)| *k == name) {
            return Err(of_key(SpecError(format!("key '{name}' given twice"))));
        }
        seen.push((name, table));
        result.map_err(|error| KeyProblem { of_value: true, error })
    }

    /// The checks of keys together, once every key is read.
    fn check(&mut self, seen: &[(&'static str, Table)]) -> Result<(), SpecError> {
        let given = |table: Table| seen.iter().any(|(_, t)| *t == table);
        self.disk.check(given(Table::Nbd), given(Table::Rbd))?;
        self.threads.check()?;
        self.limits.throttle.check()?;
        // An export with an id may find its socket among those systemd passed, by name.
        self.socket.check(self.id.is_some())
    }

    /// Every key of the export with its value, defaults included, such that `from_pairs` of
    /// them gives this config back: the whole spec, as `list-exports` and `dump-config`
    /// show it.
    pub fn to_pairs(&self) -> Vec<(&'static str, Value)> {
        TABLES.iter().flat_map(|t| t.pairs(self)).collect()
    }

    /// The export as one `--export` spec.
    #[cfg(test)]
    pub fn to_spec(&self) -> String {
        spec::join_pairs(&self.to_pairs())
    }

    /// The keys whose values are paths, which a client must make absolute before it sends
    /// them to a daemon that has another working directory.
    pub fn is_path_key(key: &str) -> bool {
        key_infos()
            .iter()
            .any(|k| k.kind == Kind::Path && (k.name == key || k.aliases.contains(&key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiscardMode;
    use crate::engine::CacheMode;
    use std::path::PathBuf;

    #[test]
    fn parses_every_key() {
        let c = ExportConfig::parse(
            "socket=/s,image=/i,,x,queues=4,queue-size=128,cache=writeback,aio=io_uring,readonly=on,serial=abc",
        )
        .unwrap();
        assert_eq!(c.socket.path, PathBuf::from("/s"));
        assert_eq!(c.disk.backend, BackendSpec::Image(PathBuf::from("/i,x")));
        assert_eq!((c.disk.queues, c.disk.queue_size), (Some(4), 128));
        assert_eq!(c.disk.cache, CacheMode::Writeback);
        assert!(c.disk.readonly);
        assert_eq!(c.disk.serial, "abc");
    }

    #[test]
    fn null_engine_needs_size() {
        let c = ExportConfig::parse("socket=/s,engine=null,size=1G").unwrap();
        assert_eq!(c.disk.backend, BackendSpec::Null { size_bytes: 1 << 30 });
        assert_eq!(
            ExportConfig::parse("socket=/s,engine=null").unwrap_err().0,
            "engine=null needs size=BYTES"
        );
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let keys = key_names();
        let cases = [
            ("image=/i", "missing socket=PATH (or socket-fd=N)".to_string()),
            ("socket=/s", "missing image=PATH (or engine=null,size=BYTES)".into()),
            ("socket=/s,image=/i,colour=red", format!("unknown key 'colour' (keys: {keys})")),
            ("socket=/s,image=/i,poll=sometimes", "poll=sometimes: one of adaptive, always, never".into()),
            ("socket=/s,image=/i,poll-max-us=1000000", "poll-max-us=1000000: at most 100000".into()),
            ("socket=/s,image=/i,queues=0", "queues=0: must be 1 to 256".into()),
            ("socket=/s,image=/i,queue-size=100", "queue-size=100: must be a power of two from 4 to 1024".into()),
            ("socket=/s,image=/i,cache=fast", "unknown cache mode 'fast' (one of none, directsync, writeback, writethrough, unsafe)".into()),
            ("socket=/s,image=/i,readonly=maybe", "readonly=maybe: expected on or off".into()),
            ("socket=/s,image=/i,serial=012345678901234567890", "serial=012345678901234567890: at most 20 bytes".into()),
            ("socket=/s,image=/i,socket=/t", "key 'socket' given twice".into()),
            ("socket=/s,engine=null,size=1000", "size=1000: must be a non-zero multiple of 512, at most 2^60".into()),
            ("socket=/s,image=/i,logical-block-size=1024", "logical-block-size=1024: 512 or 4096".into()),
            ("socket=/s,image=/i,id=a b", "id=a b: 1 to 64 letters, digits, '-', '_' or '.'".into()),
            ("socket=/s,image=/i,aio=posix", "aio=posix: supported engines: io_uring, native, threads".into()),
            ("socket=/s,image", format!("'image' is not key=value (keys: {keys})")),
        ];
        for (spec, want) in cases {
            assert_eq!(ExportConfig::parse(spec).unwrap_err().0, want, "spec {spec}");
        }
        assert!(keys.starts_with("id, socket, socket-fd, socket-mode, socket-group, socket-owner, image, aio, engine, size, queues"), "{keys}");
        let e = ExportConfig::parse("socket=/s,image=/i,cpus=999").unwrap_err().0;
        assert!(
            e.starts_with("cpus=999: CPU 999 is not one this process may use (allowed: "),
            "{e}"
        );
        assert_eq!(ExportConfig::parse("socket=/s,image=/i,cpus=0").unwrap().threads.cpus, vec![0]);
    }

    #[test]
    fn qemu_storage_daemon_key_names_work_where_they_mean_the_same() {
        let c = ExportConfig::parse("addr.path=/s,image=/i,num-queues=4,writable=off").unwrap();
        assert_eq!(c.socket.path, PathBuf::from("/s"));
        assert_eq!(c.disk.queues, Some(4));
        assert!(c.disk.readonly);
        assert!(!ExportConfig::parse("socket=/s,image=/i,writable=on").unwrap().disk.readonly);
        assert!(ExportConfig::parse("socket=/s,image=/i,read-only=on").unwrap().disk.readonly);
        let e = ExportConfig::parse("socket=/s,image=/i,node-name=disk0").unwrap_err();
        assert_eq!(
            e.0,
            "unknown key 'node-name' (a qemu-storage-daemon key; blkplane: image=PATH names the image itself; there are no block nodes)"
        );
        let e = ExportConfig::parse("socket=/s,image=/i,cache.direct=on").unwrap_err();
        assert_eq!(
            e.0,
            "unknown key 'cache.direct' (a qemu-storage-daemon key; blkplane: cache=none|directsync (on) or cache=writeback|writethrough|unsafe (off))"
        );
        let e = ExportConfig::parse("socket=/s,image=/i,queues=2,num-queues=4").unwrap_err();
        assert_eq!(e.0, "key 'queues' given twice");
    }

    #[test]
    fn the_whole_spec_parses_back_to_the_same_export() {
        for spec in [
            "socket=/s,image=/i",
            "id=vm-1,socket=/run/a,,b.sock,image=/img/x,,y.raw,queues=4,queue-size=128,cache=writeback,aio=threads,readonly=on,discard=ignore,serial=SN 1,stats=off,packed-ring=on,force-share=on,incoming=on,logical-block-size=4096,physical-block-size=4096,max-guest-memory=2G,socket-mode=0660,socket-group=kvm,socket-owner=qemu",
            "socket=/s,engine=null,size=1G,iothread=dedicated,poll=always,poll-max-us=10,cpus=0",
            "socket=/s,image=/i,iothread=a:b",
            "socket=/s,image=/i,iops-read=100,iops-read-max=300,iops-read-max-length=10,bps-write=4M,iops-size=16K,throttle-group=tenant-7",
            "socket=/s,image=nbd+unix:///e?socket=/n.sock,reconnect-delay=3",
            "socket=/s,pool=p,rbd-image=i@snap,ceph-conf=/c.conf,ceph-user=u,ceph-op-timeout=5",
        ] {
            let config = ExportConfig::parse(spec).unwrap();
            let again = config.to_spec();
            assert_eq!(ExportConfig::parse(&again).unwrap(), config, "{spec} → {again}");
            // Typed, as the config file and the control socket give them.
            let typed = config.to_pairs().into_iter().map(|(k, v)| (k.to_string(), v));
            assert_eq!(ExportConfig::from_pairs(typed).unwrap(), config, "{spec} typed");
        }
        // Without queues= the export offers what the VMM asks: no key is shown for it.
        let c = ExportConfig::parse("socket=/s,image=/i").unwrap();
        let keys: Vec<&str> = c.to_pairs().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "socket",
                "image",
                "aio",
                "queue-size",
                "cache",
                "readonly",
                "discard",
                "serial",
                "stats",
                "packed-ring",
                "force-share",
                "incoming",
                "max-guest-memory",
                "iothread"
            ]
        );
    }

    #[test]
    fn values_keep_their_type() {
        let c = ExportConfig::from_pairs([
            ("id".to_string(), Value::Str("007".into())),
            ("serial".to_string(), Value::Str("00123".into())),
            ("socket".to_string(), Value::Str("/s".into())),
            ("engine".to_string(), Value::Str("null".into())),
            ("size".to_string(), Value::Int(1 << 20)),
            ("readonly".to_string(), Value::Bool(true)),
        ])
        .unwrap();
        assert_eq!((c.id.as_deref(), c.disk.serial.as_str()), (Some("007"), "00123"));
        assert!(c.disk.readonly);
        let numeric_id = [
            ("id".to_string(), Value::Int(123)),
            ("socket".to_string(), Value::Str("/s".into())),
            ("image".to_string(), Value::Str("/i".into())),
        ];
        assert_eq!(ExportConfig::from_pairs(numeric_id).unwrap().id.as_deref(), Some("123"));
        let e = ExportConfig::from_pairs([("serial".to_string(), Value::Bool(true))]).unwrap_err();
        assert_eq!(e.0, "serial: expected a string, not true");
    }

    #[test]
    fn relative_paths_are_made_absolute_and_an_id_may_name_its_socket() {
        let cwd = std::env::current_dir().unwrap();
        let c = ExportConfig::parse("socket=vm1.sock,image=disks/vm1.raw").unwrap();
        assert_eq!(c.socket.path, cwd.join("vm1.sock"));
        assert_eq!(c.disk.backend, BackendSpec::Image(cwd.join("disks/vm1.raw")));
        assert!(ExportConfig::is_path_key("image") && ExportConfig::is_path_key("addr.path"));
        assert!(!ExportConfig::is_path_key("serial"));
        let c = ExportConfig::parse("id=vm1,image=/i").unwrap();
        assert_eq!(c.socket, SocketOptions::default());
    }

    #[test]
    fn the_help_has_every_described_key() {
        let help = help();
        for k in key_infos().iter().filter(|k| !k.help.is_empty()) {
            assert!(help.contains(k.usage), "{} missing from\n{help}", k.usage);
        }
        assert!(help.contains("  cache=MODE         none (default): O_DIRECT"), "{help}");
    }

    #[test]
    fn discard_is_unmap_or_ignore() {
        let parse = |extra: &str| ExportConfig::parse(&format!("socket=/s,image=/i{extra}"));
        assert_eq!(parse("").unwrap().disk.discard, DiscardMode::Unmap);
        assert_eq!(parse(",discard=unmap").unwrap().disk.discard, DiscardMode::Unmap);
        assert_eq!(parse(",discard=ignore").unwrap().disk.discard, DiscardMode::Ignore);
        // QEMU's -drive spellings.
        assert_eq!(parse(",discard=on").unwrap().disk.discard, DiscardMode::Unmap);
        assert_eq!(parse(",discard=off").unwrap().disk.discard, DiscardMode::Ignore);
        assert_eq!(parse(",discard=trim").unwrap_err().0, "discard=trim: unmap or ignore");
    }
}
