//! One rate limit as a generic cell rate algorithm (GCRA): instead of a token count that a
//! timer refills, a single "theoretical arrival time" (TAT) that each admitted request pushes
//! forward by its cost. A request conforms when, after taking its cost, the TAT is no further
//! ahead of now than the limit's burst allows. One atomic word per limit, so that queues on
//! different I/O threads can share a limit (a throttle group) with a compare-and-swap and no
//! lock; and a request learns exactly when it may go, so that the I/O thread can sleep on a
//! timer instead of polling.

use std::sync::atomic::{AtomicU64, Ordering};

const NS_PER_S: u128 = 1_000_000_000;

/// A rate of `rate` units per second (requests or bytes) with room for a burst at once.
/// The rate and the burst can be changed while other threads take from the limit (a live
/// change from the control socket): each is one atomic word, and a request that sees one
/// old and one new value is admitted by either, which does no harm.
pub struct Gcra {
    rate: AtomicU64,
    /// How far ahead of now the TAT may run: the burst's worth of time.
    tolerance_ns: AtomicU64,
    /// The theoretical arrival time, in nanoseconds on the caller's clock.
    tat_ns: AtomicU64,
}

impl Default for Gcra {
    /// One unit per second with no burst; meant to be `set` before use.
    fn default() -> Gcra {
        Gcra { rate: AtomicU64::new(1), tolerance_ns: AtomicU64::new(0), tat_ns: AtomicU64::new(0) }
    }
}

impl Gcra {
    /// `rate` > 0 units per second; `burst` units may go at once after an idle period (and
    /// always one request, however costly, see `reserve`).
    #[cfg(test)]
    pub fn new(rate: u64, burst: u64) -> Gcra {
        let g = Gcra::default();
        let rate = rate.max(1);
        g.set(rate, cost_ns(burst, rate));
        g
    }

    /// Sets the rate (units per second, at least 1) and the burst as the time it is worth,
    /// and starts from an idle limit (the whole burst available), as QEMU does when a
    /// throttle configuration changes.
    pub fn set(&self, rate: u64, tolerance_ns: u64) {
        self.rate.store(rate.max(1), Ordering::Relaxed);
        self.tolerance_ns.store(tolerance_ns, Ordering::Relaxed);
        self.tat_ns.store(0, Ordering::Release);
    }

    /// Reserves `cost` units for a request offered at `now_ns` and returns how many
    /// nanoseconds from now it may go (0: at once). The reservation is taken now, so that
    /// requests are served in the order they asked, whichever queue or thread they come
    /// from: in a throttle group, each queue holds at most one reserved request, and the
    /// queues take turns. A request costlier than the whole burst goes when the limit is
    /// idle (it would otherwise never go), and pushes the TAT ahead by its full cost, so
    /// the average holds.
    pub fn reserve(&self, now_ns: u64, cost: u64) -> u64 {
        let step = cost_ns(cost, self.rate.load(Ordering::Relaxed));
        let tolerance_ns = self.tolerance_ns.load(Ordering::Relaxed);
        let mut tat = self.tat_ns.load(Ordering::Acquire);
        loop {
            let start = tat.max(now_ns);
            let new_tat = start.saturating_add(step);
            // The earliest time at which the TAT after this request is within the burst,
            // but never later than the limit's idle moment.
            let go_at = new_tat.saturating_sub(tolerance_ns).min(start).max(now_ns);
            match self.tat_ns.compare_exchange_weak(
                tat,
                new_tat,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return go_at - now_ns,
                Err(seen) => tat = seen,
            }
        }
    }
}

/// Nanoseconds `units` take at `rate` units per second, rounded up.
pub fn cost_ns(units: u64, rate: u64) -> u64 {
    let ns = (u128::from(units) * NS_PER_S).div_ceil(u128::from(rate.max(1)));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Requests offered back to back from t=0 by one queue, each when the one before may go
/// (`wait_at(now)` reserves one and says how long it waits): how many may go by `until_ns`.
#[cfg(test)]
pub(super) fn requests_by(until_ns: u64, mut wait_at: impl FnMut(u64) -> u64) -> u64 {
    let (mut now, mut n) = (0, 0);
    loop {
        now += wait_at(now);
        if now > until_ns {
            return n;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn flood(g: &Gcra, cost: u64, until_ns: u64) -> u64 {
        requests_by(until_ns, |now| g.reserve(now, cost))
    }

    #[test]
    fn a_flood_gets_the_rate_plus_the_burst() {
        // 1000 per second with a burst of 100, for 10 s.
        assert_eq!(flood(&Gcra::new(1000, 100), 1, 10_000_000_000), 10_100);
    }

    #[test]
    fn the_burst_goes_at_once_then_the_rate() {
        let g = Gcra::new(1000, 100);
        let at_once = (0..100).filter(|_| g.reserve(0, 1) == 0).count();
        assert_eq!(at_once, 100);
        // Then one per millisecond, each told when.
        assert_eq!(g.reserve(0, 1), 1_000_000);
        assert_eq!(g.reserve(0, 1), 2_000_000);
        assert_eq!(g.reserve(1_500_000, 1), 1_500_000);
    }

    #[test]
    fn bytes_are_costs() {
        // 1 MB/s with a 64 KiB burst: a 1 MiB request goes on an idle limit; the next waits
        // until the TAT is within the burst again.
        let g = Gcra::new(1_000_000, 65536);
        assert_eq!(g.reserve(0, 1 << 20), 0);
        assert_eq!(g.reserve(0, 4096), cost_ns((1 << 20) + 4096 - 65536, 1_000_000));
    }

    #[test]
    fn a_change_starts_idle() {
        let g = Gcra::new(10, 0);
        assert_eq!(g.reserve(0, 1), 0);
        assert_eq!(g.reserve(0, 1), 100_000_000);
        g.set(1000, 0);
        assert_eq!(g.reserve(0, 1), 0);
        assert_eq!(g.reserve(0, 1), 1_000_000);
    }

    #[test]
    fn threads_sharing_a_limit_get_it_together() {
        // Four threads asking at the same instant: exactly the burst goes at once, and the
        // others are spaced at the rate, one after another, whoever asked.
        let g = std::sync::Arc::new(Gcra::new(1000, 1000));
        let mut delays: Vec<u64> = (0..4)
            .map(|_| {
                let g = std::sync::Arc::clone(&g);
                std::thread::spawn(move || (0..2000).map(|_| g.reserve(5, 1)).collect::<Vec<u64>>())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        delays.sort_unstable();
        assert_eq!(delays.iter().filter(|&&d| d == 0).count(), 1000);
        for (i, d) in delays[1000..].iter().enumerate() {
            assert_eq!(*d, (i as u64 + 1) * 1_000_000);
        }
    }

    proptest! {
        /// Whatever the requests and their timing, those that may go by any time T cost at
        /// most rate × T + burst + one request (the one an idle limit always lets through).
        #[test]
        fn never_more_than_rate_times_time_plus_burst(
            rate in 1u64..1_000_000,
            burst in 0u64..10_000,
            offers in proptest::collection::vec((0u64..5_000_000, 1u64..5000), 1..400),
        ) {
            let g = Gcra::new(rate, burst);
            let mut now = 0u64;
            let mut goes: Vec<(u64, u64)> = Vec::new();
            for (gap, cost) in offers {
                now += gap;
                goes.push((now + g.reserve(now, cost), cost));
            }
            goes.sort_unstable();
            let mut taken = 0u128;
            let mut max_cost = 0u64;
            for (at, cost) in goes {
                taken += u128::from(cost);
                max_cost = max_cost.max(cost);
                let allowed = u128::from(rate) * u128::from(at) / NS_PER_S + u128::from(burst) + u128::from(max_cost) + 1;
                prop_assert!(taken <= allowed, "{} by {} ns, at most {}", taken, at, allowed);
            }
        }
    }
}
