//! Publishing from a callback (`Worker::subscribe_with` and its `Context`): what a callback
//! publishes goes out after the event that triggered it, in call order, across processes;
//! its errors are the ones `publish` gives, at the call; a callback that publishes to itself
//! runs once per pass, never recursively.

#[macro_use]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use worker_events::{Events, Options, PublishError, Target, Wid, Worker};

child_entry!();

/// `(publisher, source, event, n)` of a list-recorder log line.
fn parse(line: &str) -> (String, String, String, u64) {
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(f.len(), 4, "log line {line:?}");
    (f[0].into(), f[1].into(), f[2].into(), f[3].parse().unwrap_or(u64::MAX))
}

/// The stream of publisher `w` in an observer's log: each `resp a n` is followed at once by
/// `resp b n`, comes after `trig own n` (the reactor's own triggers), and the answers to each
/// trigger source arrive in the order of the triggers, each exactly once.
fn check_reactor_stream(who: &str, log: &[String], w: &str, own: u64, remote: u64) {
    let s: Vec<_> = log.iter().map(|l| parse(l)).filter(|(p, ..)| p == w).collect();
    let mut seen_trig = std::collections::HashSet::new();
    let (mut own_resp, mut remote_resp) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < s.len() {
        let (_, src, ev, n) = &s[i];
        match (src.as_str(), ev.as_str()) {
            ("trig", "own") => {
                seen_trig.insert(*n);
            }
            ("resp", "a") => {
                let next = s.get(i + 1).map(|(_, s, e, m)| (s.as_str(), e.as_str(), *m));
                assert_eq!(next, Some(("resp", "b", *n)), "{who}: resp a {n} not followed by resp b {n}: {s:?}");
                if *n < 1000 {
                    assert!(seen_trig.contains(n), "{who}: resp a {n} arrived before trig own {n}");
                    own_resp.push(*n);
                } else {
                    remote_resp.push(*n);
                }
                i += 1;
            }
            other => panic!("{who}: unexpected {other:?} from {w}"),
        }
        i += 1;
    }
    assert_eq!(own_resp, (0..own).collect::<Vec<_>>(), "{who}: answers to {w}'s own triggers");
    assert_eq!(remote_resp, (1000..1000 + remote).collect::<Vec<_>>(), "{who}: answers to w0's triggers");
}

/// Worker 1 reacts to `("trig", *)` events (`support/callback.rs`): two `All` events and a
/// `Current` one from the callback. It triggers itself (`trig own`, a dispatch after each
/// publish) while worker 0 triggers it too (`trig remote`). Two observers check worker 1's
/// stream: answers after their trigger, in call order, nothing missing or repeated.
fn reactions_follow_their_trigger_in_call_order() {
    const N: u64 = 150;
    let dir = TempDir::new("cbpub");
    let wd = Watchdog::new("cbpub");
    let cfg = Cfg::new(&dir.sock(), 3);
    let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn_with(&cfg, &Spawn { reactor: true, ..Spawn::worker(Wid::Worker(1)) });
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    let r = w1.publish(Tgt::All, "trig", "own", 0, N);
    assert_eq!((r.ok, r.err), (N, 0), "{:?}", r.errors);
    let r = w0.publish(Tgt::All, "trig", "remote", 1000, N);
    assert_eq!((r.ok, r.err), (N, 0), "{:?}", r.errors);
    // Triggers: N own + N remote; answers: 2 `All` each (+ 1 `Current` at the reactor).
    w1.until(2 * N + 6 * N);
    w0.until(2 * N + 4 * N);
    w2.until(2 * N + 4 * N);
    for (who, w) in [("w0", &mut w0), ("w2", &mut w2)] {
        let log = w.log();
        check_reactor_stream(who, &log, "w1", N, N);
        assert_eq!(log.len() as u64, 2 * N + 4 * N, "{who}: {log:?}");
    }
    // The reactor itself: every `Current` answer once, after its trigger, in trigger order.
    let log = w1.log();
    let mut pos = std::collections::HashMap::new();
    let mut currents = Vec::new();
    for (i, l) in log.iter().enumerate() {
        let (_, src, ev, n) = parse(l);
        match (src.as_str(), ev.as_str()) {
            ("trig", _) => {
                pos.insert(n, i);
            }
            ("resp", "c") => {
                assert!(pos.get(&n).is_some_and(|&p| p < i), "w1: resp c {n} before its trigger");
                currents.push(n);
            }
            _ => {}
        }
    }
    let own: Vec<u64> = currents.iter().copied().filter(|&n| n < 1000).collect();
    let remote: Vec<u64> = currents.iter().copied().filter(|&n| n >= 1000).collect();
    assert_eq!(own, (0..N).collect::<Vec<_>>());
    assert_eq!(remote, (1000..1000 + N).collect::<Vec<_>>());
    let r = w1.report();
    assert_eq!(r.stat("published"), N + 3 * 2 * N, "N triggers + 3 answers per trigger");
    assert_eq!(r.stat("overflows"), 0);
    for w in [w0, w1, w2] {
        w.exit();
    }
}

/// A worker of one slot on the transport the test runs (it elects itself).
fn solo(name: &str, opts: impl FnOnce(Options) -> Options) -> (TempDir, Worker) {
    let dir = TempDir::new(name);
    let o = opts(Options::new(dir.sock()).workers(1).transport(transport()));
    let mut w = Events::new(o).unwrap().init_worker(Wid::Worker(0)).unwrap();
    assert!(w.wait_ready(Duration::from_secs(10)).unwrap());
    (dir, w)
}

/// A callback that publishes to itself (`Current`, or `All` with itself subscribed): each
/// `dispatch` runs it a bounded number of times (no recursion inside one pass), in order,
/// and the chain goes on across calls until the callback stops it.
fn self_publishing_callback_runs_once_per_pass() {
    for target in [Target::Current, Target::All] {
        let (_dir, mut w) = solo("cbself", |o| o);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        w.subscribe_with("loop", "tick", move |cx, ev| {
            let n: u64 = ev.deserialize().unwrap();
            s.lock().unwrap().push(n);
            if n < 100 {
                cx.publish(target, "loop", "tick", &(n + 1)).unwrap();
            }
        });
        w.publish(target, "loop", "tick", &0u64).unwrap();
        let mut calls = 0;
        loop {
            let before = seen.lock().unwrap().len();
            let n = w.dispatch().unwrap();
            let ran = seen.lock().unwrap().len() - before;
            assert_eq!(n, ran, "{target:?}: dispatch counts what ran");
            assert!(ran <= 2, "{target:?}: one dispatch ran the chain {ran} times (recursion)");
            calls += 1;
            if n == 0 {
                break;
            }
            assert!(calls < 1000, "{target:?}: the chain never ends");
        }
        assert_eq!(*seen.lock().unwrap(), (0..=100).collect::<Vec<u64>>(), "{target:?}");
        assert!(calls >= 51, "{target:?}: {calls} dispatch calls for 101 links");
        let st = w.stats();
        assert_eq!((st.published, st.delivered, st.overflows), (101, 101, 0), "{target:?}");
    }
}

/// The errors of `publish`, at the call inside the callback: our own queue holds
/// `max_queue_len` events (the publishes already made from callbacks count), an oversized
/// payload and a bad unique hash are refused; refused publishes are not sent, accepted ones
/// are, in order.
fn callback_publish_errors_are_publish_errors_at_the_call() {
    let (_dir, mut w) = solo("cbovf", |o| o.max_queue_len(4).max_payload_len(8));
    let results = Arc::new(Mutex::new(Vec::new()));
    let r = results.clone();
    w.subscribe_with("burst", "go", move |cx, _| {
        let mut r = r.lock().unwrap();
        r.push(cx.publish_bytes(Target::Current, "burst", "x", b"123456789"));
        r.push(cx.publish_bytes(Target::Unique(""), "burst", "x", b"1"));
        for i in 0..6u8 {
            r.push(cx.publish_bytes(Target::Current, "burst", "x", &[i]));
        }
        assert_eq!(cx.queued(), 4);
    });
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    w.subscribe("burst", "x", move |ev| g.lock().unwrap().push(ev.data_bytes()[0]));
    w.publish_bytes(Target::Current, "burst", "go", b"").unwrap();
    assert_eq!(w.dispatch().unwrap(), 1, "the trigger");
    let want = [
        Err(PublishError::PayloadTooLarge { limit: 8 }),
        Err(PublishError::InvalidUniqueHash { len: 0, max: worker_events::MAX_UNIQUE_HASH_LEN }),
        Ok(()),
        Ok(()),
        Ok(()),
        Ok(()),
        Err(PublishError::QueueOverflow),
        Err(PublishError::QueueOverflow),
    ];
    assert_eq!(*results.lock().unwrap(), want);
    // The 4 accepted fill our own queue: `publish` refuses the next one as the callback did.
    assert_eq!(w.publish_bytes(Target::All, "burst", "x", b"9"), Err(PublishError::QueueOverflow));
    while w.dispatch().unwrap() > 0 {}
    assert_eq!(*got.lock().unwrap(), [0, 1, 2, 3], "accepted ones, in call order");
    let st = w.stats();
    assert_eq!((st.published, st.overflows), (5, 3));
}

per_transport!(
    reactions_follow_their_trigger_in_call_order,
    self_publishing_callback_runs_once_per_pass,
    callback_publish_errors_are_publish_errors_at_the_call,
);

/// Testing mode (events run inside `publish`): a callback's publishes run when the outer
/// callbacks return; what they publish in turn waits for the next `dispatch`.
#[test]
fn testing_mode_runs_one_generation_per_call() {
    let mut w =
        Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap().init_worker(Wid::Worker(0)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    w.subscribe_with("loop", "tick", move |cx, ev| {
        let n: u64 = ev.deserialize().unwrap();
        s.lock().unwrap().push(n);
        if n < 5 {
            cx.publish(Target::All, "loop", "tick", &(n + 1)).unwrap();
        }
    });
    w.publish(Target::All, "loop", "tick", &0u64).unwrap();
    assert_eq!(*seen.lock().unwrap(), [0, 1]);
    for k in 2..=5u64 {
        assert_eq!(w.dispatch().unwrap(), 1);
        assert_eq!(seen.lock().unwrap().last(), Some(&k));
    }
    assert_eq!(w.dispatch().unwrap(), 0);
    assert_eq!(*seen.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
}
