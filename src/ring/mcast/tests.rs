//! Unit tests of the broadcast ring over heap memory (threads stand in for processes).

use super::*;
use std::sync::Arc;
use std::time::Duration;

/// A ring in private memory with the region's layout (128-aligned base).
struct Mem {
    _mem: Vec<u128>,
    raw: RawMcast,
}

fn mem(readers: usize, cap: usize) -> Arc<Mem> {
    let bytes = ring_bytes(readers, cap);
    let mut v = vec![0u128; bytes / 16 + 8];
    let base = v.as_mut_ptr().cast::<u8>();
    let skew = base.align_offset(LINE);
    // SAFETY: base + skew + bytes stays inside `v` (8 spare u128 = 128 bytes), 128-aligned;
    // `v` lives as long as the Mem and is accessed only through the view.
    let raw = unsafe { RawMcast::from_base(NonNull::new(base.add(skew)).unwrap(), readers, cap) };
    Arc::new(Mem { _mem: v, raw })
}

// SAFETY: the memory is only accessed through atomics (see RawMcast).
unsafe impl Sync for Mem {}
// SAFETY: as above; the Vec moves with the view.
unsafe impl Send for Mem {}

/// The body of message `seq`: 1..=200 bytes, derived from `seq`.
fn body(seq: u64) -> Vec<u8> {
    let len = 1 + (seq.wrapping_mul(7919) % 200) as usize;
    (0..len).map(|i| (seq as u8).wrapping_add((i as u8).wrapping_mul(31))).collect()
}

/// A 10-byte body derived from `seq` (a 64-byte record).
fn small(seq: u64) -> Vec<u8> {
    (0..10).map(|i| (seq as u8).wrapping_mul(3).wrapping_add(i)).collect()
}

/// Read everything available; check contents and order; returns (seqs read).
fn drain(c: &mut Consumer, buf: &mut Vec<u8>) -> Vec<u64> {
    let mut got = Vec::new();
    while let Some(seq) = c.next(buf).expect("honest producer") {
        assert_eq!(*buf, body(seq), "record {seq} torn or stale");
        got.push(seq);
    }
    c.release();
    got
}

#[test]
fn three_keeping_up_consumers_get_every_record() {
    const N: u64 = 1_000_000;
    let m = mem(3, 1 << 16);
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut c = Consumer::new(m.raw, i).unwrap();
                let (mut buf, mut next) = (Vec::new(), 0u64);
                while next < N {
                    match c.next(&mut buf).unwrap() {
                        Some(seq) => {
                            assert_eq!(seq, next, "reader {i} out of order");
                            assert_eq!(buf, body(seq), "reader {i}: record {seq} torn");
                            next += 1;
                            if next % 32 == 0 {
                                c.release();
                            }
                        }
                        None => {
                            c.release();
                            std::thread::yield_now();
                        }
                    }
                }
                c.release();
                (c.take_lost(), c.laps())
            })
        })
        .collect();
    let mut p = Producer::new(m.raw).unwrap();
    for seq in 0..N {
        let b = body(seq);
        while p.would_lap(b.len()) {
            std::thread::yield_now();
        }
        assert_eq!(p.publish(&b), Ok(seq));
    }
    for r in readers {
        assert_eq!(r.join().unwrap(), (0, 0), "a keeping-up reader was lapped");
    }
    // The publishing path scanned the cursors at most once per floor step (an eighth of
    // the ring), not per record.
    assert!(p.scans() <= p.write / (1 << 13) + 1, "{} cursor scans for {N} records", p.scans());
}

/// A reader that pauses while the producer laps it (threads, no pacing): it never gets a
/// torn or repeated record, order is kept, and delivered + lost == published exactly.
#[test]
fn paused_reader_is_told_exactly_what_it_lost() {
    const N: u64 = 300_000;
    let m = mem(2, 4096);
    let done = Arc::new(crate::sync::AtomicU32::new(0));
    let (m2, d2) = (m.clone(), done.clone());
    let reader = std::thread::spawn(move || {
        let mut c = Consumer::new(m2.raw, 0).unwrap();
        let (mut buf, mut delivered, mut last) = (Vec::new(), 0u64, None::<u64>);
        let mut k = 0u64;
        loop {
            let finished = d2.load(Ordering::Acquire) != 0;
            match c.next(&mut buf).unwrap() {
                Some(seq) => {
                    assert_eq!(buf, body(seq), "record {seq} torn or stale");
                    assert!(last.is_none_or(|l| seq > l), "record {seq} after {last:?}");
                    last = Some(seq);
                    delivered += 1;
                    k += 1;
                    if k % 5000 == 0 {
                        c.release();
                        std::thread::sleep(Duration::from_millis(2)); // paused: lapped
                    }
                }
                None if finished => break,
                None => std::thread::yield_now(),
            }
        }
        c.release();
        (delivered, c.take_lost(), c.laps())
    });
    let mut p = Producer::new(m.raw).unwrap();
    for seq in 0..N {
        p.publish(&body(seq)).unwrap();
        if seq % 1000 == 0 {
            std::thread::yield_now();
        }
    }
    done.store(1, Ordering::Release);
    let (delivered, lost, laps) = reader.join().unwrap();
    assert_eq!(delivered + lost, N, "delivered {delivered} + lost {lost}");
    assert!(laps > 0 && lost > 0, "the reader was never lapped: the test proves nothing");
    // Reader 1 never attached, reader 0 paused: lapped, they cost a scan per floor step
    // (an eighth of the ring) at most, never one per record.
    assert!(p.scans() <= p.write / 512 + 1, "{} scans for {N} records", p.scans());
}

#[test]
fn lapped_reader_single_thread_exact_count() {
    let m = mem(1, 1024);
    let mut p = Producer::new(m.raw).unwrap();
    let mut c = Consumer::new(m.raw, 0).unwrap();
    let mut buf = Vec::new();
    for s in 0..5 {
        p.publish(&small(s)).unwrap();
    }
    for s in 0..3 {
        assert_eq!(c.next(&mut buf).unwrap(), Some(s));
    }
    c.release();
    // Several laps of 64-byte records (16 per lap).
    for s in 5..100 {
        p.publish(&small(s)).unwrap();
    }
    let mut got = Vec::new();
    while let Some(s) = c.next(&mut buf).unwrap() {
        assert_eq!(buf, small(s));
        got.push(s);
    }
    let lost = c.take_lost();
    assert_eq!(got.first().copied(), Some(3 + lost), "resumed at the floor record");
    assert_eq!(c.next_seq(), 100);
    c.release();
    assert_eq!(m.raw.released_seq(0), 100, "the cursor line says delivered + lost");
    assert_eq!(3 + lost + got.len() as u64, 100);
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1));
    assert_eq!(c.take_lost(), 0, "reported once");
    // The floor's eighth: at most 16 - 2 records kept.
    assert!(got.len() >= 12 && got.len() <= 15, "{}", got.len());
}

#[test]
fn restarted_producer_and_consumer_resume() {
    let m = mem(2, 1024);
    let mut buf = Vec::new();
    let mut c = Consumer::new(m.raw, 0).unwrap();
    let mut p = Producer::new(m.raw).unwrap();
    for s in 0..40 {
        p.publish(&body(s)).unwrap_or_else(|_| panic!("{s}"));
        if s % 3 == 0 {
            drain(&mut c, &mut buf);
        }
    }
    drain(&mut c, &mut buf);
    drop(p);
    // A successor over the same memory continues the sequence after the last record.
    let mut p = Producer::new(m.raw).unwrap();
    assert_eq!(p.published(), 40);
    assert_eq!(p.publish(&body(40)), Ok(40));
    assert_eq!(drain(&mut c, &mut buf), [40]);
    // The reader restarts from its cursor.
    // (the reader process dies here)
    let mut c = Consumer::new(m.raw, 0).unwrap();
    p.publish(&body(41)).unwrap();
    assert_eq!(drain(&mut c, &mut buf), [41]);
    // Restarted while lapped: told what it missed.
    // (the reader process dies here)
    for s in 42..200 {
        p.publish(&body(s)).unwrap();
    }
    let mut c = Consumer::new(m.raw, 0).unwrap();
    let got = drain(&mut c, &mut buf);
    assert_eq!(got.first().copied(), Some(42 + c.take_lost()));
    assert_eq!(got.last().copied(), Some(199));
    // A producer killed after writing a record but before its stamp: the record never shows.
    let pos = p.write;
    m.raw.word(m.raw.off(pos) + 8).store(meta(3, 0, 200), Ordering::Relaxed);
    drop(p);
    let mut p = Producer::new(m.raw).unwrap();
    assert_eq!((p.write, p.published()), (pos, 200));
    assert_eq!(drain(&mut c, &mut buf), [] as [u64; 0]);
    p.publish(&body(200)).unwrap();
    assert_eq!(drain(&mut c, &mut buf), [200]);
}

#[test]
fn too_large_is_refused() {
    let m = mem(1, 1024);
    let mut p = Producer::new(m.raw).unwrap();
    assert_eq!(p.max_body(), 256 - MC_HDR);
    assert_eq!(p.publish(&[0; 241]), Err(TooLarge { len: 241, max: 240 }));
    assert_eq!(p.publish(&[0; 240]), Ok(0));
    assert_eq!(record_size(240), 256);
    // One line for up to 48 bytes, two for up to 112 (a typed 64-byte event's message).
    assert_eq!((record_size(48), record_size(49), record_size(112)), (64, 128, 128));
}

#[test]
fn sequence_numbers_widen_around_the_expected_one() {
    assert_eq!(widen(0, 0), 0);
    assert_eq!(widen(5, 7), 7);
    assert_eq!(widen(5, 3), 3);
    let big = (7u64 << 32) + 10;
    assert_eq!(widen(big, 12), big + 2);
    assert_eq!(widen(big, 8), big - 2);
    assert_eq!(widen((7 << 32) + 1, u32::MAX), (7 << 32) - 1, "across a 2^32 boundary, down");
    assert_eq!(widen((7 << 32) - 1, 1), (7 << 32) + 1, "and up");
    let (len, dest, lo) = unmeta(meta(4000, 130, big));
    assert_eq!((len, dest, lo), (4000, 130, 10));
}

#[test]
fn hostile_values_are_corrupt() {
    let m = mem(1, 1024);
    let raw = m.raw;
    let cur = raw.cursor(0);
    let mut buf = Vec::new();
    // Unaligned cursor; cursor more than a ring past the floor.
    cur.read_pos.store(8, Ordering::Relaxed);
    assert!(Consumer::new(raw, 0).is_err());
    cur.read_pos.store(2048, Ordering::Relaxed);
    assert!(Consumer::new(raw, 0).is_err());
    cur.read_pos.store(0, Ordering::Relaxed);
    assert!(Consumer::new(raw, 1).is_err(), "no such cursor");
    // The producer ignores implausible cursors rather than failing.
    cur.read_pos.store(u64::MAX - 7, Ordering::Relaxed);
    let mut p = Producer::new(raw).unwrap();
    for s in 0..20 {
        assert!(!p.would_lap(10));
        p.publish(&small(s)).unwrap();
    }
    cur.read_pos.store(0, Ordering::Relaxed);
    // A stamp that is neither expected, 0 nor older, where the floor says "not lapped".
    let m = mem(1, 1024);
    let raw = m.raw;
    let mut p = Producer::new(raw).unwrap();
    p.publish(b"abc").unwrap();
    let mut c = Consumer::new(raw, 0).unwrap();
    raw.word(0).store(0x1234_5678, Ordering::Relaxed);
    assert_eq!(c.next(&mut buf), Err(Corrupt));
    raw.word(0).store(stamp(0), Ordering::Relaxed);
    // Length over the limit; a destination past the readers (one reader: 0 or 1).
    raw.word(8).store(meta(10_000, 0, 0), Ordering::Relaxed);
    assert_eq!(c.next(&mut buf), Err(Corrupt));
    raw.word(8).store(meta(3, 2, 0), Ordering::Relaxed);
    assert_eq!(c.next(&mut buf), Err(Corrupt));
    raw.word(8).store(meta(3, 0, 0), Ordering::Relaxed);
    assert_eq!(c.next(&mut buf), Ok(Some(0)));
    // A sequence number out of order.
    p.publish(b"def").unwrap();
    raw.word(64 + 8).store(meta(3, 0, 7), Ordering::Relaxed);
    assert_eq!(c.next(&mut buf), Err(Corrupt));
    raw.word(64 + 8).store(meta(3, 0, 1), Ordering::Relaxed);
    assert_eq!(c.next(&mut buf), Ok(Some(1)));
    // A floor that is not a record boundary, seen by a reader below it.
    raw.prod().floor.store(1000, Ordering::Relaxed);
    assert_eq!(c.next(&mut buf), Err(Corrupt));
    // The producer's restart: unusable floor; a broken sequence chain; floor on an empty slot.
    assert!(Producer::new(raw).is_err());
    raw.prod().floor.store(0, Ordering::Relaxed);
    raw.word(64 + 8).store(meta(3, 0, 9), Ordering::Relaxed);
    assert!(Producer::new(raw).is_err());
    raw.word(64 + 8).store(meta(3, 0, 1), Ordering::Relaxed);
    assert_eq!(Producer::new(raw).map(|p| p.published()), Ok(2));
    raw.prod().floor.store(512, Ordering::Relaxed);
    assert!(Producer::new(raw).is_err());
    raw.prod().floor.store(!63, Ordering::Relaxed);
    assert!(Producer::new(raw).is_err());
}

/// A reader killed between its two cursor stores (`next_seq` stored, `read_pos` not) and
/// lapped while dead: its successor resumes at the floor, never `Corrupt`, and reads on in
/// order to the end, whether the floor landed between the two stored positions (record 6 of
/// 5..=6 here: floors move by 128 bytes, two records) or past both (it may then see again
/// the records of its predecessor's last batch, as a restart does).
#[test]
fn reader_dead_between_its_cursor_stores_and_lapped_resumes() {
    let mut between = 0;
    for extra in 10..=24u64 {
        let m = mem(1, 1024);
        let mut p = Producer::new(m.raw).unwrap();
        let mut c = Consumer::new(m.raw, 0).unwrap();
        let mut buf = Vec::new();
        for s in 0..7 {
            p.publish(&small(s)).unwrap();
        }
        for s in 0..5 {
            assert_eq!(c.next(&mut buf).unwrap(), Some(s));
        }
        c.release(); // read_pos: record 5
        assert_eq!((c.next(&mut buf).unwrap(), c.next(&mut buf).unwrap()), (Some(5), Some(6)));
        // Dies after its first cursor store (the view `c` is simply not used again).
        m.raw.cursor(0).next_seq.store(7, Ordering::Relaxed);
        let end = 7 + extra;
        for s in 7..end {
            p.publish(&small(s)).unwrap();
        }
        let mut c = Consumer::new(m.raw, 0).unwrap();
        let mut got = Vec::new();
        while let Some(s) = c.next(&mut buf).unwrap_or_else(|_| panic!("extra {extra}: an honest ring read as corrupt"))
        {
            assert_eq!(buf, small(s));
            got.push(s);
        }
        assert_eq!(got.last().copied(), Some(end - 1), "extra {extra}");
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "extra {extra}: {got:?}");
        between += usize::from(got[0] == 6);
    }
    assert!(between > 0, "no lap put the floor between the two stored positions");
}

#[test]
fn a_reader_with_a_corrupt_cursor_is_repaired_to_the_oldest_record() {
    let m = mem(1, 1024);
    let mut p = Producer::new(m.raw).unwrap();
    for s in 0..40 {
        p.publish(&small(s)).unwrap();
    }
    let cur = m.raw.cursor(0);
    cur.read_pos.store(13, Ordering::Relaxed);
    assert!(Consumer::new(m.raw, 0).is_err(), "an unaligned cursor is corrupt");
    let mut c = Consumer::repaired(m.raw, 0).unwrap();
    let floor = m.raw.prod().floor.load(Ordering::Relaxed);
    assert!(floor > 0, "the ring was lapped");
    let mut buf = Vec::new();
    let first = c.next(&mut buf).unwrap().expect("the record at floor");
    assert_eq!(first, m.raw.prod().floor_seq.load(Ordering::Relaxed));
    assert_eq!(buf, small(first));
    let mut last = first;
    while let Some(s) = c.next(&mut buf).unwrap() {
        assert_eq!((s, &buf), (last + 1, &small(s)));
        last = s;
    }
    assert_eq!((last, c.take_lost()), (39, 0));
}
