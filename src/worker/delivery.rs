//! Delivery to this worker's callbacks: the sink the data path drains into, our own queue
//! (self-copies, `Current` events, notices), lost notices, the buffer pool, and folding a
//! port's counters into the statistics.

use rkyv::util::AlignedVec;

use super::Worker;
use crate::event::{Event, Lost, SYSTEM_SOURCE};
use crate::layout::Geometry;
use crate::message::{self, Kind};
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
}

impl Deliver for Delivery<'_> {
    fn event(&mut self, ev: &Event<'_>) {
        run_callbacks(self.subs, self.stats, ev);
    }

    fn raw_event(&mut self, m: &message::Raw<'_>) -> bool {
        let Some(r) = self.subs.run_raw(m.source, m.event, m.data, m.wid) else { return false };
        count_run(self.stats, r);
        true
    }

    fn lost(&mut self, from: u32, count: u64) {
        deliver_lost_notice(self.subs, self.stats, self.geo, from, count);
    }

    fn dropped(&mut self) {
        self.stats.dropped += 1;
    }
}

/// Run the callbacks for one delivered event and count it.
pub(super) fn run_callbacks(subs: &mut Subscriptions, stats: &mut Stats, ev: &Event<'_>) {
    count_run(stats, subs.run(ev));
}

/// Count one delivered event whose callbacks ran with outcome `r`.
fn count_run(stats: &mut Stats, r: RunStats) {
    stats.delivered += 1;
    stats.callbacks_run += r.called;
    stats.callback_panics += r.panicked;
}

/// Run the callbacks of a "lost" system notice: `count` events of publisher slot `from`
/// never reached this worker.
pub(super) fn deliver_lost_notice(subs: &mut Subscriptions, stats: &mut Stats, geo: &Geometry, from: u32, count: u64) {
    stats.lost = stats.lost.saturating_add(count);
    let publisher = geo.wid_of(from);
    tracing::warn!(%publisher, count, "events lost on the way to this worker");
    let mut b = AlignedVec::new();
    let lost = Lost { count, publisher };
    if message::encode_typed(&mut b, SYSTEM_SOURCE, "lost", &lost, from, Kind::System, usize::MAX).is_ok() {
        if let Ok(d) = message::decode(&b, geo.workers, geo.agent, usize::MAX) {
            run_callbacks(subs, stats, &d.event);
        }
    }
}

/// Add a port's transport counters to the worker's own.
pub(super) fn fold_counters(s: &mut Stats, c: PortCounters) {
    s.wakeups_sent += c.wakeups_sent;
    s.lost_outbound += c.lost_outbound;
    s.dropped += c.dropped;
    s.corrupt_rings += c.corrupt_rings;
}

impl Worker {
    /// Run our own queue (this worker's own stream, in publish order); returns the events run.
    pub(super) fn run_local(&mut self) -> usize {
        // Our own "all" events that no callback wanted (see `send`): delivered to nobody.
        let mut n = std::mem::take(&mut self.unrun_self);
        self.stats.delivered += n as u64;
        for _ in 0..self.local.len() {
            let Some(buf) = self.local.pop_front() else { break };
            let (g, max) = (self.geo, self.opts.max_payload_len);
            if let Ok(d) = message::decode(&buf, g.workers, g.agent, max) {
                run_callbacks(&mut self.subs, &mut self.stats, &d.event);
                n += 1;
            }
            self.recycle(buf);
        }
        n
    }

    /// [`Worker::run_local`] when our own queue has anything (two loads otherwise).
    #[inline]
    pub(super) fn run_local_if_any(&mut self) -> usize {
        if self.unrun_self == 0 && self.local.is_empty() { 0 } else { self.run_local() }
    }

    /// A buffer from the pool (or a new one).
    pub(super) fn buffer(&mut self) -> AlignedVec {
        self.pool.pop().unwrap_or_default()
    }

    /// Give a buffer back to the pool.
    pub(super) fn recycle(&mut self, mut buf: AlignedVec) {
        buf.clear();
        let keep = if buf.capacity() <= SMALL_BUF { self.opts.max_queue_len.max(POOL_MIN) } else { POOL_MIN };
        if self.pool.len() < keep {
            self.pool.push(buf);
        }
    }
}
