//! A mirror's bookkeeping, pure (no I/O, no threads): how far the copy has gone, which chunk
//! it is copying, and what a guest write that just completed on the source means for the
//! target. The job and the I/O threads call it under one mutex (`mirror::Mirror`); the
//! property test at the end drives it against two byte vectors.
//!
//! The copy goes through the image in order, one chunk at a time, so the image is always
//! three parts: `[0, copied_end)` is on the target and kept there (a guest write to it is
//! copied again before the guest hears of it), the chunk being copied, and the rest, which the
//! copy will read later (a guest write there goes to the source alone). A guest write that
//! overlaps the chunk being copied marks it dirty: the job may have read the old data, so it
//! copies the chunk again. After `EXCLUSIVE_AFTER_RETRIES` dirty copies of one chunk the job
//! copies it as passed: it counts it in `[0, copied_end)` before reading it and holds the
//! guests' copy lock while it copies, so that guest writes to it wait and then copy it again
//! themselves: the job converges under any write load.

use std::ops::Range;

/// Dirty copies of one chunk after which it is copied with the guests' writes held back.
pub const EXCLUSIVE_AFTER_RETRIES: u32 = 3;

/// The chunk the job is copying now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Current {
    start: u64,
    end: u64,
    /// A guest write to it completed since the job began reading it.
    dirty: bool,
    /// Copies of this chunk that came back dirty.
    retries: u32,
    /// Counted as passed already: guest writes to it copy it again themselves.
    exclusive: bool,
}

/// One chunk for the job to copy: `range` of the image; with `exclusive`, while it holds the
/// guests' copy lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub range: Range<u64>,
    pub exclusive: bool,
}

/// What became of a chunk the job copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copied {
    /// On the target for good.
    Done,
    /// A guest wrote to it meanwhile: copy it again.
    Again,
}

/// How far a mirror has copied an image of `size_bytes`.
#[derive(Clone, Debug)]
pub struct Progress {
    size_bytes: u64,
    chunk_bytes: u64,
    copied_end: u64,
    current: Option<Current>,
    /// Bytes copied again for the guests' writes, and by retries (for the statistics).
    recopied_bytes: u64,
}

impl Progress {
    /// A copy of `size_bytes` in chunks of `chunk_bytes` (non-zero), none copied yet.
    pub fn new(size_bytes: u64, chunk_bytes: u64) -> Progress {
        assert!(chunk_bytes > 0, "a chunk has bytes");
        Progress { size_bytes, chunk_bytes, copied_end: 0, current: None, recopied_bytes: 0 }
    }

    /// Bytes on the target for good: the copy's progress.
    pub fn copied_bytes(&self) -> u64 {
        match self.current {
            Some(c) if c.exclusive => c.start,
            _ => self.copied_end,
        }
    }

    pub fn recopied_bytes(&self) -> u64 {
        self.recopied_bytes
    }

    /// Everything is on the target: guest writes keep it so (the job is ready).
    #[cfg(test)]
    pub fn is_complete(&self) -> bool {
        self.current.is_none() && self.copied_end >= self.size_bytes
    }

    /// The next chunk to copy (the one that came back dirty, else the one after the copied
    /// part), or None when the copy is complete. The caller copies it and calls [`finish`].
    ///
    /// [`finish`]: Progress::finish
    pub fn begin(&mut self) -> Option<Chunk> {
        if let Some(c) = self.current.as_mut() {
            // Retried (or begun twice): the same chunk again, from clean.
            c.dirty = false;
            if c.retries >= EXCLUSIVE_AFTER_RETRIES && !c.exclusive {
                c.exclusive = true;
                self.copied_end = c.end;
            }
            return Some(Chunk { range: c.start..c.end, exclusive: c.exclusive });
        }
        if self.copied_end >= self.size_bytes {
            return None;
        }
        let start = self.copied_end;
        let end = (start + self.chunk_bytes).min(self.size_bytes);
        self.current = Some(Current { start, end, dirty: false, retries: 0, exclusive: false });
        Some(Chunk { range: start..end, exclusive: false })
    }

    /// The job copied the chunk [`begin`] gave. An exclusive copy is always done (guest
    /// writes to it waited and copy it again themselves).
    ///
    /// [`begin`]: Progress::begin
    pub fn finish(&mut self) -> Copied {
        let Some(mut c) = self.current.take() else { return Copied::Done };
        if c.dirty && !c.exclusive {
            c.retries += 1;
            self.recopied_bytes += c.end - c.start;
            self.current = Some(c);
            return Copied::Again;
        }
        self.copied_end = self.copied_end.max(c.end);
        Copied::Done
    }

    /// A guest write (or discard, or write-zeroes) of `bytes` at `offset` completed on the
    /// source. Returns the part of it the caller must copy to the target before answering the
    /// guest (the part the copy has passed), or None. A part in the chunk being copied marks it
    /// dirty; a part beyond it is for the copy to find later.
    pub fn guest_wrote(&mut self, offset: u64, bytes: u64) -> Option<Range<u64>> {
        let end = offset.saturating_add(bytes).min(self.size_bytes);
        if let Some(c) = self.current.as_mut() {
            if !c.exclusive && offset < c.end && end > c.start {
                c.dirty = true;
            }
        }
        let passed = offset..end.min(self.copied_end);
        if passed.is_empty() {
            return None;
        }
        self.recopied_bytes += passed.end - passed.start;
        Some(passed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn copies_in_order_and_completes() {
        let mut p = Progress::new(10, 4);
        assert_eq!(p.begin(), Some(Chunk { range: 0..4, exclusive: false }));
        assert_eq!(p.finish(), Copied::Done);
        assert_eq!(p.begin().unwrap().range, 4..8);
        assert_eq!(p.guest_wrote(2, 4), Some(2..4), "the passed part only");
        assert_eq!(p.finish(), Copied::Again, "the write touched the chunk being copied");
        assert_eq!(p.begin().unwrap().range, 4..8);
        assert_eq!(p.finish(), Copied::Done);
        assert_eq!(p.guest_wrote(9, 1), None, "not reached yet");
        assert_eq!(p.begin().unwrap().range, 8..10);
        assert_eq!(p.finish(), Copied::Done);
        assert!(p.is_complete());
        assert_eq!(p.begin(), None);
        assert_eq!(p.guest_wrote(0, 100), Some(0..10), "clipped to the image");
    }

    #[test]
    fn a_chunk_written_to_on_every_copy_is_copied_exclusively() {
        let mut p = Progress::new(8, 4);
        for _ in 0..EXCLUSIVE_AFTER_RETRIES {
            assert!(!p.begin().unwrap().exclusive);
            p.guest_wrote(1, 1);
            assert_eq!(p.finish(), Copied::Again);
        }
        assert_eq!(p.begin(), Some(Chunk { range: 0..4, exclusive: true }));
        assert_eq!(p.copied_bytes(), 0, "not counted as copied before it is");
        assert_eq!(p.guest_wrote(1, 1), Some(1..2), "a guest write copies it itself");
        assert_eq!(p.finish(), Copied::Done);
        assert_eq!(p.copied_bytes(), 4);
    }

    /// One step of a run: the job's copy and the guests' writes, each split where another
    /// thread may come between (the copy reads, then writes; a guest write lands on the
    /// source, then its completion is looked at, then its passed part is read and written).
    #[derive(Clone, Debug)]
    enum Step {
        /// The job takes its next step.
        Job,
        /// A new guest write of `len` bytes of `byte` at `offset` (`len` 0: a write-zeroes of
        /// 1..=16 bytes, so zeroes and discards are in the runs too).
        GuestWrite { offset: u64, len: u64, byte: u8 },
        /// The guest write `which` (modulo those in flight) takes its next step.
        Guest { which: usize },
    }

    /// Where the job is in copying its chunk.
    enum JobAt {
        Idle,
        /// Read the chunk's source bytes; next: write them to the target.
        Read {
            chunk: Chunk,
            data: Vec<u8>,
        },
    }

    /// A guest write as it moves through its steps.
    enum GuestAt {
        /// On the source; next: tell the bookkeeping.
        Landed { offset: u64, bytes: u64 },
        /// Must copy `range` again; next: read it (waits while the job copies exclusively, or
        /// another guest copy runs: the copy lock).
        Passed { range: Range<u64> },
        /// Holds the copy lock with what it read; next: write it to the target.
        Read { range: Range<u64>, data: Vec<u8> },
    }

    struct Model {
        source: Vec<u8>,
        target: Vec<u8>,
        progress: Progress,
        job: JobAt,
        guests: Vec<GuestAt>,
        /// Who holds the guests' copy lock: the job (exclusive chunk) or a guest copy.
        lock_held: bool,
    }

    impl Model {
        fn job_step(&mut self) {
            match std::mem::replace(&mut self.job, JobAt::Idle) {
                JobAt::Idle => {
                    let Some(chunk) = self.progress.begin() else { return };
                    if chunk.exclusive {
                        if self.lock_held {
                            // Waits for the lock: nothing happened yet, begin again later.
                            return;
                        }
                        self.lock_held = true;
                    }
                    let r = chunk.range.start as usize..chunk.range.end as usize;
                    self.job = JobAt::Read { data: self.source[r].to_vec(), chunk };
                }
                JobAt::Read { chunk, data } => {
                    let start = chunk.range.start as usize;
                    self.target[start..start + data.len()].copy_from_slice(&data);
                    if chunk.exclusive {
                        self.lock_held = false;
                    }
                    self.progress.finish();
                }
            }
        }

        fn guest_step(&mut self, which: usize) {
            if self.guests.is_empty() {
                return;
            }
            let i = which % self.guests.len();
            let next = match &self.guests[i] {
                GuestAt::Landed { offset, bytes } => self
                    .progress
                    .guest_wrote(*offset, *bytes)
                    .map(|range| GuestAt::Passed { range }),
                GuestAt::Passed { range } => {
                    if self.lock_held {
                        return;
                    }
                    self.lock_held = true;
                    let r = range.start as usize..range.end as usize;
                    Some(GuestAt::Read { data: self.source[r].to_vec(), range: range.clone() })
                }
                GuestAt::Read { range, data } => {
                    let start = range.start as usize;
                    self.target[start..start + data.len()].copy_from_slice(data);
                    self.lock_held = false;
                    None
                }
            };
            match next {
                Some(at) => self.guests[i] = at,
                None => {
                    self.guests.swap_remove(i);
                }
            }
        }

        /// Lets every guest write and the job finish, in turns.
        fn run_out(&mut self) {
            for _ in 0..100_000 {
                if self.guests.is_empty()
                    && matches!(self.job, JobAt::Idle)
                    && self.progress.is_complete()
                {
                    return;
                }
                self.job_step();
                // Every guest write a step (the one holding the copy lock among them).
                for i in (0..self.guests.len()).rev() {
                    self.guest_step(i);
                }
            }
            panic!("the copy did not complete");
        }
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Job),
            2 => (0u64..70, 0u64..20, any::<u8>())
                .prop_map(|(offset, len, byte)| Step::GuestWrite { offset, len, byte }),
            3 => any::<usize>().prop_map(|which| Step::Guest { which }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any interleaving of guest writes (at chunk boundaries, inside and across the chunk
        /// being copied, while it is copied again) with the copy leaves the target equal to
        /// the source once the copy completed and the writes were answered.
        #[test]
        fn target_equals_source_at_completion(
            size in 1u64..64,
            chunk in 1u64..17,
            steps in proptest::collection::vec(step(), 0..300),
        ) {
            let source: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(7) | 1).collect();
            let mut m = Model {
                target: vec![0xEE; size as usize],
                source,
                progress: Progress::new(size, chunk),
                job: JobAt::Idle,
                guests: Vec::new(),
                lock_held: false,
            };
            for s in steps {
                match s {
                    Step::Job => m.job_step(),
                    Step::GuestWrite { offset, len, byte } => {
                        let offset = offset % size;
                        let (len, byte) = if len == 0 { (1 + u64::from(byte) % 16, 0) } else { (len, byte) };
                        let end = (offset + len).min(size);
                        m.source[offset as usize..end as usize].fill(byte);
                        m.guests.push(GuestAt::Landed { offset, bytes: end - offset });
                    }
                    Step::Guest { which } => m.guest_step(which),
                }
            }
            m.run_out();
            prop_assert_eq!(&m.target, &m.source);
            prop_assert_eq!(m.progress.copied_bytes(), size);
        }
    }
}
