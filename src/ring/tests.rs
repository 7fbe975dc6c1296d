//! Unit tests of the ring (single process, real memory).

use super::*;

/// A ring in private memory with the same layout as in the region.
pub(crate) struct TestRing {
    _mem: Vec<u128>,
    pub raw: RawRing,
}

pub(crate) fn test_ring(cap: usize) -> TestRing {
    let words = (std::mem::size_of::<RingHeader>() + cap).div_ceil(16) + 8;
    let mut mem = vec![0u128; words];
    let base = mem.as_mut_ptr() as *mut u8;
    // align to 128 for the header
    let off = base.align_offset(128);
    assert!(off + std::mem::size_of::<RingHeader>() + cap <= words * 16);
    // SAFETY: the offsets stay inside `mem`, which lives as long as the TestRing.
    let (hdr, data) = unsafe {
        let h = base.add(off);
        (h, h.add(std::mem::size_of::<RingHeader>()))
    };
    TestRing {
        _mem: mem,
        raw: RawRing { hdr: NonNull::new(hdr as *mut RingHeader).unwrap(), data: NonNull::new(data).unwrap(), cap },
    }
}

impl TestRing {
    fn hdr(&self) -> &RingHeader {
        // SAFETY: test-only access to the private header.
        unsafe { self.raw.hdr.as_ref() }
    }

    /// Write a record header (stamp, len, flags) at data offset `off`, as a peer could.
    fn poke_hdr(&self, off: usize, stamp_word: u64, len: u32, flags: u32) {
        self.raw.word(off + 8).store(u64::from(len) | (u64::from(flags) << 32), Ordering::Relaxed);
        self.raw.word(off).store(stamp_word, Ordering::Release);
    }
}

fn pop(c: &mut Consumer) -> Option<(u32, Vec<u8>)> {
    let info = c.peek().unwrap()?;
    let mut v = vec![0u8; info.len];
    // SAFETY: info from peek, v has len bytes.
    unsafe { c.consume(info, Some(v.as_mut_ptr())) };
    Some((info.flags, v))
}

#[test]
fn wrap_around_keeps_every_byte() {
    let r = test_ring(256);
    let mut p = Producer::new(r.raw).unwrap();
    let mut c = Consumer::new(r.raw).unwrap();
    let mut wrapped = 0;
    // Varied sizes put records at every 64-byte offset; bodies over 48 bytes that start
    // at offset 192 straddle the end of the data area.
    for round in 0..300u32 {
        let len = (round as usize * 37) % 200;
        let body: Vec<u8> = (0..len).map(|i| (i as u32 + round) as u8).collect();
        wrapped += usize::from(r.raw.off(p.write) + REC_HDR + len > 256);
        assert!(p.try_write(FIRST | LAST, &[&body[..len / 2], &body[len / 2..]]).unwrap());
        assert!(p.commit());
        let (flags, got) = pop(&mut c).expect("record");
        assert_eq!(flags, FIRST | LAST);
        assert_eq!(got, body, "round {round}");
        assert!(pop(&mut c).is_none());
        c.release();
    }
    assert!(wrapped > 20, "only {wrapped} bodies wrapped");
}

#[test]
fn records_are_line_aligned() {
    let r = test_ring(4096);
    let mut p = Producer::new(r.raw).unwrap();
    for len in [0, 1, 47, 48, 49, 100, 111, 112, 113] {
        let before = p.write;
        assert!(p.try_write(FIRST | LAST, &[&vec![1u8; len]]).unwrap());
        assert_eq!(p.write - before, (REC_HDR + len).div_ceil(64) as u64 * 64, "len {len}");
        assert_eq!(p.write % 64, 0);
    }
}

#[test]
fn full_ring_refuses_then_accepts_after_release() {
    let r = test_ring(128);
    let mut p = Producer::new(r.raw).unwrap();
    let mut c = Consumer::new(r.raw).unwrap();
    assert!(p.try_write(FIRST | LAST, &[&[1u8; 48]]).unwrap()); // 64 bytes
    assert!(p.try_write(FIRST | LAST, &[&[2u8; 40]]).unwrap()); // 128 bytes: full
    assert!(!p.try_write(FIRST | LAST, &[&[3u8; 1]]).unwrap());
    assert!(!p.try_write(FIRST | LAST, &[&[3u8; 200]]).unwrap(), "larger than the ring");
    p.commit();
    assert_eq!(p.depth(), 2);
    assert_eq!(c.depth(), 2);
    assert_eq!(pop(&mut c).unwrap().1, vec![1u8; 48]);
    // Not released yet: still full for the producer.
    assert!(!p.try_write(FIRST | LAST, &[&[3u8; 1]]).unwrap());
    c.release();
    assert!(p.try_write(FIRST | LAST, &[&[3u8; 1]]).unwrap());
    p.commit();
    assert_eq!(pop(&mut c).unwrap().1, vec![2u8; 40]);
    // The slot of position 128 held the stamp of position 0 until record 3 was written.
    assert_eq!(pop(&mut c).unwrap().1, vec![3u8; 1]);
    assert!(pop(&mut c).is_none());
}

#[test]
fn uncommitted_records_are_invisible() {
    let r = test_ring(256);
    let mut p = Producer::new(r.raw).unwrap();
    let mut c = Consumer::new(r.raw).unwrap();
    // A batch of two: the second record's stamp is stored at once, the first one's only
    // at commit, so neither is visible.
    assert!(p.try_write(FIRST | LAST, &[b"abc"]).unwrap());
    assert!(p.try_write(FIRST | LAST, &[b"def"]).unwrap());
    assert_eq!(r.raw.word(64).load(Ordering::Relaxed), stamp(64));
    assert!(!c.has_data());
    assert!(pop(&mut c).is_none());
    assert_eq!(c.depth(), 0);
    // The producer dies here. Its successor resumes at the committed end (0) and its
    // first record (64 bytes) ends where the dead batch's second record was: it clears
    // that stamp before committing, so "def" never shows.
    let mut p2 = Producer::new(r.raw).unwrap();
    assert_eq!(p2.write, 0);
    assert!(p2.try_write(FIRST | LAST, &[b"xyz"]).unwrap());
    p2.commit();
    assert_eq!(pop(&mut c).unwrap().1, b"xyz");
    assert!(pop(&mut c).is_none(), "a record of the dead batch became visible");
    assert!(p2.try_write(FIRST | LAST, &[b"uvw"]).unwrap());
    p2.commit();
    assert_eq!(pop(&mut c).unwrap().1, b"uvw");
    // The first producer's cached view is stale but harmless: it is never used again.
    let _ = p.max_body();
}

#[test]
fn restarted_producer_walks_past_the_lazy_hint() {
    let r = test_ring(4096);
    let mut p = Producer::new(r.raw).unwrap();
    for i in 0..5u8 {
        assert!(p.try_write(FIRST | LAST, &[&[i; 10]]).unwrap());
        p.commit();
    }
    // 5 records of 64 bytes: less than a quarter ring, so no hint yet.
    assert_eq!(r.hdr().producer.write_pos.load(Ordering::Relaxed), 0);
    let mut c = Consumer::new(r.raw).unwrap();
    assert_eq!(c.depth(), 5);
    assert_eq!(pop(&mut c).unwrap().1, [0u8; 10]);
    assert_eq!(pop(&mut c).unwrap().1, [1u8; 10]);
    c.release();
    // The consumer is past the hint now; a successor resumes after record 4, not at 0.
    let mut p2 = Producer::new(r.raw).unwrap();
    assert_eq!(p2.write, 5 * 64);
    assert!(p2.try_write(FIRST | LAST, &[&[9u8; 10]]).unwrap());
    p2.commit();
    for want in [2u8, 3, 4, 9] {
        assert_eq!(pop(&mut c).unwrap().1, [want; 10]);
    }
    assert!(pop(&mut c).is_none());
    // The hint is stored once the committed end is a quarter ring past it.
    for _ in 0..16 {
        assert!(p2.try_write(FIRST | LAST, &[&[0u8; 1]]).unwrap());
        p2.commit();
        c.peek().unwrap();
        pop(&mut c);
        c.release();
    }
    let hint = r.hdr().producer.write_pos.load(Ordering::Relaxed);
    assert!(hint >= 1024 && hint <= p2.committed, "{hint}");
}

#[test]
fn stale_lap_bytes_are_not_accepted() {
    let r = test_ring(128);
    let mut p = Producer::new(r.raw).unwrap();
    let mut c = Consumer::new(r.raw).unwrap();
    // Fill the ring exactly: no next slot to clear, the slot of position 128 keeps the
    // complete, valid-looking header of position 0 (same length, same flags).
    assert!(p.try_write(FIRST | LAST, &[&[7u8; 48]]).unwrap());
    assert!(p.try_write(FIRST | LAST, &[&[8u8; 48]]).unwrap());
    p.commit();
    assert_eq!(pop(&mut c).unwrap().1, [7u8; 48]);
    assert_eq!(pop(&mut c).unwrap().1, [8u8; 48]);
    c.release();
    assert_eq!(r.raw.word(0).load(Ordering::Relaxed), stamp(0));
    assert_eq!(c.peek(), Ok(None), "the header of lap 0 was taken for position 128");
    assert!(!c.has_data());
    assert_eq!(c.depth(), 0);
    // Any older lap of the same slot is equally "not yet".
    r.poke_hdr(64, stamp(64), 48, FIRST | LAST);
    assert!(p.try_write(FIRST | LAST, &[&[9u8; 48]]).unwrap());
    p.commit();
    assert_eq!(pop(&mut c).unwrap().1, [9u8; 48]);
    assert_eq!(c.peek(), Ok(None));
}

#[test]
fn a_wrong_stamp_is_corrupt_not_a_spin() {
    let r = test_ring(256);
    let mut c = Consumer::new(r.raw).unwrap();
    for bad in [stamp(64), stamp(256), stamp(8), stamp(1 << 40), 1] {
        r.poke_hdr(0, bad, 8, FIRST | LAST);
        assert_eq!(c.peek(), Err(Corrupt), "stamp {bad:#x}");
        assert!(!c.has_data());
    }
    // A correct stamp with an impossible length or unknown flags.
    r.poke_hdr(0, stamp(0), 241, FIRST | LAST);
    assert_eq!(c.peek(), Err(Corrupt));
    r.poke_hdr(0, stamp(0), u32::MAX, FIRST | LAST);
    assert_eq!(c.peek(), Err(Corrupt));
    r.poke_hdr(0, stamp(0), 8, 4);
    assert_eq!(c.peek(), Err(Corrupt));
    r.poke_hdr(0, stamp(0), 240, LAST);
    assert_eq!(c.peek().unwrap().unwrap(), RecordInfo { len: 240, flags: LAST });
    // A position near 2^64 with a record that would run past it.
    let top = u64::MAX - 63;
    r.hdr().consumer.read_pos.store(top, Ordering::Relaxed);
    r.hdr().producer.write_pos.store(top, Ordering::Relaxed);
    r.poke_hdr(r.raw.off(top), stamp(top), 8, FIRST | LAST);
    // No end adopts it: the producer refuses it, the consumer resynchronizes away from it.
    assert_eq!(Producer::new(r.raw).err(), Some(Corrupt));
    let mut c = Consumer::new(r.raw).unwrap();
    assert!(c.take_resynced());
    // (the hint is unusable too: it starts from 0, past the record stamped there above)
    assert_eq!(r.hdr().consumer.read_pos.load(Ordering::Relaxed), 256);
    assert!(Producer::new(r.raw).is_ok());
}

#[test]
fn corrupt_positions_are_resynchronized() {
    let r = test_ring(256);
    let mut p = Producer::new(r.raw).unwrap();
    let h = r.hdr();
    // A hint beyond anything the consumer could have left room for, or not on a record
    // boundary: the consumer does not need it (stamps decide), the producer adopts the
    // consumer's position and rewrites the hint.
    for bad in [1 << 40, 8] {
        h.producer.write_pos.store(bad, Ordering::Release);
        let mut c = Consumer::new(r.raw).unwrap();
        assert!(!c.take_resynced());
        let p2 = Producer::new(r.raw).unwrap();
        assert_eq!((p2.write, h.producer.write_pos.load(Ordering::Relaxed)), (0, 0));
    }
    let mut c = Consumer::new(r.raw).unwrap();
    // A stamped header claiming a body longer than the ring: the ring is quarantined,
    // reported once, then reads as empty (no spin) however often it is looked at.
    r.poke_hdr(0, stamp(0), 1000, FIRST | LAST);
    assert_eq!(c.peek(), Err(Corrupt));
    assert!(c.quarantine(), "the first corruption of an episode is reported");
    for _ in 0..3 {
        assert!(!c.has_data());
        assert_eq!(c.peek(), Ok(None));
    }
    // Another bad header at the same place: part of the same episode, not reported again.
    r.poke_hdr(0, stamp(0), 2000, FIRST | LAST);
    assert!(c.has_data(), "a change is worth a look");
    assert_eq!(c.peek(), Err(Corrupt));
    assert!(!c.quarantine());
    assert!(!c.has_data());
    // The producer moves its hint past it: adopted, and the skipped message reported.
    h.producer.published.store(1, Ordering::Relaxed);
    h.producer.write_pos.store(128, Ordering::Release);
    r.poke_hdr(128, stamp(128), 3, FIRST | LAST);
    assert!(c.has_data());
    assert_eq!(c.peek().unwrap().unwrap().len, 3);
    assert_eq!(c.take_lost(), 1);
    assert_eq!(h.consumer.read_pos.load(Ordering::Relaxed), 128);
    c.release();
    h.consumer.read_pos.store(1 << 50, Ordering::Release);
    assert_eq!(p.refresh(), Err(Corrupt));
    // A read position that is not a record boundary cannot be adopted by a producer; the
    // consumer repairs it at its next start (the end of the records stamped from the hint).
    h.consumer.read_pos.store(129, Ordering::Release);
    assert!(Producer::new(r.raw).is_err());
    let mut c = Consumer::new(r.raw).unwrap();
    assert!(c.take_resynced());
    assert_eq!(h.consumer.read_pos.load(Ordering::Relaxed), 192);
    // A successor walks the stamped records from the hint.
    h.consumer.read_pos.store(128, Ordering::Release);
    assert_eq!(Producer::new(r.raw).unwrap().write, 192);
    // An impossible one on the way: it adopts the consumer's position, keeps the valid
    // records before the bad one, and clears the bad stamp so the consumer sees an empty
    // slot there, then its records.
    r.poke_hdr(192, stamp(192), 1000, FIRST | LAST);
    let mut p3 = Producer::new(r.raw).unwrap();
    assert_eq!(p3.write, 192);
    assert_eq!(r.raw.word(192).load(Ordering::Relaxed), 0);
    assert!(p3.try_write(FIRST | LAST, &[b"ok"]).unwrap());
    p3.commit();
    let mut c = Consumer::new(r.raw).unwrap();
    assert_eq!(pop(&mut c).unwrap().1, [0u8; 3]);
    assert_eq!(pop(&mut c).unwrap().1, b"ok");
}

#[test]
fn lost_counter_reported_once() {
    let r = test_ring(64);
    let mut p = Producer::new(r.raw).unwrap();
    let mut c = Consumer::new(r.raw).unwrap();
    assert_eq!(c.take_lost(), 0);
    p.add_lost(3);
    assert_eq!(c.take_lost(), 3);
    assert_eq!(c.take_lost(), 0);
    p.add_lost(1);
    assert_eq!(Consumer::new(r.raw).unwrap().take_lost(), 1);
}

#[test]
fn want_space_flag_is_returned_once() {
    let r = test_ring(64);
    let mut p = Producer::new(r.raw).unwrap();
    let mut c = Consumer::new(r.raw).unwrap();
    assert!(p.try_write(FIRST | LAST, &[&[0u8; 48]]).unwrap());
    p.commit();
    assert_eq!(p.request_space(8).unwrap(), 0);
    pop(&mut c).unwrap();
    assert!(c.release());
    assert!(!c.release());
    assert_eq!(p.body_room(8).unwrap(), 48);
}

/// A request for room stays visible to the producer until the consumer answers it, and a
/// producer that takes over the ring does not inherit its predecessor's request.
#[test]
fn space_requested_until_the_consumer_answers() {
    let r = test_ring(64);
    let mut p = Producer::new(r.raw).unwrap();
    let mut c = Consumer::new(r.raw).unwrap();
    assert!(!p.space_requested());
    assert!(p.try_write(FIRST | LAST, &[&[0u8; 48]]).unwrap());
    p.commit();
    assert_eq!(p.request_space(8).unwrap(), 0);
    assert!(p.space_requested());
    pop(&mut c).unwrap();
    assert!(c.release());
    assert!(!p.space_requested(), "answered");
    // A predecessor's unanswered request, with nothing left for the consumer to release:
    assert_eq!(p.request_space(8).unwrap(), 48);
    assert!(p.space_requested());
    let p2 = Producer::new(r.raw).unwrap();
    assert!(!p2.space_requested(), "a successor would skip its retries for good");
    // Anything but 1 in the (untrusted) word reads as answered.
    r.raw.hdr().producer.want_space.store(7, Ordering::Relaxed);
    assert!(!p2.space_requested());
}

/// The body copies go word by word (Relaxed atomics): parts that start and end at any byte
/// offset, bodies that wrap, and a destination at any alignment keep every byte; nothing
/// outside the record (and the next slot's stamp word) is written, nothing outside the
/// destination range either.
#[test]
fn word_copies_keep_bytes_at_any_alignment() {
    let cap = 256;
    let r = test_ring(cap);
    let mut p = Producer::new(r.raw).unwrap();
    let mut c = Consumer::new(r.raw).unwrap();
    let data = |r: &TestRing| -> Vec<u64> { (0..cap / 8).map(|i| r.raw.word(i * 8).load(Ordering::Relaxed)).collect() };
    let (mut round, mut wrapped) = (0u32, 0);
    for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100, 150] {
        for (a, b) in [(0, 0), (1, 2), (3, 3), (7, 9), (8, 8), (5, 13)] {
            round += 1;
            let (a, b) = (a.min(len), (a + b).min(len));
            let body: Vec<u8> = (0..len).map(|i| (i as u32 * 7 + round) as u8 | 1).collect();
            let lines = round as usize % 4;
            if lines > 0 {
                // A filler record of 1-3 lines moves the next one to another offset.
                let filler = vec![b'f'; lines * REC_ALIGN - REC_HDR];
                assert!(p.try_write(FIRST | LAST, &[&filler]).unwrap() && p.commit());
                assert_eq!(pop(&mut c).expect("filler").1, filler);
                c.release();
            }
            let before = data(&r);
            let start = r.raw.off(p.write);
            assert!(p.try_write(FIRST | LAST, &[&body[..a], &body[a..b], &body[b..]]).unwrap());
            assert!(p.commit());
            let after = data(&r);
            let words = (record_size(len) + 8) / 8; // the record and the next slot's stamp
            for (i, (x, y)) in before.iter().zip(&after).enumerate() {
                let rel = (i * 8 + cap - start) % cap / 8;
                assert!(rel < words || x == y, "len {len}: word {i} outside the record changed");
            }
            wrapped += usize::from(start + REC_HDR + len > cap);
            let info = c.peek().unwrap().expect("record");
            let shift = round as usize % 8;
            let mut buf = vec![0xeeu8; len + 16];
            // SAFETY: info from peek; buf has room for len bytes at `shift`.
            unsafe { c.consume(info, Some(buf.as_mut_ptr().add(shift))) };
            assert_eq!(&buf[shift..shift + len], &body[..], "len {len} parts {a}/{b}");
            assert!(buf[..shift].iter().chain(&buf[shift + len..]).all(|&x| x == 0xee), "wrote past dst");
            c.release();
        }
    }
    assert!(wrapped >= 5, "only {wrapped} bodies wrapped");
}
