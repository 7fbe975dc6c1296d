//! The inbound side of the shared-memory port: draining this process's inbound rings
//! (reassembling fragments, reporting lost counts) and checking each message before it
//! reaches the worker's callbacks.

use super::*;
use crate::ring::RecordInfo;

/// Rings' worth of bytes (records included) one drain pass takes from one ring at most.
const PASS_LAPS: usize = 2;

/// What a message from another process is checked against (from the region's geometry
/// and our options, read once per pass).
#[derive(Clone, Copy)]
pub(super) struct Checks {
    workers: u32,
    agent: bool,
    max_payload: usize,
}

/// Check a complete message (not yet validated) from slot `from` and hand it to `sink`: an
/// "all" event comes from its publisher's ring; a unique event carries its publisher's
/// wid. Anything else is dropped (and counted).
#[inline(always)]
pub(super) fn deliver_message<D: Deliver>(sink: &mut D, c: Checks, from: u32, bytes: &[u8]) {
    // As `Geometry::wid_of`.
    let wid_of = |slot: u32| if c.agent && slot == c.workers { Wid::PrivilegedAgent } else { Wid::Worker(slot) };
    let Ok(m) = message::decode_raw(bytes, c.workers, c.agent, c.max_payload) else {
        return malformed(sink, from);
    };
    if !(((m.kind == Kind::All && m.wid == Some(wid_of(from))) || (m.kind == Kind::Unique && m.wid.is_some()))
        && sink.raw_event(&m))
    {
        malformed(sink, from);
    }
}

/// A whole message from a pair ring: checked and handed to `sink`, through our end of the
/// publisher's broadcast ring when the region has them (the message is tagged: a copy may
/// be a duplicate, or a resume marker). Returns true at a resume marker.
#[inline(always)]
fn deliver_pair_message<D: Deliver>(
    sink: &mut D,
    c: Checks,
    from: u32,
    bytes: &[u8],
    bc: Option<&mut bcast::BcastIn>,
) -> bool {
    match bc {
        Some(bc) => matches!(bc.deliver_pair(sink, c, from, bytes), bcast::Flow::Resumed),
        None => {
            deliver_message(sink, c, from, bytes);
            false
        }
    }
}

/// Consume the record `info`, appending its body to `asm`.
///
/// # Safety
/// `info` must be what the last `cons.peek()` returned (as [`Consumer::consume`] requires).
#[inline(always)]
unsafe fn append(cons: &mut Consumer, info: RecordInfo, asm: &mut AlignedVec) {
    asm.reserve(info.len);
    let len = asm.len();
    // SAFETY: `info` is the last peek's (this function's contract, which `consume` needs);
    // `reserve` made room for info.len bytes past `len`, which `consume` fills entirely
    // before `set_len` exposes them.
    unsafe {
        cons.consume(info, Some(asm.as_mut_ptr().add(len)));
        asm.set_len(len + info.len);
    }
}

/// [`deliver_message`]'s refusal: logged (rate-limited) and counted.
#[cold]
#[inline(never)]
pub(super) fn malformed<D: Deliver>(sink: &mut D, from: u32) {
    crate::log_limit::log_limited!(tracing::Level::WARN, from, "dropping a malformed message");
    sink.dropped();
}

impl ShmPort {
    /// Drain inbound rings, handing each message (checked) and lost notices to `sink`. Per ring
    /// and pass, at most `budget` **records** (so at most `budget` messages) and
    /// [`PASS_LAPS`] rings' worth of bytes, whatever the records are: fragments of a message
    /// that never ends, or messages discarded unread, end the pass on that ring as surely as
    /// delivered ones. Returns (messages, more_pending).
    fn drain<D: Deliver>(&mut self, budget: usize, sink: &mut D) -> (usize, bool) {
        // Only what the checks need (the whole geometry is ten words, copied every pass).
        let g = self.region.geometry();
        let checks = Checks { workers: g.workers, agent: g.agent, max_payload: self.max_payload_len };
        let mut total = 0;
        let mut more = false;
        for from in 0..self.inb.len() {
            let Some(inb) = self.inb[from].as_mut() else { continue };
            let Some(cons) = inb.cons.as_mut() else { continue };
            let from = from as u32;
            let lost = cons.take_lost().saturating_add(std::mem::take(&mut inb.owed_lost));
            if lost > 0 {
                sink.lost(from, lost);
            }
            let mut local_lost = 0u64;
            let mut n = 0;
            let (mut records, mut bytes) = (0usize, 0usize);
            let mut empty = false;
            let mut resumed = false;
            let max_bytes = PASS_LAPS * cons.capacity();
            loop {
                if records >= budget || bytes >= max_bytes {
                    more = true;
                    break;
                }
                let info = match cons.peek() {
                    Ok(Some(info)) => {
                        cons.prefetch_next(info);
                        info
                    }
                    Ok(None) => {
                        empty = true;
                        break;
                    }
                    Err(_) => {
                        // Reported once per episode (a record consumed in between starts a
                        // new one), however often the same bad state is met again.
                        if cons.quarantine() {
                            tracing::warn!(from, "corrupt ring: quarantined until its producer writes again");
                            self.counters.dropped += 1;
                            self.counters.corrupt_rings += 1;
                            if inb.state != Asm::Discarding {
                                local_lost += 1;
                            }
                        } else if inb.state == Asm::Assembling {
                            local_lost += 1;
                        }
                        inb.state = Asm::Idle;
                        break;
                    }
                };
                records += 1;
                bytes += record_size(info.len);
                if info.flags == FIRST | LAST && inb.state == Asm::Idle && info.len <= self.max_msg {
                    // A whole message in one record with nothing being assembled (the usual
                    // case): what the general path below does for it, without its state
                    // changes (Idle -> Assembling -> Idle).
                    inb.orphan = false;
                    inb.asm.clear();
                    // SAFETY: `info` is the peek's just above.
                    unsafe { append(cons, info, &mut inb.asm) };
                    n += 1;
                    // Consumed before the callbacks run: a successor never sees it again.
                    cons.commit_read();
                    if deliver_pair_message(sink, checks, from, &inb.asm, inb.bc.as_mut()) {
                        resumed = true;
                        break;
                    }
                    continue;
                }
                if info.flags & FIRST != 0 {
                    // A producer writes again: whatever a dead one left is settled below.
                    inb.orphan = false;
                    if inb.state == Asm::Assembling {
                        // The producer restarted mid-message: its partial message is gone.
                        local_lost += 1;
                    }
                    inb.asm.clear();
                    inb.state = Asm::Assembling;
                } else if inb.state == Asm::Idle {
                    // A tail whose head we never saw (we restarted mid-message).
                    local_lost += 1;
                    inb.state = Asm::Discarding;
                }
                if inb.state == Asm::Assembling && inb.asm.len() + info.len > self.max_msg {
                    local_lost += 1;
                    self.counters.dropped += 1;
                    inb.state = Asm::Discarding;
                }
                if inb.state == Asm::Discarding {
                    // SAFETY: `info` comes from the peek just above; the body is discarded.
                    unsafe { cons.consume(info, None) };
                } else {
                    // SAFETY: `info` comes from the peek above.
                    unsafe { append(cons, info, &mut inb.asm) };
                }
                if info.flags & LAST == 0 {
                    // Mid-message: give the space back at once so the producer can stream.
                    if cons.release() {
                        wake(&self.region, &self.eventfds, from, &mut self.counters);
                    }
                    continue;
                }
                let state = std::mem::replace(&mut inb.state, Asm::Idle);
                if state == Asm::Assembling {
                    n += 1;
                    // Consumed before the callbacks run: a successor never sees it again.
                    cons.commit_read();
                    if deliver_pair_message(sink, checks, from, &inb.asm, inb.bc.as_mut()) {
                        resumed = true;
                        break;
                    }
                }
            }
            if cons.release() {
                wake(&self.region, &self.eventfds, from, &mut self.counters);
            }
            if inb.orphan && empty {
                // A dead producer's partly written message: every fragment it wrote is read.
                inb.orphan = false;
                if inb.state == Asm::Assembling {
                    local_lost += 1;
                    inb.state = Asm::Discarding;
                }
            }
            if local_lost > 0 {
                sink.lost(from, local_lost);
            }
            if cons.owes_check() && self.owed_passes == 0 {
                self.owed_passes = 1;
            }
            if let Some(bc) = inb.bc.as_mut() {
                // The broadcast ring only once every earlier pair-ring message is taken.
                if empty || resumed {
                    let (m, more_b) = bc.drain(sink, checks, from, budget, &mut self.counters);
                    n += m;
                    more |= more_b;
                } else {
                    more = true;
                }
            }
            total += n;
        }
        if self.owed_passes > 0 {
            self.owed_passes += 1;
            if self.owed_passes > SETTLE_PASSES {
                ring::settle_fence();
                self.settle();
            }
        }
        (total, more)
    }

    /// Retry the backlogs, then drain the inbound rings into `sink`, checking each message:
    /// an "all" event comes from its publisher's ring; a unique event carries its publisher's
    /// wid. Returns (messages, more pending).
    pub(crate) fn dispatch<D: Deliver>(&mut self, budget: usize, sink: &mut D) -> (usize, bool) {
        if self.backlogged != 0 || self.pending {
            self.flush();
        }
        self.drain(budget, sink)
    }
}
