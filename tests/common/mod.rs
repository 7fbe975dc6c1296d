//! Harness for the multi-process integration tests.
//!
//! The parent (a normal `#[test]`) re-executes the test binary with
//! `--exact child_entry --ignored --nocapture` and `WE_CHILD=1` plus a few `WE_*` variables
//! describing the role. The child joins as one worker, prints `@@READY` once attached, then
//! serves line commands from its stdin, answering with `@@...` lines ending in `@@OK` or
//! `@@ERR <text>`. Lines without the `@@` prefix (libtest's own output) are ignored.
//!
//! No sleeps are used for synchronization: every step waits for an acknowledgement, and
//! every wait is bounded by the test's watchdog deadline.

// Test-harness state (a counter, a flag, a test-owned shared mmap), not the crate's shared-memory
// protocol: the clippy.toml ban on std atomics (which keeps them in src/sync.rs) does not apply.
#![allow(clippy::disallowed_types)]
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use worker_events::{Event, Events, Options, SYSTEM_SOURCE, Target, Transport, Wid, Worker};

/// Every test must finish within this bound (children are SIGKILLed after it).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A child exits by itself after this long, whatever happens (orphan protection).
const CHILD_LIFETIME: Duration = Duration::from_secs(150);

// ------------------------------------------------------------------------------------------
// Shared helpers

/// The byte pattern of a sized payload of `len` bytes (depends on the length too, so a
/// truncated or mixed-up payload does not pass).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64 * 31 + len as u64) % 251) as u8).collect()
}

fn check_pattern(b: &[u8]) -> bool {
    let len = b.len() as u64;
    b.iter().enumerate().all(|(i, &x)| x == ((i as u64 * 31 + len) % 251) as u8)
}

/// "w3", "agent" or "none".
pub fn wid_str(w: Option<Wid>) -> String {
    match w {
        Some(Wid::Worker(n)) => format!("w{n}"),
        Some(Wid::PrivilegedAgent) => "agent".to_string(),
        None => "none".to_string(),
    }
}

/// A fresh directory for one test's socket and lock file, removed on drop.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Keep it short: a unix socket path is limited to 107 bytes.
        let short: String = name.chars().take(24).collect();
        let path = std::env::temp_dir().join(format!("we-mp-{}-{short}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }

    pub fn sock(&self) -> PathBuf {
        self.path.join("ev.sock")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

thread_local! {
    /// The transport of the test running on this thread (see [`per_transport!`]).
    static TRANSPORT: std::cell::Cell<Transport> = const { std::cell::Cell::new(Transport::SharedMemory) };
}

/// The transport the current test runs on.
pub fn transport() -> Transport {
    TRANSPORT.with(|t| t.get())
}

/// Run `test` with `t` as the transport of every [`Cfg`] it builds (and its children).
pub fn run_with(t: Transport, test: fn()) {
    TRANSPORT.with(|c| c.set(t));
    test();
}

/// Turn each listed function into two tests, `shm::<name>` and `socket::<name>`: the whole
/// suite runs on both transports.
#[macro_export]
macro_rules! per_transport {
    ($($name:ident),* $(,)?) => {
        mod shm {
            $( #[test] fn $name() { $crate::common::run_with(worker_events::Transport::SharedMemory, super::$name) } )*
        }
        mod socket {
            $( #[test] fn $name() { $crate::common::run_with(worker_events::Transport::Socket, super::$name) } )*
        }
    };
}

/// The options shared by every process of one test; passed to children through env vars.
#[derive(Clone, Debug)]
pub struct Cfg {
    pub transport: Transport,
    pub sock: PathBuf,
    pub workers: u32,
    pub agent: bool,
    pub max_queue_len: Option<usize>,
    pub max_payload_len: Option<usize>,
    pub ring_capacity: Option<usize>,
    pub unique_timeout_ms: Option<u64>,
    pub unique_capacity: Option<usize>,
}

impl Cfg {
    pub fn new(sock: &Path, workers: u32) -> Cfg {
        Cfg {
            transport: transport(),
            sock: sock.to_path_buf(),
            workers,
            agent: false,
            max_queue_len: None,
            max_payload_len: None,
            ring_capacity: None,
            unique_timeout_ms: None,
            unique_capacity: None,
        }
    }

    pub fn options(&self) -> Options {
        let mut o = Options::new(&self.sock)
            .workers(self.workers)
            .enable_privileged_agent(self.agent)
            .transport(self.transport);
        if let Some(n) = self.max_queue_len {
            o = o.max_queue_len(n);
        }
        if let Some(n) = self.max_payload_len {
            o = o.max_payload_len(n);
        }
        if let Some(n) = self.ring_capacity {
            o = o.ring_capacity(n);
        }
        if let Some(ms) = self.unique_timeout_ms {
            o = o.unique_timeout(Duration::from_millis(ms));
        }
        if let Some(n) = self.unique_capacity {
            o = o.unique_capacity(n);
        }
        o
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("WE_SOCK".to_string(), self.sock.to_string_lossy().into_owned()),
            ("WE_TRANSPORT".to_string(), format!("{:?}", self.transport)),
            ("WE_WORKERS".to_string(), self.workers.to_string()),
            ("WE_AGENT".to_string(), if self.agent { "1" } else { "0" }.to_string()),
        ];
        if let Some(n) = self.max_queue_len {
            v.push(("WE_MAX_QUEUE".into(), n.to_string()));
        }
        if let Some(n) = self.max_payload_len {
            v.push(("WE_MAX_PAYLOAD".into(), n.to_string()));
        }
        if let Some(n) = self.ring_capacity {
            v.push(("WE_RING".into(), n.to_string()));
        }
        if let Some(n) = self.unique_timeout_ms {
            v.push(("WE_UNIQ_TIMEOUT_MS".into(), n.to_string()));
        }
        if let Some(n) = self.unique_capacity {
            v.push(("WE_UNIQ_CAP".into(), n.to_string()));
        }
        v
    }

    fn from_env() -> Cfg {
        let get = |k: &str| std::env::var(k).ok();
        let num = |k: &str| get(k).map(|s| s.parse::<usize>().unwrap_or_else(|_| panic!("bad {k}")));
        Cfg {
            transport: match get("WE_TRANSPORT").as_deref() {
                Some("Socket") => Transport::Socket,
                Some("Auto") => Transport::Auto,
                _ => Transport::SharedMemory,
            },
            sock: PathBuf::from(get("WE_SOCK").expect("WE_SOCK")),
            workers: get("WE_WORKERS").expect("WE_WORKERS").parse().expect("WE_WORKERS"),
            agent: get("WE_AGENT").as_deref() == Some("1"),
            max_queue_len: num("WE_MAX_QUEUE"),
            max_payload_len: num("WE_MAX_PAYLOAD"),
            ring_capacity: num("WE_RING"),
            unique_timeout_ms: num("WE_UNIQ_TIMEOUT_MS").map(|n| n as u64),
            unique_capacity: num("WE_UNIQ_CAP"),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Child role

#[derive(Default)]
struct Rec {
    /// (publisher wid, source, event) -> sequence numbers in arrival order.
    streams: BTreeMap<(String, String, String), Vec<u64>>,
    /// Arrival order of every event (bounded).
    log: Vec<String>,
    /// Lost notices: (publisher, count).
    lost: Vec<(String, u64)>,
    /// Sized payloads: (publisher, len, content ok).
    payloads: Vec<(String, usize, bool)>,
    decode_errors: u64,
    /// Non-system events received.
    events: u64,
    /// Sum of the counts of lost notices.
    lost_total: u64,
    /// Runs of the callback subscribed after the panicking one.
    after_panic: u64,
}

fn record(rec: &Mutex<Rec>, ev: &Event<'_>) {
    let mut r = rec.lock().unwrap();
    let w = wid_str(ev.wid());
    if ev.source() == SYSTEM_SOURCE {
        match ev.lost() {
            Some(l) => {
                r.lost.push((wid_str(Some(l.publisher)), l.count));
                r.lost_total += l.count;
                if r.log.len() < 100_000 {
                    r.log.push(format!("lost {} {}", wid_str(Some(l.publisher)), l.count));
                }
            }
            None => r.decode_errors += 1,
        }
        return;
    }
    r.events += 1;
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
    if r.log.len() < 100_000 {
        r.log.push(format!("{w} {} {} {seq}", ev.source(), ev.event()));
    }
    r.streams.entry((w, ev.source().to_string(), ev.event().to_string())).or_default().push(seq);
}

fn parse_target(s: &str) -> Target<'static> {
    match s {
        "all" => Target::All,
        "current" => Target::Current,
        other if other.starts_with("u=") => Target::Unique(Box::leak(other[2..].to_string().into_boxed_str())),
        other => panic!("unknown target {other}"),
    }
}

/// Publish one event per sequence number in `seqs` with `publish`, a dispatch after each
/// (a worker's own queue is bounded by max_queue_len); answer `@@PUB <ok> <errors>`, the
/// first errors as `@@PUBERR`, then `@@OK`. Dispatch errors are counted in `dispatch_errors`
/// (reported as a stat).
fn publish_seqs(
    worker: &mut Worker,
    wid: Wid,
    out: &dyn Fn(&str),
    dispatch_errors: &mut u64,
    seqs: std::ops::Range<u64>,
    mut publish: impl FnMut(&mut Worker, u64) -> Result<(), worker_events::PublishError>,
) {
    let (mut ok, mut err) = (0u64, 0u64);
    for seq in seqs {
        match publish(worker, seq) {
            Ok(()) => ok += 1,
            Err(e) => {
                if err < 5 {
                    out(&format!("@@PUBERR {e}"));
                }
                err += 1;
            }
        }
        if let Err(e) = worker.dispatch() {
            eprintln!("child {wid}: dispatch error: {e}");
            *dispatch_errors += 1;
        }
    }
    out(&format!("@@PUB {ok} {err}"));
    out("@@OK");
}

/// Payload length of the `typed` command's array (and of the `typed` source's receivers).
pub const TYPED_LEN: usize = 1000;

fn typed_array<const N: usize>() -> [u8; N] {
    pattern(N).try_into().expect("N bytes")
}

/// Set while the child is blocked in `wait(None)` or poll(2), where its loop cannot see the
/// parent go away: the stdin reader and the lifetime thread then end the process themselves.
static BLOCKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

// ------------------------------------------------------------------------------------------
// Raw control-socket client

/// Control-frame kinds (the first byte after the length; see [`hello_frame`]).
pub const KIND_HELLO: u8 = 1;
/// Attach accepted.
pub const KIND_WELCOME: u8 = 2;
/// Attach refused; the body is a UTF-8 reason.
pub const KIND_REJECT: u8 = 3;

/// The fields of a HELLO, the first frame a worker sends on the control socket.
#[derive(Debug, Clone, Copy)]
pub struct Hello {
    /// Control protocol version (this build speaks 2).
    pub protocol: u32,
    /// Shared-memory layout version (this build uses 2).
    pub layout: u32,
    pub slot: u32,
    pub pid: u32,
    /// The geometry, which must equal the broker's options: `workers`, privileged agent
    /// (0/1), `ring_capacity` in bytes.
    pub workers: u32,
    pub agent: u32,
    pub ring_capacity: u32,
}

impl Hello {
    /// A well-formed HELLO for `slot` of the deployment `cfg` describes.
    pub fn for_cfg(cfg: &Cfg, slot: u32) -> Hello {
        Hello {
            protocol: 2,
            layout: 2,
            slot,
            pid: std::process::id(),
            workers: cfg.workers,
            agent: u32::from(cfg.agent),
            ring_capacity: cfg.options().get_ring_capacity() as u32,
        }
    }
}

/// The bytes of a HELLO frame. Every control frame is `len: u32 LE` (the bytes that follow),
/// `kind: u8`, then `len - 1` body bytes. A HELLO's body is seven `u32 LE`: protocol
/// version, layout version, slot, pid, workers, privileged agent (0/1), ring_capacity. The
/// broker answers WELCOME (kind 2; on shared memory the region and eventfds ride with it) or
/// REJECT (kind 3, body = the reason in UTF-8), and closes the connection after a REJECT.
pub fn hello_frame(h: &Hello) -> Vec<u8> {
    let fields = [h.protocol, h.layout, h.slot, h.pid, h.workers, h.agent, h.ring_capacity];
    let mut v = ((1 + 4 * fields.len()) as u32).to_le_bytes().to_vec();
    v.push(KIND_HELLO);
    for f in fields {
        v.extend_from_slice(&f.to_le_bytes());
    }
    v
}

/// The broker's answer on a raw connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// One frame: (kind, body as text).
    Frame(u8, String),
    /// The broker closed the connection without a (complete) frame.
    Closed,
}

/// Read the first frame the peer sends on `s` (at most 10 s).
pub fn read_reply(s: &mut std::os::unix::net::UnixStream) -> Reply {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
            return Reply::Closed;
        }
        Err(e) => panic!("no reply from the broker within 10 s: {e}"),
    }
    let mut frame = vec![0u8; u32::from_le_bytes(len) as usize];
    match s.read_exact(&mut frame) {
        Ok(()) if !frame.is_empty() => Reply::Frame(frame[0], String::from_utf8_lossy(&frame[1..]).into_owned()),
        Ok(()) => Reply::Closed,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
            Reply::Closed
        }
        Err(e) => panic!("truncated reply from the broker: {e}"),
    }
}

/// Connect to the control socket at `path`, send `bytes`, return the first reply.
pub fn raw_exchange(path: &Path, bytes: &[u8]) -> Reply {
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect to the control socket");
    s.write_all(bytes).expect("write to the control socket");
    read_reply(&mut s)
}

/// The raw-client role (`WE_RAW_FRAME`, hex): optionally switch to another user first
/// (`WE_RAW_UID`: setgroups, setgid, then setuid to that id; needs root), connect to the
/// control socket `WE_SOCK`, send the bytes, and answer `@@REPLY <kind> <body>` or `@@CLOSED`
/// for the first frame the broker sends, then `@@OK`, and exit.
fn raw_client_main() -> ! {
    let out = |s: &str| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    };
    let hex = std::env::var("WE_RAW_FRAME").unwrap();
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    if let Ok(uid) = std::env::var("WE_RAW_UID") {
        let uid: u32 = uid.parse().unwrap();
        // SAFETY: plain syscalls on this process's credentials; no pointers but a null
        // group list of length 0. Groups, then group, then user (after setuid the others
        // would be refused).
        let ok =
            unsafe { libc::setgroups(0, std::ptr::null()) == 0 && libc::setgid(uid) == 0 && libc::setuid(uid) == 0 };
        // SAFETY: plain syscalls with no arguments.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if !ok || euid != uid || egid != uid {
            out(&format!("@@ERR cannot switch to uid {uid}: {} (euid {euid})", std::io::Error::last_os_error()));
            std::process::exit(2);
        }
    }
    let path = PathBuf::from(std::env::var("WE_SOCK").unwrap());
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            out(&format!("@@ERR connect {}: {e}", path.display()));
            std::process::exit(2);
        }
    };
    // A broker that refuses at accept (a foreign uid) may answer and close before our bytes
    // are written: a failing write is fine, the answer is already in our receive queue.
    if let Err(e) = s.write_all(&bytes) {
        eprintln!("raw client: write: {e}");
    }
    match read_reply(&mut s) {
        Reply::Frame(KIND_REJECT, reason) => out(&format!("@@REPLY {KIND_REJECT} {reason}")),
        Reply::Frame(k, body) => out(&format!("@@REPLY {k} ({} bytes)", body.len())),
        Reply::Closed => out("@@CLOSED"),
    }
    out("@@OK");
    std::process::exit(0);
}

/// Entry point of the child role; returns at once when `WE_CHILD` is not set.
pub fn child_main() {
    if std::env::var("WE_CHILD").is_err() {
        return;
    }
    if std::env::var("WE_RAW_FRAME").is_ok() {
        raw_client_main();
    }
    let born = Instant::now();
    let cfg = Cfg::from_env();
    let wid = match std::env::var("WE_WID").expect("WE_WID").as_str() {
        "agent" => Wid::PrivilegedAgent,
        n => Wid::Worker(n.parse().expect("WE_WID")),
    };
    let panic_mode = std::env::var("WE_PANIC").is_ok();
    if panic_mode {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload().downcast_ref::<&str>().copied().unwrap_or("");
            if !msg.contains("intentional test panic") {
                default(info);
            }
        }));
    }
    let out = |s: &str| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    };

    let events = match Events::new(cfg.options()) {
        Ok(e) => e,
        Err(e) => {
            out(&format!("@@ERR Events::new: {e}"));
            std::process::exit(2);
        }
    };
    let mut worker = match events.init_worker(wid) {
        Ok(w) => w,
        Err(e) => {
            out(&format!("@@ERR init_worker: {e}"));
            std::process::exit(2);
        }
    };
    let rec = Arc::new(Mutex::new(Rec::default()));
    {
        let rec = rec.clone();
        worker.subscribe("*", "*", move |ev| record(&rec, ev));
    }
    if panic_mode {
        worker.subscribe("boom", "*", |_| panic!("intentional test panic"));
        let rec = rec.clone();
        worker.subscribe("boom", "*", move |_| rec.lock().unwrap().after_panic += 1);
    }
    // WE_EARLY="<src> <ev> <n>": publish n All events before being attached.
    let mut early_errors = 0u64;
    let mut early_unique_pending = 0u64;
    if let Ok(spec) = std::env::var("WE_EARLY") {
        let f: Vec<&str> = spec.split_whitespace().collect();
        let n: u64 = f[2].parse().unwrap();
        if worker.is_ready() {
            out("@@ERR WE_EARLY: already attached before the first publish");
            std::process::exit(2);
        }
        for seq in 0..n {
            if let Err(e) = worker.publish(Target::All, f[0], f[1], &seq) {
                eprintln!("early publish {seq}: {e}");
                early_errors += 1;
            }
        }
    }
    // WE_EARLY_UNIQ="<src> <ev> <prefix> <n>": publish n Unique("<prefix><seq>") events
    // before being attached.
    if let Ok(spec) = std::env::var("WE_EARLY_UNIQ") {
        let f: Vec<&str> = spec.split_whitespace().collect();
        let n: u64 = f[3].parse().unwrap();
        if worker.is_ready() {
            out("@@ERR WE_EARLY_UNIQ: already attached before the first publish");
            std::process::exit(2);
        }
        for seq in 0..n {
            let hash = format!("{}{seq}", f[2]);
            if let Err(e) = worker.publish(Target::Unique(&hash), f[0], f[1], &seq) {
                eprintln!("early unique publish {seq}: {e}");
                early_errors += 1;
            }
        }
        early_unique_pending = worker.stats().unique_pending;
    }
    match worker.wait_ready(Duration::from_secs(30)) {
        Ok(true) => {}
        Ok(false) => {
            out("@@ERR not ready after 30 s");
            std::process::exit(2);
        }
        Err(e) => {
            out(&format!("@@ERR wait_ready: {e}"));
            std::process::exit(2);
        }
    }

    // stdin reader thread: lines -> channel; EOF (parent gone) disconnects the channel.
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        // The parent is gone. A worker blocked in `wait(None)` or poll(2) cannot notice.
        if BLOCKING.load(Ordering::SeqCst) {
            std::process::exit(0);
        }
    });
    // Orphan protection for the same blocked states (the pump checks the lifetime otherwise).
    std::thread::spawn(move || {
        std::thread::sleep(CHILD_LIFETIME.saturating_sub(born.elapsed()));
        if BLOCKING.load(Ordering::SeqCst) {
            eprintln!("child {wid}: lifetime exceeded while blocked, exiting");
            std::process::exit(3);
        }
    });

    out(&format!("@@READY {} broker={} transport={:?}", wid_str(Some(wid)), worker.is_broker(), worker.transport()));

    let mut paused = false;
    let mut wait_errors = 0u64;
    let mut dispatch_errors = 0u64;
    let tick = Duration::from_millis(5);
    let pump = |worker: &mut Worker, wait_errors: &mut u64| {
        if born.elapsed() > CHILD_LIFETIME {
            eprintln!("child {wid}: lifetime exceeded, exiting");
            std::process::exit(3);
        }
        if let Err(e) = worker.wait(Some(tick)) {
            *wait_errors += 1;
            eprintln!("child {wid}: wait error: {e}");
        }
    };
    loop {
        let line = if paused {
            match rx.recv() {
                Ok(l) => l,
                Err(_) => std::process::exit(0),
            }
        } else {
            match rx.try_recv() {
                Ok(l) => l,
                Err(TryRecvError::Empty) => {
                    pump(&mut worker, &mut wait_errors);
                    continue;
                }
                Err(TryRecvError::Disconnected) => std::process::exit(0),
            }
        };
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.is_empty() {
            continue;
        }
        match parts[0] {
            // publish <all|current> <src> <ev> <start> <count>: typed u64 payloads, with a
            // dispatch after each publish (a worker's own queue is bounded by max_queue_len).
            "publish" => {
                let target = parse_target(parts[1]);
                let (src, ev) = (parts[2], parts[3]);
                let start: u64 = parts[4].parse().unwrap();
                let count: u64 = parts[5].parse().unwrap();
                publish_seqs(&mut worker, wid, &out, &mut dispatch_errors, start..start + count, |w, seq| {
                    w.publish(target, src, ev, &seq)
                });
            }
            // uniq <src> <ev> <hash-prefix> <start> <count>: Unique("<prefix><seq>") events with
            // payload seq, a dispatch after each.
            "uniq" => {
                let (src, ev, prefix) = (parts[1], parts[2], parts[3]);
                let start: u64 = parts[4].parse().unwrap();
                let count: u64 = parts[5].parse().unwrap();
                publish_seqs(&mut worker, wid, &out, &mut dispatch_errors, start..start + count, |w, seq| {
                    w.publish(Target::Unique(&format!("{prefix}{seq}")), src, ev, &seq)
                });
            }
            // pump <ms>: dispatch for <ms> ms (used inside bounded polling loops only).
            "pump" => {
                let limit = Instant::now() + Duration::from_millis(parts[1].parse().unwrap());
                while Instant::now() < limit {
                    pump(&mut worker, &mut wait_errors);
                }
                out("@@OK");
            }
            // batch <target>:<src>:<ev>:<seq> ...: publish all of them with no dispatch in between.
            "batch" => {
                let (mut ok, mut err) = (0u64, 0u64);
                for item in &parts[1..] {
                    let f: Vec<&str> = item.split(':').collect();
                    let seq: u64 = f[3].parse().unwrap();
                    match worker.publish(parse_target(f[0]), f[1], f[2], &seq) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            out(&format!("@@PUBERR {e}"));
                            err += 1;
                        }
                    }
                }
                out(&format!("@@PUB {ok} {err}"));
                out("@@OK");
            }
            // bytes <all|current> <src> <ev> <len>: raw payload with `pattern(len)`.
            "bytes" => {
                let target = parse_target(parts[1]);
                let len: usize = parts[4].parse().unwrap();
                let data = pattern(len);
                match worker.publish_bytes(target, parts[2], parts[3], &data) {
                    Ok(()) => out("@@PUB 1 0"),
                    Err(e) => {
                        out(&format!("@@PUBERR {e}"));
                        out("@@PUB 0 1");
                    }
                }
                out("@@OK");
            }
            // typed <all|current> <src> <ev> <extra>: publish, through the typed `publish`, a
            // `[u8; TYPED_LEN + extra]` (extra 0 or 1) holding `pattern(TYPED_LEN + extra)`. Its
            // rkyv bytes are the array itself: a payload of exactly TYPED_LEN + extra bytes.
            "typed" => {
                let target = parse_target(parts[1]);
                let r = match parts[4] {
                    "0" => worker.publish(target, parts[2], parts[3], &typed_array::<TYPED_LEN>()),
                    "1" => worker.publish(target, parts[2], parts[3], &typed_array::<{ TYPED_LEN + 1 }>()),
                    other => panic!("typed: extra {other} is not 0 or 1"),
                };
                match r {
                    Ok(()) => out("@@PUB 1 0"),
                    Err(e) => {
                        out(&format!("@@PUBERR {e}"));
                        out("@@PUB 0 1");
                    }
                }
                out("@@OK");
            }
            // park <n>: `wait(None)` (no timeout at all) until events + lost counts >= n. Answers
            // `@@PARKING` before the first wait, then `@@PARKED <events> <wait calls>`. A
            // receiver nobody wakes never answers: the parent's liveness bound reports it.
            "park" => {
                let n: u64 = parts[1].parse().unwrap();
                BLOCKING.store(true, Ordering::SeqCst);
                out("@@PARKING");
                let mut calls = 0u64;
                let events = loop {
                    let got = {
                        let r = rec.lock().unwrap();
                        r.events + r.lost_total
                    };
                    if got >= n {
                        break got;
                    }
                    calls += 1;
                    if let Err(e) = worker.wait(None) {
                        wait_errors += 1;
                        eprintln!("child {wid}: wait(None) error: {e}");
                    }
                };
                BLOCKING.store(false, Ordering::SeqCst);
                out(&format!("@@PARKED {events} {calls}"));
                out("@@OK");
            }
            // pollfd <ms>: drain (`dispatch` until it returns 0, as the `AsFd` contract asks),
            // answer `@@POLLING`, then poll(2) the worker's own descriptor (`AsRawFd`) for
            // POLLIN, at most <ms> ms in all; each time it turns readable, `dispatch`. Answers
            // `@@POLLED <readable 0|1> <dispatched> <spurious>`, `spurious` counting readable
            // descriptors whose `dispatch` found nothing (it then polls again).
            "pollfd" => {
                let limit = Instant::now() + Duration::from_millis(parts[1].parse().unwrap());
                while worker.dispatch().map_err(|e| eprintln!("child {wid}: dispatch error: {e}")).unwrap_or(0) > 0 {}
                BLOCKING.store(true, Ordering::SeqCst);
                out("@@POLLING");
                let (mut readable, mut dispatched, mut spurious) = (false, 0usize, 0u64);
                loop {
                    let left = limit.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    let mut pfd = libc::pollfd { fd: worker.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd for the duration of the call.
                    let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
                    if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
                    if r == 0 || pfd.revents & libc::POLLIN == 0 {
                        continue;
                    }
                    readable = true;
                    match worker.dispatch() {
                        Ok(0) => spurious += 1,
                        Ok(n) => {
                            dispatched = n;
                            break;
                        }
                        Err(e) => {
                            dispatch_errors += 1;
                            eprintln!("child {wid}: dispatch error: {e}");
                        }
                    }
                }
                BLOCKING.store(false, Ordering::SeqCst);
                out(&format!("@@POLLED {} {dispatched} {spurious}", u8::from(readable)));
                out("@@OK");
            }
            "pause" => {
                paused = true;
                out("@@OK");
            }
            "resume" => {
                paused = false;
                out("@@OK");
            }
            // until <n> <ms>: dispatch until events + lost counts >= n, at most <ms> ms
            // (a bound for failure reporting, not a synchronization delay).
            "until" => {
                let n: u64 = parts[1].parse().unwrap();
                let limit = Instant::now() + Duration::from_millis(parts[2].parse().unwrap());
                let reached = loop {
                    {
                        let r = rec.lock().unwrap();
                        if r.events + r.lost_total >= n {
                            break true;
                        }
                    }
                    if Instant::now() >= limit {
                        break false;
                    }
                    if let Err(TryRecvError::Disconnected) = rx.try_recv() {
                        std::process::exit(0);
                    }
                    pump(&mut worker, &mut wait_errors);
                };
                out(&format!("@@UNTIL {}", if reached { "reached" } else { "timeout" }));
                out("@@OK");
            }
            "report" => {
                let r = rec.lock().unwrap();
                for ((w, s, e), seqs) in &r.streams {
                    let list: Vec<String> = seqs.iter().map(|n| n.to_string()).collect();
                    let list = if list.is_empty() { "-".to_string() } else { list.join(",") };
                    out(&format!("@@STREAM {w} {s} {e} {list}"));
                }
                for (p, c) in &r.lost {
                    out(&format!("@@LOST {p} {c}"));
                }
                for (p, len, ok) in &r.payloads {
                    out(&format!("@@PAYLOAD {p} {len} {}", u8::from(*ok)));
                }
                let st = worker.stats();
                let stats: [(&str, u64); 27] = [
                    ("early_errors", early_errors),
                    ("early_unique_pending", early_unique_pending),
                    ("unique_duplicates", st.unique_duplicates),
                    ("unique_unrecorded", st.unique_unrecorded),
                    ("unique_pending", st.unique_pending),
                    ("published", st.published),
                    ("delivered", st.delivered),
                    ("callbacks_run", st.callbacks_run),
                    ("callback_panics", st.callback_panics),
                    ("dropped", st.dropped),
                    ("lost", st.lost),
                    ("lost_outbound", st.lost_outbound),
                    ("overflows", st.overflows),
                    ("failovers", st.failovers),
                    ("peers", st.peers.len() as u64),
                    ("peer_depth_sum", st.peers.iter().map(|p| p.outbound_depth + p.backlog).sum()),
                    ("backlog_sum", st.peers.iter().map(|p| p.backlog).sum()),
                    ("events", r.events),
                    ("lost_total", r.lost_total),
                    ("decode_errors", r.decode_errors),
                    ("after_panic", r.after_panic),
                    ("wait_errors", wait_errors),
                    ("dispatch_errors", dispatch_errors),
                    ("wakeups_sent", st.wakeups_sent),
                    ("wakeups_received", st.wakeups_received),
                    ("is_broker", u64::from(worker.is_broker())),
                    ("is_ready", u64::from(worker.is_ready())),
                ];
                for (k, v) in stats {
                    out(&format!("@@STAT {k} {v}"));
                }
                out("@@OK");
            }
            "log" => {
                let r = rec.lock().unwrap();
                for l in &r.log {
                    out(&format!("@@LOG {l}"));
                }
                out("@@OK");
            }
            "exit" => {
                drop(worker);
                out("@@OK");
                std::process::exit(0);
            }
            other => out(&format!("@@ERR unknown command {other}")),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Parent side

/// Kills every registered child when the deadline passes (the test then fails on the
/// closed pipe), even if the test thread is stuck somewhere else.
pub struct Watchdog {
    pids: Arc<Mutex<Vec<u32>>>,
    stop: Option<Sender<()>>,
    pub deadline: Instant,
    name: String,
}

impl Watchdog {
    pub fn new(name: &str) -> Watchdog {
        let pids: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new(Vec::new()));
        let (stop, rx) = mpsc::channel::<()>();
        let p = pids.clone();
        let n = name.to_string();
        std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(TEST_TIMEOUT) {
                let pids = p.lock().unwrap();
                eprintln!("WATCHDOG: test {n} exceeded {TEST_TIMEOUT:?}; killing children {pids:?}");
                for &pid in pids.iter() {
                    // SAFETY: plain syscall; `pid` is a child registered while not yet reaped
                    // (it is unregistered under this lock before being killed and reaped).
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                }
            }
        });
        Watchdog { pids, stop: Some(stop), deadline: Instant::now() + TEST_TIMEOUT, name: name.to_string() }
    }

    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Spawn a child worker and wait for its `@@READY`.
    pub fn spawn(&self, cfg: &Cfg, wid: Wid) -> Child {
        self.spawn_with(cfg, wid, &[])
    }

    pub fn spawn_with(&self, cfg: &Cfg, wid: Wid, extra: &[(&str, &str)]) -> Child {
        let mut child = self.spawn_inner(cfg, wid, extra);
        let l = child.next_line();
        if !l.starts_with("@@READY") {
            child.fail(&format!("expected @@READY, got {l:?}"));
        }
        child.transport = l.rsplit("transport=").next().unwrap_or("").to_string();
        // Every worker runs the transport its test asked for (Auto: whatever the broker chose).
        if cfg.transport != Transport::Auto && child.transport != format!("{:?}", cfg.transport) {
            child.fail(&format!("runs transport {:?}, the test asked for {:?}", child.transport, cfg.transport));
        }
        child
    }

    fn spawn_inner(&self, cfg: &Cfg, wid: Wid, extra: &[(&str, &str)]) -> Child {
        let exe = std::env::current_exe().expect("current_exe");
        let wid_s = match wid {
            Wid::Worker(n) => n.to_string(),
            Wid::PrivilegedAgent => "agent".to_string(),
        };
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", "child_entry", "--ignored", "--nocapture"])
            .env("WE_CHILD", "1")
            .env("WE_WID", &wid_s)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in cfg.env() {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut proc = cmd.spawn().expect("spawn child");
        let pid = proc.id();
        self.pids.lock().unwrap().push(pid);
        let stdin = proc.stdin.take().unwrap();
        let stdout = proc.stdout.take().unwrap();
        let mut stderr_pipe = proc.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("@@") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let se = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = se.lock().unwrap();
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                if s.len() > 64 * 1024 {
                    let cut = s.len() - 32 * 1024;
                    let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
                    s.replace_range(..cut, "...");
                }
            }
        });
        Child {
            name: format!("{}/{}", self.name, wid_str(Some(wid))),
            transport: String::new(),
            proc: Some(proc),
            pid,
            pids: self.pids.clone(),
            stdin: Some(stdin),
            lines,
            stderr,
            deadline: self.deadline,
        }
    }

    /// Spawn a child in the raw-client role (`WE_RAW_FRAME` and the other variables in
    /// `extra`; see `raw_client_main`): it starts no worker and answers without `@@READY`.
    pub fn spawn_raw(&self, cfg: &Cfg, extra: &[(&str, &str)]) -> Child {
        self.spawn_inner(cfg, Wid::Worker(0), extra)
    }

    /// Spawn a child whose start is expected to fail; returns its `@@ERR` line.
    pub fn spawn_expect_err(&self, cfg: &Cfg, wid: Wid) -> String {
        self.spawn_inner(cfg, wid, &[]).fail_text()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
    }
}

/// One child worker process. Dropping it SIGKILLs and reaps it.
pub struct Child {
    pub name: String,
    /// The transport the child reported once ready (`SharedMemory`, `Socket`).
    pub transport: String,
    proc: Option<std::process::Child>,
    pid: u32,
    pids: Arc<Mutex<Vec<u32>>>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    deadline: Instant,
}

impl Child {
    fn fail(&self, msg: &str) -> ! {
        let se = self.stderr.lock().unwrap().clone();
        panic!("child {}: {msg}\n--- child stderr ---\n{se}\n--- end ---", self.name);
    }

    pub fn next_line(&self) -> String {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => self.fail("watchdog: no answer before the test deadline"),
            Err(RecvTimeoutError::Disconnected) => {
                self.fail("stdout closed (child died or was killed by the watchdog)")
            }
        }
    }

    /// The next line, or a test failure naming `what` if none comes within `limit` (a
    /// liveness bound: generous, never a speed assertion).
    pub fn next_line_within(&self, limit: Duration, what: &str) -> String {
        match self.lines.recv_timeout(limit.min(self.deadline.saturating_duration_since(Instant::now()))) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => self.fail(&format!("liveness: {what}: no answer within {limit:?}")),
            Err(RecvTimeoutError::Disconnected) => self.fail(&format!("{what}: stdout closed (child died)")),
        }
    }

    /// [`Child::expect_ok`] bounded by `limit` (see [`Child::next_line_within`]).
    pub fn expect_ok_within(&mut self, limit: Duration, what: &str) -> Vec<String> {
        let end = Instant::now() + limit;
        let mut v = Vec::new();
        loop {
            let l = self.next_line_within(end.saturating_duration_since(Instant::now()), what);
            if l == "@@OK" {
                return v;
            }
            if l.starts_with("@@ERR") {
                self.fail(&format!("command failed: {l}"));
            }
            v.push(l);
        }
    }

    /// Dispatch until `n` events (lost counts included) have been received, for at most
    /// `limit`; false if that did not happen.
    pub fn until_within(&mut self, n: u64, limit: Duration) -> bool {
        let lines = self.cmd(&format!("until {n} {}", limit.as_millis()));
        lines.iter().any(|l| l == "@@UNTIL reached")
    }

    /// Wait (at most `limit`) until one thread of the child sleeps in one of `syscalls`
    /// (read from `/proc/<pid>/task/*/syscall`, which shows the system call a blocked
    /// thread is in). `None` when `/proc` does not show it on this system; `Some(false)`
    /// when no thread got there in time.
    pub fn blocked_in(&self, syscalls: &[libc::c_long], limit: Duration) -> Option<bool> {
        let end = Instant::now() + limit;
        let tasks = PathBuf::from(format!("/proc/{}/task", self.pid));
        loop {
            let mut readable = false;
            for t in std::fs::read_dir(&tasks).ok()?.flatten() {
                let Ok(text) = std::fs::read_to_string(t.path().join("syscall")) else { continue };
                readable = true;
                let nr = text.split_whitespace().next().and_then(|n| n.parse::<libc::c_long>().ok());
                let sleeping = std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|st| st.rsplit(')').next().map(|r| r.trim_start().starts_with('S')))
                    .unwrap_or(false);
                if sleeping && nr.is_some_and(|n| syscalls.contains(&n)) {
                    return Some(true);
                }
            }
            if !readable {
                return None;
            }
            if Instant::now() >= end {
                return Some(false);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Send a command without waiting for its answer.
    pub fn send(&mut self, cmd: &str) {
        let r = self.stdin.as_mut().map(|s| writeln!(s, "{cmd}").and_then(|_| s.flush()));
        if !matches!(r, Some(Ok(()))) {
            self.fail(&format!("cannot write command {cmd:?}"));
        }
    }

    /// Collect the answer lines of one command, up to its `@@OK`.
    pub fn expect_ok(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        loop {
            let l = self.next_line();
            if l == "@@OK" {
                return v;
            }
            if l.starts_with("@@ERR") {
                self.fail(&format!("command failed: {l}"));
            }
            v.push(l);
        }
    }

    pub fn cmd(&mut self, cmd: &str) -> Vec<String> {
        self.send(cmd);
        self.expect_ok()
    }

    /// `publish` command: returns (ok, errors, error texts).
    pub fn publish(&mut self, target: &str, src: &str, ev: &str, start: u64, count: u64) -> PubResult {
        let lines = self.cmd(&format!("publish {target} {src} {ev} {start} {count}"));
        PubResult::parse(&lines)
    }

    pub fn publish_end(&mut self) -> PubResult {
        let lines = self.expect_ok();
        PubResult::parse(&lines)
    }

    /// Dispatch until `n` events (lost counts included) have been received in total; fails
    /// the test with the child's report if that does not happen before the deadline.
    pub fn until(&mut self, n: u64) {
        let left = self.deadline.saturating_duration_since(Instant::now()).saturating_sub(Duration::from_secs(5));
        let lines = self.cmd(&format!("until {n} {}", left.as_millis()));
        if !lines.iter().any(|l| l == "@@UNTIL reached") {
            let r = self.report();
            let lens: Vec<String> =
                r.streams.iter().map(|((w, s, e), v)| format!("{w}/{s}/{e}: {} events", v.len())).collect();
            self.fail(&format!(
                "watchdog: never received {n} events; streams {lens:?}; lost {:?}; stats {:?}",
                r.lost, r.stats
            ));
        }
    }

    /// Spawn expecting `init_worker` (or `Events::new`) to fail: returns the error line.
    pub fn fail_text(&mut self) -> String {
        self.next_line()
    }

    pub fn report(&mut self) -> Report {
        let lines = self.cmd("report");
        Report::parse(&lines)
    }

    pub fn log(&mut self) -> Vec<String> {
        self.cmd("log").into_iter().filter_map(|l| l.strip_prefix("@@LOG ").map(str::to_string)).collect()
    }

    pub fn exit(mut self) {
        self.cmd("exit");
        self.reap();
    }

    /// Send `sig` to the child process (SIGSTOP, SIGCONT, SIGKILL...).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid this harness spawned and has not reaped yet.
        let r = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed: {}", self.pid, std::io::Error::last_os_error());
    }

    /// SIGKILL the child and reap it.
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        self.reap();
    }

    fn reap(&mut self) {
        {
            let mut pids = self.pids.lock().unwrap();
            pids.retain(|&p| p != self.pid);
        }
        drop(self.stdin.take());
        if let Some(mut p) = self.proc.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.reap();
    }
}

#[derive(Debug, Default)]
pub struct PubResult {
    pub ok: u64,
    pub err: u64,
    pub errors: Vec<String>,
}

impl PubResult {
    fn parse(lines: &[String]) -> PubResult {
        let mut r = PubResult::default();
        for l in lines {
            if let Some(e) = l.strip_prefix("@@PUBERR ") {
                r.errors.push(e.to_string());
            } else if let Some(rest) = l.strip_prefix("@@PUB ") {
                let mut it = rest.split_whitespace();
                r.ok = it.next().unwrap().parse().unwrap();
                r.err = it.next().unwrap().parse().unwrap();
            }
        }
        r
    }
}

/// A child's recorded state.
#[derive(Debug, Default)]
pub struct Report {
    pub streams: BTreeMap<(String, String, String), Vec<u64>>,
    pub lost: Vec<(String, u64)>,
    pub payloads: Vec<(String, usize, bool)>,
    pub stats: HashMap<String, u64>,
}

impl Report {
    fn parse(lines: &[String]) -> Report {
        let mut r = Report::default();
        for l in lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[0] {
                "@@STREAM" => {
                    let seqs =
                        if f[4] == "-" { Vec::new() } else { f[4].split(',').map(|n| n.parse().unwrap()).collect() };
                    r.streams.insert((f[1].to_string(), f[2].to_string(), f[3].to_string()), seqs);
                }
                "@@LOST" => r.lost.push((f[1].to_string(), f[2].parse().unwrap())),
                "@@PAYLOAD" => r.payloads.push((f[1].to_string(), f[2].parse().unwrap(), f[3] == "1")),
                "@@STAT" => {
                    r.stats.insert(f[1].to_string(), f[2].parse().unwrap());
                }
                _ => {}
            }
        }
        r
    }

    pub fn stream(&self, wid: &str, src: &str, ev: &str) -> Vec<u64> {
        self.streams.get(&(wid.to_string(), src.to_string(), ev.to_string())).cloned().unwrap_or_default()
    }

    pub fn stat(&self, k: &str) -> u64 {
        *self.stats.get(k).unwrap_or_else(|| panic!("no stat {k}"))
    }

    pub fn stream_keys(&self) -> Vec<(String, String, String)> {
        self.streams.keys().cloned().collect()
    }
}

/// 0..n as a Vec.
pub fn seq(start: u64, n: u64) -> Vec<u64> {
    (start..start + n).collect()
}

/// Describe how `got` differs from 0..n (for assertion messages without 10,000-number dumps).
pub fn diff_summary(got: &[u64], want: &[u64]) -> String {
    if got == want {
        return "equal".into();
    }
    let first_bad = got.iter().zip(want).position(|(a, b)| a != b);
    format!(
        "got {} items, want {}; first mismatch at index {:?} (got {:?}, want {:?})",
        got.len(),
        want.len(),
        first_bad,
        first_bad.map(|i| got[i]),
        first_bad.map(|i| want[i]),
    )
}

/// Drive an in-process worker until `done()` or the deadline.
pub fn pump_until(worker: &mut Worker, deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() {
        assert!(Instant::now() < deadline, "watchdog: in-process condition not reached before the deadline");
        worker.wait(Some(Duration::from_millis(5))).expect("wait");
    }
}

// ------------------------------------------------------------------------------------------
// Failover helpers (tests/failover.rs)

/// The options of this child process, from the `WE_*` environment variables.
pub fn cfg_from_env() -> Cfg {
    Cfg::from_env()
}

/// CLOCK_MONOTONIC now, in nanoseconds: the same clock in every process of the host, so
/// timestamps taken by children compare with the parent's.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Child {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL the child wherever it is (its stdin still open, so it cannot see EOF and
    /// exit by itself first), then reap it. Returns the CLOCK_MONOTONIC time of the kill.
    pub fn sigkill(mut self) -> u64 {
        let t = {
            let mut pids = self.pids.lock().unwrap();
            pids.retain(|&p| p != self.pid);
            let t = mono_ns();
            if let Some(p) = self.proc.as_mut() {
                let _ = p.kill();
            }
            t
        };
        self.reap();
        t
    }
}

/// The system calls a thread sleeps in inside `epoll_wait`-style waits.
pub fn epoll_wait_syscalls() -> Vec<libc::c_long> {
    let mut v = vec![libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2];
    #[cfg(target_arch = "x86_64")]
    v.push(libc::SYS_epoll_wait);
    v
}

/// The system calls a thread sleeps in inside poll(2).
pub fn poll_syscalls() -> Vec<libc::c_long> {
    let mut v = vec![libc::SYS_ppoll];
    #[cfg(target_arch = "x86_64")]
    v.push(libc::SYS_poll);
    v
}

/// Is this process root (able to switch a child to another uid)?
pub fn is_root() -> bool {
    // SAFETY: plain syscall with no arguments.
    unsafe { libc::geteuid() == 0 }
}
