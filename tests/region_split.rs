//! A deployment is never split over two shared regions (issue 11, item 7), with real
//! processes: while the broker is dead and the only other process that holds the region is
//! stopped, a worker that starts does not create a fresh region (which would strand every
//! event queued for its slot in the live one); once the holder runs again it takes the broker
//! role over on the live region, and the newcomer attaches there and gets its events (those
//! of the dead broker included: they wait in the region's rings).

#[macro_use]
mod support;

use std::time::Duration;

use support::*;
use worker_events::{Transport, Wid};

child_entry!();

#[test]
fn a_newcomer_never_creates_a_fresh_region_while_live_processes_hold_one() {
    let dir = TempDir::new("region-split");
    let wd = Watchdog::new("region-split");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.transport = Transport::SharedMemory;
    let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    // Events for slot 2, which has no process yet: they wait in its rings in the region.
    assert_eq!(w0.publish(Tgt::All, "s", "e", 0, 50).ok, 50);
    assert_eq!(w1.publish(Tgt::All, "s", "e", 0, 50).ok, 50);
    w1.until(50);
    // The broker dies and the only other region holder is stopped: nobody serves, and the
    // broker lock is free.
    w1.signal(libc::SIGSTOP);
    w0.kill();
    let pid1 = w1.pid();
    let resume = std::thread::spawn(move || {
        // Long past the second after which a newcomer used to create a fresh region.
        std::thread::sleep(Duration::from_millis(2500));
        // SAFETY: resuming a child this test started and still owns.
        unsafe { libc::kill(pid1 as i32, libc::SIGCONT) };
    });
    // Returns once w2 is attached: to the live region, after the holders resumed.
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    resume.join().unwrap();
    w2.until(100);
    let r = w2.report();
    assert_eq!(r.stream("w0", "s", "e"), seq(0, 50), "the events queued for slot 2 by w0");
    assert_eq!(r.stream("w1", "s", "e"), seq(0, 50), "the events queued for slot 2 by w1");
    assert_eq!(r.stat("lost"), 0);
    let status = w2.cmd(Cmd::Status);
    assert!(status[0].starts_with("@@STATUS 0 1"), "w2 must not be a broker of its own: {status:?}");
}
