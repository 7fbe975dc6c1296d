//! Loom models of the ring protocol (`RUSTFLAGS="--cfg loom"`).

use super::*;
use loom::thread;
use std::sync::Arc;

/// The ring header (its `model_data` words are the data area) and a dummy data pointer.
struct Shared {
    hdr: Box<RingHeader>,
    cap: usize,
}

fn shared(cap: usize) -> Arc<Shared> {
    Arc::new(Shared { hdr: Box::new(RingHeader::new_for_model()), cap })
}

fn raw(s: &Shared) -> RawRing {
    assert!(s.cap <= s.hdr.model_data.len() * 8);
    RawRing { hdr: NonNull::from(&*s.hdr), data: NonNull::dangling(), cap: s.cap }
}

pub(crate) fn pop(c: &mut Consumer) -> Option<Vec<u8>> {
    let info = c.peek().expect("an honest producer never looks corrupt")?;
    let mut v = vec![0u8; info.len];
    // SAFETY: info from peek; v holds info.len bytes.
    unsafe { c.consume(info, Some(v.as_mut_ptr())) };
    Some(v)
}

/// FIFO, no overrun, no record lost, duplicated, torn or stale, with a full ring and a
/// second lap (the third record reuses the slot of the first one, whose complete header
/// stays there while the ring is full).
#[test]
fn spsc_records_in_order() {
    loom::model(|| {
        let s = shared(128);
        let s2 = s.clone();
        let prod = thread::spawn(move || {
            let mut p = Producer::new(raw(&s2)).unwrap();
            let mut i = 1u8;
            while i <= 3 {
                if p.try_write(FIRST | LAST, &[&[i; 8]]).unwrap() {
                    p.commit();
                    i += 1;
                } else {
                    thread::yield_now();
                }
            }
        });
        let mut c = Consumer::new(raw(&s)).unwrap();
        let mut got = 1u8;
        while got <= 3 {
            match pop(&mut c) {
                Some(v) => {
                    assert_eq!(v, [got; 8], "record {got} torn or stale");
                    got += 1;
                    c.release();
                }
                None => thread::yield_now(),
            }
        }
        prod.join().unwrap();
        assert_eq!(pop(&mut c), None);
    });
}

/// A batch becomes visible whole or not at all; a producer that dies before committing
/// leaves nothing visible, and the records its batch stamped early never show up after
/// a successor reuses the positions.
#[test]
fn dead_batch_stays_invisible() {
    loom::model(|| {
        let s = shared(256);
        let s2 = s.clone();
        let prod = thread::spawn(move || {
            {
                // Killed before its commit.
                let mut dead = Producer::new(raw(&s2)).unwrap();
                assert!(dead.try_write(FIRST | LAST, &[&[0xdd; 8]]).unwrap());
                assert!(dead.try_write(FIRST | LAST, &[&[0xee; 8]]).unwrap());
            }
            let mut p = Producer::new(raw(&s2)).unwrap();
            assert!(p.try_write(FIRST | LAST, &[&[1; 8]]).unwrap());
            p.commit();
            assert!(p.try_write(FIRST | LAST, &[&[2; 24]]).unwrap());
            p.commit();
        });
        let mut c = Consumer::new(raw(&s)).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            match pop(&mut c) {
                Some(v) => got.push(v),
                None => thread::yield_now(),
            }
        }
        prod.join().unwrap();
        assert_eq!(got, [vec![1u8; 8], vec![2u8; 24]]);
        assert_eq!(pop(&mut c), None);
    });
}

/// The want-space handshake never loses a request: if the producer stopped because the
/// ring was full, its re-check saw the freed space, or the consumer's release returned
/// true, or the fenced check that release left owed returned true when the consumer paid
/// it. `pay` is the consumer's fence: its arm before sleeping ([`crate::notify::arm`]),
/// or the periodic [`settle_fence`].
fn want_space_model(pay: fn(&crate::sync::AtomicU32)) {
    loom::model(move || {
        let s = shared(64);
        let mut p = Producer::new(raw(&s)).unwrap();
        assert!(p.try_write(FIRST | LAST, &[&[7u8; 8]]).unwrap());
        p.commit();
        let s2 = s.clone();
        let cons = thread::spawn(move || {
            let mut c = Consumer::new(raw(&s2)).unwrap();
            let info = c.peek().unwrap().unwrap();
            // SAFETY: discard the record from peek.
            unsafe { c.consume(info, None) };
            let woken = c.release();
            // Nothing more to read: the consumer arms (or a later pass pays), then
            // settles what the release left owed.
            let parked = crate::sync::AtomicU32::new(0);
            pay(&parked);
            let settled = c.settle();
            assert!(!(woken && settled), "one request, two wake-ups");
            woken || settled
        });
        let room = p.request_space(8).unwrap();
        let woken = cons.join().unwrap();
        assert!(room >= 8 || woken, "producer waits for space and nobody will wake it");
    });
}

#[test]
fn want_space_no_lost_request_paid_at_arm() {
    want_space_model(|parked| crate::notify::arm(parked));
}

#[test]
fn want_space_no_lost_request_paid_by_periodic_settle() {
    want_space_model(|_| settle_fence());
}

/// The whole full-ring path between two processes: the producer asks for room, and if
/// its re-check finds none it arms its own wake-up and re-checks once more (as
/// `ShmPort::arm` retries the backlog); the consumer releases, pays the owed check at its
/// arm, and wakes a producer that asked (fence, then the `parked` claim). A producer
/// that decides to sleep always gets its eventfd written.
#[test]
fn full_ring_producer_is_woken() {
    full_ring_model(|p| p.body_room(8).unwrap() < 8);
}

/// The same, with the re-check after the arm as `ShmPort::flush` makes it: a ring whose
/// request for room is still unanswered (`Producer::space_requested`) is skipped, not
/// looked at. Skipping is safe because the consumer clears the flag before its fenced
/// look at our `parked` flag: if our load misses the clearing, that look sees the arm.
/// (Making the consumer's wake skip its fence, `notify::after_commit`, fails this model.)
#[test]
fn full_ring_producer_skipping_while_asked_is_woken() {
    full_ring_model(|p| p.space_requested() || p.body_room(8).unwrap() < 8);
}

/// `still_full` is the producer's re-check after its arm: true means it sleeps.
fn full_ring_model(still_full: fn(&mut Producer) -> bool) {
    use crate::notify;
    use crate::sync::AtomicU32;
    loom::model(move || {
        let s = shared(64);
        let pparked = Arc::new(AtomicU32::new(0));
        let efd = Arc::new(AtomicU64::new(0));
        let mut p = Producer::new(raw(&s)).unwrap();
        assert!(p.try_write(FIRST | LAST, &[&[7u8; 8]]).unwrap());
        p.commit();
        let (s2, pp, e) = (s.clone(), pparked.clone(), efd.clone());
        let cons = thread::spawn(move || {
            let mut c = Consumer::new(raw(&s2)).unwrap();
            let info = c.peek().unwrap().unwrap();
            // SAFETY: discard the record from peek.
            unsafe { c.consume(info, None) };
            // As `ShmPort::drain`, then `ShmPort::arm`: wake at once when the release's
            // pre-check sees the request, else when the arm pays the owed check.
            let wake = || {
                notify::after_commit();
                if notify::should_wake(&pp) {
                    e.fetch_add(1, Ordering::Relaxed);
                }
            };
            if c.release() {
                wake();
            }
            let cparked = AtomicU32::new(0);
            notify::arm(&cparked);
            if c.settle() {
                wake();
            }
        });
        let mut sleeps = p.request_space(8).unwrap() < 8;
        if sleeps {
            notify::arm(&pparked);
            sleeps = still_full(&mut p);
            if !sleeps {
                notify::disarm(&pparked);
            }
        }
        cons.join().unwrap();
        if sleeps {
            assert_eq!(efd.load(Ordering::Relaxed), 1, "lost wake-up of a producer waiting for room");
        }
    });
}
