//! The whole shared-memory receive loop over hostile memory: a receiving worker's port
//! (drain of every inbound ring, fragment reassembly, lost notices, quarantine of corrupt
//! rings) dispatching into subscribed callbacks through the message decoder, fed by honest
//! publishing ports of the other slots (some bursts in batches: ended, or leaked and then
//! committed by the port's next flush or dispatch), while a hostile peer with the memfd
//! scribbles over the inbound rings' headers and records between calls.
//!
//! Checked, whatever the scribbles: no panic, no out-of-bounds access; every delivered
//! event passed the receiver's checks (its publisher is a real other slot, its payload
//! within the limit); the loop settles: once the publishers stop, a bounded number of
//! dispatch passes empties everything and `arm` then finds nothing to do (no spin).
//! Without scribbles, also exact accounting: per publisher, the events delivered are its
//! events, in order, each once, intact, and delivered + reported lost = published.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use worker_events::Wid;
use worker_events::fuzz_api::{
    CONSUMED, LOST, LOST_SEEN, PUBLISHED, READ_POS, RECORD_ALIGN, RING_HEADER_SIZE, ReceiveLoop, WANT_SPACE, WRITE_POS,
    record_header,
};

/// Ring header words a peer may write.
const WORDS: [usize; 7] = [WRITE_POS, LOST, PUBLISHED, WANT_SPACE, READ_POS, CONSUMED, LOST_SEEN];

/// Values at the edges of the position and counter space.
const SPECIAL: [u64; 8] = [0, 8, u64::MAX, u64::MAX - 7, u64::MAX - 63, 1 << 63, (1 << 63) - 8, u32::MAX as u64];

/// Dispatch passes the loop may take to settle once the publishers stop.
const SETTLE_PASSES: usize = 2000;

#[derive(Arbitrary, Debug)]
enum Op {
    // Honest publishers.
    /// An "all" event from slot `from` of `len` payload bytes (a sequence number, then a
    /// pattern derived from it).
    Publish {
        from: u8,
        event: u8,
        len: u16,
    },
    /// A burst of `n` small events from slot `from`.
    Burst {
        from: u8,
        n: u8,
    },
    /// A burst of `n` small events from slot `from` in one batch (`Worker::batch`), ended
    /// or leaked (then committed by the port's next flush or dispatch).
    BatchedBurst {
        from: u8,
        n: u8,
        end: bool,
    },
    Flush {
        from: u8,
    },
    /// The publishers dispatch what they sent each other.
    DrainPublishers,
    // The receiver.
    Dispatch {
        budget: u8,
    },
    Arm,
    Disarm,
    HasInbound,
    // The hostile peer, on ring `from -> receiver`.
    SetWord {
        from: u8,
        which: u8,
        value: u64,
    },
    SetWordSpecial {
        from: u8,
        which: u8,
        special: u8,
    },
    /// Store `base + delta` into a header word, `base` being the stored read or write
    /// position: nearly-valid positions are where bounds checks are tested.
    SetWordRelative {
        from: u8,
        which: u8,
        from_write: bool,
        delta: i16,
    },
    /// A record header `slot` record slots past the stored read position, stamped for
    /// that position moved by `stamp_delta` slots.
    RecordHeader {
        from: u8,
        slot: u8,
        stamp_delta: i8,
        len: u32,
        flags: u32,
    },
    /// Raw bytes anywhere in the ring (header or data area).
    Poke {
        from: u8,
        offset: u16,
        bytes: Vec<u8>,
    },
}

impl Op {
    fn hostile(&self) -> bool {
        matches!(
            self,
            Op::SetWord { .. }
                | Op::SetWordSpecial { .. }
                | Op::SetWordRelative { .. }
                | Op::RecordHeader { .. }
                | Op::Poke { .. }
        )
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    workers: u8,
    cap_log2: u8,
    max_queue_len: u8,
    ops: Vec<Op>,
}

fn payload(from: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(len.max(12));
    d.extend_from_slice(&from.to_le_bytes());
    d.extend_from_slice(&seq.to_le_bytes());
    d.extend((0..len.saturating_sub(12)).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8));
    d
}

struct Model {
    /// Events published per slot (accepted by `publish`).
    published: Vec<u64>,
    /// Next sequence number per slot.
    seq: Vec<u64>,
    /// Last sequence number delivered per slot.
    last: Vec<Option<u64>>,
    delivered: Vec<u64>,
}

/// One event from slot `from`, inside that slot's batch when `batched`.
fn publish(rl: &mut ReceiveLoop, m: &mut Model, from: u32, event: u8, len: usize, batched: bool) {
    let seq = m.seq[from as usize];
    let name = format!("e{}", event % 4);
    let data = payload(from, seq, len);
    let sent = if batched { rl.publish_batched(from, &name, &data) } else { rl.publish(from, &name, &data) };
    if sent {
        m.seq[from as usize] += 1;
        m.published[from as usize] += 1;
    }
}

fn check_delivered(rl: &mut ReceiveLoop, m: &mut Model, honest: bool, max_payload: usize) {
    let slots = rl.slots();
    for d in rl.take_delivered() {
        let Some(Wid::Worker(w)) = d.wid else { panic!("an event without a publisher slot: {d:?}") };
        assert!(w != 0 && w < slots, "an event from slot {w} reached slot 0 ({slots} slots)");
        assert!(d.data.len() <= max_payload, "payload over the limit delivered");
        if !honest {
            continue;
        }
        assert_eq!(d.source, "fuzz");
        assert!(d.data.len() >= 12, "truncated honest event");
        let from = u32::from_le_bytes(d.data[..4].try_into().unwrap());
        let seq = u64::from_le_bytes(d.data[4..12].try_into().unwrap());
        assert_eq!(from, w, "event of slot {from} attributed to slot {w}");
        assert_eq!(d.data, payload(from, seq, d.data.len()), "honest event corrupted");
        let last = &mut m.last[w as usize];
        assert!(last.is_none_or(|l| seq > l), "slot {w}: seq {seq} after {last:?} (duplicate or reordered)");
        *last = Some(seq);
        m.delivered[w as usize] += 1;
    }
}

fuzz_target!(|input: Input| {
    let workers = 2 + u32::from(input.workers % 3); // 2..=4
    let cap = 1usize << (8 + input.cap_log2 % 5); // 256 B ..= 4 KiB
    let max_queue_len = 1 + usize::from(input.max_queue_len % 8);
    let max_payload = 3 * cap; // messages up to three rings: fragments
    let mut rl = match ReceiveLoop::new(workers, cap, max_queue_len, max_payload) {
        Some(Ok(rl)) => rl,
        Some(Err(e)) => panic!("setting up the region: {e}"),
        None => unreachable!("parameters in bounds"),
    };
    let n = workers as usize;
    let mut m = Model { published: vec![0; n], seq: vec![0; n], last: vec![None; n], delivered: vec![0; n] };
    let honest = !input.ops.iter().any(Op::hostile);
    let pick = |from: u8| 1 + u32::from(from) % (workers - 1);

    for op in input.ops.iter().take(256) {
        match *op {
            Op::Publish { from, event, len } => {
                publish(&mut rl, &mut m, pick(from), event, usize::from(len) % (max_payload + 64), false);
            }
            Op::Burst { from, n } => {
                for i in 0..n % 64 {
                    publish(&mut rl, &mut m, pick(from), i, 16 + usize::from(i), false);
                }
            }
            Op::BatchedBurst { from, n, end } => {
                let from = pick(from);
                for i in 0..n % 64 {
                    publish(&mut rl, &mut m, from, i, 16 + usize::from(i), true);
                }
                if end {
                    rl.end_batch(from);
                }
            }
            Op::Flush { from } => {
                rl.flush(pick(from));
            }
            Op::DrainPublishers => {
                rl.drain_publishers();
            }
            Op::Dispatch { budget } => {
                rl.dispatch(1 + usize::from(budget));
            }
            Op::Arm => {
                rl.arm();
            }
            Op::Disarm => {
                rl.disarm();
            }
            Op::HasInbound => {
                rl.has_inbound();
            }
            Op::SetWord { from, which, value } => {
                let ring = rl.inbound_ring_offset(pick(from)).unwrap();
                let off = WORDS[usize::from(which) % WORDS.len()];
                if off == WANT_SPACE {
                    rl.write(ring + off, &(value as u32).to_le_bytes());
                } else {
                    rl.write(ring + off, &value.to_le_bytes());
                }
            }
            Op::SetWordSpecial { from, which, special } => {
                let ring = rl.inbound_ring_offset(pick(from)).unwrap();
                let off = WORDS[usize::from(which) % WORDS.len()];
                rl.write(ring + off, &SPECIAL[usize::from(special) % SPECIAL.len()].to_le_bytes());
            }
            Op::SetWordRelative { from, which, from_write, delta } => {
                let ring = rl.inbound_ring_offset(pick(from)).unwrap();
                let off = WORDS[usize::from(which) % WORDS.len()];
                let base = rl.read_u64(ring + if from_write { WRITE_POS } else { READ_POS });
                rl.write(ring + off, &base.wrapping_add_signed(i64::from(delta)).to_le_bytes());
            }
            Op::RecordHeader { from, slot, stamp_delta, len, flags } => {
                let ring = rl.inbound_ring_offset(pick(from)).unwrap();
                let a = RECORD_ALIGN as u64;
                let pos = (rl.read_u64(ring + READ_POS) & !(a - 1)).wrapping_add(a * u64::from(slot));
                let off = (pos as usize) & (cap - 1);
                let stamped = pos.wrapping_add_signed(i64::from(stamp_delta) * a as i64);
                rl.write(ring + RING_HEADER_SIZE + off, &record_header(stamped, len, flags));
            }
            Op::Poke { from, offset, ref bytes } => {
                let ring = rl.inbound_ring_offset(pick(from)).unwrap();
                let len = RING_HEADER_SIZE + cap;
                let off = usize::from(offset) % len;
                rl.write(ring + off, &bytes[..bytes.len().min(len - off)]);
            }
        }
        check_delivered(&mut rl, &mut m, honest, max_payload);
    }

    // The publishers stop: the loop must settle within a bounded number of passes. Fragments
    // move without any count reporting them (and a port's dispatch flushes its backlogs
    // too), so a pass is idle when, besides, no ring's read position moved; two idle passes
    // in a row mean settled (nothing consumed in the second one, so nothing was written in
    // the first one).
    let mut settled = false;
    let mut idle = 0;
    for _ in 0..SETTLE_PASSES {
        let before = rl.read_positions();
        let mut progress = false;
        for from in 1..workers {
            progress |= rl.flush(from);
        }
        progress |= rl.drain_publishers();
        let (got, more) = rl.dispatch(4096);
        check_delivered(&mut rl, &mut m, honest, max_payload);
        let moved = rl.read_positions() != before;
        idle = if progress || moved || got > 0 || more { 0 } else { idle + 1 };
        if idle == 2 {
            settled = true;
            break;
        }
    }
    assert!(settled, "the receive loop did not settle in {SETTLE_PASSES} passes");
    assert!(rl.arm(), "nothing left to dispatch, yet arm finds work (a spin)");
    rl.disarm();

    if honest {
        let notices = rl.notices().clone();
        assert_eq!(notices.dropped, 0, "honest messages dropped as malformed");
        for from in 1..n {
            assert_eq!(rl.backlogged(from as u32), 0, "slot {from}: a backlog left with the ring drained");
            assert_eq!(
                m.delivered[from] + notices.lost[from],
                m.published[from],
                "slot {from}: delivered {} + lost {} != published {}",
                m.delivered[from],
                notices.lost[from],
                m.published[from]
            );
        }
    }
});
