//! Liveness and "never silent" under hostile or unlucky peers, on the control channel and the
//! socket transport (issue 11, items 8, 11, 12, 13 and 16): frames that arrive with a
//! hang-up, a publisher restart whose first events died, a broker that cannot serve, options
//! that differ, two HELLOs for one slot in one broker poll, and peer-supplied counts of
//! `u64::MAX`. Each test drives real processes (children of this binary, raw sockets, or a
//! fake broker played by the test itself).

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::raw::{KIND_HELLO, read_reply};
use support::*;
use worker_events::{Error, Events, Options, Transport, Wid};

child_entry!();

const KIND_EVENT: u8 = 6;
const KIND_DELIVER: u8 = 7;
const KIND_LOST: u8 = 8;

/// One frame: `len u32 LE`, kind, body.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = ((1 + body.len()) as u32).to_le_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(body);
    v
}

/// Read one frame (kind, body) from a blocking stream; `None` at EOF.
fn read_frame(s: &mut UnixStream) -> Option<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut f = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut f).ok()?;
    let body = f.split_off(1);
    Some((f[0], body))
}

/// A socket-transport WELCOME (this build's protocol, no descriptors) from broker slot 0.
fn socket_welcome() -> Vec<u8> {
    let mut b = protocol_version().to_le_bytes().to_vec();
    b.extend_from_slice(&1u32.to_le_bytes()); // flavor: socket
    b.extend_from_slice(&0u32.to_le_bytes()); // broker slot
    b.extend_from_slice(&1u64.to_le_bytes()); // epoch
    b.extend_from_slice(&0x5eed_u64.to_le_bytes()); // broker id
    b.extend_from_slice(&0u32.to_le_bytes()); // descriptors
    frame(KIND_WELCOME, &b)
}

/// The test plays the broker of a socket deployment at `dir`: it welcomes one worker and
/// hands every frame the worker sends to the returned channel; the stream is kept for
/// writing (a clone).
fn fake_broker(dir: &TempDir) -> (mpsc::Receiver<(u8, Vec<u8>)>, mpsc::Receiver<UnixStream>) {
    let listener = UnixListener::bind(dir.sock()).unwrap();
    let (tx, rx) = mpsc::channel();
    let (stx, srx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (k, _) = read_frame(&mut s).expect("a HELLO");
        assert_eq!(k, KIND_HELLO);
        s.write_all(&socket_welcome()).unwrap();
        stx.send(s.try_clone().unwrap()).unwrap();
        while let Some(f) = read_frame(&mut s) {
            if tx.send(f).is_err() {
                break;
            }
        }
    });
    (rx, srx)
}

/// Item 8a. A publisher whose last frames reach the broker in the same read as its hang-up
/// (exactly 64 KiB of EVENT frames, then EOF, while the broker was stopped) has them
/// delivered, not thrown away with the connection. The 64 KiB EVENT frame is one a real
/// worker wrote (captured by a fake broker, its size tuned through the payload length).
#[test]
fn frames_that_arrive_with_the_hang_up_are_delivered() {
    const CHUNK: usize = 64 * 1024;
    let wd = Watchdog::new("eof-frames");
    // 1. Capture a real EVENT frame of slot 2 of exactly CHUNK bytes.
    let fake_dir = TempDir::new("eof-fake");
    let mut fake_cfg = Cfg::new(&fake_dir.sock(), 3);
    fake_cfg.transport = Transport::Socket;
    let (frames, _stream) = fake_broker(&fake_dir);
    let mut publisher = wd.spawn(&fake_cfg, Wid::Worker(2));
    let mut len = 60_000;
    let mut captured = None;
    for _ in 0..4 {
        let r = PubResult::parse(&publisher.cmd(Cmd::bytes(Tgt::All, "size", "x", len)));
        assert_eq!((r.ok, r.err), (1, 0));
        let (k, body) = frames.recv_timeout(Duration::from_secs(10)).expect("the EVENT frame");
        assert_eq!(k, KIND_EVENT);
        let size = 5 + body.len();
        if size == CHUNK {
            captured = Some((len, body));
            break;
        }
        len = len + CHUNK - size;
    }
    let (len, body) = captured.expect("no payload length gives a 64 KiB EVENT frame");
    publisher.kill();
    // 2. The real deployment: the broker, a receiver, and slot 2 played by a raw client.
    let dir = TempDir::new("eof");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.transport = Transport::Socket;
    let broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
    let mut raw = UnixStream::connect(dir.sock()).unwrap();
    raw.write_all(&hello_frame(&Hello::for_cfg(&cfg, 2))).unwrap();
    match read_reply(&mut raw) {
        Reply::Frame(KIND_WELCOME, _) => {}
        other => panic!("slot 2 not welcomed: {other:?}"),
    }
    broker.signal(libc::SIGSTOP);
    let bytes = frame(KIND_EVENT, &body);
    assert_eq!(bytes.len(), CHUNK);
    raw.write_all(&bytes).unwrap();
    drop(raw); // the hang-up lands right behind the frame
    broker.signal(libc::SIGCONT);
    assert!(
        receiver.until_within(1, Duration::from_secs(10)),
        "the event that came with the hang-up was thrown away: {:?}",
        receiver.report().stats
    );
    let r = receiver.report();
    assert_eq!(r.payloads.iter().filter(|(p, l, ok)| p == "w2" && *l == len && *ok).count(), 1, "{:?}", r.payloads);
    assert_eq!(r.stat("lost"), 0);
}

/// Item 8c. A publisher that restarts, and whose first events die in a broker killed while
/// stopped, starts its new incarnation above 0 at the receiver: the receiver, which saw the
/// previous incarnation, reports the events before it as lost. Received + lost = published.
#[test]
fn a_restarted_publisher_whose_first_events_died_is_reported_lost() {
    const N: u64 = 30_000;
    let dir = TempDir::new("restart-gap");
    let wd = Watchdog::new("restart-gap");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.transport = Transport::Socket;
    cfg.max_queue_len = Some(100_000);
    let broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
    // The receiver knows the publisher's first incarnation.
    let mut first = wd.spawn(&cfg, Wid::Worker(2));
    first.publish(Tgt::All, "old", "x", 0, 1);
    receiver.until(1);
    first.kill();
    // Its successor's first events go into the stopped broker's socket, and die with it.
    let mut second = wd.spawn(&cfg, Wid::Worker(2));
    // Stopped for sure before the publish (`Child::stop`): a broker still running for a
    // moment forwarded the first events (seen under load, about 1 run in 100: the first 278
    // delivered, the next 349 dead in its socket). The premise is a broker that reads none.
    broker.stop();
    let r = second.publish(Tgt::All, "new", "x", 0, N);
    assert_eq!((r.ok, r.err), (N, 0), "{:?}", r.errors);
    let queued: u64 = second.report().stats.get("peer_depth_sum").copied().unwrap_or(0);
    assert!(queued > 0 && queued < N, "some events queued in the publisher, some in the broker: {queued}");
    broker.kill();
    second.publish(Tgt::All, "new", "marker", 0, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (got, r) = loop {
        let r = receiver.report();
        if r.stream("w2", "new", "marker") == vec![0] {
            break (r.stream("w2", "new", "x"), r);
        }
        assert!(Instant::now() < deadline, "the marker never arrived: {:?}", r.stats);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, nothing twice: {}", diff_summary(&got, &seq(0, N)));
    let lost: u64 = r.lost.iter().filter(|(p, _)| p == "w2").map(|(_, c)| c).sum();
    assert!(
        got.first().is_some_and(|&f| f > 0),
        "the new incarnation's first events died with the broker: received {} (first {:?}), lost {lost}, \
         queued in the publisher {queued}; receiver {:?}",
        got.len(),
        got.first(),
        r.stats
    );
    assert_eq!(got.len() as u64 + lost, N, "received {} + lost {lost} != published {N}", got.len());
}

/// Is lock-file byte `byte` of `<sock>.lock` held by anyone (probed through a description of
/// our own, `F_OFD_GETLK`)?
fn lock_byte_held(sock: &std::path::Path, byte: i64) -> bool {
    let mut p = sock.as_os_str().to_owned();
    p.push(".lock");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
    // SAFETY: a zeroed flock is a valid value; F_OFD_GETLK fills it in on a valid fd.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: valid fd and a pointer to a live flock.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// Item 11. A worker that wins the election but cannot serve (something that is not a
/// socket sits at the socket path) releases the broker lock, backs off, and reports the
/// error once; once the path is free it (or another worker) serves and everybody attaches.
#[test]
fn a_broker_that_cannot_serve_releases_the_lock_and_reports_once() {
    let dir = TempDir::new("serve-fails");
    let wd = Watchdog::new("serve-fails");
    let mut cfg = Cfg::new(&dir.sock(), 2);
    cfg.transport = Transport::Socket;
    std::fs::write(dir.sock(), b"not a socket").unwrap();
    let events = Events::new(cfg.options()).unwrap();
    // Worker 1 (not the preferred broker) runs for election once the grace is over.
    let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
    let (mut errors, mut held, mut probes) = (0, 0, 0);
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        match w1.wait(Some(Duration::from_millis(10))) {
            Ok(_) => {}
            Err(e) => {
                assert!(e.to_string().contains("listening on the control socket"), "{e}");
                errors += 1;
            }
        }
        probes += 1;
        held += u32::from(lock_byte_held(&dir.sock(), 0));
    }
    assert!(!w1.is_ready());
    assert_eq!(errors, 1, "the failure to serve is reported once, not on every attempt");
    assert_eq!(held, 0, "the broker lock was kept by a worker that cannot serve ({held} of {probes} probes)");
    // The path is freed: a broker starts (the preferred worker 0, or worker 1 after its
    // back-off) and both attach.
    std::fs::remove_file(dir.sock()).unwrap();
    let w0 = std::thread::scope(|s| {
        let h = s.spawn(|| wd.spawn(&cfg, Wid::Worker(0)));
        while !h.is_finished() {
            w1.wait(Some(Duration::from_millis(5))).unwrap();
        }
        h.join().unwrap()
    });
    assert!(w1.wait_ready(Duration::from_secs(10)).unwrap());
    drop(w0);
}

/// A change of the options.
type Change = Box<dyn Fn(Options) -> Options>;

/// Item 12. A worker whose options differ from the broker's in anything that must match is
/// refused at attach with an error that names the option, on both transports.
#[test]
fn differing_options_are_refused_naming_the_option() {
    for transport in [Transport::SharedMemory, Transport::Socket] {
        let dir = TempDir::new("terms");
        let wd = Watchdog::new("terms");
        let mut cfg = Cfg::new(&dir.sock(), 3);
        cfg.transport = transport;
        let _broker = wd.spawn(&cfg, Wid::Worker(0));
        let other = if transport == Transport::Socket { Transport::SharedMemory } else { Transport::Socket };
        let cases: [(&str, Change); 5] = [
            ("unique_capacity", Box::new(|o| o.unique_capacity(1024))),
            ("max_payload_len", Box::new(|o| o.max_payload_len(1024))),
            ("unique_timeout", Box::new(|o| o.unique_timeout(Duration::from_millis(1234)))),
            ("ring_capacity", Box::new(|o| o.ring_capacity(1 << 20))),
            ("transport", Box::new(move |o| o.transport(other))),
        ];
        for (name, change) in &cases {
            let events = Events::new(change(cfg.options())).unwrap();
            // The refusal comes from `init_worker` when the broker answers its first poll,
            // or later from `wait_ready`.
            let refused = events.init_worker(Wid::Worker(1)).and_then(|mut w| {
                let ready = w.wait_ready(Duration::from_secs(10));
                assert!(!w.is_ready());
                ready
            });
            match refused {
                Err(Error::AttachRefused(reason)) => {
                    assert!(
                        reason.contains(&format!("options differ from the broker's: {name} ")),
                        "{transport:?}, {name}: {reason}"
                    );
                }
                other => panic!("{transport:?}: a worker with another {name} was not refused: {other:?}"),
            }
        }
        // The same options are welcomed.
        let events = Events::new(cfg.options()).unwrap();
        let mut w = events.init_worker(Wid::Worker(1)).unwrap();
        assert!(w.wait_ready(Duration::from_secs(10)).unwrap(), "{transport:?}");
    }
}

/// Item 13. Two HELLOs for one slot that the broker reads in the same poll (it was stopped
/// while both connected): one is welcomed, the other refused as busy.
#[test]
fn two_hellos_for_one_slot_in_one_poll_welcome_only_one() {
    for transport in [Transport::SharedMemory, Transport::Socket] {
        let dir = TempDir::new("two-hellos");
        let wd = Watchdog::new("two-hellos");
        let mut cfg = Cfg::new(&dir.sock(), 3);
        cfg.transport = transport;
        let broker = wd.spawn(&cfg, Wid::Worker(0));
        let hello = hello_frame(&Hello::for_cfg(&cfg, 2));
        broker.signal(libc::SIGSTOP);
        let mut a = UnixStream::connect(dir.sock()).unwrap();
        let mut b = UnixStream::connect(dir.sock()).unwrap();
        a.write_all(&hello).unwrap();
        b.write_all(&hello).unwrap();
        broker.signal(libc::SIGCONT);
        let replies = [read_reply(&mut a), read_reply(&mut b)];
        let welcomed = replies.iter().filter(|r| matches!(r, Reply::Frame(KIND_WELCOME, _))).count();
        let busy =
            replies.iter().filter(|r| matches!(r, Reply::Frame(KIND_REJECT, m) if m.starts_with("busy: "))).count();
        assert_eq!((welcomed, busy), (1, 1), "{transport:?}: {replies:?}");
    }
}

/// Item 16. Peer-supplied counts of `u64::MAX` (lost notices, sequence numbers) do not make a
/// worker panic (overflow checks are on in test builds): the test plays the broker and
/// sends them; the worker keeps running and answers.
#[test]
fn counts_of_u64_max_from_a_peer_do_not_panic() {
    let wd = Watchdog::new("u64max");
    let dir = TempDir::new("u64max");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.transport = Transport::Socket;
    let (_frames, streams) = fake_broker(&dir);
    let mut w = wd.spawn(&cfg, Wid::Worker(1));
    let mut s = streams.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut lost = 2u32.to_le_bytes().to_vec();
    lost.extend_from_slice(&u64::MAX.to_le_bytes());
    for _ in 0..3 {
        s.write_all(&frame(KIND_LOST, &lost)).unwrap();
    }
    // A DELIVER whose stamp says sequence u64::MAX - 1 of a new incarnation (the message
    // itself is garbage: dropped, counted).
    let mut deliver = 7u64.to_le_bytes().to_vec();
    deliver.extend_from_slice(&(u64::MAX - 1).to_le_bytes());
    deliver.extend_from_slice(&[0u8; 64]);
    s.write_all(&frame(KIND_DELIVER, &deliver)).unwrap();
    w.cmd(Cmd::Pump { ms: 200 });
    let r = w.report();
    assert_eq!(r.stat("lost"), u64::MAX, "saturated, not wrapped");
    assert!(r.stat("dropped") >= 1);
}
