//! Failover tests with real SIGKILL (`ARCHITECTURE.md` guarantees G3 and G4): the broker killed under a
//! steady stream of `All` events (failover time printed), random worker kills and restarts,
//! a publisher killed in the middle of multi-fragment messages, unique events across broker
//! kills, a dead slot's queue filling up, unique targets skipping a dead slot, a graceful
//! close of the broker, a restarted worker attaching while the broker still holds its dead
//! predecessor's connection, and the broker kills again on the socket transport.
//!
//! The children are this test binary re-executed (see `tests/common/mod.rs`) in a failover
//! role (`WE_FO=1`, implemented below): they stream sequence-numbered events at a fixed
//! rate, check what they receive on the fly (per publisher incarnation: in order, no
//! duplicate, no gap), log unique deliveries to a file (which survives a SIGKILL), and keep
//! a per-slot "last sequence received" table in a shared file mapping, so the successor of
//! a killed worker can show that it continues exactly where its predecessor stopped.
//!
//! Event streams are named after the publisher's incarnation: slot `p` restarted for the
//! `k`-th time publishes event `i<k>` with sequence numbers from 0.

// Test-harness state (a counter, a flag, a test-owned shared mmap), not the crate's shared-memory
// protocol: the clippy.toml ban on std atomics (which keeps them in src/sync.rs) does not apply.
#![allow(clippy::disallowed_types)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use worker_events::{Event, Events, SYSTEM_SOURCE, Target, Wid, Worker};

/// Incarnations per slot the continuity table has room for.
const MAXINC: usize = 256;

/// The tests of this file run one at a time: each already runs up to 6 processes on a
/// small machine, and the failover times they measure should not include another test.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The child roles: the failover role with `WE_FO`, else the common one.
#[test]
#[ignore = "child process role, spawned by the other tests"]
fn child_entry() {
    if std::env::var("WE_FO").is_ok() {
        fo_child();
    } else {
        common::child_main();
    }
}

// ==========================================================================================
// Child role

#[derive(Default, Debug, Clone)]
struct StreamRec {
    first: u64,
    last: u64,
    count: u64,
    /// Arrivals that were not `last + 1` (a duplicate, a reordering or a gap).
    bad: u64,
    examples: Vec<(u64, u64)>,
    /// Big payloads whose bytes were wrong.
    bad_payload: u64,
    /// Events skipped by forward jumps (the socket transport's losses across a broker crash).
    gaps: u64,
    /// Arrivals at or before `last` (a duplicate or a reordering).
    backwards: u64,
}

#[derive(Default)]
struct Rec {
    /// (publisher slot, incarnation) -> what arrived.
    streams: BTreeMap<(u32, u32), StreamRec>,
    /// Lost notices: publisher slot -> total count.
    lost: BTreeMap<u32, u64>,
    /// Broker notices: (epoch, broker slot, CLOCK_MONOTONIC ns when the callback ran).
    brokers: Vec<(u64, u32, u64)>,
    /// Events that were neither expected nor valid.
    other: u64,
}

/// The per-slot continuity table: entry `p * MAXINC + inc` = 1 + last sequence number of
/// stream (p, inc) received by any incarnation of this slot. A file mapping, so what the
/// killed predecessor stored is still there for its successor.
struct Cont {
    map: memmap2::MmapMut,
}

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

    fn cell(&self, p: u32, inc: u32) -> &AtomicU64 {
        let i = p as usize * MAXINC + inc as usize;
        assert!((i + 1) * 8 <= self.map.len());
        // SAFETY: in bounds (checked), 8-aligned (page-aligned mapping), and only ever
        // accessed as an atomic, so a SIGKILL never leaves a torn value.
        unsafe { &*(self.map.as_ptr().add(i * 8) as *const AtomicU64) }
    }
}

fn slot_of(w: Option<Wid>) -> Option<u32> {
    match w {
        Some(Wid::Worker(n)) => Some(n),
        _ => None,
    }
}

/// Byte `i` of big message `seq` after its 8-byte header.
fn big_byte(seq: u64, i: usize) -> u8 {
    ((seq * 7 + i as u64 * 31) % 251) as u8
}

fn big_payload(seq: u64, len: usize) -> Vec<u8> {
    let mut v = seq.to_le_bytes().to_vec();
    v.extend((0..len - 8).map(|i| big_byte(seq, i)));
    v
}

/// Microseconds every `seq` callback sleeps (a slow consumer), set by the `slow` command.
static SLOW_US: AtomicU64 = AtomicU64::new(0);

fn on_event(rec: &Mutex<Rec>, cont: &Cont, ulog: &Mutex<std::fs::File>, ev: &Event<'_>) {
    if ev.source() == SYSTEM_SOURCE {
        let mut r = rec.lock().unwrap();
        if let Some(l) = ev.lost() {
            *r.lost.entry(slot_of(Some(l.publisher)).unwrap_or(u32::MAX)).or_default() += l.count;
        } else if let Some(b) = ev.new_broker() {
            r.brokers.push((b.epoch, slot_of(Some(b.broker)).unwrap_or(u32::MAX), mono_ns()));
        } else {
            r.other += 1;
        }
        return;
    }
    if ev.source() == "uniq" {
        match ev.deserialize::<u64>() {
            Ok(n) => {
                let mut f = ulog.lock().unwrap();
                f.write_all(format!("{n}\n").as_bytes()).unwrap();
            }
            Err(_) => rec.lock().unwrap().other += 1,
        }
        return;
    }
    let (Some(p), Some(inc)) = (slot_of(ev.wid()), ev.event().strip_prefix('i').and_then(|s| s.parse::<u32>().ok()))
    else {
        rec.lock().unwrap().other += 1;
        return;
    };
    let (seq, payload_ok) = match ev.source() {
        "seq" => match ev.deserialize::<u64>() {
            Ok(n) => (n, true),
            Err(_) => {
                rec.lock().unwrap().other += 1;
                return;
            }
        },
        "big" => {
            let b = ev.data_bytes();
            if b.len() < 8 {
                rec.lock().unwrap().other += 1;
                return;
            }
            let seq = u64::from_le_bytes(b[..8].try_into().unwrap());
            let ok = b[8..].iter().enumerate().all(|(i, &x)| x == big_byte(seq, i));
            (seq, ok)
        }
        _ => {
            rec.lock().unwrap().other += 1;
            return;
        }
    };
    let slow = SLOW_US.load(Ordering::Relaxed);
    if slow > 0 {
        std::thread::sleep(Duration::from_micros(slow));
    }
    let mut r = rec.lock().unwrap();
    let s = r.streams.entry((p, inc)).or_insert_with(|| StreamRec { first: seq, ..Default::default() });
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
    cont.cell(p, inc).store(seq + 1, Ordering::Relaxed);
}

/// Paced publishing: `rate` events per millisecond from `start`.
struct Pace {
    start: Instant,
    rate: f64,
    sent: u64,
    errors: u64,
    end: u64,
}

impl Pace {
    fn new(rate: f64, end: u64) -> Pace {
        Pace { start: Instant::now(), rate, sent: 0, errors: 0, end }
    }
    fn due(&self) -> u64 {
        ((self.start.elapsed().as_secs_f64() * 1000.0 * self.rate) as u64).min(self.end).min(self.sent + 2000)
    }
}

fn fo_child() {
    let cfg = cfg_from_env();
    let slot: u32 = std::env::var("WE_WID").unwrap().parse().unwrap();
    let inc: u32 = std::env::var("WE_FO_INC").unwrap().parse().unwrap();
    let dir = PathBuf::from(std::env::var("WE_FO_DIR").unwrap());
    let out = |s: &str| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    };
    let cont = Arc::new(Cont::open(&dir.join(format!("cont-{slot}")), cfg.workers));
    // What the predecessors of this slot received, before anything of ours runs.
    let mut prev = Vec::new();
    for p in 0..cfg.workers {
        for i in 0..MAXINC as u32 {
            let v = cont.cell(p, i).load(Ordering::Relaxed);
            if v > 0 {
                prev.push((p, i, v));
            }
        }
    }
    let ulog = Arc::new(Mutex::new(
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("uniq-{slot}-{inc}.log"))).unwrap(),
    ));
    let events = Events::new(cfg.options()).unwrap();
    let mut worker = match events.init_worker(Wid::Worker(slot)) {
        Ok(w) => w,
        Err(e) => {
            out(&format!("@@ERR init_worker: {e}"));
            std::process::exit(2);
        }
    };
    let rec = Arc::new(Mutex::new(Rec::default()));
    {
        let (rec, cont, ulog) = (rec.clone(), cont.clone(), ulog.clone());
        worker.subscribe("*", "*", move |ev| on_event(&rec, &cont, &ulog, ev));
    }
    match worker.wait_ready(Duration::from_secs(30)) {
        Ok(true) => {}
        other => {
            out(&format!("@@ERR not ready: {other:?}"));
            std::process::exit(2);
        }
    }
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in std::io::BufRead::lines(stdin.lock()) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    out(&format!("@@READY w{slot} broker={} transport={:?}", worker.is_broker(), worker.transport()));

    let event_name = format!("i{inc}");
    let mut seq_pace: Option<Pace> = None;
    let mut uniq_pace: Option<Pace> = None;
    let mut big: Option<(usize, Pace)> = None;
    let born = Instant::now();
    let tick = Duration::from_millis(1);
    // `wait` errors, reported to the parent (which asserts there are none).
    let wait_errors = std::cell::Cell::new(0u64);
    let pump = |worker: &mut Worker| {
        if born.elapsed() > Duration::from_secs(150) {
            std::process::exit(3);
        }
        if let Err(e) = worker.wait(Some(tick)) {
            eprintln!("fo child w{slot}: wait error: {e}");
            wait_errors.set(wait_errors.get() + 1);
        }
    };
    loop {
        // Commands.
        let line = match rx.try_recv() {
            Ok(l) => Some(l),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => std::process::exit(0),
        };
        if let Some(line) = line {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.first().copied().unwrap_or("") {
                "stream" => seq_pace = Some(Pace::new(f[1].parse().unwrap(), u64::MAX)),
                "stop" => {
                    let p = seq_pace.take().unwrap();
                    out(&format!("@@STOPPED {} {}", p.sent, p.errors));
                }
                "count" => out(&format!("@@COUNT {}", seq_pace.as_ref().map_or(0, |p| p.sent))),
                // burst <n>: n more events of the stream right now (creating it if needed).
                "burst" => {
                    let n: u64 = f[1].parse().unwrap();
                    let p = seq_pace.get_or_insert_with(|| Pace::new(0.0, u64::MAX));
                    for _ in 0..n {
                        match worker.publish(Target::All, "seq", &event_name, &p.sent) {
                            Ok(()) => p.sent += 1,
                            Err(_) => p.errors += 1,
                        }
                        let _ = worker.dispatch();
                    }
                    out(&format!("@@COUNT {} {}", p.sent, p.errors));
                }
                "ustream" => uniq_pace = Some(Pace::new(f[1].parse().unwrap(), f[2].parse().unwrap())),
                // @@UCOUNT <sent> <end> <unique_pending> <publish errors>
                "ucount" => {
                    let (sent, end, errors) = uniq_pace.as_ref().map_or((0, 0, 0), |p| (p.sent, p.end, p.errors));
                    out(&format!("@@UCOUNT {sent} {end} {} {errors}", worker.stats().unique_pending));
                }
                "big" => big = Some((f[1].parse().unwrap(), Pace::new(0.0, u64::MAX))),
                "bigstop" => {
                    let (_, p) = big.take().unwrap();
                    out(&format!("@@STOPPED {} {}", p.sent, p.errors));
                }
                "slow" => SLOW_US.store(f[1].parse().unwrap(), Ordering::Relaxed),
                "status" => out(&format!("@@STATUS {} {}", u8::from(worker.is_broker()), u8::from(worker.is_ready()))),
                "brokers" => {
                    for (e, s, t) in &rec.lock().unwrap().brokers {
                        out(&format!("@@BROKER {e} {s} {t}"));
                    }
                }
                // drain <ms>: dispatch until every inbound ring is empty; answers
                // `@@DRAINED reached` or `@@DRAINED timeout`.
                "drain" => {
                    let limit = Instant::now() + Duration::from_millis(f[1].parse().unwrap());
                    let busy = |w: &Worker| w.stats().peers.iter().any(|p| p.inbound_depth > 0);
                    while busy(&worker) && Instant::now() < limit {
                        pump(&mut worker);
                    }
                    let reached = !busy(&worker);
                    pump(&mut worker);
                    out(&format!("@@DRAINED {}", if reached { "reached" } else { "timeout" }));
                }
                // until <ms> <p>:<inc>:<last> ...: dispatch until each stream reached `last`.
                "until" => {
                    let limit = Instant::now() + Duration::from_millis(f[1].parse().unwrap());
                    let want: Vec<(u32, u32, u64)> = f[2..]
                        .iter()
                        .map(|s| {
                            let v: Vec<u64> = s.split(':').map(|x| x.parse().unwrap()).collect();
                            (v[0] as u32, v[1] as u32, v[2])
                        })
                        .collect();
                    let reached = loop {
                        let done = {
                            let r = rec.lock().unwrap();
                            want.iter().all(|&(p, i, last)| r.streams.get(&(p, i)).is_some_and(|s| s.last >= last))
                        };
                        if done {
                            break true;
                        }
                        if Instant::now() >= limit {
                            break false;
                        }
                        pump(&mut worker);
                    };
                    out(&format!("@@UNTIL {}", if reached { "reached" } else { "timeout" }));
                }
                "report" => {
                    let r = rec.lock().unwrap();
                    for ((p, i), s) in &r.streams {
                        out(&format!(
                            "@@STREAM {p} {i} {} {} {} {} {} {} {}",
                            s.first, s.last, s.count, s.bad, s.bad_payload, s.gaps, s.backwards
                        ));
                        for (a, b) in &s.examples {
                            out(&format!("@@BADEX {p} {i} {a} {b}"));
                        }
                    }
                    for (p, i, v) in &prev {
                        out(&format!("@@CONT {p} {i} {v}"));
                    }
                    for (p, c) in &r.lost {
                        out(&format!("@@LOST {p} {c}"));
                    }
                    for (e, s, t) in &r.brokers {
                        out(&format!("@@BROKER {e} {s} {t}"));
                    }
                    let st = worker.stats();
                    for (k, v) in [
                        ("other", r.other),
                        ("lost", st.lost),
                        ("dropped", st.dropped),
                        ("lost_outbound", st.lost_outbound),
                        ("failovers", st.failovers),
                        ("unique_pending", st.unique_pending),
                        ("unique_duplicates", st.unique_duplicates),
                        ("is_broker", u64::from(worker.is_broker())),
                        ("is_ready", u64::from(worker.is_ready())),
                        ("wait_errors", wait_errors.get()),
                    ] {
                        out(&format!("@@STAT {k} {v}"));
                    }
                }
                "close" => {
                    let t: u64 = f[1].parse().unwrap();
                    let start = Instant::now();
                    let r = worker.close(Duration::from_millis(t));
                    let took = start.elapsed().as_secs_f64() * 1000.0;
                    out(&format!("@@CLOSED {} {took:.1}", r.map_or_else(|e| e.to_string(), |()| "ok".into())));
                    out("@@OK");
                    std::process::exit(0);
                }
                other => {
                    out(&format!("@@ERR unknown command {other}"));
                    continue;
                }
            }
            out("@@OK");
            continue;
        }
        // Paced publishing.
        if let Some(p) = seq_pace.as_mut() {
            let due = p.due();
            while p.sent < due {
                match worker.publish(Target::All, "seq", &event_name, &p.sent) {
                    Ok(()) => p.sent += 1,
                    Err(e) => {
                        p.errors += 1;
                        eprintln!("fo child w{slot}: publish: {e}");
                        break;
                    }
                }
            }
        }
        if let Some(p) = uniq_pace.as_mut() {
            let due = p.due();
            while p.sent < due {
                let hash = format!("h{}", p.sent);
                match worker.publish(Target::Unique(&hash), "uniq", "u", &p.sent) {
                    Ok(()) => p.sent += 1,
                    Err(e) => {
                        p.errors += 1;
                        eprintln!("fo child w{slot}: unique publish: {e}");
                        break;
                    }
                }
            }
        }
        if let Some((len, p)) = big.as_mut() {
            // As fast as the slowest receiver takes them (at most two waiting per peer).
            if worker.stats().peers.iter().all(|x| x.backlog < 2) {
                match worker.publish_bytes(Target::All, "big", &event_name, &big_payload(p.sent, *len)) {
                    Ok(()) => p.sent += 1,
                    Err(e) => {
                        p.errors += 1;
                        eprintln!("fo child w{slot}: big publish: {e}");
                    }
                }
            }
        }
        pump(&mut worker);
    }
}

// ==========================================================================================
// Parent side

/// A child's report, parsed.
#[derive(Debug, Default)]
struct FoReport {
    streams: BTreeMap<(u32, u32), StreamRec>,
    cont: BTreeMap<(u32, u32), u64>,
    lost: BTreeMap<u32, u64>,
    brokers: Vec<(u64, u32, u64)>,
    stats: HashMap<String, u64>,
}

impl FoReport {
    fn parse(lines: &[String]) -> FoReport {
        let mut r = FoReport::default();
        for l in lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f[i].parse::<u64>().unwrap();
            match f[0] {
                "@@STREAM" => {
                    let s = StreamRec {
                        first: n(3),
                        last: n(4),
                        count: n(5),
                        bad: n(6),
                        bad_payload: n(7),
                        gaps: n(8),
                        backwards: n(9),
                        examples: Vec::new(),
                    };
                    r.streams.insert((n(1) as u32, n(2) as u32), s);
                }
                "@@BADEX" => {
                    if let Some(s) = r.streams.get_mut(&(n(1) as u32, n(2) as u32)) {
                        s.examples.push((n(3), n(4)));
                    }
                }
                "@@CONT" => {
                    r.cont.insert((n(1) as u32, n(2) as u32), n(3));
                }
                "@@LOST" => {
                    r.lost.insert(n(1) as u32, n(2));
                }
                "@@BROKER" => r.brokers.push((n(1), n(2) as u32, n(3))),
                "@@STAT" => {
                    r.stats.insert(f[1].to_string(), n(2));
                }
                _ => {}
            }
        }
        r
    }

    fn stat(&self, k: &str) -> u64 {
        self.stats[k]
    }
}

/// One running child.
struct Proc {
    child: Child,
    inc: u32,
    /// Logical time of its READY.
    born: u64,
}

/// One publisher incarnation's stream.
#[derive(Debug, Clone)]
struct StreamInfo {
    /// Logical time the stream started.
    started: u64,
    /// Events published, once stopped (None while running, or if the publisher was killed).
    total: Option<u64>,
    killed: bool,
}

/// A set of worker processes in the failover role, with the bookkeeping the checks need.
struct Cluster {
    wd: Watchdog,
    cfg: Cfg,
    dir: TestDir,
    procs: Vec<Option<Proc>>,
    next_inc: Vec<u32>,
    clock: u64,
    streams: BTreeMap<(u32, u32), StreamInfo>,
    /// Slots that stream `All` events (their successors too), at this rate (events/ms).
    publishers: Vec<u32>,
    rate: f64,
    kills: u64,
    /// Lost notices tolerated per publisher slot (a message cut by a kill).
    allow_lost: BTreeMap<u32, u64>,
    /// The socket transport: losses across a broker crash are allowed, but each must be
    /// reported (a lost notice per gap), and a restarted receiver's continuity is not checked
    /// (what its predecessor's connection held died with it, reported the same way).
    socket: bool,
    /// (socket transport) Events skipped and reported, over all receivers.
    socket_losses: u64,
}

impl Cluster {
    fn new(name: &str, cfg_fn: impl FnOnce(&mut Cfg), workers: u32, publishers: &[u32], rate: f64) -> Cluster {
        let dir = TestDir::new(name);
        let mut cfg = Cfg::new(&dir.sock(), workers);
        cfg_fn(&mut cfg);
        Cluster {
            socket: cfg.transport == worker_events::Transport::Socket,
            wd: Watchdog::new(name),
            cfg,
            dir,
            procs: (0..workers).map(|_| None).collect(),
            next_inc: vec![0; workers as usize],
            clock: 0,
            streams: BTreeMap::new(),
            publishers: publishers.to_vec(),
            rate,
            kills: 0,
            allow_lost: BTreeMap::new(),
            socket_losses: 0,
        }
    }

    fn spawn(&mut self, slot: u32) {
        let inc = self.next_inc[slot as usize];
        self.next_inc[slot as usize] += 1;
        let dir = self.dir.path.to_string_lossy().into_owned();
        let inc_s = inc.to_string();
        let child = self.wd.spawn_with(
            &self.cfg,
            Wid::Worker(slot),
            &[("WE_FO", "1"), ("WE_FO_INC", &inc_s), ("WE_FO_DIR", &dir)],
        );
        self.clock += 1;
        self.procs[slot as usize] = Some(Proc { child, inc, born: self.clock });
    }

    /// Start the `All` stream of `slot` if it is a publisher slot.
    fn start_stream(&mut self, slot: u32) {
        if !self.publishers.contains(&slot) {
            return;
        }
        let rate = self.rate;
        let p = self.procs[slot as usize].as_mut().unwrap();
        p.child.cmd(&format!("stream {rate}"));
        self.clock += 1;
        self.streams.insert((slot, p.inc), StreamInfo { started: self.clock, total: None, killed: false });
    }

    fn spawn_all(&mut self) {
        for s in 0..self.procs.len() as u32 {
            self.spawn(s);
        }
        for s in 0..self.procs.len() as u32 {
            self.start_stream(s);
        }
    }

    fn proc(&mut self, slot: u32) -> &mut Child {
        &mut self.procs[slot as usize].as_mut().unwrap().child
    }

    fn live(&self) -> Vec<u32> {
        (0..self.procs.len() as u32).filter(|&s| self.procs[s as usize].is_some()).collect()
    }

    /// (is_broker, is_ready) of a live slot.
    fn status(&mut self, slot: u32) -> (bool, bool) {
        let l = self.proc(slot).cmd("status");
        let f: Vec<&str> = l[0].split_whitespace().collect();
        (f[1] == "1", f[2] == "1")
    }

    fn broker(&mut self) -> Option<u32> {
        let b: Vec<u32> = self.live().into_iter().filter(|&s| self.status(s).0).collect();
        assert!(b.len() <= 1, "two brokers at once: {b:?}");
        b.first().copied()
    }

    /// SIGKILL a slot; returns the CLOCK_MONOTONIC time of the kill.
    fn kill(&mut self, slot: u32) -> u64 {
        let p = self.procs[slot as usize].take().expect("live slot");
        if let Some(s) = self.streams.get_mut(&(slot, p.inc)) {
            s.killed = true;
        }
        self.kills += 1;
        self.clock += 1;
        p.child.sigkill()
    }

    /// Stop every live stream, wait until every live worker has every completed stream to
    /// its end, and check the invariants. Returns the reports by slot.
    fn finish_and_check(&mut self) -> BTreeMap<u32, FoReport> {
        for s in self.live() {
            let inc = self.procs[s as usize].as_ref().unwrap().inc;
            let Some(info) = self.streams.get(&(s, inc)).cloned() else { continue };
            if info.killed || info.total.is_some() {
                continue;
            }
            let l = self.proc(s).cmd("stop");
            let f: Vec<&str> = l[0].split_whitespace().collect();
            assert_eq!(f[2], "0", "w{s}: publish errors");
            self.streams.get_mut(&(s, inc)).unwrap().total = Some(f[1].parse().unwrap());
        }
        let want: Vec<String> = self
            .streams
            .iter()
            .filter_map(|(&(p, i), s)| s.total.filter(|&t| t > 0).map(|t| format!("{p}:{i}:{}", t - 1)))
            .collect();
        let left = self.wd.remaining().saturating_sub(Duration::from_secs(5)).as_millis();
        let mut reports = BTreeMap::new();
        for s in self.live() {
            let l = self.proc(s).cmd(&format!("until {left} {}", want.join(" ")));
            let reached = l.iter().any(|x| x == "@@UNTIL reached");
            let r = FoReport::parse(&self.proc(s).cmd("report"));
            assert!(reached, "w{s}: streams not complete: want {want:?}, got {:?}", r.streams);
            reports.insert(s, r);
        }
        let mut interrupted = 0;
        let mut resumed = 0;
        for (&s, r) in &reports {
            let me = self.procs[s as usize].as_ref().unwrap();
            let ctx = format!("receiver w{s} (incarnation {})", me.inc);
            assert_eq!(r.stat("other"), 0, "{ctx}: unexpected events");
            assert_eq!(r.stat("dropped"), 0, "{ctx}: malformed messages");
            assert_eq!(r.stat("wait_errors"), 0, "{ctx}: Worker::wait failed (see its stderr)");
            assert_eq!(r.stat("lost"), r.lost.values().sum::<u64>(), "{ctx}: lost events: {:?}", r.lost);
            if self.socket {
                // Nothing lost silently: per publisher slot, the events skipped in its
                // streams equal the counts of the lost notices received; never a repeat.
                let mut gaps: BTreeMap<u32, u64> = BTreeMap::new();
                for (&(p, _), g) in &r.streams {
                    assert_eq!(g.backwards, 0, "{ctx}: stream from w{p} duplicated or reordered: {g:?}");
                    *gaps.entry(p).or_default() += g.gaps;
                }
                for p in gaps.keys().chain(r.lost.keys()).copied().collect::<std::collections::BTreeSet<_>>() {
                    let (g, l) = (gaps.get(&p).copied().unwrap_or(0), r.lost.get(&p).copied().unwrap_or(0));
                    assert_eq!(g, l, "{ctx}: {g} events from w{p} missing, {l} reported lost");
                }
                self.socket_losses += gaps.values().sum::<u64>();
            }
            for (p, n) in &r.lost {
                if self.socket {
                    break;
                }
                let allowed = self.allow_lost.get(p).copied().unwrap_or(0);
                assert!(*n <= allowed, "{ctx}: {n} events from w{p} lost (tolerated: {allowed})");
            }
            assert_eq!(r.stat("is_ready"), 1, "{ctx}: not ready at the end");
            let mut skipped = 0;
            for (&(p, i), info) in &self.streams {
                let got = r.streams.get(&(p, i));
                if let Some(g) = got.filter(|_| !self.socket) {
                    assert!(g.bad == 0, "{ctx}: stream w{p}/i{i} out of order, duplicated or gapped: {g:?}");
                    assert_eq!(g.bad_payload, 0, "{ctx}: stream w{p}/i{i}: corrupt payloads");
                }
                // Where this slot's predecessors stopped (their continuity table).
                let expected_first = r.cont.get(&(p, i)).copied().unwrap_or(0);
                if me.born < info.started {
                    assert_eq!(expected_first, 0, "{ctx}: predecessors saw a stream started after this one");
                }
                match (got, info.total) {
                    (Some(g), Some(t)) if self.socket => {
                        assert_eq!(g.bad_payload, 0, "{ctx}: stream w{p}/i{i}: corrupt payloads");
                        assert_eq!(g.last + 1, t, "{ctx}: stream w{p}/i{i} incomplete");
                    }
                    (Some(_), None) if self.socket => {}
                    (Some(g), _) => {
                        // The successor resumes exactly after its predecessor; at most one
                        // message whose callback the kill interrupted may be missing.
                        assert!(
                            g.first == expected_first || (g.first == expected_first + 1 && me.inc > 0),
                            "{ctx}: stream w{p}/i{i} starts at {} but its predecessors stopped at {expected_first}",
                            g.first
                        );
                        if g.first != expected_first {
                            skipped += 1;
                        }
                        if expected_first > 0 {
                            resumed += 1;
                        }
                        if let Some(t) = info.total {
                            assert_eq!(g.last + 1, t, "{ctx}: stream w{p}/i{i} incomplete");
                        }
                    }
                    (None, Some(t)) => {
                        assert!(t == 0 || expected_first == t, "{ctx}: stream w{p}/i{i} ({t} events) never arrived")
                    }
                    (None, None) => {}
                }
            }
            assert!(skipped <= 1, "{ctx}: {skipped} streams skipped a message after the restart");
            interrupted += skipped;
        }
        let total: u64 = self.streams.values().filter_map(|s| s.total).sum();
        let checked: u64 = reports.values().flat_map(|r| r.streams.values().map(|s| s.count)).sum();
        eprintln!(
            "{}: {} kills, {} publisher incarnations ({} killed); {checked} deliveries checked on {} surviving \
             receivers ({total} events from surviving publishers); {resumed} streams resumed by a restarted \
             receiver exactly where its killed predecessor stopped ({interrupted} one message later: a callback \
             interrupted by the kill)",
            self.wd_name(),
            self.kills,
            self.streams.len(),
            self.streams.values().filter(|s| s.killed).count(),
            reports.len()
        );
        reports
    }

    fn wd_name(&self) -> String {
        self.dir.path.file_name().unwrap().to_string_lossy().into_owned()
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i.min(s.len() - 1)]
}

// ==========================================================================================
// 1. The broker killed 20 times in a row under a steady stream of All events.

#[test]
fn broker_killed_20_times_under_all_stream() {
    broker_kills_under_all_stream(false);
}

/// The same on the socket transport, as far as it allows: events that died with a broker
/// are lost, but each loss is reported to each receiver (lost notices = gaps, exactly), and
/// nothing arrives twice or out of order.
#[test]
fn socket_broker_killed_20_times_under_all_stream() {
    broker_kills_under_all_stream(true);
}

fn broker_kills_under_all_stream(socket: bool) {
    let _serial = serial();
    const CYCLES: usize = 20;
    let mut c = Cluster::new(
        if socket { "fo-sock-broker" } else { "fo-broker" },
        |cfg| {
            cfg.max_queue_len = Some(1_000_000);
            if socket {
                cfg.transport = worker_events::Transport::Socket;
            }
        },
        6,
        &[3, 4, 5],
        5.0,
    );
    c.spawn_all();
    let mut last_epoch = 0;
    let mut elect_ms = Vec::new();
    let mut ready_ms = Vec::new();
    let mut killed_publishers = 0;
    for cycle in 0..CYCLES {
        let b = c.broker().unwrap_or_else(|| panic!("cycle {cycle}: no broker"));
        if c.publishers.contains(&b) {
            killed_publishers += 1;
        }
        let kill_ns = c.kill(b);
        // Wait until every survivor got the broker notice of the new election.
        let survivors = c.live();
        let mut seen: BTreeMap<u32, (u64, u32, u64)> = BTreeMap::new();
        while seen.len() < survivors.len() {
            assert!(c.wd.remaining() > Duration::from_secs(8), "cycle {cycle}: failover not complete: {seen:?}");
            for &s in &survivors {
                if seen.contains_key(&s) {
                    continue;
                }
                let l = c.proc(s).cmd("brokers");
                let last = FoReport::parse(&l).brokers.last().copied();
                if let Some(n) = last.filter(|n| n.0 > last_epoch) {
                    seen.insert(s, n);
                }
            }
        }
        let epochs: Vec<u64> = seen.values().map(|n| n.0).collect();
        let new_broker = seen.values().next().unwrap().1;
        assert!(seen.values().all(|n| n.1 == new_broker && n.0 == epochs[0]), "cycle {cycle}: disagreement {seen:?}");
        assert!(new_broker != b, "cycle {cycle}: the dead worker cannot be the new broker");
        last_epoch = epochs[0];
        let elected = seen[&new_broker].2;
        let all = seen.values().map(|n| n.2).max().unwrap();
        elect_ms.push(elected.saturating_sub(kill_ns) as f64 / 1e6);
        ready_ms.push(all.saturating_sub(kill_ns) as f64 / 1e6);
        // is_ready()/is_broker() agree.
        for &s in &survivors {
            let (broker, ready) = c.status(s);
            assert_eq!(broker, s == new_broker, "cycle {cycle}: w{s} is_broker");
            assert!(ready, "cycle {cycle}: w{s} not ready after the failover");
        }
        // Replace the dead worker (same Wid) and keep its slot publishing if it did.
        c.spawn(b);
        c.start_stream(b);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    c.finish_and_check();
    // The election target (ARCHITECTURE.md, performance targets): a new broker serves in
    // under 100 ms; asserted on the median of the kills (one slow election on a loaded
    // machine is not a failure), and every election within a liveness bound.
    let median = percentile(&elect_ms, 0.5);
    assert!(median < 100.0, "median election time {median:.1} ms over {CYCLES} kills, target < 100 ms: {elect_ms:?}");
    let worst = percentile(&elect_ms, 1.0);
    assert!(worst < 5000.0, "an election took {worst:.1} ms (liveness bound 5 s): {elect_ms:?}");
    if socket {
        eprintln!("socket transport: {} events died with killed brokers, every one reported", c.socket_losses);
    }
    eprintln!(
        "{} broker failover over {CYCLES} kills ({killed_publishers} of them a publisher): new broker elected after \
         p50 {:.1} ms, p99 {:.1} ms (max {:.1}); every survivor re-attached after p50 {:.1} ms, p99 {:.1} ms (max {:.1})",
        if socket { "socket-transport" } else { "shared-memory" },
        percentile(&elect_ms, 0.5),
        percentile(&elect_ms, 0.99),
        percentile(&elect_ms, 1.0),
        percentile(&ready_ms, 0.5),
        percentile(&ready_ms, 0.99),
        percentile(&ready_ms, 1.0),
    );
}

// ==========================================================================================
// 2. Random worker kills and restarts, 50 cycles.

/// A small deterministic generator (the seed is printed, so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn random_worker_kills_and_restarts_50_cycles() {
    let _serial = serial();
    const CYCLES: usize = 50;
    let seed = std::env::var("WE_FO_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| mono_ns() | 1);
    eprintln!("random kills: seed {seed} (WE_FO_SEED={seed} replays the choices)");
    let mut rng = Rng(seed);
    let mut c = Cluster::new(
        "fo-random",
        |cfg| {
            cfg.max_queue_len = Some(1_000_000);
        },
        5,
        &[1, 2, 3],
        5.0,
    );
    c.spawn_all();
    for _ in 0..CYCLES {
        // One victim, sometimes two at once; let the traffic flow a little in between.
        let mut victims = vec![rng.below(5) as u32];
        if rng.below(3) == 0 {
            let v = rng.below(5) as u32;
            if v != victims[0] {
                victims.push(v);
            }
        }
        for &v in &victims {
            c.kill(v);
            std::thread::sleep(Duration::from_millis(rng.below(20)));
        }
        for &v in &victims {
            c.spawn(v);
            c.start_stream(v);
        }
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        assert!(c.wd.remaining() > Duration::from_secs(15), "too slow: 50 cycles did not fit the test's time budget");
    }
    c.finish_and_check();
}

// ==========================================================================================
// 3. A publisher killed in the middle of multi-fragment messages.

#[test]
fn publisher_killed_mid_message_leaves_no_partial_record() {
    let _serial = serial();
    const LEN: usize = 100 * 1024; // ~13 fragments of at most 8 KiB in a 16 KiB ring
    let mut c = Cluster::new(
        "fo-partial",
        |cfg| {
            cfg.ring_capacity = Some(16 * 1024);
            cfg.max_payload_len = Some(1024 * 1024);
        },
        3,
        &[1],
        1.0,
    );
    // Each cut message may cost its receivers one lost notice when the next incarnation
    // starts a new message: never a partial or corrupt message.
    c.allow_lost.insert(2, 6);
    c.spawn_all();
    let mut rng = Rng(mono_ns() | 1);
    for _ in 0..6 {
        if c.procs[2].is_none() {
            c.spawn(2);
        }
        c.proc(2).cmd(&format!("big {LEN}"));
        let inc = c.procs[2].as_ref().unwrap().inc;
        c.clock += 1;
        c.streams.insert((2, inc), StreamInfo { started: c.clock, total: None, killed: false });
        // Let it stream, then kill it wherever it is.
        std::thread::sleep(Duration::from_millis(30 + rng.below(50)));
        c.kill(2);
    }
    // A last incarnation streams to completion: receivers keep working after the kills.
    c.spawn(2);
    c.proc(2).cmd(&format!("big {LEN}"));
    let inc = c.procs[2].as_ref().unwrap().inc;
    c.clock += 1;
    let started = c.clock;
    std::thread::sleep(Duration::from_millis(100));
    let l = c.proc(2).cmd("bigstop");
    let total: u64 = l[0].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(l[0].split_whitespace().nth(2), Some("0"), "big-payload publish errors: {l:?}");
    c.streams.insert((2, inc), StreamInfo { started, total: Some(total), killed: false });
    let reports = c.finish_and_check();
    for (s, r) in &reports {
        if *s == 2 {
            continue;
        }
        let big: Vec<_> = r.streams.iter().filter(|((p, _), _)| *p == 2).collect();
        let whole: u64 = big.iter().map(|(_, st)| st.count).sum();
        assert!(big.len() >= 2, "w{s}: big messages from {} incarnations only", big.len());
        eprintln!(
            "w{s}: {whole} whole 100 KiB messages from {} incarnations of w2, none partial or corrupt; \
             lost notices {:?}",
            big.len(),
            r.lost
        );
    }
}

// ==========================================================================================
// 4. Unique events across broker kills: never delivered twice.

fn unique_deliveries(dir: &Path) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if !e.file_name().to_string_lossy().starts_with("uniq-") {
            continue;
        }
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            *m.entry(line.parse::<u64>().unwrap()).or_insert(0) += 1;
        }
    }
    m
}

#[test]
fn unique_events_across_broker_kills_never_twice() {
    let _serial = serial();
    const N: u64 = 2000;
    const KILLS: usize = 5;
    let mut c = Cluster::new(
        "fo-unique",
        |cfg| {
            cfg.unique_timeout_ms = Some(120_000);
        },
        4,
        &[],
        0.0,
    );
    c.spawn_all();
    // Every worker publishes the same hashes h0..h{N-1}; so does every successor, from 0
    // again: everything after the first copy of a hash is a duplicate, across broker kills.
    for s in c.live() {
        c.proc(s).cmd(&format!("ustream 1.0 {N}"));
    }
    let mut rng = Rng(mono_ns() | 1);
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(100 + rng.below(200)));
        let b = c.broker().expect("a broker");
        c.kill(b);
        c.spawn(b);
        c.proc(b).cmd(&format!("ustream 1.0 {N}"));
    }
    // Wait until every live publisher has published everything and had it acknowledged.
    loop {
        assert!(c.wd.remaining() > Duration::from_secs(8), "unique events still pending");
        let mut done = true;
        for s in c.live() {
            let l = c.proc(s).cmd("ucount");
            let f: Vec<u64> = l[0].split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
            assert_eq!(f[3], 0, "w{s}: unique publish errors: {l:?}");
            done &= f[0] == f[1] && f[2] == 0;
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for s in c.live() {
        let l = c.proc(s).cmd("drain 5000");
        assert_eq!(l, ["@@DRAINED reached"], "w{s}: inbound rings not drained within 5 s");
        let r = FoReport::parse(&c.proc(s).cmd("report"));
        assert_eq!(r.stat("other"), 0, "w{s}: unexpected or undecodable events");
        assert_eq!(r.stat("dropped"), 0, "w{s}: malformed messages");
        assert_eq!(r.stat("wait_errors"), 0, "w{s}: Worker::wait failed (see its stderr)");
    }
    let d = unique_deliveries(&c.dir.path);
    let twice: Vec<_> = d.iter().filter(|&(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "unique events delivered more than once: {twice:?}");
    let missing: Vec<u64> = (0..N).filter(|n| !d.contains_key(n)).collect();
    assert!(d.keys().all(|&n| n < N));
    eprintln!(
        "unique across {KILLS} broker kills: {} hashes delivered exactly once, {} missing {:?}",
        d.len(),
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // A broker killed between recording a hash and writing the event into its target's
    // ring loses that one event (at most once, never twice): at most one per broker kill.
    // Every kill of this test is a broker kill.
    assert_eq!(c.kills, KILLS as u64, "kills made");
    assert!(
        missing.len() as u64 <= c.kills,
        "{} unique events never delivered (at most one per broker kill, {} kills): {missing:?}",
        missing.len(),
        c.kills
    );
}

// ==========================================================================================
// 5. A dead worker's queue fills up, is counted, and never blocks or fails a publisher.

#[test]
fn dead_slot_queue_fills_is_counted_and_successor_is_told() {
    let _serial = serial();
    let mut c = Cluster::new(
        "fo-deadslot",
        |cfg| {
            cfg.ring_capacity = Some(4096);
            cfg.max_queue_len = Some(100);
        },
        3,
        &[],
        0.0,
    );
    c.spawn_all();
    let l = c.proc(1).cmd("burst 10");
    assert!(l[0].ends_with(" 0"), "{l:?}");
    c.proc(2).cmd("until 5000 1:0:9");
    c.kill(2);
    // Far more than the dead slot's ring (about 100 events) and backlog (100) hold. In
    // chunks the live worker 0 drains in between, so that only the dead slot overflows.
    for chunk in 1..=40 {
        let l = c.proc(1).cmd("burst 50");
        assert_eq!(l[0], format!("@@COUNT {} 0", 10 + 50 * chunk), "publish failed or blocked");
        c.proc(0).cmd(&format!("until 5000 1:0:{}", 9 + 50 * chunk));
    }
    let r1 = FoReport::parse(&c.proc(1).cmd("report"));
    let dropped = r1.stat("lost_outbound");
    assert!(dropped > 1000, "only {dropped} events dropped for the dead slot");
    c.spawn(2);
    let l = c.proc(1).cmd("burst 10");
    assert_eq!(l[0], "@@COUNT 2020 0");
    c.proc(2).cmd("until 5000 1:0:2019");
    c.proc(0).cmd("until 5000 1:0:2019");
    let r2 = FoReport::parse(&c.proc(2).cmd("report"));
    let s = &r2.streams[&(1, 0)];
    assert_eq!(r2.lost.get(&1).copied(), Some(dropped), "the successor's lost notice");
    assert_eq!(r2.cont.get(&(1, 0)).copied(), Some(10), "the predecessor's position");
    assert!(s.first == 10 || s.first == 11, "the successor resumes after its predecessor: {s:?}");
    // Exactly one gap, as large as the lost count.
    assert_eq!(s.bad, 1, "{s:?}");
    assert_eq!(s.last, 2019);
    assert_eq!(s.count + dropped, 2020 - s.first, "{s:?}");
    let r0 = FoReport::parse(&c.proc(0).cmd("report"));
    assert_eq!(r0.streams[&(1, 0)].count, 2020, "the live worker got everything");
    assert!(r0.lost.is_empty());
}

// ==========================================================================================
// 7. Graceful close of the broker: its backlogs are flushed, the role is handed over at once.

#[test]
fn graceful_close_flushes_and_hands_the_broker_role_over() {
    const N: u64 = 3000;
    let _serial = serial();
    let mut c = Cluster::new(
        "fo-close",
        |cfg| {
            cfg.ring_capacity = Some(4096);
            cfg.max_queue_len = Some(100_000);
        },
        4,
        &[],
        0.0,
    );
    c.spawn_all();
    assert_eq!(c.broker(), Some(0));
    // A slow receiver (100 us per event) and far more than the 4 KiB rings hold: much of it
    // still waits in worker 0's backlog for worker 1 when it closes.
    c.proc(1).cmd("slow 100");
    let l = c.proc(0).cmd(&format!("burst {N}"));
    assert_eq!(l[0], format!("@@COUNT {N} 0"));
    c.clock += 1;
    c.streams.insert((0, 0), StreamInfo { started: 1, total: Some(N), killed: false });
    let p = c.procs[0].take().unwrap();
    let mut child = p.child;
    let t0 = mono_ns();
    let l = child.cmd("close 5000");
    let f: Vec<&str> = l[0].split_whitespace().collect();
    assert_eq!(f[1], "ok", "close: {l:?}");
    drop(child);
    // Every survivor sees the new broker.
    let survivors = c.live();
    let mut seen = BTreeMap::new();
    while seen.len() < survivors.len() {
        assert!(c.wd.remaining() > Duration::from_secs(8), "no new broker after the close: {seen:?}");
        for &s in &survivors {
            if let Some(b) = FoReport::parse(&c.proc(s).cmd("brokers")).brokers.last() {
                seen.insert(s, *b);
            }
        }
    }
    let new_broker = seen.values().next().unwrap().1;
    assert!(seen.values().all(|b| b.1 == new_broker) && new_broker != 0, "{seen:?}");
    let ms = |s: u32| seen[&s].2.saturating_sub(t0) as f64 / 1e6;
    c.proc(1).cmd("slow 0");
    c.finish_and_check();
    eprintln!(
        "graceful close of the broker with {N} events queued, worker 1 slow (100 us per event): flushed in {} ms; \
         new broker w{new_broker} serving {:.1} ms after the close began, w2 and w3 attached after {:.1} and \
         {:.1} ms, the slow w1 after {:.1} ms (it looks at its control socket between dispatch passes)",
        f[2],
        ms(new_broker),
        ms(2),
        ms(3),
        ms(1),
    );
}

#[test]
fn unique_targets_skip_a_dead_slot() {
    const N: u64 = 60;
    let _serial = serial();
    let mut c = Cluster::new("fo-uniq-dead", |_| {}, 3, &[], 0.0);
    c.spawn_all();
    c.kill(2);
    // Worker 1 publishes while slot 2 is dead: round-robin over the live workers other than
    // the broker (worker 0) would be slot 1 and slot 2 alternately; slot 2 must be skipped.
    c.proc(1).cmd(&format!("ustream 1000 {N}"));
    loop {
        assert!(c.wd.remaining() > Duration::from_secs(8), "unique events still pending");
        let l = c.proc(1).cmd("ucount");
        if l[0] == format!("@@UCOUNT {N} {N} 0 0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    c.spawn(2);
    for s in c.live() {
        let l = c.proc(s).cmd("drain 5000");
        assert_eq!(l, ["@@DRAINED reached"], "w{s}: inbound rings not drained within 5 s");
    }
    let d = unique_deliveries(&c.dir.path);
    assert_eq!(d, (0..N).map(|n| (n, 1)).collect::<BTreeMap<_, _>>(), "each unique event exactly once");
    for inc in 0..2 {
        let log = c.dir.path.join(format!("uniq-2-{inc}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(text.is_empty(), "the dead slot got unique events: {text:?}");
    }
}

// ==========================================================================================
// 8. A restarted worker whose predecessor's connection the broker has not seen close yet.

/// The broker is frozen (SIGSTOP) while worker 1 is killed and restarted, so when it runs
/// again it finds the new HELLO for slot 1 while the dead connection for slot 1 is still in
/// its list. It answers "busy", the new worker retries with backoff, and it attaches once the
/// old connection is gone: a restarted worker never gets a hard refusal for its own slot.
#[test]
fn restarted_worker_attaches_while_the_broker_still_holds_its_old_connection() {
    let _serial = serial();
    let dir = TestDir::new("fo-busy");
    let wd = Watchdog::new("fo-busy");
    let cfg = Cfg::new(&dir.sock(), 3);
    let broker = wd.spawn(&cfg, Wid::Worker(0));
    let w1 = wd.spawn(&cfg, Wid::Worker(1));
    let mut w2 = wd.spawn(&cfg, Wid::Worker(2));
    broker.signal(libc::SIGSTOP);
    w1.kill9();
    let pid = broker.pid();
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on the stopped broker child, still owned (not reaped) by the test.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
    });
    // Ready only once attached: connect and HELLO wait in the frozen broker's socket.
    let mut w1b = wd.spawn(&cfg, Wid::Worker(1));
    resume.join().unwrap();
    let r = w1b.publish("all", "busy", "after", 0, 5);
    assert_eq!((r.ok, r.err), (5, 0));
    w2.until(5);
    assert_eq!(w2.report().stream("w1", "busy", "after"), seq(0, 5));
    drop(broker);
}
