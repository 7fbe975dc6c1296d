//! Delivery acknowledgements of the socket transport: what a killed receiver never
//! dispatched is reported lost to its successor.
//!
//! A receiver counts the data frames (`DELIVER`, `LOST`) it has dispatched from its broker
//! connection ([`AckCount`]) and queues an `ACK` frame with that running total just before it
//! writes its sockets at the end of a dispatch pass, when it owes one and: the pass delivered
//! nothing (it is going idle: a `wait` acknowledges everything before it sleeps), or it has
//! data to send anyway (the events its callbacks published: both go out in one `send`), or
//! [`ACK_EVERY`] frames are owed at the end of the pass (one pass may dispatch more). So a
//! ping-pong costs no write more than without acknowledgements, and a receiver in a steady
//! stream writes at most one `ACK` per pass, once 64 frames are owed. The broker
//! records what it completely wrote into each receiver's socket as runs `(origin, count)`
//! (`wire/unacked.rs`; [`classify`] says what a frame counts for) and pops them at each
//! `ACK`. When the receiver's connection ends, what it never acknowledged
//! ([`settle_unacked`], when the slot's next connection first writes, or when the slot's
//! queue expires) becomes `LOST` notices by publisher, put ahead of whatever is still
//! queued for the slot, so its next holder hears of them first (a receiver that has seen
//! nothing of a publisher yet takes the notice as it is: its first event of that publisher
//! starts the sequence count, no gap credit lingers).
//!
//! The count can be too high, never too low: the frames a receiver dispatched after the last
//! `ACK` it wrote ran, but were never acknowledged: fewer than [`ACK_EVERY`] more than the
//! pass during which it died (none when it died idle, in `wait` or between a dispatch that
//! found nothing and the next). A worker that reconnects to
//! the same broker (same process id) is not sent notices: what it never read on the old
//! connection shows as gaps in the publishers' sequences, exactly, and the frames it read
//! there it dispatches. A clean close acknowledges everything it dispatched first (the `ACK` is
//! written before the connection closes), so only frames it never dispatched (still in its
//! socket or read while closing) are reported.
//!
//! Unique events are not reported but routed again: the broker keeps a copy of each
//! unique event it wrote into a receiver's socket until the receiver acknowledges it
//! (bounded per connection: `wire/unacked.rs`, [`keep_bytes`]), and as soon as it sees the
//! connection gone (at its next poll, or when the slot's next connection is welcomed or
//! written to; a reconnecting worker included) the copies not acknowledged become orphans
//! ([`SocketPort::take_orphans`]),
//! which the worker routes to another live worker (`worker/handoff.rs`). One that the
//! receiver dispatched after its last acknowledgement, which never left, runs twice:
//! at-least-once across a receiver crash (ARCHITECTURE.md §G3).

use super::SocketPort;
use super::seq::{STAMP_LEN, UNSEQUENCED};
use crate::wire::frame::kind;
use crate::wire::queue::OutQueue;
use crate::wire::unacked::Tag;
pub(super) use crate::wire::unacked::keep_bytes;
use crate::wire::{Link, Peer};

/// What a frame the broker wrote to a receiver counts for if it is never dispatched: an
/// "all" event 1 event of its publisher, a `LOST` notice its count, a unique event nothing
/// (lost notices count "all" events only; see `drop_queue`) but its message is kept, to be
/// routed again.
pub(super) fn classify(k: u8, body: &[u8]) -> (Tag, Option<&[u8]>) {
    const NOTHING: Tag = Tag::NOTHING;
    let tag = match k {
        kind::DELIVER if body.starts_with(&UNSEQUENCED) => return (NOTHING, body.get(STAMP_LEN..)),
        kind::DELIVER => match body.get(STAMP_LEN..).and_then(crate::message::origin_of) {
            Some(origin) => Tag { origin, each: 1 },
            None => NOTHING,
        },
        kind::LOST => match super::lost_body(body) {
            Some((origin, each)) => Tag { origin, each },
            None => NOTHING,
        },
        _ => NOTHING,
    };
    (tag, None)
}

impl SocketPort {
    /// (broker) Slot `link` welcomed a connection of process `pid`: settle what its previous
    /// connection was sent and never acknowledged.
    pub(super) fn welcome_settle(&mut self, link: Link, pid: i32) {
        let Peer::Slot(s) = link.peer else { return };
        let (Some(q), Some(d)) = (self.slot_out.get_mut(s as usize), self.dests.get_mut(s as usize)) else {
            return;
        };
        if q.conn() != link.conn {
            if pid > 0 && d.pid == pid {
                // The same process again (it reconnected): what it never read on its old
                // connection shows as gaps in the publishers' sequences, exactly, while a
                // notice would count what it dispatched without acknowledging, and its
                // credit could hide a later gap.
                q.take_unacked();
            } else {
                // Another process: settle the old connection now, while `d.pid` still names
                // its holder (a connection of the new one that ends before anything is
                // written to it must not pass for "the same process" later).
                self.counters.lost_outbound += settle_unacked(q);
            }
        }
        d.pid = pid;
        // Unique events it never acknowledged there are routed again all the same (they
        // may have been read and not dispatched yet: at-least-once).
        self.orphans_due |= q.has_orphans();
    }

    /// (client) Just before the sockets are written at the end of a dispatch pass: queue the
    /// `ACK` owed, if it is due ([`AckCount::take_due`]: the pass dispatched nothing from the
    /// broker, or data is queued for it anyway, or [`ACK_EVERY`] frames are owed).
    pub(crate) fn queue_ack(&mut self) {
        let now = !std::mem::take(&mut self.pass_acked) || self.client_out.pending_bytes() > 0;
        self.ack_now(now);
    }

    /// (client) Queue the `ACK` owed now if `now`, else only once [`ACK_EVERY`] frames are
    /// owed.
    pub(crate) fn ack_now(&mut self, now: bool) {
        if let Some(total) = self.acks.take_due(now) {
            self.client_out.push_ack(total);
        }
    }

    /// (broker) Unique events written to a worker whose connection then ended without
    /// acknowledging them, with the slot they were written to: to be routed again.
    pub(crate) fn take_orphans(&mut self) -> Vec<(u32, Box<[u8]>)> {
        if !std::mem::take(&mut self.orphans_due) {
            return Vec::new();
        }
        let mut v = Vec::new();
        for (t, q) in self.slot_out.iter_mut().enumerate() {
            v.extend(q.take_orphans().into_iter().map(|m| (t as u32, m)));
        }
        v
    }

    /// (broker) [`SocketPort::take_orphans`] may have something.
    pub(crate) fn has_orphans(&self) -> bool {
        self.orphans_due
    }

    /// Unique-event copies the broker dropped past their bounds (`wire/unacked.rs`).
    pub(crate) fn unguarded(&self) -> u64 {
        self.slot_out.iter().map(OutQueue::unguarded).sum()
    }
}

/// (broker) The connection `q` wrote to is gone: what it wrote and was never acknowledged
/// becomes `LOST` notices (one per publisher) at the front of the queue, ahead of what
/// waits there. Returns the events reported (they count as dropped for that destination).
pub(super) fn settle_unacked(q: &mut OutQueue) -> u64 {
    let (owed, frames) = q.take_unacked();
    if frames == 0 {
        return 0;
    }
    // Nothing more is written on the old connection: a frame it took in part goes whole
    // to the next one, behind the notices.
    q.rewind();
    let mut events = 0u64;
    for (origin, count) in owed.into_iter().rev() {
        events = events.saturating_add(count);
        q.push_front(kind::LOST, &[&origin.to_le_bytes(), &count.to_le_bytes()]);
    }
    tracing::debug!(frames, events, "a worker's connection ended with events it never acknowledged");
    events
}

/// A receiver queues an `ACK` once this many frames are dispatched and not yet acknowledged,
/// even when it has nothing else to send and keeps finding frames.
pub(super) const ACK_EVERY: u64 = 64;

/// (client) Data frames dispatched from the current broker connection.
#[derive(Debug, Default)]
pub(super) struct AckCount {
    /// The low 32 bits of the connection's id (0: none yet; ids start at 1).
    conn: u64,
    /// Frames of it dispatched.
    total: u64,
    /// The total last queued in an `ACK` on it.
    queued: u64,
}

impl AckCount {
    /// A frame from the broker that came on connection `conn` (the inbox's low 32 bits)
    /// was dispatched: count it if it is of the current connection (a newer one starts a new
    /// count; a frame of an older one is not that broker's to hear of). True when counted.
    pub(super) fn count(&mut self, conn: u64) -> bool {
        if conn == self.conn {
            self.total = self.total.saturating_add(1);
        } else if conn > self.conn {
            (self.conn, self.total, self.queued) = (conn, 1, 0);
        } else {
            return false;
        }
        true
    }

    /// The total to acknowledge on connection `conn` (full id), if any.
    pub(super) fn total_for(&self, conn: u64) -> Option<u64> {
        (self.total > 0 && u64::from(conn as u32) == self.conn).then_some(self.total)
    }

    /// The total to queue in an `ACK` now, if any is owed: when `now` (the worker goes idle,
    /// or writes data anyway), or once [`ACK_EVERY`] frames are owed. It is then taken as
    /// queued.
    pub(super) fn take_due(&mut self, now: bool) -> Option<u64> {
        let owed = self.total - self.queued;
        if owed == 0 || !(now || owed >= ACK_EVERY) {
            return None;
        }
        self.queued = self.total;
        Some(self.total)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn an_ack_is_due_when_idle_when_writing_anyway_or_every_64_frames() {
        let mut a = AckCount::default();
        assert_eq!(a.take_due(true), None, "nothing dispatched, nothing owed");
        for _ in 0..10 {
            a.count(1);
        }
        assert_eq!(a.take_due(false), None, "10 frames owed, busy, nothing else to write: not yet");
        assert_eq!(a.take_due(true), Some(10), "going idle (or writing anyway): now");
        assert_eq!(a.take_due(true), None, "queued already");
        for _ in 0..ACK_EVERY {
            a.count(1);
        }
        assert_eq!(a.take_due(false), Some(10 + ACK_EVERY), "64 frames owed: even while busy");
        a.count(2);
        assert_eq!(a.take_due(true), Some(1), "a new connection counts from 0");
    }

    #[test]
    fn counts_per_connection() {
        let mut a = AckCount::default();
        assert!(a.count(1) && a.count(1));
        assert_eq!(a.total_for(1), Some(2));
        assert!(a.count(3), "a newer connection starts over");
        assert!(!a.count(1), "a frame of an older connection is not counted");
        assert_eq!((a.total_for(3), a.total_for(1)), (Some(1), None));
        assert_eq!(a.total_for(3 + (1 << 32)), Some(1), "the inbox keeps the low 32 bits");
    }

    #[test]
    fn unacknowledged_frames_become_notices_ahead_of_the_queue() {
        let mut q = OutQueue::new(usize::MAX, 1 << 20).track_acks(classify, 1 << 20);
        let msg = |origin: u32| {
            let mut m = vec![0u8; 16];
            m[8..12].copy_from_slice(&origin.to_le_bytes());
            m
        };
        let stamp = [1u8; STAMP_LEN];
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let t0 = q.ticket();
        for origin in [1, 1, 2] {
            assert!(q.push(kind::DELIVER, &[&stamp, &msg(origin)]));
        }
        assert!(q.push(kind::DELIVER, &[&UNSEQUENCED, &msg(1)]));
        assert!(q.push(kind::LOST, &[&2u32.to_le_bytes(), &5u64.to_le_bytes()]));
        let written = q.on_conn(1);
        written.write(std::os::fd::AsFd::as_fd(&a)).unwrap();
        assert_eq!(q.done(), t0 + 5);
        assert!(q.ack(1));
        // One more event waits, unwritten, when the connection dies.
        assert!(q.push(kind::DELIVER, &[&stamp, &msg(2)]));
        assert_eq!(settle_unacked(&mut q), 1 + 1 + 5);
        assert_eq!(q.len(), 3, "two notices, then the event that waited");
        let mut frames = Vec::new();
        q.drain_frames(|k, body| frames.push((k, body.to_vec())));
        let notice = |o: u32, c: u64| [o.to_le_bytes().as_slice(), &c.to_le_bytes()].concat();
        assert_eq!(frames[0], (kind::LOST, notice(1, 1)));
        assert_eq!(frames[1], (kind::LOST, notice(2, 6)));
        assert_eq!(frames[2].0, kind::DELIVER);
        assert_eq!(settle_unacked(&mut q), 0, "nothing twice");
        drop(b);
    }

    #[test]
    fn unique_events_are_kept_without_their_stamp_until_acknowledged() {
        let mut q = OutQueue::new(usize::MAX, 1 << 20).track_acks(classify, 1 << 20);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let stamp = [1u8; STAMP_LEN];
        assert!(q.push(kind::DELIVER, &[&UNSEQUENCED, b"unique-1"]));
        assert!(q.push(kind::DELIVER, &[&stamp, &[0u8; 16]]));
        assert!(q.push(kind::DELIVER, &[&UNSEQUENCED, b"unique-2"]));
        assert!(q.push(kind::LOST, &[&2u32.to_le_bytes(), &5u64.to_le_bytes()]));
        q.on_conn(1).write(std::os::fd::AsFd::as_fd(&a)).unwrap();
        assert!(q.push(kind::DELIVER, &[&UNSEQUENCED, b"never-written"]));
        assert!(q.ack(1), "unique-1 dispatched");
        assert_eq!(classify(kind::DELIVER, &[&UNSEQUENCED[..], b"m"].concat()), (Tag::NOTHING, Some(&b"m"[..])));
        assert_eq!(settle_unacked(&mut q), 1 + 5, "the event and the notice: unique events owe none");
        assert!(q.has_orphans());
        let kept: Vec<Vec<u8>> = q.take_orphans().into_iter().map(Vec::from).collect();
        assert_eq!(kept, vec![b"unique-2".to_vec()], "the one written and never acknowledged");
        assert!(q.take_orphans().is_empty() && !q.end_kept());
        assert_eq!(q.len(), 3, "two notices, then the frame never written (rerouted by the hand-off)");
        drop(b);
    }

    #[test]
    fn notices_inserted_in_front_keep_tickets() {
        let mut q = OutQueue::new(usize::MAX, 1 << 20).track_acks(classify, 1 << 20);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        assert!(q.push(kind::DELIVER, &[&UNSEQUENCED, &[0u8; 16]]));
        let ticket = q.ticket();
        assert!(q.push_front(kind::LOST, &[&1u32.to_le_bytes(), &3u64.to_le_bytes()]));
        assert!(q.done() < ticket);
        q.on_conn(1).write(std::os::fd::AsFd::as_fd(&a)).unwrap();
        assert_eq!(q.done(), ticket, "the unique event's ticket is reached once it is written, not before");
        assert_eq!(q.take_unacked(), (vec![(1, 3)], 2));
        drop(b);
    }
}
