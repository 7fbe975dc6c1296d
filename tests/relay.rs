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

// 2 -----------------------------------------------------------------------------------------

/// Every stream of `r` from publisher `from`, source `u`, whose event is `ev#<hash>` (a
/// unique event diverted to the agent): (hash, payloads).
fn diverted(r: &Report, from: &str, ev: &str) -> Vec<(String, Vec<u64>)> {
    let tag = format!("{ev}#");
    r.streams
        .iter()
        .filter(|((w, s, e), _)| w == from && s == "u" && e.starts_with(&tag))
        .map(|((_, _, e), v)| (e[tag.len()..].to_string(), v.clone()))
        .collect()
}

/// Events of source `u` whose name is `div` or a diverted `div#..` that `r` received.
fn div_events(r: &Report) -> u64 {
    r.streams
        .iter()
        .filter(|((_, s, e), _)| s == "u" && (e == "div" || e.starts_with("div#")))
        .map(|(_, v)| v.len() as u64)
        .sum()
}

/// Publish probes (`Unique`, event `div-probe`, matching the agent's `div*` pattern) from
/// `ws[i]` until one reaches the agent diverted: that publisher has learned the patterns.
fn learned(wd: &Watchdog, ws: &mut [Child], i: usize, from: &str, agent: &mut Child, round: &str) {
    for k in 0.. {
        let r = ws[i].cmd(Cmd::uniq("u", "div-probe", &format!("{round}-"), k, 1));
        assert_eq!(PubResult::parse(&r).ok, 1, "probe publish");
        agent.cmd(Cmd::Pump { ms: 10 });
        if !diverted(&agent.report(), from, "div-probe").is_empty() {
            return;
        }
        assert!(wd.remaining() > std::time::Duration::from_secs(5), "watchdog: {from} never diverted a probe");
    }
}

/// Poll the agent until it holds `n` diverted `div` events from `from` whose hash starts with
/// `prefix`; return them.
fn agent_got(wd: &Watchdog, agent: &mut Child, from: &str, prefix: &str, n: usize) -> Vec<(String, Vec<u64>)> {
    loop {
        let mut d = diverted(&agent.report(), from, "div");
        d.retain(|(h, _)| h.starts_with(prefix));
        if d.len() >= n || wd.remaining() < std::time::Duration::from_secs(5) {
            return d;
        }
        agent.cmd(Cmd::Pump { ms: 10 });
    }
}

/// Diverted events `prefix0..prefixN` (hash) with payloads 0..N, one each.
fn expect_diverted(got: &[(String, Vec<u64>)], prefix: &str, n: u64) {
    let mut want: Vec<(String, Vec<u64>)> = (0..n).map(|i| (format!("{prefix}{i}"), vec![i])).collect();
    want.sort();
    let mut got = got.to_vec();
    got.sort();
    assert_eq!(got, want, "diverted events with their hashes");
}

/// `divert_unique` end to end: 3 workers and the agent, which diverts `("u", "div*")`.
/// A worker's matching unique event goes to the agent only (with its hash), never to a
/// worker and never into the dedup table; a non-matching one routes as before; the agent's
/// own re-publish of a diverted hash reaches exactly one worker; a worker started after the
/// registration diverts too, and so do the workers after the broker is killed; once the
/// agent has exited, matching events are routed on the host again and counted.
fn divert_unique_sends_matching_unique_events_to_the_agent() {
    const N: u64 = 10;
    let dir = TempDir::new("relay-divert");
    let wd = Watchdog::new("relay-divert");
    let cfg = cfg_with_agent(&dir, 4);
    let mut ws: Vec<Child> = (0..3).map(|i| wd.spawn(&cfg, Wid::Worker(i))).collect();
    let mut agent = wd.spawn(&cfg, Wid::PrivilegedAgent);
    let refused = ws[1].cmd(Cmd::Divert(vec![("u".into(), "div*".into())]));
    assert!(refused.iter().any(|l| l.contains("only the privileged agent")), "{refused:?}");
    assert_eq!(agent.cmd(Cmd::Divert(vec![("u".into(), "div*".into())])), vec!["@@DIVERT ok"]);
    for i in 1..3 {
        learned(&wd, &mut ws, i, &format!("w{i}"), &mut agent, "a");
    }

    // Matching: to the agent only, each with its hash.
    assert_eq!(ws[1].cmd(Cmd::uniq("u", "div", "h", 0, N)).last().map(String::as_str), Some("@@PUB 10 0"));
    assert_eq!(ws[2].cmd(Cmd::uniq("u", "div", "g", 0, N)).last().map(String::as_str), Some("@@PUB 10 0"));
    expect_diverted(&agent_got(&wd, &mut agent, "w1", "h", N as usize), "h", N);
    expect_diverted(&agent_got(&wd, &mut agent, "w2", "g", N as usize), "g", N);

    // Not matching: one delivery per hash somewhere, as before, never tagged.
    assert_eq!(ws[1].cmd(Cmd::uniq("u", "plain", "p", 0, N)).last().map(String::as_str), Some("@@PUB 10 0"));
    // The agent re-publishes a diverted hash as an ordinary unique event: not diverted, and
    // the hash was never recorded here, so it is delivered once.
    assert_eq!(agent.cmd(Cmd::uniq("u", "div", "h", 0, 1)).last().map(String::as_str), Some("@@PUB 1 0"));
    let mut all = loop {
        let rs: Vec<Report> = ws.iter_mut().chain([&mut agent]).map(|c| c.report()).collect();
        let plain: usize = rs.iter().map(|r| r.stream("w1", "u", "plain").len()).sum();
        let again: usize = rs.iter().map(|r| r.stream("agent", "u", "div").len()).sum();
        if (plain >= N as usize && again >= 1) || wd.remaining() < std::time::Duration::from_secs(5) {
            break rs;
        }
        ws[0].cmd(Cmd::Pump { ms: 10 });
    };
    let mut plain: Vec<u64> = all.iter().flat_map(|r| r.stream("w1", "u", "plain")).collect();
    plain.sort();
    assert_eq!(plain, seq(0, N), "non-matching unique events: each delivered exactly once");
    let again: Vec<usize> = all.iter().map(|r| r.stream("agent", "u", "div").len()).collect();
    assert_eq!(again.iter().sum::<usize>(), 1, "the agent's re-publish reached exactly one process: {again:?}");
    assert_eq!(again[3], 0, "... a worker, not the agent");
    let agent_r = all.pop().expect("the agent's report");
    for (i, r) in all.iter().enumerate() {
        assert_eq!(div_events(r) - r.stream("agent", "u", "div").len() as u64, 0, "w{i} got a diverted event");
        assert_eq!(r.stat("unique_duplicates"), 0, "w{i}: nothing diverted was recorded here");
    }
    let diverted_count: u64 = all.iter().chain([&agent_r]).map(|r| r.stat("unique_diverted")).sum();
    assert!(diverted_count >= 2 * N, "counted diverted: {diverted_count}");

    // A worker started after the registration.
    ws.push(wd.spawn(&cfg, Wid::Worker(3)));
    learned(&wd, &mut ws, 3, "w3", &mut agent, "b");
    assert_eq!(ws[3].cmd(Cmd::uniq("u", "div", "k", 0, N)).last().map(String::as_str), Some("@@PUB 10 0"));
    expect_diverted(&agent_got(&wd, &mut agent, "w3", "k", N as usize), "k", N);

    // Broker failover: kill the broker; the others (and the new broker) still divert.
    let b =
        (0..ws.len()).find(|&i| ws[i].cmd(Cmd::Status).iter().any(|l| l.starts_with("@@STATUS 1"))).expect("a broker");
    // The publisher after the failover: worker 1 (worker 2 if 1 was the broker).
    let publisher = if b == 1 { 2 } else { 1 };
    let from = format!("w{publisher}");
    let from = from.as_str();
    let killed = ws.remove(b);
    killed.kill();
    let survivor = if publisher > b { publisher - 1 } else { publisher };
    loop {
        // The agent is a slot too: it may win the election.
        let brokers = ws
            .iter_mut()
            .chain([&mut agent])
            .filter_map(|c| c.cmd(Cmd::Status).into_iter().find(|l| l.starts_with("@@STATUS 1")))
            .count();
        if brokers == 1 {
            break;
        }
        assert!(wd.remaining() > std::time::Duration::from_secs(5), "watchdog: no new broker");
        ws[0].cmd(Cmd::Pump { ms: 10 });
    }
    learned(&wd, &mut ws, survivor, from, &mut agent, "c");
    assert_eq!(ws[survivor].cmd(Cmd::uniq("u", "div", "f", 0, N)).last().map(String::as_str), Some("@@PUB 10 0"));
    expect_diverted(&agent_got(&wd, &mut agent, from, "f", N as usize), "f", N);

    // The agent exits: matching events are routed here again, and counted.
    agent.exit();
    let before: u64 = ws.iter_mut().map(|c| c.report().stat("unique_not_diverted")).sum();
    assert_eq!(ws[survivor].cmd(Cmd::uniq("u", "div", "z", 0, N)).last().map(String::as_str), Some("@@PUB 10 0"));
    let rs = loop {
        let rs: Vec<Report> = ws.iter_mut().map(|c| c.report()).collect();
        let n: usize = rs.iter().map(|r| r.stream(from, "u", "div").len()).sum();
        if n >= N as usize || wd.remaining() < std::time::Duration::from_secs(5) {
            break rs;
        }
        ws[0].cmd(Cmd::Pump { ms: 10 });
    };
    let mut z: Vec<u64> = rs.iter().flat_map(|r| r.stream(from, "u", "div")).collect();
    z.sort();
    assert_eq!(z, seq(0, N), "with the agent gone: each delivered exactly once on this host");
    let not_diverted: u64 = rs.iter().map(|r| r.stat("unique_not_diverted")).sum();
    assert_eq!(not_diverted - before, N, "counted as not diverted");
}

per_transport!(relayed_events_carry_their_origin_host, divert_unique_sends_matching_unique_events_to_the_agent);
