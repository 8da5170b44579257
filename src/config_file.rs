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
//! ```
//!
//! `pool-threads = N` sizes the shared pool (default: the CPUs the process may use).
//!
//! Each export table is turned into an --export spec and parsed by the same code.

use std::path::{Path, PathBuf};

use crate::export::{spec_from_pairs, ExportConfig, SpecValue};
use crate::iothread::registry::{IoThreadConfig, MAX_POOL_THREADS};

#[derive(Debug, Default)]
pub struct ConfigFile {
    pub exports: Vec<ExportConfig>,
    pub control: Option<PathBuf>,
    pub metrics: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub max_mapped_guest_memory: Option<String>,
    pub iothreads: Vec<IoThreadConfig>,
    pub pool_threads: Option<usize>,
    pub image_lock_wait_ms: Option<u64>,
}

/// Reads and validates `path`. Errors name the file and the problem in one line.
/// The daemon-wide settings in force, as the file's top-level keys name them (for
/// `dump-config`; exports and I/O threads come from the running daemon).
#[derive(Clone, Debug, Default)]
pub struct DaemonSettings {
    pub control: Option<PathBuf>,
    pub metrics: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub max_mapped_guest_memory: Option<String>,
    pub pool_threads: Option<usize>,
    pub image_lock_wait_ms: Option<u64>,
}

fn table_of(pairs: Vec<(&'static str, SpecValue)>) -> toml::Table {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_toml())).collect()
}

/// The running configuration as the file `parse` reads: loading it starts the same daemon.
pub fn render(
    settings: &DaemonSettings,
    iothreads: &[IoThreadConfig],
    exports: &[ExportConfig],
) -> String {
    let mut top = toml::Table::new();
    let mut put = |key: &str, value: Option<toml::Value>| {
        if let Some(v) = value {
            top.insert(key.to_string(), v);
        }
    };
    let string = |s: &str| toml::Value::String(s.to_string());
    put("control", settings.control.as_ref().map(|p| string(&p.display().to_string())));
    put("metrics", settings.metrics.as_deref().map(string));
    put("log-level", settings.log_level.as_deref().map(string));
    put("log-format", settings.log_format.as_deref().map(string));
    put("max-mapped-guest-memory", settings.max_mapped_guest_memory.as_deref().map(string));
    put("pool-threads", settings.pool_threads.map(|n| SpecValue::Int(n as u64).to_toml()));
    put("image-lock-wait-ms", settings.image_lock_wait_ms.map(|n| SpecValue::Int(n).to_toml()));
    let list = |tables: Vec<toml::Table>| {
        (!tables.is_empty())
            .then(|| toml::Value::Array(tables.into_iter().map(toml::Value::Table).collect()))
    };
    put("iothread", list(iothreads.iter().map(|t| table_of(t.to_pairs())).collect()));
    put("export", list(exports.iter().map(|e| table_of(e.to_pairs())).collect()));
    format!(
        "# The running configuration of blkplane (dump-config); blkplane serve --config FILE\n# reads it back.\n{}",
        toml::to_string(&top).unwrap_or_default()
    )
}

pub fn load(path: &Path) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse(text: &str) -> Result<ConfigFile, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.message().to_string())?;
    let mut cfg = ConfigFile::default();
    for (key, value) in &table {
        match key.as_str() {
            "control" => cfg.control = Some(PathBuf::from(string(key, value)?)),
            "metrics" => cfg.metrics = Some(string(key, value)?),
            "log-level" => cfg.log_level = Some(string(key, value)?),
            "log-format" => cfg.log_format = Some(string(key, value)?),
            "max-mapped-guest-memory" => cfg.max_mapped_guest_memory = Some(string(key, value)?),
            "image-lock-wait-ms" => {
                let ms = value.as_integer().and_then(|n| u64::try_from(n).ok());
                cfg.image_lock_wait_ms =
                    Some(ms.ok_or("'image-lock-wait-ms' must be a number of milliseconds")?);
            }
            "pool-threads" => {
                let n = value.as_integer().and_then(|n| usize::try_from(n).ok());
                cfg.pool_threads = Some(n.filter(|n| (1..=MAX_POOL_THREADS).contains(n)).ok_or(
                    format!("'pool-threads' must be a number from 1 to {MAX_POOL_THREADS}"),
                )?);
            }
            "iothread" => {
                let list =
                    value.as_array().ok_or("'iothread' must be a list of tables ([[iothread]])")?;
                for (i, item) in list.iter().enumerate() {
                    let t = item.as_table().ok_or(format!("iothread {}: not a table", i + 1))?;
                    let pairs = pairs_of(t).map_err(|e| format!("iothread {}: {e}", i + 1))?;
                    cfg.iothreads.push(
                        IoThreadConfig::from_pairs(&pairs)
                            .map_err(|e| format!("iothread {}: {e}", i + 1))?,
                    );
                }
            }
            "export" => {
                let list =
                    value.as_array().ok_or("'export' must be a list of tables ([[export]])")?;
                for (i, item) in list.iter().enumerate() {
                    let t = item.as_table().ok_or(format!("export {}: not a table", i + 1))?;
                    let spec = spec_of(t).map_err(|e| format!("export {}: {e}", i + 1))?;
                    cfg.exports.push(
                        ExportConfig::parse(&spec).map_err(|e| format!("export {}: {e}", i + 1))?,
                    );
                }
            }
            other => {
                return Err(format!(
                    "unknown key '{other}' (keys: control, metrics, log-level, log-format, max-mapped-guest-memory, pool-threads, image-lock-wait-ms, iothread, export)"
                ))
            }
        }
    }
    Ok(cfg)
}

fn string(key: &str, v: &toml::Value) -> Result<String, String> {
    v.as_str().map(str::to_string).ok_or_else(|| format!("'{key}' must be a string"))
}

fn spec_of(t: &toml::Table) -> Result<String, String> {
    let pairs = pairs_of(t)?;
    spec_from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.clone()))).map_err(|e| e.0)
}

/// A table's keys and values as the key/value pairs of a command-line spec.
fn pairs_of(t: &toml::Table) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::with_capacity(t.len());
    for (k, v) in t {
        let value = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Boolean(b) => if *b { "on" } else { "off" }.to_string(),
            _ => return Err(format!("'{k}' must be a string, integer or boolean")),
        };
        pairs.push((k.clone(), value));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::BackendSpec;

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
        assert_eq!(cfg.control, Some(PathBuf::from("/run/c.sock")));
        assert_eq!(cfg.metrics.as_deref(), Some("127.0.0.1:9180"));
        assert_eq!(cfg.exports.len(), 2);
        assert_eq!(cfg.exports[0].id.as_deref(), Some("vm1"));
        assert_eq!(cfg.exports[0].backend, BackendSpec::Image("/img/a,b.raw".into()));
        assert!(cfg.exports[0].readonly);
        assert_eq!(cfg.exports[0].queues, 2);
        assert_eq!(cfg.exports[1].backend, BackendSpec::Null { size_bytes: 1 << 30 });
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            parse("colour = 1").unwrap_err(),
            "unknown key 'colour' (keys: control, metrics, log-level, log-format, max-mapped-guest-memory, pool-threads, image-lock-wait-ms, iothread, export)"
        );
        assert_eq!(parse("control = 5").unwrap_err(), "'control' must be a string");
        assert!(parse("[[export]]\nsocket = \"/s\"\nqueues = 0")
            .unwrap_err()
            .starts_with("export 1: queues=0"));
        assert!(parse("[[export]]\nsocket = [1]")
            .unwrap_err()
            .starts_with("export 1: 'socket' must be"));
        assert!(parse("this is not toml").is_err());
    }
}
