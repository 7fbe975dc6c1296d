//! Bounded frame queues for the socket transport: events ride the unix-socket control
//! connections, through the broker.
//!
//! A worker appends each "all" event as an `EVENT` frame to its [`OutQueue`]; the broker
//! delivers it to its own callbacks and appends a `DELIVER` frame to the queue of every other
//! slot, attached or not yet. Queues are bounded in frames and in bytes (the publisher's own
//! by `max_queue_len` frames and 64 MiB, a destination's at the broker in bytes; see
//! `transport/socket`): a publisher whose own queue is full gets `QueueOverflow`; a
//! destination queue that is full at the broker drops the event for that destination and
//! owes it a `LOST` frame (publisher, count), sent ahead of the next event once there is
//! room again.
//!
//! Writes are coalesced: frames accumulate in one buffer and go out in as few `send` calls as
//! the socket takes (at `dispatch`, `wait`, `flush`, or once [`COALESCE_BYTES`] are queued).
//! Reads are buffered by the frame reader, which resumes in the middle of a frame.
//!
//! A queue outlives the connection it writes to. When a connection breaks, the frame the
//! kernel took only part of is rewound and sent whole on the next connection; frames the
//! kernel took completely are never sent again (at most once per connection, never twice).
//!
//! Acknowledgements (socket transport): a receiver's queue for the broker carries, among the
//! events, `ACK` frames ([`OutQueue::push_ack`]; left out of the frame count, counted in the
//! byte bound; one at the tail rewritten in place), so an acknowledgement goes out in the
//! same `send` as the events queued with it. At the broker, a destination's queue made with
//! [`OutQueue::track_acks`] records every frame it completely writes in an [`Unacked`] FIFO,
//! which the receiver's acknowledgements pop (`wire/unacked.rs`).

use std::io;
use std::os::fd::BorrowedFd;

use rkyv::util::AlignedVec;

use super::frame::{FrameWriter, kind};
use super::unacked::{Tag, Unacked};
use super::{Link, Peer};
use crate::sys;

/// Queued bytes past which `publish` writes at once instead of waiting for `dispatch`.
pub(crate) const COALESCE_BYTES: usize = 64 * 1024;

/// Frames of one direction of one connection (or of one destination slot at the broker),
/// bounded in frames and in bytes: a push is refused once either bound is reached, so a
/// queue holds at most `cap_bytes` plus one frame. Invariant: `frame_head <= head <=
/// buf.len()`, `frame_head` is the start of a frame, and `buf[frame_head..]` is a sequence
/// of whole frames.
#[derive(Debug)]
pub(crate) struct OutQueue {
    buf: Vec<u8>,
    /// Bytes written on the current connection.
    head: usize,
    /// Start of the first frame not completely written.
    frame_head: usize,
    /// Frames in `buf[frame_head..]`.
    frames: usize,
    cap: usize,
    /// Bound of `buf[frame_head..]` in bytes.
    cap_bytes: usize,
    /// Bytes the kernel took from this queue, ever (progress of its reader).
    written: u64,
    /// Frames the kernel took completely, ever: the frame pushed when
    /// `done + frames` was `t` is written once `done >= t` ([`OutQueue::ticket`]).
    done: u64,
    /// Events dropped for this destination, by publisher slot: a notice is owed.
    lost: Vec<LostCount>,
    /// Id of the connection `head` counts bytes of (0: none yet).
    conn: u64,
    /// `ACK` frames in `buf[frame_head..]` (outside the bounds and [`OutQueue::len`]).
    acks: u32,
    /// Offset of an `ACK` frame at the tail not written at all: the next one rewrites it
    /// ([`NO_ACK`]: none).
    tail_ack: usize,
    /// Frames inserted at the front ([`OutQueue::push_front`]) and not yet written: they
    /// do not move [`OutQueue::done`], so tickets stay valid.
    front: u32,
    /// (broker) The frames written and not acknowledged, and how a frame counts there.
    track: Option<Box<(Unacked, Classify)>>,
}

/// `OutQueue::tail_ack` when there is no such frame.
const NO_ACK: usize = usize::MAX;

/// What a completely written frame counts for if it is never acknowledged, and the part of
/// its body to keep until it is (a unique event's message), if any.
pub(crate) type Classify = fn(kind: u8, body: &[u8]) -> (Tag, Option<&[u8]>);

/// Events of one publisher dropped for a destination.
#[derive(Debug, Clone, Copy)]
struct LostCount {
    origin: u32,
    count: u64,
}

impl OutQueue {
    /// A queue of at most `cap` frames and `cap_bytes` bytes (plus the frame that crosses it).
    pub(crate) fn new(cap: usize, cap_bytes: usize) -> OutQueue {
        OutQueue {
            buf: Vec::new(),
            head: 0,
            frame_head: 0,
            frames: 0,
            cap,
            cap_bytes,
            written: 0,
            done: 0,
            lost: Vec::new(),
            conn: 0,
            acks: 0,
            tail_ack: NO_ACK,
            front: 0,
            track: None,
        }
    }

    /// Record every frame completely written from now on as `classify` says, until a
    /// receiver acknowledges it ([`OutQueue::ack`]; see `wire/unacked.rs`), keeping at most
    /// `keep_bytes` of unique-event copies per connection.
    pub(crate) fn track_acks(mut self, classify: Classify, keep_bytes: usize) -> OutQueue {
        self.track = Some(Box::new((Unacked::new(keep_bytes), classify)));
        self
    }

    /// The connection written to is gone (it acknowledges nothing more): the copies of the
    /// unique events it never acknowledged become orphans ([`Unacked::end_kept`]; so they
    /// do at [`OutQueue::take_unacked`]). True when there are orphans.
    pub(crate) fn end_kept(&mut self) -> bool {
        self.track.as_mut().is_some_and(|t| t.0.end_kept())
    }

    /// The orphans: unique events written on connections that ended without acknowledging
    /// them, oldest first ([`Unacked::take_orphans`]).
    pub(crate) fn take_orphans(&mut self) -> Vec<Box<[u8]>> {
        self.track.as_mut().map_or_else(Vec::new, |t| t.0.take_orphans())
    }

    /// [`OutQueue::take_orphans`] has something.
    pub(crate) fn has_orphans(&self) -> bool {
        self.track.as_ref().is_some_and(|t| t.0.has_orphans())
    }

    /// Unique-event copies dropped past their bounds, ever ([`Unacked::unguarded`]).
    pub(crate) fn unguarded(&self) -> u64 {
        self.track.as_ref().map_or(0, |t| t.0.unguarded())
    }

    /// The receiver dispatched `total` frames of the current connection. False for a
    /// protocol violation (logged once, clamped or ignored).
    pub(crate) fn ack(&mut self, total: u64) -> bool {
        self.track.as_mut().is_none_or(|t| t.0.ack(total))
    }

    /// The connection ended: what it was sent and never acknowledged, by origin (see
    /// [`Unacked::take`]). Tracking starts over for the next connection.
    pub(crate) fn take_unacked(&mut self) -> (Vec<(u32, u64)>, u64) {
        self.track.as_mut().map_or_else(|| (Vec::new(), 0), |t| t.0.take())
    }

    /// Queue an `ACK` frame (`total u64`) behind the frames queued, outside the bounds; an
    /// `ACK` at the tail that nobody has written any byte of is rewritten instead.
    pub(crate) fn push_ack(&mut self, total: u64) {
        let at = self.tail_ack;
        if at != NO_ACK && at >= self.head && at + 4 + 9 == self.buf.len() {
            self.buf[at + 5..].copy_from_slice(&total.to_le_bytes());
            return;
        }
        let at = self.buf.len();
        self.buf.extend_from_slice(&9u32.to_le_bytes());
        self.buf.push(kind::ACK);
        self.buf.extend_from_slice(&total.to_le_bytes());
        self.frames += 1;
        self.acks += 1;
        self.tail_ack = at;
    }

    /// Insert a frame ahead of every frame queued, outside the bounds. Only between frames
    /// on the current connection: nothing may have been written of the first frame (call
    /// [`OutQueue::rewind`] first when the connection changed); false otherwise.
    pub(crate) fn push_front(&mut self, kind: u8, parts: &[&[u8]]) -> bool {
        if self.mid_frame() {
            return false;
        }
        let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut f = Vec::with_capacity(4 + len);
        f.extend_from_slice(&(len as u32).to_le_bytes());
        f.push(kind);
        for p in parts {
            f.extend_from_slice(p);
        }
        let at = self.frame_head;
        self.buf.splice(at..at, f.iter().copied());
        if self.tail_ack != NO_ACK {
            self.tail_ack += f.len();
        }
        self.frames += 1;
        self.front += 1;
        true
    }

    /// Frames queued and not completely written (`ACK` frames left out).
    pub(crate) fn len(&self) -> usize {
        self.frames - self.acks as usize
    }

    /// The byte bound.
    pub(crate) fn cap_bytes(&self) -> usize {
        self.cap_bytes
    }

    /// Change the byte bound (a new broker's destinations take its own backlog above the
    /// usual bound, which then shrinks back as they drain).
    pub(crate) fn set_cap_bytes(&mut self, cap_bytes: usize) {
        self.cap_bytes = cap_bytes;
    }

    /// Room left before [`OutQueue::is_full`]: (frames, bytes).
    pub(crate) fn room(&self) -> (usize, usize) {
        (self.cap.saturating_sub(self.len()), self.cap_bytes.saturating_sub(self.queued_bytes()))
    }

    /// No room for another frame (either bound reached).
    pub(crate) fn is_full(&self) -> bool {
        self.len() >= self.cap || self.queued_bytes() >= self.cap_bytes
    }

    /// Bytes of the frames not completely written (what the byte bound counts).
    pub(crate) fn queued_bytes(&self) -> usize {
        self.buf.len() - self.frame_head
    }

    /// Bytes the kernel took from this queue so far (grows while its reader makes progress).
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Bytes queued and not yet written.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.buf.len() - self.head
    }

    /// The ticket of the frame pushed last: it is completely written (the kernel took it)
    /// once [`OutQueue::done`] reaches the ticket. Tickets stay valid across connections
    /// (a frame cut by a broken connection is not done) and across
    /// [`OutQueue::take_unwritten`].
    pub(crate) fn ticket(&self) -> u64 {
        self.done + self.frames as u64 - u64::from(self.front)
    }

    /// Frames completely written, ever (see [`OutQueue::ticket`]).
    pub(crate) fn done(&self) -> u64 {
        self.done
    }

    /// Take out the frames nobody has written any byte of (on the current connection) for
    /// which `pick(kind, body)` holds, in order; the others stay, in order. A frame already
    /// written in part stays (its rest must follow on this connection).
    pub(crate) fn take_unwritten(&mut self, mut pick: impl FnMut(u8, &[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut at = self.frame_head;
        if self.mid_frame() {
            at += 4 + frame_len(&self.buf, at);
        }
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(self.buf.len() - at);
        let mut scan = at;
        while scan + 5 <= self.buf.len() {
            let len = frame_len(&self.buf, scan);
            let (k, body) = (self.buf[scan + 4], &self.buf[scan + 5..scan + 4 + len]);
            if pick(k, body) {
                self.acks -= u32::from(k == kind::ACK);
                taken.push(body.to_vec());
            } else {
                kept.extend_from_slice(&self.buf[scan..scan + 4 + len]);
            }
            scan += 4 + len;
        }
        if !taken.is_empty() {
            self.tail_ack = NO_ACK;
            self.buf.truncate(at);
            self.buf.extend_from_slice(&kept);
            self.frames -= taken.len();
        }
        taken
    }

    /// A frame was written in part on the current connection.
    pub(crate) fn mid_frame(&self) -> bool {
        self.head > self.frame_head
    }

    /// Append one frame; false (nothing queued) when full.
    pub(crate) fn push(&mut self, kind: u8, parts: &[&[u8]]) -> bool {
        if self.is_full() {
            return false;
        }
        self.tail_ack = NO_ACK;
        let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        self.buf.reserve(4 + len);
        self.buf.extend_from_slice(&(len as u32).to_le_bytes());
        self.buf.push(kind);
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        self.frames += 1;
        true
    }

    /// Count an event from publisher `origin` dropped because this queue was full.
    pub(crate) fn note_lost(&mut self, origin: u32) {
        self.note_lost_n(origin, 1);
    }

    /// Count `count` events from publisher `origin` dropped for this destination.
    pub(crate) fn note_lost_n(&mut self, origin: u32, count: u64) {
        match self.lost.iter_mut().find(|l| l.origin == origin) {
            Some(l) => l.count = l.count.saturating_add(count),
            None => self.lost.push(LostCount { origin, count }),
        }
    }

    /// Queue the owed `LOST` notices (as `kind` frames: origin u32, count u64) while there is
    /// room. Call before queueing the next event so the notice precedes it.
    pub(crate) fn push_lost_notices(&mut self, kind: u8) {
        while let Some(&LostCount { origin, count }) = self.lost.first() {
            if !self.push(kind, &[&origin.to_le_bytes(), &count.to_le_bytes()]) {
                return;
            }
            self.lost.remove(0);
        }
    }

    /// Notices owed and not yet queued.
    pub(crate) fn owes_notices(&self) -> bool {
        !self.lost.is_empty()
    }

    /// Write to connection `conn` from now on: when it differs from the last one, the frame
    /// the last connection took in part is sent again, whole, on this one.
    pub(crate) fn on_conn(&mut self, conn: u64) -> &mut Self {
        if self.conn != conn {
            self.rewind();
            self.conn = conn;
        }
        self
    }

    /// The connection this queue writes to (0: none yet).
    pub(crate) fn conn(&self) -> u64 {
        self.conn
    }

    /// Bytes connection `conn` has yet to write (see [`OutQueue::on_conn`]).
    pub(crate) fn pending_bytes_on(&self, conn: u64) -> usize {
        if self.conn == conn { self.pending_bytes() } else { self.buf.len() - self.frame_head }
    }

    /// The connection broke: the frame it took in part is sent again, whole, on the next one.
    pub(crate) fn rewind(&mut self) {
        self.head = self.frame_head;
    }

    /// Drop everything queued (the destination will never read it).
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.head = 0;
        self.frame_head = 0;
        self.frames = 0;
        self.acks = 0;
        self.tail_ack = NO_ACK;
        self.front = 0;
    }

    /// Take every whole frame out (for a change of role): `(kind, body)` in order, from the
    /// first frame not completely written.
    pub(crate) fn drain_frames(&mut self, mut f: impl FnMut(u8, &[u8])) {
        let mut at = self.frame_head;
        while at + 5 <= self.buf.len() {
            let len = u32::from_le_bytes(self.buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            f(self.buf[at + 4], &self.buf[at + 5..at + 4 + len]);
            at += 4 + len;
        }
        self.clear();
    }

    /// Write as much as the socket takes now.
    pub(crate) fn write(&mut self, sock: BorrowedFd<'_>) -> io::Result<()> {
        while self.head < self.buf.len() {
            match sys::send(sock, &self.buf[self.head..]) {
                Ok(n) => {
                    self.head += n;
                    self.written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.advance();
                    return Err(e);
                }
            }
        }
        self.advance();
        Ok(())
    }

    /// Move `frame_head` past the frames written completely; reclaim their space.
    fn advance(&mut self) {
        while self.frame_head + 4 <= self.head {
            let at = self.frame_head;
            let len = u32::from_le_bytes(self.buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            if at + 4 + len > self.head {
                break;
            }
            let k = self.buf[at + 4];
            if let Some(t) = self.track.as_mut() {
                match (t.1)(k, &self.buf[at + 5..at + 4 + len]) {
                    (tag, Some(msg)) => t.0.written_kept(tag, msg),
                    (tag, None) => t.0.written(tag),
                }
            }
            self.acks -= u32::from(k == kind::ACK);
            self.frame_head += 4 + len;
            self.frames -= 1;
            if self.front > 0 {
                self.front -= 1;
            } else {
                self.done += 1;
            }
        }
        if self.tail_ack != NO_ACK && self.tail_ack < self.frame_head {
            self.tail_ack = NO_ACK;
        }
        if self.frame_head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
            self.frame_head = 0;
        } else if self.frame_head >= COALESCE_BYTES && self.frame_head * 2 >= self.buf.len() {
            if self.tail_ack != NO_ACK {
                self.tail_ack -= self.frame_head;
            }
            self.buf.drain(..self.frame_head);
            self.head -= self.frame_head;
            self.frame_head = 0;
        }
    }
}

/// The length word of the frame at `at` (its kind byte and body).
fn frame_len(buf: &[u8], at: usize) -> usize {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize
}

/// Write a connection's control frames and data frames without interleaving them inside a
/// frame: a data frame written in part is finished first, then the control frames, then the
/// data. `Ok(true)` when everything went out.
pub(crate) fn flush_conn(wr: &mut FrameWriter, data: Option<&mut OutQueue>, sock: BorrowedFd<'_>) -> io::Result<bool> {
    let Some(data) = data else { return wr.flush(sock) };
    if data.mid_frame() {
        data.write(sock)?;
        if data.mid_frame() {
            return Ok(false);
        }
    }
    if !wr.flush(sock)? {
        return Ok(false);
    }
    data.write(sock)?;
    Ok(data.pending_bytes() == 0)
}

/// How an inbox record header spells [`Peer::Broker`] (slots are below it).
const FROM_BROKER: u32 = u32::MAX;

/// Frames received over sockets and not yet dispatched, as 16-aligned records so that a
/// message body can be decoded in place (its data must be 16-aligned): a 16-byte header
/// (`from u32, kind u8, 3 pad, len u32, conn u32`: the low 32 bits of the id of the
/// connection it came on), the body, padding to 16.
#[derive(Default)]
pub(crate) struct Inbox {
    buf: AlignedVec,
    count: usize,
}

impl Inbox {
    pub(crate) fn push(&mut self, link: Link, kind: u8, body: &[u8]) {
        let from = match link.peer {
            Peer::Slot(s) => s,
            Peer::Broker => FROM_BROKER,
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&from.to_le_bytes());
        h[4] = kind;
        h[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(link.conn as u32).to_le_bytes());
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(body);
        let pad = body.len().next_multiple_of(16) - body.len();
        self.buf.extend_from_slice(&[0u8; 16][..pad]);
        self.count += 1;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes held (records with their headers and padding).
    pub(crate) fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Hand every record to `f` as `(from, kind, body)` (body 16-aligned; the link's `conn`
    /// is the low 32 bits of the connection id), then empty the box.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(Link, u8, &[u8])) {
        let mut at = 0;
        while at + 16 <= self.buf.len() {
            let from = u32::from_le_bytes(self.buf[at..at + 4].try_into().expect("4 bytes"));
            let kind = self.buf[at + 4];
            let len = u32::from_le_bytes(self.buf[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
            let conn = u32::from_le_bytes(self.buf[at + 12..at + 16].try_into().expect("4 bytes"));
            let body = &self.buf[at + 16..at + 16 + len];
            let peer = if from == FROM_BROKER { Peer::Broker } else { Peer::Slot(from) };
            f(Link { peer, conn: u64::from(conn) }, kind, body);
            at += 16 + len.next_multiple_of(16);
        }
        self.buf.clear();
        self.count = 0;
        if self.buf.capacity() > 4 << 20 {
            self.buf = AlignedVec::new();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
