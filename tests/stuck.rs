//! Broker liveness and the lock file (issue 11, items 9 and 10), with real processes:
//! 1. a stuck broker (SIGSTOP) under a stream of `All` events is replaced within a bounded
//!    time: a new worker attaches while it is stopped, and after SIGCONT it steps down
//!    without disturbing anything (exactly one broker, nothing lost or duplicated);
//! 2. the lock file removed under a running deployment: a process that starts with a worker
//!    id in use is refused, and a new broker does not start on a fresh region while the old
//!    one lives.
//!
//! Bounds (crate docs, failover section): a broker that has not stored a heartbeat for
//! 700 ms is replaced by a region holder within 0.9 s of its last heartbeat; a worker whose
//! HELLO stays unanswered for 500 ms reconnects.

#[macro_use]
mod support;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::cluster::Cluster;
use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// One test at a time: each runs several processes and measures takeover times.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGCONT `pid` after `after` unless the returned sender is used (or dropped) first: the
/// test must not hang on a library that never replaces the stopped broker. The handle's
/// result tells whether it fired.
fn resume_later(pid: u32, after: Duration) -> (mpsc::Sender<()>, std::thread::JoinHandle<bool>) {
    let (tx, rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        if rx.recv_timeout(after) != Err(mpsc::RecvTimeoutError::Timeout) {
            return false;
        }
        // SAFETY: kill(2) on a child the test spawned and has not reaped (the test reaps its
        // children only after this thread has been told to stop or has fired).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        true
    });
    (tx, h)
}

// ==========================================================================================
// 1. Item 9: a stopped broker is replaced; on SIGCONT it steps down.

/// Shared memory, 4 workers, w1 and w2 stream `All` events. The broker w0 is SIGSTOPped; w3
/// is killed and restarted: its attach needs a broker, so it is ready only once a region
/// holder has taken the role over (the stopped broker keeps its lock byte). Events keep
/// flowing. After SIGCONT the old broker sees the newer epoch and steps down: exactly one
/// broker; its lock byte released (killing the new broker elects a successor through the
/// lock at once); every stream complete, in order, without duplicates.
#[test]
fn a_stopped_broker_is_replaced_and_steps_down_when_it_resumes() {
    let _serial = serial();
    let mut c = Cluster::new("stuck-stop", |cfg| cfg.transport = Transport::SharedMemory, 4, &[1, 2], 5.0);
    c.spawn_all();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.broker(), Some(0), "w0, the preferred broker, serves");
    let pid0 = c.proc(0).pid();
    c.proc(0).signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let (stop_resumer, resumer) = resume_later(pid0, Duration::from_secs(8));
    c.kill(3);
    c.spawn(3); // returns once w3 is ready (attached)
    let attach = stopped.elapsed();
    let _ = stop_resumer.send(());
    let by_resume = resumer.join().unwrap();
    eprintln!("w3 attached {attach:?} after the broker was stopped (resumed by the test: {by_resume})");
    assert!(
        !by_resume && attach < Duration::from_secs(3),
        "w3 attached only after {attach:?}, the stopped broker {}: nobody took the broker role over",
        if by_resume { "had to be resumed first" } else { "still stopped" }
    );
    // Exactly one of the others serves meanwhile (w0 cannot answer while stopped).
    let serving: Vec<u32> = [1, 2, 3].into_iter().filter(|&s| c.status(s).0).collect();
    assert_eq!(serving.len(), 1, "brokers among the running workers: {serving:?}");
    c.start_stream(3);
    std::thread::sleep(Duration::from_millis(300));
    c.proc(0).signal(libc::SIGCONT);
    // The resumed broker steps down at its next control poll (at once: its timer is due).
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let (b0, _) = c.status(0);
        let brokers: Vec<u32> = c.live().into_iter().filter(|&s| c.status(s).0).collect();
        if !b0 && brokers.len() == 1 {
            break;
        }
        assert!(Instant::now() < end, "after SIGCONT: brokers {brokers:?} (w0 still broker: {b0})");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.broker(), Some(serving[0]), "the worker that took over stays the broker");
    // w0 re-attached to the new broker and receives again.
    let end = Instant::now() + Duration::from_secs(3);
    while !c.status(0).1 {
        assert!(Instant::now() < end, "w0 never re-attached after stepping down");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The stepped-down broker released its lock byte and the new broker took it (the lock
    // and the epoch agree again): with w0 stopped again, killing the new broker lets a
    // survivor win the ordinary election at once, well before the 700 ms heartbeat bound
    // that would be the only way in if w0 had kept the byte.
    std::thread::sleep(Duration::from_millis(250)); // the new broker's next beat adopts it
    c.proc(0).signal(libc::SIGSTOP);
    let killed = serving[0];
    c.kill(killed);
    let t = Instant::now();
    let next = loop {
        let running: Vec<u32> = c.live().into_iter().filter(|&s| s != 0).collect();
        if let Some(&b) = running.iter().find(|&&s| c.status(s).0) {
            break b;
        }
        assert!(t.elapsed() < Duration::from_secs(3), "no broker after the new one was killed");
        std::thread::sleep(Duration::from_millis(5));
    };
    let elected = t.elapsed();
    eprintln!("w{next} elected {elected:?} after the kill of w{killed}");
    assert!(elected < Duration::from_millis(500), "election took {elected:?}: the lock byte was not released");
    c.proc(0).signal(libc::SIGCONT);
    c.spawn(killed);
    c.start_stream(killed);
    std::thread::sleep(Duration::from_millis(200));
    let reports = c.finish_and_check();
    assert!(reports[&0].stat("failovers") >= 1, "w0 counted its step-down");
}

// ==========================================================================================
// 2. Item 10: the lock file removed under a running deployment.

/// w0 (broker), w1, w2 run; `ev.sock.lock` is removed. A new process for the live id 1 must
/// be refused (it can lock slot 1 in a fresh file; the broker refuses it). Once the live workers have moved their
/// locks into the file at the path, another process for id 1 is refused as `WidInUse`;
/// when the broker is killed, a survivor takes over on the same region and a restarted w0
/// joins it (no second broker on a fresh region): events from w2 reach both.
#[test]
fn a_removed_lock_file_lets_no_second_process_take_a_live_id_or_region() {
    let _serial = serial();
    let dir = TempDir::new("stuck-lock");
    let wd = Watchdog::new("stuck-lock");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.transport = Transport::SharedMemory;
    let w0 = wd.spawn(&cfg, Wid::Worker(0));
    let mut w1 = wd.spawn(&cfg, Wid::Worker(1));
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    let lock = dir.path().join("ev.sock.lock");
    assert!(dir.sock().ends_with("ev.sock"));
    std::fs::remove_file(&lock).unwrap();
    // At once: the intruder creates a fresh file and locks id 1 in it; the broker refuses its
    // HELLO (another lock file than its own).
    let err = wd.spawn_expect_err(&cfg, Wid::Worker(1));
    // (Before the fix: the intruder locked id 1 in a fresh file and retried "busy" forever,
    // "@@ERR not ready after 30 s".)
    assert!(err.contains("lock file"), "a second process for live id 1 was not refused for the lock file: {err}");
    eprintln!("refused at once: {err}");
    // Later: the live workers took their locks in the file at the path again.
    std::thread::sleep(Duration::from_millis(600));
    let err = wd.spawn_expect_err(&cfg, Wid::Worker(1));
    assert!(err.contains("already held"), "id 1 must be refused as in use: {err}");
    // The broker dies: a survivor takes over on the same region, and a new w0 joins it.
    w0.kill();
    let mut w0b = wd.spawn(&cfg, Wid::Worker(0));
    let r = w2.publish(Tgt::All, "lock", "after", 0, 20);
    assert_eq!((r.ok, r.err), (20, 0));
    assert!(w0b.until_within(20, Duration::from_secs(5)), "the new w0 does not get w2's events: another region?");
    assert!(w1.until_within(20, Duration::from_secs(5)), "w1 does not get w2's events");
    assert_eq!(w0b.report().stream("w2", "lock", "after"), seq(0, 20));
    assert_eq!(w1.report().stream("w2", "lock", "after"), seq(0, 20));
    let brokers: Vec<bool> = [&mut w0b, &mut w1, &mut w2]
        .into_iter()
        .map(|w| w.cmd(Cmd::Status)[0].split_whitespace().nth(1) == Some("1"))
        .collect();
    assert_eq!(brokers.iter().filter(|b| **b).count(), 1, "brokers (w0, w1, w2): {brokers:?}");
}
