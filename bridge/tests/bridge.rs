//! Two "hosts" on one machine (two buses on different socket paths, two worker processes and
//! one bridge each) and a real `nats-server -js` on a free port with a temporary store.

mod support;
use std::time::Duration;

use support::*;

child_entry!();

const EXPORT: &[&str] = &["--export", "t:*", "--cluster-unique", "jobs:*"];

struct Cluster {
    _dir: TempDir,
    nats: Nats,
    a: Host,
    b: Host,
}

fn cluster(tag: &str, unique_ms: u64) -> Cluster {
    require_nats_server();
    let dir = TempDir::new(tag);
    let nats = Nats::start(dir.path());
    let mut a = Host::start(dir.path(), "A", unique_ms);
    let mut b = Host::start(dir.path(), "B", unique_ms);
    a.start_bridge(&nats, EXPORT);
    b.start_bridge(&nats, EXPORT);
    Cluster { _dir: dir, nats, a, b }
}

/// Wait until worker `i` of `h` has received + been told lost `want` events of `tag`.
fn wait_total(h: &mut Host, i: usize, tag: &str, want: u64, timeout: Duration) -> Rec {
    let mut last = Rec::default();
    let ok = wait_until(timeout, || {
        last = h.get(i, tag);
        last.n + last.lost >= want
    });
    if !ok {
        panic!(
            "{} worker {i}: {tag}: received {} + lost {} < {want} after {timeout:?}\n--- bridge log ---\n{}",
            h.name,
            last.n,
            last.lost,
            tail(&h.bridge_log())
        );
    }
    last
}

fn tail(s: &str) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(40)..].join("\n")
}

/// An exported event published on host A reaches both workers of host B exactly once (as a
/// relayed event), and A's own workers exactly once (the local delivery; no echo back).
#[test]
fn exported_event_reaches_every_worker_of_the_other_host_once() {
    let mut c = cluster("bridge-once", 5000);
    assert_eq!(c.a.workers[0].cmd("pub a0 0 1"), "OK");
    for i in 0..2 {
        wait_total(&mut c.b, i, "a0", 1, Duration::from_secs(10));
    }
    // Anything more (a loop, a redelivery) would arrive within this.
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..2 {
        let r = c.b.get(i, "a0");
        assert_eq!((r.n, r.dups, r.lost, r.relayed), (1, 0, 0, 1), "host B worker {i}: {r:?}");
        let r = c.a.get(i, "a0");
        assert_eq!((r.n, r.dups, r.relayed), (1, 0, 0), "host A worker {i}: {r:?}");
    }
    // Not exported: stays on its host.
    assert_eq!(c.b.workers[1].cmd("pub b1 0 1"), "OK");
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..2 {
        assert_eq!(c.a.get(i, "b1").n, 1, "b1 is exported too (pattern t:*)");
    }
    let _ = c.nats.port;
}

/// 10,000 events from each of two publishers on A and one on B, concurrently: every worker
/// of the other host gets every one, in each publisher's order, once.
#[test]
fn per_publisher_order_across_hosts_under_10000_events() {
    let mut c = cluster("bridge-order", 5000);
    const N: u64 = 10_000;
    c.a.workers[0].send(&format!("pub a0 0 {N}"));
    c.a.workers[1].send(&format!("pub a1 0 {N}"));
    c.b.workers[0].send(&format!("pub b0 0 {N}"));
    for p in c.a.workers.iter_mut().chain(c.b.workers.iter_mut().take(1)) {
        assert_eq!(p.reply(Duration::from_secs(60)), "OK");
    }
    for i in 0..2 {
        for tag in ["a0", "a1"] {
            let r = wait_total(&mut c.b, i, tag, N, Duration::from_secs(60));
            assert_eq!((r.n, r.dups, r.lost, r.ordered), (N, 0, 0, true), "B worker {i} {tag}: {r:?}");
        }
        let r = wait_total(&mut c.a, i, "b0", N, Duration::from_secs(60));
        assert_eq!((r.n, r.dups, r.lost, r.ordered), (N, 0, 0, true), "A worker {i} b0: {r:?}");
    }
}

/// Wait until every worker of `h` has received + been told lost everything `tags` (all
/// from one host: lost notices are per origin host) published, `want` in all; then check it
/// stays there (no late duplicate) and that nothing arrived twice or out of order.
fn settle_exact(h: &mut Host, tags: &[&str], want: u64) -> Vec<Vec<Rec>> {
    let mut out = Vec::new();
    for i in 0..WORKERS as usize {
        let mut last = Vec::new();
        let ok = wait_until(Duration::from_secs(60), || {
            last = tags.iter().map(|t| h.get(i, t)).collect::<Vec<_>>();
            last.iter().map(|r| r.n).sum::<u64>() + last[0].lost >= want
        });
        assert!(ok, "{} worker {i}: {tags:?}: {last:?} short of {want}\n{}", h.name, tail(&h.bridge_log()));
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..WORKERS as usize {
        let rs: Vec<Rec> = tags.iter().map(|t| h.get(i, t)).collect();
        let total = rs.iter().map(|r| r.n).sum::<u64>() + rs[0].lost;
        assert_eq!(total, want, "{} worker {i}: {tags:?}: received + lost != published: {rs:?}", h.name);
        for r in &rs {
            assert_eq!(r.dups, 0, "{} worker {i}: {tags:?}: duplicates: {rs:?}", h.name);
            assert!(r.ordered, "{} worker {i}: {tags:?}: out of order: {rs:?}", h.name);
        }
        out.push(rs);
    }
    out
}

fn last_stats(h: &Host) -> String {
    h.bridge_log().lines().rfind(|l| l.contains("stats state=")).unwrap_or("").to_string()
}

/// nats-server SIGKILLed and restarted (same port, same store) in the middle of a stream;
/// then each bridge SIGKILLed while events keep coming, and restarted: on every receiving
/// worker, received + reported lost = published, with no duplicates.
#[test]
fn nats_and_bridge_killed_and_restarted_lose_nothing_silently() {
    let mut c = cluster("bridge-kill", 5000);
    // 1. The server dies mid-stream.
    const N1: u64 = 20_000;
    c.a.workers[0].send(&format!("pub a0 0 {N1}"));
    std::thread::sleep(Duration::from_millis(100));
    c.nats.kill();
    std::thread::sleep(Duration::from_millis(700));
    c.nats.restart();
    assert_eq!(c.a.workers[0].reply(Duration::from_secs(60)), "OK");
    let r1 = settle_exact(&mut c.b, &["a0"], N1);

    // 2. The exporting bridge dies; its workers keep publishing (the bus keeps the agent's
    //    events for its successor, or reports them lost to it).
    c.a.kill_bridge();
    assert_eq!(c.a.workers[0].cmd(&format!("pub a0 {N1} 3000")), "OK");
    assert_eq!(c.a.workers[1].cmd("pub a1 0 3000"), "OK");
    c.a.start_bridge(&c.nats, &[]);
    let r2 = settle_exact(&mut c.b, &["a0", "a1"], N1 + 6000);

    // 3. The importing bridge dies; the stream keeps what is exported meanwhile.
    c.b.kill_bridge();
    assert_eq!(c.a.workers[0].cmd(&format!("pub a0 {} 3000", N1 + 3000)), "OK");
    assert_eq!(c.a.workers[1].cmd("pub a1 3000 3000"), "OK");
    std::thread::sleep(Duration::from_millis(300));
    c.b.start_bridge(&c.nats, &[]);
    let r3 = settle_exact(&mut c.b, &["a0", "a1"], N1 + 12_000);
    eprintln!("after the nats restart: {r1:?}\nafter A's bridge restart: {r2:?}\nafter B's: {r3:?}");
    eprintln!("A: {}\nB: {}", last_stats(&c.a), last_stats(&c.b));
    // The local side never saw a gap: every event of both local publishers, none reported
    // lost. (Waited for, up to a bound: on a loaded machine the local workers may still be
    // draining their publishers' backlogs when host B has settled.)
    for i in 0..WORKERS as usize {
        let mut r = Rec::default();
        let done = wait_until(Duration::from_secs(30), || {
            r = c.a.get(i, "a0");
            r.n + r.local_lost >= N1 + 6000
        });
        let stats = (c.a.stats(0), c.a.stats(1));
        assert!(done, "host A worker {i}: a0 short of {}: {r:?}\nstats of A's workers: {stats:#?}", N1 + 6000);
        assert_eq!((r.n, r.dups, r.lost, r.local_lost), (N1 + 6000, 0, 0, 0), "host A worker {i}: {r:?}\n{stats:#?}");
        assert!(r.ordered, "host A worker {i}: a0 out of order: {r:?}");
        let r1 = c.a.get(i, "a1");
        assert_eq!((r1.n, r1.dups, r1.local_lost), (6000, 0, 0), "host A worker {i}: a1: {r1:?}\n{stats:#?}");
    }
}

/// 100 rounds of one unique hash published at the same time on both hosts: exactly one
/// delivery per round in the whole cluster; a hash passes again once the timeout is over.
#[test]
fn cluster_unique_event_runs_once_in_the_cluster() {
    const TIMEOUT_MS: u64 = 1000;
    const ROUNDS: usize = 100;
    let mut c = cluster("bridge-unique", TIMEOUT_MS);
    // The agent's divert list reaches each worker at its next control-channel read (the
    // workers poll every 2 ms); until then a worker routes locally.
    std::thread::sleep(Duration::from_millis(300));
    for r in 0..ROUNDS {
        c.a.workers[r % 2].send(&format!("uniq h{r}"));
        c.b.workers[(r + 1) % 2].send(&format!("uniq h{r}"));
        assert_eq!(c.a.workers[r % 2].reply(Duration::from_secs(10)), "OK");
        assert_eq!(c.b.workers[(r + 1) % 2].reply(Duration::from_secs(10)), "OK");
    }
    let count = |c: &mut Cluster| {
        let mut n = std::collections::BTreeMap::<String, usize>::new();
        for h in [&mut c.a, &mut c.b] {
            for w in h.workers.iter_mut() {
                for hash in w.cmd("uniqs").split(',').filter(|s| !s.is_empty()) {
                    *n.entry(hash.to_string()).or_default() += 1;
                }
            }
        }
        n
    };
    let mut seen = std::collections::BTreeMap::new();
    let complete = wait_until(Duration::from_secs(10), || {
        seen = count(&mut c);
        seen.len() == ROUNDS
    });
    assert!(
        complete,
        "rounds delivered: {} of {ROUNDS}: {seen:?}\nA: {}\nB: {}",
        seen.len(),
        last_stats(&c.a),
        last_stats(&c.b)
    );
    // Anything delivered twice would be there by now.
    std::thread::sleep(Duration::from_millis(500));
    let seen = count(&mut c);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "delivered more than once in the cluster: {twice:?}\nA: {}\nB: {}\n{}",
        last_stats(&c.a),
        last_stats(&c.b),
        c.a.bridge_log().lines().filter(|l| l.contains("claim")).take(3).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(seen.len(), ROUNDS);

    // After the timeout (the claim has expired in the bucket and in the local tables).
    std::thread::sleep(Duration::from_millis(TIMEOUT_MS + 500));
    c.a.workers[1].send("uniq h0");
    c.b.workers[1].send("uniq h0");
    assert_eq!(c.a.workers[1].reply(Duration::from_secs(10)), "OK");
    assert_eq!(c.b.workers[1].reply(Duration::from_secs(10)), "OK");
    let again = wait_until(Duration::from_secs(5), || count(&mut c).get("h0") == Some(&2));
    assert!(again, "h0 did not pass again after the timeout: {:?}", count(&mut c).get("h0"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&mut c).get("h0"), Some(&2), "h0 passed more than once after the timeout");
}

/// Unique events that are not cluster-unique stay on their host and run on one of its
/// workers, bridge attached or not. (It failed before the core stopped routing unique
/// events to the privileged agent's slot: every other plain unique event of worker 0 went
/// to the bridge, observed `["p0", "p2", "p4", "p6", "p8"]` of p0..p9.)
#[test]
fn plain_unique_events_still_run_on_a_local_worker() {
    let mut c = cluster("bridge-plain", 5000);
    for r in 0..10 {
        assert_eq!(c.a.workers[0].cmd(&format!("uniqp p{r}")), "OK");
    }
    let mut got = Vec::new();
    let all = wait_until(Duration::from_secs(5), || {
        got = c
            .a
            .workers
            .iter_mut()
            .flat_map(|w| w.cmd("uniqs").split(',').filter(|s| !s.is_empty()).map(str::to_string).collect::<Vec<_>>())
            .collect();
        got.len() >= 10
    });
    assert!(all, "plain unique events run on host A's workers: {got:?} of p0..p9");
    for w in c.b.workers.iter_mut() {
        assert_eq!(w.cmd("uniqs"), "", "a plain unique event crossed hosts");
    }
}
