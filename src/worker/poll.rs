//! Dispatch, wait and control pacing: a dispatch pass looks at the control sockets only
//! when something says so (readiness, a hint in shared memory, queued output, a retry due)
//! or at most every [`CONTROL_INTERVAL`] while busy, then runs our own queue and drains the
//! data path.
//!
//! `wait` has no spin phase: it arms the parked flag (once per sleep) and sleeps in
//! `epoll_wait` at once, so crossbeam-utils' `Backoff` has no step to drive here (a spinning
//! receiver is what busy-poll mode is for, and there the caller owns the loop). `dispatch`
//! spins briefly only while a stream is flowing (see [`STREAM_SPIN`]).
//!
//! The eventfd sits in the epoll set edge-triggered and is never read: a wake-up that
//! `wait`'s own `epoll_wait` reported costs the receiver that one syscall (the raw
//! eventfd + epoll baseline's count); a wake-up noticed otherwise (the flag was cleared
//! while we were not in our `epoll_wait`: an external poller, a dispatch loop) is harvested
//! with one `epoll_wait(0)` so that the fd stops being readable.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use super::Worker;
use super::delivery::Delivery;
use crate::control::{TOKEN_CLIENT, TOKEN_EVENTFD, TOKEN_LISTENER, TOKEN_TIMER};
use crate::error::{Error, Result};
use crate::sys::{self, Epoll};
use crate::transport::Drained;
use crate::wire::Connections;

/// Dispatch calls between two looks at the clock while busy-polling.
const CONTROL_EVERY: u32 = 256;
/// While busy (never sleeping in `wait`), look at the control sockets at most this often:
/// one `epoll_wait(0)`, and the control work only if a control socket is ready.
const CONTROL_INTERVAL: Duration = Duration::from_millis(1);

/// A dispatch that finds nothing soon after one that delivered (a stream is flowing) keeps
/// polling the rings this long before arming the wake-up and returning 0: the next event
/// of a stream with gaps shorter than this then costs no syscall on either side.
const STREAM_SPIN: Duration = Duration::from_micros(20);
/// Ring polls between two looks at the clock while spinning for a stream.
const SPIN_POLLS: u32 = 32;

/// The longest [`Worker::wait`] sleeps on shared memory before it re-checks its rings and
/// backlogs without being woken: the bound on a wake-up lost to a crash. A publisher (or a
/// consumer freeing room) that is killed after it claimed the sleeper's wake-up (cleared
/// its `parked` flag, see `notify.rs`) and before it wrote the eventfd leaves committed work
/// and no wake-up on its way; nothing but a timeout can notice that. The bound costs a
/// normal parked hop nothing (it is the timeout argument of the same `epoll_wait`) and an
/// idle worker one `epoll_wait` return, one pass over its rings and one arm per period.
/// A worker asleep in the caller's own poller is woken by its re-check timer ([`Recheck`]),
/// at the same period (see ARCHITECTURE.md, liveness).
pub(crate) const RECHECK_PERIOD: Duration = Duration::from_millis(100);

/// The epoll token of the re-check timer (the control tokens are 0 to 3, then 16 up).
const TOKEN_RECHECK: u64 = 4;
const _: () = assert!(
    TOKEN_RECHECK != TOKEN_EVENTFD
        && TOKEN_RECHECK != TOKEN_LISTENER
        && TOKEN_RECHECK != TOKEN_CLIENT
        && TOKEN_RECHECK != TOKEN_TIMER
);

/// The re-check timer of a worker on shared memory: a timerfd firing every
/// [`RECHECK_PERIOD`], registered edge-triggered, so that a worker asleep in the *caller's*
/// poller also looks at its rings at least that often. It is read (one syscall) each time an
/// `epoll_wait` of ours reports it: a periodic timerfd is re-armed only by a read. [`Worker::wait`] needs no timer (its sleep has a timeout);
/// this is for the worker's fd in an external poller, which only our epoll set can wake.
///
/// An edge stays in our epoll set's ready list, keeping the worker's fd readable, until one
/// of our `epoll_wait`s reports it. `wait`'s own sleeps do; for a caller's poller, the first
/// `dispatch` that finds nothing after the timer's due time harvests it with one
/// `epoll_wait(0)` (at most one syscall per period, on an idle call, never per event), and
/// goes on harvesting on its idle calls until the edge is seen, so that the caller's poller
/// never spins on a readable fd.
#[derive(Debug)]
pub(super) struct Recheck {
    fd: OwnedFd,
    /// When the timer was started; it fires at `start + k * RECHECK_PERIOD`.
    start: Instant,
    /// The first expiry whose edge no `epoll_wait` of ours has reported yet (due time).
    due: Instant,
}

impl Recheck {
    fn new(epoll: &Epoll) -> std::io::Result<Recheck> {
        // Taken before the timer starts: every expiry comes at or after its due time here.
        let start = Instant::now();
        let fd = sys::timerfd(RECHECK_PERIOD)?;
        epoll.add_edge_triggered(fd.as_fd(), TOKEN_RECHECK)?;
        Ok(Recheck { fd, start, due: start + RECHECK_PERIOD })
    }

    /// An `epoll_wait` at `now` reported the timer: read it (which re-arms it), and every
    /// expiry up to `now` is consumed.
    fn seen(&mut self, now: Instant) {
        sys::timerfd_read(self.fd.as_fd());
        let period = RECHECK_PERIOD.as_nanos() as u64;
        let since = now.duration_since(self.start).as_nanos() as u64;
        self.due = self.start + Duration::from_nanos((since / period + 1) * period);
    }
}

/// When to look at the control sockets, and the state of the wake-up.
#[derive(Debug)]
pub(super) struct Pacing {
    pub(super) last_control: Instant,
    pub(super) busy_poll: bool,
    /// Passes (and events) left before the next look at the clock.
    pub(super) countdown: u32,
    /// Epoll tokens seen ready and not yet handled (the eventfd's excluded).
    pub(super) tokens: Vec<u64>,
    /// Since the last arm, an `epoll_wait` of ours reported the eventfd: the edge of the
    /// wake-up is consumed, nothing to harvest.
    pub(super) edge_seen: bool,
    /// When a dispatch last found nothing, and whether events were delivered since.
    pub(super) idle_at: Option<Instant>,
    pub(super) delivered_since_idle: bool,
    /// The last `dispatch` found nothing and armed: if the next one finds nothing either,
    /// something other than an event made the caller call it (a timer of ours made the fd
    /// readable), so it looks at the control sockets at once (see [`Worker::dispatch`]).
    pub(super) idle_streak: bool,
    /// The re-check timer, created at the first arm on shared memory.
    pub(super) recheck: Option<Recheck>,
    /// Creating the re-check timer failed (logged once): `wait` still bounds its sleeps,
    /// a caller's poller falls back on the control timer.
    pub(super) recheck_unavailable: bool,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            last_control: Instant::now(),
            busy_poll: false,
            countdown: 0,
            tokens: Vec::new(),
            edge_seen: false,
            idle_at: None,
            delivered_since_idle: false,
            idle_streak: false,
            recheck: None,
            recheck_unavailable: false,
        }
    }
}

impl Pacing {
    /// `epoll_wait` up to `ms`, keeping the control tokens (and noting an eventfd edge).
    pub(super) fn epoll_wait(&mut self, epoll: &Epoll, ms: i32) -> Result<()> {
        let mut tokens = std::mem::take(&mut self.tokens);
        let r = epoll.wait(&mut tokens, ms).map_err(|e| Error::io("epoll_wait", e));
        let before = tokens.len();
        tokens.retain(|t| *t != TOKEN_EVENTFD);
        self.edge_seen |= tokens.len() != before;
        let before = tokens.len();
        tokens.retain(|t| *t != TOKEN_RECHECK);
        if tokens.len() != before {
            if let Some(r) = self.recheck.as_mut() {
                r.seen(Instant::now());
            }
        }
        self.tokens = tokens;
        r
    }

    /// Before arming on shared memory: create the re-check timer if there is none yet, and
    /// (`idle`: a `dispatch` about to return 0) harvest its edge once it is due.
    fn before_arm(&mut self, epoll: &Epoll, idle: bool) -> Result<()> {
        match self.recheck.as_ref() {
            None if self.recheck_unavailable => Ok(()),
            None => {
                match Recheck::new(epoll) {
                    Ok(r) => self.recheck = Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create the re-check timer; a lost wake-up is bounded by the control timer in a caller's poller");
                        self.recheck_unavailable = true;
                    }
                }
                Ok(())
            }
            Some(r) if idle && Instant::now() >= r.due => self.epoll_wait(epoll, 0),
            Some(_) => Ok(()),
        }
    }

    /// The listener was reported ready; forget the tokens (the control poll handles them all).
    pub(super) fn take_listener_ready(&mut self) -> bool {
        let ready = self.tokens.contains(&TOKEN_LISTENER);
        self.tokens.clear();
        ready
    }
}

impl Worker {
    /// Run the callbacks of every event that has arrived; never blocks. Returns the number
    /// of events dispatched (lost notices included).
    ///
    /// When it returns 0 (outside [busy-poll mode](Worker::set_busy_poll)) the wake-up is
    /// armed: the worker's fd ([`AsFd`](std::os::fd::AsFd)) turns readable, with a new edge,
    /// when the next event arrives, and the publisher of that event writes an eventfd. So
    /// that a stream of events into a worker that keeps calling `dispatch` costs no syscall
    /// per event, a call that finds nothing *while a stream is flowing* (events were
    /// delivered since the previous call that found nothing, and that call was less than
    /// 20 µs ago) first keeps polling the rings for up to 20 µs, without arming, and
    /// dispatches the next event if it comes in that time. A call after a quiet period
    /// (the usual last call of "dispatch until 0" after a wake-up) arms at once and
    /// returns without spinning.
    ///
    /// The fd also turns readable, once per expiry, for the worker's timers: its control
    /// timer (heartbeats, broker checks) and a re-check every 100 ms that bounds a wake-up
    /// lost to a killed publisher (see [`Worker::wait`]). A call that finds nothing right
    /// after a call that found nothing takes them out of the fd's readiness (one
    /// `epoll_wait(0)`, at most once a millisecond), so a caller's poller is woken once per
    /// expiry, never spun.
    ///
    /// # Errors
    /// An attach refused by the broker (reported once), or a failure to set up the broker
    /// role. Callback panics are not errors: they are caught, logged and counted.
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert_eq!(w.dispatch().unwrap(), 0);
    /// ```
    pub fn dispatch(&mut self) -> Result<usize> {
        self.check_fork()?;
        self.dispatch_and(true)
    }

    /// [`Worker::dispatch`]; `arm`: arm the wake-up (after a stream spin) when nothing is
    /// found. `wait` arms by itself, once per sleep.
    fn dispatch_and(&mut self, arm: bool) -> Result<usize> {
        if self.path.is_in_process() {
            // Testing mode: only what callbacks published during the last call waits.
            return Ok(self.send_queued());
        }
        let mut total = 0;
        let mut rounds = 0;
        if arm && std::mem::take(&mut self.pacing.idle_streak) {
            // Called again after a call that found nothing: a caller's poller found our fd
            // readable. If this pass finds nothing either, the control look (at most one
            // `epoll_wait(0)` a millisecond) takes the ready timer out of the epoll set
            // now, rather than after `CONTROL_EVERY` more calls that would each find the fd
            // readable again: a level-triggered timer would make the caller's poller spin.
            self.pacing.countdown = self.pacing.countdown.min(1);
        }
        loop {
            rounds += 1;
            let (n, more) = self.pass()?;
            total += n;
            if n > 0 || more || self.pacing.busy_poll || rounds > 4 || !arm {
                break;
            }
            if self.stream_spin() {
                continue;
            }
            // Idle: arm so that the fd turns readable (and `wait` can sleep) when work comes.
            if self.path.shm().is_some() {
                self.pacing.before_arm(&self.epoll, true)?;
            }
            self.pacing.edge_seen = false;
            if self.path.arm() {
                self.pacing.idle_streak = total == 0;
                break;
            }
        }
        self.pacing.delivered_since_idle |= total > 0;
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        Ok(total)
    }

    /// Nothing found: if a stream is flowing, poll the rings for up to [`STREAM_SPIN`] before
    /// arming. True when a record arrived meanwhile.
    fn stream_spin(&mut self) -> bool {
        if self.path.shm().is_none() {
            return false; // the sockets wake epoll by themselves; nothing to save
        }
        let now = Instant::now();
        let p = &mut self.pacing;
        let flowing = p.delivered_since_idle && p.idle_at.is_some_and(|t| now.duration_since(t) < STREAM_SPIN);
        p.delivered_since_idle = false;
        p.idle_at = Some(now);
        if !flowing {
            return false;
        }
        loop {
            for _ in 0..SPIN_POLLS {
                if self.path.has_inbound() {
                    return true;
                }
                std::hint::spin_loop();
            }
            let t = Instant::now();
            if t.duration_since(now) >= STREAM_SPIN {
                self.pacing.idle_at = Some(t);
                return false;
            }
        }
    }

    /// One dispatch pass. Shared memory: see [`Worker::rings_pass`]. Otherwise control,
    /// then the data path (socket frames), then our own queue.
    fn pass(&mut self) -> Result<(usize, bool)> {
        if self.path.disarm() {
            self.stats.wakeups_received += 1;
            if !std::mem::take(&mut self.pacing.edge_seen) {
                // Woken while not in our own epoll_wait (an external poller, or a dispatch
                // loop): consume the eventfd's edge so that the fd stops being readable.
                self.pacing.epoll_wait(&self.epoll, 0)?;
            }
        }
        if self.path.shm().is_some() {
            return self.rings_pass();
        }
        if self.control_due()? {
            self.poll_control()?;
        }
        let drained = self.drain_path();
        let n = drained.events + self.run_local();
        // (socket broker) Unique events written or run since: acknowledged now.
        self.settle_unique();
        self.count_towards_control(n);
        Ok((n, drained.more))
    }

    /// A pass on shared memory: our own queue (if anything is in it), then the rings; the
    /// control sockets only when that found nothing, or once the events delivered since the
    /// last look reach [`CONTROL_EVERY`]. A pass that delivers returns without the control
    /// checks, so a busy-polling receiver goes from the callback back to its caller at
    /// once, and a busy worker still notices a lost broker within a few hundred events.
    fn rings_pass(&mut self) -> Result<(usize, bool)> {
        let mut n = self.run_local_if_any();
        let drained = self.drain_path();
        n += drained.events;
        let mut more = drained.more;
        self.count_towards_control(n);
        if ((n == 0 && !more) || self.pacing.countdown == 0) && self.control_due()? {
            self.poll_control()?;
            // The control work may have queued events for us (a unique event) or attached
            // or replaced the data path: run and drain them in this pass.
            n += self.run_local_if_any();
            let again = self.drain_path();
            n += again.events;
            more |= again.more;
        }
        Ok((n, more))
    }

    /// Drain the data path into our callbacks. On the socket transport the sockets are
    /// written after the events our callbacks published are queued: those events, the
    /// broker's relays and our acknowledgement, when one is due, go out in one `send` per
    /// connection.
    fn drain_path(&mut self) -> Drained {
        self.prepare_callbacks();
        let mut sink = Delivery { subs: &mut self.subs, stats: &mut self.stats, geo: &self.geo, cx: &mut self.cx };
        let drained = self.path.drain(&mut sink);
        self.send_queued();
        if let (Some(p), Some(c)) = (self.path.socket_mut(), self.ctl.as_mut()) {
            p.queue_ack();
            c.write(p);
        }
        drained
    }

    /// Busy with events: count them towards the next look at the control sockets, so a lost
    /// broker is noticed within a few hundred events, not a few hundred passes.
    fn count_towards_control(&mut self, n: usize) {
        self.pacing.countdown = self.pacing.countdown.saturating_sub(n.min(u32::MAX as usize) as u32);
    }

    /// Is the control channel due for a poll this pass?
    fn control_due(&mut self) -> Result<bool> {
        let Some(ctl) = self.ctl.as_ref() else { return Ok(false) };
        let mut due = self.path.reads_sockets_every_pass()
            || !self.pacing.tokens.is_empty()
            || ctl.has_output()
            || self.path.has_output(ctl)
            || ctl.retry_due();
        // Always take the hint, so that it does not fire again for the same work.
        due |= self.path.take_control_hint(self.slot);
        let p = &mut self.pacing;
        p.countdown = p.countdown.saturating_sub(1);
        if !due && p.countdown == 0 {
            p.countdown = CONTROL_EVERY;
            let now = Instant::now();
            if now.duration_since(p.last_control) >= CONTROL_INTERVAL {
                p.last_control = now;
                p.epoll_wait(&self.epoll, 0)?;
                // A fenced broker steps down even when no control traffic comes its way (on
                // shared memory unique events no longer do).
                due = !p.tokens.is_empty() || self.step_down_if_fenced();
            }
        }
        Ok(due)
    }

    /// Write what is queued for other workers now. On shared memory, events that waited for
    /// room in a ring are retried; on the socket transport, the frames `publish` buffered
    /// (they are otherwise written by the next `dispatch`/`wait`, or once 64 KiB are queued).
    /// Returns true when nothing is left queued (events published before attaching count).
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert!(w.flush());
    /// ```
    pub fn flush(&mut self) -> bool {
        if self.forked() {
            return false;
        }
        let conns = self.ctl.as_mut().map(|c| c as &mut dyn Connections);
        let data_done = self.path.flush(conns);
        data_done && !self.ctl.as_ref().is_some_and(|c| c.has_output())
    }

    /// Block until an event arrives or `timeout` passes (`None`: no limit), then dispatch.
    /// Returns the number of events dispatched.
    ///
    /// On shared memory the sleep itself is never longer than 100 ms: the worker then looks
    /// at its rings again without being woken, so that an event whose publisher was killed
    /// between claiming this worker's wake-up and sending it is delivered within 100 ms
    /// (plus the pass that delivers it), not never. This bound holds whatever process dies
    /// at whatever instruction; it costs a normal wake-up nothing. See ARCHITECTURE.md,
    /// liveness.
    ///
    /// # Errors
    /// As [`Worker::dispatch`], plus a failing `epoll_wait`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert_eq!(w.wait(Some(Duration::from_millis(1))).unwrap(), 0);
    /// ```
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<usize> {
        self.check_fork()?;
        if self.path.is_in_process() {
            return Ok(self.send_queued());
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let n = self.dispatch_and(false)?;
            if n > 0 {
                return Ok(n);
            }
            // One arm (store, fence, re-check) per sleep; also when returning 0 below, which
            // leaves the wake-up armed as a dispatch returning 0 does.
            if self.path.shm().is_some() {
                self.pacing.before_arm(&self.epoll, false)?;
            }
            self.pacing.edge_seen = false;
            if !self.path.arm() {
                continue;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(0);
            }
            let mut sleep = deadline.map(|d| d - now);
            let path = &self.path;
            if let Some(r) = self.ctl.as_ref().and_then(|c| c.retry_in(now, path.has_output(c))) {
                sleep = Some(sleep.map_or(r, |s| s.min(r)));
            }
            if path.shm().is_some() {
                // Never sleep unbounded on a wake-up another process may have died owing.
                sleep = Some(sleep.map_or(RECHECK_PERIOD, |s| s.min(RECHECK_PERIOD)));
            }
            let ms = sleep.map_or(-1, |d| d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32);
            self.pacing.epoll_wait(&self.epoll, ms)?;
        }
    }

    /// Wait until attached to a broker, dispatching meanwhile; false on timeout.
    ///
    /// # Errors
    /// As [`Worker::wait`] (an attach refusal, for example).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use worker_events::{Events, Options, Wid};
    /// # let events = Events::new(Options::new("/tmp/unused.sock").testing(true)).unwrap();
    /// # let mut w = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert!(w.wait_ready(Duration::from_secs(1)).unwrap());
    /// ```
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<bool> {
        self.check_fork()?;
        let deadline = Instant::now() + timeout;
        while !self.is_ready() {
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            self.wait(Some((deadline - now).min(Duration::from_millis(20))))?;
        }
        Ok(true)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::event::{Target, Wid};
    use crate::options::Options;
    use crate::worker::Events;

    #[test]
    fn flush_reports_events_waiting_for_an_attach() {
        let d = std::env::temp_dir().join(format!("we-flush-pre-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        // Worker 1 is not the preferred broker and nobody serves: it stays unattached for the
        // election grace (200 ms), so its "all" event waits in the pre-attach queue.
        let events = Events::new(Options::new(d.join("ev.sock")).workers(2)).unwrap();
        let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
        assert!(w1.flush(), "nothing queued yet");
        w1.publish_bytes(Target::All, "s", "e", b"x").unwrap();
        assert!(!w1.is_ready());
        assert!(!w1.flush(), "an event waits for a broker");
        drop(w1);
        let _ = std::fs::remove_dir_all(d);
    }
}
