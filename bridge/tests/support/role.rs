//! The worker role: a process attached to one host's bus that publishes on command and
//! records what it receives.
//!
//! Commands (stdin), answers (`@@...` on stdout):
//! - `pub <tag> <from> <n>`: publish `Target::All` events `("t", "x")` with data
//!   `"<tag>:<i>"`, `i` in `from..from+n`, in order -> `@@OK`
//! - `uniq <hash>`: publish `Target::Unique(hash)` `("jobs", "run")`, data the hash -> `@@OK`
//! - `uniqp <hash>`: the same with source `"plain"` (not a cluster-unique pattern) -> `@@OK`
//! - `get <tag>` -> `@@n=.. dups=.. ordered=0|1 lost=.. relayed=..` (`lost`: the relayed lost
//!   notices from the host named by the tag's first letter, upper-cased... see `host_of`;
//!   `local_lost`: this host's own lost notices, whatever their publisher)
//! - `uniqs` -> `@@<hash>,<hash>,...` (the unique events this worker ran)
//! - `stats` -> `@@<the worker's Stats, Debug-formatted>` (for failure messages)

use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use worker_events::{Event, Events, Options, PublishError, SYSTEM_SOURCE, Target, Wid, Worker};

/// The host a tag's events come from: the tag up to its last character (`"a0"` -> `"a"`).
pub fn host_of(tag: &str) -> &str {
    &tag[..tag.len() - 1]
}

/// The origin host of a relayed event (`None`: published on this host).
pub fn origin_host<'a>(ev: &Event<'a>) -> Option<&'a str> {
    ev.origin_host()
}

/// The key of the lost notices published on this host (no origin host).
const LOCAL: &str = "local";

#[derive(Default)]
struct TagRec {
    n: u64,
    seen: HashSet<u64>,
    dups: u64,
    last: Option<u64>,
    ordered: bool,
    relayed: u64,
}

#[derive(Default)]
struct Rec {
    tags: BTreeMap<String, TagRec>,
    lost: BTreeMap<String, u64>,
    uniqs: Vec<String>,
}

fn record(rec: &Mutex<Rec>, ev: &Event<'_>) {
    let mut r = rec.lock().unwrap();
    if ev.source() == SYSTEM_SOURCE {
        if let Some(l) = ev.lost() {
            // Relayed notices by their origin host; this host's own (a local publisher's
            // events lost on their way here) under "local".
            let key = origin_host(ev).unwrap_or(LOCAL);
            *r.lost.entry(key.to_string()).or_default() += l.count;
        }
        return;
    }
    if ev.source() == "jobs" || ev.source() == "plain" {
        r.uniqs.push(String::from_utf8_lossy(ev.data_bytes()).into_owned());
        return;
    }
    if ev.source() != "t" {
        return;
    }
    let s = String::from_utf8_lossy(ev.data_bytes()).into_owned();
    let Some((tag, i)) = s.split_once(':') else { return };
    let Ok(i) = i.parse::<u64>() else { return };
    let t = r.tags.entry(tag.to_string()).or_insert_with(|| TagRec { ordered: true, ..Default::default() });
    t.n += 1;
    if !t.seen.insert(i) {
        t.dups += 1;
    }
    if t.last.is_some_and(|l| i <= l) {
        t.ordered = false;
    }
    t.last = Some(i);
    if origin_host(ev).is_some() {
        t.relayed += 1;
    }
}

fn publish_retry(w: &mut Worker, target: Target<'_>, source: &str, event: &str, data: &[u8]) {
    loop {
        match w.publish_bytes(target, source, event, data) {
            Ok(()) => return,
            Err(PublishError::QueueOverflow) => {
                let _ = w.wait(Some(Duration::from_millis(1)));
            }
            Err(e) => panic!("publish: {e}"),
        }
    }
}

/// The child's main: attach, then serve commands until stdin closes.
pub fn child_main() {
    if std::env::var(super::ROLE_ENV).is_err() {
        return;
    }
    if let Err(e) = worker_events_dev_support::process::die_with_parent() {
        eprintln!("{e}");
        std::process::exit(1);
    }
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let opts = Options::new(env("WEB_SOCK"))
        .workers(env("WEB_WORKERS").parse().unwrap())
        .enable_privileged_agent(true)
        .unique_timeout(Duration::from_millis(env("WEB_UNIQUE_MS").parse().unwrap()));
    let events = Events::new(opts).unwrap();
    let mut w = events.init_worker(Wid::Worker(env("WEB_WID").parse().unwrap())).unwrap();
    let rec = Arc::new(Mutex::new(Rec::default()));
    let r = rec.clone();
    w.subscribe("*", "*", move |ev| record(&r, ev));
    assert!(w.wait_ready(Duration::from_secs(10)).unwrap(), "not attached within 10 s");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in std::io::stdin().lock().lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    println!("@@READY");
    loop {
        let _ = w.wait(Some(Duration::from_millis(2)));
        let cmd = match rx.try_recv() {
            Ok(c) => c,
            Err(mpsc::TryRecvError::Empty) => continue,
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        let parts: Vec<&str> = cmd.split_whitespace().collect();
        match parts.as_slice() {
            ["pub", tag, from, n] => {
                let (from, n): (u64, u64) = (from.parse().unwrap(), n.parse().unwrap());
                for i in from..from + n {
                    publish_retry(&mut w, Target::All, "t", "x", format!("{tag}:{i}").as_bytes());
                    if i % 64 == 0 {
                        let _ = w.dispatch();
                    }
                }
                println!("@@OK");
            }
            ["uniqp", hash] => {
                publish_retry(&mut w, Target::Unique(hash), "plain", "run", hash.as_bytes());
                println!("@@OK");
            }
            ["uniq", hash] => {
                publish_retry(&mut w, Target::Unique(hash), "jobs", "run", hash.as_bytes());
                println!("@@OK");
            }
            ["get", tag] => {
                let _ = w.dispatch();
                let r = rec.lock().unwrap();
                let lost = r.lost.get(&host_of(tag).to_uppercase()).copied().unwrap_or(0);
                let local_lost = r.lost.get(LOCAL).copied().unwrap_or(0);
                let t = r.tags.get(*tag);
                println!(
                    "@@n={} dups={} ordered={} lost={} relayed={} local_lost={}",
                    t.map_or(0, |t| t.n),
                    t.map_or(0, |t| t.dups),
                    u8::from(t.is_none_or(|t| t.ordered)),
                    lost,
                    t.map_or(0, |t| t.relayed),
                    local_lost
                );
            }
            ["stats"] => {
                let _ = w.dispatch();
                println!("@@{:?}", w.stats());
            }
            ["uniqs"] => {
                let _ = w.dispatch();
                println!("@@{}", rec.lock().unwrap().uniqs.join(","));
            }
            _ => panic!("unknown command {cmd:?}"),
        }
    }
}
