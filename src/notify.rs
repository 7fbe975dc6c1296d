//! The parked-flag wake handshake over one eventfd per slot.
//!
//! A receiver about to sleep **arms**: it stores `parked = 1`, issues a SeqCst fence, and
//! re-checks its inbound rings; only if they are all empty does it block on its eventfd.
//! A publisher **commits** its records (Release store of `write_pos`), issues one SeqCst
//! fence for the whole batch, and then looks at each receiver's `parked`; only a receiver
//! seen parked is woken, by the publisher that wins the swap `1 -> 0` (so one eventfd write
//! per sleep, however many publishers). The two fences order "store parked / load
//! write_pos" against "store write_pos / load parked": at least one side sees the other's
//! store, so either the receiver finds the record on its re-check or the publisher sees it
//! parked. No lost wake-up; the loom model below checks exactly this with the real ring.
//!
//! While the receiver is busy (`parked == 0`) a publisher makes no syscall at all.
//!
//! **Why the publisher's fence is not deferred.** The fence costs the publisher a wait for
//! its stamp store to leave the store buffer (one ownership transfer of the record's line).
//! Deferring it ("lazy wake fence": a Relaxed look at `parked` after the commit, the fenced
//! re-check owed until the publisher's next call into the library or N publishes) is not
//! sound for this library's users. Without the fence the publisher's load of `parked` may
//! be performed before its stamp store is visible (store-load reordering, allowed on
//! x86-TSO): it reads 0 while the receiver, having stored `parked = 1` and fenced, re-checks
//! and misses the stamp still in the publisher's store buffer. Both sides miss; the
//! receiver's re-check cannot close this, it is the very load that misses. The receiver
//! then sleeps until the publisher pays the owed check, and a publisher of a prefork proxy
//! publishes from a request handler and goes back to its own event loop, calling the
//! library again only when its own fd turns readable, possibly never. A receiver asleep in
//! an external poller has no timeout of ours to bound that. So the bound would be "the
//! publisher's next call", unbounded in time; closing it without a publisher fence needs an
//! asymmetric barrier on the receiver's side (`membarrier`, a syscall and IPIs per arm,
//! more syscalls per parked hop than the raw baseline). The loom model `no_lost_wakeup`
//! fails with [`after_commit`] removed. The fence stays: one per publish call, however many
//! rings it committed, or one per `Batch` (`worker/batch.rs`), whose end the caller states
//! (model `a_batch_wakes_a_receiver_that_slept_through_it`). (The consumer's want-space fence *is* deferred, see
//! `Consumer::release` in ring.rs: the consumer pays it at its own arm, before it sleeps.)
//!
//! The eventfd is registered edge-triggered in the receiver's epoll set and never read (so
//! is the group's fan-out eventfd, under the same token: a publisher that claimed three or
//! more sleepers in one commit writes that one instead of each one's own, and an edge on
//! either is the same wake-up; see [`FANOUT_MIN`]):
//! each publisher write is one edge, consumed by the `epoll_wait` that reports it (the
//! sleeping receiver's own, or a harvesting `epoll_wait(0)` when the receiver finds the
//! flag cleared without having slept). The flag protocol above is unchanged by that: it
//! decides *whether* a write happens; the edge only carries it.
//!
//! **Immune to the order of claim, write and disarm.** A publisher claims (swaps `parked`)
//! and then writes; the receiver may disarm, harvest and go on between the two. With a
//! level-triggered eventfd that the disarm *read*, a write landing after that read left the
//! fd readable for good, every later disarm found `parked == 1` and never read it again, and
//! the receiver spun at 100% CPU while idle. Here nothing has a level: a late write is one
//! more edge, reported by the receiver's next `epoll_wait` (one spurious wake-up) and gone.
//! The real-process test `idle_workers_do_not_spin_after_bursts` (tests/wake.rs) catches
//! the old mechanism within a round or two once a 50 µs pause is planted between claim and
//! write, and passes 30 rounds with the same pause planted in this protocol.
//!
//! **The write never blocks** (see `sys::EventFd`): it writes the value 0 to a counter
//! that is 1 from creation, which the kernel never blocks nor refuses whatever a peer did to
//! the shared open file description (`O_NONBLOCK` cleared, counter filled).
//!
//! **A claim whose write never comes** (the claimer was killed between its swap and its
//! write) cannot be noticed by anyone: the sleeper's only defence is time. `Worker::wait`
//! never sleeps longer than `RECHECK_PERIOD` (100 ms, worker/poll.rs) on shared memory; its
//! re-check disarms (finding the claim) and drains the ring. The model
//! `a_claimed_wake_up_never_written_is_found_by_the_recheck` checks that the re-check sees
//! the claimer's record.

use crate::sync::{AtomicU32, Ordering, fence};

/// Mark the receiver parked. The caller must re-check its rings after this returns and
/// only block if they are empty.
pub(crate) fn arm(parked: &AtomicU32) {
    parked.store(1, Ordering::Relaxed);
    fence(Ordering::SeqCst);
}

/// Clear the parked flag after waking (or when work was found on the re-check). Returns
/// true when a publisher had already cleared it: that publisher wrote (or is about to
/// write) the eventfd, an edge the caller consumes with an `epoll_wait` if it did not sleep.
pub(crate) fn disarm(parked: &AtomicU32) -> bool {
    parked.swap(0, Ordering::Acquire) == 0
}

/// The publisher's fence between its commits and its [`should_wake`] checks (also a
/// consumer's, between its release of ring space and the producer's `parked` check).
pub(crate) fn after_commit() {
    fence(Ordering::SeqCst);
}

/// After [`after_commit`]: true when this caller must write the receiver's eventfd. A plain
/// load first keeps the receiver's line shared while it is busy.
pub(crate) fn should_wake(parked: &AtomicU32) -> bool {
    parked.load(Ordering::Relaxed) == 1 && parked.swap(0, Ordering::AcqRel) == 1
}

/// Claims at which one commit's wake-ups go out as a single write of the group's fan-out
/// eventfd instead of one write per claimed receiver.
///
/// Why 3. Every worker's epoll set holds the fan-out eventfd (edge-triggered, like its own),
/// so one write wakes every claimed sleeper from inside one syscall: the kernel walks the
/// fd's waiters, and only the sleeping ones cost a task wake-up. Measured on the 2-vCPU
/// development machine (63 sleepers on the other vCPU), one write that wakes them all took
/// 61-86 µs where 63 writes took 149-224 µs. The price: a worker that was *not* parked
/// (busy, or the publisher itself) gets a stray edge, which costs it one `epoll_wait` that
/// returns at once the next time it sleeps (edges coalesce: one per sleep at most). Below 3
/// claims the per-receiver writes cost about as much as that and leave nobody a stray edge.
pub(crate) const FANOUT_MIN: u32 = 3;

/// The wake-ups one commit claimed (after its fence, each by [`should_wake`]), to be
/// written when the commit's walk over the receivers is done: each claimed receiver's own
/// eventfd, or from [`FANOUT_MIN`] claims on one write of the fan-out eventfd, which every
/// receiver's epoll set also holds. Either way every claimed receiver gets an edge (loom
/// model `a_fanout_write_wakes_a_sleeper_claimed_with_others`).
#[derive(Default)]
pub(crate) struct Claims {
    /// The first claimed slots (all of them below [`FANOUT_MIN`]).
    first: [u32; FANOUT_MIN as usize - 1],
    n: u32,
}

/// What a commit's [`Claims`] write.
pub(crate) enum Writes<'a> {
    /// Each of these slots' own eventfd (none when nothing was claimed).
    Each(&'a [u32]),
    /// The fan-out eventfd, once.
    Fanout,
}

impl Claims {
    /// [`should_wake`] on `parked`, the flag of `slot`; remembers the claim. True if claimed.
    #[inline(always)]
    pub(crate) fn claim(&mut self, parked: &AtomicU32, slot: u32) -> bool {
        if !should_wake(parked) {
            return false;
        }
        if let Some(f) = self.first.get_mut(self.n as usize) {
            *f = slot;
        }
        self.n += 1;
        true
    }

    /// Wake-ups claimed.
    pub(crate) fn count(&self) -> u32 {
        self.n
    }

    /// The eventfd writes that deliver every claimed wake-up.
    pub(crate) fn writes(&self) -> Writes<'_> {
        if self.n >= FANOUT_MIN { Writes::Fanout } else { Writes::Each(&self.first[..self.n as usize]) }
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::layout::RingHeader;
    use crate::ring::loom_models::pop;
    use crate::ring::{Consumer, FIRST, LAST, Producer, RawRing};
    use crate::sync::AtomicU64;
    use loom::thread;
    use std::ptr::NonNull;
    use std::sync::Arc;

    struct Shared {
        hdr: Box<RingHeader>,
        data: Box<[u8]>,
        parked: AtomicU32,
        eventfd: AtomicU64,
    }

    fn raw(s: &Shared) -> RawRing {
        RawRing {
            hdr: NonNull::from(&*s.hdr),
            data: NonNull::new(s.data.as_ptr() as *mut u8).unwrap(),
            cap: s.data.len(),
        }
    }

    /// The publisher's side of a hop, in production order: write and commit one record,
    /// the fence after the commit, then the eventfd "write" if the receiver is parked.
    fn publish_one(s: Arc<Shared>) -> thread::JoinHandle<()> {
        publish_records(s, &[b"event"])
    }

    /// [`publish_one`] with several records written before the one commit (a `Batch`).
    fn publish_records(s: Arc<Shared>, records: &'static [&'static [u8]]) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let mut p = Producer::new(raw(&s)).unwrap();
            for r in records {
                assert!(p.try_write(FIRST | LAST, &[r]).unwrap());
            }
            p.commit();
            after_commit();
            if should_wake(&s.parked) {
                s.eventfd.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    fn shared() -> Arc<Shared> {
        shared_cap(64)
    }

    /// The receiver's side of a hop while `publisher` runs: arm, re-check, sleep if the
    /// ring looks empty (else disarm). After the publisher is done, a receiver that slept
    /// must have been woken exactly once, with the flag cleared by the publisher (so its
    /// disarm says "woken"). Returns whether it slept.
    fn sleep_or_not(s: &Shared, c: &mut Consumer, publisher: thread::JoinHandle<()>) -> bool {
        arm(&s.parked);
        let sleeps = !c.has_data();
        if !sleeps {
            disarm(&s.parked);
        }
        publisher.join().unwrap();
        if sleeps {
            assert_eq!(s.eventfd.load(Ordering::Relaxed), 1, "lost wake-up");
            assert!(disarm(&s.parked));
        }
        sleeps
    }

    fn shared_cap(cap: usize) -> Arc<Shared> {
        Arc::new(Shared {
            hdr: Box::new(RingHeader::new_for_model()),
            data: vec![0u8; cap].into(),
            parked: AtomicU32::new(0),
            eventfd: AtomicU64::new(0),
        })
    }

    /// A batch (`Batch` in worker/batch.rs: two records written, then one commit, one fence
    /// and one parked check for both) loses no wake-up either: a receiver that decides to
    /// sleep is woken, and whether it slept or not it then finds both records, in order.
    /// Fails with the fence of [`after_commit`] removed from the publisher's side.
    #[test]
    fn a_batch_wakes_a_receiver_that_slept_through_it() {
        loom::model(|| {
            let s = shared_cap(128);
            let publisher = publish_records(s.clone(), &[b"one", b"two"]);
            let mut c = Consumer::new(raw(&s)).unwrap();
            sleep_or_not(&s, &mut c, publisher);
            assert_eq!(pop(&mut c).as_deref(), Some(&b"one"[..]));
            assert_eq!(pop(&mut c).as_deref(), Some(&b"two"[..]));
            assert_eq!(pop(&mut c), None);
        });
    }

    /// If the receiver decides to sleep, the publisher's record was either seen on the
    /// re-check or the eventfd was written: never a sleeping receiver with a pending record
    /// and no wake-up.
    #[test]
    fn no_lost_wakeup() {
        loom::model(|| {
            let s = shared();
            let publisher = publish_one(s.clone());
            let mut c = Consumer::new(raw(&s)).unwrap();
            if sleep_or_not(&s, &mut c, publisher) {
                assert!(c.has_data());
            }
        });
    }

    /// The receiver never reads the eventfd (edge-triggered): it harvests an edge exactly
    /// when `disarm` says it was woken. That is sound only if "woken" holds exactly when
    /// this arm cycle produces one eventfd write: no write without "woken" (a stray edge
    /// would keep an external poller's fd readable) and no "woken" without a write.
    #[test]
    fn woken_disarm_means_exactly_one_write() {
        loom::model(|| {
            let s = shared();
            let publisher = publish_one(s.clone());
            let mut c = Consumer::new(raw(&s)).unwrap();
            arm(&s.parked);
            // A dispatch loop: re-check, then disarm at the next pass without sleeping.
            let _ = c.has_data();
            let woken = disarm(&s.parked);
            publisher.join().unwrap();
            assert_eq!(s.eventfd.load(Ordering::Relaxed), u64::from(woken));
        });
    }

    /// A publisher killed after it claimed the wake-up (won the swap of `parked`) and before
    /// its eventfd write: no write ever comes. The sleeper's periodic re-check (`wait`'s
    /// bounded sleep, see `RECHECK_PERIOD` in worker/poll.rs) disarms and looks at its ring:
    /// whenever its disarm finds the claim ("woken"), the claimer's record must be visible
    /// (the claimer's commit and fence, then its swap, synchronize with the disarm's Acquire
    /// swap); and once the claimer is gone, a re-check always finds the record. Fails with
    /// `disarm`'s swap weakened to Relaxed, or with both the fence of [`after_commit`] and the
    /// Release half of `should_wake`'s swap removed.
    #[test]
    fn a_claimed_wake_up_never_written_is_found_by_the_recheck() {
        loom::model(|| {
            let s = shared();
            let dying = {
                let s = s.clone();
                thread::spawn(move || {
                    let mut p = Producer::new(raw(&s)).unwrap();
                    assert!(p.try_write(FIRST | LAST, &[b"event"]).unwrap());
                    p.commit();
                    after_commit();
                    // Claims the wake-up, then dies before writing the eventfd.
                    let _ = should_wake(&s.parked);
                })
            };
            let mut c = Consumer::new(raw(&s)).unwrap();
            arm(&s.parked);
            if c.has_data() {
                disarm(&s.parked);
                dying.join().unwrap();
                return;
            }
            // Asleep; no eventfd write will come. The re-check, concurrent with the claimer.
            if disarm(&s.parked) {
                assert!(c.has_data(), "the claim is visible but the claimer's record is not");
            } else {
                arm(&s.parked);
            }
            dying.join().unwrap();
            // The next re-check, the claimer gone.
            disarm(&s.parked);
            assert!(c.has_data(), "a re-check after the claimer died missed its record");
            assert_eq!(s.eventfd.load(Ordering::Relaxed), 0);
        });
    }

    /// A commit that claims three sleepers writes the fan-out eventfd once, after its walk;
    /// the modelled receiver is the *third* claim (two others, asleep and not running in
    /// the model, are claimed first). If it decides to sleep, an edge must reach it on its
    /// own eventfd or the fan-out one, and its record must be there. Fails if
    /// [`Claims::writes`] writes only the slots it remembered (a third claim's wake-up
    /// lost), and, as `no_lost_wakeup`, with the fence of [`after_commit`] removed.
    #[test]
    fn a_fanout_write_wakes_a_sleeper_claimed_with_others() {
        loom::model(|| {
            let s = shared();
            let others = Arc::new([AtomicU32::new(1), AtomicU32::new(1)]);
            let fanout = Arc::new(AtomicU64::new(0));
            let publisher = {
                let (s, others, fanout) = (s.clone(), others.clone(), fanout.clone());
                thread::spawn(move || {
                    let mut p = Producer::new(raw(&s)).unwrap();
                    assert!(p.try_write(FIRST | LAST, &[b"event"]).unwrap());
                    p.commit();
                    after_commit();
                    let mut claims = Claims::default();
                    claims.claim(&others[0], 1);
                    claims.claim(&others[1], 2);
                    claims.claim(&s.parked, 0);
                    match claims.writes() {
                        Writes::Fanout => {
                            fanout.fetch_add(1, Ordering::Relaxed);
                        }
                        Writes::Each(slots) => {
                            if slots.contains(&0) {
                                s.eventfd.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            };
            let mut c = Consumer::new(raw(&s)).unwrap();
            arm(&s.parked);
            let sleeps = !c.has_data();
            // Not asleep: a dispatch loop's disarm, before or after the publisher's claim.
            let claimed_awake = !sleeps && disarm(&s.parked);
            publisher.join().unwrap();
            let edges = s.eventfd.load(Ordering::Relaxed) + fanout.load(Ordering::Relaxed);
            if sleeps {
                assert_eq!(edges, 1, "a sleeper claimed third got no edge");
                assert!(disarm(&s.parked));
                assert!(c.has_data());
            }
            // Three claims (the two other sleepers and ours) make one fan-out write; two
            // (ours disarmed first) make writes to the others' own eventfds only.
            assert!(others.iter().all(|o| o.load(Ordering::Relaxed) == 0));
            assert_eq!(fanout.load(Ordering::Relaxed), u64::from(sleeps || claimed_awake));
            assert_eq!(s.eventfd.load(Ordering::Relaxed), 0);
        });
    }

    /// Two publishers and one sleeping receiver: exactly one eventfd write per sleep.
    #[test]
    fn one_wake_per_sleep() {
        loom::model(|| {
            let s = shared();
            arm(&s.parked);
            let pubs: Vec<_> = (0..2)
                .map(|_| {
                    let s = s.clone();
                    thread::spawn(move || {
                        after_commit();
                        if should_wake(&s.parked) {
                            s.eventfd.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for p in pubs {
                p.join().unwrap();
            }
            assert_eq!(s.eventfd.load(Ordering::Relaxed), 1);
        });
    }
}
