//! Failover on the worker side: the `("worker-events", "broker")` notice, epoch fencing,
//! and the graceful close ([`Worker::close`], and `Drop` with a short bound).

use std::time::{Duration, Instant};

use super::Worker;
use crate::control::{Mode, TOKEN_EVENTFD};
use crate::error::{Error, Result};
use crate::event::{NewBroker, SYSTEM_SOURCE};
use crate::message::{self, Kind};
use crate::sync::Ordering;

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
    /// same [`Wid`](crate::Wid); events queued for its own callbacks are discarded.
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
        let deadline = Instant::now() + timeout;
        if self.mode() == Mode::Socket && self.is_broker() {
            // Socket transport: what this broker queued for attached workers exists nowhere
            // else. Hand it to the kernel before closing their connections (a worker reads
            // it before it sees the end of the stream).
            if let Some(ctl) = self.ctl.as_mut() {
                loop {
                    ctl.flush_data();
                    if !ctl.has_output() || Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        if let Some(ctl) = self.ctl.as_mut() {
            if ctl.is_broker() {
                self.broker_slot = None;
            }
            ctl.resign(&self.epoll);
        }
        loop {
            if let Some(port) = self.port.as_mut() {
                port.flush();
            }
            let ctl_output = self.ctl.as_ref().is_some_and(|c| c.has_output());
            if !self.unique_out.is_empty() || self.port.is_none() || ctl_output {
                // Keep the control channel going: send unique events, collect their
                // acknowledgements, attach to a broker.
                if let Err(e) = self.poll_control() {
                    tracing::debug!(error = %e, "control channel while closing");
                }
            }
            let ctl_output = self.ctl.as_ref().is_some_and(|c| c.has_output());
            if self.unflushed() == 0 && !ctl_output {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let ms = (deadline - now).min(Duration::from_millis(1)).as_micros().div_ceil(1000) as i32;
            let mut tokens = std::mem::take(&mut self.tokens);
            if let Err(e) = self.epoll.wait(&mut tokens, ms) {
                tracing::debug!(error = %e, "epoll_wait while closing");
            }
            tokens.retain(|t| *t != TOKEN_EVENTFD);
            self.tokens = tokens;
        }
        let given_up = self.unflushed();
        if let Some(port) = self.port.as_mut() {
            // Everything left (dead peers included) is counted lost in its ring.
            port.abandon_backlogs();
        }
        if given_up > 0 {
            tracing::warn!(wid = %self.wid, given_up, "closed before every outbound event was flushed");
            return Err(Error::Unflushed { events: given_up });
        }
        Ok(())
    }

    /// Outbound events still to hand over: ring backlogs for live peers, unacknowledged
    /// unique events, and events published before attaching.
    fn unflushed(&self) -> u64 {
        let mut n = self.unique_out.len() as u64;
        n += self.ctl.as_ref().map_or(0, |c| c.client_queued());
        match (&self.port, &self.ctl) {
            (Some(port), Some(ctl)) => {
                n +=
                    port.depths().filter(|&(s, _, b, _)| b > 0 && ctl.slot_alive(s)).map(|(_, _, b, _)| b).sum::<u64>();
            }
            (None, _) if self.mode() != Mode::Socket => n += self.pre_attach.len() as u64,
            _ => {}
        }
        n
    }

    /// Queue a `("worker-events", "broker")` notice for our callbacks when the broker we
    /// are attached to (or that we became) is a new one: a different epoch or region than
    /// the last one seen. Not on the first attach of this process.
    pub(super) fn note_broker(&mut self, broker_slot: u32, epoch: u64, region_id: u64) {
        let now = (region_id, epoch);
        let Some(prev) = self.seen_broker.replace(now) else { return };
        if prev == now {
            return;
        }
        let info = NewBroker { broker: self.geo.wid_of(broker_slot), epoch };
        tracing::info!(wid = %self.wid, broker = %info.broker, epoch, "new broker");
        let mut buf = self.pool.pop().unwrap_or_default();
        if message::encode_typed(&mut buf, SYSTEM_SOURCE, "broker", &info, broker_slot, Kind::System, usize::MAX)
            .is_ok()
        {
            self.local.push_back(buf);
        }
    }

    /// [`Worker::note_broker`] for our own election.
    pub(super) fn note_elected(&mut self) {
        if let Some(id) = self.port.as_ref().map(|p| p.region().id()) {
            self.note_broker(self.slot, self.epoch, id);
        }
    }

    /// (broker) Fencing: when the region's broker epoch is no longer ours, a newer broker
    /// has been elected; stop serving (the control channel steps down and reconnects as a
    /// client). Returns true when it stepped down.
    pub(super) fn fenced(&mut self) -> bool {
        let (Some(ctl), Some(port)) = (self.ctl.as_mut(), self.port.as_ref()) else { return false };
        if !ctl.is_broker() {
            return false;
        }
        let current = port.region().header().broker_epoch.load(Ordering::Acquire);
        if current == self.epoch {
            return false;
        }
        tracing::warn!(wid = %self.wid, ours = self.epoch, current, "a newer broker exists; stepping down");
        ctl.step_down(&self.epoll);
        self.broker_slot = None;
        self.stats.failovers += 1;
        true
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

    use crate::sync::Ordering;
    use crate::{Events, NewBroker, Options, SYSTEM_SOURCE, Target, Wid, Worker};

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
        let epoch = w0.epoch;
        // Someone else claims a newer epoch (a broker elected through a replaced lock file).
        w0.port.as_ref().unwrap().region().header().broker_epoch.fetch_add(1, Ordering::AcqRel);
        // w1's unique event makes w0 look at its control channel: it must not handle it.
        w1.publish_bytes(Target::Unique("k"), "u", "e", b"x").unwrap();
        pump(&mut [&mut w0, &mut w1], |ws| ws[1].is_broker() && ws[0].is_ready());
        assert!(!w0.is_broker());
        assert_eq!(w1.epoch, epoch + 2, "w1 was elected after the foreign epoch");
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
