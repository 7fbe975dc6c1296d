//! The backlog a producer owes its consumer (issue 11, item 6): messages that have not fit
//! into the ring yet wait in the producer's private memory, and die with it. So the producer
//! publishes how many it owes in its producer line (the `owed` word), and whoever finds the
//! producer dead reports that many as lost to the consumer, **exactly once**:
//! - the slot's next incarnation, when it re-attaches the ring (it holds the slot lock, so
//!   its predecessor is dead): it adds them to the ring's `lost` counter;
//! - the consumer itself, when the producer's slot lock is free (the producer died and
//!   nobody took the slot): it reports them in a `lost` notice.
//!
//! The word is `incarnation << 32 | started << 31 | diverted << 30 | count`: the producer's incarnation (its
//! slot's attach generation), whether the first message of the backlog was partly written
//! (its fragments are in the ring; the consumer counts that one itself), and the messages
//! never started. Taking it is a compare-and-swap from the value read to the same
//! incarnation with no count, so of two parties exactly one gets the count.
//!
//! A taker that is not the slot's holder must **load the word before** it checks the slot
//! lock: then the word it read was stored by a process that no longer held the lock when
//! checked (dead), and the CAS succeeds only if nobody stored since. A successor stores only
//! words with its own incarnation, so a stale decision ("slot dead", taken before a
//! successor attached) can never take a live successor's count: the loom model
//! `owed_taken_once_never_from_a_live_successor` fails when the check comes first.

use super::*;

/// Bit of the `owed` word: the first message of the backlog was partly written.
const STARTED: u64 = 1 << 31;
/// Bit of the `owed` word: the consumer is diverted to this ring from the producer's
/// broadcast ring (the per-publisher topology, `transport/shm.rs`). Not part of what is
/// owed: taking the word keeps it.
pub(crate) const DIVERTED: u64 = 1 << 30;
/// The count's bits (the messages never started).
const COUNT: u64 = DIVERTED - 1;

/// What a taker got from an `owed` word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Owed {
    /// Messages the dead producer had not started writing.
    pub count: u64,
    /// It had written part of one more (its FIRST fragment may be in the ring).
    pub started: bool,
}

impl Owed {
    fn of(word: u64) -> Owed {
        Owed { count: word & COUNT, started: word & STARTED != 0 }
    }

    /// Nothing owed.
    pub(crate) fn is_none(&self) -> bool {
        self.count == 0 && !self.started
    }
}

impl RawRing {
    /// (producer) Publish what our backlog owes this consumer: `count` messages never
    /// started (saturating at 2^30 - 1), `started` one partly written. One Release store.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn store_owed(&self, incarnation: u32, count: u64, started: bool) {
        self.store_owed_diverted(incarnation, count, started, false);
    }

    /// [`RawRing::store_owed`] with the [`DIVERTED`] bit: one Release store, so a consumer
    /// that sees the bit also sees every record and count stored before it.
    pub(crate) fn store_owed_diverted(&self, incarnation: u32, count: u64, started: bool, diverted: bool) {
        let word = (u64::from(incarnation) << 32)
            | (u64::from(started) * STARTED)
            | (u64::from(diverted) * DIVERTED)
            | count.min(COUNT);
        self.hdr().producer.owed.store(word, Ordering::Release);
    }

    /// The `owed` word as it is now (Acquire), for [`RawRing::take_owed`]; `None` when it
    /// owes nothing.
    /// Whether the producer has diverted this consumer from its broadcast ring (Acquire).
    pub(crate) fn diverted(&self) -> bool {
        self.hdr().producer.owed.load(Ordering::Acquire) & DIVERTED != 0
    }

    pub(crate) fn load_owed(&self) -> Option<u64> {
        let word = self.hdr().producer.owed.load(Ordering::Acquire);
        (!Owed::of(word).is_none()).then_some(word)
    }

    /// Take what `word` (from [`RawRing::load_owed`]) owes, unless the word changed since:
    /// a CAS to the same incarnation with nothing owed. Only the caller that wins reports it.
    pub(crate) fn take_owed(&self, word: u64) -> Option<Owed> {
        let cleared = word & !(STARTED | COUNT);
        let owed = &self.hdr().producer.owed;
        owed.compare_exchange(word, cleared, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| Owed::of(word))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::layout::RingHeader;

    #[test]
    fn owed_word_round_trips_and_is_taken_once() {
        // SAFETY: a RingHeader is atomics only, for which all-zero bytes are valid values.
        let hdr = Box::new(unsafe { std::mem::zeroed::<RingHeader>() });
        let ring = RawRing { hdr: NonNull::from(&*hdr), data: NonNull::dangling(), cap: 4096 };
        assert_eq!(ring.load_owed(), None);
        ring.store_owed(7, 5, true);
        let w = ring.load_owed().unwrap();
        assert_eq!(ring.take_owed(w), Some(Owed { count: 5, started: true }));
        assert_eq!(ring.take_owed(w), None, "taken once");
        assert_eq!(ring.load_owed(), None);
        assert_eq!(hdr.producer.owed.load(Ordering::Relaxed) >> 32, 7, "the incarnation stays");
        ring.store_owed(8, u64::MAX, false);
        let w = ring.load_owed().unwrap();
        ring.store_owed(8, 2, false);
        assert_eq!(ring.take_owed(w), None, "a changed word is not taken");
        assert_eq!(ring.take_owed(ring.load_owed().unwrap()), Some(Owed { count: 2, started: false }));
        ring.store_owed(9, u64::MAX, false);
        assert_eq!(Owed::of(ring.load_owed().unwrap()).count, COUNT, "saturates");
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::layout::RingHeader;
    use crate::sync::AtomicU32;
    use loom::thread;
    use std::sync::Arc;

    struct Shared {
        hdr: Box<RingHeader>,
        /// The producer slot's lock: 1 while a live process holds it (the kernel's OFD lock;
        /// its release at death is a Release, a check an Acquire).
        lock: AtomicU32,
    }

    fn raw(s: &Shared) -> RawRing {
        RawRing { hdr: NonNull::from(&*s.hdr), data: NonNull::dangling(), cap: 64 }
    }

    /// Take without the CAS: what the fix replaced (a plain load and store).
    fn take_plainly(ring: &RawRing, word: u64) -> Option<Owed> {
        let owed = &ring.hdr().producer.owed;
        let now = owed.load(Ordering::Acquire);
        (!Owed::of(now).is_none()).then(|| {
            owed.store(now & !(STARTED | COUNT), Ordering::Release);
            let _ = word;
            Owed::of(now)
        })
    }

    /// Incarnation 1 died owing 5 messages (its lock is free). Its successor (incarnation
    /// 2) takes the slot lock, takes what 1 owed, then builds a backlog of its own (owes 3)
    /// and stays alive; meanwhile the consumer, finding the slot dead, tries to take it
    /// too. Exactly one of them reports the 5, and nobody ever takes the live successor's 3.
    /// `check_first`: the consumer checks the lock before it loads the word (a stale
    /// decision); `take`: the taking step.
    fn owed_model(check_first: bool, take: fn(&RawRing, u64) -> Option<Owed>) {
        loom::model(move || {
            let s = Arc::new(Shared { hdr: Box::new(RingHeader::new_for_model()), lock: AtomicU32::new(1) });
            raw(&s).store_owed(1, 5, false);
            s.lock.store(0, Ordering::Release); // incarnation 1 is SIGKILLed
            let s2 = s.clone();
            let successor = thread::spawn(move || {
                let ring = raw(&s2);
                assert_eq!(s2.lock.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed), Ok(0));
                let got = ring.load_owed().and_then(|w| take(&ring, w)).map_or(0, |o| o.count);
                ring.store_owed(2, 3, false);
                got
            });
            let ring = raw(&s);
            let dead = |s: &Shared| s.lock.load(Ordering::Acquire) == 0;
            let by_consumer = if check_first {
                if dead(&s) { ring.load_owed().and_then(|w| take(&ring, w)).map_or(0, |o| o.count) } else { 0 }
            } else {
                match ring.load_owed() {
                    Some(w) if dead(&s) => take(&ring, w).map_or(0, |o| o.count),
                    _ => 0,
                }
            };
            let by_successor = successor.join().unwrap();
            assert_ne!(by_consumer, 3, "the consumer took a live successor's backlog");
            assert_eq!(by_consumer + by_successor, 5, "the dead incarnation's 5 reported once");
            assert_eq!(Owed::of(s.hdr.producer.owed.load(Ordering::Relaxed)).count, 3, "the successor's stays");
        });
    }

    #[test]
    fn owed_taken_once_never_from_a_live_successor() {
        owed_model(false, RawRing::take_owed);
    }

    #[test]
    #[should_panic]
    fn owed_model_fails_when_the_lock_is_checked_before_the_word_is_loaded() {
        owed_model(true, RawRing::take_owed);
    }

    #[test]
    #[should_panic]
    fn owed_model_fails_without_the_compare_and_swap() {
        owed_model(false, take_plainly);
    }
}
