//! A log rate limiter for lines a guest or a client can trigger: a burst, then silence, then
//! one line saying how many were dropped. No allocation; one `Instant::now()` per call, and
//! it is only called on error paths.

use std::time::{Duration, Instant};

pub struct RateLimiter {
    window: Duration,
    burst: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

/// What the caller should do with the line it wants to log.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines were dropped since the last one logged.
    Log { suppressed: u64 },
    /// Drop it.
    Drop,
}

impl RateLimiter {
    pub const fn new(burst: u32, window: Duration) -> RateLimiter {
        RateLimiter { window, burst, window_start: None, in_window: 0, suppressed: 0 }
    }

    pub fn check(&mut self) -> Verdict {
        self.check_at(Instant::now())
    }

    fn check_at(&mut self, now: Instant) -> Verdict {
        match self.window_start {
            Some(start) if now.duration_since(start) < self.window => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            let suppressed = std::mem::take(&mut self.suppressed);
            Verdict::Log { suppressed }
        } else {
            self.suppressed += 1;
            Verdict::Drop
        }
    }
}

impl Default for RateLimiter {
    /// Ten lines per five seconds.
    fn default() -> Self {
        RateLimiter::new(10, Duration::from_secs(5))
    }
}

/// Logs through `limiter` at `level`, with the count of lines dropped before this one; the
/// body of [`warn_limited!`] and [`info_limited!`].
#[doc(hidden)]
#[macro_export]
macro_rules! log_limited {
    // An export's lines name it through its span (`Disk::span`).
    ($level:expr, $limiter:expr, parent: $parent:expr, $($arg:tt)+) => {
        if let $crate::ratelimit::Verdict::Log { suppressed } = $limiter.check() {
            if suppressed > 0 {
                tracing::event!(parent: $parent, $level, suppressed, $($arg)+);
            } else {
                tracing::event!(parent: $parent, $level, $($arg)+);
            }
        }
    };
    ($level:expr, $limiter:expr, $($arg:tt)+) => {
        if let $crate::ratelimit::Verdict::Log { suppressed } = $limiter.check() {
            if suppressed > 0 {
                tracing::event!($level, suppressed, $($arg)+);
            } else {
                tracing::event!($level, $($arg)+);
            }
        }
    };
}

/// Logs through `limiter` at warn level, with the count of lines dropped before this one.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {
        $crate::log_limited!(tracing::Level::WARN, $limiter, $($arg)+)
    };
}

/// Logs through `limiter` at info level, with the count of lines dropped before this one.
#[macro_export]
macro_rules! info_limited {
    ($limiter:expr, $($arg:tt)+) => {
        $crate::log_limited!(tracing::Level::INFO, $limiter, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_drops_then_reports_the_drops() {
        let mut rl = RateLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(rl.check_at(t0), Verdict::Log { suppressed: 0 });
        assert_eq!(rl.check_at(t0), Verdict::Log { suppressed: 0 });
        assert_eq!(rl.check_at(t0), Verdict::Drop);
        assert_eq!(rl.check_at(t0 + Duration::from_millis(500)), Verdict::Drop);
        assert_eq!(rl.check_at(t0 + Duration::from_secs(1)), Verdict::Log { suppressed: 2 });
    }
}
