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

/// The heap table's view reaches every bucket (under Miri: through a pointer whose
/// provenance covers the whole table).
#[test]
fn heap_table_view_reaches_every_entry() {
    let h = HeapTable::new(64);
    let t = h.table();
    let tags: Vec<_> = (0..48u32).map(|i| tag(h.key(), &i.to_le_bytes())).collect();
    for &k in &tags {
        assert_eq!(t.check_and_record(k, 1_000, 500), Check::New);
    }
    for &k in &tags {
        assert_eq!(t.check_and_record(k, 1_100, 500), Check::Duplicate);
    }
}

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

/// A fresh hash's claim reads its home entry and the next one (look-up, then rescan):
/// both in one 64-byte line, whatever the tag.
#[test]
fn a_claim_of_a_fresh_hash_stays_in_one_line() {
    for i in 0..1000u32 {
        let t = tag(KEY, &i.to_le_bytes());
        let first = home(t) & (4096 - 1);
        let size = crate::layout::DEDUP_ENTRY_SIZE;
        assert_eq!(first * size / 64, (first + 1) * size / 64, "tag {t:x?}");
    }
    // Two fresh hashes whose windows start on the same line: each stays on it.
    let (_m, t) = table(64);
    let a = tag(KEY, b"a");
    let mut b = tag(KEY, b"b");
    b.0 = a.0; // same home: b takes the entry after a's, on the same line
    b.1 ^= 1;
    assert_eq!(t.check_and_record(a, 0, 100), Check::New);
    assert_eq!(t.check_and_record(b, 0, 100), Check::New);
    assert_eq!(t.check_and_record(a, 1, 100), Check::Duplicate);
    assert_eq!(t.check_and_record(b, 1, 100), Check::Duplicate);
}

/// A record behind an expired entry of another tag (same home, other `tag_lo`) is
/// found by the look-up, which reads it whole once it has its candidate.
#[test]
fn a_record_behind_an_expired_entry_is_found() {
    let (_m, t) = table(64);
    let h = tag(KEY, b"h");
    let mut other = tag(KEY, b"o");
    other.0 = h.0 ^ 256;
    assert_eq!(home(other) & 63, home(h) & 63);
    assert_eq!(t.check_and_record(other, 0, 100), Check::New);
    assert_eq!(t.check_and_record(h, 50, 1_000), Check::New); // behind `other`
    // `other` has expired: the candidate; `h` is still found behind it.
    assert_eq!(t.check_and_record(h, 150, 1_000), Check::Duplicate);
    assert_eq!(t.check_and_record(other, 150, 100), Check::New);
    assert_eq!(t.live(150), 2);
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
    /// (Not under Miri: proptest needs the file system, and thousands of cases.)
    #[test]
    #[cfg_attr(miri, ignore)]
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
    /// considers new (Full is allowed, Duplicate is not). Not under Miri, as above.
    #[test]
    #[cfg_attr(miri, ignore)]
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
