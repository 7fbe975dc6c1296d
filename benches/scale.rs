//! Scale of `worker-events` in the number of workers, each figure against a reference measured
//! in the same run (the targets are `ARCHITECTURE.md` §P3 (1->3 broadcast) and §P5 (scale)):
//!
//! 1. **publish(All) cost per N**: the publisher's (worker 0's) time for one
//!    `publish(Target::All)` of a 64-byte typed event, for N = 2, 4, 16, 64 workers at default
//!    options (only `workers(N)` set), in bursts of [`BURST`], with the
//!    receivers (a) attached and then stopped with SIGSTOP (the publisher's copies only) and
//!    (b) parked in `wait(None)` and woken to drain, and (c) parked as in (b) with each burst
//!    published in one `Worker::batch` (one commit and one look at the parked flags per
//!    burst). Per-publish cost per burst (median and
//!    p99 over the bursts), the mean per event, and the ratio to N = 4 of the same round. In
//!    modes (b) and (c) also the wake syscalls per receiver per burst, from the crate's `stats()`
//!    (`wakeups_sent` of the publisher, `wakeups_received` of each receiver). A burst fits the
//!    default broadcast ring (128 KiB, whatever N: `Options::broadcast_capacity`). With
//!    `WORKER_EVENTS_BROADCAST=0` (the per-pair rings alone) it fits a 128 KiB pair ring, the
//!    default up to 19 workers; the smaller default rings of larger groups (64 workers: 8 KiB,
//!    `Options::ring_capacity`) hold part of it, and the rest waits in the publisher's
//!    backlog: the table says how many events per receiver did.
//! 2. **region size per N**: the size of the library's memfd (`/proc/self/fd/*` linking to
//!    `/memfd:worker-events`, sized by `stat`) at default options.
//! 3. **1->3 broadcast**: one publisher and three busy-polling receivers; the publisher's
//!    sustained publishes/s while every receiver keeps up (each counts every event, its `lost`
//!    stays 0), beside a bare baseline of the same shape (one producer writing three bare SPSC
//!    rings of 64-byte slots, an index store per message per ring).
//!
//! Every worker is a real process: this bench binary re-executed with `WE_BENCH_ROLE` set
//! (checked first thing in `main`), tied to the parent's life (`die_with_parent`) and reaped.
//! The receivers report their counts in a small shared memfd of the bench's own.
//!
//! CPU placement: the publisher (this process) is pinned to the first allowed CPU and every
//! receiver to the second one (no pinning with a single CPU). On the 2-vCPU development
//! machine the N - 1 receivers therefore share one CPU: stopped receivers cost nothing, parked
//! receivers take turns on it while the publisher runs alone on its own CPU (a wake is an
//! eventfd write by the publisher and a runqueue insert on the receivers' CPU; on a host with
//! a core per worker the wakes would land on idle cores instead). Busy-polling receivers call
//! `sched_yield` after every dispatch pass, so that those sharing the CPU take turns per batch
//! instead of per scheduler time slice; the bare baseline's consumers do the same.
//!
//! `cargo bench --bench scale` runs everything (about 3 minutes); `cargo bench --bench scale
//! -- --quick` is the smoke mode (well under a minute); a word after `--` selects the parts
//! whose name contains it: `publish`, `region`, `broadcast`. For experiments,
//! `WE_BENCH_IDLE=spin|yield|<microseconds>` sets what a busy-polling receiver does after a
//! dispatch pass (default `yield`; a number sleeps that long), and
//! `WE_BENCH_RING_CAPACITY=<bytes>` sets `ring_capacity` for every N (the default depends on N).

// The bench's own shared words and the bare baseline are process-private atomics over a plain
// mmap, not the crate's shared-memory code: the clippy.toml ban on std atomics (for src/) does
// not apply.
#![allow(clippy::disallowed_types)]

mod support;

use std::hint::black_box;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::scenario::Scenario;
use support::shm::Shm;
use support::summary::{Compared, alternate, per_op_ns};
use support::{ROLE_ENV, SOCK_ENV, child_command, child_prologue, criterion_test_mode, pin, reap, wanted};
use worker_events::{Events, Options, Target, Transport, Wid, Worker};
use worker_events_dev_support::process::allowed_cpus;
use worker_events_dev_support::{Sample, TempDir, loadavg};

/// The worker id of a receiver child, or the ring index of a bare consumer.
const INDEX_ENV: &str = "WE_BENCH_INDEX";
/// The number of workers of the child's group.
const WORKERS_ENV: &str = "WE_BENCH_WORKERS";

/// Worker counts of the scale table; the ratios are taken against [`REF_N`].
const NS: [u32; 4] = [2, 4, 16, 64];
const REF_N: u32 = 4;
/// Publishes per burst: they fit a 128 KiB ring (the default up to 19 workers); what does not
/// fit a smaller ring waits in the backlog, counted in [`ModeRun::backlog_max`].
const BURST: u64 = 500;
/// The name the library gives its memfd (`/proc/self/fd/N -> /memfd:worker-events (deleted)`).
const REGION_MEMFD: &str = "/memfd:worker-events";

/// The 64-byte payload (archived: an 8-byte little-endian `seq` and 56 bytes).
#[derive(rkyv::Archive, rkyv::Serialize)]
struct Ping {
    seq: u64,
    pad: [u8; 56],
}

/// How much to measure.
struct Plan {
    quick: bool,
    /// Rounds over all N (each round spawns fresh groups; the order alternates).
    rounds: usize,
    /// Timed bursts per mode, N and round (after [`WARMUP_BURSTS`] untimed ones).
    bursts: usize,
    /// Alternating rounds and chunks per round of the 1->3 broadcast pair.
    bc_rounds: usize,
    bc_chunks: usize,
}

fn main() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        child_main(&role);
        std::process::exit(0);
    }
    if criterion_test_mode() {
        // `cargo test --benches`: nothing to smoke-test cheaply here (64 processes); the quick
        // mode is `cargo bench --bench scale -- --quick`.
        println!("scale: run with `cargo bench --bench scale [-- --quick]`");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = if quick {
        Plan { quick, rounds: 1, bursts: 12, bc_rounds: 2, bc_chunks: 4 }
    } else {
        Plan { quick, rounds: 3, bursts: 100, bc_rounds: 7, bc_chunks: 10 }
    };
    let cpus = allowed_cpus();
    let peer_cpu = if cpus.len() >= 2 {
        pin(cpus[0]);
        eprintln!("pinning: publisher on CPU {}, every receiver on CPU {}", cpus[0], cpus[1]);
        Some(cpus[1])
    } else {
        eprintln!("only one CPU available: not pinning");
        None
    };
    let started = Instant::now();
    let load_before = loadavg();

    let scale = if wanted("publish") || wanted("region") { Some(measure_scale(&plan, peer_cpu)) } else { None };
    let broadcast = if wanted("broadcast") { Some(measure_broadcast(&plan, peer_cpu)) } else { None };

    println!();
    println!(
        "==== worker-events scale summary ({} mode): {} CPUs, publisher on CPU {}, receivers on CPU {}, 64-byte events ====",
        if plan.quick { "quick" } else { "full" },
        cpus.len(),
        cpus.first().map_or("-".into(), |c| c.to_string()),
        peer_cpu.map_or("- (not pinned)".into(), |c| c.to_string()),
    );
    println!("load average before: {load_before}  after: {}  ({:.0} s)", loadavg(), started.elapsed().as_secs_f64());
    if let Some(s) = &scale {
        print_scale(&plan, s);
    }
    if let Some(b) = &broadcast {
        print_broadcast(&plan, b);
    }
}

// ---------------------------------------------------------------------------------------
// The bench's shared memory: control words and one line per receiver

/// Layout of a group's shared words: the control line, then one 128-byte line per worker.
const LINE: usize = 128;
const GROUP_SHM_LEN: usize = LINE * (1 + 64);
/// Control line: the receivers' mode, and the count each receiver is expected to reach.
const CTL_MODE: usize = 0;
const CTL_EXPECT: usize = 8;
/// Receiver modes.
const MODE_BUSY: u64 = 1;
const MODE_PARKED: u64 = 2;
const MODE_EXIT: u64 = 3;
/// Per receiver (line 1 + wid): events counted, then the `stats()` figures written when the
/// count reaches CTL_EXPECT, and the count at which they were written; attached flag.
const R_COUNT: usize = 0;
const R_LOST: usize = 8;
const R_WAKES: usize = 16;
const R_STATS_AT: usize = 24;
const R_READY: usize = 32;

/// Default options but the number of workers (and `WE_BENCH_RING_CAPACITY`, if set).
fn bench_options(sock: &std::path::Path, n: u32) -> Options {
    let o = Options::new(sock).workers(n);
    match std::env::var("WE_BENCH_RING_CAPACITY") {
        Ok(v) => o.ring_capacity(v.parse().expect("WE_BENCH_RING_CAPACITY: a number of bytes")),
        Err(_) => o,
    }
}

fn rline(wid: u32, field: usize) -> usize {
    LINE * (1 + wid as usize) + field
}

// ---------------------------------------------------------------------------------------
// A group: this process is worker 0 (the broker, the publisher), children are 1..N

struct Group {
    n: u32,
    worker: Worker,
    children: Vec<Child>,
    shm: Shm,
    expect: u64,
    seq: u64,
    _dir: TempDir,
}

/// Dispatch until `done()`, at most 60 s (64 processes attaching on 2 CPUs take a while).
fn serve_until(w: &mut Worker, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        w.dispatch().expect("dispatch");
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

impl Group {
    /// Spawn N - 1 receivers in `mode` and wait until every one is attached.
    fn spawn(n: u32, cpu: Option<usize>, mode: u64) -> Group {
        let dir = TempDir::new(&format!("scale-{n}"));
        let sock = dir.join("events.sock");
        let shm = Shm::create(GROUP_SHM_LEN);
        shm.word(CTL_MODE).store(mode, Ordering::Release);
        // Default options but the number of workers.
        let events = Events::new(bench_options(&sock, n)).expect("options");
        let worker = events.init_worker(Wid::Worker(0)).expect("init_worker(0)");
        let children = (1..n)
            .map(|wid| {
                child_command("receiver", cpu, &[shm.raw_fd()], Some(&sock))
                    .env(INDEX_ENV, wid.to_string())
                    .env(WORKERS_ENV, n.to_string())
                    .spawn()
                    .expect("spawning a receiver")
            })
            .collect();
        let mut g = Group { n, worker, children, shm, expect: 0, seq: 0, _dir: dir };
        let (shm, n) = (&g.shm, g.n);
        serve_until(&mut g.worker, "the receivers to attach", || {
            (1..n).all(|wid| shm.word(rline(wid, R_READY)).load(Ordering::Acquire) != 0)
        });
        assert_eq!(g.worker.transport(), Transport::SharedMemory, "default options choose shared memory here");
        // The publisher sees every receiver as a peer before anything is measured.
        let (w, want) = (&mut g.worker, n as usize - 1);
        let deadline = Instant::now() + Duration::from_secs(60);
        while w.stats().peers.len() < want {
            w.dispatch().expect("dispatch");
            assert!(Instant::now() < deadline, "the publisher does not see {want} peers");
        }
        g
    }

    fn pids(&self) -> impl Iterator<Item = i32> + '_ {
        self.children.iter().map(|c| c.id() as i32)
    }

    fn signal_all(&self, sig: libc::c_int) {
        for pid in self.pids() {
            // SAFETY: plain kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Until every receiver is in one of `states` (the letters of `/proc/PID/stat`), for at
    /// most `limit`; returns how many were not.
    fn wait_states(&mut self, states: &[u8], limit: Duration) -> usize {
        let pids: Vec<i32> = self.pids().collect();
        let deadline = Instant::now() + limit;
        let mut missing = 0;
        for pid in pids {
            while !states.contains(&proc_state(pid)) {
                if Instant::now() > deadline {
                    missing += 1;
                    break;
                }
                self.worker.dispatch().expect("dispatch");
                std::thread::yield_now();
            }
        }
        missing
    }

    /// Until every receiver has counted `self.expect` events and written its stats.
    fn wait_drained(&mut self) {
        let (shm, n, expect) = (&self.shm, self.n, self.expect);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(1..n).all(|wid| shm.word(rline(wid, R_STATS_AT)).load(Ordering::Acquire) == expect) {
            self.worker.dispatch().expect("dispatch");
            if Instant::now() > deadline {
                let counts: Vec<u64> = (1..n).map(|w| shm.word(rline(w, R_COUNT)).load(Ordering::Acquire)).collect();
                panic!("N={n}: receivers did not count {expect} events in 60 s: {counts:?}");
            }
            std::thread::yield_now();
        }
    }

    /// One timed burst of `k` publishes (the receivers' expected count raised first), and the
    /// largest backlog of one receiver after it (events that did not fit its ring).
    fn burst(&mut self, k: u64, batched: bool) -> (Duration, u64) {
        self.expect += k;
        self.shm.word(CTL_EXPECT).store(self.expect, Ordering::Release);
        let mut p = Ping { seq: self.seq, pad: [0x5a; 56] };
        let t = Instant::now();
        if batched {
            let mut b = self.worker.batch();
            for _ in 0..k {
                p.seq += 1;
                b.publish(Target::All, "bench", "data", &p).expect("publish");
            }
            b.end();
        } else {
            for _ in 0..k {
                p.seq += 1;
                self.worker.publish(Target::All, "bench", "data", &p).expect("publish");
            }
        }
        let d = t.elapsed();
        self.seq = p.seq;
        let backlog = self.worker.stats().peers.iter().map(|p| p.backlog).max().unwrap_or(0);
        (d, backlog)
    }

    fn receiver_sum(&self, field: usize) -> u64 {
        (1..self.n).map(|wid| self.shm.word(rline(wid, field)).load(Ordering::Acquire)).sum()
    }

    /// The size of the library's memfd among this process's descriptors.
    fn region_size(&self) -> Option<u64> {
        let mut sizes = Vec::new();
        for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else { continue };
            if link.to_string_lossy().starts_with(REGION_MEMFD) {
                sizes.push(std::fs::metadata(e.path()).ok()?.len());
            }
        }
        assert!(sizes.len() <= 1, "one group at a time, one region: {sizes:?}");
        sizes.pop()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.shm.word(CTL_MODE).store(MODE_EXIT, Ordering::Release);
        self.signal_all(libc::SIGCONT);
        // Wake the parked ones.
        let _ = self.worker.publish_bytes(Target::All, "bench", "wake", b"");
        let _ = self.worker.dispatch();
        for c in &mut self.children {
            reap(c);
        }
    }
}

/// The state letter of `/proc/PID/stat` (R, S, T, ...), or b'?'.
fn proc_state(pid: i32) -> u8 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return b'?' };
    // "pid (comm) S ...": the comm may hold spaces and parentheses; the state follows the last ')'.
    s.rfind(')').and_then(|i| s.as_bytes().get(i + 2).copied()).unwrap_or(b'?')
}

/// After a busy-polling pass: `WE_BENCH_IDLE` (see the module docs).
fn idle() {
    match std::env::var("WE_BENCH_IDLE").as_deref() {
        Ok("spin") => std::hint::spin_loop(),
        Ok(us) if us.parse::<u64>().is_ok() => std::thread::sleep(Duration::from_micros(us.parse().unwrap())),
        _ => std::thread::yield_now(),
    }
}

/// A receiver: worker `INDEX_ENV` of `WORKERS_ENV`; counts ("bench", "data") events with
/// validated access, busy-polls or parks as the control line says.
fn child_receiver(shm: &Shm) {
    let sock = PathBuf::from(std::env::var_os(SOCK_ENV).expect("WE_BENCH_SOCK"));
    let wid: u32 = std::env::var(INDEX_ENV).expect("index").parse().expect("index");
    let n: u32 = std::env::var(WORKERS_ENV).expect("workers").parse().expect("workers");
    let events = Events::new(bench_options(&sock, n)).expect("options");
    let mut w = events.init_worker(Wid::Worker(wid)).expect("init_worker");
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    w.subscribe("bench", "data", move |ev| {
        let p = ev.data::<Ping>().expect("valid data");
        black_box(p.pad[0]);
        c.fetch_add(1, Ordering::Relaxed);
    });
    assert!(w.wait_ready(Duration::from_secs(60)).expect("wait_ready"), "not attached in 60 s");
    let line = |f| shm.word(rline(wid, f));
    line(R_READY).store(1, Ordering::Release);
    let mut busy = None;
    let mut last = 0;
    loop {
        match shm.word(CTL_MODE).load(Ordering::Acquire) {
            MODE_BUSY => {
                if busy != Some(true) {
                    w.set_busy_poll(true);
                    busy = Some(true);
                }
                w.dispatch().expect("dispatch");
                // Receivers share a CPU: take turns per pass, not per time slice.
                idle();
            }
            MODE_PARKED => {
                if busy != Some(false) {
                    w.set_busy_poll(false);
                    busy = Some(false);
                }
                w.wait(None).expect("wait");
            }
            _ => return,
        }
        let got = count.load(Ordering::Relaxed);
        if got != last {
            last = got;
            line(R_COUNT).store(got, Ordering::Release);
            if got == shm.word(CTL_EXPECT).load(Ordering::Acquire) {
                let st = w.stats();
                line(R_LOST).store(st.lost, Ordering::Relaxed);
                line(R_WAKES).store(st.wakeups_received, Ordering::Relaxed);
                line(R_STATS_AT).store(got, Ordering::Release);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1 + 2: publish(All) cost per N in both receiver modes, and the region size per N

/// Per-publish costs (ns) of the bursts of one mode, N and round.
#[derive(Default, Clone)]
struct ModeRun {
    /// ns per publish, one figure per burst.
    per_burst: Vec<f64>,
    /// Total time and events (for the mean per event).
    total_ns: f64,
    events: u64,
    /// Publisher's eventfd writes, receivers' wake-ups, events lost, over the timed bursts.
    wakes_sent: u64,
    /// The eventfd writes those took (`stats().wake_writes`: one fan-out write wakes several).
    wake_writes: u64,
    wakes_received: u64,
    lost: u64,
    /// Largest wake-ups of one receiver over the timed bursts.
    wakes_received_max: u64,
    /// Largest backlog of one receiver right after a timed burst: the events that did not
    /// fit its ring (0 while a burst fits).
    backlog_max: u64,
    /// Parked mode: (receiver, burst) pairs where the receiver, drained, was still runnable
    /// 200 ms later instead of asleep in `epoll_wait` (observed: `wait(None)` spinning on
    /// an eventfd left readable, `epoll_wait` returning at once, until the next wake-up).
    not_asleep: u64,
}

struct ScaleResult {
    /// [mode][n index] -> one ModeRun per round.
    runs: [Vec<Vec<ModeRun>>; 3],
    region: Vec<Option<u64>>,
    setup_s: Vec<f64>,
}

fn measure_scale(plan: &Plan, cpu: Option<usize>) -> ScaleResult {
    let mut res = ScaleResult {
        runs: [vec![Vec::new(); NS.len()], vec![Vec::new(); NS.len()], vec![Vec::new(); NS.len()]],
        region: vec![None; NS.len()],
        setup_s: vec![0.0; NS.len()],
    };
    for round in 0..plan.rounds {
        // Alternate the order of N between rounds, against drift.
        let order: Vec<usize> = if round % 2 == 0 { (0..NS.len()).collect() } else { (0..NS.len()).rev().collect() };
        for i in order {
            let n = NS[i];
            let t = Instant::now();
            let mut g = Group::spawn(n, cpu, MODE_BUSY);
            res.setup_s[i] = res.setup_s[i].max(t.elapsed().as_secs_f64());
            let size = g.region_size();
            assert!(res.region[i].is_none() || res.region[i] == size, "the region size of N={n} changed");
            res.region[i] = size;
            if !wanted("publish") {
                continue;
            }
            res.runs[0][i].push(run_mode(&mut g, plan.bursts, false, false));
            g.shm.word(CTL_MODE).store(MODE_PARKED, Ordering::Release);
            res.runs[1][i].push(run_mode(&mut g, plan.bursts, true, false));
            res.runs[2][i].push(run_mode(&mut g, plan.bursts, true, true));
            eprintln!(
                "round {round} N={n}: stopped {:.0} ns, parked {:.0} ns, parked and batched {:.0} ns per publish \
                 (median)",
                median(&res.runs[0][i].last().unwrap().per_burst),
                median(&res.runs[1][i].last().unwrap().per_burst),
                median(&res.runs[2][i].last().unwrap().per_burst)
            );
        }
    }
    res
}

/// Untimed bursts before the timed ones: enough to write every ring around once, so that the
/// first touch of the region's pages (shmem page faults) is not measured.
const WARMUP_BURSTS: usize = 4;

/// [`WARMUP_BURSTS`] and `bursts` timed ones, receivers stopped (SIGSTOP) or parked; each
/// burst in one `Worker::batch` when `batched`.
fn run_mode(g: &mut Group, bursts: usize, parked: bool, batched: bool) -> ModeRun {
    let mut r = ModeRun::default();
    let mut wakes_before: Vec<u64> = Vec::new();
    let (mut sent0, mut writes0, mut lost0) = (0, 0, 0);
    for b in 0..WARMUP_BURSTS + bursts {
        if b == WARMUP_BURSTS {
            // The warm-up is done: the counters start here.
            sent0 = g.worker.stats().wakeups_sent;
            writes0 = g.worker.stats().wake_writes;
            lost0 = g.receiver_sum(R_LOST);
            wakes_before = (1..g.n).map(|w| g.shm.word(rline(w, R_WAKES)).load(Ordering::Acquire)).collect();
        }
        let (d, backlog) = if parked {
            // Every receiver asleep (in epoll_wait: the only place a receiver blocks). One
            // that stays runnable is spinning in `wait` (see `ModeRun::not_asleep`); the
            // burst's first wake-up ends that, so the burst goes ahead.
            let missing = g.wait_states(b"S", Duration::from_millis(200));
            if b >= WARMUP_BURSTS {
                r.not_asleep += missing as u64;
            }
            g.burst(BURST, batched)
        } else {
            g.signal_all(libc::SIGSTOP);
            let missing = g.wait_states(b"Tt", Duration::from_secs(60));
            assert_eq!(missing, 0, "N={}: receivers that did not stop", g.n);
            let burst = g.burst(BURST, batched);
            g.signal_all(libc::SIGCONT);
            burst
        };
        // Our own copies (self-delivery) are run here, outside the timed publishes.
        g.worker.dispatch().expect("dispatch");
        g.wait_drained();
        if b >= WARMUP_BURSTS {
            r.per_burst.push(per_op_ns(d, BURST));
            r.backlog_max = r.backlog_max.max(backlog);
            r.total_ns += d.as_nanos() as f64;
            r.events += BURST;
        }
    }
    r.wakes_sent = g.worker.stats().wakeups_sent - sent0;
    r.wake_writes = g.worker.stats().wake_writes - writes0;
    r.lost = g.receiver_sum(R_LOST) - lost0;
    for (i, w) in (1..g.n).enumerate() {
        let got = g.shm.word(rline(w, R_WAKES)).load(Ordering::Acquire) - wakes_before[i];
        r.wakes_received += got;
        r.wakes_received_max = r.wakes_received_max.max(got);
    }
    r
}

fn median(v: &[f64]) -> f64 {
    Sample::new(v.iter().copied()).median().unwrap_or(f64::NAN)
}

fn p99(v: &[f64]) -> f64 {
    Sample::new(v.iter().copied()).percentile(0.99).unwrap_or(f64::NAN)
}

/// The §P5 bar for wake-ups: a bounded number per receiver per burst of [`BURST`] (this
/// bench's reading of "not one per event": at most 1% of the events).
const MAX_WAKES_PER_BURST: f64 = BURST as f64 / 100.0;

fn print_scale(plan: &Plan, s: &ScaleResult) {
    let ref_i = NS.iter().position(|&n| n == REF_N).expect("REF_N in NS");
    println!();
    println!(
        "publish(Target::All) of a 64-byte typed event, publisher's time per publish, bursts of {BURST} \
         (default options but workers(N); {} round(s) x {} bursts per mode and N; ratio = median over rounds of \
         the round's median / N={REF_N}'s; backlog = the most events of one burst that did not fit one receiver's \
         ring and waited in the publisher's backlog)",
        plan.rounds, plan.bursts
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>8} {:<16} target (ARCHITECTURE.md §P5)",
        "measurement", "median", "p99", "mean", "backlog", "ratio"
    );
    for (m, label) in [
        (0, "receivers stopped (copies only)"),
        (1, "receivers parked in wait, waking"),
        (2, "parked, each burst in one batch"),
    ] {
        for (i, &n) in NS.iter().enumerate() {
            let runs = &s.runs[m][i];
            if runs.is_empty() {
                println!("{:<44} not run", format!("{label}, N={n}"));
                continue;
            }
            let all: Vec<f64> = runs.iter().flat_map(|r| r.per_burst.iter().copied()).collect();
            let mean = runs.iter().map(|r| r.total_ns).sum::<f64>() / runs.iter().map(|r| r.events).sum::<u64>() as f64;
            let ratios: Vec<f64> = runs
                .iter()
                .zip(&s.runs[m][ref_i])
                .map(|(r, base)| median(&r.per_burst) / median(&base.per_burst))
                .collect();
            let ratio = median(&ratios);
            let (ratio_s, target) = if n == REF_N {
                ("reference".to_string(), String::new())
            } else if n == 64 {
                let met = if ratio <= 2.0 { "met" } else { "NOT met" };
                (format!("{ratio:.2}x N={REF_N}"), format!("<= 2x N={REF_N}: {met}"))
            } else {
                (format!("{ratio:.2}x N={REF_N}"), "-".into())
            };
            let backlog = runs.iter().map(|r| r.backlog_max).max().unwrap_or(0);
            let line = format!(
                "{:<44} {:>7.0} ns {:>7.0} ns {:>7.0} ns {backlog:>8} {ratio_s:<16} {target}",
                format!("{label}, N={n}"),
                median(&all),
                p99(&all),
                mean
            );
            println!("{}", line.trim_end());
        }
    }
    println!();
    println!(
        "wake-ups per receiver per burst of {BURST}, receivers parked (stats(): wakeups_sent of the publisher / \
         (N-1), wakeups_received of the receivers, mean and largest receiver), and the publisher's eventfd writes \
         per burst (stats(): wake_writes; a commit that wakes 3 or more writes the fan-out eventfd once); the N-1 \
         receivers share one CPU and compete for it with each other (the publisher has the other CPU; on 2 vCPUs the waking receivers \
         also compete with the publisher for the host's time)"
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>10} {:>6} {:>10}  target (ARCHITECTURE.md §P5)",
        "measurement", "sent", "received", "max recv", "writes", "lost", "not asleep"
    );
    let mut spinning = 0;
    for (m, what) in [(1, ""), (2, ", batched")] {
        for (i, &n) in NS.iter().enumerate() {
            let runs = &s.runs[m][i];
            if runs.is_empty() {
                continue;
            }
            let per = (n as u64 - 1) as f64 * runs.iter().map(|r| r.per_burst.len()).sum::<usize>() as f64;
            let bursts = runs.iter().map(|r| r.per_burst.len()).sum::<usize>() as f64;
            let sent = runs.iter().map(|r| r.wakes_sent).sum::<u64>() as f64 / per;
            let recv = runs.iter().map(|r| r.wakes_received).sum::<u64>() as f64 / per;
            let writes = runs.iter().map(|r| r.wake_writes).sum::<u64>() as f64 / bursts;
            let max =
                runs.iter().map(|r| r.wakes_received_max).max().unwrap_or(0) as f64 / (bursts / runs.len() as f64);
            // The unbatched row also counts the stopped mode's losses (its receivers are the same).
            let modes: &[usize] = if m == 1 { &[0, 1] } else { &[2] };
            let lost: u64 = modes.iter().flat_map(|&k| s.runs[k][i].iter()).map(|r| r.lost).sum();
            let not_asleep: u64 = runs.iter().map(|r| r.not_asleep).sum();
            spinning += not_asleep;
            let met = if sent.max(recv) <= MAX_WAKES_PER_BURST { "met" } else { "NOT met" };
            println!(
                "{:<44} {sent:>10.2} {recv:>10.2} {max:>10.2} {writes:>10.2} {lost:>6} {:>10}  bounded (<= {MAX_WAKES_PER_BURST} per \
             burst, not 1 per event): {met}",
                format!("wake-ups per receiver per burst{what}, N={n}"),
                format!("{not_asleep}/{}", per as u64),
            );
        }
    }
    if spinning > 0 {
        println!(
            "NOTE: {spinning} times a drained receiver was still runnable 200 ms later instead of asleep: its \
             wait(None) spins (epoll_wait returns its eventfd readable at once) until the next wake-up"
        );
    }
    println!();
    println!("region size at default options (the library's memfd, by fstat)");
    println!("{:<44} {:>10} {:>21} {:<16} target (ARCHITECTURE.md §P5)", "measurement", "bytes", "MiB", "ratio");
    for (i, &n) in NS.iter().enumerate() {
        let Some(size) = s.region[i] else {
            println!("{:<44} not found", format!("region, N={n}"));
            continue;
        };
        let mib = size as f64 / (1 << 20) as f64;
        let (ratio, target) = if n == 64 {
            let met = if size <= 64 << 20 { "met" } else { "NOT met" };
            (format!("{:.2}x 64 MiB", mib / 64.0), format!("<= 64 MiB: {met}"))
        } else {
            (String::new(), "-".into())
        };
        let line = format!("{:<44} {size:>10} {mib:>17.1} MiB {ratio:<16} {target}", format!("region, N={n}"));
        println!("{}", line.trim_end());
    }
    let setup: Vec<String> = NS.iter().zip(&s.setup_s).map(|(n, t)| format!("N={n} {t:.1} s")).collect();
    println!("(group start-up, spawn + attach, slowest round: {})", setup.join(", "));
}

// ---------------------------------------------------------------------------------------
// 3: 1->3 broadcast, the library against three bare rings written by one producer

/// Bare rings: ring r's head word at r * 256, tail at r * 256 + 128, stop at 1024, slots of
/// 64 bytes from 4096 + r * RING_BYTES; 2048 slots = 128 KiB each, the library's default
/// `ring_capacity`.
const RINGS: usize = 3;
const RING_SLOTS: u64 = 2048;
const RING_BYTES: usize = RING_SLOTS as usize * 64;
const BARE_STOP: usize = 1024;
const BARE_SHM_LEN: usize = 4096 + RINGS * RING_BYTES;

fn head_off(r: usize) -> usize {
    r * 256
}

fn tail_off(r: usize) -> usize {
    r * 256 + 128
}

fn slot_off(r: usize, i: u64) -> usize {
    4096 + r * RING_BYTES + (i % RING_SLOTS) as usize * 64
}

struct BareBroadcast {
    shm: Shm,
    children: Vec<Child>,
    head: u64,
}

impl BareBroadcast {
    fn new(cpu: Option<usize>) -> Self {
        let shm = Shm::create(BARE_SHM_LEN);
        let children = (0..RINGS)
            .map(|r| {
                child_command("bare-sink", cpu, &[shm.raw_fd()], None)
                    .env(INDEX_ENV, r.to_string())
                    .spawn()
                    .expect("spawning a consumer")
            })
            .collect();
        let mut s = BareBroadcast { shm, children, head: 0 };
        s.run(10_000);
        s
    }
}

impl Scenario for BareBroadcast {
    /// Push `iters` messages into each ring, wait until every consumer has taken them all.
    fn run(&mut self, iters: u64) -> Duration {
        let mut cached = [0u64; RINGS];
        for (r, c) in cached.iter_mut().enumerate() {
            *c = self.shm.word(tail_off(r)).load(Ordering::Acquire);
        }
        let mut msg = [0x5au8; 64];
        let t = Instant::now();
        for _ in 0..iters {
            msg[..8].copy_from_slice(&self.head.to_le_bytes());
            for (r, cached_tail) in cached.iter_mut().enumerate() {
                while self.head - *cached_tail >= RING_SLOTS {
                    std::hint::spin_loop();
                    *cached_tail = self.shm.word(tail_off(r)).load(Ordering::Acquire);
                }
                // SAFETY: the slot is free (head - tail < RING_SLOTS), in bounds, and only this
                // process writes it until the Release store below publishes it; plain bytes.
                unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), self.shm.slot(slot_off(r, self.head)), 64) };
                self.shm.word(head_off(r)).store(self.head + 1, Ordering::Release);
            }
            self.head += 1;
        }
        for r in 0..RINGS {
            while self.shm.word(tail_off(r)).load(Ordering::Acquire) != self.head {
                std::hint::spin_loop();
            }
        }
        t.elapsed()
    }
}

impl Drop for BareBroadcast {
    fn drop(&mut self) {
        self.shm.word(BARE_STOP).store(1, Ordering::Release);
        for c in &mut self.children {
            reap(c);
        }
    }
}

/// Consumer of bare ring `INDEX_ENV`: drain in batches, release the batch, yield.
fn child_bare_sink(shm: &Shm) {
    let r: usize = std::env::var(INDEX_ENV).expect("index").parse().expect("index");
    let (head_w, tail_w, stop) = (shm.word(head_off(r)), shm.word(tail_off(r)), shm.word(BARE_STOP));
    let mut tail = tail_w.load(Ordering::Relaxed);
    let mut sum = 0u64;
    loop {
        let head = head_w.load(Ordering::Acquire);
        if head == tail && stop.load(Ordering::Acquire) != 0 {
            black_box(sum);
            return;
        }
        while tail < head {
            let mut m = [0u8; 64];
            // SAFETY: the producer published this slot (tail < head, Acquire above) and does
            // not touch it until we release it below; plain bytes.
            unsafe { std::ptr::copy_nonoverlapping(shm.slot(slot_off(r, tail)), m.as_mut_ptr(), 64) };
            let m = black_box(m);
            sum = sum.wrapping_add(u64::from_le_bytes(m[..8].try_into().expect("8 bytes")));
            tail += 1;
        }
        tail_w.store(tail, Ordering::Release);
        // The three consumers share a CPU: take turns per batch, as the library's receivers.
        idle();
    }
}

/// The library 1->3: worker 0 publishes to a group of 4 whose receivers busy-poll.
struct WeBroadcast {
    g: Group,
}

impl WeBroadcast {
    fn new(cpu: Option<usize>) -> Self {
        let mut s = WeBroadcast { g: Group::spawn(RINGS as u32 + 1, cpu, MODE_BUSY) };
        s.run(10_000);
        s
    }
}

impl Scenario for WeBroadcast {
    /// Publish `iters` events with the publisher's flow control of benches/latency.rs (every
    /// 256 publishes: dispatch, and wait while a receiver's backlog exceeds 1024, far from
    /// `max_queue_len`, so nothing is dropped), then wait until every receiver counted them all.
    fn run(&mut self, iters: u64) -> Duration {
        let g = &mut self.g;
        g.expect += iters;
        g.shm.word(CTL_EXPECT).store(g.expect, Ordering::Release);
        let mut p = Ping { seq: g.seq, pad: [0x5a; 56] };
        let t = Instant::now();
        for i in 0..iters {
            p.seq += 1;
            g.worker.publish(Target::All, "bench", "data", &p).expect("publish");
            if i % 256 == 255 {
                g.worker.dispatch().expect("dispatch");
                while g.worker.stats().peers.iter().any(|p| p.backlog > 1024) {
                    g.worker.dispatch().expect("dispatch");
                }
            }
        }
        let (shm, n, expect) = (&g.shm, g.n, g.expect);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(1..n).all(|w| shm.word(rline(w, R_COUNT)).load(Ordering::Acquire) == expect) {
            g.worker.dispatch().expect("dispatch");
            if Instant::now() > deadline {
                let counts: Vec<u64> = (1..n).map(|w| shm.word(rline(w, R_COUNT)).load(Ordering::Acquire)).collect();
                panic!(
                    "1->3: the receivers did not count {expect} events: {counts:?} (lost: {})",
                    g.receiver_sum(R_LOST)
                );
            }
        }
        let d = t.elapsed();
        g.seq = p.seq;
        g.wait_drained();
        d
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("events lost by the receivers (stats().lost)", self.g.receiver_sum(R_LOST)),
            ("events the publisher dropped (lost_outbound)", self.g.worker.stats().lost_outbound),
            ("events counted by the receivers", self.g.receiver_sum(R_COUNT)),
        ]
    }
}

/// The broadcast pair, alternating rounds as `support::scenario::self_timed` does.
struct BroadcastResult {
    base: Compared,
    lib: Compared,
    counters: Vec<(&'static str, u64)>,
    published: u64,
}

const BC_BASE_CHUNK: u64 = 200_000;
const BC_LIB_CHUNK: u64 = 50_000;

fn measure_broadcast(plan: &Plan, cpu: Option<usize>) -> BroadcastResult {
    let mut counters = Vec::new();
    let mut published = 0;
    let cmp = alternate(plan.bc_rounds, 2, true, |side| {
        let (mut s, chunk): (Box<dyn Scenario>, u64) = if side == 0 {
            (Box::new(BareBroadcast::new(cpu)), BC_BASE_CHUNK)
        } else {
            (Box::new(WeBroadcast::new(cpu)), BC_LIB_CHUNK)
        };
        let v: Vec<f64> = (0..plan.bc_chunks).map(|_| 1e9 / per_op_ns(s.run(chunk), chunk)).collect();
        if side == 1 {
            published += plan.bc_chunks as u64 * chunk;
            for (name, v) in s.counters() {
                match counters.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, total)) => *total += v,
                    None => counters.push((name, v)),
                }
            }
        }
        v
    });
    BroadcastResult { base: cmp[0], lib: cmp[1], counters, published }
}

fn print_broadcast(plan: &Plan, b: &BroadcastResult) {
    println!();
    println!(
        "1->3 broadcast, 64-byte events, three receivers busy-polling on one CPU, the publisher on the other \
         ({} alternating rounds x {} chunks; ratio = median of the per-round ratios)",
        plan.bc_rounds, plan.bc_chunks
    );
    println!(
        "{:<44} {:>15} {:>15} {:<16} target (ARCHITECTURE.md §P3)",
        "measurement", "median", "best decile", "ratio"
    );
    let row = |label: &str, c: &Compared, ratio: &str, target: &str| {
        let line = format!(
            "{label:<44} {:>10.2} M/s  {:>10.2} M/s  {ratio:<16} {target}",
            c.all.median / 1e6,
            c.all.best / 1e6
        );
        println!("{}", line.trim_end());
    };
    row("bare SPSC rings 1->3, index per message", &b.base, "baseline", "");
    let lost =
        b.counters.iter().filter(|(n, _)| n.contains("lost") || n.contains("dropped")).map(|(_, v)| v).sum::<u64>();
    let met = if b.lib.all.median >= 10e6 && lost == 0 { "met" } else { "NOT met" };
    row(
        "worker-events 1->3 publishes/s (rkyv + check)",
        &b.lib,
        &format!("{:.2}x ring", b.lib.ratio),
        &format!(">= 10 M/s, no event lost: {met}"),
    );
    let c: Vec<String> = b.counters.iter().map(|(n, v)| format!("{n} {v}")).collect();
    println!(
        "worker-events 1->3 ({} publishes measured, each to 3 receivers, plus warm-up): {}",
        b.published,
        c.join(", ")
    );
}

// ---------------------------------------------------------------------------------------
// Child entry point

fn child_main(role: &str) {
    let fds = child_prologue();
    match role {
        "receiver" => child_receiver(&Shm::inherited(&fds, GROUP_SHM_LEN)),
        "bare-sink" => child_bare_sink(&Shm::inherited(&fds, BARE_SHM_LEN)),
        other => panic!("unknown bench role {other}"),
    }
}
