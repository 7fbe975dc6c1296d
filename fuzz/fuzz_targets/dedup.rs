//! Unique-event dedup table under an arbitrary sequence of lookups and clock steps, checked
//! against a map model: a hash is `Duplicate` exactly while the model holds a live record
//! of it, and `New` or (only when its probe window is full) `Full` otherwise. Optionally
//! the table starts from arbitrary entries (a previous broker's leftovers or stray writes):
//! then only "a hash just recorded is a duplicate at once" and no panic are checked.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use worker_events::fuzz_api::{DedupCheck, DedupTable, dedup_tag};

#[derive(Arbitrary, Debug)]
enum Op {
    /// A unique event with hash `[h]` (a small alphabet, so repeats are frequent).
    Small { h: u8, ttl: u16 },
    /// A unique event with an arbitrary hash.
    Any { hash: Vec<u8>, ttl: u32 },
    /// Time passes.
    Advance { ns: u32 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    buckets_log2: u8,
    key: (u64, u64),
    now: u64,
    /// Arbitrary starting entries: (index, tag_lo, tag_hi, expires_ns).
    garbage: Vec<(u16, u64, u64, u64)>,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let buckets = 1usize << (5 + input.buckets_log2 % 6); // 32 ..= 1024
    let mut table = DedupTable::new(buckets).expect("valid bucket count");
    for &(i, lo, hi, exp) in &input.garbage {
        table.set_entry(i as usize, lo, hi, exp);
    }
    let modelled = input.garbage.is_empty();
    let mut model: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut now = input.now % (1 << 62);

    for op in input.ops.iter().take(1024) {
        let (hash, ttl) = match op {
            Op::Advance { ns } => {
                now += u64::from(*ns);
                continue;
            }
            Op::Small { h, ttl } => (vec![*h], u64::from(*ttl)),
            Op::Any { hash, ttl } => (hash.clone(), u64::from(*ttl)),
        };
        let tag = dedup_tag(input.key, &hash);
        assert_ne!(tag.0, 0, "a tag must never look like an unused entry");
        let got = table.check_and_record(tag, now, ttl);
        if modelled {
            let live = model.get(&hash).is_some_and(|&exp| exp > now);
            if live {
                assert_eq!(got, DedupCheck::Duplicate, "recorded hash {hash:?} not found");
            } else {
                assert_ne!(got, DedupCheck::Duplicate, "false duplicate for {hash:?}");
            }
            if got == DedupCheck::New {
                model.insert(hash.clone(), now.saturating_add(ttl));
            }
        }
        if got == DedupCheck::New && ttl > 0 {
            assert_eq!(table.check_and_record(tag, now, ttl), DedupCheck::Duplicate, "just recorded, not found");
        }
    }
});
