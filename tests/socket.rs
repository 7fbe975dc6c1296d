//! The socket transport's own behaviour (the behaviours it shares with shared memory run on
//! both transports in `tests/multiprocess.rs` and `tests/unique.rs`): the automatic fallback
//! when shared memory is unavailable, events kept across a broken broker connection, and
//! hostile bytes on the control socket.

#[macro_use]
mod support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use worker_events::{Events, Target, Transport, Wid};

child_entry!();

/// `Auto` with memfd creation failing (WORKER_EVENTS_DISABLE_SHM in every process, as a
/// sandbox without memfd would do): every worker runs and reports the socket transport, and
/// events flow. Without the variable, the same options give shared memory.
#[test]
fn auto_falls_back_to_sockets_when_shared_memory_is_unavailable() {
    for (disable, want) in [(true, "Socket"), (false, "SharedMemory")] {
        let dir = TempDir::new("auto");
        let wd = Watchdog::new("auto");
        let mut cfg = Cfg::new(&dir.sock(), 3);
        cfg.transport = Transport::Auto;
        let spawn = |i| Spawn { disable_shm: disable, ..Spawn::worker(Wid::Worker(i)) };
        let mut ws: Vec<Child> = (0..3).map(|i| wd.spawn_with(&cfg, &spawn(i))).collect();
        for w in &ws {
            assert_eq!(w.transport, want, "{} (shared memory disabled: {disable})", w.name);
        }
        for w in &mut ws {
            let r = w.publish(Tgt::All, "auto", "x", 0, 20);
            assert_eq!((r.ok, r.err), (20, 0));
        }
        for (i, w) in ws.iter_mut().enumerate() {
            w.until(60);
            let r = w.report();
            for p in 0..3 {
                assert_eq!(r.stream(&format!("w{p}"), "auto", "x"), seq(0, 20), "worker {i} from w{p}");
            }
            assert_eq!(r.stat("lost"), 0);
        }
    }
}

/// A worker whose broker stops reading keeps its events (bounded by max_queue_len); when
/// the broker dies they go to the next broker, each at most once, and those still queued at
/// the kill are all delivered. The events that died with the broker are not lost silently:
/// the receiver sees the gap in the publisher's sequence and gets a lost notice for it.
#[test]
fn events_queued_when_the_broker_dies_are_sent_after_reconnect_never_twice() {
    const N: u64 = 30_000;
    let dir = TempDir::new("reconnect");
    let wd = Watchdog::new("reconnect");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.transport = Transport::Socket;
    cfg.max_queue_len = Some(100_000);
    let broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut publisher = wd.spawn(&cfg, Wid::Worker(1));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(2));
    // One event through the first broker: the receiver knows where the sequence stands.
    publisher.publish(Tgt::All, "seq", "kept", 0, 1);
    receiver.until(1);
    // The broker stops reading: the kernel buffers fill, the rest waits in the publisher.
    broker.stop();
    let r = publisher.publish(Tgt::All, "seq", "kept", 1, N - 1);
    assert_eq!((r.ok, r.err), (N - 1, 0), "{:?}", r.errors);
    let queued: u64 = publisher.report().stats.get("peer_depth_sum").copied().unwrap_or(0);
    assert!(queued > 0, "some events must still be queued in the publisher");
    broker.kill();
    // A marker published after the failover closes the stream.
    publisher.publish(Tgt::All, "seq", "marker", 0, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (got, r) = loop {
        let r = receiver.report();
        if r.stream("w1", "seq", "marker") == vec![0] {
            break (r.stream("w1", "seq", "kept"), r);
        }
        assert!(Instant::now() < deadline, "the marker never arrived: {:?}", r.stats);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, nothing twice: {}", diff_summary(&got, &seq(0, N)));
    // Events written into the dead broker's socket died with it; every event still queued in
    // the publisher at the kill made it (they are the tail of the stream).
    let tail = seq(N - queued, queued);
    assert!(got.ends_with(&tail), "the {queued} queued events arrived: {}", diff_summary(&got, &seq(0, N)));
    // Received + reported lost = published, exactly.
    let lost: u64 = r.lost.iter().filter(|(p, _)| p == "w1").map(|(_, c)| c).sum();
    assert!(lost > 0, "events died in the stopped broker's socket buffer");
    assert_eq!(got.len() as u64 + lost, N, "received {} + lost {lost} != published {N}", got.len());
}

/// Garbage, an oversize length, an empty frame, an EVENT before any HELLO and a truncated
/// frame on the control socket close only that connection (the truncated one once it is
/// completed or hung up on, the broker waiting for the rest meanwhile); the broker keeps
/// serving its workers, also while a truncated frame is pending.
#[test]
fn hostile_bytes_on_the_socket_close_only_that_connection() {
    let dir = TempDir::new("hostile");
    let wd = Watchdog::new("hostile");
    let mut cfg = Cfg::new(&dir.sock(), 2);
    cfg.transport = Transport::Socket;
    let mut broker = wd.spawn(&cfg, Wid::Worker(0));
    let events = Events::new(cfg.options()).unwrap();
    let mut w = events.init_worker(Wid::Worker(1)).unwrap();
    assert!(w.wait_ready(Duration::from_secs(10)).unwrap());
    assert_eq!(w.transport(), Transport::Socket);
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let s = seen.clone();
    w.subscribe("h", "*", move |ev| s.lock().unwrap().push(ev.deserialize::<u64>().unwrap()));
    let inputs: [&[u8]; 3] = [
        b"\xff\xff\xff\xff\x01garbage", // length far over the limit
        b"\x00\x00\x00\x00",            // empty frame
        b"\x05\x00\x00\x00\x06abcd",    // an EVENT before any HELLO
    ];
    for bytes in inputs {
        let mut raw = UnixStream::connect(dir.sock()).unwrap();
        raw.write_all(bytes).unwrap();
        expect_closed(&mut raw, &format!("{bytes:?}"));
    }
    // A truncated frame (16 bytes announced, an EVENT before any HELLO, 5 sent): the broker
    // keeps the part that arrived and waits for the rest, without closing...
    const TRUNCATED: &[u8] = b"\x10\x00\x00\x00\x06half";
    let mut pending = UnixStream::connect(dir.sock()).unwrap();
    pending.write_all(TRUNCATED).unwrap();
    pending.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut b = [0u8; 64];
    match std::io::Read::read(&mut pending, &mut b) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("a connection in the middle of a frame was answered or closed: {other:?}"),
    }
    // ...and a peer that hangs up in the middle of a frame has its connection closed.
    let mut cut = UnixStream::connect(dir.sock()).unwrap();
    cut.write_all(TRUNCATED).unwrap();
    cut.shutdown(std::net::Shutdown::Write).unwrap();
    expect_closed(&mut cut, "a frame cut by a hang-up");
    // Everything still works both ways.
    let r = broker.publish(Tgt::All, "h", "from-broker", 0, 5);
    assert_eq!((r.ok, r.err), (5, 0));
    w.publish(Target::All, "h", "from-w1", &7u64).unwrap();
    let deadline = Instant::now() + TEST_TIMEOUT;
    let s = seen.clone();
    pump_until(&mut w, deadline, || s.lock().unwrap().len() >= 6);
    let got = seen.lock().unwrap().clone();
    let from_broker: Vec<u64> = got.iter().copied().filter(|&x| x != 7).collect();
    assert_eq!(from_broker, vec![0, 1, 2, 3, 4], "the broker's events, in order: {got:?}");
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 1, 2, 3, 4, 7]);
    broker.until(6);
    assert_eq!(broker.report().stream("w1", "h", "from-w1"), vec![7]);
    assert_eq!(w.stats().dropped, 0);
    // Completing the pending frame makes it an EVENT before any HELLO: that connection
    // (and only that one) is closed.
    pending.write_all(&[0u8; 11]).unwrap();
    expect_closed(&mut pending, "a truncated frame, completed");
    w.publish(Target::All, "h", "after", &8u64).unwrap();
    assert!(w.flush(), "the event did not go out");
    broker.until(7);
    assert_eq!(broker.report().stream("w1", "h", "after"), vec![8]);
}

/// The broker closes `raw`: a read returns 0 (or a reset) within 10 s, never times out.
fn expect_closed(raw: &mut UnixStream, what: &str) {
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    match std::io::Read::read(raw, &mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("connection with {what} not closed: {other:?}"),
    }
}

/// As above with two receivers, one of them stopped across the failover: whichever worker
/// becomes the new broker hands over what it queued while the old broker was stopped, and
/// the receiver that reconnects 300 ms later loses none of it (a slot without a connection
/// holds the new broker's publishers back for up to a second, as a reconnecting live worker
/// is expected). Received + reported lost = published at each receiver.
#[test]
fn a_backlog_handed_over_after_failover_reaches_receivers_still_reconnecting() {
    const N: u64 = 30_000;
    for round in 0..3 {
        let dir = TempDir::new("handover");
        let wd = Watchdog::new("handover");
        let mut cfg = Cfg::new(&dir.sock(), 4);
        cfg.transport = Transport::Socket;
        cfg.max_queue_len = Some(100_000);
        let broker = wd.spawn(&cfg, Wid::Worker(0));
        let mut publisher = wd.spawn(&cfg, Wid::Worker(1));
        let mut receivers = [wd.spawn(&cfg, Wid::Worker(2)), wd.spawn(&cfg, Wid::Worker(3))];
        publisher.publish(Tgt::All, "seq", "kept", 0, 1);
        for r in &mut receivers {
            r.until(1);
        }
        broker.stop();
        let r = publisher.publish(Tgt::All, "seq", "kept", 1, N - 1);
        assert_eq!((r.ok, r.err), (N - 1, 0), "{:?}", r.errors);
        let queued: u64 = publisher.report().stats.get("peer_depth_sum").copied().unwrap_or(0);
        // w3 is stopped across the failover: it reconnects 300 ms after the new broker
        // started serving, while the backlog is handed over.
        receivers[1].signal(libc::SIGSTOP);
        broker.kill();
        publisher.publish(Tgt::All, "seq", "marker", 0, 1);
        std::thread::sleep(Duration::from_millis(300));
        receivers[1].signal(libc::SIGCONT);
        for (i, receiver) in receivers.iter_mut().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(30);
            let (got, r) = loop {
                let r = receiver.report();
                if r.stream("w1", "seq", "marker") == vec![0] {
                    break (r.stream("w1", "seq", "kept"), r);
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}, receiver {i}: the marker never arrived: {:?}",
                    r.lost
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            let ctx = format!("round {round}, receiver w{}", i + 2);
            assert!(got.windows(2).all(|w| w[0] < w[1]), "{ctx}: {}", diff_summary(&got, &seq(0, N)));
            let tail = seq(N - queued, queued);
            assert!(got.ends_with(&tail), "{ctx}: the {queued} queued events: {}", diff_summary(&got, &seq(0, N)));
            let lost: u64 = r.lost.iter().filter(|(p, _)| p == "w1").map(|(_, c)| c).sum();
            assert_eq!(got.len() as u64 + lost, N, "{ctx}: received {} + lost {lost} != published {N}", got.len());
        }
    }
}
