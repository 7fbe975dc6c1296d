//! The shared-memory transport: this process's ends of every ring it takes part in.
//!
//! For each peer `c` this process owns the producer of ring `me -> c` and the consumer of
//! ring `c -> me`. A message that does not fit in a ring right now waits in a private
//! per-peer backlog (bounded by `max_queue_len`), in order, and is retried on every
//! `publish`/`dispatch`; the consumer wakes us when it frees space we asked for. A message
//! larger than a quarter of the ring is streamed as FIRST..LAST fragments. Only when a
//! backlog is full is an event dropped, and then the receiver is told (`lost`).
//!
//! A backlog lives in private memory and dies with the process, so each ring's producer
//! line carries what it owes (`owed`, `src/ring/owed.rs`), stored whenever the backlog for
//! that ring changes: if the process is killed, the slot's next incarnation takes it when it
//! attaches ([`ShmPort::attach`], added to the ring's `lost` counter), or the receiver takes
//! it when it finds the slot's lock free ([`ShmPort::take_dead_owed`]), whichever comes
//! first; the other finds nothing (compare-and-swap). Never silent, never reported twice.

use std::collections::VecDeque;
use std::sync::Arc;

use rkyv::util::AlignedVec;

use std::os::fd::AsFd;

use super::{Deliver, PeerDepth, PortCounters};
use crate::event::Wid;
use crate::message::{self, Kind};
use crate::notify;
use crate::region::Region;
use crate::ring::{self, Consumer, FIRST, LAST, Producer, REC_HDR, record_size};
use crate::sys::EventFd;
use crate::wire::{Offer, Peer};

mod bcast;
mod receive;
mod write;

use bcast::{BcastIn, BcastOut};
use write::{Claims, offer, wake, write_msg};

/// Drain passes after a release before the fenced want-space checks it left owed are paid
/// anyway (a consumer that never arms: busy-poll, or a stream that never pauses). A producer
/// waiting for room is told within this many passes of the consumer, or at its next arm.
const SETTLE_PASSES: u32 = 64;

struct Pending {
    msg: Arc<AlignedVec>,
    /// Bytes already committed as fragments.
    sent: usize,
}

struct Outbound {
    /// None while the consumer's position is unusable ([`Producer::new`] refuses it): every
    /// event for it is counted lost, and each new event retries (the consumer repairs its
    /// position when it attaches); the events counted meanwhile are then reported to it.
    prod: Option<Producer>,
    /// The ring, for those retries.
    raw: ring::RawRing,
    /// Events counted lost while `prod` was None, not yet added to the ring's lost counter.
    missed: u64,
    backlog: VecDeque<Pending>,
    /// The producer has a pending want-space request for this ring.
    touched: bool,
    /// (count, started, diverted) last stored in the ring's `owed` word.
    owed: (u64, bool, bool),
    /// Per-publisher topology: this consumer is diverted from our broadcast ring to this
    /// ring (it fell a whole broadcast ring behind, or a message too large for it came);
    /// every event for it goes this way, tagged with its broadcast sequence number, until it
    /// is told to resume (`transport/shm/bcast.rs`).
    diverted: bool,
}

impl Outbound {
    /// Store what this ring's backlog owes its consumer, if it changed: the messages never
    /// started (and those counted in `missed`), and whether the first one is partly written.
    fn publish_owed(&mut self, incarnation: u32) {
        let started = self.backlog.front().is_some_and(|p| p.sent > 0);
        let count = (self.backlog.len() - usize::from(started)) as u64 + self.missed;
        if self.owed != (count, started, self.diverted) {
            self.owed = (count, started, self.diverted);
            self.raw.store_owed_diverted(incarnation, count, started, self.diverted);
        }
    }
}

#[derive(PartialEq, Eq)]
enum Asm {
    Idle,
    Assembling,
    /// Skipping the rest of a message we cannot deliver (already counted lost).
    Discarding,
}

struct Inbound {
    cons: Option<Consumer>,
    asm: AlignedVec,
    state: Asm,
    /// Messages a dead producer owed us from its backlog (taken by
    /// [`ShmPort::take_dead_owed`]), reported at the next drain.
    owed_lost: u64,
    /// A dead producer had written part of a message it can never finish: once its
    /// fragments are read (the ring empty, no FIRST since), that message is reported lost.
    orphan: bool,
    /// Per-publisher topology: our end of the peer's broadcast ring.
    bc: Option<BcastIn>,
}

pub(crate) struct ShmPort {
    region: Region,
    /// One eventfd per slot (index = slot), then the group's fan-out eventfd: `slots + 1`.
    eventfds: Vec<EventFd>,
    me: u32,
    /// This attach's incarnation of the slot (its generation), stored in `owed` words.
    incarnation: u32,
    out: Vec<Option<Outbound>>,
    inb: Vec<Option<Inbound>>,
    max_queue_len: usize,
    max_msg: usize,
    max_payload_len: usize,
    /// Peers whose backlog is not empty.
    backlogged: usize,
    /// Inside a [`crate::Batch`]'s publish: [`ShmPort::send_all`] leaves what it wrote
    /// uncommitted (set and cleared around each such publish, never across calls).
    defer: bool,
    /// Records written by a batch and not committed yet. Every call that is not a batch's
    /// publish commits them first (through [`ShmPort::flush`] or [`ShmPort::dispatch`]), so
    /// a batch guard that is leaked instead of dropped delays its events until this worker's
    /// next library call, never for good.
    pending: bool,
    /// Broadcast rings: a pair ring was written since the last commit (copies for a
    /// diverted receiver, a resume marker, a backlog retry). While it is false, a commit
    /// has only the broadcast ring to commit and its tracked readers to look at
    /// (`ShmPort::commit_and_wake_bcast`), not every pair ring.
    pair_touched: bool,
    armed: bool,
    /// Drain passes since a release left a fenced want-space check owed (0: none owed).
    owed_passes: u32,
    /// Per-publisher topology: our broadcast ring (None: the region has none, or ours is
    /// corrupt and every receiver is diverted to its pair ring).
    bc: Option<BcastOut>,
    /// The region has broadcast rings.
    bcast_on: bool,
    pub(crate) counters: PortCounters,
}

impl ShmPort {
    /// Take this slot's ends of the rings. The caller holds the slot lock, so no other live
    /// process owns them. `eventfds`: one per slot, then the fan-out eventfd (the WELCOME's
    /// count is checked by `control::protocol::parse_welcome`).
    pub(crate) fn attach(
        region: Region,
        eventfds: Vec<EventFd>,
        me: u32,
        max_queue_len: usize,
        max_payload_len: usize,
    ) -> ShmPort {
        let max_msg = message::max_message_len(max_payload_len) + bcast::TAG_LEN;
        let slots = region.geometry().slots;
        debug_assert_eq!(eventfds.len(), slots as usize + 1, "one eventfd per slot and the fan-out one");
        let mut counters = PortCounters::default();
        let mut out = Vec::with_capacity(slots as usize);
        let mut inb = Vec::with_capacity(slots as usize);
        for peer in 0..slots {
            if peer == me {
                out.push(None);
                inb.push(None);
                continue;
            }
            let raw = region.ring(me, peer);
            let prod = Producer::new(raw).ok();
            if prod.is_none() {
                tracing::warn!(me, peer, "outbound ring: the consumer's position is unusable; retrying per event");
            }
            let mut cons = Consumer::new(region.ring(peer, me)).ok();
            if cons.as_mut().is_some_and(|c| c.take_resynced()) {
                tracing::warn!(me, peer, "inbound ring positions were corrupt: resynchronized to the producer's");
                counters.corrupt_rings += 1;
            }
            let diverted = region.geometry().bcast_capacity > 0 && raw.diverted();
            let mut o = Outbound {
                prod,
                raw,
                missed: 0,
                backlog: VecDeque::new(),
                touched: false,
                owed: (0, false, diverted),
                diverted,
            };
            // We hold the slot lock: whatever our predecessor owed this consumer from its
            // backlog is ours to report (unless the consumer found it dead first). A message
            // it had partly written is reported by the consumer when our first one starts.
            if let Some(taken) = raw.load_owed().and_then(|w| raw.take_owed(w)) {
                tracing::warn!(me, peer, lost = taken.count, "a dead predecessor's backlog: reported lost");
                match o.prod.as_mut() {
                    Some(p) => p.add_lost(taken.count),
                    None => o.missed = o.missed.saturating_add(taken.count),
                }
            }
            out.push(Some(o));
            let bc = (region.geometry().bcast_capacity > 0).then(|| BcastIn::attach(&region, peer, me, &mut counters));
            inb.push(Some(Inbound { cons, asm: AlignedVec::new(), state: Asm::Idle, owed_lost: 0, orphan: false, bc }));
        }
        let bcast_on = region.geometry().bcast_capacity > 0;
        let bc = if bcast_on { BcastOut::attach(&region, me, &mut out) } else { None };
        region.mark_attached(me);
        let incarnation = region.slot_generation(me) as u32;
        for o in out.iter_mut().flatten() {
            o.publish_owed(incarnation);
        }
        ShmPort {
            region,
            eventfds,
            me,
            incarnation,
            out,
            inb,
            max_queue_len,
            max_msg,
            max_payload_len,
            backlogged: 0,
            defer: false,
            pending: false,
            pair_touched: false,
            armed: false,
            owed_passes: 0,
            bc,
            bcast_on,
            counters,
        }
    }

    pub(crate) fn region(&self) -> &Region {
        &self.region
    }

    /// What a broker on this region hands attaching workers.
    pub(crate) fn offer(&self, epoch: u64) -> Offer<'_> {
        Offer::Shm {
            region_fd: self.region.fd(),
            eventfds: self.eventfds.iter().map(|e| e.as_fd()).collect(),
            epoch,
            region_id: self.region.id(),
        }
    }

    pub(crate) fn my_eventfd(&self) -> &EventFd {
        &self.eventfds[self.me as usize]
    }

    /// The group's fan-out eventfd (after the slots' own): one write wakes every worker
    /// asleep on the region (see [`notify::FANOUT_MIN`]).
    pub(crate) fn fanout_eventfd(&self) -> &EventFd {
        &self.eventfds[self.eventfds.len() - 1]
    }

    /// Send `msg` to every other slot. Never fails: a full ring queues the message in the
    /// backlog; a full backlog drops it for that peer and counts it (the peer is told).
    #[inline(always)]
    pub(crate) fn send_all(&mut self, msg: &AlignedVec) {
        if self.bcast_on {
            return self.send_bcast(msg, None);
        }
        let mut shared = None;
        let mut any = false;
        let backlogged = self.backlogged;
        for o in self.out.iter_mut().flatten() {
            any |= offer(o, msg, &mut shared, self.max_queue_len, &mut self.backlogged, &mut self.counters);
            o.publish_owed(self.incarnation);
        }
        if any {
            if self.defer && self.backlogged == backlogged {
                // A batch's publish: the batch's end commits (and wakes) once. A ring that
                // has just filled (a new backlog) commits now instead, so that its consumer
                // can make room for the rest.
                self.pending = true;
                return;
            }
            self.commit_and_wake();
        }
    }

    /// Leave (or stop leaving) what [`ShmPort::send_all`] writes uncommitted: around each
    /// publish of a [`crate::Batch`].
    pub(crate) fn set_defer(&mut self, on: bool) {
        self.defer = on;
    }

    /// (deferring a batch's publish, records a batch left uncommitted), for tests.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn batch_state(&self) -> (bool, bool) {
        (self.defer, self.pending)
    }

    /// Commit what a batch left uncommitted, then wake parked receivers (a batch's end).
    pub(crate) fn end_batch(&mut self) {
        if self.pending {
            self.commit_pending();
        }
    }

    /// Send `msg` to one peer (a unique event chosen for it), with the same backlog and
    /// overflow rules as [`ShmPort::send_all`].
    pub(crate) fn send_to(&mut self, peer: u32, msg: &AlignedVec) {
        if self.bcast_on {
            if matches!(self.out.get(peer as usize), Some(Some(_))) {
                self.send_bcast(msg, Some(peer));
            }
            return;
        }
        let Some(Some(o)) = self.out.get_mut(peer as usize) else { return };
        let wrote = offer(o, msg, &mut None, self.max_queue_len, &mut self.backlogged, &mut self.counters);
        o.publish_owed(self.incarnation);
        if wrote {
            self.commit_and_wake();
        }
    }

    /// Commit every ring written since the last commit, then wake parked receivers.
    #[inline(always)]
    fn commit_and_wake(&mut self) {
        if self.bcast_on {
            // The per-publisher topology's version (`shm/bcast.rs`), out of this path.
            return self.commit_and_wake_bcast();
        }
        self.commit_and_wake_with(false, bcast::Wake::None);
    }

    /// Commit every pair ring written since the last commit; if anything was committed
    /// (there, or in the broadcast ring: `bcast_committed`), one fence, then a look at the
    /// `parked` flag of each receiver a pair ring was written for or `bwake` names. Inlined
    /// into both callers: the per-pair one passes constants and keeps its old code.
    #[inline(always)]
    fn commit_and_wake_with(&mut self, bcast_committed: bool, bwake: bcast::Wake) {
        self.pending = false;
        let mut committed = bcast_committed;
        for o in self.out.iter_mut().flatten() {
            if o.touched {
                if let Some(p) = o.prod.as_mut() {
                    committed |= p.commit();
                }
            }
        }
        if !committed {
            return;
        }
        notify::after_commit();
        let mut claims = Claims::default();
        for (c, o) in self.out.iter_mut().enumerate() {
            let Some(o) = o else { continue };
            let by_bcast = match bwake {
                bcast::Wake::None => false,
                bcast::Wake::All => !o.diverted,
                bcast::Wake::One(r) => r as usize == c && !o.diverted,
            };
            if !std::mem::take(&mut o.touched) && !by_bcast {
                continue;
            }
            claims.claim_if_parked(&self.region, c as u32);
        }
        claims.write(&self.eventfds, &mut self.counters);
    }

    /// Events waiting in private backlogs for room in a ring (all peers).
    pub(crate) fn backlogged(&self) -> usize {
        self.backlogged
    }

    /// Commit what a batch left uncommitted (unless called from a batch's own publish),
    /// then retry the backlogs. Returns true if anything was written (progress, not "done":
    /// ask [`ShmPort::backlogged`] for what is left). Inlined: with no backlog and no batch
    /// (the usual case on every publish and dispatch) it is two loads.
    #[inline(always)]
    pub(crate) fn flush(&mut self) -> bool {
        if self.pending && !self.defer {
            self.commit_pending();
        }
        self.backlogged != 0 && self.flush_backlogs()
    }

    /// [`ShmPort::flush`]'s commit of what a batch left, out of the publish path.
    #[cold]
    #[inline(never)]
    fn commit_pending(&mut self) {
        self.commit_and_wake();
    }

    /// [`ShmPort::flush`] with at least one backlog.
    #[inline(never)]
    fn flush_backlogs(&mut self) -> bool {
        let mut progress = false;
        for o in self.out.iter_mut().flatten() {
            let Some(prod) = o.prod.as_mut() else { continue };
            if prod.space_requested() {
                // The consumer will clear the flag and wake us when it frees space.
                continue;
            }
            let was = !o.backlog.is_empty();
            let mut asked = false;
            while let Some(front) = o.backlog.front_mut() {
                let before = front.sent;
                let sent = match write_msg(prod, &front.msg, front.sent) {
                    Ok(s) => s,
                    Err(_) => break,
                };
                if sent > before {
                    o.touched = true;
                    progress = true;
                }
                if sent == front.msg.len() {
                    o.backlog.pop_front();
                    continue;
                }
                front.sent = sent;
                if asked {
                    break;
                }
                // Ask the consumer to wake us when it frees space, then re-check once.
                asked = true;
                let want = (front.msg.len() - sent).min(prod.max_body() / 4);
                match prod.request_space(want) {
                    Ok(room) if room >= want => continue,
                    _ => break,
                }
            }
            if was && o.backlog.is_empty() {
                self.backlogged -= 1;
            }
            o.publish_owed(self.incarnation);
        }
        if progress {
            self.pair_touched = true;
            self.commit_and_wake();
        }
        progress
    }

    /// Pay the want-space checks that releases left owed: wake every producer that asked
    /// for room. The caller issued a SeqCst fence after the last release.
    fn settle(&mut self) {
        self.owed_passes = 0;
        for (from, inb) in self.inb.iter_mut().enumerate() {
            if let Some(c) = inb.as_mut().and_then(|i| i.cons.as_mut()) {
                if c.settle() {
                    wake(&self.region, &self.eventfds, from as u32, &mut self.counters);
                }
            }
        }
    }

    /// Retry the backlogs, then tell whether there is anything to do: inbound data, or a
    /// backlog that moved.
    fn flush_and_find_work(&mut self) -> bool {
        for inb in self.inb.iter_mut().flatten() {
            if let Some(c) = inb.cons.as_mut() {
                if c.has_data() {
                    return true;
                }
            }
            if inb.bc.as_ref().is_some_and(|b| b.has_data()) {
                return true;
            }
        }
        self.flush()
    }

    /// Mark ourselves parked and re-check. Returns true when it is safe to sleep on the
    /// eventfd (nothing arrived between the last drain and the arm).
    ///
    /// The arm's fence also pays the want-space checks owed by earlier releases (a producer
    /// waiting for room this consumer freed is woken before the consumer sleeps).
    pub(crate) fn arm(&mut self) -> bool {
        if !self.armed {
            notify::arm(self.region.parked_flag(self.me));
            self.armed = true;
            self.settle();
        } else if self.owed_passes > 0 {
            ring::settle_fence();
            self.settle();
        }
        if self.flush_and_find_work() {
            self.disarm();
            return false;
        }
        true
    }

    /// Clear the parked flag. Returns whether a peer cleared it first, i.e. wrote (or is
    /// about to write) our eventfd: one edge for the epoll set, which the caller harvests
    /// unless its own `epoll_wait` already reported it (the eventfd is never read).
    pub(crate) fn disarm(&mut self) -> bool {
        if !std::mem::take(&mut self.armed) {
            return false;
        }
        notify::disarm(self.region.parked_flag(self.me))
    }

    /// Whether an inbound ring has a committed record (a few loads; no fence, no flush):
    /// what a dispatch spinning for the next event of a stream polls.
    pub(crate) fn has_inbound(&mut self) -> bool {
        self.inb
            .iter_mut()
            .flatten()
            .any(|i| i.cons.as_mut().is_some_and(|c| c.has_data()) || i.bc.as_ref().is_some_and(|b| b.has_data()))
    }

    /// Give up every backlog (closing): each message never started in its ring is counted
    /// lost in the ring, so the peer (or the successor in its slot) gets a `lost` notice; a
    /// message cut after some fragments is reported by the consumer itself when the next
    /// message starts. Returns the messages given up.
    pub(crate) fn abandon_backlogs(&mut self) -> u64 {
        let mut total = 0;
        for o in self.out.iter_mut().flatten() {
            if o.backlog.is_empty() {
                continue;
            }
            let started = o.backlog.front().is_some_and(|p| p.sent > 0);
            let n = (o.backlog.len() - usize::from(started)) as u64;
            o.backlog.clear();
            self.backlogged -= 1;
            if let Some(prod) = o.prod.as_mut() {
                prod.add_lost(n);
            }
            // Counted in `lost` now (killed between the two stores, a receiver would hear of
            // these twice, never not at all).
            o.publish_owed(self.incarnation);
            self.counters.lost_outbound += n + u64::from(started);
            total += n + u64::from(started);
        }
        total
    }

    /// (receiver) Take what dead producers owed us from their backlogs: for each inbound
    /// ring whose `owed` word is not empty and whose producer slot `alive` says nobody
    /// holds, take the word (compare-and-swap: the producer's successor may take it at its
    /// attach instead) and report it at the next drain. The word is loaded **before** the
    /// liveness check (`src/ring/owed.rs` says why). A system call per ring that owes
    /// something; the worker calls it on its control timer (every 100-200 ms).
    pub(crate) fn take_dead_owed(&mut self, alive: impl Fn(u32) -> bool) {
        for (from, inb) in self.inb.iter_mut().enumerate() {
            let Some(inb) = inb.as_mut() else { continue };
            let raw = self.region.ring(from as u32, self.me);
            let Some(word) = raw.load_owed() else { continue };
            if alive(from as u32) {
                continue;
            }
            if let Some(taken) = raw.take_owed(word) {
                tracing::warn!(
                    from,
                    lost = taken.count,
                    started = taken.started,
                    "a dead publisher's backlog: reported lost"
                );
                inb.owed_lost = inb.owed_lost.saturating_add(taken.count);
                inb.orphan |= taken.started;
            }
        }
    }

    /// Queue depths per peer.
    pub(crate) fn depths(&self) -> impl Iterator<Item = PeerDepth> + '_ {
        self.out.iter().zip(&self.inb).enumerate().filter_map(|(i, (o, n))| {
            let (o, n) = (o.as_ref()?, n.as_ref()?);
            let mut ring = o.prod.as_ref().map_or(0, |p| p.depth());
            if self.bcast_on && !o.diverted {
                ring += self.region.bcast(self.me).unread_for(i);
            }
            let backlog = o.backlog.len() as u64;
            let mut inbound = n.cons.as_ref().map_or(0, |c| c.depth());
            if self.bcast_on {
                // What waits for us in that peer's broadcast ring, and for it in ours.
                inbound += self.region.bcast(i as u32).unread_for(self.me as usize);
            }
            Some(PeerDepth { peer: Peer::Slot(i as u32), outbound: ring + backlog, backlog, inbound })
        })
    }
}

impl Drop for ShmPort {
    fn drop(&mut self) {
        if self.owed_passes > 0 {
            ring::settle_fence();
            self.settle();
        }
        self.region.mark_detached(self.me);
    }
}
