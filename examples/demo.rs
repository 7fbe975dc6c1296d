//! `cargo run --release --example demo [WORKERS] [EVENTS_PER_SEC_PER_WORKER]`
//!
//! Starts WORKERS worker processes (default 4) by re-executing this binary, each one a
//! `worker-events` worker sharing a control socket in a fresh temporary directory. For about
//! two seconds every worker publishes `Target::All` events carrying a sequence number and a
//! `CLOCK_MONOTONIC` send timestamp (default 20,000 events/s per worker), while dispatching
//! everything the others send. Each worker then checks that it received every publisher's
//! sequence exactly once and in order, and reports counts, events/s and the publish ->
//! callback latency percentiles of the events that crossed a process boundary. The parent
//! prints one row per worker and exits non-zero if any worker failed or saw an event lost,
//! duplicated or out of order.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use worker_events::{Events, Options, PublishError, SYSTEM_SOURCE, Target, Transport, Wid, Worker};
use worker_events_dev_support::{TempDir, monotonic_ns, percentile, process, sort};

const WID_ENV: &str = "WE_DEMO_WID";
const DIR_ENV: &str = "WE_DEMO_DIR";
const WORKERS_ENV: &str = "WE_DEMO_WORKERS";
const RATE_ENV: &str = "WE_DEMO_RATE";
const TRANSPORT_ENV: &str = "WE_DEMO_TRANSPORT";

/// How long the workers stream events.
const STREAM_FOR: Duration = Duration::from_secs(2);
/// The parent kills whatever is still running after this.
const DEADLINE: Duration = Duration::from_secs(13);

/// The event every worker streams.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Tick {
    seq: u64,
    sent_ns: u64,
    from: u32,
}

fn main() -> ExitCode {
    if let Ok(wid) = std::env::var(WID_ENV) {
        return match worker_main(wid.parse().expect("WE_DEMO_WID")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker {wid}: FAILED: {e}");
                ExitCode::FAILURE
            }
        };
    }
    parent_main()
}

// ---------------------------------------------------------------------------------------
// Parent: start the workers, collect their reports, print the table.

fn parent_main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let workers: u32 = match args.next().map(|a| a.parse()) {
        None => 4,
        Some(Ok(n)) if (1..=worker_events::MAX_WORKERS).contains(&n) => n,
        Some(_) => {
            eprintln!(
                "usage: demo [WORKERS 1..={}] [EVENTS_PER_SEC_PER_WORKER] [auto|shm|socket]",
                worker_events::MAX_WORKERS
            );
            return ExitCode::from(2);
        }
    };
    let rate: u64 = match args.next().map(|a| a.parse()) {
        None => 20_000,
        Some(Ok(r)) if r > 0 => r,
        Some(_) => {
            eprintln!("EVENTS_PER_SEC_PER_WORKER must be a positive integer");
            return ExitCode::from(2);
        }
    };
    let transport = match args.next().as_deref() {
        None | Some("auto") => "auto",
        Some("shm") => "shm",
        Some("socket") => "socket",
        Some(t) => {
            eprintln!("unknown transport {t:?}: auto, shm or socket");
            return ExitCode::from(2);
        }
    };
    let dir = match TempDir::try_new("demo") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "worker-events demo: {workers} worker processes, {rate} events/s each for {:?}, transport {transport}, \
         control socket {}",
        STREAM_FOR,
        dir.join("events.sock").display()
    );
    let ok = run(dir.path(), workers, rate, transport);
    drop(dir);
    if ok {
        println!("OK: every worker received every event exactly once, in order");
        ExitCode::SUCCESS
    } else {
        println!("FAILED");
        ExitCode::FAILURE
    }
}

fn run(dir: &Path, workers: u32, rate: u64, transport: &str) -> bool {
    let mut children: Vec<(u32, Child)> = Vec::new();
    for i in 0..workers {
        // This binary again, in the worker role (it dies with us: `die_with_parent`).
        let spawned = process::reexec().and_then(|mut cmd| {
            cmd.env(WID_ENV, i.to_string())
                .env(DIR_ENV, dir)
                .env(WORKERS_ENV, workers.to_string())
                .env(RATE_ENV, rate.to_string())
                .env(TRANSPORT_ENV, transport)
                .stdout(Stdio::piped())
                .spawn()
        });
        match spawned {
            Ok(c) => children.push((i, c)),
            Err(e) => {
                eprintln!("spawning worker {i}: {e}");
                kill_all(&mut children);
                return false;
            }
        }
    }

    // Wait for all of them, killing the rest at the deadline.
    let deadline = Instant::now() + DEADLINE;
    let mut status = vec![None; children.len()];
    while status.iter().any(Option::is_none) {
        for (k, (_, child)) in children.iter_mut().enumerate() {
            if status[k].is_none() {
                if let Ok(Some(st)) = child.try_wait() {
                    status[k] = Some(st.success());
                }
            }
        }
        if Instant::now() >= deadline {
            eprintln!("deadline of {DEADLINE:?} passed: killing the remaining workers");
            for (k, (_, child)) in children.iter_mut().enumerate() {
                if status[k].is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                    status[k] = Some(false);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut ok = true;
    let mut reported_losses = false;
    println!();
    println!(
        "{:>6} {:>9} {:>10} {:>10} {:>11} {:>8} {:>8} {:>8} {:>9} {:>5} {:>6} {:>8}",
        "worker",
        "published",
        "delivered",
        "remote",
        "events/s",
        "p50",
        "p90",
        "p99",
        "max",
        "lost",
        "errors",
        "status"
    );
    for (k, (i, child)) in children.iter_mut().enumerate() {
        let mut out = String::new();
        if let Some(mut so) = child.stdout.take() {
            let _ = so.read_to_string(&mut out);
        }
        let report = out.lines().find_map(|l| l.strip_prefix("REPORT ")).map(parse_report);
        let exited_ok = status[k] == Some(true);
        match report {
            Some(r) => {
                let clean = exited_ok && r.get("missing") == 0 && r.get("errors") == 0;
                ok &= clean;
                reported_losses |= r.get("missing") > 0 && r.get("errors") == 0;
                println!(
                    "{:>6} {:>9} {:>10} {:>10} {:>11} {:>8} {:>8} {:>8} {:>9} {:>5} {:>6} {:>8}",
                    i,
                    r.get("published"),
                    r.get("delivered"),
                    r.get("remote"),
                    r.get("per_sec"),
                    fmt_ns(r.get("p50")),
                    fmt_ns(r.get("p90")),
                    fmt_ns(r.get("p99")),
                    fmt_ns(r.get("max")),
                    r.get("missing"),
                    r.get("errors"),
                    if clean { "ok" } else { "FAILED" }
                );
            }
            None => {
                ok = false;
                println!("{i:>6} {:>100}", "no report: FAILED");
            }
        }
    }
    println!("(p50..max: publish -> callback latency of events from other processes, CLOCK_MONOTONIC;");
    println!(" lost: events never delivered; errors: duplicates, reordering, or losses no `lost` notice reported)");
    if reported_losses {
        println!("events were lost (queues overflowed), each loss reported to its receiver by a `lost` notice");
    }
    ok
}

fn kill_all(children: &mut [(u32, Child)]) {
    for (_, c) in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

struct Report(Vec<(String, u64)>);

impl Report {
    fn get(&self, key: &str) -> u64 {
        self.0.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
    }
}

fn parse_report(line: &str) -> Report {
    Report(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect(),
    )
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

/// What the callbacks record; shared with them through an `Arc<Mutex<_>>` because
/// callbacks must be `Send + 'static` (the lock is never contended: one thread).
struct State {
    me: u32,
    /// Per publisher: the next sequence number expected.
    next: Vec<u64>,
    /// Per publisher: events received.
    received: Vec<u64>,
    /// Per publisher: events reported lost through `("worker-events", "lost")` notices.
    lost: Vec<u64>,
    /// Per publisher: its final count, once its `done` arrived.
    done: Vec<Option<u64>>,
    hello: Vec<bool>,
    bye: Vec<bool>,
    /// Duplicates, reordering, undecodable events, unreported losses.
    errors: u64,
    /// Diagnostics printed so far (capped).
    said: u32,
    delivered: u64,
    remote: u64,
    latencies: Vec<u64>,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

impl State {
    fn complain(&mut self, msg: std::fmt::Arguments<'_>) {
        self.said += 1;
        if self.said <= 5 {
            eprintln!("worker {}: {msg}", self.me);
        } else if self.said == 6 {
            eprintln!("worker {}: (further messages suppressed)", self.me);
        }
    }
}

fn worker_main(me: u32) -> Result<(), String> {
    // Die with the parent, whatever happens to it.
    process::die_with_parent().map_err(|e| format!("the parent is gone ({e})"))?;
    let env = |k: &str| std::env::var(k).map_err(|_| format!("{k} missing"));
    let dir = PathBuf::from(env(DIR_ENV)?);
    let workers: u32 = env(WORKERS_ENV)?.parse().map_err(|_| "bad WE_DEMO_WORKERS")?;
    let rate: u64 = env(RATE_ENV)?.parse().map_err(|_| "bad WE_DEMO_RATE")?;
    let n = workers as usize;

    // In a real server `Events::new` runs once in the master before fork(); here each
    // re-executed worker builds the same options.
    let transport = match env(TRANSPORT_ENV)?.as_str() {
        "shm" => Transport::SharedMemory,
        "socket" => Transport::Socket,
        _ => Transport::Auto,
    };
    let opts = Options::new(dir.join("events.sock")).workers(workers).transport(transport);
    let events = Events::new(opts).map_err(|e| e.to_string())?;
    let mut w = events.init_worker(Wid::Worker(me)).map_err(|e| e.to_string())?;

    let state = Arc::new(Mutex::new(State {
        me,
        next: vec![0; n],
        received: vec![0; n],
        lost: vec![0; n],
        done: vec![None; n],
        hello: vec![false; n],
        bye: vec![false; n],
        errors: 0,
        said: 0,
        delivered: 0,
        remote: 0,
        latencies: Vec::with_capacity((rate as usize * 3 * n).min(1 << 24)),
        first_at: None,
        last_at: None,
    }));
    subscribe_all(&mut w, &state);

    if !w.wait_ready(Duration::from_secs(5)).map_err(|e| e.to_string())? {
        return Err("not attached to a broker within 5 s".into());
    }
    // Start together: everyone says hello and waits for everyone's hello.
    publish_retry(&mut w, "hello", &0u64)?;
    serve_until(&mut w, Duration::from_secs(8), "hellos", || state.lock().unwrap().hello.iter().all(|h| *h))?;

    // Stream for STREAM_FOR at up to `rate` events/s, catching up after every wake-up.
    // Flow control: `publish` only fails when our own queue is full; a receiver that falls
    // behind makes our private backlog for it grow, and past `max_queue_len` it would lose
    // events (and be told). So, like a careful user, pause while a backlog is half full.
    let backlog_limit = events.options().get_max_queue_len() as u64 / 2;
    let start = Instant::now();
    let mut seq = 0u64;
    let mut throttled = 0u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= STREAM_FOR {
            break;
        }
        let due = (rate as u128 * elapsed.as_nanos() / 1_000_000_000) as u64 + 1;
        let mut paused = false;
        while seq < due {
            // (On the socket transport the queues are the frames waiting for a socket.)
            let socket = w.transport() == Transport::Socket;
            let queued = |p: &worker_events::PeerStats| if socket { p.outbound_depth } else { p.backlog };
            if seq % 64 == 0 && w.stats().peers.iter().any(|p| queued(p) >= backlog_limit) {
                throttled += 1;
                paused = true;
                break;
            }
            let t = Tick { seq, sent_ns: monotonic_ns(), from: me };
            match w.publish(Target::All, "demo", "tick", &t) {
                Ok(()) => seq += 1,
                // Our own queue is full: run the callbacks, then retry.
                Err(PublishError::QueueOverflow) => {
                    w.dispatch().map_err(|e| e.to_string())?;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        let next_due = Duration::from_nanos(((due as u128 * 1_000_000_000).div_ceil(rate as u128)) as u64);
        let left = STREAM_FOR.saturating_sub(start.elapsed());
        let nap = if paused { Duration::from_micros(200) } else { next_due.saturating_sub(start.elapsed()) };
        w.wait(Some(nap.min(left))).map_err(|e| e.to_string())?;
    }
    let published = seq;
    publish_retry(&mut w, "done", &published)?;

    // Per-publisher order means a publisher's `done` arrives after all its ticks.
    serve_until(&mut w, Duration::from_secs(8), "every publisher's events", || {
        let s = state.lock().unwrap();
        s.done.iter().all(Option::is_some)
    })?;
    // Linger until everyone is done too, so the broker outlives the others' checks.
    publish_retry(&mut w, "bye", &0u64)?;
    serve_until(&mut w, Duration::from_secs(8), "byes", || state.lock().unwrap().bye.iter().all(|b| *b))?;

    let stats = w.stats();
    let mut s = state.lock().unwrap();
    // `done` is delivered after everything its publisher sent before it (per-publisher
    // order), so whatever is missing now is missing for good: it must have been reported.
    let mut missing = 0;
    for p in 0..n {
        let published_p = s.done[p].unwrap_or(0);
        let miss = published_p.saturating_sub(s.received[p]);
        missing += miss;
        if miss != s.lost[p] {
            let lost_p = s.lost[p];
            s.complain(format_args!("from worker {p}: {miss} events missing, {lost_p} reported lost"));
            s.errors += 1;
        }
    }
    sort(&mut s.latencies);
    let pct = |q: f64| percentile(&s.latencies, q).unwrap_or(0);
    let secs = match (s.first_at, s.last_at) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => f64::NAN,
    };
    println!(
        "REPORT published={published} delivered={} remote={} per_sec={} p50={} p90={} p99={} max={} missing={missing} \
         lost={} errors={} throttled={throttled} wakeups_sent={} wakeups_received={}",
        s.delivered,
        s.remote,
        (s.delivered as f64 / secs) as u64,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        s.latencies.last().copied().unwrap_or(0),
        stats.lost,
        s.errors + stats.dropped + stats.callback_panics,
        stats.wakeups_sent,
        stats.wakeups_received,
    );
    drop(s);
    drop(w);
    Ok(())
}

fn subscribe_all(w: &mut Worker, state: &Arc<Mutex<State>>) {
    let st = state.clone();
    w.subscribe("demo", "tick", move |ev| {
        let now = monotonic_ns();
        let mut s = st.lock().unwrap();
        let tick = match ev.data::<Tick>() {
            Ok(t) => t,
            Err(_) => {
                s.errors += 1;
                return;
            }
        };
        let (from, seq) = (tick.from.to_native() as usize, tick.seq.to_native());
        if ev.wid() != Some(Wid::Worker(from as u32)) || from >= s.next.len() {
            s.errors += 1;
            return;
        }
        if seq < s.next[from] {
            // A repeat or a reordering: never acceptable.
            let expected = s.next[from];
            s.complain(format_args!("from worker {from}: expected seq {expected}, got {seq} (duplicate/reordered)"));
            s.errors += 1;
        } else if seq > s.next[from] {
            // A gap: acceptable only if a `lost` notice accounts for it (checked at the end).
            let expected = s.next[from];
            s.complain(format_args!("from worker {from}: expected seq {expected}, got {seq} (gap)"));
        }
        s.received[from] += 1;
        s.next[from] = seq + 1;
        s.delivered += 1;
        let at = Instant::now();
        s.first_at.get_or_insert(at);
        s.last_at = Some(at);
        if from as u32 != s.me {
            s.remote += 1;
            s.latencies.push(now.saturating_sub(tick.sent_ns.to_native()));
        }
    });
    let st = state.clone();
    w.subscribe("demo", "hello", move |ev| mark(&st, ev.wid(), |s| &mut s.hello));
    let st = state.clone();
    w.subscribe("demo", "bye", move |ev| mark(&st, ev.wid(), |s| &mut s.bye));
    let st = state.clone();
    w.subscribe("demo", "done", move |ev| {
        let mut s = st.lock().unwrap();
        match (ev.wid(), ev.deserialize::<u64>()) {
            (Some(Wid::Worker(p)), Ok(count)) if (p as usize) < s.done.len() => s.done[p as usize] = Some(count),
            _ => s.errors += 1,
        }
    });
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

fn mark(state: &Mutex<State>, wid: Option<Wid>, field: impl Fn(&mut State) -> &mut Vec<bool>) {
    let mut s = state.lock().unwrap();
    match wid {
        Some(Wid::Worker(p)) if (p as usize) < s.hello.len() => field(&mut s)[p as usize] = true,
        _ => s.errors += 1,
    }
}

fn publish_retry(w: &mut Worker, event: &str, value: &u64) -> Result<(), String> {
    loop {
        match w.publish(Target::All, "demo", event, value) {
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
