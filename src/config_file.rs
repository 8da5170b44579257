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
//! cpus = "2-3"                      # the I/O threads of this export
//! ```
//!
//! Each export table is turned into an --export spec and parsed by the same code.

use std::path::{Path, PathBuf};

use crate::export::{spec_from_pairs, ExportConfig, EXPORT_KEYS};

#[derive(Debug, Default)]
pub struct ConfigFile {
    pub exports: Vec<ExportConfig>,
    pub control: Option<PathBuf>,
    pub metrics: Option<String>,
    pub log_level: Option<String>,
    pub max_mapped_guest_memory: Option<String>,
}

/// Reads and validates `path`. Errors name the file and the problem in one line.
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
            "max-mapped-guest-memory" => cfg.max_mapped_guest_memory = Some(string(key, value)?),
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
                    "unknown key '{other}' (keys: control, metrics, log-level, max-mapped-guest-memory, export)"
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
    let mut pairs = Vec::with_capacity(t.len());
    for (k, v) in t {
        let value = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Boolean(b) => if *b { "on" } else { "off" }.to_string(),
            _ => {
                return Err(format!(
                    "'{k}' must be a string, integer or boolean (keys: {EXPORT_KEYS})"
                ))
            }
        };
        pairs.push((k.as_str(), value));
    }
    spec_from_pairs(pairs).map_err(|e| e.0)
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
            "unknown key 'colour' (keys: control, metrics, log-level, max-mapped-guest-memory, export)"
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
