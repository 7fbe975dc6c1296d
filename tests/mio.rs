//! `Worker` as a `mio::event::Source` (feature `mio`): two workers of one deployment in one
//! `Poll`; every event published by one wakes the poll for the other, which dispatches
//! until 0; a deregistered worker is never reported again.

#![cfg(feature = "mio")]
#![allow(clippy::disallowed_types)] // the test is not the library: a std atomic counter

#[macro_use]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::{Events as MioEvents, Interest, Poll, Token};
use support::*;
use worker_events::{Events, Options, Target, Wid};

child_entry!();

fn poll_wakes_the_receiver_for_every_event() {
    let dir = TempDir::new("mio");
    let events = Events::new(Options::new(dir.sock()).workers(2).transport(transport())).unwrap();
    let mut publisher = events.init_worker(Wid::Worker(0)).unwrap();
    let mut receiver = events.init_worker(Wid::Worker(1)).unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    receiver.subscribe("m", "e", move |ev| {
        assert_eq!(ev.deserialize::<u64>().unwrap(), g.fetch_add(1, Ordering::Relaxed));
    });
    let mut poll = Poll::new().unwrap();
    poll.registry().register(&mut publisher, Token(0), Interest::READABLE).unwrap();
    poll.registry().register(&mut receiver, Token(1), Interest::READABLE).unwrap();
    let mut ready = MioEvents::with_capacity(8);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(publisher.is_ready() && receiver.is_ready()) {
        assert!(Instant::now() < deadline, "attach");
        poll.poll(&mut ready, Some(Duration::from_millis(10))).unwrap();
        publisher.dispatch().unwrap();
        receiver.dispatch().unwrap();
    }
    while receiver.dispatch().unwrap() > 0 {}
    while publisher.dispatch().unwrap() > 0 {}
    let start = Instant::now();
    for n in 0..50u64 {
        publisher.publish(Target::All, "m", "e", &n).unwrap();
        while publisher.dispatch().unwrap() > 0 {} // writes what the socket transport queued
        // The receiver's event comes with a readiness report for its token (no timeout).
        let t = Instant::now();
        while got.load(Ordering::Relaxed) <= n {
            assert!(t.elapsed() < Duration::from_secs(5), "event {n} never reported");
            poll.poll(&mut ready, Some(Duration::from_secs(5))).unwrap();
            for ev in ready.iter() {
                let w = if ev.token() == Token(1) { &mut receiver } else { &mut publisher };
                while w.dispatch().unwrap() > 0 {}
            }
        }
    }
    // Woken by each event: well under a millisecond each. Woken only by the worker's timers
    // (a lost wake-up), 50 ms each on average.
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1500), "50 events took {took:?}: woken by timers, not the events");
    assert_eq!(got.load(Ordering::Relaxed), 50);
    poll.registry().deregister(&mut receiver).unwrap();
    publisher.publish(Target::All, "m", "e", &50u64).unwrap();
    while publisher.dispatch().unwrap() > 0 {}
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        poll.poll(&mut ready, Some(Duration::from_millis(50))).unwrap();
        assert!(ready.iter().all(|ev| ev.token() != Token(1)), "a deregistered worker was reported");
        while publisher.dispatch().unwrap() > 0 {}
    }
    assert_eq!(receiver.dispatch().unwrap(), 1, "the event waited in the receiver");
}

per_transport!(poll_wakes_the_receiver_for_every_event);
