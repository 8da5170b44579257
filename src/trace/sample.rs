//! The per-request sampler a queue's I/O thread runs: it picks one request in
//! [`SAMPLE_EVERY`], stamps it at each layer boundary, and records the stage times; it also
//! records every request's seen → notified time, from one clock read per fetch round and one
//! per notification. Both go into the queue's own histograms, handed to the shared ones (a
//! mutex) at most every [`MERGE_EVERY`] or when the thread goes idle. Nothing here allocates
//! after start-up.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Kind, LatencyHistograms, LatencyKind, Stage, MERGE_EVERY, SAMPLE_EVERY};

/// Layer-boundary timestamps of a sampled request.
#[derive(Clone, Copy)]
struct Stamps {
    seen: Instant,
    parsed: Instant,
    submitted: Instant,
    completed: Instant,
}

impl Stamps {
    fn new(now: Instant) -> Stamps {
        Stamps { seen: now, parsed: now, submitted: now, completed: now }
    }
}

/// One I/O thread's sampler, for requests identified by their slot (tag).
pub struct Sampler {
    on: bool,
    /// Counts down to the next sampled request.
    countdown: u32,
    /// Whether the request in each slot is sampled, and its stamps so far.
    sampled: Box<[bool]>,
    stamps: Box<[Stamps]>,
    /// When the request in each slot was seen (its fetch round's time).
    seen_at: Box<[Instant]>,
    /// The current fetch round's time, read when it takes its first request.
    round_seen: Option<Instant>,
    /// Seen times and kinds of the requests answered this round, waiting for their notify
    /// time (reserved for every slot at start: pushing never allocates).
    answered: Vec<(Instant, LatencyKind)>,
    /// Sampled requests handed to the engine this round, waiting for their submit time.
    submitting: Vec<u16>,
    /// Sampled requests finished this round, waiting for their publish and notify times.
    done: Vec<Stamps>,
    histograms: LatencyHistograms,
    /// Samples recorded since the last merge.
    unmerged: bool,
    last_merge: Instant,
}

impl Sampler {
    /// A sampler for `slots` request slots; `on: false` samples nothing.
    pub fn new(on: bool, slots: usize) -> Sampler {
        let now = Instant::now();
        Sampler {
            on,
            countdown: 1,
            sampled: vec![false; slots].into_boxed_slice(),
            stamps: vec![Stamps::new(now); slots].into_boxed_slice(),
            seen_at: vec![now; slots].into_boxed_slice(),
            round_seen: None,
            answered: Vec::with_capacity(slots),
            submitting: Vec::with_capacity(slots),
            done: Vec::with_capacity(slots),
            histograms: LatencyHistograms::allocated(),
            unmerged: false,
            last_merge: now,
        }
    }

    /// A fetch round begins: the first request it takes reads the clock for all of them.
    pub fn round_begins(&mut self) {
        self.round_seen = None;
    }

    /// A request was taken from the ring into slot `tag`: note when, and sample it or not.
    pub fn seen(&mut self, tag: u16) {
        if !self.on {
            return;
        }
        let now = *self.round_seen.get_or_insert_with(Instant::now);
        let i = usize::from(tag);
        self.seen_at[i] = now;
        let sampled = {
            self.countdown -= 1;
            if self.countdown == 0 {
                self.countdown = SAMPLE_EVERY;
            }
            self.countdown == SAMPLE_EVERY
        };
        self.sampled[i] = sampled;
        if sampled {
            self.stamps[i] = Stamps::new(now);
        }
    }

    /// The request in slot `tag` was parsed (and is about to be submitted or answered).
    pub fn parsed(&mut self, tag: u16) {
        let i = usize::from(tag);
        if self.sampled[i] {
            let now = Instant::now();
            self.stamps[i].parsed = now;
            self.stamps[i].submitted = now;
        }
    }

    /// The request in slot `tag` was queued to the engine; its submit time comes with the
    /// batch's submit.
    pub fn queued(&mut self, tag: u16) {
        if self.sampled[usize::from(tag)] {
            self.submitting.push(tag);
        }
    }

    /// The batch was submitted: stamps the sampled requests queued in it.
    pub fn submitted(&mut self) {
        if self.submitting.is_empty() {
            return;
        }
        let now = Instant::now();
        for &tag in &self.submitting {
            self.stamps[usize::from(tag)].submitted = now;
        }
        self.submitting.clear();
    }

    /// The request of `kind` in slot `tag` is answered (its used entry is pushed).
    pub fn completed(&mut self, tag: u16, kind: Kind) {
        if !self.on {
            return;
        }
        let i = usize::from(tag);
        let kind = LatencyKind::of(kind);
        if self.answered.len() < self.answered.capacity() {
            self.answered.push((self.seen_at[i], kind));
        } else {
            // More answers in one round than slots (a slot answered at once and taken again
            // in the same fetch): this one is timed now, without its notification.
            let ns = self.seen_at[i].elapsed().as_nanos() as u64;
            self.histograms.record_request(kind, ns);
            self.unmerged = true;
        }
        if std::mem::take(&mut self.sampled[i]) {
            self.stamps[i].completed = Instant::now();
            self.done.push(self.stamps[i]);
        }
    }

    /// Whether sampled requests wait for their publish time.
    pub fn has_done(&self) -> bool {
        !self.done.is_empty()
    }

    /// Whether answered requests (timed, or sampled) wait for their notify time.
    pub fn waiting(&self) -> bool {
        !self.answered.is_empty() || !self.done.is_empty()
    }

    /// Records the times of the requests answered this round, notified at `notified` (the
    /// sampled ones' stages, published at `published`), and now and then hands the
    /// histograms to `shared`.
    pub fn record(
        &mut self,
        published: Option<Instant>,
        notified: Instant,
        shared: &Mutex<LatencyHistograms>,
    ) {
        let ns = |a: Instant, b: Instant| b.saturating_duration_since(a).as_nanos() as u64;
        let h = &mut self.histograms;
        for &(seen, kind) in &self.answered {
            h.record_request(kind, ns(seen, notified));
        }
        self.answered.clear();
        let published = published.unwrap_or(notified);
        for s in &self.done {
            h.record(Stage::Parse, ns(s.seen, s.parsed));
            h.record(Stage::Submit, ns(s.parsed, s.submitted));
            h.record(Stage::Backend, ns(s.submitted, s.completed));
            h.record(Stage::Publish, ns(s.completed, published));
            h.record(Stage::Notify, ns(published, notified));
            h.record(Stage::Total, ns(s.seen, notified));
        }
        self.done.clear();
        self.unmerged = true;
        if notified.duration_since(self.last_merge) >= MERGE_EVERY {
            self.merge(shared);
            self.last_merge = notified;
        }
    }

    /// Hands what was recorded since the last merge to `shared`.
    pub fn merge(&mut self, shared: &Mutex<LatencyHistograms>) {
        if !self.unmerged {
            return;
        }
        let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
        self.histograms.merge_into(&mut shared);
        self.unmerged = false;
    }

    /// Before the thread sleeps: samples not yet handed over go now if the last merge is old
    /// enough; otherwise this says when they will be due, so that an idle export's figures
    /// are fresh (the sleep should not last longer).
    pub fn merge_before_sleep(&mut self, shared: &Mutex<LatencyHistograms>) -> Option<Duration> {
        if !self.unmerged {
            return None;
        }
        let since = self.last_merge.elapsed();
        if since >= MERGE_EVERY {
            self.merge(shared);
            self.last_merge = Instant::now();
            None
        } else {
            Some(MERGE_EVERY - since)
        }
    }
}
