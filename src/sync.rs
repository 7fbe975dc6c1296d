//! The one place atomics come from.
//!
//! Under `cfg(loom)` every atomic used by the lock-free protocols (the ring positions, the
//! parked flag, the want-space flag) is loom's, so the models in `ring.rs` and `notify.rs`
//! explore every interleaving of the real code. Nothing else in the crate may import
//! `std::sync::atomic` directly.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
