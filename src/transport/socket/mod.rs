//! The socket transport: events ride the unix-socket control connections, through the
//! broker. Everything it owns lives here: the queues (ours for the broker as a client, one
//! per destination slot as the broker), the inbox of received data frames, the sequence
//! stamps ([`seq`]), the dedup table in private memory, and the dispatch of what arrived.
//!
//! A worker appends each "all" event as an `EVENT` frame to its queue; the broker delivers it
//! to its own callbacks and appends a `DELIVER` frame to the queue of every other slot,
//! attached or not yet. A publisher's own queue is bounded by `max_queue_len` frames and
//! [`CLIENT_QUEUE_BYTES`]: when it is full `publish` fails with `QueueOverflow`. A
//! destination queue at the broker is bounded in bytes ([`dest_queue_bytes`]); when it is
//! full the event is dropped for that destination, which is owed a `LOST` frame (publisher,
//! count), sent ahead of the next event once there is room again. Writes are coalesced (see
//! `wire/queue.rs`): at `dispatch`, `wait`, `flush`, or once [`COALESCE_BYTES`] wait on a
//! connected link.
//!
//! Flow control: the broker reads a publisher's connection only while every connected
//! destination that keeps reading holds less than [`HIGH_WATER`] bytes (the frames read and
//! not yet dispatched count too): [`SocketPort::read_budget`]. A burst therefore fills the
//! publisher's socket buffer, then its own bounded queue, and `publish` fails, instead of
//! the broker dropping for a receiver that keeps dispatching. A destination holds the
//! others back for at most [`STALL_AFTER`] without taking a byte (a stopped or wedged
//! receiver): then it is passed over until it reads again, and what its queue cannot hold
//! is dropped and reported. A slot without a connection holds the others back for at most
//! [`STALL_AFTER`] from when it lost it (or from when this broker started serving): long
//! enough for a live worker to reconnect after a failover, while the new broker hands its own
//! backlog over, without a dead or never-started slot stalling anyone for longer; after
//! [`DETACHED_KEEP`] without one its queue is dropped and counted in lost notices for its
//! next holder. The broker's own events are not held back (it
//! never refuses its own `publish`): they are bounded by the destination queues, so a live
//! receiver more than 1 MiB plus one frame limit behind the broker's own stream loses some of the
//! broker's events (reported); from the other publishers it loses nothing (ARCHITECTURE.md
//! §B). A unique event for a full destination queue runs at the broker instead
//! ([`SocketPort::send_to`]); one that its destination does not take is taken out of the
//! queue again ([`SocketPort::take_unique`]) and routed elsewhere; the broker acknowledges
//! a unique event to its publisher once the frame's ticket is written
//! ([`SocketPort::handed_off`]; `worker/handoff.rs`). `LOST` notices count "all" events only. Control frames share
//! the connections and are written only between data frames (`wire::queue::flush_conn`).
//! The control channel reaches the queues through [`DataPlane`]; the transport reaches the
//! connections through [`Connections`].
//!
//! What is reported and what is not (see the README, "Socket transport"): gaps in a
//! publisher's sequence, including the first events of a restarted publisher's new
//! incarnation ([`seq`]), and events a full destination queue dropped, become `lost`
//! notices. So do the events a killed receiver was sent and never dispatched (in its socket
//! buffer, frame reader or inbox): receivers acknowledge what they dispatched (`ACK` frames,
//! when idle, when writing anyway, or every 64 frames), the broker keeps what it wrote and was not
//! acknowledged per connection, and when a connection ends that becomes `lost` notices for
//! the slot's next holder, ahead of what still waits for it ([`ack`]; too high by what the receiver
//! dispatched after its last `ACK`, never too low). The unique events in
//! there are kept (copies, until acknowledged) and, once the connection is gone, handed to
//! the worker to route elsewhere ([`SocketPort::take_orphans`]). Events a killed
//! publisher still had queued are gone without a notice, and what a dead broker held is
//! told only through the receivers' sequence gaps.

mod ack;
mod owed;
pub(crate) mod seq;

use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;

use super::{Deliver, PeerDepth, PortCounters};
use crate::context::Room;
use crate::dedup::{Check, HeapTable};
use crate::layout::Geometry;
use crate::message::{self, Kind};
use crate::wire::frame::{Body, kind};
use crate::wire::queue::{COALESCE_BYTES, Inbox, OutQueue};
use crate::wire::{Connections, DataPlane, Link, Peer};
use ack::AckCount;
use seq::{STAMP_LEN, Sequencer, Stamp, UNSEQUENCED, Verdict};

/// (broker) Bytes queued for a connected destination above which the broker stops reading
/// publishers' connections (flow control).
pub(crate) const HIGH_WATER: usize = 256 * 1024;
/// (broker) A destination at or above [`HIGH_WATER`] whose connection took no byte for this
/// long no longer holds publishers back (until it reads again).
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(1);
/// (broker) A slot without a connection for this long has its queue dropped, each event
/// counted in a lost notice owed to the slot's next holder.
pub(crate) const DETACHED_KEEP: Duration = Duration::from_secs(10);
/// (client) Byte bound of a publisher's own queue, besides `max_queue_len` frames.
pub(crate) const CLIENT_QUEUE_BYTES: usize = 64 << 20;

/// (broker) Byte bound of one destination's queue: [`HIGH_WATER`], plus 1 MiB for what was
/// read before the high-water mark showed (whole frames of publishers read in the same poll,
/// the broker's own events), plus one frame of `max_frame` bytes.
pub(crate) fn dest_queue_bytes(max_frame: usize) -> usize {
    HIGH_WATER + (1 << 20) + max_frame
}

/// (broker) Flow-control state of one destination slot.
#[derive(Debug, Clone, Copy, Default)]
struct DestState {
    /// It has an attached connection.
    connected: bool,
    /// Connected, at or above the high-water mark, and took nothing for [`STALL_AFTER`]; or
    /// without a connection for [`STALL_AFTER`]. Either way it no longer holds publishers back.
    stalled: bool,
    /// `written()` of its queue when last seen moving (or below the high-water mark), and when.
    progress: (u64, Option<Instant>),
    /// Since when it has had no connection (`None`: connected, or not seen yet).
    detached_since: Option<Instant>,
    /// The process id of its last attached worker (0: none yet).
    pid: i32,
}

/// This process's end of the socket transport.
pub(crate) struct SocketPort {
    me: u32,
    geo: Geometry,
    max_payload_len: usize,
    unique_capacity: usize,
    /// This process is the broker (it relays).
    serving: bool,
    /// (client) Our "all" events for the broker; survives reconnects.
    client_out: OutQueue,
    /// (broker) Frames for each slot, attached or not yet.
    slot_out: Vec<OutQueue>,
    /// (broker) The usual byte bound of a destination queue ([`dest_queue_bytes`]).
    dest_cap: usize,
    /// Data frames received, not yet dispatched.
    inbox: Inbox,
    seq: Sequencer,
    /// (broker) The unique-event dedup table, in private memory: a socket broker failover
    /// starts with an empty table (documented in the crate's fault model).
    dedup: Option<HeapTable>,
    /// (broker) Random id handed out in WELCOME; tells brokers apart.
    broker_id: u64,
    /// (broker) Flow-control state per destination slot.
    dests: Vec<DestState>,
    /// (client) Data frames dispatched from the broker connection (`ack.rs`).
    acks: AckCount,
    /// (client) The current dispatch pass dispatched frames from the broker.
    pass_acked: bool,
    /// (broker) A slot queue may hold orphans: unique events written to a connection that
    /// ended before acknowledging them, to be routed again (`ack.rs`).
    orphans_due: bool,
    pub(crate) counters: PortCounters,
}

impl SocketPort {
    /// A port for slot `me`.
    pub(crate) fn new(
        me: u32,
        geo: Geometry,
        max_payload_len: usize,
        max_queue_len: usize,
        unique_capacity: usize,
    ) -> SocketPort {
        let max_frame = message::max_message_len(max_payload_len) + STAMP_LEN + 64;
        let (dest_cap, keep) = (dest_queue_bytes(max_frame), ack::keep_bytes(max_frame));
        SocketPort {
            me,
            geo,
            max_payload_len,
            unique_capacity,
            serving: false,
            client_out: OutQueue::new(max_queue_len, CLIENT_QUEUE_BYTES),
            slot_out: (0..geo.slots)
                .map(|_| OutQueue::new(usize::MAX, dest_cap).track_acks(ack::classify, keep))
                .collect(),
            orphans_due: false,
            dest_cap,
            inbox: Inbox::default(),
            seq: Sequencer::new(geo.slots),
            dedup: None,
            broker_id: 0,
            dests: vec![DestState::default(); geo.slots as usize],
            acks: AckCount::default(),
            pass_acked: false,
            counters: PortCounters::default(),
        }
    }

    /// Become the relay: a fresh broker id, the dedup table, and our events that waited for
    /// a broker (stamped already: the sequence continues) go out to every slot. That backlog
    /// (bounded by our own queue's bounds) is taken above each destination's byte bound, not
    /// dropped: each destination's bound grows by its size and shrinks back to the usual one
    /// as the destination drains it ([`SocketPort::links_seen`]), so our later events keep
    /// the usual room behind it.
    pub(crate) fn serve(&mut self) {
        self.serving = true;
        self.broker_id = crate::sys::random_u64() | 1;
        if self.dedup.is_none() {
            self.dedup = Some(HeapTable::new(self.unique_capacity));
        }
        let backlog = self.take_client_out();
        let extra: usize = backlog.iter().map(|m| m.len() + 5).sum();
        for q in &mut self.slot_out {
            q.set_cap_bytes(q.cap_bytes().max(q.queued_bytes() + self.dest_cap).saturating_add(extra));
        }
        for m in backlog {
            if let Some((st, msg)) = m.split_first_chunk::<STAMP_LEN>() {
                self.counters.lost_outbound += self.broadcast(self.me, st, msg);
            }
        }
    }

    /// Take over the data frames that arrived before this port existed (with the WELCOME).
    pub(crate) fn adopt_inbox(&mut self, inbox: Inbox) {
        if self.inbox.is_empty() {
            self.inbox = inbox;
        }
    }

    /// Attached to a broker as a client.
    pub(crate) fn attached_as_client(&mut self) {
        self.serving = false;
    }

    /// The random id this broker hands out in WELCOME.
    pub(crate) fn broker_id(&self) -> u64 {
        self.broker_id
    }

    /// Room for one more "all" event (the broker never refuses its own: a full destination
    /// drops and owes a notice).
    pub(crate) fn has_room(&self) -> bool {
        self.serving || !self.client_out.is_full()
    }

    /// The room [`SocketPort::has_room`] checks, for several events in a row: a frame
    /// holds its length word, kind byte, stamp and message.
    pub(crate) fn all_room(&self) -> Room {
        if self.serving {
            return Room::UNLIMITED;
        }
        let (frames, bytes) = self.client_out.room();
        Room { frames, bytes, overhead: 4 + 1 + STAMP_LEN }
    }

    /// Stamp and send an "all" event: relay it as the broker, queue it for the broker as a
    /// client (the caller checked [`SocketPort::has_room`]). Writes at once when a connected
    /// queue holds [`COALESCE_BYTES`]. Returns false when a client's queue was full.
    pub(crate) fn send_all(&mut self, msg: &[u8], conns: Option<&mut (dyn Connections + '_)>) -> bool {
        let stamp = self.seq.next_stamp();
        let queued = if self.serving {
            self.counters.lost_outbound += self.broadcast(self.me, &stamp, msg);
            true
        } else {
            self.client_out.push(kind::EVENT, &[&stamp, msg])
        };
        if let Some(conns) = conns {
            if self.flush_due(&*conns) {
                conns.write(self);
            }
        }
        queued
    }

    /// (client) Take back the events not yet sent (moving to shared memory): messages
    /// without their stamps.
    pub(crate) fn take_unsent(&mut self) -> Vec<AlignedVec> {
        self.take_client_out()
            .into_iter()
            .map(|m| {
                let mut b = AlignedVec::with_capacity(m.len());
                b.extend_from_slice(m.get(STAMP_LEN..).unwrap_or_default());
                b
            })
            .collect()
    }

    fn take_client_out(&mut self) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        self.client_out.drain_frames(|k, body| {
            if k == kind::EVENT {
                v.push(body.to_vec());
            }
        });
        v
    }

    /// (broker) Queue `msg` from publisher slot `from` for every slot but the publisher and
    /// ourselves. Returns how many destinations dropped it (full queues; each owes that
    /// destination a lost notice).
    fn broadcast(&mut self, from: u32, stamp: &Stamp, msg: &[u8]) -> u64 {
        let mut dropped = 0;
        for (t, q) in self.slot_out.iter_mut().enumerate() {
            if t as u32 == from || t as u32 == self.me {
                continue;
            }
            dropped += u64::from(!queue_deliver(q, from, stamp, msg));
        }
        dropped
    }

    /// (broker) Queue a unique event for slot `to`: its ticket ([`SocketPort::handed_off`]),
    /// or `None` (nothing queued, nothing owed) when that queue is full: the caller hands
    /// the event to another worker (itself). A unique event is never counted in a `LOST`
    /// notice: those count a publisher's "all" events, and the receiver takes them off its
    /// next sequence gap.
    pub(crate) fn send_to(&mut self, to: u32, msg: &[u8]) -> Option<u64> {
        let q = self.slot_out.get_mut(to as usize)?;
        q.push_lost_notices(kind::LOST);
        q.push(kind::DELIVER, &[&UNSEQUENCED, msg]).then(|| q.ticket())
    }

    /// (broker) The frame queued for `to` with `ticket` is completely written: the kernel
    /// took it, and it is in the receiver's socket buffer (it survives our death).
    pub(crate) fn handed_off(&self, to: u32, ticket: u64) -> bool {
        self.slot_out.get(to as usize).is_none_or(|q| q.done() >= ticket)
    }

    /// (broker) Take the unique events queued for `to` and not written at all out of its
    /// queue (to route them elsewhere), in queue order. `live`: the connection `to` has
    /// now; a frame written in part on it stays (one written in part on a connection gone
    /// is not written: it is taken too).
    pub(crate) fn take_unique(&mut self, to: u32, live: Option<u64>) -> Vec<Vec<u8>> {
        let Some(q) = self.slot_out.get_mut(to as usize) else { return Vec::new() };
        if live != Some(q.conn()) {
            q.rewind();
        }
        let mut v = q.take_unwritten(|k, body| k == kind::DELIVER && body.starts_with(&UNSEQUENCED));
        for m in &mut v {
            m.drain(..STAMP_LEN);
        }
        v
    }

    /// (broker) Slot `to` takes unique events now: it has a connection (`live`) and it
    /// reads it (not stalled, as of the last poll).
    pub(crate) fn takes_unique(&self, to: u32, live: bool) -> bool {
        live && self.dests.get(to as usize).is_some_and(|d| !d.stalled)
    }

    /// (broker) Look a unique hash up in the dedup table and record it; `None` before the
    /// table exists.
    pub(crate) fn dedup_check(&self, hash: &[u8], now_ns: u64, ttl_ns: u64) -> Option<Check> {
        let heap = self.dedup.as_ref()?;
        Some(heap.table().check_and_record(crate::dedup::tag(heap.key(), hash), now_ns, ttl_ns))
    }

    /// (broker) The dedup table exists.
    pub(crate) fn can_dedup(&self) -> bool {
        self.dedup.is_some()
    }

    fn queue(&self, link: Link) -> Option<&OutQueue> {
        match link.peer {
            Peer::Broker => Some(&self.client_out),
            Peer::Slot(s) => self.slot_out.get(s as usize),
        }
    }

    /// A connected queue holds at least [`COALESCE_BYTES`]: time to write instead of
    /// waiting for `dispatch`. Queues of slots not connected are left out (they would make
    /// every publish write).
    pub(crate) fn flush_due(&self, conns: &dyn Connections) -> bool {
        let mut due = false;
        conns.for_each_link(&mut |l| {
            due |= self.queue(l).is_some_and(|q| q.pending_bytes_on(l.conn) >= COALESCE_BYTES);
        });
        due
    }

    /// Data frames (or owed notices) a connected link has not written yet.
    pub(crate) fn has_output(&self, conns: &dyn Connections) -> bool {
        let mut any = false;
        conns.for_each_link(&mut |l| {
            any |= self.queue(l).is_some_and(|q| {
                q.pending_bytes_on(l.conn) > 0 || (matches!(l.peer, Peer::Slot(_)) && q.owes_notices() && !q.is_full())
            });
        });
        any
    }

    /// (client) Events queued for the broker and not completely written.
    pub(crate) fn unsent(&self) -> u64 {
        if self.serving { 0 } else { self.client_out.len() as u64 }
    }

    /// Frames queued per peer: ours for the broker as a client, each slot's as the broker.
    pub(crate) fn depths(&self) -> Vec<PeerDepth> {
        let depth = |peer, q: &OutQueue| PeerDepth { peer, outbound: q.len() as u64, backlog: 0, inbound: 0 };
        if self.serving {
            let me = self.me;
            let slots = self.slot_out.iter().enumerate().filter(|(t, _)| *t as u32 != me);
            slots.map(|(t, q)| depth(Peer::Slot(t as u32), q)).collect()
        } else {
            vec![depth(Peer::Broker, &self.client_out)]
        }
    }

    /// Dispatch the frames the connections brought: as the broker, "all" events from
    /// workers (run here, then queued for every other slot); as a client, events and lost
    /// notices from the broker. Returns the events dispatched.
    pub(crate) fn dispatch(&mut self, sink: &mut dyn Deliver) -> usize {
        let mut inbox = std::mem::take(&mut self.inbox);
        let mut n = 0;
        let mut acked = false;
        inbox.drain(|from, k, body| {
            n += self.dispatch_frame(from.peer, k, body, sink);
            if from.peer == Peer::Broker && !self.serving {
                acked |= self.acks.count(from.conn);
            }
        });
        if self.inbox.is_empty() {
            self.inbox = inbox;
        }
        // A pass that delivered nothing is a going-idle pass (frames dropped as duplicates or
        // malformed are counted, and acknowledged at once).
        self.pass_acked |= acked && n > 0;
        n
    }

    fn dispatch_frame(&mut self, from: Peer, k: u8, body: &[u8], sink: &mut dyn Deliver) -> usize {
        let (stamp, msg) = match body.split_first_chunk::<STAMP_LEN>() {
            Some((st, msg)) if k != kind::LOST => (*st, msg),
            _ => (UNSEQUENCED, body),
        };
        let geo = self.geo;
        let decoded = message::decode(msg, geo.workers, geo.agent, self.max_payload_len);
        match (k, from) {
            (kind::EVENT, Peer::Slot(from)) if self.serving => match decoded {
                Ok(d) if d.kind == Kind::All && d.event.wid == Some(geo.wid_of(from)) => {
                    if !self.admit(from, &stamp, sink) {
                        return 0;
                    }
                    sink.event(&d.event);
                    self.counters.lost_outbound += self.broadcast(from, &stamp, msg);
                    1
                }
                _ => {
                    crate::log_limit::log_limited!(
                        tracing::Level::WARN,
                        from,
                        "dropping a malformed event from a worker"
                    );
                    sink.dropped();
                    0
                }
            },
            (kind::DELIVER, Peer::Broker) if !self.serving => match decoded {
                Ok(d)
                    if d.kind == Kind::All
                        && d.event.wid.is_some_and(|w| w != geo.wid_of(self.me))
                        && stamp != UNSEQUENCED =>
                {
                    let origin = d.event.wid.map_or(0, |w| geo.slot_of(w));
                    if !self.admit(origin, &stamp, sink) {
                        return 0;
                    }
                    sink.event(&d.event);
                    1
                }
                Ok(d) if d.kind == Kind::Unique && d.event.wid.is_some() => {
                    sink.event(&d.event);
                    1
                }
                _ => {
                    crate::log_limit::log_limited!(tracing::Level::WARN, "dropping a malformed event from the broker");
                    sink.dropped();
                    0
                }
            },
            (kind::LOST, Peer::Broker) if !self.serving => match lost_body(body) {
                Some((from, count)) if from < geo.slots => {
                    self.seq.skip(from, count);
                    sink.lost(from, count);
                    1
                }
                _ => {
                    crate::log_limit::log_limited!(
                        tracing::Level::WARN,
                        "dropping a malformed lost notice from the broker"
                    );
                    sink.dropped();
                    0
                }
            },
            _ => {
                sink.dropped();
                0
            }
        }
    }

    /// Check a stamp; a gap is reported as a lost notice before the event runs.
    fn admit(&mut self, from: u32, stamp: &Stamp, sink: &mut dyn Deliver) -> bool {
        match self.seq.check(from, stamp) {
            Verdict::Drop => {
                sink.dropped();
                false
            }
            Verdict::Deliver { gap } => {
                if gap > 0 {
                    sink.lost(from, gap);
                }
                true
            }
        }
    }

    /// (broker) Once per poll, with the slots that have an attached connection: update each
    /// destination's flow-control state, and drop the queue of a slot without a connection
    /// for [`DETACHED_KEEP`] (its events become lost notices owed to the slot).
    fn links_seen(&mut self, connected: &[u32], now: Instant) {
        if !self.serving {
            return;
        }
        for (t, d) in self.dests.iter_mut().enumerate() {
            // A bound raised for a new broker's backlog shrinks back as the queue drains.
            let q = &mut self.slot_out[t];
            if q.cap_bytes() > self.dest_cap {
                q.set_cap_bytes((q.queued_bytes() + self.dest_cap).min(q.cap_bytes()).max(self.dest_cap));
            }
            let q = &self.slot_out[t];
            d.connected = connected.contains(&(t as u32));
            if !d.connected {
                // Its unique events never acknowledged: routed again at once.
                self.orphans_due |= self.slot_out[t].end_kept();
                let q = &self.slot_out[t];
                d.progress = (q.written(), None);
                let since = *d.detached_since.get_or_insert(now);
                d.stalled = now.duration_since(since) >= STALL_AFTER;
                if now.duration_since(since) >= DETACHED_KEEP {
                    // What its last connection was sent and never dispatched is owed too
                    // (otherwise settled when the next connection writes: `outbound`).
                    let q = &mut self.slot_out[t];
                    self.counters.lost_outbound += ack::settle_unacked(q);
                    if q.len() > 0 {
                        self.counters.lost_outbound += owed::drop_queue(q, self.geo, self.max_payload_len);
                    }
                }
                continue;
            }
            if d.detached_since.take().is_some() {
                d.stalled = false;
            }
            let moved = d.progress.0 != q.written() || q.pending_bytes() < HIGH_WATER;
            if moved || d.progress.1.is_none() {
                d.progress = (q.written(), Some(now));
            }
            let was = d.stalled;
            d.stalled = !moved && d.progress.1.is_some_and(|t0| now.duration_since(t0) >= STALL_AFTER);
            if d.stalled && !was {
                tracing::warn!(slot = t, "a worker takes nothing from its socket; it no longer holds publishers back");
            }
        }
    }

    /// (broker) Bytes the broker may read now from publisher slot `from`: what every
    /// connected, not stalled destination but `from` and ourselves has left below
    /// [`HIGH_WATER`], less the frames read and not dispatched yet.
    fn read_budget(&self, from: u32) -> usize {
        if !self.serving {
            return usize::MAX;
        }
        let mut room = HIGH_WATER.saturating_sub(self.inbox.bytes());
        for (t, d) in self.dests.iter().enumerate() {
            if t as u32 == from || t as u32 == self.me || d.stalled {
                continue;
            }
            room = room.min(HIGH_WATER.saturating_sub(self.slot_out[t].pending_bytes()));
        }
        room
    }

    /// Flush: write what the connections take now. True when no data is left to write.
    pub(crate) fn flush(&mut self, conns: &mut dyn Connections) -> bool {
        conns.write(self);
        !self.has_output(&*conns)
    }
}

impl DataPlane for SocketPort {
    fn receive(&mut self, from: Link, kind: u8, body: &[u8]) {
        self.inbox.push(from, kind, body);
    }

    fn welcomed(&mut self, link: Link, pid: i32) {
        self.welcome_settle(link, pid);
    }

    fn ack(&mut self, from: Link, total: u64) {
        if let Some(q) = self.outbound(from) {
            q.ack(total);
        }
    }

    fn outbound(&mut self, link: Link) -> Option<&mut OutQueue> {
        match link.peer {
            Peer::Broker => {
                let q = &mut self.client_out;
                if q.conn() != link.conn {
                    // Acknowledgements are of one connection: those not written go, and the
                    // new connection's total (frames that came with its WELCOME) is queued.
                    q.rewind();
                    q.take_unwritten(|k, _| k == kind::ACK);
                    if let Some(total) = self.acks.total_for(link.conn) {
                        q.push_ack(total);
                    }
                }
                Some(q.on_conn(link.conn))
            }
            Peer::Slot(s) => {
                let q = self.slot_out.get_mut(s as usize)?;
                if q.conn() != link.conn {
                    self.counters.lost_outbound += ack::settle_unacked(q);
                    self.orphans_due |= q.has_orphans();
                }
                Some(q.on_conn(link.conn))
            }
        }
    }

    fn links_seen(&mut self, connected: &[u32], now: Instant) {
        SocketPort::links_seen(self, connected, now);
    }

    fn read_budget(&self, from: u32) -> usize {
        SocketPort::read_budget(self, from)
    }
}

/// Queue `msg` for one destination, the owed lost notices first; false (and a notice owed)
/// when the destination's queue is full.
fn queue_deliver(q: &mut OutQueue, from: u32, stamp: &Stamp, msg: &[u8]) -> bool {
    q.push_lost_notices(kind::LOST);
    if q.push(kind::DELIVER, &[stamp, msg]) {
        true
    } else {
        q.note_lost(from);
        false
    }
}

/// The body of a `LOST` frame: `(publisher slot u32, count u64)`, exactly 12 bytes.
fn lost_body(body: &[u8]) -> Option<(u32, u64)> {
    let mut b = Body(body);
    match (b.u32(), b.u64()) {
        (Ok(from), Ok(count)) if b.0.is_empty() => Some((from, count)),
        _ => None,
    }
}
