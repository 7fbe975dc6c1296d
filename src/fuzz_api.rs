//! Entry points for the cargo-fuzz targets in `fuzz/` (cargo feature `fuzzing`).
//!
//! Not a public API: hidden from the documentation, no stability promise. Each item is a
//! thin, safe wrapper over a crate-internal parser or shared-memory reader that takes input
//! another process controls: control-channel frames, event messages, ring headers and
//! records, the region header, the dedup table, and the whole shared-memory receive loop
//! (a receiving port, honest publishing ports, and a mapping to scribble through). The wrappers add no checks the library
//! does not make itself, except where the library relies on a value computed in private
//! memory (a ring capacity, a slot number, a bucket count): those are refused here instead
//! of hitting an internal assertion.

use std::alloc::Layout;
use std::io;
use std::marker::PhantomData;
use std::mem::offset_of;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use crate::dedup;
use crate::error::Error;
use crate::event::Event;
use crate::layout::{self, ConsumerLine, ProducerLine, RingHeader};
use crate::message;
use crate::region;
use crate::ring::{self, RawRing};
use crate::wire::frame;

// ---------------------------------------------------------------------------------------
// Control channel

/// Incoming side of a control connection (`control::frame::FrameReader`).
#[derive(Debug)]
pub struct FrameReader(frame::FrameReader);

impl FrameReader {
    /// A reader refusing frames longer than `max_frame` bytes (kind byte included).
    pub fn new(max_frame: usize) -> Self {
        FrameReader(frame::FrameReader::new(max_frame))
    }

    /// Read everything `sock` has now without blocking, collecting passed descriptors.
    /// `Ok(true)` while the peer is connected, `Ok(false)` once it has closed its end.
    ///
    /// # Errors
    /// Any socket error other than `WouldBlock` and `Interrupted`.
    pub fn fill(&mut self, sock: BorrowedFd<'_>, fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
        self.0.fill(sock, Some(fds), usize::MAX).map(|s| s == frame::ReadState::Open)
    }

    /// The next complete frame, `(kind, body)`, if one has arrived.
    ///
    /// # Errors
    /// A length prefix of 0 or above `max_frame` (the connection would be dropped).
    pub fn next_frame(&mut self) -> Result<Option<(u8, &[u8])>, String> {
        self.0.next_frame()
    }
}

// ---------------------------------------------------------------------------------------
// Event messages

/// Size of the message header; the data of a message starts at this offset.
pub const MESSAGE_HEADER_SIZE: usize = message::MSG_HDR;

/// Decode a message as a receiver configured with `workers`, `agent` and
/// `max_payload_len` would (`message::decode`). `Some((event, kind byte))` when accepted.
pub fn decode(buf: &[u8], workers: u32, agent: bool, max_payload_len: usize) -> Option<(Event<'_>, u8)> {
    message::decode(buf, workers, agent, max_payload_len).ok().map(|d| (d.event, d.kind as u8))
}

// ---------------------------------------------------------------------------------------
// Control-frame bodies from peers

/// Parse a DIVERT frame's body (the agent's unique-diversion patterns) as a broker or a
/// worker would; when accepted, the list's own encoding (which must be the body itself).
pub fn divert_patterns(body: &[u8]) -> Result<Vec<u8>, String> {
    crate::divert::Patterns::decode(body).map(|p| p.encoded().to_vec())
}

/// Parse an INSPECT_REPLY body (no descriptors) as `worker_events::inspect` would.
pub fn inspect_reply(body: &[u8]) -> Result<(), String> {
    crate::control::parse_inspect_reply(body, Vec::new()).map(|_| ())
}

/// Parse an ACK body (socket transport: a worker's running total of data frames
/// dispatched) as the broker does. Then replay the same bytes as a peer's doing against the
/// broker's record of what a receiver was sent (`wire/unacked.rs`): an even byte is a frame
/// written (its bits pick the publisher and what it counts for; one that counts for
/// nothing is a unique event, whose copy is kept), an odd one an acknowledgement of the
/// total in the (up to) 8 bytes after it. Panics if what is left owed is more than was
/// written, or if more copies are handed back than frames were left unacknowledged.
pub fn ack_body(body: &[u8]) -> Result<u64, String> {
    use crate::wire::unacked::{Tag, Unacked};
    let parsed = crate::control::parse_ack(body);
    let mut u = Unacked::default();
    let mut written = 0u64;
    let mut rest = body;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        if op & 1 == 0 {
            let tag = Tag { origin: u32::from(op >> 5), each: u64::from((op >> 1) & 0xf) };
            if tag.each == 0 {
                u.written_kept(tag, &[op]);
            } else {
                u.written(tag);
            }
            written += 1;
        } else {
            let (n, tail) = rest.split_at(rest.len().min(8));
            rest = tail;
            let mut b = [0u8; 8];
            b[..n.len()].copy_from_slice(n);
            u.ack(u64::from_le_bytes(b));
        }
    }
    let (owed, frames) = u.take();
    assert!(frames <= written, "{frames} frames left of {written} written");
    let kept = u.take_orphans();
    assert!(kept.len() as u64 <= frames, "{} copies handed back for {frames} frames", kept.len());
    assert!(kept.iter().all(|m| m.len() == 1 && (m[0] >> 1) & 0xf == 0), "a copy of another frame");
    let events: u64 = owed.iter().map(|(_, c)| c).sum();
    assert!(events <= frames * 15, "{events} events owed for {frames} frames");
    parsed
}

// ---------------------------------------------------------------------------------------
// Rings

/// The other side of a ring broke the protocol (`ring::Corrupt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt;

impl From<ring::Corrupt> for Corrupt {
    fn from(_: ring::Corrupt) -> Self {
        Corrupt
    }
}

/// Size of a ring header; the data area follows it.
pub const RING_HEADER_SIZE: usize = layout::RING_HEADER_SIZE;
/// Size of a record header.
pub const RECORD_HEADER_SIZE: usize = ring::REC_HDR;
/// Records start at multiples of this many bytes; a ring's capacity is at least this.
pub const RECORD_ALIGN: usize = ring::REC_ALIGN;

/// The bytes of a record header as a producer writes them for a record at position `pos`:
/// the commit stamp (`!pos`), then `len` and `flags` (all little-endian).
pub fn record_header(pos: u64, len: u32, flags: u32) -> [u8; RECORD_HEADER_SIZE] {
    let mut h = [0u8; RECORD_HEADER_SIZE];
    h[..8].copy_from_slice(&(!pos).to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..].copy_from_slice(&flags.to_le_bytes());
    h
}
/// Record flag: first record of a message.
pub const RECORD_FIRST: u32 = ring::FIRST;
/// Record flag: last record of a message.
pub const RECORD_LAST: u32 = ring::LAST;
/// Byte offset of the producer's `write_pos` in a ring header.
pub const WRITE_POS: usize = offset_of!(RingHeader, producer) + offset_of!(ProducerLine, write_pos);
/// Byte offset of the producer's `lost` counter.
pub const LOST: usize = offset_of!(RingHeader, producer) + offset_of!(ProducerLine, lost);
/// Byte offset of the producer's `published` counter.
pub const PUBLISHED: usize = offset_of!(RingHeader, producer) + offset_of!(ProducerLine, published);
/// Byte offset of the producer's `want_space` flag (a u32).
pub const WANT_SPACE: usize = offset_of!(RingHeader, producer) + offset_of!(ProducerLine, want_space);
/// Byte offset of the consumer's `read_pos`.
pub const READ_POS: usize = offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, read_pos);
/// Byte offset of the consumer's `consumed` counter.
pub const CONSUMED: usize = offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, consumed);
/// Byte offset of the consumer's `lost_seen` counter.
pub const LOST_SEEN: usize = offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, lost_seen);

/// One ring (header + `cap` data bytes) in private heap memory laid out as in the region:
/// one allocation of exactly `RING_HEADER_SIZE + cap` bytes, so a sanitizer catches any
/// access past the data area. Zeroed at creation.
pub struct RingMemory {
    base: NonNull<u8>,
    layout: Layout,
    cap: usize,
}

impl RingMemory {
    /// `None` unless `cap` is a power of two >= [`RECORD_ALIGN`] (the library computes
    /// capacities in private memory and never builds a ring otherwise).
    pub fn new(cap: usize) -> Option<Self> {
        if !cap.is_power_of_two() || cap < RECORD_ALIGN {
            return None;
        }
        let layout = Layout::from_size_align(RING_HEADER_SIZE.checked_add(cap)?, 128).ok()?;
        // SAFETY: the layout has a non-zero size (at least RING_HEADER_SIZE).
        let base = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(RingMemory { base, layout, cap })
    }

    /// Data capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Total size (header + data).
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Never true (a ring has at least its header); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Overwrite bytes at `offset` (0 is the start of the header, `RING_HEADER_SIZE` the
    /// start of the data area), as a hostile or crashed peer could at any time. Bytes past
    /// the end are ignored.
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        let n = self.len().saturating_sub(offset).min(bytes.len());
        // SAFETY: [offset, offset + n) lies inside the allocation. No reference into the
        // memory is alive during the copy: producers and consumers keep raw pointers and
        // only form short-lived references inside their own methods, and this type is not
        // Sync, so no other thread runs them now.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.as_ptr().add(offset), n) };
    }

    /// Read a little-endian u64 at `offset` (must be within the memory).
    pub fn read_u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(offset + 8 <= self.len(), "read_u64 past the ring");
        // SAFETY: in bounds (asserted); no reference into the memory is alive (see `write`).
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), b.as_mut_ptr(), 8) };
        u64::from_le_bytes(b)
    }

    fn raw(&self) -> RawRing {
        // SAFETY: RING_HEADER_SIZE < len, so the data pointer stays inside the allocation.
        let data = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(RING_HEADER_SIZE)) };
        RawRing { hdr: self.base.cast(), data, cap: self.cap }
    }

    /// `ring::Consumer::new` over this memory.
    ///
    /// # Errors
    /// The stored positions are impossible.
    pub fn consumer(&self) -> Result<RingConsumer<'_>, Corrupt> {
        RingConsumer::new(self.raw())
    }

    /// `ring::Producer::new` over this memory.
    ///
    /// # Errors
    /// The stored positions are impossible.
    pub fn producer(&self) -> Result<RingProducer<'_>, Corrupt> {
        RingProducer::new(self.raw())
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout; every consumer and producer
        // borrows `self`, so none outlives the memory.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

/// A record found by [`RingConsumer::peek`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Body length.
    pub len: usize,
    /// `RECORD_FIRST` / `RECORD_LAST` bits.
    pub flags: u32,
}

/// The reading end of a ring (`ring::Consumer`), borrowing the ring's memory.
pub struct RingConsumer<'m> {
    inner: ring::Consumer,
    /// What the last `peek` returned, until consumed: `consume` needs it.
    peeked: Option<ring::RecordInfo>,
    _mem: PhantomData<&'m ()>,
}

impl RingConsumer<'_> {
    fn new(raw: RawRing) -> Result<Self, Corrupt> {
        Ok(RingConsumer { inner: ring::Consumer::new(raw)?, peeked: None, _mem: PhantomData })
    }

    /// `Consumer::has_data`.
    pub fn has_data(&mut self) -> bool {
        self.inner.has_data()
    }

    /// `Consumer::peek`: the next committed record, if any.
    ///
    /// # Errors
    /// The producer's position or the record header is impossible.
    pub fn peek(&mut self) -> Result<Option<Record>, Corrupt> {
        self.peeked = None;
        let info = self.inner.peek()?;
        self.peeked = info;
        Ok(info.map(|i| Record { len: i.len, flags: i.flags }))
    }

    /// `Consumer::consume` of the record the last `peek` returned: its body in a buffer of
    /// exactly its length (`keep`), or discarded. `None` when no peeked record is pending.
    pub fn consume(&mut self, keep: bool) -> Option<Option<Vec<u8>>> {
        let info = self.peeked.take()?;
        if !keep {
            // SAFETY: `info` is what the last peek returned, and nothing moved the consumer
            // since (every other method clears `peeked`).
            unsafe { self.inner.consume(info, None) };
            return Some(None);
        }
        let mut body = Vec::<u8>::with_capacity(info.len);
        // SAFETY: as above for `info`; `body` has room for info.len bytes, which `consume`
        // writes entirely before `set_len` exposes them.
        unsafe {
            self.inner.consume(info, Some(body.as_mut_ptr()));
            body.set_len(info.len);
        }
        Some(Some(body))
    }

    /// `Consumer::quarantine` (after `Corrupt`; the name is kept for the fuzz targets):
    /// the ring reads as empty until its producer writes again.
    pub fn skip_all(&mut self) {
        self.peeked = None;
        self.inner.quarantine();
    }

    /// `Consumer::release`: true when the producer asked to be woken.
    pub fn release(&mut self) -> bool {
        self.inner.release()
    }

    /// `Consumer::take_lost`.
    pub fn take_lost(&mut self) -> u64 {
        self.inner.take_lost()
    }

    /// `Consumer::depth`.
    pub fn depth(&self) -> u64 {
        self.inner.depth()
    }
}

/// The writing end of a ring (`ring::Producer`), borrowing the ring's memory.
pub struct RingProducer<'m> {
    inner: ring::Producer,
    _mem: PhantomData<&'m ()>,
}

impl RingProducer<'_> {
    fn new(raw: RawRing) -> Result<Self, Corrupt> {
        Ok(RingProducer { inner: ring::Producer::new(raw)?, _mem: PhantomData })
    }

    /// `Producer::refresh`: free bytes after re-reading the consumer's position.
    ///
    /// # Errors
    /// The consumer's position is impossible.
    pub fn refresh(&mut self) -> Result<usize, Corrupt> {
        Ok(self.inner.refresh()?)
    }

    /// `Producer::max_body`.
    pub fn max_body(&self) -> usize {
        self.inner.max_body()
    }

    /// `Producer::body_room`.
    ///
    /// # Errors
    /// The consumer's position is impossible.
    pub fn body_room(&mut self, want: usize) -> Result<usize, Corrupt> {
        Ok(self.inner.body_room(want)?)
    }

    /// `Producer::try_write`: append one uncommitted record; false when it does not fit.
    ///
    /// # Errors
    /// The consumer's position is impossible.
    pub fn try_write(&mut self, flags: u32, parts: &[&[u8]]) -> Result<bool, Corrupt> {
        Ok(self.inner.try_write(flags, parts)?)
    }

    /// `Producer::commit`.
    pub fn commit(&mut self) -> bool {
        self.inner.commit()
    }

    /// `Producer::request_space`.
    ///
    /// # Errors
    /// The consumer's position is impossible.
    pub fn request_space(&mut self, want: usize) -> Result<usize, Corrupt> {
        Ok(self.inner.request_space(want)?)
    }

    /// `Producer::add_lost`.
    pub fn add_lost(&mut self, n: u64) {
        self.inner.add_lost(n)
    }

    /// `Producer::depth`.
    pub fn depth(&self) -> u64 {
        self.inner.depth()
    }
}

// ---------------------------------------------------------------------------------------
// Shared region

/// Where everything is in a region (`layout::Geometry`), from the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry(layout::Geometry);

impl Geometry {
    /// `Geometry::new`. Parameters are not validated: keep them small (the options
    /// validation of the library bounds them).
    pub fn new(workers: u32, agent: bool, ring_capacity: usize, unique_capacity: usize) -> Self {
        Geometry(layout::Geometry::new(workers, agent, ring_capacity, unique_capacity))
    }

    /// Size of the region in bytes.
    pub fn region_size(&self) -> usize {
        self.0.region_size
    }

    /// Number of slots (workers plus the agent).
    pub fn slots(&self) -> u32 {
        self.0.slots
    }

    /// Byte offset of the header of ring `producer -> consumer`; `None` for a bad slot.
    pub fn ring_offset(&self, producer: u32, consumer: u32) -> Option<usize> {
        (producer < self.0.slots && consumer < self.0.slots).then(|| self.0.ring_offset(producer, consumer))
    }

    /// Byte offset of the dedup table.
    pub fn dedup_offset(&self) -> usize {
        self.0.dedup_offset
    }
}

/// A mapped shared region (`region::Region`).
pub struct Region(region::Region);

impl Region {
    /// `Region::create`: a new sealed memfd with an initialized header.
    ///
    /// # Errors
    /// memfd or mmap failure.
    pub fn create(geo: Geometry, max_payload_len: usize) -> Result<Self, Error> {
        region::Region::create(geo.0, max_payload_len).map(Region)
    }

    /// `Region::open`: map a memfd received from a peer and validate its header against
    /// `expected`.
    ///
    /// # Errors
    /// [`Error::CorruptRegion`] for anything that does not match, or a system error.
    pub fn open(fd: OwnedFd, expected: Geometry) -> Result<Self, Error> {
        region::Region::open(fd, expected.0).map(Region)
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.fd()
    }

    /// The region id read from the header.
    pub fn id(&self) -> u64 {
        self.0.id()
    }

    /// `ring::Consumer::new` on ring `producer -> consumer`; `None` for a bad slot.
    pub fn consumer(&self, producer: u32, consumer: u32) -> Option<Result<RingConsumer<'_>, Corrupt>> {
        let slots = self.0.geometry().slots;
        (producer < slots && consumer < slots).then(|| RingConsumer::new(self.0.ring(producer, consumer)))
    }

    /// `ring::Producer::new` on ring `producer -> consumer`; `None` for a bad slot.
    pub fn producer(&self, producer: u32, consumer: u32) -> Option<Result<RingProducer<'_>, Corrupt>> {
        let slots = self.0.geometry().slots;
        (producer < slots && consumer < slots).then(|| RingProducer::new(self.0.ring(producer, consumer)))
    }

    /// The region's dedup table: `check_and_record` of `hash` (tagged with the region's
    /// SipHash key) at `now_ns`.
    pub fn dedup_check(&self, hash: &[u8], now_ns: u64, ttl_ns: u64) -> DedupCheck {
        self.0.dedup().check_and_record(dedup::tag(self.0.sip_key(), hash), now_ns, ttl_ns).into()
    }
}

// ---------------------------------------------------------------------------------------
// Dedup table

/// Result of a dedup lookup (`dedup::Check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupCheck {
    /// Recorded now.
    New,
    /// Live entry found.
    Duplicate,
    /// No free entry in the probe window.
    Full,
}

impl From<dedup::Check> for DedupCheck {
    fn from(c: dedup::Check) -> Self {
        match c {
            dedup::Check::New => DedupCheck::New,
            dedup::Check::Duplicate => DedupCheck::Duplicate,
            dedup::Check::Full => DedupCheck::Full,
        }
    }
}

/// Entries examined per lookup.
pub const DEDUP_MAX_PROBE: usize = dedup::MAX_PROBE;

/// `dedup::tag`: the 128-bit tag of a unique hash under `key`.
pub fn dedup_tag(key: (u64, u64), hash: &[u8]) -> (u64, u64) {
    dedup::tag(key, hash)
}

/// A dedup table (`dedup::DedupTable`) in private memory, zeroed at creation.
pub struct DedupTable(Vec<dedup::DedupEntry>);

impl DedupTable {
    /// `None` unless `buckets` is a power of two >= `DEDUP_MAX_PROBE`.
    pub fn new(buckets: usize) -> Option<Self> {
        if !buckets.is_power_of_two() || buckets < DEDUP_MAX_PROBE {
            return None;
        }
        let entries = (0..buckets).map(|_| dedup::DedupEntry::vacant()).collect();
        Some(DedupTable(entries))
    }

    /// Overwrite entry `i % buckets` with `(tag_lo, tag_hi, expires_ns)`, as a previous
    /// broker (or a stray write) could have left it.
    pub fn set_entry(&mut self, i: usize, tag_lo: u64, tag_hi: u64, expires_ns: u64) {
        let n = self.0.len();
        let e = &mut self.0[i % n];
        *e.tag_lo.get_mut() = tag_lo;
        *e.tag_hi.get_mut() = tag_hi;
        *e.expires_ns.get_mut() = expires_ns;
    }

    /// `DedupTable::check_and_record`.
    pub fn check_and_record(&mut self, tag: (u64, u64), now_ns: u64, ttl_ns: u64) -> DedupCheck {
        let entries = NonNull::new(self.0.as_mut_ptr()).expect("Vec pointers are non-null");
        // SAFETY: `entries` points to self.0.len() entries (a power of two >= MAX_PROBE,
        // checked in `new`), which outlive the view: it is dropped at the end of this call,
        // while `self` is mutably borrowed.
        let table = unsafe { dedup::DedupTable::new(entries, self.0.len()) };
        table.check_and_record(tag, now_ns, ttl_ns).into()
    }
}

// ---------------------------------------------------------------------------------------
// The whole receive loop

mod receive_loop;
pub use receive_loop::{Delivered, Notices, ReceiveLoop};

// ---------------------------------------------------------------------------------------
// The broadcast ring (not yet used by the transport)

mod mcast;
pub use mcast::{McastConsumer, McastProducer, McastRing, mcast_max_body, mcast_ring_bytes};
