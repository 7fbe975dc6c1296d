//! `Worker::flush()` returns true exactly when nothing is left queued for another worker,
//! on both transports. Two workers in this one process share a real region (or real sockets):
//! the method's contract needs no second process.

use std::time::{Duration, Instant};

use worker_events::{Events, Options, Target, Transport, Wid, Worker};
use worker_events_dev_support::TempDir;

fn pump_until(ws: &mut [&mut Worker], what: &str, done: impl Fn(&mut [&mut Worker]) -> bool) {
    let limit = Instant::now() + Duration::from_secs(20);
    while !done(ws) {
        assert!(Instant::now() < limit, "timed out waiting for {what}");
        for w in ws.iter_mut() {
            w.wait(Some(Duration::from_millis(1))).unwrap();
        }
    }
}

fn flush_reports_what_is_left(transport: Transport, name: &str) {
    let d = TempDir::new(&format!("flush-{name}"));
    let opts =
        Options::new(d.join("ev.sock")).workers(2).ring_capacity(4096).max_queue_len(100_000).transport(transport);
    let events = Events::new(opts).unwrap();
    let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
    let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
    pump_until(&mut [&mut w0, &mut w1], "attach", |ws| ws[0].is_ready() && ws[1].is_ready());
    assert_eq!(w1.transport(), transport);

    // Nothing published: nothing queued.
    assert!(w0.flush(), "flush() with nothing queued must report nothing left");
    assert!(w1.flush());

    // One small event fits at once: after flush nothing is left.
    w1.publish_bytes(Target::All, "s", "e", b"x").unwrap();
    assert!(w1.flush(), "flush() after a small publish must report nothing left");

    // Far more than the 4 KiB ring (or one socket write) holds while the receiver does not
    // read: something is left queued, and flush says so.
    let body = vec![7u8; 1000];
    for _ in 0..2000 {
        w1.publish_bytes(Target::All, "s", "big", &body).unwrap();
    }
    if transport == Transport::SharedMemory {
        assert!(!w1.flush(), "flush() with a backlog the ring cannot take must report work left");
    }
    // Once the receiver drains, flushing empties the queues.
    pump_until(&mut [&mut w0, &mut w1], "the backlog to drain", |ws| ws[1].flush());
    assert!(w1.flush());
    drop((w0, w1));
}

#[test]
fn flush_on_shared_memory_reports_what_is_left() {
    flush_reports_what_is_left(Transport::SharedMemory, "shm");
}

#[test]
fn flush_on_sockets_reports_what_is_left() {
    flush_reports_what_is_left(Transport::Socket, "sock");
}
