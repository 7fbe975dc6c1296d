//! # worker-events
//!
//! Publish/subscribe between the worker processes of one host — the prefork model of
//! nginx-style proxies — with the semantics of Kong's `lua-resty-events` and without its
//! weaknesses.
//!
//! ## Architecture
//!
//! ```text
//!  worker 0            worker 1            worker 2          (+ privileged agent, optional)
//!    |  \________ SPSC ring 0->1 ________/ |                  one ring per ordered pair
//!    |  \________ SPSC ring 0->2 ________________________/    in ONE sealed memfd region
//!    |<_________ ring 1->0 ____|                              one eventfd per slot
//!    '-- control channel: unix socket at `listening`, served by the elected broker
//! ```
//!
//! * **Fast path, broker-less.** `publish(Target::All)` serializes the event once and copies
//!   it into the ring from the publisher to every other slot; a receiver is woken through
//!   its eventfd only if it is parked (a flag in shared memory), so a busy receiver costs
//!   the publisher no syscall. The publisher's own copy goes to a private queue, in order
//!   with its `Current` events. The broker is not on this path.
//! * **Rings** ([`ring`](crate) internals): variable-length records, one Release store per
//!   commit, cached positions, producer and consumer words on separate 128-byte lines.
//!   Messages larger than a quarter of a ring are streamed in fragments. A ring that is
//!   full keeps the publisher's messages in a bounded private backlog, retried on every
//!   publish/dispatch; the consumer wakes the producer when it frees space.
//! * **Control channel.** The broker (preferred: `broker_id`) is elected with a kernel lock
//!   on `<listening>.lock`; every worker also locks its own slot byte there, so two live
//!   processes can never hold one id. Attaching workers receive the region memfd and all
//!   eventfds over `SCM_RIGHTS` after an `SO_PEERCRED` uid check. Frames are
//!   length-prefixed and survive partial reads.
//! * **No hidden threads.** Everything happens inside [`Worker::dispatch`] /
//!   [`Worker::wait`]; [`Worker`] is `AsFd` for external event loops. [`Events::new`] opens
//!   nothing and is fork-safe.
//!
//! The byte layout of the region is documented in `shm-layout.md` at the repository root.
//!
//! ## Fault model
//!
//! * Every word read from shared memory or a socket is untrusted: positions and lengths are
//!   checked against private state before use, payloads are copied out before rkyv
//!   validates them, a corrupt ring is skipped and counted, a malformed message is
//!   dropped and counted, a bad frame closes that one connection. Nothing another process
//!   sends can make this crate panic or read out of bounds.
//! * A producer killed mid-write leaves nothing visible (its records are not committed);
//!   a receiver that loses events — a backlog overflowed, or a crashed peer left half a
//!   message — gets a `("worker-events", "lost")` notice carrying [`Lost`] on its next
//!   dispatch. Counters are in [`Worker::stats`].
//! * The region is sealed against shrinking, so no peer can make our mapping fault.
//!
//! ## Example
//!
//! ```
//! use std::time::Duration;
//! use worker_events::{Events, Options, Target, Wid};
//!
//! let dir = std::env::temp_dir().join(format!("we-doc-lib-{}", std::process::id()));
//! // In the master, before fork():
//! let events = Events::new(Options::new(dir.join("events.sock")).workers(1)).unwrap();
//! // In each worker:
//! let mut worker = events.init_worker(Wid::Worker(0)).unwrap();
//! worker.subscribe("healthcheck", "*", |ev| {
//!     assert_eq!(ev.event(), "down");
//!     assert_eq!(ev.deserialize::<String>().unwrap(), "10.0.0.7");
//! });
//! worker.publish(Target::All, "healthcheck", "down", &"10.0.0.7".to_string()).unwrap();
//! assert_eq!(worker.wait(Some(Duration::from_secs(1))).unwrap(), 1);
//! # drop(worker); let _ = std::fs::remove_dir_all(dir);
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

mod control;
mod dedup;
mod error;
mod event;
mod events;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz_api;
mod layout;
mod notify;
mod options;
mod region;
mod ring;
mod stats;
mod subs;
mod sync;
mod sys;
mod transport;

pub use error::{Error, PublishError, Result};
pub use event::{Event, Lost, MAX_UNIQUE_HASH_LEN, Payload, SYSTEM_SOURCE, Target, Wid};
pub use events::{Events, Worker};
pub use options::{DEFAULT_RING_CAPACITY, MAX_PAYLOAD_LIMIT, MAX_WORKERS, Options, Transport};
pub use stats::{PeerStats, Stats};
pub use subs::SubscriptionId;
