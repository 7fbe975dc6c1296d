//! Liveness under bad shared memory (issue 11, items 1-3): a ring holding an impossible
//! record, rings whose positions are corrupt when a worker attaches, and a peer that streams
//! records without end. Each test runs real worker processes; the test process plays the
//! hostile peer through the child's region, mapped via `/proc/<pid>/fd/N`
//! (`support/region.rs`).

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use support::region::{ChildRegion, RECORD_FIRST, RECORD_LAST, cpu_time};
use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// One test at a time: they measure CPU time and keep a CPU busy.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn shm_cfg(dir: &TempDir, workers: u32) -> Cfg {
    let mut cfg = Cfg::new(&dir.sock(), workers);
    cfg.transport = Transport::SharedMemory;
    cfg
}

/// Item 1. Slot 0 never ran; the test writes into ring 0 -> 1 what no producer could: at
/// the read position a record whose stamp is right but whose length is impossible, and a
/// second one at a plausible `write_pos` hint past it. w1 parks in `wait(None)`. It must
/// report the corruption exactly once (counter, one `lost` notice) and sleep: its CPU time
/// over one second stays under 30% of the wall time (a ratio, not a speed claim: a spinning
/// receiver uses ~100%). A producer then starting in slot 0 resynchronizes with it, and
/// everything it publishes arrives, in order.
#[test]
fn an_impossible_record_is_reported_once_and_the_receiver_sleeps() {
    let _serial = serial();
    let dir = TempDir::new("hring-quarantine");
    let wd = Watchdog::new("hring-quarantine");
    let cfg = shm_cfg(&dir, 3);
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    let region = ChildRegion::open(w1.pid());
    let ring = region.ring(0, 1);
    let r = ring.read_pos();
    ring.put_header(r, !r, u32::MAX, RECORD_FIRST | RECORD_LAST);
    ring.put_header(r + 64, !(r + 64), u32::MAX, RECORD_FIRST | RECORD_LAST);
    ring.set_write_pos(r + 64);
    // The corruption's lost notice counts 1; the park ends with w2's event below.
    w1.send(Cmd::Park { n: 2 });
    assert_eq!(w1.next_line(), "@@PARKING");
    // The control timer wakes w1 within 200 ms: it meets the bad record then.
    std::thread::sleep(Duration::from_millis(400));
    let (c0, t0) = (cpu_time(w1.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let (c1, wall) = (cpu_time(w1.pid()), t0.elapsed());
    let ratio = (c1 - c0).as_secs_f64() / wall.as_secs_f64();
    eprintln!("w1 used {:?} of CPU in {wall:?} parked (ratio {ratio:.2})", c1 - c0);
    assert!(ratio < 0.3, "w1 spins in wait(None): {:?} of CPU in {wall:?}", c1 - c0);
    // End the park: it counts events and lost notices.
    w2.publish(Tgt::All, "q", "wake", 0, 1);
    let l = w1.next_line();
    assert!(l.starts_with("@@PARKED"), "{l}");
    w1.expect_ok();
    let rep = w1.report();
    assert_eq!(rep.stat("corrupt_rings"), 1, "the corruption must be reported once; stats {:?}", rep.stats);
    assert_eq!(rep.lost_by_slot().get(&0), Some(&1), "one lost notice for slot 0: {:?}", rep.lost);
    // A producer starts in slot 0: it adopts w1's position and w1 receives all it sends.
    let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
    let r = w0.publish(Tgt::All, "q", "after", 0, 20);
    assert_eq!((r.ok, r.err), (20, 0));
    let lost_before: u64 = rep.lost.iter().map(|(_, c)| c).sum();
    let want = rep.stat("events") + lost_before + 20;
    assert!(w1.until_within(want, Duration::from_secs(10)), "w1 never got w0's events: {:?}", w1.report().stats);
    let rep = w1.report();
    assert_eq!(rep.stream("w0", "q", "after"), seq(0, 20));
    assert_eq!(rep.stat("corrupt_rings"), 1);
}

/// Item 2. Positions corrupt when a worker attaches: w1 is killed; its inbound ring from w2
/// gets a `read_pos` that is not a record boundary, its outbound ring to w2 a `write_pos`
/// hint that is not one either. The restarted w1 must resynchronize both (counting the
/// inbound one) instead of abandoning them: w2's events reach it, its events reach w2,
/// complete and in order.
#[test]
fn rings_corrupt_at_attach_are_resynchronized() {
    let _serial = serial();
    let dir = TempDir::new("hring-attach");
    let wd = Watchdog::new("hring-attach");
    let cfg = shm_cfg(&dir, 3);
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    assert_eq!(w2.publish(Tgt::All, "a", "before", 0, 5).ok, 5);
    w1.until(5);
    assert_eq!(w1.publish(Tgt::All, "a", "before", 0, 5).ok, 5);
    w2.until(5);
    w1.kill();
    let region = ChildRegion::open(w2.pid());
    let inbound = region.ring(2, 1);
    inbound.set_read_pos(inbound.read_pos() + 8);
    let outbound = region.ring(1, 2);
    outbound.set_write_pos(outbound.write_pos() + 8);
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    assert_eq!(w2.publish(Tgt::All, "a", "after", 0, 10).ok, 10);
    assert!(
        w1.until_within(10, Duration::from_secs(5)),
        "the restarted w1 does not receive from w2 (its inbound ring abandoned): {:?}",
        w1.report().stats
    );
    assert_eq!(w1.publish(Tgt::All, "a", "after", 0, 10).ok, 10);
    assert!(
        w2.until_within(15, Duration::from_secs(5)),
        "w2 does not receive from the restarted w1 (its outbound ring refused): {:?}",
        w2.report().stats
    );
    let r1 = w1.report();
    assert_eq!(r1.stream("w2", "a", "after"), seq(0, 10));
    assert_eq!(r1.stat("corrupt_rings"), 1, "the resynchronized inbound ring is counted");
    assert_eq!(w2.report().stream("w1", "a", "after"), seq(0, 10));
}

/// Item 3. Slot 0 never ran; while w1 is paused (it dispatches only inside commands), the test
/// fills ring 0 -> 1 (16 MiB) with what a peer streaming without end leaves there: a FIRST
/// record, then 48-byte fragments of a message that never ends (the receiver assembles up
/// to its 64 KiB limit, then discards), 262,143 records. w2 publishes 5 events. Then w1
/// makes exactly one `dispatch` call (the one after a publish): it must return having taken
/// a bounded number of records from ring 0 (it drains ring 0 first), yet having served
/// w2's ring. Before the fix, that one call drained all of ring 0 (a live streamer keeps it
/// there forever).
#[test]
fn a_peer_streaming_without_end_cannot_hold_dispatch_in_one_ring() {
    let _serial = serial();
    let dir = TempDir::new("hring-stream");
    let wd = Watchdog::new("hring-stream");
    let mut cfg = shm_cfg(&dir, 3);
    cfg.ring_capacity = Some(16 << 20);
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    w1.cmd(Cmd::Pause);
    let region = ChildRegion::open(w1.pid());
    let ring = region.ring(0, 1);
    let start = ring.read_pos();
    let records = ring.cap as u64 / 64 - 1;
    for i in 0..records {
        let pos = start + i * 64;
        let flags = if i == 0 { RECORD_FIRST } else { 0 };
        ring.put_header(pos, !pos, 48, flags);
    }
    let end = start + records * 64;
    assert_eq!(w2.publish(Tgt::All, "s", "e", 0, 5).ok, 5);
    // One publish, then one dispatch.
    assert_eq!(w1.publish(Tgt::All, "one", "dispatch", 0, 1).ok, 1);
    let taken = (ring.read_pos() - start) / 64;
    let rep = w1.report();
    eprintln!("one dispatch took {taken} of {records} records from ring 0");
    assert!(taken > 0, "ring 0 was not drained at all");
    assert!(taken <= 4096, "one dispatch took {taken} records from one ring (of {records}; bound 4096)");
    assert_eq!(rep.stream("w2", "s", "e"), seq(0, 5), "w2's ring not served by that dispatch");
    // Later passes drain the rest; the message over the limit is reported lost.
    w1.cmd(Cmd::Resume);
    assert!(w1.until_within(6, Duration::from_secs(10)));
    let end_reached = Instant::now() + Duration::from_secs(10);
    while ring.read_pos() < end {
        assert!(Instant::now() < end_reached, "ring 0 never drained: {} of {end}", ring.read_pos());
        w1.cmd(Cmd::Pump { ms: 10 });
    }
    assert_eq!(w1.report().lost_by_slot().get(&0), Some(&1));
}
