//! Sequence stamps of the socket transport. Each "all" event travels behind a 16-byte
//! [`Stamp`]: the publisher's incarnation (a random nonzero id per socket port, so a
//! restarted publisher starts a new sequence) and its sequence number, little-endian.
//! Receivers drop a sequence number they have seen and turn a gap (events that died with a
//! broker) into a lost notice.
//!
//! A new incarnation of a publisher this receiver has seen before (the publisher restarted)
//! must start at 0: when its first event seen here is number `n > 0`, the `n` events before
//! it never arrived and are reported lost. Of a publisher never seen before nothing can be
//! told (its earlier events may have gone to this slot's previous holder), so the first
//! event seen of it starts the count. Lost notices from the broker (`skip`) are a credit
//! taken off the next gap, in whichever incarnation it shows, so nothing is reported twice.
//! Every peer-supplied number is handled with saturating arithmetic; the largest sequence
//! number (`u64::MAX`) is never valid.

/// The 16 bytes ahead of the message in EVENT and DELIVER frames.
pub(crate) type Stamp = [u8; STAMP_LEN];
/// Length of a [`Stamp`]: keeps the message 16-aligned behind it.
pub(crate) const STAMP_LEN: usize = 16;
/// The stamp of an event outside any publisher's sequence (unique deliveries).
pub(crate) const UNSEQUENCED: Stamp = [0; STAMP_LEN];

/// What this process last saw of one publisher slot.
#[derive(Debug, Clone, Copy, Default)]
struct PeerSeq {
    /// 0: nothing seen yet.
    incarnation: u64,
    /// Next expected sequence number.
    next: u64,
    /// Events the broker reported lost (`LOST` notices) not yet matched by a gap.
    credit: u64,
}

/// The verdict on one stamped event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Deliver it; `gap` events of that publisher were lost before it.
    Deliver { gap: u64 },
    /// Seen already, or not stamped: drop it.
    Drop,
}

/// Our own sequence and what we saw of everybody else's.
#[derive(Debug)]
pub(crate) struct Sequencer {
    incarnation: u64,
    next_out: u64,
    seen: Vec<PeerSeq>,
}

impl Sequencer {
    pub(crate) fn new(slots: u32) -> Sequencer {
        Sequencer {
            incarnation: crate::sys::random_u64() | 1,
            next_out: 0,
            seen: vec![PeerSeq::default(); slots as usize],
        }
    }

    /// The stamp of our next "all" event.
    pub(crate) fn next_stamp(&mut self) -> Stamp {
        let mut st = [0u8; STAMP_LEN];
        st[..8].copy_from_slice(&self.incarnation.to_le_bytes());
        st[8..].copy_from_slice(&self.next_out.to_le_bytes());
        self.next_out += 1;
        st
    }

    /// Check an "all" event's stamp against what we saw of publisher slot `from`. A new
    /// incarnation (the publisher restarted) starts a new sequence.
    pub(crate) fn check(&mut self, from: u32, st: &Stamp) -> Verdict {
        let inc = u64::from_le_bytes(st[..8].try_into().expect("8 bytes"));
        let seq = u64::from_le_bytes(st[8..].try_into().expect("8 bytes"));
        let Some(e) = self.seen.get_mut(from as usize) else { return Verdict::Drop };
        if inc == 0 || seq == u64::MAX {
            return Verdict::Drop;
        }
        let missed = if e.incarnation == inc {
            if seq < e.next {
                tracing::debug!(from, seq, "dropping an event seen already");
                return Verdict::Drop;
            }
            seq - e.next
        } else if e.incarnation == 0 {
            0 // the first event seen of this publisher: nothing to compare with
        } else {
            seq // a restarted publisher: its events 0..seq never arrived
        };
        let gap = missed.saturating_sub(e.credit);
        e.credit = e.credit.saturating_sub(missed);
        if e.incarnation != inc {
            e.credit = 0;
        }
        e.incarnation = inc;
        e.next = seq + 1; // seq < u64::MAX
        Verdict::Deliver { gap }
    }

    /// The broker reported `count` events of `from` lost: those sequence numbers will never
    /// come, so they are not a gap to report again.
    pub(crate) fn skip(&mut self, from: u32, count: u64) {
        if let Some(e) = self.seen.get_mut(from as usize) {
            e.credit = e.credit.saturating_add(count);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_reported_and_repeats_dropped() {
        let mut a = Sequencer::new(2);
        let mut b = Sequencer::new(2);
        let s0 = a.next_stamp();
        let s1 = a.next_stamp();
        let s2 = a.next_stamp();
        assert_eq!(b.check(0, &s0), Verdict::Deliver { gap: 0 });
        assert_eq!(b.check(0, &s0), Verdict::Drop);
        assert_eq!(b.check(0, &s2), Verdict::Deliver { gap: 1 });
        assert_eq!(b.check(0, &s1), Verdict::Drop);
        assert_eq!(b.check(0, &UNSEQUENCED), Verdict::Drop);
        assert_eq!(b.check(5, &s0), Verdict::Drop);
    }

    fn stamp(inc: u64, seq: u64) -> Stamp {
        let mut st = [0u8; STAMP_LEN];
        st[..8].copy_from_slice(&inc.to_le_bytes());
        st[8..].copy_from_slice(&seq.to_le_bytes());
        st
    }

    #[test]
    fn a_restarted_publisher_starting_above_zero_is_a_gap_and_notices_are_not_counted_twice() {
        let mut b = Sequencer::new(2);
        // First sighting: nothing to compare with.
        assert_eq!(b.check(1, &stamp(7, 40)), Verdict::Deliver { gap: 0 });
        // A restart whose first 5 events never arrived.
        assert_eq!(b.check(1, &stamp(9, 5)), Verdict::Deliver { gap: 5 });
        // The broker reports 3 lost, then the event after them arrives: no second report.
        b.skip(1, 3);
        assert_eq!(b.check(1, &stamp(9, 9)), Verdict::Deliver { gap: 0 });
        // A notice before a restart is credited against the new incarnation's gap.
        b.skip(1, 2);
        assert_eq!(b.check(1, &stamp(11, 2)), Verdict::Deliver { gap: 0 });
        assert_eq!(b.check(1, &stamp(11, 3)), Verdict::Deliver { gap: 0 });
    }

    #[test]
    fn hostile_numbers_saturate() {
        let mut b = Sequencer::new(2);
        b.skip(0, u64::MAX);
        b.skip(0, u64::MAX);
        b.skip(0, 1);
        assert_eq!(b.check(0, &stamp(1, 0)), Verdict::Deliver { gap: 0 });
        assert_eq!(b.check(0, &stamp(1, u64::MAX)), Verdict::Drop, "never a valid number");
        b.skip(0, u64::MAX);
        assert_eq!(b.check(0, &stamp(2, u64::MAX - 1)), Verdict::Deliver { gap: 0 }, "all credited");
        assert_eq!(b.check(0, &stamp(3, u64::MAX - 1)), Verdict::Deliver { gap: u64::MAX - 1 });
        assert_eq!(b.check(0, &stamp(3, u64::MAX - 1)), Verdict::Drop);
        assert_eq!(b.check(0, &stamp(3, 5)), Verdict::Drop);
    }
}
