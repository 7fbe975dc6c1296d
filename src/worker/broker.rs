//! The broker role on the worker side: choosing the data path of a new broker, becoming the
//! broker, fencing (stepping down when a newer broker exists), and the `("worker-events",
//! "broker")` notice.

use super::Worker;
use crate::control::STUCK_AFTER;
use crate::error::{Error, Result};
use crate::event::{NewBroker, SYSTEM_SOURCE};
use crate::message::{self, Kind};
use crate::options::Transport;
use crate::region::Region;
use crate::sys::{self, EventFd};
use crate::transport::DataPath;

/// What this worker knows of the broker.
#[derive(Debug, Default)]
pub(super) struct BrokerView {
    /// Epoch of the broker we are attached to, or ours as the broker.
    pub(super) epoch: u64,
    /// Slot of the broker we are attached to (ours as the broker).
    pub(super) slot: Option<u32>,
    /// (region or broker id, epoch) of the last broker seen, for the `broker` notice.
    pub(super) seen: Option<(u64, u64)>,
    /// Round-robin cursor for unique targets: every publisher's own on shared memory, the
    /// broker's on the socket transport.
    pub(super) next_unique_target: u32,
}

impl Worker {
    /// Decide the data path of a new broker: the shared region it already has; the socket
    /// transport when it already ran it (a deployment does not switch while it lives), when
    /// the options force it, or when `Auto` cannot create the region.
    fn prepare_broker_path(&mut self) -> Result<()> {
        if self.path.transport().is_some() {
            return Ok(());
        }
        if self.opts.transport == Transport::Socket {
            let port = self.new_socket_port();
            self.switch_path(DataPath::Socket(port));
            return Ok(());
        }
        let created = Region::create(self.geo, self.opts.max_payload_len).and_then(|region| {
            // One per slot, then the group's fan-out eventfd (`ShmPort::attach`).
            let eventfds = (0..=self.geo.slots)
                .map(|_| EventFd::new())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| Error::io("creating eventfds", e))?;
            Ok((region, eventfds))
        });
        match created {
            Ok((region, eventfds)) => self.install_port(region, eventfds),
            Err(e) if self.opts.transport == Transport::Auto => {
                tracing::warn!(error = %e, "shared memory unavailable; falling back to the socket transport");
                let port = self.new_socket_port();
                self.switch_path(DataPath::Socket(port));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// We won the election: claim the epoch, serve the control socket, then handle our own
    /// waiting unique events. On the socket transport the events that waited for a broker
    /// go out to every slot as ours.
    pub(super) fn become_broker(&mut self) -> Result<()> {
        self.prepare_broker_path()?;
        let ctl = self.ctl.as_mut().expect("only live workers are elected");
        match &mut self.path {
            DataPath::Shm(port) => {
                self.broker.epoch = port.region().claim_broker(self.slot);
                ctl.serve(&self.epoll)?;
                self.broker.slot = Some(self.slot);
                self.note_elected();
            }
            DataPath::Socket(p) => {
                self.broker.epoch += 1;
                ctl.serve(&self.epoll)?;
                self.broker.slot = Some(self.slot);
                p.serve();
                let id = p.broker_id();
                self.note_broker(self.slot, self.broker.epoch, id);
            }
            DataPath::InProcess | DataPath::Unattached(_) => unreachable!("prepare_broker_path decided the path"),
        }
        self.pump_unique();
        Ok(())
    }

    /// Queue a `("worker-events", "broker")` notice for our callbacks when the broker we
    /// are attached to (or that we became) is a new one: a different epoch or region than
    /// the last one seen. Not on the first attach of this process.
    pub(super) fn note_broker(&mut self, broker_slot: u32, epoch: u64, broker_id: u64) {
        let now = (broker_id, epoch);
        let Some(prev) = self.broker.seen.replace(now) else { return };
        if prev == now {
            return;
        }
        let info = NewBroker { broker: self.geo.wid_of(broker_slot), epoch };
        tracing::info!(wid = %self.wid, broker = %info.broker, epoch, "new broker");
        let mut buf = self.buffer();
        if message::encode_typed(&mut buf, SYSTEM_SOURCE, "broker", &info, broker_slot, Kind::System, usize::MAX)
            .is_ok()
        {
            self.local.push_back(buf);
        }
    }

    /// [`Worker::note_broker`] for our own election on shared memory.
    fn note_elected(&mut self) {
        if let Some(id) = self.path.shm().map(|p| p.region().id()) {
            self.note_broker(self.slot, self.broker.epoch, id);
        }
    }

    /// The broker's liveness duties, on every control poll (a timer makes one due at least
    /// every 100 ms for the broker, 200 ms for the others): a fenced broker steps down; a
    /// serving one stores its heartbeat in the region (and takes the lock byte if it serves
    /// without it); any other region holder takes the role over when the heartbeat is older
    /// than [`STUCK_AFTER`] (the broker is stopped, or blocked in a callback).
    pub(super) fn broker_tick(&mut self) {
        if self.step_down_if_fenced() {
            return;
        }
        let (Some(ctl), Some(port)) = (self.ctl.as_mut(), self.path.shm()) else { return };
        let now = sys::monotonic_ns();
        if ctl.is_broker() {
            port.region().broker_beat(now);
            ctl.adopt_broker_lock();
            return;
        }
        if !ctl.may_take_over(std::time::Instant::now()) {
            return;
        }
        let stale = STUCK_AFTER.as_nanos() as u64;
        let Some((epoch, stuck)) = port.region().take_over_stale_broker(self.slot, now, stale) else { return };
        let span = tracing::info_span!(
            "takeover",
            worker = %self.wid,
            pid = std::process::id(),
            stuck = %self.geo.wid_of(stuck),
            epoch
        );
        let _in = span.enter();
        tracing::warn!("the broker has not served for {STUCK_AFTER:?}; taking its role over");
        if let Err(e) = ctl.serve_over(&self.epoll) {
            // The epoch is ours but nobody serves: our heartbeat goes stale in turn, and
            // another worker (or we, later) takes over.
            tracing::error!(error = %e, "took the broker role over but cannot serve");
            self.pending_error.get_or_insert(e);
            return;
        }
        self.broker.epoch = epoch;
        self.broker.slot = Some(self.slot);
        self.stats.failovers += 1;
        self.note_elected();
        self.pump_unique();
    }

    /// (broker) Fencing: when the region's broker epoch is no longer ours, a newer broker
    /// has been elected; stop serving (the control channel steps down and reconnects as a
    /// client), count a failover. Returns true when it stepped down.
    pub(super) fn step_down_if_fenced(&mut self) -> bool {
        let (Some(ctl), Some(port)) = (self.ctl.as_mut(), self.path.shm()) else { return false };
        if !ctl.is_broker() {
            return false;
        }
        let current = port.region().broker_epoch();
        if current == self.broker.epoch {
            return false;
        }
        let span = tracing::info_span!("step_down", worker = %self.wid, pid = std::process::id(), epoch = self.broker.epoch, current);
        let _in = span.enter();
        tracing::warn!("a newer broker exists; stepping down");
        ctl.step_down(&self.epoll);
        self.broker.slot = None;
        self.stats.failovers += 1;
        true
    }
}
