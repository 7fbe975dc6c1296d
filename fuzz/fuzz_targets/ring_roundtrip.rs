//! SPSC ring, both ends honest, checked op by op against a model: FIFO delivery of exactly
//! the committed records, "fits" decided exactly by the free space, uncommitted records
//! dropped by a restarted producer, consumed-but-unreleased records delivered again to a
//! restarted consumer, the want-space handshake, the lost counter, both depths and the lazy
//! `write_pos` hint (a restarted producer walks the stamped records past it).
//! Starting positions and counters are arbitrary (valid) values, so masking and wrap-around
//! of the data area are exercised at any offset.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use worker_events::fuzz_api::{
    CONSUMED, PUBLISHED, READ_POS, RECORD_ALIGN, RECORD_FIRST, RECORD_HEADER_SIZE, RECORD_LAST, RingConsumer,
    RingMemory, RingProducer, WRITE_POS,
};

#[derive(Arbitrary, Debug)]
enum Op {
    Write { flags: u8, len: u16, split: u16 },
    Commit,
    Pop { keep: bool },
    Release,
    HasData,
    Refresh,
    BodyRoom { want: u16 },
    RequestSpace { want: u16 },
    AddLost { n: u8 },
    TakeLost,
    Depths,
    RestartProducer,
    RestartConsumer,
}

#[derive(Arbitrary, Debug)]
struct Input {
    cap_log2: u8,
    /// Initial read = write position, in record-alignment units.
    start: u64,
    published: u64,
    backlog: u32,
    ops: Vec<Op>,
}

const fn record_size(len: usize) -> usize {
    (RECORD_HEADER_SIZE + len + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    pos: u64,
    flags: u32,
    body: Vec<u8>,
}

/// What the two ends' private state and the shared words must be.
struct Model {
    cap: usize,
    // producer
    write: u64,
    committed: u64,
    cached_read: u64,
    prod_published: u64,
    pending: Vec<Rec>,
    /// Position and LAST flag of every record ever committed.
    log: Vec<(u64, bool)>,
    // shared words
    /// The `write_pos` hint.
    hinted: u64,
    read_pos: u64,
    stored_published: u64,
    stored_consumed: u64,
    want_space: bool,
    lost: u64,
    lost_seen: u64,
    // consumer
    read: u64,
    cons_consumed: u64,
    queue: VecDeque<Rec>,
    unreleased: Vec<Rec>,
}

impl Model {
    fn free_fresh(&self) -> usize {
        self.cap - (self.write - self.read_pos) as usize
    }
    fn free_cached(&self) -> usize {
        self.cap - (self.write - self.cached_read) as usize
    }
    fn refresh(&mut self) -> usize {
        self.cached_read = self.read_pos;
        self.free_fresh()
    }
}

fuzz_target!(|input: Input| {
    let cap = 1usize << (6 + input.cap_log2 % 8); // 64 B ..= 8 KiB
    let mem = RingMemory::new(cap).expect("valid capacity");
    // Positions far from 2^64: overflow near the end of the position space is the business
    // of the ring_consumer target. 512 ops of at most 8 KiB each stay far below 2^40.
    let start = (input.start % (1 << 52)) * RECORD_ALIGN as u64;
    let published = input.published % (1 << 62);
    let consumed = published.saturating_sub(u64::from(input.backlog));
    for (off, v) in [(WRITE_POS, start), (READ_POS, start), (PUBLISHED, published), (CONSUMED, consumed)] {
        mem.write(off, &v.to_le_bytes());
    }

    let mut m = Model {
        cap,
        write: start,
        committed: start,
        cached_read: start,
        prod_published: published,
        pending: Vec::new(),
        log: Vec::new(),
        hinted: start,
        read_pos: start,
        stored_published: published,
        stored_consumed: consumed,
        want_space: false,
        lost: 0,
        lost_seen: 0,
        read: start,
        cons_consumed: consumed,
        queue: VecDeque::new(),
        unreleased: Vec::new(),
    };
    let mut prod: RingProducer<'_> = mem.producer().expect("valid positions");
    let mut cons: RingConsumer<'_> = mem.consumer().expect("valid positions");
    let mut seq = 0u8;

    for op in input.ops.iter().take(512) {
        match *op {
            Op::Write { flags, len, split } => {
                let flags = u32::from(flags) & (RECORD_FIRST | RECORD_LAST);
                let len = len as usize % (cap + 16);
                seq = seq.wrapping_add(1);
                let body: Vec<u8> = (0..len).map(|i| seq.wrapping_add(i as u8)).collect();
                let split = (split as usize).min(len);
                let need = record_size(len);
                let fits = need <= cap && (need <= m.free_cached() || need <= m.refresh());
                let wrote = prod.try_write(flags, &[&body[..split], &body[split..]]).expect("honest consumer");
                assert_eq!(wrote, fits, "try_write of {len} bytes with {} free", m.free_fresh());
                if fits {
                    m.write += need as u64;
                    if flags & RECORD_LAST != 0 {
                        m.prod_published += 1;
                    }
                    m.pending.push(Rec { pos: m.write - need as u64, flags, body });
                }
            }
            Op::Commit => {
                assert_eq!(prod.commit(), m.write != m.committed);
                if m.write != m.committed {
                    m.committed = m.write;
                    m.log.extend(m.pending.iter().map(|r| (r.pos, r.flags & RECORD_LAST != 0)));
                    m.queue.extend(m.pending.drain(..));
                    // The hint (and `published` with it) is stored every quarter ring.
                    if m.committed - m.hinted >= (cap / 4) as u64 {
                        m.hinted = m.committed;
                        m.stored_published = m.prod_published;
                    }
                }
            }
            Op::Pop { keep } => {
                let got = cons.peek().expect("honest producer");
                let want = m.queue.front();
                assert_eq!(got.map(|r| (r.len, r.flags)), want.map(|r| (r.body.len(), r.flags)));
                let Some(rec) = m.queue.pop_front() else { continue };
                let body = cons.consume(keep).expect("peeked");
                if keep {
                    assert_eq!(body.as_deref(), Some(&rec.body[..]), "record body differs");
                }
                m.read += record_size(rec.body.len()) as u64;
                if rec.flags & RECORD_LAST != 0 {
                    m.cons_consumed += 1;
                }
                m.unreleased.push(rec);
            }
            Op::Release => {
                let moved = m.read != m.read_pos;
                assert_eq!(cons.release(), moved && m.want_space, "want-space handshake");
                if moved {
                    m.want_space = false;
                    m.read_pos = m.read;
                    m.stored_consumed = m.cons_consumed;
                    m.unreleased.clear();
                }
            }
            Op::HasData => assert_eq!(cons.has_data(), !m.queue.is_empty()),
            Op::Refresh => assert_eq!(prod.refresh(), Ok(m.refresh())),
            Op::BodyRoom { want } => {
                let want = want as usize;
                let mut free = m.free_cached();
                if free < record_size(want) {
                    free = m.refresh();
                }
                assert_eq!(prod.body_room(want), Ok(free.saturating_sub(RECORD_HEADER_SIZE)));
            }
            Op::RequestSpace { want } => {
                m.want_space = true;
                let free = m.refresh();
                let room = free.saturating_sub(RECORD_HEADER_SIZE);
                assert_eq!(prod.request_space(want as usize), Ok(room));
            }
            Op::AddLost { n } => {
                prod.add_lost(u64::from(n));
                m.lost += u64::from(n);
            }
            Op::TakeLost => {
                assert_eq!(cons.take_lost(), m.lost - m.lost_seen);
                m.lost_seen = m.lost;
            }
            Op::Depths => {
                assert_eq!(prod.depth(), m.prod_published.saturating_sub(m.stored_consumed));
                // The consumer counts the committed messages it has not consumed.
                assert_eq!(cons.depth(), m.queue.iter().filter(|r| r.flags & RECORD_LAST != 0).count() as u64);
            }
            Op::RestartProducer => {
                prod = mem.producer().expect("valid positions");
                // It walks the stamped records from the hint (or the consumer's position if
                // that is further) to the committed end, counting the messages it passes.
                let from = m.hinted.max(m.read_pos);
                let walked = m.log.iter().filter(|&&(pos, last)| last && pos >= from).count() as u64;
                m.write = m.committed;
                m.cached_read = m.read_pos;
                m.prod_published = m.stored_published + walked;
                m.pending.clear();
                // A new producer drops its predecessor's unanswered request for room
                // (`Producer::new`): its backlog starts empty, and a flag left set with
                // nothing to consume would never be answered.
                m.want_space = false;
            }
            Op::RestartConsumer => {
                cons = mem.consumer().expect("valid positions");
                m.read = m.read_pos;
                m.cons_consumed = m.stored_consumed;
                for rec in m.unreleased.drain(..).rev() {
                    m.queue.push_front(rec);
                }
            }
        }
    }
    assert_eq!(mem.read_u64(WRITE_POS), m.hinted);
    assert_eq!(mem.read_u64(PUBLISHED), m.stored_published);
    assert_eq!(mem.read_u64(READ_POS), m.read_pos);
});
