//! `cargo run --release --example soak -- [--seconds N] [--rate EVENTS_PER_SEC] [--workers W]
//! [--transport shm|socket] [--interval S] [--ring-bytes B] [--large-bytes B] [--large-every N]
//! [--unique-every N]`
//!
//! A soak test: W real worker processes (this binary re-executed in a worker role) stream
//! `Target::All` events for N seconds at a total of EVENTS_PER_SEC (defaults: 600 s, 50,000
//! events/s, 4 workers, shared memory), every worker dispatching everything. One event in
//! `--large-every` (100) carries `--large-bytes` (40 KiB) of data, more than a whole ring of
//! `--ring-bytes` (32 KiB), so it is always streamed in fragments; after every `--unique-every`
//! (100) events a publisher also publishes a pair of `Target::Unique` events with the same hash
//! (the second is a duplicate). Half of the pairs use a fresh hash (the dedup table would fill
//! up without expiry: `unique_capacity` is 4,096), the other half a hash from a small per-publisher
//! pool that comes back every ~4 s, well after `unique_timeout` (1 s), so it must be delivered
//! again: the table's expiry is exercised both ways.
//!
//! Every S seconds (`--interval`, default N/15 clamped to 1..=5) the parent samples each worker:
//! VmRSS (with its anonymous and shared-memory parts) and the open descriptor count from
//! `/proc/<pid>`, CPU use from `/proc/<pid>/stat`, and the worker prints its own
//! `Worker::stats()`: events queued towards its peers (ring plus private backlog, or the frames
//! waiting for a socket), inbound ring depth, unique events pending. After a warm-up (the first
//! 20 % of the run, at least 5 s) the checks are:
//!
//! * accounting: for every receiver and publisher, `All` events received + reported lost =
//!   published, none duplicated, reordered or corrupt, and no loss at all (none is expected at a
//!   paced rate); unique events: delivered once per pair, the other copy counted as a duplicate,
//!   nothing delivered unrecorded;
//! * RSS: growth from the first sample after the warm-up to the last <= max(2 MiB, 5 %);
//! * descriptors: the same count in every sample after the warm-up;
//! * queues: after the warm-up no queue towards a peer ever exceeds the publishers' throttle
//!   point (`max_queue_len / 2`, plus the 64 events published between two checks), and 10 s
//!   after the stream stops every queue and every pending unique event has drained to zero.
//!
//! It prints a table of the samples, the figures, and exits non-zero with the reasons when a
//! check fails. `scripts/soak.sh` runs it (`--ci`: 30 s).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use worker_events::{Events, Options, PublishError, SYSTEM_SOURCE, Target, Transport, Wid, Worker};
use worker_events_dev_support::{TempDir, loadavg, monotonic_ns, process};

/// Set in a worker process: its worker number. The worker parses the same arguments.
const WID_ENV: &str = "WE_SOAK_WID";
/// Set in a worker process: the directory of the control socket.
const DIR_ENV: &str = "WE_SOAK_DIR";

/// `unique_timeout` of the soak: short, so a 30-second run sees many expiries.
const UNIQUE_TIMEOUT: Duration = Duration::from_secs(1);
/// `unique_capacity` of the soak: small, so fresh hashes would fill it within seconds without
/// expiry (4,096 entries against ~250 fresh hashes per second at the default rate).
const UNIQUE_CAPACITY: usize = 4096;
/// Data bytes of an ordinary event.
const SMALL_BYTES: usize = 64;
/// RSS growth tolerated after the warm-up: the larger of this and [`RSS_GROWTH_PERCENT`].
const RSS_GROWTH_KIB: u64 = 2048;
/// RSS growth tolerated after the warm-up, in percent of the first sample after it.
const RSS_GROWTH_PERCENT: u64 = 5;
/// Time allowed after the stream for every queue to drain.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Configuration (parsed alike by the parent and its workers)

#[derive(Debug, Clone)]
struct Config {
    seconds: u64,
    rate: u64,
    workers: u32,
    transport: Transport,
    interval: u64,
    ring_bytes: usize,
    large_bytes: usize,
    large_every: u64,
    unique_every: u64,
}

impl Config {
    /// Seconds of warm-up: 20 % of the run, at least 5 s.
    fn warmup(&self) -> u64 {
        (self.seconds / 5).max(5)
    }
    /// Index of the last sample (samples are taken at `k * interval`, `k = 0..=last`).
    fn last_sample(&self) -> u64 {
        self.seconds / self.interval
    }
    /// Index of the first sample after the warm-up: the baseline of the checks.
    fn baseline(&self) -> u64 {
        self.warmup().div_ceil(self.interval)
    }
    fn options(&self, dir: &Path) -> Options {
        Options::new(dir.join("events.sock"))
            .workers(self.workers)
            .transport(self.transport)
            .ring_capacity(self.ring_bytes)
            .max_payload_len(self.large_bytes.max(64 * 1024))
            .unique_timeout(UNIQUE_TIMEOUT)
            .unique_capacity(UNIQUE_CAPACITY)
    }
    /// Data length of the `All` event number `seq`.
    fn len_of(&self, seq: u64) -> usize {
        if self.large_every > 0 && seq % self.large_every == self.large_every - 1 {
            self.large_bytes
        } else {
            SMALL_BYTES
        }
    }
    /// Events per second of worker `me`.
    fn rate_of(&self, me: u32) -> u64 {
        let w = self.workers as u64;
        self.rate / w + u64::from((me as u64) < self.rate % w)
    }
}

const USAGE: &str = "usage: soak [--seconds N (600)] [--rate EVENTS_PER_SEC total (50000)] [--workers W (4)] \
                     [--transport shm|socket (shm)] [--interval S (N/15, 1..=5)] [--ring-bytes B (32768)] \
                     [--large-bytes B (40960)] [--large-every N (100; 0: none)] [--unique-every N (100; 0: none)]";

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut c = Config {
        seconds: 600,
        rate: 50_000,
        workers: 4,
        transport: Transport::SharedMemory,
        interval: 0,
        ring_bytes: 32 * 1024,
        large_bytes: 40 * 1024,
        large_every: 100,
        unique_every: 100,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || value.parse::<u64>().map_err(|_| format!("{flag}: {value:?} is not a number"));
        match flag.as_str() {
            "--seconds" => c.seconds = num()?,
            "--rate" => c.rate = num()?,
            "--workers" => c.workers = num()? as u32,
            "--interval" => c.interval = num()?,
            "--ring-bytes" => c.ring_bytes = num()? as usize,
            "--large-bytes" => c.large_bytes = num()? as usize,
            "--large-every" => c.large_every = num()?,
            "--unique-every" => c.unique_every = num()?,
            "--transport" => {
                c.transport = match value.as_str() {
                    "shm" => Transport::SharedMemory,
                    "socket" => Transport::Socket,
                    t => return Err(format!("unknown transport {t:?}: shm or socket")),
                }
            }
            f => return Err(format!("unknown option {f}")),
        }
    }
    if c.interval == 0 {
        c.interval = (c.seconds / 15).clamp(1, 5);
    }
    if !(2..=worker_events::MAX_WORKERS).contains(&c.workers) {
        return Err(format!("--workers must be in 2..={}", worker_events::MAX_WORKERS));
    }
    if c.rate < c.workers as u64 {
        return Err("--rate must be at least one event per second per worker".into());
    }
    if c.large_bytes < 24 || c.large_bytes > worker_events::MAX_PAYLOAD_LIMIT {
        return Err("--large-bytes must be in 24..=16 MiB".into());
    }
    if c.last_sample() < c.baseline() + 1 {
        return Err(format!(
            "a {} s run with {} s samples leaves fewer than two samples after the {} s warm-up",
            c.seconds,
            c.interval,
            c.warmup()
        ));
    }
    Ok(c)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let cfg = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Ok(wid) = std::env::var(WID_ENV) {
        return match worker_main(&cfg, wid.parse().expect("WE_SOAK_WID")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker {wid}: FAILED: {e}");
                ExitCode::FAILURE
            }
        };
    }
    parent_main(&cfg, &args)
}

// ---------------------------------------------------------------------------------------
// Parent: start the workers, sample them, check.

/// What the parent reads from `/proc/<pid>` at one sample.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    rss_kib: u64,
    anon_kib: u64,
    shmem_kib: u64,
    fds: u64,
    /// utime + stime, clock ticks.
    cpu_ticks: u64,
}

fn read_proc(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is field 3, utime 14.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let cpu_ticks = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    Some(ProcSample {
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        shmem_kib: field("RssShmem:").unwrap_or(0),
        fds,
        cpu_ticks,
    })
}

/// A `KEY value key=value ...` line of a worker.
#[derive(Debug, Clone, Default)]
struct Line(Vec<(String, String)>);

impl Line {
    fn parse(s: &str) -> Line {
        Line(
            s.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
    fn str(&self, key: &str) -> &str {
        self.0.iter().find(|(k, _)| k == key).map_or("", |(_, v)| v.as_str())
    }
    fn get(&self, key: &str) -> u64 {
        self.str(key).parse().unwrap_or(0)
    }
    fn list(&self, key: &str) -> Vec<u64> {
        self.str(key).split(',').filter_map(|v| v.parse().ok()).collect()
    }
}

/// Everything learned about one worker.
#[derive(Default)]
struct Seen {
    started: bool,
    /// The worker's own `SAMPLE` lines, by sample index.
    samples: BTreeMap<u64, Line>,
    /// The parent's `/proc` samples, by sample index.
    procs: BTreeMap<u64, ProcSample>,
    report: Option<Line>,
    status: Option<bool>,
}

fn parent_main(cfg: &Config, args: &[String]) -> ExitCode {
    let dir = match TempDir::try_new("soak") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "worker-events soak: {} workers, {} events/s in total for {} s, transport {}, ring {} B, 1 event in {} of {} B, \
         a unique pair after every {} events; samples every {} s, warm-up {} s; load average {}",
        cfg.workers,
        cfg.rate,
        cfg.seconds,
        if cfg.transport == Transport::Socket { "socket" } else { "shm" },
        cfg.ring_bytes,
        cfg.large_every,
        cfg.large_bytes,
        cfg.unique_every,
        cfg.interval,
        cfg.warmup(),
        loadavg()
    );
    let failures = run(cfg, args, dir.path());
    drop(dir);
    println!("load average at the end: {}", loadavg());
    if failures.is_empty() {
        println!("SOAK OK");
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            println!("FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}

fn run(cfg: &Config, args: &[String], dir: &Path) -> Vec<String> {
    let n = cfg.workers as usize;
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut children: Vec<Child> = Vec::new();
    let mut readers = Vec::new();
    // Each worker exits only when its stdin closes: after the last `/proc` sample.
    let mut holds = Vec::new();
    for i in 0..n {
        let spawned = process::reexec().and_then(|mut cmd| {
            cmd.args(args)
                .env(WID_ENV, i.to_string())
                .env(DIR_ENV, dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
        });
        match spawned {
            Ok(mut c) => {
                holds.push(c.stdin.take().expect("piped stdin"));
                let out = c.stdout.take().expect("piped stdout");
                let tx = tx.clone();
                readers.push(std::thread::spawn(move || {
                    for line in BufReader::new(out).lines() {
                        let Ok(line) = line else { break };
                        if tx.send((i, line)).is_err() {
                            break;
                        }
                    }
                }));
                children.push(c);
            }
            Err(e) => {
                kill_all(&mut children);
                return vec![format!("spawning worker {i}: {e}")];
            }
        }
    }
    drop(tx);
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let mut seen: Vec<Seen> = (0..n).map(|_| Seen::default()).collect();
    let mut failures = Vec::new();

    let absorb = |seen: &mut Vec<Seen>, wait: Duration| {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((i, line)) => {
                    if line == "START" {
                        seen[i].started = true;
                    } else if let Some(rest) = line.strip_prefix("SAMPLE ") {
                        let l = Line::parse(rest);
                        seen[i].samples.insert(l.get("k"), l);
                    } else if let Some(rest) = line.strip_prefix("REPORT ") {
                        seen[i].report = Some(Line::parse(rest));
                    } else {
                        println!("worker {i}: {line}");
                    }
                }
                Err(_) => return,
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    };
    let poll_exits = |children: &mut Vec<Child>, seen: &mut Vec<Seen>| {
        for (i, c) in children.iter_mut().enumerate() {
            if seen[i].status.is_none() {
                if let Ok(Some(st)) = c.try_wait() {
                    seen[i].status = Some(st.success());
                }
            }
        }
    };

    // Everyone attached and said hello: the stream starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().all(|s| s.started) {
        absorb(&mut seen, Duration::from_millis(20));
        poll_exits(&mut children, &mut seen);
        if seen.iter().any(|s| s.status.is_some()) || Instant::now() >= deadline {
            kill_all(&mut children);
            return vec!["the workers did not all start streaming within 30 s".into()];
        }
    }
    let t0 = Instant::now();
    for k in 0..=cfg.last_sample() {
        let at = t0 + Duration::from_secs(k * cfg.interval);
        while Instant::now() < at {
            absorb(&mut seen, at.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)));
        }
        for (i, pid) in pids.iter().enumerate() {
            if let Some(p) = read_proc(*pid) {
                seen[i].procs.insert(k, p);
            }
        }
        poll_exits(&mut children, &mut seen);
        if let Some(i) = seen.iter().position(|s| s.status.is_some()) {
            failures.push(format!("worker {i} exited during the stream (sample {k})"));
            break;
        }
    }
    drop(holds);
    // The drain, the final accounting and the goodbyes.
    let deadline = Instant::now() + DRAIN_LIMIT + Duration::from_secs(30);
    while seen.iter().any(|s| s.status.is_none()) && Instant::now() < deadline {
        absorb(&mut seen, Duration::from_millis(50));
        poll_exits(&mut children, &mut seen);
    }
    for (i, c) in children.iter_mut().enumerate() {
        if seen[i].status.is_none() {
            failures.push(format!("worker {i} still running 40 s after the stream: killed"));
            let _ = c.kill();
            let _ = c.wait();
            seen[i].status = Some(false);
        }
    }
    for r in readers {
        let _ = r.join();
    }
    absorb(&mut seen, Duration::ZERO);
    for (i, s) in seen.iter().enumerate() {
        if s.status != Some(true) {
            failures.push(format!("worker {i} failed (see its messages above)"));
        }
    }
    print_table(cfg, &seen);
    failures.extend(check(cfg, &seen));
    failures
}

fn kill_all(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn print_table(cfg: &Config, seen: &[Seen]) {
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    println!();
    println!(
        "{:>5} {:>6} {:>2} {:>9} {:>9} {:>9} {:>4} {:>5} {:>11} {:>11} {:>7} {:>7} {:>7} {:>5}",
        "t(s)",
        "phase",
        "w",
        "rss KiB",
        "anon KiB",
        "shm KiB",
        "fds",
        "cpu%",
        "published",
        "delivered",
        "queued",
        "q.max",
        "inbound",
        "u.pen"
    );
    for k in 0..=cfg.last_sample() {
        for (i, s) in seen.iter().enumerate() {
            let p = s.procs.get(&k);
            let prev = k.checked_sub(1).and_then(|j| s.procs.get(&j));
            let cpu = match (p, prev) {
                (Some(p), Some(q)) => format!("{}", (p.cpu_ticks - q.cpu_ticks) * 100 / hz / cfg.interval),
                _ => "-".into(),
            };
            let l = s.samples.get(&k);
            let num = |f: &dyn Fn(&ProcSample) -> u64| p.map_or("-".into(), |p| f(p).to_string());
            let w = |key: &str| l.map_or("-".into(), |l| l.str(key).to_string());
            let phase = if k < cfg.baseline() {
                "warm"
            } else if k == cfg.baseline() {
                "base"
            } else {
                "soak"
            };
            println!(
                "{:>5} {:>6} {:>2} {:>9} {:>9} {:>9} {:>4} {:>5} {:>11} {:>11} {:>7} {:>7} {:>7} {:>5}",
                k * cfg.interval,
                phase,
                i,
                num(&|p| p.rss_kib),
                num(&|p| p.anon_kib),
                num(&|p| p.shmem_kib),
                num(&|p| p.fds),
                cpu,
                w("published"),
                w("delivered"),
                w("queued"),
                w("queued_max"),
                w("inbound"),
                w("upend"),
            );
        }
    }
    println!(
        "(rss = VmRSS = anon + file + shm; queued: events towards all peers not yet consumed (ring + backlog, or \
         frames waiting for a socket), q.max: the largest towards one peer; inbound: events waiting in this \
         worker's inbound rings; u.pen: unique events not yet handed on)"
    );
}

/// The checks of the module documentation; one message per failure.
fn check(cfg: &Config, seen: &[Seen]) -> Vec<String> {
    let n = seen.len();
    let mut fail = Vec::new();
    let base = cfg.baseline();
    let last = cfg.last_sample();
    let reports: Vec<&Line> = seen.iter().filter_map(|s| s.report.as_ref()).collect();
    if reports.len() != n {
        fail.push(format!("{} of {n} workers sent no final report", n - reports.len()));
        return fail;
    }

    // Accounting of `All` events.
    let published: Vec<u64> = reports.iter().map(|r| r.get("published")).collect();
    let total_published: u64 = published.iter().sum();
    let mut total_lost = 0;
    let mut total_received = 0;
    for (r, rep) in reports.iter().enumerate() {
        let (recv, lost) = (rep.list("recv"), rep.list("lost"));
        if recv.len() != n || lost.len() != n {
            fail.push(format!("worker {r}: malformed report"));
            continue;
        }
        for p in 0..n {
            total_lost += lost[p];
            total_received += recv[p];
            if recv[p] + lost[p] != published[p] {
                fail.push(format!(
                    "worker {r} from worker {p}: received {} + reported lost {} != published {}",
                    recv[p], lost[p], published[p]
                ));
            }
        }
        if rep.get("errors") > 0 {
            fail.push(format!(
                "worker {r}: {} events duplicated, reordered or corrupt, {} messages dropped as malformed, {} \
                 callback panics",
                rep.get("bad_events"),
                rep.get("dropped"),
                rep.get("panics")
            ));
        }
        if rep.get("drain_ms") >= DRAIN_LIMIT.as_millis() as u64 {
            fail.push(format!(
                "worker {r}: queues not drained {DRAIN_LIMIT:?} after the stream (queued {}, unique pending {})",
                rep.get("queued"),
                rep.get("upend")
            ));
        }
    }
    if total_lost > 0 {
        fail.push(format!("{total_lost} events reported lost (none expected at a paced rate)"));
    }
    let achieved = total_published as f64 / cfg.seconds as f64;
    println!();
    println!(
        "published {total_published} All events ({achieved:.0}/s, {:.1} % of the {} /s asked; throttled {} times, \
         {} events skipped while behind), received {total_received} in all, {total_lost} reported lost",
        achieved * 100.0 / cfg.rate as f64,
        cfg.rate,
        reports.iter().map(|r| r.get("throttled")).sum::<u64>(),
        reports.iter().map(|r| r.get("skipped")).sum::<u64>(),
    );
    if achieved < cfg.rate as f64 * 0.95 {
        println!("WARNING: the publishers reached less than 95 % of the rate asked (a loaded host?)");
    }
    let lat: Vec<String> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!("w{i} p50 <= {} p99 <= {} max {}", fmt_ns(r.get("p50")), fmt_ns(r.get("p99")), fmt_ns(r.get("max")))
        })
        .collect();
    println!("publish -> callback latency of remote events (log2 buckets): {}", lat.join("; "));

    // Unique events.
    let pairs: u64 = reports.iter().map(|r| r.get("pairs")).sum();
    let unique_published: u64 = reports.iter().map(|r| r.get("uniques")).sum();
    let unique_received: u64 = reports.iter().map(|r| r.list("urecv").iter().sum::<u64>()).sum();
    let dups = reports.iter().map(|r| r.get("dups")).max().unwrap_or(0);
    let unrecorded = reports.iter().map(|r| r.get("unrec")).max().unwrap_or(0);
    println!(
        "unique: {unique_published} published in {pairs} same-hash pairs, {unique_received} delivered, {dups} \
         dropped as duplicates, {unrecorded} delivered unrecorded"
    );
    if unique_received + dups != unique_published {
        fail.push(format!("unique: delivered {unique_received} + duplicates {dups} != published {unique_published}"));
    }
    if unique_received != pairs || dups != pairs {
        fail.push(format!(
            "unique: expected each of the {pairs} pairs delivered once and duplicated once (an expired hash \
             delivered again), got {unique_received} delivered and {dups} duplicates"
        ));
    }
    if unrecorded > 0 {
        fail.push(format!(
            "unique: {unrecorded} events delivered unrecorded (dedup table windows full: expiry not freeing entries?)"
        ));
    }

    // RSS, descriptors, queues after the warm-up.
    let events_after_warmup = {
        let a: u64 = seen.iter().filter_map(|s| s.samples.get(&base)).map(|l| l.get("delivered")).sum();
        let b: u64 = seen.iter().filter_map(|s| s.samples.get(&last)).map(|l| l.get("delivered")).sum();
        b.saturating_sub(a) / n as u64
    };
    let limit = max_queued(cfg);
    for (i, s) in seen.iter().enumerate() {
        let missing: Vec<u64> = (0..=last).filter(|k| !s.procs.contains_key(k) || !s.samples.contains_key(k)).collect();
        if !missing.is_empty() {
            fail.push(format!("worker {i}: samples {missing:?} missing"));
            continue;
        }
        let (b, e) = (s.procs[&base], s.procs[&last]);
        let growth = e.rss_kib.saturating_sub(b.rss_kib);
        let bound = RSS_GROWTH_KIB.max(b.rss_kib * RSS_GROWTH_PERCENT / 100);
        println!(
            "worker {i}: RSS {} KiB at {} s -> {} KiB at {} s (+{growth} KiB, bound {bound} KiB; anon {:+} KiB, shm \
             {:+} KiB); {events_after_warmup} events delivered meanwhile: a leak of {} bytes per event would pass \
             unseen; fds {}",
            b.rss_kib,
            base * cfg.interval,
            e.rss_kib,
            last * cfg.interval,
            e.anon_kib as i64 - b.anon_kib as i64,
            e.shmem_kib as i64 - b.shmem_kib as i64,
            (bound * 1024).div_ceil(events_after_warmup.max(1)),
            b.fds
        );
        if growth > bound {
            fail.push(format!(
                "worker {i}: RSS grew by {growth} KiB after the warm-up ({} -> {} KiB), more than {bound} KiB",
                b.rss_kib, e.rss_kib
            ));
        }
        let fds: Vec<u64> = (base..=last).map(|k| s.procs[&k].fds).collect();
        if fds.iter().any(|f| *f != b.fds) {
            fail.push(format!("worker {i}: open descriptors changed after the warm-up: {fds:?}"));
        }
        let queued: Vec<u64> = (base..=last).map(|k| s.samples[&k].get("queued_max")).collect();
        if let Some(q) = queued.iter().find(|q| **q > limit) {
            fail.push(format!(
                "worker {i}: {q} events queued towards one peer after the warm-up, above the throttle bound {limit}: {queued:?}"
            ));
        }
    }
    fail
}

/// Largest queue towards one peer that a paced run may show: the publisher pauses at
/// `max_queue_len / 2` and checks every 64 events.
fn max_queued(cfg: &Config) -> u64 {
    cfg.options(Path::new("/unused")).get_max_queue_len() as u64 / 2 + 64
}

fn fmt_ns(ns: u64) -> String {
    if ns < 10_000 {
        format!("{ns}ns")
    } else if ns < 10_000_000 {
        format!("{}us", ns / 1_000)
    } else {
        format!("{}ms", ns / 1_000_000)
    }
}

// ---------------------------------------------------------------------------------------
// Worker process

/// What the callbacks record; fixed-size, so that the soak itself does not grow. Shared with
/// the callbacks through an `Arc<Mutex<_>>` (callbacks are `Send + 'static`; one thread).
struct State {
    me: u32,
    cfg: Config,
    /// Per publisher: the next `All` sequence number expected.
    next: Vec<u64>,
    received: Vec<u64>,
    /// Per publisher: events reported lost through `lost` notices.
    lost: Vec<u64>,
    /// Per publisher: unique events received, and the next unique index at least expected.
    unique_received: Vec<u64>,
    unique_next: Vec<u64>,
    /// Per publisher: its `All` count, once its `done` arrived.
    done: Vec<Option<u64>>,
    hello: Vec<bool>,
    drained: Vec<bool>,
    bye: Vec<bool>,
    errors: u64,
    said: u32,
    /// Remote publish -> callback latencies, log2 buckets of nanoseconds.
    latency: [u64; 64],
    latency_max: u64,
}

impl State {
    fn complain(&mut self, msg: std::fmt::Arguments<'_>) {
        self.said += 1;
        if self.said <= 40 {
            eprintln!("worker {}: {msg}", self.me);
        } else if self.said == 41 {
            eprintln!("worker {}: (further messages suppressed)", self.me);
        }
    }
    /// Upper bound of the bucket holding quantile `q` of the latencies.
    fn latency_quantile(&self, q: f64) -> u64 {
        let total: u64 = self.latency.iter().sum();
        let want = ((total as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (b, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= want && total > 0 {
                return 1u64 << b.min(63);
            }
        }
        0
    }
}

fn worker_main(cfg: &Config, me: u32) -> Result<(), String> {
    process::die_with_parent().map_err(|e| format!("the parent is gone ({e})"))?;
    let dir = PathBuf::from(std::env::var(DIR_ENV).map_err(|_| format!("{DIR_ENV} missing"))?);
    let n = cfg.workers as usize;
    let events = Events::new(cfg.options(&dir)).map_err(|e| e.to_string())?;
    let mut w = events.init_worker(Wid::Worker(me)).map_err(|e| e.to_string())?;
    let state = Arc::new(Mutex::new(State {
        me,
        cfg: cfg.clone(),
        next: vec![0; n],
        received: vec![0; n],
        lost: vec![0; n],
        unique_received: vec![0; n],
        unique_next: vec![0; n],
        done: vec![None; n],
        hello: vec![false; n],
        drained: vec![false; n],
        bye: vec![false; n],
        errors: 0,
        said: 0,
        latency: [0; 64],
        latency_max: 0,
    }));
    subscribe_all(&mut w, &state);

    if !w.wait_ready(Duration::from_secs(10)).map_err(|e| e.to_string())? {
        return Err("not attached to a broker within 10 s".into());
    }
    publish_retry(&mut w, "hello", &[])?;
    serve_until(&mut w, Duration::from_secs(15), "hellos", || state.lock().unwrap().hello.iter().all(|h| *h))?;

    let socket = w.transport() == Transport::Socket;
    let throttle_at = max_queued(cfg) - 64;
    let rate = cfg.rate_of(me);
    let stream_for = Duration::from_secs(cfg.seconds);
    let mut data = vec![0u8; cfg.large_bytes.max(SMALL_BYTES)];
    let mut hash = String::new();
    // A pool hash comes back after `pool` of its kind: every ~4 s at this rate.
    let pool = (rate / cfg.unique_every.max(1) / 2 * 4).max(1) + 1;
    let (mut seq, mut skipped, mut throttled, mut pairs, mut uniques, mut k) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    println!("START");
    let start = Instant::now();
    loop {
        let elapsed = start.elapsed();
        while k <= cfg.last_sample() && elapsed >= Duration::from_secs(k * cfg.interval) {
            print_sample(&w, socket, k, elapsed, seq);
            k += 1;
        }
        if elapsed >= stream_for {
            break;
        }
        // Behind by more than half a second (descheduled on a loaded host): skip ahead
        // rather than burst, which would squeeze the pool hashes' period below the timeout.
        let mut due = (rate as u128 * elapsed.as_nanos() / 1_000_000_000) as u64 + 1 - skipped;
        if due > seq + rate / 2 {
            skipped += due - seq - rate / 2;
            due = seq + rate / 2;
        }
        let mut paused = false;
        while seq < due {
            if seq % 64 == 0 {
                let st = w.stats();
                if st.peers.iter().any(|p| if socket { p.outbound_depth } else { p.backlog } >= throttle_at) {
                    throttled += 1;
                    paused = true;
                    break;
                }
            }
            let len = cfg.len_of(seq);
            data[..8].copy_from_slice(&seq.to_le_bytes());
            data[8..16].copy_from_slice(&monotonic_ns().to_le_bytes());
            data[len - 8..len].copy_from_slice(&seq.to_le_bytes());
            publish_retry(&mut w, "tick", &data[..len])?;
            seq += 1;
            if cfg.unique_every > 0 && seq % cfg.unique_every == 0 {
                hash.clear();
                if pairs % 2 == 0 {
                    let _ = write!(hash, "fresh-{me}-{pairs}");
                } else {
                    let _ = write!(hash, "pool-{me}-{}", (pairs / 2) % pool);
                }
                for _ in 0..2 {
                    let mut u = [0u8; 16];
                    u[..8].copy_from_slice(&uniques.to_le_bytes());
                    u[8..].copy_from_slice(&pairs.to_le_bytes());
                    loop {
                        match w.publish_bytes(Target::Unique(&hash), "soak", "unique", &u) {
                            Ok(()) => break,
                            Err(PublishError::QueueOverflow) => {
                                w.dispatch().map_err(|e| e.to_string())?;
                            }
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                    uniques += 1;
                }
                pairs += 1;
            }
        }
        let next_due = Duration::from_nanos((((due + skipped) as u128 * 1_000_000_000).div_ceil(rate as u128)) as u64);
        let next_sample = Duration::from_secs(k * cfg.interval);
        let now = start.elapsed();
        let nap = if paused { Duration::from_micros(200) } else { next_due.min(next_sample).saturating_sub(now) };
        w.wait(Some(nap.min(stream_for.saturating_sub(now)))).map_err(|e| e.to_string())?;
    }
    let mut done = [0u8; 8];
    done.copy_from_slice(&seq.to_le_bytes());
    publish_retry(&mut w, "done", &done)?;
    // Per-publisher order: a publisher's `done` arrives after all its ticks.
    serve_until(&mut w, Duration::from_secs(30), "every publisher's events", || {
        state.lock().unwrap().done.iter().all(Option::is_some)
    })?;
    // Everything we published consumed by its receivers, every unique event handed on.
    let drain_start = Instant::now();
    while drain_start.elapsed() < DRAIN_LIMIT {
        let st = w.stats();
        if st.unique_pending == 0 && st.peers.iter().all(|p| p.outbound_depth == 0) {
            break;
        }
        w.wait(Some(Duration::from_millis(5))).map_err(|e| e.to_string())?;
    }
    let drain_ms = drain_start.elapsed().as_millis() as u64;
    let st = w.stats();
    let queued: u64 = st.peers.iter().map(|p| p.outbound_depth).sum();
    publish_retry(&mut w, "drained", &[])?;
    serve_until(&mut w, Duration::from_secs(30), "everyone drained", || {
        state.lock().unwrap().drained.iter().all(|d| *d)
    })?;

    let st = w.stats();
    let s = state.lock().unwrap();
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    println!(
        "REPORT published={seq} recv={} lost={} urecv={} pairs={pairs} uniques={uniques} dups={} unrec={} errors={} \
         bad_events={} dropped={} panics={} throttled={throttled} skipped={skipped} drain_ms={drain_ms} queued={queued} upend={} p50={} p99={} max={}",
        list(&s.received),
        list(&s.lost),
        list(&s.unique_received),
        st.unique_duplicates,
        st.unique_unrecorded,
        s.errors + st.dropped + st.callback_panics,
        s.errors,
        st.dropped,
        st.callback_panics,
        st.unique_pending,
        s.latency_quantile(0.5),
        s.latency_quantile(0.99),
        s.latency_max,
    );
    drop(s);
    // Linger until everyone has reported, so that the broker outlives the others' drain.
    publish_retry(&mut w, "bye", &[])?;
    if serve_until(&mut w, Duration::from_secs(5), "byes", || state.lock().unwrap().bye.iter().all(|b| *b)).is_err() {
        eprintln!("worker {me}: not every bye arrived within 5 s (harmless: the report is out)");
    }
    // Stay alive (for the parent's last `/proc` sample) until the parent closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(w);
    Ok(())
}

/// One `SAMPLE` line: the worker's view of its queues.
fn print_sample(w: &Worker, socket: bool, k: u64, elapsed: Duration, published: u64) {
    let st = w.stats();
    let queued = |p: &worker_events::PeerStats| if socket { p.outbound_depth } else { p.backlog };
    println!(
        "SAMPLE k={k} t_ms={} published={published} delivered={} queued={} queued_max={} backlog={} inbound={} \
         upend={} lost={} dups={} unrec={}",
        elapsed.as_millis(),
        st.delivered,
        st.peers.iter().map(|p| p.outbound_depth).sum::<u64>(),
        st.peers.iter().map(queued).max().unwrap_or(0),
        st.peers.iter().map(|p| p.backlog).sum::<u64>(),
        st.peers.iter().map(|p| p.inbound_depth).sum::<u64>(),
        st.unique_pending,
        st.lost,
        st.unique_duplicates,
        st.unique_unrecorded,
    );
}

fn le_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}

fn subscribe_all(w: &mut Worker, state: &Arc<Mutex<State>>) {
    let st = state.clone();
    w.subscribe("soak", "tick", move |ev| {
        let now = monotonic_ns();
        let mut s = st.lock().unwrap();
        let data = ev.data_bytes();
        let from = match ev.wid() {
            Some(Wid::Worker(p)) if (p as usize) < s.next.len() => p as usize,
            _ => {
                s.errors += 1;
                return;
            }
        };
        let (Some(seq), Some(sent)) = (le_u64(data), data.get(8..).and_then(le_u64)) else {
            s.errors += 1;
            return;
        };
        if data.len() != s.cfg.len_of(seq) || le_u64(&data[data.len() - 8..]) != Some(seq) {
            s.complain(format_args!("from worker {from}: event {seq} corrupt ({} bytes)", data.len()));
            s.errors += 1;
            return;
        }
        let expected = s.next[from];
        if seq < expected {
            s.complain(format_args!("from worker {from}: expected {expected}, got {seq} (duplicate/reordered)"));
            s.errors += 1;
        } else if seq > expected {
            // A gap: acceptable only if a `lost` notice accounts for it (checked at the end).
            s.complain(format_args!("from worker {from}: expected {expected}, got {seq} (gap)"));
        }
        s.received[from] += 1;
        s.next[from] = seq + 1;
        if from as u32 != s.me {
            let ns = now.saturating_sub(sent);
            s.latency[(64 - ns.leading_zeros() as usize).min(63)] += 1;
            s.latency_max = s.latency_max.max(ns);
        }
    });
    let st = state.clone();
    w.subscribe("soak", "unique", move |ev| {
        let mut s = st.lock().unwrap();
        let (Some(Wid::Worker(p)), Some(idx)) = (ev.wid(), le_u64(ev.data_bytes())) else {
            s.errors += 1;
            return;
        };
        let p = p as usize;
        if p >= s.unique_next.len() || idx < s.unique_next[p] {
            s.complain(format_args!("unique event {idx} from worker {p} out of order"));
            s.errors += 1;
            return;
        }
        s.unique_next[p] = idx + 1;
        s.unique_received[p] += 1;
    });
    let st = state.clone();
    w.subscribe("soak", "done", move |ev| {
        let mut s = st.lock().unwrap();
        match (ev.wid(), le_u64(ev.data_bytes())) {
            (Some(Wid::Worker(p)), Some(count)) if (p as usize) < s.done.len() => s.done[p as usize] = Some(count),
            _ => s.errors += 1,
        }
    });
    for (name, field) in [("hello", 0), ("drained", 1), ("bye", 2)] {
        let st = state.clone();
        w.subscribe("soak", name, move |ev| {
            let mut s = st.lock().unwrap();
            match ev.wid() {
                Some(Wid::Worker(p)) if (p as usize) < s.hello.len() => {
                    let v = match field {
                        0 => &mut s.hello,
                        1 => &mut s.drained,
                        _ => &mut s.bye,
                    };
                    v[p as usize] = true;
                }
                _ => s.errors += 1,
            }
        });
    }
    let st = state.clone();
    w.subscribe(SYSTEM_SOURCE, "lost", move |ev| {
        let mut s = st.lock().unwrap();
        match ev.lost() {
            Some(l) => {
                s.complain(format_args!("lost notice: {} events from {}", l.count, l.publisher));
                match l.publisher {
                    Wid::Worker(p) if (p as usize) < s.lost.len() => s.lost[p as usize] += l.count,
                    _ => s.errors += 1,
                }
            }
            None => s.errors += 1,
        }
    });
}

fn publish_retry(w: &mut Worker, event: &str, data: &[u8]) -> Result<(), String> {
    loop {
        match w.publish_bytes(Target::All, "soak", event, data) {
            Ok(()) => return Ok(()),
            Err(PublishError::QueueOverflow) => {
                w.dispatch().map_err(|e| e.to_string())?;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn serve_until(w: &mut Worker, limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        w.wait(Some(Duration::from_millis(20))).map_err(|e| e.to_string())?;
    }
    Ok(())
}
