//! A child's shared-memory region, mapped by the test process through `/proc/<pid>/fd/N`
//! (the memfd), as a hostile or buggy process of the same uid could: the tests of
//! `hostile_ring.rs` scribble ring headers and play a ring's producer with it.
//!
//! Every access goes through atomics on the shared mapping (the child runs concurrently);
//! the addresses come from the region header the library wrote (`shm-layout.md`).

#![allow(clippy::disallowed_types)] // the test process is not the library: std atomics on its own mapping

use std::fs::OpenOptions;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::MmapRaw;

/// Ring header offsets (`shm-layout.md`): the producer's `write_pos`, the consumer's
/// `read_pos`, and the header's size (the data area follows it).
const WRITE_POS: usize = 0;
const READ_POS: usize = 128;
const RING_HEADER_SIZE: usize = 256;
/// Record flags: first and last record of a message.
pub const RECORD_FIRST: u32 = 1;
pub const RECORD_LAST: u32 = 2;

/// The region of one child, mapped read-write.
pub struct ChildRegion {
    map: MmapRaw,
    pub slots: u32,
    pub cap: usize,
    rings_offset: usize,
    ring_stride: usize,
}

impl ChildRegion {
    /// Map the region memfd of process `pid` (panics if it has none).
    pub fn open(pid: u32) -> ChildRegion {
        let dir = format!("/proc/{pid}/fd");
        for e in std::fs::read_dir(&dir).expect("read /proc/<pid>/fd").flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else { continue };
            if !link.to_string_lossy().starts_with("/memfd:worker-events") {
                continue;
            }
            let f = OpenOptions::new().read(true).write(true).open(e.path()).expect("open the memfd through /proc");
            let map = MmapRaw::map_raw(&f).expect("mmap the region");
            let mut r = ChildRegion { map, slots: 0, cap: 0, rings_offset: 0, ring_stride: 0 };
            r.slots = r.u32_at(32).load(Ordering::Acquire);
            r.cap = r.u32_at(44).load(Ordering::Acquire) as usize;
            r.rings_offset = r.u64_at(56).load(Ordering::Acquire) as usize;
            r.ring_stride = r.u64_at(64).load(Ordering::Acquire) as usize;
            assert!(r.cap.is_power_of_two() && r.rings_offset > 0, "region header of pid {pid} looks wrong");
            return r;
        }
        panic!("pid {pid} holds no worker-events memfd");
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off % 8 == 0 && off + 8 <= self.map.len());
        // SAFETY: in bounds and aligned (asserted; the mapping is page-aligned); the mapping
        // lives as long as `self`; shared memory is only accessed through atomics here.
        unsafe { &*self.map.as_mut_ptr().add(off).cast::<AtomicU64>() }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off % 4 == 0 && off + 4 <= self.map.len());
        // SAFETY: as `u64_at`.
        unsafe { &*self.map.as_mut_ptr().add(off).cast::<AtomicU32>() }
    }

    /// The data word at position `pos` (a multiple of 8) of slot `producer`'s broadcast ring
    /// (layout version 7 on: `bcast_capacity` at header offset 152, `bcast_offset` 160,
    /// `bcast_stride` 168; the data area follows the producer line and one cursor line per
    /// slot, 128 bytes each). Panics if the region has no broadcast rings.
    pub fn bcast_data_word(&self, producer: u32, pos: u64) -> &AtomicU64 {
        let cap = self.u64_at(152).load(Ordering::Acquire) as usize;
        let (offset, stride) = (self.u64_at(160).load(Ordering::Acquire), self.u64_at(168).load(Ordering::Acquire));
        assert!(cap.is_power_of_two() && offset > 0 && producer < self.slots, "no broadcast rings");
        let data = offset as usize + producer as usize * stride as usize + 128 * (1 + self.slots as usize);
        self.u64_at(data + ((pos as usize) & (cap - 1) & !7))
    }

    /// The ring `producer -> consumer`.
    pub fn ring(&self, producer: u32, consumer: u32) -> Ring<'_> {
        assert!(producer < self.slots && consumer < self.slots);
        let base = self.rings_offset + (producer * self.slots + consumer) as usize * self.ring_stride;
        Ring { region: self, base, cap: self.cap }
    }
}

/// One ring of a [`ChildRegion`].
pub struct Ring<'a> {
    region: &'a ChildRegion,
    base: usize,
    pub cap: usize,
}

impl Ring<'_> {
    /// The consumer's `read_pos`.
    pub fn read_pos(&self) -> u64 {
        self.region.u64_at(self.base + READ_POS).load(Ordering::Acquire)
    }

    /// Overwrite the consumer's `read_pos`.
    pub fn set_read_pos(&self, v: u64) {
        self.region.u64_at(self.base + READ_POS).store(v, Ordering::Release);
    }

    /// The producer's `write_pos` hint.
    pub fn write_pos(&self) -> u64 {
        self.region.u64_at(self.base + WRITE_POS).load(Ordering::Acquire)
    }

    /// Overwrite the producer's `write_pos` hint.
    pub fn set_write_pos(&self, v: u64) {
        self.region.u64_at(self.base + WRITE_POS).store(v, Ordering::Release);
    }

    /// The data word at position `pos` (any multiple of 8; wrapped into the data area).
    pub fn data_word(&self, pos: u64) -> &AtomicU64 {
        let off = (pos as usize) & (self.cap - 1) & !7;
        self.region.u64_at(self.base + RING_HEADER_SIZE + off)
    }

    /// Write a record header at position `pos`: `len` and `flags`, then `stamp` (Release),
    /// as a producer commits (`!pos` is the valid stamp).
    pub fn put_header(&self, pos: u64, stamp: u64, len: u32, flags: u32) {
        self.data_word(pos + 8).store(u64::from(len) | (u64::from(flags) << 32), Ordering::Relaxed);
        self.data_word(pos).store(stamp, Ordering::Release);
    }
}

/// CPU time (user + system) the process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let rest = st.rsplit(')').next().expect("stat line");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of stat(5); `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    std::time::Duration::from_nanos(ticks * 1_000_000_000 / hz)
}
