//! The harness of the bridge's tests: a real `nats-server` per test ([`Nats`]), two "hosts"
//! (two buses on different socket paths in temporary directories), each with worker
//! processes (this test binary re-executed in the child role, [`role`]; never `fork()` in the
//! harness) and a bridge (the `worker-events-bridge` binary as a child process).
//!
//! A test file starts with `mod support; use support::*;` and `child_entry!();`.

#![allow(dead_code)]

pub mod role;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub use worker_events_dev_support::TempDir;
use worker_events_dev_support::process;

/// Set in a child's environment: run the worker role.
pub const ROLE_ENV: &str = "WEB_ROLE";

/// The child role's test: ignored so that a normal run skips it.
#[macro_export]
macro_rules! child_entry {
    () => {
        #[test]
        #[ignore = "child process role, spawned by the other tests"]
        fn child_entry() {
            support::role::child_main();
        }
    };
}

/// A `nats-server -js` on a free loopback port with its store in a directory; SIGKILLed
/// when dropped.
pub struct Nats {
    child: Option<Child>,
    /// The client port.
    pub port: u16,
    store: PathBuf,
    log: PathBuf,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().unwrap().port()
}

impl Nats {
    /// Start a server with its store under `dir`.
    pub fn start(dir: &Path) -> Nats {
        let mut n = Nats { child: None, port: free_port(), store: dir.join("nats-store"), log: dir.join("nats.log") };
        n.restart();
        n
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)start the server on the same port and store directory; returns once it accepts
    /// connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(nats_server())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server (install the nats-server package)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The nats-server binary: `$NATS_SERVER`, else `nats-server` on the PATH, else the Debian
/// package's `/usr/sbin/nats-server`.
pub fn nats_server() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return PathBuf::from(p);
    }
    for d in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/usr/local/sbin"]) {
        let p = Path::new(d).join("nats-server");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nats-server")
}

/// A child process that answers commands line by line.
pub struct Proc {
    /// For messages.
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    log: Option<PathBuf>,
}

impl Proc {
    fn start(name: &str, mut cmd: Command, log: Option<PathBuf>) -> Proc {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        match &log {
            Some(p) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
                cmd.stderr(f);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Proc { name: name.to_string(), child, stdin, lines, log }
    }

    /// Wait for a line containing `prefix` and return it from there (other lines are
    /// skipped; libtest may print `test child_entry ... ` before the child's first line).
    pub fn expect(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(prefix) => return l[l.find(prefix).unwrap_or(0)..].to_string(),
                Ok(_) => {}
                Err(e) => self.fail(&format!("no line {prefix:?} within {timeout:?} ({e})")),
            }
        }
    }

    /// Send a command without waiting for its answer.
    pub fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        if writeln!(stdin, "{cmd}").and_then(|()| stdin.flush()).is_err() {
            self.fail(&format!("sending {cmd:?}: the process is gone"));
        }
    }

    /// Send a command and return its answer (the text after `@@`).
    pub fn cmd(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.reply(Duration::from_secs(60))
    }

    /// The next answer.
    pub fn reply(&mut self, timeout: Duration) -> String {
        self.expect("@@", timeout)[2..].to_string()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `grace` for a clean exit; its status (`None`: had to be
    /// killed).
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        process::reap(&mut self.child, grace)
    }

    /// Panic with `msg` and the tail of the process's log.
    pub fn fail(&mut self, msg: &str) -> ! {
        let tail = self
            .log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        panic!("{}: {msg}\n--- log tail ---\n{tail}", self.name);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One "host": a bus (its socket in a directory of its own), its workers, its bridge.
pub struct Host {
    /// The host id.
    pub name: String,
    /// The host's directory.
    pub dir: PathBuf,
    /// Worker processes.
    pub workers: Vec<Proc>,
    /// The bridge, when running.
    pub bridge: Option<Proc>,
    unique_ms: u64,
    bridge_args: Vec<String>,
}

/// Workers per host.
pub const WORKERS: u32 = 2;

impl Host {
    /// A host `name` under `root`, with [`WORKERS`] workers attached (no bridge yet).
    pub fn start(root: &Path, name: &str, unique_ms: u64) -> Host {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut h =
            Host { name: name.to_string(), dir, workers: Vec::new(), bridge: None, unique_ms, bridge_args: Vec::new() };
        for i in 0..WORKERS {
            let mut cmd = process::reexec().unwrap();
            cmd.args(["--exact", "child_entry", "--ignored", "--nocapture"])
                .env(ROLE_ENV, "worker")
                .env("WEB_SOCK", h.sock())
                .env("WEB_WID", i.to_string())
                .env("WEB_WORKERS", WORKERS.to_string())
                .env("WEB_UNIQUE_MS", unique_ms.to_string())
                .env("WEB_HOST", name);
            let mut p = Proc::start(&format!("{name}/worker {i}"), cmd, None);
            p.expect("@@READY", Duration::from_secs(20));
            h.workers.push(p);
        }
        h
    }

    /// The bus socket.
    pub fn sock(&self) -> PathBuf {
        self.dir.join("ev.sock")
    }

    /// Start (or restart) the bridge with `args` (kept for restarts); returns once it says
    /// it is ready.
    pub fn start_bridge(&mut self, nats: &Nats, args: &[&str]) {
        if !args.is_empty() {
            self.bridge_args = args.iter().map(|s| s.to_string()).collect();
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker-events-bridge"));
        cmd.arg("--socket")
            .arg(self.sock())
            .args(["--workers", &WORKERS.to_string()])
            .args(["--unique-timeout-ms", &self.unique_ms.to_string()])
            .args(["--host-id", &self.name])
            .args(["--nats", &nats.url()])
            .args(["--stats-interval-secs", "1"])
            .args(&self.bridge_args)
            .env("RUST_LOG", std::env::var("BRIDGE_LOG").unwrap_or_else(|_| "info".to_string()))
            .env(process::PARENT_PID_ENV, std::process::id().to_string());
        let mut p = Proc::start(&format!("{}/bridge", self.name), cmd, Some(self.dir.join("bridge.log")));
        p.expect("worker-events-bridge ready", Duration::from_secs(20));
        self.bridge = Some(p);
    }

    /// SIGKILL the bridge.
    pub fn kill_bridge(&mut self) {
        if let Some(mut b) = self.bridge.take() {
            b.kill();
        }
    }

    /// Worker `i`'s record of tag `tag`.
    pub fn get(&mut self, i: usize, tag: &str) -> Rec {
        Rec::parse(&self.workers[i].cmd(&format!("get {tag}")))
    }

    /// Worker `i`'s `Stats` (Debug text), for failure messages.
    pub fn stats(&mut self, i: usize) -> String {
        self.workers[i].cmd("stats")
    }

    /// The bridge's log (for failure messages).
    pub fn bridge_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bridge.log")).unwrap_or_default()
    }
}

/// What a worker recorded of one publisher tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rec {
    /// Events received.
    pub n: u64,
    /// Received more than once.
    pub dups: u64,
    /// Every event after its predecessor (by index).
    pub ordered: bool,
    /// Lost notices relayed from the tag's host (the sum of their counts).
    pub lost: u64,
    /// Events received that came from another host (origin_host set).
    pub relayed: u64,
    /// Lost notices published on this host (a local publisher's events lost on their way
    /// to this worker), whatever their publisher.
    pub local_lost: u64,
}

impl Rec {
    fn parse(s: &str) -> Rec {
        let mut r = Rec::default();
        for kv in s.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let n = v.parse::<u64>().unwrap_or(0);
            match k {
                "n" => r.n = n,
                "dups" => r.dups = n,
                "ordered" => r.ordered = n == 1,
                "lost" => r.lost = n,
                "relayed" => r.relayed = n,
                "local_lost" => r.local_lost = n,
                _ => {}
            }
        }
        r
    }
}

/// Poll `f` every 20 ms until it returns true or `timeout` passes; whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Is `nats-server` installed? Tests fail (not skip) without it, with this message.
pub fn require_nats_server() {
    let ok = Command::new(nats_server()).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "nats-server is not installed (apt-get install nats-server; scripts/bridge-ci.sh does it in CI)");
}
