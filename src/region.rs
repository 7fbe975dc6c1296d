//! Create, seal, map and validate the shared region (one memfd).
//!
//! The creator (the first broker) sizes the memfd from [`Geometry`], seals it against
//! shrinking and growing (so no peer can make our mapping fault with SIGBUS), initializes
//! the header and stores `layout_version` last, with Release. An attaching process checks
//! size, seals, magic, version and every geometry word against the geometry it computed
//! itself from its options, and refuses any difference with a clear error.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use memmap2::{MmapOptions, MmapRaw};

use crate::dedup::DedupTable;
use crate::error::{Error, Result};
use crate::layout::{
    DEDUP_ENTRY_SIZE, Geometry, HEADER_SIZE, LAYOUT_VERSION, MAGIC, RING_HEADER_SIZE, RegionHeader, SlotHeader,
};
use crate::layout::{SLOT_ATTACHED, SLOT_DETACHED};
use crate::ring::RawRing;
use crate::sync::{AtomicU32, Ordering};
use crate::sys;

/// A slot header as [`Region::slot_view`] read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotView {
    /// Attaches of the slot so far (its `generation` word).
    pub attaches: u64,
    /// Wake-ups written to the slot's eventfd so far (its `wakeups` word).
    pub wakeups: u64,
    /// The owner is parked (asleep, or armed for an external poller): a publisher wakes it.
    pub parked: bool,
}

/// A mapped region. Invariant: `map` is `geo.region_size` bytes, page-aligned, and the memfd
/// behind it is sealed against shrinking, so every offset computed by `geo` stays mapped for
/// the lifetime of `self`.
pub(crate) struct Region {
    map: MmapRaw,
    fd: OwnedFd,
    geo: Geometry,
    id: u64,
}

impl Region {
    /// Create and initialize a new region (broker only).
    ///
    /// The environment variable `WORKER_EVENTS_DISABLE_SHM` (any value) makes this fail as
    /// if memfd were unavailable: the hook the tests use to exercise the socket fallback.
    pub(crate) fn create(geo: Geometry, max_payload_len: usize) -> Result<Region> {
        if std::env::var_os("WORKER_EVENTS_DISABLE_SHM").is_some() {
            let e = std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "shared memory disabled by WORKER_EVENTS_DISABLE_SHM",
            );
            return Err(Error::io("creating the shared region (memfd)", e));
        }
        let fd = sys::memfd_sealed(geo.region_size).map_err(|e| Error::io("creating the shared region (memfd)", e))?;
        let map = map(&fd, geo.region_size)?;
        let region = Region { map, fd, geo, id: sys::random_u64() | 1 };
        let h = region.header();
        let r = Ordering::Relaxed;
        h.magic.store(MAGIC, r);
        h.header_size.store(HEADER_SIZE as u32, r);
        h.region_size.store(geo.region_size as u64, r);
        h.region_id.store(region.id, r);
        h.slots.store(geo.slots, r);
        h.workers.store(geo.workers, r);
        h.flags.store(u32::from(geo.agent), r);
        h.ring_capacity.store(geo.ring_capacity as u32, r);
        h.slots_offset.store(geo.slots_offset as u64, r);
        h.rings_offset.store(geo.rings_offset as u64, r);
        h.ring_stride.store(geo.ring_stride as u64, r);
        h.dedup_offset.store(geo.dedup_offset as u64, r);
        h.dedup_capacity.store(geo.dedup_capacity as u64, r);
        h.bcast_capacity.store(geo.bcast_capacity as u64, r);
        h.bcast_offset.store(geo.bcast_offset as u64, r);
        h.bcast_stride.store(geo.bcast_stride as u64, r);
        h.sip_key[0].store(sys::random_u64(), r);
        h.sip_key[1].store(sys::random_u64(), r);
        h.max_payload_len.store(max_payload_len as u32, r);
        h.creator_pid.store(sys::pid(), r);
        h.layout_version.store(LAYOUT_VERSION, Ordering::Release);
        Ok(region)
    }

    /// Map a region received from a broker and validate it against `expected`.
    pub(crate) fn open(fd: OwnedFd, expected: Geometry) -> Result<Region> {
        Region::open_mapped(fd, expected, false)
    }

    /// [`Region::open`], mapped `PROT_READ` (the live inspector): only the methods that load
    /// may be called on it ([`Region::slot_view`],
    /// [`Region::unique_counters`], [`Region::ring`] through read-only walks,
    /// [`Region::dedup`] through `DedupTable::fill`); a store would fault.
    pub(crate) fn open_read_only(fd: OwnedFd, expected: Geometry) -> Result<Region> {
        Region::open_mapped(fd, expected, true)
    }

    fn open_mapped(fd: OwnedFd, expected: Geometry, read_only: bool) -> Result<Region> {
        let bad = |m: String| Err(Error::CorruptRegion(m));
        let (size, sealed) =
            sys::memfd_size_and_sealed(fd.as_fd()).map_err(|e| Error::io("inspecting the shared region", e))?;
        if !sealed {
            return bad("the region memfd is not sealed against shrinking and growing".into());
        }
        if size < HEADER_SIZE as u64 {
            return bad(format!("region is {size} bytes, smaller than its header"));
        }
        if size != expected.region_size as u64 {
            return bad(format!(
                "region is {size} bytes but these options need {} (the broker runs with different workers, \
                 enable_privileged_agent, ring_capacity or broadcast_capacity)",
                expected.region_size
            ));
        }
        let map = if read_only { map_read_only(&fd, expected.region_size)? } else { map(&fd, expected.region_size)? };
        let region = Region { map, fd, geo: expected, id: 0 };
        let h = region.header();
        let version = h.layout_version.load(Ordering::Acquire);
        let magic = h.magic.load(Ordering::Relaxed);
        if magic != MAGIC {
            return bad(format!("bad magic {magic:#018x}"));
        }
        if version != LAYOUT_VERSION {
            return bad(format!("layout version {version}, this build speaks version {LAYOUT_VERSION}"));
        }
        let r = Ordering::Relaxed;
        let g = &expected;
        let checks: [(&str, u64, u64); 14] = [
            ("header_size", h.header_size.load(r).into(), HEADER_SIZE as u64),
            ("region_size", h.region_size.load(r), g.region_size as u64),
            ("slots", h.slots.load(r).into(), g.slots.into()),
            ("workers", h.workers.load(r).into(), g.workers.into()),
            ("flags", h.flags.load(r).into(), u64::from(g.agent)),
            ("ring_capacity", h.ring_capacity.load(r).into(), g.ring_capacity as u64),
            ("slots_offset", h.slots_offset.load(r), g.slots_offset as u64),
            ("rings_offset", h.rings_offset.load(r), g.rings_offset as u64),
            ("ring_stride", h.ring_stride.load(r), g.ring_stride as u64),
            ("dedup_offset", h.dedup_offset.load(r), g.dedup_offset as u64),
            ("dedup_capacity", h.dedup_capacity.load(r), g.dedup_capacity as u64),
            ("bcast_capacity", h.bcast_capacity.load(r), g.bcast_capacity as u64),
            ("bcast_offset", h.bcast_offset.load(r), g.bcast_offset as u64),
            ("bcast_stride", h.bcast_stride.load(r), g.bcast_stride as u64),
        ];
        for (name, got, want) in checks {
            if got != want {
                return bad(format!(
                    "header field {name} is {got}, expected {want} (options differ from the broker's?)"
                ));
            }
        }
        let id = h.region_id.load(r);
        Ok(Region { id, ..region })
    }

    pub(crate) fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Random id of this region instance.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn at<T>(&self, off: usize) -> NonNull<T> {
        assert!(off + std::mem::size_of::<T>() <= self.geo.region_size);
        // SAFETY: in bounds of the mapping (checked above); the mapping is page-aligned and
        // every offset handed here is a multiple of 128, the alignment of the layout types.
        unsafe { NonNull::new_unchecked(self.map.as_mut_ptr().add(off).cast()) }
    }

    pub(crate) fn header(&self) -> &RegionHeader {
        // SAFETY: offset 0 holds a RegionHeader (all atomics), valid while `self` lives.
        unsafe { self.at::<RegionHeader>(0).as_ref() }
    }

    pub(crate) fn slot(&self, slot: u32) -> &SlotHeader {
        assert!(slot < self.geo.slots);
        // SAFETY: slot headers (all atomics) live at slot_offset(slot) for slot < slots.
        unsafe { self.at::<SlotHeader>(self.geo.slot_offset(slot)).as_ref() }
    }

    /// The `parked` flag of `slot` (the wake handshake of `notify.rs`).
    pub(crate) fn parked_flag(&self, slot: u32) -> &AtomicU32 {
        &self.slot(slot).parked
    }

    /// This process now owns `slot` (it holds the slot lock): not parked, our pid, one
    /// more attach, state attached (Release: the rest is visible before it).
    pub(crate) fn mark_attached(&self, slot: u32) {
        let s = self.slot(slot);
        s.parked.store(0, Ordering::Relaxed);
        s.pid.store(sys::pid(), Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::Relaxed);
        s.state.store(SLOT_ATTACHED, Ordering::Release);
    }

    /// Attaches of `slot` so far (its owner's incarnation, once it has attached).
    pub(crate) fn slot_generation(&self, slot: u32) -> u64 {
        self.slot(slot).generation.load(Ordering::Relaxed)
    }

    /// This process leaves `slot` (before its slot lock goes).
    pub(crate) fn mark_detached(&self, slot: u32) {
        let s = self.slot(slot);
        s.parked.store(0, Ordering::Relaxed);
        s.pid.store(0, Ordering::Relaxed);
        s.state.store(SLOT_DETACHED, Ordering::Release);
    }

    /// Ask `slot` to look at its control sockets now (`ctl_pending`): set on the broker's
    /// slot by a publisher that sent it a unique event, and on a publisher's slot by the
    /// broker that acknowledged its unique events, so a busy-polling process makes no
    /// system call per dispatch to find out.
    pub(crate) fn set_control_hint(&self, slot: u32) {
        if slot < self.geo.slots {
            self.slot(slot).ctl_pending.store(1, Ordering::Release);
        }
    }

    /// Take (clear) `slot`'s control hint; true when it was set.
    pub(crate) fn take_control_hint(&self, slot: u32) -> bool {
        let flag = &self.slot(slot).ctl_pending;
        flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::Acquire) != 0
    }

    /// The broker epoch in the header (fencing: a broker whose epoch is not this one steps
    /// down).
    pub(crate) fn broker_epoch(&self) -> u64 {
        self.header().broker_epoch.load(Ordering::Acquire)
    }

    /// Claim the broker role in the header: a fresh heartbeat, one more epoch (returned),
    /// our slot and pid.
    pub(crate) fn claim_broker(&self, slot: u32) -> u64 {
        let h = self.header();
        h.broker_heartbeat.store(sys::monotonic_ns(), Ordering::Release);
        let epoch = h.broker_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        h.broker_slot.store(slot, Ordering::Relaxed);
        h.broker_pid.store(sys::pid(), Ordering::Release);
        epoch
    }

    /// (serving broker) Store a heartbeat: CLOCK_MONOTONIC nanoseconds `now`.
    pub(crate) fn broker_beat(&self, now: u64) {
        self.header().broker_heartbeat.store(now, Ordering::Release);
    }

    /// The broker's last heartbeat (CLOCK_MONOTONIC nanoseconds; 0: never).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn broker_heartbeat(&self) -> u64 {
        self.header().broker_heartbeat.load(Ordering::Acquire)
    }

    /// Take the broker role over from a broker whose heartbeat is older than `stale_ns` at
    /// `now`: swap the heartbeat from the stale value read to `now` (of several workers that
    /// saw it stale, exactly one wins the swap), then claim the next epoch (which fences the
    /// stale broker). `Some((epoch, stuck))` when we won, `stuck` the slot that was
    /// recorded as the broker's (for the operator's log).
    pub(crate) fn take_over_stale_broker(&self, slot: u32, now: u64, stale_ns: u64) -> Option<(u64, u32)> {
        let h = self.header();
        let beat = h.broker_heartbeat.load(Ordering::Acquire);
        if now.saturating_sub(beat) <= stale_ns {
            return None;
        }
        h.broker_heartbeat.compare_exchange(beat, now, Ordering::AcqRel, Ordering::Relaxed).ok()?;
        let epoch = h.broker_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let stuck = h.broker_slot.swap(slot, Ordering::Relaxed);
        h.broker_pid.store(sys::pid(), Ordering::Release);
        Some((epoch, stuck))
    }

    /// The unique-event dedup table.
    pub(crate) fn dedup(&self) -> DedupTable<'_> {
        let g = &self.geo;
        assert!(g.dedup_offset + g.dedup_capacity * DEDUP_ENTRY_SIZE <= g.region_size);
        // SAFETY: the geometry places `dedup_capacity` entries (a power of two >= MAX_PROBE)
        // at `dedup_offset`, inside the mapping (asserted), which outlives the view as long
        // as the caller keeps `self` alive (the port owns both).
        unsafe { DedupTable::new(self.at(g.dedup_offset), g.dedup_capacity) }
    }

    /// Count one unique event dropped as a duplicate (`duplicate`) or delivered unrecorded
    /// in the region-wide counters (every publisher records its own unique events).
    pub(crate) fn count_unique(&self, duplicate: bool) {
        let h = self.header();
        let c = if duplicate { &h.unique_duplicates } else { &h.unique_unrecorded };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The region-wide unique counters: (duplicates, unrecorded).
    pub(crate) fn unique_counters(&self) -> (u64, u64) {
        let h = self.header();
        (h.unique_duplicates.load(Ordering::Relaxed), h.unique_unrecorded.load(Ordering::Relaxed))
    }

    /// Does slot `slot` say it is attached (a live process, or a crashed one not yet
    /// replaced: the slot lock tells those apart)? Acquire pairs with `mark_attached`.
    pub(crate) fn slot_attached(&self, slot: u32) -> bool {
        slot < self.geo.slots && self.slot(slot).state.load(Ordering::Acquire) == SLOT_ATTACHED
    }

    /// What slot `slot`'s header says (each word loaded once; untrusted: informative only).
    pub(crate) fn slot_view(&self, slot: u32) -> SlotView {
        let s = self.slot(slot);
        SlotView {
            attaches: s.generation.load(Ordering::Relaxed),
            wakeups: s.wakeups.load(Ordering::Relaxed),
            parked: s.parked.load(Ordering::Relaxed) != 0,
        }
    }

    /// Count a wake-up written to `slot`'s eventfd (the inspector's `wakeups`). The caller
    /// has just claimed the slot's `parked` flag, so the line is already in its cache.
    pub(crate) fn count_wakeup(&self, slot: u32) {
        self.slot(slot).wakeups.fetch_add(1, Ordering::Relaxed);
    }

    /// The SipHash key of this region (random, chosen by the creator).
    pub(crate) fn sip_key(&self) -> (u64, u64) {
        let h = self.header();
        (h.sip_key[0].load(Ordering::Relaxed), h.sip_key[1].load(Ordering::Relaxed))
    }

    /// The ring `producer -> consumer`. The view is valid while `self` is alive.
    pub(crate) fn ring(&self, producer: u32, consumer: u32) -> RawRing {
        assert!(producer < self.geo.slots && consumer < self.geo.slots);
        let off = self.geo.ring_offset(producer, consumer);
        RawRing { hdr: self.at(off), data: self.at(off + RING_HEADER_SIZE), cap: self.geo.ring_capacity }
    }

    /// The broadcast ring of `slot` (the region has them: `bcast_capacity > 0`), with one
    /// cursor per slot.
    pub(crate) fn bcast(&self, slot: u32) -> crate::ring::mcast::RawMcast {
        use crate::ring::mcast::LINE;
        assert!(slot < self.geo.slots && self.geo.bcast_capacity > 0);
        let off = self.geo.bcast_ring_offset(slot);
        let readers = self.geo.slots as usize;
        // SAFETY: the ring's ring_bytes(slots, bcast_capacity) bytes lie inside the mapping
        // (the geometry places them, page-aligned, before the dedup table): the producer line,
        // `slots` cursor lines and the data area, each 128-aligned; every process touches them
        // only through `ring::mcast`'s atomics; the mapping outlives the view (`Region` is
        // kept by the port that builds the ring's ends); bcast_capacity is a power of two
        // >= 4096 (validated options).
        unsafe {
            crate::ring::mcast::RawMcast::from_parts(
                self.at(off),
                self.at(off + LINE),
                readers,
                self.at(off + LINE * (1 + readers)),
                self.geo.bcast_capacity,
            )
        }
    }
}

fn map_read_only(fd: &OwnedFd, len: usize) -> Result<MmapRaw> {
    MmapOptions::new()
        .len(len)
        .map_raw_read_only(fd.as_raw_fd())
        .map_err(|e| Error::io("mapping the shared region read-only", e))
}

fn map(fd: &OwnedFd, len: usize) -> Result<MmapRaw> {
    MmapOptions::new().len(len).map_raw(fd.as_raw_fd()).map_err(|e| Error::io("mapping the shared region", e))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn dup(fd: BorrowedFd<'_>) -> OwnedFd {
        fd.try_clone_to_owned().unwrap()
    }

    #[test]
    fn open_accepts_what_create_made() {
        let g = Geometry::new(3, true, 4096, 64);
        let r = Region::create(g, 1024).unwrap();
        let o = Region::open(dup(r.fd()), g).unwrap();
        assert_eq!(o.id(), r.id());
        // Both mappings see the same memory.
        r.slot(2).pid.store(77, Ordering::Relaxed);
        assert_eq!(o.slot(2).pid.load(Ordering::Relaxed), 77);
    }

    #[test]
    fn corrupt_header_is_rejected() {
        let g = Geometry::new(2, false, 4096, 64);
        let r = Region::create(g, 1024).unwrap();
        let expect_err = |needle: &str| {
            let e = Region::open(dup(r.fd()), g).err().expect("must be rejected").to_string();
            assert!(e.contains(needle), "{e}");
        };
        r.header().magic.store(0xdead, Ordering::Relaxed);
        expect_err("bad magic");
        r.header().magic.store(MAGIC, Ordering::Relaxed);
        r.header().layout_version.store(LAYOUT_VERSION + 1, Ordering::Relaxed);
        expect_err("layout version");
        r.header().layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
        r.header().rings_offset.store(12, Ordering::Relaxed);
        expect_err("rings_offset");
        r.header().rings_offset.store(g.rings_offset as u64, Ordering::Relaxed);
        r.header().slots.store(1000, Ordering::Relaxed);
        expect_err("slots");
        r.header().slots.store(g.slots, Ordering::Relaxed);
        assert!(Region::open(dup(r.fd()), g).is_ok());
        // Options that differ from the creator's.
        let other = Geometry::new(3, false, 4096, 64);
        let e = Region::open(dup(r.fd()), other).err().unwrap().to_string();
        assert!(e.contains("different"), "{e}");
    }

    #[test]
    fn a_region_of_an_older_layout_version_is_refused() {
        // Version 3 had no `owed` word: its producers' backlogs would die silently with them,
        // so the mismatch must be refused, and say so (as version 2, which committed records
        // through `write_pos`, was refused by version 3). Version 4 had no `wakeups` count;
        // version 5 started dedup windows on other entries (its publishers would not find
        // the hashes this version records, nor this version theirs); version 6 had no
        // broadcast rings (its workers would neither read nor divert through them); version 7
        // had a 24-byte broadcast record header (its readers would misread every record).
        assert_eq!(LAYOUT_VERSION, 8);
        let g = Geometry::new(2, false, 4096, 64);
        let r = Region::create(g, 1024).unwrap();
        r.header().layout_version.store(3, Ordering::Release);
        let e = Region::open(dup(r.fd()), g).err().expect("must be rejected").to_string();
        assert!(e.contains("layout version 3, this build speaks version 8"), "{e}");
    }

    #[test]
    fn only_a_stale_broker_is_taken_over_and_by_one_worker() {
        let g = Geometry::new(3, false, 4096, 64);
        let r = Region::create(g, 1024).unwrap();
        let o = Region::open(dup(r.fd()), g).unwrap();
        let e1 = r.claim_broker(0);
        let t = r.broker_heartbeat();
        assert!(t > 0);
        assert_eq!(o.take_over_stale_broker(1, t + 500, 1000), None, "fresh heartbeat");
        r.broker_beat(t + 900);
        assert_eq!(o.take_over_stale_broker(1, t + 1500, 1000), None, "beat again");
        let (e2, stuck) = o.take_over_stale_broker(1, t + 2000, 1000).expect("stale: taken over");
        assert_eq!(stuck, 0, "the stuck broker's slot");
        assert_eq!(e2, e1 + 1);
        assert_eq!(r.broker_epoch(), e2, "the old broker sees it is fenced");
        assert_eq!(r.take_over_stale_broker(2, t + 2000, 1000), None, "the winner's heartbeat is fresh");
    }

    #[test]
    fn unsealed_memfd_is_rejected() {
        let g = Geometry::new(1, false, 4096, 64);
        let fd = sys::memfd_unsealed(g.region_size);
        let e = Region::open(fd, g).err().unwrap().to_string();
        assert!(e.contains("sealed"), "{e}");
    }
}
