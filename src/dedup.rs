//! Shared-memory hash table with expiry: the unique-event dedup cache.
//!
//! `buckets` (a power of two, at least twice `unique_capacity`) entries of 32 bytes: a
//! 128-bit tag (SipHash-1-3 of the unique hash, keyed with the random key in the region
//! header, so peers cannot aim collisions), an expiry instant on `CLOCK_MONOTONIC`
//! (system-wide, so every process reads the same clock) and a state word. Linear probing
//! within a bounded window of [`MAX_PROBE`] entries: a recorded entry whose expiry has passed
//! is free again; a never-used entry (state 0) ends a lookup early.
//!
//! Concurrency: on shared memory every publisher records its own unique events, so the table
//! has many writers in many processes, any of which may be killed at any instruction or
//! frozen (SIGSTOP). The state word of an entry is `stamp << 2 | kind`:
//!
//! * `FREE` (kind 0): stamp 0 = never used; otherwise released or never finished.
//! * `BUSY` (1): one claimer owns the entry and is writing the tag and the expiry.
//! * `CLAIMED` (2): the tag is valid; its claimer is checking the window for a rival.
//! * `LIVE` (3): the tag and the expiry are valid: the hash is recorded.
//!
//! The stamp is the claim's `CLOCK_MONOTONIC` time, strictly greater than the entry's previous
//! stamp, so a state value never repeats (no ABA: every transition is a compare-and-swap from
//! the value the writer saw, and a reader that sees the same state before and after reading
//! the tag read a consistent tag). A claim (`check_and_record`):
//!
//! 1. looks the tag up (a `LIVE`, unexpired equal tag: duplicate) and picks the first free
//!    entry of the window: never used, released, expired, or a `BUSY`/`CLAIMED` claim older
//!    than the claim timeout (its claimer died or is frozen);
//! 2. takes it by CAS (state seen -> `BUSY`), writes tag and expiry, then CAS `BUSY` ->
//!    `CLAIMED` (failing only when the claim was broken as stale), then a SeqCst fence;
//! 3. rescans the window (Dekker: of two claimers of one tag, each publishing its claim
//!    before its rescan, at least one sees the other): an unexpired `LIVE` equal tag, or a
//!    `CLAIMED` equal tag *earlier* in the window, means another claim wins (ours is
//!    released: duplicate); a `CLAIMED` equal tag *later* in the window is broken (CAS ->
//!    `FREE`), so its claimer's commit fails and it starts over, finding ours;
//! 4. commits by CAS `CLAIMED` -> `LIVE`; a claim broken meanwhile starts over.
//!
//! So of any set of concurrent claims of one tag exactly one commits, and an expired entry is
//! taken over by exactly one claimer (the CAS of step 2); the loom models below check both,
//! and fail with a plain load and store in place of that CAS. A claimer killed mid-claim
//! leaves a `BUSY` or `CLAIMED` entry that becomes free after the claim timeout (1 s, or the
//! `unique_timeout` if shorter): never wedged. Its event dies with it, and an equal tag
//! claimed concurrently behind its `CLAIMED` entry is counted a duplicate of it: a hash whose
//! publisher is killed in that window of a few hundred nanoseconds can be lost once (at most
//! once, never twice). A claimer frozen for longer than the claim timeout between steps 2 and
//! 4 has its claim broken; it notices at its next CAS and starts over. The one residual
//! hazard is a claimer frozen that long between its CAS to `BUSY` and its tag stores: when
//! it resumes, its stores may land in the entry of the claimer that took the stale entry
//! over, which may then deliver one hash twice or drop one (documented in the crate's fault
//! model). Every word is an atomic, so none of this is ever undefined behaviour.
//!
//! Full window: if all [`MAX_PROBE`] entries of a hash's window are live (or being claimed),
//! the hash cannot be recorded. The event is still delivered (a cache purge delivered twice
//! is harmless; a purge dropped is stale data), counted in `Stats::unique_unrecorded` with a
//! warning: a later event with the same hash may then be delivered again. Never a silent
//! duplicate, never a hang. The same holds for a claim that lost [`MAX_RETRIES`] races in a
//! row (not seen in practice).

use std::hash::Hasher;
use std::ptr::NonNull;

use siphasher::sip128::{Hasher128, SipHasher13};

pub(crate) use crate::layout::{DEDUP_MAX_PROBE as MAX_PROBE, DedupEntry, dedup_buckets_for as buckets_for};
use crate::sync::{Ordering, fence};
use crate::sys;

/// The 128-bit tag of a unique hash (`tag_lo`, `tag_hi`).
pub(crate) type Tag = (u64, u64);

/// The 128-bit tag of a unique hash. Never all-zero.
pub(crate) fn tag(key: (u64, u64), hash: &[u8]) -> Tag {
    let mut h = SipHasher13::new_with_keys(key.0, key.1);
    h.write(hash);
    let t = h.finish128();
    (t.h1 | 1, t.h2)
}

/// The first entry of `tag`'s probe window (before masking): an even entry, so that the
/// home entry and the next one, which a claim of a fresh hash reads twice (look-up and
/// rescan), share one 64-byte line (entries are 32 bytes and the table is page-aligned). A
/// window starting at `tag.0` itself always started on an odd entry (bit 0 of the tag is
/// forced to 1), in the second half of a line, so every claim touched two lines.
fn home(tag: (u64, u64)) -> usize {
    (tag.0 & !1) as usize
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

/// Entry kinds (the low two bits of the state word).
const FREE: u64 = 0;
const BUSY: u64 = 1;
const CLAIMED: u64 = 2;
const LIVE: u64 = 3;

/// A `BUSY` or `CLAIMED` entry older than this (or than the ttl, if shorter) is abandoned.
const CLAIM_TIMEOUT_NS: u64 = 1_000_000_000;
/// Claims started over (lost CAS races) before giving up with [`Check::Full`].
const MAX_RETRIES: usize = 64;

fn kind(state: u64) -> u64 {
    state & 3
}

fn stamp(state: u64) -> u64 {
    state >> 2
}

fn pack(stamp: u64, kind: u64) -> u64 {
    (stamp << 2) | kind
}

/// A consistent reading of one entry.
struct Seen {
    state: u64,
    tag: (u64, u64),
    expires: u64,
}

/// What claim step 3 concluded.
enum Contest {
    Won,
    Lost,
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
        // SAFETY: i is masked to < buckets; entries are atomics, valid for the view's
        // lifetime per the type invariant.
        unsafe { self.entries.add(i & (self.buckets - 1)).as_ref() }
    }

    /// Ask the CPU to bring `tag`'s home line into its cache, for a claim made shortly
    /// after: a fresh hash's home entry is a random line of a table of megabytes, mostly a
    /// cache (and TLB) miss of 100-200 ns, which the caller overlaps with other work (the
    /// event's encoding) this way. A hint only: it reads nothing and cannot fault.
    pub(crate) fn prefetch(&self, tag: Tag) {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        {
            let e: *const DedupEntry = self.entry(home(tag));
            // SAFETY: `prefetcht0` has no architectural effect (it never faults, and the
            // address is inside the table anyway); SSE is part of the x86-64 baseline.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(e.cast()) };
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
        let _ = tag;
    }

    /// [`DedupTable::prefetch`] for the lines of the window after its first one (16 lines
    /// of 64 bytes: `MAX_PROBE` entries of 32 bytes from an even entry), all at once: a
    /// look-up that does not stop at its home line (once a table has turned over, few of its
    /// entries are never-used) then waits for about one miss, not for one per line.
    /// A window that wraps around the end of the table (32 homes in `buckets`) is not
    /// prefetched: the unwrapped case is 15 instructions with constant offsets.
    fn prefetch_window(&self, start: usize) {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        {
            let first = start & (self.buckets - 1);
            if first + MAX_PROBE > self.buckets {
                return;
            }
            let home = self.entries.as_ptr().wrapping_add(first);
            for k in 1..MAX_PROBE / 2 {
                let e = home.wrapping_add(2 * k);
                // SAFETY: as in `prefetch`: a hint without architectural effect (the address
                // is inside the table: first + MAX_PROBE <= buckets).
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(e.cast()) };
            }
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
        let _ = start;
    }

    /// A quick look at an entry for a scan that only looks for claims and records of `tag`
    /// (the look-up once it has its candidate, the rescan): two loads where [`Self::read`]
    /// makes five, which is most of a claim's work once a table has turned over (its scans
    /// then read whole windows). `None`: never used (the scan ends, as with `read`).
    /// `Some(false)`: no claim or record of `tag` (skipped). `Some(true)`: maybe one; the
    /// caller reads the entry whole. A `tag_lo` other than ours after the Acquire load of a
    /// `CLAIMED`/`LIVE` state (which makes that claim's tag stores visible) is that claim's
    /// tag or a later claim's, stored after the state we loaded changed: either way, at one
    /// instant of this look the entry held no claim of `tag`, which is what a `read` made at
    /// that instant would have told; and a claim of `tag` made after that instant published
    /// itself after our load, so the Dekker argument of the module docs covers it as it
    /// covers one that `read` misses by reading a moment too early.
    fn may_hold(e: &DedupEntry, tag: Tag) -> Option<bool> {
        let state = e.state.load(Ordering::Acquire);
        if state == 0 {
            return None;
        }
        Some(kind(state) >= CLAIMED && e.tag_lo.load(Ordering::Relaxed) == tag.0)
    }

    /// Read an entry: its state (Acquire), and for `CLAIMED`/`LIVE` its tag and expiry,
    /// re-checked against the state (seqlock: tag stores happen only in `BUSY`).
    fn read(e: &DedupEntry) -> Seen {
        loop {
            let state = e.state.load(Ordering::Acquire);
            if kind(state) < CLAIMED {
                return Seen { state, tag: (0, 0), expires: 0 };
            }
            let tag = (e.tag_lo.load(Ordering::Relaxed), e.tag_hi.load(Ordering::Relaxed));
            let expires = e.expires_ns.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if e.state.load(Ordering::Relaxed) == state {
                return Seen { state, tag, expires };
            }
        }
    }

    /// Look `tag` up at time `now_ns`; if absent (or expired), record it until
    /// `now_ns + ttl_ns`. Safe against concurrent callers in any number of processes (see
    /// the module docs).
    pub(crate) fn check_and_record(&self, tag: (u64, u64), now_ns: u64, ttl_ns: u64) -> Check {
        let stale_before = now_ns.saturating_sub(CLAIM_TIMEOUT_NS.min(ttl_ns));
        let start = home(tag);
        let abandoned = |s: &Seen| matches!(kind(s.state), BUSY | CLAIMED) && stamp(s.state) <= stale_before;
        for _ in 0..MAX_RETRIES {
            // 1. Look up; the first free entry.
            let mut free = None;
            for i in 0..MAX_PROBE {
                let e = self.entry(start.wrapping_add(i));
                if free.is_some() {
                    // A candidate is chosen: from here on only a record of `tag` matters.
                    match Self::may_hold(e, tag) {
                        None => break,
                        Some(false) => continue,
                        Some(true) => {}
                    }
                }
                let s = Self::read(e);
                if s.state == 0 {
                    free = free.or(Some((i, s.state)));
                    break;
                }
                if i == 0 {
                    // The home entry has been used: the look-up may read the whole window.
                    self.prefetch_window(start);
                }
                let k = kind(s.state);
                if k == LIVE && s.expires > now_ns && s.tag == tag {
                    return Check::Duplicate;
                }
                let is_free = k == FREE || (k == LIVE && s.expires <= now_ns) || abandoned(&s);
                if is_free && free.is_none() {
                    free = Some((i, s.state));
                }
            }
            let Some((mine, seen)) = free else { return Check::Full };
            // 2. Take it, write the tag, publish the claim.
            let e = self.entry(start.wrapping_add(mine));
            let st = now_ns.max(stamp(seen) + 1);
            if e.state.compare_exchange(seen, pack(st, BUSY), Ordering::Acquire, Ordering::Relaxed).is_err() {
                continue;
            }
            fence(Ordering::Release);
            e.tag_lo.store(tag.0, Ordering::Relaxed);
            e.tag_hi.store(tag.1, Ordering::Relaxed);
            e.expires_ns.store(now_ns.saturating_add(ttl_ns), Ordering::Relaxed);
            let claimed = pack(st, CLAIMED);
            if e.state.compare_exchange(pack(st, BUSY), claimed, Ordering::Release, Ordering::Relaxed).is_err() {
                continue;
            }
            fence(Ordering::SeqCst);
            // 3. Rivals for the same tag.
            match self.contest(tag, start, mine, now_ns, stale_before) {
                Contest::Lost => {
                    let _ = e.state.compare_exchange(claimed, pack(st, FREE), Ordering::Release, Ordering::Relaxed);
                    return Check::Duplicate;
                }
                // 4. Commit, unless our claim was broken meanwhile.
                Contest::Won => {
                    if e.state.compare_exchange(claimed, pack(st, LIVE), Ordering::Release, Ordering::Relaxed).is_ok() {
                        return Check::New;
                    }
                }
            }
        }
        Check::Full
    }

    /// Claim step 3: with our claim of `tag` published at window offset `mine`, look for
    /// other claims or records of the same tag.
    fn contest(&self, tag: (u64, u64), start: usize, mine: usize, now_ns: u64, stale_before: u64) -> Contest {
        for j in 0..MAX_PROBE {
            if j == mine {
                continue;
            }
            let e = self.entry(start.wrapping_add(j));
            match Self::may_hold(e, tag) {
                // Never used: no claim of this window ever went past it.
                None => return Contest::Won,
                Some(false) => continue,
                Some(true) => {}
            }
            loop {
                let s = Self::read(e);
                if s.state == 0 {
                    // Never used: no claim of this window ever went past it.
                    return Contest::Won;
                }
                if s.tag != tag {
                    break;
                }
                if kind(s.state) == LIVE {
                    if s.expires > now_ns {
                        return Contest::Lost;
                    }
                    break;
                }
                // A rival claim of the same tag. An earlier one in the window wins, unless
                // abandoned; a later one (or an abandoned one) is broken.
                if j < mine && stamp(s.state) > stale_before {
                    return Contest::Lost;
                }
                let broken = pack(stamp(s.state), FREE);
                if e.state.compare_exchange(s.state, broken, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    break;
                }
                // It moved on (committed, released, or taken over): look again.
            }
        }
        Contest::Won
    }

    /// Entries recorded and live at `now_ns`, each entry's words loaded once (no retry, so
    /// it is bounded whatever other processes write meanwhile; the live inspector's fill).
    pub(crate) fn fill(&self, now_ns: u64) -> usize {
        (0..self.buckets)
            .filter(|&i| {
                let e = self.entry(i);
                let state = e.state.load(Ordering::Acquire);
                kind(state) == LIVE && e.expires_ns.load(Ordering::Relaxed) > now_ns
            })
            .count()
    }

    /// Recorded entries live at `now_ns` (statistics, tests).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn live(&self, now_ns: u64) -> usize {
        (0..self.buckets)
            .filter(|&i| {
                let s = Self::read(self.entry(i));
                kind(s.state) == LIVE && s.expires > now_ns
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
        // From the whole slice, not `&entries[0]`: the view reaches every entry through this
        // pointer, so its provenance must cover all of them (a pointer from one element's
        // reference may touch that element only; Miri reports the rest as UB).
        let ptr = NonNull::from(&*self.entries).cast::<DedupEntry>();
        // SAFETY: `entries` holds buckets_for(..) entries (a power of two >= MAX_PROBE, never
        // empty) and lives as long as the borrow of `self` the view carries; the entries are
        // atomics, so writing through a pointer derived from a shared reference is allowed.
        unsafe { DedupTable::new(ptr, self.entries.len()) }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_models;
