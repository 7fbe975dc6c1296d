//! The harness's own contract (`tests/support/`): every command survives the trip through a
//! child's stdin, every key-table value survives the trip through its environment, and the
//! one report parser reads what the child role writes.

#[macro_use]
mod support;

use std::path::PathBuf;

use support::cfg::Value;
use support::*;
use worker_events::{Transport, Wid};

#[test]
fn every_command_round_trips_through_its_text() {
    let cmds = [
        Cmd::publish(Tgt::All, "s", "e", 3, 4),
        Cmd::publish(Tgt::Current, "s", "e", 0, 1),
        Cmd::publish(Tgt::unique("h7"), "s", "e", 0, 1),
        Cmd::uniq("u", "e", "p", 5, 6),
        Cmd::Batch(vec![
            Item { target: Tgt::All, src: "o".into(), ev: "a".into(), seq: 1 },
            Item { target: Tgt::Current, src: "o".into(), ev: "c".into(), seq: 2 },
        ]),
        Cmd::bytes(Tgt::All, "size", "blob", 65537),
        Cmd::typed(Tgt::All, "typed", "over", true),
        Cmd::typed(Tgt::Current, "typed", "exact", false),
        Cmd::Pump { ms: 10 },
        Cmd::Until { n: 40, ms: 5000 },
        Cmd::Park { n: 2 },
        Cmd::PollFd { ms: 20000 },
        Cmd::Pause,
        Cmd::Resume,
        Cmd::Report,
        Cmd::Log,
        Cmd::Exit,
        Cmd::Run { rate: 5.0 },
        Cmd::Run { rate: 0.25 },
        Cmd::RunStop,
        Cmd::RunCount,
        Cmd::RunBurst { n: 50 },
        Cmd::URun { rate: 1.0, end: 2000 },
        Cmd::URunCount,
        Cmd::BigRun { len: 102400 },
        Cmd::BigRunStop,
        Cmd::Slow { us: 100 },
        Cmd::Status,
        Cmd::Brokers,
        Cmd::Drain { ms: 5000 },
        Cmd::Reach { ms: 5000, want: vec![(1, 0, 9), (2, 3, 2019)] },
        Cmd::Reach { ms: 1, want: vec![] },
        Cmd::Close { ms: 5000 },
    ];
    let mut names = std::collections::BTreeSet::new();
    for c in &cmds {
        let text = c.to_string();
        assert_eq!(text.parse::<Cmd>().as_ref(), Ok(c), "{text:?}");
        names.insert(text.split(' ').next().unwrap().to_string());
    }
    assert_eq!(names.len(), 28, "one name per command: {names:?}");
    for bad in
        ["", "until 5", "until 5 x", "reach 5 1:2", "typed all s e 2", "publish nowhere s e 0 1", "pause now", "fly"]
    {
        assert!(bad.parse::<Cmd>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn key_table_values_round_trip_through_the_environment() {
    fn trip<T: Value + std::fmt::Debug>(v: T) -> String {
        let text = v.encode();
        let back = T::decode(text.as_deref()).unwrap();
        assert_eq!(back.encode(), text, "{v:?}");
        format!("{back:?}")
    }
    for t in [Transport::SharedMemory, Transport::Socket, Transport::Auto] {
        assert_eq!(trip(t), format!("{t:?}"));
    }
    assert_eq!(trip(Wid::Worker(3)), "Worker(3)");
    assert_eq!(trip(Wid::PrivilegedAgent), "PrivilegedAgent");
    assert_eq!(trip(Some(7usize)), "Some(7)");
    assert_eq!(trip(None::<u64>), "None");
    assert_eq!(trip(true), "true");
    assert_eq!(trip(false), "false");
    assert_eq!(false.encode(), None, "false leaves the variable unset");
    assert_eq!(trip(PathBuf::from("/tmp/a b/ev.sock")), "\"/tmp/a b/ev.sock\"");
    assert_eq!(trip(Early::unique("u", "e", "c", 5)), format!("{:?}", Early::unique("u", "e", "c", 5)));
    assert_eq!(trip(Early::all("seq", "early", 50)), format!("{:?}", Early::all("seq", "early", 50)));
    let runs = Runs { inc: 4, dir: PathBuf::from("/tmp/we x") };
    assert_eq!(trip(runs.clone()), format!("{runs:?}"));
    assert!(u32::decode(None).is_err(), "a required value must be set");
    assert!(Transport::decode(Some("Carrier")).is_err());

    // Every variable of the tables is distinct, and a full Cfg writes each of its own.
    let keys: Vec<&str> = Cfg::KEYS.iter().chain(Spawn::KEYS).copied().collect();
    let unique: std::collections::BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(unique.len(), keys.len(), "{keys:?}");
    let mut cfg = Cfg::new(std::path::Path::new("/tmp/ev.sock"), 3);
    cfg.agent = true;
    cfg.max_queue_len = Some(1);
    cfg.max_payload_len = Some(2);
    cfg.ring_capacity = Some(4096);
    cfg.unique_timeout_ms = Some(3);
    cfg.unique_capacity = Some(4);
    cfg.generation = Some(5);
    cfg.broadcast_capacity = Some(8192);
    let written: Vec<&str> = cfg.env().iter().map(|(k, _)| *k).collect();
    assert_eq!(written, Cfg::KEYS);
    assert_eq!(cfg.options().get_ring_capacity(), 4096, "the table applies the library options");
    assert_eq!(cfg.options().get_generation(), 5);
    assert_eq!(cfg.options().get_broadcast_capacity(), 8192);
}

#[test]
fn the_report_parser_reads_every_line_kind() {
    let lines: Vec<String> = [
        "@@STREAM w1 seq x 0,1,2",
        "@@STREAM none cur x -",
        "@@RUN 1 0 10 2019 2000 1 0 10 0",
        "@@BADEX 1 0 9 20",
        "@@CONT 1 0 10",
        "@@LOST w1 4",
        "@@LOST w1 6",
        "@@LOST agent 1",
        "@@PAYLOAD w2 1000 1",
        "@@BROKER 3 2 123456",
        "@@STAT dropped 0",
        "@@PUB 1 0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let r = Report::parse(&lines);
    assert_eq!(r.stream("w1", "seq", "x"), vec![0, 1, 2]);
    assert_eq!(r.stream("none", "cur", "x"), Vec::<u64>::new());
    assert_eq!(r.stream_keys().len(), 2);
    let run = &r.runs[&(1, 0)];
    assert_eq!(
        (run.first, run.last, run.count, run.bad, run.gaps, run.examples.clone()),
        (10, 2019, 2000, 1, 10, vec![(9, 20)])
    );
    assert_eq!(r.cont[&(1, 0)], 10);
    assert_eq!(r.lost.len(), 3);
    assert_eq!(r.lost_by_slot(), [(1, 10), (u32::MAX, 1)].into_iter().collect());
    assert_eq!(r.payloads, vec![("w2".to_string(), 1000, true)]);
    assert_eq!(r.brokers, vec![(3, 2, 123456)]);
    assert_eq!(r.stat("dropped"), 0);
    let p = PubResult::parse(&["@@PUBERR no".to_string(), "@@PUB 3 1".to_string()]);
    assert_eq!((p.ok, p.err, p.errors), (3, 1, vec!["no".to_string()]));
}
