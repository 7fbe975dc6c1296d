//! The parent's side of a child: [`Watchdog`] spawns children (and kills them all when the
//! test's deadline passes, even if the test thread is stuck elsewhere); [`Child`] sends
//! [`Cmd`]s and reads the answers, every read bounded by that deadline. Dropping a `Child`
//! kills and reaps it; [`Child::kill`] does so on purpose.
//!
//! No sleeps are used for synchronization: every step waits for an acknowledgement.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use worker_events::{Transport, Wid};
use worker_events_dev_support::{monotonic_ns, process};

use super::cfg::{Cfg, Spawn};
use super::cmd::{Cmd, Tgt};
use super::report::{PubResult, Report};
use super::{CHILD_ENV, TEST_TIMEOUT, wid_str};

/// Kills every registered child when the deadline passes (the test then fails on the
/// closed pipe), even if the test thread is stuck somewhere else.
pub struct Watchdog {
    pids: Arc<Mutex<Vec<u32>>>,
    stop: Option<Sender<()>>,
    pub deadline: Instant,
    name: String,
}

impl Watchdog {
    /// A watchdog for the test `name`, with [`TEST_TIMEOUT`] from now.
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

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Spawn the worker `wid` and wait for its `@@READY`.
    pub fn spawn(&self, cfg: &Cfg, wid: Wid) -> Child {
        self.spawn_with(cfg, &Spawn::worker(wid))
    }

    /// Spawn a worker described by `spawn` and wait for its `@@READY`.
    pub fn spawn_with(&self, cfg: &Cfg, spawn: &Spawn) -> Child {
        let mut child = self.spawn_inner(cfg, spawn);
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

    /// [`Self::spawn_with`] for a test process that serves as the broker itself: its
    /// worker `w` runs its event loop (answering the child's attach) until the child's
    /// `@@READY`.
    pub fn spawn_serving(&self, cfg: &Cfg, spawn: &Spawn, w: &mut worker_events::Worker) -> Child {
        let mut child = self.spawn_inner(cfg, spawn);
        let l = loop {
            match child.lines.try_recv() {
                Ok(l) => break l,
                Err(std::sync::mpsc::TryRecvError::Empty) if Instant::now() < child.deadline => {
                    if let Err(e) = w.wait(Some(Duration::from_millis(10))) {
                        child.fail(&format!("the serving worker failed: {e}"));
                    }
                }
                Err(_) => child.fail("no @@READY before the deadline (or the child died)"),
            }
        };
        if !l.starts_with("@@READY") {
            child.fail(&format!("expected @@READY, got {l:?}"));
        }
        child.transport = l.rsplit("transport=").next().unwrap_or("").to_string();
        child
    }

    /// Spawn a child in the raw-client role (see [`Spawn::raw`]): it starts no worker and
    /// answers without `@@READY`.
    pub fn spawn_raw(&self, cfg: &Cfg, spawn: &Spawn) -> Child {
        assert!(spawn.raw_frame.is_some(), "spawn_raw without a frame");
        self.spawn_inner(cfg, spawn)
    }

    /// Spawn the worker `wid` expecting its start to fail; returns its `@@ERR` line.
    pub fn spawn_expect_err(&self, cfg: &Cfg, wid: Wid) -> String {
        self.spawn_inner(cfg, &Spawn::worker(wid)).next_line()
    }

    fn spawn_inner(&self, cfg: &Cfg, spawn: &Spawn) -> Child {
        let mut cmd = process::reexec().expect("current_exe");
        cmd.args(["--exact", "child_entry", "--ignored", "--nocapture"])
            .env(CHILD_ENV, "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Only what the key tables say: nothing of the parent's own settings leaks through.
        for k in Cfg::KEYS.iter().chain(Spawn::KEYS) {
            cmd.env_remove(k);
        }
        cmd.envs(cfg.env()).envs(spawn.env());
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
            name: format!("{}/{}", self.name, wid_str(Some(spawn.wid))),
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
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
    }
}

/// One child process. Dropping it SIGKILLs and reaps it.
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
    /// Fail the test, with the child's stderr.
    pub fn fail(&self, msg: &str) -> ! {
        let se = self.stderr.lock().unwrap().clone();
        panic!("child {}: {msg}\n--- child stderr ---\n{se}\n--- end ---", self.name);
    }

    /// What the child wrote on its stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next answer line (the test fails at the deadline).
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

    /// Send a command without waiting for its answer.
    pub fn send(&mut self, cmd: Cmd) {
        let r = self.stdin.as_mut().map(|s| writeln!(s, "{cmd}").and_then(|_| s.flush()));
        if !matches!(r, Some(Ok(()))) {
            self.fail(&format!("cannot write command {cmd}"));
        }
    }

    /// Collect the answer lines of one command, up to its `@@OK`.
    pub fn expect_ok(&mut self) -> Vec<String> {
        self.expect_ok_within(self.deadline.saturating_duration_since(Instant::now()), "watchdog")
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

    /// Send a command and collect its answer lines.
    pub fn cmd(&mut self, cmd: Cmd) -> Vec<String> {
        self.send(cmd);
        self.expect_ok()
    }

    /// Publish `count` u64 events `start..` (see [`Cmd::Publish`]).
    pub fn publish(&mut self, target: Tgt, src: &str, ev: &str, start: u64, count: u64) -> PubResult {
        let lines = self.cmd(Cmd::publish(target, src, ev, start, count));
        PubResult::parse(&lines)
    }

    /// The outcome of a publish command sent earlier with [`Child::send`].
    pub fn publish_end(&mut self) -> PubResult {
        let lines = self.expect_ok();
        PubResult::parse(&lines)
    }

    /// Dispatch until `n` events (lost counts included) have been received, for at most
    /// `limit`; false if that did not happen.
    pub fn until_within(&mut self, n: u64, limit: Duration) -> bool {
        let lines = self.cmd(Cmd::Until { n, ms: limit.as_millis() as u64 });
        lines.iter().any(|l| l == "@@UNTIL reached")
    }

    /// Dispatch until `n` events (lost counts included) have been received in total; fails
    /// the test with the child's report if that does not happen before the deadline.
    pub fn until(&mut self, n: u64) {
        let left = self.deadline.saturating_duration_since(Instant::now()).saturating_sub(Duration::from_secs(5));
        if !self.until_within(n, left) {
            let r = self.report();
            let lens: Vec<String> =
                r.streams.iter().map(|((w, s, e), v)| format!("{w}/{s}/{e}: {} events", v.len())).collect();
            self.fail(&format!(
                "watchdog: never received {n} events; streams {lens:?}; lost {:?}; stats {:?}",
                r.lost, r.stats
            ));
        }
    }

    /// The child's report.
    pub fn report(&mut self) -> Report {
        let lines = self.cmd(Cmd::Report);
        Report::parse(&lines)
    }

    /// The list recorder's arrival log.
    pub fn log(&mut self) -> Vec<String> {
        self.cmd(Cmd::Log).into_iter().filter_map(|l| l.strip_prefix("@@LOG ").map(str::to_string)).collect()
    }

    /// Ask the child to drop its worker and exit; reap it.
    pub fn exit(mut self) {
        self.cmd(Cmd::Exit);
        self.reap();
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

    /// Send `sig` to the child process (SIGSTOP, SIGCONT...; [`Child::kill`] for SIGKILL).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid this harness spawned and has not reaped yet.
        let r = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed: {}", self.pid, std::io::Error::last_os_error());
    }

    /// SIGSTOP the child and wait until the kernel reports it stopped: kill(2) returns before
    /// the target stops, and a child still running for a moment reads what the test meant
    /// to leave unread (seen under load about once in 100 runs of a test that stops a broker
    /// and then publishes into its socket).
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
        super::procfs::wait_stopped(self.pid);
    }

    /// SIGKILL the child wherever it is (its stdin still open, so it cannot see EOF and exit
    /// by itself first), then reap it. Returns the CLOCK_MONOTONIC time of the kill.
    pub fn kill(mut self) -> u64 {
        self.unregister();
        let t = monotonic_ns();
        if let Some(p) = self.proc.as_mut() {
            let _ = p.kill();
        }
        self.reap();
        t
    }

    /// The watchdog no longer kills this pid (it is about to be reaped).
    fn unregister(&self) {
        self.pids.lock().unwrap().retain(|&p| p != self.pid);
    }

    fn reap(&mut self) {
        self.unregister();
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
