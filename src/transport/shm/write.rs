//! Writing to one peer's pair ring: offering a message (ring, else backlog, else counted
//! lost), streaming one larger than a quarter of the ring in fragments, and waking a
//! producer that asked for room.

use super::*;

/// Offer `msg` to one peer's ring: write it now if its backlog is empty and it fits, else
/// queue it (sharing one copy through `shared`), else drop and count it. Returns whether
/// anything was written (the caller commits).
#[inline(always)]
pub(super) fn offer(
    o: &mut Outbound,
    msg: &AlignedVec,
    shared: &mut Option<Arc<AlignedVec>>,
    max_queue_len: usize,
    backlogged: &mut usize,
    counters: &mut PortCounters,
) -> bool {
    if o.prod.is_none() {
        o.prod = Producer::new(o.raw).ok();
        if let Some(p) = o.prod.as_mut() {
            p.add_lost(std::mem::take(&mut o.missed));
        }
    }
    let Some(prod) = o.prod.as_mut() else {
        o.missed = o.missed.saturating_add(1);
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
    let arc = shared.get_or_insert_with(|| Arc::new(msg.clone())).clone();
    o.backlog.push_back(Pending { msg: arc, sent });
    sent > 0
}

pub(super) fn wake(region: &Region, eventfds: &[EventFd], slot: u32, counters: &mut PortCounters) {
    // `Consumer::release`/`settle` won the swap of `want_space` after the store of
    // read_pos. The fence orders that store before the load of the producer's `parked`
    // (the wake handshake of notify.rs): a producer not seen parked re-reads read_pos on
    // its arm re-check. Only on this path (a producer asked for room), not per release.
    notify::after_commit();
    let mut claims = Claims::default();
    claims.claim_if_parked(region, slot);
    claims.write(eventfds, counters);
}

/// The wake-ups one commit (or one release of ring space) claimed ([`notify::Claims`]),
/// written when its walk is done: the syscall path of every wake-up.
#[derive(Default)]
pub(super) struct Claims(notify::Claims);

impl Claims {
    /// Claim `slot`'s wake-up if it is parked (the caller fenced after its commit), and
    /// count it in the slot's header.
    #[inline(always)]
    pub(super) fn claim_if_parked(&mut self, region: &Region, slot: u32) {
        if self.0.claim(region.parked_flag(slot), slot) {
            region.count_wakeup(slot);
        }
    }

    /// Write what was claimed: nothing, each claimed receiver's eventfd, or the fan-out one
    /// (the last of `eventfds`, see `ShmPort::attach`).
    #[inline(always)]
    pub(super) fn write(self, eventfds: &[EventFd], counters: &mut PortCounters) {
        if self.0.count() > 0 {
            write_claims(&self.0, eventfds, counters);
        }
    }
}

#[inline(never)]
fn write_claims(claims: &notify::Claims, eventfds: &[EventFd], counters: &mut PortCounters) {
    counters.wakeups_sent += u64::from(claims.count());
    match claims.writes() {
        notify::Writes::Fanout => {
            if let Some(f) = eventfds.last() {
                f.notify();
            }
            counters.wake_writes += 1;
        }
        notify::Writes::Each(slots) => {
            for &slot in slots {
                eventfds[slot as usize].notify();
                counters.wake_writes += 1;
            }
        }
    }
}

/// Write as much of `msg` (from byte `sent`) into the ring as fits now, uncommitted.
/// Returns the new `sent`. Small messages are written whole or not at all; a message over a
/// quarter of the ring is streamed in fragments as space allows. The whole-record attempt is
/// inlined into the publish path; the fragment loop is not.
#[inline(always)]
pub(super) fn write_msg(prod: &mut Producer, msg: &[u8], sent: usize) -> Result<usize, crate::ring::Corrupt> {
    let len = msg.len();
    let max_body = prod.max_body();
    if sent == 0 && record_size(len) <= max_body + REC_HDR && prod.try_write(FIRST | LAST, &[msg])? {
        return Ok(len);
    }
    if sent == 0 && len <= max_body / 4 {
        return Ok(0);
    }
    write_fragments(prod, msg, sent)
}

/// [`write_msg`] of a message that did not go as one record: fragments from byte `sent`.
#[inline(never)]
fn write_fragments(prod: &mut Producer, msg: &[u8], mut sent: usize) -> Result<usize, crate::ring::Corrupt> {
    let len = msg.len();
    let max_body = prod.max_body();
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
