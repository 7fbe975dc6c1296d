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
