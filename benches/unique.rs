//! Unique events: cross-process publish -> delivery latency, and the broker's cost
//! per event with the dedup table 10 % and 90 % full, each beside an `All` baseline measured
//! in the same run.
//!
//! | criterion id                                       | what                                                   |
//! |----------------------------------------------------|--------------------------------------------------------|
//! | `unique_xproc_busy/all_to_broker_baseline`          | `publish(All)` in worker 1 -> callback in worker 0     |
//! | `unique_xproc_busy/unique_to_broker`                | `publish(Unique)` in worker 1 -> (shared memory) dedup in the publisher, ring 1->0 -> callback in worker 0; (socket) broker dedups, sends back -> callback in worker 1 |
//! | `unique_xproc_parked/...`                           | the same two with both processes parked in `wait(None)` |
//! | `unique_at_broker/baseline_all_publish_dispatch`    | one process (the broker): `publish(All) + dispatch`    |
//! | `unique_at_broker/unique_duplicate_dropped_table_N` | `publish(Unique) + dispatch` of a hash live in the table: dropped |
//! | `unique_at_broker/unique_insert_table_N`            | `publish(Unique) + dispatch` of a fresh hash: recorded, delivered, callback run |
//!
//! **Cross-process latency.** Two processes pinned to two CPUs, `workers(2)`: the child
//! (this bench binary re-executed with `WE_BENCH_ROLE` set, as in `benches/latency.rs`) is
//! worker 0, the broker; the bench process is worker 1, a non-broker publisher. Every event
//! carries the `CLOCK_MONOTONIC` instant taken right before `publish` (one clock for every
//! process of the host); the receiving callback computes `now - then`, which is the one-way
//! publish -> callback latency (encode, socket or ring, broker work, wake-up, decode). Worker
//! 0 reports its figure back with an `All` "ack" event; the publisher waits for each delivery
//! before it publishes the next event, so nothing queues. The broker picks unique targets
//! round-robin among the live slots; each unique event is classified by the process whose
//! callback ran (see `MEASURED`). The kinds are interleaved (one
//! cycle = one `All`, one unique) whatever criterion function runs, so drift on the noisy VM
//! hits baseline and unique alike. A preemption of either busy-polling process (the host is
//! shared; other processes' time slices are milliseconds) costs the event in flight
//! milliseconds, and on a loaded host 0.5-2 % of the events are hit, which dominates any
//! mean. So each criterion sample reports, per event, the **median** one-way latency of its
//! own kind among that sample's events (`iter_custom` returns n x that median), not the
//! mean. The self-timed summary printed at the end gives per-event p50/p90/p99 of every kind
//! over all events measured, the count above 1 ms, and the ratio of the p50s. Fresh hashes
//! (`lat:<seq>`); `unique_timeout` is 100 ms. (Chosen to keep the table about 10 % full
//! when a cycle took several microseconds; at 1-3 µs per cycle it holds a third or more of
//! its capacity after 100 ms, and a run of a few 10^5 events has used every bucket, so the
//! unique figure grows with the length of the run: see BENCHMARKS.md.)
//!
//! **Dedup cost at the broker.** One process, `workers(1)`: the broker handles its own unique
//! events without a hop and delivers them to itself, so `publish(Unique) + dispatch` =
//! encode + SipHash + table probe + (drop | record + local delivery + callback), against
//! `publish(All) + dispatch` = encode + local delivery + callback. "N % full" means N % of
//! `unique_capacity` (65,536) live hashes; the table has twice as many buckets, so 90 % full
//! is 45 % of the buckets in use. Events are timed in batches of 32 whose hashes are
//! formatted before the clock starts; a batch during which this thread was involuntarily
//! switched out (`getrusage(RUSAGE_THREAD).ru_nivcsw` changed) is discarded and run again,
//! so the figures are means over the batches that ran uninterrupted.
//!
//! * Duplicates: the table is filled once (long timeout) and live hashes are republished;
//!   a dropped duplicate adds nothing, so the fill stays put.
//! * Inserts: every timed event has a never-seen hash and is recorded, so the fill would grow.
//!   It is held constant the way a live broker holds it: entries expire and are replaced. The
//!   broker runs with a short `unique_timeout` T (sized so that the target count L of live
//!   hashes turns over at about 1 M inserts/s: 6.6 ms at 10 %, 59 ms at 90 %), and the bench
//!   keeps a log of what it inserted and when (the end of each batch of 32, an upper bound
//!   of the broker's own clock reading). Before each timed batch of 32 inserts, outside the
//!   timed section, it waits until enough logged entries have expired (live <= L - 32), and
//!   if expiries (a preemption, a pause between criterion samples) left the table below
//!   L - 64, tops it up with untimed inserts. So every timed insert runs with the live count
//!   in [L - 96, L], within 1.5 % of L. Because entries are replaced in place, this is the
//!   steady state of a long-running broker: after some 10^6 inserts every bucket has held a
//!   hash once, and a fresh hash's lookup no longer stops early at a never-used bucket (it
//!   reads its whole 32-entry window, which may start anywhere in the 4 MiB table). The untimed
//!   warm-up of each fill level inserts 8 x the bucket count first, so criterion only sees
//!   that steady state. (Into a freshly filled table, where lookups stop early, an insert
//!   measured some 20-50 ns less at both fill levels.)
//!
//! All five broker-local setups stay alive together; after criterion, a self-timed summary
//! alternates them (rounds of chunks of 4096 events) and prints median ns per event and the
//! median of the per-round ratios to the baseline.
//!
//! `cargo bench --bench unique -- xproc` (or `-- at_broker`) runs one part: criterion's filter,
//! also applied to the setup of each part. A part's summary covers all its variants.

// The bare-ring and ping-pong baselines are process-private atomics over a plain mmap, not the
// crate's shared-memory code: the clippy.toml ban on std atomics (for src/) does not apply.
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use support::scenario::Scenario;
use support::summary::{alternate, per_op_ns};
use support::{ROLE_ENV, SOCK_ENV, child_command, child_prologue, criterion_test_mode, pin_pair, reap, wanted};
use worker_events::{Events, Options, Target, Wid, Worker};
use worker_events_dev_support::{Sample, TempDir, loadavg, monotonic_ns as now_ns};

/// Default `unique_capacity`, used by every broker here.
const CAPACITY: usize = 65_536;
/// Buckets of that table (`2 * capacity`, rounded up to a power of two).
const BUCKETS: usize = 131_072;
/// Payload of the measured events: `seq`, publish instant (ns), padding.
const PAYLOAD: usize = 64;

fn main() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        child_main(&role);
        std::process::exit(0);
    }
    let child_cpu = pin_pair();
    let load_before = loadavg();
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    let mut summaries = Vec::new();
    for busy in [true, false] {
        let group = if busy { "unique_xproc_busy" } else { "unique_xproc_parked" };
        if !KINDS.iter().any(|k| wanted(&format!("{group}/{}", k.id()))) {
            continue;
        }
        let mut x = XProc::new(busy, child_cpu);
        let mut g = c.benchmark_group(group);
        for kind in MEASURED {
            g.bench_function(kind.id(), |b| b.iter_custom(|n| x.run(kind, n)));
        }
        g.finish();
        summaries.push((group, x.finish()));
    }

    let local = at_broker(&mut c);
    c.final_summary();
    if criterion_test_mode() {
        return; // criterion's test mode (`cargo test --benches`): each bench ran once.
    }
    if let Some(mut s) = local {
        at_broker_summary(&mut s);
    }
    println!();
    println!("==== unique events, cross-process summary: per-event one-way latency, 64-byte payloads ====");
    println!("load average before: {load_before}  after: {}", loadavg());
    for (group, s) in summaries {
        s.print(group);
    }
}

// ---------------------------------------------------------------------------------------
// Cross-process latency

/// What a measured event was, told by where its callback ran.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `publish(All)` in worker 1, callback in worker 0.
    AllToBroker,
    /// `publish(Unique)` in worker 1, callback in worker 0 (the broker kept it).
    UniqueToBroker,
    /// `publish(Unique)` in worker 1, callback back in worker 1 (relayed by the broker).
    UniqueToPublisher,
}

const KINDS: [Kind; 3] = [Kind::AllToBroker, Kind::UniqueToBroker, Kind::UniqueToPublisher];
/// The kinds criterion measures; a unique kind's samples take every unique event, wherever
/// its callback ran. On shared memory the publisher routes its own unique events and
/// prefers another live worker, so with two workers they go to worker 0, the same hop as
/// the `All` baseline; on the socket transport the broker routes them and sends them back
/// to the publisher. The summary tells the two apart.
const MEASURED: [Kind; 2] = [Kind::AllToBroker, Kind::UniqueToBroker];

impl Kind {
    fn id(self) -> &'static str {
        match self {
            Kind::AllToBroker => "all_to_broker_baseline",
            Kind::UniqueToBroker => "unique_to_broker",
            Kind::UniqueToPublisher => "unique_to_publisher",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

fn xproc_options(sock: &Path) -> Options {
    Options::new(sock).workers(2).unique_capacity(CAPACITY).unique_timeout(Duration::from_millis(100))
}

fn payload(seq: u64, t: u64) -> [u8; PAYLOAD] {
    let mut p = [0x5a; PAYLOAD];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p[8..16].copy_from_slice(&t.to_le_bytes());
    p
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// One-way latency of a measured event: `(seq, ns)`, seq 0 = none yet.
#[derive(Default)]
struct Slot {
    seq: AtomicU64,
    ns: AtomicU64,
}

impl Slot {
    fn set(&self, seq: u64, ns: u64) {
        self.ns.store(ns, Ordering::Relaxed);
        self.seq.store(seq, Ordering::Release);
    }
}

/// The bench process as worker 1, with the broker (worker 0) in a child process.
struct XProc {
    worker: Worker,
    child: Child,
    busy: bool,
    /// Reported by worker 0 through its "ack" events.
    at_broker: Arc<Slot>,
    /// Unique events the broker relayed back to us.
    at_self: Arc<Slot>,
    seq: u64,
    hash: String,
    /// Every measured one-way latency, per kind (ns).
    lat: [Vec<u64>; 3],
    /// Events published while measuring: `[All, Unique]`.
    publishes: [u64; 2],
    /// Last: removed after the worker is dropped.
    _dir: TempDir,
}

impl XProc {
    fn new(busy: bool, cpu: Option<usize>) -> Self {
        let dir = TempDir::new(if busy { "xbusy" } else { "xparked" });
        let sock = dir.join("events.sock");
        let role = if busy { "broker-busy" } else { "broker-parked" };
        let mut child =
            child_command(role, cpu, &[], Some(&sock)).stdout(Stdio::piped()).spawn().expect("spawning the broker");
        // The child prints "ready" once it is the broker, so that this process, which is not
        // the preferred broker, attaches instead of running for election.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line).expect("reading the child");
        assert_eq!(line.trim(), "ready", "the broker process did not start");

        let events = Events::new(xproc_options(&sock)).expect("options");
        let mut worker = events.init_worker(Wid::Worker(1)).expect("init_worker(1)");
        assert!(worker.wait_ready(Duration::from_secs(10)).expect("wait_ready"), "not attached in 10 s");
        assert!(!worker.is_broker(), "the publisher must not be the broker");
        worker.set_busy_poll(busy);
        let at_broker = Arc::new(Slot::default());
        let a = at_broker.clone();
        worker.subscribe("bench", "ack", move |ev| {
            let d = ev.data_bytes();
            a.set(u64_at(d, 0), u64_at(d, 1));
        });
        let at_self = Arc::new(Slot::default());
        let s = at_self.clone();
        // Only the unique events are subscribed here: our own "all" copies find no callback.
        worker.subscribe("bench", "unique", move |ev| {
            let now = now_ns();
            let d = ev.data_bytes();
            s.set(u64_at(d, 0), now.saturating_sub(u64_at(d, 1)));
        });
        let mut x = XProc {
            worker,
            child,
            busy,
            at_broker,
            at_self,
            seq: 0,
            hash: String::new(),
            lat: Default::default(),
            publishes: [0; 2],
            _dir: dir,
        };
        for _ in 0..200 {
            x.cycle();
        }
        x.lat = Default::default();
        x.publishes = [0; 2];
        x
    }

    /// Publish one event and wait until its callback ran somewhere; its kind and latency.
    fn one(&mut self, unique: bool) -> (Kind, u64) {
        self.seq += 1;
        let seq = self.seq;
        if unique {
            self.hash.clear();
            write!(self.hash, "lat:{seq}").expect("formatting");
        }
        let t = now_ns();
        let p = payload(seq, t);
        let r = if unique {
            self.worker.publish_bytes(Target::Unique(&self.hash), "bench", "unique", &p)
        } else {
            self.worker.publish_bytes(Target::All, "bench", "all", &p)
        };
        r.expect("publish");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.busy {
                self.worker.dispatch().expect("dispatch");
            } else {
                self.worker.wait(Some(Duration::from_secs(1))).expect("wait");
            }
            if self.at_broker.seq.load(Ordering::Acquire) == seq {
                let ns = self.at_broker.ns.load(Ordering::Relaxed);
                return (if unique { Kind::UniqueToBroker } else { Kind::AllToBroker }, ns);
            }
            if self.at_self.seq.load(Ordering::Acquire) == seq {
                assert!(unique, "an all event came back as unique");
                return (Kind::UniqueToPublisher, self.at_self.ns.load(Ordering::Relaxed));
            }
            assert!(Instant::now() < deadline, "event {seq} was not delivered in 20 s");
        }
    }

    /// One `All` and one unique event; every latency is recorded for the summary.
    fn cycle(&mut self) -> [(Kind, u64); 2] {
        let r = [self.one(false), self.one(true)];
        for (k, ns) in r {
            self.lat[k.index()].push(ns);
        }
        self.publishes[0] += 1;
        self.publishes[1] += 1;
        r
    }

    /// `n` x the median one-way latency of `n` events of `kind` (interleaved with the other
    /// kinds): criterion's figure per event is the median event of each sample (see the
    /// crate docs).
    fn run(&mut self, kind: Kind, n: u64) -> Duration {
        let mut v = Vec::with_capacity(n as usize);
        let mut cycles = 0u64;
        while (v.len() as u64) < n {
            cycles += 1;
            assert!(cycles <= 4 * n + 1000, "no {kind:?} event in {cycles} cycles: the target choice changed");
            for (k, ns) in self.cycle() {
                let same = (k == Kind::AllToBroker) == (kind == Kind::AllToBroker);
                if same && (v.len() as u64) < n {
                    v.push(ns);
                }
            }
        }
        Duration::from_nanos(Sample::new(v).median().expect("n > 0 events") * n)
    }

    fn finish(mut self) -> XSummary {
        let s = XSummary {
            lat: std::mem::take(&mut self.lat),
            publishes: self.publishes,
            pending: self.worker.stats().unique_pending,
        };
        drop(self);
        s
    }
}

impl Drop for XProc {
    fn drop(&mut self) {
        let _ = self.worker.publish_bytes(Target::All, "bench", "stop", b"");
        let _ = self.worker.dispatch();
        reap(&mut self.child);
    }
}

struct XSummary {
    lat: [Vec<u64>; 3],
    publishes: [u64; 2],
    pending: u64,
}

impl XSummary {
    fn print(self, group: &str) {
        let lat = self.lat.map(Sample::new);
        let us = |s: &Sample<u64>, p: f64| s.percentile(p).map_or(f64::NAN, |ns| ns as f64 / 1e3);
        let base = us(&lat[0], 0.5);
        println!("{group}: {} All + {} unique events published (interleaved)", self.publishes[0], self.publishes[1]);
        println!(
            "  {:<34} {:>9} {:>9} {:>9} {:>9} {:>7}  p50 ratio",
            "one-way publish -> callback", "n", "p50", "p90", "p99", ">1ms"
        );
        for k in KINDS {
            let v = &lat[k.index()];
            if v.is_empty() && k != Kind::AllToBroker {
                // No event took this route (on shared memory unique events never come back
                // to their publisher): nothing to show.
                continue;
            }
            let p50 = us(v, 0.5);
            println!(
                "  {:<34} {:>9} {:>7.2}us {:>7.2}us {:>7.2}us {:>7}  {}",
                k.id(),
                v.len(),
                p50,
                us(v, 0.9),
                us(v, 0.99),
                v.count_above(1_000_000),
                if k == Kind::AllToBroker { "baseline".to_string() } else { format!("{:.1}x", p50 / base) }
            );
        }
        println!("  unique events not yet acknowledged by the broker at the end: {}", self.pending);
    }
}

/// The child: worker 0, the broker. Reports the latency of every event whose callback runs
/// here with an `All` "ack" (after `dispatch` returns: callbacks cannot reach the worker).
fn child_broker(busy: bool) {
    let sock = PathBuf::from(std::env::var_os(SOCK_ENV).expect("WE_BENCH_SOCK"));
    let events = Events::new(xproc_options(&sock)).expect("options");
    let mut w = events.init_worker(Wid::Worker(0)).expect("init_worker(0)");
    assert!(w.is_broker(), "worker 0 did not become the broker");
    w.set_busy_poll(busy);
    let got = Arc::new(Slot::default());
    for name in ["all", "unique"] {
        let g = got.clone();
        w.subscribe("bench", name, move |ev| {
            let now = now_ns();
            let d = ev.data_bytes();
            g.set(u64_at(d, 0), now.saturating_sub(u64_at(d, 1)));
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    w.subscribe("bench", "stop", move |_| s.store(true, Ordering::Relaxed));
    let mut out = std::io::stdout();
    writeln!(out, "ready").and_then(|()| out.flush()).expect("writing to the bench process");
    let mut acked = 0;
    while !stop.load(Ordering::Relaxed) {
        if busy {
            w.dispatch().expect("dispatch");
        } else {
            w.wait(None).expect("wait");
        }
        let seq = got.seq.load(Ordering::Acquire);
        if seq != acked {
            let mut ack = [0u8; 16];
            ack[..8].copy_from_slice(&seq.to_le_bytes());
            ack[8..].copy_from_slice(&got.ns.load(Ordering::Relaxed).to_le_bytes());
            w.publish_bytes(Target::All, "bench", "ack", &ack).expect("publish ack");
            acked = seq;
        }
    }
    let st = w.stats();
    if st.unique_unrecorded != 0 || st.unique_duplicates != 0 || st.lost != 0 {
        eprintln!(
            "broker: unique_unrecorded={} unique_duplicates={} lost={}",
            st.unique_unrecorded, st.unique_duplicates, st.lost
        );
    }
}

// ---------------------------------------------------------------------------------------
// Dedup cost at the broker (one process)

/// A single-worker deployment: worker 0, the broker, subscribed to everything it publishes.
struct Broker {
    w: Worker,
    /// Batches not counted because this thread was switched out while they ran.
    discarded: u64,
    _dir: TempDir,
}

impl Broker {
    fn new(tag: &str, ttl: Duration) -> Broker {
        let dir = TempDir::new(tag);
        let events = Events::new(
            Options::new(dir.join("ev.sock"))
                .workers(1)
                .unique_capacity(CAPACITY)
                .unique_timeout(ttl)
                .max_queue_len(1 << 20),
        )
        .expect("options");
        let mut w = events.init_worker(Wid::Worker(0)).expect("init_worker");
        assert!(w.wait_ready(Duration::from_secs(5)).expect("ready"));
        w.subscribe("bench", "*", |_| {});
        Broker { w, discarded: 0, _dir: dir }
    }

    /// Time `n` x (`publish(All)` + `dispatch`), in batches of [`BATCH`] like the others.
    fn run_all(&mut self, n: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = n;
        while left > 0 {
            let k = left.min(BATCH as u64);
            let w = &mut self.w;
            match time_batch(|| {
                for _ in 0..k {
                    w.publish_bytes(Target::All, "bench", "all", b"0123456789abcdef").unwrap();
                    w.dispatch().unwrap();
                }
            }) {
                Some(d) => (total, left) = (total + d, left - k),
                None => self.discarded += 1,
            }
        }
        total
    }
}

/// A broker whose table holds `pct` % of its capacity in live hashes (long timeout);
/// live hashes are republished and dropped as duplicates.
struct Dup {
    b: Broker,
    live: usize,
    i: usize,
    hashes: Vec<String>,
}

impl Dup {
    fn new(pct: usize) -> Dup {
        let mut b = Broker::new(&format!("dup{pct}"), Duration::from_secs(3600));
        let live = CAPACITY * pct / 100;
        for i in 0..live {
            b.w.publish_bytes(Target::Unique(&format!("fill:{i}")), "bench", "fill", b"").expect("fill");
            if i % 1024 == 0 {
                b.w.dispatch().expect("dispatch");
            }
        }
        b.w.dispatch().expect("dispatch");
        Dup { b, live, i: 0, hashes: vec![String::new(); BATCH] }
    }

    /// Time `n` x (`publish(Unique(live hash))` + `dispatch`), in batches of [`BATCH`] whose
    /// hashes are formatted before the clock starts (as for the inserts; a table of
    /// precomputed strings would add the bench's own cache misses at 90 %). This does not
    /// grow the table, so the fill level stays put.
    fn run(&mut self, n: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = n;
        while left > 0 {
            let k = left.min(BATCH as u64) as usize;
            for h in &mut self.hashes[..k] {
                h.clear();
                write!(h, "fill:{}", self.i % self.live).expect("formatting");
                self.i = self.i.wrapping_add(7919);
            }
            let (w, hashes) = (&mut self.b.w, &self.hashes[..k]);
            match time_batch(|| {
                for h in hashes {
                    w.publish_bytes(Target::Unique(h), "bench", "u", b"0123456789abcdef").unwrap();
                    w.dispatch().unwrap();
                }
            }) {
                Some(d) => (total, left) = (total + d, left - k as u64),
                None => self.b.discarded += 1,
            }
        }
        total
    }
}

fn insert(w: &mut Worker, hashes: &[String]) {
    for h in hashes {
        w.publish_bytes(Target::Unique(h), "bench", "ins", b"0123456789abcdef").expect("publish");
        w.dispatch().expect("dispatch");
    }
}

/// Involuntary context switches of this thread so far.
fn preemptions() -> libc::c_long {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_nivcsw
}

/// Time one batch; `None` if this thread was switched out (preempted) while it ran, so that
/// other processes' time slices on the shared CPU do not enter the figures.
fn time_batch(f: impl FnOnce()) -> Option<Duration> {
    let before = preemptions();
    let t = Instant::now();
    f();
    let d = t.elapsed();
    (preemptions() == before).then_some(d)
}

/// Inserts per timed batch, and the granularity of the expiry log.
const BATCH: usize = 32;
/// Fresh hashes per second at which the target fill turns over (sets `unique_timeout`).
const TURNOVER_PER_S: u64 = 1_000_000;

/// A broker whose dedup table is held at `target` live hashes while fresh hashes are
/// inserted (see the crate docs: expiry and replacement, untimed top-ups).
struct Inserter {
    b: Broker,
    ttl: Duration,
    target: usize,
    /// Batches inserted: (instant after the batch, count), oldest first.
    log: VecDeque<(Instant, usize)>,
    /// Sum of the counts in `log`: an upper bound of the live hashes, exact to within one
    /// batch (the broker read its clock before the instant logged).
    live: usize,
    next: u64,
    hashes: Vec<String>,
    timed: u64,
    untimed: u64,
}

impl Inserter {
    fn new(pct: usize) -> Self {
        let target = CAPACITY * pct / 100;
        let ttl = Duration::from_nanos(target as u64 * 1_000_000_000 / TURNOVER_PER_S);
        let mut s = Inserter {
            b: Broker::new(&format!("ins{pct}"), ttl),
            ttl,
            target,
            log: VecDeque::new(),
            live: 0,
            next: 0,
            hashes: vec![String::new(); BATCH],
            timed: 0,
            untimed: 0,
        };
        // Steady state: every bucket has held a hash (see the crate docs).
        s.run(8 * BUCKETS as u64);
        (s.timed, s.untimed) = (0, 0);
        s
    }

    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(t, n)) = self.log.front() {
            if t + self.ttl >= now {
                break;
            }
            self.log.pop_front();
            self.live -= n;
        }
    }

    fn prepare(&mut self, k: usize) {
        for h in &mut self.hashes[..k] {
            h.clear();
            write!(h, "ins:{}", self.next).expect("formatting");
            self.next += 1;
        }
    }

    fn insert_prepared(&mut self, k: usize) {
        insert(&mut self.b.w, &self.hashes[..k]);
    }

    fn logged(&mut self, k: usize) {
        self.log.push_back((Instant::now(), k));
        self.live += k;
    }

    /// Time `iters` fresh-hash inserts, each with the fill held at `target`.
    fn run(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let k = left.min(BATCH as u64) as usize;
            // Untimed: wait for room, top up after a pause, prepare the hashes.
            loop {
                self.expire();
                if self.live + BATCH <= self.target {
                    break;
                }
                std::hint::spin_loop();
            }
            while self.live + 2 * BATCH < self.target {
                let n = (self.target - BATCH - self.live).min(BATCH);
                self.prepare(n);
                self.insert_prepared(n);
                self.logged(n);
                self.untimed += n as u64;
                self.expire();
            }
            self.prepare(k);
            let (w, hashes) = (&mut self.b.w, &self.hashes[..k]);
            let timed = time_batch(|| insert(w, hashes));
            self.logged(k);
            match timed {
                Some(d) => {
                    (total, left) = (total + d, left - k as u64);
                    self.timed += k as u64;
                }
                None => {
                    self.b.discarded += 1;
                    self.untimed += k as u64;
                }
            }
        }
        total
    }
}

/// The fill levels, in % of `unique_capacity`.
const PCTS: [usize; 2] = [10, 90];

impl Scenario for Broker {
    fn run(&mut self, n: u64) -> Duration {
        self.run_all(n)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("batches discarded (preempted)", self.discarded)]
    }
}

impl Scenario for Dup {
    fn run(&mut self, n: u64) -> Duration {
        Dup::run(self, n)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let st = self.b.w.stats();
        vec![
            ("batches discarded (preempted)", self.b.discarded),
            ("hashes live", self.live as u64),
            ("unique_unrecorded (0: the window never filled)", st.unique_unrecorded),
        ]
    }
}

impl Scenario for Inserter {
    fn run(&mut self, n: u64) -> Duration {
        Inserter::run(self, n)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let st = self.b.w.stats();
        vec![
            ("batches discarded (preempted)", self.b.discarded),
            ("hashes live", self.target as u64),
            ("unique_timeout us", self.ttl.as_micros() as u64),
            ("timed inserts", self.timed),
            ("untimed top-up inserts", self.untimed),
            ("unique_unrecorded", st.unique_unrecorded),
            ("unique_duplicates", st.unique_duplicates),
        ]
    }
}

/// The broker-local variants, the baseline first: (criterion name, setup). All five stay
/// alive together so that the summary can alternate between them.
fn locals() -> Vec<(String, Box<dyn Scenario>)> {
    let mut v: Vec<(String, Box<dyn Scenario>)> =
        vec![("baseline_all_publish_dispatch".into(), Box::new(Broker::new("all", Duration::from_secs(3600))))];
    for pct in PCTS {
        v.push((format!("unique_duplicate_dropped_table_{pct}pct_full"), Box::new(Dup::new(pct))));
        v.push((format!("unique_insert_table_{pct}pct_full"), Box::new(Inserter::new(pct))));
    }
    v
}

/// Whether the filter selects any broker-local variant (checked before building them).
fn locals_wanted() -> bool {
    let mut ids = vec!["baseline_all_publish_dispatch".to_string()];
    for pct in PCTS {
        ids.push(format!("unique_duplicate_dropped_table_{pct}pct_full"));
        ids.push(format!("unique_insert_table_{pct}pct_full"));
    }
    ids.iter().any(|id| wanted(&format!("{GROUP_LOCAL}/{id}")))
}

const GROUP_LOCAL: &str = "unique_at_broker";
/// Self-timed summary of the broker-local part: rounds, chunks per variant and round, ops
/// per chunk.
const LOCAL_ROUNDS: usize = 11;
const LOCAL_CHUNKS: usize = 15;
const LOCAL_OPS: u64 = 4096;

fn at_broker(c: &mut Criterion) -> Option<Vec<(String, Box<dyn Scenario>)>> {
    if !locals_wanted() {
        return None;
    }
    let mut s = locals();
    let mut g = c.benchmark_group(GROUP_LOCAL);
    g.sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for (id, v) in &mut s {
        g.bench_function(id.as_str(), |b| b.iter_custom(|n| v.run(n)));
    }
    g.finish();
    Some(s)
}

/// Alternate the five variants, LOCAL_CHUNKS chunks each per round; per variant: median ns
/// per event over all chunks, and the median over the rounds of (round median / baseline
/// round median).
fn at_broker_summary(s: &mut [(String, Box<dyn Scenario>)]) {
    let cmp = alternate(LOCAL_ROUNDS, s.len(), false, |i| {
        (0..LOCAL_CHUNKS).map(|_| per_op_ns(s[i].1.run(LOCAL_OPS), LOCAL_OPS)).collect()
    });
    println!();
    println!(
        "{GROUP_LOCAL}: one process, {LOCAL_ROUNDS} alternating rounds x {LOCAL_CHUNKS} chunks of {LOCAL_OPS} events; \
         ratio = median of the per-round ratios"
    );
    println!("  {:<44} {:>10} {:>10}  ratio", "ns per event (publish + dispatch)", "median", "p10");
    for (i, ((id, _), c)) in s.iter().zip(&cmp).enumerate() {
        let ratio = if i == 0 { "baseline".to_string() } else { format!("{:.2}x", c.ratio) };
        println!("  {id:<44} {:>10.1} {:>10.1}  {ratio}", c.all.median, c.all.best);
    }
    println!("  (batches of {BATCH}; a batch during which the thread was preempted is discarded and run again)");
    for (id, v) in s.iter() {
        let c: Vec<String> = v.counters().iter().map(|(n, v)| format!("{n} {v}")).collect();
        println!("  {id}: {}", c.join(", "));
    }
}

// ---------------------------------------------------------------------------------------
// Processes, CPUs, command line

fn child_main(role: &str) {
    child_prologue();
    match role {
        "broker-busy" => child_broker(true),
        "broker-parked" => child_broker(false),
        other => panic!("unknown bench role {other}"),
    }
}
