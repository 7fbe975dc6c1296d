//! What a child records of the events it receives, for its report (`report.rs` parses it).
//!
//! Two recorders, chosen by the child's [`Spawn::runs`](super::cfg::Spawn::runs):
//! - the **list recorder** (default) keeps every sequence number per (publisher, source,
//!   event), the arrival order, sized payloads and their checks: exact comparisons for the
//!   scenario tests;
//! - the **run recorder** (failover) checks long paced runs on the fly instead of keeping them:
//!   per publisher incarnation (slot `p`'s `k`-th process publishes event `i<k>`), in order,
//!   no duplicate, no gap; it keeps a per-slot "last sequence received" table in a file
//!   mapping and logs unique deliveries to a file, both of which survive a SIGKILL, so the
//!   successor of a killed worker can show that it continues where its predecessor stopped.
//!
//! Both record system notices (lost, new broker) alike.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use worker_events::{Event, SYSTEM_SOURCE, Wid};
use worker_events_dev_support::monotonic_ns;

use super::cfg::Runs;
use super::{TYPED_LEN, check_pattern, pattern, wid_str};

/// Incarnations per slot the continuity table has room for.
pub const MAXINC: usize = 256;

/// The longest arrival log kept.
const MAX_LOG: usize = 100_000;

/// One publisher incarnation's run, as the run recorder saw it.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct RunRec {
    pub first: u64,
    pub last: u64,
    pub count: u64,
    /// Arrivals that were not `last + 1` (a duplicate, a reordering or a gap).
    pub bad: u64,
    /// The first few bad arrivals: (last, then).
    pub examples: Vec<(u64, u64)>,
    /// Big payloads whose bytes were wrong.
    pub bad_payload: u64,
    /// Events skipped by forward jumps (the socket transport's losses across a broker crash).
    pub gaps: u64,
    /// Arrivals at or before `last` (a duplicate or a reordering).
    pub backwards: u64,
}

/// Everything recorded; shared between the subscriber callback and the command loop.
#[derive(Default)]
pub struct Rec {
    /// (list) (publisher wid, source, event) -> sequence numbers in arrival order.
    pub streams: BTreeMap<(String, String, String), Vec<u64>>,
    /// (list) Arrival order of every event (bounded).
    pub log: Vec<String>,
    /// (list) Sized payloads: (publisher, len, content ok).
    pub payloads: Vec<(String, usize, bool)>,
    /// (runs) (publisher slot, incarnation) -> what arrived.
    pub runs: BTreeMap<(u32, u32), RunRec>,
    /// Lost notices: (publisher, count).
    pub lost: Vec<(String, u64)>,
    /// (runs) Per lost notice, diagnostics: the publisher slot's runs as they stood when it
    /// arrived (`inc:last,...`) and the CLOCK_MONOTONIC time in ms.
    pub lost_at: Vec<String>,
    /// Broker notices: (epoch, broker slot, CLOCK_MONOTONIC ns when the callback ran).
    pub brokers: Vec<(u64, u32, u64)>,
    /// (list) System events other than lost notices, and payloads that do not decode.
    pub decode_errors: u64,
    /// (runs) Events that were neither expected nor valid.
    pub other: u64,
    /// Non-system events received.
    pub events: u64,
    /// Sum of the counts of lost notices.
    pub lost_total: u64,
    /// Runs of the callback subscribed after the panicking one.
    pub after_panic: u64,
    /// (runs) Microseconds every run event's callback sleeps (a slow consumer).
    pub slow_us: u64,
}

/// The run recorder's continuity table: entry `p * MAXINC + inc` = 1 + the last sequence
/// number of run (p, inc) received by any incarnation of this slot. A file mapping, so what
/// the killed predecessor stored is still there for its successor.
pub struct Cont {
    map: memmap2::MmapMut,
}

/// The cells of [`Cont`]: a shared file mapping written by one process and read by its
/// successor after a SIGKILL. An atomic is what makes a cell untearable there; the library's
/// `crate::sync` shim is private to it, so the test names std's type.
#[allow(clippy::disallowed_types)]
type Cell = std::sync::atomic::AtomicU64;

impl Cont {
    fn open(path: &Path, workers: u32) -> Cont {
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap();
        let len = (workers as usize * MAXINC * 8) as u64;
        if f.metadata().unwrap().len() < len {
            f.set_len(len).unwrap();
        }
        // SAFETY: a private test file; only this slot's (single live) process maps it.
        let map = unsafe { memmap2::MmapMut::map_mut(&f).unwrap() };
        Cont { map }
    }

    fn cell(&self, p: u32, inc: u32) -> &Cell {
        let i = p as usize * MAXINC + inc as usize;
        assert!((i + 1) * 8 <= self.map.len());
        // SAFETY: in bounds (checked), 8-aligned (page-aligned mapping), and only ever
        // accessed as an atomic, so a SIGKILL never leaves a torn value.
        unsafe { &*(self.map.as_ptr().add(i * 8) as *const Cell) }
    }

    fn load(&self, p: u32, inc: u32) -> u64 {
        self.cell(p, inc).load(std::sync::atomic::Ordering::Relaxed)
    }

    fn store(&self, p: u32, inc: u32, v: u64) {
        self.cell(p, inc).store(v, std::sync::atomic::Ordering::Relaxed)
    }

    /// Every non-empty entry: (p, inc, 1 + last).
    pub fn entries(&self, workers: u32) -> Vec<(u32, u32, u64)> {
        let mut v = Vec::new();
        for p in 0..workers {
            for i in 0..MAXINC as u32 {
                let n = self.load(p, i);
                if n > 0 {
                    v.push((p, i, n));
                }
            }
        }
        v
    }
}

/// The run recorder's files.
pub struct RunFiles {
    pub cont: Cont,
    ulog: Mutex<std::fs::File>,
}

impl RunFiles {
    /// Open (create) the files of `slot`'s incarnation `runs.inc` in `runs.dir`.
    pub fn open(runs: &Runs, slot: u32, workers: u32) -> RunFiles {
        let cont = Cont::open(&runs.dir.join(format!("cont-{slot}")), workers);
        let ulog = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(runs.dir.join(format!("uniq-{slot}-{}.log", runs.inc)))
            .unwrap();
        RunFiles { cont, ulog: Mutex::new(ulog) }
    }
}

/// The slot of a worker id (`None` for the agent or no wid).
pub fn slot_of(w: Option<Wid>) -> Option<u32> {
    match w {
        Some(Wid::Worker(n)) => Some(n),
        _ => None,
    }
}

/// Byte `i` of big message `seq` after its 8-byte header.
fn big_byte(seq: u64, i: usize) -> u8 {
    ((seq * 7 + i as u64 * 31) % 251) as u8
}

/// A big run message: `seq` (8 bytes LE), then `len - 8` bytes that depend on it.
pub fn big_payload(seq: u64, len: usize) -> Vec<u8> {
    let mut v = seq.to_le_bytes().to_vec();
    v.extend((0..len - 8).map(|i| big_byte(seq, i)));
    v
}

/// Record one event (the `("*", "*")` subscriber of every child).
pub fn record(rec: &Mutex<Rec>, runs: Option<&RunFiles>, ev: &Event<'_>) {
    if ev.source() == SYSTEM_SOURCE {
        let mut r = rec.lock().unwrap();
        if let Some(l) = ev.lost() {
            r.lost.push((tagged(wid_str(Some(l.publisher)), ev), l.count));
            r.lost_total = r.lost_total.saturating_add(l.count);
            if let Some(p) = slot_of(Some(l.publisher)) {
                let at: Vec<String> =
                    r.runs.iter().filter(|((q, _), _)| *q == p).map(|((_, i), g)| format!("{i}:{}", g.last)).collect();
                let line = format!("w{p} {} runs={} t={}ms", l.count, at.join(","), super::monotonic_ns() / 1_000_000);
                r.lost_at.push(line);
            }
            if r.log.len() < MAX_LOG {
                r.log.push(format!("lost {} {}", wid_str(Some(l.publisher)), l.count));
            }
            return;
        }
        r.decode_errors += 1;
        match ev.new_broker() {
            Some(b) => r.brokers.push((b.epoch, slot_of(Some(b.broker)).unwrap_or(u32::MAX), monotonic_ns())),
            None => r.other += 1,
        }
        return;
    }
    rec.lock().unwrap().events += 1;
    match runs {
        Some(files) => record_run(rec, files, ev),
        None => record_list(rec, ev),
    }
}

fn record_list(rec: &Mutex<Rec>, ev: &Event<'_>) {
    let mut r = rec.lock().unwrap();
    let w = wid_str(ev.wid());
    let seq = if ev.source() == "typed" {
        // A typed `[u8; TYPED_LEN]` (see the `typed` command): its rkyv bytes are the array.
        let ok = ev.deserialize::<[u8; TYPED_LEN]>().is_ok_and(|a| a[..] == pattern(TYPED_LEN)[..]);
        let len = ev.data_bytes().len();
        r.payloads.push((w.clone(), len, ok && check_pattern(ev.data_bytes())));
        len as u64
    } else if ev.source() == "size" {
        let b = ev.data_bytes();
        let ok = check_pattern(b);
        r.payloads.push((w.clone(), b.len(), ok));
        b.len() as u64
    } else {
        match ev.deserialize::<u64>() {
            Ok(n) => n,
            Err(_) => {
                r.decode_errors += 1;
                u64::MAX
            }
        }
    };
    if r.log.len() < MAX_LOG {
        r.log.push(format!("{w} {} {} {seq}", ev.source(), ev.event()));
    }
    r.streams.entry((w, ev.source().to_string(), tagged(ev.event().to_string(), ev))).or_default().push(seq);
}

/// `name`, followed by `@<host>` for an event relayed from another host and `#<hash>` for a
/// unique event diverted to the agent (ordinary events: `name` unchanged).
fn tagged(mut name: String, ev: &Event<'_>) -> String {
    if let Some(h) = ev.origin_host() {
        name.push('@');
        name.push_str(h);
    }
    if let Some(h) = ev.unique_hash() {
        name.push('#');
        name.push_str(h);
    }
    name
}

fn record_run(rec: &Mutex<Rec>, files: &RunFiles, ev: &Event<'_>) {
    let other = || rec.lock().unwrap().other += 1;
    if ev.source() == "uniq" {
        match ev.deserialize::<u64>() {
            Ok(n) => files.ulog.lock().unwrap().write_all(format!("{n}\n").as_bytes()).unwrap(),
            Err(_) => other(),
        }
        return;
    }
    let (Some(p), Some(inc)) = (slot_of(ev.wid()), ev.event().strip_prefix('i').and_then(|s| s.parse::<u32>().ok()))
    else {
        return other();
    };
    let (seq, payload_ok) = match ev.source() {
        "seq" => match ev.deserialize::<u64>() {
            Ok(n) => (n, true),
            Err(_) => return other(),
        },
        "big" => {
            let b = ev.data_bytes();
            if b.len() < 8 {
                return other();
            }
            let seq = u64::from_le_bytes(b[..8].try_into().unwrap());
            let ok = b[8..].iter().enumerate().all(|(i, &x)| x == big_byte(seq, i));
            (seq, ok)
        }
        _ => return other(),
    };
    let slow = rec.lock().unwrap().slow_us;
    if slow > 0 {
        std::thread::sleep(Duration::from_micros(slow));
    }
    let mut r = rec.lock().unwrap();
    let s = r.runs.entry((p, inc)).or_insert_with(|| RunRec { first: seq, ..Default::default() });
    if s.count > 0 && seq > s.last + 1 {
        s.gaps += seq - s.last - 1;
    }
    if s.count > 0 && seq <= s.last {
        s.backwards += 1;
    }
    if s.count > 0 && seq != s.last + 1 {
        s.bad += 1;
        if s.examples.len() < 5 {
            s.examples.push((s.last, seq));
        }
    }
    if !payload_ok {
        s.bad_payload += 1;
    }
    s.last = seq;
    s.count += 1;
    files.cont.store(p, inc, seq + 1);
}
