//! `Worker::batch` with real processes (this test binary re-executed in a child role, see
//! `tests/support/`): a batch's events reach the other workers whole at the batch's end, in
//! order, with at most one wake-up per receiver; a batch longer than a ring flows without
//! loss; a leaked batch is committed at the publisher's next library call; on the socket
//! transport a batch is plain publishes.
//!
//! Time bounds are liveness bounds (they detect "never"), and the one "not yet" check
//! (nothing visible while the batch is open) holds however slow the machine is: the
//! records are uncommitted until the publisher ends the batch, which it does only after
//! the test has looked.

#[macro_use]
mod support;

use std::time::Duration;

use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// How long the publisher keeps a batch open while the test looks at the receivers. The
/// receivers look for `LOOK`; the margin only has to cover a command round trip.
const HOLD: Duration = Duration::from_secs(4);
const LOOK: Duration = Duration::from_millis(300);

fn shm_cfg(dir: &TempDir, workers: u32) -> Cfg {
    let mut cfg = Cfg::new(&dir.sock(), workers);
    cfg.transport = Transport::SharedMemory;
    cfg
}

fn burst(start: u64, count: u64, hold: Duration, leak: bool) -> Cmd {
    Cmd::Burst {
        target: Tgt::All,
        src: "seq".into(),
        ev: "burst".into(),
        start,
        count,
        hold_ms: hold.as_millis() as u64,
        leak,
    }
}

/// Held open, a batch of 500 shows nothing to a receiver dispatching meanwhile; ended, it
/// arrives whole and in order at a busy receiver and at a parked one, and the publisher
/// wrote at most one wake-up per receiver for the whole burst.
#[test]
fn a_batch_arrives_whole_at_its_end_in_order_with_one_wake_up_per_receiver() {
    const N: u64 = 500;
    let dir = TempDir::new("batch-end");
    let wd = Watchdog::new("batch-end");
    let cfg = shm_cfg(&dir, 3);
    let mut busy = wd.spawn(&cfg, Wid::Worker(0));
    let mut parked = wd.spawn(&cfg, Wid::Worker(1));
    let mut publisher = wd.spawn(&cfg, Wid::Worker(2));
    // Every worker attached (the hello events went through), then the parked one sleeps.
    let r = publisher.publish(Tgt::All, "seq", "hello", 0, 1);
    assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
    busy.until(1);
    parked.until(1);
    let sent_before = publisher.report().stat("wakeups_sent");
    parked.send(Cmd::Park { n: N + 1 });
    assert_eq!(parked.next_line(), "@@PARKING");
    if parked.blocked_in(&epoll_wait_syscalls(), Duration::from_secs(10)) == Some(false) {
        panic!("the receiver never went to sleep");
    }

    publisher.send(burst(0, N, HOLD, false));
    assert_eq!(publisher.next_line(), format!("@@HELD {N} 0"));
    assert!(
        !busy.until_within(2, LOOK),
        "events of an open batch reached a receiver: {} of {N}",
        busy.report().stream("w2", "seq", "burst").len()
    );
    let r = publisher.publish_end();
    assert_eq!((r.ok, r.err), (N, 0), "{:?}", r.errors);

    busy.until(N + 1);
    let lines = parked.expect_ok();
    assert!(lines.iter().any(|l| l.starts_with(&format!("@@PARKED {}", N + 1))), "{lines:?}");
    for (name, w) in [("busy", &mut busy), ("parked", &mut parked)] {
        let rep = w.report();
        let got = rep.stream("w2", "seq", "burst");
        assert!(got == seq(0, N), "{name}: {}", diff_summary(&got, &seq(0, N)));
        assert_eq!(rep.stat("lost"), 0, "{name}");
    }
    let rep = publisher.report();
    let sent = rep.stat("wakeups_sent") - sent_before;
    assert!(sent <= 2, "the batch's end wakes each of the 2 receivers at most once; wrote {sent} wake-ups");
    assert_eq!((rep.stat("published"), rep.stat("lost_outbound")), (N + 1, 0));
}

/// A batch of 3,000 events into 4 KiB rings (a few dozen events each): the batch commits
/// when a ring fills and the rest waits in the backlog, so every event arrives, in order,
/// and nothing is dropped.
#[test]
fn a_batch_longer_than_a_ring_flows_without_loss() {
    const N: u64 = 3_000;
    let dir = TempDir::new("batch-long");
    let wd = Watchdog::new("batch-long");
    let mut cfg = shm_cfg(&dir, 3);
    cfg.ring_capacity = Some(4096);
    let mut ws: Vec<Child> = (0..3).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let r = ws[2].publish(Tgt::All, "seq", "hello", 0, 1);
    assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
    ws[2].send(burst(0, N, Duration::ZERO, false));
    assert_eq!(ws[2].next_line(), format!("@@HELD {N} 0"));
    let r = ws[2].publish_end();
    assert_eq!((r.ok, r.err), (N, 0), "{:?}", r.errors);
    for (i, w) in ws.iter_mut().enumerate().take(2) {
        w.until(N + 1);
        let rep = w.report();
        let got = rep.stream("w2", "seq", "burst");
        assert!(got == seq(0, N), "worker {i}: {}", diff_summary(&got, &seq(0, N)));
        assert_eq!(rep.stat("lost"), 0, "worker {i}");
    }
    // The rest of the batch left the publisher's backlog through its later calls (its
    // command loop waits on the worker between commands), and nothing was dropped.
    assert_eq!(ws[2].report().stat("lost_outbound"), 0);
}

/// Worker 1 publishes `n` events in one batch, ended or leaked, to worker 0 (two workers
/// on `transport`); worker 0 gets every one, in order.
fn one_batch_between_two_workers(name: &str, transport: Transport, n: u64, leak: bool) {
    let dir = TempDir::new(name);
    let wd = Watchdog::new(name);
    let mut cfg = Cfg::new(&dir.sock(), 2);
    cfg.transport = transport;
    let mut receiver = wd.spawn(&cfg, Wid::Worker(0));
    let mut publisher = wd.spawn(&cfg, Wid::Worker(1));
    let r = publisher.publish(Tgt::All, "seq", "hello", 0, 1);
    assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
    receiver.until(1);
    publisher.send(burst(0, n, Duration::ZERO, leak));
    assert_eq!(publisher.next_line(), format!("@@HELD {n} 0"));
    let r = publisher.publish_end();
    assert_eq!((r.ok, r.err), (n, 0), "{:?}", r.errors);
    // A leaked batch: the publisher's next library call is the `wait` of its command loop.
    receiver.until(n + 1);
    let got = receiver.report().stream("w1", "seq", "burst");
    assert!(got == seq(0, n), "{}", diff_summary(&got, &seq(0, n)));
}

/// A batch leaked with `mem::forget` is committed at the publisher's next library call:
/// the receivers get every event, in order.
#[test]
fn a_leaked_batch_is_committed_by_the_next_library_call() {
    one_batch_between_two_workers("batch-leak", Transport::SharedMemory, 100, true);
}

/// On the socket transport a batch is plain publishes: everything arrives, in order.
#[test]
fn a_batch_on_the_socket_transport_is_plain_publishes() {
    one_batch_between_two_workers("batch-sock", Transport::Socket, 200, false);
}
