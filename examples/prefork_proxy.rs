//! A prefork HTTP cache on hyper 1.x and tokio, its workers kept in sync by `worker-events`:
//!
//! ```text
//! cargo run --release --features "tokio metrics" --example prefork_proxy -- --workers 4 --listen 127.0.0.1:8080
//! ```
//!
//! **Processes.** The master binds the listening sockets (one per worker, all on the same
//! address with `SO_REUSEPORT`, so the kernel spreads new connections over the workers and a
//! worker's queued connections wait for its successor while it restarts; `--listen
//! 127.0.0.1:0` picks a free port), then forks one process per worker. The master is
//! single-threaded and creates no `Worker` (only the validated [`Events`]), so `fork()` is
//! safe; each child builds its own current-thread tokio runtime and calls
//! [`Events::init_worker`] after the fork. The master prints `listening on ADDR with N workers`
//! once every worker has attached and reported ready on a pipe. SIGTERM (or SIGINT) to the
//! master: every worker stops accepting, closes its `Worker` (`Worker::close`, flushing what
//! it published) and exits; the master exits 0 once they are gone. A worker that dies
//! (SIGKILL) is forked again by the master with the same worker id.
//!
//! **HTTP.** Every response carries `x-worker: <i>`.
//! - `GET /cache/{key}`: 200 and the value, or 404.
//! - `PUT /cache/{key}` (body = value): applied locally and published to all workers; 204.
//! - `DELETE /cache/{key}`: a purge, applied locally and published to all workers; 204.
//! - `POST /refresh/{key}`: a unique event (hash = key): exactly one worker counts a refresh
//!   per key within `unique_timeout` (5 s); 202.
//! - `GET /stats`: JSON with the worker index, its pid, its refresh count, its cache size and
//!   its `Stats`.
//! - `GET /metrics`: Prometheus text of the worker's `Stats` counters (labels `worker`, and
//!   `peer` for the per-peer queue gauges).
//!
//! **Consistency.** Each cache entry carries a stamp (a hybrid clock: wall-clock nanoseconds,
//! but always above every stamp the worker has seen) and the index of the worker that wrote
//! it; a purge is kept as a tombstone. Every worker keeps, per key, the entry with the highest
//! `(stamp, writer)`: applying an update twice, late, or out of order across publishers gives
//! the same state, so the order in which a worker hears of updates does not matter.
//!
//! **Catch-up of a restarted worker.** The cache lives in the worker's memory and dies with
//! it; the event bus replays nothing that was delivered before (at best, events published to
//! the slot while it was down still wait in its rings). So a worker forked again after a
//! crash starts empty and asks for a snapshot: it publishes `hello` to all workers, every other worker answers with its
//! whole cache (tombstones included) in `snapshot` events addressed to it, and it merges them
//! (the merge above makes answers from several workers, and updates racing with them, safe).
//! It starts accepting connections only after one complete snapshot has arrived (or after 3 s
//! if no worker answers, for example when it is the only one), so it never serves a stale or
//! missing entry that another worker had. A worker told through a `lost` notice that it
//! missed events asks for a snapshot again the same way. Workers of the first start skip
//! this: they all start empty together.
//!
//! Hidden option for `scripts/load.sh`: `--stream-rate R` makes worker 0 publish R cache
//! updates per second (keys `stream-0`..`stream-1023`, changing values) to all workers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{self, SigHandler, SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use tokio::sync::{mpsc, oneshot};
use worker_events::tokio::AsyncWorker;
use worker_events::{Context, Error, Event, Events, Options, PublishError, Stats, Target, Wid, Worker};

type BoxError = Box<dyn StdError + Send + Sync>;

/// The events of this application.
const SOURCE: &str = "proxy";
/// Largest snapshot chunk (entries are never split; the default payload limit is 64 KiB).
const CHUNK: usize = 32 * 1024;

struct Args {
    workers: u32,
    listen: SocketAddr,
    socket: Option<PathBuf>,
    stream_rate: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workers: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
        listen: "127.0.0.1:8080".parse().unwrap(),
        socket: None,
        stream_rate: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--workers" => args.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?,
            "--listen" => args.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--socket" => args.socket = Some(value()?.into()),
            "--stream-rate" => args.stream_rate = value()?.parse().map_err(|e| format!("--stream-rate: {e}"))?,
            _ => {
                return Err(format!(
                    "unknown argument {a}\nusage: prefork_proxy [--workers N] [--listen ADDR] [--socket PATH]"
                ));
            }
        }
    }
    if args.workers == 0 || args.workers > worker_events::MAX_WORKERS {
        return Err(format!("--workers must be 1..={}", worker_events::MAX_WORKERS));
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = master(args) {
        eprintln!("master: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// The master
// ---------------------------------------------------------------------------------------

/// `n` listening sockets on one address (`SO_REUSEPORT`); port 0 picks one free port for all.
fn bind_listeners(addr: SocketAddr, n: u32) -> Result<(Vec<StdTcpListener>, SocketAddr), BoxError> {
    use socket2::{Domain, Socket, Type};
    let mut out = Vec::new();
    let mut addr = addr;
    for _ in 0..n {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?; // CLOEXEC
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        sock.bind(&addr.into())?;
        sock.listen(1024)?;
        let l = StdTcpListener::from(sock);
        addr = l.local_addr()?; // the port picked for the first one, for the others
        out.push(l);
    }
    Ok((out, addr))
}

fn master(args: Args) -> Result<(), BoxError> {
    let (listeners, addr) = bind_listeners(args.listen, args.workers)?;
    let (dir, own_dir) = match &args.socket {
        Some(p) => (p.parent().map(PathBuf::from).unwrap_or_default(), false),
        None => (std::env::temp_dir().join(format!("prefork-proxy-{}", std::process::id())), true),
    };
    std::fs::create_dir_all(&dir)?;
    let sock = args.socket.clone().unwrap_or_else(|| dir.join("events.sock"));
    let events = Events::new(Options::new(&sock).workers(args.workers))?;

    // Signals are taken synchronously (sigwait); children unblock them for tokio.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        mask.add(s);
    }
    mask.thread_block()?;
    let (ready_r, ready_w) = nix::unistd::pipe()?;
    let spawn = |i: u32, restarted: bool| -> Result<Pid, BoxError> {
        std::io::stdout().flush()?;
        // SAFETY: the master is single-threaded (no runtime, no Worker, no thread was ever
        // started in it), so the child's copy of the process is consistent; the child only
        // returns through `std::process::exit`.
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Parent { child } => Ok(child),
            ForkResult::Child => {
                let code = match child(i, restarted, &events, &listeners, &ready_w, args.stream_rate) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("worker {i}: {e}");
                        1
                    }
                };
                std::process::exit(code);
            }
        }
    };

    let mut children: HashMap<Pid, (u32, Instant)> = HashMap::new();
    for i in 0..args.workers {
        children.insert(spawn(i, false)?, (i, Instant::now()));
    }
    // Every worker writes one byte once attached and listening.
    let mut ready = 0;
    let mut reader = std::fs::File::from(ready_r);
    let mut buf = [0u8; 64];
    while ready < args.workers {
        match reader.read(&mut buf)? {
            0 => return Err("the workers' ready pipe closed".into()),
            n => ready += n as u32,
        }
    }
    println!("listening on {addr} with {} workers", args.workers);
    std::io::stdout().flush()?;

    // Until SIGTERM or SIGINT: reap and restart dead workers.
    while mask.wait()? == Signal::SIGCHLD {
        loop {
            let (pid, how) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, format!("exited with {code}")),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, format!("killed by {sig}")),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            };
            let Some((i, started)) = children.remove(&pid) else { continue };
            eprintln!("master: worker {i} (pid {pid}) {how}; restarting it");
            if started.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_secs(1)); // a crash loop: slow it down
            }
            children.insert(spawn(i, true)?, (i, Instant::now()));
        }
    }

    eprintln!("master: stopping {} workers", children.len());
    for pid in children.keys() {
        let _ = signal::kill(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !children.is_empty() {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => {
                children.remove(&pid);
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break,
        }
        if Instant::now() > deadline {
            for pid in children.keys() {
                let _ = signal::kill(*pid, Signal::SIGKILL);
            }
        }
    }
    let _ = events.remove_files();
    if own_dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A worker process
// ---------------------------------------------------------------------------------------

fn child(
    i: u32,
    restarted: bool,
    events: &Events,
    listeners: &[StdTcpListener],
    ready_w: &OwnedFd,
    stream_rate: u64,
) -> Result<(), BoxError> {
    // SAFETY: ignoring SIGINT installs no handler code; the master relays a Ctrl-C as SIGTERM.
    unsafe { signal::signal(Signal::SIGINT, SigHandler::SigIgn) }?;
    let listener = listeners[i as usize].try_clone()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(worker_main(i, restarted, events, listener, ready_w, stream_rate))
}

/// One cache entry: the value (`None`: purged) and its `(stamp, writer)` version.
#[derive(Clone)]
struct Entry {
    stamp: u64,
    writer: u32,
    value: Option<Bytes>,
}

#[derive(Default)]
struct Cache {
    map: HashMap<String, Entry>,
    /// The hybrid clock: above every stamp seen.
    clock: u64,
    refreshes: u64,
    /// Complete snapshots received (catch-up).
    snapshots: u64,
}

impl Cache {
    fn stamp(&mut self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        self.clock = now.max(self.clock + 1);
        self.clock
    }

    /// Keep the newer of what we have and `e` (last writer wins, ties by writer).
    fn merge(&mut self, key: &str, e: Entry) {
        self.clock = self.clock.max(e.stamp);
        match self.map.get_mut(key) {
            Some(old) if (old.stamp, old.writer) >= (e.stamp, e.writer) => {}
            Some(old) => *old = e,
            None => {
                self.map.insert(key.to_owned(), e);
            }
        }
    }

    fn get(&self, key: &str) -> Option<Bytes> {
        self.map.get(key).and_then(|e| e.value.clone())
    }

    fn live_len(&self) -> usize {
        self.map.values().filter(|e| e.value.is_some()).count()
    }
}

fn lock(c: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

// Wire format of an entry: stamp u64, writer u32, has_value u8, key len u32, key,
// [value len u32, value]; all little-endian.
fn encode_entry(out: &mut Vec<u8>, key: &str, e: &Entry) {
    out.extend_from_slice(&e.stamp.to_le_bytes());
    out.extend_from_slice(&e.writer.to_le_bytes());
    out.push(e.value.is_some() as u8);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    if let Some(v) = &e.value {
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Some(h)
}

fn take_u32(b: &mut &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?))
}

fn decode_entry(b: &mut &[u8]) -> Option<(String, Entry)> {
    let stamp = u64::from_le_bytes(take(b, 8)?.try_into().ok()?);
    let writer = take_u32(b)?;
    let has = take(b, 1)?[0] != 0;
    let klen = take_u32(b)? as usize;
    let key = String::from_utf8(take(b, klen)?.to_vec()).ok()?;
    let value = if has {
        let vlen = take_u32(b)? as usize;
        Some(Bytes::copy_from_slice(take(b, vlen)?))
    } else {
        None
    };
    Some((key, Entry { stamp, writer, value }))
}

/// Answer `hello` from `to`: our whole cache in chunks, the last one flagged.
fn send_snapshot(cx: &mut Context, cache: &Cache, to: u32) {
    let start = |last: bool| {
        let mut b = to.to_le_bytes().to_vec();
        b.push(last as u8);
        b
    };
    let mut buf = start(false);
    for (k, e) in &cache.map {
        if buf.len() > CHUNK {
            if let Err(e) = cx.publish_bytes(Target::All, SOURCE, "snapshot", &buf) {
                eprintln!("worker {:?}: snapshot chunk: {e}", cx.wid());
            }
            buf = start(false);
        }
        encode_entry(&mut buf, k, e);
    }
    buf[4] = 1;
    if let Err(e) = cx.publish_bytes(Target::All, SOURCE, "snapshot", &buf) {
        eprintln!("worker {:?}: snapshot: {e}", cx.wid());
    }
}

fn subscribe(w: &mut Worker, i: u32, cache: &Arc<Mutex<Cache>>) {
    for ev in ["set", "purge"] {
        let c = cache.clone();
        w.subscribe(SOURCE, ev, move |ev: &Event<'_>| {
            let mut b = ev.data_bytes();
            if let Some((k, e)) = decode_entry(&mut b) {
                lock(&c).merge(&k, e);
            }
        });
    }
    let c = cache.clone();
    w.subscribe(SOURCE, "refresh", move |_| lock(&c).refreshes += 1);
    let c = cache.clone();
    w.subscribe_with(SOURCE, "hello", move |cx, ev| {
        let mut b = ev.data_bytes();
        match take_u32(&mut b) {
            Some(from) if from != i => send_snapshot(cx, &lock(&c), from),
            _ => {}
        }
    });
    let c = cache.clone();
    w.subscribe(SOURCE, "snapshot", move |ev| {
        let mut b = ev.data_bytes();
        if take_u32(&mut b) != Some(i) {
            return;
        }
        let Some(&[last]) = take(&mut b, 1) else { return };
        let mut cache = lock(&c);
        while let Some((k, e)) = decode_entry(&mut b) {
            cache.merge(&k, e);
        }
        if last != 0 {
            cache.snapshots += 1;
        }
    });
    // Events we missed (a peer's queue to us overflowed, a publisher crashed mid-write):
    // ask for a snapshot again.
    w.subscribe_with(worker_events::SYSTEM_SOURCE, "lost", move |cx, ev| {
        eprintln!("worker {i}: lost {:?}; asking for a snapshot", ev.lost());
        let _ = cx.publish_bytes(Target::All, SOURCE, "hello", &i.to_le_bytes());
    });
}

/// What request handlers ask of the task that owns the worker.
enum Cmd {
    Put { key: String, value: Option<Bytes>, reply: oneshot::Sender<Result<(), PublishError>> },
    Refresh { key: String, reply: oneshot::Sender<Result<(), PublishError>> },
    Stats { reply: oneshot::Sender<Stats> },
}

/// Publish, dispatching our own queue if it is full (bounded retries).
async fn publish(aw: &mut AsyncWorker, target: Target<'_>, event: &str, data: &[u8]) -> Result<(), PublishError> {
    for _ in 0..1000 {
        match aw.worker_mut().publish_bytes(target, SOURCE, event, data) {
            Err(PublishError::QueueOverflow) => {
                let _ = aw.worker_mut().dispatch();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            r => return r,
        }
    }
    Err(PublishError::QueueOverflow)
}

async fn run_cmd(aw: &mut AsyncWorker, i: u32, cache: &Mutex<Cache>, cmd: Cmd) {
    match cmd {
        Cmd::Put { key, value, reply } => {
            let purge = value.is_none();
            let e = Entry { stamp: lock(cache).stamp(), writer: i, value };
            let mut buf = Vec::with_capacity(32 + key.len());
            encode_entry(&mut buf, &key, &e);
            let r = publish(aw, Target::All, if purge { "purge" } else { "set" }, &buf).await;
            if r.is_ok() {
                // Applied here at once (our own copy, delivered later, changes nothing).
                lock(cache).merge(&key, e);
            }
            let _ = reply.send(r);
        }
        Cmd::Refresh { key, reply } => {
            let _ = reply.send(publish(aw, Target::Unique(&key), "refresh", key.as_bytes()).await);
        }
        Cmd::Stats { reply } => {
            let _ = reply.send(aw.worker().stats());
        }
    }
}

async fn worker_main(
    i: u32,
    restarted: bool,
    events: &Events,
    listener: StdTcpListener,
    ready_w: &OwnedFd,
    stream_rate: u64,
) -> Result<(), BoxError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    SigSet::all().thread_unblock()?; // the master's mask: SIGTERM now reaches tokio

    // Our predecessor's lock goes with its process; a few retries cover a slow exit.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut w = loop {
        match events.init_worker(Wid::Worker(i)) {
            Err(Error::WidInUse(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => break r?,
        }
    };
    let cache = Arc::new(Mutex::new(Cache::default()));
    subscribe(&mut w, i, &cache);
    if !w.wait_ready(Duration::from_secs(10))? {
        return Err("not attached after 10 s".into());
    }
    let mut aw = AsyncWorker::new(w)?;
    if restarted && events.options().get_workers() > 1 {
        publish(&mut aw, Target::All, "hello", &i.to_le_bytes()).await?;
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while lock(&cache).snapshots == 0 {
            tokio::select! {
                r = aw.dispatch() => { r?; }
                _ = tokio::time::sleep_until(until) => {
                    eprintln!("worker {i}: no snapshot after 3 s; starting with what we have");
                    break;
                }
            }
        }
        eprintln!("worker {i}: restarted, caught up with {} entries", lock(&cache).live_len());
    }

    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    nix::unistd::write(ready_w, &[1])?;

    let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
    // One recorder per worker process, installed after the fork.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| std::io::Error::other(format!("installing the Prometheus recorder: {e}")))?;
    worker_events::metrics::describe();
    let shared = Arc::new(Shared { i, pid: std::process::id(), cache: cache.clone(), tx, prometheus });
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let stream = stream_rate > 0 && i == 0;
    let (stream_start, mut streamed) = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            r = aw.dispatch() => { r?; }
            Some(cmd) = rx.recv() => run_cmd(&mut aw, i, &cache, cmd).await,
            acc = listener.accept() => match acc {
                Ok((tcp, _)) => {
                    let sh = shared.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| handle(sh.clone(), req));
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                    });
                }
                Err(e) => eprintln!("worker {i}: accept: {e}"),
            },
            _ = tick.tick(), if stream => {
                let due = (stream_start.elapsed().as_secs_f64() * stream_rate as f64) as u64;
                let mut buf = Vec::new();
                while streamed < due.min(streamed + stream_rate / 100 + 1) {
                    let key = format!("stream-{}", streamed % 1024);
                    let e = Entry { stamp: lock(&cache).stamp(), writer: i, value: Some(Bytes::from(streamed.to_string())) };
                    buf.clear();
                    encode_entry(&mut buf, &key, &e);
                    if publish(&mut aw, Target::All, "set", &buf).await.is_err() {
                        break;
                    }
                    lock(&cache).merge(&key, e);
                    streamed += 1;
                }
                if streamed < due {
                    streamed = due; // behind: skip rather than burst
                }
            }
            _ = term.recv() => break,
        }
    }
    drop(listener);
    let w = aw.into_inner();
    w.close(Duration::from_secs(2))?;
    Ok(())
}

struct Shared {
    i: u32,
    pid: u32,
    cache: Arc<Mutex<Cache>>,
    tx: mpsc::UnboundedSender<Cmd>,
    /// This worker process's Prometheus recorder (the library's `metrics` feature records
    /// into it; `/metrics` renders it).
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
}

fn reply(sh: &Shared, status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert("x-worker", sh.i.into());
    r
}

fn publish_status(r: Result<Result<(), PublishError>, oneshot::error::RecvError>, ok: StatusCode) -> StatusCode {
    match r {
        Ok(Ok(())) => ok,
        Ok(Err(PublishError::PayloadTooLarge { .. })) => StatusCode::PAYLOAD_TOO_LARGE,
        Ok(Err(PublishError::InvalidUniqueHash { .. } | PublishError::NameTooLong)) => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn handle(sh: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let key = |prefix: &str| path.strip_prefix(prefix).filter(|k| !k.is_empty()).map(str::to_owned);
    if let Some(key) = key("/cache/") {
        return Ok(match method {
            Method::GET => match lock(&sh.cache).get(&key) {
                Some(v) => reply(&sh, StatusCode::OK, v),
                None => reply(&sh, StatusCode::NOT_FOUND, ""),
            },
            Method::PUT | Method::DELETE => {
                let value = if method == Method::PUT {
                    match req.into_body().collect().await {
                        Ok(b) => Some(b.to_bytes()),
                        Err(_) => return Ok(reply(&sh, StatusCode::BAD_REQUEST, "")),
                    }
                } else {
                    None
                };
                let (tx, rx) = oneshot::channel();
                let _ = sh.tx.send(Cmd::Put { key, value, reply: tx });
                reply(&sh, publish_status(rx.await, StatusCode::NO_CONTENT), "")
            }
            _ => reply(&sh, StatusCode::METHOD_NOT_ALLOWED, ""),
        });
    }
    if let (Some(key), &Method::POST) = (key("/refresh/"), &method) {
        let (tx, rx) = oneshot::channel();
        let _ = sh.tx.send(Cmd::Refresh { key, reply: tx });
        return Ok(reply(&sh, publish_status(rx.await, StatusCode::ACCEPTED), ""));
    }
    if method == Method::GET && (path == "/stats" || path == "/metrics") {
        let (tx, rx) = oneshot::channel();
        let _ = sh.tx.send(Cmd::Stats { reply: tx });
        let Ok(st) = rx.await else { return Ok(reply(&sh, StatusCode::SERVICE_UNAVAILABLE, "")) };
        let (refreshes, entries) = {
            let c = lock(&sh.cache);
            (c.refreshes, c.live_len())
        };
        let mut r = if path == "/stats" {
            reply(&sh, StatusCode::OK, stats_json(&sh, &st, refreshes, entries))
        } else {
            // The library's `metrics` feature records the counters; the recorder renders them.
            worker_events::metrics::export_stats(Wid::Worker(sh.i), &st);
            reply(&sh, StatusCode::OK, sh.prometheus.render())
        };
        let ct = if path == "/stats" { "application/json" } else { "text/plain; version=0.0.4" };
        r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static(ct));
        return Ok(r);
    }
    Ok(reply(&sh, StatusCode::NOT_FOUND, ""))
}

fn peer_label(w: Wid) -> String {
    match w {
        Wid::Worker(n) => n.to_string(),
        Wid::PrivilegedAgent => "agent".into(),
    }
}

/// The worker's counters, by name.
fn counters(st: &Stats) -> [(&'static str, u64); 17] {
    [
        ("published", st.published),
        ("delivered", st.delivered),
        ("callbacks_run", st.callbacks_run),
        ("callback_panics", st.callback_panics),
        ("dropped", st.dropped),
        ("lost", st.lost),
        ("lost_outbound", st.lost_outbound),
        ("overflows", st.overflows),
        ("wakeups_sent", st.wakeups_sent),
        ("wakeups_received", st.wakeups_received),
        ("failovers", st.failovers),
        ("unique_duplicates", st.unique_duplicates),
        ("unique_unrecorded", st.unique_unrecorded),
        ("unique_pending", st.unique_pending),
        ("corrupt_rings", st.corrupt_rings),
        ("peers", st.peers.len() as u64),
        ("outbound_depth", st.peers.iter().map(|p| p.outbound_depth).sum()),
    ]
}

fn stats_json(sh: &Shared, st: &Stats, refreshes: u64, entries: usize) -> String {
    let mut s = format!(
        "{{\"worker\":{},\"pid\":{},\"refreshes\":{refreshes},\"entries\":{entries},\"stats\":{{",
        sh.i, sh.pid
    );
    for (name, v) in counters(st) {
        s.push_str(&format!("\"{name}\":{v},"));
    }
    s.push_str("\"per_peer\":[");
    let peers: Vec<String> = st
        .peers
        .iter()
        .map(|p| {
            format!(
                "{{\"peer\":\"{}\",\"outbound_depth\":{},\"backlog\":{},\"inbound_depth\":{}}}",
                peer_label(p.wid),
                p.outbound_depth,
                p.backlog,
                p.inbound_depth
            )
        })
        .collect();
    s.push_str(&peers.join(","));
    s.push_str("]}}\n");
    s
}
