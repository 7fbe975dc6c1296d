//! The multi-writer claim under loom: publishers in different processes are threads here,
//! the table a private array of the real entries (32 = one probe window), `now` each
//! publisher's own reading of the clock.

use super::*;
use loom::thread;
use std::sync::Arc;

const KEY: (u64, u64) = (7, 9);
const TTL: u64 = 1_000;

fn table() -> Arc<Vec<DedupEntry>> {
    Arc::new((0..MAX_PROBE).map(|_| DedupEntry::vacant()).collect())
}

fn view(v: &[DedupEntry]) -> DedupTable<'_> {
    // SAFETY: `v` holds MAX_PROBE entries (a power of two) and outlives the view.
    unsafe { DedupTable::new(NonNull::from(&v[0]), v.len()) }
}

/// `nows.len()` publishers claim `h` concurrently, each at its own time; exactly one
/// records it, the others see a duplicate; afterwards one live entry holds it.
fn exactly_one(v: Arc<Vec<DedupEntry>>, h: (u64, u64), nows: &'static [u64]) {
    let handles: Vec<_> = nows
        .iter()
        .map(|&now| {
            let v = v.clone();
            thread::spawn(move || view(&v).check_and_record(h, now, TTL))
        })
        .collect();
    let got: Vec<Check> = handles.into_iter().map(|t| t.join().unwrap()).collect();
    let new = got.iter().filter(|&&c| c == Check::New).count();
    assert_eq!(new, 1, "claims of one hash: {got:?}");
    assert!(got.iter().all(|&c| c != Check::Full), "{got:?}");
    let last = *nows.iter().max().unwrap();
    assert_eq!(view(&v).check_and_record(h, last, TTL), Check::Duplicate);
}

/// Two publishers, an empty table: both go for the same first entry.
#[test]
fn two_claims_of_one_hash_on_one_entry() {
    loom::model(|| exactly_one(table(), tag(KEY, b"h"), &[10, 10]));
}

/// Two publishers that pick different entries: the first entry of the window holds
/// another hash expiring at 100, so the publisher at time 50 takes the second entry and
/// the one at time 150 the first. Only the rescan (Dekker) keeps this to one record.
#[test]
fn two_claims_of_one_hash_on_two_entries() {
    loom::model(|| {
        let v = table();
        let h = tag(KEY, b"h");
        // Another hash in h's first entry, recorded at 0 until 100.
        let mut other = tag(KEY, b"o");
        other.0 = h.0;
        other.1 ^= 1;
        assert_eq!(view(&v).check_and_record(other, 0, 100), Check::New);
        exactly_one(v, h, &[50, 150]);
    });
}

/// As above, but the other hash differs from `h` in `tag_lo` too (same window): the
/// rescans skip its entry after two loads (`may_hold`), even while the publisher at 150
/// is taking it over for `h`.
#[test]
fn two_claims_of_one_hash_behind_another_tag() {
    loom::model(|| {
        let v = table();
        let h = tag(KEY, b"h");
        let mut other = tag(KEY, b"o");
        other.0 = h.0 ^ 64; // same home entry in a 32-entry table
        assert_eq!(view(&v).check_and_record(other, 0, 100), Check::New);
        exactly_one(v, h, &[50, 150]);
    });
}

/// An expired record of the hash is taken over by exactly one of two publishers.
#[test]
fn expired_entry_reclaimed_by_exactly_one() {
    loom::model(|| {
        let v = table();
        let h = tag(KEY, b"h");
        assert_eq!(view(&v).check_and_record(h, 0, 100), Check::New);
        exactly_one(v, h, &[200, 200]);
    });
}

/// Three publishers of one hash at once.
#[test]
fn three_claims_of_one_hash() {
    loom::model(|| exactly_one(table(), tag(KEY, b"h"), &[10, 10, 10]));
}

/// A publisher killed mid-claim (its entry left `CLAIMED`) does not wedge the hash: after
/// the claim timeout, exactly one of two publishers records it.
#[test]
fn abandoned_claim_expires() {
    loom::model(|| {
        let v = table();
        let h = tag(KEY, b"h");
        let e = &v[home(h) & (MAX_PROBE - 1)];
        e.tag_lo.store(h.0, Ordering::Relaxed);
        e.tag_hi.store(h.1, Ordering::Relaxed);
        e.state.store(pack(1, CLAIMED), Ordering::Release);
        // Within the claim timeout (capped by the ttl, 1000): still claimed, a duplicate.
        assert_eq!(view(&v).check_and_record(h, 500, TTL), Check::Duplicate);
        exactly_one(v, h, &[2_000, 2_000]);
    });
}
