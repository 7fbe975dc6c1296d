//! Sequence stamps of the socket transport. Each "all" event travels behind a 16-byte
//! [`Stamp`]: the publisher's incarnation (a random nonzero id per socket port, so a
//! restarted publisher starts a new sequence) and its sequence number, little-endian.
//! Receivers drop a sequence number they have seen and turn a gap (events that died with a
//! broker) into a lost notice.

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
        if inc == 0 {
            return Verdict::Drop;
        }
        if e.incarnation != inc {
            *e = PeerSeq { incarnation: inc, next: seq.saturating_add(1) };
            return Verdict::Deliver { gap: 0 };
        }
        if seq < e.next {
            tracing::debug!(from, seq, "dropping an event seen already");
            return Verdict::Drop;
        }
        let gap = seq - e.next;
        e.next = seq.saturating_add(1);
        Verdict::Deliver { gap }
    }

    /// The broker reported `count` events of `from` lost: those sequence numbers will never
    /// come, so they are not a gap to report again.
    pub(crate) fn skip(&mut self, from: u32, count: u64) {
        if let Some(e) = self.seen.get_mut(from as usize) {
            if e.incarnation != 0 {
                e.next = e.next.saturating_add(count);
            }
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
}
