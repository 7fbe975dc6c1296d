//! The wake path under hostile peers and crashes (issue 11, items 4, 5 and 19), with real
//! processes; the test process plays the hostile peer or the dying publisher through `/proc`
//! (it is the parent of its children, so `pidfd_getfd` and `/proc/<pid>/fd/N` are open to it):
//! 1. a peer that clears `O_NONBLOCK` on the shared eventfds and fills their counters cannot
//!    make a publisher block, and the receiver still gets its events (item 4);
//! 2. a publisher that dies after it claimed a receiver's wake-up (cleared `parked`) but
//!    before it wrote the eventfd leaves the receiver asleep for a bounded time only, not
//!    forever (item 5; the bound, 100 ms, is in ARCHITECTURE.md and `Worker::wait`);
//! 3. idle workers stay idle: after many rounds of bursts, no worker burns CPU while it waits
//!    with nothing to do (item 19);
//! 4. a publish that finds several receivers asleep wakes them all with one eventfd write
//!    (the fan-out eventfd in every worker's epoll set; issue 10, target P5).
//!
//! Time bounds here are liveness bounds (generous: they detect "never"), never speed
//! assertions; CPU time is compared with the wall time of the same window.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use support::procfs::{self, MappedRegion};
use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// How long a blocked publisher or a sleeping receiver may take before the test calls it stuck.
const LIVENESS: Duration = Duration::from_secs(10);

/// One test at a time: they measure CPU time and wake-up delays of several processes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wait (at most `limit`) until `child` sleeps in `epoll_wait`; where `/proc` cannot tell,
/// give it a moment. Returns whether it was seen asleep.
fn asleep_within(child: &Child, limit: Duration) -> bool {
    match child.blocked_in(&epoll_wait_syscalls(), limit) {
        Some(seen) => seen,
        None => {
            std::thread::sleep(Duration::from_millis(300));
            true
        }
    }
}

/// Shared memory, w0 the broker, w1 a receiver, w2 a publisher.
fn three_workers(name: &str) -> (TempDir, Watchdog, Cfg) {
    let dir = TempDir::new(name);
    let wd = Watchdog::new(name);
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.transport = Transport::SharedMemory;
    (dir, wd, cfg)
}

/// Five workers on shared memory: w0 the broker, w1..w3 the sleepers, w4 the publisher,
/// every sleeper past the publisher's first event (`source`/"hello"). Fields in drop order:
/// the children before their watchdog and directory.
struct FanoutGroup {
    sleepers: Vec<Child>,
    publisher: Child,
    _broker: Child,
    _wd: Watchdog,
    _dir: TempDir,
}

impl FanoutGroup {
    fn new(name: &str, source: &str) -> FanoutGroup {
        let dir = TempDir::new(name);
        let wd = Watchdog::new(name);
        let mut cfg = Cfg::new(&dir.sock(), 5);
        cfg.transport = Transport::SharedMemory;
        let broker = wd.spawn(&cfg, Wid::Worker(0));
        let mut sleepers: Vec<Child> = (1..4).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
        let mut publisher = wd.spawn(&cfg, Wid::Worker(4));
        let r = publisher.publish(Tgt::All, source, "hello", 0, 1);
        assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
        for s in sleepers.iter_mut() {
            s.until(1);
        }
        FanoutGroup { sleepers, publisher, _broker: broker, _wd: wd, _dir: dir }
    }

    /// Every sleeper parks until it has `n` events, and is seen asleep.
    fn park_all(&mut self, n: u64, round: u64) {
        for s in self.sleepers.iter_mut() {
            s.send(Cmd::Park { n });
            assert_eq!(s.next_line(), "@@PARKING");
        }
        for (i, s) in self.sleepers.iter().enumerate() {
            assert!(asleep_within(s, LIVENESS), "round {round}: w{} never went to sleep", i + 1);
        }
    }

    /// Every sleeper woke and reached `n` events.
    fn all_woken(&mut self, n: u64, round: u64) {
        for (i, s) in self.sleepers.iter_mut().enumerate() {
            let l = s.expect_ok_within(LIVENESS, &format!("round {round}: w{} was never woken", i + 1));
            assert!(l.iter().any(|x| x.starts_with(&format!("@@PARKED {n} "))), "round {round}: {l:?}");
        }
    }

    /// The publisher's (receivers woken, eventfd writes) so far.
    fn wake_counts(&mut self) -> (u64, u64) {
        let r = self.publisher.report();
        (r.stat("wakeups_sent"), r.stat("wake_writes"))
    }

    /// Every sleeper got the publisher's `source`/"x" stream 0..rounds, with no wait error
    /// and nothing lost.
    fn check_streams(&mut self, source: &str, rounds: u64) {
        for (i, s) in self.sleepers.iter_mut().enumerate() {
            let r = s.report();
            assert_eq!(r.stream("w4", source, "x"), seq(0, rounds), "w{}", i + 1);
            assert_eq!((r.stat("wait_errors"), r.stat("dispatch_errors"), r.stat("lost")), (0, 0, 0), "w{}", i + 1);
        }
    }
}

// ==========================================================================================
// 1. Item 4: an eventfd another process reconfigured never blocks us.

/// The test takes every eventfd the receiver holds (one open file description per slot and
/// the fan-out one, shared by every worker) with `pidfd_getfd`, clears `O_NONBLOCK` on it and fills its
/// counter to the maximum. A write of a non-zero value would now block until someone reads
/// the counter, and nobody does. The publisher must keep answering commands (its publishes
/// never block), and the receiver, asleep in `wait(None)`, must still get every event.
#[test]
fn a_peer_that_blocks_and_fills_the_eventfds_cannot_block_a_publisher() {
    const ROUNDS: u64 = 3;
    let _serial = serial();
    let (_dir, wd, cfg) = three_workers("wake-nonblock");
    let _broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
    let mut publisher = wd.spawn(&cfg, Wid::Worker(2));
    let efds = procfs::eventfds_of(receiver.pid());
    assert_eq!(efds.len(), 4, "the receiver holds one eventfd per slot and the fan-out one: {efds:?}");
    let stolen: Vec<_> = efds.iter().map(|&fd| procfs::pidfd_getfd(receiver.pid(), fd)).collect();
    for round in 0..ROUNDS {
        receiver.send(Cmd::Park { n: round + 1 });
        assert_eq!(receiver.next_line(), "@@PARKING");
        assert!(asleep_within(&receiver, LIVENESS), "round {round}: the receiver never went to sleep");
        for fd in &stolen {
            procfs::clear_nonblock_and_fill(fd);
        }
        publisher.send(Cmd::publish(Tgt::All, "efd", "x", round, 1));
        let l = publisher.expect_ok_within(
            LIVENESS,
            &format!("round {round}: the publisher blocked (a wake-up write on a blocking, full eventfd)"),
        );
        assert_eq!(PubResult::parse(&l).ok, 1, "round {round}: {l:?}");
        let l = receiver.expect_ok_within(LIVENESS, &format!("round {round}: the receiver was never woken"));
        assert!(l.iter().any(|x| x.starts_with(&format!("@@PARKED {} ", round + 1))), "round {round}: {l:?}");
        // Still answering commands, and the hostile settings are still in place.
        publisher.cmd(Cmd::Status);
        assert!(stolen.iter().all(|fd| !procfs::is_nonblocking(fd)), "the test's O_NONBLOCK change was undone");
    }
    let r = receiver.report();
    assert_eq!(r.stream("w2", "efd", "x"), seq(0, ROUNDS));
    assert_eq!((r.stat("wait_errors"), r.stat("dispatch_errors"), r.stat("lost")), (0, 0, 0));
}

/// The same with three receivers asleep, so that each publish claims three wake-ups and
/// writes the group's fan-out eventfd (the path of `one_fanout_write_wakes_every_sleeper_of_a_commit`
/// below): the test fills every eventfd the workers share, the fan-out one included, and
/// clears `O_NONBLOCK` on them. The publisher's one write per commit must neither block nor
/// be refused, and all three receivers must still get every event.
#[test]
fn a_peer_that_blocks_and_fills_the_fanout_eventfd_cannot_block_a_publisher() {
    const ROUNDS: u64 = 3;
    let _serial = serial();
    let mut g = FanoutGroup::new("wake-nonblock-fanout", "efd");
    let pid = g.sleepers[0].pid();
    let efds = procfs::eventfds_of(pid);
    assert_eq!(efds.len(), 6, "one eventfd per slot and the fan-out one: {efds:?}");
    let stolen: Vec<_> = efds.iter().map(|&fd| procfs::pidfd_getfd(pid, fd)).collect();
    let (woken_before, writes_before) = g.wake_counts();
    for round in 0..ROUNDS {
        g.park_all(round + 2, round);
        for fd in &stolen {
            procfs::clear_nonblock_and_fill(fd);
        }
        g.publisher.send(Cmd::publish(Tgt::All, "efd", "x", round, 1));
        let l = g.publisher.expect_ok_within(
            LIVENESS,
            &format!("round {round}: the publisher blocked (a fan-out write on a blocking, full eventfd)"),
        );
        assert_eq!(PubResult::parse(&l).ok, 1, "round {round}: {l:?}");
        g.all_woken(round + 2, round);
        assert!(stolen.iter().all(|fd| !procfs::is_nonblocking(fd)), "the test's O_NONBLOCK change was undone");
    }
    let (woken, writes) = g.wake_counts();
    let (woken, writes) = (woken - woken_before, writes - writes_before);
    assert!(
        woken >= 3 * ROUNDS && writes == ROUNDS,
        "each round's publish should wake the 3 sleepers with one fan-out write: {woken} woken, {writes} writes"
    );
    g.check_streams("efd", ROUNDS);
}

// ==========================================================================================
// 2. Item 5: a publisher killed between claiming a wake-up and writing the eventfd.

/// A receiver asleep in `wait(None)`; the test maps its region through `/proc/<pid>/fd/N`
/// and clears its `parked` flag, exactly what a publisher does when it claims the wake-up
/// (the swap `1 -> 0`). Then another publisher commits an event into the receiver's ring: it
/// finds the flag cleared (someone else owns the wake-up) and writes no eventfd. This is
/// the state a publisher SIGKILLed between its swap and its write leaves behind: a committed
/// record, `parked == 0`, and no wake-up on its way. The receiver must deliver the event
/// anyway, within a bounded time (100 ms by the library's bound; the test fails only past
/// 2 s, which no bounded re-check misses and which "forever" does).
#[test]
fn a_wake_up_claimed_by_a_publisher_that_died_is_not_lost() {
    const ROUNDS: u64 = 4;
    let _serial = serial();
    let (_dir, wd, cfg) = three_workers("wake-crash");
    let _broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
    let mut publisher = wd.spawn(&cfg, Wid::Worker(2));
    let region = MappedRegion::of(receiver.pid());
    let mut delays = Vec::new();
    for round in 0..ROUNDS {
        receiver.send(Cmd::Park { n: round + 1 });
        assert_eq!(receiver.next_line(), "@@PARKING");
        assert!(asleep_within(&receiver, LIVENESS), "round {round}: the receiver never went to sleep");
        // The dying publisher's claim: the swap that makes it the one to write the eventfd.
        assert_eq!(region.parked(1).swap(0, std::sync::atomic::Ordering::SeqCst), 1, "round {round}: not parked");
        let r = publisher.publish(Tgt::All, "crash", "x", round, 1);
        assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
        let start = Instant::now();
        let l = receiver.expect_ok_within(
            Duration::from_secs(2),
            &format!("round {round}: a committed event and a claimed wake-up that never came left the receiver asleep"),
        );
        delays.push(start.elapsed());
        assert!(l.iter().any(|x| x.starts_with(&format!("@@PARKED {} ", round + 1))), "round {round}: {l:?}");
    }
    eprintln!("delivery after a lost wake-up write: {delays:?}");
    let r = receiver.report();
    assert_eq!(r.stream("w2", "crash", "x"), seq(0, ROUNDS));
    assert_eq!((r.stat("wait_errors"), r.stat("lost")), (0, 0));
}

/// As above, with the receiver asleep in the caller's own poller: poll(2) on the worker's
/// fd, dispatching when it turns readable (an event loop that owns the worker). No eventfd
/// write comes; the worker's fd must turn readable by itself within a bounded time, and the
/// `dispatch` that follows must deliver the event.
#[test]
fn a_wake_up_claimed_by_a_publisher_that_died_is_not_lost_in_an_external_poller() {
    const ROUNDS: u64 = 4;
    let _serial = serial();
    let (_dir, wd, cfg) = three_workers("wake-crash-fd");
    let _broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
    let mut publisher = wd.spawn(&cfg, Wid::Worker(2));
    let region = MappedRegion::of(receiver.pid());
    let mut delays = Vec::new();
    for round in 0..ROUNDS {
        receiver.send(Cmd::PollFd { ms: 2000 });
        assert_eq!(receiver.next_line(), "@@POLLING");
        match receiver.blocked_in(&poll_syscalls(), LIVENESS) {
            Some(true) | None => {}
            Some(false) => panic!("round {round}: the receiver never went to sleep in poll(2)"),
        }
        // A dispatch returning 0 left the wake-up armed; the dying publisher claims it.
        assert_eq!(region.parked(1).swap(0, std::sync::atomic::Ordering::SeqCst), 1, "round {round}: not armed");
        let r = publisher.publish(Tgt::All, "crash", "x", round, 1);
        assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
        let start = Instant::now();
        let l = receiver.expect_ok_within(LIVENESS, "pollfd");
        delays.push(start.elapsed());
        let f: Vec<&str> = l.iter().find(|x| x.starts_with("@@POLLED")).expect("@@POLLED").split(' ').collect();
        assert!(
            f[1] == "1" && f[2].parse::<u64>().unwrap() > 0,
            "round {round}: a committed event and a claimed wake-up that never came: the worker's fd \
             did not turn readable (or dispatch found nothing) within 2 s: {l:?}"
        );
    }
    eprintln!("delivery in an external poller after a lost wake-up write: {delays:?}");
    let r = receiver.report();
    assert_eq!(r.stream("w2", "crash", "x"), seq(0, ROUNDS));
}

// ==========================================================================================
// 3. Item 19: no idle worker spins.

/// Four workers publish bursts to everyone (each also dispatches between its publishes, so
/// wake-ups race with arms and disarms in every order), then all go idle in `wait(None)`.
/// In each round, over 400 ms of idleness, no worker may use more than a small fraction of
/// the wall time in CPU (a worker spinning in its wait loop uses all of one CPU, or what the
/// machine's load leaves it). A fifth worker releases the parked ones at the end of the round.
#[test]
fn idle_workers_do_not_spin_after_bursts() {
    const WORKERS: u32 = 4;
    const ROUNDS: u64 = 30;
    const BURST: u64 = 40;
    const IDLE: Duration = Duration::from_millis(400);
    /// A parked worker wakes every 100 ms (its re-check) and 5-10 times a second for its
    /// control timer: far below 1% of a CPU (CPU time is counted in clock ticks, so one tick
    /// may show as 2.5% of 400 ms). A spinning one uses a whole CPU, or what the load leaves
    /// it (20-25% was seen on a loaded 2-vCPU machine).
    const MAX_CPU_SHARE: f64 = 0.1;
    /// The same with the time spent waiting for a CPU (schedstat, in ns): a spinner demands a
    /// whole CPU (about 100%) however loaded the machine; an idle worker about 0%.
    const MAX_DEMAND_SHARE: f64 = 0.3;
    let _serial = serial();
    let dir = TempDir::new("wake-idle");
    let wd = Watchdog::new("wake-idle");
    let mut cfg = Cfg::new(&dir.sock(), WORKERS + 1);
    cfg.transport = Transport::SharedMemory;
    let mut ws: Vec<Child> = (0..WORKERS).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let mut releaser = wd.spawn(&cfg, Wid::Worker(WORKERS));
    let (mut worst, mut worst_demand) = (0.0f64, 0.0f64);
    for round in 0..ROUNDS {
        for w in ws.iter_mut() {
            w.send(Cmd::publish(Tgt::All, "burst", "x", round * BURST, BURST));
        }
        for w in ws.iter_mut() {
            let r = w.publish_end();
            assert_eq!((r.ok, r.err), (BURST, 0), "round {round}: {:?}", r.errors);
        }
        // Every burst so far (their own included), the releases of the earlier rounds, and
        // this round's release: parked until the release comes.
        let want = (round + 1) * BURST * u64::from(WORKERS) + round + 1;
        for w in ws.iter_mut() {
            w.send(Cmd::Park { n: want });
            assert_eq!(w.next_line(), "@@PARKING");
        }
        // A spinning worker never sleeps: look for at most a moment, then measure anyway.
        for w in &ws {
            asleep_within(w, Duration::from_millis(300));
        }
        let sample = |w: &Child| (procfs::cpu_time(w.pid()), procfs::cpu_demand(w.pid()));
        let before: Vec<_> = ws.iter().map(sample).collect();
        let t0 = Instant::now();
        std::thread::sleep(IDLE);
        let after: Vec<_> = ws.iter().map(sample).collect();
        let wall = t0.elapsed().as_secs_f64();
        for (i, ((cpu0, dem0), (cpu1, dem1))) in before.iter().zip(&after).enumerate() {
            let cpu = cpu1.saturating_sub(*cpu0).as_secs_f64() / wall;
            let demand = dem0.zip(*dem1).map(|(d0, d1)| d1.saturating_sub(d0).as_secs_f64() / wall);
            worst = worst.max(cpu);
            worst_demand = worst_demand.max(demand.unwrap_or(0.0));
            assert!(
                cpu <= MAX_CPU_SHARE && demand.is_none_or(|d| d <= MAX_DEMAND_SHARE),
                "round {round}: idle worker w{i} used {:.0}% of a CPU (and was running or runnable {}) over \
                 {IDLE:?} with nothing to do: it spins",
                cpu * 100.0,
                demand.map_or("unknown".to_string(), |d| format!("{:.0}% of the time", d * 100.0)),
            );
        }
        let r = releaser.publish(Tgt::All, "release", "x", round, 1);
        assert_eq!((r.ok, r.err), (1, 0));
        for (i, w) in ws.iter_mut().enumerate() {
            let l = w.expect_ok_within(LIVENESS, &format!("round {round}: w{i} was never released"));
            assert!(l.iter().any(|x| x.starts_with(&format!("@@PARKED {want} "))), "round {round} w{i}: {l:?}");
        }
    }
    eprintln!(
        "highest share of an idle worker over {ROUNDS} rounds: CPU {:.1}%, running or runnable {:.1}%",
        worst * 100.0,
        worst_demand * 100.0
    );
    for (i, w) in ws.iter_mut().enumerate() {
        let r = w.report();
        for p in 0..WORKERS {
            assert_eq!(r.stream(&format!("w{p}"), "burst", "x"), seq(0, ROUNDS * BURST), "w{i} from w{p}");
        }
        assert_eq!((r.stat("wait_errors"), r.stat("lost")), (0, 0), "w{i}");
    }
}

/// The same for a worker asleep in the caller's own poller (poll(2) on the worker's fd,
/// `dispatch` each time it turns readable), with nothing to do for 1 s after a burst: its fd
/// turns readable for its timers (a re-check every 100 ms, the control timer), each time
/// once; it must not stay readable (the caller's poller would spin on it).
#[test]
fn an_idle_worker_in_an_external_poller_does_not_spin() {
    const IDLE_MS: u64 = 1000;
    let _serial = serial();
    let (_dir, wd, cfg) = three_workers("wake-idle-fd");
    let _broker = wd.spawn(&cfg, Wid::Worker(0));
    let mut receiver = wd.spawn(&cfg, Wid::Worker(1));
    let mut publisher = wd.spawn(&cfg, Wid::Worker(2));
    let r = publisher.publish(Tgt::All, "burst", "x", 0, 200);
    assert_eq!((r.ok, r.err), (200, 0));
    assert!(receiver.until_within(200, LIVENESS));
    let (cpu0, dem0) = (procfs::cpu_time(receiver.pid()), procfs::cpu_demand(receiver.pid()));
    let t0 = Instant::now();
    receiver.send(Cmd::PollFd { ms: IDLE_MS });
    let l = receiver.expect_ok_within(LIVENESS, "pollfd");
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, dem1) = (procfs::cpu_time(receiver.pid()), procfs::cpu_demand(receiver.pid()));
    let f: Vec<&str> = l.iter().find(|x| x.starts_with("@@POLLED")).expect("@@POLLED").split(' ').collect();
    let spurious: u64 = f[3].parse().unwrap();
    let cpu = cpu1.saturating_sub(cpu0).as_secs_f64() / wall;
    let demand = dem0.zip(dem1).map(|(a, b)| b.saturating_sub(a).as_secs_f64() / wall);
    eprintln!("idle in poll(2) for {IDLE_MS} ms: {l:?}, CPU {:.1}%, running or runnable {demand:?}", cpu * 100.0);
    assert_eq!(f[2], "0", "nothing was published: {l:?}");
    // 10 re-checks and 5 control ticks a second, each one readable edge: far below this.
    assert!(spurious <= 100, "the worker's fd turned readable {spurious} times in {IDLE_MS} ms with nothing to do");
    assert!(cpu <= 0.1 && demand.is_none_or(|d| d <= 0.3), "idle in poll(2): CPU {:.0}%, {demand:?}", cpu * 100.0);
}

// ==========================================================================================
// 4. The fan-out: one write wakes every sleeper of a commit.

/// Five workers: w1, w2 and w3 asleep in `wait(None)`, w4 publishes one event to all. Its
/// commit claims the three sleepers' wake-ups (and the broker's, if its dispatch loop had
/// armed) and writes the group's fan-out eventfd once, not one eventfd per sleeper: the
/// publisher's `wakeups_sent` rises by at least 3 and its `wake_writes` by exactly 1. Every
/// sleeper's epoll set holds two eventfds (its own and the fan-out one), every sleeper wakes
/// and gets the event, in 5 rounds. (Fewer claims than `FANOUT_MIN` are written one per
/// receiver: `tests/batch.rs`, two receivers, at most two writes.)
#[test]
fn one_fanout_write_wakes_every_sleeper_of_a_commit() {
    const ROUNDS: u64 = 5;
    let _serial = serial();
    let mut g = FanoutGroup::new("wake-fanout", "fan");
    for s in &g.sleepers {
        let registered = procfs::eventfds_in_epoll(s.pid());
        assert_eq!(registered.len(), 2, "pid {}: its own eventfd and the fan-out one in its epoll set", s.pid());
    }
    for round in 0..ROUNDS {
        g.park_all(round + 2, round);
        let (woken_before, writes_before) = g.wake_counts();
        let r = g.publisher.publish(Tgt::All, "fan", "x", round, 1);
        assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
        g.all_woken(round + 2, round);
        let (woken, writes) = g.wake_counts();
        let (woken, writes) = (woken - woken_before, writes - writes_before);
        assert!(woken >= 3, "round {round}: the publish claimed {woken} sleepers' wake-ups, expected the 3 asleep");
        assert_eq!(
            writes, 1,
            "round {round}: {woken} sleepers woken with {writes} eventfd writes, expected one fan-out write"
        );
    }
    g.check_streams("fan", ROUNDS);
}
