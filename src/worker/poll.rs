//! Dispatch, wait and control pacing: a dispatch pass looks at the control sockets only
//! when something says so (readiness, a hint in shared memory, queued output, a retry due)
//! or at most every [`CONTROL_INTERVAL`] while busy, then runs our own queue and drains the
//! data path.
//!
//! `wait` has no spin phase: it arms the parked flag and sleeps in `epoll_wait` at once, so
//! crossbeam-utils' `Backoff` has no step to drive here (a spinning receiver is what
//! busy-poll mode is for, and there the caller owns the loop).

use std::time::{Duration, Instant};

use super::Worker;
use super::delivery::Delivery;
use crate::control::{TOKEN_EVENTFD, TOKEN_LISTENER};
use crate::error::{Error, Result};
use crate::sys::Epoll;
use crate::wire::Connections;

/// Dispatch calls between two looks at the clock while busy-polling.
const CONTROL_EVERY: u32 = 256;
/// While busy (never sleeping in `wait`), look at the control sockets at most this often:
/// one `epoll_wait(0)`, and the control work only if a control socket is ready.
const CONTROL_INTERVAL: Duration = Duration::from_millis(1);

/// When to look at the control sockets.
#[derive(Debug)]
pub(super) struct Pacing {
    pub(super) last_control: Instant,
    pub(super) busy_poll: bool,
    /// Passes (and events) left before the next look at the clock.
    pub(super) countdown: u32,
    /// Epoll tokens seen ready and not yet handled (the eventfd's excluded).
    pub(super) tokens: Vec<u64>,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing { last_control: Instant::now(), busy_poll: false, countdown: 0, tokens: Vec::new() }
    }
}

impl Pacing {
    /// `epoll_wait` up to `ms`, keeping the control tokens.
    pub(super) fn epoll_wait(&mut self, epoll: &Epoll, ms: i32) -> Result<()> {
        let mut tokens = std::mem::take(&mut self.tokens);
        let r = epoll.wait(&mut tokens, ms).map_err(|e| Error::io("epoll_wait", e));
        tokens.retain(|t| *t != TOKEN_EVENTFD);
        self.tokens = tokens;
        r
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
        if self.path.is_in_process() {
            return Ok(0);
        }
        let mut total = 0;
        let mut rounds = 0;
        loop {
            rounds += 1;
            let (n, more) = self.pass()?;
            total += n;
            if n > 0 || more || self.pacing.busy_poll || rounds > 4 {
                break;
            }
            // Idle: arm so that the fd turns readable (and `wait` can sleep) when work comes.
            if self.path.arm() {
                break;
            }
        }
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        Ok(total)
    }

    /// One dispatch pass: control, then our own queue and the data path (shared memory:
    /// our queue first, then the rings; sockets: the frames first, then our queue).
    fn pass(&mut self) -> Result<(usize, bool)> {
        if self.path.disarm() {
            self.stats.wakeups_received += 1;
        }
        if self.control_due()? {
            self.poll_control()?;
        }
        let local_first = self.path.shm().is_some();
        let mut n = if local_first { self.run_local() } else { 0 };
        let conns = self.ctl.as_mut().map(|c| c as &mut dyn Connections);
        let mut sink = Delivery { subs: &mut self.subs, stats: &mut self.stats, geo: self.geo };
        let drained = self.path.drain(&mut sink, conns);
        n += drained.events;
        if !local_first {
            n += self.run_local();
        }
        // Busy with events: count them towards the next look at the control sockets, so a
        // lost broker is noticed within a few hundred events, not a few hundred passes.
        self.pacing.countdown = self.pacing.countdown.saturating_sub(n.min(u32::MAX as usize) as u32);
        Ok((n, drained.more))
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
        let conns = self.ctl.as_mut().map(|c| c as &mut dyn Connections);
        let data_done = self.path.flush(conns);
        data_done && !self.ctl.as_ref().is_some_and(|c| c.has_output())
    }

    /// Block until an event arrives or `timeout` passes (`None`: no limit), then dispatch.
    /// Returns the number of events dispatched.
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
        if self.path.is_in_process() {
            return Ok(0);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let n = self.dispatch()?;
            if n > 0 {
                return Ok(n);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(0);
            }
            if !self.path.arm() {
                continue;
            }
            let mut sleep = deadline.map(|d| d - now);
            let path = &self.path;
            if let Some(r) = self.ctl.as_ref().and_then(|c| c.retry_in(now, path.has_output(c))) {
                sleep = Some(sleep.map_or(r, |s| s.min(r)));
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
