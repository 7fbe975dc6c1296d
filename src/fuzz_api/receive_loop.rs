//! The whole shared-memory receive loop for the `receive_loop` fuzz target: a receiving
//! port, honest publishing ports of the other slots, and a mapping to scribble through.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};

use rkyv::util::AlignedVec;

use super::READ_POS;
use crate::error::Error;
use crate::event::{Event, Wid};
use crate::layout;
use crate::message;
use crate::region;
use crate::subs::Subscriptions;
use crate::sys::EventFd;
use crate::transport::Deliver;
use crate::transport::shm::ShmPort;
/// One event as a subscribed callback of the receiving worker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Source name.
    pub source: String,
    /// Event name.
    pub event: String,
    /// Payload.
    pub data: Vec<u8>,
    /// Publisher, as the event carries it.
    pub wid: Option<Wid>,
}

/// What the receiving worker's sink was told besides events (`transport::Deliver`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Notices {
    /// `lost` notices: events of each publisher slot reported lost (saturating sums).
    pub lost: Vec<u64>,
    /// Messages dropped as malformed.
    pub dropped: u64,
}

/// The receiving worker's sink, as `worker::delivery::Delivery` is: messages go to the
/// subscriptions (`Subscriptions::run_joined`, names validated there), notices are counted.
struct Sink<'a> {
    subs: &'a mut Subscriptions,
    notices: &'a mut Notices,
    /// What the worker hands its callbacks (their publishes are not sent here).
    cx: crate::context::Context,
}

impl Deliver for Sink<'_> {
    fn event(&mut self, ev: &Event<'_>) {
        self.subs.run(ev, &mut self.cx);
    }

    fn raw_event(&mut self, m: &message::Raw<'_>) -> bool {
        self.subs.run_joined(m.names, m.src_len, m.data, m.wid, m.ext, &mut self.cx).is_some()
    }

    fn lost(&mut self, from: u32, count: u64) {
        if let Some(l) = self.notices.lost.get_mut(from as usize) {
            *l = l.saturating_add(count);
        }
    }

    fn dropped(&mut self) {
        self.notices.dropped += 1;
    }
}

/// A region (memfd) with one receiving worker (slot 0) and an honest publisher in every
/// other slot, each a real shared-memory port (`transport::shm::ShmPort`) over its own
/// mapping of the region, as separate processes would have; plus one more mapping through
/// which a hostile peer scribbles over anything. The receiver subscribes `("*", "*")`;
/// what its callbacks see is collected for [`ReceiveLoop::take_delivered`].
pub struct ReceiveLoop {
    receiver: ShmPort,
    senders: Vec<ShmPort>,
    subs: Subscriptions,
    delivered: Arc<Mutex<Vec<Delivered>>>,
    notices: Notices,
    scribble: memmap2::MmapRaw,
    geo: layout::Geometry,
    max_payload_len: usize,
    buf: AlignedVec,
}

impl ReceiveLoop {
    /// `workers` slots (2..=8), rings of `ring_capacity` bytes (a power of two, 256 B ..=
    /// 1 MiB), backlogs of `max_queue_len` messages, payloads up to `max_payload_len`.
    /// `None` for parameters outside those bounds (the library's options validation
    /// refuses them).
    ///
    /// # Errors
    /// memfd, mmap or eventfd failure.
    pub fn new(
        workers: u32,
        ring_capacity: usize,
        max_queue_len: usize,
        max_payload_len: usize,
    ) -> Option<io::Result<Self>> {
        let ok = (2..=8).contains(&workers)
            && ring_capacity.is_power_of_two()
            && (256..=1 << 20).contains(&ring_capacity)
            && max_queue_len >= 1
            && max_payload_len <= 1 << 20;
        ok.then(|| Self::build(workers, ring_capacity, max_queue_len, max_payload_len))
    }

    fn build(workers: u32, ring_capacity: usize, max_queue_len: usize, max_payload_len: usize) -> io::Result<Self> {
        let err = |e: Error| io::Error::other(e.to_string());
        let geo = layout::Geometry::new(workers, false, ring_capacity, 64);
        let region = region::Region::create(geo, max_payload_len).map_err(err)?;
        let efds = (0..=workers).map(|_| EventFd::new()).collect::<io::Result<Vec<_>>>()?;
        let dup_efds = || -> io::Result<Vec<EventFd>> {
            efds.iter().map(|e| Ok(EventFd::from_owned(e.as_fd().try_clone_to_owned()?))).collect()
        };
        let scribble = memmap2::MmapOptions::new().len(geo.region_size).map_raw(region.fd().as_raw_fd())?;
        let mut senders = Vec::new();
        for slot in 1..workers {
            let fd = region.fd().try_clone_to_owned()?;
            let r = region::Region::open(fd, geo).map_err(err)?;
            senders.push(ShmPort::attach(r, dup_efds()?, slot, max_queue_len, max_payload_len));
        }
        let receiver = ShmPort::attach(region, efds, 0, max_queue_len, max_payload_len);
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let mut subs = Subscriptions::default();
        let sink = Arc::clone(&delivered);
        subs.subscribe(
            "*",
            "*",
            Box::new(move |_: &mut crate::context::Context, ev: &Event<'_>| {
                let d = Delivered {
                    source: ev.source.to_owned(),
                    event: ev.event.to_owned(),
                    data: ev.data.to_vec(),
                    wid: ev.wid,
                };
                sink.lock().expect("not poisoned").push(d);
            }),
        );
        let notices = Notices { lost: vec![0; workers as usize], dropped: 0 };
        Ok(ReceiveLoop {
            receiver,
            senders,
            subs,
            delivered,
            notices,
            scribble,
            geo,
            max_payload_len,
            buf: AlignedVec::new(),
        })
    }

    /// Number of slots (slot 0 receives, slots `1..` publish).
    pub fn slots(&self) -> u32 {
        self.geo.slots
    }

    /// Size of the region in bytes.
    pub fn region_size(&self) -> usize {
        self.geo.region_size
    }

    /// Byte offset of the header of ring `producer -> 0` (the receiver's inbound ring
    /// from `producer`); its data area follows the header. `None` for a bad slot or 0.
    pub fn inbound_ring_offset(&self, producer: u32) -> Option<usize> {
        (producer != 0 && producer < self.geo.slots).then(|| self.geo.ring_offset(producer, 0))
    }

    /// The stored `read_pos` of every ring, as the scribbling mapping reads it: a pass
    /// that consumed anything anywhere (fragments included, which no count reports)
    /// changes one.
    pub fn read_positions(&self) -> Vec<u64> {
        let s = self.geo.slots;
        let at = READ_POS;
        (0..s)
            .flat_map(|p| (0..s).map(move |c| (p, c)))
            .map(|(p, c)| self.read_u64(self.geo.ring_offset(p, c) + at))
            .collect()
    }

    /// Capacity of a ring's data area.
    pub fn ring_capacity(&self) -> usize {
        self.geo.ring_capacity
    }

    /// Publish an "all" event from slot `from` (1..slots) as that worker's port would
    /// (`ShmPort::send_all`: straight into the rings, or the backlog, or dropped and
    /// counted lost when the backlog is full). False when nothing was sent: a bad slot, a
    /// payload over the limit, or a name over 65,535 bytes.
    pub fn publish(&mut self, from: u32, event: &str, data: &[u8]) -> bool {
        self.publish_as(from, event, data, false)
    }

    /// [`ReceiveLoop::publish`] inside a batch (`Worker::batch`): the records stay
    /// uncommitted until [`ReceiveLoop::end_batch`], or the port's next flush or dispatch
    /// (a leaked batch), or a ring that fills.
    pub fn publish_batched(&mut self, from: u32, event: &str, data: &[u8]) -> bool {
        self.publish_as(from, event, data, true)
    }

    /// [`ReceiveLoop::publish`] (`batched`: [`ReceiveLoop::publish_batched`]).
    fn publish_as(&mut self, from: u32, event: &str, data: &[u8], batched: bool) -> bool {
        let Some(port) = (from as usize).checked_sub(1).and_then(|i| self.senders.get_mut(i)) else { return false };
        let enc =
            message::encode_bytes(&mut self.buf, "fuzz", event, data, from, message::Kind::All, self.max_payload_len);
        if enc.is_err() {
            return false;
        }
        if batched {
            // As `Batch::publish` around `DataPath::send_all`.
            port.set_defer(true);
            port.flush();
        }
        port.send_all(&self.buf);
        port.set_defer(false);
        true
    }

    /// The end of publisher `from`'s batch: commit what it left uncommitted.
    pub fn end_batch(&mut self, from: u32) {
        if let Some(port) = (from as usize).checked_sub(1).and_then(|i| self.senders.get_mut(i)) {
            port.end_batch();
        }
    }

    /// `ShmPort::flush` of publisher `from`'s backlogs; true when anything was written.
    pub fn flush(&mut self, from: u32) -> bool {
        let Some(port) = (from as usize).checked_sub(1).and_then(|i| self.senders.get_mut(i)) else { return false };
        port.flush()
    }

    /// Peers for which publisher `from` has messages waiting in a backlog.
    pub fn backlogged(&self, from: u32) -> usize {
        (from as usize).checked_sub(1).and_then(|i| self.senders.get(i)).map_or(0, |p| p.backlogged())
    }

    /// The receiver's `ShmPort::dispatch` into its subscriptions: `(messages, more
    /// pending)`.
    pub fn dispatch(&mut self, budget: usize) -> (usize, bool) {
        let mut sink =
            Sink { subs: &mut self.subs, notices: &mut self.notices, cx: crate::context::Context::new(Wid::Worker(0)) };
        self.receiver.dispatch(budget, &mut sink)
    }

    /// Every publisher dispatches its own inbound rings (the other publishers' events to
    /// it), discarding what it receives: the publishers' backlogs towards each other drain.
    /// Returns whether anything was received.
    pub fn drain_publishers(&mut self) -> bool {
        let mut any = false;
        for port in &mut self.senders {
            let (mut subs, mut notices) = (Subscriptions::default(), Notices::default());
            let (n, more) = port.dispatch(
                4096,
                &mut Sink { subs: &mut subs, notices: &mut notices, cx: crate::context::Context::new(Wid::Worker(0)) },
            );
            any |= n > 0 || more;
        }
        any
    }

    /// The receiver's `ShmPort::arm` (true: safe to sleep).
    pub fn arm(&mut self) -> bool {
        self.receiver.arm()
    }

    /// The receiver's `ShmPort::disarm`.
    pub fn disarm(&mut self) -> bool {
        self.receiver.disarm()
    }

    /// The receiver's `ShmPort::has_inbound`.
    pub fn has_inbound(&mut self) -> bool {
        self.receiver.has_inbound()
    }

    /// Events the callbacks saw since the last call.
    pub fn take_delivered(&mut self) -> Vec<Delivered> {
        std::mem::take(&mut *self.delivered.lock().expect("not poisoned"))
    }

    /// Lost notices and drops so far.
    pub fn notices(&self) -> &Notices {
        &self.notices
    }

    /// Inbound rings the receiver found corrupt (`PortCounters::corrupt_rings`).
    pub fn corrupt_rings(&self) -> u64 {
        self.receiver.counters.corrupt_rings
    }

    /// Overwrite region bytes at `offset` as a hostile process with the memfd could, at any
    /// time between calls. Bytes past the end are ignored.
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        let n = self.geo.region_size.saturating_sub(offset).min(bytes.len());
        // SAFETY: [offset, offset + n) lies inside the mapping. The ports reach the same
        // pages only through their own mappings (other addresses) and only inside their
        // methods, none of which runs now (`&self` here, every port method takes `&mut`).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.scribble.as_mut_ptr().add(offset), n) };
    }

    /// Read a little-endian u64 at `offset` (must be within the region).
    pub fn read_u64(&self, offset: usize) -> u64 {
        assert!(offset + 8 <= self.geo.region_size, "read_u64 past the region");
        let mut b = [0u8; 8];
        // SAFETY: in bounds (asserted); no port method runs now (see `write`).
        unsafe { std::ptr::copy_nonoverlapping(self.scribble.as_ptr().add(offset), b.as_mut_ptr(), 8) };
        u64::from_le_bytes(b)
    }
}
