//! One rate limit as a generic cell rate algorithm (GCRA): instead of a token count that a
//! timer refills, a single "theoretical arrival time" (TAT) that each admitted request pushes
//! forward by its cost. A request conforms when, after taking its cost, the TAT is no further
//! ahead of now than the limit's burst allows. One atomic word per limit, so that queues on
//! different I/O threads can share a limit (a throttle group) with a compare-and-swap and no
//! lock; and a refused request learns exactly how long to wait, so that the I/O thread can
//! sleep on a timer instead of polling.

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
    /// always one request, however costly, see `try_take`).
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

    /// Takes `cost` units at time `now_ns` if they conform: Ok. Otherwise takes nothing and
    /// returns how many nanoseconds from now they would. A single request costlier than the
    /// burst goes when the limit is idle (it would otherwise never go) and pushes the TAT
    /// ahead by its full cost, so the average holds.
    pub fn try_take(&self, now_ns: u64, cost: u64) -> Result<(), u64> {
        let step = cost_ns(cost, self.rate.load(Ordering::Relaxed));
        let tolerance_ns = self.tolerance_ns.load(Ordering::Relaxed);
        let mut tat = self.tat_ns.load(Ordering::Acquire);
        loop {
            let start = tat.max(now_ns);
            let ahead = start - now_ns;
            let new_tat = start.saturating_add(step);
            if ahead > 0 && new_tat - now_ns > tolerance_ns {
                return Err((new_tat - now_ns - tolerance_ns).min(ahead));
            }
            match self.tat_ns.compare_exchange_weak(
                tat,
                new_tat,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Gives back `cost` units taken by `try_take` (a request that another limit refused).
    pub fn give_back(&self, cost: u64) {
        let step = cost_ns(cost, self.rate.load(Ordering::Relaxed));
        let _ = self
            .tat_ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t.saturating_sub(step)));
    }
}

/// Nanoseconds `units` take at `rate` units per second, rounded up.
pub fn cost_ns(units: u64, rate: u64) -> u64 {
    let ns = (u128::from(units) * NS_PER_S).div_ceil(u128::from(rate.max(1)));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Requests of `cost` offered every `gap_ns` for `span_ns`: how many were admitted.
    fn admitted(g: &Gcra, cost: u64, gap_ns: u64, span_ns: u64) -> u64 {
        let mut n = 0;
        let mut now = 0;
        while now < span_ns {
            if g.try_take(now, cost).is_ok() {
                n += 1;
            }
            now += gap_ns;
        }
        n
    }

    #[test]
    fn a_flood_gets_the_rate_plus_the_burst() {
        // 1000 IOPS with a burst of 100, offered 1M IOPS for 10 s.
        let g = Gcra::new(1000, 100);
        let n = admitted(&g, 1, 1000, 10_000_000_000);
        assert!((10_099..=10_100).contains(&n), "{n}");
    }

    #[test]
    fn the_burst_goes_at_once_then_the_rate() {
        let g = Gcra::new(1000, 100);
        // At t=0 exactly the burst.
        let at_once = (0..1000).filter(|_| g.try_take(0, 1).is_ok()).count();
        assert_eq!(at_once, 100);
        // Then one per millisecond, and the wait says when.
        assert_eq!(g.try_take(0, 1), Err(1_000_000));
        assert_eq!(g.try_take(999_999, 1), Err(1));
        assert_eq!(g.try_take(1_000_000, 1), Ok(()));
    }

    #[test]
    fn bytes_are_costs() {
        // 1 MB/s with a 64 KiB burst: a 1 MiB request goes on an idle limit, then the next
        // waits for about a second.
        let g = Gcra::new(1_000_000, 65536);
        assert_eq!(g.try_take(0, 1 << 20), Ok(()));
        let wait = g.try_take(0, 4096).unwrap_err();
        assert_eq!(wait, cost_ns((1 << 20) + 4096 - 65536, 1_000_000));
    }

    #[test]
    fn giving_back_undoes_a_take() {
        let g = Gcra::new(10, 0);
        assert_eq!(g.try_take(0, 1), Ok(()));
        assert!(g.try_take(0, 1).is_err());
        g.give_back(1);
        assert_eq!(g.try_take(0, 1), Ok(()));
    }

    #[test]
    fn threads_sharing_a_limit_get_it_together() {
        // Four threads flooding one limit at the same instant take exactly the burst.
        let g = std::sync::Arc::new(Gcra::new(1000, 1000));
        let taken: u64 = (0..4)
            .map(|_| {
                let g = std::sync::Arc::clone(&g);
                std::thread::spawn(move || {
                    (0..10_000).filter(|_| g.try_take(5, 1).is_ok()).count() as u64
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(taken, 1000);
    }

    proptest! {
        /// Whatever the offered load, over any span the admitted cost is at most
        /// rate × span + burst + one request (the one an idle limit always lets through).
        #[test]
        fn never_more_than_rate_times_time_plus_burst(
            rate in 1u64..1_000_000,
            burst in 0u64..10_000,
            offers in proptest::collection::vec((0u64..5_000_000, 1u64..5000), 1..400),
        ) {
            let g = Gcra::new(rate, burst);
            let mut now = 0u64;
            let mut taken = 0u128;
            let mut max_cost = 0u64;
            for (gap, cost) in offers {
                now += gap;
                if g.try_take(now, cost).is_ok() {
                    taken += u128::from(cost);
                    max_cost = max_cost.max(cost);
                }
            }
            let allowed = u128::from(rate) * u128::from(now) / NS_PER_S + u128::from(burst) + u128::from(max_cost) + 1;
            prop_assert!(taken <= allowed, "took {} of at most {}", taken, allowed);
        }
    }
}
