//! Instructions per event of the process-private hot path, for `valgrind --tool=callgrind`
//! (instruction counts are repeatable on a loaded machine; times are not).
//!
//! One process, one thread, two workers of one deployment on shared memory: worker 0
//! publishes typed 64-byte events (`publish(All)`, rkyv encode, ring write, its own
//! self-delivery decision), worker 1 dispatches them into a callback that does validated
//! rkyv access. Both sides dispatch every 256 events, as `throughput/we_1to1` does.
//!
//! ```text
//! cargo bench --no-run --bench hot_path      # prints the binary's path
//! WE_HOT_EVENTS=20000 valgrind --tool=callgrind <binary> --bench
//! WE_HOT_EVENTS=120000 valgrind --tool=callgrind <binary> --bench
//! ```
//! Instructions per event = difference of the two totals / 100,000 (setup cancels out).
//! `WE_HOT_SELF=1` also subscribes worker 0 to its own events (the self-delivery path).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use worker_events::{Events, Options, Target, Transport, Wid};
use worker_events_dev_support::TempDir;

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Ping {
    seq: u64,
    pad: [u8; 56],
}

// The counter is a process-private std atomic (the clippy.toml ban is for shared memory in src/).
#[allow(clippy::disallowed_types)]
fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches`: nothing to check here
    }
    let n: u64 = std::env::var("WE_HOT_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let self_sub = std::env::var_os("WE_HOT_SELF").is_some();
    let dir = TempDir::new("we-hot");
    let opts = Options::new(dir.join("ev.sock")).workers(2).transport(Transport::SharedMemory);
    let events = Events::new(opts).expect("options");
    let mut w0 = events.init_worker(Wid::Worker(0)).expect("worker 0");
    let mut w1 = events.init_worker(Wid::Worker(1)).expect("worker 1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(w0.is_ready() && w1.is_ready()) {
        w0.dispatch().expect("dispatch 0");
        w1.dispatch().expect("dispatch 1");
        assert!(Instant::now() < deadline, "worker 1 did not attach");
    }
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    w1.subscribe("bench", "data", move |ev| {
        let p = ev.data::<Ping>().expect("valid data");
        black_box(p.pad[0]);
        g.store(g.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    });
    if self_sub {
        w0.subscribe("bench", "data", |ev| {
            black_box(ev.data_bytes().len());
        });
    }
    let payload = Ping { seq: 0, pad: [0x5a; 56] };
    for i in 0..n {
        w0.publish(Target::All, "bench", "data", &payload).expect("publish");
        if i % 256 == 255 {
            w0.dispatch().expect("dispatch 0");
            w1.dispatch().expect("dispatch 1");
        }
    }
    while got.load(Ordering::Relaxed) < n {
        w0.dispatch().expect("dispatch 0");
        w1.dispatch().expect("dispatch 1");
        assert!(Instant::now() < deadline + Duration::from_secs(600), "events missing");
    }
    println!("events delivered: {}", got.load(Ordering::Relaxed));
}
