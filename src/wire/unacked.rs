//! (broker, socket transport) What a receiver has been sent and has not acknowledged yet.
//!
//! The broker records every data frame it has completely written into a receiver's socket
//! (the kernel took it) as a run `(origin, frames, each)`: `frames` consecutive frames of
//! publisher slot `origin` that stand for `each` lost events apiece if they never reach a
//! callback (an event: 1; a `LOST` notice: its count; a unique event: 0). The receiver
//! acknowledges, with its running total of data frames dispatched on the connection
//! (callbacks run, not merely read), at the end of a pass once 64 frames are owed and
//! whenever it goes idle;
//! an acknowledgement pops runs from the front, the front one in part. When the connection ends, what is left
//! was never dispatched: the transport owes it to the slot's next holder as lost notices.
//!
//! Totals are per connection, from 0. Everything the peer says is untrusted: an
//! acknowledgement above the frames written, or below an earlier one, is a protocol
//! violation (logged once; clamped to what was written, or ignored). The FIFO is bounded
//! by [`MAX_RUNS`] whatever the peer does. An honest receiver acknowledges at the end of
//! every pass that leaves 64 frames owed, so its runs stay within the frames its socket
//! buffer and its reader hold, unless the broker leaves its acknowledgements unread for long
//! (flow control holding back a receiver that also publishes: its `ACK`s wait behind its
//! events). Past the bound the oldest run is forgotten (taken as acknowledged; a later crash
//! is then reported short by it) and that is logged once.
//!
//! Unique events are not counted (a lost notice counts a publisher's "all" events) but
//! kept: a copy of each unique frame's message ([`Unacked::written`] with `keep`) stays
//! until the receiver's acknowledgement covers it, and when the connection ends without
//! that, the copies are handed back ([`Unacked::take_orphans`]) for the broker to route them
//! to another worker. The copies of one connection are bounded by the bytes given to
//! [`Unacked::new`] (the socket transport: [`keep_bytes`]) and by [`MAX_KEPT`] copies: an
//! honest receiver has no more unacknowledged than its socket, its frame reader and its
//! inbox hold. Past either bound the oldest copy is dropped (most likely dispatched
//! already; counted in [`Unacked::unguarded`], logged once per slot): that event is
//! not routed again if the receiver dies.

use std::collections::VecDeque;

/// Most runs kept per connection (a receiver that never acknowledges cannot grow the
/// broker's memory past this: 24 bytes a run).
pub(crate) const MAX_RUNS: usize = 1 << 16;

/// Most unique-event copies kept per connection (see the module docs).
pub(crate) const MAX_KEPT: usize = 1 << 16;

/// Bytes of unique-event copies kept per connection, besides two frames of the largest
/// size ([`keep_bytes`]).
pub(crate) const KEEP_BYTES: usize = 4 << 20;

/// The byte bound of the unique-event copies kept for one connection whose frames are at
/// most `max_frame` bytes: [`KEEP_BYTES`] (the kernel's socket buffers at their default
/// sizes, a few hundred KiB, plus the receiver's frame reader, up to 1 MiB a read, plus
/// its inbox, what one read brought) and two frames (one cut by a read, one in the inbox).
pub(crate) fn keep_bytes(max_frame: usize) -> usize {
    KEEP_BYTES.saturating_add(max_frame.saturating_mul(2))
}

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
#[derive(Debug)]
pub(crate) struct Unacked {
    runs: VecDeque<Run>,
    /// Copies of the unique events written and not acknowledged: (the frame's number on
    /// this connection, from 1; its message), oldest first.
    kept: VecDeque<(u64, Box<[u8]>)>,
    /// Bytes of the messages in `kept`.
    kept_bytes: usize,
    /// The byte bound of `kept`.
    keep_cap: usize,
    /// Copies of connections that ended, not yet taken ([`Unacked::take_orphans`]).
    orphans: Vec<Box<[u8]>>,
    /// Copies dropped past the bounds, ever.
    unguarded: u64,
    /// Frames written on this connection.
    written: u64,
    /// Frames acknowledged (or forgotten past [`MAX_RUNS`]) on this connection.
    acked: u64,
    /// A violation was logged (logged once per queue).
    warned: bool,
    /// Copies were dropped past the bounds (logged once per queue).
    warned_kept: bool,
    /// Runs were forgotten past [`MAX_RUNS`] on this connection: a late acknowledgement of
    /// them is no violation.
    forgot: bool,
}

impl Default for Unacked {
    fn default() -> Unacked {
        Unacked::new(KEEP_BYTES)
    }
}

impl Unacked {
    /// An empty record keeping at most `keep_cap` bytes of unique-event copies.
    pub(crate) fn new(keep_cap: usize) -> Unacked {
        Unacked {
            runs: VecDeque::new(),
            kept: VecDeque::new(),
            kept_bytes: 0,
            keep_cap,
            orphans: Vec::new(),
            unguarded: 0,
            written: 0,
            acked: 0,
            warned: false,
            warned_kept: false,
            forgot: false,
        }
    }

    /// One more frame completely written: a unique event, whose message `msg` is kept
    /// until acknowledged.
    pub(crate) fn written_kept(&mut self, tag: Tag, msg: &[u8]) {
        self.written(tag);
        self.keep(msg);
    }

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
                self.pop_kept(true);
            }
        }
        self.runs.push_back(Run { tag, frames: 1 });
    }

    /// Keep a copy of the unique event just written (frame number `written`); past the
    /// bounds the oldest copies go first.
    fn keep(&mut self, m: &[u8]) {
        if m.len() > self.keep_cap {
            self.unguarded = self.unguarded.saturating_add(1);
            self.warn_kept();
            return;
        }
        while self.kept.len() >= MAX_KEPT || self.kept_bytes + m.len() > self.keep_cap {
            let Some((_, old)) = self.kept.pop_front() else { break };
            self.kept_bytes -= old.len();
            self.unguarded = self.unguarded.saturating_add(1);
            self.warn_kept();
        }
        self.kept_bytes += m.len();
        self.kept.push_back((self.written, m.into()));
    }

    /// Drop the copies of frames up to `acked` (`forgotten`: acknowledged only because
    /// their runs were forgotten past [`MAX_RUNS`]: counted as unguarded).
    fn pop_kept(&mut self, forgotten: bool) {
        while let Some((n, m)) = self.kept.front() {
            if *n > self.acked {
                break;
            }
            self.kept_bytes -= m.len();
            self.kept.pop_front();
            if forgotten {
                self.unguarded = self.unguarded.saturating_add(1);
            }
        }
    }

    fn warn_kept(&mut self) {
        if !std::mem::replace(&mut self.warned_kept, true) {
            tracing::warn!(
                kept = self.kept.len(),
                bytes = self.kept_bytes,
                "a worker does not acknowledge the unique events it is sent; dropping the oldest copies \
                 (they are not routed again if it dies; logged once per slot)"
            );
        }
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
        self.pop_kept(false);
        ok
    }

    /// The connection ended (or will acknowledge nothing more): the copies of the unique
    /// events it never acknowledged become orphans. True when there are orphans.
    pub(crate) fn end_kept(&mut self) -> bool {
        self.orphans.extend(self.kept.drain(..).map(|(_, m)| m));
        self.kept_bytes = 0;
        !self.orphans.is_empty()
    }

    /// The copies of the unique events that connections ended without acknowledging
    /// ([`Unacked::end_kept`], [`Unacked::take`]), oldest first, each handed out once.
    pub(crate) fn take_orphans(&mut self) -> Vec<Box<[u8]>> {
        std::mem::take(&mut self.orphans)
    }

    /// [`Unacked::take_orphans`] has something.
    pub(crate) fn has_orphans(&self) -> bool {
        !self.orphans.is_empty()
    }

    /// Unique-event copies dropped past the bounds, ever (see the module docs).
    pub(crate) fn unguarded(&self) -> u64 {
        self.unguarded
    }

    /// The connection ended: what was never acknowledged, summed by publisher (tags with
    /// nothing to report left out; at most one entry per origin), and the frames of it. The
    /// FIFO starts over (the next connection counts from 0); the unique-event copies not
    /// acknowledged become orphans ([`Unacked::take_orphans`]).
    pub(crate) fn take(&mut self) -> (Vec<(u32, u64)>, u64) {
        self.end_kept();
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

    fn kept(u: &mut Unacked) -> Vec<Vec<u8>> {
        u.take_orphans().into_iter().map(Vec::from).collect()
    }

    #[test]
    fn unique_copies_are_kept_until_acknowledged() {
        let mut u = Unacked::default();
        u.written(ev(1));
        u.written_kept(Tag::NOTHING, b"u1");
        u.written(ev(1));
        u.written_kept(Tag::NOTHING, b"u2");
        u.written_kept(Tag::NOTHING, b"u3");
        assert_eq!(u.runs.len(), 4, "unique frames merge into one run");
        assert!(u.ack(2), "the event and u1");
        assert_eq!(u.kept.len(), 2);
        assert_eq!(u.kept_bytes, 4);
        assert_eq!(u.take(), (vec![(1, 1)], 3), "unique events owe no notice");
        u.written_kept(Tag::NOTHING, b"next"); // the next connection's
        assert!(u.has_orphans());
        assert_eq!(kept(&mut u), vec![b"u2".to_vec(), b"u3".to_vec()], "oldest first; the live one stays");
        assert!(kept(&mut u).is_empty(), "each copy is handed out once");
        assert!(u.end_kept(), "the next connection ended too");
        assert_eq!(kept(&mut u), vec![b"next".to_vec()]);
        assert_eq!(u.kept_bytes, 0);
        assert!(!u.end_kept());
        assert!(u.ack(1), "a late acknowledgement of an ended connection's frame is harmless");
        assert_eq!(u.take(), (vec![], 0));
        assert!(kept(&mut u).is_empty());
        assert_eq!(u.unguarded(), 0);
    }

    #[test]
    fn acknowledged_copies_are_never_handed_out() {
        let mut u = Unacked::default();
        for i in 0..10u8 {
            u.written_kept(Tag::NOTHING, &[i]);
        }
        assert!(u.ack(10));
        assert!(!u.ack(u64::MAX), "clamped");
        assert_eq!(u.take(), (vec![], 0));
        assert!(kept(&mut u).is_empty());
    }

    #[test]
    fn kept_copies_are_bounded_in_bytes_and_in_number() {
        let mut u = Unacked::new(10);
        u.written_kept(Tag::NOTHING, b"aaaa");
        u.written_kept(Tag::NOTHING, b"bbbb");
        u.written_kept(Tag::NOTHING, b"cccc");
        assert_eq!((u.kept.len(), u.kept_bytes, u.unguarded()), (2, 8, 1), "the oldest copy went");
        u.written_kept(Tag::NOTHING, &[0u8; 11]);
        assert_eq!((u.kept.len(), u.kept_bytes, u.unguarded()), (2, 8, 2), "too big for the bound: not kept");
        assert_eq!(u.pending(), 4, "the frames are still tracked");
        let mut u = Unacked::new(usize::MAX);
        for _ in 0..MAX_KEPT + 3 {
            u.written_kept(Tag::NOTHING, b"x");
        }
        assert_eq!((u.kept.len(), u.unguarded()), (MAX_KEPT, 3));
        assert!(u.ack(3), "frames whose copies are gone: no violation");
        assert_eq!(u.kept.len(), MAX_KEPT);
        assert!(u.ack(4));
        assert_eq!(u.kept.len(), MAX_KEPT - 1);
        assert_eq!(keep_bytes(1000), KEEP_BYTES + 2000);
    }

    #[test]
    fn copies_of_forgotten_runs_are_dropped_and_counted() {
        let mut u = Unacked::default();
        u.written_kept(Tag::NOTHING, b"u");
        for i in 0..MAX_RUNS as u32 {
            u.written(ev(i % 2)); // one run per frame: the unique run is forgotten
        }
        assert_eq!((u.kept.len(), u.unguarded()), (0, 1));
        assert!(kept(&mut u).is_empty());
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
