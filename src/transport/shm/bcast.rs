//! The per-publisher topology (the default; `Options::broadcast_capacity`): each slot writes
//! every message once, into its own broadcast ring (`ring/mcast.rs`), which every other slot
//! reads through its own cursor. The per-pair rings stay, for receivers that fall behind.
//!
//! **Tracked and diverted receivers.** The publisher *tracks* each receiver that reads its
//! broadcast ring. It never laps one: when `floor` would pass a tracked receiver's
//! position, the publisher first copies the records that receiver has not read into its
//! pair ring (and, when that is full, its private backlog: the per-pair path with its
//! `max_queue_len` bound and its `lost` accounting), sets the `DIVERTED` bit of the pair
//! ring's `owed` word (one Release store, which also publishes what those copies owe if the
//! publisher dies), and only then raises `floor` (Release). From then on, every message for
//! that receiver is also copied into its pair ring. Each copy carries the message's
//! broadcast sequence number in a [`TAG_LEN`]-byte prefix.
//!
//! **A receiver** reads, for each publisher, its pair ring first, then (unless diverted) the
//! broadcast ring. Before reading the broadcast ring it loads the `DIVERTED` bit; a read
//! that finds itself lapped loads it again (the Release store of `floor` makes it visible).
//! Once diverted it reads the pair ring alone. A copy whose sequence number is below the
//! next one it expects was already read from the broadcast ring (the publisher copies from
//! the receiver's last *stored* cursor, which may lag what it read) and is dropped: no
//! duplicates, in order.
//!
//! **Resume.** When a diverted receiver has caught up (its backlog empty and at most
//! [`RESUME_DEPTH`] messages left in its pair ring), the publisher writes a **resume marker**
//! into the pair ring (the broadcast position and sequence number of its next message),
//! clears the bit, and tracks the receiver again from that position (its *guard*: the
//! receiver's stored cursor may be older until it reads the marker). The receiver, reading
//! the marker after every copy before it, moves its cursor there and reads the broadcast ring
//! again. If it is too slow even to reach the marker, the broadcast ring laps the guard and
//! the publisher diverts it again, copying from the guard: the copies follow the marker in
//! the pair ring, and the bit is set again before `floor` moves.
//!
//! **Messages too large for the broadcast ring** (over a quarter of it) divert every tracked
//! receiver (each gets what it has not read) and go to each through its pair ring; a
//! zero-length placeholder in the broadcast ring takes their sequence number, so the
//! numbering stays one sequence per publisher.
//!
//! **Crashes.** A publisher's tracking state is in shared memory (the bit), so its successor
//! in the slot resumes it (`Producer::set_tracking`). A receiver's position is its cursor
//! (stored before each delivery) and its pair ring's. What a dead publisher's backlog owed is
//! reported as today (`ring/owed.rs`); a publisher killed between storing the bit and
//! raising `floor` may have copied, and so report as lost, records the receiver also read
//! from the broadcast ring (over-reported, never silent).

use super::*;
use crate::ring::mcast::{self, Read, Unread};

/// Bytes before a message in a pair ring of a region with broadcast rings: its broadcast
/// sequence number (or [`RESUME`], [`UNSEQ`]) and 8 reserved bytes, which keep the message
/// 16-aligned for validated access.
pub(super) const TAG_LEN: usize = 16;
/// Tag of a resume marker; its body is `pos u64, seq u64`.
const RESUME: u64 = u64::MAX;
/// Tag of a message without a broadcast sequence number (its publisher's broadcast ring is
/// unusable): delivered without the duplicate check.
const UNSEQ: u64 = u64::MAX - 1;
/// A diverted receiver is resumed once its backlog is empty and at most this many messages
/// wait in its pair ring.
const RESUME_DEPTH: u64 = 8;

/// Which receivers a broadcast record written since the last wake is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Wake {
    None,
    All,
    One(u32),
}

impl Wake {
    fn add(self, to: Option<u32>) -> Wake {
        match (self, to) {
            (Wake::None, None) => Wake::All,
            (Wake::None, Some(r)) => Wake::One(r),
            (Wake::One(a), Some(b)) if a == b => Wake::One(a),
            _ => Wake::All,
        }
    }
}

/// The publisher's end of its broadcast ring.
pub(super) struct BcastOut {
    pub(super) prod: mcast::Producer,
    /// Receivers to look at for a wake-up after the next commit.
    pub(super) wake: Wake,
    /// How many receivers are diverted (the publish path skips its walk over them at 0).
    diverted: usize,
    /// The tagged copy of the message being sent (built once per message, reused: a
    /// diverted receiver's copy costs no allocation unless its backlog must keep it).
    tagbuf: AlignedVec,
}

impl BcastOut {
    /// Our broadcast ring, tracking every peer whose pair ring's bit says it is not
    /// diverted. If the ring is unusable, every peer is diverted (and `None`).
    pub(super) fn attach(region: &Region, me: u32, out: &mut [Option<Outbound>]) -> Option<BcastOut> {
        match mcast::Producer::new(region.bcast(me)) {
            Ok(mut prod) => {
                let tracked: Vec<bool> = out.iter().map(|o| o.as_ref().is_some_and(|o| !o.diverted)).collect();
                prod.set_tracking(&tracked);
                let diverted = out.iter().flatten().filter(|o| o.diverted).count();
                Some(BcastOut { prod, wake: Wake::None, diverted, tagbuf: AlignedVec::new() })
            }
            Err(_) => {
                tracing::warn!(me, "our broadcast ring is corrupt: every receiver is served through its pair ring");
                for o in out.iter_mut().flatten() {
                    o.diverted = true;
                }
                None
            }
        }
    }
}

/// A message with its tag, as a pair ring of a region with broadcast rings carries it.
fn tagged(tag: u64, body: &[u8]) -> AlignedVec {
    let mut v = AlignedVec::with_capacity(TAG_LEN + body.len());
    fill_tagged(&mut v, tag, body);
    v
}

/// [`tagged`] into a buffer that is reused.
fn fill_tagged(v: &mut AlignedVec, tag: u64, body: &[u8]) {
    v.clear();
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(body);
}

/// Divert receiver `r`: queue (ring, else backlog) copies of what it has not read, then set
/// the bit (with what the backlog owes) in one Release store, before the caller raises
/// `floor`.
#[allow(clippy::too_many_arguments)]
fn divert(
    o: &mut Outbound,
    r: usize,
    unread: &Unread<'_>,
    tagbuf: &mut AlignedVec,
    max_queue_len: usize,
    backlogged: &mut usize,
    counters: &mut PortCounters,
    incarnation: u32,
) {
    o.diverted = true;
    unread.for_each(|seq, dest, body| {
        if !body.is_empty() && (dest == 0 || dest as usize == r + 1) {
            fill_tagged(tagbuf, seq, body);
            offer(o, tagbuf, &mut None, max_queue_len, backlogged, counters);
        }
    });
    o.publish_owed(incarnation);
    counters.diverts += 1;
}

impl ShmPort {
    /// [`ShmPort::send_all`] (`to` = None) and [`ShmPort::send_to`] on a region with
    /// broadcast rings (module docs). Not inlined: the per-pair path that calls it stays as
    /// lean as without it.
    #[inline(never)]
    pub(super) fn send_bcast(&mut self, msg: &AlignedVec, to: Option<u32>) {
        let ShmPort { bc, out, max_queue_len, backlogged, counters, incarnation, defer, pending, pair_touched, .. } =
            self;
        let (max_queue_len, incarnation) = (*max_queue_len, *incarnation);
        let before = *backlogged;
        // Anything written (to commit), and anything written to a pair ring.
        let mut any = false;
        let mut pair = false;
        let Some(b) = bc.as_mut() else {
            // No usable broadcast ring: every receiver is diverted; no sequence numbers.
            let t = tagged(UNSEQ, msg);
            let mut shared = None;
            for (r, o) in out.iter_mut().enumerate() {
                let Some(o) = o else { continue };
                if to.is_none_or(|t| t as usize == r) {
                    any |= offer(o, &t, &mut shared, max_queue_len, backlogged, counters);
                    o.publish_owed(incarnation);
                }
            }
            if any {
                *pair_touched = true;
                self.commit_and_wake();
            }
            return;
        };
        let BcastOut { prod, wake, diverted, tagbuf } = b;
        prod.set_defer(*defer);
        let fits = msg.len() <= prod.max_body();
        if !fits {
            prod.divert_all(|r, unread| {
                if let Some(o) = out[r].as_mut() {
                    divert(o, r, unread, tagbuf, max_queue_len, backlogged, counters, incarnation);
                    *diverted += 1;
                    pair = true;
                }
            });
        }
        let seq = prod.published();
        // Whether `tagbuf` holds this message's tagged copy.
        let mut t = false;
        let mut shared = None;
        for (r, o) in out.iter_mut().enumerate() {
            if *diverted == 0 {
                break;
            }
            let Some(o) = o else { continue };
            if !o.diverted {
                continue;
            }
            if fits && o.backlog.is_empty() && o.prod.as_ref().is_some_and(|p| p.depth() <= RESUME_DEPTH) {
                // Caught up: tell it where to continue in the broadcast ring (this message).
                let pos = prod.write_pos();
                let mut marker = tagged(RESUME, &pos.to_le_bytes());
                marker.extend_from_slice(&seq.to_le_bytes());
                pair |= offer(o, &marker, &mut None, max_queue_len, backlogged, counters);
                o.diverted = false;
                o.publish_owed(incarnation);
                prod.track(r, pos);
                *diverted -= 1;
                counters.resumes += 1;
                continue;
            }
            if to.is_none_or(|t| t as usize == r) {
                if !std::mem::replace(&mut t, true) {
                    fill_tagged(tagbuf, seq, msg);
                }
                pair |= offer(o, tagbuf, &mut shared, max_queue_len, backlogged, counters);
                o.publish_owed(incarnation);
            }
        }
        let body: &[u8] = if fits { msg } else { &[] };
        let dest = to.map_or(0, |r| r + 1);
        let mut newly = Vec::new();
        let published = prod.publish_to(body, dest, |r, unread| {
            if let Some(o) = out[r].as_mut() {
                divert(o, r, unread, tagbuf, max_queue_len, backlogged, counters, incarnation);
                newly.push(r);
                pair = true;
            }
        });
        debug_assert!(published.is_ok(), "a body within max_body, or empty");
        *diverted += newly.len();
        if !newly.is_empty() {
            // `divert` reused the buffer.
            t = false;
        }
        // Diverted by this very record: it was not among their unread ones yet.
        for r in newly {
            if to.is_none_or(|t| t as usize == r) {
                if let Some(o) = out[r].as_mut() {
                    if !std::mem::replace(&mut t, true) {
                        fill_tagged(tagbuf, seq, msg);
                    }
                    pair |= offer(o, tagbuf, &mut shared, max_queue_len, backlogged, counters);
                    o.publish_owed(incarnation);
                }
            }
        }
        if fits {
            *wake = wake.add(to);
            any = true;
        }
        *pair_touched |= pair;
        any |= pair;
        if any {
            if *defer && *backlogged == before {
                // A batch's publish: the batch's end commits (the broadcast records held by
                // `set_defer`, the pair-ring records) and wakes, once.
                *pending = true;
                return;
            }
            self.commit_and_wake();
        }
    }
}

impl ShmPort {
    /// [`ShmPort::commit_and_wake`] on a region with broadcast rings: commit the broadcast
    /// records a batch held, then the pair rings, fence and wake as the per-pair path does,
    /// also looking at the receivers the broadcast records are for.
    #[inline(never)]
    pub(super) fn commit_and_wake_bcast(&mut self) {
        let (committed, bwake) = match self.bc.as_mut() {
            Some(b) => {
                b.prod.commit();
                (b.wake != Wake::None, std::mem::replace(&mut b.wake, Wake::None))
            }
            None => (false, Wake::None),
        };
        if std::mem::take(&mut self.pair_touched) {
            return self.commit_and_wake_with(committed, bwake);
        }
        // Only the broadcast ring was written (the usual case): no walk over the pair rings,
        // and a look at the `parked` flag of each reader it tracks (the others are diverted:
        // whatever is for them went to their pair ring, which sets `pair_touched`).
        self.pending = false;
        let ShmPort { bc, region, eventfds, counters, .. } = self;
        let Some(b) = bc.as_ref().filter(|_| committed) else { return };
        notify::after_commit();
        let mut claims = Claims::default();
        match bwake {
            Wake::None => {}
            Wake::One(r) => {
                if b.prod.is_tracked(r as usize) {
                    claims.claim_if_parked(region, r);
                }
            }
            Wake::All => {
                for c in b.prod.tracked() {
                    claims.claim_if_parked(region, c as u32);
                }
            }
        }
        claims.write(eventfds, counters);
    }
}

/// What the pair-ring drain does after a message of a region with broadcast rings.
pub(super) enum Flow {
    Next,
    /// A resume marker: the rest of the pair ring waits for the next pass (the broadcast
    /// ring comes first now).
    Resumed,
}

/// Our end of one peer's broadcast ring.
pub(super) struct BcastIn {
    /// None: our cursor in it was unusable at attach; we never read it, and the publisher
    /// diverts us when it laps us.
    cons: Option<mcast::Consumer>,
    /// The pair ring `from -> me`, whose `owed` word carries the bit.
    raw: ring::RawRing,
    /// Diverted: read the pair ring alone.
    pub(super) diverted: bool,
    /// The publisher's sequence number expected next (copies below it are duplicates).
    next_seq: u64,
    buf: AlignedVec,
    /// Found corrupt at our position: the stamp word seen there. Until it changes (the
    /// publisher writes again), the ring is not read and does not count as work, so a
    /// receiver never spins on what a broken or hostile publisher left (reported once).
    stuck: Option<u64>,
}

impl BcastIn {
    pub(super) fn attach(region: &Region, from: u32, me: u32, counters: &mut PortCounters) -> BcastIn {
        let raw = region.ring(from, me);
        let ring = region.bcast(from);
        let cons = match mcast::Consumer::new(ring, me as usize) {
            Ok(c) => Ok(c),
            Err(_) => {
                // Resume from the oldest intact record (what lay between is reported as a
                // corrupt ring, not counted: the cursor that would tell is gone).
                tracing::warn!(from, me, "our cursor in a broadcast ring was corrupt: moved to its oldest record");
                counters.corrupt_rings += 1;
                mcast::Consumer::repaired(ring, me as usize)
            }
        };
        let cons = match cons {
            Ok(mut c) => {
                c.set_stop_on_lap();
                Some(c)
            }
            Err(_) => {
                tracing::warn!(from, me, "a broadcast ring is corrupt: served through the pair ring");
                counters.corrupt_rings += 1;
                None
            }
        };
        let next_seq = cons.as_ref().map_or(0, |c| c.next_seq());
        BcastIn { diverted: raw.diverted() || cons.is_none(), cons, raw, next_seq, buf: AlignedVec::new(), stuck: None }
    }

    /// Whether the broadcast ring has a record at our position (we read it: not diverted).
    pub(super) fn has_data(&self) -> bool {
        !self.diverted
            && self.cons.as_ref().is_some_and(|c| c.has_data() && self.stuck.is_none_or(|v| c.stamp_word() != v))
    }

    /// A message from the pair ring (`bytes`: tag, then the message): deliver it unless it
    /// is a duplicate; follow a resume marker.
    pub(super) fn deliver_pair<D: Deliver>(
        &mut self,
        sink: &mut D,
        c: super::receive::Checks,
        from: u32,
        bytes: &[u8],
    ) -> Flow {
        let Some(tag) = bytes.get(..8).map(|t| u64::from_le_bytes(t.try_into().expect("8 bytes"))) else {
            super::receive::malformed(sink, from);
            return Flow::Next;
        };
        let body = &bytes[TAG_LEN.min(bytes.len())..];
        match tag {
            RESUME => {
                let word = |i: usize| body.get(i * 8..i * 8 + 8).map(|w| u64::from_le_bytes(w.try_into().expect("8")));
                let (Some(pos), Some(seq)) = (word(0), word(1)) else {
                    super::receive::malformed(sink, from);
                    return Flow::Next;
                };
                let Some(cons) = self.cons.as_mut() else {
                    super::receive::malformed(sink, from);
                    return Flow::Next;
                };
                // Every record below `pos` came to us as a copy before this marker. If we
                // never noticed the divert (it ended before our next look at the bit), we
                // may have read past `pos` already; then we stay where we are.
                if cons.position() < pos && cons.seek(pos, seq).is_err() {
                    super::receive::malformed(sink, from);
                    return Flow::Next;
                }
                self.diverted = false;
                self.next_seq = self.next_seq.max(seq);
                Flow::Resumed
            }
            UNSEQ => {
                super::receive::deliver_message(sink, c, from, body);
                Flow::Next
            }
            seq => {
                if seq < self.next_seq {
                    // Read from the broadcast ring before we were diverted.
                    return Flow::Next;
                }
                self.next_seq = seq.saturating_add(1);
                super::receive::deliver_message(sink, c, from, body);
                Flow::Next
            }
        }
    }

    /// Read up to `budget` records of the broadcast ring, unless diverted (the bit, a lap or
    /// a placeholder says so; only a resume marker ends it). Called only once every earlier
    /// message of the pair ring was taken (it may hold copies that come before). Returns
    /// (messages delivered, more pending).
    pub(super) fn drain<D: Deliver>(
        &mut self,
        sink: &mut D,
        c: super::receive::Checks,
        from: u32,
        budget: usize,
        counters: &mut PortCounters,
    ) -> (usize, bool) {
        if !self.diverted && self.raw.diverted() {
            self.diverted = true;
        }
        let Some(cons) = self.cons.as_mut().filter(|_| !self.diverted) else { return (0, false) };
        if let Some(v) = self.stuck {
            if cons.stamp_word() == v {
                return (0, false);
            }
            self.stuck = None;
        }
        let mut n = 0;
        for _ in 0..budget {
            match cons.read(&mut self.buf) {
                Ok(Read::Record(_)) if self.buf.is_empty() => {
                    // A placeholder: the message comes through the pair ring (it did not fit
                    // here), and every receiver was diverted before it was written.
                    cons.release();
                    self.diverted = true;
                    return (n, false);
                }
                Ok(Read::Record(seq)) => {
                    // Consumed before the callbacks run: a successor never sees it again.
                    cons.release();
                    if seq >= self.next_seq {
                        self.next_seq = seq + 1;
                        n += 1;
                        super::receive::deliver_message(sink, c, from, &self.buf);
                    }
                }
                Ok(Read::Skipped(seq)) => self.next_seq = self.next_seq.max(seq + 1),
                Ok(Read::Empty) => {
                    cons.release();
                    return (n, false);
                }
                Ok(Read::Lapped) => {
                    // The publisher diverted us before lapping us (and may have resumed us
                    // since: the marker is in the pair ring, read next).
                    cons.release();
                    self.diverted = true;
                    return (n, false);
                }
                Err(_) => {
                    tracing::warn!(from, "corrupt broadcast ring: not read until its publisher writes again");
                    counters.corrupt_rings += 1;
                    self.stuck = Some(cons.stamp_word());
                    return (n, false);
                }
            }
        }
        cons.release();
        (n, true)
    }
}
