//! The per-publisher topology (`Options::broadcast_capacity`, `src/transport/shm/bcast.rs`)
//! with real processes on real shared memory, with rings small enough that a stopped receiver
//! falls a whole broadcast ring behind:
//! * a receiver that stops dispatching is diverted to its pair ring before the publisher
//!   overwrites what it has not read, gets every event once and in order when it comes back,
//!   and reads the broadcast ring again afterwards (resumed), while the receiver that kept
//!   up never noticed;
//! * an event too large for the broadcast ring goes through the pair rings, in its place in
//!   the stream, to a receiver stopped and to one keeping up;
//! * options that differ in `broadcast_capacity` are refused at attach;
//! * a broadcast ring holding what no publisher writes is reported once and its receiver
//!   sleeps (no spin), and a publisher starting in that slot serves everyone through the
//!   pair rings.
//!
//! This topology is the default, so the whole multi-process suite runs in it; CI runs it
//! once more in the per-pair topology (`.ci/run`, with `WORKER_EVENTS_BROADCAST=0`).

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use support::region::{ChildRegion, cpu_time};
use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// Broadcast and pair rings of 4 KiB: 64 records of a small event per lap.
const SMALL: usize = 4096;

fn cfg(dir: &TempDir) -> Cfg {
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.transport = Transport::SharedMemory;
    cfg.ring_capacity = Some(SMALL);
    cfg.broadcast_capacity = Some(SMALL);
    cfg.max_queue_len = Some(100_000);
    cfg
}

/// Workers 0 (keeps up), 1 (attached, then paused: it stops dispatching) and 2 (the
/// publisher), after one `hello` event reached both receivers.
fn busy_stopped_publisher(wd: &Watchdog, cfg: &Cfg) -> [Child; 3] {
    let mut w = [0, 1, 2].map(|i| wd.spawn(cfg, Wid::Worker(i)));
    let r = w[2].publish(Tgt::All, "seq", "hello", 0, 1);
    assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
    w[0].until(1);
    w[1].until(1);
    w[1].cmd(Cmd::Pause);
    w
}

#[test]
fn a_stopped_receiver_is_diverted_then_resumed_and_loses_nothing() {
    const N: u64 = 3000;
    let dir = TempDir::new("bcast-divert");
    let wd = Watchdog::new("bcast-divert");
    let cfg = cfg(&dir);
    let [mut busy, mut stopped, mut publisher] = busy_stopped_publisher(&wd, &cfg);

    // Many broadcast rings' worth while worker 1 does not dispatch.
    let r = publisher.publish(Tgt::All, "seq", "a", 0, N);
    assert_eq!((r.ok, r.err), (N, 0), "{:?}", r.errors);
    busy.until(1 + N);
    let diverts = publisher.report().stat("diverts");
    assert!(diverts >= 1, "the stopped receiver was never diverted ({diverts})");

    stopped.cmd(Cmd::Resume);
    stopped.until(1 + N);
    // Caught up: the next event resumes every diverted receiver (a marker in its pair ring).
    // Then they keep up: steps of 20 events fit a 4 KiB broadcast ring, no divert.
    const STEP: u64 = 20;
    let mut diverts_after = 0;
    for k in 0..20 {
        let r = publisher.publish(Tgt::All, "seq", "b", k * STEP, STEP);
        assert_eq!((r.ok, r.err), (STEP, 0), "{:?}", r.errors);
        stopped.until(1 + N + (k + 1) * STEP);
        busy.until(1 + N + (k + 1) * STEP);
        if k == 1 {
            diverts_after = publisher.report().stat("diverts");
        }
    }
    for (c, name) in [(&mut busy, "busy"), (&mut stopped, "stopped")] {
        let rep = c.report();
        assert_eq!(rep.stream("w2", "seq", "a"), (0..N).collect::<Vec<_>>(), "{name}: the burst");
        assert_eq!(rep.stream("w2", "seq", "b"), (0..20 * STEP).collect::<Vec<_>>(), "{name}: after it");
        assert_eq!(rep.stat("lost"), 0, "{name}");
        assert_eq!(rep.stat("inbound_depth_sum"), 0, "{name}: nothing waits anywhere");
    }
    let rep = publisher.report();
    assert_eq!(rep.stat("lost_outbound"), 0);
    // Every divert ended in a resume: the stopped receiver's, and the busy one's if it fell
    // a whole ring behind during the burst (it dispatches between commands too, so whether
    // it does depends on the scheduler: CI once saw only the stopped one diverted).
    assert_eq!(rep.stat("resumes"), rep.stat("diverts"), "every diverted receiver resumed");
    assert_eq!(rep.stat("diverts"), diverts_after, "a receiver that keeps up was diverted again");
}

#[test]
fn an_event_too_large_for_the_broadcast_ring_keeps_its_place_in_the_stream() {
    let dir = TempDir::new("bcast-large");
    let wd = Watchdog::new("bcast-large");
    let cfg = cfg(&dir);
    let [mut busy, mut stopped, mut publisher] = busy_stopped_publisher(&wd, &cfg);
    // A 4 KiB broadcast ring carries bodies up to 1,000 bytes; 3,000 go the pair-ring way.
    let mut expected = 1;
    for k in 0..5u64 {
        let r = publisher.publish(Tgt::All, "seq", "small", k * 30, 30);
        assert_eq!((r.ok, r.err), (30, 0), "{:?}", r.errors);
        let lines = publisher.cmd(Cmd::bytes(Tgt::All, "big", "blob", 3000));
        assert!(lines.iter().any(|l| l == "@@PUB 1 0"), "{lines:?}");
        expected += 31;
        busy.until(expected);
    }
    stopped.cmd(Cmd::Resume);
    stopped.until(expected);
    for (c, name) in [(&mut busy, "busy"), (&mut stopped, "stopped")] {
        let rep = c.report();
        assert_eq!(rep.stream("w2", "seq", "small"), (0..150).collect::<Vec<_>>(), "{name}");
        assert_eq!(rep.stat("lost"), 0, "{name}");
        assert_eq!(rep.stat("dropped"), 0, "{name}: every large payload arrived intact");
    }
    assert!(publisher.report().stat("diverts") >= 2, "each large event diverts every receiver");
}

#[test]
fn a_worker_with_another_broadcast_capacity_is_refused() {
    let dir = TempDir::new("bcast-refuse");
    let wd = Watchdog::new("bcast-refuse");
    let cfg = cfg(&dir);
    let _w0 = wd.spawn(&cfg, Wid::Worker(0));
    let mut other = cfg.clone();
    other.broadcast_capacity = Some(2 * SMALL);
    let err = wd.spawn_expect_err(&other, Wid::Worker(1));
    assert!(err.contains("broadcast_capacity 8192/4096"), "{err}");
}

#[test]
fn a_corrupt_broadcast_ring_is_reported_once_and_its_receiver_sleeps() {
    let dir = TempDir::new("bcast-corrupt");
    let wd = Watchdog::new("bcast-corrupt");
    let cfg = cfg(&dir);
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    // Slot 0 never ran: at the start of its broadcast ring, a stamp that is neither the
    // record's (!0), nor 0, nor an older lap's.
    let region = ChildRegion::open(w1.pid());
    region.bcast_data_word(0, 0).store(0x1234_5678, std::sync::atomic::Ordering::Release);
    w1.send(Cmd::Park { n: 1 });
    assert_eq!(w1.next_line(), "@@PARKING");
    // The control timer wakes w1 within 200 ms: it meets the bad stamp then.
    std::thread::sleep(Duration::from_millis(400));
    let (c0, t0) = (cpu_time(w1.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let (c1, wall) = (cpu_time(w1.pid()), t0.elapsed());
    let ratio = (c1 - c0).as_secs_f64() / wall.as_secs_f64();
    assert!(ratio < 0.3, "w1 spins in wait(None): {:?} of CPU in {wall:?}", c1 - c0);
    let r = w2.publish(Tgt::All, "q", "wake", 0, 1);
    assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
    let l = w1.next_line();
    assert!(l.starts_with("@@PARKED"), "{l}");
    w1.expect_ok();
    assert_eq!(w1.report().stat("corrupt_rings"), 1, "reported once");
    // A publisher starting in slot 0 finds its broadcast ring unusable and serves every
    // receiver through its pair ring: all it publishes arrives, in order.
    let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
    let r = w0.publish(Tgt::All, "q", "after", 0, 20);
    assert_eq!((r.ok, r.err), (20, 0), "{:?}", r.errors);
    for (c, name) in [(&mut w1, "w1"), (&mut w2, "w2")] {
        assert!(c.until_within(if name == "w1" { 21 } else { 20 }, Duration::from_secs(10)), "{name}");
        assert_eq!(c.report().stream("w0", "q", "after"), (0..20).collect::<Vec<_>>(), "{name}");
    }
}
