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
//! The ring written is the publisher's broadcast ring (the default topology); with
//! `WORKER_EVENTS_BROADCAST=0` in the environment, the per-pair ring instead.
//! `WE_HOT_SELF=1` also subscribes worker 0 to its own events (the self-delivery path).
//! `WE_HOT_BATCH=k`: worker 0 publishes `k` events per `Worker::batch` (one commit, one
//! fence and one look at the receiver's parked flag per batch instead of per event).
//! `WE_HOT_MODE=unique`: the same with `Target::Unique` and a fresh 16-byte hash per event
//! (dedup claim in the shared table, target pick, one ring hop to worker 1); its difference
//! with the `All` figure is the unique path's own cost.
//!
//! `WE_HOT_MODE=hop`: the `latency/we_busy_poll` ping-pong, in one process: both workers in
//! busy-poll mode with that scenario's subscriptions (each side subscribes only to the other
//! side's event, so its own copies find no callback); per round trip, worker 0 publishes
//! "ping", worker 1 dispatches it (validated access in the callback), then publishes "pong",
//! and worker 0 dispatches that. Instructions per hop = difference of two totals / (2 x the
//! difference of `WE_HOT_EVENTS`), the CPU work of one publish -> callback hop and its
//! dispatch epilogue (not the cache-line transfers, which one process does not pay).
//! `WE_HOT_IDLE=k` adds k dispatch calls that find nothing per round trip (a busy-polling
//! receiver's idle pass, whose length is the detection delay): their cost is the difference
//! with `WE_HOT_IDLE` unset, divided by k x the round trips.
//!
//! Two more modes count syscalls with `strace -f -c` (again, the difference of two runs of
//! different lengths, divided by the difference of their lengths, cancels the setup):
//! - `WE_HOT_MODE=parked`: `WE_HOT_EVENTS` ping-pong round trips between this process and
//!   a peer process, both parked in `wait(None)` (the `wakeup/we_parked` scenario); a round
//!   trip is two hops.
//! - `WE_HOT_MODE=stream`: a peer process publishes `WE_HOT_EVENTS` events, one every
//!   ~2 µs, while this process loops on `dispatch()` in the default mode (not busy-poll):
//!   the "zero syscalls per event while the receiver is inside dispatch" target.

// The counters are process-private std atomics, not shared memory: the clippy.toml ban on
// std atomics (for src/) does not apply.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use worker_events::{Events, Options, Target, Transport, Wid, Worker};
use worker_events_dev_support::TempDir;

mod support;
use support::{ROLE_ENV, SOCK_ENV, child_command, child_prologue, pin_pair, reap};

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Ping {
    seq: u64,
    pad: [u8; 56],
}

fn main() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        child_prologue();
        child_main(&role);
        std::process::exit(0);
    }
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches`: nothing to check here
    }
    let n: u64 = std::env::var("WE_HOT_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    match std::env::var("WE_HOT_MODE").as_deref() {
        Ok("parked") => return two_process(n, "parked"),
        Ok("stream") => return two_process(n, "stream"),
        Ok("hop") => return hop(n),
        _ => {}
    }
    let self_sub = std::env::var_os("WE_HOT_SELF").is_some();
    let dir = TempDir::new("we-hot");
    let unique = std::env::var("WE_HOT_MODE").as_deref() == Ok("unique");
    let mut opts = Options::new(dir.join("ev.sock")).workers(2).transport(Transport::SharedMemory);
    if unique {
        // The same table for both run lengths (setup cancels out), with room for 120,000
        // hashes at under a quarter of its entries: the insert path of a table that is not
        // near full (a window scan stops at the first unused entry).
        opts = opts.unique_capacity(1 << 18);
    }
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
    let batch: u64 = std::env::var("WE_HOT_BATCH").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    if batch > 1 {
        assert!(!unique && 256 % batch == 0, "WE_HOT_BATCH: a divisor of 256, with the `All` mode");
        let mut i = 0;
        while i < n {
            let mut b = w0.batch();
            for _ in 0..batch.min(n - i) {
                b.publish(Target::All, "bench", "data", &payload).expect("publish");
            }
            drop(b);
            i += batch;
            if i % 256 == 0 {
                w0.dispatch().expect("dispatch 0");
                w1.dispatch().expect("dispatch 1");
            }
        }
    }
    let mut hash = [0u8; 16];
    for i in 0..if batch > 1 { 0 } else { n } {
        if unique {
            // A fresh hash per event (the insert path of the shared dedup table).
            for (k, b) in hash.iter_mut().enumerate() {
                *b = b"0123456789abcdef"[((i >> (4 * k)) & 15) as usize];
            }
            let h = std::str::from_utf8(&hash).expect("hex digits");
            w0.publish(Target::Unique(h), "bench", "data", &payload).expect("publish unique");
        } else {
            w0.publish(Target::All, "bench", "data", &payload).expect("publish");
        }
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

/// `n` busy-poll round trips between two workers of this process (see the module docs).
fn hop(n: u64) {
    let dir = TempDir::new("we-hop");
    let events = Events::new(options(&dir.join("ev.sock"))).expect("options");
    let mut w0 = events.init_worker(Wid::Worker(0)).expect("worker 0");
    let mut w1 = events.init_worker(Wid::Worker(1)).expect("worker 1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(w0.is_ready() && w1.is_ready()) {
        w0.dispatch().expect("dispatch 0");
        w1.dispatch().expect("dispatch 1");
        assert!(Instant::now() < deadline, "worker 1 did not attach");
    }
    w0.set_busy_poll(true);
    w1.set_busy_poll(true);
    let (pong, req) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let p = pong.clone();
    w0.subscribe("bench", "pong", move |ev| {
        p.store(ev.data::<Ping>().expect("valid pong").seq.to_native(), Ordering::Release)
    });
    let r = req.clone();
    w1.subscribe("bench", "ping", move |ev| {
        r.store(ev.data::<Ping>().expect("valid ping").seq.to_native(), Ordering::Relaxed)
    });
    let idle: u32 = std::env::var("WE_HOT_IDLE").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    for seq in 1..=n {
        for _ in 0..idle {
            w1.dispatch().expect("idle dispatch");
        }
        w0.publish(Target::All, "bench", "ping", &Ping { seq, pad: [0x5a; 56] }).expect("ping");
        while req.load(Ordering::Relaxed) != seq {
            w1.dispatch().expect("dispatch 1");
        }
        w1.publish(Target::All, "bench", "pong", &Ping { seq, pad: [0x5a; 56] }).expect("pong");
        while pong.load(Ordering::Acquire) != seq {
            w0.dispatch().expect("dispatch 0");
        }
    }
    println!("round trips: {n}");
}

fn options(sock: &std::path::Path) -> Options {
    Options::new(sock).workers(2).transport(Transport::SharedMemory)
}

/// Dispatch until `done()`, for at most 60 s (callgrind is slow).
fn until(w: &mut Worker, busy: bool, done: impl FnMut() -> bool) {
    support::serve_until(w, busy, Duration::from_secs(60), done);
}

/// Worker 0 here, worker 1 in a peer process (`role`), `n` round trips or events.
fn two_process(n: u64, role: &str) {
    let cpu = pin_pair();
    let dir = TempDir::new("we-hot2");
    let sock = dir.join("ev.sock");
    let events = Events::new(options(&sock)).expect("options");
    let mut w = events.init_worker(Wid::Worker(0)).expect("worker 0");
    let last = Arc::new(AtomicU64::new(0));
    let l = last.clone();
    w.subscribe("bench", "pong", move |ev| {
        l.store(ev.data::<Ping>().expect("pong").seq.to_native(), Ordering::Release)
    });
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    w.subscribe("bench", "data", move |_| g.store(g.load(Ordering::Relaxed) + 1, Ordering::Relaxed));
    let hello = Arc::new(AtomicU64::new(0));
    let h = hello.clone();
    w.subscribe("bench", "hello", move |_| h.store(1, Ordering::Release));
    let mut child =
        child_command(role, cpu, &[], Some(&sock)).env("WE_HOT_EVENTS", n.to_string()).spawn().expect("peer");
    until(&mut w, false, || hello.load(Ordering::Acquire) == 1);
    let t = Instant::now();
    if role == "parked" {
        for seq in 1..=n {
            w.publish(Target::All, "bench", "ping", &Ping { seq, pad: [0; 56] }).expect("ping");
            while last.load(Ordering::Acquire) != seq {
                w.wait(None).expect("wait");
            }
        }
    } else {
        w.publish_bytes(Target::All, "bench", "go", b"").expect("go");
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.load(Ordering::Relaxed) < n {
            w.dispatch().expect("dispatch");
            assert!(Instant::now() < deadline, "events missing");
        }
    }
    let el = t.elapsed();
    let st = w.stats();
    println!("{role}: {n} in {el:?}; worker 0: wake-ups received {}, sent {}", st.wakeups_received, st.wakeups_sent);
    w.publish_bytes(Target::All, "bench", "stop", b"").expect("stop");
    let _ = w.flush();
    reap(&mut child);
}

fn child_main(role: &str) {
    let sock = std::path::PathBuf::from(std::env::var_os(SOCK_ENV).expect("sock"));
    let n: u64 = std::env::var("WE_HOT_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let events = Events::new(options(&sock)).expect("options");
    let mut w = events.init_worker(Wid::Worker(1)).expect("worker 1");
    let req = Arc::new(AtomicU64::new(0));
    let r = req.clone();
    w.subscribe("bench", "ping", move |ev| {
        r.store(ev.data::<Ping>().expect("ping").seq.to_native(), Ordering::Relaxed)
    });
    let go = Arc::new(AtomicU64::new(0));
    let g = go.clone();
    w.subscribe("bench", "go", move |_| g.store(1, Ordering::Relaxed));
    let stop = Arc::new(AtomicU64::new(0));
    let s = stop.clone();
    w.subscribe("bench", "stop", move |_| s.store(1, Ordering::Relaxed));
    assert!(w.wait_ready(Duration::from_secs(10)).expect("wait_ready"));
    w.publish_bytes(Target::All, "bench", "hello", b"").expect("hello");
    if role == "stream" {
        until(&mut w, false, || go.load(Ordering::Relaxed) == 1);
        let payload = Ping { seq: 0, pad: [0; 56] };
        // The publisher polls its own queue without arming: only the receiver's wake-ups count.
        w.set_busy_poll(true);
        for i in 0..n {
            let t = Instant::now();
            w.publish(Target::All, "bench", "data", &payload).expect("data");
            if i % 256 == 255 {
                w.dispatch().expect("dispatch");
            }
            while t.elapsed() < Duration::from_micros(2) {
                std::hint::spin_loop();
            }
        }
        let _ = w.flush();
        until(&mut w, false, || stop.load(Ordering::Relaxed) == 1);
        return;
    }
    let mut replied = 0;
    while stop.load(Ordering::Relaxed) == 0 {
        w.wait(None).expect("wait");
        let seq = req.load(Ordering::Relaxed);
        if seq != replied {
            w.publish(Target::All, "bench", "pong", &Ping { seq, pad: [0; 56] }).expect("pong");
            replied = seq;
        }
    }
}
