//! SPSC ring ends over a ring whose header (positions, counters) and records are arbitrary
//! bytes, and which a hostile peer keeps overwriting between calls. Every corrupt position
//! or record length must come back as `Corrupt` (or be ignored), never as a panic or an
//! access outside the ring: the ring is one heap allocation of exactly header + capacity
//! bytes, so AddressSanitizer reports any byte read or written past it.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use worker_events::fuzz_api::{
    CONSUMED, LOST, LOST_SEEN, PUBLISHED, READ_POS, RECORD_ALIGN, RECORD_FIRST, RECORD_HEADER_SIZE, RECORD_LAST,
    RING_HEADER_SIZE, RingConsumer, RingMemory, RingProducer, WANT_SPACE, WRITE_POS, record_header,
};

/// Header words a peer may write.
const WORDS: [usize; 7] = [WRITE_POS, LOST, PUBLISHED, WANT_SPACE, READ_POS, CONSUMED, LOST_SEEN];

/// Values at the edges of the position and counter space.
const SPECIAL: [u64; 8] = [0, 8, u64::MAX, u64::MAX - 7, u64::MAX - 63, 1 << 63, (1 << 63) - 8, u32::MAX as u64];

/// Words near 2^64 in shared memory (a `write_pos`, or a `published`, `lost` or `consumed`
/// counter) once made `Producer::try_write`, `add_lost` or `Consumer::consume` panic with
/// "attempt to add with overflow" under overflow checks; fixed (checked or saturating
/// arithmetic). Set this to true to keep the fuzzer away from such words again.
const AVOID_KNOWN_OVERFLOWS: bool = false;

fn tame(mem: &RingMemory) {
    if AVOID_KNOWN_OVERFLOWS {
        for off in [WRITE_POS, READ_POS, LOST, PUBLISHED, CONSUMED] {
            let v = mem.read_u64(off) & ((1 << 62) - 1);
            mem.write(off, &v.to_le_bytes());
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    // Consumer end.
    NewConsumer,
    Peek,
    Consume {
        keep: bool,
    },
    SkipAll,
    Release,
    TakeLost,
    HasData,
    ConsumerDepth,
    // Producer end (the peer being the hostile consumer).
    NewProducer,
    TryWrite {
        flags: u32,
        len: u16,
        split: u16,
    },
    Commit,
    Refresh,
    BodyRoom {
        want: u16,
    },
    RequestSpace {
        want: u16,
    },
    AddLost {
        n: u8,
    },
    ProducerDepth,
    // The hostile peer.
    /// Store `value` into one of the header words.
    SetWord {
        which: u8,
        value: u64,
    },
    /// Store one of `SPECIAL` into a header word.
    SetWordSpecial {
        which: u8,
        special: u8,
    },
    /// Store `base + delta` into a header word, `base` being the stored read or write
    /// position: nearly-valid positions are where bounds checks are tested.
    SetWordRelative {
        which: u8,
        from_write: bool,
        delta: i16,
    },
    /// A record header at `slot` record slots (64-byte units) past the stored read
    /// position, stamped for that position moved by `stamp_delta` slots (0: a valid stamp;
    /// minus the slots of a ring: a header of the previous lap).
    RecordHeader {
        slot: u8,
        stamp_delta: i8,
        len: u32,
        flags: u32,
    },
    /// Raw bytes anywhere in the header or the data area.
    Poke {
        offset: u16,
        bytes: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    cap_log2: u8,
    header: Vec<u8>,
    data: Vec<u8>,
    ops: Vec<Op>,
}

fn check_peek(cons: &mut RingConsumer<'_>, cap: usize) {
    if let Ok(Some(rec)) = cons.peek() {
        assert!(rec.len <= cap - RECORD_HEADER_SIZE, "record of {} bytes in a {cap}-byte ring", rec.len);
        assert_eq!(rec.flags & !(RECORD_FIRST | RECORD_LAST), 0, "unknown flags accepted");
    }
}

fuzz_target!(|input: Input| {
    let cap = 1usize << (6 + input.cap_log2 % 8); // 64 B ..= 8 KiB
    let mem = RingMemory::new(cap).expect("valid capacity");
    mem.write(0, &input.header[..input.header.len().min(RING_HEADER_SIZE)]);
    mem.write(RING_HEADER_SIZE, &input.data);
    tame(&mem);

    let mut cons: Option<RingConsumer<'_>> = mem.consumer().ok();
    let mut prod: Option<RingProducer<'_>> = mem.producer().ok();
    let body = vec![0xa5u8; u16::MAX as usize];

    for op in input.ops.iter().take(512) {
        match *op {
            Op::NewConsumer => cons = mem.consumer().ok(),
            Op::Peek => {
                if let Some(c) = cons.as_mut() {
                    check_peek(c, cap);
                }
            }
            Op::Consume { keep } => {
                if let Some(c) = cons.as_mut()
                    && let Ok(Some(rec)) = c.peek()
                {
                    let got = c.consume(keep).expect("a peeked record is pending");
                    if let Some(b) = got {
                        assert_eq!(b.len(), rec.len);
                    }
                }
            }
            Op::SkipAll => {
                if let Some(c) = cons.as_mut() {
                    c.skip_all();
                }
            }
            Op::Release => {
                if let Some(c) = cons.as_mut() {
                    let before = mem.read_u64(READ_POS);
                    c.release();
                    let after = mem.read_u64(READ_POS);
                    assert!(
                        after == before || after.is_multiple_of(RECORD_ALIGN as u64),
                        "consumer stored an unaligned position"
                    );
                }
            }
            Op::TakeLost => {
                if let Some(c) = cons.as_mut() {
                    c.take_lost();
                }
            }
            Op::HasData => {
                if let Some(c) = cons.as_mut() {
                    c.has_data();
                }
            }
            Op::ConsumerDepth => {
                if let Some(c) = cons.as_ref() {
                    c.depth();
                }
            }
            Op::NewProducer => prod = mem.producer().ok(),
            Op::TryWrite { flags, len, split } => {
                if let Some(p) = prod.as_mut() {
                    let len = len as usize;
                    let split = (split as usize).min(len);
                    let _ = p.try_write(flags, &[&body[..split], &body[split..len]]);
                }
            }
            Op::Commit => {
                if let Some(p) = prod.as_mut() {
                    p.commit();
                }
            }
            Op::Refresh => {
                if let Some(p) = prod.as_mut()
                    && let Ok(free) = p.refresh()
                {
                    assert!(free <= cap);
                }
            }
            Op::BodyRoom { want } => {
                if let Some(p) = prod.as_mut()
                    && let Ok(room) = p.body_room(want as usize)
                {
                    assert!(room <= p.max_body());
                }
            }
            Op::RequestSpace { want } => {
                if let Some(p) = prod.as_mut() {
                    let _ = p.request_space(want as usize);
                }
            }
            Op::AddLost { n } => {
                if let Some(p) = prod.as_mut() {
                    p.add_lost(u64::from(n));
                }
            }
            Op::ProducerDepth => {
                if let Some(p) = prod.as_ref() {
                    p.depth();
                }
            }
            Op::SetWord { which, value } => {
                let off = WORDS[which as usize % WORDS.len()];
                if off == WANT_SPACE {
                    mem.write(off, &(value as u32).to_le_bytes());
                } else {
                    mem.write(off, &value.to_le_bytes());
                }
                tame(&mem);
            }
            Op::SetWordSpecial { which, special } => {
                let off = WORDS[which as usize % WORDS.len()];
                mem.write(off, &SPECIAL[special as usize % SPECIAL.len()].to_le_bytes());
                tame(&mem);
            }
            Op::SetWordRelative { which, from_write, delta } => {
                let off = WORDS[which as usize % WORDS.len()];
                let base = mem.read_u64(if from_write { WRITE_POS } else { READ_POS });
                let value = base.wrapping_add_signed(i64::from(delta));
                mem.write(off, &value.to_le_bytes());
                tame(&mem);
            }
            Op::RecordHeader { slot, stamp_delta, len, flags } => {
                let a = RECORD_ALIGN as u64;
                let pos = (mem.read_u64(READ_POS) & !(a - 1)).wrapping_add(a * u64::from(slot));
                let off = (pos as usize) & (cap - 1);
                let stamped = pos.wrapping_add_signed(i64::from(stamp_delta) * a as i64);
                mem.write(RING_HEADER_SIZE + off, &record_header(stamped, len, flags));
            }
            Op::Poke { offset, ref bytes } => {
                mem.write(offset as usize % mem.len(), bytes);
                tame(&mem);
            }
        }
    }
});
