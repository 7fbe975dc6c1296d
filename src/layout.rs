//! Every type that lives in the shared region, `#[repr(C)]`, mirroring `shm-layout.md`
//! byte for byte (compile-time size and offset asserts at the bottom).
//!
//! Every word another process may write is an atomic, so a `&` to these types never aliases
//! plain memory that changes underneath it. Nothing read from here is trusted: sizes and
//! offsets used for addressing come from [`Geometry`], computed in private memory from the
//! options and compared with the header on attach.

use crate::event::Wid;
use crate::sync::{AtomicU32, AtomicU64};

/// `b"WKEVENTS"` read as a little-endian u64.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"WKEVENTS");
/// Bumped on any change of this file or of the record formats.
pub(crate) const LAYOUT_VERSION: u32 = 8;
/// Size of [`RegionHeader`].
pub(crate) const HEADER_SIZE: usize = 256;
/// Size of [`SlotHeader`].
pub(crate) const SLOT_SIZE: usize = 128;
/// Size of [`RingHeader`]; the ring's data area follows it.
pub(crate) const RING_HEADER_SIZE: usize = 256;
/// Sections start on page boundaries.
pub(crate) const PAGE: usize = 4096;

/// Region header at offset 0. Written once by the creating broker (layout words) and then
/// by brokers only (the broker line). `layout_version` is stored last, with Release.
#[repr(C, align(128))]
pub(crate) struct RegionHeader {
    pub magic: AtomicU64,
    pub layout_version: AtomicU32,
    pub header_size: AtomicU32,
    pub region_size: AtomicU64,
    /// Random id of this region instance (a new broker with a new region gets a new id).
    pub region_id: AtomicU64,
    pub slots: AtomicU32,
    pub workers: AtomicU32,
    /// Bit 0: a privileged-agent slot exists (it is slot `workers`).
    pub flags: AtomicU32,
    pub ring_capacity: AtomicU32,
    pub slots_offset: AtomicU64,
    pub rings_offset: AtomicU64,
    pub ring_stride: AtomicU64,
    pub dedup_offset: AtomicU64,
    pub dedup_capacity: AtomicU64,
    pub sip_key: [AtomicU64; 2],
    pub max_payload_len: AtomicU32,
    pub creator_pid: AtomicU32,
    /// Unique events dropped as duplicates, by any publisher (fetch_add, Relaxed).
    pub unique_duplicates: AtomicU64,
    /// Unique events delivered unrecorded (full window), by any publisher.
    pub unique_unrecorded: AtomicU64,
    // ---- second cache line: broker state (changes on election) ----
    pub broker_epoch: AtomicU64,
    pub broker_pid: AtomicU32,
    pub broker_slot: AtomicU32,
    /// CLOCK_MONOTONIC nanoseconds of the serving broker's last heartbeat (it stores one at
    /// least every `BEAT_INTERVAL` while it serves); a worker that finds it older than
    /// `STUCK_AFTER` takes the role over by a compare-and-swap on this word, then a new epoch
    /// (see `control/election.rs`).
    pub broker_heartbeat: AtomicU64,
    /// Data bytes of each slot's broadcast ring (0: the region has none, the per-pair
    /// topology alone), where the first one starts, and the distance between two.
    pub bcast_capacity: AtomicU64,
    pub bcast_offset: AtomicU64,
    pub bcast_stride: AtomicU64,
    pub _reserved2: [AtomicU64; 10],
}

/// Per-slot state. Written by the slot's owner (`parked`, `state`, `pid`, `generation`).
#[repr(C, align(128))]
pub(crate) struct SlotHeader {
    /// 1 while the owner sleeps (or is armed for an external poller); a publisher that sees
    /// 1 after committing swaps it to 0 and writes the slot's eventfd.
    pub parked: AtomicU32,
    /// 0 (never attached), [`SLOT_ATTACHED`] or [`SLOT_DETACHED`].
    pub state: AtomicU32,
    pub pid: AtomicU32,
    /// Set to 1 by a peer that queued a control frame for this slot: a publisher that sent
    /// the broker (this slot) a unique event, or the broker that acknowledged this slot's
    /// unique events. A busy-polling owner checks it instead of making a system call per
    /// dispatch (`Region::set_control_hint` / `take_control_hint`).
    pub ctl_pending: AtomicU32,
    /// Number of attaches of this slot so far.
    pub generation: AtomicU64,
    /// Wake-ups written to this slot's eventfd, by every publisher (Relaxed `fetch_add`
    /// right after the write; statistics for the inspector, never trusted for anything).
    pub wakeups: AtomicU64,
    pub _reserved: [AtomicU64; 12],
}

/// Slot attached by a live (or crashed, not yet replaced) process.
pub(crate) const SLOT_ATTACHED: u32 = 1;
/// Slot detached cleanly.
pub(crate) const SLOT_DETACHED: u32 = 2;

/// Producer-owned cache line of a ring. Separate 128-byte lines keep the producer's stores
/// from invalidating the line the consumer writes, and vice versa (adjacent-line prefetch
/// pairs 64-byte lines on x86, hence 128).
#[repr(C, align(128))]
pub(crate) struct ProducerLine {
    /// A recent committed end (a hint since version 3: records are committed by the stamp in
    /// their own header). Stored every quarter ring; never past the committed end.
    pub write_pos: AtomicU64,
    /// Events the producer dropped for this consumer (its backlog overflowed).
    pub lost: AtomicU64,
    /// Messages written up to `write_pos` (statistics; stored with the hint).
    pub published: AtomicU64,
    /// 1 while the producer waits for space (it has a backlog for this ring).
    pub want_space: AtomicU32,
    pub _pad: AtomicU32,
    /// What the producer owes this consumer from its private backlog (messages that have
    /// not fit into the ring yet): `incarnation << 32 | started << 31 | count`, stored by
    /// the producer whenever its backlog for this ring changes; taken (count cleared by a
    /// compare-and-swap) by whoever finds the producer dead, who reports `count` lost
    /// (`src/ring/owed.rs`).
    pub owed: AtomicU64,
    pub _reserved: [AtomicU64; 11],
}

/// Consumer-owned cache line of a ring.
#[repr(C, align(128))]
pub(crate) struct ConsumerLine {
    /// Bytes ever consumed; Release-stored after a record has been copied out.
    pub read_pos: AtomicU64,
    /// Messages ever consumed.
    pub consumed: AtomicU64,
    /// Value of the producer's `lost` already reported to this consumer's callbacks.
    pub lost_seen: AtomicU64,
    pub _reserved: [AtomicU64; 13],
}

// ---- The broadcast ring of `ring/mcast.rs` (the per-publisher topology, one per slot when
// `Options::broadcast_capacity` is set) ----

/// Size of a broadcast ring's producer line and of each cursor line: a ring of `r` readers
/// and a `cap`-byte data area is `MCAST_LINE * (1 + r) + cap` bytes (`ring/mcast.rs`).
pub(crate) const MCAST_LINE: usize = 128;

/// The producer's line: the only word readers poll besides the records.
#[repr(C, align(128))]
pub(crate) struct McastProducerLine {
    /// Position of the oldest intact record (0 until the first lap). Stored before anything
    /// below it is overwritten, followed by a Release fence.
    pub floor: AtomicU64,
    /// The whole sequence number of the record at `floor` (records carry its low half),
    /// stored (Relaxed) right before `floor`; read by a restarted producer only.
    pub floor_seq: AtomicU64,
    pub _reserved: [AtomicU64; 14],
}

/// Reader `i`'s cursor line; only that reader writes it.
#[repr(C, align(128))]
pub(crate) struct CursorLine {
    /// Position of the next record to read (a record boundary); Release-stored per batch.
    pub read_pos: AtomicU64,
    /// Sequence number expected at `read_pos`, stored (Relaxed) before it.
    pub next_seq: AtomicU64,
    /// Messages this reader lost to laps, cumulative (statistics).
    pub lost: AtomicU64,
    /// Times this reader was lapped (statistics).
    pub laps: AtomicU64,
    pub _reserved: [AtomicU64; 12],
}

/// Entries a dedup lookup examines (its probe window); also the smallest table.
pub(crate) const DEDUP_MAX_PROBE: usize = 32;
/// Bytes per [`DedupEntry`].
pub(crate) const DEDUP_ENTRY_SIZE: usize = 32;

/// One entry of the unique-event dedup table (the claim protocol is in `dedup.rs`).
/// `tag_lo`, `tag_hi` and `expires_ns` are written only by the claimer that moved `state`
/// to `BUSY`, and read only while `state` says `CLAIMED` or `LIVE`.
#[repr(C, align(32))]
pub(crate) struct DedupEntry {
    pub tag_lo: AtomicU64,
    pub tag_hi: AtomicU64,
    /// CLOCK_MONOTONIC nanoseconds after which a `LIVE` entry is free.
    pub expires_ns: AtomicU64,
    /// `stamp << 2 | kind` (kind: 0 free, 1 busy, 2 claimed, 3 live); 0 = never used.
    pub state: AtomicU64,
}

impl DedupEntry {
    /// A never-used entry (tag 0), for tables outside the shared region.
    pub(crate) fn vacant() -> DedupEntry {
        DedupEntry {
            tag_lo: AtomicU64::new(0),
            tag_hi: AtomicU64::new(0),
            expires_ns: AtomicU64::new(0),
            state: AtomicU64::new(0),
        }
    }
}

/// Dedup buckets for a requested number of live hashes: a power of two, at least twice the
/// capacity and at least one probe window.
pub(crate) fn dedup_buckets_for(unique_capacity: usize) -> usize {
    (unique_capacity * 2).next_power_of_two().max(DEDUP_MAX_PROBE)
}

/// Header of one SPSC ring; `ring_capacity` data bytes follow it.
#[repr(C)]
pub(crate) struct RingHeader {
    pub producer: ProducerLine,
    pub consumer: ConsumerLine,
    /// Loom models only: the ring's data area as atomics (up to 256 bytes), so the models
    /// see the ordering of record stamps and bodies.
    #[cfg(loom)]
    pub model_data: Box<[AtomicU64]>,
}

#[cfg(all(test, loom))]
impl RingHeader {
    /// A zeroed header in private memory, for the loom models.
    pub(crate) fn new_for_model() -> Self {
        fn z64() -> AtomicU64 {
            AtomicU64::new(0)
        }
        RingHeader {
            producer: ProducerLine {
                write_pos: z64(),
                lost: z64(),
                published: z64(),
                want_space: AtomicU32::new(0),
                _pad: AtomicU32::new(0),
                owed: z64(),
                _reserved: std::array::from_fn(|_| z64()),
            },
            consumer: ConsumerLine {
                read_pos: z64(),
                consumed: z64(),
                lost_seen: z64(),
                _reserved: std::array::from_fn(|_| z64()),
            },
            model_data: (0..32).map(|_| z64()).collect(),
        }
    }
}

/// Where everything is, computed in private memory from the options. Every address used
/// to touch the region comes from here, never from the region itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub slots: u32,
    pub workers: u32,
    pub agent: bool,
    pub ring_capacity: usize,
    pub slots_offset: usize,
    pub rings_offset: usize,
    pub ring_stride: usize,
    pub dedup_offset: usize,
    pub dedup_capacity: usize,
    /// Data bytes of each slot's broadcast ring; 0: none.
    pub bcast_capacity: usize,
    pub bcast_offset: usize,
    pub bcast_stride: usize,
    pub region_size: usize,
}

const fn align_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}

impl Geometry {
    #[cfg_attr(not(any(test, feature = "fuzzing")), allow(dead_code))]
    pub(crate) fn new(workers: u32, agent: bool, ring_capacity: usize, unique_capacity: usize) -> Geometry {
        Self::with_broadcast(workers, agent, ring_capacity, unique_capacity, 0)
    }

    /// [`Geometry::new`] with a broadcast ring of `bcast_capacity` data bytes per slot
    /// (0: none), placed after the per-pair rings.
    pub(crate) fn with_broadcast(
        workers: u32,
        agent: bool,
        ring_capacity: usize,
        unique_capacity: usize,
        bcast_capacity: usize,
    ) -> Geometry {
        let slots = workers + u32::from(agent);
        let s = slots as usize;
        let slots_offset = HEADER_SIZE;
        let rings_offset = align_up(slots_offset + s * SLOT_SIZE, PAGE);
        let ring_stride = RING_HEADER_SIZE + ring_capacity;
        let rings_end = rings_offset + s * s * ring_stride;
        let bcast_offset = align_up(rings_end, PAGE);
        let bcast_stride = if bcast_capacity == 0 { 0 } else { align_up(MCAST_LINE * (1 + s) + bcast_capacity, PAGE) };
        let dedup_offset = align_up(bcast_offset + s * bcast_stride, PAGE);
        let dedup_capacity = dedup_buckets_for(unique_capacity);
        let region_size = align_up(dedup_offset + dedup_capacity * DEDUP_ENTRY_SIZE, PAGE);
        Geometry {
            slots,
            workers,
            agent,
            ring_capacity,
            slots_offset,
            rings_offset,
            ring_stride,
            dedup_offset,
            dedup_capacity,
            bcast_capacity,
            bcast_offset: if bcast_capacity == 0 { 0 } else { bcast_offset },
            bcast_stride,
            region_size,
        }
    }

    /// Offset of the broadcast ring of `slot` (the region has them: `bcast_capacity > 0`).
    pub(crate) fn bcast_ring_offset(&self, slot: u32) -> usize {
        debug_assert!(slot < self.slots && self.bcast_capacity > 0);
        self.bcast_offset + slot as usize * self.bcast_stride
    }

    /// Offset of the slot header of `slot` (< `slots`).
    pub(crate) fn slot_offset(&self, slot: u32) -> usize {
        debug_assert!(slot < self.slots);
        self.slots_offset + slot as usize * SLOT_SIZE
    }

    /// The worker id of `slot`: the privileged agent is the slot after the workers.
    pub(crate) fn wid_of(&self, slot: u32) -> Wid {
        if self.agent && slot == self.workers { Wid::PrivilegedAgent } else { Wid::Worker(slot) }
    }

    /// The slot of `wid` (not checked against the geometry).
    pub(crate) fn slot_of(&self, wid: Wid) -> u32 {
        match wid {
            Wid::Worker(i) => i,
            Wid::PrivilegedAgent => self.workers,
        }
    }

    /// Offset of the header of the ring `producer -> consumer`.
    pub(crate) fn ring_offset(&self, producer: u32, consumer: u32) -> usize {
        debug_assert!(producer < self.slots && consumer < self.slots);
        let idx = producer as usize * self.slots as usize + consumer as usize;
        self.rings_offset + idx * self.ring_stride
    }
}

#[cfg(not(loom))]
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RegionHeader>() == HEADER_SIZE);
    assert!(align_of::<RegionHeader>() == 128);
    assert!(offset_of!(RegionHeader, magic) == 0);
    assert!(offset_of!(RegionHeader, layout_version) == 8);
    assert!(offset_of!(RegionHeader, header_size) == 12);
    assert!(offset_of!(RegionHeader, region_size) == 16);
    assert!(offset_of!(RegionHeader, region_id) == 24);
    assert!(offset_of!(RegionHeader, slots) == 32);
    assert!(offset_of!(RegionHeader, workers) == 36);
    assert!(offset_of!(RegionHeader, flags) == 40);
    assert!(offset_of!(RegionHeader, ring_capacity) == 44);
    assert!(offset_of!(RegionHeader, slots_offset) == 48);
    assert!(offset_of!(RegionHeader, rings_offset) == 56);
    assert!(offset_of!(RegionHeader, ring_stride) == 64);
    assert!(offset_of!(RegionHeader, dedup_offset) == 72);
    assert!(offset_of!(RegionHeader, dedup_capacity) == 80);
    assert!(offset_of!(RegionHeader, sip_key) == 88);
    assert!(offset_of!(RegionHeader, max_payload_len) == 104);
    assert!(offset_of!(RegionHeader, broker_heartbeat) == 144);
    assert!(offset_of!(RegionHeader, creator_pid) == 108);
    assert!(offset_of!(RegionHeader, unique_duplicates) == 112);
    assert!(offset_of!(RegionHeader, unique_unrecorded) == 120);
    assert!(offset_of!(RegionHeader, broker_epoch) == 128);
    assert!(offset_of!(RegionHeader, broker_pid) == 136);
    assert!(offset_of!(RegionHeader, broker_slot) == 140);
    assert!(offset_of!(RegionHeader, bcast_capacity) == 152);
    assert!(offset_of!(RegionHeader, bcast_offset) == 160);
    assert!(offset_of!(RegionHeader, bcast_stride) == 168);

    assert!(size_of::<SlotHeader>() == SLOT_SIZE);
    assert!(offset_of!(SlotHeader, parked) == 0);
    assert!(offset_of!(SlotHeader, state) == 4);
    assert!(offset_of!(SlotHeader, pid) == 8);
    assert!(offset_of!(SlotHeader, ctl_pending) == 12);
    assert!(offset_of!(SlotHeader, generation) == 16);

    assert!(size_of::<RingHeader>() == RING_HEADER_SIZE);
    assert!(offset_of!(RingHeader, producer) == 0);
    assert!(offset_of!(RingHeader, consumer) == 128);
    assert!(offset_of!(ProducerLine, write_pos) == 0);
    assert!(offset_of!(ProducerLine, lost) == 8);
    assert!(offset_of!(ProducerLine, published) == 16);
    assert!(offset_of!(ProducerLine, want_space) == 24);
    assert!(offset_of!(ProducerLine, owed) == 32);
    assert!(offset_of!(ConsumerLine, read_pos) == 0);
    assert!(offset_of!(ConsumerLine, consumed) == 8);
    assert!(offset_of!(ConsumerLine, lost_seen) == 16);

    assert!(size_of::<DedupEntry>() == DEDUP_ENTRY_SIZE);
    assert!(offset_of!(DedupEntry, tag_lo) == 0);
    assert!(offset_of!(DedupEntry, tag_hi) == 8);
    assert!(offset_of!(DedupEntry, expires_ns) == 16);
    assert!(offset_of!(DedupEntry, state) == 24);
};

#[cfg(not(loom))]
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<McastProducerLine>() == 128 && align_of::<McastProducerLine>() == 128);
    assert!(size_of::<CursorLine>() == 128 && align_of::<CursorLine>() == 128);
    assert!(offset_of!(McastProducerLine, floor) == 0);
    assert!(offset_of!(McastProducerLine, floor_seq) == 8);
    assert!(offset_of!(CursorLine, read_pos) == 0);
    assert!(offset_of!(CursorLine, next_seq) == 8);
    assert!(offset_of!(CursorLine, lost) == 16);
    assert!(offset_of!(CursorLine, laps) == 24);
};

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn default_sizing_fits_64_mib_for_16_workers() {
        let g = Geometry::new(16, false, crate::options::DEFAULT_RING_CAPACITY, 65_536);
        assert!(g.region_size <= 64 << 20, "{}", g.region_size);
        let g = Geometry::new(16, true, crate::options::DEFAULT_RING_CAPACITY, 65_536);
        assert!(g.region_size <= 64 << 20, "{}", g.region_size);
    }

    #[test]
    fn default_sizing_fits_64_mib_for_64_workers() {
        // Issue 10, target P5: the region at 64 workers and default options.
        for agent in [false, true] {
            let o = crate::options::Options::new("/tmp/x.sock").workers(64).enable_privileged_agent(agent);
            let g = Geometry::new(64, agent, o.get_ring_capacity(), o.get_unique_capacity());
            assert!(g.region_size <= 64 << 20, "{}", g.region_size);
        }
    }

    #[test]
    fn rings_do_not_overlap() {
        let g = Geometry::new(3, true, 4096, 64);
        let mut offs: Vec<usize> =
            (0..4).flat_map(|p| (0..4).map(move |c| (p, c))).map(|(p, c)| g.ring_offset(p, c)).collect();
        offs.sort();
        for w in offs.windows(2) {
            assert_eq!(w[1] - w[0], g.ring_stride);
        }
        assert!(offs[0] >= g.slots_offset + 4 * SLOT_SIZE);
        assert!(*offs.last().unwrap() + g.ring_stride <= g.region_size);
        assert_eq!(offs[0] % PAGE, 0);
    }
}
