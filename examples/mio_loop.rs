//! A mio event loop driving a worker: `cargo run --example mio_loop --features mio`.
//!
//! One process, two workers of one deployment (as two processes of a prefork server would
//! be, here in one `Poll` for brevity): worker 0 publishes a few events, worker 1 sleeps in
//! `Poll::poll` until its fd turns readable, then dispatches until `dispatch` returns 0
//! (which re-arms the wake-up), as every poller must.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mio::{Events as MioEvents, Interest, Poll, Token};
use worker_events::{Events, Options, Target, Wid};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("we-mio-loop-{}", std::process::id()));
    let events = Events::new(Options::new(dir.join("ev.sock")).workers(2))?;
    let mut publisher = events.init_worker(Wid::Worker(0))?; // the broker
    let mut receiver = events.init_worker(Wid::Worker(1))?;
    let got = Arc::new(Mutex::new(0u64));
    let g = got.clone();
    receiver.subscribe("demo", "tick", move |ev| {
        let n: u64 = ev.deserialize().unwrap_or(u64::MAX);
        println!("worker 1 got tick {n} from {:?}", ev.wid());
        *g.lock().unwrap() += 1;
    });

    let mut poll = Poll::new()?;
    poll.registry().register(&mut receiver, Token(1), Interest::READABLE)?;
    poll.registry().register(&mut publisher, Token(0), Interest::READABLE)?;
    let mut ready = MioEvents::with_capacity(8);
    // Attach: the workers' control traffic also runs inside dispatch.
    while !(publisher.is_ready() && receiver.is_ready()) {
        poll.poll(&mut ready, Some(Duration::from_millis(10)))?;
        publisher.dispatch()?;
        receiver.dispatch()?;
    }
    while receiver.dispatch()? > 0 {} // arm: from now on, new work makes the fd readable

    const N: u64 = 5;
    let mut sent = 0;
    while *got.lock().unwrap() < N {
        if sent < N {
            publisher.publish(Target::All, "demo", "tick", &sent)?;
            sent += 1;
            while publisher.dispatch()? > 0 {} // its own copy; and sends queued frames
        }
        poll.poll(&mut ready, Some(Duration::from_secs(1)))?;
        for ev in ready.iter() {
            let w = if ev.token() == Token(1) { &mut receiver } else { &mut publisher };
            // Edge-triggered: drain until 0, which re-arms the wake-up.
            while w.dispatch()? > 0 {}
        }
    }
    poll.registry().deregister(&mut receiver)?;
    poll.registry().deregister(&mut publisher)?;
    drop((publisher, receiver));
    let _ = std::fs::remove_dir_all(dir);
    println!("worker 1 received {N} events through mio");
    Ok(())
}
