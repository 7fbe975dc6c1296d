//! Unique events. On shared memory the publisher routes its own unique events: it records
//! the hash in the region's dedup table (a multi-writer claim, `dedup.rs`), picks one live
//! target (round-robin, preferring other workers) and writes the event into that target's
//! ring, with no broker on the path. On the socket transport the publisher's outbox keeps
//! them until a broker acknowledges them (resent to the next broker), and the broker routes
//! them the same way with its private table, acknowledging each only once it is handed off
//! (`handoff.rs`). Before attaching they wait in the outbox.

use std::collections::VecDeque;

use rkyv::util::AlignedVec;

use super::Worker;
use super::handoff::Held;
use crate::dedup::{Check, Tag};
use crate::divert::Patterns;
use crate::error::PublishError;
use crate::error::{Error, Result};
use crate::event::{Target, Wid};
use crate::message::{self, Kind};
use crate::transport::Sent;

/// What [`Worker::divert_unique`]'s patterns made of a unique event.
enum Diverted {
    /// Not diverted: route it here, as usual.
    No(AlignedVec),
    /// Sent to the agent; where it waits to be handed off (socket transport), if anywhere.
    Yes(Option<Held>),
}

/// One unique event not yet acknowledged.
struct UniqueOut {
    id: u64,
    hash: Box<str>,
    msg: AlignedVec,
}

/// Unique events not yet routed (published before attaching) or, on the socket transport,
/// not yet acknowledged by a broker, in publish order.
#[derive(Default)]
pub(super) struct UniqueOutbox {
    out: VecDeque<UniqueOut>,
    /// How many of `out` were sent on the current broker connection.
    sent: usize,
    next_id: u64,
    /// Events sent again to a new broker connection ([`crate::stats::Stats::unique_resent`]).
    resent: u64,
}

impl UniqueOutbox {
    pub(super) fn len(&self) -> usize {
        self.out.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// A new broker connection (or none): everything unacknowledged is sent again.
    pub(super) fn resend_all(&mut self) {
        self.resent += self.sent as u64;
        self.sent = 0;
    }

    /// The broker handled our events up to `id`: their buffers, for reuse.
    pub(super) fn acknowledged(&mut self, id: u64) -> Vec<AlignedVec> {
        let mut done = Vec::new();
        while self.out.front().is_some_and(|u| u.id <= id) {
            if let Some(u) = self.out.pop_front() {
                self.sent = self.sent.saturating_sub(1);
                done.push(u.msg);
            }
        }
        done
    }
}

impl Worker {
    /// (shared memory) Before a unique event is encoded: its dedup tag, with the line of the
    /// table its claim will read prefetched, so that the claim's likely cache miss overlaps
    /// the encoding instead of following it. `None` for other targets and paths.
    #[inline]
    pub(super) fn prefetch_unique(&self, target: Target<'_>) -> Option<Tag> {
        let Target::Unique(hash) = target else { return None };
        self.path.dedup_prefetch(hash.as_bytes())
    }

    /// Route a unique event (shared memory), or queue it and move it towards the broker.
    /// `tag`: its dedup tag on this path, if [`Worker::prefetch_unique`] took it.
    pub(super) fn queue_unique(&mut self, hash: &str, tag: Option<Tag>, buf: AlignedVec) -> Result<(), PublishError> {
        if self.path.shm().is_some() {
            // Anything published before attaching goes first (per-publisher order).
            self.pump_unique();
            if self.unique.is_empty() {
                self.stats.published += 1;
                self.route_unique(hash.as_bytes(), tag, buf, self.slot);
                return Ok(());
            }
        }
        if self.unique.out.len() >= self.opts.max_queue_len {
            self.stats.overflows += 1;
            self.recycle(buf);
            return Err(PublishError::QueueOverflow);
        }
        let u = &mut self.unique;
        u.next_id += 1;
        u.out.push_back(UniqueOut { id: u.next_id, hash: hash.into(), msg: buf });
        self.stats.published += 1;
        self.pump_unique();
        Ok(())
    }

    /// Move waiting unique events on: on shared memory route them ourselves; on the socket
    /// transport handle them here when we are the broker, send the ones not yet sent on this
    /// connection when attached; keep them otherwise.
    pub(super) fn pump_unique(&mut self) {
        if self.unique.is_empty() || self.path.transport().is_none() {
            return;
        }
        if self.path.shm().is_some() {
            while let Some(u) = self.unique.out.pop_front() {
                self.route_unique(u.hash.as_bytes(), None, u.msg, self.slot);
            }
            self.unique.sent = 0;
            return;
        }
        if self.is_broker() && !self.step_down_if_fenced() {
            if !self.path.can_dedup() {
                return;
            }
            while let Some(u) = self.unique.out.pop_front() {
                let held = self.route_unique(u.hash.as_bytes(), None, u.msg, self.slot);
                // Tracked (never acknowledged): routed again if its target does not take it.
                self.track_unique(self.slot, 0, 0, held);
            }
            self.unique.sent = 0;
            return;
        }
        let (Some(ctl), Some(broker)) = (self.ctl.as_mut(), self.broker.slot) else { return };
        let u = &mut self.unique;
        let mut sent_any = false;
        for e in u.out.iter().skip(u.sent) {
            if !ctl.send_unique(e.id, e.hash.as_bytes(), &e.msg) {
                break;
            }
            u.sent += 1;
            sent_any = true;
        }
        if sent_any {
            // Write them now, after any data frame the socket took only part of.
            self.path.flush(Some(ctl));
            // Tell a busy-polling broker to look at its control sockets now.
            self.path.set_control_hint(broker);
        }
    }

    /// (broker) A unique event from another worker's UNIQUE frame (connection `conn`, the
    /// publisher's id `id`): check it, then route it; it is acknowledged once handed off
    /// ([`Worker::settle_unique`]).
    pub(super) fn handle_unique(&mut self, from: u32, conn: u64, id: u64, hash: &[u8], msg: &[u8]) {
        let g = self.geo;
        let ok = message::decode(msg, g.workers, g.agent, self.opts.max_payload_len)
            .is_ok_and(|d| d.kind == Kind::Unique && d.event.wid == Some(g.wid_of(from)));
        let held = if ok {
            let mut buf = self.buffer();
            buf.clear();
            buf.extend_from_slice(msg);
            self.route_unique(hash, None, buf, from)
        } else {
            crate::log_limit::log_limited!(tracing::Level::WARN, from, "dropping a malformed unique event");
            self.stats.dropped += 1;
            None
        };
        self.track_unique(from, conn, id, held);
    }

    /// Dedup a unique event and deliver it to one live worker ([`Worker::place_unique`]).
    /// A unique event of another publisher than the agent that matches the agent's
    /// diversion patterns goes to the agent instead, with no dedup here
    /// ([`Worker::divert_unique`]). Returns where it waits to be handed off (socket
    /// transport), if anywhere. `tag`: the hash's dedup tag on this path, if taken already.
    fn route_unique(&mut self, hash: &[u8], tag: Option<Tag>, msg: AlignedVec, publisher: u32) -> Option<Held> {
        let msg = match self.divert_if_matching(hash, msg, publisher) {
            Diverted::No(msg) => msg,
            Diverted::Yes(held) => return held,
        };
        let ttl = u64::try_from(self.opts.unique_timeout.as_nanos()).unwrap_or(u64::MAX);
        let now = crate::sys::monotonic_ns();
        let Some(check) = self.path.dedup_check(hash, tag, now, ttl) else {
            self.recycle(msg);
            return None;
        };
        let shared = self.path.shm().map(|p| p.region());
        match check {
            Check::Duplicate => {
                match shared {
                    Some(r) => r.count_unique(true),
                    None => self.stats.unique_duplicates += 1,
                }
                self.recycle(msg);
                return None;
            }
            Check::Full => {
                match shared {
                    Some(r) => r.count_unique(false),
                    None => self.stats.unique_unrecorded += 1,
                }
                crate::log_limit::log_limited!(tracing::Level::WARN, hash = %String::from_utf8_lossy(hash), "unique table window full; delivering unrecorded");
            }
            Check::New => {}
        }
        self.place_unique(msg, None, now)
    }

    /// Deliver a unique event (recorded already) to one live worker other than `avoid`
    /// ([`Worker::pick_unique_target`]); on the socket transport to ourselves when that
    /// worker's queue is full. Returns where it waits to be handed off (socket transport).
    /// `now`: `CLOCK_MONOTONIC` nanoseconds (for the liveness check).
    pub(super) fn place_unique(&mut self, msg: AlignedVec, avoid: Option<u32>, now: u64) -> Option<Held> {
        let target = self.pick_unique_target(avoid, now);
        let sent = if target == self.slot { Sent::Full } else { self.path.send_to(target, &msg) };
        match sent {
            Sent::Written => {
                self.recycle(msg);
                None
            }
            Sent::Queued(ticket) => {
                self.recycle(msg);
                Some(Held::Slot { to: target, ticket })
            }
            Sent::Full => {
                // Ourselves, or (socket transport) the target's queue is full: run it here
                // rather than drop it after its hash was recorded.
                self.local.push_back(msg);
                let ticket = self.handoffs.local_done + self.local.len() as u64;
                self.path.socket().map(|_| Held::Local { ticket })
            }
        }
    }

    /// A unique event matching the agent's patterns: stamped with its hash and handed to the
    /// agent ([`Diverted::Yes`], with where it waits to be handed off), or, the agent not
    /// being attached, counted and given back to be routed here. Not diverted: the agent's
    /// own events, relayed events (flags already set) and events matching no pattern.
    fn divert_if_matching(&mut self, hash: &[u8], msg: AlignedVec, publisher: u32) -> Diverted {
        if self.divert.is_empty() || !self.geo.agent {
            return Diverted::No(msg);
        }
        let agent = self.geo.workers;
        if publisher == agent || message::flags(&msg) != 0 {
            return Diverted::No(msg);
        }
        let (source, event) = message::names(&msg);
        let Ok(hash) = std::str::from_utf8(hash) else { return Diverted::No(msg) };
        if !self.divert.matches(source, event) {
            return Diverted::No(msg);
        }
        if !self.agent_attached() {
            self.stats.unique_not_diverted += 1;
            return Diverted::No(msg);
        }
        // Stamped in place (no copy); a stamp the agent's full queue refused is taken off.
        let mut msg = msg;
        message::set_ext(&mut msg, message::Ext::UniqueHash(hash));
        let held = if agent == self.slot {
            // The agent brokers the socket transport: its own callbacks get it.
            self.local.push_back(msg);
            let ticket = self.handoffs.local_done + self.local.len() as u64;
            self.path.socket().map(|_| Held::Local { ticket })
        } else {
            let sent = self.path.send_to(agent, &msg);
            if sent == Sent::Full {
                // (socket transport) The agent's queue is full: route it here rather than
                // lose it.
                message::take_ext(&mut msg);
                self.stats.unique_not_diverted += 1;
                return Diverted::No(msg);
            }
            self.recycle(msg);
            match sent {
                Sent::Queued(ticket) => Some(Held::Slot { to: agent, ticket }),
                _ => None,
            }
        };
        self.stats.unique_diverted += 1;
        Diverted::Yes(held)
    }

    /// (socket broker) A unique event diverted to the agent that the agent did not take
    /// (its connection gone, or stalled for [`super::handoff::HANDOFF_TIMEOUT`]): its hash
    /// stamp removed, it is routed on this host as usual (dedup included) and counted as
    /// not diverted, as when the agent is absent (availability first). Returns where it
    /// waits to be handed off.
    pub(super) fn undivert(&mut self, mut msg: AlignedVec) -> Option<Held> {
        let hash = message::take_ext(&mut msg);
        self.stats.unique_diverted = self.stats.unique_diverted.saturating_sub(1);
        self.stats.unique_not_diverted += 1;
        // As the agent's own event: never diverted again.
        self.route_unique(&hash, None, msg, self.geo.workers)
    }

    /// Is the agent attached: its slot lock held by a live process and, on shared memory,
    /// its slot marked attached (at most one `fcntl` per millisecond, as for a unique target).
    fn agent_attached(&self) -> bool {
        let agent = self.geo.workers;
        let Some(ctl) = self.ctl.as_ref() else { return false };
        let attached = self.path.shm().is_none_or(|p| p.region().slot_attached(agent));
        attached && (agent == self.slot || ctl.slot_alive_recent(agent, crate::sys::monotonic_ns()))
    }

    /// Next live worker slot other than ours (and `avoid`; never the privileged agent),
    /// round-robin from our own cursor;
    /// ourselves when nobody else is alive. On the socket transport a slot is live when it
    /// has a connection that it reads ([`Worker::takes_unique`]). (An event handed to another worker is in its ring at once; one
    /// kept for our own callbacks would die with us if we were killed before dispatching it,
    /// after its hash was recorded.) Live: on shared memory the slot says attached (one
    /// load, skipping never-attached and detached slots) and, for the one slot chosen, the
    /// kernel says another process holds its slot lock (one `fcntl`, its answer reused for up
    /// to a millisecond: [`Control::slot_alive_recent`](crate::control::Control::slot_alive_recent)).
    fn pick_unique_target(&mut self, avoid: Option<u32>, now: u64) -> u32 {
        let slots = self.geo.slots;
        let Some(ctl) = self.ctl.as_ref() else { return self.slot };
        let region = self.path.shm().map(|p| p.region());
        let rr = self.broker.next_unique_target;
        // The privileged agent is not a worker: never a unique event's target.
        let agent = self.geo.agent.then_some(self.geo.workers);
        for i in 0..slots {
            let s = (rr + i) % slots;
            if s != self.slot
                && Some(s) != avoid
                && Some(s) != agent
                && region.is_none_or(|r| r.slot_attached(s))
                && self.takes_unique(s)
                && ctl.slot_alive_recent(s, now)
            {
                self.broker.next_unique_target = (s + 1) % slots;
                return s;
            }
        }
        self.slot
    }

    /// (privileged agent) Divert unique events to this agent: from now on, a
    /// [`Target::Unique`](crate::event::Target::Unique) event that any other process of this
    /// host publishes with a `(source, event)` matching one of `patterns` is not routed here
    /// (no local delivery, no entry in the local dedup table): it goes to the agent, whose
    /// callbacks see it with [`Event::unique_hash`](crate::event::Event::unique_hash) =
    /// `Some(hash)`. A bridge claims the hash cluster-wide, then re-publishes the winner with
    /// an ordinary `Target::Unique(hash)` publish, which is never diverted (nor is anything
    /// the agent itself publishes, nor a relayed event).
    ///
    /// Each side of a pattern is exact, `"*"` (anything), or a prefix ending in `*`
    /// (`("cache", "refresh*")`); each side 1..=255 bytes, at most 256 patterns. A call
    /// replaces the previous list; an empty list stops diverting.
    ///
    /// How it applies (see ARCHITECTURE.md §R): the list goes to the broker, which pushes it
    /// to every attached worker and to each worker attaching later; a worker applies it from
    /// its next control-channel read (until then it routes matching events here, as before).
    /// On shared memory each publisher diverts its own events, through its ring to the agent
    /// (in publish order with its other events to the agent); on the socket transport the
    /// broker diverts the events it routes. The list is re-sent behind every HELLO of this
    /// agent (a new broker after a failover gets it), and it outlives the agent's
    /// connection: **while the agent is not attached, matching events are routed on this
    /// host as usual** (availability first; counted in `Stats::unique_not_diverted`), and
    /// diverted again once it is back. An agent's HELLO resets the list, so a new agent
    /// process diverts nothing until it calls this: call it right after
    /// [`Events::init_worker`](crate::worker::Events::init_worker) (events published in
    /// between are routed here).
    ///
    /// # Errors
    /// [`Error::InvalidWid`] when this worker is not the privileged agent,
    /// [`Error::InvalidOption`] for a pattern list out of bounds, [`Error::Forked`].
    ///
    /// ```
    /// # use worker_events::{Events, Options, Wid};
    /// let dir = std::env::temp_dir().join(format!("we-doc-divert-{}", std::process::id()));
    /// let events = Events::new(Options::new(dir.join("ev.sock")).workers(1).enable_privileged_agent(true)).unwrap();
    /// let mut w0 = events.init_worker(Wid::Worker(0)).unwrap();
    /// assert!(w0.divert_unique(&[("cache", "purge")]).is_err()); // workers may not
    /// let mut agent = events.init_worker(Wid::PrivilegedAgent).unwrap();
    /// agent.divert_unique(&[("cache", "purge"), ("cfg", "refresh*")]).unwrap();
    /// agent.subscribe("cache", "purge", |ev| println!("claim {} cluster-wide", ev.unique_hash().unwrap()));
    /// agent.divert_unique(&[]).unwrap(); // stop diverting
    /// # drop((w0, agent)); let _ = std::fs::remove_dir_all(dir);
    /// ```
    pub fn divert_unique(&mut self, patterns: &[(&str, &str)]) -> Result<()> {
        self.check_fork()?;
        if self.wid != Wid::PrivilegedAgent {
            return Err(Error::InvalidWid { wid: self.wid, reason: "only the privileged agent diverts unique events" });
        }
        let p = Patterns::new(patterns).map_err(|e| Error::InvalidOption(format!("divert_unique: {e}")))?;
        if let Some(ctl) = self.ctl.as_mut() {
            ctl.set_divert(p.clone());
        }
        self.divert = p;
        Ok(())
    }

    /// The unique counters of `stats()`: on shared memory the region-wide ones (every
    /// publisher records its own events in the shared table), added to our own.
    pub(super) fn unique_stats(&self, s: &mut crate::stats::Stats) {
        s.unique_pending = self.unique.len() as u64;
        s.unique_resent = self.unique.resent;
        if let Some(p) = self.path.shm() {
            let (dups, unrec) = p.region().unique_counters();
            s.unique_duplicates += dups;
            s.unique_unrecorded += unrec;
        }
    }
}
