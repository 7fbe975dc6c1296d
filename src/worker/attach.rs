//! Attach handling: act on what the control channel reports (elected, welcomed on shared
//! memory or on the socket transport, refused, broker lost, unique events and their
//! acknowledgements), and move the data path accordingly.

use std::os::fd::AsFd;
use std::time::Instant;

use super::Worker;
use crate::control::{CtlEvent, ShmWelcome, TOKEN_EVENTFD, TOKEN_TIMER, Welcome};
use crate::error::{Error, Result};
use crate::region::Region;
use crate::sys::EventFd;
use crate::transport::DataPath;
use crate::transport::shm::ShmPort;
use crate::transport::socket::SocketPort;
use crate::wire::Connections;

impl Worker {
    /// Poll the control channel and handle what it reports.
    pub(super) fn poll_control(&mut self) -> Result<()> {
        if let (Some(ctl), true) = (self.ctl.as_ref(), self.pacing.tokens.contains(&TOKEN_TIMER)) {
            ctl.timer_fired();
            // Backlogs of publishers that died owing us events (issue 11, item 6): reported
            // within one timer period of their death.
            if let DataPath::Shm(port) = &mut self.path {
                port.take_dead_owed(|s| ctl.slot_alive(s));
            }
        }
        self.broker_tick();
        let Some(ctl) = self.ctl.as_mut() else { return Ok(()) };
        let listener_ready = self.pacing.take_listener_ready();
        let (offer, data) = self.path.control_view(ctl.is_broker(), self.broker.epoch);
        let events = ctl.poll(Instant::now(), &self.epoll, &offer, listener_ready, data);
        drop(offer);
        for ev in events {
            match ev {
                CtlEvent::Elected => {
                    // We hold the broker lock byte: claim the epoch and serve.
                    let span = tracing::info_span!(
                        "election",
                        worker = %self.wid,
                        pid = std::process::id(),
                        epoch = tracing::field::Empty
                    );
                    let _in = span.enter();
                    let served = self.become_broker();
                    if served.is_ok() {
                        span.record("epoch", self.broker.epoch);
                        let region_id = self.path.shm().map(|p| p.region().id());
                        tracing::info!(
                            epoch = self.broker.epoch,
                            transport = ?self.path.transport(),
                            region_id,
                            "serving as the broker"
                        );
                    }
                    if let Err(e) = served {
                        // Release the broker lock and back off, so that another worker can
                        // take over; the error is surfaced once, not on every attempt.
                        self.broker.slot = None;
                        let first = self.ctl.as_mut().is_some_and(|c| c.serve_failed(&self.epoll));
                        if first {
                            tracing::error!(error = %e, "won the election but cannot serve; resigned it");
                            self.pending_error = Some(e);
                        } else {
                            tracing::debug!(error = %e, "still cannot serve; resigned the election again");
                        }
                    }
                }
                CtlEvent::Welcome(w) => {
                    let Welcome { broker_slot, epoch, ref shm, .. } = w;
                    let span = tracing::info_span!(
                        "attach",
                        worker = %self.wid,
                        pid = std::process::id(),
                        broker = %self.geo.wid_of(broker_slot),
                        epoch,
                        shm = shm.is_some(),
                        reattach = self.broker.seen.is_some()
                    );
                    let _in = span.enter();
                    self.welcomed(w)?
                }
                CtlEvent::Rejected(reason) => {
                    tracing::error!(%reason, "attach refused by the broker");
                    self.pending_error = Some(Error::AttachRefused(reason));
                }
                CtlEvent::BrokerLost => {
                    let span = tracing::info_span!(
                        "failover",
                        worker = %self.wid,
                        pid = std::process::id(),
                        broker = self.broker.slot.map(|s| tracing::field::display(self.geo.wid_of(s))),
                        epoch = self.broker.epoch
                    );
                    let _in = span.enter();
                    self.stats.failovers += 1;
                    self.unique.resend_all();
                    self.broker.slot = None;
                    tracing::warn!("lost the broker; re-electing");
                }
                CtlEvent::Unique { slot, conn, id, hash, msg } => self.handle_unique(slot, conn, id, &hash, &msg),
                CtlEvent::Divert(patterns) => {
                    tracing::debug!(empty = patterns.is_empty(), "unique-diversion patterns received");
                    self.divert = patterns;
                }
                CtlEvent::UniqueAck(id) => {
                    for msg in self.unique.acknowledged(id) {
                        self.recycle(msg);
                    }
                }
            }
        }
        self.pump_unique();
        self.settle_unique();
        Ok(())
    }

    /// The broker accepted us: on shared memory, map its region (unless it is ours already);
    /// on the socket transport, run the socket port.
    fn welcomed(&mut self, w: Welcome) -> Result<()> {
        let Welcome { shm, broker_slot, epoch, broker_id } = w;
        if shm.is_some() {
            self.note_broker(broker_slot, epoch, broker_id);
        }
        self.broker.epoch = epoch;
        self.broker.slot = Some(broker_slot);
        self.unique.resend_all();
        let Some(ShmWelcome { region_fd, eventfds, region_id }) = shm else {
            tracing::info!(broker_slot, epoch, "attached (socket transport)");
            self.note_broker(broker_slot, epoch, broker_id);
            if let Some(p) = self.path.socket_mut() {
                p.attached_as_client();
            } else {
                if self.path.shm().is_some() {
                    // The deployment moved off shared memory (a broker that cannot create it
                    // took over): our rings are gone with the old region.
                    tracing::warn!("the new broker runs the socket transport; leaving the shared region");
                }
                let port = self.new_socket_port();
                self.switch_path(DataPath::Socket(port));
            }
            return Ok(());
        };
        tracing::info!(broker_slot, epoch, region_id, "attached (shared memory)");
        if self.path.shm().is_some_and(|p| p.region().id() == region_id) {
            return Ok(());
        }
        match Region::open(region_fd, self.geo) {
            Ok(region) => self.install_port(region, eventfds.into_iter().map(EventFd::from_owned).collect())?,
            Err(e) => {
                tracing::error!(error = %e, "shared region from the broker rejected");
                self.pending_error = Some(e);
            }
        }
        Ok(())
    }

    /// A socket port for this worker.
    pub(super) fn new_socket_port(&self) -> SocketPort {
        let o = &self.opts;
        SocketPort::new(self.slot, self.geo, o.max_payload_len, o.max_queue_len, o.unique_capacity)
    }

    /// Run the data path on `region`: events that waited (before attaching, or in a socket
    /// queue) go into the rings.
    pub(super) fn install_port(&mut self, region: Region, eventfds: Vec<EventFd>) -> Result<()> {
        let o = &self.opts;
        let port = ShmPort::attach(region, eventfds, self.slot, o.max_queue_len, o.max_payload_len);
        self.switch_path(DataPath::Shm(port));
        if let Some(port) = self.path.shm() {
            // Edge-triggered: a wake-up seen by `wait`'s own epoll_wait needs no read.
            // The group's fan-out eventfd too, under the same token: an edge of either is a
            // wake-up (a publisher that claimed several sleepers writes it once).
            for fd in [port.my_eventfd(), port.fanout_eventfd()] {
                self.epoll.add_edge_triggered(fd.as_fd(), TOKEN_EVENTFD).map_err(|e| Error::io("epoll_ctl", e))?;
            }
        }
        if let Some(ctl) = self.ctl.as_mut() {
            ctl.hold_region();
        }
        Ok(())
    }

    /// Replace the data path; the old one's waiting events move over, its counters are kept.
    pub(super) fn switch_path(&mut self, next: DataPath) {
        let conns = self.ctl.as_mut().map(|c| c as &mut dyn Connections);
        let (old, overflows) = self.path.switch_to(next, conns);
        self.stats.overflows += overflows;
        super::delivery::fold_counters(&mut self.stats, old.counters());
        if let Some(port) = old.shm() {
            self.epoll.delete(port.my_eventfd().as_fd());
            self.epoll.delete(port.fanout_eventfd().as_fd());
            // Leaving a region (issue 11, item 7; the election never creates a second one
            // while live processes hold it, so this is rare): what it still held is counted,
            // never dropped silently. Messages waiting in our inbound rings become `lost`
            // notices to ourselves; what we queued for others (rings and backlogs) is counted
            // in `lost_outbound`, its receivers being in the old region.
            for d in port.depths() {
                let crate::wire::Peer::Slot(from) = d.peer else { continue };
                if d.inbound > 0 {
                    super::delivery::deliver_lost_notice(
                        &mut self.subs,
                        &mut self.stats,
                        &mut self.cx,
                        &self.geo,
                        from,
                        d.inbound,
                    );
                }
                self.stats.lost_outbound = self.stats.lost_outbound.saturating_add(d.outbound);
                if d.inbound + d.outbound > 0 {
                    tracing::warn!(
                        peer = from,
                        inbound = d.inbound,
                        outbound = d.outbound,
                        "left a shared region with events in it"
                    );
                }
            }
        }
    }
}
