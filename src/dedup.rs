//! Shared-memory hash table with expiry: the unique-event dedup cache.
//!
//! `buckets` (a power of two, at least twice `unique_capacity`) entries of 32 bytes:
//! a 128-bit tag (SipHash-1-3 of the unique hash, keyed with the random key in the region
//! header, so peers cannot aim collisions) and an expiry instant on `CLOCK_MONOTONIC`
//! (system-wide, so a successor broker reads the same clock). Linear probing within a
//! bounded window of [`MAX_PROBE`] entries: an entry whose expiry has passed is free again;
//! a never-used entry (tag 0) ends a lookup early.
//!
//! Concurrency: only the broker reads or writes the table, and the broker is whoever holds
//! the broker lock, which the kernel gives to one live process at a time. There is no
//! concurrent access to model; a broker killed in the middle of an insert leaves at worst
//! an entry whose two tag halves do not match any hash (it expires like any other).
//! The one exception is a broker that was frozen (SIGSTOP, a long page fault) while a
//! successor took the lock: until it reads the new epoch in the region header and steps
//! down (the first thing each of its control polls does), it may still insert. The entries
//! are atomics, so that is never undefined behaviour; at worst the same hash is recorded
//! twice and delivered twice, which the unique contract tolerates as at-least-once in that
//! window (documented in the crate's fault model).
//!
//! Full window: if all [`MAX_PROBE`] entries of a hash's window are live, the hash cannot
//! be recorded. The event is still delivered (a cache purge delivered twice is harmless; a
//! purge dropped is stale data), the broker counts it in `Stats::unique_unrecorded` and
//! logs a warning: a later event with the same hash may then be delivered again. Never a
//! silent duplicate, never a hang.

use std::hash::Hasher;
use std::ptr::NonNull;

use siphasher::sip128::{Hasher128, SipHasher13};

pub(crate) use crate::layout::{DEDUP_MAX_PROBE as MAX_PROBE, DedupEntry, dedup_buckets_for as buckets_for};
use crate::sync::Ordering;
use crate::sys;

/// The 128-bit tag of a unique hash. Never all-zero (zero marks a never-used entry).
pub(crate) fn tag(key: (u64, u64), hash: &[u8]) -> (u64, u64) {
    let mut h = SipHasher13::new_with_keys(key.0, key.1);
    h.write(hash);
    let t = h.finish128();
    (t.h1 | 1, t.h2)
}

/// Result of [`DedupTable::check_and_record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Not seen within its timeout: recorded now, deliver it.
    New,
    /// Seen and not expired: drop it.
    Duplicate,
    /// Not seen, but no free entry in its window: deliver it unrecorded (counted).
    Full,
}

/// A view of the table. Invariant: `entries` points to `buckets` entries (a power of two
/// >= MAX_PROBE) inside a mapping that outlives the view.
pub(crate) struct DedupTable<'a> {
    entries: NonNull<DedupEntry>,
    buckets: usize,
    _region: std::marker::PhantomData<&'a ()>,
}

// SAFETY: the entries are atomics in shared memory; moving the view between threads is fine.
unsafe impl Send for DedupTable<'_> {}

impl DedupTable<'_> {
    /// # Safety
    /// `entries` must point to `buckets` valid entries that outlive the returned view;
    /// `buckets` a power of two >= MAX_PROBE.
    pub(crate) unsafe fn new(entries: NonNull<DedupEntry>, buckets: usize) -> Self {
        debug_assert!(buckets.is_power_of_two() && buckets >= MAX_PROBE);
        DedupTable { entries, buckets, _region: std::marker::PhantomData }
    }

    fn entry(&self, i: usize) -> &DedupEntry {
        // SAFETY: i is masked to < buckets by every caller; entries are atomics, valid for
        // the view's lifetime per the type invariant.
        unsafe { self.entries.add(i & (self.buckets - 1)).as_ref() }
    }

    /// Look `tag` up at time `now_ns`; if absent (or expired), record it until
    /// `now_ns + ttl_ns`.
    pub(crate) fn check_and_record(&self, tag: (u64, u64), now_ns: u64, ttl_ns: u64) -> Check {
        let start = tag.0 as usize;
        let mut free = None;
        for i in 0..MAX_PROBE {
            let e = self.entry(start.wrapping_add(i));
            let lo = e.tag_lo.load(Ordering::Acquire);
            let expires = e.expires_ns.load(Ordering::Relaxed);
            let live = lo != 0 && expires > now_ns;
            if live && lo == tag.0 && e.tag_hi.load(Ordering::Relaxed) == tag.1 {
                return Check::Duplicate;
            }
            if !live && free.is_none() {
                free = Some(start.wrapping_add(i));
            }
            if lo == 0 {
                // Never used: nothing was ever inserted past this point of the window.
                break;
            }
        }
        let Some(slot) = free else { return Check::Full };
        let e = self.entry(slot);
        e.tag_hi.store(tag.1, Ordering::Relaxed);
        e.expires_ns.store(now_ns.saturating_add(ttl_ns), Ordering::Relaxed);
        e.tag_lo.store(tag.0, Ordering::Release);
        Check::New
    }

    /// Live entries at `now_ns` (statistics, tests).
    #[cfg(test)]
    pub(crate) fn live(&self, now_ns: u64) -> usize {
        (0..self.buckets)
            .filter(|&i| {
                let e = self.entry(i);
                e.tag_lo.load(Ordering::Relaxed) != 0 && e.expires_ns.load(Ordering::Relaxed) > now_ns
            })
            .count()
    }
}

/// The table in private memory, for the socket transport (no shared region there): the
/// broker keeps it on its heap, so a broker failover in socket mode starts with an empty
/// table (documented in the crate's fault model).
pub(crate) struct HeapTable {
    entries: Box<[DedupEntry]>,
    key: (u64, u64),
}

impl HeapTable {
    /// A table sized for `unique_capacity` live hashes, with a fresh random SipHash key.
    pub(crate) fn new(unique_capacity: usize) -> HeapTable {
        let entries = (0..buckets_for(unique_capacity)).map(|_| DedupEntry::vacant()).collect();
        HeapTable { entries, key: (sys::random_u64(), sys::random_u64()) }
    }

    /// The SipHash key of this table.
    pub(crate) fn key(&self) -> (u64, u64) {
        self.key
    }

    /// A view of the table, borrowed from `self`.
    pub(crate) fn table(&self) -> DedupTable<'_> {
        let ptr = NonNull::from(&self.entries[0]);
        // SAFETY: `entries` holds buckets_for(..) entries (a power of two >= MAX_PROBE, never
        // empty) and lives as long as the borrow of `self` the view carries.
        unsafe { DedupTable::new(ptr, self.entries.len()) }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn table(buckets: usize) -> (Vec<DedupEntry>, DedupTable<'static>) {
        let mut v: Vec<DedupEntry> = (0..buckets).map(|_| DedupEntry::vacant()).collect();
        // SAFETY: `v` holds `buckets` entries and is returned alongside the view.
        let t = unsafe { DedupTable::new(NonNull::new(v.as_mut_ptr()).unwrap(), buckets) };
        (v, t)
    }

    const KEY: (u64, u64) = (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);

    #[test]
    fn expiry_reopens_the_hash() {
        let (_m, t) = table(64);
        let k = tag(KEY, b"purge:k1");
        assert_eq!(t.check_and_record(k, 1_000, 500), Check::New);
        assert_eq!(t.check_and_record(k, 1_499, 500), Check::Duplicate);
        assert_eq!(t.check_and_record(k, 1_500, 500), Check::New);
        assert_eq!(t.check_and_record(tag(KEY, b"purge:k2"), 1_600, 500), Check::New);
    }

    #[test]
    fn full_window_is_reported_not_hung() {
        let (_m, t) = table(MAX_PROBE);
        for i in 0..MAX_PROBE {
            assert_eq!(t.check_and_record(tag(KEY, format!("h{i}").as_bytes()), 0, 100), Check::New);
        }
        assert_eq!(t.live(0), MAX_PROBE);
        assert_eq!(t.check_and_record(tag(KEY, b"one more"), 0, 100), Check::Full);
        // Still no duplicate for the recorded ones, and expiry frees room.
        assert_eq!(t.check_and_record(tag(KEY, b"h3"), 50, 100), Check::Duplicate);
        assert_eq!(t.check_and_record(tag(KEY, b"one more"), 100, 100), Check::New);
    }

    #[test]
    fn tags_depend_on_the_key() {
        assert_ne!(tag(KEY, b"x"), tag((1, 2), b"x"));
        assert_ne!(tag(KEY, b"x"), tag(KEY, b"y"));
        assert_ne!(tag(KEY, b"").0, 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Publish(u8),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![3 => (0u8..48).prop_map(Op::Publish), 1 => (0u16..400).prop_map(Op::Advance)]
    }

    proptest! {
        /// Against a HashMap model with a fake clock: a hash is New exactly when the model
        /// has no live record of it. 48 distinct hashes in 4096 buckets cannot fill a window.
        #[test]
        fn matches_hashmap_model(ops in proptest::collection::vec(op(), 1..400), ttl in 1u64..300) {
            let (_m, t) = table(4096);
            let mut model: HashMap<u8, u64> = HashMap::new();
            let mut now = 10_000u64;
            for op in ops {
                match op {
                    Op::Advance(d) => now += u64::from(d),
                    Op::Publish(h) => {
                        let expect_new = model.get(&h).is_none_or(|&exp| exp <= now);
                        let got = t.check_and_record(tag(KEY, &[h]), now, ttl);
                        prop_assert_eq!(got, if expect_new { Check::New } else { Check::Duplicate });
                        if expect_new {
                            model.insert(h, now + ttl);
                        }
                    }
                }
            }
            let live_model = model.values().filter(|&&e| e > now).count();
            prop_assert_eq!(t.live(now), live_model);
        }

        /// A small table under pressure never reports a duplicate for a hash the model
        /// considers new (Full is allowed, Duplicate is not).
        #[test]
        fn never_a_false_duplicate(ops in proptest::collection::vec(op(), 1..400)) {
            let (_m, t) = table(MAX_PROBE);
            let mut model: HashMap<u8, u64> = HashMap::new();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Advance(d) => now += u64::from(d),
                    Op::Publish(h) => {
                        let expect_new = model.get(&h).is_none_or(|&exp| exp <= now);
                        let got = t.check_and_record(tag(KEY, &[h]), now, 200);
                        if expect_new {
                            prop_assert_ne!(got, Check::Duplicate);
                            if got == Check::New { model.insert(h, now + 200); }
                        } else {
                            prop_assert_eq!(got, Check::Duplicate);
                        }
                    }
                }
            }
        }
    }
}
