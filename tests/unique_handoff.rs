//! The socket transport's hand-off of unique events, with real processes and real SIGKILLs
//! (issue 11, item 6, the broker's part; ARCHITECTURE.md §G3):
//! 1. a unique event the broker acknowledged is never lost with the broker: the broker
//!    acknowledges it only once the target's socket took it (or it ran at the broker), so a
//!    broker killed with events queued for a receiver that does not read leaves them with
//!    their publisher, which resends them to the next broker;
//! 2. the broker killed repeatedly while a publisher streams unique events with distinct
//!    hashes: every event is delivered, at least once; an event is delivered twice only when
//!    its publisher resent it after a failover (at-least-once across a broker crash);
//! 3. the broker's own `All` events dropped for a slow receiver are each reported to it
//!    (`publish` never fails for it, and received + reported lost = published).

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::cluster::unique_deliveries;
use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// One test at a time: each kills processes and relies on timing bounds.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A socket-transport cluster of `workers` run-recorder children (unique deliveries are
/// logged to files that survive kills), every hash remembered for two minutes.
fn socket_cluster(name: &str, workers: u32) -> Cluster {
    let mut c = Cluster::new(
        name,
        |cfg| {
            cfg.transport = Transport::Socket;
            cfg.unique_timeout_ms = Some(120_000);
        },
        workers,
        &[],
        0.0,
    );
    c.spawn_all();
    c
}

/// The broker, once there is one.
fn wait_broker(c: &mut Cluster) -> u32 {
    loop {
        if let Some(b) = c.broker() {
            if c.live().into_iter().all(|s| c.status(s).1) {
                return b;
            }
        }
        assert!(c.wd.remaining() > Duration::from_secs(5), "no broker with every worker attached");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Let every live worker dispatch until `done` holds for the unique deliveries, or `limit`.
fn pump_until_delivered(c: &mut Cluster, limit: Duration, done: impl Fn(&BTreeMap<u64, u64>) -> bool) {
    let t0 = Instant::now();
    while t0.elapsed() < limit && !done(&unique_deliveries(c.dir.path())) {
        for s in c.live() {
            c.proc(s).cmd(Cmd::Pump { ms: 5 });
        }
    }
}

/// Unique events (payload = hash number) of slot `p` not acknowledged yet.
fn pending(c: &mut Cluster, p: u32) -> u64 {
    c.report(p).stat("unique_pending")
}

// ==========================================================================================
// 1. Acknowledged means handed off.

/// w0..w3 on the socket transport. A receiver `r` stops reading (paused, as a worker inside
/// a long callback), and the broker's own burst fills `r`'s socket, so the broker's queue
/// for `r` keeps what it routes there. A publisher `p` publishes [`N`] unique events with
/// distinct hashes, round-robin over the workers (`r` gets about a third), and waits until
/// the broker acknowledged all of them; then the broker is SIGKILLed (and restarted), and
/// `r` resumes. Every hash must be delivered exactly once: nobody is told of a lost unique
/// event, so an acknowledged one must not be lost. (Before the fix the broker acknowledged
/// a unique event as soon as it had queued it: the third queued for `r` died with the broker,
/// silently.)
#[test]
fn acknowledged_unique_events_survive_a_broker_kill() {
    const N: u64 = 300;
    let _serial = serial();
    let mut c = socket_cluster("uh-ack", 4);
    let b = wait_broker(&mut c);
    let others: Vec<u32> = c.live().into_iter().filter(|&s| s != b).collect();
    let (r, p) = (others[0], others[1]);
    c.proc(r).cmd(Cmd::Pause);
    // The broker's own All events are never held back: they fill r's socket buffer, and the
    // rest waits in the broker's queue for r (well below its byte bound: nothing dropped).
    let fill = c.proc(b).publish(Tgt::All, "fill", "f", 0, 10_000);
    assert_eq!((fill.ok, fill.err), (10_000, 0), "{:?}", fill.errors);
    let depth = c.report(b).stat("peer_depth_sum");
    assert!(depth > 0, "the broker's queue for the paused w{r} is empty: the test does not test it");
    c.proc(p).send(Cmd::uniq("uniq", "u", "h", 0, N));
    let res = c.proc(p).publish_end();
    assert_eq!((res.ok, res.err), (N, 0), "{:?}", res.errors);
    // Acknowledged: by the broker that is about to die.
    let t0 = Instant::now();
    while pending(&mut c, p) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "w{p}: unique events never acknowledged");
        c.proc(p).cmd(Cmd::Pump { ms: 5 });
    }
    let before = unique_deliveries(c.dir.path()).len();
    c.kill(b);
    c.spawn(b);
    c.proc(r).cmd(Cmd::Resume);
    wait_broker(&mut c);
    pump_until_delivered(&mut c, Duration::from_secs(10), |d| d.len() as u64 >= N);
    let d = unique_deliveries(c.dir.path());
    let missing: Vec<u64> = (0..N).filter(|n| !d.contains_key(n)).collect();
    let twice: Vec<(u64, u64)> = d.iter().filter(|&(_, &k)| k > 1).map(|(&n, &k)| (n, k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {N} unique events the killed broker had acknowledged were never delivered, and nobody was \
         told ({before} delivered before the kill): {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(twice.is_empty(), "acknowledged before the kill, so never resent: delivered twice {twice:?}");
    assert_eq!(pending(&mut c, p), 0);
}

/// The other side of the hand-off: a unique event written into a receiver's socket is the
/// receiver's. `r` is paused, so the events routed to it (about a third of [`N`]) stay in
/// its socket buffer, acknowledged; the broker is SIGKILLed; `r` resumes and must run them
/// all, although it reads them in the same read as the broker's hang-up. (Before the fix a
/// worker discarded every frame that came with the hang-up.)
#[test]
fn unique_events_in_a_receivers_socket_survive_the_broker() {
    const N: u64 = 300;
    let _serial = serial();
    let mut c = socket_cluster("uh-sockbuf", 4);
    let b = wait_broker(&mut c);
    let others: Vec<u32> = c.live().into_iter().filter(|&s| s != b).collect();
    let (r, p) = (others[0], others[1]);
    c.proc(r).cmd(Cmd::Pause);
    c.proc(p).send(Cmd::uniq("uniq", "u", "h", 0, N));
    let res = c.proc(p).publish_end();
    assert_eq!((res.ok, res.err), (N, 0), "{:?}", res.errors);
    let t0 = Instant::now();
    while pending(&mut c, p) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "w{p}: unique events never acknowledged");
        c.proc(p).cmd(Cmd::Pump { ms: 5 });
    }
    let before = unique_deliveries(c.dir.path()).len() as u64;
    assert!(before < N, "the paused w{r} got none: the test does not test it");
    eprintln!("{before} of {N} delivered before the kill");
    c.kill(b);
    c.spawn(b);
    c.proc(r).cmd(Cmd::Resume);
    wait_broker(&mut c);
    pump_until_delivered(&mut c, Duration::from_secs(10), |d| d.len() as u64 >= N);
    let d = unique_deliveries(c.dir.path());
    let missing: Vec<u64> = (0..N).filter(|n| !d.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "{} of {N} unique events written into the paused w{r}'s socket before the broker died were never run \
         ({before} delivered before the kill): {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(d.values().all(|&k| k == 1), "delivered twice: {d:?}");
}

// ==========================================================================================
// 2. The broker killed while a publisher streams unique events.

/// The `@@UCOUNT` fields of slot `p`: (sent, end, unique_pending, publish errors).
fn ucount(c: &mut Cluster, p: u32) -> (u64, u64, u64, u64) {
    let l = c.proc(p).cmd(Cmd::URunCount);
    let f: Vec<u64> = l[0].split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
    (f[0], f[1], f[2], f[3])
}

/// A publisher streams [`N`] unique events with distinct hashes while the broker is
/// SIGKILLed (and restarted) up to [`KILLS`] times; one receiver does not read (paused, its
/// socket filled by the first broker), the others keep dispatching. Every hash must be
/// delivered (none lost: they were acknowledged only once handed off, and the publisher
/// resent the rest to each new broker), and a hash may be delivered twice only if the
/// publisher resent it after a failover: at most `Stats::unique_resent` of them. (Before
/// the fix the events the first broker routed to the paused receiver died with it:
/// acknowledged, never delivered, nobody told.)
#[test]
fn unique_events_across_broker_kills_are_delivered_at_least_once() {
    const N: u64 = 3000;
    const KILLS: usize = 3;
    let _serial = serial();
    let mut c = socket_cluster("uh-kills", 4);
    let b0 = wait_broker(&mut c);
    // The publisher is never killed (a killed publisher's own outbox dies with it).
    let others: Vec<u32> = c.live().into_iter().filter(|&s| s != b0).collect();
    let (r, p) = (others[0], others[1]);
    c.proc(r).cmd(Cmd::Pause);
    let fill = c.proc(b0).publish(Tgt::All, "fill", "f", 0, 10_000);
    assert_eq!((fill.ok, fill.err), (10_000, 0), "{:?}", fill.errors);
    c.proc(p).cmd(Cmd::URun { rate: 4.0, end: N });
    let mut rng = Rng::from_clock();
    let mut kills = 0;
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(60 + rng.below(100)));
        let Some(b) = c.broker() else { continue };
        if b == p || b == r {
            break;
        }
        c.kill(b);
        c.spawn(b);
        kills += 1;
    }
    assert!(kills > 0, "no broker was killed: the test does not test it");
    loop {
        let (sent, end, pend, errors) = ucount(&mut c, p);
        assert_eq!(errors, 0, "w{p}: unique publish errors");
        if sent == end && pend == 0 {
            break;
        }
        assert!(c.wd.remaining() > Duration::from_secs(15), "w{p}: unique events still pending: {sent}/{end}, {pend}");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.proc(r).cmd(Cmd::Resume);
    pump_until_delivered(&mut c, Duration::from_secs(10), |d| d.len() as u64 >= N);
    let d = unique_deliveries(c.dir.path());
    let missing: Vec<u64> = (0..N).filter(|n| !d.contains_key(n)).collect();
    let twice: Vec<(u64, u64)> = d.iter().filter(|&(_, &k)| k > 1).map(|(&n, &k)| (n, k)).collect();
    let resent = c.report(p).stat("unique_resent");
    eprintln!(
        "unique across {kills} socket broker kills: {} of {N} delivered, {} twice, {resent} resent by the publisher",
        d.len(),
        twice.len()
    );
    assert!(
        missing.is_empty(),
        "{} of {N} unique events never delivered across {kills} broker kills: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(d.keys().all(|&n| n < N));
    assert!(twice.iter().all(|&(_, k)| k == 2), "delivered more than twice: {twice:?}");
    assert!(
        twice.len() as u64 <= resent,
        "{} delivered twice, but the publisher resent only {resent}: {twice:?}",
        twice.len()
    );
}

// ==========================================================================================
// 3. The broker's own All events and a slow receiver.

/// On the socket transport the broker never refuses its own `All` publish: a receiver that
/// does not read loses what its queue at the broker cannot hold. Each such event must be
/// reported to it, exactly: received + reported lost = published, for the paused receiver
/// and for a live one alike, and the notices add up to the broker's `lost_outbound`.
#[test]
fn the_brokers_own_all_events_dropped_for_a_slow_receiver_are_reported() {
    const N: u64 = 50_000;
    let _serial = serial();
    let dir = TempDir::new("uh-own");
    let wd = Watchdog::new("uh-own");
    let mut cfg = Cfg::new(&dir.sock(), 3);
    cfg.transport = Transport::Socket;
    let mut w0 = wd.spawn(&cfg, Wid::Worker(0));
    let t0 = Instant::now();
    while w0.report().stat("is_broker") == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "w0 never became the broker");
        w0.cmd(Cmd::Pump { ms: 5 });
    }
    let mut ws = [wd.spawn(&cfg, Wid::Worker(1)), wd.spawn(&cfg, Wid::Worker(2))];
    for w in ws.iter_mut() {
        while w.report().stat("is_ready") == 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "a worker never attached");
            w.cmd(Cmd::Pump { ms: 5 });
        }
    }
    ws[0].cmd(Cmd::Pause);
    let r = w0.publish(Tgt::All, "seq", "own", 0, N);
    assert_eq!((r.ok, r.err), (N, 0), "the broker's own All publish never fails: {:?}", r.errors);
    let b = w0.report();
    assert_eq!(b.stat("is_broker"), 1);
    let lost_out = b.stat("lost_outbound");
    assert!(lost_out > 0, "the paused w1's queue at the broker held all {N} events: the test does not test it");
    ws[0].cmd(Cmd::Resume);
    let mut notices = 0;
    for (i, w) in ws.iter_mut().enumerate() {
        w.until(N);
        let r = w.report();
        let got = r.stream("w0", "seq", "own");
        let lost = r.lost_by_slot().get(&0).copied().unwrap_or(0);
        assert!(got.windows(2).all(|x| x[0] < x[1]), "w{}: in increasing order", i + 1);
        assert_eq!(
            got.len() as u64 + lost,
            N,
            "w{}: received {} of the broker's {N} events and was told of {lost} lost: {} silently lost",
            i + 1,
            got.len(),
            N as i64 - got.len() as i64 - lost as i64
        );
        notices += lost;
    }
    assert!(ws[0].report().stat("lost") > 0, "the paused receiver was told");
    assert_eq!(notices, w0.report().stat("lost_outbound"), "the notices add up to the broker's count");
}
