//! The limits of an export or a throttle group as the operator writes them, in QEMU's and
//! libvirt's vocabulary: `iops-total`, `iops-read`, `iops-write`, `bps-total`, `bps-read`,
//! `bps-write`, each with a `-max` burst rate and a `-max-length` (seconds the burst may be
//! sustained), and `iops-size` (a request larger than this counts as several). Checked as
//! QEMU checks them, with the same meaning, so that a VM's limits move between the two.

use crate::spec::{self, Key, Kind, Options, SpecError, Value};

/// Largest value any limit key takes (QEMU's THROTTLE_VALUE_MAX).
pub const MAX_LIMIT_VALUE: u64 = 1_000_000_000_000_000;
/// Longest `-max-length`, in seconds: a day.
pub const MAX_BURST_LENGTH_S: u64 = 86_400;
/// Largest `iops-size`: a request counts as at least one operation per this many bytes.
pub const MAX_IOPS_SIZE_BYTES: u64 = 1 << 30;

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Iops,
    Bps,
}

/// Which requests a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Total,
    Read,
    Write,
}

/// The six limits, in the order of [`ThrottleConfig::limits`].
pub const LIMITS: [(Unit, Direction); 6] = [
    (Unit::Iops, Direction::Total),
    (Unit::Iops, Direction::Read),
    (Unit::Iops, Direction::Write),
    (Unit::Bps, Direction::Total),
    (Unit::Bps, Direction::Read),
    (Unit::Bps, Direction::Write),
];

/// The keys of each limit of [`LIMITS`]: its average, its burst rate, its burst length.
const KEYS: [[&str; 3]; 6] = [
    ["iops-total", "iops-total-max", "iops-total-max-length"],
    ["iops-read", "iops-read-max", "iops-read-max-length"],
    ["iops-write", "iops-write-max", "iops-write-max-length"],
    ["bps-total", "bps-total-max", "bps-total-max-length"],
    ["bps-read", "bps-read-max", "bps-read-max-length"],
    ["bps-write", "bps-write-max", "bps-write-max-length"],
];

/// The key of limit `i` of [`LIMITS`] (its average).
pub fn limit_key(i: usize) -> &'static str {
    KEYS[i][0]
}

/// Every key this module reads, for help texts and error messages.
pub const THROTTLE_KEYS: &str = "iops-total, iops-read, iops-write, bps-total, bps-read, \
bps-write (each also with -max and -max-length), iops-size, throttle-group";

/// One limit: `avg` units per second on average (0: no limit), bursts up to `max` units per
/// second (0: none beyond the default tenth of a second's worth) for `max_length_s` seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    pub avg: u64,
    pub max: u64,
    /// 0 when not given (then 1 second, QEMU's default).
    pub max_length_s: u64,
}

impl Limit {
    /// Seconds a burst at `max` may last, as configured (QEMU's default 1).
    pub fn burst_length_s(&self) -> u64 {
        if self.max_length_s == 0 {
            1
        } else {
            self.max_length_s
        }
    }
}

/// Every limit of one export or throttle group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Indexed as [`LIMITS`].
    pub limits: [Limit; 6],
    /// A read or write larger than this counts as `bytes / iops_size` operations (0: every
    /// request counts as one).
    pub iops_size: u64,
}

impl ThrottleConfig {
    /// No limit at all: the data path skips throttling entirely.
    pub fn is_unlimited(&self) -> bool {
        self.limits.iter().all(|l| l.avg == 0)
    }

    /// Takes one key if it is a limit key: Ok(true). Ok(false): not a limit key. Values are
    /// whole numbers; byte rates and `iops-size` also take K, M, G, T suffixes (binary).
    pub fn take_key(&mut self, key: &str, value: &Value) -> Result<bool, SpecError> {
        if key == "iops-size" {
            let n = parse_value(key, value, true)?;
            if n > MAX_IOPS_SIZE_BYTES {
                return Err(SpecError(format!("iops-size={value}: at most 1G")));
            }
            self.iops_size = n;
            return Ok(true);
        }
        let Some((i, j)) = KEYS
            .iter()
            .enumerate()
            .find_map(|(i, keys)| keys.iter().position(|k| *k == key).map(|j| (i, j)))
        else {
            return Ok(false);
        };
        let bytes = LIMITS[i].0 == Unit::Bps;
        let limit = &mut self.limits[i];
        match j {
            0 => limit.avg = parse_value(key, value, bytes)?,
            1 => limit.max = parse_value(key, value, bytes)?,
            _ => {
                let n = parse_value(key, value, false)?;
                if !(1..=MAX_BURST_LENGTH_S).contains(&n) {
                    return Err(SpecError(format!(
                        "{key}={value}: 1 to {MAX_BURST_LENGTH_S} seconds"
                    )));
                }
                limit.max_length_s = n;
            }
        }
        Ok(true)
    }

    /// Checks the limits together, with QEMU's rules.
    pub fn check(&self) -> Result<(), SpecError> {
        for unit in [Unit::Iops, Unit::Bps] {
            let of = |d: Direction| {
                let i = LIMITS.iter().position(|&l| l == (unit, d)).unwrap_or(0);
                (limit_key(i), self.limits[i].avg)
            };
            let (total, t) = of(Direction::Total);
            let ((read, r), (write, w)) = (of(Direction::Read), of(Direction::Write));
            if t > 0 && (r > 0 || w > 0) {
                return Err(SpecError(format!(
                    "{total} and {read}/{write} exclude each other (a total limit, or one per direction)"
                )));
            }
        }
        for (i, l) in self.limits.iter().enumerate() {
            let key = limit_key(i);
            if l.max > 0 && l.avg == 0 {
                return Err(SpecError(format!(
                    "{key}-max needs {key} (the average it bursts above)"
                )));
            }
            if l.max > 0 && l.max < l.avg {
                return Err(SpecError(format!(
                    "{key}-max={} is below {key}={}: a burst goes faster than the average",
                    l.max, l.avg
                )));
            }
            if l.max_length_s > 0 && l.max == 0 {
                return Err(SpecError(format!(
                    "{key}-max-length needs {key}-max (the rate the burst goes at)"
                )));
            }
        }
        Ok(())
    }

    /// The keys that give these limits back (only those set), for `list-exports` and
    /// `dump-config`.
    pub fn to_pairs(&self) -> Vec<(&'static str, u64)> {
        let mut pairs = Vec::new();
        for (l, [avg, max, length]) in self.limits.iter().zip(KEYS) {
            if l.avg > 0 {
                pairs.push((avg, l.avg));
            }
            if l.max > 0 {
                pairs.push((max, l.max));
                pairs.push((length, l.burst_length_s()));
            }
        }
        if self.iops_size > 0 {
            pairs.push(("iops-size", self.iops_size));
        }
        pairs
    }

    /// Parses limits given as key/value pairs (`set-throttle`'s arguments), checked.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a Value)>,
    ) -> Result<ThrottleConfig, SpecError> {
        let mut config = ThrottleConfig::default();
        for (k, v) in pairs {
            if !config.take_key(k, v)? {
                return Err(SpecError(format!(
                    "'{k}' is not a limit (limits: {})",
                    THROTTLE_KEYS.trim_end_matches(", throttle-group")
                )));
            }
        }
        config.check()?;
        Ok(config)
    }
}

/// A limit's value: a whole number up to [`MAX_LIMIT_VALUE`]; with `sizes`, K/M/G/T suffixes.
fn parse_value(key: &str, value: &Value, sizes: bool) -> Result<u64, SpecError> {
    let n = match value {
        Value::Int(n) => *n,
        Value::Str(text) if sizes => {
            spec::parse_size(text).map_err(|e| SpecError(format!("{key}={value}: {e}")))?
        }
        _ => value
            .number::<u64>(key)
            .map_err(|_| SpecError(format!("{key}={value}: not a whole number")))?,
    };
    if n > MAX_LIMIT_VALUE {
        return Err(SpecError(format!("{key}={value}: at most {MAX_LIMIT_VALUE}")));
    }
    Ok(n)
}

/// An export's limits and its throttle group: the limit keys of `--export`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitOptions {
    /// The export's own limits, or with `group` the group's, shared with every export that
    /// names it.
    pub throttle: ThrottleConfig,
    pub group: Option<String>,
}

impl LimitOptions {
    fn value_of(&self, key: &str) -> Option<Value> {
        self.throttle.to_pairs().into_iter().find(|(k, _)| *k == key).map(|(_, v)| Value::Int(v))
    }
}

/// One row per limit key; all set through `take_key`, which knows the family.
macro_rules! limit_rows {
    ($(($name:literal, $kind:expr, $usage:literal, $help:literal)),* $(,)?) => {
        &[$(Key {
            name: $name,
            aliases: &[],
            kind: $kind,
            usage: $usage,
            help: $help,
            set: |o, v| o.throttle.take_key($name, v).map(|_| ()),
            get: |o| o.value_of($name),
        }),*]
    };
}

impl Options for LimitOptions {
    const KEYS: &'static [Key<LimitOptions>] = {
        const N: Kind = Kind::Number;
        const S: Kind = Kind::Size;
        const ROWS: &[Key<LimitOptions>] = limit_rows![
            ("iops-total", N, "iops-total=N, iops-read=N, iops-write=N, bps-total=BYTES, bps-read=BYTES, bps-write=BYTES",
             "rate limits, per second (QEMU's meaning). Each also takes -max (the rate\n\
              of a burst) and -max-length (seconds a burst at -max may last, default\n\
              1). A total and a per-direction limit of one unit exclude each other."),
            ("iops-total-max", N, "iops-total-max=N", ""),
            ("iops-total-max-length", N, "iops-total-max-length=SECONDS", ""),
            ("iops-read", N, "iops-read=N", ""),
            ("iops-read-max", N, "iops-read-max=N", ""),
            ("iops-read-max-length", N, "iops-read-max-length=SECONDS", ""),
            ("iops-write", N, "iops-write=N", ""),
            ("iops-write-max", N, "iops-write-max=N", ""),
            ("iops-write-max-length", N, "iops-write-max-length=SECONDS", ""),
            ("bps-total", S, "bps-total=BYTES", ""),
            ("bps-total-max", S, "bps-total-max=BYTES", ""),
            ("bps-total-max-length", N, "bps-total-max-length=SECONDS", ""),
            ("bps-read", S, "bps-read=BYTES", ""),
            ("bps-read-max", S, "bps-read-max=BYTES", ""),
            ("bps-read-max-length", N, "bps-read-max-length=SECONDS", ""),
            ("bps-write", S, "bps-write=BYTES", ""),
            ("bps-write-max", S, "bps-write-max=BYTES", ""),
            ("bps-write-max-length", N, "bps-write-max-length=SECONDS", ""),
            ("iops-size", S, "iops-size=BYTES", "a larger request counts as BYTES-sized operations."),
        ];
        ROWS
    };
}

impl LimitOptions {
    /// The throttle group's key, a row of the export's limit keys (`KEYS` has the limits
    /// alone, which is what `set-throttle` takes).
    pub const GROUP_KEYS: &'static [Key<LimitOptions>] = &[Key {
        name: "throttle-group",
        aliases: &[],
        kind: Kind::Text,
        usage: "throttle-group=NAME",
        help: "exports naming one group share its limits (given by its first export);\n\
               change them live with ctl set-throttle id=ID|group=NAME KEY=VALUE...",
        set: |o, v| {
            o.group = Some(spec::name("throttle-group", v)?);
            Ok(())
        },
        get: |o| o.group.clone().map(Value::Str),
    }];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ThrottleConfig, SpecError> {
        let pairs = spec::split_pairs(text, "").unwrap();
        ThrottleConfig::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v)))
    }

    #[test]
    fn every_key_parses_and_comes_back() {
        let c = parse(
            "iops-read=100,iops-read-max=400,iops-read-max-length=5,iops-write=50,bps-total=10M,bps-total-max=20M,iops-size=8K",
        )
        .unwrap();
        assert_eq!(c.limits[1], Limit { avg: 100, max: 400, max_length_s: 5 });
        assert_eq!(c.limits[2], Limit { avg: 50, max: 0, max_length_s: 0 });
        assert_eq!(c.limits[3], Limit { avg: 10 << 20, max: 20 << 20, max_length_s: 0 });
        assert_eq!(c.iops_size, 8192);
        let pairs = c.to_pairs();
        assert_eq!(
            pairs,
            [
                ("iops-read", 100),
                ("iops-read-max", 400),
                ("iops-read-max-length", 5),
                ("iops-write", 50),
                ("bps-total", 10 << 20),
                ("bps-total-max", 20 << 20),
                ("bps-total-max-length", 1),
                ("iops-size", 8192),
            ]
        );
        let values: Vec<(&str, Value)> = pairs.iter().map(|(k, v)| (*k, Value::Int(*v))).collect();
        let again = ThrottleConfig::from_pairs(values.iter().map(|(k, v)| (*k, v)));
        // An explicit length of 1 is the default's meaning.
        let mut want = c.clone();
        want.limits[3].max_length_s = 1;
        assert_eq!(again.unwrap(), want);
        assert!(parse("").unwrap().is_unlimited());
        assert!(!c.is_unlimited());
    }

    #[test]
    fn bad_limits_name_the_problem() {
        let cases = [
            ("iops-total=100,iops-read=10", "iops-total and iops-read/iops-write exclude each other (a total limit, or one per direction)"),
            ("bps-write=1M,bps-total=2M", "bps-total and bps-read/bps-write exclude each other (a total limit, or one per direction)"),
            ("iops-total-max=100", "iops-total-max needs iops-total (the average it bursts above)"),
            ("iops-total=100,iops-total-max=50", "iops-total-max=50 is below iops-total=100: a burst goes faster than the average"),
            ("iops-total=100,iops-total-max-length=5", "iops-total-max-length needs iops-total-max (the rate the burst goes at)"),
            ("iops-total=100,iops-total-max=200,iops-total-max-length=0", "iops-total-max-length=0: 1 to 86400 seconds"),
            ("iops-total=lots", "iops-total=lots: not a whole number"),
            ("iops-total=1K", "iops-total=1K: not a whole number"),
            ("bps-read=fast", "bps-read=fast: 'fast' is not a size (e.g. 1048576, 64K, 1G)"),
            ("iops-total=1000000000000001", "iops-total=1000000000000001: at most 1000000000000000"),
            ("iops-size=2G", "iops-size=2G: at most 1G"),
            ("iops-totall=5", "'iops-totall' is not a limit (limits: iops-total, iops-read, iops-write, bps-total, bps-read, bps-write (each also with -max and -max-length), iops-size)"),
        ];
        for (spec, want) in cases {
            assert_eq!(parse(spec).unwrap_err().0, want, "{spec}");
        }
    }
}
