//! The one parser of a child's answers: its report ([`Report`], the `report` command; the
//! `brokers` command's lines too) and the outcome of a publish command ([`PubResult`]).
//!
//! Report lines (every field separated by one space):
//! - `@@STREAM <wid> <src> <ev> <seq,seq,...|->`: the list recorder, per stream;
//! - `@@RUN <p> <inc> <first> <last> <count> <bad> <bad_payload> <gaps> <backwards>` and
//!   `@@BADEX <p> <inc> <last> <then>`: the run recorder, per publisher incarnation;
//! - `@@CONT <p> <inc> <1 + last>`: the continuity table as the child's predecessors left it;
//! - `@@LOST <wid> <count>`: one per lost notice;
//! - `@@LOSTAT w<slot> <count> runs=<inc:last,...> t=<ms>ms`: the same notices, with the
//!   publisher's runs as they stood when each arrived (diagnostics);
//! - `@@PAYLOAD <wid> <len> <ok 0|1>`: sized and typed payloads;
//! - `@@BROKER <epoch> <slot> <ns>`: one per broker notice;
//! - `@@STAT <name> <value>`.

use std::collections::{BTreeMap, HashMap};

use super::record::RunRec;

/// A child's recorded state.
#[derive(Debug, Default)]
pub struct Report {
    /// (list) (publisher, source, event) -> sequence numbers in arrival order.
    pub streams: BTreeMap<(String, String, String), Vec<u64>>,
    /// (runs) (publisher slot, incarnation) -> what arrived.
    pub runs: BTreeMap<(u32, u32), RunRec>,
    /// (runs) What the child's predecessors had received of each run: 1 + last.
    pub cont: BTreeMap<(u32, u32), u64>,
    /// Lost notices in arrival order: (publisher, count).
    pub lost: Vec<(String, u64)>,
    /// (runs) Per lost notice: the publisher's runs when it arrived, and the time (diagnostics).
    pub lost_at: Vec<String>,
    /// (publisher, len, content ok).
    pub payloads: Vec<(String, usize, bool)>,
    /// Broker notices: (epoch, broker slot, CLOCK_MONOTONIC ns of the callback).
    pub brokers: Vec<(u64, u32, u64)>,
    pub stats: HashMap<String, u64>,
}

fn n(f: &[&str], i: usize) -> u64 {
    f.get(i).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("report line {f:?}: field {i} is not a number"))
}

impl Report {
    /// Parse the answer lines of `report` (or `brokers`).
    pub fn parse(lines: &[String]) -> Report {
        let mut r = Report::default();
        for l in lines {
            let f: Vec<&str> = l.split(' ').collect();
            let slot_inc = || (n(&f, 1) as u32, n(&f, 2) as u32);
            match f[0] {
                "@@STREAM" => {
                    let seqs =
                        if f[4] == "-" { Vec::new() } else { f[4].split(',').map(|x| x.parse().unwrap()).collect() };
                    r.streams.insert((f[1].to_string(), f[2].to_string(), f[3].to_string()), seqs);
                }
                "@@RUN" => {
                    let s = RunRec {
                        first: n(&f, 3),
                        last: n(&f, 4),
                        count: n(&f, 5),
                        bad: n(&f, 6),
                        bad_payload: n(&f, 7),
                        gaps: n(&f, 8),
                        backwards: n(&f, 9),
                        examples: Vec::new(),
                    };
                    r.runs.insert(slot_inc(), s);
                }
                "@@BADEX" => {
                    if let Some(s) = r.runs.get_mut(&slot_inc()) {
                        s.examples.push((n(&f, 3), n(&f, 4)));
                    }
                }
                "@@CONT" => {
                    r.cont.insert(slot_inc(), n(&f, 3));
                }
                "@@LOST" => r.lost.push((f[1].to_string(), n(&f, 2))),
                "@@LOSTAT" => r.lost_at.push(f[1..].join(" ")),
                "@@PAYLOAD" => r.payloads.push((f[1].to_string(), n(&f, 2) as usize, f[3] == "1")),
                "@@BROKER" => r.brokers.push((n(&f, 1), n(&f, 2) as u32, n(&f, 3))),
                "@@STAT" => {
                    r.stats.insert(f[1].to_string(), n(&f, 2));
                }
                _ => {}
            }
        }
        r
    }

    /// The sequence numbers of one stream (empty if none arrived).
    pub fn stream(&self, wid: &str, src: &str, ev: &str) -> Vec<u64> {
        self.streams.get(&(wid.to_string(), src.to_string(), ev.to_string())).cloned().unwrap_or_default()
    }

    /// A stat by name (panics if the child did not report it).
    pub fn stat(&self, k: &str) -> u64 {
        *self.stats.get(k).unwrap_or_else(|| panic!("no stat {k}"))
    }

    /// The streams that arrived, sorted.
    pub fn stream_keys(&self) -> Vec<(String, String, String)> {
        self.streams.keys().cloned().collect()
    }

    /// The counts of the lost notices summed per publisher slot (the agent as `u32::MAX`).
    pub fn lost_by_slot(&self) -> BTreeMap<u32, u64> {
        let mut m = BTreeMap::new();
        for (w, c) in &self.lost {
            let slot = w.strip_prefix('w').and_then(|s| s.parse().ok()).unwrap_or(u32::MAX);
            *m.entry(slot).or_default() += c;
        }
        m
    }
}

/// The outcome of a publish command.
#[derive(Debug, Default)]
pub struct PubResult {
    pub ok: u64,
    pub err: u64,
    /// The first error texts.
    pub errors: Vec<String>,
}

impl PubResult {
    /// Parse the answer lines of a publish command.
    pub fn parse(lines: &[String]) -> PubResult {
        let mut r = PubResult::default();
        for l in lines {
            if let Some(e) = l.strip_prefix("@@PUBERR ") {
                r.errors.push(e.to_string());
            } else if let Some(rest) = l.strip_prefix("@@PUB ") {
                let f: Vec<&str> = rest.split(' ').collect();
                r.ok = n(&f, 0);
                r.err = n(&f, 1);
            }
        }
        r
    }
}
