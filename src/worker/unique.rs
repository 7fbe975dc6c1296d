//! Unique events: the publisher's outbox (kept until a broker acknowledges them, resent to
//! the next broker) and the broker's router (dedup, then one live target, round-robin,
//! preferring other workers).

use std::collections::VecDeque;

use rkyv::util::AlignedVec;

use super::Worker;
use crate::dedup::Check;
use crate::error::PublishError;
use crate::message::{self, Kind};

/// One unique event not yet acknowledged.
struct UniqueOut {
    id: u64,
    hash: Box<str>,
    msg: AlignedVec,
}

/// Unique events not yet acknowledged by a broker, in publish order.
#[derive(Default)]
pub(super) struct UniqueOutbox {
    out: VecDeque<UniqueOut>,
    /// How many of `out` were sent on the current broker connection.
    sent: usize,
    next_id: u64,
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
    /// Queue a unique event and move it towards the broker.
    pub(super) fn queue_unique(&mut self, hash: &str, buf: AlignedVec) -> Result<(), PublishError> {
        if self.unique.out.len() >= self.opts.max_queue_len {
            self.stats.overflows += 1;
            self.pool.push(buf);
            return Err(PublishError::QueueOverflow);
        }
        let u = &mut self.unique;
        u.next_id += 1;
        u.out.push_back(UniqueOut { id: u.next_id, hash: hash.into(), msg: buf });
        self.stats.published += 1;
        self.pump_unique();
        Ok(())
    }

    /// Move unique events towards the broker: handle them here when we are the broker,
    /// send the ones not yet sent on this connection when attached, keep them otherwise.
    pub(super) fn pump_unique(&mut self) {
        if self.unique.is_empty() || self.path.transport().is_none() {
            return;
        }
        if self.is_broker() && !self.step_down_if_fenced() {
            if !self.path.can_dedup() {
                return;
            }
            while let Some(u) = self.unique.out.pop_front() {
                self.handle_unique(self.slot, u.hash.as_bytes(), &u.msg);
                self.recycle(u.msg);
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
            // Tell a busy-polling broker to look at its control sockets now.
            self.path.set_control_hint(broker);
        }
    }

    /// (broker) Dedup a unique event and deliver it to one live worker.
    pub(super) fn handle_unique(&mut self, from: u32, hash: &[u8], msg: &[u8]) {
        let g = self.geo;
        let ok = message::decode(msg, g.workers, g.agent, self.opts.max_payload_len)
            .is_ok_and(|d| d.kind == Kind::Unique && d.event.wid == Some(g.wid_of(from)));
        if !ok {
            tracing::warn!(from, "dropping a malformed unique event");
            self.stats.dropped += 1;
            return;
        }
        let ttl = u64::try_from(self.opts.unique_timeout.as_nanos()).unwrap_or(u64::MAX);
        let now = crate::sys::monotonic_ns();
        let Some(check) = self.path.dedup_check(hash, now, ttl) else { return };
        match check {
            Check::Duplicate => {
                self.stats.unique_duplicates += 1;
                return;
            }
            Check::Full => {
                self.stats.unique_unrecorded += 1;
                tracing::warn!(hash = %String::from_utf8_lossy(hash), "unique table window full; delivering unrecorded");
            }
            Check::New => {}
        }
        let target = self.pick_unique_target();
        let mut buf = self.buffer();
        buf.clear();
        buf.extend_from_slice(msg);
        if target == self.slot {
            self.local.push_back(buf);
        } else {
            self.path.send_to(target, from, &buf);
            self.recycle(buf);
        }
    }

    /// (broker) Next live slot other than ours, round-robin; ourselves when nobody else is
    /// alive. (An event handed to another worker is in its ring at once; one kept for our
    /// own callbacks would die with us if we were killed before dispatching it, after its
    /// hash was recorded and acknowledged.)
    fn pick_unique_target(&mut self) -> u32 {
        let slots = self.geo.slots;
        let Some(ctl) = self.ctl.as_ref() else { return self.slot };
        let rr = &mut self.broker.next_unique_target;
        for i in 0..slots {
            let s = (*rr + i) % slots;
            if s != self.slot && ctl.slot_alive(s) {
                *rr = (s + 1) % slots;
                return s;
            }
        }
        self.slot
    }
}
