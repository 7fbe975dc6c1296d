//! The publishing half of the shared-memory transport: offering a message to one peer's
//! ring (or its backlog), streaming large messages, and the in-place fast path of an "all"
//! publish that builds the message straight in the first peer's ring.

use std::mem::MaybeUninit;
use std::sync::Arc;

use rkyv::util::AlignedVec;

use super::{Outbound, Pending, ShmPort};
use crate::notify;
use crate::ring::{FIRST, LAST, Producer, REC_HDR, record_size};
use crate::transport::PortCounters;

impl ShmPort {
    /// The fast path of an "all" publish: `build` writes the whole message into free space
    /// of the first peer's ring (returning its length, or `None` when it does not fit), and
    /// the other peers get a copy of that record. `min` is the least room worth trying.
    ///
    /// Returns `Ok(false)`, having written nothing, when the fast path does not apply: a
    /// backlog is waiting (order), no ring is usable, the first ring has no contiguous room
    /// of `min` bytes right now, or the message did not fit in it. The caller then encodes
    /// into a private buffer and uses [`ShmPort::send_all`], which applies every backlog and
    /// overflow rule. An `Err` from `build` is returned as is, with nothing written.
    pub(crate) fn send_all_in_place<E>(
        &mut self,
        min: usize,
        build: impl FnOnce(&mut [MaybeUninit<u8>]) -> Result<Option<usize>, E>,
    ) -> Result<bool, E> {
        if self.backlogged != 0 {
            return Ok(false);
        }
        let Some(first) = self.out.iter().position(|o| o.as_ref().is_some_and(|o| o.prod.is_some())) else {
            return Ok(false);
        };
        let only = self.out.len() <= 2;
        let Some(o) = self.out[first].as_mut() else { return Ok(false) };
        let Some(prod) = o.prod.as_mut() else { return Ok(false) };
        let Ok(Some(space)) = prod.reserve(min) else { return Ok(false) };
        let at = space.as_ptr().cast::<u8>();
        let Some(len) = build(space)? else { return Ok(false) };
        prod.write_reserved(FIRST | LAST, len);
        if only {
            // The only peer: commit and wake it without scanning every ring twice.
            prod.commit();
            notify::after_commit();
            if notify::should_wake(self.region.parked_flag(first as u32)) {
                self.eventfds[first].notify();
                self.counters.wakeups_sent += 1;
            }
            return Ok(true);
        }
        o.touched = true;
        // SAFETY: `build` initialized these `len` bytes of our own, not yet committed record:
        // nothing writes them until this producer reuses the space, after the copies below.
        let msg = unsafe { std::slice::from_raw_parts(at, len) };
        let mut shared = None;
        for (i, o) in self.out.iter_mut().enumerate() {
            let Some(o) = o.as_mut().filter(|_| i != first) else { continue };
            offer(o, msg, &mut shared, self.max_queue_len, &mut self.backlogged, &mut self.counters);
        }
        self.commit_and_wake();
        Ok(true)
    }
}

/// A private, aligned copy of `msg` (for a backlog).
fn aligned(msg: &[u8]) -> AlignedVec {
    let mut v = AlignedVec::with_capacity(msg.len());
    v.extend_from_slice(msg);
    v
}

/// Offer `msg` to one peer's ring: write it now if its backlog is empty and it fits, else
/// queue it (sharing one copy through `shared`), else drop and count it. Returns whether
/// anything was written (the caller commits).
pub(super) fn offer(
    o: &mut Outbound,
    msg: &[u8],
    shared: &mut Option<Arc<AlignedVec>>,
    max_queue_len: usize,
    backlogged: &mut usize,
    counters: &mut PortCounters,
) -> bool {
    let Some(prod) = o.prod.as_mut() else {
        counters.lost_outbound += 1;
        return false;
    };
    let sent = if o.backlog.is_empty() { write_msg(prod, msg, 0).unwrap_or(0) } else { 0 };
    if sent > 0 {
        o.touched = true;
    }
    if sent == msg.len() {
        return true;
    }
    if sent == 0 && o.backlog.len() >= max_queue_len {
        prod.add_lost(1);
        counters.lost_outbound += 1;
        return false;
    }
    if o.backlog.is_empty() {
        *backlogged += 1;
    }
    let arc = shared.get_or_insert_with(|| Arc::new(aligned(msg))).clone();
    o.backlog.push_back(Pending { msg: arc, sent });
    sent > 0
}

/// Write as much of `msg` (from byte `sent`) into the ring as fits now, uncommitted.
/// Returns the new `sent`. Small messages are written whole or not at all; a message over a
/// quarter of the ring is streamed in fragments as space allows.
pub(super) fn write_msg(prod: &mut Producer, msg: &[u8], mut sent: usize) -> Result<usize, crate::ring::Corrupt> {
    let len = msg.len();
    let max_body = prod.max_body();
    if sent == 0 && record_size(len) <= max_body + REC_HDR && prod.try_write(FIRST | LAST, &[msg])? {
        return Ok(len);
    }
    if sent == 0 && len <= max_body / 4 {
        return Ok(0);
    }
    let min_chunk = (max_body / 8).max(8);
    while sent < len {
        let remaining = len - sent;
        let room = prod.body_room(remaining.min(max_body / 2))?;
        let n = remaining.min(room).min(max_body / 2);
        if n < remaining.min(min_chunk) || n == 0 {
            break;
        }
        let flags = if sent == 0 { FIRST } else { 0 } | if sent + n == len { LAST } else { 0 };
        if !prod.try_write(flags, &[&msg[sent..sent + n]])? {
            break;
        }
        sent += n;
    }
    Ok(sent)
}
