//! (socket-transport broker) Unique events in hand-off. The broker acknowledges a worker's
//! unique event only once it is out of the broker's hands: completely written into the
//! target's socket (the kernel buffer is the receiver's then: it survives the broker's
//! death), or run by the broker's own callbacks. Until then the publisher keeps it and
//! resends it to the next broker if this one dies. An event whose target does not take it
//! (no connection any more, a stalled reader, or nothing written within
//! [`HANDOFF_TIMEOUT`]) is taken out of that target's queue and routed to another live
//! worker (ourselves when there is none), so a stuck receiver never holds acknowledgements
//! back for longer than that. Acknowledgements are cumulative (up to an id), so a
//! connection is acknowledged up to the id before its publisher's first event not handed
//! off yet.
//!
//! Across a broker crash this is at-least-once: an event written to its target whose
//! acknowledgement had not reached the publisher when the broker died is resent, and the
//! new broker (its dedup table is private, and empty) delivers it again
//! ([`crate::stats::Stats::unique_resent`] counts the resent events).
//!
//! Across a receiver crash too. Handed off is not dispatched: an event written into a
//! receiver's socket may still be unread there when the receiver is killed. The broker
//! keeps a copy of each unique event it wrote until the receiver's `ACK` covers it
//! (`wire/unacked.rs`, bounded per connection), and when the receiver's connection ends
//! without that (`transport/socket/ack.rs`: killed, or disconnected; a clean close
//! acknowledges first) the copies come back as orphans, routed again at the next pass
//! ([`Worker::reroute_orphans`]) exactly as the hand-off reroute does: to another live
//! worker, ourselves when there is none, a diverted one through [`Worker::undivert`], no
//! new dedup record. An event the receiver never dispatched runs once, elsewhere; one it
//! dispatched after its last acknowledgement, which never left, runs twice
//! ([`crate::stats::Stats::unique_rerouted`] counts the rerouted events). The hand-off
//! timeout is not that: a live receiver keeps what was written to it, however slow; only
//! events not written at all are taken back. See ARCHITECTURE.md §G3.

use std::time::{Duration, Instant};

use super::Worker;
use crate::control::Control;
use crate::wire::{Connections, Peer};

/// A unique event waits at most this long in the broker's queue for its target before it
/// is routed to another worker (the publisher's acknowledgement waits as long).
pub(crate) const HANDOFF_TIMEOUT: Duration = Duration::from_millis(200);

/// Where a unique event routed by the socket broker waits until it is handed off.
#[derive(Debug, Clone, Copy)]
pub(super) enum Held {
    /// In the broker's queue for slot `to`: handed off once the kernel took frame `ticket`.
    Slot { to: u32, ticket: u64 },
    /// In our own queue (`local`): handed off once `local_done` reaches `ticket`.
    Local { ticket: u64 },
}

/// One unique event not handed off yet.
struct Handoff {
    /// Its publisher's slot.
    from: u32,
    /// Its publisher's id for it (0: our own event, acknowledged to nobody).
    id: u64,
    held: Held,
    /// When it was queued where it waits.
    since: Instant,
}

/// What one publisher connection is owed.
struct ConnAcks {
    conn: u64,
    slot: u32,
    /// Highest id received (routed, or dropped as a duplicate).
    handled: u64,
    /// Highest id acknowledged.
    acked: u64,
}

/// The socket broker's unique events in hand-off and the acknowledgements owed.
#[derive(Default)]
pub(super) struct Handoffs {
    pending: Vec<Handoff>,
    conns: Vec<ConnAcks>,
    /// Events taken out of `local` (and run), ever: the tickets of [`Held::Local`].
    pub(super) local_done: u64,
}

impl Handoffs {
    /// Nothing waits and nothing is owed.
    fn idle(&self) -> bool {
        self.pending.is_empty() && self.conns.iter().all(|c| c.acked >= c.handled)
    }
}

/// The connection slot `to` has now, if any.
fn live_link(ctl: Option<&Control>, to: u32) -> Option<u64> {
    let mut link = None;
    if let Some(ctl) = ctl {
        ctl.for_each_link(&mut |l| {
            if l.peer == Peer::Slot(to) {
                link = Some(l.conn);
            }
        });
    }
    link
}

impl Worker {
    /// (broker) Unique event `id` of the worker in `slot`, received on connection `conn`
    /// (0: our own event), was handled: it waits where `held` says, or (`None`) it needs
    /// nothing more (a duplicate, malformed, or written into a ring).
    pub(super) fn track_unique(&mut self, slot: u32, conn: u64, id: u64, held: Option<Held>) {
        let h = &mut self.handoffs;
        if let Some(held) = held {
            h.pending.push(Handoff { from: slot, id, held, since: Instant::now() });
        }
        if conn == 0 {
            return;
        }
        match h.conns.iter_mut().find(|c| c.conn == conn) {
            Some(c) => c.handled = c.handled.max(id),
            None => h.conns.push(ConnAcks { conn, slot, handled: id, acked: 0 }),
        }
    }

    /// Does slot `to` take unique events now (socket transport: a connection that reads)?
    pub(super) fn takes_unique(&self, to: u32) -> bool {
        self.path.socket().is_none_or(|p| p.takes_unique(to, live_link(self.ctl.as_ref(), to).is_some()))
    }

    /// (socket broker) Forget the events handed off; route again those their target does
    /// not take; acknowledge each publisher connection as far as its events are handed off.
    /// Cheap when nothing waits. A worker that is no longer the broker forgets everything
    /// (the publishers resend to the next broker).
    pub(super) fn settle_unique(&mut self) {
        if self.handoffs.idle() && !self.path.socket().is_some_and(|p| p.has_orphans()) {
            return;
        }
        let serving = self.is_broker() && self.path.socket().is_some();
        let Some(port) = self.path.socket().filter(|_| serving) else {
            self.handoffs = Handoffs { local_done: self.handoffs.local_done, ..Handoffs::default() };
            // Copies of unique events a dead receiver never acknowledged: a worker that no
            // longer serves cannot route them (their publishers were acknowledged already).
            let dropped = self.path.socket_mut().map_or(0, |p| p.take_orphans().len() as u64);
            if dropped > 0 {
                self.stats.unique_unguarded += dropped;
                tracing::warn!(
                    events = dropped,
                    "no longer the broker: unique events a dead receiver never ran are dropped"
                );
            }
            return;
        };
        let now = Instant::now();
        let local_done = self.handoffs.local_done;
        self.handoffs.pending.retain(|h| match h.held {
            Held::Slot { to, ticket } => !port.handed_off(to, ticket),
            Held::Local { ticket } => local_done < ticket,
        });
        self.reroute_orphans();
        let mut stuck: Vec<u32> = Vec::new();
        for h in &self.handoffs.pending {
            if let Held::Slot { to, .. } = h.held {
                if !stuck.contains(&to) && (now.duration_since(h.since) >= HANDOFF_TIMEOUT || !self.takes_unique(to)) {
                    stuck.push(to);
                }
            }
        }
        for to in stuck {
            self.reroute_unique(to, now);
        }
        self.send_unique_acks();
    }

    /// Route again the unique events written into the socket of a worker whose connection
    /// then ended before it acknowledged them (`transport/socket/ack.rs`): to another live
    /// worker, or ourselves. Their publishers were acknowledged already, and their hashes
    /// recorded (a diverted one, never recorded here, is routed as not diverted:
    /// [`Worker::undivert`]). Each is tracked as our own event, so a target that does not
    /// take it within [`HANDOFF_TIMEOUT`] passes it on again.
    fn reroute_orphans(&mut self) {
        let Some(orphans) = self.path.socket_mut().map(|p| p.take_orphans()) else { return };
        if orphans.is_empty() {
            return;
        }
        tracing::info!(
            events = orphans.len(),
            "a worker's connection ended before it acknowledged its unique events; routing them elsewhere"
        );
        for (from, m) in orphans {
            let held = self.route_again(&m, from);
            self.stats.unique_rerouted += 1;
            self.track_unique(self.slot, 0, 0, held);
        }
    }

    /// Route a unique event that `from` did not take to another worker (no new dedup
    /// record): one diverted to an agent that does not take it is routed here as not
    /// diverted ([`Worker::undivert`]); any other goes to another live worker.
    fn route_again(&mut self, msg: &[u8], from: u32) -> Option<Held> {
        let mut buf = self.buffer();
        buf.clear();
        buf.extend_from_slice(msg);
        if crate::message::flags(&buf) == crate::message::FLAG_UNIQUE_HASH {
            self.undivert(buf)
        } else {
            self.place_unique(buf, Some(from), crate::sys::monotonic_ns())
        }
    }

    /// Take the unique events not written at all out of the queue for `to` and route them
    /// to another worker.
    fn reroute_unique(&mut self, to: u32, now: Instant) {
        let live = live_link(self.ctl.as_ref(), to);
        let Some(port) = self.path.socket_mut() else { return };
        let msgs = port.take_unique(to, live);
        if msgs.is_empty() {
            return;
        }
        tracing::debug!(
            slot = to,
            events = msgs.len(),
            "a worker does not take its unique events; routing them elsewhere"
        );
        // Their records: the last ones held for `to` by ticket (a frame written in part,
        // which stays, can only be the first).
        let mut held: Vec<(u64, usize)> = (self.handoffs.pending.iter().enumerate())
            .filter_map(|(i, h)| match h.held {
                Held::Slot { to: t, ticket } if t == to => Some((ticket, i)),
                _ => None,
            })
            .collect();
        held.sort_unstable();
        let records = held.split_off(held.len().saturating_sub(msgs.len()));
        // Frames without a record (queued before this worker last became the broker) go first.
        let untracked = msgs.len() - records.len();
        for (k, m) in msgs.into_iter().enumerate() {
            let place = self.route_again(&m, to);
            if let Some(&(_, i)) = k.checked_sub(untracked).and_then(|r| records.get(r)) {
                match place {
                    Some(p) => {
                        let h = &mut self.handoffs.pending[i];
                        (h.held, h.since) = (p, now);
                    }
                    // Cannot happen on the socket transport (nothing is written at once);
                    // handed off either way.
                    None => self.handoffs.pending[i].held = Held::Local { ticket: 0 },
                }
            }
        }
    }

    /// Acknowledge each publisher connection up to the id before the first event of its
    /// slot not handed off (all it sent when none waits); forget the connections gone and
    /// those owed nothing more (a connection's ids only grow: the next UNIQUE on it starts
    /// a new entry).
    fn send_unique_acks(&mut self) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        let pending = &self.handoffs.pending;
        let mut sent = Vec::new();
        self.handoffs.conns.retain_mut(|c| {
            let first = pending.iter().filter(|h| h.from == c.slot && h.id > 0).map(|h| h.id).min();
            let upto = first.map_or(c.handled, |f| c.handled.min(f - 1));
            if upto > c.acked {
                if !ctl.ack_unique(c.conn, upto) {
                    return false;
                }
                c.acked = upto;
                sent.push(c.slot);
            }
            c.acked < c.handled
        });
        if sent.is_empty() {
            return;
        }
        // Write them now: the sooner a publisher knows, the fewer events a broker crash
        // makes it resend (and deliver twice).
        self.path.flush(Some(ctl));
        for s in sent {
            // A busy-polling publisher looks at its control socket at once.
            self.path.set_control_hint(s);
        }
    }
}
