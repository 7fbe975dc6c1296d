//! Contract behaviours that need more than one process and that the other test files do not
//! reach: wake-ups of a worker blocked in `wait(None)` (no timeout at all), the worker's
//! descriptor turning readable in the caller's own poll(2), the typed `publish` limit at its
//! exact boundary, and the broker's checks of a HELLO (protocol version, geometry, foreign
//! uid) on a raw control connection.
//!
//! Time bounds in this file are liveness bounds (a lost wake-up never answers), never speed
//! assertions: a healthy wake-up takes well under a millisecond.

#[macro_use]
mod support;

use std::time::Duration;

use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// How long a blocked worker may take to be woken before the test calls it lost.
const LIVENESS: Duration = Duration::from_secs(20);

/// Make sure `child` sleeps in the kernel (in one of `syscalls`) before the test goes on, so
/// that what follows must wake it. Where `/proc` cannot tell, give it a moment instead.
fn until_asleep(child: &Child, syscalls: &[libc::c_long], what: &str) {
    match child.blocked_in(syscalls, Duration::from_secs(10)) {
        Some(true) => {}
        Some(false) => panic!("{}: never went to sleep in {what}", child.name),
        None => {
            eprintln!("NOTE: /proc/<pid>/task/*/syscall unavailable; assuming {} sleeps after 300 ms", child.name);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

// 1. Lost wake-ups ---------------------------------------------------------------------------

/// A receiver blocked in `wait(None)` in its own process is woken by a publish from another
/// process, every time (three rounds). On shared memory the wake-up is the publisher's write
/// to the receiver's eventfd: both ends count it in `stats()`. On the socket transport the
/// wake-up is the broker's write to the receiver's socket.
fn a_receiver_blocked_in_wait_none_is_woken_by_another_process() {
    const ROUNDS: u64 = 3;
    let dir = TempDir::new("park");
    let wd = Watchdog::new("park");
    let cfg = Cfg::new(&dir.sock(), 3);
    // w0 is the broker; the receiver and the publisher are plain workers.
    let _broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
    let mut publisher = wd.spawn(&cfg, Wid::Worker(2));
    for round in 0..ROUNDS {
        receiver.send(Cmd::Park { n: round + 1 });
        assert_eq!(receiver.next_line(), "@@PARKING");
        until_asleep(&receiver, &epoll_wait_syscalls(), "wait(None)");
        let r = publisher.publish(Tgt::All, "park", "x", round, 1);
        assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
        let l = receiver
            .expect_ok_within(LIVENESS, &format!("round {round}: the receiver blocked in wait(None) was never woken"));
        assert!(l.iter().any(|x| x.starts_with(&format!("@@PARKED {} ", round + 1))), "round {round}: {l:?}");
        assert!(!l.iter().any(|x| x.ends_with(" 0")), "round {round}: it never waited: {l:?}");
    }
    let r = receiver.report();
    assert_eq!(r.stream("w2", "park", "x"), seq(0, ROUNDS));
    assert_eq!((r.stat("wait_errors"), r.stat("dropped"), r.stat("lost")), (0, 0, 0));
    let p = publisher.report();
    if transport() == Transport::SharedMemory {
        assert!(r.stat("wakeups_received") >= ROUNDS, "receiver wakeups_received: {:?}", r.stats);
        assert!(p.stat("wakeups_sent") >= ROUNDS, "publisher wakeups_sent: {:?}", p.stats);
    }
    eprintln!(
        "wait(None) woken {ROUNDS} times; wakeups received by the receiver {}, sent by the publisher {}",
        r.stat("wakeups_received"),
        p.stat("wakeups_sent")
    );
}

/// The other direction on shared memory: a publisher whose events wait in its private
/// backlog (the receivers' 4 KiB rings are full) blocks in `wait(None)`; the receivers
/// consume, and each time they free room they must wake it (the consumer-side eventfd
/// write), or its backlog never moves and the receivers never get the rest.
#[test]
fn a_publisher_blocked_on_full_rings_is_woken_when_receivers_free_room() {
    run_with(Transport::SharedMemory, || {
        const N: u64 = 600; // about 6 rings' worth of small events
        let dir = TempDir::new("park-full");
        let wd = Watchdog::new("park-full");
        let mut cfg = Cfg::new(&dir.sock(), 3);
        cfg.ring_capacity = Some(4096);
        let mut broker = wd.spawn(&cfg, Wid::Worker(0));
        let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
        let mut publisher = wd.spawn(&cfg, Wid::Worker(2));
        // The receivers stop consuming; the publisher's rings fill, the rest is backlogged.
        broker.cmd(Cmd::Pause);
        receiver.cmd(Cmd::Pause);
        let r = publisher.publish(Tgt::All, "bp", "x", 0, N);
        assert_eq!((r.ok, r.err), (N, 0), "{:?}", r.errors);
        let before = publisher.report();
        assert!(before.stat("backlog_sum") > 0, "nothing backlogged: the test proves nothing");
        // The publisher blocks until one more event reaches it (the broker's marker, below;
        // its own events are already counted).
        publisher.send(Cmd::Park { n: before.stat("events") + before.stat("lost_total") + 1 });
        assert_eq!(publisher.next_line(), "@@PARKING");
        until_asleep(&publisher, &epoll_wait_syscalls(), "wait(None)");
        broker.cmd(Cmd::Resume);
        receiver.cmd(Cmd::Resume);
        // Only the publisher can move its backlog, and only if the receivers wake it.
        assert!(
            receiver.until_within(N, LIVENESS),
            "liveness: the receiver got {} of {N} events within {LIVENESS:?}: the publisher blocked in wait(None) \
             was not woken when its receivers freed room",
            receiver.report().stat("events")
        );
        assert!(broker.until_within(N, LIVENESS), "the broker never got all {N} events");
        let r = broker.publish(Tgt::All, "bp", "marker", 0, 1);
        assert_eq!((r.ok, r.err), (1, 0));
        let l =
            publisher.expect_ok_within(LIVENESS, "the publisher blocked in wait(None) was never woken by the marker");
        assert!(!l.iter().any(|x| x.ends_with(" 0") && x.starts_with("@@PARKED")), "it never waited: {l:?}");
        let rr = receiver.report();
        let got = rr.stream("w2", "bp", "x");
        assert!(got == seq(0, N), "{}", diff_summary(&got, &seq(0, N)));
        assert_eq!((rr.stat("lost"), rr.stat("dropped")), (0, 0));
        let pr = publisher.report();
        assert_eq!((pr.stat("lost_outbound"), pr.stat("peer_depth_sum"), pr.stat("wait_errors")), (0, 0, 0));
        assert!(pr.stat("wakeups_received") >= 2, "publisher wakeups_received: {:?}", pr.stats);
        // Both receivers free room; whichever sees the publisher parked wakes it.
        let room_wakes = rr.stat("wakeups_sent") + broker.report().stat("wakeups_sent");
        assert!(room_wakes >= 1, "no receiver woke the publisher (wakeups_sent of w1 and w0: 0)");
    });
}

// 2. The worker's descriptor in the caller's own poller --------------------------------------

/// `Worker: AsRawFd` is readable when `dispatch()` has work: a child drains, registers the
/// descriptor in its own poll(2) and sleeps there; a publish from another process makes it
/// readable, and `dispatch()` then returns the event.
fn the_worker_fd_turns_readable_when_work_arrives() {
    let dir = TempDir::new("pollfd");
    let wd = Watchdog::new("pollfd");
    let cfg = Cfg::new(&dir.sock(), 3);
    let _broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
    let mut publisher = wd.spawn(&cfg, Wid::Worker(2));
    for round in 0..2u64 {
        receiver.send(Cmd::PollFd { ms: LIVENESS.as_millis() as u64 });
        assert_eq!(receiver.next_line(), "@@POLLING");
        until_asleep(&receiver, &poll_syscalls(), "poll(2) on the worker's fd");
        let r = publisher.publish(Tgt::All, "fd", "x", round, 1);
        assert_eq!((r.ok, r.err), (1, 0));
        let l = receiver.expect_ok_within(LIVENESS + Duration::from_secs(5), "pollfd");
        let f: Vec<&str> = l.iter().find(|x| x.starts_with("@@POLLED")).expect("@@POLLED").split(' ').collect();
        assert_eq!(f[1], "1", "round {round}: the worker's fd never turned readable within {LIVENESS:?}: {l:?}");
        assert!(f[2].parse::<u64>().unwrap() > 0, "round {round}: readable, but dispatch() returned 0: {l:?}");
    }
    let r = receiver.report();
    assert_eq!(r.stream("w2", "fd", "x"), seq(0, 2));
    assert_eq!((r.stat("dispatch_errors"), r.stat("dropped")), (0, 0));
}

// 3. The typed publish limit -------------------------------------------------------------------

/// Through the typed `publish`: a value whose rkyv bytes are exactly `max_payload_len`
/// (a `[u8; TYPED_LEN]`) is accepted and arrives intact in the other processes; one byte
/// more is refused, and never arrives.
fn typed_publish_limit_is_exact_across_processes() {
    let dir = TempDir::new("typed");
    let wd = Watchdog::new("typed");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.max_payload_len = Some(TYPED_LEN);
    let mut ws: Vec<Child> = (0..3).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let lines = ws[1].cmd(Cmd::typed(Tgt::All, "typed", "exact", false));
    assert!(lines.contains(&"@@PUB 1 0".to_string()), "a typed value of exactly max_payload_len: {lines:?}");
    let lines = ws[1].cmd(Cmd::typed(Tgt::All, "typed", "over", true));
    assert!(lines.contains(&"@@PUB 0 1".to_string()), "a typed value of max_payload_len + 1: {lines:?}");
    let refusal = format!("@@PUBERR failed to publish event: payload exceeds the limitation ({TYPED_LEN})");
    assert!(lines.contains(&refusal), "{lines:?}");
    // A marker after the refused value: once it arrived, the refused one had its chance.
    let r = ws[1].publish(Tgt::All, "seq", "end", 0, 1);
    assert_eq!((r.ok, r.err), (1, 0));
    for (i, w) in ws.iter_mut().enumerate() {
        w.until(2);
        let r = w.report();
        assert_eq!(r.payloads, vec![("w1".to_string(), TYPED_LEN, true)], "worker {i}: (publisher, len, intact)");
        assert_eq!(r.stream("w1", "typed", "over"), Vec::<u64>::new(), "worker {i}: the refused value arrived");
        assert_eq!(r.stream("w1", "seq", "end"), vec![0], "worker {i}");
        assert_eq!((r.stat("events"), r.stat("dropped"), r.stat("decode_errors")), (2, 0, 0), "worker {i}");
    }
}

// 4. HELLO checks on a raw control connection --------------------------------------------------

fn expect_reject(reply: &Reply, what: &str, needle: &str) {
    match reply {
        Reply::Frame(KIND_REJECT, reason) => {
            assert!(reason.contains(needle), "{what}: REJECT {reason:?} does not say {needle:?}")
        }
        Reply::Frame(k, _) => {
            panic!("{what}: expected a REJECT saying {needle:?}, got a frame of kind {k} (2: WELCOME)")
        }
        Reply::Closed => panic!("{what}: expected a REJECT saying {needle:?}, the broker closed without a word"),
    }
}

/// HELLOs with a wrong protocol version, a wrong layout version or a wrong geometry get a
/// REJECT that says why, and the broker keeps serving its workers. The same HELLO with
/// the right fields gets a WELCOME (so the refusals are about those fields only).
fn hello_with_a_wrong_version_or_geometry_is_rejected_and_the_broker_keeps_serving() {
    let dir = TempDir::new("hello");
    let wd = Watchdog::new("hello");
    let cfg = Cfg::new(&dir.sock(), 3);
    let mut broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    // Slot 2 is free: a HELLO for it is refused for the field under test, nothing else.
    let good = Hello::for_cfg(&cfg, 2);
    let ring = good.ring_capacity;
    let layout_msg = format!("shared-memory layout version 99, the broker uses {}", layout_version());
    let proto_msg = format!("control protocol version 99, the broker speaks {}", protocol_version());
    let cases = [
        (Hello { protocol: 99, ..good }, proto_msg.as_str()),
        (Hello { layout: 99, ..good }, layout_msg.as_str()),
        (Hello { workers: 4, ..good }, "options differ from the broker's: workers 4/3"),
        (Hello { ring_capacity: ring * 2, ..good }, "options differ from the broker's"),
        (Hello { agent: 1, ..good }, "enable_privileged_agent true/false"),
        (Hello { slot: 3, ..good }, "slot 3 out of range 0..3"),
    ];
    for (h, needle) in &cases {
        expect_reject(&raw_exchange(&dir.sock(), &hello_frame(h)), &format!("{h:?}"), needle);
    }
    // The broker still serves: events flow both ways between its workers.
    let r = broker.publish(Tgt::All, "h", "b", 0, 3);
    assert_eq!((r.ok, r.err), (3, 0));
    let r = w1.publish(Tgt::All, "h", "w", 0, 3);
    assert_eq!((r.ok, r.err), (3, 0));
    w1.until(3);
    broker.until(3);
    assert_eq!(w1.report().stream("w0", "h", "b"), seq(0, 3));
    assert_eq!(broker.report().stream("w1", "h", "w"), seq(0, 3));
    // The right HELLO for the free slot is welcomed.
    match raw_exchange(&dir.sock(), &hello_frame(&good)) {
        Reply::Frame(KIND_WELCOME, _) => {}
        other => panic!("a well-formed HELLO for free slot 2 was not welcomed: {other:?}"),
    }
}

/// A process of another uid that connects to the control socket and sends a well-formed
/// HELLO gets a REJECT (the broker checks `SO_PEERCRED`), not a WELCOME; the same HELLO
/// from our uid is welcomed. Needs root (to run the client as uid 65534): skipped otherwise.
fn a_foreign_uid_is_refused_by_the_broker() {
    if !is_root() {
        eprintln!("SKIPPED a_foreign_uid_is_refused_by_the_broker: not running as root (cannot switch uid)");
        return;
    }
    let dir = TempDir::new("uid");
    let wd = Watchdog::new("uid");
    let cfg = Cfg::new(&dir.sock(), 3);
    let mut broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    // File permissions are the first barrier; open them so that the one under test is the
    // broker's credential check.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.sock(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let frame = hello_frame(&Hello::for_cfg(&cfg, 2));
    let mut raw = wd.spawn_raw(&cfg, &Spawn::raw(&frame, Some(65534)));
    let l = raw.expect_ok();
    let reply = l.iter().find(|x| x.starts_with("@@REPLY") || *x == "@@CLOSED").expect("a reply line");
    let want = format!("@@REPLY {KIND_REJECT} uid 65534 is not allowed to attach");
    assert_eq!(reply, &want, "a HELLO from uid 65534 must be refused");
    // The same HELLO from our own uid is welcomed, and the broker keeps serving.
    let mut own = wd.spawn_raw(&cfg, &Spawn::raw(&frame, None));
    let l = own.expect_ok();
    assert!(l.iter().any(|x| x.starts_with(&format!("@@REPLY {KIND_WELCOME} "))), "same uid: {l:?}");
    let r = broker.publish(Tgt::All, "uid", "after", 0, 2);
    assert_eq!((r.ok, r.err), (2, 0));
    w1.until(2);
    assert_eq!(w1.report().stream("w0", "uid", "after"), seq(0, 2));
}

// Every test above (but the shared-memory-only one) runs on both transports.
per_transport!(
    a_receiver_blocked_in_wait_none_is_woken_by_another_process,
    the_worker_fd_turns_readable_when_work_arrives,
    typed_publish_limit_is_exact_across_processes,
    hello_with_a_wrong_version_or_geometry_is_rejected_and_the_broker_keeps_serving,
    a_foreign_uid_is_refused_by_the_broker,
);
