//! The socket transport and the control channel under bursts and hostile clients (issue 11,
//! items 15, 17 and 20): flow control instead of loss for live receivers, bounded
//! connections (a cap, a HELLO timeout), and descriptors passed where none belong. Each test
//! drives real processes (children of this binary) and raw clients played by the test.

#[macro_use]
mod support;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::sockclient::*;
use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// A socket-transport deployment of `workers` workers.
fn socket_cfg(dir: &TempDir, workers: u32) -> Cfg {
    let mut cfg = Cfg::new(&dir.sock(), workers);
    cfg.transport = Transport::Socket;
    cfg
}

/// Item 20. Two publishers burst 20,000 events each at once with `max_queue_len` 1,000 while
/// the broker and the other workers keep dispatching, four rounds in a row. Every publish
/// either succeeded and was delivered to every worker, in order, once, or returned the
/// queue-overflow error: no worker that keeps dispatching loses anything (no lost notice),
/// the broker holds publishers back instead of dropping for its receivers.
#[test]
fn a_burst_makes_publish_fail_and_live_receivers_lose_nothing() {
    const N: u64 = 20_000;
    const ROUNDS: u64 = 4;
    let dir = TempDir::new("burst");
    let wd = Watchdog::new("burst");
    let mut cfg = socket_cfg(&dir, 4);
    cfg.max_queue_len = Some(1_000);
    let mut ws: Vec<Child> = (0..4).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let mut expect = 0;
    let mut failures = Vec::new();
    // Lost notices each worker had before the round.
    let mut notices = [0usize; 4];
    for round in 0..ROUNDS {
        let ev = format!("r{round}");
        ws[1].send(Cmd::publish(Tgt::All, "seq", &ev, 0, N));
        ws[2].send(Cmd::publish(Tgt::All, "seq", &ev, 0, N));
        let mut ok = [0u64; 2];
        for (k, p) in [1usize, 2].into_iter().enumerate() {
            let r = ws[p].publish_end();
            assert_eq!(r.ok + r.err, N, "w{p}");
            for e in &r.errors {
                assert_eq!(e, "failed to publish event: queue overflow", "w{p}");
            }
            ok[k] = r.ok;
        }
        expect += ok[0] + ok[1];
        for (i, w) in ws.iter_mut().enumerate() {
            w.until(expect);
            let r = w.report();
            for (k, p) in ["w1", "w2"].into_iter().enumerate() {
                let got = r.stream(p, "seq", &ev);
                if !got.windows(2).all(|x| x[0] < x[1]) {
                    failures.push(format!("round {round}: w{i} got {p}'s events out of order or twice"));
                }
                if got.len() as u64 != ok[k] {
                    failures.push(format!(
                        "round {round}: w{i} received {} of {p}'s {} published events (publish errors {})",
                        got.len(),
                        ok[k],
                        N - ok[k]
                    ));
                }
            }
            let fresh = &r.lost[notices[i]..];
            if !fresh.is_empty() {
                let lost: u64 = fresh.iter().map(|(_, c)| c).sum();
                failures.push(format!("round {round}: w{i} got lost notices for {lost} events: {fresh:?}"));
            }
            notices[i] = r.lost.len();
        }
        eprintln!("round {round}: published ok {ok:?} of {N} each");
    }
    assert!(failures.is_empty(), "{} failures in {ROUNDS} rounds:\n{}", failures.len(), failures.join("\n"));
}

/// Item 15. A client that connects and never sends a complete HELLO (nothing at all, or
/// half a frame) is disconnected after the attach timeout (2 s), while a worker that
/// connects meanwhile attaches at once and the broker keeps serving.
#[test]
fn a_client_that_never_says_hello_is_disconnected_while_workers_attach() {
    let dir = TempDir::new("nohello");
    let wd = Watchdog::new("nohello");
    let cfg = socket_cfg(&dir, 2);
    let mut broker = wd.spawn(&cfg, Wid::Worker(0));
    let start = Instant::now();
    let mut silent = UnixStream::connect(dir.sock()).unwrap();
    let mut half = UnixStream::connect(dir.sock()).unwrap();
    half.write_all(&hello_frame(&Hello::for_cfg(&cfg, 1))[..20]).unwrap();
    // A worker attaches meanwhile, and events flow.
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    assert!(start.elapsed() < Duration::from_millis(1500), "the worker took {:?} to attach", start.elapsed());
    let r = w1.publish(Tgt::All, "h", "x", 0, 10);
    assert_eq!((r.ok, r.err), (10, 0));
    broker.until(10);
    for (what, s) in [("a silent connection", &mut silent), ("half a HELLO", &mut half)] {
        assert!(closed_within(s, Duration::from_secs(8)), "{what} was not closed within 8 s");
        let t = start.elapsed();
        assert!(t >= Duration::from_millis(1500), "{what} closed after {t:?}: before the attach timeout");
    }
    assert_eq!(broker.report().stream("w1", "h", "x"), seq(0, 10));
}

/// Item 15. Beyond 64 connections not attached, a new connection must bring its HELLO in
/// its first read or is closed at once: 200 idle connections do not keep a real worker
/// out, and all but the first 64 are refused long before the attach timeout.
#[test]
fn connections_over_the_cap_are_refused_while_workers_attach() {
    const IDLE: usize = 200;
    let dir = TempDir::new("conncap");
    let wd = Watchdog::new("conncap");
    let cfg = socket_cfg(&dir, 3);
    let mut broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut idle: Vec<UnixStream> = (0..IDLE).map(|_| UnixStream::connect(dir.sock()).unwrap()).collect();
    let start = Instant::now();
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    let r = w1.publish(Tgt::All, "c", "x", 0, 5);
    assert_eq!((r.ok, r.err), (5, 0));
    w2.until(5);
    broker.until(5);
    // Every connection over the cap was closed when it was accepted (before the workers
    // connected), long before the attach timeout (2 s) closes the others.
    let mut refused = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(1)) {
            refused += 1;
        }
    }
    let t = start.elapsed();
    assert!(refused >= IDLE - 64, "only {refused} of {IDLE} idle connections refused (cap 64) after {t:?}");
    // And the ones under the cap at the attach timeout.
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(8)), "idle connection {i} still open after the timeout");
    }
    assert_eq!(w2.report().stream("w1", "c", "x"), seq(0, 5));
}

/// Item 17. A client that passes descriptors to the broker (with its HELLO, or with
/// garbage; in one control message or two) is refused: the broker closes the connection
/// without a WELCOME and closes every descriptor (its buffer has room for one, the rest is
/// truncated away), so its descriptor count does not grow, and it keeps serving.
#[test]
fn descriptors_passed_to_the_broker_are_closed() {
    let dir = TempDir::new("brokerfds");
    let wd = Watchdog::new("brokerfds");
    let cfg = socket_cfg(&dir, 3);
    let mut broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let before = fd_count(broker.pid());
    let spare = spare_fds(253);
    let raw: Vec<i32> = spare.iter().map(|f| f.as_raw_fd()).collect();
    let hello = hello_frame(&Hello::for_cfg(&cfg, 2));
    let garbage = b"\x05\x00\x00\x00\x06abcd";
    for round in 0..10 {
        for (what, bytes, n, groups) in
            [("HELLO", &hello[..], 253, 1), ("HELLO", &hello[..], 240, 2), ("garbage", &garbage[..], 1, 1)]
        {
            let mut s = UnixStream::connect(dir.sock()).unwrap();
            send_fds(&s, bytes, &raw[..n], groups).unwrap();
            let reply = support::raw::read_reply(&mut s);
            assert_eq!(reply, Reply::Closed, "round {round}: a {what} with {n} descriptors in {groups} message(s)");
        }
    }
    // The broker still serves: a worker attaches and events flow.
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    let r = w1.publish(Tgt::All, "f", "x", 0, 5);
    assert_eq!((r.ok, r.err), (5, 0));
    w2.until(5);
    broker.until(5);
    let after = fd_count(broker.pid());
    assert!(after <= before + 4, "the broker's descriptors grew from {before} to {after}");
}

/// Item 17. A worker keeps no descriptor its broker passes after the WELCOME: the test
/// plays the broker, welcomes a socket worker, then passes 200 descriptors with a frame,
/// ten times; the worker's descriptor count does not grow.
#[test]
fn descriptors_passed_after_welcome_are_closed_by_the_worker() {
    let dir = TempDir::new("clientfds");
    let wd = Watchdog::new("clientfds");
    let cfg = socket_cfg(&dir, 2);
    let streams = fake_broker(&dir.sock());
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let s = streams.recv_timeout(Duration::from_secs(10)).expect("the worker connected");
    let before = fd_count(w1.pid());
    let spare = spare_fds(200);
    let raw: Vec<i32> = spare.iter().map(|f| f.as_raw_fd()).collect();
    let mut lost = 0u32.to_le_bytes().to_vec();
    lost.extend_from_slice(&0u64.to_le_bytes());
    for _ in 0..10 {
        if send_fds(&s, &frame(KIND_LOST, &lost), &raw, 1).is_err() {
            break; // the worker hung up on us: fine
        }
    }
    // The worker reads them while it dispatches.
    w1.cmd(Cmd::Pump { ms: 300 });
    let after = fd_count(w1.pid());
    assert!(after <= before + 4, "the worker's descriptors grew from {before} to {after}");
}

/// Item 15. The broker keeps the queue of a slot that has no connection (dead, or never
/// started) for 10 s at most: then its events are dropped and counted, and the slot's
/// next holder gets a lost notice for them instead of a queue the broker held meanwhile.
#[test]
fn the_queue_of_a_slot_without_a_connection_is_dropped_with_a_lost_notice() {
    const N: u64 = 100;
    let dir = TempDir::new("deadq");
    let wd = Watchdog::new("deadq");
    let cfg = socket_cfg(&dir, 3);
    let mut broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let r = w1.publish(Tgt::All, "d", "early", 0, N);
    assert_eq!((r.ok, r.err), (N, 0));
    broker.until(N);
    let queued = broker.report().stat("peer_depth_sum");
    assert_eq!(queued, N, "the never-started slot 2's queue holds the events at first");
    let start = Instant::now();
    let r = loop {
        broker.cmd(Cmd::Pump { ms: 250 });
        let r = broker.report();
        if r.stat("peer_depth_sum") == 0 || start.elapsed() > Duration::from_secs(25) {
            break r;
        }
    };
    assert_eq!(r.stat("peer_depth_sum"), 0, "slot 2's queue still held after {:?}", start.elapsed());
    assert!(start.elapsed() >= Duration::from_secs(8), "dropped after only {:?}", start.elapsed());
    assert_eq!(r.stat("lost_outbound"), N, "each dropped event counted");
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    let r = w1.publish(Tgt::All, "d", "late", 0, 1);
    assert_eq!((r.ok, r.err), (1, 0));
    w2.until(N + 1);
    let r = w2.report();
    assert_eq!(r.lost, vec![("w1".to_string(), N)], "one notice for the dropped events");
    assert_eq!(r.stream("w1", "d", "early"), Vec::<u64>::new());
    assert_eq!(r.stream("w1", "d", "late"), vec![0]);
}

/// Item 17. A worker holds no more descriptors than a WELCOME carries while it waits for
/// one: the test plays a broker that passes 200 descriptors with each of the first bytes
/// of its WELCOME; the worker drops the connection (closing them) instead of collecting
/// them, and its descriptor count does not grow.
#[test]
fn descriptors_flooded_before_welcome_are_closed_by_the_worker() {
    let dir = TempDir::new("prewelcome");
    let cfg = socket_cfg(&dir, 2);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // Opened here, so that the count below includes them.
    let spare = spare_fds(200);
    let _streams = fake_broker_with(&dir.sock(), move |s| {
        let raw: Vec<i32> = spare.iter().map(|f| f.as_raw_fd()).collect();
        let welcome = socket_welcome();
        for b in &welcome[..10] {
            if send_fds(s, std::slice::from_ref(b), &raw, 1).is_err() {
                break; // the worker hung up on us
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = tx.send(());
    });
    // The worker never gets ready (no WELCOME completes), so it runs in this process, which
    // plays the broker too: its descriptor count is the worker's plus the fake broker's.
    let events = worker_events::Events::new(cfg.options()).unwrap();
    let before = fd_count(std::process::id());
    let mut w = events.init_worker(Wid::Worker(1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut most = 0;
    while rx.try_recv().is_err() && Instant::now() < deadline {
        w.wait(Some(Duration::from_millis(5))).unwrap_or(0);
        most = most.max(fd_count(std::process::id()));
    }
    assert!(most < before + 50, "the worker held up to {} descriptors more", most - before);
}

/// Read exactly `n` bytes from a blocking stream (at most 20 s).
fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("the worker's bytes");
    b
}

/// Parse whole frames `(kind, body)` off the front of `bytes`; the rest stays.
fn split_frames(bytes: &mut Vec<u8>) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(len) = bytes.get(..4).map(|l| u32::from_le_bytes(l.try_into().unwrap()) as usize) {
        if len == 0 || bytes.len() < 4 + len {
            break;
        }
        let f: Vec<u8> = bytes.drain(..4 + len).collect();
        out.push((f[4], f[5..].to_vec()));
    }
    out
}

/// Framing (soak, silent loss): a control frame (a UNIQUE event) that a worker queues while
/// its socket took only part of a big EVENT frame goes out after that frame, never inside
/// it. The test plays the broker: it reads 64 KiB of a 2 MiB event (the socket then has
/// room while the frame is half written), the worker publishes a unique event, and the
/// stream must parse as the whole EVENT frame (its data intact) followed by the UNIQUE frame.
/// A UNIQUE frame inside the EVENT frame made the broker relay a corrupt event that still
/// decoded (same length, garbled names: delivered to no callback, no gap, no notice) and then
/// drop the connection on the garbage after it (the events in flight became a gap one short).
#[test]
fn a_control_frame_never_lands_inside_a_half_written_event_frame() {
    const BIG: usize = 2 << 20;
    const EVENT: u8 = 6;
    const UNIQUE: u8 = 4;
    let dir = TempDir::new("midframe");
    let wd = Watchdog::new("midframe");
    let mut cfg = socket_cfg(&dir, 2);
    cfg.max_payload_len = Some(4 << 20);
    let streams = fake_broker(&dir.sock());
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let mut s = streams.recv_timeout(Duration::from_secs(10)).expect("the worker connected");
    w1.cmd(Cmd::Pause); // no dispatch between commands: nothing writes but the commands
    let r = w1.cmd(Cmd::Bytes { target: Tgt::All, src: "m".into(), ev: "big".into(), len: BIG });
    assert_eq!(r, vec!["@@PUB 1 0".to_string()], "{r:?}");
    // The socket took only part of the frame; take 64 KiB out so it has room again.
    let mut got = read_n(&mut s, 64 << 10);
    let r = w1.publish(Tgt::unique("h"), "m", "u", 7, 1);
    assert_eq!((r.ok, r.err), (1, 0));
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut frames = Vec::new();
        let mut b = vec![0u8; 64 << 10];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while frames.len() < 2 {
            match s.read(&mut b) {
                Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
                _ => break, // a hang-up, or nothing more for 5 s
            }
            frames.extend(split_frames(&mut got));
        }
        (frames, got.len())
    });
    w1.cmd(Cmd::Resume);
    let (frames, left) = reader.join().expect("the reader");
    let kinds: Vec<u8> = frames.iter().map(|(k, _)| *k).collect();
    let lens: Vec<usize> = frames.iter().map(|(_, b)| b.len()).collect();
    assert_eq!(kinds.len(), 2, "frames parsed: kinds {kinds:?}, body lengths {lens:?}, {left} bytes left unparsed");
    assert_eq!(kinds.first(), Some(&EVENT), "kinds {kinds:?}");
    let (_, body) = &frames[0];
    // stamp (16 bytes), message header (16 bytes: data_len u32 ...), data, names.
    let data_len = u32::from_le_bytes(body[16..20].try_into().unwrap()) as usize;
    assert_eq!(data_len, BIG);
    let data = &body[32..32 + BIG];
    assert!(check_pattern(data), "the EVENT frame's data is not what was published (another frame inside it?)");
    assert_eq!(&body[32 + BIG..], b"mbig", "the event's names");
    assert_eq!(kinds.get(1), Some(&UNIQUE), "kinds {kinds:?}");
}

/// Unique accounting (soak): a unique event the broker routes to a worker whose queue is
/// full (a stopped receiver the broker passes over) is handed to another live worker (the
/// broker itself), not dropped; and it is never counted in a lost notice, which counts the
/// publisher's `All` events: a unique drop reported as one lost `All` event made the
/// receiver over-count its losses and then swallow one event of a later real gap (credit).
#[test]
fn a_unique_event_for_a_full_queue_is_delivered_elsewhere_and_not_counted_lost() {
    const U: u64 = 20;
    let dir = TempDir::new("uniqfull");
    let wd = Watchdog::new("uniqfull");
    let cfg = socket_cfg(&dir, 3);
    let mut ws: Vec<Child> = (0..3).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    ws[1].signal(libc::SIGSTOP);
    // Past the stall time the broker passes w1 over; w1's queue then fills and drops.
    let mut all = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let r = ws[2].publish(Tgt::All, "a", "x", all, 20_000);
        all += r.ok;
        if r.err == 0 && start.elapsed() > Duration::from_millis(1500) && all > 100_000 {
            break;
        }
    }
    let r = ws[2].cmd(Cmd::Uniq { src: "u".into(), ev: "x".into(), prefix: "h".into(), start: 0, count: U });
    assert!(r.iter().any(|l| l == &format!("@@PUB {U} 0")), "{r:?}");
    ws[1].signal(libc::SIGCONT);
    ws[2].cmd(Cmd::Pump { ms: 300 });
    let mut uniques = 0;
    let mut failures = Vec::new();
    for (i, w) in ws.iter_mut().enumerate() {
        w.cmd(Cmd::Pump { ms: 2000 });
        let r = w.report();
        uniques += r.stream("w2", "u", "x").len() as u64;
        if i == 2 {
            continue;
        }
        let got = r.stream("w2", "a", "x").len() as u64;
        let lost: u64 = r.lost.iter().filter(|(p, _)| p == "w2").map(|(_, c)| c).sum();
        if got + lost != all {
            failures.push(format!("w{i}: received {got} + reported lost {lost} != published {all}"));
        }
    }
    assert_eq!(uniques, U, "unique events delivered (each once, somewhere); {failures:?}");
    assert!(failures.is_empty(), "{failures:?}");
}
