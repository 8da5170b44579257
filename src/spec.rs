//! The key=value language every way into blkplane speaks (`--export`, `--iothread`, the
//! config file's tables, the control socket's arguments), and the key tables each layer
//! declares its options with. A leaf: it imports nothing of the crate.
//!
//! A layer owns its options as one struct and one table of [`Key`] rows (name, aliases,
//! help, how to set it from a [`Value`], how to print it); `export.rs` composes the tables.
//! Values arrive typed ([`Value`]): a config file's integer or a control request's boolean
//! is never turned into text to be parsed again, and text from the command line is read by
//! the same row.

use std::fmt;
use std::path::{Path, PathBuf};

/// A bad key or value: one line naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(pub String);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

pub fn err<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

/// A value as it came: text (the command line, a TOML or JSON string), a whole number or a
/// boolean (TOML and JSON). Each key reads the forms that mean the same to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(u64),
    Bool(bool),
}

impl fmt::Display for Value {
    /// As `--export` writes it (booleans as on/off).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => f.write_str(s),
            Value::Int(n) => write!(f, "{n}"),
            Value::Bool(b) => f.write_str(if *b { "on" } else { "off" }),
        }
    }
}

impl Value {
    /// The text of a value where text is meant. A number is taken where its digits are the
    /// text (JSON `123` for `"123"`); a boolean is not.
    pub fn text(&self, key: &str) -> Result<String, SpecError> {
        match self {
            Value::Str(s) => Ok(s.clone()),
            Value::Int(n) => Ok(n.to_string()),
            Value::Bool(b) => err(format!("{key}: expected a string, not {b}")),
        }
    }

    /// on/off, true/false, yes/no, 1/0, or a boolean.
    pub fn bool(&self, key: &str) -> Result<bool, SpecError> {
        match self {
            Value::Bool(b) => Ok(*b),
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            Value::Str(s) => match s.as_str() {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => err(format!("{key}={s}: expected on or off")),
            },
            Value::Int(n) => err(format!("{key}={n}: expected on or off")),
        }
    }

    /// A whole number: an integer, or its digits as text.
    pub fn number<T: TryFrom<u64> + std::str::FromStr>(&self, key: &str) -> Result<T, SpecError> {
        let n = match self {
            Value::Int(n) => T::try_from(*n).ok(),
            Value::Str(s) => s.parse().ok(),
            Value::Bool(_) => None,
        };
        n.ok_or_else(|| SpecError(format!("{key}={self}: not a number")))
    }

    /// A byte count: an integer, or text with an optional binary suffix (64K, 1G).
    pub fn size(&self, key: &str) -> Result<u64, SpecError> {
        match self {
            Value::Int(n) => Ok(*n),
            Value::Str(s) => parse_size(s).map_err(|e| SpecError(format!("{key}: {e}"))),
            Value::Bool(_) => err(format!("{key}={self}: not a size (e.g. 1048576, 64K, 1G)")),
        }
    }

    /// A path, made absolute against the working directory of the process reading it (the
    /// command that named it: `serve` for its command line and file, `ctl` for its requests).
    pub fn path(&self, key: &str) -> Result<PathBuf, SpecError> {
        let text = self.text(key)?;
        if text.is_empty() {
            return err(format!("{key}= is empty"));
        }
        std::path::absolute(Path::new(&text)).map_err(|e| SpecError(format!("{key}={text}: {e}")))
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Str(s) => s.as_str().into(),
            Value::Int(n) => (*n).into(),
            Value::Bool(b) => (*b).into(),
        }
    }

    pub fn to_toml(&self) -> toml::Value {
        match self {
            Value::Str(s) => toml::Value::String(s.clone()),
            // Sizes up to 2^63 fit TOML's signed integers; larger are kept as text, which
            // the size keys read back the same.
            Value::Int(n) => i64::try_from(*n)
                .map(toml::Value::Integer)
                .unwrap_or_else(|_| toml::Value::String(n.to_string())),
            Value::Bool(b) => toml::Value::Boolean(*b),
        }
    }

    /// A JSON value of a control request; objects, arrays, null and fractions are refused.
    pub fn from_json(key: &str, v: &serde_json::Value) -> Result<Value, SpecError> {
        match v {
            serde_json::Value::String(s) => Ok(Value::Str(s.clone())),
            serde_json::Value::Bool(b) => Ok(Value::Bool(*b)),
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(n) => Ok(Value::Int(n)),
                None => err(format!("'{key}' must be a whole number, not {n}")),
            },
            other => err(format!("'{key}' must be a string, number or boolean, not {other}")),
        }
    }
}

/// What kind of value a key takes: for help texts, completions and for clients that must
/// make paths absolute before they send them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Path,
    Number,
    Size,
    Bool,
    /// One of the words `help` lists.
    Choice(&'static [&'static str]),
}

/// One key of a layer's options `T`.
pub struct Key<T> {
    pub name: &'static str,
    /// Other spellings (qemu-storage-daemon's, QEMU's) that mean the same.
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    /// `name=VALUE` as the help shows it, and the help lines; an empty help leaves the key
    /// to the row before it (a family of keys described once).
    pub usage: &'static str,
    pub help: &'static str,
    pub set: fn(&mut T, &Value) -> Result<(), SpecError>,
    /// The value to print (`None`: the key is not shown, as when unset).
    pub get: fn(&T) -> Option<Value>,
}

/// What a row says of itself, whatever options it sets (for help, errors, completions).
#[derive(Clone, Copy, Debug)]
pub struct KeyInfo {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    pub usage: &'static str,
    pub help: &'static str,
}

impl<T> Key<T> {
    /// The same key, setting and printing through another struct that holds `T`'s options
    /// (a layer that composes another's keys).
    pub const fn lifted<U>(
        &self,
        set: fn(&mut U, &Value) -> Result<(), SpecError>,
        get: fn(&U) -> Option<Value>,
    ) -> Key<U> {
        Key {
            name: self.name,
            aliases: self.aliases,
            kind: self.kind,
            usage: self.usage,
            help: self.help,
            set,
            get,
        }
    }

    /// The same key with another help text.
    pub const fn with_help(mut self, help: &'static str) -> Key<T> {
        self.help = help;
        self
    }

    pub fn info(&self) -> KeyInfo {
        KeyInfo {
            name: self.name,
            aliases: self.aliases,
            kind: self.kind,
            usage: self.usage,
            help: self.help,
        }
    }

    pub fn is(&self, key: &str) -> bool {
        self.name == key || self.aliases.contains(&key)
    }
}

/// Sets `key` in `target` if it is one of `rows` (by name or alias): `None` when it is not.
/// Returns the key's own name with the outcome.
pub fn set_in<T>(
    rows: &[Key<T>],
    target: &mut T,
    key: &str,
    value: &Value,
) -> Option<(&'static str, Result<(), SpecError>)> {
    let row = rows.iter().find(|k| k.is(key))?;
    Some((row.name, (row.set)(target, value)))
}

/// Every key of `rows` that has a value to print in `target`, in table order.
pub fn pairs_of<T>(rows: &[Key<T>], target: &T) -> Vec<(&'static str, Value)> {
    rows.iter().filter_map(|k| (k.get)(target).map(|v| (k.name, v))).collect()
}

/// A layer's options with their table of keys.
pub trait Options: Sized + 'static {
    const KEYS: &'static [Key<Self>];

    /// Sets `key` if it is one of this table's: see [`set_in`].
    fn set_key(
        &mut self,
        key: &str,
        value: &Value,
    ) -> Option<(&'static str, Result<(), SpecError>)> {
        set_in(Self::KEYS, self, key, value)
    }

    /// Every key that has a value to print, in table order.
    fn pairs(&self) -> Vec<(&'static str, Value)> {
        pairs_of(Self::KEYS, self)
    }

    fn infos() -> impl Iterator<Item = KeyInfo> {
        Self::KEYS.iter().map(Key::info)
    }
}

/// The help text of some keys: `usage` padded to a column, then the help lines.
pub fn help_text(keys: impl IntoIterator<Item = KeyInfo>) -> String {
    const COLUMN: usize = 21;
    let mut out = String::new();
    for k in keys.into_iter().filter(|k| !k.help.is_empty()) {
        let mut lines = k.help.lines();
        if k.usage.len() + 2 < COLUMN {
            let first = lines.next().unwrap_or("");
            out.push_str(&format!("  {:<w$}{first}\n", k.usage, w = COLUMN - 2));
        } else {
            out.push_str(&format!("  {}\n", k.usage));
        }
        for line in lines {
            out.push_str(&format!("{:w$}{line}\n", "", w = COLUMN));
        }
    }
    out
}

/// Parses a byte count with an optional binary suffix: 4096, 64K, 1M, 10G, 1T.
pub fn parse_size(s: &str) -> Result<u64, SpecError> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        Some((i, 't' | 'T')) => (&s[..i], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| SpecError(format!("'{s}' is not a size (e.g. 1048576, 64K, 1G)")))?;
    n.checked_mul(1 << shift).ok_or_else(|| SpecError(format!("size '{s}' is too large")))
}

/// Longest export id or I/O thread name.
pub const MAX_NAME_BYTES: usize = 64;

/// Whether `s` can name an export, an I/O thread or a throttle group: 1 to 64 ASCII letters,
/// digits, `-`, `_` and `.` (safe in log lines, metric labels and file names alike).
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A name (see [`is_name`]) from `value`, or the error for `key`.
pub fn name(key: &str, value: &Value) -> Result<String, SpecError> {
    let text = value.text(key)?;
    if !is_name(&text) {
        return err(format!("{key}={text}: 1 to 64 letters, digits, '-', '_' or '.'"));
    }
    Ok(text)
}

/// Largest CPU number a list may name (the kernel's cpu_set_t).
pub const MAX_CPUS: usize = 1024;

/// Parses a CPU list: `0`, `0,2`, `0-3`, `0-1,4` (syntax only; which CPUs the process may
/// use is the thread layer's check).
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, SpecError> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let bad = || SpecError(format!("'{part}' is not a CPU number or range"));
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => {
                (a.parse::<usize>().map_err(|_| bad())?, b.parse::<usize>().map_err(|_| bad())?)
            }
            None => {
                let c = part.parse::<usize>().map_err(|_| bad())?;
                (c, c)
            }
        };
        if a > b || b >= MAX_CPUS {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    Ok(cpus)
}

/// Writes a CPU list the way `parse_cpu_list` reads it: `0-3,6`.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    parts.join(",")
}

/// Splits `k=v,k=v` into pairs; `,,` stands for a literal comma inside a value. `keys` names
/// the keys the spec may have, for the error message.
pub fn split_pairs(spec: &str, keys: &str) -> Result<Vec<(String, Value)>, SpecError> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
        .into_iter()
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), Value::Str(v.to_string()))),
            _ => err(format!("'{item}' is not key=value (keys: {keys})")),
        })
        .collect()
}

/// Writes pairs as a spec `split_pairs` reads back (`,` in a value doubled).
#[cfg(test)]
pub fn join_pairs<'a>(pairs: impl IntoIterator<Item = &'a (&'static str, Value)>) -> String {
    let parts: Vec<String> = pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={}", v.to_string().replace(',', ",,")))
        .collect();
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(
            parse_size("lots").unwrap_err().0,
            "'lots' is not a size (e.g. 1048576, 64K, 1G)"
        );
        assert_eq!(parse_size("99999999999T").unwrap_err().0, "size '99999999999T' is too large");
    }

    #[test]
    fn values_keep_their_type_and_text() {
        assert_eq!(Value::Str("007".into()).text("id").unwrap(), "007");
        assert_eq!(Value::Int(123).text("id").unwrap(), "123");
        assert_eq!(Value::Bool(true).text("id").unwrap_err().0, "id: expected a string, not true");
        assert_eq!(Value::Str("0012".into()).number::<u16>("queues").unwrap(), 12);
        assert_eq!(
            Value::Int(70000).number::<u16>("queues").unwrap_err().0,
            "queues=70000: not a number"
        );
        assert!(Value::Str("on".into()).bool("readonly").unwrap());
        assert!(!Value::Bool(false).bool("readonly").unwrap());
        assert_eq!(
            Value::Str("maybe".into()).bool("readonly").unwrap_err().0,
            "readonly=maybe: expected on or off"
        );
        assert_eq!(Value::Int(1 << 30).size("size").unwrap(), 1 << 30);
        assert_eq!(Value::Str("1G".into()).size("size").unwrap(), 1 << 30);
    }

    #[test]
    fn relative_paths_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(Value::Str("vm1.sock".into()).path("socket").unwrap(), cwd.join("vm1.sock"));
        assert_eq!(Value::Str("/run/a".into()).path("socket").unwrap(), PathBuf::from("/run/a"));
        assert_eq!(Value::Str(String::new()).path("socket").unwrap_err().0, "socket= is empty");
    }

    #[test]
    fn pairs_split_and_join_with_doubled_commas() {
        let pairs = split_pairs("a=1,b=x,,y,,", "a, b").unwrap();
        assert_eq!(
            pairs,
            [("a".into(), Value::Str("1".into())), ("b".into(), Value::Str("x,y,".into()))]
        );
        let printed = [("a", Value::Int(1)), ("b", Value::Str("x,y,".into()))];
        assert_eq!(join_pairs(&printed), "a=1,b=x,,y,,");
        assert_eq!(split_pairs("a", "a, b").unwrap_err().0, "'a' is not key=value (keys: a, b)");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), [0, 1, 2, 5]);
        assert_eq!(format_cpu_list(&[0, 1, 2, 5]), "0-2,5");
        assert_eq!(parse_cpu_list("3-1").unwrap_err().0, "'3-1' is not a CPU number or range");
    }
}
