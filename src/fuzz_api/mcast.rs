//! The broadcast ring (`ring::mcast`) for `benches/broadcast.rs`: a producer and readers over
//! memory the caller maps (the bench shares a memfd between its processes).

use std::ptr::NonNull;

use super::Corrupt;
use crate::ring::mcast;

/// Bytes of a broadcast ring with `readers` cursors and a `cap`-byte data area.
pub fn mcast_ring_bytes(readers: usize, cap: usize) -> usize {
    mcast::ring_bytes(readers, cap)
}

/// Largest body a record of a `cap`-byte broadcast ring carries (a quarter of the ring).
pub fn mcast_max_body(cap: usize) -> usize {
    mcast::max_body(cap)
}

/// A broadcast ring over caller-provided shared memory (`ring::mcast::RawMcast`).
#[derive(Clone, Copy)]
pub struct McastRing(mcast::RawMcast);

impl McastRing {
    /// A view over the ring at `base`; `None` unless `base` is 128-aligned and non-null and
    /// `cap` a power of two >= 256.
    ///
    /// # Safety
    /// `base` must be valid for [`mcast_ring_bytes`]`(readers, cap)` bytes for as long as the
    /// view and everything built from it is used, and every process must access that memory
    /// only through this API (zeroed memory is an empty ring).
    pub unsafe fn from_raw(base: *mut u8, readers: usize, cap: usize) -> Option<Self> {
        let base = NonNull::new(base)?;
        if base.as_ptr() as usize % 128 != 0 || !cap.is_power_of_two() || cap < mcast::MIN_CAPACITY {
            return None;
        }
        // SAFETY: checked alignment and capacity; validity is the caller's promise.
        Some(McastRing(unsafe { mcast::RawMcast::from_base(base, readers, cap) }))
    }

    /// The `next_seq` reader `idx` last stored with its cursor (messages it has delivered or
    /// lost, as of its last release); `None` for a bad index.
    pub fn reader_next_seq(&self, idx: usize) -> Option<u64> {
        (idx < self.0.readers()).then(|| self.0.released_seq(idx))
    }

    /// The producer (`Producer::new`: walks from `floor`).
    pub fn producer(&self) -> Result<McastProducer, Corrupt> {
        mcast::Producer::new(self.0).map(McastProducer).map_err(|_| Corrupt)
    }

    /// Reader `idx` (`Consumer::new`: resumes from its cursor).
    pub fn consumer(&self, idx: usize) -> Result<McastConsumer, Corrupt> {
        mcast::Consumer::new(self.0, idx).map(McastConsumer).map_err(|_| Corrupt)
    }
}

/// The writing end of a broadcast ring.
pub struct McastProducer(mcast::Producer);

impl McastProducer {
    /// Publish `body`; its sequence number, or `None` when it is larger than
    /// [`mcast_max_body`]. Never waits (a slow reader is lapped).
    pub fn publish(&mut self, body: &[u8]) -> Option<u64> {
        self.0.publish(body).ok()
    }

    /// Whether publishing a `len`-byte body would lap a reader (for callers that pace).
    pub fn would_lap(&mut self, len: usize) -> bool {
        self.0.would_lap(len)
    }

    /// Messages published so far.
    pub fn published(&self) -> u64 {
        self.0.published()
    }
}

/// One reader of a broadcast ring.
pub struct McastConsumer(mcast::Consumer);

impl McastConsumer {
    /// The next record's body into `buf` and its sequence number; `None` when nothing new.
    ///
    /// # Errors
    /// The ring's shared state is impossible (`Corrupt`).
    pub fn next(&mut self, buf: &mut Vec<u8>) -> Result<Option<u64>, Corrupt> {
        self.0.next(buf).map_err(|_| Corrupt)
    }

    /// Store the cursor (the producer and a successor see the progress).
    pub fn release(&mut self) {
        self.0.release();
    }

    /// Messages lost to laps since the last call.
    pub fn take_lost(&mut self) -> u64 {
        self.0.take_lost()
    }

    /// The sequence number expected next (= messages delivered + lost).
    pub fn next_seq(&self) -> u64 {
        self.0.next_seq()
    }
}
