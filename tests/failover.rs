//! Failover tests with real SIGKILL (ARCHITECTURE.md §G3 and §G4):
//! 1. the broker killed 20 times under a steady stream of `All` events (election time
//!    asserted and printed), on shared memory and on the socket transport;
//! 2. random worker kills and restarts;
//! 3. a publisher killed in the middle of multi-fragment messages;
//! 4. unique events across broker kills;
//! 5. a dead slot's queue filling up;
//! 6. a graceful close of the broker;
//! 7. unique targets skipping a dead slot;
//! 8. a restarted worker attaching while the broker still holds its dead predecessor's
//!    connection.
//!
//! The children run the harness's one child role (`tests/support/role.rs`) with the run
//! recorder (`tests/support/record.rs`): they publish sequence-numbered runs at a fixed rate,
//! check what they receive on the fly (per publisher incarnation: in order, no duplicate, no
//! gap), log unique deliveries to a file (which survives a SIGKILL), and keep a per-slot
//! "last sequence received" table in a shared file mapping, so the successor of a killed
//! worker can show that it continues exactly where its predecessor stopped.
//! `tests/support/cluster.rs` keeps the bookkeeping and checks the invariants.
//!
//! Runs are named after the publisher's incarnation: slot `p` restarted for the `k`-th time
//! publishes event `i<k>` with sequence numbers from 0.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::cluster::{StreamInfo, unique_deliveries};
use support::*;
use worker_events::Wid;

/// The tests of this file run one at a time: each already runs up to 6 processes on a
/// small machine, and the failover times they measure should not include another test.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

child_entry!();

/// The `p` percentile of a sample (see `worker_events_dev_support::percentile`).
fn percentile(v: &[f64], p: f64) -> f64 {
    Sample::new(v.iter().copied()).percentile(p).expect("a non-empty sample")
}

// ==========================================================================================
// 1. The broker killed 20 times in a row under a steady stream of All events.

#[test]
fn broker_killed_20_times_under_all_stream() {
    broker_kills_under_all_stream(false);
}

/// The same on the socket transport, as far as it allows: events that died with a broker
/// are lost, but each loss is reported to each receiver (lost notices = gaps, exactly), and
/// nothing arrives twice or out of order.
#[test]
fn socket_broker_killed_20_times_under_all_stream() {
    broker_kills_under_all_stream(true);
}

fn broker_kills_under_all_stream(socket: bool) {
    let _serial = serial();
    const CYCLES: usize = 20;
    let mut c = Cluster::new(
        if socket { "fo-sock-broker" } else { "fo-broker" },
        |cfg| {
            cfg.max_queue_len = Some(1_000_000);
            if socket {
                cfg.transport = worker_events::Transport::Socket;
            }
        },
        6,
        &[3, 4, 5],
        5.0,
    );
    c.spawn_all();
    let mut last_epoch = 0;
    let mut elect_ms = Vec::new();
    let mut ready_ms = Vec::new();
    let mut killed_publishers = 0;
    for cycle in 0..CYCLES {
        let b = c.broker().unwrap_or_else(|| panic!("cycle {cycle}: no broker"));
        if c.publishers.contains(&b) {
            killed_publishers += 1;
        }
        let kill_ns = c.kill(b);
        // Wait until every survivor got the broker notice of the new election.
        let survivors = c.live();
        let mut seen: BTreeMap<u32, (u64, u32, u64)> = BTreeMap::new();
        while seen.len() < survivors.len() {
            assert!(c.wd.remaining() > Duration::from_secs(8), "cycle {cycle}: failover not complete: {seen:?}");
            for &s in &survivors {
                if seen.contains_key(&s) {
                    continue;
                }
                let l = c.proc(s).cmd(Cmd::Brokers);
                let last = Report::parse(&l).brokers.last().copied();
                if let Some(n) = last.filter(|n| n.0 > last_epoch) {
                    seen.insert(s, n);
                }
            }
        }
        let epochs: Vec<u64> = seen.values().map(|n| n.0).collect();
        let new_broker = seen.values().next().unwrap().1;
        assert!(seen.values().all(|n| n.1 == new_broker && n.0 == epochs[0]), "cycle {cycle}: disagreement {seen:?}");
        assert!(new_broker != b, "cycle {cycle}: the dead worker cannot be the new broker");
        last_epoch = epochs[0];
        let elected = seen[&new_broker].2;
        let all = seen.values().map(|n| n.2).max().unwrap();
        elect_ms.push(elected.saturating_sub(kill_ns) as f64 / 1e6);
        ready_ms.push(all.saturating_sub(kill_ns) as f64 / 1e6);
        // is_ready()/is_broker() agree.
        for &s in &survivors {
            let (broker, ready) = c.status(s);
            assert_eq!(broker, s == new_broker, "cycle {cycle}: w{s} is_broker");
            assert!(ready, "cycle {cycle}: w{s} not ready after the failover");
        }
        // Replace the dead worker (same Wid) and keep its slot publishing if it did.
        c.spawn(b);
        c.start_stream(b);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    c.finish_and_check();
    // The election target (ARCHITECTURE.md, performance targets): a new broker serves in
    // under 100 ms; asserted on the median of the kills (one slow election on a loaded
    // machine is not a failure), and every election within a liveness bound.
    let median = percentile(&elect_ms, 0.5);
    assert!(median < 100.0, "median election time {median:.1} ms over {CYCLES} kills, target < 100 ms: {elect_ms:?}");
    let worst = percentile(&elect_ms, 1.0);
    assert!(worst < 5000.0, "an election took {worst:.1} ms (liveness bound 5 s): {elect_ms:?}");
    if socket {
        eprintln!("socket transport: {} events died with killed brokers, every one reported", c.socket_losses);
    }
    eprintln!(
        "{} broker failover over {CYCLES} kills ({killed_publishers} of them a publisher): new broker elected after \
         p50 {:.1} ms, p99 {:.1} ms (max {:.1}); every survivor re-attached after p50 {:.1} ms, p99 {:.1} ms (max {:.1})",
        if socket { "socket-transport" } else { "shared-memory" },
        percentile(&elect_ms, 0.5),
        percentile(&elect_ms, 0.99),
        percentile(&elect_ms, 1.0),
        percentile(&ready_ms, 0.5),
        percentile(&ready_ms, 0.99),
        percentile(&ready_ms, 1.0),
    );
}

// ==========================================================================================
// 2. Random worker kills and restarts, 50 cycles.

#[test]
fn random_worker_kills_and_restarts_50_cycles() {
    let _serial = serial();
    const CYCLES: usize = 50;
    let mut rng = Rng::from_env_or_clock("WE_FO_SEED");
    let seed = rng.seed();
    eprintln!("random kills: seed {seed} (WE_FO_SEED={seed} replays the choices)");
    let mut c = Cluster::new(
        "fo-random",
        |cfg| {
            cfg.max_queue_len = Some(1_000_000);
        },
        5,
        &[1, 2, 3],
        5.0,
    );
    c.spawn_all();
    for _ in 0..CYCLES {
        // One victim, sometimes two at once; let the traffic flow a little in between.
        let mut victims = vec![rng.below(5) as u32];
        if rng.below(3) == 0 {
            let v = rng.below(5) as u32;
            if v != victims[0] {
                victims.push(v);
            }
        }
        for &v in &victims {
            c.kill(v);
            std::thread::sleep(Duration::from_millis(rng.below(20)));
        }
        for &v in &victims {
            c.spawn(v);
            c.start_stream(v);
        }
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        assert!(c.wd.remaining() > Duration::from_secs(15), "too slow: 50 cycles did not fit the test's time budget");
    }
    c.finish_and_check();
}

// ==========================================================================================
// 3. A publisher killed in the middle of multi-fragment messages.

#[test]
fn publisher_killed_mid_message_leaves_no_partial_record() {
    let _serial = serial();
    const LEN: usize = 100 * 1024; // ~13 fragments of at most 8 KiB in a 16 KiB ring
    let mut c = Cluster::new(
        "fo-partial",
        |cfg| {
            cfg.ring_capacity = Some(16 * 1024);
            cfg.max_payload_len = Some(1024 * 1024);
        },
        3,
        &[1],
        1.0,
    );
    // Each cut message may cost its receivers one lost notice when the next incarnation
    // starts a new message: never a partial or corrupt message. And each kill may cost one
    // more: the message waiting in the killed publisher's backlog behind the cut one
    // (`big-run` keeps at most two waiting per peer), reported lost since issue 11 item
    // 6(a) (before, it vanished silently, which this test did not see: runs of killed
    // incarnations have no expected end).
    c.allow_lost.insert(2, 12);
    c.spawn_all();
    let mut rng = Rng::from_clock();
    for _ in 0..6 {
        if c.procs[2].is_none() {
            c.spawn(2);
        }
        c.proc(2).cmd(Cmd::BigRun { len: LEN });
        let inc = c.procs[2].as_ref().unwrap().inc;
        c.clock += 1;
        c.streams.insert((2, inc), StreamInfo { started: c.clock, total: None, killed: false });
        // Let it stream, then kill it wherever it is.
        std::thread::sleep(Duration::from_millis(30 + rng.below(50)));
        c.kill(2);
    }
    // A last incarnation streams to completion: receivers keep working after the kills.
    c.spawn(2);
    c.proc(2).cmd(Cmd::BigRun { len: LEN });
    let inc = c.procs[2].as_ref().unwrap().inc;
    c.clock += 1;
    let started = c.clock;
    std::thread::sleep(Duration::from_millis(100));
    let l = c.proc(2).cmd(Cmd::BigRunStop);
    let total: u64 = l[0].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(l[0].split_whitespace().nth(2), Some("0"), "big-payload publish errors: {l:?}");
    c.streams.insert((2, inc), StreamInfo { started, total: Some(total), killed: false });
    let reports = c.finish_and_check();
    for (s, r) in &reports {
        if *s == 2 {
            continue;
        }
        let big: Vec<_> = r.runs.iter().filter(|((p, _), _)| *p == 2).collect();
        let whole: u64 = big.iter().map(|(_, st)| st.count).sum();
        assert!(big.len() >= 2, "w{s}: big messages from {} incarnations only", big.len());
        eprintln!(
            "w{s}: {whole} whole 100 KiB messages from {} incarnations of w2, none partial or corrupt; \
             lost notices {:?}",
            big.len(),
            r.lost
        );
    }
}

// ==========================================================================================
// 4. Unique events across broker kills: never delivered twice.

#[test]
fn unique_events_across_broker_kills_never_twice() {
    let _serial = serial();
    const N: u64 = 2000;
    const KILLS: usize = 5;
    let mut c = Cluster::new(
        "fo-unique",
        |cfg| {
            cfg.unique_timeout_ms = Some(120_000);
        },
        4,
        &[],
        0.0,
    );
    c.spawn_all();
    // Every worker publishes the same hashes h0..h{N-1}; so does every successor, from 0
    // again: everything after the first copy of a hash is a duplicate, across broker kills.
    for s in c.live() {
        c.proc(s).cmd(Cmd::URun { rate: 1.0, end: N });
    }
    let mut rng = Rng::from_clock();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(100 + rng.below(200)));
        let b = c.broker().expect("a broker");
        c.kill(b);
        c.spawn(b);
        c.proc(b).cmd(Cmd::URun { rate: 1.0, end: N });
    }
    // Wait until every live publisher has published everything and had it acknowledged.
    loop {
        assert!(c.wd.remaining() > Duration::from_secs(8), "unique events still pending");
        let mut done = true;
        for s in c.live() {
            let l = c.proc(s).cmd(Cmd::URunCount);
            let f: Vec<u64> = l[0].split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
            assert_eq!(f[3], 0, "w{s}: unique publish errors: {l:?}");
            done &= f[0] == f[1] && f[2] == 0;
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for s in c.live() {
        let l = c.proc(s).cmd(Cmd::Drain { ms: 5000 });
        assert_eq!(l, ["@@DRAINED reached"], "w{s}: inbound rings not drained within 5 s");
        let r = c.report(s);
        assert_eq!(r.stat("other"), 0, "w{s}: unexpected or undecodable events");
        assert_eq!(r.stat("dropped"), 0, "w{s}: malformed messages");
        assert_eq!(r.stat("wait_errors"), 0, "w{s}: Worker::wait failed (see its stderr)");
    }
    let d = unique_deliveries(c.dir.path());
    let twice: Vec<_> = d.iter().filter(|&(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "unique events delivered more than once: {twice:?}");
    let missing: Vec<u64> = (0..N).filter(|n| !d.contains_key(n)).collect();
    assert!(d.keys().all(|&n| n < N));
    eprintln!(
        "unique across {KILLS} broker kills: {} hashes delivered exactly once, {} missing {:?}",
        d.len(),
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // A broker killed between recording a hash and writing the event into its target's
    // ring loses that one event (at most once, never twice): at most one per broker kill.
    // Every kill of this test is a broker kill.
    assert_eq!(c.kills, KILLS as u64, "kills made");
    assert!(
        missing.len() as u64 <= c.kills,
        "{} unique events never delivered (at most one per broker kill, {} kills): {missing:?}",
        missing.len(),
        c.kills
    );
}

// ==========================================================================================
// 5. A dead worker's queue fills up, is counted, and never blocks or fails a publisher.

#[test]
fn dead_slot_queue_fills_is_counted_and_successor_is_told() {
    let _serial = serial();
    let mut c = Cluster::new(
        "fo-deadslot",
        |cfg| {
            cfg.ring_capacity = Some(4096);
            cfg.max_queue_len = Some(100);
        },
        3,
        &[],
        0.0,
    );
    c.spawn_all();
    let l = c.proc(1).cmd(Cmd::RunBurst { n: 10 });
    assert!(l[0].ends_with(" 0"), "{l:?}");
    let l = c.proc(2).cmd(Cmd::Reach { ms: 5000, want: vec![(1, 0, 9)] });
    assert_eq!(l, ["@@REACH reached"]);
    c.kill(2);
    // Far more than the dead slot's ring (about 100 events) and backlog (100) hold. In
    // chunks the live worker 0 drains in between, so that only the dead slot overflows.
    for chunk in 1..=40 {
        let l = c.proc(1).cmd(Cmd::RunBurst { n: 50 });
        assert_eq!(l[0], format!("@@COUNT {} 0", 10 + 50 * chunk), "publish failed or blocked");
        let l = c.proc(0).cmd(Cmd::Reach { ms: 5000, want: vec![(1, 0, 9 + 50 * chunk)] });
        assert_eq!(l, ["@@REACH reached"], "chunk {chunk}");
    }
    let r1 = c.report(1);
    let dropped = r1.stat("lost_outbound");
    assert!(dropped > 1000, "only {dropped} events dropped for the dead slot");
    c.spawn(2);
    // The successor drains what its predecessor left in the ring, and the publisher moves its
    // full backlog (100) in behind it. Until that backlog has room, a new event for slot 2 is
    // dropped as the queue limit says: wait for it to empty, so that the last 10 are counted
    // as delivered, not as lost (the race CI once hit: a lost notice of dropped + 10).
    let t0 = Instant::now();
    while c.report(1).stat("backlog_sum") != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the publisher's backlog for the successor never emptied");
        std::thread::sleep(Duration::from_millis(10));
    }
    let l = c.proc(1).cmd(Cmd::RunBurst { n: 10 });
    assert_eq!(l[0], "@@COUNT 2020 0");
    for s in [2, 0] {
        let l = c.proc(s).cmd(Cmd::Reach { ms: 5000, want: vec![(1, 0, 2019)] });
        assert_eq!(l, ["@@REACH reached"], "w{s}");
    }
    let r2 = c.report(2);
    let s = &r2.runs[&(1, 0)];
    assert_eq!(r2.lost_by_slot().get(&1).copied(), Some(dropped), "the successor's lost notice");
    assert_eq!(r2.cont.get(&(1, 0)).copied(), Some(10), "the predecessor's position");
    assert!(s.first == 10 || s.first == 11, "the successor resumes after its predecessor: {s:?}");
    // Exactly one gap, as large as the lost count.
    assert_eq!(s.bad, 1, "{s:?}");
    assert_eq!(s.last, 2019);
    assert_eq!(s.count + dropped, 2020 - s.first, "{s:?}");
    let r0 = c.report(0);
    assert_eq!(r0.runs[&(1, 0)].count, 2020, "the live worker got everything");
    assert!(r0.lost.is_empty());
}

// ==========================================================================================
// 6. Graceful close of the broker: its backlogs are flushed, the role is handed over at once.

#[test]
fn graceful_close_flushes_and_hands_the_broker_role_over() {
    const N: u64 = 3000;
    let _serial = serial();
    let mut c = Cluster::new(
        "fo-close",
        |cfg| {
            cfg.ring_capacity = Some(4096);
            cfg.max_queue_len = Some(100_000);
        },
        4,
        &[],
        0.0,
    );
    c.spawn_all();
    assert_eq!(c.broker(), Some(0));
    // A slow receiver (100 us per event) and far more than the 4 KiB rings hold: much of it
    // still waits in worker 0's backlog for worker 1 when it closes.
    c.proc(1).cmd(Cmd::Slow { us: 100 });
    let l = c.proc(0).cmd(Cmd::RunBurst { n: N });
    assert_eq!(l[0], format!("@@COUNT {N} 0"));
    c.clock += 1;
    c.streams.insert((0, 0), StreamInfo { started: 1, total: Some(N), killed: false });
    let p = c.procs[0].take().unwrap();
    let mut child = p.child;
    let t0 = monotonic_ns();
    let l = child.cmd(Cmd::Close { ms: 5000 });
    let f: Vec<&str> = l[0].split_whitespace().collect();
    assert_eq!(f[1], "ok", "close: {l:?}");
    drop(child);
    // Every survivor sees the new broker.
    let survivors = c.live();
    let mut seen = BTreeMap::new();
    while seen.len() < survivors.len() {
        assert!(c.wd.remaining() > Duration::from_secs(8), "no new broker after the close: {seen:?}");
        for &s in &survivors {
            if let Some(b) = Report::parse(&c.proc(s).cmd(Cmd::Brokers)).brokers.last() {
                seen.insert(s, *b);
            }
        }
    }
    let new_broker = seen.values().next().unwrap().1;
    assert!(seen.values().all(|b| b.1 == new_broker) && new_broker != 0, "{seen:?}");
    let ms = |s: u32| seen[&s].2.saturating_sub(t0) as f64 / 1e6;
    c.proc(1).cmd(Cmd::Slow { us: 0 });
    c.finish_and_check();
    eprintln!(
        "graceful close of the broker with {N} events queued, worker 1 slow (100 us per event): flushed in {} ms; \
         new broker w{new_broker} serving {:.1} ms after the close began, w2 and w3 attached after {:.1} and \
         {:.1} ms, the slow w1 after {:.1} ms (it looks at its control socket between dispatch passes)",
        f[2],
        ms(new_broker),
        ms(2),
        ms(3),
        ms(1),
    );
}

// ==========================================================================================
// 7. Unique targets skip a dead slot.

/// Until worker `w`'s paced unique run has published all `n` events and none is pending.
fn until_unique_run_done(c: &mut Cluster, w: u32, n: u64) {
    loop {
        assert!(c.wd.remaining() > Duration::from_secs(8), "unique events still pending");
        let l = c.proc(w).cmd(Cmd::URunCount);
        if l[0] == format!("@@UCOUNT {n} {n} 0 0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every live worker drains its inbound rings; then each of the `n` unique events ran
/// exactly once, somewhere.
fn drain_and_check_each_unique_once(c: &mut Cluster, n: u64) {
    for s in c.live() {
        let l = c.proc(s).cmd(Cmd::Drain { ms: 5000 });
        assert_eq!(l, ["@@DRAINED reached"], "w{s}: inbound rings not drained within 5 s");
    }
    let d = unique_deliveries(c.dir.path());
    assert_eq!(d, (0..n).map(|i| (i, 1)).collect::<BTreeMap<_, _>>(), "each unique event exactly once");
}

#[test]
fn unique_targets_skip_a_dead_slot() {
    const N: u64 = 60;
    let _serial = serial();
    let mut c = Cluster::new("fo-uniq-dead", |_| {}, 3, &[], 0.0);
    c.spawn_all();
    c.kill(2);
    // Worker 1 publishes while slot 2 is dead: round-robin over the live workers other than
    // the broker (worker 0) would be slot 1 and slot 2 alternately; slot 2 must be skipped.
    c.proc(1).cmd(Cmd::URun { rate: 1000.0, end: N });
    until_unique_run_done(&mut c, 1, N);
    c.spawn(2);
    drain_and_check_each_unique_once(&mut c, N);
    for inc in 0..2 {
        let log = c.dir.join(format!("uniq-2-{inc}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(text.is_empty(), "the dead slot got unique events: {text:?}");
    }
}

/// A target killed while unique events stream to it: the publisher reuses a "slot alive"
/// answer for at most a millisecond (`Control::slot_alive_recent`), so only the events of
/// that millisecond (and any the dead worker had not read) wait in the dead slot's ring for
/// its successor; every later one goes to a live worker. Each still runs exactly once.
#[test]
fn unique_events_streaming_across_a_target_kill_run_once() {
    const N: u64 = 600;
    let _serial = serial();
    let mut c = Cluster::new("fo-uniq-kill", |_| {}, 3, &[], 0.0);
    c.spawn_all();
    // Worker 1 sends to slots 0 and 2 in turn, 500 events per second to each (the rate is
    // per millisecond).
    c.proc(1).cmd(Cmd::URun { rate: 1.0, end: N });
    std::thread::sleep(Duration::from_millis(200));
    c.kill(2);
    until_unique_run_done(&mut c, 1, N);
    // Every event is published before the successor exists: what it runs had been written
    // into the dead slot's ring.
    c.spawn(2);
    drain_and_check_each_unique_once(&mut c, N);
    let read = |inc: u32| std::fs::read_to_string(c.dir.join(format!("uniq-2-{inc}.log"))).unwrap_or_default();
    let (dead, successor) = (read(0).lines().count(), read(1).lines().count());
    assert!(dead > 0, "slot 2 ran no unique event before it was killed");
    // Without a liveness check the dead slot would get about half of the ~400 events
    // published after the kill.
    assert!(successor <= 20, "{successor} unique events went to the dead slot 2 (its predecessor ran {dead})");
}

// ==========================================================================================
// 8. A restarted worker whose predecessor's connection the broker has not seen close yet.

/// The broker is frozen (SIGSTOP) while worker 1 is killed and restarted, so when it runs
/// again it finds the new HELLO for slot 1 while the dead connection for slot 1 is still in
/// its list. It answers "busy", the new worker retries with backoff, and it attaches once the
/// old connection is gone: a restarted worker never gets a hard refusal for its own slot.
#[test]
fn restarted_worker_attaches_while_the_broker_still_holds_its_old_connection() {
    let _serial = serial();
    let dir = TempDir::new("fo-busy");
    let wd = Watchdog::new("fo-busy");
    let cfg = Cfg::new(&dir.sock(), 3);
    let broker = wd.spawn(&cfg, Wid::Worker(0));
    let w1 = wd.spawn(&cfg, Wid::Worker(1));
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    broker.signal(libc::SIGSTOP);
    w1.kill();
    let pid = broker.pid();
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on the stopped broker child, still owned (not reaped) by the test.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
    });
    // Ready only once attached: connect and HELLO wait in the frozen broker's socket.
    let mut w1b = wd.spawn(&cfg, Wid::Worker(1));
    resume.join().unwrap();
    let r = w1b.publish(Tgt::All, "busy", "after", 0, 5);
    assert_eq!((r.ok, r.err), (5, 0));
    w2.until(5);
    assert_eq!(w2.report().stream("w1", "busy", "after"), seq(0, 5));
    drop(broker);
}
