//! The one place atomics come from.
//!
//! Under `cfg(loom)` every atomic used by the lock-free protocols (the ring positions, the
//! parked flag, the want-space flag) is loom's, so the models in `ring.rs` and `notify.rs`
//! explore every interleaving of the real code. Nothing else in the crate may name
//! `std::sync::atomic`'s types: `clippy.toml` disallows them everywhere, and this module is
//! the one place that allows them. Outside loom the shim's types are `#[repr(transparent)]`
//! wrappers that dereference to std's (same size, alignment and bytes, so the shared layout
//! is unchanged), which is what lets the rule hold for every other file.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std_atomics::{AtomicU32, AtomicU64};

/// A `#[repr(transparent)]` newtype over one of std's atomics that dereferences to it.
macro_rules! shim {
    ($name:ident, $int:ty) => {
        #[doc = concat!("`std::sync::atomic::", stringify!($name), "`, named through the shim.")]
        #[repr(transparent)]
        #[derive(Debug, Default)]
        pub(crate) struct $name(std::sync::atomic::$name);

        impl $name {
            #[allow(dead_code)] // not every width is constructed in private memory
            pub(crate) const fn new(v: $int) -> Self {
                $name(std::sync::atomic::$name::new(v))
            }
        }

        impl std::ops::Deref for $name {
            type Target = std::sync::atomic::$name;
            #[inline(always)]
            fn deref(&self) -> &std::sync::atomic::$name {
                &self.0
            }
        }

        impl std::ops::DerefMut for $name {
            #[inline(always)]
            fn deref_mut(&mut self) -> &mut std::sync::atomic::$name {
                &mut self.0
            }
        }
    };
}

#[cfg(not(loom))]
#[allow(clippy::disallowed_types)]
mod std_atomics {
    shim!(AtomicU32, u32);
    shim!(AtomicU64, u64);

    const _: () = assert!(std::mem::size_of::<AtomicU64>() == 8 && std::mem::align_of::<AtomicU64>() == 8);
    const _: () = assert!(std::mem::size_of::<AtomicU32>() == 4 && std::mem::align_of::<AtomicU32>() == 4);
}

/// Atomics for process-local state that no other process sees and no loom model covers
/// (the fork table in `sys/fork.rs`): always std's, also under `cfg(loom)`, because they
/// live in statics that loom's atomics cannot initialize.
#[allow(clippy::disallowed_types)]
pub(crate) mod process_local {
    shim!(AtomicI32, i32);
    shim!(AtomicU64, u64);
}
