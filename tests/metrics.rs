//! Feature `metrics`: `worker_events::metrics::export` records exactly what `Worker::stats`
//! reports, under the names and labels the module documents. Two real workers of one
//! deployment (a real region, or real sockets) in this one process: the exporter reads a
//! worker's counters, whichever process it lives in, so no second process is needed.

#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use worker_events::{Events, Options, Stats, Target, Transport, Wid, Worker};
use worker_events_dev_support::TempDir;

/// (name, sorted labels) -> value, as recorded or as expected.
type Series = BTreeMap<(String, Vec<(String, String)>), f64>;

fn pump_until(ws: &mut [&mut Worker], what: &str, done: impl Fn(&[&mut Worker]) -> bool) {
    let limit = Instant::now() + Duration::from_secs(20);
    while !done(ws) {
        assert!(Instant::now() < limit, "timed out waiting for {what}");
        for w in ws.iter_mut() {
            w.wait(Some(Duration::from_millis(1))).unwrap();
        }
    }
}

/// What `export` must record for one worker, written out here from the field names (not
/// from the library's list), so that a counter exported under the wrong name, with the wrong
/// value or label, or not at all, fails the comparison.
fn expected(wid: &str, st: &Stats, out: &mut Series) {
    let w = vec![("worker".to_string(), wid.to_string())];
    let mut c = |name: &str, v: u64| {
        assert!(out.insert((format!("worker_events_{name}"), w.clone()), v as f64).is_none());
    };
    c("published_total", st.published);
    c("delivered_total", st.delivered);
    c("callbacks_run_total", st.callbacks_run);
    c("callback_panics_total", st.callback_panics);
    c("dropped_total", st.dropped);
    c("lost_total", st.lost);
    c("lost_outbound_total", st.lost_outbound);
    c("overflows_total", st.overflows);
    c("wakeups_sent_total", st.wakeups_sent);
    c("wake_writes_total", st.wake_writes);
    c("wakeups_received_total", st.wakeups_received);
    c("failovers_total", st.failovers);
    c("unique_duplicates_total", st.unique_duplicates);
    c("unique_unrecorded_total", st.unique_unrecorded);
    c("unique_resent_total", st.unique_resent);
    c("corrupt_rings_total", st.corrupt_rings);
    c("unique_diverted_total", st.unique_diverted);
    c("unique_not_diverted_total", st.unique_not_diverted);
    c("unique_rerouted_total", st.unique_rerouted);
    c("unique_unguarded_total", st.unique_unguarded);
    c("diverts_total", st.diverts);
    c("resumes_total", st.resumes);
    c("unique_pending", st.unique_pending);
    for p in &st.peers {
        let peer = match p.wid {
            Wid::Worker(n) => n.to_string(),
            Wid::PrivilegedAgent => "privileged_agent".into(),
        };
        let l = vec![("peer".to_string(), peer), ("worker".to_string(), wid.to_string())];
        for (name, v) in
            [("outbound_depth", p.outbound_depth), ("backlog", p.backlog), ("inbound_depth", p.inbound_depth)]
        {
            assert!(out.insert((format!("worker_events_peer_{name}"), l.clone()), v as f64).is_none());
        }
    }
}

fn recorded(recorder: &DebuggingRecorder) -> Series {
    let mut out = Series::new();
    for (key, _, _, value) in recorder.snapshotter().snapshot().into_vec() {
        let key = key.key();
        let mut labels: Vec<_> = key.labels().map(|l| (l.key().to_string(), l.value().to_string())).collect();
        labels.sort();
        let v = match value {
            DebugValue::Counter(n) => n as f64,
            DebugValue::Gauge(g) => g.0,
            DebugValue::Histogram(h) => panic!("no histogram expected: {} {h:?}", key.name()),
        };
        assert!(out.insert((key.name().to_string(), labels), v).is_none());
    }
    out
}

fn export_matches_stats(transport: Transport, name: &str) {
    let d = TempDir::new(&format!("metrics-{name}"));
    let events = Events::new(Options::new(d.join("ev.sock")).workers(2).transport(transport)).unwrap();
    let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
    let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
    pump_until(&mut [&mut w0, &mut w1], "attach", |ws| ws.iter().all(|w| w.is_ready()));
    assert_eq!(w1.transport(), transport);
    w0.subscribe("s", "*", |_| {});
    // Two callbacks on worker 1: `callbacks_run` differs from `delivered`.
    w1.subscribe("s", "*", |_| {});
    w1.subscribe("s", "e", |_| {});
    for _ in 0..5 {
        w0.publish_bytes(Target::All, "s", "e", b"x").unwrap();
    }
    for _ in 0..3 {
        w1.publish_bytes(Target::All, "s", "e", b"y").unwrap();
    }
    // A unique event twice within unique_timeout: one duplicate.
    w0.publish_bytes(Target::Unique("h"), "s", "u", b"z").unwrap();
    w0.publish_bytes(Target::Unique("h"), "s", "u", b"z").unwrap();
    pump_until(&mut [&mut w0, &mut w1], "delivery", |ws| ws[0].stats().delivered == 8 && ws[1].stats().delivered >= 8);
    // Queued for worker 1 and not taken yet: non-zero depths.
    for _ in 0..7 {
        w0.publish_bytes(Target::All, "q", "e", b"x").unwrap();
    }

    let recorder = DebuggingRecorder::new();
    let (s0, s1) = metrics::with_local_recorder(&recorder, || {
        let s0 = w0.stats();
        worker_events::metrics::export(&w0);
        let s1 = w1.stats();
        worker_events::metrics::export(&w1);
        (s0, s1)
    });
    // The scenario made the counters tell each other apart.
    assert!(s0.published >= 13 && s1.published == 3, "{s0:?} {s1:?}");
    assert!(s1.callbacks_run > s1.delivered, "{s1:?}");
    assert_eq!(s0.unique_duplicates.max(s1.unique_duplicates), 1, "{s0:?} {s1:?}");
    assert!(s0.peers.iter().any(|p| p.wid == Wid::Worker(1) && p.outbound_depth > 0), "{s0:?}");
    let mut want = Series::new();
    expected("0", &s0, &mut want);
    expected("1", &s1, &mut want);
    assert_eq!(want.len(), 2 * 23 + 2 * 3, "two workers, one peer each");
    let got = recorded(&recorder);
    assert_eq!(got, want);

    // Exporting again records the new totals (`absolute`), not a sum.
    w0.publish_bytes(Target::All, "s", "e", b"x").unwrap();
    metrics::with_local_recorder(&recorder, || worker_events::metrics::export(&w0));
    let got = recorded(&recorder);
    let key = ("worker_events_published_total".to_string(), vec![("worker".to_string(), "0".to_string())]);
    assert_eq!(got.get(&key), Some(&((s0.published + 1) as f64)), "{got:?}");
}

#[test]
fn export_matches_stats_on_shared_memory() {
    export_matches_stats(Transport::SharedMemory, "shm");
}

#[test]
fn export_matches_stats_on_sockets() {
    export_matches_stats(Transport::Socket, "sock");
}

/// `describe` gives every exported name a description, and names nothing `export` does not
/// record.
#[test]
fn describe_covers_every_exported_name() {
    let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    let w = events.init_worker(Wid::Worker(0)).unwrap();
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        worker_events::metrics::describe();
        worker_events::metrics::export(&w);
    });
    let snap = recorder.snapshotter().snapshot().into_vec();
    assert_eq!(snap.len(), 23, "in-process worker: no peers");
    for (key, unit, desc, _) in snap {
        assert!(desc.is_some_and(|d| !d.is_empty()), "{} has no description", key.key().name());
        assert_eq!(unit, Some(metrics::Unit::Count));
    }
}
