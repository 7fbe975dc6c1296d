//! Multi-process tests of the core support for a bridge between hosts (issue 13; see
//! ARCHITECTURE.md §R): events relayed from another host carry its name
//! (`Worker::publish_relayed`, `Event::origin_host`), relayed loss reports count as lost
//! notices (`Worker::report_relayed_lost`), and unique events matching the agent's patterns
//! are diverted to it (`Worker::divert_unique`, `Event::unique_hash`). Every test runs on both
//! transports.

#[macro_use]
mod support;

use support::*;
use worker_events::Wid;

child_entry!();

/// A deployment of `workers` workers and the privileged agent, on this test's transport.
fn cfg_with_agent(dir: &TempDir, workers: u32) -> Cfg {
    let mut cfg = Cfg::new(&dir.sock(), workers);
    cfg.agent = true;
    cfg
}

// 1 -----------------------------------------------------------------------------------------

/// The agent relays `All` events from host "hb": every worker and the agent itself get them
/// with `origin_host() == Some("hb")` (recorded as event `r@hb`), in order, while a
/// worker's ordinary events arrive with `None` (event `a`). A relayed `Unique` reaches one
/// worker, stamped too; a relayed loss report reaches everyone as a lost notice from the
/// agent stamped with the host, and counts in `Stats::lost`.
fn relayed_events_carry_their_origin_host() {
    const N: u64 = 20;
    let dir = TempDir::new("relay-origin");
    let wd = Watchdog::new("relay-origin");
    let cfg = cfg_with_agent(&dir, 3);
    let mut ws: Vec<Child> = (0..3).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let mut agent = wd.spawn(&cfg, Wid::PrivilegedAgent);
    let r = ws[0].publish(Tgt::All, "seq", "a", 0, N);
    assert_eq!((r.ok, r.err), (N, 0));
    let r = PubResult::parse(&agent.cmd(Cmd::Relay {
        host: "hb".into(),
        target: Tgt::All,
        src: "seq".into(),
        ev: "r".into(),
        start: 0,
        count: N,
    }));
    assert_eq!((r.ok, r.err), (N, 0), "{:?}", r.errors);
    let r = PubResult::parse(&agent.cmd(Cmd::Relay {
        host: "hb".into(),
        target: Tgt::unique("k1"),
        src: "seq".into(),
        ev: "u".into(),
        start: 7,
        count: 1,
    }));
    assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
    let r = PubResult::parse(&agent.cmd(Cmd::RelayLost { host: "hb".into(), count: 5 }));
    assert_eq!((r.ok, r.err), (1, 0), "{:?}", r.errors);
    // Refused at the call: a host over 255 bytes (an empty one: the doc test of
    // `publish_relayed`, the command line cannot carry it).
    let r = PubResult::parse(&agent.cmd(Cmd::RelayLost { host: "h".repeat(256), count: 1 }));
    assert_eq!((r.ok, r.err), (0, 1), "a host of 256 bytes accepted");
    assert!(r.errors[0].contains("origin host must be 1..=255 bytes"), "{:?}", r.errors);
    ws.push(agent);
    let names = ["w0", "w1", "w2", "agent"];
    for c in ws.iter_mut() {
        // 2N events and 5 lost for everyone (the unique event: one of them).
        c.until(2 * N + 5);
    }
    // The unique event may still be on its way: look until it has arrived somewhere.
    let receivers = |rs: &[Report]| rs.iter().filter(|r| !r.stream("agent", "seq", "u@hb").is_empty()).count();
    let rs = loop {
        let rs: Vec<Report> = ws.iter_mut().map(|c| c.report()).collect();
        if receivers(&rs) > 0 || wd.remaining() < std::time::Duration::from_secs(3) {
            break rs;
        }
        ws[0].cmd(Cmd::Pump { ms: 10 });
    };
    assert_eq!(receivers(&rs), 1, "the relayed unique event reached exactly one process");
    for (name, r) in names.iter().zip(&rs) {
        assert_eq!(r.stream("w0", "seq", "a"), seq(0, N), "{name}: ordinary events, origin_host None");
        assert_eq!(r.stream("agent", "seq", "r@hb"), seq(0, N), "{name}: relayed events, origin_host Some(hb)");
        assert!(r.stream("agent", "seq", "r").is_empty(), "{name}: a relayed event without its origin host");
        let u = r.stream("agent", "seq", "u@hb");
        assert!(u.is_empty() || u == [7], "{name}: {u:?}");
        assert!(r.stream("agent", "seq", "u").is_empty(), "{name}: a relayed unique event without its host");
        assert_eq!(r.lost, vec![("agent@hb".to_string(), 5)], "{name}: the relayed lost notice");
        assert_eq!(r.stat("lost"), 5, "{name}: counted in Stats::lost");
        assert_eq!((r.stat("dropped"), r.stat("decode_errors")), (0, 0), "{name}");
    }
}

per_transport!(relayed_events_carry_their_origin_host);
