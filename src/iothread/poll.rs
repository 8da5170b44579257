//! Adaptive polling: after a round of work, keep looking at the avail rings and the engine's
//! completions for a while before going to sleep, because a wake-up through an eventfd costs
//! tens of microseconds and a guest that just got an answer often sends the next request soon.
//!
//! The window tunes itself from how long each idle period turned out to be (the polling plus
//! the sleep after it, as QEMU measures it): an event that came within `poll_max` means a
//! longer window would have caught it, so the window doubles (from 4 µs up to `poll_max`);
//! one that came later means no window we allow would have helped, so the window halves, down
//! to zero, which is how an idle export ends up costing nothing.
//!
//! What polling finds sets how far the window may grow: a window at its cap that keeps
//! missing (three polling periods in a row ended in a sleep) halves the cap, whatever the
//! sleeps said, because that polling costs its whole window each time and buys nothing (the
//! work comes later than the window reaches, often because the polling itself holds a CPU
//! that the client or the kernel needs to produce it). A hit at the cap doubles it again, and
//! every few hundred sleeps the cap is probed one step up, so a workload that changes is
//! followed.
//!
//! Whether a thread polls at all, and for what, is chosen above the windows, by what each
//! way of waiting does to the thread's whole loop (`Chooser`): in turn, each way runs for a
//! few milliseconds, and the thread uses the one whose wall time plus twice its CPU per unit
//! of work is least. Timing each wait alone cannot tell: on a host whose idle CPUs halt, a thread that
//! polls after interrupting a sleeping frontend keeps its CPU busy, so the scheduler wakes the
//! frontend on a halted CPU and its next request comes later, while polling for that same
//! request on tmpfs, where the other CPU stays awake, halves the latency (issue 27).
//!
//! A thread keeps two windows: one for idle periods with its own I/O in flight (what ends
//! them is the backing's completion, so it learns the backing's latency: completions that
//! take longer than `poll_max` are not polled for) and one for idle periods with nothing in
//! flight (what ends them is the guest's next request).

use std::fmt;
use std::str::FromStr;

use crate::spec::{err, Key, Kind, Options, SpecError, Value};
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Poll for a self-tuning window after work, then sleep (the default).
    Adaptive,
    /// Never sleep while the queue runs: for dedicated cores.
    Always,
    /// Sleep as soon as a round finds nothing (for comparison).
    Never,
}

impl FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "adaptive" => Ok(PollMode::Adaptive),
            "always" => Ok(PollMode::Always),
            "never" => Ok(PollMode::Never),
            other => Err(format!("poll={other}: one of adaptive, always, never")),
        }
    }
}

impl fmt::Display for PollMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PollMode::Adaptive => "adaptive",
            PollMode::Always => "always",
            PollMode::Never => "never",
        })
    }
}

/// An export's polling settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollPolicy {
    pub mode: PollMode,
    /// Upper bound of the adaptive window.
    pub max_us: u32,
}

/// Default bound of the adaptive window. A client that sleeps on its completion eventfd
/// needs about 25 µs on these machines to wake and send the next request; the window must
/// cover that to save our own wake-up. (QEMU's default is 32 µs.)
pub const DEFAULT_POLL_MAX_US: u32 = 64;
/// Largest accepted `poll-max-us`.
pub const MAX_POLL_MAX_US: u32 = 100_000;
/// Where a growing window starts.
const FIRST_WINDOW: Duration = Duration::from_micros(4);
/// Polling periods at the cap in a row that may end in a sleep before the cap halves.
const MISSES_BEFORE_SHRINKING: u32 = 3;
/// Sleeps after which a window's cap is probed one step up.
const SLEEPS_BETWEEN_PROBES: u32 = 256;
/// How long each way is tried (see `Chooser`).
pub const TRIAL_FOR: Duration = Duration::from_millis(10);
/// The first part of a trial, while the host settles into the way tried: not counted.
pub const SETTLE_FOR: Duration = Duration::from_millis(3);
/// How long the best way is used before the ways are tried again, after a choice that
/// differs from the one before.
pub const EXPLOIT_FOR: Duration = Duration::from_millis(200);
/// How long that grows to, doubling each time the trials choose the same way again: the
/// trials of the ways not chosen (20 ms in every 230 at first) cost what those ways cost.
pub const MAX_EXPLOIT_FOR: Duration = Duration::from_millis(1600);
/// A thread whose rate of work (units per second) moved by more than this factor from its
/// trials' tries again (after [`EXPLOIT_FOR`] at least): its load changed.
const LOAD_CHANGE: f64 = 2.0;
/// What a µs of the thread's CPU is worth in µs of wall time per request: polling must buy
/// twice the time it spends. The CPU a thread spins on is taken from the host's other work
/// (other tenants' vCPUs and threads), and on a disk polling buys little: on this machine's
/// ext4, depth 1, polling took 50 µs a request at 45–50 µs of CPU against sleeping's 55 µs
/// at 27 µs, while on tmpfs it took 25 µs at 25 µs of CPU against 50–100 µs at 20–45.
const CPU_WEIGHT: f64 = 2.0;
/// Windows shorter than this are not worth the clock reads: treat as zero.
const MIN_WINDOW: Duration = Duration::from_micros(1);

impl PollPolicy {
    /// `poll=`: the one place the mode is read.
    pub fn set_mode(&mut self, value: &Value) -> Result<(), SpecError> {
        self.mode = value.text("poll")?.parse().map_err(SpecError)?;
        Ok(())
    }

    /// `poll-max-us=` (also set-polling's `max-us`): the one place the bound is checked.
    pub fn set_max_us(&mut self, value: &Value) -> Result<(), SpecError> {
        let max_us: u32 = value.number("poll-max-us")?;
        if max_us > MAX_POLL_MAX_US {
            return err(format!("poll-max-us={value}: at most {MAX_POLL_MAX_US}"));
        }
        self.max_us = max_us;
        Ok(())
    }
}

/// The polling keys, of a named I/O thread and of an export's dedicated threads.
impl Options for PollPolicy {
    const KEYS: &'static [Key<PollPolicy>] = &[
        Key {
            name: "poll",
            aliases: &[],
            kind: Kind::Choice(&["adaptive", "always", "never"]),
            usage: "poll=MODE",
            help: "adaptive (default): after work, poll the rings for a self-tuning window\n\
                   (up to poll-max-us) before sleeping, for requests and completions or for\n\
                   requests only, where short trials show polling buys twice the time it\n\
                   costs CPU; an idle export costs no CPU.\n\
                   always: never sleep (for dedicated cores). never: sleep at once.",
            set: PollPolicy::set_mode,
            get: |p| Some(Value::Str(p.mode.to_string())),
        },
        Key {
            name: "poll-max-us",
            aliases: &[],
            kind: Kind::Number,
            usage: "poll-max-us=N",
            help: "bound of the adaptive polling window in µs (default 64, at most 100000).",
            set: PollPolicy::set_max_us,
            get: |p| Some(Value::Int(p.max_us.into())),
        },
    ];
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy { mode: PollMode::Adaptive, max_us: DEFAULT_POLL_MAX_US }
    }
}

/// An export's polling settings as its I/O threads read them: changeable at run time
/// (`set-polling`); a thread picks a change up at the start of its next idle period.
pub struct PollSettings {
    mode: AtomicU8,
    max_us: AtomicU32,
}

impl PollSettings {
    pub fn new(policy: PollPolicy) -> PollSettings {
        let s = PollSettings { mode: AtomicU8::new(0), max_us: AtomicU32::new(0) };
        s.set(policy);
        s
    }

    pub fn set(&self, policy: PollPolicy) {
        let mode = match policy.mode {
            PollMode::Adaptive => 0,
            PollMode::Always => 1,
            PollMode::Never => 2,
        };
        self.max_us.store(policy.max_us, Ordering::Relaxed);
        self.mode.store(mode, Ordering::Relaxed);
    }

    pub fn get(&self) -> PollPolicy {
        let mode = match self.mode.load(Ordering::Relaxed) {
            1 => PollMode::Always,
            2 => PollMode::Never,
            _ => PollMode::Adaptive,
        };
        PollPolicy { mode, max_us: self.max_us.load(Ordering::Relaxed) }
    }
}

/// The ways an adaptive thread can wait, in the order they are tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// The adaptive windows (`Poller`), for requests and completions alike.
    Poll,
    /// Poll (the windows) only while none of the thread's I/O is in flight, for a frontend's
    /// next request; sleep while waiting for the backing's completions. A completion a
    /// disk posts after tens of µs costs all of them in CPU when polled for, and saves only a
    /// wake-up, while a polling frontend's next request comes a few µs after its answer.
    PollRequests,
    /// Sleep as soon as a round finds nothing.
    Sleep,
}

impl Way {
    pub const ALL: [Way; 3] = [Way::Poll, Way::PollRequests, Way::Sleep];

    pub fn name(self) -> &'static str {
        match self {
            Way::Poll => "poll",
            Way::PollRequests => "poll-requests",
            Way::Sleep => "sleep",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether an idle period in this way polls, with or without I/O in flight.
    fn polls(self, in_flight: bool) -> bool {
        match self {
            Way::Poll => true,
            Way::PollRequests => !in_flight,
            Way::Sleep => false,
        }
    }
}

/// One way's figures from its trials: wall time and thread CPU per unit of work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub wall_ns_per_work: f64,
    pub cpu_ns_per_work: f64,
}

impl Score {
    /// What the way costs a unit of work: its wall time, and its CPU at [`CPU_WEIGHT`].
    fn cost(self) -> f64 {
        self.wall_ns_per_work + CPU_WEIGHT * self.cpu_ns_per_work
    }
}

/// A way's last three trials, newest first. Its figures are their medians, so that one
/// trial disturbed by something else on the host (a slow disk moment, another process's
/// burst) cannot flip the choice (ext4's sleeping trials ranged 55–120 µs a request).
#[derive(Clone, Copy, Debug)]
struct Trials {
    last: [Score; 3],
}

impl Trials {
    /// A way's trials after a new one. A trial without work forgets them, so a thread that
    /// was idle starts afresh; the first trial counts for all three.
    fn after(old: Option<Trials>, new: Option<Score>) -> Option<Trials> {
        let new = new?;
        let last = match old {
            Some(t) => [new, t.last[0], t.last[1]],
            None => [new; 3],
        };
        Some(Trials { last })
    }

    fn median(&self) -> Score {
        let median = |f: fn(&Score) -> f64| {
            let mut v = self.last.map(|s| f(&s));
            v.sort_by(f64::total_cmp);
            v[1]
        };
        Score {
            wall_ns_per_work: median(|s| s.wall_ns_per_work),
            cpu_ns_per_work: median(|s| s.cpu_ns_per_work),
        }
    }
}

/// What a chooser decided after its trials, and the figures it decided on (indexed as
/// [`Way::ALL`]): what `list-iothreads`, the metrics and `doctor` show of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    pub way: Way,
    pub scores: [Option<Score>; 3],
}

/// Where the chooser is in its schedule: a trial of each way, then the best one (chosen
/// once, when the last trial ends).
#[derive(Clone, Copy, Debug)]
enum Phase {
    Trial {
        way: Way,
        began: Instant,
    },
    /// `window` and `work`: when the current window of [`EXPLOIT_FOR`] began, and the
    /// thread's work count then (the rate of work is checked per window).
    Exploit {
        way: Way,
        began: Instant,
        window: Instant,
        work: u64,
    },
}

/// Chooses, per I/O thread, how to wait (a [`Way`]) by what each way does to the whole loop,
/// not to one wait: which is better depends on where the host's scheduler puts the frontends
/// a thread wakes, and on whether idle CPUs halt, which builds up over milliseconds and
/// couples every wait of the loop (ARCHITECTURE.md, the round's step 5).
///
/// It tries each way for [`TRIAL_FOR`] (the first [`SETTLE_FOR`] of a trial does not count),
/// measuring wall time and the thread's CPU per unit of work done (requests fetched plus
/// answered); a way's figures are the medians of its last three trials. It then uses the
/// way of least `wall + 2 cpu` ([`CPU_WEIGHT`]): to poll more, a way must buy twice the wall
/// time it spends in CPU. A trial that saw no work decides nothing: an idle thread sleeps.
/// The chosen way is used for [`EXPLOIT_FOR`], twice as long each time the same way is
/// chosen again (up to [`MAX_EXPLOIT_FOR`]), and the trials come back early, afresh, when
/// the thread's rate of work in a window of [`EXPLOIT_FOR`] moves by more than
/// [`LOAD_CHANGE`] from what they saw.
#[derive(Debug)]
pub struct Chooser {
    phase: Phase,
    /// Per way (as [`Way::ALL`]), its recent trials.
    trials: [Option<Trials>; 3],
    /// Work and CPU since the current trial settled (None while it settles).
    counted: Option<(Instant, u64, u64)>,
    work: u64,
    /// The last decision, until someone takes it (`Poller::take_choice`).
    fresh: Option<Choice>,
    /// The way the last trials chose, and for how long it is used now.
    last_way: Option<Way>,
    exploit_for: Duration,
    /// Units of work per ns in the chosen way's trials (0 if they saw none).
    trial_rate: f64,
}

impl Chooser {
    pub fn new(now: Instant) -> Chooser {
        Chooser {
            phase: Phase::Trial { way: Way::Poll, began: now },
            trials: [None; 3],
            counted: None,
            work: 0,
            fresh: None,
            last_way: None,
            exploit_for: EXPLOIT_FOR,
            trial_rate: 0.0,
        }
    }

    /// A round did `work` units of work.
    pub fn worked(&mut self, work: usize) {
        self.work += work as u64;
    }

    /// How the thread waits in an idle period starting `now`. `cpu_ns` reads the thread's
    /// CPU clock: called only at the edges of trials.
    pub fn way_at(&mut self, now: Instant, cpu_ns: impl Fn() -> u64) -> Way {
        match self.phase {
            Phase::Trial { way, began } => {
                let elapsed = now.duration_since(began);
                if elapsed >= SETTLE_FOR && self.counted.is_none() {
                    self.counted = Some((now, self.work, cpu_ns()));
                }
                if elapsed >= TRIAL_FOR {
                    self.end_trial(way, now, cpu_ns());
                }
            }
            Phase::Exploit { way, began, window, work } => {
                let in_window = now.duration_since(window);
                let changed = in_window >= EXPLOIT_FOR && self.load_changed(in_window, work);
                if changed {
                    // Whatever was chosen was chosen for another load: start afresh.
                    self.last_way = None;
                    self.trials = [None; 3];
                }
                if changed || now.duration_since(began) >= self.exploit_for {
                    self.phase = Phase::Trial { way: Way::Poll, began: now };
                } else if in_window >= EXPLOIT_FOR {
                    self.phase = Phase::Exploit { way, began, window: now, work: self.work };
                }
            }
        }
        match self.phase {
            Phase::Trial { way, .. } | Phase::Exploit { way, .. } => way,
        }
    }

    fn end_trial(&mut self, way: Way, now: Instant, cpu_ns: u64) {
        let score = self.counted.take().and_then(|(since, work0, cpu0)| {
            let work = self.work.saturating_sub(work0);
            (work > 0).then(|| Score {
                wall_ns_per_work: now.duration_since(since).as_nanos() as f64 / work as f64,
                cpu_ns_per_work: cpu_ns.saturating_sub(cpu0) as f64 / work as f64,
            })
        });
        let i = way.index();
        self.trials[i] = Trials::after(self.trials[i], score);
        match Way::ALL.get(i + 1) {
            Some(&next) => self.phase = Phase::Trial { way: next, began: now },
            None => {
                let scores = self.trials.map(|t| t.map(|t| t.median()));
                let way = Self::cheapest(&scores);
                self.exploit_for = match self.last_way {
                    Some(last) if last == way => (self.exploit_for * 2).min(MAX_EXPLOIT_FOR),
                    _ => EXPLOIT_FOR,
                };
                self.last_way = Some(way);
                self.trial_rate =
                    scores[way.index()].map_or(0.0, |s| 1.0 / s.wall_ns_per_work.max(1.0));
                self.phase = Phase::Exploit { way, began: now, window: now, work: self.work };
                self.fresh = Some(Choice { way, scores });
            }
        }
    }

    /// Whether the rate of work in the window that began `elapsed` ago (at `work0`) is more
    /// than [`LOAD_CHANGE`] away from the trials' rate.
    fn load_changed(&self, elapsed: Duration, work0: u64) -> bool {
        let rate = self.work.saturating_sub(work0) as f64 / elapsed.as_nanos().max(1) as f64;
        rate > self.trial_rate * LOAD_CHANGE || rate * LOAD_CHANGE < self.trial_rate
    }

    /// When the current exploit period ends unless the load changes (tests).
    #[cfg(test)]
    fn exploit_ends(&self) -> Option<Instant> {
        match self.phase {
            Phase::Exploit { began, .. } => Some(began + self.exploit_for),
            Phase::Trial { .. } => None,
        }
    }

    /// The way of least cost, if every way's trials saw work; else sleep.
    fn cheapest(scores: &[Option<Score>; 3]) -> Way {
        let mut best = (Way::Sleep, f64::INFINITY);
        for (way, score) in Way::ALL.into_iter().zip(scores) {
            let Some(score) = score else { return Way::Sleep };
            if score.cost() < best.1 {
                best = (way, score.cost());
            }
        }
        best.0
    }
}

/// One I/O thread's polling state.
pub struct Poller {
    mode: PollMode,
    max: Duration,
    /// The windows for idle periods without (0) and with (1) I/O in flight.
    windows: [Duration; 2],
    /// Which window the current idle period uses.
    current: usize,
    /// Per window: how far it may grow now (at most its bound), polling periods in a row at
    /// that cap that ended in a sleep, and sleeps since the cap was last probed upwards.
    caps: [Duration; 2],
    misses: [u32; 2],
    sleeps_since_probe: [u32; 2],
    /// When the current run of empty rounds began.
    idle_since: Option<Instant>,
    /// Whether adaptive polling polls at all now, and whether the current period sleeps
    /// because it does not.
    chooser: Chooser,
    sleeps_by_choice: bool,
}

impl Poller {
    pub fn new(policy: PollPolicy) -> Poller {
        Poller {
            mode: policy.mode,
            max: Duration::from_micros(u64::from(policy.max_us)),
            windows: [Duration::ZERO; 2],
            current: 0,
            caps: [Duration::MAX; 2],
            misses: [0; 2],
            sleeps_since_probe: [0; 2],
            idle_since: None,
            chooser: Chooser::new(Instant::now()),
            sleeps_by_choice: false,
        }
    }

    /// A round did `work` units of work (requests fetched plus answered).
    pub fn worked(&mut self, work: usize) {
        self.chooser.worked(work);
    }

    /// The chooser's decision since the last call, if it made one (every few hundred ms).
    pub fn take_choice(&mut self) -> Option<Choice> {
        self.chooser.fresh.take()
    }

    /// A round found work. Returns how long we had been polling, if we were.
    pub fn work_found(&mut self) -> Option<Duration> {
        let polled = self.idle_since.take().map(|since| since.elapsed());
        self.note_hit(polled)
    }

    /// As [`Poller::work_found`], after `polled` of polling (for tests, which do not wait).
    #[cfg(test)]
    fn work_found_after(&mut self, polled: Duration) -> Option<Duration> {
        self.idle_since = None;
        self.note_hit(Some(polled))
    }

    fn note_hit(&mut self, polled: Option<Duration>) -> Option<Duration> {
        let c = self.current;
        if polled.is_some() && self.mode == PollMode::Adaptive {
            self.misses[c] = 0;
            if self.windows[c] >= self.caps[c] {
                // A hit at the cap: a longer window might catch more.
                self.caps[c] = (self.caps[c] * 2).min(self.max);
            }
        }
        polled
    }

    /// Whether a run of empty rounds is under way (polling has begun and not ended).
    pub fn polling(&self) -> bool {
        self.idle_since.is_some()
    }

    /// How long the current run of empty rounds has lasted (the polling before a sleep).
    pub fn polled_for(&self) -> Duration {
        self.idle_since.map(|since| since.elapsed()).unwrap_or_default()
    }

    /// A round found nothing: keep polling (true) or sleep (false)? `in_flight`: the thread
    /// has I/O in flight. At the start of an idle period the thread picks up changed
    /// `settings` and chooses the window the period uses.
    pub fn keep_polling(&mut self, settings: &PollSettings, in_flight: bool) -> bool {
        if self.idle_since.is_none() {
            let policy = settings.get();
            self.mode = policy.mode;
            self.max = Duration::from_micros(u64::from(policy.max_us));
            for i in 0..self.windows.len() {
                self.caps[i] = self.caps[i].min(self.max);
                self.windows[i] = self.windows[i].min(self.caps[i]);
            }
            self.current = usize::from(in_flight);
            self.sleeps_by_choice = self.mode == PollMode::Adaptive
                && !self.chooser.way_at(Instant::now(), crate::sys::thread_cpu_ns).polls(in_flight);
        }
        match self.mode {
            PollMode::Never => false,
            PollMode::Always => {
                self.idle_since.get_or_insert_with(Instant::now);
                true
            }
            PollMode::Adaptive => {
                let window = self.windows[self.current];
                if window.is_zero() || self.sleeps_by_choice {
                    return false;
                }
                let now = Instant::now();
                let since = *self.idle_since.get_or_insert(now);
                now.duration_since(since) < window
            }
        }
    }

    /// We slept for `slept` after polling gave up: tune the window of this idle period by
    /// how long the whole period lasted.
    pub fn slept(&mut self, slept: Duration) {
        let idle = self.polled_for() + slept;
        self.idle_since = None;
        if self.mode != PollMode::Adaptive || self.sleeps_by_choice {
            // A period that did not try to poll says nothing about the windows.
            return;
        }
        let c = self.current;
        let bound = self.max;
        let cap = self.caps[c].min(bound);
        if !self.windows[c].is_zero() && self.windows[c] >= cap {
            self.misses[c] += 1;
        }
        if self.misses[c] >= MISSES_BEFORE_SHRINKING {
            self.misses[c] = 0;
            self.caps[c] = if cap / 2 < MIN_WINDOW { Duration::ZERO } else { cap / 2 };
        }
        self.sleeps_since_probe[c] += 1;
        if self.sleeps_since_probe[c] >= SLEEPS_BETWEEN_PROBES {
            self.sleeps_since_probe[c] = 0;
            // Back to the full bound: a cap that came down in a bad moment (a busy machine)
            // must not keep polling away for good.
            self.caps[c] = bound;
        }
        let cap = self.caps[c].min(bound);
        let window = &mut self.windows[c];
        if idle <= bound && !cap.is_zero() {
            *window = (*window * 2).max(FIRST_WINDOW).min(cap);
        } else {
            *window /= 2;
            if *window < MIN_WINDOW {
                *window = Duration::ZERO;
            }
        }
    }

    /// The window an idle period with (or without) I/O in flight would use.
    #[cfg(test)]
    pub fn window(&self, in_flight: bool) -> Duration {
        self.windows[usize::from(in_flight)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An adaptive poller whose chooser stays in its trial of polling (it began in an hour):
    /// the windows alone are under test.
    fn adaptive(max_us: u32) -> (Poller, PollSettings) {
        let policy = PollPolicy { mode: PollMode::Adaptive, max_us };
        let mut p = Poller::new(policy);
        p.chooser = Chooser::new(Instant::now() + Duration::from_secs(3600));
        (p, PollSettings::new(policy))
    }

    #[test]
    fn short_sleeps_grow_the_window_up_to_the_bound() {
        let (mut p, s) = adaptive(64);
        assert!(!p.keep_polling(&s, false), "no window before the first sleep");
        let mut seen = Vec::new();
        for _ in 0..6 {
            p.slept(Duration::from_micros(20));
            seen.push(p.window(false).as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 64, 64]);
        assert!(p.keep_polling(&s, false));
    }

    #[test]
    fn long_sleeps_shrink_it_to_zero() {
        let (mut p, s) = adaptive(64);
        for _ in 0..5 {
            p.slept(Duration::from_micros(10));
        }
        let mut seen = Vec::new();
        for _ in 0..8 {
            p.slept(Duration::from_millis(5));
            seen.push(p.window(false).as_micros());
        }
        assert_eq!(seen, [32, 16, 8, 4, 2, 1, 0, 0]);
        assert!(!p.keep_polling(&s, false), "an idle export sleeps at once");
    }

    #[test]
    fn the_window_ends() {
        let (mut p, s) = adaptive(64);
        p.slept(Duration::from_micros(1));
        assert!(p.keep_polling(&s, false));
        std::thread::sleep(Duration::from_micros(200));
        assert!(!p.keep_polling(&s, false), "4 µs window long over");
        p.work_found();
        assert!(p.keep_polling(&s, false), "a new idle run starts a new window");
    }

    #[test]
    fn fixed_modes_and_changes_at_run_time() {
        let always = PollPolicy { mode: PollMode::Always, max_us: 0 };
        let never = PollPolicy { mode: PollMode::Never, max_us: 1000 };
        let settings = PollSettings::new(always);
        let mut p = Poller::new(always);
        p.slept(Duration::from_micros(1));
        assert!(p.keep_polling(&settings, false));
        settings.set(never);
        assert!(p.keep_polling(&settings, false), "a change waits for the next idle period");
        p.work_found();
        assert!(!p.keep_polling(&settings, false), "picked up at the next idle period");
        assert_eq!(settings.get(), never);
    }

    #[test]
    fn completions_slower_than_the_bound_are_not_polled_for() {
        let (mut p, s) = adaptive(64);
        // Guest requests come 20 µs apart: that window grows.
        for _ in 0..5 {
            assert!(!p.keep_polling(&s, false) || p.window(false) > Duration::ZERO);
            p.slept(Duration::from_micros(20));
        }
        // The backing answers in 70 µs, beyond the bound: that window stays shut.
        for _ in 0..5 {
            p.keep_polling(&s, true);
            p.slept(Duration::from_micros(70));
        }
        assert_eq!(p.window(false).as_micros(), 64);
        assert_eq!(p.window(true), Duration::ZERO);
        assert!(!p.keep_polling(&s, true), "no polling while the slow backing works");
        p.work_found();
        assert!(p.keep_polling(&s, false), "but polling for the guest's next request");
        // A fast backing (10 µs) is polled for: the window grows until it catches the
        // completions, and stays there.
        let (mut p, s) = adaptive(64);
        for _ in 0..20 {
            let polling = p.keep_polling(&s, true);
            if polling && p.window(true) >= Duration::from_micros(10) {
                p.work_found_after(Duration::from_micros(10));
            } else {
                p.slept(Duration::from_micros(10));
            }
        }
        assert_eq!(p.window(true).as_micros(), 16);
    }

    #[test]
    fn polling_that_keeps_missing_at_its_cap_stops() {
        let (mut p, s) = adaptive(64);
        // The work comes 60 µs after each sleep begins: within the bound, so the old rule
        // would poll 64 µs every time. It never arrives while polling (the polling held
        // the CPU it needed), so the cap comes down and the polling stops.
        for _ in 0..40 {
            p.keep_polling(&s, false);
            p.slept(Duration::from_micros(60));
        }
        assert!(p.window(false) <= Duration::from_micros(4), "{:?}", p.window(false));
        // Every few hundred sleeps the cap is probed upwards, so this costs little.
        let mut polled = Duration::ZERO;
        for _ in 0..1000 {
            if p.keep_polling(&s, false) {
                polled += p.window(false);
            }
            p.slept(Duration::from_micros(60));
        }
        assert!(polled < Duration::from_micros(1000 * 2), "{polled:?} over 1000 periods");
    }

    /// Per unit of work, `(wall_us, cpu_us)` of each way, as [`Way::ALL`].
    type Trials = [(u64, u64); 3];

    /// Drives a new chooser through one trial of each way and returns the way it then uses.
    fn choose_after_trials(trials: Trials) -> Way {
        let t0 = Instant::now();
        let mut c = Chooser::new(t0);
        run_trials(&mut c, t0, &std::cell::Cell::new(0), trials)
    }

    /// One trial of each way on `c`, starting at `now`; returns the way it then uses and
    /// leaves `c` at the start of its exploit period.
    fn run_trials(
        c: &mut Chooser,
        mut now: Instant,
        cpu: &std::cell::Cell<u64>,
        trials: Trials,
    ) -> Way {
        for (way, (wall_us, cpu_us)) in Way::ALL.into_iter().zip(trials) {
            let began = now;
            while now.duration_since(began) < TRIAL_FOR {
                assert_eq!(c.way_at(now, || cpu.get()), way, "the way under trial");
                c.worked(1);
                now += Duration::from_micros(wall_us);
                cpu.set(cpu.get() + cpu_us * 1000);
            }
        }
        c.way_at(now, || cpu.get())
    }

    #[test]
    fn one_slow_trial_does_not_flip_the_choice() {
        // ext4, sleeping client, as measured: polling 50 µs at 47 µs of CPU, sleeping 55 µs
        // at 27 µs, and now and then a sleeping trial of 120 µs.
        let t0 = Instant::now();
        let mut c = Chooser::new(t0);
        let cpu = std::cell::Cell::new(0);
        let mut at = t0;
        for i in 0..4 {
            assert_eq!(run_trials(&mut c, at, &cpu, DISK), Way::Sleep, "trials {i}");
            // Sleeping at the pace its trials saw, until the next trials.
            at = exploit_at(&mut c, at + 3 * TRIAL_FOR, &cpu, 55);
        }
        let slow = [(50, 47), (53, 40), (120, 40)];
        assert_eq!(run_trials(&mut c, at, &cpu, slow), Way::Sleep, "the slow trial alone");
        let fresh = c.fresh.take().expect("a decision to show");
        assert_eq!(fresh.way, Way::Sleep);
        let sleep = fresh.scores[2].unwrap();
        assert_eq!(sleep.wall_ns_per_work, 55_000.0, "the median of 120, 55 and 55 µs");
        // Had it stood alone, it would have polled: 70 µs bought for 26 µs of CPU.
        assert_eq!(choose_after_trials([(50, 47), (60, 45), (120, 21)]), Way::Poll);
    }

    #[test]
    fn the_chooser_takes_the_way_that_buys_more_time_than_it_costs() {
        // tmpfs, sleeping client (issue 27): polling 21 µs a request at 21 µs of CPU,
        // sleeping 45 µs at 15: polling buys 24 µs for 6 µs more CPU.
        assert_eq!(choose_after_trials([(21, 21), (40, 16), (45, 15)]), Way::Poll);
        // The disk, sleeping client: polling made the cycle longer (100 µs against 81), at
        // 71 µs of CPU against 39.
        assert_eq!(choose_after_trials([(100, 71), (95, 60), (81, 39)]), Way::Sleep);
        // Polling that gains 10 µs for 20 µs more CPU does not pay, nor 30 µs for 20.
        assert_eq!(choose_after_trials([(50, 40), (60, 30), (60, 20)]), Way::Sleep);
        assert_eq!(choose_after_trials([(50, 40), (80, 30), (80, 20)]), Way::Sleep);
        // 40 µs for 20 does.
        assert_eq!(choose_after_trials([(50, 40), (90, 30), (90, 20)]), Way::Poll);
        // The disk, polling client: polling for the next request buys the wake-up (60 µs
        // against 45), polling for completions too but spends their whole 30 µs in CPU.
        assert_eq!(choose_after_trials([(43, 41), (48, 22), (60, 20)]), Way::PollRequests);
    }

    /// Works at one unit every `wall_us` from `now` while `c` exploits; returns when the
    /// trials begin again.
    fn exploit_at(
        c: &mut Chooser,
        mut now: Instant,
        cpu: &std::cell::Cell<u64>,
        wall_us: u64,
    ) -> Instant {
        while c.way_at(now, || cpu.get()) != Way::Poll || c.exploit_ends().is_some() {
            c.worked(1);
            now += Duration::from_micros(wall_us);
        }
        now
    }

    #[test]
    fn the_same_choice_is_kept_longer_each_time_up_to_a_bound() {
        let t0 = Instant::now();
        let mut c = Chooser::new(t0);
        let cpu = std::cell::Cell::new(0);
        let mut at = t0;
        let mut lengths = Vec::new();
        for _ in 0..6 {
            assert_eq!(run_trials(&mut c, at, &cpu, DISK), Way::Sleep);
            let began = at + 3 * TRIAL_FOR;
            at = exploit_at(&mut c, began, &cpu, 55);
            lengths.push(at.duration_since(began).as_millis() / 10 * 10);
        }
        assert_eq!(lengths, [200, 400, 800, 1600, 1600, 1600]);
        // Another choice (the second trial that favours it makes the median) starts over.
        let tmpfs = [(21, 21), (40, 16), (45, 15)];
        assert_eq!(run_trials(&mut c, at, &cpu, tmpfs), Way::Sleep);
        // Exploited at the rate it was chosen at (the median still says 55 µs): no change
        // of load, so what starts over below is the new choice.
        at = exploit_at(&mut c, at + 3 * TRIAL_FOR, &cpu, 55);
        assert_eq!(run_trials(&mut c, at, &cpu, tmpfs), Way::Poll);
        assert_eq!(ms_until_trials(&c, at + 3 * TRIAL_FOR), 200);
    }

    /// Whole 10 ms until the exploit period of `c` that began about `began` ends.
    fn ms_until_trials(c: &Chooser, began: Instant) -> u128 {
        c.exploit_ends().expect("exploiting").duration_since(began).as_millis() / 10 * 10
    }

    /// ext4, sleeping client: each way's wall and CPU µs per unit of work.
    const DISK: Trials = [(50, 47), (53, 40), (55, 27)];

    /// A chooser that chose to sleep on [`DISK`]'s figures five times in a row, at the start
    /// of its longest exploit period: the chooser, its CPU clock and when that period began.
    fn settled_on_the_disk() -> (Chooser, std::cell::Cell<u64>, Instant) {
        let t0 = Instant::now();
        let mut c = Chooser::new(t0);
        let cpu = std::cell::Cell::new(0);
        let mut at = t0;
        for _ in 0..4 {
            run_trials(&mut c, at, &cpu, DISK);
            at = exploit_at(&mut c, at + 3 * TRIAL_FOR, &cpu, 55);
        }
        run_trials(&mut c, at, &cpu, DISK);
        let began = at + 3 * TRIAL_FOR;
        assert_eq!(ms_until_trials(&c, began), 1600);
        (c, cpu, began)
    }

    #[test]
    fn a_change_of_load_brings_the_trials_back_early() {
        let (mut c, cpu, began) = settled_on_the_disk();
        // Three times the work (more tenants on the thread): new trials after 200 ms.
        let back = exploit_at(&mut c, began, &cpu, 18);
        assert_eq!(back.duration_since(began).as_millis() / 10 * 10, 200);
        run_trials(&mut c, back, &cpu, DISK);
        let began = back + 3 * TRIAL_FOR;
        assert_eq!(ms_until_trials(&c, began), 200, "a changed load starts over");
        // Within the factor of two (55 µs against 40): the period doubles again.
        let next = exploit_at(&mut c, began, &cpu, 40);
        assert_eq!(next.duration_since(began).as_millis() / 10 * 10, 200);
        run_trials(&mut c, next, &cpu, DISK);
        assert_eq!(ms_until_trials(&c, next + 3 * TRIAL_FOR), 400);
    }

    #[test]
    fn a_change_of_load_late_in_a_long_period_is_seen_within_two_windows() {
        let (mut c, cpu, began) = settled_on_the_disk();
        // A second at the old pace, then three times the work.
        let mut now = began;
        while now < began + Duration::from_secs(1) {
            assert!(c.exploit_ends().is_some(), "no new trials at the old pace");
            c.way_at(now, || cpu.get());
            c.worked(1);
            now += Duration::from_micros(55);
        }
        let changed_at = now;
        let back = exploit_at(&mut c, now, &cpu, 18);
        assert!(back.duration_since(changed_at) <= 2 * EXPLOIT_FOR, "{:?}", back - changed_at);
        assert!(c.trials.iter().all(Option::is_none), "the old load's trials were kept");
    }

    #[test]
    fn the_chooser_sleeps_without_work_and_tries_again_later() {
        let t0 = Instant::now();
        let mut c = Chooser::new(t0);
        let cpu = || 0;
        assert_eq!(c.way_at(t0, cpu), Way::Poll, "the first trial polls");
        assert_eq!(c.way_at(t0 + TRIAL_FOR, cpu), Way::PollRequests, "then polls for requests");
        assert_eq!(c.way_at(t0 + 2 * TRIAL_FOR, cpu), Way::Sleep, "then sleeps");
        let after_trials = t0 + 3 * TRIAL_FOR;
        assert_eq!(c.way_at(after_trials, cpu), Way::Sleep, "no work seen: sleep");
        assert_eq!(c.way_at(after_trials + EXPLOIT_FOR / 2, cpu), Way::Sleep);
        assert_eq!(c.way_at(after_trials + EXPLOIT_FOR, cpu), Way::Poll, "new trials");
    }

    #[test]
    fn polling_for_requests_sleeps_while_io_is_in_flight() {
        assert!(Way::PollRequests.polls(false));
        assert!(!Way::PollRequests.polls(true));
        assert!(Way::Poll.polls(true) && !Way::Sleep.polls(false));
    }

    #[test]
    fn a_thread_that_chose_to_sleep_does_not_poll() {
        let (mut p, s) = adaptive(64);
        // Windows grown by short sleeps while polling is on trial.
        for _ in 0..6 {
            assert!(!p.keep_polling(&s, false) || p.window(false) > Duration::ZERO);
            p.slept(Duration::from_micros(20));
        }
        assert!(p.keep_polling(&s, false));
        p.work_found();
        // The chooser settles on sleeping (no work seen in its trials).
        p.chooser = Chooser::new(Instant::now() - 4 * TRIAL_FOR);
        p.chooser.way_at(Instant::now() - 3 * TRIAL_FOR, || 0);
        p.chooser.way_at(Instant::now() - 2 * TRIAL_FOR, || 0);
        assert!(!p.keep_polling(&s, false), "sleeps at once");
        let window = p.window(false);
        p.slept(Duration::from_millis(5));
        assert_eq!(p.window(false), window, "a sleep by choice leaves the windows alone");
    }
}
