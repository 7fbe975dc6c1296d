//! Multi-process tests of `Target::Unique` events: broker-side deduplication, delivery to
//! exactly one worker, expiry, events published before a broker exists, and a full table.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::*;
use worker_events::Wid;

child_entry!();

/// Every delivery of (`src`, `ev`) across all workers, from any publisher: seq -> count.
fn deliveries(reports: &[Report], src: &str, ev: &str) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for r in reports {
        for ((_, s, e), seqs) in &r.streams {
            if s == src && e == ev {
                for &n in seqs {
                    *m.entry(n).or_insert(0) += 1;
                }
            }
        }
    }
    m
}

fn total(m: &BTreeMap<u64, u64>) -> u64 {
    m.values().sum()
}

/// How many workers received at least one (`src`, `ev`) event.
fn receivers(reports: &[Report], src: &str, ev: &str) -> usize {
    reports.iter().filter(|r| r.streams.keys().any(|(_, s, e)| s == src && e == ev)).count()
}

fn reports(ws: &mut [Child]) -> Vec<Report> {
    ws.iter_mut().map(|w| w.report()).collect()
}

/// Re-check `done` on fresh reports until it holds; bounded by the watchdog deadline.
/// Between checks every child dispatches for a few ms (children also dispatch on their own
/// whenever idle); this is a polling interval, not a synchronization delay.
fn poll(wd: &Watchdog, ws: &mut [Child], what: &str, mut done: impl FnMut(&[Report]) -> bool) -> Vec<Report> {
    loop {
        let rs = reports(ws);
        if done(&rs) {
            return rs;
        }
        if wd.remaining() < Duration::from_secs(3) {
            let summary: Vec<String> = rs
                .iter()
                .map(|r| {
                    let lens: Vec<String> =
                        r.streams.iter().map(|((w, s, e), v)| format!("{w}/{s}/{e}:{}", v.len())).collect();
                    format!(
                        "{lens:?} dups={} unrec={} pending={} broker={}",
                        r.stat("unique_duplicates"),
                        r.stat("unique_unrecorded"),
                        r.stat("unique_pending"),
                        r.stat("is_broker")
                    )
                })
                .collect();
            panic!("watchdog: condition '{what}' not reached before the deadline; {summary:#?}");
        }
        ws[0].cmd(Cmd::Pump { ms: 10 });
    }
}

fn broker_index(rs: &[Report]) -> usize {
    let b: Vec<usize> = (0..rs.len()).filter(|&i| rs[i].stat("is_broker") == 1).collect();
    assert_eq!(b.len(), 1, "exactly one broker expected");
    b[0]
}

// a ----------------------------------------------------------------------------------------

fn concurrent_same_hash_delivered_exactly_once() {
    const N: u64 = 1000;
    let dir = TempDir::new("uniq-conc");
    let wd = Watchdog::new("uniq-conc");
    let cfg = Cfg::new(&dir.sock(), 4);
    let mut ws: Vec<Child> = (0..4).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    for w in ws.iter_mut() {
        w.send(Cmd::uniq("u", "e", "r", 0, N));
    }
    for (i, w) in ws.iter_mut().enumerate() {
        let r = w.publish_end();
        assert_eq!((r.ok, r.err), (N, 0), "publisher w{i}: {:?}", r.errors);
    }
    let rs = poll(&wd, &mut ws, "1000 unique deliveries and 3000 duplicates", |rs| {
        let b = broker_index(rs);
        total(&deliveries(rs, "u", "e")) >= N && rs[b].stat("unique_duplicates") >= 3 * N
    });
    // Everything is in: check once more after a round of dispatching (late duplicates).
    ws[0].cmd(Cmd::Pump { ms: 20 });
    let rs2 = reports(&mut ws);
    for rs in [&rs, &rs2] {
        let d = deliveries(rs, "u", "e");
        let dup: Vec<_> = d.iter().filter(|&(_, &c)| c != 1).collect();
        assert!(dup.is_empty(), "seqs delivered more than once: {dup:?}");
        assert_eq!(d.keys().copied().collect::<Vec<_>>(), seq(0, N), "union of deliveries");
        let b = broker_index(rs);
        assert_eq!(rs[b].stat("unique_duplicates"), 3 * N, "broker duplicate count");
        assert!(receivers(rs, "u", "e") > 1, "delivery not spread over workers");
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.stat("unique_pending"), 0, "w{i}");
            assert_eq!(r.stat("decode_errors"), 0, "w{i}");
            assert_eq!(r.stat("unique_unrecorded"), 0, "w{i}");
        }
    }
}

// b ----------------------------------------------------------------------------------------

fn model_sequence() {
    let dir = TempDir::new("uniq-model");
    let wd = Watchdog::new("uniq-model");
    let mut cfg = Cfg::new(&dir.sock(), 4);
    cfg.unique_timeout_ms = Some(300);
    let mut ws: Vec<Child> = (0..4).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let ok = |r: PubResult| assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);

    ok(ws[1].publish(Tgt::All, "s", "e1", 1, 1));
    ok(ws[1].publish(Tgt::unique("h"), "s", "e2", 2, 1));
    // r3 must reach the broker after r2 (they travel on different sockets): wait for r2.
    poll(&wd, &mut ws, "r2 delivered", |rs| total(&deliveries(rs, "s", "e2")) >= 1);
    ok(ws[2].publish(Tgt::unique("h"), "s", "e3", 3, 1));
    let rs = poll(&wd, &mut ws, "r3 counted as duplicate", |rs| {
        let b = broker_index(rs);
        rs[b].stat("unique_duplicates") >= 1
    });
    assert_eq!(total(&deliveries(&rs, "s", "e3")), 0, "r3 (duplicate) was delivered");
    // Cross the expiry: r2 was recorded before the observation above.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(400) {
        assert!(wd.remaining() > Duration::from_secs(3), "watchdog");
        ws[0].cmd(Cmd::Pump { ms: 20 });
    }
    ok(ws[3].publish(Tgt::unique("h"), "s", "e4", 4, 1));
    // r5 must reach the broker after r4: wait for r4.
    poll(&wd, &mut ws, "r4 delivered", |rs| total(&deliveries(rs, "s", "e4")) >= 1);
    ok(ws[1].publish(Tgt::unique("h"), "s", "e5", 5, 1));
    ok(ws[1].publish(Tgt::All, "s", "e6", 6, 1));
    let rs = poll(&wd, &mut ws, "r6 everywhere and r5 counted", |rs| {
        let b = broker_index(rs);
        receivers(rs, "s", "e6") == 4 && rs[b].stat("unique_duplicates") >= 2
    });
    ws[0].cmd(Cmd::Pump { ms: 20 });
    let rs2 = reports(&mut ws);
    for rs in [&rs, &rs2] {
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.stream("w1", "s", "e1"), vec![1], "w{i} r1");
            assert_eq!(r.stream("w1", "s", "e6"), vec![6], "w{i} r6");
        }
        let one = |_ev: &str, n: u64| BTreeMap::from([(n, 1u64)]);
        assert_eq!(deliveries(rs, "s", "e2"), one("e2", 2), "r2 exactly once");
        assert_eq!(deliveries(rs, "s", "e4"), one("e4", 4), "r4 exactly once");
        assert!(deliveries(rs, "s", "e3").is_empty(), "r3 delivered");
        assert!(deliveries(rs, "s", "e5").is_empty(), "r5 delivered");
        // The unique deliveries carry their publisher's wid.
        let who = |ev: &str| -> Vec<String> {
            rs.iter().flat_map(|r| r.streams.keys().filter(|k| k.2 == ev).map(|k| k.0.clone())).collect()
        };
        assert_eq!(who("e2"), vec!["w1".to_string()]);
        assert_eq!(who("e4"), vec!["w3".to_string()]);
        let b = broker_index(rs);
        assert_eq!(rs[b].stat("unique_duplicates"), 2);
    }
}

// c ----------------------------------------------------------------------------------------

fn unique_before_broker_is_delivered_once_it_exists() {
    const N: u64 = 5;
    let dir = TempDir::new("uniq-early");
    let wd = Watchdog::new("uniq-early");
    let cfg = Cfg::new(&dir.sock(), 2);
    // Worker 1 starts alone and publishes before being attached (the child checks
    // `!is_ready()`); it may elect itself broker after the election grace.
    let w1 =
        wd.spawn_with(&cfg, &Spawn { early: Some(Early::unique("u", "e", "c", N)), ..Spawn::worker(Wid::Worker(1)) });
    let w0 = wd.spawn(&cfg, Wid::Worker(0));
    let mut ws = vec![w0, w1];
    let rs = poll(&wd, &mut ws, "5 early unique deliveries", |rs| total(&deliveries(rs, "u", "e")) >= N);
    assert_eq!(rs[1].stat("early_errors"), 0);
    assert_eq!(rs[1].stat("early_unique_pending"), N, "kept by the publisher before attach");
    // A marker after: once both saw it, the queues had their chance to hold duplicates.
    let r = ws[1].publish(Tgt::All, "m", "m", 0, 1);
    assert_eq!((r.ok, r.err), (1, 0));
    let rs = poll(&wd, &mut ws, "marker everywhere", |rs| receivers(rs, "m", "m") == 2);
    let d = deliveries(&rs, "u", "e");
    assert_eq!(d, (0..N).map(|n| (n, 1)).collect::<BTreeMap<_, _>>(), "each early unique event exactly once");
    for r in &rs {
        assert_eq!(r.stat("unique_pending"), 0);
        for (w, s, _) in r.streams.keys() {
            if s == "u" {
                assert_eq!(w, "w1", "publisher wid");
            }
        }
    }
}

// d ----------------------------------------------------------------------------------------

fn full_table_still_delivers_and_counts() {
    const N: u64 = 100;
    const TABLE: u64 = 32;
    let dir = TempDir::new("uniq-full");
    let wd = Watchdog::new("uniq-full");
    let mut cfg = Cfg::new(&dir.sock(), 2);
    // The smallest table: 32 entries (the probe window's size), and the 32-entry probe window
    // of any hash is the whole table. So the first 32 distinct hashes are recorded, and
    // every later one finds the table full, whatever the hashes.
    cfg.unique_capacity = Some(1);
    cfg.unique_timeout_ms = Some(60_000);
    let mut ws: Vec<Child> = (0..2).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let r = ws[1].cmd(Cmd::uniq("u", "e", "f", 0, N));
    assert!(r.contains(&format!("@@PUB {N} 0")), "{r:?}");
    let rs = poll(&wd, &mut ws, "100 deliveries", |rs| total(&deliveries(rs, "u", "e")) >= N);
    let d = deliveries(&rs, "u", "e");
    assert_eq!(d, (0..N).map(|n| (n, 1)).collect::<BTreeMap<_, _>>(), "each distinct hash exactly once");
    let b = broker_index(&rs);
    let unrec = rs[b].stat("unique_unrecorded");
    assert_eq!(unrec, N - TABLE, "hashes delivered unrecorded: all but the first {TABLE}");
    assert_eq!(rs[b].stat("unique_duplicates"), 0);
    // Republish the first 32 hashes (different event name, same hashes).
    let r = ws[1].cmd(Cmd::uniq("u", "e2", "f", 0, 32));
    assert!(r.contains(&"@@PUB 32 0".to_string()), "{r:?}");
    let rs = poll(&wd, &mut ws, "32 republished handled", |rs| {
        let b = broker_index(rs);
        total(&deliveries(rs, "u", "e2")) + rs[b].stat("unique_duplicates") >= 32
    });
    let b = broker_index(&rs);
    let dups = rs[b].stat("unique_duplicates");
    let again = deliveries(&rs, "u", "e2");
    // The first 32 hashes are the recorded ones (within unique_timeout): all deduplicated.
    assert_eq!(dups, TABLE, "republished recorded hashes deduplicated; redelivered {again:?}");
    assert_eq!(total(&again) + dups, 32);
    assert!(again.values().all(|&c| c == 1));
    eprintln!("full table: unrecorded {unrec}, republished: {dups} duplicates, {} redelivered", total(&again));
}

// e ----------------------------------------------------------------------------------------

/// Shared memory only: a unique event makes no hop through the broker (the publisher records
/// the hash and writes into its target's ring), so with the broker frozen (SIGSTOP) three
/// workers publishing the same 300 hashes still get each delivered exactly once: the ones
/// whose target is a running worker while the broker is stopped, the ones handed to the
/// frozen broker's ring once it runs again. Nothing waits in a publisher's outbox.
#[test]
fn shm_unique_events_flow_while_the_broker_is_stopped() {
    const N: u64 = 300;
    let dir = TempDir::new("uniq-stop");
    let wd = Watchdog::new("uniq-stop");
    let cfg = Cfg::new(&dir.sock(), 4);
    let mut ws: Vec<Child> = (0..4).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let b = broker_index(&reports(&mut ws));
    let frozen = ws.remove(b);
    frozen.stop();
    for w in ws.iter_mut() {
        w.send(Cmd::uniq("u", "e", "s", 0, N));
    }
    for (i, w) in ws.iter_mut().enumerate() {
        let r = w.publish_end();
        assert_eq!((r.ok, r.err), (N, 0), "publisher {i}: {:?}", r.errors);
    }
    // Every hash was claimed once and the two other copies counted as duplicates (in the
    // region-wide counters every worker reports), with the broker stopped all along.
    let rs = poll(&wd, &mut ws, "all claims decided, some deliveries", |rs| {
        rs.iter().all(|r| r.stat("unique_pending") == 0 && r.stat("unique_duplicates") == 2 * N)
            && total(&deliveries(rs, "u", "e")) > 0
    });
    let live = deliveries(&rs, "u", "e");
    assert!(live.values().all(|&c| c == 1), "delivered twice while the broker was stopped: {live:?}");
    assert!(receivers(&rs, "u", "e") > 1, "deliveries not spread over the running workers");
    for r in &rs {
        assert_eq!(r.stat("unique_unrecorded"), 0);
        assert_eq!(r.stat("is_broker"), 0, "the stopped broker was replaced");
    }
    frozen.signal(libc::SIGCONT);
    ws.push(frozen);
    let rs = poll(&wd, &mut ws, "every hash delivered", |rs| total(&deliveries(rs, "u", "e")) >= N);
    ws[0].cmd(Cmd::Pump { ms: 20 });
    let rs2 = reports(&mut ws);
    for rs in [&rs, &rs2] {
        let d = deliveries(rs, "u", "e");
        assert_eq!(d, (0..N).map(|n| (n, 1)).collect::<BTreeMap<_, _>>(), "each hash exactly once");
        for r in rs.iter() {
            assert_eq!(r.stat("unique_duplicates"), 2 * N);
            assert_eq!(r.stat("decode_errors"), 0);
        }
    }
}

// Every test above runs on both transports: `shm::<name>` and `socket::<name>`.
per_transport!(
    concurrent_same_hash_delivered_exactly_once,
    model_sequence,
    unique_before_broker_is_delivered_once_it_exists,
    full_table_still_delivers_and_counts,
);
