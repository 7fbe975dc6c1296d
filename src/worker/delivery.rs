//! Delivery to this worker's callbacks: the sink the data path drains into, our own queue
//! (self-copies, `Current` events, notices), lost notices, the buffer pool, and folding a
//! port's counters into the statistics.

use rkyv::util::AlignedVec;

use super::Worker;
use crate::context::{Context, Limits, Room};
use crate::event::{Event, Lost, SYSTEM_SOURCE, Target};
use crate::layout::Geometry;
use crate::message::{self, Ext, Kind, ORIGIN_NONE};
use crate::stats::Stats;
use crate::subs::{RunStats, Subscriptions};
use crate::transport::{Deliver, PortCounters};

/// Spare buffers kept for reuse, at least (up to `max_queue_len` small ones are kept, so a
/// burst of self-delivered events allocates nothing once the pool has grown).
const POOL_MIN: usize = 64;
/// A buffer up to this capacity counts as small.
const SMALL_BUF: usize = 4096;

/// The worker's callbacks and counters, as a transport sees them.
pub(super) struct Delivery<'a> {
    pub(super) subs: &'a mut Subscriptions,
    pub(super) stats: &'a mut Stats,
    pub(super) geo: &'a Geometry,
    /// What the callbacks publish (sent after the pass).
    pub(super) cx: &'a mut Context,
}

impl Deliver for Delivery<'_> {
    fn event(&mut self, ev: &Event<'_>) {
        run_callbacks(self.subs, self.stats, self.cx, ev);
    }

    #[inline(always)]
    fn raw_event(&mut self, m: &message::Raw<'_>) -> bool {
        let Some(r) = self.subs.run_joined(m.names, m.src_len, m.data, m.wid, m.ext, self.cx) else {
            return false;
        };
        count_run(self.stats, r);
        if m.ext != Ext::None {
            count_relayed_lost(self.stats, m.source(), m.event(), m.data, m.ext);
        }
        true
    }

    fn lost(&mut self, from: u32, count: u64) {
        deliver_lost_notice(self.subs, self.stats, self.cx, self.geo, from, count);
    }

    fn dropped(&mut self) {
        self.stats.dropped += 1;
    }
}

/// Run the callbacks for one delivered event and count it.
pub(super) fn run_callbacks(subs: &mut Subscriptions, stats: &mut Stats, cx: &mut Context, ev: &Event<'_>) {
    count_run(stats, subs.run(ev, cx));
    if ev.ext != Ext::None {
        count_relayed_lost(stats, ev.source.as_bytes(), ev.event.as_bytes(), ev.data, ev.ext);
    }
}

/// A `lost` notice relayed from another host ([`Worker::report_relayed_lost`]) counts in
/// `Stats::lost` as a local one does.
#[cold]
fn count_relayed_lost(stats: &mut Stats, source: &[u8], event: &[u8], data: &[u8], ext: Ext<'_>) {
    if !matches!(ext, Ext::OriginHost(_)) || source != SYSTEM_SOURCE.as_bytes() || event != b"lost" {
        return;
    }
    let ev = Event { source: SYSTEM_SOURCE, event: "lost", data, wid: None, ext };
    if let Some(l) = ev.lost() {
        stats.lost = stats.lost.saturating_add(l.count);
    }
}

/// Count one delivered event whose callbacks ran with outcome `r`.
fn count_run(stats: &mut Stats, r: RunStats) {
    stats.delivered += 1;
    stats.callbacks_run += r.called;
    stats.callback_panics += r.panicked;
}

/// Run the callbacks of a "lost" system notice: `count` events of publisher slot `from`
/// never reached this worker.
pub(super) fn deliver_lost_notice(
    subs: &mut Subscriptions,
    stats: &mut Stats,
    cx: &mut Context,
    geo: &Geometry,
    from: u32,
    count: u64,
) {
    stats.lost = stats.lost.saturating_add(count);
    let publisher = geo.wid_of(from);
    crate::log_limit::log_limited!(tracing::Level::WARN, %publisher, count, "events lost on the way to this worker");
    let mut b = AlignedVec::new();
    let lost = Lost { count, publisher };
    if message::encode_typed(&mut b, SYSTEM_SOURCE, "lost", &lost, from, Kind::System, usize::MAX).is_ok() {
        if let Ok(d) = message::decode(&b, geo.workers, geo.agent, usize::MAX) {
            run_callbacks(subs, stats, cx, &d.event);
        }
    }
}

/// Add a port's transport counters to the worker's own.
pub(super) fn fold_counters(s: &mut Stats, c: PortCounters) {
    s.wakeups_sent += c.wakeups_sent;
    s.wake_writes += c.wake_writes;
    s.lost_outbound += c.lost_outbound;
    s.dropped += c.dropped;
    s.corrupt_rings += c.corrupt_rings;
    s.unique_unguarded += c.unique_unguarded;
    s.diverts += c.diverts;
    s.resumes += c.resumes;
}

impl Worker {
    /// Run our own queue (this worker's own stream, in publish order); returns the events run.
    pub(super) fn run_local(&mut self) -> usize {
        // Our own "all" events that no callback wanted (see `send`): delivered to nobody.
        let mut n = std::mem::take(&mut self.unrun_self);
        self.stats.delivered += n as u64;
        self.prepare_callbacks();
        for _ in 0..self.local.len() {
            let Some(buf) = self.local.pop_front() else { break };
            self.handoffs.local_done += 1;
            let (g, max) = (self.geo, self.opts.max_payload_len);
            if let Ok(d) = message::decode(&buf, g.workers, g.agent, max) {
                self.cx.set_local_used(self.local.len());
                run_callbacks(&mut self.subs, &mut self.stats, &mut self.cx, &d.event);
                n += 1;
            }
            self.recycle(buf);
        }
        self.send_queued();
        n
    }

    /// Before running callbacks: the bounds their publishes (through the [`Context`]) are
    /// checked against, as `publish` would check them now. Nothing to do until a callback
    /// that can publish is subscribed.
    #[inline]
    pub(super) fn prepare_callbacks(&mut self) {
        if !self.cx_used {
            return;
        }
        let in_process = self.path.is_in_process();
        let cap = self.opts.max_queue_len;
        let unique = if self.path.shm().is_some() {
            Room::UNLIMITED // routed at once, never queued
        } else {
            Room::frames(cap.saturating_sub(self.unique.len()))
        };
        self.cx.set_limits(Limits {
            in_process,
            origin: if in_process { ORIGIN_NONE } else { self.slot },
            max_payload_len: self.opts.max_payload_len,
            cap,
            local_used: self.local.len() + self.unrun_self,
            all: self.path.all_room(cap),
            unique,
        });
    }

    /// After callbacks ran: send what they published, in call order, as `publish` does.
    /// Returns how many were sent. (In testing mode, sending runs callbacks at once: what
    /// those publish stays queued for the next call.)
    #[inline(always)]
    pub(super) fn send_queued(&mut self) -> usize {
        if self.cx.queue.is_empty() { 0 } else { self.send_queue() }
    }

    /// [`Worker::send_queued`] with something queued.
    #[inline(never)]
    fn send_queue(&mut self) -> usize {
        let mut queue = std::mem::take(&mut self.cx.queue);
        let mut names = std::mem::take(&mut self.cx.names);
        let n = queue.len();
        for q in queue.drain(..) {
            let name = |r: (usize, usize)| &names[r.0..r.1];
            let target = match q.kind {
                Kind::All => Target::All,
                Kind::Unique => Target::Unique(name(q.hash)),
                _ => Target::Current,
            };
            if let Err(e) = self.send(q.msg, target, None, name(q.source), name(q.event)) {
                // Not expected: the same checks passed at the call.
                crate::log_limit::log_limited!(tracing::Level::WARN, error = %e, "an event published from a callback could not be sent");
            }
            if self.cx.spare.len() < n {
                if let Some(b) = self.pool.pop() {
                    self.cx.spare.push(b);
                }
            }
        }
        if self.cx.queue.is_empty() {
            // Keep the allocations (nothing was queued while sending).
            names.clear();
            self.cx.queue = queue;
            self.cx.names = names;
        }
        n
    }

    /// [`Worker::run_local`] when our own queue holds messages. When it holds none, our own
    /// "all" copies that no callback wanted (`unrun_self`, see `send`) are counted as
    /// delivered here, as `run_local` would: no callback runs, so nothing is left to send.
    #[inline]
    pub(super) fn run_local_if_any(&mut self) -> usize {
        if !self.local.is_empty() {
            return self.run_local();
        }
        let n = std::mem::take(&mut self.unrun_self);
        self.stats.delivered += n as u64;
        n
    }

    /// A buffer from the pool (or a new one).
    #[inline(always)]
    pub(super) fn buffer(&mut self) -> AlignedVec {
        match self.spare.take() {
            Some(b) => b,
            None => self.pool.pop().unwrap_or_default(),
        }
    }

    /// Give a buffer back to the pool.
    #[inline(always)]
    pub(super) fn recycle(&mut self, mut buf: AlignedVec) {
        buf.clear();
        if self.spare.is_none() && buf.capacity() <= SMALL_BUF {
            self.spare = Some(buf);
        } else {
            self.recycle_to_pool(buf);
        }
    }

    /// [`Worker::recycle`] into `pool` (emptied already).
    #[inline(never)]
    fn recycle_to_pool(&mut self, buf: AlignedVec) {
        let keep = if buf.capacity() <= SMALL_BUF { self.opts.max_queue_len.max(POOL_MIN) } else { POOL_MIN };
        if self.pool.len() < keep {
            self.pool.push(buf);
        }
    }
}
