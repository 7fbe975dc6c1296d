//! Busy-poll mode (`Worker::set_busy_poll(true)`): a worker that calls `dispatch()` in a
//! tight loop gets every event in order, is told of every event dropped for it, and still
//! serves its control socket (as the broker it admits workers that attach later). Two
//! workers in this one process share a real region (or real sockets): nothing here needs a
//! second process.

#![allow(clippy::disallowed_types)] // the test is not the library: std atomic counters

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use worker_events::{Events, Options, Target, Transport, Wid, Worker};
use worker_events_dev_support::TempDir;

/// Liveness guard only (a hang fails the test instead of blocking CI): no speed is asserted.
const GUARD: Duration = Duration::from_secs(30);

fn options(d: &TempDir, transport: Transport) -> Options {
    Options::new(d.join("ev.sock")).workers(2).ring_capacity(4096).max_queue_len(64).transport(transport)
}

fn attach(w0: &mut Worker, w1: &mut Worker) {
    let limit = Instant::now() + GUARD;
    while !(w0.is_ready() && w1.is_ready()) {
        assert!(Instant::now() < limit, "workers did not attach");
        w0.wait(Some(Duration::from_millis(1))).unwrap();
        w1.wait(Some(Duration::from_millis(1))).unwrap();
    }
}

fn busy_receiver_gets_everything_or_is_told(transport: Transport, name: &str) {
    const N: u64 = 20_000;
    let d = TempDir::new(&format!("busy-{name}"));
    let events = Events::new(options(&d, transport)).unwrap();
    let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
    let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
    attach(&mut w0, &mut w1);

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    w1.subscribe("busy", "n", move |ev| s.lock().unwrap().push(ev.deserialize::<u64>().expect("valid u64")));
    let lost = Arc::new(AtomicU64::new(0));
    let l = lost.clone();
    w1.subscribe("worker-events", "lost", move |ev| {
        l.fetch_add(ev.lost().expect("a lost notice").count, Ordering::Relaxed);
    });
    w1.set_busy_poll(true);

    // The receiver does not dispatch while the publisher sends far more than its 4 KiB ring
    // and 64-event backlog hold: events are dropped for it, and it must be told.
    // (The publisher runs its own queue every 32 events: its own copies count towards its
    // `max_queue_len` too.)
    for n in 0..N {
        w0.publish(Target::All, "busy", "n", &n).unwrap();
        if n % 32 == 31 {
            w0.dispatch().unwrap();
        }
    }
    let limit = Instant::now() + GUARD;
    loop {
        let got = seen.lock().unwrap().len() as u64;
        if got + lost.load(Ordering::Relaxed) >= N {
            break;
        }
        assert!(Instant::now() < limit, "{name}: received {got} + lost {} of {N}", lost.load(Ordering::Relaxed));
        w1.dispatch().unwrap();
        w0.dispatch().unwrap();
    }
    // A few more calls: nothing is delivered or reported twice.
    for _ in 0..1000 {
        w1.dispatch().unwrap();
        w0.dispatch().unwrap();
    }
    let seen = seen.lock().unwrap();
    let lost = lost.load(Ordering::Relaxed);
    if transport == Transport::SharedMemory {
        // (On sockets the broker publishes here, and its own events are queued for up to
        // 1.4 MiB per receiver: these 20,000 may all arrive.)
        assert!(lost > 0, "{name}: the overflow was not reported (received {})", seen.len());
    }
    assert_eq!(seen.len() as u64 + lost, N, "{name}: received {} + lost {lost} != published {N}", seen.len());
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{name}: events out of order or repeated");
    assert_eq!(w1.stats().lost, lost, "{name}: Stats::lost disagrees with the notices");
}

#[test]
fn busy_polling_receiver_on_shared_memory_gets_every_event_or_a_lost_notice() {
    busy_receiver_gets_everything_or_is_told(Transport::SharedMemory, "shm");
}

#[test]
fn busy_polling_receiver_on_sockets_gets_every_event_or_a_lost_notice() {
    busy_receiver_gets_everything_or_is_told(Transport::Socket, "sock");
}

/// The broker busy-polls with nothing to do for a long stretch; a worker that attaches
/// meanwhile is admitted, and its first event reaches the broker's callbacks.
#[test]
fn busy_polling_broker_admits_a_worker_that_attaches_later() {
    let d = TempDir::new("busy-broker");
    let events = Events::new(options(&d, Transport::SharedMemory)).unwrap();
    let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
    w0.set_busy_poll(true);
    let limit = Instant::now() + GUARD;
    while !w0.is_broker() {
        assert!(Instant::now() < limit, "worker 0 never became the broker");
        w0.dispatch().unwrap();
    }
    for _ in 0..100_000 {
        w0.dispatch().unwrap();
    }
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    w0.subscribe("late", "hello", move |_| {
        g.fetch_add(1, Ordering::Relaxed);
    });
    let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
    while !w1.is_ready() {
        assert!(Instant::now() < limit, "the late worker was not admitted by the busy-polling broker");
        w0.dispatch().unwrap();
        w1.dispatch().unwrap();
    }
    w1.publish_bytes(Target::All, "late", "hello", b"").unwrap();
    while got.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < limit, "the late worker's event did not reach the busy-polling broker");
        w0.dispatch().unwrap();
        w1.dispatch().unwrap();
    }
    assert_eq!(got.load(Ordering::Relaxed), 1);
}
