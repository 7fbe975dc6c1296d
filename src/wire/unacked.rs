//! (broker, socket transport) What a receiver has been sent and has not acknowledged yet.
//!
//! The broker records every data frame it has completely written into a receiver's socket
//! (the kernel took it) as a run `(origin, frames, each)`: `frames` consecutive frames of
//! publisher slot `origin` that stand for `each` lost events apiece if they never reach a
//! callback (an event: 1; a `LOST` notice: its count; a unique event: 0). The receiver
//! acknowledges, with its running total of data frames dispatched on the connection
//! (callbacks run, not merely read), at the end of each dispatch pass; an acknowledgement
//! pops runs from the front, the front one in part. When the connection ends, what is left
//! was never dispatched: the transport owes it to the slot's next holder as lost notices.
//!
//! Totals are per connection, from 0. Everything the peer says is untrusted: an
//! acknowledgement above the frames written, or below an earlier one, is a protocol
//! violation (logged once; clamped to what was written, or ignored). The FIFO is bounded
//! by [`MAX_RUNS`] whatever the peer does: an honest receiver acknowledges every pass, so
//! it never holds more runs than the frames its socket buffer and its reader hold; past
//! the bound the oldest run is forgotten (taken as acknowledged) and that is logged once.

use std::collections::VecDeque;

/// Most runs kept per connection (a receiver that never acknowledges cannot grow the
/// broker's memory past this: 24 bytes a run).
pub(crate) const MAX_RUNS: usize = 1 << 16;

/// What one data frame counts for if it is never dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tag {
    /// The publisher slot it is owed to.
    pub origin: u32,
    /// Events it stands for (0: nothing to report, e.g. a unique event).
    pub each: u64,
}

impl Tag {
    /// A frame that stands for nothing to report (a unique event, or not a data frame).
    pub(crate) const NOTHING: Tag = Tag { origin: 0, each: 0 };
}

/// `frames` consecutive frames with the same [`Tag`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    tag: Tag,
    frames: u64,
}

/// The runs written and not acknowledged on one connection, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Unacked {
    runs: VecDeque<Run>,
    /// Frames written on this connection.
    written: u64,
    /// Frames acknowledged (or forgotten past [`MAX_RUNS`]) on this connection.
    acked: u64,
    /// A violation was logged (logged once per queue).
    warned: bool,
    /// Runs were forgotten past [`MAX_RUNS`] on this connection: a late acknowledgement of
    /// them is no violation.
    forgot: bool,
}

impl Unacked {
    /// One more frame completely written.
    pub(crate) fn written(&mut self, tag: Tag) {
        self.written = self.written.saturating_add(1);
        if let Some(last) = self.runs.back_mut() {
            if last.tag == tag {
                last.frames = last.frames.saturating_add(1);
                return;
            }
        }
        if self.runs.len() >= MAX_RUNS {
            if let Some(old) = self.runs.pop_front() {
                self.acked = self.acked.saturating_add(old.frames);
                self.forgot = true;
                self.warn("a worker does not acknowledge what it is sent; forgetting the oldest");
            }
        }
        self.runs.push_back(Run { tag, frames: 1 });
    }

    /// The receiver dispatched `total` frames of this connection so far. Returns false for a
    /// protocol violation (above what was written: clamped; below an earlier total: ignored).
    pub(crate) fn ack(&mut self, total: u64) -> bool {
        let ok = total <= self.written;
        if !ok {
            self.warn("a worker acknowledged more than it was sent");
        }
        let total = total.min(self.written);
        if total < self.acked {
            // Below what is popped already: an earlier total, or frames forgotten past
            // MAX_RUNS (no violation then).
            if !self.forgot {
                self.warn("a worker's acknowledgement went backwards");
                return false;
            }
            return ok;
        }
        let mut n = total - self.acked;
        self.acked = total;
        while n > 0 {
            let Some(front) = self.runs.front_mut() else { break };
            if front.frames > n {
                front.frames -= n;
                break;
            }
            n -= front.frames;
            self.runs.pop_front();
        }
        ok
    }

    /// The connection ended: what was never acknowledged, summed by publisher (tags with
    /// nothing to report left out; at most one entry per origin), and the frames of it. The
    /// FIFO starts over (the next connection counts from 0).
    pub(crate) fn take(&mut self) -> (Vec<(u32, u64)>, u64) {
        let mut owed: Vec<(u32, u64)> = Vec::new();
        let mut frames = 0u64;
        for r in self.runs.drain(..) {
            frames = frames.saturating_add(r.frames);
            let n = r.frames.saturating_mul(r.tag.each);
            if n == 0 {
                continue;
            }
            match owed.iter_mut().find(|(o, _)| *o == r.tag.origin) {
                Some(e) => e.1 = e.1.saturating_add(n),
                None => owed.push((r.tag.origin, n)),
            }
        }
        self.written = 0;
        self.acked = 0;
        self.forgot = false;
        (owed, frames)
    }

    /// Frames written and not acknowledged.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> u64 {
        self.written - self.acked
    }

    fn warn(&mut self, what: &str) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(written = self.written, acked = self.acked, "{what} (logged once)");
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ev(origin: u32) -> Tag {
        Tag { origin, each: 1 }
    }

    #[test]
    fn runs_merge_and_pop_in_part() {
        let mut u = Unacked::default();
        for _ in 0..3 {
            u.written(ev(1));
        }
        u.written(ev(2));
        u.written(ev(2));
        u.written(ev(1));
        assert_eq!(u.runs.len(), 3, "consecutive frames of one origin merge");
        assert!(u.ack(2));
        assert_eq!(u.runs.front(), Some(&Run { tag: ev(1), frames: 1 }), "the front run popped in part");
        assert!(u.ack(4));
        assert_eq!(u.runs.front(), Some(&Run { tag: ev(2), frames: 1 }));
        assert_eq!(u.pending(), 2);
        assert_eq!(u.take(), (vec![(2, 1), (1, 1)], 2));
        assert_eq!((u.written, u.acked, u.runs.len()), (0, 0, 0), "a new connection counts from 0");
    }

    #[test]
    fn notices_and_unique_events_count_what_they_stand_for() {
        let mut u = Unacked::default();
        u.written(ev(1));
        u.written(Tag { origin: 1, each: 7 }); // a LOST notice of 7 events of slot 1
        u.written(Tag { origin: 1, each: 7 }); // another: merges, each stands for 7
        u.written(Tag::NOTHING); // a unique event
        u.written(ev(1));
        assert_eq!(u.runs.len(), 4);
        assert!(u.ack(2)); // the event and the first notice
        assert_eq!(u.take(), (vec![(1, 8)], 3));
        let mut u = Unacked::default();
        u.written(ev(3));
        assert!(u.ack(1));
        assert_eq!(u.take(), (vec![], 0), "everything acknowledged: nothing owed");
    }

    #[test]
    fn hostile_acknowledgements_are_clamped_or_ignored() {
        let mut u = Unacked::default();
        for _ in 0..5 {
            u.written(ev(1));
        }
        assert!(u.ack(3));
        assert!(!u.ack(2), "backwards: a violation, ignored");
        assert_eq!(u.pending(), 2);
        assert!(!u.ack(u64::MAX), "above what was written: a violation, clamped");
        assert_eq!(u.pending(), 0);
        assert!(u.runs.is_empty());
        u.written(ev(1));
        assert_eq!(u.pending(), 1, "later frames are tracked again");
        assert!(u.ack(6));
        assert_eq!(u.take(), (vec![], 0));
    }

    #[test]
    fn the_fifo_is_bounded() {
        let mut u = Unacked::default();
        for i in 0..(MAX_RUNS as u32 + 10) {
            u.written(ev(i % 2)); // alternating origins: one run per frame
        }
        assert_eq!(u.runs.len(), MAX_RUNS);
        assert_eq!(u.pending(), MAX_RUNS as u64);
        assert!(u.ack(5), "an acknowledgement of frames forgotten already is no violation");
        assert!(u.ack(20));
        assert_eq!(u.pending(), MAX_RUNS as u64 - 10);
    }
}
