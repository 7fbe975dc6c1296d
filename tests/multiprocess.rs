//! Multi-process integration tests: real worker processes (this test binary re-executed in
//! a child role, see `tests/support/`), a real broker, shared-memory rings.

#[macro_use]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use worker_events::{Error, Events, MAX_UNIQUE_HASH_LEN, Options, PublishError, Target, Transport, Wid, Worker};

child_entry!();

fn key(w: &str, s: &str, e: &str) -> (String, String, String) {
    (w.to_string(), s.to_string(), e.to_string())
}

// 1 ----------------------------------------------------------------------------------------

fn all_event_reaches_every_worker_exactly_once_with_wid() {
    let dir = TempDir::new("bcast");
    let wd = Watchdog::new("bcast");
    let cfg = Cfg::new(&dir.sock(), 4);
    let mut ws: Vec<Child> = (0..4).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    for w in &mut ws {
        let r = w.publish(Tgt::All, "bcast", "b", 0, 10);
        assert_eq!((r.ok, r.err), (10, 0), "{:?}", r.errors);
    }
    for (i, w) in ws.iter_mut().enumerate() {
        w.until(40);
        let r = w.report();
        let want: Vec<_> = (0..4).map(|p| key(&format!("w{p}"), "bcast", "b")).collect();
        assert_eq!(r.stream_keys(), want, "worker {i}: unexpected streams");
        for p in 0..4 {
            assert_eq!(r.stream(&format!("w{p}"), "bcast", "b"), seq(0, 10), "worker {i} from w{p}");
        }
        assert_eq!(r.stat("delivered"), 40, "worker {i}");
        assert_eq!(r.stat("lost"), 0);
        assert!(r.lost.is_empty());
        assert_eq!(r.stat("decode_errors"), 0);
    }
}

// 2 ----------------------------------------------------------------------------------------

fn current_event_stays_in_the_publishing_worker() {
    let dir = TempDir::new("current");
    let wd = Watchdog::new("current");
    let cfg = Cfg::new(&dir.sock(), 4);
    let mut ws: Vec<Child> = (0..4).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let r = ws[1].publish(Tgt::Current, "cur", "x", 7, 1);
    assert_eq!((r.ok, r.err), (1, 0));
    let r = ws[1].publish(Tgt::All, "marker", "m", 0, 1);
    assert_eq!((r.ok, r.err), (1, 0));
    for (i, w) in ws.iter_mut().enumerate() {
        w.until(if i == 1 { 2 } else { 1 });
        let r = w.report();
        if i == 1 {
            assert_eq!(r.stream_keys(), vec![key("none", "cur", "x"), key("w1", "marker", "m")]);
            assert_eq!(r.stream("none", "cur", "x"), vec![7], "Current event seen once with wid None");
        } else {
            // The marker was published after the Current event: seeing it proves the
            // Current event had its chance to (wrongly) arrive.
            assert_eq!(r.stream_keys(), vec![key("w1", "marker", "m")], "worker {i} saw a foreign Current event");
        }
        // A Current event serialized into another process would be dropped there as malformed:
        // not seen by any callback, only counted. Nothing may be dropped anywhere.
        assert_eq!(r.stat("dropped"), 0, "worker {i}: messages dropped as malformed (a Current event sent out?)");
    }
}

// 3 ----------------------------------------------------------------------------------------

fn late_attaching_worker_receives_earlier_events_in_order() {
    let dir = TempDir::new("late");
    let wd = Watchdog::new("late");
    let cfg = Cfg::new(&dir.sock(), 4);
    let mut ws: Vec<Child> = (0..3).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let r = ws[1].publish(Tgt::All, "seq", "late", 0, 100);
    assert_eq!((r.ok, r.err), (100, 0), "{:?}", r.errors);
    // Only now (publish acknowledged) does worker 3 exist.
    let mut w3 = wd.spawn(&cfg, Wid::Worker(3));
    w3.until(100);
    let r = w3.report();
    assert_eq!(r.stream_keys(), vec![key("w1", "seq", "late")]);
    assert_eq!(r.stream("w1", "seq", "late"), seq(0, 100));
    assert_eq!(r.stat("lost"), 0);
    for (i, w) in ws.iter_mut().enumerate() {
        w.until(100);
        assert_eq!(w.report().stream("w1", "seq", "late"), seq(0, 100), "worker {i}");
    }
}

fn late_attaching_worker_receives_more_than_a_ring_of_earlier_events() {
    const N: u64 = 2_000;
    let dir = TempDir::new("late-big");
    let wd = Watchdog::new("late-big");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.ring_capacity = Some(4096); // ~100 small events; the rest wait in the backlog
    let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
    let r = w0.publish(Tgt::All, "seq", "late", 0, N);
    assert_eq!((r.ok, r.err), (N, 0), "{:?}", r.errors);
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    w2.until(N);
    let r = w2.report();
    let got = r.stream("w0", "seq", "late");
    assert!(got == seq(0, N), "{}", diff_summary(&got, &seq(0, N)));
    assert_eq!((r.stat("lost"), r.stat("events")), (0, N));
    // Worker 1 never attached: its events wait in its ring and the publisher's backlog
    // (max_queue_len 10,240 > N), so nothing was dropped for it either.
    assert_eq!(w0.report().stat("lost_outbound"), 0);
}

fn events_published_before_attach_are_sent_once_attached() {
    const N: u64 = 50;
    let dir = TempDir::new("early");
    let wd = Watchdog::new("early");
    let cfg = Cfg::new(&dir.sock(), 3);
    // Worker 2 starts first: with no broker anywhere it cannot be attached when it publishes
    // (the child checks `!is_ready()`); it then elects itself after the election grace, and
    // the preferred broker (worker 0) and worker 1 attach to it later.
    let mut w2 =
        wd.spawn_with(&cfg, &Spawn { early: Some(Early::all("seq", "early", N)), ..Spawn::worker(Wid::Worker(2)) });
    let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    for (name, c) in [("w0", &mut w0), ("w1", &mut w1), ("w2", &mut w2)] {
        c.until(N);
        let r = c.report();
        assert_eq!(r.stream_keys(), vec![key("w2", "seq", "early")], "{name}");
        assert_eq!(r.stream("w2", "seq", "early"), seq(0, N), "{name}");
    }
    assert_eq!(w2.report().stat("early_errors"), 0);
}

// 4 ----------------------------------------------------------------------------------------

fn two_publishers_10k_each_complete_and_in_order_everywhere() {
    const N: u64 = 10_000;
    let dir = TempDir::new("bulk");
    let wd = Watchdog::new("bulk");
    let mut cfg = Cfg::new(&dir.sock(), 4);
    cfg.max_queue_len = Some(100_000);
    let mut ws: Vec<Child> = (0..4).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    // Both publishers run concurrently.
    ws[1].send(Cmd::publish(Tgt::All, "seq", "bulk", 0, N));
    ws[2].send(Cmd::publish(Tgt::All, "seq", "bulk", 0, N));
    for p in [1, 2] {
        let r = ws[p].publish_end();
        assert_eq!((r.ok, r.err), (N, 0), "publisher w{p}: {:?}", r.errors);
    }
    for (i, w) in ws.iter_mut().enumerate() {
        w.until(2 * N);
        let r = w.report();
        assert_eq!(r.stream_keys(), vec![key("w1", "seq", "bulk"), key("w2", "seq", "bulk")], "worker {i}");
        for p in ["w1", "w2"] {
            let got = r.stream(p, "seq", "bulk");
            assert!(got == seq(0, N), "worker {i} from {p}: {}", diff_summary(&got, &seq(0, N)));
        }
        assert_eq!(r.stat("lost"), 0, "worker {i}");
        assert_eq!(r.stat("lost_outbound"), 0, "worker {i}");
        assert_eq!(r.stat("overflows"), 0, "worker {i}");
        assert!(r.lost.is_empty(), "worker {i}: {:?}", r.lost);
        assert_eq!(r.stat("delivered"), 2 * N, "worker {i}");
    }
}

// 5 ----------------------------------------------------------------------------------------

fn payload_sizes_arrive_intact_and_the_limit_is_exact() {
    const MAX: usize = 2 * 1024 * 1024;
    let sizes = [0usize, 1, 64 * 1024 + 1, 1024 * 1024];
    let dir = TempDir::new("payload");
    let wd = Watchdog::new("payload");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.max_payload_len = Some(MAX);
    let mut ws: Vec<Child> = (0..3).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    for len in sizes {
        let lines = ws[1].cmd(Cmd::bytes(Tgt::All, "size", "blob", len));
        assert!(lines.contains(&"@@PUB 1 0".to_string()), "{len} bytes: {lines:?}");
    }
    // Exactly the limit is accepted... (checked in-process below to keep the pipes light)
    let lines = ws[1].cmd(Cmd::bytes(Tgt::All, "size", "blob", MAX + 1));
    assert!(lines.contains(&"@@PUB 0 1".to_string()), "{lines:?}");
    assert!(
        lines.contains(&"@@PUBERR failed to publish event: payload exceeds the limitation (2097152)".to_string()),
        "{lines:?}"
    );
    // A marker after the refused event: once it is seen, the refused one had its chance.
    ws[1].publish(Tgt::All, "seq", "end", 0, 1);
    for (i, w) in ws.iter_mut().enumerate() {
        w.until(sizes.len() as u64 + 1);
        let r = w.report();
        let want: Vec<_> = sizes.iter().map(|&l| ("w1".to_string(), l, true)).collect();
        assert_eq!(r.payloads, want, "worker {i}: (publisher, len, content ok)");
        assert_eq!(r.stream("w1", "seq", "end"), vec![0], "worker {i}");
        assert_eq!(r.stat("events"), sizes.len() as u64 + 1, "worker {i}: the oversize event must not arrive");
        assert_eq!(r.stat("lost"), 0);
    }

    // In-process: max_payload_len bytes are accepted, one more is refused (typed too).
    let dir2 = TempDir::new("payload-local");
    let events = Events::new(Options::new(dir2.sock()).workers(1).transport(transport()).max_payload_len(100)).unwrap();
    let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    w.publish_bytes(Target::All, "s", "e", &[0u8; 100]).unwrap();
    let e = w.publish_bytes(Target::All, "s", "e", &[0u8; 101]).unwrap_err();
    assert_eq!(e, PublishError::PayloadTooLarge { limit: 100 });
    let e = w.publish(Target::Current, "s", "e", &vec![7u8; 200]).unwrap_err();
    assert_eq!(e.to_string(), "failed to publish event: payload exceeds the limitation (100)");
    assert_eq!(w.stats().published, 1);
}

// 6 ----------------------------------------------------------------------------------------

fn per_publisher_order_holds_across_targets() {
    let dir = TempDir::new("order");
    let wd = Watchdog::new("order");
    let cfg = Cfg::new(&dir.sock(), 2);
    let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    // a1, c1, a2 published back to back (no dispatch in between), then a longer mix.
    let item = |target: Tgt, ev: &str, seq: u64| Item { target, src: "ord".into(), ev: ev.into(), seq };
    let mut items = vec![item(Tgt::All, "a", 1), item(Tgt::Current, "c", 1), item(Tgt::All, "a", 2)];
    for i in 3..40u64 {
        items.push(if i % 3 == 0 { item(Tgt::Current, "c", i) } else { item(Tgt::All, "a", i) });
    }
    let r = PubOk::from(w1.cmd(Cmd::Batch(items.clone())));
    assert_eq!(r.0, "@@PUB 40 0");
    let expected_w1: Vec<String> = items
        .iter()
        .map(|it| {
            let wid = if it.target == Tgt::All { "w1" } else { "none" };
            format!("{wid} ord {} {}", it.ev, it.seq)
        })
        .collect();
    w1.until(40);
    let log1: Vec<String> = w1.log().into_iter().filter(|l| l.contains(" ord ")).collect();
    assert_eq!(&log1[..3], &["w1 ord a 1", "none ord c 1", "w1 ord a 2"]);
    assert_eq!(log1, expected_w1);
    let expected_w0: Vec<String> = expected_w1.iter().filter(|l| l.starts_with("w1 ")).cloned().collect();
    w0.until(expected_w0.len() as u64);
    let log0: Vec<String> = w0.log().into_iter().filter(|l| l.contains(" ord ")).collect();
    assert_eq!(log0, expected_w0);
}

struct PubOk(String);
impl From<Vec<String>> for PubOk {
    fn from(v: Vec<String>) -> Self {
        PubOk(v.into_iter().find(|l| l.starts_with("@@PUB ")).unwrap_or_default())
    }
}

// 7 ----------------------------------------------------------------------------------------

type Seen = Arc<Mutex<Vec<(&'static str, Option<Wid>)>>>;

fn subscribe_levels(w: &mut Worker, seen: &Seen) -> Vec<worker_events::SubscriptionId> {
    let mut ids = Vec::new();
    for (src, ev, name) in [
        ("s", "e", "exact1"),
        ("*", "*", "any1"),
        ("s", "*", "src1"),
        ("other", "*", "other-src"),
        ("s", "e", "exact2"),
        ("*", "*", "any2"),
        ("s", "*", "src2"),
        ("s", "f", "other-ev"),
    ] {
        let seen = seen.clone();
        ids.push(w.subscribe(src, ev, move |e| seen.lock().unwrap().push((name, e.wid()))));
    }
    ids
}

/// Runs the level scenario; `publish` publishes one ("s","e") event and returns once it has
/// been dispatched.
fn levels_scenario(w: &mut Worker, want_wid: Option<Wid>, publish: &mut dyn FnMut(&mut Worker, &Seen, usize)) {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let ids = subscribe_levels(w, &seen);
    publish(w, &seen, 6);
    let names = |s: &Seen| s.lock().unwrap().iter().map(|(n, _)| *n).collect::<Vec<_>>();
    assert_eq!(names(&seen), ["any1", "any2", "src1", "src2", "exact1", "exact2"]);
    assert!(seen.lock().unwrap().iter().all(|(_, wid)| *wid == want_wid));
    seen.lock().unwrap().clear();

    assert!(w.unsubscribe(ids[2]), "src1 is subscribed");
    assert!(!w.unsubscribe(ids[2]), "src1 is already gone");
    publish(w, &seen, 5);
    assert_eq!(names(&seen), ["any1", "any2", "src2", "exact1", "exact2"], "exactly one removed");
    seen.lock().unwrap().clear();

    // An id this worker never handed out.
    let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    let mut other = events.init_worker(Wid::Worker(0)).unwrap();
    let foreign = (0..50).map(|_| other.subscribe("x", "y", |_| {})).last().unwrap();
    assert!(!w.unsubscribe(foreign), "unknown id");
    publish(w, &seen, 5);
    assert_eq!(names(&seen).len(), 5, "an unknown id removes nothing");
}

fn subscription_levels_and_unsubscribe_with_a_real_broker() {
    let dir = TempDir::new("levels");
    let deadline = Instant::now() + TEST_TIMEOUT;
    let events = Events::new(Options::new(dir.sock()).workers(1).transport(transport())).unwrap();
    let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    assert!(w.wait_ready(Duration::from_secs(10)).unwrap());
    assert!(w.is_broker());
    levels_scenario(&mut w, Some(Wid::Worker(0)), &mut |w, seen, n| {
        w.publish(Target::All, "s", "e", &1u64).unwrap();
        let s = seen.clone();
        pump_until(w, deadline, || s.lock().unwrap().len() >= n);
    });
}

#[test]
fn subscription_levels_and_unsubscribe_in_testing_mode() {
    let events = Events::new(Options::new("/tmp/unused-we.sock").testing(true)).unwrap();
    let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    levels_scenario(&mut w, None, &mut |w, seen, n| {
        w.publish(Target::All, "s", "e", &1u64).unwrap();
        assert_eq!(seen.lock().unwrap().len(), n, "testing mode runs the callbacks inside publish");
    });
}

// 8 ----------------------------------------------------------------------------------------

fn a_panicking_callback_does_not_stop_the_others_or_later_events() {
    let dir = TempDir::new("panic");
    let wd = Watchdog::new("panic");
    let cfg = Cfg::new(&dir.sock(), 2);
    // Worker 0 subscribes: ("*","*") recorder, ("boom","*") panicking, ("boom","*") counter.
    let mut w0 = wd.spawn_with(&cfg, &Spawn { panic: true, ..Spawn::worker(Wid::Worker(0)) });
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    w1.publish(Tgt::All, "boom", "x", 0, 3);
    w1.publish(Tgt::All, "seq", "later", 0, 3);
    // Its own events too (local path).
    w0.publish(Tgt::All, "boom", "y", 0, 2);
    w0.until(8);
    w0.publish(Tgt::All, "seq", "after", 0, 1);
    w0.until(9);
    let r = w0.report();
    assert_eq!(r.stream("w1", "boom", "x"), seq(0, 3));
    assert_eq!(r.stream("w1", "seq", "later"), seq(0, 3), "later events still arrive");
    assert_eq!(r.stream("w0", "boom", "y"), seq(0, 2));
    assert_eq!(r.stream("w0", "seq", "after"), vec![0]);
    assert_eq!(r.stat("after_panic"), 5, "the callback after the panicking one ran every time");
    assert_eq!(r.stat("callback_panics"), 5);
    assert_eq!(r.stat("delivered"), 9);
    assert_eq!(r.stat("wait_errors"), 0, "a panic is not an error of wait()");
    w1.until(3 + 3 + 2 + 1);
    assert_eq!(w1.report().stat("callback_panics"), 0);
}

// 9 ----------------------------------------------------------------------------------------

fn ring_overflow_is_reported_with_lost_notices() {
    // On the socket transport the kernel's socket buffers hold a few thousand small frames
    // beyond max_queue_len: publish enough to overflow them too.
    let n: u64 = if transport() == Transport::Socket { 50_000 } else { 1000 };
    let dir = TempDir::new("overflow");
    let wd = Watchdog::new("overflow");
    let mut cfg = Cfg::new(&dir.sock(), 2);
    cfg.ring_capacity = Some(4096);
    cfg.max_queue_len = Some(8);
    let mut publisher = wd.spawn(&cfg, Wid::Worker(0));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
    receiver.cmd(Cmd::Pause);
    let r = publisher.publish(Tgt::All, "seq", "ovf", 0, n);
    assert_eq!((r.ok, r.err), (n, 0), "an All publish never fails for a slow receiver: {:?}", r.errors);
    let p = publisher.report();
    let lost_out = p.stat("lost_outbound");
    assert!(lost_out > 0, "a 4 KiB ring + 8 queued cannot hold {n} events: {:?}", p.stats);
    assert!(lost_out < n, "{lost_out}");
    assert_eq!(p.stream("w0", "seq", "ovf"), seq(0, n), "the publisher's own copies are all there");
    receiver.cmd(Cmd::Resume);
    receiver.until(n);
    let r = receiver.report();
    let got = r.stream("w0", "seq", "ovf");
    assert_eq!(got.len() as u64, n - lost_out, "received = published - lost");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in increasing order");
    assert!(!r.lost.is_empty(), "at least one lost notice");
    assert!(r.lost.iter().all(|(p, _)| p == "w0"), "{:?}", r.lost);
    assert_eq!(r.lost.iter().map(|(_, c)| c).sum::<u64>(), lost_out, "notices add up to the publisher's count");
    assert_eq!(r.stat("lost"), lost_out);
    // Nothing more is still on its way (the publisher's stats agree after the drain).
    let p = publisher.report();
    assert_eq!(p.stat("lost_outbound"), lost_out);
}

fn own_queue_overflow_is_a_publish_error() {
    let dir = TempDir::new("ownq");
    let events = Events::new(Options::new(dir.sock()).workers(1).transport(transport()).max_queue_len(4)).unwrap();
    let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    assert!(w.wait_ready(Duration::from_secs(10)).unwrap());
    let n = Arc::new(Mutex::new(0u32));
    let c = n.clone();
    w.subscribe("*", "*", move |_| *c.lock().unwrap() += 1);
    for i in 0..4u64 {
        w.publish(Target::All, "s", "e", &i).unwrap();
    }
    let e = w.publish(Target::All, "s", "e", &4u64).unwrap_err();
    assert_eq!(e, PublishError::QueueOverflow);
    assert_eq!(e.to_string(), "failed to publish event: queue overflow");
    assert_eq!((w.stats().overflows, w.stats().published), (1, 4));
    let e = w.publish_bytes(Target::Current, "s", "e", b"x").unwrap_err();
    assert_eq!(e.to_string(), "failed to publish event: queue overflow");
    let st = w.stats();
    assert_eq!((st.overflows, st.published), (2, 4));
    let deadline = Instant::now() + TEST_TIMEOUT;
    let c = n.clone();
    pump_until(&mut w, deadline, || *c.lock().unwrap() >= 4);
    assert_eq!(w.dispatch().unwrap(), 0);
    assert_eq!(*n.lock().unwrap(), 4, "the refused events were not delivered");
    // Room again after dispatch.
    w.publish(Target::All, "s", "e", &5u64).unwrap();
}

// 10 ---------------------------------------------------------------------------------------

fn duplicate_and_invalid_wids_are_rejected() {
    let dir = TempDir::new("wid");
    let wd = Watchdog::new("wid");
    let cfg = Cfg::new(&dir.sock(), 4);
    let holder = wd.spawn(&cfg, Wid::Worker(1));
    // In another process...
    let err = wd.spawn_expect_err(&cfg, Wid::Worker(1));
    assert_eq!(err, "@@ERR init_worker: worker id worker 1 is already held by another live process");
    // ...and in this one (a separate open file description).
    let events = Events::new(cfg.options()).unwrap();
    match events.init_worker(Wid::Worker(1)) {
        Err(Error::WidInUse(w)) => assert_eq!(w, Wid::Worker(1)),
        other => panic!("expected WidInUse, got {other:?}"),
    }
    assert!(matches!(events.init_worker(Wid::Worker(4)), Err(Error::InvalidWid { wid: Wid::Worker(4), .. })));
    assert!(matches!(
        events.init_worker(Wid::PrivilegedAgent),
        Err(Error::InvalidWid { wid: Wid::PrivilegedAgent, .. })
    ));
    // Once the holder is gone, the id is free again.
    holder.exit();
    let w = events.init_worker(Wid::Worker(1)).expect("id released by the exited holder");
    drop(w);
}

// 11 ---------------------------------------------------------------------------------------

fn privileged_agent_receives_and_publishes_all_events() {
    let dir = TempDir::new("agent");
    let wd = Watchdog::new("agent");
    let mut cfg = Cfg::new(&dir.sock(), 2);
    cfg.agent = true;
    let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let mut agent = wd.spawn(&cfg, Wid::PrivilegedAgent);
    let r = w0.publish(Tgt::All, "seq", "a", 0, 5);
    assert_eq!((r.ok, r.err), (5, 0));
    let r = agent.publish(Tgt::All, "seq", "b", 0, 5);
    assert_eq!((r.ok, r.err), (5, 0));
    for (name, c) in [("agent", &mut agent), ("w0", &mut w0), ("w1", &mut w1)] {
        c.until(10);
        let r = c.report();
        assert_eq!(r.stream_keys(), vec![key("agent", "seq", "b"), key("w0", "seq", "a")], "{name}");
        assert_eq!(r.stream("w0", "seq", "a"), seq(0, 5), "{name}: from worker 0 with wid Some(Worker(0))");
        assert_eq!(r.stream("agent", "seq", "b"), seq(0, 5), "{name}: from the agent with wid Some(PrivilegedAgent)");
    }
}

// 12 ---------------------------------------------------------------------------------------

#[test]
fn option_validation_messages() {
    let o = || Options::new("/tmp/we-opts.sock").workers(4);
    let msg = |o: Options| Events::new(o).unwrap_err().to_string();
    assert_eq!(msg(o().max_payload_len(0)), "\"max_payload_len\" option is invalid");
    assert_eq!(msg(o().max_payload_len(16 * 1024 * 1024 + 1)), "\"max_payload_len\" option is invalid");
    assert!(Events::new(o().max_payload_len(16 * 1024 * 1024)).is_ok());
    assert_eq!(msg(o().unique_timeout(Duration::ZERO)), "\"unique_timeout\" must be greater than 0");
    assert_eq!(msg(o().max_queue_len(0)), "\"max_queue_len\" option is invalid");
    assert_eq!(msg(o().broker_id(4)), "\"broker_id\" option is invalid");
    assert!(Events::new(o().broker_id(3)).is_ok());
    assert!(matches!(Events::new(o().max_queue_len(0)), Err(Error::InvalidOption(_))));
}

#[test]
fn testing_mode_runs_callbacks_synchronously_with_no_wid() {
    let events = Events::new(Options::new("/tmp/we-testing-mode.sock").testing(true)).unwrap();
    let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    assert!(w.is_ready());
    type Log = Arc<Mutex<Vec<(String, u64, Option<Wid>)>>>;
    let seen: Log = Arc::default();
    let s = seen.clone();
    w.subscribe("cfg", "*", move |e| {
        s.lock().unwrap().push((e.event().to_string(), e.deserialize::<u64>().unwrap(), e.wid()))
    });
    w.publish(Target::All, "cfg", "all", &1u64).unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![("all".to_string(), 1, None)], "ran inside publish");
    w.publish(Target::Current, "cfg", "current", &2u64).unwrap();
    w.publish(Target::Unique("h"), "cfg", "unique", &3u64).unwrap();
    w.publish(Target::Unique("h"), "cfg", "unique", &4u64).unwrap(); // no dedup in testing mode
    assert_eq!(seen.lock().unwrap().len(), 4);
    assert!(seen.lock().unwrap().iter().all(|(_, _, wid)| wid.is_none()));
    assert_eq!(w.dispatch().unwrap(), 0, "nothing left for dispatch");
    let st = w.stats();
    assert_eq!((st.published, st.delivered), (4, 4));
}

// Unique targets --------------------------------------------------------------------------

fn unique_target_errors() {
    let dir = TempDir::new("unique");
    let events = Events::new(Options::new(dir.sock()).workers(1).transport(transport())).unwrap();
    let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    assert!(w.wait_ready(Duration::from_secs(10)).unwrap());
    let hits = Arc::new(Mutex::new(0u32));
    let h = hits.clone();
    w.subscribe("*", "*", move |_| *h.lock().unwrap() += 1);
    assert_eq!(
        w.publish(Target::Unique(""), "s", "e", &1u64).unwrap_err(),
        PublishError::InvalidUniqueHash { len: 0, max: MAX_UNIQUE_HASH_LEN }
    );
    let long = "h".repeat(MAX_UNIQUE_HASH_LEN + 1);
    assert!(matches!(
        w.publish_bytes(Target::Unique(&long), "s", "e", b"x"),
        Err(PublishError::InvalidUniqueHash { .. })
    ));
    // Testing mode validates the hash too.
    let t = Events::new(Options::new("/tmp/we-unique-testing.sock").testing(true)).unwrap();
    let mut tw = t.init_worker(Wid::Worker(0)).unwrap();
    assert!(matches!(tw.publish_bytes(Target::Unique(""), "s", "e", b""), Err(PublishError::InvalidUniqueHash { .. })));
    // Nothing was published or delivered.
    w.publish_bytes(Target::All, "s", "marker", b"").unwrap();
    let deadline = Instant::now() + TEST_TIMEOUT;
    let h = hits.clone();
    pump_until(&mut w, deadline, || *h.lock().unwrap() >= 1);
    assert_eq!(w.dispatch().unwrap(), 0);
    assert_eq!(*hits.lock().unwrap(), 1);
    assert_eq!(w.stats().published, 1);
    // A valid hash is accepted (unique events are implemented since commit 2a889ae; the
    // former `UniqueUnsupported` error no longer exists). Delivery semantics of unique
    // events are not covered here.
    w.publish_bytes(Target::Unique("k1"), "s", "e", b"x").expect("a valid unique hash is accepted");
    assert_eq!(w.stats().published, 2);
}

// Every test above runs on both transports: `shm::<name>` and `socket::<name>`.
per_transport!(
    all_event_reaches_every_worker_exactly_once_with_wid,
    current_event_stays_in_the_publishing_worker,
    late_attaching_worker_receives_earlier_events_in_order,
    late_attaching_worker_receives_more_than_a_ring_of_earlier_events,
    events_published_before_attach_are_sent_once_attached,
    two_publishers_10k_each_complete_and_in_order_everywhere,
    payload_sizes_arrive_intact_and_the_limit_is_exact,
    per_publisher_order_holds_across_targets,
    subscription_levels_and_unsubscribe_with_a_real_broker,
    a_panicking_callback_does_not_stop_the_others_or_later_events,
    ring_overflow_is_reported_with_lost_notices,
    own_queue_overflow_is_a_publish_error,
    duplicate_and_invalid_wids_are_rejected,
    privileged_agent_receives_and_publishes_all_events,
    unique_target_errors,
);
