//! `worker_events::tokio::AsyncWorker` (feature `tokio`): a child process drives its worker
//! with it on a current-thread runtime and answers pings three ways (from a callback, from
//! the task that owns the worker on behalf of a handler task, from the callback of a
//! `Current` event that no fd announces); the test process plays the other worker. Plus
//! in-process checks of waiting, cancel safety and local work.
//!
//! A lost wake-up does not hang a worker forever (its re-check and control timers wake it
//! within 100-200 ms), so the tests bound the time of many serial round trips: one lost
//! wake-up per round costs tens of milliseconds each, far over the bound.

#![cfg(feature = "tokio")]

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use worker_events::tokio::AsyncWorker;
use worker_events::{Events, Options, Target, Wid, Worker};

child_entry!();

/// Serial round trips between the test process (worker 1, plain `wait`) and a tokio child
/// (worker 0, the broker): each ping waits for its three pongs before the next is sent.
fn tokio_child_answers_every_ping_without_losing_a_wakeup() {
    round_trips_with_a_tokio_child(Wid::Worker(0), Wid::Worker(1));
}

/// The same with the tokio child as an ordinary worker (worker 1) attached to a broker in
/// another process (the test process, worker 0, attached before the child starts): its
/// events and wake-ups cross the data path to a broker it does not serve.
fn a_non_broker_tokio_child_answers_every_ping_without_losing_a_wakeup() {
    round_trips_with_a_tokio_child(Wid::Worker(1), Wid::Worker(0));
}

fn round_trips_with_a_tokio_child(child_wid: Wid, my_wid: Wid) {
    const ROUNDS: u64 = 100;
    let dir = TempDir::new("tokio");
    let wd = Watchdog::new("tokio");
    let cfg = Cfg::new(&dir.sock(), 2);
    // Worker 0 starts first and serves as the broker.
    let spawn = Spawn { tokio: true, ..Spawn::worker(child_wid) };
    let (child, mut w) = if my_wid == Wid::Worker(0) {
        let mut w = Events::new(cfg.options()).unwrap().init_worker(my_wid).unwrap();
        assert!(w.wait_ready(Duration::from_secs(10)).unwrap(), "the test process is elected");
        assert!(w.is_broker(), "worker 0, alone, serves as the broker");
        let child = wd.spawn_serving(&cfg, &spawn, &mut w);
        (child, w)
    } else {
        let child = wd.spawn_with(&cfg, &spawn);
        (child, Events::new(cfg.options()).unwrap().init_worker(my_wid).unwrap())
    };
    let pongs = Arc::new(Mutex::new(BTreeSet::new()));
    let p = pongs.clone();
    w.subscribe("pong", "*", move |ev| {
        assert_eq!(ev.wid(), Some(child_wid));
        let first = p.lock().unwrap().insert((ev.event().to_string(), ev.deserialize::<u64>().unwrap()));
        assert!(first, "pong {} twice", ev.event());
    });
    assert!(w.wait_ready(Duration::from_secs(10)).unwrap(), "attached to the tokio child");
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for n in 0..ROUNDS {
        let t = Instant::now();
        w.publish(Target::All, "ping", "n", &n).unwrap();
        let want = ["cb", "loc", "task"].map(|k| (k.to_string(), n));
        while !want.iter().all(|k| pongs.lock().unwrap().contains(k)) {
            assert!(t.elapsed() < Duration::from_secs(5), "round {n}: pongs {:?}", pongs.lock().unwrap());
            w.wait(Some(Duration::from_millis(50))).unwrap();
        }
        slowest = slowest.max(t.elapsed());
    }
    let total = start.elapsed();
    assert_eq!(pongs.lock().unwrap().len() as u64, 3 * ROUNDS);
    // About a millisecond a round when every wake-up arrives; a lost one costs a timer
    // period (100 ms) at worst, 50 ms on average.
    assert!(total < Duration::from_secs(3), "{ROUNDS} round trips took {total:?} (slowest {slowest:?})");
    // Idle: the child sleeps in epoll_wait (tokio's park), it does not spin.
    let sleeping = child
        .blocked_in(&[libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2], Duration::from_secs(2));
    assert_ne!(sleeping, Some(false), "the tokio child never slept in epoll_wait");
    w.publish(Target::All, "ctl", "exit", &0u64).unwrap();
    while !w.flush() {
        w.wait(Some(Duration::from_millis(10))).unwrap();
    }
    let done = child.next_line_within(Duration::from_secs(10), "@@DONE of the tokio child");
    let f: Vec<u64> = done.split(' ').skip(1).map(|x| x.parse().unwrap()).collect();
    assert_eq!(f.len(), 2, "{done}");
    assert_eq!(f[1], 0, "AsyncWorker::dispatch returned 0 {} times", f[1]);
    // Pings, loc events and the exit at least (the attach's events may add notices).
    assert!(f[0] > 2 * ROUNDS, "{done}");
    // The roles were as the test says: the broker is worker 0 on either side.
    assert_eq!(w.is_broker(), my_wid == Wid::Worker(0));
    drop(w);
}

/// A worker of one slot on the transport the test runs (it elects itself).
fn solo(name: &str) -> (TempDir, Worker) {
    let dir = TempDir::new(name);
    let o = Options::new(dir.sock()).workers(1).transport(transport());
    let w = Events::new(o).unwrap().init_worker(Wid::Worker(0)).unwrap();
    assert!(w.is_ready());
    (dir, w)
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Work that no fd announces (our own publishes between dispatches, and what a callback
/// published) is run by the next `dispatch().await` at once; with nothing to do it waits
/// (cancel-safe: a timed-out wait loses nothing), and it never returns 0.
fn local_work_runs_at_once_and_idle_dispatch_waits() {
    let (_dir, mut w) = solo("tokio-local");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    w.subscribe("a", "b", move |ev| s.lock().unwrap().push(ev.deserialize::<u64>().unwrap()));
    w.subscribe_with("a", "echo", |cx, ev| {
        let n: u64 = ev.deserialize().unwrap();
        cx.publish(Target::Current, "a", "b", &(n + 1000)).unwrap();
    });
    current_thread().block_on(async move {
        let mut aw = AsyncWorker::new(w).unwrap();
        let idle = tokio::time::timeout(Duration::from_millis(30), aw.dispatch()).await;
        assert!(idle.is_err(), "nothing to do: dispatch waits, got {idle:?}");
        let start = Instant::now();
        for n in 0..100u64 {
            aw.worker_mut().publish(Target::Current, "a", "b", &n).unwrap();
            aw.worker_mut().publish(Target::All, "a", "echo", &n).unwrap();
            let mut got = 0;
            while got < 3 {
                let k = tokio::time::timeout(Duration::from_secs(2), aw.dispatch()).await;
                let k = k.expect("local work waited for a wake-up").unwrap();
                assert!(k > 0);
                got += k;
            }
            assert_eq!(got, 3, "round {n}");
        }
        let took = start.elapsed();
        assert!(took < Duration::from_secs(1), "100 rounds of local work took {took:?}");
        let want: Vec<u64> = (0..100).flat_map(|n| [n, n + 1000]).collect();
        assert_eq!(*seen.lock().unwrap(), want);
        let idle = tokio::time::timeout(Duration::from_millis(30), aw.dispatch()).await;
        assert!(idle.is_err(), "all done: dispatch waits again");
        let mut w = aw.into_inner();
        assert_eq!(w.dispatch().unwrap(), 0);
        assert_eq!(w.stats().delivered, 300);
    });
}

per_transport!(
    tokio_child_answers_every_ping_without_losing_a_wakeup,
    a_non_broker_tokio_child_answers_every_ping_without_losing_a_wakeup,
    local_work_runs_at_once_and_idle_dispatch_waits
);
