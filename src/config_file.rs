//! `blkplane serve --config FILE.toml`: everything the command line can say, in a file.
//!
//! ```toml
//! control = "/run/blkplane.ctl"     # the control socket (optional)
//! metrics = "127.0.0.1:9180"        # Prometheus /metrics (optional)
//! log-level = "info"                # optional
//!
//! [[export]]                        # one table per export, with the keys of --export
//! id = "vm1"
//! socket = "/run/vm1.sock"
//! image = "/var/lib/vm1.raw"
//! queues = 2
//! cache = "none"
//! readonly = false
//! iothread = "fast"                 # on the named thread below (default: the shared pool)
//!
//! [[iothread]]                      # one table per named I/O thread, keys of --iothread
//! id = "fast"
//! cpus = "2-3"
//! poll-max-us = 32
//!
//! [nbd-server]                      # the NBD server, keys of --nbd-server (optional)
//! addr = "0.0.0.0:10809"
//! tls-creds = "/etc/blkplane/tls"
//! ```
//!
//! The top-level keys are [`DaemonSettings`]'s table; an export table's keys are those of
//! `--export` (`export.rs`), an iothread table's those of `--iothread`. Values go to the
//! same rows with their TOML type (a string stays a string). Every problem of a file is
//! reported, each with its line and column.

use std::path::{Path, PathBuf};

use toml_edit::{ImDocument, Item, Table};

use crate::export::{At, ExportConfig};
use crate::iothread::registry::{IoThreadConfig, MAX_POOL_THREADS};
use crate::nbd_server::NbdServerOptions;
use crate::spec::{err, Key, Kind, Options, SpecError, Value};

/// What a configuration file says.
#[derive(Debug, Default)]
pub struct ConfigFile {
    pub settings: DaemonSettings,
    pub iothreads: Vec<IoThreadConfig>,
    pub exports: Vec<ExportConfig>,
    /// The `[nbd-server]` table.
    pub nbd_server: Option<NbdServerOptions>,
}

/// The daemon-wide settings: the file's top-level keys, and the command-line options of
/// the same names. Also what `dump-config` writes of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    pub control: Option<PathBuf>,
    pub metrics: Option<String>,
    /// What a scrape shows: `export` (default) or `queue` (see `control/metrics.rs`).
    pub metrics_detail: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub max_mapped_guest_memory_bytes: Option<u64>,
    pub pool_threads: Option<usize>,
    pub image_lock_wait_ms: Option<u64>,
}

/// One of `words`.
fn choice(key: &str, v: &Value, words: &[&str]) -> Result<String, SpecError> {
    let text = v.text(key)?;
    if !words.contains(&text.as_str()) {
        return err(format!("{key}={text}: one of {}", words.join(", ")));
    }
    Ok(text)
}

/// The words of `metrics-detail` (`control::metrics::Detail`): one set of series per export,
/// or per queue with the per-stage histograms.
pub const METRICS_DETAILS: &[&str] = &["export", "queue"];
pub const LOG_LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
pub const LOG_FORMATS: &[&str] = &["text", "json"];

impl Options for DaemonSettings {
    const KEYS: &'static [Key<DaemonSettings>] = &[
        Key {
            name: "control",
            aliases: &[],
            kind: Kind::Path,
            usage: "control=PATH",
            help: "the control socket (JSON lines; mode 0600).",
            set: |s, v| {
                s.control = Some(v.path("control")?);
                Ok(())
            },
            get: |s| s.control.as_ref().map(|p| Value::Str(p.display().to_string())),
        },
        Key {
            name: "metrics",
            aliases: &[],
            kind: Kind::Text,
            usage: "metrics=ADDR:PORT",
            help: "serve Prometheus metrics at http://ADDR:PORT/metrics.",
            set: |s, v| {
                s.metrics = Some(v.text("metrics")?);
                Ok(())
            },
            get: |s| s.metrics.clone().map(Value::Str),
        },
        Key {
            name: "metrics-detail",
            aliases: &[],
            kind: Kind::Choice(METRICS_DETAILS),
            usage: "metrics-detail=DETAIL",
            help: "export (default: one set of series per export, queues summed) or queue (per queue, with every latency bucket and the per-stage histograms).",
            set: |s, v| {
                let words = METRICS_DETAILS;
                s.metrics_detail = Some(choice("metrics-detail", v, words)?);
                Ok(())
            },
            get: |s| s.metrics_detail.clone().map(Value::Str),
        },
        Key {
            name: "log-level",
            aliases: &[],
            kind: Kind::Choice(LOG_LEVELS),
            usage: "log-level=LEVEL",
            help: "error, warn, info (default), debug or trace.",
            set: |s, v| {
                s.log_level = Some(choice("log-level", v, LOG_LEVELS)?);
                Ok(())
            },
            get: |s| s.log_level.clone().map(Value::Str),
        },
        Key {
            name: "log-format",
            aliases: &[],
            kind: Kind::Choice(LOG_FORMATS),
            usage: "log-format=FORMAT",
            help: "text (default) or json.",
            set: |s, v| {
                s.log_format = Some(choice("log-format", v, LOG_FORMATS)?);
                Ok(())
            },
            get: |s| s.log_format.clone().map(Value::Str),
        },
        Key {
            name: "max-mapped-guest-memory",
            aliases: &[],
            kind: Kind::Size,
            usage: "max-mapped-guest-memory=SIZE",
            help: "the most guest memory the daemon maps for all its frontends (default 64T).",
            set: |s, v| {
                let bytes = v.size("max-mapped-guest-memory")?;
                if bytes == 0 {
                    return err("max-mapped-guest-memory=0: guests need some memory");
                }
                s.max_mapped_guest_memory_bytes = Some(bytes);
                Ok(())
            },
            get: |s| s.max_mapped_guest_memory_bytes.map(Value::Int),
        },
        Key {
            name: "pool-threads",
            aliases: &[],
            kind: Kind::Number,
            usage: "pool-threads=N",
            help: "threads of the shared I/O thread pool (default: one per CPU).",
            set: |s, v| {
                let n: usize = v.number("pool-threads")?;
                if n == 0 || n > MAX_POOL_THREADS {
                    return err(format!("pool-threads={n}: from 1 to {MAX_POOL_THREADS}"));
                }
                s.pool_threads = Some(n);
                Ok(())
            },
            get: |s| s.pool_threads.map(|n| Value::Int(n as u64)),
        },
        Key {
            name: "image-lock-wait-ms",
            aliases: &[],
            kind: Kind::Number,
            usage: "image-lock-wait-ms=MS",
            help: "how long to wait for an image another process has locked (default 5000).",
            set: |s, v| {
                let ms: u64 = v.number("image-lock-wait-ms")?;
                let max = crate::engine::lock::MAX_LOCK_WAIT_MS;
                if ms > max {
                    return err(format!("image-lock-wait-ms={ms}: at most {max}"));
                }
                s.image_lock_wait_ms = Some(ms);
                Ok(())
            },
            get: |s| s.image_lock_wait_ms.map(Value::Int),
        },
    ];
}

impl DaemonSettings {
    /// `other`'s settings where it has them, ours elsewhere (the command line over the file).
    pub fn overridden_by(&self, other: &DaemonSettings) -> DaemonSettings {
        DaemonSettings {
            control: other.control.clone().or_else(|| self.control.clone()),
            metrics: other.metrics.clone().or_else(|| self.metrics.clone()),
            metrics_detail: other.metrics_detail.clone().or_else(|| self.metrics_detail.clone()),
            log_level: other.log_level.clone().or_else(|| self.log_level.clone()),
            log_format: other.log_format.clone().or_else(|| self.log_format.clone()),
            max_mapped_guest_memory_bytes: other
                .max_mapped_guest_memory_bytes
                .or(self.max_mapped_guest_memory_bytes),
            pool_threads: other.pool_threads.or(self.pool_threads),
            image_lock_wait_ms: other.image_lock_wait_ms.or(self.image_lock_wait_ms),
        }
    }
}

/// A problem of a file, where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based; 0 when the file has no position for it.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
    }
}

/// Every problem of a file, one per line, each after the file's name.
pub fn describe(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("{}:{}:{}: {}", path.display(), p.line, p.column, p.message))
        .collect();
    lines.join("\n")
}

fn table_of(pairs: Vec<(&'static str, Value)>) -> toml::Table {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_toml())).collect()
}

/// The running configuration as the file `parse` reads: loading it starts the same daemon.
pub fn render(
    settings: &DaemonSettings,
    iothreads: &[IoThreadConfig],
    exports: &[ExportConfig],
    nbd_server: Option<&NbdServerOptions>,
) -> String {
    let mut top = table_of(settings.pairs());
    if let Some(nbd) = nbd_server {
        top.insert("nbd-server".into(), toml::Value::Table(table_of(nbd.pairs())));
    }
    let list = |tables: Vec<toml::Table>| {
        (!tables.is_empty())
            .then(|| toml::Value::Array(tables.into_iter().map(toml::Value::Table).collect()))
    };
    if let Some(l) = list(iothreads.iter().map(|t| table_of(t.pairs())).collect()) {
        top.insert("iothread".into(), l);
    }
    if let Some(l) = list(exports.iter().map(|e| table_of(e.to_pairs())).collect()) {
        top.insert("export".into(), l);
    }
    format!(
        "# The running configuration of blkplane (dump-config); blkplane serve --config FILE\n# reads it back.\n{}",
        toml::to_string(&top).unwrap_or_default()
    )
}

/// Reads and checks the file at `path`; every problem, each with the file's name, line and
/// column, one per line.
pub fn load(path: &Path) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|problems| describe(path, &problems))
}

/// Where a byte offset of `text` is: line and column, 1-based.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Reads a whole file; every problem it has, in the order of the file.
pub fn parse(text: &str) -> Result<ConfigFile, Vec<Problem>> {
    let at = |span: Option<std::ops::Range<usize>>, message: String| {
        let (line, column) = span.map_or((0, 0), |s| position(text, s.start));
        Problem { line, column, message }
    };
    let doc = ImDocument::parse(text).map_err(|e| vec![at(e.span(), e.message().to_string())])?;
    let mut cfg = ConfigFile::default();
    let mut problems = Vec::new();
    for (key, item) in doc.as_table().iter() {
        let span = doc.as_table().key(key).and_then(|k| k.span());
        match key {
            "iothread" | "export" => {
                let Some(tables) = item.as_array_of_tables() else {
                    problems
                        .push(at(span, format!("'{key}' must be a list of tables ([[{key}]])")));
                    continue;
                };
                for (i, table) in tables.iter().enumerate() {
                    let read = if key == "export" {
                        read_export(table).map(|e| cfg.exports.push(e))
                    } else {
                        read_iothread(table).map(|t| cfg.iothreads.push(t))
                    };
                    if let Err(errors) = read {
                        problems.extend(errors.into_iter().map(|(span, e)| {
                            let span = span.or_else(|| table.span());
                            at(span, format!("{key} {}: {e}", i + 1))
                        }));
                    }
                }
            }
            "nbd-server" => {
                let Some(table) = item.as_table() else {
                    problems.push(at(span, "'nbd-server' must be a table ([nbd-server])".into()));
                    continue;
                };
                match pairs_of(table).map_err(|mut p| p.remove(0)) {
                    Ok(pairs) => {
                        let plain = pairs.into_iter().map(|(k, v, _, _)| (k, v)).collect();
                        match NbdServerOptions::from_pairs(plain) {
                            Ok(o) => cfg.nbd_server = Some(o),
                            Err(e) => {
                                problems.push(at(table.span().or(span), format!("nbd-server: {e}")))
                            }
                        }
                    }
                    Err((s, e)) => problems.push(at(s.or(span), format!("nbd-server: {e}"))),
                }
            }
            _ => match value_of(key, item) {
                Err(e) => problems.push(at(item.span().or(span), e.0)),
                Ok(value) => match cfg.settings.set_key(key, &value) {
                    Some((_, Ok(()))) => {}
                    Some((_, Err(e))) => problems.push(at(item.span().or(span), e.0)),
                    None => problems.push(at(
                        span,
                        format!(
                            "unknown key '{key}' (keys: {}, iothread, export, nbd-server)",
                            settings_keys()
                        ),
                    )),
                },
            },
        }
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        problems.sort_by_key(|p| (p.line, p.column));
        Err(problems)
    }
}

fn settings_keys() -> String {
    DaemonSettings::infos().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

type Located = Vec<(Option<std::ops::Range<usize>>, SpecError)>;

type Span = Option<std::ops::Range<usize>>;

/// A table's keys and values, typed as the file gives them, with where each key and value is.
fn pairs_of(t: &Table) -> Result<Vec<(String, Value, Span, Span)>, Located> {
    let mut pairs = Vec::with_capacity(t.len());
    let mut problems = Vec::new();
    for (k, item) in t.iter() {
        let key_span = t.key(k).and_then(|k| k.span());
        match value_of(k, item) {
            Ok(v) => pairs.push((k.to_string(), v, key_span, item.span())),
            Err(e) => problems.push((item.span(), e)),
        }
    }
    if problems.is_empty() {
        Ok(pairs)
    } else {
        Err(problems)
    }
}

fn read_export(t: &Table) -> Result<ExportConfig, Located> {
    let pairs = pairs_of(t)?;
    let spans: Vec<(Span, Span)> =
        pairs.iter().map(|(_, _, k, v)| (k.clone(), v.clone())).collect();
    ExportConfig::read(pairs.into_iter().map(|(k, v, _, _)| (k, v))).map_err(|problems| {
        let span = |at| match at {
            At::Key(i) => spans[i].0.clone(),
            At::Value(i) => spans[i].1.clone(),
            At::Whole => None,
        };
        problems.into_iter().map(|(at, e)| (span(at), e)).collect()
    })
}

fn read_iothread(t: &Table) -> Result<IoThreadConfig, Located> {
    let pairs = pairs_of(t)?;
    let plain: Vec<(String, Value)> =
        pairs.iter().map(|(k, v, _, _)| (k.clone(), v.clone())).collect();
    IoThreadConfig::from_pairs(&plain).map_err(|e| vec![(None, e)])
}

/// A TOML value as a key's [`Value`]: strings, non-negative integers and booleans.
fn value_of(key: &str, item: &Item) -> Result<Value, SpecError> {
    let v = item.as_value();
    if let Some(s) = v.and_then(|v| v.as_str()) {
        return Ok(Value::Str(s.to_string()));
    }
    if let Some(b) = v.and_then(|v| v.as_bool()) {
        return Ok(Value::Bool(b));
    }
    match v.and_then(|v| v.as_integer()).map(u64::try_from) {
        Some(Ok(n)) => Ok(Value::Int(n)),
        Some(Err(_)) => err(format!("'{key}' must not be negative")),
        None => err(format!("'{key}' must be a string, integer or boolean")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::BackendSpec;

    #[test]
    fn a_full_file() {
        let cfg = parse(
            r#"
            control = "/run/c.sock"
            metrics = "127.0.0.1:9180"
            [[export]]
            id = "vm1"
            socket = "/run/vm1.sock"
            image = "/img/a,b.raw"
            queues = 2
            readonly = true
            [[export]]
            socket = "/run/n.sock"
            engine = "null"
            size = "1G"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.settings.control, Some(PathBuf::from("/run/c.sock")));
        assert_eq!(cfg.settings.metrics.as_deref(), Some("127.0.0.1:9180"));
        assert_eq!(cfg.exports.len(), 2);
        assert_eq!(cfg.exports[0].id.as_deref(), Some("vm1"));
        assert_eq!(cfg.exports[0].disk.backend, BackendSpec::Image("/img/a,b.raw".into()));
        assert!(cfg.exports[0].disk.readonly);
        assert_eq!(cfg.exports[0].disk.queues, Some(2));
        assert_eq!(cfg.exports[1].disk.backend, BackendSpec::Null { size_bytes: 1 << 30 });
    }

    fn messages(text: &str) -> Vec<String> {
        parse(text).unwrap_err().iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn every_problem_is_named_with_its_line_and_column() {
        assert_eq!(
            messages("colour = 1"),
            [format!(
                "line 1, column 1: unknown key 'colour' (keys: {}, iothread, export, nbd-server)",
                settings_keys()
            )]
        );
        assert_eq!(
            messages("control = true"),
            ["line 1, column 11: control: expected a string, not true"]
        );
        assert_eq!(
            messages("[[export]]\nsocket = \"/s\"\nqueues = 0\nimage = \"/i\"\ncache = \"fast\"\n"),
            [
                "line 3, column 10: export 1: queues=0: must be 1 to 256",
                "line 5, column 9: export 1: unknown cache mode 'fast' (one of none, directsync, writeback, writethrough, unsafe)",
            ]
        );
        assert_eq!(
            messages("[[export]]\nsocket = [1]"),
            ["line 2, column 10: export 1: 'socket' must be a string, integer or boolean"]
        );
        assert_eq!(
            messages("[[export]]\nsocket = \"/s\"")[0],
            "line 1, column 1: export 1: missing image=PATH (or engine=null,size=BYTES)"
        );
        assert_eq!(messages("this is not toml")[0].split(':').next(), Some("line 1, column 6"));
    }
}
