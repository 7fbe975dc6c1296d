//! Unique events at the broker: the cost of the dedup check per event with the shared table
//! 10% and 90% full, beside an "all" publish through the same worker as the baseline (same
//! run, same process). The broker handles its own unique events without a hop, so
//! `publish(Unique) + dispatch` for a hash already live in the table = encode + SipHash +
//! table probe + drop; the baseline `publish(All) + dispatch` = encode + local delivery.
//!
//! Cross-process unique latency (publisher -> broker socket -> target ring) is not measured
//! here yet.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use worker_events::{Events, Options, Target, Wid, Worker};

const CAPACITY: usize = 65_536;

fn broker(tag: &str) -> (Worker, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("we-bench-unique-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let events = Events::new(
        Options::new(dir.join("ev.sock"))
            .workers(1)
            .unique_capacity(CAPACITY)
            .unique_timeout(Duration::from_secs(3600))
            .max_queue_len(1 << 20),
    )
    .expect("options");
    let mut w = events.init_worker(Wid::Worker(0)).expect("init_worker");
    assert!(w.wait_ready(Duration::from_secs(5)).expect("ready"));
    w.subscribe("bench", "*", |_| {});
    (w, dir)
}

fn fill(w: &mut Worker, n: usize) {
    for i in 0..n {
        w.publish_bytes(Target::Unique(&format!("fill:{i}")), "bench", "fill", b"").expect("fill");
        if i % 1024 == 0 {
            w.dispatch().expect("dispatch");
        }
    }
    w.dispatch().expect("dispatch");
}

fn unique(c: &mut Criterion) {
    let mut g = c.benchmark_group("unique_at_broker");
    g.sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));

    let (mut w, dir) = broker("all");
    g.bench_function("baseline_all_publish_dispatch", |b| {
        b.iter(|| {
            w.publish_bytes(Target::All, "bench", "all", b"0123456789abcdef").unwrap();
            w.dispatch().unwrap();
        })
    });
    drop(w);
    let _ = std::fs::remove_dir_all(dir);

    for pct in [10usize, 90] {
        let (mut w, dir) = broker(&format!("u{pct}"));
        let live = CAPACITY * pct / 100;
        fill(&mut w, live);
        // Measured: republishing hashes that are live in the table (the dedup path that
        // drops them). This does not grow the table, so the fill level stays at `pct`.
        let hashes: Vec<String> = (0..live).map(|i| format!("fill:{i}")).collect();
        let mut i = 0usize;
        g.bench_function(format!("unique_duplicate_dropped_table_{pct}pct_full"), |b| {
            b.iter(|| {
                w.publish_bytes(Target::Unique(&hashes[i % live]), "bench", "u", b"0123456789abcdef").unwrap();
                w.dispatch().unwrap();
                i = i.wrapping_add(7919);
            })
        });
        let st = w.stats();
        eprintln!(
            "table {pct}%: unique_unrecorded={} unique_duplicates={} (the window never filled if 0)",
            st.unique_unrecorded, st.unique_duplicates
        );
        drop(w);
        let _ = std::fs::remove_dir_all(dir);
    }
    g.finish();
}

criterion_group!(benches, unique);
criterion_main!(benches);
