//! The limits of one export, or of a throttle group that several exports share, as the I/O
//! threads enforce them: two GCRA buckets per limit (the average with its burst capacity,
//! and the burst rate), all atomics, so that queues on any thread take from them without a
//! lock, and the control socket changes them while they run.
//!
//! Buckets follow QEMU's leaky buckets: without `-max`, an average of `avg` per second with
//! a tenth of a second's worth at once (so that a guest's natural bursts are not cut to
//! single requests); with `-max`, a capacity of `max × max-length` units drained at `avg`,
//! and the burst itself held to `max` per second (a tenth of a second's worth at once).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::config::{Direction, ThrottleConfig, Unit, LIMITS};
use super::gcra::{cost_ns, Gcra};

/// The burst a limit without `-max` allows, and the granularity of a `-max` burst: a tenth
/// of a second's worth (QEMU's).
const DEFAULT_BURST_NS: u64 = 100_000_000;

/// Which direction a request counts in, and how many bytes it moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cost {
    Read(u64),
    Write(u64),
}

/// The shared limits of an export or a group.
pub struct Throttle {
    /// The group's name, or None for an export's own limits.
    pub group: Option<String>,
    /// Per limit of [`LIMITS`]: [average with its capacity, burst rate].
    buckets: [[Gcra; 2]; 6],
    /// Bit `2 i + j` set: bucket `buckets[i][j]` is enforced. 0: no limit at all, and a
    /// request costs one relaxed load.
    active: AtomicU32,
    /// Bytes one operation stands for in the iops buckets (their units are bytes then);
    /// 0: an operation is a unit.
    iops_size: AtomicU64,
    /// Counts the `set`s (see [`Throttle::generation`]).
    generation: AtomicU64,
    /// The configuration in force, for the control side (never read on the data path).
    config: Mutex<ThrottleConfig>,
}

impl Throttle {
    fn new(group: Option<String>, config: &ThrottleConfig) -> Throttle {
        let t = Throttle {
            group,
            buckets: Default::default(),
            active: AtomicU32::new(0),
            iops_size: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            config: Mutex::new(ThrottleConfig::default()),
        };
        t.set(config);
        t
    }

    /// An export's own limits (no group).
    pub fn own(config: &ThrottleConfig) -> Arc<Throttle> {
        Arc::new(Throttle::new(None, config))
    }

    /// Whether any limit is set: the data path asks once per batch of requests.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed) != 0
    }

    pub fn config(&self) -> ThrottleConfig {
        self.config.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `config` in force now, buckets empty (the whole burst available again).
    /// Requests waiting under the old limits ask again within a tenth of a second (their
    /// queue looks that often).
    pub fn set(&self, config: &ThrottleConfig) {
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        // Off while the buckets change, so no request sees half of the new limits.
        self.active.store(0, Ordering::SeqCst);
        let scale = config.iops_size.max(1);
        let mut active = 0;
        for (i, l) in config.limits.iter().enumerate() {
            if l.avg == 0 {
                continue;
            }
            // Iops buckets count bytes when iops-size is set (a request costs at least one
            // operation's worth); the rates scale with it.
            let s = if LIMITS[i].0 == Unit::Iops { scale } else { 1 };
            let (avg, max) = (l.avg.saturating_mul(s), l.max.saturating_mul(s));
            let capacity_ns = if l.max > 0 {
                // max × length operations' worth of time at the average rate.
                cost_ns(l.max.saturating_mul(l.burst_length_s()), l.avg)
            } else {
                DEFAULT_BURST_NS
            };
            self.buckets[i][0].set(avg, capacity_ns);
            active |= 1 << (2 * i);
            if l.max > 0 {
                self.buckets[i][1].set(max, DEFAULT_BURST_NS);
                active |= 1 << (2 * i + 1);
            }
        }
        self.iops_size.store(config.iops_size, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.active.store(active, Ordering::SeqCst);
        *current = config.clone();
    }

    /// Reserves what a request costs at `now_ns` in every limit that counts it, and
    /// returns how many nanoseconds from now it may go (0: at once). The request must then
    /// go at that time, without asking again (unless the limits changed: see
    /// [`Throttle::generation`]).
    pub fn admit(&self, now_ns: u64, cost: Cost) -> u64 {
        let active = self.active.load(Ordering::Relaxed);
        if active == 0 {
            return 0;
        }
        let (direction, bytes) = match cost {
            Cost::Read(b) => (Direction::Read, b),
            Cost::Write(b) => (Direction::Write, b),
        };
        let iops_units = match self.iops_size.load(Ordering::Relaxed) {
            0 => 1,
            size => bytes.max(size),
        };
        let mut wait_ns = 0;
        for (i, &(unit, d)) in LIMITS.iter().enumerate() {
            if d != Direction::Total && d != direction {
                continue;
            }
            let units = if unit == Unit::Iops { iops_units } else { bytes };
            for j in 0..2 {
                if active & (1 << (2 * i + j)) != 0 && units > 0 {
                    wait_ns = wait_ns.max(self.buckets[i][j].reserve(now_ns, units));
                }
            }
        }
        wait_ns
    }

    /// Changes with every `set`: a request that reserved under older limits asks again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

/// Throttle groups by name, alive while an export of theirs is.
static GROUPS: Mutex<Vec<Weak<Throttle>>> = Mutex::new(Vec::new());

/// The limits an export enforces: its own (`group` None), or its group's, made with
/// `config` if the group has no export yet. An export that joins a running group with
/// limits of its own must give the group's limits (they are the group's, changed with
/// `set-throttle`); one that gives none takes the group's.
pub fn join(group: Option<&str>, config: &ThrottleConfig) -> Result<Arc<Throttle>, String> {
    let Some(name) = group else { return Ok(Throttle::own(config)) };
    let mut groups = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
    groups.retain(|g| g.strong_count() > 0);
    if let Some(existing) = find_locked(&groups, name) {
        let theirs = existing.config();
        if !config.is_unlimited() && *config != theirs {
            return Err(format!(
                "throttle-group={name} has limits already ({}), and this export gives others; \
                 leave its limits out to take the group's, or change them with set-throttle",
                describe(&theirs)
            ));
        }
        return Ok(existing);
    }
    let t = Arc::new(Throttle::new(Some(name.to_string()), config));
    groups.push(Arc::downgrade(&t));
    Ok(t)
}

/// A running group's limits, by name.
pub fn find_group(name: &str) -> Option<Arc<Throttle>> {
    find_locked(&GROUPS.lock().unwrap_or_else(|p| p.into_inner()), name)
}

fn find_locked(groups: &[Weak<Throttle>], name: &str) -> Option<Arc<Throttle>> {
    groups.iter().filter_map(Weak::upgrade).find(|g| g.group.as_deref() == Some(name))
}

/// Limits as `key=value` pairs, "none" if there are none.
pub fn describe(config: &ThrottleConfig) -> String {
    let pairs = config.to_pairs();
    if pairs.is_empty() {
        return "none".into();
    }
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn config(pairs: &[(&str, &str)]) -> ThrottleConfig {
        let values: Vec<(&str, crate::spec::Value)> =
            pairs.iter().map(|(k, v)| (*k, crate::spec::Value::Str(v.to_string()))).collect();
        ThrottleConfig::from_pairs(values.iter().map(|(k, v)| (*k, v))).unwrap()
    }

    fn flood(t: &Throttle, cost: Cost, until_ns: u64) -> u64 {
        crate::qos::gcra::requests_by(until_ns, |now| t.admit(now, cost))
    }

    #[test]
    fn no_limit_admits_everything() {
        let t = Throttle::own(&ThrottleConfig::default());
        assert!(!t.active());
        assert_eq!(t.admit(0, Cost::Read(1 << 30)), 0);
    }

    #[test]
    fn an_average_allows_a_tenth_of_a_second_at_once() {
        let t = Throttle::own(&config(&[("iops-total", "1000")]));
        // 100 ms worth at once; over 10 s, 10 s worth more.
        assert_eq!(flood(&t, Cost::Read(4096), 0), 100);
        let t = Throttle::own(&config(&[("iops-total", "1000")]));
        assert_eq!(flood(&t, Cost::Write(4096), 10_000 * MS), 10_100);
    }

    #[test]
    fn a_burst_goes_at_its_rate_until_the_capacity_is_spent() {
        // 200/s on average; bursts of 1000/s with a capacity of 1000 × 1 s (QEMU's
        // meaning): at t=0 a tenth of a second of the burst rate, then 1000/s until the
        // capacity is used (800 net per second: 1.125 s), then 200/s.
        let c = config(&[("iops-total", "200"), ("iops-total-max", "1000")]);
        let at = |ms: u64| flood(&Throttle::own(&c), Cost::Read(512), ms * MS);
        assert_eq!(at(0), 100);
        assert_eq!(at(1000), 1100);
        // Capacity 1000 plus 200 per second (plus the one the average's bucket admits at
        // exactly its edge).
        assert_eq!(at(10_000), 3000);
    }

    #[test]
    fn directions_count_apart_and_bytes_count_bytes() {
        let c = config(&[("iops-read", "10"), ("bps-write", "1M")]);
        let t = Throttle::own(&c);
        // Reads: a tenth of 10 at once; writes: unlimited in count, 1 MiB/s in bytes.
        assert_eq!(flood(&t, Cost::Read(4096), 0), 1);
        let writes = flood(&t, Cost::Write(64 << 10), 1000 * MS);
        // 1 MiB per second plus 100 ms worth (1.6 requests of 64 KiB: one at once).
        assert_eq!(writes, 16 + 1);
    }

    #[test]
    fn iops_size_makes_a_large_request_count_as_several() {
        let c = config(&[("iops-total", "100"), ("iops-size", "4096")]);
        let small = flood(&Throttle::own(&c), Cost::Read(512), 1000 * MS);
        let large = flood(&Throttle::own(&c), Cost::Read(64 << 10), 1000 * MS);
        assert_eq!(small, 110);
        // Each 64 KiB request is 16 operations, 160 ms at 100 per second: more than the
        // burst, so each goes when the bucket is empty again, at 0, 160, ... 960 ms.
        assert_eq!(large, 7);
    }

    #[test]
    fn every_limit_that_counts_a_request_has_its_say() {
        // iops would let it go at once, bps not: the later of the two.
        let c = config(&[("iops-total", "1000"), ("bps-total", "40960")]);
        let t = Throttle::own(&c);
        assert_eq!(t.admit(0, Cost::Read(4096)), 0);
        // 4 KiB is 100 ms at 40 KiB/s, the whole burst: the next one at 100 ms.
        assert_eq!(t.admit(0, Cost::Read(4096)), 100 * MS);
        // Write limits do not count reads.
        let t = Throttle::own(&config(&[("iops-write", "1")]));
        for _ in 0..1000 {
            assert_eq!(t.admit(0, Cost::Read(4096)), 0);
        }
    }

    #[test]
    fn a_change_applies_at_once() {
        let t = Throttle::own(&config(&[("iops-total", "10")]));
        assert_eq!(flood(&t, Cost::Read(1), 0), 1);
        let before = t.generation();
        t.set(&config(&[("iops-total", "10000")]));
        assert_ne!(t.generation(), before);
        assert_eq!(flood(&t, Cost::Read(1), 0), 1000);
        t.set(&ThrottleConfig::default());
        assert!(!t.active());
        assert_eq!(t.config(), ThrottleConfig::default());
    }

    #[test]
    fn groups_are_shared_by_name_and_keep_their_limits() {
        let c = config(&[("iops-total", "300")]);
        let a = join(Some("unit-g1"), &c).unwrap();
        let b = join(Some("unit-g1"), &ThrottleConfig::default()).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let same = join(Some("unit-g1"), &c).unwrap();
        assert!(Arc::ptr_eq(&a, &same));
        let e = join(Some("unit-g1"), &config(&[("iops-total", "301")])).err().unwrap();
        assert_eq!(e, "throttle-group=unit-g1 has limits already (iops-total=300), and this export gives others; leave its limits out to take the group's, or change them with set-throttle");
        assert!(Arc::ptr_eq(&find_group("unit-g1").unwrap(), &a));
        drop((a, b, same));
        assert!(find_group("unit-g1").is_none());
        // Own limits are never shared.
        assert!(!Arc::ptr_eq(&join(None, &c).unwrap(), &join(None, &c).unwrap()));
    }
}
