//! Failover tests' cluster: a set of worker children with the run recorder (see `record.rs`),
//! killed and restarted by slot, with the bookkeeping that [`Cluster::finish_and_check`]
//! needs to check the failover invariants (ARCHITECTURE.md §G3 and §G4): every completed run
//! arrives whole, in order and once at every surviving receiver; a restarted receiver resumes
//! exactly where its killed predecessor stopped; nothing is lost unreported.
//!
//! Runs are named after the publisher's incarnation: slot `p` restarted for the `k`-th time
//! publishes event `i<k>` with sequence numbers from 0.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use worker_events::{Transport, Wid};

use super::cfg::{Cfg, Runs, Spawn};
use super::child::{Child, Watchdog};
use super::cmd::Cmd;
use super::report::Report;
use super::{SockPath, TempDir};

/// How long the live workers may take, once the chaos is over, to agree on one broker and
/// all be attached to it (the end check's liveness bound: generous for a loaded two-CPU
/// machine, where one failover takes well under a second idle; never a speed assertion).
/// A worker resumed (SIGCONT) or restarted just before the end may be between brokers then:
/// a stopped broker replaced meanwhile steps down when it runs again and its clients
/// re-attach to its successor, as do the clients of a broker killed meanwhile.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(10);

/// One running child.
pub struct Proc {
    pub child: Child,
    pub inc: u32,
    /// Logical time of its READY.
    pub born: u64,
}

/// One publisher incarnation's run.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// Logical time the run started.
    pub started: u64,
    /// Events published, once stopped (None while running, or if the publisher was killed).
    pub total: Option<u64>,
    pub killed: bool,
}

/// A set of worker processes with the run recorder, and the bookkeeping the checks need.
pub struct Cluster {
    pub wd: Watchdog,
    pub cfg: Cfg,
    pub dir: TempDir,
    pub procs: Vec<Option<Proc>>,
    next_inc: Vec<u32>,
    /// Logical time: one tick per spawn, run start and kill.
    pub clock: u64,
    pub streams: BTreeMap<(u32, u32), StreamInfo>,
    /// Slots that stream `All` events (their successors too), at this rate (events/ms).
    pub publishers: Vec<u32>,
    rate: f64,
    pub kills: u64,
    /// Lost notices tolerated per publisher slot (a message cut by a kill).
    pub allow_lost: BTreeMap<u32, u64>,
    /// The socket transport: losses across a broker crash are allowed, but each must be
    /// reported (a lost notice per gap), and a restarted receiver's continuity is not checked
    /// (what its predecessor's connection held died with it, reported the same way).
    socket: bool,
    /// (socket transport) Events skipped and reported, over all receivers.
    pub socket_losses: u64,
    /// (socket transport) Events a restarted receiver never got before its first of a run
    /// and nobody reported (they died with a broker before this slot saw the publisher).
    pub socket_unreported_prefix: u64,
    /// Paced runs of killed incarnations: at most this many events were published (the run
    /// count asked for just before the kill, or the stop, plus what the pace can add until the
    /// signal lands). Since issue 11 item 6(a) a killed publisher's backlog is reported lost,
    /// so a receiver may be told of up to this many, less what it got: never more.
    killed_sent_max: BTreeMap<(u32, u32), u64>,
    /// Stopped slots (SIGSTOP through [`Cluster::stop`]) and their run's bound at the stop.
    stopped: BTreeMap<u32, u64>,
    /// When a worker was last spawned, stopped, continued or killed (the settle time of the
    /// end check is reported from there).
    last_change: Instant,
}

impl Cluster {
    /// `workers` slots (none spawned yet) of a deployment `cfg_fn` adjusts; `publishers`
    /// stream at `rate` events/ms once started.
    pub fn new(name: &str, cfg_fn: impl FnOnce(&mut Cfg), workers: u32, publishers: &[u32], rate: f64) -> Cluster {
        let dir = TempDir::new(name);
        let mut cfg = Cfg::new(&dir.sock(), workers);
        cfg_fn(&mut cfg);
        Cluster {
            socket: cfg.transport == Transport::Socket,
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
            socket_unreported_prefix: 0,
            killed_sent_max: BTreeMap::new(),
            stopped: BTreeMap::new(),
            last_change: Instant::now(),
        }
    }

    /// Spawn the next incarnation of `slot`.
    pub fn spawn(&mut self, slot: u32) {
        let inc = self.next_inc[slot as usize];
        self.next_inc[slot as usize] += 1;
        let spawn =
            Spawn { runs: Some(Runs { inc, dir: self.dir.path().to_path_buf() }), ..Spawn::worker(Wid::Worker(slot)) };
        let child = self.wd.spawn_with(&self.cfg, &spawn);
        self.clock += 1;
        self.procs[slot as usize] = Some(Proc { child, inc, born: self.clock });
        self.last_change = Instant::now();
    }

    /// Start the `All` run of `slot` if it is a publisher slot.
    pub fn start_stream(&mut self, slot: u32) {
        if !self.publishers.contains(&slot) {
            return;
        }
        let rate = self.rate;
        let p = self.procs[slot as usize].as_mut().unwrap();
        p.child.cmd(Cmd::Run { rate });
        self.clock += 1;
        self.streams.insert((slot, p.inc), StreamInfo { started: self.clock, total: None, killed: false });
    }

    /// Spawn every slot, then start the runs.
    pub fn spawn_all(&mut self) {
        for s in 0..self.procs.len() as u32 {
            self.spawn(s);
        }
        for s in 0..self.procs.len() as u32 {
            self.start_stream(s);
        }
    }

    /// The live child of `slot`.
    pub fn proc(&mut self, slot: u32) -> &mut Child {
        &mut self.procs[slot as usize].as_mut().unwrap().child
    }

    /// The live slots.
    pub fn live(&self) -> Vec<u32> {
        (0..self.procs.len() as u32).filter(|&s| self.procs[s as usize].is_some()).collect()
    }

    /// (is_broker, is_ready) of a live slot.
    pub fn status(&mut self, slot: u32) -> (bool, bool) {
        let l = self.proc(slot).cmd(Cmd::Status);
        let f: Vec<&str> = l[0].split_whitespace().collect();
        (f[1] == "1", f[2] == "1")
    }

    /// The live broker, if any (two at once fail the test).
    pub fn broker(&mut self) -> Option<u32> {
        let b: Vec<u32> = self.live().into_iter().filter(|&s| self.status(s).0).collect();
        assert!(b.len() <= 1, "two brokers at once: {b:?}");
        b.first().copied()
    }

    /// SIGSTOP `slot` and wait until it is stopped; returns an upper bound of what its paced
    /// run published (None: `slot` has no paced run). Exact up to one event: the child
    /// stores its count after each publish (`support::sent`), and the parent reads it only
    /// once the kernel reports the child stopped. (Asking the child instead is no bound: a
    /// child that was stopped or starved answers before it catches up with its pace, then
    /// publishes up to 2000 more before the signal lands.)
    fn stop_and_count(&mut self, slot: u32) -> Option<u64> {
        let inc = self.procs[slot as usize].as_ref()?.inc;
        self.proc(slot).stop();
        self.last_change = Instant::now();
        if !self.publishers.contains(&slot) || !self.streams.contains_key(&(slot, inc)) {
            return None;
        }
        // The run started (its command was answered) before any signal: the file exists.
        Some(super::sent::read(self.dir.path(), slot, inc).expect("the run's sent file") + 1)
    }

    /// SIGSTOP a slot (noting its run's bound).
    pub fn stop(&mut self, slot: u32) {
        if let Some(b) = self.stop_and_count(slot) {
            self.stopped.insert(slot, b);
        }
    }

    /// SIGCONT a slot stopped with [`Cluster::stop`].
    pub fn cont(&mut self, slot: u32) {
        self.stopped.remove(&slot);
        self.proc(slot).signal(libc::SIGCONT);
        self.last_change = Instant::now();
    }

    /// SIGKILL a slot; returns the CLOCK_MONOTONIC time of the kill.
    pub fn kill(&mut self, slot: u32) -> u64 {
        let bound = match self.stopped.remove(&slot) {
            Some(b) => Some(b),
            None => self.stop_and_count(slot),
        };
        let p = self.procs[slot as usize].take().expect("live slot");
        if let Some(b) = bound {
            self.killed_sent_max.insert((slot, p.inc), b);
        }
        if let Some(s) = self.streams.get_mut(&(slot, p.inc)) {
            s.killed = true;
        }
        self.kills += 1;
        self.clock += 1;
        let killed = p.child.kill();
        self.last_change = Instant::now();
        killed
    }

    /// The report of a live slot.
    pub fn report(&mut self, slot: u32) -> Report {
        Report::parse(&self.proc(slot).cmd(Cmd::Report))
    }

    /// Stop every live run, wait until every live worker has every completed run to its end,
    /// and check the invariants. Returns the reports by slot.
    pub fn finish_and_check(&mut self) -> BTreeMap<u32, Report> {
        for s in self.live() {
            let inc = self.procs[s as usize].as_ref().unwrap().inc;
            let Some(info) = self.streams.get(&(s, inc)).cloned() else { continue };
            if info.killed || info.total.is_some() {
                continue;
            }
            let l = self.proc(s).cmd(Cmd::RunStop);
            let f: Vec<&str> = l[0].split_whitespace().collect();
            assert_eq!(f[2], "0", "w{s}: publish errors");
            self.streams.get_mut(&(s, inc)).unwrap().total = Some(f[1].parse().unwrap());
        }
        let want: Vec<(u32, u32, u64)> =
            self.streams.iter().filter_map(|(&(p, i), s)| s.total.filter(|&t| t > 0).map(|t| (p, i, t - 1))).collect();
        let left = self.wd.remaining().saturating_sub(Duration::from_secs(5)).as_millis() as u64;
        for s in self.live() {
            let l = self.proc(s).cmd(Cmd::Reach { ms: left, want: want.clone() });
            if !l.iter().any(|x| x == "@@REACH reached") {
                let r = self.report(s);
                panic!(
                    "w{s}: streams not complete: want {want:?}, got {:?}; lost notices {:?}\n{}--- end ---",
                    r.runs,
                    r.lost_at,
                    self.all_stderr()
                );
            }
        }
        // Every live worker attached to the one broker (the reports below check it again).
        self.wait_settled(SETTLE_WITHIN);
        let settled = self.last_change.elapsed();
        let mut reports = BTreeMap::new();
        for s in self.live() {
            reports.insert(s, self.report(s));
        }
        let mut interrupted = 0;
        let mut resumed = 0;
        for (&s, r) in &reports {
            let me = self.procs[s as usize].as_ref().unwrap();
            let ctx = format!("receiver w{s} (incarnation {})", me.inc);
            let lost = r.lost_by_slot();
            assert_eq!(r.stat("other"), 0, "{ctx}: unexpected events");
            assert_eq!(r.stat("dropped"), 0, "{ctx}: malformed messages");
            assert_eq!(r.stat("wait_errors"), 0, "{ctx}: Worker::wait failed (see its stderr)");
            assert_eq!(r.stat("lost"), lost.values().sum::<u64>(), "{ctx}: lost events: {lost:?}");
            if self.socket {
                // Nothing lost silently inside a run: per publisher slot, the events skipped
                // inside its runs are at most the counts of the lost notices received; never
                // a repeat. A lost notice may also cover a run's prefix: the events between
                // where this slot's predecessors stopped (0 if they never saw the run) and
                // the first this receiver got. Since issue 11 item 8(b) the broker also
                // reports what a killed predecessor was sent and never acknowledged, which
                // includes the events it dispatched after its last acknowledgement the broker
                // read (the pass it died in; more while flow control held its connection):
                // so the notices are at most gaps + prefixes + what the predecessors
                // dispatched of those runs. Prefix events not reported died with a broker
                // before this slot ever saw the publisher (nothing can tell them).
                let mut gaps: BTreeMap<u32, u64> = BTreeMap::new();
                let mut prefixes: BTreeMap<u32, u64> = BTreeMap::new();
                let mut dispatched: BTreeMap<u32, u64> = BTreeMap::new();
                for (&(p, i), g) in &r.runs {
                    assert_eq!(g.backwards, 0, "{ctx}: stream from w{p} duplicated or reordered: {g:?}");
                    *gaps.entry(p).or_default() += g.gaps;
                    let expected_first = r.cont.get(&(p, i)).copied().unwrap_or(0);
                    *prefixes.entry(p).or_default() += g.first.saturating_sub(expected_first);
                }
                for (&(p, _), &n) in &r.cont {
                    *dispatched.entry(p).or_default() += n;
                }
                for p in gaps.keys().chain(lost.keys()).copied().collect::<BTreeSet<_>>() {
                    let (g, l) = (gaps.get(&p).copied().unwrap_or(0), lost.get(&p).copied().unwrap_or(0));
                    let pre = prefixes.get(&p).copied().unwrap_or(0);
                    let before = dispatched.get(&p).copied().unwrap_or(0);
                    let runs: Vec<_> = r.runs.iter().filter(|((q, _), _)| *q == p).collect();
                    let cont: Vec<_> = r.cont.iter().filter(|((q, _), _)| *q == p).collect();
                    assert!(
                        g <= l && l <= g + pre + before,
                        "{ctx}: {g} events from w{p} missing inside runs and {pre} before their first, {l} reported \
                         lost; runs {runs:?}; predecessors stopped at {cont:?}"
                    );
                    self.socket_unreported_prefix += (g + pre).saturating_sub(l);
                }
                self.socket_losses += gaps.values().sum::<u64>();
            }
            for (p, n) in &lost {
                if self.socket {
                    break;
                }
                // What the killed incarnations of `p` published that this receiver (or its
                // predecessors) did not get: what their backlogs could have owed it.
                let owed: u64 = self
                    .killed_sent_max
                    .iter()
                    .filter(|((q, _), _)| q == p)
                    .map(|(&(q, i), &max)| {
                        let next = r
                            .runs
                            .get(&(q, i))
                            .map_or_else(|| r.cont.get(&(q, i)).copied().unwrap_or(0), |g| g.last + 1);
                        max.saturating_sub(next)
                    })
                    .sum();
                let allowed = self.allow_lost.get(p).copied().unwrap_or(0) + owed;
                if *n > allowed {
                    // Everything that tells where the count came from.
                    let pre = format!("w{p} ");
                    let notices: Vec<_> = r.lost_at.iter().filter(|l| l.starts_with(&pre)).collect();
                    let runs: Vec<_> = r.runs.iter().filter(|((q, _), _)| q == p).collect();
                    let cont: Vec<_> = r.cont.iter().filter(|((q, _), _)| q == p).collect();
                    let bounds: Vec<_> = self.killed_sent_max.iter().filter(|((q, _), _)| q == p).collect();
                    let se = self.procs[s as usize].as_ref().unwrap().child.stderr();
                    panic!(
                        "{ctx}: {n} events from w{p} lost (tolerated: {allowed}, of which {owed} unreceived from \
                         killed incarnations)\nnotices: {notices:?}\nruns: {runs:?}\npredecessors stopped at: \
                         {cont:?}\nkilled incarnations' bounds: {bounds:?}\n--- receiver stderr ---\n{se}\n--- end ---"
                    );
                }
            }
            assert_eq!(r.stat("is_ready"), 1, "{ctx}: not ready at the end");
            let mut skipped = 0;
            for (&(p, i), info) in &self.streams {
                let got = r.runs.get(&(p, i));
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
        let checked: u64 = reports.values().flat_map(|r| r.runs.values().map(|s| s.count)).sum();
        eprintln!(
            "{}: {} kills, {} publisher incarnations ({} killed); {checked} deliveries checked on {} surviving \
             receivers ({total} events from surviving publishers); {resumed} streams resumed by a restarted \
             receiver exactly where its killed predecessor stopped ({interrupted} one message later: a callback \
             interrupted by the kill); one broker with every worker attached to it {:.0} ms after the last spawn, \
             stop, continue or kill at the latest",
            self.name(),
            self.kills,
            self.streams.len(),
            self.streams.values().filter(|s| s.killed).count(),
            reports.len(),
            settled.as_secs_f64() * 1000.0
        );
        reports
    }

    /// Wait until one live worker is the broker and every other one is attached (after a
    /// takeover from a stopped broker, the resumed one still takes itself for the broker until
    /// it runs and steps down: its clients are still attached to it, and lose it then).
    /// Fails after `limit` naming the workers that were not, with every live worker's stderr.
    pub fn wait_settled(&mut self, limit: Duration) {
        let t0 = Instant::now();
        let mut first = true;
        loop {
            let st: Vec<(u32, (bool, bool))> = self.live().into_iter().map(|s| (s, self.status(s))).collect();
            let brokers: Vec<u32> = st.iter().filter(|(_, (b, _))| *b).map(|&(s, _)| s).collect();
            let detached: Vec<u32> = st.iter().filter(|(_, (_, r))| !*r).map(|&(s, _)| s).collect();
            if brokers.len() == 1 && detached.is_empty() {
                return;
            }
            if first {
                eprintln!("{}: not settled yet at the end: brokers {brokers:?}, not ready {detached:?}", self.name());
                first = false;
            }
            if t0.elapsed() >= limit {
                panic!(
                    "{}: not settled {limit:?} after the end: brokers {brokers:?}, not ready {detached:?}\n{}--- end ---",
                    self.name(),
                    self.all_stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every live worker's stderr (with `WE_CHILD_TRACE=1`, the library's warnings).
    fn all_stderr(&self) -> String {
        let mut all = String::new();
        for t in self.live() {
            let c = &self.procs[t as usize].as_ref().unwrap().child;
            all.push_str(&format!("--- w{t} stderr ---\n{}", c.stderr()));
        }
        all
    }

    fn name(&self) -> String {
        self.dir.path().file_name().unwrap().to_string_lossy().into_owned()
    }
}

/// Every unique delivery logged by the run recorders in `dir` (the files survive kills):
/// payload -> how many times delivered.
pub fn unique_deliveries(dir: &Path) -> BTreeMap<u64, u64> {
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
