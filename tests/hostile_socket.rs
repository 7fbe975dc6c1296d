//! The socket transport and the control channel under bursts and hostile clients (issue 11,
//! items 15, 17 and 20): flow control instead of loss for live receivers, bounded
//! connections (a cap, a HELLO timeout), and descriptors passed where none belong. Each test
//! drives real processes (children of this binary) and raw clients played by the test.

#[macro_use]
mod support;

use support::*;
use worker_events::{Transport, Wid};

child_entry!();

/// A socket-transport deployment of `workers` workers.
fn socket_cfg(dir: &TempDir, workers: u32) -> Cfg {
    let mut cfg = Cfg::new(&dir.sock(), workers);
    cfg.transport = Transport::Socket;
    cfg
}

/// Item 20. Two publishers burst 20,000 events each at once with `max_queue_len` 1,000 while
/// the broker and the other workers keep dispatching, four rounds in a row. Every publish
/// either succeeded and was delivered to every worker, in order, once, or returned the
/// queue-overflow error: no worker that keeps dispatching loses anything (no lost notice),
/// the broker holds publishers back instead of dropping for its receivers.
#[test]
fn a_burst_makes_publish_fail_and_live_receivers_lose_nothing() {
    const N: u64 = 20_000;
    const ROUNDS: u64 = 4;
    let dir = TempDir::new("burst");
    let wd = Watchdog::new("burst");
    let mut cfg = socket_cfg(&dir, 4);
    cfg.max_queue_len = Some(1_000);
    let mut ws: Vec<Child> = (0..4).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let mut expect = 0;
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let ev = format!("r{round}");
        ws[1].send(Cmd::publish(Tgt::All, "seq", &ev, 0, N));
        ws[2].send(Cmd::publish(Tgt::All, "seq", &ev, 0, N));
        let mut ok = [0u64; 2];
        for (k, p) in [1usize, 2].into_iter().enumerate() {
            let r = ws[p].publish_end();
            assert_eq!(r.ok + r.err, N, "w{p}");
            for e in &r.errors {
                assert_eq!(e, "failed to publish event: queue overflow", "w{p}");
            }
            ok[k] = r.ok;
        }
        expect += ok[0] + ok[1];
        for (i, w) in ws.iter_mut().enumerate() {
            w.until(expect);
            let r = w.report();
            for (k, p) in ["w1", "w2"].into_iter().enumerate() {
                let got = r.stream(p, "seq", &ev);
                if !got.windows(2).all(|x| x[0] < x[1]) {
                    failures.push(format!("round {round}: w{i} got {p}'s events out of order or twice"));
                }
                if got.len() as u64 != ok[k] {
                    failures.push(format!(
                        "round {round}: w{i} received {} of {p}'s {} published events (publish errors {})",
                        got.len(),
                        ok[k],
                        N - ok[k]
                    ));
                }
            }
            if !r.lost.is_empty() {
                let lost: u64 = r.lost.iter().map(|(_, c)| c).sum();
                failures.push(format!("round {round}: w{i} got lost notices for {lost} events: {:?}", r.lost));
            }
        }
        eprintln!("round {round}: published ok {ok:?} of {N} each");
    }
    assert!(failures.is_empty(), "{} failures in {ROUNDS} rounds:\n{}", failures.len(), failures.join("\n"));
}
