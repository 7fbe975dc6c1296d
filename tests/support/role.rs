//! The one child role: this test binary re-executed (`--exact child_entry --ignored`, see
//! [`child_entry!`](crate::child_entry)) joins as one worker, prints `@@READY` once attached,
//! then serves [`Cmd`]s, one per line of its stdin, each answered with `@@...` lines ending in
//! `@@OK` (or `@@ERR <text>`). While no command is pending it dispatches and runs its paced
//! publishers. Its life is tied to the parent's (`die_with_parent`): an orphan never lingers.
//!
//! The command grammar is [`Cmd`] (`cmd.rs`): this file executes it.

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use worker_events::{Events, PublishError, Target, Wid, Worker};
use worker_events_dev_support::process;

use super::cfg::{Cfg, Spawn};
use super::cmd::Cmd;
use super::record::{Rec, RunFiles, big_payload, record};
use super::{TYPED_LEN, pattern, wid_str};

/// A child exits by itself after this long, whatever happens (beside `die_with_parent`).
const CHILD_LIFETIME: Duration = Duration::from_secs(150);

/// Write one answer line (flushed: the parent reads line by line).
pub(crate) fn out(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}");
    let _ = o.flush();
}

/// A worker that cannot start answers `@@ERR <why>` and exits 2.
pub(crate) fn die(msg: &str) -> ! {
    out(&format!("@@ERR {msg}"));
    std::process::exit(2)
}

/// Paced publishing: `rate` events per millisecond from `start`, up to `end`.
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

    /// One more event published: counted here, and in `cell` for the parent (`support::sent`).
    fn count_sent(&mut self, cell: Option<&super::sent::SentCell>) {
        self.sent += 1;
        if let Some(c) = cell {
            c.store(self.sent);
        }
    }

    /// How many should have been sent by now (at most 2000 ahead of what was).
    fn due(&self) -> u64 {
        ((self.start.elapsed().as_secs_f64() * 1000.0 * self.rate) as u64).min(self.end).min(self.sent + 2000)
    }
}

/// Entry point of the child role; returns at once in a process that is not a child.
pub fn child_main() {
    if std::env::var_os(super::CHILD_ENV).is_none() {
        return;
    }
    if let Err(e) = process::die_with_parent() {
        eprintln!("child: {e}");
        std::process::exit(3);
    }
    super::trace::install_from_env();
    let cfg = Cfg::from_env().unwrap_or_else(|e| die(&e));
    let spawn = Spawn::from_env().unwrap_or_else(|e| die(&e));
    if let Some(frame) = &spawn.raw_frame {
        super::raw::client_main(&cfg, frame, spawn.raw_uid);
    }
    if spawn.tokio {
        super::tokio_role::main(&cfg, &spawn);
    }
    Role::start(&cfg, &spawn).serve()
}

/// The state of a child worker between commands.
struct Role {
    worker: Worker,
    wid: Wid,
    rec: Arc<Mutex<Rec>>,
    /// Command lines from the stdin thread; disconnected when the parent closes stdin.
    rx: Receiver<String>,
    /// A line read while a command was running (see `parent_gone`).
    pending: Option<String>,
    born: Instant,
    tick: Duration,
    paused: bool,
    wait_errors: u64,
    dispatch_errors: u64,
    early_errors: u64,
    early_unique_pending: u64,
    /// This incarnation's run event name, `i<inc>`.
    run_event: String,
    run: Option<Pace>,
    urun: Option<Pace>,
    big_run: Option<(usize, Pace)>,
    /// The run recorder's continuity table as the predecessors left it: (p, inc, 1 + last).
    cont_at_start: Vec<(u32, u32, u64)>,
    /// (runs) What the paced `All` run has published, for the parent to read while this
    /// process is stopped (`support::sent`).
    sent_cell: Option<super::sent::SentCell>,
}

impl Role {
    fn start(cfg: &Cfg, spawn: &Spawn) -> Role {
        let wid = spawn.wid;
        let runs = spawn.runs.as_ref().map(|r| {
            let Wid::Worker(slot) = wid else { die("the run recorder needs a worker slot") };
            RunFiles::open(r, slot, cfg.workers)
        });
        // What the predecessors of this slot received, before anything of ours runs.
        let cont_at_start = runs.as_ref().map_or_else(Vec::new, |f| f.cont.entries(cfg.workers));
        let sent_cell = spawn.runs.as_ref().map(|r| {
            let Wid::Worker(slot) = wid else { die("the run recorder needs a worker slot") };
            super::sent::SentCell::create(&r.dir, slot, r.inc)
        });
        if spawn.panic {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let msg = info.payload().downcast_ref::<&str>().copied().unwrap_or("");
                if !msg.contains("intentional test panic") {
                    default(info);
                }
            }));
        }
        let events = Events::new(cfg.options()).unwrap_or_else(|e| die(&format!("Events::new: {e}")));
        let mut worker = events.init_worker(wid).unwrap_or_else(|e| die(&format!("init_worker: {e}")));
        let rec = Arc::new(Mutex::new(Rec::default()));
        {
            let rec = rec.clone();
            worker.subscribe("*", "*", move |ev| record(&rec, runs.as_ref(), ev));
        }
        if spawn.reactor {
            super::callback::react(&mut worker);
        }
        if spawn.panic {
            worker.subscribe("boom", "*", |_| panic!("intentional test panic"));
            let rec = rec.clone();
            worker.subscribe("boom", "*", move |_| rec.lock().unwrap().after_panic += 1);
        }
        let (mut early_errors, mut early_unique_pending) = (0, 0);
        if let Some(e) = &spawn.early {
            if worker.is_ready() {
                die("early publish: already attached before the first publish");
            }
            for seq in 0..e.n {
                let hash = e.unique_prefix.as_ref().map(|p| format!("{p}{seq}"));
                let target = hash.as_deref().map_or(Target::All, Target::Unique);
                if let Err(err) = worker.publish(target, &e.src, &e.ev, &seq) {
                    eprintln!("early publish {seq}: {err}");
                    early_errors += 1;
                }
            }
            early_unique_pending = worker.stats().unique_pending;
        }
        match worker.wait_ready(Duration::from_secs(30)) {
            Ok(true) => {}
            Ok(false) => die("not ready after 30 s"),
            Err(e) => die(&format!("wait_ready: {e}")),
        }
        // stdin reader thread: lines -> channel; EOF (parent gone) disconnects the channel.
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        out(&format!(
            "@@READY {} broker={} transport={:?}",
            wid_str(Some(wid)),
            worker.is_broker(),
            worker.transport()
        ));
        Role {
            worker,
            wid,
            rec,
            rx,
            pending: None,
            born: Instant::now(),
            // Paced runs are published between waits: a shorter tick keeps them smooth.
            tick: Duration::from_millis(if spawn.runs.is_some() { 1 } else { 5 }),
            paused: false,
            wait_errors: 0,
            dispatch_errors: 0,
            early_errors,
            early_unique_pending,
            run_event: format!("i{}", spawn.runs.as_ref().map_or(0, |r| r.inc)),
            run: None,
            urun: None,
            big_run: None,
            cont_at_start,
            sent_cell,
        }
    }

    /// The command loop; never returns.
    fn serve(mut self) -> ! {
        loop {
            let line = match self.pending.take() {
                Some(l) => l,
                None if self.paused => self.rx.recv().unwrap_or_else(|_| std::process::exit(0)),
                None => match self.rx.try_recv() {
                    Ok(l) => l,
                    Err(TryRecvError::Empty) => {
                        self.publish_due();
                        self.pump();
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => std::process::exit(0),
                },
            };
            if line.trim().is_empty() {
                continue;
            }
            match line.parse::<Cmd>() {
                Ok(Cmd::Exit) => {
                    drop(self.worker);
                    out("@@OK");
                    std::process::exit(0);
                }
                Ok(Cmd::Close { ms }) => {
                    let start = Instant::now();
                    let r = self.worker.close(Duration::from_millis(ms));
                    let took = start.elapsed().as_secs_f64() * 1000.0;
                    out(&format!("@@CLOSED {} {took:.1}", r.map_or_else(|e| e.to_string(), |()| "ok".into())));
                    out("@@OK");
                    std::process::exit(0);
                }
                Ok(cmd) => {
                    self.exec(cmd);
                    out("@@OK");
                }
                Err(e) => out(&format!("@@ERR {e}")),
            }
        }
    }

    /// Exit if the parent closed stdin (checked inside long-running commands); a command line
    /// that arrives meanwhile is kept for the loop.
    fn exit_if_parent_gone(&mut self) {
        if self.pending.is_none() {
            match self.rx.try_recv() {
                Ok(l) => self.pending = Some(l),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => std::process::exit(0),
            }
        }
    }

    fn pump(&mut self) {
        if self.born.elapsed() > CHILD_LIFETIME {
            eprintln!("child {}: lifetime exceeded, exiting", self.wid);
            std::process::exit(3);
        }
        if let Err(e) = self.worker.wait(Some(self.tick)) {
            self.wait_errors += 1;
            eprintln!("child {}: wait error: {e}", self.wid);
        }
    }

    fn dispatch(&mut self) -> usize {
        self.worker.dispatch().unwrap_or_else(|e| {
            self.dispatch_errors += 1;
            eprintln!("child {}: dispatch error: {e}", self.wid);
            0
        })
    }

    /// events + lost counts received so far.
    fn received(&self) -> u64 {
        let r = self.rec.lock().unwrap();
        r.events + r.lost_total
    }

    /// Answer `@@PUB`/`@@PUBERR` for a single publish.
    fn answer_one(r: Result<(), PublishError>) {
        match r {
            Ok(()) => out("@@PUB 1 0"),
            Err(e) => {
                out(&format!("@@PUBERR {e}"));
                out("@@PUB 0 1");
            }
        }
    }

    /// Publish one event per `seq` with `publish`, a dispatch after each.
    fn publish_seqs(
        &mut self,
        seqs: std::ops::Range<u64>,
        mut publish: impl FnMut(&mut Worker, u64) -> Result<(), PublishError>,
    ) {
        let (mut ok, mut err) = (0u64, 0u64);
        for seq in seqs {
            match publish(&mut self.worker, seq) {
                Ok(()) => ok += 1,
                Err(e) => {
                    if err < 5 {
                        out(&format!("@@PUBERR {e}"));
                    }
                    err += 1;
                }
            }
            self.dispatch();
        }
        out(&format!("@@PUB {ok} {err}"));
    }

    /// [`Cmd::Fork`]. This process has threads (the stdin reader): the child only calls the
    /// library (whose fork check comes first), formats into memory and uses raw `write`,
    /// `sleep` and `_exit`.
    fn fork(&mut self, secs: u32) {
        let mut pipe = [0i32; 2];
        // SAFETY: a two-element array for pipe2.
        assert_eq!(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fork; the child below keeps to the calls listed in the doc comment.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let publish = self
                .worker
                .publish_bytes(Target::All, "fork", "child", b"x")
                .map_or_else(|e| e.to_string(), |()| "ok".into());
            let batch = {
                // A batch's publish, then its end (which must not commit for the parent).
                let mut b = self.worker.batch();
                b.publish_bytes(Target::All, "fork", "child", b"x").map_or_else(|e| e.to_string(), |()| "ok".into())
            };
            let dispatch = self.worker.dispatch().map_or_else(|e| e.to_string(), |n| format!("ok {n}"));
            let flush = if self.worker.flush() { "flushed".to_string() } else { "not flushed".to_string() };
            // Drop the inherited worker in the child (its drop must leave the parent's
            // slot, rings and broker role alone), and never touch the field again.
            // SAFETY: `self.worker` is not used after this; the child `_exit`s below.
            unsafe { std::ptr::drop_in_place(&mut self.worker) };
            let line = format!("@@FORKCHILD {}|{publish}|{batch}|{dispatch}|{flush}|dropped\n", std::process::id());
            // SAFETY: raw writes of owned buffers, then sleep and _exit (no destructors).
            unsafe {
                libc::write(1, line.as_ptr().cast(), line.len());
                libc::write(pipe[1], b"x".as_ptr().cast(), 1);
                libc::sleep(secs);
                libc::_exit(0);
            }
        }
        assert!(pid > 0, "fork failed");
        // SAFETY: closing our copy of the write end; the read end is ours.
        unsafe { libc::close(pipe[1]) };
        let mut b = 0u8;
        let mut fds = [libc::pollfd { fd: pipe[0], events: libc::POLLIN, revents: 0 }];
        // SAFETY: one pollfd; then a one-byte read into `b`.
        unsafe {
            libc::poll(fds.as_mut_ptr(), 1, 20_000);
            libc::read(pipe[0], (&mut b as *mut u8).cast(), 1);
            libc::close(pipe[0]);
        }
        out(&format!("@@FORKED {pid}"));
    }

    fn exec(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Publish { target, src, ev, start, count } => {
                self.publish_seqs(start..start + count, |w, seq| w.publish(target.target(), &src, &ev, &seq))
            }
            Cmd::Uniq { src, ev, prefix, start, count } => self.publish_seqs(start..start + count, |w, seq| {
                w.publish(Target::Unique(&format!("{prefix}{seq}")), &src, &ev, &seq)
            }),
            Cmd::Batch(items) => {
                let (mut ok, mut err) = (0u64, 0u64);
                for i in &items {
                    match self.worker.publish(i.target.target(), &i.src, &i.ev, &i.seq) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            out(&format!("@@PUBERR {e}"));
                            err += 1;
                        }
                    }
                }
                out(&format!("@@PUB {ok} {err}"));
            }
            Cmd::Burst { target, src, ev, start, count, hold_ms, leak } => {
                let (mut ok, mut err) = (0u64, 0u64);
                let mut batch = self.worker.batch();
                for seq in start..start + count {
                    match batch.publish(target.target(), &src, &ev, &seq) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            if err < 5 {
                                out(&format!("@@PUBERR {e}"));
                            }
                            err += 1;
                        }
                    }
                }
                out(&format!("@@HELD {ok} {err}"));
                std::thread::sleep(Duration::from_millis(hold_ms));
                if leak {
                    std::mem::forget(batch);
                } else {
                    batch.end();
                }
                out(&format!("@@PUB {ok} {err}"));
            }
            Cmd::Bytes { target, src, ev, len } => {
                Self::answer_one(self.worker.publish_bytes(target.target(), &src, &ev, &pattern(len)))
            }
            Cmd::Typed { target, src, ev, one_more } => {
                let t = target.target();
                Self::answer_one(if one_more {
                    self.worker.publish(t, &src, &ev, &typed_array::<{ TYPED_LEN + 1 }>())
                } else {
                    self.worker.publish(t, &src, &ev, &typed_array::<TYPED_LEN>())
                })
            }
            Cmd::Pump { ms } => {
                let limit = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < limit {
                    self.pump();
                }
            }
            Cmd::Until { n, ms } => {
                let limit = Instant::now() + Duration::from_millis(ms);
                let reached = loop {
                    if self.received() >= n {
                        break true;
                    }
                    if Instant::now() >= limit {
                        break false;
                    }
                    self.exit_if_parent_gone();
                    self.pump();
                };
                out(&format!("@@UNTIL {}", if reached { "reached" } else { "timeout" }));
            }
            Cmd::Park { n } => {
                out("@@PARKING");
                let mut calls = 0u64;
                let events = loop {
                    let got = self.received();
                    if got >= n {
                        break got;
                    }
                    calls += 1;
                    if let Err(e) = self.worker.wait(None) {
                        self.wait_errors += 1;
                        eprintln!("child {}: wait(None) error: {e}", self.wid);
                    }
                };
                out(&format!("@@PARKED {events} {calls}"));
            }
            Cmd::PollFd { ms } => self.poll_fd(Instant::now() + Duration::from_millis(ms)),
            Cmd::Pause => self.paused = true,
            Cmd::Resume => self.paused = false,
            Cmd::Report => self.report(),
            Cmd::Log => {
                for l in &self.rec.lock().unwrap().log {
                    out(&format!("@@LOG {l}"));
                }
            }
            Cmd::Exit | Cmd::Close { .. } => unreachable!("handled by `serve`: they end the worker"),
            Cmd::Fork { secs } => self.fork(secs),
            Cmd::Relay { host, target, src, ev, start, count } => self.publish_seqs(start..start + count, |w, seq| {
                w.publish_relayed(&host, target.target(), &src, &ev, &seq.to_le_bytes())
            }),
            Cmd::RelayLost { host, count } => Self::answer_one(self.worker.report_relayed_lost(&host, count)),
            Cmd::Divert(pats) => {
                let pats: Vec<(&str, &str)> = pats.iter().map(|(s, e)| (s.as_str(), e.as_str())).collect();
                match self.worker.divert_unique(&pats) {
                    Ok(()) => out("@@DIVERT ok"),
                    Err(e) => out(&format!("@@DIVERT {e}")),
                }
            }
            Cmd::Run { rate } => self.run = Some(Pace::new(rate, u64::MAX)),
            Cmd::RunStop => {
                let p = self.run.take().unwrap_or_else(|| die("run-stop: no run"));
                out(&format!("@@STOPPED {} {}", p.sent, p.errors));
            }
            Cmd::RunCount => out(&format!("@@COUNT {}", self.run.as_ref().map_or(0, |p| p.sent))),
            Cmd::RunBurst { n } => {
                let mut p = self.run.take().unwrap_or_else(|| Pace::new(0.0, u64::MAX));
                for _ in 0..n {
                    match self.worker.publish(Target::All, "seq", &self.run_event, &p.sent) {
                        Ok(()) => p.count_sent(self.sent_cell.as_ref()),
                        Err(_) => p.errors += 1,
                    }
                    let _ = self.worker.dispatch();
                }
                out(&format!("@@COUNT {} {}", p.sent, p.errors));
                self.run = Some(p);
            }
            Cmd::URun { rate, end } => self.urun = Some(Pace::new(rate, end)),
            Cmd::URunCount => {
                let (sent, end, errors) = self.urun.as_ref().map_or((0, 0, 0), |p| (p.sent, p.end, p.errors));
                out(&format!("@@UCOUNT {sent} {end} {} {errors}", self.worker.stats().unique_pending));
            }
            Cmd::BigRun { len } => self.big_run = Some((len, Pace::new(0.0, u64::MAX))),
            Cmd::BigRunStop => {
                let (_, p) = self.big_run.take().unwrap_or_else(|| die("big-run-stop: no big run"));
                out(&format!("@@STOPPED {} {}", p.sent, p.errors));
            }
            Cmd::Slow { us } => self.rec.lock().unwrap().slow_us = us,
            Cmd::Status => {
                out(&format!("@@STATUS {} {}", u8::from(self.worker.is_broker()), u8::from(self.worker.is_ready())))
            }
            Cmd::Brokers => {
                for (e, s, t) in &self.rec.lock().unwrap().brokers {
                    out(&format!("@@BROKER {e} {s} {t}"));
                }
            }
            Cmd::Drain { ms } => {
                let limit = Instant::now() + Duration::from_millis(ms);
                let busy = |w: &Worker| w.stats().peers.iter().any(|p| p.inbound_depth > 0);
                while busy(&self.worker) && Instant::now() < limit {
                    self.pump();
                }
                let reached = !busy(&self.worker);
                self.pump();
                out(&format!("@@DRAINED {}", if reached { "reached" } else { "timeout" }));
            }
            Cmd::Reach { ms, want } => {
                let limit = Instant::now() + Duration::from_millis(ms);
                let reached = loop {
                    let done = {
                        let r = self.rec.lock().unwrap();
                        // Reached by us, or already by a predecessor of this slot: a worker
                        // restarted after its predecessor got a run's last event gets none of it.
                        want.iter().all(|&(p, i, last)| {
                            r.runs.get(&(p, i)).is_some_and(|s| s.last >= last)
                                || self.cont_at_start.iter().any(|&(q, j, next)| (q, j) == (p, i) && next > last)
                        })
                    };
                    if done {
                        break true;
                    }
                    if Instant::now() >= limit {
                        break false;
                    }
                    self.pump();
                };
                out(&format!("@@REACH {}", if reached { "reached" } else { "timeout" }));
            }
        }
    }

    /// The paced runs: whatever is due since the last time.
    fn publish_due(&mut self) {
        let wid = self.wid;
        if let Some(p) = self.run.as_mut() {
            let due = p.due();
            while p.sent < due {
                match self.worker.publish(Target::All, "seq", &self.run_event, &p.sent) {
                    Ok(()) => p.count_sent(self.sent_cell.as_ref()),
                    Err(e) => {
                        p.errors += 1;
                        eprintln!("child {wid}: publish: {e}");
                        break;
                    }
                }
            }
        }
        if let Some(p) = self.urun.as_mut() {
            let due = p.due();
            while p.sent < due {
                let hash = format!("h{}", p.sent);
                match self.worker.publish(Target::Unique(&hash), "uniq", "u", &p.sent) {
                    Ok(()) => p.sent += 1,
                    Err(e) => {
                        p.errors += 1;
                        eprintln!("child {wid}: unique publish: {e}");
                        break;
                    }
                }
            }
        }
        if let Some((len, p)) = self.big_run.as_mut() {
            // As fast as the slowest receiver takes them (at most two waiting per peer).
            if self.worker.stats().peers.iter().all(|x| x.backlog < 2) {
                match self.worker.publish_bytes(Target::All, "big", &self.run_event, &big_payload(p.sent, *len)) {
                    Ok(()) => p.sent += 1,
                    Err(e) => {
                        p.errors += 1;
                        eprintln!("child {wid}: big publish: {e}");
                    }
                }
            }
        }
    }

    fn poll_fd(&mut self, limit: Instant) {
        while self.dispatch() > 0 {}
        out("@@POLLING");
        let (mut readable, mut dispatched, mut spurious) = (false, 0usize, 0u64);
        loop {
            let left = limit.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd { fd: self.worker.as_raw_fd(), events: libc::POLLIN, revents: 0 };
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
            match self.worker.dispatch() {
                Ok(0) => spurious += 1,
                Ok(n) => {
                    dispatched = n;
                    break;
                }
                Err(e) => {
                    self.dispatch_errors += 1;
                    eprintln!("child {}: dispatch error: {e}", self.wid);
                }
            }
        }
        out(&format!("@@POLLED {} {dispatched} {spurious}", u8::from(readable)));
    }

    /// The report (see `report.rs` for the lines).
    fn report(&self) {
        let r = self.rec.lock().unwrap();
        for ((w, s, e), seqs) in &r.streams {
            let list: Vec<String> = seqs.iter().map(|n| n.to_string()).collect();
            let list = if list.is_empty() { "-".to_string() } else { list.join(",") };
            out(&format!("@@STREAM {w} {s} {e} {list}"));
        }
        for ((p, i), s) in &r.runs {
            out(&format!(
                "@@RUN {p} {i} {} {} {} {} {} {} {}",
                s.first, s.last, s.count, s.bad, s.bad_payload, s.gaps, s.backwards
            ));
            for (a, b) in &s.examples {
                out(&format!("@@BADEX {p} {i} {a} {b}"));
            }
        }
        for (p, i, v) in &self.cont_at_start {
            out(&format!("@@CONT {p} {i} {v}"));
        }
        for (p, c) in &r.lost {
            out(&format!("@@LOST {p} {c}"));
        }
        for l in &r.lost_at {
            out(&format!("@@LOSTAT {l}"));
        }
        for (p, len, ok) in &r.payloads {
            out(&format!("@@PAYLOAD {p} {len} {}", u8::from(*ok)));
        }
        for (e, s, t) in &r.brokers {
            out(&format!("@@BROKER {e} {s} {t}"));
        }
        let st = self.worker.stats();
        let stats: [(&str, u64); 38] = [
            ("early_errors", self.early_errors),
            ("early_unique_pending", self.early_unique_pending),
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
            ("other", r.other),
            ("after_panic", r.after_panic),
            ("wait_errors", self.wait_errors),
            ("dispatch_errors", self.dispatch_errors),
            ("wakeups_sent", st.wakeups_sent),
            ("wake_writes", st.wake_writes),
            ("wakeups_received", st.wakeups_received),
            ("diverts", st.diverts),
            ("resumes", st.resumes),
            ("is_broker", u64::from(self.worker.is_broker())),
            ("is_ready", u64::from(self.worker.is_ready())),
            ("corrupt_rings", st.corrupt_rings),
            ("inbound_depth_sum", st.peers.iter().map(|p| p.inbound_depth).sum()),
            ("unique_diverted", st.unique_diverted),
            ("unique_not_diverted", st.unique_not_diverted),
            ("unique_resent", st.unique_resent),
            ("unique_rerouted", st.unique_rerouted),
            ("unique_unguarded", st.unique_unguarded),
        ];
        for (k, v) in stats {
            out(&format!("@@STAT {k} {v}"));
        }
    }
}

fn typed_array<const N: usize>() -> [u8; N] {
    pattern(N).try_into().expect("N bytes")
}
