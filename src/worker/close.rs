//! Closing: [`Worker::close`] and `Drop` (with a short bound) hand the broker role over,
//! then flush what is still on its way out.

use std::time::{Duration, Instant};

use super::Worker;
use crate::error::{Error, Result};
use crate::wire::Connections;

/// How long dropping a [`Worker`] may spend flushing its outbound backlogs.
pub(crate) const DROP_FLUSH_TIMEOUT: Duration = Duration::from_millis(50);

impl Worker {
    /// Leave gracefully: hand the broker role over at once (if this worker is the broker),
    /// then flush what is still on its way out, for at most `timeout`:
    ///
    /// * ring backlogs for **live** peers (messages that did not fit in their rings yet);
    ///   backlogs for dead peers are given up at once and the successor in that slot gets
    ///   a `lost` notice;
    /// * unique events not yet acknowledged by a broker (a client keeps its connection, or
    ///   re-attaches to a new broker, until they are acknowledged);
    /// * events published before this worker attached (it keeps trying to attach, but
    ///   never runs for election any more).
    ///
    /// Events already in this worker's inbound rings stay there for a successor with the
    /// same [`Wid`](crate::event::Wid); events queued for its own callbacks are discarded.
    /// Dropping a `Worker` does the same with a bound of 50 ms.
    ///
    /// # Errors
    /// [`Error::Unflushed`] when the timeout expired first: that many events were given up
    /// (the receivers of given-up ring backlogs get a `lost` notice).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use worker_events::{Events, Options, Target, Wid};
    ///
    /// let dir = std::env::temp_dir().join(format!("we-doc-close-{}", std::process::id()));
    /// let events = Events::new(Options::new(dir.join("ev.sock")).workers(2)).unwrap();
    /// let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
    /// let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
    /// while !w1.is_ready() {
    ///     w0.dispatch().unwrap();
    ///     w1.wait(Some(Duration::from_millis(1))).unwrap();
    /// }
    /// w1.subscribe("worker-events", "broker", |ev| assert_eq!(ev.new_broker().unwrap().broker, Wid::Worker(1)));
    /// w0.publish_bytes(Target::All, "cfg", "reload", b"v2").unwrap();
    /// w0.close(Duration::from_millis(100)).unwrap(); // flushed; the broker role is released
    /// while !w1.is_broker() {
    ///     w1.wait(Some(Duration::from_millis(5))).unwrap(); // w1 takes over at once
    /// }
    /// # drop(w1); let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub fn close(mut self, timeout: Duration) -> Result<()> {
        self.shutdown(timeout)
    }

    /// [`Worker::close`] behind a `&mut`: runs once (later calls return `Ok`).
    pub(super) fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) || self.ctl.is_none() {
            return Ok(());
        }
        if self.forked() {
            // A fork() child's copy: the slot, rings and broker role are the parent's. Touch
            // none of it (the port's drop would mark the parent's slot detached): leak the
            // copies, which the child's exit unmaps and closes. Its copies of the lock file,
            // listener and connections already point at /dev/null (`sys::ParentOnly`).
            std::mem::forget(std::mem::replace(&mut self.path, crate::transport::DataPath::InProcess));
            std::mem::forget(self.ctl.take());
            return Err(Error::Forked);
        }
        let deadline = Instant::now() + timeout;
        if let Some(p) = self.path.socket_mut() {
            // Everything dispatched is acknowledged before the connection closes (written by
            // the control polls below), so a clean close leaves the broker only what it never dispatched to report.
            p.ack_now(true);
        }
        if let (Some(p), Some(ctl)) = (self.path.socket_mut(), self.ctl.as_mut()) {
            if ctl.is_broker() {
                // Socket transport: what this broker queued for attached workers exists
                // nowhere else. Hand it to the kernel before closing their connections (a
                // worker reads it before it sees the end of the stream).
                loop {
                    ctl.write(p);
                    if !(ctl.has_output() || p.has_output(ctl)) || Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        if let Some(ctl) = self.ctl.as_mut() {
            if ctl.is_broker() {
                self.broker.slot = None;
            }
            ctl.resign(&self.epoll);
        }
        loop {
            // Ring backlogs (the sockets are written by the control poll below).
            self.path.flush(None);
            if !self.unique.is_empty() || self.path.shm().is_none() || self.control_output() {
                // Keep the control channel going: send unique events, collect their
                // acknowledgements, attach to a broker.
                if let Err(e) = self.poll_control() {
                    tracing::debug!(error = %e, "control channel while closing");
                }
            }
            if self.unflushed() == 0 && !self.control_output() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let ms = (deadline - now).min(Duration::from_millis(1)).as_micros().div_ceil(1000) as i32;
            if let Err(e) = self.pacing.epoll_wait(&self.epoll, ms) {
                tracing::debug!(error = %e, "epoll_wait while closing");
            }
        }
        let given_up = self.unflushed();
        // Everything left (dead peers included) is counted lost in its ring.
        self.path.abandon_backlogs();
        if given_up > 0 {
            tracing::warn!(wid = %self.wid, given_up, "closed before every outbound event was flushed");
            return Err(Error::Unflushed { events: given_up });
        }
        Ok(())
    }

    /// Control or data frames the sockets have not taken yet.
    fn control_output(&self) -> bool {
        self.ctl.as_ref().is_some_and(|c| c.has_output() || self.path.has_output(c))
    }

    /// Outbound events still to hand over: ring backlogs for live peers, unacknowledged
    /// unique events, events queued for the broker, and events published before attaching.
    fn unflushed(&self) -> u64 {
        let Some(ctl) = self.ctl.as_ref() else { return 0 };
        self.unique.len() as u64 + self.path.unflushed(|s| ctl.slot_alive(s))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(DROP_FLUSH_TIMEOUT) {
            tracing::debug!(error = %e, "worker dropped");
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use crate::event::{NewBroker, SYSTEM_SOURCE, Target, Wid};
    use crate::options::Options;
    use crate::sync::Ordering;
    use crate::worker::{Events, Worker};

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("we-fo-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn pump(ws: &mut [&mut Worker], until: impl Fn(&[&mut Worker]) -> bool) {
        let limit = Instant::now() + Duration::from_secs(10);
        while !until(ws) {
            assert!(Instant::now() < limit, "condition not reached");
            for w in ws.iter_mut() {
                w.wait(Some(Duration::from_millis(1))).unwrap();
            }
        }
    }

    #[test]
    fn a_fenced_broker_steps_down_and_unique_events_survive() {
        let d = dir("fence");
        let events = Events::new(Options::new(d.join("ev.sock")).workers(2)).unwrap();
        let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
        let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        for w in [&mut w0, &mut w1] {
            let g = got.clone();
            let me = w.wid();
            w.subscribe("*", "*", move |ev| {
                let what = match ev.new_broker() {
                    Some(b) => format!("broker {:?} {}", b.broker, b.epoch),
                    None => format!("{} {}", ev.source(), ev.event()),
                };
                g.lock().unwrap().push((me, what));
            });
        }
        pump(&mut [&mut w0, &mut w1], |ws| ws[1].is_ready());
        assert!(w0.is_broker());
        let epoch = w0.broker.epoch;
        // Someone else claims a newer epoch (a broker elected through a replaced lock file).
        w0.path.shm().unwrap().region().header().broker_epoch.fetch_add(1, Ordering::AcqRel);
        // w1's unique event makes w0 look at its control channel: it must not handle it.
        w1.publish_bytes(Target::Unique("k"), "u", "e", b"x").unwrap();
        pump(&mut [&mut w0, &mut w1], |ws| ws[1].is_broker() && ws[0].is_ready());
        assert!(!w0.is_broker());
        assert_eq!(w1.broker.epoch, epoch + 2, "w1 was elected after the foreign epoch");
        pump(&mut [&mut w0, &mut w1], |_| got.lock().unwrap().iter().filter(|(_, w)| w == "u e").count() == 1);
        let g = got.lock().unwrap().clone();
        let want_broker = format!("broker {:?} {}", Wid::Worker(1), epoch + 2);
        for w in [Wid::Worker(0), Wid::Worker(1)] {
            assert_eq!(g.iter().filter(|(who, what)| *who == w && *what == want_broker).count(), 1, "{g:?}");
        }
        assert_eq!(w0.stats().failovers, 1);
        assert_eq!(w1.stats().unique_pending, 0);
        let _ = NewBroker { broker: Wid::Worker(0), epoch: 0 };
        let _ = SYSTEM_SOURCE;
        drop((w0, w1));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn close_hands_the_broker_role_over_and_flushes_backlogs() {
        let d = dir("close");
        let events =
            Events::new(Options::new(d.join("ev.sock")).workers(2).ring_capacity(4096).max_queue_len(100_000)).unwrap();
        let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
        let mut w1 = events.init_worker(Wid::Worker(1)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        w1.subscribe("seq", "*", move |ev| s.lock().unwrap().push(ev.deserialize::<u64>().unwrap()));
        pump(&mut [&mut w0, &mut w1], |ws| ws[1].is_ready());
        // Far more than a 4 KiB ring holds: most of it waits in w0's backlog.
        for n in 0..2000u64 {
            w0.publish(Target::All, "seq", "s", &n).unwrap();
        }
        assert!(w0.stats().peers[0].backlog > 0);
        // w1 drains on another thread while w0 closes.
        let t = std::thread::spawn(move || {
            let limit = Instant::now() + Duration::from_secs(10);
            while Instant::now() < limit && !(w1.is_broker() && seen.lock().unwrap().len() == 2000) {
                w1.wait(Some(Duration::from_millis(1))).unwrap();
            }
            let ok = w1.is_broker();
            (ok, seen.lock().unwrap().clone())
        });
        w0.close(Duration::from_secs(5)).unwrap();
        let (broker, got) = t.join().unwrap();
        assert!(broker, "w1 did not take the broker role over");
        assert_eq!(got, (0..2000).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(d);
    }
}
